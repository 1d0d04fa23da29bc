"""Sinusoidal timestep embedding (Ho et al. 2020, Appendix B; Vaswani et al. 2017, Sec. 3.5).

Timesteps are the 0-based indices ``t`` in ``0..T-1`` used everywhere in ``ddpm``. For
``dim = 2 * half`` the embedding is the Transformer layout, sines first, then cosines::

    freq_i = exp(-ln(max_period) * i / (half - freq_shift)),   i = 0 .. half-1
    emb[:, i]        = sin(t * freq_i)
    emb[:, half + i] = cos(t * freq_i)

``freq_shift=1`` is what the paper's TensorFlow code uses (the last frequency is exactly
``1 / max_period``) and what the released DDPM checkpoints expect; ``freq_shift=0`` is the
improved-diffusion / Transformer variant. ``flip_sin_to_cos`` puts the cosines first.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["timestep_embedding"]


def timestep_embedding(
    t: Tensor,
    dim: int,
    *,
    max_period: float = 10000.0,
    freq_shift: float = 1.0,
    flip_sin_to_cos: bool = False,
) -> Tensor:
    """Embed timesteps ``t`` (shape ``[B]``, integer or float) as a float32 tensor ``[B, dim]``.

    An odd ``dim`` gets one trailing zero column.
    """
    if t.ndim != 1:
        raise ValueError(f"timesteps must have shape [B], got {tuple(t.shape)}")
    half = dim // 2
    if half < 1 or half - freq_shift <= 0:
        raise ValueError(f"embedding dim {dim} too small for freq_shift={freq_shift}")
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (
        -math.log(max_period) / (half - freq_shift)
    )
    args = t.to(torch.float32)[:, None] * torch.exp(exponent)[None, :]
    parts = [torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def as_timesteps(t: Tensor | int, batch_size: int, device: torch.device) -> Tensor:
    """``t`` as a tensor ``[B]`` on ``device`` (a scalar is broadcast); a clear error for other shapes."""
    if not torch.is_tensor(t):
        t = torch.tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"t must have shape [B] = [{batch_size}], got {tuple(t.shape)}")
    return t.to(device)
