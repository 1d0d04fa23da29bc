"""``ddpm export``: a trained run as a diffusers pipeline folder (``DDPMPipeline.from_pretrained`` loads it)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ddpm.choices import WEIGHTS
from ddpm.cli.common import HelpFormatter, say


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="write a run as a diffusers pipeline folder", formatter_class=HelpFormatter)
    p.add_argument("checkpoint", help="a run folder (its newest complete checkpoint) or a checkpoint folder")
    p.add_argument("out", type=Path, help="the pipeline folder to write (must not exist or be empty)")
    p.add_argument("--weights", choices=WEIGHTS, default="ema", help="which weights to export")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ddpm

    pipe = ddpm.load(args.checkpoint, weights=args.weights, device="cpu")
    folder = pipe.save_pretrained(args.out, overwrite=args.force)
    say(f"wrote {folder} ({args.weights} weights of {pipe.source}); load it with "
        f"diffusers.DDPMPipeline.from_pretrained({str(folder)!r}) or ddpm.load({str(folder)!r})")
    return 0
