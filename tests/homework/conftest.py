"""Graded homework tests: collected only with `--homework` (tests/conftest.py), which
`labkit grade` passes. Each test carries `@pytest.mark.points(N, assign="n.m")`; the grading
plugin (labkit/grading/plugin.py) turns outcomes into points. Student code is reached only
through adapters.py, inside the tests, so a file that does not import fails its own tests."""
import torch

# One intra-op thread: the graded shapes are small, and on a shared or busy machine (a
# Gradescope worker, a 2-core CI runner) torch's spinning worker threads made the tiny-model
# engine runs 15x slower (measured: 11 s -> 0.7 s for the same 17 steps under load).
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "points(n, assign='1.2', visibility='visible'): "
                            "points of a graded homework test")
