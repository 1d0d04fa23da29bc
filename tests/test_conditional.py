"""Class-conditional training end to end: labels from the data, label dropout, exact resume,
two processes equal one, sampling by class with guidance, the conditional bound, and export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import ddpm
from ddpm.cli import main
from ddpm.config import RunConfig, apply_overrides
from ddpm.errors import ConfigError

torch.set_num_threads(1)


def labelled_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 8) -> Path:
    """One sub-folder per class; class c's images are bright in the c-th third of the rows."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class-{chr(ord('a') + c)}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            arr = (rng.random((size, size)) * 60).astype(np.uint8)
            arr[c * size // classes : (c + 1) * size // classes] += 180
            Image.fromarray(arr, mode="L").save(folder / f"{i}.png")
    return root


def config(data: Path, out: Path, **overrides: object) -> RunConfig:
    base = {
        "data.dataset": str(data), "data.holdout_fraction": 0.0, "model.class_cond": True, "model.cond_drop": 0.3,
        "model.base_channels": 8, "model.channel_mult": [1, 2], "model.num_groups": 4,
        "diffusion.schedule": "cosine", "diffusion.timesteps": 50, "diffusion.prediction": "v",
        "optim.lr": 1e-3, "optim.warmup_steps": 1, "train.steps": 4, "train.batch_size": 8, "train.device": "cpu",
        "train.amp": "none",  # fp32 whatever this CPU's policy: runs are compared to float tolerance
        "train.checkpoint_every": 2, "train.keep_last": 0, "train.log_every": 1, "train.sample_every": 0,
        "train.tensorboard": False, "train.out_dir": str(out),
    }
    base.update(overrides)
    return apply_overrides(RunConfig(), base)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cond")
    data = labelled_folder(tmp / "data")
    result = ddpm.fit(config(data, tmp / "run"), progress=False)
    return result.checkpoint, data


def test_labels_and_class_names_come_from_the_data(run: tuple[Path, Path]) -> None:
    ckpt, _ = run
    pipe = ddpm.load(ckpt, device="cpu")
    assert pipe.num_classes == 3 and pipe.can_guide
    assert pipe.config.model.class_names == ("class-a", "class-b", "class-c")
    assert pipe.model.config.num_class_embeds == 4  # three classes and the null class


def test_label_dropout_replaces_about_cond_drop_of_the_labels(tmp_path: Path) -> None:
    from ddpm.build import build_dataset, build_model
    from ddpm.processes import build_process
    from ddpm.train import Trainer
    from ddpm.train.fit import resolve_config

    data = labelled_folder(tmp_path / "data")
    cfg = config(data, tmp_path / "r", **{"train.batch_size": 24})
    dataset = build_dataset(cfg.data)
    cfg = resolve_config(cfg, dataset)
    process = build_process(cfg.diffusion)
    model, _ = build_model(cfg, tuple(dataset.shape), process)
    trainer = Trainer(cfg, model, process, dataset)
    dropped = torch.cat([trainer.get_batch(k).y == 3 for k in range(100)]).double().mean()
    assert abs(float(dropped) - 0.3) < 4 * (0.3 * 0.7 / 2400) ** 0.5
    true = trainer.feed.get(0).y
    kept = trainer.get_batch(0).y
    assert torch.equal(kept[kept != 3], true[kept != 3])  # kept labels are the data's
    trainer.close()


def test_resume_is_exact_for_a_conditional_run(tmp_path: Path) -> None:
    data = labelled_folder(tmp_path / "data")
    whole = ddpm.fit(config(data, tmp_path / "whole"), progress=False)
    ddpm.fit(config(data, tmp_path / "half", **{"train.steps": 2}), progress=False)
    resumed = ddpm.fit(config(data, tmp_path / "half"), resume="auto", progress=False)
    a, b = ddpm.load(whole.checkpoint, weights="raw"), ddpm.load(resumed.checkpoint, weights="raw")
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def _worker(rank: int, world: int, port: int, cfg: RunConfig) -> None:
    import os

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    ddpm.fit(cfg, progress=False)


def test_two_processes_train_a_conditional_model_like_one(tmp_path: Path) -> None:
    from .test_distributed_cli import free_port

    data = labelled_folder(tmp_path / "data")
    one = ddpm.fit(config(data, tmp_path / "one", **{"train.steps": 2}), progress=False)
    mp.spawn(_worker, args=(2, free_port(), config(data, tmp_path / "two", **{"train.steps": 2})), nprocs=2,
             join=True)
    a = ddpm.load(one.checkpoint, weights="raw").model.state_dict()
    b = ddpm.load(tmp_path / "two", weights="raw").model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_sampling_by_class_with_guidance_and_the_conditional_bound(run: tuple[Path, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    ckpt, data = run
    out = tmp_path / "all"
    assert main(["sample", str(ckpt), "--class", "all", "-n", "2", "--guidance", "2", "--steps", "5",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert np.load(out / "samples.npz")["images"].shape == (6, 8, 8, 1)
    assert main(["sample", str(ckpt), "--class", "7", "--steps", "3", "--device", "cpu",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "0..2" in capsys.readouterr().err
    assert main(["nll", str(ckpt), "--data", str(data), "--split", "train", "-n", "3", "--estimate", "4",
                 "--device", "cpu", "--out", str(tmp_path / "nll")]) == 0
    assert "-log p(x | y)" in capsys.readouterr().out
    pipe = ddpm.load(ckpt, device="cpu")
    with pytest.raises(ddpm.errors.UserError, match="guidance needs class labels"):
        pipe.sample(2, steps=3, guidance=2.0)


def test_conditional_run_exports_and_loads_back_bit_identical(run: tuple[Path, Path], tmp_path: Path) -> None:
    ckpt, _ = run
    pipe = ddpm.load(ckpt, device="cpu")
    back = ddpm.load(pipe.save_pretrained(tmp_path / "export"), device="cpu")
    assert back.num_classes == 3 and back.can_guide
    kwargs = dict(sampler="ancestral", steps=6, seed=2, classes=[0, 1, 2, 1], guidance=3.0)
    assert torch.equal(pipe.sample(4, **kwargs), back.sample(4, **kwargs))


def test_class_cond_on_unlabelled_data_is_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "flat"
    data.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8), 30 * i, np.uint8), mode="L").save(data / f"{i}.png")
    with pytest.raises(ConfigError, match="needs labelled data"):
        ddpm.fit(config(data, tmp_path / "r"), progress=False)
