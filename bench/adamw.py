"""AdamW step: torch's three implementations, fasttrain's backends and installed peers.

Workloads are lists of parameter sizes; every provider of a (workload, dtype) shares the same
params and grads (random, fixed seed, set once) and keeps its own optimizer state. Modes:
``step`` (optimizer.step()) and ``clip+step`` (torch: clip_grad_norm_(foreach=True) then step;
fasttrain: max_grad_norm=1.0 fused into the step). On CUDA each step is captured in a CUDA graph
and the replays are timed; providers whose step cannot be captured are timed eagerly.
"""
from __future__ import annotations

import gc
import importlib
import json
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from bench.common import Context, cuda_graph

BASELINE = "torch-fused"
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
MAX_GRAD_NORM = 1.0
SEED = 0


def mixed_sizes(total: int, count: int, seed: int = SEED) -> list[int]:
    """``count`` tensor sizes summing to ``total``: log-uniform over three decades, as a model's
    mix of large matrices and small vectors, fixed by ``seed``; most sizes are ragged."""
    rng = random.Random(seed)
    weights = [10 ** rng.uniform(0, 3) for _ in range(count)]
    sizes = [max(1, int(w * total / sum(weights))) for w in weights]
    sizes[sizes.index(max(sizes))] += total - sum(sizes)
    return sizes


WORKLOADS = {
    "50M/200": lambda: mixed_sizes(50_000_000, 200),
    "5000x4K": lambda: [4096] * 5000,
    "5000x16": lambda: [16] * 5000,  # the time per tensor (CPU target: < 1 us)
    "1B/300": lambda: mixed_sizes(1_000_000_000, 300),
    "200K/20": lambda: mixed_sizes(200_000, 20),  # tiny (tests)
    "50x4K": lambda: [4096] * 50,  # tiny (tests)
}

# A provider's make(params, clip, capturable) returns (optimizer, step function).
Make = Callable[[list, bool, bool], tuple]


def _torch_clip(build: Callable[[list, bool], torch.optim.Optimizer]) -> Make:
    """A provider from an optimizer without fused clipping: clip_grad_norm_ runs before step."""
    def make(params, clip, capturable):
        opt = build(params, capturable)
        if not clip:
            return opt, opt.step

        def step():
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM, foreach=True)
            opt.step()
        return opt, step
    return make


def _torch_adamw(**flags) -> Make:
    return _torch_clip(lambda ps, cap: torch.optim.AdamW(ps, **HYPER, capturable=cap, **flags))


def _fasttrain(backend: str, **options) -> Make:
    def make(params, clip, capturable):
        from fasttrain.optim import AdamW

        opt = AdamW(params, **HYPER, capturable=capturable, backend=backend,
                    max_grad_norm=MAX_GRAD_NORM if clip else None, **options)
        return opt, opt.step
    return make


def _peer(module: str, attribute: str, **options) -> Make:
    def build(params, capturable):
        return getattr(importlib.import_module(module), attribute)(params, **HYPER, **options)
    return _torch_clip(build)


PEERS = {
    "bitsandbytes-adamw": _peer("bitsandbytes.optim", "AdamW"),
    "torchao-adamw": _peer("torchao.optim", "_AdamW"),
    "apex-fusedadam": _peer("apex.optimizers", "FusedAdam", adam_w_mode=True),
}


@dataclass
class Variant:
    mode: str  # "step" or "clip+step"
    dtype: torch.dtype
    providers: dict[str, Make]  # the first one set up first (OOM on CUDA hits the last ones)


def variants(ctx: Context) -> list[Variant]:
    # On CUDA the torch reference backend is left out: eager, with a host sync per tensor, it
    # is no contender and would take minutes of the device time on 5000x4K.
    backends = ("triton", "cuda") if ctx.cuda else ("cpu", "torch")
    fp32 = {BASELINE: _torch_adamw(fused=True),
            **{f"fasttrain-{b}": _fasttrain(b) for b in backends}}
    if ctx.sizes != "targets":  # no target reads it
        fp32["torch-foreach"] = _torch_adamw(foreach=True)
    if ctx.sizes in ("full", "tiny"):
        # the for-loop path is torch's default on CPU only (foreach on CUDA)
        fp32 |= {} if ctx.cuda else {"torch-forloop": _torch_adamw(foreach=False)}
    if ctx.sizes != "quick":  # the peers installed, side by side (one not installed: a skip)
        fp32 |= PEERS
    out = [Variant("step", torch.float32, fp32), Variant("clip+step", torch.float32, fp32)]
    if ctx.cuda and ctx.sizes != "quick":
        bf16 = {BASELINE: _torch_adamw(fused=True)}
        # triton: the one GPU backend with stochastic rounding; fp32 states, then bf16 ones
        bf16["fasttrain-triton[sr]"] = _fasttrain(
            "triton", stochastic_rounding=True, state_dtype=torch.float32)
        bf16["fasttrain-triton[sr,bf16-state]"] = _fasttrain(
            "triton", stochastic_rounding=True, state_dtype=torch.bfloat16)
        out.append(Variant("step", torch.bfloat16, bf16))
    return out


def workloads(ctx: Context) -> list[str]:
    if ctx.sizes == "tiny":
        return ["200K/20", "50x4K"]
    if ctx.sizes == "targets":  # DESIGN's target workloads (on the CPU: 50M in 200 tensors)
        return ["1B/300", "5000x4K"] if ctx.cuda else ["50M/200", "5000x16"]
    if ctx.cuda and ctx.sizes == "full":  # DESIGN's targets first (a run may be cut off)
        return ["1B/300", "5000x4K", "50M/200"]
    return ["50M/200", "5000x4K"] + (["5000x16"] if ctx.sizes == "full" else [])


def bytes_moved(params: list, opt: torch.optim.Optimizer, clip: bool) -> int:
    """Bytes one step must move: read+write each param, read each grad (twice with clipping:
    the norm and the update), read+write every per-element state tensor the optimizer keeps
    (exp_avg, exp_avg_sq, max_exp_avg_sq, master copy) at its own dtype. fp32: 28 B/param."""
    total = 0
    for p in params:
        total += 2 * p.nbytes + (2 if clip else 1) * p.grad.nbytes
        total += 2 * state_bytes(opt, p)
    return total


def state_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    return sum(t.nbytes for t in opt.state[p].values()
               if torch.is_tensor(t) and t.shape == p.shape)


def make_params(sizes: list[int], dtype: torch.dtype, device: torch.device) -> list:
    gen = torch.Generator(device).manual_seed(SEED)
    params = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n, generator=gen, dtype=dtype, device=device))
        p.grad = torch.randn(n, generator=gen, dtype=dtype, device=device)
        params.append(p)
    return params


def free_memory(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


def set_up(ctx: Context, name: str, make: Make, params: list, clip: bool) -> tuple:
    """(optimizer, function to time, how it is timed) for one provider; raises if it cannot run."""
    opt, step = make(params, clip, ctx.cuda)
    step()  # creates the state; fails here if the provider cannot run this variant
    if not ctx.cuda:
        return opt, step, "perf_counter"
    try:
        graph = cuda_graph(step)
    except Exception as e:  # noqa: BLE001 - whatever breaks capture, time the step eagerly
        torch.cuda.synchronize()
        print(f"note {name}: CUDA graph capture failed, timing it eagerly: "
              f"{type(e).__name__}: {e}".splitlines()[0], flush=True)
        return opt, step, f"cuda-events, eager (capture failed: {type(e).__name__})"
    return opt, graph.replay, "cuda-graph"


def measure(ctx: Context, workload: str, variant: Variant, params: list) -> list[dict]:
    """Set up every provider of ``variant`` on ``params``, time them interleaved, return rows."""
    clip = variant.mode == "clip+step"
    optimizers, fns, info = [], {}, {}
    for name, make in variant.providers.items():
        try:
            opt, fns[name], timing = set_up(ctx, name, make, params, clip)
        except Exception as e:  # noqa: BLE001 - any failure skips the provider, with the reason
            ctx.skip(name, f"{type(e).__name__}: {e}".splitlines()[0])
            opt = None
        if opt is None:
            free_memory(ctx)  # what the failed set-up allocated
            continue
        optimizers.append(opt)  # graph replays do not keep the state alive by themselves
        info[name] = {"timing": timing, "bytes": bytes_moved(params, opt, clip),
                      "state_bytes": sum(state_bytes(opt, p) for p in params)}
    if not fns:
        return []
    print(f"adamw {workload} {variant.mode} {str(variant.dtype).removeprefix('torch.')}: "
          f"timing {', '.join(fns)}", flush=True)
    timings, probe_gbps = ctx.time(fns)
    numel = sum(p.numel() for p in params)
    config = {"n_tensors": len(params), "numel": numel, "sizes_seed": SEED, **HYPER,
              "max_grad_norm": MAX_GRAD_NORM if clip else None}
    return [{"kernel": "adamw", "provider": name, "mode": variant.mode, "workload": workload,
             "config": json.dumps(config), "dtype": str(variant.dtype).removeprefix("torch."),
             **timings[name], "reps": ctx.reps, "probe_gbps": probe_gbps, **info[name],
             "bytes_per_param": info[name]["bytes"] / numel}
            for name in fns]


def run(ctx: Context) -> Iterator[list[dict]]:
    if not ctx.cuda:
        ctx.skip("fasttrain-triton, fasttrain-cuda", "CUDA only (the Triton interpreter on CPU "
                 "is a correctness tool, not something to time)")
    all_variants = variants(ctx)
    for workload in workloads(ctx):
        sizes = WORKLOADS[workload]()
        for dtype in dict.fromkeys(v.dtype for v in all_variants):
            params = make_params(sizes, dtype, ctx.device)
            for variant in all_variants:
                if variant.dtype == dtype:
                    yield measure(ctx, workload, variant, params)
                    free_memory(ctx)
            del params
            free_memory(ctx)
