"""Conversions between x-, eps- and v-prediction given ``(z_t, alpha_t, sigma_t)`` (docs/method.md §1).

* x-prediction ``x_hat``:  ``eps_hat = (z_t - alpha_t x_hat) / sigma_t``
* eps-prediction ``eps_hat``: ``x_hat = (z_t - sigma_t eps_hat) / alpha_t``
* v-prediction ``v_hat = alpha_t eps - sigma_t x``: ``x_hat = alpha_t z_t - sigma_t v_hat``,
  ``eps_hat = sigma_t z_t + alpha_t v_hat``

``alpha`` and ``sigma`` are per-sample tensors of shape [B] (or already broadcastable); a
prediction must have the shape of ``z_t`` (a mismatch raises ``ValueError`` instead of broadcasting).
Prediction types accept diffusers' names too ("sample", "epsilon", "v_prediction").
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from ._validation import append_dims, check_same_shape

__all__ = ["PredictionType", "normalize_prediction_type", "to_x_eps", "to_x", "to_eps", "to_v", "convert"]

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
