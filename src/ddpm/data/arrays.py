"""In-memory datasets backed by one tensor, hold-out splits, and `.npy`/`.npz` readers.

Conventions, used by every dataset in `ddpm.data`:

* images are stored as uint8 `[N, C, H, W]` and returned as float32 in [-1, 1] on the
  256-level grid `k / 127.5 - 1` (k = 0..255), converted on access;
* low-dimensional data ("vectors") are stored and returned as float32 `[N, D]`.

The trainer gathers whole batches with `ArrayDataset.get_batch(indices)`, one `index_select` on the
stored tensor, so no DataLoader is needed; `__getitem__` is there for code that wants one anyway.
Labels of a batch come from `get_labels(indices)`; `read(indices)` returns both as an `ImageBatch`,
the interface the on-demand data sets of `ddpm.data.lazy` share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ddpm.errors import DataError

DataKind = Literal["image", "vector"]
DATA_KINDS: tuple[str, ...] = ("image", "vector")

# The names an .npz data array is recognised by when no key is given (exactly one of them must be present).
NPZ_DATA_KEYS: tuple[str, ...] = ("images", "x", "data", "arr_0")
NPZ_LABEL_KEYS: tuple[str, ...] = ("y", "labels")


def uint8_to_float(images: Tensor) -> Tensor:
    """Map uint8 pixels k = 0..255 to float32 `k / 127.5 - 1` in [-1, 1] (a new tensor)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def float_to_uint8(images: Tensor) -> Tensor:
    """Inverse of `uint8_to_float`: clamp to [-1, 1] and round to the nearest of the 256 levels."""
    return ((images.detach().to(torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5).round_().to(torch.uint8)


@dataclass(frozen=True)
class ImageBatch:
    """Pixels and labels of a batch of examples, as read from storage (before the [-1, 1] mapping).

    Attributes:
        images: uint8 `[B, C, H, W]`.
        labels: int64 `[B]`, or None for unlabelled data.
        skipped: files found undecodable while reading this batch; each was replaced by the next
            decodable example (see `FolderImages`), so the batch keeps its size.
    """

    images: Tensor
    labels: Tensor | None = None
    skipped: tuple[str, ...] = ()

    def pin_memory(self) -> ImageBatch:
        """A copy in page-locked memory (DataLoader calls this with `pin_memory=True`)."""
        labels = None if self.labels is None else self.labels.pin_memory()
        return ImageBatch(self.images.pin_memory(), labels, self.skipped)


class ArrayDataset(Dataset[Tensor]):
    """A dataset held in memory as one tensor: uint8 images `[N, C, H, W]` or float32 vectors `[N, D]`.

    Attributes:
        data: the stored tensor (uint8 for images, float32 for vectors).
        kind: "image" or "vector".
        shape: per-example shape, `(C, H, W)` or `(D,)`.
        labels: int64 `[N]` class labels, or None.
        num_classes: number of classes when `labels` is set, else None.
        class_names: the name of each class (folders: the sub-folder names), or None.
        streamed: always False: the trainer gathers batches directly, without DataLoader workers.
        name: a short name for logs and checkpoints ("mnist5k", a folder path, ...).
        split: "train" or "test".
        num_skipped: images skipped as undecodable (folders with `skip_bad_images`), else 0.
        skipped_files: the paths of those images.
        log_density: exact log-density `[B, D] -> [B]` in nats of the generating distribution, when
            known (the 2-D Gaussian mixture), else None. For standardised vectors it is None.
        standardization: `(mean [D], std [D])` subtracted and divided out of vector data, or None.
    """

    streamed = False

    def __init__(
        self,
        data: Tensor,
        *,
        kind: DataKind,
        name: str,
        split: Literal["train", "test"] = "train",
        labels: Tensor | None = None,
        num_classes: int | None = None,
        log_density: Callable[[Tensor], Tensor] | None = None,
        standardization: tuple[Tensor, Tensor] | None = None,
        skipped_files: tuple[str, ...] = (),
        class_names: tuple[str, ...] | None = None,
    ) -> None:
        if kind not in DATA_KINDS:
            raise ValueError(f"kind must be one of {DATA_KINDS}, got {kind!r}")
        if kind == "image" and (data.dtype != torch.uint8 or data.dim() != 4):
            raise ValueError(f"image data must be uint8 [N, C, H, W], got {data.dtype} {tuple(data.shape)}")
        if kind == "vector" and (data.dtype != torch.float32 or data.dim() != 2):
            raise ValueError(f"vector data must be float32 [N, D], got {data.dtype} {tuple(data.shape)}")
        if labels is not None:
            if labels.dim() != 1 or labels.shape[0] != data.shape[0]:
                raise ValueError(f"labels must have shape [{data.shape[0]}], got {tuple(labels.shape)}")
            labels = labels.to(torch.int64)
            if num_classes is None and class_names is not None:
                num_classes = len(class_names)
            if num_classes is None and labels.numel() > 0:
                num_classes = int(labels.max()) + 1
        self.data = data
        self.kind: DataKind = kind
        self.name = name
        self.split = split
        self.labels = labels
        self.num_classes = num_classes if labels is not None else None
        self.class_names = class_names if labels is not None else None
        self.log_density = log_density
        self.standardization = standardization
        self.skipped_files = skipped_files
        self.num_skipped = len(skipped_files)

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-example shape: `(C, H, W)` for images, `(D,)` for vectors."""
        return tuple(self.data.shape[1:])

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        row = self.data[index]
        return uint8_to_float(row) if self.kind == "image" else row.clone()

    def get_batch(self, indices: Tensor) -> Tensor:
        """Gather examples by index: `[B]` int64 -> float32 `[B, *shape]` on the data's device."""
        batch = self.data.index_select(0, indices.to(self.data.device, torch.int64))
        return uint8_to_float(batch) if self.kind == "image" else batch

    def get_labels(self, indices: Tensor) -> Tensor | None:
        """Labels int64 `[B]` of the examples at `indices`, or None for unlabelled data."""
        return None if self.labels is None else self.labels.index_select(0, indices.to(self.labels.device, torch.int64))

    def read(self, indices: Sequence[int]) -> ImageBatch:
        """The stored uint8 images (and labels) at `indices`; images only (see `ddpm.data.lazy`)."""
        if self.kind != "image":
            raise TypeError(f"read() returns uint8 images; {self.name!r} holds vectors: use get_batch()")
        index = torch.as_tensor(list(indices), dtype=torch.int64)
        return ImageBatch(self.data.index_select(0, index.to(self.data.device)), self.get_labels(index))

    def to(self, device: torch.device | str) -> ArrayDataset:
        """A copy of this dataset whose tensors live on `device` (images stay uint8 there)."""
        labels = None if self.labels is None else self.labels.to(device)
        return ArrayDataset(
            self.data.to(device),
            kind=self.kind,
            name=self.name,
            split=self.split,
            labels=labels,
            num_classes=self.num_classes,
            log_density=self.log_density,
            standardization=self.standardization,
            skipped_files=self.skipped_files,
            class_names=self.class_names,
        )

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, split={self.split!r}, kind={self.kind!r}, "
            f"len={len(self)}, shape={self.shape}, num_classes={self.num_classes})"
        )


# ---------------------------------------------------------------------------------------------
# Hold-out splits. Both are deterministic functions of (size or labels, fraction, seed), so the
# held-out examples never change between runs or with the training seed.
# ---------------------------------------------------------------------------------------------


def holdout_count(n: int, fraction: float) -> int:
    """Number of held-out examples: `round(fraction * n)`, at least 1 when fraction > 0."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"holdout fraction must be in [0, 1), got {fraction}")
    return 0 if fraction == 0.0 else max(1, round(fraction * n))


def random_holdout(n: int, fraction: float, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split `range(n)` into (train, test) index arrays, both sorted, with `holdout_count` test items.

    The test set is the first `holdout_count(n, fraction)` entries of a permutation drawn from
    `numpy.random.default_rng(seed)`.
    """
    n_test = holdout_count(n, fraction)
    if n_test >= n and n_test > 0:
        raise DataError(f"cannot hold out {n_test} of {n} examples; pass holdout_fraction=0 to use all")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def stratified_holdout(labels: np.ndarray, fraction: float, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, test) so each class keeps its share in the test set.

    The test set has exactly `round(fraction * N)` examples. Class c gets `floor(fraction * n_c)`
    of them, and the remaining slots go to the classes with the largest fractional parts (ties
    to the smaller label). Within a class the held-out examples are the first of a permutation
    drawn from `numpy.random.default_rng(seed)`, one permutation of the whole index set.
    """
    labels = np.asarray(labels)
    n_total = int(round(fraction * labels.shape[0]))
    classes, counts = np.unique(labels, return_counts=True)
    exact = fraction * counts
    per_class = np.floor(exact).astype(np.int64)
    remainder = n_total - int(per_class.sum())
    order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - per_class[i]), classes[i]))
    for i in order[:remainder]:
        per_class[i] += 1
    perm = np.random.default_rng(seed).permutation(labels.shape[0])
    test: list[np.ndarray] = []
    for c, k in zip(classes, per_class, strict=True):
        members = perm[labels[perm] == c]
        test.append(members[:k])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    mask = np.ones(labels.shape[0], dtype=bool)
    mask[test_idx] = False
    return np.nonzero(mask)[0], test_idx


# ---------------------------------------------------------------------------------------------
# .npy / .npz files
# ---------------------------------------------------------------------------------------------


def images_to_nchw(array: np.ndarray, *, source: str) -> np.ndarray:
    """Bring an image array to uint8 `[N, C, H, W]`.

    Layout rule for 4-D arrays `(N, a, b, c)`: channel-last `(N, H, W, C)` when c is 1, 3 or 4;
    otherwise channel-first `(N, C, H, W)` when a is 1, 3 or 4; anything else is an error. 3-D
    arrays are grey `(N, H, W)`. Integer dtypes other than uint8 are accepted when every value is
    in 0..255. `source` names the file in error messages.
    """
    if not (np.issubdtype(array.dtype, np.integer) and array.ndim in (3, 4)):
        raise DataError(
            f"{source}: images must be an integer array (N, H, W), (N, H, W, C) or (N, C, H, W) "
            f"with values 0..255; got dtype {array.dtype}, shape {array.shape}"
        )
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(f"{source}: integer image values must lie in 0..255, shape {array.shape}")
        array = array.astype(np.uint8)
    if array.ndim == 3:
        return array[:, None]
    if array.shape[3] in (1, 3, 4):
        return np.ascontiguousarray(array.transpose(0, 3, 1, 2))
    if array.shape[1] in (1, 3, 4):
        return np.ascontiguousarray(array)
    raise DataError(
        f"{source}: cannot tell the channel axis of shape {array.shape}; expected (N, H, W, C) or "
        "(N, C, H, W) with C in {1, 3, 4}"
    )


def read_array_file(path: Path, *, key: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read data (and labels, for .npz) from a `.npy` or `.npz` file.

    For `.npz`, the data array is `key` when given, else the one array named in `NPZ_DATA_KEYS`;
    a file with none or several of those names is an error listing its arrays (never a guess).
    Labels are the first of `NPZ_LABEL_KEYS` present (and not the data key). Never unpickles
    (`allow_pickle=False`).
    """
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if key is not None:
            raise DataError(f"{path}: an array key (data.data_key) applies to .npz files only")
        return np.load(path, allow_pickle=False), None
    if suffix != ".npz":
        raise DataError(f"{path}: expected a .npy or .npz file")
    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        if not names:
            raise DataError(f"{path}: the .npz file holds no arrays")
        if key is not None and key not in names:
            raise DataError(f"{path}: no array {key!r}; the file holds {names}")
        data_key = key or _npz_data_key(path, names)
        label_key = next((k for k in NPZ_LABEL_KEYS if k in names and k != data_key), None)
        data = archive[data_key]
        labels = archive[label_key] if label_key is not None else None
    if labels is not None and (
        labels.ndim != 1 or labels.shape[0] != data.shape[0] or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise DataError(
            f"{path}: labels {label_key!r} must be integers of shape ({data.shape[0]},), "
            f"got dtype {labels.dtype}, shape {labels.shape}"
        )
    return data, labels


def _npz_data_key(path: Path, names: list[str]) -> str:
    known = [k for k in NPZ_DATA_KEYS if k in names]
    if len(known) == 1:
        return known[0]
    which = f"several data arrays ({', '.join(known)})" if known else f"no array named {', '.join(NPZ_DATA_KEYS)}"
    raise DataError(
        f"{path}: the .npz file holds {which}; its arrays are {names}: choose one with --data-key "
        "(data.data_key)"
    )


def vectors_to_float(array: np.ndarray, *, source: str) -> np.ndarray:
    """Check a float `(N, D)` array of low-dimensional data and return it as float32."""
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        hint = ""
        if np.issubdtype(array.dtype, np.integer) and array.ndim == 2:
            hint = "; integer (N, D) arrays are ambiguous: reshape images to (N, H, W[, C]) or cast to float"
        raise DataError(
            f"{source}: low-dimensional data must be a float array (N, D); "
            f"got dtype {array.dtype}, shape {array.shape}{hint}"
        )
    if not np.isfinite(array).all():
        raise DataError(f"{source}: the array contains NaN or infinite values")
    return array.astype(np.float32)


def standardize_vectors(train: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std of `[N, D]` data (std floored at 1e-8 for constant dimensions)."""
    mean = train.mean(dim=0)
    std = train.std(dim=0, unbiased=False).clamp_min(1e-8) if train.shape[0] > 1 else torch.ones_like(mean)
    return mean, std
