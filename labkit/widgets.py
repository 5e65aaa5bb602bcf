"""ipywidgets explorers for the notebooks; each slider calls a plain function of labkit.explore.

    memory_explorer("./workspace")        weights / KV cache / activations per device
    throughput_explorer("./workspace")    measured tok/s and peak memory, max_batch_size x quant_policy
    engine_xray(pipe)                     block tables and queues while a batch runs

The numbers and figures come from labkit/explore/ (tested without a browser); this file only
lays out controls and redraws an Output area when one changes. ipywidgets and matplotlib are
imported here, so `import labkit` does not need them.
"""
from __future__ import annotations

from pathlib import Path

import ipywidgets as W
import matplotlib.pyplot as plt
from IPython.display import display

from labkit.config import ConfigError
from labkit.explore import memory, throughput, xray

POW2 = [2**i for i in range(13)]


def _show(out: W.Output, fig) -> None:
    with out:
        out.clear_output(wait=True)
        display(fig)
    plt.close(fig)


# ---------------------------------------------------------------------------- memory
def memory_summary(m: memory.MemoryBreakdown) -> str:
    ec = m.config
    return (f"<b>KV cache</b> {m.num_blocks:,} blocks x {m.block_size} = {m.kv_tokens:,} tokens, "
            f"{m.kv_bytes / 2**20:,.1f} MiB per device ({m.kv_bytes_per_token:,} B/token, {m.source}); "
            f"<b>{m.full_sessions}</b> full {ec.session_len}-token sessions fit "
            f"(max_batch_size={ec.max_batch_size}). Weights {m.weights_bytes / 2**20:,.1f} MiB, "
            f"activations ~{m.activation_bytes / 2**20:,.1f} MiB per device.<br><small>{m.how}</small>")


def memory_explorer(model, **fixed):
    """Sliders for the KV-cache knobs; `fixed` EngineConfig fields stay as given."""
    from labkit.convert import inspect_model
    cfg = inspect_model(model).config
    tps = [t for t in range(1, cfg.num_heads + 1)
           if all(v % t == 0 for v in (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, cfg.vocab_size))]
    sessions = [s for s in POW2 if 256 <= s <= cfg.max_position_embeddings] or [cfg.max_position_embeddings]
    c = dict(
        max_batch_size=W.SelectionSlider(options=[p for p in POW2 if p <= 256], value=8,
                                         description="max_batch_size"),
        cache_max_entry_count=W.FloatSlider(value=0.5, min=0.05, max=0.95, step=0.05,
                                            description="cache_max_entry_count"),
        quant_policy=W.ToggleButtons(options=[0, 8, 4], value=0, description="quant_policy"),
        session_len=W.SelectionSlider(options=sessions, value=sessions[min(2, len(sessions) - 1)],
                                      description="session_len"),
        cache_block_seq_len=W.SelectionSlider(options=[16, 32, 64, 128, 256], value=64,
                                              description="cache_block_seq_len"),
        tp=W.ToggleButtons(options=tps, value=1, description="tp"),
        kv_budget_gib=W.FloatSlider(value=1.0, min=0.25, max=16, step=0.25,
                                    description="CPU KV budget GiB"),
    )
    for w in c.values():
        w.style = {"description_width": "160px"}
        w.layout = W.Layout(width="520px")
    c = {k: w for k, w in c.items() if k not in fixed}
    text, out = W.HTML(), W.Output()

    def update(*_):
        settings = {**fixed, **{k: w.value for k, w in c.items()}}
        try:
            m = memory.memory_breakdown(model, **settings)
        except ConfigError as e:
            text.value = f"<b>refused:</b> {e}"
            return
        text.value = memory_summary(m)
        _show(out, memory.draw_memory(m))

    for w in c.values():
        w.observe(update, names="value")
    update()
    return W.VBox([*c.values(), text, out])


# ---------------------------------------------------------------------------- throughput
def throughput_summary(p: dict) -> str:
    head = f"max_batch_size={p['max_batch_size']}, quant_policy={p['quant_policy']}: "
    if p["status"] != "measured":
        return head + f"<b>{throughput.NOT_AVAILABLE}</b> ({p['reason']})"
    return head + (f"<b>{p['output_tok_s']:.1f} output tok/s</b> ({p['output_tokens']} tokens in "
                   f"{p['seconds']:.1f} s, {p['steps']} steps), peak memory "
                   f"{p['peak_memory_bytes'] / 2**20:.1f} MiB (KV in use {p['peak_kv_bytes'] / 2**20:.1f} MiB), "
                   f"{p['preemptions']} preemptions")


def throughput_explorer(model, cache_path=None, **settings):
    """Loads (or measures, with a progress bar) the sweep; sliders pick the highlighted point;
    the button measures again and overwrites the cached JSON."""
    from labkit.models.bundled import cache_dir
    path = Path(cache_path) if cache_path else cache_dir() / "throughput-sweep.json"
    bar = W.IntProgress(value=0, min=0, max=1, description="measuring")
    status, text, out = W.HTML(), W.HTML(), W.Output()
    mbs = W.SelectionSlider(options=[1], description="max_batch_size")
    qp = W.ToggleButtons(options=[0], description="quant_policy")
    again = W.Button(description="re-measure", icon="refresh")
    state = {}

    def progress(done, total, rec):
        bar.max, bar.value = total, done
        status.value = f"measured {done}/{total}: max_batch_size={rec['max_batch_size']}, " \
                       f"quant_policy={rec['quant_policy']} ({rec['status']})"

    def load(remeasure=False):
        sweep = throughput.load_or_measure(model, path, remeasure=remeasure, progress=progress, **settings)
        state["sweep"] = sweep
        bar.max = bar.value = len(sweep["points"])
        status.value = f"{'loaded from ' + str(path) if sweep['from_cache'] else 'measured now'} " \
                       f"({sweep['measured_at']})"
        sizes = sorted({p["max_batch_size"] for p in sweep["points"]})
        policies = sorted({p["quant_policy"] for p in sweep["points"]}, key=[0, 8, 4].index)
        mbs.options, qp.options = sizes, policies
        update()

    def update(*_):
        sweep = state.get("sweep")
        if sweep is None or mbs.value not in mbs.options or qp.value not in qp.options:
            return
        text.value = throughput_summary(throughput.point(sweep, mbs.value, qp.value))
        _show(out, throughput.draw_throughput(sweep, (mbs.value, qp.value)))

    mbs.observe(update, names="value")
    qp.observe(update, names="value")
    again.on_click(lambda _: load(remeasure=True))
    load()
    return W.VBox([W.HBox([again, bar]), status, mbs, qp, text, out])


# ---------------------------------------------------------------------------- x-ray
def engine_xray(pipe, prompts=None, gen_config=None, every: int = 1):
    """A button runs a batch through `pipe`'s engine, redrawing after every `every` steps;
    afterwards the step slider replays the recorded frames."""
    from labkit.config import GenerationConfig
    engine = pipe.engine if hasattr(pipe, "engine") else pipe
    prompts = prompts or [f"Count from 1 to {n}." for n in (3, 12, 5, 20, 8, 15, 4, 10)]
    gc = gen_config or GenerationConfig(max_new_tokens=24, ignore_eos=True)
    run = W.Button(description="run the batch", icon="play")
    n_req = W.IntSlider(value=len(prompts), min=1, max=len(prompts), description="requests")
    scrub = W.IntSlider(value=0, min=0, max=0, description="step", disabled=True)
    text, out = W.HTML(), W.Output()
    frames: list[xray.XrayFrame] = []

    def show(frame):
        text.value = (f"step {frame.step}: running {len(frame.running)}, waiting {len(frame.waiting)}, "
                      f"finished {len(frame.finished)}, blocks used {frame.blocks_used[-1]}/{frame.blocks_total}")
        _show(out, xray.draw_xray(frame))

    def go(_=None):
        frames.clear()
        run.disabled, scrub.disabled = True, True
        for f in xray.xray_run(engine, prompts[:n_req.value], gc):
            frames.append(f)
            if f.step % every == 0 or not engine.has_unfinished():
                show(f)
        scrub.max, scrub.value, scrub.disabled, run.disabled = len(frames) - 1, len(frames) - 1, False, False

    scrub.observe(lambda ch: show(frames[ch["new"]]) if frames else None, names="value")
    run.on_click(go)
    box = W.VBox([W.HBox([run, n_req]), scrub, text, out])
    box.run, box.frames = go, frames          # for notebooks and tests: run without a click
    return box
