"""Schedules: the published endpoints, validation, and respacing as a proper DDPM of its own."""

import math

import pytest
import torch

from ddpm import GaussianDiffusion, make_betas, respace_betas, space_timesteps
from ddpm.schedules import Schedule


def test_linear_matches_ho_et_al_and_scales_with_T() -> None:
    betas = make_betas("linear", 1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    short = make_betas("linear", 250)  # scaled by 1000/T: same total noise
    assert short[0].item() == pytest.approx(4e-4) and short[-1].item() == pytest.approx(0.08)


def test_cosine_follows_nichol_dhariwal_abar() -> None:
    T, s = 1000, 0.008
    sched = Schedule.from_betas(make_betas("cosine", T))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):  # index t is step t+1: abar_{t+1} = f(t+1) / f(0)
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert make_betas("cosine", T).max().item() <= 0.999


@pytest.mark.parametrize(
    "betas, message",
    [
        ([[0.1, 0.2]], "1-D"),
        ([0.1, float("nan")], "finite"),
        ([0.1, 0.0], r"\(0, 1\)"),
        ([0.1, 1.0], r"\(0, 1\)"),
        ([-0.1], r"\(0, 1\)"),
        ([], "non-empty"),
    ],
)
def test_user_betas_are_validated(betas: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_betas(betas)


def test_bad_names_and_sizes() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'.*linear, cosine"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        make_betas("linear", 10)  # 0.02 * 100 = 2: not a variance
    with pytest.raises(ValueError, match="positive"):
        make_betas("linear", 0)


def test_posterior_variance_and_clipping() -> None:
    sched = Schedule.from_betas(make_betas("linear", 100))
    assert sched.posterior_variance[0].item() == 0.0
    assert sched.posterior_log_variance_clipped[0] == sched.posterior_log_variance_clipped[1]
    assert torch.isfinite(sched.posterior_log_variance_clipped).all()
    # beta-tilde_t <= beta_t always
    assert (sched.posterior_variance <= sched.betas).all()


def test_respaced_betas_reproduce_alphas_cumprod() -> None:
    sched = Schedule.from_betas(make_betas("linear", 1000))
    kept = space_timesteps(1000, 50)
    assert kept.numel() == 50 and kept[0] == 0 and kept[-1] == 999
    new = Schedule.from_betas(respace_betas(sched.alphas_cumprod[kept]))
    torch.testing.assert_close(new.alphas_cumprod, sched.alphas_cumprod[kept], rtol=1e-12, atol=0)
    d = GaussianDiffusion(make_betas("linear", 1000)).respaced(50)
    assert d.num_timesteps == 50 and d.timestep_map.tolist() == kept.tolist()
    with pytest.raises(ValueError, match="steps must be in"):
        space_timesteps(10, 11)


def test_prior_is_close_to_standard_normal() -> None:
    x0 = torch.rand(16, 3, 8, 8) * 2 - 1
    for name in ("linear", "cosine"):
        prior = GaussianDiffusion(make_betas(name, 1000)).prior_bpd(x0)
        assert prior.shape == (16,)
        assert (prior >= 0).all() and prior.max() < 1e-4, name
