"""CFD with an eps-prediction teacher and student on DDPM's linear betas, where ``alpha_T`` is about
0.006: the student's x-prediction ``(z_t - sigma_t eps_hat) / alpha_t`` amplifies its eps error by
up to 156 at the top step. The classifier's input bound keeps CFD's inputs, loss and gradients in
scale there; without it they grow with ``1 / alpha_t``.

Toy size (4 x 4 images, four classes, a closed-form teacher and a fixed nearest-prototype
classifier): each training run takes well under a second on a CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdiff import (
    CFDLoss,
    ClassifierTransform,
    DiscreteSchedule,
    FrozenClassifier,
    ProgressiveDistiller,
)
from kdiff.losses import snr_gate

K, C, H = 4, 3, 4
SCHEDULE = DiscreteSchedule.linear(1000)
PROTOTYPES = torch.rand(K, C, H, H, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8


def teacher_eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact eps-prediction of data made of the K prototype images (a Bayes denoiser)."""
    alpha, sigma = (c.view(-1, 1, 1, 1) for c in SCHEDULE.alpha_sigma(t, dtype=z.dtype))
    dist = (z.unsqueeze(1) - alpha.unsqueeze(1) * PROTOTYPES).square().flatten(2).sum(-1)  # [B, K]
    x_hat = torch.einsum("bk,kchw->bchw", torch.softmax(-dist / (2 * sigma.view(-1, 1) ** 2), 1), PROTOTYPES)
    return (z - alpha * x_hat) / sigma


class Student(nn.Module):
    """The teacher plus a time-conditioned residual: an eps network with an error of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.residual = nn.Sequential(nn.Conv2d(C + 1, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, C, 3, padding=1))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = (t.float() / SCHEDULE.t_max).view(-1, 1, 1, 1).expand(-1, 1, H, H)
        return teacher_eps(z, t) + self.residual(torch.cat([z, time], 1))


class NearestPrototype(nn.Module):
    """A logits-only classifier: logits_k = -s ||x - m_k||^2 + const through a ReLU layer
    (``h = relu(+-(W x + b))``, ``logits = h[:K] - h[K:]``); ``act`` holds the features."""

    def __init__(self, scale: float = 4.0) -> None:
        super().__init__()
        m = ((PROTOTYPES + 1) / 2).flatten(1)  # the prototypes in the classifier's [0, 1] range
        w, b = 2 * scale * m, -scale * m.square().sum(1)
        self.flatten = nn.Flatten()
        self.hidden = nn.Linear(C * H * H, 2 * K)
        self.act = nn.ReLU()
        self.out = nn.Linear(2 * K, K, bias=False)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.cat([w, -w]))
            self.hidden.bias.copy_(torch.cat([b, -b]))
            self.out.weight.copy_(torch.cat([torch.eye(K), -torch.eye(K)], 1))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.hidden(self.flatten(x))))


def class_mix_entropy(logits: torch.Tensor) -> float:
    """Entropy of the batch-mean class distribution (log K when the classes are balanced)."""
    pbar = torch.softmax(logits, -1).mean(0)
    return float(-(pbar * pbar.clamp_min(1e-12).log()).sum())


def train(*, clamp: bool, gate: bool = False, steps: int = 40, seed: int = 0) -> dict[str, float]:
    """CFD steps (the paper's tau, beta, gamma; Adam, grad clip 1) of an N = 4 eps student.

    The student keeps torch's default init, so its x-prediction errs by tens at the top step.
    """
    torch.manual_seed(seed)
    student = Student()
    classifier = NearestPrototype()
    pd = ProgressiveDistiller(teacher_eps, student, SCHEDULE, 4, teacher_prediction="eps", student_prediction="eps")
    cfd = CFDLoss(classifier, feature_layer="act", transform=ClassifierTransform(clamp=clamp),
                  temperature=0.95, beta=0.003, gamma=0.75)
    seen: list[float] = []
    classifier.register_forward_pre_hook(lambda m, args: seen.append(float(args[0].detach().abs().max())))
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)
    feature_losses, grad_norms, mixes = [], [], []
    for _ in range(steps):
        out = pd(PROTOTYPES[torch.randint(0, K, (64,), generator=g)], generator=g)
        weight = snr_gate(out.alpha_t, out.sigma_t, min_logsnr=-5.0) if gate else None
        terms = cfd(out.x_pred, out.x_target, weight=weight)
        optimizer.zero_grad()
        terms.loss.backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)))
        optimizer.step()
        feature_losses.append(float(terms.feature_loss.detach()))
        mixes.append(-float(terms.diversity.detach()))  # the class mix the loss sees: -Dv
    with torch.no_grad():  # the targets' class mix, through the bounded classifier
        out = pd(PROTOTYPES[torch.randint(0, K, (256,), generator=g)], generator=g)
        target_mix = class_mix_entropy(FrozenClassifier(classifier, feature_layer="act")(out.x_target)[0])
    return {
        "max_input": max(seen),
        "max_feature_loss": max(feature_losses),
        "max_grad_norm": max(grad_norms),
        "mix": sum(mixes[-10:]) / 10,
        "target_mix": target_mix,
        "x_pred_max": float(out.x_pred.abs().max()),
    }


@pytest.fixture(autouse=True)
def one_thread():
    """One thread is the fastest for 4 x 4 images (threads only add overhead)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_top_step_amplifies_an_eps_error_by_about_156():
    alpha, sigma = SCHEDULE.alpha_sigma(torch.tensor([SCHEDULE.t_max]), dtype=torch.float64)
    assert 150 < float(sigma / alpha) < 160


@pytest.mark.parametrize("seed", [0, 1])
def test_bound_keeps_cfd_on_an_eps_teacher_in_scale(seed):
    bounded = train(clamp=True, seed=seed)
    unbounded = train(clamp=False, seed=seed)
    # Without the bound the classifier scores images tens of times outside its range ...
    assert bounded["max_input"] <= 1.0 < 10.0 < unbounded["max_input"]
    # ... and the feature loss and the student's gradients grow with them.
    assert unbounded["max_feature_loss"] > 5 * bounded["max_feature_loss"]
    assert unbounded["max_grad_norm"] > 5 * bounded["max_grad_norm"]
    # With the bound the feature KL stays of the order of log D and the class mix the loss sees
    # stays near the targets'.
    assert bounded["max_feature_loss"] < 2 * math.log(2 * K) + 1
    assert abs(bounded["mix"] - bounded["target_mix"]) < 0.15


def test_snr_gate_switches_cfd_off_at_the_amplifying_steps():
    bounded = train(clamp=True)
    gated = train(clamp=True, gate=True)
    # The two noisiest steps (logSNR about -10 and -5.7) are left out, and with them the
    # largest amplification of the student's eps error.
    assert gated["max_grad_norm"] < bounded["max_grad_norm"] / 5
    assert gated["max_feature_loss"] < bounded["max_feature_loss"]
