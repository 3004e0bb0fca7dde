"""fasttrain.ops.lora_linear / lora_linear_multi, LoRALinear and the peft integration.

Every check compares with the torch reference in float64 given the same dropout mask: forward
and every gradient. Low precision: the fused error must be at most 2x the error of the same
computation done by torch in that dtype, plus a floor of one unit of the dtype's precision
(relative to the largest element). CPU runs the Triton kernels under the interpreter at small
sizes; the ``gpu`` tests run the same bodies at real sizes.
"""
import importlib.util
import math

import pytest
import torch
from torch import nn

from fasttrain import _backend
from fasttrain.kernels import lora as kernels
from fasttrain.nn import LoRALinear
from fasttrain.ops import lora as ops
from fasttrain.ops import lora_linear, lora_linear_multi, lora_linear_reference
from tests.helpers import assert_close, rel_max_diff

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: torch.finfo(torch.float16).eps,
         torch.bfloat16: torch.finfo(torch.bfloat16).eps}
HAS_PEFT = importlib.util.find_spec("peft") is not None


@pytest.fixture
def fixed_seed(monkeypatch):
    """lora_linear draws its dropout seed from here: a known seed lets the test rebuild the
    mask (kernels.dropout_keep_mask) for the reference."""
    seeds = []

    def seed(dropout_p, device):
        if dropout_p == 0:
            return None
        seeds.append(torch.tensor([1234 + len(seeds)], dtype=torch.int64, device=device))
        return seeds[-1]
    monkeypatch.setattr(ops, "_seed", seed)
    return seeds


def _randn(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, device=device) * scale).to(dtype)


def _inputs(device, dtype, lead, K, N, r, *, bias, n_adapters=None, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    a_shape = (r, K) if n_adapters is None else (n_adapters, r, K)
    b_shape = (N, r) if n_adapters is None else (n_adapters, N, r)
    t = dict(x=_randn((*lead, K), dtype, device, gen),
             weight=_randn((N, K), dtype, device, gen, K ** -0.5),
             bias=_randn((N,), dtype, device, gen) if bias else None,
             lora_A=_randn(a_shape, dtype, device, gen, K ** -0.5),
             lora_B=_randn(b_shape, dtype, device, gen, r ** -0.5))
    dy = _randn((*lead, N), dtype, device, gen)
    return t, dy


def _grads(fn, tensors, dy, trainable):
    """(output, {name: grad}) of fn(**leaves) with the given names requiring grad."""
    leaves = {k: (v.detach().requires_grad_(k in trainable) if v is not None else None)
              for k, v in tensors.items()}
    out = fn(**leaves)
    out.backward(dy)
    return out.detach(), {k: leaves[k].grad for k in trainable}


def _check(fused, ref64, same_dtype, dtype, name):
    tol = 2 * rel_max_diff(same_dtype, ref64) + FLOOR[dtype]
    assert_close(fused, ref64, rel=tol, name=f"{name} ({dtype})")


def check_lora(device, dtype, lead, K, N, r, *, bias=True, weight_grad=False, dropout_p=0.0,
               n_adapters=None, seeds=None):
    """fasttrain vs the float64 reference (and torch in ``dtype``), forward and gradients."""
    t, dy = _inputs(device, dtype, lead, K, N, r, bias=bias, n_adapters=n_adapters)
    trainable = ["x", "lora_A", "lora_B"] + (["weight"] if weight_grad else []) \
        + (["bias"] if bias and weight_grad else [])
    scaling = 1.7
    if n_adapters is None:
        def fused(**a):
            return lora_linear(**a, scaling=scaling, dropout_p=dropout_p)
        ref = lora_linear_reference
    else:
        index = torch.randint(-1, n_adapters, lead, generator=torch.Generator().manual_seed(1))
        index = index.to(device)
        assert (index >= 0).any() and (index < 0).any() or index.numel() < 4

        def fused(**a):
            return lora_linear_multi(**a, adapter_index=index, scaling=scaling,
                                     dropout_p=dropout_p)

        def ref(*args, **kw):
            return ops.lora_linear_multi_reference(*args[:5], index, *args[5:], **kw)
    y, g = _grads(fused, t, dy, trainable)
    mask = None
    if dropout_p > 0:
        (seed,) = seeds[-1:]
        mask = kernels.dropout_keep_mask(seed, (math.prod(lead), K), dropout_p, device)
        mask = mask.reshape(*lead, K)

    def reference(upcast_to):
        def fn(**a):
            a = {k: (v.to(upcast_to) if v is not None else None) for k, v in a.items()}
            return ref(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], scaling,
                       dropout_p, dropout_mask=mask)
        return fn
    y64, g64 = _grads(reference(torch.float64), t, dy.double(), trainable)
    y_same, g_same = _grads(reference(dtype), t, dy, trainable)
    _check(y, y64, y_same, dtype, "y")
    for name in trainable:
        _check(g[name], g64[name], g_same[name], dtype, f"d{name}")


# --- single adapter -------------------------------------------------------------------------

SHAPES = [((1,), 40, 24, 1), ((17,), 70, 45, 8), ((3, 6), 33, 50, 16), ((1000,), 72, 40, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N,r", SHAPES)
@pytest.mark.parametrize("bias,weight_grad", [(True, False), (False, True)],
                         ids=["bias-frozenW", "nobias-trainW"])
def test_lora_linear_matches_reference(dtype, lead, K, N, r, bias, weight_grad):
    check_lora("cpu", dtype, lead, K, N, r, bias=bias, weight_grad=weight_grad)


def test_autotuning_inside_a_cuda_graph_capture_is_a_clear_error(monkeypatch):
    """Sizes launched before capture run (tuned already); new ones would be tuned inside it,
    which a capture cannot hold (here the capture is faked on CPU tensors)."""
    x, w = torch.randn(37, 48), torch.randn(40, 48)
    a, b = torch.randn(4, 48), torch.randn(40, 4)
    eager = ops.lora_linear(x, w, None, a, b, 2.0, backend="triton")
    monkeypatch.setattr(kernels, "_capturing", lambda device: True)
    torch.testing.assert_close(ops.lora_linear(x, w, None, a, b, 2.0, backend="triton"), eager)
    with pytest.raises(RuntimeError, match="never run for these sizes .* before this CUDA graph"):
        ops.lora_linear(x[:, :40], w[:, :40], None, a[:, :40], b, 2.0, backend="triton")


@pytest.mark.gpu
def test_lora_forward_in_a_cuda_graph():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(384, 256, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    a = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    b = torch.randn(384, 8, device="cuda", dtype=torch.bfloat16, generator=g) * 0.05
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning
        eager = ops.lora_linear(x, w, None, a, b, 2.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.lora_linear(x, w, None, a, b, 2.0)
    x.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=g))
    graph.replay()
    torch.testing.assert_close(out, ops.lora_linear(x, w, None, a, b, 2.0))
    assert not torch.equal(out, eager)
    with pytest.raises(RuntimeError, match="never run for these sizes"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            ops.lora_linear(x[:, :128], w[:, :128], None, a[:, :128], b, 2.0)


def test_zero_in_features():
    # nn.Linear(0, N) is legal: y is the bias, every gradient is empty or zero (the rows of x
    # cannot be inferred from reshape(-1, 0))
    for backend in ("torch", "triton"):
        x = torch.randn(2, 4, 0, requires_grad=True)
        w, b = torch.randn(3, 0), torch.randn(3)
        a, bb = torch.randn(2, 0, requires_grad=True), torch.randn(3, 2, requires_grad=True)
        y = ops.lora_linear(x, w, b, a, bb, 2.0, backend=backend)
        y.sum().backward()
        assert torch.equal(y, b.expand(2, 4, 3)), backend
        assert x.grad.shape == x.shape and a.grad.shape == a.shape
        assert torch.equal(bb.grad, torch.zeros_like(bb)), backend
        index = torch.zeros(2, 4, dtype=torch.int64)
        y = ops.lora_linear_multi(x, w, b, a[None], bb[None], index, 2.0, backend=backend)
        assert torch.equal(y, b.expand(2, 4, 3)), backend


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N,r", [((17,), 70, 45, 8), ((130,), 100, 60, 16)])
def test_lora_linear_dropout_matches_reference_with_same_mask(dtype, lead, K, N, r, fixed_seed):
    # The reference gets the mask the kernels draw from the seed; forward (s) and backward
    # (dx, dA) each regenerate it, so matching every gradient shows they use the same mask.
    check_lora("cpu", dtype, lead, K, N, r, bias=True, weight_grad=True, dropout_p=0.3,
               seeds=fixed_seed)


def test_dropout_mask_keep_ratio_and_seeds():
    p, shape = 0.3, (300, 257)
    seed = torch.tensor([7])
    keep = kernels.dropout_keep_mask(seed, shape, p, "cpu")
    n = keep.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma
    assert torch.equal(keep, kernels.dropout_keep_mask(seed, shape, p, "cpu"))
    other = kernels.dropout_keep_mask(torch.tensor([8]), shape, p, "cpu")
    assert (keep != other).float().mean().item() > 0.25  # independent masks: 2p(1-p) = 0.42


def test_dropout_draws_from_torch_generator():
    t, _ = _inputs("cpu", torch.float32, (20,), 48, 32, 8, bias=False)
    ys = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        ys.append(lora_linear(**t, scaling=2.0, dropout_p=0.5))
    no_dropout = lora_linear(**t, scaling=2.0)
    assert torch.equal(ys[0], ys[1])
    assert not torch.equal(ys[0], ys[2])
    assert not torch.equal(ys[0], no_dropout)


# --- several adapters -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lead,K,N,r,n_adapters,dropout_p",
                         [((37,), 50, 40, 4, 3, 0.0), ((5, 20), 64, 70, 8, 4, 0.2)])
def test_lora_linear_multi_matches_reference(dtype, lead, K, N, r, n_adapters, dropout_p,
                                             fixed_seed):
    check_lora("cpu", dtype, lead, K, N, r, bias=True, weight_grad=False, dropout_p=dropout_p,
               n_adapters=n_adapters, seeds=fixed_seed)


def test_multi_with_one_adapter_equals_single():
    t, _ = _inputs("cpu", torch.float32, (19,), 40, 30, 8, bias=True)
    multi = dict(t, lora_A=t["lora_A"][None], lora_B=t["lora_B"][None])
    index = torch.zeros(19, dtype=torch.int32)
    y = lora_linear_multi(**multi, adapter_index=index, scaling=0.5)
    assert_close(y, lora_linear(**t, scaling=0.5), rel=1e-6, name="y")


@pytest.mark.parametrize("backend", ["torch", "triton"] if _backend.interpret_mode() else ["torch"])
def test_multi_an_adapter_no_row_selects_does_not_reach_the_rows(backend):
    """fp16: an adapter whose products overflow, selected by no row, left every row NaN on the
    torch path (it multiplied each adapter's whole term by a 0/1 row mask: 0 * inf); now the
    rows equal the per-row definition (only the selected adapter), outputs and x's gradient."""
    gen = torch.Generator().manual_seed(0)
    M, K, N, r = 37, 24, 40, 4
    x = torch.randn(M, K, generator=gen)
    w, b = torch.randn(N, K, generator=gen) * 0.2, torch.randn(N, generator=gen)
    A, B = torch.randn(2, r, K, generator=gen) * 0.2, torch.randn(2, N, r, generator=gen) * 0.5
    A[1] *= 300
    B[1] *= 300  # adapter 1's x A^T B^T passes fp16's 65504
    index = torch.where(torch.arange(M) % 2 == 0, 0, -1)  # adapter 0 or none
    x64 = x.half().double().requires_grad_()
    lora = (x64 @ A[0].half().double().t()) @ B[0].half().double().t() * 2.0
    ref = x64 @ w.half().double().t() + b.half().double() + (index == 0)[:, None] * lora
    ref.sum().backward()
    xh = x.half().requires_grad_()
    y = lora_linear_multi(xh, w.half(), b.half(), A.half(), B.half(), index, 2.0, backend=backend)
    y.float().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(xh.grad).all()
    assert_close(y, ref, rel=1e-2, name="y")
    assert_close(xh.grad, x64.grad, rel=1e-2, name="dx")


def test_multi_with_a_strided_or_expanded_index():
    t, _ = _inputs("cpu", torch.float32, (12,), 40, 30, 8, bias=True)
    gen = torch.Generator().manual_seed(3)
    multi = dict(t, lora_A=torch.randn(3, 8, 40, generator=gen),
                 lora_B=torch.randn(3, 30, 8, generator=gen))
    for index in (torch.randint(0, 3, (24,), generator=gen)[::2],  # stride 2
                  torch.tensor(2).expand(12)):  # stride 0
        y = lora_linear_multi(**multi, adapter_index=index, scaling=0.5)
        expected = lora_linear_multi(**multi, adapter_index=index.contiguous(), scaling=0.5,
                                     backend="torch")
        assert_close(y, expected, rel=1e-5, name="y")


def test_strided_operands_match_contiguous():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(13, 2 * 40, generator=gen)[:, ::2]  # column stride 2
    weight = torch.randn(40, 30, generator=gen).t()  # (30, 40), transposed
    bias = torch.randn(60, generator=gen)[::2]  # stride 2
    a, b = torch.randn(40, 8, generator=gen).t(), torch.randn(8, 30, generator=gen).t()
    dy = torch.randn(13, 30, generator=gen)
    got = _grads(lambda **t: lora_linear(**t, scaling=0.5),
                 dict(x=x, weight=weight, bias=bias, lora_A=a, lora_B=b), dy, ["x", "lora_A"])
    expected = _grads(lambda **t: lora_linear(**t, scaling=0.5, backend="torch"),
                      dict(x=x.contiguous(), weight=weight.contiguous(), bias=bias.contiguous(),
                           lora_A=a.contiguous(), lora_B=b.contiguous()), dy, ["x", "lora_A"])
    assert_close(got[0], expected[0], rel=1e-5, name="y")
    for name in ("x", "lora_A"):
        assert_close(got[1][name], expected[1][name], rel=1e-5, name=f"d{name}")


def test_autocast_computes_in_the_autocast_dtype():
    t, _ = _inputs("cpu", torch.float32, (9,), 32, 24, 8, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(**t, scaling=0.5)
        expected = lora_linear(**t, scaling=0.5, backend="torch")
    assert y.dtype == torch.bfloat16 == expected.dtype
    assert_close(y, expected, rel=1e-2, name="y")


# --- validation, backends -------------------------------------------------------------------

def _bad(**changes):
    t, _ = _inputs("cpu", torch.float32, (4,), 16, 12, 4, bias=True)
    t.update(scaling=1.0)
    t.update(changes)
    return t


@pytest.mark.parametrize("changes,error,match", [
    (dict(x=torch.randn(4, 15)), ValueError, "x's last dim"),
    (dict(weight=torch.randn(12, 16, 1)), ValueError, "weight"),
    (dict(bias=torch.randn(11)), ValueError, "bias"),
    (dict(lora_A=torch.randn(4, 15)), ValueError, "lora_A"),
    (dict(lora_B=torch.randn(12, 5)), ValueError, "lora_B.*rank r=4"),
    (dict(lora_B=torch.randn(12, 4, dtype=torch.float64)), TypeError, "lora_B.*dtype"),
    (dict(x=torch.randn(4, 16).half()), TypeError, "weight.*dtype"),
    (dict(x=torch.randint(0, 3, (4, 16))), TypeError, "x must be float32"),
    (dict(lora_A=torch.randn(4, 16, device="meta")), ValueError, "lora_A.*device"),
    (dict(scaling=float("nan")), TypeError, "scaling"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(weight=[[1.0]]), TypeError, "weight must be a torch.Tensor"),
])
def test_validation_errors(changes, error, match):
    with pytest.raises(error, match=match):
        lora_linear(**_bad(**changes))


def test_numpy_scalars_are_numbers():
    import numpy as np

    t = _bad()
    expected = lora_linear(**t)
    for kind in (np.float32, np.float64, np.int64):
        t.update(scaling=kind(1.0), dropout_p=kind(0))
        torch.testing.assert_close(lora_linear(**t), expected)


def test_multi_validation_errors():
    t = _bad(lora_A=torch.randn(2, 4, 16), lora_B=torch.randn(2, 12, 4))
    with pytest.raises(TypeError, match="adapter_index"):
        lora_linear_multi(**t, adapter_index=torch.zeros(4))
    with pytest.raises(ValueError, match="adapter_index"):
        lora_linear_multi(**t, adapter_index=torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="lora_B"):
        lora_linear_multi(**dict(t, lora_B=torch.randn(3, 12, 4)),
                          adapter_index=torch.zeros(4, dtype=torch.int64))


def test_backends(monkeypatch):
    t = _bad()
    ref = lora_linear_reference(**t)
    assert_close(lora_linear(**t, backend="torch"), ref, rel=1e-6, name="torch backend")
    assert_close(lora_linear(**t, backend="triton"), ref, rel=1e-5, name="triton backend")
    with pytest.raises(ValueError, match="backends are 'triton' and 'torch'"):
        lora_linear(**t, backend="cuda")
    for forced in ("cuda", "cpu"):  # global: AdamW's C++ kernels; LoRA runs on regardless
        monkeypatch.setenv("FASTTRAIN_BACKEND", forced)
        assert_close(lora_linear(**t), ref, rel=1e-5, name=f"FASTTRAIN_BACKEND={forced}")
    monkeypatch.delenv("FASTTRAIN_BACKEND")
    monkeypatch.setattr(_backend, "triton_unavailable_reason", lambda device: "no reason here")
    with pytest.raises(RuntimeError, match="no reason here"):
        lora_linear(**t, backend="triton")
    monkeypatch.setattr(_backend, "_logged", set())
    with pytest.warns(UserWarning, match="lora.*torch reference"):
        y = lora_linear(**t)
    assert_close(y, ref, rel=1e-6, name="fallback")


# --- torch.library ----------------------------------------------------------------------------

def test_opcheck():
    t, dy = _inputs("cpu", torch.float32, (20,), 40, 24, 8, bias=True)
    args = [t["x"].requires_grad_(), t["weight"], t["bias"], t["lora_A"].requires_grad_(),
            t["lora_B"].requires_grad_()]
    seed = torch.tensor([5])
    index = torch.randint(-1, 2, (20,))
    a_cat = torch.randn(16, 40, requires_grad=True)
    b_cat = torch.randn(24, 16, requires_grad=True)
    for call in ((*args, None, None, 0.5, 0.0, 8), (*args, seed, None, 0.5, 0.25, 8),
                 (args[0], args[1], None, a_cat, b_cat, seed, index, 2.0, 0.1, 8)):
        torch.library.opcheck(torch.ops.fasttrain.lora_linear_fwd.default, call)
    x, w, _, a, b = (v.detach() for v in args)
    s = torch.randn(20, 8)
    for need_dx in (True, False):
        torch.library.opcheck(torch.ops.fasttrain.lora_linear_bwd.default,
                              (dy, x, w, a, b, s, seed, None, 0.5, 0.25, 8, need_dx))
    # transposed (non-contiguous) adapters: the fake's strides must match the real op's
    torch.library.opcheck(torch.ops.fasttrain.lora_linear_bwd.default,
                          (dy, x, w, a.t().contiguous().t(), b.t().contiguous().t(), s, seed,
                           None, 0.5, 0.25, 8, True))


def test_torch_compile_fullgraph_module():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(48, 40), r=8, lora_alpha=16, init_lora_weights=False)
    model = nn.Sequential(layer, nn.GELU())
    x = torch.randn(2, 9, 48, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    got = [x.grad, layer.lora_A.grad, layer.lora_B.grad]
    x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    y_eager = model(x)
    y_eager.square().sum().backward()
    assert_close(y, y_eager, rel=1e-6, name="y")
    for name, g, e in zip(("dx", "dA", "dB"), got, (x.grad, layer.lora_A.grad,
                                                     layer.lora_B.grad)):
        assert_close(g, e, rel=1e-6, name=name)


# --- LoRALinear -------------------------------------------------------------------------------

def test_lora_linear_module_merge_and_scaling():
    torch.manual_seed(0)
    base = nn.Linear(40, 30)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True)
    assert layer.scaling == 8 / math.sqrt(4)
    assert not base.weight.requires_grad and layer.lora_A.requires_grad
    x = torch.randn(7, 40)
    layer.eval()
    assert_close(layer(x), base(x), rel=1e-6, name="B = 0 at init")
    nn.init.normal_(layer.lora_B)
    expected = base(x) + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T
    y = layer(x)
    assert_close(y, expected, rel=1e-5, name="unmerged")
    layer.merge()
    assert layer.merged and not torch.equal(base.weight, w0)
    assert_close(layer(x), y, rel=1e-5, name="merged")
    layer.unmerge()
    assert_close(base.weight, w0, rel=1e-6, name="weight after unmerge")
    layer.train()
    torch.manual_seed(3)
    y_train = layer(x)
    assert not torch.allclose(y_train, y)  # dropout on in training
    with pytest.raises(TypeError, match="base_layer"):
        LoRALinear(nn.Conv1d(3, 3, 1))


class _DoubledLinear(nn.Linear):
    """An nn.Linear whose own forward changes the output (as fake quantization does)."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_lora_linear_keeps_a_base_layer_subclass_forward():
    torch.manual_seed(0)
    base = _DoubledLinear(24, 16)
    layer = LoRALinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(5, 24, requires_grad=True)
    out = layer(x)
    expected = base(x) + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_lora_linear_runs_the_base_layers_hooks():
    """Pruning (a pre-hook that recomputes the weight) and forward hooks of the base layer run:
    the fused op would read the stale weight and skip the hooks."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    layer = LoRALinear(base, r=4, lora_alpha=8, init_lora_weights=False)
    x = torch.randn(5, 24)
    prune.l1_unstructured(base, "weight", amount=0.5)
    base.weight_orig.data.mul_(3)  # the pre-hook makes weight = weight_orig * mask again
    update = layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    torch.testing.assert_close(layer(x), base(x) + update)
    base.register_forward_hook(lambda module, args, out: out * 0)
    torch.testing.assert_close(layer(x), update)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapters_over_a_half_x_get_fp32_gradients(dtype):
    """peft's default keeps the adapters in fp32 over a half base. The op runs their products in
    x's dtype (as autocast would) and returns their gradients as the fp32 sums: as accurate as
    torch computing in x's dtype (the usual criterion), and finite where rounding them to fp16
    overflows (a sum over many rows of a GradScaler-scaled dy)."""
    t, dy = _inputs("cpu", dtype, (96,), 16, 12, 4, bias=True)
    t["lora_A"], t["lora_B"] = t["lora_A"].float(), t["lora_B"].float()
    trainable = ("x", "lora_A", "lora_B")

    def fused(**k):
        return lora_linear(**k, scaling=2.0, backend="triton")

    def in_dtype(**k):  # torch in x's dtype: the adapters cast to it
        k["lora_A"], k["lora_B"] = k["lora_A"].to(dtype), k["lora_B"].to(dtype)
        return lora_linear_reference(**k, scaling=2.0)

    y, grads = _grads(fused, t, dy, trainable)
    same_y, same_grads = _grads(in_dtype, t, dy, trainable)
    t64 = {k: (v.double() if v is not None else None) for k, v in t.items()}
    y64, grads64 = _grads(lambda **k: lora_linear_reference(**k, scaling=2.0), t64,
                          dy.double(), trainable)
    assert y.dtype == dtype and grads["lora_A"].dtype == grads["lora_B"].dtype == torch.float32
    _check(y, y64, same_y, dtype, "y")
    for name in trainable:
        _check(grads[name], grads64[name], same_grads[name], dtype, name)
    scaled = dy * 2.0 ** 10  # a loss scale: dA's sums over the 96 rows pass fp16's 65504
    (_, grads), (_, same_grads) = (_grads(f, t, scaled, ("lora_A",)) for f in (fused, in_dtype))
    assert torch.isfinite(grads["lora_A"]).all() and grads["lora_A"].abs().max() > 65504
    assert torch.isinf(same_grads["lora_A"]).any() == (dtype == torch.float16)
    with pytest.raises(TypeError, match="one dtype"):
        lora_linear(**dict(t, lora_B=t["lora_B"].to(dtype)), scaling=2.0)


def test_merge_refuses_a_recomputed_base_weight():
    from torch.nn.utils import parametrize, prune

    layer = LoRALinear(nn.Linear(24, 16), r=4, init_lora_weights=False)
    prune.l1_unstructured(layer.base_layer, "weight", amount=0.5)
    with pytest.raises(RuntimeError, match="recomputed"):
        layer.merge()
    assert not layer.merged

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    layer = LoRALinear(nn.Linear(24, 16), r=4, init_lora_weights=False)
    parametrize.register_parametrization(layer.base_layer, "weight", Doubled())
    with pytest.raises(RuntimeError, match="recomputed"):
        layer.merge()


# --- peft -------------------------------------------------------------------------------------

class _TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 40)
        self.head = nn.Linear(40, 5)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _peft_model(dropout=0.0, **config):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["fc1", "fc2"],
                     init_lora_weights=False, **config)
    return get_peft_model(_TinyMLP(), cfg)


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _output_and_grads(model, x):
    """model(x) and the gradients of a loss on it (zeroed again after)."""
    y = model(x)
    y.square().mean().backward()
    grads = _lora_grads(model)
    model.zero_grad()
    return y, grads


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_fuse_lora_same_outputs_grads_and_undo():
    from fasttrain.integrations.peft import fuse_lora

    model = _peft_model()
    x = torch.randn(3, 11, 32)
    y_peft, g_peft = _output_and_grads(model, x)

    report = fuse_lora(model)
    assert report.n_fused == 2 and report.n_not_fused == 0, report
    y, g = _output_and_grads(model, x)
    assert_close(y, y_peft, rel=1e-5, name="y")
    assert g.keys() == g_peft.keys() and len(g) == 4
    for name in g:
        assert_close(g[name], g_peft[name], rel=1e-5, name=name)

    with model.disable_adapter():  # falls back to peft's path at call time: the base model
        assert_close(model(x), model.get_base_model().head(torch.relu(
            model.get_base_model().fc2.base_layer(torch.relu(
                model.get_base_model().fc1.base_layer(x))))), rel=1e-6, name="disabled")
    layer = model.get_base_model().fc1
    layer._fasttrain_lora = ("default", None)  # the mark of a model fused by fasttrain 0.x
    assert report.undo() == 2
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert_close(model(x), y_peft, rel=1e-6, name="after undo")


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_fuse_lora_trains_with_dropout():
    from fasttrain.integrations.peft import fuse_lora, unfuse_lora

    model = _peft_model(dropout=0.1)
    assert fuse_lora(model).n_fused == 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen)
    target = torch.randn(64, 5, generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert unfuse_lora(model) == 2


def _count_fused_calls(monkeypatch):
    """A list that gets one entry per call of the fused op from the peft integration."""
    import fasttrain.integrations.peft as peft_integration

    calls, op = [], peft_integration.lora_linear
    monkeypatch.setattr(peft_integration, "lora_linear",
                        lambda *args, **kwargs: calls.append(1) or op(*args, **kwargs))
    return calls


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_fused_model_pickles_and_autocast_matches_peft(tmp_path, monkeypatch):
    from fasttrain.integrations.peft import fuse_lora

    model = _peft_model()
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    fuse_lora(model)
    calls = _count_fused_calls(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)  # fc2's input is bf16 (fc1's autocast output), its weights fp32
    assert len(calls) == 2, "a layer fell back to peft's path under autocast"
    assert y.dtype == expected.dtype == torch.bfloat16
    assert_close(y, expected, rel=2e-2, name="autocast")
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert_close(loaded(x), model(x), rel=1e-6, name="reloaded")


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_fused_layers_follow_set_adapter(monkeypatch):
    from peft import LoraConfig

    from fasttrain.integrations.peft import fuse_lora

    model = _peft_model()
    model.add_adapter("b", LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"],
                                      init_lora_weights=False))
    x = torch.randn(5, 32)
    expected = {}
    for name in ("default", "b"):
        model.set_adapter(name)
        expected[name] = model(x)
    assert not torch.allclose(expected["default"], expected["b"])
    model.set_adapter("default")
    assert fuse_lora(model).n_fused == 2
    calls = _count_fused_calls(monkeypatch)
    for name in ("b", "default"):
        model.set_adapter(name)
        assert fuse_lora(model).n_fused == 2  # a second call reports the same layers
        assert_close(model(x), expected[name], rel=1e-5, name=name)
    assert len(calls) == 4, "a fused layer fell back to peft's path after set_adapter"


def _replicate_like_data_parallel(model, scale):
    """What torch.nn.parallel.replicate does (it needs CUDA devices): a shallow replica of every
    module (``_replicate_for_data_parallel``), children wired to replicas, parameters set as
    plain tensors (here the originals times ``scale``, to tell them apart)."""
    replicas = {m: m._replicate_for_data_parallel() for m in model.modules()}
    for m, r in replicas.items():
        for key, child in m._modules.items():
            r._modules[key] = replicas.get(child)
        for key, p in m._parameters.items():
            if p is None:
                r._parameters[key] = None
            else:
                setattr(r, key, p.detach() * scale)
    return replicas[model]


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_data_parallel_replicas_of_fused_layers_use_their_own_weights(monkeypatch):
    from fasttrain.integrations.peft import fuse_lora

    model = _peft_model()
    x = torch.randn(5, 32)
    expected = _replicate_like_data_parallel(model, 2.0)(x)  # peft's path on the replica
    assert not torch.allclose(expected, model(x))
    assert fuse_lora(model).n_fused == 2
    calls = _count_fused_calls(monkeypatch)
    replica = _replicate_like_data_parallel(model, 2.0)
    torch.testing.assert_close(replica(x), expected)
    assert len(calls) == 2


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_fused_layers_keep_a_tensor_scaling_a_tensor(monkeypatch):
    """peft's prepare_model_for_compiled_hotswap makes each scaling a 0-d tensor so that a
    hotswap does not recompile: the fused forward must not read it as a Python float."""
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    from fasttrain.integrations.peft import fuse_lora

    model = _peft_model()
    prepare_model_for_compiled_hotswap(model)
    layer = model.get_base_model().fc1
    assert isinstance(layer.scaling["default"], torch.Tensor)
    x = torch.randn(5, 32)
    expected = model(x)
    assert fuse_lora(model).n_fused == 2
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)
    for m in (layer, model.get_base_model().fc2):
        m.scaling["default"].mul_(3.0)  # what a hotswap of a higher-alpha adapter writes
    with torch._dynamo.config.patch(error_on_recompile=True):
        y = compiled(x)
    with model.disable_adapter():
        base_out = model(x)
    report = fuse_lora(model)
    report.undo()  # peft's own forward, with the new scalings
    after = model(x)
    torch.testing.assert_close(y, after)
    assert not torch.allclose(after, expected) and not torch.allclose(after, base_out)


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_base_layers_with_hooks_stay_on_peft():
    from fasttrain.integrations.peft import fuse_lora

    model = _peft_model()
    model.get_base_model().fc1.base_layer.register_forward_pre_hook(lambda m, args: None)
    report = fuse_lora(model)
    assert report.fused == ["base_model.model.fc2"]
    assert "hooks" in report.not_fused["base_model.model.fc1"]


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_base_layers_with_their_own_forward_and_wrapped_layers_stay_on_peft():
    from fasttrain.integrations.peft import fuse_lora

    model = _peft_model()
    mlp = model.get_base_model()
    x = torch.randn(5, 32)
    doubled = _DoubledLinear(32, 48)
    doubled.load_state_dict(mlp.fc1.base_layer.state_dict())
    mlp.fc1.base_layer = doubled
    original = mlp.fc2.forward  # a wrapper of the layer's forward, as accelerate installs
    mlp.fc2.forward = lambda x, *args, **kwargs: original(2 * x, *args, **kwargs)
    expected = model(x)
    report = fuse_lora(model)
    assert report.n_fused == 0, report
    assert "own forward" in report.not_fused["base_model.model.fc1"]
    assert "wrapped" in report.not_fused["base_model.model.fc2"]
    torch.testing.assert_close(model(x), expected)


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_fuse_lora_reports_what_it_leaves_on_peft():
    from fasttrain.integrations.peft import fuse_lora

    report = fuse_lora(_peft_model(use_dora=True))
    assert report.n_fused == 0 and set(report.not_fused) == {"base_model.model.fc1",
                                                             "base_model.model.fc2"}
    assert all("variant" in why for why in report.not_fused.values()), report.not_fused


def _ia3_under_lora():
    """LoRA over IA3: peft wraps each IA3 Linear in a lora.Linear, whose base_layer is then the
    IA3 layer (get_base_layer() the nn.Linear under both)."""
    from peft import IA3Config, LoraConfig, get_peft_model

    torch.manual_seed(0)
    inner = get_peft_model(_TinyMLP(), IA3Config(target_modules=["fc1", "fc2"],
                                                 feedforward_modules=["fc2"],
                                                 init_ia3_weights=False))
    return get_peft_model(inner, LoraConfig(r=8, lora_alpha=16, target_modules=["fc1", "fc2"],
                                            init_lora_weights=False))


def _bf16_adapters():
    """bf16 adapters over an fp32 model: peft casts x to bf16 for the LoRA branch."""
    model = _peft_model()
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.bfloat16()
    return model


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
@pytest.mark.parametrize("make, why", [(_ia3_under_lora, "another peft layer (peft.tuners.ia3"),
                                       (_bf16_adapters, "bfloat16 adapters over torch.float32")])
def test_fuse_lora_leaves_on_peft_what_it_would_compute_otherwise(make, why):
    """Left on peft, with the same outputs and gradients: LoRA over another peft layer (fused,
    its inner adapter was skipped: outputs off by as much as they measure, the IA3 scales had
    no gradient), and half adapters over an fp32 base (fused, computed in fp32: 3e-3 apart)."""
    from fasttrain.integrations.peft import fuse_lora

    model = make()
    x = torch.randn(3, 11, 32)
    y_peft, g_peft = _output_and_grads(model, x)
    report = fuse_lora(model)
    assert report.n_fused == 0, report
    assert all(why in r for r in report.not_fused.values()), report.not_fused
    y, g = _output_and_grads(model, x)
    assert torch.equal(y, y_peft)
    assert g.keys() == g_peft.keys() and all(torch.equal(g[n], g_peft[n]) for n in g)


# --- real sizes on a GPU ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N,r", [((8192,), 4096, 4096, 16), ((1000,), 1000, 3000, 64),
                                        ((2, 517), 4096, 1024, 128)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_lora_linear_gpu(dtype, lead, K, N, r, dropout_p, fixed_seed):
    check_lora("cuda", dtype, lead, K, N, r, bias=True, weight_grad=dropout_p == 0,
               dropout_p=dropout_p, seeds=fixed_seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_linear_multi_gpu(dtype, fixed_seed):
    check_lora("cuda", dtype, (4096,), 2048, 2048, 16, bias=True, dropout_p=0.1, n_adapters=4,
               seeds=fixed_seed)


@pytest.mark.gpu
def test_dropout_mask_keep_ratio_gpu():
    p = 0.1
    keep = kernels.dropout_keep_mask(torch.tensor([3], device="cuda"), (8192, 4096), p, "cuda")
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * sigma


@pytest.mark.gpu
def test_fused_saves_less_than_peft_style_gpu():
    # Saved activations beyond x: s (M x r, fp32), no dropped copy of x, no fp32 copy.
    t, dy = _inputs("cuda", torch.bfloat16, (8192,), 4096, 4096, 16, bias=False)
    for k in ("x", "lora_A", "lora_B"):
        t[k].requires_grad_()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = lora_linear(**t, scaling=2.0, dropout_p=0.1)
    saved = torch.cuda.memory_allocated() - before - y.nbytes
    assert saved <= 8192 * 16 * 4 + 64 * 1024, saved
    y.backward(dy)
    assert all(torch.isfinite(t[k].grad).all() for k in ("x", "lora_A", "lora_B"))


def test_gemm_autotuning_separates_and_prunes_the_dropout_variant():
    """The dropout variant of the gemm (dx with dropout) holds two accumulator tiles: it is
    tuned under its own key, over the configs whose tile fits 64 fp32 elements per thread."""
    gemm = kernels.configs("gemm", interpret=False)
    kept = kernels._fitting_configs(gemm, {}, DROPOUT=True)
    assert 0 < len(kept) < len(gemm)
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 32 * c.num_warps for c in kept)
    assert kernels._fitting_configs(gemm, {}, DROPOUT=False) == gemm
    assert "DROPOUT" in kernels._tuned("gemm", torch.bfloat16).keys



@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_fp16_base_with_peft_fp32_adapters_matches_peft_gradients(monkeypatch):
    """peft's default (autocast_adapter_dtype: fp32 adapters) over an fp16 model with a scaled
    loss: the fused layer's adapter gradients are finite and equal peft's to fp32 rounding (they
    overflowed when the adapters were cast to fp16 for the op)."""
    from fasttrain.integrations.peft import fuse_lora

    model = _peft_model().half()
    for module in model.modules():
        if hasattr(module, "lora_A"):
            for adapters in (module.lora_A, module.lora_B):
                adapters["default"].float()
    x = torch.randn(96, 32, generator=torch.Generator().manual_seed(3)).half()
    grads = []
    for fuse in (False, True):
        if fuse:
            calls = _count_fused_calls(monkeypatch)
            assert fuse_lora(model).n_fused == 2
        model.zero_grad(set_to_none=True)
        (model(x).float().sum() * 2.0 ** 12).backward()
        grads.append(_lora_grads(model))
    assert calls
    for name, g in grads[0].items():
        assert g.dtype == torch.float32 and torch.isfinite(grads[1][name]).all(), name
        assert rel_max_diff(grads[1][name], g) <= 1e-2, name


@pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed")
def test_unfuse_keeps_a_hook_added_after_fusing_and_dropout_one_stays_on_peft():
    accelerate = pytest.importorskip("accelerate.hooks")
    from fasttrain.integrations.peft import fuse_lora, unfuse_lora

    class Count(accelerate.ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model = _peft_model()
    x = torch.randn(3, 32)
    expected = model(x)
    fuse_lora(model)
    layer = model.base_model.model.fc1
    accelerate.add_hook_to_module(layer, Count())
    assert unfuse_lora(model) == 2
    torch.testing.assert_close(model(x), expected)
    assert Count.calls == 1  # the hook still runs
    accelerate.remove_hook_from_module(layer)
    assert fuse_lora(model).n_fused == 2  # accelerate left peft's own forward: fusable again
    report = fuse_lora(_peft_model(dropout=1.0))
    assert report.n_fused == 0 and "lora_dropout=1" in report.not_fused["base_model.model.fc1"]


def test_meta_tensors_give_shapes():
    """On the meta device (shape inference, deferred init) the ops give the output's shape, as
    nn.Linear does (asking autocast about the meta device raised)."""
    x = torch.empty(3, 5, 24, device="meta")
    w, A, B = (torch.empty(*s, device="meta") for s in ((40, 24), (4, 24), (40, 4)))
    assert lora_linear(x, w, None, A, B, 2.0).shape == (3, 5, 40)
    index = torch.zeros(3, 5, dtype=torch.int64, device="meta")
    assert lora_linear_multi(x, w, None, A[None], B[None], index, 2.0).shape == (3, 5, 40)
