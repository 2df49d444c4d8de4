"""Tests for kdiff.data (CIFAR-10 loader)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import shutil
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from kdiff.data import (
    CIFAR10,
    CIFAR10_CLASS_NAMES,
    DatasetCorruptError,
    DatasetNotFoundError,
    cifar10,
    default_data_root,
    from_model_range,
    load_cifar10_arrays,
    random_hflip,
    to_model_range,
)

_DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _data_root() -> Path:
    env = os.environ.get("KDIFF_DATA_DIR", "").strip()
    return Path(env) if env else _DEFAULT_SHARED


@pytest.fixture(scope="module")
def data_root() -> Path:
    root = _data_root()
    folder = root / "cifar-10-batches-py"
    if not (folder.is_dir() or (root / "test_batch").is_file()):
        pytest.skip(
            f"CIFAR-10 not found at {root} (set KDIFF_DATA_DIR to the folder containing "
            "'cifar-10-batches-py')"
        )
    return root


@pytest.fixture(scope="module")
def train_arrays(data_root: Path) -> tuple[np.ndarray, np.ndarray]:
    return load_cifar10_arrays(data_root, train=True)


@pytest.fixture(scope="module")
def test_dataset(data_root: Path) -> CIFAR10:
    return CIFAR10(data_root, train=False)


# ----------------------------------------------------------------------------- real data


def test_train_arrays_shapes_dtypes_labels(train_arrays):
    images, labels = train_arrays
    assert images.shape == (50000, 32, 32, 3) and images.dtype == np.uint8
    assert images.flags.c_contiguous
    assert labels.shape == (50000,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9
    assert set(np.unique(labels).tolist()) == set(range(10))
    assert images.min() == 0 and images.max() == 255


def test_test_split_arrays(data_root):
    images, labels = load_cifar10_arrays(data_root, train=False)
    assert images.shape == (10000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert set(np.unique(labels).tolist()) == set(range(10))


def test_root_may_be_batch_folder_itself(data_root, test_dataset):
    images, labels = load_cifar10_arrays(data_root / "cifar-10-batches-py", train=False)
    ref_images, ref_labels = test_dataset.tensors()
    assert torch.equal(torch.from_numpy(images).permute(0, 3, 1, 2), ref_images)
    assert torch.equal(torch.from_numpy(labels), ref_labels)


def test_dataset_items_and_tensors(test_dataset):
    ds = test_dataset
    assert len(ds) == 10000
    assert list(ds.class_names) == list(CIFAR10_CLASS_NAMES)
    images, labels = ds.tensors()
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    for i in (0, 1, 9999):
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert -1.0 <= x.min() and x.max() <= 1.0
        assert isinstance(y, int) and 0 <= y <= 9 and y == labels[i]
        assert torch.equal(x, to_model_range(images[i]))
    lo, hi = to_model_range(images[:500]).aminmax()
    assert lo == -1.0 and hi == 1.0


def test_dataset_random_flip(data_root, test_dataset):
    ds = CIFAR10(data_root, train=False, random_flip=True)
    images, _ = test_dataset.tensors()
    torch.manual_seed(0)
    flipped = 0
    for i in range(64):
        x, _ = ds[i]
        ref = to_model_range(images[i])
        if torch.equal(x, ref.flip(-1)) and not torch.equal(x, ref):
            flipped += 1
        else:
            assert torch.equal(x, ref)
    assert 10 < flipped < 54


def test_env_var_is_used(data_root, monkeypatch):
    monkeypatch.setenv("KDIFF_DATA_DIR", str(data_root))
    assert default_data_root() == data_root
    images, labels = load_cifar10_arrays(train=False)
    assert images.shape == (10000, 32, 32, 3) and labels.shape == (10000,)


# ----------------------------------------------------------------------------- helpers


def test_to_model_range_and_back():
    x = torch.arange(256, dtype=torch.uint8)
    y = to_model_range(x)
    assert y.dtype == torch.float32 and y[0] == -1.0 and y[-1] == 1.0
    assert torch.equal(from_model_range(y), x)
    assert to_model_range(x, dtype=torch.float64).dtype == torch.float64
    with pytest.raises(TypeError, match="uint8"):
        to_model_range(y)


def test_random_hflip_per_sample():
    x = torch.randint(0, 256, (256, 3, 8, 8), dtype=torch.uint8)
    out = random_hflip(x, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    mask = torch.rand(256, generator=torch.Generator().manual_seed(1)) < 0.5
    for i in range(256):
        assert torch.equal(out[i], x[i].flip(-1) if mask[i] else x[i])
    assert 80 < int(mask.sum()) < 176
    # reproducible, and p controls flipping
    assert torch.equal(out, random_hflip(x, torch.Generator().manual_seed(1)))
    assert torch.equal(random_hflip(x, p=0.0), x)
    assert torch.equal(random_hflip(x, p=1.0), x.flip(-1))
    # a flip really mirrors the width axis
    row = torch.arange(4.0).view(1, 1, 1, 4)
    assert random_hflip(row, p=1.0).flatten().tolist() == [3.0, 2.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        random_hflip(torch.zeros(3))


# ----------------------------------------------------------------------------- not found


def test_not_found_says_where_it_looked_and_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("KDIFF_DATA_DIR", raising=False)
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10_arrays(root)
    assert isinstance(info.value, FileNotFoundError)
    where, fix = str(info.value).splitlines()  # two lines: callers print the first one alone
    assert f"{root / 'cifar-10-batches-py'} (no such folder)" in where
    assert f"{root} (no such folder)" in where
    assert "--data-dir" in fix and "$KDIFF_DATA_DIR (now unset)" in fix and "download=True" in fix


def test_not_found_reports_missing_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"")
    with pytest.raises(DatasetNotFoundError, match="missing: data_batch_2"):
        CIFAR10(tmp_path, train=True)


def test_default_root_uses_env_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KDIFF_DATA_DIR", raising=False)
    assert default_data_root() == tmp_path / ".cache" / "kdiff" / "data"
    with pytest.raises(DatasetNotFoundError) as info:
        load_cifar10_arrays(train=False)
    assert str(tmp_path / ".cache" / "kdiff" / "data" / "cifar-10-batches-py") in str(info.value)

    env_root = tmp_path / "from-env"
    monkeypatch.setenv("KDIFF_DATA_DIR", str(env_root))
    assert default_data_root() == env_root
    with pytest.raises(DatasetNotFoundError) as info:
        CIFAR10(train=False)
    assert str(env_root / "cifar-10-batches-py") in str(info.value)
    assert f"$KDIFF_DATA_DIR (now {env_root})" in str(info.value)


# ----------------------------------------------------------------------------- corrupt files


def _write_batch(path: Path, n: int, seed: int = 0, data=None, labels=None) -> None:
    rng = np.random.default_rng(seed)
    batch = {
        b"batch_label": b"fake",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8) if data is None else data,
        b"labels": [int(v) for v in rng.integers(0, 10, n)] if labels is None else labels,
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
    }
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def test_corrupt_batch_shape_names_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_batch(folder / "test_batch", 4, data=np.zeros((4, 3000), dtype=np.uint8))
    with pytest.raises(DatasetCorruptError, match="test_batch") as info:
        load_cifar10_arrays(tmp_path, train=False)
    assert "3072" in str(info.value)


def test_corrupt_labels_and_garbage_name_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    _write_batch(folder / "test_batch", 4, labels=[0, 1, 2])
    with pytest.raises(DatasetCorruptError, match=r"test_batch.*4 images"):
        load_cifar10_arrays(folder, train=False)
    _write_batch(folder / "test_batch", 2, labels=[0, 10])
    with pytest.raises(DatasetCorruptError, match="labels outside"):
        load_cifar10_arrays(folder, train=False)
    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetCorruptError, match="test_batch"):
        load_cifar10_arrays(folder, train=False)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickle_globals_are_restricted(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f)
    with pytest.raises(DatasetCorruptError, match="not allowed"):
        load_cifar10_arrays(folder, train=False)
    assert not marker.exists()


# ----------------------------------------------------------------------------- download


def _fake_archive(tmp_path: Path, n: int = 4, extra_member: tarfile.TarInfo | None = None) -> Path:
    src = tmp_path / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    for i in range(1, 6):
        _write_batch(src / f"data_batch_{i}", n, seed=i)
    _write_batch(src / "test_batch", n, seed=9)
    with open(src / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CIFAR10_CLASS_NAMES]}, f)
    archive = tmp_path / "fake-cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
        if extra_member is not None:
            data = b"evil" if extra_member.isreg() else b""
            extra_member.size = len(data)
            tar.addfile(extra_member, io.BytesIO(data) if data else None)
    return archive


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_fetch(monkeypatch):
    calls: list[str] = []

    def install(archive: Path):
        def fetch(url: str, dest: Path) -> None:
            calls.append(url)
            shutil.copyfile(archive, dest)

        monkeypatch.setattr(cifar10, "_fetch_url", fetch)
        return calls

    return install


def test_download_fake_archive_roundtrip(tmp_path, monkeypatch, fake_fetch):
    archive = _fake_archive(tmp_path)
    calls = fake_fetch(archive)
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", _md5(archive))
    root = tmp_path / "root"
    images, labels = load_cifar10_arrays(root, train=True, download=True)
    assert calls == [cifar10.CIFAR10_URL]
    assert images.shape == (20, 32, 32, 3) and labels.shape == (20,)
    # no temporary archive or extraction folder left behind
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]
    # second time: found locally, no fetch
    ds = CIFAR10(root, train=False, download=True)
    assert len(ds) == 4 and calls == [cifar10.CIFAR10_URL]
    assert list(ds.class_names) == list(CIFAR10_CLASS_NAMES)


def test_download_md5_mismatch_raises_and_leaves_nothing(tmp_path, fake_fetch):
    archive = _fake_archive(tmp_path)
    fake_fetch(archive)
    root = tmp_path / "root"
    with pytest.raises(DatasetCorruptError, match="MD5 mismatch") as info:
        load_cifar10_arrays(root, download=True)
    assert cifar10.CIFAR10_MD5 in str(info.value) and _md5(archive) in str(info.value)
    assert list(root.iterdir()) == []


def _member(kind: str, outside: Path) -> tarfile.TarInfo:
    if kind == "traversal":
        return tarfile.TarInfo("cifar-10-batches-py/../../evil.txt")
    member = tarfile.TarInfo(f"cifar-10-batches-py/{kind}")
    member.type = {"device": tarfile.CHRTYPE, "hardlink": tarfile.LNKTYPE}.get(kind, tarfile.SYMTYPE)
    member.linkname = {"symlink-relative": "../../../evil.txt"}.get(kind, str(outside))
    return member


@pytest.mark.parametrize("kind", ["traversal", "symlink-absolute", "symlink-relative", "hardlink",
                                  "device"])
def test_download_refuses_unsafe_members(tmp_path, monkeypatch, fake_fetch, kind):
    outside = tmp_path / "secret.txt"
    outside.write_text("do not touch")
    archive = _fake_archive(tmp_path, extra_member=_member(kind, outside))
    fake_fetch(archive)
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", _md5(archive))
    root = tmp_path / "root"
    with pytest.raises(DatasetCorruptError, match="invalid or unsafe"):
        load_cifar10_arrays(root, download=True)
    assert not (tmp_path / "evil.txt").exists() and outside.read_text() == "do not touch"
    assert list(root.iterdir()) == []  # nothing half-extracted is left


def test_download_absolute_member_stays_inside(tmp_path, monkeypatch, fake_fetch):
    target = tmp_path / "abs-evil.txt"
    archive = _fake_archive(tmp_path, extra_member=tarfile.TarInfo(str(target)))
    fake_fetch(archive)
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", _md5(archive))
    root = tmp_path / "root"
    images, _ = load_cifar10_arrays(root, train=False, download=True)  # "/" is stripped
    assert images.shape == (4, 32, 32, 3) and not target.exists()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]


def test_download_refused_without_tarfile_filters(tmp_path, monkeypatch, fake_fetch):
    calls = fake_fetch(_fake_archive(tmp_path))
    monkeypatch.delattr(cifar10.tarfile, "data_filter")
    with pytest.raises(RuntimeError, match="tarfile filters"):
        load_cifar10_arrays(tmp_path / "root", download=True)
    assert calls == []  # refused before downloading anything


def test_download_offline_raises_not_found(tmp_path, monkeypatch):
    def offline(url: str, dest: Path) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(cifar10, "_fetch_url", offline)
    root = tmp_path / "root"
    with pytest.raises(DatasetNotFoundError) as info:
        CIFAR10(root, download=True)
    msg = str(info.value)
    assert "no network" in msg and str(root / "cifar-10-batches-py") in msg
    assert list(root.iterdir()) == []
