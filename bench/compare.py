"""Compare two runs: ``python -m bench --compare OLD NEW [--threshold 0.05]``.

OLD and NEW are two results files, or two folders (files are then matched by suite and device:
the newest file per (suite, device_name) on each side; a suite run on different devices on the
two sides is compared newest against newest, with a warning). Rows are matched on (kernel,
provider, mode, workload, dtype). For each the p50 ratio new / old is printed, and a row is
flagged:

- ``REGRESSION`` when new p50 > old p50 x (1 + threshold) and the change is not noise;
- ``faster`` when new p50 < old p50 x (1 - threshold) and the change is not noise;
- ``noise`` when the ratio is beyond the threshold but each run's median lies inside the other
  run's p20-p80 spread (the two runs cannot tell the medians apart).

The exit status is 1 when a regression is flagged (including a row of the old run that the new
one lacks), else 0 (for CI).
"""
from __future__ import annotations

from bench.report import KEY, expand, fmt, load, newest

ENV_CHECKS = ("device_name", "torch", "triton", "cuda")  # differences worth a warning


def classify(old: dict, new: dict, threshold: float) -> str:
    """'REGRESSION', 'faster', 'noise' or '' for one matched row."""
    ratio = new["p50_ms"] / old["p50_ms"]
    if abs(ratio - 1) <= threshold:
        return ""
    inside = (old["p20_ms"] <= new["p50_ms"] <= old["p80_ms"]
              and new["p20_ms"] <= old["p50_ms"] <= new["p80_ms"])
    if inside:
        return "noise"
    return "REGRESSION" if ratio > 1 else "faster"


def pairs(old_paths: list[str], new_paths: list[str]) -> list[tuple[dict, dict]]:
    """(old, new) documents to compare: one pair for two files; matched by suite for folders."""
    old_docs = [load(p) for p in expand(old_paths)]
    new_docs = [load(p) for p in expand(new_paths)]
    if len(old_docs) == 1 and len(new_docs) == 1:
        return [(old_docs[0], new_docs[0])]
    old_best, new_best = newest(old_docs), newest(new_docs)
    out = [(old_best[key], new_best[key]) for key in sorted(old_best.keys() & new_best.keys())]
    matched = {key[0] for key in old_best.keys() & new_best.keys()}
    for suite in sorted({s for s, _ in old_best} & {s for s, _ in new_best} - matched):
        def last(best):
            return max((d for (s, _), d in best.items() if s == suite),
                       key=lambda d: d["env"]["timestamp"])
        out.append((last(old_best), last(new_best)))
    for side, best, other in (("old", old_best, new_best), ("new", new_best, old_best)):
        for suite in sorted({s for s, _ in best} - {s for s, _ in other}):
            print(f"note: suite {suite} is only on the {side} side; not compared")
    return out


def compare(old: dict, new: dict, threshold: float) -> list[tuple]:
    """Print the comparison of two results files; return the flagged regressions."""
    print(f"\n{old['suite']}: {old['path']} -> {new['path']}")
    for field in ENV_CHECKS:
        a, b = old["env"].get(field), new["env"].get(field)
        if a != b:
            print(f"warning: {field} differs: {a} (old) vs {b} (new); the change may be the "
                  f"{'device' if field == 'device_name' else 'version'}, not the code")
    old_rows = {tuple(r[k] for k in KEY): r for r in old["rows"]}
    new_rows = {tuple(r[k] for k in KEY): r for r in new["rows"]}
    header = (f"{'provider':30} {'mode':10} {'workload':28} {'dtype':9} {'old p50':>9} "
              f"{'new p50':>9} {'ratio':>6}  flag")
    print(header)
    regressions = []
    for key, n in new_rows.items():
        _, provider, mode, workload, dtype = key
        o = old_rows.get(key)
        if o is None:
            print(f"{provider:30} {mode:10} {workload:28} {dtype:9} {'-':>9} "
                  f"{fmt(n['p50_ms']):>9} {'-':>6}  new row")
            continue
        flag = classify(o, n, threshold)
        ratio = n["p50_ms"] / o["p50_ms"]
        print(f"{provider:30} {mode:10} {workload:28} {dtype:9} {fmt(o['p50_ms']):>9} "
              f"{fmt(n['p50_ms']):>9} {ratio:6.3f}  {flag}")
        if flag == "REGRESSION":
            regressions.append((old["suite"], *key[1:], ratio))
    for key in sorted(old_rows.keys() - new_rows.keys()):
        # a row that disappeared (a provider that now fails and is skipped) counts as a
        # regression: it must not hide one
        print(f"{key[1]:30} {key[2]:10} {key[3]:28} {key[4]:9} "
              f"{fmt(old_rows[key]['p50_ms']):>9} {'-':>9} {'-':>6}  GONE")
        regressions.append((old["suite"], *key[1:], float("inf")))
    return regressions


def main(old: str, new: str, threshold: float) -> int:
    found = pairs([old], [new])
    if not found:
        print("--compare: no suite in common between the two sides")
        return 2
    print(f"p50 ratio = new / old (> 1: slower); threshold {threshold:.0%}; a change with each "
          f"median inside the other run's p20-p80 spread is noise")
    regressions = []
    for o, n in found:
        regressions += compare(o, n, threshold)
    if regressions:
        print(f"\n{len(regressions)} regression(s) beyond {threshold:.0%}:")
        for suite, provider, mode, workload, dtype, ratio in regressions:
            print(f"  {suite} {provider} {mode} {workload} {dtype}: {ratio:.2f}x the old p50")
        return 1
    print(f"\nno regression beyond {threshold:.0%}")
    return 0
