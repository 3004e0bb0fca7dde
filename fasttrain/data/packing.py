"""Pack tokenized examples into token budgets for varlen attention.

- ``pack_sequences(lengths, max_tokens)``: best-fit-decreasing bin packing of example lengths
  into batches of at most ``max_tokens`` tokens; returns the batches (lists of example indices)
  and the packing efficiency, real tokens / (number of batches * ``max_tokens``).
- ``PackedCollator``: a list of examples -> one packed row (``input_ids`` (1, total), ``labels``,
  ``position_ids``, ``cu_seqlens``, ``max_seqlen``), the layout of transformers'
  ``DataCollatorWithFlattening`` plus the varlen metadata.
- ``LengthBucketedBatchSampler``: a ``torch.utils.data.Sampler`` of index lists that fit a token
  budget, shuffled with a seed per epoch, packed bucket by bucket.

An example is a dict with ``input_ids`` (a list of ints or a 1-D integer tensor) and optionally
``labels`` of the same length, as produced by a tokenizer.
"""
from __future__ import annotations

import bisect
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler

IGNORE_INDEX = -100  # the label that torch's and HF's cross-entropy losses skip


@dataclass
class Packing:
    """Result of ``pack_sequences``: ``batches[i]`` lists the example indices of batch i;
    ``efficiency`` = real tokens / (len(batches) * max_tokens), in (0, 1]."""

    batches: list[list[int]]
    efficiency: float
    max_tokens: int
    num_tokens: int  # real tokens packed (lengths counted after truncation)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _length_of(item, where: str) -> int:
    if isinstance(item, bool):
        raise TypeError(f"{where}: expected a length, got a bool")
    if isinstance(item, Mapping):
        if "input_ids" not in item:
            raise ValueError(f"{where}: an example dict needs an 'input_ids' entry")
        item = item["input_ids"]
    if isinstance(item, Tensor) and item.dim() == 0:  # a length as a 0-d integer tensor
        if item.is_floating_point() or item.is_complex():
            raise TypeError(f"{where}: expected an int length, got a {item.dtype} tensor")
        return int(item)
    if isinstance(item, Tensor):
        if item.dim() != 1:
            raise ValueError(f"{where}: input_ids must be 1-D, got shape {tuple(item.shape)}")
        return item.numel()
    if isinstance(item, Sequence) and not isinstance(item, str):
        return len(item)
    if getattr(item, "ndim", None) == 1:  # a NumPy array of tokens
        return len(item)
    if hasattr(item, "__index__"):
        return operator.index(item)
    raise TypeError(f"{where}: expected an int length, a token sequence or an example dict, "
                    f"got {type(item).__name__}")


def _lengths(lengths_or_examples, name: str) -> list[int]:
    if isinstance(lengths_or_examples, Tensor):
        if lengths_or_examples.dim() != 1 or lengths_or_examples.is_floating_point():
            raise ValueError(f"{name} as a tensor must be 1-D integer, got "
                             f"{lengths_or_examples.dtype} of shape "
                             f"{tuple(lengths_or_examples.shape)}")
        lengths = lengths_or_examples.tolist()
    else:
        lengths = [_length_of(x, f"{name}[{i}]") for i, x in enumerate(lengths_or_examples)]
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"{name}[{i}] has length {n}; every example needs at least one token")
    return lengths


def _check_int(value, name: str) -> int:
    """``value`` as an int: Python and NumPy integers pass, bools and floats do not."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return operator.index(value)


def _check_budget(max_tokens, name="max_tokens") -> int:
    max_tokens = _check_int(max_tokens, name)
    if max_tokens < 1:
        raise ValueError(f"{name} must be >= 1, got {max_tokens}")
    return max_tokens


def _clip_lengths(lengths: list[int], max_tokens: int, truncate: bool, name: str) -> list[int]:
    if truncate:
        return [min(n, max_tokens) for n in lengths]
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"{name}[{i}] has {n} tokens, more than max_tokens={max_tokens}; "
                             f"pass truncate=True to cut such examples to max_tokens")
    return lengths


def _best_fit_decreasing(lengths: list[int], indices: list[int],
                         max_tokens: int) -> list[list[int]]:
    """Longest first, each into the open batch with the least room that still fits it."""
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, batch id), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            batches.append([i])
            room, b = max_tokens - n, len(batches) - 1
        else:
            room, b = free.pop(k)
            batches[b].append(i)
            room -= n
        if room > 0:
            bisect.insort(free, (room, b))
    return batches


def pack_sequences(lengths_or_examples, max_tokens: int, *, truncate: bool = False) -> Packing:
    """Pack examples into batches of at most ``max_tokens`` tokens (best-fit decreasing).

    lengths_or_examples: a sequence of lengths (ints or a 1-D integer tensor), of token
        sequences, or of example dicts with ``input_ids``.
    max_tokens: the token budget of one batch (the packed row length).
    truncate: an example longer than ``max_tokens`` raises ``ValueError`` (default) or, with
        ``truncate=True``, counts as ``max_tokens`` tokens (it fills a batch alone; the collator
        given ``max_length=max_tokens`` cuts it to that).

    Returns a ``Packing``: ``batches`` (lists of example indices, longest example first; every
    index exactly once) and ``efficiency`` = real tokens / (len(batches) * max_tokens).
    Best-fit decreasing uses at most 11/9 OPT + 6/9 batches.
    """
    max_tokens = _check_budget(max_tokens)
    lengths = _clip_lengths(_lengths(lengths_or_examples, "lengths_or_examples"), max_tokens,
                            truncate, "lengths_or_examples")
    batches = _best_fit_decreasing(lengths, list(range(len(lengths))), max_tokens)
    total = sum(lengths)
    eff = total / (len(batches) * max_tokens) if batches else 0.0
    return Packing(batches=batches, efficiency=eff, max_tokens=max_tokens, num_tokens=total)


def _as_ids(x, name: str) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} has no tokens")
    if t.is_floating_point() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    return t.to(torch.long)


class PackedCollator:
    """Concatenate a list of examples into one packed row for varlen attention.

    Output (a dict of tensors, like transformers' ``DataCollatorWithFlattening``):

    - ``input_ids``: (1, total) int64, the examples back to back.
    - ``labels``: (1, total) int64, each example's ``labels`` (or its ``input_ids`` when it has
      none), unshifted (the model shifts: the logit at token t is scored against label t + 1),
      with the **first label of every example set to -100**. So the last token of one example
      is never trained to predict the first token of the next, and the first token of an
      example (which has nothing before it) predicts nothing. This is exactly
      ``DataCollatorWithFlattening``'s ``[separator_id] + labels[1:]`` with separator -100.
    - ``position_ids``: (1, total) int64, restarting at 0 for every example.
    - ``cu_seqlens``: (num_seqs + 1,) int32, cumulative sequence starts; ``cu_seqlens[-1] ==
      total``. Equal to ``fasttrain.ops.cu_seqlens_from_position_ids(position_ids)[0]``.
    - ``max_seqlen``: int, the longest sequence.
    - with ``return_flash_attn_kwargs=True`` also ``cu_seq_lens_q``/``cu_seq_lens_k`` (= cu_seqlens)
      and ``max_length_q``/``max_length_k`` (= max_seqlen), the names transformers passes to
      its attention functions.

    An example without tokens is a ``ValueError`` (``DataCollatorWithFlattening`` skips it
    silently); filter empty examples out of the dataset first.

    max_length: cut every example to its first ``max_length`` tokens (None: keep all).
    max_tokens: raise ``ValueError`` if the packed row (before padding) exceeds this budget.
    pad_to_multiple_of: append ``pad_token_id`` tokens so that ``total`` is a multiple of this
        (shape-stable batches for kernels / compile). The padding forms **its own sequence**:
        its position ids restart at 0, it is the last entry of ``cu_seqlens`` (so attention never
        mixes it with real tokens and ``cu_seqlens`` still matches ``position_ids``), its labels
        are all -100 (no loss).
    """

    def __init__(self, *, max_length: int | None = None, max_tokens: int | None = None,
                 pad_to_multiple_of: int | None = None, pad_token_id: int = 0,
                 return_flash_attn_kwargs: bool = False):
        if max_length is not None:
            _check_budget(max_length, "max_length")
        if max_tokens is not None:
            _check_budget(max_tokens, "max_tokens")
        if pad_to_multiple_of is not None:
            _check_budget(pad_to_multiple_of, "pad_to_multiple_of")
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
        self.max_length = max_length
        self.max_tokens = max_tokens
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = pad_token_id
        self.return_flash_attn_kwargs = return_flash_attn_kwargs

    def __call__(self, examples) -> dict:
        if isinstance(examples, Mapping) or not isinstance(examples, Sequence) or not examples:
            raise ValueError("PackedCollator expects a non-empty list of example dicts")
        ids, labels = [], []
        for i, ex in enumerate(examples):
            if not isinstance(ex, Mapping) or "input_ids" not in ex:
                raise ValueError(f"examples[{i}] must be a dict with 'input_ids'")
            x = _as_ids(ex["input_ids"], f"examples[{i}]['input_ids']")
            y = ex.get("labels")
            y = x.clone() if y is None else _as_ids(y, f"examples[{i}]['labels']").clone()
            if y.numel() != x.numel():
                raise ValueError(f"examples[{i}]: labels has {y.numel()} entries, input_ids "
                                 f"{x.numel()}")
            if self.max_length is not None:
                x, y = x[: self.max_length], y[: self.max_length]
            y[0] = IGNORE_INDEX
            ids.append(x)
            labels.append(y)
        lengths = [x.numel() for x in ids]
        total = sum(lengths)
        if self.max_tokens is not None and total > self.max_tokens:
            raise ValueError(f"the examples hold {total} tokens, more than max_tokens="
                             f"{self.max_tokens}")
        if self.pad_to_multiple_of is not None and total % self.pad_to_multiple_of:
            n_pad = self.pad_to_multiple_of - total % self.pad_to_multiple_of
            ids.append(torch.full((n_pad,), self.pad_token_id, dtype=torch.long))
            labels.append(torch.full((n_pad,), IGNORE_INDEX, dtype=torch.long))
            lengths.append(n_pad)
        lens = torch.tensor(lengths, dtype=torch.int32)
        cu = torch.nn.functional.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
        starts = torch.repeat_interleave(cu[:-1].long(), lens.long())
        position_ids = torch.arange(int(cu[-1]), dtype=torch.long) - starts
        max_seqlen = max(lengths)
        batch = {
            "input_ids": torch.cat(ids)[None],
            "labels": torch.cat(labels)[None],
            "position_ids": position_ids[None],
            "cu_seqlens": cu,
            "max_seqlen": max_seqlen,
        }
        if self.return_flash_attn_kwargs:
            batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_seqlen,
                         max_length_k=max_seqlen)
        return batch


class LengthBucketedBatchSampler(Sampler):
    """Batches of example indices whose total tokens fit ``max_tokens``, for a DataLoader's
    ``batch_sampler`` (with ``PackedCollator`` as ``collate_fn``).

    Each epoch the indices are shuffled with ``seed + epoch``, cut into buckets of
    ``bucket_size`` examples, and each bucket is packed by best-fit decreasing (a bigger bucket
    packs tighter but mixes less); the batches of all buckets are then shuffled. Every index
    appears exactly once per epoch (over all ranks, apart from the batches repeated or dropped
    to even them out; see ``num_replicas``). Call ``set_epoch(epoch)`` each epoch, like
    ``DistributedSampler``. Every epoch has as many batches as epoch 0, since trainers read
    ``len()`` once (HF Trainer also counts its gradient accumulation by it: an epoch that ended
    early left its last micro-batches' gradients to the next epoch). Each shuffle packs
    differently, into one or two batches more or fewer: fewer are split (the one with the most
    examples), more merged (the emptiest batch's examples moved into the others' room). Where
    they do not fit there, the epoch keeps its extra batches, which such trainers skip (measured:
    about 1% of epochs of small random datasets, none of 2K-20K examples).

    lengths: token count per example (ints, a 1-D integer tensor, or example dicts).
    max_tokens: token budget per batch.
    padded: False (default) counts real tokens (packed rows). True counts padded tokens,
        ``len(batch) * longest``, for padded (batch, seqlen) batches; each bucket is then sorted
        by length and cut greedily, which keeps similar lengths together.
    truncate: as in ``pack_sequences`` (over-long examples error, or count as ``max_tokens``).
    shuffle: False keeps the index order (buckets in order, batches in packing order).
    num_replicas, rank: data-parallel sharding for a plain DDP/FSDP loop (pass the world size
        and this process's rank). Every rank plans the same epoch from the same seed and takes
        every ``num_replicas``-th batch, so all ranks run the same number of steps: the last
        batches are repeated from the start to make the count divisible, or dropped with
        ``drop_last=True``. Leave the default (1, 0) under HF Trainer/accelerate, which shard
        a batch sampler themselves.

    ``efficiency`` (and ``stats()``) report the real tokens of this rank's batches /
    (batches * max_tokens).
    """

    def __init__(self, lengths, max_tokens: int, *, bucket_size: int = 1024, shuffle: bool = True,
                 seed: int = 0, padded: bool = False, truncate: bool = False,
                 num_replicas: int = 1, rank: int = 0, drop_last: bool = False):
        self.max_tokens = _check_budget(max_tokens)
        self.bucket_size = _check_budget(bucket_size, "bucket_size")
        self.num_replicas = _check_budget(num_replicas, "num_replicas")
        rank = _check_int(rank, "rank")
        if not 0 <= rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={self.num_replicas}), got {rank}")
        self.rank = rank
        self.drop_last = bool(drop_last)
        seed = _check_int(seed, "seed")
        self.lengths = _clip_lengths(_lengths(lengths, "lengths"), self.max_tokens, truncate,
                                     "lengths")
        self.shuffle = shuffle
        self.seed = seed
        self.padded = padded
        self.epoch = 0
        self._plan: tuple[int, list[list[int]]] | None = None
        self._count: int | None = None  # batches per epoch: epoch 0's

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def sampler(self) -> "LengthBucketedBatchSampler":
        """Itself: Lightning (and other loops) call ``batch_sampler.sampler.set_epoch``."""
        return self

    def _pack(self, epoch: int) -> tuple[list[list[int]], torch.Generator]:
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        batches = []
        for s in range(0, n, self.bucket_size):
            bucket = order[s : s + self.bucket_size]
            if self.padded:
                batches += self._cut_padded(bucket)
            else:
                batches += _best_fit_decreasing(self.lengths, bucket, self.max_tokens)
        return batches, g

    def _batches(self) -> list[list[int]]:
        if self._plan is not None and self._plan[0] == self.epoch:
            return self._plan[1]
        batches, g = self._pack(self.epoch)
        if self.epoch != 0:
            if self._count is None:
                self._count = len(self._pack(0)[0])
            batches = self._to_count(batches, self._count)
        if self.shuffle:
            perm = torch.randperm(len(batches), generator=g).tolist()
            batches = [batches[i] for i in perm]
        if self.num_replicas > 1:
            if self.drop_last:
                batches = batches[:len(batches) - len(batches) % self.num_replicas]
            elif batches:
                short = -len(batches) % self.num_replicas
                batches = batches + [batches[i % len(batches)] for i in range(short)]
            batches = batches[self.rank::self.num_replicas]
        self._plan = (self.epoch, batches)
        return batches

    def _to_count(self, batches: list[list[int]], count: int) -> list[list[int]]:
        """``batches`` made ``count`` long where they can be: fewer are split (the one with the
        most examples, into two of alternating lengths), more merged (the emptiest one's
        examples moved into the others' room, best fit) until one does not fit anywhere."""
        batches = [list(b) for b in batches]
        while len(batches) < count:  # count <= examples: some batch has two or more
            k = max(range(len(batches)), key=lambda j: (len(batches[j]), -j))
            by_length = sorted(batches[k], key=lambda i: (self.lengths[i], i))
            batches[k:k + 1] = [by_length[0::2], by_length[1::2]]
        rows = [len(b) for b in batches]
        longest = [max(self.lengths[i] for i in b) for b in batches]
        real = [sum(self.lengths[i] for i in b) for b in batches]

        def load(j, extra=0):  # what batch j costs of the budget, with an example of extra more
            if self.padded:
                return (rows[j] + (extra > 0)) * max(longest[j], extra)
            return real[j] + extra

        while len(batches) > count:
            k = min(range(len(batches)), key=lambda j: (load(j), j))
            moves = []
            for i in sorted(batches[k], key=lambda i: (-self.lengths[i], i)):
                n = self.lengths[i]
                fits = [j for j in range(len(batches)) if j != k and load(j, n) <= self.max_tokens]
                if not fits:  # undo this merge; the epoch keeps its extra batches
                    for j, i, before in reversed(moves):
                        batches[j].pop()
                        rows[j], longest[j], real[j] = before
                    return batches
                j = max(fits, key=lambda j: (load(j), -j))  # best fit: the fullest that fits
                moves.append((j, i, (rows[j], longest[j], real[j])))
                batches[j].append(i)
                rows[j], longest[j], real[j] = rows[j] + 1, max(longest[j], n), real[j] + n
            for stats in (batches, rows, longest, real):
                del stats[k]
        return batches

    def _cut_padded(self, bucket: list[int]) -> list[list[int]]:
        out, cur, longest = [], [], 0
        for i in sorted(bucket, key=lambda i: (self.lengths[i], i)):
            n = self.lengths[i]
            if cur and (len(cur) + 1) * max(longest, n) > self.max_tokens:
                out.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, n)
        if cur:
            out.append(cur)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        # lazy: the epoch is read at the first batch, not when iter() is called (Lightning
        # makes the iterator of a resumed run before its set_epoch)
        for batch in self._batches():
            yield list(batch)

    def __len__(self) -> int:
        return len(self._batches())

    def stats(self) -> dict:
        """{'batches', 'real_tokens', 'budget_tokens', 'efficiency'} of the current epoch."""
        batches = self._batches()
        real = sum(self.lengths[i] for b in batches for i in b)
        budget = len(batches) * self.max_tokens
        return dict(batches=len(batches), real_tokens=real, budget_tokens=budget,
                    efficiency=real / budget if budget else 0.0)

    @property
    def efficiency(self) -> float:
        return self.stats()["efficiency"]
