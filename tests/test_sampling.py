import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdiff import CosineSchedule, DDIMStep, DiscreteSchedule, ddim_sample, ddim_step
from kdiff.functional import ddim_noise_scale, ddim_step_coeffs
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


@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_clipping_clamps_x_and_recomputes_eps(kind):
    sched = CosineSchedule()
    z, t, s = torch.randn(SHAPE, dtype=torch.float64), torch.full((B,), 0.6, dtype=torch.float64), torch.full((B,), 0.3, dtype=torch.float64)
    x = 3 * torch.randn(SHAPE, dtype=torch.float64)
    a_t, s_t = (c.view(-1, 1, 1, 1) for c in sched.alpha_sigma(t, dtype=torch.float64))
    a_s, s_s = (c.view(-1, 1, 1, 1) for c in sched.alpha_sigma(s, dtype=torch.float64))
    pred = convert(x, z, a_t.flatten(), s_t.flatten(), source="x", target=kind)
    out = ddim_step(pred, z, t, s, schedule=sched, prediction_type=kind, clip_x=True)
    # Reference, written out: clamp x, eps from the clamped x, then the DDIM update.
    x_ref = torch.minimum(torch.maximum(x, torch.tensor(-1.0)), torch.tensor(1.0))
    eps_ref = (z - a_t * x_ref) / s_t
    torch.testing.assert_close(out.pred_x, x_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.pred_eps, eps_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.prev_sample, a_s * x_ref + s_s * eps_ref, rtol=1e-12, atol=1e-12)
    assert bool((x.abs() > 1).any()) and bool((x.abs() < 1).any())
    # Without clip_x nothing is clamped: the step uses x itself.
    free = ddim_step(pred, z, t, s, schedule=sched, prediction_type=kind)
    torch.testing.assert_close(free.pred_x, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(free.prev_sample, a_s * x + s_s * (z - a_t * x) / s_t, rtol=1e-12, atol=1e-12)


def test_ddim_step_is_ddim_step_coeffs_with_the_schedule():
    """ddim_step adds the schedule lookup and checks to the one coefficient-level step, nothing else."""
    sched = DiscreteSchedule.cosine(64)
    z, pred, xi = (torch.randn(SHAPE, dtype=torch.float64) for _ in range(3))
    t, s = torch.tensor([64.0, 40.0, 7.0]), torch.tensor([32.0, 39.0, 0.0])
    a_t, s_t = sched.alpha_sigma(t, dtype=torch.float64)
    a_s, s_s = sched.alpha_sigma(s, dtype=torch.float64)
    for kind in PREDICTION_TYPES:
        for clip in (False, True):
            out = ddim_step(pred, z, t, s, schedule=sched, prediction_type=kind, clip_x=clip, eta=0.5, noise=xi)
            scale = ddim_noise_scale(a_t, s_t, a_s, s_s, 0.5)
            ref = ddim_step_coeffs(pred, z, a_t, s_t, a_s, s_s, prediction_type=kind, clip_x=clip, noise_scale=scale, noise=xi)
            for got, want in zip((out.prev_sample, out.pred_x, out.pred_eps), ref, strict=True):
                assert torch.equal(got, want)


def test_stochastic_step_with_explicit_noise_follows_the_formula():
    sched = CosineSchedule()
    z, x, xi = (torch.randn(SHAPE, dtype=torch.float64) for _ in range(3))
    t, s = torch.full((B,), 0.8, dtype=torch.float64), torch.full((B,), 0.4, dtype=torch.float64)
    a_t, s_t = sched.alpha_sigma(t[:1], dtype=torch.float64)
    a_s, s_s = sched.alpha_sigma(s[:1], dtype=torch.float64)
    eta = 0.7
    sigma_eta = eta * (s_s / s_t) * (1 - (a_t * s_s / (a_s * s_t)) ** 2).sqrt()
    eps_hat = (z - a_t * x) / s_t
    expected = a_s * x + (s_s**2 - sigma_eta**2).sqrt() * eps_hat + sigma_eta * xi
    out = ddim_step(x, z, t, s, schedule=sched, prediction_type="x", eta=eta, noise=xi)
    torch.testing.assert_close(out.prev_sample, expected, rtol=1e-12, atol=1e-12)
    # At eta = 0 the noise term vanishes: the deterministic step, whatever the noise.
    det = ddim_step(x, z, t, s, schedule=sched, prediction_type="x", eta=0.0, noise=xi).prev_sample
    torch.testing.assert_close(det, a_s * x + s_s * eps_hat, rtol=1e-12, atol=1e-12)


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

    out = ddim_sample(model, torch.randn_like(x), 4, schedule=sched, prediction_type="x",
                      model_kwargs={"y": torch.tensor([1, 2])})
    torch.testing.assert_close(out, x)
    assert [float(c[0][0]) for c in calls] == [1.0, 0.75, 0.5, 0.25]
    assert all(torch.equal(c[1], torch.tensor([1, 2])) for c in calls)


def _reference_sampler(x_pred, noise, grid, sched, clip_x):
    """DDIM with an x-predicting model that always says ``x_pred``, written out step by step."""
    z = noise
    for k in range(len(grid) - 1, 0, -1):
        a_t, s_t = (c.view(-1, 1, 1, 1) for c in sched.alpha_sigma(grid[k].expand(z.shape[0]), dtype=z.dtype))
        a_s, s_s = (c.view(-1, 1, 1, 1) for c in sched.alpha_sigma(grid[k - 1].expand(z.shape[0]), dtype=z.dtype))
        x = x_pred.clamp(-1, 1) if clip_x else x_pred
        z = a_s * x + s_s * (z - a_t * x) / s_t
    return z


@pytest.mark.parametrize("clip_x", [False, True])
@pytest.mark.parametrize("clip_output", [None, False, True])
def test_ddim_sample_discrete_ends_at_index_zero_and_clips_only_when_asked(clip_x, clip_output):
    sched = DiscreteSchedule.cosine(16)
    noise = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    x_pred = torch.tensor([5.0, 0.5, -3.0, 0.0], dtype=torch.float64).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    seen = []
    out = ddim_sample(lambda z, t: x_pred, noise, 4, schedule=sched, prediction_type="x", clip_x=clip_x,
                      clip_output=clip_output,
                      callback=lambda k, t, o: seen.append(float(t[0])))
    assert seen == [16.0, 12.0, 8.0, 4.0]
    ref = _reference_sampler(x_pred, noise, sched.grid(4).double(), sched, clip_x)
    final_clip = clip_x if clip_output is None else clip_output
    torch.testing.assert_close(out, ref.clamp(-1, 1) if final_clip else ref, rtol=1e-12, atol=1e-12)
    if not clip_x:  # index 0 is nearly noise-free, so the unclipped result is near x_pred = 5 there
        assert bool((ref.abs() > 1).any())
        assert float(out.abs().max()) == (1.0 if final_clip else float(ref.abs().max()))


def test_bad_inputs():
    sched = DiscreteSchedule.cosine(16)
    z = torch.randn(SHAPE)
    t = torch.full((B,), 8.0)
    with pytest.raises(ValueError, match="model_output and z_t must have the same shape"):
        ddim_step(torch.randn(2, 2, 4, 4), z, t, t, schedule=sched, prediction_type="x")
    with pytest.raises(ValueError, match=r"t must have shape \[3\]"):
        ddim_step(z, z, torch.full((2,), 8.0), t, schedule=sched, prediction_type="x")
    with pytest.raises(ValueError, match=r"s must have shape \[3\]"):
        ddim_step(z, z, t, t[:, None], schedule=sched, prediction_type="x")
    with pytest.raises(ValueError, match="s must lie in"):
        ddim_step(z, z, t, torch.full((B,), 20.0), schedule=sched, prediction_type="x")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DDIMStep(sched, prediction_type="score")
    with pytest.raises(ValueError, match="eta must be"):
        DDIMStep(sched, prediction_type="x", eta=-1)
    with pytest.raises(TypeError, match="schedule must be"):
        DDIMStep("cosine", prediction_type="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="noise contains NaN or infinite values"):
        ddim_sample(lambda z, t: z, torch.full(SHAPE, float("nan")), 4, schedule=sched, prediction_type="x")
    with pytest.raises(ValueError, match="num_steps=5 must divide"):
        ddim_sample(lambda z, t: z, z, 5, schedule=sched, prediction_type="x")


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


def test_noise_and_generator_together_are_refused():
    sched = CosineSchedule()
    z = torch.randn(SHAPE)
    t, s = torch.full((B,), 0.8), torch.full((B,), 0.4)
    with pytest.raises(ValueError, match="both noise and generator"):
        ddim_step(z, z, t, s, schedule=sched, prediction_type="x", eta=1.0, noise=torch.randn(SHAPE),
                  generator=torch.Generator())
    with pytest.raises(ValueError, match="both noise and generator"):
        DDIMStep(sched, prediction_type="x", eta=1.0)(z, z, t, s, noise=torch.randn(SHAPE), generator=torch.Generator())
    with pytest.raises(ValueError, match="noise and z_t must have the same shape"):
        ddim_step(z, z, t, s, schedule=sched, prediction_type="x", eta=1.0, noise=torch.randn(B, 1, 4, 4))
    with pytest.raises(ValueError, match="noise contains NaN"):
        ddim_step(z, z, t, s, schedule=sched, prediction_type="x", eta=1.0, noise=torch.full(SHAPE, float("nan")))


@pytest.mark.parametrize("eta", [float("inf"), float("nan"), -0.5, True, "1", None])
def test_eta_must_be_a_finite_number(eta):
    sched = CosineSchedule()
    z = torch.randn(SHAPE)
    t, s = torch.full((B,), 0.8), torch.full((B,), 0.4)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        ddim_step(z, z, t, s, schedule=sched, prediction_type="x", eta=eta)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        DDIMStep(sched, prediction_type="x", eta=eta)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        ddim_sample(lambda z, t: z, z, 2, schedule=sched, prediction_type="x", eta=eta)


def test_bad_flags_are_refused():
    sched = CosineSchedule()
    z = torch.randn(SHAPE)
    t, s = torch.full((B,), 0.8), torch.full((B,), 0.4)
    with pytest.raises(ValueError, match="clip_x must be True or False; got 'no'"):
        ddim_step(z, z, t, s, schedule=sched, prediction_type="x", clip_x="no")
    with pytest.raises(ValueError, match="clip_output must be True or False"):
        ddim_sample(lambda z, t: z, z, 2, schedule=sched, prediction_type="x", clip_output=1)
    with pytest.raises(TypeError, match="model_kwargs must be a mapping"):
        ddim_sample(lambda z, t: z, z, 2, schedule=sched, prediction_type="x", model_kwargs=["y"])
    with pytest.raises(TypeError, match="schedule must be a kdiff NoiseSchedule"):
        ddim_step(z, z, t, s, schedule="cosine", prediction_type="x")


@pytest.mark.parametrize(
    "out_shape, learned_variance",
    [((3, 4, 4, 4), True), ((3, 1, 4, 4), False), ((1, 2, 4, 4), False)],
    ids=["2C-channels", "one-channel", "batch-of-one"],
)
def test_ddim_sample_names_the_model_on_a_wrong_output_shape(out_shape, learned_variance):
    model = lambda z, t: torch.zeros(out_shape)  # noqa: E731
    with pytest.raises(ValueError, match=r"model output must have the shape of z_t \(3, 2, 4, 4\)") as err:
        ddim_sample(model, torch.randn(SHAPE), 2, schedule=CosineSchedule(), prediction_type="x")
    assert str(out_shape) in str(err.value)
    assert ("learned-variance" in str(err.value)) == learned_variance
    # The hint is right: the first C channels of a learned-variance output sample fine.
    if learned_variance:
        out = ddim_sample(lambda z, t: model(z, t)[:, :2], torch.randn(SHAPE), 2, schedule=CosineSchedule(),
                          prediction_type="x")
        assert out.shape == SHAPE


def test_prediction_type_is_a_required_keyword():
    sched = CosineSchedule()
    z, t, s = torch.randn(SHAPE), torch.full((B,), 0.8), torch.full((B,), 0.4)
    with pytest.raises(TypeError, match="prediction_type"):
        ddim_step(z, z, t, s, schedule=sched)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="prediction_type"):
        DDIMStep(sched)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="prediction_type"):
        ddim_sample(lambda z, t: z, z, 2, schedule=sched)  # type: ignore[call-arg]
    # The type decides the result: the same output read as x, eps or v gives three different steps.
    steps = [ddim_step(z, z, t, s, schedule=sched, prediction_type=kind).prev_sample for kind in PREDICTION_TYPES]
    assert not torch.allclose(steps[0], steps[1]) and not torch.allclose(steps[1], steps[2])


@pytest.mark.parametrize("n", [1, 3, 7])
def test_ddim_sample_on_a_trailing_grid_ends_on_the_clean_point(n):
    """DDPM table (T = 1000, clean t = 0): any N steps on grid(N); an eps oracle lands exactly on x."""
    sched = DiscreteSchedule.linear(1000)
    x = torch.rand(2, 1, 2, 2, dtype=torch.float64) * 2 - 1

    def eps_oracle(z, t):
        a, s = (c.view(-1, 1, 1, 1) for c in sched.alpha_sigma(t, dtype=torch.float64))
        return (z - a * x) / s

    seen = []
    out = ddim_sample(eps_oracle, torch.randn(2, 1, 2, 2, dtype=torch.float64), n, schedule=sched,
                      prediction_type="eps", clip_x=False, callback=lambda k, t, o: seen.append(float(t[0])))
    assert seen == sched.grid(n).flip(0)[:-1].tolist()
    torch.testing.assert_close(out, x, rtol=0, atol=1e-9)
