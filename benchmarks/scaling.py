"""Images/s of `ddpm train` with 1 and 2 processes (torchrun, gloo on CPU; NCCL on GPUs).

    python benchmarks/scaling.py --steps 60 --batch-size 64

Each configuration trains the 28x28 preset on built-in MNIST-5k with the same global batch; the
rate is the median of the logged images/s after the first fifth of the steps. On N GPUs run
`torchrun --nproc_per_node N -m ddpm train ... --device cuda` instead (see the README).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(nproc: int, steps: int, batch: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ddpm", "train", "--data", "mnist5k", "--preset", "mnist-28", "--steps", str(steps),
           "--batch-size", str(batch), "--device", "cpu", "--out", str(out), "--log-every", "5",
           "--checkpoint-every", str(steps), "--sample-every", "0", "--warmup-steps", "10", "--no-hflip",
           "--set", "train.tensorboard=false"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    speeds = [r["images_per_sec"] for r in rows if r.get("images_per_sec")]
    return {"processes": nproc, "threads_per_process": env["OMP_NUM_THREADS"],
            "images_per_sec": round(statistics.median(speeds[len(speeds) // 5 :]), 1), "wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--procs", default="1,2")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(int(n), args.steps, args.batch_size, Path(tmp) / f"p{n}") for n in args.procs.split(",")]
    base = results[0]["images_per_sec"]
    print("| processes | threads each | images/s | speed-up | wall s |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['processes']} | {r['threads_per_process']} | {r['images_per_sec']} | "
              f"{r['images_per_sec'] / base:.2f}x | {r['wall_s']} |")


if __name__ == "__main__":
    main()
