"""The explorers behind the notebook widgets, without a browser: their numbers and their
plotted data are what the engine allocates and measures for the same settings."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from labkit import EngineConfig, GenerationConfig
from labkit.config import ConfigError
from labkit.engine.engine import LLMEngine
from labkit.explore import memory, throughput, xray

MODEL = "tiny-llama"
BUDGET = dict(kv_budget_gib=0.01)      # a fractional cache of 10 MiB: the same on any machine


def engine_for(**settings) -> LLMEngine:
    return LLMEngine(MODEL, EngineConfig(**settings))


def bars(fig, label: str) -> list[float]:
    """Heights of the bar series called `label` in the figure's first axes."""
    ax = fig.axes[0]
    for c in ax.containers:
        if c.get_label() == label:
            return [r.get_height() for r in c]
    raise KeyError(label)


@pytest.mark.parametrize("settings", [
    dict(max_batch_size=4, session_len=256, cache_max_entry_count=0.5, cache_block_seq_len=16, **BUDGET),
    dict(max_batch_size=64, session_len=1024, cache_max_entry_count=0.3, cache_block_seq_len=64, **BUDGET),
    dict(max_batch_size=2, session_len=128, cache_max_entry_count=0.9, cache_block_seq_len=32, **BUDGET),
    dict(max_batch_size=8, session_len=512, cache_max_entry_count=40, cache_block_seq_len=16),
])
def test_analytic_capacity_equals_the_engines(settings):
    m = memory.memory_breakdown(MODEL, **settings)
    engine = engine_for(**settings)
    st = engine.stats()
    assert (m.num_blocks, m.kv_tokens, m.kv_bytes) == (st["blocks_total"], st["tokens_total"], st["bytes_total"])
    assert m.kv_bytes_per_token == st["kv_bytes_per_token"]
    assert m.weights_bytes == sum(p.numel() * p.element_size() for p in engine.model.parameters())
    assert m.full_sessions == st["tokens_total"] // engine.config.session_len


def test_max_batch_size_changes_the_plotted_kv_to_what_the_engine_allocates():
    """Below the memory budget the cache is capped at max_batch_size x session_len: the KV bar
    follows the slider, and equals the engine's bytes each time."""
    heights = {}
    for mbs in (1, 3):
        settings = dict(max_batch_size=mbs, session_len=256, cache_max_entry_count=0.9,
                        cache_block_seq_len=16, **BUDGET)
        fig = memory.draw_memory(memory.memory_breakdown(MODEL, **settings))
        heights[mbs], = bars(fig, "KV cache")
        assert heights[mbs] * 2**20 == pytest.approx(engine_for(**settings).stats()["bytes_total"])
    assert heights[3] == pytest.approx(3 * heights[1])


def test_weights_per_rank_follow_the_loaders_split():
    from labkit.models.loader import load
    for tp in (1, 2):
        m = memory.memory_breakdown(MODEL, tp=tp, **BUDGET)
        for rank in range(tp):
            _, tensors = load(MODEL, rank=rank, tp=tp)
            elem = torch.empty((), dtype=getattr(torch, m.dtype)).element_size()  # bf16 or fp32 (dtype=auto)
            assert m.weights_bytes == sum(t.numel() * elem for t in tensors.values()), (tp, rank)
    fig = memory.draw_memory(memory.memory_breakdown(MODEL, tp=2, **BUDGET))
    assert len(bars(fig, "weights")) == 2                      # one stacked bar per device


@pytest.mark.parametrize("qp,bits", [(8, 8), (4, 4)])
def test_quant_policy_changes_kv_bytes_and_capacity(qp, bits):
    settings = dict(max_batch_size=256, session_len=1024, cache_max_entry_count=0.5,
                    cache_block_seq_len=16, **BUDGET)
    full = memory.memory_breakdown(MODEL, **settings)
    quant = memory.memory_breakdown(MODEL, quant_policy=qp, **settings)
    from labkit.convert import inspect_model
    cfg = inspect_model(MODEL).config
    # codes + fp16 scale + zero: uint8 zero point (int8) or fp16 row minimum (int4)
    row = cfg.head_dim * bits // 8 + 2 + (1 if bits == 8 else 2)
    assert quant.kv_bytes_per_token == 2 * cfg.num_layers * cfg.num_kv_heads * row
    assert quant.num_blocks == int(0.01 * 2**30 * 0.5) // (quant.kv_bytes_per_token * 16)
    assert quant.num_blocks > full.num_blocks
    try:
        st = engine_for(quant_policy=qp, **settings).stats()
    except ConfigError as e:                                  # before the KV-quant lesson lands
        assert "quant_policy" in str(e) and quant.source == "fallback table"
    else:
        assert (quant.num_blocks, quant.kv_bytes) == (st["blocks_total"], st["bytes_total"])


def test_refused_settings_raise_naming_the_field():
    with pytest.raises(ConfigError, match="tp"):
        memory.memory_breakdown(MODEL, tp=3)
    with pytest.raises(ConfigError, match="cache_max_entry_count"):
        memory.memory_breakdown(MODEL, cache_max_entry_count=0.0001, kv_budget_gib=0.0001)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    path = tmp_path_factory.mktemp("sweep") / "sweep.json"
    seen = []
    s = throughput.load_or_measure(MODEL, path, progress=lambda d, t, r: seen.append((d, t)),
                                   batch_sizes=(1, 4), quant_policies=(0, 8), num_requests=6,
                                   input_len=(8, 24), output_len=5, session_len=128)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    return path, s


def test_sweep_measures_every_point_and_caches_it(sweep):
    path, s = sweep
    assert not s["from_cache"]
    for p in s["points"]:
        if p["status"] == "measured":
            assert p["output_tokens"] == 6 * 5 and p["output_tok_s"] > 0
        else:                                                  # int8 before the KV-quant lesson
            assert p["quant_policy"] == 8 and "quant_policy" in p["reason"]
    one, four = throughput.point(s, 1, 0), throughput.point(s, 4, 0)
    assert one["peak_kv_bytes"] < four["peak_kv_bytes"]      # 4 sequences hold blocks at once
    assert four["steps"] < one["steps"]                       # and share decode steps
    again = throughput.load_or_measure(MODEL, path, batch_sizes=(1, 4), quant_policies=(0, 8),
                                       num_requests=6, input_len=(8, 24), output_len=5, session_len=128)
    assert again["from_cache"] and again["points"] == s["points"]


def test_selected_point_is_the_plotted_highlight(sweep):
    _, s = sweep
    for mbs in (1, 4):
        fig = throughput.draw_throughput(s, (mbs, 0))
        ring = [ln for ln in fig.axes[0].lines if ln.get_label() == "selected"][0]
        p = throughput.point(s, mbs, 0)
        assert list(ring.get_xdata()) == [mbs] and list(ring.get_ydata()) == [p["output_tok_s"]]
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    status = throughput.point(s, 4, 8)["status"]
    assert any(throughput.NOT_AVAILABLE in t for t in labels) == (status != "measured")


def test_xray_frames_follow_the_engine():
    engine = engine_for(max_batch_size=2, session_len=128, cache_max_entry_count=24,
                        cache_block_seq_len=16)
    prompts = [f"Count from 1 to {n}." for n in (3, 9, 5, 7, 4)]
    frames = list(xray.xray_run(engine, prompts, GenerationConfig(max_new_tokens=6, ignore_eos=True)))
    assert frames[0].step == 0 and len(frames[0].waiting) == 5 and not frames[0].running
    for f in frames:
        assert len(f.running) <= 2
        assert f.blocks_used[-1] == sum(c > 0 for c in f.snapshot.ref_counts)
        assert set(f.snapshot.tables) <= set(f.running) | set(f.waiting)
    last = frames[-1]
    assert sorted(last.finished) == sorted(f"req-{i}" for i in range(5))
    assert last.blocks_used[-1] == 0 and not last.running and not last.waiting
    fig = xray.draw_xray(frames[len(frames) // 2])
    assert len(fig.axes) == 4


def test_widgets_redraw_on_a_slider_change():
    from labkit.widgets import memory_explorer
    box = memory_explorer(MODEL, kv_budget_gib=0.01, cache_max_entry_count=0.9, session_len=256)
    sliders = {w.description: w for w in box.children if hasattr(w, "description")}
    text = [w for w in box.children if type(w).__name__ == "HTML"][0]
    sliders["max_batch_size"].value = 1
    before = text.value
    sliders["max_batch_size"].value = 2
    assert text.value != before and "max_batch_size=2" in text.value
    expected = memory.memory_breakdown(MODEL, kv_budget_gib=0.01, cache_max_entry_count=0.9,
                                       session_len=256, max_batch_size=2,
                                       **{k: sliders[k].value for k in ("quant_policy", "cache_block_seq_len", "tp")})
    assert f"{expected.num_blocks:,} blocks" in text.value
