"""Sample quality against network evaluations (NFE) for every sampler, beside diffusers' solvers.

Loads a trained run, draws one x_T per sample index (the same for every sampler and NFE; sample i's
step noise comes from its own generator too), and reports the Frechet distance on the project's
digit-classifier features against the held-out split, for each sampler configuration at each NFE,
plus the 1000-step ancestral chain as the standard of comparison. diffusers'
``DPMSolverMultistepScheduler`` (dpmsolver++, order 2) and ``UniPCMultistepScheduler`` (bh2,
order 2) are driven by the same network on the same x_T: its prediction is fed to their ``step``.
Their x_0 clipping matches ours (``thresholding=True, sample_max_value=1.0`` clamps x0_hat to
[-1, 1]); everything else is their default.

    flock /tmp/ddpm-heavy.lock env OMP_NUM_THREADS=2 PYTHONPATH=src \\
        python benchmarks/samplers.py /work/models/demo/run --name demo

writes ``benchmarks/results/samplers-<name>.md``, ``.json`` and ``.png``. ``--configs`` picks
configurations by label (``--list`` shows them); ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import ddpm
from ddpm.evaluate import distances, make_reference
from ddpm.pipeline import Pipeline
from ddpm.samplers import sample
from ddpm.seeding import item_seeds

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Config:
    """One row of the table: our sampler (name, spacing, options) or a diffusers scheduler."""

    label: str
    sampler: str
    spacing: str | None = None
    options: dict[str, float] = field(default_factory=dict)
    diffusers: bool = False


CONFIGS = [
    Config("ancestral linspace", "ancestral", "linspace"),
    Config("ancestral trailing", "ancestral", "trailing"),
    Config("ddim linspace", "ddim", "linspace"),
    Config("ddim trailing", "ddim", "trailing"),
    Config("dpm++2m uniform", "dpm++2m", "uniform"),  # diffusers' grid: the parity row
    Config("dpm++2m trailing", "dpm++2m", "trailing"),
    Config("dpm++2m log-snr", "dpm++2m", "log-snr"),
    Config("dpm++2m karras", "dpm++2m", "karras"),
    Config("dpm++3m trailing", "dpm++3m", "trailing"),
    Config("dpm++3m karras", "dpm++3m", "karras"),
    Config("unipc uniform", "unipc", "uniform"),  # diffusers' grid: the parity row
    Config("unipc trailing", "unipc", "trailing"),
    Config("unipc log-snr", "unipc", "log-snr"),
    Config("unipc karras", "unipc", "karras"),
    Config("unipc-3 karras", "unipc", "karras", {"order": 3.0}),
    Config("dpm++2m-sde trailing", "dpm++2m-sde", "trailing"),
    Config("dpm++2m-sde log-snr", "dpm++2m-sde", "log-snr"),
    Config("dpm++2m-sde karras", "dpm++2m-sde", "karras"),
    Config("dpm++2m-sde eta0.5 karras", "dpm++2m-sde", "karras", {"eta": 0.5}),
    Config("heun trailing", "heun", "trailing"),
    Config("heun log-snr", "heun", "log-snr"),
    Config("heun karras", "heun", "karras"),
    Config("heun churn10 log-snr", "heun", "log-snr", {"churn": 10.0}),
    Config("heun churn40 log-snr", "heun", "log-snr", {"churn": 40.0}),
    Config("diffusers DPMSolverMultistep", "DPMSolverMultistepScheduler", diffusers=True),
    Config("diffusers UniPCMultistep", "UniPCMultistepScheduler", diffusers=True),
]
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def diffusers_sampler(pipe: Pipeline, name: str, clip: bool) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """x_T, NFE -> x_0 with a diffusers scheduler stepping on our network's prediction."""
    import diffusers

    d = pipe.process
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2} if name == "DPMSolverMultistepScheduler" else {
        "solver_order": 2, "solver_type": "bh2"}

    def run(x_T: torch.Tensor, nfe: int) -> torch.Tensor:
        scheduler = getattr(diffusers, name)(
            num_train_timesteps=d.num_timesteps, trained_betas=d.schedule.betas.numpy(),
            prediction_type=DIFFUSERS_PREDICTION[d.prediction], thresholding=clip, sample_max_value=1.0, **extra)
        scheduler.set_timesteps(nfe)
        x = x_T
        for t in scheduler.timesteps:
            prediction, _ = d.split_model_output(pipe.model(x, t.expand(x.shape[0])), x)  # variance dropped
            x = scheduler.step(prediction, t, x).prev_sample
        return x

    return run


@torch.inference_mode()
def draw(pipe: Pipeline, config: Config, nfe: int, x_T: torch.Tensor, *, seed: int, batch_size: int,
         clip: bool) -> torch.Tensor:
    """Samples for every x_T (batch by batch), with sample i's step noise from its own generator."""
    out = []
    run = diffusers_sampler(pipe, config.sampler, clip) if config.diffusers else None
    for start in range(0, x_T.shape[0], batch_size):
        x = x_T[start : start + batch_size]
        if run is not None:
            out.append(run(x, nfe))
            continue
        gens = [torch.Generator().manual_seed(s)
                for s in item_seeds(seed, range(start, start + x.shape[0]), stream="steps")]
        out.append(sample(pipe.process, pipe.model, x.shape, sampler=config.sampler, steps=nfe,
                          spacing=config.spacing, clip_denoised=clip, generator=gens, noise=x,  # type: ignore[arg-type]
                          **config.options))
    return torch.cat(out).float()


def summary(rows: list[dict]) -> dict[tuple[str, int], tuple[float, float, int]]:
    """(label, NFE) -> (mean, standard deviation, number of seeds) of the distance."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        groups.setdefault((r["label"], r["nfe"]), []).append(r["distance"])
    out = {}
    for key, values in groups.items():
        t = torch.tensor(values, dtype=torch.float64)
        out[key] = (float(t.mean()), float(t.std()) if len(values) > 1 else 0.0, len(values))
    return out


def cell(mean: float, sd: float, n: int) -> str:
    return f"{mean:.2f}" if n == 1 else f"{mean:.2f} ± {sd:.2f}"


def markdown(result: dict) -> str:
    nfes, stats = result["nfe"], summary(result["rows"])
    seeds = sorted({r["seed"] for r in result["rows"]})
    ref = summary(result["reference"]) if result["reference"] else {}
    ref_text = "; ".join(f"{label} {cell(*v)}" for (label, _), v in ref.items()) or "none"
    spread = "mean ± standard deviation over the seeds" if len(seeds) > 1 else "one draw"
    lines = [f"Frechet distance on {result['features']} features against the held-out split; "
             f"{result['num_samples']} samples per cell, seeds {', '.join(map(str, seeds))} ({spread}); the same "
             f"x_T and step noise for every sampler under a seed; lower is better. Reference: {ref_text}.", "",
             "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "| --- | " + " | ".join("---:" for _ in nfes) + " |"]
    best = {n: min(v[0] for (label, m), v in stats.items() if m == n) for n in nfes}
    for label in dict.fromkeys(r["label"] for r in result["rows"]):
        cells = []
        for n in nfes:
            v = stats.get((label, n))
            text = "" if v is None else cell(*v)
            cells.append(f"**{text}**" if v is not None and v[0] == best[n] else text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Distance against NFE: one colour per sampler family, one line style per spacing, y clipped at 60."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    stats = summary(result["rows"])
    families = list(dict.fromkeys(r["sampler"] for r in result["rows"]))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(families)}
    styles = {None: "-", "linspace": "-", "uniform": "-", "trailing": "--", "log-snr": "-.", "karras": ":"}
    for label in dict.fromkeys(r["label"] for r in result["rows"]):
        row = next(r for r in result["rows"] if r["label"] == label)
        pts = sorted((n, v[0]) for (name, n), v in stats.items() if name == label)
        ax.plot(*zip(*pts, strict=True), styles.get(row["spacing"], "-"), color=colours[row["sampler"]], marker="o",
                markersize=3, label=label)
    for (label, _), (mean, _, _) in (summary(result["reference"]) if result["reference"] else {}).items():
        ax.axhline(mean, color="k", lw=0.8, ls=":", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(result["nfe"], [str(n) for n in result["nfe"]])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    low = 0.85 * min(v[0] for v in stats.values())
    ax.set_ylim(low, 60)
    ticks = [v for v in (2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 40, 60) if v >= low]
    ax.set_yticks(ticks, [str(v) for v in ticks])
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("Frechet distance (classifier features)")
    ax.legend(fontsize=6, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, stem: Path) -> None:
    """``stem``.json, .md (the command, the machine, the table) and .png."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    Path(f"{stem}.md").write_text(
        f"`{result['command']}` ({result['cpu']}, {result['threads']} threads, torch {result['torch']}, "
        f"diffusers {result['diffusers']}; {result['seconds'] / 60:.0f} min)\n\n" + markdown(result), encoding="utf-8")
    plot(result, Path(f"{stem}.png"))
    print(f"wrote {stem}.md, .json and .png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", default="/work/models/demo/run", help="run folder or checkpoint")
    p.add_argument("--name", default="demo", help="results/samplers-<name>.*")
    p.add_argument("-n", "--num", type=int, default=500, help="samples per setting")
    p.add_argument("--nfe", default="5,8,10,15,20,50", help="comma list of network-evaluation budgets")
    p.add_argument("--reference-steps", type=int, default=1000, help="ancestral steps of the reference (0: none)")
    p.add_argument("--configs", default=None, help="comma list of labels (default: all)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seeds", default="0", help="comma list of seeds (x_T and step noise); cells show their mean")
    p.add_argument("--reference-seeds", default=None, help="seeds of the reference (default: --seeds)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS or torch's)")
    p.add_argument("--merge", action="store_true",
                   help="update results/samplers-<name>.json: re-measure --configs, keep its other rows and reference")
    p.add_argument("--quick", action="store_true", help="smoke run: 50 samples, NFE 5 and 10, no reference, no files")
    p.add_argument("--list", action="store_true", help="list the configuration labels and exit")
    p.add_argument("--render", action="store_true", help="rewrite results/samplers-<name>.md and .png from its .json")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(c.label for c in CONFIGS))
        return 0
    if args.render:
        write(json.loads((RESULTS / f"samplers-{args.name}.json").read_text()), RESULTS / f"samplers-{args.name}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.num, args.nfe, args.reference_steps = 50, "5,10", 0
    nfes = [int(v) for v in args.nfe.split(",")]
    configs = CONFIGS if args.configs is None else [c for c in CONFIGS if c.label in args.configs.split(",")]
    if args.configs is not None and len(configs) != len(args.configs.split(",")):
        known = {c.label for c in CONFIGS}
        sys.exit(f"unknown configuration(s): {[v for v in args.configs.split(',') if v not in known]}")

    seeds = [int(v) for v in args.seeds.split(",")]
    reference_seeds = seeds if args.reference_seeds is None else [int(v) for v in args.reference_seeds.split(",")]
    pipe = ddpm.load(args.checkpoint, weights="ema", device="cpu")
    clip = pipe.is_image
    ref = make_reference(pipe.config.data, pipe.data_shape, features="classifier")  # one metric for every seed
    feat_info = ref.feature_info or {}

    def measure(config: Config, nfe: int, seed: int) -> dict:
        gens = [torch.Generator().manual_seed(s) for s in item_seeds(seed, range(args.num), stream="x_T")]
        x_T = torch.stack([torch.randn(pipe.data_shape, generator=g) for g in gens])
        t0 = time.perf_counter()
        x = draw(pipe, config, nfe, x_T, seed=seed, batch_size=args.batch_size, clip=clip)
        seconds = time.perf_counter() - t0
        m = distances(x, ref)
        row = {"label": config.label, "sampler": config.sampler, "spacing": config.spacing, "options": config.options,
               "diffusers": config.diffusers, "nfe": nfe, "seed": seed, "distance": round(m["frechet_distance"], 4),
               "kid": round(m["kid"], 5), "classes_present": m["classes_present"], "seconds": round(seconds, 1)}
        print(f"{config.label:30s} NFE {nfe:4d} seed {seed}  Frechet {m['frechet_distance']:8.3f}  ({seconds:.0f}s)",
              flush=True)
        return row

    def merged(old: list[dict], new: list[dict]) -> list[dict]:
        """``old`` in its order with the re-measured (label, NFE, seed) replaced, then the new ones."""
        fresh = {(r["label"], r["nfe"], r["seed"]): r for r in new}
        return [fresh.pop((r["label"], r["nfe"], r["seed"]), r) for r in old] + list(fresh.values())

    t_start = time.perf_counter()
    stem = RESULTS / f"samplers-{args.name}"
    previous = json.loads(Path(f"{stem}.json").read_text()) if args.merge else None
    reference = []
    if args.reference_steps:
        have = {r["seed"] for r in previous["reference"]} if previous else set()
        label = f"ancestral {args.reference_steps} steps"
        reference = [measure(Config(label, "ancestral"), args.reference_steps, s) for s in reference_seeds
                     if s not in have]
    rows = [measure(c, n, s) for c in configs for n in nfes for s in seeds]
    if previous:
        reference, rows = merged(previous["reference"], reference), merged(previous["rows"], rows)
    result = {
        "checkpoint": str(pipe.source), "num_samples": args.num,
        "nfe": sorted(set(nfes) | set(previous["nfe"] if previous else [])),
        "features": f"{feat_info['name']} (held-out accuracy {feat_info['heldout_accuracy']})",
        "reference": reference, "rows": rows, "summary": {f"{k[0]} @ {k[1]}": v for k, v in summary(rows).items()},
        "cpu": _cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "diffusers": _diffusers_version(), "seconds": round(time.perf_counter() - t_start, 1),
        "command": "python benchmarks/samplers.py " + shlex.join(sys.argv[1:] if argv is None else argv),
    }
    if previous:
        result["command"] = f"{previous['command']}; then {result['command']}"
        result["seconds"] = round(previous["seconds"] + result["seconds"], 1)
    table = markdown(result)
    print("\n" + table)
    if not args.quick:
        write(result, stem)
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _diffusers_version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")
    raise SystemExit(main())
