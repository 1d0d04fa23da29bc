"""Fast solvers: convergence order on Gaussian data, moments of the stochastic ones, diffusers parity, NFE.

For data N(mu, s^2 I) everything is known in closed form. At noise level sigma-hat = sigma / alpha
(z = x / alpha) the Bayes-optimal denoiser is D(z) = mu + s^2 / (s^2 + sigma-hat^2) (z - mu), and the
probability-flow ODE dz / dsigma-hat = (z - D(z)) / sigma-hat keeps (z - mu) / sqrt(s^2 + sigma-hat^2)
constant. Every solver ends with the step from its last grid point (sigma-hat_0 > 0) to clean data,
which returns D there; the reference is that same final denoising applied to the exact ODE solution
at sigma-hat_0, so the error measured is the solver's alone.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddpm import GaussianDiffusion, make_betas
from ddpm.samplers import SAMPLERS, SamplerState, make_grid, make_options, nfe_budget, sample, sampling_chain
from ddpm.samplers.ddim import ddim_step
from ddpm.samplers.dpm_solver import dpm_solver_step

MU = torch.tensor([0.3, -0.5, 0.1, 0.0])
S = torch.tensor([0.2, 0.5, 1.0, 0.05])  # 0.05: a stiff direction, as sharp image features are


def gaussian_denoiser(d: GaussianDiffusion, mu: torch.Tensor, s: torch.Tensor):
    """The Bayes-optimal network of ``d.prediction`` for N(mu, diag(s^2)) data, at float or integer t."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = d.schedule.alphas_cumprod_at(t.double()).to(x.dtype).reshape(-1, 1)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        x0 = mu + alpha * s**2 / (alpha**2 * s**2 + sigma**2) * (x - alpha * mu)  # E[x_0 | x_t]
        eps = (x - alpha * x0) / sigma
        return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[d.prediction]

    return model


def exact_then_denoised(chain: GaussianDiffusion, x_T: torch.Tensor) -> torch.Tensor:
    """D(z(sigma-hat_0)) with z the exact ODE solution from x_T at the chain's top to its last point."""
    abar = chain.schedule.alphas_cumprod
    sig0, sigT = ((1 - abar[0]) / abar[0]).sqrt(), ((1 - abar[-1]) / abar[-1]).sqrt()
    z_T = x_T / abar[-1].sqrt()
    return MU + (z_T - MU) * S**2 / ((S**2 + sig0**2).sqrt() * (S**2 + sigT**2).sqrt())


# (sampler, options, theoretical order of the error at x_0 in the number of evaluations)
DETERMINISTIC = [
    ("ddim", {}, 1),
    ("dpm++2m", {}, 2),
    ("heun", {}, 2),
    ("dpm++3m", {}, 3),
    ("unipc", {"order": 1}, 2),  # UniC raises the predictor's order by one
    ("unipc", {}, 3),
    ("unipc", {"order": 3}, 4),
]


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler, options, order", DETERMINISTIC, ids=lambda v: str(v))
def test_error_falls_at_the_solvers_order_on_gaussian_data(prediction: str, sampler: str, options: dict,
                                                           order: int) -> None:
    # Karras' grid: a smooth, non-uniform family in lambda (a uniform one hides error terms, e.g.
    # 3M shows order 4 there) with fractional timesteps, so no rounding breaks the asymptotics.
    d = GaussianDiffusion(make_betas("linear", 1000), prediction=prediction)
    model = gaussian_denoiser(d, MU.double(), S.double())
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    nfes = [32, 64, 128]
    errors = []
    for k in nfes:
        x = sample(d, model, x_T.shape, sampler=sampler, steps=k, spacing="karras", noise=x_T, clip_denoised=False,
                   **options)
        reference = exact_then_denoised(sampling_chain(d, sampler, k, "karras"), x_T)
        errors.append(float((x - reference).abs().max()))
    logs = torch.tensor([[math.log(k), 1.0] for k in nfes], dtype=torch.float64)
    slope = -torch.linalg.lstsq(logs, torch.tensor(errors, dtype=torch.float64).log().unsqueeze(1)).solution[0, 0]
    assert abs(float(slope) - order) < 0.3, f"{sampler} {options}: errors {errors}, slope {float(slope):.2f}"


def moments_case(sampler: str) -> tuple[int, str | None]:
    """Steps and spacing at which each stochastic sampler's discretisation bias is below the Monte Carlo error."""
    return {"ancestral": (1000, None), "ddim": (1000, None), "dpm++2m-sde": (200, "log-snr"),
            "heun": (201, None)}[sampler]


@pytest.mark.parametrize("sampler, options", [("ancestral", {}), ("ddim", {"eta": 1.0}), ("dpm++2m-sde", {}),
                                              ("dpm++2m-sde", {"eta": 0.5}), ("heun", {"churn": 10.0})],
                         ids=lambda v: str(v))
def test_stochastic_samplers_reproduce_the_data_mean_and_variance(sampler: str, options: dict) -> None:
    mu, s = torch.tensor([0.5, -0.3]), torch.tensor([0.5, 1.0])
    d = GaussianDiffusion(make_betas("linear", 1000))
    n = 20000
    steps, spacing = moments_case(sampler)
    x = sample(d, gaussian_denoiser(d, mu, s), (n, 2), sampler=sampler, steps=steps, spacing=spacing,  # type: ignore[arg-type]
               generator=torch.Generator().manual_seed(3), clip_denoised=False, **options)
    z_mean = (x.mean(0) - mu) / (s / math.sqrt(n))
    z_var = (x.var(0) / s**2 - 1) / math.sqrt(2 / (n - 1))  # standard error of a normal sample variance
    assert float(z_mean.abs().max()) < 4 and float(z_var.abs().max()) < 4, (z_mean, z_var)


def random_network(dim: int, *, learned_sigma: bool = False) -> torch.nn.Module:
    from ddpm.nn import MLPConfig, MLPDenoiser

    torch.manual_seed(0)
    net = MLPDenoiser(MLPConfig(dim=dim, hidden=32, num_blocks=2, time_embed_dim=16, learned_sigma=learned_sigma))
    with torch.no_grad():
        for p in net.parameters():  # no zero-initialised output layer: every coefficient must matter
            p.normal_(0.0, 0.3)
    return net.eval()


DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def run_diffusers(scheduler, net, x_T: torch.Tensor, noises: list[torch.Tensor] | None = None) -> torch.Tensor:
    x = x_T.clone()
    for i, t in enumerate(scheduler.timesteps):
        extra = {} if noises is None else {"variance_noise": noises[i] if i < len(noises) else torch.zeros_like(x)}
        x = scheduler.step(net(x, t.expand(x.shape[0])), t, x, **extra).prev_sample
    return x


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler, options, reference", [
    ("dpm++2m", {}, ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2})),
    ("unipc", {}, ("UniPCMultistepScheduler", {"solver_order": 2})),
    ("unipc", {"order": 3}, ("UniPCMultistepScheduler", {"solver_order": 3})),
], ids=lambda v: str(v[0]) if isinstance(v, tuple) else str(v))
def test_matches_diffusers_on_a_random_network(prediction: str, sampler: str, options: dict, reference: tuple) -> None:
    diffusers = pytest.importorskip("diffusers")
    d = GaussianDiffusion(make_betas("linear", 1000), prediction=prediction)
    net = random_network(3)
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    for k in (5, 12):
        scheduler = getattr(diffusers, reference[0])(
            num_train_timesteps=1000, trained_betas=d.schedule.betas.numpy(), prediction_type=DIFFUSERS_PREDICTION[
                prediction], timestep_spacing="linspace", **reference[1])
        scheduler.set_timesteps(k)
        assert torch.equal(scheduler.timesteps.flip(0).double(), make_grid(d.num_timesteps, k, "uniform"))
        with torch.no_grad():
            theirs = run_diffusers(scheduler, net, x_T)
            ours = sample(d, net, x_T.shape, sampler=sampler, steps=k, spacing="uniform", noise=x_T,
                          clip_denoised=False, **options)
        scale = float(theirs.abs().max())
        assert float((ours - theirs).abs().max()) < 2e-6 * max(scale, 1.0), (k, scale)  # float32 round-off


def test_dpmpp_2m_sde_matches_diffusers_given_the_same_noise() -> None:
    diffusers = pytest.importorskip("diffusers")
    d = GaussianDiffusion(make_betas("linear", 1000), prediction="v")
    net = random_network(3)
    x_T = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
    k = 10
    noises = [torch.randn(8, 3, generator=g) for g in [torch.Generator().manual_seed(5)] for _ in range(k - 1)]
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=d.schedule.betas.numpy(), prediction_type="v_prediction",
        algorithm_type="sde-dpmsolver++", solver_order=2, timestep_spacing="linspace")
    scheduler.set_timesteps(k)
    with torch.no_grad():
        theirs = run_diffusers(scheduler, net, x_T, noises)
        # ours draws one noise per step but the last (which lands on x0_hat), in order, from the generator
        ours = sample(d, net, x_T.shape, sampler="dpm++2m-sde", steps=k, spacing="uniform", noise=x_T,
                      generator=torch.Generator().manual_seed(5), clip_denoised=False)
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_steps_cost_exactly_that_many_network_evaluations(sampler: str) -> None:
    d = GaussianDiffusion(make_betas("cosine", 100), prediction="v")
    calls = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return 0.1 * x

    options = {"churn": 5.0} if sampler == "heun" else {}
    for k in (1, 2, 3, 4, 5, 8, 15, None):
        calls.clear()
        sample(d, model, (2, 1, 4, 4), sampler=sampler, steps=k, generator=torch.Generator().manual_seed(0), **options)
        assert len(calls) == nfe_budget(sampler, k, 100), (sampler, k, len(calls))


def test_dpm_solver_first_order_is_ddim_and_heun_at_two_evaluations_is_ddim() -> None:
    d = GaussianDiffusion(make_betas("linear", 100))
    model = lambda x, t: 0.3 * x + 0.01 * t.double().reshape(-1, 1, 1, 1).float()  # noqa: E731
    x = torch.randn(4, 2, 3, 3)
    chain = d.respaced([0.0, 10.5, 33.25, 99.0])
    for index in (3, 2, 1, 0):
        a, _ = ddim_step(SamplerState(chain, model, clip_denoised=False, options=make_options("ddim")), x, index)
        b, _ = dpm_solver_step(SamplerState(chain, model, clip_denoised=False), x, index, order=1)
        torch.testing.assert_close(a, b)
    # heun with 2 or 3 evaluations takes only Euler steps in sigma-hat on its 2 or 3 points: DDIM's steps
    for k in (2, 3):
        grid = make_grid(d.num_timesteps, k, "karras", schedule=d.schedule).tolist()
        kw = dict(noise=x, clip_denoised=False)
        torch.testing.assert_close(sample(d, model, x.shape, sampler="heun", steps=k, spacing="karras", **kw),
                                   sample(d, model, x.shape, sampler="ddim", steps=grid, **kw), rtol=2e-5, atol=1e-5)


def test_dpmpp_2m_sde_without_noise_is_dpmpp_2m() -> None:
    d = GaussianDiffusion(make_betas("cosine", 200), prediction="v")
    net = random_network(3)
    x_T = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = sample(d, net, x_T.shape, sampler="dpm++2m", steps=12, noise=x_T)
        b = sample(d, net, x_T.shape, sampler="dpm++2m-sde", steps=12, noise=x_T, eta=0.0)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_off_grid_evaluation_agrees_with_the_grid() -> None:
    """EDM's churn evaluates the network between grid points; at a grid point it must be the grid's evaluation."""
    d = GaussianDiffusion(make_betas("cosine", 1000), prediction="v")
    net = random_network(3)
    chain = sampling_chain(d, "heun", 9, "karras")  # fractional timesteps
    state = SamplerState(chain, net, clip_denoised=False, trained=d)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for index in (4, 2, 0):
            on, off = state.denoise(x, index), state.denoise_at(x, state.lam(index))
            torch.testing.assert_close(off.x0, on.x0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_seeds_per_example_clips_and_ignores_a_learned_variance(sampler: str) -> None:
    options = {"churn": 5.0} if sampler == "heun" else {}
    fixed = GaussianDiffusion(make_betas("cosine", 100), prediction="eps")
    learned = GaussianDiffusion(make_betas("cosine", 100), prediction="eps", variance="learned_range", loss="hybrid")
    net = random_network(3, learned_sigma=True)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    with torch.no_grad():
        whole = sample(learned, net, (4, 3), sampler=sampler, steps=6, generator=gens([10, 11, 12, 13]), **options)
        part = sample(learned, net, (2, 3), sampler=sampler, steps=6, generator=gens([12, 13]), **options)
        torch.testing.assert_close(whole[2:], part)
        assert whole.abs().max() <= 1.0 + 1e-6  # clip_denoised: x0_hat in [-1, 1], and the last step lands on it
        if sampler != "ancestral":  # the ODE/SDE solvers use the mean only
            mean_only = lambda x, t: net(x, t)[:, :3]  # noqa: E731
            again = sample(fixed, mean_only, (4, 3), sampler=sampler, steps=6, generator=gens([10, 11, 12, 13]),
                           **options)
            torch.testing.assert_close(again, whole)


def test_solver_option_errors() -> None:
    d = GaussianDiffusion(make_betas("linear", 50))
    with pytest.raises(ValueError, match="sampler 'unipc': order must be one of 1, 2, 3, got 4"):
        sample(d, lambda x, t: x, (1, 1), sampler="unipc", steps=5, order=4)
    with pytest.raises(ValueError, match="sampler 'unipc': order must be an integer, got 2.5"):
        sample(d, lambda x, t: x, (1, 1), sampler="unipc", steps=5, order=2.5)
    with pytest.raises(ValueError, match="sampler 'ddim': eta must be >= 0, got -0.5"):
        sample(d, lambda x, t: x, (1, 1), sampler="ddim", steps=5, eta=-0.5)
    with pytest.raises(ValueError, match=r"sampler 'dpm\+\+2m' has no option\(s\) \['eta'\]; its options: none"):
        sample(d, lambda x, t: x, (1, 1), sampler="dpm++2m", steps=5, eta=0.5)
    with pytest.raises(ValueError, match=r"'heun' with 120 network evaluations needs 61 timesteps, but T=50"):
        sample(d, lambda x, t: x, (1, 1), sampler="heun", steps=120)


def test_lambda_and_sigma_grids_start_at_sigma_max_where_the_schedule_goes_beyond() -> None:
    from ddpm.samplers.grids import SIGMA_MAX

    for schedule, top in (("cosine", SIGMA_MAX), ("linear", None)):  # cosine reaches 20000, linear 157
        sched = GaussianDiffusion(make_betas(schedule, 1000)).schedule
        for spacing in ("log-snr", "karras"):
            grid = make_grid(sched.num_timesteps, 10, spacing, schedule=sched)
            sigma = torch.exp(-0.5 * sched.log_snr_at(grid))
            expected = top if top is not None else float(torch.exp(-0.5 * sched.log_snr()[-1]))
            assert grid[0] == 0 and abs(float(sigma[-1]) / expected - 1) < 1e-9, (schedule, spacing, grid)
