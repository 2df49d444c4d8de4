"""Deterministic (and optionally stochastic) DDIM with a time per sample.

:func:`ddim_step` / :class:`DDIMStep` take one step ``t -> s`` given a network output;
:func:`ddim_sample` runs a whole ``N``-step sampler with any ``model(z_t, t, **kwargs)``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._validation import (
    check_batch,
    check_bool,
    check_finite,
    check_finite_number,
    check_model_output,
    check_same_shape,
    check_tensor,
)
from .functional import ddim_noise_scale, ddim_step_coeffs
from .parameterization import normalize_prediction_type
from .schedules import DiscreteSchedule, NoiseSchedule

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


def _alpha_sigma_pair(schedule: NoiseSchedule, t: Tensor, s: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """``(alpha_t, sigma_t, alpha_s, sigma_s)`` from one lookup (and one value check) of ``t`` and ``s``."""
    if t.shape == s.shape and t.dtype == s.dtype and t.device == s.device:
        try:
            alpha, sigma = schedule.alpha_sigma(torch.cat((t, s)), dtype=dtype)
        except ValueError:
            pass  # the separate lookups below name the argument at fault
        else:
            n = t.shape[0]
            return alpha[:n], sigma[:n], alpha[n:], sigma[n:]
    alpha_t, sigma_t = schedule.alpha_sigma(t, dtype=dtype, name="t")
    alpha_s, sigma_s = schedule.alpha_sigma(s, dtype=dtype, name="s")
    return alpha_t, sigma_t, alpha_s, sigma_s


def ddim_step(
    model_output: Tensor,
    z_t: Tensor,
    t: Tensor,
    s: Tensor,
    *,
    schedule: NoiseSchedule,
    prediction_type: str,
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
        prediction_type: What ``model_output`` is: "x", "eps" or "v" (or diffusers' names);
            required, as the conversion to ``x_hat`` depends on it.
        clip_x: Clip ``x_hat`` to [-1, 1] and recompute ``eps_hat`` from it.
        eta: DDIM stochasticity, a finite number >= 0 (0: deterministic, 1: ancestral). Needs
            ``sigma_t > 0``.
        generator: Random generator for the noise when ``eta > 0``.
        noise: Explicit standard normal noise ``xi`` shaped like ``z_t`` for ``eta > 0`` (its
            term vanishes at ``eta = 0``). Give ``noise`` or ``generator``, not both.

    Raises:
        ValueError: On mismatched shapes, a bad option, or both ``noise`` and ``generator``.

    Returns:
        :class:`DDIMStepOutput` with ``prev_sample`` (``z_s``) and the predictions used.

    Example:
        >>> import torch
        >>> from kdiff import CosineSchedule, ddim_step
        >>> sched = CosineSchedule()
        >>> z, x = torch.randn(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)
        >>> out = ddim_step(x, z, torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.25]), schedule=sched,
        ...                 prediction_type="x")
        >>> out.prev_sample.shape
        torch.Size([2, 3, 8, 8])
    """
    _check_step_inputs(model_output, z_t, t, s)
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a kdiff NoiseSchedule; got {type(schedule).__name__}")
    kind = normalize_prediction_type(prediction_type)
    check_bool("clip_x", clip_x)
    check_finite_number("eta", eta, minimum=0.0)
    if noise is not None and generator is not None:
        raise ValueError(
            "ddim_step got both noise and generator; pass one: noise is used as given, so the "
            "generator would be ignored"
        )
    if noise is not None:
        check_tensor("noise", noise)
        check_same_shape("noise", noise, "z_t", z_t)
        check_finite("noise", noise)
    dtype = z_t.dtype
    alpha_t, sigma_t, alpha_s, sigma_s = _alpha_sigma_pair(schedule, t, s, dtype)
    scale = xi = None
    if eta != 0:
        xi = noise.to(dtype) if noise is not None else torch.randn(
            z_t.shape, generator=generator, device=z_t.device, dtype=dtype
        )
        scale = ddim_noise_scale(alpha_t, sigma_t, alpha_s, sigma_s, eta)
    z_s, x_hat, eps_hat = ddim_step_coeffs(
        model_output, z_t, alpha_t, sigma_t, alpha_s, sigma_s,
        prediction_type=kind, clip_x=clip_x, noise_scale=scale, noise=xi,
    )
    return DDIMStepOutput(prev_sample=z_s, pred_x=x_hat, pred_eps=eps_hat)


class DDIMStep(nn.Module):
    """Module form of :func:`ddim_step`, holding the schedule and the sampler options.

    Args:
        schedule: The noise schedule.
        prediction_type: What the network outputs: "x", "eps" or "v" (diffusers' names also
            accepted); required.
        clip_x: Clip ``x_hat`` to [-1, 1] before stepping.
        eta: DDIM stochasticity, a finite number >= 0 (default 0: deterministic).

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
        prediction_type: str,
        clip_x: bool = False,
        eta: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a kdiff NoiseSchedule; got {type(schedule).__name__}")
        check_bool("clip_x", clip_x)
        check_finite_number("eta", eta, minimum=0.0)
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


# A discrete table's grids and coefficients never change, so they are kept per table (weakly), step
# count, device and dtype: a repeated call skips building and checking them again.
_GridKey = tuple[int, torch.device, torch.dtype]
_GRIDS: weakref.WeakKeyDictionary[DiscreteSchedule, dict[_GridKey, tuple[Tensor, Tensor, Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def _grid_coefficients(
    schedule: NoiseSchedule, num_steps: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grid(N), alpha, sigma)`` on ``device``: times in float32 (float64 for float64 samples)."""
    # Exactly DiscreteSchedule: a subclass or a continuous schedule may compute from parameters.
    cached = type(schedule) is DiscreteSchedule and not torch.compiler.is_compiling()
    key = (num_steps, device, dtype)
    if cached and key in _GRIDS.get(schedule, {}):
        return _GRIDS[schedule][key]
    times = schedule.grid(num_steps, device=device).to(dtype if dtype == torch.float64 else torch.float32)
    alphas, sigmas = schedule.alpha_sigma(times, dtype=dtype)
    if cached:
        _GRIDS.setdefault(schedule, {})[key] = (times, alphas, sigmas)  # type: ignore[index]
    return times, alphas, sigmas


@torch.no_grad()
def ddim_sample(
    model: Callable[..., Tensor],
    noise: Tensor,
    num_steps: int,
    *,
    schedule: NoiseSchedule,
    prediction_type: str,
    clip_x: bool = True,
    clip_output: bool | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    model_kwargs: dict[str, Any] | None = None,
    callback: Callable[[int, Tensor, DDIMStepOutput], None] | None = None,
) -> Tensor:
    """Sample with ``num_steps`` DDIM steps on ``schedule.grid(num_steps)``: ``t_N -> ... -> t_0``.

    Args:
        model: Any callable ``model(z_t, t, **model_kwargs)`` returning a prediction of
            ``prediction_type`` shaped like ``z_t``; ``t`` is a float tensor [B] of the schedule's
            times. A learned-variance network (2C output channels) must be wrapped to return
            its first C channels.
        noise: Starting noise ``z_{t_N}``, [B, ...] (scaled by ``sigma_{t_N}`` is not needed for
            variance-preserving schedules where ``sigma_{t_N} ~ 1``; it is used as given).
        num_steps: ``N``, the number of network evaluations; ``schedule.check_num_steps`` says
            which counts it allows.
        schedule: The noise schedule.
        prediction_type: What ``model`` outputs: "x", "eps" or "v" (or diffusers' names); required.
        clip_x: Clip ``x_hat`` to [-1, 1] at each step (the paper's evaluation protocol).
        clip_output: Clip the final sample to [-1, 1] (default: same as ``clip_x``).
        eta: DDIM stochasticity (finite, >= 0); needs ``generator`` for reproducibility.
        generator: Random generator for ``eta > 0``.
        model_kwargs: Extra keyword arguments for ``model`` (e.g. ``{"y": labels}``).
        callback: Called as ``callback(k, t, step_output)`` after each step (k counts down).

    Returns:
        The final sample at ``t_0`` (the paper's discrete cosine table's index 0 is not
        noise-free; a DDPM/diffusers table's ``t = 0`` is).

    The grid and its ``alpha``/``sigma`` are computed on ``noise``'s device before the loop (for a
    :class:`DiscreteSchedule`, once per step count, device and dtype, then reused) and a
    step reads no value on the host, so for fixed shapes the whole call can be captured in a CUDA
    graph (``torch.cuda.graph``; warm up once first, so per-device schedule tables exist, and
    use ``eta = 0`` or the default generator) or compiled with ``torch.compile(fullgraph=True)``
    (docs/performance.md).

    Raises:
        ValueError: If the model's output is not shaped like ``z_t``, or on a bad option.

    Example:
        >>> import torch
        >>> from kdiff import CosineSchedule, ddim_sample
        >>> model = lambda z, t: torch.zeros_like(z)   # predicts x = 0
        >>> out = ddim_sample(model, torch.randn(2, 3, 8, 8), 4, prediction_type="x",
        ...                   schedule=CosineSchedule(logsnr_min=None, logsnr_max=None))
        >>> float(out.abs().max())
        0.0
    """
    if not callable(model):
        raise TypeError(f"model must be callable; got {type(model).__name__}")
    check_tensor("noise", noise)
    if noise.ndim < 2:
        raise ValueError(f"noise must have shape [B, ...]; got {tuple(noise.shape)}")
    check_finite("noise", noise)
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a kdiff NoiseSchedule; got {type(schedule).__name__}")
    schedule.check_num_steps(num_steps)
    kind = normalize_prediction_type(prediction_type)
    check_bool("clip_x", clip_x)
    check_finite_number("eta", eta, minimum=0.0)
    if clip_output is not None:
        check_bool("clip_output", clip_output)
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a mapping or None; got {type(model_kwargs).__name__}")
    kwargs = model_kwargs or {}
    dtype = noise.dtype
    # The grid and its coefficients are computed once, on the device, before the loop: a step only
    # takes views of them (no host sync, no host-to-device copy), so the loop can be captured in a
    # CUDA graph and traces into one torch.compile graph.
    times, alphas, sigmas = _grid_coefficients(schedule, num_steps, noise.device, dtype)
    batch = noise.shape[0]
    # Every step's views in three ops, not five per step; the coefficients stay 0-d (one time for
    # the whole batch), which broadcasts like [B] at no cost.
    step_times = times.unsqueeze(1).expand(-1, batch).unbind()
    step_alphas, step_sigmas = alphas.unbind(), sigmas.unbind()
    z = noise
    for k in range(num_steps, 0, -1):
        t = step_times[k]
        alpha_t, sigma_t = step_alphas[k], step_sigmas[k]
        alpha_s, sigma_s = step_alphas[k - 1], step_sigmas[k - 1]
        output = check_model_output("model output", model(z, t, **kwargs), z.shape)
        scale = xi = None
        if eta != 0:
            xi = torch.randn(z.shape, generator=generator, device=z.device, dtype=dtype)
            scale = ddim_noise_scale(alpha_t, sigma_t, alpha_s, sigma_s, eta)
        z, x_hat, eps_hat = ddim_step_coeffs(
            output, z, alpha_t, sigma_t, alpha_s, sigma_s,
            prediction_type=kind, clip_x=clip_x, noise_scale=scale, noise=xi,
        )
        if callback is not None:
            callback(k, t, DDIMStepOutput(prev_sample=z, pred_x=x_hat, pred_eps=eps_hat))
    if clip_x if clip_output is None else clip_output:
        z = z.clamp(-1.0, 1.0)
    return z
