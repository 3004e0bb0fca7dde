"""HF Trainer callbacks for fasttrain. transformers is imported here only (not by fasttrain).

``SeqLenWarmupCallback(warmup)`` keeps ``warmup.step`` (a ``fasttrain.data.SeqLenWarmup``) equal
to the Trainer's optimizer step, so a collator built with ``warmup.wrap_collator(...)`` cuts
each batch to the scheduled length::

    warmup = SeqLenWarmup(max_seqlen=2048, warmup_steps=1000)
    trainer = Trainer(model, args, train_dataset=ds,
                      data_collator=warmup.wrap_collator(PackedCollator()),
                      callbacks=[SeqLenWarmupCallback(warmup)])

The Trainer's loader collates one batch ahead (more with ``dataloader_num_workers``), so a
batch is cut with the length of the step before the one that trains on it (with gradient
accumulation, the first micro-batch of a step; the others get the step's own length). A run
resumed during the warmup (``resume_from_checkpoint``) differs there once: its first batch,
collated before any step of the new run, gets the restored step's length, where the
uninterrupted run had cut it with the step before's; from the next batch on the two agree.

The Trainer collates evaluation batches with the same ``data_collator``: evaluations during
the warmup see the cut lengths too, and their losses are not comparable with later ones.
Evaluate after the warmup, or give evaluation its own collator (override
``Trainer.get_eval_dataloader``).
"""
from __future__ import annotations

from transformers import TrainerCallback

from fasttrain.data.warmup import SeqLenWarmup


class SeqLenWarmupCallback(TrainerCallback):
    """Sets ``warmup.step`` to ``state.global_step`` at the start of training and after every
    optimizer step (a resumed run starts from the restored step)."""

    def __init__(self, warmup: SeqLenWarmup):
        if not isinstance(warmup, SeqLenWarmup):
            raise TypeError(f"warmup must be a fasttrain.data.SeqLenWarmup, got "
                            f"{type(warmup).__name__}")
        self.warmup = warmup

    def on_train_begin(self, args, state, control, **kwargs):
        self.warmup.step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        self.warmup.step = state.global_step
