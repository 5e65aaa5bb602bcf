"""AWQ's weight clipping (AutoAWQ's `auto_clip`), after the scales are folded in.

Min-max quantization spends the 16 levels of a group on its full range, so one large weight
coarsens the steps of all the others. Clipping the group to [-m, m] with m = r * max|w_g|
(r < 1) costs that weight some error and buys finer steps for the rest. Which r wins depends on
the inputs, so each (output row, group) tries r in {1.0, 0.95, ..., 0.55} and keeps the one
whose 4-bit weights give the smallest error on that group's share of the output:

    err(r) = mean over calibration tokens t of ( x_t,g . (Q(clip(w_g, r)) - w_g) )^2

Applied to wo, w13 and w2. w_qkv is left alone, as AutoAWQ does: q and k feed the attention
logits, where a clipped outlier is amplified by the softmax.
"""
from __future__ import annotations

import torch

from labkit.quant.int4 import fake_quantize

CLIP_GRID = [1 - i / 20 for i in range(10)]         # 1.0, 0.95, ..., 0.55
CLIPPED = ("attention.wo", "feed_forward.w13", "feed_forward.w2")


@torch.no_grad()
def clip_weight(w: torch.Tensor, x: torch.Tensor, group_size: int, sym: bool = False,
                tokens: int = 512, rows_per_chunk: int = 256) -> torch.Tensor:
    """Clip w (N, K) in place, group by group, to the range that minimizes its groups' output
    error on the inputs x (..., K). Returns the chosen ratio r per (row, group), (N, K/G)."""
    N, K = w.shape
    G = K // group_size
    x = x.reshape(-1, K).float()
    step = max(1, x.shape[0] // tokens)
    xg = x[::step][:tokens].view(-1, G, group_size)                       # (T, G, gs)
    ratios = torch.ones(N, G, dtype=torch.float32, device=w.device)
    for r0 in range(0, N, rows_per_chunk):
        wc = w[r0:r0 + rows_per_chunk].float().view(-1, G, group_size)   # (n, G, gs)
        ref = torch.einsum("tgk,ngk->ntg", xg, wc)                        # (n, T, G)
        absmax = wc.abs().amax(-1, keepdim=True)                          # (n, G, 1)
        best_err = torch.full(wc.shape[:2], float("inf"), device=w.device)
        best_max, best_r = absmax.clone(), torch.ones_like(best_err)
        for r in CLIP_GRID:
            m = absmax * r
            q = fake_quantize(torch.maximum(torch.minimum(wc, m), -m).view(-1, K), group_size, sym)
            err = (torch.einsum("tgk,ngk->ntg", xg, q.view_as(wc)) - ref).pow(2).mean(1)  # (n, G)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better[..., None], m, best_max)
            best_r = torch.where(better, torch.full_like(best_r, r), best_r)
        clipped = torch.maximum(torch.minimum(wc, best_max), -best_max)
        w[r0:r0 + rows_per_chunk] = clipped.view(-1, K).to(w.dtype)
        ratios[r0:r0 + rows_per_chunk] = best_r
    return ratios
