"""How training draws timesteps: uniformly, or by importance (Nichol & Dhariwal 2021, sec. 3.3).

A sampler returns indices t ``[B]`` and weights ``[B]`` with E[w_t * L_t] = mean_t L_t, so the
weighted loss stays an unbiased estimate of the uniform average whatever the proposal. The
trainer owns its sampler (and checkpoints its state); a loss-aware sampler's learned
probabilities also make a good proposal for the Monte Carlo bound (:func:`ddpm.nll_estimate`).
"""

from __future__ import annotations

import torch

from ddpm.choices import TIMESTEP_SAMPLINGS, TimestepSampling, check_choice


class UniformSampler:
    """t ~ U{0..T-1}, weights 1."""

    def __init__(self, num_timesteps: int) -> None:
        self.num_timesteps = num_timesteps

    def probabilities(self) -> torch.Tensor:
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probabilities()
        gen_device = generator.device if generator is not None else torch.device("cpu")
        t = torch.multinomial(p.to(gen_device), batch_size, replacement=True, generator=generator)
        weights = 1.0 / (self.num_timesteps * p[t.cpu()])
        return t.to(device), weights.to(device=device, dtype=torch.float32)

    def observe(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling learns nothing from losses."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class LossAwareSampler(UniformSampler):
    """p_t proportional to sqrt(E[L_t^2]) over the last ``history`` losses of each t.

    Uniform until every t has a full history (N&D's warm-up); mixed with a small uniform part so
    that no t gets probability 0 and the weights 1/(T p_t) stay bounded.
    """

    def __init__(self, num_timesteps: int, *, history: int = 10, uniform_prob: float = 1e-3) -> None:
        super().__init__(num_timesteps)
        self.history = history
        self.uniform_prob = uniform_prob
        self.loss_history = torch.zeros(num_timesteps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.long)

    def probabilities(self) -> torch.Tensor:
        if (self.counts < self.history).any():
            return super().probabilities()
        p = self.loss_history.pow(2).mean(dim=1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def observe(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses ``[B]`` at their timesteps ``[B]`` (a FIFO per t)."""
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist(), strict=True):
            if self.counts[ti] == self.history:
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:].clone()
                self.loss_history[ti, -1] = li
            else:
                self.loss_history[ti, self.counts[ti]] = li
                self.counts[ti] += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"loss_history": self.loss_history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.loss_history = state["loss_history"].to(torch.float64).clone()
        self.counts = state["counts"].to(torch.long).clone()


    def is_warm(self) -> bool:
        """True once every t has a full loss history (before that the probabilities are uniform)."""
        return bool((self.counts == self.history).all())


def make_timestep_sampler(name: TimestepSampling, num_timesteps: int) -> UniformSampler:
    check_choice("timestep_sampling", name, TIMESTEP_SAMPLINGS)
    return UniformSampler(num_timesteps) if name == "uniform" else LossAwareSampler(num_timesteps)
