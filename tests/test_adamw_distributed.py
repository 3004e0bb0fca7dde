"""AdamW under DDP and FSDP2 (DTensor shards): 2 processes on CPU with gloo give the same result
as one process on the full batch, including the clipping norm reduced across ranks."""
import os
import socket

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


def _train(model, opt, x, y):
    norms = []
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        norms.append(opt.last_grad_norm.item())
    return norms


def _worker(rank, world, port, mode, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model()
        x, y = _data()
        shard = slice(rank * 4, rank * 4 + 4)
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
            params = model.parameters()
        else:
            from torch.distributed.fsdp import fully_shard
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cpu", (world,))
            for layer in (model[0], model[2]):
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            params = model.parameters()
        opt = AdamW(params, lr=1e-2, weight_decay=0.1, max_grad_norm=MAX_NORM, backend="cpu")
        norms = _train(model, opt, x[shard], y[shard])
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
                for p in model.parameters()]
        if rank == 0:
            torch.save({"params": [p.clone() for p in full], "norms": norms}, out_path)
        # both ranks done before either tears down gloo: a rank that destroyed the group while
        # the other still had work in gloo's threads aborted it once (a loaded 2-core machine)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_two_ranks_equal_one_process(mode, tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), mode, str(out)), nprocs=2, join=True)
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
