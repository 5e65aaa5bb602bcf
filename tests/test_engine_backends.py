"""The engine with the Triton backend against the engine with the PyTorch references, on the
same weights: greedy tokens identical for 16 steps on 8 prompts in fp32; in bf16 every step's
logits within bf16 tolerance while the two agree on the tokens so far; on a GPU, CUDA graphs on
and off give identical outputs.

On CPU the Triton kernels run in the interpreter (tiny model); with a GPU (marker gpu) the same
checks run on SmolLM2-135M-shaped random weights (dummy:smollm2-135m).
"""
from __future__ import annotations

import pytest
import torch

from kernels._triton import HAS_TRITON
from labkit.config import EngineConfig, GenerationConfig

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")

PROMPTS = ["Hello there", "What is a GPU?", "Tell me a story about a dragon and a knight.",
           "1 2 3 4", "Translate 'cat' to French.", "Why is the sky blue? Explain in detail please.",
           "x", "Write Python code that prints the numbers from one to ten, one per line."]
GREEDY16 = GenerationConfig(max_new_tokens=16, ignore_eos=True)


def _engine(model, backend, dtype, device, **kw):
    from labkit.engine.engine import LLMEngine
    ec = EngineConfig(device=device, dtype=dtype, attention_backend=backend, max_batch_size=8,
                      session_len=256, cache_block_seq_len=16, cache_max_entry_count=64,
                      max_prefill_token_num=64, **kw)          # 64-token budget: chunked prefill too
    return LLMEngine(model, ec)


class Recorder:
    """Wraps a runner's execute/sampler to keep each step's logits per request."""

    def __init__(self, engine):
        self.steps: dict[str, list[torch.Tensor]] = {}
        runner, sampler = engine.runner, engine.runner.sampler
        execute = runner.execute

        def recording_execute(seqs, num_new, is_prefill, *rest):
            step, logits = execute(seqs, num_new, is_prefill, *rest)
            for row, i in enumerate(step.sample_seq_index):
                self.steps.setdefault(seqs[i].request_id, []).append(logits[row].double().cpu())
            return step, logits
        runner.execute = recording_execute


def _assert_steps_close(ra, rb, outs_a, outs_b, atol=0.15):
    """Per-step logits of two recorded runs within bf16 tolerance, each request up to the first
    step where their tokens part; at least 8 steps of 8 requests compared."""
    compared = 0
    for oa, ob in zip(outs_a, outs_b):
        for step, (la, lb) in enumerate(zip(ra.steps[oa.request_id], rb.steps[ob.request_id])):
            torch.testing.assert_close(lb, la, atol=atol, rtol=0.05)
            compared += 1
            if oa.token_ids[step] != ob.token_ids[step]:
                break                    # after a near-tie flips, the inputs differ
    assert compared >= 8 * 8


def _run(engine, ids_only=True):
    outs = engine.generate(PROMPTS, GREEDY16)
    return [o.token_ids for o in outs] if ids_only else outs


def _model():
    return "dummy:smollm2-135m" if CUDA else "tiny-llama"


def test_triton_backend_matches_torch_fp32():
    device = "cuda" if CUDA else "cpu"
    ref = _run(_engine(_model(), "torch", "float32", device, enforce_eager=True))
    got = _run(_engine(_model(), "triton", "float32", device))
    assert got == ref


@pytest.mark.gpu
def test_triton_backend_bf16_logits_within_tolerance():
    a, b = (_engine(_model(), be, "bfloat16", "cuda") for be in ("torch", "triton"))
    ra, rb = Recorder(a), Recorder(b)
    _assert_steps_close(ra, rb, _run(a, False), _run(b, False), atol=0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graphs_on_and_off_identical(dtype):
    eager = _engine(_model(), "triton", dtype, "cuda", enforce_eager=True)
    graphs = _engine(_model(), "triton", dtype, "cuda")
    assert graphs.runner.graphs is not None and eager.runner.graphs is None
    assert _run(graphs) == _run(eager)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_overlap_schedule_on_and_off_identical(dtype):
    """Overlap scheduling (on by default on CUDA) changes when tokens are read, not which."""
    sync = _engine(_model(), "triton", dtype, "cuda", overlap_schedule=False)
    overlap = _engine(_model(), "triton", dtype, "cuda")
    assert overlap.overlap and not sync.overlap
    gcs = [GREEDY16.replace(max_new_tokens=n) for n in (1, 2, 5, 16, 16, 9, 3, 16)]
    got = [o.token_ids for o in overlap.generate(PROMPTS, gcs)]
    assert got == [o.token_ids for o in sync.generate(PROMPTS, gcs)]
    assert [len(t) for t in got] == [1, 2, 5, 16, 16, 9, 3, 16]
    assert overlap.stats()["blocks_used"] == 0


def test_triton_backend_matches_torch_with_dynamic_ntk(tmp_path):
    """Sequences longer than the trained length get their own RoPE base (per-token tables, an
    eager step, no CUDA graph): the Triton backend and the references agree token for token,
    beside plain sequences in the same batches, and the knob really changes the tokens."""
    import json
    import shutil
    from labkit.models.bundled import tiny_model_dir
    short = tmp_path / "tiny-llama-24"
    shutil.copytree(tiny_model_dir(), short)
    cfg = json.loads((short / "config.json").read_text())
    cfg["max_position_embeddings"] = 24                   # every prompt + 16 tokens goes past it
    (short / "config.json").write_text(json.dumps(cfg))
    device = "cuda" if CUDA else "cpu"
    mixed = [GREEDY16] * 4 + [GenerationConfig(max_new_tokens=4, ignore_eos=True)] * 4
    runs = {}
    for name, backend, factor in (("ref", "torch", 2.0), ("triton", "triton", 2.0), ("plain", "torch", 0.0)):
        e = _engine(str(short), backend, "float32", device, rope_scaling_factor=factor,
                    **({"enforce_eager": True} if backend == "torch" else {}))
        runs[name] = [o.token_ids for o in e.generate(PROMPTS, mixed)]
    assert runs["triton"] == runs["ref"]
    assert runs["ref"] != runs["plain"]


@pytest.mark.gpu
def test_int4_engine_graphs_match_eager_and_reference_gpu():
    """W4A16 weights (dummy int4, group 64) through the engine on the GPU: CUDA graphs on and off
    give the same tokens (the GEMV's split-K counters reset between replays), and per-step
    logits stay within bf16 tolerance of an engine whose decode batches skip the GEMV (the
    tensor-core W4A16 kernel; both kernels are checked against float64 in their own tests)."""
    import kernels.w4a16_gemv as gemv
    model = "dummy:smollm2-135m:int4-g64"
    eager = _engine(model, "triton", "bfloat16", "cuda", enforce_eager=True)
    graphs = _engine(model, "triton", "bfloat16", "cuda")
    assert graphs.runner.graphs is not None
    assert _run(graphs) == _run(eager)
    ref = _engine(model, "torch", "bfloat16", "cuda", enforce_eager=True)
    cut = gemv.GEMV_MAX_ROWS
    gemv.GEMV_MAX_ROWS = 0                  # decode batches take the tensor-core kernel
    try:
        ra, rb = Recorder(ref), Recorder(graphs)
        outs_ref = _run(ref, False)
    finally:
        gemv.GEMV_MAX_ROWS = cut
    outs = _run(graphs, False)
    _assert_steps_close(ra, rb, outs_ref, outs)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["frag", "auto"])
def test_int4_engine_frag_kernel_gpu(kernel):
    """The same with `W4A16Linear.gpu_kernel` = "frag" (kernels/w4a16_frag.py serves decode
    batches and prefill chunks of 1-64 rows) and "auto" (the default: the GEMV for one row, the
    frag kernel for 2-64): CUDA graphs on and off give the same tokens, and per-step logits stay
    within bf16 tolerance of an engine that never runs the frag kernel ("gemv")."""
    from labkit.layers.linear import W4A16Linear
    model = "dummy:smollm2-135m:int4-g64"
    saved = W4A16Linear.gpu_kernel
    try:
        W4A16Linear.gpu_kernel = "gemv"
        plain = _engine(model, "triton", "bfloat16", "cuda", enforce_eager=True)
        W4A16Linear.gpu_kernel = kernel
        eager = _engine(model, "triton", "bfloat16", "cuda", enforce_eager=True)
        graphs = _engine(model, "triton", "bfloat16", "cuda")
        assert graphs.runner.graphs is not None
        assert _run(graphs) == _run(eager)
        ra, rb = Recorder(plain), Recorder(graphs)
        W4A16Linear.gpu_kernel = "gemv"
        outs_ref = _run(plain, False)
        W4A16Linear.gpu_kernel = kernel
        outs = _run(graphs, False)
    finally:
        W4A16Linear.gpu_kernel = saved
    _assert_steps_close(ra, rb, outs_ref, outs)
