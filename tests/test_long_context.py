"""Long context: dynamic NTK RoPE (rope_scaling_factor) and logn attention (use_logn_attn).

References: float64 formulas written here from the papers/blog posts, HF transformers' own
"dynamic" rotary embedding, and HF's Llama decoding with a logn-scaled attention function
(Qwen's formula) on the same weights. A tiny Llama with max_position_embeddings = 48 lets the
engine run far past its trained length in milliseconds.
"""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from labkit import EngineConfig, GenerationConfig
from labkit.engine.engine import LLMEngine
from labkit.layers.attention import logn_table
from labkit.layers.rotary import RotaryEmbedding

TRAINED = 48      # the tiny test model's max_position_embeddings


def ntk_angles_f64(p: int, d: int, base: float, trained: int, factor: float, length: int) -> torch.Tensor:
    """(D,) float64: dynamic NTK angles of position p in a sequence of `length` tokens."""
    s = max(length, trained)
    b = base * ((factor * s / trained) - (factor - 1)) ** (d / (d - 2)) if factor >= 1 else base
    inv = torch.tensor([b ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    return torch.cat([p * inv, p * inv])


@pytest.mark.parametrize("factor", [1.0, 2.0, 4.0])
def test_rope_tables_equal_float64_formula(factor):
    """The shared tables use the model's base; per-token tables the base of each token's
    sequence length (rope length 0: the model's base)."""
    d, base, P, T = 64, 100000.0, 4096, 512
    rope = RotaryEmbedding(d, base, P, factor, trained_len=T)
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    pos = torch.randint(0, P, (24,), generator=g).tolist() + [0, T - 1, T, P - 1]
    for p in pos:
        ang = ntk_angles_f64(p, d, base, T, 0.0, 0)
        assert torch.allclose(rope.cos[p].double(), ang.cos(), atol=1e-6), p
        assert torch.allclose(rope.sin[p].double(), ang.sin(), atol=1e-6), p
    lens = [rope.rope_length(n) for n in torch.randint(T + 1, 4 * P, (len(pos),), generator=g).tolist()]
    lens[:3] = [0, 0, rope.rope_length(T)]                       # not longer than T: the base
    cos, sin = rope.tables_for(torch.tensor(pos), torch.tensor(lens, dtype=torch.int32))
    for n, (p, s) in enumerate(zip(pos, lens)):
        ang = ntk_angles_f64(p, d, base, T, factor if s else 0.0, s)
        assert torch.allclose(cos[n].double(), ang.cos(), atol=1e-6), (p, s)
        assert torch.allclose(sin[n].double(), ang.sin(), atol=1e-6), (p, s)


@pytest.mark.parametrize("length", [40, 64, 100, 257])
def test_per_sequence_tables_equal_hf_dynamic_rope_over_the_whole_text(length):
    """HF's LlamaRotaryEmbedding(rope_type="dynamic") in one forward pass over `length`
    positions gives the rows our per-token tables give a sequence of that rope length."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    d, T, factor = 32, 64, 3.0
    cfg = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, head_dim=d, max_position_embeddings=T,
                      rope_parameters={"rope_type": "dynamic", "factor": factor, "rope_theta": 10000.0})
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, 1, d), torch.arange(length)[None])  # (1, L, D)
    ours = RotaryEmbedding(d, 10000.0, 4 * T, factor, trained_len=T)
    pos = torch.arange(length)
    cos, sin = ours.tables_for(pos, torch.full((length,), ours.rope_length(length), dtype=torch.int32))
    assert torch.allclose(hf_cos[0], cos, atol=2e-5) and torch.allclose(hf_sin[0], sin, atol=2e-5)
    plain = RotaryEmbedding(d, 10000.0, 8 * T)
    assert torch.allclose(cos, plain.cos[:length], atol=1e-6) == (length <= T)


def test_logn_table_is_qwens():
    T, P = 100, 400
    table = logn_table(P, T)
    expected = [math.log(n, T) if n > T else 1.0 for n in range(1, P + 1)]   # Qwen's logn_list
    assert torch.allclose(table.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def short_model(tmp_path_factory):
    """The tiny HF Llama, told it was trained on 48 positions (config.json edited)."""
    from labkit.models.bundled import tiny_model_dir
    out = tmp_path_factory.mktemp("short") / "tiny-llama-48"
    shutil.copytree(tiny_model_dir(), out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = TRAINED
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _hf_model(path, factor: float, logn: bool):
    """HF transformers in float64 with its dynamic rope and/or a logn-scaled SDPA."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def logn_sdpa(module, query, key, value, attention_mask, **kw):   # query (B, H, Lq, D)
        lq, lk = query.shape[-2], key.shape[-2]
        n_pos = torch.arange(lk - lq, lk, dtype=torch.float64) + 1      # 1-based positions
        scale = torch.where(n_pos > TRAINED, n_pos.log() / math.log(TRAINED), torch.ones_like(n_pos))
        return sdpa_attention_forward(module, query * scale.to(query.dtype)[:, None], key, value,
                                      attention_mask, **kw)

    AttentionInterface.register("labkit_logn_sdpa", logn_sdpa)
    kw = {"attn_implementation": "labkit_logn_sdpa" if logn else "sdpa"}
    if factor:
        kw["rope_parameters"] = {"rope_type": "dynamic", "factor": factor, "rope_theta": 10000.0}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float64, **kw).eval()


@pytest.fixture(scope="module")
def decode_case(short_model):
    """A fresh random prompt shorter than T, to be decoded to 3 x T; HF's plain-RoPE greedy tokens."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    prompt = torch.randint(3, 49152, (TRAINED - 8,), generator=g).tolist()
    n = 2 * TRAINED + 8
    out = _hf_model(short_model, 0.0, False).generate(torch.tensor([prompt]), max_new_tokens=n,
                                                      min_new_tokens=n, do_sample=False, pad_token_id=2)
    return prompt, n, out[0, len(prompt):].tolist()


@pytest.mark.parametrize("factor,logn", [(4.0, False), (0.0, True), (2.0, True)])
def test_engine_decodes_past_trained_length_like_hf(short_model, decode_case, factor, logn):
    """The paged engine (fp32) decodes a prompt to 3 x T; its sequence is rotated with the base
    of its full length (prompt + max_new_tokens). HF (fp64, its dynamic rope; logn through a
    scaled attention function) reading the same text in one forward pass, which gives every
    position the base of the whole length, predicts each of those tokens; and they differ from
    plain RoPE's, so the knobs are really in effect."""
    prompt, n, plain = decode_case
    engine = LLMEngine(short_model, EngineConfig(dtype="float32", rope_scaling_factor=factor, use_logn_attn=logn,
                                                 session_len=4 * TRAINED, cache_block_seq_len=16,
                                                 cache_max_entry_count=32, max_batch_size=2))
    ours, = engine.generate([prompt], GenerationConfig(max_new_tokens=n, ignore_eos=True))
    assert len(ours.token_ids) == n
    text = torch.tensor([prompt + ours.token_ids])                     # (1, P + n)
    with torch.no_grad():
        logits = _hf_model(short_model, factor, logn)(text).logits[0]   # (P + n, V)
    hf_next = logits[len(prompt) - 1:-1].argmax(-1).tolist()           # what HF predicts at each step
    assert hf_next == ours.token_ids
    assert ours.token_ids != plain


def test_knobs_keep_prefix_cache_and_chunked_prefill_exact(short_model):
    """One base per sequence: a long prompt computed in chunks, or served from another
    request's prefix-cache blocks (same rope length), gives the same tokens; a request whose
    rope length differs never reads blocks rotated with another base."""
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    prompt = torch.randint(3, 49152, (3 * TRAINED,), generator=g).tolist()
    gc = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    common = dict(rope_scaling_factor=2.0, use_logn_attn=True, session_len=4 * TRAINED,
                  cache_block_seq_len=16, cache_max_entry_count=64, max_batch_size=2)
    whole = LLMEngine(short_model, EngineConfig(**common, enable_prefix_caching=False))
    chunked = LLMEngine(short_model, EngineConfig(**common, max_prefill_token_num=32))
    a, = whole.generate([prompt], gc)
    b, = chunked.generate([prompt], gc)                       # 5 prefill chunks of 32 tokens
    c, = chunked.generate([prompt], gc)                       # the prompt from the prefix cache
    assert c.num_prefix_hit_tokens == (len(prompt) - 1) // 16 * 16
    assert a.token_ids == b.token_ids == c.token_ids
    d, = chunked.generate([prompt], GenerationConfig(max_new_tokens=20, ignore_eos=True))
    assert d.num_prefix_hit_tokens == 0                      # another length, another base
