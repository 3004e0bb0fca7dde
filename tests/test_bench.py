"""The benchmark harness end to end: `python -m bench --suite adamw` at tiny sizes on the CPU."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_adamw_suite_tiny(tmp_path):
    subprocess.run([sys.executable, "-m", "bench", "--suite", "adamw", "--sizes", "tiny",
                    "--device", "cpu", "--out", str(tmp_path)], cwd=REPO, check=True,
                   timeout=600)
    (path,) = tmp_path.glob("adamw-*.json")
    rows = json.loads(path.read_text())["rows"]

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
    subprocess.run([sys.executable, "-m", "bench", "--suite", "varlen_attn", "--sizes", "tiny",
                    "--device", "cpu", "--out", str(tmp_path)], cwd=REPO, check=True,
                   timeout=600)
    (path,) = tmp_path.glob("varlen_attn-*.json")
    doc = json.loads(path.read_text())
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
    causal = {r["flops"] for r in rows if r["mode"] == "fwd" and "causal" in r["workload"]}
    full = {r["flops"] for r in rows if r["mode"] == "fwd" and "full" in r["workload"]}
    assert len(causal) == len(full) == 1 and 2 * causal.pop() == full.pop()
LORA_FIELDS = ROW_FIELDS | {"flops", "tflops", "saved_bytes", "peak_bytes"}


def test_lora_suite_tiny(tmp_path):
    subprocess.run([sys.executable, "-m", "bench", "--suite", "lora", "--sizes", "tiny",
                    "--device", "cpu", "--out", str(tmp_path)], cwd=REPO, check=True,
                   timeout=600)
    (path,) = tmp_path.glob("lora-*.json")
    doc = json.loads(path.read_text())
    rows = doc["rows"]

    providers = {r["provider"] for r in rows}
    assert {"base-linear", "torch-3matmul"} <= providers
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


def test_e2e_suite_tiny(tmp_path):
    # as `make bench` runs it: without the Triton interpreter (CPU tensors take the references)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "bench", "--suite", "e2e", "--sizes", "tiny",
                    "--device", "cpu", "--out", str(tmp_path)], cwd=REPO, check=True,
                   timeout=900, env=env)
    (path,) = tmp_path.glob("e2e-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert {(r["mode"], r["provider"]) for r in rows} == {
        ("lora", s) for s in ("baseline", "+attention", "+lora", "+adamw", "fasttrain")} | {
        ("full", s) for s in ("baseline", "+attention", "+adamw", "fasttrain")}
    for r in rows:
        config = json.loads(r["config"])
        assert r["tokens_per_s"] > 0 and 0 < r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"]
        assert len(r["losses"]) == config["warmup_steps"] + config["timed_steps"]
        # every stack computes the same loss from the same weights and data (fp32 here)
        assert r["loss_max_abs_diff"] <= 1e-4 * r["losses"][0], r
        packed = r["provider"] in ("+attention", "fasttrain")
        assert (config["computed_tokens"] == config["real_tokens"]) == packed
        assert config["computed_tokens"] >= config["real_tokens"]
