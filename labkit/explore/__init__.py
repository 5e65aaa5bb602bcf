"""The data and pictures behind the notebook widgets (labkit/widgets.py), as plain functions.

    memory.py      weights / KV cache / activations per device, from the engine's own planner
    throughput.py  a measured sweep of max_batch_size x quant_policy with the real engine
    xray.py        block tables and queues of a live engine, step by step

Every function returns data or a matplotlib figure, so tests and notebooks call them
without a browser; the widgets only wire sliders and buttons to them.
"""
