"""Two-dimensional toy distributions, scaled so each coordinate has roughly unit spread.

| name           | definition                                                                       |
| -------------- | -------------------------------------------------------------------------------- |
| `moons`        | two interleaved half circles (unit radius, Gaussian noise std 0.05), centred and  |
|                | divided by 0.7                                                                   |
| `gmm`          | 8 isotropic Gaussians of std 0.1, equal weights, means on a circle of radius     |
|                | sqrt(2) at angles 2 pi k / 8 (per-coordinate std ~ 1.005); exact `log_density`   |
| `swissroll`    | `t (cos t, sin t) / 7` with t = 1.5 pi (1 + 2u), u ~ U(0, 1), noise std 0.05     |
| `checkerboard` | uniform on the 8 dark cells of a 4x4 board on [-2, 2]^2                          |

`mixture` is an alias of `gmm`. Sampling takes a `torch.Generator`, so samples are reproducible.
Each split is `DEFAULT_TOY_POINTS` fresh samples (`num_points` to change it) from a seed derived
from (seed, split); their records (`ddpm.data.records`) are at the end.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ddpm.choices import SPLITS, Split
from ddpm.data.records import DatasetRecord, SourceRequest, register_dataset
from ddpm.errors import DataError

TOY_NAMES: tuple[str, ...] = ("moons", "gmm", "swissroll", "checkerboard")
TOY_ALIASES: dict[str, str] = {"mixture": "gmm", "swiss-roll": "swissroll", "swiss_roll": "swissroll"}
DEFAULT_TOY_POINTS = 10_000


@dataclass(frozen=True)
class GaussianMixture2D:
    """Equal-weight mixture of isotropic Gaussians: p(x) = (1/K) sum_k N(x; means[k], std^2 I)."""

    means: Tensor  # [K, 2] float64
    std: float

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """`n` float32 samples `[n, 2]`."""
        k = torch.randint(self.means.shape[0], (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.std * noise).to(torch.float32)

    def log_density(self, x: Tensor) -> Tensor:
        """Exact log p(x) in nats, `[B, 2] -> [B]`, computed in float64 and returned in x's dtype."""
        x64 = x.to(torch.float64)
        means = self.means.to(x64.device)
        sq_dist = (x64[:, None, :] - means[None]).pow(2).sum(-1)  # [B, K]
        # log N(x; mu, s^2 I) in 2-D = -|x - mu|^2 / (2 s^2) - log(2 pi s^2)
        log_comp = -sq_dist / (2 * self.std**2) - math.log(2 * math.pi * self.std**2)
        return (torch.logsumexp(log_comp, dim=1) - math.log(means.shape[0])).to(x.dtype)


def ring_mixture(num_modes: int = 8, *, radius: float = math.sqrt(2.0), std: float = 0.1) -> GaussianMixture2D:
    """Gaussians with means on a circle: mode k at angle 2 pi k / num_modes."""
    angles = 2 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    return GaussianMixture2D(means=means, std=std)


GMM = ring_mixture()


def _moons(n: int, g: torch.Generator | None) -> Tensor:
    theta = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, torch.cos(theta), 1.0 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    points = torch.stack([x, y], dim=1) + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return (points - torch.tensor([0.5, 0.25], dtype=torch.float64)) / 0.7


def _swissroll(n: int, g: torch.Generator | None) -> Tensor:
    t = 1.5 * math.pi * (1.0 + 2.0 * torch.rand(n, generator=g, dtype=torch.float64))
    points = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1) / 7.0
    return points + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)


def _checkerboard(n: int, g: torch.Generator | None) -> Tensor:
    # Pick a cell column i and row j with i + j even (8 of the 16 cells), then a uniform point in it.
    col = torch.randint(4, (n,), generator=g)
    row = 2 * torch.randint(2, (n,), generator=g) + col % 2
    offset = torch.rand(n, 2, generator=g, dtype=torch.float64)
    return torch.stack([col, row], dim=1).to(torch.float64) + offset - 2.0


_SAMPLERS: dict[str, Callable[[int, torch.Generator | None], Tensor]] = {
    "moons": _moons,
    "gmm": lambda n, g: GMM.sample(n, generator=g).to(torch.float64),
    "swissroll": _swissroll,
    "checkerboard": _checkerboard,
}


def canonical_toy_name(name: str) -> str:
    """Resolve aliases and check the name; raises ValueError listing the valid names."""
    key = TOY_ALIASES.get(name.lower(), name.lower())
    if key not in _SAMPLERS:
        raise DataError(f"unknown 2-D toy {name!r}; valid: {', '.join(TOY_NAMES + tuple(TOY_ALIASES))}")
    return key


def sample_toy(name: str, n: int, *, generator: torch.Generator | None = None) -> Tensor:
    """`n` float32 samples `[n, 2]` of the toy `name` (see the module table)."""
    return _SAMPLERS[canonical_toy_name(name)](n, generator).to(torch.float32)


def toy_log_density(name: str) -> Callable[[Tensor], Tensor] | None:
    """The exact log-density function `[B, 2] -> [B]` (nats) of toy `name`, or None if not provided."""
    return GMM.log_density if canonical_toy_name(name) == "gmm" else None


def split_seed(seed: int, split: Split) -> int:
    """Independent seeds for the toy splits: hashing (seed, split) avoids test(seed) == train(seed + 1)."""
    state = np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def _loader(name: str) -> Callable[[SourceRequest], tuple[Tensor, None]]:
    def load(request: SourceRequest) -> tuple[Tensor, None]:
        n = DEFAULT_TOY_POINTS if request.num_points is None else request.num_points
        if n < 1:
            raise DataError(f"num_points must be positive, got {n}")
        generator = torch.Generator().manual_seed(split_seed(request.seed, request.split))
        return sample_toy(name, n, generator=generator), None

    return load


_DESCRIPTIONS = {"moons": "two interleaved half circles", "gmm": "8 Gaussians on a circle (exact log-density)",
                 "swissroll": "a 2-D spiral", "checkerboard": "the dark cells of a 4x4 board"}
for _name in TOY_NAMES:
    register_dataset(DatasetRecord(
        _name, f"2-D toy: {_DESCRIPTIONS[_name]}", "vector", _loader(_name), frozenset({"num_points"}),
        f"{DEFAULT_TOY_POINTS:,} fresh points per split, from a seed derived from (seed, split)", features="points",
        aliases=tuple(a for a, n in TOY_ALIASES.items() if n == _name), log_density=toy_log_density(_name)))
