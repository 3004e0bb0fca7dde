"""Modules built on fasttrain.ops."""
from fasttrain.nn.lora import LoRALinear
from fasttrain.nn.varlen_attn import VarlenAttention

__all__ = ["LoRALinear", "VarlenAttention"]
