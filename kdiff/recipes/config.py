"""Typed, documented configurations of the reference training loops.

Each loop has one dataclass holding every hyper-parameter, with the paper's values as the
``paper()`` preset (docs/method.md, section 4) and a ``tiny()`` preset that runs in seconds on a CPU:

* :class:`TeacherConfig`: the base diffusion model (x-prediction, truncated-SNR loss, EMA,
  warmup, grad clip) on the 1024-step discrete cosine schedule.
* :class:`ClassifierConfig`: the frozen classifier CFD distils through (SGD, step decay).
* :class:`DistillConfig`: progressive-distillation rounds ``N -> N/2`` with the pixel PD loss
  (``method="pd"``) or the CFD objective (``method="cfd"``).

Every field's help text lives in its ``metadata["help"]`` (the command line shows it). The
configs are validated on construction (and on :func:`dataclasses.replace`): a bad value raises
``ValueError`` naming the field, before any training starts.

Example:
    >>> from kdiff.recipes import DistillConfig
    >>> cfg = DistillConfig.tiny(teacher="runs/teacher/teacher.safetensors", method="cfd",
    ...                          classifier="runs/clf/classifier.safetensors")
    >>> cfg.round_steps(2) == 2 * cfg.steps   # the 2- and 1-step rounds train twice as long
    True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from kdiff.functional import WEIGHTINGS
from kdiff.models.unet import UNetConfig
from kdiff.parameterization import normalize_prediction_type
from kdiff.schedules import schedule_from_dict

__all__ = [
    "ClassifierConfig",
    "DistillConfig",
    "TeacherConfig",
    "TrainConfig",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "OPERATIONAL_FIELDS",
]

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
"""Per-channel mean of CIFAR-10 training images in [0, 1] (classifier normalisation)."""
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
"""Per-channel std of CIFAR-10 training images in [0, 1]."""

OPERATIONAL_FIELDS: frozenset[str] = frozenset(
    {
        "out_dir",
        "progress",
        "tensorboard",
        "log_every",
        "ckpt_every",
        "keep_checkpoints",
        "sample_every",
        "num_samples",
        "resume",
        "device",
        "compile",
        "data_dir",
    }
)
"""Fields that may differ between a run and its resumption (they do not change the maths)."""

_LR_SCHEDULES = ("constant", "cosine", "step")
_DATASETS = ("cifar10", "synthetic")

C = TypeVar("C", bound="TrainConfig")


def _opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a default and its help text."""
    if isinstance(default, (dict, list, tuple)) or callable(default):
        factory = default if callable(default) else (lambda d=default: type(d)(d))
        return field(default_factory=factory, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _fail(name: str, message: str, value: Any) -> ValueError:
    return ValueError(f"{name} {message}; got {name}={value!r}")


def _check_weighting(value: Any) -> None:
    # The core's list, so a weighting added to kdiff.functional is accepted here at once.
    if value not in WEIGHTINGS:
        raise _fail("weighting", f"must be one of {', '.join(map(repr, WEIGHTINGS))}", value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainConfig:
    """Options shared by every loop (optimisation, data, outputs, hardware).

    ``batch_size`` is the *global* batch: under ``torchrun --nproc_per_node=K`` each process
    takes ``batch_size / K`` samples and the gradients are averaged, so the optimisation is the
    same as one process on the whole batch.
    """

    out_dir: str = _opt("runs/kdiff", "Folder for checkpoints, metrics, samples and the final weights.")
    steps: int = _opt(1000, "Optimizer steps (per round for distillation).")
    batch_size: int = _opt(128, "Global batch size (divided evenly among torchrun processes).")
    lr: float = _opt(2e-4, "Peak learning rate.")
    lr_schedule: str = _opt(
        "constant",
        "Learning-rate schedule after warmup: 'constant', 'cosine' (annealed to 0 at the last "
        "step) or 'step' (divided by 10 at 50%% and 75%% of the steps).",
    )
    warmup_steps: int = _opt(0, "Linear learning-rate warmup steps.")
    adam_eps: float = _opt(1e-8, "Adam epsilon (teacher and distillation loops; the classifier uses SGD).")
    grad_clip: float | None = _opt(1.0, "Clip the global gradient norm to this value ('none': off).")
    ema_decay: float | None = _opt(None, "EMA decay of the weights ('none': no EMA).")
    seed: int = _opt(0, "Seed of model initialisation, data order, noise and times.")
    dataset: str = _opt("cifar10", "'cifar10' (needs the python batches) or 'synthetic' (random images, for tests).")
    data_dir: str | None = _opt(
        None, "Folder holding cifar-10-batches-py (default: $KDIFF_DATA_DIR, then ~/.cache/kdiff/data)."
    )
    random_flip: bool = _opt(True, "Random horizontal flips of training images.")
    log_every: int = _opt(100, "Steps between metric log lines (the only host syncs of the loop).")
    ckpt_every: int = _opt(1000, "Steps between checkpoints (0: only at the end).")
    keep_checkpoints: int = _opt(2, "How many periodic checkpoints to keep.")
    sample_every: int = _opt(0, "Steps between PNG sample grids (0: only at the end; -1: never).")
    num_samples: int = _opt(64, "Images per sample grid.")
    device: str = _opt("auto", "'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:<i>'.")
    mixed_precision: bool = _opt(
        True, "bf16 autocast where the device computes bf16 natively (CUDA Ampere+, CPUs with AVX512-BF16/AMX)."
    )
    channels_last: bool = _opt(True, "channels_last memory format on CUDA (ignored on CPU).")
    compile: bool = _opt(False, "Compile the training forward with torch.compile.")
    progress: bool = _opt(True, "Show a tqdm progress bar (rank 0).")
    tensorboard: bool = _opt(False, "Also log to TensorBoard (when the tensorboard package is installed).")
    resume: bool = _opt(True, "Resume from the latest checkpoint in out_dir when there is one.")

    kind: ClassVar[str] = "train"

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        for name in ("steps", "batch_size", "log_every", "num_samples", "keep_checkpoints"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise _fail(name, "must be a positive int", value)
        for name in ("warmup_steps", "ckpt_every", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise _fail(name, "must be an int >= 0", value)
        if not _is_int(self.sample_every) or self.sample_every < -1:
            raise _fail("sample_every", "must be an int >= -1", self.sample_every)
        if not _is_num(self.lr) or self.lr <= 0:
            raise _fail("lr", "must be a number > 0", self.lr)
        if not _is_num(self.adam_eps) or self.adam_eps <= 0:
            raise _fail("adam_eps", "must be a number > 0", self.adam_eps)
        if self.lr_schedule not in _LR_SCHEDULES:
            raise _fail("lr_schedule", f"must be one of {_LR_SCHEDULES}", self.lr_schedule)
        if self.grad_clip is not None and (not _is_num(self.grad_clip) or self.grad_clip <= 0):
            raise _fail("grad_clip", "must be a number > 0 or None", self.grad_clip)
        if self.ema_decay is not None and (not _is_num(self.ema_decay) or not 0 <= self.ema_decay < 1):
            raise _fail("ema_decay", "must be in [0, 1) or None", self.ema_decay)
        if self.dataset not in _DATASETS:
            raise _fail("dataset", f"must be one of {_DATASETS}", self.dataset)
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            raise _fail("device", "must be 'auto', 'cpu', 'cuda' or 'cuda:<index>'", self.device)
        if not isinstance(self.out_dir, str) or not self.out_dir:
            raise _fail("out_dir", "must be a non-empty path", self.out_dir)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (nested configs become dicts); :meth:`from_dict` inverts it."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build a config from :meth:`to_dict` output.

        Raises:
            ValueError: On unknown keys (listing the allowed ones) or invalid values.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; allowed: {sorted(known)}")
        return cls(**cls._decode(dict(data)))

    @classmethod
    def _decode(cls, data: dict[str, Any]) -> dict[str, Any]:
        return data

    def replace(self: C, **changes: Any) -> C:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def math_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without :data:`OPERATIONAL_FIELDS` (what a resumed run must match).

        ``steps`` is left out too under a constant learning rate, where training longer does not
        change the earlier updates (a finished run can be extended).
        """
        skip = OPERATIONAL_FIELDS | ({"steps"} if self.lr_schedule == "constant" else set())
        return {k: v for k, v in self.to_dict().items() if k not in skip}


@dataclass
class TeacherConfig(TrainConfig):
    """Base diffusion model ("teacher") training.

    The network predicts ``x`` (``prediction_type``) and is trained with the truncated-SNR loss
    ``max(SNR, 1) * ||x_hat - x||^2`` at times drawn uniformly from the schedule. The paper's
    preset: DDPM UNet (ch 128, mult 1,2,2,2, attention at 16x16, 2 res blocks, dropout 0.1),
    1024-step discrete cosine schedule, 800k steps, batch 128, Adam lr 2e-4, warmup 5k,
    EMA 0.9999, grad clip 1.
    """

    unet: UNetConfig = _opt(UNetConfig, "UNet architecture (see kdiff.models.UNetConfig).")
    schedule: dict[str, Any] = _opt(
        {"kind": "discrete_cosine", "num_timesteps": 1024},
        "Noise schedule as a dict for kdiff.schedule_from_dict (JSON on the command line).",
    )
    prediction_type: str = _opt("x", "Network output: 'x', 'eps' or 'v' (diffusers' names are accepted too).")
    weighting: str = _opt("truncated_snr", f"Loss weighting: {', '.join(WEIGHTINGS)}.")
    sample_steps: int = _opt(256, "DDIM steps for the sample grids.")

    kind: ClassVar[str] = "teacher"

    def validate(self) -> None:
        super().validate()
        if isinstance(self.unet, dict):
            self.unet = UNetConfig.from_dict(self.unet)
        if not isinstance(self.unet, UNetConfig):
            raise _fail("unet", "must be a UNetConfig or a dict of its fields", self.unet)
        if self.unet.num_classes is not None:
            raise _fail("unet.num_classes", "must be None: the reference loops train unconditional models",
                        self.unet.num_classes)
        self.schedule = _normalize_schedule(self.schedule)
        # Diffusers' names ("epsilon", ...) are stored as the core's ("eps", ...), so checkpoint
        # metadata and the loss always see one spelling.
        self.prediction_type = normalize_prediction_type(self.prediction_type, name="prediction_type")
        _check_weighting(self.weighting)
        if not _is_int(self.sample_steps) or self.sample_steps < 1:
            raise _fail("sample_steps", "must be a positive int", self.sample_steps)
        try:
            schedule_from_dict(self.schedule).check_num_steps(self.sample_steps, name="sample_steps")
        except ValueError as e:
            raise ValueError(f"sample_steps: {e}") from None

    @classmethod
    def paper(cls, **overrides: Any) -> TeacherConfig:
        """The paper's base-model settings (docs/method.md, section 4)."""
        base: dict[str, Any] = dict(
            out_dir="runs/teacher",
            unet=UNetConfig.paper(),
            steps=800_000,
            batch_size=128,
            lr=2e-4,
            lr_schedule="constant",
            warmup_steps=5000,
            grad_clip=1.0,
            ema_decay=0.9999,
            log_every=100,
            ckpt_every=10_000,
            sample_every=50_000,
            sample_steps=256,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> TeacherConfig:
        """Seconds on a CPU: tiny UNet, small batches, a few dozen steps."""
        base: dict[str, Any] = dict(
            out_dir="runs/teacher_tiny",
            unet=UNetConfig.tiny(),
            steps=40,
            batch_size=16,
            lr=2e-4,
            warmup_steps=10,
            grad_clip=1.0,
            ema_decay=0.9,
            log_every=10,
            ckpt_every=20,
            sample_every=0,
            num_samples=16,
            sample_steps=8,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def _decode(cls, data: dict[str, Any]) -> dict[str, Any]:
        if isinstance(data.get("unet"), dict):
            data["unet"] = UNetConfig.from_dict(data["unet"])
        return data


@dataclass
class ClassifierConfig(TrainConfig):
    """Classifier training for CFD (cross-entropy, SGD with momentum and step decay).

    Images are fed through :class:`kdiff.ClassifierTransform` (``[-1, 1] -> [0, 1]``, then
    ``(x - mean) / std``); the same transform is stored in the checkpoint and reused by CFD, so
    the classifier sees generated images exactly as it saw training images. Augmentation:
    random crop (zero padding), horizontal flip and Cutout (AutoAugment is not included). The
    paper's preset: ResNet-18 (CIFAR stem), 300 epochs at batch 128 (117,300 steps), SGD lr 0.1
    divided by 10 at 50% and 75%, momentum 0.9, weight decay 5e-4.
    """

    arch: str = _opt("resnet18", "Classifier: 'resnet18' or 'small_cnn' (see kdiff.models.build_classifier).")
    width: int = _opt(64, "Base width of 'small_cnn' (ignored for resnet18).")
    num_classes: int = _opt(10, "Number of classes.")
    momentum: float = _opt(0.9, "SGD momentum.")
    weight_decay: float = _opt(5e-4, "SGD weight decay.")
    crop_padding: int = _opt(4, "Zero padding of the random crop (0: no crop).")
    cutout: int = _opt(16, "Side of the Cutout square (0: no Cutout).")
    mean: tuple[float, ...] = _opt(CIFAR10_MEAN, "Normalisation mean per channel (images in [0, 1]).")
    std: tuple[float, ...] = _opt(CIFAR10_STD, "Normalisation std per channel.")
    sync_bn: bool = _opt(True, "Use SyncBatchNorm under torchrun on CUDA (BatchNorm statistics over the global batch).")
    eval_samples: int = _opt(10_000, "Test-split images for the final accuracy (0: skip).")

    kind: ClassVar[str] = "classifier"

    def validate(self) -> None:
        super().validate()
        if self.arch not in ("resnet18", "small_cnn"):
            raise _fail("arch", "must be 'resnet18' or 'small_cnn'", self.arch)
        for name in ("width", "num_classes"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise _fail(name, "must be a positive int", getattr(self, name))
        for name in ("crop_padding", "cutout", "eval_samples"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise _fail(name, "must be an int >= 0", getattr(self, name))
        if not _is_num(self.momentum) or not 0 <= self.momentum < 1:
            raise _fail("momentum", "must be in [0, 1)", self.momentum)
        if not _is_num(self.weight_decay) or self.weight_decay < 0:
            raise _fail("weight_decay", "must be a number >= 0", self.weight_decay)
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise _fail("std", "and mean must have 3 entries, std > 0", (self.mean, self.std))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def paper(cls, **overrides: Any) -> ClassifierConfig:
        """ResNet-18, 300 epochs of CIFAR-10 at batch 128 with SGD (docs/method.md, section 4)."""
        base: dict[str, Any] = dict(
            out_dir="runs/classifier",
            arch="resnet18",
            steps=117_300,
            batch_size=128,
            lr=0.1,
            lr_schedule="step",
            warmup_steps=0,
            grad_clip=None,
            momentum=0.9,
            weight_decay=5e-4,
            log_every=100,
            ckpt_every=5000,
            sample_every=-1,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> ClassifierConfig:
        """A small CNN trained for a few dozen steps on the CPU."""
        base: dict[str, Any] = dict(
            out_dir="runs/classifier_tiny",
            arch="small_cnn",
            width=16,
            steps=40,
            batch_size=32,
            lr=0.05,
            lr_schedule="step",
            grad_clip=None,
            log_every=10,
            ckpt_every=20,
            sample_every=-1,
            eval_samples=1000,
        )
        return cls(**{**base, **overrides})


@dataclass
class DistillConfig(TrainConfig):
    """Progressive distillation rounds ``N -> N/2`` with the PD or the CFD objective.

    A run starts from ``teacher`` (a checkpoint sampling with ``teacher_steps`` DDIM steps) and
    halves the step count round by round until the student has ``final_steps`` steps. Every
    round uses the paper's per-round settings: a fresh Adam optimizer, lr 5e-5 cosine-annealed
    to 0, grad clip 1, no EMA, dropout 0, ``steps`` updates (times ``last_rounds_multiplier``
    for the 2- and 1-step rounds). ``method="pd"`` trains with the truncated-SNR pixel loss;
    ``method="cfd"`` with ``KL(softmax(f_T/tau) || softmax(f_S)) + beta * L_data`` through the
    frozen ``classifier`` (plus ``pixel_weight`` times the PD loss; the paper uses 0).
    """

    teacher: str = _opt("", "Teacher weights (.safetensors from the teacher loop or a previous round).")
    teacher_steps: int = _opt(1024, "DDIM steps of the teacher sampler (2N); must halve down to final_steps.")
    final_steps: int | None = _opt(None, "Steps of the last student (default: teacher_steps / 2, one round).")
    method: str = _opt("pd", "'pd' (pixel loss) or 'cfd' (classifier-based feature distillation).")
    schedule: dict[str, Any] = _opt(
        {"kind": "discrete_cosine", "num_timesteps": 1024},
        "Noise schedule (JSON); the teacher checkpoint must have been trained on the same one.",
    )
    weighting: str = _opt("truncated_snr", f"PD loss weighting: {', '.join(WEIGHTINGS)}.")
    dropout: float = _opt(0.0, "Dropout of the student during the rounds (paper: 0).")
    last_rounds_multiplier: int = _opt(2, "Step multiplier for the rounds with a 2- or 1-step student.")
    classifier: str | None = _opt(None, "Classifier weights (.safetensors from the classifier loop); needed for CFD.")
    temperature: float = _opt(0.95, "CFD temperature tau on the teacher features (ResNet-18: 0.95).")
    beta: float = _opt(0.003, "CFD weight of the dataset-oriented loss (ResNet-18: 0.003).")
    gamma: float = _opt(0.75, "CFD entropy weight inside the dataset-oriented loss (ResNet-18: 0.75).")
    pixel_weight: float = _opt(0.0, "Weight of an added PD pixel loss in CFD rounds (paper: 0).")
    sync_global: bool = _opt(True, "CFD diversity term over the global batch under torchrun.")

    kind: ClassVar[str] = "distill"

    def validate(self) -> None:
        super().validate()
        self.schedule = _normalize_schedule(self.schedule)
        if self.method not in ("pd", "cfd"):
            raise _fail("method", "must be 'pd' or 'cfd'", self.method)
        if not isinstance(self.teacher, str):
            raise _fail("teacher", "must be a path", self.teacher)
        if not _is_int(self.teacher_steps) or self.teacher_steps < 2 or self.teacher_steps % 2:
            raise _fail("teacher_steps", "must be an even int >= 2 (it is halved each round)", self.teacher_steps)
        final = self.final_steps if self.final_steps is not None else self.teacher_steps // 2
        if not _is_int(final) or final < 1:
            raise _fail("final_steps", "must be a positive int", self.final_steps)
        ratio = self.teacher_steps // final if final else 0
        if final >= self.teacher_steps or self.teacher_steps % final or ratio & (ratio - 1):
            raise ValueError(
                f"step counts do not halve: teacher_steps={self.teacher_steps} cannot reach "
                f"final_steps={final} by halving (need teacher_steps = final_steps * 2^k, k >= 1)"
            )
        sched = schedule_from_dict(self.schedule)
        try:
            sched.check_num_steps(self.teacher_steps, name="teacher_steps")
        except ValueError as e:
            raise ValueError(f"teacher_steps: {e}") from None
        _check_weighting(self.weighting)
        if not _is_num(self.dropout) or not 0 <= self.dropout < 1:
            raise _fail("dropout", "must be in [0, 1)", self.dropout)
        if not _is_int(self.last_rounds_multiplier) or self.last_rounds_multiplier < 1:
            raise _fail("last_rounds_multiplier", "must be a positive int", self.last_rounds_multiplier)
        if not _is_num(self.temperature) or self.temperature <= 0:
            raise _fail("temperature", "must be a number > 0", self.temperature)
        if not _is_num(self.beta) or self.beta < 0:
            raise _fail("beta", "must be a number >= 0", self.beta)
        if not _is_num(self.gamma) or not 0 <= self.gamma <= 1:
            raise _fail("gamma", "must be in [0, 1]", self.gamma)
        if not _is_num(self.pixel_weight) or self.pixel_weight < 0:
            raise _fail("pixel_weight", "must be a number >= 0", self.pixel_weight)
        if self.method == "cfd" and not self.classifier:
            raise ValueError(
                "classifier is required for method='cfd': pass the path of a classifier checkpoint "
                "(e.g. classifier=runs/classifier/classifier.safetensors, from the classifier loop)"
            )

    # ------------------------------------------------------------------ rounds
    @property
    def student_steps(self) -> list[int]:
        """Student step counts of the rounds, e.g. ``[512, 256, ..., 1]``."""
        final = self.final_steps if self.final_steps is not None else self.teacher_steps // 2
        out, n = [], self.teacher_steps // 2
        while n >= final:
            out.append(n)
            n //= 2
        return out

    def round_steps(self, student_steps: int) -> int:
        """Optimizer steps of the round whose student has ``student_steps`` steps."""
        return self.steps * (self.last_rounds_multiplier if student_steps <= 2 else 1)

    @classmethod
    def paper(cls, **overrides: Any) -> DistillConfig:
        """Each PD/CFD round as in the paper: 10k steps (2x for the 2- and 1-step rounds), batch
        128, Adam lr 5e-5 cosine-annealed, grad clip 1, no EMA, dropout 0. CFD defaults are the
        ResNet-18 ones (tau 0.95, beta 0.003, gamma 0.75)."""
        base: dict[str, Any] = dict(
            out_dir="runs/distill",
            steps=10_000,
            batch_size=128,
            lr=5e-5,
            lr_schedule="cosine",
            warmup_steps=0,
            grad_clip=1.0,
            ema_decay=None,
            dropout=0.0,
            log_every=100,
            ckpt_every=2000,
            sample_every=0,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> DistillConfig:
        """Two short rounds 8 -> 4 -> 2 on the CPU."""
        base: dict[str, Any] = dict(
            out_dir="runs/distill_tiny",
            teacher_steps=8,
            final_steps=2,
            steps=20,
            batch_size=16,
            lr=5e-5,
            lr_schedule="cosine",
            grad_clip=1.0,
            log_every=5,
            ckpt_every=10,
            sample_every=0,
            num_samples=16,
        )
        return cls(**{**base, **overrides})


def _normalize_schedule(spec: Any) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise _fail("schedule", "must be a dict for kdiff.schedule_from_dict", spec)
    try:
        return schedule_from_dict(spec).to_dict()
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"schedule is not a valid schedule spec ({e}); got schedule={spec!r}") from None
