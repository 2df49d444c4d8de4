import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from kdiff import CosineSchedule, DiscreteSchedule, schedule_from_dict


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


def test_linear_betas_match_ddpm():
    sched = DiscreteSchedule.linear(1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), np.cumprod(1 - betas), rtol=1e-12)
    assert sched.num_timesteps == 999


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
     DiscreteSchedule.linear(50), DiscreteSchedule([0.99, 0.5, 0.1])],
)
def test_to_dict_round_trip(sched):
    import json

    spec = json.loads(json.dumps(sched.to_dict()))
    rebuilt = schedule_from_dict(spec)
    t = sched.grid(1)
    torch.testing.assert_close(rebuilt.alpha_sigma(t, dtype=torch.float64), sched.alpha_sigma(t, dtype=torch.float64))
