"""The Llama family (Llama 2/3, SmolLM2, ...) built from TurboMind-named tensors.

    x = embed(ids)
    for each layer:  x = x + wo(attn(rope(w_qkv(norm(x)))))      # attention block
                     x = x + w2(silu(w1(norm(x))) * w3(norm(x)))  # SwiGLU MLP
    logits = output(norm(x))                                      # output = embed when tied

Tensor parallel (Megatron style): w_qkv and w1/w3 are column-parallel (each rank holds some
heads / some MLP channels), wo and w2 are row-parallel (each rank holds the matching input
columns and the partial sums are all-reduced), the vocabulary of the output head is split and
the logits all-gathered. With tp=1 there is no communication at all.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labkit.config import ModelConfig
from labkit.layers.attention import Attention, AttentionMetadata
from labkit.layers.norm import RMSNorm
from labkit.layers.rotary import RotaryEmbedding, apply_rotary


def _all_reduce(x: torch.Tensor, tp: int) -> torch.Tensor:
    if tp > 1:
        import torch.distributed as dist
        dist.all_reduce(x)
    return x


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int):
        super().__init__()
        self.tp = tp
        self.hq, self.hkv, self.d = cfg.num_heads // tp, cfg.num_kv_heads // tp, cfg.head_dim
        h, inter = cfg.hidden_size, cfg.intermediate_size // tp
        self.attention_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.w_qkv = nn.Parameter(torch.empty((self.hq + 2 * self.hkv) * self.d, h))
        self.b_qkv = nn.Parameter(torch.zeros((self.hq + 2 * self.hkv) * self.d)) if cfg.attn_bias else None
        self.wo = nn.Parameter(torch.empty(h, self.hq * self.d))
        self.w13 = nn.Parameter(torch.empty(2 * inter, h))     # [gate | up], fused at load
        self.w2 = nn.Parameter(torch.empty(h, inter))
        self.attn = Attention(self.hq, self.hkv, self.d)

    def forward(self, x, cos, sin, md: AttentionMetadata | None):
        lead = x.shape[:-1]                                          # (N,) or (B, L)
        qkv = F.linear(self.attention_norm(x), self.w_qkv, self.b_qkv)  # (..., (hq+2hkv)*D)
        qkv = qkv.view(*lead, self.hq + 2 * self.hkv, self.d)        # (..., hq+2hkv, D)
        # q and k heads are rotated together (one RoPE pass), v is left as it is
        qk = apply_rotary(qkv[..., :self.hq + self.hkv, :], cos, sin)  # (..., hq+hkv, D)
        q, k = qk.split([self.hq, self.hkv], -2)                     # (..., hq, D), (..., hkv, D)
        v = qkv[..., self.hq + self.hkv:, :]                         # (..., hkv, D)
        o = self.attn(q, k, v, md).reshape(*lead, self.hq * self.d)  # (..., hq*D)
        x = x + _all_reduce(F.linear(o, self.wo), self.tp)           # (..., H)
        gate, up = F.linear(self.ffn_norm(x), self.w13).chunk(2, -1)  # (..., I/tp) each
        return x + _all_reduce(F.linear(F.silu(gate) * up, self.w2), self.tp)  # (..., H)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int = 1, rank: int = 0, max_positions: int | None = None):
        super().__init__()
        cfg.check_tp(tp)
        self.cfg, self.tp, self.rank = cfg, tp, rank
        self.tok_embeddings = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(LlamaLayer(cfg, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = None if cfg.tie_word_embeddings else nn.Parameter(
            torch.empty(cfg.vocab_size // tp, cfg.hidden_size))
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta,
                                    max_positions or cfg.max_position_embeddings)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def load_turbomind(self, tensors: dict[str, torch.Tensor]) -> "LlamaForCausalLM":
        """Copy one rank's TurboMind tensors (see labkit.convert) into the parameters."""
        def put(param, name):
            t = tensors[name]
            if param.shape != t.shape:
                raise ValueError(f"weight {name}: shape {tuple(t.shape)} does not fit the model's "
                                 f"{tuple(param.shape)} (wrong tp or config?)")
            param.copy_(t)

        put(self.tok_embeddings, "tok_embeddings.weight")
        put(self.norm.weight, "norm.weight")
        if self.output is not None:
            put(self.output, "output.weight")
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            put(layer.attention_norm.weight, p + "attention_norm.weight")
            put(layer.ffn_norm.weight, p + "ffn_norm.weight")
            put(layer.w_qkv, p + "attention.w_qkv.weight")
            if layer.b_qkv is not None:
                put(layer.b_qkv, p + "attention.w_qkv.bias")
            put(layer.wo, p + "attention.wo.weight")
            layer.w13.copy_(torch.cat([tensors[p + "feed_forward.w1.weight"],
                                       tensors[p + "feed_forward.w3.weight"]], 0))
            put(layer.w2, p + "feed_forward.w2.weight")
        return self

    @classmethod
    def from_pretrained(cls, path, rank: int = 0, tp: int = 1, dtype=torch.float32,
                        device="cpu", max_positions: int | None = None) -> "LlamaForCausalLM":
        """Build from a workspace, the alias, an HF directory or a .gguf (see labkit.convert.load)."""
        from labkit.convert import load
        cfg, tensors = load(path, rank=rank, tp=tp)
        with torch.device("meta"):
            model = cls(cfg, tp, rank, max_positions)
        model = model.to_empty(device=device)
        model.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta,
                                     max_positions or cfg.max_position_embeddings).to(device)
        model.load_turbomind(tensors)
        return model.to(dtype=dtype).eval()

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                metadata: AttentionMetadata | None = None) -> torch.Tensor:
        """Reference path: input_ids (B, L) -> logits (B, L, V), causal, no cache.
        Engine path: input_ids (N,) packed, positions (N,), metadata -> hidden states (N, H)."""
        if metadata is None:
            b, l = input_ids.shape
            positions = torch.arange(l, device=input_ids.device).expand(b, l)  # (B, L)
            return self.compute_logits(self.hidden_states(input_ids, positions, None))
        return self.hidden_states(input_ids, positions, metadata)

    def hidden_states(self, input_ids, positions, metadata):
        x = F.embedding(input_ids, self.tok_embeddings)                 # (..., H)
        cos, sin = self.rope.cos_sin(positions)                          # (..., 1, D) once per step
        for layer in self.layers:
            x = layer(x, cos, sin, metadata)
        return self.norm(x)                                              # (..., H)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> logits (..., V), float32; vocab-split across ranks then gathered."""
        if self.output is not None:
            head = self.output                                           # (V/tp, H)
        else:
            n = self.cfg.vocab_size // self.tp
            head = self.tok_embeddings.narrow(0, self.rank * n, n)       # (V/tp, H)
        logits = F.linear(hidden, head)                                  # (..., V/tp)
        if self.tp > 1:
            import torch.distributed as dist
            parts = [torch.empty_like(logits) for _ in range(self.tp)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, -1)                                # (..., V)
        return logits.float()
