"""Argument checks shared by the public API.

Shape and type checks are free and always run. Checks that look at tensor *values* (times inside
the schedule, finiteness) need the host to read device memory, which stalls an accelerator; they run
on CPU tensors always, and on other devices only after ``kdiff.set_value_checks(True)``. They never
run while ``torch.compile`` traces.
"""

from __future__ import annotations

import math
import numbers
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
    if value_checks_enabled(value) and not _all_finite(value):
        raise ValueError(f"{name} contains NaN or infinite values")


def _all_finite(value: Tensor) -> bool:
    # One min/max pass: a NaN propagates to both and an inf reaches one of them. On CPU this is
    # about 10x faster than torch.isfinite(value).all(), which builds a mask through several ops.
    if value.is_floating_point() and value.numel() > 0:
        lo, hi = torch.aminmax(value)
        return bool(torch.isfinite(lo) & torch.isfinite(hi))
    return bool(torch.isfinite(value).all())


def _is_finite_real(value: object) -> bool:
    # bool is an int subclass, but True as a temperature is a bug, not 1.0.
    return (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(float(value))
    )


def check_positive(name: str, value: float) -> None:
    """``value`` must be a finite real number > 0 (NaN, infinities and bools are refused)."""
    if not _is_finite_real(value) or not value > 0:  # type: ignore[operator]
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")


def check_unit_interval(name: str, value: float) -> None:
    """``value`` must be a real number in [0, 1] (NaN and bools are refused)."""
    if not _is_finite_real(value) or not 0.0 <= value <= 1.0:  # type: ignore[operator]
        raise ValueError(f"{name} must be in [0, 1]; got {value!r}")


def append_dims(x: Tensor, ndim: int) -> Tensor:
    """Append trailing singleton dims so a per-sample [B] tensor broadcasts against [B, ...]."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a tensor of {x.ndim} dims to {ndim} dims")
    return x.reshape(x.shape + (1,) * missing)


def check_bool(name: str, value: object) -> None:
    """``value`` must be a Python bool (a truthy string or tensor is refused, not coerced)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}")


def check_finite_number(name: str, value: object, *, minimum: float | None = None) -> None:
    """``value`` must be a finite real number (not a bool), at least ``minimum`` when given."""
    bound = "" if minimum is None else f" >= {minimum:g}"
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or (minimum is not None and value < minimum)
    ):
        raise ValueError(f"{name} must be a finite number{bound}; got {value!r}")


def check_per_sample(name: str, value: object, like: Tensor, *, max_ndim: int | None = None) -> Tensor:
    """``value`` must be a per-sample coefficient for the batch of ``like``: a 0-d tensor, or shape
    [B] (with at most ``max_ndim`` dims, trailing ones of size 1, e.g. [B, 1, 1, 1]).

    A [1] tensor against B > 1, or [B, C, ...], would otherwise broadcast silently.
    """
    value = check_tensor(name, value)
    max_ndim = like.ndim if max_ndim is None else max_ndim
    if value.ndim == 0:
        return value
    batch = like.shape[0] if like.ndim else None
    if value.ndim > max_ndim or value.shape[0] != batch or any(d != 1 for d in value.shape[1:]):
        allowed = f"[{batch}]" if max_ndim <= 1 else f"[{batch}] (or [{batch}, 1, ...])"
        raise ValueError(
            f"{name} must have shape {allowed}, one value per sample, or be a 0-d tensor; "
            f"got {tuple(value.shape)}"
        )
    return value


def check_model_output(name: str, output: object, expected: torch.Size) -> Tensor:
    """A network's output must be a tensor shaped like its input ``z_t``.

    A learned-variance network (2C channels: the mean prediction, then the variance) gets a hint
    to pass its first C channels.
    """
    if not isinstance(output, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(output).__name__}")
    if output.shape != expected:
        hint = ""
        shape, want = tuple(output.shape), tuple(expected)
        if len(shape) == len(want) >= 2 and shape[1] == 2 * want[1] and shape[2:] == want[2:] and shape[0] == want[0]:
            hint = (
                f"; it has 2 * {want[1]} channels, as a learned-variance network does: "
                f"wrap the model to return its first {want[1]} channels (output[:, :{want[1]}])"
            )
        raise ValueError(f"{name} must have the shape of z_t {want}; got {shape}{hint}")
    return output
