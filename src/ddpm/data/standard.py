"""MNIST, Fashion-MNIST and CIFAR-10: download, verify, parse.

Files are downloaded once with `urllib` into the cache folder (`$DDPM_CACHE`, else
`~/.cache/ddpm`), under `<cache>/<dataset>/<file name>`, streamed to a temporary file in the
same folder, checked against the published SHA-256 and only then renamed into place, so a
cache never holds a partial or unverified file. Without network, place the files there by hand;
they are verified on every load.

Formats (parsed here without any pickle):
* IDX (MNIST, Fashion-MNIST), optionally gzip'ed: a big-endian header with magic number
  `0x00000803` (2051) for uint8 images `[N, rows, cols]` or `0x00000801` (2049) for uint8 labels `[N]`.
* CIFAR-10 binary version: `cifar-10-batches-bin/data_batch_{1..5}.bin` (train, 50,000) and
  `test_batch.bin` (test, 10,000) inside `cifar-10-binary.tar.gz`; each record is 1 label byte
  and 3072 pixel bytes (1024 red, 1024 green, 1024 blue, row-major 32x32).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import struct
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ddpm.data.records import DIGITS, DatasetRecord, register_dataset
from ddpm.errors import DataError

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
CIFAR10_RECORD_BYTES = 1 + 3 * 32 * 32
_CHUNK = 1 << 20


class ChecksumError(DataError):
    """A downloaded or cached file does not have the published SHA-256."""


class DownloadError(DataError, OSError):
    """No URL of a file could be fetched; the message says where to place the file by hand."""


@dataclass(frozen=True)
class RemoteFile:
    """One published file: its name in the cache, its SHA-256 and the URLs to try in order."""

    filename: str
    sha256: str
    urls: tuple[str, ...]


def _mirrors(filename: str, bases: tuple[str, ...], sha256: str) -> RemoteFile:
    return RemoteFile(filename, sha256, tuple(base + filename for base in bases))


_MNIST_BASES = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_FASHION_BASES = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)

# SHA-256 of the published files; each value agrees across several independent projects that pin it.
IDX_FILES: dict[str, dict[str, RemoteFile]] = {
    "mnist": {
        "train-images": _mirrors(
            "train-images-idx3-ubyte.gz",
            _MNIST_BASES,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        "train-labels": _mirrors(
            "train-labels-idx1-ubyte.gz",
            _MNIST_BASES,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        "test-images": _mirrors(
            "t10k-images-idx3-ubyte.gz",
            _MNIST_BASES,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        "test-labels": _mirrors(
            "t10k-labels-idx1-ubyte.gz",
            _MNIST_BASES,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    },
    "fashion-mnist": {
        "train-images": _mirrors(
            "train-images-idx3-ubyte.gz",
            _FASHION_BASES,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        ),
        "train-labels": _mirrors(
            "train-labels-idx1-ubyte.gz",
            _FASHION_BASES,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        ),
        "test-images": _mirrors(
            "t10k-images-idx3-ubyte.gz",
            _FASHION_BASES,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        ),
        "test-labels": _mirrors(
            "t10k-labels-idx1-ubyte.gz",
            _FASHION_BASES,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        ),
    },
}
CIFAR10_FILE = RemoteFile(
    "cifar-10-binary.tar.gz",
    "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
    ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
)


def default_cache_dir() -> Path:
    """`$DDPM_CACHE` when set, else `~/.cache/ddpm`."""
    env = os.environ.get("DDPM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ddpm"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(remote: RemoteFile, folder: Path, *, timeout: float = 60.0) -> Path:
    """Return `folder / remote.filename`, downloading and verifying it first if it is missing.

    A file already there is verified too; a mismatch raises `ChecksumError` (delete the file to
    download it again). Each URL is tried in turn; a download whose SHA-256 differs raises
    `ChecksumError` at once and leaves nothing behind. When no URL answers, `DownloadError`
    names the URLs and the path where the file can be placed by hand.
    """
    target = folder / remote.filename
    if target.exists():
        actual = sha256_of(target)
        if actual != remote.sha256:
            raise ChecksumError(
                f"{target} has SHA-256 {actual}, expected {remote.sha256}; "
                "delete it to download it again, or replace it with the published file"
            )
        return target
    folder.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    for url in remote.urls:
        try:
            _download_verified(url, target, remote.sha256, timeout=timeout)
            return target
        except (OSError, http.client.HTTPException) as exc:  # URLError and timeouts are OSErrors
            failures.append(f"  {url}: {exc}")
    raise DownloadError(
        f"could not download {remote.filename}:\n" + "\n".join(failures) + "\n"
        f"If this machine is offline, download it elsewhere and place it at {target} "
        f"(expected SHA-256 {remote.sha256})."
    )


def _download_verified(url: str, target: Path, sha256: str, *, timeout: float) -> None:
    """Stream `url` to a temporary file beside `target`, check the hash, then rename atomically."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ChecksumError(
                f"download of {url} has SHA-256 {digest.hexdigest()}, expected {sha256}; "
                f"nothing was written to {target}"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def _read_maybe_gzip(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        return f.read()


def read_idx_images(path: Path) -> np.ndarray:
    """Read an IDX image file (gzip'ed or not) to uint8 `[N, rows, cols]`."""
    raw = _read_maybe_gzip(Path(path))
    if len(raw) < 16:
        raise DataError(f"{path}: too short for an IDX image header ({len(raw)} bytes)")
    magic, n, rows, cols = struct.unpack(">iiii", raw[:16])
    if magic != IDX_IMAGES_MAGIC:
        raise DataError(f"{path}: IDX image magic number is {magic}, expected {IDX_IMAGES_MAGIC}")
    if len(raw) - 16 != n * rows * cols:
        raise DataError(f"{path}: header says {n}x{rows}x{cols} pixels but {len(raw) - 16} bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols).copy()


def read_idx_labels(path: Path) -> np.ndarray:
    """Read an IDX label file (gzip'ed or not) to int64 `[N]`."""
    raw = _read_maybe_gzip(Path(path))
    if len(raw) < 8:
        raise DataError(f"{path}: too short for an IDX label header ({len(raw)} bytes)")
    magic, n = struct.unpack(">ii", raw[:8])
    if magic != IDX_LABELS_MAGIC:
        raise DataError(f"{path}: IDX label magic number is {magic}, expected {IDX_LABELS_MAGIC}")
    if len(raw) - 8 != n:
        raise DataError(f"{path}: header says {n} labels but {len(raw) - 8} bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)


def cifar10_batch_names(split: Literal["train", "test"]) -> tuple[str, ...]:
    if split == "train":
        return tuple(f"data_batch_{i}.bin" for i in range(1, 6))
    return ("test_batch.bin",)


def parse_cifar10_records(raw: bytes, *, source: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 binary records -> (uint8 images `[N, 3, 32, 32]`, int64 labels `[N]`)."""
    if len(raw) % CIFAR10_RECORD_BYTES:
        raise DataError(f"{source}: {len(raw)} bytes is not a multiple of the {CIFAR10_RECORD_BYTES}-byte record")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR10_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.size and labels.max() > 9:
        raise DataError(f"{source}: label {labels.max()} out of range 0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32).copy(), labels


def read_cifar10_binary(path: Path, split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
    """Read one split from `cifar-10-binary.tar.gz` without extracting it to disk.

    Members are matched by base name (`data_batch_1.bin` ... `data_batch_5.bin`, `test_batch.bin`)
    and concatenated in that order. Returns (uint8 images `[N, 3, 32, 32]`, int64 labels `[N]`).
    """
    wanted = cifar10_batch_names(split)
    found: dict[str, bytes] = {}
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            base = member.name.rsplit("/", 1)[-1]
            if base in wanted and member.isfile():
                stream = tar.extractfile(member)
                if stream is not None:
                    found[base] = stream.read()
    missing = [name for name in wanted if name not in found]
    if missing:
        raise DataError(f"{path}: missing CIFAR-10 batch file(s) {missing}")
    parts = [parse_cifar10_records(found[name], source=f"{path}:{name}") for name in wanted]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def load_idx_dataset(
    variant: Literal["mnist", "fashion-mnist"],
    split: Literal["train", "test"],
    *,
    cache_dir: Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """MNIST or Fashion-MNIST split -> (uint8 `[N, 1, 28, 28]`, int64 labels `[N]`); 60,000 / 10,000."""
    files = IDX_FILES[variant]
    folder = (cache_dir or default_cache_dir()) / variant
    images = read_idx_images(fetch(files[f"{split}-images"], folder))
    labels = read_idx_labels(fetch(files[f"{split}-labels"], folder))
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{variant} {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images[:, None], labels


def load_cifar10(split: Literal["train", "test"], *, cache_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 split -> (uint8 `[N, 3, 32, 32]`, int64 labels `[N]`); 50,000 train / 10,000 test."""
    folder = (cache_dir or default_cache_dir()) / "cifar10"
    return read_cifar10_binary(fetch(CIFAR10_FILE, folder), split)


# ---------------------------------------------------------------------------------------------
# Records (ddpm.data.records)

OFFICIAL = "the official train and test sets"
register_dataset(DatasetRecord(
    "mnist", "MNIST, 28x28 grey digits (downloaded once)", "image",
    lambda r: load_idx_dataset("mnist", r.split, cache_dir=r.cache_dir), frozenset({"image_size", "channels"}),
    f"{OFFICIAL}: 60,000 / 10,000", class_names=DIGITS, flippable=False, features="classifier"))
register_dataset(DatasetRecord(
    "fashion-mnist", "Fashion-MNIST, 28x28 grey clothing (downloaded once)", "image",
    lambda r: load_idx_dataset("fashion-mnist", r.split, cache_dir=r.cache_dir), frozenset({"image_size", "channels"}),
    f"{OFFICIAL}: 60,000 / 10,000",
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
    flippable=True, features="classifier", aliases=("fmnist", "fashion_mnist", "fashionmnist")))
register_dataset(DatasetRecord(
    "cifar10", "CIFAR-10, 32x32 colour (downloaded once)", "image",
    lambda r: load_cifar10(r.split, cache_dir=r.cache_dir), frozenset({"image_size", "channels"}),
    f"{OFFICIAL}: 50,000 / 10,000",
    class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    flippable=True, features="inception", aliases=("cifar-10", "cifar")))
