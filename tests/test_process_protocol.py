"""The process protocol: a diffusion process defined here, outside the package, trains, checkpoints, loads,
samples and bounds through ``ddpm.fit``, ``ddpm.load`` and the command line with no change inside ``ddpm``.

The toy is the smallest honest chain: each pixel is a bit (x > 0), and every step flips it with probability
``flip`` (a symmetric two-state Markov chain, the seed notes' stochastic matrix [[1-b, b], [b, 1-b]]). After
index t (t + 1 steps) a bit has flipped with probability f_t = (1 - r_t) / 2, r_t = (1 - 2b)^(t+1). The
network predicts p(x_0 = 1 | x_t) as a logit; the reverse step is sum over x_0 of q(x_{t-1} | x_t, x_0)
p(x_0 | x_t), and the bound's terms are discrete KLs, in bits per pixel.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import ddpm
from ddpm.cli import main
from ddpm.config import RunConfig, apply_overrides, load_config
from ddpm.errors import UserError
from ddpm.processes import PROCESSES, ProcessConfig, TrainingLosses, register_process
from ddpm.processes.protocol import DiffusionProcess, described
from ddpm.tensors import Generator, Model, mean_flat, per_example

from .test_cli import write_folder

LOG2 = math.log(2.0)


def uniform(shape: Sequence[int], generator: Generator, device: torch.device | str) -> torch.Tensor:
    """U[0, 1) of ``shape``: one draw, or one per example from its own generator."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(tuple(shape), generator=generator).to(device)
    return torch.stack([torch.rand(tuple(shape[1:]), generator=g) for g in generator]).to(device)


def bernoulli_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(p) || Bernoulli(q)) in nats, elementwise: sum_i P(i) log(P(i) / Q(i))."""
    eps = 1e-12
    return p * (torch.log(p + eps) - torch.log(q + eps)) + (1 - p) * (torch.log(1 - p + eps) - torch.log(1 - q + eps))


@dataclass
class ToyConfig(ProcessConfig):
    process: str = described("toy-binary", "the diffusion process")
    flip: float = described(0.05, "probability that one step flips a bit")


class ToyBinary:
    """The bit-flip chain of the module docstring; satisfies :class:`ddpm.processes.DiffusionProcess`."""

    name = "toy-binary"
    error_metric = "ce"
    default_sampler = "ancestral"

    def __init__(self, r: torch.Tensor, timestep_map: torch.Tensor) -> None:
        self.r = r.double()  # r_t = 1 - 2 f_t, the cumulative correlation at each index
        self.timestep_map = timestep_map

    @classmethod
    def from_config(cls, cfg: ToyConfig) -> ToyBinary:
        steps = torch.arange(1, cfg.timesteps + 1, dtype=torch.float64)
        return cls((1 - 2 * cfg.flip) ** steps, torch.arange(cfg.timesteps))

    @property
    def num_timesteps(self) -> int:
        return self.r.numel()

    def output_channels(self, channels: int) -> int:
        return channels

    def guidance_channels(self, channels: int) -> int:
        return channels

    def _r(self, t: torch.Tensor, like: torch.Tensor, *, prev: bool = False) -> torch.Tensor:
        r = torch.cat([self.r.new_ones(1), self.r]) if prev else self.r  # prev: r_{t-1}, r_{-1} = 1 (clean)
        return per_example(r.to(like.device)[t].to(like.dtype), like)

    def draw_noise(self, shape: Sequence[int], generator: Generator, *, device: torch.device | str) -> torch.Tensor:
        return uniform(shape, generator, device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        bits = x0 > 0
        flipped = noise < (1 - self._r(t, x0)) / 2
        return torch.where(bits ^ flipped, 1.0, -1.0).to(x0.dtype)

    def _posterior_one(self, x_t: torch.Tensor, t: torch.Tensor, x0_one: torch.Tensor) -> torch.Tensor:
        """q(x_{t-1} = 1 | x_t, x_0) for x_0 = 1 where ``x0_one`` (a {0, 1} tensor)."""
        step = self._r(t, x_t) / self._r(t, x_t, prev=True)  # 1 - 2 b_t of the step into index t
        b = (1 - step) / 2
        f_prev = (1 - self._r(t, x_t, prev=True)) / 2
        prior_one = torch.where(x0_one > 0, 1 - f_prev, f_prev)  # q(x_{t-1} = 1 | x_0)
        like_one = torch.where(x_t > 0, 1 - b, b)  # q(x_t | x_{t-1} = 1)
        like_zero = torch.where(x_t > 0, b, 1 - b)
        return like_one * prior_one / (like_one * prior_one + like_zero * (1 - prior_one))

    def _reverse_one(self, model: Model, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p(x_0 = 1 | x_t), p_theta(x_{t-1} = 1 | x_t)) = sum over x_0 of the posterior times p(x_0 | x_t)."""
        p0 = torch.sigmoid(model(x_t, self.timestep_map.to(t.device)[t]).double())
        x_t = x_t.double()
        post = p0 * self._posterior_one(x_t, t, torch.ones_like(x_t)) + (1 - p0) * self._posterior_one(
            x_t, t, torch.zeros_like(x_t))
        return p0, post

    def training_losses(self, model: Model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *,
                        y: torch.Tensor | None = None) -> TrainingLosses:
        x_t = self.q_sample(x0, t, noise)
        logits = model(x_t, self.timestep_map.to(t.device)[t])
        ce = mean_flat(torch.nn.functional.binary_cross_entropy_with_logits(logits, (x0 > 0).to(logits.dtype),
                                                                            reduction="none"))
        return TrainingLosses(loss=ce, error=ce.detach(), vlb=None, t=t)

    def check_data(self, x0: torch.Tensor) -> None:
        if not torch.isfinite(x0).all() or x0.abs().max() > 1:
            raise UserError("the bit-flip chain needs finite data in [-1, 1]")

    def vlb_term(self, model: Model, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, *,
                 y: torch.Tensor | None = None) -> torch.Tensor:
        p0, post = self._reverse_one(model, x_t, t)
        bits = (x0 > 0).double()
        kl = bernoulli_kl(self._posterior_one(x_t.double(), t, bits), post)
        decoder = -torch.log(torch.where(bits > 0, p0, 1 - p0).clamp_min(1e-12))  # L_0 at index 0
        return mean_flat(torch.where(per_example(t == 0, x_t), decoder, kl)) / LOG2

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device)
        one = torch.where(x0 > 0, 1 + self._r(t, x0), 1 - self._r(t, x0)).double() / 2
        return mean_flat(bernoulli_kl(one, torch.full_like(one, 0.5))) / LOG2

    def prior_sample(self, shape: Sequence[int], generator: Generator, *, device: torch.device | str) -> torch.Tensor:
        return torch.where(uniform(shape, generator, device) < 0.5, 1.0, -1.0)

    def p_sample(self, model: Model, x_t: torch.Tensor, t: torch.Tensor, *, generator: Generator,
                 clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        p0, post = self._reverse_one(model, x_t, t)
        one = torch.where(per_example(t == 0, x_t), p0, post)
        x = torch.where(uniform(x_t.shape, generator, x_t.device) < one, 1.0, -1.0).to(x_t.dtype)
        return x, (2 * p0 - 1).to(x_t.dtype)

    def respaced(self, steps: int | Sequence[float] | torch.Tensor) -> ToyBinary:
        kept = torch.linspace(0, self.num_timesteps - 1, steps).round().long() if isinstance(steps, int) else \
            torch.as_tensor(steps).round().long()
        return ToyBinary(self.r[kept], self.timestep_map[kept])

    def __repr__(self) -> str:
        return f"ToyBinary(T={self.num_timesteps})"


register_process("toy-binary", ToyConfig, ToyBinary.from_config, "bit-flip chain (the test's toy)")

TOY = ["--process", "toy-binary", "--flip", "0.1", "--timesteps", "20", "--batch-size", "8", "--log-every", "1",
       "--checkpoint-every", "3", "--sample-every", "0", "--warmup-steps", "1", "--lr", "1e-3", "--device", "cpu",
       "--set", "train.tensorboard=false", "--set", "model.base_channels=8", "--set", "model.channel_mult=1,2",
       "--set", "model.num_groups=8"]


def test_the_toy_satisfies_the_protocol() -> None:
    toy = ToyBinary.from_config(ToyConfig(timesteps=20))
    assert isinstance(toy, DiffusionProcess)
    assert "toy-binary" in PROCESSES and "toy-binary" in ddpm.PROCESSES


def test_a_process_from_outside_trains_loads_samples_and_bounds_through_the_library(tmp_path: Path) -> None:
    data = write_folder(tmp_path / "data")
    cfg = apply_overrides(RunConfig(), {
        "diffusion.process": "toy-binary", "diffusion.flip": 0.1, "diffusion.timesteps": 20,
        "data.dataset": str(data), "train.steps": 4, "train.batch_size": 8, "train.checkpoint_every": 2,
        "train.out_dir": str(tmp_path / "run"), "train.device": "cpu", "train.tensorboard": False,
        "train.sample_every": 2, "model.base_channels": 8, "model.channel_mult": (1, 2), "model.num_groups": 8})
    result = ddpm.fit(cfg, progress=False)
    assert result.step == 4 and result.checkpoint is not None
    assert (tmp_path / "run" / "samples" / "step-00000002.png").is_file()  # the sample grid uses the toy's sampler
    saved = load_config(result.checkpoint / "config.toml")
    assert isinstance(saved.diffusion, ToyConfig) and saved.diffusion.flip == 0.1
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("ce" in m and "ce_by_t_bucket" in m for m in metrics)  # the process names its error metric

    pipe = ddpm.load(tmp_path / "run", device="cpu")
    assert isinstance(pipe.process, ToyBinary) and pipe.process.num_timesteps == 20
    x = pipe.sample(5, seed=1)
    assert x.shape == (5, 1, 8, 8) and set(x.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(x, pipe.sample(5, seed=1, batch_size=2))  # sample i from seed (1, i), whatever the batch
    assert torch.equal(pipe.sample(5, seed=1, steps=5), pipe.sample(5, seed=1, steps=5, batch_size=2))  # respaced
    images = torch.where(torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.5, 1.0, -1.0)
    exact = pipe.nll(images)
    assert exact.terms_bpd is not None and exact.terms_bpd.shape == (20,)
    assert exact.total_bpd == pytest.approx(exact.prior_bpd + exact.kl_bpd + exact.decoder_bpd, rel=1e-9)
    assert 0.0 < exact.total_bpd < 5.0  # finite, and the bits of a random binary pixel are 1 per dimension
    estimate = pipe.nll(images, estimate=8)
    assert abs(estimate.total_bpd - exact.total_bpd) < 4 * estimate.stderr_bpd + 0.05
    with pytest.raises(UserError, match="sampler 'ddim' walks gaussian diffusion, not the 'toy-binary' process"):
        pipe.sample(2, sampler="ddim")
    with pytest.raises(UserError, match="diffusers has no pipeline for the 'toy-binary' process"):
        pipe.save_pretrained(tmp_path / "export")


def test_a_process_from_outside_through_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--steps", "3", "--out", str(run), *TOY]) == 0
    assert main(["train", "--data", str(data), "--steps", "5", "--out", str(run), "--resume", *TOY]) == 0
    assert main(["sample", str(run), "-n", "3", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 0
    info = json.loads((tmp_path / "s" / "sample_info.json").read_text())
    assert info["sampler"] == "ancestral" and info["network_evaluations"] == 20
    assert main(["nll", str(run), "-n", "4", "--out", str(tmp_path / "n"), "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "n" / "nll.json").read_text())["timesteps"] == 20
    assert main(["forward", str(data / "img0.png"), "--process", "toy-binary", "--timesteps", "20",
                 "--out", str(tmp_path / "f.png"), "--channels", "1"]) == 0
    capsys.readouterr()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "x"), "--process", "toy-binary",
                 "--prediction", "v"]) == 2  # a Gaussian field on the toy's table: named, refused
    assert "diffusion.prediction" in capsys.readouterr().err
