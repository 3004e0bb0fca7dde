"""Run fasttrain's benchmark suites; print tables and write JSON results (bench/README.md)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import torch

from bench import SUITES, common


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--suite", nargs="+", choices=SUITES, default=list(SUITES),
                        help="suites to run (default: all)")
    parser.add_argument("--quick", action="store_const", dest="sizes", const="quick",
                        help="a smaller set of workloads and providers "
                        "(a minute or two on a 2-core CPU)")
    # test-only: tiny workloads, every provider
    parser.add_argument("--sizes", choices=("full", "quick", "tiny"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=common.RESULTS,
                        help="folder for the JSON results (default: bench/results)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.set_defaults(sizes="full")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    env = common.environment(device, argv)
    reps = 100 if device.type == "cuda" else (20 if args.sizes == "full" else 10)
    probe = common.BandwidthProbe(device, 1 << (22 if args.sizes == "tiny" else 26))
    print(f"{env['device_name']} ({env['threads']} threads), torch {env['torch']}, "
          f"git {env['git_sha'][:12]}; bandwidth probe: {probe.kind}, "
          f"{probe.bytes / 2**20:.0f} MiB moved per call", flush=True)
    if env["load_avg_1min"] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: the machine is busy (load average {env['load_avg_1min']:.1f} on "
              f"{os.cpu_count()} cores); timings will be noisy", flush=True)
    for name in args.suite:
        suite = importlib.import_module(f"bench.{name}")
        ctx = common.Context(device, args.sizes, reps=reps, warmup=1, probe=probe)
        rows = common.finish_rows(suite.run(ctx), suite.BASELINE, env)
        common.print_table(rows)
        path = common.write_json(name, rows, ctx, env, args.out)
        print(f"\nwrote {path}", flush=True)


if __name__ == "__main__":
    main()
