"""Choosing between the plain-PyTorch and the Triton implementation of a fused op.

``impl="torch"`` always runs the reference maths of :mod:`kdiff.functional`. ``impl="triton"``
runs the fused kernels: on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, a debugging mode that runs kernels in NumPy). ``impl="auto"`` picks
Triton only where it is fast and safe: CUDA tensors of a supported dtype, Triton importable,
not under the interpreter and not while ``torch.compile`` traces (Inductor then fuses the torch
maths itself).

Triton is imported here, lazily, and only when a call could use it: ``import kdiff`` never
imports it, and CPU tensors with ``impl="auto"`` never try.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType, SimpleNamespace
from typing import Literal

import torch
from torch import Tensor

from .._validation import check_choice, check_tensor

__all__ = ["IMPLS", "TRITON_DTYPES", "triton_available", "interpreter_enabled", "resolve_impl"]

IMPLS: tuple[str, ...] = ("auto", "torch", "triton")
#: Input dtypes the Triton kernels accept (their maths is float32 whatever the input).
TRITON_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
# NumPy has no bfloat16, so Triton's interpreter cannot run it.
_INTERPRETER_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16)

Impl = Literal["auto", "torch", "triton"]


@functools.cache
def _import_triton() -> ModuleType | None:
    try:
        return importlib.import_module("triton")
    except Exception:  # noqa: BLE001 - a broken install (e.g. no matching libcuda) counts as absent
        return None


def triton_available() -> bool:
    """Whether the ``triton`` package imports (imports it on the first call).

    Example:
        >>> from kdiff.ops import triton_available
        >>> isinstance(triton_available(), bool)
        True
    """
    return _import_triton() is not None


def interpreter_enabled() -> bool:
    """Whether Triton's interpreter is asked for (``TRITON_INTERPRET`` set to a true value).

    Triton reads the variable when it defines a kernel, its own library functions included, so
    it must be set before ``triton`` is first imported (``torch.compile`` and ``torch._dynamo``
    import it too): in practice, in the environment before Python starts.
    """
    value = os.environ.get("TRITON_INTERPRET", "")
    return value.strip().lower() in ("1", "true", "yes", "on", "y")


def _imported_for_interpreter(triton: ModuleType) -> bool:
    # Triton's library functions (tl.sum, tl.max, ...) are kernels too: defined in compiled mode,
    # the interpreter cannot call them. Trust the variable where that detail is missing.
    library_fn = getattr(getattr(triton, "language", None), "sum", None)
    jit_type = getattr(triton, "JITFunction", None)
    if library_fn is None or jit_type is None:
        return True
    return not isinstance(library_fn, jit_type)


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def resolve_impl(impl: str, *tensors: Tensor, op: str) -> Literal["torch", "triton"]:
    """The implementation ``impl`` resolves to for these tensors: ``"torch"`` or ``"triton"``.

    Args:
        impl: "auto", "torch" or "triton".
        *tensors: The op's tensor inputs; the first one's device and dtype decide.
        op: The op's name, for error messages.

    Raises:
        ValueError: ``impl`` is unknown, the tensors are on different devices, or ``impl="triton"``
            cannot run here (no Triton, unsupported dtype or device, CPU tensors without the
            interpreter). The message names the reason and the way out.

    Example:
        >>> import torch
        >>> from kdiff.ops import resolve_impl
        >>> resolve_impl("auto", torch.zeros(2, 3), op="feature_kl_loss")   # CPU: the torch path
        'torch'
    """
    check_choice("impl", impl, IMPLS)
    if not tensors:
        raise ValueError(f"{op}: resolve_impl needs at least one tensor")
    for i, t in enumerate(tensors):
        check_tensor(f"{op} tensor argument {i}", t)
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(
                f"{op}: all tensors must be on one device; got {device} and {t.device}"
            )
    if impl == "torch":
        return "torch"
    dtype = tensors[0].dtype
    if impl == "auto":
        if (
            device.type == "cuda"
            and dtype in TRITON_DTYPES
            and not torch.compiler.is_compiling()
            and not interpreter_enabled()
            and triton_available()
        ):
            return "triton"
        return "torch"
    # impl == "triton": run it or say exactly why not.
    if dtype not in TRITON_DTYPES:
        raise ValueError(
            f"{op}: impl='triton' supports input dtypes {_dtype_names(TRITON_DTYPES)}; got "
            f"{_dtype_names((dtype,))} (use impl='torch' or 'auto')"
        )
    if device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"{op}: impl='triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
            f"got device {device} (use impl='torch' or 'auto')"
        )
    if device.type == "cpu":
        # Checked before importing triton: an import now would fix its mode to compiled.
        if not interpreter_enabled():
            raise ValueError(
                f"{op}: impl='triton' on CPU tensors runs only under Triton's interpreter: set "
                "TRITON_INTERPRET=1 in the environment (before triton is imported), or use "
                "impl='torch' or 'auto' (the torch path) for CPU tensors"
            )
        if dtype not in _INTERPRETER_DTYPES:
            raise ValueError(
                f"{op}: Triton's interpreter (CPU tensors) supports {_dtype_names(_INTERPRETER_DTYPES)}; "
                f"got {_dtype_names((dtype,))} (use impl='torch' or a CUDA device)"
            )
    triton = _import_triton()
    if triton is None:
        raise ValueError(
            f"{op}: impl='triton' needs the triton package, which does not import here "
            "(pip install 'kdiff[triton]', or use impl='torch' or 'auto')"
        )
    if device.type == "cpu" and not _imported_for_interpreter(triton):
        raise ValueError(
            f"{op}: triton was imported before TRITON_INTERPRET=1 was set (torch.compile and "
            "torch._dynamo import it), so its interpreter is off in this process; set the "
            "variable in the environment before Python starts, or use impl='torch' or 'auto'"
        )
    return "triton"


# Stand-in for ``triton`` where it is not installed, so that the kernel modules still import (for
# documentation and docstring tools); the dispatcher never launches their kernels then.
triton_stub = SimpleNamespace(
    jit=lambda fn: fn,
    JITFunction=object,
    language=SimpleNamespace(constexpr=lambda value: value),
)


def load_kernels(name: str, device: torch.device) -> ModuleType:
    """Import the Triton module ``kdiff.ops.<name>``, checking it can run on ``device``.

    Triton fixes a kernel's mode (compiled or interpreted) when the module is imported, so a
    module loaded without the interpreter cannot take CPU tensors later in the process.
    """
    module = importlib.import_module(f"{__package__}.{name}")
    if device.type == "cpu" and not module.INTERPRETED:
        raise ValueError(
            f"kdiff's Triton kernels ({name}) were loaded without TRITON_INTERPRET=1 in this "
            "process, so they cannot take CPU tensors; set the variable before the first Triton "
            "call, or use impl='torch' or 'auto'"
        )
    return module
