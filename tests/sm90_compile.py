"""Compile every Triton kernel of fasttrain for sm_90 (H100) without a GPU.

Run by tests/test_kernels_sm90.py in a process without TRITON_INTERPRET (under the interpreter
@triton.jit returns interpreted functions, which cannot be compiled). Exits non-zero on failure.
"""
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fasttrain.kernels import adamw

H100 = GPUTarget("cuda", 90, 32)
ALIGNED_PTR = {(0,): [["tt.divisibility", 16]]}  # what Triton's launcher infers for the table


def compile_sm90(fn, signature, constexprs, num_warps=8):
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    src = ASTSource(fn, sig, constexprs, attrs=ALIGNED_PTR)
    return triton.compile(src, target=H100, options={"num_warps": num_warps})


ADAMW_SIG = {"table": "*i64", "table_addr": "i64", "n_tensors": "i32", "lr": "fp32",
             "lr_lo": "fp32", "beta1": "fp32", "beta1_lo": "fp32", "beta2": "fp32",
             "beta2_lo": "fp32", "eps": "fp32", "weight_decay": "fp32",
             "weight_decay_lo": "fp32", "inv_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
             "clip_coef_ptr": "*fp32", "seed": "i32"}
FLAGS = dict(LR_IS_PTR=False, DECOUPLED=True, AMSGRAD=False, MAXIMIZE=False, HAS_MASTER=False,
             STOCHASTIC=False, HAS_INV_SCALE=False, HAS_FOUND_INF=False, HAS_CLIP=False,
             ALIGNED=True)


ADAMW_CASES = [
    ((tl.float32, tl.float32, tl.float32), {}),
    ((tl.float32, tl.float32, tl.float32), dict(LR_IS_PTR=True, AMSGRAD=True, MAXIMIZE=True,
                                                HAS_INV_SCALE=True, HAS_FOUND_INF=True,
                                                HAS_CLIP=True, DECOUPLED=False, ALIGNED=False)),
    ((tl.bfloat16, tl.bfloat16, tl.bfloat16), dict(STOCHASTIC=True, AMSGRAD=True)),
    ((tl.bfloat16, tl.float32, tl.float32), dict(HAS_MASTER=True)),
    ((tl.float16, tl.float16, tl.bfloat16), dict(HAS_MASTER=True, HAS_CLIP=True)),
]


def check_adamw_kernel(dtypes, flags):
    param, grad, state = dtypes
    chunk, block, num_warps = adamw.launch_config(interpret=False)
    consts = dict(FLAGS, PARAM_DTYPE=param, GRAD_DTYPE=grad, STATE_DTYPE=state, CHUNK=chunk,
                  BLOCK=block, **flags)
    sig = dict(ADAMW_SIG, lr="*fp32") if consts["LR_IS_PTR"] else ADAMW_SIG
    out = compile_sm90(adamw._adamw_kernel, sig, consts, num_warps)
    ptx = out.asm["ptx"]
    if consts["ALIGNED"] and dtypes == (tl.float32,) * 3:
        # p, g, m, v: 16-byte vector loads and p, m, v: vector stores in the unmasked body
        assert len(re.findall(r"ld\.global(\.\w+)*\.v4", ptx)) >= 4
        assert len(re.findall(r"st\.global(\.\w+)*\.v4", ptx)) >= 3


def check_step_increment_and_sum_sq():
    compile_sm90(adamw._step_increment_kernel,
                 {"table": "*i64", "n_tensors": "i32", "found_inf_ptr": "*fp32"},
                 dict(HAS_FOUND_INF=True, BLOCK=1024), num_warps=4)
    chunk, block, num_warps = adamw.launch_config(interpret=False)
    for grad in (tl.float32, tl.bfloat16):
        compile_sm90(adamw._sum_sq_kernel,
                     {"table": "*i64", "n_tensors": "i32", "partials": "*fp32"},
                     dict(GRAD_DTYPE=grad, CHUNK=chunk, BLOCK=block), num_warps)


if __name__ == "__main__":
    for dtypes, flags in ADAMW_CASES:
        check_adamw_kernel(dtypes, flags)
        print("ok _adamw_kernel", [str(d) for d in dtypes], flags)
    check_step_increment_and_sum_sq()
    print("ok _step_increment_kernel, _sum_sq_kernel")
