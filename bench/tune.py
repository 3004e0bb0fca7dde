"""Sweep the block configs of the varlen attention kernels on one workload (issue 6's tuning).

    python -m bench.tune [--head-dim 128 64] [--jobs 14] [--out DIR]

For each head dim it times every candidate of the forward, dK/dV and dQ kernels on the
benchmark's ``mix-16K`` workload (32 q heads, 8 kv heads, causal, bf16), checks each
candidate's outputs against the current config's, and prints the fastest ones and a
``configs()`` entry to paste into kernels/varlen_attn.py. The whole sweep goes to
``tune-varlen_attn-<device>-<stamp>.json`` in ``--out`` (default bench/results/tune/: not a
harness results file, so it stays out of bench/results/ itself).

Compiling is what takes the time, so ``--jobs`` worker processes compile the candidates first
(one launch each fills Triton's on-disk cache); the main process then times them one at a time
with an idle GPU. dK/dV candidates are timed as the whole backward with the current dQ config,
dQ candidates with the best dK/dV one: the other kernels' share is the same in every row.

On a CPU (``--device cpu``) it runs the same code under the Triton interpreter at a tiny size
and with two candidates per kernel, which only checks the plumbing.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

KINDS = ("fwd", "dkdv", "dq")


def candidates(kind: str, head_dim: int, tiny: bool) -> list[dict]:
    """The sweep: block sizes x warps x pipeline stages, pruned of shapes that cannot fit in
    an H100's shared memory by a rough count (Triton rejects the rest at compile time)."""
    if tiny:
        return [dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
                dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)]
    if kind == "fwd":
        space = itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4))
    elif kind == "dkdv":  # BLOCK_N is the owned key block, BLOCK_M the query step
        keys = (32, 64, 128) if head_dim > 128 else (64, 128)
        space = itertools.product((16, 32, 64), keys, (4, 8), (1, 2, 3))
    else:  # dq: BLOCK_M is the owned query block, BLOCK_N the key step
        space = itertools.product((64, 128), (16, 32, 64), (4, 8), (1, 2, 3))
    out = []
    for m, n, warps, stages in space:
        d = max(16, 1 << (head_dim - 1).bit_length())
        if kind == "fwd":  # q stays; k, v tiles are pipelined
            smem = 2 * (m * d + stages * 2 * n * d)
        elif kind == "dkdv":  # k, v stay; q, dO tiles are pipelined
            smem = 2 * (2 * n * d + stages * 2 * m * d)
        else:  # q, dO stay; k, v tiles are pipelined
            smem = 2 * (2 * m * d + stages * 2 * n * d)
        if smem <= 200 * 1024:
            out.append(dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages))
    return out


class Problem:
    """The workload's tensors and one call of a kernel kind with a config."""

    def __init__(self, device: str, head_dim: int):
        import torch

        from bench.varlen_attn import WORKLOADS, Shape, flops, make_inputs

        tiny = device == "cpu"
        lens = WORKLOADS["mix-256" if tiny else "mix-16K"]()
        dtype = torch.float32 if tiny else torch.bfloat16
        self.shape = Shape(4 if tiny else 32, 2 if tiny else 8, head_dim, True, dtype)
        self.x = make_inputs(lens, self.shape, torch.device(device))
        self.scale = head_dim ** -0.5
        self.flops = {"fwd": flops(lens, self.shape, "fwd"), "bwd": flops(lens, self.shape, "bwd")}
        self.out, self.lse = self.fwd(None)

    def fwd(self, config):
        from fasttrain.kernels.varlen_attn import varlen_attn_fwd

        x = self.x
        return varlen_attn_fwd(x.q, x.k, x.v, x.cu_seqlens, x.cu_seqlens,
                               softmax_scale=self.scale, window_left=-1, window_right=0,
                               softcap=0.0, config=config)

    def bwd(self, config):
        from fasttrain.kernels.varlen_attn import varlen_attn_bwd

        x = self.x
        return varlen_attn_bwd(x.dout, x.q, x.k, x.v, self.out, self.lse, None, x.cu_seqlens,
                               x.cu_seqlens, softmax_scale=self.scale, window_left=-1,
                               window_right=0, softcap=0.0, config=config)

    def call(self, kind: str, config: dict):
        return self.fwd(config) if kind == "fwd" else self.bwd(config)


def full_config(base: dict, kind: str, cfg: dict) -> dict:
    return {**base, kind: cfg}


_PROBLEMS: dict = {}


def _compile(device: str, head_dim: int, kind: str, config: dict) -> str | None:
    """Worker: one launch of ``kind`` with ``config`` (all kinds' configs; compiles into
    Triton's disk cache).
    None, or why the candidate cannot run."""
    try:
        if head_dim not in _PROBLEMS:
            _PROBLEMS[head_dim] = Problem(device, head_dim)
        _PROBLEMS[head_dim].call(kind, config)
        if device == "cuda":
            import torch
            torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - a candidate that cannot compile or run is reported
        return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def _max_rel_err(got, want) -> float:
    err = 0.0
    for g, w in zip(got, want):
        g, w = g.float(), w.float()
        finite = w.isfinite()
        if not bool((g.isfinite() == finite).all()):
            return float("inf")
        scale = w[finite].abs().max().clamp_min(1e-6)
        err = max(err, float((g[finite] - w[finite]).abs().max() / scale))
    return err


def _time_ms(fn, device: str) -> tuple[float, float]:
    """(p50, p20-p80 spread) of fn in ms."""
    import numpy as np

    if device == "cuda":
        import triton.testing
        p50, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=200,
                                                quantiles=[0.5, 0.2, 0.8])
        return p50, p80 - p20
    samples = []
    for _ in range(2):  # the interpreter: only the plumbing is checked
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    p50, p20, p80 = np.percentile(samples, [50, 20, 80])
    return float(p50), float(p80 - p20)


def sweep(device: str, head_dim: int, jobs: int) -> dict:
    """Compile every candidate in ``jobs`` processes, then time and check them here."""
    from fasttrain.kernels.varlen_attn import configs

    tiny = device == "cpu"
    problem = Problem(device, head_dim)
    current = configs(head_dim, problem.shape.dtype, interpret=tiny)
    cands = {kind: candidates(kind, head_dim, tiny) for kind in KINDS}
    start = time.perf_counter()
    failed = {}
    if jobs > 1:
        tasks = [(kind, c) for kind in KINDS for c in cands[kind]]
        try:
            with ProcessPoolExecutor(jobs,
                                     mp_context=multiprocessing.get_context("spawn")) as pool:
                errors = list(pool.map(_compile, *zip(*[
                    (device, head_dim, k, full_config(current, k, c)) for k, c in tasks])))
            failed = {(k, json.dumps(c)): e for (k, c), e in zip(tasks, errors) if e}
        except BrokenProcessPool as e:  # a worker died (a crash in a compile): compile here
            print(f"d={head_dim}: the compile workers failed ({e}); compiling while timing",
                  flush=True)
    compile_s = time.perf_counter() - start
    print(f"d={head_dim}: {sum(map(len, cands.values()))} candidates compiled in "
          f"{compile_s:.0f} s with {jobs} processes, {len(failed)} cannot run", flush=True)

    reference = {"fwd": (problem.out, problem.lse), "bwd": problem.bwd(None)}
    results, best = [], dict(current)
    for kind in KINDS:  # dq after dkdv: it is timed with the best dkdv config
        op = "fwd" if kind == "fwd" else "bwd"
        for cfg in [current[kind]] + [c for c in cands[kind] if c != current[kind]]:
            row = {"kind": kind, "config": cfg, "current": cfg == current[kind]}
            why = failed.get((kind, json.dumps(cfg)))
            if why is None:
                config = full_config(best, kind, cfg)
                try:
                    err = _max_rel_err(problem.call(kind, config), reference[op])
                    if not math.isfinite(err):
                        raise ValueError("outputs non-finite where the current config's are not")
                    ms, spread = _time_ms(lambda: problem.call(kind, config), device)
                    row.update(ms=ms, spread_ms=spread, max_rel_err=err,
                               tflops=problem.flops[op] / ms / 1e9)
                except Exception as e:  # noqa: BLE001
                    why = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            if why is not None:
                row["error"] = why
            results.append(row)
        ok = [r for r in results if r["kind"] == kind and "ms" in r and r["max_rel_err"] < 2e-2]
        if ok:
            best[kind] = min(ok, key=lambda r: r["ms"])["config"]
    return {"head_dim": head_dim, "dtype": str(problem.shape.dtype).removeprefix("torch."),
            "workload": "mix-256" if tiny else "mix-16K", "nheads": problem.shape.nheads,
            "nheads_k": problem.shape.nheads_k, "causal": True, "compile_s": compile_s,
            "current": current, "best": best, "results": results}


def print_summary(doc: dict, top: int = 5) -> None:
    print(f"\n== d={doc['head_dim']} {doc['dtype']} {doc['workload']} "
          f"{doc['nheads']}/{doc['nheads_k']} heads, causal")
    for kind in KINDS:
        rows = [r for r in doc["results"] if r["kind"] == kind and "ms" in r]
        rows.sort(key=lambda r: r["ms"])
        now = next((r for r in rows if r["current"]), None)
        label = "fwd" if kind == "fwd" else f"bwd, sweeping {kind}"
        print(f"{label}: {len(rows)} ran" + (f"; current {now['ms']:.3f} ms" if now else ""))
        for r in rows[:top] + ([now] if now and now not in rows[:top] else []):
            c = r["config"]
            print(f"  {c['BLOCK_M']:4} {c['BLOCK_N']:4} w{c['num_warps']} s{c['num_stages']}"
                  f"  {r['ms']:8.3f} ms +-{r['spread_ms'] / 2:.3f}  {r['tflops']:7.1f} TFLOP/s"
                  f"  err {r['max_rel_err']:.1e}{'  (current)' if r['current'] else ''}")
    print(f"suggested configs() entry for d={doc['head_dim']}: {json.dumps(doc['best'])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-dim", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--jobs", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "tune",
                        help="folder of the sweep's JSON (default: bench/results/tune, apart "
                        "from the harness's results files)")
    args = parser.parse_args(argv)

    import torch

    from bench import common

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before kernels/ imports triton.jit functions
        if "fasttrain.kernels.varlen_attn" in sys.modules:
            print("--device cpu needs TRITON_INTERPRET=1 set before kernels are imported",
                  file=sys.stderr)
            return 2
    env = common.environment(torch.device(device), ["--tune", *(argv or sys.argv[1:])])
    env["command"] = "python -m bench.tune " + " ".join(argv if argv is not None else sys.argv[1:])
    stamp = datetime.datetime.fromisoformat(env["timestamp"]).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tune-varlen_attn-{common.slug(env['device_name'])}-{stamp}.json"
    docs = []
    for head_dim in args.head_dim:  # written after each head dim: a cut-off run keeps those
        docs.append(sweep(device, head_dim, args.jobs))
        print_summary(docs[-1])
        path.write_text(json.dumps({"env": env, "sweeps": docs}, indent=1) + "\n")
        print(f"\nwrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
