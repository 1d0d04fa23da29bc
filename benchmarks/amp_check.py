"""Train the 28x28 preset for a fixed number of steps in fp32 and in bf16 autocast on one device;
report images/s and whether the two loss curves agree.

    python benchmarks/amp_check.py --steps 1000 --batch-size 128 --out runs/amp_check          # GPU
    python benchmarks/amp_check.py --device cpu --steps 400 --batch-size 64 --out runs/amp_cpu  # CPU

The two runs share the seed, so they see the same data, timesteps and noise; only the
arithmetic differs (and with it the attention kernel the runtime policy picks for each
precision). Writes amp_check.md and amp_check.json into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from ddpm.cli import main as ddpm_main
from ddpm.nn.policy import describe_machine


def read_metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("loss") is not None]


def smooth(values: list[float], k: int = 10) -> list[float]:
    return [statistics.fmean(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data", default="mnist5k")
    p.add_argument("--out", type=Path, default=Path("runs/amp_check"))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    results = {}
    for amp in ("none", "bf16"):
        run = args.out / amp
        code = ddpm_main(["train", "--data", args.data, "--preset", "mnist-28", "--steps", str(args.steps),
                          "--batch-size", str(args.batch_size), "--lr", "2e-3", "--warmup-steps", "100",
                          "--device", args.device, "--amp", amp, "--out", str(run), "--log-every", "10",
                          "--checkpoint-every", str(args.steps), "--sample-every", "0", "--no-hflip",
                          "--set", "train.tensorboard=false"])
        if code:
            raise SystemExit(f"training with amp={amp} failed ({code})")
        rows = read_metrics(run)
        speeds = [r["images_per_sec"] for r in rows[len(rows) // 5 :] if r.get("images_per_sec")]
        results[amp] = {"steps": [r["step"] for r in rows], "loss": [r["loss"] for r in rows],
                        "images_per_sec": statistics.median(speeds)}
    a, b = smooth(results["none"]["loss"]), smooth(results["bf16"]["loss"])
    half = len(a) // 2
    late_a, late_b = statistics.fmean(a[half:]), statistics.fmean(b[half:])
    max_rel = max(abs(x - y) / x for x, y in zip(a[half:], b[half:], strict=True))
    summary = {
        "device": describe_machine(args.device), "torch": torch.__version__, "steps": args.steps,
        "batch_size": args.batch_size,
        "fp32_images_per_sec": round(results["none"]["images_per_sec"]),
        "bf16_images_per_sec": round(results["bf16"]["images_per_sec"]),
        "fp32_mean_loss_second_half": round(late_a, 5), "bf16_mean_loss_second_half": round(late_b, 5),
        "max_relative_gap_smoothed_second_half": round(max_rel, 4),
        "curves": {k: {"step": v["steps"], "loss": v["loss"]} for k, v in results.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "amp_check.json").write_text(json.dumps(summary, indent=1))
    table = [
        "| precision | images/s | mean loss, 2nd half |", "| --- | --- | --- |",
        f"| fp32 | {summary['fp32_images_per_sec']} | {late_a:.4f} |",
        f"| bf16 autocast | {summary['bf16_images_per_sec']} | {late_b:.4f} |",
        "", f"largest relative gap between the smoothed curves (2nd half): {max_rel:.2%}",
        f"{summary['device']}, torch {summary['torch']}, {args.steps} steps of batch {args.batch_size}",
    ]
    (args.out / "amp_check.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
