"""Distillation rounds ``N -> N/2``: progressive distillation (PD) and CFD.

Each round trains a student with ``N`` DDIM steps to match, in one step, two DDIM steps of the
teacher (:class:`kdiff.ProgressiveDistiller` computes the target ``x_tilde``). With
``method="pd"`` the loss is the truncated-SNR pixel loss; with ``method="cfd"`` it is
:class:`kdiff.CFDLoss` through a frozen classifier: ``KL(softmax(f_T / tau) || softmax(f_S)) +
beta * (gamma * H + (1 - gamma) * Dv)`` (+ ``pixel_weight`` times the PD loss), the diversity
term over the global batch under torchrun. The student starts from the teacher's weights, and
every round gets a fresh Adam optimizer with the lr cosine-annealed to 0 (the paper's settings).

Outputs: ``out_dir/steps_<N>/`` per round (checkpoints, metrics, samples,
``student.safetensors``) and ``out_dir/student.safetensors``, the last round's student.

Example:
    >>> from kdiff.recipes import DistillConfig, train_distill
    >>> cfg = DistillConfig.tiny(teacher="runs/teacher_tiny/teacher.safetensors",
    ...                          out_dir="/tmp/kd_pd")
    >>> path = train_distill(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdiff.distill import ProgressiveDistiller
from kdiff.io import (
    RESERVED_KEYS,
    CheckpointError,
    load_state_dict_strict,
    load_weights,
    save_weights,
)
from kdiff.losses import CFDLoss
from kdiff.models import UNet, UNetConfig
from kdiff.sampling import ddim_sample
from kdiff.schedules import NoiseSchedule, schedule_from_dict

from .classifier import load_classifier
from .config import DistillConfig
from .engine import (
    Runtime,
    StepHook,
    Trainer,
    fixed_noise,
    load_image_data,
    setup_runtime,
)
from .teacher import unet_metadata

__all__ = ["train_distill", "load_unet", "check_teacher"]


def check_teacher(path: str | Path, schedule: NoiseSchedule, teacher_steps: int) -> dict[str, Any]:
    """Read a teacher's metadata and refuse one that does not fit the round.

    Raises:
        CheckpointError: Missing/corrupt file, another schedule, not a UNet, or a distilled
            student whose step count is not ``teacher_steps``. The message names the file.
    """
    _, meta = load_weights(path, expected={"schedule": schedule.to_dict()})
    model = meta.get("model")
    if not isinstance(model, dict) or model.get("arch") != "unet" or "config" not in model:
        raise CheckpointError(f"Teacher checkpoint {path} does not describe a kdiff UNet (metadata 'model')")
    if meta.get("prediction_type") not in ("x", "eps", "v"):
        raise CheckpointError(f"Teacher checkpoint {path} has no valid 'prediction_type'")
    steps = meta.get("num_steps")
    if steps is not None and steps != teacher_steps:
        raise CheckpointError(
            f"Teacher checkpoint {path} is a {steps}-step student but teacher_steps={teacher_steps}; "
            f"set teacher_steps={steps} (and final_steps accordingly)"
        )
    return meta


def load_unet(path: str | Path, *, device: torch.device | str = "cpu", expected: dict[str, Any] | None = None,
              **config_overrides: Any) -> tuple[UNet, dict[str, Any]]:
    """Build a UNet from a checkpoint written by the teacher or distillation loops.

    Args:
        path: The ``.safetensors`` file.
        device: Where to put the model.
        expected: Metadata that must match (see :func:`kdiff.io.load_weights`).
        **config_overrides: UNetConfig fields to change (e.g. ``dropout=0.0``).

    Returns:
        ``(model, metadata)``.
    """
    sd, meta = load_weights(path, expected=expected, map_location=device)
    try:
        cfg = UNetConfig.from_dict(meta["model"]["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"Checkpoint {path} has no valid UNet config in its metadata ({e})") from None
    model = UNet(dataclasses.replace(cfg, **config_overrides)).to(device)
    load_state_dict_strict(model, sd, path)
    return model, meta


def train_distill(config: DistillConfig, *, hooks: list[StepHook] | None = None) -> Path:
    """Run the distillation rounds ``teacher_steps -> ... -> final_steps``.

    Everything that can be checked is checked before the first update: the teacher checkpoint
    (readable, same schedule, step count), the classifier for CFD, the data. Rounds already
    finished in ``out_dir`` are not retrained; an interrupted round resumes exactly.

    Args:
        config: All hyper-parameters (see :class:`DistillConfig`).
        hooks: Called as ``hook(step)`` after every update of every round.

    Returns:
        Path of the final student (``out_dir/student.safetensors``).
    """
    if not isinstance(config, DistillConfig):
        raise TypeError(f"config must be a DistillConfig; got {type(config).__name__}")
    if not config.teacher:
        raise ValueError("teacher is required: the path of a teacher checkpoint (.safetensors)")
    schedule = schedule_from_dict(config.schedule)
    check_teacher(config.teacher, schedule, config.teacher_steps)
    if config.method == "cfd":
        assert config.classifier is not None
        load_classifier(config.classifier)
    rt = setup_runtime(config.device)
    data = load_image_data(config, rt.device)
    out_dir = Path(config.out_dir)
    teacher_path = Path(config.teacher)
    final = teacher_path
    for n in config.student_steps:
        final = _round(config, rt, schedule, data, teacher_path, n, out_dir / f"steps_{n:04d}", hooks)
        teacher_path = final
    result = out_dir / "student.safetensors"
    if rt.is_main:
        sd, meta = load_weights(final)
        save_weights(result, sd, {k: v for k, v in meta.items() if k not in RESERVED_KEYS})
    rt.barrier()
    return result


def _round(config: DistillConfig, rt: Runtime, schedule: NoiseSchedule, data: Any, teacher_path: Path,
           n: int, out_dir: Path, hooks: list[StepHook] | None) -> Path:
    """One round: a ``2n``-step teacher into an ``n``-step student; returns the student's path."""
    meta = check_teacher(teacher_path, schedule, 2 * n)
    teacher, _ = load_unet(teacher_path, device=rt.device)
    teacher.eval().requires_grad_(False)
    torch.manual_seed(config.seed)
    student, _ = load_unet(teacher_path, device=rt.device, dropout=config.dropout)
    torch.manual_seed(config.seed + 1 + rt.rank)
    optimizer = torch.optim.Adam(student.parameters(), lr=config.lr, eps=config.adam_eps)
    metadata = {
        "kind": "student",
        "method": config.method,
        "model": unet_metadata(student),
        "schedule": schedule.to_dict(),
        "prediction_type": "x",
        "num_steps": n,
        "round": int(meta.get("round", 0)) + 1,
        "teacher": str(teacher_path),
        "teacher_sha256": meta.get("weights_sha256"),
    }
    steps = config.round_steps(n)
    trainer = Trainer(config, rt, name=f"{config.method} {2 * n}->{n}", model=student, optimizer=optimizer,
                      data=data, total_steps=steps, out_dir=out_dir, metadata=metadata, ema_decay=config.ema_decay,
                      hooks=hooks)
    distiller = ProgressiveDistiller(teacher, trainer.net, schedule, n, teacher_prediction=meta["prediction_type"],
                                     student_prediction="x", weighting=config.weighting)
    cfd: CFDLoss | None = None
    if config.method == "cfd":
        assert config.classifier is not None
        clf, transform, _ = load_classifier(config.classifier, device=rt.device)
        cfd = CFDLoss(clf, temperature=config.temperature, beta=config.beta, gamma=config.gamma,
                      pixel_weight=config.pixel_weight, sync_global=config.sync_global and rt.distributed,
                      transform=transform).to(rt.device)

    def compute_loss(step: int) -> tuple[Tensor, dict[str, Tensor]]:
        batch = trainer.batch(step)
        g = batch.generator
        t = distiller.student_times(trainer.draw_randint(g, 1, n + 1))
        noise = trainer.draw_randn(g, *batch.x.shape[1:])
        with trainer.autocast():
            out = distiller(batch.x, t=t, noise=noise)
            if cfd is None:
                return out.loss, {}
            terms = cfd(out.x_pred.float(), out.x_target.float(),
                        pixel_loss=out.loss if config.pixel_weight > 0 else None)
        return terms.loss, {
            "feature_loss": terms.feature_loss,
            "data_loss": terms.data_loss,
            "entropy": terms.entropy,
            "diversity": terms.diversity,
            "pd_loss": out.loss.detach(),
        }

    size = student.config.image_size
    noise = fixed_noise(config, (config.num_samples, student.config.in_channels, size, size), rt.device)

    def sample() -> Tensor:
        return ddim_sample(student, noise, n, schedule=schedule, prediction_type="x", clip_x=True)

    trainer.fit(compute_loss, sample=sample)
    return trainer.save_final(out_dir / "student.safetensors")
