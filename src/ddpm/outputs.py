"""Output folders: checked before the work whose results go there, not after.

A command that computes for minutes and then cannot write its results has lost those minutes;
:func:`check_output_folder` fails first, naming the flag and the path.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ddpm.errors import OutputError


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
