"""Start N ranks and join them into one torch.distributed process group.

Two standard ways in, no home-made launcher:

    from a notebook or a script     run_ranks(fn, 3)   torch.multiprocessing ("spawn") starts
                                    3 fresh processes; they meet at a TCPStore this process
                                    hosts on a free port (the OS picks it: no fixed port)
    from a shell, any machines      torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d
                                        --rdzv-endpoint HOST:29400 -m labkit.dist
                                    each process reads RANK, WORLD_SIZE, LOCAL_RANK,
                                    MASTER_ADDR, MASTER_PORT from the environment (init_from_env)

Backend: gloo on CPU (TCP, works anywhere), NCCL on CUDA (NVLink/PCIe/InfiniBand; one GPU per
rank, cuda:LOCAL_RANK). NCCL_NVLS_ENABLE=0 is set in every process before NCCL starts: NVLink
SHARP multicast needs fabric-manager support that shared machines often lack, and NCCL then
fails at the first collective instead of falling back.
"""
from __future__ import annotations

import datetime
import os
import queue
import time
import traceback

import torch
import torch.distributed as dist

STORE_TIMEOUT = datetime.timedelta(seconds=300)   # ranks importing torch on a busy laptop


def backend_for(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def set_nccl_env() -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(backend: str, local: int) -> torch.device:
    """The device a rank computes on: cuda:LOCAL_RANK with NCCL, the CPU with gloo."""
    if backend != "nccl":
        return torch.device("cpu")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def cpu_threads_per_rank(ranks_here: int) -> int:
    """Intra-op threads for each of `ranks_here` processes sharing this machine's cores: more
    threads than cores makes every rank wait for the slowest at each collective."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                                   # macOS
        cores = os.cpu_count() or 1
    return max(1, cores // ranks_here)


def init_from_env(backend: str | None = None,
                  timeout: datetime.timedelta = datetime.timedelta(seconds=60)):
    """Join the group torchrun described in the environment; returns (rank, world, device)."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        set_nccl_env()
    device = rank_device(backend, local_rank())          # before NCCL starts: one GPU per rank
    dist.init_process_group(backend, init_method="env://", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def join_store(port: int, rank: int, world_size: int, backend: str,
               timeout: datetime.timedelta) -> torch.device:
    """Join a group whose TCPStore runs on this machine at `port` (spawned ranks, one GPU
    each with NCCL: cuda:rank). Returns the rank's device."""
    if backend == "nccl":
        set_nccl_env()
    device = rank_device(backend, rank)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=STORE_TIMEOUT)
    store.set(f"up/{rank}", "1")
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return device


def host_store() -> dist.TCPStore:
    """A TCPStore on a port the OS picks (store.port): the rendezvous of spawned ranks."""
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=STORE_TIMEOUT)


# ---------------------------------------------------------------------------- run_ranks
def _rank_main(fn, rank: int, world_size: int, port: int, backend: str, args, results) -> None:
    try:
        if backend == "gloo":
            torch.set_num_threads(cpu_threads_per_rank(world_size))
        join_store(port, rank, world_size, backend, datetime.timedelta(seconds=120))
        out = fn(rank, world_size, *args)
        results.put((rank, True, out))
        dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, backend: str = "gloo", timeout: float = 600.0) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` new processes joined in one process
    group; return [result of rank 0, result of rank 1, ...]. `fn` must live in a module (spawned
    processes import it; a function defined in a notebook cell cannot travel). A rank that
    raises or dies makes this raise, naming the rank, and every other rank is stopped."""
    import torch.multiprocessing as mp
    if backend == "nccl":
        set_nccl_env()                       # inherited by the children
    ctx = mp.get_context("spawn")
    store = host_store()
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, daemon=True, name=f"labkit-rank{r}",
                         args=(fn, r, world_size, store.port, backend, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.2)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs)
                        if r not in out and p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"rank {dead[0][0]} exited with code {dead[0][1]} "
                                       f"before returning a result")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_ranks: no result after {timeout:.0f} s")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10 if len(out) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [out[r] for r in range(world_size)]
