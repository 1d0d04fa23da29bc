"""Noise schedules and the coefficients derived from them.

Symbol table (Ho et al. 2020; index ``t`` is 0-based and stands for the paper's step t+1, so
index 0 is the decoder step L_0 and index T-1 the last noising step):

=============================  =====================================  ==========================
name                           paper                                  meaning
=============================  =====================================  ==========================
``betas``                      beta_t                                 variance of q(x_t | x_{t-1})
``alphas``                     alpha_t = 1 - beta_t
``alphas_cumprod``             abar_t = prod_{s<=t} alpha_s           q(x_t | x_0) signal power
``alphas_cumprod_prev``        abar_{t-1} (abar_0 = 1)
``posterior_variance``         beta-tilde_t (Eq. 7)                   variance of q(x_{t-1} | x_t, x_0)
``posterior_mean_coef1``       sqrt(abar_{t-1}) beta_t / (1 - abar_t) coefficient of x_0 (Eq. 7)
``posterior_mean_coef2``       sqrt(alpha_t)(1 - abar_{t-1})/(1-abar_t) coefficient of x_t (Eq. 7)
=============================  =====================================  ==========================

Every table is float64 and never mutated; :class:`GaussianDiffusion` casts to the data's dtype
and device at the point of use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ddpm.choices import SCHEDULES, ScheduleName


def make_betas(
    schedule: ScheduleName | Sequence[float] | np.ndarray | torch.Tensor,
    num_timesteps: int | None = None,
    *,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """Return the variance schedule beta_1..beta_T as a float64 tensor ``[T]``.

    ``"linear"``: Ho et al. 2020, beta from 1e-4 to 0.02 over 1000 steps, both ends scaled by
    1000/T so that other T keep the same total noise. ``"cosine"``: Nichol & Dhariwal 2021 Eq. 17,
    abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas clipped at ``max_beta``. Anything else is
    taken as a user array of betas and validated.
    """
    if isinstance(schedule, str):
        if num_timesteps is None or int(num_timesteps) < 1:
            raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
        T = int(num_timesteps)
        if schedule == "linear":
            scale = 1000.0 / T
            betas = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
        elif schedule == "cosine":
            steps = torch.arange(T + 1, dtype=torch.float64) / T
            abar = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
            betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
        else:
            raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)} or an array of betas")
        return validate_betas(betas, source=f"schedule {schedule!r} with T={T}")
    betas = torch.as_tensor(np.asarray(schedule, dtype=np.float64) if not torch.is_tensor(schedule) else schedule)
    betas = betas.detach().to(torch.float64).cpu().clone()
    if num_timesteps is not None and betas.numel() != num_timesteps:
        raise ValueError(f"got {betas.numel()} betas but num_timesteps={num_timesteps}")
    return validate_betas(betas, source="user betas")


def validate_betas(betas: torch.Tensor, *, source: str = "betas") -> torch.Tensor:
    """Check that ``betas`` is 1-D, non-empty, finite and inside (0, 1); return it unchanged."""
    if betas.ndim != 1 or betas.numel() == 0:
        raise ValueError(f"{source}: betas must be a non-empty 1-D array, got shape {tuple(betas.shape)}")
    if not torch.isfinite(betas).all():
        bad = int(torch.nonzero(~torch.isfinite(betas))[0])
        raise ValueError(f"{source}: betas must be finite; index {bad} is {betas[bad].item()}")
    outside = (betas <= 0) | (betas >= 1)
    if outside.any():
        bad = int(torch.nonzero(outside)[0])
        raise ValueError(f"{source}: betas must lie in (0, 1); index {bad} is {betas[bad].item():.6g}")
    return betas


def space_timesteps(num_timesteps: int, steps: int | Sequence[int]) -> torch.Tensor:
    """Indices (0-based, increasing) of the original chain kept by a respaced sampler.

    An int ``K`` keeps K indices evenly spread over 0..T-1, always including 0 (the decoder step)
    and T-1 (so the respaced chain starts from the same x_T). A sequence is used as given.
    """
    T = num_timesteps
    if isinstance(steps, int):
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}], got {steps}")
        if steps == 1:
            return torch.tensor([T - 1])
        kept = torch.from_numpy(np.round(np.linspace(0, T - 1, steps)).astype(np.int64))
    else:
        kept = torch.as_tensor(list(steps), dtype=torch.long)
    kept = torch.unique(kept)  # sorted
    if kept.numel() == 0 or kept[0] < 0 or kept[-1] >= T:
        raise ValueError(f"respaced timesteps must lie in [0, {T - 1}], got {kept.tolist()}")
    if isinstance(steps, int) and kept.numel() != steps:
        raise ValueError(f"cannot space {steps} distinct steps over T={T}")
    return kept


def respace_betas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Betas of the Markov chain whose cumulative products are ``alphas_cumprod`` (increasing t).

    beta'_i = 1 - abar_i / abar_{i-1} (abar before the first is 1), so the new chain's cumulative
    product equals the given abar exactly: a chain that visits only some timesteps of another is
    a proper DDPM.
    """
    abar = alphas_cumprod.to(torch.float64)
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    return 1.0 - abar / abar_prev


@dataclass(frozen=True)
class Schedule:
    """All per-timestep coefficients of the forward process and its posterior, float64 ``[T]``."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor
    log_betas: torch.Tensor

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> Schedule:
        betas = validate_betas(betas.to(torch.float64))
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        # Eq. 7: beta-tilde_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t; it is 0 at index 0.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # log(0) at index 0 is replaced by the next value: the decoder's variance must stay positive
        # for its likelihood to be finite (same choice as Nichol & Dhariwal). With T=1 there is no
        # next value, so beta_1 is used.
        first = posterior_variance[1:2] if betas.numel() > 1 else betas[:1]
        posterior_log_variance_clipped = torch.log(torch.cat([first, posterior_variance[1:]]))
        return cls(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=(1.0 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / alphas_cumprod - 1.0).sqrt(),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=posterior_log_variance_clipped,
            # Eq. 7: mu-tilde_t(x_t, x_0) = coef1 * x_0 + coef2 * x_t
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
            log_betas=torch.log(betas),
        )

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.numel())

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio abar_t / (1 - abar_t), float64 ``[T]``."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    # -------------------------------------------------------------- continuous time
    # Samplers that step in log-SNR or in sigma need the schedule between integer timesteps. The
    # log-SNR lambda_t = log(abar_t / (1 - abar_t)) is interpolated linearly in t (the choice of
    # k-diffusion, whose sigma = exp(-lambda / 2) is interpolated in log space): it is exact at the
    # integers and strictly decreasing, so it can be inverted.

    def log_snr(self) -> torch.Tensor:
        """lambda_t = log(abar_t / (1 - abar_t)) at the integer timesteps, float64 ``[T]``."""
        return torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)

    def log_snr_at(self, t: torch.Tensor) -> torch.Tensor:
        """lambda at (fractional) timesteps ``t`` in [0, T-1], float64, same shape as ``t``."""
        t = torch.as_tensor(t, dtype=torch.float64)
        T = self.num_timesteps
        if t.numel() and (t.min() < 0 or t.max() > T - 1):
            raise ValueError(f"timesteps must lie in [0, {T - 1}], got values in [{t.min():.4g}, {t.max():.4g}]")
        lam = self.log_snr()
        if T == 1:
            return lam.expand_as(t).clone()
        lo = t.floor().long().clamp(max=T - 2)
        frac = t - lo
        return lam[lo] + frac * (lam[lo + 1] - lam[lo])

    def alphas_cumprod_at(self, t: torch.Tensor) -> torch.Tensor:
        """abar at (fractional) timesteps ``t``: sigmoid(lambda_t); exactly ``alphas_cumprod[t]`` at integers."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.numel() and bool((t == t.round()).all()):
            return self.alphas_cumprod[t.long()]
        return torch.sigmoid(self.log_snr_at(t))

    def timestep_at_log_snr(self, lam: torch.Tensor) -> torch.Tensor:
        """The (fractional) timestep whose interpolated lambda is ``lam`` (clamped to the schedule's range)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        table = self.log_snr()
        if self.num_timesteps == 1:
            return torch.zeros_like(lam)
        neg = -table  # increasing in t
        x = (-lam).clamp(neg[0], neg[-1])
        hi = torch.searchsorted(neg, x.contiguous()).clamp(1, self.num_timesteps - 1)
        lo = hi - 1
        frac = (x - neg[lo]) / (neg[hi] - neg[lo])
        return lo.double() + frac
