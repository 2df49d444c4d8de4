"""The README's training-loop snippet and the runnable examples in docs/ execute as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```python\n(.*?)```", re.S)


def python_blocks(path: Path) -> list[str]:
    return FENCE.findall(path.read_text())


def test_readme_cfd_snippet_runs_verbatim():
    text = (ROOT / "README.md").read_text()
    marker = text.index("<!-- snippet: cfd-training-loop")
    block = FENCE.search(text, marker).group(1)
    assert "CFDLoss" in block and "ProgressiveDistiller" in block
    assert len(block.strip().splitlines()) <= 25
    namespace: dict = {}
    exec(compile(block, "README.md:cfd-training-loop", "exec"), namespace)
    # The loop ran: the student's optimizer took steps and the loss terms are finite tensors.
    assert namespace["optimizer"].state, "the optimizer never stepped"
    import torch

    terms = namespace["terms"]
    assert all(bool(torch.isfinite(v)) for v in (terms.loss, terms.feature_loss, terms.data_loss))


@pytest.mark.parametrize("page", ["core.md", "models.md", "data_and_checkpoints.md"])
def test_docs_examples_run(page):
    blocks = python_blocks(ROOT / "docs" / page)
    assert blocks, f"docs/{page} has no python examples"
    namespace: dict = {}  # blocks of a page run in order, sharing names, as a reader would
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/{page}:block{i}", "exec"), namespace)
