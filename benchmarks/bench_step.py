"""Time one whole PD step and one whole CFD step four ways, with the reference UNet.

    python benchmarks/bench_step.py --quick --device cpu --threads 2 --out benchmarks/results/step_cpu.json
    python benchmarks/bench_step.py --device cuda --out benchmarks/results/step_<gpu>.json

A step is the teacher's two DDIM half-steps (no gradient), the student's forward and backward,
for CFD the frozen classifier on both images (``x_tilde`` without gradient, ``x_hat`` with), the
loss, gradient clipping (norm 1) and an Adam update. Variants of the same step:

* ``a`` (paper-style): float32, eager, written out as the paper's code does it, from
  docs/method.md: the discrete cosine table, the teacher half-steps under ``torch.no_grad``,
  ``x_tilde``, the truncated-SNR loss (PD) or
  ``F.kl_div(F.log_softmax(f_S), F.softmax(f_T / tau))`` + ``beta (gamma H + (1 - gamma) Dv)``
  (CFD) with plain torch ops; ``torch.optim.Adam`` in its default form;
* ``b`` (kdiff eager): :class:`kdiff.train_step.DistillationStep` in float32, no compile, the
  same optimizer as ``a``;
* ``c`` (kdiff fast path, eager): ``DistillationStep`` with its defaults, ``autocast_dtype="auto"``
  (bf16 where the device computes it natively) and ``channels_last="auto"`` (on for CUDA only;
  ``--channels-last`` overrides), and ``Adam(fused=True)`` (``--no-fused-adam`` leaves it out).
  On CUDA the distiller and the CFD loss dispatch to :mod:`kdiff.ops`' Triton kernels
  (``impl="auto"``);
* ``c_compiled``: ``c`` with ``compile=True`` (Inductor; under ``torch.compile`` the losses take
  the torch path, which Inductor fuses). ``--no-compile`` leaves it out.

All start from the same weights and see the same batch, times and noise. Before timing, one step
of each is compared with ``a``: ``b`` must agree to float32 rounding and ``c``/``c_compiled`` to
bfloat16's (loss and the clipped gradient of the student's first convolution; see ``TOL``); if
not, the run goes on and exits with an error after writing the JSON. That first step also gives
the compile time (its duration minus a steady step), which is not part of any timing. Steps are then timed in rounds, each variant once per round and the order
rotated from round to round (so no variant always follows the same one), each variant updating
its own student. The JSON gets per variant the median and spread of the wall time, images/s, on
CPU the median process CPU time (which time-slicing by other processes on a shared machine does
not stretch), the ratios to ``a`` (of the medians, the median of per-round ratios
``paired_ratios``, and on CPU ``cpu_time_ratios``), and the targets those ratios are held to.

Memory, measured after all timings: the peak of one step over what was allocated before it
(``torch.cuda.max_memory_allocated`` on CUDA; on CPU the live tensor storage, from the allocation
and free events of ``torch.profiler(profile_memory=True)``), next to the same figure for the
student's forward and backward plus, for CFD, the classifier's forward and backward on the
student's images (same precision and layout, eager): the step may cost at most 10% more
(``memory_over_reference``). On CUDA each kdiff variant also runs one step under
``torch.cuda.set_sync_debug_mode("error")`` (``sync_free``; a host sync fails the run).

Inductor's cache goes to a fresh temporary folder unless ``--warm-cache``, so the compile time
is that of a first run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiff import CFDLoss, ClassifierTransform, DiscreteSchedule, ProgressiveDistiller
from kdiff.models import ResNet18, SmallCNN, UNet, UNetConfig
from kdiff.train_step import (
    DistillationStep,
    native_bf16,
    resolve_autocast_dtype,
    resolve_channels_last,
)

T_BASE = 1024  # the paper's discrete cosine table
TAU, BETA, GAMMA = 0.95, 0.003, 0.75  # the paper's ResNet-18 setting
LR, GRAD_CLIP = 5e-5, 1.0  # a PD/CFD round (docs/method.md §4)
# Agreement with the paper-style step: relative error of the loss, and of the gradient of the
# student's first convolution (norm of the difference over the norm), per dtype and kind.
# float32: rounding of a different but equivalent formula. bfloat16: 8 mantissa bits through a
# few dozen layers; for CFD the gradient also comes back through the classifier's bf16 backward,
# and at toy sizes it differed from float32 by about a quarter of its norm (eager and Inductor
# alike), so there the check catches a wrong or missing term, not rounding.
TOL = {
    "float32": {"pd": {"loss": 1e-4, "grad": 1e-3}, "cfd": {"loss": 1e-4, "grad": 1e-3}},
    "bfloat16": {"pd": {"loss": 5e-2, "grad": 0.15}, "cfd": {"loss": 5e-2, "grad": 0.4}},
}


# ------------------------------------------------------------------ (a) the paper-style step
def cosine_alphabar(T: int, s: float = 0.008) -> Tensor:
    """The paper code's discrete cosine ``alphabar`` (docs/method.md §1), float64, length T + 1."""
    n = T + 1
    i = torch.arange(n + 1, dtype=torch.float64)
    f = torch.cos(((i / n) + s) / (1 + s) * math.pi / 2) ** 2
    beta = torch.clamp(1 - f[1:] / f[:-1], max=0.999)
    return torch.cumprod(1 - beta, 0)


class PaperStep:
    """Progressive distillation / CFD written out with plain torch ops (x-prediction networks)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, classifier: nn.Module | None,
                 optimizer: torch.optim.Optimizer, *, num_student_steps: int, device: torch.device) -> None:
        self.teacher, self.student, self.classifier, self.optimizer = teacher, student, classifier, optimizer
        ab = cosine_alphabar(T_BASE)
        self.alpha = ab.sqrt().float().to(device)
        self.sigma = (1 - ab).sqrt().float().to(device)
        self.half = T_BASE // (2 * num_student_steps)

    def _coeffs(self, index: Tensor) -> tuple[Tensor, Tensor]:
        return self.alpha[index].view(-1, 1, 1, 1), self.sigma[index].view(-1, 1, 1, 1)

    def __call__(self, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        i_t = t.long()
        i_mid, i_next = i_t - self.half, i_t - 2 * self.half
        a_t, s_t = self._coeffs(i_t)
        a_m, s_m = self._coeffs(i_mid)
        a_n, s_n = self._coeffs(i_next)
        z_t = a_t * x + s_t * eps
        with torch.no_grad():
            x1 = self.teacher(z_t, t)
            z_mid = a_m * x1 + s_m * (z_t - a_t * x1) / s_t
            x2 = self.teacher(z_mid, i_mid.float())
            z_next = a_n * x2 + s_n * (z_mid - a_m * x2) / s_m
            ratio = s_n / s_t
            x_tilde = (z_next - ratio * z_t) / (a_n - ratio * a_t)
            eps_tilde = (z_t - a_t * x_tilde) / s_t
        x_hat = self.student(z_t, t)
        if self.classifier is None:
            eps_hat = (z_t - a_t * x_hat) / s_t
            loss = torch.maximum(
                (x_hat - x_tilde).pow(2).mean((1, 2, 3)), (eps_hat - eps_tilde).pow(2).mean((1, 2, 3))
            ).mean()
        else:
            with torch.no_grad():
                _, f_t = self.classifier(x_tilde)
            logits, f_s = self.classifier(x_hat)
            l_feat = F.kl_div(F.log_softmax(f_s, 1), F.softmax(f_t / TAU, 1), reduction="batchmean")
            p = F.softmax(logits, 1)
            entropy = -(p * F.log_softmax(logits, 1)).sum(1).mean()
            pbar = p.mean(0)
            diversity = (pbar * pbar.log()).sum()
            loss = l_feat + BETA * (GAMMA * entropy + (1 - GAMMA) * diversity)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.student.parameters(), GRAD_CLIP)
        self.optimizer.step()
        return loss.detach()


# ------------------------------------------------------------------------------ measuring
FAST = ("c", "c_compiled")  # the kdiff fast-path variants
TARGETS = {"b/a": 1.02, "c/a": 0.55, "c_compiled/a": 0.55}  # step-time ratios (the CPU targets)
MEMORY_TARGET = 1.10  # step peak over student (+ classifier) forward and backward
CHANNELS_LAST = {"auto": "auto", "on": True, "off": False}  # --channels-last -> DistillationStep


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _cpu_tensor_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak of live CPU tensor storage during ``fn()`` over what was live before it, in bytes.

    From the allocation and free events that ``torch.profiler(profile_memory=True)`` records for
    torch's CPU allocator (tensors, and oneDNN buffers taken from it), in time order; None where
    the profiler does not expose them."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
        ]
    except AttributeError:
        return None
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> tuple[float | None, str]:
    """Peak memory of ``fn()`` over what was allocated before it, in MiB, and the method."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "torch.cuda.max_memory_allocated - allocated before"
    peak = _cpu_tensor_peak_bytes(fn)
    method = ("live CPU tensor storage: running sum of the allocation/free events of "
              "torch.profiler(profile_memory=True), peak over the start")
    return (None, "unavailable (the profiler exposes no memory events)") if peak is None else (peak / 2**20, method)


def _grad_of(model: nn.Module) -> Tensor:
    return model.conv_in.weight.grad.detach().float().clone()


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------ the run
def _machine(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": native_bf16("cpu"),
        "device": str(device),
    }
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    gpu_native_bf16=native_bf16(device))
    return info


def _ops_dispatch(device: torch.device) -> str:
    try:
        from kdiff.ops import resolve_impl
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        return f"kdiff.ops does not import ({type(err).__name__}); not used"
    impl = resolve_impl("auto", torch.zeros(2, 2, device=device), op="feature_kl_loss")
    return (f"b and c (eager): the distiller and the CFD loss run kdiff.ops' {impl} path (impl='auto'); "
            "c_compiled: the torch path, fused by Inductor")


def build(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Networks of the chosen sizes, with the same initial weights for every variant."""
    torch.manual_seed(args.seed)
    cfg = UNetConfig.tiny(ch=args.unet_ch, dropout=0.0) if args.unet == "tiny" else UNetConfig.paper(ch=args.unet_ch, dropout=0.0)
    teacher = UNet(cfg).to(device).eval().requires_grad_(False)
    # A trained teacher's last layer is not zero: give both networks random weights throughout.
    with torch.no_grad():
        for p in teacher.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.02)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    classifier = (ResNet18() if args.classifier == "resnet18" else SmallCNN()).to(device)
    classifier.eval().requires_grad_(False)
    return {"config": cfg, "teacher": teacher, "student": student, "classifier": classifier}


class Variant:
    """One way of running the step: ``step(x, t, eps) -> loss`` and ``reference(x, t, eps)``, the
    student's (and for CFD the classifier's on ``x_hat``) forward and backward alone."""

    def __init__(self, step: Callable[[Tensor, Tensor, Tensor], Tensor], student: nn.Module,
                 classifier: nn.Module | None, schedule: DiscreteSchedule,
                 amp_dtype: torch.dtype | None, channels_last: bool) -> None:
        self.step, self.student, self.classifier = step, student, classifier
        self.schedule, self.amp_dtype, self.channels_last = schedule, amp_dtype, channels_last

    def reference(self, x: Tensor, t: Tensor, eps: Tensor) -> None:
        a_t, s_t = self.schedule.alpha_sigma(t, dtype=x.dtype)
        z_t = a_t.view(-1, 1, 1, 1) * x + s_t.view(-1, 1, 1, 1) * eps
        if self.channels_last:
            z_t = z_t.contiguous(memory_format=torch.channels_last)
        self.student.zero_grad(set_to_none=True)
        amp = (contextlib.nullcontext() if self.amp_dtype is None
               else torch.autocast(x.device.type, dtype=self.amp_dtype))
        with amp:
            x_hat = self.student(z_t, t)
            if self.classifier is None:
                loss = x_hat.float().square().mean()
            else:
                logits, feats = self.classifier(x_hat)
                loss = logits.float().logsumexp(1).mean() + feats.float().square().mean()
        loss.backward()


def make_variants(nets: dict[str, Any], kind: str, args: argparse.Namespace, device: torch.device) -> dict[str, Variant]:
    """The variants asked for, each with its own copies of the networks and its own optimizer."""
    out: dict[str, Variant] = {}
    schedule = DiscreteSchedule.cosine(T_BASE)
    for name in args.variants:
        teacher = copy.deepcopy(nets["teacher"])
        student = copy.deepcopy(nets["student"])
        classifier = copy.deepcopy(nets["classifier"]) if kind == "cfd" else None
        fast = name in FAST
        optimizer = torch.optim.Adam(student.parameters(), lr=LR, **({"fused": True} if fast and args.fused_adam else {}))
        if name == "a":
            paper = PaperStep(teacher, student, classifier, optimizer,
                              num_student_steps=args.student_steps, device=device)
            out[name] = Variant(paper, student, classifier, schedule, None, False)
            continue
        pd = ProgressiveDistiller(teacher, student, schedule, args.student_steps,
                                  teacher_prediction="x", student_prediction="x", weighting="truncated_snr")
        # The paper fed the raw [-1, 1] images to its classifier.
        cfd = None if classifier is None else CFDLoss(
            classifier, temperature=TAU, beta=BETA, gamma=GAMMA,
            transform=ClassifierTransform(output_range=(-1, 1), clamp=False),
        )
        channels_last = CHANNELS_LAST[args.channels_last] if fast else False
        step = DistillationStep(
            pd, cfd=cfd, optimizer=optimizer, grad_clip=GRAD_CLIP,
            autocast_dtype="auto" if fast else None, channels_last=channels_last,
            compile=name == "c_compiled",
            compile_options={"backend": args.compile_backend} if args.compile_backend != "inductor" else None,
        )
        out[name] = Variant(
            lambda x, t, eps, step=step: step(x, t=t, noise=eps).loss, student, classifier, schedule,
            step.resolved_autocast_dtype(device), step.resolved_channels_last(device),
        )
    return out


def _round_order(names: list[str], r: int) -> list[str]:
    """Round r runs the variants rotated by r, so none always follows the same one."""
    k = r % len(names)
    return names[k:] + names[:k]


def _sync_free(v: Variant, inputs: tuple[Tensor, Tensor, Tensor], device: torch.device) -> dict[str, Any]:
    """One step under torch.cuda.set_sync_debug_mode("error"): any host sync raises."""
    _sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        v.step(*inputs)
        return {"ok": True}
    except RuntimeError as err:
        return {"ok": False, "error": str(err)[:300]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
        _sync(device)


def run_kind(kind: str, nets: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    variants = make_variants(nets, kind, args, device)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    B, size = args.batch, nets["config"].image_size
    x = (torch.rand(B, 3, size, size, generator=g) * 2 - 1).to(device)
    k = torch.randint(1, args.student_steps + 1, (B,), generator=g)
    t = (k * (T_BASE // args.student_steps)).float().to(device)
    eps = torch.randn(B, 3, size, size, generator=g).to(device)
    result: dict[str, Any] = {"variants": {}, "agreement": {}}
    on_cpu = device.type == "cpu"

    # 1. One step of each from the same weights: agreement with (a), and the compile time.
    first: dict[str, float] = {}
    ref_loss = ref_grad = None
    for name, v in variants.items():
        _sync(device)
        start = time.perf_counter()
        loss = v.step(x, t, eps)
        _sync(device)
        first[name] = time.perf_counter() - start
        if name == "a":
            ref_loss, ref_grad = loss.float(), _grad_of(v.student)
        elif ref_loss is not None:
            dtype = "bfloat16" if v.amp_dtype is not None else "float32"
            err = {"loss": float((loss.float() - ref_loss).abs() / ref_loss.abs().clamp_min(1e-30)),
                   "grad": _rel(_grad_of(v.student), ref_grad)}
            tol = TOL[dtype][kind]
            ok = all(err[q] <= tol[q] for q in err)
            result["agreement"][f"{name}_vs_a"] = {"dtype": dtype, "rel_error": err, "tolerance": tol, "ok": ok}
            if not ok:  # timed anyway (the run is not repeated cheaply), but the exit status fails
                print(f"error: {kind}: variant {name} disagrees with the paper-style step: {err} > {tol}", flush=True)
        print(f"{kind} {name}: first step {first[name]:.2f} s, loss {float(loss):.6g}", flush=True)

    # 2. Warm-up, then rounds in rotated order.
    names = list(variants)
    for r in range(args.warmup):
        for name in _round_order(names, r):
            variants[name].step(x, t, eps)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.repeats):
        for name in _round_order(names, r):
            _sync(device)
            c0, w0 = time.process_time(), time.perf_counter()
            variants[name].step(x, t, eps)
            _sync(device)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    for name in names:
        samples = wall[name]
        median = statistics.median(samples)
        row: dict[str, Any] = {
            "median_s": round(median, 5),
            "p25_s": round(_percentile(samples, 0.25), 5),
            "p75_s": round(_percentile(samples, 0.75), 5),
            "min_s": round(min(samples), 5),
            "max_s": round(max(samples), 5),
            "images_per_s": round(B / median, 2),
            "first_step_s": round(first[name], 3),
            "samples_s": [round(s, 5) for s in samples],
        }
        if on_cpu:
            row["cpu_median_s"] = round(statistics.median(cpu[name]), 5)
        result["variants"][name] = row
        print(f"{kind} {name}: median {median:.4f} s ({B / median:.1f} img/s)"
              + (f", CPU time {row['cpu_median_s']:.4f} s" if on_cpu else ""), flush=True)
    if "c_compiled" in variants:
        result["compile_s"] = round(first["c_compiled"] - result["variants"]["c_compiled"]["median_s"], 2)
    if "a" in variants:
        others = [n for n in names if n != "a"]
        base = result["variants"]["a"]["median_s"]
        result["ratios"] = {f"{n}/a": round(result["variants"][n]["median_s"] / base, 4) for n in others}
        # Within a round the variants run back to back, so the median of per-round ratios is
        # less sensitive than the ratio of medians to a load that drifts during the run.
        result["paired_ratios"] = {
            f"{n}/a": round(statistics.median(b / a for b, a in zip(wall[n], wall["a"], strict=True)), 4) for n in others
        }
        if on_cpu:
            cpu_base = result["variants"]["a"]["cpu_median_s"]
            result["cpu_time_ratios"] = {f"{n}/a": round(result["variants"][n]["cpu_median_s"] / cpu_base, 4) for n in others}
    result["_run"] = {"variants": variants, "inputs": (x, t, eps)}
    return result


def measure_memory(kind: str, res: dict[str, Any], run: dict[str, Any], device: torch.device) -> None:
    """Peak memory of one step and of its reference per variant, after the timings."""
    variants: dict[str, Variant] = run["variants"]
    x, t, eps = run["inputs"]
    for name, v in variants.items():
        # Both start without gradients (the step sets them to None first anyway): memory freed
        # during a call but allocated before it is invisible to the profiler.
        v.student.zero_grad(set_to_none=True)
        step_mib, method = peak_memory_mib(lambda v=v: v.step(x, t, eps), device)
        v.student.zero_grad(set_to_none=True)
        ref_mib, _ = peak_memory_mib(lambda v=v: v.reference(x, t, eps), device)
        row = res["variants"][name]
        row["peak_memory_mib"] = None if step_mib is None else round(step_mib, 2)
        row["reference_memory_mib"] = None if ref_mib is None else round(ref_mib, 2)
        if step_mib is not None and ref_mib:
            row["memory_over_reference"] = round(step_mib / ref_mib, 4)
        res["memory_method"] = method
        print(f"{kind} {name}: peak memory of a step {row['peak_memory_mib']} MiB, "
              f"reference {row['reference_memory_mib']} MiB", flush=True)


def targets(res: dict[str, Any]) -> dict[str, Any]:
    """Which ratio meets which target (time: b/a <= 1.02, c/a <= 0.55; memory: <= 1.10)."""
    out: dict[str, Any] = {}
    for ratio, limit in TARGETS.items():
        got = {stat: res[stat][ratio] <= limit for stat in ("ratios", "paired_ratios", "cpu_time_ratios")
               if ratio in res.get(stat, {})}
        if got:
            out[f"{ratio} <= {limit}"] = got
    mem = {n: v["memory_over_reference"] <= MEMORY_TARGET for n, v in res["variants"].items() if "memory_over_reference" in v}
    if mem:
        out[f"memory_over_reference <= {MEMORY_TARGET}"] = mem
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="CPU sizes: the tiny UNet (ch 32), ResNet-18, batch 32, 7 timed rounds")
    parser.add_argument("--unet", choices=["tiny", "paper"], default=None, help="UNet config (default paper; tiny with --quick)")
    parser.add_argument("--unet-ch", type=int, default=None, help="base width (default 128 paper, 32 tiny)")
    parser.add_argument("--classifier", choices=["resnet18", "smallcnn"], default="resnet18")
    parser.add_argument("--batch", type=int, default=None, help="default 128 (32 with --quick)")
    parser.add_argument("--student-steps", type=int, default=4, help="N (the teacher takes 2N)")
    parser.add_argument("--kinds", nargs="+", choices=["pd", "cfd"], default=["pd", "cfd"])
    parser.add_argument("--variants", nargs="+", choices=["a", "b", *FAST], default=None,
                        help="default all (without c_compiled under --no-compile)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20; 7 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds after the first step (default 3; 1 with --quick)")
    parser.add_argument("--no-compile", action="store_true", help="leave out c_compiled")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of c_compiled (aot_eager: a quick check of the pipeline)")
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                        help="c's memory format (auto: DistillationStep's default, on for CUDA only)")
    parser.add_argument("--no-fused-adam", dest="fused_adam", action="store_false", help="c with the default Adam")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory measurement")
    parser.add_argument("--warm-cache", action="store_true", help="keep Inductor's usual cache (compile time of a repeat run)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=lambda v: Path(v) if v else None, default=Path("benchmarks/results/step.json"),
                        help="JSON path ('' for none)")
    args = parser.parse_args(argv)
    if args.unet is None:
        args.unet = "tiny" if args.quick else "paper"
    if args.unet_ch is None:
        args.unet_ch = 32 if args.unet == "tiny" else 128
    if args.batch is None:
        args.batch = 32 if args.quick else 128
    if args.repeats is None:
        args.repeats = 7 if args.quick else 20
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.variants is None:
        args.variants = ["a", "b", "c"] + ([] if args.no_compile else ["c_compiled"])
    elif args.no_compile and "c_compiled" in args.variants:
        parser.error("--no-compile and --variants c_compiled contradict each other")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.warm_cache and "c_compiled" in args.variants and args.compile_backend == "inductor":
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_step_inductor_")
    nets = build(args, device)
    fast_dtype = resolve_autocast_dtype("auto", device)
    fast_cl = resolve_channels_last(CHANNELS_LAST[args.channels_last], device)
    fast = (f"DistillationStep: autocast {'bfloat16' if fast_dtype else 'off (no native bf16)'}, "
            f"channels_last {'on' if fast_cl else 'off'}, Adam {'fused' if args.fused_adam else 'default'}")
    result: dict[str, Any] = {
        "benchmark": "bench_step",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": _machine(device),
        "sizes": {
            "unet": args.unet,
            "unet_config": nets["config"].to_dict(),
            "unet_parameters": nets["student"].num_parameters(),
            "classifier": args.classifier,
            "classifier_parameters": sum(p.numel() for p in nets["classifier"].parameters()),
            "batch": args.batch,
            "image": [3, nets["config"].image_size, nets["config"].image_size],
            "student_steps": args.student_steps,
            "schedule": f"discrete cosine, T = {T_BASE}",
        },
        "settings": {"optimizer": f"Adam lr {LR}", "grad_clip": GRAD_CLIP, "tau": TAU, "beta": BETA, "gamma": GAMMA,
                     "repeats": args.repeats, "warmup": args.warmup,
                     "order": "rounds of " + ", ".join(args.variants) + ", rotated by one each round"},
        "variants": {
            "a": "paper-style: float32 eager, plain torch ops, default Adam",
            "b": "kdiff DistillationStep: float32 eager, default Adam",
            "c": f"kdiff {fast}; eager",
            "c_compiled": (f"kdiff {fast}; torch.compile (backend {args.compile_backend}, fullgraph"
                           + (", Inductor layout_optimization off" if device.type == "cpu" and not fast_cl
                              and args.compile_backend == "inductor" else "") + ")"),
        },
        "fused_ops": _ops_dispatch(device),
        "targets_note": (f"step time b/a <= {TARGETS['b/a']}, c/a <= {TARGETS['c/a']} (CPU targets); "
                         f"step peak memory <= {MEMORY_TARGET} x student (+ classifier) forward/backward"),
        "results": {},
    }
    result["variants"] = {k: v for k, v in result["variants"].items() if k in args.variants}
    runs: dict[str, dict[str, Any]] = {}
    for kind in args.kinds:
        res = run_kind(kind, nets, args, device)
        runs[kind] = res.pop("_run")
        result["results"][kind] = res
        res["targets"] = targets(res)
        _write(result, args.out)
    failed = [f"{kind} {pair}: {a['rel_error']} > {a['tolerance']}" for kind, res in result["results"].items()
              for pair, a in res["agreement"].items() if not a["ok"]]
    for kind, res in result["results"].items():
        variants, inputs = runs[kind]["variants"], runs[kind]["inputs"]
        if args.memory:
            measure_memory(kind, res, runs[kind], device)
            res["targets"] = targets(res)
        if device.type == "cuda":
            res["sync_free"] = {n: _sync_free(v, inputs, device) for n, v in variants.items() if n != "a"}
            failed += [f"{kind} {n}: a host sync under sync-debug 'error'" for n, r in res["sync_free"].items()
                       if not r["ok"]]
        _write(result, args.out)
    if failed:
        raise SystemExit("checks failed (results written): " + "; ".join(failed))
    return result


def _write(result: dict[str, Any], out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    for kind, res in result["results"].items():
        print(kind, {n: v["median_s"] for n, v in res["variants"].items()}, res.get("ratios"),
              res.get("cpu_time_ratios", ""), flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
