"""CFD ablation on CIFAR-10 at the tiny scale: which part of the CFD loss does the work?

Each variant is one run of ``benchmarks/cifar10_cfd.py`` with one CFD setting changed, all in
the same output folder. The teacher, the 8-step base model, the PD rounds and their evaluations
are therefore made once and shared: a variant trains and scores only its own CFD rounds (their
folder is named by the setting), and every variant is compared with the same PD students through
the benchmark's paired bootstrap. Rerunning skips whatever is finished, so an interrupted
ablation resumes where it stopped. Variants in one folder run one after another: two at once
would overwrite each other's CFD evaluation files (the condensing step checks for that).

Variants (``--variants``, default all):

* ``paper``      tau 0.95, beta 0.003, gamma 0.75 (the paper's ResNet-18 recipe, the reference)
* ``beta0``      beta 0: the feature KL alone, no dataset-oriented loss
* ``tau0.5``     temperature 0.5 (sharper teacher targets)
* ``tau2``       temperature 2 (softer teacher targets)
* ``pixel0.1``   the paper's CFD loss plus 0.1 x the PD pixel loss
* ``pixel1``     the paper's CFD loss plus 1 x the PD pixel loss (same order of magnitude here)
* ``localdiv``   2 processes under torchrun, diversity term over each process's half of the batch;
                 compare with ``paper``, whose global-batch term 2 processes compute exactly as one
* ``strongguide`` a stronger guide: the tiny guide's recipe with 15000 instead of 5000 updates
                 (trained here once, ~40 min on 2 CPU cores; ``--prepare`` trains it alone)

Outputs, under ``--results-dir`` (default ``benchmarks/results/ablation``): ``<variant>.json``
(that run's PD and CFD rows, CFD - PD differences and timings, condensed from its
``results.json``), ``summary.csv`` (one line per variant, step count and metric, for plotting),
``summary.json``, ``README.md`` (the tables) and ``figures/<variant>_seed<s>.png`` (teacher, PD and
CFD samples from the same noise, first seed).

    python benchmarks/cifar10_ablation.py                          # all variants, seeds 0 1 2
    python benchmarks/cifar10_ablation.py --variants paper beta0 --seeds 0
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "cifar10_cfd.py"
STEPS = (4, 2, 1)
METRICS = ("fast_fid", "fast_kid_x1e3", "inception_kid_x1e3")
METRIC_LABELS = {"fast_fid": "fast FID", "fast_kid_x1e3": "fast KID×1e3", "inception_kid_x1e3": "Inception KID×1e3"}
#: Updates of the stronger guide (the tiny preset's guide has 5000).
STRONG_GUIDE_STEPS = 15_000


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    flags: tuple[str, ...] = ()
    processes: int = 1
    guide_steps: int | None = None  # train a guide with the tiny recipe and this many updates


VARIANTS = (
    Variant("paper", "paper recipe: tau 0.95, beta 0.003, gamma 0.75"),
    Variant("beta0", "beta 0: feature KL only, no dataset-oriented loss", ("--beta", "0")),
    Variant("tau0.5", "temperature tau 0.5 (sharper teacher targets)", ("--temperature", "0.5")),
    Variant("tau2", "temperature tau 2 (softer teacher targets)", ("--temperature", "2")),
    Variant("pixel0.1", "paper recipe + 0.1 x PD pixel loss", ("--pixel-weight", "0.1")),
    Variant("pixel1", "paper recipe + 1 x PD pixel loss", ("--pixel-weight", "1")),
    Variant("localdiv", "2 processes, diversity term over each process's batch (16 of 32)",
            ("--diversity", "local"), processes=2),
    Variant("strongguide", f"stronger guide: same recipe, {STRONG_GUIDE_STEPS} instead of 5000 updates",
            guide_steps=STRONG_GUIDE_STEPS),
)
BY_NAME = {v.name: v for v in VARIANTS}


class AblationError(RuntimeError):
    """A user-facing problem: one line, exit 2."""


def _log(msg: str) -> None:
    print(f"[cifar10_ablation] {msg}", flush=True)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cifar10_ablation.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=[v.name for v in VARIANTS], metavar="NAME",
                   help=f"Variants to run, in order (default: all of {', '.join(BY_NAME)}).")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Training and sampling seeds (0 1 2).")
    p.add_argument("--out-dir", default="runs/cifar10_ablation/tiny", help="Shared output folder of the runs.")
    p.add_argument("--results-dir", default=str(HERE / "results" / "ablation"),
                   help="Where the condensed results, summary.csv/json and README.md go.")
    p.add_argument("--data-dir", default=None, help="Folder holding cifar-10-batches-py (default: $KDIFF_DATA_DIR).")
    p.add_argument("--prepare", action="store_true",
                   help="Only train the guide classifiers the chosen variants need, then stop.")
    p.add_argument("--summary-only", action="store_true",
                   help="Only rebuild summary.csv/json and README.md from the <variant>.json files there.")
    args, extra = p.parse_known_args(argv)
    unknown = [v for v in args.variants if v not in BY_NAME]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {list(BY_NAME)}")
    args.extra = extra  # passed on to cifar10_cfd.py (e.g. --num-samples for a quick look)
    return args


# ============================================================================ running
def _guide(out_dir: Path, data_dir: str | None, steps: int) -> Path:
    """Train (once; an interrupted run resumes) a guide with the tiny preset's recipe and ``steps`` updates."""
    sys.path.insert(0, str(HERE))
    import cifar10_cfd as bench

    from kdiff.recipes import ClassifierConfig, train_classifier

    folder = out_dir / f"guide_{steps}"
    path = folder / "classifier.safetensors"
    if path.is_file():
        return path
    recipe = {**bench.PRESETS["tiny"].guide, "steps": steps, "ckpt_every": 500}
    _log(f"training a guide: {recipe['arch']} width {recipe.get('width')}, {steps} updates, into {folder}")
    cfg = ClassifierConfig(out_dir=str(folder), data_dir=data_dir, progress=True, mixed_precision=True,
                           eval_samples=bench.PRESETS["tiny"].classifier_eval_samples, **recipe)
    t0 = time.perf_counter()
    train_classifier(cfg)
    _log(f"guide trained in {time.perf_counter() - t0:.0f} s")
    return path


def _command(variant: Variant, args: argparse.Namespace, out_dir: Path, guide: Path | None) -> list[str]:
    launcher = [sys.executable]
    if variant.processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={variant.processes}"]
    cmd = [*launcher, str(SCRIPT), "--seeds", *map(str, args.seeds), "--out-dir", str(out_dir), *variant.flags]
    if guide is not None:
        cmd += ["--guide-classifier", str(guide)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return cmd + list(args.extra)


def run_variant(variant: Variant, args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.out_dir)
    guide = _guide(out_dir, args.data_dir, variant.guide_steps) if variant.guide_steps else None
    cmd = _command(variant, args, out_dir, guide)
    env = dict(os.environ)
    if variant.processes > 1 and "OMP_NUM_THREADS" not in env:
        # share the cores between the processes instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // variant.processes))
    _log(f"variant {variant.name}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise AblationError(f"variant {variant.name} failed (exit {proc.returncode}); rerun to resume it")
    results = json.loads((out_dir / "results.json").read_text())
    record = condense(results, variant, wall)
    if guide is not None:
        record["guide_classifier"] = results["guide_classifier"]
    return record


# ============================================================================ condensing
def condense(results: dict[str, Any], variant: Variant, wall: float) -> dict[str, Any]:
    """The PD/CFD rows, CFD - PD differences and timings of one variant's ``results.json``."""
    rows = {}
    for row in results["rows"]:
        if row["method"] in ("pd", "cfd"):
            rows[row["row"]] = {
                "method": row["method"], "steps": row["steps"],
                **{m: {k: row["summary"][m][k] for k in ("mean", "seed_std", "values", "intervals", "samples")}
                   for m in METRICS if m in row["summary"]},
            }
    diffs = []
    for d in results["differences"]:
        if d["kind"] != "cfd_vs_pd":
            continue
        diffs.append({"steps": d["steps"], **{
            m: {"mean": v["mean"], "seed_std": v["seed_std"], "significant": v["significant"],
                "direction": v["direction"],
                "per_seed": [{k: s[k] for k in ("seed", "difference", "low", "high")} for s in v["per_seed"]]}
            for m, v in d["metrics"].items()}})
    # The paired differences must be those of the rows' own metrics: two runs sharing the folder at
    # once would mix their CFD features (one variant at a time per folder).
    for d in diffs:
        n = d["steps"]
        for m in METRICS:
            if m not in d or f"cfd_{n:03d}" not in rows or f"pd_{n:03d}" not in rows:
                continue
            cfd, pd = rows[f"cfd_{n:03d}"][m]["values"], rows[f"pd_{n:03d}"][m]["values"]
            for i, s in enumerate(d[m]["per_seed"]):
                if abs(s["difference"] - (cfd[i] - pd[i])) > 1e-6 * (1 + abs(cfd[i])):
                    raise AblationError(f"variant {variant.name}: the paired {m} difference at {n} steps does not "
                                        "match its rows (another run used the folder at the same time?); rerun it")
    record = {
        "variant": variant.name, "description": variant.description, "flags": list(variant.flags),
        "processes": results["processes"], "command": results["command"], "cfd": results["cfd"],
        "seeds": results["seeds"], "precision": results["precision"], "significance_rule": results["significance_rule"],
        "rows": rows, "cfd_minus_pd": sorted(diffs, key=lambda d: -d["steps"]), "verdict": results["verdict"],
        "stage_wall_s": results["stage_wall_s"], "variant_wall_s": wall, "environment": results["environment"],
    }
    record["cfd_training_wall_s"] = training_wall(results.get("stages", {}), record)
    return record


def _verdict(m: dict[str, Any]) -> str:
    if not m["significant"]:
        return "n.s."
    return "CFD better" if m["direction"] == "b_lower" else "PD better"


def summary_lines(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per variant, step count and metric: CFD and PD means over seeds, CFD - PD."""
    lines = []
    for rec in records:
        by_steps = {d["steps"]: d for d in rec["cfd_minus_pd"]}
        for n in STEPS:
            d = by_steps.get(n)
            for m in METRICS:
                cfd, pd = rec["rows"].get(f"cfd_{n:03d}", {}).get(m), rec["rows"].get(f"pd_{n:03d}", {}).get(m)
                if cfd is None or pd is None or d is None or m not in d:
                    continue
                lines.append({
                    "variant": rec["variant"], "steps": n, "metric": m, "seeds": len(cfd["values"]),
                    "cfd_mean": cfd["mean"], "cfd_seed_std": cfd["seed_std"], "pd_mean": pd["mean"],
                    "pd_seed_std": pd["seed_std"], "cfd_minus_pd": d[m]["mean"],
                    "cfd_minus_pd_seed_std": d[m]["seed_std"],
                    "seeds_cfd_lower": sum(s["high"] < 0 for s in d[m]["per_seed"]),
                    "seeds_pd_lower": sum(s["low"] > 0 for s in d[m]["per_seed"]),
                    "verdict": _verdict(d[m]),
                })
    return lines


def _table(records: list[dict[str, Any]], lines: list[dict[str, Any]], metric: str) -> list[str]:
    cell = {(ln["variant"], ln["steps"]): ln for ln in lines if ln["metric"] == metric}
    scale = 2 if metric == "fast_fid" else 1
    head = "| variant | " + " | ".join(f"CFD {n} step{'s' * (n > 1)} | CFD − PD, {n}" for n in STEPS) + " |"
    out = [head, "|---|" + "---:|---:|" * len(STEPS)]
    for rec in records:
        cells = []
        for n in STEPS:
            ln = cell.get((rec["variant"], n))
            if ln is None:
                cells += ["–", "–"]
                continue
            cells.append(f"{ln['cfd_mean']:.{scale}f} ± {ln['cfd_seed_std']:.{scale}f}")
            mark = {"CFD better": " ✓", "PD better": " ✗", "n.s.": ""}[ln["verdict"]]
            cells.append(f"{ln['cfd_minus_pd']:+.{scale}f}{mark} ({ln['seeds_cfd_lower']}/{ln['seeds']} seeds)")
        out.append(f"| {rec['variant']} | " + " | ".join(cells) + " |")
    pd_cells = []
    for n in STEPS:
        ln = cell.get((records[0]["variant"], n)) if records else None
        pd_cells += [f"PD {ln['pd_mean']:.{scale}f} ± {ln['pd_seed_std']:.{scale}f}" if ln else "–", ""]
    out.append("| *PD (shared)* | " + " | ".join(pd_cells) + " |")
    return out


def training_wall(stages: dict[str, Any], record: dict[str, Any]) -> float | None:
    """Seconds the variant's CFD rounds trained, all seeds, from the run's stage records (``stages``)."""
    cfd = record["cfd"]  # results from before "tag" was recorded had only the paper's three numbers
    tag = cfd.get("tag") or f"tau{cfd['temperature']:g}_beta{cfd['beta']:g}_gamma{cfd['gamma']:g}"
    walls = [stages.get(f"cfd_seed{seed}_{tag}_steps{n}", {}).get("wall_s") for seed in record["seeds"] for n in STEPS]
    return None if None in walls else float(sum(walls))


def against_reference(records: list[dict[str, Any]], reference: str = "paper") -> list[dict[str, Any]]:
    """Per seed, each variant's CFD metric minus the reference variant's, at every step count."""
    ref = next((r for r in records if r["variant"] == reference), None)
    out: list[dict[str, Any]] = []
    if ref is None:
        return out
    for rec in records:
        if rec is ref:
            continue
        common = [s for s in rec["seeds"] if s in ref["seeds"]]
        for m in ("fast_fid", "inception_kid_x1e3"):
            steps = {}
            for n in STEPS:
                a, b = rec["rows"].get(f"cfd_{n:03d}", {}).get(m), ref["rows"].get(f"cfd_{n:03d}", {}).get(m)
                if a is None or b is None or not common:
                    continue
                diffs = [a["values"][rec["seeds"].index(s)] - b["values"][ref["seeds"].index(s)] for s in common]
                steps[n] = {"mean": sum(diffs) / len(diffs), "per_seed": diffs, "seeds_worse": sum(d > 0 for d in diffs)}
            out.append({"variant": rec["variant"], "metric": m, "steps": steps})
    return out


def write_summary(records: list[dict[str, Any]], results_dir: Path) -> None:
    """``summary.csv``/``summary.json`` (one line per variant, steps, metric) and ``README.md`` (tables)."""
    lines = summary_lines(records)
    with open(results_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(lines[0]) if lines else ["variant"])
        writer.writeheader()
        writer.writerows(lines)
    md = ["# CFD ablation, tiny preset", "",
          "Made by `python benchmarks/cifar10_ablation.py` (see docs/results.md for the reading). Values are "
          "means ± standard deviation over the training seeds; CFD − PD is the mean paired difference, "
          "with ✓ (CFD lower) or ✗ (PD lower) when every seed's paired-bootstrap 95% interval excludes 0 on "
          "the same side, and in brackets the number of seeds whose interval is below 0. Lower is better.", "",
          "| variant | setting | processes | CFD rounds' training, all seeds |", "|---|---|---:|---:|"]
    for r in records:
        wall = r.get("cfd_training_wall_s")
        md.append(f"| {r['variant']} | {r['description']} | {r['processes']} | {'–' if wall is None else f'{wall:.0f} s'} |")
    for metric in METRICS:
        md += ["", f"## {METRIC_LABELS[metric]}", "", *_table(records, lines, metric)]
    against = against_reference(records)
    if against:
        md += ["", "## Each variant against the paper recipe", "",
               "Per seed, the variant's CFD student minus the paper recipe's (same seed, same PD base, same "
               "noise), then the mean over seeds and how many seeds have the variant worse (higher). Not a "
               "bootstrap: the per-seed values are listed in summary.json.", "",
               "| variant | metric | " + " | ".join(f"{n} step{'s' * (n > 1)}" for n in STEPS) + " |",
               "|---|---|" + "---:|" * len(STEPS)]
        for a in against:
            cells = [f"{c['mean']:+.2f} ({c['seeds_worse']}/{len(c['per_seed'])} worse)" if c else "–"
                     for c in (a["steps"].get(n) for n in STEPS)]
            md.append(f"| {a['variant']} | {METRIC_LABELS[a['metric']]} | " + " | ".join(cells) + " |")
    (results_dir / "summary.json").write_text(json.dumps({"lines": lines, "against_paper": against}, indent=1) + "\n")
    (results_dir / "README.md").write_text("\n".join(md) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    results_dir = Path(args.results_dir)
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        if args.prepare:
            for name in args.variants:
                if BY_NAME[name].guide_steps:
                    _guide(Path(args.out_dir), args.data_dir, BY_NAME[name].guide_steps)
            return 0
        if not args.summary_only:
            for name in args.variants:
                record = run_variant(BY_NAME[name], args)
                (results_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
                seed = record["seeds"][0]  # the comparison figure of the first seed, to look at
                figure = Path(args.out_dir) / "figures" / f"comparison_seed{seed}.png"
                if figure.is_file():
                    (results_dir / "figures").mkdir(exist_ok=True)
                    shutil.copyfile(figure, results_dir / "figures" / f"{name}_seed{seed}.png")
                _log(f"variant {name}: done in {record['variant_wall_s']:.0f} s -> {results_dir / (name + '.json')}")
        records = [json.loads((results_dir / f"{v.name}.json").read_text())
                   for v in VARIANTS if (results_dir / f"{v.name}.json").is_file()]
        if not records:
            raise AblationError(f"no variant results in {results_dir}; run some variants first")
        write_summary(records, results_dir)
        _log(f"summary: {results_dir / 'README.md'}, {results_dir / 'summary.csv'}")
    except AblationError as e:
        print(f"cifar10_ablation.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
