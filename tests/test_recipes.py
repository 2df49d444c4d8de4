"""Tests of the reference training loops (kdiff.recipes): configs, engine, each loop, CLI."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import kdiff.recipes as recipes
from kdiff.functional import WEIGHTINGS
from kdiff.io import RESERVED_KEYS, CheckpointError, load_weights, save_weights
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


def test_configs_validate_with_the_cores_names():
    for name, canonical in [("epsilon", "eps"), ("sample", "x"), ("v_prediction", "v"), ("eps", "eps")]:
        cfg = TeacherConfig.tiny(prediction_type=name)
        assert cfg.prediction_type == canonical  # one spelling in checkpoints and the loss
        assert TeacherConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"prediction_type must be one of 'x', 'eps', 'v'.*got 'noise'"):
        TeacherConfig.tiny(prediction_type="noise")
    for make in (TeacherConfig.tiny, lambda **kw: DistillConfig.tiny(teacher="t", **kw)):
        assert [make(weighting=w).weighting for w in WEIGHTINGS] == list(WEIGHTINGS)
        with pytest.raises(ValueError, match="weighting must be one of") as info:
            make(weighting="l2")
        assert all(repr(w) in str(info.value) for w in WEIGHTINGS)


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


def _decode_png(data: bytes) -> torch.Tensor:
    """Pixels [H, W, C] (uint8) of an 8-bit, non-interlaced PNG; checks signature and CRCs."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + body), f"bad CRC in {tag!r}"
        pos += 12 + length
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        elif tag == b"IEND":
            break
    assert header is not None and pos == len(data), "missing IHDR or bytes after IEND"
    w, h, depth, color, _, _, interlace = header
    assert depth == 8 and interlace == 0
    c = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    raw, stride = zlib.decompress(idat), w * c
    assert len(raw) == h * (1 + stride)
    rows, prev = [], bytearray(stride)
    for y in range(h):  # undo the per-row filters (PNG spec, section 9)
        kind, line = raw[y * (1 + stride)], bytearray(raw[y * (1 + stride) + 1 : (y + 1) * (1 + stride)])
        for i in range(stride):
            a = line[i - c] if i >= c else 0
            b, up_left = prev[i], (prev[i - c] if i >= c else 0)
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - up_left
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - up_left)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else up_left)) & 255
            else:
                assert kind == 0, f"unknown filter {kind}"
        rows.append(bytes(line))
        prev = line
    return torch.frombuffer(bytearray(b"".join(rows)), dtype=torch.uint8).reshape(h, w, c)


@pytest.mark.parametrize("channels", [3, 1])
def test_png_grid_holds_the_saved_images(tmp_path, channels):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, channels, 4, 6, generator=g) * 2 - 1  # 5 images of 4x6, 3 per row
    path = save_image_grid(tmp_path / "g.png", images, nrow=3, pad=2)
    pixels = _decode_png(path.read_bytes()).to(torch.int16)
    assert pixels.shape == (2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3)
    expected = ((images + 1) * 127.5).round().to(torch.int16).expand(-1, 3, -1, -1).permute(0, 2, 3, 1)
    covered = torch.zeros(pixels.shape[:2], dtype=torch.bool)
    for i in range(5):
        r, q = divmod(i, 3)
        y, x = 2 + r * 6, 2 + q * 8
        cell = pixels[y : y + 4, x : x + 6]
        assert (cell - expected[i]).abs().max() <= 1, f"image {i} is not where the grid puts it"
        covered[y : y + 4, x : x + 6] = True
    assert not pixels[~covered].any(), "padding and the empty sixth cell must be black"
    try:  # an independent decoder, when installed, reads the same pixels
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        assert torch.equal(torch.from_numpy(np.array(im.convert("RGB"))).to(torch.int16), pixels)


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
    cfg = tiny_teacher(out)
    for r in lines:
        assert math.isfinite(r["loss"]) and r["loss"] > 0  # a weighted squared error
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["lr"] == pytest.approx(lr_at(cfg, r["step"] - 1, cfg.steps))  # the last update's lr
        assert r["images_per_s"] == pytest.approx(r["steps_per_s"] * cfg.batch_size)
    assert (out / "samples" / "step_0000004.png").is_file()
    assert latest_checkpoint(out / "checkpoints").name == "step_0000004"
    assert {p.name for p in (out / "checkpoints" / "step_0000004").iterdir()} >= {
        "model.safetensors", "ema.safetensors", "state.pt", "rng_rank0.pt"}
    model, _ = load_unet(teacher_path)
    assert model.config == TINY_UNET


def test_logged_loss_is_the_mean_of_the_step_losses(tmp_path, monkeypatch):
    teacher_module = importlib.import_module("kdiff.recipes.teacher")
    real, seen = teacher_module.pd_loss, []

    def recording(*args, **kwargs):
        loss = real(*args, **kwargs)
        seen.append(loss.detach().clone())
        return loss

    monkeypatch.setattr(teacher_module, "pd_loss", recording)
    train_teacher(tiny_teacher(tmp_path, steps=6, log_every=3, ckpt_every=0, sample_every=-1))
    assert len(seen) == 6, "the teacher loop no longer computes its loss with pd_loss"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["loss"]) for r in records if "loss" in r]
    expected = [(3, torch.stack(seen[:3]).mean().item()), (6, torch.stack(seen[3:]).mean().item())]
    assert [s for s, _ in logged] == [s for s, _ in expected]
    assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)


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
    meta = {k: v for k, v in meta.items() if k not in RESERVED_KEYS}
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
    code = cli.main(["distill", "--preset", "tiny", "--teacher", str(tmp_path / "missing.safetensors"),
                     "--dataset", "synthetic", "--out-dir", str(tmp_path / "distill")])
    assert code == 2 and "missing.safetensors" in capsys.readouterr().err


def _must_not_run(*args, **kwargs):
    raise AssertionError("the training loop started")


@pytest.mark.parametrize("where", ["below_a_file", "is_a_file"])
def test_cli_unusable_out_dir_fails_in_one_line_before_any_work(tmp_path, capsys, monkeypatch, where):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = blocker / "run" if where == "below_a_file" else blocker
    monkeypatch.setattr(recipes, "train_teacher", _must_not_run)
    code = cli.main(["teacher", "--preset", "tiny", "--dataset", "synthetic", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"kdiff-train: error: --out-dir {out}: ") and err.count("\n") == 1, err


def test_cli_missing_cifar10_fails_in_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KDIFF_DATA_DIR", str(tmp_path / "no_data"))
    monkeypatch.setattr(recipes, "train_classifier", _must_not_run)
    out = tmp_path / "run"
    for extra, root in [([], tmp_path / "no_data"), (["--data-dir", str(tmp_path / "elsewhere")], tmp_path / "elsewhere")]:
        code = cli.main(["classifier", "--preset", "tiny", "--out-dir", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith("kdiff-train: error: CIFAR-10") and str(root) in err
        assert "--data-dir" in err and "KDIFF_DATA_DIR" in err
    assert not out.exists()  # refused before anything was written


def test_cli_data_error_inside_a_loop_is_one_line(tmp_path, capsys, monkeypatch):
    from kdiff.data import DatasetNotFoundError

    def missing(config):
        raise DatasetNotFoundError("CIFAR-10 (test split) not found under /x. Looked in:\n  - /x\n  - /y")

    monkeypatch.setattr(recipes, "train_classifier", missing)
    code = cli.main(["classifier", "--preset", "tiny", "--dataset", "synthetic", "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "test split" in err and "/y" not in err


def test_cli_missing_data_ends_without_a_traceback(tmp_path):
    env = {**os.environ, "KDIFF_DATA_DIR": str(tmp_path / "no_data")}
    proc = subprocess.run(
        [sys.executable, "-m", "kdiff.recipes.cli", "teacher", "--preset", "tiny", "--out-dir", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_redirected_progress_prints_a_few_whole_lines(capsys):
    from kdiff.recipes.engine import _progress

    bar = _progress(1000, 0, True, "teacher")  # pytest's captured stderr is not a terminal
    for step in range(1000):
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss="0.25")
    bar.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err
    assert 3 <= len(lines) <= 12, lines
    assert lines[0] == "teacher: step 0/1000, started"
    assert lines[-1].startswith("teacher: step 1000/1000, done in") and lines[-1].endswith("loss 0.25")
    assert "step 500/1000 (50%)" in err


def test_progress_off_prints_nothing(capsys):
    from kdiff.recipes.engine import _progress

    assert _progress(10, 0, False, "teacher") is None
    assert capsys.readouterr().err == ""


def test_mixed_precision_autocasts_where_bf16_is_native(tmp_path, monkeypatch):
    import kdiff.recipes.engine as engine

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rt = engine.setup_runtime("cpu")
    for native in (True, False):
        monkeypatch.setattr(engine, "native_bf16", lambda device, n=native: n)
        for mixed in (True, False):
            cfg = TeacherConfig(out_dir=str(tmp_path), device="cpu", mixed_precision=mixed)
            trainer = engine.Trainer(cfg, rt, name="t", model=model, optimizer=optimizer, data=[0] * 8,
                                     total_steps=1, out_dir=tmp_path, metadata={})
            with trainer.autocast():
                dtype = model(torch.ones(1, 4)).dtype
            assert dtype == (torch.bfloat16 if native and mixed else torch.float32), (native, mixed)
