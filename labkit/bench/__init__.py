"""`labkit bench ...`: every benchmark prints a readable table and, with --json, one JSON
object on the last line of stdout. Performance claims come from here, never from timed tests.

    throughput.py   the engine vs HF `generate` on a mixed-length workload
    workload.py     the requests (real English prompts of random lengths)
    common.py       commit, device, medians of repeated runs
"""
