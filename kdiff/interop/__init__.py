"""Teachers and students from other codebases: diffusers models and schedulers, VE denoisers.

Importing this package imports no optional dependency; :mod:`kdiff.interop.diffusers` imports
``diffusers`` (``pip install 'kdiff[diffusers]'``) only when one of its functions runs.
"""

from .diffusers import (
    DiffusersModel,
    DiffusersTeacher,
    ddim_sample_kwargs,
    export_ddim_pipeline,
    from_diffusers,
    prediction_type_from_diffusers,
    schedule_from_diffusers,
)
from .edm import VEDenoiser, from_ve_denoiser

__all__ = [
    "DiffusersModel",
    "DiffusersTeacher",
    "VEDenoiser",
    "ddim_sample_kwargs",
    "export_ddim_pipeline",
    "from_diffusers",
    "from_ve_denoiser",
    "prediction_type_from_diffusers",
    "schedule_from_diffusers",
]
