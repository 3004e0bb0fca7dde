"""Markdown report of results files: ``python -m bench --report FILE.json... [--out report.md]``.

Also the helpers the other result readers share (compare, plot, readme): loading result files,
finding them in folders, grouping rows. Nothing here imports torch.
"""
from __future__ import annotations

import json
from pathlib import Path

KEY = ("kernel", "provider", "mode", "workload", "dtype")  # what identifies a row across runs
BLOCK = ("workload", "mode", "dtype")  # one table per block; providers are its lines


# --- loading ---------------------------------------------------------------------------------

def load(path: str | Path) -> dict:
    """A results file as written by a run, plus ``path``."""
    path = Path(path)
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or "rows" not in doc or "env" not in doc:
        raise ValueError(f"{path}: not a bench results file (no 'rows' and 'env')")
    doc["path"] = path
    doc.setdefault("suite", doc["rows"][0]["kernel"] if doc["rows"] else path.stem.split("-")[0])
    return doc


def expand(paths: list[str | Path]) -> list[Path]:
    """Files as given; folders become the ``*.json`` files they hold (sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(p.glob("*.json")))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def newest(docs: list[dict]) -> dict[tuple[str, str], dict]:
    """The newest file (by run timestamp, then file name) per (suite, device_name)."""
    best = {}
    for doc in sorted(docs, key=lambda d: (d["env"]["timestamp"], d["path"].name)):
        best[(doc["suite"], doc["env"]["device_name"])] = doc
    return best


def blocks(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows grouped by (workload, mode, dtype), in the order they were run."""
    out = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in BLOCK), []).append(r)
    return out


def rate(row: dict) -> tuple[float | None, str]:
    """The row's headline rate: TFLOP/s for compute-bound rows (those with ``flops``; their
    % of probe is against the matmul probe), tokens/s for end-to-end rows, else GB/s."""
    if "tflops" in row:
        return row["tflops"], "TFLOP/s"
    if "tokens_per_s" in row:
        return row["tokens_per_s"], "tokens/s"
    return row.get("gbps"), "GB/s"


def fmt(x: float | None, digits: int = 3) -> str:
    """A number with ``digits`` significant digits, no exponent for ordinary sizes."""
    if x is None:
        return "-"
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        text = f"{x:.{digits}g}"
        if "e" in text:  # e.g. 1.23e+03 for 1234 with 3 digits
            text = f"{x:.0f}"
        return text
    return f"{x:.2e}"


# --- the report ------------------------------------------------------------------------------

def peaks(env: dict) -> str:
    """The start-of-run peak measurements (absent from files written before they existed)."""
    parts = []
    if env.get("peak_copy_gbps") is not None:
        parts.append(f"copy {fmt(env['peak_copy_gbps'])} GB/s")
    if env.get("peak_matmul_tflops") is not None:
        parts.append(f"matmul {fmt(env['peak_matmul_tflops'])} TFLOP/s")
    return ", ".join(parts) or "not recorded"


def environment_lines(doc: dict) -> list[str]:
    env = doc["env"]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "cuda", "python")
                         if env.get(k))
    lines = [
        f"- file: `{doc['path'].name}`"
        + (" (partial: the run stopped before the suite's end)"
           if doc.get("complete") is False else ""),
        f"- device: {env['device_name']} ({env['device']}, {env.get('threads', '?')} threads)",
        f"- versions: {versions}",
        f"- git sha: `{env['git_sha']}`",
        f"- command: `{env['command']}`",
        f"- timestamp: {env['timestamp']}",
        f"- peak measured at the start of the run: {peaks(env)}",
    ]
    if env.get("load_avg_1min") is not None:
        lines.append(f"- load average at the start: {env['load_avg_1min']:.2f}")
    for name in ("bandwidth_probe", "matmul_probe"):
        if doc.get(name):
            lines.append(f"- {name.replace('_', ' ')}: {doc[name]['kind']}")
    for note in doc.get("skipped", []):
        lines.append(f"- skipped: {note}")
    return lines


def block_table(rows: list[dict]) -> list[str]:
    _, unit = rate(rows[0])
    if "probe_tflops" in rows[0]:
        probe = f"matmul probe {fmt(rows[0]['probe_tflops'])} TFLOP/s; "
    elif "probe_gbps" in rows[0]:
        probe = f"bandwidth probe {fmt(rows[0]['probe_gbps'])} GB/s; "
    else:
        probe = ""
    e2e = any("loss_max_abs_diff" in r for r in rows)  # end to end: memory and loss columns
    errs = any(r.get("rel_err") for r in rows)  # attention, LoRA: accuracy against fp32
    extra = (" peak GiB | loss max abs diff |" if e2e else "") + (" max rel err |" if errs else "")
    lines = [f"{probe}speedup vs `{rows[0].get('baseline')}`", "",
             f"| provider | p50 ms | p20-p80 ms | {unit} | % of probe | speedup |{extra} timing |",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * (2 * e2e + errs) + "---|"]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r.get("speedup") is not None else "-"
        pct = f"{r['pct_of_probe']:.0f}%" if r.get("pct_of_probe") is not None else "-"
        cells = ""
        if e2e:
            peak = r["peak_bytes"] / 2**30 if r.get("peak_bytes") is not None else None
            diff = r.get("loss_max_abs_diff")
            cells = f" {fmt(peak)} | {'-' if diff is None else f'{diff:.2e}'} |"
        if errs:
            cells += f" {max(r['rel_err'].values()):.2e} |" if r.get("rel_err") else " - |"
        lines.append(f"| {r['provider']} | {fmt(r['p50_ms'])} | {fmt(r['p20_ms'])}-"
                     f"{fmt(r['p80_ms'])} | {fmt(rate(r)[0])} | {pct} | {speedup} |{cells} "
                     f"{r.get('timing', '')} |")
    return lines


def report(docs: list[dict]) -> str:
    """The markdown: a summary of the files (environment on top), then per file (suite and
    device) one table per (workload, mode, dtype)."""
    out = ["# fasttrain benchmark report", "",
           "| suite | device | torch | git sha | timestamp | command | peak measured |",
           "|---|---|---|---|---|---|---|"]
    for doc in docs:
        env = doc["env"]
        out.append(f"| {doc['suite']} | {env['device_name']} | {env['torch']} | "
                   f"`{env['git_sha'][:12]}` | {env['timestamp']} | `{env['command']}` | "
                   f"{peaks(env)} |")
    for doc in docs:
        out += ["", f"## {doc['suite']} on {doc['env']['device_name']}", ""]
        out += environment_lines(doc)
        for (workload, mode, dtype), rows in blocks(doc["rows"]).items():
            out += ["", f"### {workload} / {mode} / {dtype}", ""]
            out += block_table(rows)
    return "\n".join(out) + "\n"


def main(files: list[str], out: Path | None) -> int:
    docs = [load(p) for p in expand(files)]
    if not docs:
        print("--report: no results files given", flush=True)
        return 2
    text = report(docs)
    if out is None:
        print(text, end="")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 0
