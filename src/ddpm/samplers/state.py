"""What every step function sees: the chain, the network as a denoiser, the noise source, the history.

A sampling run walks the indices of a (respaced) chain from K-1 down to 0; index i holds the
network timestep ``chain.timestep_map[i]``, and the step at index i moves x from there to index
i-1, or to clean data from index 0. Every process can be walked by its own reverse step
(``chain.p_sample``, see :mod:`ddpm.samplers.ancestral`).

The solvers of the probability-flow ODE and the reverse SDE (Song et al. 2021; Lu et al. 2022;
Karras et al. 2022) walk Gaussian chains (abar_i = ``chain.schedule.alphas_cumprod[i]``) and
think in these variables, all read from the chain:

==========  ========================================  ===========================================
symbol      meaning                                   read with
==========  ========================================  ===========================================
alpha_i     sqrt(abar_i), the signal scale            :meth:`SamplerState.alpha_sigma`
sigma_i     sqrt(1 - abar_i), the noise scale         :meth:`SamplerState.alpha_sigma`
lambda_i    log(alpha_i / sigma_i)                    :meth:`SamplerState.lam` (+inf when clean)
sigma-hat   sigma_i / alpha_i = exp(-lambda_i)        EDM's noise level of x / alpha (heun)
==========  ========================================  ===========================================

lambda is DPM-Solver's symbol, ``lam`` in the code: half the log-SNR log(abar / (1 - abar)) that
:class:`~ddpm.schedules.Schedule` tabulates; :func:`lam_from_log_snr` and :func:`log_snr_from_lam`
are the one conversion between them. Index -1 is clean data: alpha = 1, sigma = 0, lambda = +inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ddpm.processes import DiffusionProcess, GaussianDiffusion
from ddpm.processes.gaussian import eps_from_x0, interpolate, x0_from_prediction
from ddpm.tensors import Generator, Model, randn

HISTORY_SIZE = 4  # denoised outputs kept for multistep solvers (UniC-3 reads four: three earlier points and its own)


def lam_from_log_snr(log_snr: float) -> float:
    """lambda = log(alpha / sigma) from the log-SNR log(abar / (1 - abar)) = 2 lambda."""
    return 0.5 * log_snr


def log_snr_from_lam(lam: float) -> float:
    """The log-SNR log(abar / (1 - abar)) = 2 lambda."""
    return 2.0 * lam


def alpha_sigma_at(lam: float) -> tuple[float, float]:
    """(alpha, sigma) of lambda = log(alpha / sigma) on the variance-preserving path alpha^2 + sigma^2 = 1."""
    return math.sqrt(1.0 / (1.0 + math.exp(-2.0 * lam))), math.sqrt(1.0 / (1.0 + math.exp(2.0 * lam)))


@dataclass
class Denoised:
    """The network's answer at one noise level: the implied x_0 and eps (``[B, ...]``), and the raw split.

    ``index`` is the chain index (None for an evaluation between grid points, e.g. EDM's churn)
    and ``lam`` the lambda = log(alpha / sigma) it was evaluated at.
    """

    index: int | None
    lam: float
    x0: torch.Tensor
    eps: torch.Tensor
    prediction: torch.Tensor  # the network's prediction part (eps, x0 or v), before clipping
    var_v: torch.Tensor | None  # learned-range variance interpolation in [-1, 1], or None


@dataclass
class SamplerState:
    """The state of one sampling run, shared by its steps.

    Attributes:
        chain: the (respaced) process being walked.
        model: the network, conditioning already bound (``model(x_t, t)``); call it through
            :meth:`network` so that evaluations are counted.
        generator: noise source(s) for stochastic steps (see :func:`ddpm.tensors.randn`).
        clip_denoised: clamp the implied x_0 to [-1, 1] (images); eps is then re-derived from it.
        options: the sampler's typed options (:mod:`ddpm.samplers.registry`).
        nfe_budget: the network evaluations the run may spend (set by the driver from ``steps``;
            None when the caller gave the grid itself). Steps whose cost per point varies (heun)
            read it to spend exactly this many.
        trained: the process the chain was respaced from; steps that evaluate the network between
            grid points (:meth:`denoise_at`) find the network timestep of a noise level in it.
        history: the last :data:`HISTORY_SIZE` denoised outputs, oldest first (multistep solvers).
        last_x: what a predictor-corrector step leaves for the next one (UniPC: the corrected x the
            previous predictor started from).
        nfe: network evaluations so far (one call of the network on the batch is one evaluation).
    """

    chain: DiffusionProcess
    model: Model
    generator: Generator = None
    clip_denoised: bool = True
    options: Any = None
    nfe_budget: int | None = None
    trained: DiffusionProcess | None = None
    history: list[Denoised] = field(default_factory=list)
    last_x: torch.Tensor | None = None
    nfe: int = 0

    @property
    def num_points(self) -> int:
        return self.chain.num_timesteps

    def network(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The network, counted: one call on the batch is one evaluation."""
        self.nfe += 1
        return self.model(x_t, t, **kwargs)

    def timesteps(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The chain index as a batch of timesteps ``[B]`` on x's device."""
        return torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)

    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh standard-normal noise of x's shape from the run's generator(s)."""
        return randn(x.shape, self.generator, device=x.device, dtype=x.dtype)

    # ------------------------------------------------------------------ Gaussian chains
    @property
    def gaussian(self) -> GaussianDiffusion:
        """The chain as a :class:`~ddpm.GaussianDiffusion` (the solvers' registry entries walk only these)."""
        if not isinstance(self.chain, GaussianDiffusion):
            raise TypeError(f"this sampler walks Gaussian diffusion, not {type(self.chain).__name__}")
        return self.chain

    def alpha_sigma(self, index: int) -> tuple[float, float]:
        """(alpha, sigma) at chain index ``index``; index -1 is clean data, (1, 0)."""
        if index < 0:
            return 1.0, 0.0
        abar = float(self.gaussian.schedule.alphas_cumprod[index])
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def lam(self, index: int) -> float:
        """lambda = log(alpha / sigma) at chain index ``index`` (+inf for clean data at -1)."""
        if index < 0:
            return math.inf
        abar = float(self.gaussian.schedule.alphas_cumprod[index])
        return lam_from_log_snr(math.log(abar) - math.log1p(-abar))

    def call_model(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The raw network output at chain index ``index`` (one network evaluation)."""
        return self.gaussian.model_output(self.network, x, self.timesteps(index, x))

    def denoise(self, x: torch.Tensor, index: int, *, remember: bool = True) -> Denoised:
        """Evaluate the network at chain index ``index``: the implied x_0 (clipped if asked) and eps.

        With ``remember`` the result is appended to :attr:`history`.
        """
        chain = self.gaussian
        prediction, var_v = chain.split_model_output(self.call_model(x, index), x)
        x0 = chain.predict_x0(prediction, x, self.timesteps(index, x), clip_denoised=self.clip_denoised)
        alpha, sigma = self.alpha_sigma(index)
        return self._keep(Denoised(index, self.lam(index), x0, eps_from_x0(x, x0, alpha, sigma), prediction, var_v),
                          remember)

    def denoise_at(self, x: torch.Tensor, lam: float, *, remember: bool = False) -> Denoised:
        """Evaluate the network at any noise level lambda inside the trained range (one evaluation).

        The network timestep is the (fractional) one whose interpolated log-SNR is that of ``lam``
        in :attr:`trained` (see :meth:`ddpm.schedules.Schedule.timestep_at_log_snr`).
        """
        if not isinstance(self.trained, GaussianDiffusion):
            raise RuntimeError("denoise_at needs SamplerState.trained, a GaussianDiffusion (the driver sets it)")
        log_snr = torch.tensor(log_snr_from_lam(lam), dtype=torch.float64)
        t = self.trained.schedule.timestep_at_log_snr(log_snr)
        t_net = interpolate(self.trained.timestep_map.double(), t.reshape(1))
        raw = self.network(x, t_net.to(x.device).expand(x.shape[0]))
        chain = self.gaussian
        prediction, var_v = chain.split_model_output(raw, x)
        alpha, sigma = alpha_sigma_at(lam)
        x0 = x0_from_prediction(chain.prediction, prediction, x, alpha, sigma)
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        return self._keep(Denoised(None, lam, x0, eps_from_x0(x, x0, alpha, sigma), prediction, var_v), remember)

    def _keep(self, out: Denoised, remember: bool) -> Denoised:
        if remember:
            self.history.append(out)
            del self.history[:-HISTORY_SIZE]
        return out
