"""Varlen attention: fasttrain against torch's varlen attention (the FA2 kernel), SDPA on padded
batches, FlexAttention with a document mask and flash-attn (when installed).

Workloads are sets of sequence lengths packed into one batch: a long-tailed mix, one long
sequence among many short ones, and equal lengths. Every provider of a workload gets the same
q, k, v (random, fixed seed) in its own layout, built before timing: packed for the varlen
providers, padded to the longest sequence for SDPA (right padding; causal runs use
``is_causal`` so that SDPA may pick its flash kernel, non-causal ones a key-padding mask).
FLOPs follow FlashAttention's convention over the real (unpadded) work:
4 * sum(len^2) * nheads * d, halved when causal, x2.5 for the backward, x3.5 for both; so a
provider that computes on padding gets no credit for it. Modes: ``fwd`` (under no_grad),
``bwd`` (autograd.grad of a kept graph) and ``fwd+bwd``.

Every row also records ``rel_err``: the provider's out, dq, dk and dv (mapped back to the packed
layout; the same output gradient for all) against an fp32 reference on the same inputs, as
||x - ref|| / ||ref||. A fast provider is only worth its time if its error stays near the
baseline's (bench/targets.py asks for at most twice it, FlashAttention's criterion).
"""
from __future__ import annotations

import gc
import importlib.util
import inspect
import json
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from bench.common import Context, rel_err

BASELINE = ("torch-varlen", "sdpa-padded")  # the first one present in a workload
SEED = 0
MODES = ("fwd", "bwd", "fwd+bwd")
FLEX = "flex-document-mask"  # compiled per workload: timed after the other providers


def long_tailed(total: int, shortest: int, longest: int, seed: int = SEED) -> list[int]:
    """Lengths summing to ``total``, drawn from a Pareto tail (alpha 1.2) clipped to
    [shortest, longest]: many short sequences, a few long ones; the last one takes what is
    left."""
    rng = random.Random(seed)
    lens = []
    while sum(lens) < total:
        n = min(longest, int(shortest * rng.paretovariate(1.2)))
        lens.append(min(n, total - sum(lens)))
    return lens


def uniform(total: int, shortest: int, longest: int, head: tuple[int, ...] = ()) -> list[int]:
    """``head``, then lengths drawn uniformly from [shortest, longest] up to ``total``."""
    rng = random.Random(SEED)
    lens = list(head)
    while sum(lens) < total:
        lens.append(min(rng.randint(shortest, longest), total - sum(lens)))
    return lens


WORKLOADS = {
    "mix-16K": lambda: long_tailed(16384, 128, 4096),
    "short-16K": lambda: uniform(16384, 32, 256),  # many short sequences (no cliff there)
    "1x8K+short-16K": lambda: uniform(16384, 128, 512, head=(8192,)),
    "equal-8x2K": lambda: [2048] * 8,
    "mix-2K": lambda: long_tailed(2048, 32, 512),  # CPU
    "mix-256": lambda: long_tailed(256, 8, 64),  # tiny (tests)
}


@dataclass
class Shape:
    nheads: int
    nheads_k: int
    head_dim: int
    causal: bool
    dtype: torch.dtype


def plan(ctx: Context) -> list[tuple[str, Shape]]:
    if not ctx.cuda:
        workload = "mix-256" if ctx.sizes == "tiny" else "mix-2K"
        return [(workload, Shape(4, 2, 64, causal, torch.float32)) for causal in (True, False)]
    if ctx.sizes == "targets":  # DESIGN's target workload, and its no-cliff companion
        return [(w, Shape(32, 8, 128, True, torch.bfloat16)) for w in ("mix-16K", "short-16K")]
    workloads = ["mix-16K"] if ctx.sizes == "quick" else ["mix-16K", "short-16K",
                                                          "1x8K+short-16K", "equal-8x2K"]
    dims = [128] if ctx.sizes == "quick" else [128, 64]
    return [(w, Shape(32, 8, d, causal, torch.bfloat16))
            for w in workloads for d in dims for causal in (True, False)]


@dataclass
class Inputs:
    """One workload's tensors in every layout the providers use."""
    lens: list[int]
    q: torch.Tensor  # (total, nheads, d), packed
    k: torch.Tensor  # (total, nheads_k, d)
    v: torch.Tensor
    cu_seqlens: torch.Tensor  # (batch + 1,) int32
    dout: torch.Tensor

    @property
    def max_seqlen(self) -> int:
        return max(self.lens)


def make_inputs(lens: list[int], shape: Shape, device: torch.device) -> Inputs:
    gen = torch.Generator().manual_seed(SEED)
    total = sum(lens)

    def rand(heads):
        return torch.randn(total, heads, shape.head_dim, generator=gen).to(device, shape.dtype)

    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32,
                      device=device)
    return Inputs(lens, rand(shape.nheads), rand(shape.nheads_k), rand(shape.nheads_k), cu,
                  rand(shape.nheads))


GRADS = ("dq", "dk", "dv")


def _same(t: torch.Tensor, name: str = "") -> torch.Tensor:
    return t


@dataclass
class Run:
    """What a provider sets up: ``fn(*leaves)`` is its attention in its own layout; ``layout``
    maps a packed (total, nheads, d) tensor into that layout (the output gradient), ``packed``
    maps its out / dq / dk / dv back (``name`` says which)."""
    fn: Callable
    leaves: tuple
    layout: Callable[[torch.Tensor], torch.Tensor] = _same
    packed: Callable[[torch.Tensor, str], torch.Tensor] = _same


# A provider: make(inputs, shape) -> Run.
Provider = Callable[[Inputs, Shape], Run]


def _leaves(*tensors):
    return tuple(t.detach().clone().requires_grad_() for t in tensors)


def _sum_repeated_kv(t: torch.Tensor, name: str, s: Shape) -> torch.Tensor:
    """dk/dv of kv heads repeated (repeat_interleave) to nheads: summed back to nheads_k, in
    fp32 (a bf16 sum would add a rounding of its own to the provider's error)."""
    if name not in ("dk", "dv") or s.nheads == s.nheads_k:
        return t
    return t.float().unflatten(1, (s.nheads_k, s.nheads // s.nheads_k)).sum(2)


def fasttrain(backend: str) -> Provider:
    def make(x: Inputs, s: Shape):
        from fasttrain.ops import varlen_attention

        def fn(q, k, v):
            return varlen_attention(q, k, v, x.cu_seqlens, x.cu_seqlens, causal=s.causal,
                                    backend=backend)
        return Run(fn, _leaves(x.q, x.k, x.v))
    return make


def torch_varlen(x: Inputs, s: Shape):
    from torch.nn.attention import varlen

    params = inspect.signature(varlen.varlen_attn).parameters
    k, v = x.k, x.v
    kwargs = {}
    repeated = False
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    elif s.nheads != s.nheads_k:  # older torch: no GQA, so the kv heads are repeated up front
        k, v = (t.repeat_interleave(s.nheads // s.nheads_k, 1) for t in (k, v))
        repeated = True
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if s.causal else (-1, -1)
    else:
        kwargs["is_causal"] = s.causal

    def fn(q, k, v):
        return varlen.varlen_attn(q, k, v, x.cu_seqlens, x.cu_seqlens, x.max_seqlen,
                                  x.max_seqlen, **kwargs)
    return Run(fn, _leaves(x.q, k, v),
               packed=lambda t, name: _sum_repeated_kv(t, name, s) if repeated else t)


def flash_attn(x: Inputs, s: Shape):
    from flash_attn import flash_attn_varlen_func

    def fn(q, k, v):
        return flash_attn_varlen_func(q, k, v, x.cu_seqlens, x.cu_seqlens, x.max_seqlen,
                                      x.max_seqlen, causal=s.causal)
    return Run(fn, _leaves(x.q, x.k, x.v))


def _padded(t: torch.Tensor, lens: list[int], seqlen: int) -> torch.Tensor:
    """(total, heads, d) -> (batch, heads, seqlen, d), zeros after each sequence."""
    out = t.new_zeros(len(lens), seqlen, *t.shape[1:])
    start = 0
    for b, n in enumerate(lens):
        out[b, :n] = t[start:start + n]
        start += n
    return out.transpose(1, 2)


def _unpadded(t: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """(batch, heads, seqlen, d) -> (total, heads, d): the inverse of ``_padded``."""
    return torch.cat([t[b, :, :n].transpose(0, 1) for b, n in enumerate(lens)])


def sdpa_padded(x: Inputs, s: Shape):
    seqlen = x.max_seqlen
    q, k, v = (_padded(t, x.lens, seqlen) for t in (x.q, x.k, x.v))
    mask, gqa = None, {}
    if not s.causal:  # keys past each sequence's end are masked
        lens = torch.tensor(x.lens, device=q.device)
        mask = (torch.arange(seqlen, device=q.device) < lens[:, None])[:, None, None, :]
        # with a mask, SDPA's GQA mode only has the math kernel (scores materialized): repeat
        # the kv heads instead, so that its memory-efficient kernel takes the mask
        k, v = (t.repeat_interleave(s.nheads // s.nheads_k, 1) for t in (k, v))
    elif s.nheads != s.nheads_k:
        gqa = {"enable_gqa": True}

    def fn(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=s.causal, **gqa)

    def packed(t, name):
        t = _unpadded(t, x.lens)
        return _sum_repeated_kv(t, name, s) if mask is not None else t
    return Run(fn, _leaves(q, k, v), layout=lambda t: _padded(t, x.lens, seqlen), packed=packed)


def flex_document(x: Inputs, s: Shape):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(x.lens), device=x.q.device),
                                  torch.tensor(x.lens, device=x.q.device))

    def document(b, h, q_idx, kv_idx):
        same = doc[q_idx] == doc[kv_idx]
        return same & (q_idx >= kv_idx) if s.causal else same

    torch._dynamo.reset()  # one compiled variant per workload: stay clear of the recompile limit
    total = doc.numel()
    block_mask = create_block_mask(document, None, None, total, total, device=x.q.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    gqa = s.nheads != s.nheads_k

    def fn(q, k, v):
        out = compiled(q[None].transpose(1, 2), k[None].transpose(1, 2),
                       v[None].transpose(1, 2), block_mask=block_mask, enable_gqa=gqa)
        return out.transpose(1, 2)[0]
    return Run(fn, _leaves(x.q, x.k, x.v))


def providers(ctx: Context) -> dict[str, Provider]:
    found = {}
    if ctx.cuda:
        found["fasttrain"] = fasttrain("triton")
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            found["torch-varlen"] = torch_varlen
        else:
            ctx.skip("torch-varlen", f"torch {torch.__version__} has no torch.nn.attention.varlen")
        found[FLEX] = flex_document
        if importlib.util.find_spec("flash_attn") is not None:
            found["flash-attn"] = flash_attn
        else:
            ctx.skip("flash-attn", "not installed")
    else:
        ctx.skip("fasttrain (triton), torch-varlen, flex", "CUDA only (the Triton interpreter "
                 "on CPU is a correctness tool, not something to time)")
        found["fasttrain-torch"] = fasttrain("torch")  # the reference: the CPU backend
    found["sdpa-padded"] = sdpa_padded
    return found


def flops(lens: list[int], s: Shape, mode: str) -> float:
    work = 4.0 * sum(n * n for n in lens) * s.nheads * s.head_dim
    if s.causal:
        work /= 2
    return work * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def reference(x: Inputs, s: Shape) -> dict[str, torch.Tensor]:
    """fp32 out, dq, dk, dv (packed) of the inputs upcast, for the output gradient ``x.dout``:
    fasttrain's torch reference one sequence at a time (memory bounded by the longest)."""
    from fasttrain.ops.varlen_attn import varlen_attention_reference

    parts = {name: [] for name in ("out", *GRADS)}
    bounds = x.cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        q, k, v = (t[start:end].float().requires_grad_() for t in (x.q, x.k, x.v))
        cu = torch.tensor([0, end - start], dtype=torch.int32, device=q.device)
        out, _ = varlen_attention_reference(q, k, v, cu, cu, causal=s.causal)
        grads = torch.autograd.grad(out, (q, k, v), x.dout[start:end].float())
        for name, t in zip(parts, (out, *grads)):
            parts[name].append(t.detach())
    return {name: torch.cat(ts) for name, ts in parts.items()}


def errors(run: Run, dout: torch.Tensor, ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """The provider's out, dq, dk, dv against the fp32 reference."""
    out = run.fn(*run.leaves)
    grads = torch.autograd.grad(out, run.leaves, dout)
    return {name: rel_err(run.packed(t, name), ref[name])
            for name, t in zip(("out", *GRADS), (out, *grads))}


def timed_functions(run: Run, dout: torch.Tensor) -> dict[str, Callable[[], object]]:
    fn, leaves = run.fn, run.leaves
    out = fn(*leaves)

    def forward():
        with torch.no_grad():
            fn(*leaves)

    def backward():
        torch.autograd.grad(out, leaves, dout, retain_graph=True)

    def forward_backward():
        torch.autograd.grad(fn(*leaves), leaves, dout)
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward_backward}


def measure(ctx: Context, workload: str, s: Shape, x: Inputs, ref: dict[str, torch.Tensor],
            chosen: dict[str, Provider]) -> list[dict]:
    """The ``chosen`` providers on inputs ``x`` (``ref``: their fp32 reference), interleaved."""
    lens = x.lens
    per_mode = {mode: {} for mode in MODES}
    errs = {}
    for name, make in chosen.items():
        try:
            run = make(x, s)
            dout = run.layout(x.dout)
            fns = timed_functions(run, dout)
            for f in fns.values():  # compiles, autotunes; fails here if it cannot run
                f()
            errs[name] = errors(run, dout, ref)
        except Exception as e:  # noqa: BLE001 - any failure skips the provider, with the reason
            ctx.skip(name, f"{type(e).__name__}: {e}".splitlines()[0])
            continue
        for mode, f in fns.items():
            per_mode[mode][name] = f
    config = {"n_seqs": len(lens), "total_tokens": sum(lens), "max_seqlen": max(lens),
              "nheads": s.nheads, "nheads_k": s.nheads_k, "head_dim": s.head_dim,
              "causal": s.causal, "seed": SEED}
    dtype = str(s.dtype).removeprefix("torch.")
    rows = []
    for mode, fns in per_mode.items():
        if not fns:
            continue
        label = f"{workload} d={s.head_dim} {'causal' if s.causal else 'full'}"
        print(f"varlen_attn {label} {mode} {dtype}: timing {', '.join(fns)}", flush=True)
        timings, probe_tflops = ctx.time_compute(fns)
        rows += [{"kernel": "varlen_attn", "provider": name, "mode": mode, "workload": label,
                  "config": json.dumps(config), "dtype": dtype, **timings[name],
                  "reps": ctx.reps, "flops": flops(lens, s, mode), "probe_tflops": probe_tflops,
                  "timing": "cuda-events, device time" if ctx.cuda else "perf_counter",
                  "rel_err": errs[name], "rel_err_reference": "fp32 (upcast inputs)"}
                 for name in fns]
    return rows


def run(ctx: Context) -> Iterator[list[dict]]:
    """Per workload, the providers timed interleaved; FlexAttention, which compiles for each
    workload (a minute, cold), timed after the others' rows are written, so that a run cut
    off during its compile keeps them."""
    for workload, shape in plan(ctx):
        found = providers(ctx)
        x = make_inputs(WORKLOADS[workload](), shape, ctx.device)
        ref = reference(x, shape)
        yield measure(ctx, workload, shape, x, ref,
                      {k: v for k, v in found.items() if k != FLEX})
        if FLEX in found:
            yield measure(ctx, workload, shape, x, ref, {FLEX: found[FLEX]})
        del x, ref
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
