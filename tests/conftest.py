"""Shared test settings: float64 maths, hypothesis profiles, the local CIFAR-10 copy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

# Without a GPU, kdiff's Triton kernels are tested in Triton's interpreter, which must be chosen
# before anything imports triton (torch.compile does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def data_root() -> Path:
    """Folder holding ``cifar-10-batches-py``: ``$KDIFF_DATA_DIR`` or the repo's ``../shared/data``."""
    env = os.environ.get("KDIFF_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def cifar10_found(root: Path) -> bool:
    """Whether ``root`` holds the python batches (or is the batch folder itself)."""
    return (root / "cifar-10-batches-py").is_dir() or (root / "data_batch_1").is_file()


@pytest.fixture(scope="session")
def cifar_search_root() -> Path:
    """Where the tests look for CIFAR-10 (named in skip reasons)."""
    return data_root()


@pytest.fixture(scope="session")
def cifar_dir(cifar_search_root: Path) -> Path | None:
    """The CIFAR-10 root, or None when it is absent (for tests that skip only part of their work)."""
    return cifar_search_root if cifar10_found(cifar_search_root) else None


@pytest.fixture(scope="session")
def cifar_root(cifar_dir: Path | None) -> Path:
    if cifar_dir is None:
        pytest.skip(f"CIFAR-10 python batches not found under {data_root()}; set KDIFF_DATA_DIR")
    return cifar_dir


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With KDIFF_STRICT_SKIPS=1 (CI), a test skipped for anything but a missing GPU fails instead:
    missing data or FID weights there is a broken setup, not a pass."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("KDIFF_STRICT_SKIPS") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if "CUDA" not in reason:
            report.outcome = "failed"
            report.longrepr = f"skipped under KDIFF_STRICT_SKIPS=1: {reason}"
