"""Varlen attention against the fp64 reference: forward, LSE and all three gradients.

Criterion (FlashAttention's): the Triton result's max error against the reference computed in
float64 from the same inputs must be at most 2x the error of the same computation in torch in
the inputs' dtype, plus a small floor relative to the reference's magnitude. On CPU the
kernels run under the Triton interpreter at small sizes; ``-m gpu`` runs the same bodies at
real sizes on CUDA.
"""
import subprocess
import sys

import pytest
import torch

from fasttrain import _backend
from fasttrain.kernels import varlen_attn as kernels
from fasttrain.nn import VarlenAttention
from fasttrain.ops import (cu_seqlens_from_mask, cu_seqlens_from_position_ids, dense_attention,
                           pad, unpad, varlen_attention, varlen_attention_reference)
from conftest import devices

FLOOR = {torch.float32: 5e-6, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def cu(lens, device="cpu"):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def make(lens_q, lens_k, nheads, nheads_k, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q = rand(sum(lens_q), nheads, head_dim)
    k = rand(sum(lens_k), nheads_k, head_dim)
    v = rand(sum(lens_k), nheads_k, head_dim)
    return q, k, v, cu(lens_q, device), cu(lens_k, device)


def forward_backward(fn, q, k, v, dout, dlse):
    """out, lse, dq, dk, dv of fn(q, k, v) -> (out, lse) for the loss sum(out*dout + lse*dlse)
    (LSE entries of -inf are left out of the loss)."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.double() * dout.double()).sum()
    loss = loss + torch.where(torch.isinf(lse), 0.0, lse.double() * dlse.double()).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_against_reference(q, k, v, cu_q, cu_k, *, config=None, **options):
    """Triton vs the fp64 reference, judged by 2x the same-dtype torch error."""
    gen = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=gen).to(q.device, q.dtype)
    dlse = torch.randn(q.shape[1], q.shape[0], generator=gen).to(q.device)

    if config is None:
        def fast(q_, k_, v_):
            return varlen_attention(q_, k_, v_, cu_q, cu_k, return_lse=True, backend="triton",
                                    **options)
        got = forward_backward(fast, q, k, v, dout, dlse)
    else:  # the launchers directly, with small blocks (many blocks per sequence)
        got = launch_with_config(q, k, v, cu_q, cu_k, dout, dlse, config, **options)
    ref = forward_backward(
        lambda *x: varlen_attention_reference(*(t.double() for t in x), cu_q, cu_k, **options),
        q, k, v, dout, dlse)
    same_dtype = forward_backward(
        lambda *x: varlen_attention_reference(*x, cu_q, cu_k, upcast=False, **options),
        q, k, v, dout, dlse)

    lse = got[1]
    assert torch.equal(torch.isinf(lse), torch.isinf(ref[1])), "rows with no key differ"
    assert not torch.isnan(lse).any()
    finite = ~torch.isinf(ref[1])
    for name, a, r, t in zip(("out", "lse", "dq", "dk", "dv"), got, ref, same_dtype):
        if name == "lse":
            a, r, t = a[finite], r[finite], t[finite]
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        floor = FLOOR[q.dtype] * max(r.abs().max().item() if r.numel() else 0.0, 1.0)
        err, torch_err = max_err(a, r), max_err(t, r)
        assert err <= 2 * torch_err + floor, (
            f"{name}: max error {err:.3e} vs the fp64 reference > 2 x torch {q.dtype} error "
            f"{torch_err:.3e} + {floor:.1e}")
    return got


def launch_with_config(q, k, v, cu_q, cu_k, dout, dlse, config, softmax_scale=None,
                       causal=False, window_size=(-1, -1), softcap=0.0):
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    opts = dict(softmax_scale=scale, window_left=window_size[0],
                window_right=0 if causal else window_size[1], softcap=softcap, config=config)
    out, lse = kernels.varlen_attn_fwd(q, k, v, cu_q, cu_k, **opts)
    dq, dk, dv = kernels.varlen_attn_bwd(dout, q, k, v, out, lse, dlse, cu_q, cu_k, **opts)
    return out, lse, dq, dk, dv


def sizes(device, small, large):
    return large if device == "cuda" else small


MASKS = {
    "full": dict(),
    "causal": dict(causal=True),
    "causal-window": dict(causal=True, window_size=(20, -1)),
    "window-softcap": dict(window_size=(10, 7), softcap=30.0, softmax_scale=0.2),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mask", MASKS)
def test_matches_reference(device, dtype, mask):
    lens = sizes(device, [5, 70, 1, 130], [1, 127, 1000, 2049, 513, 64])
    heads = sizes(device, (4, 2), (32, 8))
    check_against_reference(*make(lens, lens, *heads, 64, dtype, device), **MASKS[mask])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("softmax_scale", [-0.3, 0.0])
def test_nonpositive_softmax_scale(device, softmax_scale):
    # the forward takes the row max on the raw scores for a positive scale only: a negative
    # one makes it the min (masked scores: -inf * -0.3 = inf), and 0 * -inf is nan
    lens = sizes(device, [5, 70, 33], [1000, 2049, 7])
    check_against_reference(*make(lens, lens, 4, 2, 64, torch.bfloat16, device), causal=True,
                            softmax_scale=softmax_scale)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("softcap", [50.0, 500.0])
def test_fp32_softcap_much_larger_than_the_scores(device, softcap):
    # tanh of small arguments: 1 - 2 / (e + 1) alone was 8x (softcap 50) to 100x (500) off
    # torch's fp32 error; the criterion's floor let 50 pass, 500 failed it
    lens = sizes(device, [100, 37], [1000, 2049])
    check_against_reference(*make(lens, lens, 2, 1, 64, torch.float32, device), causal=True,
                            softcap=softcap)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("head_dim, dtype", [
    *((d, torch.float16) for d in (32, 40, 96, 128, 256)),
    *((d, dt) for d in (40, 96, 256) for dt in (torch.bfloat16, torch.float32))])
def test_head_dims(device, head_dim, dtype):
    lens = sizes(device, [3, 67, 20], [300, 1031, 7])
    check_against_reference(*make(lens, lens, 2, 1, head_dim, dtype, device), causal=True)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("ratio, dtype", [(1, torch.float16), (4, torch.float16),
                                          (8, torch.float16), (4, torch.bfloat16),
                                          (4, torch.float32)])
def test_gqa(device, ratio, dtype):
    lens = sizes(device, [40, 9, 66], [1000, 33, 2000])
    check_against_reference(*make(lens, lens, 8, 8 // ratio, 64, dtype, device),
                            causal=True, window_size=(50, -1))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout", ["qkv-heads", "kv-last-dim"])
def test_strided_views_of_a_projection(device, layout):
    """q, k, v as models pass them: views of one projection's output, not contiguous (row
    strides larger than heads x head dim; in kv-last-dim also head strides of 2 x head dim)."""
    lens = sizes(device, [5, 70, 1, 33], [1, 1000, 2049, 7])
    heads, heads_k, d = sizes(device, (4, 2, 32), (32, 8, 128))
    gen = torch.Generator().manual_seed(0)
    total = sum(lens)
    if layout == "qkv-heads":  # (T, Hq + 2 Hk, D) split along heads
        qkv = torch.randn(total, heads + 2 * heads_k, d, generator=gen)
        q, k, v = qkv.to(device, torch.bfloat16).split([heads, heads_k, heads_k], dim=1)
    else:  # k and v interleaved along the last dim: (T, Hk, 2D); q likewise, (T, Hq, 2D)
        q = torch.randn(total, heads, 2 * d, generator=gen).to(device, torch.bfloat16)[..., :d]
        kv = torch.randn(total, heads_k, 2 * d, generator=gen).to(device, torch.bfloat16)
        k, v = kv[..., :d], kv[..., d:]
    assert not any(x.is_contiguous() for x in (q, k, v))
    check_against_reference(q, k, v, cu(lens, device), cu(lens, device), causal=True)
    # a strided gradient of the output gives the gradients of its contiguous copy
    dout = torch.randn(total, heads, 2 * d, generator=gen).to(device, torch.bfloat16)[..., :d]
    grads = []
    for g in (dout, dout.contiguous()):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = varlen_attention(*leaves, cu(lens, device), cu(lens, device), causal=True,
                               backend="triton")
        grads.append(torch.autograd.grad(out, leaves, g))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("mask", ["full", "causal", "causal-window"])
def test_different_q_and_k_lengths_and_empty_sequences(device, mask):
    # cross-attention / chunked prefill: q and k lengths differ, either way; some are zero
    # (a query sequence with no keys gets out = 0, lse = -inf; keys no query sees get dk = 0)
    lens_q = sizes(device, [3, 0, 50, 17, 64, 0], [3, 0, 500, 1700, 640, 0])
    lens_k = sizes(device, [10, 5, 20, 0, 130, 0], [100, 5, 2000, 0, 130, 0])
    check_against_reference(*make(lens_q, lens_k, 2, 2, 32, torch.float32, device),
                            **MASKS[mask])


SMALL_BLOCKS = {"fwd": dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
                "dkdv": dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
                "dq": dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)}


@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(window_size=(5, -1)),
                                     dict(window_size=(13, 3)), dict(window_size=(-1, 40))],
                         ids=["full", "causal", "left", "left-right", "right"])
def test_many_blocks_per_sequence(options):
    # small blocks: masked edges, mask-free middles and ragged ends all occur in one sequence
    lens_q, lens_k = [1, 17, 100, 33], [1, 40, 100, 20]
    check_against_reference(*make(lens_q, lens_k, 2, 1, 16, torch.float32, "cpu"),
                            config=SMALL_BLOCKS, **options)


@pytest.mark.parametrize("device", devices())
def test_a_non_finite_lse_gradient_of_a_row_without_keys_is_dropped(device):
    """The LSE of a query that sees no key is the constant -inf: an upstream inf there (a loss
    that used it) has nothing to flow into, on both backends (the kernel made 0 * inf NaNs)."""
    q, k, v, cu_q, cu_k = make([10, 6], [2, 6], 2, 1, 16, torch.float32, device)
    grads = {}
    dlse = torch.randn(2, 16, generator=torch.Generator().manual_seed(1)).to(device)
    dlse[0, 0], dlse[1, 3] = float("inf"), float("nan")
    for backend in ("triton", "torch"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = varlen_attention(*leaves, cu_q, cu_k, causal=True, return_lse=True,
                                    backend=backend)  # queries 0-7 see no key
        assert lse[:, :8].isinf().all() and lse[:, 8:].isfinite().all()
        grads[backend] = torch.autograd.grad([out, lse], leaves, [torch.ones_like(out), dlse])
        assert all(g.isfinite().all() for g in grads[backend]), backend
    for a, b in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_lse_alone_and_out_alone_are_differentiable():
    q, k, v, cu_q, cu_k = make([30, 12], [30, 12], 2, 2, 32, torch.float32, "cpu")
    for pick in (0, 1):
        grads = []
        for backend in ("triton", "torch"):
            q_, k_, v_ = (x.clone().requires_grad_() for x in (q, k, v))
            result = varlen_attention(q_, k_, v_, cu_q, cu_k, causal=True, return_lse=True,
                                      backend=backend)
            (result[pick] * torch.linspace(-1, 1, result[pick].numel()).view_as(
                result[pick])).sum().backward()
            # the reference leaves v.grad None when only lse is used: that is a zero gradient
            grads.append([torch.zeros_like(x) if x.grad is None else x.grad
                          for x in (q_, k_, v_)])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", devices())
def test_tile_maps_are_rebuilt_when_cu_seqlens_change_in_place(device):
    # (CUDA caches the maps per cu_seqlens tensor and version; CPU builds them every call)
    q, k, v, cu_q, _ = make([30, 50], [30, 50], 2, 2, 16, torch.float32, device)
    for lens in ([30, 50], [70, 10]):
        cu_q.copy_(cu(lens))  # same tensor, new contents (the map cache keys on the version)
        out = varlen_attention(q, k, v, cu_q, cu_q, causal=True, backend="triton")
        expected, _ = varlen_attention_reference(q, k, v, cu_q, cu_q, causal=True)
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("device", devices())
def test_backward_is_deterministic(device):
    # (the interpreter runs programs one after another: only the GPU run can catch a race)
    q, k, v, cu_q, cu_k = make(*[sizes(device, [50, 90], [700, 3001, 64])] * 2,
                               *sizes(device, (4, 1), (32, 4)), sizes(device, 32, 128),
                               torch.float16, device)
    runs = []
    for _ in range(2):
        q_, k_, v_ = (x.clone().requires_grad_() for x in (q, k, v))
        out = varlen_attention(q_, k_, v_, cu_q, cu_k, causal=True, backend="triton")
        out.float().square().sum().backward()
        runs.append((q_.grad, k_.grad, v_.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_no_tokens_at_all():
    for lens_q, lens_k in (([], []), ([0, 0], [0, 0]), ([0, 0], [3, 4])):
        q, k, v, cu_q, cu_k = make(lens_q, lens_k, 2, 2, 32, torch.float32, "cpu")
        k.requires_grad_()
        out, lse = varlen_attention(q, k, v, cu_q, cu_k, return_lse=True, backend="triton")
        assert out.shape == q.shape and lse.shape == (2, 0)
        (out.sum() + k.sum()).backward()
        assert torch.equal(k.grad, torch.ones_like(k))  # only the k.sum() term


def test_tile_map_covers_every_block_once_heaviest_first():
    lens_q, lens_k = [0, 5, 130, 64, 1, 300], [7, 5, 130, 10, 0, 300]
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    block = 32
    n = kernels.max_tiles(sum(lens_q), len(lens_q), block)
    tiles = kernels.tile_map(cu_q, cu_k, block, n, keys=False, window_left=-1, window_right=0)
    real = [(s, b) for s, b in tiles.T.tolist() if s >= 0]
    expected = [(s, b) for s, n_q in enumerate(lens_q) for b in range(-(-n_q // block))]
    assert sorted(real) == sorted(expected)
    assert tiles.shape[1] == n and all(s == -1 for s, _ in tiles.T.tolist()[len(real):])
    # causal: a tile's work grows with its block index and its sequence's length
    assert real[0] == (5, 9) and real[-1] in {(4, 0), (1, 0)}


def test_module_and_dense_wrapper_match_sdpa():
    # the reference itself, checked against torch's SDPA on equal-length batches
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 20, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    bshd = [x.transpose(1, 2) for x in (q, k, v)]
    torch.testing.assert_close(dense_attention(*bshd, causal=True).transpose(1, 2), expected)
    # flash_attn_func's positional order: (q, k, v, dropout_p, softmax_scale, causal)
    torch.testing.assert_close(dense_attention(*bshd, 0.0, None, True).transpose(1, 2),
                               expected)
    module = VarlenAttention(causal=True)
    cu_q = cu([20, 20, 20])
    out = module(*(x.reshape(60, 2, 16) for x in bshd), cu_q)
    torch.testing.assert_close(out.view(3, 20, 2, 16).transpose(1, 2), expected)


def test_reference_bottom_right_causal_and_window_match_sdpa_with_explicit_masks():
    gen = torch.Generator().manual_seed(0)
    len_q, len_k = 7, 12
    q = torch.randn(len_q, 1, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(len_k, 1, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    i, j = torch.arange(len_q)[:, None], torch.arange(len_k)[None, :]
    for options, mask in ((dict(causal=True), j <= i + 5),
                          (dict(window_size=(2, 1)), (j >= i + 5 - 2) & (j <= i + 5 + 1))):
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
        out, _ = varlen_attention_reference(q, k, v, cu([len_q]), cu([len_k]), **options)
        torch.testing.assert_close(out, expected.transpose(0, 1))


def test_unpad_pad_and_cu_seqlens_helpers():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]])  # right, left padding
    hidden = torch.randn(3, 4, 5)
    packed, indices, cu_seqlens, max_seqlen = unpad(hidden, mask)
    assert cu_seqlens.tolist() == [0, 3, 6, 7] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 3 and packed.shape == (7, 5)
    torch.testing.assert_close(packed[3:6], hidden[1, 1:])
    torch.testing.assert_close(pad(packed, indices, 3, 4), hidden * mask[..., None])
    assert cu_seqlens_from_mask(mask.bool())[0].tolist() == [0, 3, 6, 7]
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu_pos, max_pos = cu_seqlens_from_position_ids(pos)
    assert cu_pos.tolist() == [0, 3, 5, 9] and max_pos == 4
    rows = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])  # each row starts a sequence
    assert cu_seqlens_from_position_ids(rows)[0].tolist() == [0, 3, 5, 9, 10]
    with pytest.raises(ValueError, match="start at 0"):
        cu_seqlens_from_position_ids(torch.tensor([1, 2, 0]))
    with pytest.raises(ValueError, match="every row"):  # a second row continuing the first
        cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2], [3, 4, 0]]))


def test_cpu_cu_seqlens_written_behind_torchs_back_are_read_again():
    q, k, v, cu_q, _ = make([70, 10], [70, 10], 2, 1, 16, torch.float32, "cpu")
    varlen_attention(q, k, v, cu_q, cu_q, causal=True, backend="triton")
    cu_q.numpy()[1] = 10  # no new tensor version
    for cu_seqlens in (cu_q, torch.tensor([0, 90, 80], dtype=torch.int32)):
        cu_seqlens.numpy()[:] = [0, 10, 80]
        got = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, causal=True, backend="triton")
        expected = varlen_attention_reference(q, k, v, cu_seqlens, cu_seqlens, causal=True)[0]
        torch.testing.assert_close(got, expected)
    cu_q.numpy()[1] = 90
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_attention(q, k, v, cu_q, cu_q, causal=True, backend="triton")


def test_torch_compile_fullgraph(monkeypatch):
    monkeypatch.setattr(_backend, "_logged", set())  # compiled first: the choice not logged yet

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 96)
            self.attn = VarlenAttention(causal=True, backend="triton")

        def forward(self, x, cu_seqlens):
            q, k, v = self.proj(x).view(-1, 3, 2, 16).unbind(1)
            return self.attn(q, k, v, cu_seqlens).sum()

    torch.manual_seed(0)
    model = Block()
    x, cu_seqlens = torch.randn(40, 32), cu([25, 15])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    result = compiled(x, cu_seqlens)
    result.backward()
    grad = model.proj.weight.grad.clone()
    model.zero_grad()
    eager = model(x, cu_seqlens)
    eager.backward()
    torch.testing.assert_close(result, eager)
    torch.testing.assert_close(grad, model.proj.weight.grad)


def test_torch_compile_dynamic_shapes_and_cu_seqlens_checked():
    """dynamic=True makes the scale symbolic (it was read by math.isfinite); bad cu_seqlens
    raise inside the compiled graph too (they left rows of out unwritten)."""
    def f(q, k, v, cu_seqlens, scale):
        out, lse = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, causal=True,
                                    softmax_scale=scale, return_lse=True, backend="triton")
        return out.sum() + lse.sum()

    graphs = []

    def counting(gm, example_inputs):  # aot_eager, counting the graphs compiled
        from torch._dynamo.backends.registry import lookup_backend

        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(f, backend=counting, fullgraph=True, dynamic=True)
    first = None
    for lengths in ([3, 4], [2, 2, 5], [1, 6, 4], [4, 4, 4, 3]):
        q, k, v, cu_q, _ = make(lengths, lengths, 2, 1, 16, torch.float32, "cpu")
        torch.testing.assert_close(compiled(q, k, v, cu_q, 0.25), f(q, k, v, cu_q, 0.25))
        first = first or len(graphs)
    assert len(graphs) == first  # no recompile for new token counts (a traced total in a message)
    q, k, v, cu_q, _ = make([3, 4], [3, 4], 2, 1, 16, torch.float32, "cpu")
    torch.testing.assert_close(compiled(q, k, v, cu_q, None), f(q, k, v, cu_q, None))
    q, k, v = (torch.randn(7, 2, 16) for _ in range(3))
    with pytest.raises(RuntimeError, match="non-decreasing"):
        compiled(q, k, v, torch.tensor([0, 5, 3], dtype=torch.int32), None)


def test_flash_attention_positional_arguments_and_block_table():
    q, k, v, cu_q, cu_k = make([3, 5], [3, 5], 2, 2, 16, torch.float32, "cpu")
    # flash_attn_varlen_func's order: ..., deterministic, return_attn_probs, block_table
    got = varlen_attention(q, k, v, cu_q, cu_k, 5, 5, 0.0, None, True, (-1, -1), 0.0, None,
                           False, True, None)
    assert len(got) == 3 and torch.equal(got[0], varlen_attention(q, k, v, cu_q, cu_k,
                                                                  causal=True))
    qd, kd, vd = (t.reshape(2, 4, 2, 16) for t in (q, k, v))
    got = dense_attention(qd, kd, vd, 0.0, None, False, (-1, -1), 0.0, None, False, True)
    assert len(got) == 3 and got[1].shape == (2, 2, 4)
    with pytest.raises(NotImplementedError, match="block_table"):
        varlen_attention(q, k, v, cu_q, cu_k, block_table=torch.zeros(2, 1, dtype=torch.int32))


def test_reference_lse_is_fp64_for_fp64_inputs():
    q, k, v, cu_q, cu_k = make([3, 0, 5], [4, 2, 5], 2, 1, 16, torch.float64, "cpu")
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True,
                                backend="torch")
    assert out.dtype == lse.dtype == torch.float64


def test_opcheck():
    q, k, v, cu_q, cu_k = make([9, 20], [12, 20], 2, 1, 16, torch.float32, "cpu")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.fasttrain.varlen_attn_fwd.default,
                          (q, k, v, cu_q, cu_k, 0.25, -1, 0, 0.0))
    out, lse = torch.ops.fasttrain.varlen_attn_fwd(q, k, v, cu_q, cu_k, 0.25, -1, 0, 0.0)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fasttrain.varlen_attn_bwd.default,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                           None, cu_q, cu_k, 0.25, -1, 0, 0.0))


def test_cpu_tensors_default_to_the_reference(monkeypatch):
    q, k, v, cu_q, cu_k = make([4, 6], [4, 6], 2, 1, 8, torch.float64, "cpu")
    out = varlen_attention(q, k, v, cu_q, cu_k, causal=True)  # fp64: only the reference takes it
    torch.testing.assert_close(out, varlen_attention_reference(q, k, v, cu_q, cu_k,
                                                               causal=True)[0])
    monkeypatch.setenv("FASTTRAIN_BACKEND", "cpu")  # the reference is this family's CPU backend
    torch.testing.assert_close(varlen_attention(q, k, v, cu_q, cu_k, causal=True), out)
    with pytest.raises(ValueError, match="no 'cuda'"):
        varlen_attention(q, k, v, cu_q, cu_k, backend="cuda")
    monkeypatch.setenv("FASTTRAIN_BACKEND", "cuda")  # global (AdamW's kernel): automatic here
    torch.testing.assert_close(varlen_attention(q, k, v, cu_q, cu_k, causal=True), out)
    with pytest.raises(RuntimeError, match="Triton kernels take"):
        varlen_attention(q, k, v, cu_q, cu_k, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        varlen_attention(q.float(), k.float(), v.float(), cu_q, cu_k, backend="triton")


def _bad_inputs():
    q, k, v, cu_q, cu_k = make([3, 5], [3, 5], 4, 2, 16, torch.float16, "cpu")
    yield "dtype", dict(k=k.float()), TypeError, "one dtype"
    yield "rank", dict(q=q[0]), ValueError, "total_tokens, nheads, headdim"
    yield "kv shapes", dict(v=v[:, :1]), ValueError, "same shape"
    yield "head dim", dict(k=k[..., :8], v=v[..., :8]), ValueError, "same head dim"
    yield "head dim > 256", dict(q=q.new_zeros(8, 4, 264), k=k.new_zeros(8, 2, 264),
                                 v=v.new_zeros(8, 2, 264)), ValueError, "between 1 and 256"
    yield "heads", dict(k=k.repeat(1, 2, 1)[:, :3], v=v.repeat(1, 2, 1)[:, :3]), ValueError, \
        "multiple of"
    yield "cu int64", dict(cu_seqlens_q=cu_q.long()), TypeError, "int32"
    yield "cu 2-D", dict(cu_seqlens_q=cu_q[None]), ValueError, "1-D"
    yield "cu strided", dict(cu_seqlens_q=torch.stack([cu_q, cu_q], 1)[:, 0]), ValueError, \
        "contiguous"
    yield "cu lengths", dict(cu_seqlens_k=cu([3, 5, 0])), ValueError, "same length"
    yield "cu not monotone", dict(cu_seqlens_q=torch.tensor([0, 6, 3, 8], dtype=torch.int32),
                                  cu_seqlens_k=cu([3, 3, 2])), ValueError, "non-decreasing"
    yield "cu last", dict(cu_seqlens_q=cu([3, 4])), ValueError, "end at"
    yield "cu first", dict(cu_seqlens_q=torch.tensor([1, 3, 8], dtype=torch.int32)), \
        ValueError, "start at 0"
    yield "window", dict(window_size=(-2, 0)), ValueError, "window_size"
    yield "window None", dict(window_size=None), ValueError, "window_size"
    yield "window bools", dict(window_size=(True, False)), ValueError, "window_size"
    yield "window float", dict(window_size=(2.5, 0)), ValueError, "window_size"
    yield "softcap", dict(softcap=-1.0), ValueError, "softcap"
    yield "softcap inf", dict(softcap=float("inf")), ValueError, "finite"
    yield "scale nan", dict(softmax_scale=float("nan")), ValueError, "finite"
    yield "dropout", dict(dropout_p=0.1), NotImplementedError, "dropout"
    yield "not a tensor", dict(q=[1.0]), TypeError, "torch.Tensor"
    yield "kv device", dict(v=v.to("meta")), ValueError, "one device"
    yield "cu device", dict(cu_seqlens_k=cu_k.to("meta")), ValueError, "q's device"


@pytest.mark.parametrize("name,change,error,match", list(_bad_inputs()),
                         ids=[c[0] for c in _bad_inputs()])
def test_bad_input_gets_a_clear_error(name, change, error, match):
    q, k, v, cu_q, cu_k = make([3, 5], [3, 5], 4, 2, 16, torch.float16, "cpu")
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="triton")
    args.update(change)
    with pytest.raises(error, match=match):
        varlen_attention(**args)


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    q, k, v, cu_q, cu_k = make([100, 2000, 1], [100, 2000, 1], 8, 2, 128, torch.bfloat16,
                               "cuda")
    q.requires_grad_()
    varlen_attention(q, k, v, cu_q, cu_k, causal=True).sum().backward()  # warm up / compile
    torch.cuda.set_sync_debug_mode("error")
    try:
        varlen_attention(q, k, v, cu_q, cu_k, causal=True).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_windows_wider_than_the_sequences_mean_no_window():
    q, k, v, cu_q, cu_k = make([30, 50], [30, 50], 2, 2, 16, torch.float32, "cpu")
    full = varlen_attention(q, k, v, cu_q, cu_k, backend="triton")
    causal = varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend="triton")
    wide = 2 ** 31 - 1  # would overflow the kernels' int32 range arithmetic
    torch.testing.assert_close(varlen_attention(q, k, v, cu_q, cu_k, window_size=(-1, wide),
                                                backend="triton"), full)
    torch.testing.assert_close(varlen_attention(q, k, v, cu_q, cu_k, window_size=(wide, 0),
                                                backend="triton"), causal)


def test_dense_attention_with_empty_sequences():
    q = torch.randn(2, 0, 2, 16)
    k = v = torch.randn(2, 5, 2, 16)
    assert dense_attention(q, k, v, backend="triton").shape == (2, 0, 2, 16)
    out, lse = dense_attention(k, q, q, return_lse=True)  # no keys: zeros and -inf
    assert torch.equal(out, torch.zeros_like(k)) and torch.isinf(lse).all()


def test_flash_attention_return_attn_probs_keyword():
    q, k, v, cu_q, cu_k = make([3, 5], [3, 5], 2, 2, 16, torch.float32, "cpu")
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    got = varlen_attention(q, k, v, cu_q, cu_k, causal=True, return_attn_probs=True)
    assert len(got) == 3 and got[2] is None
    assert torch.equal(got[0], out) and torch.equal(got[1], lse)
    qd, kd, vd = (t.reshape(2, 4, 2, 16) for t in (q, k, v))
    out, lse = dense_attention(qd, kd, vd, return_lse=True)
    got = dense_attention(qd, kd, vd, return_attn_probs=True)
    assert len(got) == 3 and got[2] is None
    assert torch.equal(got[0], out) and torch.equal(got[1], lse)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_batch_of_no_sequences_backpropagates(backend):
    """cu_seqlens [0]: empty outputs, still in autograd's graph (empty gradients), on both
    paths."""
    q, k, v = (torch.randn(0, 2, 16, requires_grad=True) for _ in range(3))
    cu = torch.zeros(1, dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, cu, causal=True, backend=backend)
    assert out.shape == (0, 2, 16) and out.requires_grad
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.shape == (0, 2, 16) for g in grads)


def test_cu_seqlens_values_are_checked_again_after_an_in_place_change():
    q, k, v, cu_q, cu_k = make([3, 5], [3, 5], 2, 2, 16, torch.float32, "cpu")
    varlen_attention(q, k, v, cu_q, cu_k)  # checked once, remembered for this version
    cu_q[1] = 6
    cu_q[2] = 5
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_attention(q, k, v, cu_q, cu_k)


@pytest.mark.gpu
@pytest.mark.parametrize("change", ["fresh", "in_place"])
def test_bad_cu_seqlens_on_cuda_is_a_device_side_assert(change):
    """On CUDA the values are checked without a host sync, by a device-side assert (which ends
    the process's CUDA context: run in a subprocess). "in_place": a tensor checked once and then
    changed in place is checked again."""
    code = f"""
import torch
from fasttrain.ops import varlen_attention
q = torch.randn(8, 2, 64, device="cuda", dtype=torch.bfloat16)
cu = torch.tensor([0, 3, 8], dtype=torch.int32, device="cuda")
if "{change}" == "in_place":
    varlen_attention(q, q, q, cu, cu, causal=True)
    torch.cuda.synchronize()
    print("first call ok", flush=True)
    cu[1] = 9
else:
    cu = torch.tensor([0, 9, 8], dtype=torch.int32, device="cuda")
varlen_attention(q, q, q, cu, cu, causal=True)
torch.cuda.synchronize()
print("no assert")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0 and "no assert" not in result.stdout, result.stdout
    assert "non-decreasing" in result.stderr or "device-side assert" in result.stderr, \
        result.stderr[-2000:]
    if change == "in_place":
        assert "first call ok" in result.stdout
