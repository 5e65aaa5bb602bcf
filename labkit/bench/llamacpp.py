"""The llama.cpp peer of `labkit bench throughput --peer llamacpp` (CPU).

What a laptop user would run instead of labkit: llama.cpp through its Python binding
(llama-cpp-python, the optional `bench` extra), on the same .gguf file the engine converts
(the bundled model's weights stay Q4_1 there: 5 bits per weight, 20 bytes per 32 weights,
against labkit's 16 or 32; the 98 MB file is about what llama.cpp reads per token).

The binding serves one request at a time, so that is how it runs the workload: each request's
prompt ids are evaluated (prefill, in batches of n_batch tokens), then it decodes greedily
until the request has its output length (no stop on eos, as `ignore_eos` for the engine). The
KV cache is reset before every request, so no request reuses another's prefix (the engine
runs each repeat from an empty prefix cache too). Threads: the engine's (torch's) count.

    peer = load_llamacpp(model, n_ctx, n_threads)      # LlamaCppPeer, or raises PeerUnavailable
    run_llamacpp(peer, reqs)                           # the same dict as the engine's run
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "pip install 'labkit[bench]'  (or: pip install llama-cpp-python)"


class PeerUnavailable(RuntimeError):
    """The llama.cpp peer cannot run here; the message says why (the benchmark skips it)."""


@dataclass
class LlamaCppPeer:
    llm: object            # llama_cpp.Llama
    gguf: Path
    n_threads: int
    version: str


def gguf_for(model) -> Path:
    """The .gguf file behind `model`: the alias, a .gguf path, or a workspace converted from
    the bundled model. An HF folder, another workspace or `dummy:...` has none."""
    from labkit.models import bundled
    from labkit.models.loader import inspect_model
    info = inspect_model(model)
    if info.is_dummy:
        raise PeerUnavailable("llama.cpp needs a .gguf file; dummy weights have none")
    src = info.source
    if src is None and info.config.model_name == bundled.BUNDLED_MODEL_NAME:
        src = bundled.bundled_gguf_path()          # a workspace of the bundled model
    if src is None or Path(src).suffix != ".gguf":
        raise PeerUnavailable(f"llama.cpp needs a .gguf file; {model} is not one and was not "
                              f"converted from the bundled one")
    return Path(src)


def load_llamacpp(model, n_ctx: int, n_threads: int) -> LlamaCppPeer:
    """Open the model's .gguf in llama.cpp (CPU only, quiet). Raises PeerUnavailable."""
    gguf = gguf_for(model)              # first: without a .gguf, installing would not help
    try:
        import llama_cpp
    except ImportError as e:
        raise PeerUnavailable(f"llama-cpp-python is not installed ({e}); {INSTALL_HINT}") from None
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=512, n_threads=n_threads,
                          n_threads_batch=n_threads, n_gpu_layers=0, verbose=False)
    return LlamaCppPeer(llm, gguf, n_threads, getattr(llama_cpp, "__version__", "unknown"))


def generate_one(peer: LlamaCppPeer, prompt_ids: list[int], n: int) -> tuple[list[int], float]:
    """Greedy decode of exactly `n` tokens after `prompt_ids` from an empty cache.
    Returns the tokens and the time to the first one (seconds)."""
    llm = peer.llm
    llm.reset()                                   # no prefix reuse between requests
    t0 = time.perf_counter()
    out, ttft = [], 0.0
    gen = llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                       repeat_penalty=1.0, reset=True)
    for tok in gen:
        if not out:
            ttft = time.perf_counter() - t0
        out.append(int(tok))
        if len(out) == n:
            break
    gen.close()
    return out, ttft


def run_llamacpp(peer: LlamaCppPeer, reqs) -> dict:
    """The workload one request at a time; same keys as the engine's run."""
    t0 = time.perf_counter()
    ttfts, n_out = [], 0
    for r in reqs:
        toks, ttft = generate_one(peer, list(r.prompt_ids), r.output_len)
        n_out += len(toks)
        ttfts.append(ttft)
    dt = time.perf_counter() - t0
    assert n_out == sum(r.output_len for r in reqs), "every request must produce its output length"
    ttfts.sort()
    return {"seconds": dt, "output_tokens": n_out, "output_tok_s": n_out / dt,
            "requests_s": len(reqs) / dt, "ttft_p50_s": ttfts[len(ttfts) // 2]}


def llamacpp_measurements(model, reqs, one, warm, n_ctx: int, n_threads: int) -> tuple[dict, dict]:
    """What throughput.py adds for this peer: ({name: run()} to alternate with the engine's,
    and a description for the JSON). When the peer cannot run, no runs and {"skipped": why}."""
    try:
        peer = load_llamacpp(model, n_ctx, n_threads)
    except PeerUnavailable as e:
        return {}, {"skipped": str(e)}
    run_llamacpp(peer, warm)
    fns = {"llamacpp": lambda: run_llamacpp(peer, reqs),
           "llamacpp_batch1": lambda: run_llamacpp(peer, one)}
    info = {"gguf": peer.gguf.name, "threads": peer.n_threads, "llama_cpp_python": peer.version,
            "mode": "one request at a time (the binding's way)"}
    return fns, info
