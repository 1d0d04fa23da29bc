"""ddpm: Denoising Diffusion Probabilistic Models (Ho et al. 2020) in PyTorch.

The mathematics lives in small modules named after what they hold: :mod:`ddpm.schedules`
(betas and derived coefficients), :mod:`ddpm.distributions` (KL, discretised decoder),
:mod:`ddpm.diffusion` (forward process, posterior, reverse process, losses),
:mod:`ddpm.samplers` (a registry of samplers and time grids) and :mod:`ddpm.likelihood` (the bound
in bits/dim); shared tensor helpers are in :mod:`ddpm.tensors` and every closed set of choices in
:mod:`ddpm.choices`. Networks are in
:mod:`ddpm.nn`, data in :mod:`ddpm.data`, training in :mod:`ddpm.train`, metrics in
:mod:`ddpm.eval`, pictures in :mod:`ddpm.viz` and the command line in :mod:`ddpm.cli`.

The run API: :func:`ddpm.fit` trains from a configuration and :func:`ddpm.load` returns a
:class:`ddpm.Pipeline` (sample, bound, export) from a run, a checkpoint or a diffusers folder.
Inference never loads the trainer: ``ddpm.fit`` (and :mod:`ddpm.train`) is imported on first use.
"""

from ddpm.diffusion import GaussianDiffusion, PMeanVariance, TrainingLosses, eps_from_x0, x0_from_prediction
from ddpm.distributions import discretized_gaussian_log_likelihood, normal_kl
from ddpm.likelihood import NLLEstimate, NLLResult, nll, nll_estimate
from ddpm.nn import MLPConfig, MLPDenoiser, UNet, UNetConfig, load_pretrained, mlp_preset, unet_preset
from ddpm.pipeline import Bound, Pipeline, load
from ddpm.samplers import SAMPLERS, sample
from ddpm.schedules import Schedule, make_betas, respace_betas, space_timesteps

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``ddpm.fit`` and ``ddpm.TrainResult``, imported on first use so that inference does not load training."""
    if name in ("fit", "TrainResult"):
        import importlib

        value = getattr(importlib.import_module("ddpm.train.fit"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ddpm' has no attribute {name!r}")

__all__ = [
    "Bound",
    "Pipeline",
    "TrainResult",
    "fit",
    "load",
    "GaussianDiffusion",
    "MLPConfig",
    "MLPDenoiser",
    "UNet",
    "UNetConfig",
    "NLLEstimate",
    "NLLResult",
    "PMeanVariance",
    "SAMPLERS",
    "Schedule",
    "TrainingLosses",
    "discretized_gaussian_log_likelihood",
    "eps_from_x0",
    "load_pretrained",
    "make_betas",
    "mlp_preset",
    "nll",
    "nll_estimate",
    "normal_kl",
    "respace_betas",
    "sample",
    "space_timesteps",
    "unet_preset",
    "x0_from_prediction",
]
