"""Attention over packed variable-length sequences, with the interface of
``flash_attn_varlen_func``.

Backends: ``triton`` (CUDA GPUs; CPU tensors only under ``TRITON_INTERPRET=1``, for tests) and
``torch``, the reference (a loop over sequences, upcast to fp32), which is also the CPU backend
and the oracle of the tests. CUDA tensors get Triton; CPU tensors the reference.
``FASTTRAIN_BACKEND=cpu`` means the reference here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from fasttrain import _backend

FAMILY = "varlen_attention"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # Triton backend


def _window(causal: bool, window_size) -> tuple[int, int]:
    """(left, right) with -1 = unbounded; causal is right = 0 (FlashAttention 2's rule)."""
    left, right = (int(w) for w in window_size)
    return left, 0 if causal else right


# ----------------------------------------------------------------------------- reference


def _visible(len_q: int, len_k: int, left: int, right: int, device) -> Tensor:
    i = torch.arange(len_q, device=device)[:, None]
    j = torch.arange(len_k, device=device)[None, :]
    diag = len_k - len_q  # bottom-right alignment
    ok = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i + diag - left
    if right >= 0:
        ok &= j <= i + diag + right
    return ok


def varlen_attention_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                               cu_seqlens_k: Tensor, *, softmax_scale: float | None = None,
                               causal: bool = False, window_size=(-1, -1), softcap: float = 0.0,
                               upcast: bool = True) -> tuple[Tensor, Tensor]:
    """Attention one sequence at a time with torch ops; differentiable by autograd.

    q: (total_q, nheads, d); k, v: (total_k, nheads_k, d); cu_seqlens_q/k: (batch + 1,).
    Returns out (total_q, nheads, d) in q's dtype and lse (nheads, total_q) fp32. With
    ``upcast`` (default) it computes in fp32 (fp64 stays fp64); without it, in the inputs' dtype
    (the "same-dtype torch" error FlashAttention's test criterion compares against). Rows that
    see no key get out = 0 and lse = -inf. Reads cu_seqlens on the host.
    """
    dtype = q.dtype
    if upcast and dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    nheads, nheads_k, d = q.shape[1], k.shape[1], q.shape[2]
    group = nheads // nheads_k
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    left, right = _window(causal, window_size)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b]:cu_q[b + 1]].transpose(0, 1)  # (nheads, len_q, d)
        kb = k[cu_k[b]:cu_k[b + 1]].transpose(0, 1).repeat_interleave(group, 0)
        vb = v[cu_k[b]:cu_k[b + 1]].transpose(0, 1).repeat_interleave(group, 0)
        s = (qb @ kb.transpose(1, 2)) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        ok = _visible(qb.shape[1], kb.shape[1], left, right, q.device)
        empty = ~ok.any(-1)  # queries that see no key
        s = s.masked_fill(~ok, float("-inf")).masked_fill(empty[:, None], 0.0)
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse[..., None]).masked_fill(empty[:, None], 0.0)
        outs.append((p.to(vb.dtype) @ vb).transpose(0, 1))
        lse = lse if lse.dtype == torch.float64 else lse.float()  # fp64 kept for gradcheck
        lses.append(lse.masked_fill(empty, float("-inf")))
    if not outs:  # no sequence, so no token: empty, but in autograd's graph like the kernels'
        out = (q + (k.sum() + v.sum()).to(q.dtype)) * 0
        return out.to(dtype), q.new_zeros((nheads, 0), dtype=torch.float32)
    return torch.cat(outs).to(dtype), torch.cat(lses, dim=1)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fasttrain::varlen_attn_fwd", mutates_args=())
def _varlen_attn_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, softmax_scale: float, window_left: int,
                     window_right: int, softcap: float) -> tuple[Tensor, Tensor]:
    from fasttrain.kernels import varlen_attn as kernels

    return kernels.varlen_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                   softmax_scale=softmax_scale, window_left=window_left,
                                   window_right=window_right, softcap=softcap)


@_varlen_attn_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left, window_right, softcap):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fasttrain::varlen_attn_bwd", mutates_args=())
def _varlen_attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                     dlse: Optional[Tensor], cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     softmax_scale: float, window_left: int, window_right: int,
                     softcap: float) -> tuple[Tensor, Tensor, Tensor]:
    from fasttrain.kernels import varlen_attn as kernels

    return kernels.varlen_attn_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k,
                                   softmax_scale=softmax_scale, window_left=window_left,
                                   window_right=window_right, softcap=softcap)


@_varlen_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left,
      window_right, softcap):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.options = options


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _varlen_attn_bwd(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k,
                                  *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None


_varlen_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


_CHECKED = WeakIdKeyDictionary()  # CUDA cu_seqlens tensor -> (version, total) already checked


def _check_cu_seqlens(name: str, cu: Tensor, total: int) -> None:
    """Values of cu_seqlens: on CPU a clear error, at every call; on CUDA a device-side assert
    (no host sync; the kernels also clamp every sequence to [0, total], so a bad value cannot
    read out of bounds), once per tensor and version (the layers of a model share one
    cu_seqlens); under torch.compile a device-side assert at every call (in the graph)."""
    if cu.numel() == 0:
        return
    first, last, monotone = cu[0] == 0, cu[-1] == total, (cu[1:] >= cu[:-1]).all()
    if torch.compiler.is_compiling():  # a constant message: a traced total would specialize
        torch._assert_async(first & last & monotone,
                            f"{name} must start at 0, be non-decreasing and end at the number "
                            "of tokens")
        return
    if cu.device.type != "cuda":
        for ok, what in ((first, "start at 0"), (monotone, "be non-decreasing"),
                         (last, f"end at the number of tokens ({total})")):
            if not bool(ok):
                raise ValueError(f"{name} must {what}; got {cu.tolist()}")
        return
    try:
        key = (cu._version, total)
    except RuntimeError:  # inference tensors have no version counter
        key = None
    if key is not None and _CHECKED.get(cu) == key:
        return
    torch._assert_async(first & last & monotone,
                        f"{name} must start at 0, be non-decreasing and end at {total}")
    if key is not None:
        _CHECKED[cu] = key


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, window_size, softcap, dropout_p,
              alibi_slopes) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens_q", cu_seqlens_q),
                    ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be (total_tokens, nheads, headdim), got shape "
                             f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dtype != q.dtype:
            raise TypeError(f"q, k and v must have one dtype; q is {q.dtype}, {name} is {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q, k and v must be on one device; q is on {q.device}, {name} on "
                             f"{t.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[2]} and {k.shape[2]}")
    head_dim = q.shape[2]
    if not 1 <= head_dim <= 256:
        raise ValueError(f"head dim must be between 1 and 256, got {head_dim}")
    nheads, nheads_k = q.shape[1], k.shape[1]
    if nheads_k == 0 or nheads % nheads_k:
        raise ValueError(f"the number of q heads ({nheads}) must be a multiple of the number of "
                         f"k/v heads ({nheads_k})")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must be 1-D of length batch + 1, got shape {tuple(cu.shape)}")
        if not cu.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got stride {cu.stride()}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device ({q.device}), got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
                         f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    if not _window_ok(window_size):
        raise ValueError(f"window_size must be two ints >= -1 (-1: unbounded), got "
                         f"{window_size!r}")
    if not 0 <= softcap < math.inf:
        raise ValueError(f"softcap must be finite and >= 0 (0: off), got {softcap}")
    if dropout_p != 0.0:
        raise NotImplementedError("varlen_attention has no attention dropout (dropout_p must be 0)")
    if alibi_slopes is not None:
        raise NotImplementedError("varlen_attention does not support alibi_slopes")
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])


def _window_ok(window_size) -> bool:
    try:
        return len(window_size) == 2 and all(
            not isinstance(w, bool) and int(w) == w and w >= -1 for w in window_size)
    except (TypeError, ValueError):
        return False


def _choose_backend(q: Tensor, backend: str | None) -> str:
    choice = _backend.requested(backend, ("triton", "torch"))  # cpu: the reference
    if choice == "cuda":
        raise ValueError("varlen_attention has no 'cuda' (C++) backend; use 'triton' or 'torch'")
    if choice == "triton" or (choice is None and q.device.type == "cuda"):
        reason = _backend.triton_unavailable_reason(q.device)
        if reason is None and q.dtype not in SUPPORTED_DTYPES:
            reason = f"the Triton kernels take {SUPPORTED_DTYPES}, not {q.dtype}"
        if reason is None:
            why = "requested" if choice else f"{q.device.type} tensors"
            _backend.log_once(FAMILY, "triton", why)
            return "triton"
        if choice == "triton":
            raise RuntimeError(f"varlen_attention: backend 'triton' cannot run here: {reason}")
        _backend.warn_once(FAMILY, q.device.type, reason)
        return "torch"
    _backend.log_once(FAMILY, "torch", "requested" if choice else "cpu tensors: the reference")
    return "torch"


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, max_seqlen_q: int | None = None,
                     max_seqlen_k: int | None = None, dropout_p: float = 0.0,
                     softmax_scale: float | None = None, causal: bool = False,
                     window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: Tensor | None = None, deterministic: bool = False,
                     return_attn_probs: bool = False, block_table: Tensor | None = None, *,
                     return_lse: bool = False, backend: str | None = None):
    """Attention over packed sequences; arguments as ``flash_attn_varlen_func`` (in its order;
    the extras ``return_lse`` and ``backend`` keyword-only).

    Arguments:
        q: (total_q, nheads, headdim), fp16/bf16 (fp32 too) on CUDA, any float on CPU.
        k, v: (total_k, nheads_k, headdim); nheads must be a multiple of nheads_k (GQA/MQA).
        cu_seqlens_q, cu_seqlens_k: (batch + 1,), int32, contiguous, starting at 0,
            non-decreasing, ending at total_q / total_k (FlashAttention ignores tokens past the
            last entry; here they are an error). Sequence b of q attends to sequence b
            of k; lengths may differ (cross-attention, chunked prefill) and may be 0. On CUDA
            their check and the kernels' tile maps are made once per tensor and version (all
            layers share them): change their contents through torch ops (in place is fine),
            not through writes that torch does not version (``.data``, NumPy or DLPack aliases,
            torch.distributed collectives into a reused buffer: call
            ``torch.autograd.graph.increment_version(cu_seqlens)`` after those).
        max_seqlen_q, max_seqlen_k: optional and unused: nothing here syncs with the host, with
            or without them (accepted for drop-in compatibility).
        softmax_scale: default 1 / sqrt(headdim).
        causal: bottom-right aligned when lengths differ, as FlashAttention 2.
        window_size: (left, right) keys visible around the diagonal; -1 = unbounded. Query i
            of a sequence sees key j when i + len_k - len_q - left <= j <= i + len_k - len_q
            + right, as FlashAttention documents it. (FlashAttention's kernels also read a
            value >= max_seqlen_k as -1; that differs from the formula only for a right window
            in [len_k, len_q - 1), without causal: there the first queries see fewer keys here.)
        softcap: scores become softcap * tanh(scores / softcap) when > 0.
        deterministic: accepted for compatibility; the backward is always deterministic
            (no atomics).
        return_attn_probs: as FlashAttention, returns (out, lse, None); the attention
            probabilities are not formed.
        block_table: paged KV caches are not supported (must be None).
        return_lse: also return the log-sum-exp of each query's scores, (nheads, total_q) fp32
            (fp64 for fp64 inputs on the torch backend).
        backend: "triton" or "torch" (None: Triton for CUDA tensors, the reference on CPU).
    Returns:
        out (total_q, nheads, headdim), and lse if ``return_lse``. Queries that see no key get
        out = 0 and lse = -inf (the log of an empty sum; FlashAttention 2 writes +inf there).
    """
    del max_seqlen_q, max_seqlen_k, deterministic
    if block_table is not None:
        raise NotImplementedError("varlen_attention has no paged KV cache (block_table must be "
                                  "None)")
    _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, window_size, softcap, dropout_p,
              alibi_slopes)
    scale = q.shape[2] ** -0.5 if softmax_scale is None else softmax_scale
    if not torch.compiler.is_compiling():  # (traced, the scale may be symbolic: not read)
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    left, right = _window(causal, window_size)
    # a window wider than every sequence is no window (and keeps the kernels' int32 math safe)
    widest = q.shape[0] + k.shape[0]
    left, right = (-1 if w >= widest else w for w in (left, right))
    if _choose_backend(q, backend) == "triton":
        if q.stride(-1) != 1:
            q = q.contiguous()
        if k.stride(-1) != 1:
            k = k.contiguous()
        if v.stride(-1) != 1:
            v = v.contiguous()
        out, lse = _varlen_attn_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, left, right,
                                    float(softcap))
    else:
        out, lse = varlen_attention_reference(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                              softmax_scale=scale, window_size=(left, right),
                                              softcap=float(softcap))
    if return_attn_probs:
        return out, lse, None
    return (out, lse) if return_lse else out


def dense_attention(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                    softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Tensor | None = None, deterministic: bool = False,
                    return_attn_probs: bool = False, *, return_lse: bool = False,
                    backend: str | None = None):
    """Attention over a batch of equal-length sequences, as ``flash_attn_func`` (its argument
    order, ``return_lse`` and ``backend`` keyword-only; dropout_p must be 0 and alibi_slopes
    None, as for varlen_attention; ``return_attn_probs`` returns (out, lse, None), as there).

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim).
    Returns out (batch, seqlen_q, nheads, headdim) and, with ``return_lse``, lse
    (batch, nheads, seqlen_q) fp32.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a (batch, seqlen, nheads, headdim) tensor")
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k = k.shape[1]
    if k.shape[0] != batch or v.shape[:2] != k.shape[:2]:
        raise ValueError(f"k and v must be (batch, seqlen_k, ...) with q's batch size {batch}, "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")

    def cu(seqlen):
        return torch.arange(batch + 1, dtype=torch.int32, device=q.device) * seqlen

    result = varlen_attention(q.reshape(batch * seqlen_q, nheads, head_dim),
                              k.reshape(batch * seqlen_k, *k.shape[2:]),
                              v.reshape(batch * seqlen_k, *v.shape[2:]), cu(seqlen_q),
                              cu(seqlen_k), seqlen_q, seqlen_k, dropout_p=dropout_p,
                              softmax_scale=softmax_scale, causal=causal,
                              window_size=window_size, softcap=softcap,
                              alibi_slopes=alibi_slopes, deterministic=deterministic,
                              return_lse=return_lse or return_attn_probs, backend=backend)
    if not (return_lse or return_attn_probs):
        return result.view(q.shape)
    out, lse = result
    out, lse = out.view(q.shape), lse.view(nheads, batch, seqlen_q).transpose(0, 1)
    return (out, lse, None) if return_attn_probs else (out, lse)


__all__ = ["varlen_attention", "dense_attention", "varlen_attention_reference"]
