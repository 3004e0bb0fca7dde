"""LoRALinear: a frozen nn.Linear plus a trainable low-rank update, on the fused op."""
from __future__ import annotations

import math

import torch
from torch import nn

from fasttrain.ops.lora import lora_linear


def _runs_own_forward(base: nn.Linear) -> bool:
    """Whether calling ``base`` does more than nn.Linear's forward: a subclass's own forward
    (fake quantization, ...), forward hooks or pre-hooks (torch's pruning recomputes the weight
    in one), accelerate's hook, or a forward wrapped on the instance."""
    return (type(base).forward is not nn.Linear.forward or bool(base._forward_hooks)
            or bool(base._forward_pre_hooks) or hasattr(base, "_hf_hook")
            or "forward" in base.__dict__)


class LoRALinear(nn.Module):
    """y = base(x) + scaling * dropout(x) A^T B^T, computed by ``fasttrain.ops.lora_linear``.

    Built from what a peft LoRA layer is built from: ``base_layer`` (an nn.Linear, kept as a
    submodule; its weight and bias are frozen unless ``freeze_base=False``), ``r``,
    ``lora_alpha``, ``lora_dropout``, ``use_rslora`` (scaling lora_alpha / sqrt(r) instead of
    lora_alpha / r) and ``init_lora_weights`` (True: A Kaiming-uniform, B zero, as peft; False:
    both random, for tests). ``lora_A``: (r, in_features), ``lora_B``: (out_features, r), in the
    base weight's dtype and device. ``merge()`` folds the update into the base weight (forward is
    then the base layer alone); ``unmerge()`` takes it out again (up to a rounding of the
    weight: fp32 to about an ulp, bf16/fp16 to theirs). A base layer that overrides
    nn.Linear's forward (fake quantization, ...), has forward hooks or pre-hooks (pruning,
    accelerate's offloading, the user's) or a wrapped forward runs its own forward, with the
    update added unfused. A merged module's state_dict holds the merged weight and does not say
    so (as peft's): load it into a plain nn.Linear, or unmerge before saving.
    """

    def __init__(self, base_layer: nn.Linear, r: int = 8, lora_alpha: float = 8.0,
                 lora_dropout: float = 0.0, use_rslora: bool = False,
                 init_lora_weights: bool = True, freeze_base: bool = True, backend=None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.base_layer = base_layer
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.use_rslora, self.backend = use_rslora, backend
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, w.shape[1], dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(w.shape[0], r, dtype=w.dtype, device=w.device))
        self.merged = False
        self.reset_lora_parameters(init_lora_weights)
        if freeze_base:
            base_layer.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool = True) -> None:
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights:
            nn.init.zeros_(self.lora_B)
        else:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A (out_features, in_features), computed in fp32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merge(self) -> None:
        """W += scaling * B A; forward is then the base layer alone. The same output as unmerged
        where the base layer computes x W^T + b; a base layer with a forward of its own or
        forward hooks (run on x W^T + b, then the update added, unmerged) sees the merged weight
        instead, as in peft."""
        if not self.merged:
            if "weight" not in self.base_layer._parameters:
                # pruning's pre-hook or a parametrization rebuilds it at every call: the merged
                # update would be lost while forward skips the adapter
                raise RuntimeError(
                    "LoRALinear.merge: the base layer's weight is recomputed at each call "
                    "(torch pruning, nn.utils.parametrize), so an update merged into it would "
                    "be lost; make it a plain parameter first (prune.remove, "
                    "parametrize.remove_parametrizations) or keep the adapter unmerged")
            w = self.base_layer.weight
            w.copy_((w.float() + self.delta_weight()).to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.copy_((w.float() - self.delta_weight()).to(w.dtype))
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        p = self.lora_dropout if self.training else 0.0
        if _runs_own_forward(self.base_layer):
            # the fused op would skip what the base layer's call does: its output plus the
            # update, unfused
            dropped = nn.functional.dropout(x, p) if p > 0 else x
            return self.base_layer(x) + self.scaling * ((dropped @ self.lora_A.t())
                                                        @ self.lora_B.t())
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A,
                           self.lora_B, self.scaling, p, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"r={self.r}, lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
                f"scaling={self.scaling:.4g}, merged={self.merged}")
