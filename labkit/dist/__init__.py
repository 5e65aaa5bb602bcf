"""Tensor parallelism on torch.distributed (lesson 04).

    ranks.py            start N ranks (torch.multiprocessing from a notebook, torchrun from a
                        shell) and join them in a process group: gloo on CPU, NCCL on CUDA
    parallel_linear.py  column-parallel (all-gather) and row-parallel (all-reduce) Linear, the
                        MLP and attention patterns, each checked against the unsplit layer
    comm.py             bytes communicated per token (predicted and counted), all-reduce timing

The engine at tp=N (one process per rank, rank 0 schedules) is labkit/engine/tp_group.py and
labkit/engine/tp_worker.py. `python -m labkit.dist` runs the checks and the timing, on its own
processes or under torchrun.
"""
