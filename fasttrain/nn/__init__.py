"""Modules built on fasttrain.ops."""
from fasttrain.nn.lora import LoRALinear  # noqa: F401
