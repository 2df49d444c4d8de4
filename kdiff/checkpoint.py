"""Crash-safe checkpoints: model weights (safetensors + JSON sidecar) and training state.

Two kinds of files are written:

* **Weights** (:func:`save_weights` / :func:`load_weights`): ``<path>`` is a safetensors
  file and ``<path>.json`` a human-readable JSON sidecar holding the user metadata (e.g. the
  noise schedule and prediction type the model was trained with), ``kdiff_version``,
  ``format_version`` and the SHA-256 and size of the weights file. The metadata is also
  embedded in the safetensors header, so the weights file alone is self-describing.
  Loading verifies the hash, so a sidecar never silently describes other weights.
* **Training state** (:func:`save_training_state` / :func:`load_training_state`): any
  nesting of dicts/lists/tuples of tensors and Python scalars (optimizer and LR-scheduler
  state dicts, step counters, RNG states from :func:`capture_rng_state`), written with
  :func:`torch.save` and read back with ``torch.load(..., weights_only=True)`` only, which
  never executes code from the file.

Every file is written to a temporary file in the destination folder, fsynced, renamed over
the target with :func:`os.replace` and the folder is fsynced (:func:`atomic_path`). A process
killed at any moment therefore leaves either the previous file or the new one, never a
partial one. The weights and the sidecar are two files: if a save is killed between the two
renames, :func:`load_weights` reports the hash mismatch (explaining that a save was
interrupted) and ``load_weights(path, verify_sidecar=False)`` still loads the new weights
with the metadata embedded in them.

Example:
    >>> import os, tempfile, torch
    >>> from kdiff.checkpoint import save_weights, load_weights
    >>> path = os.path.join(tempfile.mkdtemp(), "model.safetensors")
    >>> save_weights(path, {"w": torch.ones(2)}, {"prediction_type": "x"})
    >>> sd, meta = load_weights(path, expected={"prediction_type": "x"})
    >>> meta["format_version"]
    1
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_path",
    "atomic_write_bytes",
    "capture_rng_state",
    "load_state_dict_strict",
    "load_training_state",
    "load_weights",
    "restore_rng_state",
    "save_training_state",
    "save_weights",
    "sidecar_path",
]

FORMAT_VERSION = 1
"""Version of the on-disk layout written by this module."""

_RESERVED_KEYS = ("kdiff_version", "format_version", "weights_sha256", "weights_nbytes")
_EMBEDDED_KEY = "kdiff_metadata"
_TRAINING_STATE_TAG = "__kdiff_training_state__"
_WRITE_CHUNK = 8 << 20
_MAX_LISTED = 20

PathLike = str | os.PathLike[str]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, inconsistent or does not match expectations."""


# --------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------


def _file_mode() -> int:
    """Permission bits for new files under the current umask (mkstemp uses 0o600)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success, atomically move it to ``path``.

    The temporary file is created (empty) in the same folder as ``path`` so the final
    :func:`os.replace` is a same-filesystem rename. After the ``with`` block the temporary
    file is fsynced, renamed over ``path`` and the folder is fsynced. If the block raises,
    the temporary file is deleted and ``path`` is untouched. If the process is killed, the
    previous ``path`` is intact (a stray ``.<name>.*.tmp`` file may remain).

    Args:
        path: Final destination. Parent folders are created.

    Yields:
        The temporary path to write to (it may be overwritten or reopened freely).

    Example:
        >>> import os, tempfile
        >>> with atomic_path(os.path.join(tempfile.mkdtemp(), "obj.pt")) as tmp:
        ...     torch.save({"step": 1}, tmp)
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, _file_mode())
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(parent)


def _write_chunk(f: Any, chunk: memoryview) -> None:
    """Write one chunk (a separate function so crash tests can interrupt a write)."""
    f.write(chunk)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (see :func:`atomic_path`).

    Args:
        path: Destination file.
        data: Full new contents.

    Example:
        >>> import os, tempfile
        >>> atomic_write_bytes(os.path.join(tempfile.mkdtemp(), "hello.txt"), b"hello")
    """
    view = memoryview(data)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for start in range(0, len(view), _WRITE_CHUNK):
            _write_chunk(f, view[start : start + _WRITE_CHUNK])
        f.flush()


# --------------------------------------------------------------------------------------
# Weights: safetensors + JSON sidecar
# --------------------------------------------------------------------------------------


def sidecar_path(path: PathLike) -> Path:
    """Return the JSON sidecar path of a weights file (``<path>.json``).

    Example:
        >>> sidecar_path("ckpt/model.safetensors").name
        'model.safetensors.json'
    """
    path = Path(path)
    return path.with_name(path.name + ".json")


def _short(value: Any, limit: int = 200) -> str:
    try:
        text = json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _to_json_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}")
    bad = [k for k in metadata if not isinstance(k, str)]
    if bad:
        raise TypeError(f"metadata keys must be strings, got {bad!r}")
    clash = [k for k in _RESERVED_KEYS if k in metadata]
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved and filled in by save_weights")
    try:
        return json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"metadata must be JSON-serialisable (no NaN/inf, only str keys): {e}"
        ) from e


def _prepare_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, move to CPU, make contiguous and un-share tensors for safetensors."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be strings, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a Tensor")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:
            t = t.clone()  # tied/shared weights: safetensors refuses shared storage
        elif ptr:
            seen.add(ptr)
        out[key] = t
    return out


def save_weights(
    path: PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
) -> None:
    """Save model weights as safetensors plus a JSON sidecar ``<path>.json``.

    Tensors are detached, moved to CPU and made contiguous; tensors sharing storage (tied
    weights) are cloned. The weights file is written first, then the sidecar, each
    atomically. The sidecar contains ``metadata`` plus ``kdiff_version``,
    ``format_version``, ``weights_sha256`` and ``weights_nbytes``; the same metadata (without
    the hash) is embedded in the safetensors header.

    Args:
        path: Destination of the safetensors file (e.g. ``"ckpt/student.safetensors"``).
        state_dict: Mapping of parameter names to tensors (e.g. ``model.state_dict()``).
        metadata: JSON-serialisable dict (e.g. ``{"schedule": {...}, "prediction_type":
            "x"}``). The keys in ``_RESERVED_KEYS`` are filled in here and must not be given.

    Raises:
        TypeError: ``metadata`` is not JSON-serialisable or ``state_dict`` holds non-tensors.
        ValueError: ``metadata`` uses a reserved key.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "lin.safetensors")
        >>> save_weights(path, torch.nn.Linear(2, 2).state_dict(), {"arch": "linear"})
    """
    from safetensors.torch import save as st_save

    from kdiff import __version__

    meta = _to_json_metadata(metadata)
    meta["kdiff_version"] = __version__
    meta["format_version"] = FORMAT_VERSION
    tensors = _prepare_state_dict(state_dict)
    embedded = {_EMBEDDED_KEY: json.dumps(meta, sort_keys=True), "format": "pt"}
    data = st_save(tensors, metadata=embedded)
    sidecar = dict(meta)
    sidecar["weights_sha256"] = hashlib.sha256(data).hexdigest()
    sidecar["weights_nbytes"] = len(data)
    sidecar_bytes = (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(path, data)
    atomic_write_bytes(sidecar_path(path), sidecar_bytes)


def _diff(expected: Any, actual: Any, prefix: str) -> list[str]:
    """Describe differences between two JSON values, recursing into dicts."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        for k in expected:
            sub = f"{prefix}.{k}"
            if k not in actual:
                out.append(f"{sub}: missing in checkpoint, expected {_short(expected[k])}")
            else:
                out.extend(_diff(expected[k], actual[k], sub))
        for k in actual:
            if k not in expected:
                out.append(f"{prefix}.{k}: checkpoint has {_short(actual[k])}, not expected")
        return out
    if type(expected) is bool or type(actual) is bool:
        same = type(expected) is type(actual) and expected == actual
    else:
        same = expected == actual
    return (
        [] if same else [f"{prefix}: checkpoint has {_short(actual)}, expected {_short(expected)}"]
    )


def _check_expected(path: Path, metadata: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    try:
        exp = json.loads(json.dumps(dict(expected)))
    except (TypeError, ValueError) as e:
        raise TypeError(f"expected must be JSON-serialisable: {e}") from e
    problems: list[str] = []
    for key, value in exp.items():
        if key not in metadata:
            problems.append(f"{key}: missing in checkpoint, expected {_short(value)}")
        else:
            problems.extend(_diff(value, metadata[key], key))
    if problems:
        listed = "\n  - ".join(problems[:_MAX_LISTED])
        more = (
            f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        )
        raise CheckpointError(
            f"Checkpoint {path} metadata does not match what was expected "
            f"({len(problems)} difference(s)):\n  - {listed}{more}"
        )


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise CheckpointError(f"{what} {path} does not exist") from e
    except OSError as e:
        raise CheckpointError(f"Cannot read {what} {path}: {e}") from e


def load_weights(
    path: PathLike,
    *,
    expected: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
    verify_sidecar: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load weights written by :func:`save_weights` and check their metadata.

    Args:
        path: The safetensors file (the sidecar is ``<path>.json``).
        expected: Metadata that must match, compared key by key (nested dicts must be
            equal; tuples compare equal to lists). Keys not listed are not checked.
        map_location: Device to put the tensors on.
        verify_sidecar: Require the sidecar and check its SHA-256 against the weights. Set
            to ``False`` to load a weights file alone (e.g. after a save was killed between
            writing the weights and the sidecar); the metadata embedded in the safetensors
            header is then returned.

    Returns:
        ``(state_dict, metadata)``; ``metadata`` includes ``kdiff_version``,
        ``format_version`` and (when read from the sidecar) ``weights_sha256`` and
        ``weights_nbytes``.

    Raises:
        CheckpointError: The file or sidecar is missing or corrupt, the hash does not
            match, or the metadata differs from ``expected``. The message names the file and
            every differing key with both values.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "lin.safetensors")
        >>> model = torch.nn.Linear(2, 2)
        >>> save_weights(path, model.state_dict(), {"arch": "linear"})
        >>> sd, meta = load_weights(path, expected={"arch": "linear"})
        >>> load_state_dict_strict(model, sd, path)
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    data = _read_bytes(path, "Weights file")
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        raise CheckpointError(
            f"Weights file {path} is corrupt or truncated ({len(data)} bytes): {e}"
        ) from e

    embedded = _embedded_metadata(path, data)
    if verify_sidecar:
        side = sidecar_path(path)
        raw = _read_bytes(side, "Metadata sidecar")
        try:
            metadata = json.loads(raw)
            if not isinstance(metadata, dict):
                raise ValueError("top level is not an object")
        except ValueError as e:
            raise CheckpointError(f"Metadata sidecar {side} is not valid JSON: {e}") from e
        want = metadata.get("weights_sha256")
        got = hashlib.sha256(data).hexdigest()
        if want != got:
            raise CheckpointError(
                f"Weights file {path} does not match its sidecar {side}: sha256 of the weights "
                f"is {got} ({len(data)} bytes) but the sidecar records {want} "
                f"({metadata.get('weights_nbytes')} bytes). The weights were modified, or a "
                "save was interrupted between writing the weights and the sidecar; use "
                "load_weights(..., verify_sidecar=False) to load the weights with their "
                "embedded metadata."
            )
        if embedded is not None:
            core = {
                k: v for k, v in metadata.items() if k not in ("weights_sha256", "weights_nbytes")
            }
            if core != embedded:
                raise CheckpointError(
                    f"Metadata sidecar {side} disagrees with the metadata embedded in {path}."
                )
    else:
        if embedded is None:
            raise CheckpointError(f"Weights file {path} has no embedded kdiff metadata")
        metadata = embedded

    if expected is not None:
        _check_expected(path, metadata, expected)
    if torch.device(map_location) != torch.device("cpu"):
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return tensors, metadata


def _embedded_metadata(path: Path, data: bytes) -> dict[str, Any] | None:
    # safetensors layout: 8-byte little-endian header length, then a JSON header.
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + n])
        raw = header.get("__metadata__", {}).get(_EMBEDDED_KEY)
        return None if raw is None else json.loads(raw)
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"Weights file {path} has a malformed header: {e}") from e


def load_state_dict_strict(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: PathLike
) -> None:
    """Load ``state_dict`` into ``module``, with a readable error on any mismatch.

    Args:
        module: Target module.
        state_dict: Tensors to load (e.g. from :func:`load_weights`).
        path: Checkpoint path, used in the error message.

    Raises:
        CheckpointError: Keys are missing or unexpected, or shapes differ. The message
            names the file and lists each problem.

    Example:
        >>> sd = {"weight": torch.zeros(3, 2)}
        >>> load_state_dict_strict(torch.nn.Linear(2, 2), sd, "lin.safetensors")
        Traceback (most recent call last):
        ...
        kdiff.checkpoint.CheckpointError: Checkpoint lin.safetensors does not fit Linear:
          missing keys (1):
            bias
          shape mismatches (1):
            weight: checkpoint (3, 2), model (2, 2)
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:

        def listing(title: str, items: list[str]) -> str:
            if not items:
                return ""
            shown = "\n    ".join(items[:_MAX_LISTED])
            more = (
                f"\n    ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            )
            return f"\n  {title} ({len(items)}):\n    {shown}{more}"

        raise CheckpointError(
            f"Checkpoint {path} does not fit {type(module).__name__}:"
            + listing("missing keys", missing)
            + listing("unexpected keys", unexpected)
            + listing("shape mismatches", shapes)
        )
    module.load_state_dict(dict(state_dict), strict=True)


# --------------------------------------------------------------------------------------
# Training state
# --------------------------------------------------------------------------------------

_SCALARS = (
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    type(None),
    torch.dtype,
    torch.device,
    torch.Size,
)


def _check_weights_only(obj: Any, where: str) -> None:
    """Raise TypeError if ``obj`` cannot round-trip through ``torch.load(weights_only=True)``."""
    t = type(obj)
    if t in (torch.Tensor, torch.nn.Parameter) or t in _SCALARS:
        return
    if t in (dict, OrderedDict):
        for k, v in obj.items():
            _check_weights_only(k, f"{where} key {k!r}")
            _check_weights_only(v, f"{where}[{k!r}]")
        return
    if t in (list, tuple, set):
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} has type {t.__module__}.{t.__qualname__}, which torch.load(weights_only=True) "
        "refuses; convert it to tensors / lists / Python scalars (for RNG states use "
        "capture_rng_state())"
    )


def save_training_state(path: PathLike, state: Mapping[str, Any]) -> None:
    """Atomically save a resumable training state with :func:`torch.save`.

    ``state`` may nest dicts, lists and tuples of tensors and Python scalars: optimizer and
    LR-scheduler ``state_dict()``s, step counters, :func:`capture_rng_state` output, ... It is
    checked up front to be loadable with ``weights_only=True``.

    Args:
        path: Destination file (e.g. ``"run/state.pt"``).
        state: The state to save.

    Raises:
        TypeError: ``state`` contains an object ``weights_only`` loading would refuse (the
            message gives its location, e.g. ``state['rng']['numpy']``).

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "state.pt")
        >>> opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
        >>> state = {"step": 10, "optimizer": opt.state_dict(), "rng": capture_rng_state()}
        >>> save_training_state(path, state)
    """
    from kdiff import __version__

    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    state = dict(state)
    _check_weights_only(state, "state")
    payload = {
        _TRAINING_STATE_TAG: {"format_version": FORMAT_VERSION, "kdiff_version": __version__},
        "state": state,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_training_state(
    path: PathLike, *, map_location: str | torch.device | None = "cpu"
) -> dict[str, Any]:
    """Load a state written by :func:`save_training_state` using ``weights_only=True``.

    Args:
        path: File written by :func:`save_training_state`.
        map_location: Passed to :func:`torch.load`.

    Returns:
        The saved ``state`` dict.

    Raises:
        CheckpointError: The file is missing, corrupt, not a kdiff training state, or holds
            objects that ``weights_only`` loading refuses.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "state.pt")
        >>> save_training_state(path, {"step": 10, "rng": capture_rng_state()})
        >>> state = load_training_state(path)
        >>> restore_rng_state(state["rng"])
        >>> state["step"]
        10
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Training state {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise CheckpointError(
            f"Training state {path} is corrupt or not loadable with weights_only=True: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
    if (
        not isinstance(payload, dict)
        or _TRAINING_STATE_TAG not in payload
        or "state" not in payload
    ):
        raise CheckpointError(f"{path} is not a kdiff training state (missing header)")
    info = payload[_TRAINING_STATE_TAG]
    version = info.get("format_version") if isinstance(info, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"Training state {path} has format_version {version!r}; this kdiff reads "
            f"{FORMAT_VERSION}"
        )
    return payload["state"]


# --------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------


def capture_rng_state(
    generators: Mapping[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Capture Python, NumPy (global), torch CPU and CUDA RNG states.

    The result only holds tensors and Python scalars, so it can be saved with
    :func:`save_training_state` and loaded with ``weights_only=True``.

    Args:
        generators: Optional named :class:`torch.Generator` objects (e.g. a data-sampling
            generator) whose states are captured too.

    Returns:
        A dict to pass to :func:`restore_rng_state`.

    Example:
        >>> rng = capture_rng_state()
        >>> a = torch.rand(3)
        >>> restore_rng_state(rng)
        >>> torch.equal(a, torch.rand(3))
        True
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "numpy": {
            "bit_generator": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    if generators:
        state["generators"] = {name: g.get_state() for name, g in generators.items()}
    return state


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Restore RNG states captured by :func:`capture_rng_state`.

    Args:
        state: Output of :func:`capture_rng_state` (possibly after a save/load round trip).
        generators: Generators to restore, matched by name to those captured.

    Raises:
        KeyError: A generator name was not captured.

    Example:
        >>> restore_rng_state(capture_rng_state())
    """
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state(
        (
            nps["bit_generator"],
            nps["keys"].cpu().numpy().astype(np.uint32),
            nps["pos"],
            nps["has_gauss"],
            nps["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            warnings.warn(
                "RNG state has CUDA states but CUDA is unavailable; skipped", stacklevel=2
            )
        else:
            n = torch.cuda.device_count()
            if len(cuda) != n:
                warnings.warn(
                    f"RNG state has {len(cuda)} CUDA device states but {n} devices are "
                    "visible; restoring the first min of the two",
                    stacklevel=2,
                )
            for i, s in enumerate(cuda[:n]):
                torch.cuda.set_rng_state(s.cpu(), i)
    if generators:
        saved = state.get("generators", {})
        for name, g in generators.items():
            if name not in saved:
                raise KeyError(f"no RNG state captured for generator {name!r}")
            g.set_state(saved[name].cpu())
