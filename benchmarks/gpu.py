"""GPU speed of the real presets, ours against diffusers' ``UNet2DModel`` of the same architecture, in one run.

What it measures (each section is skipped, and says so, once ``--time-limit`` is spent):

1. ``ddpm-cifar10`` training, batch 128, bf16 autocast with float32 master weights, fused AdamW:
   ours under the CUDA policy (NCHW, PyTorch's fused attention) against diffusers under the same
   autocast and optimizer; images/s and MFU. Target: ours >= 1.3x diffusers.
2. ``ddpm-cifar10`` sampling, batch 256, one network evaluation under ``torch.inference_mode``:
   images/s per evaluation, eager and replayed from captured CUDA graphs
   (``ddpm.nn.policy.CudaGraphForward``, both libraries), and MFU. Target: ours >= 1.5x.
3. ``ddpm-celebahq256`` training at batch 64 in bf16: peak memory (must stay under 80 GiB to fit
   an 80 GB GPU; if it does not, again with gradient checkpointing), images/s and MFU; diffusers
   alike, for the memory comparison.
4. Variants of ours for the policy's CUDA rule: NHWC, sub-pixel upsampling, each attention kernel.
5. ``torch.compile`` of the CIFAR-10 training step: compile seconds against the seconds it saves
   per step, and whether it pays back within 1% of a default run (8000 of 800k steps).
6. ``torch.compile(mode="reduce-overhead")`` of the sampling step, the same way.

MFU is achieved / peak dense bf16 FLOP/s, with the FLOPs of the standard network (diffusers'
count from ``FlopCounterMode``; training = forward + backward as counted), so a cheaper kernel
of ours shows as more images/s, not as more FLOPs. The peak comes from ``--peak-tflops`` or a
table of datasheet values by GPU name.

On a GPU machine (diffusers is not in its image: carry its wheel, see benchmarks/README.md):

    python3 benchmarks/gpu.py --out-dir $OUT                 # about 6-9 minutes on an H200
    python benchmarks/gpu.py --smoke                        # CPU, tiny batches: proves the script runs

Writes ``gpu.md`` and ``gpu.json`` into ``--out-dir`` after every section, so a cut-short run
keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddpm.nn import UNet, unet_preset
from ddpm.nn.policy import CudaGraphForward, RuntimePolicy, describe_machine, resolve_policy
from ddpm.nn.pretrained import config_to_diffusers

# Dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), in TFLOP/s.
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0, "L4": 121.0}
DEFAULT_RUN_STEPS = 800_000  # TrainConfig.steps: "pays within 1%" means within 8000 steps
GIB = 2**30

Step = Callable[[], None]


class Bench:
    """Settings, the device, the clock and the results written after each section."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.smoke = args.smoke or self.device.type == "cpu"
        self.start = time.perf_counter()
        self.machine = describe_machine(self.device)
        name = torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        self.peak_flops = peak * 1e12 if peak else None
        self.results: dict[str, Any] = {
            "machine": self.machine, "torch": torch.__version__, "peak_bf16_tflops": peak,
            "smoke": self.smoke, "command": " ".join(sys.argv), "sections": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time_steps(self, steps: dict[str, Step], n: int, rounds: int) -> dict[str, float]:
        """Seconds per call of each step: the median over ``rounds`` rounds of ``n`` calls, steps in turn."""
        times: dict[str, list[float]] = {k: [] for k in steps}
        for step in steps.values():  # warm-up: kernels chosen, caches filled
            for _ in range(1 if self.smoke else 3):
                step()
        for _ in range(rounds):
            for name, step in steps.items():
                self.sync()
                t0 = time.perf_counter()
                for _ in range(n):
                    step()
                self.sync()
                times[name].append((time.perf_counter() - t0) / n)
        return {k: statistics.median(v) for k, v in times.items()}

    def mfu(self, flops_per_second: float) -> float | None:
        return flops_per_second / self.peak_flops if self.peak_flops else None

    def save(self, section: str, data: dict[str, Any]) -> None:
        data["finished_at_s"] = round(self.elapsed(), 1)
        self.results["sections"][section] = data
        out = self.args.out_dir
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.json").write_text(json.dumps(self.results, indent=2, default=str) + "\n")
        (out / "gpu.md").write_text(markdown(self.results))
        print(f"[{self.elapsed():6.0f} s] {section}: {json.dumps(data, default=str)}", flush=True)


# ------------------------------------------------------------------------------------ models
def ours(preset: str, bench: Bench, **policy: Any) -> tuple[torch.nn.Module, torch.nn.Module, RuntimePolicy]:
    """(raw model, the model to call, policy): ours under the device policy, bf16 unless told otherwise."""
    torch.manual_seed(0)
    config = unet_preset(preset, use_checkpoint=policy.pop("use_checkpoint", False))
    pol = resolve_policy(bench.device, **{"amp": "bf16", **policy})
    model = pol.prepare(UNet(config))
    return model, pol.wrap(model), pol


class DiffusersForward(torch.nn.Module):
    """diffusers' UNet2DModel called like ours, under the same autocast, returning float32."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.model, self.device_type, self.dtype = model, device.type, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None,
                            cache_enabled=False):  # as ours: CUDA graph capture needs the casts in the graph
            return self.model(x, t).sample.float()


def theirs(preset: str, bench: Bench, *, channels_last: bool = False, use_checkpoint: bool = False):
    """(raw model, the model to call, None): diffusers' network under the same bf16 autocast."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(**config_to_diffusers(unet_preset(preset)))
    if use_checkpoint:
        model.enable_gradient_checkpointing()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(bench.device, memory_format=fmt)
    return model, DiffusersForward(model, bench.device, torch.bfloat16), None


def inputs(preset: str, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    cfg = unet_preset(preset)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x.to(device), t.to(device), torch.randn(x.shape, generator=g).to(device)


def train_step(model: torch.nn.Module, net: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> Step:
    x, t, eps = batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step() -> None:
        F.mse_loss(net(x, t), eps).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sample_step(model: torch.nn.Module, net: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> Step:
    x, t, _ = batch
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            net(x, t)

    return step


def standard_flops(preset: str, bench: Bench, *, train: bool) -> float:
    """FLOPs per image of the standard network (diffusers' UNet2DModel) for one forward, or forward + backward."""
    from diffusers import UNet2DModel

    model = UNet2DModel(**config_to_diffusers(unet_preset(preset))).to(bench.device)
    x, t, eps = inputs(preset, 1, bench.device)
    with FlopCounterMode(display=False) as counter:
        if train:
            F.mse_loss(model(x, t).sample, eps).backward()
        else:
            with torch.no_grad():
                model(x, t)
    return float(counter.get_total_flops())


def peak_memory(step: Step, bench: Bench) -> float | None:
    """Peak GiB allocated over two steps (CUDA only)."""
    if bench.device.type != "cuda":
        step()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def release() -> None:
    """Return freed blocks to the GPU (between sections, once their tensors are gone)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- sections
def cifar_train(bench: Bench) -> None:
    a, preset = bench.args, "ddpm-cifar10"
    batch = inputs(preset, a.train_batch, bench.device)
    flops = standard_flops(preset, bench, train=True)
    models = {"ours": ours(preset, bench), "diffusers": theirs(preset, bench)}
    steps = {k: train_step(m, net, batch) for k, (m, net, _) in models.items()}
    sec = bench.time_steps(steps, a.steps, a.rounds)
    img_s = {k: a.train_batch / s for k, s in sec.items()}
    bench.save("cifar10_train", {
        "batch": a.train_batch, "precision": "bf16 autocast, fp32 master weights, fused AdamW",
        "ours_policy": models["ours"][2].record(), "images_per_s": img_s,
        "speedup": img_s["ours"] / img_s["diffusers"], "target_speedup": 1.3,
        "mfu": {k: bench.mfu(v * flops) for k, v in img_s.items()}, "train_gflop_per_image": flops / 1e9,
    })


def cifar_sample(bench: Bench) -> None:
    a, preset = bench.args, "ddpm-cifar10"
    batch = inputs(preset, a.sample_batch, bench.device)
    flops = standard_flops(preset, bench, train=False)
    models = {"ours": ours(preset, bench), "diffusers": theirs(preset, bench)}
    steps = {k: sample_step(m, net, batch) for k, (m, net, _) in models.items()}
    if bench.device.type == "cuda":  # the same networks, each evaluation replayed from a captured graph
        for name, (model, net, _) in list(models.items()):
            steps[f"{name} cuda graph"] = sample_step(model, CudaGraphForward(net), batch)
    sec = bench.time_steps(steps, a.steps, a.rounds)
    img_s = {k: a.sample_batch / s for k, s in sec.items()}
    best_ours = max(v for k, v in img_s.items() if k.startswith("ours"))
    best_theirs = max(v for k, v in img_s.items() if k.startswith("diffusers"))
    bench.save("cifar10_sample", {
        "batch": a.sample_batch, "precision": "bf16 autocast", "images_per_s_per_evaluation": img_s,
        "speedup_eager": img_s["ours"] / img_s["diffusers"], "speedup_best": best_ours / best_theirs,
        "target_speedup": 1.5, "mfu": {k: bench.mfu(v * flops) for k, v in img_s.items()},
        "forward_gflop_per_image": flops / 1e9,
    })


def celebahq_fit(bench: Bench) -> None:
    a, preset = bench.args, "ddpm-celebahq256"
    flops = standard_flops(preset, bench, train=True)
    data: dict[str, Any] = {"batch": a.big_batch, "precision": "bf16 autocast, fp32 master weights",
                            "limit_gib": 80, "train_gflop_per_image": flops / 1e9}
    for library in ("ours", "diffusers"):
        for checkpointing in (False, True):
            key = library + (" + checkpointing" if checkpointing else "")
            data[key] = _fit_one(library, checkpointing, flops, bench)
            release()
            if "error" not in data[key] and data[key]["fits_80gb"] is not False:
                break  # fits (or cannot be told on a CPU): checkpointing is not needed
    bench.save("celebahq256_fit", data)


def _fit_one(library: str, checkpointing: bool, flops: float, bench: Bench) -> dict[str, Any]:
    """Peak memory and speed of one ddpm-celebahq256 training configuration (its tensors die on return)."""
    a, preset = bench.args, "ddpm-celebahq256"
    build = ours if library == "ours" else theirs
    try:
        model, net, _ = build(preset, bench, use_checkpoint=checkpointing)
        step = train_step(model, net, inputs(preset, a.big_batch, bench.device))
        peak = peak_memory(step, bench)
        sec = bench.time_steps({"step": step}, max(1, a.steps // 2), 1)["step"]
    except torch.cuda.OutOfMemoryError as err:
        return {"error": f"out of memory: {str(err)[:160]}"}
    return {"peak_gib": peak, "fits_80gb": None if peak is None else peak < 80,
            "images_per_s": a.big_batch / sec, "mfu": bench.mfu(a.big_batch / sec * flops)}


def variants(bench: Bench) -> None:
    """Which choices the CUDA rule should make: layout, upsampling and attention kernel, one at a time."""
    a, preset = bench.args, "ddpm-cifar10"
    train_batch = inputs(preset, a.train_batch, bench.device)
    sample_batch = inputs(preset, a.sample_batch, bench.device)
    choices = {"policy": {}, "NHWC": {"memory_format": "channels_last"}, "subpixel": {"upsample": "subpixel"},
               "flash": {"attention": "flash"}, "efficient": {"attention": "efficient"},
               "matmul": {"attention": "matmul"}, "diffusers NHWC": None}
    data: dict[str, Any] = {}
    for task, batch, make in (("train", train_batch, train_step), ("sample", sample_batch, sample_step)):
        steps = {}
        for name, kw in choices.items():
            try:
                model, net, _ = theirs(preset, bench, channels_last=True) if kw is None else ours(preset, bench, **kw)
                step = make(model, net, batch)
                step()  # a kernel the device lacks fails here, not in the timing
                steps[name] = step
            except RuntimeError as err:
                data[f"{task} {name}"] = f"failed: {str(err)[:160]}"
        sec = bench.time_steps(steps, a.steps, a.rounds)
        bs = a.train_batch if task == "train" else a.sample_batch
        data[task] = {k: round(bs / s, 1) for k, s in sec.items()}
        del steps
        release()
        data["unit"] = "images/s (bf16), ours under the CUDA policy with one choice changed"
    bench.save("cifar10_variants", data)


def compile_payback(bench: Bench, task: str) -> None:
    """Compile seconds against seconds saved per step; pays if it breaks even within 1% of a default run."""
    a, preset = bench.args, "ddpm-cifar10"
    bs = a.train_batch if task == "train" else a.sample_batch
    batch = inputs(preset, bs, bench.device)
    model, net, _ = ours(preset, bench)
    make = train_step if task == "train" else sample_step
    mode = "default" if task == "train" else "reduce-overhead"
    compiled_net = torch.compile(net, mode=mode)
    eager, compiled = make(model, net, batch), make(model, compiled_net, batch)
    bench.sync()
    t0 = time.perf_counter()
    compiled()  # compiles
    compiled()
    bench.sync()
    compile_s = time.perf_counter() - t0
    sec = bench.time_steps({"eager": eager, "compiled": compiled}, a.steps, a.rounds)
    saved = sec["eager"] - sec["compiled"]
    breakeven = compile_s / saved if saved > 0 else None
    budget = DEFAULT_RUN_STEPS // 100
    bench.save(f"compile_{task}", {
        "mode": mode, "batch": bs, "compile_s": compile_s, "eager_step_ms": 1e3 * sec["eager"],
        "compiled_step_ms": 1e3 * sec["compiled"], "breakeven_steps": breakeven,
        "pays_within_1pct_of_default_run": breakeven is not None and breakeven <= budget,
        "one_pct_steps": budget,
    })


SECTIONS: dict[str, Callable[[Bench], None]] = {
    "cifar10_train": cifar_train,
    "cifar10_sample": cifar_sample,
    "celebahq256_fit": celebahq_fit,
    "cifar10_variants": variants,
    "compile_train": lambda b: compile_payback(b, "train"),
    "compile_sample": lambda b: compile_payback(b, "sample"),
}


# ---------------------------------------------------------------------------------- report
def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def markdown(results: dict[str, Any]) -> str:
    s = results["sections"]
    lines = [
        "# GPU speed: ddpm.nn.UNet vs diffusers UNet2DModel (identical architectures)",
        "",
        f"Machine: {results['machine']}; torch {results['torch']}; peak dense bf16 "
        f"{_fmt(results['peak_bf16_tflops'], '.0f')} TFLOP/s (MFU = achieved / peak, standard-network FLOPs).",
        f"Command: `{results['command']}`" + (" (SMOKE RUN: tiny batches, not a measurement)" * results["smoke"]),
        "",
    ]
    if "cifar10_train" in s:
        r = s["cifar10_train"]
        lines += [f"**ddpm-cifar10 training**, batch {r['batch']}, {r['precision']}: ours "
                  f"{r['images_per_s']['ours']:.0f} img/s (MFU {_fmt(r['mfu']['ours'], '.1%')}), diffusers "
                  f"{r['images_per_s']['diffusers']:.0f} img/s (MFU {_fmt(r['mfu']['diffusers'], '.1%')}): "
                  f"**{r['speedup']:.2f}x** (target >= {r['target_speedup']}x).", ""]
    if "cifar10_sample" in s:
        r = s["cifar10_sample"]
        per = ", ".join(f"{k} {v:.0f} (MFU {_fmt(r['mfu'][k], '.1%')})" for k, v in
                        r["images_per_s_per_evaluation"].items())
        lines += [f"**ddpm-cifar10 sampling**, batch {r['batch']}, images/s per network evaluation: {per}; "
                  f"ours / diffusers eager **{r['speedup_eager']:.2f}x**, best of each "
                  f"**{r['speedup_best']:.2f}x** (target >= {r['target_speedup']}x).", ""]
    if "celebahq256_fit" in s:
        r = s["celebahq256_fit"]
        parts = []
        for k, v in r.items():
            if isinstance(v, dict):
                parts.append(f"{k}: " + (v["error"] if "error" in v else f"peak {_fmt(v['peak_gib'], '.1f')} GiB, "
                                         f"{v['images_per_s']:.1f} img/s, MFU {_fmt(v['mfu'], '.1%')}"))
        lines += [f"**ddpm-celebahq256 training**, batch {r['batch']}, {r['precision']}: " + "; ".join(parts), ""]
    if "cifar10_variants" in s:
        r = s["cifar10_variants"]
        lines += [f"**Variants** ({r['unit']}): train {r.get('train')}; sample {r.get('sample')}", ""]
    for task in ("train", "sample"):
        if f"compile_{task}" in s:
            r = s[f"compile_{task}"]
            lines += [f"**torch.compile ({r['mode']}) of the {task} step**, batch {r['batch']}: compile "
                      f"{r['compile_s']:.0f} s, step {r['eager_step_ms']:.1f} -> {r['compiled_step_ms']:.1f} ms, "
                      f"breaks even after {_fmt(r['breakeven_steps'], '.0f')} steps; pays within 1% of a default "
                      f"run ({r['one_pct_steps']} steps): {'yes' if r['pays_within_1pct_of_default_run'] else 'no'}.",
                      ""]
    for name in results.get("skipped", []):
        lines.append(f"Skipped (time limit): {name}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny batches and steps (what runs on a CPU)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile sections")
    p.add_argument("--time-limit", type=float, default=480.0, help="seconds after which no new section starts")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: by GPU name)")
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    bench = Bench(args)
    if bench.smoke:
        args.train_batch, args.sample_batch, args.big_batch, args.steps, args.rounds = 2, 2, 1, 1, 1
    else:
        args.train_batch, args.sample_batch, args.big_batch, args.steps, args.rounds = 128, 256, 64, 10, 3
    if bench.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print(f"machine: {bench.machine}; torch {torch.__version__}; smoke={bench.smoke}", flush=True)
    # A smoke run leaves torch.compile out (minutes on a CPU) unless its sections are named.
    skip_compile = args.no_compile or (bench.smoke and "--sections" not in (argv or sys.argv))
    sections = [s for s in args.sections if not (skip_compile and s.startswith("compile"))]
    bench.results["skipped"] = []
    for name in sections:
        if bench.elapsed() > args.time_limit:
            bench.results["skipped"].append(name)
            continue
        SECTIONS[name](bench)
        release()
    bench.save("done", {"total_s": round(bench.elapsed(), 1)})


if __name__ == "__main__":
    main()
