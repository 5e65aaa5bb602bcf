"""Skinny matmul y = x @ W^T for the few rows of a small decode batch (M <= 16).

At batch 1..16 a decode step's linear layers are matrix-vector products: every weight byte
is read once and used M times, so the time is bytes / bandwidth and the only thing that
matters is streaming W at full speed. cuBLAS picks tiles made for large M here; this kernel
gives each program BLOCK_N output features and walks the whole K dimension with wide,
coalesced loads of W (rows are contiguous along K), the M <= 16 rows of x padded to one
16-row `tl.dot` tile.

    linear_ref(x, w)            PyTorch (F.linear): the reference
    linear_small_m_triton(x, w) Triton: grid (N / BLOCK_N,), fp32 accumulation

At batch 1 a decode step is ~290 kernels, and the small ones between the matmuls (RMSNorm,
SiLU-and-mul) cost 1.5-2.5 us each in launch and tail for a few KB of work (docs/PERF.md).
Two of them can ride in a matmul:

    rms_norm_linear_triton(x, residual, norm_w, eps, w)  y = rmsnorm(x + residual) * norm_w @ W^T,
        and x + residual (the new residual, written by program 0): a prologue on x's load.
        Each program first reads the M <= 16 rows once to get their 1/rms (from L2).
    linear_silu_triton(x, w13)  y = silu(x @ W1^T) * (x @ W3^T) with w13 = [W1 | W3]: an
        epilogue. A program computes BLOCK_N gate features and the same BLOCK_N up features
        (two accumulators over one x tile), so the (M, 2I) product never reaches memory.
        `rms_norm_linear_triton(..., gated=True)` does both.
Each rounds every intermediate to the model dtype exactly where the unfused kernels do, so
only the order of fp32 sums differs.

On Hopper the kernel launches with PDL (kernels/_triton.py): each program loads its first
weight tile before waiting for the kernel that wrote x.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import interpreted, pdl_launch, pdl_wait, require_triton, tl, triton

__all__ = ["linear_ref", "linear_small_m_triton", "rms_norm_linear_ref", "rms_norm_linear_triton",
           "linear_silu_ref", "linear_silu_triton", "SMALL_M"]

SMALL_M = 16            # up to this many rows the skinny kernel is used


def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K), w (N, K) -> (M, N)."""
    return F.linear(x, w)


def rms_norm_linear_ref(x, residual, norm_w, eps, w, gated: bool = False):
    """x, residual (M, K) or residual None; norm_w (K,); w (N, K) -> (y (M, N), x + residual);
    gated: w = [W1 | W3] (2I, K) and y = silu(h @ W1^T) * (h @ W3^T), (M, I)."""
    from kernels.rms_norm import rms_norm_ref
    lin = linear_silu_ref if gated else linear_ref
    if residual is None:
        return lin(rms_norm_ref(x, norm_w, eps), w), x
    h, res = rms_norm_ref(x, norm_w, eps, residual)
    return lin(h, w), res


def linear_silu_ref(x, w13):
    """x (M, K), w13 (2I, K) = [W1 | W3] -> silu(x @ W1^T) * (x @ W3^T), (M, I)."""
    from kernels.activation import silu_and_mul_ref
    return silu_and_mul_ref(linear_ref(x, w13))


NONE, RMS_NORM = 0, 1                       # the prologue applied to x as it is loaded


@triton.jit
def _load_x(x_ptr, res_ptr, nw_ptr, m, k, mask, stride_xm, stride_rm, K, inv,
            PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr):
    """(BM, BK) of the matmul's input, in x's dtype, with the prologue applied."""
    x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mask, other=0.0)
    if PROLOGUE == 1:                                            # rmsnorm(x + residual) * norm_w
        if HAS_RES:
            r = tl.load(res_ptr + m[:, None] * stride_rm + k[None, :], mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)  # rounded sum
        normed = (x.to(tl.float32) * inv[:, None]).to(x_ptr.dtype.element_ty)      # as HF rounds
        nw = tl.load(nw_ptr + k, mask=k < K, other=0.0)
        x = (nw[None, :].to(tl.float32) * normed.to(tl.float32)).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def _load_w(w_ptr, n, k, n_ok, K, stride_wn, EVEN_K: tl.constexpr):
    """(BN, BK) tile of W: rows n, columns k."""
    if EVEN_K:
        mask = n_ok[:, None]
    else:
        mask = n_ok[:, None] & (k < K)[None, :]
    return tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :], mask=mask, other=0.0)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 res_ptr, nw_ptr, res_out_ptr, stride_rm, stride_rom, eps,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr,
                 GATED: tl.constexpr, PDL: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)                    # (BN,) output features
    m = tl.arange(0, BLOCK_M)                                    # (BM,) rows of x (padded)
    n_ok, m_ok = n < N, tl.arange(0, BLOCK_M) < M
    # the first K tile of W (and of the up rows when GATED: W = [gate | up], N rows each) is
    # loaded before waiting for the previous kernel: weights do not depend on it (PDL)
    k = tl.arange(0, BLOCK_K)                                    # (BK,)
    w = _load_w(w_ptr, n, k, n_ok, K, stride_wn, EVEN_K)         # (BN, BK)
    if GATED:
        wu = _load_w(w_ptr, n + N, k, n_ok, K, stride_wn, EVEN_K)  # (BN, BK) up rows
    pdl_wait(PDL)
    inv = tl.zeros([BLOCK_M], tl.float32)                        # (BM,) 1 / rms of each row
    if PROLOGUE == 1:                # a first pass over the rows (L2-resident): sum of squares
        ss = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)                      # (BK,)
            mask = m_ok[:, None] & (kk < K)[None, :]
            s = tl.load(x_ptr + m[:, None] * stride_xm + kk[None, :], mask=mask, other=0.0)
            if HAS_RES:
                r = tl.load(res_ptr + m[:, None] * stride_rm + kk[None, :], mask=mask, other=0.0)
                s = (s.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
                if pid == 0:                                     # the new residual, once
                    tl.store(res_out_ptr + m[:, None] * stride_rom + kk[None, :], s, mask=mask)
            sf = s.to(tl.float32)
            ss += tl.sum(sf * sf, 1)
        inv = 1.0 / tl.sqrt(ss / K + eps)
    x_mask = m_ok[:, None] if EVEN_K else m_ok[:, None] & (k < K)[None, :]
    x = _load_x(x_ptr, res_ptr, nw_ptr, m, k, x_mask, stride_xm, stride_rm, K, inv,
                PROLOGUE, HAS_RES)                               # (BM, BK)
    acc = tl.dot(x, tl.trans(w))                                 # (BM, BN) fp32
    if GATED:
        acc_u = tl.dot(x, tl.trans(wu))                          # (BM, BN) fp32
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)                           # (BK,)
        w = _load_w(w_ptr, n, k, n_ok, K, stride_wn, EVEN_K)
        x_mask = m_ok[:, None] if EVEN_K else m_ok[:, None] & (k < K)[None, :]
        x = _load_x(x_ptr, res_ptr, nw_ptr, m, k, x_mask, stride_xm, stride_rm, K, inv,
                    PROLOGUE, HAS_RES)
        acc += tl.dot(x, tl.trans(w))
        if GATED:
            wu = _load_w(w_ptr, n + N, k, n_ok, K, stride_wn, EVEN_K)
            acc_u += tl.dot(x, tl.trans(wu))
    if GATED:                        # silu(gate) * up, each rounded where the unfused ops round
        g = acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        u = acc_u.to(y_ptr.dtype.element_ty).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
        acc = act * u
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _config(N: int, K: int) -> dict:
    """Tile sizes measured on an H100 (docs/PERF.md); the interpreter takes small ones."""
    if interpreted():
        return dict(BLOCK_N=16, BLOCK_K=32, num_warps=1, num_stages=1)
    # H100 sweep (bf16, M=1): 2.75-3.0 TB/s on Llama-2-7B's matrices, cuBLAS 2.5-2.7
    return dict(BLOCK_N=16 if K > 8192 else 32, BLOCK_K=256, num_warps=2, num_stages=4)


def _gated_config(I: int, K: int) -> dict:
    """Tiles of the SwiGLU epilogue (BLOCK_N gate + BLOCK_N up rows a program): the winners
    of scripts/gpu_swiglu_sweep.py on an H200, Llama-2-7B's w13 and Llama-3-8B's."""
    if interpreted():
        return dict(BLOCK_N=16, BLOCK_K=32, num_warps=1, num_stages=1)
    if I * K <= 11008 * 4096:
        return dict(BLOCK_N=32, BLOCK_K=128, num_warps=2, num_stages=4)
    return dict(BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)


def _launch(x2, w, M, N, K, config, prologue=NONE, res=None, nw=None, res_out=None, eps=0.0,
            gated=False):
    """N: output features (w has 2N rows when gated)."""
    require_triton()
    assert M <= SMALL_M and w.shape[1] == K and w.stride(1) == 1 and x2.stride(-1) == 1
    assert w.shape[0] == (2 * N if gated else N)
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    cfg = {**(_gated_config(N, K) if gated else _config(N, K)), **config}
    bn, bk = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    r = res if res is not None else x2                   # unused pointers: any tensor
    ro = res_out if res_out is not None else y
    pdl = pdl_launch(x2)
    _gemv_kernel[(triton.cdiv(N, bn),)](
        x2, w, y, M, N, K, x2.stride(0), w.stride(0), y.stride(0),
        r, nw if nw is not None else w, ro, r.stride(0), ro.stride(0), eps,
        BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0, PROLOGUE=prologue,
        HAS_RES=res is not None, GATED=gated, PDL=pdl, launch_pdl=pdl, **cfg)
    return y


def linear_small_m_triton(x: torch.Tensor, w: torch.Tensor, **config) -> torch.Tensor:
    """Same contract as `linear_ref` for x with at most SMALL_M rows (any leading dims)."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)                                        # (M, K)
    return _launch(x2, w, x2.shape[0], w.shape[0], K, config).view(*lead, w.shape[0])


def linear_silu_triton(x: torch.Tensor, w13: torch.Tensor, **config) -> torch.Tensor:
    """Same contract as `linear_silu_ref` (at most SMALL_M rows, any leading dims)."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)                                        # (M, K)
    I = w13.shape[0] // 2
    return _launch(x2, w13, x2.shape[0], I, K, config, gated=True).view(*lead, I)


def rms_norm_linear_triton(x, residual, norm_w, eps: float, w, gated: bool = False, **config):
    """Same contract as `rms_norm_linear_ref` (x with at most SMALL_M rows, any leading dims)."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)                                        # (M, K)
    M, N = x2.shape[0], w.shape[0] // 2 if gated else w.shape[0]
    res = residual.reshape(-1, K) if residual is not None else None
    res_out = torch.empty_like(x2) if res is not None else None
    y = _launch(x2, w, M, N, K, config, RMS_NORM, res, norm_w, res_out, eps, gated)
    return y.view(*lead, N), (res_out.view(x.shape) if res is not None else x)
