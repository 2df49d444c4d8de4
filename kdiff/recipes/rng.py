"""Capture and restore every RNG a training step draws from, for bit-exact resumes.

The captured state holds only tensors and Python scalars, so it round-trips through
:func:`kdiff.io.save_training_state` / :func:`kdiff.io.load_training_state` (``weights_only``).

Example:
    >>> import torch
    >>> rng = capture_rng_state()
    >>> a = torch.rand(3)
    >>> restore_rng_state(rng)
    >>> torch.equal(a, torch.rand(3))
    True
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Capture Python ``random``, NumPy (global), torch CPU and CUDA RNG states.

    Args:
        generators: Named :class:`torch.Generator` objects (e.g. a data-order generator) to
            capture too.

    Returns:
        A dict for :func:`restore_rng_state`.

    Example:
        >>> state = capture_rng_state({"data": torch.Generator().manual_seed(0)})
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(py_version), "gauss_next": py_gauss,
                   "state": torch.tensor(py_internal, dtype=torch.int64)},
        "numpy": {"bit_generator": str(np_name), "pos": int(np_pos),
                  "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
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
    py, nps = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((nps["bit_generator"], nps["keys"].cpu().numpy().astype(np.uint32),
                         nps["pos"], nps["has_gauss"], nps["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if len(cuda) != n:
            warnings.warn(f"RNG state has {len(cuda)} CUDA device states but {n} devices are "
                          "visible; restoring the first min of the two", stacklevel=2)
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(s.cpu(), i)
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"no RNG state captured for generator {name!r}")
        g.set_state(saved[name].cpu())
