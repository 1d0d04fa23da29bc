"""Samplers: DDIM(eta=1) is ancestral, DDIM(eta=0) is deterministic, perfect denoisers land on data."""

import pytest
import torch

from ddpm import GaussianDiffusion, make_betas, sample
from ddpm.samplers import SamplerState, make_grid, make_options
from ddpm.samplers.ancestral import ancestral_step
from ddpm.samplers.ddim import ddim_step


def point_mass_denoiser(d: GaussianDiffusion, point: torch.Tensor):
    """The exact eps_theta for data that is always ``point``: eps = (x_t - sqrt(abar) x*) / sqrt(1 - abar)."""
    abar = d.schedule.alphas_cumprod.float()

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # t: indices of the original chain
        a = abar[t].reshape(-1, *([1] * (x.ndim - 1)))
        return (x - a.sqrt() * point) / (1 - a).sqrt()

    return model


def state(chain: GaussianDiffusion, model, seed: int, sampler: str = "ancestral", **options) -> SamplerState:
    return SamplerState(chain, model, torch.Generator().manual_seed(seed), clip_denoised=False,
                        options=make_options(sampler, options))


def test_ddim_eta1_equals_ancestral_fixed_small_step_by_step() -> None:
    d = GaussianDiffusion(make_betas("linear", 100))
    model = lambda x, t: 0.3 * x + 0.01 * t.double().reshape(-1, 1, 1, 1)  # noqa: E731
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    for step in (99, 50, 1, 0):
        a, _ = ancestral_step(state(d, model, step), x, step)
        b, _ = ddim_step(state(d, model, step, "ddim", eta=1.0), x, step)
        torch.testing.assert_close(a, b)
    # also on a respaced chain, where the step is 20 original steps long, and on fractional timesteps
    for r in (d.respaced(5), d.respaced([0.0, 10.5, 33.25, 99.0])):
        a, _ = ancestral_step(state(r, model, 1), x, 3)
        b, _ = ddim_step(state(r, model, 1, "ddim", eta=1.0), x, 3)
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sampler, steps", [("ddim", 20), ("ddim", None), ("ancestral", 20), ("ancestral", None)])
def test_perfect_denoiser_of_one_point_lands_on_it(sampler: str, steps: int | None) -> None:
    d = GaussianDiffusion(make_betas("linear", 200))
    point = torch.tensor([0.5, -0.25, 0.9]).reshape(1, 3, 1, 1)
    x = sample(d, point_mass_denoiser(d, point), (6, 3, 1, 1), sampler=sampler, steps=steps,
                 generator=torch.Generator().manual_seed(0), clip_denoised=False)
    torch.testing.assert_close(x, point.expand(6, 3, 1, 1), atol=1e-4, rtol=0)


def test_ddim_eta0_is_deterministic_given_x_T() -> None:
    d = GaussianDiffusion(make_betas("linear", 100))
    model = lambda x, t: 0.5 * x  # noqa: E731
    x_T = torch.randn(3, 1, 4, 4)
    a = sample(d, model, x_T.shape, sampler="ddim", steps=10, noise=x_T, generator=torch.Generator().manual_seed(1))
    b = sample(d, model, x_T.shape, sampler="ddim", steps=10, noise=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_seeded_generators_reproduce_and_per_example_seeds_ignore_the_batch() -> None:
    d = GaussianDiffusion(make_betas("linear", 50))
    model = lambda x, t: 0.1 * x  # noqa: E731
    runs = [sample(d, model, (4, 1, 2, 2), generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    whole = sample(d, model, (4, 1, 2, 2), generator=gens([10, 11, 12, 13]))
    part = sample(d, model, (2, 1, 2, 2), generator=gens([12, 13]))
    torch.testing.assert_close(whole[2:], part)


def test_trajectory_frames() -> None:
    d = GaussianDiffusion(make_betas("linear", 100))
    x, traj = sample(d, lambda x, t: 0.1 * x, (2, 1, 2, 2), steps=10, return_trajectory=True)
    assert traj.shape == (11, 2, 1, 2, 2) and torch.equal(traj[-1], x)
    x, traj = sample(d, lambda x, t: 0.1 * x, (2, 1, 2, 2), return_trajectory=True, trajectory_frames=5)
    assert traj.shape == (5, 2, 1, 2, 2) and torch.equal(traj[-1], x)


def test_clip_keeps_x0_in_range_and_errors() -> None:
    d = GaussianDiffusion(make_betas("linear", 50))
    x = sample(d, lambda x, t: -10 * torch.ones_like(x), (2, 1, 2, 2), sampler="ddim", steps=5)
    assert x.abs().max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        sample(d, lambda x, t: x, (1, 1), sampler="euler")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        sample(d, lambda x, t: x, (1, 1), sampler="ddim", eta=-1)
    with pytest.raises(ValueError, match=r"sampler 'ancestral' has no option\(s\) \['eta'\]"):
        sample(d, lambda x, t: x, (1, 1), sampler="ancestral", eta=0.5)


@pytest.mark.parametrize("spacing", ["linspace", "uniform", "leading", "trailing", "log-snr", "karras"])
def test_grids_have_k_distinct_points_in_range(spacing: str) -> None:
    d = GaussianDiffusion(make_betas("cosine", 1000))
    for k in (1, 2, 7, 50, 999):
        grid = make_grid(d.num_timesteps, k, spacing, schedule=d.schedule)
        assert grid.shape == (k,) and grid.dtype == torch.float64
        assert grid.min() >= 0 and grid.max() <= 999 and bool((grid.diff() > 0).all())
    assert make_grid(1000, 10, "trailing")[-1] == 999 and make_grid(1000, 10, "leading")[0] == 0


def test_log_snr_and_karras_grids_are_uniform_in_their_variable() -> None:
    sched = GaussianDiffusion(make_betas("linear", 1000)).schedule
    lam = sched.log_snr_at(make_grid(sched.num_timesteps, 12, "log-snr", schedule=sched))
    torch.testing.assert_close(lam.diff(), torch.full((11,), float(lam.diff().mean()), dtype=torch.float64))
    torch.testing.assert_close(lam[[0, -1]], sched.log_snr()[[0, -1]])
    sigma = torch.exp(-0.5 * sched.log_snr_at(make_grid(sched.num_timesteps, 12, "karras", schedule=sched)))
    root = sigma ** (1 / 7)
    torch.testing.assert_close(root.diff(), torch.full((11,), float(root.diff().mean()), dtype=torch.float64))


def test_fractional_respacing_interpolates_log_snr_and_is_exact_at_integers() -> None:
    d = GaussianDiffusion(make_betas("linear", 100))
    r = d.respaced([0.0, 10.0, 20.5, 99.0])
    abar = r.schedule.alphas_cumprod
    torch.testing.assert_close(abar[[0, 1, 3]], d.schedule.alphas_cumprod[[0, 10, 99]])
    lam = torch.log(abar / (1 - abar))
    full = d.schedule.log_snr()
    torch.testing.assert_close(lam[2], (full[20] + full[21]) / 2)
    torch.testing.assert_close(r.timestep_map, torch.tensor([0.0, 10.0, 20.5, 99.0], dtype=torch.float64))
    torch.testing.assert_close(d.schedule.timestep_at_log_snr(lam), torch.tensor([0.0, 10.0, 20.5, 99.0],
                                                                                 dtype=torch.float64))


def test_a_sampler_with_a_new_option_added_outside_gets_its_flag_checks_and_defaults(tmp_path, capsys) -> None:
    """Adding a sampler is one module (here, this test) and nothing else: the registry, the typed options,
    the command line's flags and help read it."""
    from dataclasses import dataclass

    from ddpm.cli import main
    from ddpm.samplers import SAMPLERS, SamplerOptions, SamplerSpec, option, register_sampler

    from .test_cli import TINY, write_folder

    @dataclass(frozen=True)
    class DampedOptions(SamplerOptions):
        gamma: float = option(1.0, "share of the eps direction kept (1: DDIM)", low=0.0, high=1.0)

    def damped_step(state: SamplerState, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = state.denoise(x, index, remember=False)
        alpha_prev, sigma_prev = state.alpha_sigma(index - 1)
        return alpha_prev * d.x0 + state.options.gamma * sigma_prev * d.eps, d.x0

    register_sampler(SamplerSpec("test-damped", damped_step, "DDIM with a damped eps direction",
                                 options=DampedOptions, default_steps=5))
    try:
        d = GaussianDiffusion(make_betas("linear", 100))
        model = lambda x, t: 0.3 * x  # noqa: E731
        x_T = torch.randn(3, 2)
        torch.testing.assert_close(sample(d, model, (3, 2), sampler="test-damped", steps=5, noise=x_T),
                                   sample(d, model, (3, 2), sampler="ddim", steps=5, noise=x_T))  # gamma 1 = DDIM
        with pytest.raises(ValueError, match="sampler 'test-damped': gamma must be <= 1, got 2.0"):
            sample(d, model, (3, 2), sampler="test-damped", gamma=2.0)

        run = tmp_path / "run"
        assert main(["train", "--data", str(write_folder(tmp_path / "data")), "--steps", "2", "--out", str(run),
                     "--set", "model.num_groups=8", *TINY]) == 0
        with pytest.raises(SystemExit):
            main(["sample", "--help"])
        assert "--gamma GAMMA" in capsys.readouterr().out
        assert main(["sample", str(run), "--sampler", "test-damped", "--gamma", "0.5", "-n", "2",
                     "--out", str(tmp_path / "s"), "--device", "cpu"]) == 0
        assert main(["sample", str(run), "--sampler", "ddim", "--gamma", "0.5", "--out", str(tmp_path / "t")]) == 2
        assert "sampler 'ddim' has no option(s) ['gamma']" in capsys.readouterr().err
    finally:
        SAMPLERS.pop("test-damped")
