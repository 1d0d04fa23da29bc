"""A residual MLP noise predictor for low-dimensional data (2-D toy distributions).

``MLPDenoiser(config)(x_t, t[, y])``: ``x_t`` [B, D] float, ``t`` [B] long (0-based) -> [B, D], or
[B, 2D] with ``learned_sigma`` (prediction, then the variance interpolation ``v``).
Each block is ``h + Linear(dropout(SiLU(Linear(SiLU(LayerNorm(h))) + time projection)))``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ddpm.errors import ConfigError
from ddpm.nn.embedding import as_timesteps, timestep_embedding

__all__ = ["MLPConfig", "MLPDenoiser", "MLP_PRESETS", "mlp_preset"]


@dataclass(frozen=True)
class MLPConfig:
    dim: int = 2  # data dimension D
    hidden: int = 128  # width of the residual stream
    num_blocks: int = 3  # residual blocks
    time_embed_dim: int = 64  # sinusoidal embedding size of t
    dropout: float = 0.0
    learned_sigma: bool = False  # output [B, 2D]: prediction, then v
    out_dim: int | None = None  # output size; None: dim (doubled when learned_sigma)
    num_classes: int | None = None  # class-conditional: labels 0..num_classes-1 plus the null class num_classes

    def __post_init__(self) -> None:
        for name in ("dim", "hidden", "num_blocks", "time_embed_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"MLPConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.out_dim is not None and self.out_dim < 1:
            raise ConfigError(f"MLPConfig: out_dim must be >= 1 or None, got {self.out_dim}")
        if self.time_embed_dim < 4:
            raise ConfigError(f"MLPConfig: time_embed_dim must be >= 4, got {self.time_embed_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"MLPConfig: dropout must be in [0, 1), got {self.dropout}")

    @property
    def output_dim(self) -> int:
        out = self.dim if self.out_dim is None else self.out_dim
        return out * (2 if self.learned_sigma else 1)

    def replace(self, **changes: Any) -> MLPConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MLP_PRESETS: dict[str, MLPConfig] = {
    "mlp-2d": MLPConfig(dim=2, hidden=128, num_blocks=3, time_embed_dim=64),
}


def mlp_preset(name: str, **overrides: Any) -> MLPConfig:
    if name not in MLP_PRESETS:
        raise ConfigError(f"unknown MLP preset {name!r}; valid names: {sorted(MLP_PRESETS)}")
    return MLP_PRESETS[name].replace(**overrides)


class _Block(nn.Module):
    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(config.hidden)
        self.fc1 = nn.Linear(config.hidden, config.hidden)
        self.emb_proj = nn.Linear(config.hidden, config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.hidden)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: Tensor, emb_act: Tensor) -> Tensor:
        r = self.fc1(F.silu(self.norm(h))) + self.emb_proj(emb_act)
        return h + self.fc2(self.dropout(F.silu(r)))


class MLPDenoiser(nn.Module):
    def __init__(self, config: MLPConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or MLPConfig()
        self.time_embed = nn.Sequential(
            nn.Linear(config.time_embed_dim, config.hidden),
            nn.SiLU(),
            nn.Linear(config.hidden, config.hidden),
        )
        self.class_embed = nn.Embedding(config.num_classes + 1, config.hidden) if config.num_classes else None
        self.proj_in = nn.Linear(config.dim, config.hidden)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_blocks))
        self.norm_out = nn.LayerNorm(config.hidden)
        self.proj_out = nn.Linear(config.hidden, config.output_dim)
        for block in cast("list[_Block]", self.blocks):  # each block starts as the identity
            nn.init.zeros_(block.fc2.weight)
            nn.init.zeros_(block.fc2.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``y``: class labels ``[B]`` of a class-conditional network (None: the null class)."""
        if x.ndim != 2 or x.shape[1] != self.config.dim:
            raise ValueError(f"MLPDenoiser expects x_t of shape [B, {self.config.dim}], got {tuple(x.shape)}")
        t = as_timesteps(t, x.shape[0], x.device)
        emb = timestep_embedding(t, self.config.time_embed_dim).to(x.dtype)
        emb = self.time_embed(emb)
        if self.class_embed is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.class_embed.num_embeddings - 1, device=x.device, dtype=torch.long)
            emb = emb + self.class_embed(y.to(x.device))
        elif y is not None:
            raise ValueError("this MLP is unconditional (num_classes is None) but got class labels y")
        emb_act = F.silu(emb)
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, emb_act)
        return self.proj_out(F.silu(self.norm_out(h)))
