"""On-disk cache of reference-set features (computed once per dataset x feature network).

An entry is one :mod:`kdiff.io` weights file, ``{name}-{key[:16]}.safetensors``: the ``[N, D]``
features (tensor ``"features"``) and, as metadata, the key and what it was computed from. The key
is the SHA-256 of the images' hash (or ``dataset_hash``), the extractor's ``describe()`` (name,
weights hash, dimension, preprocessing) and ``key_info``, so any change maps to another entry.
Writes are atomic and reads verify the file's hash; an entry that fails to load (damaged, other
key, wrong shape) is *stale* and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kdiff.eval.features import compute_features
from kdiff.io import CheckpointError, hash_images, load_weights, save_weights

__all__ = ["CACHE_FORMAT", "reference_features"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Version of the cache layout; part of every key."""


def reference_features(
    extractor: nn.Module,
    images: Tensor | np.ndarray | Iterable[Any],
    *,
    cache_dir: str | Path,
    key_info: dict[str, Any] | None = None,
    dataset_hash: str | None = None,
    name: str = "reference",
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    return_info: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Any]]:
    """Features of the reference images, computed once and cached on disk.

    Args:
        extractor: A :class:`~kdiff.eval.FeatureExtractor`.
        images: ``[N, 3, H, W]`` images in ``[-1, 1]`` (or uint8), or an iterable of batches
            (then ``dataset_hash`` is required: the cache is looked up before any image is read).
        cache_dir: Folder for cache files (created if needed).
        key_info: JSON-serialisable settings that change the features, part of the key (e.g.
            ``{"dataset": "cifar10", "split": "train"}``).
        dataset_hash: Identifies the images instead of hashing their bytes.
        name: File-name prefix of the entry.
        batch_size, device, progress: Passed to :func:`~kdiff.eval.compute_features`.
        return_info: Also return the entry's metadata plus ``status`` (``"hit"``, ``"miss"`` or
            ``"stale"``), ``reason`` and ``path``.

    Returns:
        float32 ``[N, D]`` CPU features (and the info dict if ``return_info``).

    Raises:
        ValueError: Iterable ``images`` without ``dataset_hash``, an empty ``dataset_hash``,
            non-serialisable ``key_info``, or a ``name`` without letters or digits.
        TypeError: ``extractor`` has no ``describe()``.

    Example:
        >>> feats = reference_features(InceptionFeatureExtractor(), real_images,
        ...     cache_dir="~/.cache/kdiff", key_info={"split": "train"})  # doctest: +SKIP
    """
    if dataset_hash is None and not isinstance(images, (Tensor, np.ndarray)):
        raise ValueError("images is an iterable: pass dataset_hash=... (e.g. a hash of the dataset "
                         "files) so the cache can be looked up without reading the images")
    describe = getattr(extractor, "describe", None)
    if not callable(describe):
        raise TypeError(f"extractor must be a FeatureExtractor; got {type(extractor).__name__}")
    if dataset_hash is not None and (not isinstance(dataset_hash, str) or not dataset_hash):
        raise ValueError(f"dataset_hash must be a non-empty string; got {dataset_hash!r}")
    data_hash = dataset_hash or hash_images(images)  # type: ignore[arg-type]
    material = {"format": CACHE_FORMAT, "data_hash": data_hash, "extractor": describe(),
                "key_info": dict(key_info or {})}
    try:
        text = json.dumps(material, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"key_info must be JSON-serialisable: {err}") from err
    key = hashlib.sha256(text.encode()).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    if not stem:
        raise ValueError(f"name must contain letters or digits; got {name!r}")
    path = Path(cache_dir).expanduser() / f"{stem}-{key[:16]}.safetensors"

    status, reason = "miss", "no cache entry"
    if path.exists():
        try:
            tensors, record = load_weights(path, expected={"key": key})
            feats, dim = tensors.get("features"), material["extractor"]["num_features"]
            if feats is None or feats.ndim != 2 or feats.shape[1] != dim:
                raise CheckpointError(f"{path} holds no [N, {dim}] 'features' tensor")
            status, reason = "hit", "ok"
        except CheckpointError as err:
            status, reason = "stale", str(err)
            logger.warning("reference features cache entry %s is stale; recomputing: %s", path, err)
    if status != "hit":
        feats = compute_features(extractor, images, batch_size=batch_size, device=device,
                                 progress=progress, desc=f"reference features ({name})").contiguous()
        record = {**material, "key": key, "shape": list(feats.shape),
                  "created_unix": time.time(), "torch_version": torch.__version__}
        save_weights(path, {"features": feats}, record)
    info = {**record, "status": status, "reason": reason, "path": str(path)}
    return (feats, info) if return_info else feats
