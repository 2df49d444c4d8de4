"""CUDA correctness: the same maths on the GPU as the float64 CPU reference, with no host syncs.

Skipped where no CUDA device exists (run by ``benchmarks/gpu_check.sh`` on a GPU machine).
"""

import pytest
import torch

from kdiff import CFDLoss, ClassifierTransform, DDIMStep, DiscreteSchedule, ProgressiveDistiller
from kdiff.functional import dataset_oriented_loss, feature_kl_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pair(*shape):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(sum(shape)))
    return x, x.float().cuda()


def test_losses_match_cpu_reference():
    (f_s, f_s_gpu), (f_t, f_t_gpu), (lg, lg_gpu) = _pair(64, 512), _pair(64, 513), _pair(64, 10)
    f_t, f_t_gpu = f_t[:, :512], f_t_gpu[:, :512]
    torch.testing.assert_close(feature_kl_loss(f_s_gpu, f_t_gpu, temperature=0.9).cpu().double(),
                               feature_kl_loss(f_s, f_t, temperature=0.9), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dataset_oriented_loss(lg_gpu, gamma=0.75)[0].cpu().double(),
                               dataset_oriented_loss(lg, gamma=0.75)[0], rtol=1e-4, atol=1e-5)


def test_ddim_and_pd_match_cpu_and_do_not_sync():
    sched = DiscreteSchedule.cosine(1024)
    z, z_gpu = _pair(16, 3, 32, 32)
    t = torch.full((16,), 768.0)
    step = DDIMStep(sched, prediction_type="v", clip_x=True)
    ref = step(z * 0.5, z, t.double(), t.double() - 256).prev_sample
    net = torch.nn.Conv2d(3, 3, 3, padding=1).cuda()
    clf = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 10)).cuda()
    pd = ProgressiveDistiller(lambda z, t: net(z), lambda z, t: net(z), sched, 8, teacher_prediction="x",
                              student_prediction="x")
    cfd = CFDLoss(clf, feature_layer="2")
    t_gpu = t.cuda()
    step(z_gpu * 0.5, z_gpu, t_gpu, t_gpu - 256)  # warm-up: per-device schedule tables
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync from here on raises
    try:
        out = step(z_gpu * 0.5, z_gpu, t_gpu, t_gpu - 256).prev_sample
        res = pd(z_gpu)
        terms = cfd(res.x_pred, res.x_target)
        terms.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-4)


def test_autocast_bf16_cuda():
    sched = DiscreteSchedule.cosine(1024)
    net = torch.nn.Conv2d(3, 3, 3, padding=1).cuda().to(memory_format=torch.channels_last)
    pd = ProgressiveDistiller(lambda z, t: net(z), lambda z, t: net(z), sched, 8, teacher_prediction="x",
                              student_prediction="x")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = pd(torch.randn(8, 3, 32, 32, device="cuda"))
    assert out.loss.dtype == torch.float32 and bool(torch.isfinite(out.loss))


# ------------------------------------------------------------------ fused ops (kdiff.ops)
def _triton_or_skip():
    from kdiff.ops import interpreter_enabled, triton_available

    if not triton_available():
        pytest.skip("triton does not import (CUDA builds of torch ship it): the fused CUDA ops need it")
    if interpreter_enabled():
        pytest.skip("TRITON_INTERPRET is set: the CUDA kernels would run in the interpreter")


def _cuda_and_ref(*shape, dtype, seed, scale=1.0):
    """The same values on the GPU (``dtype``) and on the CPU in float64, for an exact reference."""
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    return x.cuda().requires_grad_(True), x.double().requires_grad_(True)


# The kernels' maths is float32; outputs and gradients are rounded to the input dtype.
_FUSED_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.bfloat16: dict(rtol=1e-2, atol=1e-4)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_ops_match_float64_reference(dtype):
    from kdiff.ops import dataset_oriented_loss as fused_data
    from kdiff.ops import feature_kl_loss as fused_kl
    from kdiff.ops import pd_target_loss

    _triton_or_skip()
    tol = _FUSED_TOL[dtype]
    for shape in ((64, 512), (41, 1920), (8, 5000)):  # 5000 > one 4096 block: the looped path
        for reduction in ("batchmean", "none"):
            (f_s, f_s64), (f_t, f_t64) = _cuda_and_ref(*shape, dtype=dtype, seed=0, scale=2), _cuda_and_ref(*shape, dtype=dtype, seed=1, scale=2)
            out = fused_kl(f_s, f_t.detach(), temperature=0.9, reduction=reduction, impl="triton")
            exp = feature_kl_loss(f_s64, f_t64.detach(), temperature=0.9, reduction=reduction)
            torch.testing.assert_close(out.cpu().double(), exp, **tol)
            go = torch.full_like(exp, 2.0)
            out.backward(go.to(out))
            exp.backward(go)
            torch.testing.assert_close(f_s.grad.cpu().double(), f_s64.grad, **tol)
    for shape in ((256, 10), (64, 1000), (7, 5000)):
        lg, lg64 = _cuda_and_ref(*shape, dtype=dtype, seed=2, scale=3)
        out = fused_data(lg, gamma=0.75, impl="triton")
        exp = dataset_oriented_loss(lg64, gamma=0.75)
        for o, e in zip(out, exp, strict=True):
            torch.testing.assert_close(o.cpu().double(), e, **tol)
        (2 * out[0]).backward()
        (2 * exp[0]).backward()
        torch.testing.assert_close(lg.grad.cpu().double(), lg64.grad, **tol)
    z, z64 = _cuda_and_ref(16, 3, 32, 32, dtype=dtype, seed=3)
    (o1, o1_64), (o2, o2_64) = _cuda_and_ref(16, 3, 32, 32, dtype=dtype, seed=4), _cuda_and_ref(16, 3, 32, 32, dtype=dtype, seed=5)
    x_hat, x_hat64 = _cuda_and_ref(16, 3, 32, 32, dtype=dtype, seed=6)
    a = torch.linspace(0.2, 0.9, 16, dtype=torch.float64)
    coeffs64 = [c for v in (a, a + 0.03, a + 0.06) for c in (v, (1 - v * v).sqrt())]
    out = pd_target_loss(x_hat, z.detach(), o1.detach(), o2.detach(), *[c.float().cuda() for c in coeffs64],
                         teacher_prediction="eps", clip_x=True, impl="triton")
    exp = pd_target_loss(x_hat64, z64.detach(), o1_64.detach(), o2_64.detach(), *coeffs64,
                         teacher_prediction="eps", clip_x=True, impl="torch")
    torch.testing.assert_close(out.loss.cpu().double(), exp.loss, **tol)
    torch.testing.assert_close(out.x_tilde.cpu().double(), exp.x_tilde, rtol=tol["rtol"], atol=1e-3)
    out.loss.backward()
    exp.loss.backward()
    torch.testing.assert_close(x_hat.grad.cpu().double(), x_hat64.grad, rtol=tol["rtol"], atol=1e-6)


def test_fused_ops_auto_dispatch_and_no_host_syncs():
    from kdiff.ops import dataset_oriented_loss as fused_data
    from kdiff.ops import feature_kl_loss as fused_kl
    from kdiff.ops import pd_target_loss, resolve_impl

    _triton_or_skip()
    f = torch.randn(128, 512, device="cuda")
    assert resolve_impl("auto", f, op="feature_kl_loss") == "triton"
    assert resolve_impl("auto", f.double(), op="feature_kl_loss") == "torch"
    f_s = f.clone().requires_grad_(True)
    lg = torch.randn(128, 10, device="cuda", requires_grad=True)
    z = torch.randn(8, 3, 32, 32, device="cuda")
    x_hat = z.clone().requires_grad_(True)
    coeffs = [torch.full((8,), v, device="cuda") for v in (0.6, 0.8, 0.7, 0.714, 0.8, 0.6)]

    def step():
        loss = fused_kl(f_s, f, temperature=0.9) + fused_data(lg)[0] + pd_target_loss(x_hat, z, z, z, *coeffs).loss
        loss.backward()

    step()  # warm-up: compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync from here on raises
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(f_s.grad).all() and torch.isfinite(lg.grad).all() and torch.isfinite(x_hat.grad).all()


# ------------------------------------------------------------------ training step and sampler
def _tiny_unet(seed):
    from kdiff.models import UNet, UNetConfig

    torch.manual_seed(seed)
    net = UNet(UNetConfig.tiny())
    with torch.no_grad():  # non-zero output layers (a trained network's are)
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.02)
    return net.cuda()


@pytest.mark.parametrize("fused_adam", [False, True], ids=["adam_foreach", "adam_fused"])
def test_distillation_step_makes_no_host_sync(fused_adam):
    """A whole CFD step (bf16 autocast, channels_last, grad clipping, Adam) under sync-debug
    "error": any .item(), bool(tensor) or blocking copy inside it raises."""
    from kdiff.models import SmallCNN
    from kdiff.train_step import DistillationStep

    teacher = _tiny_unet(0).eval().requires_grad_(False)
    student = _tiny_unet(0)
    pd = ProgressiveDistiller(teacher, student, DiscreteSchedule.cosine(1024), 4, teacher_prediction="x",
                              student_prediction="x")
    # A normalising transform too: its mean/std must not be copied from the host at each call.
    transform = ClassifierTransform(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    cfd = CFDLoss(SmallCNN().cuda(), transform=transform, temperature=0.95, beta=0.003, gamma=0.75)
    opt = torch.optim.Adam(student.parameters(), lr=5e-5, fused=fused_adam)
    step = DistillationStep(pd, cfd=cfd, optimizer=opt, grad_clip=1.0, autocast_dtype="auto", channels_last=True)
    assert step.resolved_autocast_dtype("cuda") is torch.bfloat16
    x = torch.rand(16, 3, 32, 32, device="cuda") * 2 - 1
    step(x)  # warm-up: per-device schedule tables and grids, optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync from here on raises
    try:
        outs = [step(x) for _ in range(2)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for out in outs:
        assert out.loss.dtype == torch.float32 and bool(torch.isfinite(out.loss)) and bool(out.grad_norm > 0)


def test_ddim_sample_captured_in_a_cuda_graph_replays_like_eager():
    """The sampler loop for fixed shapes captures in a CUDA graph (a host sync or a host-to-device
    copy during capture would fail it) and each replay equals an eager run on the new noise."""
    from kdiff import ddim_sample

    net = _tiny_unet(1).eval()
    sched = DiscreteSchedule.cosine(1024)
    static_noise = torch.randn(8, 3, 32, 32, device="cuda")

    def sample():
        return ddim_sample(lambda z, t: net(z, t), static_noise, 8, schedule=sched, prediction_type="eps")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sample()  # warm-up off the capture: per-device schedule tables, library handles
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = sample()
    for seed in (1, 2):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        static_noise.copy_(torch.randn(8, 3, 32, 32, device="cuda", generator=gen))
        graph.replay()
        expected = sample()
        torch.testing.assert_close(static_out, expected, rtol=1e-5, atol=1e-5)
        assert float(expected.std()) > 0.1  # a real sample, not a constant
