"""``ddpm eval``: sample and measure against held-out data; an eval card in JSON and Markdown."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ddpm.choices import FEATURES
from ddpm.cli.common import (
    HelpFormatter,
    add_checkpoint_flags,
    add_output_flags,
    add_sampler_flags,
    default_out,
    float_list,
    nonnegative_float,
    nonnegative_int,
    positive_int,
    sampler_options,
    say,
)
from ddpm.eval.features import RESIZES


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="sample and measure: an eval card (JSON and Markdown)",
                       formatter_class=HelpFormatter)
    add_checkpoint_flags(p)
    add_output_flags(p, "eval")
    p.add_argument("-n", "--num", type=positive_int, default=1000, help="samples generated")
    add_sampler_flags(p)
    p.add_argument("--data", default=None, help="reference data set (default: the run's own; needed for an "
                                                "imported diffusers pipeline)")
    p.add_argument("--features", choices=FEATURES, default="auto",
                   help="feature network: the project's digit classifier (offline) or Inception-v3")
    p.add_argument("--inception-weights", default=None, help="path of pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--resize", choices=RESIZES, default="tf1",
                   help="how Inception resizes to 299: tf1 as the original FID graph (Ho et al., EDM), pytorch as "
                        "pytorch-fid")
    p.add_argument("--ref-stats", type=Path, default=None, metavar="FILE",
                   help="measure against this .npz of mu and sigma (ddpm stats; pytorch-fid's, clean-fid's, EDM's) "
                        "instead of the held-out split: the Frechet distance only")
    p.add_argument("--nll-images", type=nonnegative_int, default=100,
                   help="held-out images for the bits/dim estimate (0: skip)")
    p.add_argument("--nll-terms", type=positive_int, default=40, help="timesteps per image of the estimate")
    p.add_argument("--guidance", type=nonnegative_float, default=1.0,
                   help="class-conditional models: guidance weight of the card's samples (balanced classes)")
    p.add_argument("--guidance-scales", type=float_list, default=[0.0, 1.0, 2.0, 4.0], metavar="W,...",
                   help="class-conditional models: the guidance sweep (distance and label accuracy at each weight; "
                        "empty to skip)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ddpm
    from ddpm.distributed import cleanup_distributed, is_main_process, setup_distributed
    from ddpm.evaluate import card_markdown, evaluate, make_reference, reference_data, write_eval_card
    from ddpm.outputs import prepare_output_folder

    device, _, _ = setup_distributed(args.device)  # under torchrun the samples and the bound are sharded
    try:
        pipe = ddpm.load(args.checkpoint, weights=args.weights, checkpoint=args.which, device=device)
        sampler = pipe.sampler_name(args.sampler)
        options = sampler_options(args, sampler)  # checked before anything is written
        reference = make_reference(reference_data(pipe, args.data), pipe.data_shape, features=args.features,
                                   inception_weights=args.inception_weights, resize=args.resize, device=pipe.device,
                                   seed=args.seed, stats_file=args.ref_stats)  # a bad --ref-stats: refused before --out
        out = args.out or default_out(pipe.source, "eval")
        if is_main_process():
            prepare_output_folder(out, produces=["eval_card.json", "eval_card.md", "guidance.png"], force=args.force)
        card = evaluate(pipe, num=args.num, sampler=sampler, steps=args.steps, spacing=args.spacing, seed=args.seed,
                        batch_size=args.batch_size, reference=reference,
                        nll_images=args.nll_images, nll_terms=args.nll_terms, guidance=args.guidance,
                        guidance_scales=args.guidance_scales if pipe.can_guide else (), **options)
        if is_main_process():
            written = write_eval_card(card, out)
            say(card_markdown(card))
            say("wrote " + ", ".join(str(p) for p in written.values()))
    finally:
        cleanup_distributed()
    return 0
