"""Fused LoRA linear in Triton: y = x W^T + b + scaling * dropout(x) A^T B^T.

Shapes (2-D; the op layer flattens leading dims): x (M, K), W (N, K), b (N,), A (R, K),
B (N, R). Several adapters are handled as one adapter of rank R = n_adapters * r whose
low-rank activations are masked per row: row m keeps only the r columns of its own adapter
``index[m]`` (a row whose index is outside [0, n_adapters) gets no LoRA term). The cost grows
with n_adapters * r, which suits a handful of adapters.

Kernels (all accumulate in fp32):
- ``_lora_thin_kernel``: out (M, R) = scale * mask(dropout(X) L^T) with L (R, K). Forward:
  s = dropout(x) A^T; backward: g = scaling * dy B. Output fp32, M*R elements (the only saved
  activation besides x).
- ``_lora_gemm_kernel``: out (M, N) = X W^T + scale * D * (S L^T) + b. Forward: y, with the
  LoRA term as a second short reduction over R added to the same accumulator tile (no full-size
  temporary). Backward: dx = dy W + dropout-mask/(1-p) * (g A), W and A passed transposed; the
  mask applies to the LoRA term alone, which then takes a tile of its own.
- ``_lora_tall_kernel``: out (R, K) = scale * G^T dropout(X), a long reduction over M split
  into SPLIT chunks whose fp32 partials are summed on the host side (deterministic, no
  atomics). Backward: dA = g^T dropout(x), dB^T = scaling * s^T dy.
- ``_lora_dropout_mask_kernel``: the keep mask itself, for tests and the torch reference.

Dropout: keep(m, k) = tl.rand(seed, m * K + k) >= p, regenerated wherever it is needed (never
stored); the offset is taken modulo 2^32. ``seed`` is a one-element int64 tensor, so no host
sync is needed to draw it.

Interpreter (TRITON_INTERPRET=1): bf16 arithmetic is wrong there, so every operand is cast to
fp32 right after loading (UPCAST) and bf16 outputs are rounded by bit operations; on a GPU the
dots run on tensor cores in the input dtype (fp32 inputs: IEEE fp32, as torch without TF32).
"""
import os

import torch
import triton
import triton.language as tl

from fasttrain.kernels.common import device_guard, on_device_of_first_arg
from fasttrain.kernels.common import round_to_bf16_bits as _round_to_bf16_bits


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _dropout(x, rows, cols, n_cols, seed, p):
    # x * keep, keep(m, k) = rand(seed, m * n_cols + k) >= p; rows, cols int64.
    keep = tl.rand(seed, (rows[:, None] * n_cols + cols[None, :]).to(tl.int32)) >= p
    return tl.where(keep, x, tl.zeros_like(x))


@triton.jit
def _lora_thin_kernel(
    x, l, index, seed_ptr, out,
    M, K, R, RANK, M_BUCKET, scale, p,
    stride_xm, stride_xk, stride_lr, stride_lk, stride_om, stride_or,
    DROPOUT: tl.constexpr, MULTI: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = rm < M
    mask_r = rr < R
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = rk < K
        xt = tl.load(x + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        lt = tl.load(l + rr[None, :] * stride_lr + rk[:, None] * stride_lk,
                     mask=mask_r[None, :] & mask_k[:, None], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            lt = lt.to(tl.float32)
        if DROPOUT:
            xt = _dropout(xt, rm, rk, K, seed, p)
        acc = _dot(xt, lt, acc, IEEE)
    acc = acc * scale
    if MULTI:
        adapter = tl.load(index + rm, mask=mask_m, other=-1).to(tl.int64)
        acc = tl.where((rr[None, :] // RANK) == adapter[:, None], acc, 0.0)
    tl.store(out + rm[:, None] * stride_om + rr[None, :] * stride_or, acc,
             mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_term(acc, s, l, rm, rn, mask_m, mask_n, R, scale, stride_sm, stride_sr, stride_ln,
               stride_lr, UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr):
    # acc + (scale * s) l^T over R, s fp32 (M, R) and l (N, R) in the inputs' dtype.
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        mask_r = rr < R
        st = tl.load(s + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0) * scale
        lt = tl.load(l + rn[None, :] * stride_ln + rr[:, None] * stride_lr,
                     mask=mask_n[None, :] & mask_r[:, None], other=0.0)
        if UPCAST:
            lt = lt.to(tl.float32)
        else:
            st = st.to(lt.dtype)
        acc = _dot(st, lt, acc, IEEE)
    return acc


@triton.jit
def _lora_gemm_kernel(
    x, w, s, l, bias, seed_ptr, out,
    M, N, K, R, M_BUCKET, scale, p,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_ln, stride_lr,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ROUND_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share the column tiles of W in L2.
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % group_size
    pid_n = (pid % (GROUP_M * n_n)) // group_size
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = rk < K
        xt = tl.load(x + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w + rn[None, :] * stride_wn + rk[:, None] * stride_wk,
                     mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = _dot(xt, wt, acc, IEEE)

    # The LoRA term: a second, short reduction over R. Without dropout it goes into the same
    # accumulator (scale folded into s); the dropout mask applies to the term alone, so then
    # it needs a tile of its own (twice the accumulator registers: smaller tiles suit it).
    if DROPOUT:
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        low = _lora_term(low, s, l, rm, rn, mask_m, mask_n, R, 1.0, stride_sm, stride_sr,
                         stride_ln, stride_lr, UPCAST, IEEE, BLOCK_R)
        acc += _dropout(low, rm, rn, N, tl.load(seed_ptr), p) * scale
    else:
        acc = _lora_term(acc, s, l, rm, rn, mask_m, mask_n, R, scale, stride_sm, stride_sr,
                         stride_ln, stride_lr, UPCAST, IEEE, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    ptrs = out + rm[:, None] * stride_om + rn[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if ROUND_BF16:
        tl.store(ptrs, _round_to_bf16_bits(acc, None), mask=mask)
    else:
        tl.store(ptrs, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _lora_tall_kernel(
    g, x, seed_ptr, out,
    M, K, R, m_per_split, scale, p,
    stride_gm, stride_gr, stride_xm, stride_xk, stride_os, stride_or, stride_ok,
    DROPOUT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    rk = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2).to(tl.int64)
    mask_k = rk < K
    mask_r = rr < R
    seed = 0
    if DROPOUT:
        seed = tl.load(seed_ptr)
    m_start = split * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = rm < m_end
        gt = tl.load(g + rr[:, None] * stride_gr + rm[None, :] * stride_gm,
                     mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        xt = tl.load(x + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        else:
            gt = gt.to(xt.dtype)
        if DROPOUT:
            xt = _dropout(xt, rm, rk, K, seed, p)
        acc = _dot(gt, xt, acc, IEEE)
    tl.store(out + split * stride_os + rr[:, None] * stride_or + rk[None, :] * stride_ok,
             acc * scale, mask=mask_r[:, None] & mask_k[None, :])


@triton.jit
def _lora_dropout_mask_kernel(seed_ptr, out, numel, p, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(tl.load(seed_ptr), offs.to(tl.int32)) >= p
    tl.store(out + offs, keep.to(tl.int8), mask=offs < numel)


# --- configs and launchers -------------------------------------------------------------------

def configs(kind: str, interpret: bool | None = None, dtype=None) -> list:
    """Tile configs per kernel kind ("gemm", "thin", "tall") and input dtype (fp32 tiles have
    half the depth: same shared memory). One config under the interpreter (big tiles: it runs
    programs one after another); a few for the autotuner on a GPU, largest first."""
    interpret = _interpret() if interpret is None else interpret
    wide = dtype in (torch.float32, tl.float32)
    if kind == "gemm":
        if interpret:
            return [triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
                                  num_warps=4)]
        # fp32's 256x128 tile needs 256 KB of shared memory (its fp32 epilogue), more than an
        # H100 block has (227 KB): never built
        return [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk // (2 if wide else 1),
                                   GROUP_M=8), num_warps=w, num_stages=st)
                for bm, bn, bk, w, st in ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                          (128, 128, 64, 8, 4), (128, 128, 32, 4, 4),
                                          (64, 128, 64, 4, 4), (64, 64, 64, 4, 4))
                if not (wide and bm == 256)]
    if kind == "thin":
        if interpret:
            return [triton.Config(dict(BLOCK_M=64, BLOCK_K=128), num_warps=4)]
        return [triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk // (2 if wide else 1)), num_warps=w,
                              num_stages=st)
                for bm, bk, w, st in ((128, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4),
                                      (32, 256, 4, 3))]
    if kind == "tall":
        # Not autotuned: SPLIT (chosen by the launcher) depends on BLOCK_M.
        if interpret:
            return [triton.Config(dict(BLOCK_M=64, BLOCK_K=128), num_warps=4)]
        return [triton.Config(dict(BLOCK_M=64 // (2 if wide else 1), BLOCK_K=128),
                              num_warps=8, num_stages=3)]
    raise ValueError(f"unknown kernel kind {kind!r}")


_TUNED = {}


def _tuned(kind, dtype):
    interpret = _interpret()
    key = (kind, interpret, dtype == torch.float32)
    if key not in _TUNED:
        fn = {"gemm": _lora_gemm_kernel, "thin": _lora_thin_kernel}[kind]
        # M_BUCKET, not M: packed batches change M every step, and each new key value would
        # benchmark every config again (and could not be captured in a CUDA graph). DROPOUT:
        # the gemm's dropout variant holds two accumulator tiles, so its best tile differs.
        keys = ["M_BUCKET", "N", "K", "R", "DROPOUT"] if kind == "gemm" else [
            "M_BUCKET", "K", "R", "DROPOUT"]
        prune = {"early_config_prune": _fitting_configs} if kind == "gemm" else None
        _TUNED[key] = triton.autotune(configs=configs(kind, interpret, dtype), key=keys,
                                      prune_configs_by=prune)(fn)
    return _TUNED[key]


_TUNED_KEYS = set()  # (kind, autotuning key) of every launch so far: tuned already


def _launch_tuned(kind, key, grid, *args, **kwargs):
    """Launch the autotuned kernel of ``kind``. ``key``: the values of its autotuning keys; the
    autotuner adds the tensor arguments' dtypes, and so does this. A key never launched before
    would be tuned now, which a CUDA graph capture cannot hold (each config is timed, with
    synchronizations): a clear error then, before anything is launched."""
    key = (kind, *key, *(str(a.dtype) for a in args if isinstance(a, torch.Tensor)))
    if key not in _TUNED_KEYS and _capturing(args[0].device):
        raise RuntimeError(
            f"fasttrain LoRA: the {kind} kernel was never run for these sizes (autotuning key "
            f"{key[1:]}) before this CUDA graph capture, and autotuning cannot run inside one. "
            "Run the same shapes once outside the capture first (the warm-up that capture "
            "needs anyway).")
    _tuned(kind, args[0].dtype)[grid](*args, **kwargs)
    _TUNED_KEYS.add(key)


def _capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _fitting_configs(configs, named_args, **kwargs):
    """The gemm's configs worth timing: with dropout it holds two fp32 accumulator tiles, and
    its sm_90 builds spill registers above 64 elements of a tile per thread (bench/NOTES.md)."""
    if not kwargs.get("DROPOUT"):
        return configs
    fit = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps]
    return fit or configs


def m_bucket(m: int) -> int:
    """The autotuning key for the number of rows: the next power of two."""
    return triton.next_power_of_2(m)


def block_r(r: int) -> int:
    """Tile width over the rank: a power of two in [16, 64] (tl.dot needs >= 16)."""
    return min(64, max(16, triton.next_power_of_2(r)))


def _flags(dtype):
    interpret = _interpret()
    return dict(UPCAST=interpret, IEEE=dtype == torch.float32 and not interpret)


def _no_seed(device):
    return torch.zeros(1, dtype=torch.int64, device=device)


@on_device_of_first_arg
def lora_thin(x, l, *, scale=1.0, dropout_p=0.0, seed=None, index=None, rank=1):
    """out (M, R) fp32 = scale * dropout(x) l^T, zero outside each row's adapter columns.

    x: (M, K), l: (R, K) (any strides, same dtype), seed: (1,) int64 when dropout_p > 0,
    index: (M,) int32/int64 or None (single adapter), rank: columns per adapter.
    """
    M, K = x.shape
    R = l.shape[0]
    out = torch.empty((M, R), dtype=torch.float32, device=x.device)
    if M == 0 or R == 0:
        return out
    dropout = dropout_p > 0
    br = block_r(R)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, br))
    _launch_tuned(
        "thin", (m_bucket(M), K, R, dropout), grid,
        x, l, index if index is not None else out, seed if dropout else _no_seed(x.device), out,
        M, K, R, rank, m_bucket(M), scale / (1.0 - dropout_p), dropout_p,
        x.stride(0), x.stride(1), l.stride(0), l.stride(1), out.stride(0), out.stride(1),
        DROPOUT=dropout, MULTI=index is not None, BLOCK_R=br, **_flags(x.dtype))
    return out


@on_device_of_first_arg
def lora_gemm(x, w, s, l, bias=None, *, scale=1.0, dropout_p=0.0, seed=None, out=None):
    """out (M, N) = x w^T + scale * keep/(1-p) * (s l^T) + bias, in x's dtype.

    x: (M, K), w: (N, K), s: (M, R) fp32, l: (N, R), bias: (N,) or None (any strides; the
    kernel reads a contiguous bias, copied here when needed); the dropout mask, when
    dropout_p > 0, is the one of an (M, N) input drawn from ``seed``.
    """
    if bias is not None:
        bias = bias.contiguous()
    M, K = x.shape
    N = w.shape[0]
    R = s.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    dropout = dropout_p > 0
    flags = _flags(x.dtype)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _launch_tuned(
        "gemm", (m_bucket(M), N, K, R, dropout), grid,
        x, w, s, l, bias if bias is not None else out, seed if dropout else _no_seed(x.device),
        out, M, N, K, R, m_bucket(M), scale / (1.0 - dropout_p), dropout_p,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), s.stride(0), s.stride(1),
        l.stride(0), l.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, DROPOUT=dropout,
        ROUND_BF16=flags["UPCAST"] and out.dtype == torch.bfloat16, BLOCK_R=block_r(R), **flags)
    return out


def _n_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


@on_device_of_first_arg
def lora_tall(g, x, *, scale=1.0, dropout_p=0.0, seed=None, split=None):
    """out (R, K) fp32 = scale * g^T dropout(x); g: (M, R) fp32, x: (M, K).

    The reduction over M runs in ``split`` chunks (default: enough programs to fill the GPU)
    whose fp32 partials are then summed.
    """
    M, R = g.shape
    K = x.shape[1]
    if M == 0 or R == 0 or K == 0:
        return torch.zeros((R, K), dtype=torch.float32, device=x.device)
    (cfg,) = configs("tall", dtype=x.dtype)
    bm, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_K"]
    br = block_r(R)
    tiles = triton.cdiv(K, bk) * triton.cdiv(R, br)
    m_blocks = triton.cdiv(M, bm)
    if split is None:
        split = 2 if _interpret() else triton.cdiv(2 * _n_sms(x.device), tiles)
    split = max(1, min(split, m_blocks))
    m_per_split = triton.cdiv(m_blocks, split) * bm
    split = triton.cdiv(M, m_per_split)
    partials = torch.empty((split, R, K), dtype=torch.float32, device=x.device)
    dropout = dropout_p > 0
    _lora_tall_kernel[(triton.cdiv(K, bk), triton.cdiv(R, br), split)](
        g, x, seed if dropout else _no_seed(x.device), partials, M, K, R, m_per_split,
        scale / (1.0 - dropout_p), dropout_p,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1),
        partials.stride(0), partials.stride(1), partials.stride(2),
        DROPOUT=dropout, BLOCK_R=br, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **cfg.kwargs, **_flags(x.dtype))
    return partials[0] if split == 1 else partials.sum(0)


def dropout_keep_mask(seed, shape, p, device):
    """The keep mask (bool, ``shape``) the kernels draw from ``seed`` for an input of ``shape``
    (row-major offsets): for tests and the torch reference."""
    numel = 1
    for d in shape:
        numel *= d
    out = torch.empty(shape, dtype=torch.int8, device=device)
    block = 1 << 16 if _interpret() else 1024
    if numel:
        with device_guard(out.device):
            _lora_dropout_mask_kernel[(triton.cdiv(numel, block),)](seed, out, numel, p,
                                                                     BLOCK=block)
    return out.bool()


# --- the op's forward and backward ------------------------------------------------------------

def lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, index=None, rank=None):
    """(y (M, N) in x's dtype, s (M, R) fp32 = dropout(x) A^T, masked per adapter).

    x: (M, K), weight: (N, K), bias: (N,) or None, lora_A: (R, K), lora_B: (N, R); with
    several adapters R = n_adapters * rank and index: (M,) picks each row's adapter.
    """
    rank = lora_A.shape[0] if rank is None else rank
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)  # fp32 adapters: x's for the dots
    s = lora_thin(x, lora_A, dropout_p=dropout_p, seed=seed, index=index, rank=rank)
    y = lora_gemm(x, weight, s, lora_B, bias, scale=scaling)
    return y, s


def lora_bwd(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed, index=None, rank=None,
             need_dx=True):
    """(dx or None, dA (R, K), dB (N, R)), dA and dB in the adapters' dtype (fp32 adapters over
    a half x: the fp32 sums, not rounded to x's dtype); dW and db are left to the caller (one
    cuBLAS GEMM and a sum).

    g = scaling * dy B (M, R) fp32 is the one pass over dy for the low-rank part; then
    dA = g^T dropout(x), dB = scaling * dy^T s and dx = dy W + keep/(1-p) * (g A), the last as
    one GEMM with the LoRA term in the same accumulator.
    """
    rank = lora_A.shape[0] if rank is None else rank
    adapter_dtype = lora_A.dtype
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    g = lora_thin(dy, lora_B.t(), scale=scaling, index=index, rank=rank)
    d_a = lora_tall(g, x, dropout_p=dropout_p, seed=seed).to(adapter_dtype)
    d_b = lora_tall(s, dy, scale=scaling).t().to(adapter_dtype)
    dx = None
    if need_dx:
        dx = lora_gemm(dy, weight.t(), g, lora_A.t(), scale=1.0, dropout_p=dropout_p, seed=seed)
    return dx, d_a, d_b
