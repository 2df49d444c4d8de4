"""Small torch.distributed helpers that keep gradients (used for a globally synchronised ``pbar``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["world_size", "rank", "all_gather_with_grad"]


def world_size(group: Any = None) -> int:
    """Number of processes in ``group`` (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


class _AllGather(torch.autograd.Function):
    """All-gather whose backward sums every process's gradient and keeps this process's slice.

    Written with all_reduce (not reduce_scatter) so it also runs on the gloo backend.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank], None


def all_gather_with_grad(tensor: Tensor, group: Any = None) -> Tensor:
    """Stack ``tensor`` from every process (shape ``[world, *tensor.shape]``), differentiably.

    Each process's loss contributes to the gradients of every process's input, so after DDP's
    gradient averaging the result equals the single-process gradient on the whole batch.
    Every process must pass a tensor of the same shape.
    """
    if world_size(group) == 1:
        return tensor.unsqueeze(0)
    return _AllGather.apply(tensor, group)
