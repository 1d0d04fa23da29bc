"""Run folders: a run folder belongs to one run.

A run folder holds ``ckpt-*/`` checkpoints, ``metrics.jsonl``, ``config.toml``, ``samples/`` and
``tensorboard/``, and ``run.lock`` while a run is in it. :meth:`RunFolder.open` (called by
``Trainer.run`` on rank 0) enforces these rules; :func:`check_run_folder` checks them beforehand
without changing anything, so a command can fail before it loads data.

- One run at a time. A run holds an exclusive ``flock`` on ``run.lock``, whose text names its host
  and pid; a second run is refused with those. The kernel drops the lock when its process dies,
  however it dies, so a lock file left by a killed run is stale and is taken over (with a log line).
- A new run in a folder that holds checkpoints is refused: they are another run's. ``resume``
  continues that run; ``overwrite=True`` deletes its files (checkpoints, metrics, config, sample
  grids, TensorBoard logs) and starts over.
- Resuming from a checkpoint older than the folder's newest moves every newer checkpoint folder,
  and the metrics lines after the resumed step, into ``set-aside/<time>-after-step-<step>/``;
  nothing is deleted. ``best.json`` (the best checkpoint of the evaluation while training) goes
  with them when the checkpoint it names does. Resuming from a checkpoint outside the folder into a folder that holds
  checkpoints is refused (it would mix two runs) unless ``overwrite=True`` clears it first.
- ``metrics.jsonl`` holds no line past the step the run starts from (0 for a new run), so a
  resumed run logs every step once.
- A kill between the two renames of a re-save (see :mod:`ddpm.checkpoint`) is undone: the
  old checkpoint is renamed back; temporary folders of unfinished writes are removed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ddpm.checkpoint import (
    BEST_FILE,
    CKPT_PREFIX,
    REPLACED_PREFIX,
    TMP_PREFIX,
    best_checkpoint,
    checkpoint_folders,
    checkpoint_name,
    checkpoint_step,
    find_checkpoint,
    is_complete,
    read_best,
    warn_skipped,
)
from ddpm.config import load_config
from ddpm.errors import CheckpointError, ConfigError
from ddpm.outputs import check_output_folder

try:
    import fcntl
except ImportError:  # Windows: see RunFolderLock._open_exclusive
    fcntl = None  # type: ignore[assignment]  # Windows has no fcntl; the module is None there

logger = logging.getLogger("ddpm.train")

LOCK_FILE = "run.lock"
METRICS_FILE = "metrics.jsonl"
SET_ASIDE = "set-aside"
# ``resume`` values that name the folder's newest usable checkpoint rather than a path: "auto" starts the
# run when there is none (a requeued job repeating its command line), "latest" is then an error.
RESUME_NEWEST = ("auto", "latest")


class RunFolderInUseError(CheckpointError):
    """Another live process holds the run folder's lock; the message names its host and pid."""


# --------------------------------------------------------------------------------------------
# The lock


def _owner_record() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300]}


def _describe(owner: dict[str, Any] | None) -> str:
    if not owner:
        return "another process (it has not written its host and pid yet)"
    return (f"pid {owner.get('pid')} on host {owner.get('host')} (started {owner.get('started')}: "
            f"{owner.get('command') or '?'})")


def _parse_owner(text: str) -> dict[str, Any] | None:
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        return None
    return owner if isinstance(owner, dict) else None


def _read_owner(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    return _parse_owner(os.read(fd, 1 << 16).decode("utf-8", "replace"))


def read_lock_owner(folder: str | Path) -> dict[str, Any] | None:
    """What ``run.lock`` says about the run that holds (or last held) ``folder``; None without one."""
    try:
        return _parse_owner((Path(folder) / LOCK_FILE).read_text(encoding="utf-8"))
    except OSError:
        return None


def _in_use(folder: Path | str, owner: dict[str, Any] | None) -> RunFolderInUseError:
    return RunFolderInUseError(
        f"run folder {folder} is in use by {_describe(owner)}; wait for that run to end or choose another --out"
    )


def _is_stale(owner: dict[str, Any] | None) -> bool:
    """Whether a lock file's owner is a process of this host that is no longer running (used without flock)."""
    if not owner or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RunFolderLock:
    """An exclusive lock on ``folder/run.lock`` for the life of a run; see the module docstring."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self.stale_owner: dict[str, Any] | None = None  # what a lock taken over had said

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunFolderInUseError`; creates the folder (checked writable)."""
        if self._fd is not None:
            return
        check_output_folder(self.folder, name="run folder (train.out_dir, --out)")
        fd = self._open_with_flock() if fcntl is not None else self._open_exclusive()
        self.stale_owner = _read_owner(fd) or self.stale_owner
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(_owner_record()).encode("utf-8"))
        os.fsync(fd)
        self._fd = fd
        if self.stale_owner is not None:
            logger.info("took over the lock of %s in %s: that run is no longer running", _describe(self.stale_owner),
                        self.folder)

    def _open_with_flock(self) -> int:
        """Open and flock the lock file; whatever it says was written by a process that no longer holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise _in_use(self.folder, owner) from None
            try:  # the previous holder may have unlinked the file between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def _open_exclusive(self) -> int:
        """Without flock (Windows): create the file exclusively; a file naming a dead process of this host is stale."""
        while True:
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = read_lock_owner(self.folder)
                if not _is_stale(owner):
                    raise _in_use(self.folder, owner) from None
                self.stale_owner = owner
                self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: nobody can take a file about to vanish
        finally:
            os.close(self._fd)  # drops the flock
            self._fd = None


def check_not_in_use(folder: str | Path) -> None:
    """Raise :class:`RunFolderInUseError` if a live run holds ``folder``'s lock (changes nothing)."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return
    try:
        owner = _read_owner(fd)
        if fcntl is None:
            if owner is not None and not _is_stale(owner):
                raise _in_use(folder, owner)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(folder, owner) from None
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Recovery and metrics


def recover_interrupted_saves(folder: str | Path) -> list[str]:
    """Undo what a killed checkpoint write left behind; returns what was done (also logged).

    A complete ``.replaced-ckpt-{step}-...`` folder whose step has no ``ckpt-`` folder is renamed
    back (its re-save was interrupted between the two renames); other ``.replaced`` folders and
    every ``.tmp-ckpt-...`` folder are removed. Call only while holding the folder's lock.
    """
    folder = Path(folder)
    done = []
    for p in sorted(folder.iterdir(), key=lambda q: q.name, reverse=True):  # newest .replaced first
        if p.name.startswith(REPLACED_PREFIX) and p.is_dir():
            step = checkpoint_step(p)
            final = folder / checkpoint_name(step) if step is not None else None
            if final is not None and not final.exists() and is_complete(p):
                os.replace(p, final)
                done.append(f"restored {final} from {p.name} (a re-save was interrupted)")
                continue
        elif not (p.name.startswith(TMP_PREFIX) and p.is_dir()):
            continue
        shutil.rmtree(p, ignore_errors=True)
        done.append(f"removed {p.name} (left by an interrupted checkpoint write)")
    for line in done:
        logger.warning("%s: %s", folder, line)
    return done


def _step_of(line: str) -> int | None:
    """The ``step`` of a metrics line; None for a line without one; raises ValueError for a torn line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(line) from exc
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def split_metrics(path: str | Path, step: int) -> tuple[list[str], list[str]]:
    """The lines of a metrics file up to ``step`` (and lines without a step), and those after it.

    Lines that are not JSON (the torn last line of a killed run) are in neither.
    """
    path = Path(path)
    if not path.exists():
        return [], []
    keep: list[str] = []
    after: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            line_step = _step_of(line)
        except ValueError:
            continue
        (after if line_step is not None and line_step > step else keep).append(line)
    return keep, after


def _write_lines(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("".join(line + "\n" for line in lines))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def truncate_metrics(path: str | Path, step: int) -> list[str]:
    """Drop the lines of a metrics file past ``step`` (and torn lines); returns the dropped lines."""
    path = Path(path)
    if not path.exists():
        return []
    keep, after = split_metrics(path, step)
    _write_lines(path, keep)
    return after


# --------------------------------------------------------------------------------------------
# How a run starts


@dataclass(frozen=True)
class RunStart:
    """How a run starts in its folder (see :func:`plan_run_start`)."""

    checkpoint: Path | None  # the checkpoint to resume from; None: from scratch
    step: int  # the step the run starts from (0 from scratch)
    skipped: tuple[tuple[Path, str], ...] = ()  # newer checkpoints that did not verify, and why
    newer: tuple[Path, ...] = ()  # checkpoint folders newer than `checkpoint`, to be set aside
    overwrite: bool = False  # delete the previous run's files first


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().parent == folder.resolve()


def plan_run_start(folder: str | Path, *, resume: str | Path | None, overwrite: bool = False) -> RunStart:
    """Decide how a run starts in ``folder`` under the rules of the module docstring; changes nothing.

    ``resume``: None (a new run), ``"auto"`` (continue the folder's newest usable checkpoint, or
    start from scratch in a folder without checkpoint folders), ``"latest"`` (the newest usable
    checkpoint, which must exist), or a checkpoint or run folder.
    Raises :class:`~ddpm.errors.CheckpointError` for a folder holding another run's checkpoints, or
    when nothing loadable is found where a checkpoint was asked for, and
    :class:`~ddpm.errors.ConfigError` for contradictory requests.
    """
    folder = Path(folder)
    existing = checkpoint_folders(folder)
    auto = resume is not None and str(resume) in RESUME_NEWEST
    if overwrite:
        if auto:
            raise ConfigError(f"resume={str(resume)!r} (--resume) continues the run in the folder and overwrite "
                              "(--overwrite) deletes it: pass one of them")
        if resume is not None and Path(resume).exists() and (
            Path(resume).resolve() == folder.resolve() or _inside(Path(resume), folder)
        ):
            raise ConfigError(f"cannot resume from {resume} and overwrite (--overwrite) its folder {folder}")
        existing = []
    if resume is None:
        if existing:
            raise CheckpointError(
                f"{folder} holds another run's checkpoints ({len(existing)}, newest {existing[-1].name}); pass "
                "--resume to continue that run, --overwrite to delete it and start over, or choose another --out"
            )
        return RunStart(None, 0, overwrite=overwrite)
    if auto and not existing:
        if str(resume) == "latest":
            raise CheckpointError(f"nothing to resume: {folder} holds no checkpoint (a new run needs no --resume; "
                                  "--resume auto resumes a run or starts it when there is none)")
        logger.info("no checkpoint in %s; starting from scratch", folder)
        return RunStart(None, 0)
    choice = find_checkpoint(folder if auto else resume)
    here = _inside(choice.path, folder)
    if existing and not here:
        raise CheckpointError(
            f"{folder} holds another run's checkpoints (newest {existing[-1].name}); resuming from {choice.path} "
            "into it would mix two runs: choose another --out, or pass --overwrite to delete them first"
        )
    newer = tuple(p for p in existing if here and (checkpoint_step(p) or 0) > choice.step)
    return RunStart(choice.path, choice.step, choice.skipped, newer, overwrite)


def check_run_folder(folder: str | Path, *, resume: str | Path | None, overwrite: bool = False) -> RunStart:
    """Everything :meth:`RunFolder.open` would refuse, checked without changing the folder's contents.

    For a command line to call before loading data: the folder must be creatable and writable,
    not in use by a live run, and the run's start must be allowed (:func:`plan_run_start`).
    """
    check_output_folder(folder, name="run folder (train.out_dir, --out)")
    check_not_in_use(folder)
    return plan_run_start(folder, resume=resume, overwrite=overwrite)


def _delete_previous_run(folder: Path) -> None:
    """``overwrite``: delete what a run writes (set-aside/ and unknown files are kept)."""
    doomed = [p for p in folder.iterdir() if p.name.startswith((CKPT_PREFIX, TMP_PREFIX, REPLACED_PREFIX))]
    doomed += [folder / n for n in (METRICS_FILE, "config.toml", "tensorboard", BEST_FILE) if (folder / n).exists()]
    doomed += sorted((folder / "samples").glob("step-*.png"))
    ckpts = [p.name for p in doomed if p.name.startswith(CKPT_PREFIX)]
    for p in doomed:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if doomed:
        logger.warning("overwrite: deleted the previous run in %s (%d checkpoints%s)", folder, len(ckpts),
                       f", newest {max(ckpts)}" if ckpts else "")


def _set_aside(folder: Path, start: RunStart) -> Path | None:
    """Move the checkpoints newer than the resumed one, and their metrics lines, into set-aside/."""
    if not start.newer:
        return None
    _, after = split_metrics(folder / METRICS_FILE, start.step)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    target = folder / SET_ASIDE / f"{stamp}-after-step-{start.step:08d}"
    target.mkdir(parents=True)
    (target / "why.txt").write_text(
        f"Moved here on {time.ctime()}: a run resumed from {start.checkpoint} (step {start.step}), and these "
        "checkpoints of the same folder were newer. metrics.jsonl holds the metrics lines after that step.\n",
        encoding="utf-8")
    if after:
        _write_lines(target / METRICS_FILE, after)
    best = best_checkpoint(folder)
    if best is not None and best.resolve() in {p.resolve() for p in start.newer}:  # the best goes with its future
        os.replace(folder / BEST_FILE, target / BEST_FILE)
    for p in start.newer:
        os.replace(p, target / p.name)
    logger.warning("resuming from %s: moved %d newer checkpoint(s) (%s) to %s; nothing was deleted",
                   start.checkpoint, len(start.newer), ", ".join(p.name for p in start.newer), target)
    return target


class RunFolder:
    """A run folder held by this process for the life of a run (``open`` ... ``close``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock = RunFolderLock(self.path)
        self.set_aside: Path | None = None  # where newer checkpoints went, if they did

    def open(self, *, resume: str | Path | None, overwrite: bool = False) -> RunStart:
        """Lock the folder, undo interrupted saves, apply the rules, truncate the metrics; see the module docstring."""
        self.lock.acquire()
        try:
            recover_interrupted_saves(self.path)
            start = plan_run_start(self.path, resume=resume, overwrite=overwrite)
            if start.overwrite:
                _delete_previous_run(self.path)
            if start.checkpoint is not None:
                warn_skipped(start.checkpoint, start.skipped)
            self.set_aside = _set_aside(self.path, start)
            truncate_metrics(self.path / METRICS_FILE, start.step)
        except BaseException:
            self.lock.release()
            raise
        return start

    def close(self) -> None:
        self.lock.release()


# --------------------------------------------------------------------------------------------
# Listing runs


@dataclass(frozen=True)
class RunSummary:
    """Where a run folder stands (``ddpm runs``)."""

    folder: Path
    state: str  # "running", "finished", "stopped (SIGTERM)", "interrupted" (killed, crashed, blew up) or "empty"
    step: int | None  # the newest good checkpoint's step
    steps: int | None  # the steps the run was asked for (train.steps of its configuration)
    best: dict[str, Any] | None  # best.json: the evaluation while training's best checkpoint
    updated: float | None  # when the newest checkpoint was written (seconds since the epoch)


def find_runs(root: str | Path, *, depth: int = 4) -> list[Path]:
    """Run folders at or below ``root`` (those holding ``config.toml`` or checkpoints), sorted by path."""
    root = Path(root)
    found: list[Path] = []

    def visit(folder: Path, level: int) -> None:
        if (folder / "config.toml").is_file() or checkpoint_folders(folder):
            found.append(folder)
            return
        if level < depth:
            for child in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != SET_ASIDE):
                visit(child, level + 1)

    if root.is_dir():
        visit(root, 0)
    return found


def summarize_run(folder: str | Path) -> RunSummary:
    """The state, progress and best checkpoint of the run in ``folder`` (read only; see :class:`RunSummary`)."""
    folder = Path(folder)
    try:
        steps: int | None = load_config(folder / "config.toml").train.steps
    except (ConfigError, OSError):
        steps = None
    try:
        choice = find_checkpoint(folder)
        step: int | None = choice.step
        updated: float | None = (choice.path / "meta.json").stat().st_mtime
    except CheckpointError:
        step, updated = None, None
    try:
        check_not_in_use(folder)
        running = False
    except RunFolderInUseError:
        running = True
    stops = [r for r in _metric_records(folder) if r.get("event") == "stopped"]
    if running:
        state = "running"
    elif step is None:
        state = "empty"
    elif steps is not None and step >= steps:
        state = "finished"
    elif stops and stops[-1].get("step") == step:
        state = f"stopped ({stops[-1].get('reason')})"
    else:
        state = "interrupted"
    return RunSummary(folder, state, step, steps, read_best(folder), updated)


def _metric_records(folder: Path) -> list[dict[str, Any]]:
    records = []
    for line in (folder / METRICS_FILE).read_text(encoding="utf-8", errors="replace").splitlines() \
            if (folder / METRICS_FILE).is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of a killed run
        if isinstance(record, dict):
            records.append(record)
    return records
