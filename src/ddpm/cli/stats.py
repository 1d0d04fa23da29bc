"""``ddpm stats``: the feature statistics (mu, sigma) of a data set split, the reference of ``eval --ref-stats``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ddpm.choices import DEVICES, FEATURES, SPLITS
from ddpm.cli.common import HelpFormatter, positive_int, say
from ddpm.eval.features import RESIZES


def register(sub: Any) -> None:
    p = sub.add_parser("stats", help="the feature statistics of a data set split (an .npz reference for FID)",
                       formatter_class=HelpFormatter,
                       description="Compute mu and sigma of the features of every image of DATA's split and write "
                                   "them as an .npz (float64; the format pytorch-fid, clean-fid and EDM read) with a "
                                   "JSON sidecar naming the feature network, its weights' hash, the resize mode, "
                                   "the split and the count. ddpm eval --ref-stats FILE measures against it.")
    p.add_argument("data", help="a built-in data set name, an image folder, a prepared cache or an .npz of images")
    p.add_argument("--split", choices=SPLITS, default="train",
                   help="which split (the papers' CIFAR-10 FID uses the 50,000 training images)")
    p.add_argument("--out", type=Path, required=True, help="the .npz to write (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--features", choices=FEATURES, default="auto",
                   help="feature network: auto (the data set's own, else Inception), classifier, inception")
    p.add_argument("--inception-weights", default=None, help="path of pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--resize", choices=RESIZES, default="tf1",
                   help="how Inception resizes to 299: tf1 as the original FID graph (Ho et al., EDM), pytorch as "
                        "pytorch-fid")
    p.add_argument("--image-size", type=positive_int, default=None, help="resize and centre-crop the images first")
    p.add_argument("--batch-size", type=positive_int, default=250, help="images per feature batch")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to run the feature network")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ddpm.config import RunConfig, apply_overrides
    from ddpm.data import load_dataset
    from ddpm.distributed import resolve_device
    from ddpm.errors import OutputError
    from ddpm.eval.stats import save_stats, sidecar_path
    from ddpm.evaluate import data_stats

    if args.out.suffix != ".npz":
        raise OutputError(f"--out {args.out}: reference statistics are written as .npz")
    if (args.out.exists() or sidecar_path(args.out).exists()) and not args.force:
        raise OutputError(f"{args.out} exists; choose another --out or pass --force to replace it")
    cfg = apply_overrides(RunConfig(), {"data.dataset": args.data, "data.image_size": args.image_size}).data
    shape = tuple(load_dataset(args.data, split=args.split, image_size=args.image_size).shape)
    t0 = time.perf_counter()
    stats = data_stats(cfg, shape, split=args.split, features=args.features, inception_weights=args.inception_weights,
                       resize=args.resize, device=resolve_device(args.device), batch_size=args.batch_size,
                       progress=True)
    save_stats(args.out, stats)
    say(f"wrote {args.out} and {sidecar_path(args.out)}: mu [{stats.dim}] and sigma [{stats.dim}, {stats.dim}] of "
        f"{stats.info['count']:,} {args.split} images of {args.data} ({stats.info['features']['name']}, "
        f"{time.perf_counter() - t0:.0f} s)")
    return 0
