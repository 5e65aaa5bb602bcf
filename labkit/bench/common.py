"""What every benchmark shares: the commit and device it ran on, medians of repeated runs."""
from __future__ import annotations

import platform
import subprocess


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def median_run(runs: list[dict]) -> dict:
    """The run with the median time, plus every run's time."""
    runs = sorted(runs, key=lambda m: m["seconds"])
    mid = dict(runs[len(runs) // 2])
    mid["all_seconds"] = [round(m["seconds"], 3) for m in runs]
    return mid


def alternate(fns: dict, repeats: int) -> dict:
    """Run each measurement `repeats` times, taking turns (A B A B ...), so a noisy
    neighbour on a shared machine slows both alike; report each one's median run."""
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            runs[name].append(fn())
    return {name: median_run(r) for name, r in runs.items()}


def device_name(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
