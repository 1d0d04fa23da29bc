"""Inpainting masks: which pixels of an image are known (kept) and which the model fills.

A mask is a bool tensor ``[H, W]`` (or ``[N, 1, H, W]``, one per image), True where the input is
kept. It comes from a spec string (:func:`parse_mask`):

===================  ===============================================================================
spec                 the pixels filled (everything else is kept)
===================  ===============================================================================
``half``             the bottom half: rows H // 2 .. H - 1
``center``           the central box of half the side: rows and columns S // 4 .. S // 4 + S // 2 - 1
``lines``            every other row, starting with row 1 (rows 0, 2, 4, ... are kept)
``box:x0,y0,x1,y1``  the box of columns x0 .. x1 - 1 and rows y0 .. y1 - 1 (pixel coordinates)
a PNG file           its black pixels (white = keep, black = fill; nothing else allowed)
===================  ===============================================================================
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ddpm.errors import UserError

MASK_NAMES = ("half", "center", "lines")


def named_mask(name: str, height: int, width: int) -> torch.Tensor:
    """The named mask (see the module docstring) of an ``height`` x ``width`` image, bool ``[H, W]`` (True = keep)."""
    keep = torch.ones(height, width, dtype=torch.bool)
    if name == "half":
        keep[height // 2 :] = False
    elif name == "center":
        top, left = height // 4, width // 4
        keep[top : top + height // 2, left : left + width // 2] = False
    elif name == "lines":
        keep[1::2] = False
    else:
        raise UserError(f"unknown mask {name!r}; valid: {', '.join(MASK_NAMES)}, box:x0,y0,x1,y1 or a PNG file")
    return keep


def box_mask(spec: str, height: int, width: int) -> torch.Tensor:
    """``box:x0,y0,x1,y1``: fill columns x0..x1-1 of rows y0..y1-1; bool ``[H, W]`` (True = keep)."""
    try:
        x0, y0, x1, y1 = (int(v) for v in spec.removeprefix("box:").split(","))
    except ValueError:
        raise UserError(f"mask {spec!r}: expected box:x0,y0,x1,y1 with four integers") from None
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise UserError(f"mask {spec!r}: the box must satisfy 0 <= x0 < x1 <= {width} and 0 <= y0 < y1 <= {height} "
                        f"for {width}x{height} images")
    keep = torch.ones(height, width, dtype=torch.bool)
    keep[y0:y1, x0:x1] = False
    return keep


def read_mask_file(path: Path, height: int, width: int) -> torch.Tensor:
    """A mask PNG (white = keep, black = fill, nothing else), bool ``[H, W]`` (True = keep)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            values = np.asarray(img.convert("L"))
    except (OSError, ValueError, UnidentifiedImageError) as exc:
        raise UserError(f"cannot read mask file {path}: {exc}") from None
    if values.shape != (height, width):
        raise UserError(f"mask {path} is {values.shape[1]}x{values.shape[0]} pixels, the images are {width}x{height}")
    other = sorted(set(np.unique(values).tolist()) - {0, 255})
    if other:
        raise UserError(f"mask {path} is not binary: besides black (0) and white (255) it holds grey levels "
                        f"{other[:5]}{' ...' if len(other) > 5 else ''}")
    return torch.from_numpy(values == 255)


def parse_mask(spec: str, height: int, width: int) -> torch.Tensor:
    """The mask a spec names (a name, ``box:...`` or a PNG path; see the module docstring), bool ``[H, W]``."""
    if spec.startswith("box:"):
        return box_mask(spec, height, width)
    if spec in MASK_NAMES:
        return named_mask(spec, height, width)
    path = Path(spec)
    if not path.exists():
        raise UserError(f"mask {spec!r} is neither a mask name ({', '.join(MASK_NAMES)}), box:x0,y0,x1,y1, "
                        "nor an existing file")
    return read_mask_file(path, height, width)


def check_mask(keep: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``keep`` as bool ``[N or 1, 1 or C, H, W]`` for ``images`` ``[N, C, H, W]``; a clear error if it does not fit.

    Accepts ``[H, W]``, ``[1 or C, H, W]`` or ``[1 or N, 1 or C, H, W]``; a float mask must hold only 0 and 1.
    """
    if keep.dtype != torch.bool:
        if not bool(((keep == 0) | (keep == 1)).all()):
            raise UserError("the mask must be binary (1 = keep, 0 = fill); it holds other values")
        keep = keep != 0
    while keep.ndim < 4:
        keep = keep.unsqueeze(0)
    n, c, h, w = images.shape
    if keep.ndim != 4 or keep.shape[2:] != (h, w) or keep.shape[0] not in (1, n) or keep.shape[1] not in (1, c):
        raise UserError(f"a mask of shape {list(keep.shape)} does not fit images of shape {list(images.shape)}")
    return keep.to(images.device)
