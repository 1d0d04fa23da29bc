"""Gaussian KL and the discretised decoder against independent references."""

import math

import pytest
import torch
from scipy import integrate, stats

from ddpm import discretized_gaussian_log_likelihood, normal_kl


def test_normal_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(1)
    m1, m2 = torch.randn(100, generator=g), torch.randn(100, generator=g)
    lv1, lv2 = torch.randn(100, generator=g), torch.randn(100, generator=g)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref, rtol=1e-5, atol=1e-6)


def test_normal_kl_special_cases_and_monte_carlo() -> None:
    x = torch.randn(10, dtype=torch.float64)
    assert normal_kl(x, x, x, x).abs().max() < 1e-15
    # equal variances: KL = (m1 - m2)^2 / (2 s)
    assert normal_kl(torch.tensor(1.0), math.log(4.0), 0.0, math.log(4.0)).item() == pytest.approx(1 / 8)
    # equal means: KL = 1/2 (r - 1 - log r), r = s1/s2
    assert normal_kl(torch.tensor(0.0), math.log(2.0), 0.0, 0.0).item() == pytest.approx(0.5 * (2 - 1 - math.log(2)))
    # Monte Carlo: E_p[log p - log q]
    m1, s1, m2, s2 = 0.3, 0.7, -0.2, 1.3
    samples = torch.randn(400_000, dtype=torch.float64) * s1 + m1
    p, q = torch.distributions.Normal(m1, s1), torch.distributions.Normal(m2, s2)
    llr = p.log_prob(samples) - q.log_prob(samples)
    kl = normal_kl(torch.tensor(m1), 2 * math.log(s1), m2, 2 * math.log(s2)).item()
    assert abs(llr.mean().item() - kl) < 5 * llr.std().item() / math.sqrt(samples.numel())


GRID = torch.linspace(-1, 1, 256, dtype=torch.float64)


@pytest.mark.parametrize("mean, scale", [(0.0, 0.01), (0.3, 0.2), (-0.999, 1e-3), (5.0, 0.5), (0.0, 30.0)])
def test_decoder_sums_to_one_over_the_bins(mean: float, scale: float) -> None:
    logp = discretized_gaussian_log_likelihood(
        GRID, torch.full_like(GRID, mean), torch.full_like(GRID, math.log(scale))
    )
    assert torch.isfinite(logp).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-12)


def test_decoder_matches_direct_integration() -> None:
    mean, scale = 0.1, 0.05
    dist = stats.norm(mean, scale)
    logp = discretized_gaussian_log_likelihood(
        GRID, torch.full_like(GRID, mean), torch.full_like(GRID, math.log(scale))
    )
    for k in (100, 126, 140, 160):  # interior bins: integrate the density over the bin
        x = GRID[k].item()
        ref, _ = integrate.quad(dist.pdf, x - 1 / 255, x + 1 / 255, epsabs=1e-15)
        assert logp[k].exp().item() == pytest.approx(ref, rel=1e-7), k
    # edge bins are open-ended: the CDF below the first edge, the survival function above the last
    assert logp[0].item() == pytest.approx(dist.logcdf(-1 + 1 / 255), rel=1e-10)
    assert logp[255].item() == pytest.approx(dist.logsf(1 - 1 / 255), rel=1e-10)


def test_decoder_is_stable_in_both_tails() -> None:
    # Bins 20+ standard deviations away: the tanh approximation gives 0 (log = -inf); ours is exact.
    x = torch.tensor([0.5, -0.5], dtype=torch.float64)
    mean = torch.tensor([-0.5, 0.5], dtype=torch.float64)
    log_scale = torch.full_like(x, math.log(0.04))
    got = discretized_gaussian_log_likelihood(x, mean, log_scale)
    z_lo, z_hi = (1.0 - 1 / 255) / 0.04, (1.0 + 1 / 255) / 0.04
    ref = stats.norm.logsf(z_lo) + math.log1p(-math.exp(stats.norm.logsf(z_hi) - stats.norm.logsf(z_lo)))
    torch.testing.assert_close(got, torch.tensor([ref, ref], dtype=torch.float64), rtol=1e-9, atol=0)


def test_decoder_keeps_dtype_and_has_gradients() -> None:
    x = GRID[::16].float()
    mean = torch.zeros_like(x, requires_grad=True)
    out = discretized_gaussian_log_likelihood(x, mean, torch.full_like(x, -2.0))
    assert out.dtype == torch.float32
    out.sum().backward()
    assert torch.isfinite(mean.grad).all() and mean.grad.abs().sum() > 0
