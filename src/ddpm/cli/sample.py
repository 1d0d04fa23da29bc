"""``ddpm sample``: draw samples from a trained model (sharded under torchrun) and write them."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ddpm.choices import AMPS, TOGGLES
from ddpm.cli.common import (
    HelpFormatter,
    add_checkpoint_flags,
    add_class_flags,
    add_output_flags,
    add_sampler_flags,
    default_out,
    positive_int,
    sampler_options,
    say,
)


def register(sub: Any) -> None:
    p = sub.add_parser("sample", help="generate samples from a checkpoint", formatter_class=HelpFormatter)
    add_checkpoint_flags(p)
    p.add_argument("-n", "--num", type=positive_int, default=64, help="number of samples (per class with --class all)")
    add_sampler_flags(p)
    add_class_flags(p, all_help="-n samples of every class, the grid one row per class")
    add_output_flags(p, "samples")
    p.add_argument("--format", default="grid,npz", help="comma list of: grid (PNG), png (one file each), npz")
    p.add_argument("--animate", action="store_true", help="also write reverse_chain.gif (x_T -> x_0)")
    p.add_argument("--no-clip", action="store_true", help="do not clip the predicted x_0 to [-1, 1]")
    p.add_argument("--amp", choices=AMPS, default="none",
                   help="autocast dtype of the network (none: float32; auto: the device's rule, e.g. bf16 on CPUs "
                        "with AVX-512 BF16 or AMX; fp16: CUDA only)")
    p.add_argument("--cuda-graphs", choices=TOGGLES, default="auto",
                   help="replay each network evaluation from a captured CUDA graph (on: CUDA only; auto: off until "
                        "benchmarks/gpu.py has measured it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import ddpm
    from ddpm import viz
    from ddpm.distributed import cleanup_distributed, is_main_process, setup_distributed
    from ddpm.errors import UserError
    from ddpm.outputs import (
        SAMPLES_LAYOUT,
        parse_formats,
        prepare_output_folder,
        sample_files,
        save_samples,
        write_json,
    )

    formats = parse_formats(args.format)
    device, _, _ = setup_distributed(args.device)
    try:
        pipe = ddpm.load(args.checkpoint, weights=args.weights, checkpoint=args.which, device=device, amp=args.amp,
                         cuda_graphs=args.cuda_graphs)
        out = args.out or default_out(pipe.source, "samples")
        sampler = pipe.sampler_name(args.sampler)
        options = sampler_options(args, sampler)  # checked before anything is written
        if is_main_process():
            prepare_output_folder(out, produces=[*sample_files(formats, is_image=pipe.is_image), "sample_info.json"],
                                  force=args.force)
        num, classes, nrow = args.num, args.class_label, None
        if classes == "all":
            if pipe.num_classes is None:
                raise UserError(f"--class all needs a class-conditional model; {pipe.source} is unconditional")
            classes = torch.arange(pipe.num_classes).repeat_interleave(args.num)
            num, nrow = len(classes), args.num
        t0 = time.perf_counter()
        x = pipe.sample(num, sampler=sampler, steps=args.steps, spacing=args.spacing, seed=args.seed,
                        batch_size=args.batch_size, clip_denoised=False if args.no_clip else None, progress=True,
                        classes=classes, guidance=args.guidance, **options)
        seconds = time.perf_counter() - t0
        if not is_main_process():
            return 0
        written = save_samples(x, out, formats, is_image=pipe.is_image, nrow=nrow)
        labels = pipe.labels(classes, num)
        if args.animate and pipe.is_image:
            first = None if labels is None else labels[: min(num, 16)]
            chain = pipe.reverse_chain(min(num, 16), sampler=sampler, steps=args.steps,
                                       spacing=args.spacing, seed=args.seed, classes=first, guidance=args.guidance,
                                       **options)
            written.append(viz.save_chain_animation(chain, out / "reverse_chain.gif"))
        if not pipe.is_image:
            from ddpm.build import build_dataset

            ref = build_dataset(pipe.config.data, "test")
            written.append(viz.save_scatter(x, ref.get_batch(torch.arange(min(len(ref), 5000))),
                                            out / "scatter.png", title=f"{sampler}, {num} samples"))
        write_json(out / "sample_info.json", {
            "checkpoint": str(pipe.source), "weights": args.weights, "num": num, "sampler": sampler,
            "classes": None if labels is None else labels.tolist(), "guidance": args.guidance,
            "network_evaluations": pipe.network_evaluations(sampler, args.steps),
            "timesteps": pipe.grid_timesteps(sampler, args.steps, args.spacing), "options": options,
            "seed": args.seed, "seconds": round(seconds, 2), "layout": SAMPLES_LAYOUT, "runtime": pipe.policy.record(),
        })
        for path in written:
            say(f"wrote {path}")
        say(f"{num} samples in {seconds:.1f}s")
    finally:
        cleanup_distributed()
    return 0
