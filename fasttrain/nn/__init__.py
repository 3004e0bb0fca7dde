"""Modules built on fasttrain.ops."""
from fasttrain.nn.varlen_attn import VarlenAttention

__all__ = ["VarlenAttention"]
