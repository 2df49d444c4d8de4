"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from kdiff import CosineSchedule, DiscreteSchedule

PREDICTION_TYPES = ("x", "eps", "v")


def schedules() -> st.SearchStrategy:
    """Continuous (clipped or exact) and discrete (cosine, linear-beta) schedules with T = 2^k * 3^j."""
    return st.one_of(
        st.just(CosineSchedule()),
        st.just(CosineSchedule(logsnr_min=None, logsnr_max=None)),
        st.sampled_from([8, 16, 64, 1024, 48]).map(DiscreteSchedule.cosine),
        st.sampled_from([32, 96]).map(lambda T: DiscreteSchedule.linear(T)),
    )


@st.composite
def tensors(draw, shape, *, scale=3.0):
    """A float64 tensor with a seed drawn by hypothesis (fast to generate, reproducible)."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale


@st.composite
def interior_times(draw, schedule, batch):
    """Times strictly inside the schedule, where alpha_t and sigma_t are both clearly > 0."""
    if schedule.is_discrete:
        T = schedule.num_timesteps
        vals = draw(st.lists(st.integers(1, T - 1), min_size=batch, max_size=batch))
        return torch.tensor(vals, dtype=torch.float64)
    vals = draw(st.lists(st.floats(0.02, 0.98), min_size=batch, max_size=batch))
    return torch.tensor(vals, dtype=torch.float64)
