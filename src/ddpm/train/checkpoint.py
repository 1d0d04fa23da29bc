"""Checkpoints: plain files in a folder, written atomically, never pickled code.

A checkpoint is a folder ``ckpt-{step:08d}/`` inside the run folder holding

- ``model.safetensors``: the raw (trained) weights,
- ``ema.safetensors``: the EMA weights, same keys (these are the ones to sample with),
- ``state.pt``: optimizer, step, RNG states, data position, counters and the timestep-sampler
  state, saved with ``torch.save`` and read back with ``torch.load(weights_only=True)``, so it
  may only contain tensors and primitive containers,
- ``config.toml``: the resolved :class:`~ddpm.train.config.RunConfig`,
- ``meta.json``: format version, step and an architecture fingerprint.

Everything is written into ``.tmp-ckpt-...`` and fsync'ed, ``meta.json`` last, and only then is the
folder renamed into place, so a run killed at any moment leaves the previous checkpoints intact and
:func:`find_latest` never returns a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from ddpm.errors import CheckpointError
from ddpm.train.config import RunConfig, config_from_toml, to_toml

FORMAT_VERSION = 1
CKPT_PREFIX = "ckpt-"
TMP_PREFIX = ".tmp-ckpt-"
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})$")
FILES = ("model.safetensors", "ema.safetensors", "state.pt", "config.toml", "meta.json")


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


def describe_mismatch(expected: dict[str, list[int]], found: dict[str, list[int]], *, limit: int = 8) -> str:
    """Human-readable differences between two name -> shape maps ('' when they agree)."""

    def listing(items: list[str]) -> str:
        more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shape = sorted(k for k in set(expected) & set(found) if list(expected[k]) != list(found[k]))
    parts = []
    if missing:
        parts.append(f"missing in checkpoint: {listing(missing)}")
    if unexpected:
        parts.append(f"not in model: {listing(unexpected)}")
    if shape:
        parts.append(
            "shape differs: " + listing([f"{k} (model {expected[k]}, checkpoint {found[k]})" for k in shape])
        )
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Writing


def _write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync one file (a module-level function so tests can simulate a crash here)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


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


def _tensors_for_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous, unshared CPU tensors; cloning also breaks weight tying.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _serialize_state(state: dict[str, Any]) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:08d}"


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    ema_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    config: RunConfig,
    keep_last: int = 0,
) -> Path:
    """Write ``out_dir/ckpt-{step:08d}/`` atomically and prune to the newest ``keep_last``.

    ``train_state`` must hold only tensors and primitive containers (it is read back with
    ``weights_only=True``). Returns the checkpoint folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    final = out_dir / checkpoint_name(step)
    tmp = out_dir / f"{TMP_PREFIX}{step:08d}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    raw = unwrap_model(model)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "architecture": architecture_fingerprint(raw),
        "weights": {"model.safetensors": "raw", "ema.safetensors": "ema"},
        "torch_version": torch.__version__,
        "created_unix": time.time(),
    }
    try:
        _write_bytes(tmp / "model.safetensors", safetensors_save(_tensors_for_file(raw.state_dict())))
        _write_bytes(tmp / "ema.safetensors", safetensors_save(_tensors_for_file(ema_state)))
        _write_bytes(tmp / "state.pt", _serialize_state(train_state))
        _write_bytes(tmp / "config.toml", to_toml(config).encode("utf-8"))
        _write_bytes(tmp / "meta.json", json.dumps(meta, indent=2).encode("utf-8"))  # last: marks complete
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. a resumed run that ends where it began)
            old = out_dir / f"{TMP_PREFIX}old-{step:08d}-{time.time_ns()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        prune_checkpoints(out_dir, keep_last)
    return final


def _remove_stale_temporaries(out_dir: Path) -> None:
    for p in out_dir.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first (temporaries and half-written ones ignored)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for p in out_dir.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return all((path / f).is_file() for f in FILES)


def find_latest(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``out_dir``, or ``None``."""
    ckpts = list_checkpoints(out_dir)
    return ckpts[-1] if ckpts else None


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; returns the deleted folders."""
    ckpts = list_checkpoints(out_dir)
    doomed = ckpts[:-keep_last] if keep_last > 0 else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------------------------
# Reading


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest checkpoint of a run folder."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if is_complete(path):
        return path
    latest = find_latest(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(
            f"{str(path)!r} is neither a complete checkpoint folder ({', '.join(FILES)}) "
            "nor a run folder containing one"
        )
    return latest


def read_meta(path: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(path)
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported (this ddpm reads {FORMAT_VERSION})"
        )
    return meta


def read_config(path: str | Path) -> RunConfig:
    """The resolved run configuration saved with a checkpoint."""
    path = resolve_checkpoint(path)
    return config_from_toml((path / "config.toml").read_text(encoding="utf-8"), source=str(path / "config.toml"))


def load_weights(
    path: str | Path, which: Literal["ema", "raw"] = "ema", *, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """A state dict from a checkpoint (or the newest one of a run folder): EMA or raw weights."""
    if which not in ("ema", "raw"):
        raise ValueError(f"which={which!r}; valid: 'ema', 'raw'")
    path = resolve_checkpoint(path)
    read_meta(path)
    data = (path / ("ema.safetensors" if which == "ema" else "model.safetensors")).read_bytes()
    return {k: v.to(device) for k, v in safetensors_load(data).items()}


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
    meta = read_meta(path)
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
    meta = read_meta(path)
    raw_state = load_weights(path, "raw")
    check_architecture(model, raw_state, source=str(path), meta=meta)
    ema_state = load_weights(path, "ema")
    check_architecture(model, ema_state, source=str(path / "ema.safetensors"), meta=meta)
    train_state = torch.load(path / "state.pt", map_location=map_location, weights_only=True)
    unwrap_model(model).load_state_dict(raw_state)
    return path, ema_state, train_state
