"""CIFAR-10 loader for the official "CIFAR-10 python version" layout.

The folder ``cifar-10-batches-py`` holds the training batches ``data_batch_1`` ...
``data_batch_5`` and ``test_batch``: pickled dicts with bytes keys, ``b"data"`` a ``uint8``
``[N, 3072]`` array (per row 1024 red, 1024 green, 1024 blue values of a 32x32 image, row-major)
and ``b"labels"`` ``N`` ints in ``0..9``.

``root`` is the folder containing ``cifar-10-batches-py`` or that folder itself (``None``:
``$KDIFF_DATA_DIR``, else ``~/.cache/kdiff/data``). The batch files are pickles, which can run
code when unpickled: a restricted unpickler resolves only what rebuilds a NumPy array.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - NumPy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

__all__ = [
    "BASE_FOLDER", "CIFAR10", "CIFAR10_CLASS_NAMES", "CIFAR10_MD5", "CIFAR10_URL",
    "DATA_DIR_ENV_VAR", "DatasetCorruptError", "DatasetNotFoundError", "default_data_root",
    "download_cifar10", "find_cifar10", "from_model_range", "load_cifar10_arrays",
    "random_hflip", "to_model_range",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  #: official archive
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  #: MD5 published on the CIFAR-10 page
BASE_FOLDER = "cifar-10-batches-py"  #: folder holding the batch files
DATA_DIR_ENV_VAR = "KDIFF_DATA_DIR"  #: consulted when ``root`` is ``None``

CIFAR10_CLASS_NAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
"""The ten CIFAR-10 class names, indexed by label."""

TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES: tuple[str, ...] = ("test_batch",)
_ROW_LEN = 3 * 32 * 32
_Root = str | os.PathLike[str] | None


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files could not be found (and were not, or could not be, downloaded)."""


class DatasetCorruptError(ValueError):
    """A dataset file exists but is malformed, or a download failed its checksum."""


def default_data_root() -> Path:
    """``$KDIFF_DATA_DIR`` if set and non-empty, else ``~/.cache/kdiff/data``.

    Example:
        >>> root = default_data_root()  # e.g. PosixPath('/home/me/.cache/kdiff/data')
    """
    env = os.environ.get(DATA_DIR_ENV_VAR, "").strip()
    return Path(env or "~/.cache/kdiff/data").expanduser()


def _root(root: _Root) -> Path:
    return default_data_root() if root is None else Path(root).expanduser()


def _missing(folder: Path, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not (folder / n).is_file()]


def find_cifar10(root: _Root = None, *, train: bool = True, download: bool = False) -> Path:
    """Locate the ``cifar-10-batches-py`` folder holding a split, downloading it if asked.

    Args:
        root: Folder containing ``cifar-10-batches-py``, or that folder itself (``None``:
            :func:`default_data_root`).
        train: Split that must be present (``data_batch_1..5`` or ``test_batch``).
        download: Download the official archive into ``root`` if the files are not found.

    Raises:
        DatasetNotFoundError: The files are absent (and ``download`` is false or failed); the
            message's first line says where it looked, the second how to provide the data.
        DatasetCorruptError: As for :func:`download_cifar10`.

    Example:
        >>> folder = find_cifar10("/data")  # doctest: +SKIP
    """
    base, needed = _root(root), TRAIN_FILES if train else TEST_FILES
    for folder in (base / BASE_FOLDER, base):
        if folder.is_dir() and not _missing(folder, needed):
            return folder
    if download:
        return download_cifar10(base)
    looked = "; ".join(f"{d} (missing: {', '.join(_missing(d, needed))})" if d.is_dir()
                       else f"{d} (no such folder)" for d in (base / BASE_FOLDER, base))
    raise DatasetNotFoundError(
        f"CIFAR-10 {'train' if train else 'test'} split not found; looked in {looked}.\n"
        f"Fix: point --data-dir / root= or ${DATA_DIR_ENV_VAR} (now "
        f"{os.environ.get(DATA_DIR_ENV_VAR) or 'unset'}) at the folder holding "
        f"'{BASE_FOLDER}', or pass download=True when online (~163 MB, MD5-checked)."
    )


def _fetch_url(url: str, dest: Path) -> None:
    """Stream ``url`` into ``dest`` (a function of its own so tests can replace it)."""
    with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as f:
        shutil.copyfileobj(resp, f, 1 << 20)


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download_cifar10(root: _Root = None, *, url: str | None = None, md5: str | None = None) -> Path:
    """Download, verify and extract the official CIFAR-10 python archive into ``root``.

    The archive is MD5-checked, extracted into a temporary folder in ``root`` with ``tarfile``'s
    ``"data"`` filter (which refuses ``..``, links out of the folder and device files), and the
    complete ``cifar-10-batches-py`` is moved into place with one rename, so an interrupted
    download leaves no partial dataset. A complete folder already there is returned as is.

    Args:
        root: Destination folder (``None``: :func:`default_data_root`).
        url, md5: Archive URL and its MD5 (default :data:`CIFAR10_URL`, :data:`CIFAR10_MD5`).

    Raises:
        DatasetNotFoundError: The download failed (e.g. offline).
        DatasetCorruptError: MD5 mismatch, or an unsafe, invalid or incomplete archive.
        RuntimeError: ``tarfile`` has no extraction filters (Python < 3.10.12 / 3.11.4).

    Example:
        >>> download_cifar10("~/datasets")  # doctest: +SKIP
    """
    base, url, md5 = _root(root), url or CIFAR10_URL, md5 or CIFAR10_MD5
    final, required = base / BASE_FOLDER, TRAIN_FILES + TEST_FILES
    if final.is_dir() and not _missing(final, required):
        return final
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError(f"Safe extraction needs tarfile filters (Python >= 3.10.12 / 3.11.4); "
                           f"download {url} and extract it into {base} by hand.")
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base, prefix=".cifar-10-download."))
    archive = work / "archive.tar.gz"
    try:
        try:
            _fetch_url(url, archive)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise DatasetNotFoundError(f"Download of {url} into {final} failed: {e}") from e
        if (got := _md5(archive)) != md5:
            raise DatasetCorruptError(f"MD5 mismatch for {url}: expected {md5}, got {got}; the "
                                      "download is incomplete or altered, nothing was extracted.")
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(work / "x", filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DatasetCorruptError(f"Archive from {url} is invalid or unsafe: {e}") from e
        if _missing(work / "x" / BASE_FOLDER, required):
            raise DatasetCorruptError(f"Archive from {url} has no complete '{BASE_FOLDER}' folder.")
        if not final.exists():  # another process may have finished first
            os.replace(work / "x" / BASE_FOLDER, final)
        if _missing(final, required):
            raise DatasetCorruptError(f"{final} exists but is incomplete; remove it and retry.")
        return final
    finally:
        shutil.rmtree(work, ignore_errors=True)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals needed to rebuild NumPy arrays."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        if name == "_reconstruct":  # either module name: NumPy 2 renamed numpy.core to numpy._core
            return _reconstruct
        return getattr(np, name) if module == "numpy" else super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DatasetCorruptError(f"Cannot unpickle CIFAR-10 file {path}: {e}") from e


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch as (``uint8 [N, 3072]``, ``int64 [N]``), validated."""

    def check(ok: bool, problem: str) -> None:
        if not ok:
            raise DatasetCorruptError(f"CIFAR-10 file {path} is corrupt: {problem}.")
    obj = _unpickle(path)
    data = obj.get(b"data") if isinstance(obj, dict) else None
    check(isinstance(data, np.ndarray), f"expected a dict with a b'data' array, got {type(obj)}")
    check(data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == _ROW_LEN and len(data) > 0,
          f"b'data' should be a uint8 [N, {_ROW_LEN}] array, got {data.dtype} {data.shape}")
    labels = obj.get(b"labels")
    check(isinstance(labels, list) and len(labels) == len(data)
          and all(isinstance(v, int) for v in labels),
          f"{len(data)} images but b'labels' is not a list of as many ints")
    labels = np.asarray(labels, dtype=np.int64)
    check(labels.min() >= 0 and labels.max() <= 9,
          f"labels outside 0..9 (min {labels.min()}, max {labels.max()})")
    return data, labels


def _load_split(root: _Root, train: bool, download: bool) -> tuple[np.ndarray, np.ndarray, Path]:
    folder = find_cifar10(root, train=train, download=download)
    parts = [_load_batch(folder / name) for name in (TRAIN_FILES if train else TEST_FILES)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), folder


def load_cifar10_arrays(
    root: _Root = None, *, train: bool = True, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Load a CIFAR-10 split as NumPy arrays.

    Args:
        root, train, download: As for :class:`CIFAR10`.

    Returns:
        ``uint8`` images ``[N, 32, 32, 3]`` (HWC, RGB) and ``int64`` labels ``[N]`` in ``0..9``.

    Raises:
        DatasetNotFoundError, DatasetCorruptError: As for :class:`CIFAR10`.

    Example:
        >>> images, labels = load_cifar10_arrays(train=False)  # doctest: +SKIP
    """
    data, labels, _ = _load_split(root, train, download)
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def to_model_range(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map ``uint8`` pixels in ``[0, 255]`` to floats in ``[-1, 1]`` (``x / 127.5 - 1``).

    Raises ``TypeError`` for another dtype.

    Example:
        >>> to_model_range(torch.tensor([0, 255], dtype=torch.uint8))
        tensor([-1.,  1.])
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects a uint8 tensor, got {x.dtype}")
    return x.to(dtype) / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_model_range`: clamp to ``[-1, 1]`` and round to ``uint8``.

    Example:
        >>> from_model_range(torch.tensor([-1.0, 0.0, 1.0]))
        tensor([  0, 128, 255], dtype=torch.uint8)
    """
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None,
                 p: float = 0.5) -> torch.Tensor:
    """Flip each image of a batch ``[N, ..., W]`` left-right independently with probability ``p``.

    Args:
        x: Batch of any dtype; the last dimension is the width.
        generator: Generator on ``x.device`` for reproducible flips.
        p: Flip probability per sample.

    Example:
        >>> random_hflip(torch.arange(4.0).view(2, 1, 1, 2), p=1.0).flatten().tolist()
        [1.0, 0.0, 3.0, 2.0]
    """
    if x.ndim < 2:
        raise ValueError(f"random_hflip expects a batch [N, ..., W], got shape {tuple(x.shape)}")
    mask = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    return torch.where(mask.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


class CIFAR10(Dataset):
    """CIFAR-10 as a map-style dataset, the whole split in memory as ``uint8 [N, 3, 32, 32]``.

    Args:
        root: As for :func:`find_cifar10`.
        train: Training split (50,000 images) or test split (10,000).
        download: Download the official archive if the files are not found.
        random_flip: Flip each returned image left-right with probability 0.5 (global torch RNG,
            which ``DataLoader`` seeds per worker).

    Attributes:
        folder: The ``cifar-10-batches-py`` folder the data was read from.
        class_names: :data:`CIFAR10_CLASS_NAMES`, indexed by label.

    Raises:
        DatasetNotFoundError: Data not found (the message says where it looked).
        DatasetCorruptError: A batch file is malformed (the message names it).

    Example:
        >>> x, y = CIFAR10(train=False)[0]  # float32 [3, 32, 32] in [-1, 1], int  # doctest: +SKIP
    """

    class_names: tuple[str, ...] = CIFAR10_CLASS_NAMES

    def __init__(self, root: _Root = None, *, train: bool = True, download: bool = False,
                 random_flip: bool = False) -> None:
        data, labels, self.folder = _load_split(root, train, download)
        self.train, self.random_flip = train, random_flip
        self._images = torch.from_numpy(data.reshape(-1, 3, 32, 32))
        self._labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = to_model_range(self._images[index])
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self._labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The split as ``uint8 [N, 3, 32, 32]`` and ``int64 [N]`` (the dataset's own buffers), e.g.
        to sample batches on the device: ``images, labels = CIFAR10().tensors()``."""
        return self._images, self._labels

    def __repr__(self) -> str:
        split, flip = "train" if self.train else "test", self.random_flip
        return f"CIFAR10({split=}, size={len(self)}, folder='{self.folder}', random_flip={flip})"
