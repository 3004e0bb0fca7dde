"""Fused LoRA linear: y = x W^T + b + scaling * dropout(x) A^T B^T.

``lora_linear`` (one adapter) and ``lora_linear_multi`` (a stacked set of adapters, one per
row) validate their inputs, then run the ``triton`` backend (CUDA; CPU tensors only under
``TRITON_INTERPRET=1``) or the torch reference (``backend="torch"``, or automatically, with one
warning, where Triton cannot run). The Triton path is the pair of custom ops
``fasttrain::lora_linear_fwd`` / ``fasttrain::lora_linear_bwd`` (fakes + autograd registered:
``torch.compile(fullgraph=True)`` and ``opcheck`` work). It saves x and s = dropout(x) A^T
(M x R, fp32) for backward; the dropout mask is regenerated from a seed, never stored.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fasttrain import _backend

FAMILY = "lora"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- torch reference ------------------------------------------------------------------------

def _dropped(x, dropout_p, dropout_mask):
    if dropout_mask is not None:
        return x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    return F.dropout(x, dropout_p) if dropout_p > 0 else x


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, *,
                          dropout_mask=None, upcast=False):
    """The plain torch computation (peft's order of operations), differentiable by autograd.

    x: (..., K), weight: (N, K), bias: (N,) or None, lora_A: (r, K), lora_B: (N, r).
    dropout_mask: bool like x (keep), to reproduce a given mask; else F.dropout draws one.
    upcast: compute in fp32 and return x's dtype.
    """
    dtype = x.dtype
    if upcast:
        x, weight, lora_A, lora_B = (t.float() for t in (x, weight, lora_A, lora_B))
        bias = bias.float() if bias is not None else None
    y = F.linear(x, weight, bias)
    # fp32 adapters over a half x: the branch in fp32, as peft computes it
    xd = _dropped(x, dropout_p, dropout_mask).to(lora_A.dtype)
    y = y + F.linear(F.linear(xd, lora_A), lora_B) * scaling
    return y.to(dtype)


def lora_linear_multi_reference(x, weight, bias, lora_A, lora_B, adapter_index, scaling,
                                dropout_p=0.0, *, dropout_mask=None, upcast=False):
    """Reference of ``lora_linear_multi``: every adapter's x A^T on every row, kept where
    ``adapter_index`` selects it (rows with an index outside [0, n_adapters) get none) before
    the product with B, as the kernels do (an unselected product that overflows, 0 * inf, does
    not reach the rows)."""
    dtype = x.dtype
    if upcast:
        x, weight, lora_A, lora_B = (t.float() for t in (x, weight, lora_A, lora_B))
        bias = bias.float() if bias is not None else None
    y = F.linear(x, weight, bias)
    xd = _dropped(x, dropout_p, dropout_mask).to(lora_A.dtype)
    for a in range(lora_A.shape[0]):
        rows = (adapter_index == a).unsqueeze(-1)
        s = torch.where(rows, F.linear(xd, lora_A[a]), 0.0)
        y = y + F.linear(s, lora_B[a]) * scaling
    return y.to(dtype)


# --- custom ops (Triton) --------------------------------------------------------------------

@torch.library.custom_op("fasttrain::lora_linear_fwd", mutates_args=())
def _lora_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
              lora_B: Tensor, seed: Optional[Tensor], index: Optional[Tensor], scaling: float,
              dropout_p: float, rank: int) -> tuple[Tensor, Tensor]:
    """(y (M, N), s (M, R) fp32) for x (M, K), weight (N, K), lora_A (R, K), lora_B (N, R)."""
    from fasttrain.kernels import lora as kernels

    return kernels.lora_fwd(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, index,
                            rank)


@_lora_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, seed, index, scaling, dropout_p, rank):
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op("fasttrain::lora_linear_bwd", mutates_args=())
def _lora_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, s: Tensor,
              seed: Optional[Tensor], index: Optional[Tensor], scaling: float, dropout_p: float,
              rank: int, need_dx: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx (M, K) or an empty tensor when not need_dx, dA (R, K), dB (N, R))."""
    from fasttrain.kernels import lora as kernels

    dx, d_a, d_b = kernels.lora_bwd(dy, x, weight, lora_A, lora_B, s, scaling, dropout_p, seed,
                                    index, rank, need_dx)
    return (dx if dx is not None else x.new_empty(0)), d_a.contiguous(), d_b.contiguous()


@_lora_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, s, seed, index, scaling, dropout_p, rank, need_dx):
    # the real op returns contiguous gradients, whatever the strides of lora_A and lora_B
    return (x.new_empty(x.shape if need_dx else (0,)), lora_A.new_empty(lora_A.shape),
            lora_B.new_empty(lora_B.shape))


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, seed, index, scaling, dropout_p, rank = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1], seed, index)
    ctx.scaling, ctx.dropout_p, ctx.rank = scaling, dropout_p, rank


def _backward(ctx, dy, ds):
    x, weight, lora_A, lora_B, s, seed, index = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, d_a, d_b = torch.ops.fasttrain.lora_linear_bwd(
        dy, x, weight, lora_A, lora_B, s, seed, index, ctx.scaling, ctx.dropout_p, ctx.rank,
        need[0])
    # dW (a trainable base weight) and db: one plain GEMM and a column sum, cuBLAS's and
    # torch's, which a Triton kernel would not beat.
    d_w = (dy.t() @ x) if need[1] else None
    d_bias = dy.sum(0) if need[2] else None
    return (dx if need[0] else None), d_w, d_bias, d_a, d_b, None, None, None, None, None


torch.library.register_autograd("fasttrain::lora_linear_fwd", _backward,
                                setup_context=_setup_context)


# --- public API -----------------------------------------------------------------------------

def _check_tensor(name, t, dtype, device, optional=False, or_fp32=False):
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype and not (or_fp32 and t.dtype == torch.float32):
        also = " or float32" if or_fp32 else ""
        raise TypeError(f"{name} must have x's dtype {dtype}{also}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on x's device {device}, got {t.device}")


def _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p, n_adapters=None):
    """Checks shared by lora_linear and lora_linear_multi; returns (K, N, r)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    for name, t, optional in (("weight", weight, False), ("bias", bias, True),
                              ("lora_A", lora_A, False), ("lora_B", lora_B, False)):
        _check_tensor(name, t, x.dtype, x.device, optional, or_fp32=name.startswith("lora"))
    if isinstance(lora_B, Tensor) and lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A and lora_B must have one dtype, got {lora_A.dtype} and "
                        f"{lora_B.dtype}")
    if x.dim() < 1:
        raise ValueError("x must be (..., K), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (N, K), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x's last dim must be weight's in_features K={K}, got shape "
                         f"{tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be (N,) = ({N},), got shape {tuple(bias.shape)}")
    lead = () if n_adapters is None else (n_adapters,)
    a_dims = "(n_adapters, r, K)" if lead else "(r, K)"
    b_dims = "(n_adapters, N, r)" if lead else "(N, r)"
    if lora_A.dim() != 2 + len(lead) or lora_A.shape[-1] != K or lora_A.shape[:len(lead)] != lead:
        raise ValueError(f"lora_A must be {a_dims} with K={K}, got shape "
                         f"{tuple(lora_A.shape)}")
    r = lora_A.shape[-2]
    if r < 1:
        raise ValueError("lora_A must have rank r >= 1")
    if tuple(lora_B.shape) != lead + (N, r):
        raise ValueError(f"lora_B must be {b_dims} = {lead + (N, r)} to match weight (N, K) and "
                         f"lora_A's rank r={r}, got shape {tuple(lora_B.shape)}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) \
            or not math.isfinite(scaling):
        raise TypeError(f"scaling must be a finite real number, got {scaling!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) \
            or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    return K, N, r


def _choose_backend(backend, device):
    """'triton' or 'torch'. Forcing triton where it cannot run is an error that says why."""
    chosen = _backend.requested(backend, ("triton", "torch"))  # cpu: the reference
    if chosen is not None:
        if chosen not in ("triton", "torch"):
            raise ValueError(f"lora_linear: backends are 'triton' and 'torch', got {chosen!r}")
        if chosen == "triton":
            reason = _backend.triton_unavailable_reason(device)
            if reason is not None:
                raise RuntimeError(f"lora_linear: the triton backend cannot run: {reason}")
        return chosen
    reason = _backend.triton_unavailable_reason(device)
    if reason is None:
        _backend.log_once(FAMILY, "triton", f"tensors on {device.type}")
        return "triton"
    _backend.warn_once(FAMILY, device.type, f"triton: {reason}")
    return "torch"


def _seed(dropout_p, device):
    # Drawn on the device from torch's generator (torch.manual_seed applies); no host sync.
    if dropout_p == 0:
        return None
    return torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64, device=device)


def autocast_dtype(device_type: str):
    """The dtype torch.autocast computes in on ``device_type``, or None when it is off there
    (or the device has no autocast, as meta)."""
    if not torch.amp.is_autocast_available(device_type) \
            or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _autocast(*tensors):
    """Under torch.autocast, the tensors in the autocast dtype (as F.linear would compute:
    float64 tensors are not cast)."""
    x = tensors[0]
    dtype = autocast_dtype(x.device.type) if isinstance(x, Tensor) else None
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


def _rows(x, K):
    """x (..., K) as (M, K); reshape(-1, K) cannot infer M when K is 0."""
    return x.reshape(x.shape[:-1].numel(), K)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, *, backend=None):
    """y = x W^T + b + scaling * dropout(x) A^T B^T.

    x: (..., K), weight: (N, K), bias: (N,) or None, lora_A: (r, K), lora_B: (N, r); all of one
    dtype (float32, float16, bfloat16) and device, except that the adapters may be float32
    over a half x (peft's default): their products then run in x's dtype (as under autocast),
    and their gradients come back as the fp32 sums (not rounded to x's dtype, which overflows
    fp16 where a GradScaler's scale meets a sum over many rows). Under torch.autocast every
    tensor is cast first, adapters included, so their gradients are rounded, as peft's are
    there. scaling: float (lora_alpha / r, or
    lora_alpha / sqrt(r) for rsLoRA). dropout_p: applied to x in the LoRA branch only, whenever
    > 0 (pass 0.0 in eval). Returns (..., N) in x's dtype. Gradients: x, lora_A, lora_B, and
    weight / bias when they require grad.
    backend: "triton", "torch" or None (automatic; FASTTRAIN_BACKEND sets it globally).
    Under ``torch.autocast`` every tensor is cast to the autocast dtype first, as for F.linear.
    """
    x, weight, bias, lora_A, lora_B = _autocast(x, weight, bias, lora_A, lora_B)
    K, N, r = _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    if _choose_backend(backend, x.device) == "torch":
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    y, _ = torch.ops.fasttrain.lora_linear_fwd(
        _rows(x, K), weight, bias, lora_A, lora_B, _seed(dropout_p, x.device), None,
        float(scaling), float(dropout_p), r)
    return y.reshape(*x.shape[:-1], N)


def lora_linear_multi(x, weight, bias, lora_A, lora_B, adapter_index, scaling, dropout_p=0.0,
                      *, backend=None):
    """``lora_linear`` where each row of x uses its own adapter out of a stacked set.

    lora_A: (n_adapters, r, K), lora_B: (n_adapters, N, r), adapter_index: x.shape[:-1], int32
    or int64, on x's device; a row whose index is outside [0, n_adapters) gets no LoRA term
    (checked in the kernel, no host sync). The Triton path treats the set as one adapter of
    rank n_adapters * r with the columns of other adapters masked out per row, so its cost grows
    with n_adapters * r: it suits a handful of adapters. Every slot of the set must hold finite
    values, the unused ones too: a NaN or inf in a slot that no row selects reaches every row
    through the stacked products (0 * inf; B's in the output, A's in the gradient of x).
    """
    x, weight, bias, lora_A, lora_B = _autocast(x, weight, bias, lora_A, lora_B)
    if not isinstance(lora_A, Tensor) or lora_A.dim() != 3:
        raise ValueError("lora_A must be (n_adapters, r, K), got "
                         f"{tuple(lora_A.shape) if isinstance(lora_A, Tensor) else lora_A!r}")
    n_adapters = lora_A.shape[0]
    K, N, r = _validate(x, weight, bias, lora_A, lora_B, scaling, dropout_p, n_adapters)
    if not isinstance(adapter_index, Tensor) or adapter_index.dtype not in (torch.int32,
                                                                            torch.int64):
        raise TypeError("adapter_index must be an int32 or int64 tensor")
    if adapter_index.shape != x.shape[:-1]:
        raise ValueError(f"adapter_index must have x's leading shape {tuple(x.shape[:-1])}, got "
                         f"{tuple(adapter_index.shape)}")
    if adapter_index.device != x.device:
        raise ValueError(f"adapter_index must be on x's device {x.device}, got "
                         f"{adapter_index.device}")
    if _choose_backend(backend, x.device) == "torch":
        return lora_linear_multi_reference(x, weight, bias, lora_A, lora_B, adapter_index,
                                           scaling, dropout_p)
    a_cat = lora_A.reshape(n_adapters * r, K)
    b_cat = lora_B.permute(1, 0, 2).reshape(N, n_adapters * r)
    y, _ = torch.ops.fasttrain.lora_linear_fwd(
        _rows(x, K), weight, bias, a_cat, b_cat, _seed(dropout_p, x.device),
        adapter_index.reshape(-1).contiguous(), float(scaling), float(dropout_p), r)
    return y.reshape(*x.shape[:-1], N)
