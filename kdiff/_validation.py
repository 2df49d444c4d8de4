"""Argument checks shared by the public API.

Shape and type checks are free and always run. Checks that look at tensor *values* (times inside
the schedule, finiteness) need the host to read device memory, which stalls an accelerator; they run
on CPU tensors always, and on other devices only after ``kdiff.set_value_checks(True)``. They never
run while ``torch.compile`` traces.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

_VALUE_CHECKS_ON_ACCELERATORS = False


def set_value_checks(enabled: bool) -> None:
    """Turn value checks on accelerator tensors on or off (they cost a host sync each).

    Args:
        enabled: When True, value checks (times in range, finite inputs) also run for CUDA and
            other non-CPU tensors. CPU tensors are always checked.

    Example:
        >>> import kdiff
        >>> kdiff.set_value_checks(True)   # debug a GPU run
        >>> kdiff.set_value_checks(False)
    """
    global _VALUE_CHECKS_ON_ACCELERATORS
    _VALUE_CHECKS_ON_ACCELERATORS = bool(enabled)


def value_checks_enabled(tensor: Tensor) -> bool:
    """Whether a data-dependent check on ``tensor`` should run now."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" or _VALUE_CHECKS_ON_ACCELERATORS


def check_choice(name: str, value: object, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(value).__name__}")
    return value


def check_batch(name: str, value: Tensor, batch_size: int) -> None:
    """``value`` must have shape [batch_size]."""
    if value.ndim != 1 or value.shape[0] != batch_size:
        raise ValueError(
            f"{name} must have shape [{batch_size}] (one value per sample); got {tuple(value.shape)}"
        )


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_finite(name: str, value: Tensor) -> None:
    if value_checks_enabled(value) and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not value > 0 or value != value:
        raise ValueError(f"{name} must be a number > 0; got {value!r}")


def check_unit_interval(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]; got {value!r}")


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-sample [B] tensor broadcasts against [B, ...]."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a tensor of {x.ndim} dims to {ndim} dims")
    return x.reshape(x.shape + (1,) * missing)
