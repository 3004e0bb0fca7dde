"""Functional ops with autograd and torch.library registration."""
from fasttrain.ops.lora import lora_linear, lora_linear_multi, lora_linear_reference  # noqa: F401
