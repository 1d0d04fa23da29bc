"""Samplers of the reverse chain, from x_T ~ p(x_T) back to x_0.

Every sampler is one step function with one signature,
``step(state: SamplerState, x, index) -> (x at index - 1, x0_hat)``, registered in :data:`SAMPLERS`
(:mod:`.registry`) with its typed options and the facts the driver needs (the process it walks,
how many grid points K network evaluations buy, the default spacing). :func:`sample` builds the
time grid, respaces the chain onto it and runs the steps. See :mod:`ddpm.samplers.state` for what
a step may read. Each sampler is a module of this package that registers itself when imported;
the package imports all of its modules, so a new sampler is one module (and its test).

``steps`` is the unit of cost: K network evaluations (NFE) for every sampler, checked after each run.

* ``ancestral``: Ho et al. 2020 Algorithm 2 on the (respaced) chain, through the process's own
  reverse step, so it walks every process; K evaluations for K steps.
* ``ddim``: Song et al. 2021 Eq. 12; ``eta=0`` is deterministic (first-order probability-flow ODE
  solver), ``eta=1`` coincides with ``ancestral`` under ``variance="fixed_small"``.
* ``dpm++2m``, ``dpm++3m``: DPM-Solver++ multistep, second and third order (Lu et al. 2022b);
  ``dpm++2m-sde``: its SDE variant (option ``eta``, 1 = the reverse SDE). See :mod:`.dpm_solver`.
* ``unipc``: UniPC-bh2 predictor-corrector (Zhao et al. 2023; option ``order``). See :mod:`.unipc`.
* ``heun``: EDM's Heun sampler (Karras et al. 2022; option ``churn``), two evaluations per
  interval but the last. See :mod:`.heun`.

All but ``ancestral`` solve the probability-flow ODE or the reverse SDE of Gaussian diffusion: they
use the network's mean (through x0_hat) and ignore a learned variance; only ``ancestral`` (and
``ddim`` with eta = 1 on ``fixed_small``) follow the model's variance.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, overload

import torch

from ddpm.choices import SPACINGS, Spacing
from ddpm.errors import UserError
from ddpm.processes import DiffusionProcess, GaussianDiffusion
from ddpm.samplers.grids import make_grid
from ddpm.samplers.registry import (
    SAMPLERS,
    NoOptions,
    SamplerOptions,
    SamplerSpec,
    all_options,
    get_spec,
    make_options,
    option,
    register_sampler,
    sampler_names,
)
from ddpm.samplers.state import Denoised, SamplerState
from ddpm.tensors import Generator, Model, bind_condition, first_parameter_device

for _module in pkgutil.iter_modules(__path__):  # each sampler module registers itself
    importlib.import_module(f"{__name__}.{_module.name}")


def _frame_indices(num_steps: int, frames: int | None) -> set[int]:
    """Which loop iterations (0 = x_T, num_steps = x_0) to record in a trajectory."""
    if frames is None or frames >= num_steps + 1:
        return set(range(num_steps + 1))
    if frames < 2:
        raise UserError(f"trajectory_frames must be >= 2 (x_T and x_0), got {frames}")
    return {round(i * num_steps / (frames - 1)) for i in range(frames)}


def samplers_for(process: DiffusionProcess) -> list[str]:
    """The names of the samplers that walk ``process``."""
    return [s.name for s in SAMPLERS.values() if s.family in (None, process.name)]


def check_walks(spec: SamplerSpec, process: DiffusionProcess) -> None:
    """Raise :class:`~ddpm.errors.UserError` unless ``spec`` can walk ``process``."""
    if spec.family is not None and spec.family != process.name:
        raise UserError(f"sampler {spec.name!r} walks {spec.family} diffusion, not the {process.name!r} process of "
                        f"this model; samplers for it: {', '.join(samplers_for(process))}")


def sampling_chain(
    process: DiffusionProcess, sampler: str, steps: int | Sequence[float] | None, spacing: Spacing | None
) -> DiffusionProcess:
    """The chain a sampler walks: ``process`` respaced onto the grid that ``steps`` evaluations buy.

    ``steps`` is a number of network evaluations (None: the sampler's default, all T for
    ``ancestral`` and ``ddim``) or an explicit list of timesteps.
    """
    return _plan(process, sampler, steps, spacing)[0]


def nfe_budget(sampler: str, steps: int | None, num_timesteps: int) -> int:
    """The network evaluations ``steps`` means for ``sampler`` (its default when None; all T for ancestral and ddim)."""
    spec = get_spec(sampler)
    nfe = spec.default_steps if steps is None else steps
    nfe = num_timesteps if nfe is None else int(nfe)
    if nfe < 1:
        raise UserError(f"steps (network evaluations) must be >= 1, got {nfe}")
    return nfe


def _plan(
    process: DiffusionProcess, sampler: str, steps: int | Sequence[float] | None, spacing: Spacing | None
) -> tuple[DiffusionProcess, int | None]:
    """The respaced chain and the evaluation budget (None when the caller gave the grid itself)."""
    spec = get_spec(sampler)
    check_walks(spec, process)
    if steps is not None and not isinstance(steps, int):
        return process.respaced(steps), None
    nfe = nfe_budget(sampler, steps, process.num_timesteps)
    T = process.num_timesteps
    points = spec.points_for_nfe(nfe)
    if points > T:
        raise UserError(f"{sampler!r} with {nfe} network evaluations needs {points} timesteps, but T={T}")
    schedule = process.schedule if isinstance(process, GaussianDiffusion) else None
    grid = make_grid(T, points, spacing or spec.default_spacing, schedule=schedule)
    return process.respaced(grid), nfe


def check_options(sampler: str, options: Mapping[str, object]) -> SamplerOptions:
    """The typed options of ``sampler``; :class:`~ddpm.errors.UserError` for an unknown option or a bad value."""
    return make_options(sampler, options)


Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@overload
def sample(process: DiffusionProcess, model: Model, shape: Sequence[int], *, sampler: str = ...,
           steps: int | Sequence[float] | None = ..., spacing: Spacing | None = ..., clip_denoised: bool = ...,
           generator: Generator = ..., y: torch.Tensor | None = ..., progress: bool = ...,
           return_trajectory: Literal[False] = ..., trajectory_frames: int | None = ...,
           noise: torch.Tensor | None = ..., device: torch.device | str | None = ..., callback: Callback | None = ...,
           **options: Any) -> torch.Tensor: ...


@overload
def sample(process: DiffusionProcess, model: Model, shape: Sequence[int], *, sampler: str = ...,
           steps: int | Sequence[float] | None = ..., spacing: Spacing | None = ..., clip_denoised: bool = ...,
           generator: Generator = ..., y: torch.Tensor | None = ..., progress: bool = ...,
           return_trajectory: Literal[True], trajectory_frames: int | None = ...,
           noise: torch.Tensor | None = ..., device: torch.device | str | None = ..., callback: Callback | None = ...,
           **options: Any) -> tuple[torch.Tensor, torch.Tensor]: ...


@torch.no_grad()
def sample(
    process: DiffusionProcess,
    model: Model,
    shape: Sequence[int],
    *,
    sampler: str = "ancestral",
    steps: int | Sequence[float] | None = None,
    spacing: Spacing | None = None,
    clip_denoised: bool = True,
    generator: Generator = None,
    y: torch.Tensor | None = None,
    progress: bool = False,
    return_trajectory: bool = False,
    trajectory_frames: int | None = None,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    callback: Callback | None = None,
    **options: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run the reverse chain from x_T ~ p(x_T) to x_0 and return x_0 ``shape``.

    Args:
        process: the diffusion process the network was trained with.
        sampler: a name in :data:`SAMPLERS` that walks ``process``.
        steps: network evaluations K (the sampler turns them into grid points and spends exactly
            K), or the grid's timesteps themselves; ``None`` = the sampler's default (all T for
            ancestral and DDIM).
        spacing: the time grid (see :mod:`ddpm.samplers.grids`); ``None`` = the sampler's default.
        clip_denoised: clamp the predicted x_0 to [-1, 1] at each step (images).
        generator: one generator for the batch, or one per example so that example i is the same
            whatever the batch it is drawn in.
        y: class labels ``[B]`` of a conditional model (passed as ``model(x_t, t, y=y)``).
        return_trajectory: also return x_T, ..., x_0 as ``[F, B, ...]``.
        trajectory_frames: record only this many evenly spaced frames (default: every step).
        noise: x_T itself (overrides the generator for the start).
        callback: called as ``callback(i, t, x_t, pred_x0)`` after each step.
        **options: the sampler's options (e.g. ``eta`` of DDIM), see ``SAMPLERS[name].options``.
    """
    spec = get_spec(sampler)
    typed = make_options(sampler, options)
    chain, budget = _plan(process, sampler, steps, spacing)
    device = torch.device(device) if device is not None else first_parameter_device(model)
    x = process.prior_sample(shape, generator, device=device) if noise is None else noise.to(device)
    if tuple(x.shape) != tuple(shape):
        raise UserError(f"noise shape {tuple(x.shape)} differs from requested shape {tuple(shape)}")
    state = SamplerState(
        chain=chain, model=bind_condition(model, None if y is None else y.to(device)), generator=generator,
        clip_denoised=clip_denoised, options=typed, nfe_budget=budget, trained=process,
    )
    num_steps = chain.num_timesteps
    keep = _frame_indices(num_steps, trajectory_frames) if return_trajectory else set()
    frames = [x] if 0 in keep else []
    indices: Any = range(num_steps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"{sampler} sampling", total=num_steps)
    for i, index in enumerate(indices, start=1):
        x, pred_x0 = spec.step(state, x, index)
        if callback is not None:
            callback(i, state.timesteps(index, x), x, pred_x0)
        if i in keep:
            frames.append(x)
    if budget is not None and state.nfe != budget:  # the unit of cost is a promise: a solver that breaks it is a bug
        raise RuntimeError(f"{sampler!r} spent {state.nfe} network evaluations for steps={budget}")
    if return_trajectory:
        return x, torch.stack(frames)
    return x


__all__ = [
    "SAMPLERS",
    "SPACINGS",
    "Denoised",
    "NoOptions",
    "SamplerOptions",
    "SamplerSpec",
    "SamplerState",
    "Spacing",
    "all_options",
    "check_options",
    "check_walks",
    "samplers_for",
    "get_spec",
    "make_grid",
    "make_options",
    "nfe_budget",
    "option",
    "register_sampler",
    "sample",
    "sampler_names",
    "sampling_chain",
]
