"""Triton when it is installed; every kernel file still imports without it.

The PyTorch references need only torch, so the CPU engine and macOS work without Triton. A
kernel file decorates its kernels with `triton.jit` either way: without Triton, `jit` returns
the function unchanged and calling a launcher raises `require_triton()`'s clear error.

Under `TRITON_INTERPRET=1` (set before the first import of a kernel file), `triton.jit` builds
interpreted kernels that run on CPU tensors: that is how the kernels are tested without a GPU.
"""
from __future__ import annotations

import os

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


# ----------------------------------------------------------------------------- PDL
# Programmatic dependent launch (Hopper and later): a kernel launched with `launch_pdl=True`
# may start while the kernel before it is still finishing. Its programs first issue the loads
# that do not depend on that kernel (the weights), then `pdl_wait` blocks until the previous
# kernel has finished and its writes are visible. At batch 1 a decode step is ~290 dependent
# launches, so the ramp of each (launch, first DRAM round trip) is on the critical path; this
# hides part of it (docs/PERF.md). Every read of an activation and every write comes after
# `pdl_wait`. Module switch (an experiment can turn it off); LABKIT_PDL=0 turns it off for a
# run, like enforce_eager for CUDA graphs.
PDL = os.environ.get("LABKIT_PDL", "1") != "0"
_PDL_DEVICES: dict = {}


def pdl_launch(t) -> bool:
    """Whether kernels working on tensor `t` launch with PDL: a CUDA device of compute
    capability >= 9.0, compiled (not interpreted) Triton, and the switch on. Pass it as the
    kernel's PDL and as launch_pdl."""
    if not (PDL and HAS_TRITON and t.is_cuda) or interpreted():
        return False
    idx = t.device.index if t.device.index is not None else 0
    if idx not in _PDL_DEVICES:
        import torch
        _PDL_DEVICES[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _PDL_DEVICES[idx]


@triton.jit
def pdl_wait(ON: tl.constexpr):
    """Wait for the previous kernel's writes, then let the next kernel launch (its programs
    wait in turn at their own `pdl_wait`). A no-op when ON is False (a plain launch).
    (Letting the next kernel launch before waiting, from the small kernels, was measured
    slower: docs/PERF.md.)"""
    if ON:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
