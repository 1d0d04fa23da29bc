"""``ddpm edit``: SDEdit, an image noised part way and sampled back to a realistic one."""

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
    add_sampler_flags,
    default_out,
    edit_record,
    finite_float,
    read_inputs,
    sampler_options,
    save_edits,
    say,
)

PRODUCES = ["samples.npz", "grid.png", "edit_info.json"]


def register(sub: Any) -> None:
    p = sub.add_parser("edit", help="turn rough images into realistic ones (SDEdit)", formatter_class=HelpFormatter)
    add_checkpoint_flags(p)
    add_images_flag(p)
    p.add_argument("--strength", type=finite_float, default=0.5,
                   help="how far to noise the images, in (0, 1]: t0 = strength (T - 1); small keeps them, 1 starts "
                        "from noise")
    add_sampler_flags(p)
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]")
    add_class_flags(p)
    add_output_flags(p, "edited")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ddpm
    from ddpm.editing import edit_timesteps, sdedit_plan
    from ddpm.outputs import prepare_output_folder

    pipe = ddpm.load(args.checkpoint, weights=args.weights, checkpoint=args.which, device=args.device)
    sampler = pipe.sampler_name(args.sampler)
    options = sampler_options(args, sampler)
    nfe = sdedit_plan(pipe.process, args.strength, sampler, args.steps)[1]  # checks the strength first
    images, names = read_inputs(args.images, pipe)
    out = args.out or default_out(pipe.source, "edited")
    prepare_output_folder(out, produces=PRODUCES, force=args.force)
    t0 = time.perf_counter()
    result = pipe.edit(images, args.strength, sampler=sampler, steps=args.steps, spacing=args.spacing,
                       seed=args.seed, batch_size=args.batch_size, classes=args.class_label, guidance=args.guidance,
                       clip_denoised=False if args.no_clip else None, progress=True, **options)
    seconds = time.perf_counter() - t0
    save_edits(out, result, [images, result], info_name="edit_info.json", record={
        **edit_record(args, pipe, names, seconds), "strength": args.strength, "sampler": sampler,
        "network_evaluations": nfe, "options": options,
        "timesteps": edit_timesteps(pipe.process, args.strength, sampler, args.steps, args.spacing),
    })
    say(f"{len(names)} images edited at strength {args.strength} in {seconds:.1f}s")
    return 0
