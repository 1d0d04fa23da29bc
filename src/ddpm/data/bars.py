"""Bars and stripes (MacKay 2003, Information Theory, Inference, and Learning Algorithms): a binary image set
whose distribution, and so whose entropy, is known exactly: the set to check an exact likelihood against.

A 4x4 image is drawn by choosing rows or columns (probability 1/2 each) and switching each of the four
lines on independently with probability 1/2: 2 x 16 draws, of which the all-off and all-on images arise
both ways. So 28 images have probability 1/32, 2 have 1/16, and the entropy is
28/32 * 5 + 2/16 * 4 = 4.875 bits per image, 4.875 / 16 = 0.3047 bits per dimension (:data:`ENTROPY_BITS`).
Pixels are 0 (off) and 255 (on), so a two-state model sees levels -1 and 1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ddpm.data.records import DatasetRecord, SourceRequest, register_dataset
from ddpm.data.toy2d import DEFAULT_TOY_POINTS, split_seed
from ddpm.errors import DataError

SIZE = 4
ENTROPY_BITS = (28 / 32 * 5 + 2 / 16 * 4) / (SIZE * SIZE)  # bits per dimension (the module docstring)


def sample_bars(n: int, generator: torch.Generator) -> Tensor:
    """``n`` images, uint8 ``[n, 1, 4, 4]`` with values 0 and 255."""
    lines = torch.rand(n, SIZE, generator=generator) < 0.5  # which lines are on
    columns = torch.rand(n, generator=generator) < 0.5
    rows = lines[:, :, None].expand(n, SIZE, SIZE)  # line i is row i
    images = torch.where(columns[:, None, None], rows.transpose(1, 2), rows)
    return (images.to(torch.uint8) * 255)[:, None]


def log_prob(images: Tensor) -> Tensor:
    """log P(x) in nats ``[B]`` of images ``[B, 1, 4, 4]`` (any two values; the larger is "on"); -inf off the set."""
    on = images.reshape(-1, SIZE, SIZE) > images.reshape(images.shape[0], -1).amin(1)[:, None, None]
    rows_constant = (on == on[:, :, :1]).all(dim=(1, 2))  # every row is all on or all off
    columns_constant = (on == on[:, :1, :]).all(dim=(1, 2))
    both = rows_constant & columns_constant  # all off or all on
    log_p = torch.full((images.shape[0],), -math.inf, dtype=torch.float64)
    log_p[rows_constant | columns_constant] = -math.log(32.0)
    log_p[both] = -math.log(16.0)
    return log_p


def _load(request: SourceRequest) -> tuple[Tensor, None]:
    n = DEFAULT_TOY_POINTS if request.num_points is None else request.num_points
    if n < 1:
        raise DataError(f"num_points must be positive, got {n}")
    return sample_bars(n, torch.Generator().manual_seed(split_seed(request.seed, request.split))), None


register_dataset(DatasetRecord(
    "bars", f"bars and stripes, 4x4 binary, exact entropy {ENTROPY_BITS:.4f} bits/dim (generated)", "image", _load,
    frozenset({"num_points"}), f"{DEFAULT_TOY_POINTS:,} fresh images per split, from a seed derived from (seed, split)",
    aliases=("bars-and-stripes",)))
