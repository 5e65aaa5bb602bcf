"""`labkit serve gradio` in both modes (on an api_server through the openai client, and on a
local engine), checked with gradio_client and in a real browser (Debian's chromium driven by
Playwright). References from `pipeline()` on the bundled model. ~60 s on 2 cores."""
import random
import re
import shutil
import time

import pytest

from labkit import EngineConfig, GenerationConfig, pipeline
from tests.helpers import workspace
from tests.serve_helpers import REPO, ServerProcess, free_port

SESSION_LEN, MAX_NEW = 512, 16
NAMES = ["Ada", "Alan", "Grace", "Linus", "Margaret", "Dennis", "Barbara", "Ken"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = REPO / "build" / "screenshots" / "gradio_chat.png"


def plain(text: str) -> str:
    """Text as the page shows it: Markdown markers rendered away, whitespace collapsed."""
    return " ".join(re.sub(r"[*_`#]", "", text).split())


def ask() -> str:
    return f"My name is {random.choice(NAMES)}. Greet me in one short sentence."


@pytest.fixture(scope="module")
def pipe():
    p = pipeline(str(workspace("smollm2-135m")),
                 backend_config=EngineConfig(session_len=SESSION_LEN, cache_max_entry_count=64,
                                             dtype="float32"))
    yield p
    p.close()


@pytest.fixture(scope="module")
def api_server():
    srv = ServerProcess(workspace("smollm2-135m"), "--session-len", SESSION_LEN,
                        "--cache-max-entry-count", 64, "--dtype", "float32")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ui_on_server(api_server):
    from labkit.serve.gradio_app import launch
    ui = launch(api_server.url, server_port=free_port())
    yield ui
    ui.close()


@pytest.fixture(scope="module")
def ui_local():
    from labkit.serve.gradio_app import launch
    ui = launch(str(workspace("smollm2-135m")), server_port=free_port(),
                engine_config=EngineConfig(session_len=SESSION_LEN, cache_max_entry_count=64,
                                           dtype="float32"))
    yield ui
    ui.close()


@pytest.mark.parametrize("mode", ["ui_on_server", "ui_local"])
def test_gradio_client_gets_the_pipeline_greedy_text(mode, request, pipe):
    from gradio_client import Client
    ui = request.getfixturevalue(mode)
    message = ask()
    ref = pipe(message, gen_config=GenerationConfig(max_new_tokens=MAX_NEW)).text
    client = Client(ui.url, verbose=False)
    got = client.predict(message, MAX_NEW, 0.0, 1.0, api_name="/chat")   # max new, temperature, top_p
    assert got == ref and ref
    # the second turn carries the first in its history, as the pipeline's chat session does
    session = pipe.chat(message, gen_config=GenerationConfig(max_new_tokens=MAX_NEW))
    follow = "And what is my name?"
    ref2 = pipe.chat(follow, session=session, gen_config=GenerationConfig(max_new_tokens=MAX_NEW))
    assert client.predict(follow, MAX_NEW, 0.0, 1.0, api_name="/chat") == ref2.response.text


def test_real_browser_chats_through_the_api_server(ui_on_server, pipe):
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed here and `make test` could not install it "
                    "(apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright
    message = ask()
    ref = pipe(message, gen_config=GenerationConfig(max_new_tokens=256)).text   # the page's default
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(ui_on_server.url)
            box = page.get_by_role("textbox").first
            box.fill(message)
            box.press("Enter")
            expect(page.locator(".message.user").last).to_have_text(message, timeout=30_000)
            bot = page.locator(".message.bot").last
            bot.wait_for(timeout=60_000)
            deadline, shown = time.monotonic() + 120, ""
            while plain(shown) != plain(ref) and time.monotonic() < deadline:   # streams in
                page.wait_for_timeout(200)
                shown = bot.inner_text()
            assert plain(shown) == plain(ref)
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
            page.get_by_role("button", name="Reset conversation").click()
            expect(page.locator(".message.bot")).to_have_count(0, timeout=10_000)
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
