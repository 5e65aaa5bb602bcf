"""The reference submission: homework/'s stubs with every ASSIGN region filled.

    python tests/homework/reference_submission.py OUT_DIR     writes OUT_DIR/a1_...py ... a5_...py
    build(OUT_DIR)                                            the same, from Python (CI)

Most fills are thin adapters onto labkit (its BlockManager, kernels.paged_decode_ref,
labkit/grading/reference/); the Triton kernel body (2.2) and the tensor-parallel functions
(5.x) are written out, because nothing in labkit has their exact shape. Filling the stubs
(rather than shipping separate solution files) proves that the code around every region
works with a correct answer. This file is the instructors' answer key: it lives with the
graded tests, is not part of homework/ (what students get), and `labkit grade
--make-autograder` leaves it out of the Gradescope bundle (the grader does not need it).
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from labkit.grading.stubs import fill, regions  # noqa: E402


def _labkit_method(name: str, args: str = "seq") -> str:
    return (f"from labkit.engine.block_manager import BlockManager as LabkitBlockManager\n"
            f"return LabkitBlockManager.{name}(self{', ' + args if args else ''})")


A1 = {
    "chain_hash": "from labkit.engine.block_manager import chain_hash as labkit_chain_hash\n"
                  "return labkit_chain_hash(prev, tokens)",
    "_fresh_block_id": _labkit_method("_fresh_block_id", ""),
    "can_allocate": _labkit_method("can_allocate", "seq, reserve"),
    "allocate": _labkit_method("allocate"),
    "free": _labkit_method("free"),
    "can_append": _labkit_method("can_append"),
    "append_slot": _labkit_method("append_slot"),
    "_prefix_hits": _labkit_method("_prefix_hits"),
    "commit": _labkit_method("commit"),
}

A2 = {
    "paged_decode_torch": "from kernels.paged_decode import paged_decode_ref\n"
                          "return paged_decode_ref(q, k_cache, v_cache, block_tables, context_lens, scale)",
    "paged_decode_kernel": '''
b = tl.program_id(0)
h = tl.program_id(1)
g = h // GROUP                                             # the KV head this query head reads
ctx = tl.load(lens_ptr + b)
d = tl.arange(0, D)                                        # (D,)
q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32)   # (D,)
m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)          # running max
l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)                        # running sum
acc = tl.zeros([D], tl.float32)                                         # running p @ V
for n0 in range(0, ctx, BLOCK_N):
    t = n0 + tl.arange(0, BLOCK_N)                         # (BN,) token positions
    valid = t < ctx
    blk = tl.load(tables_ptr + b * stride_tb + t // BLOCK_SIZE, mask=valid, other=0)
    row = (blk.to(tl.int64) * BLOCK_SIZE + t % BLOCK_SIZE) * (HKV * D) + g * D     # (BN,)
    k = tl.load(k_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    s = tl.sum(k.to(tl.float32) * q[None, :], 1) * scale                    # (BN,)
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 0))
    p = tl.exp(s - m_new)                                                   # (BN,)
    alpha = tl.exp(m_i - m_new)
    v = tl.load(v_cache_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
    l_i = l_i * alpha + tl.sum(p, 0)
    acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)          # (D,)
    m_i = m_new
o = tl.where(l_i > 0, acc / tl.where(l_i > 0, l_i, 1.0), 0.0)             # ctx 0: zeros
tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty))
''',
}

A3 = {
    "quantize_kv_int8": "from labkit.grading.reference import kv_int8\n"
                        "return kv_int8.quantize_kv_int8(x)",
    "dequantize_kv_int8": "from labkit.grading.reference import kv_int8\n"
                          "return kv_int8.dequantize_kv_int8(codes, scale, zero, dtype)",
    "store_kv_int8": "from labkit.grading.reference import kv_int8\n"
                     "kv_int8.store_kv_int8(k, v, k_cache, v_cache, k_params, v_params, slot_mapping)",
}

A4 = {
    "quantize_int4": "from labkit.grading.reference import int4\nreturn int4.quantize_int4(w, group_size)",
    "dequantize_int4": "from labkit.grading.reference import int4\n"
                       "return int4.dequantize_int4(q, scale, zero, group_size)",
    "pack_int4": "from labkit.grading.reference import int4\nreturn int4.pack_int4(q)",
    "unpack_int4": "from labkit.grading.reference import int4\nreturn int4.unpack_int4(packed)",
    "awq_search_scale": "from labkit.grading.reference import int4\n"
                        "return int4.awq_search_scale(x, w, group_size, n_grid)",
}

A5 = {
    "shard_column": '''
n = w.shape[0] // world
w_r = w[rank * n:(rank + 1) * n].contiguous()                      # (N/world, K)
return w_r, (None if b is None else b[rank * n:(rank + 1) * n].contiguous())
''',
    "column_parallel_linear": '''
y_r = F.linear(x, w_r, b_r).contiguous()                           # (T, N/world)
parts = [torch.empty_like(y_r) for _ in range(dist.get_world_size())]
dist.all_gather(parts, y_r)
return torch.cat(parts, dim=-1)                                    # (T, N)
''',
    "shard_row": '''
k = w.shape[1] // world
return w[:, rank * k:(rank + 1) * k].contiguous()                  # (N, K/world)
''',
    "row_parallel_linear": '''
y = x_r @ w_r.T                                                    # (T, N) partial sum
dist.all_reduce(y)
return y if b is None else y + b
''',
    "parallel_mlp": '''
rank, world = dist.get_rank(), dist.get_world_size()
g_r, _ = shard_column(w_gate, None, rank, world)                   # (I/world, H)
u_r, _ = shard_column(w_up, None, rank, world)
d_r = shard_row(w_down, rank, world)                               # (H, I/world)
h_r = F.silu(x @ g_r.T) * (x @ u_r.T)                              # (T, I/world)
y = h_r @ d_r.T                                                    # (T, H) partial sum
dist.all_reduce(y)
return y
''',
}

FILLS = {"a1_block_manager.py": A1, "a2_paged_decode.py": A2, "a3_kv_int8.py": A3,
         "a4_int4_awq.py": A4, "a5_tensor_parallel.py": A5}


def build(out_dir, fills: dict | None = None, homework: Path = REPO / "homework") -> Path:
    """Write the filled homework files into out_dir (`fills` overrides FILLS per file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fills = fills or FILLS
    for name, code in fills.items():
        text = (homework / name).read_text()
        missing = {r.function for r in regions(text, name)} - set(code)
        assert not missing, f"{name}: no fill for {sorted(missing)}"
        (out / name).write_text(fill(text, code, name))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/homework/reference_submission.py OUT_DIR")
    print(build(sys.argv[1]))
