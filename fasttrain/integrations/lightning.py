"""Lightning glue: gradient clipping inside the fasttrain AdamW step.

Return the fasttrain optimizer from ``configure_optimizers`` as any torch optimizer, with the
clipping threshold on the optimizer, and leave Lightning's ``gradient_clip_val`` unset::

    class Model(L.LightningModule):
        def configure_optimizers(self):
            return fasttrain.optim.AdamW(self.parameters(), lr=1e-3, max_grad_norm=1.0)

    trainer = L.Trainer(callbacks=[FasttrainClipping()])  # no gradient_clip_val

Why Lightning's clipping must stay off: Lightning clips between backward and the step with
``clip_grad_norm_`` (one more pass over every gradient); the fasttrain step then measures the
norm again and clips a second time, so the work is done twice, and under AMP Lightning refuses
to clip at all for an optimizer that unscales the gradients in its own step (fasttrain AdamW
does, through ``GradScaler``'s fused-optimizer protocol). With ``max_grad_norm`` the norm of the
unscaled gradients is computed inside the step, on the device, without a host sync.

``FasttrainClipping`` (a Lightning ``Callback``) checks this at ``fit`` start (``ValueError``
when both clip) and logs ``optimizer.last_grad_norm`` (the unclipped norm) as ``grad_norm``.

lightning (or the older ``pytorch_lightning``) is imported by this module only; it is not a
dependency of fasttrain.
"""
from __future__ import annotations

try:
    import lightning.pytorch as pl
except ImportError:  # the standalone package
    import pytorch_lightning as pl

from fasttrain.optim import AdamW


def fasttrain_optimizers(trainer) -> list:
    """The fasttrain optimizers (``fasttrain.optim.AdamW``/``Adam``) among
    ``trainer.optimizers``."""
    return [opt for opt in trainer.optimizers if isinstance(opt, AdamW)]


def check_clipping(trainer) -> None:
    """``ValueError`` if Lightning's ``gradient_clip_val`` is set while a fasttrain optimizer
    clips in its step (``max_grad_norm``): the gradients would be clipped twice."""
    clip_val = trainer.gradient_clip_val
    if not clip_val:
        return
    for opt in fasttrain_optimizers(trainer):
        if opt.max_grad_norm:
            raise ValueError(
                f"Trainer(gradient_clip_val={clip_val}) and fasttrain AdamW(max_grad_norm="
                f"{opt.max_grad_norm}) would both clip the gradients; leave gradient_clip_val "
                "unset (None) and let the optimizer clip inside its step")


class FasttrainClipping(pl.Callback):
    """Checks that only the fasttrain optimizer clips, and logs its gradient norm.

    log_name: the metric name of ``optimizer.last_grad_norm`` (None: do not log). With several
    fasttrain optimizers the i-th one after the first is logged as ``f"{log_name}_{i}"``.
    """

    def __init__(self, log_name: str | None = "grad_norm"):
        self.log_name = log_name

    def on_fit_start(self, trainer, pl_module) -> None:
        check_clipping(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.log_name is None:
            return
        # with gradient accumulation the optimizer steps (and measures a norm) every
        # accumulate_grad_batches batches: log only then, not the previous step's norm again
        if (batch_idx + 1) % trainer.accumulate_grad_batches and not trainer.is_last_batch:
            return
        for i, opt in enumerate(fasttrain_optimizers(trainer)):
            norm = opt.last_grad_norm
            if norm is not None:
                name = self.log_name if i == 0 else f"{self.log_name}_{i}"
                pl_module.log(name, norm.detach().float(), on_step=True, on_epoch=False)
