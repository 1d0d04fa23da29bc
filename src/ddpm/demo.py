"""The demo: train on built-in MNIST on the CPU, then sample, animate and measure, in one folder.

``demo_config`` is the recipe (measured in the README, "The demo recipe"); :func:`run_demo` runs it
and writes ``samples.npz``, ``samples.png``, the reverse and forward chains, the loss curve and the
eval card beside the run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ddpm import viz
from ddpm.build import build_dataset
from ddpm.config import RunConfig, apply_overrides
from ddpm.evaluate import balanced_labels, evaluate, write_eval_card
from ddpm.outputs import save_samples
from ddpm.pipeline import Pipeline, load
from ddpm.train.fit import fit

# The demo's samplers, 10 network evaluations each: unconditional, SDE-DPM-Solver++(2M), better than 50
# ancestral steps over five seeds (benchmarks/results/samplers-demo-seeds.md); under guidance its fresh
# noise hurt, so the conditional demo takes UniPC (benchmarks/results/guided-samplers-demo-cond.md).
DEMO_SAMPLERS = {False: "dpm++2m-sde", True: "unipc"}
DEMO_SAMPLE_STEPS = 10
# Categorical diffusion has one sampler, its ancestral chain, here respaced to a tenth of its steps; on the
# categorical demo model 50, 100 and 250 steps gave Frechet distances within 2 of each other, one seed
# (benchmarks/results/demo-categorical.md)
CATEGORICAL_SAMPLE_STEPS = 100
DEMO_PROCESSES = ("gaussian", "categorical")

# The diffusion of each demo: Gaussian: v-prediction with min-SNR weighting and the cosine schedule (eps-
# prediction at this budget gave speckled blobs, benchmarks/results/demo-recipe.md); categorical: D3PM-Gauss
# over the 256 levels with the hybrid loss (Austin et al.'s best bound on CIFAR-10), K logits per pixel.
DEMO_DIFFUSION: dict[str, dict[str, Any]] = {
    "gaussian": {"diffusion.schedule": "cosine", "diffusion.prediction": "v", "diffusion.loss_weighting": "min-snr"},
    "categorical": {"diffusion.transition": "gaussian", "diffusion.num_states": 256, "diffusion.head": "logits",
                    "diffusion.hybrid_weight": 0.001},
}


def demo_sampling(process: str, class_cond: bool) -> tuple[str, int]:
    """The demo's default sampler and its number of steps (network evaluations)."""
    if process == "categorical":
        return "ancestral", CATEGORICAL_SAMPLE_STEPS
    return DEMO_SAMPLERS[class_cond], DEMO_SAMPLE_STEPS


def demo_config(out_dir: str, steps: int, seed: int, *, class_cond: bool = False,
                process: str = "gaussian") -> RunConfig:
    """The built-in MNIST recipe tuned for quality per CPU minute (see the README for the measurements).

    ``class_cond``: condition on the digit, with 10% of the labels dropped for classifier-free guidance.
    ``process``: ``"gaussian"`` or ``"categorical"``, the same network, data and training budget.
    """
    return apply_overrides(RunConfig(), {
        "model.class_cond": class_cond, "model.cond_drop": 0.1,
        "data.dataset": "mnist5k", "data.hflip": False,
        "model.preset": "mnist-28",
        "diffusion.process": process, "diffusion.timesteps": 1000, **DEMO_DIFFUSION[process],
        "optim.lr": 2e-3, "optim.warmup_steps": 100, "optim.grad_clip": 1.0, "optim.weight_decay": 0.0,
        "ema.decay": 0.999, "ema.warmup": "power", "ema.power": 0.75,
        "train.steps": steps, "train.batch_size": 64, "train.seed": seed, "train.device": "cpu",
        "train.checkpoint_every": 250, "train.keep_last": 2, "train.log_every": 25, "train.sample_every": 0,
        "train.out_dir": out_dir, "train.tensorboard": False,
    })


@dataclass
class DemoResult:
    card: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def metrics_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of ``run_dir/metrics.jsonl`` (none when it is missing)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def training_speed(run_dir: Path) -> dict[str, Any]:
    """Median training images/s of the run and the machine and runtime choices it ran with (from metrics.jsonl)."""
    rows = metrics_rows(run_dir)
    speeds = sorted(r["images_per_sec"] for r in rows if r.get("images_per_sec"))
    runtime: dict[str, Any] = next((r["runtime"] for r in reversed(rows) if "runtime" in r), {})
    return {"images_per_sec": round(speeds[len(speeds) // 2], 1) if speeds else None,
            "machine": runtime.get("machine"), "threads": runtime.get("threads"), "amp": runtime.get("amp"),
            "memory_format": runtime.get("memory_format")}


def loss_curve(run_dir: Path, out: Path) -> Path | None:
    """A plot of ``metrics.jsonl``'s training loss, or None when there is nothing to plot."""
    rows = [r for r in metrics_rows(run_dir) if r.get("loss") is not None]
    if not rows:
        return None
    return viz.save_loss_curve([r["step"] for r in rows], [r["loss"] for r in rows], out, title="training loss")


def forward_strip(pipe: Pipeline, path: Path) -> Path:
    """Four held-out digits dissolving into static under the forward chain."""
    test = build_dataset(pipe.config.data, "test")
    x0 = test.get_batch(torch.arange(4))
    T = pipe.process.num_timesteps
    ts = [0, T // 50, T // 10, T // 5, 2 * T // 5, 3 * T // 5, 4 * T // 5, T - 1]
    frames = viz.forward_chain(pipe.process, x0, ts)
    return viz.save_strip(frames, path, labels=["x_0"] + [f"t={t + 1}" for t in ts])


def run_demo(
    out: str | Path, *, steps: int = 1500, num_samples: int = 500, sampler: str | None = None,
    sample_steps: int | None = None, nll_images: int = 100, seed: int = 0, resume: bool = False,
    class_cond: bool = False, guidance: float = 2.0,
    guidance_scales: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0), process: str = "gaussian",
) -> DemoResult:
    """Train the demo recipe into ``out/run``, then sample, animate and measure into ``out``.

    Without ``resume`` an earlier demo run in ``out/run`` is replaced (the demo is a fixed recipe).

    ``class_cond``: a digit-conditional model; its samples are balanced over the digits at
    ``guidance``, the grid has one row per digit, and the eval card adds label accuracy and the
    guidance sweep ``guidance_scales``. ``process``: the Gaussian demo or the categorical one (D3PM).
    """
    out = Path(out)
    t_start = time.perf_counter()
    default_sampler, default_steps = demo_sampling(process, class_cond)
    sampler, sample_steps = sampler or default_sampler, sample_steps or default_steps
    print(f"ddpm demo: training {process} diffusion on built-in MNIST-5k for {steps} steps (CPU), then sampling "
          f"with {sampler} at {sample_steps} network evaluations and measuring", flush=True)
    if process == "gaussian" and (sampler, sample_steps) == (default_sampler, default_steps):
        print(f"  ({sampler} at {sample_steps} evaluations, measured against 50 ancestral steps on this recipe: "
              "a lower Frechet distance; README \"Samplers\" and \"Conditional generation\")", flush=True)
    fit(demo_config(str(out / "run"), steps, seed, class_cond=class_cond, process=process),
        resume="auto" if resume else None, overwrite=not resume)
    train_seconds = time.perf_counter() - t_start
    pipe = load(out / "run", weights="ema", device="cpu")
    files: dict[str, Path] = {}

    num_classes = pipe.num_classes if class_cond else None
    labels = balanced_labels(num_samples, num_classes) if num_classes else None
    w = guidance if labels is not None else 1.0
    t0 = time.perf_counter()
    x = pipe.sample(num_samples, sampler=sampler, steps=sample_steps, seed=seed, batch_size=100, classes=labels,
                    guidance=w)
    sample_seconds = time.perf_counter() - t0
    trajectory = pipe.reverse_chain(36, sampler=sampler, steps=sample_steps, seed=seed, frames=sample_steps + 1,
                                    classes=balanced_labels(36, num_classes) if num_classes else None,
                                    guidance=w)
    files["samples (uint8 [N, 28, 28, 1], k/127.5 - 1)"] = save_samples(x, out, ["npz"], is_image=True)[0]
    if labels is None:
        files["sample grid"] = viz.save_grid(x[:100], out / "samples.png", nrow=10)
    else:  # one row per digit: sample i is of digit i mod 10, so row c holds samples c, c + 10, ...
        order = torch.cat([torch.nonzero(labels == c).flatten()[:10] for c in range(pipe.num_classes or 0)])
        files["sample grid, one row per digit"] = viz.save_grid(x[order], out / "samples.png", nrow=10)
    files["reverse chain animation"] = viz.save_chain_animation(trajectory, out / "reverse_chain.gif", nrow=6)
    files["reverse chain strip"] = viz.save_strip(trajectory[:: max(1, len(trajectory) // 8)][:, :6],
                                                  out / "reverse_chain.png")
    curve = loss_curve(out / "run", out / "loss.png")
    if curve is not None:
        files["loss curve"] = curve
    files["forward chain"] = forward_strip(pipe, out / "forward_chain.png")

    card = evaluate(pipe, num=num_samples, sampler=sampler, steps=sample_steps, seed=seed, batch_size=100,
                    nll_images=nll_images, nll_terms=40, samples=x, guidance=w,
                    guidance_scales=guidance_scales if labels is not None else ())
    card["train_seconds"] = round(train_seconds, 1)
    card["training_speed"] = training_speed(out / "run")
    card["sample_seconds"] = round(sample_seconds, 1)
    card["total_seconds"] = round(time.perf_counter() - t_start, 1)
    files.update(write_eval_card(card, out))
    return DemoResult(card, files)
