"""Exponential moving average (EMA) of model weights, the weights DDPM samples with.

After update number ``n`` (0-based) the shadow weights become
``shadow <- d_n * shadow + (1 - d_n) * weights`` with the warm-up ``d_n`` of :func:`ema_decay`.
Without a warm-up a decay of 0.9999 would keep the random initialisation in the average for
tens of thousands of steps, so short runs would sample from noise; the warm-ups start at
``d_0`` <= 0.1 and rise to ``decay``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ddpm.choices import EMA_WARMUPS, EMAWarmup


def ema_decay(
    n: int, decay: float, warmup: EMAWarmup = "power", *, inv_gamma: float = 1.0, power: float = 0.75
) -> float:
    """Decay used at EMA update number ``n`` (0-based).

    - ``"none"``: ``decay``.
    - ``"ratio"``: ``min(decay, (1 + n) / (10 + n))``, 0.1 at the first update.
    - ``"power"``: ``1 - (1 + n / inv_gamma) ** -power`` clipped to ``[0, decay]``, 0 at the first
      update (the shadow starts as a copy); with power 3/4 it reaches 0.9999 near n = 2e5 and with
      power 2/3 near n = 1e6.
    """
    if warmup == "none":
        return decay
    if warmup == "ratio":
        return min(decay, (1 + n) / (10 + n))
    if warmup == "power":
        return min(decay, max(0.0, 1.0 - (1.0 + n / inv_gamma) ** -power))
    raise ValueError(f"unknown EMA warmup {warmup!r}; valid: {', '.join(repr(w) for w in EMA_WARMUPS)}")


class ExponentialMovingAverage:
    """A float32 shadow copy of a model, updated from the model's (synchronised) weights.

    ``ema.module`` is a full model in eval mode holding the averaged parameters (buffers such as
    normalisation statistics are copied, not averaged), ready to sample with. The shadow is float32
    whatever the model's dtype, so tiny updates ``(1 - d) * (w - shadow)`` are not rounded away.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        decay: float = 0.9999,
        warmup: EMAWarmup = "power",
        inv_gamma: float = 1.0,
        power: float = 0.75,
    ) -> None:
        if warmup not in EMA_WARMUPS:
            raise ValueError(f"unknown EMA warmup {warmup!r}; valid: {', '.join(repr(w) for w in EMA_WARMUPS)}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must lie in [0, 1)")
        self.decay, self.warmup, self.inv_gamma, self.power = decay, warmup, inv_gamma, power
        self.num_updates = 0
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        return ema_decay(self.num_updates, self.decay, self.warmup, inv_gamma=self.inv_gamma, power=self.power)

    @torch.no_grad()
    def update(self, model: nn.Module) -> float:
        """Move the shadow towards ``model``'s weights; returns the decay used."""
        d = self.current_decay()
        params = dict(model.named_parameters())
        for name, param in self.module.named_parameters():
            param.lerp_(params[name].detach().to(param.dtype), 1.0 - d)
        buffers = dict(model.named_buffers())
        for name, shadow in self.module.named_buffers():
            shadow.copy_(buffers[name])
        self.num_updates += 1
        return d

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, with the model's key names (what ``ema.safetensors`` holds)."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], *, num_updates: int | None = None) -> None:
        self.module.load_state_dict(state)
        if num_updates is not None:
            self.num_updates = int(num_updates)

    def extra_state(self) -> dict[str, Any]:
        """Everything besides the weights that a resume needs (primitive values only)."""
        return {"num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup}

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (cast to its dtypes)."""
        model.load_state_dict(self.module.state_dict())
