"""Make a peft model's LoRA Linear layers run ``fasttrain.ops.lora_linear``.

``fuse_lora(model)`` rebinds ``forward`` of every peft ``lora.Linear`` that it can run fused:
one active adapter, plain LoRA (no DoRA or other variant, no lora_bias), an nn.Linear base
layer (not a subclass with its own forward, such as a fake-quantized one, nor another peft
layer such as IA3's under the LoRA one) that is not ``fan_in_fan_out``, adapters in fp32 or
the base weight's dtype (peft computes half adapters over an fp32 base in their dtype),
nn.Dropout or no dropout, no hooks on the base layer or wrapper of the layer's forward
(accelerate's). Other layers stay on peft's path; the returned report says
which and why. A fused layer runs the adapter active at call time (``set_adapter`` works), and
hands back to peft's own forward whenever it no longer qualifies (adapters disabled or merged,
several active adapters, extra forward arguments such as ``adapter_names``, x not in the base
weight's dtype outside ``torch.autocast``). Adapter weights kept in fp32 over a bf16/fp16 base
(peft's autocast_adapter_dtype) go to the fused op as they are: its products run in the base
dtype, their gradients come back in fp32 (under torch.autocast rounded to its dtype, as
peft's). ``unfuse_lora(model)`` or ``report.undo()`` restores peft's forward (a hook added to a
fused layer since, e.g. accelerate's, stays and runs peft's). ``nn.DataParallel``'s replicas of
a fused layer run fused on their own weights; a shallow ``copy.copy`` of one does not (its
forward stays bound to the original; ``copy.deepcopy`` is fine). peft is imported lazily; it is
not a dependency of fasttrain.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from fasttrain.ops.lora import DTYPES, autocast_dtype, lora_linear

_MARK = "_fasttrain_lora"


@dataclass
class FuseReport:
    """What ``fuse_lora`` did: module names fused, and {name: reason} for those not fused."""

    model: nn.Module = field(repr=False)
    fused: list = field(default_factory=list)
    not_fused: dict = field(default_factory=dict)

    @property
    def n_fused(self) -> int:
        return len(self.fused)

    @property
    def n_not_fused(self) -> int:
        return len(self.not_fused)

    def undo(self) -> int:
        """Restore peft's forward on the fused layers; returns how many were restored."""
        return unfuse_lora(self.model)


def _lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as e:
        raise ImportError("fasttrain.integrations.peft needs peft (pip install peft)") from e
    return Linear


def _why_not(module) -> str | None:
    """None if ``module`` (a peft lora.Linear) can run fused now, else the reason."""
    active = list(module.active_adapters)
    if len(active) != 1:
        return f"{len(active)} active adapters (fused: exactly one)"
    name = active[0]
    if name not in module.lora_A:
        return f"active adapter {name!r} has no LoRA weights in this layer"
    if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name):
        return "a LoRA variant (DoRA, ...) is active"
    if getattr(module, "lora_bias", {}).get(name):
        return "lora_bias=True"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True"
    base = module.get_base_layer()
    if module.base_layer is not base:
        inner = type(module.base_layer)
        return f"the base layer is another peft layer ({inner.__module__}.{inner.__qualname__}" \
               "), whose own adapter the fused op would skip"
    if not isinstance(base, nn.Linear) or base.weight.dtype not in DTYPES:
        return f"base layer {type(base).__name__} with {base.weight.dtype} weights is not a " \
               "float nn.Linear"
    adapters = {module.lora_A[name].weight.dtype, module.lora_B[name].weight.dtype}
    if not adapters <= {torch.float32, base.weight.dtype}:
        return f"{'/'.join(sorted(map(str, adapters)))} adapters over {base.weight.dtype} base " \
               "weights (peft computes them in their dtype)"
    if type(base).forward is not nn.Linear.forward:
        return f"base layer {type(base).__name__} has its own forward (e.g. fake quantization)"
    if hasattr(module, "_hf_hook") or (_wrapped(module) and not hasattr(module, _MARK)):
        return "the layer's forward is wrapped already (e.g. an accelerate hook)"
    if not isinstance(module.lora_dropout[name], (nn.Dropout, nn.Identity)):
        return f"dropout module {type(module.lora_dropout[name]).__name__}"
    if isinstance(module.lora_dropout[name], nn.Dropout) and module.lora_dropout[name].p >= 1:
        return "lora_dropout=1 (the fused op takes p < 1)"
    if module.merged:
        return "adapter weights are merged into the base layer"
    if base._forward_hooks or base._forward_pre_hooks or hasattr(base, "_hf_hook") \
            or "forward" in base.__dict__:
        return "the base layer has forward hooks (e.g. accelerate offloading)"
    if type(base.weight.data) is not torch.Tensor:
        return f"the base weight is a {type(base.weight.data).__name__}, not a plain tensor"
    return None


def _wrapped(module) -> bool:
    """An instance forward other than the class's own bound to the module (which accelerate's
    remove_hook_from_module leaves behind)."""
    f = module.__dict__.get("forward")
    return f is not None and not (getattr(f, "__func__", None) is type(module).forward
                                  and getattr(f, "__self__", None) is module)


def _dtype_ok(x, weight, lora_a, lora_b) -> bool:
    """x's dtype is the base weight's, or autocast casts both to one (as lora_linear does); and
    the adapters are fp32 or in that dtype (peft casts x to half adapters' dtype: over fp32 x
    they would be computed in fp32 here, and their gradients differ by a rounding)."""
    autocast = autocast_dtype(x.device.type)
    if autocast not in DTYPES:
        autocast = None
    if x.dtype != weight.dtype and not (x.dtype in DTYPES and autocast):
        return False
    compute = autocast or x.dtype
    return {lora_a.dtype, lora_b.dtype} <= {torch.float32, compute}


def _fused_forward(self, x, *args, **kwargs):
    base = self.get_base_layer()
    if args or kwargs or self.disable_adapters or _why_not(self) is not None:
        return type(self).forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]  # _why_not: exactly one, with LoRA weights in this layer
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    if not _dtype_ok(x, base.weight, lora_a, lora_b) or x.device != base.weight.device:
        return type(self).forward(self, x, *args, **kwargs)
    dropout = self.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    if lora_a.dtype != torch.float32 or lora_b.dtype != torch.float32:
        # fp32 adapters go in as they are (the op returns their gradients in fp32)
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    scaling = self.scaling[name]
    if isinstance(scaling, torch.Tensor):
        # a tensor (peft's prepare_model_for_compiled_hotswap): float() would read it on the
        # host and make torch.compile specialize on it; folded into B (N x r) it stays a tensor
        lora_b, scaling = lora_b * scaling.to(lora_b.dtype), 1.0
    return lora_linear(x, base.weight, base.bias, lora_a, lora_b, float(scaling), p)


def _replicate_fused(self):
    """nn.DataParallel's replica of a fused layer (torch copies the instance's __dict__, which
    would leave the replica's forward bound to the original): forward bound to the replica."""
    replica = type(self)._replicate_for_data_parallel(self)
    replica.forward = functools.partial(_fused_forward, replica)
    replica._replicate_for_data_parallel = functools.partial(_replicate_fused, replica)
    return replica


def fuse_lora(model: nn.Module) -> FuseReport:
    """Patch every fusable peft LoRA Linear of ``model`` in place; returns a FuseReport."""
    linear_cls = _lora_linear_class()
    report = FuseReport(model)
    for name, module in model.named_modules():
        if not isinstance(module, linear_cls):
            continue
        reason = _why_not(module)
        if reason is not None:
            report.not_fused[name] = reason
            continue
        if hasattr(module, _MARK):  # fused by an earlier call
            report.fused.append(name)
            continue
        setattr(module, _MARK, module.__dict__.get("forward"))
        # a partial of a module-level function (not a bound method): torch.save(model) pickles
        module.forward = functools.partial(_fused_forward, module)
        module._replicate_for_data_parallel = functools.partial(_replicate_fused, module)
        report.fused.append(name)
    return report


def unfuse_lora(model: nn.Module) -> int:
    """Undo ``fuse_lora``: peft's forward again on every patched layer; returns the count."""
    count = 0
    for module in model.modules():
        if hasattr(module, _MARK):
            previous = getattr(module, _MARK)
            if isinstance(previous, tuple):  # (adapter, forward): a model fused by fasttrain 0.x
                previous = previous[1]       # before the layers followed set_adapter
            current = module.__dict__.get("forward")
            if isinstance(current, functools.partial) and current.func is _fused_forward:
                del module.forward
                if previous is not None:
                    module.forward = previous
            elif isinstance(getattr(module, "_old_forward", None), functools.partial) and \
                    module._old_forward.func is _fused_forward:
                # wrapped since (an accelerate hook): the wrapper stays, calling peft's forward
                module._old_forward = previous if previous is not None else \
                    type(module).forward.__get__(module)
            # (any other wrapper still calls the fused forward, which, unmarked, hands over to
            # peft's: _why_not sees a wrapped forward)
            module.__dict__.pop("_replicate_for_data_parallel", None)
            delattr(module, _MARK)
            count += 1
    return count
