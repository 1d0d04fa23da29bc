"""``ddpm inpaint``: fill masked pixels of images with a trained model (RePaint)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ddpm.cli.common import (
    HelpFormatter,
    add_checkpoint_flags,
    add_class_flags,
    add_images_flag,
    add_output_flags,
    default_out,
    edit_record,
    finite_float,
    positive_int,
    read_inputs,
    save_edits,
    say,
)

PRODUCES = ["samples.npz", "grid.png", "inpaint_info.json"]


def register(sub: Any) -> None:
    from ddpm.editing import MASK_NAMES, REPAINT_SAMPLERS
    from ddpm.pipeline import INPAINT_JUMP, INPAINT_RESAMPLE, INPAINT_STEPS

    p = sub.add_parser("inpaint", help="fill the masked pixels of images (RePaint)", formatter_class=HelpFormatter)
    add_checkpoint_flags(p)
    add_images_flag(p)
    p.add_argument("--mask", required=True, metavar="PNG|box:x0,y0,x1,y1|" + "|".join(MASK_NAMES),
                   help="the pixels to fill: a PNG of the images' size (white = keep, black = fill), a box "
                        "(columns x0..x1-1, rows y0..y1-1), half (the bottom half), center (the central box of "
                        "half the side) or lines (every other row)")
    p.add_argument("--sampler", choices=REPAINT_SAMPLERS, default="ancestral", help="the model's step down the chain")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"points of the respaced chain (default: {INPAINT_STEPS}, at most T)")
    p.add_argument("--resample", type=positive_int, default=INPAINT_RESAMPLE, metavar="U",
                   help="passes through each jump point (RePaint's U; 1: no resampling)")
    p.add_argument("--jump", type=positive_int, default=INPAINT_JUMP, metavar="J",
                   help="levels gone back up at once (RePaint's j)")
    p.add_argument("--eta", type=finite_float, default=None, help="noise scale of --sampler ddim (default 0)")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per network call")
    add_class_flags(p)
    add_output_flags(p, "inpainted")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ddpm
    from ddpm.editing import parse_mask, repaint_evaluations
    from ddpm.errors import UserError
    from ddpm.outputs import prepare_output_folder
    from ddpm.pipeline import INPAINT_STEPS

    options = {} if args.eta is None else {"eta": args.eta}
    if options and args.sampler != "ddim":
        raise UserError("--eta applies to --sampler ddim")
    pipe = ddpm.load(args.checkpoint, weights=args.weights, checkpoint=args.which, device=args.device)
    images, names = read_inputs(args.images, pipe)
    keep = parse_mask(args.mask, *pipe.data_shape[1:])
    out = args.out or default_out(pipe.source, "inpainted")
    prepare_output_folder(out, produces=PRODUCES, force=args.force)
    steps = pipe.resolve_steps(args.steps, INPAINT_STEPS)
    t0 = time.perf_counter()
    result = pipe.inpaint(images, keep, steps=steps, resample=args.resample, jump=args.jump,
                          sampler=args.sampler, seed=args.seed, batch_size=args.batch_size,
                          classes=args.class_label, guidance=args.guidance,
                          clip_denoised=False if args.no_clip else None, progress=True, **options)
    seconds = time.perf_counter() - t0
    mask_image = keep.float().mul(2).sub(1).expand_as(images)  # white = keep, black = fill
    save_edits(out, result, [images, mask_image, result], info_name="inpaint_info.json", record={
        **edit_record(args, pipe, names, seconds), "mask": args.mask,
        "kept_fraction": round(float(keep.float().mean()), 4), "sampler": args.sampler, "steps": steps,
        "resample": args.resample, "jump": args.jump, "options": options,
        "network_evaluations": repaint_evaluations(steps, args.resample, args.jump),
    })
    say(f"{len(names)} images inpainted in {seconds:.1f}s")
    return 0
