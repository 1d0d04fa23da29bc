"""Hugging Face `datasets` data sets as image data: `hf:NAME_OR_PATH[:split]`.

The source is, in this order:

* a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`: read with
  `datasets.load_from_disk` (memory-mapped Arrow files, nothing is decoded up front);
* any other folder or name: `datasets.load_dataset(NAME_OR_PATH)`, so a hub name (from the local
  hub cache when offline) or a local folder of images (the `imagefolder` builder, which labels
  images by sub-folder) both work.

The image column is the first column whose feature is `datasets.Image` (else one called "image"
or "img"); the label column is the first `datasets.ClassLabel` column (its names become
`class_names`), else an integer column called "label" or "labels"; no label column means
unlabelled data. Each image goes through the folder rules (`ddpm.data.images`: channels, resize +
centre crop), so pixels equal those of the same files read as a folder.

Splits: the training split is `split` from the spec (default "train"). The test split is the data
set's "test" split when the spec names no split and there is one, else a seeded 5% hold-out of the
training split, as for folders.

Streaming (`streaming=True`, for sets larger than the disk): the source is opened as a
`datasets.IterableDataset` and becomes an `HFStream`, which has no random access. Its order is
the stream's own: epoch e is the stream shuffled with a seed the trainer derives from (seed, e)
(`datasets`' shard shuffle plus a `SHUFFLE_BUFFER` example buffer), and global batch k is
positions [k B, (k + 1) B) of the concatenated epochs, sliced per process as usual (see
`ddpm.train.feed`). Resuming, and equivalence of N processes with one, hold as for random-access
data; the order differs from that of the same data read with random access. The number of
examples must be known (the data set's split metadata, or `len` of a local table).

`datasets` is optional (`pip install 'ddpm[hf]'`); a missing package or an unreachable hub is a
`DataError` saying what is missing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.choices import Split
from ddpm.data import images
from ddpm.data.arrays import ArrayDataset, ImageBatch
from ddpm.data.lazy import LazyImages
from ddpm.data.options import FILE_HOLDOUT_FRACTION, ImageOptions, split_indices
from ddpm.errors import DataError

DISK_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
SHUFFLE_BUFFER = 10_000  # examples in the streaming shuffle buffer
IMAGE_COLUMN_NAMES = ("image", "img")
LABEL_COLUMN_NAMES = ("label", "labels")


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            "hf: data sets need the optional package 'datasets': pip install 'ddpm[hf]' (or pip install datasets)"
        ) from exc
    return datasets


def parse_spec(spec: str) -> tuple[str, str | None]:
    """`NAME_OR_PATH[:split]` -> (source, split or None); an existing path is never split at a colon."""
    if Path(spec).expanduser().exists() or ":" not in spec:
        return spec, None
    source, split = spec.rsplit(":", 1)
    return source, split or None


def open_source(source: str, *, cache_dir: Path | None = None, streaming: bool = False) -> Any:
    """The `datasets.Dataset` or `DatasetDict` named by `source` (Iterable ones when streaming)."""
    datasets = _import_datasets()
    path = Path(source).expanduser()
    if path.is_dir() and any((path / m).is_file() for m in DISK_MARKERS):
        obj = datasets.load_from_disk(str(path))
        if not streaming:
            return obj
        if isinstance(obj, datasets.DatasetDict):
            return datasets.IterableDatasetDict({k: _as_stream(v) for k, v in obj.items()})
        return _as_stream(obj)
    kwargs: dict[str, Any] = {"streaming": streaming}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(Path(cache_dir) / "huggingface")
    try:
        return datasets.load_dataset(str(path) if path.is_dir() else source, **kwargs)
    except Exception as exc:  # the hub client raises many types when offline or the name is unknown
        where = "the local folder" if path.is_dir() else "the Hugging Face hub or its local cache"
        raise DataError(
            f"cannot load the datasets data set {source!r} from {where}: {type(exc).__name__}: {exc}. "
            "Offline, a hub data set must already be in the hub cache (HF_HOME or HF_DATASETS_CACHE); "
            "or save it once with Dataset.save_to_disk(FOLDER) and pass hf:FOLDER"
        ) from exc


def _as_stream(table: Any) -> Any:
    """A local table as a stream that still knows its length (tables saved to disk have no split metadata)."""
    stream = table.to_iterable_dataset(num_shards=max(1, min(len(table), 64)))
    stream._ddpm_length = len(table)
    return stream


def pick_split(obj: Any, split: str, *, source: str) -> Any:
    """One split of a `DatasetDict`, or the `Dataset` itself (which is taken as any split)."""
    datasets = _import_datasets()
    if isinstance(obj, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in obj:
            raise DataError(f"hf:{source} has no split {split!r}; its splits are {sorted(obj)}")
        return obj[split]
    return obj


def image_and_label_columns(table: Any, *, source: str) -> tuple[str, str | None, tuple[str, ...] | None]:
    """(image column, label column or None, class names or None) of a `datasets.Dataset`."""
    datasets = _import_datasets()
    features = table.features
    image = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    image = image or next((k for k in IMAGE_COLUMN_NAMES if k in features), None)
    if image is None:
        raise DataError(f"hf:{source} has no image column (a datasets.Image feature); its columns: {list(features)}")
    label = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if label is not None:
        return image, label, tuple(features[label].names)
    label = next((k for k in LABEL_COLUMN_NAMES if k in features and _is_integer(features[k])), None)
    return image, label, None


def _is_integer(feature: Any) -> bool:
    return getattr(feature, "dtype", "").startswith(("int", "uint"))


class HFImages(LazyImages):
    """Rows of a `datasets.Dataset` with an image column, decoded on demand (see the module docstring)."""

    def __init__(self, table: Any, rows: np.ndarray, *, image_column: str, label_column: str | None,
                 class_names: tuple[str, ...] | None, channels: int, image_size: int | None,
                 shape: tuple[int, int, int], name: str, split: Split, skip_bad_images: bool = False) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        labels = None
        if label_column is not None:
            labels = np.asarray(table.select_columns([label_column])[label_column], dtype=np.int64)[rows]
        super().__init__(name=name, split=split, shape=shape, labels=labels, class_names=class_names)
        self.table, self.rows = table, rows
        self.image_column, self.channels, self.image_size = image_column, channels, image_size
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def decode(self, index: int) -> np.ndarray:
        """uint8 `[C, H, W]` of example `index`; raises `ImageDecodeError` naming the data set and row."""
        row = int(self.rows[index])
        where = f"row {row} of {self.name}"
        try:
            img = self.table[row][self.image_column]
        except Exception as exc:  # datasets raises many types for a broken image
            raise images.ImageDecodeError(f"cannot decode the image of {where}: {exc}") from exc
        return _to_image(img, channels=self.channels, image_size=self.image_size, shape=self.shape, where=where)

    def read(self, indices: Sequence[int]) -> ImageBatch:
        out = np.empty((len(indices), *self.shape), dtype=np.uint8)
        used = np.empty(len(indices), dtype=np.int64)
        skipped: list[str] = []
        n = len(self)
        for k, index in enumerate(indices):
            for j in range(int(index), int(index) + n):  # with skip_bad_images: the next decodable one
                try:
                    out[k], used[k] = self.decode(j % n), j % n
                    break
                except images.ImageDecodeError:
                    if not self.skip_bad_images:
                        raise
                    skipped.append(f"{self.name} row {int(self.rows[j % n])}")
            else:
                raise DataError(f"none of the {n} images of {self.name} could be decoded")
        labels = None if self.labels is None else self.labels[torch.from_numpy(used)]
        return ImageBatch(torch.from_numpy(out), labels, tuple(skipped))

    def to_memory(self) -> ArrayDataset:
        """Decode every example into one in-memory `ArrayDataset`."""
        batch = self.read(range(len(self)))
        return ArrayDataset(batch.images, kind="image", name=self.name, split=self.split,
                            labels=batch.labels, num_classes=self.num_classes, class_names=self.class_names,
                            skipped_files=tuple(dict.fromkeys(batch.skipped)))


def _to_image(img: Any, *, channels: int, image_size: int | None, shape: tuple[int, ...], where: str) -> np.ndarray:
    """A PIL image (or a `datasets` {"bytes", "path"} dict) through the folder rules to uint8 `[C, H, W]`."""
    try:
        if isinstance(img, dict):
            import io

            from PIL import Image

            img = Image.open(io.BytesIO(img["bytes"]) if img.get("bytes") else img["path"])
        img.load()
    except Exception as exc:  # PIL and datasets raise many types for a broken image
        raise images.ImageDecodeError(f"cannot decode the image of {where}: {exc}") from exc
    img = images.to_channels(img, channels)
    if image_size is not None:
        img = images.resize_center_crop(img, image_size)
    pixels = images.pil_to_chw(img)
    if pixels.shape != shape:
        raise DataError(f"the image of {where} has shape {pixels.shape[1:]} but the data set's are "
                        f"{shape[1:]}; pass image_size to resize and crop all images to one size")
    return pixels


class HFStream:
    """A streamed `datasets` data set without random access (see the module docstring).

    `epoch(seed)` iterates one shuffled pass of raw examples (images not decoded); `decode(example,
    position)` turns one into uint8 pixels and a label. `ddpm.train.feed` does the positioning.
    """

    kind = "image"
    streamed = True
    iterable = True

    def __init__(self, stream: Any, *, length: int, image_column: str, label_column: str | None,
                 class_names: tuple[str, ...] | None, channels: int, image_size: int | None,
                 shape: tuple[int, int, int], name: str, split: Split, skip_bad_images: bool = False) -> None:
        datasets = _import_datasets()
        self.stream = stream.cast_column(image_column, datasets.Image(decode=False))
        self.length, self.image_column, self.label_column = length, image_column, label_column
        self.class_names = class_names
        self.num_classes = None if label_column is None else (len(class_names) if class_names else None)
        self.labels = None  # not known without reading the stream
        self.channels, self.image_size, self.shape = channels, image_size, tuple(shape)
        self.name, self.split, self.skip_bad_images = name, split, skip_bad_images
        self.skipped_files: tuple[str, ...] = ()
        self.num_skipped = 0

    def __len__(self) -> int:
        return self.length

    def epoch(self, seed: int) -> Iterator[dict[str, Any]]:
        """The raw examples of one pass, shuffled by `seed` (a 32-bit value)."""
        shuffled = self.stream.shuffle(seed=seed, buffer_size=SHUFFLE_BUFFER)
        # `.iter` rather than `iter()`: inside a DataLoader worker, `datasets` would otherwise read only
        # that worker's shards, and every worker must see the whole order (`ddpm.train.feed`).
        for batch in shuffled.iter(batch_size=64):
            columns = list(batch)
            yield from (dict(zip(columns, row, strict=True)) for row in zip(*batch.values(), strict=True))

    def decode(self, example: dict[str, Any], position: int) -> tuple[np.ndarray, int | None]:
        """uint8 `[C, H, W]` pixels and the label of one raw example (`position` names it in errors)."""
        pixels = _to_image(example[self.image_column], channels=self.channels, image_size=self.image_size,
                           shape=self.shape, where=f"stream position {position} of {self.name}")
        return pixels, None if self.label_column is None else int(example[self.label_column])

    def get_batch(self, indices: Any) -> Any:
        raise DataError(f"{self.name} is streamed: it has no random access (train on it, or evaluate on a table)")

    def __repr__(self) -> str:
        return f"HFStream(name={self.name!r}, split={self.split!r}, len={len(self)}, shape={self.shape})"


def _stream_length(stream: Any, split: str, *, spec: str) -> int:
    length = getattr(stream, "_ddpm_length", None)
    splits = getattr(stream.info, "splits", None) or {}
    if length is None and split in splits and splits[split].num_examples:
        length = int(splits[split].num_examples)
    if not length:
        raise DataError(f"hf:{spec}: streaming needs the number of examples, which the data set's metadata "
                        "does not give; download it and read it as a table instead")
    return length


def load_hf_stream(spec: str, *, split: Split, options: ImageOptions, cache_dir: Path | None = None) -> HFStream:
    """One split of `hf:spec` in streaming mode; "test" must be a split of the data set (no hold-out of a stream)."""
    source, named_split = parse_spec(spec)
    obj = open_source(source, cache_dir=cache_dir, streaming=True)
    name = (named_split or "train") if split == "train" else "test"
    if split == "test" and named_split is not None:
        raise DataError(f"hf:{spec} is streamed with one named split; a stream cannot be split into train and test")
    stream = pick_split(obj, name, source=source)
    image_column, label_column, class_names = image_and_label_columns(stream, source=source)
    first = next(iter(stream))[image_column]
    channels = options.channels if options.channels is not None else images.infer_channels(first)
    size = options.image_size
    shape = (channels, size, size) if size is not None else (channels, first.height, first.width)
    return HFStream(stream, length=_stream_length(stream, name, spec=spec), image_column=image_column,
                    label_column=label_column, class_names=class_names, channels=channels, image_size=size,
                    shape=shape, name=f"hf:{spec}", split=split, skip_bad_images=options.skip_bad_images)


def load_hf_dataset(spec: str, *, split: Split, holdout_fraction: float | None, options: ImageOptions,
                    cache_dir: Path | None = None) -> ArrayDataset | HFImages:
    """One split of `hf:spec` (without the prefix) as an on-demand or in-memory image data set."""
    source, named_split = parse_spec(spec)
    obj = open_source(source, cache_dir=cache_dir)
    fraction = FILE_HOLDOUT_FRACTION if holdout_fraction is None else holdout_fraction
    datasets = _import_datasets()
    own_test = named_split is None and isinstance(obj, datasets.DatasetDict) and "test" in obj
    if own_test:
        table = pick_split(obj, split, source=source)
        rows = np.arange(len(table))
    else:
        table = pick_split(obj, named_split or "train", source=source)
        rows = split_indices(len(table), fraction, split)
    if len(rows) == 0:
        raise DataError(f"hf:{spec} ({split}) holds no examples")
    image_column, label_column, class_names = image_and_label_columns(table, source=source)
    first = table[int(rows[0])][image_column]
    channels = options.channels if options.channels is not None else images.infer_channels(first)
    size = options.image_size
    shape = (channels, size, size) if size is not None else (channels, first.height, first.width)
    ds = HFImages(table, rows, image_column=image_column, label_column=label_column, class_names=class_names,
                  channels=channels, image_size=size, shape=shape, name=f"hf:{spec}", split=split,
                  skip_bad_images=options.skip_bad_images)
    return ds.to_memory() if options.choose_loader(len(ds), shape) == "memory" else ds
