"""Distilling an eps-prediction teacher on DDPM's linear betas (T = 1000): the eps student needs
the eps weighting ("auto" picks it); the paper's truncated-SNR weighting stalls it.

The data are Gaussian, x ~ N(mu, diag(std^2)), so the optimal denoiser is known in closed form,
``E[x | z_t] = mu + alpha_t std^2 / (alpha_t^2 std^2 + sigma_t^2) (z_t - alpha_t mu)``, and the
teacher below is that exact eps-predictor: the only error of its N-step DDIM sampler is the
discretisation, measured against its own 1000-step run.
"""

import math
import warnings

import pytest
import torch

from kdiff import DiscreteSchedule, ProgressiveDistiller, ddim_sample

D = 8
SCHEDULE = DiscreteSchedule.linear(1000)  # DDPM / google/ddpm-cifar10-32 betas, clean t = 0
MU = torch.linspace(-0.8, 0.8, D, dtype=torch.float64)
STD = torch.linspace(0.1, 0.6, D, dtype=torch.float64)


def exact_eps_teacher(z, t):
    a, s = (c.view(-1, 1) for c in SCHEDULE.alpha_sigma(t, dtype=torch.float64))
    z64 = z.double()
    x_hat = MU + a * STD**2 / (a**2 * STD**2 + s**2) * (z64 - a * MU)
    return ((z64 - a * x_hat) / s).to(z.dtype)


class ResidualStudent(torch.nn.Module):
    """The teacher plus a small MLP correction shared across times, zero at initialisation (the
    student starts as the teacher, as in PD)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(D + 4, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64), torch.nn.SiLU(), torch.nn.Linear(64, D)
        )
        torch.nn.init.zeros_(self.net[-1].weight)
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, z, t):
        u = (t.float() / SCHEDULE.t_max).view(-1, 1)
        feats = torch.cat([z, torch.sin(math.pi * u), torch.cos(math.pi * u), u, u * u], 1)
        return exact_eps_teacher(z, t) + self.net(feats)


def distil_8_to_4(weighting, steps=150):
    torch.manual_seed(0)
    student = ResidualStudent()
    pd = ProgressiveDistiller(exact_eps_teacher, student, SCHEDULE, 4, teacher_prediction="eps",
                              student_prediction="eps", weighting=weighting)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = (MU + STD * torch.randn(128, D, generator=g, dtype=torch.float64)).float()
        out = pd(x, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return pd, student


@pytest.mark.slow
def test_eps_student_of_an_eps_teacher_beats_the_teachers_own_4_steps():
    noise = torch.randn(512, D, generator=torch.Generator().manual_seed(1))
    reference = ddim_sample(exact_eps_teacher, noise.double(), 1000, schedule=SCHEDULE, prediction_type="eps",
                            clip_x=False)

    def mse(model, n):
        out = ddim_sample(model, noise, n, schedule=SCHEDULE, prediction_type="eps", clip_x=False)
        return float((out.double() - reference).square().mean())

    teacher_4, teacher_8 = mse(exact_eps_teacher, 4), mse(exact_eps_teacher, 8)
    assert teacher_8 < 0.5 * teacher_4  # there is something to distil

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default needs no warning
        pd, student = distil_8_to_4("auto")
    assert pd.weighting == "eps_mse"
    auto_4 = mse(student, 4)
    # The 4-step student reaches about its 8-step teacher, well below the teacher's own 4 steps.
    assert auto_4 < 0.6 * teacher_4 and auto_4 < 1.5 * teacher_8, (auto_4, teacher_4, teacher_8)

    # truncated_snr weighs the eps error at t = 1000 by 1/SNR = 2.5e4: it warns, and the student
    # does not get past the teacher's own 4 steps.
    with pytest.warns(UserWarning, match="eps_mse"):
        _, stalled = distil_8_to_4("truncated_snr")
    assert mse(stalled, 4) > 2 * auto_4
