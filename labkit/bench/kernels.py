"""`labkit bench kernels`: the paged attention kernels against torch SDPA on contiguous KV.

paged_decode: B sequences of L cached tokens, Hq query / Hkv KV heads, head_dim D, one new
query each. Peer: F.scaled_dot_product_attention on the same K/V stored contiguously
(B, Hkv, L, D) with enable_gqa (no paging, no gather: the best case a paged kernel chases).
Both must read all K and V once, so GB/s = 2 x B x L x Hkv x D x bytes / time.

paged_prefill: B sequences of L new tokens each (packed, cu_seqlens) vs SDPA causal on
(B, Hq, L, D); TFLOP/s = 4 x B x Hq x D x L^2 / 2 / time (causal half).
Timing: both replayed from CUDA graphs (triton.testing.do_bench_cudagraph), median: the GPU's
time, without Python's launch overhead (the engine replays decode from graphs too).
"""
from __future__ import annotations

import json
import math
import time

import torch
import torch.nn.functional as F

from labkit.bench.common import commit, device_name


def _bench(fn) -> float:
    """Seconds per call on the GPU: replayed from a CUDA graph (as the engine's decode runs),
    so Python launch overhead is not what is measured; a plain timer loop on CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench_cudagraph
        return do_bench_cudagraph(fn, rep=100, return_mode="median") / 1e3
    fn()
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - t0) / 3


def _paged(B, L, hkv, d, block_size, dtype, dev):
    """A shuffled paged cache holding B sequences of L tokens, and the same K/V contiguous."""
    nb = math.ceil(L / block_size)
    k = torch.randn(B, hkv, L, d, dtype=dtype, device=dev)                 # (B, Hkv, L, D)
    v = torch.randn_like(k)
    perm = torch.randperm(B * nb, device=dev).view(B, nb)
    tables = perm.to(torch.int32)                                           # (B, nb)
    kc = torch.zeros(B * nb, block_size, hkv, d, dtype=dtype, device=dev)
    vc = torch.zeros_like(kc)
    pad = nb * block_size - L
    for src, dst in ((k, kc), (v, vc)):
        blocks = F.pad(src.transpose(1, 2), (0, 0, 0, 0, 0, pad)).reshape(B, nb, block_size, hkv, d)
        dst[perm.flatten()] = blocks.flatten(0, 1)
    return k, v, kc, vc, tables


def decode_point(B, L, hq=32, hkv=8, d=128, block_size=64, dtype=torch.bfloat16) -> dict:
    from kernels.paged_decode import paged_decode_triton
    dev = torch.device("cuda")
    k, v, kc, vc, tables = _paged(B, L, hkv, d, block_size, dtype, dev)
    q = torch.randn(B, hq, d, dtype=dtype, device=dev)
    lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    scale = d ** -0.5
    ours = paged_decode_triton(q, kc, vc, tables, lens, scale)
    ref = F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)[:, :, 0]
    err = (ours.float() - ref.float()).abs().max().item()
    t_ours = _bench(lambda: paged_decode_triton(q, kc, vc, tables, lens, scale))
    t_sdpa = _bench(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale,
                                                           enable_gqa=True))
    nbytes = 2 * B * L * hkv * d * k.element_size()
    return {"op": "paged_decode", "B": B, "L": L, "max_abs_err": err,
            "labkit_us": t_ours * 1e6, "sdpa_us": t_sdpa * 1e6,
            "labkit_GBs": nbytes / t_ours / 1e9, "sdpa_GBs": nbytes / t_sdpa / 1e9,
            "ratio": t_sdpa / t_ours}


def prefill_point(B, L, hq=32, hkv=8, d=128, block_size=64, dtype=torch.bfloat16) -> dict:
    from kernels.paged_prefill import paged_prefill_triton
    dev = torch.device("cuda")
    k, v, kc, vc, tables = _paged(B, L, hkv, d, block_size, dtype, dev)
    q = torch.randn(B, hq, L, d, dtype=dtype, device=dev)                  # (B, Hq, L, D)
    qp = q.transpose(1, 2).reshape(B * L, hq, d).contiguous()              # (B*L, Hq, D) packed
    cu = torch.arange(0, B + 1, device=dev, dtype=torch.int32) * L
    lens = torch.full((B,), L, dtype=torch.int32, device=dev)
    scale = d ** -0.5

    def ours():
        return paged_prefill_triton(qp, None, None, kc, vc, tables, cu, lens, scale, max_seqlen_q=L)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    err = (ours().view(B, L, hq, d).transpose(1, 2).float() - sdpa().float()).abs().max().item()
    t_ours, t_sdpa = _bench(ours), _bench(sdpa)
    flops = 4 * B * hq * d * L * L / 2
    return {"op": "paged_prefill", "B": B, "L": L, "max_abs_err": err,
            "labkit_us": t_ours * 1e6, "sdpa_us": t_sdpa * 1e6,
            "labkit_TFLOPs": flops / t_ours / 1e12, "sdpa_TFLOPs": flops / t_sdpa / 1e12,
            "ratio": t_sdpa / t_ours}


def kernels_bench(args) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("labkit bench kernels needs a CUDA GPU (on CPU the kernels run in the "
                         "Triton interpreter, which is for checking, not timing)")
    rows = []
    for p in args.decode:
        B, L = map(int, p.split("x"))
        rows.append(decode_point(B, L, block_size=args.block_size))
        print(json.dumps(rows[-1]), flush=True)
    for p in args.prefill:
        B, L = map(int, p.split("x"))
        rows.append(prefill_point(B, L, block_size=args.block_size))
        print(json.dumps(rows[-1]), flush=True)
    return {"benchmark": "kernels", "commit": commit(), "date": time.strftime("%Y-%m-%d"),
            "device": device_name(torch.device("cuda")), "dtype": "bfloat16",
            "heads": "32 query / 8 KV, head_dim 128", "block_size": args.block_size, "rows": rows}


def print_table(r: dict) -> None:
    print(f"kernels: {r['heads']}, bf16, block {r['block_size']} | {r['device']} | commit {r['commit']}")
    print(f"{'op':<14}{'B':>5}{'L':>7}{'labkit us':>11}{'SDPA us':>10}{'labkit':>12}{'SDPA':>12}{'ratio':>7}")
    for x in r["rows"]:
        unit = "GBs" if x["op"] == "paged_decode" else "TFLOPs"
        print(f"{x['op']:<14}{x['B']:>5}{x['L']:>7}{x['labkit_us']:>11.1f}{x['sdpa_us']:>10.1f}"
              f"{x['labkit_' + unit]:>8.0f} {unit[:-1]:<3}{x['sdpa_' + unit]:>8.0f} {unit[:-1]:<3}"
              f"{x['ratio']:>6.2f}x")


def main(args) -> int:
    r = kernels_bench(args)
    print_table(r)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(r, f, indent=1)
    if args.json:
        print(json.dumps(r))
    return 0
