"""Tensor helpers shared by the maths modules (diffusion, samplers, the bound), and their type aliases.

Nothing here knows about diffusion: drawing standard-normal noise with one generator per example
(so example i is the same whatever batch it is drawn in), averaging over all but the batch
dimension, broadcasting per-example coefficients ``[B]`` against data ``[B, ...]``, and refusing
output that is not finite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ddpm.errors import UserError

Model = Callable[..., torch.Tensor]
"""A network ``model(x_t, t)`` (``t``: its timesteps ``[B]``), or ``model(x_t, t, y=y)`` when conditioned."""

Generator = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the batch, one per example (a sequence of length B), or None (the global RNG)."""


def randn(
    shape: Sequence[int], generator: Generator, *, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Standard normal noise of ``shape``.

    With one generator per example (a sequence of length ``shape[0]``), example i's noise is drawn
    from its own generator and does not depend on the batch it is in.
    """
    return _draw(torch.randn, shape, generator, device=device, dtype=dtype)


def rand(
    shape: Sequence[int], generator: Generator, *, device: torch.device | str, dtype: torch.dtype
) -> torch.Tensor:
    """Uniform noise in [0, 1) of ``shape``, one generator for the batch or one per example (as :func:`randn`)."""
    return _draw(torch.rand, shape, generator, device=device, dtype=dtype)


def _draw(fn: Callable[..., torch.Tensor], shape: Sequence[int], generator: Generator, *, device: torch.device | str,
          dtype: torch.dtype) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return fn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([fn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]).to(device)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: ``[B, ...] -> [B]``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-example values ``[B]`` to ``[B, 1, ...]`` so they broadcast against ``like`` ``[B, ...]``."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def first_parameter_device(model: object) -> torch.device:
    """The device of a module's first parameter; the CPU for plain callables or parameter-free modules."""
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def bind_condition(model: Model, y: torch.Tensor | None) -> Model:
    """``model`` with ``y`` bound: ``bound(x_t, t) == model(x_t, t, y=y)``; ``model`` itself when y is None."""
    if y is None:
        return model

    def conditioned(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if y.shape[0] != x_t.shape[0]:
            raise ValueError(f"class labels y have {y.shape[0]} entries for a batch of {x_t.shape[0]}")
        return model(x_t, t, y=y)

    return conditioned


def check_finite(x: torch.Tensor, *, what: str) -> None:
    """Raise :class:`~ddpm.errors.UserError` when ``x`` holds NaN or infinite values.

    ``what`` names the values in the message, e.g. ``"samples from runs/a/ckpt-00001000"``.
    """
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise UserError(
            f"{what}: {bad} of {x.numel()} values are NaN or infinite; the model does not produce usable "
            "output (were its weights destroyed in training?)"
        )
