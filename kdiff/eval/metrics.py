"""FID and KID from precomputed features, and the protocol record that goes with each number.

Features are computed once per image set (:func:`kdiff.eval.compute_features`, cached for the
reference set by :func:`kdiff.eval.reference_features`) and both metrics are computed from them, so
Inception runs once per image.

* **FID** defaults to an exact, factorised float64 computation (``backend="exact"``) of
  ``||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2})``: writing each covariance as
  ``S = A^T A`` (``A`` = centred features / sqrt(n-1) when ``n <= d``, else the symmetric square
  root of ``S``), ``Tr (S_r S_f)^{1/2}`` equals the nuclear norm of ``A_r A_f^T``. This needs one
  small SVD, gives exactly ~0 for a set against itself even when ``n < d`` (rank-deficient
  covariances, where general ``sqrtm``/``eigvals`` have an error floor of ~1e-4), and takes
  milliseconds instead of the ~25 s a 2048x2048 non-symmetric eigendecomposition takes on 2 CPU
  cores. ``backend="torchmetrics"`` feeds the same features to
  ``torchmetrics.image.fid.FrechetInceptionDistance`` through an identity "feature" module (kept
  as a cross-check; the tests check both agree with scipy).
* **KID** uses ``torchmetrics.image.kid.KernelInceptionDistance`` fed with the precomputed
  features through the same identity module, in float64, with a fixed seed for the random subsets
  (the global RNG state is left untouched).

Both run no collective even inside a ``torch.distributed`` job: the features passed in are the
whole set, and one process may compute the metrics alone (see :mod:`kdiff.eval.distributed`).

**Uncertainty.** :func:`bootstrap_metric` resamples the generated features with replacement (the
reference set stays fixed) and returns the spread and a percentile interval of FID or KID;
:func:`paired_bootstrap` does the same for the difference between two sample sets drawn from the
same noise (sample ``i`` of both sets from the same starting noise), resampling the same indices
for both, which cancels most of the sampling noise the two sets share. The KID of these
functions is the unbiased MMD² on the *whole* sets (no subsets): the kernel matrices are computed
once and every resample only reweights them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_KID_SUBSET_SIZE",
    "BootstrapResult",
    "MetricProtocol",
    "MetricResult",
    "bootstrap_indices",
    "bootstrap_metric",
    "compute_metrics",
    "fid_from_features",
    "kid_from_features",
    "paired_bootstrap",
    "resolve_kid_subset_size",
]

#: Default KID subset size (as in the KID paper and torchmetrics), reduced to the sample counts.
DEFAULT_KID_SUBSET_SIZE = 1000

FidBackend = Literal["exact", "torchmetrics"]


# ---------------------------------------------------------------------------------------------
# validation


def _as_features(x: object, name: str) -> Tensor:
    """Validate a ``[N, D]`` feature matrix and return it as float64 on its device."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array; got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [N, D]; got {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 samples; got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has feature dimension 0")
    if x.is_complex():
        raise TypeError(f"{name} must be real-valued; got {x.dtype}")
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _pair(real_feats: object, fake_feats: object) -> tuple[Tensor, Tensor]:
    real = _as_features(real_feats, "real_feats")
    fake = _as_features(fake_feats, "fake_feats").to(real.device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real_feats and fake_feats must have the same feature dimension; got "
            f"{real.shape[1]} and {fake.shape[1]}"
        )
    return real, fake


#: torchmetrics gathers a metric's state from every process of a running process group in
#: ``compute()``; the features given here are already complete (gathered, if need be, with
#: :func:`kdiff.eval.gather_rows`), so syncing would count them once per process, or wait forever
#: for processes that do not compute the metric.
_LOCAL_ONLY = {"sync_on_compute": False, "dist_sync_on_step": False}


class _PrecomputedFeatures(nn.Module):
    """Identity "feature network" so torchmetrics metrics accept precomputed features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: Tensor) -> Tensor:
        return x


# ---------------------------------------------------------------------------------------------
# FID


def _cov_factor(x: Tensor) -> Tensor:
    """``F`` with ``F^T F = cov(x)`` (unbiased), ``x`` float64 ``[n, d]``; ``F`` is ``[min(n, d), d]``."""
    n, d = x.shape
    xc = x - x.mean(dim=0, keepdim=True)
    if n <= d:
        return xc / math.sqrt(n - 1)
    cov = xc.T @ xc / (n - 1)
    evals, evecs = torch.linalg.eigh(cov)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def _fid_exact(real: Tensor, fake: Tensor) -> float:
    a = _cov_factor(real)
    b = _cov_factor(fake)
    mean_term = (real.mean(0) - fake.mean(0)).square().sum()
    trace_term = a.square().sum() + b.square().sum()  # Tr S_r + Tr S_f
    cross = torch.linalg.svdvals(a @ b.T).sum()  # Tr (S_r S_f)^{1/2}
    return float(mean_term + trace_term - 2.0 * cross)


def _fid_torchmetrics(real: Tensor, fake: Tensor) -> float:
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "fid_from_features(backend='torchmetrics') needs torchmetrics: "
            "pip install 'kdiff[eval]'"
        ) from err
    metric = FrechetInceptionDistance(
        feature=_PrecomputedFeatures(real.shape[1]), **_LOCAL_ONLY
    ).to(real.device)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def fid_from_features(
    real_feats: Tensor | np.ndarray,
    fake_feats: Tensor | np.ndarray,
    *,
    backend: FidBackend = "exact",
) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    ``FID = ||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^{1/2})`` with unbiased covariances,
    computed in float64.

    Args:
        real_feats: ``[N_r, D]`` reference features (``N_r >= 2``).
        fake_feats: ``[N_f, D]`` sample features (``N_f >= 2``).
        backend: ``"exact"`` (default; factorised, stable when ``N < D``, fast) or
            ``"torchmetrics"`` (``FrechetInceptionDistance`` fed with the features).

    Returns:
        The FID as a Python float (may be ~-1e-12 for identical sets, from rounding).

    Raises:
        ValueError: Wrong shapes, fewer than 2 samples, NaN/inf values, mismatched ``D``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(100, 8, generator=g)
        >>> abs(fid_from_features(x, x)) < 1e-9
        True
        >>> fid_from_features(x, x + 1.0) > 7.9
        True
    """
    real, fake = _pair(real_feats, fake_feats)
    if backend == "exact":
        return _fid_exact(real, fake)
    if backend == "torchmetrics":
        return _fid_torchmetrics(real, fake)
    raise ValueError(f"backend must be 'exact' or 'torchmetrics'; got {backend!r}")


# ---------------------------------------------------------------------------------------------
# KID


def resolve_kid_subset_size(n_real: int, n_fake: int, subset_size: int | None = None) -> int:
    """KID subset size to use for the given sample counts.

    Every subset draws ``subset_size`` real and ``subset_size`` fake features without
    replacement, so it must satisfy ``2 <= subset_size <= min(n_real, n_fake)``. ``None`` picks
    ``min(1000, n_real, n_fake)`` (1000 is the usual value); an explicit value that does not fit
    is an error rather than silently changed. When ``subset_size == min(n_real, n_fake)`` the
    smaller set is used whole in every subset, so the reported std only reflects resampling of the
    larger set (it is 0 when both sets have that size).

    Example:
        >>> resolve_kid_subset_size(50000, 64)
        64
        >>> resolve_kid_subset_size(50000, 10000)
        1000
    """
    limit = min(int(n_real), int(n_fake))
    if subset_size is None:
        size = min(DEFAULT_KID_SUBSET_SIZE, limit)
        if size < 2:
            raise ValueError(f"KID needs at least 2 real and 2 fake samples; got {n_real}, {n_fake}")
        return size
    if isinstance(subset_size, bool) or not isinstance(subset_size, int) or subset_size < 2:
        raise ValueError(f"subset_size must be an int >= 2; got {subset_size!r}")
    if subset_size > limit:
        raise ValueError(
            f"subset_size={subset_size} exceeds min(n_real, n_fake)={limit} (n_real={n_real}, "
            f"n_fake={n_fake}); pass subset_size<={limit} or None to adapt automatically"
        )
    return subset_size


def kid_from_features(
    real_feats: Tensor | np.ndarray,
    fake_feats: Tensor | np.ndarray,
    *,
    subset_size: int | None = None,
    subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (unbiased MMD² with a cubic polynomial kernel) over subsets.

    Kernel ``k(x, y) = (x·y / D + 1)^3``; for each of ``subsets`` random subsets of
    ``subset_size`` real and fake features, the unbiased estimator
    ``sum_{i!=j} k(r_i, r_j)/(m(m-1)) + sum_{i!=j} k(f_i, f_j)/(m(m-1)) - 2 sum_{i,j} k(r_i, f_j)/m²``
    is computed (``torchmetrics.image.kid.KernelInceptionDistance``, in float64). Subsets are drawn
    with a private RNG seeded by ``seed``, so results are reproducible and the global RNG is not
    touched.

    Args:
        real_feats: ``[N_r, D]`` reference features.
        fake_feats: ``[N_f, D]`` sample features.
        subset_size: Samples per subset; ``None`` -> ``min(1000, N_r, N_f)``. See
            :func:`resolve_kid_subset_size`.
        subsets: Number of subsets (``>= 1``).
        seed: Seed for subset sampling.

    Returns:
        ``(mean, std)`` over subsets (std is the population std, as in torchmetrics).

    Raises:
        ValueError: Invalid features (see :func:`fid_from_features`), ``subset_size`` or
            ``subsets``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(64, 8, generator=g), torch.randn(64, 8, generator=g)
        >>> mean, std = kid_from_features(x, y + 2.0, subsets=10)
        >>> mean > 1.0
        True
    """
    real, fake = _pair(real_feats, fake_feats)
    size = resolve_kid_subset_size(real.shape[0], fake.shape[0], subset_size)
    if isinstance(subsets, bool) or not isinstance(subsets, int) or subsets < 1:
        raise ValueError(f"subsets must be a positive int; got {subsets!r}")
    try:
        from torchmetrics.image.kid import KernelInceptionDistance
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("kid_from_features needs torchmetrics: pip install 'kdiff[eval]'") from err
    with warnings.catch_warnings():
        # "will save all extracted features in buffer": expected, the features are already here.
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=_PrecomputedFeatures(real.shape[1]), subsets=subsets, subset_size=size, **_LOCAL_ONLY
        ).to(real.device)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


# ---------------------------------------------------------------------------------------------
# protocol record


@dataclass(frozen=True)
class MetricProtocol:
    """How a metric number was produced; store ``to_dict()`` next to every reported number.

    All fields are optional so partial knowledge can be recorded; :func:`compute_metrics` fills in
    what it knows (sample counts, feature dim, KID settings, FID backend).

    Attributes:
        num_samples: Number of generated samples evaluated.
        seeds: Seeds used to draw the samples (e.g. the base seed, or one per batch).
        sampler: Sampler / student name (e.g. ``"ddim"``, ``"pd-student"``).
        sampler_steps: Number of sampling steps (network evaluations).
        clipping: How samples were clipped before evaluation (e.g. ``"clamp[-1,1]"``, ``"none"``).
        ema: Whether EMA weights were used.
        reference_name: Name of the reference set (e.g. ``"cifar10-train"``).
        reference_hash: SHA-256 of the reference images (or the given dataset hash).
        num_reference: Number of reference images.
        feature_network: Feature extractor name (e.g. ``"inception-v3-fid"``).
        feature_weights_sha256: SHA-256 of the feature network's weights.
        feature_dim: Feature dimension.
        kid_subset_size: KID subset size actually used.
        kid_subsets: Number of KID subsets.
        kid_seed: Seed of the KID subset sampling.
        fid_backend: FID implementation (``"exact"`` or ``"torchmetrics"``).
        extra: Anything else (JSON-serialisable).

    Example:
        >>> p = MetricProtocol(num_samples=10000, seeds=(0,), sampler="ddim", sampler_steps=4)
        >>> p.to_dict()["sampler_steps"]
        4
    """

    num_samples: int | None = None
    seeds: tuple[int, ...] = ()
    sampler: str | None = None
    sampler_steps: int | None = None
    clipping: str | None = None
    ema: bool | None = None
    reference_name: str | None = None
    reference_hash: str | None = None
    num_reference: int | None = None
    feature_network: str | None = None
    feature_weights_sha256: str | None = None
    feature_dim: int | None = None
    kid_subset_size: int | None = None
    kid_subsets: int | None = None
    kid_seed: int | None = None
    fid_backend: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seeds = self.seeds
        if isinstance(seeds, int):
            seeds = (seeds,)
        object.__setattr__(self, "seeds", tuple(int(s) for s in seeds))

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (``seeds`` as a list)."""
        out = dataclasses.asdict(self)
        out["seeds"] = list(self.seeds)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetricProtocol:
        """Inverse of :meth:`to_dict` (unknown keys go to ``extra``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        extra = dict(known.pop("extra", {}) or {})
        extra.update({k: v for k, v in data.items() if k not in names})
        return cls(**known, extra=extra)

    def with_extractor(self, extractor: Any) -> MetricProtocol:
        """Copy with ``feature_network``/``feature_weights_sha256``/``feature_dim`` from an extractor."""
        return dataclasses.replace(
            self,
            feature_network=getattr(extractor, "name", type(extractor).__name__),
            feature_weights_sha256=getattr(extractor, "weights_sha256", None),
            feature_dim=getattr(extractor, "num_features", None),
        )


@dataclass(frozen=True)
class MetricResult:
    """FID/KID numbers together with the :class:`MetricProtocol` that produced them."""

    fid: float
    kid_mean: float
    kid_std: float
    protocol: MetricProtocol

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict: the numbers plus ``protocol``."""
        return {
            "fid": self.fid,
            "kid_mean": self.kid_mean,
            "kid_std": self.kid_std,
            "protocol": self.protocol.to_dict(),
        }


def compute_metrics(
    real_feats: Tensor | np.ndarray,
    fake_feats: Tensor | np.ndarray,
    *,
    protocol: MetricProtocol | None = None,
    extractor: Any | None = None,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    seed: int = 0,
    fid_backend: FidBackend = "exact",
) -> MetricResult:
    """FID and KID from features, returned with a completed :class:`MetricProtocol`.

    The returned protocol is ``protocol`` with ``num_samples``/``num_reference``/``feature_dim``
    set from the features actually evaluated, the KID settings actually used, the FID backend,
    and (if ``extractor`` is given) the feature network's name and weights hash.

    It runs no collective, so in a ``torch.distributed`` job one process can compute the
    metrics from features gathered with :func:`kdiff.eval.gather_rows` while the others go on.

    Args:
        real_feats: ``[N_r, D]`` reference features.
        fake_feats: ``[N_f, D]`` sample features.
        protocol: What is known about how the samples were made (sampler, steps, seeds, ...).
        extractor: The feature extractor used; fills the feature-network fields.
        kid_subset_size: See :func:`kid_from_features` (``None`` adapts to the sample counts).
        kid_subsets: Number of KID subsets.
        seed: KID subset seed.
        fid_backend: See :func:`fid_from_features`.

    Returns:
        A :class:`MetricResult`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> real, fake = torch.randn(50, 4, generator=g), torch.randn(40, 4, generator=g)
        >>> res = compute_metrics(real, fake, protocol=MetricProtocol(sampler="ddim"))
        >>> res.protocol.kid_subset_size, res.protocol.num_samples
        (40, 40)
    """
    real, fake = _pair(real_feats, fake_feats)
    size = resolve_kid_subset_size(real.shape[0], fake.shape[0], kid_subset_size)
    fid = fid_from_features(real, fake, backend=fid_backend)
    kid_mean, kid_std = kid_from_features(real, fake, subset_size=size, subsets=kid_subsets, seed=seed)
    proto = protocol if protocol is not None else MetricProtocol()
    if extractor is not None:
        proto = proto.with_extractor(extractor)
    proto = dataclasses.replace(
        proto,
        num_samples=int(fake.shape[0]),
        num_reference=int(real.shape[0]),
        feature_dim=int(real.shape[1]),
        kid_subset_size=size,
        kid_subsets=kid_subsets,
        kid_seed=seed,
        fid_backend=fid_backend,
    )
    return MetricResult(fid=fid, kid_mean=kid_mean, kid_std=kid_std, protocol=proto)



# ---------------------------------------------------------------------------------------------
# bootstrap over generated samples

BootstrapMetricName = Literal["fid", "kid"]

#: Upper bound on the float64 elements of one chunk of resamples (about 32 MiB).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class BootstrapResult:
    """A metric, or the difference of a metric between two sample sets, with its bootstrap spread.

    The generated samples are resampled with replacement ``num_resamples`` times (the reference set
    is fixed), so ``std`` and the interval measure how much the number would move with another
    draw of as many samples from the same sampler; they do not measure the metric's bias at this
    sample count (FID at a few hundred samples sits far above its large-sample value).

    Attributes:
        metric: ``"fid"`` or ``"kid"``.
        estimate: The metric on the full sets; for :func:`paired_bootstrap`, ``metric(b) - metric(a)``.
        mean: Mean over the resamples.
        std: Standard deviation over the resamples (``ddof=1``): the standard error of ``estimate``.
        low: Lower end of the percentile interval.
        high: Upper end of the percentile interval.
        confidence: Coverage of ``[low, high]`` (e.g. ``0.95``).
        num_resamples: Bootstrap resamples ``B``.
        num_samples: Generated samples per set ``n``.
        num_reference: Reference samples ``n_r``.
        seed: Seed of :func:`bootstrap_indices`.
        paired: Whether this is a paired difference.
        values: The ``B`` resampled statistics (float64; left out of :meth:`to_dict`).
    """

    metric: str
    estimate: float
    mean: float
    std: float
    low: float
    high: float
    confidence: float
    num_resamples: int
    num_samples: int
    num_reference: int
    seed: int
    paired: bool
    values: Tensor = field(repr=False, compare=False)

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0 (for a difference: significant)."""
        return self.low > 0.0 or self.high < 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of everything but ``values``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "values"}
        out["excludes_zero"] = self.excludes_zero
        return out


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return value


def _check_bootstrap(metric: object, num_resamples: object, confidence: object, seed: object) -> None:
    if metric not in ("fid", "kid"):
        raise ValueError(f"metric must be 'fid' or 'kid'; got {metric!r}")
    _check_int(num_resamples, "num_resamples", 2)
    _check_int(seed, "seed", 0)
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1); got {confidence!r}")


def bootstrap_indices(num_samples: int, *, num_resamples: int = 1000, seed: int = 0) -> Tensor:
    """The resamples used by :func:`bootstrap_metric` and :func:`paired_bootstrap`.

    Row ``b`` holds ``num_samples`` indices drawn uniformly with replacement by a private
    generator seeded with ``seed`` (the global RNG is not touched). A row whose indices are all
    equal is drawn again: the within-set term of the unbiased KID needs two distinct samples
    (this only matters for a handful of samples; the chance is ``n^(1-n)``).

    Args:
        num_samples: ``n``, the samples per set (``>= 2``).
        num_resamples: ``B`` (``>= 2``).
        seed: Generator seed (``>= 0``).

    Returns:
        int64 tensor ``[B, n]``.

    Raises:
        ValueError: ``num_samples < 2``, ``num_resamples < 2`` or a negative ``seed``.

    Example:
        >>> idx = bootstrap_indices(5, num_resamples=3, seed=0)
        >>> tuple(idx.shape), bool(((idx >= 0) & (idx < 5)).all())
        ((3, 5), True)
    """
    n = _check_int(num_samples, "num_samples", 2)
    b = _check_int(num_resamples, "num_resamples", 2)
    _check_int(seed, "seed", 0)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (b, n), generator=g)
    while True:
        same = (idx == idx[:, :1]).all(dim=1)
        k = int(same.sum())
        if k == 0:
            return idx
        idx[same] = torch.randint(n, (k, n), generator=g)


def _counts(idx: Tensor, n: int) -> Tensor:
    """Multiplicity ``c_a`` of every original sample ``a`` in each resample: ``[b, n]`` float64."""
    ones = torch.ones(idx.shape, dtype=torch.float64, device=idx.device)
    return torch.zeros(idx.shape[0], n, dtype=torch.float64, device=idx.device).scatter_add_(1, idx, ones)


def _kernel(x: Tensor, y: Tensor) -> Tensor:
    """KID's polynomial kernel ``k(x, y) = (x·y / D + 1)^3``."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _row_blocks(n: int, width: int) -> list[slice]:
    """Slices of ``n`` rows such that a block of ``width`` columns stays near ``_CHUNK_ELEMENTS``."""
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


#: Per-reference quantities, keyed by the reference features' bytes: one reference set is scored
#: against many sample sets (every row of a benchmark), and these are the expensive part.
_REFERENCE_CACHE: dict[tuple[str, tuple[int, ...], str], dict[str, Any]] = {}
_REFERENCE_CACHE_SIZE = 8


def _reference_entry(real: Tensor) -> dict[str, Any]:
    import hashlib

    key = (hashlib.sha1(real.cpu().numpy().tobytes()).hexdigest(), tuple(real.shape), str(real.device))
    entry = _REFERENCE_CACHE.get(key)
    if entry is None:
        if len(_REFERENCE_CACHE) >= _REFERENCE_CACHE_SIZE:
            _REFERENCE_CACHE.pop(next(iter(_REFERENCE_CACHE)))
        entry = _REFERENCE_CACHE[key] = {}
    return entry


def _kid_real_term(real: Tensor) -> float:
    """``sum_{i != j} k(r_i, r_j) / (n_r (n_r - 1))``, in row blocks (no ``n_r x n_r`` matrix)."""
    entry = _reference_entry(real)
    if "kid_rr" not in entry:
        n = real.shape[0]
        total = 0.0
        for rows in _row_blocks(n, n):
            block = _kernel(real[rows], real)
            total += float(block.sum()) - float(block.diagonal(offset=rows.start).sum())
        entry["kid_rr"] = total / (n * (n - 1))
    return float(entry["kid_rr"])


def _kid_terms(real: Tensor, fake: Tensor, counts: Tensor) -> Tensor:
    """KID without its reference-only term, for each row of resample ``counts`` ``[b, n]``.

    With counts ``c`` (``sum c = n``), the within-set term is the unbiased estimator on the
    resampled set with the pairs of a sample and its own copy left out (they would add
    ``k(f, f)``): ``(c^T K_ff c - sum_a c_a^2 K_aa) / (n^2 - sum_a c_a^2)``; the cross term is
    ``c · m / n`` with ``m_a`` the mean kernel value of sample ``a`` against the reference set.
    With every ``c_a = 1`` both are the usual full-set terms. The kernel matrices are built in
    row blocks, once for all resamples.
    """
    n = fake.shape[0]
    ck = torch.zeros_like(counts)  # c^T K_ff, one row per resample
    diag = torch.empty(n, dtype=torch.float64, device=fake.device)
    for rows in _row_blocks(n, n):
        block = _kernel(fake[rows], fake)
        ck += counts[:, rows] @ block
        diag[rows] = block.diagonal(offset=rows.start)
    m = torch.zeros(n, dtype=torch.float64, device=fake.device)
    for rows in _row_blocks(real.shape[0], n):
        m += _kernel(real[rows], fake).sum(dim=0)
    m /= real.shape[0]
    sq = counts.square()
    within = ((ck * counts).sum(dim=1) - sq @ diag) / (n**2 - sq.sum(dim=1))
    return within - 2.0 * (counts @ m) / n


def _sym_sqrt(mat: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh(mat)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def _fid_resampled(real: Tensor, fake: Tensor, idx: Tensor) -> Tensor:
    """FID of ``fake`` resampled by each row of ``idx`` against the fixed reference set.

    Everything is centred on the reference mean first (covariances and mean differences do not
    change; uncentred second moments then lose no precision). With counts ``c``, ``mu_f = X^T c / n``
    and ``S_f = (X^T diag(c) X - n mu_f mu_f^T) / (n - 1)``. ``Tr (S_r S_f)^{1/2}`` is the sum of
    the square roots of the eigenvalues of a symmetric PSD matrix: ``S_r^{1/2} S_f S_r^{1/2}``
    (``D x D``) when ``n >= D``, or, for fewer samples than dimensions, ``F S_r F^T`` (``n x n``)
    with ``F = diag(c)^{1/2} (X - mu_f) / sqrt(n - 1)``, which has the same nonzero eigenvalues.
    """
    n, d = fake.shape
    entry = _reference_entry(real)
    if "fid" not in entry:
        shift = real.mean(dim=0)
        xr = real - shift
        cov_r = xr.T @ xr / (real.shape[0] - 1)
        entry["fid"] = (shift, cov_r, cov_r.diagonal().sum(), _sym_sqrt(cov_r))
    shift, cov_r, tr_r, sqrt_r = entry["fid"]
    x = fake - shift
    out = []
    if n < d:  # n x n eigenproblems
        q_full = x @ cov_r @ x.T  # X S_r X^T
        gram = x @ x.T
        for rows in _row_blocks(idx.shape[0], n * n):
            c = _counts(idx[rows], n)
            mu = c @ x / n
            q = c @ q_full / n  # (X S_r mu)_a
            s = (q * c).sum(dim=1) / n  # mu^T S_r mu
            h = q_full - q[:, :, None] - q[:, None, :] + s[:, None, None]
            root = c.sqrt()
            h = root[:, :, None] * h * root[:, None, :] / (n - 1)
            g = c @ gram / n
            tr_f = (c * (gram.diagonal() - 2.0 * g + ((g * c).sum(dim=1) / n)[:, None])).sum(dim=1) / (n - 1)
            cross = torch.linalg.eigvalsh(h).clamp(min=0).sqrt().sum(dim=-1)
            out.append(mu.square().sum(dim=-1) + tr_r + tr_f - 2.0 * cross)
        return torch.cat(out)
    outer = (x[:, :, None] * x[:, None, :]).reshape(n, d * d) if n * d * d <= _CHUNK_ELEMENTS else None
    for rows in _row_blocks(idx.shape[0], n * d if outer is None else max(n, d * d)):
        c = _counts(idx[rows], n)
        mu = c @ x / n
        if outer is not None:  # all second moments of the chunk in one matrix product
            second = (c @ outer).reshape(-1, d, d)
        else:
            second = (c[:, :, None] * x).transpose(1, 2) @ x
        cov = (second - n * mu[:, :, None] * mu[:, None, :]) / (n - 1)
        cross = torch.linalg.eigvalsh(sqrt_r @ cov @ sqrt_r).clamp(min=0).sqrt().sum(dim=-1)
        out.append(mu.square().sum(dim=-1) + tr_r + cov.diagonal(dim1=-2, dim2=-1).sum(dim=-1) - 2.0 * cross)
    return torch.cat(out)


def _resampled(metric: str, real: Tensor, fakes: list[Tensor], idx: Tensor) -> tuple[list[float], list[Tensor]]:
    """Full-set values and resampled values of ``metric`` for each generated set (same ``idx``).

    For KID the reference-only term is left out (it is the same for every set; the caller adds
    it where an absolute value is wanted).
    """
    if metric == "kid":
        full, vals = [], []
        for f in fakes:
            n = f.shape[0]
            ones = torch.ones(1, n, dtype=torch.float64, device=f.device)
            terms = _kid_terms(real, f, torch.cat([ones, _counts(idx, n)]))
            full.append(float(terms[0]))
            vals.append(terms[1:])
        return full, vals
    return [_fid_exact(real, f) for f in fakes], [_fid_resampled(real, f, idx) for f in fakes]


def _summarise(metric: str, estimate: float, values: Tensor, *, confidence: float, n: int, n_ref: int,
               seed: int, paired: bool) -> BootstrapResult:
    alpha = 1.0 - confidence
    q = torch.tensor([alpha / 2, 1.0 - alpha / 2], dtype=torch.float64)
    low, high = torch.quantile(values.cpu(), q).tolist()
    return BootstrapResult(
        metric=metric, estimate=float(estimate), mean=float(values.mean()), std=float(values.std()),
        low=float(low), high=float(high), confidence=float(confidence), num_resamples=int(values.numel()),
        num_samples=n, num_reference=n_ref, seed=seed, paired=paired, values=values.cpu(),
    )


def bootstrap_metric(
    real_feats: Tensor | np.ndarray,
    fake_feats: Tensor | np.ndarray,
    *,
    metric: BootstrapMetricName = "kid",
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """FID or KID with a bootstrap over the generated samples (the reference set is fixed).

    Each of ``B`` resamples draws ``n`` of the ``n`` generated features with replacement
    (:func:`bootstrap_indices`) and recomputes the metric against the same reference features.

    * ``metric="kid"``: the unbiased MMD² with ``k(x, y) = (x·y / D + 1)^3`` between the whole
      sets, ``sum_{i!=j} k(r_i, r_j)/(n_r(n_r-1)) + sum_{i!=j} k(f_i, f_j)/(n(n-1)) -
      2 sum_{i,j} k(r_i, f_j)/(n_r n)``. The kernel matrices are computed once and each resample
      reweights them, so ``B = 1000`` costs little more than one KID even for 2048-d Inception
      features. In a resample, pairs formed by a sample and its own copy are left out of the
      within-set term (they would add ``k(f, f)`` and bias the resamples upward).
    * ``metric="fid"``: :func:`fid_from_features` per resample, with the reference statistics
      and ``S_r^{1/2}`` computed once; each resample costs one ``D x D`` symmetric eigensolve, so
      use it for low-dimensional features (e.g. an evaluation classifier's), not 2048-d ones.

    Args:
        real_feats: ``[N_r, D]`` reference features (``N_r >= 2``).
        fake_feats: ``[N, D]`` generated features (``N >= 2``).
        metric: ``"kid"`` or ``"fid"``.
        num_resamples: ``B >= 2``.
        confidence: Coverage of the percentile interval, in ``(0, 1)``.
        seed: Seed of the resampling (``>= 0``).

    Returns:
        A :class:`BootstrapResult` whose ``estimate`` is the metric on the full sets.

    Raises:
        ValueError: Invalid features (see :func:`fid_from_features`), ``metric``,
            ``num_resamples``, ``confidence`` or ``seed``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> real, fake = torch.randn(200, 4, generator=g), torch.randn(100, 4, generator=g)
        >>> res = bootstrap_metric(real, fake + 1.0, metric="fid", num_resamples=200)
        >>> res.low < res.estimate < res.high and res.excludes_zero
        True
    """
    _check_bootstrap(metric, num_resamples, confidence, seed)
    real, fake = _pair(real_feats, fake_feats)
    idx = bootstrap_indices(fake.shape[0], num_resamples=num_resamples, seed=seed).to(fake.device)
    full, vals = _resampled(metric, real, [fake], idx)
    estimate, values = full[0], vals[0]
    if metric == "kid":
        rr = _kid_real_term(real)
        estimate, values = estimate + rr, values + rr
    return _summarise(metric, estimate, values, confidence=confidence, n=fake.shape[0], n_ref=real.shape[0],
                      seed=seed, paired=False)


def paired_bootstrap(
    real_feats: Tensor | np.ndarray,
    fake_a: Tensor | np.ndarray,
    fake_b: Tensor | np.ndarray,
    *,
    metric: BootstrapMetricName = "kid",
    num_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Bootstrap of ``metric(b) - metric(a)`` for two sample sets made from the same noise.

    Row ``i`` of ``fake_a`` and of ``fake_b`` must come from the same starting noise (e.g. two
    samplers fed ``kdiff.eval.sample_noise(seed, range(n), ...)``). Every resample draws one set
    of indices and uses it for both sets, so the noise the two sets share cancels in the
    difference and the interval is much narrower than one built from two separate intervals. The
    difference is significant at ``confidence`` when the interval excludes 0
    (:attr:`BootstrapResult.excludes_zero`); lower FID/KID is better, so a negative difference
    favours ``b``. The metrics are those of :func:`bootstrap_metric` (for KID the reference-only
    term cancels and is not computed).

    Args:
        real_feats: ``[N_r, D]`` reference features.
        fake_a: ``[N, D]`` features of the first set.
        fake_b: ``[N, D]`` features of the second set, row ``i`` paired with row ``i`` of ``fake_a``.
        metric: ``"kid"`` or ``"fid"``.
        num_resamples: ``B >= 2``.
        confidence: Coverage of the percentile interval, in ``(0, 1)``.
        seed: Seed of the resampling (``>= 0``).

    Returns:
        A :class:`BootstrapResult` with ``paired=True`` and ``estimate = metric(b) - metric(a)``
        on the full sets.

    Raises:
        ValueError: Invalid features, ``fake_a`` and ``fake_b`` of different shapes, or an invalid
            ``metric``, ``num_resamples``, ``confidence`` or ``seed``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> real, fake = torch.randn(200, 4, generator=g), torch.randn(100, 4, generator=g)
        >>> same = paired_bootstrap(real, fake, fake.clone(), num_resamples=100)
        >>> same.estimate == 0.0 and not same.excludes_zero
        True
        >>> paired_bootstrap(real, fake, fake + 1.0, num_resamples=100).low > 0
        True
    """
    _check_bootstrap(metric, num_resamples, confidence, seed)
    real, a = _pair(real_feats, fake_a)
    _, b = _pair(real, fake_b)
    if a.shape != b.shape:
        raise ValueError(
            f"fake_a and fake_b must have the same shape (row i of both from the same noise); got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    idx = bootstrap_indices(a.shape[0], num_resamples=num_resamples, seed=seed).to(a.device)
    (full_a, full_b), (vals_a, vals_b) = _resampled(metric, real, [a, b], idx)
    return _summarise(metric, full_b - full_a, vals_b - vals_a, confidence=confidence, n=a.shape[0],
                      n_ref=real.shape[0], seed=seed, paired=True)
