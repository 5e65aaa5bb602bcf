"""`labkit serve api_server` on the bundled model, driven by the official openai client
(max_retries=0), raw HTTP (httpx) and the `api_client` CLI; references from `pipeline()`.
One server for the module; ~60 s on 2 cores."""
import json
import random
import secrets
import signal
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from labkit import EngineConfig, GenerationConfig, pipeline
from tests.helpers import workspace
from tests.serve_helpers import REPO, ServerProcess

KEY = "sk-test-" + secrets.token_hex(8)
BS, SESSION_LEN, NAME = 16, 384, "smollm2"
TOPICS = ["a cat", "the sea", "a robot", "Paris", "winter", "a library", "bread", "the moon"]


def question(rng) -> str:
    a, b, topic = rng.randint(2, 99), rng.randint(2, 99), rng.choice(TOPICS)
    return rng.choice([f"Write one sentence about {topic} and the number {a}.",
                       f"What is {a} plus {b}? Explain briefly.",
                       f"Give me {a % 4 + 2} facts about {topic}."])


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(workspace("smollm2-135m"), "--session-len", SESSION_LEN,
                        "--cache-max-entry-count", 96, "--cache-block-seq-len", BS,
                        "--max-batch-size", 8, "--api-keys", KEY, "--served-model-name", NAME,
                        "--dtype", "float32")   # compared token for token with the pipeline
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pipe():
    p = pipeline(str(workspace("smollm2-135m")), backend_config=EngineConfig(
        session_len=SESSION_LEN, cache_max_entry_count=96, cache_block_seq_len=BS, dtype="float32"))
    yield p
    p.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert models.data[0].model_extra["max_model_len"] == SESSION_LEN


def test_chat_stream_equals_nonstream_equals_pipeline(client, pipe):
    messages = [{"role": "user", "content": question(random.Random())}]
    ref = pipe(messages, gen_config=GenerationConfig(max_new_tokens=20))
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    assert full.choices[0].message.content == ref.text and ref.text
    assert full.choices[0].finish_reason == ref.finish_reason
    assert full.usage.prompt_tokens == ref.input_token_len
    assert full.usage.completion_tokens == ref.generate_token_len
    chunks = list(client.chat.completions.create(
        model=NAME, messages=messages, max_completion_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.generate_token_len


def test_completions_stream_and_nonstream(client, pipe):
    rng = random.Random()
    prompt = f"The {rng.choice(['first', 'second', 'last'])} thing to know about {rng.choice(TOPICS)} is"
    ids = pipe.tokenizer.encode(prompt, add_special_tokens=True)       # no chat template
    ref = pipe([ids], gen_config=GenerationConfig(max_new_tokens=16))[0]
    full = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
    assert full.choices[0].text == ref.text and full.usage.prompt_tokens == len(ids)
    parts = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0,
                                           stream=True))
    assert "".join(p.choices[0].text for p in parts) == ref.text
    by_ids = client.completions.create(model=NAME, prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == ref.text


def test_sampling_knobs_reach_the_engine(client, pipe):
    """Seeded sampling is reproducible and per request, so the server must give exactly what
    pipeline() gives with the same GenerationConfig: every knob is mapped right."""
    messages = [{"role": "user", "content": question(random.Random())}]
    seed = random.randint(0, 2**31)
    gc = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.8, top_k=20,
                          repetition_penalty=1.1, random_seed=seed)
    ref = pipe(messages, gen_config=gc).text
    got = [client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=16, temperature=0.9, top_p=0.8, seed=seed,
        extra_body={"top_k": 20, "repetition_penalty": 1.1}).choices[0].message.content
        for _ in range(2)]
    assert got == [ref, ref]


def test_stop_string_cuts_the_answer(client, pipe):
    messages = [{"role": "user", "content": question(random.Random())}]
    ref = pipe(messages, gen_config=GenerationConfig(max_new_tokens=24)).text
    word = ref.split()[len(ref.split()) // 2]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24,
                                         temperature=0, stop=[word])
    assert out.choices[0].message.content == ref[:ref.find(word)]
    assert out.choices[0].finish_reason == "stop"


LONG = "word " * (SESSION_LEN + 20)


@pytest.mark.parametrize("kw, param, code", [
    (dict(temperature=-1), "temperature", "invalid_value"),
    (dict(messages=[]), "messages", "invalid_value"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role", "invalid_value"),
    (dict(max_tokens=0), "max_tokens", "invalid_value"),
    (dict(n=2), "n", "invalid_value"),
    (dict(messages=[{"role": "user", "content": LONG}]), "messages", "context_length_exceeded"),
])
def test_bad_requests_are_400_naming_the_field(client, kw, param, code):
    args = dict(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4) | kw
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    err = e.value.body
    assert e.value.status_code == 400 and set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == code and err["type"] == "invalid_request_error"
    assert param.split("[")[0] in err["message"]
    if code == "context_length_exceeded":
        assert f"session_len={SESSION_LEN}" in err["message"]


def test_malformed_json_unknown_model_and_api_keys(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.post("/chat/completions", cast_to=object, content=b'{"model": "smollm2", "mess',
                    options={"headers": {"Content-Type": "application/json"}})
    assert e.value.body["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"})        # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"           # open
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": "not a list"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"    # never a bare 422


def interactive(server, **body) -> list[dict]:
    r = httpx.post(server.url + "/v1/chat/interactive", json=body, timeout=120,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


def test_interactive_session_keeps_kv_and_end_frees_it(server, pipe):
    rng = random.Random()
    sid = rng.randint(1, 10**6)
    # a start no other test's prompt has: the prefix cache can then hold only the template's blocks
    q1 = f"Case {rng.randint(10**5, 10**6)}. " + question(rng)
    try:
        _session_keeps_kv_and_end_frees_it(server, pipe, sid, q1)
    finally:                      # a failure must not leave the session's blocks to later tests
        httpx.post(server.url + "/v1/chat/interactive", timeout=60,
                   headers={"Authorization": f"Bearer {KEY}"},
                   json={"prompt": "", "session_id": sid, "interactive_mode": False})


def _session_keeps_kv_and_end_frees_it(server, pipe, sid, q1):
    lines = interactive(server, prompt=q1, session_id=sid, interactive_mode=True, stream=True,
                        temperature=0, request_output_len=24)
    first = "".join(x["text"] for x in lines)
    assert first == pipe(q1, gen_config=GenerationConfig(max_new_tokens=24)).text
    assert lines[-1]["finish_reason"] in ("stop", "length")
    # (the system prompt's block may be cached from earlier requests: no more than that)
    assert lines[-1]["prefix_hit_tokens"] < lines[-1]["input_tokens"] - BS
    m = server.metrics()
    assert m["labkit_kv_blocks_held"] > 0 and m["labkit_sessions_active"] == 1
    history = lines[-1]["input_tokens"] + lines[-1]["tokens"]
    second = interactive(server, prompt="Say that again, shorter.", session_id=sid,
                         interactive_mode=True, temperature=0, request_output_len=12)[0]
    # all of turn 1 that fills whole blocks came from the kept KV; only the rest was computed
    assert second["prefix_hit_tokens"] == (history - 1) // BS * BS > 0
    assert second["input_tokens"] > history and second["text"]
    ended = interactive(server, prompt="", session_id=sid, interactive_mode=False)[0]
    assert ended["session_id"] == sid
    m = server.metrics()
    assert m["labkit_kv_blocks_used"] == 0 and m["labkit_sessions_active"] == 0
    assert m["labkit_kv_blocks_held"] == 0


def test_interactive_busy_stop_and_full_session(server):
    sid = random.randint(1, 10**6)
    got = {}

    def long_turn():
        got["lines"] = interactive(server, prompt="Count to one thousand.", session_id=sid,
                                   interactive_mode=True, stream=True, ignore_eos=True,
                                   request_output_len=300, temperature=0)
    t = threading.Thread(target=long_turn)
    t.start()
    server.wait_metric("labkit_requests_running", 1, within=30)
    r = httpx.post(server.url + "/v1/chat/interactive", headers={"Authorization": f"Bearer {KEY}"},
                   json={"prompt": "hello?", "session_id": sid, "interactive_mode": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "session_busy"
    interactive(server, prompt="", session_id=sid, stop=True)
    t.join(30)
    assert got["lines"][-1]["finish_reason"] == "abort"
    r = httpx.post(server.url + "/v1/chat/interactive", headers={"Authorization": f"Bearer {KEY}"},
                   json={"prompt": LONG, "session_id": sid, "interactive_mode": True})
    assert r.status_code == 400 and f"session_len={SESSION_LEN}" in r.json()["error"]["message"]
    interactive(server, prompt="", session_id=sid, interactive_mode=False)
    assert server.metrics()["labkit_kv_blocks_used"] == 0


def test_api_client_cli_with_piped_stdin(server):
    script = "Hello!\nWhat did I just say?\nend\nHi again.\nexit\nnever read\n"
    r = subprocess.run([sys.executable, "-m", "labkit", "serve", "api_client", server.url,
                        "--api-key", KEY, "--max-new-tokens", "12"], input=script, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "[0] >>> Hello!" in r.stdout and "[1] >>> What did I just say?" in r.stdout
    assert "(session reset)" in r.stdout and "[0] >>> Hi again." in r.stdout
    assert "never read" not in r.stdout
    assert server.metrics()["labkit_sessions_active"] == 0      # exit ended its session


def test_metrics_in_prometheus_text(server):
    m = server.metrics()
    for name in ("labkit_kv_blocks_used", "labkit_kv_blocks_free", "labkit_requests_running",
                 "labkit_requests_waiting", "labkit_generated_tokens_total"):
        assert name in m
    assert m["labkit_time_to_first_token_seconds_count"] > 0
    assert m["labkit_inter_token_latency_seconds_count"] > m["labkit_time_to_first_token_seconds_count"]
    assert m["labkit_generated_tokens_total"] >= m["labkit_inter_token_latency_seconds_count"]
    assert m["labkit_kv_blocks_used"] + m["labkit_kv_blocks_free"] == m["labkit_kv_blocks_total"]


def test_sigterm_finishes_running_requests_and_exits_0(server, client):
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=24, temperature=0, stream=True)
    first = next(iter(stream))
    assert server.stop(signal.SIGTERM) == 0
    rest = list(stream)                              # the running request was finished
    assert first.choices[0].delta.role == "assistant" and rest[-1].choices[0].finish_reason
    assert "labkit api_server: stopped" in server.log()
