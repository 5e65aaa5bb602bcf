"""How far is the CPU engine's batch-1 decode step from what its products cost? Four timings
of one decode step on the same weights (a dense model or an int4 workspace):

    products   the 4 x layers linears and the output head alone, back to back
    eager      a hand-written loop over the layers with the fewest eager ops we could write
               (one RMSNorm expression, in-place RoPE, one SDPA on a contiguous (1, Hkv, L, D)
               cache, the same products; no modules, no paging, no scheduler)
    c++        the same loop compiled as a C++ function calling the same ATen ops
               (torch.utils.cpp_extension; skipped when there is no compiler)
    engine     LLMEngine.step() at batch 1, context `--context`

The loops are cost models, not the model: RoPE uses random rows and the K/V write goes to a
fixed position, so their outputs are not the engine's (only the work per op is the same).

    python scripts/cpu_decode_floor.py [MODEL] [--dtype auto] [--context 128] [--reps 20]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from labkit.config import EngineConfig, GenerationConfig
from labkit.engine.engine import LLMEngine
from labkit.layers.linear import W4A16Linear

CPP = r"""
#include <torch/extension.h>
using at::Tensor;
// y = x W^T: the int4 CPU kernel when the layer is int4 (scales_zeros defined), else mm on W^T
static Tensor lin(const Tensor& x, const Tensor& w, const Tensor& sz, int64_t G) {
  return sz.defined() && sz.numel() ? at::_weight_int4pack_mm_for_cpu(x, w, G, sz) : at::mm(x, w);
}
static Tensor rms(const Tensor& x, const Tensor& w, double eps) {
  Tensor xf = x.to(at::kFloat);
  Tensor ms = xf.mul(xf).sum(-1, true).div_(x.size(-1)).add_(eps).rsqrt_();
  return xf.mul(ms).to(x.scalar_type()).mul(w);
}
Tensor step(Tensor x, std::vector<Tensor> w, std::vector<Tensor> sz, std::vector<Tensor> norms,
            std::vector<Tensor> kc, std::vector<Tensor> vc, Tensor cos, Tensor sin, Tensor head,
            int64_t hq, int64_t hkv, int64_t d, int64_t G, double eps, int64_t pos) {
  Tensor res = x;
  for (size_t i = 0; i < kc.size(); ++i) {
    Tensor qkv = lin(rms(res, norms[2 * i], eps), w[4 * i], sz[4 * i], G).view({1, hq + 2 * hkv, d});
    Tensor qk = qkv.slice(1, 0, hq + hkv);
    qk.mul_(cos).add_(qk.flip({-1}).mul(sin));
    kc[i].select(0, 0).select(1, pos).copy_(qkv.slice(1, hq, hq + hkv).select(0, 0));
    vc[i].select(0, 0).select(1, pos).copy_(qkv.slice(1, hq + hkv, hq + 2 * hkv).select(0, 0));
    Tensor q = qkv.slice(1, 0, hq).reshape({1, hkv, hq / hkv, d});
    Tensor o = at::scaled_dot_product_attention(q, kc[i], vc[i], {}, 0.0, false, 1.0 / std::sqrt((double)d));
    res = res.add(lin(o.reshape({1, hq * d}), w[4 * i + 1], sz[4 * i + 1], G));
    auto gu = lin(rms(res, norms[2 * i + 1], eps), w[4 * i + 2], sz[4 * i + 2], G).chunk(2, -1);
    res = res.add(lin(at::silu(gu[0]).mul(gu[1]), w[4 * i + 3], sz[4 * i + 3], G));
  }
  return at::mm(rms(res, norms.back(), eps), head);
}
"""


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def layer_weights(model):
    """Per layer, the 4 linears as (weight operand, int4 scales_zeros or an empty tensor, G)."""
    ops = []
    for layer in model.layers:
        for lin in (layer.attention.w_qkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2):
            if isinstance(lin, W4A16Linear):
                packed, sz = lin._repacked("cpu")
                ops.append((packed, sz, lin.group_size))
            else:
                ops.append((lin.weight.detach().t(), torch.empty(0), 0))
    return ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    eng = LLMEngine(args.model, EngineConfig(dtype=args.dtype, device="cpu"))
    m, cfg = eng.runner.model, eng.runner.model.cfg
    hq, hkv, d, H, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, cfg.rms_norm_eps
    lins = layer_weights(m)
    head = (m.tok_embeddings if m.output is None else m.output).weight.detach().t()   # (H, V)
    dt, L = head.dtype, len(m.layers)
    norms = [n.weight.detach() for layer in m.layers for n in (layer.attention_norm, layer.ffn_norm)]
    norms.append(m.norm.weight.detach())
    g = torch.Generator().manual_seed(0)
    kc = [torch.randn(1, hkv, args.context, d, generator=g).to(dt) for _ in range(L)]   # (1, Hkv, L, D)
    vc = [torch.randn(1, hkv, args.context, d, generator=g).to(dt) for _ in range(L)]
    x = torch.randn(1, H, generator=g).to(dt)
    cos, sin = (torch.randn(1, 1, d, generator=g).to(dt) for _ in range(2))
    pos = args.context - 1

    def lin(x, i):
        w, sz, G = lins[i]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, G, sz) if sz.numel() else torch.mm(x, w)

    def rms(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w

    def products():
        for i in range(L):
            lin(x, 4 * i)
            lin(x.new_zeros(1, hq * d), 4 * i + 1)
            gu = lin(x, 4 * i + 2)
            lin(gu[:, :gu.shape[1] // 2].contiguous(), 4 * i + 3)
        return torch.mm(x, head)

    def eager():
        res = x
        for i in range(L):
            qkv = lin(rms(res, norms[2 * i]), 4 * i).view(1, hq + 2 * hkv, d)
            qk = qkv[:, :hq + hkv]
            qk.mul_(cos).add_(qk.flip(-1) * sin)
            kc[i][0, :, pos] = qkv[0, hq:hq + hkv]
            vc[i][0, :, pos] = qkv[0, hq + hkv:]
            o = F.scaled_dot_product_attention(qkv[:, :hq].reshape(1, hkv, hq // hkv, d), kc[i], vc[i],
                                               scale=d ** -0.5)
            res = res + lin(o.reshape(1, hq * d), 4 * i + 1)
            g_, u = lin(rms(res, norms[2 * i + 1]), 4 * i + 2).chunk(2, -1)
            res = res + lin(F.silu(g_) * u, 4 * i + 3)
        return torch.mm(rms(res, norms[-1]), head)

    rows = {}
    with torch.inference_mode():
        rows["products"] = timed(products, args.reps)
        rows["eager"] = timed(eager, args.reps)
        try:
            from torch.utils.cpp_extension import load_inline
            t0 = time.perf_counter()
            mod = load_inline("labkit_decode_floor", cpp_sources=CPP, functions=["step"],
                              extra_cflags=["-O2"])
            print(f"c++ loop compiled in {time.perf_counter() - t0:.0f} s")
            w = [t[0] for t in lins]
            sz = [t[1] for t in lins]
            G = next((t[2] for t in lins if t[2]), 0)
            rows["c++"] = timed(lambda: mod.step(x, w, sz, norms, kc, vc, cos, sin, head, hq, hkv,
                                                 d, G, eps, pos), args.reps)
        except Exception as e:                       # no compiler, no headers, ...
            print(f"c++ loop skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    eng.add_request(list(range(100, 100 + args.context - 1)),
                    GenerationConfig(max_new_tokens=args.reps + 8, ignore_eos=True))
    for _ in range(3):
        eng.step()
    rows["engine"] = timed(eng.step, args.reps)
    print(f"{args.model} {dt} batch 1 context {args.context}, {torch.get_num_threads()} threads, "
          f"cpu {torch.backends.cpu.get_cpu_capability()}")
    print(f"{'':10s} {'ms/step':>8s} {'tok/s':>7s}")
    for k, v in rows.items():
        print(f"{k:10s} {v:8.1f} {1e3 / v:7.1f}")


if __name__ == "__main__":
    main()
