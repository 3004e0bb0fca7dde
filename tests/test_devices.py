"""Kernels launch on the device of their tensors, not on the current CUDA device.

Triton launches on the current device and stream; the launchers make the tensors' device
current first. The GPU test needs two devices (a model split across GPUs in one process)."""
import pytest
import torch

from fasttrain.kernels import common
from fasttrain.ops import lora_linear, lora_linear_reference, varlen_attention
from fasttrain.ops import varlen_attention_reference
from fasttrain.optim import AdamW
from helpers import assert_close


def test_device_guard_switches_only_to_another_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = common.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    for device in (torch.device("cuda", 0), torch.device("cuda"), torch.device("cpu")):
        assert not isinstance(common.device_guard(device), torch.cuda.device), device


def test_launchers_run_under_the_guard_of_their_first_argument(monkeypatch):
    seen = []
    monkeypatch.setattr(common, "device_guard",
                        lambda device: seen.append(device) or common.contextlib.nullcontext())

    @common.on_device_of_first_arg
    def launcher(x, y, *, z):
        return x + y + z

    x = torch.ones(2)
    assert torch.equal(launcher(x, 1, z=2), torch.full((2,), 4.0))
    assert seen == [x.device]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_every_family_runs_on_the_second_device_while_the_first_is_current():
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(0)
    # attention, forward and backward
    cu = torch.tensor([0, 100, 357, 600], dtype=torch.int32, device=dev)
    q, k, v = (torch.randn(600, 4, 64, generator=g).to(dev, torch.bfloat16).requires_grad_()
               for _ in range(3))
    out = varlen_attention(q, k, v, cu, cu, causal=True)
    dq, = torch.autograd.grad(out.float().square().sum(), q)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref, _ = varlen_attention_reference(q32, k32, v32, cu, cu, causal=True)
    dq_ref, = torch.autograd.grad(ref.square().sum(), q32)
    assert out.device == dev and dq.device == dev
    assert_close(out.float(), ref, rel=2e-2)
    assert_close(dq.float(), dq_ref, rel=5e-2)
    # LoRA, forward and backward
    x = torch.randn(300, 256, generator=g).to(dev, torch.bfloat16).requires_grad_()
    w = torch.randn(384, 256, generator=g).to(dev, torch.bfloat16) * 0.05
    a = (torch.randn(8, 256, generator=g).to(dev, torch.bfloat16) * 0.05).requires_grad_()
    b = (torch.randn(384, 8, generator=g).to(dev, torch.bfloat16) * 0.05).requires_grad_()
    y = lora_linear(x, w, None, a, b, 2.0)
    da, = torch.autograd.grad(y.float().square().sum(), a)
    y_ref = lora_linear_reference(x.float(), w.float(), None, a.float(), b.float(), 2.0)
    assert_close(y.float(), y_ref, rel=2e-2)
    assert da.device == dev
    # AdamW (both GPU backends)
    for backend in ("triton", "cuda"):
        p = torch.nn.Parameter(torch.randn(10000, generator=g).to(dev))
        r = torch.nn.Parameter(p.detach().clone())
        p.grad = torch.randn(10000, generator=g).to(dev)
        r.grad = p.grad.clone()
        AdamW([p], lr=1e-2, backend=backend, max_grad_norm=1.0).step()
        AdamW([r], lr=1e-2, backend="torch", max_grad_norm=1.0).step()
        assert_close(p, r, rel=1e-6, name=backend)
    assert torch.cuda.current_device() == 0
