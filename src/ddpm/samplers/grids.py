"""Time grids: which timesteps a sampler evaluates the network at, from x_T towards x_0.

A grid of K points is K network timesteps in the trained chain's index space (0..T-1, 0-based as
everywhere in ``ddpm``), returned increasing. A sampler visits them from the largest down and then
steps to clean data (abar = 1), so K points cost K network evaluations for every one-evaluation-
per-point sampler. Fractional timesteps are allowed (the network is evaluated there, and abar is
interpolated in log-SNR, see :meth:`ddpm.schedules.Schedule.alphas_cumprod_at`).

=============  =====================================================================================
spacing        the K points
=============  =====================================================================================
``linspace``   round(linspace(0, T-1, K)): both ends included (the respaced DDPM of Nichol & Dhariwal)
``uniform``    round(linspace(0, T-1, K+1))[1:]: uniform in t, the clean end is the (K+1)-th point
               (diffusers' ``timestep_spacing="linspace"`` of its multistep solvers)
``leading``    (T // K) * k for k = 0..K-1 (diffusers' ``"leading"``, the DDIM paper's spacing)
``trailing``   round(T - k T / K) - 1 for k = 0..K-1 (diffusers' ``"trailing"``; starts at T-1)
``log-snr``    uniform in lambda = log(abar / (1 - abar)) from lambda(T-1) to lambda(0), both included
``karras``     EDM's rho = 7 spacing of sigma = sqrt((1 - abar) / abar) from sigma(T-1) to sigma(0)
=============  =====================================================================================
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import torch

from ddpm.choices import check_choice
from ddpm.schedules import Schedule

Spacing = Literal["linspace", "uniform", "leading", "trailing", "log-snr", "karras"]
SPACINGS: tuple[str, ...] = get_args(Spacing)
KARRAS_RHO = 7.0  # Karras et al. 2022, Eq. 5


def make_grid(schedule: Schedule, num_points: int, spacing: Spacing, *, rho: float = KARRAS_RHO) -> torch.Tensor:
    """The ``num_points`` timesteps of ``spacing`` (see the module docstring), float64 ``[K]``, increasing.

    Integer spacings return whole numbers (as float64); ``log-snr`` and ``karras`` may return fractions.
    """
    check_choice("spacing", spacing, SPACINGS)
    T, K = schedule.num_timesteps, int(num_points)
    if not 1 <= K <= T:
        raise ValueError(f"a grid needs between 1 and T={T} points, got {K}")
    if spacing == "linspace":
        t = np.linspace(0, T - 1, K) if K > 1 else np.array([T - 1.0])
    elif spacing == "uniform":
        t = np.linspace(0, T - 1, K + 1)[1:]
    elif spacing == "leading":
        t = np.arange(K) * (T // K)
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / K))[:K] - 1
    elif spacing == "log-snr":
        lam = schedule.log_snr()
        if K == 1:
            return torch.tensor([T - 1.0], dtype=torch.float64)
        grid = torch.linspace(float(lam[-1]), float(lam[0]), K, dtype=torch.float64)
        return schedule.timestep_at_log_snr(grid).flip(0).clamp(0, T - 1)
    else:  # karras
        sigma = torch.exp(-0.5 * schedule.log_snr())  # sqrt((1 - abar) / abar), increasing in t
        if K == 1:
            return torch.tensor([T - 1.0], dtype=torch.float64)
        ramp = torch.linspace(0, 1, K, dtype=torch.float64)
        s_max, s_min = float(sigma[-1]) ** (1 / rho), float(sigma[0]) ** (1 / rho)
        sigmas = (s_max + ramp * (s_min - s_max)) ** rho
        return schedule.timestep_at_log_snr(-2.0 * torch.log(sigmas)).flip(0).clamp(0, T - 1)
    out = torch.as_tensor(np.round(t), dtype=torch.float64)
    out = out.unique()  # sorted
    if out.numel() != K:
        raise ValueError(f"{spacing!r} spacing gives only {out.numel()} distinct timesteps for K={K}, T={T}")
    return out
