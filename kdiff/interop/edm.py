"""Variance-exploding denoisers (EDM ``D(x; sigma)``, k-diffusion ``model(x, sigma)``) as kdiff models.

A VE sample ``x + sigma_ve n`` and kdiff's VP sample ``z_t = alpha_t x + sigma_t n`` are the same
point up to scale: with ``sigma_ve = sigma_t / alpha_t``, ``z_t = alpha_t (x + sigma_ve n)``. So the
denoiser sees ``z_t / alpha_t`` and its output is an x-prediction on the VP scale. On a
:class:`kdiff.LogSNRSchedule` built from the same ``sigma_ve(t)``, a deterministic DDIM step is
EDM's Euler step in ``sigma_ve``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from .._validation import append_dims, check_tensor
from ..schedules import NoiseSchedule

__all__ = ["VEDenoiser", "from_ve_denoiser"]


class VEDenoiser(nn.Module):
    """An x-predictor ``model(z_t, t)`` on a VP schedule from a VE denoiser ``D(x; sigma_ve)``.

    ``forward(z_t, t) = D(z_t / alpha_t, sigma_t / alpha_t, **kwargs)``. A denoiser that is an
    ``nn.Module`` is registered as a submodule, so the wrapper trains and copies like it.

    Args:
        denoiser: ``denoiser(x, sigma, **kwargs)`` with ``x`` [B, ...] and ``sigma`` [B], returning
            the denoised image (EDM's preconditioned ``D``, k-diffusion's denoiser wrappers).
        schedule: The kdiff schedule of ``t`` (usually :meth:`kdiff.LogSNRSchedule.karras` or
            :meth:`kdiff.LogSNRSchedule.from_sigma` with the denoiser's own sigma range).

    Example:
        >>> import torch
        >>> from kdiff import LogSNRSchedule, ddim_sample
        >>> from kdiff.interop import from_ve_denoiser
        >>> D = lambda x, sigma: x / (1 + sigma[:, None, None, None] ** 2)  # optimal D for x ~ N(0, I)
        >>> schedule = LogSNRSchedule.karras(sigma_min=0.002, sigma_max=80.0)
        >>> model = from_ve_denoiser(D, schedule)
        >>> x = ddim_sample(model, torch.randn(2, 3, 4, 4), 8, schedule=schedule, prediction_type="x",
        ...                 clip_x=False)
        >>> x.shape
        torch.Size([2, 3, 4, 4])
    """

    def __init__(self, denoiser: Callable[..., Tensor], schedule: NoiseSchedule) -> None:
        super().__init__()
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable; got {type(denoiser).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a kdiff NoiseSchedule; got {type(schedule).__name__}")
        self.denoiser = denoiser
        self.schedule = schedule

    def forward(self, z_t: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        """``D(z_t / alpha_t; sigma_t / alpha_t)``: the x-prediction at kdiff time ``t``."""
        check_tensor("z_t", z_t)
        alpha, sigma = self.schedule.alpha_sigma(t, dtype=z_t.dtype)
        return self.denoiser(z_t / append_dims(alpha, z_t.ndim), sigma / alpha, **kwargs)


def from_ve_denoiser(denoiser: Callable[..., Tensor], schedule: NoiseSchedule) -> VEDenoiser:
    """Wrap a VE denoiser ``D(x; sigma)`` as a kdiff x-predictor on ``schedule`` (see :class:`VEDenoiser`)."""
    return VEDenoiser(denoiser, schedule)
