"""Time one whole PD step and one whole CFD step three ways, with the reference UNet.

    python benchmarks/bench_step.py --quick --device cpu --out benchmarks/results/step_cpu.json
    python benchmarks/bench_step.py --device cuda --out benchmarks/results/step_<gpu>.json

A step is the teacher's two DDIM half-steps (no gradient), the student's forward and backward,
for CFD the frozen classifier on both images (``x_tilde`` without gradient, ``x_hat`` with), the
loss, gradient clipping (norm 1) and an Adam update. Three variants of the same step:

* ``a`` (paper-style): float32, eager, written out as the paper's code does it, from
  docs/method.md: the discrete cosine table, the teacher half-steps under ``torch.no_grad``,
  ``x_tilde``, the truncated-SNR loss (PD) or
  ``F.kl_div(F.log_softmax(f_S), F.softmax(f_T / tau))`` + ``beta (gamma H + (1 - gamma) Dv)``
  (CFD) with plain torch ops;
* ``b`` (kdiff eager): :class:`kdiff.train_step.DistillationStep` in float32, no compile;
* ``c`` (kdiff fast): the same with ``autocast_dtype="auto"`` (bf16 where the device computes
  it natively), ``channels_last`` (``--channels-last auto``: on CUDA only; in eager bf16 it
  slowed the CFD step on an AVX512-BF16 CPU) and ``compile=True`` (Inductor;
  ``--no-compile`` leaves it out). :mod:`kdiff.ops` is not part of the step (the CFD and PD losses run through
  :mod:`kdiff.functional`, which Inductor fuses under ``torch.compile``); the JSON records what
  ``kdiff.ops`` would dispatch to.

All three start from the same weights and see the same batch, times and noise. Before timing,
one step of each is compared with ``a``: ``b`` must agree to float32 rounding and ``c`` to
bfloat16's (loss and the clipped gradient of the student's first convolution); the run stops if
not. Steps are then timed alternately (a, b, c, a, b, c, ...), each variant updating its own
student, and the JSON gets the median and spread per variant, images/s, the ratios b/a and c/a,
the compile time of ``c`` (its first call minus a steady step), and the peak memory of one
step over what was resident before it, measured after all timings: ``torch.cuda.max_memory_allocated``
on CUDA; on CPU the peak resident set size (Linux ``/proc/self/status`` VmHWM after resetting it
through ``/proc/self/clear_refs``), with glibc told to return freed tensors to the OS at once
(``mallopt``) so the resident set follows the live tensors: an approximate figure. Besides the
ratio of medians, ``paired_ratios`` is the median of per-round ratios, which a load that drifts
during the run (a shared machine) disturbs less.

Inductor's cache goes to a fresh temporary folder unless ``--warm-cache``, so the compile time
is that of a first run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
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
from kdiff.train_step import DistillationStep, native_bf16, resolve_autocast_dtype

T_BASE = 1024  # the paper's discrete cosine table
TAU, BETA, GAMMA = 0.95, 0.003, 0.75  # the paper's ResNet-18 setting
LR, GRAD_CLIP = 5e-5, 1.0  # a PD/CFD round (docs/method.md §4)
# Agreement with the paper-style step: relative error of the loss, and of the gradient (norm of
# the difference over the norm). float32: rounding of a different but equivalent formula; bf16:
# 8 mantissa bits through a few dozen layers.
TOL = {"float32": {"loss": 1e-4, "grad": 1e-3}, "bfloat16": {"loss": 5e-2, "grad": 0.15}}


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
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _rss_kib() -> tuple[int, int] | None:
    """``(VmRSS, VmHWM)`` in KiB from /proc/self/status, or None where it does not exist."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    rss, hwm = re.search(r"VmRSS:\s+(\d+)", text), re.search(r"VmHWM:\s+(\d+)", text)
    return (int(rss.group(1)), int(hwm.group(1))) if rss and hwm else None


def _set_glibc_malloc(mmap_threshold: int, trim_threshold: int) -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` (False where that is not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(libc.mallopt(m_trim_threshold, trim_threshold))
    except (OSError, AttributeError):
        return False


def _return_freed_memory_to_the_os() -> bool:
    """Serve allocations of 64 KiB and more by mmap, freed back to the OS at once, so the resident
    set follows the live tensors. Slows allocation: only for the memory phase."""
    return _set_glibc_malloc(64 * 1024, 0)


def _restore_malloc_defaults() -> None:
    _set_glibc_malloc(128 * 1024, 128 * 1024)  # glibc's initial values


def peak_memory_mib(step: Callable[[], object], device: torch.device) -> tuple[float | None, str]:
    """Peak memory of one ``step()`` over what was resident before it, in MiB, and the method."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "torch.cuda.max_memory_allocated"
    mmapped = _return_freed_memory_to_the_os()
    step()  # allocations of the measured step then take fresh mmaps, not cached heap memory
    try:  # Linux: writing 5 resets the peak resident set size (VmHWM) to the current one
        Path("/proc/self/clear_refs").write_text("5")
        before = _rss_kib()
    except OSError:
        before = None
    if before is None:
        return None, "unavailable (no writable /proc/self/clear_refs)"
    step()
    after = _rss_kib()
    assert after is not None
    method = "peak RSS (VmHWM after clear_refs) - RSS before; approximate"
    if mmapped:
        method += "; glibc mmap threshold 64 KiB, so freed tensors leave the RSS"
    else:
        method += "; the allocator may reuse freed memory, so this can undercount"
    return (after[1] - before[0]) / 1024, method


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
    return (f"not used by the step; kdiff.ops impl='auto' would take the {impl} path eagerly and "
            "the torch path under torch.compile")


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


def make_variants(nets: dict[str, Any], kind: str, args: argparse.Namespace,
                  device: torch.device) -> dict[str, tuple[Callable[..., Tensor], nn.Module]]:
    """``{name: (step(x, t, eps) -> loss, student)}`` for the variants asked for."""
    out: dict[str, tuple[Callable[..., Tensor], nn.Module]] = {}
    schedule = DiscreteSchedule.cosine(T_BASE)
    for name in args.variants:
        teacher = copy.deepcopy(nets["teacher"])
        student = copy.deepcopy(nets["student"])
        classifier = copy.deepcopy(nets["classifier"]) if kind == "cfd" else None
        optimizer = torch.optim.Adam(student.parameters(), lr=LR)
        if name == "a":
            paper = PaperStep(teacher, student, classifier, optimizer,
                              num_student_steps=args.student_steps, device=device)
            out[name] = (paper, student)
            continue
        pd = ProgressiveDistiller(teacher, student, schedule, args.student_steps,
                                  teacher_prediction="x", student_prediction="x", weighting="truncated_snr")
        # The paper fed the raw [-1, 1] images to its classifier.
        cfd = None if classifier is None else CFDLoss(
            classifier, temperature=TAU, beta=BETA, gamma=GAMMA,
            transform=ClassifierTransform(output_range=(-1, 1), clamp=False),
        )
        fast = name == "c"
        step = DistillationStep(
            pd, cfd=cfd, optimizer=optimizer, grad_clip=GRAD_CLIP,
            autocast_dtype="auto" if fast else None, channels_last=fast and args.channels_last == "on",
            compile=fast and not args.no_compile,
        )
        out[name] = ((lambda x, t, eps, step=step: step(x, t=t, noise=eps).loss), student)
    return out


def run_kind(kind: str, nets: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    variants = make_variants(nets, kind, args, device)
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    B, size = args.batch, nets["config"].image_size
    x = (torch.rand(B, 3, size, size, generator=g) * 2 - 1).to(device)
    k = torch.randint(1, args.student_steps + 1, (B,), generator=g)
    t = (k * (T_BASE // args.student_steps)).float().to(device)
    eps = torch.randn(B, 3, size, size, generator=g).to(device)
    result: dict[str, Any] = {"variants": {}, "agreement": {}}

    # 1. One step of each from the same weights: agreement with (a), and (c)'s compile time.
    first: dict[str, float] = {}
    ref_loss = ref_grad = None
    for name, (step, student) in variants.items():
        _sync(device)
        start = time.perf_counter()
        loss = step(x, t, eps)
        _sync(device)
        first[name] = time.perf_counter() - start
        if name == "a":
            ref_loss, ref_grad = loss.float(), _grad_of(student)
        elif ref_loss is not None:
            dtype = "bfloat16" if name == "c" and resolve_autocast_dtype("auto", device) else "float32"
            err = {"loss": float((loss.float() - ref_loss).abs() / ref_loss.abs().clamp_min(1e-30)),
                   "grad": _rel(_grad_of(student), ref_grad)}
            ok = all(err[q] <= TOL[dtype][q] for q in err)
            result["agreement"][f"{name}_vs_a"] = {"dtype": dtype, "rel_error": err, "tolerance": TOL[dtype], "ok": ok}
            if not ok:
                raise AssertionError(f"{kind}: variant {name} disagrees with the paper-style step: {err} > {TOL[dtype]}")
        print(f"{kind} {name}: first step {first[name]:.2f} s, loss {float(loss):.6g}", flush=True)

    # 2. Warm-up, then alternate a, b, c, a, b, c, ...
    for _ in range(args.warmup):
        for step, _student in variants.values():
            step(x, t, eps)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, (step, _student) in variants.items():
            _sync(device)
            start = time.perf_counter()
            step(x, t, eps)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    for name in variants:
        samples = times[name]
        median = statistics.median(samples)
        result["variants"][name] = {
            "median_s": round(median, 5),
            "p25_s": round(_percentile(samples, 0.25), 5),
            "p75_s": round(_percentile(samples, 0.75), 5),
            "min_s": round(min(samples), 5),
            "max_s": round(max(samples), 5),
            "images_per_s": round(B / median, 2),
            "first_step_s": round(first[name], 3),
            "samples_s": [round(s, 5) for s in samples],
        }
        print(f"{kind} {name}: median {median:.4f} s ({B / median:.1f} img/s)", flush=True)
    if "c" in variants and not args.no_compile:
        result["compile_s"] = round(first["c"] - result["variants"]["c"]["median_s"], 2)
    if "a" in variants:
        base = result["variants"]["a"]["median_s"]
        result["ratios"] = {f"{n}/a": round(v["median_s"] / base, 4) for n, v in result["variants"].items() if n != "a"}
        # Within a round the variants run back to back, so the median of per-round ratios is
        # less sensitive than the ratio of medians to a load that drifts during the run.
        result["paired_ratios"] = {
            f"{n}/a": round(statistics.median(b / a for b, a in zip(times[n], times["a"], strict=True)), 4)
            for n in variants if n != "a"
        }
    result["_measure"] = {name: (lambda step=step: step(x, t, eps)) for name, (step, _s) in variants.items()}
    return result


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
    parser.add_argument("--variants", nargs="+", choices=["a", "b", "c"], default=["a", "b", "c"])
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20; 7 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds after the first step (default 3; 1 with --quick)")
    parser.add_argument("--no-compile", action="store_true", help="variant c without torch.compile")
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                        help="variant c's memory format (auto: on for CUDA, off for CPU)")
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
    if args.channels_last == "auto":
        args.channels_last = "on" if torch.device(args.device).type == "cuda" else "off"
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.warm_cache and "c" in args.variants and not args.no_compile:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_step_inductor_")
    nets = build(args, device)
    fast_dtype = resolve_autocast_dtype("auto", device)
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
                     "repeats": args.repeats, "warmup": args.warmup, "order": "alternating " + ", ".join(args.variants)},
        "variants": {
            "a": "paper-style: float32 eager, plain torch ops",
            "b": "kdiff DistillationStep: float32 eager",
            "c": (f"kdiff DistillationStep: autocast {'bfloat16' if fast_dtype else 'off (no native bf16)'}, "
                  f"channels_last {args.channels_last}, "
                  f"{'no compile' if args.no_compile else 'torch.compile (Inductor, fullgraph)'}"),
        },
        "fused_ops": _ops_dispatch(device),
        "compile": "off (--no-compile)" if args.no_compile else "variant c, Inductor; compile_s per kind",
        "results": {},
    }
    measure: dict[str, dict[str, Callable[[], object]]] = {}
    for kind in args.kinds:
        result["results"][kind] = run_kind(kind, nets, args, device)
        measure[kind] = result["results"][kind].pop("_measure")
        res = result["results"][kind]
        # The CPU targets: kdiff's eager step costs at most 2% over the paper-style one, the fast
        # path at most 0.55 of it (bf16 on a CPU with native bf16).
        result.setdefault("targets", {})[kind] = {
            f"{name} <= {limit}": {
                stat: res[stat][name] <= limit for stat in ("ratios", "paired_ratios") if name in res.get(stat, {})
            }
            for name, limit in (("b/a", 1.02), ("c/a", 0.55))
        }
        _write(result, args.out)
    # Memory last: on CPU it changes how glibc allocates, which would disturb the timings.
    try:
        for kind, steps in measure.items():
            for name, step in steps.items():
                mem, method = peak_memory_mib(step, device)
                result["results"][kind]["variants"][name]["peak_memory_mib"] = None if mem is None else round(mem, 1)
                result["memory_method"] = method
                print(f"{kind} {name}: peak memory of a step +{mem} MiB", flush=True)
    finally:
        if device.type != "cuda":
            _restore_malloc_defaults()
    _write(result, args.out)
    return result


def _write(result: dict[str, Any], out: Path | None) -> None:
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    for kind, res in result["results"].items():
        print(kind, {n: v["median_s"] for n, v in res["variants"].items()}, res.get("ratios"), flush=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
