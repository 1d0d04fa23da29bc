"""The training loop, composed of small named steps.

``run`` -> ``train_step`` -> (``get_batch``, ``forward_backward``, ``clip_gradients``,
``optimizer_step``, ``ema_update``), then ``maybe_log``, ``maybe_checkpoint``, ``maybe_eval`` and
``maybe_sample``. A stop signal or the time limit (:mod:`ddpm.train.stopping`) ends the loop after
the step in progress, with a checkpoint of that step.

Reproducibility and resumption rest on one rule: everything random in step ``k`` is drawn from
generators seeded by ``(seed, k)``, never from a stream carried across steps.

- Data order: a permutation of the data set per epoch, seeded by ``(seed, epoch)``; global batch
  ``k`` takes items ``[k * B, (k + 1) * B)`` of the concatenated permutations (B = global batch).
- Flips, timesteps and noise: drawn for the whole global batch from generators seeded by
  ``(seed, k)``; process ``r`` of ``w`` keeps slice ``r`` of them.
- Dropout: the global torch RNG is reseeded from ``(seed, k, rank)`` before the forward passes.

So the data position is the step number, resuming is exact, and k steps on 2 processes equal
k steps on 1 process with the same global batch (up to float summation order).

The run folder belongs to the run (lock, ownership, set-aside, metrics truncation:
:mod:`ddpm.train.run_folder`), and the NaN guard keeps destroyed weights out of it:

- after every update, the parameters are checked; an update that makes them non-finite stops the
  run at once, before the EMA or a checkpoint takes them;
- a checkpoint is written only from finite weights (raw and EMA) whose loss on the next global
  batch, computed exactly as the next step will compute it, is finite (``checkpoint_guard``), so
  every checkpoint in the folder is known to be good, and pruning, which only follows a good
  save, never deletes the newest good one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ddpm import distributed as dist_utils
from ddpm.checkpoint import (
    checkpoint_folders,
    load_checkpoint,
    nonfinite_tensors,
    prune_checkpoints,
    read_best,
    read_config,
    resolve_checkpoint,
    save_checkpoint,
    write_best,
)
from ddpm.config import (
    ConfigError,
    RunConfig,
    hyperparameter_changes,
    per_rank_batch,
    save_config,
    validate_config,
)
from ddpm.errors import CheckpointError, NonFiniteLossError, OutputError, UserError
from ddpm.nn.policy import RuntimePolicy, resolve_policy
from ddpm.processes import DiffusionProcess
from ddpm.seeding import derive_seed, seeded_generator
from ddpm.train.ema import ExponentialMovingAverage
from ddpm.train.feed import BatchFeed
from ddpm.train.progress import Progress
from ddpm.train.run_folder import METRICS_FILE, RESUME_NEWEST, RunFolder
from ddpm.train.stopping import TIME_LIMIT, StopRequest
from ddpm.train.timesteps import make_timestep_sampler

logger = logging.getLogger("ddpm.train")

NUM_T_BUCKETS = 10  # metrics report the prediction error in this many equal ranges of t
SampleFn = Callable[[nn.Module, int], Any]


@dataclass
class EvalResult:
    """What an evaluation while training measured: ``scores`` (metrics.jsonl keys, e.g. ``frechet_distance``,
    ``kid``) and the one of them, ``metric`` (lower is better), that picks the best checkpoint."""

    metric: str
    scores: dict[str, Any]

    @property
    def value(self) -> float:
        return float(self.scores[self.metric])


EvalFn = Callable[[nn.Module, int, RuntimePolicy], EvalResult]


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


def norms_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether the L2 norm of every tensor is finite: one fused reduction and one host sync.

    True proves every value finite (a NaN or inf makes its tensor's norm non-finite); False can also
    mean finite values so large (|x| beyond about 1e19) that the norm overflows, so confirm a False
    with :func:`~ddpm.checkpoint.nonfinite_tensors`. (The max-abs norm would be exact but is
    5 to 12 times slower on the CPU.)
    """
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(tensors, 2)])).all())


@dataclass
class TrainBatch:
    """This process's share of one global batch, on the training device."""

    x0: torch.Tensor  # [b, ...] data in [-1, 1] (flipped where drawn)
    y: torch.Tensor | None  # [b] class labels after label dropout (class-conditional runs), else None
    t: torch.Tensor  # [b] timesteps
    weights: torch.Tensor  # [b] importance weights of the timestep sampler
    noise: torch.Tensor  # [b, ...] eps


@dataclass
class StepStats:
    """What one optimizer step reports (already averaged over all processes)."""

    step: int  # steps done including this one (1-based, as in checkpoint names)
    loss: float  # mean objective over the global batch
    error: float  # the process's prediction error (its error_metric, e.g. the mse), mean over the global batch
    grad_norm: float  # global gradient norm before clipping
    lr: float
    applied: bool  # False when the step was skipped (non-finite loss or gradient)
    error_sum_by_t: list[float]  # per t bucket: summed error and example counts
    count_by_t: list[float]
    stop: str | None = None  # why the run stops after this step (a signal's name, "time limit"), agreed by all ranks


class _Window:
    """Accumulates step statistics between two log lines."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.steps = self.applied = self.nonfinite = 0
        self.loss = self.error = self.grad_norm = 0.0
        self.error_by_t = [0.0] * NUM_T_BUCKETS
        self.count_by_t = [0.0] * NUM_T_BUCKETS

    def add(self, s: StepStats) -> None:
        self.steps += 1
        if not s.applied:
            self.nonfinite += 1
            return
        self.applied += 1
        self.loss += s.loss
        self.error += s.error
        self.grad_norm += s.grad_norm
        self.error_by_t = [a + b for a, b in zip(self.error_by_t, s.error_sum_by_t, strict=True)]
        self.count_by_t = [a + b for a, b in zip(self.count_by_t, s.count_by_t, strict=True)]


class Trainer:
    """Trains ``model`` with ``process.training_losses`` on ``dataset``; see the module docstring.

    Arguments:
        config: the resolved run configuration (its ``train``, ``optim``, ``ema`` sections are used
            here; :func:`ddpm.fit` uses the others to build model, process and data).
        model: any ``nn.Module`` called as ``model(x_t, t)``; moved to the training device.
        process: a :class:`~ddpm.processes.protocol.DiffusionProcess` (``training_losses``,
            ``draw_noise``, ``num_timesteps``). Which
            timesteps are drawn is the trainer's (``diffusion.timestep_sampling`` of the config):
            its timestep sampler is checkpointed with the run.
        dataset: ``len(ds)``, ``ds.get_batch(indices) -> [B, ...]`` in [-1, 1], ``.kind``; or an
            on-demand data set (``ddpm.data.lazy``), read through DataLoader workers
            (``data.workers``). :class:`~ddpm.train.feed.BatchFeed` does the reading.
        eval_dataset: optional held-out data; the EMA model's loss on it is logged every
            ``train.eval_every`` steps.
        sample_fn: ``sample_fn(ema_model, step)`` called on rank 0 every ``train.sample_every`` steps.
        eval_fn: ``eval_fn(ema_model, step, policy)`` called on every rank every ``train.eval_every``
            steps (:func:`ddpm.fit` samples and measures there); its best score picks the run's best
            checkpoint (``best.json``, never pruned).
        started: ``time.monotonic()`` when the run's clock started, which ``train.time_limit`` counts
            from (default: now; :func:`ddpm.fit` passes the time it was called).

    Under torchrun the process group is joined here (``setup_distributed``) and left in ``close``.
    """

    def __init__(
        self,
        config: RunConfig,
        model: nn.Module,
        process: DiffusionProcess,
        dataset: Any,
        *,
        eval_dataset: Any = None,
        sample_fn: SampleFn | None = None,
        eval_fn: EvalFn | None = None,
        started: float | None = None,
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

        self.config, self.process, self.dataset = config, process, dataset
        self.timestep_sampler = make_timestep_sampler(config.diffusion.timestep_sampling, process.num_timesteps)
        self.eval_dataset, self.sample_fn, self.eval_fn = eval_dataset, sample_fn, eval_fn
        self.best: dict[str, Any] | None = None  # the run folder's best-checkpoint record (best.json)
        self._eval_seconds = 0.0
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
        self.last_checkpoint: Path | None = None  # the newest checkpoint known to be good (written or resumed)
        self._last_checkpoint_step: int | None = None
        self.feed = BatchFeed(
            dataset, batch_size=tc.batch_size, seed=tc.seed, rank=self.rank, world_size=self.world_size,
            device=self.device, workers=config.data.workers,
        )
        self._run_folder: RunFolder | None = None
        self._resume_record: dict[str, Any] | None = None
        self.last_refusal: str | None = None  # why the checkpoint guard last refused to save
        self._window = _Window()
        self._progress: Progress | None = None
        self._tb_writer = None
        self.stop = StopRequest(grace_period=tc.grace_period, time_limit=tc.time_limit, started=started)
        self.stopped: str | None = None  # why the run stopped before train.steps (None: it did not)
        self._step_seconds = 0.0  # slowly decaying maxima of the measured step and checkpoint times
        self._checkpoint_seconds: float | None = None

    # ---------------------------------------------------------------------------------- setup
    def _wrap_model(self) -> nn.Module:
        """DDP (several processes), then torch.compile, then the policy's autocast; ``self.model`` stays raw."""
        net: Any = self.model
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
    def run(self, *, resume: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
        """Train up to ``train.steps`` steps in the run folder ``train.out_dir``.

        ``resume``: None (a new run: refused in a folder holding checkpoints), "auto" (the folder's
        newest usable checkpoint, or from scratch in a folder without checkpoints), or a checkpoint
        or run folder. ``overwrite``: delete the previous run in the folder and start over. See
        :mod:`ddpm.train.run_folder` for the rules. Returns a summary ``{"step", "checkpoint",
        "nonfinite_total", "set_aside", "stopped"}``; ``checkpoint`` is the newest good checkpoint (it
        exists) or None; ``stopped`` says why the run ended before ``train.steps`` (a signal's name or
        "time limit", see :mod:`ddpm.train.stopping`), None when it did not. Raises
        :class:`NonFiniteLossError` when training blows up, including a run that reaches its last
        step with weights the checkpoint guard refuses.
        """
        tc = self.config.train
        try:
            checkpoint = self.open_run_folder(resume=resume, overwrite=overwrite)
            best = read_best(self.out_dir) if self.is_main else None
            self.best = cast("dict[str, Any] | None", dist_utils.broadcast_object(best))
            with self.stop.installed():
                if checkpoint is not None:
                    self.resume(checkpoint, auto=str(resume) == "auto")
                self._start_logging()
                self.log_runtime()
                while self.step < tc.steps and self.stopped is None:
                    started = time.perf_counter()
                    stats = self.train_step()
                    self._note_seconds("_step_seconds", time.perf_counter() - started)
                    self.maybe_log(stats)
                    self.stopped = stats.stop
                    if self.stopped is None:
                        self.maybe_checkpoint()
                        self.maybe_eval()
                        self.maybe_sample()
                if self._last_checkpoint_step != self.step and self.save_checkpoint() is None:
                    raise NonFiniteLossError(
                        f"training reached step {self.step}, but its weights cannot be checkpointed: "
                        f"{self.last_refusal}. The last good checkpoint is {self.last_good_checkpoint() or 'none'}."
                    )
                if self.stopped is not None:
                    self.record_stop()
        finally:
            self.close()
        set_aside = self._run_folder.set_aside if self._run_folder is not None else None
        return {"step": self.step, "checkpoint": self.last_checkpoint, "nonfinite_total": self.nonfinite_total,
                "set_aside": set_aside, "stopped": self.stopped}

    def _note_seconds(self, name: str, seconds: float) -> None:
        """Keep a slowly decaying maximum of a measured duration (what the time limit plans with)."""
        setattr(self, name, max(0.9 * (getattr(self, name) or 0.0), seconds))

    def stop_votes(self) -> tuple[float, float]:
        """(signalled, out of time) of this process; :meth:`_reduce_stats` sums them over processes."""
        if self.stop.reason is None and self.stop.time_is_up(self._step_seconds, self.checkpoint_seconds()):
            self.stop.request(TIME_LIMIT)
        if self.stop.reason is None:
            return 0.0, 0.0
        return (0.0, 1.0) if self.stop.reason == TIME_LIMIT else (1.0, 0.0)

    def checkpoint_seconds(self) -> float:
        """Measured seconds of a checkpoint (guard and write); before the first, an estimate from the step time
        and the bytes to write (weights, EMA and two AdamW moments, at 50 MB/s)."""
        if self._checkpoint_seconds is not None:
            return self._checkpoint_seconds
        nbytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return 2.0 * self._step_seconds + 1.0 + 4 * nbytes / 50e6

    def record_stop(self) -> None:
        """Log and record in metrics.jsonl that the run stopped early, why, and how long after the request."""
        after = self.stop.seconds_since_signal()
        if self.is_main:
            logger.warning("stopped at step %d (%s); checkpoint %s", self.step, self.stopped, self.last_checkpoint)
        self.write_metrics({"step": self.step, "event": "stopped", "reason": self.stopped,
                            "checkpoint": str(self.last_checkpoint),
                            "seconds_after_request": None if after is None else round(after, 3)})

    def open_run_folder(self, *, resume: str | Path | None, overwrite: bool = False) -> Path | None:
        """Rank 0 takes the run folder (:meth:`RunFolder.open`); every rank learns the checkpoint to resume from.

        A refusal on rank 0 is raised on every rank, so all processes stop with the same message.
        """
        outcome: list[Any] = [None]
        if self.is_main:
            self._run_folder = RunFolder(self.out_dir)
            try:
                outcome[0] = self._run_folder.open(resume=resume, overwrite=overwrite).checkpoint
            except UserError as exc:
                if not dist_utils.is_distributed():
                    raise
                outcome[0] = exc
        if dist_utils.is_distributed():
            torch.distributed.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], UserError):
            raise outcome[0] if self.is_main else UserError(str(outcome[0]))
        return outcome[0]

    def close(self) -> None:
        """Stop the data workers, close the progress bar and log writers; leave the process group if joined."""
        self.feed.close()
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        if self._run_folder is not None:
            self._run_folder.close()
        if self._owns_process_group:
            dist_utils.cleanup_distributed()
            self._owns_process_group = False

    # ----------------------------------------------------------------------------- one step
    def train_step(self) -> StepStats:
        """Process global batch ``self.step``: forward/backward, clip, update (or skip), EMA."""
        step = self.step
        batch = self.get_batch(step)
        self.model.train()
        torch.manual_seed(derive_seed(self.config.train.seed, "model-rng", step, self.rank))  # dropout
        per_example = self.forward_backward(batch)
        grad_norm = self.clip_gradients()
        stats = self._reduce_stats(step, per_example, grad_norm, self.stop_votes())
        if stats.applied:
            self.optimizer_step(step)
            self.check_weights_finite(stats)
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

    def get_batch(self, step: int) -> TrainBatch:
        """This process's slice of global batch ``step``, on the device (see :class:`TrainBatch`)."""
        tc = self.config.train
        global_bs = tc.batch_size
        part = self.feed.part
        fed = self.feed.get(step)
        x0 = fed.x0
        if self.config.data.hflip and getattr(self.dataset, "kind", "image") == "image" and x0.dim() == 4:
            flip = flip_mask(global_bs, seeded_generator("cpu", tc.seed, "hflip", step))[part]
            x0 = torch.where(flip.to(self.device).view(-1, 1, 1, 1), x0.flip(-1), x0)
        y = self.class_labels(fed.y, step) if self.config.model.class_cond else None
        gen = seeded_generator(self.device, tc.seed, "noise", step)
        t, weights = self.timestep_sampler.sample(global_bs, self.device, gen)
        noise = self.process.draw_noise((global_bs, *x0.shape[1:]), gen, device=self.device)
        return TrainBatch(x0, y, t[part], weights[part].float(), noise[part])

    def class_labels(self, y: torch.Tensor | None, step: int) -> torch.Tensor:
        """The labels a conditional network trains on: each replaced by the null class with probability
        ``model.cond_drop`` (label dropout for classifier-free guidance), drawn for the global batch from
        (seed, step) like every other random choice of the step."""
        mc = self.config.model
        if y is None:
            raise ConfigError("model.class_cond needs labelled data (built-in digit sets, class sub-folders, "
                              "an .npz with labels, or a datasets set with a label column)")
        drop = torch.rand(self.config.train.batch_size, generator=seeded_generator("cpu", self.config.train.seed,
                                                                                 "cond-drop", step))
        drop = (drop < mc.cond_drop)[self.feed.part].to(y.device)
        return torch.where(drop, torch.full_like(y, int(mc.num_classes or 0)), y)

    def forward_backward(self, batch: TrainBatch) -> dict[str, torch.Tensor]:
        """Accumulate gradients of the mean weighted loss over ``optim.grad_accum`` micro-batches.

        Each micro-batch's mean is divided by ``grad_accum`` so the gradient is that of the mean over
        this process's batch; DDP then averages over processes, giving the global-batch mean.
        Returns detached per-example ``loss``, ``error``, ``observed`` (``vlb`` or the loss) and ``t``.
        """
        accum, mb = self.config.optim.grad_accum, self.micro_batch
        x0, y, t, weights, noise = batch.x0, batch.y, batch.t, batch.weights, batch.noise
        outs: dict[str, list[torch.Tensor]] = {"loss": [], "error": [], "observed": [], "t": []}
        for i in range(accum):
            part = slice(i * mb, (i + 1) * mb)
            last = i == accum - 1
            sync = contextlib.nullcontext() if (self.ddp is None or last) else self.ddp.no_sync()
            with sync:
                losses = self.process.training_losses(self.forward_model, x0[part], t[part], noise[part],
                                                        y=None if y is None else y[part])
                loss = losses.loss * weights[part]
                self.scaler.scale(loss.mean() / accum).backward()
            outs["loss"].append(loss.detach().float())
            outs["error"].append(losses.error.detach().float())
            observed = losses.vlb if losses.vlb is not None else losses.loss
            outs["observed"].append(observed.detach().float())
            outs["t"].append(t[part])
        return {k: torch.cat(v) for k, v in outs.items()}

    def clip_gradients(self) -> torch.Tensor:
        """Unscale (fp16) and clip to ``optim.grad_clip``; returns the global norm before clipping."""
        self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))

    def _reduce_stats(self, step: int, per_example: dict[str, torch.Tensor], grad_norm: torch.Tensor,
                      stop_votes: tuple[float, float] = (0.0, 0.0)) -> StepStats:
        """Sum loss, error, per-t-bucket error and the stop votes over processes in one all-reduce (one host sync).

        ``stop_votes`` is (signalled, out of time) of this process: one process's vote stops every
        process after this step.
        """
        loss, error, t = per_example["loss"], per_example["error"], per_example["t"]
        buckets = (t * NUM_T_BUCKETS // self.process.num_timesteps).clamp_(0, NUM_T_BUCKETS - 1)
        by_t = torch.zeros(NUM_T_BUCKETS, device=error.device).index_add_(0, buckets, error)
        count = torch.zeros(NUM_T_BUCKETS, device=error.device).index_add_(0, buckets, torch.ones_like(error))
        head = torch.stack([loss.sum(), error.sum(), grad_norm.float().to(error.device) / self.world_size])
        votes = torch.tensor(stop_votes, device=error.device)
        values = dist_utils.all_reduce_sum(torch.cat([head, votes, by_t, count])).tolist()
        n = self.config.train.batch_size
        loss_mean, error_mean, norm = values[0] / n, values[1] / n, values[2]
        stop = None
        if values[3] or values[4]:  # this process's own reason, else the one another process voted for
            stop = self.stop.reason or ("a signal to another process" if values[3] else TIME_LIMIT)
        return StepStats(
            step=step + 1, loss=loss_mean, error=error_mean, grad_norm=norm, lr=self.lr_at(step),
            applied=math.isfinite(loss_mean) and math.isfinite(norm),
            error_sum_by_t=values[5 : 5 + NUM_T_BUCKETS], count_by_t=values[5 + NUM_T_BUCKETS :], stop=stop,
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

    def check_weights_finite(self, stats: StepStats) -> None:
        """Stop the run if the update just applied made a parameter non-finite (before the EMA takes it)."""
        if norms_finite([p.detach() for p in self.model.parameters()]):
            return
        bad = nonfinite_tensors(dict(self.model.named_parameters()))
        if not bad:
            return  # finite, only too large for their norm: the checkpoint guard judges such weights
        names = ", ".join(bad[:4]) + (", ..." if len(bad) > 4 else "")
        raise NonFiniteLossError(
            f"training stopped at step {stats.step}: its update (lr {stats.lr:g}, gradient norm {stats.grad_norm:g}) "
            f"made {len(bad)} parameter tensor(s) non-finite ({names}); the EMA and the checkpoints never took "
            f"them. The last good checkpoint is {self.last_good_checkpoint() or 'none'}. Try a lower optim.lr or "
            "optim.grad_clip > 0."
        )

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
            last_good = self.last_good_checkpoint()
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
            self._progress.advance(stats.loss if stats.applied else None)
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
            self.process.error_metric: w.error / k if w.applied else None,
            "grad_norm": w.grad_norm / k if w.applied else None,
            "lr": stats.lr,
            "ema_decay": self.ema.current_decay(),
            "images_per_sec": w.steps * bs / elapsed,
            "nonfinite_steps": w.nonfinite,
            f"{self.process.error_metric}_by_t_bucket": [s / c if c else None
                                                         for s, c in zip(w.error_by_t, w.count_by_t, strict=True)],
        }
        w.reset()
        if self._progress is not None:
            self._progress.report(metrics)
        return metrics

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Append one JSON line to ``out_dir/metrics.jsonl`` (rank 0) and mirror scalars to TensorBoard."""
        if not self.is_main:
            return
        clean = {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in metrics.items()}
        path = self.out_dir / METRICS_FILE
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(clean) + "\n")
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
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
            self.save_checkpoint()

    def save_checkpoint(self) -> Path | None:
        """Write ``out_dir/ckpt-{step}`` if :meth:`checkpoint_guard` allows; returns it, or None if refused.

        Every rank runs the guard (its loss is all-reduced, so all decide alike); rank 0 writes and
        the others wait at barriers on both sides.
        """
        started = time.perf_counter()
        refusal, next_loss = self.checkpoint_guard()
        self.last_refusal = refusal
        if refusal is not None:
            if self.is_main:
                logger.warning("step %d: not checkpointing: %s; the last good checkpoint stays %s", self.step,
                               refusal, self.last_good_checkpoint() or "none")
            return None
        dist_utils.barrier()
        path = self.out_dir / f"ckpt-{self.step:08d}"
        if self.is_main:
            path = save_checkpoint(
                self.out_dir, self.step, model=self.model, ema_state=self.ema.state_dict(),
                train_state=self.train_state(), config=self.config, keep_last=self.config.train.keep_last,
                extra_meta={"guard": {"weights_finite": True, "next_batch_loss": next_loss}},
            )
            logger.info("saved checkpoint %s", path)
        dist_utils.barrier()
        self.last_checkpoint, self._last_checkpoint_step = path, self.step
        self._note_seconds("_checkpoint_seconds", time.perf_counter() - started)
        return path

    def last_good_checkpoint(self) -> Path | None:
        """The newest checkpoint this run wrote or resumed from (each passed the guard), if it still exists."""
        path = self.last_checkpoint
        return path if path is not None and path.is_dir() else None

    def checkpoint_guard(self) -> tuple[str | None, float]:
        """Why the current weights must not be checkpointed (None: they may be), and their next-batch loss.

        The raw and EMA weights must be finite, and the raw weights' loss on the next global batch
        (:meth:`next_batch_loss`) must be finite: a step's own loss is measured before its update,
        so only the next batch can tell whether the update destroyed the weights.
        """
        bad = nonfinite_tensors(self.model.state_dict())
        bad += [f"ema {k}" for k in nonfinite_tensors(self.ema.state_dict())]
        if bad:
            return f"non-finite weights ({', '.join(bad[:4])})", float("nan")
        loss = self.next_batch_loss()
        if not math.isfinite(loss):
            return f"the weights give a non-finite loss ({loss}) on the next batch", loss
        return None, loss

    @torch.no_grad()
    def next_batch_loss(self) -> float:
        """The mean weighted loss of global batch ``self.step`` under the current raw weights.

        Computed as :meth:`train_step` will compute it (same data, flips, timesteps, noise and
        dropout seeds, per micro-batch) but without gradients and without changing any state: the
        global RNG and the model's buffers (e.g. BatchNorm statistics) are restored afterwards.
        """
        step, accum, mb = self.step, self.config.optim.grad_accum, self.micro_batch
        batch = self.get_batch(step)
        x0, y, t, weights, noise = batch.x0, batch.y, batch.t, batch.weights, batch.noise
        model, buffers = self.policy.wrap(self.model), {k: v.clone() for k, v in self.model.named_buffers()}
        was_training = self.model.training
        self.model.train()
        total = torch.zeros((), device=self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(derive_seed(self.config.train.seed, "model-rng", step, self.rank))
            for i in range(accum):
                part = slice(i * mb, (i + 1) * mb)
                losses = self.process.training_losses(model, x0[part], t[part], noise[part],
                                                        y=None if y is None else y[part])
                total += (losses.loss * weights[part]).float().sum()
        self.model.train(was_training)
        for name, value in self.model.named_buffers():
            value.copy_(buffers[name])
        return dist_utils.all_reduce_sum(total.reshape(1)).item() / self.config.train.batch_size

    def maybe_eval(self) -> None:
        """Every ``train.eval_every`` steps: the EMA model's loss on the eval set, and the evaluation of its
        samples (:attr:`eval_fn`), which keeps the best checkpoint."""
        if not self._due(self.config.train.eval_every):
            return
        metrics: dict[str, Any] = {"step": self.step}
        if self.eval_dataset is not None and self.is_main:
            metrics.update(self.evaluate())
        if self.eval_fn is not None:
            started = time.perf_counter()
            result = self.eval_fn(self.ema.module, self.step, self.policy)
            self._eval_seconds += time.perf_counter() - started
            run_seconds = max(time.monotonic() - self.stop.started, 1e-9)
            metrics.update(result.scores, eval_seconds=round(self._eval_seconds, 2),
                           eval_share=round(self._eval_seconds / run_seconds, 4))
            best = self.keep_if_best(result)
            if self._progress is not None:
                self._progress.evaluated(result.metric, result.value, self.step, best=best,
                                         share=metrics["eval_share"])
        if len(metrics) > 1:
            self.write_metrics(metrics)

    def keep_if_best(self, result: EvalResult) -> bool:
        """Checkpoint this step and name it in ``best.json`` when ``result`` beats the best so far (lower is
        better); rank 0 decides for all. Pruning never deletes the best checkpoint. Returns whether it did."""
        best = self.best
        improved = best is None or best.get("metric") != result.metric or result.value < float(best["value"])
        if not dist_utils.broadcast_object(improved and math.isfinite(result.value)):
            return False
        path = self.last_checkpoint if self._last_checkpoint_step == self.step else self.save_checkpoint()
        if path is None:  # the checkpoint guard refused these weights: they are no one's best
            return False
        self.best = {"step": self.step, "checkpoint": path.name, "metric": result.metric, "value": result.value}
        if self.is_main:
            write_best(self.out_dir, self.best)
            prune_checkpoints(self.out_dir, self.config.train.keep_last)  # the previous best is an ordinary one now
        return True

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss of the EMA model on the first ``train.eval_batches`` batches of the eval set.

        Timesteps are uniform and the noise is seeded identically every time, so the numbers are
        comparable from one evaluation to the next.
        """
        tc, ds = self.config.train, self.eval_dataset
        model = self.policy.wrap(self.ema.module)
        gen = seeded_generator(self.device, tc.seed, "eval")
        total_loss = total_error = 0.0
        n = min(len(ds), tc.eval_batches * self.local_batch)
        for start in range(0, n, self.local_batch):
            idx = torch.arange(start, min(start + self.local_batch, n))
            x0 = ds.get_batch(idx).to(self.device).float()
            t = torch.randint(0, self.process.num_timesteps, (len(idx),), generator=gen, device=self.device)
            noise = self.process.draw_noise(x0.shape, gen, device=self.device)
            y = ds.get_labels(idx) if self.config.model.class_cond else None  # the conditional loss, true labels
            losses = self.process.training_losses(model, x0, t, noise, y=None if y is None else y.to(self.device))
            total_loss += losses.loss.sum().item()
            total_error += losses.error.sum().item()
        return {"eval_loss": total_loss / max(n, 1), f"eval_{self.process.error_metric}": total_error / max(n, 1)}

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

    def resume(self, resume: str | Path, *, auto: bool = False) -> Path | None:
        """Restore weights, EMA, optimizer and counters from a checkpoint or run folder.

        "auto" and "latest" are the newest usable checkpoint of ``out_dir``; for "auto" None is
        returned when ``out_dir`` holds no checkpoint folder at all. :class:`~ddpm.errors.CheckpointError`
        is raised when it holds some but none is usable (or none, for "latest"). Hyperparameters that
        differ from the checkpoint's are logged as a warning (and recorded in the metrics by
        :meth:`run`); with ``auto`` (``--resume auto``, the same command line repeated by a requeued
        job) they are refused: the folder holds another run.
        """
        if str(resume) in RESUME_NEWEST:
            if not checkpoint_folders(self.out_dir):
                if str(resume) == "latest":
                    raise CheckpointError(f"nothing to resume: {self.out_dir} holds no checkpoint")
                if self.is_main:
                    logger.info("no checkpoint in %s; starting from scratch", self.out_dir)
                return None
            auto = auto or str(resume) == "auto"
            resume = self.out_dir
        path = resolve_checkpoint(resume)
        changes = hyperparameter_changes(read_config(path), self.config)
        if auto and changes:
            raise CheckpointError(
                f"--resume auto: {self.out_dir} holds another run ({path.name} differs in "
                + "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
                + "): pass --resume to continue it with these changes, or choose another --out")
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
        self._resume_record = {"step": self.step, "event": "resumed", "checkpoint": str(path),
                               "changed": {k: list(v) for k, v in changes.items()}}
        if self.is_main:
            logger.info("resumed from %s at step %d", path, self.step)
            if changes:
                logger.warning("resuming %s with changed hyperparameters: %s", path,
                               "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))
        return path

    # ------------------------------------------------------------------------------ logging
    def _start_logging(self) -> None:
        """Rank 0: create out_dir, save the resolved config, open the progress bar and TensorBoard."""
        if not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.out_dir / "config.toml")
        if self._resume_record is not None:
            self.write_metrics(self._resume_record)
        self._progress = Progress(self.config.train.steps, self.step)
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
