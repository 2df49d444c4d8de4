"""kdiff: few-step diffusion sampling by progressive and classifier-based feature distillation.

Public API (see ``docs/``):

* schedules: :class:`CosineSchedule`, :class:`LogSNRSchedule`, :class:`DiscreteSchedule`,
  :func:`schedule_from_dict`
* sampling: :class:`DDIMStep`, :func:`ddim_step`, :func:`ddim_sample`
* distillation: :class:`ProgressiveDistiller`
* CFD losses: :class:`ClassifierFeatureLoss`, :class:`DatasetOrientedLoss`, :class:`CFDLoss`,
  through a :class:`FrozenClassifier` with its input :class:`ClassifierTransform`
* pure maths: :mod:`kdiff.functional`, :mod:`kdiff.parameterization`
"""

from ._validation import set_value_checks
from .classifier import ClassifierTransform, FrozenClassifier
from .distill import DistillationOutput, DistillationTarget, ProgressiveDistiller
from .losses import (
    CFDLoss,
    CFDLossOutput,
    ClassifierFeatureLoss,
    DatasetOrientedLoss,
    FeatureLossOutput,
)
from .sampling import DDIMStep, DDIMStepOutput, ddim_sample, ddim_step
from .schedules import (
    CosineSchedule,
    DiscreteSchedule,
    LogSNRSchedule,
    NoiseSchedule,
    schedule_from_dict,
)

__version__ = "0.1.0"

__all__ = [
    "CFDLoss",
    "CFDLossOutput",
    "ClassifierFeatureLoss",
    "ClassifierTransform",
    "CosineSchedule",
    "DDIMStep",
    "DDIMStepOutput",
    "DatasetOrientedLoss",
    "DiscreteSchedule",
    "DistillationOutput",
    "DistillationTarget",
    "FeatureLossOutput",
    "FrozenClassifier",
    "LogSNRSchedule",
    "NoiseSchedule",
    "ProgressiveDistiller",
    "__version__",
    "ddim_sample",
    "ddim_step",
    "schedule_from_dict",
    "set_value_checks",
]
