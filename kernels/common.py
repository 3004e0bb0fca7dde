"""Triton helpers shared by kernel families."""
import contextlib
import functools

import torch
import triton
import triton.language as tl


def on_device_of_first_arg(launcher):
    """Run ``launcher`` with the CUDA device of its first argument (a tensor) current.

    Triton launches on the current device and its current stream, whatever device the
    arguments are on; torch ops and custom_op add no device guard. Without this, tensors on
    cuda:1 while cuda:0 is current would be read by a kernel on GPU 0, on GPU 0's stream."""
    @functools.wraps(launcher)
    def guarded(first, *args, **kwargs):
        with device_guard(first.device):
            return launcher(first, *args, **kwargs)
    return guarded


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` if that is not the current device already, else a no-op."""
    if device.type == "cuda" and device.index is not None \
            and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@triton.jit
def round_to_bf16_bits(x, noise):
    # fp32 -> bf16 by integer arithmetic on the bit pattern, so the result is the same on the
    # GPU and under the interpreter (whose own fp32->bf16 cast truncates). noise = None rounds to
    # nearest even; otherwise noise in [0, 2^16) rounds stochastically (unbiased).
    bits = x.to(tl.uint32, bitcast=True)
    if noise is None:
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
    else:
        bits = bits + noise
    out = (bits >> 16).to(tl.uint16)
    # NaN stays NaN (the additions above could carry a NaN payload into +-inf).
    nan_bits = ((x.to(tl.uint32, bitcast=True) >> 16) | 0x40).to(tl.uint16)
    out = tl.where(x != x, nan_bits, out)
    return out.to(tl.bfloat16, bitcast=True)
