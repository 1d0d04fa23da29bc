"""The bound in bits/dim: against the data's entropy, a perfect x_0 oracle, and its Monte Carlo estimate."""

import math

import pytest
import torch

from ddpm import GaussianDiffusion, make_betas, nll, nll_estimate

GRID = torch.linspace(-1, 1, 256, dtype=torch.float64)


def discretised_gaussian_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Data whose every dimension is iid on the 256 levels with p(k) ~ N(k; 0.1, 0.3^2); its log-probabilities."""
    logp = torch.distributions.Normal(0.1, 0.3).log_prob(GRID)
    logp = logp - logp.logsumexp(0)
    idx = torch.multinomial(logp.exp(), n * 16, replacement=True, generator=generator)
    return GRID[idx].reshape(n, 1, 4, 4), logp


def bayes_optimal_eps(d: GaussianDiffusion, logp: torch.Tensor):
    """E[eps | x_t] for the data above, from the exact posterior over the 256 levels."""
    abar = d.schedule.alphas_cumprod

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar[t].reshape(-1, 1, 1, 1, 1)
        logits = logp - (x.unsqueeze(-1) - a.sqrt() * GRID) ** 2 / (2 * (1 - a))
        x0_mean = (logits.softmax(-1) * GRID).sum(-1)
        a = a.squeeze(-1)
        return (x - a.sqrt() * x0_mean) / (1 - a).sqrt()

    return model


def test_bound_of_the_optimal_denoiser_is_above_the_entropy_and_below_a_poor_one() -> None:
    g = torch.Generator().manual_seed(0)
    d = GaussianDiffusion(make_betas("linear", 200))
    x0, logp = discretised_gaussian_data(64, g)
    entropy_bits = (-(logp.exp() * logp).sum() / math.log(2)).item()
    optimal = nll(d, bayes_optimal_eps(d, logp), x0, generator=g)
    poor = nll(d, lambda x, t: torch.zeros_like(x), x0, generator=g)
    assert optimal.total_bpd.shape == (64,) and optimal.terms_bpd.shape == (64, 200)
    torch.testing.assert_close(optimal.total_bpd, optimal.prior_bpd + optimal.decoder_bpd + optimal.kl_bpd)
    # The bound holds in expectation; the sample's own exact NLL removes the data-sampling noise.
    sample_nll = -logp[((x0.flatten(1) + 1) * 127.5).round().long()].mean(1) / math.log(2)
    gap = optimal.total_bpd - sample_nll
    assert gap.mean() > 3 * gap.std() / math.sqrt(64)
    assert optimal.total_bpd.mean() > entropy_bits
    assert optimal.total_bpd.mean() < poor.total_bpd.mean() - 5


def test_perfect_x0_oracle_leaves_only_prior_and_decoder() -> None:
    d = GaussianDiffusion(make_betas("linear", 100), prediction="x0")
    x0 = torch.randint(1, 255, (4, 1, 3, 3)).double() / 127.5 - 1  # interior bins
    out = nll(d, lambda x, t: x0.repeat(x.shape[0] // 4, 1, 1, 1), x0, max_batch_size=4)
    assert out.kl_bpd.abs().max() < 1e-9
    torch.testing.assert_close(out.total_bpd, out.prior_bpd + out.decoder_bpd)
    # the decoder is N(x_0, beta-tilde_1) (index 0's clipped variance): a centred bin of half-width 1/255
    sigma = math.exp(0.5 * d.schedule.posterior_log_variance_clipped[0].item())
    mass = math.erf(1 / 255 / sigma / math.sqrt(2))
    torch.testing.assert_close(out.decoder_bpd, torch.full((4,), -math.log2(mass), dtype=torch.float64))


def test_respaced_bound_has_its_own_terms() -> None:
    d = GaussianDiffusion(make_betas("linear", 1000))
    x0 = torch.rand(3, 1, 2, 2) * 2 - 1
    r = nll(d.respaced(10), lambda x, t: 0.5 * x, x0)
    assert r.terms_bpd.shape == (3, 10) and torch.isfinite(r.total_bpd).all()


@pytest.mark.parametrize("method", ["importance", "stratified"])
def test_estimate_is_unbiased_and_its_error_bars_are_honest(method: str) -> None:
    T, n = 100, 16
    d = GaussianDiffusion(make_betas("linear", T))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (n, 1, 2, 2), generator=g).double() / 127.5 - 1
    model = lambda x, t: 0.7 * x  # noqa: E731
    # "exact": all T terms, averaged over x_t draws so that its own noise is negligible
    exact = torch.stack([nll(d, model, x0, generator=g).total_bpd for _ in range(100)]).mean(0)
    estimates = [
        nll_estimate(d, model, x0, 40, method=method, generator=torch.Generator().manual_seed(100 + r))
        for r in range(40)
    ]
    totals = torch.stack([e.total_bpd for e in estimates])
    stderr = torch.stack([e.stderr_bpd for e in estimates])
    # unbiased: the mean of 40 estimates is within a few standard errors of the exact value
    z = (totals.mean(0) - exact) / (stderr.pow(2).mean(0).sqrt() / math.sqrt(40))
    assert z.abs().mean() < 1.5
    coverage = ((totals - exact).abs() < 2 * stderr).double().mean().item()
    if method == "importance":
        assert 0.90 <= coverage <= 0.99, coverage
    else:  # documented: optimistic with few strata
        assert 0.75 <= coverage <= 0.99, coverage
    mean, se = estimates[0].mean_and_stderr()
    assert abs(mean - exact.mean().item()) < 4 * se


def test_bound_rejects_bad_data() -> None:
    d = GaussianDiffusion(make_betas("linear", 10 * 10))
    model = lambda x, t: x  # noqa: E731
    with pytest.raises(ValueError, match="non-finite"):
        nll(d, model, torch.tensor([[[[float("nan")]]]]))
    with pytest.raises(ValueError, match=r"\[-1, 1\].*\[0, 2\]"):
        nll(d, model, torch.tensor([[[[0.0, 2.0]]]]))
    with pytest.raises(ValueError, match=r"8-bit images \[B, C, H, W\]; got data of shape \[1, 2\]"):
        nll(d, model, torch.tensor([[0.0, 0.5]]))  # vectors have no 256-level decoder
    with pytest.raises(ValueError, match="even num_terms"):
        nll_estimate(d, model, torch.zeros(1, 1, 1, 1), 3, method="stratified")
    with pytest.raises(ValueError, match="unknown method 'halton'"):
        nll_estimate(d, model, torch.zeros(1, 1, 1, 1), 4, method="halton")  # type: ignore[arg-type]


def test_per_example_generators_make_the_bound_independent_of_batching() -> None:
    d = GaussianDiffusion(make_betas("linear", 30))
    x0 = torch.randint(0, 256, (5, 1, 2, 2)).double() / 127.5 - 1
    model = lambda x, t: 0.5 * x  # noqa: E731
    gens = lambda idx: [torch.Generator().manual_seed(100 + i) for i in idx]  # noqa: E731
    whole = nll(d, model, x0, generator=gens(range(5)), max_batch_size=7)
    part = nll(d, model, x0[3:], generator=gens([3, 4]), max_batch_size=64)
    torch.testing.assert_close(whole.terms_bpd[3:], part.terms_bpd)
    for method in ("importance", "stratified"):
        a = nll_estimate(d, model, x0, 6, method=method, generator=gens(range(5)), max_batch_size=4)
        b = nll_estimate(d, model, x0[3:], 6, method=method, generator=gens([3, 4]))
        torch.testing.assert_close(a.total_bpd[3:], b.total_bpd)
