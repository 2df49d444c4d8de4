"""The worked diffusers example (the docs' few lines on random tiny models, the script's --toy run)
and the sampler benchmark's like-for-like check."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from diffusers import DDIMPipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "distill_diffusers.py"


def worked_example_block() -> str:
    """The python block of docs/interop.md's "Worked example" section."""
    text = (ROOT / "docs" / "interop.md").read_text()
    section = text.split("## Worked example", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def load_example():
    spec = importlib.util.spec_from_file_location("distill_diffusers_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def quiet_diffusers():
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    yield
    diffusers.utils.logging.set_verbosity(level)


def test_docs_worked_example_runs_on_random_tiny_models(tmp_path, monkeypatch, quiet_diffusers):
    monkeypatch.chdir(tmp_path)  # the block exports its students here
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(worked_example_block(), "docs/interop.md:worked-example", "exec"), namespace)
    for method in ("pd", "cfd"):
        folders = namespace[f"{method}_folders"]
        assert sorted(folders) == [1, 2, 4]
        for n, folder in folders.items():
            info = json.loads((Path(folder) / "kdiff_export.json").read_text())
            assert info["num_inference_steps"] == n and info["prediction_type"] == "epsilon"
    # The block's own check ran; sample another student here with diffusers alone.
    pipe = DDIMPipeline.from_pretrained(namespace["pd_folders"][2])
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, use_clipped_model_output=True,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    # Training moved the students: the 4-step PD student is not the teacher any more.
    student = namespace["pd_folders"][4]
    unet = diffusers.UNet2DModel.from_pretrained(Path(student) / "unet")
    teacher_sd, student_sd = namespace["unet"].state_dict(), unet.state_dict()
    assert any(not torch.equal(teacher_sd[k], student_sd[k]) for k in teacher_sd)


def test_example_runs_the_documented_lines():
    """The script's distil() is, to the character, the function docs/interop.md shows."""
    source = inspect.getsource(load_example().distil)
    assert source.strip() in worked_example_block()


def test_example_markdown_table_marks_missing_cells():
    example = load_example()
    rows = [{"method": m, "steps": n, "mse": 0.01 * n, "mse_sem": 0.001, "fid": 10.0 + n}
            for m in ("teacher", "pd", "cfd") for n in (8, 4, 2, 1) if m == "teacher" or n < 8]
    result = {"rows": rows, "mse": {"reference": "the teacher's 1000-step DDIM", "num_samples": 4},
              "fid": {"features": "f", "reference": "r", "num_samples": 8}}
    table = example.markdown_table(result).splitlines()
    row8 = next(line for line in table if line.startswith("| 8 |"))
    row4 = next(line for line in table if line.startswith("| 4 |"))
    assert row8.count(" - ") == 4  # no PD/CFD student at the teacher's 8 steps
    assert "0.0400 ± 0.0010" in row4 and "14.00" in row4


@pytest.mark.slow
def test_example_toy_run(tmp_path, cifar_dir, quiet_diffusers):
    if cifar_dir is None:
        pytest.skip("CIFAR-10 not found (set KDIFF_DATA_DIR)")
    out = tmp_path / "run"
    env = {**os.environ, "KDIFF_DATA_DIR": str(cifar_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--toy", "--threads", "1", "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "check: the 4-step PD student" in proc.stdout

    result = json.loads((out / "results.json").read_text())
    rows = result["rows"]
    assert {(r["method"], r["steps"]) for r in rows} == (
        {("teacher", n) for n in (8, 4, 2, 1)} | {(m, n) for m in ("pd", "cfd") for n in (4, 2, 1)}
    )
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("mse", "mse_sem", "fid")), r
    assert isinstance(result["check"]["pd_beats_teacher_4"], bool)
    assert (out / "results.md").read_text().count("\n| ") == 5  # header + 4 step counts
    # The teacher was saved as a diffusers folder that --teacher reads back.
    assert (out / "teacher" / "unet").is_dir() and (out / "teacher" / "scheduler").is_dir()

    for n in (4, 2, 1):
        folder = out / "pd" / f"student-{n}"
        assert (folder / "model_index.json").is_file()
        pipe = DDIMPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=1, num_inference_steps=n, use_clipped_model_output=True,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
        assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert (out / "cfd" / "student-1" / "model_index.json").is_file()


@pytest.mark.parametrize("batch", [1, 3])
def test_sampler_benchmark_times_equal_work(batch):
    """benchmarks/bench_sampler.py times kdiff and diffusers only after checking that they agree."""
    spec = importlib.util.spec_from_file_location("bench_sampler", ROOT / "benchmarks" / "bench_sampler.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for num_steps in (1, 4, 50):
        fns = bench.contenders(batch, num_steps, torch.device("cpu"))  # raises if they disagree
        kdiff_out, diffusers_out = fns["sample"]["kdiff"](), fns["sample"]["diffusers"]()
        assert kdiff_out.shape == (batch, 3, 32, 32)
        torch.testing.assert_close(kdiff_out, diffusers_out, atol=1e-4, rtol=0)
