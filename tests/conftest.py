"""Shared fixtures and suite-wide settings.

- Notebooks (collected by nbmake when pytest runs with `--nbmake`) run in fast mode unless
  LABKIT_FAST is set already: their `parameters` cell reads it from the environment, which the
  notebook kernel inherits from this process.
- Tests marked `gpu` are skipped when there is no CUDA device; without one, Triton kernels run
  in the CPU interpreter (TRITON_INTERPRET=1).
- tests/homework (the graded homework tests) is collected only with `--homework`
  (`labkit grade` passes it; by hand: `pytest tests/homework --homework`, which grades
  homework/ or the folder in $LABKIT_SUBMISSION).
- fixtures `labkit_run` / `labkit_popen` run the CLI as a student does (`python -m labkit ...`)
  in a subprocess; `tiny_llama_dir` and `bundled_gguf` are the two model sources.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("LABKIT_FAST", "1")


def _set_triton_interpreter() -> None:
    """Without a CUDA device, Triton kernels run in the CPU interpreter (read when a kernel file
    is first imported, so set it before any test module imports kernels/)."""
    try:
        import torch
        if torch.cuda.is_available():
            return
    except ImportError:
        return
    os.environ.setdefault("TRITON_INTERPRET", "1")


_set_triton_interpreter()


HOMEWORK_TESTS = Path(__file__).resolve().parent / "homework"


def pytest_addoption(parser):
    parser.addoption("--homework", action="store_true", default=False,
                     help="also collect the graded homework tests in tests/homework")


def pytest_ignore_collect(collection_path, config):
    if not config.getoption("--homework") and Path(collection_path).resolve().is_relative_to(HOMEWORK_TESTS):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [it for it in items if it.get_closest_marker("gpu")]
    if not gpu_items:
        return
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device (marker gpu)")
        for it in gpu_items:
            it.add_marker(skip)


def _env() -> dict:
    env = dict(os.environ)
    # The CLI must import from this checkout even when labkit is not installed (development).
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def labkit_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "labkit", *map(str, args)]


def run_labkit(*args, timeout: float = 300, cwd=None) -> subprocess.CompletedProcess:
    """Run `python -m labkit ARGS` and capture its output (text)."""
    return subprocess.run(labkit_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or REPO, env=_env())


def popen_labkit(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen(labkit_cmd(*args), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """The seeded tiny HF Llama, made once in this process (so CLI subprocesses never race)."""
    from labkit.models.bundled import tiny_model_dir
    return tiny_model_dir()


@pytest.fixture(scope="session")
def tiny_stats(tmp_path_factory) -> Path:
    """`labkit lite calibrate tiny-llama` on 3 x 40 tokens: a statistics work dir."""
    from labkit.cli import main as cli_main
    d = tmp_path_factory.mktemp("calib")
    assert cli_main(["lite", "calibrate", "tiny-llama", "--work-dir", str(d), "--calib-samples", "3",
                     "--calib-seqlen", "40", "--no-progress"]) == 0
    return d


@pytest.fixture(scope="session")
def bundled_gguf() -> Path:
    """The bundled model's .gguf (an error, not a skip, when missing: `make install` puts it there)."""
    from labkit.models.bundled import bundled_gguf_path
    return bundled_gguf_path()


@pytest.fixture(scope="session")
def labkit_run():
    """`labkit_run("convert", "tiny-llama", "--dst-path", d)` -> CompletedProcess (text)."""
    return run_labkit


@pytest.fixture(scope="session")
def labkit_popen():
    """`labkit_popen("convert", ...)` -> a running Popen with stdout/stderr pipes."""
    return popen_labkit


@pytest.fixture(scope="session")
def prompts_and_reference():
    """(seed, 11 chat prompts, HF `generate`'s greedy 32 tokens for each): 10 varied prompts,
    fresh each run, then a question the model answers in 8-11 tokens, so that some request
    always stops on eos before the length limit (a random draw alone missed that once);
    computed once for every engine test file that compares with HF."""
    import random
    from tests.helpers import SHORT_ANSWERS, hf_generate, make_prompts
    seed = random.randrange(2**31)
    prompts = make_prompts(10, seed)
    prompts.append([{"role": "user", "content": random.Random(seed).choice(SHORT_ANSWERS)}])
    return seed, prompts, [hf_generate(p) for p in prompts]
