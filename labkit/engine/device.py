"""Where the engine runs and in which dtype: `EngineConfig.device` / `.dtype` -> torch's.

`dtype="auto"` picks the narrowest dtype the device computes natively, because decode reads
every weight once per token: half the bytes per weight is close to twice the tokens per second.

    CUDA                                  bfloat16
    CPU with AVX512-BF16 or AMX (x86)     bfloat16  (oneDNN's bf16 GEMMs: bf16 products, fp32 sums)
    any other CPU, int4 (W4A16) weights   bfloat16  (the A16: PyTorch's int4 CPU kernel computes in
                                                     bf16; fp32 takes the dequantize-every-call
                                                     reference, ~10x slower decode, docs/PERF.md)
    any other CPU                         float32   (bf16 there is emulated: slower than fp32)

float32 stays available (`dtype="float32"`): the parity tests against HF transformers use it.
"""
from __future__ import annotations

import functools

import torch

from labkit.config import ConfigError, EngineConfig


@functools.lru_cache(maxsize=None)
def cpu_computes_bf16() -> bool:
    """True when this CPU has bf16 instructions that torch's CPU kernels (oneDNN) use:
    AVX512-BF16 (AMD Zen 4+, Intel Cooper Lake+) or AMX tiles (Intel Sapphire Rapids+).

    `torch.backends.cpu.get_cpu_capability()` reports the vector ISA torch dispatches to
    ("AVX512", "AVX2", ...) but not the bf16 extension, so ask cpuinfo's flags through
    torch.cpu's queries; they are private, hence the getattr (absent: assume no bf16)."""
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX")):
        return False                     # ARM, or x86 without AVX-512: no native bf16 here
    for query in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, query, None)
        if fn is not None and fn():
            return True
    return False


def auto_dtype(device: torch.device, weight_type: str = "") -> torch.dtype:
    """The dtype `dtype="auto"` means on `device` for weights of `weight_type` (the table above)."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_computes_bf16()):
        return torch.bfloat16
    if device.type == "cpu" and weight_type.endswith("int4"):
        from kernels.w4a16_cpu import AVAILABLE
        if AVAILABLE:
            return torch.bfloat16
    return torch.float32


def resolve_device(ec: EngineConfig, weight_type: str = "") -> tuple[torch.device, torch.dtype]:
    """`weight_type`: the model's (ModelInfo.weight_type), which `dtype="auto"` looks at."""
    if ec.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(ec.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={ec.device!r} is not allowed here: no CUDA device; use auto or cpu")
    dtype = auto_dtype(device, weight_type) if ec.dtype == "auto" else getattr(torch, ec.dtype)
    return device, dtype
