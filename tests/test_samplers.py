"""Samplers: DDIM(eta=1) is ancestral, DDIM(eta=0) is deterministic, perfect denoisers land on data."""

import pytest
import torch

from ddpm import GaussianDiffusion, make_betas
from ddpm.samplers import ancestral_step, ddim_step


def point_mass_denoiser(d: GaussianDiffusion, point: torch.Tensor):
    """The exact eps_theta for data that is always ``point``: eps = (x_t - sqrt(abar) x*) / sqrt(1 - abar)."""
    abar = d.schedule.alphas_cumprod.float()

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # t: indices of the original chain
        a = abar[t].reshape(-1, *([1] * (x.ndim - 1)))
        return (x - a.sqrt() * point) / (1 - a).sqrt()

    return model


def test_ddim_eta1_equals_ancestral_fixed_small_step_by_step() -> None:
    d = GaussianDiffusion(make_betas("linear", 100))
    model = lambda x, t: 0.3 * x + 0.01 * t.float().reshape(-1, 1, 1, 1)  # noqa: E731
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    for step in (99, 50, 1, 0):
        t = torch.full((4,), step)
        a, _ = ancestral_step(d, model, x, t, generator=torch.Generator().manual_seed(step), clip_denoised=False)
        b, _ = ddim_step(d, model, x, t, generator=torch.Generator().manual_seed(step), clip_denoised=False, eta=1.0)
        torch.testing.assert_close(a, b)
    # also on a respaced chain, where the step is 20 original steps long
    r = d.respaced(5)
    t = torch.full((4,), 3)
    a, _ = ancestral_step(r, model, x, t, generator=torch.Generator().manual_seed(1), clip_denoised=False)
    b, _ = ddim_step(r, model, x, t, generator=torch.Generator().manual_seed(1), clip_denoised=False, eta=1.0)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sampler, steps", [("ddim", 20), ("ddim", None), ("ancestral", 20), ("ancestral", None)])
def test_perfect_denoiser_of_one_point_lands_on_it(sampler: str, steps: int | None) -> None:
    d = GaussianDiffusion(make_betas("linear", 200))
    point = torch.tensor([0.5, -0.25, 0.9]).reshape(1, 3, 1, 1)
    x = d.sample(point_mass_denoiser(d, point), (6, 3, 1, 1), sampler=sampler, steps=steps,
                 generator=torch.Generator().manual_seed(0), clip_denoised=False)
    torch.testing.assert_close(x, point.expand(6, 3, 1, 1), atol=1e-4, rtol=0)


def test_ddim_eta0_is_deterministic_given_x_T() -> None:
    d = GaussianDiffusion(make_betas("linear", 100))
    model = lambda x, t: 0.5 * x  # noqa: E731
    x_T = torch.randn(3, 1, 4, 4)
    a = d.sample(model, x_T.shape, sampler="ddim", steps=10, noise=x_T, generator=torch.Generator().manual_seed(1))
    b = d.sample(model, x_T.shape, sampler="ddim", steps=10, noise=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_seeded_generators_reproduce_and_per_example_seeds_ignore_the_batch() -> None:
    d = GaussianDiffusion(make_betas("linear", 50))
    model = lambda x, t: 0.1 * x  # noqa: E731
    runs = [d.sample(model, (4, 1, 2, 2), generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    whole = d.sample(model, (4, 1, 2, 2), generator=gens([10, 11, 12, 13]))
    part = d.sample(model, (2, 1, 2, 2), generator=gens([12, 13]))
    torch.testing.assert_close(whole[2:], part)


def test_trajectory_frames() -> None:
    d = GaussianDiffusion(make_betas("linear", 100))
    x, traj = d.sample(lambda x, t: 0.1 * x, (2, 1, 2, 2), steps=10, return_trajectory=True)
    assert traj.shape == (11, 2, 1, 2, 2) and torch.equal(traj[-1], x)
    x, traj = d.sample(lambda x, t: 0.1 * x, (2, 1, 2, 2), return_trajectory=True, trajectory_frames=5)
    assert traj.shape == (5, 2, 1, 2, 2) and torch.equal(traj[-1], x)


def test_clip_keeps_x0_in_range_and_errors() -> None:
    d = GaussianDiffusion(make_betas("linear", 50))
    x = d.sample(lambda x, t: -10 * torch.ones_like(x), (2, 1, 2, 2), sampler="ddim", steps=5)
    assert x.abs().max() <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        d.sample(lambda x, t: x, (1, 1), sampler="euler")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        d.sample(lambda x, t: x, (1, 1), sampler="ddim", eta=-1)
