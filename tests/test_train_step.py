"""The sync-free hot paths: DistillationStep (PD and CFD) and the ddim_sample loop.

* semantics: the step is the distiller + loss + backward + clipping + optimizer step written out;
* no host reads: the whole step and the sampler run on the ``meta`` device, where any
  ``.item()``, ``bool(tensor)`` or data-dependent branch raises;
* torch.compile: the step's forward and the sampler trace into one graph (no breaks) and the
  compiled step equals the eager one in float32;
* memory: nothing of the teacher side (teacher network, classifier on ``x_tilde``) is saved for
  backward.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from kdiff import CFDLoss, CosineSchedule, DiscreteSchedule, ProgressiveDistiller, ddim_sample
from kdiff.models import SmallCNN, UNet, UNetConfig
from kdiff.train_step import DistillationStep, native_bf16, resolve_autocast_dtype

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
    with pytest.raises(ValueError, match="channels_last must be True or False"):
        DistillationStep(pd, optimizer=opt, channels_last="yes")
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
def test_teacher_side_saves_nothing_for_backward():
    """Count tensors saved for backward during each network call: the teacher's two calls and
    the classifier's pass on x_tilde save none; the student's calls save some (the count works)."""
    teacher, student, clf = _nets()
    step = _step(teacher, student, clf, cfd=True)
    frames: list[list] = []  # [network, tensors saved so far] of the calls in progress
    calls: list[tuple[str, int]] = []

    def enter(name):
        return lambda module, args: frames.append([name, 0]) and None

    def leave(module, args, output):
        calls.append(tuple(frames.pop()))

    for name, net in (("teacher", teacher), ("student", student), ("classifier", clf)):
        net.register_forward_pre_hook(enter(name))
        net.register_forward_hook(leave)

    def pack(tensor):
        if frames:
            frames[-1][1] += 1
        return tensor

    x, t, noise = _batch()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(x, t=t, noise=noise)
    assert [name for name, _ in calls] == ["teacher", "teacher", "student", "classifier", "classifier"]
    (_, teacher1), (_, teacher2), (_, student_saved), (_, clf_target), (_, clf_student) = calls
    assert teacher1 == teacher2 == 0, "the teacher network saved tensors for backward"
    assert clf_target == 0, "the classifier's pass on x_tilde saved tensors for backward"
    assert student_saved > 10 and clf_student > 5


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
    """benchmarks/bench_step.py at toy sizes: kdiff's steps agree with the paper-style step and
    the JSON has the fields the docs quote."""
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        import bench_step
    finally:
        sys.path.remove(str(root / "benchmarks"))
    out = tmp_path / "step.json"
    args = bench_step.parse_args(["--device", "cpu", "--unet", "tiny", "--unet-ch", "8", "--classifier", "smallcnn",
                                  "--batch", "2", "--repeats", "2", "--warmup", "0", "--no-compile", "--out", str(out)])
    result = bench_step.run(args)
    for kind in ("pd", "cfd"):
        res = result["results"][kind]
        assert set(res["variants"]) == {"a", "b", "c"}
        assert res["agreement"]["b_vs_a"]["ok"] and res["agreement"]["b_vs_a"]["dtype"] == "float32"
        assert res["agreement"]["b_vs_a"]["rel_error"]["grad"] < 1e-3
        assert set(res["ratios"]) == {"b/a", "c/a"}
        assert all(v["images_per_s"] > 0 and len(v["samples_s"]) == 2 for v in res["variants"].values())
        assert all(v["peak_memory_mib"] is None or v["peak_memory_mib"] >= 0 for v in res["variants"].values())
        assert set(res["paired_ratios"]) == {"b/a", "c/a"}
    assert out.is_file() and "torch" in result["machine"]
