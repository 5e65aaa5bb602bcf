"""Configuration records: the model's shape, the engine's knobs, one request's sampling.

`ModelConfig` is fixed when a model is converted; `EngineConfig` holds the inference knobs a
student turns (the same names as LMDeploy's TurbomindEngineConfig); `GenerationConfig` holds
one request's sampling and stopping settings. All three validate themselves in
`__post_init__` and raise `ValueError` naming the field and the allowed values.

config.ini (TurboMind's `[llama]` section) is read and written in `labkit.workspace_ini`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence


class ConfigError(ValueError):
    """A bad configuration value; the message names the field and what is allowed."""


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is not allowed: {name} must be {allowed}")


# ---------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family model (fixed at conversion)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attn_bias: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    model_name: str = "llama"        # chat template name (TurboMind's model_name)

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "vocab_size", "max_position_embeddings"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, name, v, "a positive integer")
        _check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads,
               f"a divisor of num_heads={self.num_heads} (grouped-query attention)")
        _check(self.rms_norm_eps > 0, "rms_norm_eps", self.rms_norm_eps, "> 0")
        _check(self.rope_theta > 0, "rope_theta", self.rope_theta, "> 0")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def check_tp(self, tp: int) -> None:
        """Raise unless `tp` splits heads, KV heads, the MLP and the vocabulary evenly."""
        _check(isinstance(tp, int) and tp >= 1, "tp", tp, "a positive integer")
        parts = {"head_num": self.num_heads, "kv_head_num": self.num_kv_heads,
                 "inter_size": self.intermediate_size, "vocab_size": self.vocab_size}
        bad = [f"{k}={v}" for k, v in parts.items() if v % tp]
        if bad:
            ok = [t for t in range(1, self.num_heads + 1)
                  if all(v % t == 0 for v in parts.values())]
            raise ConfigError(f"tp={tp} is not allowed for this model: it does not divide "
                              f"{', '.join(bad)}; tp must be one of {ok}")


# ---------------------------------------------------------------------------- engine knobs
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}   # as `convert --dtype`
QUANT_POLICIES = (0, 4, 8)   # 0 = model dtype KV, 4 = int4 KV, 8 = int8 KV (current LMDeploy)


@dataclass
class EngineConfig:
    """Inference knobs. `None` means "not set here": the workspace's config.ini or the default wins.

    cache_max_entry_count: in (0, 1) the fraction of free memory (after weights) given to the
    KV cache; an integer > 1 is a number of blocks. On CPU the fraction applies to
    min(available RAM, kv_budget_gib).
    """

    session_len: Optional[int] = None
    max_batch_size: Optional[int] = None
    cache_max_entry_count: Optional[float] = None
    cache_block_seq_len: Optional[int] = None
    quant_policy: Optional[int] = None
    rope_scaling_factor: Optional[float] = None
    use_logn_attn: Optional[bool] = None
    tp: int = 1
    max_prefill_token_num: int = 8192      # tokens per prefill step (LMDeploy's default)
    enable_prefix_caching: bool = True
    device: str = "auto"                   # auto | cpu | cuda | cuda:N
    dtype: str = "auto"                    # auto | float32 | bfloat16 | float16 (or fp32, bf16, fp16);
                                           # auto: bf16 on GPU, on CPUs with native bf16
                                           # and for int4 weights on any CPU; else fp32
    kv_budget_gib: float = 4.0             # CPU only: cap for the fractional KV cache size
    model_name: Optional[str] = None       # chat template override
    attention_backend: str = "auto"        # auto (triton on CUDA, torch elsewhere) | torch | triton
    enforce_eager: bool = False            # GPU: no CUDA graphs (for debugging and profiling)
    overlap_schedule: Optional[bool] = None  # schedule step k+1 while step k runs on the device;
                                           # None: on for a CUDA engine at tp=1, off elsewhere

    def __post_init__(self):
        validate_inference_fields({k: getattr(self, k) for k in INFERENCE_DEFAULTS
                                   if getattr(self, k) is not None})
        _check(isinstance(self.tp, int) and self.tp >= 1, "tp", self.tp, "a positive integer")
        _check(isinstance(self.max_prefill_token_num, int) and self.max_prefill_token_num >= 16,
               "max_prefill_token_num", self.max_prefill_token_num, "an integer >= 16")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
               "device", self.device, "one of auto, cpu, cuda, cuda:N")
        if isinstance(self.dtype, str):
            self.dtype = DTYPE_ALIASES.get(self.dtype, self.dtype)
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", self.dtype,
               "one of auto, float32 (fp32), bfloat16 (bf16), float16 (fp16)")
        _check(self.kv_budget_gib > 0, "kv_budget_gib", self.kv_budget_gib, "> 0")
        _check(self.attention_backend in ("auto", "torch", "triton"), "attention_backend",
               self.attention_backend, "one of auto, torch, triton")
        _check(self.overlap_schedule in (None, True, False), "overlap_schedule",
               self.overlap_schedule, "one of None (auto), True, False")


# config.ini fields a student may edit, with the value used when neither the file nor the
# engine arguments set them.
INFERENCE_DEFAULTS = {
    "session_len": None,            # None: the model's max_position_embeddings
    "max_batch_size": 64,
    "cache_max_entry_count": 0.8,
    "cache_block_seq_len": 64,
    "quant_policy": 0,
    "rope_scaling_factor": 0.0,     # 0 = off; >= 1 turns on dynamic NTK scaling
    "use_logn_attn": False,
}


def validate_inference_fields(values: dict) -> None:
    """Check inference knobs (from config.ini or EngineConfig); raise naming the first bad one."""
    for name, v in values.items():
        if name == "session_len":
            _check(_is_int(v) and v >= 2, name, v, "an integer >= 2")
        elif name == "max_batch_size":
            _check(_is_int(v) and 1 <= v <= 4096, name, v, "an integer in [1, 4096]")
        elif name == "cache_max_entry_count":
            frac = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1
            blocks = (_is_int(v) or (isinstance(v, float) and v.is_integer())) and v > 1
            _check(frac or blocks, name, v,
                   "a fraction in (0, 1) of free memory, or an integer > 1 (a number of blocks)")
        elif name == "cache_block_seq_len":
            _check(_is_int(v) and 4 <= v <= 1024 and (v & (v - 1)) == 0, name, v,
                   "a power of two in [4, 1024]")
        elif name == "quant_policy":
            _check(_is_int(v) and v in QUANT_POLICIES, name, v,
                   "one of 0 (model dtype KV), 4 (int4 KV), 8 (int8 KV)")
        elif name == "rope_scaling_factor":
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and (v == 0 or v >= 1),
                   name, v, "0 (off) or a number >= 1 (dynamic NTK)")
        elif name == "use_logn_attn":
            _check(isinstance(v, bool) or v in (0, 1), name, v, "0 or 1")
        else:
            raise ConfigError(f"unknown inference field {name!r}; allowed: {sorted(INFERENCE_DEFAULTS)}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------------------- one request
@dataclass
class GenerationConfig:
    """Sampling and stopping for one request. Greedy unless do_sample=True (as LMDeploy)."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 50                 # 0 = no top-k filter
    repetition_penalty: float = 1.0
    random_seed: Optional[int] = None
    stop_words: Optional[Sequence[str]] = None
    stop_token_ids: Optional[Sequence[int]] = None
    ignore_eos: bool = False
    min_new_tokens: int = 0
    skip_special_tokens: bool = True

    def __post_init__(self):
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens > 0, "max_new_tokens",
               self.max_new_tokens, "an integer > 0")
        _check(isinstance(self.temperature, (int, float)) and self.temperature >= 0, "temperature",
               self.temperature, ">= 0 (0 means greedy)")
        _check(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1, "top_p", self.top_p,
               "in (0, 1]")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k,
               "an integer >= 0 (0 disables top-k)")
        _check(isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0,
               "repetition_penalty", self.repetition_penalty, "> 0 (1.0 = off)")
        _check(_is_int(self.min_new_tokens) and self.min_new_tokens >= 0, "min_new_tokens",
               self.min_new_tokens, "an integer >= 0")
        _check(self.random_seed is None or _is_int(self.random_seed), "random_seed",
               self.random_seed, "an integer or None")
        if isinstance(self.stop_words, str):
            self.stop_words = [self.stop_words]
        _check(self.stop_words is None or all(isinstance(w, str) and w for w in self.stop_words),
               "stop_words", self.stop_words, "a list of non-empty strings")
        _check(self.stop_token_ids is None or all(_is_int(t) for t in self.stop_token_ids),
               "stop_token_ids", self.stop_token_ids, "a list of integers")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0 or self.top_k == 1

    def replace(self, **kw) -> "GenerationConfig":
        return dataclasses.replace(self, **kw)
