"""Global-batch diversity term under torch.distributed: 2 gloo processes vs. one process."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdiff import DatasetOrientedLoss
from kdiff.functional import diversity_loss

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 2


def _logits(sizes):
    g = torch.Generator().manual_seed(0)
    return torch.randn(sum(sizes), 7, generator=g, dtype=torch.float64) * 3


def _worker(rank: int, init_file: str, out_dir: str, sizes: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        full = _logits(sizes)
        start = sum(sizes[:rank])
        local = full[start : start + sizes[rank]].clone().requires_grad_(True)
        results = {}
        # Diversity alone (any per-process batch sizes).
        dv = diversity_loss(local, sync_global=True)
        dv.backward()
        results["dv"], results["dv_grad"] = dv.detach(), local.grad.clone()
        # The full dataset-oriented loss (equal per-process batches, as DDP uses).
        local.grad = None
        loss = DatasetOrientedLoss(gamma=0.75, sync_global=True)(local)
        loss.backward()
        results["loss"], results["loss_grad"] = loss.detach(), local.grad.clone()
        # Without sync, each process only sees its own batch.
        results["dv_local"] = diversity_loss(local.detach())
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(sizes):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp, sizes), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("sizes", [[4, 4], [3, 6]])
def test_global_diversity_matches_single_process(sizes):
    results = _run(sizes)
    full = _logits(sizes).requires_grad_(True)
    dv_single = diversity_loss(full)
    dv_single.backward()
    grad_single = full.grad.clone()
    for rank, res in enumerate(results):
        start = sum(sizes[:rank])
        torch.testing.assert_close(res["dv"], dv_single.detach(), rtol=1e-12, atol=1e-12)
        # Each process's backward collects every process's loss; DDP's averaging divides by WORLD.
        torch.testing.assert_close(res["dv_grad"] / WORLD, grad_single[start : start + sizes[rank]], rtol=1e-10, atol=1e-12)
        assert not torch.allclose(res["dv_local"], dv_single.detach())


def test_dataset_oriented_loss_ddp_average_matches_single_process():
    sizes = [4, 4]
    results = _run(sizes)
    full = _logits(sizes).requires_grad_(True)
    single = DatasetOrientedLoss(gamma=0.75)(full)
    single.backward()
    # DDP minimises the mean over processes of each process's loss.
    mean_loss = sum(r["loss"] for r in results) / WORLD
    torch.testing.assert_close(mean_loss, single.detach(), rtol=1e-12, atol=1e-12)
    grads = torch.cat([r["loss_grad"] for r in results]) / WORLD
    torch.testing.assert_close(grads, full.grad, rtol=1e-10, atol=1e-12)
