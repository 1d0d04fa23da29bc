"""`load_dataset`: one entry point from a dataset spec (a name or a path) to an `ArrayDataset`.

Specs and their held-out ("test") splits:

| spec                              | data                              | test split                              |
| --------------------------------- | --------------------------------- | --------------------------------------- |
| a name in `DATASETS`              | built-in, see `records`           | as its record says (`record.splits`)    |
| a folder                          | images, see `images`              | seeded 5% of the files (at least 1)     |
| a prepared cache folder           | images, see `cache`               | as the folder it was prepared from      |
| a `.npy` / `.npz` file            | uint8 images or float vectors     | seeded 5% of the rows (at least 1)      |
| `hf:NAME_OR_PATH[:split]`         | a `datasets` data set, see `hf`   | its test split, else seeded 5%          |

Every hold-out split uses the fixed seed `SPLIT_SEED`, never the training seed, so the test
examples are the same in every run. Pass `holdout_fraction=0` to use a whole folder or file as
the requested split (e.g. a separate test folder given by the user).

A string equal to a built-in name (case-insensitive, aliases included) is that dataset; any
other string, or a `Path`, is a path. Write `./digits` for a folder called `digits`.

Loaders (`loader=`): "memory" decodes everything into one in-memory `ArrayDataset`; "stream"
returns an on-demand data set (`ddpm.data.lazy`) that the trainer reads through DataLoader
workers; "auto" streams folders, caches and `datasets` data sets whose decoded split would exceed
`MEMORY_LOADER_MAX_BYTES`, and keeps everything else in memory. Built-in, downloaded, `.npy`/`.npz`
and 2-D data are small and always in memory. With `cache_images=True` (the default) a folder's up-to-date
prepared cache (`ddpm.data.cache`) is used whichever loader reads it, and a streamed folder
without one gets one written first; with `cache_images=False` caches are neither read nor
written and a streamed folder is decoded file by file in the workers.
Both paths give the same pixels and labels for the same indices.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ddpm.choices import LOADERS, SPLITS, Loader, check_choice
from ddpm.data import bars, builtin, cache, images, standard, toy2d  # noqa: F401 - importing them registers their sets
from ddpm.data.arrays import (
    ArrayDataset,
    images_to_nchw,
    random_holdout,
    read_array_file,
    standardize_vectors,
    vectors_to_float,
)
from ddpm.data.lazy import LazyImages
from ddpm.data.options import (
    FILE_HOLDOUT_FRACTION,
    SPLIT_SEED,
    ImageOptions,
    Split,
    split_indices,
)
from ddpm.data.records import DATASETS, SourceRequest, find_dataset
from ddpm.data.stream import FolderImages
from ddpm.errors import DataError

if TYPE_CHECKING:
    from ddpm.data.hf import HFStream

logger = logging.getLogger(__name__)

HF_PREFIX = "hf:"


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
    loader: Loader = "auto",
    prepared_dir: Path | None = None,
    cache_images: bool = True,
    workers: int | None = None,
    hf_streaming: bool = False,
) -> ArrayDataset | LazyImages | HFStream:
    """Load one split of a dataset, in memory or on demand (see the module docstring).

    Args:
        spec: a name in `DATASETS` (or an alias), a folder of images, a prepared cache folder,
            a .npy/.npz file, or `hf:NAME_OR_PATH[:split]`.
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
        loader: "auto", "memory" or "stream" (module docstring); applies to folders, prepared
            caches and `hf:` data sets.
        prepared_dir: where folder caches are looked up and written; None = `<cache_dir>/prepared`.
        cache_images: folders: read an up-to-date prepared cache, and write one on first use when
            streaming (True); or ignore caches and decode the files (False: streamed folders are
            decoded in the DataLoader workers every epoch).
        workers: processes that build a folder's cache (None = `cache.default_workers()`).
        hf_streaming: `hf:` only: open the data set as a stream (`ddpm.data.hf.HFStream`), for sets
            larger than the disk; its order is the stream's, and "test" must be a split of it.
    """
    check_choice("split", split, SPLITS)
    check_choice("loader", loader, LOADERS)
    opts = ImageOptions(
        image_size=image_size, channels=channels, skip_bad_images=skip_bad_images, loader=loader,
        prepared_dir=prepared_dir if prepared_dir is not None else cache.default_prepared_dir(cache_dir),
        cache_images=cache_images, workers=workers,
    )
    if isinstance(spec, str) and spec.startswith(HF_PREFIX):
        _reject_options(spec, num_points=num_points, array_key=array_key, standardize=standardize or None)
        from ddpm.data import hf

        if hf_streaming:
            return hf.load_hf_stream(spec[len(HF_PREFIX):], split=split, options=opts, cache_dir=cache_dir)
        return hf.load_hf_dataset(spec[len(HF_PREFIX):], split=split, holdout_fraction=holdout_fraction,
                                  options=opts, cache_dir=cache_dir)
    record = find_dataset(spec) if isinstance(spec, str) else None
    if record is not None:
        given = {"image_size": image_size, "channels": channels, "holdout_fraction": holdout_fraction,
                 "num_points": num_points}
        refused = {k: v for k, v in given.items() if k not in record.options}
        _reject_options(record.name, array_key=array_key, standardize=standardize or None,
                        hf_streaming=hf_streaming or None, **refused)
        data, labels = record.load(SourceRequest(split, cache_dir, holdout_fraction, num_points, seed))
        if record.kind == "vector":
            return ArrayDataset(data, kind="vector", name=record.name, split=split, log_density=record.log_density)
        data = images.conform_images(data, image_size=image_size, channels=channels)
        return _image_dataset(data, labels, name=record.name, split=split, num_classes=record.num_classes,
                              class_names=record.class_names or None)

    _reject_options(str(spec), num_points=num_points, hf_streaming=hf_streaming or None)
    path = Path(spec).expanduser()
    fraction = FILE_HOLDOUT_FRACTION if holdout_fraction is None else holdout_fraction
    if path.is_dir():
        _reject_options(str(path), standardize=standardize or None, array_key=array_key)
        if cache.is_prepared_cache(path):
            return _load_prepared(path, split, fraction, opts)
        return _load_folder(path, split, fraction, opts)
    if path.is_file():
        return _load_array_file(path, split, fraction, image_size, channels, array_key, standardize)
    aliases = [a for r in DATASETS.values() for a in r.aliases]
    raise DataError(
        f"unknown dataset {str(spec)!r}: not a built-in name ({', '.join(DATASETS)}; "
        f"aliases {', '.join(aliases)}) and no such folder or .npy/.npz file"
    )


def _reject_options(source: str, **options: object) -> None:
    given = [k for k, v in options.items() if v is not None]
    if given:
        raise DataError(f"option(s) {', '.join(given)} do not apply to dataset {source!r}")


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
    class_names: tuple[str, ...] | None = None,
) -> ArrayDataset:
    return ArrayDataset(
        torch.from_numpy(np.ascontiguousarray(data)),
        kind="image",
        name=name,
        split=split,
        labels=None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        num_classes=num_classes,
        skipped_files=skipped,
        class_names=class_names,
    )


def _load_folder(folder: Path, split: Split, fraction: float, opts: ImageOptions) -> ArrayDataset | LazyImages:
    scan = cache.scan_folder(folder)
    files = scan.paths
    if not files:
        extensions = ", ".join(sorted(images.IMAGE_EXTENSIONS))
        raise DataError(f"no image files ({extensions}) found under {folder}")
    # Any decodable image gives the shape; with channels to infer, a bad first file stays an error.
    first = images.first_decodable(files, skip_bad_images=opts.skip_bad_images or opts.channels is not None)
    channels = opts.channels if opts.channels is not None else images.infer_channels(first)
    chosen = split_indices(len(files), fraction, split)
    found = None
    if opts.cache_images:
        found = cache.find_cache(scan, image_size=opts.image_size, channels=channels, prepared_dir=opts.prepared_dir)
    if found is not None:
        return _from_cache(*found, chosen, split, opts, name=str(folder))
    side_h, side_w = (opts.image_size,) * 2 if opts.image_size is not None else (first.height, first.width)
    shape = (channels, side_h, side_w)
    labelled = images.folder_labels(folder, files)
    labels, class_names = (None, None) if labelled is None else labelled
    chosen_files = [files[i] for i in chosen]
    if opts.choose_loader(len(chosen), shape) == "memory":
        data, skipped = images.load_image_files(
            chosen_files, channels=channels, image_size=opts.image_size, skip_bad_images=opts.skip_bad_images
        )
        if labels is not None:
            bad = set(skipped)
            labels = np.array([labels[i] for i, p in zip(chosen, chosen_files, strict=True) if p not in bad])
        return _image_dataset(data, labels, name=str(folder), split=split, skipped=tuple(map(str, skipped)),
                              class_names=class_names)
    if opts.cache_images:
        target = cache.cache_location(folder, image_size=opts.image_size, channels=channels,
                                      prepared_dir=opts.prepared_dir)
        logger.info("preparing a cache of %d images of %s in %s (once)", len(files), folder, target)
        cache.ensure_cache(scan, target, image_size=opts.image_size, channels=channels, workers=opts.workers)
        return _from_cache(target, cache.read_manifest(target), chosen, split, opts, name=str(folder))
    return FolderImages(
        chosen_files, channels=channels, image_size=opts.image_size, shape=shape, name=str(folder), split=split,
        labels=None if labels is None else labels[chosen], class_names=class_names,
        skip_bad_images=opts.skip_bad_images,
    )


def _load_prepared(path: Path, split: Split, fraction: float, opts: ImageOptions) -> ArrayDataset | LazyImages:
    """A prepared cache named directly (e.g. made by `ddpm prepare` on another node), used as it is."""
    try:
        manifest = cache.read_manifest(path)
    except cache.CacheError:
        manifest = _rebuild_from_source(path)
    for option, value, have in (("image_size", opts.image_size, manifest.image_size),
                                ("channels", opts.channels, manifest.channels)):
        if value is not None and value != have:
            raise DataError(f"{path} was prepared with {option}={have}; {option}={value} was asked for")
    return _from_cache(path, manifest, split_indices(manifest.count, fraction, split), split, opts, name=str(path))


def _rebuild_from_source(path: Path) -> cache.Manifest:
    """Rebuild an incomplete prepared cache from its source folder, when that folder is at hand."""
    try:
        raw = json.loads((path / cache.MANIFEST_NAME).read_text(encoding="utf-8"))
        source, image_size, channels = Path(raw["source"]), raw["image_size"], int(raw["channels"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise cache.CacheError(f"{path}: unreadable manifest ({exc}); prepare it again") from exc
    if not source.is_dir():
        raise cache.CacheError(
            f"prepared cache {path} is incomplete and its source folder {source} is not here to rebuild it; "
            "prepare it again"
        )
    logger.warning("prepared cache %s is incomplete: rebuilding it from %s", path, source)
    cache.ensure_cache(cache.scan_folder(source), path, image_size=image_size, channels=channels)
    return cache.read_manifest(path)


def _from_cache(
    path: Path, manifest: cache.Manifest, chosen: np.ndarray, split: Split, opts: ImageOptions, *, name: str
) -> ArrayDataset | LazyImages:
    """The `chosen` rows of a prepared cache, without its undecodable files, mapped or in memory."""
    bad = dict(manifest.bad)
    bad_chosen = [int(i) for i in chosen if int(i) in bad]
    if bad_chosen and not opts.skip_bad_images:
        raise images.ImageDecodeError(bad[bad_chosen[0]])
    skipped = tuple(str(Path(manifest.source) / manifest.files[i]) for i in bad_chosen)
    if skipped:
        message = f"skipped {len(skipped)} undecodable image file(s), first: {skipped[0]}"
        logger.warning(message)
        warnings.warn(message, stacklevel=3)
    rows = np.array([i for i in chosen if int(i) not in bad], dtype=np.int64)
    if rows.size == 0:
        raise DataError(f"none of the {len(chosen)} image files of {name} ({split}) could be decoded")
    mapped = cache.MappedImages(path, manifest, rows, name=name, split=split, skipped_files=skipped)
    return mapped.to_memory() if opts.choose_loader(len(rows), mapped.shape) == "memory" else mapped


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
        raise DataError(f"{path}: the array is empty (shape {array.shape})")
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
