"""Ancestral sampling (Ho et al. 2020, Algorithm 2): x_{t-1} ~ p_theta(x_{t-1} | x_t), down the (respaced) chain.

The step is the process's own reverse step (``p_sample``), so this sampler walks every process:
for Gaussian diffusion x_{t-1} = mu_theta(x_t, t) + sigma_t z with the model's variance (fixed or
learned), exactly the paper's reverse process, with no noise added at index 0.
"""

from __future__ import annotations

import torch

from ddpm.samplers.registry import SamplerSpec, register_sampler
from ddpm.samplers.state import SamplerState


def ancestral_step(state: SamplerState, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x at index - 1 drawn from p_theta(. | x) with the run's generator(s); returns (that, x0_hat)."""
    return state.chain.p_sample(state.network, x, state.timesteps(index, x), generator=state.generator,
                                clip_denoised=state.clip_denoised)


register_sampler(SamplerSpec(
    "ancestral", ancestral_step, "DDPM ancestral sampling (Ho et al. 2020, Algorithm 2); walks every process",
    family=None,
    # linspace keeps t = 0, the decoder step of the paper's chain (measured better than dropping it on
    # the demo model: README "The demo recipe").
    default_spacing="linspace",
))
