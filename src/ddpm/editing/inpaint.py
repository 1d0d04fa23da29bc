"""Inpainting with the reverse chain: RePaint (Lugmayr et al. 2022), with its resampling and jumps.

The known pixels of x_{t-1} are drawn from the forward process applied to the input,
q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_0, (1 - abar_{t-1}) I) (Eq. 4 of Ho et al.); the unknown
ones come from the model's reverse step p_theta(x_{t-1} | x_t); the mask joins them (RePaint Eq. 8).
At the last step the known pixels are the input itself, exactly.

Resampling: after arriving at some levels the chain is pushed back up by ``jump`` levels through
the forward process, q(x_{t+j} | x_t) = N(sqrt(abar_{t+j} / abar_t) x_t, (1 - abar_{t+j} / abar_t) I),
and walked down again, so the model's pixels can agree with the known ones; each jump point is
revisited ``resample - 1`` times. The jump points are the levels 0, j, 2j, ... below K - j, as in
the paper's released schedule (``get_schedule_jump``) and diffusers' ``RePaintScheduler``.

Levels count the chain's K points: level L >= 1 is x at chain index L - 1, level 0 is the clean
image; the walk starts at level K with x ~ p(x_T). A move down costs one network evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ddpm.errors import UserError
from ddpm.processes import GaussianDiffusion
from ddpm.samplers import get_spec, make_options
from ddpm.samplers.state import SamplerState
from ddpm.tensors import Generator, Model, randn

REPAINT_SAMPLERS = ("ancestral", "ddim")  # one-step samplers: a jump back up leaves no multistep history behind


def check_repaint_sampler(sampler: str) -> None:
    """Raise :class:`~ddpm.errors.UserError` unless ``sampler`` is one of :data:`REPAINT_SAMPLERS`."""
    if sampler not in REPAINT_SAMPLERS:
        raise UserError(f"inpainting walks the chain with {' or '.join(REPAINT_SAMPLERS)}, not {sampler!r}")


def repaint_schedule(points: int, resample: int = 1, jump: int = 1) -> list[tuple[int, int]]:
    """The moves (from level, to level) of RePaint over a chain of ``points`` levels (see the module docstring).

    ``resample`` is U, the passes through each jump point (1: no resampling), ``jump`` the levels
    gone back up at once. Moves down go one level; the number of them is the network evaluations.
    """
    if points < 1 or resample < 1 or jump < 1:
        raise UserError(f"steps, resample and jump must be >= 1, got {points}, {resample} and {jump}")
    remaining = {level: resample - 1 for level in range(0, points - jump, jump)}
    moves, level = [], points
    while level > 0:
        moves.append((level, level - 1))
        level -= 1
        if remaining.get(level, 0) > 0:
            remaining[level] -= 1
            moves.append((level, level + jump))
            level += jump
    return moves


def repaint_evaluations(points: int, resample: int = 1, jump: int = 1) -> int:
    """Network evaluations of :func:`inpaint` with these settings (its moves down)."""
    return sum(1 for a, b in repaint_schedule(points, resample, jump) if b < a)


def inpaint(
    chain: GaussianDiffusion,
    model: Model,
    x0: torch.Tensor,
    keep: torch.Tensor,
    *,
    resample: int = 1,
    jump: int = 1,
    sampler: str = "ancestral",
    generator: Generator = None,
    known_generator: Generator = None,
    clip_denoised: bool = True,
    noise: torch.Tensor | None = None,
    trained: GaussianDiffusion | None = None,
    options: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """Fill the pixels where ``keep`` is False: ``[B, ...]`` with ``x0[keep]`` unchanged, bit for bit.

    Args:
        chain: the (respaced) chain to walk; its K points are the levels of :func:`repaint_schedule`.
        model: the network, conditioning bound (``model(x_t, t)``).
        x0: the input images ``[B, C, H, W]`` in [-1, 1].
        keep: bool, broadcastable to ``x0`` (see :func:`ddpm.editing.masks.check_mask`).
        sampler: the model's step down, ``ancestral`` (Ho et al.'s p_theta) or ``ddim`` (option ``eta``).
        generator: the noise of x_T and of the model's steps, drawn exactly as :func:`ddpm.samplers.sample`
            draws it, so that an all-unknown mask reproduces plain sampling with the same generator.
        known_generator: the noise of the known pixels' forward draws and of the jumps back up.
        noise: x_T itself (overrides ``generator`` for the start).
        trained: the process ``chain`` was respaced from (default: ``chain``).
        options: the sampler's options (``eta`` of ``ddim``).
    """
    check_repaint_sampler(sampler)
    spec = get_spec(sampler)
    state = SamplerState(chain=chain, model=model, generator=generator, clip_denoised=clip_denoised,
                         options=make_options(sampler, options), trained=trained or chain)
    abar = chain.schedule.alphas_cumprod.tolist()

    def level_abar(level: int) -> float:
        return 1.0 if level == 0 else abar[level - 1]

    def fresh(like: torch.Tensor) -> torch.Tensor:
        return randn(like.shape, known_generator, device=like.device, dtype=like.dtype)

    x = chain.prior_sample(x0.shape, generator, device=x0.device) if noise is None else noise.to(x0.device)
    for start, end in repaint_schedule(chain.num_timesteps, resample, jump):
        if end < start:  # the model's step down, then the known pixels from q(x_{t-1} | x_0)
            x, _ = spec.step(state, x, start - 1)
            a = level_abar(end)
            known = x0 if end == 0 else math.sqrt(a) * x0 + math.sqrt(1.0 - a) * fresh(x0)
            x = torch.where(keep, known, x)
        else:  # back up through the forward process, q(x_{t+j} | x_t)
            ratio = level_abar(end) / level_abar(start)
            x = math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * fresh(x)
    return x
