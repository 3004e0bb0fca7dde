"""Compile every Triton kernel of fasttrain for sm_90 (H100) without a GPU.

Run by tests/test_kernels_sm90.py in a process without TRITON_INTERPRET (under the interpreter
@triton.jit returns interpreted functions, which cannot be compiled). Exits non-zero on failure.

``python tests/sm90_compile.py --report`` also prints, per build, what costs no device time to
read (bench/NOTES.md): registers and stack bytes (spills) from ``cuobjdump`` of the cubin, shared
memory, and the tensor-core instructions in the PTX (``wgmma``: Hopper's; ``mma.sync``: the
older, slower path). Put another Triton first on PYTHONPATH to read its builds (the GPU
machines run 3.6).
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fasttrain.kernels import adamw, lora, varlen_attn

H100 = GPUTarget("cuda", 90, 32)
ALIGNED_PTR = {(0,): [["tt.divisibility", 16]]}  # what Triton's launcher infers for the table


H100_MAX_SMEM = 232448  # bytes of shared memory one H100 block may use


REPORT = "--report" in sys.argv


def compile_sm90(fn, signature, constexprs, num_warps=8, num_stages=3, attrs=ALIGNED_PTR):
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    src = ASTSource(fn, sig, constexprs, attrs=attrs)
    out = triton.compile(src, target=H100, options={"num_warps": num_warps,
                                                    "num_stages": num_stages})
    assert out.metadata.shared <= H100_MAX_SMEM, (fn.__name__, out.metadata.shared)
    if REPORT:
        print(resources(fn, constexprs, num_warps, num_stages, out), flush=True)
    return out


def cuobjdump(out, flag: str) -> str | None:
    """``cuobjdump <flag>`` of the build's cubin (Triton's own copy of the tool, else the one
    on PATH); None without one."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if not tool:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(out.asm["cubin"])
        f.flush()
        return subprocess.run([tool, flag, f.name], capture_output=True, text=True).stdout


def resources(fn, constexprs, num_warps, num_stages, out) -> str:
    """One line: the build's registers, stack bytes, shared memory and dot instructions."""
    text = cuobjdump(out, "--dump-resource-usage")
    usage = "cuobjdump not found"
    if text is not None:
        m = re.search(r"REG:(\d+) STACK:(\d+)", text)
        usage = f"regs {m.group(1):>3} stack {m.group(2):>5} B" if m else "no usage found"
    ptx = out.asm["ptx"]
    shape = " ".join(f"{k}={v}" for k, v in constexprs.items()
                     if k.startswith(("BLOCK", "HEAD_DIM", "DROPOUT", "WINDOW", "SOFTCAP"))
                     or k.endswith("DTYPE"))
    return (f"{fn.__name__:30} {shape} w{num_warps} s{num_stages}: {usage}, "
            f"smem {out.metadata.shared} B, wgmma {ptx.count('wgmma.mma_async')}, "
            f"mma.sync {ptx.count('mma.sync')}")


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
    # the update's sqrt and divisions IEEE-rounded, as in torch (not the approximate forms)
    assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
    assert not re.search(r"div\.(full|approx)\.f32|sqrt\.approx", ptx)
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
                     {"table": "*i64", "n_tensors": "i32", "partials": "*fp64"},
                     dict(GRAD_DTYPE=grad, CHUNK=chunk, BLOCK=block), num_warps)


def _varlen_sig(kernel, dtype):
    """Signature of a varlen attention kernel: tensors typed, ints i32, floats fp32; pointers
    and strides marked 16-divisible as Triton's launcher marks them for real inputs."""
    names = [p.name for p in kernel.params if not p.is_constexpr]
    floats = {"qk_scale", "softcap", "sm_scale"}
    sig, attrs = {}, {}
    for i, name in enumerate(names):
        if name.endswith("_ptr"):
            sig[name] = ("*i32" if name.startswith(("cu_", "tiles")) else
                         "*fp32" if name.startswith(("lse", "delta", "dlse")) else f"*{dtype}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in floats else "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def check_varlen_attn_kernels(dtype, head_dim, **flags):
    torch_dtype = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[dtype]
    cfgs = varlen_attn.configs(head_dim, getattr(torch, torch_dtype), interpret=False)
    consts = dict(dict(HEAD_DIM=head_dim, BLOCK_D=varlen_attn.block_d(head_dim), SOFTCAP=False,
                       WINDOW_LEFT=False, WINDOW_RIGHT=False, UPCAST=False,
                       PRECISION="ieee" if dtype == "fp32" else "tf32"),
                  **flags)
    for kind, kernel in (("fwd", varlen_attn._varlen_attn_fwd_kernel),
                         ("dkdv", varlen_attn._varlen_attn_bwd_dkdv_kernel),
                         ("dq", varlen_attn._varlen_attn_bwd_dq_kernel)):
        cfg = dict(cfgs[kind])
        sig, attrs = _varlen_sig(kernel, dtype)
        shape = dict(consts, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
        if kind == "fwd":  # the launcher's choice for a positive softmax_scale
            shape["RAW_MAX"] = not consts["SOFTCAP"]
        out = compile_sm90(kernel, sig, shape, cfg["num_warps"], cfg["num_stages"], attrs)
        if dtype != "fp32" and head_dim <= 128:  # Hopper's tensor-core path for every dot
            ptx = out.asm["ptx"]
            assert "wgmma.mma_async" in ptx and "mma.sync" not in ptx, (kind, dtype, head_dim)
            # the main loop prefetches: it waits with loads of later iterations still in
            # flight (a wait for 0 outstanding groups everywhere: no overlap of loads and dots)
            sass = cuobjdump(out, "-sass")
            if sass is not None:
                assert re.search(r"DEPBAR\.LE SB0, 0x[1-9]", sass), (kind, dtype, head_dim)
    kernel = varlen_attn._varlen_attn_bwd_preprocess_kernel
    sig, attrs = _varlen_sig(kernel, dtype)
    compile_sm90(kernel, sig, dict(HEAD_DIM=head_dim, BLOCK_T=128, BLOCK_D=consts["BLOCK_D"],
                                   HAS_DLSE=True), 4, 1, attrs)
    print(f"ok varlen_attn fwd/dkdv/dq/preprocess {torch_dtype} d={head_dim} {flags}")


VARLEN_CASES = [
    ("bf16", 128, dict(WINDOW_RIGHT=True)),
    ("fp16", 64, dict(WINDOW_LEFT=True, WINDOW_RIGHT=True, SOFTCAP=True)),
    ("bf16", 256, dict(WINDOW_RIGHT=True)),
    ("fp16", 96, dict()),
    ("fp32", 128, dict(WINDOW_RIGHT=True, SOFTCAP=True)),  # SOFTCAP: the accurate tanh
]
LORA_SIZES = {"M": "i32", "N": "i32", "K": "i32", "R": "i32", "RANK": "i32",
              "m_per_split": "i32", "numel": "i32", "scale": "fp32", "p": "fp32"}
LORA_DTYPES = {tl.float32: "fp32", tl.float16: "fp16", tl.bfloat16: "bf16"}


# Per kernel, the strides that are 1 in the forward's launches on contiguous tensors (which
# Triton's launcher specializes as the constant 1): thin s = x A^T with A (R, K) and s (M, R);
# gemm y = x W^T + s B^T with W (N, K), s (M, R), B (N, R); tall dA = g^T x with g (M, R) and
# partials (split, R, K).
LORA_UNIT_STRIDES = {
    "_lora_thin_kernel": {"stride_xk", "stride_lk", "stride_or"},
    "_lora_gemm_kernel": {"stride_xk", "stride_wk", "stride_sr", "stride_lr", "stride_on"},
    "_lora_tall_kernel": {"stride_xk", "stride_gr", "stride_ok"},
}


def _lora_sig(fn, ptrs):
    """(signature, attrs, unit strides) of a lora kernel as a launch on contiguous, aligned
    tensors with sizes that are multiples of 16 (the rank too) sees it: ``ptrs`` maps pointer
    args to types (16-byte aligned), unit strides become the constant 1, other strides and K/N
    are marked divisible by 16, the rest are sizes (i32) or scalars. With these hints Triton
    pipelines the loads (cp.async), as it does for real inputs."""
    sig, attrs, ones = {}, {}, {}
    params = [p for p in fn.params if not p.is_constexpr]
    unit = LORA_UNIT_STRIDES[fn.__name__]
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            continue
        if name in unit:
            ones[name] = 1
            continue
        sig[name] = ptrs.get(name) or LORA_SIZES.get(name, "i32")
        if name in ptrs or name.startswith("stride") or name in ("N", "K"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    assert len(sig) + len(ones) == len(params)
    return sig, attrs, ones


def check_lora_kernels():
    """Every lora kernel with the GPU's tile configs (the dots: K >= 16 in every tile): bf16
    with every option on, fp32 (IEEE dots) and fp16 plain. A subset of the autotune configs,
    largest tiles first: each compile takes seconds."""
    cases = ((tl.bfloat16, True), (tl.float32, False), (tl.float16, False))
    for dtype, options in cases:
        name = LORA_DTYPES[dtype]
        common = dict(UPCAST=False, IEEE=dtype == tl.float32)
        builds = [
            (lora._lora_thin_kernel, lora.configs("thin", interpret=False, dtype=dtype)[0],
             {"x": f"*{name}", "l": f"*{name}", "index": "*i64", "seed_ptr": "*i64",
              "out": "*fp32"}, dict(BLOCK_R=16, DROPOUT=options, MULTI=options)),
            (lora._lora_gemm_kernel, lora._fitting_configs(
                lora.configs("gemm", interpret=False, dtype=dtype), {}, DROPOUT=options)[0],
             {"x": f"*{name}", "w": f"*{name}", "s": "*fp32", "l": f"*{name}",
              "bias": f"*{name}", "seed_ptr": "*i64", "out": f"*{name}"},
             dict(ROUND_BF16=False, BLOCK_R=64, HAS_BIAS=options, DROPOUT=options)),
            (lora._lora_tall_kernel, lora.configs("tall", interpret=False, dtype=dtype)[0],
             {"g": "*fp32", "x": f"*{name}", "seed_ptr": "*i64", "out": "*fp32"},
             dict(DROPOUT=options, BLOCK_R=32)),
        ]
        for fn, cfg, ptrs, consts in builds:
            sig, attrs, ones = _lora_sig(fn, ptrs)
            compile_sm90(fn, sig, dict(ones, **common, **consts, **cfg.kwargs), cfg.num_warps,
                         cfg.num_stages, attrs)
    compile_sm90(lora._lora_dropout_mask_kernel, {"seed_ptr": "*i64", "out": "*i8",
                                                  "numel": "i32", "p": "fp32"},
                 dict(BLOCK=1024), num_warps=4)


if __name__ == "__main__":
    for dtypes, flags in ADAMW_CASES:
        check_adamw_kernel(dtypes, flags)
        print("ok _adamw_kernel", [str(d) for d in dtypes], flags)
    check_step_increment_and_sum_sq()
    print("ok _step_increment_kernel, _sum_sq_kernel")
    for dtype, head_dim, flags in VARLEN_CASES:
        check_varlen_attn_kernels(dtype, head_dim, **flags)
    check_lora_kernels()
    print("ok _lora_thin_kernel, _lora_gemm_kernel, _lora_tall_kernel, _lora_dropout_mask_kernel")
