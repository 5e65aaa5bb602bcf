"""Triton when it is installed; every kernel file still imports without it.

The PyTorch references need only torch, so the CPU engine and macOS work without Triton. A
kernel file decorates its kernels with `triton.jit` either way: without Triton, `jit` returns
the function unchanged and calling a launcher raises `require_triton()`'s clear error.

Under `TRITON_INTERPRET=1` (set before the first import of a kernel file), `triton.jit` builds
interpreted kernels that run on CPU tensors: that is how the kernels are tested without a GPU.
"""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:                      # pragma: no cover - CI and the GPU image have triton
    HAS_TRITON = False

    class _NoTriton:
        constexpr = object               # only used as an annotation

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):
            require_triton()

    triton = tl = _NoTriton()


def require_triton() -> None:
    if not HAS_TRITON:
        raise ImportError("this kernel needs Triton (pip install triton, Linux); the PyTorch "
                          "reference of every kernel (the *_ref functions) runs without it")


def interpreted() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_SM_COUNT: dict = {}


def num_sms(device=None) -> int:
    """Multiprocessors of a CUDA device (launchers size their grids by it); 4 on CPU, where
    the interpreter runs, so the split paths are exercised there too."""
    import torch
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available()
                                                             else "cpu"))
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
