"""SDEdit (Meng et al. 2022): turn a rough image into a realistic one by noising it part way and denoising.

With strength s in (0, 1], the input is noised to t0 = round(s (T - 1)) by the forward process in
closed form, x_t0 = sqrt(abar_t0) x_0 + sqrt(1 - abar_t0) eps (Eq. 4 of Ho et al.), and any sampler
runs from t0 down to clean data: its time grid is laid over the sub-chain 0..t0, so every spacing
(``karras``, ``log-snr``, ...) starts at t0. Small s keeps the input's details, s = 1 starts from
the noisiest point, where sqrt(abar_{T-1}) of the input is left (0.006 for the linear schedule of
T = 1000), and matches sampling from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ddpm.choices import Spacing
from ddpm.errors import UserError
from ddpm.processes import DiffusionProcess
from ddpm.samplers import get_spec, nfe_budget, sample, sampling_chain
from ddpm.tensors import Generator, Model


def start_timestep(strength: float, num_timesteps: int) -> int:
    """t0 = round(strength (T - 1)), the timestep the input is noised to; strength must lie in (0, 1]."""
    if not 0.0 < strength <= 1.0:
        raise UserError(f"strength must lie in (0, 1] (0 keeps the input, 1 starts from noise), got {strength}")
    return round(strength * (num_timesteps - 1))


def sdedit_plan(process: DiffusionProcess, strength: float, sampler: str, steps: int | None
                ) -> tuple[DiffusionProcess, int]:
    """The sub-chain 0..t0 the sampler walks and the network evaluations it spends there.

    The evaluations are ``steps`` (the sampler's default when None), fewer only where the sub-chain
    has fewer points than they would need.
    """
    t0 = start_timestep(strength, process.num_timesteps)
    sub = process.respaced(torch.arange(t0 + 1))
    nfe = nfe_budget(sampler, steps, process.num_timesteps)
    while nfe > 1 and get_spec(sampler).points_for_nfe(nfe) > t0 + 1:
        nfe -= 1
    return sub, nfe


def sdedit(
    process: DiffusionProcess,
    model: Model,
    x0: torch.Tensor,
    strength: float,
    *,
    sampler: str,
    steps: int | None = None,
    spacing: Spacing | None = None,
    generator: Generator = None,
    clip_denoised: bool = True,
    **options: Any,
) -> torch.Tensor:
    """Edit ``x0`` ``[B, ...]`` in [-1, 1] at ``strength`` (see the module docstring); returns ``[B, ...]``.

    ``generator`` draws eps of x_t0 first (as :func:`ddpm.samplers.sample` draws x_T) and then the
    sampler's noise, so at strength 1 the edit differs from plain sampling with the same generator
    only by the input's sqrt(abar_{T-1}) x_0.
    """
    sub, nfe = sdedit_plan(process, strength, sampler, steps)
    t0 = torch.full((x0.shape[0],), sub.num_timesteps - 1, dtype=torch.long, device=x0.device)
    x_t0 = sub.q_sample(x0, t0, sub.draw_noise(x0.shape, generator, device=x0.device))
    return sample(sub, model, x0.shape, sampler=sampler, steps=nfe, spacing=spacing, clip_denoised=clip_denoised,
                  generator=generator, noise=x_t0, device=x0.device, **options)


def edit_timesteps(process: DiffusionProcess, strength: float, sampler: str, steps: int | None,
                   spacing: Spacing | None) -> Sequence[float]:
    """The network timesteps an edit visits (largest first), for records."""
    sub, nfe = sdedit_plan(process, strength, sampler, steps)
    return [float(t) for t in sampling_chain(sub, sampler, nfe, spacing).timestep_map.flip(0)]
