"""The training data feed: global batch ``k`` -> this process's share of it, on the device.

Order (the rule of ``ddpm.train.trainer``): epoch ``e`` is ``torch.randperm(N)`` drawn from a
generator seeded by ``(seed, "data", e)``; global batch ``k`` is items ``[k B, (k + 1) B)`` of the
concatenated permutations; process ``r`` of ``w`` keeps the contiguous slice ``r`` of it
(``shard_indices``). The data position is the step number, so resuming needs no data state.

Two ways of reading, giving the same tensors for the same step and rank:

- in memory (``dataset.streamed`` false, an ``ArrayDataset``): one ``get_batch`` in this process;
- on demand (``dataset.streamed`` true, ``ddpm.data.lazy``): a ``DataLoader`` whose sampler yields
  this process's indices step after step from the current step on; ``workers`` processes call
  ``dataset.read(indices)`` ahead of time (``prefetch`` batches each), stay alive across epochs,
  and hand over uint8 pixels, pinned on CUDA; the [-1, 1] mapping happens on the device. Only
  this process's share of each batch is read, so no process holds the data set.

A batch asked for out of turn (the first one, or after a resume) restarts the sampler there.

A stream without random access (``dataset.iterable``, ``ddpm.data.hf.HFStream``) has its own
order: epoch ``e`` is the stream shuffled with the seed ``(seed, "data", e)``, and global batch
``k`` is positions ``[k B, (k + 1) B)`` of the concatenated epochs. Worker ``w`` of ``W`` reads the
stream and decodes only this process's share of steps ``start + w``, ``start + w + W``, ...; the
DataLoader hands them over in step order. With ``skip_bad_images`` an undecodable example is
replaced by the next decodable one in stream order, whoever's it is.
Undecodable files met with ``skip_bad_images`` are counted in ``skipped_files`` and logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from ddpm.data.arrays import ImageBatch, uint8_to_float
from ddpm.data.images import ImageDecodeError
from ddpm.distributed import shard_indices
from ddpm.errors import DataError
from ddpm.seeding import derive_seed, seeded_generator

logger = logging.getLogger("ddpm.train")


@dataclass(frozen=True)
class FedBatch:
    """This process's share of one global batch, on the training device."""

    x0: Tensor  # float32 [b, ...], images in [-1, 1]
    y: Tensor | None  # int64 [b] class labels, or None for unlabelled data


def default_loader_workers() -> int:
    """DataLoader workers per process: this node's CPUs shared among its processes, less one, in [1, 8]."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(8, per_process - 1))


class BatchFeed:
    """Global batch ``k`` -> ``FedBatch`` for process ``rank`` of ``world_size`` (see the module docstring).

    Arguments:
        dataset: ``len``, ``get_batch`` and ``get_labels`` (in memory), or also ``read`` and
            ``streamed = True`` (on demand).
        batch_size: the GLOBAL batch B.
        seed: the run's seed (the permutations depend on it and on the epoch only).
        workers: DataLoader worker processes for on-demand data (None = ``default_loader_workers()``;
            0 reads in this process).
        prefetch: batches each worker reads ahead.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        workers: int | None = None,
        prefetch: int = 2,
    ) -> None:
        if len(dataset) == 0:
            raise DataError("the training data set is empty")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.device = torch.device(device)
        self.part = shard_indices(batch_size, rank, world_size)
        self.streamed = bool(getattr(dataset, "streamed", False))
        self.workers = default_loader_workers() if workers is None else workers
        self.prefetch = prefetch
        self.skipped_files: dict[str, None] = {}  # an ordered set
        self._perms: dict[int, Tensor] = {}
        self._loader: DataLoader | None = None
        self._sampler: _StepSampler | None = None
        self._iterator: Iterator[Any] | None = None
        self._next_step: int | None = None
        self._last: tuple[int, FedBatch] | None = None  # the batch returned last, by step

    # ------------------------------------------------------------------------------ order
    def indices(self, step: int) -> Tensor:
        """Data indices ``[B]`` of global batch ``step``."""
        n, bs = len(self.dataset), self.batch_size
        pos, parts, taken = step * bs, [], 0
        while taken < bs:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, bs - taken)
            parts.append(self.epoch_permutation(epoch)[offset : offset + take])
            pos, taken = pos + take, taken + take
        return torch.cat(parts)

    def local_indices(self, step: int) -> Tensor:
        """This process's slice of ``indices(step)``."""
        return self.indices(step)[self.part]

    def epoch_permutation(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            gen = seeded_generator("cpu", self.seed, "data", epoch)
            self._perms[epoch] = torch.randperm(len(self.dataset), generator=gen)
        return self._perms[epoch]

    # ---------------------------------------------------------------------------- reading
    def get(self, step: int) -> FedBatch:
        """This process's share of global batch ``step`` on the device.

        The last batch is kept, so asking for the same step again (the checkpoint guard reads the
        next batch before the step that trains on it) neither reads it twice nor restarts the workers.
        """
        if self._last is not None and self._last[0] == step:
            return self._last[1]
        fed = self._fetch(step)
        self._last = (step, fed)
        return fed

    def _fetch(self, step: int) -> FedBatch:
        if not self.streamed:
            index = self.local_indices(step)
            x0 = self.dataset.get_batch(index).to(self.device, non_blocking=True).float()
            labels = self.dataset.get_labels(index) if hasattr(self.dataset, "get_labels") else None
            return FedBatch(x0, None if labels is None else labels.to(self.device))
        batch = self._read_streamed(step)
        x0 = uint8_to_float(batch.images.to(self.device, non_blocking=True))
        return FedBatch(x0, None if batch.labels is None else batch.labels.to(self.device, non_blocking=True))

    def _read_streamed(self, step: int) -> ImageBatch:
        if self._iterator is None or self._next_step != step:
            self._iterator = iter(self._make_loader(step))
        self._next_step = step + 1
        item = next(self._iterator)
        if isinstance(item, _ReadFailure):
            raise item.error_type(item.message)
        if item.skipped:
            self._note_skipped(step, item.skipped)
        return item

    def _make_loader(self, start: int) -> DataLoader:
        """The DataLoader, created once (its workers persist); its sampler restarts at ``start``.

        A stream gets a new DataLoader (and workers) at each restart: its position lives in them.
        """
        if getattr(self.dataset, "iterable", False):
            view = _StreamView(self.dataset, batch_size=self.batch_size, part=self.part, seed=self.seed, start=start)
            stream_extra: dict[str, Any] = {"prefetch_factor": self.prefetch} if self.workers > 0 else {}
            self._loader = DataLoader(view, batch_size=None, collate_fn=_as_is, num_workers=self.workers,
                                      pin_memory=self.device.type == "cuda", worker_init_fn=shield_worker,
                                      **stream_extra)
        elif self._loader is None:
            self._sampler = _StepSampler(self, start)
            extra: dict[str, Any] = {}
            if self.workers > 0:
                extra = {"persistent_workers": True, "prefetch_factor": self.prefetch}
            self._loader = DataLoader(
                cast(Dataset, _ReadView(self.dataset)), sampler=self._sampler, batch_size=None, collate_fn=_as_is,
                num_workers=self.workers, pin_memory=self.device.type == "cuda", worker_init_fn=shield_worker, **extra,
            )
        else:
            assert self._sampler is not None
            self._sampler.start = start
        return self._loader

    def _note_skipped(self, step: int, files: tuple[str, ...]) -> None:
        new = [f for f in files if f not in self.skipped_files]
        self.skipped_files.update(dict.fromkeys(files))
        if new:
            logger.warning(
                "step %d: skipped %d undecodable image file(s), each replaced by the next decodable one "
                "(%d skipped so far): %s", step, len(new), len(self.skipped_files), ", ".join(new[:3]),
            )

    def close(self) -> None:
        """Stop the worker processes (a later ``get`` starts new ones)."""
        self._iterator = self._loader = self._sampler = None
        self._next_step = None


def shield_worker(worker_id: int) -> None:
    """A DataLoader worker ignores the stop signals, which reach the whole process group (Ctrl-C, Slurm).

    The training process decides when to stop (:mod:`ddpm.train.stopping`) and needs its workers
    for the step it finishes; it shuts them down when it is done, and they exit with it.
    """
    import signal

    from ddpm.train.stopping import STOP_SIGNALS

    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class _StepSampler(Sampler[list[int]]):
    """Yields this process's indices of step ``start``, ``start + 1``, ... (endless)."""

    def __init__(self, feed: BatchFeed, start: int) -> None:
        self.feed, self.start = feed, start

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while True:
            yield self.feed.local_indices(step).tolist()
            step += 1


@dataclass(frozen=True)
class _ReadFailure:
    """A user error met in a worker, carried to the main process to be raised there without a traceback."""

    error_type: type[DataError]
    message: str


class _ReadView:
    """What a worker sees: ``view[indices] -> dataset.read(indices)``, user errors caught as values."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> ImageBatch | _ReadFailure:
        try:
            return self.dataset.read(indices)
        except DataError as exc:
            return _ReadFailure(type(exc), str(exc))


class _StreamView(IterableDataset):
    """What a worker of a stream runs: its steps' shares of the stream, in step order (module docstring)."""

    def __init__(self, dataset: Any, *, batch_size: int, part: slice, seed: int, start: int) -> None:
        self.dataset, self.batch_size, self.part, self.seed, self.start = dataset, batch_size, part, seed, start

    def __iter__(self) -> Iterator[ImageBatch | _ReadFailure]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            yield from self._batches(self.start + worker, num_workers)
        except DataError as exc:
            yield _ReadFailure(type(exc), str(exc))

    def _batches(self, step: int, stride: int) -> Iterator[ImageBatch]:
        ds, bs, n = self.dataset, self.batch_size, len(self.dataset)
        lo, hi = self.part.start, self.part.stop
        filled: dict[int, tuple[Any, int | None]] = {}  # slot j of the batch -> (pixels, label)
        waiting: list[int] = []  # slots whose example was undecodable: the next decodable one fills them
        skipped: list[str] = []
        epoch = step * bs // n
        while True:
            count = 0
            for i, example in enumerate(ds.epoch(derive_seed(self.seed, "data", epoch) % 2**32)):
                count += 1
                position = epoch * n + i
                k, j = divmod(position, bs)
                ours = k == step and lo <= j < hi
                if not (ours or waiting):
                    continue
                try:
                    decoded = ds.decode(example, position)
                except ImageDecodeError as exc:
                    if not ds.skip_bad_images:
                        raise
                    if ours:
                        waiting.append(j)
                        skipped.append(str(exc))
                    continue
                filled.update({slot: decoded for slot in waiting})
                waiting.clear()
                if ours:
                    filled[j] = decoded
                if len(filled) == hi - lo:
                    yield _stack([filled[j] for j in range(lo, hi)], tuple(skipped))
                    filled, skipped, step = {}, [], step + stride
            if count != n:
                raise DataError(f"{ds.name}: a pass over the stream gave {count} examples, its metadata says {n}")
            epoch += 1


def _stack(items: list[tuple[Any, int | None]], skipped: tuple[str, ...]) -> ImageBatch:
    pixels = torch.from_numpy(np.stack([p for p, _ in items]))
    labels = None if items[0][1] is None else torch.tensor([y for _, y in items], dtype=torch.int64)
    return ImageBatch(pixels, labels, skipped)


def _as_is(batch: Any) -> Any:
    return batch
