"""Where results go: output folders checked before long work, never overwritten silently.

A command that computes for minutes and then cannot write its results has lost those minutes, so
every command checks its output folder first (:func:`check_output_folder`: an existing file, no
permission, a read-only file system fail at once, naming the flag and the path), and an earlier
result is never replaced unless asked (:func:`prepare_output_folder` with ``force``); without an
explicit folder a fresh numbered one is chosen (:func:`fresh_folder`). Files are written to a
temporary name and renamed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch

from ddpm.choices import SAMPLE_FORMATS, SampleFormat, parse_choice_list
from ddpm.errors import OutputError

SAMPLES_LAYOUT = ("samples.npz: images uint8 [N, H, W, C] on the 256-level grid (pixel k stands for k / 127.5 - 1); "
                  "vectors: samples float32 [N, D]")


def fresh_folder(base: Path) -> Path:
    """``base`` if it does not exist or is empty, else the first of ``base-2``, ``base-3``, ... that is."""
    candidate, n = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def check_output_folder(path: str | Path, *, name: str = "--out") -> Path:
    """Make sure ``path`` is a folder this process can create files in, creating it (and its parents).

    Raises :class:`~ddpm.errors.OutputError` naming ``name`` (the flag or config key) and the path
    when it is an existing file, or cannot be created or written (no permission, a read-only or
    full file system). Returns the path.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{name} {str(path)!r} is an existing file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise OutputError(f"{name} {str(path)!r} cannot be written: {exc.strerror or exc}") from None
    return path


def prepare_output_folder(folder: str | Path, *, produces: Sequence[str] = (), force: bool = False,
                          flag: str = "--out") -> Path:
    """:func:`check_output_folder`, and refuse (unless ``force``) a folder already holding one of ``produces``."""
    folder = Path(folder)
    clashes = [name for name in produces if (folder / name).exists()]
    if clashes and not force:
        raise OutputError(f"{flag} {folder} already holds {', '.join(clashes)}; choose another folder or pass "
                          "--force to replace them")
    return check_output_folder(folder, name=flag)


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON, atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def parse_formats(text: str) -> list[SampleFormat]:
    """``"grid,npz"`` -> ``["grid", "npz"]``; an unknown name is an error listing the valid ones."""
    return [cast(SampleFormat, f) for f in parse_choice_list("--format", text, SAMPLE_FORMATS)]  # each one checked


def sample_files(formats: Sequence[str], *, is_image: bool) -> list[str]:
    """The names :func:`save_samples` writes for ``formats`` (to check for clashes first)."""
    if not is_image:
        return ["samples.npz"]
    names = {"npz": "samples.npz", "grid": "grid.png", "png": "png"}
    return [names[f] for f in formats]


def save_samples(x: torch.Tensor, out: Path, formats: Sequence[str], *, is_image: bool,
                 nrow: int | None = None) -> list[Path]:
    """Write samples in the requested formats (vectors: always ``samples.npz``); returns what was written.

    ``nrow``: images per row of the grid (default: a square grid of the first 256).
    """
    import numpy as np

    from ddpm import viz

    written = []
    out.mkdir(parents=True, exist_ok=True)
    if not is_image:
        path = out / "samples.npz"
        np.savez_compressed(path, samples=x.numpy())
        return [path]
    images = viz.to_uint8(x)  # [N, C, H, W] uint8 on the 256-level grid
    if "npz" in formats:
        path = out / "samples.npz"
        np.savez_compressed(path, images=images.permute(0, 2, 3, 1).numpy())  # NHWC uint8
        written.append(path)
    if "grid" in formats:
        written.append(viz.save_grid(x if nrow else x[:256], out / "grid.png", nrow=nrow))
    if "png" in formats:
        from PIL import Image

        folder = out / "png"
        folder.mkdir(exist_ok=True)
        for i, img in enumerate(images):
            arr = img.permute(1, 2, 0).numpy()
            Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(folder / f"{i:05d}.png")
        written.append(folder)
    return written
