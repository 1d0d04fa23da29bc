"""Prepared image caches: a folder's images decoded, resized and written once to one uint8 array.

A prepared cache is a folder holding

    manifest.json  what was prepared from what: format and version, the source folder, its image
                   files (relative paths, sizes, modification times), image size, channels,
                   labels and class names (folders laid out by class), the undecodable files
    images.u8      raw uint8 `[N, C, H, W]` in C order; row i is file i of the manifest (zeros for
                   an undecodable file)

Later runs map `images.u8` (`MappedImages`) and start without decoding anything. A cache is built
under a temporary name and renamed into place with its manifest written last, so a cache that
exists was finished; every open still checks the data file's size, so a cache truncated later (a
full disk, a partial copy) is refused, and rebuilt when its source folder is at hand, never
trained on. A cache is stale, and rebuilt, when the folder's file list, sizes or modification
times differ from the manifest. Builds take a file lock, so processes started together (torchrun)
build once and the others wait, then read.

`prepare_cache(folder, image_size=S)` builds one explicitly, in parallel worker processes (the
`ddpm prepare` command); `find_cache` is what `load_dataset` consults.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.choices import Split
from ddpm.data import images
from ddpm.data.arrays import ArrayDataset, ImageBatch
from ddpm.data.lazy import LazyImages
from ddpm.errors import DataError

logger = logging.getLogger(__name__)

FORMAT = "ddpm-prepared-images"
VERSION = 1
MANIFEST_NAME = "manifest.json"
DATA_NAME = "images.u8"
CHUNK = 256  # files per task of a parallel build


class CacheError(DataError):
    """A prepared cache that is missing, of another format, or incomplete; the message names it."""


@dataclass(frozen=True)
class FolderScan:
    """The image files of a folder as a cache sees them: sorted relative paths, sizes, mtimes."""

    folder: Path
    files: tuple[str, ...]  # POSIX paths relative to `folder`, sorted (as `images.find_images`)
    sizes: tuple[int, ...]  # bytes
    mtimes_ns: tuple[int, ...]

    @property
    def paths(self) -> list[Path]:
        return [self.folder / f for f in self.files]


def scan_folder(folder: Path) -> FolderScan:
    """List and stat the image files of `folder` (see `images.find_images`)."""
    files = images.find_images(folder)
    stats = [p.stat() for p in files]
    return FolderScan(
        folder=folder,
        files=tuple(p.relative_to(folder).as_posix() for p in files),
        sizes=tuple(s.st_size for s in stats),
        mtimes_ns=tuple(s.st_mtime_ns for s in stats),
    )


@dataclass(frozen=True)
class Manifest:
    """The contents of `manifest.json` (see the module docstring)."""

    source: str  # the absolute folder the images were read from
    files: tuple[str, ...]
    sizes: tuple[int, ...]
    mtimes_ns: tuple[int, ...]
    image_size: int | None  # the requested size; None = native
    channels: int
    height: int
    width: int
    labels: tuple[int, ...] | None
    class_names: tuple[str, ...] | None
    bad: tuple[tuple[int, str], ...]  # (row, error message) of each undecodable file
    format: str = FORMAT
    version: int = VERSION

    @property
    def count(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.count, self.channels, self.height, self.width)

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.shape))

    def matches(self, scan: FolderScan) -> bool:
        """True when the folder still holds exactly the files this cache was built from."""
        return (self.files, self.sizes, self.mtimes_ns) == (scan.files, scan.sizes, scan.mtimes_ns)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str, *, source: str) -> Manifest:
        try:
            raw: dict[str, Any] = json.loads(text)
            if raw.get("format") != FORMAT or raw.get("version") != VERSION:
                raise CacheError(
                    f"{source}: not a prepared cache of format {FORMAT!r} version {VERSION} "
                    f"(found {raw.get('format')!r} version {raw.get('version')!r})"
                )
            tuples = ("files", "sizes", "mtimes_ns", "labels", "class_names")
            for key in tuples:
                if raw[key] is not None:
                    raw[key] = tuple(raw[key])
            raw["bad"] = tuple((int(i), str(m)) for i, m in raw["bad"])
            return cls(**raw)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CacheError):
                raise
            raise CacheError(f"{source}: unreadable manifest ({exc})") from exc


def read_manifest(cache: Path) -> Manifest:
    """The manifest of the prepared cache folder `cache`, after checking its data file is complete."""
    manifest_path, data_path = cache / MANIFEST_NAME, cache / DATA_NAME
    if not manifest_path.is_file():
        raise CacheError(f"{cache} is not a prepared cache: {MANIFEST_NAME} is missing")
    manifest = Manifest.from_json(manifest_path.read_text(encoding="utf-8"), source=str(manifest_path))
    size = data_path.stat().st_size if data_path.is_file() else -1
    if size != manifest.data_bytes:
        raise CacheError(
            f"prepared cache {cache} is incomplete: {data_path.name} has {max(size, 0)} bytes, the manifest "
            f"says {manifest.shape} = {manifest.data_bytes} bytes; prepare it again"
        )
    return manifest


def is_prepared_cache(path: Path) -> bool:
    """True when `path` is a folder with a prepared-cache manifest (complete or not)."""
    return (path / MANIFEST_NAME).is_file()


def cache_location(folder: Path, *, image_size: int | None, channels: int, prepared_dir: Path) -> Path:
    """Where the cache of (folder, image size, channels) lives under `prepared_dir`."""
    folder = folder.resolve()
    key = hashlib.sha256(f"{folder}\0{image_size}\0{channels}".encode()).hexdigest()[:12]
    size = "native" if image_size is None else f"{image_size}px"
    return prepared_dir / f"{folder.name or 'root'}-{size}-{channels}ch-{key}"


def find_cache(
    scan: FolderScan, *, image_size: int | None, channels: int, prepared_dir: Path
) -> tuple[Path, Manifest] | None:
    """The up-to-date, complete cache of this folder, or None (missing, stale or truncated)."""
    cache = cache_location(scan.folder, image_size=image_size, channels=channels, prepared_dir=prepared_dir)
    if not is_prepared_cache(cache):
        return None
    try:
        manifest = read_manifest(cache)
    except (CacheError, OSError) as exc:
        logger.warning("ignoring prepared cache %s: %s", cache, exc)
        return None
    if not manifest.matches(scan):
        logger.info("prepared cache %s is stale: the files under %s changed", cache, scan.folder)
        return None
    return cache, manifest


def default_workers() -> int:
    """Worker processes for decoding: the CPUs this process may use, at most 8, at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


def prepare_cache(
    folder: str | Path,
    *,
    image_size: int | None,
    channels: int | None = None,
    out: str | Path | None = None,
    prepared_dir: str | Path | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Decode, convert and resize every image of `folder` once into a prepared cache; returns its folder.

    Args:
        folder: the image folder (read recursively, see `ddpm.data.images`).
        image_size: resize + centre-crop to this square size; None keeps the native size (all
            images must then share it).
        channels: 1, 3 or 4; None infers it from the first decodable image (grey -> 1, else 3).
        out: the cache folder to write; None = the default location under `prepared_dir`, where
            `load_dataset(folder, ...)` finds it.
        prepared_dir: where default-located caches live; None = `$DDPM_CACHE/prepared`
            (`~/.cache/ddpm/prepared`).
        workers: decoding processes (None = `default_workers()`; 1 decodes in this process).
        progress: show a progress bar.

    An up-to-date complete cache is reused as it is. Undecodable files are recorded in the manifest,
    not fatal here: a run decides (error, or skip with `skip_bad_images`).
    """
    folder = Path(folder).expanduser()
    scan = scan_folder(folder)
    if not scan.files:
        raise DataError(f"no image files ({', '.join(sorted(images.IMAGE_EXTENSIONS))}) found under {folder}")
    if channels is None:
        channels = images.infer_channels(images.first_decodable(scan.paths, skip_bad_images=True))
    if out is None:
        root = Path(prepared_dir).expanduser() if prepared_dir is not None else default_prepared_dir()
        target = cache_location(folder, image_size=image_size, channels=channels, prepared_dir=root)
    else:
        target = Path(out).expanduser()
    return ensure_cache(scan, target, image_size=image_size, channels=channels, workers=workers, progress=progress)


def default_prepared_dir(cache_dir: Path | None = None) -> Path:
    """`<cache_dir>/prepared`, with `cache_dir` defaulting to `$DDPM_CACHE` or `~/.cache/ddpm`."""
    from ddpm.data.standard import default_cache_dir

    return (cache_dir or default_cache_dir()) / "prepared"


def ensure_cache(
    scan: FolderScan,
    target: Path,
    *,
    image_size: int | None,
    channels: int,
    workers: int | None = None,
    progress: bool = False,
) -> Path:
    """Build the cache of `scan` at `target` unless an up-to-date complete one is there (under a lock)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):
        if is_prepared_cache(target):
            try:
                manifest = read_manifest(target)
                if manifest.matches(scan) and (manifest.image_size, manifest.channels) == (image_size, channels):
                    return target
                logger.warning("prepared cache %s is stale or was made with other settings: rebuilding", target)
            except CacheError as exc:
                logger.warning("%s: rebuilding", exc)
        _build(scan, target, image_size=image_size, channels=channels,
               workers=default_workers() if workers is None else workers, progress=progress)
    return target


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `lock_path` (no-op where `fcntl` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build(scan: FolderScan, target: Path, *, image_size: int | None, channels: int, workers: int,
           progress: bool) -> None:
    paths = scan.paths
    first = images.first_decodable(paths, skip_bad_images=True)
    height, width = (image_size, image_size) if image_size is not None else (first.height, first.width)
    shape = (len(paths), channels, height, width)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    data_path = partial / DATA_NAME
    with open(data_path, "wb") as fh:
        fh.truncate(int(np.prod(shape)))  # sparse zeros; every row is written below
    jobs = [
        _Job(str(data_path), shape, start, tuple(str(p) for p in paths[start : start + CHUNK]), channels, image_size)
        for start in range(0, len(paths), CHUNK)
    ]
    bad: list[tuple[int, str]] = []
    bar = _progress_bar(len(paths), f"prepare {scan.folder.name}") if progress else None
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers))
            results: Iterator[list[tuple[int, str]]] = pool.map(_write_rows, jobs)
        else:
            results = map(_write_rows, jobs)
        for job, found in zip(jobs, results, strict=True):
            bad.extend(found)
            if bar is not None:
                bar.update(len(job.paths))
    if bar is not None:
        bar.close()
    labelled = images.folder_labels(scan.folder, paths)
    manifest = Manifest(
        source=str(scan.folder.resolve()), files=scan.files, sizes=scan.sizes, mtimes_ns=scan.mtimes_ns,
        image_size=image_size, channels=channels, height=height, width=width,
        labels=None if labelled is None else tuple(int(v) for v in labelled[0]),
        class_names=None if labelled is None else labelled[1], bad=tuple(bad),
    )
    (partial / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    stale = target.with_name(f"{target.name}.stale-{os.getpid()}")
    if target.exists():
        os.replace(target, stale)
    os.replace(partial, target)
    shutil.rmtree(stale, ignore_errors=True)
    if bad:
        logger.warning("prepared %s: %d undecodable file(s), first: %s", target, len(bad), bad[0][1])
    logger.info("prepared %d images %s into %s", len(paths), shape[1:], target)


@dataclass(frozen=True)
class _Job:
    data_path: str
    shape: tuple[int, int, int, int]
    start: int
    paths: tuple[str, ...]
    channels: int
    image_size: int | None


def _write_rows(job: _Job) -> list[tuple[int, str]]:
    """Decode the files of one job into their rows of the data file; returns the undecodable ones."""
    array = np.memmap(job.data_path, dtype=np.uint8, mode="r+", shape=job.shape)
    bad: list[tuple[int, str]] = []
    for offset, path in enumerate(job.paths):
        row = job.start + offset
        try:
            pixels = images.load_image(Path(path), channels=job.channels, image_size=job.image_size)
        except images.ImageDecodeError as exc:
            bad.append((row, str(exc)))
            continue
        if pixels.shape != job.shape[1:]:
            raise DataError(
                f"image {path} has shape {pixels.shape[1:]} but the first image has {job.shape[2:]}; "
                "pass image_size to resize and crop all images to one size"
            )
        array[row] = pixels
    array.flush()
    del array
    return bad


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


class MappedImages(LazyImages):
    """Rows of a prepared cache, read from the memory-mapped `images.u8` on demand.

    `rows` are the cache rows this data set shows, in order (a split, without undecodable files).
    Each process (and DataLoader worker) maps the file itself; pages are shared through the
    operating system's page cache, so no process holds the data set in its own memory.
    """

    def __init__(self, cache: Path, manifest: Manifest, rows: np.ndarray, *, name: str, split: Split,
                 skipped_files: tuple[str, ...] = ()) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        labels = None if manifest.labels is None else np.asarray(manifest.labels, dtype=np.int64)[rows]
        super().__init__(name=name, split=split, shape=manifest.shape[1:], labels=labels,
                         class_names=manifest.class_names, skipped_files=skipped_files)
        self.cache, self.rows = cache, rows
        self._full_shape = manifest.shape
        self._array: np.memmap | None = None

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def _mapped(self) -> np.memmap:
        if self._array is None:
            self._array = np.memmap(self.cache / DATA_NAME, dtype=np.uint8, mode="r", shape=self._full_shape)
        return self._array

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_array"] = None  # each process maps the file itself (a memmap would pickle its pixels)
        return state

    def read(self, indices: Sequence[int]) -> ImageBatch:
        index = np.asarray(indices, dtype=np.int64)
        pixels = torch.from_numpy(np.ascontiguousarray(self._mapped()[self.rows[index]]))
        return ImageBatch(pixels, None if self.labels is None else self.labels[torch.from_numpy(index)])

    def to_memory(self) -> ArrayDataset:
        """Read every row into one in-memory `ArrayDataset` (the memory loader on a cache)."""
        return ArrayDataset(
            torch.from_numpy(np.ascontiguousarray(self._mapped()[self.rows])),
            kind="image", name=self.name, split=self.split,
            labels=self.labels, num_classes=self.num_classes, class_names=self.class_names,
            skipped_files=self.skipped_files,
        )
