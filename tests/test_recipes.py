"""Tests of the reference training loops (kdiff.recipes): configs, engine, each loop, CLI."""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch

from kdiff.checkpoint import CheckpointError, load_weights, save_weights
from kdiff.models import UNetConfig
from kdiff.recipes import (
    ClassifierConfig,
    DistillConfig,
    IndexStream,
    TeacherConfig,
    check_teacher,
    cli,
    latest_checkpoint,
    load_classifier,
    load_unet,
    lr_at,
    per_process_batch,
    save_image_grid,
    train_classifier,
    train_distill,
    train_teacher,
)
from kdiff.schedules import DiscreteSchedule

TINY_UNET = UNetConfig.tiny(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,))
FAST = dict(dataset="synthetic", progress=False, batch_size=4, log_every=2, num_samples=2)


def tiny_teacher(out: Path, **kw) -> TeacherConfig:
    base = dict(out_dir=str(out), unet=TINY_UNET, steps=4, ckpt_every=2, sample_steps=2)
    return TeacherConfig.tiny(**{**FAST, **base, **kw})


def tiny_classifier(out: Path, **kw) -> ClassifierConfig:
    base = dict(out_dir=str(out), width=4, steps=4, ckpt_every=2, eval_samples=32)
    return ClassifierConfig.tiny(**{**FAST, **base, **kw})


def tiny_distill(out: Path, teacher: Path, **kw) -> DistillConfig:
    base = dict(out_dir=str(out), teacher=str(teacher), teacher_steps=8, final_steps=2, steps=2, ckpt_every=2)
    return DistillConfig.tiny(**{**FAST, **base, **kw})


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    return train_teacher(tiny_teacher(tmp_path_factory.mktemp("teacher")))


@pytest.fixture(scope="module")
def classifier_path(tmp_path_factory) -> Path:
    return train_classifier(tiny_classifier(tmp_path_factory.mktemp("classifier")))


# ------------------------------------------------------------------------------ configs
def test_paper_presets_hold_the_papers_settings():
    t = TeacherConfig.paper()
    assert (t.steps, t.batch_size, t.lr, t.warmup_steps, t.ema_decay, t.grad_clip) == (
        800_000, 128, 2e-4, 5000, 0.9999, 1.0)
    assert (t.prediction_type, t.weighting) == ("x", "truncated_snr")
    assert t.schedule["kind"] == "discrete_cosine" and t.schedule["num_timesteps"] == 1024
    assert (t.unet.ch, t.unet.ch_mult, t.unet.attn_resolutions, t.unet.num_res_blocks, t.unet.dropout) == (
        128, (1, 2, 2, 2), (16,), 2, 0.1)
    d = DistillConfig.paper(teacher="t.safetensors")
    assert (d.steps, d.batch_size, d.lr, d.lr_schedule, d.grad_clip, d.ema_decay, d.dropout) == (
        10_000, 128, 5e-5, "cosine", 1.0, None, 0.0)
    assert d.student_steps[0] == 512 and d.student_steps[-1] == 512
    full = d.replace(final_steps=1)
    assert full.student_steps == [512, 256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert [full.round_steps(n) for n in (4, 2, 1)] == [10_000, 20_000, 20_000]
    assert (d.temperature, d.beta, d.gamma, d.pixel_weight) == (0.95, 0.003, 0.75, 0.0)
    c = ClassifierConfig.paper()
    assert (c.arch, c.lr, c.momentum, c.weight_decay, c.lr_schedule) == ("resnet18", 0.1, 0.9, 5e-4, "step")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DistillConfig.tiny(teacher="t", teacher_steps=12, final_steps=2), "do not halve"),
        (lambda: DistillConfig.tiny(teacher="t", teacher_steps=7), "teacher_steps"),
        (lambda: DistillConfig.tiny(teacher="t", teacher_steps=8, final_steps=8), "do not halve"),
        (lambda: DistillConfig.tiny(teacher="t", method="cfd"), "classifier is required"),
        (lambda: DistillConfig.tiny(teacher="t", method="kd"), "method"),
        (lambda: DistillConfig.tiny(teacher="t", temperature=0.0), "temperature"),
        (lambda: DistillConfig.tiny(teacher="t", gamma=1.5), "gamma"),
        (lambda: DistillConfig.tiny(teacher="t", teacher_steps=2048), "teacher_steps"),
        (lambda: TeacherConfig.tiny(steps=0), "steps"),
        (lambda: TeacherConfig.tiny(ema_decay=1.0), "ema_decay"),
        (lambda: TeacherConfig.tiny(lr_schedule="linear"), "lr_schedule"),
        (lambda: TeacherConfig.tiny(schedule={"kind": "nope"}), "schedule"),
        (lambda: TeacherConfig.tiny(sample_steps=3), "sample_steps"),
        (lambda: ClassifierConfig.tiny(arch="vgg"), "arch"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_config_round_trips_through_dict():
    for cfg in (TeacherConfig.tiny(), ClassifierConfig.tiny(), DistillConfig.tiny(teacher="t")):
        again = type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
    with pytest.raises(ValueError, match="unknown TeacherConfig keys"):
        TeacherConfig.from_dict({"stepz": 3})


def test_per_process_batch():
    assert per_process_batch(128, 4) == 32
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        per_process_batch(10, 4)


def test_lr_schedules():
    cfg = DistillConfig.paper(teacher="t")
    assert lr_at(cfg, 0, 100) == pytest.approx(5e-5)
    assert lr_at(cfg, 50, 100) == pytest.approx(2.5e-5)
    assert lr_at(cfg, 100, 100) == pytest.approx(0.0, abs=1e-12)
    t = TeacherConfig.paper()
    assert lr_at(t, 0, 10**6) == pytest.approx(2e-4 / 5000)
    assert lr_at(t, 4999, 10**6) == pytest.approx(2e-4)
    assert lr_at(t, 10**5, 10**6) == pytest.approx(2e-4)
    c = ClassifierConfig.paper()
    assert [lr_at(c, s, 100) for s in (0, 49, 50, 75)] == pytest.approx([0.1, 0.1, 0.01, 0.001])


# ------------------------------------------------------------------------------ engine pieces
def test_index_stream_is_a_permutation_per_epoch_and_resumes():
    s = IndexStream(10, seed=3)
    first = s.next(7)
    state = s.state_dict()
    rest = s.next(13)
    assert sorted(torch.cat([first, rest[:3]]).tolist()) == list(range(10))
    t = IndexStream(10, seed=3)
    t.load_state_dict(state)
    assert torch.equal(t.next(13), rest)


def test_png_grid_is_valid(tmp_path):
    path = save_image_grid(tmp_path / "g.png", torch.rand(5, 3, 4, 6) * 2 - 1, nrow=3)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (3 * 8 + 2, 2 * 6 + 2)
    idat_len = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41 : 41 + idat_len])
    assert len(raw) == h * (1 + 3 * w)


# ------------------------------------------------------------------------------ loops
def test_teacher_loop_outputs(teacher_path):
    out = teacher_path.parent
    sd, meta = load_weights(teacher_path)
    assert meta["kind"] == "teacher" and meta["step"] == 4 and meta["ema"] is True
    assert meta["prediction_type"] == "x" and meta["round"] == 0 and meta["num_steps"] is None
    assert meta["schedule"] == DiscreteSchedule.cosine(1024).to_dict()
    assert meta["config"]["steps"] == 4 and "kdiff_version" in meta
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4]
    assert all(r["loss"] == r["loss"] and "images_per_s" in r and "grad_norm" in r for r in lines)
    assert (out / "samples" / "step_0000004.png").is_file()
    assert latest_checkpoint(out / "checkpoints").name == "step_0000004"
    assert {p.name for p in (out / "checkpoints" / "step_0000004").iterdir()} >= {
        "model.safetensors", "model.safetensors.json", "ema.safetensors", "state.pt", "rng_rank0.pt"}
    model, _ = load_unet(teacher_path)
    assert model.config == TINY_UNET


def test_classifier_loop_outputs(classifier_path):
    _, meta = load_weights(classifier_path)
    assert meta["kind"] == "classifier" and meta["model"]["arch"] == "small_cnn"
    assert 0.0 <= meta["test_accuracy"] <= 1.0 and meta["test_samples"] == 32
    model, transform, _ = load_classifier(classifier_path)
    assert transform.mean == ClassifierConfig.tiny().mean
    logits, feats = model(transform(torch.zeros(2, 3, 32, 32)))
    assert logits.shape == (2, 10) and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", ["pd", "cfd"])
def test_distill_rounds(tmp_path, teacher_path, classifier_path, method):
    extra = {"classifier": str(classifier_path)} if method == "cfd" else {}
    final = train_distill(tiny_distill(tmp_path, teacher_path, method=method, **extra))
    _, meta = load_weights(final)
    assert meta["num_steps"] == 2 and meta["round"] == 2 and meta["method"] == method
    assert meta["step"] == 4  # the 2-step round trains twice as long
    _, first = load_weights(tmp_path / "steps_0004" / "student.safetensors")
    assert first["num_steps"] == 4 and first["step"] == 2 and first["teacher"] == str(teacher_path)
    record = json.loads((tmp_path / "steps_0002" / "metrics.jsonl").read_text().splitlines()[-1])
    if method == "cfd":
        assert {"feature_loss", "data_loss", "entropy", "diversity", "pd_loss"} <= set(record)
    assert (tmp_path / "steps_0002" / "samples" / "step_0000004.png").is_file()
    # Re-running a finished run trains nothing more and gives the same student.
    sd1, _ = load_weights(final)
    train_distill(tiny_distill(tmp_path, teacher_path, method=method, **extra))
    sd2, _ = load_weights(final)
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


# ------------------------------------------------------------------------------ refusals
def test_teacher_from_another_schedule_is_refused(tmp_path, teacher_path):
    sd, meta = load_weights(teacher_path)
    other = tmp_path / "linear.safetensors"
    meta = {k: v for k, v in meta.items() if k not in ("kdiff_version", "format_version", "weights_sha256",
                                                         "weights_nbytes")}
    save_weights(other, sd, {**meta, "schedule": DiscreteSchedule.linear(1000).to_dict()})
    with pytest.raises(CheckpointError, match=r"linear\.safetensors.*(\n.*)*schedule"):
        train_distill(tiny_distill(tmp_path / "run", other))
    assert not (tmp_path / "run").exists()


def test_student_with_other_step_count_is_refused(tmp_path, teacher_path):
    student = train_distill(tiny_distill(tmp_path / "a", teacher_path, final_steps=4))
    with pytest.raises(CheckpointError, match="4-step student but teacher_steps=8"):
        check_teacher(student, DiscreteSchedule.cosine(1024), 8)
    with pytest.raises(CheckpointError, match="4-step student"):
        train_distill(tiny_distill(tmp_path / "b", student))


def test_cfd_needs_a_classifier_checkpoint(tmp_path, teacher_path):
    with pytest.raises(CheckpointError, match="kind"):
        train_distill(tiny_distill(tmp_path, teacher_path, method="cfd", classifier=str(teacher_path)))
    with pytest.raises(CheckpointError, match="does not exist"):
        train_distill(tiny_distill(tmp_path, teacher_path, method="cfd", classifier=str(tmp_path / "none")))


def test_corrupt_checkpoint_names_the_file(tmp_path, teacher_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(teacher_path.read_bytes()[:100])
    (tmp_path / "bad.safetensors.json").write_text(Path(str(teacher_path) + ".json").read_text())
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        train_distill(tiny_distill(tmp_path / "run", bad))


def test_resume_with_other_settings_is_refused(tmp_path):
    cfg = tiny_teacher(tmp_path, steps=2)
    train_teacher(cfg)
    with pytest.raises(CheckpointError, match=r"(?s)other settings.*lr: checkpoint has 0.0002, this run has 0.001"):
        train_teacher(cfg.replace(steps=4, lr=1e-3))
    train_teacher(cfg.replace(steps=4, lr=1e-3, resume=False))  # starting over is allowed


def test_interrupted_checkpoint_is_ignored(tmp_path):
    """A checkpoint folder not yet named by ``latest`` (killed mid-save) is never read."""
    cfg = tiny_teacher(tmp_path, steps=2)
    train_teacher(cfg)
    half = tmp_path / "checkpoints" / "step_0000003"
    half.mkdir()
    (half / "state.pt").write_bytes(b"garbage")
    (half / ".model.safetensors.x.tmp").write_bytes(b"partial")
    train_teacher(cfg.replace(steps=4))
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_0000004"


# ------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("command", ["teacher", "classifier", "distill"])
def test_cli_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = capsys.readouterr().out
    cls = {"teacher": TeacherConfig, "classifier": ClassifierConfig, "distill": DistillConfig}[command]
    for f in dataclasses.fields(cls):
        if f.name == "unet":
            for g in dataclasses.fields(UNetConfig):
                assert "--unet-" + g.name.replace("_", "-") in text
        else:
            assert "--" + f.name.replace("_", "-") in text


def test_cli_builds_configs_and_refuses_bad_ones(capsys):
    args = cli.build_parser().parse_args(
        ["teacher", "--preset", "tiny", "--steps", "7", "--grad-clip", "none", "--unet-ch-mult", "1,2",
         "--no-progress", "--schedule", '{"kind": "cosine"}', "--unet-time-embed-scale", "1000"])
    cfg = cli.config_from_args(args)
    assert cfg.steps == 7 and cfg.grad_clip is None and cfg.unet.ch_mult == (1, 2) and not cfg.progress
    assert cfg.schedule["kind"] == "cosine" and cfg.unet.time_embed_scale == 1000
    assert cli.main(["distill", "--preset", "tiny", "--teacher", "t", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["teacher_steps"] == 8
    with pytest.raises(SystemExit):
        cli.main(["distill", "--preset", "tiny", "--teacher", "t", "--method", "cfd"])
    assert "classifier is required" in capsys.readouterr().err


def test_cli_runs_a_loop(tmp_path, capsys):
    code = cli.main(["classifier", "--preset", "tiny", "--out-dir", str(tmp_path), "--dataset", "synthetic",
                     "--steps", "2", "--batch-size", "4", "--width", "4", "--no-progress", "--eval-samples", "8"])
    assert code == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "classifier.safetensors").is_file()
    code = cli.main(["distill", "--preset", "tiny", "--teacher", str(tmp_path / "missing.safetensors")])
    assert code == 2 and "missing.safetensors" in capsys.readouterr().err
