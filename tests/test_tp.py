"""Tensor parallelism (lesson 04): the column/row/MLP/attention patterns against the unsplit
layers, the engine at tp=N against tp=1 (greedy, fp32), what it communicates, and the worker
processes' lifecycle (close, a killed worker, Ctrl-C / SIGTERM, torchrun).

Run time on 2 busy CPU cores: ~3-5 min in all, most of it starting ranks (each imports torch);
the 20 start/close cycles alone take ~1-2 min (marked slow).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit import EngineConfig, GenerationConfig, pipeline
from labkit.config import ConfigError
from tests.conftest import REPO, _env, labkit_cmd
from tests.helpers import workspace

PROMPTS = ["Hi", "What is the capital of France?",
           [{"role": "user", "content": "Write one sentence about the sea."}]]
TINY = dict(session_len=256, max_batch_size=8, cache_max_entry_count=64, dtype="float32")


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def children(pid: int | None = None) -> list[int]:
    """Live child processes of `pid` (default: this one), leaving out multiprocessing's
    resource tracker (one helper per parent, shared by everything it spawns, gone at exit)."""
    pid = pid or os.getpid()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()            # after "(comm)": state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z" and "resource_tracker" not in cmd:
            out.append(int(d.name))
    return out


def wait_gone(pids, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()
                 and (Path(f"/proc/{p}") / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


def greedy_ids(model, tp: int, prompts=PROMPTS, n: int = 12, **kw) -> list[list[int]]:
    with pipeline(str(model), backend_config=EngineConfig(tp=tp, **kw)) as pipe:
        outs = pipe(prompts, gen_config=GenerationConfig(max_new_tokens=n))
        assert pipe.stats()["blocks_used"] == 0
    return [o.token_ids for o in outs]


# ---------------------------------------------------------------------------- patterns
@pytest.mark.parametrize("world", [2, 3])
def test_column_row_mlp_attention_equal_the_unsplit_layer(world):
    from labkit.dist.parallel_linear import check_patterns
    from labkit.dist.ranks import run_ranks
    results = run_ranks(check_patterns, world, fresh_seed())
    expected_ops = {"column": ["all_gather"], "row": ["all_reduce"], "mlp": ["all_reduce"],
                    "attention": ["all_reduce"]}
    for rank, r in enumerate(results):
        for name, ops in expected_ops.items():
            assert r[name]["max_err_fp32"] < 1e-5, (rank, name, r[name])
            assert r[name]["max_err_fp64"] < 1e-5, (rank, name, r[name])
            assert r[name]["collectives"] == ops, (name, r[name]["collectives"])
    assert results[0]["mlp"]["payload_bytes"] == 2 * 5 * 96 * 4      # (B, L, H) fp32, once


def test_run_ranks_names_the_failing_rank():
    from labkit.dist.ranks import run_ranks
    with pytest.raises(RuntimeError, match="rank 1 failed"):
        run_ranks(_fail_on_rank_1, 2)
    assert children() == []


def _fail_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("boom")
    return rank


# ---------------------------------------------------------------------------- engine
def test_tp2_tiny_equals_tp1_with_chunks_and_prefix_hits(tiny_llama_dir):
    long_prompt = "Count slowly: " + " ".join(str(i) for i in range(40))
    prompts = PROMPTS + [long_prompt]
    kw = dict(TINY, max_prefill_token_num=16)           # the long prompt prefills in chunks
    ref = greedy_ids(tiny_llama_dir, 1, prompts, 16, **kw)
    with pipeline(str(tiny_llama_dir), backend_config=EngineConfig(tp=2, **kw)) as pipe:
        gc = GenerationConfig(max_new_tokens=16)
        first = [o.token_ids for o in pipe(prompts, gen_config=gc)]
        again = [o.token_ids for o in pipe(prompts, gen_config=gc)]     # served from the prefix cache
        assert pipe.stats()["prefix_cache_hits"] > 0
        streamed = {}
        for r in pipe.stream_infer(prompts[:2], gen_config=gc):
            streamed.setdefault(r.index, []).extend(r.token_ids)
    assert first == ref and again == ref
    assert [streamed[0], streamed[1]] == ref[:2]
    assert children() == []


def test_tp3_bundled_model_equals_tp1():
    ws = workspace("smollm2-135m")
    kw = dict(session_len=256, max_batch_size=4, cache_max_entry_count=32, dtype="float32")
    assert greedy_ids(ws, 3, **kw) == greedy_ids(ws, 1, **kw)
    assert children() == []


def test_bytes_communicated_per_token_match_the_formula(tiny_llama_dir):
    from labkit.dist.comm import bytes_per_token, count_collectives
    gc = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    with pipeline(str(tiny_llama_dir), backend_config=EngineConfig(tp=2, **TINY)) as pipe:
        cfg = pipe.engine.model_config
        with count_collectives() as c:
            outs = pipe(PROMPTS, gen_config=gc)
    computed = sum(o.input_token_len + o.generate_token_len - 1 for o in outs)  # last one never fed
    generated = sum(o.generate_token_len for o in outs)
    per_token = bytes_per_token(cfg.hidden_size, cfg.num_layers, cfg.vocab_size, 2, 4)
    ops = c.by_op()
    assert set(ops) == {"all_reduce", "all_gather"}
    assert ops["all_reduce"][1] == computed * per_token["all_reduce_payload"]
    assert ops["all_gather"][1] == generated * per_token["all_gather_payload"]
    assert ops["all_reduce"][0] == ops["all_gather"][0] * 2 * cfg.num_layers   # per step


def test_tp_that_does_not_divide_the_heads_fails_before_any_process():
    with pytest.raises(ConfigError, match=r"tp=2 is not allowed.*head_num=9.*one of \[1, 3\]"):
        pipeline(str(workspace("smollm2-135m")), backend_config=EngineConfig(tp=2))
    assert children() == []


# ---------------------------------------------------------------------------- lifecycle
@pytest.mark.slow
def test_20_start_close_cycles_leave_no_child(tiny_llama_dir):
    for _ in range(20):
        pipe = pipeline(str(tiny_llama_dir), backend_config=EngineConfig(tp=2, **TINY))
        pipe("Hi", gen_config=GenerationConfig(max_new_tokens=2))
        pipe.close()
        assert children() == []


def test_killed_worker_raises_within_30s(tiny_llama_dir):
    pipe = pipeline(str(tiny_llama_dir), backend_config=EngineConfig(tp=2, **TINY))
    try:
        pipe("Hi", gen_config=GenerationConfig(max_new_tokens=2))
        (worker,) = children()
        os.kill(worker, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1 exited"):
            pipe("Hi again", gen_config=GenerationConfig(max_new_tokens=2))
        assert time.monotonic() - t0 < 30
        assert pipe.stats()["blocks_used"] == 0
    finally:
        pipe.close()
    assert children() == []


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C's default, as a terminal gives its foreground job. A
    test run started in the background (`make test &`) ignores SIGINT, the child inherits that,
    and Python then never raises KeyboardInterrupt: the chat sat in readline until killed."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_chat(model, *flags, **kw) -> subprocess.Popen:
    return subprocess.Popen(labkit_cmd("chat", model, "--tp", "2", "--max-new-tokens", "8",
                                       "--session-len", "256", "--cache-max-entry-count", "64",
                                       *flags), cwd=REPO, env=_env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint, **kw)


def _engine_ready(proc) -> int:
    """Wait for the chat banner (printed once the engine is built); return the worker's pid."""
    banner = proc.stdout.readline()
    assert banner.startswith("labkit chat"), (banner, proc.stderr.read() if proc.poll() is not None else "")
    (worker,) = children(proc.pid)
    return worker


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c", "sigkill"])
def test_chat_tp2_stopped_by_signal_leaves_no_process(tiny_llama_dir, how):
    proc = _start_chat(tiny_llama_dir, start_new_session=True)
    try:
        worker = _engine_ready(proc)                                     # now reading stdin
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)
        elif how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)                           # the terminal's whole group
        else:
            proc.kill()                                                  # no cleanup at all
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:   # say where it waits (how the ctrl-c hang was found)
            os.kill(proc.pid, signal.SIGUSR1)                            # labkit: dump stacks
            time.sleep(2)
            proc.kill()
            pytest.fail(f"still running 60 s after {how}; its stacks:\n{proc.stderr.read()[-6000:]}")
        assert rc == (-9 if how == "sigkill" else 130)
        assert wait_gone([worker]) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_chat_tp2_spawned_and_under_torchrun_equal_tp1(tiny_llama_dir):
    """`labkit chat --tp 2` (ranks spawned) and the same command under torchrun (2 CPU
    processes, gloo, c10d rendezvous) print exactly what `labkit chat` at tp=1 prints."""
    from labkit.dist.ranks import host_store
    text = "Hi\nName a colour.\n"
    common = ["chat", str(tiny_llama_dir), "--max-new-tokens", "10", "--session-len", "256",
              "--cache-max-entry-count", "64"]
    port = host_store().port            # a free port (this store is dropped at once)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                "-m", "labkit.engine.tp_worker", *common, "--tp", "2"]
    outs = []
    for cmd in (labkit_cmd(*common), labkit_cmd(*common, "--tp", "2"), torchrun):
        r = subprocess.run(cmd, input=text, capture_output=True, text=True, timeout=300,
                           cwd=REPO, env=_env())
        assert r.returncode == 0, r.stderr[-3000:]
        outs.append(r.stdout)
    assert outs[0].count(">>>") == 2 and outs[1] == outs[0] and outs[2] == outs[0]


def test_bench_throughput_tp2(tiny_llama_dir):
    import json
    r = subprocess.run(labkit_cmd("bench", "throughput", tiny_llama_dir, "--tp", "2", "--no-hf",
                                  "--num-requests", "4", "--input-len", "8", "16", "--output-len",
                                  "4", "8", "--batch1-output-len", "4", "--repeats", "1",
                                  "--session-len", "128", "--json"),
                       capture_output=True, text=True, timeout=300, cwd=REPO, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["tp"] == 2 and 4 * 4 <= result["labkit"]["output_tokens"] <= 4 * 8
    assert result["labkit"]["output_tok_s"] > 0 and result["labkit_batch1"]["output_tokens"] == 4


def test_api_server_tp3_equals_pipeline_tp1():
    # The official openai client against `labkit serve api_server --tp 3` (3 rank processes):
    # greedy chat completions equal the tp=1 pipeline's text; SIGTERM leaves no rank behind.
    from openai import OpenAI

    from tests.serve_helpers import ServerProcess
    ws = workspace("smollm2-135m")
    kw = dict(session_len=256, max_batch_size=4, cache_max_entry_count=32, dtype="float32")
    prompts = ["The capital of France is", "def fibonacci(n):"]
    with pipeline(str(ws), backend_config=EngineConfig(**kw)) as pipe:
        want = [r.text for r in pipe(prompts, gen_config=GenerationConfig(max_new_tokens=12))]
    server = ServerProcess(ws, "--tp", 3, "--session-len", 256, "--max-batch-size", 4,
                           "--cache-max-entry-count", 32, "--dtype", "float32")
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        got = [client.chat.completions.create(model=model, max_tokens=12, temperature=0,
                                              messages=[{"role": "user", "content": p}])
               .choices[0].message.content for p in prompts]
        ranks = children(server.proc.pid)
        assert len(ranks) >= 2, f"expected the tp ranks as children, got {ranks}"
    finally:
        server.stop()
    assert got == want
    assert wait_gone(ranks) == []
