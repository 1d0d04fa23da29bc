"""Data that does not fit in memory: prepared caches, per-file streaming, `datasets` tables, the batch feed.

The core fact checked throughout: every path (in memory, memory-mapped cache, files decoded per
batch, Hugging Face table; in this process or in DataLoader workers; one rank or several) gives
bit-for-bit the same pixels and labels for the same indices and steps.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from ddpm.config import RunConfig, apply_overrides
from ddpm.data import (
    ArrayDataset,
    CacheError,
    FolderImages,
    ImageDecodeError,
    MappedImages,
    load_dataset,
    options,
    prepare_cache,
)
from ddpm.data import cache as cache_mod
from ddpm.errors import DataError
from ddpm.train.feed import BatchFeed
from ddpm.train.trainer import Trainer

from .test_train import T, TinyNet, assert_same_state

SIZE = 8


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "ddpm-cache"))  # default prepared_dir lives here


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_class_folder(root: Path, per_class: int = 9, classes: tuple[str, ...] = ("cat", "dog", "owl")) -> Path:
    """RGB PNGs of assorted sizes (so resizing and cropping happen), one sub-folder per class."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        for i in range(per_class):
            h, w = rng.integers(8, 20, size=2)
            save(root / name / f"{i:02d}.png", rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) // (c + 1))
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_class_folder(tmp_path / "pets")


def read_all(ds) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch = ds.read(range(len(ds)))
    return batch.images, batch.labels


# ------------------------------------------------------------------------- the data sets


def test_every_path_gives_the_same_pixels_and_labels(folder: Path, tmp_path: Path):
    sizes = []
    for split in ("train", "test"):
        kw = {"split": split, "image_size": SIZE, "holdout_fraction": 0.2}
        memory = load_dataset(folder, loader="memory", **kw)
        files = load_dataset(folder, loader="stream", cache_images=False, **kw)
        mapped = load_dataset(folder, loader="stream", **kw)  # writes the cache (the test split reuses it)
        cached_memory = load_dataset(folder, loader="memory", **kw)  # reads it
        sizes.append(len(memory))
        assert isinstance(memory, ArrayDataset) and isinstance(files, FolderImages)
        assert isinstance(mapped, MappedImages) and isinstance(cached_memory, ArrayDataset)
        expected = read_all(memory)
        assert memory.class_names == ("cat", "dog", "owl") and expected[1] is not None
        for ds in (files, mapped, cached_memory):
            images, labels = read_all(ds)
            assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])
            assert ds.class_names == memory.class_names and ds.num_classes == 3 and ds.shape == (3, SIZE, SIZE)
            index = torch.tensor([4, 0, 3])
            assert torch.equal(ds.get_batch(index), memory.get_batch(index))
            assert torch.equal(ds.get_labels(index), memory.get_labels(index))
    assert sizes == [22, 5]


def test_loader_auto_streams_past_the_memory_limit(folder: Path, monkeypatch: pytest.MonkeyPatch):
    assert isinstance(load_dataset(folder, image_size=SIZE), ArrayDataset)
    monkeypatch.setattr(options, "MEMORY_LOADER_MAX_BYTES", 3 * SIZE * SIZE * 10)  # 10 images' worth
    assert isinstance(load_dataset(folder, image_size=SIZE, cache_images=False), FolderImages)
    assert isinstance(load_dataset(folder, split="test", image_size=SIZE, cache_images=False), ArrayDataset)
    with pytest.raises(ValueError, match="unknown loader 'disk'; valid: 'auto', 'memory', 'stream'"):
        load_dataset(folder, loader="disk")  # type: ignore[arg-type]


def test_folder_labels_need_every_image_in_a_class_folder(tmp_path: Path):
    root = make_class_folder(tmp_path / "f", per_class=2)
    save(root / "loose.png", np.zeros((8, 8, 3), np.uint8))  # one image outside the class folders
    assert load_dataset(root, holdout_fraction=0, image_size=SIZE).labels is None
    single = make_class_folder(tmp_path / "g", per_class=2, classes=("only",))
    assert load_dataset(single, holdout_fraction=0, image_size=SIZE).labels is None  # a mere container


# --------------------------------------------------------------------------- the cache


def test_parallel_build_equals_serial_and_manifest_round_trips(folder: Path, tmp_path: Path):
    one = prepare_cache(folder, image_size=SIZE, out=tmp_path / "one", workers=1)
    two = prepare_cache(folder, image_size=SIZE, out=tmp_path / "two", workers=2)
    assert (one / "images.u8").read_bytes() == (two / "images.u8").read_bytes()
    manifest = cache_mod.read_manifest(two)
    assert manifest == cache_mod.read_manifest(one)
    assert manifest.shape == (27, 3, SIZE, SIZE) and manifest.class_names == ("cat", "dog", "owl")
    assert manifest.files[:2] == ("cat/00.png", "cat/01.png") and manifest.labels[9] == 1
    assert manifest.sizes[0] == (folder / "cat" / "00.png").stat().st_size
    # A prepared folder named directly is a data set, split like its source.
    direct = load_dataset(two, split="test")
    assert torch.equal(read_all(direct)[0], read_all(load_dataset(folder, split="test", image_size=SIZE))[0])
    with pytest.raises(DataError, match="prepared with image_size=8; image_size=16 was asked for"):
        load_dataset(two, image_size=16)


def test_changed_folder_is_recached(folder: Path):
    first = load_dataset(folder, image_size=SIZE, holdout_fraction=0, loader="stream")
    built = (first.cache / "manifest.json").stat().st_mtime_ns
    again = load_dataset(folder, image_size=SIZE, holdout_fraction=0, loader="stream")
    assert (again.cache / "manifest.json").stat().st_mtime_ns == built  # up to date: reused
    changed = folder / "dog" / "03.png"
    save(changed, np.full((12, 12, 3), 7, np.uint8))
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    save(folder / "owl" / "new.png", np.full((9, 9, 3), 200, np.uint8))
    recached = load_dataset(folder, image_size=SIZE, holdout_fraction=0, loader="stream")
    assert len(recached) == 28
    assert torch.equal(read_all(recached)[0], read_all(load_dataset(folder, image_size=SIZE, holdout_fraction=0,
                                                                     loader="stream", cache_images=False))[0])
    assert torch.all(recached.read([9 + 3]).images == 7)


def test_truncated_cache_is_rebuilt_never_trained_on(folder: Path, tmp_path: Path, caplog):
    stream = load_dataset(folder, image_size=SIZE, holdout_fraction=0, loader="stream")
    expected = read_all(stream)[0]
    data = stream.cache / "images.u8"
    with open(data, "r+b") as fh:
        fh.truncate(data.stat().st_size - 100)
    with pytest.raises(CacheError, match="incomplete"):
        cache_mod.read_manifest(stream.cache)
    with caplog.at_level(logging.WARNING):
        rebuilt = load_dataset(folder, image_size=SIZE, holdout_fraction=0, loader="stream")
    assert "incomplete" in caplog.text
    assert torch.equal(read_all(rebuilt)[0], expected)
    # A prepared folder named directly: rebuilt from its source when that is here, else refused.
    out = prepare_cache(folder, image_size=SIZE, out=tmp_path / "prep")
    with open(out / "images.u8", "r+b") as fh:
        fh.truncate(10)
    assert torch.equal(read_all(load_dataset(out, holdout_fraction=0, loader="stream"))[0], expected)
    with open(out / "images.u8", "r+b") as fh:
        fh.truncate(10)
    moved = folder.rename(tmp_path / "moved")
    with pytest.raises(CacheError, match="source folder .* is not here"):
        load_dataset(out, holdout_fraction=0)
    assert moved.is_dir()


def test_cache_file_of_another_format_is_refused(tmp_path: Path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "manifest.json").write_text('{"format": "other", "version": 9}')
    with pytest.raises(CacheError, match="not a prepared cache"):
        cache_mod.read_manifest(tmp_path / "c")


# ------------------------------------------------------------------------ bad images


@pytest.fixture
def folder_with_bad_file(tmp_path: Path) -> Path:
    root = make_class_folder(tmp_path / "bad", per_class=4, classes=("a", "b"))
    (root / "a" / "01.png").write_bytes(b"\x89PNG\r\n\x1a\n definitely not a png")
    return root


def test_bad_file_in_a_worker_is_a_clear_error(folder_with_bad_file: Path):
    ds = load_dataset(folder_with_bad_file, image_size=SIZE, holdout_fraction=0, loader="stream",
                      cache_images=False)
    feed = BatchFeed(ds, batch_size=8, seed=0, workers=1)
    try:
        with pytest.raises(ImageDecodeError, match=r"cannot decode image file .*a/01\.png") as info:
            feed.get(0)  # batch 0 holds all 8 examples
        assert "Traceback" not in str(info.value)  # raised here, not a worker's wrapped traceback
    finally:
        feed.close()
    with pytest.raises(ImageDecodeError, match=r"a/01\.png"):  # the cache records it; the run refuses
        load_dataset(folder_with_bad_file, image_size=SIZE, holdout_fraction=0, loader="stream")


def test_bad_file_skipped_is_counted_and_reported(folder_with_bad_file: Path, caplog):
    streamed = load_dataset(folder_with_bad_file, image_size=SIZE, holdout_fraction=0, loader="stream",
                            cache_images=False, skip_bad_images=True)
    feed = BatchFeed(streamed, batch_size=8, seed=0, workers=1)
    try:
        with caplog.at_level(logging.WARNING, logger="ddpm.train"):
            batch = feed.get(0)
        assert batch.x0.shape == (8, 3, SIZE, SIZE)
        assert list(feed.skipped_files) == [str(folder_with_bad_file / "a" / "01.png")]
        assert "skipped 1 undecodable" in caplog.text
        # The bad example is replaced by the next one (a/02) with its label.
        pixels = streamed.read([1, 2])
        assert torch.equal(pixels.images[0], pixels.images[1]) and pixels.labels.tolist() == [0, 0]
    finally:
        feed.close()
    # A cache knows the bad files in advance and numbers the rest like the in-memory path.
    with pytest.warns(UserWarning, match="skipped 1"):
        mapped = load_dataset(folder_with_bad_file, image_size=SIZE, holdout_fraction=0, loader="stream",
                              skip_bad_images=True)
    with pytest.warns(UserWarning, match="skipped 1"):
        memory = load_dataset(folder_with_bad_file, image_size=SIZE, holdout_fraction=0, loader="memory",
                              skip_bad_images=True, prepared_dir=Path(str(mapped.cache) + "-elsewhere"))
    assert len(mapped) == len(memory) == 7 and mapped.num_skipped == memory.num_skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(read_all(mapped), read_all(memory), strict=True))


# ---------------------------------------------------------------------------- the feed


@pytest.mark.parametrize("workers", [0, 2])
def test_feed_streamed_equals_memory_for_every_step_and_rank(folder: Path, workers: int):
    memory = load_dataset(folder, image_size=SIZE, holdout_fraction=0, loader="memory")
    streamed = load_dataset(folder, image_size=SIZE, holdout_fraction=0, loader="stream", cache_images=False)
    steps = range(5)  # batches of 12 from 27 examples: steps 2 and 4 straddle epochs
    whole = BatchFeed(memory, batch_size=12, seed=3)
    feeds = [BatchFeed(streamed, batch_size=12, seed=3, rank=r, world_size=2, workers=workers) for r in (0, 1)]
    try:
        for step in steps:
            expected = whole.get(step)
            parts = [feed.get(step) for feed in feeds]
            assert torch.equal(torch.cat([p.x0 for p in parts]), expected.x0)
            assert torch.equal(torch.cat([p.y for p in parts]), expected.y)
        # Out of turn (a resume): the sampler restarts at the asked step.
        assert torch.equal(feeds[1].get(1).x0, whole.get(1).x0[6:])
        assert torch.equal(feeds[1].get(2).x0, whole.get(2).x0[6:])
    finally:
        for feed in feeds:
            feed.close()
    first_epoch = torch.cat([whole.indices(0), whole.indices(1), whole.indices(2)[:3]])
    assert sorted(first_epoch.tolist()) == list(range(27))


def make_config(out_dir: Path, **overrides: object) -> RunConfig:
    return apply_overrides(RunConfig(), {
        "data.hflip": True, "data.workers": 1, "diffusion.timesteps": T, "diffusion.timestep_sampling": "loss-aware",
        "optim.lr": 1e-2, "optim.warmup_steps": 2, "optim.grad_accum": 2, "ema.decay": 0.9,
        "train.steps": 6, "train.batch_size": 8, "train.device": "cpu", "train.checkpoint_every": 3,
        "train.keep_last": 0, "train.log_every": 2, "train.sample_every": 0, "train.tensorboard": False,
        "train.out_dir": str(out_dir), **overrides,
    })


def train(config: RunConfig, dataset, resume: str | None = None) -> Trainer:
    torch.manual_seed(0)
    trainer = Trainer(config, TinyNet(channels=3), ddpm.GaussianDiffusion(ddpm.make_betas("linear", T)), dataset)
    trainer.run(resume=resume)
    return trainer


def test_training_streamed_equals_in_memory_and_resumes_exactly(folder: Path, tmp_path: Path):
    memory = load_dataset(folder, image_size=SIZE, holdout_fraction=0, loader="memory")
    mapped = load_dataset(folder, image_size=SIZE, holdout_fraction=0, loader="stream")
    whole = train(make_config(tmp_path / "memory"), memory)
    streamed = train(make_config(tmp_path / "stream"), mapped)
    assert_same_state(whole.model.state_dict(), streamed.model.state_dict())
    # 3 steps, stop, then resume to 6 with workers: the same weights bit for bit.
    train(make_config(tmp_path / "split", **{"train.steps": 3}), mapped)
    resumed = train(make_config(tmp_path / "split"), mapped, resume="auto")
    assert resumed.step == 6
    assert_same_state(whole.model.state_dict(), resumed.model.state_dict())
    assert_same_state(whole.ema.state_dict(), resumed.ema.state_dict())


# ------------------------------------------------------------------ Hugging Face datasets

datasets = pytest.importorskip("datasets")


def test_hf_save_to_disk_matches_the_folder(folder: Path, tmp_path: Path):
    files = sorted(folder.rglob("*.png"))
    names = ["cat", "dog", "owl"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    table = datasets.Dataset.from_dict(
        {"image": [str(p) for p in files], "label": [names.index(p.parent.name) for p in files]}, features=features
    )
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "hfset"))
    spec = f"hf:{tmp_path / 'hfset'}"
    for split in ("train", "test"):
        expected = read_all(load_dataset(folder, split=split, image_size=SIZE, loader="memory"))
        for loader in ("memory", "stream"):
            ds = load_dataset(spec, split=split, image_size=SIZE, loader=loader)
            assert ds.class_names == tuple(names)
            assert all(torch.equal(a, b) for a, b in zip(read_all(ds), expected, strict=True))
    streamed = load_dataset(spec, image_size=SIZE, loader="stream", holdout_fraction=0)
    feed = BatchFeed(streamed, batch_size=9, seed=0, workers=1)  # the table is read in a worker
    try:
        memory = load_dataset(folder, image_size=SIZE, holdout_fraction=0, loader="memory")
        assert torch.equal(feed.get(1).x0, BatchFeed(memory, batch_size=9, seed=0).get(1).x0)
    finally:
        feed.close()
    with pytest.raises(DataError, match=r"has no split 'validation'; its splits are \['train'\]"):
        load_dataset(f"{spec}:validation")


def test_hf_imagefolder_labels_by_sub_folder(folder: Path, tmp_path: Path):
    ds = load_dataset(f"hf:{folder}", image_size=SIZE, holdout_fraction=0, loader="stream",
                      cache_dir=tmp_path / "hf-cache")
    assert ds.class_names == ("cat", "dog", "owl") and len(ds) == 27
    ours = load_dataset(folder, image_size=SIZE, holdout_fraction=0)
    key = lambda images, labels: sorted((int(y), x.numpy().tobytes()) for x, y in zip(images, labels, strict=True))  # noqa: E731
    assert key(*read_all(ds)) == key(*read_all(ours))  # the same labelled images (the builder's order may differ)


def test_hf_unreachable_hub_is_a_clear_error(tmp_path: Path):
    code = (
        "from ddpm.data import load_dataset\n"
        "try:\n    load_dataset('hf:no-such-user/no-such-set')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.startswith("DataError cannot load the datasets data set 'no-such-user/no-such-set'")
    assert "hub cache" in out and "save_to_disk" in out


@pytest.fixture
def hf_disk(folder: Path, tmp_path: Path) -> Path:
    """The class folder as a `datasets` table with an Image and a ClassLabel column, saved to disk."""
    files = sorted(folder.rglob("*.png"))
    names = ["cat", "dog", "owl"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    table = datasets.Dataset.from_dict(
        {"image": [str(p) for p in files], "label": [names.index(p.parent.name) for p in files]}, features=features
    )
    table.save_to_disk(str(tmp_path / "hf-table"))
    return tmp_path / "hf-table"


def test_hf_stream_is_one_order_for_any_workers_ranks_and_restarts(hf_disk: Path, folder: Path):
    stream = load_dataset(f"hf:{hf_disk}", image_size=SIZE, hf_streaming=True)
    assert len(stream) == 27 and stream.class_names == ("cat", "dog", "owl")
    one = BatchFeed(stream, batch_size=12, seed=5, workers=0)
    two_workers = BatchFeed(stream, batch_size=12, seed=5, workers=2)
    ranks = [BatchFeed(stream, batch_size=12, seed=5, rank=r, world_size=2, workers=0) for r in (0, 1)]
    try:
        batches = [one.get(k) for k in range(5)]  # 60 positions: epochs 0, 1 and part of 2
        for k, expected in enumerate(batches):
            assert torch.equal(two_workers.get(k).x0, expected.x0) and torch.equal(two_workers.get(k).y, expected.y)
            parts = [feed.get(k) for feed in ranks]
            assert torch.equal(torch.cat([p.x0 for p in parts]), expected.x0)
        assert torch.equal(BatchFeed(stream, batch_size=12, seed=5, workers=1).get(3).x0, batches[3].x0)  # resume
        # Each epoch is a permutation of the examples, labels travelling with their pixels.
        memory = load_dataset(folder, image_size=SIZE, holdout_fraction=0)
        x = torch.cat([b.x0 for b in batches])
        y = torch.cat([b.y for b in batches])

        def key(xs, ys):
            return sorted((int(label), image.numpy().tobytes()) for image, label in zip(xs, ys, strict=True))

        assert key(x[:27], y[:27]) == key(x[27:54], y[27:54]) == key(memory.get_batch(torch.arange(27)), memory.labels)
        assert not torch.equal(x[:27], x[27:54])  # a fresh shuffle per epoch
        assert not torch.equal(BatchFeed(stream, batch_size=12, seed=6, workers=0).get(0).x0, batches[0].x0)
    finally:
        for feed in (one, two_workers, *ranks):
            feed.close()


def test_hf_stream_bad_image_is_an_error_or_replaced_by_the_next(tmp_path: Path):
    good = [np.full((8, 8, 3), 10 * i, np.uint8) for i in range(6)]
    blobs = []
    for i, pixels in enumerate(good):
        path = save(tmp_path / f"{i}.png", pixels)
        blobs.append({"bytes": path.read_bytes() if i != 2 else b"not a png", "path": None})
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": blobs}, features=features).save_to_disk(str(tmp_path / "bad"))
    stream = load_dataset(f"hf:{tmp_path / 'bad'}", hf_streaming=True)
    with pytest.raises(ImageDecodeError, match="cannot decode the image of stream position"):
        BatchFeed(stream, batch_size=6, seed=0, workers=0).get(0)
    skipping = load_dataset(f"hf:{tmp_path / 'bad'}", hf_streaming=True, skip_bad_images=True)
    feed = BatchFeed(skipping, batch_size=6, seed=0, workers=0)
    x = feed.get(0).x0
    values = sorted(int(v) for v in ((x[:, 0, 0, 0] + 1) * 127.5).round())
    assert 20 not in values and len(values) == 6 and len(feed.skipped_files) == 1  # image 2 replaced
