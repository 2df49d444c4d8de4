"""Reference training loops: teacher, classifier, and PD/CFD distillation rounds.

Usable from Python (``train_teacher(TeacherConfig.tiny())``) and from the command line
(``kdiff-train {teacher,classifier,distill} --help``, or ``python -m kdiff.recipes.cli``). Every
loop runs unchanged under ``torchrun --nproc_per_node=K``, checkpoints atomically and resumes
exactly. See ``docs/training.md``.

Importing this package imports torch and kdiff only; tqdm, safetensors and tensorboard are
imported when a loop needs them.
"""

from .classifier import evaluate_classifier, load_classifier, train_classifier
from .config import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ClassifierConfig,
    DistillConfig,
    TeacherConfig,
    TrainConfig,
)
from .distill import check_teacher, load_unet, train_distill
from .engine import (
    IndexStream,
    ModelEMA,
    Runtime,
    Trainer,
    latest_checkpoint,
    lr_at,
    per_process_batch,
    save_image_grid,
    setup_runtime,
)
from .teacher import train_teacher

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "ClassifierConfig",
    "DistillConfig",
    "IndexStream",
    "ModelEMA",
    "Runtime",
    "TeacherConfig",
    "TrainConfig",
    "Trainer",
    "check_teacher",
    "evaluate_classifier",
    "latest_checkpoint",
    "load_classifier",
    "load_unet",
    "lr_at",
    "per_process_batch",
    "save_image_grid",
    "setup_runtime",
    "train_classifier",
    "train_distill",
    "train_teacher",
]
