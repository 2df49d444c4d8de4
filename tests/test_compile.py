"""The losses, DDIMStep and a ProgressiveDistiller step compile with torch.compile(fullgraph=True) on CPU."""

import pytest
import torch

from kdiff import (
    CFDLoss,
    ClassifierFeatureLoss,
    CosineSchedule,
    DatasetOrientedLoss,
    DDIMStep,
    DiscreteSchedule,
    ProgressiveDistiller,
)
from kdiff.functional import dataset_oriented_loss, feature_kl_loss, pd_loss

pytestmark = pytest.mark.slow


class Clf(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        f = self.conv(x).relu().mean((2, 3))
        return self.fc(f), f


def test_functional_losses_fullgraph():
    f_s, f_t, logits = torch.randn(4, 16, requires_grad=True), torch.randn(4, 16), torch.randn(4, 5, requires_grad=True)
    kl = torch.compile(lambda a, b: feature_kl_loss(a, b, temperature=0.9), fullgraph=True)
    data = torch.compile(lambda z: dataset_oriented_loss(z, gamma=0.75)[0], fullgraph=True)
    torch.testing.assert_close(kl(f_s, f_t), feature_kl_loss(f_s, f_t, temperature=0.9))
    torch.testing.assert_close(data(logits), dataset_oriented_loss(logits, gamma=0.75)[0])
    (kl(f_s, f_t) + data(logits)).backward()
    assert f_s.grad is not None and logits.grad is not None
    a, s = torch.rand(4) + 0.1, torch.rand(4) + 0.1
    x, y = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    pd = torch.compile(lambda x, y, a, s: pd_loss(x, y, a, s, weighting="truncated_snr"), fullgraph=True)
    torch.testing.assert_close(pd(x, y, a, s), pd_loss(x, y, a, s))


def test_loss_modules_fullgraph():
    clf = Clf()
    x_hat, x_tilde = torch.randn(4, 3, 8, 8, requires_grad=True), torch.randn(4, 3, 8, 8)
    feat = ClassifierFeatureLoss(clf, temperature=0.9)
    torch.testing.assert_close(torch.compile(feat, fullgraph=True)(x_hat, x_tilde), feat(x_hat, x_tilde))
    data = DatasetOrientedLoss(gamma=0.5)
    logits = torch.randn(6, 5)
    torch.testing.assert_close(torch.compile(data, fullgraph=True)(logits), data(logits))
    cfd = CFDLoss(clf, beta=0.1)
    compiled = torch.compile(lambda a, b: cfd(a, b).loss, fullgraph=True)
    loss = compiled(x_hat, x_tilde)
    torch.testing.assert_close(loss, cfd(x_hat, x_tilde).loss)
    loss.backward()
    assert x_hat.grad is not None


@pytest.mark.parametrize("schedule", [CosineSchedule(), DiscreteSchedule.cosine(64)], ids=["cosine", "discrete"])
def test_ddim_step_fullgraph(schedule):
    step = DDIMStep(schedule, prediction_type="v", clip_x=True)
    compiled = torch.compile(step, fullgraph=True)
    z, pred = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = schedule.grid(4)[torch.tensor([4, 3, 2, 1])].float()
    s = t - schedule.t_max / 4
    torch.testing.assert_close(compiled(pred, z, t, s).prev_sample, step(pred, z, t, s).prev_sample)


@pytest.mark.parametrize("schedule", [CosineSchedule(), DiscreteSchedule.cosine(64)], ids=["cosine", "discrete"])
def test_progressive_distiller_step_fullgraph(schedule):
    """One whole PD step (value checks, teacher half-steps with clipping, target, student, loss)
    traces into one graph and matches eager in value and gradient."""
    torch.manual_seed(0)
    teacher = torch.nn.Conv2d(3, 3, 3, padding=1).requires_grad_(False)
    student = torch.nn.Conv2d(3, 3, 3, padding=1)
    pd = ProgressiveDistiller(lambda z, t: teacher(z), lambda z, t: student(z), schedule, 4,
                              teacher_prediction="eps", student_prediction="v", clip_teacher_x=True)

    def step(x, t, noise):
        out = pd(x, t=t, noise=noise)
        return out.loss, out.x_target, out.x_pred

    x, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = pd.student_times(torch.tensor([1, 2, 3, 4]))
    eager = step(x, t, noise)
    eager[0].backward()
    eager_grad = student.weight.grad.clone()
    student.weight.grad = None
    compiled = torch.compile(step, fullgraph=True)(x, t, noise)
    for got, want in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, want)
    compiled[0].backward()
    torch.testing.assert_close(student.weight.grad, eager_grad)
