"""Image data sets that read their examples on demand, a batch of indices at a time.

An in-memory `ArrayDataset` holds every image as one uint8 tensor. The data sets here hold only
an index (file names, a memory-mapped array, an Arrow table) and the labels, and produce
uint8 pixels when asked:

    batch = ds.read([4, 17, 2])        # ImageBatch: images uint8 [3, C, H, W], labels int64 [3] or None
    x0 = ds.get_batch(torch.tensor([4, 17, 2]))   # float32 in [-1, 1], as ArrayDataset.get_batch

`read` is what DataLoader workers call (see `ddpm.train.feed`); it returns the same pixels the
in-memory path would hold for the same indices, so a run is the same whichever path feeds it.
Subclasses: `ddpm.data.cache.MappedImages` (a prepared uint8 cache), `ddpm.data.stream.FolderImages`
(image files decoded per item) and `ddpm.data.hf.HFImages` (a Hugging Face `datasets` table).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ddpm.choices import Split
from ddpm.data.arrays import ImageBatch, uint8_to_float


class LazyImages(abc.ABC):
    """Base of the on-demand image data sets: the `ArrayDataset` interface plus `read`.

    Attributes:
        kind: always "image".
        streamed: True: the trainer reads batches through DataLoader workers (`ddpm.train.feed`).
        shape: per-example shape `(C, H, W)`.
        labels: int64 `[N]` class labels (held in memory: 8 bytes an image), or None.
        num_classes, class_names: as `ArrayDataset`.
        name, split: as `ArrayDataset`.
        skipped_files, num_skipped: files known to be undecodable and left out at construction.
    """

    kind = "image"
    streamed = True

    def __init__(
        self,
        *,
        name: str,
        split: Split,
        shape: tuple[int, int, int],
        labels: np.ndarray | None = None,
        class_names: tuple[str, ...] | None = None,
        skipped_files: tuple[str, ...] = (),
    ) -> None:
        self.name = name
        self.split = split
        self.shape = tuple(shape)
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.class_names = class_names if labels is not None else None
        if self.labels is None:
            self.num_classes = None
        elif class_names is not None:
            self.num_classes = len(class_names)
        else:
            self.num_classes = int(self.labels.max()) + 1 if self.labels.numel() else 0
        self.skipped_files = skipped_files
        self.num_skipped = len(skipped_files)

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, indices: Sequence[int]) -> ImageBatch:
        """The examples at `indices` (positions in this data set), in that order."""

    def get_batch(self, indices: Tensor) -> Tensor:
        """Gather examples by index: `[B]` int64 -> float32 `[B, C, H, W]` in [-1, 1]."""
        return uint8_to_float(self.read(indices.tolist()).images)

    def get_labels(self, indices: Tensor) -> Tensor | None:
        """Labels int64 `[B]` of the examples at `indices`, or None for unlabelled data."""
        return None if self.labels is None else self.labels[indices.to(torch.int64).cpu()]

    def __getitem__(self, index: int) -> Tensor:
        return uint8_to_float(self.read([index]).images[0])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, len={len(self)}, "
            f"shape={self.shape}, num_classes={self.num_classes})"
        )
