"""Shared test helpers."""
import torch


def rel_max_diff(actual, expected):
    """max |actual - expected| / max |expected| (in float64)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def assert_close(actual, expected, *, rel, name="tensor"):
    """Fail with where and by how much two tensors differ when max|a-e|/max|e| > rel."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(a).all(), f"{name}: non-finite values in the result"
    err = rel_max_diff(a, e)
    if not err <= rel:
        diff = (a - e).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{name}: relative max diff {err:.3e} > {rel:.1e}; worst at {idx}: "
            f"got {a[idx].item():.9g}, expected {e[idx].item():.9g}; "
            f"{(diff > rel * e.abs().max()).sum().item()} of {diff.numel()} elements off")


class WrapperTensor(torch.Tensor):
    """A wrapper subclass: no storage of its own, its ops run on ``elem`` in __torch_dispatch__
    (as FSDP's, torchao's or a user's subclasses do)."""

    @staticmethod
    def __new__(cls, elem):
        out = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                  dtype=elem.dtype, device=elem.device,
                                                  requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map

        def unwrap(x):
            return x.elem if isinstance(x, WrapperTensor) else x

        def wrap(x):
            return WrapperTensor(x) if type(x) is torch.Tensor else x

        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs or {}))
        if func._schema.is_mutable:
            return args[0]
        return tree_map(wrap, out)
