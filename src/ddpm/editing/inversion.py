"""Exact inversion: an image to its x_T through the probability-flow ODE, back again, and paths between two.

Decoding is sampling with a deterministic solver (``ddim`` with eta = 0, or ``dpm++2m``) started
from a given x_T. Encoding runs the same solver over the same time grid the other way, from clean
data towards noise: between grid points s and t the update is DPM-Solver++'s
(:func:`ddpm.samplers.dpm_solver.multistep_update`) with h = lambda_t - lambda_s < 0, of order 1
(DDIM) or 2 (DPM-Solver++(2M), second order once two grid points are known). Its first interval, from
clean data (lambda = +inf) to the lowest grid point t_0, is the DDIM step written with eps,
x_{t_0} = alpha_{t_0} x_0 + sigma_{t_0} eps_theta(x_0, t_0): the mirror of decoding's last step
x_0 = x0_theta(x_{t_0}), to first order its inverse.

Encoding with a K-point grid evaluates the network K times, at the clean image for the first
interval and then at x_{t_0} .. x_{t_{K-2}}; decoding K times, at t_{K-1} .. t_0. Both leave x_0
unclipped by default: clipping is not invertible. The round trip's error falls with the grid at the solver's
order (``tests/test_editing.py`` measures it on Gaussian data, where the exact ODE is known).

Interpolation walks the great circle between two encodings (:func:`slerp`): x_T of Gaussian
diffusion lies near the sphere of radius sqrt(D), which a straight line would leave.
"""

from __future__ import annotations

import torch

from ddpm.errors import UserError
from ddpm.processes import GaussianDiffusion
from ddpm.samplers import make_options
from ddpm.samplers.dpm_solver import multistep_update
from ddpm.samplers.state import SamplerState
from ddpm.tensors import Model

INVERSION_ORDERS = {"ddim": 1, "dpm++2m": 2}  # the deterministic solvers that encode, and their orders


def check_inversion_sampler(sampler: str, options: dict[str, float] | None = None) -> None:
    """Raise :class:`~ddpm.errors.UserError` unless ``sampler`` with ``options`` is a deterministic solver."""
    if sampler not in INVERSION_ORDERS:
        raise UserError(f"inversion needs a deterministic solver ({', '.join(INVERSION_ORDERS)}), not {sampler!r}")
    if sampler == "ddim" and getattr(make_options(sampler, options), "eta", 0.0) != 0:
        raise UserError("inversion needs deterministic DDIM (eta = 0)")


@torch.no_grad()
def encode(chain: GaussianDiffusion, model: Model, x0: torch.Tensor, *, sampler: str = "dpm++2m",
           clip_denoised: bool = False, trained: GaussianDiffusion | None = None) -> torch.Tensor:
    """x at the noisiest point of ``chain`` reached from ``x0`` ``[B, ...]`` by the ODE (see the module docstring).

    ``chain`` is the respaced chain that decoding walks (:func:`ddpm.samplers.sampling_chain` of the
    same sampler, steps and spacing); ``model`` has its conditioning bound.
    """
    check_inversion_sampler(sampler)
    order = INVERSION_ORDERS[sampler]
    state = SamplerState(chain=chain, model=model, clip_denoised=clip_denoised, trained=trained or chain)
    first = state.denoise(x0, 0, remember=False)  # the clean image at the lowest grid point's network timestep
    alpha, sigma = state.alpha_sigma(0)
    x = alpha * x0 + sigma * first.eps
    for index in range(chain.num_timesteps - 1):
        state.denoise(x, index)
        alpha_t, sigma_t = state.alpha_sigma(index + 1)
        x = multistep_update(x, state.history[-min(order, len(state.history)):], lam_t=state.lam(index + 1),
                             alpha_t=alpha_t, sigma_t=sigma_t, sigma_s=state.alpha_sigma(index)[1])
    return x


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float) -> torch.Tensor:
    """Spherical interpolation between ``a`` and ``b`` ``[B, ...]`` (per example), ``weight`` in [0, 1].

    sin((1 - w) theta) / sin(theta) a + sin(w theta) / sin(theta) b, theta the angle between them;
    linear where they are (nearly) parallel. Returns ``a`` at 0 and ``b`` at 1 exactly.
    """
    if weight == 0.0:
        return a.clone()
    if weight == 1.0:
        return b.clone()
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1)).clamp_min(1e-30)
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(theta)
    parallel = sin < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, torch.full_like(sin, 1.0 - weight), torch.sin((1.0 - weight) * theta) / safe)
    wb = torch.where(parallel, torch.full_like(sin, weight), torch.sin(weight * theta) / safe)
    shape = (-1,) + (1,) * (a.ndim - 1)
    return (wa.view(shape) * a.double() + wb.view(shape) * b.double()).to(a.dtype)


def interpolation_weights(frames: int) -> list[float]:
    """``frames`` evenly spaced weights from 0 to 1 (both included)."""
    if frames < 2:
        raise UserError(f"an interpolation needs at least 2 frames, got {frames}")
    return [i / (frames - 1) for i in range(frames)]

