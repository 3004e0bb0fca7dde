"""Triton helpers shared by kernel families."""
import triton
import triton.language as tl


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
