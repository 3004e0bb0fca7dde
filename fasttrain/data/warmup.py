"""Sequence-length warmup: train on short sequences first, grow to the full length.

``SeqLenWarmup(max_seqlen, warmup_steps, start_seqlen=64, multiple_of=64)`` gives the length
limit of each optimizer step: it grows linearly from ``start_seqlen`` at step 0 to
``max_seqlen`` at ``warmup_steps``, rounded down to a multiple of ``multiple_of`` (and never
below ``start_seqlen`` nor above ``max_seqlen``). Sequences are cut to their first
``seqlen(step)`` tokens.

Plain loop::

    for step, batch in enumerate(loader):
        batch = warmup.apply(batch, step)

Or cut the examples before they are collated (so padding and the collator see the cut
lengths; a ``LengthBucketedBatchSampler`` still plans its batches from the full lengths, so
the examples it packed shrink afterwards and early rows fill less of their budget)::

    loader = DataLoader(ds, batch_sampler=..., collate_fn=warmup.wrap_collator(PackedCollator()))
    ...
    warmup.step = step  # or let fasttrain.integrations.transformers_callbacks.SeqLenWarmupCallback
                        # set it from the HF Trainer

``warmup.step`` lives in shared memory, so DataLoader worker processes see the value the main
process sets. A batch is cut with the value current when it is collated: a DataLoader collates
ahead (``prefetch_factor * num_workers`` batches, or one with accelerate's loader in the HF
Trainer), so the limit follows the schedule with that many batches of delay.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from fasttrain.ops.padding import cu_seqlens_from_position_ids


def _positive_int(value, name: str, minimum: int = 1) -> int:
    """An int (NumPy ints and 1-element integer tensors too, as operator.index takes them)."""
    error = TypeError(f"{name} must be an int, got {type(value).__name__}")
    if isinstance(value, bool):
        raise error
    try:
        value = operator.index(value)
    except TypeError:
        raise error from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class SeqLenWarmup:
    """Linear sequence-length warmup from ``start_seqlen`` to ``max_seqlen`` over
    ``warmup_steps`` optimizer steps, rounded down to a multiple of ``multiple_of``.

    ``seqlen(step)``: the length limit at ``step`` (``max_seqlen`` from ``warmup_steps`` on).
    ``apply(batch, step)``: cut a batch (see there) to ``seqlen(step)`` tokens per sequence.
    ``wrap_collator(fn)``: a collate function that cuts the examples to ``seqlen(self.step)``
    and then calls ``fn``.
    """

    def __init__(self, max_seqlen: int, warmup_steps: int, *, start_seqlen: int = 64,
                 multiple_of: int = 64):
        self.max_seqlen = _positive_int(max_seqlen, "max_seqlen")
        self.warmup_steps = _positive_int(warmup_steps, "warmup_steps", minimum=0)
        self.start_seqlen = _positive_int(start_seqlen, "start_seqlen")
        self.multiple_of = _positive_int(multiple_of, "multiple_of")
        if start_seqlen > max_seqlen:
            raise ValueError(f"start_seqlen ({start_seqlen}) must be <= max_seqlen ({max_seqlen})")
        self._step = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def step(self) -> int:
        """The current optimizer step (used when no step is passed); shared with workers."""
        return int(self._step)

    @step.setter
    def step(self, value: int) -> None:
        self._step.fill_(_positive_int(value, "step", minimum=0))

    def seqlen(self, step: int | None = None) -> int:
        step = self.step if step is None else _positive_int(step, "step", minimum=0)
        if step >= self.warmup_steps:
            return self.max_seqlen
        span = self.max_seqlen - self.start_seqlen
        raw = self.start_seqlen + span * step // self.warmup_steps
        rounded = raw // self.multiple_of * self.multiple_of
        return min(self.max_seqlen, max(self.start_seqlen, rounded))

    def apply(self, batch, step: int | None = None):
        """Cut ``batch`` to ``seqlen(step)`` tokens per sequence (``step=None``: ``self.step``).

        ``batch`` is one of:

        - a list of example dicts: ``input_ids`` and every other list / 1-D tensor entry of the
          same length (``labels``, ``attention_mask``...) keep their first ``seqlen`` entries;
        - a packed batch, a dict with ``input_ids`` of shape (1, total) and ``position_ids``
          restarting at 0 per sequence (``PackedCollator``, ``DataCollatorWithFlattening``):
          tokens whose position is >= ``seqlen`` are dropped from every (1, total) tensor and
          the rest re-packed into a shorter row; ``cu_seqlens`` / ``max_seqlen`` (and the
          ``cu_seq_lens_q/k``, ``max_length_q/k`` kwargs) are recomputed when present. The
          first label of each sequence stays -100. A padding sequence is cut like the others,
          so the row length is no longer a multiple of any ``pad_to_multiple_of``;
        - a padded batch, a dict (or ``BatchEncoding``) of (batch, seqlen, ...) tensors,
          right-padded (a left-padded ``attention_mask`` is an error): every tensor with the
          shape of ``input_ids`` in its first two dims keeps its first ``seqlen`` columns.

        Returns a new list / dict; the input is not modified.
        """
        limit = self.seqlen(step)
        if isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)):
            return [_cut_example(ex, limit, i) for i, ex in enumerate(batch)]
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError("batch must be a list of example dicts or a dict with 'input_ids', "
                            f"got {type(batch).__name__}")
        ids = batch["input_ids"]
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError("batch['input_ids'] must be a (batch, seqlen) tensor")
        if any(key in batch for key in _PACKED_KEYS) or (ids.shape[0] == 1
                                                         and "position_ids" in batch):
            return _cut_packed(batch, limit)
        mask = batch.get("attention_mask")
        if (isinstance(mask, Tensor) and mask.shape == ids.shape and mask.numel()
                and bool((mask[:, :1] == 0).logical_and(mask[:, -1:] != 0).any())):
            raise ValueError("a padded batch must be right-padded to be cut (a row starts with "
                             "padding and ends with a token: cutting would keep its padding)")
        out = dict(batch)
        for key, value in batch.items():
            if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[:2] == ids.shape:
                out[key] = value[:, :limit]
        return out

    def wrap_collator(self, collate_fn: Callable) -> Callable:
        """``collate_fn`` preceded by cutting the examples to ``seqlen(self.step)``."""
        if not callable(collate_fn):
            raise TypeError(f"collate_fn must be callable, got {type(collate_fn).__name__}")
        return WarmupCollator(self, collate_fn)


class WarmupCollator:
    """Cut examples to the warmup's current length, then collate (picklable for workers)."""

    def __init__(self, warmup: SeqLenWarmup, collate_fn: Callable):
        self.warmup = warmup
        self.collate_fn = collate_fn

    def __call__(self, examples):
        return self.collate_fn(self.warmup.apply(list(examples)))


_PACKED_KEYS = ("cu_seqlens", "cu_seq_lens_q", "cu_seq_lens_k")  # sequence boundaries of a row


def _cut_example(example, limit: int, i: int):
    if not isinstance(example, Mapping) or "input_ids" not in example:
        raise ValueError(f"batch[{i}] must be a dict with 'input_ids'")
    n = len(example["input_ids"])
    out = dict(example)
    for key, value in example.items():
        # lists, tuples, 1-D tensors and 1-D NumPy arrays of tokens
        is_seq = isinstance(value, (list, tuple)) or getattr(value, "ndim", None) == 1
        if is_seq and len(value) == n:
            out[key] = value[:limit]
    return out


def _cut_packed(batch: dict, limit: int) -> dict:
    ids = batch["input_ids"]
    if ids.shape[0] != 1:
        raise ValueError(
            f"a packed batch has input_ids of shape (1, total), got {tuple(ids.shape)}")
    if "position_ids" not in batch:
        raise ValueError("a packed batch needs 'position_ids' (restarting at 0 per sequence) to "
                         "be cut (e.g. DataCollatorWithFlattening(return_position_ids=True))")
    pos = batch["position_ids"]
    if pos.shape != ids.shape:
        raise ValueError(f"position_ids {tuple(pos.shape)} and input_ids {tuple(ids.shape)} "
                         "differ in shape")
    keep = pos[0] < limit
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[:2] == ids.shape:
            out[key] = value[:, keep]
    cu, max_seqlen = cu_seqlens_from_position_ids(out["position_ids"])
    cu = cu.to(batch["cu_seqlens"].device) if "cu_seqlens" in batch else cu
    for key in ("cu_seqlens", "cu_seq_lens_q", "cu_seq_lens_k"):
        if key in batch:
            out[key] = cu
    for key in ("max_seqlen", "max_length_q", "max_length_k"):
        if key in batch:
            out[key] = max_seqlen
    return out
