#!/usr/bin/env python
"""Distil a diffusers eps-prediction teacher 8 -> 4 -> 2 -> 1 steps with PD and with CFD.

The teacher is a ``UNet2DModel`` with google/ddpm-cifar10-32's block layout and a
``DDPMScheduler`` (linear betas 1e-4..0.02, 1000 steps, ``prediction_type="epsilon"``). No
pretrained weights are needed: by default the script first trains a tiny teacher on CIFAR-10 for a
short while. ``--teacher PATH`` takes a diffusers folder instead (``unet/`` and ``scheduler/``, as
``DDPMPipeline.save_pretrained`` writes, or the UNet's files with a ``scheduler_config.json``),
e.g. a local copy of google/ddpm-cifar10-32.

Both methods run the same few lines of user code (:func:`distil`, also shown in
docs/interop.md): kdiff's :func:`kdiff.interop.from_diffusers`, :class:`kdiff.ProgressiveDistiller`
and, for CFD, :class:`kdiff.CFDLoss` through a frozen guide classifier. Every student is exported
with :func:`kdiff.interop.export_ddim_pipeline` and sampled back with
``diffusers.DDIMPipeline.from_pretrained(folder)``; the teacher's own ``N``-step DDIM (diffusers'
``DDIMScheduler``, trailing spacing) is the baseline at each ``N``. Reported per row:

* MSE to the teacher's many-step DDIM output (``--ref-steps``, 1000 by default) from the same
  initial noise, in [-1, 1] pixel units;
* the fast FID: evaluation-classifier features of the samples against CIFAR-10 test images
  (only comparable between rows of one run).

Writes ``results.json`` and ``results.md`` under ``--out-dir``:

    python examples/distill_diffusers.py --data-dir /path/to/cifar10        # 5-6 min on 2 CPU cores
    python examples/distill_diffusers.py --teacher ./ddpm-cifar10-32 --device cuda
    python examples/distill_diffusers.py --toy                               # < 1 min, numbers meaningless
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils import logging as diffusers_logging

import kdiff
from kdiff import CFDLoss, ProgressiveDistiller
from kdiff.interop import DiffusersModel, ddim_sample_kwargs, export_ddim_pipeline, from_diffusers

ASSETS = Path(__file__).resolve().parents[1] / "benchmarks" / "assets" / "tiny"
STEPS = (8, 4, 2, 1)  # the teacher's 8-step DDIM, then the students


# ------------------------------------------------------------------ the user code (docs/interop.md)
def distil(unet, scheduler, batches, out_dir, *, cfd=None, steps=100, lr=1e-4):
    """PD (or CFD with a CFDLoss) from the teacher's 8-step DDIM down to 1 step; {N: folder}."""
    teacher, schedule, kind = from_diffusers(unet, scheduler)
    # An eps-student copied from the teacher starts as the teacher's own DDIM at every N.
    student = DiffusersModel(copy.deepcopy(unet), schedule)
    pd = ProgressiveDistiller(teacher, student, schedule, 4, teacher_prediction=kind,
                              student_prediction="eps")
    folders = {}
    while True:
        optimizer = torch.optim.Adam(pd.student.parameters(), lr=lr)
        for _ in range(steps):
            out = pd(next(batches))
            loss = out.loss if cfd is None else cfd(out.x_pred, out.x_target).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        n = pd.num_student_steps
        folders[n] = export_ddim_pipeline(pd.student, f"{out_dir}/student-{n}", num_steps=n,
                                          prediction_type="eps")
        if n == 1:
            return folders
        pd = pd.next_round()
# ------------------------------------------------------------------ end of the user code


class Progress:
    """tqdm bars on a terminal; one line per stage (start and end) when the output is redirected."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.tty = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.0f} s] {message}", flush=True)

    def wrap(self, items: Iterable[Any], desc: str, total: int) -> Iterator[Any]:
        if self.tty:
            from tqdm.auto import tqdm

            yield from tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
            return
        yield from items


def tiny_unet(width: int, *, seed: int) -> UNet2DModel:
    """google/ddpm-cifar10-32's layout (attention at 16x16, positional time embedding, one head per
    attention block) with widths ``(w, 2w, 2w, 2w)`` and one res block per level (the original:
    ``w = 128``, two res blocks)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=min(8, width), attention_head_dim=None, downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
    )


def ddpm_scheduler() -> DDPMScheduler:
    """google/ddpm-cifar10-32's training table: linear betas 1e-4..0.02 over 1000 steps, eps."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                         beta_end=0.02, prediction_type="epsilon", clip_sample=True)


def batch_stream(images: torch.Tensor, batch_size: int, *, seed: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Endless random batches of ``images`` (uint8 [N, 3, H, W]) in [-1, 1] with random flips."""
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x = images[idx].float() / 127.5 - 1.0
        flip = torch.rand(batch_size, generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        yield x.to(device)


def train_teacher(unet: UNet2DModel, scheduler: DDPMScheduler, batches: Iterator[torch.Tensor], *,
                  steps: int, lr: float, progress: Progress) -> float:
    """DDPM's eps loss, as diffusers' unconditional training example writes it. Returns the last
    100 steps' mean loss."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(50, steps // 10))
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    unet.train()
    losses = []
    for _ in progress.wrap(range(steps), "teacher", steps):
        x = next(batches)
        noise = torch.randn_like(x)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x.shape[0],), device=x.device)
        noisy = scheduler.add_noise(x, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.detach())
    unet.eval()
    return float(torch.stack(losses[-100:]).mean()) if losses else math.nan


def load_teacher(path: Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """A diffusers folder: ``unet/`` + ``scheduler/`` (a saved pipeline) or the UNet's own files
    next to ``scheduler_config.json``."""
    unet = UNet2DModel.from_pretrained(path, subfolder="unet" if (path / "unet").is_dir() else None)
    scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler" if (path / "scheduler").is_dir() else None)
    return unet.eval(), scheduler


def teacher_ddim(unet: UNet2DModel, scheduler: DDPMScheduler) -> DDIMPipeline:
    """The teacher's own DDIM in the settings the exported students use (trailing spacing, clipped
    x_hat with the clipped eps, a clean last step); ``ddim_sample_kwargs`` checks they are kdiff's."""
    ddim = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True,
                                     steps_offset=0, clip_sample=True, clip_sample_range=1.0, thresholding=False)
    for n in STEPS:
        ddim_sample_kwargs(ddim, n, use_clipped_model_output=True)
    return DDIMPipeline(unet=unet, scheduler=ddim)


@torch.no_grad()
def sample(pipe: DDIMPipeline, num_steps: int, num_samples: int, *, seed: int, batch: int,
           device: torch.device) -> torch.Tensor:
    """``num_samples`` images in [-1, 1] (NCHW); batch ``i`` draws its noise from seed ``seed + i``."""
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i, start in enumerate(range(0, num_samples, batch)):
        g = torch.Generator(device=device).manual_seed(seed + i)
        images = pipe(batch_size=min(batch, num_samples - start), num_inference_steps=num_steps, eta=0.0,
                      use_clipped_model_output=True, generator=g, output_type="np").images
        out.append(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2) * 2.0 - 1.0)
    return torch.cat(out).float()


def image_mse(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean squared error per pixel and its standard error over the samples."""
    per_sample = (images - reference).pow(2).flatten(1).mean(1).double()
    sem = float(per_sample.std() / math.sqrt(per_sample.numel())) if per_sample.numel() > 1 else 0.0
    return float(per_sample.mean()), sem


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", type=Path, default=None,
                   help="A diffusers teacher folder (unet/ + scheduler/); default: train a tiny one here.")
    p.add_argument("--data-dir", default=os.environ.get("KDIFF_DATA_DIR"),
                   help="Folder holding cifar-10-batches-py (default: $KDIFF_DATA_DIR).")
    p.add_argument("--out-dir", type=Path, default=Path("runs/distill_diffusers"))
    p.add_argument("--width", type=int, default=16, help="Base width of the tiny teacher's UNet.")
    p.add_argument("--teacher-steps", type=int, default=250, help="Training steps of the tiny teacher.")
    p.add_argument("--teacher-batch", type=int, default=32)
    p.add_argument("--teacher-lr", type=float, default=2e-3)
    p.add_argument("--round-steps", type=int, default=200, help="Optimizer steps per distillation round.")
    p.add_argument("--batch", type=int, default=8, help="Batch size of the distillation rounds.")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the distillation rounds.")
    p.add_argument("--temperature", type=float, default=0.95, help="CFD temperature tau.")
    p.add_argument("--beta", type=float, default=0.003, help="CFD weight of the dataset-oriented loss.")
    p.add_argument("--gamma", type=float, default=0.75, help="CFD entropy weight inside the dataset-oriented loss.")
    p.add_argument("--guide-classifier", type=Path, default=ASSETS / "guide_classifier.safetensors",
                   help="The classifier CFD distils through (kdiff classifier checkpoint).")
    p.add_argument("--eval-classifier", type=Path, default=ASSETS / "eval_classifier.safetensors",
                   help="The classifier of the fast FID (a different one from the guide).")
    p.add_argument("--ref-steps", type=int, default=1000, help="Steps of the teacher's reference DDIM.")
    p.add_argument("--mse-samples", type=int, default=16, help="Samples of the MSE to the reference.")
    p.add_argument("--fid-samples", type=int, default=256, help="Samples of each row's fast FID.")
    p.add_argument("--fid-reference", type=int, default=2000, help="CIFAR-10 test images of the FID reference.")
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu', 'cuda', ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    p.add_argument("--toy", action="store_true",
                   help="Tiny everything (< 1 minute on a CPU) to check the wiring; the numbers mean nothing.")
    args = p.parse_args(argv)
    if args.toy:
        args.width, args.teacher_steps, args.teacher_batch = 4, 2, 4
        args.round_steps, args.batch = 2, 4
        args.ref_steps, args.mse_samples, args.fid_samples, args.fid_reference = 20, 4, 8, 32
        args.sample_batch = 8
    for name in ("teacher_steps", "round_steps", "batch", "teacher_batch", "sample_batch", "width"):
        if getattr(args, name) < (0 if name == "teacher_steps" else 1):
            p.error(f"--{name.replace('_', '-')} must be a positive int; got {getattr(args, name)}")
    for name in ("mse_samples", "fid_samples", "fid_reference"):
        if getattr(args, name) < 2:
            p.error(f"--{name.replace('_', '-')} must be >= 2; got {getattr(args, name)}")
    if args.ref_steps < 1 or 1000 % args.ref_steps and args.teacher is None:
        p.error(f"--ref-steps must divide the teacher's 1000 training steps; got {args.ref_steps}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    progress = Progress()
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def stage(name: str) -> Callable[[], None]:
        progress.log(f"{name} ...")
        t0 = time.perf_counter()

        def done() -> None:
            times[name] = round(time.perf_counter() - t0, 1)
            progress.log(f"{name}: done in {times[name]:.0f} s")

        return done

    from kdiff.data import CIFAR10
    from kdiff.eval import ClassifierFeatureExtractor, fid_from_features
    from kdiff.recipes import load_classifier

    train_images, _ = CIFAR10(args.data_dir, train=True).tensors()
    test_images, _ = CIFAR10(args.data_dir, train=False).tensors()

    # 1. The teacher: a diffusers eps model on DDPM's linear 1000-step table.
    teacher_info: dict[str, Any]
    if args.teacher is not None:
        unet, scheduler = load_teacher(args.teacher)
        teacher_info = {"source": str(args.teacher)}
    else:
        done = stage(f"teacher: {args.teacher_steps} DDPM training steps, batch {args.teacher_batch}")
        unet, scheduler = tiny_unet(args.width, seed=args.seed).to(device), ddpm_scheduler()
        loss = train_teacher(unet, scheduler, batch_stream(train_images, args.teacher_batch, seed=args.seed, device=device),
                             steps=args.teacher_steps, lr=args.teacher_lr, progress=progress)
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(out_dir / "teacher")
        teacher_info = {"source": "trained by this script", "folder": str(out_dir / "teacher"),
                        "train_steps": args.teacher_steps, "batch_size": args.teacher_batch,
                        "lr": args.teacher_lr, "final_loss": round(loss, 5)}
        done()
    unet = unet.to(device).eval()
    teacher_info["parameters"] = sum(p.numel() for p in unet.parameters())
    teacher_info["scheduler"] = {k: scheduler.config[k] for k in
                                 ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")}

    # 2. PD and CFD, the same user code; CFD through the guide classifier.
    guide, guide_transform, _ = load_classifier(args.guide_classifier, device=device)
    cfd = CFDLoss(guide, transform=guide_transform, temperature=args.temperature, beta=args.beta, gamma=args.gamma)
    folders: dict[str, dict[int, Path]] = {}
    for method, loss_fn in (("pd", None), ("cfd", cfd)):
        done = stage(f"{method.upper()}: rounds 8 -> 4 -> 2 -> 1, {args.round_steps} steps each, batch {args.batch}")
        torch.manual_seed(args.seed + 1)  # the same draws of t and noise for both methods
        batches = progress.wrap(batch_stream(train_images, args.batch, seed=args.seed + 1, device=device),
                                method.upper(), 3 * args.round_steps)
        folders[method] = distil(unet, scheduler, iter(batches), out_dir / method, cfd=loss_fn,
                                 steps=args.round_steps, lr=args.lr)
        done()

    # 3. Sample every row with diffusers' DDIMPipeline from the same noise.
    done = stage(f"reference: the teacher's {args.ref_steps}-step DDIM on {args.mse_samples} samples")
    teacher_pipe = teacher_ddim(unet, scheduler)
    seeds = {"mse": 10_000 + args.seed, "fid": 20_000 + args.seed}
    kw = {"batch": args.sample_batch, "device": device}
    reference = sample(teacher_pipe, args.ref_steps, args.mse_samples, seed=seeds["mse"], **kw)
    done()

    done = stage(f"evaluation: {args.mse_samples} MSE samples and {args.fid_samples} FID samples per row")
    clf, _, meta = load_classifier(args.eval_classifier, device=device)
    extractor = ClassifierFeatureExtractor(clf, mean=meta["transform"]["mean"], std=meta["transform"]["std"],
                                           feature_dim=int(clf.feature_dim), name="eval-classifier")
    g = torch.Generator().manual_seed(args.seed)
    real = test_images[torch.randperm(test_images.shape[0], generator=g)[: args.fid_reference]]

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([extractor(b.to(device)).cpu() for b in images.split(256)])

    real_feats = features(real)
    rows = []
    pipes: list[tuple[str, int, DDIMPipeline]] = [("teacher", n, teacher_pipe) for n in STEPS]
    for method in ("pd", "cfd"):
        pipes += [(method, n, DDIMPipeline.from_pretrained(folders[method][n])) for n in STEPS[1:]]
    for method, n, pipe in progress.wrap(pipes, "evaluation", len(pipes)):
        mse, sem = image_mse(sample(pipe, n, args.mse_samples, seed=seeds["mse"], **kw), reference)
        fid = fid_from_features(real_feats, features(sample(pipe, n, args.fid_samples, seed=seeds["fid"], **kw)))
        rows.append({"method": method, "steps": n, "mse": mse, "mse_sem": sem, "fid": fid,
                     "folder": str(folders[method][n]) if method != "teacher" else None})
    done()

    def row(method: str, n: int) -> dict[str, Any]:
        return next(r for r in rows if r["method"] == method and r["steps"] == n)

    check = {
        "claim": "the 4-step student's MSE to the teacher's reference is below the teacher's own 4-step DDIM's",
        "teacher_ddim_4_mse": row("teacher", 4)["mse"],
        "pd_4_mse": row("pd", 4)["mse"],
        "cfd_4_mse": row("cfd", 4)["mse"],
        "pd_beats_teacher_4": row("pd", 4)["mse"] < row("teacher", 4)["mse"],
        "cfd_beats_teacher_4": row("cfd", 4)["mse"] < row("teacher", 4)["mse"],
    }
    times["total"] = round(time.perf_counter() - wall0, 1)
    result = {
        "command": "python " + " ".join([sys.argv[0] if argv is None else "examples/distill_diffusers.py",
                                         *(sys.argv[1:] if argv is None else argv)]),
        "toy": args.toy,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "kdiff": kdiff.__version__,
                     "diffusers": __import__("diffusers").__version__},
        "teacher": teacher_info,
        "distillation": {"rounds": "8 -> 4 -> 2 -> 1 (the first teacher is the teacher's 8-step DDIM)",
                         "student": "eps-prediction copy of the teacher UNet, weighting 'auto' (eps_mse)",
                         "steps_per_round": args.round_steps, "batch_size": args.batch, "lr": args.lr,
                         "cfd": {"guide": str(args.guide_classifier), "temperature": args.temperature,
                                 "beta": args.beta, "gamma": args.gamma, "pixel_weight": 0.0}},
        "sampler": "diffusers DDIMPipeline, eta 0, timestep_spacing 'trailing', clip_sample with "
                   "use_clipped_model_output=True",
        "mse": {"reference": f"the teacher's {args.ref_steps}-step DDIM from the same initial noise",
                "num_samples": args.mse_samples, "units": "mean squared pixel error in [-1, 1]"},
        "fid": {"features": f"evaluation classifier {args.eval_classifier.name} ({int(clf.feature_dim)}-d)",
                "reference": f"{args.fid_reference} CIFAR-10 test images", "num_samples": args.fid_samples},
        "rows": rows,
        "check": check,
        "wall_time_s": times,
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown_table(result)
    (out_dir / "results.md").write_text(table)
    print(table)
    for method in ("pd", "cfd"):
        verdict = "beats" if check[f"{method}_beats_teacher_4"] else "does NOT beat"
        print(f"check: the 4-step {method.upper()} student (MSE {check[f'{method}_4_mse']:.5f}) {verdict} the "
              f"teacher's own 4-step DDIM (MSE {check['teacher_ddim_4_mse']:.5f}) against its "
              f"{args.ref_steps}-step output")
    progress.log(f"wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
    return result


def markdown_table(result: dict[str, Any]) -> str:
    """One line per step count: MSE (± standard error) and fast FID of the teacher's DDIM, PD and CFD."""
    by = {(r["method"], r["steps"]): r for r in result["rows"]}

    def cell(method: str, n: int, key: str) -> str:
        r = by.get((method, n))
        if r is None:
            return "-"
        return f"{r['mse']:.4f} ± {r['mse_sem']:.4f}" if key == "mse" else f"{r['fid']:.2f}"

    lines = [
        f"MSE to {result['mse']['reference']} ({result['mse']['num_samples']} samples, mean ± standard error); "
        f"fast FID on {result['fid']['features']} vs {result['fid']['reference']} "
        f"({result['fid']['num_samples']} samples). Lower is better.",
        "",
        "| steps | teacher DDIM MSE | PD MSE | CFD MSE | teacher DDIM FID | PD FID | CFD FID |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in STEPS:
        lines.append(f"| {n} | " + " | ".join(cell(m, n, k) for k in ("mse", "fid") for m in ("teacher", "pd", "cfd")) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
