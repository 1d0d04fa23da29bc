"""One record per built-in data set: every fact about it that the rest of the library reads.

A data set's module (:mod:`.builtin`, :mod:`.standard`, :mod:`.toy2d`) declares its record next to
its loader and registers it; :func:`ddpm.data.load_dataset` dispatches on the records, and the
training defaults (flips), the evaluation's feature network, the class count and names, and the
``--data`` help all read them. A new built-in data set is its loader and record in one module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ddpm.choices import Split

Kind = Literal["image", "vector"]
FeatureNetwork = Literal["classifier", "inception", "points"]
LOAD_OPTIONS = frozenset({"image_size", "channels", "holdout_fraction", "num_points"})  # cache_dir and seed: always


@dataclass(frozen=True)
class SourceRequest:
    """What :func:`ddpm.data.load_dataset` asks of a data set's loader: the split and its options."""

    split: Split
    cache_dir: Path | None = None  # downloads
    holdout_fraction: float | None = None  # sets split by a hold-out (None: the record's default)
    num_points: int | None = None  # generated sets (None: the record's default)
    seed: int = 0  # generated sets


@dataclass(frozen=True)
class DatasetRecord:
    """The facts of one built-in data set.

    Attributes:
        name: the name ``--data`` and ``data.dataset`` take (case-insensitive).
        description: one line for ``--help``.
        kind: ``"image"`` (uint8 ``[N, C, H, W]``) or ``"vector"`` (float ``[N, D]``).
        load: returns the split's data and labels (None when unlabelled) for a :class:`SourceRequest`.
        options: the options of ``load_dataset`` that apply (others are refused, naming them).
        splits: how the train and test splits are made (for the documentation).
        class_names: the name of each class, label i = ``class_names[i]``; empty when unlabelled.
        flippable: whether a mirrored example means the same (training flips images by default only then).
        features: the feature network that measures samples (``"classifier"``: the project's
            classifier trained on the set; ``"inception"``: FID's Inception-v3; ``"points"``: the
            2-D distances).
        aliases: other names of the set.
        log_density: the exact log-density in nats (``[B, D] -> [B]``) of a generated set, when known.
    """

    name: str
    description: str
    kind: Kind
    load: Callable[[SourceRequest], tuple[Any, Any]]
    options: frozenset[str]
    splits: str
    class_names: tuple[str, ...] = ()
    flippable: bool = False
    features: FeatureNetwork = "inception"
    aliases: tuple[str, ...] = ()
    log_density: Callable[[Any], Any] | None = None

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) or None


DATASETS: dict[str, DatasetRecord] = {}
"""Every built-in data set by name, in registration order."""

DIGITS = tuple(str(d) for d in range(10))  # the class names of the digit sets


def register_dataset(record: DatasetRecord) -> DatasetRecord:
    """Add ``record`` to :data:`DATASETS` (its name and aliases must be new)."""
    unknown = record.options - LOAD_OPTIONS
    if unknown:
        raise ValueError(f"data set {record.name!r}: unknown load options {sorted(unknown)}")
    for key in (record.name, *record.aliases):
        if find_dataset(key) not in (None, record):
            raise ValueError(f"a data set named {key!r} is registered already")
    DATASETS[record.name] = record
    return record


def find_dataset(spec: str) -> DatasetRecord | None:
    """The record whose name or alias is ``spec`` (case-insensitive, surrounding spaces ignored), or None."""
    key = spec.strip().lower()
    for record in DATASETS.values():
        if key == record.name or key in record.aliases:
            return record
    return None
