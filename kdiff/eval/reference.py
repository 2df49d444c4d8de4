"""On-disk cache of reference-set features (computed once per dataset x feature network).

A cache entry is two files in ``cache_dir``:

* ``{name}-{key[:16]}.safetensors`` -- the ``[N, D]`` float32 features (tensor ``"features"``,
  with the full key in the safetensors metadata); ``.pt`` via ``torch.save`` if safetensors is not
  installed, loaded back with ``weights_only=True``;
* ``{name}-{key[:16]}.json`` -- a sidecar recording the key, what produced it (data hash, extractor
  name/weights hash/preprocessing, ``key_info``, versions) and the features file's SHA-256.

``key`` is the SHA-256 of a canonical JSON of: the images' hash (or a given dataset hash), the
extractor's :meth:`~kdiff.eval.FeatureExtractor.describe` (name, weights hash, dimension,
preprocessing) and ``key_info``. A changed input, network or preprocessing therefore maps to a
different entry; an entry whose sidecar or features file does not match (partial copy, edited
file, other key) is *stale* and recomputed. Both files are written atomically (temporary file in
the same directory, ``fsync``, ``os.replace``), features first, so a crash never leaves a
half-written file under the final name, and a features file without a matching sidecar is treated
as stale.
"""

from __future__ import annotations

import hashlib
import io
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

from kdiff.checkpoint import atomic_write_bytes
from kdiff.eval.features import compute_features

__all__ = ["CACHE_FORMAT", "hash_images", "reference_cache_key", "reference_features"]

logger = logging.getLogger(__name__)

#: Version of the cache layout; part of every key.
CACHE_FORMAT = 1


def hash_images(images: Tensor | np.ndarray) -> str:
    """SHA-256 of an image tensor's dtype, shape and raw bytes.

    Example:
        >>> a = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
        >>> hash_images(a) == hash_images(a.clone()), hash_images(a) == hash_images(a.float())
        (True, False)
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a tensor or numpy array; got {type(images).__name__}")
    t = images.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"kdiff-images|{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.reshape(-1)
    step = 1 << 24
    for start in range(0, flat.numel(), step):
        h.update(flat[start : start + step].view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _canonical_json(obj: Any, name: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be JSON-serialisable: {err}") from err


def _describe(extractor: nn.Module) -> dict[str, Any]:
    describe = getattr(extractor, "describe", None)
    if callable(describe):
        return describe()
    missing = [a for a in ("name", "weights_sha256", "num_features") if not hasattr(extractor, a)]
    if missing:
        raise ValueError(
            f"extractor must be a kdiff.eval.FeatureExtractor or define {', '.join(missing)}"
        )
    return {
        "name": extractor.name,
        "num_features": int(extractor.num_features),
        "weights_sha256": extractor.weights_sha256,
        "preprocessing": dict(getattr(extractor, "preprocessing", {})),
    }


def reference_cache_key(
    extractor: nn.Module, *, data_hash: str, key_info: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """Cache key (hex SHA-256) and the material it was computed from.

    Args:
        extractor: Feature extractor (its ``describe()`` is hashed).
        data_hash: Hash identifying the reference images.
        key_info: Extra JSON-serialisable settings that change the features (e.g. dataset
            name/split, sample count, any extra preprocessing done before the extractor).

    Example:
        >>> class E(torch.nn.Module):
        ...     name, weights_sha256, num_features = "e", "0" * 64, 4
        >>> k1, _ = reference_cache_key(E(), data_hash="abc")
        >>> k2, _ = reference_cache_key(E(), data_hash="abc", key_info={"split": "test"})
        >>> k1 != k2
        True
    """
    if not isinstance(data_hash, str) or not data_hash:
        raise ValueError(f"data_hash must be a non-empty string; got {data_hash!r}")
    material = {
        "format": CACHE_FORMAT,
        "data_hash": data_hash,
        "extractor": _describe(extractor),
        "key_info": dict(key_info or {}),
    }
    text = _canonical_json(material, "key_info")
    return hashlib.sha256(text.encode()).hexdigest(), material


def _serialize(features: Tensor, key: str) -> tuple[bytes, str]:
    try:
        from safetensors.torch import save
    except ImportError:
        buf = io.BytesIO()
        torch.save({"features": features, "key": key}, buf)
        return buf.getvalue(), "torch"
    return save({"features": features}, metadata={"key": key}), "safetensors"


def _deserialize(data: bytes, fmt: str, key: str) -> Tensor | None:
    if fmt == "safetensors":
        from safetensors.torch import load

        loaded = load(data)
        # The key is stored in the header's __metadata__ (8-byte little-endian length + JSON).
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        if meta.get("key") != key:
            return None
        return loaded.get("features")
    if fmt == "torch":
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or obj.get("key") != key:
            return None
        return obj.get("features")
    return None


def _sanitize(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    if not clean:
        raise ValueError(f"name must contain letters or digits; got {name!r}")
    return clean


def _try_load(
    json_path: Path, key: str, num_features: int
) -> tuple[Tensor | None, dict[str, Any] | None, str]:
    """Return ``(features, record, reason)``; features is None on a miss/stale entry."""
    if not json_path.exists():
        return None, None, "no sidecar"
    try:
        record = json.loads(json_path.read_text())
    except (OSError, ValueError) as err:
        return None, None, f"unreadable sidecar ({err})"
    if not isinstance(record, dict) or record.get("key") != key:
        return None, None, "sidecar key mismatch"
    feat_path = json_path.parent / str(record.get("features_file", ""))
    try:
        data = feat_path.read_bytes()
    except OSError as err:
        return None, record, f"features file unreadable ({err})"
    if hashlib.sha256(data).hexdigest() != record.get("features_sha256"):
        return None, record, "features file hash mismatch"
    try:
        feats = _deserialize(data, str(record.get("storage")), key)
    except Exception as err:  # noqa: BLE001 - any corruption means "recompute"
        return None, record, f"features file unreadable ({err})"
    if feats is None or feats.ndim != 2 or list(feats.shape) != record.get("shape"):
        return None, record, "features shape/key mismatch"
    if feats.shape[1] != num_features:
        return None, record, "feature dimension mismatch"
    return feats, record, "ok"


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
            (then ``dataset_hash`` is required, since the cache is looked up before any image is
            read).
        cache_dir: Directory for cache files (created if needed).
        key_info: Extra JSON-serialisable settings that affect the features; part of the key
            and recorded in the sidecar (e.g. ``{"dataset": "cifar10", "split": "train"}``).
        dataset_hash: Identifies the images instead of hashing their bytes.
        name: File-name prefix of the cache entry.
        batch_size: Batch size for feature computation.
        device: Device for feature computation.
        progress: Show a progress bar while computing.
        return_info: Also return the sidecar record plus ``status`` (``"hit"``, ``"miss"`` or
            ``"stale"``), ``reason`` and ``path``.

    Returns:
        float32 ``[N, D]`` CPU features (and the info dict if ``return_info``).

    Raises:
        ValueError: Iterable ``images`` without ``dataset_hash``, or non-serialisable ``key_info``.

    Example:
        >>> feats = reference_features(
        ...     InceptionFeatureExtractor(), real_images, cache_dir="~/.cache/kdiff",
        ...     key_info={"dataset": "cifar10", "split": "train"},
        ... )  # doctest: +SKIP
    """
    if dataset_hash is None:
        if not isinstance(images, (Tensor, np.ndarray)):
            raise ValueError(
                "images is an iterable: pass dataset_hash=... (e.g. a hash of the dataset files) "
                "so the cache can be looked up without reading the images"
            )
        data_hash = hash_images(images)
    else:
        data_hash = dataset_hash
    key, material = reference_cache_key(extractor, data_hash=data_hash, key_info=key_info)
    describe = material["extractor"]

    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    stem = f"{_sanitize(name)}-{key[:16]}"
    json_path = cache / f"{stem}.json"

    feats, record, reason = _try_load(json_path, key, int(describe["num_features"]))
    if feats is not None and record is not None:
        logger.info("reference features cache hit: %s", json_path)
        if return_info:
            return feats, {**record, "status": "hit", "reason": reason, "path": str(json_path)}
        return feats

    stale = reason != "no sidecar" or any(cache.glob(f"{stem}.safetensors")) or any(
        cache.glob(f"{stem}.pt")
    )
    status = "stale" if stale else "miss"
    if stale:
        logger.warning("reference features cache entry %s is stale (%s); recomputing", stem, reason)
    feats = compute_features(
        extractor, images, batch_size=batch_size, device=device, progress=progress,
        desc=f"reference features ({name})",
    ).contiguous()

    data, storage = _serialize(feats, key)
    feat_path = cache / f"{stem}.{'safetensors' if storage == 'safetensors' else 'pt'}"
    atomic_write_bytes(feat_path, data)
    from kdiff import __version__ as kdiff_version

    record = {
        **material,
        "key": key,
        "num_images": int(feats.shape[0]),
        "shape": list(feats.shape),
        "dtype": str(feats.dtype).replace("torch.", ""),
        "storage": storage,
        "features_file": feat_path.name,
        "features_sha256": hashlib.sha256(data).hexdigest(),
        "created_unix": time.time(),
        "kdiff_version": kdiff_version,
        "torch_version": torch.__version__,
    }
    atomic_write_bytes(json_path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    if return_info:
        return feats, {**record, "status": status, "reason": reason, "path": str(json_path)}
    return feats
