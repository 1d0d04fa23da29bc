"""ddpm: Denoising Diffusion Probabilistic Models (Ho et al. 2020) in PyTorch.

The mathematics lives in small modules named after what they hold: :mod:`ddpm.schedules`
(betas and derived coefficients), :mod:`ddpm.distributions` (KL, discretised decoder),
:mod:`ddpm.diffusion` (forward process, posterior, reverse process, losses),
:mod:`ddpm.samplers` (ancestral, DDIM) and :mod:`ddpm.likelihood` (the bound in bits/dim).
"""

from ddpm.diffusion import GaussianDiffusion, PMeanVariance, TrainingLosses
from ddpm.distributions import discretized_gaussian_log_likelihood, normal_kl
from ddpm.likelihood import NLLEstimate, NLLResult, nll, nll_estimate
from ddpm.samplers import sample
from ddpm.schedules import Schedule, make_betas, respace_betas, space_timesteps

__version__ = "0.1.0"

__all__ = [
    "GaussianDiffusion",
    "NLLEstimate",
    "NLLResult",
    "PMeanVariance",
    "Schedule",
    "TrainingLosses",
    "discretized_gaussian_log_likelihood",
    "make_betas",
    "nll",
    "nll_estimate",
    "normal_kl",
    "respace_betas",
    "sample",
    "space_timesteps",
]
