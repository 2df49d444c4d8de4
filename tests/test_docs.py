"""The README's training-loop snippet and the runnable examples in docs/ execute as written.

A python block that needs something a machine may lack is marked in the markdown by a comment
right before its fence, e.g. ``<!-- needs: cifar10 -->``. Without it the block is skipped (the
page's other blocks still run) and the test reports a skip saying what is missing;
``KDIFF_STRICT_SKIPS=1`` turns that skip into a failure.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```python\n(.*?)```", re.S)
BLOCK = re.compile(r"(?:<!--\s*needs:\s*(?P<needs>[^>]*?)\s*-->[ \t]*\n\s*)?```python\n(?P<code>.*?)```", re.S)
KNOWN_NEEDS = frozenset({"cifar10"})
# Calls that read CIFAR-10 from disk: a block making one must be marked ``needs: cifar10``.
READS_CIFAR10 = re.compile(r"\b(?:CIFAR10|load_cifar10_arrays|load_cifar10_class_names|find_cifar10)\(")
RUN_PAGES = ["core.md", "models.md", "data_and_checkpoints.md"]


@dataclass(frozen=True)
class Block:
    code: str
    needs: frozenset[str]


def python_blocks(text: str) -> list[Block]:
    """The ```` ```python ```` blocks of a markdown text with their ``needs:`` markers."""
    blocks = []
    for m in BLOCK.finditer(text):
        needs = frozenset(n.strip() for n in (m.group("needs") or "").split(",") if n.strip())
        unknown = needs - KNOWN_NEEDS
        if unknown:
            raise ValueError(f"unknown needs {sorted(unknown)}; known: {sorted(KNOWN_NEEDS)}")
        blocks.append(Block(m.group("code"), needs))
    return blocks


def _split_at_loop(block: str) -> tuple[str, str]:
    """``(setup, loop)``: the block cut before its first top-level ``for`` line."""
    lines = block.splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if line.startswith("for "))
    return "".join(lines[:cut]), "".join(lines[cut:])


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_readme_cfd_snippet_runs_verbatim():
    text = (ROOT / "README.md").read_text()
    marker = text.index("<!-- snippet: cfd-training-loop")
    block = FENCE.search(text, marker).group(1)
    setup, loop = _split_at_loop(block)
    assert setup + loop == block
    # The block runs as written, in two parts so the models can be recorded before training.
    namespace: dict = {}
    exec(compile(setup, "README.md:cfd-training-loop", "exec"), namespace)
    teacher, classifier = namespace["teacher"], namespace["classifier"]
    before = {name: _state(namespace[name]) for name in ("teacher", "student", "classifier")}
    exec(compile("\n" * setup.count("\n") + loop, "README.md:cfd-training-loop", "exec"), namespace)

    def changed(name: str) -> list[str]:
        now = namespace[name].state_dict()
        return [k for k, v in before[name].items() if not torch.equal(v, now[k])]

    # Only the student learns (two steps from the zero-initialised residual branches move a part
    # of its tensors); the teacher and the classifier (weights, BatchNorm statistics) stay put.
    assert changed("student"), "the student's weights did not change"
    assert changed("teacher") == [], "the teacher's weights changed"
    assert changed("classifier") == [], "the classifier's weights or statistics changed"
    # The classifier runs in eval mode with no gradient reaching its weights, and is left as given.
    assert all(p.grad is None for p in classifier.parameters()), "a gradient reached the classifier"
    assert not teacher.training
    assert all(p.grad is None for p in teacher.parameters())
    terms = namespace["terms"]
    assert all(bool(torch.isfinite(v)) for v in (terms.loss, terms.feature_loss, terms.data_loss))


@pytest.mark.parametrize("page", RUN_PAGES)
def test_docs_examples_run(page, cifar_dir, cifar_search_root, monkeypatch):
    blocks = python_blocks((ROOT / "docs" / page).read_text())
    assert blocks, f"docs/{page} has no python examples"
    available = {"cifar10": cifar_dir is not None}
    if cifar_dir is not None:
        # Examples find the data the way a reader's code does: through KDIFF_DATA_DIR.
        monkeypatch.setenv("KDIFF_DATA_DIR", str(cifar_dir))
    namespace: dict = {}  # blocks of a page run in order, sharing names, as a reader would
    skipped = []
    for i, block in enumerate(blocks):
        if not all(available[n] for n in block.needs):
            skipped.append(i)
            continue
        exec(compile(block.code, f"docs/{page}:block{i}", "exec"), namespace)
    if skipped:
        pytest.skip(
            f"docs/{page}: block(s) {skipped} need CIFAR-10, which was not found under "
            f"{cifar_search_root}; "
            "set KDIFF_DATA_DIR to the folder holding cifar-10-batches-py"
        )


@pytest.mark.parametrize("page", RUN_PAGES)
def test_blocks_reading_cifar10_are_marked(page):
    for i, block in enumerate(python_blocks((ROOT / "docs" / page).read_text())):
        if READS_CIFAR10.search(block.code):
            assert "cifar10" in block.needs, f"docs/{page} block {i} reads CIFAR-10 without <!-- needs: cifar10 -->"


def test_needs_markers_are_parsed():
    text = (
        "intro\n<!-- needs: cifar10 -->\n```python\nA = 1\n```\n"
        "text\n\n```python\nB = 2\n```\n"
        "<!-- needs: cifar10 -->\n\n```python\nC = 3\n```\n"
    )
    blocks = python_blocks(text)
    assert [(b.code, sorted(b.needs)) for b in blocks] == [
        ("A = 1\n", ["cifar10"]), ("B = 2\n", []), ("C = 3\n", ["cifar10"])]
    # A marker separated from its fence by prose belongs to no block.
    assert python_blocks("<!-- needs: cifar10 -->\nprose\n```python\nD = 4\n```\n")[0].needs == frozenset()
    with pytest.raises(ValueError, match="unknown needs"):
        python_blocks("<!-- needs: imagenet -->\n```python\nE = 5\n```\n")


def test_relative_links_resolve():
    """Every relative link of README.md and docs/*.md names a file or folder of the repository."""
    import re

    broken = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if "://" in target or target.startswith(("#", "mailto:")):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, broken
