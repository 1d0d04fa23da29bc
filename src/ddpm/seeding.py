"""Seeds derived from tuples, so that everything random in training step k depends on (seed, k) only,
and sample (or image) i on (seed, i) only, whatever the batch or the process that draws it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple such as ``(seed, "noise", step)``; stable across runs and machines."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def seeded_generator(device: torch.device | str, *parts: object) -> torch.Generator:
    """A generator on ``device`` seeded with ``derive_seed(*parts)``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*parts))
    return gen


def item_seeds(seed: int, indices: Sequence[int], stream: str = "sample") -> list[int]:
    """The seed of item i: a function of (seed, stream, i) only, so item i is the same in any batch or process."""
    return [derive_seed(seed, stream, int(i)) for i in indices]
