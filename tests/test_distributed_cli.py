"""`torchrun ... -m ddpm sample` and `... nll` shard over processes and gather: the results equal
one process's, sample by sample and image by image (2 gloo processes on the CPU)."""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch.multiprocessing as mp

from ddpm.cli import main

from .test_cli import TINY, write_folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, argv: list[str]) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    assert main(argv) == 0


def run_two(argv: list[str]) -> None:
    mp.spawn(_worker, args=(2, free_port(), argv), nprocs=2, join=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    data = write_folder(tmp / "data")
    out = tmp / "run"
    assert main(["train", "--data", str(data), "--steps", "2", "--out", str(out), *TINY]) == 0
    return out, data


def test_sample_i_is_the_same_with_one_or_two_processes(run_dir: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = run_dir
    common = ["sample", str(run), "-n", "5", "--steps", "4", "--device", "cpu", "--format", "npz"]
    assert main([*common, "--out", str(tmp_path / "one"), "--batch-size", "1"]) == 0
    run_two([*common, "--out", str(tmp_path / "two"), "--batch-size", "4"])
    one = np.load(tmp_path / "one" / "samples.npz")["images"]
    two = np.load(tmp_path / "two" / "samples.npz")["images"]
    assert one.shape == (5, 8, 8, 1)
    np.testing.assert_array_equal(one, two)


def test_nll_is_the_mean_over_all_images_whatever_the_processes(run_dir: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = run_dir
    common = ["nll", str(run), "--data", str(data), "--split", "train", "-n", "5", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "one"), "--batch-size", "2"]) == 0
    run_two([*common, "--out", str(tmp_path / "two"), "--batch-size", "3"])
    one = json.loads((tmp_path / "one" / "nll.json").read_text())
    two = json.loads((tmp_path / "two" / "nll.json").read_text())
    assert one["images"] == two["images"] == 5  # 3 + 2 images: unequal shards
    assert two["total_bpd"] == pytest.approx(one["total_bpd"], rel=1e-6)
