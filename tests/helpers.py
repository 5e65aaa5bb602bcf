"""Shared, cached test inputs: converted workspaces and HF reference models (one per process)."""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import random
from pathlib import Path

import torch

_TMP = Path(tempfile.mkdtemp(prefix="labkit-tests-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def workspace(model: str = "smollm2-135m", tp: int = 1) -> Path:
    """A workspace converted once per test process."""
    return _workspace(model, tp)


@functools.lru_cache(maxsize=None)
def _workspace(model: str, tp: int) -> Path:
    from labkit.convert import convert
    return convert(model, _TMP / f"ws-{model}-tp{tp}", tp=tp, progress=False)


@functools.lru_cache(maxsize=None)
def hf_model(model: str = "smollm2-135m", dtype: torch.dtype = torch.float32):
    """HF transformers' own LlamaForCausalLM for the same weights (the independent reference).
    The bundled GGUF goes through HF's GGUF loader once per machine (`hf_checkpoint_of`)."""
    from transformers import AutoModelForCausalLM
    from labkit.models import bundled
    src = bundled.resolve_alias(model)
    if src.suffix == ".gguf":
        src = hf_checkpoint_of(src)
    return AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype).eval()


def hf_checkpoint_of(gguf: Path) -> Path:
    """The GGUF as HF transformers reads it (its own de-quantization), saved once in the labkit
    cache as an HF checkpoint: HF's GGUF reader spends ~35 s parsing metadata on every load,
    and the suite loads the reference in several processes."""
    import transformers
    from transformers import AutoModelForCausalLM
    from labkit.models.bundled import publish_folder, cache_dir
    key = f"{gguf.stem}-{gguf.stat().st_size}-transformers{transformers.__version__}"
    out = cache_dir() / "hf-from-gguf" / key
    if not (out / "config.json").is_file():
        m = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                 dtype=torch.float32)
        m.hf_quantizer = None                    # the weights are plain float32 tensors now
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        m.save_pretrained(str(tmp))
        publish_folder(tmp, out)
    return out


@functools.lru_cache(maxsize=None)
def hf_tokenizer(model: str = "smollm2-135m"):
    from transformers import AutoTokenizer
    from labkit.models import bundled
    return AutoTokenizer.from_pretrained(str(bundled.bundled_tokenizer_dir()))


# ---------------------------------------------------------------------------- chat prompts vs HF
def random_int4(N: int, K: int, G: int, dtype=torch.float32, device=None):
    """Fresh int4 weights for the W4A16 kernel tests: codes q (N, K) uint8 on the CPU, and
    (qweight (N, K/2) in kernels/w4a16.py's layout, scales 0.01-0.1 in `dtype`, zero points
    anywhere in 0..15) on `device` (default: the GPU when there is one, as the tests' DEV)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from kernels.w4a16 import pack_int4       # here, not at the top: the test file decides
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)             # TRITON_INTERPRET first
    scales = (torch.rand(N, K // G) * 0.09 + 0.01).to(dtype)
    zeros = torch.randint(0, 16, (N, K // G), dtype=torch.uint8)
    return q, pack_int4(q).to(device), scales.to(device), zeros.to(device)


def int4_reference64(x, q, scales, zeros, G):
    """float64 from the drawn codes: W[n, k] = (q[n, k] - z[n, k//G]) s[n, k//G]; y = x W^T,
    x (..., K) -> (M, N)."""
    w = (q.double() - zeros.cpu().double().repeat_interleave(G, 1)) \
        * scales.cpu().double().repeat_interleave(G, 1)                  # (N, K)
    return x.reshape(-1, q.shape[1]).cpu().double() @ w.T                # (M, N)


TOPICS = ["the moon", "rust programming", "a cat named Tofu", "tensor parallelism", "bread baking",
          "the French revolution", "prime numbers", "jazz", "volcanoes", "KV caches", "sailing",
          "photosynthesis", "chess openings", "the number zero"]
SHORT_ANSWERS = ["What is 2 + 2? Answer with a number only.",      # 8, 9, 11 tokens with eos
                 "Reply with one word: is the sky blue?",          # (SmolLM2-135M, greedy)
                 "Translate 'cat' to French. One word."]
FORMS = ["Write one sentence about {}.", "Tell me a short story about {}.",
         "What are three facts about {}? Answer briefly.", "Explain {} to a child.",
         "Give me a poem on {}, four lines.", "{}"]


def make_prompts(n, seed):
    """Varied chat prompts (fresh each run: the seed is printed on failure)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        msg = [{"role": "user", "content": rng.choice(FORMS).format(rng.choice(TOPICS))}]
        if i % 3 == 1:
            msg.insert(0, {"role": "system", "content": "You are a terse assistant."})
        if i % 4 == 2:      # a multi-turn chat
            msg = msg + [{"role": "assistant", "content": "Sure."},
                         {"role": "user", "content": "Say more, " + "please " * rng.randint(1, 20)}]
        out.append(msg)
    return out


def hf_generate(messages, max_new_tokens=32):
    tok, model = hf_tokenizer(), hf_model()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()
