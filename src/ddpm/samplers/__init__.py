"""Samplers of the reverse chain, from x_T ~ N(0, I) back to x_0.

Every sampler is one step function with one signature,
``step(state: SamplerState, x, index) -> (x at index - 1, x0_hat)``, registered in :data:`SAMPLERS`
with the facts the driver needs (how many grid points K network evaluations buy, the default
spacing, the options it reads). :func:`sample` builds the time grid, respaces the chain onto it and
runs the steps. See :mod:`ddpm.samplers.state` for what a step may read.

``steps`` is the unit of cost: K network evaluations (NFE) for every sampler, checked after each run.

* ``ancestral``: Ho et al. 2020 Algorithm 2 on the (respaced) chain; K evaluations for K steps.
* ``ddim``: Song et al. 2021 Eq. 12; ``eta=0`` is deterministic (first-order probability-flow ODE
  solver), ``eta=1`` coincides with ``ancestral`` under ``variance="fixed_small"``.
* ``dpm++2m``, ``dpm++3m``: DPM-Solver++ multistep, second and third order (Lu et al. 2022b);
  ``dpm++2m-sde``: its SDE variant (option ``eta``, 1 = the reverse SDE). See :mod:`.dpm_solver`.
* ``unipc``: UniPC-bh2 predictor-corrector (Zhao et al. 2023; option ``order``). See :mod:`.unipc`.
* ``heun``: EDM's Heun sampler (Karras et al. 2022; option ``churn``), two evaluations per
  interval but the last. See :mod:`.heun`.

The ODE and SDE solvers use the network's mean (through x0_hat) and ignore a learned variance;
only ``ancestral`` (and ``ddim`` with eta = 1 on ``fixed_small``) follow the model's variance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.samplers.ancestral import ancestral_step
from ddpm.samplers.ddim import ddim_step
from ddpm.samplers.dpm_solver import dpmpp_2m_step, dpmpp_3m_step
from ddpm.samplers.grids import SPACINGS, Spacing, make_grid
from ddpm.samplers.heun import heun_points, heun_step
from ddpm.samplers.state import Denoised, SamplerState
from ddpm.samplers.unipc import check_unipc_options, unipc_step
from ddpm.tensors import Generator, Model, bind_condition, first_parameter_device, randn

StepFn = Callable[[SamplerState, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its step function and what the driver must know about it.

    Attributes:
        step: the step function.
        default_spacing: the time grid used when the caller names none (each sampler says why).
        default_steps: network evaluations when the caller gives none (``None``: every timestep).
        options: the options the step reads, with their defaults (validated by :func:`sample`).
        points_for_nfe: how many grid points K network evaluations buy (identity for one
            evaluation per point).
        description: one line for listings and ``--help``.
        check_options: raises :class:`~ddpm.errors.UserError` for option values the step cannot take.
    """

    step: StepFn
    default_spacing: Spacing
    default_steps: int | None = None
    options: dict[str, float] = field(default_factory=dict)
    points_for_nfe: Callable[[int], int] = lambda nfe: nfe
    description: str = ""
    check_options: Callable[[dict[str, float]], None] | None = None


SAMPLERS: dict[str, SamplerSpec] = {
    "ancestral": SamplerSpec(
        ancestral_step, "linspace", None, {},
        # linspace keeps t = 0, the decoder step of the paper's chain (measured better than
        # dropping it on the demo model, README "The demo recipe").
        description="DDPM ancestral sampling (Ho et al. 2020, Algorithm 2)",
    ),
    "ddim": SamplerSpec(
        ddim_step, "linspace", None, {"eta": 0.0},
        description="DDIM (Song et al. 2021), eta = 0 deterministic",
    ),
    # Defaults measured with benchmarks/samplers.py (demo MNIST model and 8x8 digits model, cosine
    # schedule; benchmarks/results/samplers-*.md): the spacing that did best around the default NFE.
    "dpm++2m": SamplerSpec(
        # karras: best of the four spacings at 8-20 NFE on both models (demo, 10 NFE: 4.6 vs trailing's
        # 6.9); only at 5 NFE is a spacing uniform in t better (12 vs 24)
        dpmpp_2m_step, "karras", 20, {},
        description="DPM-Solver++(2M), second-order multistep ODE solver (Lu et al. 2022b)",
    ),
    "dpm++2m-sde": SamplerSpec(
        # karras: best at 10-20 NFE (demo, five seeds at 10 NFE: 4.37 +/- 0.51 against trailing's
        # 5.17 +/- 0.80; one seed at 20 NFE: 3.1 against 4.7)
        dpmpp_2m_step, "karras", 20, {"eta": 1.0},
        description="SDE-DPM-Solver++(2M): second-order multistep with fresh noise (eta = 1: the reverse SDE)",
    ),
    "dpm++3m": SamplerSpec(
        # trailing: on karras grids the third-order steps went unstable at 10-15 NFE on both models
        dpmpp_3m_step, "trailing", 20, {},
        description="DPM-Solver++(3M), third-order multistep ODE solver",
    ),
    "unipc": SamplerSpec(
        # trailing, 10: the best sampler at 5 NFE on both models, flat from 8 NFE on
        unipc_step, "trailing", 10, {"order": 2.0},
        description="UniPC-bh2 predictor-corrector (Zhao et al. 2023), order 3 with the default UniP-2",
        check_options=check_unipc_options,
    ),
    "heun": SamplerSpec(
        # log-snr: better than EDM's karras spacing at 15-20 NFE on the demo model (3.7 vs 4.3 at 20)
        heun_step, "log-snr", 20, {"churn": 0.0}, points_for_nfe=heun_points,
        description="EDM's Heun sampler (Karras et al. 2022), 2 evaluations per interval; churn > 0 adds noise",
    ),
}


# The default of `ddpm sample`, `ddpm eval` and `Pipeline.sample`, at its default 20 evaluations: the
# best measured sampler from 10 NFE up on both models (benchmarks/results/samplers-*.md); at 10 NFE it
# matches 50 ancestral steps on the demo model (4.37 +/- 0.51 against 4.90 +/- 0.47, five seeds).
DEFAULT_SAMPLER = "dpm++2m-sde"


def sampler_names() -> tuple[str, ...]:
    """The registered samplers, in registration order (used for validation and CLI choices)."""
    return tuple(SAMPLERS)


def _frame_indices(num_steps: int, frames: int | None) -> set[int]:
    """Which loop iterations (0 = x_T, num_steps = x_0) to record in a trajectory."""
    if frames is None or frames >= num_steps + 1:
        return set(range(num_steps + 1))
    if frames < 2:
        raise UserError(f"trajectory_frames must be >= 2 (x_T and x_0), got {frames}")
    return {round(i * num_steps / (frames - 1)) for i in range(frames)}


def sampling_chain(
    diffusion: GaussianDiffusion, sampler: str, steps: int | Sequence[float] | None, spacing: Spacing | None
) -> GaussianDiffusion:
    """The chain a sampler walks: ``diffusion`` respaced onto the grid that ``steps`` evaluations buy.

    ``steps`` is a number of network evaluations (None: the sampler's default, all T for
    ``ancestral`` and ``ddim``) or an explicit list of timesteps.
    """
    return _plan(diffusion, sampler, steps, spacing)[0]


def nfe_budget(sampler: str, steps: int | None, num_timesteps: int) -> int:
    """The network evaluations ``steps`` means for ``sampler`` (its default when None; all T for ancestral and ddim)."""
    spec = get_spec(sampler)
    nfe = spec.default_steps if steps is None else steps
    nfe = num_timesteps if nfe is None else int(nfe)
    if nfe < 1:
        raise UserError(f"steps (network evaluations) must be >= 1, got {nfe}")
    return nfe


def _plan(
    diffusion: GaussianDiffusion, sampler: str, steps: int | Sequence[float] | None, spacing: Spacing | None
) -> tuple[GaussianDiffusion, int | None]:
    """The respaced chain and the evaluation budget (None when the caller gave the grid itself)."""
    spec = get_spec(sampler)
    if steps is not None and not isinstance(steps, int):
        return diffusion.respaced(steps), None
    nfe = nfe_budget(sampler, steps, diffusion.num_timesteps)
    T = diffusion.num_timesteps
    points = spec.points_for_nfe(nfe)
    if points > T:
        raise UserError(f"{sampler!r} with {nfe} network evaluations needs {points} timesteps, but T={T}")
    grid = make_grid(diffusion.schedule, points, spacing or spec.default_spacing)
    return diffusion.respaced(grid), nfe


def get_spec(sampler: str) -> SamplerSpec:
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler]


def check_options(sampler: str, options: dict[str, float]) -> None:
    """Raise :class:`~ddpm.errors.UserError` unless ``options`` are options of ``sampler`` with valid values."""
    spec = get_spec(sampler)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        valid = ", ".join(spec.options) or "none"
        raise UserError(f"sampler {sampler!r} has no option(s) {unknown}; its options: {valid}")
    for name, value in options.items():
        if value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")
    if spec.check_options is not None:
        spec.check_options({**spec.options, **options})


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
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
    callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
    **options: float,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run the reverse chain from x_T ~ N(0, I) to x_0 and return x_0 ``shape``.

    Args:
        sampler: a name in :data:`SAMPLERS`.
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
    check_options(sampler, options)
    chain, budget = _plan(diffusion, sampler, steps, spacing)
    device = torch.device(device) if device is not None else first_parameter_device(model)
    x = randn(shape, generator, device=device, dtype=torch.float32) if noise is None else noise.to(device)
    if tuple(x.shape) != tuple(shape):
        raise UserError(f"noise shape {tuple(x.shape)} differs from requested shape {tuple(shape)}")
    state = SamplerState(
        chain=chain, model=bind_condition(model, None if y is None else y.to(device)), generator=generator,
        clip_denoised=clip_denoised, options={**spec.options, **options}, nfe_budget=budget, trained=diffusion,
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
    "DEFAULT_SAMPLER",
    "SAMPLERS",
    "SPACINGS",
    "Denoised",
    "SamplerSpec",
    "SamplerState",
    "Spacing",
    "ancestral_step",
    "check_options",
    "ddim_step",
    "get_spec",
    "make_grid",
    "nfe_budget",
    "sample",
    "sampler_names",
    "sampling_chain",
]
