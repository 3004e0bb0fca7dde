"""Multi-tensor AdamW in Triton: one launch updates every tensor of a bucket.

A bucket is a set of tensors with the same (param, grad, state) dtypes on one device. Its
layout is a single int64 table on the device (built by ``build_table``):

    row 0..7 (TABLE_ROWS), one column per tensor:
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (0 if unused), master (0 if unused),
        step (fp32 scalar tensor), numel
    then one entry per chunk: (tensor index << 32) | chunk index within the tensor

Each program updates one chunk of CHUNK elements of one tensor, so the grid size depends on the
total number of elements only, never on how many tensors there are. The C++/CUDA backend reads
the same table.
"""
import numpy as np
import torch
import triton
import triton.language as tl

from fasttrain.kernels.common import on_device_of_first_arg
from fasttrain.kernels.common import round_to_bf16_bits as _round_to_bf16_bits

TABLE_ROWS = tl.constexpr(8)
(ROW_PARAM, ROW_GRAD, ROW_EXP_AVG, ROW_EXP_AVG_SQ, ROW_MAX_EXP_AVG_SQ, ROW_MASTER, ROW_STEP,
 ROW_NUMEL) = (tl.constexpr(i) for i in range(8))


@triton.jit
def _pow_f64(base, n):
    # base ** n for an integer n >= 0 by repeated squaring in fp64: exact enough that
    # 1 - beta2 ** step matches torch's host-side double computation (no cancellation from an
    # fp32 exp2/log2 pair).
    result = base * 0.0 + 1.0
    b = base
    e = n
    while e > 0:
        result = tl.where((e & 1) != 0, result * b, result)
        b = b * b
        e = e >> 1
    return result


@triton.jit
def _store_rounded(ptr, x, mask, noise, DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        tl.store(ptr, _round_to_bf16_bits(x, noise), mask=mask)
    else:
        tl.store(ptr, x.to(DTYPE), mask=mask)


@triton.jit
def _tensor_ptr(table, table_addr, row, n_tensors, t, DTYPE: tl.constexpr,
                ALIGNED: tl.constexpr):
    # Address of tensor t from the table. An int-to-pointer cast hides the address's alignment
    # from the compiler; with ALIGNED (every address 16-byte aligned, checked on the host) the
    # pointer is formed as an offset from a kernel argument instead, so 16-byte vector loads and
    # stores are used.
    addr = tl.load(table + row * n_tensors + t)
    if ALIGNED:
        ELEM: tl.constexpr = DTYPE.primitive_bitwidth // 8
        delta = tl.multiple_of((addr - table_addr) // ELEM, 16 // ELEM)
        return table.to(tl.pointer_type(DTYPE), bitcast=True) + delta
    return addr.to(tl.pointer_type(DTYPE))


@triton.jit
def _load_f32(ptr, mask):
    if mask is None:
        x = tl.load(ptr)
    else:
        x = tl.load(ptr, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def _adamw_block(offs, mask, param, grad, exp_avg, exp_avg_sq, vmax_ptr, master, rseed,
                 step_size, bc2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                 weight_decay, inv_scale, clip_coef, PARAM_DTYPE: tl.constexpr,
                 GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, DECOUPLED: tl.constexpr,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_MASTER: tl.constexpr,
                 STOCHASTIC: tl.constexpr, HAS_INV_SCALE: tl.constexpr, HAS_CLIP: tl.constexpr):
    # The update of one block of elements, in torch.optim.AdamW's order of operations.
    g = _load_f32(grad + offs, mask)
    if HAS_INV_SCALE:  # the unscaled grads stay in .grad, as torch's fused optimizers leave them
        g = g * inv_scale
        _store_rounded(grad + offs, g, mask, None, GRAD_DTYPE)
    if HAS_CLIP:
        g = g * clip_coef
    if MAXIMIZE:
        g = -g
    if HAS_MASTER:
        p = _load_f32(master + offs, mask)
    else:
        p = _load_f32(param + offs, mask)
    m = _load_f32(exp_avg + offs, mask)
    v = _load_f32(exp_avg_sq + offs, mask)

    # explicit fmas where torch's kernels fuse (add with alpha, lerp, addcmul), as the CPU and
    # CUDA kernels: left to the compiler, a + b * c + d * e may fuse either product
    if DECOUPLED:
        p = p * decay
    else:
        g = tl.fma(weight_decay, p, g)
    # torch's lerp: self + w * (end - self) for |w| < 0.5, else end - (end - self) * (1 - w)
    if one_minus_beta1 < 0.5:
        m = tl.fma(one_minus_beta1, g - m, m)
    else:
        m = tl.fma(one_minus_beta1 - 1.0, g - m, g)
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    if AMSGRAD:
        vmax = tl.maximum(_load_f32(vmax_ptr + offs, mask), v, propagate_nan=tl.PropagateNan.ALL)
        _store_rounded(vmax_ptr + offs, vmax, mask, None, STATE_DTYPE)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    # IEEE-rounded sqrt and division, as torch's kernels compute them (Triton's / and tl.sqrt
    # on fp32 are the approximate PTX instructions, up to 2 ulp off); free in a kernel bound by
    # memory bandwidth; the update as torch's addcdiv, p - (step_size * m) / denom (no fma)
    p = p - tl.div_rn(step_size * m, denom)

    _store_rounded(exp_avg + offs, m, mask, None, STATE_DTYPE)
    _store_rounded(exp_avg_sq + offs, v, mask, None, STATE_DTYPE)
    if HAS_MASTER:
        tl.store(master + offs, p, mask=mask)
    if STOCHASTIC:
        noise = (tl.randint(rseed, offs.to(tl.int32)) & 0xFFFF).to(tl.uint32)
        _store_rounded(param + offs, p, mask, noise, PARAM_DTYPE)
    else:
        _store_rounded(param + offs, p, mask, None, PARAM_DTYPE)


@triton.jit
def _adamw_kernel(
    table, table_addr, n_tensors,
    lr, lr_lo, beta1, beta1_lo, beta2, beta2_lo, eps, weight_decay, weight_decay_lo,
    inv_scale_ptr, found_inf_ptr, clip_coef_ptr, seed,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    LR_IS_PTR: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, HAS_MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
    HAS_INV_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_CLIP: tl.constexpr,
    ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    pid = tl.program_id(0).to(tl.int64)
    entry = tl.load(table + TABLE_ROWS * n_tensors + pid)
    t = entry >> 32
    start = (entry & 0xFFFFFFFF) * CHUNK
    numel = tl.load(table + ROW_NUMEL * n_tensors + t)
    end = tl.minimum(start + CHUNK, numel)

    param = _tensor_ptr(table, table_addr, ROW_PARAM, n_tensors, t, PARAM_DTYPE, ALIGNED)
    grad = _tensor_ptr(table, table_addr, ROW_GRAD, n_tensors, t, GRAD_DTYPE, ALIGNED)
    exp_avg = _tensor_ptr(table, table_addr, ROW_EXP_AVG, n_tensors, t, STATE_DTYPE, ALIGNED)
    exp_avg_sq = _tensor_ptr(table, table_addr, ROW_EXP_AVG_SQ, n_tensors, t, STATE_DTYPE, ALIGNED)
    step_ptr = _tensor_ptr(table, table_addr, ROW_STEP, n_tensors, t, tl.float32, False)

    # Scalars of the update. Triton passes Python floats as fp32, so the host splits each
    # hyperparameter that torch uses in double into an fp32 (hi, lo) pair; the scalars are then
    # formed in fp64 and rounded once to fp32, exactly as torch's Python-side scalar math does.
    if LR_IS_PTR:
        lr = tl.load(lr)
    lr64 = tl.cast(lr, tl.float64) + tl.cast(lr_lo, tl.float64)
    b1 = tl.cast(beta1, tl.float64) + tl.cast(beta1_lo, tl.float64)
    b2 = tl.cast(beta2, tl.float64) + tl.cast(beta2_lo, tl.float64)
    wd64 = tl.cast(weight_decay, tl.float64) + tl.cast(weight_decay_lo, tl.float64)
    step = tl.load(step_ptr).to(tl.int32)
    step_size = tl.cast(lr64 / (1.0 - _pow_f64(b1, step)), tl.float32)
    bc2_sqrt = tl.cast(tl.sqrt(1.0 - _pow_f64(b2, step)), tl.float32)
    decay = tl.cast(1.0 - lr64 * wd64, tl.float32)
    one_minus_beta1 = tl.cast(1.0 - b1, tl.float32)
    one_minus_beta2 = tl.cast(1.0 - b2, tl.float32)
    inv_scale = 1.0
    if HAS_INV_SCALE:
        inv_scale = tl.load(inv_scale_ptr)
    clip_coef = 1.0
    if HAS_CLIP:
        clip_coef = tl.load(clip_coef_ptr)

    master = _tensor_ptr(table, table_addr, ROW_MASTER, n_tensors, t, tl.float32, ALIGNED)
    vmax = _tensor_ptr(table, table_addr, ROW_MAX_EXP_AVG_SQ, n_tensors, t, STATE_DTYPE, ALIGNED)
    rseed = seed + step * 1000003 + t.to(tl.int32) * 7919  # stochastic rounding stream
    # Full blocks without a mask (so loads and stores can be 16-byte vectors), then the tail.
    full_end = start + (end - start) // BLOCK * BLOCK
    for off in range(start, full_end, BLOCK):
        offs = tl.multiple_of(off, BLOCK) + tl.arange(0, BLOCK)
        _adamw_block(offs, None, param, grad, exp_avg, exp_avg_sq, vmax, master, rseed,
                     step_size, bc2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                     weight_decay, inv_scale, clip_coef, PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE,
                     DECOUPLED, AMSGRAD, MAXIMIZE, HAS_MASTER, STOCHASTIC, HAS_INV_SCALE,
                     HAS_CLIP)
    if full_end < end:
        offs = full_end + tl.arange(0, BLOCK)
        _adamw_block(offs, offs < end, param, grad, exp_avg, exp_avg_sq, vmax, master, rseed,
                     step_size, bc2_sqrt, decay, one_minus_beta1, beta2, one_minus_beta2, eps,
                     weight_decay, inv_scale, clip_coef, PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE,
                     DECOUPLED, AMSGRAD, MAXIMIZE, HAS_MASTER, STOCHASTIC, HAS_INV_SCALE,
                     HAS_CLIP)


@triton.jit
def _step_increment_kernel(table, n_tensors, found_inf_ptr, HAS_FOUND_INF: tl.constexpr,
                           BLOCK: tl.constexpr):
    # step += 1 for every tensor of the bucket (skipped when the grad scaler found inf/NaN).
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_tensors
    step_ptrs = tl.load(table + ROW_STEP * n_tensors + offs, mask=mask, other=0)
    step_ptrs = step_ptrs.to(tl.pointer_type(tl.float32))
    tl.store(step_ptrs, tl.load(step_ptrs, mask=mask) + 1.0, mask=mask)


@triton.jit
def _sum_sq_kernel(table, n_tensors, partials, GRAD_DTYPE: tl.constexpr, CHUNK: tl.constexpr,
                   BLOCK: tl.constexpr):
    # Sum of squares of each chunk's gradient, written (not atomically added) to partials[pid]
    # so that the total is deterministic. In fp64: GradScaler-scaled gradients square past the
    # fp32 range (|g| > 1.8e19) long before they overflow themselves.
    pid = tl.program_id(0).to(tl.int64)
    entry = tl.load(table + TABLE_ROWS * n_tensors + pid)
    t = entry >> 32
    start = (entry & 0xFFFFFFFF) * CHUNK
    end = tl.minimum(start + CHUNK, tl.load(table + ROW_NUMEL * n_tensors + t))
    grad = tl.load(table + ROW_GRAD * n_tensors + t).to(tl.pointer_type(GRAD_DTYPE))
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        g = tl.load(grad + offs, mask=offs < end, other=0.0).to(tl.float32).to(tl.float64)
        acc += g * g
    tl.store(partials + pid, tl.sum(acc, axis=0))


def launch_config(interpret: bool):
    """(CHUNK, BLOCK, num_warps). One program per 64K-element chunk; the interpreter runs
    programs one after another, so warps do not matter there."""
    return 65536, 2048, 1 if interpret else 8


@on_device_of_first_arg
def adamw_step(table, n_tensors, n_chunks, *, lr, beta1, beta2, eps, weight_decay,
               param_dtype, grad_dtype, state_dtype, decoupled, amsgrad, maximize,
               has_master, stochastic, seed, inv_scale, found_inf, clip_coef, aligned, chunk,
               block, num_warps):
    """Increment every step counter of the bucket, then update every tensor of it: two launches."""
    dummy = table  # placeholder pointer for disabled optional inputs
    inc_block = 1024
    _step_increment_kernel[(triton.cdiv(n_tensors, inc_block),)](
        table, n_tensors, found_inf if found_inf is not None else dummy,
        HAS_FOUND_INF=found_inf is not None, BLOCK=inc_block)
    _adamw_kernel[(n_chunks,)](
        table, table.data_ptr(), n_tensors,
        *_hi_lo(lr), *_hi_lo(beta1), *_hi_lo(beta2), float(eps), *_hi_lo(weight_decay),
        inv_scale if inv_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        clip_coef if clip_coef is not None else dummy,
        seed,
        PARAM_DTYPE=_tl_dtype(param_dtype), GRAD_DTYPE=_tl_dtype(grad_dtype),
        STATE_DTYPE=_tl_dtype(state_dtype),
        LR_IS_PTR=isinstance(lr, torch.Tensor),
        # weight_decay 0: no decay at all, as torch (the L2 form would turn inf params to NaN)
        DECOUPLED=decoupled or weight_decay == 0, AMSGRAD=amsgrad, MAXIMIZE=maximize,
        HAS_MASTER=has_master, STOCHASTIC=stochastic,
        HAS_INV_SCALE=inv_scale is not None, HAS_FOUND_INF=found_inf is not None,
        HAS_CLIP=clip_coef is not None, ALIGNED=aligned,
        CHUNK=chunk, BLOCK=block, num_warps=num_warps,
    )


@on_device_of_first_arg
def sum_sq(table, n_tensors, n_chunks, partials, *, grad_dtype, chunk, block, num_warps):
    """partials[i] (fp64) = sum of squares of chunk i's gradient (one launch)."""
    _sum_sq_kernel[(n_chunks,)](table, n_tensors, partials, GRAD_DTYPE=_tl_dtype(grad_dtype),
                                CHUNK=chunk, BLOCK=block, num_warps=num_warps)


def _hi_lo(x):
    """A Python number as two fp32 values whose fp64 sum is x to ~48 bits; a tensor as (x, 0)."""
    if isinstance(x, torch.Tensor):
        return x, 0.0
    x = float(x)
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def _tl_dtype(dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
            torch.float16: tl.float16}[dtype]


def build_table(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, chunk):
    """The device table described in the module docstring.

    Returns (table, n_tensors, n_chunks, aligned), aligned meaning every tensor address is a
    multiple of 16 bytes (the kernel then uses vector loads).

    Host work proportional to the number of tensors, done once per change of the tensors' storage
    (the optimizer caches it), then one host-to-device copy from pinned memory.
    """
    n = len(params)
    zeros = [0] * n
    numels = [p.numel() for p in params]
    rows = [
        [t.data_ptr() for t in params],
        [t.data_ptr() for t in grads],
        [t.data_ptr() for t in exp_avgs],
        [t.data_ptr() for t in exp_avg_sqs],
        [t.data_ptr() for t in max_exp_avg_sqs] if max_exp_avg_sqs else zeros,
        [t.data_ptr() for t in masters] if masters else zeros,
        [t.data_ptr() for t in steps],
        numels,
    ]
    chunk_entries = [(i << 32) | c for i, numel in enumerate(numels)
                     for c in range(triton.cdiv(numel, chunk))]
    flat = torch.tensor([x for row in rows for x in row] + chunk_entries, dtype=torch.int64)
    device = params[0].device
    if device.type == "cuda":
        flat = flat.pin_memory().to(device, non_blocking=True)
    aligned = all(x % 16 == 0 for row in rows[:6] for x in row)
    return flat, n, len(chunk_entries), aligned
