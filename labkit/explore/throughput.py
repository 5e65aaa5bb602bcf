"""A measured sweep: output tokens/s and peak memory of the real engine for each
max_batch_size x quant_policy, on one fixed workload (labkit/bench/workload.py: real text
prompts, fixed output lengths with ignore_eos).

    sweep = load_or_measure("./workspace", "build/sweep.json", batch_sizes=(1, 4, 16))
    point(sweep, max_batch_size=4, quant_policy=0)["output_tok_s"]
    draw_throughput(sweep, selected=(4, 0))

A quant_policy the engine refuses (int8/int4 KV before the KV-quant lesson is merged) is kept
as a point with status "not available yet" and the engine's one-line reason, not skipped.
Results are cached as JSON (written atomically) and reused while the settings are the same.

peak memory = the model's weight bytes + the most KV blocks in use at any step x bytes per block.
All requests arrive at once (an offline burst): time to first token includes the wait in the
queue, and time per output token is each request's decode time over its tokens after the first.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

DEFAULTS = dict(batch_sizes=(1, 4, 16), quant_policies=(0, 8, 4), num_requests=16,
                input_len=(32, 96), output_len=16, session_len=512, seed=0)
NOT_AVAILABLE = "not available yet"


def measure_point(model, max_batch_size: int, quant_policy: int, prompts: list,
                  output_len: int, session_len: int, **engine_kw) -> dict:
    """Run the workload once on a fresh engine (prompts: strings, chats or token ids; other
    EngineConfig fields in engine_kw); one record of what was measured."""
    from labkit.config import ConfigError, EngineConfig, GenerationConfig
    from labkit.engine.engine import LLMEngine
    rec = {"max_batch_size": max_batch_size, "quant_policy": quant_policy}
    try:
        engine = LLMEngine(model, EngineConfig(max_batch_size=max_batch_size, quant_policy=quant_policy,
                                               session_len=session_len, **engine_kw))
    except ConfigError as e:
        return {**rec, "status": NOT_AVAILABLE, "reason": str(e)}
    gc = GenerationConfig(max_new_tokens=output_len, ignore_eos=True)
    engine.generate([prompts[0]], GenerationConfig(max_new_tokens=2, ignore_eos=True))  # warm-up
    engine.reset_prefix_cache()
    for p in prompts:
        engine.add_request(p, gc)
    peak_blocks, steps, n_out, done = 0, 0, 0, []
    t0 = time.perf_counter()
    while engine.has_unfinished():
        outs = engine.step()
        n_out += len(outs)
        done += [o for o in outs if o.finished]
        steps += 1
        peak_blocks = max(peak_blocks, engine.block_manager.num_used)
    seconds = time.perf_counter() - t0
    ttft = sorted(o.metrics["ttft_s"] for o in done)
    # time per output token after the first, per request (the decode speed a user sees)
    tpot = sorted((o.metrics["latency_s"] - o.metrics["ttft_s"]) / max(1, len(o.token_ids) - 1) for o in done)
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    peak_kv = peak_blocks * engine.kv_plan.bytes_per_block
    st = engine.stats()
    return {**rec, "status": "measured", "seconds": seconds, "output_tokens": n_out,
            "output_tok_s": n_out / seconds, "steps": steps, "weights_bytes": weights,
            "ttft_p50_s": ttft[len(ttft) // 2], "ttft_max_s": ttft[-1], "tpot_p50_s": tpot[len(tpot) // 2],
            "peak_kv_bytes": peak_kv, "peak_memory_bytes": weights + peak_kv,
            "kv_blocks_total": st["blocks_total"], "preemptions": st["preemptions"],
            "prefix_hit_tokens": sum(o.num_prefix_hit_tokens for o in done),
            "device": st["device"], "dtype": st["dtype"]}


def measure_sweep(model, progress=None, **settings) -> dict:
    """Every max_batch_size x quant_policy point; `progress(done, total, record)` after each."""
    from labkit.bench.workload import make_workload
    from labkit.convert import inspect_model
    from labkit.tokenizer import Tokenizer
    s = {**DEFAULTS, **settings}
    info = inspect_model(model)
    tok = Tokenizer(info.tokenizer_dir, info.config.model_name)
    reqs = make_workload(tok, s["num_requests"], s["input_len"], (s["output_len"],) * 2, s["seed"])
    prompts = [r.prompt_ids for r in reqs]
    grid = [(b, q) for q in s["quant_policies"] for b in s["batch_sizes"]]
    points = []
    for i, (b, q) in enumerate(grid):
        points.append(measure_point(model, b, q, prompts, s["output_len"], s["session_len"]))
        if progress is not None:
            progress(i + 1, len(grid), points[-1])
    return {"model": str(model), "settings": _jsonable(s), "points": points,
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def load_or_measure(model, cache_path, remeasure: bool = False, progress=None, **settings) -> dict:
    """The cached sweep if it was measured for this model and these settings, else a new one."""
    path = Path(cache_path)
    want = _jsonable({**DEFAULTS, **settings})
    if path.is_file() and not remeasure:
        cached = json.loads(path.read_text())
        if cached.get("model") == str(model) and cached.get("settings") == want:
            return {**cached, "from_cache": True}
    sweep = measure_sweep(model, progress=progress, **settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(sweep, indent=1))
    os.replace(tmp, path)                                  # atomic: never a half-written cache
    return {**sweep, "from_cache": False}


def point(sweep: dict, max_batch_size: int, quant_policy: int) -> dict:
    for p in sweep["points"]:
        if p["max_batch_size"] == max_batch_size and p["quant_policy"] == quant_policy:
            return p
    raise KeyError(f"max_batch_size={max_batch_size}, quant_policy={quant_policy} is not in the "
                   f"sweep; measured: {sorted({(p['max_batch_size'], p['quant_policy']) for p in sweep['points']})}")


def series(sweep: dict, quant_policy: int, key: str) -> tuple[list[int], list[float]]:
    """(batch sizes, values) of the measured points of one quant_policy."""
    pts = sorted((p for p in sweep["points"] if p["quant_policy"] == quant_policy
                  and p["status"] == "measured"), key=lambda p: p["max_batch_size"])
    return [p["max_batch_size"] for p in pts], [p[key] for p in pts]


def _jsonable(s: dict) -> dict:
    return json.loads(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}))


QP_LABEL = {0: "quant_policy=0 (model dtype KV)", 8: "quant_policy=8 (int8 KV)", 4: "quant_policy=4 (int4 KV)"}


def draw_throughput(sweep: dict, selected: tuple[int, int] | None = None):
    """Output tok/s and peak memory against max_batch_size, one line per quant_policy; the
    selected (max_batch_size, quant_policy) point ringed; refused policies named in the legend."""
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 3.8))
    policies = sorted({p["quant_policy"] for p in sweep["points"]}, key=[0, 8, 4].index)
    for i, q in enumerate(policies):
        xs, tok_s = series(sweep, q, "output_tok_s")
        label = QP_LABEL.get(q, f"quant_policy={q}")
        if not xs:
            ax_t.plot([], [], color=f"C{i}", label=f"{label}: {NOT_AVAILABLE}")
            continue
        _, mem = series(sweep, q, "peak_memory_bytes")
        ax_t.plot(xs, tok_s, "o-", color=f"C{i}", label=label)
        ax_m.plot(xs, [m / 2**20 for m in mem], "o-", color=f"C{i}", label=label)
    if selected is not None:
        p = point(sweep, *selected)
        if p["status"] == "measured":
            for ax, y in ((ax_t, p["output_tok_s"]), (ax_m, p["peak_memory_bytes"] / 2**20)):
                ax.plot([p["max_batch_size"]], [y], "o", ms=16, mfc="none", mec="black", mew=2,
                        label="selected")
        else:
            ax_t.set_title(f"selected: quant_policy={p['quant_policy']} is {NOT_AVAILABLE}")
    for ax, ylabel in ((ax_t, "output tokens/s"), (ax_m, "peak memory (MiB): weights + KV in use")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max_batch_size")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, None)
        ax.legend(fontsize=7)
    s = sweep["settings"]
    fig.suptitle(f"measured {sweep['measured_at']}: {s['num_requests']} requests, prompts "
                 f"{s['input_len'][0]}-{s['input_len'][1]} tokens, {s['output_len']} output tokens each",
                 fontsize=9)
    fig.tight_layout()
    return fig
