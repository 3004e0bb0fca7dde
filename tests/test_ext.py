"""The C++/CUDA extension: build and load, environment report, nvcc compile checks, and the CPU
ops (fasttrain::adamw_cpu_, fasttrain::sum_sq_cpu) against a float64 torch computation of the
same formula.

The extension is built (or taken from the cache) once per session by the ``ext`` fixture; the
nvcc compile checks start in the background at the beginning of the module so that they run
next to that build.
"""
from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

from fasttrain import _ext, _ext_sources
from helpers import WrapperTensor, assert_close

REPO = Path(__file__).resolve().parents[1]
SIZES = (1, 17, 1025, 100003)


def _nvcc() -> str | None:
    return shutil.which("nvcc")


# ------------------------------------------- compile checks (started in the background)
def _glue_syntax_command(stub_dir: str) -> list[str] | None:
    """`c++ -fsyntax-only` of the CUDA glue against torch's headers and the CUDA toolkit's, with
    the one generated header that a CPU torch lacks stubbed. None if that cannot run here."""
    nvcc = _nvcc()
    cxx = shutil.which("c++") or shutil.which("g++")
    if torch.version.cuda or nvcc is None or cxx is None:
        return None
    cuda_include = None
    for candidate in (Path(nvcc).resolve().parents[1] / "include",
                      Path("/usr/local/cuda/include")):
        if (candidate / "cuda_runtime.h").is_file():
            cuda_include = candidate
            break
    if cuda_include is None:
        return None
    from torch.utils.cpp_extension import include_paths

    macros = Path(stub_dir, "c10", "cuda", "impl", "cuda_cmake_macros.h")
    macros.parent.mkdir(parents=True, exist_ok=True)
    macros.write_text("#pragma once\n")
    cmd = [cxx, "-fsyntax-only", "-std=c++20", "-I", stub_dir, "-isystem", str(cuda_include)]
    for inc in include_paths():
        cmd += ["-isystem", inc]
    return cmd + [str(_ext_sources.csrc_dir() / src) for src in _ext_sources.CUDA_SOURCES
                  if src.endswith(".cpp")]


def _start(cmd: list[str]) -> subprocess.Popen:
    # In its own process group: nvcc runs cicc/ptxas as children, which a kill must reach too.
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.fixture(scope="module", autouse=True)
def compile_jobs():
    """Start the compile checks in the background, next to the extension build:
    `nvcc -arch=sm_90 -c` on every .cu file under csrc/, and a syntax check of the CUDA glue."""
    jobs = {}
    tmp = tempfile.TemporaryDirectory(prefix="fasttrain_nvcc_")
    nvcc = _nvcc()
    if nvcc is not None:
        for i, cu in enumerate(sorted(_ext_sources.csrc_dir().rglob("*.cu"))):
            cmd = [nvcc, "-arch=sm_90", "-c", str(cu), "-o", os.path.join(tmp.name, f"{i}.o")]
            jobs[cu.name] = _start(cmd)
    glue = _glue_syntax_command(tmp.name)
    if glue is not None:
        jobs["glue"] = _start(glue)
    yield jobs
    for proc in jobs.values():  # not waited for (tests deselected): stop the whole group
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    tmp.cleanup()


# ----------------------------------------------------------------------- build, load, report
@pytest.fixture(scope="session")
def ext():
    module, error = _ext.load()
    assert module is not None, f"the extension did not build/load: {error}"
    return module


def test_extension_builds_and_loads(ext):
    status = _ext.status()
    assert status == "prebuilt" or status.startswith(("cached at", "built in")), status
    assert ext.torch_version() == torch.__version__.split("+")[0]
    assert ext.has_cuda() == _ext.has_cuda()
    if not torch.version.cuda:
        assert not _ext.has_cuda()
    for name in ("adamw_cpu_", "sum_sq_cpu", "adamw_cuda_"):
        assert hasattr(torch.ops.fasttrain, name), name


def test_unbuildable_extension_warns_once_and_reports_why(tmp_path, monkeypatch):
    # A fresh loader state, a prebuilt module out of the way, and sources that cannot compile.
    csrc = tmp_path / "csrc"
    (csrc / "adamw").mkdir(parents=True)
    (csrc / "bindings.cpp").write_text("#error fasttrain-test-boom\n")
    (csrc / "adamw" / "adamw_cpu.cpp").write_text("int x;\n")
    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_ext_sources, "csrc_dir", lambda: csrc)
    monkeypatch.setattr(_ext_sources, "want_cuda", lambda: False)
    monkeypatch.setattr(_ext, "_try_prebuilt", lambda: (None, "test"))
    for name, value in (("_loaded", False), ("_module", None), ("_error", None),
                        ("_status", "not loaded yet")):
        monkeypatch.setattr(_ext, name, value)
    with pytest.warns(RuntimeWarning, match="fasttrain-test-boom"):
        module, error = _ext.load()
    assert module is None and "fasttrain-test-boom" in error
    assert _ext.status().startswith("unbuildable:") and not _ext.has_cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.load() == (None, error)  # cached: no second build, no second warning


def test_a_failed_build_is_not_repeated_by_the_processes_that_waited_on_it(tmp_path,
                                                                              monkeypatch):
    """Loaders waiting on the build lock (pytest workers beside a background build) take the
    builder's failure instead of each building again; a loader that comes later retries."""
    import threading
    import time

    monkeypatch.setenv("FASTTRAIN_CACHE", str(tmp_path))
    calls = []

    def failing_build(*args):
        calls.append(threading.get_ident())
        time.sleep(1.0)  # the other loader is waiting on the lock meanwhile
        raise RuntimeError("fasttrain-test-build-failure")
    monkeypatch.setattr(_ext, "_build", failing_build)
    errors = []

    def load():
        try:
            _ext._jit()
        except RuntimeError as e:
            errors.append(str(e))
    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 1 and len(errors) == 2
    assert sum(e.startswith("the build failed in another process: RuntimeError: "
                            "fasttrain-test-build-failure") for e in errors) == 1
    with pytest.raises(RuntimeError, match="fasttrain-test-build-failure"):
        _ext._jit()  # a later loader builds again
    assert len(calls) == 2


def test_a_build_killed_midway_does_not_block_the_next(tmp_path):
    # A killed build leaves torch's lock file, on which torch waits forever; only the builder
    # holding fasttrain's flock builds, so it clears the stale file. (A fresh cache: ~30 s.)
    env = dict(os.environ, FASTTRAIN_CACHE=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get(
                   "PYTHONPATH")] if p]))
    code = ("from fasttrain import _ext\n"
            "_, folder = _ext.jit_build_dir()\n"
            "folder.mkdir(parents=True)\n"
            "(folder / 'lock').touch()\n"
            "module, error = _ext.load()\n"
            "assert module is not None, error\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600, cwd=tempfile.gettempdir())
    assert res.returncode == 0, res.stderr[-3000:]


def test_env_report_runs(ext):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    res = subprocess.run([sys.executable, "-m", "fasttrain.env"], capture_output=True, text=True,
                         env=env, timeout=300, cwd=tempfile.gettempdir())
    assert res.returncode == 0, res.stderr
    out = res.stdout
    for word in ("torch", "triton", "TRITON_INTERPRET", "backends", "extension"):
        assert word in out, f"{word!r} missing from:\n{out}"
    for line in ("cpu  tensors  cpu    available", "cpu  tensors  torch  available",
                 "cuda tensors  cuda"):
        assert line in out, f"{line!r} missing from:\n{out}"
    assert "status" in out and ("cached at" in out or "prebuilt" in out or "built in" in out)


def test_cuda_sources_compile_with_nvcc(compile_jobs):
    if _nvcc() is None:
        pytest.skip("nvcc not found on PATH")
    cu_jobs = {name: proc for name, proc in compile_jobs.items() if name.endswith(".cu")}
    assert cu_jobs, "no .cu files under csrc/"
    for name, proc in cu_jobs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"nvcc -arch=sm_90 -c {name} failed:\n{out}"


def test_cuda_glue_is_valid_cpp(compile_jobs):
    """The CUDA glue needs torch's CUDA headers, which a CPU torch has only in part: check its
    syntax (a torch with CUDA compiles it for real in the extension build)."""
    if "glue" not in compile_jobs:
        pytest.skip("torch has CUDA, or no nvcc / C++ compiler / cuda_runtime.h here")
    out, _ = compile_jobs["glue"].communicate(timeout=300)
    assert compile_jobs["glue"].returncode == 0, out[-4000:]


# ----------------------------------------------------------------- the CPU AdamW vs float64
def _ref_step(p, g, m, v, vmax, step, *, lr, beta1, beta2, eps, wd, decoupled, amsgrad,
              maximize, inv_scale, clip):
    """One step of the op's formula in float64 on float64 tensors (returns new values)."""
    step = step + 1
    g = g.clone()
    if inv_scale is not None:
        g = g * inv_scale
    if clip is not None:
        g = g * clip
    if maximize:
        g = -g
    if decoupled:
        p = p * (1 - lr * wd)
    else:
        g = g + wd * p
    m = m + (1 - beta1) * (g - m)
    v = v * beta2 + (1 - beta2) * g * g
    bc1 = 1 - beta1 ** step
    bc2 = 1 - beta2 ** step
    if amsgrad:
        vmax = torch.maximum(vmax, v)
        denom = vmax.sqrt() / math.sqrt(bc2) + eps
    else:
        denom = v.sqrt() / math.sqrt(bc2) + eps
    p = p - (lr / bc1) * (m / denom)
    return p, m, v, vmax, step


def _make_group(gen, param_dtype, grad_dtype, state_dtype, *, master, amsgrad):
    ps = [torch.randn(n, generator=gen).to(param_dtype) for n in SIZES]
    masters = [p.float() + 1e-3 * torch.randn(p.shape, generator=gen) for p in ps] if master else []
    if master:  # params are the rounded masters, as the optimizer keeps them
        ps = [mp.to(param_dtype) for mp in masters]
    ms = [0.1 * torch.randn(n, generator=gen).to(state_dtype) for n in SIZES]
    vs = [0.01 * torch.rand(n, generator=gen).to(state_dtype) for n in SIZES]
    vmaxs = [0.01 * torch.rand(n, generator=gen).to(state_dtype) for n in SIZES] if amsgrad else []
    steps = [torch.tensor(float(k), dtype=torch.float32) for k in range(len(SIZES))]
    return ps, masters, ms, vs, vmaxs, steps


CASES = [
    # (param, grad, state, master, stochastic)
    (torch.float32, torch.float32, torch.float32, False, False),
    (torch.float32, torch.float32, torch.bfloat16, False, False),
    (torch.bfloat16, torch.bfloat16, torch.float32, True, False),
    (torch.bfloat16, torch.float32, torch.float32, True, False),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16, False, False),
    (torch.bfloat16, torch.bfloat16, torch.float32, False, True),
]
OPTIONS = [
    # (decoupled, amsgrad, maximize, inv_scale, clip_coef, weight_decay)
    (True, False, False, None, None, 0.1),
    (False, False, False, None, None, 0.1),
    (True, True, True, 0.5, None, 0.1),
    (False, True, False, None, 0.25, 0.1),
    (True, False, True, 0.125, 0.5, 0.0),
]


def _name(case):
    p, g, s, master, sr = case
    short = {torch.float32: "f32", torch.bfloat16: "bf16"}
    return f"p{short[p]}-g{short[g]}-s{short[s]}" + ("-master" if master else "") + (
        "-sr" if sr else "")


def _options_name(o):
    return "dec{}-ams{}-max{}-inv{}-clip{}-wd{}".format(
        *[int(x) if isinstance(x, bool) else x for x in o])


# Every option set for fp32 and for bf16 params with fp32 masters; two for the other dtypes.
PAIRS = [pytest.param(case, options, id=f"{_name(case)}-{_options_name(options)}")
         for i, case in enumerate(CASES)
         for options in (OPTIONS if i in (0, 2) else OPTIONS[2:4])]


@pytest.mark.parametrize("case,options", PAIRS)
def test_adamw_cpu_matches_float64(ext, case, options):
    param_dtype, grad_dtype, state_dtype, master, stochastic = case
    decoupled, amsgrad, maximize, inv_scale, clip, wd = options
    gen = torch.Generator().manual_seed(1234)
    ps, masters, ms, vs, vmaxs, steps = _make_group(gen, param_dtype, grad_dtype, state_dtype,
                                                    master=master, amsgrad=amsgrad)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, wd=wd)
    ref = [[(masters[i] if master else ps[i]).double(), None, ms[i].double(), vs[i].double(),
            vmaxs[i].double() if amsgrad else None, float(steps[i])] for i in range(len(SIZES))]
    n_steps = 2
    for _ in range(n_steps):
        grads = [torch.randn(n, generator=gen).to(grad_dtype) for n in SIZES]
        raw = [g.clone() for g in grads]
        torch.ops.fasttrain.adamw_cpu_(
            ps, grads, ms, vs, vmaxs, masters, steps, hyper["lr"], hyper["beta1"],
            hyper["beta2"], hyper["eps"], wd, decoupled, amsgrad, maximize, stochastic, 7,
            None if inv_scale is None else torch.tensor(inv_scale),
            None, None if clip is None else torch.tensor([clip]))
        for g, g0 in zip(grads, raw):  # a grad scaler's grads are left unscaled, as by torch
            assert torch.equal(g, g0 if inv_scale is None else (g0.double() * inv_scale).to(
                grad_dtype))
        for i, r in enumerate(ref):
            p, m, v, vmax, step = _ref_step(
                r[0], raw[i].double(), r[2], r[3], r[4], r[5], decoupled=decoupled,
                amsgrad=amsgrad, maximize=maximize, inv_scale=inv_scale, clip=clip, **hyper)
            if state_dtype == torch.bfloat16:  # the op stores its states rounded
                m, v = m.to(torch.bfloat16).double(), v.to(torch.bfloat16).double()
                vmax = vmax.to(torch.bfloat16).double() if amsgrad else None
            if not master and param_dtype == torch.bfloat16:
                p = ps[i].double() if stochastic else p.to(torch.bfloat16).double()
            ref[i] = [p, None, m, v, vmax, step]

    # fp32 math on fp32 values: ~1e-6 after 2 steps; bf16 storage: bf16 precision. With bf16
    # states an fp32 param inherits a bf16 rounding of m or v in the later steps: ~lr * 2^-8.
    state_rel = 1e-5 if state_dtype == torch.float32 else 2e-2
    param_rel = 1e-5 if (param_dtype == torch.float32 or master) else 2e-2
    if state_dtype == torch.bfloat16:
        param_rel = max(param_rel, 1e-4)
    for i, n in enumerate(SIZES):
        p, _, m, v, vmax, step = ref[i]
        assert steps[i].item() == step, f"step[{i}]"
        if master:
            assert_close(masters[i], p, rel=param_rel, name=f"master[{i}] (n={n})")
            assert torch.equal(ps[i], masters[i].to(param_dtype)), f"param[{i}] != rounded master"
        elif not stochastic:
            assert_close(ps[i], p, rel=param_rel, name=f"param[{i}] (n={n})")
        assert_close(ms[i], m, rel=state_rel, name=f"exp_avg[{i}] (n={n})")
        assert_close(vs[i], v, rel=state_rel, name=f"exp_avg_sq[{i}] (n={n})")
        if amsgrad:
            assert_close(vmaxs[i], vmax, rel=state_rel, name=f"max_exp_avg_sq[{i}] (n={n})")


def test_adamw_cpu_stochastic_rounding_is_unbiased(ext):
    # Every element starts at the same bf16 value and gets the same update: the results must be
    # the two bf16 neighbours of the exact result, in proportion to the distance.
    n = 100003
    p0 = 1.0
    ps = [torch.full((n,), p0, dtype=torch.bfloat16)]
    grads = [torch.full((n,), 1.0, dtype=torch.bfloat16)]
    ms, vs = [torch.zeros(n)], [torch.zeros(n)]
    steps = [torch.zeros(())]
    lr = 1e-3  # first step: update = -lr * m/(sqrt(v)+eps) ~ -lr, well below a bf16 ulp (2^-7)
    torch.ops.fasttrain.adamw_cpu_(ps, grads, ms, vs, [], [], steps, lr, 0.9, 0.999, 1e-8, 0.0,
                                   True, False, False, True, 42, None, None, None)
    exact = p0 - lr / (1 + 1e-8)
    down, up = 1.0 - 2.0 ** -8, 1.0  # the bf16 neighbours of 0.999
    result = ps[0].double()
    assert bool(((result == down) | (result == up)).all())
    frac_up = (result == up).double().mean().item()
    expected = (exact - down) / (up - down)
    assert abs(frac_up - expected) < 0.01, (frac_up, expected)
    # Reproducible for a given seed and step; another seed gives other noise.
    again = [torch.full((n,), p0, dtype=torch.bfloat16)]
    torch.ops.fasttrain.adamw_cpu_(again, grads, [torch.zeros(n)], [torch.zeros(n)], [], [],
                                   [torch.zeros(())], lr, 0.9, 0.999, 1e-8, 0.0, True, False,
                                   False, True, 42, None, None, None)
    assert torch.equal(again[0], ps[0])
    other = [torch.full((n,), p0, dtype=torch.bfloat16)]
    torch.ops.fasttrain.adamw_cpu_(other, grads, [torch.zeros(n)], [torch.zeros(n)], [], [],
                                   [torch.zeros(())], lr, 0.9, 0.999, 1e-8, 0.0, True, False,
                                   False, True, 43, None, None, None)
    assert not torch.equal(other[0], ps[0])


def _fp32_group(gen):
    ps = [torch.randn(n, generator=gen) for n in SIZES]
    return (ps, [torch.randn(n, generator=gen) for n in SIZES],
            [torch.zeros(n) for n in SIZES], [torch.zeros(n) for n in SIZES],
            [torch.zeros(()) for _ in SIZES])


def test_adamw_cpu_found_inf_skips_everything(ext):
    ps, gs, ms, vs, steps = _fp32_group(torch.Generator().manual_seed(0))
    before = [t.clone() for t in ps + ms + vs + steps]
    args = (1e-3, 0.9, 0.999, 1e-8, 0.1, True, False, False, False, 0, torch.tensor(0.5))
    torch.ops.fasttrain.adamw_cpu_(ps, gs, ms, vs, [], [], steps, *args, torch.tensor([1.0]),
                                   None)
    for a, b in zip(ps + ms + vs + steps, before):
        assert torch.equal(a, b)
    torch.ops.fasttrain.adamw_cpu_(ps, gs, ms, vs, [], [], steps, *args, torch.tensor(0.0),
                                   None)
    assert all(s.item() == 1.0 for s in steps)
    assert not torch.equal(ps[-1], before[len(SIZES) - 1])


def test_adamw_cpu_matches_torch_fused_adamw_bitwise(ext):
    # torch's fused CPU AdamW computes the same fp32 formula with IEEE sqrt: params and first
    # moments agree bit for bit (torch's foreach=False path differs by ~1 ulp because its CPU
    # sqrt is not correctly rounded).
    gen = torch.Generator().manual_seed(3)
    ps, _, ms, vs, steps = _fp32_group(gen)
    params = [torch.nn.Parameter(p.clone()) for p in ps]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
    for _ in range(5):
        gs = [torch.randn(n, generator=gen) for n in SIZES]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        torch.ops.fasttrain.adamw_cpu_(ps, gs, ms, vs, [], [], steps, 1e-2, 0.9, 0.99, 1e-8, 0.1,
                                       True, False, False, False, 0, None, None, None)
    for i, p in enumerate(params):
        assert torch.equal(ps[i], p.detach()), f"param[{i}]"
        assert torch.equal(ms[i], opt.state[p]["exp_avg"]), f"exp_avg[{i}]"
        assert_close(vs[i], opt.state[p]["exp_avg_sq"], rel=1e-6, name=f"exp_avg_sq[{i}]")


def test_adamw_cpu_does_not_depend_on_thread_count(ext):
    results = []
    for threads in (1, 2):
        ps, gs, ms, vs, steps = _fp32_group(torch.Generator().manual_seed(5))
        ps = [p.bfloat16() for p in ps]
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.ops.fasttrain.adamw_cpu_(ps, gs, ms, vs, [], [], steps, 1e-2, 0.9, 0.99, 1e-8,
                                           0.1, True, False, False, True, 3, None, None, None)
        finally:
            torch.set_num_threads(old)
        results.append(ps + ms + vs)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_adamw_cpu_checks_before_touching_memory(ext):
    ps, gs, ms, vs, steps = _fp32_group(torch.Generator().manual_seed(0))
    args = (1e-3, 0.9, 0.999, 1e-8, 0.0, True, False, False, False, 0, None, None, None)
    op = torch.ops.fasttrain.adamw_cpu_
    bad_cases = {
        "grads": (ps, gs[:-1], ms, vs, [], [], steps),
        "numel": (ps, gs[:-1] + [torch.randn(3)], ms, vs, [], [], steps),
        "dtype": (ps, gs, ms[:-1] + [ms[-1].double()], vs, [], [], steps),
        "contiguous": (ps, gs[:-1] + [torch.randn(2 * SIZES[-1])[::2]], ms, vs, [], [], steps),
        "masters": (ps, gs, ms, vs, [], [ps[0].clone()], steps),
        "max_exp_avg_sqs": (ps, gs, ms, vs, [v.clone() for v in vs], [], steps),
        "steps": (ps, gs, ms, vs, [], [], steps[:-1] + [torch.zeros((), dtype=torch.float64)]),
        "param dtype": (ps[:-1] + [ps[-1].half()], gs, ms, vs, [], [], steps),
    }
    for what, lists in bad_cases.items():
        with pytest.raises(RuntimeError):
            op(*lists, *args)
        assert all(s.item() == 0 for s in steps), f"{what}: steps changed before the check"
    with pytest.raises(RuntimeError, match="inv_scale"):
        op(ps, gs, ms, vs, [], [], steps, *args[:-3], torch.tensor(1.0, dtype=torch.float64),
           None, None)
    op([], [], [], [], [], [], [], *args)  # an empty group is a no-op


def test_adamw_cpu_names_the_first_misfit_of_many(ext):
    # Thousands of tensors are checked by both threads: the error still names the first misfit,
    # and nothing was updated.
    n = 3000
    gen = torch.Generator().manual_seed(2)
    ps, gs, ms, vs = ([torch.randn(5, generator=gen) for _ in range(n)] for _ in range(4))
    steps = [torch.zeros(()) for _ in range(n)]
    gs[2100], gs[1700] = torch.randn(4), torch.randn(6)
    before = [p.clone() for p in ps]
    args = (1e-3, 0.9, 0.999, 1e-8, 0.0, True, False, False, False, 0, None, None, None)
    for fn in (torch.ops.fasttrain.adamw_cpu_, ext.adamw_cpu_):
        with pytest.raises(RuntimeError, match=r"grads\[1700\] has 6 elements"):
            fn(ps, gs, ms, vs, [], [], steps, *args)
    assert all(s.item() == 0 for s in steps)
    assert all(torch.equal(a, b) for a, b in zip(ps, before))


def test_direct_binding_updates_inference_tensors(ext):
    # As torch's optimizers (and torch.autograd.graph.increment_version): tensors made under
    # inference_mode have no version counter to bump, in inference mode or out of it.
    with torch.inference_mode():
        p, g = torch.randn(7), torch.randn(7)
    for inference in (True, False):
        m, v, step = torch.zeros(7), torch.zeros(7), torch.zeros(())
        with torch.inference_mode(inference):
            ext.adamw_cpu_([p], [g], [m], [v], [], [], [step], 1e-3, 0.9, 0.999, 1e-8, 0.0,
                           True, False, False, False, 0, None, None, None)
        assert step.item() == 1 and m._version == 1 and not torch.equal(m, torch.zeros(7))


def test_grads_of_reads_grad_as_python_does(ext):
    class Marked(torch.Tensor):  # a subclass may define .grad: read through Python
        @property
        def grad(self):
            return "marked"

    with_grad = torch.nn.Parameter(torch.randn(3))
    with_grad.grad = torch.randn(3)
    plain = torch.randn(2, requires_grad=True)
    plain.sum().backward()  # a grad made by autograd, not yet seen from Python
    params = [with_grad, torch.nn.Parameter(torch.randn(4)), plain,
              torch.randn(2).as_subclass(Marked)]
    got = ext.grads_of(params)
    assert got[0] is with_grad.grad and got[1] is None and got[2] is plain.grad
    assert got[3] == "marked"
    assert ext.grads_of(tuple(params[:2]))[0] is with_grad.grad
    with pytest.raises(TypeError, match="params"):
        ext.grads_of(3)

    class Shrinking(torch.Tensor):  # a .grad that empties the list being read
        @property
        def grad(self):
            params.clear()
            params.extend([object()] * 3)
            return None

    params = [torch.randn(2).as_subclass(Shrinking), with_grad, with_grad]
    with pytest.raises(AttributeError, match="grad"):  # as a Python loop over the list
        ext.grads_of(params)

    nonleaf = with_grad * 2
    with pytest.warns(UserWarning, match="not a leaf"):  # Python's warning, as .grad's
        assert ext.grads_of([nonleaf]) == [None]


def test_the_optimizer_reads_grads_through_an_active_torch_function_mode():
    from torch.overrides import TorchFunctionMode

    from fasttrain.optim import adamw

    class Intercept(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func == torch.Tensor.grad.__get__:
                return "intercepted"
            return func(*args, **(kwargs or {}))

    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    assert adamw._grads_of([p])[0] is p.grad
    with Intercept():
        assert adamw._grads_of([p]) == ["intercepted"]


def test_direct_binding_refuses_subclasses_that_live_in_python(ext):
    ps, gs, ms, vs = ([torch.randn(4)] for _ in range(4))
    gs = [WrapperTensor(torch.randn(4))]
    with pytest.raises(TypeError, match=r"grads\[0\] is a WrapperTensor"):
        ext.adamw_cpu_(ps, gs, ms, vs, [], [], [torch.zeros(())], 1e-3, 0.9, 0.999, 1e-8, 0.0,
                       True, False, False, False, 0, None, None, None)
    # a check that only reads metadata: not for a kernel, but a fit for the torch path
    assert not ext.grads_fit(gs, torch.float32, True) and ext.grads_fit(gs, torch.float32, False)


def test_direct_binding_matches_the_op(ext):
    # The module's pybind11 entry points (no dispatcher) run the same kernels as the ops.
    gen = torch.Generator().manual_seed(11)
    a = _fp32_group(gen)
    b = tuple([t.clone() for t in lst] for lst in a)
    args = (1e-2, 0.9, 0.99, 1e-8, 0.1, False, True, True, False, 0, torch.tensor(0.5), None,
            torch.tensor(0.75))
    for _ in range(2):
        torch.ops.fasttrain.adamw_cpu_(a[0], a[1], a[2], a[3], [v.clone() for v in a[3]], [],
                                       a[4], *args)
        ext.adamw_cpu_(b[0], b[1], b[2], b[3], tuple(v.clone() for v in b[3]), [], b[4], *args)
    for x, y in zip(sum(a, []), sum(b, [])):
        assert torch.equal(x, y)
    assert torch.equal(ext.sum_sq_cpu(a[1]), torch.ops.fasttrain.sum_sq_cpu(a[1]))
    with pytest.raises(TypeError, match="grads"):
        ext.adamw_cpu_(b[0], [1.0] * len(SIZES), b[2], b[3], [], [], b[4], *args)
    with pytest.raises(RuntimeError, match="exp_avgs"):
        ext.adamw_cpu_(b[0], b[1], b[2][:-1], b[3], [], [], b[4], *args)


# ------------------------------------------------------------------------------- sum of squares
def test_sum_sq_cpu_matches_torch(ext):
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=gen) for n in SIZES]
    tensors += [torch.randn(n, generator=gen).bfloat16() for n in (3, 40000)]
    tensors.append(torch.empty(0))
    tensors.append(torch.randn(7, generator=gen) * 1e20)  # squares past the fp32 range
    expected = sum(t.double().square().sum() for t in tensors)
    out = torch.ops.fasttrain.sum_sq_cpu(tensors)
    assert out.dtype == torch.float64 and out.dim() == 0
    assert out.item() == pytest.approx(expected.item(), rel=1e-12)
    assert torch.ops.fasttrain.sum_sq_cpu([]).item() == 0.0
    # Same bits whatever the number of threads.
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fasttrain.sum_sq_cpu(tensors)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, out)


def test_ops_trace_with_fake_tensors_and_survive_dead_code_elimination(ext):
    """opcheck's schema and FakeTensor checks, torch.compile of sum_sq_cpu, and FX DCE keeping
    the CUDA step (it writes through its table's pointers: no mutation in its schema)."""
    params = [torch.randn(5), torch.randn(3)]
    adamw_args = (params, [torch.randn_like(p) for p in params],
                  [torch.rand_like(p) for p in params], [torch.rand_like(p) for p in params],
                  [], [], [torch.zeros(()) for _ in params], 1e-3, 0.9, 0.999, 1e-8, 0.0, True,
                  False, False, False, 0, None, None, None)
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.fasttrain.adamw_cpu_.default, adamw_args, test_utils=checks)
    torch.library.opcheck(torch.ops.fasttrain.sum_sq_cpu.default, ([torch.randn(4)],),
                          test_utils=checks)
    x = torch.randn(6)
    compiled = torch.compile(lambda ts: torch.ops.fasttrain.sum_sq_cpu(ts).sqrt(),
                             fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled([x]), x.double().norm())

    def cuda_step(table):
        torch.ops.fasttrain.adamw_cuda_(table, 1, 1, 65536, 1e-3, None, 0.9, 0.999, 1e-8, 0.0,
                                        torch.float32, torch.float32, torch.float32, True,
                                        False, False, False, None, None, None)
        return table

    graph = torch.fx.symbolic_trace(cuda_step).graph
    graph.eliminate_dead_code()
    assert any("fasttrain.adamw_cuda_" in str(n.target) for n in graph.nodes)


def test_cuda_kernels_need_an_architecture_and_the_cache_key_names_it(monkeypatch):
    """A CUDA torch with a toolkit but no visible GPU and no TORCH_CUDA_ARCH_LIST builds the CPU
    kernels alone (torch's arch flags failed on the empty GPU list, taking the CPU kernels too);
    builds for other GPU architectures or other CPUs (x86 flags, Arm features) get other cache
    folders."""
    import pathlib

    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert not _ext_sources.want_cuda()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert _ext_sources.want_cuda()
    sm90 = _ext.jit_build_dir()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert _ext.jit_build_dir() != sm90

    cpus = {"graviton2": "processor\t: 0\nFeatures\t: fp asimd evtstrm aes\nCPU part\t: 0xd0c\n",
            "graviton3": "processor\t: 0\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n"}
    read_text = pathlib.Path.read_text
    tags = {}
    for name, text in cpus.items():
        monkeypatch.setattr(pathlib.Path, "read_text", lambda self, *a, text=text, **k: (
            text if str(self) == "/proc/cpuinfo" else read_text(self, *a, **k)))
        tags[name] = _ext_sources.machine_tag(False)
    assert tags["graviton2"] != tags["graviton3"]


def test_a_prebuilt_module_from_other_sources_is_refused(monkeypatch):
    """FASTTRAIN_BUILD_EXT=1 builds record the fingerprint of their sources and flags; an
    editable install whose csrc/ changed since is an error that says to rebuild, not a silent
    run of old kernels."""
    import importlib.util
    import types

    import fasttrain

    expected = _ext_sources.fingerprint(_ext_sources.csrc_dir(), False)
    fake = types.SimpleNamespace(torch_build=lambda: torch.__version__,
                                 torch_version=lambda: torch.__version__.split("+")[0],
                                 has_cuda=lambda: False, sources_key=lambda: "0123456789abcdef")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        object() if name == "fasttrain._C" else find_spec(name, *a)))
    monkeypatch.setitem(sys.modules, "fasttrain._C", fake)
    monkeypatch.setattr(fasttrain, "_C", fake, raising=False)
    with pytest.raises(RuntimeError, match="built from other sources"):
        _ext._try_prebuilt()
    fake.sources_key = lambda: expected
    assert _ext._try_prebuilt() == (fake, None)
