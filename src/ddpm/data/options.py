"""How image sources become examples: the options `load_dataset` passes down, the loader choice, splits.

Shared by `ddpm.data.registry` and the sources it dispatches to (`ddpm.data.hf`), so neither
imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ddpm.choices import Loader, Split
from ddpm.data.arrays import random_holdout

FILE_HOLDOUT_FRACTION = 0.05
SPLIT_SEED = 0
MEMORY_LOADER_MAX_BYTES = 1 << 30  # loader="auto" streams image splits larger than this (1 GiB decoded)


@dataclass(frozen=True)
class ImageOptions:
    """How image files become examples; the image-related arguments of `load_dataset`."""

    image_size: int | None = None
    channels: int | None = None
    skip_bad_images: bool = False
    loader: Loader = "auto"
    prepared_dir: Path = Path()  # where folder caches live (load_dataset resolves it: <cache dir>/prepared)
    cache_images: bool = True
    workers: int | None = None  # processes for building a cache

    def choose_loader(self, count: int, example_shape: Sequence[int]) -> Literal["memory", "stream"]:
        """The resolved loader for `count` uint8 examples of `example_shape` (see `ddpm.data.registry`)."""
        if self.loader != "auto":
            return self.loader
        return "stream" if count * int(np.prod(example_shape)) > MEMORY_LOADER_MAX_BYTES else "memory"


def split_indices(n: int, fraction: float, split: Split) -> np.ndarray:
    """The sorted indices of `split` among `n` files or rows: a hold-out seeded by `SPLIT_SEED`."""
    if fraction == 0.0:
        return np.arange(n)
    train_idx, test_idx = random_holdout(n, fraction, seed=SPLIT_SEED)
    return train_idx if split == "train" else test_idx
