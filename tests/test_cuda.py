"""CUDA correctness: the same maths on the GPU as the float64 CPU reference, with no host syncs.

Skipped where no CUDA device exists (run by ``benchmarks/gpu_check.sh`` on a GPU machine).
"""

import pytest
import torch

from kdiff import CFDLoss, DDIMStep, DiscreteSchedule, ProgressiveDistiller
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
    pd = ProgressiveDistiller(lambda z, t: net(z), lambda z, t: net(z), sched, 8)
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
    pd = ProgressiveDistiller(lambda z, t: net(z), lambda z, t: net(z), sched, 8)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = pd(torch.randn(8, 3, 32, 32, device="cuda"))
    assert out.loss.dtype == torch.float32 and bool(torch.isfinite(out.loss))
