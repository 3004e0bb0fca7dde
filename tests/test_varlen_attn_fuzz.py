"""Hypothesis fuzz of varlen attention: lengths (0, 1, ragged, q != k), heads, head dims and
mask options against the fp64 reference, by the same criterion as tests/test_varlen_attn.py."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_varlen_attn import check_against_reference, make


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 4))
    lens_q = draw(st.lists(st.integers(0, 80), min_size=batch, max_size=batch))
    same = draw(st.booleans())
    lens_k = lens_q if same else draw(st.lists(st.integers(0, 80), min_size=batch,
                                               max_size=batch))
    nheads_k = draw(st.sampled_from([1, 2]))
    nheads = nheads_k * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([8, 16, 24, 64]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    window = (draw(st.integers(-1, 40)), draw(st.integers(-1, 40)))
    options = dict(causal=draw(st.booleans()), window_size=window,
                   softcap=draw(st.sampled_from([0.0, 5.0])))
    return lens_q, lens_k, nheads, nheads_k, head_dim, dtype, options, draw(st.integers(0, 99))


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fuzz_against_reference(case):
    lens_q, lens_k, nheads, nheads_k, head_dim, dtype, options, seed = case
    inputs = make(lens_q, lens_k, nheads, nheads_k, head_dim, dtype, "cpu", seed)
    check_against_reference(*inputs, **options)
