"""Pure-tensor reference maths for every step and loss in kdiff (the spec the modules call).

Symbols follow ``docs/method.md``: ``z_t = alpha_t x + sigma_t eps``; the student's output at ``z_t``
gives ``x_hat``/``eps_hat``; the PD target is ``x_tilde``/``eps_tilde``; the classifier's pooled
penultimate features are ``f_S`` (student) and ``f_T`` (teacher); ``tau`` is the temperature.

Every function is a short chain of element-wise ops and reductions (no host syncs, no Python
branches on tensor values), so it fuses under ``torch.compile`` and runs under autocast: the
losses compute their softmaxes in float32 (or float64 when given float64).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import (
    append_dims,
    check_choice,
    check_positive,
    check_same_shape,
    check_unit_interval,
)
from .distributed import all_gather_with_grad, world_size

__all__ = [
    "ddim_update",
    "ddim_noise_scale",
    "pd_target",
    "pd_loss",
    "WEIGHTINGS",
    "feature_kl_loss",
    "entropy_loss",
    "diversity_loss",
    "dataset_oriented_loss",
]

Reduction = Literal["none", "mean", "sum", "batchmean"]
WEIGHTINGS: tuple[str, ...] = ("truncated_snr", "snr_plus_one", "x_mse", "eps_mse")


def _loss_dtype(x: Tensor) -> torch.dtype:
    # Softmax maths in fp32 at least; keep float64 for gradcheck and exact tests.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------- DDIM
def ddim_update(
    x_hat: Tensor,
    eps_hat: Tensor,
    alpha_s: Tensor,
    sigma_s: Tensor,
    *,
    noise_scale: Tensor | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """DDIM update ``z_s = alpha_s x_hat + sigma_s eps_hat`` (eta = 0).

    With ``noise_scale`` (``sigma_eta`` from :func:`ddim_noise_scale`) and ``noise`` (``xi``):
    ``z_s = alpha_s x_hat + sqrt(sigma_s^2 - sigma_eta^2) eps_hat + sigma_eta xi``.

    Args:
        x_hat: x-prediction at time t, [B, ...].
        eps_hat: eps-prediction at time t, [B, ...].
        alpha_s: ``alpha_s`` per sample, [B].
        sigma_s: ``sigma_s`` per sample, [B].
        noise_scale: Optional ``sigma_eta`` per sample, [B].
        noise: Standard normal noise ``xi`` shaped like ``x_hat`` (needed with ``noise_scale``).
    """
    a = append_dims(alpha_s, x_hat.ndim).to(x_hat.dtype)
    s = append_dims(sigma_s, x_hat.ndim).to(x_hat.dtype)
    if noise_scale is None:
        return a * x_hat + s * eps_hat
    if noise is None:
        raise ValueError("noise must be given with noise_scale")
    e = append_dims(noise_scale, x_hat.ndim).to(x_hat.dtype)
    return a * x_hat + (s.square() - e.square()).clamp_min(0).sqrt() * eps_hat + e * noise


def ddim_noise_scale(
    alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor, eta: float
) -> Tensor:
    """``sigma_eta = eta * sqrt(sigma_s^2/sigma_t^2 * (1 - alpha_t^2 sigma_s^2 / (alpha_s^2 sigma_t^2)))``.

    The DDIM paper's stochasticity (eq. 16) in alpha/sigma form; ``eta = 1`` is ancestral DDPM.
    """
    ratio = (alpha_t * sigma_s) / (alpha_s * sigma_t)
    return eta * (sigma_s / sigma_t) * (1.0 - ratio.square()).clamp_min(0).sqrt()


# ---------------------------------------------------------------------- progressive distillation
def pd_target(
    z_t: Tensor,
    z_t2: Tensor,
    alpha_t: Tensor,
    sigma_t: Tensor,
    alpha_t2: Tensor,
    sigma_t2: Tensor,
) -> tuple[Tensor, Tensor]:
    """PD target ``(x_tilde, eps_tilde)`` making one DDIM step ``t -> t''`` land on ``z_t''``.

    ``x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)`` and
    ``eps_tilde = (z_t - alpha_t x_tilde) / sigma_t``. With ``sigma_t'' = 0`` the ratio is 0 and
    this is ``x_tilde = z_t'' / alpha_t''``.

    Args:
        z_t: Noisy sample at the student's time t, [B, ...].
        z_t2: The teacher's two-step result ``z_t''``, [B, ...].
        alpha_t, sigma_t: Coefficients at t, [B].
        alpha_t2, sigma_t2: Coefficients at ``t''``, [B].
    """
    nd = z_t.ndim
    a_t = append_dims(alpha_t, nd).to(z_t.dtype)
    s_t = append_dims(sigma_t, nd).to(z_t.dtype)
    a_2 = append_dims(alpha_t2, nd).to(z_t.dtype)
    ratio = append_dims(sigma_t2 / sigma_t, nd).to(z_t.dtype)
    x_tilde = (z_t2 - ratio * z_t) / (a_2 - ratio * a_t)
    eps_tilde = (z_t - a_t * x_tilde) / s_t
    return x_tilde, eps_tilde


def pd_loss(
    x_hat: Tensor,
    x_tilde: Tensor,
    alpha_t: Tensor,
    sigma_t: Tensor,
    *,
    weighting: str = "truncated_snr",
    reduction: Reduction = "mean",
) -> Tensor:
    """Student loss against the PD target, per weighting (docs/method.md §2).

    * ``"truncated_snr"``: ``max(mean (x_hat - x_tilde)^2, mean (eps_hat - eps_tilde)^2)`` per
      example, i.e. ``max(SNR, 1) * mean (x_hat - x_tilde)^2`` (the paper's default);
    * ``"snr_plus_one"``: ``mean (v_hat - v_tilde)^2 = (1 + SNR) mean (x_hat - x_tilde)^2``;
    * ``"x_mse"``: ``mean (x_hat - x_tilde)^2``; ``"eps_mse"``: ``SNR * mean (x_hat - x_tilde)^2``.

    The eps and v errors are exact linear images of the x error at fixed ``z_t``
    (``eps_hat - eps_tilde = -(alpha_t/sigma_t)(x_hat - x_tilde)``), so one squared error suffices.

    Args:
        x_hat: Student x-prediction, [B, ...].
        x_tilde: PD target, [B, ...].
        alpha_t, sigma_t: Coefficients at the student's time, [B].
        weighting: One of ``WEIGHTINGS``.
        reduction: "mean" (batch mean, default), "sum" or "none" (per example, [B]).
    """
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("reduction", reduction, ("none", "mean", "sum"))
    check_same_shape("x_hat", x_hat, "x_tilde", x_tilde)
    dtype = _loss_dtype(x_hat)
    err = (x_hat.to(dtype) - x_tilde.to(dtype)).square().flatten(1).mean(1)
    snr = (alpha_t.to(dtype) / sigma_t.to(dtype)).square()
    if weighting == "truncated_snr":
        per_example = err * snr.clamp_min(1.0)
    elif weighting == "snr_plus_one":
        per_example = err * (snr + 1.0)
    elif weighting == "eps_mse":
        per_example = err * snr
    else:
        per_example = err
    return _reduce_per_example(per_example, reduction)


def _reduce_per_example(values: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.mean()


# ------------------------------------------------------------------------------- CFD losses
def _finite_log(log_p: Tensor) -> Tensor:
    # log p = -inf where p underflows or a logit is -inf; p * log p must be 0 there, not NaN.
    # Clamping keeps the value finite and gives those entries a zero gradient.
    return log_p.clamp_min(torch.finfo(log_p.dtype).min)


def feature_kl_loss(
    input: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    reduction: Reduction = "batchmean",
) -> Tensor:
    """CFD feature loss ``KL(softmax(f_T / tau) || softmax(f_S))`` over the D feature channels.

    The temperature applies to the teacher only (``tau < 1`` sharpens) and there is no
    ``tau^2`` factor (docs/method.md §3).

    Args:
        input: Student features ``f_S``, [B, D].
        target: Teacher features ``f_T``, [B, D].
        temperature: ``tau > 0``.
        reduction: "batchmean" (sum over D, mean over B: the true KL, default), "mean" (mean over
            all elements), "sum", or "none" (per element, [B, D]).

    Example:
        >>> import torch
        >>> from kdiff.functional import feature_kl_loss
        >>> f = torch.randn(4, 512)
        >>> float(feature_kl_loss(f, f, temperature=1.0)) < 1e-6
        True
    """
    check_positive("temperature", temperature)
    check_choice("reduction", reduction, ("none", "mean", "sum", "batchmean"))
    check_same_shape("input", input, "target", target)
    if input.ndim != 2:
        raise ValueError(f"input must have shape [B, D]; got {tuple(input.shape)}")
    dtype = _loss_dtype(input)
    log_q = _finite_log(F.log_softmax(input.to(dtype), dim=-1))
    log_p = _finite_log(F.log_softmax(target.to(dtype) / temperature, dim=-1))
    kl = log_p.exp() * (log_p - log_q)
    if reduction == "none":
        return kl
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.mean()
    return kl.sum() / input.shape[0]


def entropy_loss(input: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    """Per-sample class entropy ``H_i = -sum_k p_ik log p_ik`` with ``p_i = softmax(logits_i)``.

    Args:
        input: Logits, [B, K].
        reduction: "mean" (the paper's ``H``, default), "sum" or "none" ([B]).

    Returns:
        Values in ``[0, log K]``; finite for any finite or ``-inf`` logits.
    """
    check_choice("reduction", reduction, ("none", "mean", "sum"))
    if input.ndim != 2:
        raise ValueError(f"input must have shape [B, K]; got {tuple(input.shape)}")
    log_p = _finite_log(F.log_softmax(input.to(_loss_dtype(input)), dim=-1))
    per_sample = -(log_p.exp() * log_p).sum(-1)
    return _reduce_per_example(per_sample, reduction)


def diversity_loss(input: Tensor, *, sync_global: bool = False, group: object | None = None) -> Tensor:
    """Diversity term ``Dv = sum_k pbar_k log pbar_k`` with ``pbar = mean_i softmax(logits_i)``.

    Computed in the log domain (``log pbar = logsumexp_i log p_i - log B``), so it stays finite
    when probabilities underflow.

    Args:
        input: Logits, [B, K].
        sync_global: Average ``pbar`` over the global batch of all processes in ``group``
            (``torch.distributed``), keeping the gradient to every process's logits. Under DDP the
            averaged gradients then equal the single-process gradients on the whole batch.
        group: Process group (default: the world).

    Returns:
        A scalar in ``[-log K, 0]``; minimising it spreads the batch over classes.
    """
    if input.ndim != 2 or input.shape[0] < 1:
        raise ValueError(f"input must have shape [B, K] with B >= 1; got {tuple(input.shape)}")
    log_p = F.log_softmax(input.to(_loss_dtype(input)), dim=-1)
    log_sum = torch.logsumexp(log_p, dim=0)  # log sum_i p_ik, [K]
    count = torch.full((), input.shape[0], dtype=log_sum.dtype, device=log_sum.device)
    if sync_global and world_size(group) > 1:
        # Per-process sums are gathered in the log domain; batch sizes may differ per process.
        gathered = all_gather_with_grad(torch.cat([log_sum, count.reshape(1)]), group)
        log_sum = torch.logsumexp(gathered[:, :-1], dim=0)
        count = gathered[:, -1].sum()
    log_pbar = _finite_log(log_sum - count.log())
    return (log_pbar.exp() * log_pbar).sum()


def dataset_oriented_loss(
    input: Tensor,
    *,
    gamma: float = 0.75,
    sync_global: bool = False,
    group: object | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """CFD dataset-oriented loss ``L_data = gamma * H + (1 - gamma) * Dv``.

    Args:
        input: The student's class logits, [B, K].
        gamma: Weight in [0, 1] of the entropy term.
        sync_global: Compute ``pbar`` over the global batch (see :func:`diversity_loss`).
        group: Process group for ``sync_global``.

    Returns:
        ``(L_data, H, Dv)``, three scalars.
    """
    check_unit_interval("gamma", gamma)
    h = entropy_loss(input)
    dv = diversity_loss(input, sync_global=sync_global, group=group)
    return gamma * h + (1.0 - gamma) * dv, h, dv


