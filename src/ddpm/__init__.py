"""ddpm: Denoising Diffusion Probabilistic Models (Ho et al. 2020) in PyTorch.

The mathematics lives in small modules named after what they hold: :mod:`ddpm.schedules`
(betas and derived coefficients), :mod:`ddpm.distributions` (KL, discretised decoder),
:mod:`ddpm.processes` (what a diffusion process is to the library, and the processes: the
Gaussian diffusion of Ho et al. in :mod:`ddpm.processes.gaussian`), :mod:`ddpm.samplers` (a
registry of samplers and time grids) and :mod:`ddpm.likelihood` (the bound in bits/dim); shared
tensor helpers are in :mod:`ddpm.tensors` and every closed set of choices in :mod:`ddpm.choices`.
The run configuration is :mod:`ddpm.config`, checkpoints :mod:`ddpm.checkpoint`. Networks are in
:mod:`ddpm.nn`, data in :mod:`ddpm.data`, training in :mod:`ddpm.train`, metrics in
:mod:`ddpm.eval`, pictures in :mod:`ddpm.viz` and the command line in :mod:`ddpm.cli`.

The run API: :func:`ddpm.fit` trains from a configuration and :func:`ddpm.load` returns a
:class:`ddpm.Pipeline` (sample, bound, export) from a run, a checkpoint or a diffusers folder.
Inference never loads the trainer: ``ddpm.fit`` (and :mod:`ddpm.train`) is imported on first use.
"""

from ddpm.config import RunConfig
from ddpm.distributions import discretized_gaussian_log_likelihood, normal_kl
from ddpm.likelihood import NLLEstimate, NLLResult, nll, nll_estimate
from ddpm.nn import MLPConfig, MLPDenoiser, UNet, UNetConfig, load_pretrained, mlp_preset, unet_preset
from ddpm.pipeline import Bound, Pipeline, load
from ddpm.processes import (
    PROCESSES,
    DiffusionProcess,
    GaussianConfig,
    GaussianDiffusion,
    PMeanVariance,
    ProcessConfig,
    TrainingLosses,
    build_process,
    register_process,
)
from ddpm.processes.gaussian import eps_from_x0, prediction_target, x0_from_prediction
from ddpm.samplers import SAMPLERS, register_sampler, sample
from ddpm.schedules import SCHEDULES, Schedule, make_betas, register_schedule, respace_betas, space_timesteps

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
    "RunConfig",
    "PROCESSES",
    "DiffusionProcess",
    "ProcessConfig",
    "GaussianConfig",
    "GaussianDiffusion",
    "PMeanVariance",
    "TrainingLosses",
    "build_process",
    "register_process",
    "eps_from_x0",
    "prediction_target",
    "x0_from_prediction",
    "SCHEDULES",
    "Schedule",
    "make_betas",
    "register_schedule",
    "respace_betas",
    "space_timesteps",
    "SAMPLERS",
    "register_sampler",
    "sample",
    "NLLEstimate",
    "NLLResult",
    "nll",
    "nll_estimate",
    "discretized_gaussian_log_likelihood",
    "normal_kl",
    "MLPConfig",
    "MLPDenoiser",
    "UNet",
    "UNetConfig",
    "load_pretrained",
    "mlp_preset",
    "unet_preset",
]
