"""DDIM (Song et al. 2021): the deterministic (eta = 0) or partly stochastic implicit sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddpm.samplers.registry import SamplerOptions, SamplerSpec, option, register_sampler
from ddpm.samplers.state import SamplerState


@dataclass(frozen=True)
class DDIMOptions(SamplerOptions):
    eta: float = option(0.0, "noise scale: 0 deterministic (the probability-flow ODE), 1 the ancestral step of "
                             "fixed_small", low=0.0)


def ddim_step(state: SamplerState, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Song et al. 2021 Eq. 12 with sigma_t(eta) of Eq. 16 (option ``eta``, default 0).

    x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - s^2) eps_hat + s z,
    s^2 = eta^2 (1 - abar_{t-1}) / (1 - abar_t) (1 - abar_t / abar_{t-1}).
    eps_hat is re-derived from the (possibly clipped) x0_hat so both agree. With eta = 0 this is
    the first-order (Euler) solver of the probability-flow ODE in lambda; with eta = 1 it is the
    ancestral step of ``variance="fixed_small"``.
    """
    eta = state.options.eta
    d = state.denoise(x, index, remember=False)
    abar = state.alpha_sigma(index)[0] ** 2
    abar_prev = state.alpha_sigma(index - 1)[0] ** 2
    s = eta * math.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    out = math.sqrt(abar_prev) * d.x0 + math.sqrt(max(1 - abar_prev - s**2, 0.0)) * d.eps
    if s > 0:
        out = out + s * state.noise_like(x)
    return out, d.x0


register_sampler(SamplerSpec("ddim", ddim_step, "DDIM (Song et al. 2021), eta = 0 deterministic",
                             options=DDIMOptions, default_spacing="linspace"))
