"""``ddpm demo``: train on built-in MNIST on the CPU, then sample, animate and measure (:func:`ddpm.demo.run_demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ddpm.cli.common import HelpFormatter, nonnegative_float, nonnegative_int, positive_int, say
from ddpm.demo import CATEGORICAL_SAMPLE_STEPS, DEMO_PROCESSES, DEMO_SAMPLE_STEPS, DEMO_SAMPLERS, run_demo
from ddpm.samplers import SAMPLERS


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="train on built-in MNIST on the CPU, then sample, animate and measure",
                       formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument("--steps", type=positive_int, default=1500, help="training steps")
    p.add_argument("--num-samples", type=positive_int, default=500, help="samples drawn and measured")
    p.add_argument("--sampler", choices=tuple(SAMPLERS), default=None,
                   help=f"sampler (default: {DEMO_SAMPLERS[False]}, with --class-cond {DEMO_SAMPLERS[True]}: "
                        "at 10 evaluations each had a lower Frechet distance than 50 ancestral steps on this recipe; "
                        "categorical: ancestral, its only sampler)")
    p.add_argument("--sample-steps", type=positive_int, default=None,
                   help=f"network evaluations per sample (default: {DEMO_SAMPLE_STEPS}; categorical: "
                        f"{CATEGORICAL_SAMPLE_STEPS} ancestral steps)")
    p.add_argument("--process", choices=DEMO_PROCESSES, default="gaussian",
                   help="the diffusion: Gaussian (Ho et al.) or categorical over the 256 levels (D3PM, Gaussian "
                        "transitions), the same network, data and budget")
    p.add_argument("--nll-images", type=nonnegative_int, default=100, help="held-out images for the bits/dim estimate")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run")
    p.add_argument("--class-cond", action="store_true",
                   help="a digit-conditional model: one row per digit, label accuracy and a guidance sweep")
    p.add_argument("--guidance", type=nonnegative_float, default=2.0,
                   help="with --class-cond: the classifier-free guidance weight of the samples")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = run_demo(args.out, steps=args.steps, num_samples=args.num_samples, sampler=args.sampler,
                      sample_steps=args.sample_steps, nll_images=args.nll_images, seed=args.seed, resume=args.resume,
                      class_cond=args.class_cond, guidance=args.guidance, process=args.process)
    card = result.card
    m = card["metrics"]
    say(f"\nFrechet distance (classifier features) {m['frechet_distance']:.2f}, KID {m['kid']:.4f} +/- "
        f"{m['kid_stderr']:.4f}, classes present {m['classes_present']}/10, histogram {m['class_histogram']}")
    if "label_accuracy" in m:
        say(f"label accuracy (classifier agrees with the requested digit) {m['label_accuracy']:.3f} at guidance "
            f"{args.guidance:g}; by digit {m['label_accuracy_by_class']}")
    for r in card.get("guidance_sweep", []):
        say(f"  guidance {r['guidance']:g}: Frechet distance {r['distance']:.2f}, label accuracy "
            f"{r.get('label_accuracy', float('nan')):.3f}")
    if "bits_per_dim" in card:
        b = card["bits_per_dim"]
        say(f"bits/dim on {b['images']} held-out images: {b['total_bpd']:.3f} +/- {b['stderr_bpd']:.3f}")
    speed = card["training_speed"]
    if speed["images_per_sec"] is not None:
        say(f"training: {speed['images_per_sec']:.0f} images/s on {speed['machine']} ({speed['threads']} threads, "
            f"autocast {speed['amp']}, {speed['memory_format']} layout)")
    say(f"minutes: training {card['train_seconds'] / 60:.1f}, total {card['total_seconds'] / 60:.1f}")
    for what, path in result.files.items():
        say(f"  {what:45s} {path}")
    return 0
