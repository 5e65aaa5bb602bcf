"""Run a check on `world` CPU processes joined in a gloo process group, with a deadline.

    run_ranks(checks_file, "column", world=2, args=(x, w, b), timeout=60)
      -> [{"result": <rank 0's return>, "collectives": {"all_reduce": 1, ...}}, ...]

Each rank is a fresh process (forked by a multiprocessing fork server that has torch
imported already) that joins the group through a file store in a temporary folder (no port to pick or race
for), counts the torch.distributed collectives the code under test calls, runs
`checks_file`'s function `name(rank, world, *args)` and sends back its return value (keep it
picklable: numpy arrays, numbers, dicts). A rank that raises, calls sys.exit, dies or is still
running at the deadline fails the whole call with a RankError that says which rank and why;
every process is gone when this returns.
"""
from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from pathlib import Path

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "broadcast", "all_to_all", "reduce", "gather", "scatter")


class RankError(AssertionError):
    """A rank failed (its message is the one line a student reads)."""


def run_ranks(checks_file, name: str, world: int, args: tuple = (), timeout: float = 60.0) -> list[dict]:
    ctx = _context()
    results: queue.Queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="labkit-tp-") as tmp:
        store = str(Path(tmp) / "store")
        procs = [ctx.Process(target=_rank_main, args=(str(checks_file), name, r, world, store, args, results),
                             daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world, timeout)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join(5)


def _context():
    """Fresh processes without paying torch's import each time: a fork server (a clean
    process, started once per grading process) imports torch, then forks every rank. Forking
    is safe there because the server itself never ran an op (no OpenMP threads to inherit)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed"])
    return ctx


def _collect(procs, results, world: int, timeout: float) -> list[dict]:
    got: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while len(got) < world:
        try:
            rank, ok, payload = results.get(timeout=0.2)
        except queue.Empty:
            for r, p in enumerate(procs):
                if r not in got and not p.is_alive() and p.exitcode is not None:
                    time.sleep(0.2)                  # its last message may still be in flight
                    if results.empty():
                        raise RankError(f"rank {r} of {world} exited (code {p.exitcode}) without "
                                        f"finishing: did the code call os._exit() or crash?")
            if time.monotonic() > deadline:
                missing = [r for r in range(world) if r not in got]
                raise RankError(f"rank(s) {missing} of {world} did not finish within {timeout:g} s: "
                                f"a collective that the other ranks never join, or an endless loop?")
            continue
        if not ok:
            raise RankError(f"rank {rank} of {world}: {payload}")
        got[rank] = payload
    return [got[r] for r in range(world)]


def _rank_main(checks_file: str, name: str, rank: int, world: int, store: str, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)                           # `world` processes share the cores
    try:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        counts = _count_collectives(dist)
        spec = importlib.util.spec_from_file_location(f"labkit_tp_checks_{os.getpid()}", checks_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = getattr(module, name)(rank, world, *args)
        results.put((rank, True, {"result": out, "collectives": dict(counts)}))
    except BaseException as e:                         # SystemExit too: report, never hang
        results.put((rank, False, _one_line(e)))
    finally:
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def _count_collectives(dist) -> dict:
    """Wrap torch.distributed's collectives so each call is counted (looked up at call time,
    so `dist.all_reduce(...)` in the code under test goes through the wrapper)."""
    counts = {}
    for fn_name in COLLECTIVES:
        fn = getattr(dist, fn_name, None)
        if fn is None:
            continue
        counts[fn_name] = 0

        def wrapper(*a, _fn=fn, _name=fn_name, **kw):
            counts[_name] += 1
            return _fn(*a, **kw)
        setattr(dist, fn_name, wrapper)
    return counts


def _one_line(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return f"the code called sys.exit({e.code!r})"
    from labkit.grading.submission import SubmissionError, submission_dir
    if isinstance(e, SubmissionError):
        return str(e)
    kind = "not implemented yet" if isinstance(e, NotImplementedError) else type(e).__name__
    root, where = submission_dir(), ""
    for frame in traceback.extract_tb(e.__traceback__):
        if Path(frame.filename).resolve().is_relative_to(root):      # the deepest student line
            where = f" ({Path(frame.filename).name} line {frame.lineno})"
    return f"{kind}: {' '.join(str(e).split())}{where}"
