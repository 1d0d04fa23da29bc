"""What every step function sees: the chain, the network as a denoiser, the noise source, the history.

A sampling run walks the indices of a (respaced) chain from K-1 down to 0; index i holds the
network timestep ``chain.timestep_map[i]`` and abar_i = ``chain.schedule.alphas_cumprod[i]``, and
the step at index i moves x from there to index i-1, or to clean data (abar = 1) from index 0.

Solvers think in the variables of the probability-flow ODE (Song et al. 2021; Lu et al. 2022;
Karras et al. 2022), all read from the chain:

==========  ========================================  ===========================================
symbol      meaning                                   read with
==========  ========================================  ===========================================
alpha_i     sqrt(abar_i), the signal scale            :meth:`SamplerState.alpha_sigma`
sigma_i     sqrt(1 - abar_i), the noise scale         :meth:`SamplerState.alpha_sigma`
lambda_i    log(alpha_i / sigma_i), half the log-SNR  :meth:`SamplerState.log_snr` (+inf when clean)
sigma-hat   sigma_i / alpha_i = exp(-lambda_i)        EDM's noise level of x / alpha (heun)
==========  ========================================  ===========================================

Index -1 is clean data: alpha = 1, sigma = 0, lambda = +inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ddpm.diffusion import GaussianDiffusion, eps_from_x0, interpolate, x0_from_prediction
from ddpm.tensors import Generator, Model, randn

HISTORY_SIZE = 4  # denoised outputs kept for multistep solvers (UniC-3 reads four: three earlier points and its own)


def alpha_sigma_at(log_snr: float) -> tuple[float, float]:
    """(alpha, sigma) of lambda = log(alpha / sigma) on the variance-preserving path alpha^2 + sigma^2 = 1."""
    return math.sqrt(1.0 / (1.0 + math.exp(-2.0 * log_snr))), math.sqrt(1.0 / (1.0 + math.exp(2.0 * log_snr)))


@dataclass
class Denoised:
    """The network's answer at one noise level: the implied x_0 and eps (``[B, ...]``), and the raw split.

    ``index`` is the chain index (None for an evaluation between grid points, e.g. EDM's churn)
    and ``log_snr`` the lambda = log(alpha / sigma) it was evaluated at.
    """

    index: int | None
    log_snr: float
    x0: torch.Tensor
    eps: torch.Tensor
    prediction: torch.Tensor  # the network's prediction part (eps, x0 or v), before clipping
    var_v: torch.Tensor | None  # learned-range variance interpolation in [-1, 1], or None


@dataclass
class SamplerState:
    """The state of one sampling run, shared by its steps.

    Attributes:
        chain: the (respaced) diffusion being walked.
        model: the network, conditioning already bound (``model(x_t, t)``).
        generator: noise source(s) for stochastic steps (see :func:`ddpm.tensors.randn`).
        clip_denoised: clamp the implied x_0 to [-1, 1] (images); eps is then re-derived from it.
        options: solver options (``eta``, ...), validated by the driver against the sampler's spec.
        nfe_budget: the network evaluations the run may spend (set by the driver from ``steps``;
            None when the caller gave the grid itself). Steps whose cost per point varies (heun)
            read it to spend exactly this many.
        trained: the diffusion the chain was respaced from; steps that evaluate the network between
            grid points (:meth:`denoise_at`) find the network timestep of a noise level in it.
        history: the last :data:`HISTORY_SIZE` denoised outputs, oldest first (multistep solvers).
        last_x: what a predictor-corrector step leaves for the next one (UniPC: the corrected x the
            previous predictor started from).
        nfe: network evaluations so far (one call of the network on the batch is one evaluation).
    """

    chain: GaussianDiffusion
    model: Model
    generator: Generator = None
    clip_denoised: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    nfe_budget: int | None = None
    trained: GaussianDiffusion | None = None
    history: list[Denoised] = field(default_factory=list)
    last_x: torch.Tensor | None = None
    nfe: int = 0

    @property
    def num_points(self) -> int:
        return self.chain.num_timesteps

    def alpha_sigma(self, index: int) -> tuple[float, float]:
        """(alpha, sigma) at chain index ``index``; index -1 is clean data, (1, 0)."""
        if index < 0:
            return 1.0, 0.0
        abar = float(self.chain.schedule.alphas_cumprod[index])
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def log_snr(self, index: int) -> float:
        """lambda = log(alpha / sigma) at chain index ``index`` (+inf for clean data at -1)."""
        if index < 0:
            return math.inf
        abar = float(self.chain.schedule.alphas_cumprod[index])
        return 0.5 * (math.log(abar) - math.log1p(-abar))

    def timesteps(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """The chain index as a batch of timesteps ``[B]`` on x's device."""
        return torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)

    def call_model(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The raw network output at chain index ``index`` (one network evaluation)."""
        self.nfe += 1
        return self.chain.model_output(self.model, x, self.timesteps(index, x))

    def denoise(self, x: torch.Tensor, index: int, *, remember: bool = True) -> Denoised:
        """Evaluate the network at chain index ``index``: the implied x_0 (clipped if asked) and eps.

        With ``remember`` the result is appended to :attr:`history`.
        """
        raw = self.call_model(x, index)
        prediction, var_v = self.chain.split_model_output(raw, x)
        t = self.timesteps(index, x)
        x0 = self.chain.predict_x0(prediction, x, t, clip_denoised=self.clip_denoised)
        alpha, sigma = self.alpha_sigma(index)
        return self._keep(Denoised(index, self.log_snr(index), x0, eps_from_x0(x, x0, alpha, sigma), prediction,
                                   var_v), remember)

    def denoise_at(self, x: torch.Tensor, log_snr: float, *, remember: bool = False) -> Denoised:
        """Evaluate the network at any noise level lambda inside the trained range (one evaluation).

        The network timestep is the (fractional) one whose interpolated lambda is ``log_snr`` in
        :attr:`trained` (see :meth:`ddpm.schedules.Schedule.timestep_at_log_snr`).
        """
        if self.trained is None:
            raise RuntimeError("denoise_at needs SamplerState.trained (the driver sets it)")
        # the schedule's log-SNR is log(abar / (1 - abar)) = 2 lambda
        t = self.trained.schedule.timestep_at_log_snr(torch.tensor(2.0 * log_snr, dtype=torch.float64))
        t_net = interpolate(self.trained.timestep_map.double(), t.reshape(1))
        self.nfe += 1
        raw = self.model(x, t_net.to(x.device).expand(x.shape[0]))
        prediction, var_v = self.chain.split_model_output(raw, x)
        alpha, sigma = alpha_sigma_at(log_snr)
        x0 = x0_from_prediction(self.chain.prediction, prediction, x, alpha, sigma)  # type: ignore[arg-type]
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        return self._keep(Denoised(None, log_snr, x0, eps_from_x0(x, x0, alpha, sigma), prediction, var_v), remember)

    def _keep(self, out: Denoised, remember: bool) -> Denoised:
        if remember:
            self.history.append(out)
            del self.history[:-HISTORY_SIZE]
        return out

    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh standard-normal noise of x's shape from the run's generator(s)."""
        return randn(x.shape, self.generator, device=x.device, dtype=x.dtype)
