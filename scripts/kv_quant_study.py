"""Which int4 KV-cache recipe loses the least perplexity? A fake-quantization study.

    python scripts/kv_quant_study.py WORKSPACE --stats CALIB_DIR [--chunks 4] [--variants a,b,...]

Runs the bundled model's dense reference path on the pydoc corpus (chunks x 1024 tokens, the
tokens `labkit eval ppl` scores) with K and V replaced by quantize-dequantize(K, V), the
method of the issue's HF estimates (12.88 / 12.89 / 15.09), one variant at a time:

    where K is quantized   after RoPE (what the cache stores) | before RoPE
    group                  per token and head (D values) | per token and group of G channels
    zero point             integer (the engine's int8: uint8) | float16 minimum (its int4)
    clipping               the range shrunk by a factor r (r = 1: plain min/max)
    K smoothing            K channel pair j, j+D/2 divided by c_j = absmax_j^alpha from the
                           calibration statistics and q multiplied by it: q.k is unchanged, RoPE
                           commutes (c is equal on a rotation pair), and it folds into w_qkv

Prints one line per variant and a table last. Slow on CPU (a full forward per variant).
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F


def fake_quant(x, bits, group=0, clip=1.0, int_zero=True):
    """quantize-dequantize x (..., D) per row (or per group of `group` channels)."""
    shape = x.shape
    if group:
        x = x.reshape(*shape[:-1], shape[-1] // group, group)
    qmax = 2 ** bits - 1
    lo, hi = x.amin(-1, keepdim=True) * clip, x.amax(-1, keepdim=True) * clip
    if int_zero:                       # the engine's int8 format: 0 exactly representable
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        s = ((hi - lo) / qmax).clamp(min=2 ** -14).half().float()
        z = torch.floor(-lo / s + 0.5).clamp(0, qmax)
        q = (torch.floor(x / s + 0.5) + z).clamp(0, qmax)
        y = (q - z) * s
    else:                              # float zero = min (the engine's int4, LMDeploy's online)
        s = ((hi - lo) / qmax).clamp(min=2 ** -14).half().float()
        m = lo.half().float()          # both stored as float16
        y = torch.floor((x - m) / s + 0.5).clamp(0, qmax) * s + m
    return y.reshape(shape)


def parse_variant(name: str):
    """'fp' or 'k4v4' plus options joined by '-': fz (float zero), pre (K before RoPE),
    g32 (groups of 32 channels), clip0.95, smooth0.5 (K smoothing, alpha 0.5).
    e.g. 'k4v4-fz-smooth0.5' -> (4, 4, {...})."""
    parts = name.split("-")
    head = parts[0]
    kb, vb = (0, 0) if head.startswith("fp") else (int(head[1:head.index("v")]), int(head[head.index("v") + 1:]))
    opts = {}
    for p in parts[1:]:
        if p == "fz":
            opts["int_zero"] = False
        elif p == "pre":
            opts["pre_rope"] = True
        elif p.startswith("g"):
            opts["group"] = int(p[1:])
        elif p.startswith("clip"):
            opts["clip"] = float(p[4:])
        elif p.startswith("smooth"):
            opts["smooth"] = float(p[6:])
        elif p.startswith("vsmooth"):
            opts["vsmooth"] = float(p[7:])
        elif p == "p2":
            opts["pow2"] = True
        else:
            raise ValueError(f"unknown option {p!r} in {name!r}")
    return kb, vb, opts


DEFAULT_VARIANTS = ("fp,fp-smooth1,k8v8,k4v4,k4v4-fz,k4v4-pre,k4v4-g32,k4v4-clip0.9,k8v4,k4v8,"
                    "k4v4-fz-smooth0.5,k4v4-fz-smooth1,k4v4-fz-clip0.95")


def smoothing_factors(stats_dir, alpha: float, which: str = "key", pow2: bool = False) -> torch.Tensor:
    """(layers, Hkv, D) factors c from K's (V's) calibrated absmax; K's are equal on each RoPE
    pair. pow2: rounded to powers of two (folding them into weights is then exact)."""
    from labkit.quant import k_smooth
    st = torch.load(f"{stats_dir}/{which}_stats.pth", weights_only=True)
    if which == "key":                                 # what `labkit lite k_smooth` writes
        c = k_smooth.smoothing_factors(st["absmax"], alpha)            # (L, Hkv, D)
    else:                                              # V: no RoPE pairs
        c = st["absmax"].float().clamp(min=1e-3) ** alpha
        c = c / c.mean(-1, keepdim=True)                               # only ratios matter
    return torch.exp2(torch.round(torch.log2(c))) if pow2 else c


def install(model, k_bits, v_bits, opts, stats_dir=None):
    """Hooks that fake-quantize K (before or after RoPE) and V in every layer."""
    hooks = []
    qk = dict(group=opts.get("group", 0), clip=opts.get("clip", 1.0), int_zero=opts.get("int_zero", True))
    p2 = opts.get("pow2", False)
    smooth = smoothing_factors(stats_dir, opts["smooth"], "key", p2) if "smooth" in opts else None
    vsmooth = smoothing_factors(stats_dir, opts["vsmooth"], "value", p2) if "vsmooth" in opts else None
    for i, layer in enumerate(model.layers):
        la = layer.attention
        hq, hkv, d = la.hq, la.hkv, la.d
        c = None if smooth is None else smooth[i]                      # (Hkv, D)
        cv = None if vsmooth is None else vsmooth[i]                   # (Hkv, D)

        def on_qkv(mod, args, out, hq=hq, hkv=hkv, d=d, c=c, cv=cv):    # w_qkv output: pre-RoPE
            qkv = out.view(*out.shape[:-1], hq + 2 * hkv, d)
            q, k, v = qkv[..., :hq, :], qkv[..., hq:hq + hkv, :], qkv[..., hq + hkv:, :]
            if c is not None:                                          # smoothing, folded here
                q.mul_(c.repeat_interleave(hq // hkv, 0))
                k.div_(c)
            if cv is not None:                                         # V / cv, wo's input x cv
                v.div_(cv)
            if opts.get("pre_rope") and k_bits:
                k.copy_(fake_quant(k, k_bits, **qk))
            return out

        def on_attn(mod, args):                                        # q, k (post-RoPE), v, md
            q, k, v = args[:3]
            if k_bits and not opts.get("pre_rope"):
                k = fake_quant(k, k_bits, **qk)
            if v_bits:
                v = fake_quant(v, v_bits, **qk)
            return (q, k, v) + tuple(args[3:])

        def on_wo(mod, args, hq=hq, hkv=hkv, d=d, cv=cv):
            x = args[0]
            x = (x.view(*x.shape[:-1], hq, d) * cv.repeat_interleave(hq // hkv, 0)).view(x.shape)
            return (x,) + tuple(args[1:])

        hooks.append(la.w_qkv.register_forward_hook(on_qkv))
        if cv is not None:
            hooks.append(la.wo.register_forward_pre_hook(on_wo))
        hooks.append(la.attn.register_forward_pre_hook(on_attn))
    return hooks


@torch.inference_mode()
def ppl(model, ids) -> float:
    nll, n = 0.0, 0
    for row in ids:
        logits = model(row[None])[0, :-1]                              # (L-1, V)
        nll += F.cross_entropy(logits.float(), row[1:], reduction="sum").item()
        n += row.numel() - 1
    return math.exp(nll / n)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--stats", help="a `labkit lite calibrate` work dir (for smoothing)")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    a = ap.parse_args(argv)
    from labkit.corpus import pydoc_text, token_chunks
    from labkit.models.llama import LlamaForCausalLM
    from labkit.models.loader import inspect_model
    from labkit.tokenizer import Tokenizer
    model = LlamaForCausalLM.from_pretrained(a.model)
    ids = token_chunks(Tokenizer(inspect_model(a.model).tokenizer_dir).encode(pydoc_text()),
                       a.seqlen, a.chunks)
    rows = []
    for name in a.variants.split(","):
        kb, vb, opts = parse_variant(name)
        hooks = install(model, kb, vb, opts, a.stats)
        t0 = time.time()
        p = ppl(model, ids)
        for h in hooks:
            h.remove()
        rows.append((name, p))
        print(f"{name:<28} ppl {p:8.3f}   ({time.time() - t0:.0f} s)", flush=True)
    base = dict(rows).get("fp")
    print(f"\n{'variant':<28} {'ppl':>8} {'vs fp':>8}   ({a.chunks} x {a.seqlen} tokens)")
    for name, p in rows:
        rel = f"{100 * (p / base - 1):+7.2f}%" if base else ""
        print(f"{name:<28} {p:8.3f} {rel:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
