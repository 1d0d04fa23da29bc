"""Checkpoints: plain files in a folder, written atomically, verified when read, never pickled code.

A checkpoint is a folder ``ckpt-{step:08d}/`` inside the run folder holding

- ``model.safetensors``: the raw (trained) weights,
- ``ema.safetensors``: the EMA weights, same keys (these are the ones to sample with),
- ``state.pt``: optimizer, step, RNG states, data position, counters and the timestep-sampler
  state, saved with ``torch.save`` and read back with ``torch.load(weights_only=True)``, so it
  may only contain tensors and primitive containers,
- ``config.toml``: the resolved :class:`~ddpm.config.RunConfig`,
- ``meta.json``: format version, step, an architecture fingerprint, and the size and SHA-256 of
  each of the four files above (format 2; format-1 checkpoints carry no checksums and are
  checked by parsing their files only).

Writing. Everything goes into ``.tmp-ckpt-...`` and is fsync'ed, ``meta.json`` last, and only then
is the folder renamed into place, so a run killed at any moment leaves the previous checkpoints
intact. Re-saving a step that exists renames the old folder to ``.replaced-ckpt-{step}-...``, then
the new one into place, then deletes the old one; while no ``ckpt-`` folder of that step exists,
readers take the ``.replaced`` folder as the step's checkpoint (and
:func:`ddpm.train.run_folder.recover_interrupted_saves` renames it back after a kill), so every
step saved has a complete checkpoint at every moment.

Reading. :func:`find_checkpoint` turns a checkpoint folder or a run folder into the checkpoint to
use (:func:`resolve_checkpoint` with ``which="best"``: the one ``best.json`` names, the best of the
evaluation while training, which pruning never deletes). A checkpoint folder named explicitly
must verify (all files present, sizes and checksums as recorded); in a run folder the newest
checkpoint that verifies is used, and the newer ones that did not are returned with the reason
(:func:`resolve_checkpoint` logs them as warnings). Every
loader verifies before it parses, refuses weights that are not finite, and reports a file that
cannot be parsed as a :class:`~ddpm.errors.CheckpointError` naming it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from ddpm.config import RunConfig, config_from_toml, to_toml
from ddpm.errors import CheckpointError

logger = logging.getLogger("ddpm.train")

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1: no checksums in meta.json
CKPT_PREFIX = "ckpt-"
TMP_PREFIX = ".tmp-ckpt-"
REPLACED_PREFIX = ".replaced-ckpt-"
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})$")
_REPLACED_RE = re.compile(r"^\.replaced-ckpt-(\d{8,})-\d+$")
DATA_FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.toml")
FILES = (*DATA_FILES, "meta.json")
BEST_FILE = "best.json"  # in a run folder: which checkpoint scored best in the evaluation while training
CheckpointName = Literal["latest", "best"]  # the checkpoint of a run folder a reader asks for


class ArchitectureMismatchError(CheckpointError):
    """The checkpoint's weights do not fit the model (different keys or shapes)."""


# --------------------------------------------------------------------------------------------
# Architecture fingerprint


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items()}


def architecture_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Model class name plus a hash of its state-dict names and shapes."""
    model = unwrap_model(model)
    shapes = _shapes(model.state_dict())
    digest = hashlib.sha256(json.dumps(sorted(shapes.items())).encode()).hexdigest()
    return {
        "class": type(model).__qualname__,
        "params_sha256": digest,
        "num_tensors": len(shapes),
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def _listing(items: list[str], limit: int = 8) -> str:
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def describe_mismatch(expected: dict[str, list[int]], found: dict[str, list[int]], *, limit: int = 8) -> str:
    """Human-readable differences between two name -> shape maps ('' when they agree)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shape = sorted(k for k in set(expected) & set(found) if list(expected[k]) != list(found[k]))
    parts = []
    if missing:
        parts.append(f"missing in checkpoint: {_listing(missing, limit)}")
    if unexpected:
        parts.append(f"not in model: {_listing(unexpected, limit)}")
    if shape:
        parts.append(
            "shape differs: "
            + _listing([f"{k} (model {expected[k]}, checkpoint {found[k]})" for k in shape], limit)
        )
    return "; ".join(parts)


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` that hold a NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


# --------------------------------------------------------------------------------------------
# Names


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:08d}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step in a checkpoint folder's name (``ckpt-00001000`` or ``.replaced-ckpt-00001000-...``)."""
    name = Path(path).name
    m = _CKPT_RE.match(name) or _REPLACED_RE.match(name)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------
# Writing


def _write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync one file (a module-level function so tests can simulate a crash here)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _rename(src: Path, dst: Path) -> None:
    """``os.replace`` (a module-level function so tests can kill the process between two renames)."""
    os.replace(src, dst)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tensors_for_file(state: dict[str, torch.Tensor]) -> bytes:
    # safetensors wants contiguous, unshared CPU tensors; cloning also breaks weight tying.
    return safetensors_save({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()})


def _serialize_state(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    ema_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    config: RunConfig,
    keep_last: int = 0,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``out_dir/ckpt-{step:08d}/`` atomically, then prune to the newest ``keep_last`` (0: keep all).

    ``train_state`` must hold only tensors and primitive containers (it is read back with
    ``weights_only=True``); ``extra_meta`` is merged into ``meta.json``. Pruning never deletes the
    checkpoint just written nor any newer one. A write that fails (a full disk, no permission)
    raises :class:`~ddpm.errors.CheckpointError` naming the checkpoint, with the temporary folder
    removed and every checkpoint already in ``out_dir`` untouched. Returns the checkpoint folder.
    """
    out_dir = Path(out_dir)
    final = out_dir / checkpoint_name(step)
    raw = unwrap_model(model)
    parts = {
        "model.safetensors": lambda: _tensors_for_file(raw.state_dict()),
        "ema.safetensors": lambda: _tensors_for_file(ema_state),
        "state.pt": lambda: _serialize_state(train_state),
        "config.toml": lambda: to_toml(config).encode("utf-8"),
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"{TMP_PREFIX}{step:08d}-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()
        try:
            files = {}
            for name, make in parts.items():  # one file in memory at a time
                data = make()
                _write_bytes(tmp / name, data)
                files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            meta = {
                "format_version": FORMAT_VERSION,
                "step": int(step),
                "architecture": architecture_fingerprint(raw),
                "weights": {"model.safetensors": "raw", "ema.safetensors": "ema"},
                "files": files,
                "torch_version": torch.__version__,
                "created_unix": time.time(),
                **(extra_meta or {}),
            }
            _write_bytes(tmp / "meta.json", json.dumps(meta, indent=2).encode("utf-8"))  # last: marks complete
            _fsync_dir(tmp)
            _put_in_place(tmp, final)
            _fsync_dir(out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as exc:
        raise CheckpointError(
            f"could not write checkpoint {final}: {exc.strerror or exc}; the checkpoints already in {out_dir} "
            "are untouched"
        ) from exc
    if keep_last > 0:
        prune_checkpoints(out_dir, keep_last, protect=final)
    return final


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename a complete temporary folder to ``final``; an existing ``final`` is replaced, see the module docstring."""
    if not final.exists():
        _rename(tmp, final)
        return
    replaced = final.with_name(f"{REPLACED_PREFIX}{final.name[len(CKPT_PREFIX):]}-{time.time_ns()}")
    _rename(final, replaced)
    try:
        _rename(tmp, final)
    except BaseException:
        _rename(replaced, final)
        raise
    shutil.rmtree(replaced, ignore_errors=True)


def prune_checkpoints(out_dir: str | Path, keep_last: int, *, protect: str | Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints of ``out_dir``; returns the deleted folders.

    With ``protect`` (the checkpoint just written) only checkpoints older than it are candidates
    and it is kept; without, the newest checkpoint that verifies is kept in any case, so pruning
    never deletes the newest checkpoint known to be good.
    """
    if keep_last <= 0:
        return []
    folders = [p for p in checkpoint_folders(out_dir) if _CKPT_RE.match(p.name)]
    if protect is not None:
        protect = Path(protect)
        limit = checkpoint_step(protect)
        folders = [p for p in folders if limit is None or (checkpoint_step(p) or 0) <= limit]
    keep = set(folders[-keep_last:])
    spared = protect if protect is not None else _newest_good(folders)
    best = best_checkpoint(out_dir)
    keep.update(p for p in (spared, best) if p is not None)  # never the newest good one, never the best
    doomed = [p for p in folders if p not in keep]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def _newest_good(folders: list[Path]) -> Path | None:
    for folder in reversed(folders):
        try:
            verify_checkpoint(folder)
        except CheckpointError:
            continue
        return folder
    return None


# --------------------------------------------------------------------------------------------
# Finding and verifying


def checkpoint_folders(out_dir: str | Path) -> list[Path]:
    """Every checkpoint folder of a run folder, oldest first, complete or not.

    These are the ``ckpt-{step}`` folders plus, for a step that has none, the newest
    ``.replaced-ckpt-{step}-...`` folder (a re-save interrupted between its two renames).
    Temporary ``.tmp-ckpt-...`` folders are never checkpoints.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found: dict[int, Path] = {}
    replaced: dict[int, Path] = {}
    for p in out_dir.iterdir():
        step = checkpoint_step(p)
        if step is None or not p.is_dir():
            continue
        if _CKPT_RE.match(p.name):
            found[step] = p
        elif step not in replaced or p.name > replaced[step].name:
            replaced[step] = p
    for step, p in replaced.items():
        found.setdefault(step, p)
    return [found[s] for s in sorted(found)]


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return all((path / f).is_file() for f in FILES)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first (temporaries and half-written ones ignored)."""
    return [p for p in checkpoint_folders(out_dir) if is_complete(p)]


def find_latest(out_dir: str | Path) -> Path | None:
    """The newest checkpoint in ``out_dir`` that verifies, or ``None``."""
    return _newest_good(checkpoint_folders(out_dir))


_VERIFIED: dict[Path, tuple[tuple[tuple[int, int, int], ...], dict[str, Any]]] = {}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_meta_file(path: Path) -> dict[str, Any]:
    file = path / "meta.json"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}): the checkpoint is corrupt") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise CheckpointError(f"{file} does not describe a checkpoint (no integer 'step'): the checkpoint is corrupt")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported (this ddpm reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    return meta


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint folder and return its ``meta.json``; raise :class:`CheckpointError` naming the problem.

    All files must be present and ``meta.json`` readable; for format 2 every file must have the
    size and SHA-256 recorded in ``meta.json``. A folder that verified is not hashed again while
    its files keep their size, modification time and inode.
    """
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: {', '.join(missing)} missing")
    stats = [os.stat(path / f) for f in FILES]
    signature = tuple((st.st_size, st.st_mtime_ns, st.st_ino) for st in stats)
    key = path.resolve()
    cached = _VERIFIED.get(key)
    if cached is not None and cached[0] == signature:
        return cached[1]
    meta = _read_meta_file(path)
    if meta["format_version"] >= 2:
        recorded = meta.get("files")
        if not isinstance(recorded, dict) or set(recorded) != set(DATA_FILES):
            raise CheckpointError(f"{path / 'meta.json'} does not list the checksums of {', '.join(DATA_FILES)}")
        for name, st in zip(FILES, stats, strict=True):
            if name == "meta.json":
                continue
            expected = recorded[name]
            if st.st_size != expected.get("bytes"):
                raise CheckpointError(
                    f"{path / name} has {st.st_size} bytes but meta.json records {expected.get('bytes')}: the file is "
                    "truncated or was changed after the checkpoint was written"
                )
            if _sha256_file(path / name) != expected.get("sha256"):
                raise CheckpointError(
                    f"{path / name} does not match the SHA-256 recorded in meta.json: the file is corrupt or was "
                    "changed after the checkpoint was written"
                )
    _VERIFIED[key] = (signature, meta)
    return meta


@dataclass(frozen=True)
class CheckpointChoice:
    """The checkpoint a path resolves to, and the newer ones passed over because they did not verify."""

    path: Path
    step: int
    skipped: tuple[tuple[Path, str], ...] = ()  # (folder, why), newest first


def _names_a_checkpoint(path: Path) -> bool:
    return checkpoint_step(path) is not None or (path / "meta.json").exists()


def find_checkpoint(path: str | Path) -> CheckpointChoice:
    """The checkpoint to use for ``path``: a checkpoint folder itself (which must verify), or the
    newest checkpoint of a run folder that verifies.

    Raises :class:`CheckpointError` when ``path`` does not exist, is a file, names a checkpoint that
    does not verify, or is a run folder in which no checkpoint verifies (the message lists each
    one and why) or that holds none.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is a file; expected a checkpoint folder (ckpt-NNNNNNNN, holding {', '.join(FILES)}) "
            "or a run folder holding such folders"
        )
    if _names_a_checkpoint(path):
        return CheckpointChoice(path, int(verify_checkpoint(path)["step"]))
    skipped: list[tuple[Path, str]] = []
    for folder in reversed(checkpoint_folders(path)):
        try:
            meta = verify_checkpoint(folder)
        except CheckpointError as exc:
            skipped.append((folder, str(exc)))
            continue
        return CheckpointChoice(folder, int(meta["step"]), tuple(skipped))
    if skipped:
        raise CheckpointError(f"no usable checkpoint in {path}: " + "; ".join(why for _, why in skipped))
    raise CheckpointError(
        f"{str(path)!r} is neither a checkpoint folder ({', '.join(FILES)}) nor a run folder containing one"
    )


def resolve_checkpoint(path: str | Path, which: CheckpointName = "latest") -> Path:
    """:func:`find_checkpoint`, logging a warning for each newer checkpoint passed over; with
    ``which="best"``, the checkpoint of run folder ``path`` that scored best in the evaluation while
    training (:func:`best_checkpoint`), which must verify."""
    if which == "best":
        best = best_checkpoint(path)
        if best is None:
            raise CheckpointError(f"{path} has no best checkpoint: the run evaluated no samples while training "
                                  f"(train.eval_every, --eval-every) or is not a run folder")
        return find_checkpoint(best).path
    choice = find_checkpoint(path)
    warn_skipped(choice.path, choice.skipped)
    return choice.path


def read_best(folder: str | Path) -> dict[str, Any] | None:
    """The run folder's best-checkpoint record (``{"step", "checkpoint", "metric", "value"}``), or None."""
    try:
        record = json.loads((Path(folder) / BEST_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("checkpoint"), str) else None


def best_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint folder the run folder's best record names, if the record and the folder exist."""
    record = read_best(folder)
    if record is None:
        return None
    path = Path(folder) / record["checkpoint"]
    return path if path.is_dir() else None


def write_best(folder: str | Path, record: dict[str, Any]) -> None:
    """Write the best-checkpoint record atomically (a temporary file renamed into place)."""
    path = Path(folder) / BEST_FILE
    tmp = path.with_name(f".{BEST_FILE}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def warn_skipped(used: Path, skipped: tuple[tuple[Path, str], ...]) -> None:
    """Log a warning for each checkpoint passed over in favour of ``used``."""
    for folder, why in skipped:
        logger.warning("skipping checkpoint %s: %s; using %s", folder, why, used)


# --------------------------------------------------------------------------------------------
# Reading


def read_meta(path: str | Path) -> dict[str, Any]:
    """The verified ``meta.json`` of a checkpoint (or of the newest usable one of a run folder)."""
    return verify_checkpoint(resolve_checkpoint(path))


def read_config(path: str | Path) -> RunConfig:
    """The resolved run configuration saved with a checkpoint."""
    path = resolve_checkpoint(path)
    return config_from_toml((path / "config.toml").read_text(encoding="utf-8"), source=str(path / "config.toml"))


def _read_safetensors(file: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        state = safetensors_load(file.read_bytes())
    except SafetensorError as exc:
        raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from None
    bad = nonfinite_tensors(state)
    if bad:
        raise CheckpointError(
            f"{file} holds NaN or infinite values in {_listing(bad)}: these weights are destroyed; "
            "use an earlier checkpoint"
        )
    return {k: v.to(device) for k, v in state.items()}


def load_weights(
    path: str | Path, which: Literal["ema", "raw"] = "ema", *, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint (or the newest usable one of a run folder): EMA or raw weights."""
    if which not in ("ema", "raw"):
        raise ValueError(f"which={which!r}; valid: 'ema', 'raw'")
    path = resolve_checkpoint(path)
    return _read_safetensors(path / ("ema.safetensors" if which == "ema" else "model.safetensors"), device)


def load_train_state(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``state.pt`` of a checkpoint, read with ``weights_only=True`` (tensors and plain containers only)."""
    file = resolve_checkpoint(path) / "state.pt"
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc).partition("WeightsUnpickler error:")[2].strip() or str(exc).strip()
        detail = detail.splitlines()[0].split(". ")[0] if detail else "no detail"
        raise CheckpointError(
            f"{file} was refused by the safe loader (torch.load with weights_only=True: {detail}); ddpm writes "
            "only tensors and plain containers there, so the file is corrupt or was not written by ddpm"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{file} is not a readable training state ({str(exc) or type(exc).__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{file} does not hold a ddpm training state (no integer 'step')")
    return state


def check_architecture(
    model: nn.Module, state: dict[str, torch.Tensor], *, source: str, meta: dict[str, Any] | None = None
) -> None:
    """Raise :class:`ArchitectureMismatchError` naming differing keys/shapes."""
    raw = unwrap_model(model)
    diff = describe_mismatch(_shapes(raw.state_dict()), _shapes(state))
    if diff:
        saved = (meta or {}).get("architecture", {}).get("class", "?")
        raise ArchitectureMismatchError(
            f"{source} was written for another architecture (checkpoint model {saved}, "
            f"this model {type(raw).__qualname__}): {diff}"
        )


def load_model_weights(path: str | Path, model: nn.Module, which: Literal["ema", "raw"] = "ema") -> Path:
    """Load a checkpoint's weights into ``model`` after checking the architecture; returns the folder."""
    path = resolve_checkpoint(path)
    meta = verify_checkpoint(path)
    state = load_weights(path, which)
    check_architecture(model, state, source=str(path), meta=meta)
    unwrap_model(model).load_state_dict(state)
    return path


def load_checkpoint(
    path: str | Path, model: nn.Module, *, map_location: str | torch.device = "cpu"
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """Load the raw weights into ``model``; return ``(folder, ema_state, train_state)``.

    Refuses, naming the differing keys/shapes, a checkpoint written for another architecture.
    """
    path = resolve_checkpoint(path)
    meta = verify_checkpoint(path)
    raw_state = load_weights(path, "raw")
    check_architecture(model, raw_state, source=str(path), meta=meta)
    ema_state = load_weights(path, "ema")
    check_architecture(model, ema_state, source=str(path / "ema.safetensors"), meta=meta)
    train_state = load_train_state(path, map_location=map_location)
    unwrap_model(model).load_state_dict(raw_state)
    return path, ema_state, train_state
