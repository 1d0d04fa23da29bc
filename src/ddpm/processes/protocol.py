"""What a diffusion process is to the rest of the library.

A diffusion process is a forward Markov chain q(x_1:T | x_0) over data, the learned reverse chain
p_theta(x_{t-1} | x_t) that a network parameterises, and the variational bound that ties them
(Ho et al. 2020, Eq. 5):

    -log p(x_0) <= L_T + sum_{t>1} L_{t-1} + L_0.

The trainer, the bound (:mod:`ddpm.likelihood`), the samplers' driver (:mod:`ddpm.samplers`), the
run API (:class:`ddpm.Pipeline`), evaluation and the command line use a process only through
:class:`DiffusionProcess`; :class:`~ddpm.processes.gaussian.GaussianDiffusion` (Ho et al.) is one
implementation. A process is saved in a run's configuration as its ``[diffusion]`` table: a
:class:`ProcessConfig` subclass whose ``process`` field names the registered process
(:mod:`ddpm.processes`), so a checkpoint rebuilds the process it was trained with.

Conventions every process keeps: the timestep index ``t`` runs 0..T-1 and stands for the paper's
step t+1 (index 0 is the decoder step L_0); data and x_t are float tensors ``[B, ...]`` (images
in [-1, 1] on the 256-level grid k/127.5 - 1, whatever the process does inside); the network is
called as ``model(x_t, timestep_map[t])`` or ``model(x_t, timestep_map[t], y=y)``; bound terms are
bits per dimension, per example ``[B]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ddpm.choices import TimestepSampling
from ddpm.errors import ConfigError, UserError
from ddpm.tensors import Generator, Model


@dataclass
class TrainingLosses:
    """Per-example training losses ``[B]``.

    ``loss`` is the objective to average (importance weights are applied by the caller);
    ``error`` the process's prediction error per dimension (what :attr:`DiffusionProcess.error_metric`
    names: the mean squared error of the Gaussian prediction, say); ``vlb`` the bound term L_t in
    bits/dim for the sampled t (None when the loss does not need it); ``t`` the timesteps used.
    """

    loss: torch.Tensor
    error: torch.Tensor
    vlb: torch.Tensor | None
    t: torch.Tensor


def described(default: Any, help: str | Callable[[], str]) -> Any:
    """A configuration field with its default and the one line of help the command line shows for it
    (a function returning the line when it lists something registered later, such as the schedules)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ProcessConfig:
    """The ``[diffusion]`` table of a run configuration: the fields every process has.

    A process subclasses it with its own fields (all with defaults, made with :func:`described` so
    that ``ddpm train`` shows them as flags) and registers the pair in :mod:`ddpm.processes`;
    ``process`` names it in the configuration file.
    """

    process: str = described("gaussian", "the diffusion process (its own fields follow)")
    timesteps: int = described(1000, "number of diffusion steps T")
    timestep_sampling: TimestepSampling = described("uniform", "which t training draws (the trainer's sampler)")
    clip_denoised: bool | None = described(None, "clamp the predicted x_0 to [-1, 1] when sampling (default: images "
                                                 "yes, vectors no)")

    def validate(self) -> None:
        """Raise :class:`~ddpm.errors.ConfigError` naming the key of a value the process cannot take."""
        if self.timesteps < 1:
            raise ConfigError(f"diffusion.timesteps={self.timesteps} must be >= 1")


def check_timesteps(t: torch.Tensor, x: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """Validate t (integer ``[B]`` or a scalar, 0 <= t < T, B = x.shape[0]); returns it as int64 ``[B]`` on x's
    device."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise TypeError(f"t must be an integer tensor, got dtype {t.dtype}")
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"t must have shape [B]=[{x.shape[0]}], got {tuple(t.shape)}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_timesteps):
        raise ValueError(
            f"t out of range: got values in [{int(t.min())}, {int(t.max())}], valid indices are 0..{num_timesteps - 1}"
        )
    return t.to(device=x.device, dtype=torch.long)


def check_images_in_range(x0: torch.Tensor, model: str) -> None:
    """Raise :class:`~ddpm.errors.UserError` unless ``x0`` is finite and in [-1, 1] (``model`` says what needs it)."""
    if not torch.isfinite(x0).all():
        raise UserError("x0 contains non-finite values; the bound needs finite data in [-1, 1]")
    lo, hi = float(x0.min()), float(x0.max())
    if lo < -1.0 - 1e-5 or hi > 1.0 + 1e-5:
        raise UserError(f"x0 must lie in [-1, 1] for {model}, got values in [{lo:.4g}, {hi:.4g}]")


@runtime_checkable
class DiffusionProcess(Protocol):
    """A forward chain, the reverse chain a network parameterises, and the bound (see the module docstring).

    Attributes:
        name: the registered name, written as ``diffusion.process`` in configurations.
        error_metric: what :attr:`TrainingLosses.error` is (a metrics key, e.g. ``"mse"``).
        default_sampler: the sampler ``Pipeline.sample`` uses when none is named.
        timestep_map: ``[T]``, the network's timestep for each index of this chain (the identity
            unless respaced; may be fractional).
    """

    name: str
    error_metric: str
    default_sampler: str
    timestep_map: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        """T, the number of steps of the chain."""
        ...

    def output_channels(self, channels: int) -> int:
        """The network's output channels (or dimensions, for vector data) for data with ``channels``."""
        ...

    def guidance_channels(self, channels: int) -> int:
        """How many leading output channels classifier-free guidance combines (the rest, e.g. a learned
        variance, are taken from the conditional output)."""
        ...

    # ------------------------------------------------------------------ forward process
    def draw_noise(self, shape: Sequence[int], generator: Generator, *, device: torch.device | str) -> torch.Tensor:
        """The randomness that :meth:`q_sample` turns into x_t, for a batch of data of ``shape``.

        With one generator, one draw of the whole batch (a global batch drawn once and sliced per
        process equals the same examples drawn in one process); with one generator per example,
        example i's noise does not depend on the batch it is in.
        """
        ...

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) at indices ``t`` ``[B]``, deterministic given ``noise`` (from :meth:`draw_noise`)."""
        ...

    # ------------------------------------------------------------------ training and the bound
    def training_losses(self, model: Model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *,
                        y: torch.Tensor | None = None) -> TrainingLosses:
        """The training objective for one (x_0, t, noise) draw, per example."""
        ...

    def check_data(self, x0: torch.Tensor) -> None:
        """Raise :class:`~ddpm.errors.UserError` unless the bound is defined for ``x0``."""
        ...

    def vlb_term(self, model: Model, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        """L_t in bits/dim ``[B]``: the decoder term -log p(x_0 | x_1) at index 0, KL(q(x_t | x_{t+1}, x_0) ||
        p_theta(x_t | x_{t+1})) elsewhere."""
        ...

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || p(x_T)) in bits/dim ``[B]``."""
        ...

    # ------------------------------------------------------------------ the reverse chain
    def prior_sample(self, shape: Sequence[int], generator: Generator, *,
                     device: torch.device | str) -> torch.Tensor:
        """x_T ~ p(x_T); with one generator per example, example i does not depend on the batch."""
        ...

    def p_sample(self, model: Model, x_t: torch.Tensor, t: torch.Tensor, *, generator: Generator,
                 clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x_{t-1} ~ p_theta(x_{t-1} | x_t) (clean data from index 0) and the x_0 the network implied.

        One network evaluation; ``model`` has its conditioning bound (``model(x_t, t)``).
        """
        ...

    def respaced(self, steps: int | Sequence[float] | torch.Tensor) -> DiffusionProcess:
        """The chain that visits only some timesteps (K evenly spread, or the given ones) of this one;
        its :attr:`timestep_map` points the same network at them."""
        ...
