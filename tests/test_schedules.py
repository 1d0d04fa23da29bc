"""Schedules: the published endpoints, validation, and respacing as a proper DDPM of its own."""

import math

import pytest
import torch

from ddpm import GaussianDiffusion, make_betas, respace_betas, space_timesteps
from ddpm.errors import ConfigError
from ddpm.schedules import SCHEDULES, Schedule, register_schedule


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


def test_schedule_parameters_are_set_by_name_and_checked() -> None:
    torch.testing.assert_close(make_betas("cosine", 100, s=0.008), make_betas("cosine", 100), rtol=0, atol=0)
    assert not torch.equal(make_betas("cosine", 100, s=0.02), make_betas("cosine", 100))
    linear = make_betas("linear", 1000, beta_start=2e-4, beta_end=0.01)
    assert linear[0].item() == pytest.approx(2e-4) and linear[-1].item() == pytest.approx(0.01)
    with pytest.raises(ConfigError, match=r"schedule 'cosine' has no parameter\(s\) \['beta_end'\]; its parameters: "
                                          r"s \(default 0.008\), max_beta \(default 0.999\)"):
        make_betas("cosine", 100, beta_end=0.1)
    with pytest.raises(ConfigError, match="max_beta must lie in"):
        make_betas("cosine", 100, max_beta=1.5)
    with pytest.raises(ConfigError, match="beta_start <= beta_end"):
        make_betas("linear", 100, beta_start=0.1, beta_end=0.01)


def test_a_schedule_with_a_parameter_added_outside_is_usable_from_config_and_command_line(capsys) -> None:
    """Adding a schedule is one class (here, in this test) and nothing else: config, process and --help read it."""
    from dataclasses import dataclass

    from ddpm.cli import main
    from ddpm.config import RunConfig, apply_overrides
    from ddpm.processes import build_process

    @register_schedule("test-power")
    @dataclass(frozen=True)
    class PowerSchedule:  # abar_t = 1 - (t/T)^power, a schedule of the family of Kingma et al.'s polynomials
        power: float = 2.0

        def betas(self, num_timesteps: int) -> torch.Tensor:
            t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
            abar = (1 - t**self.power).clamp(min=1e-5)
            return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)

    try:
        cfg = apply_overrides(RunConfig(), {"diffusion.schedule": "test-power",
                                            "diffusion.schedule_options": "power=3", "diffusion.timesteps": 50})
        process = build_process(cfg.diffusion)
        torch.testing.assert_close(process.schedule.betas, PowerSchedule(3.0).betas(50))
        with pytest.raises(ConfigError, match=r"diffusion.schedule_options: schedule 'test-power' has no parameter"):
            apply_overrides(cfg, {"diffusion.schedule_options": "s=0.1"})
        with pytest.raises(SystemExit):
            main(["train", "--help"])
        assert "test-power(power=2)" in "".join(capsys.readouterr().out.split())  # help text wraps
    finally:
        SCHEDULES.pop("test-power")
