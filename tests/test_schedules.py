import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdiff import CosineSchedule, DiscreteSchedule, LogSNRSchedule, ddim_sample, schedule_from_dict
from kdiff.interop import from_ve_denoiser


def reference_cosine_table(T: int, time_scale: int = 1, s: float = 0.008) -> np.ndarray:
    # docs/method.md, "Schedules", written out with Python floats, independently of the library.
    n = T * time_scale + 1
    f = [math.cos(((i / n) + s) / (1 + s) * math.pi / 2) ** 2 for i in range(n + 1)]
    betas = [min(1 - f[i + 1] / f[i], 0.999) for i in range(n)]
    out, acc = [], 1.0
    for b in betas:
        acc *= 1 - b
        out.append(acc)
    return np.array(out)


def test_discrete_cosine_matches_method_formula_exactly():
    sched = DiscreteSchedule.cosine(1024)
    ref = reference_cosine_table(1024)
    assert sched.num_timesteps == 1024 and ref.shape == (1025,)
    table = sched.alphas_cumprod.numpy()
    np.testing.assert_allclose(table, ref, rtol=1e-12, atol=0)
    # Spot values: index 0 is NOT noise-free, alphabar[0] = 1 - beta_0.
    n = 1025
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    f1 = math.cos(((1 / n) + 0.008) / 1.008 * math.pi / 2) ** 2
    assert table[0] == pytest.approx(f1 / f0, rel=1e-14)
    assert table[0] < 1.0
    t = torch.tensor([0, 1, 512, 1023, 1024])
    alpha, sigma = sched.alpha_sigma(t, dtype=torch.float64)
    np.testing.assert_allclose(alpha.numpy(), np.sqrt(ref[[0, 1, 512, 1023, 1024]]), rtol=1e-14)
    np.testing.assert_allclose(sigma.numpy(), np.sqrt(1 - ref[[0, 1, 512, 1023, 1024]]), rtol=1e-12)


def test_discrete_cosine_time_scale():
    sched = DiscreteSchedule.cosine(8, time_scale=4)
    assert sched.num_timesteps == 32
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), reference_cosine_table(8, 4), rtol=1e-12)


def test_linear_betas_match_ddpm_with_a_clean_point_at_zero():
    sched = DiscreteSchedule.linear(1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    table = sched.alphas_cumprod.numpy()
    # T = 1000 training steps: kdiff time j + 1 is the network's timestep j, and t = 0 is x itself.
    assert sched.num_timesteps == 1000 and table[0] == 1.0
    np.testing.assert_allclose(table[1:], np.cumprod(1 - betas), rtol=1e-12)
    alpha, sigma = sched.alpha_sigma(torch.tensor([0, 1, 1000]), dtype=torch.float64)
    assert alpha.tolist()[0] == 1.0 and sigma.tolist()[0] == 0.0
    np.testing.assert_allclose(alpha.numpy()[1:], np.sqrt(np.cumprod(1 - betas)[[0, 999]]), rtol=1e-12)
    assert sched.model_time(torch.tensor([1.0, 1000.0])).tolist() == [0.0, 999.0]
    assert sched.spacing == "trailing" and sched.model_time_offset == 1


@given(t=st.floats(0.0, 1.0), clip=st.booleans())
def test_cosine_variance_preserving(t, clip):
    sched = CosineSchedule() if clip else CosineSchedule(logsnr_min=None, logsnr_max=None)
    alpha, sigma = sched.alpha_sigma(torch.tensor([t], dtype=torch.float64), dtype=torch.float64)
    assert float(alpha**2 + sigma**2) == pytest.approx(1.0, abs=1e-12)
    if not clip:
        assert float(alpha) == pytest.approx(math.cos(math.pi / 2 * t), abs=1e-15)
    else:
        logsnr = float(sched.logsnr(torch.tensor([t], dtype=torch.float64), dtype=torch.float64))
        assert -20 - 1e-9 <= logsnr <= 20 + 1e-9


@given(i=st.integers(0, 1024))
def test_logsnr_consistent(i):
    sched = DiscreteSchedule.cosine(1024)
    t = torch.tensor([i])
    a, s = sched.alpha_sigma(t, dtype=torch.float64)
    assert float(sched.logsnr(t, dtype=torch.float64)) == pytest.approx(float(torch.log(a**2 / s**2)), rel=1e-12)


def test_dtype_and_float_indices():
    sched = DiscreteSchedule.cosine(64)
    a32 = sched.alpha(torch.tensor([3.0, 64.0]), dtype=torch.float32)
    a64 = sched.alpha(torch.tensor([3, 64]), dtype=torch.float64)
    assert a32.dtype == torch.float32 and a64.dtype == torch.float64
    torch.testing.assert_close(a32, a64.float())


def test_logsnr_monotone_decreasing():
    for sched in (DiscreteSchedule.cosine(128), CosineSchedule(), DiscreteSchedule.linear(100)):
        t = sched.grid(sched.num_timesteps if sched.is_discrete else 50)
        ls = sched.logsnr(t, dtype=torch.float64)
        assert bool((ls[1:] < ls[:-1]).all())


def test_grid():
    assert torch.equal(DiscreteSchedule.cosine(1024).grid(4), torch.tensor([0.0, 256, 512, 768, 1024], dtype=torch.float64))
    torch.testing.assert_close(CosineSchedule().grid(4), torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "sched,bad",
    [
        (CosineSchedule(), [1.5]),
        (CosineSchedule(), [-0.1]),
        (CosineSchedule(), [float("nan")]),
        (DiscreteSchedule.cosine(16), [17]),
        (DiscreteSchedule.cosine(16), [-1]),
        (DiscreteSchedule.cosine(16), [2.5]),
    ],
)
def test_times_outside_schedule_rejected(sched, bad):
    with pytest.raises(ValueError, match="t must"):
        sched.alpha_sigma(torch.tensor(bad))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_steps=3 must divide"):
        DiscreteSchedule.cosine(16).grid(3)
    with pytest.raises(ValueError, match="num_steps"):
        CosineSchedule().grid(0)
    with pytest.raises(ValueError, match="num_timesteps"):
        DiscreteSchedule.cosine(0)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DiscreteSchedule([1.0, 1.5])
    with pytest.raises(ValueError, match="logsnr_min"):
        CosineSchedule(logsnr_min=5, logsnr_max=-5)
    with pytest.raises(ValueError, match="betas"):
        DiscreteSchedule.from_betas([0.0, 0.1])
    with pytest.raises(TypeError, match="t must be a torch.Tensor"):
        CosineSchedule().alpha_sigma(0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kind"):
        schedule_from_dict({"kind": "sigmoid"})


@pytest.mark.parametrize(
    "sched",
    [CosineSchedule(), CosineSchedule(logsnr_min=None, logsnr_max=None), DiscreteSchedule.cosine(32, time_scale=2),
     DiscreteSchedule.linear(50), DiscreteSchedule([0.99, 0.5, 0.1]),
     DiscreteSchedule.from_beta_schedule("squaredcos_cap_v2", 40),
     DiscreteSchedule.from_beta_schedule("scaled_linear", 30, beta_start=0.00085, beta_end=0.012),
     DiscreteSchedule.from_betas(np.full(12, 0.1)), DiscreteSchedule.from_alphas_cumprod([0.9, 0.5, 0.2]),
     LogSNRSchedule.karras(sigma_min=0.01, sigma_max=50.0, rho=5.0)],
)
def test_to_dict_round_trip(sched):
    spec = json.loads(json.dumps(sched.to_dict()))
    rebuilt = schedule_from_dict(spec)
    n = 3 if not sched.is_discrete or sched.spacing == "trailing" else 1
    t = sched.grid(n)
    assert torch.equal(rebuilt.grid(n), t)
    torch.testing.assert_close(rebuilt.alpha_sigma(t, dtype=torch.float64), sched.alpha_sigma(t, dtype=torch.float64),
                               rtol=1e-14, atol=0)
    assert torch.equal(rebuilt.model_time(t), sched.model_time(t))


def test_legacy_discrete_linear_spec_rebuilds_the_clean_point_table():
    spec = {"kind": "discrete_linear", "num_train_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02}
    torch.testing.assert_close(schedule_from_dict(spec).alphas_cumprod, DiscreteSchedule.linear(100).alphas_cumprod)


# ---------------------------------------------------------------------------------------------
# Grids for any step count: nested, so progressive distillation can halve from any even N.


def reference_trailing_grid(T: int, N: int) -> list[int]:
    # round(k T / N) in exact rationals, ties to even (Python's round), as diffusers' np.round.
    return [round(Fraction(k * T, N)) for k in range(N + 1)]


@given(data=st.data(), T=st.integers(1, 100_000))
def test_trailing_grids_are_nested_increasing_and_exact(data, T):
    sched = DiscreteSchedule(np.linspace(1.0, 1e-3, T + 1), spacing="trailing")  # the grid depends on T only
    N = data.draw(st.integers(1, T), label="N")
    grid = sched.grid(N)
    assert grid.tolist() == reference_trailing_grid(T, N)
    assert grid[0] == 0 and grid[-1] == T and bool((grid[1:] > grid[:-1]).all())
    if 2 * N <= T:
        teacher = sched.grid(2 * N)
        assert torch.equal(teacher[::2], grid)  # the N-step grid is a subset of the 2N-step grid
        k = torch.arange(1, N + 1)
        t, t_mid, t_next = sched.pd_times(k, N)
        assert torch.equal(t, grid[1:]) and torch.equal(t_next, grid[:-1])
        assert torch.equal(t_mid, teacher[1::2]) and bool(((t_next < t_mid) & (t_mid < t)).all())
        assert torch.equal(sched.grid_index(t.float(), N), k)


@given(T=st.integers(1, 4096), log2_N=st.integers(0, 12))
def test_halving_chain_stays_nested(T, log2_N):
    sched = DiscreteSchedule.from_alphas_cumprod(np.linspace(0.99, 0.01, T))
    N = 2**log2_N
    if 2 * N > T:
        return
    grids = [sched.grid(N >> i) for i in range(log2_N + 1)]
    for fine, coarse in zip(grids, grids[1:], strict=False):  # N -> N/2 -> ... -> 1
        assert set(coarse.tolist()) <= set(fine.tolist())


def test_uniform_spacing_keeps_the_paper_grid_and_explains_bad_counts():
    sched = DiscreteSchedule.cosine(1024)
    for n in (1, 2, 4, 256, 1024):
        assert torch.equal(sched.grid(n), torch.arange(n + 1, dtype=torch.float64) * (1024 // n))
    with pytest.raises(ValueError, match=r"num_steps=3 must divide the schedule's T=16 \(allowed: divisors of 16: 1, 2, 4, 8, 16\)"):
        DiscreteSchedule.cosine(16).grid(3)


def test_ddpm_table_accepts_every_step_count_up_to_T():
    sched = DiscreteSchedule.linear(1000)
    assert sched.grid(3).tolist() == [0, 333, 667, 1000]
    assert sched.grid(16).tolist()[:3] == [0, 62, 125]  # 62.5 rounds to even
    assert torch.equal(sched.grid(1000), torch.arange(1001, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"num_steps=1001 must be at most the schedule's T=1000 \(allowed: 1..1000\)"):
        sched.grid(1001)
    with pytest.raises(ValueError, match=r"2 \* num_steps \(teacher steps\)=1002 must be at most"):
        sched.pd_times(torch.tensor([1]), 501)


def test_pd_times_continuous_match_the_pd_formula():
    sched = CosineSchedule()
    k = torch.tensor([1, 2, 4])
    t, t_mid, t_next = sched.pd_times(k, 4)
    torch.testing.assert_close(t, k / 4, rtol=0, atol=1e-15, check_dtype=False)
    torch.testing.assert_close(t_mid, k / 4 - 1 / 8, rtol=0, atol=1e-15, check_dtype=False)
    torch.testing.assert_close(t_next, (k - 1) / 4, rtol=0, atol=1e-15, check_dtype=False)
    assert torch.equal(sched.grid_index(t.float(), 4), k)


def test_pd_times_validation():
    sched = DiscreteSchedule.linear(100)
    with pytest.raises(TypeError, match="k must be an integer tensor"):
        sched.pd_times(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match=r"k must lie in 1..4; got values in \[0, 4\]"):
        sched.pd_times(torch.tensor([0, 4]), 4)
    with pytest.raises(ValueError, match=r"k must lie in 1..4"):
        sched.pd_times(torch.tensor([5]), 4)


def test_ddim_sample_runs_any_step_count_on_a_ddpm_table():
    # The sampler reads schedule.grid / check_num_steps only, so N = 3 and 7 work on T = 1000.
    sched = DiscreteSchedule.linear(1000)
    seen = []

    def model(z, t):
        seen.append(t.tolist())
        return torch.full_like(z, 0.25)  # x-prediction

    out = ddim_sample(model, torch.randn(2, 3, 4, 4), 3, schedule=sched, prediction_type="x", clip_x=False)
    assert seen == [[1000.0] * 2, [667.0] * 2, [333.0] * 2]
    # The last step lands on the clean point (alpha = 1, sigma = 0): the output is x_hat itself.
    assert torch.equal(out, torch.full_like(out, 0.25))
    seen.clear()
    ddim_sample(model, torch.randn(1, 3, 4, 4), 7, schedule=sched, prediction_type="x")
    assert [s[0] for s in seen] == reference_trailing_grid(1000, 7)[:0:-1]


def test_ddpm_table_constructors_validate():
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        DiscreteSchedule.from_alphas_cumprod([0.9, 0.5, 0.0])
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteSchedule.from_alphas_cumprod([0.5, 0.9])
    with pytest.raises(ValueError, match="beta_schedule must be one of 'linear', 'scaled_linear', 'squaredcos_cap_v2'"):
        DiscreteSchedule.from_beta_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match="num_train_timesteps must be an int >= 1"):
        DiscreteSchedule.linear(0)
    with pytest.raises(ValueError, match="spacing must be one of"):
        DiscreteSchedule([0.9, 0.5], spacing="leading")  # type: ignore[arg-type]


def test_beta_schedules_match_their_formulas():
    T = 50
    scaled = DiscreteSchedule.from_beta_schedule("scaled_linear", T, beta_start=0.00085, beta_end=0.012)
    betas = [(math.sqrt(0.00085) + j * (math.sqrt(0.012) - math.sqrt(0.00085)) / (T - 1)) ** 2 for j in range(T)]
    np.testing.assert_allclose(scaled.alphas_cumprod.numpy()[1:], np.cumprod([1 - b for b in betas]), rtol=1e-12)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - f((j + 1) / T) / f(j / T), 0.999) for j in range(T)]
    cos = DiscreteSchedule.from_beta_schedule("squaredcos_cap_v2", T)
    np.testing.assert_allclose(cos.alphas_cumprod.numpy()[1:], np.cumprod([1 - b for b in betas]), rtol=1e-12)
    assert betas[-1] == 0.999  # the cap is reached at the last step


# ---------------------------------------------------------------------------------------------
# Continuous-time teachers: logSNR and VE sigma functions on the VP scale.


@given(t=st.floats(0.0, 1.0))
def test_logsnr_schedule_is_vp_with_the_given_logsnr(t):
    sched = LogSNRSchedule(lambda u: 12.0 - 24.0 * u)
    tt = torch.tensor([t], dtype=torch.float64)
    alpha, sigma = sched.alpha_sigma(tt, dtype=torch.float64)
    lam = 12.0 - 24.0 * t
    assert float(alpha**2) == pytest.approx(1 / (1 + math.exp(-lam)), rel=1e-12)
    assert float(alpha**2 + sigma**2) == pytest.approx(1.0, abs=1e-12)
    assert float(sched.logsnr(tt, dtype=torch.float64)) == pytest.approx(lam, abs=1e-12)


def test_from_sigma_is_the_ve_to_vp_conversion():
    sched = LogSNRSchedule.from_sigma(lambda t: 80.0 * t**2)
    t = torch.tensor([0.0, 0.1, 0.5, 1.0], dtype=torch.float64)
    s_ve = 80.0 * t**2
    alpha, sigma = sched.alpha_sigma(t, dtype=torch.float64)
    torch.testing.assert_close(alpha, 1 / torch.sqrt(1 + s_ve**2), rtol=1e-12, atol=0)
    torch.testing.assert_close(sigma, s_ve / torch.sqrt(1 + s_ve**2), rtol=1e-12, atol=0)
    assert alpha[0] == 1.0 and sigma[0] == 0.0  # sigma_ve = 0 is the clean image


def test_karras_schedule_endpoints_and_spacing():
    sched = LogSNRSchedule.karras(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    t = sched.grid(4)
    alpha, sigma = sched.alpha_sigma(t, dtype=torch.float64)
    edm = [(0.002 ** (1 / 7) + k / 4 * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7 for k in range(5)]
    np.testing.assert_allclose((sigma / alpha).numpy(), edm, rtol=1e-12)


def test_logsnr_schedule_errors():
    with pytest.raises(TypeError, match="logsnr_fn must be callable"):
        LogSNRSchedule(3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="logsnr_fn must return a tensor shaped like its input"):
        LogSNRSchedule(lambda t: t.sum()).alpha(torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="logsnr_fn returned NaN"):
        LogSNRSchedule(lambda t: t * float("nan")).alpha(torch.tensor([0.1]))
    with pytest.raises(ValueError, match="has no JSON form"):
        LogSNRSchedule(lambda t: -t).to_dict()
    with pytest.raises(ValueError, match="t must lie in"):
        LogSNRSchedule(lambda t: -t, t_max=2.0).alpha(torch.tensor([2.5]))
    with pytest.raises(ValueError, match="sigma_min must be < sigma_max"):
        LogSNRSchedule.karras(sigma_min=5.0, sigma_max=1.0)


def test_ddim_on_a_ve_schedule_is_edms_euler_sampler():
    # z = alpha (x + sigma_ve n): with D(x; sigma) wrapped as an x-predictor, a DDIM step in VP
    # variables is exactly EDM's Euler step x' = x + (sigma' - sigma) (x - D) / sigma.
    def D(x, sigma):
        s = sigma[:, None, None, None]
        return torch.tanh(x) / (1 + s) + 0.1 * s / (1 + s**2)

    sched = LogSNRSchedule.karras(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    n = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    N = 6
    grid = sched.grid(N)
    alpha, sigma = sched.alpha_sigma(grid, dtype=torch.float64)
    s_ve = (sigma / alpha).tolist()
    x = s_ve[N] * n
    for k in range(N, 0, -1):
        sig = torch.full((2,), s_ve[k], dtype=torch.float64)
        x = x + (s_ve[k - 1] - s_ve[k]) * (x - D(x, sig)) / s_ve[k]
    z0 = ddim_sample(from_ve_denoiser(D, sched), alpha[N] * x.new_tensor(s_ve[N]) * n, N, schedule=sched,
                     prediction_type="x", clip_x=False)
    torch.testing.assert_close(z0 / alpha[0], x, rtol=1e-10, atol=1e-10)
