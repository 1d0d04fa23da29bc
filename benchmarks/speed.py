"""Speed of ``ddpm.nn.UNet`` against diffusers' ``UNet2DModel`` on the *same* architecture.

For ``ddpm-cifar10`` (35.7M parameters, the paper's CIFAR-10 model) and ``mnist-28`` it builds
ours and the identical diffusers model (same parameter count, checked), then reports:

* parameters, forward GFLOP per image (``torch.utils.flop_counter.FlopCounterMode``);
* training throughput in images/s: forward, eps-MSE, backward, AdamW step, grads set to None;
  the optimizer is the same for both models (``--optimizer``);
* sampling-step latency: one forward at ``--sample-batch`` under ``torch.inference_mode``;
* peak memory: ``ru_maxrss`` of a fresh subprocess per model and task (build, two steps), and
  the same minus the RSS right after building the model (activations, grads, optimizer state).

Ours and theirs are timed alternately, repeat after repeat, so machine drift (this machine is
shared) hits both alike; the tables give medians over the repeats (the first is a warm-up).

    python benchmarks/speed.py                # full run, writes benchmarks/results/speed.md
    python benchmarks/speed.py --quick        # a fast smoke run (fewer repeats, smaller batches)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddpm.nn import UNet, param_count, unet_preset
from ddpm.nn.pretrained import config_to_diffusers

CONFIGS = {"ddpm-cifar10": {"train_batch": 8}, "mnist-28": {"train_batch": 32}}


def build(which: str, preset: str) -> torch.nn.Module:
    config = unet_preset(preset)
    if which == "ours":
        return UNet(config)
    if which == "ours-bf16":
        return UNet(config.replace(autocast="bfloat16"))
    from diffusers import UNet2DModel

    return UNet2DModel(**config_to_diffusers(config))


def forward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = model(x, t)
    return out if torch.is_tensor(out) else out.sample


def make_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    extra = {"fused": True} if kind == "fused" else {"foreach": True} if kind == "foreach" else {}
    return torch.optim.AdamW(model.parameters(), lr=1e-4, **extra)


def train_step(model, opt, x, t, eps) -> None:
    loss = F.mse_loss(forward(model, x, t), eps)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sample_step(model, x, t) -> None:
    with torch.inference_mode():
        forward(model, x, t)


def inputs(preset: str, batch: int, seed: int = 0):
    cfg = unet_preset(preset)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    return x, torch.randint(0, 1000, (batch,), generator=g), torch.randn(x.shape, generator=g)


def gflop_per_image(model: torch.nn.Module, preset: str) -> float:
    x, t, _ = inputs(preset, 1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        forward(model.eval(), x, t)
    return counter.get_total_flops() / 1e9


def proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(which: str, preset: str, task: str, batch: int, optimizer: str) -> None:
    """Run in a fresh interpreter: build, reset the peak RSS, two steps, print the peak as JSON.

    Both models' processes import diffusers, so their baselines match. Linux only: the peak
    (VmHWM) is reset through /proc/self/clear_refs once the model and inputs exist.
    """
    import diffusers  # noqa: F401  (same imports, same baseline, for ours and theirs)

    torch.manual_seed(0)
    model = build(which, preset)
    x, t, eps = inputs(preset, batch)
    opt = make_optimizer(model, optimizer) if task == "train" else None
    model.train(task == "train")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = proc_status_mib("VmRSS")
    for _ in range(2):
        if opt is not None:
            train_step(model, opt, x, t, eps)
        else:
            sample_step(model, x, t)
    peak = proc_status_mib("VmHWM")
    print(json.dumps({"peak_mib": peak, "delta_mib": peak - base}))


def peak_memory(which: str, preset: str, task: str, batch: int, optimizer: str) -> dict:
    cmd = [sys.executable, __file__, "--memory-child", which, preset, task, str(batch), optimizer]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def time_interleaved(steps: dict, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats + 1):  # +1: the first round is a warm-up and is dropped
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {k: v[1:] for k, v in times.items()}


def bench_preset(preset: str, args) -> dict:
    train_batch = args.train_batch or CONFIGS[preset]["train_batch"]
    torch.manual_seed(0)
    names = ("ours", "diffusers", "ours-bf16") if args.bf16 else ("ours", "diffusers")
    models = {w: build(w, preset) for w in names}
    result: dict = {"preset": preset, "train_batch": train_batch, "sample_batch": args.sample_batch}
    params = {w: param_count(m) for w, m in models.items()}  # ours-bf16 has the same weights as ours
    if len(set(params.values())) != 1:
        raise SystemExit(f"{preset}: architectures differ ({params})")
    result["params"] = params
    result["gflop"] = {w: gflop_per_image(m, preset) for w, m in models.items()}

    x, t, eps = inputs(preset, train_batch)
    opts = {w: make_optimizer(m, args.optimizer) for w, m in models.items()}
    for m in models.values():
        m.train()
    train = time_interleaved(
        {w: (lambda m=m, o=opts[w]: train_step(m, o, x, t, eps)) for w, m in models.items()}, args.repeats
    )
    del opts
    xs, ts, _ = inputs(preset, args.sample_batch)
    for m in models.values():
        m.eval()
    sample = time_interleaved(
        {w: (lambda m=m: sample_step(m, xs, ts)) for w, m in models.items()}, args.repeats
    )
    result["train_img_s"] = {w: train_batch / statistics.median(v) for w, v in train.items()}
    result["train_img_s_best"] = {w: train_batch / min(v) for w, v in train.items()}
    result["sample_s"] = {w: statistics.median(v) for w, v in sample.items()}
    result["sample_s_best"] = {w: min(v) for w, v in sample.items()}
    del models
    if not args.no_memory:
        result["memory"] = {
            task: {w: peak_memory(w, preset, task, b, args.optimizer) for w in ("ours", "diffusers")}
            for task, b in (("train", train_batch), ("sample", args.sample_batch))
        }
    return result


def markdown(results: list[dict], args, elapsed: float) -> str:
    lines = [
        "# Speed: ddpm.nn.UNet vs diffusers UNet2DModel (identical architectures)",
        "",
        f"Command: `python benchmarks/speed.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU; "
        f"AdamW optimizer for both: `{args.optimizer}`; {args.repeats} timed repeats (median; best in "
        f"brackets), ours and diffusers alternating; run took {elapsed:.0f} s.",
        "",
        "| model | params | fwd GFLOP/img | train img/s (batch) | sample step s (batch) "
        "| peak RSS MiB train / sample | step memory MiB train / sample |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        for w in r["params"]:
            mem = r.get("memory") if w != "ours-bf16" else None
            mem_txt = ("-", "-")
            if mem:
                mem_txt = tuple(
                    f"{mem['train'][w][k]:.0f} / {mem['sample'][w][k]:.0f}" for k in ("peak_mib", "delta_mib")
                )
            lines.append(
                f"| {r['preset']} {w} | {r['params'][w] / 1e6:.2f}M | {r['gflop'][w]:.3f} | "
                f"{r['train_img_s'][w]:.2f} [{r['train_img_s_best'][w]:.2f}] ({r['train_batch']}) | "
                f"{r['sample_s'][w]:.3f} [{r['sample_s_best'][w]:.3f}] ({r['sample_batch']}) | "
                f"{mem_txt[0]} | {mem_txt[1]} |"
            )
    lines += [
        "",
        "| preset | train throughput ours/diffusers | sample latency ours/diffusers "
        "| step memory ours/diffusers train / sample |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in results:
        tr = r["train_img_s"]["ours"] / r["train_img_s"]["diffusers"]
        trb = r["train_img_s_best"]["ours"] / r["train_img_s_best"]["diffusers"]
        sa = r["sample_s"]["ours"] / r["sample_s"]["diffusers"]
        sab = r["sample_s_best"]["ours"] / r["sample_s_best"]["diffusers"]
        mem = r.get("memory")
        mem_txt = "-"
        if mem:
            mem_txt = " / ".join(
                f"{mem[k]['ours']['delta_mib'] / mem[k]['diffusers']['delta_mib']:.2f}"
                for k in ("train", "sample")
            )
        lines.append(f"| {r['preset']} | {tr:.2f}x [{trb:.2f}x] | {sa:.2f}x [{sab:.2f}x] | {mem_txt} |")
        if "ours-bf16" in r["params"]:
            tr = r["train_img_s"]["ours-bf16"] / r["train_img_s"]["diffusers"]
            sa = r["sample_s"]["ours-bf16"] / r["sample_s"]["diffusers"]
            label = f"{r['preset']}, ours in bf16 autocast vs diffusers fp32"
            lines.append(f"| {label} | {tr:.2f}x | {sa:.2f}x | - |")
    lines += [
        "",
        "Memory: a fresh process per model and task imports torch and diffusers, builds the model, inputs "
        "(and optimizer), resets the kernel's peak-RSS counter (VmHWM, via /proc/self/clear_refs) and runs "
        "two steps. 'Peak RSS' is VmHWM over those steps; 'step memory' is that peak minus the RSS just "
        "before them (activations, gradients, optimizer state, allocator slack). The ratio uses step memory.",
        "Ratios use medians; [best-of-repeats ratios] in brackets.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--memory-child":
        which, preset, task, batch, optimizer = argv[1:6]
        memory_child(which, preset, task, int(batch), optimizer)
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="2 repeats, sampling batch 16, CIFAR-10 train batch 4"
    )
    p.add_argument("--presets", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per model (default 5, quick 2)")
    p.add_argument("--train-batch", type=int, default=None, help="override the per-preset training batch")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default 64, quick 16)")
    p.add_argument("--optimizer", choices=["fused", "foreach", "default"], default="fused")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--bf16", action="store_true", help="also time ours in bf16 autocast (not like for like)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speed.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.sample_batch = args.sample_batch or (16 if args.quick else 64)
    if args.quick and args.train_batch is None:
        CONFIGS["ddpm-cifar10"]["train_batch"] = 4
    start = time.perf_counter()
    results = []
    for preset in args.presets:
        print(f"benchmarking {preset} ...", flush=True)
        results.append(bench_preset(preset, args))
    text = markdown(results, args, time.perf_counter() - start)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
