"""fasttrain: fused kernels for training (AdamW, varlen attention, LoRA)."""
__version__ = "0.1.0"
