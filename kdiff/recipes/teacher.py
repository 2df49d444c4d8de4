"""Teacher (base diffusion model) training: x-prediction with the truncated-SNR loss.

For a batch of images ``x``: draw ``t`` uniformly (integer indices ``1..T`` on a discrete
schedule, ``(0, 1]`` on a continuous one) and ``eps ~ N(0, I)``, form
``z_t = alpha_t x + sigma_t eps``, convert the network output to ``x_hat`` and minimise
``kdiff.functional.pd_loss(x_hat, x, alpha_t, sigma_t, weighting="truncated_snr")``, i.e.
``max(SNR, 1) * mean (x_hat - x)^2`` per example. Adam with linear warmup, grad clipping and an
EMA of the weights; the EMA weights are the teacher (``out_dir/teacher.safetensors``).

Example:
    >>> from kdiff.recipes import TeacherConfig, train_teacher
    >>> path = train_teacher(TeacherConfig.tiny(out_dir="/tmp/kd_teacher"))  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdiff.functional import add_noise, pd_loss
from kdiff.models import UNet
from kdiff.parameterization import to_x_eps
from kdiff.sampling import ddim_sample
from kdiff.schedules import schedule_from_dict

from .config import TeacherConfig
from .engine import StepHook, Trainer, fixed_noise, load_image_data, setup_runtime

__all__ = ["train_teacher", "unet_metadata"]


def unet_metadata(model: UNet) -> dict[str, Any]:
    """The ``model`` entry of a UNet checkpoint's metadata (rebuilds the architecture)."""
    return {"arch": "unet", "config": model.config.to_dict()}


def train_teacher(config: TeacherConfig, *, hooks: list[StepHook] | None = None) -> Path:
    """Train a teacher and return the path of its EMA weights (``out_dir/teacher.safetensors``).

    Runs unchanged under ``torchrun --nproc_per_node=K``. Resumes from the latest checkpoint in
    ``config.out_dir`` when there is one (and ``config.resume``).

    Args:
        config: All hyper-parameters (see :class:`TeacherConfig`).
        hooks: Called as ``hook(step)`` after every update (after any checkpoint of that step).

    Returns:
        Path of the final weights; their metadata holds the schedule, prediction type,
        step count, config and library version.
    """
    if not isinstance(config, TeacherConfig):
        raise TypeError(f"config must be a TeacherConfig; got {type(config).__name__}")
    rt = setup_runtime(config.device)
    schedule = schedule_from_dict(config.schedule)
    data = load_image_data(config, rt.device)
    torch.manual_seed(config.seed)
    model = UNet(config.unet).to(rt.device)
    torch.manual_seed(config.seed + 1 + rt.rank)  # dropout differs per process
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, eps=config.adam_eps)
    out_dir = Path(config.out_dir)
    metadata = {
        "kind": "teacher",
        "method": "diffusion",
        "model": unet_metadata(model),
        "schedule": schedule.to_dict(),
        "prediction_type": config.prediction_type,
        "num_steps": None,
        "round": 0,
    }
    trainer = Trainer(
        config, rt, name="teacher", model=model, optimizer=optimizer, data=data,
        total_steps=config.steps, out_dir=out_dir, metadata=metadata,
        ema_decay=config.ema_decay, hooks=hooks,
    )
    t_max = schedule.t_max

    def compute_loss(step: int) -> tuple[Tensor, dict[str, Tensor]]:
        batch = trainer.batch(step)
        g = batch.generator
        if schedule.is_discrete:
            t = trainer.draw_randint(g, 1, int(t_max) + 1).to(torch.float32)
        else:
            t = (1.0 - trainer.draw_rand(g)) * t_max  # (0, t_max]
        eps = trainer.draw_randn(g, *batch.x.shape[1:])
        alpha, sigma = schedule.alpha_sigma(t, dtype=torch.float32)
        z_t = add_noise(batch.x, eps, alpha, sigma)
        with trainer.autocast():
            out = trainer.net(z_t, t)
        x_hat, _ = to_x_eps(out.float(), z_t, alpha, sigma, config.prediction_type)
        loss = pd_loss(x_hat, batch.x, alpha, sigma, weighting=config.weighting)
        return loss, {}

    noise = fixed_noise(config, (config.num_samples, config.unet.in_channels, config.unet.image_size, config.unet.image_size), rt.device)

    def sample() -> Tensor:
        return ddim_sample(trainer.eval_model, noise, config.sample_steps, schedule=schedule,
                           prediction_type=config.prediction_type, clip_x=True)

    trainer.fit(compute_loss, sample=sample)
    return trainer.save_final(out_dir / "teacher.safetensors")
