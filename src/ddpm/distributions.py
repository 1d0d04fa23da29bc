"""Densities the variational bound needs: the KL of Gaussians and of categorical distributions, and the
discretised decoders (Gaussian, and the truncated discretised logistic of categorical diffusion).

All results are elementwise (per data dimension) and in nats; callers average over dimensions
and divide by log 2 for bits per dimension.
"""

from __future__ import annotations

import math

import torch

LOG2 = math.log(2.0)


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats (broadcasts).

    KL = 1/2 [log s2 - log s1 + s1/s2 + (m1 - m2)^2 / s2 - 1] for variances s1, s2.
    """
    tensor = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor))
    mean1, logvar1, mean2, logvar2 = (
        a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=tensor.dtype, device=tensor.device)
        for a in (mean1, logvar1, mean2, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def _log_ndtr_diff(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, stable in both tails.

    For an interval in the upper tail the complementary form Phi(-lo) - Phi(-hi) is used, so the
    difference is always taken between two small probabilities and never cancels catastrophically.
    """
    upper = lo > 0
    a = torch.where(upper, -hi, lo)
    b = torch.where(upper, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    # log(e^log_b - e^log_a) = log_b + log(1 - e^(log_a - log_b)); log_a - log_b <= 0.
    return log_b + torch.log(-torch.expm1(log_a - log_b))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor, *, num_bins: int = 256
) -> torch.Tensor:
    """log P(bin of x) under N(mean, exp(log_scale)^2), per element, in nats.

    The decoder L_0 of Ho et al. Eq. 13: data in [-1, 1] on ``num_bins`` levels; each bin is
    [x - 1/(num_bins-1), x + 1/(num_bins-1)], except that the lowest bin reaches down to -inf and
    the highest up to +inf, so the probabilities of all bins sum to 1. Computed in float64 with
    the exact normal CDF (``log_ndtr``) rather than the tanh approximation; returned in x's dtype.
    """
    half_width = 1.0 / (num_bins - 1)
    x64, mean64 = x.to(torch.float64), mean.to(torch.float64)
    inv_scale = torch.exp(-log_scale.to(torch.float64))
    lo = (x64 - half_width - mean64) * inv_scale
    hi = (x64 + half_width - mean64) * inv_scale
    edge = 1.0 - half_width  # bins beyond these centres are open-ended
    inf = torch.tensor(math.inf, dtype=torch.float64, device=x.device)
    lo = torch.where(x64 < -edge, -inf, lo)
    hi = torch.where(x64 > edge, inf, hi)
    out = torch.where(
        torch.isinf(lo),
        torch.special.log_ndtr(hi),
        torch.where(torch.isinf(hi), torch.special.log_ndtr(-lo), _log_ndtr_diff(lo, hi)),
    )
    return out.to(x.dtype)


def categorical_kl(log_p: torch.Tensor, log_q: torch.Tensor, *, dim: int = -1) -> torch.Tensor:
    """KL(P || Q) = sum_i P(i) log(P(i) / Q(i)) in nats, over the states on ``dim`` (the seed notes' discrete KL).

    ``log_p`` and ``log_q`` are log-probabilities (normalised along ``dim``; -inf for impossible
    states). States with P(i) = 0 contribute 0, also where Q(i) = 0, and pass no NaN to gradients;
    a state with P(i) > 0 and Q(i) = 0 makes the KL infinite.
    """
    p = log_p.exp()
    possible = p > 0
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    return (p * (torch.where(possible, log_p, zero) - torch.where(possible, log_q, zero))).sum(dim=dim)


def discretized_logistic_logits(loc: torch.Tensor, log_scale: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Log-probabilities ``[..., K]`` of a logistic(loc, exp(log_scale)) discretised to the K levels
    -1 + 2k / (K - 1) of [-1, 1] and truncated to them (Austin et al. 2021, Appendix A.8): level k takes
    the mass between the midpoints to its neighbours, the first and last levels the tails beyond.
    ``loc`` and ``log_scale`` broadcast; nats.
    """
    levels = torch.linspace(-1.0, 1.0, num_bins, device=loc.device, dtype=loc.dtype)
    edges = (levels[:-1] + levels[1:]) / 2
    z = (edges - loc.unsqueeze(-1)) * torch.exp(-log_scale.unsqueeze(-1))
    log_cdf = torch.nn.functional.logsigmoid(z)  # log CDF at the inner edges [..., K-1]
    log_sf = torch.nn.functional.logsigmoid(-z)  # log (1 - CDF)
    first, last = log_cdf[..., :1], log_sf[..., -1:]
    # log(CDF(b) - CDF(a)) = log CDF(b) + log(1 - exp(log CDF(a) - log CDF(b))), stable for a < b
    middle = log_cdf[..., 1:] + torch.log(-torch.expm1((log_cdf[..., :-1] - log_cdf[..., 1:]).clamp(max=-1e-12)))
    return torch.cat([first, middle, last], dim=-1)
