"""Where the engine runs and in which dtype: `EngineConfig.device` / `.dtype` -> torch's."""
from __future__ import annotations

import torch

from labkit.config import ConfigError, EngineConfig


def resolve_device(ec: EngineConfig) -> tuple[torch.device, torch.dtype]:
    if ec.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(ec.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device={ec.device!r} is not allowed here: no CUDA device; use auto or cpu")
    if ec.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, ec.dtype)
    return device, dtype
