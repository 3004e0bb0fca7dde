"""Sequence packing (cu_seqlens), length-bucketed batching and sequence-length warmup."""
