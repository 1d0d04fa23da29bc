"""Image files decoded per example, on demand: a folder too large for memory, without a cache.

`FolderImages` holds the file paths (and labels) only; `read(indices)` decodes those files with
exactly the rules of the in-memory path (`ddpm.data.images.load_image`: channels, resize + centre
crop), so the pixels equal those an `ArrayDataset` of the same folder holds.

Undecodable files are found only when read. Without `skip_bad_images` that raises
`ImageDecodeError` naming the file. With it, the example is replaced by the next decodable one
(index i + 1, i + 2, ... modulo N) and the file is reported in `ImageBatch.skipped`: batches keep
their size and the replacement depends on the files only, so resuming stays exact. (The in-memory
path drops bad files before it numbers the examples, so with bad files the two orders differ; a
prepared cache, which knows the bad files in advance, numbers like the in-memory path.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ddpm.choices import Split
from ddpm.data import images
from ddpm.data.arrays import ImageBatch
from ddpm.data.lazy import LazyImages
from ddpm.errors import DataError


class FolderImages(LazyImages):
    """Image files decoded when read (see the module docstring).

    Args:
        files: the image paths, in the data set's order.
        channels: 1, 3 or 4 (already resolved).
        image_size: resize + centre-crop size, or None for the native size (which `shape` fixes).
        shape: per-example `(C, H, W)`.
        labels: int64 `[N]` or None; class_names: as `ArrayDataset`.
    """

    def __init__(
        self,
        files: Sequence[Path],
        *,
        channels: int,
        image_size: int | None,
        shape: tuple[int, int, int],
        name: str,
        split: Split,
        labels: np.ndarray | None = None,
        class_names: tuple[str, ...] | None = None,
        skip_bad_images: bool = False,
    ) -> None:
        super().__init__(name=name, split=split, shape=shape, labels=labels, class_names=class_names)
        self.files = [str(p) for p in files]
        self.channels, self.image_size, self.skip_bad_images = channels, image_size, skip_bad_images

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, index: int) -> np.ndarray:
        """The uint8 `[C, H, W]` pixels of example `index`; raises `ImageDecodeError` naming the file."""
        path = self.files[index]
        pixels = images.load_image(Path(path), channels=self.channels, image_size=self.image_size)
        if pixels.shape != self.shape:
            raise DataError(
                f"image {path} has shape {pixels.shape[1:]} but the data set's images are {self.shape[1:]}; "
                "pass image_size to resize and crop all images to one size"
            )
        return pixels

    def read(self, indices: Sequence[int]) -> ImageBatch:
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        used = np.empty(len(indices), dtype=np.int64)
        skipped: list[str] = []
        for k, index in enumerate(indices):
            used[k], out[k] = self._decode_or_next(int(index), skipped)
        labels = None if self.labels is None else self.labels[torch.from_numpy(used)]
        return ImageBatch(torch.from_numpy(out), labels, tuple(skipped))

    def _decode_or_next(self, index: int, skipped: list[str]) -> tuple[int, np.ndarray]:
        """Example `index`, or with `skip_bad_images` the next decodable one (recording the bad files)."""
        n = len(self.files)
        for j in range(index, index + n):
            try:
                return j % n, self.decode(j % n)
            except images.ImageDecodeError:
                if not self.skip_bad_images:
                    raise
                skipped.append(self.files[j % n])
        raise DataError(f"none of the {n} image files of {self.name} could be decoded")
