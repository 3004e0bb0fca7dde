"""Hypothesis fuzz: random tensor counts, sizes (0, 1, ragged) and options against torch.optim."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fasttrain import _backend
from fasttrain.optim import Adam, AdamW
from helpers import assert_close

BACKENDS = ["torch", "cpu"] + (["triton"] if _backend.interpret_mode() else [])
EXAMPLES = {"torch": 25, "cpu": 40, "triton": 10}

cases = st.fixed_dictionaries({
    "sizes": st.lists(st.one_of(st.integers(0, 3), st.integers(4, 5000)), min_size=1,
                      max_size=6),
    "decoupled": st.booleans(),
    "lr": st.sampled_from([1e-3, 3e-2]),
    "weight_decay": st.sampled_from([0.0, 0.05]),
    "amsgrad": st.booleans(),
    "maximize": st.booleans(),
    "betas": st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]),
    "max_grad_norm": st.sampled_from([None, 0.3, 100.0]),
    "seed": st.integers(0, 2**16),
})


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_against_torch(backend):
    @settings(max_examples=EXAMPLES[backend], deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(case=cases)
    def check(case):
        g = torch.Generator().manual_seed(case["seed"])
        params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in case["sizes"]]
        ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        kwargs = dict(lr=case["lr"], betas=case["betas"], weight_decay=case["weight_decay"],
                      amsgrad=case["amsgrad"], maximize=case["maximize"])
        ours = (AdamW if case["decoupled"] else Adam)(
            params, backend=backend, max_grad_norm=case["max_grad_norm"], **kwargs)
        ref = (torch.optim.AdamW if case["decoupled"] else torch.optim.Adam)(ref_params, **kwargs)
        for _ in range(3):
            for p, r in zip(params, ref_params):
                p.grad = torch.randn(p.shape, generator=g) * 2
                r.grad = p.grad.clone()
            ours.step()
            if case["max_grad_norm"] is not None:
                torch.nn.utils.clip_grad_norm_(ref_params, case["max_grad_norm"])
            ref.step()
        for p, r in zip(params, ref_params):
            if p.numel():
                assert_close(p, r, rel=1e-6)

    check()
