"""What long runs need: evaluation while training with the best checkpoint kept, reference statistics files
in the field's format, the papers' sample count under several processes. Tiny runs on the built-in 8x8
digits, measured with the project's digit classifier (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpm
from ddpm.checkpoint import BEST_FILE, checkpoint_folders, read_best
from ddpm.cli import main
from ddpm.eval import gaussian_stats
from ddpm.eval.stats import FeatureStats, feature_stats, load_stats, save_stats

from .test_distributed_cli import run_two

DIGITS = ["--data", "digits", "--timesteps", "50", "--batch-size", "16", "--log-every", "1", "--sample-every", "0",
          "--warmup-steps", "1", "--lr", "2e-3", "--device", "cpu", "--set", "train.tensorboard=false",
          "--set", "model.base_channels=16", "--set", "model.channel_mult=1,2", "--set", "model.num_groups=8"]
EVAL = ["--eval-every", "2", "--eval-samples", "40", "--eval-sampler", "ddim", "--eval-steps", "3"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("long") / "run"
    assert main(["train", *DIGITS, "--steps", "8", "--out", str(out), "--checkpoint-every", "100",
                 "--keep-last", "1", *EVAL]) == 0
    return out


def test_evaluation_while_training_logs_scores_and_keeps_the_best_checkpoint(run: Path, tmp_path: Path) -> None:
    evals = [m for m in metrics(run) if "frechet_distance" in m]
    assert [m["step"] for m in evals] == [2, 4, 6, 8]
    for m in evals:
        assert m["kid"] == m["kid"] and 0 < m["eval_share"] < 1 and m["eval_seconds"] > 0 and "eval_loss" in m
    best = read_best(run)
    fds = {m["step"]: m["frechet_distance"] for m in evals}
    assert best is not None and best["metric"] == "frechet_distance"
    assert best["value"] == min(fds.values()) and fds[best["step"]] == best["value"]
    names = [p.name for p in checkpoint_folders(run)]
    assert names == sorted({best["checkpoint"], "ckpt-00000008"})  # --keep-last 1, and the best is never pruned

    pipe = ddpm.load(run, checkpoint="best", device="cpu")
    assert pipe.source.name == best["checkpoint"]
    assert main(["sample", str(run), "--best", "-n", "2", "--steps", "2", "--out", str(tmp_path / "s"),
                 "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "s" / "sample_info.json").read_text())["checkpoint"].endswith(best["checkpoint"])


def test_a_run_without_evaluation_has_no_best(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    assert main(["train", *DIGITS, "--steps", "2", "--out", str(out)]) == 0
    assert not (out / BEST_FILE).exists()
    assert main(["sample", str(out), "--best", "--out", str(tmp_path / "s")]) == 2
    assert "has no best checkpoint" in capsys.readouterr().err


def test_streamed_feature_statistics_equal_those_of_all_features_at_once() -> None:
    feats = torch.randn(301, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 5
    mu, sigma, n = feature_stats(feats.split(64))
    ref_mu, ref_sigma = gaussian_stats(feats)
    assert n == 301
    torch.testing.assert_close(mu, ref_mu, rtol=0, atol=1e-12)
    torch.testing.assert_close(sigma, ref_sigma, rtol=0, atol=1e-11)
    np.testing.assert_allclose(sigma.numpy(), np.cov(feats.numpy(), rowvar=False), rtol=1e-12, atol=1e-12)


def test_stats_files_written_and_read_back_and_foreign_ones_checked(run: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    ref = tmp_path / "digits-train.npz"
    assert main(["stats", "digits", "--split", "train", "--out", str(ref), "--device", "cpu"]) == 0
    with np.load(ref) as data:
        assert sorted(data.files) == ["mu", "sigma"] and data["mu"].dtype == np.float64
        assert data["mu"].shape == (128,) and data["sigma"].shape == (128, 128)
    stats = load_stats(ref)
    assert stats.info["count"] == 1617 and stats.info["split"] == "train"  # digits: 1,617 training images
    assert stats.info["features"]["name"].startswith("digit-classifier")
    assert main(["stats", "digits", "--out", str(ref), "--device", "cpu"]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err

    assert main(["eval", str(run), "-n", "30", "--steps", "3", "--sampler", "ddim", "--ref-stats", str(ref),
                 "--nll-images", "0", "--out", str(tmp_path / "e"), "--device", "cpu"]) == 0
    card = json.loads((tmp_path / "e" / "eval_card.json").read_text())
    assert set(card["metrics"]) == {"frechet_distance"} and card["metrics"]["frechet_distance"] > 0
    assert card["protocol"]["reference_split"] == "train" and card["protocol"]["samples"] == 30
    assert card["protocol"]["weights"] == "ema" and card["protocol"]["fingerprint"] == stats.info["features"][
        "fingerprint"]

    foreign = tmp_path / "pytorch-fid-cifar10.npz"  # as pytorch-fid writes them: 2048 Inception features
    np.savez(foreign, mu=np.zeros(2048), sigma=np.eye(2048))
    assert main(["eval", str(run), "-n", "4", "--ref-stats", str(foreign), "--out", str(tmp_path / "f")]) == 2
    assert "has 2048 features per image" in capsys.readouterr().err and not (tmp_path / "f").exists()
    broken = tmp_path / "broken.npz"
    np.savez(broken, mean=np.zeros(3))
    with pytest.raises(ddpm.errors.UserError, match="holds no mu or sigma"):
        load_stats(broken)
    save_stats(tmp_path / "tiny.npz", FeatureStats(torch.zeros(2, dtype=torch.float64), torch.eye(2).double()))
    assert load_stats(tmp_path / "tiny.npz").dim == 2


def test_eval_draws_exactly_n_samples_whatever_the_processes(run: Path, tmp_path: Path) -> None:
    common = ["eval", str(run), "-n", "7", "--steps", "2", "--sampler", "ddim", "--nll-images", "0",
              "--batch-size", "3", "--device", "cpu"]
    run_two([*common, "--out", str(tmp_path / "two")])  # 4 + 3 samples in shards of 3
    card = json.loads((tmp_path / "two" / "eval_card.json").read_text())
    assert card["num_samples"] == card["protocol"]["samples"] == 7
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "eval_card.json").read_text())
    # the same samples up to float rounding: the shards batch them differently
    assert one["metrics"]["frechet_distance"] == pytest.approx(card["metrics"]["frechet_distance"], rel=1e-6)


def test_plain_progress_lines_in_a_log_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With standard error not a terminal (a job's log file): plain lines, no carriage returns, at most one per
    10 s and always the last, with the last evaluation beside the progress."""
    assert main(["train", *DIGITS, "--steps", "30", "--out", str(tmp_path / "run"), "--eval-every", "15",
                 "--eval-samples", "20", "--eval-sampler", "ddim", "--eval-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train step")]
    assert lines[0].startswith("train step 1/30 (3%) | loss ") and "images/s | ETA " in lines[0]
    assert lines[-1].startswith("train step 30/30 (100%)") and "| frechet_distance " in lines[-1]
    assert len(lines) <= 4  # a 30-step run takes seconds here
    evals = [line for line in err.splitlines() if line.startswith("eval step")]
    assert len(evals) == 2 and evals[0].startswith("eval step 15 | frechet_distance ") and "(best so far)" in evals[0]
    assert evals[1].startswith("eval step 30 | ") and evals[1].endswith("% of the run's time")


def test_runs_lists_each_run_with_its_state_step_and_best(run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    import shutil

    from ddpm.train.run_folder import RunFolderLock

    root = tmp_path / "runs"
    shutil.copytree(run, root / "finished")
    shutil.copytree(run, root / "killed")
    config = root / "killed" / "config.toml"  # as if it had been asked for 12 steps and was killed after 8
    config.write_text(config.read_text().replace("\nsteps = 8\n", "\nsteps = 12\n"))
    shutil.copytree(run, root / "group" / "live")
    (root / "empty").mkdir()
    lock = RunFolderLock(root / "group" / "live")
    lock.acquire()
    try:
        assert main(["runs", str(root), "--json"]) == 0
    finally:
        lock.release()
    rows = {Path(r["folder"]).name: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {"finished", "killed", "live"}  # an empty folder is no run
    assert rows["finished"]["state"] == "finished" and rows["finished"]["step"] == 8 == rows["finished"]["steps"]
    assert rows["killed"]["state"] == "interrupted" and rows["killed"]["step"] == 8 and rows["killed"]["steps"] == 12
    assert rows["live"]["state"] == "running"
    assert rows["finished"]["best"]["metric"] == "frechet_distance"
    assert main(["runs", str(root)]) == 0
    table = capsys.readouterr().out
    assert "finished" in table and "frechet_distance" in table and "8/8" in table
