"""AdamW under DDP and FSDP2 (DTensor shards): 2 processes on CPU with gloo give the same result
as one process on the full batch, including the clipping norm reduced across ranks (also with
sharded and plain params in one group, and after FSDP2 swaps the params' local tensors);
Partial DTensor grads are reduced before the update; stochastic rounding without a seed rounds
replicated params alike on both ranks."""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fasttrain.optim import AdamW

STEPS = 8
MAX_NORM = 0.5


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 34), torch.nn.Tanh(), torch.nn.Linear(34, 7))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 7, generator=g)


def _train(model, opt, x, y, after_backward=None, after_step=None):
    norms = []
    for step in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if after_backward is not None:
            after_backward()
        opt.step()
        if opt.max_grad_norm:
            norms.append(opt.last_grad_norm.item())
        if after_step is not None:
            after_step(step)
    return norms


def _reload_at(at, model):
    def reload(step):
        if step == at:
            saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.to_empty(device="cpu")
            model.load_state_dict(saved)
    return reload


def _average_grads(params):
    def average():
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
    return average


def _worker(rank, world, port, mode, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        x, y = _data()
        shard = slice(rank * 4, rank * 4 + 4)
        after_backward = after_step = None
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        elif mode == "mixed":  # one group: a sharded layer and a plain one (grads averaged)
            from torch.distributed.fsdp import fully_shard

            fully_shard(model[0])
            after_backward = _average_grads(list(model[2].parameters()))
        else:  # fsdp2; "fsdp2-reload": to_empty() + load_state_dict() after the second step
            # give the same params new local tensors (new storage)
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (world,))
            for layer in (model[0], model[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if mode == "fsdp2-reload":
                after_step = _reload_at(1, model)
        opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=MAX_NORM,
                    backend="cpu")
        norms = _train(model, opt, x[shard], y[shard], after_backward, after_step)
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
                for p in model.parameters()]
        if rank == 0:
            torch.save({"params": [p.clone() for p in full], "norms": norms}, out_path)
        # both ranks done before either tears down gloo: a rank that destroyed the group while
        # the other still had work in gloo's threads aborted it once (a loaded 2-core machine)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _exit_cleanly(rank, worker, *args):
    """Run ``worker(rank, *args)`` in a spawned rank, then leave without the interpreter's
    finalization: gloo's threads, torn down there, aborted a rank now and then (SIGABRT,
    "terminate called without an active exception") after its work was done and saved. A
    worker that raises still fails the test."""
    worker(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2", "mixed", "fsdp2-reload"])
def test_two_ranks_equal_one_process(mode, tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_exit_cleanly, args=(_worker, 2, _free_port(), mode, str(out)), nprocs=2)
    result = torch.load(out)

    model = _model()
    x, y = _data()
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, max_grad_norm=MAX_NORM,
                backend="cpu")
    norms = _train(model, opt, x, y)
    assert norms[0] > MAX_NORM  # clipping is active
    # the mean over two half-batches sums in another order than the full batch: fp32 rounding
    for got, want in zip(result["norms"], norms):
        assert abs(got - want) <= 1e-5 * want
    for got, want in zip(result["params"], model.parameters()):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


def _partial_worker(rank, world, port, out_path):
    """A replicated DTensor param whose grad is Partial (each rank holds a part of the sum)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        full, grads = _partial_data()
        p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Replicate()]))
        opt = AdamW([p], lr=1e-2, max_grad_norm=MAX_NORM, backend="cpu")
        for g in grads:
            p.grad = DTensor.from_local(g[rank], mesh, [Partial()])
            opt.step()
        if rank == 0:
            torch.save({"param": p.to_local().clone(), "norm": opt.last_grad_norm.item(),
                        "grad_placements": p.grad.placements}, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _partial_data():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(6, 5, generator=gen), [torch.randn(2, 6, 5, generator=gen)
                                              for _ in range(STEPS)]


def test_a_partial_grad_is_reduced_before_the_update(tmp_path):
    from torch.distributed.tensor import Replicate

    out = tmp_path / "rank0.pt"
    mp.spawn(_exit_cleanly, args=(_partial_worker, 2, _free_port(), str(out)), nprocs=2)
    result = torch.load(out, weights_only=False)
    full, grads = _partial_data()
    p = torch.nn.Parameter(full.clone())
    opt = AdamW([p], lr=1e-2, max_grad_norm=MAX_NORM, backend="cpu")
    for g in grads:
        p.grad = g.sum(0)
        opt.step()
    assert result["grad_placements"] == (Replicate(),)
    assert abs(result["norm"] - opt.last_grad_norm.item()) <= 1e-6 * opt.last_grad_norm.item()
    torch.testing.assert_close(result["param"], p.detach(), rtol=1e-6, atol=1e-7)


def _rounding_worker(rank, world, port, backend, layout, out_path):
    """The same bf16 params and grads on each rank (as after DDP's all-reduce, or the replicas of
    HSDP: a (2, 1) mesh, replicated over its first dim), each rank's RNG seeded differently,
    stochastic rounding without a seed."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model().to(torch.bfloat16)
        x, y = (t.to(torch.bfloat16) for t in _data())
        if layout == "hsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Replicate, Shard, distribute_module, \
                distribute_tensor

            mesh = init_device_mesh("cpu", (world, 1))
            distribute_module(model, mesh, lambda name, module, mesh: [
                module.register_parameter(n, torch.nn.Parameter(distribute_tensor(
                    p.data, mesh, [Replicate(), Shard(0)]))) for n, p in
                list(module.named_parameters(recurse=False))])
        torch.manual_seed(100 + rank)
        opt = AdamW(model.parameters(), lr=1e-3, stochastic_rounding=True, backend=backend)
        if layout == "hsdp":
            x = distribute_tensor(x, mesh, [Replicate(), Replicate()])
            y = distribute_tensor(y, mesh, [Replicate(), Replicate()])
        _train(model, opt, x, y)
        mine = torch.cat([(p.to_local() if hasattr(p, "to_local") else p).detach().float()
                          .flatten() for p in model.parameters()])
        both = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(both, mine)
        if rank == 0:
            torch.save({"params": both}, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend,layout", [("cpu", "ddp"), ("torch", "ddp"), ("cpu", "hsdp")])
def test_stochastic_rounding_rounds_replicated_params_alike_on_every_rank(backend, layout,
                                                                          tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_exit_cleanly, args=(_rounding_worker, 2, _free_port(), backend, layout, str(out)),
             nprocs=2)
    first, second = torch.load(out)["params"]
    assert torch.equal(first, second)


def _one_rank_steps_worker(rank, world, port, out_path):
    """Only rank 0 steps (e.g. the only rank with bf16 params): the seed's broadcast happened
    at construction, so step() waits on no other rank."""
    from datetime import timedelta

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        # no bf16 param to round, or master weights: no seed needed, no broadcast
        assert AdamW(_model().parameters(), stochastic_rounding=True).seed is None
        assert AdamW(_model().to(torch.bfloat16).parameters(), stochastic_rounding=True,
                     master_weights=True).seed is None
        model = _model().to(torch.bfloat16)
        opt = AdamW(model.parameters(), lr=1e-3, stochastic_rounding=True, backend="cpu")
        if rank == 0:
            x, y = (t.to(torch.bfloat16) for t in _data())
            _train(model, opt, x, y)
            torch.save({"seed": opt.seed}, out_path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_step_with_stochastic_rounding_is_no_collective(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_exit_cleanly, args=(_one_rank_steps_worker, 2, _free_port(), str(out)), nprocs=2)
    assert isinstance(torch.load(out)["seed"], int)
