"""Deterministic (and optionally stochastic) DDIM with a time per sample.

:func:`ddim_step` / :class:`DDIMStep` take one step ``t -> s`` given a network output;
:func:`ddim_sample` runs a whole ``N``-step sampler with any ``model(z_t, t, **kwargs)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._validation import check_batch, check_finite, check_same_shape, check_tensor
from .functional import ddim_noise_scale, ddim_update
from .parameterization import normalize_prediction_type, to_x_eps
from .schedules import NoiseSchedule

__all__ = ["DDIMStepOutput", "ddim_step", "DDIMStep", "ddim_sample"]


@dataclass
class DDIMStepOutput:
    """Result of one DDIM step.

    Attributes:
        prev_sample: ``z_s``, the sample at the earlier time s.
        pred_x: ``x_hat`` used for the step (after clipping, if enabled).
        pred_eps: ``eps_hat`` used for the step (recomputed from the clipped ``x_hat``).
    """

    prev_sample: Tensor
    pred_x: Tensor
    pred_eps: Tensor


def _check_step_inputs(model_output: Tensor, z_t: Tensor, t: Tensor, s: Tensor) -> None:
    check_tensor("model_output", model_output)
    check_tensor("z_t", z_t)
    check_tensor("t", t)
    check_tensor("s", s)
    check_same_shape("model_output", model_output, "z_t", z_t)
    if z_t.ndim < 2:
        raise ValueError(f"z_t must have a batch dimension and at least one more; got {tuple(z_t.shape)}")
    check_batch("t", t, z_t.shape[0])
    check_batch("s", s, z_t.shape[0])


def ddim_step(
    model_output: Tensor,
    z_t: Tensor,
    t: Tensor,
    s: Tensor,
    *,
    schedule: NoiseSchedule,
    prediction_type: str = "x",
    clip_x: bool = False,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
) -> DDIMStepOutput:
    """One DDIM step from time ``t`` to ``s`` (per sample): ``z_s = alpha_s x_hat + sigma_s eps_hat``.

    Args:
        model_output: The network's output at ``(z_t, t)``, shaped like ``z_t``.
        z_t: Current sample, [B, ...].
        t: Current time per sample, [B].
        s: Target time per sample, [B] (usually ``s < t``).
        schedule: The noise schedule the times refer to.
        prediction_type: What ``model_output`` is: "x", "eps" or "v".
        clip_x: Clip ``x_hat`` to [-1, 1] and recompute ``eps_hat`` from it.
        eta: DDIM stochasticity (0: deterministic, 1: ancestral). Needs ``sigma_t > 0``.
        generator: Random generator for the noise when ``eta > 0``.
        noise: Explicit standard normal noise for ``eta > 0`` (overrides ``generator``).

    Returns:
        :class:`DDIMStepOutput` with ``prev_sample`` (``z_s``) and the predictions used.

    Example:
        >>> import torch
        >>> from kdiff import CosineSchedule, ddim_step
        >>> sched = CosineSchedule()
        >>> z, x = torch.randn(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)
        >>> out = ddim_step(x, z, torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.25]), schedule=sched)
        >>> out.prev_sample.shape
        torch.Size([2, 3, 8, 8])
    """
    _check_step_inputs(model_output, z_t, t, s)
    kind = normalize_prediction_type(prediction_type)
    if not isinstance(eta, (int, float)) or eta < 0:
        raise ValueError(f"eta must be a number >= 0; got {eta!r}")
    dtype = z_t.dtype
    alpha_t, sigma_t = schedule.alpha_sigma(t, dtype=dtype, name="t")
    alpha_s, sigma_s = schedule.alpha_sigma(s, dtype=dtype, name="s")
    x_hat, eps_hat = to_x_eps(model_output, z_t, alpha_t, sigma_t, kind)
    if clip_x:
        x_hat = x_hat.clamp(-1.0, 1.0)
        eps_hat = to_x_eps(x_hat, z_t, alpha_t, sigma_t, "x")[1]
    if eta == 0:
        z_s = ddim_update(x_hat, eps_hat, alpha_s, sigma_s)
    else:
        if noise is None:
            noise = torch.randn(z_t.shape, generator=generator, device=z_t.device, dtype=dtype)
        check_same_shape("noise", noise, "z_t", z_t)
        scale = ddim_noise_scale(alpha_t, sigma_t, alpha_s, sigma_s, eta)
        z_s = ddim_update(x_hat, eps_hat, alpha_s, sigma_s, noise_scale=scale, noise=noise)
    return DDIMStepOutput(prev_sample=z_s, pred_x=x_hat, pred_eps=eps_hat)


class DDIMStep(nn.Module):
    """Module form of :func:`ddim_step`, holding the schedule and the sampler options.

    Args:
        schedule: The noise schedule.
        prediction_type: "x", "eps" or "v" (diffusers' names also accepted).
        clip_x: Clip ``x_hat`` to [-1, 1] before stepping.
        eta: DDIM stochasticity (default 0: deterministic).

    Example:
        >>> import torch
        >>> from kdiff import DDIMStep, DiscreteSchedule
        >>> step = DDIMStep(DiscreteSchedule.cosine(1024), prediction_type="eps")
        >>> z = torch.randn(4, 3, 32, 32)
        >>> t, s = torch.full((4,), 1024), torch.full((4,), 512)
        >>> out = step(torch.randn_like(z), z, t, s)
        >>> out.prev_sample.shape
        torch.Size([4, 3, 32, 32])
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        *,
        prediction_type: str = "x",
        clip_x: bool = False,
        eta: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a kdiff NoiseSchedule; got {type(schedule).__name__}")
        if not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"eta must be a number >= 0; got {eta!r}")
        self.schedule = schedule
        self.prediction_type = normalize_prediction_type(prediction_type)
        self.clip_x = clip_x
        self.eta = float(eta)

    def forward(
        self,
        model_output: Tensor,
        z_t: Tensor,
        t: Tensor,
        s: Tensor,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> DDIMStepOutput:
        """One step ``t -> s``; see :func:`ddim_step`."""
        return ddim_step(
            model_output,
            z_t,
            t,
            s,
            schedule=self.schedule,
            prediction_type=self.prediction_type,
            clip_x=self.clip_x,
            eta=self.eta,
            generator=generator,
            noise=noise,
        )

    def extra_repr(self) -> str:
        return f"{self.schedule!r}, prediction_type={self.prediction_type!r}, clip_x={self.clip_x}, eta={self.eta}"


@torch.no_grad()
def ddim_sample(
    model: Callable[..., Tensor],
    noise: Tensor,
    num_steps: int,
    *,
    schedule: NoiseSchedule,
    prediction_type: str = "x",
    clip_x: bool = True,
    clip_output: bool | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    model_kwargs: dict[str, Any] | None = None,
    callback: Callable[[int, Tensor, DDIMStepOutput], None] | None = None,
) -> Tensor:
    """Sample with ``num_steps`` DDIM steps on the grid ``t_N -> ... -> t_0`` of ``schedule``.

    Args:
        model: Any callable ``model(z_t, t, **model_kwargs)`` returning a prediction of
            ``prediction_type``; ``t`` is a float tensor [B] of the schedule's times.
        noise: Starting noise ``z_{t_N}``, [B, ...] (scaled by ``sigma_{t_N}`` is not needed for
            variance-preserving schedules where ``sigma_{t_N} ~ 1``; it is used as given).
        num_steps: ``N``, the number of network evaluations.
        schedule: The noise schedule (discrete: ``N`` must divide ``T``).
        prediction_type: "x", "eps" or "v".
        clip_x: Clip ``x_hat`` to [-1, 1] at each step (the paper's evaluation protocol).
        clip_output: Clip the final sample to [-1, 1] (default: same as ``clip_x``).
        eta: DDIM stochasticity; needs ``generator`` for reproducibility.
        generator: Random generator for ``eta > 0``.
        model_kwargs: Extra keyword arguments for ``model`` (e.g. ``{"y": labels}``).
        callback: Called as ``callback(k, t, step_output)`` after each step (k counts down).

    Returns:
        The final sample at ``t_0`` (for a discrete schedule index 0, which is not noise-free).

    Example:
        >>> import torch
        >>> from kdiff import CosineSchedule, ddim_sample
        >>> model = lambda z, t: torch.zeros_like(z)   # predicts x = 0
        >>> out = ddim_sample(model, torch.randn(2, 3, 8, 8), 4, schedule=CosineSchedule(logsnr_min=None, logsnr_max=None))
        >>> float(out.abs().max())
        0.0
    """
    check_tensor("noise", noise)
    if noise.ndim < 2:
        raise ValueError(f"noise must have shape [B, ...]; got {tuple(noise.shape)}")
    check_finite("noise", noise)
    schedule.check_num_steps(num_steps)
    kind = normalize_prediction_type(prediction_type)
    step = DDIMStep(schedule, prediction_type=kind, clip_x=clip_x, eta=eta)
    kwargs = model_kwargs or {}
    grid = schedule.grid(num_steps, device=noise.device).to(noise.dtype if noise.dtype == torch.float64 else torch.float32)
    batch = noise.shape[0]
    z = noise
    for k in range(num_steps, 0, -1):
        t = grid[k].expand(batch)
        s = grid[k - 1].expand(batch)
        out = step(model(z, t, **kwargs), z, t, s, generator=generator)
        z = out.prev_sample
        if callback is not None:
            callback(k, t, out)
    if clip_x if clip_output is None else clip_output:
        z = z.clamp(-1.0, 1.0)
    return z
