"""Forward process, posterior, parameterisations and training losses: facts, not 'it runs'."""

import math

import pytest
import torch

from ddpm import GaussianDiffusion, eps_from_x0, make_betas, normal_kl, prediction_target, x0_from_prediction
from ddpm.distributions import discretized_gaussian_log_likelihood
from ddpm.tensors import mean_flat
from ddpm.train.timesteps import LossAwareSampler


def test_stepwise_forward_chain_matches_closed_form() -> None:
    """Running q(x_t | x_{t-1}) t times gives q(x_t | x_0) (Markov property of the seed's appendix)."""
    d = GaussianDiffusion(make_betas("linear", 200))
    n = 100_000
    x0 = torch.tensor([0.8, -0.3, 0.0], dtype=torch.float64).repeat(n, 1)
    g = torch.Generator().manual_seed(3)
    x = x0.clone()
    betas = d.schedule.betas
    for t in range(120):
        x = (1 - betas[t]).sqrt() * x + betas[t].sqrt() * torch.randn(x.shape, generator=g, dtype=torch.float64)
        if t in (0, 29, 119):
            mean, var, _ = d.q_mean_variance(x0[:1], torch.tensor([t]))
            se_mean = (var[0] / n).sqrt()
            se_var = var[0] * math.sqrt(2 / n)
            assert ((x.mean(0) - mean[0]).abs() < 5 * se_mean).all(), t
            assert ((x.var(0) - var[0]).abs() < 5 * se_var).all(), t
    closed = d.q_sample(x0, torch.full((n,), 119), generator=g)
    assert (closed.mean(0) - x.mean(0)).abs().max() < 0.02


@pytest.mark.parametrize("t", [0, 1, 10, 150, 199])
def test_posterior_is_bayes_rule_on_a_grid(t: int) -> None:
    """q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0)."""
    d = GaussianDiffusion(make_betas("linear", 200))
    x0, x_t = torch.tensor([[0.4]], dtype=torch.float64), torch.tensor([[0.1]], dtype=torch.float64)
    mean, var, log_var = d.q_posterior(x0, x_t, torch.tensor([t]))
    if t == 0:  # x_{t-1} is x_0 itself: a point mass
        assert mean.item() == pytest.approx(0.4) and var.item() == 0.0 and math.isfinite(log_var.item())
        return
    s = d.schedule
    grid = torch.linspace(-4, 4, 400_001, dtype=torch.float64)
    beta, abar_prev = s.betas[t], s.alphas_cumprod_prev[t]
    log_lik = -((x_t.item() - (1 - beta).sqrt() * grid) ** 2) / (2 * beta)
    log_prior = -((grid - abar_prev.sqrt() * x0.item()) ** 2) / (2 * (1 - abar_prev))
    w = torch.softmax(log_lik + log_prior, dim=0)
    grid_mean = (w * grid).sum()
    grid_var = (w * (grid - grid_mean) ** 2).sum()
    assert mean.item() == pytest.approx(grid_mean.item(), abs=1e-7)
    assert var.item() == pytest.approx(grid_var.item(), rel=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_prediction_conversions_round_trip(prediction: str) -> None:
    d = GaussianDiffusion(make_betas("cosine", 100))
    x0 = torch.rand(8, 3, 4, 4, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.randint(0, 100, (8,))
    x_t = d.q_sample(x0, t, eps)
    alpha, sigma = d.alpha_sigma(t, x0)
    target = prediction_target(prediction, x0, eps, alpha, sigma)
    torch.testing.assert_close(x0_from_prediction(prediction, target, x_t, alpha, sigma), x0)
    torch.testing.assert_close(eps_from_x0(x_t, x0, alpha, sigma), eps)
    if prediction == "v":  # v = alpha eps - sigma x_0, and eps = sigma x_t + alpha v on alpha^2 + sigma^2 = 1
        torch.testing.assert_close(target, alpha * eps - sigma * x0)
        torch.testing.assert_close(sigma * x_t + alpha * target, eps)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_true_prediction_gives_posterior_mean(prediction: str) -> None:
    d = GaussianDiffusion(make_betas("linear", 100), prediction=prediction)
    x0 = torch.rand(6, 2, 3, 3, dtype=torch.float64) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 1, 5, 50, 98, 99])
    x_t = d.q_sample(x0, t, eps)
    oracle = prediction_target(prediction, x0, eps, *d.alpha_sigma(t, x0))
    out = d.p_mean_variance(lambda x, tt: oracle, x_t, t)
    mean, _, log_var = d.q_posterior(x0, x_t, t)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.log_variance, log_var)  # fixed_small is the posterior's own
    torch.testing.assert_close(out.pred_x0, x0)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_vlb_term_is_kl_and_decoder_of_its_definition(variance: str) -> None:
    loss = "hybrid" if variance == "learned_range" else "simple"
    d = GaussianDiffusion(make_betas("linear", 50), variance=variance, loss=loss)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randint(0, 256, (5, 2, 3, 3), generator=g).double() / 127.5) - 1
    t = torch.tensor([0, 0, 3, 20, 49])
    x_t = d.q_sample(x0, t, generator=g)
    out_ch = 4 if variance == "learned_range" else 2
    raw = torch.randn(5, out_ch, 3, 3, generator=g, dtype=torch.float64).clamp(-1, 1)
    model = lambda x, tt: raw  # noqa: E731
    got = d.vlb_term(model, x0, x_t, t)
    p = d.p_mean_variance(model, x_t, t)
    q_mean, _, q_log_var = d.q_posterior(x0, x_t, t)
    kl = mean_flat(normal_kl(q_mean, q_log_var, p.mean, p.log_variance)) / math.log(2)
    dec = -mean_flat(discretized_gaussian_log_likelihood(x0, p.mean, 0.5 * p.log_variance)) / math.log(2)
    torch.testing.assert_close(got, torch.where(t == 0, dec, kl))
    if variance == "fixed_large":
        assert p.log_variance[2, 0, 0, 0].item() == pytest.approx(math.log(d.schedule.betas[3].item()))


def test_learned_range_interpolates_log_variances() -> None:
    d = GaussianDiffusion(make_betas("linear", 50), variance="learned_range", loss="hybrid")
    x_t, t = torch.zeros(3, 1, 2, 2, dtype=torch.float64), torch.tensor([5, 5, 5])
    v = torch.tensor([-1.0, 1.0, 0.0], dtype=torch.float64).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)
    out = d.p_mean_variance(lambda x, tt: torch.cat([torch.zeros_like(x), v], dim=1), x_t, t)
    lo, hi = d.schedule.posterior_log_variance_clipped[5].item(), math.log(d.schedule.betas[5].item())
    assert out.log_variance[:, 0, 0, 0].tolist() == pytest.approx([lo, hi, (lo + hi) / 2])


def test_training_losses_simple_is_eps_mse() -> None:
    d = GaussianDiffusion(make_betas("linear", 100))
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    noise, t = torch.randn_like(x0), torch.tensor([0, 10, 50, 99])
    out = d.training_losses(lambda x, tt: torch.zeros_like(x), x0, t, noise)
    torch.testing.assert_close(out.loss, mean_flat(noise**2))
    assert out.vlb is None and out.t.tolist() == t.tolist()
    drawn = d.training_losses(lambda x, tt: torch.zeros_like(x), x0, generator=torch.Generator().manual_seed(1))
    again = d.training_losses(lambda x, tt: torch.zeros_like(x), x0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(drawn.loss, again.loss)


def test_min_snr_weights_per_prediction() -> None:
    t, x = torch.tensor([0, 500, 999]), torch.zeros(3, 1)
    snr = GaussianDiffusion(make_betas("linear", 1000)).schedule.snr()[t].float()
    for prediction, expect in (
        ("eps", snr.clamp(max=5.0) / snr),
        ("x0", snr.clamp(max=5.0)),
        ("v", snr.clamp(max=5.0) / (snr + 1)),
    ):
        d = GaussianDiffusion(make_betas("linear", 1000), prediction=prediction, loss_weighting="min-snr")
        torch.testing.assert_close(d.mse_weights(t, x), expect)


def test_hybrid_stops_the_mean_gradient_in_the_vlb_part() -> None:
    d = GaussianDiffusion(make_betas("linear", 100), variance="learned_range", loss="hybrid")
    x0 = torch.rand(4, 1, 2, 2) * 2 - 1
    t, noise = torch.tensor([0, 3, 40, 99]), torch.randn_like(x0)
    pred = torch.zeros(1, requires_grad=True)
    var_v = torch.zeros(1, requires_grad=True)
    model = lambda x, tt: torch.cat([pred.expand_as(x), var_v.expand_as(x)], dim=1)  # noqa: E731
    out = d.training_losses(model, x0, t, noise)
    out.loss.sum().backward()
    # d loss / d pred comes from the MSE alone: 2 * mean(pred - eps) per example
    assert pred.grad.item() == pytest.approx((-2 * mean_flat(noise)).sum().item(), rel=1e-5)
    assert var_v.grad.abs().item() > 0  # the vlb trains the variance


def test_vlb_loss_is_rescaled_term() -> None:
    d = GaussianDiffusion(make_betas("linear", 100), loss="vlb")
    x0 = torch.rand(3, 1, 2, 2) * 2 - 1
    t, noise = torch.tensor([0, 3, 99]), torch.randn_like(x0)
    model = lambda x, tt: torch.zeros_like(x)  # noqa: E731
    out = d.training_losses(model, x0, t, noise)
    torch.testing.assert_close(out.loss, 100 * d.vlb_term(model, x0, d.q_sample(x0, t, noise), t))


def test_loss_aware_sampler_weights_are_unbiased() -> None:
    s = LossAwareSampler(20, history=3)
    assert torch.allclose(s.probabilities(), torch.full((20,), 0.05, dtype=torch.float64))
    for _ in range(3):
        s.observe(torch.arange(20), torch.linspace(0.1, 2.0, 20))
    p = s.probabilities()
    assert p.argmax() == 19 and p.argmin() == 0 and p.sum().item() == pytest.approx(1.0)
    losses = torch.rand(20, dtype=torch.float64)
    weights = 1 / (20 * p)
    assert (p * weights * losses).sum().item() == pytest.approx(losses.mean().item())
    t, w = s.sample(5000, "cpu", torch.Generator().manual_seed(0))
    assert (t == 19).sum() > (t == 0).sum() and w.shape == (5000,)
    restored = LossAwareSampler(20, history=3)
    restored.load_state_dict(s.state_dict())
    torch.testing.assert_close(restored.probabilities(), p)


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown prediction 'score'.*'eps', 'x0', 'v'"):
        GaussianDiffusion(make_betas("linear", 10 * 10), prediction="score")
    with pytest.raises(ValueError, match="unknown variance"):
        GaussianDiffusion(make_betas("linear", 100), variance="learned")
    with pytest.raises(ValueError, match="never train the variance"):
        GaussianDiffusion(make_betas("linear", 100), variance="learned_range")
    d = GaussianDiffusion(make_betas("linear", 100), variance="learned_range", loss="hybrid")
    x0 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"model output has shape \(2, 3, 4, 4\), expected \(2, 6, 4, 4\)"):
        d.training_losses(lambda x, t: torch.zeros_like(x), x0)
    with pytest.raises(ValueError, match=r"t out of range.*0\.\.99"):
        d.q_sample(x0, torch.tensor([0, 100]))
    with pytest.raises(TypeError, match="integer"):
        d.q_sample(x0, torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="non-finite"):
        d.training_losses(lambda x, t: torch.zeros_like(x), torch.full((2, 3, 4, 4), float("nan")))
