"""`labkit serve gradio MODEL_OR_URL`: a Gradio chat page, on an api_server or on a local engine.

    labkit serve gradio http://127.0.0.1:23333   browser -> Gradio -> openai client -> api_server -> engine
    labkit serve gradio ./workspace              browser -> Gradio -> AsyncEngine -> engine (this process)

A Gradio 6 ChatInterface: streaming answers, max new tokens / temperature / top_p controls
(temperature 0 = greedy, the default, so the page answers what `pipeline()` answers), and a
reset button. The conversation lives in the page; each message sends the whole history.

From a notebook:

    ui = launch("http://127.0.0.1:23333")   # returns at once; the page runs in the background
    ui.url                                  # also shown inline in Jupyter
    ui.close()                              # stops the page (and a local engine)
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

DEFAULT_MAX_NEW_TOKENS = 256


def is_url(model) -> bool:
    return str(model).startswith(("http://", "https://"))


def _text(content) -> str:
    """A Gradio history message's content as plain text (str, or a list of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return "" if content is None else str(content)


class APIBackend:
    """Answers through an api_server's /v1/chat/completions with the official openai client."""

    def __init__(self, url: str, api_key: str | None = None):
        self.url, self.api_key = url.rstrip("/"), api_key
        self.name = f"api_server {self.url}"
        self._client, self.model = None, None

    async def stream(self, messages: list[dict], max_new_tokens: int, temperature: float, top_p: float):
        from openai import AsyncOpenAI
        if self._client is None:        # made on Gradio's event loop, where it is used
            self._client = AsyncOpenAI(base_url=self.url + "/v1", api_key=self.api_key or "none",
                                       max_retries=0)
            self.model = (await self._client.models.list()).data[0].id
        stream = await self._client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=max_new_tokens,
            temperature=temperature, top_p=top_p, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    def close(self) -> None:
        self._client = None             # its connections close with Gradio's event loop


class LocalBackend:
    """Answers with an engine loaded in this process, through an AsyncEngine."""

    def __init__(self, model, engine_config=None):
        from labkit.engine.async_engine import AsyncEngine
        from labkit.engine.engine import LLMEngine
        self.aeng = AsyncEngine(LLMEngine(model, engine_config))
        self.name = f"{model} (local engine)"

    async def stream(self, messages: list[dict], max_new_tokens: int, temperature: float, top_p: float):
        from labkit.config import GenerationConfig
        gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                              temperature=temperature, top_p=top_p, top_k=0)
        async for out in self.aeng.generate(messages, gc):
            if out.delta_text:
                yield out.delta_text

    def close(self) -> None:
        self.aeng.close()


def build_demo(backend):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    async def respond(message, history, max_new_tokens, temperature, top_p):
        messages = [{"role": m["role"], "content": _text(m["content"])} for m in history
                    if m.get("role") in ("user", "assistant", "system")]
        messages.append({"role": "user", "content": _text(message)})
        text = ""
        async for piece in backend.stream(messages, int(max_new_tokens), float(temperature), float(top_p)):
            text += piece
            yield text

    with gr.Blocks(title="labkit chat") as demo:
        gr.Markdown(f"### labkit chat: {backend.name}")
        controls = [
            gr.Slider(1, 2048, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="max new tokens", render=False),
            gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="temperature (0 = greedy)", render=False),
            gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="top_p", render=False)]
        chat = gr.ChatInterface(respond, additional_inputs=controls, api_name="chat",
                                additional_inputs_accordion=gr.Accordion("generation", open=True, render=False),
                                concurrency_limit=None, fill_height=False)
        reset = gr.Button("Reset conversation", variant="secondary")
        reset.click(lambda: ([], []), None, [chat.chatbot, chat.chatbot_state], api_visibility="private")
    return demo


@dataclass
class GradioApp:
    """A running Gradio page: `url`, and `close()` to stop it."""
    demo: object
    backend: object
    url: str

    def close(self) -> None:
        self.demo.close()
        self.backend.close()

    def __repr__(self) -> str:
        return f"GradioApp(url={self.url!r}, backend={self.backend.name!r})"


def launch(model_or_url, server_name: str = "127.0.0.1", server_port: int = 6006,
           api_key: str | None = None, engine_config=None, inline: bool | None = None,
           share: bool = False, quiet: bool = True) -> GradioApp:
    """Start the page in the background and return at once (notebooks, tests, the CLI)."""
    from labkit.serve.api_server import check_port_free
    check_port_free(server_name, server_port)
    backend = APIBackend(model_or_url, api_key) if is_url(model_or_url) else \
        LocalBackend(model_or_url, engine_config)
    try:
        demo = build_demo(backend)
        demo.queue(default_concurrency_limit=None)
        demo.launch(server_name=server_name, server_port=server_port, prevent_thread_lock=True,
                    inline=inline, share=share, quiet=quiet, show_error=True)
    except BaseException:
        backend.close()
        raise
    return GradioApp(demo, backend, demo.local_url or f"http://{server_name}:{server_port}/")


def main(args) -> int:
    import signal
    from labkit.engine_args import engine_config_from_args
    ec = None if is_url(args.model) else engine_config_from_args(args)
    app = launch(args.model, args.server_name, args.server_port, args.api_key, ec,
                 inline=False, share=args.share)
    print(f"labkit gradio: {app.backend.name} on {app.url}  (Ctrl-C or SIGTERM stops it)", flush=True)
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        app.close()
    print("labkit gradio: stopped", flush=True)
    return 0
