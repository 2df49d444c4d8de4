"""CFD loss modules: :class:`ClassifierFeatureLoss`, :class:`DatasetOrientedLoss`, :class:`CFDLoss`.

The maths lives in :mod:`kdiff.functional`; these modules hold the hyper-parameters (the paper's
defaults) and the frozen classifier. Every returned term is a tensor (no ``.item()``), so logging
them costs no host sync until the caller reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._validation import (
    check_choice,
    check_finite_number,
    check_positive,
    check_same_shape,
    check_unit_interval,
)
from .classifier import ClassifierTransform, FrozenClassifier
from .functional import dataset_oriented_loss, feature_kl_loss

__all__ = ["ClassifierFeatureLoss", "DatasetOrientedLoss", "CFDLoss", "CFDLossOutput", "FeatureLossOutput"]

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
) -> FrozenClassifier:
    # A FrozenClassifier already owns its transform and feature layer: a second value would either
    # be ignored or contradict it, so it is refused.
    if isinstance(classifier, FrozenClassifier):
        given = [n for n, v in (("transform", transform), ("feature_layer", feature_layer)) if v is not None]
        if given:
            raise ValueError(
                f"{' and '.join(given)} must be None when classifier is a FrozenClassifier (it has "
                f"transform={classifier.transform!r}, feature_layer={classifier.feature_layer!r}); "
                "pass them to FrozenClassifier instead"
            )
        return classifier
    return FrozenClassifier(classifier, feature_layer=feature_layer, transform=transform)


class ClassifierFeatureLoss(nn.Module):
    """``L_feat = KL(softmax(f_T / tau) || softmax(f_S))`` through a frozen classifier (docs/method.md §3).

    ``f_S = f(x_hat_S)`` are the classifier's pooled penultimate features of the student's
    x-prediction (gradients flow through the frozen classifier into the student);
    ``f_T = f(x_tilde)`` of the PD target, computed without gradient.

    Args:
        classifier: A :class:`FrozenClassifier`, or a module/callable to wrap in one: returning
            ``(logits, features)``, or any ``nn.Module`` with ``feature_layer``. A module is frozen
            and put in eval mode (see :class:`FrozenClassifier`).
        temperature: ``tau``, a finite number > 0, applied to the teacher only (paper: 0.95 for
            ResNet-18, 0.9 for DenseNet-201).
        reduction: "batchmean" (default; sum over D, mean over B), "mean", "sum" or "none".
        transform: The classifier's input transform (default ``ClassifierTransform()``:
            [-1, 1] -> [0, 1]; the paper's raw [-1, 1] input is
            ``ClassifierTransform(output_range=(-1, 1))``). Must be None with a
            ``FrozenClassifier``, which has its own.
        feature_layer: Layer whose output is ``f(x)``, for classifiers returning logits only.
            Must be None with a ``FrozenClassifier``.

    Raises:
        ValueError: A bad hyper-parameter, or ``transform``/``feature_layer`` given with a
            ``FrozenClassifier``; at call time, images of different shapes or an empty batch
            (``B = 0`` has no mean).

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
        >>> loss = loss_fn(x_hat, torch.randn(4, 3, 32, 32))
        >>> loss.backward()
    """

    def __init__(
        self,
        classifier: nn.Module | Callable[[Tensor], Any],
        *,
        temperature: float = 0.95,
        reduction: str = "batchmean",
        transform: Transform | None = None,
        feature_layer: str | None = None,
    ) -> None:
        super().__init__()
        check_positive("temperature", temperature)
        check_choice("reduction", reduction, ("batchmean", "mean", "sum", "none"))
        self.classifier = _as_frozen(classifier, transform=transform, feature_layer=feature_layer)
        self.temperature = float(temperature)
        self.reduction = reduction

    def forward_with_outputs(self, input: Tensor, target: Tensor) -> FeatureLossOutput:
        """The loss plus the student's logits and both feature sets (one classifier pass each)."""
        check_same_shape("input", input, "target", target)
        if input.ndim == 0 or input.shape[0] < 1:
            raise ValueError(f"input must have at least one row (B >= 1); got shape {tuple(input.shape)}")
        with torch.no_grad():
            _, f_t = self.classifier(target.detach())
        logits_s, f_s = self.classifier(input)
        loss = feature_kl_loss(f_s, f_t, temperature=self.temperature, reduction=self.reduction)  # type: ignore[arg-type]
        return FeatureLossOutput(loss, logits_s, f_s, f_t)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        """``L_feat`` for student images ``input`` (``x_hat_S``) and target images ``target`` (``x_tilde``)."""
        return self.forward_with_outputs(input, target).loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, reduction={self.reduction!r}"


class DatasetOrientedLoss(nn.Module):
    """``L_data = gamma * H + (1 - gamma) * Dv`` on the student's class logits (docs/method.md §3).

    ``H`` is the mean per-sample entropy of ``p_i = softmax(logits_i)``; ``Dv = sum_k pbar_k log
    pbar_k`` with ``pbar`` the batch mean of ``p_i`` (over all processes with ``sync_global``).

    Args:
        gamma: Weight of the entropy term, in [0, 1] (paper: 0.75 with ResNet-18).
        sync_global: Average ``pbar`` over the global batch under torch.distributed, keeping the
            gradient (the paper's code used each process's local batch).
        group: Process group for ``sync_global`` (default: the world).

    Example:
        >>> import torch
        >>> from kdiff import DatasetOrientedLoss
        >>> loss_fn = DatasetOrientedLoss(gamma=0.75)
        >>> logits = torch.randn(16, 10, requires_grad=True)
        >>> loss_fn(logits).backward()
    """

    def __init__(self, *, gamma: float = 0.75, sync_global: bool = False, group: Any = None) -> None:
        super().__init__()
        check_unit_interval("gamma", gamma)
        self.gamma = float(gamma)
        self.sync_global = sync_global
        self.group = group

    def terms(self, input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(L_data, H, Dv)`` for logits ``input`` [B, K]."""
        return dataset_oriented_loss(input, gamma=self.gamma, sync_global=self.sync_global, group=self.group)

    def forward(self, input: Tensor) -> Tensor:
        """``L_data`` for logits ``input`` [B, K]."""
        return self.terms(input)[0]

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, sync_global={self.sync_global}"


@dataclass
class CFDLossOutput:
    """Terms of the CFD objective, all tensors (read them at a logging interval).

    ``loss = feature_loss + beta * data_loss + pixel_weight * pixel_loss``.
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
            [-1, 1] -> [0, 1]); must be None with a ``FrozenClassifier``.
        feature_layer: Layer whose output is ``f(x)``; must be None with a ``FrozenClassifier``.

    Example:
        >>> import torch
        >>> from kdiff import CFDLoss, CosineSchedule, ProgressiveDistiller
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
    ) -> None:
        super().__init__()
        check_finite_number("beta", beta, minimum=0.0)
        check_finite_number("pixel_weight", pixel_weight, minimum=0.0)
        check_unit_interval("gamma", gamma)
        self.feature_loss = ClassifierFeatureLoss(
            classifier, temperature=temperature, transform=transform, feature_layer=feature_layer
        )
        self.data_loss = DatasetOrientedLoss(gamma=gamma, sync_global=sync_global, group=group)
        self.beta = float(beta)
        self.pixel_weight = float(pixel_weight)

    def forward(self, input: Tensor, target: Tensor, *, pixel_loss: Tensor | None = None) -> CFDLossOutput:
        """CFD terms for student x-predictions ``input`` and PD targets ``target``.

        Args:
            input: ``x_hat_S``, the student's x-prediction (unclipped), [B, C, H, W].
            target: ``x_tilde``, the PD target image (unclipped), [B, C, H, W].
            pixel_loss: Optional PD loss (e.g. ``DistillationOutput.loss``), weighted by
                ``pixel_weight``; required when ``pixel_weight > 0``.
        """
        if self.pixel_weight > 0 and pixel_loss is None:
            raise ValueError("pixel_loss is required when pixel_weight > 0")
        feat = self.feature_loss.forward_with_outputs(input, target)
        data, entropy, diversity = self.data_loss.terms(feat.student_logits)
        loss = feat.loss + self.beta * data
        if pixel_loss is not None and self.pixel_weight > 0:
            loss = loss + self.pixel_weight * pixel_loss
        return CFDLossOutput(loss, feat.loss, data, entropy, diversity, pixel_loss)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, pixel_weight={self.pixel_weight}"
