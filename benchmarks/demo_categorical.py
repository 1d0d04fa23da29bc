"""The categorical demo (D3PM) against the Gaussian one: the same images, network, data and training budget.

    ddpm demo --out runs/demo                                    # the Gaussian demo
    ddpm demo --process categorical --out runs/demo-categorical  # the categorical demo
    python benchmarks/demo_categorical.py --gaussian runs/demo --categorical runs/demo-categorical

reads both eval cards, evaluates the exact bound (L_T and all 1000 terms) of both models on the same held-out
images (the first ``--images`` of the test split, the images of the cards' estimates), and measures the
categorical model's samples at several numbers of ancestral steps (``--steps``, the same seeds). Writes
``benchmarks/results/demo-categorical.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import ddpm
from ddpm.build import build_dataset
from ddpm.evaluate import sweep
from ddpm.nn.policy import describe_machine

ROOT = Path(__file__).resolve().parents[1]


def card_row(name: str, card: dict, exact: ddpm.Bound) -> str:
    m, b = card["metrics"], card["bits_per_dim"]
    return (f"| {name} | {exact.total_bpd:.3f} +/- {exact.stderr_bpd:.3f} | {b['total_bpd']:.3f} +/- "
            f"{b['stderr_bpd']:.3f} | {m['frechet_distance']:.2f} | {m['classes_present']}/10 | "
            f"{card['sampler']}, {card['network_evaluations']} | {card['train_seconds'] / 60:.1f} | "
            f"{card['total_seconds'] / 60:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gaussian", type=Path, required=True, help="the Gaussian demo's folder")
    parser.add_argument("--categorical", type=Path, required=True, help="the categorical demo's folder")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--steps", default="50,100,250", help="ancestral steps of the categorical sweep")
    parser.add_argument("--num", type=int, default=500, help="samples per sweep setting")
    args = parser.parse_args()

    cards = {k: json.loads((folder / "eval_card.json").read_text())
             for k, folder in (("gaussian", args.gaussian), ("categorical", args.categorical))}
    pipes = {k: ddpm.load(folder / "run", weights="ema", device="cpu")
             for k, folder in (("gaussian", args.gaussian), ("categorical", args.categorical))}
    test = build_dataset(pipes["gaussian"].config.data, "test")
    images = test.get_batch(torch.arange(args.images))
    exact, seconds = {}, {}
    for k, pipe in pipes.items():
        t0 = time.perf_counter()
        exact[k] = pipe.nll(images, batch_size=50, seed=0)
        seconds[k] = time.perf_counter() - t0
        print(k, exact[k], f"{seconds[k]:.0f} s", flush=True)
    diff = exact["categorical"].per_image_bpd - exact["gaussian"].per_image_bpd
    rows, _ = sweep(pipes["categorical"], samplers=["ancestral"], nfes=[int(s) for s in args.steps.split(",")],
                    num=args.num, seed=0, on_row=lambda r: print(r, flush=True))

    g, c = exact["gaussian"], exact["categorical"]
    lines = [
        "# The categorical demo (D3PM) against the Gaussian demo",
        "",
        f"Commands: `ddpm demo --out {args.gaussian}`, `ddpm demo --process categorical --out {args.categorical}`, "
        f"`python benchmarks/demo_categorical.py --gaussian {args.gaussian} --categorical {args.categorical}`. "
        "Both: built-in MNIST-5k, the mnist-28 U-Net, 1500 steps of batch 64, AdamW lr 2e-3, EMA weights; "
        f"T = 1000. Machine: {describe_machine('cpu')}.",
        "",
        f"| demo | exact bound, {args.images} held-out images (bits/dim) | the card's estimate (40 terms) | "
        "Frechet distance | classes | sampler, evaluations | training min | total min |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
        card_row("Gaussian (v, min-SNR, cosine)", cards["gaussian"], g),
        card_row("categorical (D3PM-Gauss, K = 256, logits)", cards["categorical"], c),
        "",
        f"Paired over the same images, categorical minus Gaussian: {float(diff.mean()):.3f} +/- "
        f"{float(diff.std() / math.sqrt(diff.numel())):.3f} bits/dim. Parts of the exact bounds: Gaussian L_T "
        f"{g.prior_bpd:.2e}, sum of KL terms {g.kl_bpd:.3f}, decoder {g.decoder_bpd:.3f}; categorical L_T "
        f"{c.prior_bpd:.2e}, KL terms {c.kl_bpd:.3f}, decoder {c.decoder_bpd:.3f}. The exact bounds took "
        f"{seconds['gaussian']:.0f} s and {seconds['categorical']:.0f} s.",
        "",
        f"The categorical model's samples by ancestral steps ({args.num} samples, seed 0, classifier features):",
        "",
        "| ancestral steps | Frechet distance | classes | seconds |",
        "| ---: | ---: | ---: | ---: |",
        *[f"| {r['nfe']} | {r['distance']:.2f} | {r.get('classes_present', '')} | {r['seconds']:.0f} |"
          for r in rows if "distance" in r],
    ]
    (ROOT / "benchmarks" / "results" / "demo-categorical.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
