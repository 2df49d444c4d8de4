"""One whole distillation training step without host syncs: :class:`DistillationStep`.

A step is ``t, eps`` drawn -> teacher half-steps (no gradient) -> student forward -> PD or CFD
loss -> backward -> optional gradient clipping -> optimizer step. Nothing in it reads a tensor's
value on the host (no ``.item()``, no ``bool(tensor)``, no data-dependent Python branch or shape),
so an accelerator never waits for the Python side, and the forward traces into one
``torch.compile`` graph (``fullgraph=True``); its backward is compiled with it.

kdiff's value checks (times on the grid, finite inputs) read values on the host: they run for CPU
tensors, on other devices only after ``kdiff.set_value_checks(True)``, and never while
``torch.compile`` traces. On a CPU they are a few dozen operations on [B]-sized tensors and two
min/max passes over ``x`` and ``eps``, small next to the networks.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._validation import check_bool, check_finite_number, check_tensor
from .distill import ProgressiveDistiller
from .losses import CFDLoss

__all__ = [
    "DistillationStep",
    "DistillationStepOutput",
    "native_bf16",
    "resolve_autocast_dtype",
    "resolve_channels_last",
]

# CPU flags of native bfloat16 arithmetic (x86: AVX512-BF16 dot products, AMX tiles). Without them
# oneDNN emulates bf16 and a bf16 step is slower than float32.
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpu_has_native_bf16() -> bool:
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        if any(p() for p in probes if p is not None):
            return True
    except (RuntimeError, AttributeError):  # probes are private: fall through to /proc/cpuinfo
        pass
    if sys.platform.startswith("linux"):
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        for line in text.splitlines():
            if line.startswith("flags"):
                return bool(_CPU_BF16_FLAGS & set(line.split(":", 1)[-1].split()))
    return False


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bfloat16 natively (so bf16 autocast speeds a step up).

    CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)`` (Ampere and newer). CPU:
    the AVX512-BF16 or AMX instruction sets (read from torch's CPU probes, else the flags
    ``avx512_bf16``/``amx_bf16`` of ``/proc/cpuinfo`` on Linux); elsewhere bf16 is emulated and
    slower than float32. Other devices: False.

    Example:
        >>> from kdiff.train_step import native_bf16
        >>> native_bf16("meta")
        False
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch < 2.3 has no including_emulation
            return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return _cpu_has_native_bf16()
    return False


def resolve_autocast_dtype(autocast_dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype a step on ``device`` uses: ``torch.bfloat16`` or None (float32).

    Args:
        autocast_dtype: ``"auto"`` (bf16 where :func:`native_bf16`, else float32), ``"bfloat16"``
            / ``torch.bfloat16`` (always), or ``None`` / ``"float32"`` / ``torch.float32`` (off).
        device: The device of the data.

    Raises:
        ValueError: Any other value (float16 needs a gradient scaler, which the step does not run).

    Example:
        >>> from kdiff.train_step import resolve_autocast_dtype
        >>> resolve_autocast_dtype("float32", "cpu") is None
        True
    """
    if autocast_dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if autocast_dtype in ("bfloat16", torch.bfloat16):
        return torch.bfloat16
    if autocast_dtype in (None, "float32", torch.float32):
        return None
    raise ValueError(
        "autocast_dtype must be 'auto', 'bfloat16' (or torch.bfloat16), or None / 'float32' "
        f"(or torch.float32); got {autocast_dtype!r} (float16 needs a gradient scaler, which "
        "this step does not run)"
    )


def resolve_channels_last(channels_last: bool | str, device: torch.device | str) -> bool:
    """Whether a step on ``device`` runs in ``channels_last`` memory format.

    Args:
        channels_last: ``"auto"`` (on for CUDA, off elsewhere), or True/False (as given).
        device: The device of the data.

    Raises:
        ValueError: Any other value.

    ``"auto"`` is off on CPUs: on an AVX512-BF16 CPU without AMX, oneDNN ran a bf16 UNet training
    step markedly slower in channels_last than in the default layout.

    Example:
        >>> from kdiff.train_step import resolve_channels_last
        >>> resolve_channels_last("auto", "cpu"), resolve_channels_last(True, "cpu")
        (False, True)
    """
    if channels_last == "auto":
        return torch.device(device).type == "cuda"
    if isinstance(channels_last, bool):
        return channels_last
    raise ValueError(f"channels_last must be True, False or 'auto'; got {channels_last!r}")


@dataclass
class DistillationStepOutput:
    """The terms of one training step, as detached tensors (reading one is the only host sync).

    Attributes:
        loss: The objective that was minimised: ``L_PD`` without CFD, else the CFD total
            ``L_feat + beta L_data`` (+ ``pixel_weight L_PD`` when the CFD loss has one).
        pd_loss: ``L_PD``, the weighted pixel loss against ``x_tilde`` (always computed; cheap).
        feature_loss: ``L_feat`` (None without CFD).
        data_loss: ``L_data = gamma H + (1 - gamma) Dv`` (None without CFD).
        entropy: ``H`` (None without CFD).
        diversity: ``Dv`` (None without CFD).
        grad_norm: Total gradient norm before clipping (None without ``grad_clip``).
        t: The student times the step used, [B].
    """

    loss: Tensor
    pd_loss: Tensor
    feature_loss: Tensor | None
    data_loss: Tensor | None
    entropy: Tensor | None
    diversity: Tensor | None
    grad_norm: Tensor | None
    t: Tensor


def _to_channels_last(module: object) -> None:
    if isinstance(module, nn.Module):
        module.to(memory_format=torch.channels_last)


class DistillationStep:
    """A sync-free PD or CFD training step: forward, backward, clipping and optimizer step.

    Per call, for data ``x``: draw ``t = grid(N)[k]``, ``k ~ U{1..N}`` and ``eps ~ N(0, I)``
    (unless given); run the distiller (teacher DDIM half-steps ``t -> t' -> t''`` under
    ``torch.no_grad``, target ``x_tilde``, student ``x_hat`` at ``(z_t, t)``); the loss is the PD
    loss, or with ``cfd`` the paper's ``L = L_feat + beta L_data`` through the frozen classifier
    (its teacher-side pass ``f_T = f(x_tilde)`` also without gradient, so nothing of the teacher
    is kept for backward); then ``loss.backward()``, ``clip_grad_norm_`` and ``optimizer.step()``.
    Gradients are set to None before the forward pass and left in ``.grad`` after the step.

    The random draws run eagerly (a ``generator`` cannot enter a compiled graph); everything from
    ``z_t`` to the loss is the compiled region when ``compile=True``. Dropout inside that region
    draws from Inductor's own random stream, so compiled and eager steps agree only without it.

    Args:
        distiller: The :class:`~kdiff.ProgressiveDistiller` (teacher, student, schedule, ``N``).
        optimizer: Optimizer of the student's parameters; its ``param_groups`` are what
            ``grad_clip`` clips. ``torch.optim.Adam(..., fused=True)`` runs the update as one
            kernel (CUDA and CPU); the default forms are sync-free too.
        cfd: A :class:`~kdiff.CFDLoss` to train by CFD; None (default) trains by the PD loss.
        grad_clip: Max total gradient norm (finite, > 0), or None for no clipping (paper: 1).
        autocast_dtype: ``"auto"`` (default): bfloat16 autocast where the device computes bf16
            natively (CUDA Ampere+, CPUs with AVX512-BF16/AMX; see :func:`native_bf16`), float32
            elsewhere (emulated bf16 is slower than float32 on such CPUs). ``"bfloat16"`` forces
            it, ``None``/``"float32"`` turns it off. Losses are computed in float32 either way.
        channels_last: ``"auto"`` (default): on for CUDA, off elsewhere (see
            :func:`resolve_channels_last`); True/False force it. When on, ``x`` is fed in
            ``channels_last`` memory format and the distiller's teacher and student (when they
            are modules) and the CFD classifier are converted to it in place: at construction
            for True, at the first call on a CUDA device for ``"auto"``. Modules wrapped in
            other callables are yours to convert.
        compile: Compile the forward pass (distiller and loss) with
            ``torch.compile(fullgraph=True)``: any graph break is an error rather than a silent
            slowdown. The compiled function is built at the first call, whose device fixes the
            layout: where ``channels_last`` is off on a CPU, Inductor's own switch to
            channels_last for convolutions (``layout_optimization``) is turned off too, unless
            ``compile_options`` sets ``mode``, ``options`` or another ``backend``. The first
            call pays the compilation (minutes on a CPU for a UNet and a classifier).
        compile_options: Extra keyword arguments for ``torch.compile`` (e.g. ``{"mode":
            "max-autotune"}``).

    Raises:
        TypeError: ``distiller``, ``optimizer`` or ``cfd`` of the wrong type.
        ValueError: A bad ``grad_clip``, ``autocast_dtype``, ``channels_last`` or ``compile``.

    Defaults: bf16 autocast where the device computes bf16 natively, channels_last on CUDA only,
    eager (``compile=False``). On a CPU with AVX512-BF16 that is the fastest eager configuration
    measured; whether ``compile=True`` pays off there depends on the networks
    (``benchmarks/bench_step.py`` measures both).

    Example:
        >>> import torch
        >>> from kdiff import CFDLoss, ClassifierTransform, DiscreteSchedule, ProgressiveDistiller
        >>> from kdiff.models import SmallCNN, UNet, UNetConfig
        >>> from kdiff.train_step import DistillationStep
        >>> _ = torch.manual_seed(0)
        >>> cfg = UNetConfig.tiny(ch=8, ch_mult=(1, 2), attn_resolutions=())
        >>> teacher, student = UNet(cfg).eval().requires_grad_(False), UNet(cfg)
        >>> pd = ProgressiveDistiller(teacher, student, DiscreteSchedule.cosine(64), 4,
        ...                           teacher_prediction="x", student_prediction="x")
        >>> cfd = CFDLoss(SmallCNN(width=8), temperature=0.95, beta=0.003, gamma=0.75)
        >>> step = DistillationStep(pd, cfd=cfd, optimizer=torch.optim.Adam(student.parameters(), lr=5e-5),
        ...                         grad_clip=1.0, autocast_dtype=None)
        >>> out = step(torch.rand(4, 3, 16, 16) * 2 - 1, generator=torch.Generator().manual_seed(0))
        >>> out.loss.shape, out.feature_loss is not None, out.grad_norm is not None
        (torch.Size([]), True, True)
    """

    def __init__(
        self,
        distiller: ProgressiveDistiller,
        *,
        optimizer: torch.optim.Optimizer,
        cfd: CFDLoss | None = None,
        grad_clip: float | None = None,
        autocast_dtype: str | torch.dtype | None = "auto",
        channels_last: bool | str = "auto",
        compile: bool = False,
        compile_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(distiller, ProgressiveDistiller):
            raise TypeError(f"distiller must be a kdiff.ProgressiveDistiller; got {type(distiller).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if cfd is not None and not isinstance(cfd, CFDLoss):
            raise TypeError(f"cfd must be a kdiff.CFDLoss or None; got {type(cfd).__name__}")
        if grad_clip is not None:
            check_finite_number("grad_clip", grad_clip)
            if not grad_clip > 0:
                raise ValueError(f"grad_clip must be a finite number > 0 or None; got {grad_clip!r}")
        resolve_autocast_dtype(autocast_dtype, "cpu")  # validates the value; resolved per device later
        resolve_channels_last(channels_last, "cpu")  # likewise
        check_bool("compile", compile)
        if compile_options is not None and not isinstance(compile_options, Mapping):
            raise TypeError(f"compile_options must be a mapping or None; got {type(compile_options).__name__}")
        self.distiller = distiller
        self.optimizer = optimizer
        self.cfd = cfd
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.compile = compile
        self.compile_options = dict(compile_options or {})
        self._converted = False
        if channels_last is True:
            self._convert_to_channels_last()
        self._compiled: Callable[..., tuple[Tensor | None, ...]] | None = None

    def _convert_to_channels_last(self) -> None:
        if not self._converted:
            for module in (self.distiller.teacher, self.distiller.student, self.cfd):
                _to_channels_last(module)
            self._converted = True

    def _compile_kwargs(self, channels_last: bool, device: torch.device) -> dict[str, Any]:
        kwargs = dict(self.compile_options)
        user_set = "mode" in kwargs or "options" in kwargs or kwargs.get("backend", "inductor") != "inductor"
        if device.type == "cpu" and not channels_last and not user_set:
            # Inductor puts every convolution on a CPU in channels_last (its layout_optimization),
            # which is what channels_last=False avoids.
            kwargs["options"] = {"layout_optimization": False}
        return kwargs

    def _forward_fn(self, x: Tensor, t: Tensor) -> Callable[..., tuple[Tensor | None, ...]]:
        if not self.compile:
            return self._forward_eager
        if self._compiled is None:
            self._build_device_tables(x, t)
            kwargs = self._compile_kwargs(self.resolved_channels_last(x.device), x.device)
            self._compiled = torch.compile(self._forward_eager, fullgraph=True, **kwargs)
        return self._compiled

    def _build_device_tables(self, x: Tensor, t: Tensor) -> None:
        # The schedule's alpha/sigma table and the distiller's grids are built on a device at
        # their first use. Built inside the first trace, the graph would be guarded on their
        # absence and compiled a second time at the next call: build them eagerly first.
        with torch.no_grad():
            self.distiller.schedule.alpha_sigma(t, dtype=x.dtype)
            self.distiller.student_times(torch.ones(1, dtype=torch.long, device=t.device))

    @property
    def trained_parameters(self) -> list[Tensor]:
        """The parameters the optimizer updates (and ``grad_clip`` clips)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        noise: Tensor,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[Tensor | None, ...]:
        """The forward pass alone (compiled when ``compile=True``), without backward or update.

        Returns ``(loss, pd_loss, feature_loss, data_loss, entropy, diversity)``; the last four
        are None without CFD. ``loss`` carries the graph for ``backward()``.
        """
        forward = self._forward_fn(x, t)
        return forward(x, t, noise, model_kwargs, self.resolved_autocast_dtype(x.device))

    def resolved_autocast_dtype(self, device: torch.device | str) -> torch.dtype | None:
        """The autocast dtype of a step on ``device`` (None: float32), see :func:`resolve_autocast_dtype`."""
        return resolve_autocast_dtype(self.autocast_dtype, device)

    def resolved_channels_last(self, device: torch.device | str) -> bool:
        """Whether a step on ``device`` runs in channels_last, see :func:`resolve_channels_last`."""
        return resolve_channels_last(self.channels_last, device)

    def _forward_eager(
        self,
        x: Tensor,
        t: Tensor,
        noise: Tensor,
        model_kwargs: Mapping[str, Any] | None,
        amp_dtype: torch.dtype | None,
    ) -> tuple[Tensor | None, ...]:
        # amp_dtype is resolved outside: the compiled graph sees a constant, not a CPU probe.
        amp = contextlib.nullcontext() if amp_dtype is None else torch.autocast(x.device.type, dtype=amp_dtype)
        with amp:
            out = self.distiller(x, t=t, noise=noise, model_kwargs=model_kwargs)
            if self.cfd is None:
                return out.loss, out.loss, None, None, None, None
            # The PD loss enters the CFD objective only with the CFD loss's own pixel weight.
            pixel = out.loss if self.cfd.pixel_weight > 0 else None
            terms = self.cfd(out.x_pred, out.x_target, pixel_loss=pixel)
        return terms.loss, out.loss, terms.feature_loss, terms.data_loss, terms.entropy, terms.diversity

    def __call__(
        self,
        x: Tensor,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> DistillationStepOutput:
        """One training step on data batch ``x`` ([B, C, H, W] in [-1, 1]).

        Args:
            x: Clean data, [B, ...].
            t: Student times per sample, [B], on the student's grid (drawn when omitted).
            noise: ``eps`` shaped like ``x`` (drawn when omitted).
            generator: Random generator for drawing ``t`` and ``noise``.
            model_kwargs: Passed to teacher and student (e.g. ``{"y": labels}``).

        Returns:
            :class:`DistillationStepOutput` of detached tensors.
        """
        check_tensor("x", x)
        if x.ndim < 2 or not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor of shape [B, ...]; got {x.dtype} {tuple(x.shape)}")
        if generator is not None and t is not None and noise is not None:
            raise ValueError("generator is unused when both t and noise are given; pass one or the other")
        if t is None:
            t = self.distiller.sample_times(x.shape[0], device=x.device, generator=generator)
        if noise is None:
            noise = self.distiller.sample_noise(x, generator=generator)
        if x.ndim == 4 and self.resolved_channels_last(x.device):
            self._convert_to_channels_last()
            x = x.contiguous(memory_format=torch.channels_last)
            noise = noise.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        loss, pd_loss, feat, data, entropy, diversity = self.forward(x, t, noise, model_kwargs)
        assert loss is not None and pd_loss is not None
        loss.backward()
        grad_norm = None
        if self.grad_clip is not None:
            # error_if_nonfinite would read the norm on the host: the clip stays on the device.
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trained_parameters, self.grad_clip)
        self.optimizer.step()

        def detach(v: Tensor | None) -> Tensor | None:
            return None if v is None else v.detach()

        return DistillationStepOutput(
            loss=loss.detach(),
            pd_loss=pd_loss.detach(),
            feature_loss=detach(feat),
            data_loss=detach(data),
            entropy=detach(entropy),
            diversity=detach(diversity),
            grad_norm=grad_norm,
            t=t,
        )

    def __repr__(self) -> str:
        return (
            f"DistillationStep(cfd={self.cfd is not None}, grad_clip={self.grad_clip}, "
            f"autocast_dtype={self.autocast_dtype!r}, channels_last={self.channels_last!r}, "
            f"compile={self.compile})"
        )
