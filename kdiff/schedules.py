"""Noise schedules: per-sample ``alpha_t``, ``sigma_t`` and ``logSNR(t)`` (docs/method.md, section 1).

Every schedule is variance preserving (``alpha_t^2 + sigma_t^2 = 1``), computes in float64 and
returns the dtype asked for. A schedule's *time* is what the network is conditioned on:

* :class:`CosineSchedule` (continuous): ``t`` in [0, 1], ``alpha_t = cos(pi/2 t)``,
  ``sigma_t = sin(pi/2 t)``, logSNR optionally clipped as in progressive distillation.
* :class:`DiscreteSchedule`: integer indices ``0..T`` into an ``alphabar`` table. Built from the
  paper's discrete cosine formula (:meth:`DiscreteSchedule.cosine`), from betas
  (:meth:`DiscreteSchedule.from_betas`, :meth:`DiscreteSchedule.linear` for a DDPM/diffusers
  linear-beta teacher) or from any ``alphas_cumprod`` table.

A student with ``N`` steps samples on :meth:`NoiseSchedule.grid` ``(N)``: ``t_k = k/N`` or
``k * T/N``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._validation import check_tensor, value_checks_enabled

__all__ = ["NoiseSchedule", "CosineSchedule", "DiscreteSchedule", "schedule_from_dict"]


class NoiseSchedule(ABC):
    """Base class: maps per-sample times ``t`` (shape [B]) to ``(alpha_t, sigma_t)``."""

    #: True when times are integer indices into a table.
    is_discrete: bool = False

    @property
    @abstractmethod
    def t_max(self) -> float:
        """Largest valid time (pure noise end)."""

    @property
    def t_min(self) -> float:
        """Smallest valid time (data end)."""
        return 0.0

    @abstractmethod
    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha_t, sigma_t`` in float64 for validated times ``t``."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description; :func:`schedule_from_dict` rebuilds the schedule."""

    # ------------------------------------------------------------------ public API
    def alpha_sigma(
        self, t: Tensor, *, dtype: torch.dtype | None = None, name: str = "t"
    ) -> tuple[Tensor, Tensor]:
        """``(alpha_t, sigma_t)`` for per-sample times.

        Args:
            t: Times, any shape (usually [B]), on any device.
            dtype: Floating dtype of the result (default: ``torch.get_default_dtype()``).
            name: Argument name used in error messages.

        Returns:
            Two tensors shaped like ``t``, computed in float64, cast to ``dtype``.
        """
        self.check_times(t, name=name)
        alpha, sigma = self._alpha_sigma64(t)
        dtype = dtype or torch.get_default_dtype()
        return alpha.to(dtype), sigma.to(dtype)

    def alpha(self, t: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """``alpha_t`` (signal scale) per sample."""
        return self.alpha_sigma(t, dtype=dtype)[0]

    def sigma(self, t: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """``sigma_t`` (noise scale) per sample."""
        return self.alpha_sigma(t, dtype=dtype)[1]

    def logsnr(self, t: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """``log(alpha_t^2 / sigma_t^2)`` per sample (``+inf`` where ``sigma_t = 0``)."""
        self.check_times(t)
        alpha, sigma = self._alpha_sigma64(t)
        return (2.0 * (torch.log(alpha) - torch.log(sigma))).to(dtype or torch.get_default_dtype())

    def grid(self, num_steps: int, *, device: torch.device | str | None = None) -> Tensor:
        """Sampling time grid ``t_0 < t_1 < ... < t_N`` for an ``N``-step sampler (float64).

        A DDIM run goes ``t_N -> t_{N-1} -> ... -> t_0``.
        """
        self.check_num_steps(num_steps)
        k = torch.arange(num_steps + 1, dtype=torch.float64, device=device)
        return k * (self.t_max / num_steps) if self.is_discrete else k / num_steps * self.t_max

    def check_num_steps(self, num_steps: int, *, name: str = "num_steps") -> None:
        """``num_steps`` must be a positive int (dividing ``T`` for discrete schedules)."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"{name} must be a positive int; got {num_steps!r}")

    def check_times(self, t: Tensor, *, name: str = "t") -> None:
        """Raise ``ValueError`` if ``t`` is outside ``[t_min, t_max]`` (value check, see
        :func:`kdiff.set_value_checks`)."""
        check_tensor(name, t)
        if t.is_complex():
            raise TypeError(f"{name} must be a real tensor; got {t.dtype}")
        if value_checks_enabled(t) and t.numel() > 0:
            lo, hi = float(t.min()), float(t.max())
            if not (self.t_min <= lo and hi <= self.t_max) or math.isnan(lo) or math.isnan(hi):
                raise ValueError(
                    f"{name} must lie in [{self.t_min:g}, {self.t_max:g}] for {self!r}; "
                    f"got values in [{lo:g}, {hi:g}]"
                )


class CosineSchedule(NoiseSchedule):
    """Continuous cosine schedule: ``alpha_t = cos(pi/2 t)``, ``sigma_t = sin(pi/2 t)``, t in [0, 1].

    Args:
        logsnr_min: Lower clip of ``logSNR(t)`` (PD uses -20); ``None`` for no clip.
        logsnr_max: Upper clip of ``logSNR(t)`` (PD uses 20); ``None`` for no clip. With no clip,
            ``sigma_0 = 0`` exactly.

    Example:
        >>> import torch
        >>> from kdiff import CosineSchedule
        >>> alpha, sigma = CosineSchedule().alpha_sigma(torch.tensor([0.5, 1.0]))
        >>> torch.allclose(alpha**2 + sigma**2, torch.ones(2))
        True
    """

    is_discrete = False

    def __init__(self, *, logsnr_min: float | None = -20.0, logsnr_max: float | None = 20.0):
        if logsnr_min is not None and logsnr_max is not None and not logsnr_min < logsnr_max:
            raise ValueError(
                f"logsnr_min must be < logsnr_max; got logsnr_min={logsnr_min}, logsnr_max={logsnr_max}"
            )
        self.logsnr_min = logsnr_min
        self.logsnr_max = logsnr_max

    @property
    def t_max(self) -> float:
        return 1.0

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t64 = t.to(torch.float64)
        if self.logsnr_min is None and self.logsnr_max is None:
            half_pi_t = (math.pi / 2) * t64
            return torch.cos(half_pi_t), torch.sin(half_pi_t)
        # logSNR(t) = -2 log tan(pi t / 2); alpha^2 = sigmoid(logSNR), sigma^2 = sigmoid(-logSNR).
        logsnr = -2.0 * torch.log(torch.tan((math.pi / 2) * t64))
        logsnr = logsnr.clamp(min=self.logsnr_min, max=self.logsnr_max)
        return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "cosine", "logsnr_min": self.logsnr_min, "logsnr_max": self.logsnr_max}

    def __repr__(self) -> str:
        return f"CosineSchedule(logsnr_min={self.logsnr_min}, logsnr_max={self.logsnr_max})"


class DiscreteSchedule(NoiseSchedule):
    """Discrete schedule given by a table ``alphabar[0..T]``; times are integer indices.

    ``alpha_i = sqrt(alphabar[i])`` and ``sigma_i = sqrt(1 - alphabar[i])``. Times may be passed
    as integer or integral floating tensors.

    Args:
        alphas_cumprod: The table ``alphabar`` (``T + 1`` entries, decreasing, in (0, 1]).
        name: Label stored in :meth:`to_dict` (the constructors set it).

    Example:
        >>> import torch
        >>> from kdiff import DiscreteSchedule
        >>> sched = DiscreteSchedule.cosine(num_timesteps=1024)
        >>> sched.t_max
        1024.0
        >>> sched.alpha(torch.tensor([0, 512, 1024]), dtype=torch.float64).shape
        torch.Size([3])
    """

    is_discrete = True

    def __init__(self, alphas_cumprod: Sequence[float] | np.ndarray | Tensor, *, name: str = "table"):
        table = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        if table.ndim != 1 or table.numel() < 2:
            raise ValueError(
                f"alphas_cumprod must be a 1-D table with at least 2 entries; got shape {tuple(table.shape)}"
            )
        if not bool(torch.isfinite(table).all()) or not bool(((table > 0) & (table <= 1)).all()):
            raise ValueError("alphas_cumprod entries must be finite and in (0, 1]")
        self._table = table
        self._spec: dict[str, Any] = {"kind": "discrete", "alphas_cumprod": table.tolist()}
        self._name = name
        self._cache: dict[torch.device, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def cosine(
        cls, num_timesteps: int = 1024, *, time_scale: int = 1, s: float = 0.008
    ) -> DiscreteSchedule:
        """The paper's discrete cosine table (docs/method.md, "Schedules").

        With ``n = T * time_scale + 1``: ``f(i) = cos^2(((i/n) + s)/(1 + s) * pi/2)`` for
        ``i = 0..n``, ``beta_i = min(1 - f(i+1)/f(i), 0.999)``, ``alphabar = cumprod(1 - beta)``
        (``n`` entries, indices ``0..T*time_scale``). Index 0 is not noise-free.
        """
        for arg, value in (("num_timesteps", num_timesteps), ("time_scale", time_scale)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be a positive int; got {value!r}")
        n = num_timesteps * time_scale + 1
        i = np.arange(n + 1, dtype=np.float64)
        f = np.cos(((i / n) + s) / (1 + s) * np.pi / 2) ** 2
        betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
        sched = cls(np.cumprod(1.0 - betas), name="cosine")
        sched._spec = {
            "kind": "discrete_cosine",
            "num_timesteps": num_timesteps,
            "time_scale": time_scale,
            "s": s,
        }
        return sched

    @classmethod
    def from_betas(cls, betas: Sequence[float] | np.ndarray | Tensor) -> DiscreteSchedule:
        """Table ``alphabar = cumprod(1 - beta)`` from a betas table (index ``i`` uses beta_0..beta_i)."""
        b = np.asarray(torch.as_tensor(betas, dtype=torch.float64).cpu().numpy(), dtype=np.float64)
        if b.ndim != 1 or not np.all((b > 0) & (b < 1)):
            raise ValueError("betas must be a 1-D table with entries in (0, 1)")
        return cls(np.cumprod(1.0 - b), name="betas")

    @classmethod
    def linear(
        cls, num_train_timesteps: int = 1000, *, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> DiscreteSchedule:
        """DDPM linear betas (as diffusers' ``DDPMScheduler(beta_schedule="linear")``).

        Note: diffusers indexes timesteps ``0..num_train_timesteps-1``; here ``T`` is
        ``num_train_timesteps - 1`` and index ``i`` is diffusers' timestep ``i``.
        """
        sched = cls.from_betas(np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64))
        sched._spec = {
            "kind": "discrete_linear",
            "num_train_timesteps": num_train_timesteps,
            "beta_start": beta_start,
            "beta_end": beta_end,
        }
        return sched

    # ------------------------------------------------------------------ schedule API
    @property
    def num_timesteps(self) -> int:
        """``T``: the largest index."""
        return self._table.numel() - 1

    @property
    def t_max(self) -> float:
        return float(self.num_timesteps)

    @property
    def alphas_cumprod(self) -> Tensor:
        """The float64 ``alphabar`` table (a copy)."""
        return self._table.clone()

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        # One copy of alpha/sigma per device, so lookups never copy from the host.
        if device not in self._cache:
            table = self._table.to(device)
            self._cache[device] = (table.sqrt(), (1.0 - table).sqrt())
        return self._cache[device]

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        alpha, sigma = self._tables(t.device)
        index = t.round().long() if t.is_floating_point() else t.long()
        return alpha[index], sigma[index]

    def check_times(self, t: Tensor, *, name: str = "t") -> None:
        super().check_times(t, name=name)
        if t.is_floating_point() and value_checks_enabled(t) and t.numel() > 0:
            if not bool((t == t.round()).all()):
                raise ValueError(f"{name} must hold integer indices for a discrete schedule")

    def check_num_steps(self, num_steps: int, *, name: str = "num_steps") -> None:
        super().check_num_steps(num_steps, name=name)
        if self.num_timesteps % num_steps:
            raise ValueError(
                f"{name}={num_steps} must divide the schedule's T={self.num_timesteps} "
                f"(allowed: divisors of {self.num_timesteps})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dict(self._spec)

    def __repr__(self) -> str:
        return f"DiscreteSchedule({self._name}, T={self.num_timesteps})"


def schedule_from_dict(spec: dict[str, Any]) -> NoiseSchedule:
    """Rebuild a schedule from :meth:`NoiseSchedule.to_dict` output (e.g. a checkpoint sidecar)."""
    kind = spec.get("kind")
    if kind == "cosine":
        return CosineSchedule(logsnr_min=spec.get("logsnr_min"), logsnr_max=spec.get("logsnr_max"))
    if kind == "discrete_cosine":
        return DiscreteSchedule.cosine(
            spec["num_timesteps"], time_scale=spec.get("time_scale", 1), s=spec.get("s", 0.008)
        )
    if kind == "discrete_linear":
        return DiscreteSchedule.linear(
            spec["num_train_timesteps"], beta_start=spec["beta_start"], beta_end=spec["beta_end"]
        )
    if kind == "discrete":
        return DiscreteSchedule(spec["alphas_cumprod"])
    raise ValueError(
        "spec['kind'] must be one of 'cosine', 'discrete_cosine', 'discrete_linear', 'discrete'; "
        f"got {kind!r}"
    )
