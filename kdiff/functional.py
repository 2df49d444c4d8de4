"""Pure-tensor reference maths for every step and loss in kdiff (the spec the modules call).

Symbols follow ``docs/method.md``: ``z_t = alpha_t x + sigma_t eps``; the student's output at ``z_t``
gives ``x_hat``/``eps_hat``; the PD target is ``x_tilde``/``eps_tilde``; the classifier's pooled
penultimate features are ``f_S`` (student) and ``f_T`` (teacher); ``tau`` is the temperature.

Every function is a short chain of element-wise ops and reductions (no host syncs, no Python
branches on tensor values), so it fuses under ``torch.compile`` and runs under autocast: the
losses compute their softmaxes in float32 (or float64 when given float64).
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ._validation import (
    append_dims,
    check_bool,
    check_choice,
    check_finite_number,
    check_per_sample,
    check_positive,
    check_same_shape,
    check_tensor,
    check_unit_interval,
)
from .distributed import all_gather_with_grad, world_size
from .parameterization import normalize_prediction_type, to_x_eps

__all__ = [
    "add_noise",
    "ddim_update",
    "ddim_noise_scale",
    "ddim_step_coeffs",
    "pd_target",
    "pd_loss",
    "weight_pd_error",
    "resolve_weighting",
    "WEIGHTINGS",
    "feature_kl_loss",
    "entropy_loss",
    "diversity_loss",
    "dataset_oriented_loss",
]

Reduction = Literal["none", "mean", "sum", "batchmean"]
WEIGHTINGS: tuple[str, ...] = ("truncated_snr", "snr_plus_one", "x_mse", "eps_mse")
# Weightings that scale the x error by >= 1 where SNR < 1: on an eps student, eps errors by >= 1/SNR.
_X_SCALE_WEIGHTINGS = ("truncated_snr", "snr_plus_one", "x_mse")


def _loss_dtype(x: Tensor) -> torch.dtype:
    # Softmax maths in fp32 at least; keep float64 for gradcheck and exact tests.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------- DDIM
def add_noise(x: Tensor, noise: Tensor, alpha_t: Tensor, sigma_t: Tensor) -> Tensor:
    """Forward noising ``z_t = alpha_t x + sigma_t eps`` (docs/method.md §1).

    Args:
        x: Clean data, [B, ...].
        noise: Standard normal ``eps`` shaped like ``x`` (cast to ``x``'s dtype).
        alpha_t: ``alpha_t`` per sample, [B] (or a 0-d tensor for the whole batch).
        sigma_t: ``sigma_t`` per sample, [B] (or 0-d).

    Returns:
        ``z_t`` in ``x``'s dtype.

    Example:
        >>> import torch
        >>> from kdiff import CosineSchedule
        >>> from kdiff.functional import add_noise
        >>> x, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
        >>> alpha, sigma = CosineSchedule(logsnr_min=None, logsnr_max=None).alpha_sigma(torch.tensor([0.0, 1.0]))
        >>> z = add_noise(x, eps, alpha, sigma)   # t = 0 keeps x; t = 1 is (almost) pure noise
        >>> torch.equal(z[0], x[0]), torch.allclose(z[1], eps[1])
        (True, True)
    """
    check_tensor("x", x)
    check_tensor("noise", noise)
    check_same_shape("noise", noise, "x", x)
    check_per_sample("alpha_t", alpha_t, x)
    check_per_sample("sigma_t", sigma_t, x)
    a = append_dims(alpha_t, x.ndim).to(x.dtype)
    s = append_dims(sigma_t, x.ndim).to(x.dtype)
    return a * x + s * noise.to(x.dtype)


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
        noise: Standard normal noise ``xi`` shaped like ``x_hat`` (needed with ``noise_scale``,
            refused without it).

    Example:
        >>> import torch
        >>> from kdiff.functional import ddim_update
        >>> x_hat, eps_hat = torch.ones(2, 3), torch.zeros(2, 3)
        >>> ddim_update(x_hat, eps_hat, torch.tensor([0.6, 0.8]), torch.tensor([0.8, 0.6]))[:, 0]
        tensor([0.6000, 0.8000])
    """
    check_same_shape("eps_hat", eps_hat, "x_hat", x_hat)
    check_per_sample("alpha_s", alpha_s, x_hat)
    check_per_sample("sigma_s", sigma_s, x_hat)
    a = append_dims(alpha_s, x_hat.ndim).to(x_hat.dtype)
    s = append_dims(sigma_s, x_hat.ndim).to(x_hat.dtype)
    if noise_scale is None:
        if noise is not None:
            raise ValueError("noise is only used with noise_scale (stochastic DDIM); got noise without noise_scale")
        return a * x_hat + s * eps_hat
    if noise is None:
        raise ValueError("noise must be given with noise_scale")
    check_tensor("noise", noise)
    check_same_shape("noise", noise, "x_hat", x_hat)
    check_per_sample("noise_scale", noise_scale, x_hat)
    e = append_dims(noise_scale, x_hat.ndim).to(x_hat.dtype)
    return a * x_hat + (s.square() - e.square()).clamp_min(0).sqrt() * eps_hat + e * noise


def ddim_noise_scale(
    alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor, eta: float
) -> Tensor:
    """``sigma_eta = eta * sqrt(sigma_s^2/sigma_t^2 * (1 - alpha_t^2 sigma_s^2 / (alpha_s^2 sigma_t^2)))``.

    The DDIM paper's stochasticity (eq. 16) in alpha/sigma form; ``eta = 1`` is ancestral DDPM.
    ``eta`` must be a finite number >= 0; the formula needs ``sigma_t > 0``.
    """
    check_finite_number("eta", eta, minimum=0.0)
    ratio = (alpha_t * sigma_s) / (alpha_s * sigma_t)
    return eta * (sigma_s / sigma_t) * (1.0 - ratio.square()).clamp_min(0).sqrt()


def ddim_step_coeffs(
    model_output: Tensor,
    z_t: Tensor,
    alpha_t: Tensor,
    sigma_t: Tensor,
    alpha_s: Tensor,
    sigma_s: Tensor,
    *,
    prediction_type: str,
    clip_x: bool = False,
    noise_scale: Tensor | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One DDIM step ``t -> s`` from a network output, given the schedule's coefficients.

    The one implementation of a DDIM step: :func:`kdiff.ddim_step` and the teacher's half-steps
    in :class:`kdiff.ProgressiveDistiller` both call it, so they clip alike.

    1. ``(x_hat, eps_hat)`` from ``model_output`` of type ``prediction_type`` (docs/method.md §1);
    2. with ``clip_x``: ``x_hat <- clamp(x_hat, -1, 1)`` and ``eps_hat <- (z_t - alpha_t x_hat) / sigma_t``
       (so ``alpha_t x_hat + sigma_t eps_hat = z_t`` still holds);
    3. ``z_s = alpha_s x_hat + sigma_s eps_hat``, or the stochastic form of :func:`ddim_update`
       with ``noise_scale`` (``sigma_eta``) and ``noise`` (``xi``).

    Args:
        model_output: The network's output at ``(z_t, t)``, shaped like ``z_t``.
        z_t: Current sample, [B, ...].
        alpha_t, sigma_t: Coefficients at ``t`` per sample, [B].
        alpha_s, sigma_s: Coefficients at ``s`` per sample, [B].
        prediction_type: What ``model_output`` is: "x", "eps" or "v" (or diffusers' names).
        clip_x: Clip ``x_hat`` to [-1, 1] and recompute ``eps_hat`` from it.
        noise_scale: Optional ``sigma_eta`` per sample, [B] (:func:`ddim_noise_scale`).
        noise: ``xi`` shaped like ``z_t``, with ``noise_scale``.

    Returns:
        ``(z_s, x_hat, eps_hat)``: the new sample and the predictions the step used.

    Example:
        >>> import torch
        >>> from kdiff.functional import ddim_step_coeffs
        >>> z = torch.randn(2, 3, 4, 4)
        >>> a_t, s_t, a_s, s_s = torch.full((2,), 0.6), torch.full((2,), 0.8), torch.full((2,), 0.8), torch.full((2,), 0.6)
        >>> z_s, x_hat, eps_hat = ddim_step_coeffs(3 * torch.ones_like(z), z, a_t, s_t, a_s, s_s,
        ...                                        prediction_type="x", clip_x=True)
        >>> float(x_hat.max()), torch.allclose(0.6 * x_hat + 0.8 * eps_hat, z)
        (1.0, True)
    """
    kind = normalize_prediction_type(prediction_type)
    check_bool("clip_x", clip_x)
    check_tensor("model_output", model_output)
    check_tensor("z_t", z_t)
    check_same_shape("model_output", model_output, "z_t", z_t)
    check_per_sample("alpha_t", alpha_t, z_t)
    check_per_sample("sigma_t", sigma_t, z_t)
    x_hat, eps_hat = to_x_eps(model_output, z_t, alpha_t, sigma_t, kind)
    if clip_x:
        x_hat = x_hat.clamp(-1.0, 1.0)
        eps_hat = to_x_eps(x_hat, z_t, alpha_t, sigma_t, "x")[1]
    z_s = ddim_update(x_hat, eps_hat, alpha_s, sigma_s, noise_scale=noise_scale, noise=noise)
    return z_s, x_hat, eps_hat


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

    Example:
        >>> import torch
        >>> from kdiff.functional import ddim_update, pd_target
        >>> z_t, z_t2 = torch.randn(2, 3), torch.randn(2, 3)
        >>> a_t, s_t, a_2, s_2 = torch.full((2,), 0.6), torch.full((2,), 0.8), torch.full((2,), 0.8), torch.full((2,), 0.6)
        >>> x_tilde, eps_tilde = pd_target(z_t, z_t2, a_t, s_t, a_2, s_2)
        >>> torch.allclose(ddim_update(x_tilde, eps_tilde, a_2, s_2), z_t2, atol=1e-5)
        True
    """
    check_same_shape("z_t2", z_t2, "z_t", z_t)
    for name, coeff in (("alpha_t", alpha_t), ("sigma_t", sigma_t), ("alpha_t2", alpha_t2), ("sigma_t2", sigma_t2)):
        check_per_sample(name, coeff, z_t)
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

    The weighting must suit the student's prediction type (:func:`resolve_weighting`): for an
    eps-student ``"truncated_snr"`` is ``max(1, 1/SNR) * mean (eps_hat - eps_tilde)^2``, which
    weighs the noisiest step by ``1/SNR`` (about 2.5e4 at the top of DDPM's linear betas, 1000
    steps); use ``"eps_mse"`` there.

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
    # err is [B]: a [B, 1, 1, 1] or [1] coefficient would broadcast it into a wrong loss.
    check_per_sample("alpha_t", alpha_t, x_hat, max_ndim=1)
    check_per_sample("sigma_t", sigma_t, x_hat, max_ndim=1)
    dtype = _loss_dtype(x_hat)
    err = (x_hat.to(dtype) - x_tilde.to(dtype)).square().flatten(1).mean(1)
    snr = (alpha_t.to(dtype) / sigma_t.to(dtype)).square()
    return _reduce_per_example(weight_pd_error(err, snr, weighting), reduction)


def weight_pd_error(err: Tensor, snr: Tensor, weighting: str) -> Tensor:
    """Per-example x-error ``mean (x_hat - x_tilde)^2`` [B] weighted as :func:`pd_loss` says."""
    if weighting == "truncated_snr":
        return err * snr.clamp_min(1.0)
    if weighting == "snr_plus_one":
        return err * (snr + 1.0)
    if weighting == "eps_mse":
        return err * snr
    return err


def resolve_weighting(weighting: str, prediction_type: str, *, stacklevel: int = 2) -> str:
    """The :func:`pd_loss` weighting for a student of ``prediction_type``.

    ``"auto"`` gives ``"truncated_snr"`` for x- and v-students (the PD paper's choice) and
    ``"eps_mse"`` for eps-students: ``eps_hat`` reaches ``x_hat = (z_t - sigma_t eps_hat) / alpha_t``
    through a ``sigma_t/alpha_t`` amplification, so a weighting that holds the x error at full
    weight where ``SNR < 1`` (``"truncated_snr"``, ``"snr_plus_one"``, ``"x_mse"``) weighs the
    eps error there by ``1/SNR`` or more, and the noisiest steps swamp the loss. Such an explicit
    choice for an eps-student is kept but warned about (``UserWarning``).

    Args:
        weighting: ``"auto"`` or one of ``WEIGHTINGS``.
        prediction_type: The student's output type: "x", "eps" or "v" (or diffusers' names).
        stacklevel: Passed to :func:`warnings.warn` (2: the caller of this function).

    Returns:
        One of ``WEIGHTINGS``.

    Example:
        >>> from kdiff.functional import resolve_weighting
        >>> resolve_weighting("auto", "v"), resolve_weighting("auto", "epsilon")
        ('truncated_snr', 'eps_mse')
    """
    check_choice("weighting", weighting, ("auto", *WEIGHTINGS))
    kind = normalize_prediction_type(prediction_type)
    if weighting == "auto":
        return "eps_mse" if kind == "eps" else "truncated_snr"
    if kind == "eps" and weighting in _X_SCALE_WEIGHTINGS:
        warnings.warn(
            f"weighting={weighting!r} with an eps-predicting student weighs its eps error by "
            "1/SNR or more at high noise (about 2.5e4 at the top of DDPM's linear betas), so the "
            "noisiest steps dominate training; use weighting='eps_mse' (what 'auto' picks for "
            "eps), or a v- or x-predicting student",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
    return weighting


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


def _check_rows(name: str, x: Tensor, layout: str) -> None:
    # An empty batch would give 0 / 0 = NaN in every mean below: refuse it by name instead.
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape {layout}; got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} must have at least one row (B >= 1); got shape {tuple(x.shape)}")


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

    Raises:
        ValueError: ``temperature`` is not a finite number > 0, the shapes differ, or ``input`` is
            not [B, D] with ``B >= 1`` (an empty batch has no mean).

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
    _check_rows("input", input, "[B, D]")
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
        Values in ``[0, log K]``; finite for any finite or ``-inf`` logits (a row needs one finite
        logit).

    Raises:
        ValueError: ``input`` is not [B, K] with ``B >= 1``.
    """
    check_choice("reduction", reduction, ("none", "mean", "sum"))
    _check_rows("input", input, "[B, K]")
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
        A scalar in ``[-log K, 0]``; minimising it spreads the batch over classes. Value and
        gradient are finite for ``-inf`` logits, even when a class is ``-inf`` in every row.

    Raises:
        ValueError: ``input`` is not [B, K] with ``B >= 1``.
    """
    _check_rows("input", input, "[B, K]")
    # Clamped before the batch logsumexp: a class that is -inf in every row would otherwise give
    # logsumexp(-inf, ..., -inf), whose gradient is 0 / 0 = NaN.
    log_p = _finite_log(F.log_softmax(input.to(_loss_dtype(input)), dim=-1))
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

    Raises:
        ValueError: ``gamma`` is not in [0, 1], or ``input`` is not [B, K] with ``B >= 1``.
    """
    check_unit_interval("gamma", gamma)
    h = entropy_loss(input)
    dv = diversity_loss(input, sync_global=sync_global, group=group)
    return gamma * h + (1.0 - gamma) * dv, h, dv


