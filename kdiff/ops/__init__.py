"""Fused loss ops for CUDA, each with the plain-PyTorch path kept (``impl="auto" | "torch" | "triton"``).

* :func:`feature_kl_loss`: tempered feature KL of CFD, loss and gradient in one pass per row;
* :func:`dataset_oriented_loss`: ``L_data = gamma H + (1 - gamma) Dv`` with the batch statistics
  in one pass (the global-batch form under ``torch.distributed`` included);
* :func:`pd_target_loss`: the PD target chain (two teacher DDIM half-steps, ``x_tilde``,
  ``eps_tilde``) and the weighted loss in one element-wise pass.

Each takes the arguments of its :mod:`kdiff.functional` reference plus ``impl``. The Triton
kernels live in one module per op (``kdiff.ops.feature_kl``, ``kdiff.ops.dataset_oriented``,
``kdiff.ops.pd_target``), imported only when a call takes the Triton path: importing
:mod:`kdiff` or :mod:`kdiff.ops` never imports Triton. See ``docs/performance.md``.
"""

from ._dispatch import IMPLS, TRITON_DTYPES, interpreter_enabled, resolve_impl, triton_available
from .functional import PDTargetLossOutput, dataset_oriented_loss, feature_kl_loss, pd_target_loss

__all__ = [
    "IMPLS",
    "PDTargetLossOutput",
    "TRITON_DTYPES",
    "dataset_oriented_loss",
    "feature_kl_loss",
    "interpreter_enabled",
    "pd_target_loss",
    "resolve_impl",
    "triton_available",
]
