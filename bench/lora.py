"""LoRA linear, W frozen: fasttrain's fused op against the frozen base layer alone (the floor),
peft's LoRA Linear and the plain torch 3-matmul version.

Every provider of a workload gets the same x, W, b, A, B, dy (random, fixed seed). Modes:
``fwd`` (forward with autograd recording, as in training), ``bwd`` (torch.autograd.grad over
a recorded forward, retain_graph) and ``fwd+bwd``. Gradients: x, and A, B for the LoRA
providers. ``bytes`` is the traffic the frozen base layer cannot avoid (fwd: x, W, y; bwd: dy,
W, dx), so GB/s compares providers on the same yardstick; ``flops`` is the provider's own
matmul work. On CUDA each row also records the activation memory kept by the forward
(``saved_bytes``) and the peak memory of one fwd+bwd above the inputs (``peak_bytes``).
Without dropout, each LoRA provider's rows record ``rel_err``: its y, dx, dA and dB against an
fp32 computation on the same inputs, as ||x - ref|| / ||ref|| (with dropout every provider
draws its own mask, so there is nothing to compare).
"""
from __future__ import annotations

import gc
import json
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from bench.common import Context, rel_err

BASELINE = "base-linear"
SEED = 0
ALPHA_OVER_R = 2.0  # scaling = lora_alpha / r
MODES = ("fwd", "bwd", "fwd+bwd")


def workloads(ctx: Context) -> list[dict]:
    if ctx.sizes == "tiny":
        return [dict(M=64, K=64, N=64, r=8, p=p) for p in (0.0, 0.1)]
    if not ctx.cuda:
        return [dict(M=512, K=512, N=512, r=16, p=p) for p in (0.0, 0.1)]
    if ctx.sizes == "targets":  # DESIGN's target workload
        return [dict(M=8192, K=4096, N=4096, r=16, p=0.0)]
    if ctx.sizes == "quick":
        return [dict(M=8192, K=4096, N=4096, r=16, p=p) for p in (0.0, 0.1)]
    return [dict(M=m, K=k, N=k, r=r, p=p) for k in (4096, 8192) for m in (1024, 8192, 32768)
            for r in (8, 16, 64) for p in (0.0, 0.1)]


def _name(w: dict) -> str:
    return f"M={w['M']} K={w['K']} N={w['N']} r={w['r']} p={w['p']}"


# A provider's make(tensors, w) returns (forward function, tensors it differentiates).
Make = Callable[[dict, dict], tuple]


def _base(t, w):
    return (lambda: F.linear(t["x"], t["weight"], t["bias"])), [t["x"]]


def _torch_3matmul(t, w):
    def fwd():
        y = F.linear(t["x"], t["weight"], t["bias"])
        low = F.linear(F.linear(F.dropout(t["x"], w["p"]), t["lora_A"]), t["lora_B"])
        return y + low * ALPHA_OVER_R
    return fwd, [t["x"], t["lora_A"], t["lora_B"]]


def _torch_addmm(t, w):
    """The leanest torch arrangement: cuBLAS x W^T + b, then the LoRA term accumulated into
    the same output by a second cuBLAS GEMM (addmm_, beta=1): no separate elementwise add.
    What fasttrain's fused Triton GEMM has to beat if it is to be worth its code."""
    def fwd():
        y = torch.addmm(t["bias"], t["x"], t["weight"].t())
        low = F.linear(F.dropout(t["x"], w["p"]), t["lora_A"])
        return y.addmm_(low, t["lora_B"].t(), alpha=ALPHA_OVER_R)
    return fwd, [t["x"], t["lora_A"], t["lora_B"]]


def _peft(autocast_adapter_dtype: bool) -> Make:
    """peft's LoRA Linear. By default (``autocast_adapter_dtype=True``) peft keeps bf16/fp16
    adapters in fp32, so its LoRA term runs in fp32 on an fp32 copy of x: ``peft`` is that
    default, ``peft[no-upcast]`` the adapters in the input dtype (the same precision as
    fasttrain's). The verdict compares fasttrain with the faster of the two."""
    return lambda t, w: _peft_layer(t, w, autocast_adapter_dtype)


def _peft_layer(t, w, autocast_adapter_dtype):
    from peft import LoraConfig, get_peft_model

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(w["K"], w["N"], device=t["x"].device, dtype=t["x"].dtype)

    model = get_peft_model(Wrap(), LoraConfig(r=w["r"], lora_alpha=ALPHA_OVER_R * w["r"],
                                              lora_dropout=w["p"], target_modules=["lin"]),
                           autocast_adapter_dtype=autocast_adapter_dtype)
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.base_layer.weight.copy_(t["weight"])
        layer.base_layer.bias.copy_(t["bias"])
        layer.lora_A["default"].weight.copy_(t["lora_A"])
        layer.lora_B["default"].weight.copy_(t["lora_B"])
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return (lambda: layer(t["x"])), [t["x"], *params]


def _fasttrain(backend: str) -> Make:
    def make(t, w):
        from fasttrain import _backend
        from fasttrain.ops import lora_linear

        reason = _backend.triton_unavailable_reason(t["x"].device)
        if backend == "triton" and reason is not None:
            raise RuntimeError(reason)

        def fwd():
            return lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"],
                               ALPHA_OVER_R, w["p"], backend=backend)
        return fwd, [t["x"], t["lora_A"], t["lora_B"]]
    return make


PROVIDERS: dict[str, Make] = {
    BASELINE: _base,
    "peft": _peft(True),
    "peft[no-upcast]": _peft(False),
    "torch-3matmul": _torch_3matmul,
    "torch-addmm": _torch_addmm,
    "fasttrain-triton": _fasttrain("triton"),
}


def make_tensors(w: dict, dtype: torch.dtype, device: torch.device) -> dict:
    gen = torch.Generator(device).manual_seed(SEED)
    M, K, N, r = w["M"], w["K"], w["N"], w["r"]

    def randn(*shape, scale=1.0, grad=False):
        t = (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)
        return t.requires_grad_(grad)
    return dict(x=randn(M, K, grad=True), weight=randn(N, K, scale=K ** -0.5),
                bias=randn(N), lora_A=randn(r, K, scale=K ** -0.5, grad=True),
                lora_B=randn(N, r, scale=r ** -0.5, grad=True), dy=randn(M, N))


def flops(provider: str, w: dict, mode: str) -> int:
    M, K, N, r = w["M"], w["K"], w["N"], w["r"]
    base = 2 * M * N * K
    if provider == BASELINE:
        return {"fwd": base, "bwd": base, "fwd+bwd": 2 * base}[mode]
    low_fwd = 2 * M * r * (K + N)
    low_bwd = 2 * low_fwd  # dh = s dy B, dB = s dy^T h, dA = dh^T x, dx += dh A (h is saved)
    return {"fwd": base + low_fwd, "bwd": base + low_bwd,
            "fwd+bwd": 2 * base + low_fwd + low_bwd}[mode]


def bytes_floor(w: dict, mode: str, elem: int) -> int:
    M, K, N = w["M"], w["K"], w["N"]
    fwd = (M * K + N * K + M * N) * elem
    bwd = (M * N + N * K + M * K) * elem
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _timed_fns(fwd, inputs, dy) -> dict:
    state = {"y": fwd()}

    def backward():
        torch.autograd.grad(state["y"], inputs, dy, retain_graph=True)

    def both():
        torch.autograd.grad(fwd(), inputs, dy)
    return {"fwd": fwd, "bwd": backward, "fwd+bwd": both}


OUTPUTS = ("out", "dx", "dA", "dB")  # y and the gradients a LoRA provider computes, in order


def reference(t: dict) -> dict[str, torch.Tensor]:
    """y, dx, dA, dB in fp32 from the inputs upcast, without dropout, for the output grad dy."""
    x, weight, bias, a, b = (t[k].detach().float().requires_grad_(k in ("x", "lora_A", "lora_B"))
                             for k in ("x", "weight", "bias", "lora_A", "lora_B"))
    y = F.linear(x, weight, bias) + ALPHA_OVER_R * F.linear(F.linear(x, a), b)
    return dict(zip(OUTPUTS, (y.detach(), *torch.autograd.grad(y, (x, a, b), t["dy"].float()))))


def errors(fwd, inputs, dy, ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """||t - ref|| / ||ref|| of the provider's y and its gradients (x, A, B) in fp32."""
    y = fwd()
    got = (y, *torch.autograd.grad(y, inputs, dy))
    return {name: rel_err(g, ref[name]) for name, g in zip(OUTPUTS, got)}


def _memory(fwd, inputs, dy, device) -> dict:
    """CUDA: bytes the forward keeps for backward, peak of one fwd+bwd above what was there."""
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    y = fwd()
    saved = torch.cuda.memory_allocated(device) - start - y.nbytes
    torch.autograd.grad(y, inputs, dy)
    del y
    peak = torch.cuda.max_memory_allocated(device) - start
    return {"saved_bytes": saved, "peak_bytes": peak}


def run(ctx: Context) -> Iterator[list[dict]]:
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    elem = torch.finfo(dtype).bits // 8
    for w in workloads(ctx):
        rows = []
        t = make_tensors(w, dtype, ctx.device)
        ref = reference(t) if w["p"] == 0 else None
        fns, info, errs = {}, {}, {}
        for name, make in PROVIDERS.items():
            if name == "fasttrain-triton" and not ctx.cuda:
                ctx.skip(name, "CUDA only (the Triton interpreter on CPU is a correctness "
                         "tool, not something to time)")
                continue
            try:
                fwd, inputs = make(t, w)
                timed = _timed_fns(fwd, inputs, t["dy"])
                timed["fwd+bwd"]()  # fails here if the provider cannot run this workload
                mem = _memory(fwd, inputs, t["dy"], ctx.device) if ctx.cuda else {}
                if ref is not None and name != BASELINE:  # the base layer computes no LoRA term
                    errs[name] = errors(fwd, inputs, t["dy"], ref)
            except Exception as e:  # noqa: BLE001 - any failure skips the provider, with why
                ctx.skip(name, f"{type(e).__name__}: {e}".splitlines()[0])
                continue
            for mode in MODES:
                fns[f"{name}|{mode}"] = timed[mode]
            info[name] = mem
        if not fns:
            continue
        print(f"lora {_name(w)} {str(dtype).removeprefix('torch.')}: timing "
              f"{', '.join(info)}", flush=True)
        timings, probe_tflops = ctx.time_compute(fns)
        for key, timing in timings.items():
            name, mode = key.split("|")
            n_bytes = bytes_floor(w, mode, elem)
            n_flops = flops(name, w, mode)
            rows.append({"kernel": "lora", "provider": name, "mode": mode,
                         "workload": _name(w), "config": json.dumps(dict(w, seed=SEED,
                                                                         scaling=ALPHA_OVER_R)),
                         "dtype": str(dtype).removeprefix("torch."), **timing,
                         "reps": ctx.reps, "probe_tflops": probe_tflops,
                         "timing": "cuda-events, device time" if ctx.cuda else "perf_counter",
                         "bytes": n_bytes, "bytes_per_param": n_bytes / (w["M"] * w["K"]),
                         "flops": n_flops,
                         "saved_bytes": info[name].get("saved_bytes"),
                         "peak_bytes": info[name].get("peak_bytes"),
                         "rel_err": errs.get(name),
                         "rel_err_reference": "fp32 (upcast inputs)" if name in errs else None})
        del t, fns, ref
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
        yield rows
