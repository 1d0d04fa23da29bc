"""DPM-Solver++ (Lu et al. 2022b): multistep exponential integrators in data (x_0) prediction.

Between chain points s and t, with h = lambda_t - lambda_s > 0 (lambda = log(alpha / sigma), ``lam``, see
:mod:`ddpm.samplers.state`), the probability-flow ODE (eta = 0) and the reverse SDE (eta = 1) have
the exact solutions (Lu et al. 2022b, Eq. 9 and its SDE counterpart), with c = 1 + eta:

    x_t = (sigma_t / sigma_s) e^{-eta h} x_s
          + alpha_t int_0^h c e^{-c (h - tau)} x0(lambda_s + tau) dtau
          + sigma_t sqrt(1 - e^{-2 eta h}) z.

The linear part is exact; the solvers replace x0(lambda) by a polynomial through the last one, two
or three denoised outputs m0, m1, m2 (at s = s0, s1, s2), whose moments are

    w_k = int_0^h c e^{-c (h - tau)} tau^k / k! dtau:
    w_0 = 1 - e^{-ch},  w_1 = (e^{-ch} - 1 + ch) / c,  w_2 = (1 - e^{-ch} - ch + (ch)^2 / 2) / c^2.

With r0 = (lambda_s0 - lambda_s1) / h, r1 = (lambda_s1 - lambda_s2) / h and the divided differences
D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1 (each h times a slope):

* order 1 (DDIM for eta = 0):  x_t = ... + alpha_t w_0 m0;
* order 2, Lu et al.'s Algorithm 2 ("midpoint"):  + alpha_t w_0 (m0 + D1_0 / 2);
* order 3:  + alpha_t (w_0 m0 + (w_1 / h) D1 + (2 w_2 / h^2) D2), with D1 = D1_0 + r0 / (r0 + r1)
  (D1_0 - D1_1) ~ h x0' and D2 = (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0'' / 2.

The 3M reference code (Lu et al.'s, diffusers', k-diffusion's) weights D2 by
alpha_t (1/2 - w_1 / h^2), half of 2 w_2 / h^2 above to leading order; on the Gaussian test of
``tests/test_solvers.py`` that halves the h^3 term and leaves a second-order method, while the weight
here converges at third order (measured in the test).

Every step evaluates the network once at its own point, so K grid points cost K evaluations. The
first steps use the lower orders (no history yet), the step into the last grid point uses at most
order 2 when the grid has fewer than 15 points (Lu et al.'s lower-order final steps, which keep
few-step sampling stable), and the step from the last grid point to clean data (lambda = +inf)
returns its denoised output m0: every other term vanishes there. A learned variance is ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ddpm.samplers.registry import SamplerOptions, SamplerSpec, option, register_sampler
from ddpm.samplers.state import Denoised, SamplerState

LOWER_ORDER_FINAL_BELOW = 15  # grids shorter than this take a second-order step into their last point


@dataclass(frozen=True)
class SDEOptions(SamplerOptions):
    eta: float = option(1.0, "noise scale of the SDE solver: 1 the reverse SDE, 0 the ODE", low=0.0)


def _moments(h: float, c: float) -> tuple[float, float, float]:
    """(w_0, w_1, w_2) of the module docstring for step h and rate c."""
    u = c * h
    em1 = math.expm1(-u)  # e^{-u} - 1, accurate for small u
    return -em1, (em1 + u) / c, (-em1 - u + 0.5 * u * u) / (c * c)


def dpm_solver_step(state: SamplerState, x: torch.Tensor, index: int, *, order: int,
                    eta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++ step of at most ``order`` from chain index ``index`` to ``index - 1``.

    ``eta``: 0 the ODE, 1 the reverse SDE. Returns (x at index - 1, x0_hat).
    """
    d = state.denoise(x, index)
    if index == 0:  # lambda_t = +inf: (sigma_t / sigma_s) and e^{-ch} vanish, x_0 = m0
        return d.x0, d.x0
    usable = min(order, len(state.history))
    if index == 1 and state.num_points < LOWER_ORDER_FINAL_BELOW:
        usable = min(usable, 2)
    alpha_t, sigma_t = state.alpha_sigma(index - 1)
    lam_t = state.lam(index - 1)
    out = multistep_update(x, state.history[-usable:], lam_t=lam_t, alpha_t=alpha_t, sigma_t=sigma_t,
                           sigma_s=state.alpha_sigma(index)[1], eta=eta)
    if eta > 0:
        out = out + (sigma_t * math.sqrt(-math.expm1(-2.0 * eta * (lam_t - d.lam)))) * state.noise_like(x)
    return out, d.x0


def multistep_update(x: torch.Tensor, history: Sequence[Denoised], *, lam_t: float, alpha_t: float, sigma_t: float,
                     sigma_s: float, eta: float = 0.0) -> torch.Tensor:
    """The deterministic part of x_t (the module docstring's formula) from x at s and 1-3 denoised outputs.

    ``history`` holds them oldest first, the newest at s itself; its length is the order. Valid in
    either direction: h = lambda_t - lambda_s < 0 runs the ODE towards noise (inversion,
    :mod:`ddpm.editing.inversion`). Returns ``[B, ...]`` without the SDE's fresh noise.
    """
    m = [e.x0 for e in reversed(history)]  # m[0] = m0 (at s), m[1] = m1, ...
    lam = [e.lam for e in reversed(history)]
    h = lam_t - lam[0]
    w0, w1, w2 = _moments(h, 1.0 + eta)
    out = (sigma_t / sigma_s * math.exp(-eta * h)) * x
    if len(m) == 1:
        return out + (alpha_t * w0) * m[0]
    if len(m) == 2:
        r0 = (lam[0] - lam[1]) / h
        return out + (alpha_t * w0) * (m[0] + (m[0] - m[1]) / (2.0 * r0))
    r0, r1 = (lam[0] - lam[1]) / h, (lam[1] - lam[2]) / h
    d1_0, d1_1 = (m[0] - m[1]) / r0, (m[1] - m[2]) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return out + (alpha_t * w0) * m[0] + (alpha_t * w1 / h) * d1 + (alpha_t * 2.0 * w2 / h**2) * d2


def dpmpp_2m_step(state: SamplerState, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2)."""
    return dpm_solver_step(state, x, index, order=2)


def dpmpp_2m_sde_step(state: SamplerState, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SDE-DPM-Solver++(2M): the second-order multistep solver with fresh noise (option ``eta``)."""
    return dpm_solver_step(state, x, index, order=2, eta=state.options.eta)


def dpmpp_3m_step(state: SamplerState, x: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(3M): the third-order multistep solver of the ODE (see the module docstring)."""
    return dpm_solver_step(state, x, index, order=3)


# Default spacings measured with benchmarks/samplers.py (the demo MNIST model and the 8x8 digits model, cosine
# schedule): the one that did best around the default NFE; the numbers are in benchmarks/results/samplers-demo.md,
# samplers-demo-seeds.md and samplers-digits.md.
register_sampler(SamplerSpec(
    "dpm++2m", dpmpp_2m_step, "DPM-Solver++(2M), second-order multistep ODE solver (Lu et al. 2022b)",
    default_spacing="karras", default_steps=20,  # karras: the best spacing around 20 NFE on both models
))
register_sampler(SamplerSpec(
    "dpm++2m-sde", dpmpp_2m_sde_step,
    "SDE-DPM-Solver++(2M): second-order multistep with fresh noise (eta = 1: the reverse SDE)",
    options=SDEOptions, default_spacing="karras", default_steps=20,  # karras: the best around 20 NFE on both
))
register_sampler(SamplerSpec(
    "dpm++3m", dpmpp_3m_step, "DPM-Solver++(3M), third-order multistep ODE solver",
    # trailing: on karras grids the third-order steps went unstable at few NFE on both models
    default_spacing="trailing", default_steps=20,
))
