"""Samplers under classifier-free guidance: Frechet distance and label accuracy on a conditional model.

For each (sampler, NFE) and guidance weight w, draws the same 500 class-balanced samples (seed 0)
and reports the Frechet distance on the digit classifier's features against the held-out split and
how often that classifier assigns a sample to the digit it was asked for.

    flock /tmp/ddpm-heavy.lock env PYTHONPATH=src \\
        python benchmarks/guided_samplers.py runs/demo-cond/run --name demo-cond

writes ``benchmarks/results/guided-samplers-<name>.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import ddpm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from samplers import _cpu  # noqa: E402

from ddpm.evaluate import balanced_labels, distances, label_accuracy, make_reference

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [("dpm++2m-sde", 10), ("dpm++2m-sde", 20), ("unipc", 10), ("ancestral", 50)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a class-conditional run folder or checkpoint")
    p.add_argument("--name", default="demo-cond", help="results/guided-samplers-<name>.md")
    p.add_argument("-n", "--num", type=int, default=500, help="samples per cell (classes balanced)")
    p.add_argument("--guidance", default="1,1.5,2", help="comma list of guidance weights")
    args = p.parse_args(argv)
    weights = [float(v) for v in args.guidance.split(",")]

    pipe = ddpm.load(args.checkpoint, device="cpu")
    if not pipe.can_guide:
        raise SystemExit(f"{args.checkpoint} is not a class-conditional model with a null class")
    ref = make_reference(pipe.config.data, pipe.data_shape, features="classifier")
    labels = balanced_labels(args.num, pipe.num_classes or 0)
    lines = ["| sampler | NFE | " + " | ".join(f"w = {w:g}" for w in weights) + " |",
             "| --- | ---: | " + " | ".join("---" for _ in weights) + " |"]
    start = time.perf_counter()
    for sampler, nfe in CONFIGS:
        cells = []
        for w in weights:
            x = pipe.sample(args.num, sampler=sampler, steps=nfe, seed=0, batch_size=100, classes=labels, guidance=w)
            fd = distances(x, ref)["frechet_distance"]
            acc = label_accuracy(x, labels, ref, pipe.num_classes or 0)["label_accuracy"]
            print(f"{sampler:12s} NFE {nfe:3d} w {w:g}: Frechet {fd:6.2f}, label accuracy {acc:.3f}", flush=True)
            cells.append(f"{fd:.2f} / {acc:.3f}")
        lines.append(f"| {sampler} | {nfe} | " + " | ".join(cells) + " |")
    info = ref.feature_info or {}
    minutes = (time.perf_counter() - start) / 60
    header = (f"`python benchmarks/guided_samplers.py {args.checkpoint} --name {args.name}` ({_cpu()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}; {minutes:.0f} min)\n\n"
              f"Frechet distance / label accuracy on {info.get('name', 'classifier')} features (held-out accuracy "
              f"{info.get('heldout_accuracy', '?')}) against the held-out split; {args.num} samples per cell, "
              "classes balanced, seed 0, the same x_T for every cell.\n\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"guided-samplers-{args.name}.md"
    out.write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
