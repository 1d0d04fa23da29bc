"""Speed of ``ddpm.nn.UNet`` against diffusers' ``UNet2DModel`` of the *same* architecture, on this CPU.

For ``mnist-28`` and ``ddpm-cifar10`` it builds ours and the identical diffusers model (same
parameter count, checked) and times, in one process:

* a training step: forward, eps-MSE, backward, AdamW step (fused for both), grads set to None;
* a sampling step: one forward under ``torch.inference_mode``;

for both memory layouts (NCHW and NHWC) of both libraries, in float32 and, where asked, under
the same bfloat16 autocast for both. Ours runs with its runtime policy's kernels for this CPU
and precision (``ddpm.nn.policy``: attention and upsampling kernels); its layout is the one
timed. All variants of one precision are timed in turn, round after round, so drift of a shared
machine hits them alike; each table gives medians over the rounds (the first is a warm-up), and
the ratios compare each library's *best* layout, with the spread of the per-round ratios.

    python benchmarks/speed.py --threads 2               # full run, writes benchmarks/results/speed.md
    python benchmarks/speed.py --threads 2 --quick       # smoke run: few rounds, small batches
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddpm.nn import UNet, param_count, unet_preset
from ddpm.nn.policy import describe_machine, detect_machine, resolve_policy
from ddpm.nn.pretrained import config_to_diffusers

TRAIN_BATCH = {"mnist-28": 64, "ddpm-cifar10": 8}  # mnist-28: the demo's batch
LAYOUTS = {"NCHW": "contiguous", "NHWC": "channels_last"}


@dataclass
class Variant:
    """One library in one layout and precision, ready to step."""

    library: str  # "ours" or "diffusers"
    layout: str  # "NCHW" or "NHWC"
    model: torch.nn.Module
    amp: str  # "none" or "bf16"
    kernels: str = ""  # ours: the policy's attention / upsample kernels
    times: dict[str, list[float]] = field(default_factory=lambda: {"train": [], "sample": []})

    @property
    def name(self) -> str:
        return f"{self.library} {self.layout}"

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp == "bf16"):
            out = self.model(x, t)
        return (out if torch.is_tensor(out) else out.sample).float()


def build(library: str, layout: str, preset: str, amp: str) -> Variant:
    config = unet_preset(preset)
    torch.manual_seed(0)
    if library == "ours":
        policy = resolve_policy("cpu", memory_format=LAYOUTS[layout], amp=amp)  # type: ignore[arg-type]
        model = policy.prepare(UNet(config))
        return Variant(library, layout, model, amp, kernels=f"{policy.attention} attention, {policy.upsample} upsample")
    from diffusers import UNet2DModel

    model = UNet2DModel(**config_to_diffusers(config))
    if layout == "NHWC":
        model = model.to(memory_format=torch.channels_last)
    return Variant(library, layout, model, amp)


def inputs(preset: str, batch: int, layout: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = unet_preset(preset)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    if layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (batch,), generator=g), torch.randn(x.shape, generator=g)


def train_step_fn(v: Variant, preset: str, batch: int) -> Callable[[], None]:
    x, t, eps = inputs(preset, batch, v.layout)
    opt = torch.optim.AdamW(v.model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        v.model.train()
        F.mse_loss(v.forward(x, t), eps).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sample_step_fn(v: Variant, preset: str, batch: int) -> Callable[[], None]:
    x, t, _ = inputs(preset, batch, v.layout)

    def step() -> None:
        v.model.eval()
        with torch.inference_mode():
            v.forward(x, t)

    return step


def gflop_per_image(model: torch.nn.Module, preset: str, batch: int) -> float:
    """Forward GFLOP per image at ``batch`` (ours' sub-pixel upsampling is used from a batch size on)."""
    x, t, _ = inputs(preset, batch, "NCHW")
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.eval()(x, t)
    return counter.get_total_flops() / 1e9 / batch


def time_rounds(variants: list[Variant], task: str, steps: dict[str, Callable[[], None]], rounds: int) -> None:
    """``rounds + 1`` rounds, every variant once per round; the first round is a warm-up and dropped."""
    for r in range(rounds + 1):
        for v in variants:
            start = time.perf_counter()
            steps[v.name]()
            if r:
                v.times[task].append(time.perf_counter() - start)


def bench(preset: str, amp: str, args: argparse.Namespace) -> dict:
    variants = [build(lib, layout, preset, amp) for lib in ("ours", "diffusers") for layout in LAYOUTS]
    params = {v.name: param_count(v.model) for v in variants}
    if len(set(params.values())) != 1:
        raise SystemExit(f"{preset}: architectures differ ({params})")
    result = {"preset": preset, "amp": amp, "params": next(iter(params.values())), "variants": variants,
              "train_batch": args.train_batch or TRAIN_BATCH[preset], "sample_batch": args.sample_batch}
    if amp == "none":  # the counter sees ours' sub-pixel upsampling: fewer FLOPs for the same function
        result["gflop"] = {lib: gflop_per_image(next(v.model for v in variants if v.library == lib), preset,
                                                args.sample_batch) for lib in ("ours", "diffusers")}
    for task, make, batch in (("train", train_step_fn, result["train_batch"]),
                              ("sample", sample_step_fn, args.sample_batch)):
        steps = {v.name: make(v, preset, batch) for v in variants}
        time_rounds(variants, task, steps, args.rounds)
    return result


def best(variants: list[Variant], library: str, task: str) -> Variant:
    return min((v for v in variants if v.library == library), key=lambda v: statistics.median(v.times[task]))


def ratio_spread(a: Variant, b: Variant, task: str) -> tuple[float, float, float]:
    """Median time ratio a/b, and the range of the per-round ratios."""
    per_round = [x / y for x, y in zip(a.times[task], b.times[task], strict=True)]
    return statistics.median(a.times[task]) / statistics.median(b.times[task]), min(per_round), max(per_round)


def markdown(results: list[dict], args: argparse.Namespace, elapsed: float) -> str:
    machine = detect_machine("cpu")
    lines = [
        "# Speed: ddpm.nn.UNet vs diffusers UNet2DModel (identical architectures), CPU",
        "",
        f"Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        f"Machine: {machine.describe()}; torch {torch.__version__}. Fused AdamW for both; {args.rounds} "
        f"timed rounds per variant after a warm-up round, all variants of one precision in turn; medians. "
        f"Run took {elapsed:.0f} s.",
        "",
        "| preset | precision | variant | train ms/step (batch) | sample ms/step (batch) | ours' kernels |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in results:
        for v in r["variants"]:
            lines.append(
                f"| {r['preset']} | {r['amp'] if r['amp'] != 'none' else 'fp32'} | {v.name} | "
                f"{1e3 * statistics.median(v.times['train']):.1f} ({r['train_batch']}) | "
                f"{1e3 * statistics.median(v.times['sample']):.1f} ({r['sample_batch']}) | {v.kernels or '-'} |"
            )
    lines += [
        "",
        "Each library on its best layout (the one with the lower median). Ratios are ours' time / diffusers' "
        "time (targets: training <= 0.91, sampling <= 0.75); in brackets the range of the per-round ratios "
        "of those two variants.",
        "",
        "| preset | precision | best layouts train (ours / diffusers) | train time ratio "
        "| best layouts sample | sample time ratio |",
        "| --- | --- | --- | ---: | --- | ---: |",
    ]
    for r in results:
        cells = []
        for task in ("train", "sample"):
            ours, theirs = best(r["variants"], "ours", task), best(r["variants"], "diffusers", task)
            mid, lo, hi = ratio_spread(ours, theirs, task)
            cells += [f"{ours.layout} / {theirs.layout}", f"{mid:.3f} [{lo:.2f}-{hi:.2f}]"]
        precision = r["amp"] if r["amp"] != "none" else "fp32"
        lines.append(f"| {r['preset']} | {precision} | " + " | ".join(cells) + " |")
    lines += ["", f"Forward GFLOP per image at batch {args.sample_batch} (ours' sub-pixel upsampling computes the "
              "same function with fewer multiply-adds):", "",
              "| preset | params | forward GFLOP/image ours / diffusers |",
              "| --- | ---: | ---: |"]
    for r in results:
        if "gflop" in r:
            lines.append(f"| {r['preset']} | {r['params'] / 1e6:.2f}M | "
                         f"{r['gflop']['ours']:.3f} / {r['gflop']['diffusers']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 rounds, sampling batch 8, train batches 8 and 2")
    p.add_argument("--presets", nargs="+", default=list(TRAIN_BATCH), choices=list(TRAIN_BATCH))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="bf16: both libraries under the same torch.autocast(bfloat16)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 6, quick 2)")
    p.add_argument("--train-batch", type=int, default=None, help="override the per-preset training batch")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default 64, quick 8)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speed.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (2 if args.quick else 6)
    args.sample_batch = args.sample_batch or (8 if args.quick else 64)
    if args.quick and args.train_batch is None:
        TRAIN_BATCH.update({"mnist-28": 8, "ddpm-cifar10": 2})
    print(f"machine: {describe_machine('cpu')}; torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    results = []
    for preset in args.presets:
        for precision in args.precisions:
            print(f"benchmarking {preset} {precision} ...", flush=True)
            results.append(bench(preset, "none" if precision == "fp32" else "bf16", args))
    text = markdown(results, args, time.perf_counter() - start)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
