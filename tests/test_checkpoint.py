"""Tests for kdiff.checkpoint."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import kdiff
from kdiff import checkpoint as ckpt
from kdiff.checkpoint import (
    CheckpointError,
    atomic_path,
    atomic_write_bytes,
    capture_rng_state,
    load_state_dict_strict,
    load_training_state,
    load_weights,
    restore_rng_state,
    save_training_state,
    save_weights,
    sidecar_path,
)

REPO = Path(__file__).resolve().parents[1]
META = {
    "schedule": {"kind": "cosine", "num_steps": 1000, "betas": [0.1, 0.2]},
    "prediction_type": "x",
    "step": 5,
}


class TinyNet(torch.nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(3, width)
        self.out = torch.nn.Linear(width, 3)
        self.register_buffer("scale", torch.ones(width))


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return dict(TinyNet().state_dict())


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- weights


def test_weights_roundtrip(tmp_path):
    path = tmp_path / "sub" / "model.safetensors"
    sd = _state_dict()
    sd["tied"] = sd["inp.weight"]  # shared storage
    sd["transposed"] = sd["out.weight"].t()  # non-contiguous view of shared storage
    sd["half"] = torch.randn(2, 3).to(torch.bfloat16)
    save_weights(path, sd, META)
    assert path.is_file() and sidecar_path(path).is_file()
    side = json.loads(sidecar_path(path).read_text())
    assert side["format_version"] == 1 and side["kdiff_version"] == kdiff.__version__
    assert side["weights_nbytes"] == path.stat().st_size

    loaded, meta = load_weights(path, expected={"schedule": META["schedule"]})
    assert _same(loaded, sd)
    assert loaded["half"].dtype == torch.bfloat16
    for k, v in META.items():
        assert meta[k] == v
    assert meta["format_version"] == 1 and meta["kdiff_version"] == kdiff.__version__
    # tuples in `expected` compare equal to JSON lists
    load_weights(path, expected={"schedule": {**META["schedule"], "betas": (0.1, 0.2)}})
    # no temporary files left over
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "model.safetensors",
        "model.safetensors.json",
    ]


def test_weights_load_into_module(tmp_path):
    path = tmp_path / "m.safetensors"
    src = TinyNet()
    save_weights(path, src.state_dict(), {})
    dst = TinyNet()
    sd, _ = load_weights(path)
    load_state_dict_strict(dst, sd, path)
    assert _same(dict(dst.state_dict()), dict(src.state_dict()))


def test_expected_mismatch_names_file_and_keys(tmp_path):
    path = tmp_path / "model.safetensors"
    save_weights(path, _state_dict(), META)
    expected = {
        "schedule": {"kind": "cosine", "num_steps": 500, "betas": [0.1, 0.2]},
        "prediction_type": "eps",
        "guidance": 2.0,
    }
    with pytest.raises(CheckpointError) as info:
        load_weights(path, expected=expected)
    msg = str(info.value)
    assert str(path) in msg
    assert "schedule.num_steps: checkpoint has 1000, expected 500" in msg
    assert 'prediction_type: checkpoint has "x", expected "eps"' in msg
    assert "guidance: missing in checkpoint, expected 2.0" in msg
    assert "schedule.kind" not in msg and "step" not in msg.replace("num_steps", "")
    # nested dicts must be equal: an extra key in the checkpoint is reported too
    with pytest.raises(CheckpointError, match=r"schedule\.betas: checkpoint has \[0.1, 0.2\]"):
        load_weights(path, expected={"schedule": {"kind": "cosine", "num_steps": 1000}})
    # bool is not int
    save_weights(path, _state_dict(), {"ema": True})
    with pytest.raises(CheckpointError, match="ema"):
        load_weights(path, expected={"ema": 1})


def test_missing_files(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError, match="absent.safetensors does not exist"):
        load_weights(path)
    save_weights(path, _state_dict(), META)
    sidecar_path(path).unlink()
    with pytest.raises(CheckpointError, match=r"sidecar .*absent\.safetensors\.json"):
        load_weights(path)
    sd, meta = load_weights(path, verify_sidecar=False, expected={"prediction_type": "x"})
    assert _same(sd, _state_dict()) and meta["schedule"] == META["schedule"]


@pytest.mark.parametrize("cut", [3, 20, -1, -40])
def test_truncated_weights(tmp_path, cut):
    path = tmp_path / "model.safetensors"
    save_weights(path, _state_dict(), META)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_weights(path)
    assert str(path) in str(info.value)


def test_bad_header_and_bad_sidecar(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((16).to_bytes(8, "little") + b"{not json at all")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_weights(path)
    save_weights(path, _state_dict(), META)
    sidecar_path(path).write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_weights(path)


def test_hash_mismatch(tmp_path):
    path = tmp_path / "model.safetensors"
    save_weights(path, _state_dict(), META)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor's payload: still parseable
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256") as info:
        load_weights(path)
    assert str(path) in str(info.value) and str(sidecar_path(path)) in str(info.value)
    sd, _ = load_weights(path, verify_sidecar=False)
    assert not _same(sd, _state_dict())


def test_sidecar_of_other_weights_detected(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_weights(a, _state_dict(0), META)
    save_weights(b, _state_dict(1), META)
    sidecar_path(a).write_bytes(sidecar_path(b).read_bytes())
    with pytest.raises(CheckpointError, match="does not match its sidecar"):
        load_weights(a)


def test_metadata_validation(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError, match="JSON"):
        save_weights(path, _state_dict(), {"bad": object()})
    with pytest.raises(TypeError, match="JSON"):
        save_weights(path, _state_dict(), {"nan": float("nan")})
    with pytest.raises(ValueError, match="reserved"):
        save_weights(path, _state_dict(), {"format_version": 2})
    with pytest.raises(TypeError, match="not a Tensor"):
        save_weights(path, {"x": [1, 2]}, {})
    assert not path.exists()


def test_load_state_dict_strict_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    sd = _state_dict()
    sd.pop("out.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["inp.weight"] = torch.zeros(7, 3)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(TinyNet(), sd, path)
    msg = str(info.value)
    assert str(path) in msg and "TinyNet" in msg
    assert "missing keys (1)" in msg and "out.bias" in msg
    assert "unexpected keys (1)" in msg and "extra.weight" in msg
    assert "inp.weight: checkpoint (7, 3), model (4, 3)" in msg


# ----------------------------------------------------------------------------- training state


def _draws(gen: torch.Generator) -> tuple:
    return (
        random.random(),
        random.gauss(0, 1),
        float(np.random.rand()),
        float(np.random.randn()),
        torch.rand(4).tolist(),
        torch.rand(2, generator=gen).tolist(),
    )


def test_training_state_roundtrip_and_rng(tmp_path):
    path = tmp_path / "state.pt"
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    loss = model.out(model.inp(torch.randn(5, 3))).square().mean()
    loss.backward()
    opt.step()
    sched.step()

    gen = torch.Generator().manual_seed(123)
    random.gauss(0, 1)  # leave a cached gauss in python's RNG
    np.random.randn()  # and numpy's
    rng = capture_rng_state({"data": gen})
    expected_draws = _draws(gen)

    save_training_state(
        path,
        {
            "step": 7,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": rng,
            "misc": {"losses": [1.0, 0.5], "name": "run", "shape": torch.Size([2])},
        },
    )
    # scramble every RNG, then restore from disk
    random.seed(999)
    np.random.seed(999)
    torch.manual_seed(999)
    gen.manual_seed(999)
    state = load_training_state(path)
    restore_rng_state(state["rng"], {"data": gen})
    assert _draws(gen) == expected_draws

    assert state["step"] == 7 and state["misc"]["losses"] == [1.0, 0.5]
    opt2 = torch.optim.AdamW(TinyNet().parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    sched2.load_state_dict(state["scheduler"])
    assert sched2.last_epoch == 1
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)

    with pytest.raises(KeyError, match="other"):
        restore_rng_state(state["rng"], {"other": torch.Generator()})


def test_training_state_rejects_unsafe_types(tmp_path):
    path = tmp_path / "state.pt"
    with pytest.raises(TypeError, match=r"state\['rng'\]\['np'\].*numpy"):
        save_training_state(path, {"rng": {"np": np.zeros(3)}})
    assert not path.exists()


def test_training_state_errors(tmp_path):
    path = tmp_path / "state.pt"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_training_state(path)
    save_training_state(path, {"w": torch.randn(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="state.pt is corrupt"):
        load_training_state(path)
    # a plain torch.save file is not a kdiff training state
    torch.save({"step": 1}, path)
    with pytest.raises(CheckpointError, match="not a kdiff training state"):
        load_training_state(path)


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_training_state_never_unpickles_code(tmp_path):
    path = tmp_path / "state.pt"
    marker = tmp_path / "pwned"
    torch.save(
        {"__kdiff_training_state__": {"format_version": 1}, "state": _Evil(str(marker))}, path
    )
    with pytest.raises(CheckpointError, match="weights_only"):
        load_training_state(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- atomicity


def test_atomic_path_failure_keeps_old_file(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old contents")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(path) as tmp:
        tmp.write_bytes(b"partial new con")
        raise RuntimeError("boom")
    assert path.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_atomic_write_bytes_failure_midway(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_weights(path, _state_dict(0), META)
    monkeypatch.setattr(ckpt, "_WRITE_CHUNK", 16)
    calls = []

    def failing(f, chunk):
        calls.append(len(chunk))
        if len(calls) == 3:
            raise OSError("disk full")
        f.write(chunk)

    monkeypatch.setattr(ckpt, "_write_chunk", failing)
    with pytest.raises(OSError, match="disk full"):
        save_weights(path, _state_dict(1), META)
    sd, _ = load_weights(path)
    assert _same(sd, _state_dict(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors",
        "model.safetensors.json",
    ]


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from kdiff import checkpoint as ckpt

    path, target, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    ckpt._WRITE_CHUNK = 32
    calls = []

    def slow_write(f, chunk):
        if os.path.basename(f.name).startswith("." + target + "."):
            calls.append(1)
            if len(calls) == 3:
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        f.write(chunk)

    ckpt._write_chunk = slow_write
    torch.manual_seed(1)
    sd = {"w": torch.randn(64, 8), "b": torch.randn(8)}
    if mode == "weights":
        ckpt.save_weights(path, sd, {"version": 2})
    else:
        real_save = torch.save

        def save_then_die(obj, f):
            real_save(obj, f)
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = save_then_die
        ckpt.save_training_state(path, {"step": 2, "w": sd["w"]})
    sys.exit(3)  # not reached
    """
)


def _run_child(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", _CHILD, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


skip_no_sigkill = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")


@skip_no_sigkill
def test_sigkill_while_writing_weights_keeps_previous(tmp_path):
    path = tmp_path / "model.safetensors"
    old = {"w": torch.zeros(64, 8), "b": torch.zeros(8)}
    save_weights(path, old, {"version": 1})
    proc = _run_child(str(path), path.name, "weights")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    sd, meta = load_weights(path, expected={"version": 1})
    assert _same(sd, old)


@skip_no_sigkill
def test_sigkill_between_weights_and_sidecar_is_detected(tmp_path):
    path = tmp_path / "model.safetensors"
    save_weights(path, {"w": torch.zeros(64, 8), "b": torch.zeros(8)}, {"version": 1})
    proc = _run_child(str(path), sidecar_path(path).name, "weights")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # new weights are in place, the old sidecar is intact: detected, never silently mixed
    with pytest.raises(CheckpointError, match="interrupted"):
        load_weights(path)
    sd, meta = load_weights(path, verify_sidecar=False)
    assert meta["version"] == 2 and sd["w"].shape == (64, 8)


@skip_no_sigkill
def test_sigkill_while_saving_training_state_keeps_previous(tmp_path):
    path = tmp_path / "state.pt"
    save_training_state(path, {"step": 1})
    proc = _run_child(str(path), path.name, "state")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_training_state(path) == {"step": 1}
