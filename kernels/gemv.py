"""Skinny matmul y = x @ W^T for the few rows of a small decode batch (M <= 16).

At batch 1..16 a decode step's linear layers are matrix-vector products: every weight byte
is read once and used M times, so the time is bytes / bandwidth and the only thing that
matters is streaming W at full speed. cuBLAS picks tiles made for large M here; this kernel
gives each program BLOCK_N output features and walks the whole K dimension with wide,
coalesced loads of W (rows are contiguous along K), the M <= 16 rows of x padded to one
16-row `tl.dot` tile.

    linear_ref(x, w)            PyTorch (F.linear): the reference
    linear_small_m_triton(x, w) Triton: grid (N / BLOCK_N,), fp32 accumulation
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import interpreted, require_triton, tl, triton

__all__ = ["linear_ref", "linear_small_m_triton", "SMALL_M"]

SMALL_M = 16            # up to this many rows the skinny kernel is used


def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K), w (N, K) -> (M, N)."""
    return F.linear(x, w)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)                    # (BN,) output features
    m = tl.arange(0, BLOCK_M)                                    # (BM,) rows of x (padded)
    n_ok = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)                           # (BK,)
        if EVEN_K:
            w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :],
                        mask=n_ok[:, None], other=0.0)           # (BN, BK)
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :],
                        mask=(m < M)[:, None], other=0.0)        # (BM, BK)
        else:
            k_ok = k < K
            w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :],
                        mask=(m < M)[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))                            # (BM, BN)
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(m < M)[:, None] & n_ok[None, :])


def _config(N: int, K: int) -> dict:
    """Tile sizes measured on an H100 (docs/PERF.md); the interpreter takes small ones."""
    if interpreted():
        return dict(BLOCK_N=16, BLOCK_K=32, num_warps=1, num_stages=1)
    # H100 sweep (bf16, M=1): 2.75-3.0 TB/s on Llama-2-7B's matrices, cuBLAS 2.5-2.7
    return dict(BLOCK_N=16 if K > 8192 else 32, BLOCK_K=256, num_warps=2, num_stages=4)


def linear_small_m_triton(x: torch.Tensor, w: torch.Tensor, **config) -> torch.Tensor:
    """Same contract as `linear_ref` for x with at most SMALL_M rows (any leading dims)."""
    require_triton()
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)                                        # (M, K)
    M, N = x2.shape[0], w.shape[0]
    assert M <= SMALL_M and w.shape[1] == K and w.stride(1) == 1 and x2.stride(1) == 1
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    cfg = {**_config(N, K), **config}
    bn, bk = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    _gemv_kernel[(triton.cdiv(N, bn),)](x2, w, y, M, N, K, x2.stride(0), w.stride(0), y.stride(0),
                                       BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0, **cfg)
    return y.view(*lead, N)
