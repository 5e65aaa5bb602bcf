"""Rank 0's side of a tensor-parallel engine: start the other ranks, send them each step, stop them.

    group = TPGroup.start(model, ec, dtype, max_positions)   # ranks 1..tp-1 start loading
    ... rank 0 loads its own shard, sizes its KV cache ...
    plan = group.agree_kv_plan(plan)          # the smallest rank's block count, on every rank
    ... rank 0 builds its ModelRunner ...
    group.attach(runner)                      # the others are ready; runner.execute now calls
                                              #   group.run_step: broadcast, then forward here
    group.close()                             # stop them (also on Ctrl-C, SIGTERM, errors)

Each step rank 0 fills its step buffer (scheduler -> fill_step), then sends a header and the
used prefix of the buffer; every rank runs the same forward on its shard (the model's
all-reduces and the logits all-gather meet in the middle) and only rank 0 samples. The ranks
run labkit/engine/tp_worker.py: spawned here with torch.multiprocessing on this machine, or
started by torchrun (then rank 0 is itself one of torchrun's processes).

Failure handling: a spawned rank that died makes the next step raise at once (its exit code is
checked before each step); one that dies during a step makes the step's collective raise (its
sockets close) or time out (tp_worker.STEP_TIMEOUT). A step that raised or was interrupted
(Ctrl-C) leaves the ranks out of step, so the group refuses further steps: close it and start
a new engine. One tensor-parallel engine per process (torch.distributed has one default group):
starting a second closes the first.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch
import torch.distributed as dist

from labkit.config import ConfigError, EngineConfig
from labkit.dist import ranks
from labkit.engine import tp_worker
from labkit.engine.tp_worker import EXIT, HEADER_LEN, SETUP, STEP, STOP

log = logging.getLogger("labkit")

_active: "TPGroup | None" = None        # the one live group of this process
_torchrun: dict | None = None           # set by tp_worker.main on torchrun's rank 0


class TPGroup:
    def __init__(self, tp: int, device: torch.device, ctrl, procs: list):
        self.tp, self.device, self.ctrl, self.procs = tp, device, ctrl, procs
        self.broken: str | None = None        # why no more steps can run
        self.ready = False                    # every rank built its runner (attach)
        self.closed = False
        self._threads = torch.get_num_threads()
        self._header = torch.zeros(HEADER_LEN, dtype=torch.int32)

    # ------------------------------------------------------------------ start
    @classmethod
    def start(cls, model, ec: EngineConfig, device: torch.device, dtype: torch.dtype,
              max_positions: int, workspace=None) -> "TPGroup":
        """Start (or, under torchrun, join) ranks 1..tp-1 and send them the model to load."""
        global _active
        if _active is not None:
            log.warning("closing the previous tensor-parallel engine of this process "
                        "(torch.distributed allows one per process)")
            _active.close()
        backend = ranks.backend_for(device)
        if _torchrun is not None:
            group = cls._join_torchrun(ec.tp, device)
        else:
            group = cls._spawn(ec.tp, ec.device, backend)
        _active = group
        setup = {"model": str(model), "ec": ec, "dtype": str(dtype).replace("torch.", ""),
                 "max_positions": max_positions, "workspace": None if workspace is None else str(workspace)}
        try:
            group._send(SETUP)
            dist.broadcast_object_list([setup], src=0, group=group.ctrl)
        except BaseException:
            group.close()
            raise
        return group

    @classmethod
    def _spawn(cls, tp: int, device_flag: str, backend: str) -> "TPGroup":
        import torch.multiprocessing as mp
        if backend == "nccl":
            if device_flag not in ("auto", "cuda"):
                raise ConfigError(f"device={device_flag!r} is not allowed with tp={tp}: rank r "
                                  f"runs on cuda:r; use device=auto or cuda")
            if torch.cuda.device_count() < tp:
                raise ConfigError(f"tp={tp} is not allowed here: it needs {tp} GPUs, this "
                                  f"machine has {torch.cuda.device_count()}")
            ranks.set_nccl_env()                     # inherited by the spawned ranks
        threads = ranks.cpu_threads_per_rank(tp) if backend == "gloo" else torch.get_num_threads()
        store = ranks.host_store()                   # rendezvous on a port the OS picked
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=tp_worker.spawn_main, daemon=True, name=f"labkit-tp{r}",
                             args=(r, tp, store.port, backend, os.getpid(), threads))
                 for r in range(1, tp)]
        for p in procs:
            p.start()
        group = None
        try:
            _wait_until_up(store, procs)
            device = ranks.rank_device(backend, 0)
            dist.init_process_group(backend, store=store, rank=0, world_size=tp,
                                    timeout=tp_worker.STEP_TIMEOUT)
            group = cls(tp, device, tp_worker.new_control_group(), procs)
            if backend == "gloo":
                torch.set_num_threads(threads)
            log.info("tensor parallel: %d ranks (%s), workers pid %s", tp, backend,
                     ", ".join(str(p.pid) for p in procs))
            return group
        except BaseException:
            _stop_processes(procs, polite=False)
            if dist.is_initialized():
                dist.destroy_process_group()
            raise

    @classmethod
    def _join_torchrun(cls, tp: int, device: torch.device) -> "TPGroup":
        world = dist.get_world_size()
        if tp != world:
            raise ConfigError(f"tp={tp} is not allowed here: torchrun started {world} processes; "
                              f"pass --tp {world}")
        if device.type != _torchrun["device"].type:
            raise ConfigError(f"device={device} is not allowed here: torchrun's ranks run on "
                              f"{_torchrun['device'].type} ({dist.get_backend()})")
        return cls(tp, _torchrun["device"], _torchrun["ctrl"], procs=[])

    # ------------------------------------------------------------------ start-up checkpoints
    def agree_kv_plan(self, plan):
        """Every rank sized its KV cache; all take the smallest block count."""
        statuses = tp_worker.exchange({"num_blocks": plan.num_blocks}, self.ctrl)
        self._raise_if_failed(statuses)
        n = min(s["num_blocks"] for s in statuses)
        return dataclasses.replace(plan, num_blocks=n, how=plan.how + f"; the smallest of {self.tp} ranks")

    def attach(self, runner) -> None:
        """Wait until every rank built its ModelRunner; from now on `runner` drives them."""
        self._raise_if_failed(tp_worker.exchange({"ready": 1}, self.ctrl))
        runner.tp_group, self.ready = self, True

    def _raise_if_failed(self, statuses) -> None:
        err = tp_worker.first_error(statuses)
        if err:
            self.broken = err
            raise RuntimeError(err)

    # ------------------------------------------------------------------ steps
    def run_step(self, header, buffers, forward) -> torch.Tensor:
        """Send the step to ranks 1.., then run `forward(header)` here (ModelRunner.execute)."""
        self.check()
        part = buffers.used(header.num_rows, bool(header.rope_scaled))
        h = dataclasses.astuple(header)
        try:
            self._send(STEP, *h, num_ints=part.stop - part.start)
            dist.broadcast(buffers.host_t[part], src=0, group=self.ctrl)
            return forward(header)
        except Exception as e:              # a collective failed: most likely a rank died
            self.broken = self._dead_rank(wait=2.0) or f"a step failed ({type(e).__name__}: {e})"
            raise RuntimeError(self._out_of_step()) from e
        except BaseException as e:          # Ctrl-C mid-step: the ranks stopped at different places
            self.broken = f"a step was interrupted ({type(e).__name__})"
            raise

    def check(self) -> None:
        """Raise if the group cannot run a step (closed, broken, a spawned rank exited)."""
        if self.closed:
            raise RuntimeError("this engine's tensor-parallel ranks were stopped (close() or a "
                               "newer tp > 1 engine in this process); build a new pipeline")
        self.broken = self.broken or self._dead_rank()
        if self.broken:
            raise RuntimeError(self._out_of_step())

    def _dead_rank(self, wait: float = 0.0) -> str | None:
        """'tensor-parallel rank r exited (code c)' for the first spawned rank that exited."""
        deadline = time.monotonic() + wait
        while True:
            for r, p in enumerate(self.procs, 1):
                if p.exitcode is not None:
                    return f"tensor-parallel rank {r} exited (code {p.exitcode})"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _out_of_step(self) -> str:
        return f"{self.broken}; the ranks are out of step: close this pipeline and build a new one"

    def _send(self, command: int, *fields, num_ints: int = 0) -> None:
        values = [command, *fields] + [0] * (HEADER_LEN - 2 - len(fields)) + [num_ints]
        self._header.copy_(torch.tensor(values, dtype=torch.int32))
        dist.broadcast(self._header, src=0, group=self.ctrl)

    # ------------------------------------------------------------------ stop
    def close(self) -> None:
        """Stop ranks 1.. and leave the process group. Never hangs: ranks that do not leave
        when asked are terminated, then killed."""
        global _active
        if self.closed:
            return
        self.closed = True
        if _active is self:
            _active = None
        # healthy: every rank waits for a message (not stuck in start-up or in a step)
        healthy = self.ready and self.broken is None and all(p.exitcode is None for p in self.procs)
        if self.procs:                           # spawned: they exit
            if healthy:
                self._try_send(EXIT)
            _stop_processes(self.procs, polite=healthy)
            dist.destroy_process_group()
            torch.set_num_threads(self._threads)
        elif healthy:                            # torchrun's: they wait for the next engine
            healthy = self._try_send(STOP)
        if _torchrun is not None and not healthy:
            _torchrun["healthy"] = False

    def _try_send(self, command: int, timeout: float = 5.0) -> bool:
        self._header.zero_()
        self._header[0] = command
        work = dist.broadcast(self._header, src=0, group=self.ctrl, async_op=True)
        deadline = time.monotonic() + timeout
        while not work.is_completed():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        try:
            work.wait()
        except RuntimeError:
            return False
        return True


def _wait_until_up(store, procs, timeout: float = 600.0) -> None:
    """Wait for the spawned ranks to reach the store, failing fast if one died on the way."""
    keys = [f"up/{r}" for r in range(1, len(procs) + 1)]
    deadline = time.monotonic() + timeout
    while not store.check(keys):
        for r, p in enumerate(procs, 1):
            if p.exitcode is not None:
                raise RuntimeError(f"tensor-parallel rank {r} exited with code {p.exitcode} "
                                   f"while starting (its error is printed above; a script that "
                                   f"builds a tp > 1 engine must do it under `if __name__ == "
                                   f"'__main__':`, as multiprocessing's spawn requires)")
        if time.monotonic() > deadline:
            raise TimeoutError(f"tensor-parallel ranks did not start within {timeout:.0f} s")
        time.sleep(0.05)


def _stop_processes(procs, polite: bool) -> None:
    """Join (after EXIT), then SIGTERM, then SIGKILL whatever is still running."""
    deadline = time.monotonic() + (10.0 if polite else 0.0)
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(timeout=3)
        if p.is_alive():
            p.kill()
            p.join()


# ---------------------------------------------------------------------------- torchrun
def use_torchrun_group(ctrl, device: torch.device) -> None:
    """tp_worker.main on torchrun's rank 0: engines join these ranks instead of spawning."""
    global _torchrun
    _torchrun = {"ctrl": ctrl, "device": device, "healthy": True}


def release_torchrun_group() -> bool:
    """At the end of rank 0's command: close a forgotten engine, tell the ranks to EXIT.
    False when they are out of step (then torchrun stops them, seeing rank 0 fail)."""
    global _torchrun
    if _active is not None:
        _active.close()
    ok = _torchrun["healthy"]
    if ok:
        header = torch.zeros(HEADER_LEN, dtype=torch.int32)
        header[0] = EXIT
        dist.broadcast(header, src=0, group=_torchrun["ctrl"])
    _torchrun = None
    return ok


def start(model, ec: EngineConfig, device: torch.device, dtype: torch.dtype,
          max_positions: int, workspace=None) -> TPGroup | None:
    """LLMEngine's entry: None at tp=1 (unless torchrun started more ranks: an error)."""
    if ec.tp == 1:
        if _torchrun is not None and dist.get_world_size() > 1:
            raise ConfigError(f"tp=1 is not allowed here: torchrun started "
                              f"{dist.get_world_size()} processes; pass --tp {dist.get_world_size()}")
        return None
    return TPGroup.start(model, ec, device, dtype, max_positions, workspace)
