"""Multi-process tests of the reference loops: DDP parity under torchrun and kill-and-resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdiff.io import load_weights
from kdiff.models import UNetConfig
from kdiff.recipes import (
    ClassifierConfig,
    DistillConfig,
    TeacherConfig,
    latest_checkpoint,
    train_classifier,
    train_distill,
    train_teacher,
)

pytestmark = [pytest.mark.slow]

TINY_UNET = UNetConfig.tiny(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,))
# Adam turns float noise in (analytically) zero gradients, e.g. of conv biases before a per-channel
# GroupNorm, into +-lr updates; a larger epsilon keeps those parameters still so parity is tested
# on the parameters that really learn.
PARITY = dict(adam_eps=1e-4)
# Parity with one process is a float32-rounding claim: bf16 autocast (on by default where the CPU
# computes bf16 natively) would widen the gap past the tolerances, so these runs stay float32.
FAST = dict(dataset="synthetic", progress=False, log_every=1, num_samples=2, sample_every=-1, mixed_precision=False)
TORCHRUN = Path(sys.executable).with_name("torchrun")
REPO = Path(__file__).resolve().parents[1]

RUNNER = """
import json, os, signal, sys
from kdiff.recipes import ClassifierConfig, DistillConfig, TeacherConfig
from kdiff.recipes import train_classifier, train_distill, train_teacher
loop, cfg_path, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
cls, run = {"teacher": (TeacherConfig, train_teacher), "classifier": (ClassifierConfig, train_classifier),
            "distill": (DistillConfig, train_distill)}[loop]
cfg = cls.from_dict(json.load(open(cfg_path)))
calls = []
def hook(step):
    calls.append(step)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)   # a real kill, right after update number kill_at
run(cfg, hooks=[hook])
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _write_config(cfg, path: Path) -> Path:
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def _torchrun(command: str, cfg, tmp: Path, nproc: int = 2) -> None:
    if not TORCHRUN.is_file():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    cfg_file = _write_config(cfg, tmp / f"{command}_{nproc}.json")
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", "-m", "kdiff.recipes.cli", command,
         "--config", str(cfg_file)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _last_weights(out: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_weights(latest_checkpoint(out / "checkpoints") / name)[0]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, atol: float) -> float:
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
    assert worst <= atol, f"largest parameter difference {worst:g} > {atol:g}"
    return worst


def _assert_moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())


# ------------------------------------------------------------------------------ DDP parity
@pytest.mark.distributed
def test_ddp_parity_teacher_and_distill(tmp_path):
    """2 gloo processes (batch 8/2 each) give the parameters of 1 process on the same batch of 8."""
    torch.set_num_threads(1)
    teacher_cfg = TeacherConfig.tiny(out_dir=str(tmp_path / "t1"), unet=TINY_UNET, steps=3, batch_size=8,
                                     ckpt_every=0, sample_steps=2, ema_decay=0.5, warmup_steps=2, **PARITY, **FAST)
    teacher = train_teacher(teacher_cfg)
    _torchrun("teacher", teacher_cfg.replace(out_dir=str(tmp_path / "t2")), tmp_path)
    _assert_close(_last_weights(tmp_path / "t1"), _last_weights(tmp_path / "t2"), atol=1e-5)
    _assert_close(_last_weights(tmp_path / "t1", "ema.safetensors"), _last_weights(tmp_path / "t2", "ema.safetensors"),
                  atol=1e-5)

    clf_cfg = ClassifierConfig.tiny(out_dir=str(tmp_path / "c"), width=4, steps=2, batch_size=8, ckpt_every=0,
                                    eval_samples=8, **FAST)
    classifier = train_classifier(clf_cfg)
    # CFD with a large beta so the globally synchronised diversity term matters.
    cfd_cfg = DistillConfig.tiny(out_dir=str(tmp_path / "d1"), teacher=str(teacher), teacher_steps=8, final_steps=4,
                                 steps=3, batch_size=8, ckpt_every=0, method="cfd", classifier=str(classifier),
                                 beta=1.0, gamma=0.25, pixel_weight=0.5, lr=1e-3, **PARITY,
                                 **FAST)
    train_distill(cfd_cfg)
    _torchrun("distill", cfd_cfg.replace(out_dir=str(tmp_path / "d2")), tmp_path)
    student_1 = load_weights(tmp_path / "d1" / "student.safetensors")[0]
    _assert_moved(load_weights(teacher)[0], student_1)
    _assert_close(student_1, load_weights(tmp_path / "d2" / "student.safetensors")[0], atol=1e-5)


@pytest.mark.distributed
def test_classifier_runs_under_torchrun(tmp_path):
    """On CPU BatchNorm statistics are per process (SyncBatchNorm needs CUDA): the loop runs, with a warning."""
    cfg = ClassifierConfig.tiny(out_dir=str(tmp_path / "c"), width=4, steps=2, batch_size=8, ckpt_every=0,
                                eval_samples=8, **FAST)
    _torchrun("classifier", cfg, tmp_path)
    assert (tmp_path / "c" / "classifier.safetensors").is_file()


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm parity needs 2 CUDA devices")
def test_ddp_parity_classifier_syncbn(tmp_path):
    """BatchNorm statistics over the global batch (SyncBatchNorm) keep the classifier loop in parity."""
    torch.set_num_threads(1)
    cfg = ClassifierConfig.tiny(out_dir=str(tmp_path / "c1"), width=4, steps=3, batch_size=8, ckpt_every=0,
                                eval_samples=0, lr=0.01, **FAST)
    train_classifier(cfg)
    _torchrun("classifier", cfg.replace(out_dir=str(tmp_path / "c2")), tmp_path)
    _assert_close(_last_weights(tmp_path / "c1"), _last_weights(tmp_path / "c2"), atol=1e-5)


@pytest.mark.distributed
def test_batch_not_divisible_is_refused_under_torchrun(tmp_path):
    cfg = TeacherConfig.tiny(out_dir=str(tmp_path / "t"), unet=TINY_UNET, steps=1, batch_size=5, **FAST)
    with pytest.raises(AssertionError, match="divisible by the number of processes"):
        _torchrun("teacher", cfg, tmp_path)


SEQUENCE = """
import json, sys
import torch, torch.distributed as dist
from kdiff.recipes import ClassifierConfig, DistillConfig, TeacherConfig
from kdiff.recipes import train_classifier, train_distill, train_teacher
owner, folder = sys.argv[1], sys.argv[2]
if owner == "caller":
    dist.init_process_group("gloo")
cfg = lambda cls, name: cls.from_dict(json.load(open(f"{folder}/{name}.json")))
groups = []
teacher = train_teacher(cfg(TeacherConfig, "teacher"))
groups.append(id(dist.distributed_c10d._get_default_group()))
clf = train_classifier(cfg(ClassifierConfig, "classifier"))
groups.append(id(dist.distributed_c10d._get_default_group()))
train_distill(cfg(DistillConfig, "distill").replace(teacher=str(teacher), classifier=str(clf)))
groups.append(id(dist.distributed_c10d._get_default_group()))
total = torch.tensor([dist.get_rank() + 1])
dist.all_reduce(total)   # the group still works after the loops
if dist.get_rank() == 0:
    json.dump({"same_group": len(set(groups)) == 1, "sum": int(total), "world": dist.get_world_size()},
              open(f"{folder}/result.json", "w"))
if owner == "caller":   # the caller's group is the caller's to end (the loops' own one ends at exit)
    dist.destroy_process_group()
"""


@pytest.mark.distributed
@pytest.mark.parametrize("owner", ["caller", "loops"])
def test_loops_in_one_process_share_one_process_group(tmp_path, owner):
    """Teacher, classifier and distillation loops one after another under torchrun, as the benchmark
    runs them: each uses the default group (the caller's, or the one the first loop created) and
    none destroys it, so the next loop neither hangs re-creating it nor finds it gone."""
    if not TORCHRUN.is_file():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    teacher = TeacherConfig.tiny(out_dir=str(tmp_path / "t"), unet=TINY_UNET, steps=1, batch_size=4,
                                 sample_steps=2, **FAST)
    clf = ClassifierConfig.tiny(out_dir=str(tmp_path / "c"), width=4, steps=1, batch_size=4, ckpt_every=0,
                                eval_samples=4, **FAST)
    distill = DistillConfig.tiny(out_dir=str(tmp_path / "d"), teacher="", teacher_steps=8, final_steps=4, steps=1,
                                 batch_size=4, method="cfd", classifier="unused", **FAST)
    # On CPU, gloo's teardown at process exit aborts now and then ("terminate called without an
    # active exception", SIGABRT) after the work is done; one new attempt in a fresh folder rules
    # that out, and a real failure (a hang, a missing group, a wrong result) fails both.
    failures = []
    for attempt in range(2):
        folder = tmp_path / f"attempt{attempt}"
        folder.mkdir()
        for name, c in (("teacher", teacher), ("classifier", clf), ("distill", distill)):
            _write_config(c.replace(out_dir=str(folder / c.out_dir.rsplit("/", 1)[-1])), folder / f"{name}.json")
        script = folder / "sequence.py"
        script.write_text(SEQUENCE)
        proc = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", str(script), owner, str(folder)],
                              env=_env(), capture_output=True, text=True, timeout=240)
        if proc.returncode == 0:
            break
        failures.append(proc.stdout[-2000:] + proc.stderr[-3000:])
    else:
        pytest.fail("\n----\n".join(failures))
    result = json.loads((folder / "result.json").read_text())
    assert result == {"same_group": True, "sum": 3, "world": 2}
    assert (folder / "d" / "student.safetensors").is_file()


# ------------------------------------------------------------------------------ kill and resume
def _run_subprocess(loop: str, cfg, tmp: Path, kill_at: int) -> subprocess.CompletedProcess[str]:
    script = tmp / "runner.py"
    script.write_text(RUNNER)
    cfg_file = _write_config(cfg, tmp / f"{Path(cfg.out_dir).name}.json")
    return subprocess.run([sys.executable, str(script), loop, str(cfg_file), str(kill_at)], env=_env(),
                          capture_output=True, text=True, timeout=300)


def test_kill_and_resume_teacher_is_exact(tmp_path):
    """SIGKILL after update 3 (checkpoint at 2), resume: final weights equal an uninterrupted run's."""
    cfg = TeacherConfig.tiny(out_dir=str(tmp_path / "full"), unet=TINY_UNET.__class__(**{**TINY_UNET.to_dict(),
                             "dropout": 0.1}), steps=6, batch_size=4, ckpt_every=2, sample_steps=2,
                             ema_decay=0.9, warmup_steps=3, **FAST)
    full = _run_subprocess("teacher", cfg, tmp_path, kill_at=0)
    assert full.returncode == 0, full.stderr[-3000:]
    killed_cfg = cfg.replace(out_dir=str(tmp_path / "killed"))
    killed = _run_subprocess("teacher", killed_cfg, tmp_path, kill_at=3)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").name == "step_0000002"
    assert not (tmp_path / "killed" / "teacher.safetensors").exists()
    resumed = _run_subprocess("teacher", killed_cfg, tmp_path, kill_at=0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = _last_weights(tmp_path / "full", name), _last_weights(tmp_path / "killed", name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    a = load_weights(tmp_path / "full" / "teacher.safetensors")[0]
    b = load_weights(tmp_path / "killed" / "teacher.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    events = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert {"event": "resumed", "step": 2} in events


def test_kill_and_resume_distill_rounds_is_exact(tmp_path):
    """A kill in the second round: the first round is kept, the second resumes exactly."""
    teacher = train_teacher(TeacherConfig.tiny(out_dir=str(tmp_path / "teacher"), unet=TINY_UNET, steps=1,
                                               batch_size=4, sample_steps=2, **FAST))
    cfg = DistillConfig.tiny(out_dir=str(tmp_path / "full"), teacher=str(teacher), teacher_steps=8, final_steps=2,
                             steps=2, batch_size=4, ckpt_every=1, **FAST)
    full = _run_subprocess("distill", cfg, tmp_path, kill_at=0)
    assert full.returncode == 0, full.stderr[-3000:]
    killed_cfg = cfg.replace(out_dir=str(tmp_path / "killed"))
    killed = _run_subprocess("distill", killed_cfg, tmp_path, kill_at=4)  # round 2 (2 -> 4 updates), update 2
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (tmp_path / "killed" / "steps_0004" / "student.safetensors").is_file()
    assert latest_checkpoint(tmp_path / "killed" / "steps_0002" / "checkpoints").name == "step_0000002"
    resumed = _run_subprocess("distill", killed_cfg, tmp_path, kill_at=0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_weights(tmp_path / "full" / "student.safetensors")[0]
    b = load_weights(tmp_path / "killed" / "student.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    shutil.rmtree(tmp_path / "teacher")
