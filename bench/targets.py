"""DESIGN.md's performance targets judged from harness results: ``python -m bench --verdict
FILE...`` (files or folders; README.md's results section shows the same table for the committed
files).

Each target reads rows of one suite on one kind of device (cuda or cpu), computes one figure
from them (a speedup, a rate, a ratio) and compares it with its bar. The figure comes from the
newest file that has every row it needs, so a later run of other workloads does not hide an
earlier measurement. A target is:

- ``met`` when the figure clears the bar and, where the rows record ``rel_err`` (the suites of
  compute-bound kernels do), fasttrain's error on each output is at most twice that of the
  provider named for accuracy, plus 1e-6 (FlashAttention's test criterion): a fast but wrong
  kernel meets nothing;
- ``missed`` with the figure when it does not (or ``missed (accuracy)``);
- ``not measured`` when no file has the rows, with the reason a run gave for skipping the
  provider where it gave one, or when the providers compared were timed differently (a CUDA
  graph against eager calls: ``not comparable``).

A figure taken from an older file than the newest run of the same workload says so, with the
newer file and why it lacks the rows (a failed provider there must not hide behind an old
"met"). The end-to-end targets also need the loss curves of the two stacks to agree (within 1%
of the baseline's first loss): a fast stack that trains differently meets nothing.

Targets that no harness row measures (the low-precision loss curve, which is a test) are left
out here and named in ``NOT_HERE``. Nothing here imports torch.
"""
from __future__ import annotations

import operator
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.report import expand, fmt, load

ACCURACY_FACTOR, ACCURACY_FLOOR = 2.0, 1e-6
_OPS = {">=": operator.ge, "<=": operator.le, "<": operator.lt}

NOT_HERE = ("AdamW, low precision: the same loss curve on a small LM (a test: "
            "tests/test_adamw.py::test_bf16_training_tracks_fp32_master)")


@dataclass(frozen=True)
class Rows:
    """Where a target's rows are: suite, device type, workload, mode, dtype."""
    suite: str
    device: str
    workload: str
    mode: str
    dtype: str

    def where(self) -> str:
        return f"{self.suite} {self.workload} {self.mode} {self.dtype}"


@dataclass(frozen=True)
class Target:
    name: str  # DESIGN.md's wording, shortened
    rows: Rows
    figure: Callable[[dict], float]  # {provider: row} -> the figure (KeyError: rows missing)
    needs: tuple[str, ...]  # providers the figure reads
    op: str  # ">=", "<=" or "<"
    bar: float
    unit: str  # "x", "%", "TFLOP/s"
    fasttrain: str | None = None  # the provider whose accuracy is judged ...
    accuracy: tuple[str, ...] = ()  # ... against the first of these present with rel_err
    other: Rows | None = None  # a second place a provider is read from (``needs`` of other)
    other_needs: tuple[str, ...] = ()
    compared: tuple[str, ...] = ()  # providers whose timing must match (default: needs)
    loss_gate: bool = False  # e2e: fasttrain's loss curve must agree with the baseline's


def _p50(by: dict, provider: str) -> float:
    return by[provider]["p50_ms"]


def speedup(fast: str, over: str) -> Callable[[dict], float]:
    return lambda by: _p50(by, over) / _p50(by, fast)


def speedup_over_fastest(fast: str, *over: str) -> Callable[[dict], float]:
    """fast's speedup over the fastest of ``over`` that was measured (KeyError: none was)."""
    def get(by):
        times = [_p50(by, o) for o in over if o in by]
        if not times:
            raise KeyError(over)
        return min(times) / _p50(by, fast)
    return get


def field(provider: str, name: str) -> Callable[[dict], float]:
    def get(by):
        value = by[provider].get(name)
        if value is None:
            raise KeyError(name)
        return value
    return get


def ratio(num: str, den: str, name: str) -> Callable[[dict], float]:
    return lambda by: field(num, name)(by) / field(den, name)(by)


ADAMW_1B = Rows("adamw", "cuda", "1B/300", "step", "float32")
VARLEN_FWD = Rows("varlen_attn", "cuda", "mix-16K d=128 causal", "fwd", "bfloat16")
VARLEN_BWD = Rows("varlen_attn", "cuda", "mix-16K d=128 causal", "bwd", "bfloat16")
LORA = Rows("lora", "cuda", "M=8192 K=4096 N=4096 r=16 p=0.0", "fwd+bwd", "bfloat16")
E2E = Rows("e2e", "cuda", "llama-1B", "lora", "bfloat16")
CPU_ADAMW = Rows("adamw", "cpu", "50M/200", "step", "float32")
ATTN_ACC = dict(fasttrain="fasttrain", accuracy=("torch-varlen", "sdpa-padded"))
# not peft: by default it keeps the adapters in fp32 (autocast_adapter_dtype), so its dA and dB
# are nearly exact and would hold a bf16 kernel to an fp32 bound
LORA_ACC = dict(fasttrain="fasttrain-triton", accuracy=("torch-3matmul", "torch-addmm"))
FT = "fasttrain-triton"

TARGETS = (
    Target("AdamW step fp32 vs torch fused", ADAMW_1B, speedup(FT, "torch-fused"),
           (FT, "torch-fused"), ">=", 1.0, "x"),
    Target("AdamW step fp32, % of measured copy bandwidth (28 B/param)", ADAMW_1B,
           field(FT, "pct_of_probe"), (FT,), ">=", 90.0, "%"),
    Target("AdamW + grad clip vs clip_grad_norm_ + torch fused",
           Rows("adamw", "cuda", "1B/300", "clip+step", "float32"),
           speedup(FT, "torch-fused"), (FT, "torch-fused"), ">=", 1.4, "x"),
    Target("AdamW, many small tensors vs torch fused",
           Rows("adamw", "cuda", "5000x4K", "step", "float32"),
           speedup(FT, "torch-fused"), (FT, "torch-fused"), ">=", 2.0, "x"),
    Target("AdamW bf16 params + bf16 states (SR) vs torch fused fp32",
           Rows("adamw", "cuda", "1B/300", "step", "bfloat16"),
           lambda by: by["fp32:torch-fused"]["p50_ms"] / _p50(by, f"{FT}[sr,bf16-state]"),
           (f"{FT}[sr,bf16-state]",), ">=", 1.8, "x", other=ADAMW_1B,
           other_needs=("torch-fused",)),
    Target("AdamW on CPU vs torch fused CPU", CPU_ADAMW, speedup("fasttrain-cpu", "torch-fused"),
           ("fasttrain-cpu", "torch-fused"), ">=", 1.1, "x"),
    Target("AdamW on CPU, % of the a += s*b bandwidth probe", CPU_ADAMW,
           field("fasttrain-cpu", "pct_of_probe"), ("fasttrain-cpu",), ">=", 90.0, "%"),
    Target("AdamW on CPU, time per tensor (5000 tensors of 16 elements)",
           Rows("adamw", "cpu", "5000x16", "step", "float32"),
           lambda by: 1e3 * _p50(by, "fasttrain-cpu") / 5000, ("fasttrain-cpu",), "<", 1.0,
           "us"),
    Target("varlen attention fwd vs torch varlen (FA2 kernel)", VARLEN_FWD,
           speedup("fasttrain", "torch-varlen"), ("fasttrain", "torch-varlen"), ">=", 1.0, "x",
           **ATTN_ACC),
    Target("varlen attention bwd vs torch varlen (FA2 kernel)", VARLEN_BWD,
           speedup("fasttrain", "torch-varlen"), ("fasttrain", "torch-varlen"), ">=", 1.0, "x",
           **ATTN_ACC),
    Target("varlen attention fwd rate", VARLEN_FWD, field("fasttrain", "tflops"),
           ("fasttrain",), ">=", 450.0, "TFLOP/s", **ATTN_ACC),
    Target("varlen attention fwd vs FlexAttention (document mask)", VARLEN_FWD,
           speedup("fasttrain", "flex-document-mask"), ("fasttrain", "flex-document-mask"),
           ">=", 1.3, "x", **ATTN_ACC),
    Target("varlen attention bwd vs FlexAttention (document mask)", VARLEN_BWD,
           speedup("fasttrain", "flex-document-mask"), ("fasttrain", "flex-document-mask"),
           ">=", 1.3, "x", **ATTN_ACC),
    Target("varlen attention, no cliff at many short sequences: fwd+bwd vs torch varlen",
           Rows("varlen_attn", "cuda", "short-16K d=128 causal", "fwd+bwd", "bfloat16"),
           speedup("fasttrain", "torch-varlen"), ("fasttrain", "torch-varlen"), ">=", 1.0, "x",
           **ATTN_ACC),
    Target("LoRA linear fwd+bwd, time over the frozen base linear's", LORA,
           lambda by: _p50(by, FT) / _p50(by, "base-linear"), (FT, "base-linear"), "<=", 1.15,
           "x", **LORA_ACC),
    # the faster of peft's default (fp32 adapters: an fp32 LoRA term) and peft with adapters
    # in bf16, the precision of fasttrain's
    Target("LoRA linear fwd+bwd vs peft (the faster of fp32 and bf16 adapters)", LORA,
           speedup_over_fastest(FT, "peft", "peft[no-upcast]"), (FT,), ">=", 1.3, "x",
           compared=(FT, "peft", "peft[no-upcast]"), **LORA_ACC),
    Target("end to end LoRA fine-tune, tokens/s vs HF + peft + torch AdamW + SDPA padded", E2E,
           ratio("fasttrain", "baseline", "tokens_per_s"), ("fasttrain", "baseline"), ">=", 1.5,
           "x", loss_gate=True),
    Target("end to end LoRA fine-tune, peak memory over the baseline's", E2E,
           ratio("fasttrain", "baseline", "peak_bytes"), ("fasttrain", "baseline"), "<", 1.0,
           "x", loss_gate=True),
)
LOSS_TOLERANCE = 0.01  # of the baseline's first loss


@dataclass
class Verdict:
    target: Target
    verdict: str  # "met", "missed", "missed (accuracy)", "not measured"
    figure: float | None = None
    note: str = ""
    doc: dict | None = None


def _select(doc: dict, rows: Rows) -> dict:
    return {r["provider"]: r for r in doc["rows"]
            if (r["workload"], r["mode"], r["dtype"]) == (rows.workload, rows.mode, rows.dtype)}


def _candidates(docs: list[dict], rows: Rows) -> list[dict]:
    """The files of the target's suite and device type, newest first."""
    mine = [d for d in docs if d["suite"] == rows.suite and d["env"]["device"] == rows.device]
    return sorted(mine, key=lambda d: (d["env"]["timestamp"], d["path"].name), reverse=True)


def _reference_error(target: Target, by: dict) -> dict | None:
    return next((by[p]["rel_err"] for p in target.accuracy if (by.get(p) or {}).get("rel_err")),
                None)


def _accuracy(target: Target, by: dict) -> str:
    """'' when fasttrain's rel_err is within the bound of the accuracy provider's (or nothing
    is recorded to judge), else what is off."""
    mine = (by.get(target.fasttrain) or {}).get("rel_err")
    ref = _reference_error(target, by)
    if not mine or not ref:
        return ""
    off = [f"{k} {fmt(mine[k])} vs {fmt(ref[k])}" for k in mine
           if k in ref and not mine[k] <= ACCURACY_FACTOR * ref[k] + ACCURACY_FLOOR]
    return ", ".join(off)


def _timings(target: Target, by: dict) -> dict:
    """{provider: how it was timed} of the providers the figure compares."""
    names = list(target.compared or target.needs) + [f"fp32:{p}" for p in target.other_needs]
    return {p: by[p].get("timing") for p in names if p in by}


def _loss_disagreement(by: dict) -> str:
    """'' when the fasttrain stack's loss curve agrees with the baseline's, else by how much."""
    diff = by["fasttrain"].get("loss_max_abs_diff")
    losses = by["baseline"].get("losses") or []
    if diff is None or not losses:
        return "loss curves not recorded"
    bound = LOSS_TOLERANCE * abs(losses[0])
    return "" if diff <= bound else f"loss curves differ by {fmt(diff)} (bound {fmt(bound)})"


def judge(target: Target, docs: list[dict]) -> Verdict:
    newer = []  # files that ran this workload but lack what the figure needs: (name, why)
    for doc in _candidates(docs, target.rows):
        by = _select(doc, target.rows)
        if target.other is not None:
            by.update({f"fp32:{p}": r for p, r in _select(doc, target.other).items()})
        try:
            if target.other is not None and not all(f"fp32:{p}" in by
                                                    for p in target.other_needs):
                raise KeyError("other")
            if not all(p in by for p in target.needs):
                raise KeyError("needs")
            value = target.figure(by)
        except (KeyError, ZeroDivisionError, TypeError):
            if by:
                newer.append((doc, _skip_note(target, doc) or "rows missing"))
            continue
        timings = _timings(target, by)
        if len(set(timings.values())) > 1:
            how = ", ".join(f"{p}: {t}" for p, t in timings.items())
            return Verdict(target, "not measured", value, f"not comparable, timed as {how}", doc)
        off = _accuracy(target, by)
        notes = [f"rel_err over {ACCURACY_FACTOR:g}x the reference's: {off}"] if off else []
        if target.loss_gate:
            loss_off = _loss_disagreement(by)
            if loss_off:
                notes.append(loss_off)
                off = off or loss_off
        if target.fasttrain and not (by.get(target.fasttrain) or {}).get("rel_err"):
            notes.append("accuracy not recorded")
        elif target.fasttrain and _reference_error(target, by) is None:
            notes.append(f"accuracy not judged: no error of {' or '.join(target.accuracy)}")
        if newer:
            later, why = newer[0]
            notes.append(f"from an older run (git {doc['env']['git_sha'][:12]}); the newer "
                         f"{later['path'].name} (git {later['env']['git_sha'][:12]}) lacks "
                         f"it: {why}")
        passed = _OPS[target.op](value, target.bar)
        verdict = "missed" if not passed else "missed (accuracy)" if off else "met"
        return Verdict(target, verdict, value, "; ".join(notes), doc)
    return Verdict(target, "not measured", note=_why_not(target, docs))


def _skip_note(target: Target, doc: dict) -> str | None:
    """The reason ``doc`` gives for skipping a provider the target reads, if it gives one."""
    wanted = set(target.needs) | set(target.compared) | set(target.other_needs)
    for note in doc.get("skipped", []):
        provider = note.split(":", 1)[0]
        if wanted & set(provider.split(", ")):
            return note
    return None


def _why_not(target: Target, docs: list[dict]) -> str:
    files = _candidates(docs, target.rows)
    if not files:
        return f"no {target.rows.device} results of {target.rows.suite}"
    for doc in files:
        note = _skip_note(target, doc)
        if note:
            return f"skipped in {doc['path'].name}: {note}"
    return f"no {target.rows.device} file has these rows"


def verdicts(docs: list[dict]) -> list[Verdict]:
    return [judge(t, docs) for t in TARGETS]


def _with_unit(value: float, unit: str, digits: int = 3) -> str:
    """A bar: 1.0x, 1.15x, 90%, 450 TFLOP/s (``digits`` significant, but for x)."""
    if unit == "x":
        text = f"{value:.2f}".rstrip("0")
        return (text + "0" if text.endswith(".") else text) + "x"
    return f"{fmt(value, digits)}{'' if unit == '%' else ' '}{unit}"


def _figure(value: float, unit: str, bar: float) -> str:
    """A measured figure, with the digits that tell it from its bar (a 0.999x that missed
    1.0x, printed 1.00x, would read as met)."""
    for digits in range(3, 8):
        if unit == "x":
            text, bar_text = f"{value:.{digits - 1}f}x", f"{bar:.{digits - 1}f}x"
        else:
            text, bar_text = _with_unit(value, unit, digits), _with_unit(bar, unit, digits)
        if value == bar or text != bar_text:
            break
    return text


def table(docs: list[dict]) -> list[str]:
    """The markdown table of every target, and the files its figures came from."""
    results = verdicts(docs)
    lines = ["| target | rows | measured | needed | verdict | on |",
             "|---|---|---:|---:|---|---|"]
    used = {}
    for v in results:
        t = v.target
        bar = f"{t.op} {_with_unit(t.bar, t.unit)}"
        verdict = v.verdict if not v.note else f"{v.verdict}: {v.note}"
        on = "-"
        if v.doc is not None:
            used[v.doc["path"]] = v.doc
            on = v.doc["env"]["device_name"] + (" (partial run)"
                                                if v.doc.get("complete") is False else "")
        figure = "-" if v.figure is None else _figure(v.figure, t.unit, t.bar)
        lines.append(f"| {t.name} | {t.rows.where()} | {figure} | {bar} | {verdict} | "
                     f"{on} |")
    counts = {k: sum(v.verdict.startswith(k) for v in results)
              for k in ("met", "missed", "not measured")}
    lines += ["", f"{counts['met']} met, {counts['missed']} missed, {counts['not measured']} "
              f"not measured, of {len(results)}. Not judged here: {NOT_HERE}."]
    if used:
        lines += ["", "Figures from: " + ", ".join(
            f"`{p.name}` (git `{d['env']['git_sha'][:12]}`)" for p, d in used.items()) + "."]
    return lines


def main(paths: list[str]) -> int:
    docs = [load(p) for p in expand(paths)]
    if not docs:
        print("--verdict: no results files given", flush=True)
        return 2
    print("\n".join(table(docs)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [str(Path(__file__).resolve().parent / "results")]))
