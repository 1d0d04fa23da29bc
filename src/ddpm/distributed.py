"""Plain torchrun + DistributedDataParallel helpers.

``torchrun --nproc_per_node N -m ddpm train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment. :func:`setup_distributed`
reads them, picks NCCL for CUDA and gloo otherwise, and gives each process one device
(``cuda:LOCAL_RANK``). Without those variables everything runs in one process and the helpers
below degrade to no-ops, so the same code path serves both cases.

Errors are never swallowed here: a rank that raises exits non-zero and torchrun stops the job.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ddpm.errors import DeviceError


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """Rank 0 writes checkpoints, logs, sample grids and the progress bar."""
    return get_rank() == 0


def resolve_device(device_pref: str = "auto", *, local_rank: int = 0) -> torch.device:
    """``"auto"`` means CUDA if present, else MPS, else CPU; CUDA uses device ``local_rank``."""
    if device_pref not in ("auto", "cpu", "cuda", "mps"):
        raise DeviceError(f"unknown device {device_pref!r}; valid: 'auto', 'cpu', 'cuda', 'mps'")
    if device_pref == "auto":
        if torch.cuda.is_available():
            device_pref = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device_pref = "mps"
        else:
            device_pref = "cpu"
    if device_pref == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda' was requested but this machine has no usable CUDA GPU "
                              "(torch.cuda.is_available() is False); use --device cpu or auto")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "start at most one process per GPU"
            )
        return torch.device("cuda", local_rank)
    if device_pref == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("device 'mps' was requested but torch.backends.mps.is_available() is False; "
                          "use --device cpu or auto")
    return torch.device(device_pref)


def setup_distributed(device_pref: str = "auto") -> tuple[torch.device, int, int]:
    """Join the torchrun process group if the environment asks for one.

    Returns ``(device, rank, world_size)``. Idempotent: a group that is already initialised is
    reused. NCCL is used on CUDA and gloo on CPU.
    """
    world = get_world_size()
    rank = get_rank()
    local_rank = get_local_rank()
    device = resolve_device(device_pref, local_rank=local_rank if world > 1 else 0)
    if world > 1 and device.type == "mps":
        raise RuntimeError("multi-process training on MPS is not supported; use one process or CUDA/CPU")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            raise RuntimeError(
                f"WORLD_SIZE={world} but MASTER_ADDR/MASTER_PORT are not set; start the run with torchrun"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return device, rank, world


def cleanup_distributed() -> None:
    """Destroy the process group, if any (call once at the end of the run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes in place (identity in one process); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all processes along dim 0, in rank order."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def broadcast_object(obj: object, src: int = 0) -> object:
    """Send a picklable object from rank ``src`` to every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_indices(n: int, rank: int, world: int) -> slice:
    """The contiguous slice of ``n`` items that process ``rank`` of ``world`` takes.

    Rank r takes items ``[r * n / world, (r + 1) * n / world)``; ``n`` must divide evenly so every
    process does the same amount of work and DDP's gradient average is the global average.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    if n % world:
        raise ValueError(f"{n} items are not divisible by world size {world}")
    size = n // world
    return slice(rank * size, (rank + 1) * size)
