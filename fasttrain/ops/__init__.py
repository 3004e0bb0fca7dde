"""Functional ops with autograd and torch.library registration."""
from fasttrain.ops.lora import lora_linear, lora_linear_multi, lora_linear_reference
from fasttrain.ops.padding import (cu_seqlens_from_lengths, cu_seqlens_from_mask,
                                   cu_seqlens_from_position_ids, pad, unpad)
from fasttrain.ops.varlen_attn import dense_attention, varlen_attention, varlen_attention_reference

__all__ = ["varlen_attention", "dense_attention", "varlen_attention_reference", "unpad", "pad",
           "cu_seqlens_from_lengths", "cu_seqlens_from_mask", "cu_seqlens_from_position_ids",
           "lora_linear", "lora_linear_multi", "lora_linear_reference"]
