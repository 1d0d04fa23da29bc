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
``log-snr``    uniform in the log-SNR log(abar / (1 - abar)) from its noisy end to its value at t = 0
``karras``     EDM's rho = 7 spacing of sigma = sqrt((1 - abar) / abar) from sigma_max to sigma(0)
=============  =====================================================================================

The noisy end of ``log-snr`` and ``karras`` is sigma(T-1), or :data:`SIGMA_MAX` where the schedule
goes beyond it (log-SNR = -2 log sigma_max). The cosine schedule does (T = 1000): its last
steps take sigma from 71 at t = 990 and 160 at t = 995 to 20000 at t = 999 (the clipped last beta),
a stretch where x_t holds almost no signal and where a 10-point grid uniform in log-SNR or in
sigma^(1/7) from sigma(T-1) would put four or five of its points.
Starting there instead of at T-1 means x_T ~ N(0, I) stands for a marginal whose signal scale
alpha = 1 / sqrt(1 + sigma_max^2) is 0.006 (the same shortcut as ``leading``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ddpm.choices import SPACINGS, Spacing, check_choice
from ddpm.errors import UserError
from ddpm.schedules import Schedule

KARRAS_RHO = 7.0  # Karras et al. 2022, Eq. 5
SIGMA_MAX = 164.0  # exp(5.1): the noisy end of the lambda and sigma grids (diffusers' lambda_min_clipped = -5.1)


CONTINUOUS_SPACINGS = ("log-snr", "karras")  # need the schedule's log-SNR; the others need only T


def make_grid(num_timesteps: int, num_points: int, spacing: Spacing, *, schedule: Schedule | None = None,
              rho: float = KARRAS_RHO, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """The ``num_points`` timesteps of ``spacing`` (see the module docstring), float64 ``[K]``, increasing.

    Integer spacings return whole numbers (as float64) and need only T; ``log-snr`` and ``karras``
    need the Gaussian ``schedule`` and may return fractions.
    """
    check_choice("spacing", spacing, SPACINGS)
    T, K = int(num_timesteps), int(num_points)
    if not 1 <= K <= T:
        raise UserError(f"a grid needs between 1 and T={T} points, got {K}")
    if spacing in CONTINUOUS_SPACINGS:
        if schedule is None:
            raise UserError(f"the {spacing!r} spacing is spaced in the log-SNR of a Gaussian schedule; this chain has "
                            f"none (use one of {', '.join(s for s in SPACINGS if s not in CONTINUOUS_SPACINGS)})")
        return _continuous_grid(schedule, K, spacing, rho=rho, sigma_max=sigma_max)
    if spacing == "linspace":
        t = np.linspace(0, T - 1, K) if K > 1 else np.array([T - 1.0])
    elif spacing == "uniform":
        t = np.linspace(0, T - 1, K + 1)[1:]
    elif spacing == "leading":
        t = np.arange(K) * (T // K)
    else:  # trailing
        t = np.round(np.arange(T, 0, -T / K))[:K] - 1
    out = torch.as_tensor(np.round(t), dtype=torch.float64)
    out = out.unique()  # sorted
    if out.numel() != K:
        raise UserError(f"{spacing!r} spacing gives only {out.numel()} distinct timesteps for K={K}, T={T}")
    return out


def _continuous_grid(schedule: Schedule, K: int, spacing: Spacing, *, rho: float, sigma_max: float) -> torch.Tensor:
    """The ``log-snr`` and ``karras`` grids (see the module docstring)."""
    T = schedule.num_timesteps
    log_snr = schedule.log_snr()
    log_snr_min = max(float(log_snr[-1]), -2.0 * math.log(sigma_max))
    if K == 1:
        return schedule.timestep_at_log_snr(torch.tensor([log_snr_min], dtype=torch.float64))
    if spacing == "log-snr":
        grid = torch.linspace(log_snr_min, float(log_snr[0]), K, dtype=torch.float64)
    else:  # sigma = sqrt((1 - abar) / abar) = exp(-log_snr / 2), uniform in sigma^(1 / rho)
        ramp = torch.linspace(0, 1, K, dtype=torch.float64)
        s_max, s_min = math.exp(-0.5 * log_snr_min / rho), math.exp(-0.5 * float(log_snr[0]) / rho)
        grid = -2.0 * rho * torch.log(s_max + ramp * (s_min - s_max))
    t = schedule.timestep_at_log_snr(grid).flip(0).clamp(0, T - 1)
    return torch.where((t - t.round()).abs() < 1e-9, t.round(), t)  # ends exact, not 1e-15 off
