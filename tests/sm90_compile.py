"""Compile every Triton kernel of fasttrain for sm_90 (H100) without a GPU.

Run by tests/test_kernels_sm90.py in a process without TRITON_INTERPRET (under the interpreter
@triton.jit returns interpreted functions, which cannot be compiled). Exits non-zero on failure.
"""
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fasttrain.kernels import adamw, lora

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


LORA_SIZES = {"M": "i32", "N": "i32", "K": "i32", "R": "i32", "RANK": "i32",
              "m_per_split": "i32", "numel": "i32", "scale": "fp32", "p": "fp32"}
LORA_DTYPES = {tl.float32: "fp32", tl.float16: "fp16", tl.bfloat16: "bf16"}


def _lora_sig(fn, ptrs):
    """Signature of a lora kernel: ``ptrs`` maps pointer args to types, the rest are sizes
    and strides (i32) or scalars."""
    sig = {}
    for name in fn.arg_names:
        if fn.params[fn.arg_names.index(name)].is_constexpr:
            continue
        sig[name] = ptrs.get(name) or LORA_SIZES.get(name, "i32")
    return sig


def check_lora_kernels():
    """Every lora kernel with the GPU's tile configs (the dots: K >= 16 in every tile): bf16
    with every option on, fp32 (IEEE dots) and fp16 plain. A subset of the autotune configs,
    largest tiles first: each compile takes seconds."""
    cases = ((tl.bfloat16, True), (tl.float32, False), (tl.float16, False))
    for dtype, options in cases:
        name = LORA_DTYPES[dtype]
        common = dict(UPCAST=False, IEEE=dtype == tl.float32)
        thin = lora.configs("thin", interpret=False, dtype=dtype)[0]
        compile_sm90(lora._lora_thin_kernel, _lora_sig(lora._lora_thin_kernel, {
            "x": f"*{name}", "l": f"*{name}", "index": "*i64", "seed_ptr": "*i64",
            "out": "*fp32"}), dict(common, BLOCK_R=16, DROPOUT=options, MULTI=options,
                                   **thin.kwargs), thin.num_warps)
        gemm = lora.configs("gemm", interpret=False, dtype=dtype)[0]
        compile_sm90(lora._lora_gemm_kernel, _lora_sig(lora._lora_gemm_kernel, {
            "x": f"*{name}", "w": f"*{name}", "s": "*fp32", "l": f"*{name}",
            "bias": f"*{name}", "seed_ptr": "*i64", "out": f"*{name}"}),
            dict(common, ROUND_BF16=False, BLOCK_R=64, HAS_BIAS=options, DROPOUT=options,
                 **gemm.kwargs), gemm.num_warps)
        (tall,) = lora.configs("tall", interpret=False, dtype=dtype)
        compile_sm90(lora._lora_tall_kernel, _lora_sig(lora._lora_tall_kernel, {
            "g": "*fp32", "x": f"*{name}", "seed_ptr": "*i64", "out": "*fp32"}),
            dict(common, DROPOUT=options, BLOCK_R=32, **tall.kwargs), tall.num_warps)
    compile_sm90(lora._lora_dropout_mask_kernel, {"seed_ptr": "*i64", "out": "*i8",
                                                  "numel": "i32", "p": "fp32"},
                 dict(BLOCK=1024), num_warps=4)


if __name__ == "__main__":
    for dtypes, flags in ADAMW_CASES:
        check_adamw_kernel(dtypes, flags)
        print("ok _adamw_kernel", [str(d) for d in dtypes], flags)
    check_step_increment_and_sum_sq()
    print("ok _step_increment_kernel, _sum_sq_kernel")
    check_lora_kernels()
    print("ok _lora_thin_kernel, _lora_gemm_kernel, _lora_tall_kernel, _lora_dropout_mask_kernel")
