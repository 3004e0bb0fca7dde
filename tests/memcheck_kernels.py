"""Run every GPU kernel of fasttrain once at small, ragged sizes (for compute-sanitizer).

    compute-sanitizer --tool memcheck --error-exitcode 3 python tests/memcheck_kernels.py

Sizes are odd on purpose (not multiples of any block), so that every masked edge runs; each
result is compared with the torch reference, so a kernel that reads the wrong memory without
faulting fails too. Prints one "ok <case>" line per case; exits 1 on a wrong result. Needs CUDA
(bench/gpu_check.sh runs it on a lent GPU).
"""
import contextlib
import sys
import traceback

import torch

from fasttrain.kernels import lora as lora_kernels
from fasttrain.ops import lora_linear, lora_linear_multi, varlen_attention
from fasttrain.ops.lora import lora_linear_reference
from fasttrain.ops.varlen_attn import varlen_attention_reference
from fasttrain.optim import AdamW

DEV = "cpu" if "--cpu" in sys.argv else "cuda"  # --cpu: a dry run under TRITON_INTERPRET=1
failures = []


def check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()
    got, want = got.detach(), want.detach()
    err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))
    status = "ok " if err <= tol else "FAILED "
    if err > tol:
        failures.append(name)
    print(f"{status}{name}: rel err {err:.2e} (tol {tol:.0e})", flush=True)


@contextlib.contextmanager
def case(name: str):
    """One case: an exception fails it (reported, counted) and the next case still runs."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - whatever a case raises is its failure
        failures.append(name)
        print(f"FAILED {name}: {type(e).__name__}: {e}".splitlines()[0], flush=True)
        traceback.print_exc()


def check_fwd_bwd(name: str, fn, ref_fn, inputs, labels, tol: float) -> None:
    """fn against ref_fn on copies of inputs: the output and the inputs' gradients (labels:
    the output's, then each input's)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    ref_leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref = ref_fn(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.to(ref.dtype))
    check(f"{name} {labels[0]}", out, ref, tol)
    for label, g, r in zip(labels[1:], grads, ref_grads):
        check(f"{name} {label}", g, r, tol)


def adamw_cases() -> None:
    sizes = [(37, 5), (1,), (4099,), (3, 3, 3), (1000, 33)]
    options = [("triton", {}), ("cuda", {}), ("triton", dict(max_grad_norm=0.5)),
               ("cuda", dict(max_grad_norm=0.5, amsgrad=True)),
               ("triton", dict(state_dtype=torch.bfloat16, stochastic_rounding=True))]
    for backend, extra in options:
        with case(f"adamw {backend} {sorted(extra)}"):
            adamw_case(sizes, backend, extra)


def adamw_case(sizes, backend: str, extra: dict) -> None:
    low = "state_dtype" in extra  # bf16 params and states, against fp32 torch
    gen = torch.Generator(device=DEV).manual_seed(0)
    ref = [torch.randn(s, device=DEV, generator=gen, requires_grad=True) for s in sizes]
    params = [r.detach().to(torch.bfloat16 if low else torch.float32).requires_grad_()
              for r in ref]
    if DEV == "cpu" and backend == "cuda":
        backend = "cpu"
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, backend=backend, **extra)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1,
                                amsgrad=extra.get("amsgrad", False))
    for _ in range(3):
        for p, r in zip(params, ref):
            r.grad = torch.randn(p.shape, device=DEV, generator=gen)
            p.grad = r.grad.to(p.dtype)
        if "max_grad_norm" in extra:
            torch.nn.utils.clip_grad_norm_(ref, extra["max_grad_norm"])
        opt.step()
        ref_opt.step()
    check(f"adamw {backend} {sorted(extra)}", torch.cat([p.flatten() for p in params]),
          torch.cat([r.flatten() for r in ref]), 1e-2 if low else 1e-5)


def varlen_cases() -> None:
    lens = [1, 70, 0, 129, 33]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                      device=DEV)
    total = sum(lens)
    for dtype, d, kw in [(torch.bfloat16, 128, dict(causal=True)),
                         (torch.float16, 72, dict(window_size=(17, 5), softcap=20.0)),
                         (torch.float32, 40, dict(causal=True, window_size=(9, 0))),
                         (torch.bfloat16, 256, {})]:
        name = f"varlen_attn {str(dtype)[6:]} d={d} {kw}"
        with case(name):
            varlen_case(cu, total, dtype, d, kw, name)


def varlen_case(cu, total, dtype, d, kw, name) -> None:
    gen = torch.Generator(device=DEV).manual_seed(1)
    q = torch.randn(total, 6, d, device=DEV, dtype=dtype, generator=gen)
    k, v = (torch.randn(total, 2, d, device=DEV, dtype=dtype, generator=gen)
            for _ in range(2))
    check_fwd_bwd(name,
                  lambda q, k, v: varlen_attention(q, k, v, cu, cu, backend="triton", **kw),
                  lambda q, k, v: varlen_attention_reference(q, k, v, cu, cu, **kw)[0],
                  (q, k, v), ("out", "dq", "dk", "dv"),
                  1e-4 if dtype == torch.float32 else 2e-2)


def each_lora_config():
    """Pin each LoRA gemm/thin config in turn (yields its index): the autotuner would launch
    only the one it picks, after timing every config (slow under memcheck); a lone config is
    launched as is. Block sizes decide which edges are masked, so each is checked."""
    original = lora_kernels.configs
    count = max(len(original(kind, DEV == "cpu")) for kind in ("gemm", "thin"))
    try:
        for i in range(count):
            def pinned(kind, interpret=None, dtype=None, i=i):
                cfgs = original(kind, interpret, dtype)
                return cfgs if kind == "tall" else [cfgs[i % len(cfgs)]]
            lora_kernels.configs = pinned
            lora_kernels._TUNED.clear()
            yield i
    finally:
        lora_kernels.configs = original
        lora_kernels._TUNED.clear()


def lora_cases() -> None:
    for i in each_lora_config():
        with case(f"lora config {i}"):
            lora_cases_once(f"config {i}")


def lora_cases_once(tag: str) -> None:
    gen = torch.Generator(device=DEV).manual_seed(2)
    for dtype, (m, k, n, r), bias in [(torch.bfloat16, (77, 136, 200, 8), True),
                                      (torch.float32, (5, 33, 65, 3), False)]:
        x = torch.randn(m, k, device=DEV, dtype=dtype, generator=gen)
        w = torch.randn(n, k, device=DEV, dtype=dtype, generator=gen) / k ** 0.5
        b = torch.randn(n, device=DEV, dtype=dtype, generator=gen) if bias else None
        a = torch.randn(r, k, device=DEV, dtype=dtype, generator=gen) / k ** 0.5
        bb = torch.randn(n, r, device=DEV, dtype=dtype, generator=gen)
        name = f"lora {str(dtype)[6:]} {m}x{k}x{n} r={r} {tag}"
        check_fwd_bwd(name,
                      lambda x, a, bb: lora_linear(x, w, b, a, bb, 0.5, backend="triton"),
                      lambda x, a, bb: lora_linear_reference(x, w, b, a, bb, 0.5, upcast=True),
                      (x, a, bb), ("y", "dx", "dA", "dB"),
                      1e-4 if dtype == torch.float32 else 2e-2)
        leaves = [t.requires_grad_() for t in (x, a, bb)]
        # dropout and the multi-adapter path: run fwd+bwd (the mask is random; no reference)
        y = lora_linear(leaves[0], w, b, leaves[1], leaves[2], 0.5, 0.1, backend="triton")
        torch.autograd.grad(y.sum(), leaves)
        idx = torch.randint(-1, 3, (m,), device=DEV, generator=gen)
        a3 = torch.randn(3, r, k, device=DEV, dtype=dtype, generator=gen, requires_grad=True)
        b3 = torch.randn(3, n, r, device=DEV, dtype=dtype, generator=gen, requires_grad=True)
        y = lora_linear_multi(leaves[0], w, b, a3, b3, idx, 0.5, 0.1, backend="triton")
        torch.autograd.grad(y.sum(), (leaves[0], a3, b3))
        print(f"ok {name} dropout and multi-adapter fwd+bwd ran", flush=True)


def main() -> int:
    if DEV == "cuda" and not torch.cuda.is_available():
        print("needs CUDA (or --cpu with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    # LoRA last: its configs, each pinned in turn, are most of the compiles (the long pole, cut
    # first at gpu_check.sh's cap); by the AdamW cases the extension's build (started beside
    # memcheck) is mostly done
    varlen_cases()
    adamw_cases()
    lora_cases()
    if failures:
        print(f"{len(failures)} FAILED: {failures}")
        return 1
    print("all ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
