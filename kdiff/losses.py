"""CFD loss modules: :class:`ClassifierFeatureLoss`, :class:`DatasetOrientedLoss`, :class:`CFDLoss`.

The maths lives in :mod:`kdiff.functional`; these modules hold the hyper-parameters (the paper's
defaults) and the frozen classifier. Every returned term is a tensor (no ``.item()``), so logging
them costs no host sync until the caller reads them.

Each loss takes an optional per-sample ``weight`` [B] (e.g. a time-dependent weighting of the CFD
term; :func:`snr_gate` builds one that switches CFD off outside a logSNR range). With ``w_i`` the
weights, ``KL_i`` the feature KL and ``H_i`` the class entropy of sample ``i``, and ``p_i`` its
class probabilities:

* ``L_feat = (1/B) sum_i w_i KL_i`` ("batchmean");
* ``H = (1/B) sum_i w_i H_i``;
* ``Dv = wbar * sum_k pbar_k log pbar_k`` with ``wbar = (1/B) sum_i w_i`` and the weighted class
  mix ``pbar = sum_i w_i p_i / sum_i w_i`` (``Dv = 0`` when every weight is 0).

Every term is linear in ``w`` and a weight of ones gives the unweighted loss. With a 0/1 gate,
each term is the fraction of samples kept times the unweighted term over the kept samples alone,
and the other samples get exactly zero gradient. Dividing by ``B`` rather than ``sum_i w_i`` keeps
the loss an unbiased batch estimate of ``E_t[w(t) L(t)]`` whose scale does not depend on how many
samples a batch happens to keep.

Each module takes ``impl`` ("auto", "torch" or "triton") and computes its unweighted terms with the
matching :mod:`kdiff.ops` op. ``"auto"`` (default) runs the fused Triton kernels on CUDA tensors
and otherwise the :mod:`kdiff.functional` maths (all CPU tensors, float64, under
``torch.compile``), falling back to it silently for what the kernels do not cover: a per-sample
``weight``. ``"triton"`` refuses that case with a ``ValueError`` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._validation import (
    check_batch,
    check_choice,
    check_finite_number,
    check_positive,
    check_same_shape,
    check_tensor,
    check_unit_interval,
    value_checks_enabled,
)
from .classifier import ClassifierTransform, FrozenClassifier
from .distributed import all_gather_with_grad, world_size
from .functional import _check_rows, _finite_log, _loss_dtype
from .functional import feature_kl_loss as _reference_feature_kl_loss
from .ops import IMPLS

__all__ = [
    "ClassifierFeatureLoss",
    "DatasetOrientedLoss",
    "CFDLoss",
    "CFDLossOutput",
    "FeatureLossOutput",
    "snr_gate",
]

Transform = ClassifierTransform | Callable[[Tensor], Tensor]


@dataclass
class FeatureLossOutput:
    """The feature loss and the classifier outputs it computed (for reuse by ``L_data``)."""

    loss: Tensor
    student_logits: Tensor
    student_features: Tensor
    teacher_features: Tensor


def _as_frozen(
    classifier: nn.Module | Callable[[Tensor], Any],
    *,
    transform: Transform | None,
    feature_layer: str | None,
    features: str | None,
) -> FrozenClassifier:
    # A FrozenClassifier already owns its transform and feature source: a second value would either
    # be ignored or contradict it, so it is refused.
    if isinstance(classifier, FrozenClassifier):
        options = (("transform", transform), ("feature_layer", feature_layer), ("features", features))
        given = [n for n, v in options if v is not None]
        if given:
            raise ValueError(
                f"{' and '.join(given)} must be None when classifier is a FrozenClassifier (it has "
                f"transform={classifier.transform!r}, feature_layer={classifier.feature_layer!r}, "
                f"features={classifier.features!r}); pass them to FrozenClassifier instead"
            )
        return classifier
    return FrozenClassifier(classifier, feature_layer=feature_layer, features=features, transform=transform)


def _check_weight(weight: object, input: Tensor) -> Tensor:
    """``weight`` as a per-sample [B] tensor for ``input``'s batch, in the losses' float dtype."""
    weight = check_tensor("weight", weight)
    if weight.is_complex():
        raise TypeError(f"weight must be a real (float or bool) tensor; got {weight.dtype}")
    check_batch("weight", weight, input.shape[0])
    if weight.device != input.device:
        raise ValueError(f"weight must be on the device of the images ({input.device}); got {weight.device}")
    weight = weight.to(_loss_dtype(input))
    if value_checks_enabled(weight) and not bool(((weight >= 0) & torch.isfinite(weight)).all()):
        raise ValueError("weight must hold finite values >= 0")
    return weight


def _check_impl_weight(impl: str, weight: Tensor | None) -> None:
    # The fused kernels compute the unweighted terms only; "auto" takes the torch path for weights.
    if weight is not None and impl == "triton":
        raise ValueError(
            "weight is not supported with impl='triton' (the fused kernels compute the unweighted "
            "loss); use impl='auto', which takes the torch path for a weight, or impl='torch'"
        )


def _weighted_kl(f_s: Tensor, f_t: Tensor, weight: Tensor, *, temperature: float, reduction: str) -> Tensor:
    kl = _reference_feature_kl_loss(f_s, f_t, temperature=temperature, reduction="none") * weight.to(_loss_dtype(f_s)).unsqueeze(-1)
    if reduction == "none":
        return kl
    if reduction == "sum":
        return kl.sum()
    if reduction == "mean":
        return kl.mean()
    return kl.sum() / f_s.shape[0]


def _weighted_dataset_oriented_loss(
    input: Tensor, weight: Tensor, *, gamma: float, sync_global: bool, group: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """``(L_data, H, Dv)`` with per-sample weights (the formulas are in the module docstring)."""
    dtype = _loss_dtype(input)
    weight = weight.to(dtype)
    log_p = _finite_log(F.log_softmax(input.to(dtype), dim=-1))
    h = (weight * -(log_p.exp() * log_p).sum(-1)).mean()
    # log sum_i w_i p_ik in the log domain, as diversity_loss computes log sum_i p_ik. Rows of
    # weight 0 get a finite floor rather than log 0, so no value or gradient becomes NaN, even
    # when every weight is 0.
    kept = weight > 0
    log_w = torch.where(kept, weight, torch.ones_like(weight)).log()
    terms = torch.where(kept.unsqueeze(-1), log_p + log_w.unsqueeze(-1), torch.finfo(dtype).min)
    log_num = torch.logsumexp(terms, dim=0)  # [K]
    total = weight.sum()
    count = torch.full((), input.shape[0], dtype=dtype, device=input.device)
    if sync_global and world_size(group) > 1:
        gathered = all_gather_with_grad(torch.cat([log_num, total.reshape(1), count.reshape(1)]), group)
        log_num = torch.logsumexp(gathered[:, :-2], dim=0)
        total, count = gathered[:, -2].sum(), gathered[:, -1].sum()
    log_pbar = _finite_log(log_num - torch.where(total > 0, total, torch.ones_like(total)).log())
    dv = (total / count) * (log_pbar.exp() * log_pbar).sum()
    return gamma * h + (1.0 - gamma) * dv, h, dv


def snr_gate(
    alpha_t: Tensor,
    sigma_t: Tensor,
    *,
    min_logsnr: float | None = None,
    max_logsnr: float | None = None,
) -> Tensor:
    """Per-sample weight ``w_i = 1`` where ``min_logsnr <= logSNR(t_i) <= max_logsnr``, else 0.

    ``logSNR(t) = log(alpha_t^2 / sigma_t^2)`` (docs/method.md §1). Passed as ``weight=`` to a CFD
    loss, it switches CFD off outside that range, e.g. at high noise with ``min_logsnr`` (where an
    eps-student's ``x_hat`` amplifies its error by ``sigma_t / alpha_t = exp(-logSNR / 2)``).

    Args:
        alpha_t: ``alpha_t`` per sample, [B] (e.g. ``DistillationOutput.alpha_t``).
        sigma_t: ``sigma_t`` per sample, shaped like ``alpha_t``.
        min_logsnr: Lowest logSNR kept (inclusive), a finite number, or None for no lower bound.
        max_logsnr: Highest logSNR kept (inclusive), a finite number, or None for no upper bound.

    Returns:
        0/1 weights shaped like ``alpha_t``, in float32 (float64 for float64 inputs).

    Raises:
        ValueError: No bound given, a bound that is not a finite number, ``min_logsnr >
            max_logsnr``, or ``alpha_t`` and ``sigma_t`` of different shapes.

    Example:
        >>> import torch
        >>> from kdiff import DiscreteSchedule
        >>> from kdiff.losses import snr_gate
        >>> alpha, sigma = DiscreteSchedule.linear(1000).alpha_sigma(torch.tensor([0, 500, 999]))
        >>> snr_gate(alpha, sigma, min_logsnr=-5.0)   # CFD off where logSNR < -5 (here t = 999)
        tensor([1., 1., 0.])
    """
    check_tensor("alpha_t", alpha_t)
    check_tensor("sigma_t", sigma_t)
    check_same_shape("alpha_t", alpha_t, "sigma_t", sigma_t)
    if min_logsnr is None and max_logsnr is None:
        raise ValueError("give min_logsnr, max_logsnr or both; got neither")
    for name, bound in (("min_logsnr", min_logsnr), ("max_logsnr", max_logsnr)):
        if bound is not None:
            check_finite_number(name, bound)
    if min_logsnr is not None and max_logsnr is not None and min_logsnr > max_logsnr:
        raise ValueError(f"min_logsnr must be <= max_logsnr; got {min_logsnr!r} > {max_logsnr!r}")
    dtype = _loss_dtype(alpha_t)
    logsnr = 2.0 * (alpha_t.to(dtype).log() - sigma_t.to(dtype).log())
    keep = torch.ones_like(logsnr, dtype=torch.bool)
    if min_logsnr is not None:
        keep = keep & (logsnr >= min_logsnr)
    if max_logsnr is not None:
        keep = keep & (logsnr <= max_logsnr)
    return keep.to(dtype)


class ClassifierFeatureLoss(nn.Module):
    """``L_feat = KL(softmax(f_T / tau) || softmax(f_S))`` through a frozen classifier (docs/method.md §3).

    ``f_S = f(x_hat_S)`` are the classifier's pooled penultimate features of the student's
    x-prediction (gradients flow through the frozen classifier into the student);
    ``f_T = f(x_tilde)`` of the PD target, computed without gradient.

    Both images go through the classifier's :class:`ClassifierTransform`, whose default bounds
    them to its input range [-1, 1] (``clamp=True``): the x-prediction of an eps-student,
    ``(z_t - sigma_t eps_hat) / alpha_t``, reaches +-100 where ``alpha_t`` is about 0, and an
    unbounded classifier input there collapses CFD. Inside the range values and gradients are the
    unbounded ones; a pixel outside gets no gradient from this loss. ``ClassifierTransform(...,
    clamp=False)`` feeds unbounded images, as the paper did.

    Args:
        classifier: A :class:`FrozenClassifier`, or a module/callable to wrap in one: returning
            ``(logits, features)``, or any ``nn.Module`` with ``feature_layer`` or ``features``.
            The module is left as given (see :class:`FrozenClassifier`): it runs in eval mode
            and no gradient reaches its weights.
        temperature: ``tau``, a finite number > 0, applied to the teacher only (paper: 0.95 for
            ResNet-18, 0.9 for DenseNet-201).
        reduction: "batchmean" (default; sum over D, mean over B), "mean", "sum" or "none".
        transform: The classifier's input transform (default ``ClassifierTransform()``:
            [-1, 1] -> [0, 1], bounded). Must be None with a ``FrozenClassifier``, which has its
            own.
        feature_layer: Layer whose output is ``f(x)``, for classifiers returning logits only.
            Must be None with a ``FrozenClassifier``.
        features: ``"timm"`` (a timm model's pre-logits features) or ``"logits"`` (``f(x)`` is
            the logits); see :class:`FrozenClassifier`. Must be None with a ``FrozenClassifier``.
        impl: How the KL is computed (:func:`kdiff.ops.feature_kl_loss`): ``"auto"`` (default;
            fused Triton kernel on CUDA, the :mod:`kdiff.functional` maths otherwise and with a
            ``weight``), ``"torch"`` or ``"triton"`` (a ``ValueError`` where the kernel cannot
            run, e.g. with a ``weight``, float64 features or CPU tensors without Triton's
            interpreter).

    Raises:
        ValueError: A bad hyper-parameter or ``impl``, or ``transform``/``feature_layer``/
            ``features`` given with a ``FrozenClassifier``; at call time, images of different
            shapes, an empty batch (``B = 0`` has no mean), a ``weight`` that is not [B], or a
            ``weight`` with ``impl="triton"``.

    Example:
        >>> import torch
        >>> from kdiff import ClassifierFeatureLoss, ClassifierTransform
        >>> class Clf(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body, self.head = torch.nn.Conv2d(3, 16, 3), torch.nn.Linear(16, 10)
        ...     def forward(self, x):
        ...         f = self.body(x).relu().mean((2, 3))
        ...         return self.head(f), f
        >>> tf = ClassifierTransform(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
        >>> loss_fn = ClassifierFeatureLoss(Clf(), temperature=0.95, transform=tf)
        >>> x_hat = torch.randn(4, 3, 32, 32, requires_grad=True)
        >>> loss = loss_fn(x_hat, torch.randn(4, 3, 32, 32), weight=torch.tensor([1.0, 1.0, 0.5, 0.0]))
        >>> loss.backward()
        >>> bool((x_hat.grad[3] == 0).all())   # weight 0: no gradient
        True
    """

    def __init__(
        self,
        classifier: nn.Module | Callable[[Tensor], Any],
        *,
        temperature: float = 0.95,
        reduction: str = "batchmean",
        transform: Transform | None = None,
        feature_layer: str | None = None,
        features: str | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        check_choice("reduction", reduction, ("batchmean", "mean", "sum", "none"))
        check_choice("impl", impl, IMPLS)
        self.classifier = _as_frozen(classifier, transform=transform, feature_layer=feature_layer, features=features)
        self.temperature = float(temperature)
        self.reduction = reduction
        self.impl = impl

    def forward_with_outputs(self, input: Tensor, target: Tensor, *, weight: Tensor | None = None) -> FeatureLossOutput:
        """The loss plus the student's logits and both feature sets (one classifier pass each)."""
        check_same_shape("input", input, "target", target)
        if input.ndim == 0 or input.shape[0] < 1:
            raise ValueError(f"input must have at least one row (B >= 1); got shape {tuple(input.shape)}")
        if weight is not None:
            _check_impl_weight(self.impl, weight)
            weight = _check_weight(weight, input)
        with torch.no_grad():
            _, f_t = self.classifier(target.detach())
        logits_s, f_s = self.classifier(input)
        if weight is None:
            loss = ops.feature_kl_loss(f_s, f_t, temperature=self.temperature, reduction=self.reduction, impl=self.impl)  # type: ignore[arg-type]
        else:
            loss = _weighted_kl(f_s, f_t, weight, temperature=self.temperature, reduction=self.reduction)
        return FeatureLossOutput(loss, logits_s, f_s, f_t)

    def forward(self, input: Tensor, target: Tensor, *, weight: Tensor | None = None) -> Tensor:
        """``L_feat`` for student images ``input`` (``x_hat_S``) and target images ``target`` (``x_tilde``).

        Args:
            input: ``x_hat_S``, [B, C, H, W].
            target: ``x_tilde``, [B, C, H, W].
            weight: Optional per-sample weights ``w_i >= 0``, [B]: "batchmean" becomes
                ``(1/B) sum_i w_i KL_i``, "sum" ``sum_i w_i KL_i``, "mean" that over ``B * D``,
                and "none" ``w_i kl_id``.
        """
        return self.forward_with_outputs(input, target, weight=weight).loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}, impl={self.impl!r}"


class DatasetOrientedLoss(nn.Module):
    """``L_data = gamma * H + (1 - gamma) * Dv`` on the student's class logits (docs/method.md §3).

    ``H`` is the mean per-sample entropy of ``p_i = softmax(logits_i)``; ``Dv = sum_k pbar_k log
    pbar_k`` with ``pbar`` the batch mean of ``p_i`` (over all processes with ``sync_global``).
    With per-sample ``weight``: ``H = (1/B) sum_i w_i H_i`` and ``Dv = wbar sum_k pbar_k log
    pbar_k`` with ``pbar = sum_i w_i p_i / sum_i w_i`` and ``wbar`` the mean weight (see
    :mod:`kdiff.losses`).

    Args:
        gamma: Weight of the entropy term, in [0, 1] (paper: 0.75 with ResNet-18).
        sync_global: Average ``pbar`` over the global batch under torch.distributed, keeping the
            gradient (the paper's code used each process's local batch).
        group: Process group for ``sync_global`` (default: the world).
        impl: How the terms are computed (:func:`kdiff.ops.dataset_oriented_loss`): ``"auto"``
            (default; fused Triton kernels on CUDA, the :mod:`kdiff.functional` maths otherwise
            and with a ``weight``), ``"torch"`` or ``"triton"`` (a ``ValueError`` where the
            kernels cannot run, e.g. with a ``weight``).

    Example:
        >>> import torch
        >>> from kdiff import DatasetOrientedLoss
        >>> loss_fn = DatasetOrientedLoss(gamma=0.75)
        >>> logits = torch.randn(16, 10, requires_grad=True)
        >>> loss_fn(logits).backward()
    """

    def __init__(
        self, *, gamma: float = 0.75, sync_global: bool = False, group: Any = None, impl: str = "auto"
    ) -> None:
        super().__init__()
        check_unit_interval("gamma", gamma)
        check_choice("impl", impl, IMPLS)
        self.gamma = float(gamma)
        self.sync_global = sync_global
        self.group = group
        self.impl = impl

    def terms(self, input: Tensor, *, weight: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(L_data, H, Dv)`` for logits ``input`` [B, K] and optional per-sample ``weight`` [B]."""
        if weight is None:
            return ops.dataset_oriented_loss(
                input, gamma=self.gamma, sync_global=self.sync_global, group=self.group, impl=self.impl
            )
        _check_impl_weight(self.impl, weight)
        _check_rows("input", input, "[B, K]")
        weight = _check_weight(weight, input)
        return _weighted_dataset_oriented_loss(
            input, weight, gamma=self.gamma, sync_global=self.sync_global, group=self.group
        )

    def forward(self, input: Tensor, *, weight: Tensor | None = None) -> Tensor:
        """``L_data`` for logits ``input`` [B, K] and optional per-sample ``weight`` [B]."""
        return self.terms(input, weight=weight)[0]

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, sync_global={self.sync_global}, impl={self.impl!r}"


@dataclass
class CFDLossOutput:
    """Terms of the CFD objective, all tensors (read them at a logging interval).

    ``loss = feature_loss + beta * data_loss + pixel_weight * pixel_loss``; with a ``weight``,
    ``feature_loss``, ``data_loss``, ``entropy`` and ``diversity`` are the weighted terms.
    """

    loss: Tensor
    feature_loss: Tensor
    data_loss: Tensor
    entropy: Tensor
    diversity: Tensor
    pixel_loss: Tensor | None


class CFDLoss(nn.Module):
    """The paper's objective ``L = L_feat + beta * L_data`` (+ optional ``w * L_PD``).

    One classifier pass on each of the student's x-prediction and the PD target serves both terms.
    Both images are bounded to the transform's input range first (``ClassifierTransform``'s
    ``clamp=True`` default; see :class:`ClassifierFeatureLoss`), which keeps CFD working with
    eps-prediction teachers and students.

    Args:
        classifier: A :class:`FrozenClassifier` or a module/callable to wrap in one (see
            :class:`ClassifierFeatureLoss`).
        temperature: ``tau`` of the feature loss (finite, > 0).
        beta: Weight of ``L_data``, finite and >= 0 (paper: 0.003 with ResNet-18, 0 with
            DenseNet-201).
        gamma: Entropy weight inside ``L_data``, in [0, 1].
        pixel_weight: Weight of a PD pixel loss passed to :meth:`forward`, finite and >= 0
            (paper: 0).
        sync_global: Global-batch ``pbar`` under torch.distributed.
        group: Process group for ``sync_global``.
        transform: The classifier's input transform (default ``ClassifierTransform()``:
            [-1, 1] -> [0, 1], bounded); must be None with a ``FrozenClassifier``.
        feature_layer: Layer whose output is ``f(x)``; must be None with a ``FrozenClassifier``.
        features: ``"timm"`` or ``"logits"`` (see :class:`FrozenClassifier`); must be None with a
            ``FrozenClassifier``.
        impl: ``"auto"`` (default), ``"torch"`` or ``"triton"``, for both terms (see
            :class:`ClassifierFeatureLoss` and :class:`DatasetOrientedLoss`): ``"auto"`` takes the
            fused kernels on CUDA without a ``weight``, ``"triton"`` refuses a ``weight``.

    Example:
        >>> import torch
        >>> from kdiff import CFDLoss, CosineSchedule, ProgressiveDistiller
        >>> from kdiff.losses import snr_gate
        >>> class Clf(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body, self.head = torch.nn.Conv2d(3, 16, 3), torch.nn.Linear(16, 10)
        ...     def forward(self, x):
        ...         f = self.body(x).relu().mean((2, 3))
        ...         return self.head(f), f
        >>> student = torch.nn.Conv2d(3, 3, 3, padding=1)
        >>> pd = ProgressiveDistiller(lambda z, t: z, lambda z, t: student(z), CosineSchedule(), 4,
        ...                           teacher_prediction="x", student_prediction="x")
        >>> cfd = CFDLoss(Clf(), temperature=0.95, beta=0.003, gamma=0.75)
        >>> out = pd(torch.randn(8, 3, 32, 32))
        >>> terms = cfd(out.x_pred, out.x_target)
        >>> terms.loss.backward()
        >>> gate = snr_gate(out.alpha_t, out.sigma_t, min_logsnr=-5.0)   # no CFD at high noise
        >>> out = pd(torch.randn(8, 3, 32, 32))
        >>> cfd(out.x_pred, out.x_target, weight=gate).loss.backward()
    """

    def __init__(
        self,
        classifier: nn.Module | Callable[[Tensor], Any],
        *,
        temperature: float = 0.95,
        beta: float = 0.003,
        gamma: float = 0.75,
        pixel_weight: float = 0.0,
        sync_global: bool = False,
        group: Any = None,
        transform: Transform | None = None,
        feature_layer: str | None = None,
        features: str | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        check_finite_number("beta", beta, minimum=0.0)
        check_finite_number("pixel_weight", pixel_weight, minimum=0.0)
        check_unit_interval("gamma", gamma)
        check_choice("impl", impl, IMPLS)
        self.feature_loss = ClassifierFeatureLoss(
            classifier, temperature=temperature, transform=transform, feature_layer=feature_layer,
            features=features, impl=impl,
        )
        self.data_loss = DatasetOrientedLoss(gamma=gamma, sync_global=sync_global, group=group, impl=impl)
        self.beta = float(beta)
        self.pixel_weight = float(pixel_weight)
        self.impl = impl

    def forward(
        self,
        input: Tensor,
        target: Tensor,
        *,
        pixel_loss: Tensor | None = None,
        weight: Tensor | None = None,
    ) -> CFDLossOutput:
        """CFD terms for student x-predictions ``input`` and PD targets ``target``.

        Args:
            input: ``x_hat_S``, the student's x-prediction, [B, C, H, W].
            target: ``x_tilde``, the PD target image, [B, C, H, W].
            pixel_loss: Optional PD loss (e.g. ``DistillationOutput.loss``), weighted by
                ``pixel_weight``; required when ``pixel_weight > 0``. ``weight`` does not apply
                to it (weight it yourself, e.g. ``(w * out.loss_per_sample).mean()``).
            weight: Optional per-sample weights ``w_i >= 0``, [B] (e.g. :func:`snr_gate`),
                applied to ``L_feat`` and ``L_data`` as the :mod:`kdiff.losses` docstring gives:
                ``(1/B) sum_i w_i KL_i``, ``H = (1/B) sum_i w_i H_i`` and ``Dv`` on the weighted
                class mix, scaled by the mean weight.
        """
        if self.pixel_weight > 0 and pixel_loss is None:
            raise ValueError("pixel_loss is required when pixel_weight > 0")
        feat = self.feature_loss.forward_with_outputs(input, target, weight=weight)
        data, entropy, diversity = self.data_loss.terms(feat.student_logits, weight=weight)
        loss = feat.loss + self.beta * data
        if pixel_loss is not None and self.pixel_weight > 0:
            loss = loss + self.pixel_weight * pixel_loss
        return CFDLossOutput(loss, feat.loss, data, entropy, diversity, pixel_loss)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, pixel_weight={self.pixel_weight}, impl={self.impl!r}"
