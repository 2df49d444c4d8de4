"""SHA-256 digests of files, tensors and state dicts (cache keys, provenance, integrity checks)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes (what ``sha256sum`` prints).

    Example:
        >>> sha256_file("model.safetensors")  # doctest: +SKIP
        'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def sha256_state_dict(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 of a state dict: names, dtypes, shapes and raw bytes, in sorted key order.

    Example:
        >>> sd = torch.nn.Linear(2, 2).state_dict()
        >>> sha256_state_dict(sd) == sha256_state_dict(dict(reversed(sd.items())))
        True
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, Tensor):
            h.update(f"{key}|{t!r};".encode())
            continue
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)};".encode())
        flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        h.update(memoryview(flat.numpy()))  # native byte order, no copy
    return h.hexdigest()


def hash_images(images: Tensor | np.ndarray) -> str:
    """SHA-256 of an image batch's dtype, shape and bytes (``sha256_state_dict({"images": x})``).

    Example:
        >>> a = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
        >>> hash_images(a) == hash_images(a.clone()), hash_images(a) == hash_images(a.float())
        (True, False)
    """
    if isinstance(images, np.ndarray):  # (negative strides cannot become a tensor)
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a tensor or numpy array; got {type(images).__name__}")
    return sha256_state_dict({"images": images})
