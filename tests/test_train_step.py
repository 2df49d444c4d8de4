"""The sync-free hot paths: DistillationStep (PD and CFD) and the ddim_sample loop.

* semantics: the step is the distiller + loss + backward + clipping + optimizer step written out;
* no host reads: the whole step and the sampler run on the ``meta`` device, where any
  ``.item()``, ``bool(tensor)`` or data-dependent branch raises;
* torch.compile: the step's forward and the sampler trace into one graph (no breaks) and the
  compiled step equals the eager one in float32;
* memory: nothing of the teacher side (teacher network, its half-steps, classifier on
  ``x_tilde``) is saved for backward;
* operations: the fp32 step runs the paper-style step's network operations exactly, and beyond
  them only the documented small extras (profiled op lists, not timings).
"""

from __future__ import annotations

import collections
import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from kdiff import CFDLoss, CosineSchedule, DiscreteSchedule, ProgressiveDistiller, ddim_sample
from kdiff.models import SmallCNN, UNet, UNetConfig
from kdiff.train_step import (
    DistillationStep,
    native_bf16,
    resolve_autocast_dtype,
    resolve_channels_last,
)

CFG = UNetConfig.tiny(ch=8, ch_mult=(1, 2), attn_resolutions=(8,))
SCHED = DiscreteSchedule.cosine(64)


def _nets(seed: int = 0, device: str | None = None):
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        teacher = UNet(CFG).eval().requires_grad_(False)
        # Non-zero output layers, so gradients reach every student weight.
        with torch.no_grad():
            for p in teacher.parameters():
                if p.ndim > 1 and device != "meta" and not p.any():
                    p.normal_(0, 0.05)
        student = copy.deepcopy(teacher).train().requires_grad_(True)
        clf = SmallCNN(width=8).eval()
    return teacher, student, clf


def _step(teacher, student, clf, *, cfd: bool, **kw) -> DistillationStep:
    pd = ProgressiveDistiller(teacher, student, SCHED, 4, teacher_prediction="x", student_prediction="x")
    loss = CFDLoss(clf, temperature=0.95, beta=0.003, gamma=0.75) if cfd else None
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    return DistillationStep(pd, cfd=loss, optimizer=opt, **{"autocast_dtype": None, **kw})


def _batch(seed: int = 1, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, 16, 16, generator=g) * 2 - 1
    k = torch.randint(1, 5, (batch,), generator=g)
    return x, (k * 16).float(), torch.randn(x.shape, generator=g)


def _grad_error(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Relative error of ``a``'s gradients (left in ``.grad`` by the step) against ``b``'s.

    Gradients, not updated weights: Adam's first update is about ``lr * sign(g)``, so rounding
    flips the update of near-zero gradients."""
    ga = torch.cat([p.grad.flatten() for p in a.parameters()])
    gb = torch.cat([p.grad.flatten() for p in b.parameters()])
    assert float(gb.norm()) > 0
    return float((ga - gb).norm() / gb.norm())


# ------------------------------------------------------------------------------ semantics
@pytest.mark.parametrize("cfd", [False, True], ids=["pd", "cfd"])
def test_step_is_forward_backward_clip_and_update(cfd):
    """One step equals the distiller, the loss, backward, clip_grad_norm_ and Adam written out."""
    nets = _nets()
    x, t, noise = _batch()
    step = _step(*copy.deepcopy(nets), cfd=cfd, grad_clip=1e-6)
    out = step(x, t=t, noise=noise)

    teacher, student, clf = copy.deepcopy(nets)
    pd = ProgressiveDistiller(teacher, student, SCHED, 4, teacher_prediction="x", student_prediction="x")
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    res = pd(x, t=t, noise=noise)
    if cfd:
        terms = CFDLoss(clf, temperature=0.95, beta=0.003, gamma=0.75)(res.x_pred, res.x_target)
        loss = terms.loss
        torch.testing.assert_close(out.feature_loss, terms.feature_loss.detach())
        torch.testing.assert_close(out.entropy, terms.entropy.detach())
        torch.testing.assert_close(out.diversity, terms.diversity.detach())
    else:
        loss = res.loss
        assert out.feature_loss is None and out.data_loss is None
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in student.parameters()]))
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1e-6)
    opt.step()

    torch.testing.assert_close(out.loss, loss.detach())
    torch.testing.assert_close(out.pd_loss, res.loss.detach())
    torch.testing.assert_close(out.grad_norm, norm)
    assert float(out.grad_norm) > 1e-6  # the clip was active
    assert not out.loss.requires_grad
    for a, b in zip(step.distiller.student.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_step_draws_times_then_noise_from_the_generator_and_drops_old_gradients():
    nets = _nets()
    x = _batch()[0]
    teacher, student, clf = copy.deepcopy(nets)
    student.conv_in.weight.grad = torch.full_like(student.conv_in.weight, 1e3)  # a stale gradient
    step = _step(teacher, student, clf, cfd=False)
    drawn = step(x, generator=torch.Generator().manual_seed(5))
    assert float(student.conv_in.weight.grad.abs().max()) < 1e3  # replaced, not accumulated
    ref_step = _step(*copy.deepcopy(nets), cfd=False)
    g = torch.Generator().manual_seed(5)
    t = ref_step.distiller.sample_times(x.shape[0], generator=g)
    noise = ref_step.distiller.sample_noise(x, generator=g)
    given = ref_step(x, t=t, noise=noise)
    torch.testing.assert_close(drawn.t, t)
    torch.testing.assert_close(drawn.loss, given.loss)


def test_bad_arguments_name_the_argument():
    teacher, student, clf = _nets()
    pd = ProgressiveDistiller(teacher, student, SCHED, 4, teacher_prediction="x", student_prediction="x")
    opt = torch.optim.Adam(student.parameters())
    with pytest.raises(TypeError, match="distiller must be"):
        DistillationStep(lambda x: x, optimizer=opt)
    with pytest.raises(TypeError, match="optimizer must be"):
        DistillationStep(pd, optimizer=student.parameters())
    with pytest.raises(TypeError, match="cfd must be"):
        DistillationStep(pd, optimizer=opt, cfd=clf)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="grad_clip must be"):
            DistillationStep(pd, optimizer=opt, grad_clip=bad)
    for bad in ("fp16", torch.float16, "bf16", 16):
        with pytest.raises(ValueError, match="autocast_dtype must be 'auto', 'bfloat16'"):
            DistillationStep(pd, optimizer=opt, autocast_dtype=bad)
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="channels_last must be True, False or 'auto'"):
            DistillationStep(pd, optimizer=opt, channels_last=bad)
    with pytest.raises(ValueError, match="compile must be True or False"):
        DistillationStep(pd, optimizer=opt, compile=1)
    step = DistillationStep(pd, optimizer=opt)
    x, t, noise = _batch()
    with pytest.raises(ValueError, match="generator is unused"):
        step(x, t=t, noise=noise, generator=torch.Generator())
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        step(x.long())
    with pytest.raises(ValueError, match="t must lie on the student's grid"):
        step(x, t=t - 1)


# ------------------------------------------------------------------------ precision, layout
def test_autocast_dtype_resolution():
    assert resolve_autocast_dtype("bfloat16", "cpu") is torch.bfloat16
    assert resolve_autocast_dtype(torch.bfloat16, "meta") is torch.bfloat16
    for off in (None, "float32", torch.float32):
        assert resolve_autocast_dtype(off, "cpu") is None
    assert resolve_autocast_dtype("auto", "meta") is None  # no native bf16 there
    assert resolve_autocast_dtype("auto", "cpu") is (torch.bfloat16 if native_bf16("cpu") else None)
    if sys.platform.startswith("linux") and Path("/proc/cpuinfo").is_file():
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        if flags:
            assert native_bf16("cpu") == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_bf16_autocast_runs_the_networks_in_bf16_and_the_loss_in_fp32():
    nets = _nets()
    x, t, noise = _batch()
    seen = []
    teacher, student, clf = copy.deepcopy(nets)
    student.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out = _step(teacher, student, clf, cfd=True, autocast_dtype="bfloat16")(x, t=t, noise=noise)
    ref = _step(*copy.deepcopy(nets), cfd=True)(x, t=t, noise=noise)
    assert seen == [torch.bfloat16]
    assert out.loss.dtype == torch.float32 and out.feature_loss.dtype == torch.float32
    assert student.conv_in.weight.dtype == torch.float32  # master weights stay float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=5e-2, atol=1e-5)
    assert not torch.equal(out.loss, ref.loss)  # it did run in lower precision


def test_channels_last_auto_is_on_for_cuda_only():
    assert resolve_channels_last("auto", "cuda") is True
    for device in ("cpu", "meta"):
        assert resolve_channels_last("auto", device) is False
    assert resolve_channels_last(True, "cpu") is True and resolve_channels_last(False, "cuda") is False
    # The default on CPU leaves the networks and the input in their layout.
    teacher, student, clf = _nets()
    step = _step(teacher, student, clf, cfd=True)
    assert step.channels_last == "auto" and not step.resolved_channels_last("cpu")
    x, t, noise = _batch()
    seen = []
    student.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    step(x, t=t, noise=noise)
    assert seen == [True]
    assert all(p.is_contiguous() for net in (teacher, student, clf) for p in net.parameters())


def test_compile_keeps_the_step_layout_on_cpu(monkeypatch):
    """On CPU without channels_last, compile=True turns Inductor's switch to channels_last off,
    unless the options are the caller's."""
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    x, t, noise = _batch()
    for compile_options, options in [
        (None, {"layout_optimization": False}),
        ({"mode": "max-autotune"}, None),
        ({"options": {"max_autotune": True}}, {"max_autotune": True}),
        ({"backend": "aot_eager"}, None),
    ]:
        step = _step(*_nets(), cfd=False, compile=True, compile_options=compile_options)
        step(x, t=t, noise=noise)
        step(x, t=t, noise=noise)  # compiled once, at the first call
        assert calls.pop().get("options") == options and not calls
    step = _step(*_nets(), cfd=False, compile=True, channels_last=True)
    step(x, t=t, noise=noise)
    assert "options" not in calls.pop()


def test_channels_last_converts_the_networks_and_gives_the_same_step():
    nets = _nets()
    x, t, noise = _batch()
    teacher, student, clf = copy.deepcopy(nets)
    step = _step(teacher, student, clf, cfd=True, channels_last=True)
    for net in (teacher, student, clf):
        assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last) if hasattr(net, "conv_in") else any(
            p.ndim == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            for p in net.parameters()
        )
    out = step(x, t=t, noise=noise)
    ref_step = _step(*copy.deepcopy(nets), cfd=True)
    ref = ref_step(x, t=t, noise=noise)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert _grad_error(student, ref_step.distiller.student) < 1e-4


# ------------------------------------------------------------------------- no host reads
def test_meta_tensors_refuse_host_reads():
    """The premise of the meta-device tests below."""
    v = torch.ones((), device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        v.item()
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool(v > 0)


@pytest.mark.parametrize("cfd", [False, True], ids=["pd", "cfd"])
def test_step_reads_no_tensor_value_on_the_host(cfd):
    """The whole step (draws, teacher, student, classifier, loss, backward, clip, Adam) runs on
    the meta device, which has no values: any host read or value branch would raise."""
    teacher, student, clf = _nets(device="meta")
    step = _step(teacher, student, clf, cfd=cfd, grad_clip=1.0, autocast_dtype="auto")
    out = step(torch.empty(4, 3, 16, 16, device="meta"))
    assert out.loss.device.type == "meta" and out.grad_norm.device.type == "meta"
    assert all(p.grad is not None for p in student.parameters())


def test_ddim_sample_reads_no_tensor_value_on_the_host():
    with torch.device("meta"):
        net = UNet(CFG).eval()
        noise = torch.empty(2, 3, 16, 16)
    for sched in (SCHED, CosineSchedule()):
        out = ddim_sample(lambda z, t: net(z, t), noise, 4, schedule=sched, prediction_type="v")
        assert out.shape == noise.shape and out.device.type == "meta"


# ------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("autocast_dtype", [None, "bfloat16"], ids=["fp32", "bf16"])
def test_teacher_side_saves_nothing_for_backward(autocast_dtype):
    """Count tensors saved for backward (saved_tensors_hooks) per phase of a CFD step: from the
    teacher's first call up to the student's call (both half-steps, x_tilde) and during the
    classifier's pass on x_tilde none are saved; the student's and the classifier's pass on
    x_hat save some (the count works). Everything the teacher side produces has no gradient."""
    teacher, student, clf = _nets()
    # Trainable-looking teacher and classifier: only the step's no_grad keeps their graphs away.
    teacher.requires_grad_(True)
    clf.requires_grad_(True)
    step = _step(teacher, student, clf, cfd=True, autocast_dtype=autocast_dtype)
    phase = ["draws"]
    packs: collections.Counter[str] = collections.Counter()
    calls: list[str] = []
    teacher_side: list[torch.Tensor] = []

    def enter(name):
        def hook(module, args):
            if name == "classifier":
                name_ = "classifier_on_x_hat" if args[0].requires_grad else "classifier_on_x_tilde"
                if not args[0].requires_grad:
                    teacher_side.append(args[0])
            else:
                name_ = name
            phase[0] = name_
            calls.append(name_)

        return hook

    def leave(module, args, output):
        if phase[0] == "teacher":
            teacher_side.append(output)
        elif phase[0] == "classifier_on_x_tilde":
            teacher_side.extend(output)
        if phase[0].startswith("classifier"):
            phase[0] = "loss"

    for name, net in (("teacher", teacher), ("student", student), ("classifier", clf)):
        net.register_forward_pre_hook(enter(name))
        net.register_forward_hook(leave)

    def pack(tensor):
        packs[phase[0]] += 1
        return tensor

    x, t, noise = _batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(x, t=t, noise=noise)
    assert calls == ["teacher", "teacher", "student", "classifier_on_x_tilde", "classifier_on_x_hat"]
    assert packs["teacher"] == 0, "the teacher's half-steps saved tensors for backward"
    assert packs["classifier_on_x_tilde"] == 0, "the classifier's pass on x_tilde saved tensors for backward"
    assert packs["student"] > 10 and packs["classifier_on_x_hat"] > 5
    assert len(teacher_side) == 5  # two teacher outputs, x_tilde, the classifier's logits and f_T
    assert all(not v.requires_grad and v.grad_fn is None for v in teacher_side)


# ------------------------------------------------------------------------------ operations
def _bench_step():
    """benchmarks/bench_step.py as a module (its paper-style step is the reference here)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"
    spec = importlib.util.spec_from_file_location("bench_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_step", module)
    spec.loader.exec_module(module)
    return module


# Operation names that only reinterpret memory (no arithmetic).
_FREE_OPS = {"view", "_unsafe_view", "reshape", "expand", "unsqueeze", "squeeze", "detach", "as_strided", "t",
             "transpose", "permute", "alias", "slice", "select", "unbind", "split", "_reshape_alias",
             "lift_fresh", "empty", "empty_like", "empty_strided"}
# The networks' operations (forward and backward): these must be the same calls on the same shapes.
_NETWORK_OPS = ("conv", "norm", "mm", "attention", "silu", "relu", "threshold", "upsample", "pool")
# What kdiff's fp32 step may run beyond the paper-style step, per kind (counts in one step):
# * host reads: kdiff's value checks, CPU-only (x and eps finite, t in range and on the grid; the
#   meta-device tests show none on other devices);
# * image-sized operations: the two min/max passes of those finiteness checks, and under CFD the
#   PD loss kdiff reports in DistillationStepOutput.pd_loss (eps_hat: 3, the pixel error: 3);
# * all arithmetic: [B]-sized time lookups on the cached grids, the float64 alpha/sigma tables
#   cast to float32, the checks, and the log-domain form of the CFD loss terms.
_EXTRA = {
    "pd": {"host_reads": 16, "image_sized": 2, "arithmetic": 80},
    "cfd": {"host_reads": 16, "image_sized": 8, "arithmetic": 135},
}


def _profile_ops(step, inputs):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [v for v in tree_leaves((args, kwargs, out)) if isinstance(v, torch.Tensor)]
            shapes = tuple(tuple(v.shape) for v in tree_leaves(args) if isinstance(v, torch.Tensor))
            self.ops.append((func.overloadpacket.__name__, shapes, max((v.numel() for v in tensors), default=0)))
            return out

    step(*inputs)  # warm-up: optimizer state, per-device tables
    with Log() as log:
        step(*inputs)
    return log.ops


@pytest.mark.parametrize("kind", ["pd", "cfd"])
def test_fp32_step_runs_the_paper_steps_operations_and_few_small_extras(kind):
    """The operations (aten calls below autograd, forward and backward) of one kdiff fp32 step
    against the paper-style step of benchmarks/bench_step.py on tiny networks: the same network
    operations on the same shapes, and beyond them only _EXTRA (counts, not timings, so a loaded
    machine cannot disturb it)."""
    bench = _bench_step()
    args = bench.parse_args(["--device", "cpu", "--unet", "tiny", "--unet-ch", "8", "--classifier", "smallcnn",
                             "--batch", "2", "--variants", "a", "b", "--out", ""])
    nets = bench.build(args, torch.device("cpu"))
    variants = bench.make_variants(nets, kind, args, torch.device("cpu"))
    x, t, noise = _batch(batch=2)
    x, noise = (torch.nn.functional.interpolate(v, size=32) for v in (x, noise))
    t = t * 16  # on the grid of the benchmark's T = 1024 table
    stats = {}
    for name, variant in variants.items():
        ops = _profile_ops(variant.step, (x, t, noise))
        network = collections.Counter((n, s) for n, s, _ in ops if any(k in n for k in _NETWORK_OPS))
        arithmetic = [(n, size) for n, s, size in ops if n not in _FREE_OPS and not any(k in n for k in _NETWORK_OPS)]
        stats[name] = {
            "network": network,
            "host_reads": sum(n == "_local_scalar_dense" for n, _ in arithmetic),
            "image_sized": sum(size >= x.numel() for _, size in arithmetic),
            "arithmetic": len(arithmetic),
        }
    a, b = stats["a"], stats["b"]
    assert sum(a["network"].values()) > 100  # the networks ran under the log
    assert b["network"] == a["network"], (b["network"] - a["network"], a["network"] - b["network"])
    for what, allowed in _EXTRA[kind].items():
        assert b[what] <= a[what] + allowed, f"{what}: kdiff {b[what]}, paper-style {a[what]} (+{allowed} allowed)"


# ------------------------------------------------------------------------------ compile
@pytest.mark.slow
@pytest.mark.parametrize("cfd", [False, True], ids=["pd", "cfd"])
def test_compiled_step_has_no_graph_break_and_equals_eager(cfd):
    """The forward traces into one graph; one compiled step (Dynamo + AOTAutograd, so the
    backward is the compiled joint graph) equals the eager step in float32."""
    nets = _nets()
    x, t, noise = _batch()
    eager = _step(*copy.deepcopy(nets), cfd=cfd, grad_clip=1.0)
    teacher, student, clf = copy.deepcopy(nets)
    compiled = _step(teacher, student, clf, cfd=cfd, grad_clip=1.0, compile=True,
                     compile_options={"backend": "aot_eager"})
    explain = torch._dynamo.explain(compiled._forward_eager)(x, t, noise, None, None)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    want = eager(x, t=t, noise=noise)
    got = compiled(x, t=t, noise=noise)  # fullgraph=True: a graph break would raise here
    for field in ("loss", "pd_loss", "feature_loss", "data_loss", "grad_norm"):
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), field
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert _grad_error(student, eager.distiller.student) < 1e-4


@pytest.mark.slow
def test_compiled_step_compiles_once():
    """A fresh schedule and distiller build their per-device tables at first use: the compiled
    step builds them before its first trace, so the second call reuses the graph."""
    torch._dynamo.reset()
    teacher, student, clf = _nets()
    pd = ProgressiveDistiller(teacher, student, DiscreteSchedule.cosine(64), 4,
                              teacher_prediction="x", student_prediction="x")
    step = DistillationStep(pd, optimizer=torch.optim.Adam(student.parameters()), autocast_dtype=None,
                            compile=True, compile_options={"backend": "aot_eager"})
    x, t, noise = _batch()
    step(x, t=t, noise=noise)
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(x, t=t, noise=noise)
        step(x, generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.parametrize("sched", [SCHED, CosineSchedule()], ids=["discrete", "cosine"])
def test_compiled_ddim_sample_has_no_graph_break(sched):
    torch.manual_seed(0)
    net = UNet(CFG).eval()
    noise = torch.randn(2, 3, 16, 16)

    def sample(noise):
        return ddim_sample(lambda z, t: net(z, t), noise, 4, schedule=sched, prediction_type="v", clip_x=True)

    explain = torch._dynamo.explain(sample)(noise)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    compiled = torch.compile(sample, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(noise), sample(noise))


# ------------------------------------------------------------------------------ benchmark
@pytest.mark.slow
def test_bench_step_agreement_and_json(tmp_path):
    """benchmarks/bench_step.py at toy sizes (the compiled variant through aot_eager): kdiff's
    steps agree with the paper-style step and the JSON has the fields the docs quote."""
    bench_step = _bench_step()
    out = tmp_path / "step.json"
    args = bench_step.parse_args(["--device", "cpu", "--unet", "tiny", "--unet-ch", "8", "--classifier", "smallcnn",
                                  "--batch", "2", "--repeats", "2", "--warmup", "0", "--compile-backend", "aot_eager",
                                  "--out", str(out)])
    result = bench_step.run(args)
    for kind in ("pd", "cfd"):
        res = result["results"][kind]
        assert set(res["variants"]) == {"a", "b", "c", "c_compiled"}
        assert res["agreement"]["b_vs_a"]["ok"] and res["agreement"]["b_vs_a"]["dtype"] == "float32"
        assert res["agreement"]["b_vs_a"]["rel_error"]["grad"] < 1e-3
        assert res["agreement"]["c_compiled_vs_a"]["ok"]
        for stat in ("ratios", "paired_ratios", "cpu_time_ratios"):
            assert set(res[stat]) == {"b/a", "c/a", "c_compiled/a"}
        for v in res["variants"].values():
            assert v["images_per_s"] > 0 and len(v["samples_s"]) == 2 and v["cpu_median_s"] > 0
            assert v["peak_memory_mib"] > 0 and v["reference_memory_mib"] > 0
            # The step holds the student's and the classifier's activations like the reference.
            assert v["memory_over_reference"] > 0.9
        assert "compile_s" in res and "b/a <= 1.02" in res["targets"]
    assert "profile_memory" in result["results"]["pd"]["memory_method"]
    assert out.is_file() and "torch" in result["machine"]
