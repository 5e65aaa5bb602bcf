"""The CPU engine's fast paths against the readable references they stand in for, bit for bit,
on fresh random inputs: rms_norm_fast, rotary_rows + rotary_fast, check_slots +
store_kv_checked, decode_plan + paged_decode_planned (one plan, several layers), cpu_linear's
mm on a cached transposed weight, and a whole model forward (prefill, batched decode with
padding, scattered blocks) with TorchBackend against a backend made of the references only."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from kernels import paged_decode_cpu
from kernels.paged_decode_batched import decode_plan, paged_decode_batched, paged_decode_planned
from kernels.rms_norm import rms_norm_fast, rms_norm_ref
from kernels.rotary import rotary_fast, rotary_ref, rotary_rows
from kernels.store_kv import check_slots, store_kv_checked, store_kv_ref
from labkit.layers.attention import AttentionMetadata
from labkit.layers.backend import TorchBackend
from labkit.layers.cpu_linear import cpu_linear
from labkit.layers.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.bfloat16]


def _gen():
    seed = random.randrange(2**31)
    return torch.Generator().manual_seed(seed), seed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (8, 576), (3, 5, 64)])
def test_rms_norm_fast_is_the_reference(dtype, shape):
    g, seed = _gen()
    scale = torch.rand(*shape[:-1], 1, generator=g) * 10                 # rows of other sizes
    x = (torch.randn(*shape, generator=g) * scale).to(dtype)
    r = torch.randn(*shape, generator=g).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    for eps in (1e-5, 1e-6):
        assert torch.equal(rms_norm_fast(x, w, eps), rms_norm_ref(x, w, eps)), seed
        (y, s), (y_ref, s_ref) = rms_norm_fast(x, w, eps, r), rms_norm_ref(x, w, eps, r)
        assert torch.equal(y, y_ref) and torch.equal(s, s_ref), seed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 9)])
def test_rotary_fast_is_the_reference(dtype, lead):
    g, seed = _gen()
    rope = RotaryEmbedding(64, 10000.0, 2048)
    qkv = torch.randn(*lead, 9 + 2 * 3, 64, generator=g).to(dtype)      # (..., hq+2hkv, D)
    pos = torch.randint(0, 2048, lead, generator=g)
    fast, ref = qkv.clone(), qkv.clone()
    rotary_ref(ref[..., :12, :], pos, rope.cos, rope.sin)               # q and k heads: views
    rotary_fast(fast[..., :12, :], *rotary_rows(pos, rope.cos, rope.sin))
    assert torch.equal(fast, ref), seed                                 # v untouched in both


@pytest.mark.parametrize("padding", [False, True])
def test_store_kv_checked_is_the_reference(padding):
    g, seed = _gen()
    nb, bs, hkv, d, n = 6, 4, 3, 16, 5
    slots = torch.randperm(nb * bs, generator=g)[:n].to(torch.int32)     # (N,)
    if padding:
        slots[1] = slots[3] = -1
    k, v = torch.randn(2, n, hkv, d, generator=g)
    caches = [torch.full((nb, bs, hkv, d), float("nan")) for _ in range(4)]  # poisoned
    store_kv_ref(k, v, caches[0], caches[1], slots)
    store_kv_checked(k, v, caches[2], caches[3], check_slots(slots))
    for a, b in ((0, 2), (1, 3)):
        assert torch.equal(caches[a].nan_to_num(7.0), caches[b].nan_to_num(7.0)), seed


@pytest.mark.parametrize("lengths,scattered", [([37], False), ([37], True), ([5, 0, 70, 16], True)])
def test_one_decode_plan_serves_every_layer(lengths, scattered):
    g, seed = _gen()
    bs, hq, hkv, d = 16, 9, 3, 64
    per_seq = [-(-n // bs) for n in lengths]
    nb = sum(per_seq) + 2
    order = torch.randperm(nb, generator=g).tolist() if scattered else list(range(nb))
    tables = torch.zeros(len(lengths), max(per_seq), dtype=torch.int32)
    at = 0
    for b, m in enumerate(per_seq):
        tables[b, :m] = torch.tensor(order[at:at + m], dtype=torch.int32)
        at += m
    lens = torch.tensor(lengths, dtype=torch.int32)
    plan = decode_plan(tables, lens, bs)
    for _layer in range(3):                                   # fresh caches and queries each
        k_cache, v_cache = torch.randn(2, nb, bs, hkv, d, generator=g)
        q = torch.randn(len(lengths), hq, d, generator=g)
        want = paged_decode_batched(q, k_cache, v_cache, tables, lens, d**-0.5)
        got = paged_decode_planned(q, k_cache, v_cache, plan, d**-0.5)
        assert torch.equal(got, want), seed


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_linear_is_f_linear_or_onednns_product(dtype):
    """Where cpu_linear does not take oneDNN for the dtype it is F.linear bit for bit; where it
    does, oneDNN's product on a freshly reordered weight, bit for bit; either way it follows the
    weight changed in place or given new data."""
    from labkit.layers.cpu_linear import uses_onednn
    g, seed = _gen()

    def want(x, w):
        return reference_linear(x, w) if uses_onednn(dtype, x.shape[0]) else F.linear(x, w)
    w = torch.nn.Parameter(torch.randn(96, 64, generator=g).to(dtype))
    with torch.no_grad():
        for m in (1, 8, 1100):                 # 1,100 rows: sgemm in fp32 (FP32_SGEMM_FROM_ROWS)
            x = torch.randn(m, 64, generator=g).to(dtype)
            assert torch.equal(cpu_linear(x, w), want(x, w)), seed
            w.mul_(0.5)                                        # changed in place
            assert torch.equal(cpu_linear(x, w), want(x, w)), seed
            w.data = torch.randn(96, 64, generator=g).to(dtype)   # replaced
            assert torch.equal(cpu_linear(x, w), want(x, w)), seed


def reference_linear(x, w, bias=None):
    """The product cpu_linear computes, without its caches: oneDNN's on a fresh reorder of the
    weight where cpu_linear takes oneDNN for x's dtype, else F.linear."""
    from labkit.layers import cpu_linear as cl
    if not cl.uses_onednn(x.dtype, x.numel() // x.shape[-1]):
        return F.linear(x, w, bias)
    packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), cl.PACK_FOR_ROWS[x.dtype])
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class ReferenceBackend(TorchBackend):
    """TorchBackend with every fast path swapped back for the reference it stands in for."""

    def linear(self, x, weight, bias=None):
        return reference_linear(x, weight, bias)

    def rms_norm(self, x, weight, eps, residual=None):
        return rms_norm_ref(x, weight, eps, residual)

    def rope_step(self, positions, cos, sin):
        return positions, cos, sin

    def rotary_step(self, x, step):
        return rotary_ref(x, *step)

    def begin_forward(self, md, k_cache) -> None:
        md.kv_slots = md.decode_plan = None           # every layer checks and plans itself

    def decode(self, q, k_cache, v_cache, md, scale):  # never the in-place kernel (Numba)
        return paged_decode_batched(q, k_cache, v_cache, md.block_tables, md.context_lens, scale)


def _forward_steps(model, backend, dtype):
    """Prefill two prompts into scattered blocks, then decode batches of 3 (one padding row,
    slot -1 and context 0) and of 1: the hidden states of every step."""
    g = torch.Generator().manual_seed(0)
    cfg, bs, nb = model.cfg, 4, 16
    model.set_backend(backend)
    for layer in model.layers:
        layer.attention.attn.k_cache, layer.attention.attn.v_cache = (
            torch.zeros(2, nb, bs, cfg.num_kv_heads, cfg.head_dim, dtype=dtype))
    blocks = [[9, 2, 14, 5], [0, 11, 7, 3]]                   # not consecutive
    tables = torch.tensor(blocks, dtype=torch.int32)
    lens, outs = [6, 3], []
    i32 = dict(dtype=torch.int32)

    def slot(b, p):
        return blocks[b][p // bs] * bs + p % bs
    for b, n in enumerate(lens):                              # prefill, one sequence a step
        ids = torch.randint(100, 1000, (n,), generator=g)
        md = AttentionMetadata(True, torch.tensor([slot(b, p) for p in range(n)], **i32),
                               tables[b:b + 1], torch.tensor([n], **i32),
                               torch.tensor([0, n], **i32), n)
        outs.append(model(ids, torch.arange(n), md))
    for _ in range(3):                                        # decode: 2 sequences + padding
        ids = torch.randint(100, 1000, (3,), generator=g)
        pos = torch.tensor(lens + [0])
        md = AttentionMetadata(False, torch.tensor([slot(0, lens[0]), slot(1, lens[1]), -1], **i32),
                               torch.cat([tables, tables[:1]]), torch.tensor([n + 1 for n in lens] + [0], **i32))
        outs.append(model(ids, pos, md))
        lens = [n + 1 for n in lens]
    for _ in range(3):                                        # decode: batch of one
        md = AttentionMetadata(False, torch.tensor([slot(1, lens[1])], **i32), tables[1:],
                               torch.tensor([lens[1] + 1], **i32))
        outs.append(model(torch.randint(100, 1000, (1,), generator=g), torch.tensor([lens[1]]), md))
        lens[1] += 1
    return [o[:2] if o.shape[0] == 3 else o for o in outs]   # the padding row is not compared


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_forward_fast_equals_references(dtype):
    from labkit.models.llama import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained("tiny-llama", dtype=dtype)
    with torch.inference_mode():
        ref = _forward_steps(model, ReferenceBackend(), dtype)
        fast = _forward_steps(model, TorchBackend(), dtype)
        ids = torch.randint(100, 1000, (2, 11))
        dense_fast = model(ids)                               # the no-cache reference path
        model.set_backend(ReferenceBackend())
        dense_ref = model(ids)
    # decode batches of 2+ take the in-place kernel (kernels/paged_decode_cpu.py), whose sums
    # run in another order: equal within rounding there (fp32; bf16 rounds the attention output),
    # bit for bit everywhere else (and every later step reads the K/V those steps wrote)
    in_place = paged_decode_cpu.applies(dtype, torch.zeros(1, dtype=dtype), 3)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for i, (a, b) in enumerate(zip(fast, ref)):
        if i >= 2 and in_place:
            torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)
        else:
            assert torch.equal(a, b), f"step {i}"
    assert torch.equal(dense_fast, dense_ref)


def test_long_prefill_runs_its_mlp_in_slices(monkeypatch):
    """A CPU forward of more than MLP_ROWS rows runs the MLP in slices of rows: the same as a
    float64 MLP on the same weights."""
    import labkit.models.llama as llama
    g, seed = _gen()
    model = llama.LlamaForCausalLM.from_pretrained("tiny-llama", dtype=torch.float32)
    layer, H = model.layers[0], model.cfg.hidden_size
    x, r = torch.randn(37, H, generator=g), torch.randn(37, H, generator=g)
    monkeypatch.setattr(llama, "MLP_ROWS", 8)
    calls = []
    monkeypatch.setattr(layer, "_mlp", lambda *a, _f=layer._mlp: calls.append(a[0].shape[0]) or _f(*a))
    with torch.inference_mode():
        out, res = layer._mlp_in_slices(x, r)
    h = x.double() + r.double()                                        # float64, by hand
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + layer.ffn_norm.eps)
    normed = normed * layer.ffn_norm.weight.double()
    gate, up = (normed @ layer.feed_forward.w13.weight.double().T).chunk(2, -1)
    want = (F.silu(gate) * up) @ layer.feed_forward.w2.weight.double().T
    assert calls == [8, 8, 8, 8, 5], seed
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(res, x + r)
