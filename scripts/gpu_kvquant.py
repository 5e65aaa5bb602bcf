"""KV-cache int8/int4 on one GPU: kernel correctness at real shapes, decode kernel speed against
bf16, and end-to-end throughput when the cache limits the batch. Prints a table last.

    python scripts/gpu_kvquant.py [--skip-e2e] [--skip-sweep] [--json]

1. correctness: quantizing store (online and static; int8 integer zero point, int4 float16
   zero = the row minimum) kernel vs reference, and paged decode/prefill (int8, int4; fp32 and
   bf16 queries) against "dequantize, then attend" in float64 (the unquantized paged
   references), 32/8, 24/8 and 64/8 heads, head_dim 128, block sizes 16/64, ragged lengths up
   to 4097, keys shifted off zero as real K is; outputs NaN-poisoned. Decode: the default tile
   (bf16 q: transposed), the first kernel's (transposed=False) and the CUDA-core experiment.
2. paged_decode at B=64, L=2048, 32/8 heads, d=128, block 64, CUDA-graph timing: bf16
   (kernels/paged_decode.py) vs int8/int4 (kernels/paged_decode_quant.py): the first kernel's
   tile, the default (timed twice: the spread), without prefetch, and the best of a sweep of
   the transposed tile (BLOCK_N x warps x stages; scripts/gpu_decode_quant_tiles.py times
   more variants). Bytes read (codes + scales + zeros) -> GB/s.
   Acceptance (issue 9): int8 >= 1.7x, int4 >= 2.5x faster than bf16.
3. end-to-end (dummy:llama-3-8b weights made on the GPU): the same cache BYTES for each policy,
   sized so bf16 holds ~24 sequences; 128 requests of 512 prompt + 256 output tokens.
Needs torch + triton + labkit only (no network, no GGUF). About 2 minutes on an H100
(`--skip-e2e`: under one).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kernels import paged_decode_ref, paged_decode_triton, paged_prefill_ref  # noqa: E402
from kernels.kv_quant import (QuantKVCache, dequantize_ref, store_kv_quant_ref,  # noqa: E402
                              store_kv_quant_triton, unpack_int4)
from kernels.paged_decode_quant import paged_decode_quant_triton  # noqa: E402
from kernels.paged_prefill_quant import paged_prefill_quant_triton  # noqa: E402

DEV = "cuda"


# ----------------------------------------------------------------------------- helpers
def tables_for(lens, block_size, spare=4):
    need = [math.ceil(n / block_size) for n in lens]
    nb = sum(need) + spare
    perm = torch.randperm(nb).tolist()
    t = torch.full((len(lens), max(need)), -1, dtype=torch.int32)
    slots, i = [], 0
    for b, n in enumerate(need):
        own = torch.tensor(perm[i:i + n])
        t[b, :n] = own.int()
        pos = torch.arange(lens[b])
        slots.append(own[pos // block_size] * block_size + pos % block_size)
        i += n
    return nb, t.to(DEV), torch.cat(slots).to(DEV)


def quant_cache(lens, block_size, hkv, d, bits, dtype=torch.bfloat16):
    nb, tables, slots = tables_for(lens, block_size)
    k, v = (QuantKVCache.empty(nb, block_size, hkv, d, bits, DEV) for _ in range(2))
    for c in (k, v):
        c.data.random_(0, 256)
        c.scale.fill_(float("nan"))
    kn = torch.randn(slots.numel(), hkv, d, device=DEV, dtype=dtype) * 2 + 0.5   # off zero, as K
    vn = torch.randn(slots.numel(), hkv, d, device=DEV, dtype=dtype)
    store_kv_quant_triton(kn, vn, k, v, slots)
    return k, v, tables, (kn, vn, slots)


def store_check(bits, static) -> tuple:
    lens, bs, hkv, d = [777, 64, 1], 64, 8, 128
    nb, _, slots = tables_for(lens, bs)
    kn = torch.randn(slots.numel(), hkv, d, device=DEV, dtype=torch.bfloat16) * 2 + 0.5
    vn = torch.randn_like(kn)
    st = None
    if static:   # per-head (scale, zero) in the cache's format; a range that clips some values
        scale = (torch.rand(hkv, device=DEV) * 4 + 2) / (2 ** bits - 1)
        zero = (torch.randint(100, 156, (hkv,), device=DEV).float() if bits == 8
                else -torch.rand(hkv, device=DEV) * 3)
        st = torch.stack([scale, zero], -1).half().float()                   # (Hkv, 2)
    got = []
    for store in (store_kv_quant_triton, store_kv_quant_ref):
        k, v = (QuantKVCache.empty(nb, bs, hkv, d, bits, DEV) for _ in range(2))
        for c in (k, v):
            c.data.zero_()
            c.scale.fill_(float("nan"))
            c.zero.zero_()
            c.static = st
        store(kn, vn, k, v, slots)
        got.append((k, v))
    (k, v), (k2, v2) = got
    def codes(c):   # int4: compare the codes, not the packed bytes (a high nibble off by one
        return (unpack_int4(c.data) if bits == 4 else c.data).int()   # is a byte off by 16)
    off = max((codes(a) - codes(b)).abs().max().item() for a, b in ((k, k2), (v, v2)))
    same = all(torch.equal(a.scale.nan_to_num(-1), b.scale.nan_to_num(-1)) for a, b in ((k, k2), (v, v2)))
    # int8 zero points may differ by one where -lo/s is a tie (GPU division); int4 zeros are
    # the row minimum, exact
    z_off = max((a.zero.float() - b.zero.float()).abs().max().item() for a, b in ((k, k2), (v, v2)))
    ok = off <= 1 and same and z_off <= (1 if bits == 8 and not static else 0)
    return (f"store int{bits} {'static' if static else 'online'}",
            f"codes off <= {off}, zeros off <= {z_off:g}", ok)


def dense(c):
    codes = unpack_int4(c.data) if c.bits == 4 else c.data
    return dequantize_ref(codes, c.scale, c.zero, torch.float64)


def err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-9)).item()


# ----------------------------------------------------------------------------- 1. correctness
def correctness() -> list[tuple]:
    rows = []
    torch.manual_seed(0)
    for bits in (8, 4):
        for static in (False, True):   # store: kernel vs reference on the same inputs and slots
            rows.append(store_check(bits, static))
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            # GQA groups of 4, 3 and 8 (the transposed tile pads the group to a power of 2 only)
            for lens, bs, hq in (([1, 2048, 777, 4097], 64, 32), ([129] * 64, 16, 24),
                                 ([300, 1, 64], 64, 64)):
                k, v, tables, _ = quant_cache(lens, bs, 8, 128, bits, dtype)
                ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
                q = torch.randn(len(lens), hq, 128, device=DEV, dtype=dtype)
                want = paged_decode_ref(q.double(), dense(k), dense(v), tables, ctx, 128 ** -0.5)
                # the default tile (bf16: transposed), the first kernel's tile (transposed=False)
                # and the CUDA-core experiment (dot=False)
                variants = [("", {}), (" fma", dict(dot=False))]
                if dtype != torch.float32:
                    variants.insert(1, (" untransposed", dict(transposed=False)))
                for tag, kw in variants:
                    got = paged_decode_quant_triton(q, k, v, tables, ctx, 128 ** -0.5,
                                                    out=torch.full_like(q, float("nan")), **kw)
                    e = err(got, want)
                    rows.append((f"decode{tag} int{bits} {str(dtype)[6:]} bs{bs} Hq{hq}",
                                 f"rel err {e:.1e}", e < tol and not got.isnan().any().item()))
            q_lens, prefix = [1000, 17, 1, 513], [0, 2048, 300, 64]
            ctx_l = [a + b for a, b in zip(q_lens, prefix)]
            k, v, tables, _ = quant_cache(ctx_l, 64, 8, 128, bits, dtype)
            q = torch.randn(sum(q_lens), 32, 128, device=DEV, dtype=dtype)
            cu = torch.tensor([0] + q_lens, device=DEV).cumsum(0).int()
            ctx = torch.tensor(ctx_l, dtype=torch.int32, device=DEV)
            e0 = torch.empty(0, device=DEV)
            want = paged_prefill_ref(q.double(), e0, e0, dense(k), dense(v), tables, cu, ctx, 128 ** -0.5)
            got = paged_prefill_quant_triton(q, k, v, tables, cu, ctx, 128 ** -0.5,
                                             max_seqlen_q=max(q_lens), out=torch.full_like(q, float("nan")))
            e = err(got, want)
            rows.append((f"prefill int{bits} {str(dtype)[6:]}", f"rel err {e:.1e}",
                         e < tol and not got.isnan().any().item()))
    return rows


# ----------------------------------------------------------------------------- 2. kernel speed
def bench(fn) -> float:
    """Median seconds of fn replayed from a CUDA graph (no launch gaps in the numbers)."""
    import triton.testing
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e-3


def decode_speed(B=64, L=2048, hq=32, hkv=8, d=128, bs=64, sweep=True) -> list[dict]:
    torch.manual_seed(0)
    lens = [L] * B
    nb, tables, slots = tables_for(lens, bs)
    ctx = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(B, hq, d, device=DEV, dtype=torch.bfloat16)
    scale = d ** -0.5
    out = []
    kc = torch.randn(nb, bs, hkv, d, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    t = bench(lambda: paged_decode_triton(q, kc, vc, tables, ctx, scale))
    byts = 2 * B * L * hkv * d * 2
    out.append({"kv": "bf16", "config": "default", "us": t * 1e6, "GBs": byts / t / 1e9, "speedup": 1.0})
    base = t
    del kc, vc
    for bits in (8, 4):
        k, v, _, _ = quant_cache(lens, bs, hkv, d, bits)
        byts = 2 * B * L * hkv * QuantKVCache.bytes_per_row(d, bits)

        def row(config, **kw):
            t = bench(lambda: paged_decode_quant_triton(q, k, v, tables, ctx, scale, **kw))
            out.append({"kv": f"int{bits}", "config": config, "us": t * 1e6,
                        "GBs": byts / t / 1e9, "speedup": base / t})
            print(f"  {out[-1]}", flush=True)
            return t

        row("untransposed (first tile)", transposed=False)
        row("default")
        row("default again")                                   # the spread of one timing
        row("no prefetch", prefetch=False)
        if not sweep:
            continue
        best = None
        for block_n in (32, 64, 128):                           # the transposed tile's configs
            for warps in (2, 4, 8):
                for stages in (2, 3):
                    if block_n == 32 and warps == 8:
                        continue
                    name = f"BN={block_n} w={warps} st={stages}"
                    try:
                        t = bench(lambda: paged_decode_quant_triton(
                            q, k, v, tables, ctx, scale, block_n=block_n, num_warps=warps,
                            num_stages=stages))
                    except Exception as e:                      # e.g. out of shared memory
                        print(f"  int{bits} {name}: {type(e).__name__}")
                        continue
                    print(f"  int{bits} {name:<18}: {t * 1e6:7.1f} us", flush=True)
                    if best is None or t < best[0]:
                        best = (t, name)
        out.append({"kv": f"int{bits}", "config": "best: " + best[1], "us": best[0] * 1e6,
                    "GBs": byts / best[0] / 1e9, "speedup": base / best[0]})
        del k, v
    return out


# ----------------------------------------------------------------------------- 3. end to end
def end_to_end(model="dummy:llama-3-8b", seqs_bf16=24, n_req=128, prompt=512, output=256) -> list[dict]:
    from labkit import EngineConfig, GenerationConfig
    from labkit.engine.engine import LLMEngine
    from labkit.engine.kv_cache import bytes_per_token
    from labkit.models.dummy import shape_config

    cfg = shape_config(model)
    bs = 64
    cache_bytes = seqs_bf16 * (prompt + output) * bytes_per_token(cfg, 1, torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (prompt,), generator=g).tolist() for _ in range(n_req)]
    gc = GenerationConfig(max_new_tokens=output, ignore_eos=True)
    rows = []
    for q in (0, 8, 4):
        per_block = bytes_per_token(cfg, 1, torch.bfloat16, q) * bs
        blocks = cache_bytes // per_block
        e = LLMEngine(model, EngineConfig(quant_policy=q, cache_max_entry_count=int(blocks),
                                          cache_block_seq_len=bs, max_batch_size=128,
                                          session_len=prompt + output + 1))
        e.generate(prompts[:4], GenerationConfig(max_new_tokens=8, ignore_eos=True))  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        peak = 0
        ids = [e.add_request(p, gc) for p in prompts]
        while e.has_unfinished():
            e.step()
            peak = max(peak, e.stats()["running"])
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        st = e.stats()
        rows.append({"kv": {0: "bf16", 8: "int8", 4: "int4"}[q], "blocks": st["blocks_total"],
                     "tokens": st["tokens_total"], "peak_running": peak,
                     "out_tok_s": n_req * output / dt, "seconds": dt, "requests": len(ids)})
        print(f"  e2e {rows[-1]}")
        del e
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true", help="time the defaults only")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    t0 = time.time()
    checks = correctness()
    print(f"correctness: {time.time() - t0:.0f} s")
    t1 = time.time()
    speed = decode_speed(sweep=not a.skip_sweep)
    print(f"decode speed: {time.time() - t1:.0f} s")
    t1 = time.time()
    e2e = [] if a.skip_e2e else end_to_end()
    print(f"end to end: {time.time() - t1:.0f} s; total {time.time() - t0:.0f} s")
    if a.json:
        print(json.dumps({"checks": checks, "decode": speed, "e2e": e2e}))
    print("\n== correctness (vs dequantize-then-attend, float64)")
    for name, what, ok in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {name:<34} {what}")
    print("\n== paged_decode B=64 L=2048 Hq/Hkv=32/8 d=128 block 64 (acceptance: int8 >= 1.7x, int4 >= 2.5x)")
    print(f"  {'kv':<5} {'config':<26} {'us':>8} {'GB/s':>7} {'x bf16':>7}")
    for r in speed:
        print(f"  {r['kv']:<5} {r['config']:<26} {r['us']:8.1f} {r['GBs']:7.0f} {r['speedup']:7.2f}")
    if e2e:
        print("\n== end to end, dummy:llama-3-8b, equal cache bytes (bf16 ~24 sequences), 128 x (512 + 256)")
        print(f"  {'kv':<5} {'blocks':>7} {'peak batch':>10} {'out tok/s':>10} {'x bf16':>7}")
        for r in e2e:
            print(f"  {r['kv']:<5} {r['blocks']:7d} {r['peak_running']:10d} {r['out_tok_s']:10.0f} "
                  f"{r['out_tok_s'] / e2e[0]['out_tok_s']:7.2f}")
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
