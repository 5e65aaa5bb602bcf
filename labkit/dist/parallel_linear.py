"""Column- and row-parallel Linear layers, and the two patterns a transformer layer is built of.

A Linear y = x W^T with W of shape (out, in) splits across tp ranks in two ways:

    column parallel   rank r holds rows r of W (out/tp of the OUTPUT features):
                      y_r = x W_r^T is a slice of y           -> all-gather, concatenate
    row parallel      rank r holds columns r of W (in/tp of the INPUT features) and the
                      matching slice x_r of the input:
                      y = sum_r x_r W_r^T                     -> all-reduce (sum)

Megatron-LM's observation: put a column-parallel layer first and a row-parallel one second,
and the slice the first one leaves on each rank is exactly the input slice the second one
needs, so nothing moves in between:

    MLP        w1, w3 column -> silu(g) * u stays local -> w2 row       one all-reduce
    attention  w_q, w_k, w_v column (whole heads per rank) -> attention
               of those heads stays local -> w_o row                    one all-reduce

labkit/models/llama.py is built this way. The functions below run inside a process group
(labkit.dist.ranks.run_ranks or torchrun) and `check_patterns` compares each against the
unsplit layer on fresh random inputs.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from labkit.dist.comm import count_collectives


def shard_rows(w: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Column-parallel shard: this rank's out/tp output rows of W (out, in) (or of a bias)."""
    return w.chunk(world, 0)[rank].contiguous()


def shard_cols(w: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Row-parallel shard: this rank's in/tp input columns of W (out, in) (or of x (..., in))."""
    return w.chunk(world, -1)[rank].contiguous()


# ---------------------------------------------------------------------------- the layers
def column_parallel_linear(x: torch.Tensor, w_rows: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """x (..., in) replicated, w_rows (out/tp, in) -> y (..., out) (or this rank's (..., out/tp))."""
    y = F.linear(x, w_rows)                                           # (..., out/tp)
    if not gather:
        return y
    parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, y.contiguous())
    return torch.cat(parts, -1)                                       # (..., out)


def row_parallel_linear(x_cols: torch.Tensor, w_cols: torch.Tensor) -> torch.Tensor:
    """x_cols (..., in/tp), w_cols (out, in/tp) -> y (..., out), summed over ranks."""
    y = F.linear(x_cols, w_cols)                                      # (..., out) partial sum
    dist.all_reduce(y)                                                # sum over ranks
    return y


def mlp(x, w1, w3, w2):
    """SwiGLU MLP, unsplit: x (..., H), w1/w3 (I, H), w2 (H, I) -> (..., H)."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def mlp_tensor_parallel(x, w1_rows, w3_rows, w2_cols):
    """The same MLP on one rank: shards (I/tp, H), (I/tp, H), (H, I/tp); one all-reduce."""
    h = F.silu(column_parallel_linear(x, w1_rows, gather=False)) \
        * column_parallel_linear(x, w3_rows, gather=False)           # (..., I/tp) stays here
    return row_parallel_linear(h, w2_cols)                            # (..., H)


def attention_heads(x, wq, wk, wv, head_dim: int):
    """Causal GQA self-attention up to (not including) the output projection:
    x (B, L, H); wq (Hq*D, H), wk/wv (Hkv*D, H) -> (B, L, Hq*D). Works on any whole number of
    heads, so it is also what each rank runs on its own heads."""
    b, l, _ = x.shape
    q = F.linear(x, wq).view(b, l, -1, head_dim).transpose(1, 2)      # (B, Hq, L, D)
    k = F.linear(x, wk).view(b, l, -1, head_dim).transpose(1, 2)      # (B, Hkv, L, D)
    v = F.linear(x, wv).view(b, l, -1, head_dim).transpose(1, 2)      # (B, Hkv, L, D)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (B, Hq, L, D)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)       # (B, Hq, L, D)
    return o.transpose(1, 2).reshape(b, l, -1)                        # (B, L, Hq*D)


def attention(x, wq, wk, wv, wo, head_dim: int):
    """The unsplit attention block: wo (H, Hq*D) -> (B, L, H)."""
    return F.linear(attention_heads(x, wq, wk, wv, head_dim), wo)


def attention_tensor_parallel(x, wq_rows, wk_rows, wv_rows, wo_cols, head_dim: int):
    """Heads split across ranks: shards (Hq/tp*D, H), (Hkv/tp*D, H) x2, (H, Hq/tp*D)."""
    o = attention_heads(x, wq_rows, wk_rows, wv_rows, head_dim)       # (B, L, Hq/tp*D) local
    return row_parallel_linear(o, wo_cols)                            # (B, L, H)


# ---------------------------------------------------------------------------- the check
def _weight(out_f: int, in_f: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=g) / in_f ** 0.5        # outputs of size ~1


def check_patterns(rank: int, world: int, seed: int, hidden: int = 96, tokens: int = 5) -> dict:
    """Run the four patterns on this rank and compare each with the unsplit layer (same dtype,
    float32) and with float64. Every rank draws the same full weights from `seed` and keeps
    its shard. Returns {pattern: {max_err_fp32, max_err_fp64, collectives, payload_bytes}}."""
    g = torch.Generator().manual_seed(seed)
    d, hq, hkv = 16, 4 * world, 2 * world                  # sizes tp divides, GQA 2:1
    inter, out_f = 64 * world, 48 * world
    x = torch.randn(2, tokens, hidden, generator=g)                   # (B, L, H)
    w_col, w_row = _weight(out_f, hidden, g), _weight(hidden, out_f, g)
    w1, w3, w2 = _weight(inter, hidden, g), _weight(inter, hidden, g), _weight(hidden, inter, g)
    wq, wk, wv = (_weight(h * d, hidden, g) for h in (hq, hkv, hkv))
    wo = _weight(hidden, hq * d, g)
    rows, cols = (lambda w: shard_rows(w, rank, world)), (lambda w: shard_cols(w, rank, world))
    x_in = torch.randn(2, tokens, out_f, generator=g)                 # input of the row layer
    cases = {
        "column": (lambda: column_parallel_linear(x, rows(w_col)),
                   lambda f: F.linear(f(x), f(w_col))),
        "row": (lambda: row_parallel_linear(cols(x_in), cols(w_row)),
                lambda f: F.linear(f(x_in), f(w_row))),
        "mlp": (lambda: mlp_tensor_parallel(x, rows(w1), rows(w3), cols(w2)),
                lambda f: mlp(f(x), f(w1), f(w3), f(w2))),
        "attention": (lambda: attention_tensor_parallel(x, rows(wq), rows(wk), rows(wv), cols(wo), d),
                      lambda f: attention(f(x), f(wq), f(wk), f(wv), f(wo), d)),
    }
    out = {}
    for name, (split, unsplit) in cases.items():
        with count_collectives() as c:
            y = split()
        ref32 = unsplit(lambda t: t)
        ref64 = unsplit(lambda t: t.double())
        out[name] = {"max_err_fp32": (y - ref32).abs().max().item(),
                     "max_err_fp64": (y.double() - ref64).abs().max().item(),
                     "shape": list(y.shape), "collectives": [op for op, _ in c.calls],
                     "payload_bytes": c.payload_bytes}
    return out
