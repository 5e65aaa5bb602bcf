"""Find and import a student's homework modules, turning every failure into one readable line.

The graded tests never import student code at module level: each test calls
`load("a1_block_manager")` (through tests/homework/adapters.py), so a file that does not
import costs exactly the tests that need it, each with the same message.

Where the files are looked up: `$LABKIT_SUBMISSION` (set by `labkit grade --submission DIR`),
default the repository's homework/. Inside it, `NAME.py`, then `homework/NAME.py` (a student
who uploads the whole folder), then the shallowest `NAME.py` anywhere below.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import traceback
from pathlib import Path

ENV = "LABKIT_SUBMISSION"
_cache: dict[Path, object] = {}          # module, or the SubmissionError it raised


class SubmissionError(Exception):
    """The student's file is missing or does not import (the message says why, in one line)."""


def submission_dir() -> Path:
    d = os.environ.get(ENV)
    if d:
        return Path(d).resolve()
    return Path(__file__).resolve().parents[2] / "homework"


def find(name: str, root: Path | None = None) -> Path:
    root = root or submission_dir()
    for p in (root / f"{name}.py", root / "homework" / f"{name}.py"):
        if p.is_file():
            return p
    found = sorted(root.rglob(f"{name}.py"), key=lambda p: (len(p.parts), str(p))) if root.is_dir() else []
    if found:
        return found[0]
    raise SubmissionError(f"{name}.py is not in the submission {root} (looked for {name}.py and "
                          f"homework/{name}.py): upload the file with this exact name")


def load(name: str):
    """Import the student's `name`.py (once per process); SubmissionError if that fails."""
    path = find(name)
    if path in _cache:
        got = _cache[path]
        if isinstance(got, SubmissionError):
            raise got
        return got
    module_name = f"labkit_submission_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module            # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        raise
    except BaseException as e:                   # SystemExit too: a student's sys.exit()
        sys.modules.pop(module_name, None)
        err = SubmissionError(f"could not import {path.name}: {_describe(e, path)}")
        _cache[path] = err
        raise err from None
    _cache[path] = module
    return module


def _describe(e: BaseException, path: Path) -> str:
    """`SyntaxError: invalid syntax (line 12)`, `called sys.exit(3)`, `ImportError: ... (line 4)`."""
    if isinstance(e, SystemExit):
        return f"it called sys.exit({e.code!r}) while being imported"
    if isinstance(e, SyntaxError):
        return f"SyntaxError: {e.msg} (line {e.lineno})"
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        if Path(frame.filename).resolve() == path.resolve():
            line = frame.lineno                  # the deepest line of the student's own file
    where = f" (line {line})" if line else ""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}{where}" if text else f"{type(e).__name__}{where}"


def require(module, *names: str):
    """The attributes `names` of a student module; a clear error naming what is missing."""
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise SubmissionError(f"{Path(module.__file__).name} has no {', '.join(missing)}: keep the "
                              f"names of the stub")
    return [getattr(module, n) for n in names]
