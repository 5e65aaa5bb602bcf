"""paged_decode on the CPU: a Numba kernel that reads each sequence's K/V in place.

`paged_decode_batched` (kernels/paged_decode_batched.py) makes a CPU decode batch one SDPA call
by copying every sequence's K/V out of the cache into a (B, L, Hkv, D) buffer padded to the
longest context. That costs three passes over more bytes than the batch has: the gather reads
the blocks and writes the buffer, SDPA reads the buffer, padding included (+40-70% at the mixed
benchmark's lengths), and PyTorch's CPU flash attention runs its small GEMMs of G = Hq/Hkv
query rows slowly. The kernel here is the GPU kernel's idea (kernels/paged_decode.py) written
for a CPU core:

    for each sequence b, in parallel (a task streams its blocks once, front to back):
        pass 1  for each block j of b, each row r in it (token t = j * block_size + r):
                    K[t] (Hkv, D) is one contiguous row of the block
                    scores[h, g, t] = q[b, h, g] . K[t, h] * scale      (every query head)
        softmax over t, per query head, in float32
        pass 2  the same walk over V:  out[b, h, g] += p[h, g, t] * V[t, h]

No gather, no padding, no mask: a task reads exactly context_len rows through the block table.
With fewer sequences than threads the tasks are (sequence, KV head) instead, so every core
works (`applies` leaves a batch of one to paged_decode_batched). Numba compiles the kernel to
machine code on first use (~10 s on 2 cores, then cached on disk beside this file) and runs
its loop over tasks on its own thread pool, as many threads as torch uses; `fastmath` lets
LLVM vectorize the dot products (their sums run in another order than SDPA's: |difference|
~1e-6, float32 rounding).

Where it runs (`applies`): fp32 and bf16 decode batches of two or more on the CPU, when Numba
is installed (`AVAILABLE`; LABKIT_NUMBA_DECODE=0 turns it off); a batch of one keeps
`paged_decode_batched`. NumPy and Numba have no bf16: the kernel reads a bf16 cache as its
16-bit patterns and widens each element to float32 with a shift (`_widen`). Measured on
a 2-core AVX2 EPYC (docs/PERF.md, "CPU decode attention read in place"): 20 sequences of 50-380
tokens, 0.38 ms per layer against 0.9-1.1 ms for gather + SDPA; the mixed benchmark's 126 decode
steps 13.2-15.9 -> 10.2-11.3 s.

`torch.ops.labkit.paged_decode_cpu` is the same launcher registered as a PyTorch op, so the
TorchScript decode step (labkit/models/cpu_decode.py) can call it.
"""
from __future__ import annotations

import os
import threading

import torch

from kernels.paged_decode_batched import paged_decode_batched

__all__ = ["AVAILABLE", "applies", "paged_decode_cpu"]


def _numba():
    if os.environ.get("LABKIT_NUMBA_DECODE", "1") == "0":
        return None
    try:
        import numba
        return numba
    except ImportError:                    # not installed: the engine keeps paged_decode_batched
        return None


_NB = _numba()
AVAILABLE = _NB is not None


def applies(q_dtype: torch.dtype, k_cache, batch: int) -> bool:
    """Does a decode call of `batch` sequences with `q_dtype` queries on this cache take the
    kernel? fp32 or bf16 (queries and cache alike) on the CPU, Numba installed, two sequences
    or more: a batch of one keeps paged_decode_batched, whose K/V are then a view of the cache
    where its blocks are consecutive (no copy, no padding), and the kernel's fixed cost (~20-40
    us a call, mostly Python) made batch-1 decode slower (34.0-34.8 against 34.3-36.9 tok/s)."""
    return (AVAILABLE and batch > 1 and torch.is_tensor(k_cache) and k_cache.device.type == "cpu"
            and q_dtype == k_cache.dtype and q_dtype in (torch.float32, torch.bfloat16))


if AVAILABLE:
    import numpy as np
    from numba import njit, prange, types
    from numba.extending import intrinsic, overload

    @intrinsic
    def _float32_from_bits(typingctx, bits):
        """The float32 whose bit pattern is `bits` (uint32): one LLVM bitcast."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float32))
        return types.float32(types.uint32), codegen

    def _widen(x):
        """A cache element as float32 (resolved per cache type when Numba compiles)."""

    @overload(_widen)
    def _widen_for(x):
        if x == types.uint16:      # bf16 bits: a bf16 is the top half of a float32
            return lambda x: _float32_from_bits(np.uint32(x) << np.uint32(16))
        return lambda x: x         # float32 as it is

    @njit(parallel=True, fastmath=True, cache=True)
    def _decode_kernel(q, k_pool, v_pool, tables, lens, scale, heads_per_task, out):
        """q (B, Hkv, G, D) float32; k_pool, v_pool (num_blocks, block_size, Hkv, D) float32,
        or uint16 holding bf16 bits; tables (B, max blocks) int32; lens (B,) int32; out (B, Hkv,
        G, D) float32. Task i: sequence i // per_seq, KV heads h0 .. h0 + heads_per_task."""
        B, Hkv, G, D = q.shape
        bs = k_pool.shape[1]
        per_seq = Hkv // heads_per_task
        for task in prange(B * per_seq):
            b = task // per_seq
            h0 = (task - b * per_seq) * heads_per_task
            n = lens[b]
            if n == 0:                                  # nothing cached: zeros (the contract)
                out[b, h0:h0 + heads_per_task] = 0.0
                continue
            n_blocks = (n + bs - 1) // bs
            scores = np.empty((heads_per_task, G, n), np.float32)
            for j in range(n_blocks):                   # pass 1: q . K, block by block
                k_block = k_pool[tables[b, j]]                    # (bs, Hkv, D)
                for r in range(min(bs, n - j * bs)):
                    for i in range(heads_per_task):
                        for g in range(G):
                            s = np.float32(0.0)
                            for d in range(D):
                                s += q[b, h0 + i, g, d] * _widen(k_block[r, h0 + i, d])
                            scores[i, g, j * bs + r] = s * scale
            for i in range(heads_per_task):             # softmax over the context, in place
                for g in range(G):
                    row = scores[i, g]                            # (n,)
                    m = row.max()
                    total = np.float32(0.0)
                    for t in range(n):
                        row[t] = np.exp(row[t] - m)
                        total += row[t]
                    row /= total
            acc = np.zeros((heads_per_task, G, D), np.float32)
            for j in range(n_blocks):                   # pass 2: p . V, block by block
                v_block = v_pool[tables[b, j]]                    # (bs, Hkv, D)
                for r in range(min(bs, n - j * bs)):
                    for i in range(heads_per_task):
                        for g in range(G):
                            p = scores[i, g, j * bs + r]
                            for d in range(D):
                                acc[i, g, d] += p * _widen(v_block[r, h0 + i, d])
            out[b, h0:h0 + heads_per_task] = acc


def paged_decode_cpu(
    q: torch.Tensor,  # (B, Hq, D) float32 or bf16, one new token per sequence
    k_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D) q's dtype
    v_cache: torch.Tensor,  # (num_blocks, block_size, Hkv, D) q's dtype
    block_tables: torch.Tensor,  # (B, max_blocks_per_seq) int32, padded with -1 or 0
    context_lens: torch.Tensor,  # (B,) int32, cached tokens incl. the new one
    scale: float,
) -> torch.Tensor:
    """Same contract as `paged_decode_ref`: (B, Hq, D) in q's dtype, zeros where context_len
    is 0. Computes in float32 (bf16 K/V widened as they are read)."""
    if not AVAILABLE:
        raise RuntimeError("paged_decode_cpu needs Numba (pip install numba; and not "
                           "LABKIT_NUMBA_DECODE=0): use paged_decode_batched")
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    out = np.empty((B, Hkv, Hq // Hkv, D), np.float32)
    with _LOCK:       # one launch at a time: Numba's fallback thread pool is not thread-safe
        threads = _use_threads()
        _decode_kernel(q.float().contiguous().numpy().reshape(B, Hkv, Hq // Hkv, D),
                       _numpy(k_cache), _numpy(v_cache), block_tables.to(torch.int32).numpy(),
                       context_lens.to(torch.int32).numpy(), np.float32(scale),
                       1 if B < threads else Hkv, out)
    return torch.from_numpy(out).view(B, Hq, D).to(q.dtype)   # head h * G + g reads KV head h


def _numpy(cache: torch.Tensor):
    """A NumPy view of a cache: float32 as it is, bf16 (which NumPy lacks) as its uint16 bits."""
    if cache.dtype == torch.bfloat16:
        return cache.view(torch.int16).numpy().view(np.uint16)
    return cache.numpy()


_LOCK = threading.Lock()
_THREADS = threading.local()       # Numba's thread count is per calling thread


def _use_threads() -> int:
    """Numba's thread count follows torch.get_num_threads() (set again only when it moves)."""
    n = min(torch.get_num_threads(), _NB.config.NUMBA_NUM_THREADS)
    if getattr(_THREADS, "n", 0) != n:
        _NB.set_num_threads(n)
        _THREADS.n = n
    return n


def _op(q, k_cache, v_cache, block_tables, context_lens, scale):
    if applies(q.dtype, k_cache, q.shape[0]):
        return paged_decode_cpu(q, k_cache, v_cache, block_tables, context_lens, scale)
    return paged_decode_batched(q, k_cache, v_cache, block_tables, context_lens, scale)


def _register():
    """torch.ops.labkit.paged_decode_cpu, registered whether Numba is there or not (TorchScript
    resolves the op when it compiles); without the kernel it is paged_decode_batched, the same
    contract. Once per process, even if this file is imported under a second name."""
    if hasattr(torch.ops.labkit, "paged_decode_cpu"):
        return None
    lib = torch.library.Library("labkit", "FRAGMENT")      # unregistered when collected: kept
    lib.define("paged_decode_cpu(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
               "Tensor context_lens, float scale) -> Tensor")
    lib.impl("paged_decode_cpu", _op, "CPU")
    return lib


_LIB = _register()
