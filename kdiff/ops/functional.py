"""Fused loss ops with the reference maths kept: the same calls as :mod:`kdiff.functional`, plus ``impl``.

``impl="torch"`` runs :mod:`kdiff.functional`; ``impl="triton"`` the fused kernels of
``kdiff/ops/<op>.py``; ``impl="auto"`` (default) picks Triton for CUDA tensors when it can
(see :func:`kdiff.ops.resolve_impl`) and the torch path everywhere else, CPU included. Both paths
give the same values and gradients up to float32 rounding; the kernels do their softmax and
target maths in float32 whatever the input dtype (float32, float16 or bfloat16).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import functional as F
from .._validation import (
    check_bool,
    check_choice,
    check_per_sample,
    check_positive,
    check_same_shape,
    check_tensor,
    check_unit_interval,
)
from ..distributed import all_gather_with_grad, world_size
from ..parameterization import normalize_prediction_type, to_x_eps
from ._dispatch import load_kernels, resolve_impl

__all__ = ["feature_kl_loss", "dataset_oriented_loss", "pd_target_loss", "PDTargetLossOutput"]


def _check_rows(name: str, x: Tensor, layout: str) -> None:
    check_tensor(name, x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape {layout}; got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} must have at least one row (B >= 1); got shape {tuple(x.shape)}")


def _finite_log(log_p: Tensor) -> Tensor:
    # As the reference: log p = -inf where p underflows; clamp so p log p is 0, not NaN.
    return log_p.clamp_min(torch.finfo(log_p.dtype).min)


# ------------------------------------------------------------------------------ feature KL
def feature_kl_loss(
    input: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    reduction: F.Reduction = "batchmean",
    impl: str = "auto",
) -> Tensor:
    """CFD feature loss ``KL(softmax(f_T / tau) || softmax(f_S))``, fused or plain.

    Same maths and arguments as :func:`kdiff.functional.feature_kl_loss`. The fused kernel reads
    each row of ``f_S`` and ``f_T`` once (rows longer than 4096 loop over blocks), computes the
    loss and, for the scalar reductions, the gradient in the same pass; backward only scales it.

    ``f_T`` gets no gradient: CFD's teacher features are computed without one. A ``target`` that
    requires grad (with grad mode on) takes the torch path under ``impl="auto"`` and is refused by
    ``impl="triton"``.

    Args:
        input: Student features ``f_S``, [B, D].
        target: Teacher features ``f_T``, [B, D].
        temperature: ``tau > 0``, applied to the teacher only.
        reduction: "batchmean" (default), "mean", "sum" or "none" ([B, D]).
        impl: "auto", "torch" or "triton".

    Returns:
        The loss in float32 (float64 for float64 inputs, torch path).

    Raises:
        ValueError: a bad ``temperature``/``reduction``/``impl``, mismatched shapes, or an
            ``impl="triton"`` that cannot run here.

    Example:
        >>> import torch
        >>> from kdiff.ops import feature_kl_loss
        >>> f_s, f_t = torch.randn(4, 512), torch.randn(4, 512)
        >>> loss = feature_kl_loss(f_s, f_t, temperature=0.95)          # CPU: the torch path
        >>> ref = torch.nn.functional.kl_div(torch.log_softmax(f_s, -1), torch.softmax(f_t / 0.95, -1),
        ...                                  reduction="batchmean")
        >>> torch.allclose(loss, ref, atol=1e-6)
        True
    """
    check_positive("temperature", temperature)
    check_choice("reduction", reduction, ("none", "mean", "sum", "batchmean"))
    check_tensor("target", target)
    _check_rows("input", input, "[B, D]")
    check_same_shape("input", input, "target", target)
    chosen = resolve_impl(impl, input, target, op="feature_kl_loss")
    if chosen == "triton" and torch.is_grad_enabled() and target.requires_grad:
        if impl == "triton":
            raise ValueError(
                "feature_kl_loss: impl='triton' gives no gradient to target (the teacher's "
                "features); detach target, or use impl='torch' to differentiate through it"
            )
        chosen = "torch"
    if chosen == "torch" or input.numel() == 0:
        return F.feature_kl_loss(input, target, temperature=temperature, reduction=reduction)
    kernels = load_kernels("feature_kl", input.device)
    return kernels.FeatureKLFunction.apply(input, target.detach(), float(temperature), reduction)


# ---------------------------------------------------------------------- dataset-oriented loss
def dataset_oriented_loss(
    input: Tensor,
    *,
    gamma: float = 0.75,
    sync_global: bool = False,
    group: object | None = None,
    impl: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:
    """CFD dataset-oriented loss ``L_data = gamma * H + (1 - gamma) * Dv``, fused or plain.

    Same maths and arguments as :func:`kdiff.functional.dataset_oriented_loss`. The fused path
    is one kernel in forward (per-row entropy and log-domain column sums of ``p``) and one in
    backward (the gradient); the [K]-sized ``Dv`` maths, and with ``sync_global`` the differentiable
    all-gather of the per-process log-sums, run in torch exactly as in the reference, so the
    global-batch form stays exact under ``torch.distributed``.

    Args:
        input: The student's class logits, [B, K].
        gamma: Weight in [0, 1] of the entropy term ``H``.
        sync_global: Compute ``pbar`` over the global batch of all processes in ``group``.
        group: Process group for ``sync_global`` (default: the world).
        impl: "auto", "torch" or "triton".

    Returns:
        ``(L_data, H, Dv)``, three float32 scalars (float64 for float64 inputs, torch path).

    Example:
        >>> import torch
        >>> from kdiff.ops import dataset_oriented_loss
        >>> loss, h, dv = dataset_oriented_loss(torch.randn(128, 10), gamma=0.75)
        >>> bool(0 <= h <= torch.log(torch.tensor(10.0))), bool(-2.31 < dv <= 0)
        (True, True)
    """
    check_unit_interval("gamma", gamma)
    check_bool("sync_global", sync_global)
    _check_rows("input", input, "[B, K]")
    chosen = resolve_impl(impl, input, op="dataset_oriented_loss")
    if chosen == "torch" or input.numel() == 0:
        return F.dataset_oriented_loss(input, gamma=gamma, sync_global=sync_global, group=group)
    kernels = load_kernels("dataset_oriented", input.device)
    h, log_sum = kernels.DatasetStatsFunction.apply(input)
    count = torch.full((), input.shape[0], dtype=log_sum.dtype, device=log_sum.device)
    if sync_global and world_size(group) > 1:
        # As the reference: per-process log-sums gathered with gradient; batch sizes may differ.
        gathered = all_gather_with_grad(torch.cat([log_sum, count.reshape(1)]), group)
        log_sum = torch.logsumexp(gathered[:, :-1], dim=0)
        count = gathered[:, -1].sum()
    log_pbar = _finite_log(log_sum - count.log())
    dv = (log_pbar.exp() * log_pbar).sum()
    return gamma * h + (1.0 - gamma) * dv, h, dv


# ------------------------------------------------------------------------- PD target + loss
class PDTargetLossOutput(NamedTuple):
    """Result of :func:`pd_target_loss`."""

    loss: Tensor
    """The student's loss against the target, reduced as asked (float32)."""
    x_tilde: Tensor
    """PD target ``x_tilde`` (no gradient), shaped and typed like ``z_t``."""
    eps_tilde: Tensor
    """``eps_tilde = (z_t - alpha_t x_tilde) / sigma_t`` (no gradient)."""


def _half_step(output: Tensor, z: Tensor, a: Tensor, s: Tensor, a_next: Tensor, s_next: Tensor,
               kind: str, clip_x: bool) -> Tensor:
    # The teacher's DDIM step as ProgressiveDistiller takes it: convert, clip, step.
    x_hat, eps_hat = to_x_eps(output, z, a, s, kind)
    if clip_x:
        x_hat = x_hat.clamp(-1.0, 1.0)
        eps_hat = to_x_eps(x_hat, z, a, s, "x")[1]
    return F.ddim_update(x_hat, eps_hat, a_next, s_next)


def pd_target_loss(
    input: Tensor,
    z_t: Tensor,
    teacher_t: Tensor,
    teacher_t1: Tensor,
    alpha_t: Tensor,
    sigma_t: Tensor,
    alpha_t1: Tensor,
    sigma_t1: Tensor,
    alpha_t2: Tensor,
    sigma_t2: Tensor,
    *,
    teacher_prediction: str = "x",
    clip_x: bool = False,
    weighting: str = "truncated_snr",
    reduction: str = "mean",
    impl: str = "auto",
) -> PDTargetLossOutput:
    """The PD target chain and the student's loss in one call (docs/method.md §2).

    From the teacher's outputs at ``t`` (on ``z_t``) and at ``t'`` (on ``z_t'``), replays the two
    DDIM half-steps ``t -> t' -> t''`` (``z_t'``, then ``z_t''``), forms ``x_tilde``/``eps_tilde``
    as :func:`kdiff.functional.pd_target` and the loss as :func:`kdiff.functional.pd_loss`. The
    fused kernel does all of it in one element-wise pass with per-sample coefficients (float32
    maths), writing the gradient with respect to ``input`` on the way; backward only scales it.

    Only ``input`` (the student's ``x_hat``) gets a gradient: the target is computed without one,
    as in :class:`kdiff.ProgressiveDistiller`. ``z_t'' = alpha_t'' x_tilde + sigma_t'' eps_tilde``
    recovers the teacher's two-step result when needed.

    Args:
        input: Student x-prediction ``x_hat`` at ``z_t``, [B, ...].
        z_t: Noisy sample at the student's time ``t``, [B, ...].
        teacher_t: The teacher's output at ``(z_t, t)``, shaped like ``z_t``.
        teacher_t1: The teacher's output at ``(z_t', t')``, shaped like ``z_t``.
        alpha_t, sigma_t: Coefficients at ``t``, per sample: [B] (or [B, 1, ...], or 0-d).
        alpha_t1, sigma_t1: Coefficients at ``t' = t - 1/(2N)``.
        alpha_t2, sigma_t2: Coefficients at ``t'' = t - 1/N``.
        teacher_prediction: What the teacher outputs: "x", "eps" or "v" (or diffusers' names).
        clip_x: Clip the teacher's ``x_hat`` to [-1, 1] in both half-steps.
        weighting: One of :data:`kdiff.functional.WEIGHTINGS` (default "truncated_snr").
        reduction: "mean" (default), "sum" or "none" (per sample, [B]).
        impl: "auto", "torch" or "triton".

    Returns:
        :class:`PDTargetLossOutput` ``(loss, x_tilde, eps_tilde)``.

    Example:
        >>> import torch
        >>> from kdiff.ops import pd_target_loss
        >>> z_t, eps_t, eps_t1 = torch.randn(3, 2, 3, 8, 8)   # z_t and an eps-teacher's outputs
        >>> a = torch.tensor([0.6, 0.7])
        >>> coeffs = [c for v in (a, a + 0.05, a + 0.1) for c in (v, (1 - v**2).sqrt())]
        >>> out = pd_target_loss(torch.zeros_like(z_t), z_t, eps_t, eps_t1, *coeffs, teacher_prediction="eps")
        >>> out.loss.shape, out.x_tilde.shape
        (torch.Size([]), torch.Size([2, 3, 8, 8]))
        >>> # a student that predicts the target has zero loss
        >>> float(pd_target_loss(out.x_tilde, z_t, eps_t, eps_t1, *coeffs, teacher_prediction="eps").loss)
        0.0
    """
    kind = normalize_prediction_type(teacher_prediction, name="teacher_prediction")
    check_bool("clip_x", clip_x)
    check_choice("weighting", weighting, F.WEIGHTINGS)
    check_choice("reduction", reduction, ("none", "mean", "sum"))
    for name, value in (("input", input), ("z_t", z_t), ("teacher_t", teacher_t), ("teacher_t1", teacher_t1)):
        check_tensor(name, value)
    if z_t.ndim < 2 or z_t.shape[0] < 1:
        raise ValueError(f"z_t must have shape [B, ...] with B >= 1; got {tuple(z_t.shape)}")
    check_same_shape("input", input, "z_t", z_t)
    check_same_shape("teacher_t", teacher_t, "z_t", z_t)
    check_same_shape("teacher_t1", teacher_t1, "z_t", z_t)
    named = (("alpha_t", alpha_t), ("sigma_t", sigma_t), ("alpha_t1", alpha_t1),
             ("sigma_t1", sigma_t1), ("alpha_t2", alpha_t2), ("sigma_t2", sigma_t2))
    # Per-sample [B] (a [B, 1, ...] or 0-d coefficient is the same thing, flattened or expanded).
    coeffs = [check_per_sample(name, c, z_t).reshape(-1).expand(z_t.shape[0]) for name, c in named]
    a_t, s_t, a_1, s_1, a_2, s_2 = coeffs
    chosen = resolve_impl(impl, z_t, input, teacher_t, teacher_t1, *coeffs, op="pd_target_loss")
    if chosen == "torch" or z_t.numel() == 0:
        with torch.no_grad():
            z_t1 = _half_step(teacher_t, z_t, a_t, s_t, a_1, s_1, kind, clip_x)
            z_t2 = _half_step(teacher_t1, z_t1, a_1, s_1, a_2, s_2, kind, clip_x)
            x_tilde, eps_tilde = F.pd_target(z_t, z_t2, a_t, s_t, a_2, s_2)
        loss = F.pd_loss(input, x_tilde, a_t, s_t, weighting=weighting, reduction=reduction)
        return PDTargetLossOutput(loss, x_tilde, eps_tilde)
    kernels = load_kernels("pd_target", z_t.device)
    # The ratio in the coefficients' own dtype, as pd_target computes it, then float32 for the kernel.
    table = torch.stack([c.to(torch.float32) for c in (*coeffs, s_2 / s_t)]).contiguous()
    err, x_tilde, eps_tilde = kernels.PDTargetLossFunction.apply(
        input, z_t.detach(), teacher_t.detach(), teacher_t1.detach(), table, kind, clip_x
    )
    # pd_loss's weighting on the per-sample errors [B].
    snr = (a_t.to(torch.float32) / s_t.to(torch.float32)).square()
    loss = F._reduce_per_example(F.weight_pd_error(err, snr, weighting), reduction)
    return PDTargetLossOutput(loss, x_tilde, eps_tilde)
