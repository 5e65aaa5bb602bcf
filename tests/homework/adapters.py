"""The one seam between the graded tests and a submission (CS336-style adapters).

Every graded test reaches student code through these functions; each imports the student's
file on first use (labkit/grading/submission.py: `$LABKIT_SUBMISSION`, default homework/) and
fails with one readable line when the file or a name is missing. A course that renames a
homework file or function changes it here, nowhere else.
"""
from __future__ import annotations

from labkit.grading.submission import load, require


def _fn(module: str, name: str):
    return require(load(module), name)[0]


# a1 --------------------------------------------------------------------------------
def block_manager_module():
    mod = load("a1_block_manager")
    require(mod, "BlockManager", "chain_hash")
    return mod


def block_manager_class():
    return _fn("a1_block_manager", "BlockManager")


def chain_hash(prev, tokens):
    return _fn("a1_block_manager", "chain_hash")(prev, tokens)


# a2 --------------------------------------------------------------------------------
def paged_decode_torch(q, k_cache, v_cache, block_tables, context_lens, scale):
    return _fn("a2_paged_decode", "paged_decode_torch")(q, k_cache, v_cache, block_tables,
                                                        context_lens, scale)


def paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, scale, out=None):
    return _fn("a2_paged_decode", "paged_decode_triton")(q, k_cache, v_cache, block_tables,
                                                         context_lens, scale, out=out)


# a3 --------------------------------------------------------------------------------
def quantize_kv_int8(x):
    return _fn("a3_kv_int8", "quantize_kv_int8")(x)


def dequantize_kv_int8(codes, scale, zero, dtype):
    return _fn("a3_kv_int8", "dequantize_kv_int8")(codes, scale, zero, dtype)


def store_kv_int8(k, v, k_cache, v_cache, k_params, v_params, slot_mapping):
    return _fn("a3_kv_int8", "store_kv_int8")(k, v, k_cache, v_cache, k_params, v_params,
                                              slot_mapping)


# a4 --------------------------------------------------------------------------------
def quantize_int4(w, group_size):
    return _fn("a4_int4_awq", "quantize_int4")(w, group_size)


def dequantize_int4(q, scale, zero, group_size):
    return _fn("a4_int4_awq", "dequantize_int4")(q, scale, zero, group_size)


def pack_int4(q):
    return _fn("a4_int4_awq", "pack_int4")(q)


def unpack_int4(packed):
    return _fn("a4_int4_awq", "unpack_int4")(packed)


def awq_search_scale(x, w, group_size, n_grid):
    return _fn("a4_int4_awq", "awq_search_scale")(x, w, group_size, n_grid)


# a5 (called inside the rank processes, see tp_checks.py) -----------------------------
def tensor_parallel_module():
    mod = load("a5_tensor_parallel")
    require(mod, "shard_column", "column_parallel_linear", "shard_row", "row_parallel_linear",
            "parallel_mlp")
    return mod
