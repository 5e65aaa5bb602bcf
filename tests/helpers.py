"""Shared, cached test inputs: converted workspaces and HF reference models (one per process)."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
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
def hf_model(model: str = "smollm2-135m"):
    """HF transformers' own LlamaForCausalLM for the same weights (the independent reference)."""
    from transformers import AutoModelForCausalLM
    from labkit.models import bundled
    src = bundled.resolve_alias(model)
    if src.suffix == ".gguf":
        m = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                 dtype=torch.float32)
    else:
        m = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    return m.eval()


@functools.lru_cache(maxsize=None)
def hf_tokenizer(model: str = "smollm2-135m"):
    from transformers import AutoTokenizer
    from labkit.models import bundled
    return AutoTokenizer.from_pretrained(str(bundled.bundled_tokenizer_dir()))
