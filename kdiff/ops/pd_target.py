"""Fused progressive-distillation target chain and loss (docs/method.md §2).

Triton kernel -> host launcher -> ``torch.autograd.Function``. Importing this module imports
Triton; call it through :func:`kdiff.ops.pd_target_loss`.

One element-wise pass with per-sample coefficients: from ``z_t`` and the teacher's outputs at
``t`` and ``t'`` it replays the two DDIM half-steps ``t -> t' -> t''`` (``z_t'``, then ``z_t''``),
forms the target ``x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t)
alpha_t)`` and ``eps_tilde = (z_t - alpha_t x_tilde) / sigma_t``, and the squared error against
the student's ``x_hat``: per-(sample, block) partial sums of the squared error, and its
gradient ``2 (x_hat - x_tilde) / N``. The weighting and the reduction act on the per-sample
errors [B] in torch, so backward only multiplies the saved gradient by ``d loss / d err_i``.
All maths in float32.
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

PREDICTION_KINDS: dict[str, int] = {"x": 0, "eps": 1, "v": 2}
# Rows of the packed per-sample coefficient table the kernel reads.
COEFFS: tuple[str, ...] = ("alpha_t", "sigma_t", "alpha_t1", "sigma_t1", "alpha_t2", "sigma_t2", "ratio")


@triton.jit
def _to_x_eps(out, z, a, s, KIND: tl.constexpr, CLIP: tl.constexpr):
    # kdiff.parameterization.to_x_eps, then the optional x clip with eps recomputed from x.
    if KIND == 0:
        x = out
        eps = (z - a * out) / s
    elif KIND == 1:
        x = (z - s * out) / a
        eps = out
    else:
        x = a * z - s * out
        eps = s * z + a * out
    if CLIP:
        x = tl.minimum(tl.maximum(x, -1.0), 1.0)
        eps = (z - a * x) / s
    return x, eps


@triton.jit
def _pd_fwd_kernel(
    x_hat_ptr, z_ptr, out_t_ptr, out_t1_ptr, coef_ptr,
    x_tilde_ptr, eps_tilde_ptr, grad_ptr, part_ptr,
    N, B, n_blocks, two_over_n,
    KIND: tl.constexpr, CLIP: tl.constexpr, COMPUTE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    j = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    a_t = tl.load(coef_ptr + b)
    s_t = tl.load(coef_ptr + B + b)
    a_1 = tl.load(coef_ptr + 2 * B + b)
    s_1 = tl.load(coef_ptr + 3 * B + b)
    a_2 = tl.load(coef_ptr + 4 * B + b)
    s_2 = tl.load(coef_ptr + 5 * B + b)
    ratio = tl.load(coef_ptr + 6 * B + b)
    z = tl.load(z_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    out_t = tl.load(out_t_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    out_t1 = tl.load(out_t1_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    x_hat = tl.load(x_hat_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    # Teacher half-step t -> t', then t' -> t'' (ddim_update: alpha_s x_hat + sigma_s eps_hat).
    x_1, eps_1 = _to_x_eps(out_t, z, a_t, s_t, KIND, CLIP)
    z_1 = a_1 * x_1 + s_1 * eps_1
    x_2, eps_2 = _to_x_eps(out_t1, z_1, a_1, s_1, KIND, CLIP)
    z_2 = a_2 * x_2 + s_2 * eps_2
    # pd_target: the x-prediction whose one DDIM step t -> t'' lands on z_t''.
    x_tilde = (z_2 - ratio * z) / (a_2 - ratio * a_t)
    eps_tilde = (z - a_t * x_tilde) / s_t
    tl.store(x_tilde_ptr + base + offs, x_tilde.to(x_tilde_ptr.dtype.element_ty), mask=mask)
    tl.store(eps_tilde_ptr + base + offs, eps_tilde.to(eps_tilde_ptr.dtype.element_ty), mask=mask)
    diff = x_hat - x_tilde
    tl.store(part_ptr + b.to(tl.int64) * n_blocks + j, tl.sum(tl.where(mask, diff * diff, 0.0), 0))
    if COMPUTE_GRAD:
        tl.store(grad_ptr + base + offs, (diff * two_over_n).to(grad_ptr.dtype.element_ty), mask=mask)


# Kernels defined under TRITON_INTERPRET=1 run in Triton's interpreter for the whole process
# (the only way they can take CPU tensors); the dispatcher checks this flag.
INTERPRETED: bool = not isinstance(_pd_fwd_kernel, triton.JITFunction)

_BLOCK = 1024


class PDTargetLossFunction(torch.autograd.Function):
    """Per-sample ``(err_i, x_tilde, eps_tilde)`` with ``err_i = mean (x_hat_i - x_tilde_i)^2``.

    ``coeffs`` is the float32 [7, B] table of :data:`COEFFS`. Gradient flows to ``x_hat`` only:
    ``x_tilde`` is a target, so none reaches ``z_t`` or the teacher's outputs.
    """

    @staticmethod
    def forward(ctx: Any, x_hat: Tensor, z_t: Tensor, out_t: Tensor, out_t1: Tensor, coeffs: Tensor,
                kind: str, clip_x: bool) -> tuple[Tensor, Tensor, Tensor]:
        x_hat, z_t, out_t, out_t1 = (t.contiguous() for t in (x_hat, z_t, out_t, out_t1))
        B = z_t.shape[0]
        N = z_t[0].numel()
        block = min(_BLOCK, triton.next_power_of_2(N))
        n_blocks = triton.cdiv(N, block)
        compute_grad = ctx.needs_input_grad[0]
        x_tilde = torch.empty_like(z_t)
        eps_tilde = torch.empty_like(z_t)
        grad = torch.empty_like(x_hat) if compute_grad else None
        parts = torch.empty(B, n_blocks, device=z_t.device, dtype=torch.float32)
        _pd_fwd_kernel[(B, n_blocks)](
            x_hat, z_t, out_t, out_t1, coeffs,
            x_tilde, eps_tilde, grad if grad is not None else x_hat, parts,
            N, B, n_blocks, 2.0 / N,
            KIND=PREDICTION_KINDS[kind], CLIP=clip_x, COMPUTE_GRAD=compute_grad, BLOCK=block,
            num_warps=4,
        )
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(x_tilde, eps_tilde)
        return parts.sum(1) / N, x_tilde, eps_tilde

    @staticmethod
    def backward(ctx: Any, grad_err: Tensor, _gx: Tensor | None, _ge: Tensor | None) -> tuple[Tensor | None, ...]:
        nones = (None,) * 6
        if not ctx.needs_input_grad[0]:
            return (None, *nones)
        (grad,) = ctx.saved_tensors
        # d err_i / d x_hat was computed in forward; scale each sample by d loss / d err_i.
        return (grad * grad_err.reshape((-1,) + (1,) * (grad.ndim - 1)), *nones)
