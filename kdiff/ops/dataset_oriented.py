"""Fused pieces of the CFD dataset-oriented loss ``L_data = gamma H + (1 - gamma) Dv`` (docs/method.md §3).

Triton kernels -> host launcher -> ``torch.autograd.Function``. Importing this module imports
Triton; call it through :func:`kdiff.ops.dataset_oriented_loss`.

The batch-wide ``pbar`` couples every row, so the gradient cannot be finished in forward. The
function returns the two batch statistics the loss needs and differentiates through them:

* forward (one kernel, one program per block of rows; two sweeps over the block, the second
  from cache): each row's log-sum-exp, its entropy ``H_i``, and per block the column-wise
  log-sum-exp of the clamped ``log p`` (the log-domain partial sums of ``p``). Torch then combines the few partials into
  ``log sum_i p_ik`` ([K]); the tiny ``Dv`` maths on [K] (and the global-batch gather under
  ``torch.distributed``) stays in torch, exactly as in the reference.
* backward (one kernel, two sweeps: the row sums, then the gradient): with ``g_ik = valid_ik (g_ls_k exp(lpc_ik - log_sum_k) - g_H / B *
  p_ik (lpc_ik + 1))``, the gradient is ``g_ik - softmax_ik sum_k g_ik``; ``lpc`` is the clamped
  ``log p`` and ``valid`` its clamp mask, as in the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # importable for documentation tools; kdiff.ops never launches these then
    from ._dispatch import triton_stub as triton

    tl = triton.language

_FMIN = tl.constexpr(-3.4028234663852886e38)  # torch.finfo(torch.float32).min


@triton.jit
def _row_lse(x_ptr, rows, row_mask, stride, K, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.arange(0, BLOCK_K)
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_B], tl.float32)
    for start in range(0, K, BLOCK_K):
        mask = row_mask[:, None] & (start + cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride + start + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 1))
        # A row that is -inf so far has d = 0: skip exp(-inf - -inf) = NaN.
        finite = m_new != float("-inf")
        alpha = tl.where(finite, tl.exp(m - m_new), 0.0)
        d = d * alpha + tl.sum(tl.where(finite[:, None], tl.exp(x - m_new[:, None]), 0.0), 1)
        m = m_new
    return m + tl.log(d)


@triton.jit
def _dataset_fwd_kernel(
    x_ptr, lse_ptr, h_ptr, part_ptr,
    B, K, stride,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    cols = tl.arange(0, BLOCK_K)
    lse = _row_lse(x_ptr, rows, row_mask, stride, K, BLOCK_B, BLOCK_K)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    h = tl.zeros([BLOCK_B], tl.float32)
    for start in range(0, K, BLOCK_K):
        col_mask = start + cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        lp = x - lse[:, None]
        lpc = tl.where(lp < _FMIN, _FMIN, lp)  # the reference's clamp (keeps NaN)
        h -= tl.sum(tl.where(mask, tl.exp(lpc) * lpc, 0.0), 1)
        # Column log-sum-exp of lpc over this block's rows (lpc >= FMIN, so the max is finite).
        lpc_rows = tl.where(row_mask[:, None], lpc, float("-inf"))
        cmax = tl.max(lpc_rows, 0)
        csum = tl.sum(tl.where(row_mask[:, None], tl.exp(lpc_rows - cmax[None, :]), 0.0), 0)
        tl.store(part_ptr + pid.to(tl.int64) * K + start + cols, cmax + tl.log(csum), mask=col_mask)
    tl.store(h_ptr + rows, h, mask=row_mask)


@triton.jit
def _dataset_bwd_kernel(
    x_ptr, lse_ptr, log_sum_ptr, g_ls_ptr, g_h_ptr, grad_ptr,
    B, K, stride, grad_stride, inv_b,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    cols = tl.arange(0, BLOCK_K)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g_h = tl.load(g_h_ptr).to(tl.float32) * inv_b  # read on device: no host sync
    s = tl.zeros([BLOCK_B], tl.float32)
    for start in range(0, K, BLOCK_K):
        col_mask = start + cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        log_sum = tl.load(log_sum_ptr + start + cols, mask=col_mask, other=0.0)
        g_ls = tl.load(g_ls_ptr + start + cols, mask=col_mask, other=0.0)
        lp = x - lse[:, None]
        lpc = tl.where(lp < _FMIN, _FMIN, lp)
        g = g_ls[None, :] * tl.exp(lpc - log_sum[None, :]) - g_h * tl.exp(lpc) * (lpc + 1.0)
        s += tl.sum(tl.where(mask & (lp >= _FMIN), g, 0.0), 1)
    for start in range(0, K, BLOCK_K):
        col_mask = start + cols < K
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride + start + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        log_sum = tl.load(log_sum_ptr + start + cols, mask=col_mask, other=0.0)
        g_ls = tl.load(g_ls_ptr + start + cols, mask=col_mask, other=0.0)
        lp = x - lse[:, None]
        lpc = tl.where(lp < _FMIN, _FMIN, lp)
        g = g_ls[None, :] * tl.exp(lpc - log_sum[None, :]) - g_h * tl.exp(lpc) * (lpc + 1.0)
        g = tl.where(lp >= _FMIN, g, 0.0)
        grad = g - tl.exp(lp) * s[:, None]
        tl.store(grad_ptr + rows[:, None] * grad_stride + start + cols[None, :],
                 grad.to(grad_ptr.dtype.element_ty), mask=mask)


# Kernels defined under TRITON_INTERPRET=1 run in Triton's interpreter for the whole process
# (the only way they can take CPU tensors); the dispatcher checks this flag.
INTERPRETED: bool = not isinstance(_dataset_fwd_kernel, triton.JITFunction)

_TILE = 4096  # elements per program tile (BLOCK_B * BLOCK_K)
_MAX_BLOCK_K = 4096  # more classes than this loop over column blocks


def _launch_config(B: int, K: int) -> tuple[int, int, int]:
    block_k = min(triton.next_power_of_2(K), _MAX_BLOCK_K)
    block_b = max(1, min(triton.next_power_of_2(B), _TILE // block_k, 64))
    return block_b, block_k, 4 if block_b * block_k <= 2048 else 8


class DatasetStatsFunction(torch.autograd.Function):
    """``(H, log_sum)`` of logits [B, K]: mean entropy and ``log sum_i p_ik`` [K], float32."""

    @staticmethod
    def forward(ctx: Any, input: Tensor) -> tuple[Tensor, Tensor]:
        input = input.contiguous()
        B, K = input.shape
        block_b, block_k, num_warps = _launch_config(B, K)
        programs = triton.cdiv(B, block_b)
        dev = input.device
        lse = torch.empty(B, device=dev, dtype=torch.float32)
        h = torch.empty(B, device=dev, dtype=torch.float32)
        parts = torch.empty(programs, K, device=dev, dtype=torch.float32)
        _dataset_fwd_kernel[(programs,)](
            input, lse, h, parts, B, K, input.stride(0),
            BLOCK_B=block_b, BLOCK_K=block_k, num_warps=num_warps,
        )
        log_sum = torch.logsumexp(parts, dim=0)
        ctx.save_for_backward(input, lse, log_sum)
        ctx.config = (block_b, block_k, num_warps)
        return h.mean(), log_sum

    @staticmethod
    def backward(ctx: Any, grad_h: Tensor, grad_log_sum: Tensor) -> Tensor | None:
        if not ctx.needs_input_grad[0]:
            return None
        input, lse, log_sum = ctx.saved_tensors
        B, K = input.shape
        block_b, block_k, num_warps = ctx.config
        grad = torch.empty_like(input)
        _dataset_bwd_kernel[(triton.cdiv(B, block_b),)](
            input, lse, log_sum, grad_log_sum.float().contiguous(), grad_h.float().reshape(1), grad,
            B, K, input.stride(0), grad.stride(0), 1.0 / B,
            BLOCK_B=block_b, BLOCK_K=block_k, num_warps=num_warps,
        )
        return grad
