"""Fused tempered feature KL ``KL(softmax(f_T / tau) || softmax(f_S))`` (docs/method.md §3).

Triton kernels -> host launcher -> ``torch.autograd.Function``. Importing this module imports
Triton; call it through :func:`kdiff.ops.feature_kl_loss`, which picks the implementation.

One program per row of ``[B, D]``. A row of up to 4096 features is read once into registers;
longer rows loop over blocks (an online softmax, then sweeps for the loss and the gradient).
The program finds both rows' log-sum-exp (max subtracted, float32), then writes the loss and,
for the scalar reductions, the gradient of the final loss with respect to ``f_S``, already
divided by the reduction's count: backward only multiplies it by ``grad_output``. With
``reduction="none"`` the gradient depends on the per-element ``grad_output``, so a backward
kernel recomputes it from the saved row statistics.

With ``log q = log_softmax(f_S)``, ``log p = log_softmax(f_T / tau)`` (both clamped at the
float32 minimum, as the reference does) and ``valid_k = [log q_k not clamped]``, the gradient of
``sum_k p_k (log p_k - log q_k)`` is ``q_k * S - p_k * valid_k`` with ``S = sum_k p_k valid_k``.
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
_MAX_BLOCK = 4096  # widest row held in registers; longer rows loop over blocks of this size


@triton.jit
def _lse(v):
    # max-subtracted log-sum-exp of a row held in registers, float32
    m = tl.max(v, 0)
    return m + tl.log(tl.sum(tl.exp(v - m), 0))


@triton.jit
def _lse_looped(ptr, n, scale, BLOCK: tl.constexpr):
    # log-sum-exp of ptr[0:n] / scale over blocks of BLOCK columns (online softmax), float32
    cols = tl.arange(0, BLOCK)
    m = tl.full([], float("-inf"), tl.float32)
    d = tl.full([], 0.0, tl.float32)
    for start in range(0, n, BLOCK):
        v = tl.load(ptr + start + cols, mask=start + cols < n, other=float("-inf")).to(tl.float32) / scale
        m_new = tl.maximum(m, tl.max(v, 0))
        # A row that is -inf so far has d = 0: skip exp(-inf - -inf) = NaN.
        finite = m_new != float("-inf")
        alpha = tl.where(finite, tl.exp(m - m_new), 0.0)
        d = d * alpha + tl.sum(tl.where(finite, tl.exp(v - m_new), 0.0), 0)
        m = m_new
    return m + tl.log(d)


@triton.jit
def _kl_terms(x, u, lse_s, lse_t):
    # Element-wise terms of the reference: clamped log-probabilities, p, q and the clamp mask.
    log_q_raw = x - lse_s
    valid = log_q_raw >= _FMIN
    log_q = tl.where(log_q_raw < _FMIN, _FMIN, log_q_raw)  # keeps NaN, unlike maximum()
    log_p_raw = u - lse_t
    log_p = tl.where(log_p_raw < _FMIN, _FMIN, log_p_raw)
    p = tl.exp(log_p)
    kl = p * (log_p - log_q)
    q = tl.exp(log_q_raw)
    return kl, p, q, valid


@triton.jit
def _feature_kl_fwd_kernel(
    x_ptr, t_ptr, loss_ptr, grad_ptr, lse_ptr,
    x_stride, t_stride, loss_stride, grad_stride,
    D, tau, grad_scale,
    REDUCE_NONE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr, SINGLE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    t_row = t_ptr + row * t_stride
    cols = tl.arange(0, BLOCK)
    if SINGLE:
        # The whole row in registers: one read of f_S and f_T.
        mask = cols < D
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        u = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32) / tau
        lse_s = _lse(x)
        lse_t = _lse(u)
    else:
        lse_s = _lse_looped(x_row, D, 1.0, BLOCK)
        lse_t = _lse_looped(t_row, D, tau, BLOCK)
    if REDUCE_NONE:
        tl.store(lse_ptr + row * 2, lse_s)
        tl.store(lse_ptr + row * 2 + 1, lse_t)
    if SINGLE:
        kl, p, q, valid = _kl_terms(x, u, lse_s, lse_t)
        kl = tl.where(mask, kl, 0.0)
        if REDUCE_NONE:
            tl.store(loss_ptr + row * loss_stride + cols, kl, mask=mask)
        else:
            tl.store(loss_ptr + row, tl.sum(kl, 0))
            if COMPUTE_GRAD:
                s = tl.sum(tl.where(mask & valid, p, 0.0), 0)
                g = (q * s - tl.where(valid, p, 0.0)) * grad_scale
                tl.store(grad_ptr + row * grad_stride + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        total = tl.full([], 0.0, tl.float32)
        s = tl.full([], 0.0, tl.float32)
        for start in range(0, D, BLOCK):
            mask = start + cols < D
            x = tl.load(x_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            u = tl.load(t_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) / tau
            kl, p, q, valid = _kl_terms(x, u, lse_s, lse_t)
            kl = tl.where(mask, kl, 0.0)
            if REDUCE_NONE:
                tl.store(loss_ptr + row * loss_stride + start + cols, kl, mask=mask)
            else:
                total += tl.sum(kl, 0)
                s += tl.sum(tl.where(mask & valid, p, 0.0), 0)
        if not REDUCE_NONE:
            tl.store(loss_ptr + row, total)
            if COMPUTE_GRAD:
                for start in range(0, D, BLOCK):
                    mask = start + cols < D
                    x = tl.load(x_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
                    u = tl.load(t_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) / tau
                    kl, p, q, valid = _kl_terms(x, u, lse_s, lse_t)
                    g = (q * s - tl.where(valid, p, 0.0)) * grad_scale
                    tl.store(grad_ptr + row * grad_stride + start + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _feature_kl_bwd_kernel(
    x_ptr, t_ptr, go_ptr, grad_ptr, lse_ptr,
    x_stride, t_stride, go_stride, grad_stride,
    D, tau,
    BLOCK: tl.constexpr, SINGLE: tl.constexpr,
):
    # reduction="none": d/dx_k of sum_j G_j kl_j = q_k * S_G - G_k p_k valid_k, S_G = sum_j G_j p_j valid_j.
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    t_row = t_ptr + row * t_stride
    go_row = go_ptr + row * go_stride
    cols = tl.arange(0, BLOCK)
    lse_s = tl.load(lse_ptr + row * 2)
    lse_t = tl.load(lse_ptr + row * 2 + 1)
    if SINGLE:
        mask = cols < D
        x = tl.load(x_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        u = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32) / tau
        go = tl.load(go_row + cols, mask=mask, other=0.0).to(tl.float32)
        kl, p, q, valid = _kl_terms(x, u, lse_s, lse_t)
        gp = tl.where(mask & valid, go * p, 0.0)
        s = tl.sum(gp, 0)
        tl.store(grad_ptr + row * grad_stride + cols, (q * s - gp).to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        s = tl.full([], 0.0, tl.float32)
        for start in range(0, D, BLOCK):
            mask = start + cols < D
            x = tl.load(x_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            u = tl.load(t_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) / tau
            go = tl.load(go_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            kl, p, q, valid = _kl_terms(x, u, lse_s, lse_t)
            s += tl.sum(tl.where(mask & valid, go * p, 0.0), 0)
        for start in range(0, D, BLOCK):
            mask = start + cols < D
            x = tl.load(x_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            u = tl.load(t_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) / tau
            go = tl.load(go_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            kl, p, q, valid = _kl_terms(x, u, lse_s, lse_t)
            gp = tl.where(mask & valid, go * p, 0.0)
            tl.store(grad_ptr + row * grad_stride + start + cols, (q * s - gp).to(grad_ptr.dtype.element_ty), mask=mask)


# Kernels defined under TRITON_INTERPRET=1 run in Triton's interpreter for the whole process
# (the only way they can take CPU tensors); the dispatcher checks this flag.
INTERPRETED: bool = not isinstance(_feature_kl_fwd_kernel, triton.JITFunction)


def _launch_config(D: int) -> tuple[int, bool, int]:
    block = min(triton.next_power_of_2(D), _MAX_BLOCK)
    num_warps = 4 if block <= 1024 else (8 if block <= 2048 else 16)
    return block, D <= block, num_warps


def feature_kl_forward(
    input: Tensor, target: Tensor, temperature: float, reduction: str, *, compute_grad: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Launch the forward kernel: ``(loss, grad_input or None, row_lse or None)``.

    ``input``/``target`` are [B, D] with unit column stride; ``loss`` is float32 ([B, D] for
    ``reduction="none"``, else a scalar). ``grad_input`` is d loss / d input in ``input``'s dtype
    (scalar reductions with ``compute_grad``); ``row_lse`` holds both rows' log-sum-exp for the
    ``"none"`` backward.
    """
    B, D = input.shape
    block, single, num_warps = _launch_config(D)
    none = reduction == "none"
    loss = torch.empty((B, D) if none else (B,), device=input.device, dtype=torch.float32)
    grad = torch.empty_like(input) if compute_grad and not none else None
    lse = torch.empty((B, 2), device=input.device, dtype=torch.float32) if none else None
    grad_scale = {"batchmean": 1.0 / B, "mean": 1.0 / (B * D), "sum": 1.0}.get(reduction, 1.0)
    _feature_kl_fwd_kernel[(B,)](
        input, target, loss, grad if grad is not None else input, lse if lse is not None else loss,
        input.stride(0), target.stride(0), loss.stride(0), grad.stride(0) if grad is not None else 0,
        D, float(temperature), grad_scale,
        REDUCE_NONE=none, COMPUTE_GRAD=grad is not None, BLOCK=block, SINGLE=single, num_warps=num_warps,
    )
    if not none:
        # Row partials summed by torch: deterministic, and the count applied once in float32.
        total = loss.sum()
        loss = total / B if reduction == "batchmean" else (total / (B * D) if reduction == "mean" else total)
    return loss, grad, lse


def feature_kl_backward_none(
    input: Tensor, target: Tensor, grad_output: Tensor, lse: Tensor, temperature: float
) -> Tensor:
    """Gradient for ``reduction="none"``: d(sum grad_output * kl)/d input, in ``input``'s dtype."""
    B, D = input.shape
    block, single, num_warps = _launch_config(D)
    grad_output = grad_output.contiguous()
    grad = torch.empty_like(input)
    _feature_kl_bwd_kernel[(B,)](
        input, target, grad_output, grad, lse,
        input.stride(0), target.stride(0), grad_output.stride(0), grad.stride(0),
        D, float(temperature), BLOCK=block, SINGLE=single, num_warps=num_warps,
    )
    return grad


class FeatureKLFunction(torch.autograd.Function):
    """``KL(softmax(target / tau) || softmax(input))`` with the fused kernels; no gradient to ``target``."""

    @staticmethod
    def forward(ctx: Any, input: Tensor, target: Tensor, temperature: float, reduction: str) -> Tensor:
        input = input.contiguous()
        target = target.contiguous()
        compute_grad = ctx.needs_input_grad[0]
        loss, grad, lse = feature_kl_forward(input, target, temperature, reduction, compute_grad=compute_grad)
        ctx.reduction = reduction
        ctx.temperature = temperature
        if reduction == "none":
            ctx.save_for_backward(input, target, lse)
        else:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if ctx.reduction == "none":
            input, target, lse = ctx.saved_tensors
            grad = feature_kl_backward_none(input, target, grad_output, lse, ctx.temperature)
        else:
            (grad,) = ctx.saved_tensors
            # The gradient of the final loss was computed in forward: only scale it (no host sync).
            grad = grad * grad_output
        return grad, None, None, None
