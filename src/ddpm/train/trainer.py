"""The training loop, composed of small named steps.

``run`` -> ``train_step`` -> (``get_batch``, ``forward_backward``, ``clip_gradients``,
``optimizer_step``, ``ema_update``), then ``maybe_log``, ``maybe_checkpoint``, ``maybe_eval`` and
``maybe_sample``.

Reproducibility and resumption rest on one rule: everything random in step ``k`` is drawn from
generators seeded by ``(seed, k)``, never from a stream carried across steps.

- Data order: a permutation of the data set per epoch, seeded by ``(seed, epoch)``; global batch
  ``k`` takes items ``[k * B, (k + 1) * B)`` of the concatenated permutations (B = global batch).
- Flips, timesteps and noise: drawn for the whole global batch from generators seeded by
  ``(seed, k)``; process ``r`` of ``w`` keeps slice ``r`` of them.
- Dropout: the global torch RNG is reseeded from ``(seed, k, rank)`` before the forward passes.

So the data position is the step number, resuming is exact, and k steps on 2 processes equal
k steps on 1 process with the same global batch (up to float summation order).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpm.nn.policy import RuntimePolicy, resolve_policy
from ddpm.train import distributed as dist_utils
from ddpm.train.checkpoint import find_latest, load_checkpoint, resolve_checkpoint, save_checkpoint
from ddpm.train.config import RunConfig, per_rank_batch, save_config, validate_config
from ddpm.train.ema import ExponentialMovingAverage
from ddpm.train.timesteps import make_timestep_sampler

logger = logging.getLogger("ddpm.train")

NUM_T_BUCKETS = 10  # metrics report the mse in this many equal ranges of t
SampleFn = Callable[[nn.Module, int], Any]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple such as ``(seed, "noise", step)``; stable across runs and machines."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def seeded_generator(device: torch.device | str, *parts: object) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*parts))
    return gen


def linear_warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): base_lr * min(1, (step + 1) / warmup)."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def flip_mask(batch_size: int, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Which examples of a global batch are flipped: ``torch.rand(B) < p`` (as ddpm.data.random_hflip)."""
    return torch.rand(batch_size, generator=generator, device=generator.device) < p


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def runtime_policy(config: RunConfig, device: torch.device, model: nn.Module) -> RuntimePolicy:
    """The run's :class:`~ddpm.nn.policy.RuntimePolicy` for ``model`` on ``device``, from the ``train`` choices."""
    tc = config.train
    return resolve_policy(
        device, memory_format=tc.memory_format, amp=tc.amp, attention=tc.attention, upsample=tc.upsample,
        fused_optimizer=tc.fused_optimizer, compile=tc.compile, model=model, field_prefix="train.",
    )


@dataclass
class StepStats:
    """What one optimizer step reports (already averaged over all processes)."""

    step: int  # steps done including this one (1-based, as in checkpoint names)
    loss: float  # mean objective over the global batch
    mse: float
    grad_norm: float  # global gradient norm before clipping
    lr: float
    applied: bool  # False when the step was skipped (non-finite loss or gradient)
    mse_sum_by_t: list[float]  # per t bucket: summed mse and example counts
    count_by_t: list[float]


class _Window:
    """Accumulates step statistics between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.steps = self.applied = self.nonfinite = 0
        self.loss = self.mse = self.grad_norm = 0.0
        self.mse_by_t = [0.0] * NUM_T_BUCKETS
        self.count_by_t = [0.0] * NUM_T_BUCKETS

    def add(self, s: StepStats) -> None:
        self.steps += 1
        if not s.applied:
            self.nonfinite += 1
            return
        self.applied += 1
        self.loss += s.loss
        self.mse += s.mse
        self.grad_norm += s.grad_norm
        self.mse_by_t = [a + b for a, b in zip(self.mse_by_t, s.mse_sum_by_t, strict=True)]
        self.count_by_t = [a + b for a, b in zip(self.count_by_t, s.count_by_t, strict=True)]


class Trainer:
    """Trains ``model`` with ``diffusion.training_losses`` on ``dataset``; see the module docstring.

    Arguments:
        config: the resolved run configuration (its ``train``, ``optim``, ``ema`` sections are used
            here; the CLI uses the others to build model, diffusion and data).
        model: any ``nn.Module`` called as ``model(x_t, t)``; moved to the training device.
        diffusion: a :class:`ddpm.GaussianDiffusion` (``training_losses``, ``num_timesteps``). Which
            timesteps are drawn is the trainer's (``diffusion.timestep_sampling`` of the config):
            its timestep sampler is checkpointed with the run.
        dataset: ``len(ds)``, ``ds.get_batch(indices) -> [B, ...]`` in [-1, 1], ``.kind``.
        eval_dataset: optional held-out data; the EMA model's loss on it is logged every
            ``train.eval_every`` steps.
        sample_fn: ``sample_fn(ema_model, step)`` called on rank 0 every ``train.sample_every`` steps.

    Under torchrun the process group is joined here (``setup_distributed``) and left in ``close``.
    """

    def __init__(
        self,
        config: RunConfig,
        model: nn.Module,
        diffusion: Any,
        dataset: Any,
        *,
        eval_dataset: Any = None,
        sample_fn: SampleFn | None = None,
    ) -> None:
        tc = config.train
        validate_config(config, world_size=dist_utils.get_world_size())
        if len(dataset) == 0:
            raise ValueError("the training data set is empty")
        self._owns_process_group = not torch.distributed.is_initialized()
        self.device, self.rank, self.world_size = dist_utils.setup_distributed(tc.device)
        self._owns_process_group &= torch.distributed.is_initialized()
        self.local_batch, self.micro_batch = per_rank_batch(config, self.world_size)
        self.policy = runtime_policy(config, self.device, model)

        self.config, self.diffusion, self.dataset = config, diffusion, dataset
        self.timestep_sampler = make_timestep_sampler(config.diffusion.timestep_sampling, diffusion.num_timesteps)
        self.eval_dataset, self.sample_fn = eval_dataset, sample_fn
        self.out_dir = Path(tc.out_dir)
        self.is_main = self.rank == 0

        self.model = self.policy.prepare(model)  # the raw model, on the device: checkpoints and EMA read it
        self.ema = ExponentialMovingAverage(
            self.model, decay=config.ema.decay, warmup=config.ema.warmup,
            inv_gamma=config.ema.inv_gamma, power=config.ema.power,
        )
        op = config.optim
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=op.lr, betas=op.betas, eps=op.eps, weight_decay=op.weight_decay,
            **self.policy.optimizer_kwargs(),
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.policy.amp == "fp16")
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self.forward_model = self._wrap_model()

        self.step = 0  # optimizer steps done == global batches consumed
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.last_checkpoint: Path | None = None
        self._last_checkpoint_step: int | None = None
        self._perms: dict[int, torch.Tensor] = {}
        self._window = _Window()
        self._progress = None
        self._tb_writer = None

    # ---------------------------------------------------------------------------------- setup
    def _wrap_model(self) -> nn.Module:
        """DDP (several processes), then torch.compile, then the policy's autocast; ``self.model`` stays raw."""
        net: nn.Module = self.model
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
            net = self.ddp
        if self.policy.compile:
            net = torch.compile(net)
        return self.policy.wrap(net)

    def log_runtime(self) -> None:
        """One metrics line naming how this run computes: the resolved policy and the machine."""
        self.write_metrics({"step": self.step, "runtime": self.policy.record()})

    # ------------------------------------------------------------------------------------ run
    def run(self, *, resume: str | Path | None = None) -> dict[str, Any]:
        """Train up to ``train.steps`` steps, resuming from ``resume`` ("auto", a checkpoint or run folder).

        Returns a summary ``{"step", "checkpoint", "nonfinite_total"}``. Raises
        :class:`NonFiniteLossError` after ``train.max_nonfinite`` bad steps in a row.
        """
        tc = self.config.train
        try:
            if resume is not None:
                self.resume(resume)
            self._start_logging()
            self.log_runtime()
            while self.step < tc.steps:
                stats = self.train_step()
                self.maybe_log(stats)
                self.maybe_checkpoint()
                self.maybe_eval()
                self.maybe_sample()
            if self._last_checkpoint_step != self.step and self.nonfinite_in_a_row == 0:
                self.save_checkpoint()
        finally:
            self.close()
        return {"step": self.step, "checkpoint": self.last_checkpoint, "nonfinite_total": self.nonfinite_total}

    def close(self) -> None:
        """Close the progress bar and log writers; leave the process group if this trainer joined it."""
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        if self._owns_process_group:
            dist_utils.cleanup_distributed()
            self._owns_process_group = False

    # ----------------------------------------------------------------------------- one step
    def train_step(self) -> StepStats:
        """Process global batch ``self.step``: forward/backward, clip, update (or skip), EMA."""
        step = self.step
        x0, t, weights, noise = self.get_batch(step)
        self.model.train()
        torch.manual_seed(derive_seed(self.config.train.seed, "model-rng", step, self.rank))  # dropout
        per_example = self.forward_backward(x0, t, weights, noise)
        grad_norm = self.clip_gradients()
        stats = self._reduce_stats(step, per_example, grad_norm)
        if stats.applied:
            self.optimizer_step(step)
            self.ema_update()
            self.observe_timesteps(per_example)
            self.nonfinite_in_a_row = 0
        elif self.scaler.is_enabled() and math.isfinite(stats.loss):
            self.optimizer_step(step)  # fp16 overflow: the GradScaler skips the update, lowers its scale
        else:
            self.skip_step(stats)
        self.step += 1
        self.check_nonfinite_limit(stats)
        return stats

    def get_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """This process's slice of global batch ``step``: ``(x0, t, weights, noise)`` on the device."""
        tc = self.config.train
        global_bs = tc.batch_size
        part = dist_utils.shard_indices(global_bs, self.rank, self.world_size)
        indices = self.batch_indices(step)[part]
        x0 = self.dataset.get_batch(indices).to(self.device, non_blocking=True).float()
        if self.config.data.hflip and getattr(self.dataset, "kind", "image") == "image" and x0.dim() == 4:
            flip = flip_mask(global_bs, seeded_generator("cpu", tc.seed, "hflip", step))[part]
            x0 = torch.where(flip.to(self.device).view(-1, 1, 1, 1), x0.flip(-1), x0)
        gen = seeded_generator(self.device, tc.seed, "noise", step)
        t, weights = self.timestep_sampler.sample(global_bs, self.device, gen)
        noise = torch.randn((global_bs, *x0.shape[1:]), generator=gen, device=self.device)
        return x0, t[part], weights[part].float(), noise[part]

    def batch_indices(self, step: int) -> torch.Tensor:
        """Data indices ``[B]`` of global batch ``step`` (B = train.batch_size)."""
        n, bs = len(self.dataset), self.config.train.batch_size
        pos, parts = step * bs, []
        while sum(len(p) for p in parts) < bs:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, bs - sum(len(p) for p in parts))
            parts.append(self._epoch_permutation(epoch)[offset : offset + take])
            pos += take
        return torch.cat(parts)

    def _epoch_permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            gen = seeded_generator("cpu", self.config.train.seed, "data", epoch)
            self._perms[epoch] = torch.randperm(len(self.dataset), generator=gen)
        return self._perms[epoch]

    def forward_backward(
        self, x0: torch.Tensor, t: torch.Tensor, weights: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Accumulate gradients of the mean weighted loss over ``optim.grad_accum`` micro-batches.

        Each micro-batch's mean is divided by ``grad_accum`` so the gradient is that of the mean over
        this process's batch; DDP then averages over processes, giving the global-batch mean.
        Returns detached per-example ``loss``, ``mse``, ``vlb`` (or the loss) and ``t``.
        """
        accum, mb = self.config.optim.grad_accum, self.micro_batch
        outs: dict[str, list[torch.Tensor]] = {"loss": [], "mse": [], "observed": [], "t": []}
        for i in range(accum):
            part = slice(i * mb, (i + 1) * mb)
            last = i == accum - 1
            sync = contextlib.nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                losses = self.diffusion.training_losses(self.forward_model, x0[part], t[part], noise[part])
                loss = losses.loss * weights[part]
                self.scaler.scale(loss.mean() / accum).backward()
            outs["loss"].append(loss.detach().float())
            outs["mse"].append(losses.mse.detach().float())
            observed = losses.vlb if losses.vlb is not None else losses.loss
            outs["observed"].append(observed.detach().float())
            outs["t"].append(t[part])
        return {k: torch.cat(v) for k, v in outs.items()}

    def clip_gradients(self) -> torch.Tensor:
        """Unscale (fp16) and clip to ``optim.grad_clip``; returns the global norm before clipping."""
        self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))

    def _reduce_stats(self, step: int, per_example: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> StepStats:
        """Sum loss, mse and per-t-bucket mse over processes in one all-reduce (one host sync)."""
        loss, mse, t = per_example["loss"], per_example["mse"], per_example["t"]
        buckets = (t * NUM_T_BUCKETS // self.diffusion.num_timesteps).clamp_(0, NUM_T_BUCKETS - 1)
        by_t = torch.zeros(NUM_T_BUCKETS, device=mse.device).index_add_(0, buckets, mse)
        count = torch.zeros(NUM_T_BUCKETS, device=mse.device).index_add_(0, buckets, torch.ones_like(mse))
        head = torch.stack([loss.sum(), mse.sum(), grad_norm.float().to(mse.device) / self.world_size])
        values = dist_utils.all_reduce_sum(torch.cat([head, by_t, count])).tolist()
        n = self.config.train.batch_size
        loss_mean, mse_mean, norm = values[0] / n, values[1] / n, values[2]
        return StepStats(
            step=step + 1, loss=loss_mean, mse=mse_mean, grad_norm=norm, lr=self.lr_at(step),
            applied=math.isfinite(loss_mean) and math.isfinite(norm),
            mse_sum_by_t=values[3 : 3 + NUM_T_BUCKETS], count_by_t=values[3 + NUM_T_BUCKETS :],
        )

    def lr_at(self, step: int) -> float:
        return linear_warmup_lr(step, self.config.optim.lr, self.config.optim.warmup_steps)

    def optimizer_step(self, step: int) -> None:
        """AdamW step at the warm-up learning rate of ``step``, then clear the gradients."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        self.scaler.step(self.optimizer)  # with fp16 this skips the update if gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def ema_update(self) -> None:
        """Average the weights just updated; DDP keeps them identical on all processes."""
        self.ema.update(self.model)

    def observe_timesteps(self, per_example: dict[str, torch.Tensor]) -> None:
        """Feed the global batch's losses to a loss-aware timestep sampler, in the same order on all ranks."""
        if self.config.diffusion.timestep_sampling == "uniform":
            return
        t = dist_utils.all_gather_tensor(per_example["t"])
        observed = dist_utils.all_gather_tensor(per_example["observed"])
        self.timestep_sampler.observe(t, observed)

    def skip_step(self, stats: StepStats) -> None:
        """Drop the gradients of a non-finite step: no optimizer or EMA update."""
        if self.scaler.is_enabled():
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        if self.is_main:
            logger.warning(
                "step %d skipped: non-finite loss (%s) or gradient norm (%s); %d in a row (limit %d)",
                stats.step, stats.loss, stats.grad_norm, self.nonfinite_in_a_row, self.config.train.max_nonfinite,
            )

    def check_nonfinite_limit(self, stats: StepStats) -> None:
        """Stop the run after ``train.max_nonfinite`` skipped steps in a row (on every rank alike)."""
        limit = self.config.train.max_nonfinite
        if self.nonfinite_in_a_row >= limit:
            first = stats.step - self.nonfinite_in_a_row + 1
            last_good = find_latest(self.out_dir) if self.out_dir.exists() else None
            raise NonFiniteLossError(
                f"training stopped: the loss or gradient was non-finite for {self.nonfinite_in_a_row} "
                f"steps in a row (steps {first}..{stats.step}, train.max_nonfinite={limit}); no update was "
                f"applied for them. The last good checkpoint is {last_good or 'none'}. Try a lower "
                "optim.lr, optim.grad_clip > 0, train.amp='none', or check the data for NaN/inf."
            )

    # ------------------------------------------------------------------------ periodic work
    def _due(self, every: int) -> bool:
        return every > 0 and self.step % every == 0

    def maybe_log(self, stats: StepStats) -> None:
        """Progress bar every step; a metrics.jsonl line (and TensorBoard) every ``train.log_every``."""
        self._window.add(stats)
        if self._progress is not None:
            self._progress.update(1)
            if stats.applied:
                self._progress.set_postfix(loss=f"{stats.loss:.4f}", refresh=False)
        if self._due(self.config.train.log_every) or self.step == self.config.train.steps:
            self.write_metrics(self.window_metrics(stats))

    def window_metrics(self, stats: StepStats) -> dict[str, Any]:
        w, bs = self._window, self.config.train.batch_size
        elapsed = max(time.perf_counter() - w.start, 1e-9)
        k = max(w.applied, 1)
        metrics = {
            "step": self.step,
            "epoch": self.step * bs / len(self.dataset),
            "loss": w.loss / k if w.applied else None,
            "mse": w.mse / k if w.applied else None,
            "grad_norm": w.grad_norm / k if w.applied else None,
            "lr": stats.lr,
            "ema_decay": self.ema.current_decay(),
            "images_per_sec": w.steps * bs / elapsed,
            "nonfinite_steps": w.nonfinite,
            "mse_by_t_bucket": [s / c if c else None for s, c in zip(w.mse_by_t, w.count_by_t, strict=True)],
        }
        w.reset()
        if self._progress is not None:
            self._progress.set_postfix(loss=f"{metrics['loss'] or float('nan'):.4f}",
                                       img_s=f"{metrics['images_per_sec']:.1f}")
        return metrics

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Append one JSON line to ``out_dir/metrics.jsonl`` (rank 0) and mirror scalars to TensorBoard."""
        if not self.is_main:
            return
        clean = {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in metrics.items()}
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self._tb_writer is not None:
            for key, value in clean.items():
                if key == "step":
                    continue
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        if v is not None:
                            self._tb_writer.add_scalar(f"{key}/{i}", v, self.step)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb_writer.add_scalar(f"train/{key}", value, self.step)

    def maybe_checkpoint(self) -> None:
        if self._due(self.config.train.checkpoint_every):
            if self.nonfinite_in_a_row:
                if self.is_main:
                    logger.warning("step %d: not checkpointing during a run of non-finite steps", self.step)
                return
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Rank 0 writes ``out_dir/ckpt-{step}``; the others wait at barriers on both sides."""
        dist_utils.barrier()
        path = self.out_dir / f"ckpt-{self.step:08d}"
        if self.is_main:
            path = save_checkpoint(
                self.out_dir, self.step, model=self.model, ema_state=self.ema.state_dict(),
                train_state=self.train_state(), config=self.config, keep_last=self.config.train.keep_last,
            )
            logger.info("saved checkpoint %s", path)
        dist_utils.barrier()
        self.last_checkpoint, self._last_checkpoint_step = path, self.step
        return path

    def maybe_eval(self) -> None:
        if self.eval_dataset is not None and self._due(self.config.train.eval_every) and self.is_main:
            self.write_metrics({"step": self.step, **self.evaluate()})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss of the EMA model on the first ``train.eval_batches`` batches of the eval set.

        Timesteps are uniform and the noise is seeded identically every time, so the numbers are
        comparable from one evaluation to the next.
        """
        tc, ds = self.config.train, self.eval_dataset
        model = self.policy.wrap(self.ema.module)
        gen = seeded_generator(self.device, tc.seed, "eval")
        total_loss = total_mse = 0.0
        n = min(len(ds), tc.eval_batches * self.local_batch)
        for start in range(0, n, self.local_batch):
            idx = torch.arange(start, min(start + self.local_batch, n))
            x0 = ds.get_batch(idx).to(self.device).float()
            t = torch.randint(0, self.diffusion.num_timesteps, (len(idx),), generator=gen, device=self.device)
            noise = torch.randn(x0.shape, generator=gen, device=self.device)
            losses = self.diffusion.training_losses(model, x0, t, noise)
            total_loss += losses.loss.sum().item()
            total_mse += losses.mse.sum().item()
        return {"eval_loss": total_loss / max(n, 1), "eval_mse": total_mse / max(n, 1)}

    def maybe_sample(self) -> None:
        if self.sample_fn is not None and self._due(self.config.train.sample_every) and self.is_main:
            self.sample_fn(self.ema.module, self.step)

    # ------------------------------------------------------------------------- checkpoints
    def train_state(self) -> dict[str, Any]:
        """Everything besides the weights needed to resume exactly (tensors and primitives only)."""
        tc = self.config.train
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.scaler.state_dict(),
            "ema": {"num_updates": self.ema.num_updates},
            "rng": {"torch_cpu": torch.get_rng_state(), "torch_cuda": cuda_rng,
                    "scheme": "generators seeded per step from (seed, stream, step)", "seed": tc.seed},
            "data": {"step": self.step, "samples_seen": self.step * tc.batch_size,
                     "batch_size": tc.batch_size, "dataset_len": len(self.dataset)},
            "nonfinite": {"in_a_row": self.nonfinite_in_a_row, "total": self.nonfinite_total},
            "timestep_sampler": self.timestep_sampler.state_dict(),
            "world_size": self.world_size,
        }

    def resume(self, resume: str | Path) -> Path | None:
        """Restore weights, EMA, optimizer and counters from a checkpoint ("auto" = newest in out_dir)."""
        if str(resume) == "auto":
            path = find_latest(self.out_dir)
            if path is None:
                if self.is_main:
                    logger.info("no checkpoint in %s; starting from scratch", self.out_dir)
                return None
        else:
            path = resolve_checkpoint(resume)
        path, ema_state, state = load_checkpoint(path, self.model, map_location="cpu")
        self.ema.load_state_dict(ema_state, num_updates=state["ema"]["num_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler.is_enabled() and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.timestep_sampler.load_state_dict(state["timestep_sampler"])
        self.step = int(state["step"])
        self.nonfinite_in_a_row = int(state["nonfinite"]["in_a_row"])
        self.nonfinite_total = int(state["nonfinite"]["total"])
        torch.set_rng_state(state["rng"]["torch_cpu"])
        if self.device.type == "cuda" and state["rng"].get("torch_cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["torch_cuda"], self.device)
        data = state["data"]
        if self.is_main and (data["batch_size"], data["dataset_len"]) != (
            self.config.train.batch_size, len(self.dataset)
        ):
            logger.warning(
                "resuming with batch size %d / data set size %d, the checkpoint used %d / %d: the data "
                "order differs from an uninterrupted run", self.config.train.batch_size, len(self.dataset),
                data["batch_size"], data["dataset_len"],
            )
        self.last_checkpoint, self._last_checkpoint_step = path, self.step
        if self.is_main:
            logger.info("resumed from %s at step %d", path, self.step)
        return path

    # ------------------------------------------------------------------------------ logging
    def _start_logging(self) -> None:
        """Rank 0: create out_dir, save the resolved config, open the progress bar and TensorBoard."""
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.out_dir / "config.toml")
        from tqdm.auto import tqdm

        self._progress = tqdm(
            total=self.config.train.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True
        )
        if self.config.train.tensorboard:
            self._tb_writer = _tensorboard_writer(self.out_dir / "tensorboard")
        self._window.reset()


def _tensorboard_writer(log_dir: Path) -> Any:
    """A SummaryWriter, or None when the optional tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))
