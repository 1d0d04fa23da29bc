"""``ddpm interpolate``: a path between two images through the model's noise space (exact inversion)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ddpm.cli.common import (
    HelpFormatter,
    add_checkpoint_flags,
    add_output_flags,
    default_out,
    nonnegative_float,
    positive_int,
    read_inputs,
    say,
)

PRODUCES = ["samples.npz", "strip.png", "interpolation.gif", "interpolate_info.json"]


def class_pair(text: str) -> int | tuple[int, int]:
    """``--class``: one label, or two as ``A,B``."""
    parts = text.split(",")
    try:
        labels = [int(v) for v in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class label or two as A,B, got {text!r}") from None
    if len(labels) > 2 or min(labels) < 0:
        raise argparse.ArgumentTypeError(f"expected a class label >= 0 or two as A,B, got {text!r}")
    return labels[0] if len(labels) == 1 else (labels[0], labels[1])


def register(sub: Any) -> None:
    from ddpm.editing import INVERSION_ORDERS
    from ddpm.pipeline import INVERSION_SAMPLER, INVERSION_STEPS

    p = sub.add_parser("interpolate", help="frames between two images through their encodings x_T",
                       formatter_class=HelpFormatter)
    add_checkpoint_flags(p)
    p.add_argument("a", type=Path, help="the first image (a file, or an .npz / .npy holding one image)")
    p.add_argument("b", type=Path, help="the last image")
    p.add_argument("--frames", type=positive_int, default=9, help="images on the path, both ends included")
    p.add_argument("--sampler", choices=tuple(INVERSION_ORDERS), default=INVERSION_SAMPLER,
                   help="the deterministic solver that encodes and decodes")
    p.add_argument("--steps", type=positive_int, default=None,
                   help=f"points of its time grid (default: {INVERSION_STEPS}, at most T)")
    p.add_argument("--class", dest="class_label", type=class_pair, default=None, metavar="LABEL|A,B",
                   help="class-conditional models: the class along the whole path, or A,B: from class A at the "
                        "first image to class B at the last (the class embedding interpolated linearly)")
    p.add_argument("--guidance", type=nonnegative_float, default=1.0, help="classifier-free guidance weight")
    add_output_flags(p, "interpolation")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ddpm
    from ddpm import viz
    from ddpm.errors import UserError
    from ddpm.outputs import SAMPLES_LAYOUT, prepare_output_folder, save_samples, write_json
    from ddpm.pipeline import INVERSION_STEPS

    if args.frames < 2:
        raise UserError(f"--frames must be >= 2 (both ends), got {args.frames}")
    pipe = ddpm.load(args.checkpoint, weights=args.weights, checkpoint=args.which, device=args.device)
    ends = []
    for source in (args.a, args.b):
        images, _ = read_inputs([source], pipe)
        if images.shape[0] != 1:
            raise UserError(f"{source} holds {images.shape[0]} images; give one image at each end")
        ends.append(images[0])
    out = args.out or default_out(pipe.source, "interpolation")
    prepare_output_folder(out, produces=PRODUCES, force=args.force)
    steps = pipe.resolve_steps(args.steps, INVERSION_STEPS)
    t0 = time.perf_counter()
    frames = pipe.interpolate(ends[0], ends[1], frames=args.frames, sampler=args.sampler, steps=steps,
                              classes=args.class_label, guidance=args.guidance)
    seconds = time.perf_counter() - t0
    written = save_samples(frames, out, ["npz"], is_image=True)
    written.append(viz.save_strip(frames.unsqueeze(1), out / "strip.png"))
    written.append(viz.save_chain_animation(frames.unsqueeze(1), out / "interpolation.gif", duration_ms=150,
                                            hold_ms=600))
    written.append(write_json(out / "interpolate_info.json", {
        "checkpoint": str(pipe.source), "weights": args.weights, "a": str(args.a), "b": str(args.b),
        "frames": args.frames, "sampler": args.sampler, "steps": steps,
        "network_evaluations": {"per_image_each_way": steps, "encode_both_ends": 2 * steps,
                                "decode_all_frames": args.frames * steps},
        "class": args.class_label, "guidance": args.guidance, "seconds": round(seconds, 2),
        "layout": SAMPLES_LAYOUT + "; frame 0 is a decoded, the last b decoded",
    }))
    for path in written:
        say(f"wrote {path}")
    say(f"{args.frames} frames in {seconds:.1f}s")
    return 0
