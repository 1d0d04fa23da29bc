"""Categorical diffusion (D3PM, Austin et al. 2021): a discrete-state Markov chain per dimension.

The seed notes end with two appendices, the KL divergence of discrete distributions and Markov
chains as stochastic matrices; this module is the diffusion built from them. Each dimension of the
data (a pixel of an 8-bit image: K = 256 levels; any K) is a state x in {0..K-1}, written as a row
vector, and every step is a stochastic matrix Q_t (rows sum to 1):

    q(x_t | x_{t-1}) = x_{t-1} Q_t                                   (Austin et al. Eq. 1)
    q(x_t | x_0)     = x_0 Qbar_t,   Qbar_t = Q_1 Q_2 ... Q_t           (Eq. 3)
    q(x_{t-1} | x_t, x_0) = (x_t Q_t^T) * (x_0 Qbar_{t-1}) / (x_0 Qbar_t x_t^T)

Transitions (``transition``): ``uniform`` Q_t = (1 - beta_t) I + beta_t / K 11^T; ``absorbing`` moves
a state to an extra mask state (index K) with probability beta_t = 1 / (T - t + 1), so x_T is the mask;
``gaussian`` prefers nearby levels, Q_t[i, j] proportional to exp(-4 (i - j)^2 / ((K - 1)^2 beta_t)) off
the diagonal (Austin et al. Appendix A.2.4), doubly stochastic. The uniform and Gaussian chains end
at the uniform distribution. The tables Qbar are products computed in float64 and stored in float32.

The reverse chain (x_0-parameterisation, Eq. 4). The network outputs logits of p~(x_0 | x_t) (K per
dimension, or the truncated discretised logistic of Appendix A.8 with ``head="logistic"``) and

    p_theta(x_{t-1} | x_t) = sum over x_0 of q(x_{t-1} | x_t, x_0) p_theta(x_0 | x_t)
                          proportional to (x_t Q_t^T) * (p~(x_0 | x_t) Qbar_{t-1})

with p_theta(x_0 | x_t) proportional to p~(x_0 | x_t) q(x_t | x_0): the network's belief weighted by
how likely x_0 makes x_t, which rules out the x_0 that cannot have led to x_t (the mask) and makes
the sum one matrix product. Index conventions as everywhere (t in 0..T-1 is the paper's step t+1;
Qbar before index 0 is the identity, so the step from index 0 is the decoder p_theta(x_0 | x_1)).

The bound's terms are the notes' discrete KLs, in bits per dimension; L_T = KL(q(x_T | x_0) ||
p(x_T)) with p(x_T) uniform (the mask for ``absorbing``) is computed, not assumed zero. The loss
is L_vb + lambda CE(x_0) (``hybrid_weight``; Eq. 5), the bound term at the sampled t plus the
cross-entropy of p~(x_0 | x_t) against the data.

Data and x_t are images in [-1, 1] like every process's: level k is -1 + 2k / (K - 1) (for K = 256
the 8-bit grid k / 127.5 - 1 itself), and the mask state is :data:`MASK_VALUE`, outside the data's
range, on the network's input.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ddpm.choices import check_choice
from ddpm.distributions import LOG2, categorical_kl, discretized_logistic_logits
from ddpm.errors import ConfigError, UserError
from ddpm.processes.protocol import ProcessConfig, TrainingLosses, check_images_in_range, check_timesteps, described
from ddpm.schedules import SCHEDULES, make_betas, space_timesteps
from ddpm.tensors import Generator, Model, mean_flat, rand

Transition = Literal["gaussian", "uniform", "absorbing"]
TRANSITIONS: tuple[str, ...] = ("gaussian", "uniform", "absorbing")
Head = Literal["logits", "logistic"]
HEADS: tuple[str, ...] = ("logits", "logistic")
MASK_VALUE = 2.0  # the network's input for the absorbing chain's mask state (data levels lie in (-1, 1))
DEFAULT_SCHEDULES = {"gaussian": "linear", "uniform": "cosine"}  # Austin et al.'s choices for images
TINY = 1e-30  # the floor of p~ Qbar_{t-1} in a logarithm, where float32 underflows (logit gaps over ~100 nats)


@dataclass
class CategoricalConfig(ProcessConfig):
    """The ``[diffusion]`` table of categorical diffusion (``process = "categorical"``)."""

    process: str = described("categorical", "the diffusion process")
    transition: Transition = described("gaussian", "categorical diffusion's transition matrices Q_t: gaussian "
                                                   "(nearby levels, ordinal data), uniform, absorbing (a mask state)")
    num_states: int = described(256, "categorical diffusion: states per dimension K (256 for 8-bit images)")
    head: Head = described("logits", "categorical diffusion: the network outputs K logits of x_0 per dimension, or "
                                     "the 2 parameters of a truncated discretised logistic")
    hybrid_weight: float = described(0.001, "categorical diffusion: lambda of the loss L_vb + lambda CE(x_0)")
    beta_schedule: str | None = described(None, "categorical diffusion: the beta schedule of the uniform and gaussian "
                                                "transitions (default: linear for gaussian, cosine for uniform; "
                                                "absorbing uses 1 / (T - t + 1))")

    def validate(self) -> None:
        super().validate()
        check_choice("diffusion.transition", self.transition, TRANSITIONS)
        check_choice("diffusion.head", self.head, HEADS)
        if self.num_states < 2:
            raise ConfigError(f"diffusion.num_states={self.num_states} must be >= 2")
        if not self.hybrid_weight >= 0:
            raise ConfigError(f"diffusion.hybrid_weight={self.hybrid_weight} must be >= 0")
        if self.beta_schedule is not None and self.beta_schedule not in SCHEDULES:
            raise ConfigError(f"diffusion.beta_schedule={self.beta_schedule!r} is not valid: expected one of "
                              f"{', '.join(repr(s) for s in SCHEDULES)}")


# ------------------------------------------------------------------------------ transition matrices
def transition_betas(transition: Transition, num_timesteps: int, schedule: str | None = None) -> torch.Tensor:
    """beta_1..beta_T (float64): the schedule's for ``uniform`` and ``gaussian``, 1 / (T - t + 1) for ``absorbing``."""
    if transition == "absorbing":
        return 1.0 / (num_timesteps - torch.arange(num_timesteps, dtype=torch.float64))
    return make_betas(schedule or DEFAULT_SCHEDULES[transition], num_timesteps)


def one_step_matrix(transition: Transition, num_states: int, beta: float) -> torch.Tensor:
    """Q_t (float64 ``[K', K']``, K' = K + 1 with the mask for ``absorbing``): rows sum to 1."""
    K = num_states
    if transition == "uniform":
        return (1.0 - beta) * torch.eye(K, dtype=torch.float64) + beta / K
    if transition == "absorbing":
        q = (1.0 - beta) * torch.eye(K + 1, dtype=torch.float64)
        q[:, K] += beta
        q[K, K] = 1.0
        return q
    # Austin et al. A.2.4: off-diagonal weights of a discretised Gaussian of variance ~ beta, normalised over
    # every offset -(K-1)..K-1 so that each row (and column) keeps the rest on the diagonal.
    offsets = torch.arange(-(K - 1), K, dtype=torch.float64)
    weights = torch.exp(-4.0 * offsets**2 / ((K - 1) ** 2 * beta))
    weights = weights / weights.sum()
    idx = torch.arange(K)
    q = weights[(idx[None, :] - idx[:, None]) + (K - 1)]
    q.fill_diagonal_(0.0)
    return q + torch.diag(1.0 - q.sum(dim=1))


@dataclass(frozen=True)
class Transitions:
    """The chain's matrices: ``Q`` ``[T, K', K']`` (one step into each index) and ``Qbar`` ``[T, K', K']``
    (products from x_0), float32, rows summing to 1; ``Qbar_prev`` at index t is ``Qbar[t - 1]`` (the identity
    at index 0)."""

    Q: torch.Tensor
    Qbar: torch.Tensor

    @classmethod
    def from_steps(cls, steps: Iterable[torch.Tensor], num_timesteps: int, num_states: int) -> Transitions:
        """The tables of the chain whose one-step matrices (float64) are ``steps``: Qbar_t = Q_1 ... Q_t in float64."""
        Q = torch.empty(num_timesteps, num_states, num_states)
        Qbar = torch.empty_like(Q)
        running = torch.eye(num_states, dtype=torch.float64)
        for i, q in enumerate(steps):
            running = running @ q
            Q[i], Qbar[i] = q, running
        return cls(Q, Qbar)

    def to(self, device: torch.device) -> Transitions:
        return Transitions(self.Q.to(device), self.Qbar.to(device))

    def qbar_prev(self, t: torch.Tensor) -> torch.Tensor:
        """Qbar at index t - 1 for each t ``[B]`` (the identity where t = 0): ``[B, K', K']``."""
        eye = torch.eye(self.Q.shape[-1], device=self.Q.device, dtype=self.Q.dtype)
        return torch.where((t == 0)[:, None, None], eye, self.Qbar[(t - 1).clamp(min=0)])


def _select_rows(tables: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Row ``states`` of each example's matrix: ``tables`` ``[B, K', K']``, ``states`` int ``[B, ...]`` ->
    ``[B, ..., K']``."""
    flat = states.reshape(states.shape[0], -1)
    rows = torch.gather(tables, 1, flat[:, :, None].expand(-1, -1, tables.shape[-1]))
    return rows.reshape(*states.shape, tables.shape[-1])


# ------------------------------------------------------------------------------------------- process
class CategoricalDiffusion:
    """D3PM over K states per dimension (see the module docstring); a :class:`~ddpm.processes.DiffusionProcess`.

    Args:
        transitions: the chain's tables (:meth:`Transitions.from_steps`).
        num_states: K, the data's states per dimension (the absorbing chain adds the mask state K).
        absorbing: whether state K is the mask, where the chain ends.
        head: what the network outputs (``"logits"``: K per dimension; ``"logistic"``: 2).
        hybrid_weight: lambda of L_vb + lambda CE(x_0).
        timestep_map: the network's timestep for each index (the identity unless respaced).
    """

    name = "categorical"
    error_metric = "ce"  # TrainingLosses.error: the cross-entropy of p~(x_0 | x_t), bits per dimension
    default_sampler = "ancestral"

    def __init__(self, transitions: Transitions, *, num_states: int, absorbing: bool = False, head: Head = "logits",
                 hybrid_weight: float = 0.001, timestep_map: torch.Tensor | None = None) -> None:
        self.transitions = transitions
        self.num_states, self.absorbing, self.head, self.hybrid_weight = num_states, absorbing, head, hybrid_weight
        T = transitions.Q.shape[0]
        self.timestep_map = torch.arange(T) if timestep_map is None else timestep_map.long()
        self._on: dict[torch.device, Transitions] = {}
        self._respaced: dict[tuple[int, ...], CategoricalDiffusion] = {}

    @classmethod
    def from_config(cls, cfg: CategoricalConfig) -> CategoricalDiffusion:
        betas = transition_betas(cfg.transition, cfg.timesteps, cfg.beta_schedule)
        absorbing = cfg.transition == "absorbing"
        steps = (one_step_matrix(cfg.transition, cfg.num_states, float(b)) for b in betas)
        tables = Transitions.from_steps(steps, cfg.timesteps, cfg.num_states + int(absorbing))
        return cls(tables, num_states=cfg.num_states, absorbing=absorbing, head=cfg.head,
                   hybrid_weight=cfg.hybrid_weight)

    def __repr__(self) -> str:
        kind = "absorbing" if self.absorbing else "categorical"
        return f"CategoricalDiffusion(T={self.num_timesteps}, K={self.num_states}, {kind}, head={self.head!r})"

    @property
    def num_timesteps(self) -> int:
        return int(self.transitions.Q.shape[0])

    @property
    def num_total_states(self) -> int:
        """K', the states of the chain: K, plus the mask when absorbing."""
        return self.num_states + int(self.absorbing)

    def output_channels(self, channels: int) -> int:
        return channels * (self.num_states if self.head == "logits" else 2)

    def guidance_channels(self, channels: int) -> int:
        return self.output_channels(channels)  # guidance combines every logit (or logistic parameter)

    def tables(self, device: torch.device) -> Transitions:
        if device not in self._on:
            self._on[device] = self.transitions.to(device)
        return self._on[device]

    # ------------------------------------------------------------------ states and values
    def to_states(self, x: torch.Tensor) -> torch.Tensor:
        """States (int64, same shape) of data or x_t: the nearest level of [-1, 1]; the mask value is state K."""
        K = self.num_states
        levels = torch.round((x.clamp(-1.0, 1.0) + 1.0) / 2.0 * (K - 1)).long()
        return torch.where(x > 1.5, K, levels) if self.absorbing else levels

    def to_values(self, states: torch.Tensor) -> torch.Tensor:
        """Values of states: level k is -1 + 2k / (K - 1), the mask :data:`MASK_VALUE`."""
        values = states.clamp(max=self.num_states - 1).float() / (self.num_states - 1) * 2.0 - 1.0
        return torch.where(states == self.num_states, MASK_VALUE, values) if self.absorbing else values

    # ------------------------------------------------------------------ forward process
    def draw_noise(self, shape: Sequence[int], generator: Generator, *, device: torch.device | str) -> torch.Tensor:
        """One uniform per dimension: q_sample inverts the CDF of q(x_t | x_0) at it."""
        return rand(shape, generator, device=device, dtype=torch.float32)

    def q_probs(self, x0_states: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) = x_0 Qbar_t, ``[B, ..., K']``."""
        return _select_rows(self.tables(x0_states.device).Qbar[t], x0_states)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0): the state where the CDF of x_0 Qbar_t first exceeds the uniform ``noise``."""
        t = check_timesteps(t, x0, self.num_timesteps)
        return self.to_values(self._q_sample_states(self.to_states(x0), t, noise))

    def _q_sample_states(self, x0_states: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        cdf = self.q_probs(x0_states, t).cumsum(-1)
        states = torch.searchsorted(cdf, noise.to(cdf.dtype).unsqueeze(-1).contiguous() * cdf[..., -1:]).squeeze(-1)
        return states.clamp_(max=self.num_total_states - 1)

    def _likelihoods(self, x_t_states: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t Q_t^T: q(x_t | x_{t-1}) for every x_{t-1} (column x_t of Q_t), ``[B, ..., K']``; 0 where x_{t-1}
        cannot lead to x_t."""
        Q = self.tables(x_t_states.device).Q[t]  # [B, K', K']
        flat = x_t_states.reshape(x_t_states.shape[0], 1, -1).expand(-1, Q.shape[1], -1)
        return torch.gather(Q, 2, flat).transpose(1, 2).reshape(*x_t_states.shape, Q.shape[-1])

    def _rows(self, x0_states: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_0 Qbar_{t-1} for data states x_0 (row x_0 of Qbar_{t-1}; x_0 itself at t = 0): ``[B, ..., K']``."""
        return _select_rows(self.tables(x0_states.device).qbar_prev(t), x0_states)

    def _mixture(self, probs_x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """p~(x_0 | x_t) Qbar_{t-1} for the network's probabilities ``[B, ..., K']``."""
        B, Kp = probs_x0.shape[0], probs_x0.shape[-1]
        mixed = torch.bmm(probs_x0.reshape(B, -1, Kp), self.tables(probs_x0.device).qbar_prev(t))
        return mixed.reshape(probs_x0.shape)

    def q_posterior_log_probs(self, x0_states: torch.Tensor, x_t_states: torch.Tensor,
                              t: torch.Tensor) -> torch.Tensor:
        """log q(x_{t-1} | x_t, x_0) ``[B, ..., K']``, proportional to (x_t Q_t^T) * (x_0 Qbar_{t-1}); at t = 0
        the point mass on x_0."""
        joint = self._likelihoods(x_t_states, t) * self._rows(x0_states, t)
        return torch.log(joint / joint.sum(-1, keepdim=True))

    def p_log_probs(self, log_x0: torch.Tensor, x_t_states: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log p_theta(x_{t-1} | x_t) ``[B, ..., K']``, proportional to (x_t Q_t^T) * (p~(x_0 | x_t) Qbar_{t-1}), for
        the network's log p~(x_0 | x_t) (:meth:`x0_logits`)."""
        joint = self._likelihoods(x_t_states, t) * self._mixture(log_x0.exp(), t)
        return torch.log(joint / joint.sum(-1, keepdim=True))

    # ------------------------------------------------------------------ the network
    def x0_logits(self, model: Model, x_t: torch.Tensor, t: torch.Tensor, *,
                  y: torch.Tensor | None = None) -> torch.Tensor:
        """log p~(x_0 | x_t) ``[B, ..., K']`` from the network (the mask, never data, gets -inf)."""
        t_net = self.timestep_map.to(t.device)[t]
        out = model(x_t, t_net) if y is None else model(x_t, t_net, y=y)
        B, C = x_t.shape[0], x_t.shape[1]
        per_dim = self.num_states if self.head == "logits" else 2
        expected = (B, C * per_dim, *x_t.shape[2:])
        if tuple(out.shape) != expected:
            raise ValueError(f"model output has shape {tuple(out.shape)}, expected {expected} ({per_dim} per "
                             f"dimension of the {C} channels, head={self.head!r})")
        out = out.float().reshape(B, C, per_dim, *x_t.shape[2:]).movedim(2, -1).contiguous()  # [B, C, ..., per_dim]
        if self.head == "logits":
            logits = torch.log_softmax(out, dim=-1)
        else:  # a logistic around x_t (a residual), truncated to the K levels
            loc = out[..., 0] + x_t.clamp(-1.0, 1.0)
            logits = discretized_logistic_logits(loc, out[..., 1], self.num_states)
        if self.absorbing:
            logits = torch.cat([logits, torch.full_like(logits[..., :1], -math.inf)], dim=-1)
        return logits

    # ------------------------------------------------------------------ training and the bound
    def training_losses(self, model: Model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *,
                        y: torch.Tensor | None = None) -> TrainingLosses:
        """L_vb at the sampled t (bits/dim) + hybrid_weight * CE of p~(x_0 | x_t) (bits/dim), per example."""
        t = check_timesteps(t, x0, self.num_timesteps)
        x0_states = self._states_on_levels(x0)
        x_t_states = self._q_sample_states(x0_states, t, noise)
        logits = self.x0_logits(model, self.to_values(x_t_states), t, y=y)
        vlb = self._terms(logits, x0_states, x_t_states, t)
        ce = -mean_flat(torch.gather(logits, -1, x0_states.unsqueeze(-1)).squeeze(-1)) / LOG2
        return TrainingLosses(loss=vlb + self.hybrid_weight * ce, error=ce.detach(), vlb=vlb.detach(), t=t)

    def _terms(self, log_x0: torch.Tensor, x0_states: torch.Tensor, x_t_states: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
        """L_t in bits/dim ``[B]``: the decoder -log p_theta(x_0 | x_t) where t = 0, the discrete KL elsewhere.

        With c = x_t Q_t^T, r = x_0 Qbar_{t-1} and m = p~ Qbar_{t-1}, q = c r / Z_q and p = c m / Z_p, so
        KL(q || p) = sum_j q_j (log r_j - log m_j) - log Z_q + log Z_p: c cancels, and the only logarithm
        with a gradient is that of m. Z_q = Qbar_t[x_0, x_t] and Z_p = sum_j c_j m_j.
        """
        with torch.no_grad():  # the posterior q and its part of the KL do not depend on the network
            likelihoods = self._likelihoods(x_t_states, t)
            rows = self._rows(x0_states, t)
            joint_q = likelihoods * rows
            z_q = joint_q.sum(-1, keepdim=True)
            q = joint_q.div_(z_q)
            q_part = torch.special.xlogy(q, rows).sum(-1) - torch.log(z_q.squeeze(-1))  # 0 log 0 = 0
        mixture = self._mixture(log_x0.exp(), t)
        log_z_p = torch.log(torch.linalg.vecdot(likelihoods, mixture).clamp_min(TINY))
        kl = q_part - torch.linalg.vecdot(q, torch.log(mixture.clamp_min(TINY))) + log_z_p
        # the decoder: -log p(x_0) = -log c_{x_0} - log m_{x_0} + log Z_p (m = p~ at t = 0)
        at_x0 = x0_states.unsqueeze(-1)
        log_p_x0 = torch.log(torch.gather(likelihoods, -1, at_x0)) + torch.gather(log_x0, -1, at_x0)
        decoder = log_z_p - log_p_x0.squeeze(-1)
        first = (t == 0).reshape(-1, *([1] * (kl.ndim - 1)))
        return mean_flat(torch.where(first, decoder, kl)) / LOG2

    def check_data(self, x0: torch.Tensor) -> None:
        check_images_in_range(x0, f"the {self.num_states} levels")
        self._states_on_levels(x0)

    def _states_on_levels(self, x0: torch.Tensor) -> torch.Tensor:
        """The states of data ``x0``; data off the K levels is refused (the chain would silently model a rounded
        copy of it)."""
        states = self.to_states(x0)
        off = (x0 - self.to_values(states)).abs()
        if float(off.max()) > 1e-4:
            value = float(x0.flatten()[off.flatten().argmax()])
            raise UserError(f"categorical diffusion with num_states={self.num_states} needs data on the levels "
                            f"-1 + 2k / {self.num_states - 1}, got the value {value:.6g} (8-bit images need "
                            "num_states=256)")
        return states

    def vlb_term(self, model: Model, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        t = check_timesteps(t, x_t, self.num_timesteps)
        logits = self.x0_logits(model, x_t, t, y=y)
        return self._terms(logits, self.to_states(x0), self.to_states(x_t), t)

    def prior_log_probs(self, device: torch.device) -> torch.Tensor:
        """log p(x_T) ``[K']``: uniform over the K levels, or the mask."""
        if self.absorbing:
            p = torch.full((self.num_total_states,), -math.inf, device=device)
            p[self.num_states] = 0.0
            return p
        return torch.full((self.num_states,), -math.log(self.num_states), device=device)

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || p(x_T)) in bits/dim ``[B]``."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        q = self.q_probs(self.to_states(x0), t).double()
        log_q = torch.log(q / q.sum(-1, keepdim=True))
        log_prior = self.prior_log_probs(x0.device).double().expand_as(log_q)
        return (mean_flat(categorical_kl(log_q, log_prior)) / LOG2).float()

    # ------------------------------------------------------------------ the reverse chain
    def prior_sample(self, shape: Sequence[int], generator: Generator, *, device: torch.device | str) -> torch.Tensor:
        """x_T ~ p(x_T): uniform levels, or all mask."""
        if self.absorbing:
            return torch.full(tuple(shape), MASK_VALUE, device=device)
        u = rand(shape, generator, device=device, dtype=torch.float32)
        return self.to_values((u * self.num_states).long().clamp_(max=self.num_states - 1))

    def p_sample(self, model: Model, x_t: torch.Tensor, t: torch.Tensor, *, generator: Generator,
                 clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """x_{t-1} ~ p_theta(x_{t-1} | x_t) (by inverting its CDF at a uniform from the generator(s)), and the
        mean x_0 the network expects, as a value. The last step (t = 0) takes the most probable x_0 without
        noise, as the Gaussian chain takes the decoder's mean (and as Austin et al.'s sampler does)."""
        t = check_timesteps(t, x_t, self.num_timesteps)
        probs_x0 = self.x0_logits(model, x_t, t).exp()
        joint = self._likelihoods(self.to_states(x_t), t) * self._mixture(probs_x0, t)  # p_theta, unnormalised
        u = rand(x_t.shape, generator, device=x_t.device, dtype=torch.float32)
        cdf = joint.cumsum(-1)
        states = torch.searchsorted(cdf, (u.unsqueeze(-1) * cdf[..., -1:]).contiguous()).squeeze(-1)
        states = states.clamp_(max=self.num_total_states - 1)
        last = (t == 0).reshape(-1, *([1] * (states.ndim - 1)))
        states = torch.where(last, joint.argmax(-1), states)
        levels = self.to_values(torch.arange(self.num_states, device=x_t.device))
        x0_mean = probs_x0[..., : self.num_states] @ levels  # the mean under p~(x_0 | x_t)
        return self.to_values(states), x0_mean

    def respaced(self, steps: int | Sequence[float] | torch.Tensor) -> CategoricalDiffusion:
        """The chain visiting only the kept indices: a skip of k steps takes the product of their k matrices."""
        T = self.num_timesteps
        kept = space_timesteps(T, steps) if isinstance(steps, int) else torch.as_tensor(steps).flatten()
        if kept.dtype.is_floating_point:
            if not bool((kept == kept.round()).all()):
                raise UserError("a categorical chain respaces onto whole timesteps; use an integer spacing")
            kept = kept.long()
        kept = kept.unique()
        if kept.numel() == 0 or int(kept[0]) < 0 or int(kept[-1]) > T - 1:
            raise UserError(f"respaced timesteps must lie in [0, {T - 1}], got {kept.tolist()}")
        if kept.numel() == T:
            return self
        key = tuple(kept.tolist())
        if key not in self._respaced:  # the products cost T matrix products: computed once per grid
            Q64, previous, steps_out = self.transitions.Q.double(), -1, []
            for k in key:  # Q'_i = Q_{previous+1} ... Q_k
                product = torch.eye(Q64.shape[-1], dtype=torch.float64)
                for s in range(previous + 1, k + 1):
                    product = product @ Q64[s]
                steps_out.append(product)
                previous = k
            respaced = Transitions(torch.stack(steps_out).float(), self.transitions.Qbar[kept])
            self._respaced[key] = CategoricalDiffusion(
                respaced, num_states=self.num_states, absorbing=self.absorbing, head=self.head,
                hybrid_weight=self.hybrid_weight, timestep_map=self.timestep_map[kept])
        return self._respaced[key]
