"""Classifier training for CFD: cross-entropy with SGD, step decay, crop/flip/Cutout.

The classifier sees images through :class:`kdiff.ClassifierTransform` with the config's
``mean``/``std`` (images in [-1, 1] are mapped to [0, 1] and normalised). The checkpoint's
metadata records that transform, so :func:`load_classifier` (used by the CFD rounds) feeds
generated images exactly as training images were fed (pitfall 3 of the reference code).

Example:
    >>> from kdiff.recipes import ClassifierConfig, train_classifier
    >>> path = train_classifier(ClassifierConfig.tiny(out_dir="/tmp/kd_clf"))  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiff.classifier import ClassifierTransform
from kdiff.io import CheckpointError, load_state_dict_strict, load_weights
from kdiff.models import build_classifier

from .config import ClassifierConfig
from .engine import StepHook, Trainer, load_image_data, setup_runtime

__all__ = ["train_classifier", "load_classifier", "evaluate_classifier"]


def _build(config: ClassifierConfig) -> tuple[nn.Module, dict[str, Any]]:
    kwargs: dict[str, Any] = {"num_classes": config.num_classes}
    if config.arch == "small_cnn":
        kwargs["width"] = config.width
    return build_classifier(config.arch, **kwargs), {"arch": config.arch, "kwargs": kwargs}


def _augment(trainer: Trainer, x: Tensor, g: torch.Generator, config: ClassifierConfig) -> Tensor:
    """Random crop (zero padding) and Cutout, drawn for the global batch; ``x`` in [-1, 1].

    The crop pads with black (-1) and takes an ``H x W`` window at a random offset per image;
    Cutout fills a ``cutout x cutout`` square centred at a random pixel (clipped at the border)
    with mid-grey (0).
    """
    b, c, h, w = x.shape
    if config.crop_padding:
        p = config.crop_padding
        off = trainer.draw_randint(g, 0, 2 * p + 1, 2)
        padded = F.pad(x, (p, p, p, p), value=-1.0)
        rows = (off[:, 0:1] + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * p)
        x = padded.gather(2, rows)
        cols = (off[:, 1:2] + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
        x = x.gather(3, cols)
    if config.cutout:
        centre = trainer.draw_randint(g, 0, min(h, w), 2)
        half = config.cutout // 2
        yy = torch.arange(h, device=x.device).view(1, h, 1)
        xx = torch.arange(w, device=x.device).view(1, 1, w)
        cy, cx = centre[:, 0].view(-1, 1, 1), centre[:, 1].view(-1, 1, 1)
        rows_in = (yy >= cy - half) & (yy < cy - half + config.cutout)
        cols_in = (xx >= cx - half) & (xx < cx - half + config.cutout)
        x = x.masked_fill((rows_in & cols_in).unsqueeze(1), 0.0)
    return x


@torch.no_grad()
def evaluate_classifier(model: nn.Module, transform: ClassifierTransform, data: Any, *,
                        limit: int, batch_size: int = 500) -> float:
    """Top-1 accuracy on the first ``limit`` images of ``data`` (an ``ImageData``)."""
    from kdiff.data import to_model_range

    was_training = model.training
    model.eval()
    n = min(limit, len(data))
    correct = torch.zeros((), dtype=torch.int64, device=data.labels.device)
    for start in range(0, n, batch_size):
        x = to_model_range(data.images[start : start + batch_size][: n - start])
        logits = model(transform(x))[0]
        correct += (logits.argmax(1) == data.labels[start : start + x.shape[0]]).sum()
    model.train(was_training)
    return float(correct) / max(n, 1)


def train_classifier(config: ClassifierConfig, *, hooks: list[StepHook] | None = None) -> Path:
    """Train a classifier and return the path of its weights (``out_dir/classifier.safetensors``).

    Runs unchanged under ``torchrun``. On CUDA, BatchNorm becomes SyncBatchNorm when ``sync_bn``,
    so its statistics cover the global batch; on CPU (gloo) they stay per process (a warning says so). Resumes from ``out_dir`` like every loop.

    Args:
        config: All hyper-parameters (see :class:`ClassifierConfig`).
        hooks: Called as ``hook(step)`` after every update.

    Returns:
        Path of the weights; its metadata records the architecture, the input transform
        (``mean``/``std``) and the test accuracy.
    """
    if not isinstance(config, ClassifierConfig):
        raise TypeError(f"config must be a ClassifierConfig; got {type(config).__name__}")
    rt = setup_runtime(config.device)
    data = load_image_data(config, rt.device)
    torch.manual_seed(config.seed)
    model, model_meta = _build(config)
    if rt.distributed and config.sync_bn and rt.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif rt.distributed and rt.is_main:
        warnings.warn("BatchNorm statistics are computed per process (SyncBatchNorm needs CUDA"
                      + ("" if config.sync_bn else " and sync_bn=True") + "): with K processes each "
                      "normalises over batch_size / K images", stacklevel=2)
    model = model.to(rt.device)
    torch.manual_seed(config.seed + 1 + rt.rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    transform = ClassifierTransform(mean=config.mean, std=config.std)
    metadata = {
        "kind": "classifier",
        "model": model_meta,
        "transform": {"mean": list(config.mean), "std": list(config.std)},
        "num_classes": config.num_classes,
    }
    out_dir = Path(config.out_dir)
    trainer = Trainer(config, rt, name="classifier", model=model, optimizer=optimizer, data=data,
                      total_steps=config.steps, out_dir=out_dir, metadata=metadata,
                      ema_decay=config.ema_decay, hooks=hooks)

    def compute_loss(step: int) -> tuple[Tensor, dict[str, Tensor]]:
        batch = trainer.batch(step)
        x = _augment(trainer, batch.x, batch.generator, config)
        with trainer.autocast():
            logits, _ = trainer.net(transform(x))
        loss = F.cross_entropy(logits.float(), batch.y)
        acc = (logits.detach().argmax(1) == batch.y).float().mean()
        return loss, {"accuracy": acc}

    trainer.fit(compute_loss)
    extra: dict[str, Any] = {}
    if config.eval_samples and rt.is_main:
        test = load_image_data(config, rt.device, train=False)
        module = trainer.eval_model
        extra["test_accuracy"] = evaluate_classifier(module, transform, test, limit=config.eval_samples)
        extra["test_samples"] = min(config.eval_samples, len(test))
        with open(out_dir / "metrics.jsonl", "a") as f:
            import json

            f.write(json.dumps({"step": trainer.step, "event": "eval", **extra}) + "\n")
    final = trainer.save_final(out_dir / "classifier.safetensors", extra)
    return final


def load_classifier(path: str | Path, *, device: torch.device | str = "cpu") -> tuple[nn.Module, ClassifierTransform, dict[str, Any]]:
    """Load a classifier written by :func:`train_classifier`.

    Returns:
        ``(model, transform, metadata)``: the model in eval mode with frozen parameters, its
        input transform (from the metadata), and the metadata.

    Raises:
        CheckpointError: The file is missing or corrupt, or is not a classifier checkpoint.
    """
    sd, meta = load_weights(path, expected={"kind": "classifier"}, map_location=device)
    try:
        arch, kwargs = meta["model"]["arch"], dict(meta["model"]["kwargs"])
        transform = ClassifierTransform(mean=meta["transform"]["mean"], std=meta["transform"]["std"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"Classifier checkpoint {path} has no valid model/transform metadata ({e})") from None
    model = build_classifier(arch, **kwargs)
    sd = {k.replace("module.", "", 1) if k.startswith("module.") else k: v for k, v in sd.items()}
    load_state_dict_strict(model, sd, path)
    return model.to(device).eval().requires_grad_(False), transform, meta
