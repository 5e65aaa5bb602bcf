"""The CPU decode step's decoder layers as one TorchScript function.

On a CPU a batch-1 decode step of SmolLM2-135M is ~60 small eager ops per layer around 4
matrix products, and each op pays Python and dispatch (2.5-5 us on a 2-core laptop CPU), so
the step took ~1.8x what its products and attention cost (docs/PERF.md, "CPU decode floor").
On the GPU the engine replays a CUDA graph to drop the same kind of host work; on the CPU it
runs `decode_layers` below: the same ATen ops the Python layers call, in the same order and
on the same tensors, compiled once by `torch.jit.script` so no Python runs between them. The
numbers are the Python path's, bit for bit (tests/test_cpu_decode_script.py).

What each line mirrors (the readable versions, which stay the reference):
    rms_norm            kernels/rms_norm.py        rms_norm_fast
    rotary              kernels/rotary.py          rotary_fast on the rows of rotary_rows
    store K/V           kernels/store_kv.py        store_kv_checked
    attention           kernels/paged_decode_cpu.py      paged_decode_cpu (batches of 2+) or
                        kernels/paged_decode_batched.py  paged_decode_planned
    linear              labkit/layers/cpu_linear.py (oneDNN's product on the reordered weight,
                        or mm on W^T where cpu_linear takes that) and
                        kernels/w4a16_cpu.py (PyTorch's int4 kernel) for an int4 workspace
    SwiGLU              kernels/activation.py      silu_and_mul_ref

`ScriptedDecode.applies(model, md)` says when it runs: a CPU decode step on the torch
backend, tp = 1, an unquantized KV cache, no logn scaling, no biases, no module hooks (a hook
expects the Python modules to run), fewer rows than cpu_linear hands to sgemm in fp32
(FP32_SGEMM_FROM_ROWS); everything else takes the Python layers.
Off with LABKIT_SCRIPT_DECODE=0 (or `LlamaForCausalLM.script_cpu_decode = False`).
"""
from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.nn.functional as F

import kernels.paged_decode_cpu  # noqa: F401  (registers torch.ops.labkit.paged_decode_cpu)
from kernels.paged_decode_batched import DecodePlan

MM, INT4, ONEDNN = 0, 1, 2          # how a linear runs (the kinds of cpu_linear / W4A16Linear)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, eps: torch.Tensor):
    """rms_norm_fast without residual: (normed x) * weight. h, eps: 0-d float32 tensors."""
    xf = x if x.dtype == torch.float32 else x.float()
    ms = torch.mul(xf, xf).sum(-1, keepdim=True).div_(h)
    normed = torch.mul(xf, ms.add_(eps).rsqrt_())
    if normed.dtype != x.dtype:
        normed = normed.to(x.dtype)
    return weight * normed


def _linear(x: torch.Tensor, kind: int, w: torch.Tensor, sz: torch.Tensor, group: int):
    """x (M, K) @ W^T -> (M, N): w is W^T (MM), the int4 kernel's codes (INT4, sz its scales
    and zeros) or oneDNN's reordered bf16 weight (ONEDNN)."""
    if kind == 1:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), w, group, sz)
    if kind == 2:
        no_scalars: List[Optional[Union[int, float, complex]]] = []     # Scalar?[]
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", no_scalars, "")
    return torch.mm(x, w)


def decode_layers(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor, slots: torch.Tensor,
                  tables: Optional[torch.Tensor], lens: Optional[torch.Tensor],
                  kv_start: int, kv_slots: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                  empty: Optional[torch.Tensor], L: int,
                  norms: List[torch.Tensor], kinds: List[int], ws: List[torch.Tensor],
                  szs: List[torch.Tensor], group: int, k_caches: List[torch.Tensor],
                  v_caches: List[torch.Tensor], h: torch.Tensor, eps: torch.Tensor, scale: float,
                  hq: int, hkv: int, d: int) -> torch.Tensor:
    """Every decoder layer of a decode step, then the final norm.

    x (B, H) the new tokens' embeddings; c, s (B, 1, D) float32 RoPE rows (`rotary_rows`);
    slots (B,) int64 cache slots of the new tokens; attention reads either the cache in place
    (tables, lens: the block tables and context lengths, kernels/paged_decode_cpu.py) or, with
    tables None, through the DecodePlan's fields (kv_start, kv_slots, mask, empty, L); per
    layer 2 norms, 4 linears (kinds, ws, szs), K and V caches (num_blocks, block_size, Hkv, D).
    Returns the normed hidden states (B, H)."""
    B = x.shape[0]
    residual = x
    for i in range(len(k_caches)):
        # attention_norm, w_qkv
        if i == 0:
            hn = _rms_norm(x, norms[0], h, eps)
        else:
            x = torch.add(x, residual)
            residual = x
            hn = _rms_norm(x, norms[2 * i], h, eps)
        qkv = _linear(hn, kinds[4 * i], ws[4 * i], szs[4 * i], group).view(B, hq + 2 * hkv, d)
        # RoPE on q and k in place
        qk = qkv[:, :hq + hkv, :]
        xf = qk if qk.dtype == torch.float32 else qk.float()
        swapped = xf.unflatten(-1, [2, d // 2]).flip(-2).flatten(-2)
        swapped.mul_(s)
        out = xf.mul_(c).add_(swapped)
        if qk.dtype != torch.float32:
            qk.copy_(out)
        q, k, v = qkv.split([hq, hkv, hkv], -2)
        # K and V into the paged cache
        kc, vc = k_caches[i], v_caches[i]
        if k.dtype != kc.dtype:
            k, v = k.to(kc.dtype), v.to(vc.dtype)
        k_pool, v_pool = kc.view(-1, hkv, d), vc.view(-1, hkv, d)
        k_pool.index_copy_(0, slots, k)
        v_pool.index_copy_(0, slots, v)
        # attention over each sequence's cached tokens
        if tables is not None and lens is not None:
            o = torch.ops.labkit.paged_decode_cpu(q, kc, vc, tables, lens, scale)
        elif L == 0:
            o = torch.zeros_like(q)
        else:
            if kv_slots is None:
                kk = k_pool[kv_start:kv_start + L].unsqueeze(0)
                vv = v_pool[kv_start:kv_start + L].unsqueeze(0)
            else:
                kk = k_pool.index_select(0, kv_slots).view(B, L, hkv, d)
                vv = v_pool.index_select(0, kv_slots).view(B, L, hkv, d)
            o = F.scaled_dot_product_attention(
                q.view(B, hkv, hq // hkv, d), kk.transpose(1, 2), vv.transpose(1, 2),
                attn_mask=mask, scale=scale)
            o = o.reshape(B, hq, d)
            if empty is not None:
                o = o.masked_fill(empty, 0)
        x = _linear(o.reshape(B, hq * d), kinds[4 * i + 1], ws[4 * i + 1], szs[4 * i + 1], group)
        # ffn_norm, w13, SwiGLU, w2
        x = torch.add(x, residual)
        residual = x
        hn = _rms_norm(x, norms[2 * i + 1], h, eps)
        gate, up = _linear(hn, kinds[4 * i + 2], ws[4 * i + 2], szs[4 * i + 2], group).chunk(2, -1)
        x = _linear(F.silu(gate) * up, kinds[4 * i + 3], ws[4 * i + 3], szs[4 * i + 3], group)
    x = torch.add(x, residual)
    return _rms_norm(x, norms[-1], h, eps)


_SCRIPTED: dict = {}


def scripted():
    """`decode_layers` compiled by TorchScript (~1 s, once per process), or None where that
    fails. TorchScript is deprecated in favour of torch.compile, which was measured on this
    step: 66-161 s to compile and slower per step on a 2-core CPU (docs/PERF.md); TorchScript
    needs no compiler and keeps the ops as they are, which is what this file needs."""
    if "fn" not in _SCRIPTED:
        import warnings
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                _SCRIPTED["fn"] = torch.jit.script(decode_layers)
        except Exception:                    # no TorchScript in this torch: the Python layers
            _SCRIPTED["fn"] = None
    return _SCRIPTED["fn"]


def _linear_operands(lin, dtype) -> Optional[tuple]:
    """(kind, weight operand, scales and zeros, group) of a Linear / W4A16Linear, chosen as
    its forward would choose for a 2-D x of `dtype` on the CPU; None: not one we mirror."""
    from kernels import w4a16_cpu
    from labkit.layers import cpu_linear as cl
    from labkit.layers.linear import Linear, W4A16Linear
    if getattr(lin, "bias", None) is not None or any(t.device.type != "cpu" for t in lin.buffers()) \
            or any(p.device.type != "cpu" for p in lin.parameters()):
        return None
    empty = torch.empty(0)
    if isinstance(lin, W4A16Linear):
        if dtype != torch.bfloat16 or not w4a16_cpu.supported(lin.qweight, lin.group_size):
            return None                                  # the reference path: not mirrored
        packed, sz = lin._repacked("cpu")
        return INT4, packed, sz, lin.group_size
    if type(lin) is not Linear or lin.weight.dtype != dtype:
        return None
    w = lin.weight
    if cl.uses_onednn(dtype) and not w.is_inference():
        return ONEDNN, cl.onednn_weight(w), empty, 0
    return MM, cl._transposed(w), empty, 0


class ScriptedDecode:
    """The operands of `decode_layers` for one model, gathered once (weights, caches)."""

    def __init__(self, model):
        cfg, layers = model.cfg, model.layers
        self.dtype = model.tok_embeddings.weight.dtype
        self.hq, self.hkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.h = torch.tensor(float(cfg.hidden_size))            # 0-d float32, as rms_norm_fast
        self.eps = torch.tensor(float(cfg.rms_norm_eps))
        self.norms = [n.weight for la in layers for n in (la.attention_norm, la.ffn_norm)]
        self.norms.append(model.norm.weight)
        ops = [_linear_operands(lin, self.dtype) for la in layers
               for lin in (la.attention.w_qkv, la.attention.wo, la.feed_forward.w13,
                           la.feed_forward.w2)]
        self.ok = all(op is not None for op in ops)
        if self.ok:
            self.kinds = [op[0] for op in ops]
            self.ws = [op[1] for op in ops]
            self.szs = [op[2] for op in ops]
            self.group = max(op[3] for op in ops)
        self.attns = [la.attention.attn for la in layers]
        self.modules = [m for la in layers for m in la.modules()] + [model.norm]
        self.k_caches = [a.k_cache for a in self.attns]
        self.v_caches = [a.v_cache for a in self.attns]
        self.key = self.key_of(model)

    @staticmethod
    def key_of(model) -> tuple:
        """What the gathered operands depend on: a layer's linear replaced (use_w4a16), a
        weight changed in place (its version), the caches allocated again."""
        lins = tuple(id(m) for la in model.layers
                     for m in (la.attention.w_qkv, la.attention.wo, la.feed_forward.w13,
                               la.feed_forward.w2))
        versions = sum(p._version for p in model.parameters() if not p.is_inference())
        a = model.layers[0].attention.attn
        return lins, versions, id(a.k_cache), id(a.v_cache)

    def applies(self, model, md) -> bool:
        from kernels import paged_decode_cpu
        from labkit.layers import cpu_linear as cl
        from labkit.layers.backend import TorchBackend
        from torch.nn.modules import module as nn_module
        attn = self.attns[0]
        if not (self.ok and scripted() is not None and type(model.backend) is TorchBackend
                and model.tp == 1 and not model.logn.enabled and not torch.is_grad_enabled()
                and torch.is_tensor(attn.k_cache) and attn.k_cache.device.type == "cpu"):
            return False
        plan, slots = md.decode_plan, md.kv_slots        # made by TorchBackend.begin_forward
        in_place = paged_decode_cpu.applies(self.dtype, attn.k_cache,    # no plan then
                                            md.context_lens.shape[0])
        if (slots is None or slots.rows is not None or (plan is None and not in_place)
                or (plan is not None and plan.block_size != attn.k_cache.shape[1])):
            return False
        if ONEDNN in self.kinds and not cl.uses_onednn(self.dtype, md.context_lens.shape[0]):
            return False                                 # cpu_linear takes sgemm at this size
        if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in self.modules)):
            return False
        return True

    def run(self, x: torch.Tensor, rope: tuple, md) -> torch.Tensor:
        """x (B, H) embeddings, rope the (c, s) rows of `rotary_rows` -> normed hidden (B, H)."""
        plan = md.decode_plan
        c, s = rope
        if plan is None:                                 # the in-place kernel (see applies)
            tables, lens, plan = md.block_tables, md.context_lens, DecodePlan(0, 0, 0)
        else:
            tables = lens = None
        return scripted()(x, c, s, md.kv_slots.slots, tables, lens, plan.start or 0, plan.slots,
                          plan.mask, plan.empty, plan.length, self.norms, self.kinds, self.ws,
                          self.szs, self.group, self.k_caches, self.v_caches, self.h, self.eps,
                          self.attns[0].scale, self.hq, self.hkv, self.d)
