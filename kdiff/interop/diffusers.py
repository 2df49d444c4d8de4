"""diffusers teachers and students: a ``UNet2DModel`` + scheduler config <-> kdiff's model, schedule
and prediction type, and an exported ``DDIMPipeline`` folder for a distilled student.

The time mapping (docs/interop.md): a diffusers scheduler of ``T = num_train_timesteps`` steps
becomes a :class:`kdiff.DiscreteSchedule` with kdiff times ``0..T``, ``t = 0`` the clean image
(``alphabar = 1``) and ``t = j + 1`` the UNet's timestep ``j``; :meth:`DiscreteSchedule.model_time`
does that mapping and :class:`DiffusersModel` applies it, so samplers and the distiller only ever
see kdiff time. ``diffusers`` itself is imported only by :func:`export_ddim_pipeline`
(``pip install 'kdiff[diffusers]'``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .._validation import check_bool
from ..parameterization import normalize_prediction_type
from ..schedules import BETA_SCHEDULES, DiscreteSchedule, NoiseSchedule

__all__ = [
    "DiffusersModel",
    "DiffusersTeacher",
    "ddim_sample_kwargs",
    "export_ddim_pipeline",
    "from_diffusers",
    "prediction_type_from_diffusers",
    "schedule_from_diffusers",
]

_MIN_VERSION = (0, 30)
_FROM_DIFFUSERS = {"epsilon": "eps", "sample": "x", "v_prediction": "v"}
_TO_DIFFUSERS = {v: k for k, v in _FROM_DIFFUSERS.items()}
# DDIMScheduler's defaults for the sampling keys, used when a config dict leaves one out (as
# diffusers itself does when it loads such a config).
_DDIM_DEFAULTS = {
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "thresholding": False,
    "timestep_spacing": "leading",
}
EXPORT_INFO = "kdiff_export.json"


def _import_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            "kdiff.interop.diffusers needs the diffusers package: pip install 'kdiff[diffusers]'"
        ) from e
    version = tuple(int(p) for p in diffusers.__version__.split(".")[:2] if p.isdigit())
    if version < _MIN_VERSION:
        raise ImportError(
            f"kdiff.interop.diffusers needs diffusers>={'.'.join(map(str, _MIN_VERSION))}; "
            f"found {diffusers.__version__}"
        )
    return diffusers


def _config(scheduler_or_config: Any, name: str = "scheduler_or_config") -> dict[str, Any]:
    cfg = getattr(scheduler_or_config, "config", scheduler_or_config)
    if not isinstance(cfg, Mapping):
        raise TypeError(
            f"{name} must be a diffusers scheduler or its config (a mapping); "
            f"got {type(scheduler_or_config).__name__}"
        )
    cfg = dict(cfg)
    if cfg is not scheduler_or_config and not isinstance(scheduler_or_config, Mapping):
        # A scheduler object's config omits its class name (save_config adds it).
        cfg.setdefault("_class_name", type(scheduler_or_config).__name__)
    return cfg


def _label(cfg: Mapping[str, Any]) -> str:
    return f"the {cfg['_class_name']} config" if cfg.get("_class_name") else "the scheduler config"


def _required(cfg: Mapping[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise ValueError(f"{_label(cfg)} has no {key!r}; kdiff needs it to build the noise schedule")
    return cfg[key]


def schedule_from_diffusers(scheduler_or_config: Any) -> DiscreteSchedule:
    """The kdiff schedule of a diffusers scheduler's training noise table (its betas).

    ``trained_betas`` or ``beta_schedule`` ("linear", "scaled_linear", "squaredcos_cap_v2", with
    ``beta_start``/``beta_end``) over ``num_train_timesteps = T`` steps, computed in float64:
    kdiff times ``0..T``, ``t = 0`` clean, ``model_time(t) = t - 1`` (the UNet's timestep).
    Sampling keys (``timestep_spacing``, ``clip_sample``, ...) do not enter the table.

    Args:
        scheduler_or_config: A diffusers scheduler (``DDPMScheduler``, ``DDIMScheduler``, ...) or
            its config mapping (e.g. a loaded ``scheduler_config.json``).

    Raises:
        ValueError: Naming the key kdiff cannot represent: ``rescale_betas_zero_snr=True`` (an
            infinite final logSNR), ``timestep_type`` other than "discrete", an unknown
            ``beta_schedule``, a ``trained_betas`` table whose length is not ``T``, or a config
            without betas (sigma- or flow-parameterised schedulers).

    Example:
        >>> from kdiff.interop import schedule_from_diffusers
        >>> config = {"num_train_timesteps": 1000, "beta_schedule": "linear",
        ...           "beta_start": 0.0001, "beta_end": 0.02}
        >>> schedule_from_diffusers(config)
        DiscreteSchedule(linear, T=1000)
    """
    cfg = _config(scheduler_or_config)
    if cfg.get("rescale_betas_zero_snr"):
        raise ValueError(
            f"{_label(cfg)} sets rescale_betas_zero_snr=True, which kdiff does not support: a "
            "zero-terminal-SNR table has alphas_cumprod[-1] = 0 (logSNR = -inf at t = T)"
        )
    if cfg.get("timestep_type", "discrete") != "discrete":
        raise ValueError(
            f"{_label(cfg)} sets timestep_type={cfg['timestep_type']!r}; kdiff maps kdiff time to "
            "integer UNet timesteps only (timestep_type='discrete')"
        )
    if cfg.get("trained_betas") is None and cfg.get("beta_schedule") is None:
        raise ValueError(
            f"{_label(cfg)} has neither 'trained_betas' nor 'beta_schedule': kdiff builds "
            "discrete-time teachers from betas. For a sigma-parameterised (EDM, k-diffusion) "
            "teacher use kdiff.LogSNRSchedule with kdiff.interop.from_ve_denoiser"
        )
    T = _required(cfg, "num_train_timesteps")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"num_train_timesteps in {_label(cfg)} must be an int >= 1; got {T!r}")
    if cfg.get("trained_betas") is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=np.float64)
        if betas.shape != (T,):
            raise ValueError(
                f"trained_betas in {_label(cfg)} must hold num_train_timesteps={T} values; "
                f"got shape {betas.shape}"
            )
        return DiscreteSchedule.from_betas(betas)
    beta_schedule = cfg["beta_schedule"]
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"beta_schedule in {_label(cfg)} must be one of {', '.join(map(repr, BETA_SCHEDULES))} "
            f"(or give trained_betas); got {beta_schedule!r}"
        )
    if beta_schedule == "squaredcos_cap_v2":
        # The cosine formula does not use beta_start/beta_end; keep valid placeholders.
        return DiscreteSchedule.from_beta_schedule(beta_schedule, T)
    return DiscreteSchedule.from_beta_schedule(
        beta_schedule,
        T,
        beta_start=float(_required(cfg, "beta_start")),
        beta_end=float(_required(cfg, "beta_end")),
    )


def prediction_type_from_diffusers(scheduler_or_config: Any) -> str:
    """kdiff's prediction type ("eps", "x" or "v") of a scheduler config's ``prediction_type``.

    The legacy ``predict_epsilon`` flag is read when ``prediction_type`` is absent. A config with
    neither is refused rather than assumed to be "epsilon".

    Example:
        >>> from kdiff.interop import prediction_type_from_diffusers
        >>> prediction_type_from_diffusers({"prediction_type": "v_prediction"})
        'v'
    """
    cfg = _config(scheduler_or_config)
    value = cfg.get("prediction_type")
    if value is None and cfg.get("predict_epsilon") is not None:
        value = "epsilon" if cfg["predict_epsilon"] else "sample"
    if value is None:
        raise ValueError(
            f"{_label(cfg)} has no 'prediction_type'; pass prediction_type= with what the network "
            "predicts ('epsilon', 'sample' or 'v_prediction')"
        )
    if value not in _FROM_DIFFUSERS:
        raise ValueError(
            f"prediction_type in {_label(cfg)} must be one of 'epsilon', 'sample', 'v_prediction'; "
            f"got {value!r}"
        )
    return _FROM_DIFFUSERS[value]


class DiffusersModel(nn.Module):
    """A diffusers UNet as a kdiff model: ``forward(z_t, t) = unet(z_t, schedule.model_time(t)).sample``.

    kdiff's samplers and distiller pass kdiff time ``t`` (float, [B]); the UNet receives its own
    timestep ``t - 1`` for a diffusers schedule. The UNet is a submodule, so the wrapper trains,
    saves and deep-copies like it (a student for :class:`kdiff.ProgressiveDistiller`).

    Args:
        unet: A diffusers model called as ``unet(sample, timestep, **kwargs)`` returning an
            object with ``.sample`` (``UNet2DModel``; ``UNet2DConditionModel`` with
            ``encoder_hidden_states`` passed through kwargs).
        schedule: The schedule that gives :meth:`~kdiff.NoiseSchedule.model_time`.
        learned_variance: The UNet outputs ``2C`` channels (mean prediction, then variance, as
            with ``variance_type="learned_range"``); only the first ``C`` are returned.

    Example:
        >>> import torch
        >>> from kdiff import DiscreteSchedule
        >>> from kdiff.interop import DiffusersModel
        >>> seen = []
        >>> class Spy(torch.nn.Module):                 # stands in for a UNet2DModel
        ...     def forward(self, sample, timestep):
        ...         seen.append(timestep.tolist())
        ...         return (sample,)
        >>> model = DiffusersModel(Spy(), DiscreteSchedule.linear(1000))
        >>> _ = model(torch.zeros(2, 3, 8, 8), torch.tensor([1000.0, 1.0]))
        >>> seen
        [[999.0, 0.0]]
    """

    def __init__(self, unet: nn.Module, schedule: NoiseSchedule, *, learned_variance: bool = False) -> None:
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be a torch.nn.Module (a diffusers model); got {type(unet).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a kdiff NoiseSchedule; got {type(schedule).__name__}")
        check_bool("learned_variance", learned_variance)
        self.unet = unet
        self.schedule = schedule
        self.learned_variance = learned_variance

    def forward(self, z_t: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        """The UNet's prediction at kdiff time ``t`` (its first ``C`` channels with a learned variance)."""
        out = self.unet(z_t, self.schedule.model_time(t), **kwargs)
        sample = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, (tuple, list)) else out
        if self.learned_variance:
            sample = sample[:, : z_t.shape[1]]
        return sample

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, learned_variance={self.learned_variance}"


class DiffusersTeacher(NamedTuple):
    """What :func:`from_diffusers` returns; unpacks as ``model, schedule, prediction_type``."""

    model: DiffusersModel
    schedule: DiscreteSchedule
    prediction_type: str


def _unet_channels(unet: nn.Module) -> tuple[int | None, int | None]:
    cfg = getattr(unet, "config", None)
    if not isinstance(cfg, Mapping):
        return None, None
    return cfg.get("in_channels"), cfg.get("out_channels")


def from_diffusers(
    unet: nn.Module, scheduler_or_config: Any, *, prediction_type: str | None = None
) -> DiffusersTeacher:
    """A diffusers UNet and its scheduler as a kdiff ``(model, schedule, prediction_type)``.

    Args:
        unet: The diffusers model (e.g. ``UNet2DModel.from_pretrained("google/ddpm-cifar10-32")``).
        scheduler_or_config: Its scheduler or scheduler config; the betas give the schedule
            (:func:`schedule_from_diffusers`) and ``prediction_type`` the output type.
        prediction_type: What the UNet predicts ("epsilon"/"eps", "sample"/"x",
            "v_prediction"/"v"); by default read from the config, which must then state it.

    Returns:
        :class:`DiffusersTeacher` ``(model, schedule, prediction_type)``: ``model(z_t, t)`` takes
        kdiff time; ``prediction_type`` is kdiff's name ("eps", "x" or "v").

    Raises:
        ValueError: For a config kdiff cannot represent, naming the key (``thresholding=True``,
            see also :func:`schedule_from_diffusers`), or a UNet whose output channels match
            neither its input nor a learned variance (``variance_type`` "learned"/"learned_range").

    Example:
        >>> import torch
        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> from kdiff import ddim_sample
        >>> from kdiff.interop import from_diffusers
        >>> unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
        ...                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        ...                    up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        >>> model, schedule, kind = from_diffusers(unet, DDPMScheduler(num_train_timesteps=1000))
        >>> schedule, kind
        (DiscreteSchedule(linear, T=1000), 'eps')
        >>> ddim_sample(model, torch.randn(1, 3, 8, 8), 4, schedule=schedule, prediction_type=kind).shape
        torch.Size([1, 3, 8, 8])
    """
    cfg = _config(scheduler_or_config)
    if cfg.get("thresholding"):
        raise ValueError(
            f"{_label(cfg)} sets thresholding=True; kdiff's DDIM clips x_hat to [-1, 1] (clip_x) "
            "but has no dynamic thresholding: set thresholding=False to use this teacher"
        )
    schedule = schedule_from_diffusers(cfg)
    if prediction_type is None:
        kind = prediction_type_from_diffusers(cfg)
    else:
        kind = normalize_prediction_type(prediction_type)
    learned = cfg.get("variance_type") in ("learned", "learned_range")
    in_channels, out_channels = _unet_channels(unet)
    if in_channels is not None and out_channels is not None:
        expected = 2 * in_channels if learned else in_channels
        if out_channels != expected:
            raise ValueError(
                f"the UNet outputs out_channels={out_channels} for in_channels={in_channels}, but "
                f"variance_type={cfg.get('variance_type')!r} in {_label(cfg)} needs {expected} "
                "('learned'/'learned_range' variance doubles the channels)"
            )
    return DiffusersTeacher(DiffusersModel(unet, schedule, learned_variance=learned), schedule, kind)


def ddim_sample_kwargs(
    scheduler_or_config: Any, num_inference_steps: int, *, use_clipped_model_output: bool = False
) -> dict[str, Any]:
    """Keyword arguments for :func:`kdiff.ddim_sample` that reproduce a diffusers DDIM run.

    ``ddim_sample(model, noise, **ddim_sample_kwargs(scheduler, N, ...))`` with a
    :class:`DiffusersModel` gives the same images as ``DDIMScheduler`` with ``eta=0`` asked for
    ``N`` steps, before ``DDIMPipeline``'s final ``(x / 2 + 0.5).clamp(0, 1)`` (pass
    ``clip_output=True`` to compare with the pipeline's output).

    Args:
        scheduler_or_config: A ``DDIMScheduler`` or its config.
        num_inference_steps: ``N``.
        use_clipped_model_output: As passed to ``DDIMScheduler.step``/``DDIMPipeline``.

    Returns:
        ``{"num_steps", "schedule", "prediction_type", "clip_x"}``.

    Raises:
        ValueError: Naming the setting kdiff's sampler does not reproduce: ``thresholding=True``;
            ``timestep_spacing`` other than "trailing" (kdiff's grid ends at ``T``, i.e. timestep
            ``T - 1``); ``set_alpha_to_one=False`` (kdiff's DDIM ends at the clean point);
            ``clip_sample_range`` other than 1; ``clip_sample=True`` without
            ``use_clipped_model_output=True`` (kdiff recomputes ``eps_hat`` from the clipped
            ``x_hat``); ``N`` not dividing ``T`` (diffusers' DDIM steps from timestep ``j`` to
            ``j - T // N``, off kdiff's grid unless ``N | T``).
    """
    cfg = {**_DDIM_DEFAULTS, **_config(scheduler_or_config)}
    check_bool("use_clipped_model_output", use_clipped_model_output)
    name = cfg.get("_class_name")
    if name is not None and name != "DDIMScheduler":
        raise ValueError(f"scheduler_or_config must describe a DDIMScheduler; got {name}")
    if cfg["thresholding"]:
        raise ValueError("thresholding=True (dynamic thresholding) has no kdiff equivalent; set it to False")
    if cfg["timestep_spacing"] != "trailing":
        raise ValueError(
            f"timestep_spacing must be 'trailing' to visit kdiff's grid round(k * T / N) "
            f"(timesteps T-1, ...); got {cfg['timestep_spacing']!r}"
        )
    if not cfg["set_alpha_to_one"]:
        raise ValueError(
            "set_alpha_to_one must be True: kdiff's last DDIM step lands on the clean point "
            "alphabar = 1 (t = 0)"
        )
    clip = bool(cfg["clip_sample"])
    if clip and float(cfg["clip_sample_range"]) != 1.0:
        raise ValueError(f"clip_sample_range must be 1.0 (kdiff clips x_hat to [-1, 1]); got {cfg['clip_sample_range']!r}")
    if clip and not use_clipped_model_output:
        raise ValueError(
            "clip_sample=True needs use_clipped_model_output=True: kdiff recomputes eps_hat from "
            "the clipped x_hat, diffusers' default steps with the unclipped eps_hat"
        )
    schedule = schedule_from_diffusers(cfg)
    schedule.check_num_steps(num_inference_steps, name="num_inference_steps")
    T = schedule.num_timesteps
    if T % num_inference_steps:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} must divide num_train_timesteps={T}: "
            f"diffusers' DDIMScheduler steps from timestep j to j - {T} // N, which stays on the "
            f"grid only when N divides T (allowed: {', '.join(str(d) for d in range(1, T + 1) if T % d == 0)})"
        )
    return {
        "num_steps": num_inference_steps,
        "schedule": schedule,
        "prediction_type": prediction_type_from_diffusers(cfg),
        "clip_x": clip,
    }


def _table_config(schedule: DiscreteSchedule) -> dict[str, Any]:
    spec = schedule.to_dict()
    if spec["kind"] == "discrete_betas":
        return {key: spec[key] for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")} | {
            "trained_betas": None
        }
    table = schedule.alphas_cumprod.numpy()
    return {
        "num_train_timesteps": schedule.num_timesteps,
        "beta_schedule": "linear",  # unused when trained_betas is given
        "trained_betas": (1.0 - table[1:] / table[:-1]).tolist(),
    }


def export_ddim_pipeline(
    model: nn.Module,
    folder: str | Path,
    *,
    num_steps: int,
    prediction_type: str,
    schedule: DiscreteSchedule | None = None,
    clip_sample: bool = True,
) -> Path:
    """Save an ``N``-step student as a folder that ``diffusers.DDIMPipeline.from_pretrained`` loads.

    The folder holds ``unet/``, ``scheduler/`` and ``model_index.json`` (plus ``kdiff_export.json``
    with ``N`` and the settings below). The ``DDIMScheduler`` config has the student's table,
    ``prediction_type``, ``timestep_spacing="trailing"``, ``set_alpha_to_one=True``,
    ``steps_offset=0`` and ``clip_sample``. Called with ``num_inference_steps=N``,
    ``use_clipped_model_output=True`` and ``eta=0``, the pipeline visits exactly kdiff's timesteps
    ``grid(N) - 1`` and reproduces ``kdiff.ddim_sample(model, noise, N, clip_x=clip_sample,
    clip_output=True)`` mapped to [0, 1] (see docs/interop.md for the clipping semantics).

    Args:
        model: The student: a :class:`DiffusersModel` or the diffusers model itself.
        folder: Output folder (created; existing files are overwritten).
        num_steps: ``N``, the student's step count; it must divide ``T``.
        prediction_type: The student's output type ("x"/"sample", "eps"/"epsilon", "v"/"v_prediction").
        schedule: The student's schedule (default: ``model.schedule`` of a :class:`DiffusersModel`);
            a DDPM/diffusers table (clean point at ``t = 0``, ``model_time(t) = t - 1``).
        clip_sample: Clip ``x_hat`` to [-1, 1] at each step (kdiff's ``clip_x``).

    Returns:
        The folder's path.

    Raises:
        ValueError: If ``N`` does not divide ``T`` (the allowed counts are listed), the schedule
            is not a DDPM/diffusers table, or the UNet has a learned variance (DDIM cannot use it).
    """
    diffusers = _import_diffusers()
    learned = False
    if isinstance(model, DiffusersModel):
        unet, learned = model.unet, model.learned_variance
        schedule = model.schedule if schedule is None else schedule
    else:
        unet = model
    if not isinstance(unet, diffusers.ModelMixin):
        raise TypeError(
            f"model must be a DiffusersModel or a diffusers model (ModelMixin); got {type(unet).__name__}"
        )
    if schedule is None:
        raise ValueError("schedule is required when model is not a DiffusersModel")
    if (
        not isinstance(schedule, DiscreteSchedule)
        or schedule.model_time_offset != 1
        or float(schedule.alphas_cumprod[0]) != 1.0
    ):
        raise ValueError(
            f"schedule must be a DDPM/diffusers table (DiscreteSchedule.from_betas, "
            f"from_alphas_cumprod, from_beta_schedule, linear, or schedule_from_diffusers) whose "
            f"t = 0 is clean and whose model_time is t - 1, as diffusers' DDIM assumes; got {schedule!r}"
        )
    check_bool("clip_sample", clip_sample)
    kind = normalize_prediction_type(prediction_type)
    in_channels, out_channels = _unet_channels(unet)
    if learned or (in_channels is not None and out_channels != in_channels):
        raise ValueError(
            f"the UNet outputs out_channels={out_channels} for in_channels={in_channels}; "
            "DDIMPipeline needs a UNet without a learned variance (out_channels == in_channels)"
        )
    schedule.check_num_steps(num_steps)
    config = _table_config(schedule) | {
        "prediction_type": _TO_DIFFUSERS[kind],
        "clip_sample": clip_sample,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "thresholding": False,
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": False,
    }
    scheduler = diffusers.DDIMScheduler(**config)
    # Raises for an N that does not divide T; also re-reads the table as diffusers stores it.
    settings = ddim_sample_kwargs(scheduler, num_steps, use_clipped_model_output=True)
    if not torch.allclose(settings["schedule"].alphas_cumprod, schedule.alphas_cumprod, rtol=1e-10, atol=0):
        raise RuntimeError("the exported scheduler config does not reproduce the schedule's table")
    folder = Path(folder)
    diffusers.DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    info = {
        "num_inference_steps": num_steps,
        "use_clipped_model_output": True,
        "eta": 0.0,
        "prediction_type": _TO_DIFFUSERS[kind],
        "clip_sample": clip_sample,
        "schedule": schedule.to_dict(),
    }
    (folder / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return folder
