"""``ddpm nll``: the variational bound in bits/dim on held-out images (sharded under torchrun)."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ddpm.cli.common import HelpFormatter, add_checkpoint_flags, add_output_flags, default_out, positive_int, say


def register(sub: Any) -> None:
    p = sub.add_parser("nll", help="the variational bound in bits/dim on held-out images",
                       formatter_class=HelpFormatter)
    add_checkpoint_flags(p)
    add_output_flags(p, "nll")
    p.add_argument("--data", default=None, help="data set (default: the run's own)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="which split")
    p.add_argument("-n", "--num-images", type=positive_int, default=64, help="images evaluated")
    p.add_argument("--estimate", type=positive_int, default=None, metavar="K",
                   help="unbiased Monte Carlo estimate from K timesteps per image (default: all T terms, exact)")
    p.add_argument("--respace", type=positive_int, default=None, metavar="K",
                   help="the bound of the respaced K-step model instead of the T-step one")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per batch")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import ddpm
    from ddpm import viz
    from ddpm.build import build_dataset
    from ddpm.distributed import cleanup_distributed, is_main_process, setup_distributed
    from ddpm.errors import UserError
    from ddpm.evaluate import reference_data
    from ddpm.outputs import prepare_output_folder, write_json

    device, _, _ = setup_distributed(args.device)
    try:
        pipe = ddpm.load(args.checkpoint, weights=args.weights, checkpoint=args.which, device=device)
        out = args.out or default_out(pipe.source, "nll")
        if is_main_process():
            prepare_output_folder(out, produces=["nll.json", "terms.png"], force=args.force)
        data_cfg = reference_data(pipe, args.data)
        dataset = build_dataset(data_cfg, args.split)
        if dataset.kind != "image":
            raise UserError("the bound uses the 256-level decoder of 8-bit images; this data set holds vectors")
        index = torch.arange(min(args.num_images, len(dataset)))
        images = dataset.get_batch(index)
        labels = None
        if pipe.num_classes is not None:  # a conditional model: the bound on -log p(x | y) with the true labels
            if dataset.labels is None:
                raise UserError(f"{pipe.source} is class-conditional but the data {data_cfg.dataset!r} has no labels")
            labels = dataset.labels[index]
        t0 = time.perf_counter()
        bound = pipe.nll(images, estimate=args.estimate, seed=args.seed, batch_size=args.batch_size,
                         respace=args.respace, labels=labels, progress=True)
        if not is_main_process():
            return 0
        result = {**bound.to_dict(), "seconds": round(time.perf_counter() - t0, 2), "checkpoint": str(pipe.source),
                  "weights": args.weights, "data": data_cfg.dataset, "split": args.split,
                  "respaced_steps": args.respace}
        write_json(out / "nll.json", result)
        say(f"bound on {result['bound_on']} over {bound.images} {args.split} images ({bound.mode}, "
            f"T={bound.timesteps}):")
        for key, label in (("total_bpd", "total"), ("stderr_bpd", "standard error"), ("prior_bpd", "L_T"),
                           ("kl_bpd", "sum of L_{t-1}"), ("decoder_bpd", "L_0")):
            value = getattr(bound, key)
            if value is not None:
                say(f"  {label:16s} {value:.4f} bits/dim")
        say(f"wrote {out / 'nll.json'}")
        if bound.terms_bpd is not None:
            say(f"wrote {viz.save_terms_plot(bound.terms_bpd, out / 'terms.png')}")
    finally:
        cleanup_distributed()
    return 0
