"""Tests for kdiff.io (weights, training state, atomic writes) and kdiff.recipes.rng."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import kdiff
from kdiff.io import (
    RESERVED_KEYS,
    CheckpointError,
    atomic_write_bytes,
    load_state_dict_strict,
    load_training_state,
    load_weights,
    save_training_state,
    save_weights,
    sha256_file,
    store,
)
from kdiff.recipes.rng import capture_rng_state, restore_rng_state

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "benchmarks" / "assets" / "tiny"
FORMAT_1 = Path(__file__).resolve().parent / "data" / "format1"
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


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _rewrite_header(path: Path, edit) -> None:
    """Apply ``edit`` to the parsed safetensors header and write the file back, still parseable."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


# ----------------------------------------------------------------------------- weights


def test_weights_roundtrip_is_one_self_describing_file(tmp_path):
    path = tmp_path / "sub" / "model.safetensors"
    sd = _state_dict()
    sd["tied"] = sd["inp.weight"]  # shared storage
    sd["transposed"] = sd["out.weight"].t()  # non-contiguous view of shared storage
    sd["half"] = torch.randn(2, 3).to(torch.bfloat16)
    save_weights(path, sd, META)
    assert _names(path.parent) == ["model.safetensors"]  # no sidecar, no temporary file

    loaded, meta = load_weights(path, expected={"schedule": META["schedule"]})
    assert _same(loaded, sd) and loaded["half"].dtype == torch.bfloat16
    assert {k: meta[k] for k in META} == META
    assert meta["format_version"] == store.FORMAT_VERSION == 2
    assert meta["kdiff_version"] == kdiff.__version__
    assert meta["weights_sha256"] == sha256_file(path)
    # tuples in `expected` compare equal to JSON lists
    load_weights(path, expected={"schedule": {**META["schedule"], "betas": (0.1, 0.2)}})


def test_weights_load_into_module(tmp_path):
    path = tmp_path / "m.safetensors"
    src = TinyNet()
    save_weights(path, src.state_dict(), {})
    dst = TinyNet()
    load_state_dict_strict(dst, load_weights(path)[0], path)
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
    assert str(path) in msg and "3 difference(s)" in msg
    assert "schedule.num_steps: checkpoint has 1000, expected 500" in msg
    assert 'prediction_type: checkpoint has "x", expected "eps"' in msg
    assert "guidance: missing in checkpoint, expected 2.0" in msg
    assert "schedule.kind" not in msg
    # nested dicts must be equal: an extra key in the checkpoint is reported too
    with pytest.raises(CheckpointError, match=r"schedule\.betas: checkpoint has \[0.1, 0.2\], not"):
        load_weights(path, expected={"schedule": {"kind": "cosine", "num_steps": 1000}})
    # bool is not int
    save_weights(path, _state_dict(), {"ema": True})
    with pytest.raises(CheckpointError, match="ema: checkpoint has true, expected 1"):
        load_weights(path, expected={"ema": 1})


def test_missing_file_names_it(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(CheckpointError, match=r"absent\.safetensors does not exist"):
        load_weights(path)
    with pytest.raises(CheckpointError, match="is not a file"):
        load_weights(tmp_path)


@pytest.mark.parametrize("cut", [3, 20, -1, -40])
def test_truncated_weights(tmp_path, cut):
    path = tmp_path / "model.safetensors"
    save_weights(path, _state_dict(), META)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_weights(path)
    assert str(path) in str(info.value)


def test_garbage_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((16).to_bytes(8, "little") + b"{not json at all")
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_weights(path)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, path)  # valid safetensors, but not written by kdiff
    with pytest.raises(CheckpointError, match="not a kdiff weights file"):
        load_weights(path)


def test_altered_tensor_bytes_fail_the_integrity_check(tmp_path):
    path = tmp_path / "model.safetensors"
    save_weights(path, _state_dict(), META)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor's payload: still parseable
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its integrity check") as info:
        load_weights(path)
    assert str(path) in str(info.value)


def test_altered_metadata_fails_the_integrity_check(tmp_path):
    path = tmp_path / "model.safetensors"
    save_weights(path, _state_dict(), META)

    def edit(header):
        meta = json.loads(header["__metadata__"]["kdiff_metadata"])
        meta["prediction_type"] = "eps"
        header["__metadata__"]["kdiff_metadata"] = json.dumps(meta)

    _rewrite_header(path, edit)
    with pytest.raises(CheckpointError, match="integrity"):
        load_weights(path, expected={"prediction_type": "eps"})


def test_newer_format_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    monkeypatch.setattr(store, "FORMAT_VERSION", 3)
    save_weights(path, _state_dict(), META)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="format_version 3"):
        load_weights(path)


def test_format_1_files_load_and_are_verified_against_their_json(tmp_path):
    """kdiff 0.1.0 wrote the hash into ``<path>.json``; such files still load."""
    src = FORMAT_1 / "eval_classifier.safetensors"  # a 0.1.0 file, kept as written then
    path = tmp_path / src.name
    side = tmp_path / (src.name + ".json")
    shutil.copyfile(src, path)
    shutil.copyfile(str(src) + ".json", side)
    sd, meta = load_weights(path, expected={"kind": "classifier"})
    assert meta["format_version"] == 1 and sd and meta["weights_sha256"] == sha256_file(path)
    for bundled in ASSETS.glob("*.safetensors"):  # every bundled asset passes its check
        assert load_weights(bundled)[1]["weights_sha256"] == sha256_file(bundled)

    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="integrity"):
        load_weights(path)
    side.unlink()
    with pytest.raises(CheckpointError, match=r"needs .*eval_classifier\.safetensors\.json"):
        load_weights(path)


def test_metadata_validation(tmp_path):
    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError, match="JSON"):
        save_weights(path, _state_dict(), {"bad": object()})
    with pytest.raises(TypeError, match="JSON"):
        save_weights(path, _state_dict(), {"nan": float("nan")})
    for key in RESERVED_KEYS:
        with pytest.raises(ValueError, match="reserved"):
            save_weights(path, _state_dict(), {key: 2})
    with pytest.raises(TypeError, match="not a Tensor"):
        save_weights(path, {"x": [1, 2]}, {})
    assert not path.exists()


def test_load_state_dict_strict_errors(tmp_path):
    path = tmp_path / "m.safetensors"
    sd = _state_dict()
    sd.pop("out.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["inp.weight"] = torch.zeros(7, 3)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(model, sd, path)
    msg = str(info.value)
    assert str(path) in msg and "TinyNet" in msg
    assert "missing keys (1):\n    out.bias" in msg
    assert "unexpected keys (1):\n    extra.weight" in msg
    assert "inp.weight: checkpoint (7, 3), model (4, 3)" in msg
    assert _same(dict(model.state_dict()), before)  # nothing was loaded


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
    model.out(model.inp(torch.randn(5, 3))).square().mean().backward()
    opt.step()
    sched.step()

    gen = torch.Generator().manual_seed(123)
    random.gauss(0, 1)  # leave a cached gauss in python's RNG
    np.random.randn()  # and numpy's
    rng = capture_rng_state({"data": gen})
    expected_draws = _draws(gen)
    save_training_state(path, {
        "step": 7,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": rng,
        "misc": {"losses": [1.0, 0.5], "name": "run", "shape": torch.Size([2])},
    })
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


def test_training_state_rejects_unsafe_types_before_writing(tmp_path):
    path = tmp_path / "state.pt"
    with pytest.raises(TypeError, match=r"state\['rng'\]\['np'\].*numpy"):
        save_training_state(path, {"rng": {"np": np.zeros(3)}})
    with pytest.raises(TypeError, match=r"state\['hooks'\]\[1\].*function"):
        save_training_state(path, {"hooks": [1, _draws]})
    assert _names(tmp_path) == []


def test_training_state_errors(tmp_path):
    path = tmp_path / "state.pt"
    with pytest.raises(CheckpointError, match="does not exist"):
        load_training_state(path)
    save_training_state(path, {"w": torch.randn(1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="state.pt is corrupt"):
        load_training_state(path)
    torch.save({"step": 1}, path)  # a plain torch.save file is not a kdiff training state
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
    torch.save({"__kdiff_training_state__": {"format_version": 2}, "state": _Evil(str(marker))}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_training_state(path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- atomicity


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_weights(path, _state_dict(0), META)

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_weights(path, _state_dict(1), {"version": 2})
    with pytest.raises(OSError, match="No space"):
        save_training_state(tmp_path / "state.pt", {"step": 1})
    monkeypatch.undo()
    assert _same(load_weights(path, expected=META)[0], _state_dict(0))
    assert _names(tmp_path) == ["model.safetensors"]


def test_atomic_write_bytes_replaces_whole_file(tmp_path):
    path = tmp_path / "a" / "latest"
    atomic_write_bytes(path, b"step_0000002 and a long tail")
    atomic_write_bytes(path, b"step_0000004")
    assert path.read_bytes() == b"step_0000004" and _names(path.parent) == ["latest"]


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from kdiff.io import save_training_state, save_weights

    path, kind, hook = sys.argv[1:4]
    real = getattr(os, hook)

    def die(*args):  # killed after the new bytes are written, before they replace the old file
        if hook == "fsync":
            os.kill(os.getpid(), signal.SIGKILL)
        if os.path.basename(args[0]).startswith("." + os.path.basename(path) + "."):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)

    setattr(os, hook, die)
    torch.manual_seed(1)
    sd = {"w": torch.randn(64, 8), "b": torch.randn(8)}
    if kind == "weights":
        save_weights(path, sd, {"version": 2})
    else:
        save_training_state(path, {"step": 2, "w": sd["w"]})
    sys.exit(3)  # not reached
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("hook", ["fsync", "replace"])
@pytest.mark.parametrize("kind", ["weights", "state"])
def test_sigkill_during_save_keeps_previous_file(tmp_path, kind, hook):
    path = tmp_path / ("model.safetensors" if kind == "weights" else "state.pt")
    old = {"w": torch.zeros(64, 8), "b": torch.zeros(8)}
    if kind == "weights":
        save_weights(path, old, {"version": 1})
    else:
        save_training_state(path, {"step": 1})
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), kind, hook], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if kind == "weights":
        sd, _ = load_weights(path, expected={"version": 1})
        assert _same(sd, old)
    else:
        assert load_training_state(path) == {"step": 1}
    # the only other file is the new data's temporary file, hidden, in the same folder
    strays = [n for n in _names(tmp_path) if n != path.name]
    assert len(strays) == 1 and strays[0].startswith(f".{path.name}.") and strays[0].endswith(".tmp")
