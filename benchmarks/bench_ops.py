"""Time kdiff's loss and step maths, eager vs ``torch.compile``, and write the results as JSON.

    python benchmarks/bench_ops.py --device cpu --out benchmarks/results/ops_cpu.json

Each row: op, mode (eager/compiled), shape, forward ms and forward+backward ms (median of
``--repeats`` runs after warm-up), the device name and the torch version. The eager numbers are
the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kdiff import DDIMStep, DiscreteSchedule
from kdiff.functional import dataset_oriented_loss, feature_kl_loss, pd_loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128, help="batch size B (the paper's: 128)")
    parser.add_argument("--features", type=int, default=512, help="feature dim D (ResNet-18: 512)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ops.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    B, D = args.batch, args.features
    f_s = torch.randn(B, D, device=device, generator=g, requires_grad=True)
    f_t = torch.randn(B, D, device=device, generator=g)
    logits = torch.randn(B, 10, device=device, generator=g, requires_grad=True)
    x_hat = torch.randn(B, 3, 32, 32, device=device, generator=g, requires_grad=True)
    x_tilde = torch.randn(B, 3, 32, 32, device=device, generator=g)
    schedule = DiscreteSchedule.cosine(1024)
    t = torch.full((B,), 512.0, device=device)
    alpha, sigma = schedule.alpha_sigma(t, dtype=torch.float32)
    step = DDIMStep(schedule, prediction_type="x", clip_x=True)
    z = torch.randn(B, 3, 32, 32, device=device, generator=g)

    ops: dict[str, tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...], str]] = {
        "feature_kl_loss": (lambda a, b: feature_kl_loss(a, b, temperature=0.95), (f_s, f_t), f"[{B},{D}]"),
        "dataset_oriented_loss": (lambda a: dataset_oriented_loss(a, gamma=0.75)[0], (logits,), f"[{B},10]"),
        "pd_loss_truncated_snr": (lambda a, b: pd_loss(a, b, alpha, sigma), (x_hat, x_tilde), f"[{B},3,32,32]"),
        "ddim_step": (lambda a, b: step(a, b, t, t - 128).prev_sample.sum(), (x_hat, z), f"[{B},3,32,32]"),
    }
    rows = []
    for name, (fn, inputs, shape) in ops.items():
        for mode in ("eager", "compiled"):
            f = torch.compile(fn, fullgraph=True) if mode == "compiled" else fn

            def forward(f=f, inputs=inputs):
                with torch.no_grad():
                    return f(*inputs)

            def full(f=f, inputs=inputs):
                out = f(*inputs)
                out.backward()
                return out

            rows.append(
                {
                    "op": name,
                    "mode": mode,
                    "shape": shape,
                    "forward_ms": round(_time(forward, device, args.repeats), 4),
                    "forward_backward_ms": round(_time(full, device, args.repeats), 4),
                }
            )
            print(rows[-1])
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    result = {"command": "python " + " ".join(sys.argv), "device": str(device), "machine": machine, "torch": torch.__version__, "repeats": args.repeats, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
