import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdiff import DiscreteSchedule, ProgressiveDistiller
from kdiff.parameterization import (
    ReparameterizedModel,
    convert,
    normalize_prediction_type,
    to_v,
    to_x,
    to_x_eps,
)

from strategies import PREDICTION_TYPES, interior_times, schedules, tensors

B, SHAPE = 4, (4, 3, 2, 2)


@given(sched=schedules(), data=st.data(), src=st.sampled_from(PREDICTION_TYPES), dst=st.sampled_from(PREDICTION_TYPES))
def test_round_trip(sched, data, src, dst):
    t = data.draw(interior_times(sched, B))
    alpha, sigma = sched.alpha_sigma(t, dtype=torch.float64)
    z = data.draw(tensors(SHAPE))
    pred = data.draw(tensors(SHAPE))
    there = convert(pred, z, alpha, sigma, source=src, target=dst)
    back = convert(there, z, alpha, sigma, source=dst, target=src)
    torch.testing.assert_close(back, pred, rtol=1e-9, atol=1e-9)


@given(sched=schedules(), data=st.data())
def test_consistent_with_forward_process(sched, data):
    """Exact x and eps give z_t back, and v = alpha eps - sigma x, for every parameterization."""
    t = data.draw(interior_times(sched, B))
    alpha, sigma = sched.alpha_sigma(t, dtype=torch.float64)
    x, eps = data.draw(tensors(SHAPE)), data.draw(tensors(SHAPE, scale=1.0))
    a, s = alpha.view(-1, 1, 1, 1), sigma.view(-1, 1, 1, 1)
    z = a * x + s * eps
    v = a * eps - s * x
    for kind, pred in (("x", x), ("eps", eps), ("v", v)):
        x_hat, eps_hat = to_x_eps(pred, z, alpha, sigma, kind)
        torch.testing.assert_close(x_hat, x, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(eps_hat, eps, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(to_v(pred, z, alpha, sigma, kind), v, rtol=1e-8, atol=1e-8)


def test_diffusers_aliases_and_errors():
    assert normalize_prediction_type("epsilon") == "eps"
    assert normalize_prediction_type("sample") == "x"
    assert normalize_prediction_type("v_prediction") == "v"
    with pytest.raises(ValueError, match="prediction_type must be one of 'x', 'eps', 'v'"):
        normalize_prediction_type("score")
    with pytest.raises(ValueError, match="target must be one of"):
        convert(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), torch.ones(1), source="x", target="noise")


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_prediction_of_another_shape_is_refused_not_broadcast(kind):
    z, a, s = torch.randn(SHAPE), torch.rand(B), torch.rand(B)
    for bad in (torch.randn(B, 1, 2, 2), torch.randn(1, 3, 2, 2)):  # both would broadcast against z
        for fn in (to_x_eps, to_x, to_v):
            with pytest.raises(ValueError, match="prediction and z_t must have the same shape"):
                fn(bad, z, a, s, kind)


@given(sched=schedules(), data=st.data(), kind=st.sampled_from(PREDICTION_TYPES))
def test_to_x_agrees_with_to_x_eps(sched, data, kind):
    t = data.draw(interior_times(sched, B))
    alpha, sigma = sched.alpha_sigma(t, dtype=torch.float64)
    z, pred = data.draw(tensors(SHAPE)), data.draw(tensors(SHAPE))
    torch.testing.assert_close(to_x(pred, z, alpha, sigma, kind), to_x_eps(pred, z, alpha, sigma, kind)[0], rtol=0, atol=0)


# ------------------------------------------------------------------ ReparameterizedModel
class _EpsNet(torch.nn.Module):
    """A small time-conditioned eps network (float64)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 3, 1).double()

    def forward(self, z, t):
        return torch.tanh(self.conv(z)) * (1 + t.view(-1, 1, 1, 1) / 1000)


@given(sched=schedules(), data=st.data(), src=st.sampled_from(PREDICTION_TYPES), dst=st.sampled_from(PREDICTION_TYPES))
def test_reparameterized_model_keeps_x_hat(sched, data, src, dst):
    """Wrapped, a source-type network returns the target type of the very same x_hat."""
    t = data.draw(interior_times(sched, B))
    alpha, sigma = sched.alpha_sigma(t, dtype=torch.float64)
    z, out = data.draw(tensors(SHAPE)), data.draw(tensors(SHAPE))
    wrapped = ReparameterizedModel(lambda z_t, t_: out, sched, source=src, target=dst)
    pred = wrapped(z, t)
    torch.testing.assert_close(to_x(pred, z, alpha, sigma, dst), to_x(out, z, alpha, sigma, src), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pred, convert(out, z, alpha, sigma, source=src, target=dst), rtol=0, atol=0)


def test_eps_to_v_student_starts_as_the_eps_teacher():
    """v_hat = (eps_hat - sigma z) / alpha, x_hat identical to the unwrapped eps network's, float32 and float64."""
    sched = DiscreteSchedule.linear(1000)
    net = _EpsNet()
    student = ReparameterizedModel(net, sched, source="eps", target="v")
    assert list(student.parameters()) == list(net.parameters())  # registered: trains, copies, moves with it
    t = torch.tensor([1.0, 250, 500, 750, 999, 1000])
    z = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    a, s = (c.view(-1, 1, 1, 1) for c in sched.alpha_sigma(t, dtype=torch.float64))
    v = student(z, t)
    eps = net(z, t)
    torch.testing.assert_close(v, (eps - s * z) / a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a * z - s * v, (z - s * eps) / a, rtol=1e-9, atol=1e-9)  # x_hat
    student32 = ReparameterizedModel(lambda z_t, t_: net(z_t.double(), t_).float(), sched, source="eps", target="v")
    v32 = student32(z.float(), t)
    assert v32.dtype == torch.float32
    torch.testing.assert_close(v32.double(), v, rtol=1e-5, atol=1e-5 / float(a.min()))


def test_reparameterized_student_gets_the_eps_students_loss_and_gradients():
    """Under one weighting, PD sees only x_hat: wrapped (v) and unwrapped (eps) students train alike."""
    sched = DiscreteSchedule.linear(1000)
    teacher = _EpsNet(1).requires_grad_(False)
    plain, wrapped_net = _EpsNet(2), _EpsNet(2)
    wrapped = ReparameterizedModel(wrapped_net, sched, source="eps", target="v")
    x = torch.rand(4, 3, 4, 4, dtype=torch.float64) * 2 - 1
    t = torch.tensor([250.0, 500, 750, 1000], dtype=torch.float64)
    noise = torch.randn_like(x)
    losses = []
    for student, kind, net in ((plain, "eps", plain), (wrapped, "v", wrapped_net)):
        pd = ProgressiveDistiller(teacher, student, sched, 4, teacher_prediction="eps", student_prediction=kind,
                                  weighting="eps_mse")
        out = pd(x, t=t, noise=noise)
        out.loss.backward()
        losses.append((out.loss.detach(), out.x_pred.detach(), net.conv.weight.grad.clone()))
    (l1, x1, g1), (l2, x2, g2) = losses
    torch.testing.assert_close(x2, x1, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(l2, l1, rtol=1e-8, atol=0)
    torch.testing.assert_close(g2, g1, rtol=1e-6, atol=1e-10)
    assert float(g1.abs().sum()) > 0


def test_reparameterized_model_validates():
    sched = DiscreteSchedule.cosine(16)
    with pytest.raises(ValueError, match="source must be one of 'x', 'eps', 'v'"):
        ReparameterizedModel(lambda z, t: z, sched, source="noise", target="v")
    with pytest.raises(ValueError, match="target must be one of"):
        ReparameterizedModel(lambda z, t: z, sched, source="eps", target="score")
    with pytest.raises(TypeError, match="model must be callable"):
        ReparameterizedModel(None, sched, source="eps", target="v")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="schedule must be a kdiff NoiseSchedule"):
        ReparameterizedModel(lambda z, t: z, "cosine", source="eps", target="v")  # type: ignore[arg-type]
    with pytest.raises(TypeError):  # source and target are keyword-only
        ReparameterizedModel(lambda z, t: z, sched, "eps", "v")  # type: ignore[misc]
    bad = ReparameterizedModel(lambda z, t: z[:, :1], sched, source="eps", target="v")
    with pytest.raises(ValueError, match=r"model output must have the shape of z_t \(2, 3, 2, 2\)"):
        bad(torch.randn(2, 3, 2, 2), torch.tensor([4, 8]))
    assert "source='eps', target='v'" in repr(bad)
