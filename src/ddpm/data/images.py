"""Image files: folder scanning, decoding, resize + centre crop, channel conversion, random flips.

A folder is read recursively; files whose extension (any case) is in `IMAGE_EXTENSIONS` are
images, in sorted order of their path relative to the folder. Every image is decoded with
Pillow, converted to the dataset's channel count, resized so its shorter side equals
`image_size` (bicubic; Pillow's resampling filters are antialiased when shrinking) and
centre-cropped to `image_size x image_size`. In memory a folder takes `N * C * S * S` bytes
(100k RGB 64x64 images: 1.2 GB); larger ones are streamed: decoded per batch with `load_image`
(`ddpm.data.stream`) or written once to a memory-mapped cache (`ddpm.data.cache`).

Labels: when every image sits under a first-level sub-folder and there are at least two, the
sorted sub-folder names are the classes (`folder_labels`).

Channel rule: `channels` when given, else inferred from the first image in sorted order:
1 for grey modes (L, LA, I, I;16, F, 1), else 3. Conversion then follows Pillow: colour to grey
uses ITU-R 601 luma (L = 0.299 R + 0.587 G + 0.114 B); alpha is dropped unless channels=4;
palette images are expanded first; 16-bit grey level v becomes round(v * 255 / 65535).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ddpm.errors import DataError

if TYPE_CHECKING:
    from PIL import Image as PILImage

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
GREY_MODES: frozenset[str] = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_MODE_FOR_CHANNELS = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


class ImageDecodeError(DataError):
    """An image file exists but cannot be decoded; the message names the file."""


def find_images(folder: Path) -> list[Path]:
    """All image files under `folder` (recursive, extensions in `IMAGE_EXTENSIONS`, any case), sorted."""
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    found = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def folder_labels(folder: Path, files: Sequence[Path]) -> tuple[np.ndarray, tuple[str, ...]] | None:
    """Class labels from first-level sub-folders, or None when the folder is not laid out by class.

    When every image sits somewhere under a first-level sub-folder and there are at least two of
    them, the sorted sub-folder names are the classes: label i is `class_names[i]`. Images lying
    directly in `folder`, or a single sub-folder (a mere container), mean "unlabelled".
    """
    parts = [p.relative_to(folder).parts for p in files]
    if not parts or any(len(q) < 2 for q in parts):
        return None
    class_names = tuple(sorted({q[0] for q in parts}))
    if len(class_names) < 2:
        return None
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index[q[0]] for q in parts], dtype=np.int64), class_names


def _open(path: Path) -> PILImage.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"cannot decode image file {path}: {exc}") from exc


def infer_channels(img: PILImage.Image) -> int:
    """1 for grey (with or without alpha), 3 for everything else."""
    return 1 if img.mode in GREY_MODES else 3


def to_channels(img: PILImage.Image, channels: int) -> PILImage.Image:
    """Convert to the Pillow mode of `channels` (1: L, 2: LA, 3: RGB, 4: RGBA), see module docstring."""
    if channels not in _MODE_FOR_CHANNELS:
        raise DataError(f"channels must be one of {sorted(_MODE_FOR_CHANNELS)}, got {channels}")
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit grey (the only integer mode of the supported formats: 16-bit PNG): v -> round(v * 255 / 65535)
        # exactly, whatever the image's own range (Pillow's I -> L conversion clips at 255 instead).
        from PIL import Image

        img = Image.fromarray(sixteen_to_eight_bits(np.asarray(img)), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    target = _MODE_FOR_CHANNELS[channels]
    return img if img.mode == target else img.convert(target)


def sixteen_to_eight_bits(values: np.ndarray) -> np.ndarray:
    """16-bit levels 0..65535 to uint8 ``round(v * 255 / 65535)``, exactly (integer arithmetic; 65535 = 255 * 257,
    so ``v * 255 / 65535 = v / 257`` is never halfway between two integers). Values outside 0..65535 are clipped."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide * 255 + 65535 // 2) // 65535).astype(np.uint8)


def resize_center_crop(img: PILImage.Image, image_size: int) -> PILImage.Image:
    """Resize so the shorter side is `image_size` (bicubic, antialiased), then crop the centre square.

    The crop offset is `(long - image_size) // 2`, i.e. the extra column or row of an odd
    difference is taken from the right or bottom edge.
    """
    from PIL import Image

    w, h = img.size
    scale = image_size / min(w, h)
    new_w = image_size if w <= h else max(image_size, round(w * scale))
    new_h = image_size if h <= w else max(image_size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    return img.crop((left, top, left + image_size, top + image_size))


def pil_to_chw(img: PILImage.Image) -> np.ndarray:
    """Pillow image -> uint8 `[C, H, W]`."""
    array = np.asarray(img, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def load_image(path: Path, *, channels: int, image_size: int | None) -> np.ndarray:
    """Decode one file to uint8 `[C, H, W]`: convert channels, then resize + centre crop when sized."""
    img = to_channels(_open(path), channels)
    if image_size is not None:
        img = resize_center_crop(img, image_size)
    return pil_to_chw(img)


def load_image_files(
    paths: Sequence[Path],
    *,
    channels: int,
    image_size: int | None,
    skip_bad_images: bool = False,
    num_threads: int | None = None,
) -> tuple[np.ndarray, list[Path]]:
    """Decode `paths` into one uint8 `[N, C, S, S]` array; returns it and the list of skipped paths.

    With `image_size=None` every image must have the size of the first decodable one. An
    undecodable file raises `ImageDecodeError` naming it, or is skipped (and returned) when
    `skip_bad_images`. Decoding runs on a thread pool: Pillow releases the GIL while decoding.
    """

    def decode(path: Path) -> np.ndarray | ImageDecodeError:
        try:
            return load_image(path, channels=channels, image_size=image_size)
        except ImageDecodeError as exc:
            return exc

    workers = num_threads or min(8, os.cpu_count() or 1)
    kept: list[np.ndarray] = []
    skipped: list[Path] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path, result in zip(paths, pool.map(decode, paths), strict=True):
            if isinstance(result, ImageDecodeError):
                if not skip_bad_images:
                    raise result
                skipped.append(path)
                continue
            if kept and result.shape != kept[0].shape:
                raise DataError(
                    f"image {path} has shape {result.shape[1:]} but {paths[0]} has {kept[0].shape[1:]}; "
                    "pass image_size to resize and crop all images to one size"
                )
            kept.append(result)
    if skipped:
        message = f"skipped {len(skipped)} undecodable image file(s), first: {skipped[0]}"
        logger.warning(message)
        warnings.warn(message, stacklevel=2)
    if not kept:
        raise DataError(f"none of the {len(paths)} image files could be decoded")
    return np.stack(kept), skipped


def first_decodable(paths: Sequence[Path], *, skip_bad_images: bool) -> PILImage.Image:
    """The first image of `paths` that decodes (the first one, unless `skip_bad_images`)."""
    for path in paths:
        try:
            return _open(path)
        except ImageDecodeError:
            if not skip_bad_images:
                raise
    raise DataError(f"none of the {len(paths)} image files could be decoded")


def conform_images(images: np.ndarray, *, image_size: int | None, channels: int | None) -> np.ndarray:
    """Apply the folder rules (channels, resize + centre crop) to uint8 `[N, C, H, W]` in memory.

    Used for arrays and built-in sets when the caller asks for another size or channel count.
    Returns the input unchanged when nothing is asked for.
    """
    from PIL import Image

    n, c, h, w = images.shape
    same_size = image_size is None or (h == w == image_size)
    if (channels is None or channels == c) and same_size:
        return images
    target_c = c if channels is None else channels
    mode = _MODE_FOR_CHANNELS.get(c)
    if mode is None:
        raise DataError(f"cannot convert images with {c} channels; expected 1 to 4")
    out = []
    for image in images:
        hwc = image[0] if c == 1 else image.transpose(1, 2, 0)
        img = to_channels(Image.fromarray(np.ascontiguousarray(hwc), mode=mode), target_c)
        if image_size is not None:
            img = resize_center_crop(img, image_size)
        out.append(pil_to_chw(img))
    return np.stack(out) if out else np.zeros((0, target_c, image_size or h, image_size or w), np.uint8)


def random_hflip(batch: Tensor, generator: torch.Generator, *, p: float = 0.5) -> Tensor:
    """Flip each image of `[B, C, H, W]` left-right with probability `p`, reproducibly.

    Exactly one `torch.rand(B, generator=generator)` is drawn per call (on the generator's
    device), so the flips depend only on the generator state, not on the data.
    """
    if batch.dim() != 4:
        raise ValueError(f"random_hflip expects [B, C, H, W], got {tuple(batch.shape)}")
    flip = torch.rand(batch.shape[0], generator=generator, device=generator.device) < p
    flip = flip.to(batch.device).view(-1, 1, 1, 1)
    return torch.where(flip, batch.flip(-1), batch)


def read_images(sources: Sequence[Path], *, channels: int) -> tuple[np.ndarray, list[str]]:
    """Images to edit, uint8 ``[N, C, H, W]`` with ``channels`` channels, and a name for each.

    ``sources`` are image files, folders (every image under them, sorted as `find_images`) and
    ``.npz`` / ``.npy`` arrays (see :func:`ddpm.data.arrays.read_array_file`), taken in order.
    Every image must have the same size; nothing is resized (a clear error names the first file
    that differs).
    """
    from ddpm.data.arrays import images_to_nchw, read_array_file

    arrays: list[np.ndarray] = []
    names: list[str] = []
    for source in sources:
        if not source.exists():
            raise DataError(f"{source} does not exist")
        if source.suffix.lower() in (".npz", ".npy"):
            batch = conform_images(images_to_nchw(read_array_file(source)[0], source=str(source)),
                                   image_size=None, channels=channels)
            arrays.extend(batch)
            names.extend(f"{source}[{i}]" for i in range(len(batch)))
            continue
        files = find_images(source) if source.is_dir() else [source]
        if source.is_dir() and not files:
            raise DataError(f"{source} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        for path in files:
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(f"{path}: not an image file ({', '.join(sorted(IMAGE_EXTENSIONS))}) or .npz / .npy")
            arrays.append(load_image(path, channels=channels, image_size=None))
            names.append(str(path))
    if not arrays:
        raise DataError("no images given")
    for name, image in zip(names, arrays, strict=True):
        if image.shape != arrays[0].shape:
            raise DataError(f"{name} is {image.shape[2]}x{image.shape[1]} pixels but {names[0]} is "
                            f"{arrays[0].shape[2]}x{arrays[0].shape[1]}; all images must have one size")
    return np.stack(arrays), names
