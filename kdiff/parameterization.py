"""Conversions between x-, eps- and v-prediction given ``(z_t, alpha_t, sigma_t)`` (docs/method.md §1).

* x-prediction ``x_hat``:  ``eps_hat = (z_t - alpha_t x_hat) / sigma_t``
* eps-prediction ``eps_hat``: ``x_hat = (z_t - sigma_t eps_hat) / alpha_t``
* v-prediction ``v_hat = alpha_t eps - sigma_t x``: ``x_hat = alpha_t z_t - sigma_t v_hat``,
  ``eps_hat = sigma_t z_t + alpha_t v_hat``

``alpha`` and ``sigma`` are per-sample tensors of shape [B] (or already broadcastable); a
prediction must have the shape of ``z_t`` (a mismatch raises ``ValueError`` instead of broadcasting).
Prediction types accept diffusers' names too ("sample", "epsilon", "v_prediction").
:class:`ReparameterizedModel` wraps a network so that it returns another prediction type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._validation import append_dims, check_model_output, check_same_shape, check_tensor
from .schedules import NoiseSchedule

__all__ = [
    "PredictionType",
    "ReparameterizedModel",
    "normalize_prediction_type",
    "to_x_eps",
    "to_x",
    "to_eps",
    "to_v",
    "convert",
]

PredictionType = Literal["x", "eps", "v"]

_ALIASES = {
    "x": "x",
    "sample": "x",
    "x0": "x",
    "eps": "eps",
    "epsilon": "eps",
    "v": "v",
    "v_prediction": "v",
}


def normalize_prediction_type(prediction_type: str, *, name: str = "prediction_type") -> PredictionType:
    """Map a prediction-type name (ours or diffusers') to ``"x"``, ``"eps"`` or ``"v"``."""
    try:
        return _ALIASES[prediction_type]  # type: ignore[return-value]
    except (KeyError, TypeError):
        raise ValueError(
            f"{name} must be one of 'x', 'eps', 'v' (or 'sample', 'epsilon', 'v_prediction'); "
            f"got {prediction_type!r}"
        ) from None


def _coeffs(z_t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    return append_dims(alpha, z_t.ndim).to(z_t.dtype), append_dims(sigma, z_t.ndim).to(z_t.dtype)


def to_x_eps(
    prediction: Tensor, z_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str
) -> tuple[Tensor, Tensor]:
    """``(x_hat, eps_hat)`` from a network output of the given type.

    Args:
        prediction: Network output, shaped like ``z_t``.
        z_t: Noisy input ``alpha_t x + sigma_t eps``.
        alpha: ``alpha_t`` per sample, shape [B].
        sigma: ``sigma_t`` per sample, shape [B].
        prediction_type: "x", "eps" or "v".

    Example:
        >>> import torch
        >>> from kdiff.parameterization import to_x_eps
        >>> z, a, s = torch.randn(2, 3), torch.tensor([0.6, 0.8]), torch.tensor([0.8, 0.6])
        >>> x, eps = to_x_eps(torch.zeros(2, 3), z, a, s, "v")
        >>> torch.allclose(a[:, None] * x + s[:, None] * eps, z)
        True
    """
    kind = normalize_prediction_type(prediction_type)
    check_same_shape("prediction", prediction, "z_t", z_t)
    a, s = _coeffs(z_t, alpha, sigma)
    prediction = prediction.to(z_t.dtype)
    if kind == "x":
        return prediction, (z_t - a * prediction) / s
    if kind == "eps":
        return (z_t - s * prediction) / a, prediction
    return a * z_t - s * prediction, s * z_t + a * prediction


def to_x(prediction: Tensor, z_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """``x_hat`` from a network output (no division when it is already an x-prediction)."""
    kind = normalize_prediction_type(prediction_type)
    check_same_shape("prediction", prediction, "z_t", z_t)
    a, s = _coeffs(z_t, alpha, sigma)
    prediction = prediction.to(z_t.dtype)
    if kind == "x":
        return prediction
    if kind == "eps":
        return (z_t - s * prediction) / a
    return a * z_t - s * prediction


def to_eps(prediction: Tensor, z_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """``eps_hat`` from a network output."""
    return to_x_eps(prediction, z_t, alpha, sigma, prediction_type)[1]


def to_v(prediction: Tensor, z_t: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """``v_hat = alpha_t eps_hat - sigma_t x_hat`` from a network output."""
    if normalize_prediction_type(prediction_type) == "v":
        check_same_shape("prediction", prediction, "z_t", z_t)
        return prediction.to(z_t.dtype)
    x, eps = to_x_eps(prediction, z_t, alpha, sigma, prediction_type)
    a, s = _coeffs(z_t, alpha, sigma)
    return a * eps - s * x


def convert(
    prediction: Tensor,
    z_t: Tensor,
    alpha: Tensor,
    sigma: Tensor,
    *,
    source: str,
    target: str,
) -> Tensor:
    """Convert a network output from prediction type ``source`` to ``target``."""
    kind = normalize_prediction_type(target, name="target")
    if kind == "x":
        return to_x(prediction, z_t, alpha, sigma, source)
    if kind == "eps":
        return to_eps(prediction, z_t, alpha, sigma, source)
    return to_v(prediction, z_t, alpha, sigma, source)


class ReparameterizedModel(nn.Module):
    """A network whose raw output is a ``source`` prediction, returning the ``target`` prediction.

    ``forward(z_t, t) = convert(model(z_t, t), z_t, alpha_t, sigma_t, source=source, target=target)``
    with ``(alpha_t, sigma_t)`` of ``schedule`` at ``t``. The wrapped network is registered as a
    submodule (when it is an ``nn.Module``), so the wrapper trains, copies and moves like it; its
    own weights are ``wrapper.model.state_dict()``.

    Use it to start a student of one type from a teacher of another, e.g. a v-student from an
    eps teacher's weights: at initialisation the wrapper's ``x_hat`` equals the unwrapped
    network's (to rounding), so the student starts as the teacher.

    What it changes, and what it does not:

    * The declared type, hence what the distiller's and sampler's ``prediction_type`` must be,
      and which weighting ``weighting="auto"`` picks (``"truncated_snr"`` for a v-student).
    * NOT the function class or the error amplification. For an eps network the raw output is
      still ``eps_hat``; from ``v = alpha_t eps - sigma_t x`` and ``x = (z_t - sigma_t eps) / alpha_t``,
      ``v_hat = (eps_hat - sigma_t z_t) / alpha_t`` and ``x_hat = (z_t - sigma_t eps_hat) / alpha_t``,
      so an error in the network's eps is multiplied by ``1/alpha_t`` in v and by
      ``sigma_t/alpha_t`` in x. Every PD loss depends on ``x_hat`` only, so under one weighting the
      wrapped and the unwrapped network get the same loss and the same gradients.

    Safe where ``alpha_t`` stays away from 0 on the student's grid (``alpha_{t_max}`` of order 0.1
    or more, i.e. ``logSNR(t_max) >= -4.6``). With ``alpha_{t_max}`` about 0 (DDPM linear betas:
    ``alpha_1000 = 6.4e-3``, ``1/SNR = 2.5e4``; the PD cosine schedule clipped at logSNR -20) the v
    loss weighs the eps error at ``t_max`` by about ``1/SNR``: distil an eps-student with
    ``weighting="eps_mse"`` instead (the ``"auto"`` choice for eps), or give the student a v output
    head trained from the start.

    Args:
        model: ``model(z_t, t, **kwargs)`` returning a ``source`` prediction shaped like ``z_t``.
        schedule: The schedule of the times ``t`` the model is called with.
        source: The model's own prediction type: "x", "eps" or "v" (or diffusers' names).
        target: The prediction type this wrapper returns.

    Example:
        >>> import torch
        >>> from kdiff import DiscreteSchedule
        >>> from kdiff.parameterization import ReparameterizedModel, to_x
        >>> schedule = DiscreteSchedule.linear(1000)
        >>> eps_teacher = torch.nn.Conv2d(3, 3, 1)
        >>> teacher = lambda z, t: eps_teacher(z)
        >>> student = ReparameterizedModel(lambda z, t: eps_teacher(z), schedule, source="eps", target="v")
        >>> z, t = torch.randn(2, 3, 4, 4), torch.tensor([250.0, 750.0])
        >>> a, s = schedule.alpha_sigma(t)
        >>> torch.allclose(to_x(student(z, t), z, a, s, "v"), to_x(teacher(z, t), z, a, s, "eps"), atol=1e-4)
        True
    """

    def __init__(self, model: Callable[..., Tensor], schedule: NoiseSchedule, *, source: str, target: str) -> None:
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable; got {type(model).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a kdiff NoiseSchedule; got {type(schedule).__name__}")
        self.model = model
        self.schedule = schedule
        self.source: PredictionType = normalize_prediction_type(source, name="source")
        self.target: PredictionType = normalize_prediction_type(target, name="target")

    def forward(self, z_t: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        """The ``target`` prediction at ``(z_t, t)``, in ``z_t``'s dtype (float32 at least)."""
        check_tensor("z_t", z_t)
        out = check_model_output("model output", self.model(z_t, t, **kwargs), z_t.shape)
        # Convert in float32 at least: a bf16 output divided by a small alpha_t loses the image.
        dtype = torch.float64 if z_t.dtype == torch.float64 else torch.float32
        alpha, sigma = self.schedule.alpha_sigma(t, dtype=dtype)
        return convert(out.to(dtype), z_t.to(dtype), alpha, sigma, source=self.source, target=self.target)

    def extra_repr(self) -> str:
        return f"source={self.source!r}, target={self.target!r}, schedule={self.schedule!r}"
