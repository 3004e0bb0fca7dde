"""Run fasttrain's benchmark suites; print tables and write JSON results (bench/README.md).

Also reads results: --compare OLD NEW, --plot FILE..., --report FILE..., --verdict FILE...,
--readme.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from bench import SUITES


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--suite", nargs="+", choices=SUITES, default=list(SUITES),
                        help="suites to run (default: all)")
    parser.add_argument("--quick", action="store_const", dest="sizes", const="quick",
                        help="a smaller set of workloads and providers "
                        "(a minute or two on a 2-core CPU)")
    parser.add_argument("--targets", action="store_const", dest="sizes", const="targets",
                        help="only the workloads of DESIGN.md's targets (the GPU session's "
                        "first run; bench/targets.py judges them)")
    # test-only: tiny workloads, every provider
    parser.add_argument("--sizes", choices=("full", "quick", "targets", "tiny"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        help="a run: folder for the JSON results (default: bench/results); "
                        "--plot: folder for the PNGs (default: next to each JSON); "
                        "--report: the markdown file (default: stdout)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when available")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"),
                        help="compare two results files (or two folders, matched by suite); "
                        "exit 1 when a regression is flagged")
    action.add_argument("--plot", nargs="+", metavar="FILE",
                        help="PNG plots of results files (or folders of them)")
    action.add_argument("--report", nargs="+", metavar="FILE",
                        help="a markdown report of results files (or folders of them)")
    action.add_argument("--verdict", nargs="+", metavar="FILE",
                        help="DESIGN.md's targets judged from results files (or folders)")
    action.add_argument("--readme", action="store_true",
                        help="regenerate README.md's results section from bench/results")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="--compare: flag p50 changes beyond this fraction (default 0.05)")
    parser.add_argument("--check", action="store_true",
                        help="--readme: only check that the section is up to date (exit 1 if not)")
    parser.set_defaults(sizes="full")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import torch

    from bench import common

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    env = common.environment(device, argv)
    reps = 100 if device.type == "cuda" else (20 if args.sizes in ("full", "targets") else 10)
    probe = common.BandwidthProbe(device, 1 << (22 if args.sizes == "tiny" else 26))
    print(f"{env['device_name']} ({env['threads']} threads), torch {env['torch']}, "
          f"git {env['git_sha'][:12]}; bandwidth probe: {probe.kind}, "
          f"{probe.bytes / 2**20:.0f} MiB moved per call", flush=True)
    if env["load_avg_1min"] > 0.5 * (os.cpu_count() or 1):
        print(f"warning: the machine is busy (load average {env['load_avg_1min']:.1f} on "
              f"{os.cpu_count()} cores); timings will be noisy", flush=True)
    env.update(common.measure_peaks(device, args.sizes, reps))
    print(f"measured at the start: copy bandwidth {env['peak_copy_gbps']:.1f} GB/s "
          f"({probe.kind}), matmul {env['peak_matmul_tflops']:.3g} TFLOP/s", flush=True)
    out = common.RESULTS if args.out is None else args.out
    for name in args.suite:
        suite = importlib.import_module(f"bench.{name}")
        ctx = common.Context(device, args.sizes, reps=reps, warmup=1, probe=probe)
        rows = []
        for batch in suite.run(ctx):  # one workload's rows: written at once (a run cut off
            rows += batch             # by a time limit keeps what it measured)
            common.finish_rows(rows, suite.BASELINE, env)
            common.print_table(batch)
            path = common.write_json(name, rows, ctx, env, out, complete=False)
        path = common.write_json(name, rows, ctx, env, out, complete=True)
        print(f"\nwrote {path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.compare:
        from bench import compare
        return compare.main(*args.compare, threshold=args.threshold)
    if args.plot:
        from bench import plot
        return plot.main(args.plot, args.out)
    if args.report:
        from bench import report
        return report.main(args.report, args.out)
    if args.verdict:
        from bench import targets
        return targets.main(args.verdict)
    if args.readme:
        from bench import readme
        return readme.main(check=args.check)
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
