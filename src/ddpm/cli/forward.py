"""``ddpm forward``: the forward chain of the seed notes, one image dissolving into static (for any process)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ddpm.cli.common import HelpFormatter, add_process_flags, int_list, positive_int, say


def register(sub: Any) -> None:
    p = sub.add_parser("forward", help="the forward chain of one image as a strip", formatter_class=HelpFormatter)
    p.add_argument("image", type=Path, help="an image file")
    p.add_argument("--out", type=Path, default=Path("forward.png"), help="output PNG")
    p.add_argument("--t", type=int_list, default=None,
                   help="0-based timesteps, e.g. 0,50,250,999 (default: 0 and 2%%, 5%%, ..., 100%% of T)")
    add_process_flags(p)
    p.add_argument("--image-size", type=positive_int, default=None, help="resize and centre-crop")
    p.add_argument("--channels", type=positive_int, default=3, help="1 (grey) or 3 (RGB)")
    p.add_argument("--seed", type=int, default=0, help="noise seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ddpm import viz
    from ddpm.config import RunConfig, apply_overrides
    from ddpm.data.images import load_image
    from ddpm.errors import UserError
    from ddpm.outputs import prepare_output_folder
    from ddpm.processes import GaussianDiffusion, build_process

    if not args.image.is_file():
        raise UserError(f"image {str(args.image)!r} does not exist")
    flags = {k: v for k, v in vars(args).items() if k.startswith("diffusion.") and v is not None}
    process = build_process(apply_overrides(RunConfig(), flags).diffusion)
    T = process.num_timesteps
    ts = args.t or sorted({0, *[round(f * (T - 1)) for f in (0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)]})
    if max(ts) >= T or min(ts) < 0:
        raise UserError(f"--t values must lie in 0..{T - 1}, got {ts}")
    prepare_output_folder(args.out.parent, flag="--out")
    array = load_image(args.image, channels=args.channels, image_size=args.image_size)
    x0 = torch.tensor(array, dtype=torch.float32).div(127.5).sub(1).unsqueeze(0)
    frames = viz.forward_chain(process, x0, ts, seed=args.seed)
    viz.save_strip(frames, args.out, labels=["x_0"] + [f"t={t + 1}" for t in ts])
    say(f"wrote {args.out}")
    if isinstance(process, GaussianDiffusion):
        abar = process.schedule.alphas_cumprod
        for t in ts:
            signal, noise = abar[t].sqrt(), (1 - abar[t]).sqrt()
            say(f"  t={t + 1:5d}  signal sqrt(abar)={signal:.4f}  noise sqrt(1-abar)={noise:.4f}")
    return 0
