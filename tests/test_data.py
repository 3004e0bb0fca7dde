"""fasttrain.data: packing, the packed collator, the length-bucketed sampler, seqlen warmup."""
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fasttrain.data import (
    IGNORE_INDEX,
    LengthBucketedBatchSampler,
    PackedCollator,
    SeqLenWarmup,
    pack_sequences,
)
from fasttrain.ops import cu_seqlens_from_position_ids


def _random_lengths(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


def _examples(lengths, seed=0, with_labels=False, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ex = {"input_ids": torch.randint(1, vocab, (n,), generator=g).tolist()}
        if with_labels:
            ex["labels"] = torch.randint(1, vocab, (n,), generator=g).tolist()
        out.append(ex)
    return out


def _next_fit(lengths, budget):
    """Naive packing: in order, start a new batch when the next example does not fit."""
    batches, cur, used = [], [], 0
    for i, n in enumerate(lengths):
        if cur and used + n > budget:
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return batches + ([cur] if cur else [])


# ---------------------------------------------------------------- pack_sequences

@pytest.mark.parametrize("n,lo,hi,budget,seed", [
    (1, 1, 1, 1, 0), (17, 1, 64, 64, 1), (123, 5, 300, 512, 2), (1025, 1, 2048, 4096, 3)])
def test_pack_invariants(n, lo, hi, budget, seed):
    lengths = _random_lengths(n, lo, hi, seed)
    packing = pack_sequences(lengths, budget)
    flat = sorted(i for b in packing.batches for i in b)
    assert flat == list(range(n)), "every example exactly once"
    for b in packing.batches:
        assert 0 < sum(lengths[i] for i in b) <= budget
    assert packing.num_tokens == sum(lengths)
    assert packing.efficiency == pytest.approx(sum(lengths) / (len(packing) * budget), rel=1e-12)
    assert len(packing) >= -(-sum(lengths) // budget)  # cannot beat the token count
    assert len(packing) <= len(_next_fit(lengths, budget))


def test_pack_beats_naive():
    # next-fit in order opens a batch per pair; best-fit decreasing pairs 6+4 exactly.
    lengths = [6, 6, 6, 4, 4, 4]
    assert len(_next_fit(lengths, 10)) == 4
    packing = pack_sequences(lengths, 10)
    assert len(packing) == 3
    assert packing.efficiency == 1.0
    assert sorted(sorted(lengths[i] for i in b) for b in packing.batches) == [[4, 6]] * 3
    # and over a long-tailed random mix
    rng = random.Random(0)
    lengths = [min(2048, int(rng.paretovariate(1.2) * 40)) for _ in range(500)]
    best, naive = pack_sequences(lengths, 2048), _next_fit(lengths, 2048)
    assert len(best) < len(naive)
    assert best.efficiency > 0.97


def test_pack_inputs_kinds_and_errors():
    lengths = [3, 5, 2]
    examples = _examples(lengths)
    ref = pack_sequences(lengths, 8).batches
    assert pack_sequences(examples, 8).batches == ref
    assert pack_sequences(torch.tensor(lengths), 8).batches == ref
    assert pack_sequences([e["input_ids"] for e in examples], 8).batches == ref
    with pytest.raises(ValueError, match="truncate=True"):
        pack_sequences([3, 9], 8)
    p = pack_sequences([3, 9], 8, truncate=True)
    assert p.num_tokens == 11 and len(p) == 2
    assert p.efficiency == pytest.approx(11 / 16)
    with pytest.raises(ValueError, match="at least one token"):
        pack_sequences([3, 0], 8)
    with pytest.raises(TypeError, match="max_tokens"):
        pack_sequences([3], 8.0)
    with pytest.raises(ValueError, match="max_tokens"):
        pack_sequences([3], 0)
    with pytest.raises(ValueError, match="input_ids"):
        pack_sequences([{"labels": [1]}], 8)
    with pytest.raises(TypeError, match=r"lengths_or_examples\[0\]"):
        pack_sequences([1.5], 8)
    empty = pack_sequences([], 8)
    assert empty.batches == [] and empty.efficiency == 0.0


# ---------------------------------------------------------------- PackedCollator

@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("lengths", [[1], [5, 1, 17], [123, 7, 64, 2]])
def test_collator_output(lengths, with_labels):
    examples = _examples(lengths, seed=len(lengths), with_labels=with_labels)
    out = PackedCollator()(examples)
    total = sum(lengths)
    assert out["input_ids"].shape == (1, total) and out["input_ids"].dtype == torch.long
    assert out["labels"].shape == (1, total) and out["labels"].dtype == torch.long
    assert out["position_ids"].shape == (1, total) and out["position_ids"].dtype == torch.long
    assert out["cu_seqlens"].dtype == torch.int32 and out["cu_seqlens"].shape == (len(lengths) + 1,)
    assert out["max_seqlen"] == max(lengths) and isinstance(out["max_seqlen"], int)
    cu, max_seqlen = cu_seqlens_from_position_ids(out["position_ids"])
    assert torch.equal(cu, out["cu_seqlens"]) and max_seqlen == out["max_seqlen"]
    for i, ex in enumerate(examples):
        s, e = int(cu[i]), int(cu[i + 1])
        assert e - s == lengths[i]
        assert out["input_ids"][0, s:e].tolist() == ex["input_ids"]
        assert out["position_ids"][0, s:e].tolist() == list(range(lengths[i]))
        want = ex["labels"] if with_labels else ex["input_ids"]
        assert out["labels"][0, s].item() == IGNORE_INDEX, "first label of each sequence masked"
        assert out["labels"][0, s + 1:e].tolist() == want[1:]


def test_collator_matches_hf_flattening():
    transformers = pytest.importorskip("transformers")
    examples = _examples([9, 1, 30, 4], seed=5, with_labels=True)
    ours = PackedCollator(return_flash_attn_kwargs=True)(examples)
    hf = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [dict(e) for e in examples])
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(ours[key], hf[key]), key
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert torch.equal(ours[key], hf[key].to(ours[key].dtype)), key
    assert ours["max_length_q"] == hf["max_length_q"] == ours["max_seqlen"]


@pytest.mark.parametrize("multiple", [1, 8, 64])
def test_collator_pad_to_multiple(multiple):
    lengths = [13, 2, 30]
    examples = _examples(lengths, seed=9)
    out = PackedCollator(pad_to_multiple_of=multiple, pad_token_id=7)(examples)
    total = sum(lengths)
    padded = -(-total // multiple) * multiple
    n_pad = padded - total
    assert out["input_ids"].shape == (1, padded)
    cu, max_seqlen = cu_seqlens_from_position_ids(out["position_ids"])
    assert torch.equal(cu, out["cu_seqlens"]) and max_seqlen == out["max_seqlen"]
    if n_pad:
        assert out["cu_seqlens"].tolist()[-2:] == [total, padded], "padding is its own sequence"
        assert (out["input_ids"][0, total:] == 7).all()
        assert (out["labels"][0, total:] == IGNORE_INDEX).all()
        assert out["position_ids"][0, total:].tolist() == list(range(n_pad))
    else:
        assert len(out["cu_seqlens"]) == len(lengths) + 1
    unpadded = PackedCollator()(examples)
    assert torch.equal(out["labels"][:, :total], unpadded["labels"])


def test_collator_max_length_budget_and_errors():
    examples = _examples([10, 3], seed=2, with_labels=True)
    out = PackedCollator(max_length=4)(examples)
    assert out["cu_seqlens"].tolist() == [0, 4, 7]
    assert out["input_ids"][0, :4].tolist() == examples[0]["input_ids"][:4]
    assert out["labels"][0, 1:4].tolist() == examples[0]["labels"][1:4]
    with pytest.raises(ValueError, match="max_tokens=12"):
        PackedCollator(max_tokens=12)(examples)
    assert PackedCollator(max_tokens=13)(examples)["input_ids"].shape == (1, 13)
    # tensor inputs are accepted and not modified
    ex = {"input_ids": torch.tensor([4, 5, 6]), "labels": torch.tensor([4, 5, 6])}
    out = PackedCollator()([ex])
    assert ex["labels"].tolist() == [4, 5, 6] and out["labels"].tolist() == [[-100, 5, 6]]
    with pytest.raises(ValueError, match="non-empty"):
        PackedCollator()([])
    with pytest.raises(ValueError, match=r"examples\[1\]"):
        PackedCollator()([{"input_ids": [1]}, {"ids": [2]}])
    with pytest.raises(ValueError, match="labels has 2"):
        PackedCollator()([{"input_ids": [1, 2, 3], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="no tokens"):
        PackedCollator()([{"input_ids": []}])
    with pytest.raises(TypeError, match="integers"):
        PackedCollator()([{"input_ids": [1.0, 2.0]}])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PackedCollator(pad_to_multiple_of=0)
    with pytest.raises(TypeError, match="pad_token_id"):
        PackedCollator(pad_token_id=None)


# ---------------------------------------------------------------- LengthBucketedBatchSampler

@pytest.mark.parametrize("padded", [False, True])
def test_sampler_coverage_budget_determinism(padded):
    lengths = _random_lengths(300, 1, 200, seed=11)
    kw = dict(max_tokens=512, bucket_size=64, seed=3, padded=padded)
    s = LengthBucketedBatchSampler(lengths, **kw)
    epoch0 = list(s)
    assert len(epoch0) == len(s)
    assert sorted(i for b in epoch0 for i in b) == list(range(300)), "every index once"
    for b in epoch0:
        cost = len(b) * max(lengths[i] for i in b) if padded else sum(lengths[i] for i in b)
        assert cost <= 512
    assert list(LengthBucketedBatchSampler(lengths, **kw)) == epoch0, "same seed, same batches"
    assert list(LengthBucketedBatchSampler(lengths, **{**kw, "seed": 4})) != epoch0
    assert list(LengthBucketedBatchSampler(lengths, **{**kw, "seed": np.int64(3)})) == epoch0
    with pytest.raises(TypeError, match="seed must be an int"):
        LengthBucketedBatchSampler(lengths, **{**kw, "seed": 3.0})
    s.set_epoch(1)
    epoch1 = list(s)
    assert epoch1 != epoch0
    assert sorted(i for b in epoch1 for i in b) == list(range(300))
    stats = s.stats()
    assert stats["batches"] == len(epoch1) and stats["real_tokens"] == sum(lengths)
    assert s.efficiency == pytest.approx(sum(lengths) / (len(epoch1) * 512), rel=1e-12)


@pytest.mark.parametrize("padded", [False, True])
def test_sampler_has_as_many_batches_every_epoch(padded):
    """HF Trainer reads len() once and counts gradient accumulation by it: an epoch that packed
    into fewer batches left its last micro-batch's gradient to the next epoch. Every epoch now
    has epoch 0's count (splitting or merging batches), within the budget, every index once."""
    lengths = _random_lengths(300, 1, 200, seed=11)
    kw = dict(max_tokens=512, bucket_size=64, seed=0, padded=padded)
    s = LengthBucketedBatchSampler(lengths, **kw)
    count = len(s)

    def cost(b):
        return len(b) * max(lengths[i] for i in b) if padded else sum(lengths[i] for i in b)

    raw, plans = [], []
    for epoch in range(1, 30):
        s.set_epoch(epoch)
        raw.append(len(s._pack(epoch)[0]))
        plans.append(list(s))
        assert len(plans[-1]) == len(s) == count
        assert sorted(i for b in plans[-1] for i in b) == list(range(300))
        assert all(cost(b) <= 512 for b in plans[-1])
    assert min(raw) < count < max(raw), "the epochs must pack into fewer and more batches"
    assert len({tuple(map(tuple, p)) for p in plans}) == len(plans), "each epoch reshuffled"


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_shards_batches_over_ranks(drop_last):
    lengths = _random_lengths(300, 1, 200, seed=14)
    kw = dict(max_tokens=512, bucket_size=64, seed=5, drop_last=drop_last)
    whole = list(LengthBucketedBatchSampler(lengths, **kw))
    world = 4
    assert len(whole) % world, "the case must need evening out"
    ranks = [LengthBucketedBatchSampler(lengths, num_replicas=world, rank=r, **kw)
             for r in range(world)]
    shards = [list(s) for s in ranks]
    n = len(whole) // world if drop_last else -(-len(whole) // world)
    assert [len(x) for x in shards] == [len(s) for s in ranks] == [n] * world, "same step count"
    # step t of rank r is batch t * world + r of the one-process plan (repeated from its start)
    padded = whole + whole[:n * world - len(whole)]
    assert all(shards[r][t] == padded[t * world + r] for r in range(world) for t in range(n))
    seen = sorted(i for x in shards for b in x for i in b)
    if drop_last:
        assert len(seen) == len(set(seen)), "no index twice"
    else:
        assert set(seen) == set(range(300)), "every index at least once"
    stats = ranks[1].stats()
    real = sum(lengths[i] for b in shards[1] for i in b)
    assert stats["real_tokens"] == real and stats["batches"] == n
    assert ranks[1].efficiency == pytest.approx(real / (n * 512))
    for s in ranks:  # a new epoch reshuffles on every rank alike
        s.set_epoch(1)
    assert sorted(len(s) for s in ranks) == [len(ranks[0])] * world
    assert [list(s) for s in ranks] != shards
    with pytest.raises(ValueError, match="rank must be in"):
        LengthBucketedBatchSampler(lengths, 512, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="num_replicas must be >= 1"):
        LengthBucketedBatchSampler(lengths, 512, num_replicas=0)
    with pytest.raises(TypeError, match="rank must be an int"):
        LengthBucketedBatchSampler(lengths, 512, num_replicas=2, rank=1.0)
    np_ints = LengthBucketedBatchSampler(lengths, np.int64(512), num_replicas=np.int64(world),
                                         rank=np.int32(1), **{k: v for k, v in kw.items()
                                                              if k != "max_tokens"})
    assert list(np_ints) == shards[1]


def test_sampler_packs_tightly_and_unshuffled_order():
    lengths = _random_lengths(400, 1, 300, seed=12)
    s = LengthBucketedBatchSampler(lengths, 1024, bucket_size=400, shuffle=False)
    assert list(s) == pack_sequences(lengths, 1024).batches
    assert s.efficiency == pytest.approx(pack_sequences(lengths, 1024).efficiency)
    assert s.efficiency > 0.95
    # padded mode groups similar lengths: less padding than random batches of the same count
    sp = LengthBucketedBatchSampler(lengths, 1024, bucket_size=400, seed=0, padded=True)
    pad_bucketed = sum(len(b) * max(lengths[i] for i in b) for b in sp)
    assert sp.efficiency == pytest.approx(sum(lengths) / (len(sp) * 1024))
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(0)).tolist()
    sizes = [len(b) for b in sp]
    rand_batches, k = [], 0
    for n in sizes:
        rand_batches.append(perm[k:k + n])
        k += n
    pad_random = sum(len(b) * max(lengths[i] for i in b) for b in rand_batches)
    assert pad_bucketed < pad_random


def test_sampler_with_dataloader_and_errors():
    lengths = _random_lengths(40, 1, 50, seed=13)
    examples = _examples(lengths, seed=13)
    sampler = LengthBucketedBatchSampler(examples, 128, seed=1)
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=PackedCollator(max_tokens=128))
    seen = 0
    for batch in loader:
        assert batch["input_ids"].shape[1] <= 128
        seen += len(batch["cu_seqlens"]) - 1
    assert seen == 40
    with pytest.raises(ValueError, match="truncate=True"):
        LengthBucketedBatchSampler([10, 200], 128)
    assert sum(map(len, LengthBucketedBatchSampler([10, 200], 128, truncate=True))) == 2
    with pytest.raises(TypeError, match="seed"):
        LengthBucketedBatchSampler([10], 128, seed="a")
    with pytest.raises(ValueError, match="bucket_size"):
        LengthBucketedBatchSampler([10], 128, bucket_size=0)


# ---------------------------------------------------------------- SeqLenWarmup

def test_warmup_schedule_values():
    w = SeqLenWarmup(1024, 100, start_seqlen=64, multiple_of=64)
    assert w.seqlen(0) == 64
    assert w.seqlen(100) == w.seqlen(10_000) == 1024
    for step in range(0, 101):
        raw = 64 + (1024 - 64) * step / 100
        want = 1024 if step == 100 else max(64, int(raw) // 64 * 64)
        assert w.seqlen(step) == want, step
        assert w.seqlen(step) % 64 == 0
    values = [w.seqlen(s) for s in range(120)]
    assert values == sorted(values), "non-decreasing"
    assert w.seqlen(50) == 512  # 64 + 960 / 2 = 544 -> 512
    # max_seqlen not a multiple: the end value is still max_seqlen, the ramp stays below it
    w = SeqLenWarmup(1000, 10, start_seqlen=100, multiple_of=64)
    assert [w.seqlen(s) for s in (0, 1, 5, 9, 10)] == [100, 128, 512, 896, 1000]
    assert SeqLenWarmup(256, 0).seqlen(0) == 256
    w.step = 5
    assert w.seqlen() == 512 and w.step == 5
    for bad, exc, name in [
            (dict(max_seqlen=0, warmup_steps=1), ValueError, "max_seqlen"),
            (dict(max_seqlen=64, warmup_steps=-1), ValueError, "warmup_steps"),
            (dict(max_seqlen=64, warmup_steps=1, start_seqlen=65), ValueError, "start_seqlen"),
            (dict(max_seqlen=64, warmup_steps=1.5), TypeError, "warmup_steps"),
            (dict(max_seqlen=64, warmup_steps=1, multiple_of=0), ValueError, "multiple_of")]:
        with pytest.raises(exc, match=name):
            SeqLenWarmup(**bad)
    with pytest.raises(ValueError, match="step"):
        w.seqlen(-1)


def test_warmup_apply_examples_and_padded():
    w = SeqLenWarmup(64, 4, start_seqlen=8, multiple_of=8)  # 8, 22->16, 36->32, 50->48, 64
    examples = _examples([30, 5, 70], seed=4, with_labels=True)
    examples[0]["attention_mask"] = [1] * 30
    cut = w.apply(examples, step=1)
    assert [len(e["input_ids"]) for e in cut] == [16, 5, 16]
    assert cut[0]["labels"] == examples[0]["labels"][:16]
    assert cut[0]["attention_mask"] == [1] * 16
    assert len(examples[0]["input_ids"]) == 30, "input untouched"
    g = torch.Generator().manual_seed(0)
    padded = {"input_ids": torch.randint(0, 100, (3, 40), generator=g),
              "attention_mask": torch.ones(3, 40, dtype=torch.long),
              "labels": torch.randint(0, 100, (3, 40), generator=g),
              "other": torch.zeros(5)}
    out = w.apply(padded, step=2)
    assert out["input_ids"].shape == (3, 32) and out["labels"].shape == (3, 32)
    assert torch.equal(out["input_ids"], padded["input_ids"][:, :32])
    assert out["other"] is padded["other"]
    assert w.apply(padded, step=4)["input_ids"].shape == (3, 40)
    with pytest.raises(TypeError, match="batch"):
        w.apply(torch.zeros(3), step=0)


@pytest.mark.parametrize("pad", [None, 16])
def test_warmup_apply_packed_equals_collating_cut_examples(pad):
    w = SeqLenWarmup(128, 10, start_seqlen=16, multiple_of=16)
    examples = _examples([40, 3, 100, 17, 16], seed=6, with_labels=True)
    collate = PackedCollator(return_flash_attn_kwargs=True, pad_to_multiple_of=pad)
    for step in (0, 3, 10):
        limit = w.seqlen(step)
        got = w.apply(collate(examples), step)
        want = PackedCollator(return_flash_attn_kwargs=True)(w.apply(examples, step))
        total = sum(min(n, limit) for n in (40, 3, 100, 17, 16))
        for key in ("input_ids", "labels", "position_ids"):
            assert torch.equal(got[key][:, :total], want[key]), (key, step)
        assert got["max_seqlen"] == got["max_length_q"]
        cu, m = cu_seqlens_from_position_ids(got["position_ids"])
        assert torch.equal(got["cu_seqlens"], cu) and torch.equal(got["cu_seq_lens_k"], cu)
        assert got["max_seqlen"] == m <= limit
        if pad is None:
            assert torch.equal(got["cu_seqlens"], want["cu_seqlens"])
            assert got["max_seqlen"] == want["max_seqlen"]


def test_warmup_collator_in_dataloader_workers():
    """warmup.step set in the main process reaches the collator in a worker process."""
    w = SeqLenWarmup(64, 4, start_seqlen=8, multiple_of=8)
    examples = _examples([60] * 8, seed=8)
    sampler = [[0, 1], [2, 3], [4, 5], [6, 7]]
    loader = DataLoader(examples, batch_sampler=sampler, num_workers=1, prefetch_factor=1,
                        collate_fn=w.wrap_collator(PackedCollator()))
    it = iter(loader)
    widths = []
    for step in range(4):
        widths.append(next(it)["input_ids"].shape[1])
        w.step = step + 1
    # collation runs ahead by up to (prefetch + the one being produced) batches, so compare
    # with the schedule allowing that delay
    sched = [2 * w.seqlen(s) for s in range(5)]
    assert widths == sorted(widths)
    assert widths[0] == sched[0]
    assert widths[-1] > widths[0], "the workers saw the step grow"
    assert all(sched[max(0, s - 2)] <= widths[s] <= sched[s] for s in range(4))
    with pytest.raises(TypeError, match="collate_fn"):
        w.wrap_collator(None)


def test_numpy_token_arrays_and_the_epoch_hook_loops_call():
    np = pytest.importorskip("numpy")
    examples = [{"input_ids": np.arange(1, n + 1)} for n in (40, 7, 25)]
    assert pack_sequences(examples, max_tokens=64).batches  # lengths read from the arrays
    warmup = SeqLenWarmup(max_seqlen=64, start_seqlen=8, warmup_steps=10, multiple_of=8)
    cut = warmup.apply(examples, step=0)
    assert [len(e["input_ids"]) for e in cut] == [8, 7, 8]
    # Lightning and similar loops call batch_sampler.sampler.set_epoch(epoch)
    sampler = LengthBucketedBatchSampler([5, 9, 3, 7, 8, 2], max_tokens=12, seed=0)
    first = list(sampler)
    sampler.sampler.set_epoch(1)
    assert sampler.epoch == 1 and list(sampler) != first


def test_sampler_reads_the_epoch_at_the_first_batch():
    """A resumed Lightning run makes the iterator before calling set_epoch."""
    lengths = [random.Random(5).randint(1, 90) for _ in range(200)]
    sampler = LengthBucketedBatchSampler(lengths, max_tokens=256, seed=3)
    sampler.set_epoch(2)
    expected = list(sampler)
    sampler.set_epoch(0)
    batches = iter(sampler)
    sampler.set_epoch(2)
    assert list(batches) == expected != list(iter(LengthBucketedBatchSampler(
        lengths, max_tokens=256, seed=3)))


def test_warmup_apply_mappings_flattened_rows_and_left_padding():
    from collections import UserDict

    warmup = SeqLenWarmup(max_seqlen=64, warmup_steps=10, start_seqlen=4, multiple_of=1)
    ids = torch.arange(1, 19).reshape(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    # a BatchEncoding-like mapping (HF's padding collators return one)
    out = warmup.apply(UserDict(input_ids=ids, attention_mask=mask), 0)
    assert torch.equal(out["input_ids"], ids[:, :4]) and torch.equal(out["attention_mask"],
                                                                      mask[:, :4])
    left = mask.flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        warmup.apply({"input_ids": ids, "attention_mask": left}, 0)
    # a flattened row with its boundaries but no position ids cannot be cut
    cu = torch.tensor([0, 5, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="position_ids"):
        warmup.apply({"input_ids": ids[:1], "cu_seq_lens_q": cu, "cu_seq_lens_k": cu}, 0)


def test_warmup_steps_as_numpy_or_tensor_ints_and_lengths_as_tensors():
    warmup = SeqLenWarmup(max_seqlen=512, warmup_steps=100, start_seqlen=64, multiple_of=64)
    assert warmup.seqlen(np.int64(50)) == warmup.seqlen(torch.tensor(50)) == warmup.seqlen(50)
    warmup.step = np.int32(50)
    assert warmup.step == 50
    for bad in (2.9, True, torch.tensor(2.5)):
        with pytest.raises(TypeError, match="step must be an int"):
            warmup.step = bad
    packing = pack_sequences([torch.tensor(5), torch.tensor(7), 3], max_tokens=10)
    assert sorted(sum(packing.batches, [])) == [0, 1, 2] and packing.num_tokens == 15
    with pytest.raises(TypeError, match="int length"):
        pack_sequences([torch.tensor(5.0)], max_tokens=10)
