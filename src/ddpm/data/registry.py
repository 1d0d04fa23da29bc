"""`load_dataset`: one entry point from a dataset spec (a name or a path) to an `ArrayDataset`.

Specs and their held-out ("test") splits:

| spec                              | data                              | test split                              |
| --------------------------------- | --------------------------------- | --------------------------------------- |
| `mnist5k`, `digits`               | built-in images, see `builtin`    | stratified 10%, fixed seed (500 / 180)  |
| `mnist`, `fashion-mnist`, `cifar10` | downloaded, see `standard`      | the official test set (10,000 each)     |
| `moons`, `gmm`, `swissroll`, `checkerboard` | 2-D vectors, see `toy2d` | fresh samples from another seed        |
| a folder                          | images, see `images`              | seeded 5% of the files (at least 1)     |
| a `.npy` / `.npz` file            | uint8 images or float vectors     | seeded 5% of the rows (at least 1)      |

Every hold-out split uses the fixed seed `SPLIT_SEED`, never the training seed, so the test
examples are the same in every run. Pass `holdout_fraction=0` to use a whole folder or file as
the requested split (e.g. a separate test folder given by the user).

A string equal to a built-in name (case-insensitive, aliases included) is that dataset; any
other string, or a `Path`, is a path. Write `./digits` for a folder called `digits`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ddpm.data import builtin, images, standard, toy2d
from ddpm.data.arrays import (
    ArrayDataset,
    images_to_nchw,
    random_holdout,
    read_array_file,
    standardize_vectors,
    stratified_holdout,
    vectors_to_float,
)

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")
STANDARD_NAMES: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10")
DATASET_NAMES: tuple[str, ...] = builtin.BUILTIN_IMAGE_NAMES + toy2d.TOY_NAMES + STANDARD_NAMES
ALIASES: dict[str, str] = {
    **toy2d.TOY_ALIASES,
    "fmnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar": "cifar10",
}
FILE_HOLDOUT_FRACTION = 0.05
SPLIT_SEED = 0
DEFAULT_TOY_POINTS = 10_000
NUM_CLASSES = 10  # every built-in and standard image set has 10 classes


def resolve_name(spec: str) -> str | None:
    """The canonical built-in name for `spec` (case-insensitive, aliases resolved), or None."""
    key = spec.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in DATASET_NAMES else None


def load_dataset(
    spec: str | Path,
    *,
    split: Split = "train",
    image_size: int | None = None,
    channels: int | None = None,
    skip_bad_images: bool = False,
    cache_dir: Path | None = None,
    num_points: int | None = None,
    seed: int = 0,
    holdout_fraction: float | None = None,
    array_key: str | None = None,
    standardize: bool = False,
) -> ArrayDataset:
    """Load one split of a dataset into memory (see the module docstring for specs and splits).

    Args:
        spec: a name in `DATASET_NAMES` (or an alias), a folder of images, or a .npy/.npz file.
        split: "train" or "test".
        image_size: images only: resize (shorter side, bicubic) and centre-crop to this square size.
            None keeps the native size (a folder's images must then all have one size).
        channels: images only: 1, 3 or 4; None keeps the source's (folders: inferred from the
            first image, grey -> 1, colour -> 3).
        skip_bad_images: folders only: skip undecodable files instead of stopping; the count is in
            `.num_skipped` and is logged and warned.
        cache_dir: where downloads are kept (default `$DDPM_CACHE` or `~/.cache/ddpm`).
        num_points: 2-D toys only: number of points in the split (default 10,000).
        seed: 2-D toys only: sampling seed (the test split uses a seed derived from it).
        holdout_fraction: folders, arrays and built-in image sets: share held out as "test"
            (default 5% for folders and arrays, 10% for built-ins); 0 uses everything for either split.
        array_key: .npz only: name of the data array.
        standardize: float vector files only: subtract the per-dimension mean and divide by the std
            of the train portion (stored in `.standardization`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    name = resolve_name(spec) if isinstance(spec, str) else None
    if name in toy2d.TOY_NAMES:
        _reject_options(
            name,
            image_size=image_size,
            channels=channels,
            holdout_fraction=holdout_fraction,
            array_key=array_key,
            standardize=standardize or None,
        )
        return _load_toy(name, split, num_points=num_points, seed=seed)
    _reject_options(str(spec), num_points=num_points)
    if name is not None:
        _reject_options(name, standardize=standardize or None, array_key=array_key)
        if name in STANDARD_NAMES:
            _reject_options(name, holdout_fraction=holdout_fraction)
            data, labels = _load_standard(name, split, cache_dir)
        else:
            data, labels = builtin.load_builtin_images(name)
            fraction = builtin.HOLDOUT_FRACTION if holdout_fraction is None else holdout_fraction
            keep = _pick(stratified_holdout(labels, fraction, seed=SPLIT_SEED), split, fraction)
            data, labels = data[keep], labels[keep]
        data = images.conform_images(data, image_size=image_size, channels=channels)
        return _image_dataset(data, labels, name=name, split=split, num_classes=NUM_CLASSES)

    path = Path(spec).expanduser()
    fraction = FILE_HOLDOUT_FRACTION if holdout_fraction is None else holdout_fraction
    if path.is_dir():
        _reject_options(str(path), standardize=standardize or None, array_key=array_key)
        return _load_folder(path, split, fraction, image_size, channels, skip_bad_images)
    if path.is_file():
        return _load_array_file(path, split, fraction, image_size, channels, array_key, standardize)
    raise ValueError(
        f"unknown dataset {str(spec)!r}: not a built-in name ({', '.join(DATASET_NAMES)}; "
        f"aliases {', '.join(ALIASES)}) and no such folder or .npy/.npz file"
    )


def _reject_options(source: str, **options: object) -> None:
    given = [k for k, v in options.items() if v is not None]
    if given:
        raise ValueError(f"option(s) {', '.join(given)} do not apply to dataset {source!r}")


def _pick(train_test: tuple[np.ndarray, np.ndarray], split: Split, fraction: float) -> np.ndarray | slice:
    if fraction == 0.0:
        return slice(None)
    return train_test[0] if split == "train" else train_test[1]


def _image_dataset(
    data: np.ndarray,
    labels: np.ndarray | None,
    *,
    name: str,
    split: Split,
    num_classes: int | None = None,
    skipped: tuple[str, ...] = (),
) -> ArrayDataset:
    return ArrayDataset(
        torch.from_numpy(np.ascontiguousarray(data)),
        kind="image",
        name=name,
        split=split,
        labels=None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        num_classes=num_classes,
        skipped_files=skipped,
    )


def _load_standard(name: str, split: Split, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if name == "cifar10":
        return standard.load_cifar10(split, cache_dir=cache_dir)
    variant: Literal["mnist", "fashion-mnist"] = "mnist" if name == "mnist" else "fashion-mnist"
    return standard.load_idx_dataset(variant, split, cache_dir=cache_dir)


def _split_seed(seed: int, split: Split) -> int:
    """Independent seeds for the toy splits: hashing (seed, split) avoids test(seed) == train(seed + 1)."""
    state = np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 32 | int(state[1])


def _load_toy(name: str, split: Split, *, num_points: int | None, seed: int) -> ArrayDataset:
    n = DEFAULT_TOY_POINTS if num_points is None else num_points
    if n < 1:
        raise ValueError(f"num_points must be positive, got {n}")
    generator = torch.Generator().manual_seed(_split_seed(seed, split))
    points = toy2d.sample_toy(name, n, generator=generator)
    return ArrayDataset(points, kind="vector", name=name, split=split, log_density=toy2d.toy_log_density(name))


def _load_folder(
    folder: Path,
    split: Split,
    fraction: float,
    image_size: int | None,
    channels: int | None,
    skip_bad_images: bool,
) -> ArrayDataset:
    files = images.find_images(folder)
    if not files:
        extensions = ", ".join(sorted(images.IMAGE_EXTENSIONS))
        raise ValueError(f"no image files ({extensions}) found under {folder}")
    if channels is None:
        channels = images.infer_channels(images.first_decodable(files, skip_bad_images=skip_bad_images))
    chosen = _pick(random_holdout(len(files), fraction, seed=SPLIT_SEED), split, fraction)
    subset = files[chosen] if isinstance(chosen, slice) else [files[i] for i in chosen]
    data, skipped = images.load_image_files(
        subset, channels=channels, image_size=image_size, skip_bad_images=skip_bad_images
    )
    return _image_dataset(data, None, name=str(folder), split=split, skipped=tuple(map(str, skipped)))


def _load_array_file(
    path: Path,
    split: Split,
    fraction: float,
    image_size: int | None,
    channels: int | None,
    array_key: str | None,
    standardize: bool,
) -> ArrayDataset:
    array, labels = read_array_file(path, key=array_key)
    if array.ndim == 0 or array.shape[0] == 0:
        raise ValueError(f"{path}: the array is empty (shape {array.shape})")
    train_idx, test_idx = random_holdout(array.shape[0], fraction, seed=SPLIT_SEED)
    keep = _pick((train_idx, test_idx), split, fraction)
    split_labels = None if labels is None else labels[keep]
    if array.ndim in (3, 4):
        data = images_to_nchw(array, source=str(path))[keep]
        data = images.conform_images(data, image_size=image_size, channels=channels)
        return _image_dataset(data, split_labels, name=str(path), split=split)
    _reject_options(str(path), image_size=image_size, channels=channels)
    vectors = torch.from_numpy(vectors_to_float(array, source=str(path)))
    stats = None
    if standardize:
        stats = standardize_vectors(vectors if fraction == 0.0 else vectors[torch.from_numpy(train_idx)])
        vectors = (vectors - stats[0]) / stats[1]
    return ArrayDataset(
        vectors[keep].contiguous(),
        kind="vector",
        name=str(path),
        split=split,
        labels=None if split_labels is None else torch.from_numpy(split_labels.astype(np.int64)),
        standardization=stats,
    )
