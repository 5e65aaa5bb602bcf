"""Quality of 4-bit weights: perplexity on the pydoc corpus, measured by HF transformers on
the very weights the int4 model computes with (codes dequantized back to float: "fake quant").

    ppl = exp(mean over predicted tokens of -log p(token | prefix))

    hf_fp_model("smollm2-135m")             the unquantized model (HF transformers, float32)
    hf_model_from_awq("./quant_output")     the AWQ folder's weights, dequantized, in HF
    perplexity(model, windows)              windows (C, L) -> ppl over C*(L-1) predictions

Windows: labkit.quant.awq_data.eval_windows (the first 16 x 1024 corpus tokens, which
calibration never sees). `labkit eval ppl` measures the engine itself; this module is the
independent check the AWQ lesson compares with.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from labkit.quant.int4 import dequantize_groups, from_awq_tensors


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, progress: bool = False) -> float:
    """model(ids (1, L)) -> logits (1, L, V) (HF: .logits); windows (C, L) int64."""
    from tqdm.auto import tqdm
    nll, count = 0.0, 0
    for w in tqdm(windows, desc="perplexity", disable=not progress):
        out = model(w[None])
        logits = getattr(out, "logits", out)[0, :-1].float()           # (L-1, V)
        nll += F.cross_entropy(logits, w[1:], reduction="sum").item()
        count += w.numel() - 1
    return math.exp(nll / count)


def _hf_model(config: dict, state: dict):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config.update(torch_dtype="float32", dtype="float32")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"weight {missing[0]} is missing")
    model.model.rotary_emb.__init__(model.config)           # rebuild RoPE buffers off meta
    return model.float().eval()


def hf_fp_model(model="smollm2-135m"):
    """HF transformers' LlamaForCausalLM with the unquantized weights of `model`."""
    from labkit.models.loader import load, to_hf
    from labkit.quant.awq_io import hf_config_for
    cfg, tm = load(model, dtype=torch.float32)
    return _hf_model(hf_config_for(cfg), to_hf(cfg, tm))


def hf_model_from_awq(path):
    """HF transformers' LlamaForCausalLM computing with an AWQ folder's dequantized weights."""
    from safetensors.torch import load_file
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    raw = {}
    for f in sorted(path.glob("*.safetensors")):
        raw.update(load_file(str(f)))
    state = {k: v.float() for k, v in raw.items() if not k.endswith(("qweight", "qzeros", "scales"))}
    for name in [k[:-len(".qweight")] for k in raw if k.endswith(".qweight")]:
        q, s, z = from_awq_tensors(raw[name + ".qweight"], raw[name + ".qzeros"], raw[name + ".scales"])
        state[name + ".weight"] = dequantize_groups(q, s, z)                # (N, K) float32
    return _hf_model(config, state)
