import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdiff import CosineSchedule, DDIMStep, DiscreteSchedule, ddim_sample, ddim_step
from kdiff.parameterization import convert

from strategies import PREDICTION_TYPES, interior_times, schedules, tensors

B, SHAPE = 3, (3, 2, 4, 4)


@given(sched=schedules(), data=st.data(), kind=st.sampled_from(PREDICTION_TYPES))
def test_perfect_prediction_recovers_z_s(sched, data, kind):
    """With the true x (in any parameterization) a DDIM step lands exactly on z_s = alpha_s x + sigma_s eps."""
    t = data.draw(interior_times(sched, B))
    s = torch.floor(t * data.draw(st.floats(0.0, 0.99))) if sched.is_discrete else t * data.draw(st.floats(0.0, 0.99))
    x, eps = data.draw(tensors(SHAPE, scale=1.0)), data.draw(tensors(SHAPE, scale=1.0))
    a_t, s_t = sched.alpha_sigma(t, dtype=torch.float64)
    a_s, s_s = sched.alpha_sigma(s, dtype=torch.float64)
    z_t = a_t.view(-1, 1, 1, 1) * x + s_t.view(-1, 1, 1, 1) * eps
    pred = convert(x, z_t, a_t, s_t, source="x", target=kind)
    out = ddim_step(pred, z_t, t, s, schedule=sched, prediction_type=kind)
    expected = a_s.view(-1, 1, 1, 1) * x + s_s.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(out.pred_x, x, rtol=1e-8, atol=1e-8)


def test_clipping_recomputes_eps():
    sched = CosineSchedule()
    z, t, s = torch.randn(SHAPE, dtype=torch.float64), torch.full((B,), 0.6, dtype=torch.float64), torch.full((B,), 0.3, dtype=torch.float64)
    x = 3 * torch.randn(SHAPE, dtype=torch.float64)
    out = ddim_step(x, z, t, s, schedule=sched, clip_x=True)
    assert float(out.pred_x.abs().max()) <= 1.0
    a_t, s_t = sched.alpha_sigma(t, dtype=torch.float64)
    torch.testing.assert_close(a_t.view(-1, 1, 1, 1) * out.pred_x + s_t.view(-1, 1, 1, 1) * out.pred_eps, z)


def test_time_per_sample_matches_individual_steps():
    sched = DiscreteSchedule.cosine(64)
    z, pred = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    t, s = torch.tensor([64.0, 40.0, 7.0]), torch.tensor([32.0, 39.0, 0.0])
    batched = ddim_step(pred, z, t, s, schedule=sched, prediction_type="v").prev_sample
    for i in range(B):
        single = ddim_step(pred[i : i + 1], z[i : i + 1], t[i : i + 1], s[i : i + 1], schedule=sched, prediction_type="v")
        torch.testing.assert_close(batched[i : i + 1], single.prev_sample)


def test_stochastic_ddim_eta():
    sched = CosineSchedule()
    z, pred = torch.randn(SHAPE), torch.randn(SHAPE)
    t, s = torch.full((B,), 0.8), torch.full((B,), 0.4)
    step = DDIMStep(sched, prediction_type="eps", eta=1.0)
    a = step(pred, z, t, s, generator=torch.Generator().manual_seed(0)).prev_sample
    b = step(pred, z, t, s, generator=torch.Generator().manual_seed(0)).prev_sample
    c = step(pred, z, t, s, generator=torch.Generator().manual_seed(1)).prev_sample
    d = DDIMStep(sched, prediction_type="eps", eta=0.0)(pred, z, t, s).prev_sample
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)
    # With x_hat and eps_hat fixed, z_s has mean alpha_s x_hat + sqrt(sigma_s^2 - sigma_eta^2) eps_hat and
    # variance sigma_eta^2: check the marginal variance with many noise draws.
    big = torch.zeros(4000, 1, dtype=torch.float64)
    tt, ss = torch.full((4000,), 0.8, dtype=torch.float64), torch.full((4000,), 0.4, dtype=torch.float64)
    out = DDIMStep(sched, prediction_type="x", eta=1.0)(big, big, tt, ss, generator=torch.Generator().manual_seed(0)).prev_sample
    a_t, s_t = sched.alpha_sigma(tt[:1], dtype=torch.float64)
    a_s, s_s = sched.alpha_sigma(ss[:1], dtype=torch.float64)
    expected_std = float((s_s / s_t) * (1 - (a_t * s_s / (a_s * s_t)) ** 2).sqrt())
    assert float(out.std()) == pytest.approx(expected_std, rel=0.05)


def test_ddim_sample_with_oracle_model_returns_data():
    """A model that knows x exactly: an N-step x-prediction DDIM run ends on x (continuous, no clip)."""
    sched = CosineSchedule(logsnr_min=None, logsnr_max=None)
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64) * 2 - 1
    calls = []

    def model(z, t, y=None):
        calls.append((t.clone(), y))
        return x

    out = ddim_sample(model, torch.randn_like(x), 4, schedule=sched, model_kwargs={"y": torch.tensor([1, 2])})
    torch.testing.assert_close(out, x)
    assert [float(c[0][0]) for c in calls] == [1.0, 0.75, 0.5, 0.25]
    assert all(torch.equal(c[1], torch.tensor([1, 2])) for c in calls)


def test_ddim_sample_discrete_ends_at_index_zero_and_clips():
    sched = DiscreteSchedule.cosine(16)
    seen = []
    out = ddim_sample(lambda z, t: 5 * torch.ones_like(z), torch.randn(2, 1, 2, 2), 4, schedule=sched,
                      callback=lambda k, t, o: seen.append(float(t[0])))
    assert seen == [16.0, 12.0, 8.0, 4.0]
    assert float(out.max()) <= 1.0


def test_bad_inputs():
    sched = DiscreteSchedule.cosine(16)
    z = torch.randn(SHAPE)
    t = torch.full((B,), 8.0)
    with pytest.raises(ValueError, match="model_output and z_t must have the same shape"):
        ddim_step(torch.randn(2, 2, 4, 4), z, t, t, schedule=sched)
    with pytest.raises(ValueError, match=r"t must have shape \[3\]"):
        ddim_step(z, z, torch.full((2,), 8.0), t, schedule=sched)
    with pytest.raises(ValueError, match=r"s must have shape \[3\]"):
        ddim_step(z, z, t, t[:, None], schedule=sched)
    with pytest.raises(ValueError, match="s must lie in"):
        ddim_step(z, z, t, torch.full((B,), 20.0), schedule=sched)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DDIMStep(sched, prediction_type="score")
    with pytest.raises(ValueError, match="eta must be"):
        DDIMStep(sched, eta=-1)
    with pytest.raises(TypeError, match="schedule must be"):
        DDIMStep("cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="noise contains NaN or infinite values"):
        ddim_sample(lambda z, t: z, torch.full(SHAPE, float("nan")), 4, schedule=sched)
    with pytest.raises(ValueError, match="num_steps=5 must divide"):
        ddim_sample(lambda z, t: z, z, 5, schedule=sched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_preserved(dtype):
    sched = DiscreteSchedule.cosine(16)
    z = torch.randn(SHAPE, dtype=dtype)
    out = ddim_step(z, z, torch.full((B,), 8), torch.full((B,), 4), schedule=sched, prediction_type="eps")
    assert out.prev_sample.dtype == dtype


def test_bf16_model_output_under_autocast():
    sched = CosineSchedule()
    net = torch.nn.Conv2d(2, 2, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ddim_sample(lambda z, t: net(z), torch.randn(SHAPE), 2, schedule=sched, prediction_type="v")
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
