import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdiff.parameterization import convert, normalize_prediction_type, to_v, to_x, to_x_eps

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
