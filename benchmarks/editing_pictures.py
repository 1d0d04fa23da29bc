"""The README's editing pictures from a trained digits model: inpainting, SDEdit at three strengths, interpolation.

    PYTHONPATH=src python benchmarks/editing_pictures.py runs/demo/run

writes ``docs/inpainting.png`` (per row: input | mask | 25 plain steps | the default, 8 points with
U = 8, j = 2: 50 evaluations), ``docs/sdedit.png`` (per row: a rough input, blocky 7x7 digits scaled
back up, then SDEdit at strengths 0.25, 0.5, 0.75) and ``docs/interpolation.png`` (two pairs of
held-out digits and the frames between them, through their encodings with the default dpm++2m).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import ddpm
from ddpm import viz
from ddpm.build import build_dataset
from ddpm.editing import parse_mask

DOCS = Path(__file__).resolve().parent.parent / "docs"
STRENGTHS = (0.25, 0.5, 0.75)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder of a digits model")
    p.add_argument("--out", type=Path, default=DOCS, help="folder for the three PNGs")
    args = p.parse_args(argv)
    pipe = ddpm.load(args.checkpoint, device="cpu")
    test = build_dataset(pipe.config.data, "test")
    images = test.get_batch(torch.arange(0, len(test), len(test) // 8)[:8])  # digits of several classes

    rows = []
    for mask_name in ("half", "center"):
        keep = parse_mask(mask_name, *pipe.data_shape[1:])
        plain = pipe.inpaint(images, keep, steps=25, resample=1, seed=0)
        resampled = pipe.inpaint(images, keep, seed=0)  # the default: 8 points, U = 8, j = 2
        mask = keep.float().mul(2).sub(1).expand_as(images)
        rows.append(torch.stack([images, mask, plain, resampled], dim=1).flatten(0, 1))
    viz.save_grid(torch.cat(rows), args.out / "inpainting.png", nrow=4)

    blocks = F.avg_pool2d(images, 4) > -0.4  # 7x7 blocks that are 30% ink or more
    rough = F.interpolate(blocks.float(), scale_factor=4, mode="nearest") * 2 - 1
    edits = [pipe.edit(rough, s, seed=0) for s in STRENGTHS]
    viz.save_grid(torch.stack([rough, *edits], dim=1).flatten(0, 1), args.out / "sdedit.png", nrow=1 + len(STRENGTHS))

    pairs = [(images[0], images[3]), (images[5], images[7])]
    strips = [pipe.interpolate(a, b, frames=9) for a, b in pairs]
    viz.save_strip(torch.stack(strips, dim=1), args.out / "interpolation.png")
    for name in ("inpainting.png", "sdedit.png", "interpolation.png"):
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    raise SystemExit(main())
