"""The Llama family (Llama 2/3, SmolLM2, ...) built from TurboMind-named tensors.

    x = embed(ids);  residual = 0
    for each layer:  h, residual = attention_norm(x + residual)      # fused add + RMSNorm
                     x = wo(attn(rope(w_qkv(h))))                     # attention block
                     h, residual = ffn_norm(x + residual)
                     x = w2(silu(w1 h) * w3 h)                        # SwiGLU MLP (w13 = [w1 | w3])
    logits = output(norm(x + residual))                              # output = embed when tied

The module tree mirrors TurboMind's tensor names (`layers.3.attention.w_qkv.weight`), so
labkit/models/loader.py fills it by name. Non-matmul ops go through `self.backend`
(labkit/layers/backend.py): PyTorch references on CPU, Triton kernels on GPU.

Tensor parallel (Megatron style): w_qkv and w13 are column-parallel (each rank holds some
heads / some MLP channels), wo and w2 are row-parallel (each rank holds the matching input
columns and the partial sums are all-reduced), the vocabulary of the output head is split and
the logits all-gathered. With tp=1 there is no communication at all.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from labkit.config import ModelConfig
from labkit.layers.attention import Attention, AttentionMetadata, LognScaling
from labkit.layers.backend import TORCH
from labkit.layers.linear import Linear
from labkit.layers.norm import RMSNorm
from labkit.layers.rotary import RotaryEmbedding


def _all_reduce(x: torch.Tensor, tp: int) -> torch.Tensor:
    if tp > 1:
        import torch.distributed as dist
        dist.all_reduce(x)
    return x


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int, rope: RotaryEmbedding, logn: LognScaling):
        super().__init__()
        self.tp = tp
        self.hq, self.hkv, self.d = cfg.num_heads // tp, cfg.num_kv_heads // tp, cfg.head_dim
        self.w_qkv = Linear(cfg.hidden_size, (self.hq + 2 * self.hkv) * self.d, bias=cfg.attn_bias)
        self.wo = Linear(self.hq * self.d, cfg.hidden_size)
        self.attn = Attention(self.hq, self.hkv, self.d)
        self.rope, self.logn = rope, logn      # position tables shared by every layer
        self.backend = TORCH

    def forward(self, h, positions, md: AttentionMetadata | None, rope=None):
        """The attention sublayer: h (..., H) normed input -> (..., H)."""
        return self.attend(self.w_qkv(h), positions, md, rope)

    def attend(self, qkv, positions, md: AttentionMetadata | None, rope=None):
        """From w_qkv's output on (LlamaLayer runs the projection itself, so that a backend can
        fuse the norm into it); rope: this forward's `RotaryEmbedding.step`, shared by the layers."""
        lead = qkv.shape[:-1]                                        # (N,) or (B, L)
        qkv = qkv.view(*lead, self.hq + 2 * self.hkv, self.d)        # (..., hq+2hkv, D)
        if rope is None:
            rope = self.rope.step(positions, md.rope_tables if md else None)
        # q and k heads are rotated together, in place (one RoPE pass); v is left as it is.
        # A backend may also write k and v into the cache in the same kernel.
        stored = self.backend.rope_store_kv(qkv, rope, self.attn, md)
        if not stored:
            self.rope(positions, qkv[..., :self.hq + self.hkv, :], step=rope)
        q, k, v = qkv.split([self.hq, self.hkv, self.hkv], -2)       # (..., h*, D) views
        if self.logn.enabled:                                        # use_logn_attn
            self.logn(positions, q)                                  # q *= log_T(p + 1) past T
        o = self.attn(q, k, v, md, kv_stored=stored).reshape(*lead, self.hq * self.d)  # (..., hq*D)
        return _all_reduce(self.wo(o), self.tp)                      # (..., H)


MLP_ROWS = 1024       # a CPU forward of more rows runs its MLP in slices of this many rows


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int):
        super().__init__()
        self.tp = tp
        inter = cfg.intermediate_size // tp
        self.w13 = Linear(cfg.hidden_size, 2 * inter)                # [gate | up], fused at load
        self.w2 = Linear(inter, cfg.hidden_size)
        self.backend = TORCH

    def forward(self, h):
        """The MLP sublayer: h (..., H) normed input -> (..., H)."""
        return self.down(self.backend.silu_and_mul(self.w13(h)))     # (..., I/tp) in between

    def down(self, act):
        """From silu(gate) * up on (LlamaLayer runs w13 and the gate itself, so that a backend
        can fuse them with the norm): w2(act), summed over the TP ranks."""
        return _all_reduce(self.w2(act), self.tp)                    # (..., H)


class LlamaLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int, rope: RotaryEmbedding, logn: LognScaling):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = LlamaAttention(cfg, tp, rope, logn)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = LlamaMLP(cfg, tp)
        self.backend = TORCH

    def forward(self, x, residual, positions, md: AttentionMetadata | None, rope=None):
        """x: the previous sublayer's output; residual: the stream before it (None at layer 0);
        rope: this forward's RoPE step (`RotaryEmbedding.step`), None to make it here."""
        qkv, residual = self.backend.norm_linear(x, residual, self.attention_norm,
                                                 self.attention.w_qkv)      # (..., (hq+2hkv)D), (..., H)
        x = self.attention.attend(qkv, positions, md, rope)
        if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] > MLP_ROWS:
            return self._mlp_in_slices(x, residual)
        return self._mlp(x, residual)

    def _mlp(self, x, residual):
        act, residual = self.backend.norm_gate_up(x, residual, self.ffn_norm,
                                                  self.feed_forward.w13)     # (..., I), (..., H)
        return self.feed_forward.down(act), residual

    def _mlp_in_slices(self, x, residual):
        """The MLP of a long CPU prefill, MLP_ROWS rows at a time (rows are independent): the
        (N, 2I) gate|up product of 4,631 rows is 57 MB and SiLU-and-mul would stream it from
        memory again; 1,024 rows stay in the cache (a layer's MLP 174 -> 157 ms, 2-core EPYC)."""
        out, res = torch.empty_like(x), torch.empty_like(residual)          # (N, H) each
        for i in range(0, x.shape[0], MLP_ROWS):
            rows = slice(i, i + MLP_ROWS)
            out[rows], res[rows] = self._mlp(x[rows], residual[rows])
        return out, res


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, ids):
        return F.embedding(ids, self.weight)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: int = 1, rank: int = 0, max_positions: int | None = None,
                 rope_scaling_factor: float = 0.0, use_logn_attn: bool = False):
        super().__init__()
        cfg.check_tp(tp)
        self.cfg, self.tp, self.rank = cfg, tp, rank
        positions, trained = max_positions or cfg.max_position_embeddings, cfg.max_position_embeddings
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, positions,
                                    rope_scaling_factor or 0.0, trained)
        self.logn = LognScaling(positions, trained, bool(use_logn_attn))
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(cfg, tp, self.rope, self.logn)
                                    for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size // tp)
        self.backend = TORCH

    def set_backend(self, backend) -> "LlamaForCausalLM":
        """Give every layer the op backend (labkit/layers/backend.py)."""
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        return self

    def set_position_scaling(self, rope_scaling_factor: float = 0.0, use_logn_attn: bool = False,
                             trained_len: int | None = None) -> "LlamaForCausalLM":
        """Long-context knobs (LMDeploy's rope_scaling_factor and use_logn_attn), switchable on
        a loaded model: dynamic NTK RoPE (factor >= 1, 0 = off; for sequences added from now on
        whose rope length exceeds `trained_len`) and logn query scaling of positions past
        `trained_len` (default: the model's max_position_embeddings; a smaller
        value pretends the model was trained on shorter texts, for experiments)."""
        from labkit.config import validate_inference_fields
        validate_inference_fields({"rope_scaling_factor": rope_scaling_factor,
                                   "use_logn_attn": use_logn_attn})
        trained = trained_len or self.cfg.max_position_embeddings
        self.rope.set_scaling(rope_scaling_factor, trained)
        self.logn.trained_len, self.logn.enabled = trained, bool(use_logn_attn)
        self.logn.build()
        return self

    @classmethod
    def from_pretrained(cls, path, rank: int = 0, tp: int = 1, dtype=torch.float32,
                        device="cpu", max_positions: int | None = None,
                        rope_scaling_factor: float = 0.0, use_logn_attn: bool = False) -> "LlamaForCausalLM":
        """Build from a workspace, the alias, an HF directory, a .gguf, an AWQ folder or
        `dummy:SHAPE`. Int4 weights make every decoder Linear a W4A16Linear."""
        from labkit.layers.linear import use_w4a16
        from labkit.models.loader import int4_group_size, load, load_weights
        cfg, tensors = load(path, rank=rank, tp=tp, dtype=dtype, device=device)
        with torch.device("meta"):
            model = cls(cfg, tp, rank, max_positions, rope_scaling_factor, use_logn_attn)
            if int4_group_size(tensors):
                use_w4a16(model, int4_group_size(tensors))
        model = model.to_empty(device=device).to(dtype)
        model.rope.build(torch.device(device))     # not weights: float32 tables on the device
        model.logn.build(torch.device(device))
        load_weights(model, tensors)
        del tensors
        from labkit.layers.linear import pack_w4a16_copies
        pack_w4a16_copies(model)                  # int4 weights: the fast kernels' copies
        if torch.device(device).type == "cuda":   # a rank's shard was copied out of full-size
            torch.cuda.empty_cache()              # tensors: give their memory back before the
        return model.eval()                       # KV cache is sized from what is free

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
        if metadata is not None and metadata.rope_lens is not None:     # a scaled sequence: its
            metadata.rope_tables = self.rope.tables_for(positions, metadata.rope_lens)  # own base
        # what is the same in every layer, once: RoPE's rows of these positions, the checked
        # cache slots and the decode gather plan (labkit/layers/backend.py, begin_forward)
        rope = self.rope.step(positions, metadata.rope_tables if metadata is not None else None)
        if metadata is not None:
            self.backend.begin_forward(metadata, self.layers[0].attention.attn.k_cache)
        x, residual = self.tok_embeddings(input_ids), None              # (..., H)
        if (metadata is not None and not metadata.is_prefill and self.script_cpu_decode
                and x.device.type == "cpu"):            # the layers as one TorchScript call
            scripted = self._scripted_decode()
            if scripted.applies(self, metadata):
                return scripted.run(x, rope, metadata)
        for layer in self.layers:
            x, residual = layer(x, residual, positions, metadata, rope)
        return self.norm(x, residual)[0]                                 # (..., H)

    # A CPU decode step runs its layers as one TorchScript function (labkit/models/cpu_decode.py:
    # the same ops, no Python between them); LABKIT_SCRIPT_DECODE=0 keeps the Python layers.
    script_cpu_decode = os.environ.get("LABKIT_SCRIPT_DECODE", "1") != "0"

    def _scripted_decode(self):
        from labkit.models.cpu_decode import ScriptedDecode
        scripted = self.__dict__.get("_scripted")
        if scripted is None or scripted.key != ScriptedDecode.key_of(self):
            scripted = self.__dict__["_scripted"] = ScriptedDecode(self)
        return scripted

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> logits (..., V), float32; vocab-split across ranks then gathered."""
        if self.output is not None:
            head = self.output.weight                                    # (V/tp, H)
        else:            # tied: this rank's rows of the embedding, one view kept (a backend
            head = self.__dict__.get("_tied_head")   # may cache things on the weight it gets)
            if head is None or head._base is not self.tok_embeddings.weight:
                n = self.cfg.vocab_size // self.tp
                head = self.tok_embeddings.weight.narrow(0, self.rank * n, n)  # (V/tp, H)
                self.__dict__["_tied_head"] = head
        logits = self.backend.linear(hidden, head)                       # (..., V/tp)
        if self.tp > 1:
            import torch.distributed as dist
            parts = [torch.empty_like(logits) for _ in range(self.tp)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, -1)                                # (..., V)
        return logits.float()
