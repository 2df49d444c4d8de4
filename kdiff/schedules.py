"""Noise schedules: per-sample ``alpha_t``, ``sigma_t`` and ``logSNR(t)`` (docs/method.md, section 1).

Every schedule is variance preserving (``alpha_t^2 + sigma_t^2 = 1``), computes in float64 and
returns the dtype asked for. A schedule's *time* ``t`` is what kdiff's samplers and distiller pass
around; :meth:`NoiseSchedule.model_time` is the value a network from another codebase expects.

* :class:`CosineSchedule` (continuous): ``t`` in [0, 1], ``alpha_t = cos(pi/2 t)``,
  ``sigma_t = sin(pi/2 t)``, logSNR optionally clipped as in progressive distillation.
* :class:`LogSNRSchedule` (continuous): any ``logSNR(t)`` or VE ``sigma(t)`` function (EDM,
  k-diffusion), converted to the VP scale by ``alpha_t^2 = sigmoid(logSNR(t))``.
* :class:`DiscreteSchedule`: integer times ``0..T`` indexing an ``alphabar`` table: the paper's
  discrete cosine table (:meth:`DiscreteSchedule.cosine`), or a DDPM/diffusers table of ``T``
  training steps (:meth:`DiscreteSchedule.from_betas`, :meth:`DiscreteSchedule.from_alphas_cumprod`,
  :meth:`DiscreteSchedule.from_beta_schedule`, :meth:`DiscreteSchedule.linear`), which gets a clean
  point ``alphabar = 1`` at ``t = 0``; kdiff time ``t = j + 1`` is the network's timestep ``j``.

A sampler with ``N`` steps runs on :meth:`NoiseSchedule.grid` ``(N)``: ``t_k = k/N`` (continuous) or
``t_k = round(k T / N)`` (discrete). Grids are nested, ``grid(2N)[2k] == grid(N)[k]``, so progressive
distillation can halve any even ``N``; :meth:`NoiseSchedule.pd_times` gives a student step's
``(t, t', t'')``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ._validation import check_tensor, value_checks_enabled

__all__ = [
    "NoiseSchedule",
    "CosineSchedule",
    "LogSNRSchedule",
    "DiscreteSchedule",
    "BETA_SCHEDULES",
    "schedule_from_dict",
]

#: Beta formulas of :meth:`DiscreteSchedule.from_beta_schedule` (diffusers' ``beta_schedule`` names).
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("uniform", "trailing")


def _check_int(name: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _round_half_even_ratio(num: Tensor, den: int) -> Tensor:
    """``round(num / den)`` for int64 tensors, ties to even (as ``np.round``), in exact integers."""
    q = torch.div(num, den, rounding_mode="floor")
    twice_r = 2 * (num - q * den)
    up = (twice_r > den) | ((twice_r == den) & (q % 2 == 1))
    return q + up.to(q.dtype)


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

    def model_time(self, t: Tensor) -> Tensor:
        """The time a network is conditioned on at schedule time ``t`` (here: ``t`` itself).

        Schedules converted from another codebase override this, so the mapping lives in one
        place; wrappers such as :class:`kdiff.interop.DiffusersModel` call it.
        """
        return t

    def grid(self, num_steps: int, *, device: torch.device | str | None = None) -> Tensor:
        """Sampling time grid ``t_0 < t_1 < ... < t_N`` for an ``N``-step sampler (float64).

        A DDIM run goes ``t_N -> t_{N-1} -> ... -> t_0``. Grids are nested:
        ``grid(2N)[2k] == grid(N)[k]`` exactly.
        """
        self.check_num_steps(num_steps)
        k = torch.arange(num_steps + 1, dtype=torch.float64, device=device)
        return k / num_steps * self.t_max

    def pd_times(self, k: Tensor, num_steps: int) -> tuple[Tensor, Tensor, Tensor]:
        """Times of progressive distillation's student step ``k`` of ``N``: ``(t, t', t'')``.

        The student steps ``t = grid(N)[k] -> t'' = grid(N)[k-1]``; its ``2N``-step teacher
        passes through ``t' = grid(2N)[2k-1]``, which lies strictly between them.

        Args:
            k: Student step per sample, an integer tensor [B] with values in ``1..N``.
            num_steps: ``N``, the student's step count (its teacher takes ``2N``).

        Returns:
            ``(t, t_mid, t_next)``, float64 tensors shaped like ``k`` on its device.

        Example:
            >>> import torch
            >>> from kdiff import DiscreteSchedule
            >>> sched = DiscreteSchedule.linear(1000)
            >>> [x.tolist() for x in sched.pd_times(torch.tensor([1, 3]), 3)]
            [[333.0, 1000.0], [167.0, 833.0], [0.0, 667.0]]
        """
        check_tensor("k", k)
        if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
            raise TypeError(f"k must be an integer tensor of student steps; got {k.dtype}")
        self.check_num_steps(num_steps)
        self.check_num_steps(2 * num_steps, name="2 * num_steps (teacher steps)")
        if value_checks_enabled(k) and k.numel() > 0:
            lo, hi = int(k.min()), int(k.max())
            if lo < 1 or hi > num_steps:
                raise ValueError(f"k must lie in 1..{num_steps}; got values in [{lo}, {hi}]")
        teacher = self.grid(2 * num_steps, device=k.device)
        k2 = 2 * k.long()
        return teacher[k2], teacher[k2 - 1], teacher[k2 - 2]

    def grid_index(self, t: Tensor, num_steps: int) -> Tensor:
        """Index ``k`` of the point of ``grid(N)`` nearest to each time in ``t`` (int64).

        The inverse of ``grid(N)[k]`` for times on the grid; it does not check that ``t`` is on
        the grid (compare ``grid(N)[k]`` with ``t`` for that).
        """
        check_tensor("t", t)
        g = self.grid(num_steps, device=t.device)
        t64 = t.to(torch.float64)
        right = torch.searchsorted(g, t64).clamp(1, num_steps)
        left = right - 1
        return torch.where(t64 - g[left] <= g[right] - t64, left, right)

    def check_num_steps(self, num_steps: int, *, name: str = "num_steps") -> None:
        """``num_steps`` must be a positive int (discrete schedules add their own limits)."""
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


class LogSNRSchedule(NoiseSchedule):
    """Continuous VP schedule from a ``logSNR(t)`` function, for continuous-time teachers.

    ``alpha_t = sqrt(sigmoid(logSNR(t)))`` and ``sigma_t = sqrt(sigmoid(-logSNR(t)))``, so
    ``alpha_t^2 + sigma_t^2 = 1``; ``logSNR = +inf`` is the clean image (``sigma_t = 0``).
    A variance-exploding (EDM, k-diffusion) noise level ``sigma_ve`` is ``logSNR = -2 log sigma_ve``
    (:meth:`from_sigma`, :meth:`karras`): the VP sample is ``z_t = alpha_t (x + sigma_ve n)``
    with ``alpha_t = 1 / sqrt(1 + sigma_ve^2)``. Wrap a VE denoiser ``D(x; sigma)`` with
    :func:`kdiff.interop.from_ve_denoiser` to use it as an x-predictor on this schedule.

    Args:
        logsnr_fn: Maps float64 times (any shape) to ``logSNR(t)`` of the same shape, decreasing
            in ``t``; it must be a torch function of its input (it may run on any device).
        t_max: Largest time (pure-noise end); times lie in ``[0, t_max]``.
        name: Label used in ``repr``.

    Example:
        >>> import torch
        >>> from kdiff import LogSNRSchedule
        >>> sched = LogSNRSchedule(lambda t: 10.0 - 20.0 * t)   # logSNR from 10 to -10
        >>> alpha, sigma = sched.alpha_sigma(torch.tensor([0.5]), dtype=torch.float64)
        >>> round(float(alpha), 6), round(float(sigma), 6)
        (0.707107, 0.707107)
    """

    is_discrete = False

    def __init__(
        self, logsnr_fn: Callable[[Tensor], Tensor], *, t_max: float = 1.0, name: str = "logsnr_fn"
    ) -> None:
        if not callable(logsnr_fn):
            raise TypeError(f"logsnr_fn must be callable; got {type(logsnr_fn).__name__}")
        if isinstance(t_max, bool) or not isinstance(t_max, (int, float)) or not 0 < t_max < math.inf:
            raise ValueError(f"t_max must be a finite number > 0; got {t_max!r}")
        self._logsnr_fn = logsnr_fn
        self._t_max = float(t_max)
        self._name = name
        self._spec: dict[str, Any] | None = None

    @classmethod
    def from_sigma(
        cls, sigma_fn: Callable[[Tensor], Tensor], *, t_max: float = 1.0, name: str = "sigma_fn"
    ) -> LogSNRSchedule:
        """Schedule from a variance-exploding noise level ``sigma_ve(t) >= 0``: ``logSNR = -2 log sigma_ve``.

        Example:
            >>> import torch
            >>> from kdiff import LogSNRSchedule
            >>> sched = LogSNRSchedule.from_sigma(lambda t: 80.0 * t)
            >>> float(sched.alpha(torch.tensor([0.0]), dtype=torch.float64))   # sigma_ve = 0: clean
            1.0
        """
        if not callable(sigma_fn):
            raise TypeError(f"sigma_fn must be callable; got {type(sigma_fn).__name__}")
        return cls(lambda t: -2.0 * torch.log(sigma_fn(t)), t_max=t_max, name=name)

    @classmethod
    def karras(
        cls, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
    ) -> LogSNRSchedule:
        """EDM's noise levels (Karras et al. 2022, eq. 5) as a schedule over ``t`` in [0, 1].

        ``sigma_ve(t) = (sigma_min^(1/rho) + t (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``, so
        an ``N``-step grid ``t_k = k/N`` visits EDM's ``rho``-spaced levels, from ``sigma_max`` at
        ``t = 1`` to ``sigma_min`` at ``t = 0`` (not exactly clean: the last DDIM step returns
        ``alpha x_hat + sigma eps_hat`` with ``sigma_ve = sigma_min``).
        """
        for arg, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{arg} must be a finite number > 0; got {value!r}")
        if not sigma_min < sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max; got {sigma_min} and {sigma_max}")
        lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
        sched = cls.from_sigma(lambda t: (lo + t * (hi - lo)) ** rho, name="karras")
        sched._spec = {"kind": "karras", "sigma_min": sigma_min, "sigma_max": sigma_max, "rho": rho}
        return sched

    @property
    def t_max(self) -> float:
        return self._t_max

    def _logsnr64(self, t: Tensor) -> Tensor:
        t64 = t.to(torch.float64)
        lam = self._logsnr_fn(t64)
        if not isinstance(lam, Tensor) or lam.shape != t64.shape:
            got = tuple(lam.shape) if isinstance(lam, Tensor) else type(lam).__name__
            raise ValueError(
                f"logsnr_fn must return a tensor shaped like its input {tuple(t64.shape)}; got {got}"
            )
        lam = lam.to(torch.float64)
        if value_checks_enabled(lam) and lam.numel() > 0 and bool(torch.isnan(lam).any()):
            raise ValueError(f"logsnr_fn returned NaN for {self!r}")
        return lam

    def _alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        lam = self._logsnr64(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def logsnr(self, t: Tensor, *, dtype: torch.dtype | None = None) -> Tensor:
        """``logSNR(t)`` as given by the function (exact, not recomputed from alpha and sigma)."""
        self.check_times(t)
        return self._logsnr64(t).to(dtype or torch.get_default_dtype())

    def to_dict(self) -> dict[str, Any]:
        if self._spec is None:
            raise ValueError(
                f"{self!r} is built from a Python function and has no JSON form; store the "
                "function's parameters yourself, or use LogSNRSchedule.karras or CosineSchedule"
            )
        return dict(self._spec)

    def __repr__(self) -> str:
        if self._spec is not None and self._spec["kind"] == "karras":
            s = self._spec
            return f"LogSNRSchedule.karras(sigma_min={s['sigma_min']}, sigma_max={s['sigma_max']}, rho={s['rho']})"
        return f"LogSNRSchedule({self._name}, t_max={self._t_max:g})"


class DiscreteSchedule(NoiseSchedule):
    """Discrete schedule given by a table ``alphabar[0..T]``; times are integer indices.

    ``alpha_i = sqrt(alphabar[i])`` and ``sigma_i = sqrt(1 - alphabar[i])``. Times may be passed
    as integer or integral floating tensors.

    Two kinds of tables:

    * The paper's (:meth:`cosine`, or this constructor): the network is conditioned on the index
      itself, index 0 need not be clean, and an ``N``-step grid ``k T / N`` needs ``N | T``.
    * A DDPM/diffusers table of ``T`` training steps (:meth:`from_betas`,
      :meth:`from_alphas_cumprod`, :meth:`from_beta_schedule`, :meth:`linear`): kdiff prepends the
      clean point ``alphabar[0] = 1`` (``x`` itself), so kdiff time ``t = j + 1`` is the network's
      timestep ``j`` (:meth:`model_time` returns ``t - 1``) and ``t = 0`` is where DDIM ends. Any
      ``N`` from 1 to ``T`` works, on the grid ``round(k T / N)`` (diffusers' "trailing" spacing).

    Args:
        alphas_cumprod: The table ``alphabar`` indexed by kdiff time (``T + 1`` entries in (0, 1]).
        spacing: "uniform" (``t_k = k T / N``, ``N`` must divide ``T``) or "trailing"
            (``t_k = round(k T / N)``, ties to even, any ``N <= T``). Both give the same grid when
            ``N`` divides ``T``, and both are nested (``grid(2N)[2k] == grid(N)[k]``).
        model_time_offset: :meth:`model_time` returns ``t - model_time_offset``.
        name: Label used in ``repr``.

    Example:
        >>> import torch
        >>> from kdiff import DiscreteSchedule
        >>> sched = DiscreteSchedule.cosine(num_timesteps=1024)
        >>> sched.t_max
        1024.0
        >>> sched.alpha(torch.tensor([0, 512, 1024]), dtype=torch.float64).shape
        torch.Size([3])
        >>> ddpm = DiscreteSchedule.linear(1000)          # google/ddpm-cifar10-32's table
        >>> ddpm.grid(3).tolist(), ddpm.model_time(torch.tensor([1000.0])).tolist()
        ([0.0, 333.0, 667.0, 1000.0], [999.0])
    """

    is_discrete = True

    def __init__(
        self,
        alphas_cumprod: Sequence[float] | np.ndarray | Tensor,
        *,
        spacing: Literal["uniform", "trailing"] = "uniform",
        model_time_offset: int = 0,
        name: str = "table",
    ):
        table = torch.as_tensor(np.asarray(alphas_cumprod, dtype=np.float64))
        if table.ndim != 1 or table.numel() < 2:
            raise ValueError(
                f"alphas_cumprod must be a 1-D table with at least 2 entries; got shape {tuple(table.shape)}"
            )
        if not bool(torch.isfinite(table).all()) or not bool(((table > 0) & (table <= 1)).all()):
            raise ValueError("alphas_cumprod entries must be finite and in (0, 1]")
        if spacing not in _SPACINGS:
            raise ValueError(f"spacing must be one of 'uniform', 'trailing'; got {spacing!r}")
        _check_int("model_time_offset", model_time_offset, minimum=0)
        self._table = table
        self._spacing = spacing
        self._offset = model_time_offset
        self._spec: dict[str, Any] = {"kind": "discrete", "alphas_cumprod": table.tolist()}
        if spacing != "uniform":
            self._spec["spacing"] = spacing
        if model_time_offset:
            self._spec["model_time_offset"] = model_time_offset
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
        (``n`` entries, indices ``0..T*time_scale``). Index 0 is not noise-free; the spacing is
        "uniform" (step counts divide ``T``), as in the paper's code.
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
    def from_alphas_cumprod(
        cls, alphas_cumprod: Sequence[float] | np.ndarray | Tensor, *, name: str = "alphas_cumprod"
    ) -> DiscreteSchedule:
        """Schedule from a DDPM/diffusers ``alphas_cumprod`` table of ``T`` training steps.

        ``alphas_cumprod[j]`` is the network's timestep ``j`` (``0..T-1``); kdiff's table is
        ``[1, alphas_cumprod[0], ..., alphas_cumprod[T-1]]``, so kdiff time ``t = j + 1`` and the
        clean image sits at ``t = 0``. Spacing "trailing": any step count from 1 to ``T``.

        Args:
            alphas_cumprod: ``T`` values in (0, 1), decreasing (``T >= 1``).
            name: Label used in ``repr``.
        """
        a = np.asarray(torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu().numpy(), dtype=np.float64)
        if a.ndim != 1 or a.size < 1:
            raise ValueError(f"alphas_cumprod must be a 1-D table of T >= 1 entries; got shape {a.shape}")
        if not np.all(np.isfinite(a)) or not np.all((a > 0) & (a < 1)):
            raise ValueError(
                "alphas_cumprod entries must be finite and in (0, 1); a zero-terminal-SNR table "
                "(alphas_cumprod[-1] = 0) has no finite logSNR and is not supported"
            )
        if np.any(np.diff(a) >= 0):
            raise ValueError("alphas_cumprod must be strictly decreasing (more noise at later timesteps)")
        return cls(np.concatenate([[1.0], a]), spacing="trailing", model_time_offset=1, name=name)

    @classmethod
    def from_betas(cls, betas: Sequence[float] | np.ndarray | Tensor) -> DiscreteSchedule:
        """Schedule from a DDPM/diffusers betas table of ``T`` training steps.

        ``alphas_cumprod = cumprod(1 - beta)`` (timestep ``j`` uses ``beta_0..beta_j``), then as
        :meth:`from_alphas_cumprod`: ``T = len(betas)``, kdiff time ``t = j + 1``, ``t = 0`` clean.
        """
        b = np.asarray(torch.as_tensor(betas, dtype=torch.float64).cpu().numpy(), dtype=np.float64)
        if b.ndim != 1 or b.size < 1 or not np.all((b > 0) & (b < 1)):
            raise ValueError("betas must be a 1-D table with entries in (0, 1)")
        return cls.from_alphas_cumprod(np.cumprod(1.0 - b), name="betas")

    @classmethod
    def from_beta_schedule(
        cls,
        beta_schedule: str,
        num_train_timesteps: int = 1000,
        *,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> DiscreteSchedule:
        """A named DDPM/diffusers beta formula over ``T = num_train_timesteps`` training steps.

        In float64, with ``j = 0..T-1``:

        * "linear": ``beta_j = linspace(beta_start, beta_end, T)`` (DDPM; ``google/ddpm-cifar10-32``).
        * "scaled_linear": ``beta_j = linspace(sqrt(beta_start), sqrt(beta_end), T)^2`` (latent diffusion).
        * "squaredcos_cap_v2": ``beta_j = min(1 - f((j+1)/T) / f(j/T), 0.999)``,
          ``f(u) = cos^2((u + 0.008)/1.008 * pi/2)`` (improved DDPM's cosine; ``beta_start`` and
          ``beta_end`` are unused).

        The table then gets the clean point at ``t = 0`` as in :meth:`from_betas`.
        """
        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"beta_schedule must be one of {', '.join(map(repr, BETA_SCHEDULES))}; got {beta_schedule!r}"
            )
        T = _check_int("num_train_timesteps", num_train_timesteps)
        for arg, value in (("beta_start", beta_start), ("beta_end", beta_end)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"{arg} must be a number in (0, 1); got {value!r}")
        if beta_schedule == "linear":
            betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
        elif beta_schedule == "scaled_linear":
            betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
        else:
            u = np.arange(T + 1, dtype=np.float64) / T
            f = np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
            betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
        sched = cls.from_betas(betas)
        sched._name = beta_schedule
        sched._spec = {
            "kind": "discrete_betas",
            "beta_schedule": beta_schedule,
            "num_train_timesteps": T,
            "beta_start": beta_start,
            "beta_end": beta_end,
        }
        return sched

    @classmethod
    def linear(
        cls, num_train_timesteps: int = 1000, *, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> DiscreteSchedule:
        """DDPM linear betas (diffusers' ``beta_schedule="linear"``), see :meth:`from_beta_schedule`.

        ``T = num_train_timesteps``: kdiff times ``0..T`` with ``t = 0`` clean, and kdiff time
        ``t`` is diffusers' timestep ``t - 1``.
        """
        return cls.from_beta_schedule(
            "linear", num_train_timesteps, beta_start=beta_start, beta_end=beta_end
        )

    # ------------------------------------------------------------------ schedule API
    @property
    def num_timesteps(self) -> int:
        """``T``: the largest index."""
        return self._table.numel() - 1

    @property
    def t_max(self) -> float:
        return float(self.num_timesteps)

    @property
    def spacing(self) -> str:
        """"uniform" or "trailing" (see the class docstring)."""
        return self._spacing

    @property
    def model_time_offset(self) -> int:
        """:meth:`model_time` is ``t - model_time_offset`` (1 for DDPM/diffusers tables)."""
        return self._offset

    @property
    def alphas_cumprod(self) -> Tensor:
        """The float64 ``alphabar`` table indexed by kdiff time (a copy)."""
        return self._table.clone()

    def model_time(self, t: Tensor) -> Tensor:
        """The network's own timestep for kdiff time ``t``: ``t - model_time_offset``.

        For a DDPM/diffusers table that is ``t - 1`` (diffusers' timestep ``j`` for ``t = j + 1``);
        the clean point ``t = 0`` is never passed to a network by kdiff's sampler or distiller.
        """
        check_tensor("t", t)
        return t - self._offset if self._offset else t

    def grid(self, num_steps: int, *, device: torch.device | str | None = None) -> Tensor:
        """Integer time grid ``t_k = round(k T / N)``, ``k = 0..N`` (ties to even), as float64.

        Equals ``k T / N`` when ``N`` divides ``T``. ``t_0 = 0``, ``t_N = T``, strictly
        increasing for ``N <= T``, and nested: ``grid(2N)[2k] == grid(N)[k]``.
        """
        self.check_num_steps(num_steps)
        k = torch.arange(num_steps + 1, dtype=torch.int64, device=device)
        return _round_half_even_ratio(k * self.num_timesteps, num_steps).to(torch.float64)

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
        T = self.num_timesteps
        if self._spacing == "uniform" and T % num_steps:
            raise ValueError(
                f"{name}={num_steps} must divide the schedule's T={T} (allowed: divisors of {T}: "
                f"{', '.join(map(str, _divisors(T)))}): this table uses the paper's uniform grid "
                f"k * T / N; a table built with spacing='trailing' accepts any N <= T"
            )
        if num_steps > T:
            raise ValueError(
                f"{name}={num_steps} must be at most the schedule's T={T} (allowed: 1..{T}): an "
                f"N-step grid round(k * T / N) needs N distinct integer times in 1..{T}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dict(self._spec)

    def __repr__(self) -> str:
        return f"DiscreteSchedule({self._name}, T={self.num_timesteps})"


def schedule_from_dict(spec: dict[str, Any]) -> NoiseSchedule:
    """Rebuild a schedule from :meth:`NoiseSchedule.to_dict` output (e.g. a checkpoint's metadata)."""
    kind = spec.get("kind")
    if kind == "cosine":
        return CosineSchedule(logsnr_min=spec.get("logsnr_min"), logsnr_max=spec.get("logsnr_max"))
    if kind == "discrete_cosine":
        return DiscreteSchedule.cosine(
            spec["num_timesteps"], time_scale=spec.get("time_scale", 1), s=spec.get("s", 0.008)
        )
    if kind == "discrete_betas":
        return DiscreteSchedule.from_beta_schedule(
            spec["beta_schedule"],
            spec["num_train_timesteps"],
            beta_start=spec["beta_start"],
            beta_end=spec["beta_end"],
        )
    if kind == "discrete_linear":
        return DiscreteSchedule.linear(
            spec["num_train_timesteps"], beta_start=spec["beta_start"], beta_end=spec["beta_end"]
        )
    if kind == "discrete":
        return DiscreteSchedule(
            spec["alphas_cumprod"],
            spacing=spec.get("spacing", "uniform"),
            model_time_offset=spec.get("model_time_offset", 0),
        )
    if kind == "karras":
        return LogSNRSchedule.karras(
            sigma_min=spec["sigma_min"], sigma_max=spec["sigma_max"], rho=spec["rho"]
        )
    raise ValueError(
        "spec['kind'] must be one of 'cosine', 'discrete_cosine', 'discrete_betas', "
        f"'discrete_linear', 'discrete', 'karras'; got {kind!r}"
    )
