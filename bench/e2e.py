"""End to end: training steps of a Llama-style model (from a config, random weights) on
synthetic token data with long-tailed lengths, with the baseline stack, fasttrain's stack, and
the baseline with one fasttrain piece at a time.

- baseline: transformers ``sdpa`` attention on padded batches (sequences sorted by length and
  cut into micro-batches of at most the step's token budget of padded tokens, as with
  ``group_by_length``; gradients accumulated), peft LoRA, ``torch.optim.AdamW(fused=True)``.
- fasttrain: one packed row per step (position ids restarting at 0, labels masked at the
  boundaries, cu_seqlens as FlashAttention kwargs) through ``attn_implementation="fasttrain"``,
  peft LoRA layers patched by ``fuse_lora``, ``fasttrain.optim.AdamW``.
- ``+attention``, ``+lora``, ``+adamw``: the baseline with that one piece from fasttrain
  (``+attention`` packs too: fasttrain's attention is what makes packing pay).
- ``sdpa-packed``: the baseline on the packed rows, with transformers' own per-sequence mask
  from the position ids: packing without a varlen kernel (sdpa attends over the whole row,
  masked), which separates what packing gives from what the kernels give. Not in ``--targets``.

Every stack starts from the same weights and sees the same sequences in the same order; the
loss of a step is the sum of token losses over the step's real tokens divided by their count,
so the stacks compute the same quantity and their loss curves must agree (reported as the max
difference from the baseline's). Runs: ``lora`` (r=16 on every linear layer of the blocks, no
dropout, adapters in the model's dtype in both stacks) and ``full`` (all weights). Reported per
stack: step time (median and p20-p80 over the timed steps), real (non-padding) tokens/s, peak
memory (CUDA). CPU: a tiny model, to show the whole path works; GPU: a ~1B model.
"""
from __future__ import annotations

import copy
import gc
import itertools
import json
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from bench.common import Context
from bench.varlen_attn import long_tailed

BASELINE = "baseline"
SEED = 0


@dataclass
class Setup:
    model: dict  # LlamaConfig arguments
    tokens_per_step: int
    shortest: int
    longest: int
    timed_steps: int  # run twice: an untimed pass (every shape compiles and autotunes), then timed
    dtype: torch.dtype


def setup(ctx: Context) -> Setup:
    if ctx.cuda:
        return Setup(dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
                     tokens_per_step=16384, shortest=128, longest=4096, timed_steps=10,
                     dtype=torch.bfloat16)
    tiny = ctx.sizes == "tiny"
    return Setup(dict(hidden_size=64 if tiny else 128, intermediate_size=128 if tiny else 256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=256),
                 tokens_per_step=256 if tiny else 1024, shortest=8, longest=64 if tiny else 256,
                 timed_steps=2 if tiny else 4, dtype=torch.float32)


STACKS = {  # name: (packed rows, fasttrain attention, fused LoRA, fasttrain AdamW), as run
    "baseline": (False, False, False, False),
    "fasttrain": (True, True, True, True),
    "+attention": (True, True, False, False),
    "+lora": (False, False, True, False),
    "+adamw": (False, False, False, True),
    "sdpa-packed": (True, False, False, False),
}


def make_steps(s: Setup, n_steps: int, vocab: int) -> list[list[torch.Tensor]]:
    """The token sequences of each step: long-tailed lengths filling the step's budget."""
    gen = torch.Generator().manual_seed(SEED)
    return [[torch.randint(0, vocab, (n,), generator=gen)
             for n in long_tailed(s.tokens_per_step, s.shortest, s.longest, seed=SEED + step)]
            for step in range(n_steps)]


def padded_microbatches(seqs: list[torch.Tensor], budget: int, device) -> list[dict]:
    """Sorted by length, cut into micro-batches of at most ``budget`` padded tokens."""
    order = sorted(seqs, key=len, reverse=True)
    batches, current = [], []
    for seq in order:
        if current and (len(current) + 1) * len(current[0]) > budget:
            batches.append(current)
            current = []
        current.append(seq)
    batches.append(current)
    out = []
    for group in batches:
        width = len(group[0])
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for i, seq in enumerate(group):
            ids[i, :len(seq)] = seq
            mask[i, :len(seq)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device),
                    "labels": labels.to(device)})
    return out


def packed_row(seqs: list[torch.Tensor], device) -> list[dict]:
    """One row; each sequence's first label is masked so no token predicts across a boundary.
    With the sequence boundaries as FlashAttention kwargs (as ``DataCollatorWithFlattening(
    return_flash_attn_kwargs=True)`` gives them): the attention needs no host sync."""
    ids = torch.cat(seqs)[None]
    labels = torch.cat([torch.cat([torch.tensor([-100]), s[1:]]) for s in seqs])[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    lens = torch.tensor([len(s) for s in seqs])
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(device, torch.int32)
    longest = int(lens.max())
    return [{"input_ids": ids.to(device), "position_ids": position_ids.to(device),
             "labels": labels.to(device), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
             "max_length_q": longest, "max_length_k": longest}]


def real_targets(seqs: list[torch.Tensor]) -> int:
    return sum(len(s) - 1 for s in seqs)


def build(ctx: Context, s: Setup, run: str, stack: str):
    """(model, optimizer) of one stack, from the same seed."""
    import transformers

    _, fast_attention, fused_lora, fast_adamw = STACKS[stack]
    if fast_attention:
        from fasttrain.integrations.transformers import register

        attn = register()
    else:
        attn = "sdpa"
    torch.manual_seed(SEED)
    config = transformers.LlamaConfig(**s.model, max_position_embeddings=s.longest,
                                      attention_dropout=0.0, use_cache=False)
    model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config),
                                                          attn_implementation=attn)
    model = model.to(device=ctx.device, dtype=s.dtype)
    if run == "lora":
        import peft

        lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"])
        # adapters in the model's dtype in both stacks (peft's default would keep them in fp32
        # and run the baseline's LoRA terms in fp32 on fp32 copies of x, which fasttrain's fused
        # op does not): the stacks differ in their kernels and packing, not in precision
        model = peft.get_peft_model(model, lora, autocast_adapter_dtype=False)
        if fused_lora:
            from fasttrain.integrations.peft import fuse_lora

            report = fuse_lora(model)
            if report.n_not_fused:
                raise RuntimeError(f"fuse_lora left {report.n_not_fused} layers unfused")
    params = [p for p in model.parameters() if p.requires_grad]
    if fast_adamw:
        from fasttrain.optim import AdamW

        opt = AdamW(params, lr=1e-4, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=True)
    return model, opt


def train_step(model, opt, micro: list[dict], n_targets: int) -> float:
    total = 0.0
    for batch in micro:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        labels = batch["labels"]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
            reduction="sum") / n_targets
        loss.backward()
        total += loss.detach()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(total)


def progress(label: str, done: int, total: int) -> None:
    width = 20
    bar = "#" * (width * done // total) + "." * (width - width * done // total)
    end = "\n" if done == total else ""
    print(f"\r  {label:28} [{bar}] {done}/{total} steps", end=end, file=sys.stderr, flush=True)


def _model_bytes(model) -> int:
    """Bytes of the model's params and buffers (allocated before the peak counter is reset)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in itertools.chain(model.parameters(), model.buffers())}
    return sum(storages.values())


def run_stack(ctx: Context, s: Setup, run: str, stack: str, steps) -> dict:
    model, opt = build(ctx, s, run, stack)
    packed = STACKS[stack][0]
    batches = [packed_row(seqs, ctx.device) if packed
               else padded_microbatches(seqs, s.tokens_per_step, ctx.device) for seqs in steps]
    losses, times = [], []
    n_steps = 2 * len(steps)
    if ctx.cuda:  # the stack's own peak: above what was allocated before (model included)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() - _model_bytes(model)
    # The same steps twice, only the second pass timed: the first compiles and autotunes for
    # every shape the timed steps have (Triton specializes on sizes; LoRA tunes per M bucket).
    for i, (seqs, micro) in enumerate(list(zip(steps, batches)) * 2):
        start = time.perf_counter()
        losses.append(train_step(model, opt, micro, real_targets(seqs)))  # float(): syncs
        times.append(time.perf_counter() - start)
        progress(f"{run} {stack}", i + 1, n_steps)
    peak = torch.cuda.max_memory_allocated() - before if ctx.cuda else None
    padded_tokens = sum(b["input_ids"].numel() for micro in batches for b in micro)
    del model, opt, batches
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
    return {"losses": losses, "times": times[len(steps):], "peak_bytes": peak,
            "computed_tokens": padded_tokens}


def row(ctx: Context, s: Setup, run_name: str, stack: str, r: dict, real_tokens: int,
        base_losses: list[float] | None) -> dict:
    ms = np.array(r["times"]) * 1e3
    p50, p20, p80 = (float(np.percentile(ms, q)) for q in (50, 20, 80))
    diff = max(abs(a - b) for a, b in zip(r["losses"], base_losses)) if base_losses else None
    config = dict(s.model, tokens_per_step=s.tokens_per_step, lengths=[s.shortest, s.longest],
                  untimed_first_pass=True, timed_steps=s.timed_steps, real_tokens=real_tokens,
                  computed_tokens=r["computed_tokens"],
                  lora_r=16 if run_name == "lora" else None, seed=SEED)
    return {"kernel": "e2e", "provider": stack, "mode": run_name,
            "workload": "llama-1B" if ctx.cuda else "llama-tiny", "config": json.dumps(config),
            "dtype": str(s.dtype).removeprefix("torch."),
            "p50_ms": p50, "p20_ms": p20, "p80_ms": p80, "reps": len(ms),
            "tokens_per_s": real_tokens / (sum(r["times"]) or float("nan")),
            "peak_bytes": r["peak_bytes"], "losses": r["losses"], "loss_max_abs_diff": diff,
            "timing": "perf_counter, synchronized per step"}


def run(ctx: Context) -> Iterator[list[dict]]:
    """One row per stack, yielded as each finishes (the baseline first, then fasttrain's whole
    stack: a run cut off by a time limit keeps the pair that DESIGN's target compares)."""
    try:
        from peft import LoraConfig  # noqa: F401  (the names, not the lazy modules alone)
        from transformers import AutoModelForCausalLM  # noqa: F401
    except ImportError as e:
        ctx.skip("e2e", f"needs transformers and peft ({e})")
        return
    s = setup(ctx)
    steps = make_steps(s, s.timed_steps, s.model["vocab_size"])
    real = sum(len(x) for seqs in steps for x in seqs)
    # targets: the LoRA fine-tune with the two stacks DESIGN's end-to-end target compares
    targets = ctx.sizes == "targets"
    for run_name in ("lora",) if targets else ("lora", "full"):
        base_losses = None
        for stack in STACKS:
            if (run_name == "full" and stack == "+lora") or (
                    targets and stack not in (BASELINE, "fasttrain")):
                continue
            try:
                r = run_stack(ctx, s, run_name, stack, steps)
            except Exception as e:  # noqa: BLE001 - a stack that cannot run is skipped, with why
                ctx.skip(stack, f"{run_name} run: {type(e).__name__}: {e}".splitlines()[0])
                continue
            if stack == BASELINE:
                base_losses = r["losses"]
            out = row(ctx, s, run_name, stack, r, real, base_losses)
            if out["loss_max_abs_diff"] is not None and stack != BASELINE:
                print(f"e2e {run_name} {stack}: loss curve, max |difference| from the "
                      f"baseline's over {len(base_losses)} steps: "
                      f"{out['loss_max_abs_diff']:.2e}", flush=True)
            yield [out]
