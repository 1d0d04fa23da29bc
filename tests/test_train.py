"""Training engine: exact resume, atomic checkpoints, config files, EMA, non-finite steps, metrics."""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path

import pytest
import torch
from torch import nn

import ddpm
from ddpm import checkpoint as ckpt_mod
from ddpm.checkpoint import (
    ArchitectureMismatchError,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    read_config,
)
from ddpm.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_toml,
    load_config,
    to_toml,
    validate_config,
)
from ddpm.errors import CheckpointError, NonFiniteLossError
from ddpm.train.ema import ExponentialMovingAverage, ema_decay
from ddpm.train.trainer import Trainer, linear_warmup_lr

T = 50  # diffusion steps of the test runs

torch.set_num_threads(1)


class TinyImages:
    """An in-memory image data set with the interface the trainer needs."""

    kind = "image"

    def __init__(self, n: int = 20, shape: tuple[int, ...] = (2, 6, 6), seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.data = torch.rand((n, *shape), generator=gen) * 2 - 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def __len__(self) -> int:
        return self.data.shape[0]

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.data[indices].clone()


class TinyNet(nn.Module):
    """A two-layer conv net with a timestep embedding and dropout."""

    def __init__(self, channels: int = 2, width: int = 8, dropout: float = 0.2) -> None:
        super().__init__()
        self.emb = nn.Embedding(T, width)
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.inp(x) + self.emb(t)[:, :, None, None])
        return self.out(self.drop(h))


def make_config(out_dir: Path, **overrides: object) -> RunConfig:
    base = {
        "data.hflip": True,
        "diffusion.timesteps": T,
        "diffusion.timestep_sampling": "loss-aware",
        "optim.lr": 1e-2,
        "optim.warmup_steps": 4,
        "optim.grad_accum": 2,
        "optim.grad_clip": 1.0,
        "ema.decay": 0.9,
        "ema.warmup": "ratio",
        "train.steps": 6,
        "train.batch_size": 8,
        "train.device": "cpu",
        "train.amp": "none",  # fp32 whatever this CPU's policy: the tests compare runs to float tolerance
        "train.checkpoint_every": 3,
        "train.keep_last": 0,
        "train.log_every": 2,
        "train.sample_every": 0,
        "train.tensorboard": False,
        "train.out_dir": str(out_dir),
    }
    base.update(overrides)
    return apply_overrides(RunConfig(), base)


def make_trainer(config: RunConfig, model: nn.Module | None = None, *, model_seed: int = 0, **kwargs) -> Trainer:
    if model is None:
        torch.manual_seed(model_seed)
        model = TinyNet()
    diffusion = ddpm.GaussianDiffusion(
        ddpm.make_betas("linear", T)
    )
    return Trainer(config, model, diffusion, TinyImages(), **kwargs)


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


# ------------------------------------------------------------------------------------ resume


class Killed(Exception):
    pass


def test_resume_is_exact(tmp_path):
    """6 steps in one go == 3 steps, a kill during step 5, and a resume from the step-3 checkpoint.

    Dropout, EMA warm-up, lr warm-up, gradient accumulation, flips and loss-aware sampling are on.
    """
    whole = make_trainer(make_config(tmp_path / "whole"))
    whole.run()

    def kill_at_5(model, step):
        if step == 5:
            raise Killed

    killed = make_trainer(make_config(tmp_path / "split", **{"train.sample_every": 1}), sample_fn=kill_at_5)
    with pytest.raises(Killed):
        killed.run()
    assert find_latest(tmp_path / "split").name == "ckpt-00000003"

    resumed = make_trainer(make_config(tmp_path / "split"), model_seed=123)  # init is overwritten
    resumed.run(resume="auto")
    assert resumed.step == 6
    assert_same_state(whole.model.state_dict(), resumed.model.state_dict())
    assert_same_state(whole.ema.state_dict(), resumed.ema.state_dict())
    assert whole.ema.num_updates == resumed.ema.num_updates == 6
    assert_same_state(
        whole.timestep_sampler.state_dict(), resumed.timestep_sampler.state_dict()
    )
    # Checkpoints on disk agree too, and training actually moved the weights.
    assert_same_state(load_weights(tmp_path / "whole", "ema"), load_weights(tmp_path / "split", "ema"))
    torch.manual_seed(0)
    assert not torch.equal(TinyNet().inp.weight, whole.model.inp.weight)


def test_resume_from_explicit_path_and_auto_without_checkpoint(tmp_path):
    trainer = make_trainer(make_config(tmp_path / "a", **{"train.steps": 3}))
    assert trainer.resume("auto") is None  # nothing to resume: starts fresh
    trainer.run()
    again = make_trainer(make_config(tmp_path / "b", **{"train.steps": 4}))
    again.run(resume=tmp_path / "a" / "ckpt-00000003")
    assert again.step == 4 and find_latest(tmp_path / "b").name == "ckpt-00000004"


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    results = []
    for accum in (1, 4):
        torch.manual_seed(0)
        cfg = make_config(tmp_path / f"acc{accum}", **{"optim.grad_accum": accum, "train.steps": 3})
        trainer = make_trainer(cfg, TinyNet(dropout=0.0))
        trainer.run()
        results.append(trainer.model.state_dict())
    assert_same_state(results[0], results[1], atol=1e-6)


def test_data_order_covers_each_example_once_per_epoch(tmp_path):
    trainer = make_trainer(make_config(tmp_path))
    n = len(trainer.dataset)  # 20 examples, batches of 8: batch 2 straddles two epochs
    first = torch.cat([trainer.feed.indices(k) for k in range(5)])  # 40 = two epochs
    assert sorted(first[:n].tolist()) == list(range(n))
    assert sorted(first[n:].tolist()) == list(range(n))
    assert not torch.equal(first[:n], first[n:])  # a fresh permutation per epoch
    assert torch.equal(trainer.feed.indices(3), first[24:32])


# ------------------------------------------------------------------------------- checkpoints


def test_crash_while_writing_checkpoint_keeps_previous(tmp_path, monkeypatch):
    out = tmp_path / "run"
    make_trainer(make_config(out, **{"train.steps": 3})).run()
    good = find_latest(out)
    assert good.name == "ckpt-00000003"

    calls = {"n": 0}
    real_write = ckpt_mod._write_bytes

    def failing_write(path, data):
        calls["n"] += 1
        if calls["n"] == 3:  # state.pt: the model and EMA weights are already in the temp folder
            real_write(path, data[: len(data) // 2])
            raise OSError("disk full (simulated)")
        real_write(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_bytes", failing_write)
    with pytest.raises(CheckpointError, match="simulated.*untouched"):
        make_trainer(make_config(out, **{"train.steps": 6})).run(resume="auto")
    monkeypatch.undo()

    # A hard kill leaves debris that an exception handler would have removed; fake it too.
    (out / ".tmp-ckpt-00000006-1-1").mkdir()
    (out / ".tmp-ckpt-00000006-1-1" / "model.safetensors").write_bytes(b"partial")
    (out / "ckpt-00000009").mkdir()  # a folder without meta.json is incomplete
    assert find_latest(out) == good
    assert [p.name for p in list_checkpoints(out)] == ["ckpt-00000003"]

    torch.manual_seed(5)
    model = TinyNet()
    path, ema_state, state = load_checkpoint(out, model)
    assert path == good and state["step"] == 3 and set(ema_state) == set(model.state_dict())
    # The next successful save sweeps the debris away.
    make_trainer(make_config(out, **{"train.steps": 6})).run(resume="auto")
    assert find_latest(out).name == "ckpt-00000006"
    assert not list(out.glob(".tmp-ckpt-*"))


def test_keep_last(tmp_path):
    cfg = make_config(tmp_path, **{"train.checkpoint_every": 1, "train.keep_last": 2})
    trainer = make_trainer(cfg)
    trainer.run()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000005", "ckpt-00000006"]
    make_trainer(make_config(tmp_path, **{"train.steps": 6, "train.checkpoint_every": 0})).run(resume="auto")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000005", "ckpt-00000006"]
    ckpt_mod.save_checkpoint(tmp_path, 6, model=trainer.model, ema_state=trainer.ema.state_dict(),  # re-save 6
                             train_state=trainer.train_state(), config=cfg, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000005", "ckpt-00000006"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_checkpoint_contents(tmp_path):
    cfg = make_config(tmp_path, **{"train.steps": 2, "train.checkpoint_every": 0})
    make_trainer(cfg).run()
    path = find_latest(tmp_path)  # the final checkpoint is written even with checkpoint_every=0
    assert path.name == "ckpt-00000002"
    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == ckpt_mod.FORMAT_VERSION and meta["step"] == 2
    assert meta["architecture"]["class"] == "TinyNet"
    assert meta["weights"] == {"model.safetensors": "raw", "ema.safetensors": "ema"}
    assert read_config(path) == cfg
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["data"]["samples_seen"] == 16 and state["ema"]["num_updates"] == 2
    assert set(load_weights(path, "raw")) == set(TinyNet().state_dict())


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    make_trainer(make_config(tmp_path, **{"train.steps": 1})).run()
    with pytest.raises(ArchitectureMismatchError, match=r"shape differs: .*inp\.weight"):
        load_checkpoint(tmp_path, TinyNet(width=16))

    class Wider(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(2, 2)

    with pytest.raises(ArchitectureMismatchError, match=r"missing in checkpoint: extra\.bias, extra\.weight"):
        load_checkpoint(tmp_path, Wider())
    with pytest.raises(ArchitectureMismatchError, match="another architecture"):
        make_trainer(make_config(tmp_path, **{"train.steps": 2}), TinyNet(width=4)).run(resume="auto")


# ------------------------------------------------------------------------------- non-finite


class Poisonable(TinyNet):
    """Returns NaN while ``poisoned`` is set, whatever its weights."""

    poisoned = False

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y = super().forward(x, t)
        return y * float("nan") if self.poisoned else y


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path, caplog):
    cfg = make_config(tmp_path, **{
        "optim.grad_accum": 1, "train.steps": 20, "train.checkpoint_every": 2, "train.max_nonfinite": 3,
        "train.sample_every": 1,
    })
    torch.manual_seed(0)
    net = Poisonable()

    def poison_after_4(model, step):  # runs at the end of each step, after its checkpoint
        net.poisoned = step >= 4

    trainer = make_trainer(cfg, net, sample_fn=poison_after_4)  # steps 1-4 fine, 5, 6, 7 non-finite
    with pytest.raises(NonFiniteLossError, match=r"non-finite for 3 steps in a row \(steps 5\.\.7") as err:
        trainer.run()
    assert "ckpt-00000004" in str(err.value)
    assert trainer.step == 7 and trainer.nonfinite_total == 3
    assert sum("skipped: non-finite" in r.message for r in caplog.records) == 3
    assert sum("not checkpointing" in r.message for r in caplog.records) == 1  # step 6 was due
    last = find_latest(tmp_path)
    assert last.name == "ckpt-00000004"
    for which in ("raw", "ema"):
        assert all(torch.isfinite(v).all() for v in load_weights(last, which).values())
    # No update was applied in the skipped steps: the weights are those of the checkpoint.
    assert_same_state(trainer.model.state_dict(), load_weights(last, "raw"))
    assert_same_state(trainer.ema.state_dict(), load_weights(last, "ema"))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 6 and lines[-1]["nonfinite_steps"] == 2 and lines[-1]["loss"] is None


# ---------------------------------------------------------------------------------- logging


def test_metrics_eval_and_sample_callback(tmp_path):
    calls = []
    cfg = make_config(tmp_path, **{"train.steps": 4, "train.sample_every": 2, "train.eval_every": 4})
    trainer = make_trainer(cfg, eval_dataset=TinyImages(n=10, seed=1),
                           sample_fn=lambda model, step: calls.append((model, step)))
    trainer.run()
    assert [s for _, s in calls] == [2, 4] and all(m is trainer.ema.module for m, _ in calls)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == [2, 4]
    for line in train_lines:
        assert {"mse", "grad_norm", "lr", "images_per_sec", "epoch"} <= set(line)
        assert len(line["mse_by_t_bucket"]) == 10
        counted = [v for v in line["mse_by_t_bucket"] if v is not None]
        assert counted and all(v > 0 for v in counted)
    assert train_lines[0]["lr"] == pytest.approx(1e-2 * 2 / 4)  # warm-up at step index 1
    evals = [x for x in lines if "eval_loss" in x]
    assert len(evals) == 1 and math.isfinite(evals[0]["eval_loss"])
    assert load_config(tmp_path / "config.toml") == cfg


def test_bf16_autocast_runs_on_cpu(tmp_path):
    trainer = make_trainer(make_config(tmp_path, **{"train.steps": 1, "train.amp": "bf16"}))
    trainer.run()
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    with pytest.raises(ConfigError, match="fp16.*needs CUDA"):
        make_trainer(make_config(tmp_path, **{"train.amp": "fp16"}))


def test_linear_warmup_lr():
    assert linear_warmup_lr(0, 1.0, 4) == 0.25
    assert linear_warmup_lr(3, 1.0, 4) == 1.0
    assert linear_warmup_lr(100, 1.0, 4) == 1.0
    assert linear_warmup_lr(0, 1.0, 0) == 1.0


# -------------------------------------------------------------------------------------- EMA


def test_ema_decay_warmups():
    assert ema_decay(0, 0.999, "none") == 0.999
    assert ema_decay(0, 0.999, "ratio") == pytest.approx(0.1)
    assert ema_decay(90, 0.999, "ratio") == pytest.approx(91 / 100)
    assert ema_decay(10**6, 0.999, "ratio") == 0.999
    assert ema_decay(0, 0.999, "power") == 0.0
    assert ema_decay(10, 0.9999, "power", inv_gamma=1.0, power=0.75) == pytest.approx(1 - 11**-0.75)
    assert ema_decay(9, 0.9999, "power", inv_gamma=10.0, power=1.0) == pytest.approx(1 - 1 / 1.9)
    assert ema_decay(10**9, 0.9999, "power") == 0.9999


def test_ema_update_follows_the_recurrence():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    ema = ExponentialMovingAverage(model, decay=0.9, warmup="ratio")
    assert all(p.dtype == torch.float32 for p in ema.module.parameters())
    expected = model[0].weight.detach().clone()
    for n in range(5):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].running_mean.fill_(float(n))
        d = ema.update(model)
        assert d == pytest.approx(min(0.9, (1 + n) / (10 + n)))
        expected = d * expected + (1 - d) * model[0].weight.detach()
    torch.testing.assert_close(ema.module[0].weight, expected.float())
    assert torch.equal(ema.module[1].running_mean, torch.full((3,), 4.0))  # buffers copied
    target = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double()
    ema.copy_to(target)
    torch.testing.assert_close(target[0].weight, expected.float().double())
    restored = ExponentialMovingAverage(model, decay=0.9, warmup="ratio")
    restored.load_state_dict(ema.state_dict(), num_updates=ema.num_updates)
    assert restored.current_decay() == ema.current_decay()


# ----------------------------------------------------------------------------------- config


def test_config_toml_round_trip(tmp_path):
    cfg = apply_overrides(RunConfig(), {
        "model.channel_mult": "1,2,2", "model.dropout": 0.1, "optim.betas": "0.9, 0.99",
        "data.dataset": 'my "quoted" folder\\x', "train.compile": "true", "ema.decay": 0.999,
        "model.scale_shift_norm": "false", "data.image_size": 64, "data.holdout_fraction": "0.1",
    })
    text = to_toml(cfg)
    assert config_from_toml(text) == cfg
    path = tmp_path / "run.toml"
    path.write_text(text)
    assert load_config(path) == cfg
    assert cfg.model.channel_mult == (1, 2, 2) and cfg.optim.betas == (0.9, 0.99) and cfg.train.compile


def test_partial_config_file_takes_defaults(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[train]\nsteps = 10\n\n[optim]\nlr = 1\n')
    cfg = load_config(path)
    assert cfg.train.steps == 10 and cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.train.batch_size == RunConfig().train.batch_size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[train]\nstepz = 3\n", r"unknown key\(s\) train\.stepz"),
        ("[trian]\nsteps = 3\n", r"unknown section\(s\) \['trian'\]"),
        ('[train]\nsteps = "ten"\n', r"train\.steps='ten' is not valid: expected int"),
        ('[train]\namp = "fp8"\n', r"train\.amp='fp8' is not valid: expected one of 'auto', 'none', 'bf16', 'fp16'"),
        ("[optim]\nbetas = [0.9]\n", r"optim\.betas=\[0\.9\] is not valid: expected a list of 2 numbers"),
        ("[optim]\nlr = -1.0\n", r"optim\.lr=-1\.0 must be > 0"),
        ("[train]\nbatch_size = 12\n[optim]\ngrad_accum = 5\n", r"not divisible by optim\.grad_accum=5"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_config_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_overrides_and_their_errors():
    cfg = apply_overrides(RunConfig(), {"train.steps": "100", "model.dropout": "none", "train.seed": None})
    assert cfg.train.steps == 100 and cfg.model.dropout is None and cfg.train.seed == 0
    assert RunConfig().train.steps != 100  # the input is not modified
    with pytest.raises(ConfigError, match=r"unknown key; valid keys in \[train\]"):
        apply_overrides(RunConfig(), {"train.stpes": 1})
    with pytest.raises(ConfigError, match=r"expected 'section.key'"):
        apply_overrides(RunConfig(), {"steps": 1})
    with pytest.raises(ConfigError, match=r"train\.compile='maybe' is not valid: expected bool"):
        apply_overrides(RunConfig(), {"train.compile": "maybe"})
    with pytest.raises(ConfigError, match=r"train\.batch_size=10 is not divisible by world size 3"):
        validate_config(apply_overrides(RunConfig(), {"train.batch_size": 10}), world_size=3)


def test_every_optional_field_defaults_to_none():
    """TOML cannot write None, so an Optional field must default to None to round-trip."""
    for section in dataclasses.fields(RunConfig):
        cls = section.default_factory
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if type(None) in typing.get_args(hints[f.name]):
                assert f.default is None, f"{section.name}.{f.name}"
