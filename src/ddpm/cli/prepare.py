"""``ddpm prepare``: decode an image folder once into a memory-mapped cache (:func:`ddpm.data.prepare_cache`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ddpm.cli.common import HelpFormatter, positive_int, say


def register(sub: Any) -> None:
    p = sub.add_parser("prepare", help="decode an image folder once into a prepared cache that training maps",
                       formatter_class=HelpFormatter,
                       description="Resize and convert every image of FOLDER once into a memory-mapped uint8 array "
                                   "with a manifest. Training streams from it (--data FOLDER finds it, or --data "
                                   "OUT names it); a changed folder is re-cached, a truncated cache rebuilt.")
    p.add_argument("folder", type=Path, help="the image folder (read recursively; one sub-folder per class: labelled)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="resize and centre-crop to this square size (default: the images' own size)")
    p.add_argument("--channels", type=int, choices=(1, 3, 4), default=None,
                   help="1, 3 or 4 channels (default: from the first image, grey 1 else 3)")
    p.add_argument("--workers", type=positive_int, default=None, help="decoding processes (default: the CPU count)")
    p.add_argument("--out", type=Path, default=None,
                   help="the cache folder to write (default: under --prepared-dir, where training over FOLDER "
                        "finds it)")
    p.add_argument("--prepared-dir", type=Path, default=None,
                   help="where default-located caches live (default: $DDPM_CACHE/prepared)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ddpm.data import prepare_cache
    from ddpm.data.cache import read_manifest
    from ddpm.errors import DataError

    if not args.folder.is_dir():
        raise DataError(f"image folder {str(args.folder)!r} does not exist")
    path = prepare_cache(args.folder, image_size=args.image_size, channels=args.channels, out=args.out,
                         prepared_dir=args.prepared_dir, workers=args.workers, progress=True)
    manifest = read_manifest(path)
    classes = f", {len(manifest.class_names)} classes" if manifest.class_names else ""
    say(f"prepared {path}: {manifest.count - len(manifest.bad)} images of {manifest.channels}x{manifest.height}x"
        f"{manifest.width}{classes}")
    if manifest.bad:
        names = ", ".join(manifest.files[row] for row, _ in manifest.bad[:5])
        say(f"  {len(manifest.bad)} undecodable files (training stops on them unless --skip-bad-images): {names}"
            + (" ..." if len(manifest.bad) > 5 else ""))
    say(f"train from it with: ddpm train --data {path}")
    return 0
