"""One launch of each kernel family at the size of its DESIGN.md target, for Nsight Compute.

bench/gpu_check.sh's ``profile`` step runs it under ``ncu --profile-from-start off``: each
workload runs once outside the profiled range (Triton's compiles and autotuning, the tile
maps, the optimizer state) and once inside it (``cudaProfilerStart`` .. ``cudaProfilerStop``),
so ncu profiles that second launch of each kernel alone.

    python -m bench.profile [--only varlen lora ...] [--tiny]
    python -m bench.profile --summary ncu_details.csv   # one line per kernel from ncu's CSV

``--tiny`` runs the same launches at small sizes: the CPU dry run of the tests (Triton under
its interpreter, no profiler).
"""
import argparse
import csv
import sys
from typing import Callable

import torch

# name -> (what it profiles, builder(device, tiny) -> one step)
Workload = Callable[[torch.device, bool], Callable[[], None]]


def _varlen(device: torch.device, tiny: bool) -> Callable[[], None]:
    from bench import varlen_attn as va
    from fasttrain.ops import varlen_attention

    lens = va.WORKLOADS["mix-256" if tiny else "mix-16K"]()
    shape = va.Shape(4, 2, 32, True, torch.bfloat16) if tiny else \
        va.Shape(32, 8, 128, True, torch.bfloat16)
    x = va.make_inputs(lens, shape, device)
    q, k, v = va._leaves(x.q, x.k, x.v)

    def step():
        for t in (q, k, v):
            t.grad = None  # a first backward assigns the grads: no accumulation kernels
        out = varlen_attention(q, k, v, x.cu_seqlens, x.cu_seqlens, causal=True,
                               backend="triton")
        out.backward(x.dout)
    return step


def _lora(device: torch.device, tiny: bool) -> Callable[[], None]:
    from bench import lora as bl
    from fasttrain.ops import lora_linear

    w = dict(M=70, K=96, N=80, r=8, p=0.0) if tiny else dict(M=8192, K=4096, N=4096, r=16, p=0.0)
    t = bl.make_tensors(w, torch.bfloat16, device)

    def step():
        for name in ("x", "lora_A", "lora_B"):
            t[name].grad = None
        y = lora_linear(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"],
                        bl.ALPHA_OVER_R, backend="triton")
        y.backward(t["dy"])
    return step


def _adamw(workload: str, backend: str, dtype: torch.dtype, **options) -> Workload:
    def make(device: torch.device, tiny: bool) -> Callable[[], None]:
        from bench import adamw as ba
        from fasttrain.optim import AdamW

        sizes = ba.WORKLOADS["50x4K" if tiny else workload]()
        params = ba.make_params(sizes, dtype, device)
        opt = AdamW(params, lr=1e-3, weight_decay=0.1, backend=backend, **options)
        return opt.step
    return make


WORKLOADS: dict[str, tuple[str, Workload]] = {
    "varlen": ("attention fwd + bwd, mix-16K, 32/8 heads, d=128, causal, bf16", _varlen),
    "lora": ("LoRA fwd + bwd, M=8192 4096x4096 r=16, bf16", _lora),
    "adamw": ("AdamW + clip, fp32, 50M/200 (the bandwidth-bound step)",
              _adamw("50M/200", "triton", torch.float32, max_grad_norm=1.0)),
    "adamw-bf16-sr": ("AdamW, bf16 params and states, stochastic rounding, 50M/200",
                      _adamw("50M/200", "triton", torch.bfloat16, stochastic_rounding=True,
                             state_dtype=torch.bfloat16)),
    "adamw-5000x4K": ("AdamW, fp32, 5000 x 4K (launch bound)",
                      _adamw("5000x4K", "triton", torch.float32)),
    "adamw-cuda": ("AdamW, the C++/CUDA kernel, fp32, 50M/200",
                   _adamw("50M/200", "cuda", torch.float32)),
}


def profile(names: list[str], tiny: bool) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    for name in names:
        what, make = WORKLOADS[name]
        try:
            step = make(device, tiny)
            step()  # compiles, autotuning, caches: outside the profiled range
        except RuntimeError as e:  # e.g. the cuda backend where the extension did not build
            print(f"skip {name}: {e}", flush=True)
            continue
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()  # cudaProfilerStart
        step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        print(f"profiled {name}: {what}{' (at tiny sizes)' if tiny else ''}", flush=True)


# ncu's details page, one row per metric: the columns and metrics the summary shows
SUMMARY = [("Duration", "time"), ("Compute (SM) Throughput", "SM %"),
           ("Memory Throughput", "mem %"), ("DRAM Throughput", "DRAM %"),
           ("Registers Per Thread", "regs"), ("Achieved Occupancy", "occ %"),
           ("Warp Cycles Per Issued Instruction", "cyc/issue")]


def summary(path: str) -> str:
    """A markdown table, one row per profiled kernel, from ``ncu --import R --page details
    --csv`` output (rows of ID, Kernel Name, Section Name, Metric Name, Metric Unit, Metric
    Value); the lines before its header (ncu's own messages) are skipped."""
    with open(path, newline="") as f:
        lines = f.read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        return f"no ncu details header in {path}"
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(lines[start:]):
        entry = kernels.setdefault(row["ID"], {"name": row["Kernel Name"]})
        entry[row["Metric Name"]] = f"{row['Metric Value']} {row.get('Metric Unit', '')}".strip()
    out = ["| id | kernel | " + " | ".join(label for _, label in SUMMARY) + " |",
           "|---|---|" + "---|" * len(SUMMARY)]
    for kid, entry in kernels.items():
        name = entry["name"].split("(")[0][:48]
        cells = [entry.get(metric, "-").replace(" %", "") for metric, _ in SUMMARY]
        out.append(f"| {kid} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--tiny", action="store_true", help="small sizes (the CPU dry run)")
    parser.add_argument("--summary", metavar="CSV", help="summarize ncu's details CSV instead")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    profile(args.only, args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
