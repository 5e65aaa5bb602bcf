"""The read side of the int8/int4 KV cache (kernels/kv_quant.py has the format and the store):
Triton helpers shared by the quantized attention kernels (paged_decode_quant, paged_prefill_quant).

    load_code_halves / load_code_words, code_words_f16, words_f16   codes -> float16 1024 + code
    scale_and_zero         per-token scale and zero in code units
    attend_quant_tile      one online-softmax tile over quantized K/V (scale and zero folded in)
    load_query_halves      the query rows in the dot dtype, and their sum
"""
from __future__ import annotations

from kernels._triton import tl, triton

__all__ = ["load_code_halves", "load_code_words", "code_words_f16", "words_f16",
           "scale_and_zero", "attend_quant_tile", "load_query_halves"]


@triton.jit
def load_code_halves(data_ptr, rows, valid, D: tl.constexpr, BITS: tl.constexpr,
                     MAGIC: tl.constexpr):
    """The codes of cache rows `rows` (BN,) as two (BN, D/2) tiles, dims [0, D/2) and [D/2, D):
    uint8 codes, or with MAGIC float16 values 1024 + code ready for tl.dot.

    MAGIC: int -> float conversion instructions are slow on GPUs (a quarter of the rate of
    plain integer ops), slower than the memory a decode step waits for. Setting the exponent
    bits instead, 0x6400 | code, is the float16 number 1024 + code (its mantissa holds the
    code): two integer ops and no conversion. The 1024 is subtracted later, with the zero."""
    HALF: tl.constexpr = D // 2
    dl = tl.arange(0, HALF)
    if BITS == 8:
        src = data_ptr + rows[:, None] * D + dl[None, :]
        lo = tl.load(src, mask=valid[:, None], other=0)                  # (BN, HALF) uint8
        hi = tl.load(src + HALF, mask=valid[:, None], other=0)
    else:
        packed = tl.load(data_ptr + rows[:, None] * HALF + dl[None, :], mask=valid[:, None],
                         other=0)                                        # (BN, HALF) uint8
        lo = packed & 15
        hi = packed >> 4
    if MAGIC:
        lo = (lo.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)    # 1024 + code, exact
        hi = (hi.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    return lo, hi


@triton.jit
def words_f16(w, ASM: tl.constexpr):
    """(BN, W) uint32 words holding four codes each (byte i = code 4j + i of the row) ->
    (BN, 4W) float16 1024 + code, in the row's order.

    ASM (on a GPU): one `prmt` puts two code bytes under two 0x64 exponent bytes, so four codes
    cost two instructions; the bit operations below make the same two words (the interpreter,
    which runs no PTX, takes them). The 16-bit halves are then taken apart with plain integer
    ops, not inside the PTX: LLVM sees that two halves of one word are put back together as
    one tensor-core operand register and drops the moves (sm_90 SASS of the int8 decode loop,
    128-token tile: 776 -> 673 instructions; int4 858 -> 755). The four parts are put together
    with join + reshape, which also keeps the conversion on whole words: applied to a (BN, 4W)
    byte tile, Triton moves such elementwise ops after the shared-memory trip into the
    tensor-core layout and reads the bytes one at a time there (64 LDS.U8 per thread and
    64-token tile in the first kernel); on words it reads them with ldmatrix and converts in
    the operand registers."""
    BN: tl.constexpr = w.shape[0]
    W: tl.constexpr = w.shape[1]
    if ASM:
        a, b = tl.inline_asm_elementwise(
            "prmt.b32 $0, $2, 0x64646464, 0x4140;\n\t"                # bytes [c0, 64, c1, 64]
            "prmt.b32 $1, $2, 0x64646464, 0x4342;",                    # bytes [c2, 64, c3, 64]
            "=r,=r,r", [w], dtype=(tl.uint32, tl.uint32), is_pure=True, pack=1)
    else:
        a = (w & 0xFF) | ((w & 0xFF00) << 8) | 0x64006400             # 0x64 c1 64 c0
        b = ((w >> 16) & 0xFF) | ((w >> 8) & 0xFF0000) | 0x64006400    # 0x64 c3 64 c2
    c0 = (a & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)      # 1024 + code, exact
    c1 = (a >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    c2 = (b & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True)
    c3 = (b >> 16).to(tl.uint16).to(tl.float16, bitcast=True)
    # join(join(c0, c2), join(c1, c3))[j, a, b] = c_(2a + b): flattened, code 4j + 2a + b
    return tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (BN, 4 * W))


@triton.jit
def load_code_words(data_ptr, rows, valid, D: tl.constexpr, BITS: tl.constexpr):
    """The codes of cache rows `rows` (BN,) read as 32-bit words (a row is D or D/2 bytes, a
    multiple of 4 for D >= 8): two (BN, D/8) uint32 tiles for dims [0, D/2) and [D/2, D), four
    codes a word; int4: the packed words and the same shifted right by 4, so their low nibbles
    are the codes (code_words_f16 masks them)."""
    Q: tl.constexpr = D // 8                                     # words per half row (int8)
    words = data_ptr.to(tl.pointer_type(tl.uint32))
    j = tl.arange(0, Q)
    if BITS == 8:
        src = words + rows[:, None] * (D // 4) + j[None, :]
        lo = tl.load(src, mask=valid[:, None], other=0)         # (BN, D/8) dims [0, D/2)
        hi = tl.load(src + Q, mask=valid[:, None], other=0)     # dims [D/2, D)
    else:                                                       # a byte: dim j | dim j + D/2 << 4
        lo = tl.load(words + rows[:, None] * Q + j[None, :], mask=valid[:, None], other=0)
        hi = lo >> 4
    return lo, hi


@triton.jit
def code_words_f16(w, BITS: tl.constexpr, ASM: tl.constexpr):
    """A (BN, D/8) tile of load_code_words -> (BN, D/2) float16 1024 + code (MAGIC codes)."""
    if BITS == 4:
        w = w & 0x0F0F0F0F                                      # the four low nibbles
    return words_f16(w, ASM)


@triton.jit
def scale_and_zero(s_ptr, z_ptr, rows, valid, off, BITS: tl.constexpr):
    """Per-token scale s and zero zc in code units (BN,) float32: x_hat = (c + off - zc) s.
    Rows past the end get s = 1, zc = off (finite: the caller masks them out)."""
    s = tl.load(s_ptr + rows, mask=valid, other=1.0).to(tl.float32)
    z = tl.load(z_ptr + rows, mask=valid, other=0).to(tl.float32)
    if BITS == 8:
        return s, z + off                                        # integer zero point
    return s, off - z / s                                        # float zero m: c s + m


@triton.jit
def attend_quant_tile(q_lo, q_hi, q_sum, m_i, l_i, acc_lo, acc_hi, rows, valid, see,
                      kd_ptr, ks_ptr, kz_ptr, vd_ptr, vs_ptr, vz_ptr, qk_scale,
                      D: tl.constexpr, BITS: tl.constexpr, MAGIC: tl.constexpr,
                      IEEE: tl.constexpr, MASKED: tl.constexpr):
    """One tile of BN cached tokens in online softmax, for M query rows (decode: the GQA group;
    prefill: a query tile). q_lo/q_hi (M, D/2) in the dot dtype, q_sum (M,) float32 their sum;
    rows (BN,) side-cache rows, valid (BN,), see (M, BN) visibility (used when MASKED).
    Returns the new m_i, l_i (M,) and acc_lo, acc_hi (M, D/2) float32.

    Every row dequantizes as x_hat = (c - zc) s, with zc = z (int8) or -m / s (int4), plus the
    1024 of MAGIC codes. That is folded into the products instead of applied to every element:
        q . k_hat = s (q . c - zc sum(q))                                per key column
        sum_t p_t v_hat_t = sum_t (p_t s_t) c_t - sum_t (p_t s_t) zc_t   per output row
    so a tile costs the code -> float step plus a few per-token multiplies."""
    off = 1024.0 if MAGIC else 0.0                               # see load_code_halves
    # ---- scores: q . k_hat
    k_s, k_zc = scale_and_zero(ks_ptr, kz_ptr, rows, valid, off, BITS)         # (BN,) x2
    k_lo, k_hi = load_code_halves(kd_ptr, rows, valid, D, BITS, MAGIC)         # (BN, D/2) x2
    if not MAGIC:          # via float32: Triton's interpreter gets uint8 -> bfloat16 wrong
        k_lo, k_hi = k_lo.to(tl.float32).to(q_lo.dtype), k_hi.to(tl.float32).to(q_lo.dtype)
    if IEEE:
        qc = tl.dot(q_lo, tl.trans(k_lo), input_precision="ieee")
        qc += tl.dot(q_hi, tl.trans(k_hi), input_precision="ieee")            # (M, BN) q . c
    else:
        qc = tl.dot(q_lo, tl.trans(k_lo)) + tl.dot(q_hi, tl.trans(k_hi))
    qk = (qc - q_sum[:, None] * k_zc[None, :]) * (k_s * qk_scale)[None, :]    # (M, BN) log2 units
    if MASKED:
        qk = tl.where(see, qk, float("-inf"))
    # ---- online softmax
    m_new = tl.maximum(m_i, tl.max(qk, 1))                                     # (M,)
    m_use = tl.where(m_new > float("-inf"), m_new, 0.0)          # a row that sees nothing yet
    p = tl.math.exp2(qk - m_use[:, None])                                      # (M, BN)
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    # ---- values: p @ v_hat
    v_s, v_zc = scale_and_zero(vs_ptr, vz_ptr, rows, valid, off, BITS)
    v_lo, v_hi = load_code_halves(vd_ptr, rows, valid, D, BITS, MAGIC)
    if not MAGIC:
        v_lo, v_hi = v_lo.to(tl.float32).to(q_lo.dtype), v_hi.to(tl.float32).to(q_lo.dtype)
    ps = (p * v_s[None, :]).to(v_lo.dtype)                       # (M, BN) weights x scales
    corr = tl.sum(ps.to(tl.float32) * v_zc[None, :], 1)          # (M,) from the rounded weights
    if IEEE:
        pv_lo = tl.dot(ps, v_lo, input_precision="ieee")
        pv_hi = tl.dot(ps, v_hi, input_precision="ieee")
    else:
        pv_lo = tl.dot(ps, v_lo)
        pv_hi = tl.dot(ps, v_hi)
    acc_lo = acc_lo * alpha[:, None] + pv_lo - corr[:, None]
    acc_hi = acc_hi * alpha[:, None] + pv_hi - corr[:, None]
    return m_new, l_i, acc_lo, acc_hi


@triton.jit
def load_query_halves(q_rows_ptr, mask, D: tl.constexpr, MAGIC: tl.constexpr):
    """q_rows_ptr (M, 1) row starts -> q_lo, q_hi (M, D/2) in the dot dtype (float16 with MAGIC,
    else q's own) and their sum (M,) float32, of the values as rounded for the dot, so the zero
    term cancels exactly."""
    HALF: tl.constexpr = D // 2
    dl = tl.arange(0, HALF)
    q_lo = tl.load(q_rows_ptr + dl[None, :], mask=mask, other=0.0)
    q_hi = tl.load(q_rows_ptr + HALF + dl[None, :], mask=mask, other=0.0)
    if MAGIC:
        q_lo = q_lo.to(tl.float16)
        q_hi = q_hi.to(tl.float16)
    q_sum = tl.sum(q_lo.to(tl.float32), 1) + tl.sum(q_hi.to(tl.float32), 1)
    return q_lo, q_hi, q_sum
