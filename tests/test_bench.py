"""The benchmark harness end to end: `python -m bench --suite adamw` at tiny sizes on the CPU."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

ROW_FIELDS = {
    "kernel", "provider", "mode", "workload", "config", "dtype", "p50_ms", "p20_ms", "p80_ms",
    "bytes", "bytes_per_param", "gbps", "pct_of_probe", "speedup", "timing", "device",
    "device_name", "torch", "triton", "cuda", "git_sha", "timestamp", "command",
}


def _fasttrain_optim_importable():
    try:
        return importlib.util.find_spec("fasttrain.optim.adamw") is not None
    except ImportError:
        return False


def run_suite(suite: str, out: Path) -> dict:
    """``python -m bench --suite SUITE --sizes tiny --device cpu``, as `make bench` runs it
    (without the Triton interpreter: CPU tensors take the references); the JSON it wrote."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "bench", "--suite", suite, "--sizes", "tiny",
                    "--device", "cpu", "--out", str(out)], cwd=REPO, check=True, timeout=900,
                   env=env)
    (path,) = out.glob(f"{suite}-*.json")
    doc = json.loads(path.read_text())
    assert doc["complete"] is True
    return doc


def test_a_run_cut_off_keeps_the_workloads_it_measured(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--suite", "adamw", "--sizes",
                             "tiny", "--device", "cpu", "--out", str(tmp_path)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not list(tmp_path.glob("adamw-*.json")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no results file after 600 s"
            time.sleep(0.2)
    finally:
        proc.terminate()  # what timeout(1) does to a suite that runs past its time
        proc.wait(timeout=60)
    (path,) = tmp_path.glob("adamw-*.json")
    doc = json.loads(path.read_text())
    assert doc["rows"], "the first workload's rows are written before the suite ends"
    assert doc["complete"] is (proc.returncode == 0)


def test_adamw_suite_tiny(tmp_path):
    doc = run_suite("adamw", tmp_path)
    rows = doc["rows"]
    # measured once at the start of the run, recorded in the environment (and so in every row)
    assert doc["env"]["peak_copy_gbps"] > 0 and doc["env"]["peak_matmul_tflops"] > 0
    assert all(r["peak_copy_gbps"] == doc["env"]["peak_copy_gbps"] for r in rows)

    providers = {r["provider"] for r in rows}
    assert {"torch-fused", "torch-foreach", "torch-forloop"} <= providers
    if _fasttrain_optim_importable():
        assert "fasttrain-torch" in providers
    assert {(r["workload"], r["mode"]) for r in rows} == {
        (w, m) for w in ("200K/20", "50x4K") for m in ("step", "clip+step")}
    for r in rows:
        assert ROW_FIELDS <= r.keys(), ROW_FIELDS - r.keys()
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["gbps"] > 0 and r["pct_of_probe"] > 0 and r["speedup"] > 0
        assert r["bytes_per_param"] == (32.0 if r["mode"] == "clip+step" else 28.0)
        assert isinstance(json.loads(r["config"]), dict)
        if r["provider"] == "torch-fused":
            assert r["speedup"] == 1.0


def test_varlen_attn_suite_tiny(tmp_path):
    doc = run_suite("varlen_attn", tmp_path)
    rows = doc["rows"]
    assert doc["matmul_probe"]["flops"] > 0
    assert {r["provider"] for r in rows} == {"fasttrain-torch", "sdpa-padded"}
    assert {r["mode"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    fields = (ROW_FIELDS - {"bytes", "bytes_per_param", "gbps"}) | {"flops", "tflops"}
    for r in rows:
        assert fields <= r.keys(), fields - r.keys()
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["tflops"] > 0 and r["pct_of_probe"] > 0 and r["speedup"] > 0
        config = json.loads(r["config"])
        assert config["total_tokens"] == 256 and config["nheads"] == 4
        if r["provider"] == "sdpa-padded":
            assert r["speedup"] == 1.0 and r["baseline"] == "sdpa-padded"
        # out, dq, dk, dv against the fp32 reference; sdpa's in its own (padded) layout, mapped
        # back, so its error is small but not zero (fasttrain-torch is the reference here)
        assert set(r["rel_err"]) == {"out", "dq", "dk", "dv"}
        assert max(r["rel_err"].values()) < 1e-5, r["rel_err"]
        if r["provider"] == "sdpa-padded":
            assert min(r["rel_err"].values()) > 0
    causal = {r["flops"] for r in rows if r["mode"] == "fwd" and "causal" in r["workload"]}
    full = {r["flops"] for r in rows if r["mode"] == "fwd" and "full" in r["workload"]}
    assert len(causal) == len(full) == 1 and 2 * causal.pop() == full.pop()


LORA_FIELDS = ROW_FIELDS | {"flops", "tflops", "saved_bytes", "peak_bytes"}


def test_lora_suite_tiny(tmp_path):
    doc = run_suite("lora", tmp_path)
    rows = doc["rows"]

    providers = {r["provider"] for r in rows}
    assert {"base-linear", "torch-3matmul", "torch-addmm"} <= providers
    assert ("peft" in providers) == (importlib.util.find_spec("peft") is not None)
    # On the CPU the Triton provider is reported skipped, with why (as in the adamw suite).
    assert "fasttrain-triton" not in providers
    assert any(s.startswith("fasttrain-triton: ") for s in doc["skipped"]), doc["skipped"]
    workloads = {r["workload"] for r in rows}
    assert len(workloads) == 2 and {"p=0.0", "p=0.1"} == {w.split()[-1] for w in workloads}
    assert {(r["workload"], r["mode"]) for r in rows} == {
        (w, m) for w in workloads for m in ("fwd", "bwd", "fwd+bwd")}
    for r in rows:
        assert LORA_FIELDS <= r.keys(), LORA_FIELDS - r.keys()
        assert 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert r["gbps"] > 0 and r["tflops"] > 0 and r["speedup"] > 0
        config = json.loads(r["config"])
        assert r["workload"].startswith(f"M={config['M']} K={config['K']}")
        if r["provider"] == "base-linear":
            assert r["speedup"] == 1.0
        # y, dx, dA, dB against fp32, for the LoRA providers without dropout (each provider
        # draws its own dropout mask, and the base layer has no LoRA term)
        if r["provider"] == "base-linear" or config["p"] > 0:
            assert r["rel_err"] is None
        else:
            assert set(r["rel_err"]) == {"out", "dx", "dA", "dB"}
            assert max(r["rel_err"].values()) < 1e-5, r


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_errors_are_against_the_reference_in_the_packed_layout(causal):
    """The suite's accuracy check: sdpa's padded out and grads (kv heads repeated when not
    causal) mapped back agree with the fp32 reference; attention across the sequences of the
    pack, or outputs mapped back in the wrong order, do not."""
    import torch

    from bench import varlen_attn as va
    from fasttrain.ops import varlen_attention
    s = va.Shape(4, 2, 16, causal, torch.float32)
    x = va.make_inputs([5, 17, 9], s, torch.device("cpu"))
    ref = va.reference(x, s)
    sdpa = va.sdpa_padded(x, s)
    assert max(va.errors(sdpa, sdpa.layout(x.dout), ref).values()) < 1e-5
    whole = torch.tensor([0, 31], dtype=torch.int32)
    across = va.Run(lambda q, k, v: varlen_attention(q, k, v, whole, whole, causal=causal),
                    va._leaves(x.q, x.k, x.v))
    assert va.errors(across, x.dout, ref)["out"] > 0.1
    shuffled = va.Run(sdpa.fn, sdpa.leaves, sdpa.layout,
                      packed=lambda t, name: sdpa.packed(t, name).flip(0))
    assert min(va.errors(shuffled, sdpa.layout(x.dout), ref).values()) > 0.1


def test_e2e_suite_tiny(tmp_path):
    rows = run_suite("e2e", tmp_path)["rows"]
    assert {(r["mode"], r["provider"]) for r in rows} == {
        ("lora", s) for s in ("baseline", "+attention", "+lora", "+adamw", "fasttrain",
                              "sdpa-packed")} | {
        ("full", s) for s in ("baseline", "+attention", "+adamw", "fasttrain", "sdpa-packed")}
    for r in rows:
        config = json.loads(r["config"])
        assert r["tokens_per_s"] > 0 and 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert len(r["losses"]) == 2 * config["timed_steps"]  # an untimed pass, a timed one
        # every stack computes the same loss from the same weights and data (fp32 here)
        assert r["loss_max_abs_diff"] <= 1e-4 * r["losses"][0], r
        packed = r["provider"] in ("+attention", "fasttrain", "sdpa-packed")
        assert (config["computed_tokens"] == config["real_tokens"]) == packed
        assert config["computed_tokens"] >= config["real_tokens"]


# --- reading results: compare, plot, report, README section ----------------------------------

def _committed(suite="adamw"):
    """The newest committed results file of ``suite`` (CPU runs are committed)."""
    from bench import readme, report
    docs = [report.load(p) for p in readme.committed_results()]
    return max((d for d in docs if d["suite"] == suite), key=lambda d: d["env"]["timestamp"])


def _copy(doc, path, change=None, env=None):
    """Write ``doc`` to ``path``, rows changed by ``change(row)`` (which must change one at
    least, when given) and env updated by ``env``."""
    out = json.loads(doc["path"].read_text())
    if change:
        before = json.dumps(out["rows"])
        for r in out["rows"]:
            change(r)
        assert json.dumps(out["rows"]) != before, "the change matched no row"
    out["env"].update(env or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return path


def _scale(provider, mode, workload, factor):
    def change(r):
        if (r["provider"], r["mode"], r["workload"]) == (provider, mode, workload):
            for k in ("p20_ms", "p50_ms", "p80_ms"):
                r[k] *= factor
    return change


def test_compare_classify():
    from bench.compare import classify
    old = {"p20_ms": 9.0, "p50_ms": 10.0, "p80_ms": 11.5}
    assert classify(old, dict(old), 0.05) == ""
    # 8% slower, but each median inside the other run's p20-p80: noise
    assert classify(old, {"p20_ms": 9.5, "p50_ms": 10.8, "p80_ms": 12.0}, 0.05) == "noise"
    # 8% slower and outside the old spread: a regression
    assert classify(old, {"p20_ms": 10.6, "p50_ms": 10.8, "p80_ms": 11.0}, 0.05) == "REGRESSION"
    assert classify(old, {"p20_ms": 7.0, "p50_ms": 7.2, "p80_ms": 7.5}, 0.05) == "faster"
    # within the threshold: nothing, whatever the spreads
    assert classify(old, {"p20_ms": 10.39, "p50_ms": 10.4, "p80_ms": 10.41}, 0.05) == ""
    assert classify(old, {"p20_ms": 10.6, "p50_ms": 10.8, "p80_ms": 11.0}, 0.10) == ""


def test_compare_planted_regression(tmp_path, capsys):
    from bench.__main__ import main
    doc = _committed()
    old = _copy(doc, tmp_path / "old" / doc["path"].name)
    same = _copy(doc, tmp_path / "same" / doc["path"].name)
    slow = _copy(doc, tmp_path / "new" / doc["path"].name,
                 _scale("fasttrain-cpu", "step", "50M/200", 1.5))
    assert main(["--compare", str(old), str(same)]) == 0
    out = capsys.readouterr().out
    assert "REGRESSION" not in out and "no regression" in out and "warning" not in out
    assert main(["--compare", str(old), str(slow)]) == 1
    out = capsys.readouterr().out
    flagged = [line for line in out.splitlines() if line.endswith("REGRESSION")]
    assert len(flagged) == 1 and flagged[0].split()[:3] == ["fasttrain-cpu", "step", "50M/200"]
    assert "1.500" in flagged[0]
    # folders: files matched by suite
    assert main(["--compare", str(old.parent), str(slow.parent)]) == 1
    assert "REGRESSION" in capsys.readouterr().out
    # a threshold above the change: not flagged
    assert main(["--compare", str(old), str(slow), "--threshold", "0.6"]) == 0
    # the reverse is an improvement, not a regression
    assert main(["--compare", str(slow), str(old)]) == 0
    assert "faster" in capsys.readouterr().out


def test_compare_noise_not_flagged(tmp_path, capsys):
    from bench.__main__ import main
    doc = _committed()

    def widen(r, factor=1.0):
        r["p20_ms"], r["p80_ms"] = r["p50_ms"] * 0.85 * factor, r["p50_ms"] * 1.15 * factor
        r["p50_ms"] *= factor
    old = _copy(doc, tmp_path / "old.json", widen)
    new = _copy(doc, tmp_path / "new.json", lambda r: widen(r, 1.08))  # 8%, inside the spreads
    assert main(["--compare", str(old), str(new)]) == 0
    out = capsys.readouterr().out
    assert "REGRESSION" not in out
    assert sum(line.endswith("  noise") for line in out.splitlines()) == len(doc["rows"])


def test_compare_warns_on_other_device_and_exit_status(tmp_path):
    doc = _committed()
    old = _copy(doc, tmp_path / "old.json")
    new = _copy(doc, tmp_path / "new.json", _scale("torch-fused", "step", "50M/200", 2.0),
                env={"device_name": "Another CPU", "torch": "9.9.9"})
    result = subprocess.run([sys.executable, "-m", "bench", "--compare", str(old), str(new)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "warning: device_name differs" in result.stdout
    assert "warning: torch differs" in result.stdout


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.__main__ import main
    doc = _committed()
    assert main(["--plot", str(doc["path"]), "--out", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [f"{doc['path'].stem}-adamw-{m}.png" for m in ("gbps", "time")]
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_plot_without_matplotlib(monkeypatch):
    from bench import plot
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="needs matplotlib"):
        plot.pyplot()


def test_report(tmp_path):
    from bench.__main__ import main
    from bench.report import blocks
    doc = _committed()
    out = tmp_path / "report.md"
    assert main(["--report", str(doc["path"]), "--out", str(out)]) == 0
    text = out.read_text()
    env = doc["env"]
    for field in ("device_name", "torch", "git_sha", "command", "timestamp"):
        assert env[field] in text, field
    groups = blocks(doc["rows"])
    assert text.count("\n### ") == len(groups)
    for (workload, mode, dtype), rows in groups.items():
        table = text.split(f"### {workload} / {mode} / {dtype}\n", 1)[1].split("\n### ")[0]
        for r in rows:
            assert f"| {r['provider']} | " in table, (r["provider"], workload, mode)
        assert f"{rows[0]['speedup']:.2f}x" in table


def test_readme_results_section_is_fresh():
    """A commit that adds results to bench/results without python -m bench --readme fails."""
    from bench import readme
    text = readme.README.read_text()
    assert readme.render(text, readme.section()) == text, (
        "README.md's results section is out of date: run python -m bench --readme")


def test_readme_section_names_its_files(tmp_path):
    from bench import readme
    from bench.report import fmt
    doc = _committed()
    newer = _copy(doc, tmp_path / "adamw-newer.json",
                  env={"timestamp": "2099-01-01T00:00:00+00:00"})
    other = _copy(doc, tmp_path / "adamw-gpu.json", env={"device_name": "NVIDIA H100"})
    section = readme.section([doc["path"], newer, other])
    # the newest file per (suite, device): the 2099 copy for this device, and the other device
    assert "#### adamw on NVIDIA H100" in section and str(other) in section
    assert str(newer) in section and doc["path"].name not in section
    fused = [r for r in doc["rows"] if r["provider"] == "torch-fused"][0]
    assert f"{fmt(fused['p50_ms'])} (1.00x)" in section
    with pytest.raises(ValueError, match="markers"):
        readme.render("no markers here", section)


def test_tune_sweep_tiny(tmp_path):
    """`python -m bench.tune` on the CPU: the Triton interpreter, two candidates per kernel,
    compiled in worker processes, each checked against the current config and timed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "bench.tune", "--device", "cpu", "--head-dim", "32",
                    "--jobs", "2", "--out", str(tmp_path)], cwd=REPO, check=True, timeout=900,
                   env=env)
    (path,) = tmp_path.glob("tune-varlen_attn-*.json")
    doc = json.loads(path.read_text())
    assert doc["env"]["command"].startswith("python -m bench.tune")
    (sweep,) = doc["sweeps"]
    assert sweep["head_dim"] == 32 and set(sweep["best"]) == {"fwd", "dkdv", "dq"}
    for kind in ("fwd", "dkdv", "dq"):
        rows = [r for r in sweep["results"] if r["kind"] == kind]
        assert len(rows) == 3 and sum(r["current"] for r in rows) == 1
        for r in rows:
            assert "error" not in r, r
            assert r["ms"] > 0 and r["max_rel_err"] < 1e-5
        assert sweep["best"][kind] == min(rows, key=lambda r: r["ms"])["config"]


# --- DESIGN.md's targets judged from results (bench/targets.py) -------------------------------

def _results(tmp_path, name, suite, device, rows, timestamp="2026-12-01T00:00:00+00:00",
             skipped=()):
    """A results file of ``rows`` (provider, workload, mode, dtype, p50_ms and extras)."""
    from bench.report import load
    env = {"device": device, "device_name": "NVIDIA H200" if device == "cuda" else "Some CPU",
           "timestamp": timestamp, "git_sha": "0123456789abcdef", "torch": "2.11.0",
           "command": "python -m bench --targets"}
    doc = {"suite": suite, "complete": True, "env": env, "skipped": list(skipped),
           "rows": [dict(kernel=suite, **r) for r in rows]}
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return load(path)


def _verdicts(docs):
    from bench import targets
    return {v.target.name: v for v in targets.verdicts(docs)}


def test_targets_speedups_rates_and_cross_dtype_ratio(tmp_path):
    fp32 = dict(workload="1B/300", dtype="float32")
    doc = _results(tmp_path, "adamw.json", "adamw", "cuda", [
        dict(provider="torch-fused", mode="step", p50_ms=10.0, **fp32),
        dict(provider="fasttrain-triton", mode="step", p50_ms=9.0, pct_of_probe=93.0, **fp32),
        dict(provider="torch-fused", mode="clip+step", p50_ms=10.0, **fp32),
        dict(provider="fasttrain-triton", mode="clip+step", p50_ms=8.0, **fp32),
        dict(provider="torch-fused", mode="step", p50_ms=6.0, workload="1B/300",
             dtype="bfloat16"),
        dict(provider="fasttrain-triton[sr,bf16-state]", mode="step", p50_ms=5.0,
             workload="1B/300", dtype="bfloat16")])
    v = _verdicts([doc])
    assert v["AdamW step fp32 vs torch fused"].verdict == "met"
    assert v["AdamW step fp32 vs torch fused"].figure == pytest.approx(10 / 9)
    assert v["AdamW step fp32, % of measured copy bandwidth (28 B/param)"].verdict == "met"
    clip = v["AdamW + grad clip vs clip_grad_norm_ + torch fused"]
    assert clip.verdict == "missed" and clip.figure == pytest.approx(1.25)
    # bf16 SR against torch fused on fp32 params: 10 ms / 5 ms, not the bf16 torch row's 6 ms
    low = v["AdamW bf16 params + bf16 states (SR) vs torch fused fp32"]
    assert low.verdict == "met" and low.figure == pytest.approx(2.0)
    small = v["AdamW, many small tensors vs torch fused"]
    assert small.verdict == "not measured" and "no cuda file has these rows" in small.note


def _attn_rows(fast_err, ref_err, mode="fwd", workload="mix-16K d=128 causal"):
    common = dict(workload=workload, mode=mode, dtype="bfloat16")
    errs = dict(out=ref_err, dq=ref_err, dk=ref_err, dv=ref_err)
    return [dict(provider="torch-varlen", p50_ms=1.0, rel_err=errs, **common),
            dict(provider="flex-document-mask", p50_ms=1.5, rel_err=errs, **common),
            dict(provider="fasttrain", p50_ms=0.8, tflops=500.0,
                 rel_err=dict(errs, dk=fast_err) if fast_err is not None else None, **common)]


def test_targets_judge_accuracy_too(tmp_path):
    name = "varlen attention fwd vs torch varlen (FA2 kernel)"
    ok = _results(tmp_path, "ok.json", "varlen_attn", "cuda", _attn_rows(5e-3, 3e-3))
    v = _verdicts([ok])
    assert v[name].verdict == "met" and v[name].figure == pytest.approx(1.25)
    assert v["varlen attention fwd rate"].verdict == "met"
    assert v["varlen attention fwd vs FlexAttention (document mask)"].verdict == "met"
    # faster but dk 3x the FA2 kernel's error: a fast wrong kernel meets nothing
    bad = _results(tmp_path, "bad.json", "varlen_attn", "cuda", _attn_rows(9e-3, 3e-3))
    v = _verdicts([bad])
    assert v[name].verdict == "missed (accuracy)" and "dk" in v[name].note
    unknown = _results(tmp_path, "none.json", "varlen_attn", "cuda", _attn_rows(None, 3e-3))
    v = _verdicts([unknown])
    assert v[name].verdict == "met" and v[name].note == "accuracy not recorded"
    # a reference that is exact leaves only the 1e-6 floor: why the reference must compute in
    # the kernel's dtype (peft's fp32 adapters would be one that does not)
    exact = _results(tmp_path, "exact.json", "varlen_attn", "cuda", _attn_rows(2e-3, 0.0))
    assert _verdicts([exact])[name].verdict == "missed (accuracy)"


def test_accuracy_references_compute_in_bf16():
    """The providers bench/targets.py judges fasttrain's accuracy against run in the kernel's
    dtype: their bf16 errors are bf16-sized on every output (peft, whose LoRA branch runs in
    fp32 by default, would hold a bf16 kernel to an fp32 bound)."""
    import torch

    from bench import lora, targets, varlen_attn as va
    w = dict(M=64, K=96, N=80, r=8, p=0.0)
    t = lora.make_tensors(w, torch.bfloat16, torch.device("cpu"))
    ref = lora.reference(t)
    for name in targets.LORA_ACC["accuracy"]:
        fwd, inputs = lora.PROVIDERS[name](t, w)
        errs = lora.errors(fwd, inputs, t["dy"], ref)
        assert min(errs.values()) > 1e-4, (name, errs)
    s = va.Shape(4, 2, 32, True, torch.bfloat16)
    x = va.make_inputs([5, 17, 9], s, torch.device("cpu"))
    sdpa = va.sdpa_padded(x, s)
    errs = va.errors(sdpa, sdpa.layout(x.dout), va.reference(x, s))
    assert "sdpa-padded" in targets.ATTN_ACC["accuracy"] and min(errs.values()) > 1e-4, errs


def test_targets_take_the_newest_file_with_the_rows_and_say_why_not(tmp_path):
    older = _results(tmp_path, "old.json", "varlen_attn", "cuda", _attn_rows(4e-3, 3e-3),
                     timestamp="2026-11-01T00:00:00+00:00")
    newer = _results(tmp_path, "new.json", "varlen_attn", "cuda",
                     [r for r in _attn_rows(4e-3, 3e-3, mode="bwd")
                      if r["provider"] != "torch-varlen"],
                     skipped=["torch-varlen: torch 2.4 has no torch.nn.attention.varlen"])
    v = _verdicts([older, newer])
    fwd = v["varlen attention fwd vs torch varlen (FA2 kernel)"]
    assert fwd.verdict == "met" and fwd.doc["path"].name == "old.json"  # the newer lacks fwd
    bwd = v["varlen attention bwd vs torch varlen (FA2 kernel)"]
    assert bwd.verdict == "not measured"
    assert "skipped in new.json: torch-varlen: torch 2.4 has no" in bwd.note
    assert v["varlen attention bwd vs FlexAttention (document mask)"].verdict == "met"
    assert v["LoRA linear fwd+bwd vs peft (the faster of fp32 and bf16 adapters)"].note == \
        "no cuda results of lora"


def test_targets_say_when_a_newer_run_lacks_the_rows_and_refuse_mixed_timing(tmp_path):
    """An older "met" is shown with the newer run that failed to measure it (git sha and why);
    providers timed differently (a graph against eager) are not compared."""
    older = _results(tmp_path, "old.json", "varlen_attn", "cuda", _attn_rows(4e-3, 3e-3),
                     timestamp="2026-11-01T00:00:00+00:00")
    newer = _results(tmp_path, "new.json", "varlen_attn", "cuda",
                     [r for r in _attn_rows(4e-3, 3e-3) if r["provider"] != "fasttrain"],
                     skipped=["fasttrain: RuntimeError: CUDA error: an illegal memory access"])
    fwd = _verdicts([older, newer])["varlen attention fwd vs torch varlen (FA2 kernel)"]
    assert fwd.verdict == "met" and fwd.doc["path"].name == "old.json"
    assert "from an older run" in fwd.note and "new.json" in fwd.note
    assert "illegal memory access" in fwd.note
    fp32 = dict(workload="1B/300", mode="step", dtype="float32")
    mixed = _results(tmp_path, "adamw.json", "adamw", "cuda", [
        dict(provider="torch-fused", p50_ms=30.0, timing="cuda-events, eager", **fp32),
        dict(provider="fasttrain-triton", p50_ms=9.0, timing="cuda-graph", **fp32)])
    step = _verdicts([mixed])["AdamW step fp32 vs torch fused"]
    assert step.verdict == "not measured" and "not comparable" in step.note


def test_lora_target_takes_the_faster_peft(tmp_path):
    common = dict(workload="M=8192 K=4096 N=4096 r=16 p=0.0", mode="fwd+bwd", dtype="bfloat16")
    doc = _results(tmp_path, "lora.json", "lora", "cuda", [
        dict(provider="peft", p50_ms=3.0, **common),
        dict(provider="peft[no-upcast]", p50_ms=2.0, **common),
        dict(provider="fasttrain-triton", p50_ms=1.6, **common)])
    v = _verdicts([doc])["LoRA linear fwd+bwd vs peft (the faster of fp32 and bf16 adapters)"]
    assert v.verdict == "missed" and v.figure == pytest.approx(1.25)


def test_targets_end_to_end_and_table(tmp_path):
    from bench import targets
    rows = [dict(provider="baseline", tokens_per_s=10_000.0, peak_bytes=40e9,
                 losses=[10.4, 10.3], loss_max_abs_diff=None),
            dict(provider="fasttrain", tokens_per_s=16_000.0, peak_bytes=30e9,
                 losses=[10.4, 10.31], loss_max_abs_diff=0.01)]
    doc = _results(tmp_path, "e2e.json", "e2e", "cuda", [
        dict(r, workload="llama-1B", mode="lora", dtype="bfloat16", p50_ms=1.0) for r in rows])
    v = _verdicts([doc])
    tokens = v["end to end LoRA fine-tune, tokens/s vs HF + peft + torch AdamW + SDPA padded"]
    assert tokens.verdict == "met" and tokens.figure == pytest.approx(1.6)
    assert v["end to end LoRA fine-tune, peak memory over the baseline's"].verdict == "met"
    text = "\n".join(targets.table([doc]))
    assert "| 1.60x | >= 1.5x | met | NVIDIA H200 |" in text
    assert f"2 met, 0 missed, {len(targets.TARGETS) - 2} not measured" in text
    assert "`e2e.json` (git `0123456789ab`)" in text
    # a stack that trains differently (loss 0.5 off, over 1% of 10.4) meets nothing
    rows[1].update(losses=[10.4, 10.8], loss_max_abs_diff=0.5)
    doc = _results(tmp_path, "e2e.json", "e2e", "cuda", [
        dict(r, workload="llama-1B", mode="lora", dtype="bfloat16", p50_ms=1.0) for r in rows])
    tokens = _verdicts([doc])[
        "end to end LoRA fine-tune, tokens/s vs HF + peft + torch AdamW + SDPA padded"]
    assert tokens.verdict == "missed (accuracy)" and "loss curves differ" in tokens.note


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_targets_mode_plans_every_row_the_verdict_reads(device):
    """`python -m bench --targets` runs, on each device, the (workload, mode, dtype, provider)
    rows that bench/targets.py judges: a name that drifted apart would leave a target 'not
    measured' after a GPU session spent its time on it."""
    import torch

    from bench import adamw, common, e2e, lora, targets, varlen_attn
    ctx = common.Context(torch.device(device), "targets", reps=10, warmup=1, probe=None)
    planned = set()
    for w in adamw.workloads(ctx):
        planned |= {(w, v.mode, str(v.dtype)[6:], p) for v in adamw.variants(ctx)
                    for p in v.providers}
    if device == "cuda":
        for w, s in varlen_attn.plan(ctx):
            label = f"{w} d={s.head_dim} {'causal' if s.causal else 'full'}"
            names = set(varlen_attn.providers(ctx)) | {"torch-varlen"}  # (torch 2.11 has it)
            planned |= {(label, m, "bfloat16", p) for m in varlen_attn.MODES for p in names}
        planned |= {(lora._name(w), m, "bfloat16", p) for w in lora.workloads(ctx)
                    for m in lora.MODES for p in lora.PROVIDERS}
        assert e2e.setup(ctx).dtype == torch.bfloat16
        planned |= {("llama-1B", "lora", "bfloat16", p) for p in e2e.STACKS}
    judged = [t for t in targets.TARGETS if t.rows.device == device]
    assert judged
    for t in judged:
        for rows, needs in ((t.rows, t.needs), (t.other, t.other_needs)):
            for p in needs if rows else ():
                assert (rows.workload, rows.mode, rows.dtype, p) in planned, (t.name, p)


def test_flex_is_timed_after_the_other_providers_rows(monkeypatch):
    """FlexAttention compiles for each workload: the other providers' rows of a workload come
    in a batch of their own before it (a run cut off during the compile keeps them)."""
    import torch

    from bench import common, varlen_attn as va
    monkeypatch.setattr(va, "providers", lambda ctx: {"fasttrain-torch": va.fasttrain("torch"),
                                                      va.FLEX: va.sdpa_padded})
    ctx = common.Context(torch.device("cpu"), "tiny", reps=2, warmup=1, probe=None)
    batches = list(va.run(ctx))
    assert len(batches) == 2 * len(va.plan(ctx))
    for first, second in zip(batches[::2], batches[1::2]):
        assert {r["provider"] for r in first} == {"fasttrain-torch"}
        assert {r["provider"] for r in second} == {va.FLEX}
        assert {r["workload"] for r in first} == {r["workload"] for r in second}
        assert all(max(r["rel_err"].values()) < 1e-5 for r in first + second)


def test_e2e_model_bytes_count_shared_storage_once():
    import torch

    from bench.e2e import _model_bytes

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False),
                                torch.nn.BatchNorm1d(10))
    model[1].weight = model[0].weight  # tied (10x4 both), as LMs tie embeddings and head
    # 10x4 fp32 shared weight + BatchNorm's weight, bias, running mean/var (10 each) and count
    assert _model_bytes(model) == 4 * (40 + 4 * 10) + 8


@pytest.mark.parametrize("cuda", [False, True])
def test_adamw_targets_run_time_the_installed_peers_beside_torch(cuda):
    from types import SimpleNamespace

    from bench import adamw

    for v in adamw.variants(SimpleNamespace(cuda=cuda, sizes="targets")):
        if str(v.dtype) == "torch.float32":
            assert set(adamw.PEERS) <= set(v.providers) and adamw.BASELINE in v.providers
    quick = adamw.variants(SimpleNamespace(cuda=cuda, sizes="quick"))
    assert not set(adamw.PEERS) & set(quick[0].providers)


class _SimulatedGPU:
    """A GPU timeline for time_interleaved's CUDA path on the CPU: launches queue behind each
    other on a device clock, the host clock advances by what the host does."""

    def __init__(self):
        self.host = self.gpu = 0.0  # ms
        self.sleeps = []

    def launch(self, ms):
        self.gpu = max(self.gpu, self.host + 0.005) + ms
        self.host += 0.004

    def synchronize(self, device=None):
        self.host = max(self.host, self.gpu)

    def install(self, monkeypatch):
        import torch

        from bench import common

        sim = self

        class Event:
            def __init__(self, enable_timing=True):
                self.t = None

            def record(self):
                self.t = max(sim.gpu, sim.host + 0.005)

            def elapsed_time(self, end):
                return end.t - self.t

        def sleep(cycles):
            sim.sleeps.append(cycles / 1e6)
            sim.launch(cycles / 1e6)

        monkeypatch.setattr(torch.cuda, "synchronize", self.synchronize)
        monkeypatch.setattr(torch.cuda, "_sleep", sleep)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(common, "_sleep_cycles_per_ms", lambda device: 1e6)
        monkeypatch.setattr(common.time, "perf_counter", lambda: sim.host / 1e3)


def test_cuda_timing_is_device_time_and_a_provider_that_syncs_does_not_stall(monkeypatch):
    """Device time of GPU-bound and host-bound calls alike; and a call that waits for the GPU
    inside (a sync) waited, timed behind a sleep, for that sleep too: with the sleep grown from
    those waits (1.5x a repetition) 40 repetitions took hours of GPU sleep."""
    import torch

    from bench.common import time_interleaved

    sim = _SimulatedGPU()
    sim.install(monkeypatch)

    def call(gpu_ms, host_ms, sync=False):
        def fn():
            sim.host += host_ms
            sim.launch(gpu_ms)
            if sync:
                sim.synchronize()
                sim.launch(gpu_ms)
        return fn

    out = time_interleaved({"gpu-bound": call(1.0, 0.2), "host-bound": call(0.05, 0.5),
                            "syncs": call(0.1, 0.05, sync=True)},
                           torch.device("cuda"), reps=40, warmup=1)
    assert out["gpu-bound"]["p50_ms"] == pytest.approx(1.0, abs=0.01)
    assert out["host-bound"]["p50_ms"] == pytest.approx(0.05, abs=0.01)
    assert out["syncs"]["p50_ms"] == pytest.approx(0.2, abs=0.02)
    assert out["host-bound"]["host_p50_ms"] == pytest.approx(0.5, abs=0.02)
    assert max(sim.sleeps) < 2.0 and sim.host < 300, (max(sim.sleeps), sim.host)


def test_every_timed_call_follows_an_allocator_settle(monkeypatch):
    """The C allocator's deferred merging of what one call freed is done before the next
    timed call starts, not inside it (measured: ~6 ms charged to the AdamW step that followed
    the torch reference path's)."""
    import torch

    from bench import common

    events = []
    monkeypatch.setattr(common, "_settle_allocator", lambda: events.append("settle"))
    common.time_interleaved({"a": lambda: events.append("a"), "b": lambda: events.append("b")},
                            torch.device("cpu"), reps=5, warmup=2)
    timed = events[events.index("settle"):]  # the warm-up calls come first, unsettled
    assert len(timed) == 20
    assert timed[0::2] == ["settle"] * 10 and sorted(timed[1::2]) == ["a"] * 5 + ["b"] * 5
