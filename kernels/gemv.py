"""Skinny matmul y = x @ W^T for the few rows of a small decode batch (M <= 16).

At batch 1..16 a decode step's linear layers are matrix-vector products: every weight byte
is read once and used M times, so the time is bytes / bandwidth and the only thing that
matters is streaming W at full speed. cuBLAS picks tiles made for large M here; this kernel
gives each program BLOCK_N output features and walks the whole K dimension with wide,
coalesced loads of W (rows are contiguous along K), the M <= 16 rows of x padded to one
16-row `tl.dot` tile.

    linear_ref(x, w)            PyTorch (F.linear): the reference
    linear_small_m_triton(x, w) Triton: grid (N / BLOCK_N,), fp32 accumulation

At batch 1 a decode step is ~190 kernels, and the small ones between the matmuls (RMSNorm,
SiLU-and-mul) cost 1.5-2.5 us each in launch and tail for a few KB of work (docs/PERF.md).
Two of them can ride in the matmul that reads their output, as a prologue on x's load:

    rms_norm_linear_triton(x, residual, norm_w, eps, w)  y = rmsnorm(x + residual) * norm_w @ W^T,
        and x + residual (the new residual, written by program 0). Each program first reads
        the M <= 16 rows once to get their 1/rms (from L2: 8 KB a row at hidden 4096).
    silu_mul_linear_triton(gate_up, w)                   y = (silu(gate) * up) @ W^T
Each rounds every intermediate to the model dtype exactly where the unfused kernels do, so the
matmul sees the same x (only the order of the fp32 sum of squares differs).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import interpreted, require_triton, tl, triton

__all__ = ["linear_ref", "linear_small_m_triton", "rms_norm_linear_ref", "rms_norm_linear_triton",
           "silu_mul_linear_ref", "silu_mul_linear_triton", "SMALL_M"]

SMALL_M = 16            # up to this many rows the skinny kernel is used


def linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, K), w (N, K) -> (M, N)."""
    return F.linear(x, w)


def rms_norm_linear_ref(x, residual, norm_w, eps, w):
    """x, residual (M, K) or residual None; norm_w (K,); w (N, K) -> (y (M, N), x + residual)."""
    from kernels.rms_norm import rms_norm_ref
    if residual is None:
        return linear_ref(rms_norm_ref(x, norm_w, eps), w), x
    h, res = rms_norm_ref(x, norm_w, eps, residual)
    return linear_ref(h, w), res


def silu_mul_linear_ref(gate_up, w):
    """gate_up (M, 2I) = [gate | up], w (N, I) -> (M, N)."""
    from kernels.activation import silu_and_mul_ref
    return linear_ref(silu_and_mul_ref(gate_up), w)


NONE, RMS_NORM, SILU_MUL = 0, 1, 2          # the prologue applied to x as it is loaded


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
    if PROLOGUE == 2:                                            # silu(gate) * up, x = [gate | up]
        g = x.to(tl.float32)
        u = tl.load(x_ptr + m[:, None] * stride_xm + K + k[None, :], mask=mask, other=0.0)
        act = (g / (1.0 + tl.exp(-g))).to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded silu
        x = (act * u.to(tl.float32)).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 res_ptr, nw_ptr, res_out_ptr, stride_rm, stride_rom, eps,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr):
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)                    # (BN,) output features
    m = tl.arange(0, BLOCK_M)                                    # (BM,) rows of x (padded)
    n_ok, m_ok = n < N, tl.arange(0, BLOCK_M) < M
    inv = tl.zeros([BLOCK_M], tl.float32)                        # (BM,) 1 / rms of each row
    if PROLOGUE == 1:                # a first pass over the rows (L2-resident): sum of squares
        ss = tl.zeros([BLOCK_M], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)                       # (BK,)
            mask = m_ok[:, None] & (k < K)[None, :]
            s = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=mask, other=0.0)
            if HAS_RES:
                r = tl.load(res_ptr + m[:, None] * stride_rm + k[None, :], mask=mask, other=0.0)
                s = (s.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
                if pid == 0:                                     # the new residual, once
                    tl.store(res_out_ptr + m[:, None] * stride_rom + k[None, :], s, mask=mask)
            sf = s.to(tl.float32)
            ss += tl.sum(sf * sf, 1)
        inv = 1.0 / tl.sqrt(ss / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)                           # (BK,)
        if EVEN_K:
            w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :],
                        mask=n_ok[:, None], other=0.0)           # (BN, BK)
            x = _load_x(x_ptr, res_ptr, nw_ptr, m, k, m_ok[:, None], stride_xm, stride_rm, K,
                        inv, PROLOGUE, HAS_RES)                  # (BM, BK)
        else:
            k_ok = k < K
            w = tl.load(w_ptr + n[:, None].to(tl.int64) * stride_wn + k[None, :],
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            x = _load_x(x_ptr, res_ptr, nw_ptr, m, k, m_ok[:, None] & k_ok[None, :], stride_xm,
                        stride_rm, K, inv, PROLOGUE, HAS_RES)
        acc += tl.dot(x, tl.trans(w))                            # (BM, BN)
    tl.store(y_ptr + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _config(N: int, K: int) -> dict:
    """Tile sizes measured on an H100 (docs/PERF.md); the interpreter takes small ones."""
    if interpreted():
        return dict(BLOCK_N=16, BLOCK_K=32, num_warps=1, num_stages=1)
    # H100 sweep (bf16, M=1): 2.75-3.0 TB/s on Llama-2-7B's matrices, cuBLAS 2.5-2.7
    return dict(BLOCK_N=16 if K > 8192 else 32, BLOCK_K=256, num_warps=2, num_stages=4)


def _launch(x2, w, M, N, K, config, prologue=NONE, res=None, nw=None, res_out=None, eps=0.0):
    require_triton()
    assert M <= SMALL_M and w.shape[1] == K and w.stride(1) == 1 and x2.stride(-1) == 1
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    cfg = {**_config(N, K), **config}
    bn, bk = cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    r = res if res is not None else x2                   # unused pointers: any tensor
    ro = res_out if res_out is not None else y
    _gemv_kernel[(triton.cdiv(N, bn),)](
        x2, w, y, M, N, K, x2.stride(0), w.stride(0), y.stride(0),
        r, nw if nw is not None else w, ro, r.stride(0), ro.stride(0), eps,
        BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, EVEN_K=K % bk == 0, PROLOGUE=prologue,
        HAS_RES=res is not None, **cfg)
    return y


def linear_small_m_triton(x: torch.Tensor, w: torch.Tensor, **config) -> torch.Tensor:
    """Same contract as `linear_ref` for x with at most SMALL_M rows (any leading dims)."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)                                        # (M, K)
    return _launch(x2, w, x2.shape[0], w.shape[0], K, config).view(*lead, w.shape[0])


def rms_norm_linear_triton(x, residual, norm_w, eps: float, w, **config):
    """Same contract as `rms_norm_linear_ref` (x with at most SMALL_M rows, any leading dims)."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)                                        # (M, K)
    M, N = x2.shape[0], w.shape[0]
    res = residual.reshape(-1, K) if residual is not None else None
    res_out = torch.empty_like(x2) if res is not None else None
    y = _launch(x2, w, M, N, K, config, RMS_NORM, res, norm_w, res_out, eps)
    return y.view(*lead, N), (res_out.view(x.shape) if res is not None else x)


def silu_mul_linear_triton(gate_up, w, **config):
    """Same contract as `silu_mul_linear_ref` (at most SMALL_M rows, any leading dims)."""
    lead, I = gate_up.shape[:-1], gate_up.shape[-1] // 2
    x2 = gate_up.reshape(-1, 2 * I)                              # (M, 2I)
    return _launch(x2, w, x2.shape[0], w.shape[0], I, config, SILU_MUL).view(*lead, w.shape[0])
