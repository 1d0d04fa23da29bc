"""Ancestral sampling (Ho et al. 2020, Algorithm 2): x_{t-1} = mu_theta(x_t, t) + sigma_t z."""

from __future__ import annotations

import torch

from ddpm.samplers.state import SamplerState


def ancestral_step(state: SamplerState, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x_{t-1} ~ p_theta(x_{t-1} | x_t) on the (respaced) chain; no noise is added at index 0.

    The mean is the posterior mean (Eq. 7) at the predicted x_0 and the variance is the model's
    (fixed or learned), so this is exactly the paper's reverse process. Returns (x_{t-1}, x0_hat).
    """
    chain = state.chain
    raw = state.call_model(x, index)
    t = state.timesteps(index, x)
    out = chain.p_mean_variance(state.model, x, t, clip_denoised=state.clip_denoised, model_output=raw)
    if index == 0:
        return out.mean, out.pred_x0
    return out.mean + torch.exp(0.5 * out.log_variance) * state.noise_like(x), out.pred_x0
