"""Tensor-parallel ranks 1..tp-1: load a shard, then run every step rank 0 sends.

Rank 0 (the caller's process: LLMEngine, the scheduler, the sampler) drives; see
labkit/engine/tp_group.py. The other ranks run `serve` below, started either way:

    spawned      LLMEngine(tp=N) starts N-1 processes with torch.multiprocessing ("spawn")
                 on this machine (spawn_main)
    torchrun     torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d \\
                     --rdzv-endpoint HOST:29400 -m labkit.engine.tp_worker chat MODEL --tp 8
                 every process runs `main`: rank 0 runs the labkit command (`labkit chat ...`,
                 `labkit bench throughput ...`), the others serve it

Messages, all on a gloo "control" group with CPU tensors (so NCCL carries only the model's
collectives): a header of HEADER_LEN int32 [command, StepHeader fields..., ints that follow],
then per command
    SETUP  one pickled object: the model, the resolved EngineConfig, dtype, max_positions
    STEP   the used part of the step buffer (StepBuffers.used: n int32)
    STOP   nothing: drop the engine, wait for the next SETUP (torchrun: one job, many engines)
    EXIT   nothing: leave the process
Start-up has two checkpoints where every rank reports {"num_blocks": n} or {"error": text}
(all_gather_object): after loading (the KV cache is sized to the smallest rank) and after
building the ModelRunner (CUDA graphs captured). A rank that failed makes every rank stop.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from labkit.dist import ranks

STEP, SETUP, STOP, EXIT = 1, 2, 3, 4
HEADER_LEN = 9
# A collective inside a step waits at most this long for the other ranks (a rank that hangs);
# a rank that dies is seen at once (its sockets close), a spawned one before each step.
STEP_TIMEOUT = datetime.timedelta(seconds=60)
# Ranks 1.. wait for rank 0's next message on the control group, between requests too: idle
# for up to this long (gloo adds it to a nanosecond clock: years would overflow).
IDLE_TIMEOUT = datetime.timedelta(days=30)


def new_control_group():
    """Every rank calls this once, in the same order, after the default group is up."""
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def exchange(status: dict, ctrl) -> list[dict]:
    """Every rank's start-up status ({"num_blocks": n} or {"error": text}), by rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, status, group=ctrl)
    return out


def first_error(statuses: list[dict]) -> str | None:
    for r, s in enumerate(statuses):
        if "error" in s:
            return f"tensor-parallel rank {r} failed to start: {s['error']}"
    return None


# ---------------------------------------------------------------------------- one rank
def build(setup: dict, rank: int, tp: int, device: torch.device, ctrl):
    """Load this rank's shard and build its ModelRunner, in step with the other ranks.
    Returns the runner, or None when some rank failed (every rank then stops)."""
    from labkit.engine.kv_cache import plan_kv_cache
    from labkit.engine.model_runner import ModelRunner
    from labkit.models.llama import LlamaForCausalLM
    ec, dtype = setup["ec"], getattr(torch, setup["dtype"])
    try:
        model = LlamaForCausalLM.from_pretrained(setup["model"], rank=rank, tp=tp, dtype=dtype,
                                                 device=device, max_positions=setup["max_positions"],
                                                 rope_scaling_factor=ec.rope_scaling_factor,
                                                 use_logn_attn=ec.use_logn_attn)
        plan = plan_kv_cache(model.cfg, ec, device, dtype, workspace=_path(setup.get("workspace")))
        status = {"num_blocks": plan.num_blocks}
    except Exception as e:
        status = {"error": _describe(e)}
    statuses = exchange(status, ctrl)
    if first_error(statuses):
        return None
    plan = dataclasses.replace(plan, num_blocks=min(s["num_blocks"] for s in statuses))
    try:
        runner, status = ModelRunner(model, model.cfg, ec, plan, device, dtype), {"ready": 1}
    except Exception as e:
        runner, status = None, {"error": _describe(e)}
    return runner if not first_error(exchange(status, ctrl)) else None


def serve(rank: int, tp: int, device: torch.device, ctrl, exit_on_stop: bool) -> None:
    """Rank > 0: wait for rank 0's messages and do what they say until EXIT."""
    from labkit.engine.model_runner import StepHeader
    header = torch.zeros(HEADER_LEN, dtype=torch.int32)
    runner = None
    while True:
        dist.broadcast(header, src=0, group=ctrl)
        command, *fields, num_ints = header.tolist()
        if command == STEP:
            h = StepHeader(bool(fields[0]), *fields[1:])
            part = runner.buffers.used(h.num_rows, bool(h.rope_scaled))      # num_ints long
            dist.broadcast(runner.buffers.host_t[part], src=0, group=ctrl)
            with torch.inference_mode():
                runner.forward_from_buffers(h)            # logits are rank 0's to sample
        elif command == SETUP:
            setup = [None]
            dist.broadcast_object_list(setup, src=0, group=ctrl)
            runner = build(setup[0], rank, tp, device, ctrl)
            if runner is None:
                return
        elif command == STOP:
            runner = None
            if exit_on_stop:
                return
        elif command == EXIT:
            return


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=-3)}"


# ---------------------------------------------------------------------------- spawned
def _exit_with_parent(parent_pid: int) -> None:
    """A spawned rank must not outlive the process that started it (killed, crashed)."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="labkit-tp-parent-watch", daemon=True).start()


def spawn_main(rank: int, tp: int, port: int, backend: str, parent_pid: int, threads: int) -> None:
    """Entry of a rank started by LLMEngine (torch.multiprocessing, "spawn")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is rank 0's to handle: it stops us
    _exit_with_parent(parent_pid)
    torch.set_num_threads(threads)
    device = ranks.join_store(port, rank, tp, backend, STEP_TIMEOUT)
    ctrl = new_control_group()
    try:
        serve(rank, tp, device, ctrl, exit_on_stop=True)
    except RuntimeError as e:           # rank 0 went away mid-message: nothing left to serve
        print(f"labkit tp rank {rank}: {e}", file=sys.stderr)
        os._exit(1)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------- torchrun
def main(argv: list[str] | None = None) -> int:
    """torchrun ... -m labkit.engine.tp_worker COMMAND ARGS (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else argv
    if not ranks.launched_by_torchrun():
        print("labkit.engine.tp_worker runs under torchrun, e.g.\n  torchrun --nproc-per-node 3 "
              "-m labkit.engine.tp_worker chat smollm2-135m --tp 3", file=sys.stderr)
        return 2
    rank, world, device = ranks.init_from_env(timeout=STEP_TIMEOUT)
    ctrl = new_control_group()
    if dist.get_backend() == "gloo":
        torch.set_num_threads(ranks.cpu_threads_per_rank(int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if rank != 0:
        serve(rank, world, device, ctrl, exit_on_stop=False)
        dist.destroy_process_group()
        return 0
    from labkit import cli
    from labkit.engine import tp_group
    tp_group.use_torchrun_group(ctrl, device)
    rc = 1
    try:
        rc = cli.main(argv)
    finally:
        if tp_group.release_torchrun_group():    # the other ranks leave too
            dist.destroy_process_group()
    return rc


def _path(p: str | None):
    from pathlib import Path
    return None if p is None else Path(p)


if __name__ == "__main__":
    sys.exit(main())

