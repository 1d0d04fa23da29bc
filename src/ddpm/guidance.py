"""Classifier-free guidance (Ho & Salimans 2022) as a model wrapper.

A class-conditional network trained with label dropout knows both p(x | y) and p(x) (label =
the null class). Guided sampling uses

    eps_w(x_t, y) = eps(x_t, null) + w (eps(x_t, y) - eps(x_t, null))

so w = 0 is the unconditional model, w = 1 the conditional one and w > 1 sharpens towards the
class. At fixed x_t both x_0 = (x_t - sigma eps) / alpha and v = alpha eps - sigma x_0 =
(eps - sigma x_t) / alpha are affine in eps, and an affine map commutes with this combination, so
combining the raw x_0 or v predictions gives the same guided model: :class:`Guided` combines
whatever the network predicts. A learned variance is
taken from the conditional half, as in GLIDE. Both halves come from one network call on 2B
examples.

A guided model is just another ``model(x_t, t, y=y)``: samplers and the bound need no special case.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ddpm.tensors import Model


class Guided:
    """``model`` with classifier-free guidance of scale ``scale``; called as ``guided(x_t, t, y=y)``.

    Args:
        model: a class-conditional network, ``model(x_t, t, y=labels)``.
        scale: the guidance weight w (0: unconditional, 1: conditional).
        null_class: the label that stands for "no label" (the network's extra class).
        prediction_channels: how many leading output channels are the prediction (the rest, for a
            learned variance, are taken from the conditional half); None: all.
    """

    def __init__(self, model: Model, scale: float, null_class: int, *, prediction_channels: int | None = None) -> None:
        if not scale >= 0:
            raise ValueError(f"guidance scale must be >= 0, got {scale}")
        self.model, self.scale, self.null_class = model, float(scale), int(null_class)
        self.prediction_channels = prediction_channels

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("a guided model needs class labels y")
        if y.dtype.is_floating_point:  # class weights [B, E]: the null class's one-hot row
            null = torch.zeros_like(y)
            null[:, self.null_class] = 1.0
        else:
            null = torch.full_like(y, self.null_class)
        if self.scale == 1.0:
            return self.model(x_t, t, y=y)
        if self.scale == 0.0:
            return self.model(x_t, t, y=null)
        out = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), y=torch.cat([y, null]))
        cond, uncond = out.chunk(2)
        c = self.prediction_channels or cond.shape[1]
        guided = uncond[:, :c] + self.scale * (cond[:, :c] - uncond[:, :c])
        return guided if c == cond.shape[1] else torch.cat([guided, cond[:, c:]], dim=1)

    def parameters(self) -> Iterator[torch.nn.Parameter]:  # lets the sampling driver find the model's device
        params = getattr(self.model, "parameters", None)
        return params() if callable(params) else iter(())
