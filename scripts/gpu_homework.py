"""GPU check of the homework's Triton assignment (2.2): the answer key's kernel, compiled (not
interpreted), against labkit's paged_decode_ref at real shapes, and the graded tests of
assignment 2 on the GPU's triton. Run on a machine with one CUDA GPU:

    python scripts/gpu_homework.py

Prints a table last: shape, dtype, max error vs the reference, pass/fail.
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "homework")]    # reference_submission.py

import torch  # noqa: E402


def random_case(rng, B, Hq, Hkv, D, bs, max_len, dtype):
    """Ragged lengths (one 0, one 1), blocks scattered over the pool, random values everywhere
    (the same recipe as tests/homework/test_a2_paged_decode.py, without pytest)."""
    lens = [rng.randint(1, max_len) for _ in range(B)]
    lens[0], lens[-1] = 0, 1
    need = [-(-n // bs) for n in lens]
    ids = list(range(sum(need) + 3))
    rng.shuffle(ids)
    tables = torch.full((B, max(need) + 1), -1, dtype=torch.int32)
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor([ids.pop() for _ in range(n)], dtype=torch.int32)
    nb = sum(need) + 3
    kc, vc = (torch.randn(nb, bs, Hkv, D).to(dtype) for _ in range(2))
    return (torch.randn(B, Hq, D).to(dtype), kc, vc, tables,
            torch.tensor(lens, dtype=torch.int32), D ** -0.5)


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    import reference_submission
    key = reference_submission.build(Path(tempfile.mkdtemp(prefix="hw-key-")))
    os.environ["LABKIT_SUBMISSION"] = str(key)
    from kernels.paged_decode import paged_decode_ref
    from labkit.grading.submission import load
    kernel = load("a2_paged_decode").paged_decode_triton
    rows, ok = [], True
    rng = random.Random(0)
    for B, Hq, Hkv, D, bs, L in [(4, 9, 3, 64, 16, 300), (8, 32, 8, 128, 16, 2048), (16, 32, 32, 128, 64, 1024)]:
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            q, kc, vc, tables, lens, scale = (t.cuda() if torch.is_tensor(t) else t
                                              for t in random_case(rng, B, Hq, Hkv, D, bs, L, dtype))
            out = torch.full_like(q, float("nan"))
            got = kernel(q, kc, vc, tables, lens, scale, out=out)
            want = paged_decode_ref(q.double(), kc.double(), vc.double(), tables, lens, scale)
            err = (got.double() - want).abs().max().item()
            good = err <= tol and torch.isfinite(got).all().item()
            ok &= good
            rows.append((f"B={B} Hq={Hq} Hkv={Hkv} D={D} bs={bs} L<={L}", str(dtype).split(".")[1], err, good))
    print(f"{'shape':<40}{'dtype':<10}{'max err':>10}  result")
    for shape, dt, err, good in rows:
        print(f"{shape:<40}{dt:<10}{err:>10.2e}  {'ok' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
