"""``ddpm sweep``: quality against network evaluations, every sampler on the same seeds."""

from __future__ import annotations

import argparse
from typing import Any

from ddpm.choices import FEATURES
from ddpm.cli.common import (
    HelpFormatter,
    add_checkpoint_flags,
    add_output_flags,
    default_out,
    int_list,
    name_list,
    positive_int,
    say,
)
from ddpm.samplers import SAMPLERS, samplers_for


def register(sub: Any) -> None:
    p = sub.add_parser("sweep", help="quality against network evaluations for each sampler",
                       formatter_class=HelpFormatter)
    add_checkpoint_flags(p)
    add_output_flags(p, "sweep")
    p.add_argument("-n", "--num", type=positive_int, default=500, help="samples per setting (same seeds)")
    p.add_argument("--samplers", type=name_list(tuple(SAMPLERS)), default=None,
                   help=f"comma list of samplers, or all (default: all that walk the model's process; for Gaussian "
                        f"diffusion {','.join(SAMPLERS)})")
    p.add_argument("--steps", type=int_list, default=[5, 10, 20, 50, 100], metavar="NFE,...",
                   help="comma list of network-evaluation budgets (default: 5,10,20,50,100)")
    p.add_argument("--batch-size", type=positive_int, default=100, help="samples per network call")
    p.add_argument("--data", default=None, help="reference data set (default: the run's own; needed for an "
                                                "imported diffusers pipeline)")
    p.add_argument("--features", choices=FEATURES, default="auto", help="feature network for images")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ddpm
    from ddpm import viz
    from ddpm.distributed import resolve_device
    from ddpm.evaluate import headline_metric, sweep, sweep_markdown
    from ddpm.outputs import prepare_output_folder, write_json

    pipe = ddpm.load(args.checkpoint, weights=args.weights, checkpoint=args.which, device=resolve_device(args.device))
    out = prepare_output_folder(args.out or default_out(pipe.source, "sweep"),
                                produces=["sweep.json", "sweep.md", "sweep.png"], force=args.force)

    def report(row: dict[str, Any]) -> None:
        if "distance" in row:
            say(f"{row['sampler']:12s} {row['nfe']:5d} network evaluations  distance {row['distance']:.4g}  "
                f"({row['seconds']:.1f}s)")
        else:
            say(f"{row['sampler']:12s} {row['nfe']:5d} network evaluations  skipped: {row['skipped']}")

    samplers = args.samplers or samplers_for(pipe.process)
    rows, ref = sweep(pipe, samplers=samplers, nfes=args.steps, num=args.num, seed=args.seed,
                      batch_size=args.batch_size, data=args.data, features=args.features, on_row=report)
    _, metric = headline_metric(ref)
    write_json(out / "sweep.json", {"checkpoint": str(pipe.source), "num_samples": args.num, "seed": args.seed,
                                    "metric": metric, "features": ref.feature_info or {}, "rows": rows})
    table = sweep_markdown(rows, metric)
    (out / "sweep.md").write_text(table, encoding="utf-8")
    measured = [r for r in rows if "distance" in r]
    if measured:
        viz.save_sweep_plot(measured, out / "sweep.png", metric=metric)
    say(table)
    say(f"wrote {out / 'sweep.md'}, {out / 'sweep.json'} and {out / 'sweep.png'}")
    return 0
