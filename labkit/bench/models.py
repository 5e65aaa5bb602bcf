"""Which model a benchmark runs, and HF transformers' own model on the very same weights.

    --load-format auto   the positional MODEL (alias, workspace, HF dir, .gguf)
    --load-format dummy  random weights in a real shape (--model-shape), made on the device
                         like vLLM's `--load-format dummy`; the bundled tokenizer for text

The HF peer is always built from the tensors the engine loads (labkit.models.loader), renamed
back to HF's names, so both sides compute the same function.
"""
from __future__ import annotations

import torch

from labkit.models import dummy


def model_source(args) -> str:
    """What to hand to LLMEngine: the model argument or `dummy:SHAPE`."""
    return dummy.dummy_name(args.model_shape) if args.load_format == "dummy" else args.model


def hf_model(model, cfg, dtype: torch.dtype, device: torch.device):
    """HF LlamaForCausalLM on the same weights as labkit's engine for `model`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from labkit.models.loader import load, to_hf
    _, tm = load(model, dtype=dtype, device=device)
    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                     num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                     head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
                     rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_position_embeddings,
                     tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=cfg.attn_bias,
                     bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    with torch.device("meta"):
        m = LlamaForCausalLM(hc)
    m = m.to_empty(device=device).to(dtype)
    state = {k: v.to(device=device, dtype=dtype) for k, v in to_hf(cfg, tm).items()}
    missing, unexpected = m.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    with torch.device(device):                 # inv_freq was left on meta by to_empty: rebuild
        m.model.rotary_emb = type(m.model.rotary_emb)(hc)
    del tm, state
    return m.eval()
