"""Sequence packing (cu_seqlens), length-bucketed batching and sequence-length warmup."""
from fasttrain.data.packing import (
    IGNORE_INDEX,
    LengthBucketedBatchSampler,
    PackedCollator,
    Packing,
    pack_sequences,
)
from fasttrain.data.warmup import SeqLenWarmup, WarmupCollator

__all__ = [
    "IGNORE_INDEX",
    "LengthBucketedBatchSampler",
    "PackedCollator",
    "Packing",
    "SeqLenWarmup",
    "WarmupCollator",
    "pack_sequences",
]
