"""CIFAR-10 loader for the official "CIFAR-10 python version" layout.

The data lives in a folder named ``cifar-10-batches-py`` holding five pickled training
batches ``data_batch_1`` ... ``data_batch_5``, one test batch ``test_batch`` and
``batches.meta``. Each batch is a dict with bytes keys: ``b"data"`` (a ``uint8`` array of
shape ``[N, 3072]`` where each row is 1024 red, 1024 green and 1024 blue values of a 32x32
image in row-major order) and ``b"labels"`` (``N`` ints in ``0..9``).

Security note:
    The official files are Python pickles, and unpickling untrusted data can execute
    arbitrary code. This module therefore reads them with a *restricted* unpickler that only
    resolves the handful of NumPy globals needed to rebuild an ``ndarray``; any other global
    is refused with :class:`DatasetCorruptError`. Still, only point the loader at copies of
    the dataset you trust.

Locating the data:
    ``root`` may be the folder that contains ``cifar-10-batches-py`` or that folder itself.
    When ``root`` is ``None`` the environment variable ``KDIFF_DATA_DIR`` is used, and when
    that is unset or empty, ``~/.cache/kdiff/data``. With ``download=True`` the official
    archive is fetched into ``root``, its MD5 checked and it is extracted safely and
    atomically.

Example:
    >>> from kdiff.data import CIFAR10, random_hflip, to_model_range
    >>> ds = CIFAR10(train=True)                      # doctest: +SKIP
    >>> images, labels = ds.tensors()  # uint8 [50000, 3, 32, 32], int64   # doctest: +SKIP
    >>> idx = torch.randint(len(ds), (128,))          # doctest: +SKIP
    >>> x = random_hflip(to_model_range(images[idx])) # float32 in [-1, 1]  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "BASE_FOLDER",
    "CIFAR10",
    "CIFAR10_CLASS_NAMES",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DATA_DIR_ENV_VAR",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "default_data_root",
    "download_cifar10",
    "find_cifar10",
    "from_model_range",
    "load_cifar10_arrays",
    "load_cifar10_class_names",
    "random_hflip",
    "to_model_range",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
"""URL of the official CIFAR-10 python archive."""

CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
"""MD5 of the official archive (as published on the CIFAR-10 page)."""

BASE_FOLDER = "cifar-10-batches-py"
"""Name of the folder holding the batch files."""

DATA_DIR_ENV_VAR = "KDIFF_DATA_DIR"
"""Environment variable consulted when ``root`` is ``None``."""

CIFAR10_CLASS_NAMES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""The ten CIFAR-10 class names, indexed by label."""

TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES: tuple[str, ...] = ("test_batch",)
META_FILE = "batches.meta"

_IMAGE_SIZE = 32
_ROW_LEN = 3 * _IMAGE_SIZE * _IMAGE_SIZE  # 3072
_NUM_CLASSES = 10
_DOWNLOAD_TIMEOUT_S = 60.0
_CHUNK = 1 << 20


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files could not be found (and were not, or could not be, downloaded)."""


class DatasetCorruptError(ValueError):
    """A dataset file exists but is malformed, or a download failed its checksum."""


# --------------------------------------------------------------------------------------
# Locating the data
# --------------------------------------------------------------------------------------


def default_data_root() -> Path:
    """Return the data root used when ``root=None``.

    Returns:
        ``$KDIFF_DATA_DIR`` if that environment variable is set and non-empty, otherwise
        ``~/.cache/kdiff/data``.

    Example:
        >>> isinstance(default_data_root(), Path)
        True
    """
    env = os.environ.get(DATA_DIR_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/kdiff/data").expanduser()


def _resolve_root(root: str | os.PathLike[str] | None) -> Path:
    return default_data_root() if root is None else Path(root).expanduser()


def _candidate_dirs(root: Path) -> list[Path]:
    # Accept both ``<root>/cifar-10-batches-py`` and the batch folder itself.
    return [root / BASE_FOLDER, root]


def _split_files(train: bool) -> tuple[str, ...]:
    return TRAIN_FILES if train else TEST_FILES


def _missing_files(folder: Path, names: Sequence[str]) -> list[str]:
    return [n for n in names if not (folder / n).is_file()]


def _describe_candidates(root: Path, train: bool) -> list[str]:
    lines = []
    for d in _candidate_dirs(root):
        if not d.is_dir():
            lines.append(f"  - {d} (does not exist or is not a folder)")
        else:
            missing = _missing_files(d, _split_files(train))
            lines.append(f"  - {d} (missing: {', '.join(missing)})")
    return lines


def _not_found_message(root: Path, train: bool, root_given: bool, extra: str = "") -> str:
    split = "train" if train else "test"
    env = os.environ.get(DATA_DIR_ENV_VAR)
    env_desc = f"currently {env!r}" if env else "currently unset"
    source = (
        "the 'root' argument"
        if root_given
        else f"${DATA_DIR_ENV_VAR}"
        if env and env.strip()
        else "the default cache folder"
    )
    lines = [
        f"CIFAR-10 ({split} split, files {', '.join(_split_files(train))}) not found "
        f"under {root} (from {source}). Looked in:",
        *_describe_candidates(root, train),
    ]
    if extra:
        lines.append(extra)
    lines += [
        "Provide the data in one of these ways:",
        f"  - set the environment variable {DATA_DIR_ENV_VAR} to a folder containing "
        f"'{BASE_FOLDER}' ({env_desc});",
        f"  - pass root=... (the folder containing '{BASE_FOLDER}', or that folder itself);",
        f"  - pass download=True to fetch the official archive ({CIFAR10_URL}, ~163 MB, "
        f"MD5-checked) into {root}.",
    ]
    return "\n".join(lines)


def find_cifar10(
    root: str | os.PathLike[str] | None = None, *, train: bool = True, download: bool = False
) -> Path:
    """Locate the ``cifar-10-batches-py`` folder, downloading it if asked.

    Args:
        root: Folder containing ``cifar-10-batches-py``, or that folder itself. ``None``
            means :func:`default_data_root`.
        train: Which split must be present (train: ``data_batch_1..5``; test:
            ``test_batch``).
        download: Download and extract the official archive into ``root`` if the files are
            not found.

    Returns:
        The folder holding the batch files.

    Raises:
        DatasetNotFoundError: The files are absent and ``download`` is false, or the
            download failed. The message lists every path looked in.
        DatasetCorruptError: The downloaded archive failed its MD5 check or is malformed.

    Example:
        >>> folder = find_cifar10("/data")  # doctest: +SKIP
    """
    root_path = _resolve_root(root)
    needed = _split_files(train)
    for d in _candidate_dirs(root_path):
        if d.is_dir() and not _missing_files(d, needed):
            return d
    if not download:
        raise DatasetNotFoundError(_not_found_message(root_path, train, root is not None))
    folder = download_cifar10(root_path)
    if _missing_files(folder, needed):
        raise DatasetCorruptError(
            f"Downloaded archive extracted to {folder} but it lacks "
            f"{', '.join(_missing_files(folder, needed))}."
        )
    return folder


# --------------------------------------------------------------------------------------
# Download + safe extraction
# --------------------------------------------------------------------------------------


def _fetch_url(url: str, dest: Path) -> None:
    """Stream ``url`` into the file ``dest``. Separate function so tests can replace it."""
    try:
        from tqdm.auto import tqdm  # optional dependency
    except ImportError:  # pragma: no cover - tqdm is optional
        tqdm = None
    with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp, open(dest, "wb") as f:
        total = int(resp.headers.get("Content-Length") or 0) or None
        bar = (
            tqdm(total=total, unit="B", unit_scale=True, desc="CIFAR-10", leave=False)
            if tqdm is not None
            else None
        )
        try:
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()


def _md5_of(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract regular files and folders of a tar archive into ``dest``.

    Rejects absolute names, ``..`` components, links, devices and anything that would land
    outside ``dest``. Files are written by this function (not by ``tarfile``), so no
    permissions, owners or timestamps from the archive are applied.
    """
    dest = dest.resolve()
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            name = member.name
            parts = PurePosixPath(name).parts
            if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise DatasetCorruptError(f"Unsafe path {name!r} in archive {archive}.")
            target = (dest / Path(*parts)).resolve() if parts else dest
            if target != dest and dest not in target.parents:
                raise DatasetCorruptError(f"Unsafe path {name!r} in archive {archive}.")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
            elif member.isreg():
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - isreg() members always have data
                    raise DatasetCorruptError(f"Cannot read {name!r} from archive {archive}.")
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
            else:
                raise DatasetCorruptError(
                    f"Refusing to extract {name!r} from {archive}: only regular files and "
                    "folders are allowed (links and special files are rejected)."
                )


def download_cifar10(
    root: str | os.PathLike[str] | None = None,
    *,
    url: str | None = None,
    md5: str | None = None,
) -> Path:
    """Download, verify and extract the official CIFAR-10 python archive.

    The archive is streamed to a temporary file inside ``root``, its MD5 is verified, it is
    extracted into a temporary folder inside ``root`` and finally the complete
    ``cifar-10-batches-py`` folder is moved into place with a single rename, so an
    interrupted download never leaves a half-populated dataset folder behind. If the folder
    already exists and is complete, nothing is downloaded.

    Args:
        root: Destination folder (``None``: :func:`default_data_root`).
        url: Archive URL (default :data:`CIFAR10_URL`).
        md5: Expected MD5 hex digest (default :data:`CIFAR10_MD5`).

    Returns:
        Path of the extracted ``cifar-10-batches-py`` folder.

    Raises:
        DatasetNotFoundError: The download failed (e.g. offline).
        DatasetCorruptError: MD5 mismatch, unsafe archive member, or the archive does not
            contain ``cifar-10-batches-py``.

    Example:
        >>> download_cifar10("~/datasets")  # doctest: +SKIP
        PosixPath('/home/me/datasets/cifar-10-batches-py')
    """
    root_path = _resolve_root(root)
    url = CIFAR10_URL if url is None else url
    md5 = CIFAR10_MD5 if md5 is None else md5
    final = root_path / BASE_FOLDER
    required = (*TRAIN_FILES, *TEST_FILES)
    if final.is_dir() and not _missing_files(final, required):
        return final
    root_path.mkdir(parents=True, exist_ok=True)

    fd, tmp_name = tempfile.mkstemp(dir=root_path, prefix=".cifar-10-python.", suffix=".part")
    os.close(fd)
    archive = Path(tmp_name)
    work = Path(tempfile.mkdtemp(dir=root_path, prefix=".cifar-10-extract."))
    try:
        try:
            _fetch_url(url, archive)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise DatasetNotFoundError(
                _not_found_message(
                    root_path, True, root is not None, extra=f"Download of {url} failed: {e}"
                )
            ) from e
        got = _md5_of(archive)
        if got != md5:
            raise DatasetCorruptError(
                f"MD5 mismatch for archive downloaded from {url}: expected {md5}, got {got}. "
                "The download may be incomplete or tampered with; nothing was extracted."
            )
        try:
            _safe_extract(archive, work)
        except (tarfile.TarError, EOFError) as e:
            raise DatasetCorruptError(
                f"Archive downloaded from {url} is not a valid tar: {e}"
            ) from e
        extracted = work / BASE_FOLDER
        if not extracted.is_dir() or _missing_files(extracted, required):
            raise DatasetCorruptError(
                f"Archive downloaded from {url} does not contain a complete '{BASE_FOLDER}' "
                f"folder (needs {', '.join(required)})."
            )
        if final.exists():
            if final.is_dir() and not _missing_files(final, required):
                return final  # another process finished first
            raise DatasetCorruptError(
                f"{final} exists but is incomplete; remove it and retry the download."
            )
        os.replace(extracted, final)
        return final
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Reading batches
# --------------------------------------------------------------------------------------


def _numpy_reconstruct() -> Any:
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return importlib.import_module(mod)._reconstruct
        except (ImportError, AttributeError):
            continue
    raise ImportError("cannot find numpy's multiarray._reconstruct")  # pragma: no cover


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the globals needed for NumPy arrays."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "numpy":
            return getattr(np, name)
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DatasetCorruptError(f"Cannot unpickle CIFAR-10 file {path}: {e}") from e


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load one batch file as (``uint8 [N, 3072]``, ``int64 [N]``), validating it."""
    obj = _unpickle(path)
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        keys = sorted(map(repr, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DatasetCorruptError(
            f"CIFAR-10 file {path} is corrupt: expected a dict with keys b'data' and "
            f"b'labels', got {keys}."
        )
    data = obj[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        desc = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DatasetCorruptError(
            f"CIFAR-10 file {path} is corrupt: b'data' should be a uint8 [N, {_ROW_LEN}] "
            f"array, got {desc}."
        )
    if data.shape[1] != _ROW_LEN or data.shape[0] == 0:
        raise DatasetCorruptError(
            f"CIFAR-10 file {path} is corrupt: b'data' should have shape [N, {_ROW_LEN}] "
            f"with N > 0, got {tuple(data.shape)}."
        )
    try:
        labels = np.asarray(obj[b"labels"], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DatasetCorruptError(f"CIFAR-10 file {path}: b'labels' is not a list of ints.") from e
    if labels.shape != (data.shape[0],):
        raise DatasetCorruptError(
            f"CIFAR-10 file {path} is corrupt: {data.shape[0]} images but labels have "
            f"shape {labels.shape}."
        )
    if labels.min() < 0 or labels.max() >= _NUM_CLASSES:
        raise DatasetCorruptError(
            f"CIFAR-10 file {path} is corrupt: labels outside 0..{_NUM_CLASSES - 1} "
            f"(min {labels.min()}, max {labels.max()})."
        )
    return data, labels


def _load_split_flat(
    root: str | os.PathLike[str] | None, train: bool, download: bool
) -> tuple[np.ndarray, np.ndarray, Path]:
    folder = find_cifar10(root, train=train, download=download)
    parts = [_load_batch(folder / name) for name in _split_files(train)]
    data = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return data, labels, folder


def load_cifar10_arrays(
    root: str | os.PathLike[str] | None = None, *, train: bool = True, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Load a CIFAR-10 split as NumPy arrays.

    Args:
        root: Folder containing ``cifar-10-batches-py`` or that folder itself (``None``:
            ``$KDIFF_DATA_DIR``, else ``~/.cache/kdiff/data``).
        train: ``True`` for the 50,000 training images, ``False`` for the 10,000 test ones.
        download: Download the official archive if the files are not found.

    Returns:
        ``(images, labels)``: ``uint8`` array ``[N, 32, 32, 3]`` (HWC, RGB) and ``int64``
        array ``[N]`` with values in ``0..9``.

    Raises:
        DatasetNotFoundError: Data not found (message lists the paths looked in).
        DatasetCorruptError: A batch file is malformed (message names the file).

    Example:
        >>> images, labels = load_cifar10_arrays(train=False)  # doctest: +SKIP
        >>> images.shape, labels.shape                          # doctest: +SKIP
        ((10000, 32, 32, 3), (10000,))
    """
    data, labels, _ = _load_split_flat(root, train, download)
    images = data.reshape(-1, 3, _IMAGE_SIZE, _IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def load_cifar10_class_names(root: str | os.PathLike[str] | None = None) -> list[str]:
    """Read the class names from ``batches.meta``.

    Falls back to :data:`CIFAR10_CLASS_NAMES` when the meta file is absent.

    Args:
        root: As for :func:`load_cifar10_arrays`.

    Returns:
        The ten class names, indexed by label.

    Raises:
        DatasetCorruptError: ``batches.meta`` exists but is malformed.

    Example:
        >>> load_cifar10_class_names()[:2]  # doctest: +SKIP
        ['airplane', 'automobile']
    """
    root_path = _resolve_root(root)
    for d in _candidate_dirs(root_path):
        meta = d / META_FILE
        if meta.is_file():
            obj = _unpickle(meta)
            names = obj.get(b"label_names") if isinstance(obj, dict) else None
            if not isinstance(names, list) or len(names) != _NUM_CLASSES:
                raise DatasetCorruptError(
                    f"CIFAR-10 file {meta} is corrupt: expected b'label_names' with "
                    f"{_NUM_CLASSES} entries."
                )
            return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return list(CIFAR10_CLASS_NAMES)


# --------------------------------------------------------------------------------------
# Tensor helpers
# --------------------------------------------------------------------------------------


def to_model_range(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Map ``uint8`` pixels in ``[0, 255]`` to floats in ``[-1, 1]`` (``x / 127.5 - 1``).

    Args:
        x: ``uint8`` tensor of any shape (e.g. a batch ``[N, 3, 32, 32]``).
        dtype: Floating output dtype.

    Returns:
        Tensor of ``dtype`` with the same shape and device as ``x``.

    Raises:
        TypeError: ``x`` is not ``uint8``.

    Example:
        >>> to_model_range(torch.tensor([0, 255], dtype=torch.uint8))
        tensor([-1.,  1.])
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects a uint8 tensor, got {x.dtype}")
    return x.to(dtype) / 127.5 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_model_range`: clamp to ``[-1, 1]`` and round to ``uint8``.

    Args:
        x: Floating tensor in (approximately) ``[-1, 1]``.

    Returns:
        ``uint8`` tensor of the same shape.

    Example:
        >>> from_model_range(torch.tensor([-1.0, 0.0, 1.0]))
        tensor([  0, 128, 255], dtype=torch.uint8)
    """
    return ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def random_hflip(
    x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> torch.Tensor:
    """Flip each image of a batch left-right independently with probability ``p``.

    Args:
        x: Batch ``[N, ..., H, W]`` (any dtype); the last dimension is width.
        generator: Optional generator on ``x.device`` for reproducible flips.
        p: Flip probability per sample.

    Returns:
        New tensor of the same shape, dtype and device.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> random_hflip(torch.arange(4.0).view(2, 1, 1, 2), g).shape
        torch.Size([2, 1, 1, 2])
    """
    if x.ndim < 2:
        raise ValueError(f"random_hflip expects a batch [N, ..., W], got shape {tuple(x.shape)}")
    mask = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    mask = mask.view(-1, *([1] * (x.ndim - 1)))
    return torch.where(mask, x.flip(-1), x)


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


class CIFAR10(Dataset):
    """CIFAR-10 as a map-style :class:`torch.utils.data.Dataset`.

    All images of the split are held in memory as one ``uint8`` tensor
    ``[N, 3, 32, 32]`` (about 150 MB for the training split).

    Args:
        root: Folder containing ``cifar-10-batches-py`` or that folder itself (``None``:
            ``$KDIFF_DATA_DIR``, else ``~/.cache/kdiff/data``).
        train: Training split (50,000 images) or test split (10,000).
        download: Download the official archive if the files are not found.
        random_flip: Flip each returned image left-right with probability 0.5 (uses the
            global torch RNG, which DataLoader seeds per worker).

    Attributes:
        class_names: The ten class names, indexed by label.
        folder: The ``cifar-10-batches-py`` folder the data was read from.

    Example:
        >>> ds = CIFAR10(train=False)      # doctest: +SKIP
        >>> x, y = ds[0]  # float32 [3, 32, 32] in [-1, 1], int   # doctest: +SKIP
        >>> images, labels = ds.tensors()  # uint8 [10000, 3, 32, 32]  # doctest: +SKIP
    """

    class_names: tuple[str, ...] = CIFAR10_CLASS_NAMES

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        train: bool = True,
        download: bool = False,
        random_flip: bool = False,
    ) -> None:
        data, labels, folder = _load_split_flat(root, train, download)
        self.train = train
        self.random_flip = random_flip
        self.folder = folder
        self._images = torch.from_numpy(
            data.reshape(-1, 3, _IMAGE_SIZE, _IMAGE_SIZE).copy()
        ).contiguous()
        self._labels = torch.from_numpy(labels)
        if (folder / META_FILE).is_file():
            self.class_names = tuple(load_cifar10_class_names(folder))

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = to_model_range(self._images[index])
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(self._labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the whole split as tensors for on-device batch sampling.

        Returns:
            ``(images, labels)``: ``uint8`` ``[N, 3, 32, 32]`` and ``int64`` ``[N]``. These
            are the dataset's own buffers (not copies); do not modify them in place.

        Example:
            >>> images, labels = CIFAR10().tensors()  # doctest: +SKIP
            >>> images = images.cuda()                 # doctest: +SKIP
            >>> idx = torch.randint(len(images), (128,), device=images.device)  # doctest: +SKIP
            >>> x = random_hflip(to_model_range(images[idx]))  # doctest: +SKIP
        """
        return self._images, self._labels

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return (
            f"CIFAR10(split={split!r}, size={len(self)}, folder={str(self.folder)!r}, "
            f"random_flip={self.random_flip})"
        )
