"""Progressive distillation (Salimans & Ho 2022): a 2N-step teacher -> an N-step student.

:class:`ProgressiveDistiller` splits one training step into pieces that compose:

* :meth:`~ProgressiveDistiller.sample_times` and :meth:`~ProgressiveDistiller.sample_noise` draw
  ``t`` and ``eps``;
* :meth:`~ProgressiveDistiller.target` forms ``z_t`` and runs the teacher's two DDIM half-steps
  without gradient, returning the target ``x_tilde``/``eps_tilde`` (a :class:`DistillationTarget`),
  to pair with any student loss;
* calling the distiller does all of it plus the student's forward pass and the weighted PD loss
  (a :class:`DistillationOutput`). CFD reuses the target image and the student's x-prediction
  from the same output, so nothing is computed twice.

With ``impl`` resolving to Triton (CUDA tensors under ``impl="auto"``), a call fuses what follows
the teacher's two network calls: the second half-step, the target and the weighted loss run as
one :func:`kdiff.ops.pd_target_loss` pass.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._validation import (
    check_batch,
    check_bool,
    check_choice,
    check_finite,
    check_model_output,
    check_same_shape,
    check_tensor,
    value_checks_enabled,
)
from .functional import (
    add_noise,
    ddim_step_coeffs,
    ddim_update,
    pd_loss,
    pd_target,
    resolve_weighting,
)
from .ops import IMPLS, pd_target_loss, resolve_impl
from .parameterization import normalize_prediction_type, to_x_eps
from .schedules import NoiseSchedule

__all__ = ["DistillationOutput", "DistillationTarget", "ProgressiveDistiller"]

Model = Callable[..., Tensor]


@dataclass
class DistillationTarget:
    """The teacher side of one progressive-distillation step (all tensors, no host syncs).

    Only ``z_t`` may carry a gradient (when ``x`` does); everything the teacher produced is
    computed under ``torch.no_grad``.

    Attributes:
        z_t: Noisy input ``alpha_t x + sigma_t eps``, [B, ...].
        t: Student times per sample, [B].
        t_mid: Teacher's intermediate time ``t' = grid(2N)[2k-1]``, [B].
        t_next: ``t'' = grid(N)[k-1]``, where the student's single step lands, [B].
        z_mid: Teacher's first half-step result ``z_t'``.
        z_next: Teacher's two-step result ``z_t''``.
        x_target: ``x_tilde``, the x-prediction whose one DDIM step ``t -> t''`` lands on ``z_t''``.
        eps_target: ``eps_tilde = (z_t - alpha_t x_tilde) / sigma_t``.
        alpha_t, sigma_t: Coefficients at ``t``, [B].
        alpha_next, sigma_next: Coefficients at ``t''``, [B].
    """

    z_t: Tensor
    t: Tensor
    t_mid: Tensor
    t_next: Tensor
    z_mid: Tensor
    z_next: Tensor
    x_target: Tensor
    eps_target: Tensor
    alpha_t: Tensor
    sigma_t: Tensor
    alpha_next: Tensor
    sigma_next: Tensor


@dataclass
class DistillationOutput:
    """Everything one progressive-distillation step computed (all tensors, no host syncs).

    Attributes:
        loss: Batch-mean student loss under the chosen weighting (scalar, differentiable).
        loss_per_sample: The same per example, [B].
        t: Student times per sample, [B]; ``t_mid`` (``t'``) and ``t_next`` (``t''``) follow.
        t_mid: Teacher's intermediate time ``t' = grid(2N)[2k-1]``.
        t_next: ``t'' = grid(N)[k-1]``, where the student's single step lands.
        z_t: Noisy input ``alpha_t x + sigma_t eps``.
        z_mid: Teacher's first half-step result ``z_t'``.
        z_next: Teacher's two-step result ``z_t''``.
        x_target: ``x_tilde``; ``eps_target``: ``eps_tilde``.
        student_output: The student's raw output (its own prediction type).
        x_pred: Student ``x_hat`` (differentiable); ``eps_pred``: student ``eps_hat``.
        alpha_t, sigma_t: Coefficients at ``t``.
    """

    loss: Tensor
    loss_per_sample: Tensor
    t: Tensor
    t_mid: Tensor
    t_next: Tensor
    z_t: Tensor
    z_mid: Tensor
    z_next: Tensor
    x_target: Tensor
    eps_target: Tensor
    student_output: Tensor
    x_pred: Tensor
    eps_pred: Tensor
    alpha_t: Tensor
    sigma_t: Tensor


def _model_time(t: Tensor, dtype: torch.dtype) -> Tensor:
    # Networks are conditioned on float32 times unless the whole step runs in float64.
    return t if dtype == torch.float64 else t.to(torch.float32)


class ProgressiveDistiller:
    """Distil a teacher DDIM sampler with ``2N`` steps into a student with ``N`` steps.

    Times come from the schedule's nested grids (:meth:`~kdiff.NoiseSchedule.grid`): for a data
    batch ``x``, draw a student step ``k ~ U{1..N}`` per sample and set ``t = grid(N)[k]``,
    ``t' = grid(2N)[2k-1]``, ``t'' = grid(N)[k-1]`` (on a uniform grid ``t' = t - t_max/(2N)``
    and ``t'' = t - t_max/N``); ``z_t = alpha_t x + sigma_t eps``; the teacher takes DDIM steps
    ``t -> t' -> t''`` without gradient; the target is

        ``x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)``

    and the student is trained at ``(z_t, t)`` towards it. Calling the distiller runs the whole
    step; :meth:`target` alone gives the teacher side for a custom student loss.

    Args:
        teacher: ``teacher(z_t, t, **model_kwargs)``; called under ``torch.no_grad``. Its output
            must have the shape of ``z_t`` (wrap a learned-variance network to return its first
            C channels).
        student: ``student(z_t, t, **model_kwargs)``, trained; output shaped like ``z_t``.
        schedule: The noise schedule (continuous or discrete); its grids must be nested
            (``grid(2N)[2k] == grid(N)[k]``).
        num_student_steps: ``N``, a positive int; ``schedule.check_num_steps`` must accept both
            ``N`` and ``2N`` (a uniform discrete grid needs ``2N | T``, a trailing one ``2N <= T``).
        teacher_prediction: What the teacher outputs: "x", "eps" or "v" (or diffusers' names).
            Required: a wrong type runs silently with the wrong conversion.
        student_prediction: What the student outputs: "x", "eps" or "v"; required.
        weighting: ``"auto"`` (default) or a weighting of :func:`kdiff.functional.pd_loss`:
            "truncated_snr" (the paper's), "snr_plus_one", "x_mse" or "eps_mse". ``"auto"`` is
            "truncated_snr" for x- and v-students and "eps_mse" for eps-students, whose eps error
            "truncated_snr" would weigh by ``1/SNR`` at high noise (an explicit "truncated_snr",
            "snr_plus_one" or "x_mse" with an eps-student warns); see
            :func:`kdiff.functional.resolve_weighting`. The resolved name is :attr:`weighting`.
        clip_teacher_x: Clip the teacher's ``x_hat`` to [-1, 1] in its half-steps (off in PD);
            the same clipping as ``ddim_step(..., clip_x=True)``.
        impl: How calling the distiller computes the target and the loss: ``"auto"`` (default),
            ``"torch"`` or ``"triton"``, resolved per call by :func:`kdiff.ops.resolve_impl` on
            ``x``. On the Triton path the teacher still runs at ``(z_t, t)`` and, after the first
            half-step in torch, at ``(z_t', t')``; :func:`kdiff.ops.pd_target_loss` then fuses the
            second half-step, ``x_tilde``/``eps_tilde`` and the weighted loss, and ``z_t''`` is
            recovered as ``alpha_t'' x_tilde + sigma_t'' eps_tilde``. ``"auto"`` takes it for CUDA
            tensors (not float64, not under ``torch.compile``) and the torch path everywhere
            else, CPU included; ``"triton"`` raises a ``ValueError`` where the kernel cannot run.
            :meth:`target` always runs the torch path (it has no loss to fuse).

    Raises:
        ValueError: On a step count the schedule refuses, grids that are not nested, or a bad
            prediction type, weighting or ``impl``.

    Example:
        >>> import torch
        >>> from kdiff import CosineSchedule, ProgressiveDistiller
        >>> teacher = lambda z, t: 0.5 * z        # any callable works
        >>> student = torch.nn.Conv2d(3, 3, 1)
        >>> pd = ProgressiveDistiller(teacher, lambda z, t: student(z), CosineSchedule(), 4,
        ...                           teacher_prediction="x", student_prediction="v")
        >>> out = pd(torch.randn(8, 3, 8, 8), generator=torch.Generator().manual_seed(0))
        >>> out.loss.backward()
        >>> pd.weighting
        'truncated_snr'
        >>> half = pd.next_round()               # 4 -> 2 steps, the student becomes the teacher
        >>> half.num_student_steps, half.teacher_prediction
        (2, 'v')
    """

    def __init__(
        self,
        teacher: Model,
        student: Model,
        schedule: NoiseSchedule,
        num_student_steps: int,
        *,
        teacher_prediction: str,
        student_prediction: str,
        weighting: str = "auto",
        clip_teacher_x: bool = False,
        impl: str = "auto",
    ) -> None:
        if not callable(teacher):
            raise TypeError(f"teacher must be callable; got {type(teacher).__name__}")
        if not callable(student):
            raise TypeError(f"student must be callable; got {type(student).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a kdiff NoiseSchedule; got {type(schedule).__name__}")
        schedule.check_num_steps(num_student_steps, name="num_student_steps")
        # The teacher samples with 2N steps on the same schedule.
        schedule.check_num_steps(2 * num_student_steps, name="2 * num_student_steps (teacher steps)")
        check_bool("clip_teacher_x", clip_teacher_x)
        check_choice("impl", impl, IMPLS)
        self.teacher = teacher
        self.student = student
        self.schedule = schedule
        self.num_student_steps = num_student_steps
        self.teacher_prediction = normalize_prediction_type(teacher_prediction, name="teacher_prediction")
        self.student_prediction = normalize_prediction_type(student_prediction, name="student_prediction")
        #: The :func:`~kdiff.functional.pd_loss` weighting in use (``"auto"`` resolved).
        self.weighting = resolve_weighting(weighting, self.student_prediction, stacklevel=3)
        self._requested_weighting = weighting
        self.clip_teacher_x = clip_teacher_x
        self.impl = impl
        self._grid = schedule.grid(num_student_steps).to(torch.float64).cpu()
        self._teacher_grid = schedule.grid(2 * num_student_steps).to(torch.float64).cpu()
        self._check_grids()
        # Times within this distance of a grid point are on it (float32 rounding of t, not a step).
        self._grid_tol = 1e-3 * float(self._grid.diff().min())
        self._grids_on: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    def _check_grids(self) -> None:
        n, grid, teacher = self.num_student_steps, self._grid, self._teacher_grid
        if grid.shape != (n + 1,) or teacher.shape != (2 * n + 1,):
            raise ValueError(
                f"schedule.grid must return N + 1 times; got {tuple(grid.shape)} for N={n} and "
                f"{tuple(teacher.shape)} for 2N={2 * n}"
            )
        if not bool((teacher.diff() > 0).all()):
            raise ValueError(f"schedule.grid({2 * n}) must be strictly increasing for a {2 * n}-step teacher")
        scale = max(abs(float(self.schedule.t_max)), 1.0)
        if not torch.allclose(teacher[::2], grid, rtol=0, atol=1e-9 * scale):
            raise ValueError(
                f"progressive distillation needs nested grids: schedule.grid({2 * n})[::2] must equal "
                f"schedule.grid({n}) (the student's step t -> t'' spans two teacher steps)"
            )

    @property
    def student_grid(self) -> Tensor:
        """``schedule.grid(N)``: the student's times ``t_0 < ... < t_N`` (float64, a copy)."""
        return self._grid.clone()

    @property
    def teacher_grid(self) -> Tensor:
        """``schedule.grid(2N)``: the teacher's times (float64, a copy); ``[2k-1]`` is ``t'``."""
        return self._teacher_grid.clone()

    def _grids(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # Both grids once per device and dtype, built there (no copy from the host, which would
        # sync): a step only indexes them.
        key = (device, dtype)
        if key not in self._grids_on:
            n = self.num_student_steps
            self._grids_on[key] = (
                self.schedule.grid(n, device=device).to(dtype),
                self.schedule.grid(2 * n, device=device).to(dtype),
            )
        return self._grids_on[key]

    def student_times(self, k: Tensor) -> Tensor:
        """Student times ``t = grid(N)[k]`` for integer steps ``k`` in ``1..N``, float32, on ``k``'s device.

        Example:
            >>> import torch
            >>> from kdiff import DiscreteSchedule, ProgressiveDistiller
            >>> f = lambda z, t: z
            >>> pd = ProgressiveDistiller(f, f, DiscreteSchedule.linear(1000), 3,
            ...                           teacher_prediction="eps", student_prediction="eps")
            >>> pd.student_times(torch.tensor([1, 2, 3])).tolist()
            [333.0, 667.0, 1000.0]
        """
        check_tensor("k", k)
        if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
            raise TypeError(f"k must be an integer tensor of student steps; got {k.dtype}")
        if value_checks_enabled(k) and k.numel() > 0:
            lo, hi = int(k.min()), int(k.max())
            if lo < 1 or hi > self.num_student_steps:
                raise ValueError(f"k must lie in 1..{self.num_student_steps}; got values in [{lo}, {hi}]")
        return self._grids(k.device, torch.float32)[0][k.long()]

    def sample_times(
        self, batch_size: int, *, device: torch.device | str | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw student times ``t = grid(N)[k]`` with ``k ~ U{1..N}``, float32 [B]."""
        k = torch.randint(1, self.num_student_steps + 1, (batch_size,), generator=generator, device=device)
        return self._grids(k.device, torch.float32)[0][k]

    def sample_noise(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``eps ~ N(0, I)`` shaped like ``x``, with its dtype and device."""
        check_tensor("x", x)
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def target(
        self,
        x: Tensor,
        t: Tensor,
        noise: Tensor,
        *,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> DistillationTarget:
        """The teacher side of a step: ``z_t``, the teacher's half-steps and ``x_tilde``/``eps_tilde``.

        Everything but ``z_t`` is computed under ``torch.no_grad``; pair the result with any
        student loss (the student sees ``(z_t, t)``).

        Args:
            x: Clean data, [B, ...] (e.g. images in [-1, 1]).
            t: Student times per sample, [B], on the student's grid ``schedule.grid(N)[1:]``
                (:meth:`sample_times`, :meth:`student_times`).
            noise: ``eps`` shaped like ``x`` (:meth:`sample_noise`).
            model_kwargs: Passed to the teacher (e.g. ``{"y": labels}``).

        Returns:
            :class:`DistillationTarget`.

        Example:
            >>> import torch
            >>> from kdiff import DiscreteSchedule, ProgressiveDistiller
            >>> student = torch.nn.Conv2d(3, 3, 1)
            >>> pd = ProgressiveDistiller(lambda z, t: 0.5 * z, lambda z, t: student(z), DiscreteSchedule.cosine(64), 4,
            ...                           teacher_prediction="x", student_prediction="x")
            >>> x, g = torch.rand(8, 3, 8, 8) * 2 - 1, torch.Generator().manual_seed(0)
            >>> tgt = pd.target(x, pd.sample_times(8, generator=g), pd.sample_noise(x, generator=g))
            >>> loss = (student(tgt.z_t) - tgt.x_target).abs().mean()   # any student loss
            >>> loss.backward()
            >>> tgt.x_target.requires_grad, tuple(tgt.t_next.shape)
            (False, (8,))
        """
        self._check_x(x)
        self._check_t(t, x.shape[0])
        self._check_noise(noise, x)
        return self._target(x, t, noise, self._kwargs(model_kwargs))

    def __call__(
        self,
        x: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> DistillationOutput:
        """One distillation step's forward pass for data batch ``x``.

        Draws what is not given (:meth:`sample_times`, then :meth:`sample_noise`), computes the
        target (:meth:`target`), runs the student at ``(z_t, t)`` and weighs its error with
        :func:`kdiff.functional.pd_loss`; on the Triton path (see ``impl``) the part after the
        teacher's network calls is one :func:`kdiff.ops.pd_target_loss` pass with the same results
        up to float32 rounding.

        Args:
            x: Clean data, [B, ...] (e.g. images in [-1, 1]).
            t: Student times per sample, [B], on the student's grid (drawn when omitted).
            noise: ``eps`` shaped like ``x`` (drawn when omitted).
            generator: Random generator for drawing ``t`` and ``noise``; refused when both are
                given (it would draw nothing).
            model_kwargs: Passed to teacher and student (e.g. ``{"y": labels}``).

        Returns:
            :class:`DistillationOutput`; call ``.loss.backward()``.
        """
        self._check_x(x)
        kwargs = self._kwargs(model_kwargs)
        if generator is not None and t is not None and noise is not None:
            raise ValueError("generator is unused when both t and noise are given; pass one or the other")
        if t is None:
            t = self.sample_times(x.shape[0], device=x.device, generator=generator)
        else:
            self._check_t(t, x.shape[0])
        if noise is None:
            noise = self.sample_noise(x, generator=generator)
        else:
            self._check_noise(noise, x)
        if resolve_impl(self.impl, x, op="ProgressiveDistiller") == "triton":
            return self._fused_call(x, t, noise, kwargs)
        tgt = self._target(x, t, noise, kwargs)
        student_output, x_hat, eps_hat = self._student(tgt.z_t, t, tgt.alpha_t, tgt.sigma_t, x.dtype, kwargs)
        per_sample = pd_loss(x_hat, tgt.x_target, tgt.alpha_t, tgt.sigma_t, weighting=self.weighting, reduction="none")
        return DistillationOutput(
            loss=per_sample.mean(),
            loss_per_sample=per_sample,
            t=tgt.t,
            t_mid=tgt.t_mid,
            t_next=tgt.t_next,
            z_t=tgt.z_t,
            z_mid=tgt.z_mid,
            z_next=tgt.z_next,
            x_target=tgt.x_target,
            eps_target=tgt.eps_target,
            student_output=student_output,
            x_pred=x_hat,
            eps_pred=eps_hat,
            alpha_t=tgt.alpha_t,
            sigma_t=tgt.sigma_t,
        )

    def __repr__(self) -> str:
        return (
            f"ProgressiveDistiller(num_student_steps={self.num_student_steps}, "
            f"teacher_prediction={self.teacher_prediction!r}, student_prediction={self.student_prediction!r}, "
            f"weighting={self.weighting!r}, clip_teacher_x={self.clip_teacher_x}, impl={self.impl!r})"
        )

    # ------------------------------------------------------------------ internals
    def _step_index(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(k, |t - grid(N)[k]|)`` for the nearest student grid point, in ``t``'s float dtype."""
        dtype = t.dtype if t.is_floating_point() else torch.float32
        grid = self._grids(t.device, dtype)[0]
        dist, k = (t.to(dtype).unsqueeze(-1) - grid).abs().min(-1)
        return k, dist

    def _mid_next(self, t: Tensor) -> tuple[Tensor, Tensor]:
        # A gather on the cached grids: no host sync. k >= 1 is checked (when value checks are
        # on); the clamp keeps t = t_0 from wrapping around to t_max when they are off.
        k = self._step_index(t)[0].clamp_min(1)
        dtype = t.dtype if t.is_floating_point() else torch.float32
        grid, teacher = self._grids(t.device, dtype)
        return teacher[2 * k - 1], grid[k - 1]

    def _times(self, t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        """``(t', t'', (alpha_t, sigma_t, alpha_t', sigma_t', alpha_t'', sigma_t''))``."""
        t_mid, t_next = self._mid_next(t)
        a_t, s_t = self.schedule.alpha_sigma(t, dtype=dtype)
        a_m, s_m = self.schedule.alpha_sigma(t_mid, dtype=dtype, name="t_mid")
        a_n, s_n = self.schedule.alpha_sigma(t_next, dtype=dtype, name="t_next")
        return t_mid, t_next, (a_t, s_t, a_m, s_m, a_n, s_n)

    def _student(
        self, z_t: Tensor, t: Tensor, a_t: Tensor, s_t: Tensor, dtype: torch.dtype, kwargs: Mapping[str, Any]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The student's raw output at ``(z_t, t)`` and its ``(x_hat, eps_hat)`` in ``dtype`` (``x``'s)."""
        output = check_model_output("student output", self.student(z_t, _model_time(t, dtype), **kwargs), z_t.shape)
        x_hat, eps_hat = to_x_eps(output.to(dtype), z_t, a_t, s_t, self.student_prediction)
        return output, x_hat, eps_hat

    def _fused_call(self, x: Tensor, t: Tensor, noise: Tensor, kwargs: Mapping[str, Any]) -> DistillationOutput:
        # The teacher's second call needs z_t', so the first half-step stays in torch; the rest of
        # the chain, the target and the loss are one pd_target_loss pass.
        t_mid, t_next, (a_t, s_t, a_m, s_m, a_n, s_n) = self._times(t, x.dtype)
        z_t = add_noise(x, noise, a_t, s_t)
        with torch.no_grad():
            out_t = self._teacher_output(z_t, t, kwargs)
            z_mid = self._ddim(out_t, z_t, a_t, s_t, a_m, s_m)
            out_mid = self._teacher_output(z_mid, t_mid, kwargs)
        student_output, x_hat, eps_hat = self._student(z_t, t, a_t, s_t, x.dtype, kwargs)
        fused = pd_target_loss(
            x_hat, z_t, out_t, out_mid, a_t, s_t, a_m, s_m, a_n, s_n,
            teacher_prediction=self.teacher_prediction, clip_x=self.clip_teacher_x,
            weighting=self.weighting, reduction="none", impl="triton",
        )
        with torch.no_grad():
            # One DDIM step t -> t'' from the target lands on the teacher's z_t'' (pd_target).
            z_next = ddim_update(fused.x_tilde, fused.eps_tilde, a_n, s_n)
        return DistillationOutput(
            loss=fused.loss.mean(),
            loss_per_sample=fused.loss,
            t=t,
            t_mid=t_mid,
            t_next=t_next,
            z_t=z_t,
            z_mid=z_mid,
            z_next=z_next,
            x_target=fused.x_tilde,
            eps_target=fused.eps_tilde,
            student_output=student_output,
            x_pred=x_hat,
            eps_pred=eps_hat,
            alpha_t=a_t,
            sigma_t=s_t,
        )

    def _target(self, x: Tensor, t: Tensor, noise: Tensor, kwargs: Mapping[str, Any]) -> DistillationTarget:
        t_mid, t_next, (a_t, s_t, a_m, s_m, a_n, s_n) = self._times(t, x.dtype)
        # Outside no_grad: z_t keeps a gradient to x when x has one (the student's input).
        z_t = add_noise(x, noise, a_t, s_t)
        with torch.no_grad():
            z_mid = self._teacher_step(z_t, t, a_t, s_t, a_m, s_m, kwargs)
            z_next = self._teacher_step(z_mid, t_mid, a_m, s_m, a_n, s_n, kwargs)
            x_tilde, eps_tilde = pd_target(z_t, z_next, a_t, s_t, a_n, s_n)
        return DistillationTarget(
            z_t=z_t,
            t=t,
            t_mid=t_mid,
            t_next=t_next,
            z_mid=z_mid,
            z_next=z_next,
            x_target=x_tilde,
            eps_target=eps_tilde,
            alpha_t=a_t,
            sigma_t=s_t,
            alpha_next=a_n,
            sigma_next=s_n,
        )

    def _teacher_output(self, z: Tensor, t: Tensor, kwargs: Mapping[str, Any]) -> Tensor:
        out = check_model_output("teacher output", self.teacher(z, _model_time(t, z.dtype), **kwargs), z.shape)
        return out.to(z.dtype)

    def _ddim(self, out: Tensor, z: Tensor, alpha_t: Tensor, sigma_t: Tensor, alpha_s: Tensor, sigma_s: Tensor) -> Tensor:
        """The teacher's DDIM step ``z_t -> z_s`` from its output ``out`` at ``(z, t)``."""
        z_s, _, _ = ddim_step_coeffs(
            out, z, alpha_t, sigma_t, alpha_s, sigma_s,
            prediction_type=self.teacher_prediction, clip_x=self.clip_teacher_x,
        )
        return z_s

    def _teacher_step(self, z: Tensor, t: Tensor, alpha_t: Tensor, sigma_t: Tensor,
                      alpha_s: Tensor, sigma_s: Tensor, kwargs: Mapping[str, Any]) -> Tensor:
        return self._ddim(self._teacher_output(z, t, kwargs), z, alpha_t, sigma_t, alpha_s, sigma_s)

    @staticmethod
    def _kwargs(model_kwargs: Mapping[str, Any] | None) -> Mapping[str, Any]:
        if model_kwargs is None:
            return {}
        if not isinstance(model_kwargs, Mapping):
            raise TypeError(f"model_kwargs must be a mapping or None; got {type(model_kwargs).__name__}")
        return model_kwargs

    @staticmethod
    def _check_x(x: Tensor) -> None:
        check_tensor("x", x)
        if x.ndim < 2 or not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor of shape [B, ...]; got {x.dtype} {tuple(x.shape)}")
        check_finite("x", x)

    def _check_t(self, t: Tensor, batch: int) -> None:
        check_tensor("t", t)
        check_batch("t", t, batch)
        self._check_on_grid(t)

    @staticmethod
    def _check_noise(noise: Tensor, x: Tensor) -> None:
        check_tensor("noise", noise)
        check_same_shape("noise", noise, "x", x)
        check_finite("noise", noise)

    def _check_on_grid(self, t: Tensor) -> None:
        self.schedule.check_times(t)
        if value_checks_enabled(t) and t.numel() > 0:
            k, dist = self._step_index(t.double())
            if not bool((dist <= self._grid_tol).all()) or int(k.min()) < 1:
                n = self.num_student_steps
                points = self._grid[1:].tolist()
                shown = ", ".join(f"{p:g}" for p in points) if n <= 8 else (
                    ", ".join(f"{p:g}" for p in points[:3]) + f", ..., {points[-1]:g}"
                )
                raise ValueError(
                    f"t must lie on the student's grid schedule.grid({n})[k] with k in 1..{n}: "
                    f"[{shown}] (pd.student_times(k) maps steps to times)"
                )

    def next_round(
        self, student: Model | None = None, *, student_prediction: str | None = None
    ) -> ProgressiveDistiller:
        """The next PD round: ``N -> N/2``, this student becomes the teacher.

        Args:
            student: The new student; defaults to a deep copy of the current student (its
                weights are the usual initialisation of the next round). The current student,
                now the teacher, is put in eval mode with gradients off when it is a module.
            student_prediction: The new student's output type (default: the current student's,
                which is also the new teacher's). The weighting asked for here (e.g. ``"auto"``) is
                resolved again for it.

        Raises:
            ValueError: If ``N`` is odd (it cannot halve).
        """
        if self.num_student_steps % 2:
            raise ValueError(
                f"num_student_steps={self.num_student_steps} is odd and cannot halve; "
                "the last round is the 1-step student"
            )
        teacher = self.student
        if student is None:
            student = copy.deepcopy(teacher)
        if isinstance(teacher, torch.nn.Module):
            teacher.eval().requires_grad_(False)
        return ProgressiveDistiller(
            teacher,
            student,
            self.schedule,
            self.num_student_steps // 2,
            # The current student is the next teacher, so its type carries over.
            teacher_prediction=self.student_prediction,
            student_prediction=self.student_prediction if student_prediction is None else student_prediction,
            weighting=self._requested_weighting,
            clip_teacher_x=self.clip_teacher_x,
            impl=self.impl,
        )
