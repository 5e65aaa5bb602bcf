"""Weight clipping after AWQ's scales are folded in (AutoAWQ's `auto_clip`, range per side).

Min-max quantization spends the 16 levels of a group on its full range, so one large weight
coarsens the steps of all the others. Clipping the group to a narrower range costs that weight
some error and buys finer steps for the rest. Which range wins depends on the inputs, so each
(output row, group) tries a grid of ranges and keeps the one whose 4-bit weights give the
smallest error on that group's share of the output:

    err = mean over calibration tokens t of ( x_t,g . (Q(clip(w_g)) - w_g) )^2

With asymmetric codes (an integer zero point, the default) the range is
[r_lo * min(w_g), r_hi * max(w_g)], each ratio in {1.0, 0.95, ..., 0.55}: 100 pairs, since the
two ends of a group are usually of different size. AutoAWQ clips both ends at r * max|w_g|,
which only moves the larger one; on the bundled model the separate ends measured 14.59
against 14.74 (alpha 0.5, group 64; docs/PERF.md). With symmetric codes the range is
[-r max|w_g|, r max|w_g|].

All four linears of a layer are clipped, w_qkv too: AutoAWQ leaves q and k alone (a clipped
outlier there is amplified by the softmax), but on the bundled model clipping it by this
output-error criterion measured better (14.49 against 14.59).
"""
from __future__ import annotations

import torch

from labkit.quant.int4 import fake_quantize

CLIP_GRID = [1 - i / 20 for i in range(10)]                         # 1.0, 0.95, ..., 0.55
CLIP_GRID_PAIRS = [(lo, hi) for lo in CLIP_GRID for hi in CLIP_GRID]  # (r_lo, r_hi)
CLIPPED = ("attention.w_qkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


@torch.no_grad()
def clip_weight(w: torch.Tensor, x: torch.Tensor, group_size: int, sym: bool = False,
                tokens: int = 512, rows_per_chunk: int = 256) -> torch.Tensor:
    """Clip w (N, K) in place, group by group, to the range that minimizes its groups' output
    error on the inputs x (..., K). Returns the chosen ratios per (row, group), (N, K/G, 2):
    (r_lo, r_hi) of the range [r_lo min, r_hi max] (sym: r, r of [-r max|w|, r max|w|])."""
    N, K = w.shape
    G = K // group_size
    x = x.reshape(-1, K).float()
    step = max(1, x.shape[0] // tokens)
    xg = x[::step][:tokens].view(-1, G, group_size)                       # (T, G, gs)
    ratios = torch.ones(N, G, 2, dtype=torch.float32, device=w.device)
    grid = [(r, r) for r in CLIP_GRID] if sym else CLIP_GRID_PAIRS
    for r0 in range(0, N, rows_per_chunk):
        wc = w[r0:r0 + rows_per_chunk].float().view(-1, G, group_size)   # (n, G, gs)
        ref = torch.einsum("tgk,ngk->ntg", xg, wc)                        # (n, T, G)
        if sym:
            hi = wc.abs().amax(-1, keepdim=True)                          # (n, G, 1)
            lo = -hi
        else:
            lo, hi = wc.amin(-1, keepdim=True), wc.amax(-1, keepdim=True)
        best_err = torch.full(wc.shape[:2], float("inf"), device=w.device)
        best_lo, best_hi = lo.clone(), hi.clone()
        best_r = torch.ones(*wc.shape[:2], 2, device=w.device)
        for r_lo, r_hi in grid:
            q = fake_quantize(torch.clamp(wc, lo * r_lo, hi * r_hi).view(-1, K), group_size, sym)
            err = (torch.einsum("tgk,ngk->ntg", xg, q.view_as(wc)) - ref).pow(2).mean(1)  # (n, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lo = torch.where(better[..., None], lo * r_lo, best_lo)
            best_hi = torch.where(better[..., None], hi * r_hi, best_hi)
            best_r[better] = torch.tensor([r_lo, r_hi], device=w.device)
        w[r0:r0 + rows_per_chunk] = torch.clamp(wc, best_lo, best_hi).view(-1, K).to(w.dtype)
        ratios[r0:r0 + rows_per_chunk] = best_r
    return ratios
