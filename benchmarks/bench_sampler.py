#!/usr/bin/env python
"""Per-step overhead of kdiff's DDIM sampler against diffusers' ``DDIMScheduler.step``.

The model costs (almost) nothing: it returns a stored ``eps`` tensor, so the time measured is the
sampler's own (schedule lookups, argument checks, the elementwise update). Both samplers run the
same setting: DDPM's linear 1000-step table, ``prediction_type="epsilon"``, trailing spacing,
``x_hat`` clipped to [-1, 1] with ``eps_hat`` recomputed from it (diffusers:
``clip_sample=True, use_clipped_model_output=True``), ``eta = 0``. Two comparisons:

* ``sample``: a whole ``N``-step run, ``kdiff.ddim_sample`` against the usual diffusers loop
  (``set_timesteps`` then ``N`` calls of ``step``); per step = time / ``N``.
* ``step``: one step, ``kdiff.DDIMStep`` against ``DDIMScheduler.step``.

Each configuration is timed in ``--rounds`` rounds; within a round the contenders run back to back
in alternating order, each for ``--calls`` calls, so load from other processes hits both alike.
The JSON holds per-call medians, quartiles and minima, and the ratio kdiff / diffusers of the
medians (below 1: kdiff is faster):

    python benchmarks/bench_sampler.py                          # -> benchmarks/results/sampler_cpu.json
    python benchmarks/bench_sampler.py --device cuda --out benchmarks/results/sampler_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
BATCHES = (1, 64)
STEPS = (1, 4, 50)
SHAPE = (3, 32, 32)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 28), "MALLOC_TRIM_THRESHOLD_": str(1 << 28)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` over ``calls`` calls."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / calls


def _stats(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median_us": 1e6 * statistics.median(values), "p25_us": 1e6 * q[0], "p75_us": 1e6 * q[2],
            "min_us": 1e6 * min(values)}


def contenders(batch: int, num_steps: int, device: torch.device) -> dict[str, dict[str, Callable[[], Any]]]:
    """``{"sample": {name: fn}, "step": {name: fn}}`` for one batch size and step count."""
    from diffusers import DDIMScheduler

    from kdiff import DDIMStep, DiscreteSchedule, ddim_sample

    g = torch.Generator(device=device).manual_seed(0)
    noise = torch.randn((batch, *SHAPE), generator=g, device=device)
    eps = torch.randn((batch, *SHAPE), generator=g, device=device)

    def model(z: torch.Tensor, t: Any) -> torch.Tensor:
        return eps

    schedule = DiscreteSchedule.linear(1000)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              prediction_type="epsilon", timestep_spacing="trailing", set_alpha_to_one=True,
                              steps_offset=0, clip_sample=True)

    def kdiff_sample() -> torch.Tensor:
        return ddim_sample(model, noise, num_steps, schedule=schedule, prediction_type="eps", clip_x=True)

    def diffusers_sample() -> torch.Tensor:
        scheduler.set_timesteps(num_steps, device=device)
        z = noise
        for t in scheduler.timesteps:
            z = scheduler.step(model(z, t), t, z, eta=0.0, use_clipped_model_output=True).prev_sample
        return z.clamp(-1.0, 1.0)  # kdiff's clip_output (DDIMPipeline clamps its output too)

    # One step from the top of the N-step grid: kdiff time T -> grid(N)[N-1], UNet timestep T-1.
    step = DDIMStep(schedule, prediction_type="eps", clip_x=True)
    grid = schedule.grid(num_steps, device=device).to(torch.float32)
    t, s = grid[-1].expand(batch), grid[-2].expand(batch)
    scheduler_1 = DDIMScheduler.from_config(scheduler.config)
    scheduler_1.set_timesteps(num_steps, device=device)
    timestep = scheduler_1.timesteps[0]

    def kdiff_step() -> torch.Tensor:
        return step(eps, noise, t, s).prev_sample

    def diffusers_step() -> torch.Tensor:
        return scheduler_1.step(eps, timestep, noise, eta=0.0, use_clipped_model_output=True).prev_sample

    # The two samplers must agree, or the timing compares different work.
    a, b = kdiff_sample(), diffusers_sample()
    if not torch.allclose(a, b, atol=1e-4):
        raise RuntimeError(f"kdiff and diffusers disagree at B={batch}, N={num_steps}: "
                           f"max |diff| {float((a - b).abs().max()):.3g}")
    if not torch.allclose(kdiff_step(), diffusers_step(), atol=1e-4):
        raise RuntimeError(f"one kdiff step and one diffusers step disagree at B={batch}, N={num_steps}")
    return {"sample": {"kdiff": kdiff_sample, "diffusers": diffusers_sample},
            "step": {"kdiff": kdiff_step, "diffusers": diffusers_step}}


def run(*, device: torch.device, rounds: int, target_s: float, progress: bool) -> list[dict[str, Any]]:
    rows = []
    for batch in BATCHES:
        for num_steps in STEPS:
            for kind, fns in contenders(batch, num_steps, device).items():
                # Calls per timing: enough for about target_s seconds per contender and round.
                for fn in fns.values():
                    fn()
                per_call = _time(fns["diffusers"], 3, device)
                calls = max(1, min(2000, round(target_s / max(per_call, 1e-7))))
                times: dict[str, list[float]] = {name: [] for name in fns}
                names = list(fns)
                for r in range(rounds):
                    for name in names if r % 2 == 0 else names[::-1]:
                        times[name].append(_time(fns[name], calls, device))
                n = num_steps if kind == "sample" else 1
                row = {"kind": kind, "batch": batch, "num_steps": num_steps, "calls_per_timing": calls,
                       "rounds": rounds}
                for name, values in times.items():
                    row[name] = _stats(values)
                    row[name]["per_step_median_us"] = row[name]["median_us"] / n
                row["ratio_kdiff_over_diffusers"] = row["kdiff"]["median_us"] / row["diffusers"]["median_us"]
                rows.append(row)
                if progress:
                    print(f"{kind:6s} B={batch:3d} N={num_steps:3d}: kdiff {row['kdiff']['per_step_median_us']:8.1f} "
                          f"us/step, diffusers {row['diffusers']['per_step_median_us']:8.1f} us/step, "
                          f"ratio {row['ratio_kdiff_over_diffusers']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least disturbed by other load).")
    p.add_argument("--rounds", type=int, default=15, help="Alternating timing rounds per configuration.")
    p.add_argument("--target-ms", type=float, default=40.0, help="Wall time per contender and round.")
    p.add_argument("--out", type=Path, default=HERE / "results" / "sampler_cpu.json")
    p.add_argument("--quick", action="store_true", help="3 rounds of ~5 ms (a smoke run).")
    p.add_argument("--no-malloc-tuning", action="store_true",
                   help="Keep glibc's default mmap/trim thresholds (noisier large-batch timings).")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.target_ms <= 0:
        p.error("--rounds must be >= 1 and --target-ms > 0")
    if args.quick:
        args.rounds, args.target_ms = 3, 5.0
    if argv is None and not args.no_malloc_tuning and sys.platform.startswith("linux") and any(
        os.environ.get(k) != v for k, v in MALLOC_ENV.items()
    ):
        # glibc maps and unmaps each 0.8 MB intermediate of a batch of 64 by default, and trims the
        # heap at random moments: page faults that swing a step's time 3x. Rerun with them off.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    import diffusers

    import kdiff

    t0 = time.perf_counter()
    rows = run(device=device, rounds=args.rounds, target_s=args.target_ms / 1e3, progress=True)
    result = {
        "benchmark": "DDIM sampler overhead with a model that returns a stored tensor",
        "setting": {"schedule": "DDPM linear betas 1e-4..0.02, T=1000", "prediction_type": "epsilon",
                    "spacing": "trailing", "clip_x": True, "eta": 0.0, "image": list(SHAPE),
                    "batches": list(BATCHES), "num_steps": list(STEPS)},
        "method": "per-call medians over alternating rounds; 'sample' is a whole N-step run "
                  "(per_step = median / N), 'step' one step from the top of the N-step grid",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                    "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV}},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "kdiff": kdiff.__version__,
                     "diffusers": diffusers.__version__},
        "command": "python " + " ".join([sys.argv[0] if argv is None else "benchmarks/bench_sampler.py",
                                         *(sys.argv[1:] if argv is None else argv)]),
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "rows": rows,
        "kdiff_not_slower": all(r["ratio_kdiff_over_diffusers"] <= 1.0 for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['wall_time_s']:.0f} s); kdiff not slower anywhere: {result['kdiff_not_slower']}")
    return result


if __name__ == "__main__":
    main()
