"""kdiff: few-step diffusion sampling by progressive and classifier-based feature distillation."""

__version__ = "0.1.0"
