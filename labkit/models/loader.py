"""Where a model's weights come from, for one tensor-parallel rank.

    inspect_model(model) -> ModelInfo          shape, inference knobs, tokenizer (no weights)
    load(model, rank, tp) -> (cfg, tensors)    this rank's TurboMind-named tensors
    load_weights(module, tensors)              copy them into a LlamaForCausalLM

`model` is any of: a workspace made by `labkit convert`, the alias `smollm2-135m`, an HF
directory, a .gguf file (the last three are converted online, as TurboMind does), or
`dummy:SHAPE` (random weights in a real model's shape, made on the device; labkit.models.dummy).

Tensor names per rank (PyTorch layout, (out_features, in_features)):
    tok_embeddings.weight (V, H) replicated       norm.weight (H,) replicated
    output.weight (V/tp, H) column-split, absent when tied to tok_embeddings
    layers.{i}.attention_norm.weight, layers.{i}.ffn_norm.weight (H,) replicated
    layers.{i}.attention.w_qkv.weight ((Hq+2Hkv)/tp*D, H) column-split, rows [q_r | k_r | v_r]
    layers.{i}.attention.wo.weight (H, Hq/tp*D) row-split
    layers.{i}.feed_forward.w1.weight (gate), w3.weight (up) (I/tp, H) column-split
    layers.{i}.feed_forward.w2.weight (down) (H, I/tp) row-split
The model fuses w1 and w3 into one `feed_forward.w13` projection when it loads them.

Int4 workspaces (weight_type int4, from an AWQ folder) hold each decoder Linear as three
tensors instead of `.weight`: `.qweight` (out, in/2) uint8, `.scales` and `.zeros`
(out, in/G) (layout: kernels/w4a16.py); they split across ranks like the weight they replace.

A workspace's K smoothing factors (`labkit lite k_smooth`, labkit/quant/k_smooth.py) are
folded into w_qkv here, on every load.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from labkit.config import ConfigError, ModelConfig
from labkit.models import bundled, dummy
from labkit.models.sources import SourceError, detect_format, read_source
from labkit.workspace_ini import read_config_ini


# ---------------------------------------------------------------------------- where from
@dataclass
class ModelInfo:
    """What an engine needs to know about a model before loading weights."""
    config: ModelConfig
    inference: dict            # config.ini's inference fields ({} for online conversion)
    tokenizer_dir: Path
    workspace: Path | None     # None: online conversion from `source` (or dummy weights)
    source: Path | None
    stored_tp: int = 1
    weight_type: str = "fp32"
    is_dummy: bool = False


def weights_dir(workspace: Path) -> Path:
    return Path(workspace) / "triton_models" / "weights"


def is_workspace(path) -> bool:
    return not dummy.is_dummy(path) and (weights_dir(Path(path)) / "config.ini").is_file()


def source_path(model) -> Path:
    return bundled.resolve_alias(model) if bundled.is_alias(model) else Path(model)


def inspect_model(model) -> ModelInfo:
    """Describe a workspace, an alias, an HF directory, a .gguf or a dummy shape (reads no
    weights; an online source is read once to learn its shape)."""
    if dummy.is_dummy(model):
        return ModelInfo(dummy.shape_config(model), {}, bundled.bundled_tokenizer_dir(), None,
                         None, is_dummy=True,
                         weight_type="random int4" if dummy.int4_group(model) else "random")
    if is_workspace(model):
        ws = Path(model)
        cfg, storage, inference = read_config_ini(weights_dir(ws))
        return ModelInfo(cfg, inference, ws / "triton_models" / "tokenizer", ws, None,
                         storage["tensor_para_size"], storage["weight_type"])
    src = source_path(model)
    fmt = detect_format(src)
    cfg = _read_config_only(src, fmt)
    if bundled.is_alias(model):
        import dataclasses
        cfg = dataclasses.replace(cfg, model_name=bundled.BUNDLED_MODEL_NAME)
    return ModelInfo(cfg, {}, tokenizer_dir_for(src, fmt), None, src,
                     weight_type="int4" if fmt == "awq" else "fp32")


def _read_config_only(src: Path, fmt: str) -> ModelConfig:
    if fmt in ("hf", "awq"):
        import json
        from labkit.models.sources import model_config_from_hf
        cfg_file = src / "config.json"
        if not cfg_file.is_file():
            raise SourceError(f"{src}: no config.json; not an HF model directory or a workspace")
        return model_config_from_hf(json.loads(cfg_file.read_text()), name=src.name)
    from labkit.models.sources import read_gguf
    return read_gguf(src, config_only=True)[0]   # metadata only: the weights load later


def tokenizer_dir_for(src: Path, fmt: str) -> Path:
    """An HF tokenizer folder for a source model (the GGUF tokenizer is extracted once)."""
    if fmt in ("hf", "awq"):
        return src
    if src.resolve() == bundled.bundled_gguf_path().resolve():
        return bundled.bundled_tokenizer_dir()
    from transformers import AutoTokenizer
    out = bundled.cache_dir() / f"tokenizer-{src.stem}"
    if not (out / "tokenizer.json").is_file():
        AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(str(out))
    return out


# ---------------------------------------------------------------------------- HF <-> TurboMind
def to_turbomind(cfg: ModelConfig, hf: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """Rename and fuse HF Llama tensors into TurboMind names (tp=1, w_qkv = [q | k | v])."""
    def get(name):
        if name not in hf:
            raise SourceError(f"weight {name!r} is missing from the checkpoint")
        return hf[name].to(dtype)

    out = {"tok_embeddings.weight": get("model.embed_tokens.weight"),   # (V, H)
           "norm.weight": get("model.norm.weight")}                     # (H,)
    if not cfg.tie_word_embeddings:
        out["output.weight"] = get("lm_head.weight")                    # (V, H)
    for i in range(cfg.num_layers):
        p, a = f"model.layers.{i}.", f"layers.{i}."
        out[a + "attention_norm.weight"] = get(p + "input_layernorm.weight")
        out[a + "ffn_norm.weight"] = get(p + "post_attention_layernorm.weight")
        out[a + "attention.w_qkv.weight"] = torch.cat(                   # ((Hq+2Hkv)*D, H)
            [get(p + f"self_attn.{x}_proj.weight") for x in "qkv"], 0)
        if cfg.attn_bias:
            out[a + "attention.w_qkv.bias"] = torch.cat(
                [get(p + f"self_attn.{x}_proj.bias") for x in "qkv"], 0)
        out[a + "attention.wo.weight"] = get(p + "self_attn.o_proj.weight")  # (H, Hq*D)
        out[a + "feed_forward.w1.weight"] = get(p + "mlp.gate_proj.weight")  # (I, H)
        out[a + "feed_forward.w3.weight"] = get(p + "mlp.up_proj.weight")    # (I, H)
        out[a + "feed_forward.w2.weight"] = get(p + "mlp.down_proj.weight")  # (H, I)
    return out


def to_hf(cfg: ModelConfig, tm: dict[str, torch.Tensor]) -> dict:
    """The inverse of `to_turbomind` (tp=1): HF transformers' names, q/k/v split apart. Lets HF
    run on the very same tensors, e.g. dummy weights for a benchmark peer."""
    out = {"model.embed_tokens.weight": tm["tok_embeddings.weight"],
           "model.norm.weight": tm["norm.weight"]}
    out["lm_head.weight"] = tm.get("output.weight", tm["tok_embeddings.weight"])
    for i in range(cfg.num_layers):
        p, a = f"model.layers.{i}.", f"layers.{i}."
        out[p + "input_layernorm.weight"] = tm[a + "attention_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = tm[a + "ffn_norm.weight"]
        for x, t in zip("qkv", tm[a + "attention.w_qkv.weight"].split(
                [cfg.q_size, cfg.kv_size, cfg.kv_size], 0)):
            out[p + f"self_attn.{x}_proj.weight"] = t
        out[p + "self_attn.o_proj.weight"] = tm[a + "attention.wo.weight"]
        out[p + "mlp.gate_proj.weight"] = tm[a + "feed_forward.w1.weight"]
        out[p + "mlp.up_proj.weight"] = tm[a + "feed_forward.w3.weight"]
        out[p + "mlp.down_proj.weight"] = tm[a + "feed_forward.w2.weight"]
    return out


def shard(cfg: ModelConfig, full: dict[str, torch.Tensor], rank: int, tp: int) -> dict:
    """Rank `rank`'s slice of tp=1 TurboMind tensors: column-parallel weights split their
    output rows, row-parallel ones their input columns, the rest is replicated."""
    cfg.check_tp(tp)
    if not 0 <= rank < tp:
        raise ConfigError(f"rank={rank} is not allowed: rank must be in [0, {tp - 1}]")
    if tp == 1:
        return dict(full)
    q, kv = cfg.q_size, cfg.kv_size

    def rows(t, n):      # this rank's n-row slice along dim 0
        return t.narrow(0, rank * n, n)

    out = {}
    for name, t in full.items():
        module = name.rpartition(".")[0]       # int4 Linears: .qweight/.scales/.zeros split alike
        if module.endswith("w_qkv"):
            tq, tk, tv = t.split([q, kv, kv], 0)
            out[name] = torch.cat([rows(tq, q // tp), rows(tk, kv // tp), rows(tv, kv // tp)], 0)
        elif module.endswith(("w1", "w3")) or module == "output":
            out[name] = rows(t, t.shape[0] // tp)
        elif module.endswith(("wo", "w2")):
            if t.shape[1] % tp:
                raise ConfigError(f"tp={tp} is not allowed for this workspace: {name} has "
                                  f"{t.shape[1]} columns (int4 groups), not divisible by {tp}")
            n = t.shape[1] // tp
            out[name] = t.narrow(1, rank * n, n)
        else:
            out[name] = t
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------- load
def load(path, rank: int = 0, tp: int = 1, dtype: torch.dtype | None = None,
         device="cpu"):
    """(ModelConfig, this rank's TurboMind tensors) from a workspace, the alias, an HF dir, a
    .gguf or a dummy shape. A workspace converted with tp=1 is sliced here for any tp
    (TurboMind's runtime TP). Dummy weights are made on `device`; the others load on CPU."""
    if dummy.is_dummy(path):
        cfg = dummy.shape_config(path)
        cfg.check_tp(tp)
        full = dummy.dummy_tensors(cfg, dtype or torch.float32, device,
                                   int4_group_size=dummy.int4_group(path))
        return cfg, shard(cfg, full, rank, tp)
    if is_workspace(path):
        from safetensors.torch import load_file
        info = inspect_model(path)
        cfg, stored = info.config, info.stored_tp
        cfg.check_tp(tp)
        wdir = weights_dir(Path(path))
        if stored == tp:
            tensors = load_file(str(wdir / f"rank{rank}.safetensors"))
        elif stored == 1:
            tensors = shard(cfg, load_file(str(wdir / "rank0.safetensors")), rank, tp)
        else:
            raise ConfigError(f"tp={tp} is not allowed for this workspace: it was converted with "
                              f"tensor_para_size={stored}; use tp={stored}, or convert with --tp 1 "
                              f"to choose tp at load time")
        from labkit.quant.k_smooth import fold_k_smooth, read_k_smooth
        smooth = read_k_smooth(wdir, cfg)          # `labkit lite k_smooth`: folded in here
        if smooth is not None:
            tensors = fold_k_smooth(cfg, tensors, smooth[0], rank, tp)
    elif detect_format(source_path(path)) == "awq":   # an AWQ folder, converted online
        from labkit.quant.awq_io import read_awq_dir
        cfg, full, _ = read_awq_dir(path, dtype or torch.float32)
        tensors = shard(cfg, full, rank, tp)
    else:
        src = source_path(path)
        cfg, hf = read_source(src, detect_format(src))
        if bundled.is_alias(path):
            import dataclasses
            cfg = dataclasses.replace(cfg, model_name=bundled.BUNDLED_MODEL_NAME)
        tensors = shard(cfg, to_turbomind(cfg, hf, dtype or torch.float32), rank, tp)
    if dtype is not None:       # int4 codes and zero points keep their integer type
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return cfg, tensors


def int4_group_size(tensors: dict[str, torch.Tensor]) -> int:
    """The group size of int4 tensors (0 when the Linears are dense)."""
    qw, sc = tensors.get("layers.0.attention.wo.qweight"), tensors.get("layers.0.attention.wo.scales")
    return 0 if qw is None else qw.shape[1] * 2 // sc.shape[1]


FUSED = {f"feed_forward.w13.{t}": (f"feed_forward.w1.{t}", f"feed_forward.w3.{t}")
         for t in ("weight", "qweight", "scales", "zeros")}


@torch.no_grad()
def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy TurboMind-named tensors into the parameters of the same names (the model's module
    tree mirrors TurboMind's names); w13 is the concatenation [w1 | w3]. Every parameter must
    be found, with its exact shape."""
    for name, param in model.named_parameters():
        layer, _, leaf = name.partition(".feed_forward.") if ".feed_forward." in name else ("", "", "")
        if leaf and "feed_forward." + leaf in FUSED:
            parts = [tensors[f"{layer}.{p}"] for p in FUSED["feed_forward." + leaf]]
            src = torch.cat(parts, 0)
        elif name in tensors:
            src = tensors[name]
        else:
            raise ValueError(f"weight {name!r} is missing from the checkpoint")
        if param.shape != src.shape:
            raise ValueError(f"weight {name}: shape {tuple(src.shape)} does not fit the model's "
                             f"{tuple(param.shape)} (wrong tp or config?)")
        param.copy_(src)
