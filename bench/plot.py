"""PNG plots of results files: ``python -m bench --plot FILE.json... [--out DIR]``.

For each file (one suite on one device, so a plot never mixes devices) and each kernel in it,
one PNG per metric: ``time`` (p50 ms) and the rate (``gbps`` or ``tflops``). A figure has one
panel per (mode, dtype); the x axis holds the workloads (categorical), one bar per provider at
its median with a p20-p80 error bar (for rates, the rate at p80 and p20 time); a log y axis
where a panel's medians span more than 30x. The device name
is in the title. The PNGs are written next to the JSON (or into ``--out``) as
``<json stem>-<kernel>-<metric>.png``. matplotlib is imported only here, when plotting.
"""
from __future__ import annotations

from pathlib import Path

from bench.report import expand, load

METRICS = {  # name: (label, value at a time, rows it applies to)
    "time": ("time per call (ms, lower is better)", lambda r, ms: ms, lambda r: True),
    "gbps": ("GB/s (higher is better)", lambda r, ms: r["bytes"] / ms / 1e6,
             lambda r: "bytes" in r),
    "tflops": ("TFLOP/s (higher is better)", lambda r, ms: r["flops"] / ms / 1e9,
               lambda r: "flops" in r),
}


def pyplot():
    """matplotlib.pyplot with a file-only backend, or a clear error when it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib "
                         "(it is in fasttrain's bench extra: pip install -e '.[bench]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_metric(plt, doc: dict, kernel: str, metric: str, path: Path) -> bool:
    """One figure for (kernel, metric); False when no row has the metric."""
    label, value, applies = METRICS[metric]
    rows = [r for r in doc["rows"] if r["kernel"] == kernel and applies(r)]
    if not rows:
        return False
    panels = list(dict.fromkeys((r["mode"], r["dtype"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    n_workloads = max(len({r["workload"] for r in rows if (r["mode"], r["dtype"]) == p})
                      for p in panels)
    width_in = min(18.0, max(6.0, 2.0 + 0.3 * len(providers) * n_workloads))
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, 0.6 + 2.8 * len(panels)),
                             squeeze=False)
    width = 0.8 / len(providers)
    for ax, (mode, dtype) in zip(axes[:, 0], panels):
        panel = [r for r in rows if (r["mode"], r["dtype"]) == (mode, dtype)]
        workloads = list(dict.fromkeys(r["workload"] for r in panel))
        for i, provider in enumerate(providers):
            xs, mid, low, high = [], [], [], []
            for x, workload in enumerate(workloads):
                for r in panel:
                    if (r["provider"], r["workload"]) == (provider, workload):
                        # rates fall as time grows: the p80 time gives the low end
                        a, b = value(r, r["p20_ms"]), value(r, r["p80_ms"])
                        m = value(r, r["p50_ms"])
                        xs.append(x + (i - (len(providers) - 1) / 2) * width)
                        mid.append(m)
                        low.append(m - min(a, b))
                        high.append(max(a, b) - m)
            if xs:
                ax.bar(xs, mid, width, yerr=[low, high], capsize=2, label=provider,
                       color=f"C{i % 10}")
        values = [value(r, r["p50_ms"]) for r in panel]
        if min(values) > 0 and max(values) / min(values) > 30:  # workloads spanning decades
            ax.set_yscale("log")
        ax.set_xticks(range(len(workloads)), workloads, fontsize=8,
                      rotation=20 if len(workloads) > 3 else 0)
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"{mode}, {dtype}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    env = doc["env"]
    fig.suptitle(f"{kernel}: {metric} on {env['device_name']}\n"
                 f"median, error bars p20-p80; torch {env['torch']}, git {env['git_sha'][:8]}\n"
                 f"{env['timestamp']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_file(doc: dict, out_dir: Path | None = None) -> list[Path]:
    """Write the PNGs of one results file; returns their paths."""
    plt = pyplot()
    out_dir = doc["path"].parent if out_dir is None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kernel in dict.fromkeys(r["kernel"] for r in doc["rows"]):
        for metric in METRICS:
            path = out_dir / f"{doc['path'].stem}-{kernel}-{metric}.png"
            if plot_metric(plt, doc, kernel, metric, path):
                written.append(path)
    return written


def main(files: list[str], out_dir: Path | None) -> int:
    pyplot()  # fail early, with the message, when matplotlib is missing
    paths = expand(files)
    if not paths:
        print("--plot: no results files given")
        return 2
    for p in paths:
        for png in plot_file(load(p), out_dir):
            print(f"wrote {png}")
    return 0
