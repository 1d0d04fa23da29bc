"""The demo recipe trained with evaluation while training: the Frechet distance curve, the best checkpoint it kept
and the evaluation's share of the run's time.

    python benchmarks/eval_while_training.py --out runs/eval-demo

trains `ddpm.demo.demo_config` (1500 steps) with `train.eval_every` 250 and 500 samples of the demo's sampler
at 10 network evaluations per evaluation, then writes `benchmarks/results/eval-while-training.md` and the
plot `docs/eval_curve.png` (the run's own `metrics.jsonl` and `best.json` hold the numbers).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ddpm
from ddpm import viz
from ddpm.checkpoint import read_best
from ddpm.config import apply_overrides
from ddpm.demo import DEMO_SAMPLE_STEPS, DEMO_SAMPLERS, demo_config
from ddpm.nn.policy import describe_machine

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/eval-demo"))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-samples", type=int, default=500)
    args = parser.parse_args()

    cfg = apply_overrides(demo_config(str(args.out), args.steps, 0), {
        "train.eval_every": args.eval_every, "train.eval_samples": args.eval_samples,
        "train.eval_sampler": DEMO_SAMPLERS[False], "train.eval_steps": DEMO_SAMPLE_STEPS})
    started = time.perf_counter()
    result = ddpm.fit(cfg, overwrite=True)
    seconds = time.perf_counter() - started
    rows = [json.loads(x) for x in (args.out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "frechet_distance" in r]
    best = read_best(args.out)
    assert best is not None
    viz.save_eval_curve([r["step"] for r in evals], [r["frechet_distance"] for r in evals],
                        ROOT / "docs" / "eval_curve.png", metric="Frechet distance (classifier features)",
                        best_step=best["step"],
                        title=f"demo recipe, {args.eval_samples} samples every {args.eval_every} steps")
    share = evals[-1]["eval_share"]
    lines = [
        "# Evaluation while training: the demo recipe",
        "",
        f"Command: `python benchmarks/eval_while_training.py --out {args.out}` (the demo recipe, "
        f"`--eval-every {args.eval_every} --eval-samples {args.eval_samples}`, {DEMO_SAMPLERS[False]} at "
        f"{DEMO_SAMPLE_STEPS} network evaluations). Machine: {describe_machine('cpu')}.",
        "",
        "| step | Frechet distance (classifier features) | KID | eval loss |",
        "| ---: | ---: | ---: | ---: |",
        *[f"| {r['step']} | {r['frechet_distance']:.3f} | {r['kid']:.4f} | {r.get('eval_loss', float('nan')):.4f} |"
          for r in evals],
        "",
        f"Best checkpoint kept: `{best['checkpoint']}` (Frechet distance {best['value']:.3f}); the run's newest is "
        f"`ckpt-{result.step:08d}`. Evaluation took {evals[-1]['eval_seconds']:.0f} s of the run's {seconds:.0f} s "
        f"({100 * share:.1f}%).",
    ]
    (ROOT / "benchmarks" / "results" / "eval-while-training.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
