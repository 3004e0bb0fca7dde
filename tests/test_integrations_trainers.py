"""fasttrain AdamW inside trainers: torch LR schedulers (tensor lr, CUDA graphs), the HF Trainer
(optimizer arguments, packed batches, sequence-length warmup callback) and Lightning."""
import math

import pytest
import torch
from torch.optim import lr_scheduler

import fasttrain.optim
from fasttrain.data import PackedCollator, SeqLenWarmup
from tests.helpers import assert_close

SCHEDULERS = {
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda s: 0.5 + 0.5 * math.cos(s / 3)),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=40),
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=7, gamma=0.3),
    "LinearLR+ExponentialLR": lambda opt: lr_scheduler.SequentialLR(
        opt, [lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5),
              lr_scheduler.ExponentialLR(opt, gamma=0.95)], milestones=[5]),
}


def _params(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37, 5), (123,), (17, 3, 2)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]


# ---------------------------------------------------------------- torch LR schedulers

@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_torch_scheduler_drives_tensor_lr(name, max_grad_norm):
    """The scheduler fills the tensor lr in place; the steps match torch.optim.AdamW's."""
    ref_params, params = _params("cpu"), _params("cpu")
    ref = torch.optim.AdamW(ref_params, lr=torch.tensor(1e-2), betas=(0.9, 0.95),
                            weight_decay=0.1)
    opt = fasttrain.optim.AdamW(params, lr=torch.tensor(1e-2), betas=(0.9, 0.95),
                                weight_decay=0.1, max_grad_norm=max_grad_norm)
    ref_sched, sched = SCHEDULERS[name](ref), SCHEDULERS[name](opt)
    lr_tensor = opt.param_groups[0]["lr"]
    g = torch.Generator().manual_seed(1)
    for step in range(40):
        grads = [torch.randn(p.shape, generator=g) * 3 for p in params]
        for p, rp, gr in zip(params, ref_params, grads):
            p.grad, rp.grad = gr.clone(), gr.clone()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref_params, max_grad_norm)
        ref.step()
        opt.step()
        ref_sched.step()
        sched.step()
        assert opt.param_groups[0]["lr"] is lr_tensor, "the scheduler replaced the lr tensor"
        assert float(lr_tensor) == float(ref.param_groups[0]["lr"]), step
    assert float(lr_tensor) != 1e-2
    for i, (p, rp) in enumerate(zip(params, ref_params)):
        assert_close(p, rp, rel=1e-6, name=f"param {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
def test_cuda_graph_step_follows_scheduler(max_grad_norm):
    """A CUDA-graph-captured step reads the device lr tensor that the scheduler fills."""
    ref_params, params = _params("cuda"), _params("cuda")
    # betas=(0.9, 0.95): torch's capturable step forms 1 - beta2**t in fp32 on the device, which
    # for beta2 = 0.999 is off by ~1e-5 relative (fasttrain and torch's default path use
    # double); with 0.95 the two agree to ~1e-7, so 1e-6 tests the update, not that rounding
    kwargs = dict(betas=(0.9, 0.95), weight_decay=0.1, capturable=True)
    ref = torch.optim.AdamW(ref_params, lr=torch.tensor(1e-2, device="cuda"), **kwargs)
    opt = fasttrain.optim.AdamW(params, lr=torch.tensor(1e-2, device="cuda"),
                                max_grad_norm=max_grad_norm, **kwargs)
    # cycle_momentum=False: the step reads betas as Python floats, which a graph bakes in at
    # capture (only a tensor lr is read from the device at replay)
    ref_sched = lr_scheduler.OneCycleLR(ref, max_lr=0.05, total_steps=40, cycle_momentum=False)
    sched = lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=40, cycle_momentum=False)
    g = torch.Generator(device="cuda").manual_seed(1)
    for p in params:
        p.grad = torch.zeros_like(p)  # static gradient buffers the graph reads

    def set_grads():
        for p, rp in zip(params, ref_params):
            gr = torch.randn(p.shape, generator=g, device="cuda") * 3
            p.grad.copy_(gr)
            rp.grad = gr.clone()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(ref_params, max_grad_norm)

    def ref_step():
        ref.step()
        ref_sched.step()

    # warm up (compiles kernels, creates state) on a side stream, then capture one step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            set_grads()
            opt.step()
            sched.step()
            ref_step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(30):
        set_grads()
        graph.replay()
        sched.step()
        ref_step()
        assert float(opt.param_groups[0]["lr"]) == float(ref.param_groups[0]["lr"]), step
    torch.cuda.synchronize()
    for i, (p, rp) in enumerate(zip(params, ref_params)):
        assert_close(p, rp, rel=1e-6, name=f"param {i}")


# ---------------------------------------------------------------- HF Trainer

def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
        use_cache=False)  # no cache: HF's sdpa then masks packed rows by their position_ids
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def _progressions(n, seed, lo=8, hi=48, length=None):
    """Arithmetic progressions mod 128 with random start and stride: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        m = length or int(torch.randint(lo, hi + 1, (), generator=g))
        start, stride = torch.randint(0, 128, (2,), generator=g).tolist()
        out.append({"input_ids": [(start + (stride % 4 + 1) * k) % 128 for k in range(m)]})
    return out


def _training_args(tmp_path, **kw):
    transformers = pytest.importorskip("transformers")
    base = dict(output_dir=str(tmp_path), max_steps=25, per_device_train_batch_size=8,
                logging_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                dataloader_num_workers=0, disable_tqdm=True, seed=0, data_seed=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _unwrap(opt):
    """The optimizer inside accelerate's AcceleratedOptimizer."""
    return getattr(opt, "optimizer", opt)


def test_hf_trainer_optimizers_tuple_packed(tmp_path):
    """optimizers=(fasttrain AdamW, torch scheduler), packed batches: the loss goes down and
    the run equals the same Trainer run with torch AdamW and the Trainer's own clipping."""
    transformers = pytest.importorskip("transformers")
    data = _progressions(200, seed=0)

    def run(opt_cls, clip_in_optimizer):
        model = _tiny_llama()
        kw = dict(max_grad_norm=1.0) if clip_in_optimizer else {}
        opt = opt_cls(model.parameters(), lr=torch.tensor(3e-3), weight_decay=0.01, **kw)
        sched = lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
        args = _training_args(tmp_path / opt_cls.__module__,
                              max_grad_norm=0.0 if clip_in_optimizer else 1.0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       data_collator=PackedCollator(),
                                       optimizers=(opt, sched))
        trainer.train()
        return trainer, opt

    trainer, opt = run(fasttrain.optim.AdamW, clip_in_optimizer=True)
    assert _unwrap(trainer.optimizer) is opt
    assert type(opt) is fasttrain.optim.AdamW
    assert opt.last_grad_norm is not None and float(opt.last_grad_norm) > 0
    assert float(opt.state[next(iter(opt.state))]["step"]) == 25
    losses = _losses(trainer)
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses
    ref_trainer, _ = run(torch.optim.AdamW, clip_in_optimizer=False)
    ref_losses = _losses(ref_trainer)
    # identical math; only fp32 rounding differs between the two optimizers' kernels
    assert_close(torch.tensor(losses), torch.tensor(ref_losses), rel=1e-4, name="loss curve")


def test_hf_trainer_optimizer_cls_and_kwargs(tmp_path):
    """optimizer_cls_and_kwargs: the Trainer builds fasttrain AdamW (with its weight-decay
    groups) and its own lr scheduler drives the optimizer."""
    transformers = pytest.importorskip("transformers")
    model = _tiny_llama(seed=1)
    args = _training_args(tmp_path, max_grad_norm=0.0, lr_scheduler_type="cosine",
                          warmup_steps=3)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_progressions(200, seed=1),
        data_collator=PackedCollator(pad_to_multiple_of=64),
        optimizer_cls_and_kwargs=(fasttrain.optim.AdamW,
                                  {"lr": 1e-2, "betas": (0.9, 0.95), "max_grad_norm": 1.0}))
    trainer.train()
    opt = _unwrap(trainer.optimizer)
    assert type(opt) is fasttrain.optim.AdamW
    assert opt.max_grad_norm == 1.0 and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert len(opt.param_groups) == 2  # the Trainer's decay / no-decay split
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, args.weight_decay}
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert max(lrs) == pytest.approx(1e-2) and lrs[-1] < 1e-3, lrs
    losses = _losses(trainer)
    assert sum(losses[-5:]) / 5 < 0.75 * sum(losses[:5]) / 5, losses


def test_hf_trainer_seqlen_warmup_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fasttrain.integrations.transformers_callbacks import SeqLenWarmupCallback

    warmup = SeqLenWarmup(64, 6, start_seqlen=8, multiple_of=8)
    model = _tiny_llama(seed=2)
    seen = []  # the longest sequence of every forward
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(int(kwargs["position_ids"].max()) + 1),
        with_kwargs=True)
    opt = fasttrain.optim.AdamW(model.parameters(), lr=3e-3, max_grad_norm=1.0)
    args = _training_args(tmp_path, max_steps=10, per_device_train_batch_size=4,
                          max_grad_norm=0.0)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_progressions(64, seed=2, length=64),
        data_collator=warmup.wrap_collator(PackedCollator()), optimizers=(opt, None),
        callbacks=[SeqLenWarmupCallback(warmup)])
    trainer.train()
    sched = [warmup.seqlen(s) for s in range(10)]
    assert sched[:7] == [8, 16, 24, 32, 40, 48, 64]
    assert len(seen) == 10
    # the Trainer's loader collates one batch ahead: step s trains on seqlen(s - 1)
    assert seen == [sched[0]] + sched[:-1], (seen, sched)
    assert warmup.step == 10
    with pytest.raises(TypeError, match="warmup"):
        SeqLenWarmupCallback(8)


# ---------------------------------------------------------------- Lightning

def _lightning():
    return pytest.importorskip("lightning.pytorch")


def _regression_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=g)
    w = torch.randn(16, 1, generator=g)
    return x, x @ w + 0.1 * torch.randn(256, 1, generator=g)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))


def _lambda(step):
    return min(1.0, (step + 1) / 4)


def test_lightning_fit_clips_in_optimizer():
    pl = _lightning()
    from fasttrain.integrations.lightning import FasttrainClipping

    x, y = _regression_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp()
            self.losses = []

        def training_step(self, batch, batch_idx):
            loss = torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            opt = fasttrain.optim.AdamW(self.parameters(), lr=torch.tensor(1e-2),
                                        max_grad_norm=0.5)
            sched = lr_scheduler.LambdaLR(opt, _lambda)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    module = Module()
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[FasttrainClipping()])
    trainer.fit(module, loader)
    opt = trainer.optimizers[0]
    assert type(opt) is fasttrain.optim.AdamW
    assert len(module.losses) == 24
    assert sum(module.losses[-4:]) < 0.5 * sum(module.losses[:4])
    assert float(trainer.callback_metrics["grad_norm"]) == pytest.approx(
        float(opt.last_grad_norm))

    # the same run by hand: torch AdamW, clip_grad_norm_ before each step, same scheduler
    net = _mlp()
    ref = torch.optim.AdamW(net.parameters(), lr=1e-2)
    ref_sched = lr_scheduler.LambdaLR(ref, _lambda)
    ref_losses, ref_norms = [], []
    for _ in range(3):
        for xb, yb in loader:
            ref.zero_grad()
            loss = torch.nn.functional.mse_loss(net(xb), yb)
            loss.backward()
            ref_losses.append(loss.item())
            ref_norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)))
            ref.step()
            ref_sched.step()
    assert sum(n > 0.5 for n in ref_norms) >= 5, "the run must actually clip"
    assert float(opt.last_grad_norm) == pytest.approx(ref_norms[-1], rel=1e-5)
    assert_close(torch.tensor(module.losses), torch.tensor(ref_losses), rel=1e-5, name="losses")
    for (name, p), rp in zip(module.net.named_parameters(), net.parameters()):
        assert_close(p, rp, rel=1e-5, name=name)


def test_lightning_rejects_double_clipping():
    pl = _lightning()
    from fasttrain.integrations.lightning import FasttrainClipping

    x, y = _regression_data(1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _mlp(1)

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return fasttrain.optim.AdamW(self.parameters(), lr=1e-2, max_grad_norm=1.0)

    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, gradient_clip_val=1.0,
                         callbacks=[FasttrainClipping()])
    with pytest.raises(ValueError, match="gradient_clip_val"):
        trainer.fit(Module(), loader)
