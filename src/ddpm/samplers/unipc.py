"""UniPC (Zhao et al. 2023): multistep predictor UniP and free corrector UniC, data prediction, B(h) = e^{-h} - 1.

A step from s0 to t (h = lambda_t - lambda_s0, lambda = log(alpha / sigma), ``lam``) writes the exact solution
of the probability-flow ODE (DPM-Solver++'s, see :mod:`ddpm.samplers.dpm_solver`) as

    x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^{-h} - 1) m0 - alpha_t B(h) sum_k rho_k D_k,

where D_k = (m_k - m0) / r_k are differences of denoised outputs at r_k = (lambda_k - lambda_s0) / h.
Matching the Taylor terms of x0(lambda) up to order p gives UniPC's linear system (their Eq. 8;
here with B(h) = e^{-h} - 1, "bh2"):

    sum_k rho_k r_k^{n-1} = n! h phi_{n+1}(-h) / (1 - e^{-h}),  n = 1..p,
    phi_1(z) = (e^z - 1) / z,  phi_{n+1}(z) = (phi_n(z) - 1 / n!) / z.

* UniP-p, the predictor, uses the p - 1 earlier outputs (for p = 2 the limit rho = 1/2 as in the
  paper, which makes UniP-2 DPM-Solver++(2M)).
* UniC-p, the corrector, adds the output m_t evaluated at the predicted x_t (r = 1): the same
  evaluation then starts the next step, so correcting costs no evaluation, and raises the order
  to p + 1 (for p = 1 the limit rho = 1/2).

One step here evaluates the network at its point, corrects the previous step with that output,
and predicts the next point from the corrected x. The predictor order is
min(order, steps taken + 1, points left), i.e. lower orders while the history fills and towards the
end (Zhao et al.'s warm-up and lower-order final steps); the corrector uses the order of the step
it corrects. The step from the last grid point to clean data returns its denoised output (every
other term vanishes at lambda = +inf), so the last evaluation is not used for a correction.
A learned variance is ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddpm.samplers.registry import SamplerOptions, SamplerSpec, option, register_sampler
from ddpm.samplers.state import Denoised, SamplerState


@dataclass(frozen=True)
class UniPCOptions(SamplerOptions):
    order: int = option(2, "order of the predictor UniP (the corrector adds one)", choices=(1, 2, 3))


def unipc_rhs(h: float, p: int) -> list[float]:
    """b_n = n! h phi_{n+1}(-h) / (1 - e^{-h}) for n = 1..p (UniPC's right-hand side for B(h) = e^{-h} - 1)."""
    z = -h
    phi = math.expm1(z) / z  # phi_1(-h)
    out = []
    factorial = 1.0
    for n in range(1, p + 1):
        factorial *= n
        phi = (phi - 1.0 / factorial) / z  # phi_{n+1}(-h)
        out.append(factorial * h * phi / -math.expm1(z))
    return out


def _update(state: SamplerState, x_s: torch.Tensor, s: Denoised, t_index: int, others: list[tuple[float, torch.Tensor]],
            rhos: list[float]) -> torch.Tensor:
    """x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) m0 - alpha_t B(h) sum_k rho_k (m_k - m0) / r_k.

    ``others`` holds (lambda_k, m_k) for each difference, in the order of ``rhos``.
    """
    assert s.index is not None
    alpha_t, sigma_t = state.alpha_sigma(t_index)
    sigma_s = state.alpha_sigma(s.index)[1]
    h = state.lam(t_index) - s.lam
    b_h = math.expm1(-h)
    out = (sigma_t / sigma_s) * x_s - (alpha_t * b_h) * s.x0
    for rho, (lam_k, m_k) in zip(rhos, others, strict=True):
        r_k = (lam_k - s.lam) / h
        out = out - (alpha_t * b_h * rho / r_k) * (m_k - s.x0)
    return out


def _solve(rks: list[float], b: list[float]) -> list[float]:
    """rho of sum_k rho_k r_k^{n-1} = b_n (n = 1..len(b)), in float64."""
    R = torch.tensor([[r ** (n - 1) for r in rks] for n in range(1, len(b) + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def _predictor_order(order: int, index: int, num_points: int) -> int:
    """UniP's order at chain index ``index``: warm-up (steps taken + 1) and lower-order final steps (points left)."""
    return max(1, min(order, num_points - index, index + 1))


def unipc_step(state: SamplerState, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UniC on the previous step, then UniP towards index - 1 (option ``order``: UniP's order, 1-3)."""
    order = state.options.order
    d = state.denoise(x, index)
    if index == 0:  # to clean data: x_0 = m0 whatever the correction
        return d.x0, d.x0
    hist = state.history  # oldest first; hist[-1] is d
    if state.last_x is not None and len(hist) >= 2:  # UniC-p on the step s0 = index + 1 -> t = index
        p = _predictor_order(order, index + 1, state.num_points)
        s0 = hist[-2]
        earlier = [(e.lam, e.x0) for e in reversed(hist[-1 - p:-2])]  # m1 .. m_{p-1}
        h = d.lam - s0.lam
        if p == 1:
            rhos = [0.5]
        else:
            rks = [(lam - s0.lam) / h for lam, _ in earlier] + [1.0]
            rhos = _solve(rks, unipc_rhs(h, p))
        x = _update(state, state.last_x, s0, index, [*earlier, (d.lam, d.x0)], rhos)
    state.last_x = x
    p = _predictor_order(order, index, state.num_points)
    earlier = [(e.lam, e.x0) for e in reversed(hist[-p:-1])]  # m1 .. m_{p-1}
    h = state.lam(index - 1) - d.lam
    if p == 1:
        rhos = []
    elif p == 2:
        rhos = [0.5]
    else:
        rks = [(lam - d.lam) / h for lam, _ in earlier]
        rhos = _solve(rks, unipc_rhs(h, p - 1))
    return _update(state, x, d, index - 1, earlier, rhos), d.x0


register_sampler(SamplerSpec(
    "unipc", unipc_step, "UniPC-bh2 predictor-corrector (Zhao et al. 2023), order 3 with the default UniP-2",
    options=UniPCOptions,
    # trailing, 10: the best sampler at the fewest NFE on both models, flat beyond 10 (benchmarks/results/samplers-*.md)
    default_spacing="trailing", default_steps=10,
))
