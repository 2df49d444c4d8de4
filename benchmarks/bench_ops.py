"""Time kdiff's fused loss ops against the plain PyTorch composition and its torch.compile.

    python benchmarks/bench_ops.py --quick --device cpu --out benchmarks/results/ops_cpu.json
    python benchmarks/bench_ops.py --device cuda --out benchmarks/results/ops_<gpu>.json
    python benchmarks/bench_ops.py --device cuda --time-budget 60 ...   # stops starting rows after 60 s

For each op (the tempered feature KL, the dataset-oriented loss, the PD target chain + loss),
size and dtype, four variants:

* ``fused``: :mod:`kdiff.ops` with ``impl="triton"``. Triton needs CUDA: on CPU this column is
  the torch path (``impl="torch"``), and the JSON says so (``fused_impl``);
* ``reference``: :mod:`kdiff.functional` (what ``impl="torch"`` runs; CUDA only, since on CPU it
  is the ``fused`` column);
* ``plain``: the textbook composition, e.g. ``F.kl_div(F.log_softmax(s), F.softmax(t / tau))``,
  in the input dtype;
* ``compiled``: ``torch.compile`` of ``plain`` (batch dimension dynamic, so one compile per
  op, feature size and dtype).

and three modes: ``forward`` (no grad), ``backward`` (the backward of one forward, timed
alone) and ``both``. Each row has the median and spread (p25, p75, min) over ``--repeats``
timed runs after warm-up, the bytes the fused design must move (reads + writes of the [B, D]
tensors; the same figure for every variant, so the fraction is an effective bandwidth), and
that figure over the time as a fraction of the bandwidth of a large device copy measured in
the same run. Rows are written as they finish, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from kdiff import functional as ref
from kdiff import ops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(samples: list[float], q: float) -> float:
    s = sorted(samples)
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _measure(run: Callable[[], float], repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        run()
    samples = [run() for _ in range(repeats)]
    return {
        "median_ms": round(statistics.median(samples), 5),
        "p25_ms": round(_percentile(samples, 0.25), 5),
        "p75_ms": round(_percentile(samples, 0.75), 5),
        "min_ms": round(min(samples), 5),
    }


def _timer(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    def run() -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return (time.perf_counter() - start) * 1e3

    return run


def _backward_timer(forward: Callable[[], torch.Tensor], device: torch.device) -> Callable[[], float]:
    def run() -> float:
        loss = forward()
        _sync(device)
        start = time.perf_counter()
        loss.backward()
        _sync(device)
        return (time.perf_counter() - start) * 1e3

    return run


def measure_bandwidth(device: torch.device, mib: int, repeats: int) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written, over the median time)."""
    n = mib * 2**20 // 4
    src = torch.empty(n, device=device, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    stats = _measure(_timer(lambda: dst.copy_(src), device), repeats, 3)
    return 2 * src.numel() * 4 / (stats["median_ms"] * 1e-3) / 1e9


# ------------------------------------------------------------------------------ the ops
def _plain_feature_kl(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    return F.kl_div(F.log_softmax(s, -1), F.softmax(t / tau, -1), reduction="batchmean")


def _plain_dataset_oriented(x: torch.Tensor, gamma: float) -> torch.Tensor:
    p = F.softmax(x, -1)
    h = -(p * F.log_softmax(x, -1)).sum(-1).mean()
    pbar = p.mean(0)
    return gamma * h + (1 - gamma) * (pbar * pbar.log()).sum()


def _plain_pd(x_hat, z, out_t, out_t1, a_t, s_t, a_1, s_1, a_2, s_2):
    # x-prediction teacher with clipping, then pd_target and the truncated-SNR loss.
    c = [v.view(-1, 1, 1, 1) for v in (a_t, s_t, a_1, s_1, a_2, s_2)]
    a_t, s_t, a_1, s_1, a_2, s_2 = c
    with torch.no_grad():
        x1 = out_t.clamp(-1, 1)
        z1 = a_1 * x1 + s_1 * (z - a_t * x1) / s_t
        x2 = out_t1.clamp(-1, 1)
        z2 = a_2 * x2 + s_2 * (z1 - a_1 * x2) / s_1
        ratio = s_2 / s_t
        x_tilde = (z2 - ratio * z) / (a_2 - ratio * a_t)
    err = (x_hat.float() - x_tilde.float()).square().flatten(1).mean(1)
    return (err * (a_t / s_t).square().flatten().clamp_min(1.0)).mean()


def _cases(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """(op, shape label, bytes per mode, inputs builder, {variant: fn})."""
    size = torch.tensor([], dtype=dtype).element_size()
    fused = "triton" if device.type == "cuda" else "torch"
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, grad=False):
        x = torch.randn(*shape, device=device, generator=g).to(dtype)
        return x.requires_grad_(grad)

    for B in args.batch:
        for D in args.features:
            elems = B * D * size

            def kl_inputs(B=B, D=D):
                return rand(B, D, grad=True), rand(B, D)

            yield (
                "feature_kl_loss", f"[{B},{D}]",
                # forward: read f_S, f_T; backward: read saved grad, write grad; both: + the
                # gradient written during forward.
                {"forward": 2 * elems, "backward": 2 * elems, "both": 5 * elems},
                kl_inputs,
                {
                    "fused": lambda s, t: ops.feature_kl_loss(s, t, temperature=0.9, impl=fused),
                    "reference": lambda s, t: ref.feature_kl_loss(s, t, temperature=0.9),
                    "plain": lambda s, t: _plain_feature_kl(s, t, 0.9),
                },
            )
        for K in args.classes:
            elems = B * K * size
            yield (
                "dataset_oriented_loss", f"[{B},{K}]",
                {"forward": elems, "backward": 2 * elems, "both": 3 * elems},
                lambda B=B, K=K: (rand(B, K, grad=True),),
                {
                    "fused": lambda x: ops.dataset_oriented_loss(x, gamma=0.75, impl=fused)[0],
                    "reference": lambda x: ref.dataset_oriented_loss(x, gamma=0.75)[0],
                    "plain": lambda x: _plain_dataset_oriented(x, 0.75),
                },
            )
        shape = (B, *args.image)
        elems = math.prod(shape) * size

        def pd_inputs(shape=shape, B=B):
            a = torch.linspace(0.2, 0.95, B, device=device)
            a_1, a_2 = (a + 0.02).clamp_max(0.99), (a + 0.04).clamp_max(0.995)
            coeffs = [v for x in (a, a_1, a_2) for v in (x, (1 - x * x).sqrt())]
            return (rand(*shape, grad=True), rand(*shape), rand(*shape), rand(*shape), *coeffs)

        yield (
            "pd_target_loss", "[" + ",".join(map(str, shape)) + "]",
            # forward: read x_hat, z_t, both teacher outputs; write x_tilde, eps_tilde (+ grad).
            {"forward": 6 * elems, "backward": 2 * elems, "both": 9 * elems},
            pd_inputs,
            {
                "fused": lambda *a: ops.pd_target_loss(*a, clip_x=True, impl=fused).loss,
                "reference": lambda *a: ops.pd_target_loss(*a, clip_x=True, impl="torch").loss,
                "plain": _plain_pd,
            },
        )


def _compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    compiled = torch.compile(fn)

    def call(*inputs: torch.Tensor) -> torch.Tensor:
        for x in inputs:
            if x.ndim >= 1:
                torch._dynamo.maybe_mark_dynamic(x, 0)  # one compile for every batch size
        return compiled(*inputs)

    return call


def _run(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...], mode: str,
         device: torch.device, args: argparse.Namespace) -> dict[str, object]:
    def forward() -> torch.Tensor:
        inputs[0].grad = None
        return fn(*inputs)

    def forward_no_grad() -> torch.Tensor:
        with torch.no_grad():
            return fn(*inputs)

    if mode == "forward":
        runner = _timer(forward_no_grad, device)
    elif mode == "backward":
        runner = _backward_timer(forward, device)
    else:
        runner = _timer(lambda: forward().backward(), device)
    try:
        return _measure(runner, args.repeats, args.warmup)
    except Exception as err:  # noqa: BLE001 - record it in the row and go on
        return {"error": f"{type(err).__name__}: {err}"[:300]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes for a CPU: B 128, D 512, K 10, fp32 compiled only")
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--features", type=int, nargs="+", default=[512, 1920, 2048], help="D (ResNet-18 512, DenseNet-201 1920)")
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 1000], help="K for the dataset-oriented loss")
    parser.add_argument("--image", type=int, nargs=3, default=[3, 32, 32], help="per-sample shape for the PD op")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--modes", nargs="+", choices=["forward", "backward", "both"], default=["forward", "backward", "both"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--compile-dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="dtypes with a compiled variant (default: all of --dtypes; fp32 with --quick)")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--bandwidth-mib", type=int, default=None, help="copy size for the bandwidth figure (default 1024 on CUDA, 64 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (a shared machine: 1 steadies the figures)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ops.json"))
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: start no new row after this (the JSON records where it stopped)")
    args = parser.parse_args()
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.features, args.classes = [128], [512], [10]
        args.compile_dtypes = args.compile_dtypes or ["fp32"]
        args.repeats = min(args.repeats, 15)
        args.warmup = min(args.warmup, 3)
    compile_dtypes = set(args.compile_dtypes or args.dtypes)
    device = torch.device(args.device)
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    )
    mib = args.bandwidth_mib or (1024 if device.type == "cuda" else 64)
    bandwidth = measure_bandwidth(device, mib, 20)
    print(f"{machine}: copy bandwidth {bandwidth:.1f} GB/s")
    result = {
        "command": "python " + " ".join(sys.argv),
        "device": str(device),
        "device_name": machine,
        "machine": {"host": platform.node(), "platform": platform.platform(), "cpu_count": os.cpu_count()},
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "fused_impl": "triton" if device.type == "cuda" else "torch (Triton needs CUDA: on CPU the fused column is the torch path)",
        "bandwidth_gbps": round(bandwidth, 2),
        "bandwidth_copy_mib": mib,
        "bytes_note": "bytes the fused design moves (reads + writes of the large tensors), the same for every variant",
        "repeats": args.repeats,
        "sizes": {"batch": args.batch, "features": args.features, "classes": args.classes, "image": args.image},
        "rows": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    # Eager variants of every case first, then the compiled ones: compiling takes most of the
    # time, so a run cut short still has the fused-vs-plain comparison for every size.
    phases = [("fused", "reference", "plain")]
    if not args.no_compile:
        phases.append(("compiled",))
    for phase in phases:
        for dtype_name in args.dtypes:
            if phase == ("compiled",) and dtype_name not in compile_dtypes:
                continue
            for op, shape, nbytes, make_inputs, variants in _cases(args, device, DTYPES[dtype_name]):
                if device.type != "cuda":
                    del variants["reference"]  # the fused column is the torch path here
                variants["compiled"] = _compiled(variants["plain"])
                inputs = make_inputs()
                for variant in (v for v in phase if v in variants):
                    for mode in args.modes:
                        if args.time_budget is not None and time.monotonic() - started > args.time_budget:
                            result["stopped_early"] = (
                                f"time budget of {args.time_budget:g} s reached before {op} {variant} {mode} "
                                f"{dtype_name} {shape}; later rows were not run"
                            )
                            args.out.write_text(json.dumps(result, indent=2) + "\n")
                            print(result["stopped_early"])
                            print(f"wrote {args.out}")
                            return
                        row = {"op": op, "variant": variant, "mode": mode, "dtype": dtype_name, "shape": shape,
                               "bytes": nbytes[mode], **_run(variants[variant], inputs, mode, device, args)}
                        if "median_ms" in row:
                            gbps = nbytes[mode] / (row["median_ms"] * 1e-3) / 1e9
                            row["gbps"] = round(gbps, 2)
                            row["fraction_of_bandwidth"] = round(gbps / bandwidth, 4)
                        result["rows"].append(row)
                        print({k: row[k] for k in ("op", "variant", "mode", "dtype", "shape")},
                              row.get("median_ms", row.get("error")), flush=True)
                        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
