"""Crash-safe files: model weights (safetensors) and resumable training state (``torch.save``).

A weights file's safetensors header is the only record of its metadata (the caller's JSON plus
``kdiff_version`` and ``format_version``) and holds a SHA-256 of that metadata and the tensors,
checked on every load. A training state is read with ``torch.load(..., weights_only=True)`` only,
which never runs code from the file. Each file is written to a new temporary file in the target's
folder, fsynced, renamed over the target with :func:`os.replace`, and the folder is fsynced: a
process killed at any moment leaves the previous file or the new one, never a partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from kdiff.io.hashing import sha256_state_dict

#: On-disk layout written here; version 1 (kdiff 0.1.0) kept the hash in ``<path>.json``.
FORMAT_VERSION = 2
#: Metadata keys filled in by :func:`save_weights` / :func:`load_weights`, never by callers.
RESERVED_KEYS = ("kdiff_version", "format_version", "weights_sha256")
_META_KEY, _HASH_KEY = "kdiff_metadata", "kdiff_sha256"  # safetensors header entries
_STATE_TAG = "__kdiff_training_state__"
_MISSING: Any = object()
PathLike = str | os.PathLike[str]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not match what was expected."""


@contextmanager
def _atomic_open(path: PathLike) -> Iterator[IO[bytes]]:
    """Yield a new temporary file next to ``path``; once the block succeeds, it becomes ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as f:  # same folder, so os.replace is a rename; mode follows umask
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # persist the rename itself (other systems cannot open folders)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (parent folders are created).

    Example:
        >>> atomic_write_bytes("hello.txt", b"hello")
    """
    with _atomic_open(path) as f:
        f.write(data)


def _integrity(meta_text: str, tensors: Mapping[str, torch.Tensor]) -> str:
    return hashlib.sha256(f"{meta_text}|{sha256_state_dict(tensors)}".encode()).hexdigest()


def save_weights(path: PathLike, state_dict: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, Any]) -> None:
    """Save weights and their metadata as one safetensors file, atomically.

    Args:
        path: Destination (e.g. ``"ckpt/student.safetensors"``).
        state_dict: Names to tensors; they are saved from CPU, contiguous, tied ones un-shared.
        metadata: JSON-serialisable dict (e.g. ``{"schedule": {...}, "prediction_type": "x"}``)
            without the :data:`RESERVED_KEYS`.

    Raises:
        TypeError: ``metadata`` is not JSON-serialisable or ``state_dict`` holds non-tensors.
        ValueError: ``metadata`` uses a reserved key.

    Example:
        >>> save_weights("lin.safetensors", torch.nn.Linear(2, 2).state_dict(), {"arch": "lin"})
    """
    from safetensors.torch import save  # optional dependency (kdiff[train])

    from kdiff import __version__

    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}")
    if clash := [k for k in RESERVED_KEYS if k in metadata]:
        raise ValueError(f"metadata keys {clash} are reserved and filled in by save_weights")
    try:
        meta = {**metadata, "kdiff_version": __version__, "format_version": FORMAT_VERSION}
        text = json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata must be JSON-serialisable (str keys, no NaN/inf): {e}") from e
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(value).__name__}, not a Tensor")
        t = value.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        tensors[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    header = {"format": "pt", _META_KEY: text, _HASH_KEY: _integrity(text, tensors)}
    atomic_write_bytes(path, save(tensors, metadata=header))


def load_weights(
    path: PathLike, *, expected: Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load weights written by :func:`save_weights`, verify their hash and check their metadata.

    Args:
        path: The safetensors file.
        expected: Metadata that must match, key by key (nested dicts must be equal, tuples equal
            lists, ``True`` is not ``1``). Keys not listed are not checked.
        map_location: Device to put the tensors on.

    Returns:
        ``(state_dict, metadata)``; ``metadata`` also holds ``kdiff_version``,
        ``format_version`` and ``weights_sha256`` (the file's SHA-256, as ``sha256sum``).

    Raises:
        CheckpointError: The file is missing, corrupt or altered (hash mismatch), or its
            metadata differs from ``expected`` (every differing key is listed with both values).

    Example:
        >>> save_weights("lin.safetensors", {"w": torch.ones(2)}, {"arch": "lin"})
        >>> sd, meta = load_weights("lin.safetensors", expected={"arch": "lin"})
        >>> meta["format_version"], sd["w"]
        (2, tensor([1., 1.]))
    """
    from safetensors.torch import load  # optional dependency (kdiff[train])

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist or is not a file")
    data = path.read_bytes()
    try:  # safetensors layout: 8-byte little-endian header length, JSON header, tensor bytes
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
        metadata = json.loads(header[_META_KEY])
        version = metadata["format_version"]
        tensors = load(data)
    except Exception as e:  # noqa: BLE001 - any parse failure of the bytes means "corrupt"
        raise CheckpointError(f"Checkpoint {path} is corrupt, truncated or not a kdiff weights "
                              f"file ({len(data)} bytes): {type(e).__name__}: {e}") from None
    file_sha = hashlib.sha256(data).hexdigest()
    if version == 1:  # kdiff 0.1.0 files: the file's hash is in <path>.json
        side = path.with_name(path.name + ".json")
        try:
            want, got = json.loads(side.read_text())["weights_sha256"], file_sha
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"Checkpoint {path} (format 1) needs {side}: {e}") from None
    elif version == FORMAT_VERSION:
        want, got = header.get(_HASH_KEY), _integrity(header[_META_KEY], tensors)
    else:
        raise CheckpointError(f"Checkpoint {path} has format_version {version!r}; this kdiff "
                              f"reads 1 and {FORMAT_VERSION}")
    if want != got:
        raise CheckpointError(f"Checkpoint {path} fails its integrity check: its SHA-256 is {got}, "
                              f"{want} was recorded when it was saved; it was modified or damaged")
    metadata["weights_sha256"] = file_sha
    try:  # compare in JSON terms: tuples are lists
        exp = json.loads(json.dumps(dict(expected or {})))
    except (TypeError, ValueError) as e:
        raise TypeError(f"expected must be JSON-serialisable: {e}") from e
    if problems := [p for k, v in exp.items() for p in _diff(v, metadata.get(k, _MISSING), k)]:
        raise CheckpointError(
            f"Checkpoint {path} metadata does not match what was expected "
            f"({len(problems)} difference(s)):" + _listing([f"- {p}" for p in problems], "  ")
        )
    return {k: v.to(map_location) for k, v in tensors.items()}, metadata


def _diff(want: Any, got: Any, key: str) -> list[str]:
    """Differences between two JSON values, recursing into dicts."""
    if isinstance(want, dict) and isinstance(got, dict):
        return [p for k in sorted(want.keys() | got.keys())
                for p in _diff(want.get(k, _MISSING), got.get(k, _MISSING), f"{key}.{k}")]
    if want == got and (type(want) is bool) == (type(got) is bool):
        return []
    w, g = (json.dumps(v, sort_keys=True, default=repr)[:200] for v in (want, got))
    return [f"{key}: checkpoint has {g}, not expected" if want is _MISSING else
            f"{key}: missing in checkpoint, expected {w}" if got is _MISSING else
            f"{key}: checkpoint has {g}, expected {w}"]


def _listing(items: list[str], indent: str, limit: int = 20) -> str:
    more = [f"... and {len(items) - limit} more"] if len(items) > limit else []
    return "".join(f"\n{indent}{item}" for item in items[:limit] + more)


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                           path: PathLike) -> None:
    """Load ``state_dict`` into ``module``; any key or shape mismatch raises, each one listed.

    Args:
        module: Target module.
        state_dict: Tensors to load (e.g. from :func:`load_weights`).
        path: Checkpoint path, named in the error message.

    Raises:
        CheckpointError: Keys are missing or unexpected, or shapes differ; the message lists
            each one (e.g. ``weight: checkpoint (3, 2), model (2, 2)``).

    Example:
        >>> load_state_dict_strict(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).state_dict(), "m")
    """
    own = module.state_dict()
    sections = {
        "missing keys": [k for k in own if k not in state_dict],
        "unexpected keys": [k for k in state_dict if k not in own],
        "shape mismatches": [
            f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(own[k].shape)}"
            for k in own if k in state_dict and state_dict[k].shape != own[k].shape
        ],
    }
    if any(sections.values()):
        raise CheckpointError(f"Checkpoint {path} does not fit {type(module).__name__}:" + "".join(
            f"\n  {title} ({len(v)}):{_listing(v, '    ')}" for title, v in sections.items() if v
        ))
    module.load_state_dict(dict(state_dict), strict=True)


_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device,
           torch.Size, torch.Tensor, torch.nn.Parameter)


def _check_weights_only(obj: Any, where: str) -> None:
    """Raise TypeError where ``obj`` holds something ``torch.load(weights_only=True)`` refuses."""
    t = type(obj)
    if t in (dict, OrderedDict, list, tuple, set):
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            _check_weights_only(v, f"{where}[{k!r}]")
    elif t not in _LEAVES:
        raise TypeError(f"{where} has type {t.__module__}.{t.__qualname__}, which "
                        "torch.load(weights_only=True) refuses; use tensors, lists or scalars")


def save_training_state(path: PathLike, state: Mapping[str, Any]) -> None:
    """Atomically save a resumable training state with :func:`torch.save`.

    Args:
        path: Destination (e.g. ``"run/state.pt"``).
        state: Dicts, lists and tuples of tensors and Python scalars: optimizer and scheduler
            ``state_dict()``s, step counters, RNG states.

    Raises:
        TypeError: ``state`` holds an object ``weights_only`` loading refuses (the message
            gives its location, e.g. ``state['rng']['numpy']``); nothing is written.

    Example:
        >>> opt = torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
        >>> save_training_state("state.pt", {"step": 10, "optimizer": opt.state_dict()})
    """
    from kdiff import __version__

    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    _check_weights_only(dict(state), "state")
    info = {"format_version": FORMAT_VERSION, "kdiff_version": __version__}
    with _atomic_open(path) as f:
        torch.save({_STATE_TAG: info, "state": dict(state)}, f)


def load_training_state(
    path: PathLike, *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a state written by :func:`save_training_state`, with ``weights_only=True``.

    Raises:
        CheckpointError: The file is missing, corrupt, not a kdiff training state, or holds
            objects that ``weights_only`` loading refuses (code is never run).

    Example:
        >>> save_training_state("state.pt", {"step": 10})
        >>> load_training_state("state.pt")["step"]
        10
    """
    if not Path(path).is_file():
        raise CheckpointError(f"Training state {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError...
        first = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"Training state {path} is corrupt or not loadable with "
                              f"weights_only=True: {type(e).__name__}: {first}") from e
    info = payload.get(_STATE_TAG) if isinstance(payload, dict) else None
    if not isinstance(info, dict) or "state" not in payload:
        raise CheckpointError(f"{path} is not a kdiff training state (missing header)")
    return payload["state"]  # format_version 1 and 2 share this layout
