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
``fixed_large_log_variance``   log beta_t (index 0: log beta-tilde_1)  the other fixed reverse variance
=============================  =====================================  ==========================

Schedules are a registry (:data:`SCHEDULES`): each is a frozen dataclass whose fields are its
parameters (``linear``: beta_start, beta_end; ``cosine``: s, max_beta), so a run's configuration
and the command line set them by name and a new schedule is one class here.

Every table is float64 and never mutated; :class:`GaussianDiffusion` casts to the data's dtype
and device at the point of use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ddpm.errors import ConfigError, UserError


class BetaSchedule(Protocol):
    """A named schedule: its parameters are the fields of a frozen dataclass, with their defaults."""

    def betas(self, num_timesteps: int) -> torch.Tensor:
        """beta_1..beta_T, float64 ``[T]``."""
        ...


SCHEDULES: dict[str, type[Any]] = {}
"""Every registered schedule by name (:func:`register_schedule`); its class holds its parameters."""


def register_schedule(name: str) -> Callable[[type[Any]], type[Any]]:
    """Register a schedule class under ``name`` (a frozen dataclass of parameters with a ``betas(T)`` method)."""

    def add(cls: type[Any]) -> type[Any]:
        if name in SCHEDULES:
            raise ValueError(f"a schedule named {name!r} is registered already")
        SCHEDULES[name] = cls
        return cls

    return add


def schedule_parameters(name: str) -> dict[str, float]:
    """The parameters of schedule ``name`` with their defaults (for ``--help`` and error messages)."""
    return {f.name: float(f.default) for f in dataclasses.fields(SCHEDULES[name])
            if isinstance(f.default, (int, float))}  # a schedule's parameters all have numeric defaults


def make_schedule(name: str, options: Mapping[str, float] | None = None) -> BetaSchedule:
    """The schedule ``name`` with ``options`` for some of its parameters; unknown names, parameters or
    values outside their range are a :class:`~ddpm.errors.ConfigError` naming them."""
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)} (or an array of betas)")
    options = dict(options or {})
    valid = schedule_parameters(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listing = ", ".join(f"{k} (default {v:g})" for k, v in valid.items()) or "none"
        raise ConfigError(f"schedule {name!r} has no parameter(s) {unknown}; its parameters: {listing}")
    return SCHEDULES[name](**{k: float(v) for k, v in options.items()})


@register_schedule("linear")
@dataclass(frozen=True)
class LinearSchedule:
    """Ho et al. 2020: beta rises linearly from ``beta_start`` to ``beta_end`` over T = 1000 steps; for
    another T both ends are scaled by 1000 / T, so the total noise stays the same."""

    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ConfigError(f"linear schedule: need 0 < beta_start <= beta_end < 1, got beta_start="
                              f"{self.beta_start:g}, beta_end={self.beta_end:g}")

    def betas(self, num_timesteps: int) -> torch.Tensor:
        scale = 1000.0 / num_timesteps
        return torch.linspace(scale * self.beta_start, scale * self.beta_end, num_timesteps, dtype=torch.float64)


@register_schedule("cosine")
@dataclass(frozen=True)
class CosineSchedule:
    """Nichol & Dhariwal 2021, Eq. 17: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), beta_t = 1 - abar_t / abar_{t-1}
    clipped at ``max_beta`` (the last steps would otherwise reach 1)."""

    s: float = 0.008
    max_beta: float = 0.999

    def __post_init__(self) -> None:
        if not self.s >= 0:
            raise ConfigError(f"cosine schedule: s must be >= 0, got {self.s:g}")
        if not 0 < self.max_beta < 1:
            raise ConfigError(f"cosine schedule: max_beta must lie in (0, 1), got {self.max_beta:g}")

    def betas(self, num_timesteps: int) -> torch.Tensor:
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        abar = torch.cos((steps + self.s) / (1 + self.s) * math.pi / 2) ** 2
        return (1 - abar[1:] / abar[:-1]).clamp(max=self.max_beta)


def make_betas(
    schedule: str | Sequence[float] | np.ndarray | torch.Tensor,
    num_timesteps: int | None = None,
    **options: float,
) -> torch.Tensor:
    """Return the variance schedule beta_1..beta_T as a float64 tensor ``[T]``.

    ``schedule`` is a registered name (:data:`SCHEDULES`: ``"linear"``, ``"cosine"``, ...) with
    ``options`` for its parameters (``make_betas("cosine", 1000, s=0.01)``), or an array of betas,
    which is validated. Bad names, parameters and betas raise :class:`~ddpm.errors.UserError`.
    """
    if isinstance(schedule, str):
        if num_timesteps is None or int(num_timesteps) < 1:
            raise ConfigError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
        T = int(num_timesteps)
        betas = make_schedule(schedule, options).betas(T)
        return validate_betas(betas, source=f"schedule {schedule!r} with T={T}")
    if options:
        raise ConfigError(f"schedule parameters {sorted(options)} apply to named schedules, not to an array of betas")
    betas = torch.as_tensor(np.asarray(schedule, dtype=np.float64) if not torch.is_tensor(schedule) else schedule)
    betas = betas.detach().to(torch.float64).cpu().clone()
    if num_timesteps is not None and betas.numel() != num_timesteps:
        raise ConfigError(f"got {betas.numel()} betas but num_timesteps={num_timesteps}")
    return validate_betas(betas, source="user betas")


def validate_betas(betas: torch.Tensor, *, source: str = "betas") -> torch.Tensor:
    """Check that ``betas`` is 1-D, non-empty, finite and inside (0, 1); return it unchanged."""
    if betas.ndim != 1 or betas.numel() == 0:
        raise UserError(f"{source}: betas must be a non-empty 1-D array, got shape {tuple(betas.shape)}")
    if not torch.isfinite(betas).all():
        bad = int(torch.nonzero(~torch.isfinite(betas))[0])
        raise UserError(f"{source}: betas must be finite; index {bad} is {betas[bad].item()}")
    outside = (betas <= 0) | (betas >= 1)
    if outside.any():
        bad = int(torch.nonzero(outside)[0])
        raise UserError(f"{source}: betas must lie in (0, 1); index {bad} is {betas[bad].item():.6g}")
    return betas


def space_timesteps(num_timesteps: int, steps: int | Sequence[int]) -> torch.Tensor:
    """Indices (0-based, increasing) of the original chain kept by a respaced sampler.

    An int ``K`` keeps K indices evenly spread over 0..T-1, always including 0 (the decoder step)
    and T-1 (so the respaced chain starts from the same x_T). A sequence is used as given.
    """
    T = num_timesteps
    if isinstance(steps, int):
        if not 1 <= steps <= T:
            raise UserError(f"steps must be in [1, {T}], got {steps}")
        if steps == 1:
            return torch.tensor([T - 1])
        kept = torch.from_numpy(np.round(np.linspace(0, T - 1, steps)).astype(np.int64))
    else:
        kept = torch.as_tensor(list(steps), dtype=torch.long)
    kept = torch.unique(kept)  # sorted
    if kept.numel() == 0 or kept[0] < 0 or kept[-1] >= T:
        raise UserError(f"respaced timesteps must lie in [0, {T - 1}], got {kept.tolist()}")
    if isinstance(steps, int) and kept.numel() != steps:
        raise UserError(f"cannot space {steps} distinct steps over T={T}")
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
    fixed_large_log_variance: torch.Tensor

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
            # Ho et al.'s other fixed reverse variance, sigma_t^2 = beta_t, except at index 0 where beta-tilde_1
            # is used as for beta-tilde: beta_1 is tiny and would make the decoder needlessly sharp (Ho et al.
            # report that both choices sample alike).
            fixed_large_log_variance=torch.cat([posterior_log_variance_clipped[:1], torch.log(betas[1:])]),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Schedule:
        """Every table cast to ``dtype`` on ``device`` (a new Schedule; this one stays float64)."""
        return Schedule(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype)
                           for f in dataclasses.fields(self)})

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
