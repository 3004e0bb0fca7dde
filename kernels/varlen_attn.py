"""Attention over packed variable-length sequences in Triton: forward and backward.

Layout as in FlashAttention's varlen interface: q ``(total_q, nheads, d)``, k and v
``(total_k, nheads_k, d)``, sequence ``b`` owns tokens ``cu_seqlens[b] : cu_seqlens[b + 1]``.

Masking is one rule for causal, sliding-window and full attention: query ``i`` of a sequence
sees key ``j`` when ``i + diag - left <= j <= i + diag + right`` with ``diag = len_k - len_q``
(bottom-right alignment, as FlashAttention 2); causal is ``right = 0``; a negative bound is
unbounded. Each program splits its loop into blocks that need no mask (most of them) and the
few on the window edges or the ragged end of a sequence, which are masked.

No host sync: the grid is sized from tensor shapes (``cdiv(total, BLOCK) + batch`` tiles is
an upper bound on the real tiles) and a tile map built on the device by ``tile_map`` names
each tile's (sequence, block); spare tiles exit at once. Tiles are ordered by decreasing work,
so the long sequences start first and the short ones fill in behind them.

The backward is deterministic: one kernel owns a block of keys (and the whole GQA group of its
kv head) and accumulates dk and dv over the queries that see it; another owns a block of
queries and accumulates dq. No atomics.

Softmax runs in the log2 domain (scores pre-multiplied by ``scale * log2(e)``, ``exp2``);
the returned LSE is in natural log. Rows that see no key at all get output 0 and LSE -inf.
"""
import os
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary
import triton
import triton.language as tl

from fasttrain.kernels.common import on_device_of_first_arg, round_to_bf16_bits

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


@triton.jit
def _tanh(x, ACCURATE: tl.constexpr):
    # tanh from exp2 (libdevice is unavailable under the interpreter); saturates cleanly at +-1.
    # 1 - 2 / (e + 1) cancels for small |x| (1e-3 relative error at |x| = 1e-4, 2e-7 from
    # |x| = 0.5 on). ACCURATE (fp32 inputs) takes tanh's odd Taylor series to x^15 below 0.5
    # (< 1e-7 relative error in fp32); bf16/fp16 do not need it.
    e = tl.exp2(x * 2.8853900817779268)  # 2 * log2(e)
    t = 1.0 - 2.0 / (e + 1.0)
    if ACCURATE:
        x2 = x * x
        p = -0.0014558343870513183 * x2 + 0.003592128036572481
        p = p * x2 - 0.008863235529902197
        p = p * x2 + 0.021869488536155203
        p = p * x2 - 0.05396825396825397
        p = p * x2 + 0.13333333333333333
        p = p * x2 - 0.3333333333333333
        p = p * x2 + 1.0
        t = tl.where(tl.abs(x) < 0.5, x * p, t)
    return t


@triton.jit
def _seq_bounds(cu_ptr, seq, total):
    # (start, length) of sequence seq, clamped to [0, total] so that even a bad cu_seqlens
    # cannot send a load out of bounds.
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + seq), 0), total)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + seq + 1), start), total)
    return start, end - start


@triton.jit
def _load_tile(ptr, idx, stride, offs_d, idx_mask, MASK_IDX: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    # rows idx (token indices) x head dim of one head; ptr already points at the head.
    ptrs = ptr + idx[:, None].to(tl.int64) * stride + offs_d[None, :]
    if MASK_IDX:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=idx_mask[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=idx_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_tile(ptr, idx, stride, offs_d, idx_mask, x, HEAD_DIM: tl.constexpr,
                ROUND_BF16: tl.constexpr):
    # ROUND_BF16 (bf16 output under the interpreter): round to nearest even by bit operations,
    # as the GPU's cast does (the interpreter's cast truncates).
    ptrs = ptr + idx[:, None].to(tl.int64) * stride + offs_d[None, :]
    mask = idx_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    if ROUND_BF16:
        tl.store(ptrs, round_to_bf16_bits(x, None), mask=mask)
    else:
        tl.store(ptrs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _operand(x, like, UPCAST: tl.constexpr):
    # x (fp32) as a dot operand next to ``like``: the inputs' dtype, as on the GPU. Under the
    # interpreter with bf16 inputs (UPCAST: operands held in fp32) the bf16 rounding is
    # reproduced by bit operations, so the tests see the GPU's arithmetic.
    if UPCAST:
        return round_to_bf16_bits(x, None).to(tl.float32)
    return x.to(like.dtype)


@triton.jit
def _scores(q, k, qk_scale, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    # Scores q k^T of a block in the log2 domain, and tanh of the capped scores (the backward
    # needs it); called with (k, q) for the transposed block. Without softcap:
    # qk_scale = scale * log2(e). With it: qk_scale = scale / softcap and
    # softcap = softcap * log2(e).
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if SOFTCAP:
        t = _tanh(s * qk_scale, PRECISION == "ieee")
        return t * softcap, t
    return s * qk_scale, s


@triton.jit
def _visible(rows, cols, len_q, len_k, diag, window_left, window_right, CHECK_ROWS: tl.constexpr,
             WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    # Where query row sees key col, over one block: rows and cols are query and key indices
    # broadcastable to the block's shape ([:, None] and [None, :], or transposed).
    ok = cols < len_k
    if CHECK_ROWS:
        ok = ok & (rows < len_q)
    if WINDOW_LEFT:
        ok = ok & (cols >= rows + diag - window_left)
    if WINDOW_RIGHT:
        ok = ok & (cols <= rows + diag + window_right)
    return ok


@triton.jit
def _key_range(m_start, len_k, diag, window_left, window_right, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    # For queries [m_start, m_start + BLOCK_M): the keys [lo, hi) any of them sees, and the part
    # [full_lo, full_hi) in which every query sees every key of each BLOCK_N block (no mask).
    # lo, full_lo, full_hi are multiples of BLOCK_N (or equal hi).
    lo = len_k * 0
    hi = len_k
    full_lo = lo
    full_hi = len_k // BLOCK_N * BLOCK_N
    if WINDOW_LEFT:
        lo = tl.maximum(m_start + diag - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = (m_start + BLOCK_M - 1 + diag - window_left + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    if WINDOW_RIGHT:
        hi = tl.minimum(m_start + BLOCK_M + diag + window_right, len_k)
        full_hi = tl.minimum(full_hi, (m_start + diag + window_right + 1) // BLOCK_N * BLOCK_N)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_range(n_start, len_q, diag, window_left, window_right, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    # For keys [n_start, n_start + BLOCK_N): the queries [lo, hi) that see any of them, and the
    # part [full_lo, full_hi) of whole BLOCK_M blocks in which every query sees every key.
    lo = len_q * 0
    hi = len_q
    full_lo = lo
    full_hi = len_q // BLOCK_M * BLOCK_M
    if WINDOW_RIGHT:
        lo = tl.maximum(n_start - diag - window_right, 0) // BLOCK_M * BLOCK_M
        full_lo = (n_start + BLOCK_N - 1 - diag - window_right + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    if WINDOW_LEFT:
        hi = tl.minimum(n_start + BLOCK_N - diag + window_left, len_q)
        full_hi = tl.minimum(full_hi, (n_start - diag + window_left + 1) // BLOCK_M * BLOCK_M)
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _region(r: tl.constexpr, lo, full_lo, full_hi, hi):
    # The loop bounds of region r of a range split by _key_range/_query_range: 0 and 2 are the
    # masked edges, 1 the mask-free middle.
    if r == 0:
        return lo, full_lo
    elif r == 1:
        return full_lo, full_hi
    else:
        return full_hi, hi


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, k_start, rows, offs_n,
                offs_d, start, end, len_q, len_k, diag, window_left, window_right, qk_scale,
                softcap, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                WINDOW_RIGHT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                RAW_MAX: tl.constexpr):
    # RAW_MAX (no softcap, qk_scale > 0): max(s) * scale = max(s * scale), so the row max is
    # taken on the raw scores and the scale goes into exp2's argument: one FMA a score instead
    # of a multiply and a subtraction.
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_tile(k_base, k_start + cols, stride_kt, offs_d, cols < len_k, MASKED,
                       HEAD_DIM, BLOCK_D, UPCAST)
        v = _load_tile(v_base, k_start + cols, stride_vt, offs_d, cols < len_k, MASKED,
                       HEAD_DIM, BLOCK_D, UPCAST)
        if RAW_MAX:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            sc = qk_scale
        else:
            s, _ = _scores(q, k, qk_scale, softcap, SOFTCAP, PRECISION)
            sc = 1.0
        if MASKED:
            ok = _visible(rows[:, None], cols[None, :], len_q, len_k, diag, window_left,
                          window_right, False, WINDOW_LEFT, WINDOW_RIGHT)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * sc)
            # a row that has seen no key yet keeps max -inf: subtract 0 instead (exp2 -> 0)
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * sc)
            m_sub = m_new
        p = tl.exp2(s * sc - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = tl.dot(_operand(p, v, UPCAST), v, input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _varlen_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr, tiles_ptr,
    n_tiles, nheads, group, total_q, total_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    qk_scale, softcap, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, RAW_MAX: tl.constexpr,
):
    # One program: BLOCK_M queries of one sequence x one head.
    pid = tl.program_id(0)
    tile = pid // nheads
    head = pid % nheads
    seq = tl.load(tiles_ptr + tile)
    if seq < 0:
        return
    blk = tl.load(tiles_ptr + n_tiles + tile)
    q_start, len_q = _seq_bounds(cu_q_ptr, seq, total_q)
    k_start, len_k = _seq_bounds(cu_k_ptr, seq, total_k)
    diag = len_k - len_q
    m_start = blk * BLOCK_M
    kv_head = (head // group).to(tl.int64)

    rows = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + head.to(tl.int64) * stride_qh, q_start + rows, stride_qt, offs_d,
                   rows < len_q, True, HEAD_DIM, BLOCK_D, UPCAST)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, full_lo, full_hi, hi = _key_range(m_start, len_k, diag, window_left, window_right,
                                          BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
    for r in tl.static_range(3):
        start, end = _region(r, lo, full_lo, full_hi, hi)
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt,
                                    k_start, rows, offs_n, offs_d, start, end, len_q, len_k, diag,
                                    window_left, window_right, qk_scale, softcap, r != 1,
                                    HEAD_DIM, BLOCK_N, BLOCK_D, SOFTCAP, WINDOW_LEFT,
                                    WINDOW_RIGHT, UPCAST, PRECISION, RAW_MAX)

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453  # ln(2)
    lse = tl.where(empty, float("-inf"), lse)
    row_ok = rows < len_q
    _store_tile(out_ptr + head.to(tl.int64) * stride_oh, q_start + rows, stride_ot, offs_d,
                row_ok, acc, HEAD_DIM, UPCAST)
    tl.store(lse_ptr + head.to(tl.int64) * total_q + q_start + rows, lse, mask=row_ok)


@triton.jit
def _varlen_attn_bwd_preprocess_kernel(
    out_ptr, dout_ptr, lse_ptr, dlse_ptr, delta_ptr, total_q,
    stride_ot, stride_oh, stride_dot, stride_doh,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    # delta = rowsum(dout * out) - dlse, per (head, token), fp32. A row that sees no key (lse
    # -inf, a constant) takes no dlse: an infinite one would make its p * (dp - delta) 0 * inf.
    head = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < total_q
    o = _load_tile(out_ptr + head * stride_oh, rows, stride_ot, offs_d, row_ok, True, HEAD_DIM,
                   BLOCK_D, True)
    do = _load_tile(dout_ptr + head * stride_doh, rows, stride_dot, offs_d, row_ok, True,
                    HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        dlse = tl.load(dlse_ptr + head * total_q + rows, mask=row_ok, other=0.0)
        lse = tl.load(lse_ptr + head * total_q + rows, mask=row_ok, other=0.0)
        delta -= tl.where(lse == float("-inf"), 0.0, dlse)
    tl.store(delta_ptr + head * total_q + rows, delta, mask=row_ok)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, first_head, group,
                 stride_qh, stride_doh, total_q, stride_qt, stride_dot, q_start, cols, offs_m,
                 offs_d, start, end, len_q, len_k, diag, window_left, window_right, qk_scale,
                 softcap, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                 WINDOW_RIGHT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The query blocks [start, end) of every query head of the GQA group in one loop (head g,
    # block start_m as counters): one pipeline fill and drain for the group instead of one per
    # head, which short sequences (a few blocks a head) would pay in full.
    g = start * 0
    start_m = start
    for _ in range(0, tl.cdiv(end - start, BLOCK_M) * group):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        head = first_head + g
        q_base = q_ptr + head * stride_qh
        do_base = do_ptr + head * stride_doh
        lse_base = lse_ptr + head * total_q
        delta_base = delta_ptr + head * total_q
        rows = start_m + offs_m
        row_ok = rows < len_q
        q = _load_tile(q_base, q_start + rows, stride_qt, offs_d, row_ok, MASKED, HEAD_DIM,
                       BLOCK_D, UPCAST)
        do = _load_tile(do_base, q_start + rows, stride_dot, offs_d, row_ok, MASKED, HEAD_DIM,
                        BLOCK_D, UPCAST)
        if MASKED:
            lse = tl.load(lse_base + q_start + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + q_start + rows, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_base + q_start + rows)
            delta = tl.load(delta_base + q_start + rows)
        # transposed blocks, (BLOCK_N, BLOCK_M): every dot then has BLOCK_N rows (wgmma wants
        # 64 per warpgroup) while BLOCK_M, the query step, may stay small
        st, tt = _scores(k, q, qk_scale, softcap, SOFTCAP, PRECISION)
        pt = tl.exp2(st - lse[None, :] * 1.4426950408889634)
        if MASKED:
            ok = _visible(rows[None, :], cols[:, None], len_q, len_k, diag, window_left,
                          window_right, True, WINDOW_LEFT, WINDOW_RIGHT)
            pt = tl.where(ok, pt, 0.0)
        dv += tl.dot(_operand(pt, do, UPCAST), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dk += tl.dot(_operand(dst, q, UPCAST), q, input_precision=PRECISION)
        start_m += BLOCK_M
        wrap = start_m >= end
        start_m = tl.where(wrap, start, start_m)
        g = tl.where(wrap, g + 1, g)
    return dk, dv


@triton.jit
def _varlen_attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_q_ptr, cu_k_ptr,
    tiles_ptr, n_tiles, nheads_k, group, total_q, total_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    sm_scale, qk_scale, softcap, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program: BLOCK_N keys of one sequence x one kv head, over every query head of its
    # GQA group and every query block that sees these keys.
    pid = tl.program_id(0)
    tile = pid // nheads_k
    kv_head = (pid % nheads_k).to(tl.int64)
    seq = tl.load(tiles_ptr + tile)
    if seq < 0:
        return
    blk = tl.load(tiles_ptr + n_tiles + tile)
    q_start, len_q = _seq_bounds(cu_q_ptr, seq, total_q)
    k_start, len_k = _seq_bounds(cu_k_ptr, seq, total_k)
    diag = len_k - len_q
    n_start = blk * BLOCK_N

    cols = n_start + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = cols < len_k
    k = _load_tile(k_ptr + kv_head * stride_kh, k_start + cols, stride_kt, offs_d, col_ok, True,
                   HEAD_DIM, BLOCK_D, UPCAST)
    v = _load_tile(v_ptr + kv_head * stride_vh, k_start + cols, stride_vt, offs_d, col_ok, True,
                   HEAD_DIM, BLOCK_D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, full_lo, full_hi, hi = _query_range(n_start, len_q, diag, window_left, window_right,
                                            BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
    for r in tl.static_range(3):
        start, end = _region(r, lo, full_lo, full_hi, hi)
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, dout_ptr, lse_ptr, delta_ptr,
                              kv_head * group, group, stride_qh, stride_doh, total_q, stride_qt,
                              stride_dot, q_start, cols, offs_m, offs_d, start, end, len_q, len_k,
                              diag, window_left, window_right, qk_scale, softcap, r != 1,
                              HEAD_DIM, BLOCK_M, BLOCK_D, SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT,
                              UPCAST, PRECISION)
    _store_tile(dk_ptr + kv_head * stride_dkh, k_start + cols, stride_dkt, offs_d, col_ok,
                dk * sm_scale, HEAD_DIM, UPCAST)
    _store_tile(dv_ptr + kv_head * stride_dvh, k_start + cols, stride_dvt, offs_d, col_ok, dv,
                HEAD_DIM, UPCAST)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, k_start, rows,
               offs_n, offs_d, start, end, len_q, len_k, diag, window_left, window_right,
               qk_scale, softcap, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr,
               WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k = _load_tile(k_base, k_start + cols, stride_kt, offs_d, cols < len_k, MASKED,
                       HEAD_DIM, BLOCK_D, UPCAST)
        v = _load_tile(v_base, k_start + cols, stride_vt, offs_d, cols < len_k, MASKED,
                       HEAD_DIM, BLOCK_D, UPCAST)
        s, t = _scores(q, k, qk_scale, softcap, SOFTCAP, PRECISION)
        p = tl.exp2(s - lse[:, None])
        if MASKED:
            ok = _visible(rows[:, None], cols[None, :], len_q, len_k, diag, window_left,
                          window_right, False, WINDOW_LEFT, WINDOW_RIGHT)
            p = tl.where(ok, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(_operand(ds, k, UPCAST), k, input_precision=PRECISION)
    return dq


@triton.jit
def _varlen_attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr, cu_k_ptr,
    tiles_ptr, n_tiles, nheads, group, total_q, total_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    sm_scale, qk_scale, softcap, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # One program: dq of BLOCK_M queries of one sequence x one head.
    pid = tl.program_id(0)
    tile = pid // nheads
    head = (pid % nheads).to(tl.int64)
    seq = tl.load(tiles_ptr + tile)
    if seq < 0:
        return
    blk = tl.load(tiles_ptr + n_tiles + tile)
    q_start, len_q = _seq_bounds(cu_q_ptr, seq, total_q)
    k_start, len_k = _seq_bounds(cu_k_ptr, seq, total_k)
    diag = len_k - len_q
    m_start = blk * BLOCK_M
    kv_head = head // group

    rows = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < len_q
    q = _load_tile(q_ptr + head * stride_qh, q_start + rows, stride_qt, offs_d, row_ok, True,
                   HEAD_DIM, BLOCK_D, UPCAST)
    do = _load_tile(dout_ptr + head * stride_doh, q_start + rows, stride_dot, offs_d, row_ok,
                    True, HEAD_DIM, BLOCK_D, UPCAST)
    # rows that see no key have lse = -inf; any finite value works there (p is masked to 0)
    lse = tl.load(lse_ptr + head * total_q + q_start + rows, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
    delta = tl.load(delta_ptr + head * total_q + q_start + rows, mask=row_ok, other=0.0)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, full_lo, full_hi, hi = _key_range(m_start, len_k, diag, window_left, window_right,
                                          BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
    for r in tl.static_range(3):
        start, end = _region(r, lo, full_lo, full_hi, hi)
        dq = _dq_blocks(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, k_start,
                        rows, offs_n, offs_d, start, end, len_q, len_k, diag, window_left,
                        window_right, qk_scale, softcap, r != 1, HEAD_DIM, BLOCK_N, BLOCK_D,
                        SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, UPCAST, PRECISION)
    _store_tile(dq_ptr + head * stride_dqh, q_start + rows, stride_dqt, offs_d, row_ok,
                dq * sm_scale, HEAD_DIM, UPCAST)


# ----------------------------------------------------------------------------- launchers


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def configs(head_dim: int, dtype: torch.dtype = torch.bfloat16,
            interpret: bool | None = None) -> dict:
    """Block sizes and launch options per kernel: {"fwd"|"dkdv"|"dq": dict(BLOCK_M, BLOCK_N,
    num_warps, num_stages)}. H100 choices made without a GPU (bench/NOTES.md): from the sm_90
    builds, configs whose dots all compile to wgmma with no or little register spilling;
    ``python -m bench.tune`` times them on a GPU (issue 6). fp32 inputs take half-size blocks
    (shared memory). The interpreter gets big blocks (it pays per program, not per element)."""
    if _interpret() if interpret is None else interpret:
        one = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
        return {"fwd": one, "dkdv": one, "dq": one}
    # 3 stages wherever it fits: with 2, Triton's sm_90 loops wait for all of their loads at
    # the top of every iteration (DEPBAR 0 in the SASS: nothing in flight behind the dots)
    if head_dim <= 64:
        cfgs = {"fwd": dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
                "dkdv": dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
                "dq": dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)}
    elif head_dim <= 128:
        cfgs = {"fwd": dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                "dkdv": dict(BLOCK_M=16, BLOCK_N=128, num_warps=8, num_stages=3),
                "dq": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)}
    else:  # d=256: the forward spills at 3 stages, dK/dV at 2
        cfgs = {"fwd": dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
                "dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
                "dq": dict(BLOCK_M=64, BLOCK_N=16, num_warps=8, num_stages=3)}
    if dtype == torch.float32:
        cfgs = {kind: dict(cfg, BLOCK_M=max(16, cfg["BLOCK_M"] // 2),
                           BLOCK_N=max(16, cfg["BLOCK_N"] // 2)) for kind, cfg in cfgs.items()}
    return cfgs


def max_tiles(total: int, batch: int, block: int) -> int:
    """Upper bound on the blocks of ``block`` tokens over ``batch`` sequences of ``total``
    tokens in all: each sequence wastes less than one block."""
    return triton.cdiv(total, block) + batch if total > 0 else 0


def tile_map(cu_seqlens: torch.Tensor, cu_other: torch.Tensor, block: int, n_tiles: int, *,
             keys: bool, window_left: int, window_right: int) -> torch.Tensor:
    """(2, n_tiles) int32 on the device: row 0 the sequence of each tile (-1: spare tile),
    row 1 its block index. Tiles are sorted by decreasing work (the number of tokens on the
    other side each one visits). Built with device ops only: nothing syncs with the host.

    ``cu_seqlens`` are the tiled side's (queries for the forward and dq, keys for dk/dv with
    ``keys=True``), ``cu_other`` the other side's.
    """
    device = cu_seqlens.device
    batch = cu_seqlens.numel() - 1
    if batch == 0 or n_tiles == 0:
        return torch.full((2, n_tiles), -1, dtype=torch.int32, device=device)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long().clamp_min(0)
    lens_other = (cu_other[1:] - cu_other[:-1]).long().clamp_min(0)
    blocks = (lens + block - 1) // block
    ends = torch.cumsum(blocks, 0)
    t = torch.arange(n_tiles, device=device)
    seq = torch.searchsorted(ends, t, right=True)
    valid = seq < batch
    seq = seq.clamp_max(batch - 1)
    blk = t - (ends - blocks)[seq]
    first, last = blk * block, (blk + 1) * block - 1  # token range of the tile (in its sequence)
    mine, other = lens[seq], lens_other[seq]
    if keys:  # key tile [first, last]; query i sees key j when
        # j - diag - right <= i <= j - diag + left
        diag = mine - other
        lo = (first - diag - window_right).clamp_min(0) if window_right >= 0 else 0 * first
        hi = torch.minimum(last - diag + window_left + 1, other) if window_left >= 0 else other
    else:  # query tile: i + diag - left <= j <= i + diag + right
        diag = other - mine
        lo = (first + diag - window_left).clamp_min(0) if window_left >= 0 else 0 * first
        hi = torch.minimum(last + diag + window_right + 1, other) if window_right >= 0 else other
    work = torch.where(valid, (hi - lo).clamp_min(0), -1)
    order = torch.argsort(work, descending=True, stable=True)
    seq = torch.where(valid, seq, -1)
    return torch.stack([seq[order], blk[order]]).to(torch.int32)


_TILE_MAPS = WeakIdKeyDictionary()


def cached_tile_map(cu_seqlens: torch.Tensor, cu_other: torch.Tensor, block: int, n_tiles: int,
                    *, keys: bool, window_left: int, window_right: int) -> torch.Tensor:
    """``tile_map``, built once per CUDA cu_seqlens tensor and options: every layer of a model
    (and its backward) reuses the first layer's map. Entries die with the tensor; an in-place
    change of either cu_seqlens (a new version) rebuilds the map; a write torch does not
    version (``.data``, a NumPy or DLPack alias, a torch.distributed collective) does not.
    Under CUDA-graph capture the map is always built, inside the graph: replays then follow
    new contents of a static cu_seqlens buffer, and no map from the graph's memory pool leaks
    into the cache. CPU tensors (the interpreter) get a new map each call."""
    if not cu_seqlens.is_cuda or torch.cuda.is_current_stream_capturing():
        return tile_map(cu_seqlens, cu_other, block, n_tiles, keys=keys,
                        window_left=window_left, window_right=window_right)
    try:
        version = (cu_seqlens._version, cu_other._version)
    except RuntimeError:  # inference tensors have no version counter: no caching
        return tile_map(cu_seqlens, cu_other, block, n_tiles, keys=keys,
                        window_left=window_left, window_right=window_right)
    entries = _TILE_MAPS.setdefault(cu_seqlens, {})
    key = (block, n_tiles, keys, window_left, window_right)
    hit = entries.get(key)
    if hit is not None and hit[0]() is cu_other and hit[1] == version:
        return hit[2]
    tiles = tile_map(cu_seqlens, cu_other, block, n_tiles, keys=keys, window_left=window_left,
                     window_right=window_right)
    entries[key] = (weakref.ref(cu_other), version, tiles)
    return tiles


def _flags(q: torch.Tensor, softmax_scale: float, softcap: float, window_left: int,
           window_right: int, interpret: bool) -> tuple[dict, float, float]:
    head_dim = q.shape[-1]
    if softcap > 0:
        qk_scale, cap = softmax_scale / softcap, softcap * LOG2E
    else:
        qk_scale, cap = softmax_scale * LOG2E, 0.0
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), SOFTCAP=softcap > 0,
                 WINDOW_LEFT=window_left >= 0, WINDOW_RIGHT=window_right >= 0,
                 UPCAST=interpret and q.dtype == torch.bfloat16,
                 PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return flags, qk_scale, cap


@on_device_of_first_arg
def varlen_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, *, softmax_scale: float,
                    window_left: int, window_right: int, softcap: float,
                    config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """out ``(total_q, nheads, d)`` (q's dtype) and lse ``(nheads, total_q)`` fp32.

    Inputs are validated by the caller (fasttrain.ops.varlen_attention); the last dim of q, k,
    v must be contiguous. ``window_right = 0`` is causal; -1 is unbounded."""
    total_q, nheads, head_dim = q.shape
    total_k, nheads_k, _ = k.shape
    batch = cu_seqlens_q.numel() - 1
    interpret = q.device.type == "cpu"
    cfg = dict((config or configs(head_dim, q.dtype, interpret))["fwd"])
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((nheads, total_q), dtype=torch.float32, device=q.device)
    n_tiles = max_tiles(total_q, batch, cfg["BLOCK_M"])
    if n_tiles == 0 or nheads == 0:
        return out, lse
    tiles = cached_tile_map(cu_seqlens_q, cu_seqlens_k, cfg["BLOCK_M"], n_tiles, keys=False,
                            window_left=window_left, window_right=window_right)
    flags, qk_scale, cap = _flags(q, softmax_scale, softcap, window_left, window_right, interpret)
    _varlen_attn_fwd_kernel[(n_tiles * nheads,)](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, tiles,
        n_tiles, nheads, nheads // nheads_k, total_q, total_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        qk_scale, cap, window_left, window_right, RAW_MAX=not flags["SOFTCAP"] and qk_scale > 0,
        **flags, **cfg)
    return out, lse


@on_device_of_first_arg
def varlen_attn_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, *,
                    softmax_scale: float, window_left: int, window_right: int, softcap: float,
                    config: dict | None = None):
    """(dq, dk, dv) in the dtypes and shapes of q, k, v. ``dlse`` (the gradient of the LSE
    output, ``(nheads, total_q)``) may be None."""
    total_q, nheads, head_dim = q.shape
    total_k, nheads_k, _ = k.shape
    batch = cu_seqlens_q.numel() - 1
    group = nheads // nheads_k
    interpret = q.device.type == "cpu"
    cfgs = config or configs(head_dim, q.dtype, interpret)
    flags, qk_scale, cap = _flags(q, softmax_scale, softcap, window_left, window_right, interpret)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if total_q == 0 or nheads == 0:  # keys that no query sees get zero gradients
        return dq, dk.zero_(), dv.zero_()

    delta = torch.empty((nheads, total_q), dtype=torch.float32, device=q.device)
    block_t = 64 if interpret else 128
    if dlse is not None:
        dlse = dlse.float().contiguous()
    _varlen_attn_bwd_preprocess_kernel[(triton.cdiv(total_q, block_t), nheads)](
        out, dout, lse, dlse, delta, total_q,
        out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
        HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_D=flags["BLOCK_D"], HAS_DLSE=dlse is not None,
        num_warps=4)

    cfg = dict(cfgs["dkdv"])
    n_tiles = max_tiles(total_k, batch, cfg["BLOCK_N"])
    if n_tiles > 0 and nheads_k > 0:
        tiles = cached_tile_map(cu_seqlens_k, cu_seqlens_q, cfg["BLOCK_N"], n_tiles, keys=True,
                                window_left=window_left, window_right=window_right)
        _varlen_attn_bwd_dkdv_kernel[(n_tiles * nheads_k,)](
            q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, tiles,
            n_tiles, nheads_k, group, total_q, total_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            softmax_scale, qk_scale, cap, window_left, window_right, **flags, **cfg)

    cfg = dict(cfgs["dq"])
    n_tiles = max_tiles(total_q, batch, cfg["BLOCK_M"])
    tiles = cached_tile_map(cu_seqlens_q, cu_seqlens_k, cfg["BLOCK_M"], n_tiles, keys=False,
                            window_left=window_left, window_right=window_right)
    _varlen_attn_bwd_dq_kernel[(n_tiles * nheads,)](
        q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, tiles,
        n_tiles, nheads, group, total_q, total_k,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1),
        softmax_scale, qk_scale, cap, window_left, window_right, **flags, **cfg)
    return dq, dk, dv
