import re
import warnings

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from kdiff import CosineSchedule, DiscreteSchedule, NoiseSchedule, ProgressiveDistiller, ddim_step
from kdiff.functional import add_noise, pd_loss, pd_target, resolve_weighting
from kdiff.parameterization import convert

from strategies import PREDICTION_TYPES, schedules, tensors

SHAPE = (5, 2, 3, 3)
X = {"teacher_prediction": "x", "student_prediction": "x"}  # an x teacher and an x student


def step_counts(sched, candidates=(1, 2, 3, 4, 8, 16, 24)):
    """Student step counts N the schedule allows with its 2N-step teacher."""
    allowed = []
    for n in candidates:
        try:
            sched.check_num_steps(n)
            sched.check_num_steps(2 * n)
        except ValueError:
            continue
        allowed.append(n)
    return allowed


def make_teacher(seed: int):
    """An arbitrary nonlinear, time-dependent 'network' (float64), and a record of its calls."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(2, 2, generator=g, dtype=torch.float64)
    b = torch.randn(2, generator=g, dtype=torch.float64)
    calls = []

    def teacher(z, t, y=None):
        calls.append(t)
        tt = t.to(z.dtype).view(-1, 1, 1, 1) / 100.0
        h = torch.einsum("oc,bchw->bohw", w, z) + b.view(1, -1, 1, 1)
        out = torch.tanh(h) * (1 + tt) + 0.1 * torch.sin(3 * tt) * z
        return out if y is None else out + y.view(-1, 1, 1, 1)

    return teacher, calls


@given(
    sched=schedules(),
    data=st.data(),
    teacher_kind=st.sampled_from(PREDICTION_TYPES),
    student_kind=st.sampled_from(PREDICTION_TYPES),
)
def test_student_step_with_x_tilde_reproduces_teacher_two_steps(sched, data, teacher_kind, student_kind):
    n = data.draw(st.sampled_from(step_counts(sched)))
    teacher, _ = make_teacher(data.draw(st.integers(0, 1000)))
    x = data.draw(tensors(SHAPE, scale=1.0))
    with warnings.catch_warnings():  # an eps student under the auto weighting never warns
        warnings.simplefilter("error")
        pd = ProgressiveDistiller(teacher, teacher, sched, n, teacher_prediction=teacher_kind,
                                  student_prediction=student_kind)
    k = torch.tensor(data.draw(st.lists(st.integers(1, n), min_size=SHAPE[0], max_size=SHAPE[0])))
    t = pd.student_grid[k]
    # An eps-predicting student cannot express x where alpha_t ~ 0 (x_hat = (z - sigma eps) / alpha):
    # the exact cosine schedule has alpha_1 = 6e-17. That is the parameterization's limit, not PD's.
    assume(student_kind != "eps" or float(sched.alpha(t, dtype=torch.float64).min()) > 1e-8)
    out = pd(x, t=t)
    # The times are the schedule's nested grids: t' on the 2N-step grid between t and t''.
    assert torch.equal(out.t_mid, sched.grid(2 * n)[2 * k - 1]) and torch.equal(out.t_next, sched.grid(n)[k - 1])
    # A student whose output is x_tilde (expressed in its own parameterization) takes ONE DDIM step t -> t''.
    student_pred = convert(out.x_target, out.z_t, out.alpha_t, out.sigma_t, source="x", target=student_kind)
    one_step = ddim_step(student_pred, out.z_t, out.t, out.t_next, schedule=sched, prediction_type=student_kind)
    scale = 1.0 + out.z_next.abs().max()
    torch.testing.assert_close(one_step.prev_sample / scale, out.z_next / scale, rtol=0, atol=1e-9)
    # And the teacher's two steps are what DDIM gives when called directly.
    t_mid = out.t_mid
    z_mid = ddim_step(teacher(out.z_t, out.t), out.z_t, out.t, t_mid, schedule=sched, prediction_type=teacher_kind).prev_sample
    z_two = ddim_step(teacher(z_mid, t_mid), z_mid, t_mid, out.t_next, schedule=sched, prediction_type=teacher_kind).prev_sample
    torch.testing.assert_close(z_two, out.z_next, rtol=1e-10, atol=1e-10)


def test_sigma_next_zero_case():
    """Exact cosine schedule: the last step lands at t'' = 0 where sigma = 0, so x_tilde = z_t'' / alpha_t''."""
    sched = CosineSchedule(logsnr_min=None, logsnr_max=None)
    teacher, _ = make_teacher(0)
    x = torch.randn(SHAPE, dtype=torch.float64)
    pd = ProgressiveDistiller(teacher, teacher, sched, 4, **X)
    out = pd(x, t=torch.full((5,), 0.25, dtype=torch.float64))
    assert float(out.t_next.abs().max()) == 0.0
    torch.testing.assert_close(out.x_target, out.z_next)  # alpha_0 = 1
    a, s = sched.alpha_sigma(torch.tensor([0.0]), dtype=torch.float64)
    assert float(s) == 0.0 and float(a) == 1.0
    x_tilde, _ = pd_target(out.z_t, out.z_next, out.alpha_t, out.sigma_t, torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(x_tilde, out.z_next)


def test_explicit_times_and_noise_are_used_and_reproducible():
    sched = DiscreteSchedule.cosine(64)
    teacher, calls = make_teacher(1)
    student = torch.nn.Conv2d(2, 2, 1).double()
    pd = ProgressiveDistiller(teacher, lambda z, t: student(z), sched, 8, **X)
    x, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    t = torch.tensor([8.0, 16, 24, 64, 32], dtype=torch.float64)
    out = pd(x, t=t, noise=eps)
    a, s = sched.alpha_sigma(t, dtype=torch.float64)
    torch.testing.assert_close(out.z_t, a.view(-1, 1, 1, 1) * x + s.view(-1, 1, 1, 1) * eps)
    assert torch.equal(calls[0], t) and torch.equal(calls[1], t - 4) and torch.equal(out.t_next, t - 8)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    o1, o2 = pd(x, generator=g1), pd(x, generator=g2)
    assert torch.equal(o1.t, o2.t) and torch.equal(o1.z_t, o2.z_t) and torch.equal(o1.loss, o2.loss)
    assert set((o1.t / 8).tolist()) <= set(range(1, 9))


def test_gradients_reach_student_only_and_nothing_of_teacher_is_kept():
    sched = CosineSchedule()
    teacher_net = torch.nn.Conv2d(2, 2, 1)
    student_net = torch.nn.Conv2d(2, 2, 1)
    pd = ProgressiveDistiller(lambda z, t: teacher_net(z), lambda z, t: student_net(z), sched, 4, **X)
    out = pd(torch.randn(4, 2, 3, 3))
    assert not out.x_target.requires_grad and not out.z_next.requires_grad
    out.loss.backward()
    assert teacher_net.weight.grad is None and student_net.weight.grad is not None


@pytest.mark.parametrize("weighting", ["truncated_snr", "snr_plus_one", "x_mse", "eps_mse"])
def test_weightings_match_definitions(weighting):
    sched = DiscreteSchedule.cosine(32)
    teacher, _ = make_teacher(2)
    student = torch.nn.Conv2d(2, 2, 1).double()
    warns = weighting != "eps_mse"  # the x-scale weightings put 1/SNR or more on an eps student's error
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pd = ProgressiveDistiller(teacher, lambda z, t: student(z), sched, 4, teacher_prediction="x",
                                  student_prediction="eps", weighting=weighting)
    assert [issubclass(w.category, UserWarning) and "eps_mse" in str(w.message) for w in caught] == ([True] if warns else [])
    assert pd.weighting == weighting  # an explicit choice is kept
    out = pd(torch.randn(SHAPE, dtype=torch.float64), generator=torch.Generator().manual_seed(0))
    x_err = (out.x_pred - out.x_target).square().flatten(1).mean(1)
    eps_err = (out.eps_pred - out.eps_target).square().flatten(1).mean(1)
    a, s = out.alpha_t.view(-1, 1, 1, 1), out.sigma_t.view(-1, 1, 1, 1)
    v_err = ((a * out.eps_pred - s * out.x_pred) - (a * out.eps_target - s * out.x_target)).square().flatten(1).mean(1)
    expected = {"truncated_snr": torch.maximum(x_err, eps_err), "snr_plus_one": v_err, "x_mse": x_err, "eps_mse": eps_err}[weighting]
    torch.testing.assert_close(out.loss_per_sample, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=1e-9, atol=1e-12)


def test_class_conditional_kwargs_pass_through():
    teacher, calls = make_teacher(3)
    seen = []

    def student(z, t, y=None):
        seen.append(y)
        return z

    y = torch.arange(5)
    pd = ProgressiveDistiller(lambda z, t, y: teacher(z, t, y=y.double()), student, DiscreteSchedule.cosine(16), 2, **X)
    pd(torch.randn(SHAPE, dtype=torch.float64), model_kwargs={"y": y})
    assert len(calls) == 2 and seen[0] is y


def test_next_round_halves_and_promotes_student():
    teacher_net, student_net = torch.nn.Conv2d(2, 2, 1), torch.nn.Conv2d(2, 2, 1)
    pd = ProgressiveDistiller(teacher_net, student_net, DiscreteSchedule.cosine(16), 4, teacher_prediction="x", student_prediction="v")
    nxt = pd.next_round()
    assert nxt.num_student_steps == 2 and nxt.teacher is student_net
    assert nxt.student is not student_net and torch.equal(nxt.student.weight, student_net.weight)
    assert nxt.teacher_prediction == "v" and not student_net.training
    assert not any(p.requires_grad for p in student_net.parameters())
    last = ProgressiveDistiller(teacher_net, student_net, DiscreteSchedule.cosine(16), 1, **X)
    with pytest.raises(ValueError, match="num_student_steps=1 is odd"):
        last.next_round()


def test_pd_loss_validation():
    with pytest.raises(ValueError, match="weighting must be one of"):
        pd_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.ones(2), weighting="snr")
    with pytest.raises(ValueError, match="x_hat and x_tilde must have the same shape"):
        pd_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2), torch.ones(2))


def test_bad_configuration_and_inputs():
    sched = DiscreteSchedule.cosine(16)
    f = lambda z, t: z  # noqa: E731
    with pytest.raises(ValueError, match="num_student_steps=3 must divide"):
        ProgressiveDistiller(f, f, sched, 3, **X)
    with pytest.raises(ValueError, match=r"2 \* num_student_steps \(teacher steps\)=32 must divide"):
        ProgressiveDistiller(f, f, sched, 16, **X)
    with pytest.raises(ValueError, match="num_student_steps must be a positive int"):
        ProgressiveDistiller(f, f, CosineSchedule(), 0, **X)
    with pytest.raises(ValueError, match="weighting must be one of"):
        ProgressiveDistiller(f, f, sched, 4, weighting="snr", **X)
    with pytest.raises(ValueError, match="teacher_prediction must be one of"):
        ProgressiveDistiller(f, f, sched, 4, teacher_prediction="noise", student_prediction="x")
    with pytest.raises(TypeError, match="teacher must be callable"):
        ProgressiveDistiller(None, f, sched, 4, **X)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="schedule must be"):
        ProgressiveDistiller(f, f, "cosine", 4, **X)  # type: ignore[arg-type]
    pd = ProgressiveDistiller(f, f, sched, 4, **X)
    x = torch.randn(3, 1, 2, 2)
    with pytest.raises(ValueError, match=r"t must have shape \[3\]"):
        pd(x, t=torch.tensor([4.0, 8.0]))
    with pytest.raises(ValueError, match="t must lie in"):
        pd(x, t=torch.tensor([4.0, 8.0, 20.0]))
    with pytest.raises(ValueError, match="t must lie on the student's grid"):
        pd(x, t=torch.tensor([4.0, 8.0, 6.0]))
    with pytest.raises(ValueError, match="t must lie on the student's grid"):
        pd(x, t=torch.tensor([0.0, 8.0, 4.0]))
    with pytest.raises(ValueError, match="noise and x must have the same shape"):
        pd(x, noise=torch.randn(3, 1, 2, 3))
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        pd(torch.full((3, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="noise contains NaN or infinite values"):
        pd(x, noise=torch.full((3, 1, 2, 2), float("inf")))
    with pytest.raises(ValueError, match="x must be a floating tensor"):
        pd(torch.ones(3, dtype=torch.long))


def test_float32_and_autocast_bf16():
    sched = DiscreteSchedule.cosine(64)
    teacher_net, student_net = torch.nn.Conv2d(2, 2, 1), torch.nn.Conv2d(2, 2, 1)
    pd = ProgressiveDistiller(lambda z, t: teacher_net(z), lambda z, t: student_net(z), sched, 8, teacher_prediction="eps", student_prediction="x")
    x = torch.randn(4, 2, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pd(x)
    assert out.loss.dtype == torch.float32 and out.x_target.dtype == torch.float32
    assert bool(torch.isfinite(out.loss))
    out.loss.backward()
    assert student_net.weight.grad is not None and bool(torch.isfinite(student_net.weight.grad).all())


# ------------------------------------------------------------------ target() and the split of a step
def test_call_composes_sample_times_sample_noise_target_and_pd_loss():
    """pd(x, generator=g) is exactly: draw t, then eps, then target(), then the student's pd_loss."""
    sched = DiscreteSchedule.cosine(64)
    teacher, _ = make_teacher(4)
    student = torch.nn.Conv2d(2, 2, 1).double()
    pd = ProgressiveDistiller(teacher, lambda z, t: student(z), sched, 8, teacher_prediction="x", student_prediction="v")
    x = torch.randn(SHAPE, dtype=torch.float64)
    out = pd(x, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = pd.sample_times(SHAPE[0], generator=g)
    eps = pd.sample_noise(x, generator=g)
    assert eps.shape == x.shape and eps.dtype == x.dtype
    tgt = pd.target(x, t, eps)
    for name in ("t", "t_mid", "t_next", "z_t", "z_mid", "z_next", "x_target", "eps_target", "alpha_t", "sigma_t"):
        assert torch.equal(getattr(tgt, name), getattr(out, name)), name
    x_hat = convert(student(tgt.z_t), tgt.z_t, tgt.alpha_t, tgt.sigma_t, source="v", target="x")
    torch.testing.assert_close(pd_loss(x_hat, tgt.x_target, tgt.alpha_t, tgt.sigma_t), out.loss, rtol=1e-12, atol=0)


def test_target_is_teacher_only_and_defines_the_one_step_target():
    sched = CosineSchedule()
    teacher_net = torch.nn.Conv2d(2, 2, 1).double()
    student_calls = []
    pd = ProgressiveDistiller(lambda z, t: teacher_net(z), lambda z, t: student_calls.append(t), sched, 4, **X)
    x = torch.randn(SHAPE, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.25, 0.5, 0.75, 1.0, 0.5], dtype=torch.float64)
    eps = torch.randn(SHAPE, dtype=torch.float64)
    tgt = pd.target(x, t, eps)
    assert student_calls == []  # the student is not run
    # z_t keeps its gradient to x (the student's input); the teacher side has none.
    assert tgt.z_t.requires_grad
    assert not any(v.requires_grad for v in (tgt.z_mid, tgt.z_next, tgt.x_target, tgt.eps_target))
    a_n, s_n = sched.alpha_sigma(t - 0.25, dtype=torch.float64)
    assert torch.equal(tgt.alpha_next, a_n) and torch.equal(tgt.sigma_next, s_n)
    # One DDIM step t -> t'' with (x_tilde, eps_tilde) lands on the teacher's z_t''.
    one = tgt.alpha_next.view(-1, 1, 1, 1) * tgt.x_target + tgt.sigma_next.view(-1, 1, 1, 1) * tgt.eps_target
    torch.testing.assert_close(one, tgt.z_next, rtol=1e-10, atol=1e-10)


def test_target_validates_its_inputs():
    pd = ProgressiveDistiller(lambda z, t: z, lambda z, t: z, DiscreteSchedule.cosine(16), 4, **X)
    x = torch.randn(3, 1, 2, 2)
    t = torch.full((3,), 4.0)
    with pytest.raises(ValueError, match=r"t must have shape \[3\]"):
        pd.target(x, t[:2], torch.randn_like(x))
    with pytest.raises(ValueError, match="t must lie on the student's grid"):
        pd.target(x, torch.full((3,), 6.0), torch.randn_like(x))
    with pytest.raises(ValueError, match="noise and x must have the same shape"):
        pd.target(x, t, torch.randn(3, 1, 2, 3))
    with pytest.raises(ValueError, match="noise contains NaN"):
        pd.target(x, t, torch.full_like(x, float("nan")))
    with pytest.raises(TypeError, match="model_kwargs must be a mapping"):
        pd.target(x, t, torch.randn_like(x), model_kwargs=[1])  # type: ignore[arg-type]


@pytest.mark.parametrize("teacher_kind", PREDICTION_TYPES)
def test_teacher_half_steps_clip_exactly_like_ddim_step(teacher_kind):
    """clip_teacher_x and ddim_step(clip_x=True) share one implementation: identical half-steps."""
    sched = DiscreteSchedule.cosine(64)
    teacher = lambda z, t: 4.0 * torch.tanh(z) + 0.5  # noqa: E731  (x_hat far outside [-1, 1])
    x = torch.randn(SHAPE, dtype=torch.float64)
    eps = torch.randn(SHAPE, dtype=torch.float64)
    t = torch.tensor([8.0, 16, 24, 64, 32], dtype=torch.float64)
    clipped = ProgressiveDistiller(teacher, teacher, sched, 8, teacher_prediction=teacher_kind, student_prediction="x", clip_teacher_x=True)
    plain = ProgressiveDistiller(teacher, teacher, sched, 8, teacher_prediction=teacher_kind, student_prediction="x")
    tgt = clipped.target(x, t, eps)
    step1 = ddim_step(teacher(tgt.z_t, t), tgt.z_t, t, tgt.t_mid, schedule=sched, prediction_type=teacher_kind, clip_x=True)
    assert step1.pred_x.abs().max() <= 1.0 and torch.equal(step1.prev_sample, tgt.z_mid)
    step2 = ddim_step(teacher(tgt.z_mid, tgt.t_mid), tgt.z_mid, tgt.t_mid, tgt.t_next, schedule=sched,
                      prediction_type=teacher_kind, clip_x=True)
    assert torch.equal(step2.prev_sample, tgt.z_next)
    # The option matters: without it the half-steps differ.
    assert not torch.allclose(plain.target(x, t, eps).z_mid, tgt.z_mid)


# ------------------------------------------------------------------ output shapes and options
@pytest.mark.parametrize(
    "bad_shape, hint",
    [((5, 1, 3, 3), None), ((1, 2, 3, 3), None), ((5, 4, 3, 3), "learned-variance"), ((5, 2, 3), None)],
    ids=["one-channel", "batch-of-one", "learned-variance", "missing-dim"],
)
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_model_outputs_must_have_the_shape_of_z_t(bad_shape, hint, which):
    good = lambda z, t: z  # noqa: E731
    bad = lambda z, t: torch.zeros(bad_shape, dtype=z.dtype)  # noqa: E731
    models = (bad, good) if which == "teacher" else (good, bad)
    pd = ProgressiveDistiller(*models, DiscreteSchedule.cosine(16), 2, **X)
    pattern = rf"{which} output must have the shape of z_t \(5, 2, 3, 3\); got {re.escape(str(bad_shape))}"
    with pytest.raises(ValueError, match=pattern) as err:
        pd(torch.randn(SHAPE))
    if hint:
        assert "learned-variance" in str(err.value) and "first 2 channels" in str(err.value)
    else:
        assert "learned-variance" not in str(err.value)


def test_model_output_must_be_a_tensor():
    pd = ProgressiveDistiller(lambda z, t: z, lambda z, t: (z, z), DiscreteSchedule.cosine(16), 2, **X)
    with pytest.raises(TypeError, match="student output must be a torch.Tensor; got tuple"):
        pd(torch.randn(SHAPE))


@pytest.mark.parametrize("steps", [True, 2.0, "4", None])
def test_num_student_steps_must_be_an_int(steps):
    f = lambda z, t: z  # noqa: E731
    with pytest.raises(ValueError, match="num_student_steps must be a positive int"):
        ProgressiveDistiller(f, f, DiscreteSchedule.cosine(16), steps, **X)  # type: ignore[arg-type]


def test_bad_options_are_refused():
    f = lambda z, t: z  # noqa: E731
    sched = DiscreteSchedule.cosine(16)
    with pytest.raises(ValueError, match="clip_teacher_x must be True or False; got 'yes'"):
        ProgressiveDistiller(f, f, sched, 4, clip_teacher_x="yes", **X)  # type: ignore[arg-type]
    pd = ProgressiveDistiller(f, f, sched, 4, **X)
    x = torch.randn(3, 1, 2, 2)
    with pytest.raises(ValueError, match="generator is unused when both t and noise are given"):
        pd(x, t=torch.full((3,), 4.0), noise=torch.randn_like(x), generator=torch.Generator())
    with pytest.raises(TypeError, match="model_kwargs must be a mapping"):
        pd(x, model_kwargs=("y", 1))  # type: ignore[arg-type]


# ------------------------------------------------------------------ functional primitives
def test_add_noise_is_the_forward_process_and_refuses_broadcasts():
    x, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    a, s = torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    z = add_noise(x, eps, a, s)
    for i in range(5):
        torch.testing.assert_close(z[i], a[i] * x[i] + s[i] * eps[i], rtol=0, atol=0)
    assert torch.equal(add_noise(x, eps, a.view(5, 1, 1, 1), s.view(5, 1, 1, 1)), z)
    torch.testing.assert_close(add_noise(x, eps, a[0], s[0]), a[0] * x + s[0] * eps, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"alpha_t must have shape \[5\]"):
        add_noise(x, eps, a[:1], s)
    with pytest.raises(ValueError, match=r"sigma_t must have shape \[5\]"):
        add_noise(x, eps, a, torch.rand(5, 2, 1, 1))
    with pytest.raises(ValueError, match="noise and x must have the same shape"):
        add_noise(x, eps[:, :1], a, s)
    with pytest.raises(TypeError, match="alpha_t must be a torch.Tensor"):
        add_noise(x, eps, 0.5, s)  # type: ignore[arg-type]


def test_pd_functions_refuse_silent_broadcasts():
    z, a = torch.randn(4, 3, 2, 2), torch.rand(4) + 0.1
    # pd_loss weights a per-example error [B]: [B, 1, 1, 1] coefficients would make it [B, 1, 1, B].
    with pytest.raises(ValueError, match=r"alpha_t must have shape \[4\]"):
        pd_loss(z, z, a.view(4, 1, 1, 1), a)
    with pytest.raises(ValueError, match="z_t2 and z_t must have the same shape"):
        pd_target(z, z[:1], a, a, a, a)
    with pytest.raises(ValueError, match=r"sigma_t2 must have shape \[4\]"):
        pd_target(z, z, a, a, a, a[:2])


# ------------------------------------------------------------------ prediction types and weighting
def test_prediction_types_are_required_keywords():
    f = lambda z, t: z  # noqa: E731
    sched = DiscreteSchedule.cosine(16)
    with pytest.raises(TypeError, match="teacher_prediction"):
        ProgressiveDistiller(f, f, sched, 4, student_prediction="x")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="student_prediction"):
        ProgressiveDistiller(f, f, sched, 4, teacher_prediction="eps")  # type: ignore[call-arg]
    with pytest.raises(TypeError):  # keyword-only: no positional slot to fill by accident
        ProgressiveDistiller(f, f, sched, 4, "x", "x")  # type: ignore[misc]
    with pytest.raises(ValueError, match="student_prediction must be one of 'x', 'eps', 'v'"):
        ProgressiveDistiller(f, f, sched, 4, teacher_prediction="x", student_prediction="score")


@pytest.mark.parametrize(
    "student_kind, resolved",
    [("x", "truncated_snr"), ("v", "truncated_snr"), ("eps", "eps_mse"), ("epsilon", "eps_mse")],
)
def test_auto_weighting_follows_the_student_type(student_kind, resolved):
    sched = DiscreteSchedule.linear(1000)
    teacher, _ = make_teacher(5)
    student = torch.nn.Conv2d(2, 2, 1).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" never warns
        pd = ProgressiveDistiller(teacher, lambda z, t: student(z), sched, 4, teacher_prediction="eps",
                                  student_prediction=student_kind)
    assert pd.weighting == resolved == resolve_weighting("auto", student_kind)
    out = pd(torch.randn(SHAPE, dtype=torch.float64), generator=torch.Generator().manual_seed(1))
    want = pd_loss(out.x_pred, out.x_target, out.alpha_t, out.sigma_t, weighting=resolved, reduction="none")
    torch.testing.assert_close(out.loss_per_sample, want, rtol=1e-12, atol=0)


def test_truncated_snr_on_an_eps_student_weighs_the_noisiest_step_by_one_over_snr():
    """Why "auto" is eps_mse for eps: truncated_snr = max(1, 1/SNR) * eps error, 1/SNR ~ 2.5e4 at t = T."""
    sched = DiscreteSchedule.linear(1000)
    teacher, _ = make_teacher(6)
    student = lambda z, t: torch.zeros_like(z)  # noqa: E731
    with pytest.warns(UserWarning, match="eps_mse"):
        trunc = ProgressiveDistiller(teacher, student, sched, 4, teacher_prediction="eps", student_prediction="eps",
                                     weighting="truncated_snr")
    auto = ProgressiveDistiller(teacher, student, sched, 4, teacher_prediction="eps", student_prediction="eps")
    x = torch.randn(SHAPE, dtype=torch.float64)
    t, eps = torch.full((5,), 1000.0, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    a = trunc(x, t=t, noise=eps).loss_per_sample
    b = auto(x, t=t, noise=eps).loss_per_sample
    snr = (trunc.schedule.alpha(t[:1], dtype=torch.float64) / trunc.schedule.sigma(t[:1], dtype=torch.float64)) ** 2
    torch.testing.assert_close(a, b / snr, rtol=1e-9, atol=0)
    assert float(1 / snr) > 2e4


def test_resolve_weighting_validates():
    with pytest.raises(ValueError, match="weighting must be one of 'auto', 'truncated_snr'"):
        resolve_weighting("snr", "x")
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        resolve_weighting("auto", "score")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_weighting("x_mse", "x") == "x_mse" and resolve_weighting("eps_mse", "eps") == "eps_mse"


def test_next_round_carries_the_student_type_and_re_resolves_auto():
    f = torch.nn.Conv2d(2, 2, 1)
    pd = ProgressiveDistiller(lambda z, t: z, f, DiscreteSchedule.linear(1000), 8, teacher_prediction="eps",
                              student_prediction="eps")
    nxt = pd.next_round()
    assert (nxt.teacher_prediction, nxt.student_prediction, nxt.weighting) == ("eps", "eps", "eps_mse")
    as_v = nxt.next_round(student_prediction="v")
    assert (as_v.teacher_prediction, as_v.student_prediction, as_v.weighting) == ("eps", "v", "truncated_snr")
    fixed = ProgressiveDistiller(lambda z, t: z, f, DiscreteSchedule.linear(1000), 8, teacher_prediction="x",
                                 student_prediction="x", weighting="x_mse")
    assert fixed.next_round().weighting == "x_mse"


# ------------------------------------------------------------------ times on the schedule's grids
@pytest.mark.parametrize("sched", [CosineSchedule(), CosineSchedule(logsnr_min=None, logsnr_max=None),
                                   DiscreteSchedule.cosine(64), DiscreteSchedule.cosine(1024)], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_times_equal_stride_arithmetic_on_uniform_grids(sched, dtype):
    """On a uniform grid t = k T/N, t' = t - stride/2, t'' = t - stride, as before, to float rounding."""
    for n in (1, 2, 4, 8, 16):
        pd = ProgressiveDistiller(lambda z, t: z, lambda z, t: z, sched, n, **X)
        stride = sched.t_max / n
        k = torch.arange(1, n + 1)
        t = pd.student_times(k).to(dtype)
        torch.testing.assert_close(t, k.to(dtype) * stride, rtol=2e-7, atol=0)
        tgt = pd.target(torch.zeros(n, 1, dtype=dtype), t, torch.zeros(n, 1, dtype=dtype))
        torch.testing.assert_close(tgt.t_mid, t - 0.5 * stride, rtol=0, atol=1e-6 * sched.t_max)
        torch.testing.assert_close(tgt.t_next, t - stride, rtol=0, atol=1e-6 * sched.t_max)
        assert tgt.t_mid.dtype == tgt.t_next.dtype == dtype


@pytest.mark.parametrize("n", [1, 3, 5, 8, 125, 500])
def test_trailing_grid_times(n):
    """DDPM table, T = 1000: any N with 2N <= T; times from grid(N) and grid(2N), nested."""
    sched = DiscreteSchedule.linear(1000)
    pd = ProgressiveDistiller(lambda z, t: z, lambda z, t: z, sched, n, teacher_prediction="eps",
                              student_prediction="eps")
    grid, teacher_grid = sched.grid(n), sched.grid(2 * n)
    assert torch.equal(pd.student_grid, grid) and torch.equal(pd.teacher_grid, teacher_grid)
    t = pd.sample_times(64, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and set(t.tolist()) <= set(grid[1:].tolist())
    k = torch.arange(1, n + 1)
    tgt = pd.target(torch.zeros(n, 1), pd.student_times(k), torch.zeros(n, 1))
    assert torch.equal(tgt.t, grid[1:].float())
    assert torch.equal(tgt.t_mid, teacher_grid[2 * k - 1].float()) and torch.equal(tgt.t_next, grid[:-1].float())
    assert bool((tgt.t_next < tgt.t_mid).all() and (tgt.t_mid < tgt.t).all())


def test_trailing_grid_refuses_off_grid_times_and_too_many_steps():
    sched = DiscreteSchedule.linear(1000)
    pd = ProgressiveDistiller(lambda z, t: z, lambda z, t: z, sched, 3, teacher_prediction="eps",
                              student_prediction="eps")
    x = torch.zeros(2, 1)
    on_grid = r"t must lie on the student's grid schedule.grid\(3\)\[k\].*\[333, 667, 1000\]"
    with pytest.raises(ValueError, match=on_grid):
        pd.target(x, torch.tensor([333.0, 334.0]), x)  # 334 is on no 3-step grid point
    with pytest.raises(ValueError, match="t must lie on the student's grid"):
        pd.target(x, torch.tensor([0.0, 333.0]), x)  # t_0 is where a step lands, not where it starts
    with pytest.raises(ValueError, match=r"2 \* num_student_steps \(teacher steps\)=1002 must be at most"):
        ProgressiveDistiller(lambda z, t: z, lambda z, t: z, sched, 501, teacher_prediction="eps",
                             student_prediction="eps")


def test_student_times_validates_its_steps():
    pd = ProgressiveDistiller(lambda z, t: z, lambda z, t: z, DiscreteSchedule.cosine(16), 4, **X)
    assert pd.student_times(torch.tensor([4, 1])).tolist() == [16.0, 4.0]
    with pytest.raises(TypeError, match="k must be an integer tensor"):
        pd.student_times(torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"k must lie in 1..4; got values in \[0, 4\]"):
        pd.student_times(torch.tensor([0, 4]))


class _ShiftedGrid(NoiseSchedule):
    """A continuous schedule whose N-step grid is not part of its 2N-step grid."""

    @property
    def t_max(self) -> float:
        return 1.0

    def _alpha_sigma64(self, t):
        return CosineSchedule()._alpha_sigma64(t)

    def to_dict(self):
        return {"kind": "test"}

    def grid(self, num_steps, *, device=None):
        g = super().grid(num_steps, device=device)
        return g if num_steps % 2 else g ** 1.1


def test_grids_that_are_not_nested_are_refused():
    f = lambda z, t: z  # noqa: E731
    with pytest.raises(ValueError, match="needs nested grids"):
        ProgressiveDistiller(f, f, _ShiftedGrid(), 3, **X)
    ProgressiveDistiller(f, f, _ShiftedGrid(), 2, **X)  # grid(2) ** 1.1 and grid(4) ** 1.1 are nested
