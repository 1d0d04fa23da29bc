"""Inpainting against diffusers' RePaint, and the inversion round trip, on a trained digits model.

Inpaints the bottom half and the centre box of the held-out digits with the project's RePaint
(``Pipeline.inpaint``) at several (steps, U, j) and with diffusers' ``RePaintPipeline`` and
``RePaintScheduler`` on the same model exported to a diffusers folder (``save_pretrained``), with
the same masks and, cell by cell, the same number of network evaluations. Reports how often the
project's digit classifier reads the true digit in the completion, the Frechet distance of the
completions to the held-out images (classifier features), and seconds. diffusers' RePaint assumes an
eps-predicting network, so a v-prediction model is wrapped to return eps = alpha_t v + sigma_t x_t
(the identity of Salimans & Ho 2022, with abar_t of the scheduler). Then encodes and decodes the
held-out images with ``ddim`` and ``dpm++2m`` at 10, 20 and 50 network evaluations and reports the
round trip's error.

    PYTHONPATH=src python benchmarks/inpainting.py runs/demo/run

writes ``benchmarks/results/inpainting-seed<seed>.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import ddpm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from samplers import _cpu, _diffusers_version  # noqa: E402

from ddpm.editing import parse_mask, repaint_evaluations  # noqa: E402
from ddpm.evaluate import distances, make_reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (steps, U, j): the same settings run through both implementations
SETTINGS = [(25, 1, 1), (50, 1, 1), (20, 3, 5), (25, 5, 5)]
METHODS = ("ddpm ancestral", "ddpm ddim", "diffusers RePaint (eta 0)", "diffusers RePaint (eta 1)")


class EpsFromV(torch.nn.Module):
    """A diffusers UNet2DModel that predicts v, answering with eps = alpha_t v + sigma_t x_t."""

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.unet, self.config, self.abar = unet, unet.config, alphas_cumprod

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, x: torch.Tensor, t: torch.Tensor | int) -> SimpleNamespace:
        v = self.unet(x, t).sample
        abar = self.abar[torch.as_tensor(t).long()].to(x.dtype)
        return SimpleNamespace(sample=abar.sqrt() * v + (1 - abar).sqrt() * x)


def diffusers_repaint(folder: Path, images: torch.Tensor, keep: torch.Tensor, steps: int, resample: int, jump: int,
                      *, eta: float, batch_size: int, seed: int) -> torch.Tensor:
    from diffusers import RePaintPipeline, RePaintScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = RePaintScheduler.from_pretrained(folder / "scheduler")
    config = RePaintScheduler.load_config(folder / "scheduler")
    if config.get("prediction_type", "epsilon") == "v_prediction":
        unet = EpsFromV(unet, scheduler.alphas_cumprod)
    elif config.get("prediction_type", "epsilon") != "epsilon":
        raise SystemExit(f"diffusers' RePaint needs eps or v prediction, not {config['prediction_type']}")
    pipe = RePaintPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(x.shape[0])]
        mask = keep.float().expand(x.shape[0], 1, -1, -1)
        res = pipe(x, mask, num_inference_steps=steps, eta=eta, jump_length=jump, jump_n_sample=resample,
                   generator=gens, output_type="np").images
        out.append(torch.from_numpy(res).permute(0, 3, 1, 2) * 2 - 1)
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a run folder of a digits model (MNIST or the 8x8 digits)")
    p.add_argument("-n", "--num", type=int, default=500, help="held-out images to inpaint")
    p.add_argument("--masks", default="half,center", help="comma list of mask names")
    p.add_argument("--settings", default=";".join(f"{s},{u},{j}" for s, u, j in SETTINGS),
                   help="semicolon list of steps,U,j")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0, help="noise seed of both implementations")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of: {', '.join(METHODS)}")
    p.add_argument("--round-trips", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the inversion round trip")
    p.add_argument("--quick", action="store_true", help="print only, write nothing")
    p.add_argument("--out", type=Path, default=None, help="results file (default: results/inpainting-seed<seed>.md)")
    args = p.parse_args(argv)
    settings = [tuple(int(v) for v in s.split(",")) for s in args.settings.split(";")]
    methods = args.methods.split(",")
    if set(methods) - set(METHODS):
        raise SystemExit(f"unknown methods {sorted(set(methods) - set(METHODS))}; valid: {', '.join(METHODS)}")
    t_start = time.perf_counter()

    pipe = ddpm.load(args.checkpoint, device="cpu")
    ref = make_reference(pipe.config.data, pipe.data_shape, features="classifier")
    assert ref.images is not None and ref.labels is not None
    images, labels = ref.images[: args.num], ref.labels[: args.num]
    folder = Path(tempfile.mkdtemp()) / "export"
    pipe.save_pretrained(folder)

    def measure(x: torch.Tensor) -> tuple[float, float]:
        fd = distances(x, ref)["frechet_distance"]
        return fd, float((ref.extractor.predict(x).cpu() == labels).double().mean())

    base_fd, base_acc = measure(images)
    print(f"held-out images themselves: Frechet {base_fd:.2f}, classifier reads the digit {base_acc:.3f}", flush=True)
    rows = []
    for mask_name in args.masks.split(","):
        keep = parse_mask(mask_name, *pipe.data_shape[1:])
        for steps, resample, jump in settings:
            nfe = repaint_evaluations(steps, resample, jump)
            for name in methods:
                t0 = time.perf_counter()
                if name.startswith("ddpm"):
                    x = pipe.inpaint(images, keep, steps=steps, resample=resample, jump=jump,
                                     sampler=name.split()[1], seed=args.seed, batch_size=args.batch_size)
                else:
                    x = diffusers_repaint(folder, images, keep, steps, resample, jump, eta=float(name[-2]),
                                          batch_size=args.batch_size, seed=args.seed)
                seconds = time.perf_counter() - t0
                if name.startswith("ddpm"):  # the kept pixels must be the input's, exactly
                    assert torch.equal(torch.where(keep, x, images), images), name
                fd, acc = measure(x)
                rows.append(dict(mask=mask_name, steps=steps, U=resample, j=jump, nfe=nfe, method=name,
                                 frechet=fd, accuracy=acc, seconds=seconds))
                print(f"{mask_name:6s} steps {steps:3d} U {resample} j {jump} NFE {nfe:4d} {name:26s} "
                      f"Frechet {fd:6.2f}  digit read {acc:.3f}  {seconds:6.1f}s", flush=True)

    trips = []
    for sampler, spacing in (("ddim", None), ("ddim", "karras"), ("dpm++2m", None)) if args.round_trips else ():
        for nfe in (10, 20, 50):
            t0 = time.perf_counter()
            z = pipe.encode(images, sampler=sampler, steps=nfe, spacing=spacing, batch_size=args.batch_size)
            back = pipe.decode(z, sampler=sampler, steps=nfe, spacing=spacing, batch_size=args.batch_size)
            err = (back - images).flatten(1)
            grid = spacing or ddpm.SAMPLERS[sampler].default_spacing
            trips.append(dict(sampler=f"{sampler}, {grid}", nfe=nfe, rms=float(err.pow(2).mean().sqrt()),
                              max=float(err.abs().max()), pixels=float((err.abs() > 1 / 127.5).double().mean()),
                              seconds=time.perf_counter() - t0))
            print(f"round trip {sampler:8s} NFE {nfe:3d}: rms {trips[-1]['rms']:.4f}, max {trips[-1]['max']:.3f}, "
                  f"pixels off by more than one level {trips[-1]['pixels']:.4f}", flush=True)

    minutes = (time.perf_counter() - t_start) / 60
    command = "python benchmarks/inpainting.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Inpainting: the project's RePaint against diffusers' RePaintPipeline, and the inversion round trip",
        "",
        f"`{command}` ({_cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}, diffusers "
        f"{_diffusers_version()}; {minutes:.0f} min in all). Model: `{pipe.source}` ({pipe.process!r}), EMA "
        f"weights, exported with `save_pretrained` for diffusers. {args.num} held-out images; the held-out images "
        f"themselves score Frechet {base_fd:.2f} and are read as their digit {base_acc:.3f} of the time.",
        "",
        "Frechet distance of the completions to the held-out images (the project's digit-classifier features) / "
        "the fraction the classifier reads as the true digit / seconds for all images. NFE: network evaluations "
        "per image, equal in every row of a setting. diffusers' RePaint draws the known and the unknown pixels "
        "with one noise; its eta 0 walks DDIM, eta 1 the ancestral chain.",
        "",
        "| mask | steps, U, j | NFE | method | Frechet | digit read | seconds |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['mask']} | {r['steps']}, {r['U']}, {r['j']} | {r['nfe']} | {r['method']} | "
                     f"{r['frechet']:.2f} | {r['accuracy']:.3f} | {r['seconds']:.0f} |")
    lines += [] if not trips else [
              "", "Round trip decode(encode(x)) of the same images (unclipped x_0; error in [-1, 1] units, one "
              "8-bit level is 0.0078):", "",
              "| solver, grid | NFE (each way) | rms error | max error | pixels off by > 1 level | seconds |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for t in trips:
        lines.append(f"| {t['sampler']} | {t['nfe']} | {t['rms']:.4f} | {t['max']:.3f} | {t['pixels']:.4f} | "
                     f"{t['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = args.out or RESULTS / f"inpainting-seed{args.seed}.md"
        out.write_text(text, encoding="utf-8")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")
    raise SystemExit(main())
