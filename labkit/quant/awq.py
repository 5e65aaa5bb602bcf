"""AWQ (activation-aware weight quantization, Lin et al. 2023), layer by layer.

Rounding every weight to 4 bits hurts most where the *input* is large: an error e on weight
column c costs |x_c| * e at the output. AWQ protects those salient input channels without
keeping any weight in high precision: it multiplies column c of W by s_c > 1 (finer relative
rounding there) and divides the input by s_c, folded into the op that produces it:

    y = W x = (W diag(s)) (diag(s)^-1 x),      s_c = mean|x_c| ^ alpha  (normalized)

alpha = 0 is plain round-to-nearest (s = 1); alpha = 0.5 is the default; `search=True` tries
alpha in {0, 0.05, ..., 0.95} and keeps, per group, the one with the smallest output error of
the block the weights feed. Four groups per decoder layer (TurboMind names):

    attention_norm -> w_qkv     block: the attention sublayer          (norm weight / s)
    w_qkv's v rows -> wo        block: wo                               (v rows / s, per KV head:
                                                                         one scale serves the q heads
                                                                         of a GQA group)
    ffn_norm       -> w13       block: the MLP                          (norm weight / s)
    w13's up rows  -> w2        block: w2                               (up rows / s)

Each layer's inputs come from the unquantized previous layers (as AutoAWQ). After the scales
are folded in, every Linear of the layer is quantized (labkit/quant/int4.py); embeddings, the
final norm and the output head stay in the model dtype.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from labkit.quant.awq_clip import CLIPPED, clip_weight
from labkit.quant.int4 import fake_quantize, quantize_groups

ALPHA_GRID = [i / 20 for i in range(20)]      # 0, 0.05, ..., 0.95
LINEARS = ("attention.w_qkv", "attention.wo", "feed_forward.w13", "feed_forward.w2")


@dataclass
class AWQSettings:
    group_size: int
    sym: bool = False
    method: str = "awq"               # awq | rtn (round-to-nearest, no smoothing)
    search: bool = False              # grid search on alpha (else alpha = `alpha`)
    alpha: float = 0.5
    search_tokens: int = 2048         # tokens of the block-output loss (sequences are kept whole)
    batch: int = 8                    # calibration sequences per forward (bounds memory)
    clip: bool = False                # AutoAWQ's weight clipping after smoothing (awq_clip.py)


@dataclass
class GroupResult:
    layer: int
    group: str                        # "qkv", "o", "ffn", "down"
    alpha: float
    loss_rtn: float                   # block output MSE with alpha = 0
    loss: float                       # ... with the chosen alpha
    losses: list = field(default_factory=list)   # (alpha, loss) tried


# ---------------------------------------------------------------------------- capture
def _capture_inputs(layer, x, residual, positions, batch: int):
    """Run one decoder layer (fp) over the calibration batch. Returns the inputs of its four
    Linears (S, L, C) each, and the layer's outputs (the next layer's x, residual)."""
    seen: dict[str, list] = {n: [] for n in LINEARS}
    hooks = [layer.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: seen[n].append(args[0].detach())) for n in LINEARS]
    outs, res = [], []
    try:
        for i in range(0, x.shape[0], batch):
            sl = slice(i, i + batch)
            o, r = layer(x[sl], None if residual is None else residual[sl], positions[sl], None)
            outs.append(o)
            res.append(r)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}, torch.cat(outs), torch.cat(res)


def channel_means(x: torch.Tensor) -> torch.Tensor:
    """x (..., C) -> mean |x| per channel (C,), float32: AWQ's activation scale."""
    return x.abs().float().reshape(-1, x.shape[-1]).mean(0)


def _scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = x_mean^alpha, kept finite and normalized to geometric mean of max and min = 1."""
    s = x_mean.clamp(min=1e-4).pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return torch.nan_to_num(s, nan=1.0, posinf=1.0, neginf=1.0).clamp(min=1e-4)


@contextlib.contextmanager
def _weight(linear, w: torch.Tensor):
    """Temporarily give `linear` the weight w."""
    old = linear.weight.data
    linear.weight.data = w
    try:
        yield
    finally:
        linear.weight.data = old


# ---------------------------------------------------------------------------- one group
def _search(layer_idx: int, name: str, weights: list, x_mean, block, x_in, ref_out,
            st: AWQSettings, expand=None) -> tuple[torch.Tensor, GroupResult]:
    """Pick the scale for one group. `weights`: (linear, row slice or None) pairs whose input
    columns get multiplied by s (expand(s) maps s to the columns when they differ); `block`:
    x_in -> output, run with the candidate weights in place."""
    expand = expand or (lambda s: s)
    alphas = ALPHA_GRID if st.search else sorted({0.0, st.alpha})
    tried = []
    for a in alphas:
        s = expand(_scales(x_mean, a))                                  # (K,)
        with contextlib.ExitStack() as stack:
            for lin in weights:
                w = lin.weight.data
                w_eff = fake_quantize(w * s, st.group_size, st.sym) / s   # what 4 bits compute
                stack.enter_context(_weight(lin, w_eff.to(w.dtype)))
            out = block(x_in)
        tried.append((a, F.mse_loss(out.float(), ref_out.float()).item()))
    loss_rtn = dict(tried)[0.0]
    if st.search:
        best_a, best = min(tried, key=lambda t: t[1])
    else:
        best_a, best = st.alpha, dict(tried)[st.alpha]
    return _scales(x_mean, best_a), GroupResult(layer_idx, name, best_a, loss_rtn, best, tried)


@torch.no_grad()
def smooth_layer(i: int, layer, feats: dict, positions, st: AWQSettings) -> list[GroupResult]:
    """Search and fold AWQ scales into one layer (its function in fp is unchanged)."""
    att, mlp = layer.attention, layer.feed_forward
    n_seq = max(1, min(feats[LINEARS[0]].shape[0], st.search_tokens // feats[LINEARS[0]].shape[1]))
    sub = {k: v[:n_seq] for k, v in feats.items()}                   # (n, L, C) search subset
    pos = positions[:n_seq]
    results = []

    # attention_norm -> w_qkv; block = the attention sublayer
    h = sub["attention.w_qkv"]
    block = lambda t: att(t, pos.clone(), None)                       # noqa: E731
    s, r = _search(i, "qkv", [att.w_qkv], channel_means(feats["attention.w_qkv"]), block, h,
                   block(h), st)
    layer.attention_norm.weight.data /= s.to(layer.attention_norm.weight.dtype)
    att.w_qkv.weight.data *= s.to(att.w_qkv.weight.dtype)
    results.append(r)

    # v rows -> wo: one scale per KV channel, shared by the q heads of its GQA group
    hq, hkv, d = att.hq, att.hkv, att.d
    group = hq // hkv
    o_in = feats["attention.wo"]                                      # (S, L, hq*D)
    kv_mean = channel_means(o_in).view(hkv, group, d).mean(1).reshape(-1)   # (hkv*D,)
    to_o = lambda s_v: s_v.view(hkv, 1, d).expand(hkv, group, d).reshape(-1)  # noqa: E731
    x_o = sub["attention.wo"]
    s, r = _search(i, "o", [att.wo], kv_mean, att.wo, x_o, att.wo(x_o), st, expand=to_o)
    v_rows = slice((hq + hkv) * d, (hq + 2 * hkv) * d)
    att.w_qkv.weight.data[v_rows] /= s.to(att.w_qkv.weight.dtype)[:, None]
    if att.w_qkv.bias is not None:
        att.w_qkv.bias.data[v_rows] /= s.to(att.w_qkv.bias.dtype)
    att.wo.weight.data *= to_o(s).to(att.wo.weight.dtype)
    results.append(r)

    # ffn_norm -> w13; block = the MLP
    h2 = sub["feed_forward.w13"]
    s, r = _search(i, "ffn", [mlp.w13], channel_means(feats["feed_forward.w13"]), mlp, h2,
                   mlp(h2), st)
    layer.ffn_norm.weight.data /= s.to(layer.ffn_norm.weight.dtype)
    mlp.w13.weight.data *= s.to(mlp.w13.weight.dtype)
    results.append(r)

    # w13's up rows -> w2
    inter = mlp.w2.in_features
    x_d = sub["feed_forward.w2"]
    s, r = _search(i, "down", [mlp.w2], channel_means(feats["feed_forward.w2"]), mlp.w2, x_d,
                   mlp.w2(x_d), st)
    mlp.w13.weight.data[inter:] /= s.to(mlp.w13.weight.dtype)[:, None]
    mlp.w2.weight.data *= s.to(mlp.w2.weight.dtype)
    results.append(r)
    return results


# ---------------------------------------------------------------------------- the model
@torch.no_grad()
def quantize_model(model, calib_ids: torch.Tensor | None, st: AWQSettings, progress=True):
    """Quantize every decoder Linear of a labkit LlamaForCausalLM (tp=1, on CPU or GPU).
    The model's fp weights are changed in place (AWQ scales folded in). Returns
    ({"layers.{i}.attention.w_qkv": (q, scales, zeros), ...}, [GroupResult, ...])."""
    from tqdm.auto import tqdm

    if st.method not in ("awq", "rtn"):
        raise ValueError(f"method={st.method!r} is not allowed: method must be awq or rtn")
    if st.clip and st.method != "awq":
        raise ValueError("clip needs calibration inputs: it is allowed with method=awq only")
    quantized, results = {}, []
    layers = model.layers
    if st.method == "awq":
        if calib_ids is None:
            raise ValueError("AWQ needs calibration token ids")
        calib_ids = calib_ids.to(model.tok_embeddings.weight.device)
        x = model.tok_embeddings(calib_ids)                            # (S, L, H)
        residual = None
        positions = torch.arange(calib_ids.shape[1], device=x.device).expand_as(calib_ids)
    bar = tqdm(range(len(layers)), desc=f"{st.method} w4 g{st.group_size}", disable=not progress)
    for i in bar:
        layer = layers[i]
        if st.method == "awq":
            x_in, res_in = x, residual
            feats, x, residual = _capture_inputs(layer, x, residual, positions, st.batch)
            results += smooth_layer(i, layer, feats, positions, st)
            del feats
            if st.clip:       # the smoothed layer's own inputs (x / s), from a few sequences
                n = max(1, min(x_in.shape[0], 4096 // x_in.shape[1]))
                feats, _, _ = _capture_inputs(layer, x_in[:n], None if res_in is None else
                                              res_in[:n], positions[:n], st.batch)
                for name in CLIPPED:
                    clip_weight(layer.get_submodule(name).weight.data, feats[name],
                                st.group_size, st.sym)
                del feats
            if progress:
                bar.set_postfix(alpha=",".join(f"{r.alpha:.2f}" for r in results[-4:]))
        for name in LINEARS:
            lin = layer.get_submodule(name)
            quantized[f"layers.{i}.{name}"] = quantize_groups(lin.weight.data, st.group_size, st.sym)
    return quantized, results
