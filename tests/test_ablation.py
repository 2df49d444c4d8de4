"""benchmarks/cifar10_ablation.py: the commands it runs and the summary it writes.

The runs themselves are benchmark runs (tests/test_benchmark.py covers a CFD variant sharing the
PD rounds); here the condensing and the tables are checked on the committed default run.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cifar10_tiny_seed0" / "results.json"


def _module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("cifar10_ablation", ROOT / "benchmarks" / "cifar10_ablation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_commands_share_one_folder_and_name_the_setting(tmp_path):
    abl = _module()
    args = abl._parse(["--seeds", "0", "1", "--out-dir", str(tmp_path), "--num-samples", "16"])
    assert args.extra == ["--num-samples", "16"]  # passed on to the benchmark
    paper = abl._command(abl.BY_NAME["paper"], args, tmp_path, None)
    assert paper[:2] == [sys.executable, str(abl.SCRIPT)]
    assert paper[2:] == ["--seeds", "0", "1", "--out-dir", str(tmp_path), "--num-samples", "16"]
    beta0 = abl._command(abl.BY_NAME["beta0"], args, tmp_path, None)
    assert beta0[-4:-2] == ["--beta", "0"]
    local = abl._command(abl.BY_NAME["localdiv"], args, tmp_path, None)
    assert local[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert "--diversity" in local and local[local.index("--diversity") + 1] == "local"
    guided = abl._command(abl.BY_NAME["strongguide"], args, tmp_path, tmp_path / "g.safetensors")
    assert guided[guided.index("--guide-classifier") + 1] == str(tmp_path / "g.safetensors")


def test_unknown_variant_is_refused():
    abl = _module()
    with pytest.raises(SystemExit) as e:
        abl._parse(["--variants", "paper", "nope"])
    assert e.value.code == 2


@pytest.mark.skipif(not RESULTS.is_file(), reason="committed default run missing")
def test_summary_of_a_run(tmp_path):
    abl = _module()
    results = json.loads(RESULTS.read_text())
    record = abl.condense(results, abl.BY_NAME["paper"], wall=12.0)
    assert sorted(record["rows"]) == ["cfd_001", "cfd_002", "cfd_004", "pd_001", "pd_002", "pd_004", "pd_008"]
    assert [d["steps"] for d in record["cfd_minus_pd"]] == [4, 2, 1]
    assert record["cfd_training_wall_s"] == pytest.approx(
        sum(v["wall_s"] for k, v in results["stages"].items() if k.startswith("cfd_seed0_tau0.95")))
    # a paired difference that is not its rows' (features overwritten by a concurrent run) is refused
    broken = json.loads(json.dumps(results))
    next(d for d in broken["differences"] if d["kind"] == "cfd_vs_pd")["metrics"]["fast_fid"]["per_seed"][0][
        "difference"] += 0.1
    with pytest.raises(abl.AblationError, match="does not match its rows"):
        abl.condense(broken, abl.BY_NAME["paper"], wall=12.0)
    (tmp_path / "paper.json").write_text(json.dumps(record))
    abl.write_summary([record], tmp_path)
    with open(tmp_path / "summary.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 3 * 3  # 3 step counts x 3 metrics
    rows = {r["row"]: r for r in results["rows"]}
    diffs = {d["steps"]: d for d in results["differences"] if d["kind"] == "cfd_vs_pd"}
    for line in lines:
        n, m = int(line["steps"]), line["metric"]
        assert float(line["cfd_mean"]) == pytest.approx(rows[f"cfd_{n:03d}"]["summary"][m]["mean"])
        assert float(line["pd_mean"]) == pytest.approx(rows[f"pd_{n:03d}"]["summary"][m]["mean"])
        want = diffs[n]["metrics"][m]
        assert float(line["cfd_minus_pd"]) == pytest.approx(want["mean"])
        (seed,) = want["per_seed"]
        assert int(line["seeds_cfd_lower"]) == int(seed["high"] < 0)
        assert line["verdict"] == ("n.s." if not want["significant"] else
                                   "CFD better" if want["direction"] == "b_lower" else "PD better")
    md = (tmp_path / "README.md").read_text()
    assert "## fast FID" in md and "## Inception KID×1e3" in md and "| paper |" in md
    cfd_wall = sum(v["wall_s"] for k, v in results["stages"].items() if k.startswith("cfd_seed0_tau0.95"))
    assert abl.training_wall(results["stages"], record) == pytest.approx(cfd_wall)
    assert f"| {cfd_wall:.0f} s |" in md
    # a second variant is compared with the paper recipe seed by seed
    other = json.loads(json.dumps(record))
    other["variant"] = "beta0"
    other["rows"]["cfd_001"]["fast_fid"]["values"] = [v + 0.5 for v in other["rows"]["cfd_001"]["fast_fid"]["values"]]
    (against,) = [a for a in abl.against_reference([record, other]) if a["metric"] == "fast_fid"]
    assert against["steps"][1]["mean"] == pytest.approx(0.5) and against["steps"][1]["seeds_worse"] == 1
    assert against["steps"][4]["mean"] == 0 and against["steps"][4]["seeds_worse"] == 0
    abl.write_summary([record, other], tmp_path)
    assert "| beta0 | fast FID | +0.00 (0/1 worse) | +0.00 (0/1 worse) | +0.50 (1/1 worse) |" in (
        tmp_path / "README.md").read_text()
    fid_4 = next(ln for ln in lines if ln["steps"] == "4" and ln["metric"] == "fast_fid")
    assert f"{float(fid_4['cfd_mean']):.2f} ± 0.00" in md
