"""What every suite shares: timing, the bandwidth probe, the environment record, rows, output.

Timing interleaves providers inside one process: each repetition runs every provider and the
probe once, in a fresh seeded random order, so clock, thermal and neighbour drift (what the
previous call left in L2, the power state after a matmul) hit all of them alike. CPU:
time.perf_counter around each call. CUDA: device time, an event pair around each call queued
behind a short sleep kernel, so that the host issues the call while the GPU sleeps and the
pair times the GPU's work alone, as in training, where the host runs ahead of the GPU (and as
FlashAttention's and Triton's benchmarks time kernels). The host's time to issue each call
(Python, checks, launches) is recorded beside it (``host_p50_ms``); the sleep, 1.5x the
longest of three such times measured first, is longer, so the issue time does not show in the
device time. The elapsed times are read once at the end.

Before each call, untimed, one 8 KiB allocation settles the C allocator: glibc merges and sorts
the small blocks freed since its last large request only at the next one, so a call that frees
~10^5 small tensors (the torch reference path of AdamW over 5000 tensors) left ~6 ms of that
work to whichever call came next (measured on the CPU suite: the next provider's step took
twice its time).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


class BandwidthProbe:
    """Memory bandwidth, the yardstick for memory-bound kernels, timed along with them.

    CPU: in-place ``a.add_(b, alpha=s)`` on large fp32 tensors, 12 B per element (read a, read b,
    write a), with torch's threads. CUDA: a device-to-device copy, 8 B per element.
    """

    def __init__(self, device: torch.device, numel: int):
        self.cuda = device.type == "cuda"
        self.kind = "device-to-device copy" if self.cuda else "a.add_(b, alpha=s)"
        self.numel = numel
        self.bytes = (8 if self.cuda else 12) * numel
        self.a = torch.full((numel,), 1.0, device=device)
        self.b = torch.full((numel,), 1e-3, device=device)

    def __call__(self) -> None:
        if self.cuda:
            self.b.copy_(self.a)
        else:
            self.a.add_(self.b, alpha=1e-3)

    def describe(self) -> dict:
        return {"kind": self.kind, "numel": self.numel, "bytes": self.bytes}


class MatmulProbe:
    """Dense matmul throughput, the yardstick for compute-bound kernels, timed along with them:
    ``a @ b`` on square matrices, bf16 on CUDA (tensor cores), fp32 on CPU; 2 n^3 FLOPs."""

    def __init__(self, device: torch.device, n: int):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        gen = torch.Generator().manual_seed(0)
        self.a, self.b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
        self.kind = f"{n}x{n} {str(dtype).replace('torch.', '')} matmul"
        self.flops = 2.0 * n ** 3

    def __call__(self) -> None:
        torch.matmul(self.a, self.b)

    def describe(self) -> dict:
        return {"kind": self.kind, "flops": self.flops}


@dataclass
class Context:
    """What a suite's ``run(ctx)`` gets: where to run, how big, how often."""

    device: torch.device
    sizes: str  # "full", "quick", "targets" (DESIGN.md's workloads) or "tiny" (test-only)
    reps: int  # timed repetitions per provider (>= 10)
    warmup: int  # untimed rounds over all providers before timing
    probe: BandwidthProbe
    skipped: list = field(default_factory=list)  # "provider: reason", printed once each
    matmul: MatmulProbe | None = None  # created by the first time_compute()

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def skip(self, provider: str, reason: str) -> None:
        note = f"{provider}: {reason}"
        if note not in self.skipped:
            self.skipped.append(note)
            print(f"skip {note}", flush=True)

    def time(self, fns: dict[str, Callable[[], object]]) -> tuple[dict, float]:
        """Time ``fns`` interleaved with the bandwidth probe: ({name: timing}, probe GB/s)."""
        timings = time_interleaved({**fns, "bandwidth-probe": self.probe}, self.device, self.reps,
                                   self.warmup)
        return timings, self.probe.bytes / timings.pop("bandwidth-probe")["p50_ms"] / 1e6

    def time_compute(self, fns: dict[str, Callable[[], object]]) -> tuple[dict, float]:
        """Time ``fns`` interleaved with the matmul probe: ({name: timing}, probe TFLOP/s)."""
        if self.matmul is None:
            n = 8192 if self.cuda else (256 if self.sizes == "tiny" else 1024)
            self.matmul = MatmulProbe(self.device, n)
        timings = time_interleaved({**fns, "matmul-probe": self.matmul}, self.device, self.reps,
                                   self.warmup)
        return timings, self.matmul.flops / timings.pop("matmul-probe")["p50_ms"] / 1e9


def measure_peaks(device: torch.device, sizes: str, reps: int) -> dict:
    """The device's copy bandwidth and matmul throughput, measured once at the start of a run
    with the same probes (and sizes) the suites time alongside their providers, each alone:
    {"peak_copy_gbps", "peak_matmul_tflops"}. Recorded in the environment of every results
    file; the per-block probes stay the yardstick of ``pct_of_probe``."""
    tiny = sizes == "tiny"
    copy = BandwidthProbe(device, 1 << (22 if tiny else 26))
    copy_ms = time_interleaved({"copy": copy}, device, reps, warmup=1)["copy"]["p50_ms"]
    gbps = copy.bytes / copy_ms / 1e6
    del copy
    n = 8192 if device.type == "cuda" else (256 if tiny else 1024)
    matmul = MatmulProbe(device, n)
    mm_ms = time_interleaved({"matmul": matmul}, device, reps, warmup=1)["matmul"]["p50_ms"]
    tflops = matmul.flops / mm_ms / 1e9
    del matmul
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"peak_copy_gbps": gbps, "peak_matmul_tflops": tflops}


def rel_err(t: torch.Tensor, ref: torch.Tensor) -> float:
    """||t - ref|| / ||ref|| in fp32 (``ref`` is fp32): the suites' accuracy figure."""
    return float((t.detach().float() - ref).norm() / ref.norm().clamp_min(1e-30))


# --- timing --------------------------------------------------------------------------------

def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, reps: int,
                     warmup: int) -> dict[str, dict[str, float]]:
    """Run every fn ``warmup`` times untimed, then ``reps`` timed times, interleaved.

    Returns {name: {"p50_ms", "p20_ms", "p80_ms"}}.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    cuda = device.type == "cuda"
    samples = {name: [] for name in names}
    host = {name: [] for name in names}
    sleep_ms = {}
    if cuda:
        per_ms = _sleep_cycles_per_ms(device)
        for name in names:  # three more calls each: how long the host takes to issue it
            for _ in range(3):
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                fns[name]()
                host[name].append((time.perf_counter() - start) * 1e3)
            # fixed from these calls, which start on an idle GPU: a call that waits for the GPU
            # inside (a sync) would, timed behind a sleep, wait for that sleep too, and a sleep
            # grown from such times grew 1.5x a repetition
            sleep_ms[name] = 0.05 + 1.5 * max(host[name])
        torch.cuda.synchronize(device)
    for rep in range(reps):
        for name in random.Random(rep).sample(names, len(names)):
            _settle_allocator()
            if cuda:
                torch.cuda.synchronize(device)
                # the GPU sleeps longer than the host took to issue this call: the start event
                # runs when the call's work is queued behind it
                torch.cuda._sleep(int(per_ms * sleep_ms[name]))
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                t0 = time.perf_counter()
                fns[name]()
                host[name].append((time.perf_counter() - t0) * 1e3)
                end.record()
                samples[name].append((start, end))
            else:
                start = time.perf_counter()
                fns[name]()
                samples[name].append((time.perf_counter() - start) * 1e3)
    if cuda:
        torch.cuda.synchronize(device)
        samples = {name: [s.elapsed_time(e) for s, e in pairs] for name, pairs in samples.items()}
    keys = ("p50_ms", "p20_ms", "p80_ms")
    out = {name: dict(zip(keys, map(float, np.percentile(ms, [50, 20, 80]))))
           for name, ms in samples.items()}
    if cuda:
        for name in names:
            out[name]["host_p50_ms"] = float(np.median(host[name][3:]))
    return out


_SLEEP_RATE = {}  # device -> torch.cuda._sleep cycles per ms


def _settle_allocator() -> None:
    """Make glibc do now the merging of freed small blocks that it defers to the next request
    of a large one (8 KiB: above its small bins, below its mmap threshold; with another C
    allocator, a no-op's cost)."""
    bytearray(8192)  # allocated and freed at once


def _sleep_cycles_per_ms(device: torch.device) -> float:
    """How many cycles of ``torch.cuda._sleep`` last a millisecond on ``device`` (measured)."""
    if device not in _SLEEP_RATE:
        torch.cuda._sleep(1000)  # the first launch loads the kernel
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        _SLEEP_RATE[device] = 10_000_000 / max(start.elapsed_time(end), 1e-3)
    return _SLEEP_RATE[device]


def cuda_graph(fn: Callable[[], object], warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Capture one call of ``fn`` in a CUDA graph, after ``warmup`` eager calls on a side stream
    (lazy allocations, autotuning and compilation must happen before capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


# --- environment ---------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def git_sha() -> str:
    """HEAD's sha; where there is no git checkout (the copy sent to a lent GPU), the one that
    ``FASTTRAIN_GIT_SHA`` names (bench/gpu_check.sh sets it from a carried .git_sha)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is not None and out.returncode == 0:
        return out.stdout.strip()
    return os.environ.get("FASTTRAIN_GIT_SHA", "").strip() or "unknown"


def git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD (the results then come from uncommitted code);
    without a checkout, what ``FASTTRAIN_GIT_DIRTY`` says (from the carried .git_sha), or None
    where nothing says."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        out = None
    if out is not None and out.returncode == 0:
        return bool(out.stdout.strip())
    flag = os.environ.get("FASTTRAIN_GIT_DIRTY")
    return None if flag is None else flag == "1"


PEERS = ("transformers", "peft", "accelerate", "flash_attn", "flash-attn", "bitsandbytes",
         "torchao", "apex", "liger_kernel", "numpy")


def environment(device: torch.device, argv: list[str]) -> dict:
    """The fields every row carries so that a results file stands on its own."""
    return {
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "load_avg_1min": os.getloadavg()[0],  # before the run: other work on the machine
        "git_sha": git_sha(),
        "git_dirty": git_dirty(),
        "packages": {name: v for name in PEERS if (v := _version(name)) is not None},
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, "-m", "bench", *argv]),
    }


# --- rows and output -----------------------------------------------------------------------

def finish_rows(rows: list[dict], baseline: str | tuple[str, ...], env: dict) -> list[dict]:
    """Add the rates (GB/s for rows with ``bytes``, TFLOP/s for rows with ``flops``) and
    ``pct_of_probe`` against the probe the row was timed with (``probe_gbps``: bandwidth;
    ``probe_tflops``: matmul), the speedup vs
    ``baseline`` (same workload, mode and dtype; a tuple names fallbacks in order, the first
    one present is used) and the environment to a suite's rows."""
    order = (baseline,) if isinstance(baseline, str) else tuple(baseline)
    base = {}
    for r in sorted((r for r in rows if r["provider"] in order),
                    key=lambda r: -order.index(r["provider"])):
        base[(r["workload"], r["mode"], r["dtype"])] = (r["provider"], r["p50_ms"])
    for r in rows:
        if "bytes" in r:
            r["gbps"] = r["bytes"] / r["p50_ms"] / 1e6
            if "probe_gbps" in r:
                r["pct_of_probe"] = 100 * r["gbps"] / r["probe_gbps"]
        if "flops" in r:
            r["tflops"] = r["flops"] / r["p50_ms"] / 1e9
            if "probe_tflops" in r:
                r["pct_of_probe"] = 100 * r["tflops"] / r["probe_tflops"]
        r["baseline"], base_ms = base.get((r["workload"], r["mode"], r["dtype"]), (None, None))
        r["speedup"] = base_ms / r["p50_ms"] if base_ms is not None else None
        r.update(env)
    return rows


def _rate(r: dict) -> str:
    """The row's rate for the table: TFLOP/s, GB/s or tokens/s, with % of its probe."""
    pct = f" {r['pct_of_probe']:5.0f}%" if "pct_of_probe" in r else ""
    if "tflops" in r:
        return f"{r['tflops']:8.3g} TFLOP/s{pct}"
    if "gbps" in r:
        return f"{r['gbps']:8.1f} GB/s ({r['bytes_per_param']:.0f} B/param){pct}"
    if "tokens_per_s" in r:
        return f"{r['tokens_per_s']:8.0f} tokens/s"
    return ""


def print_table(rows: list[dict]) -> None:
    """One block per (kernel, workload, mode, dtype), one line per provider."""
    blocks = {}
    for r in rows:
        blocks.setdefault((r["kernel"], r["workload"], r["mode"], r["dtype"]), []).append(r)
    for key, block in blocks.items():
        probe = ""
        if "probe_tflops" in block[0]:
            probe = f"  (matmul probe {block[0]['probe_tflops']:.1f} TFLOP/s)"
        elif "probe_gbps" in block[0]:
            probe = f"  (bandwidth probe {block[0]['probe_gbps']:.1f} GB/s)"
        print(f"\n{' / '.join(key)}{probe}")
        errs = any(r.get("rel_err") for r in block)
        print(f"{'provider':32} {'p50 ms':>9} {'p20-p80 ms':>17} {'speedup':>7}  "
              f"{'rate':32} {'max rel err  ' if errs else ''}timing")
        for r in block:
            speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
            spread = f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}"
            err = ""
            if errs:
                err = f"{max(r['rel_err'].values()):<11.2e}  " if r.get("rel_err") else f"{'-':13}"
            print(f"{r['provider']:32} {r['p50_ms']:9.2f} {spread:>17} {speedup:>7}  "
                  f"{_rate(r):32} {err}{r['timing']}")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def write_json(suite: str, rows: list[dict], ctx: Context, env: dict, out_dir: Path,
               complete: bool = True) -> Path:
    """bench/results/<suite>-<device-name-slug>-<YYYYMMDD-HHMMSS>.json (UTC); rewritten after
    each workload, ``complete`` once the suite has run to its end."""
    stamp = datetime.datetime.fromisoformat(env["timestamp"]).strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{suite}-{slug(env['device_name'])}-{stamp}.json"
    doc = {"suite": suite, "complete": complete, "env": env,
           "bandwidth_probe": ctx.probe.describe(),
           "matmul_probe": ctx.matmul.describe() if ctx.matmul else None,
           "skipped": ctx.skipped, "rows": rows}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)  # atomic: a run stopped mid-write keeps the previous complete file
    return path
