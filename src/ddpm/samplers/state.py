"""What every step function sees: the chain, the network as a denoiser, the noise source, the history.

A sampling run walks the indices of a (respaced) chain from K-1 down to 0; index i holds the
network timestep ``chain.timestep_map[i]`` and abar_i = ``chain.schedule.alphas_cumprod[i]``, and
the step at index i moves x from there to index i-1, or to clean data (abar = 1) from index 0.
Solvers think in alpha_i = sqrt(abar_i), sigma_i = sqrt(1 - abar_i) and the log-SNR
lambda_i = log(alpha_i / sigma_i) (+inf for clean data), read with :meth:`SamplerState.alpha_sigma`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ddpm.diffusion import GaussianDiffusion, eps_from_x0
from ddpm.tensors import Generator, Model, randn


@dataclass
class Denoised:
    """The network's answer at chain index ``index``: the implied x_0 and eps (``[B, ...]``), and the raw split."""

    index: int
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
        history: the denoised outputs of earlier steps, oldest first (multistep solvers read it).
        nfe: network evaluations so far (one call of the network on the batch is one evaluation).
    """

    chain: GaussianDiffusion
    model: Model
    generator: Generator = None
    clip_denoised: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    history: list[Denoised] = field(default_factory=list)
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
        alpha, sigma = self.alpha_sigma(index)
        return math.inf if sigma == 0.0 else math.log(alpha / sigma)

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
        eps = eps_from_x0(x, x0, alpha, sigma)
        out = Denoised(index, x0, eps, prediction, var_v)
        if remember:
            self.history.append(out)
        return out

    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh standard-normal noise of x's shape from the run's generator(s)."""
        return randn(x.shape, self.generator, device=x.device, dtype=x.dtype)
