"""Preemption: SIGTERM, SIGUSR1 and SIGINT stop a run after the step in progress with a verified
checkpoint of that step and exit status 75; the resumed run ends bit-identical to an uninterrupted one,
in one process and in two (one rank signalled, both stop at the same step). Also a signal inside a
checkpoint write, a second signal while stopping, a grace period that runs out, the time limit, and
``--resume`` against ``--resume auto``. Runs are real subprocesses on tiny data (see test_faults)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ddpm
from ddpm.checkpoint import checkpoint_folders, find_checkpoint, verify_checkpoint
from ddpm.cli import main
from ddpm.config import RunConfig, apply_overrides
from ddpm.train.run_folder import summarize_run
from ddpm.train.stopping import EXIT_STOPPED, TIME_LIMIT, parse_duration

from .test_cli import TINY, write_folder
from .test_distributed_cli import free_port
from .test_faults import SRC, metric_steps, wait_for

STEPS = 40
NO_PERIODIC = ["--checkpoint-every", "1000", "--keep-last", "0"]  # only the stop and the end write checkpoints

PRELUDE = """
import json, os, signal, sys, time
from ddpm import checkpoint as c
from ddpm.cli import main

# SIGNAL_AT_WRITES="3:SIGTERM,5:SIGINT": send the signal to this process at that checkpoint file write
plan = {int(k): v for k, v in (item.split(":") for item in os.environ.get("SIGNAL_AT_WRITES", "").split(",") if item)}
slow = float(os.environ.get("SLOW_WRITES", "0"))
real, calls = c._write_bytes, [0]

def write(path, data):
    calls[0] += 1
    if calls[0] in plan:
        os.kill(os.getpid(), getattr(signal, plan[calls[0]]))
    time.sleep(slow)
    real(path, data)

c._write_bytes = write
sys.exit(main(json.loads(sys.argv[1])))
"""


def train_args(data: Path, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["train", "--data", str(data), "--steps", str(steps), "--out", str(out), "--set", "model.num_groups=8",
            *TINY, *extra]


def spawn(args: list[str], **env: str) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, "-c", PRELUDE, json.dumps(args)], env=environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    code = proc.wait(timeout=120)
    err = proc.stderr.read()
    proc.stderr.close()
    return code, err


def has_trained(out: Path) -> bool:
    return (out / "metrics.jsonl").exists() and bool(metric_steps(out))


def events(out: Path, kind: str) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if x.get("event") == kind]


def same_weights(a: Path, b: Path) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in ("model.safetensors", "ema.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("preempt") / "data")


@pytest.fixture(scope="module")
def reference(data: Path) -> Path:
    """An uninterrupted run of STEPS steps."""
    out = data.parent / "reference"
    assert main(train_args(data, out, *NO_PERIODIC)) == 0
    return out / f"ckpt-{STEPS:08d}"


# ----------------------------------------------------------------------------------- one process


def test_signals_at_random_points_stop_with_a_checkpoint_and_resume_is_bit_identical(
        data: Path, reference: Path, tmp_path: Path) -> None:
    out, rng, stops = tmp_path / "run", random.Random(5), []
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        before = find_checkpoint(out).step if checkpoint_folders(out) else 0
        proc = spawn(train_args(data, out, "--resume", "auto", *NO_PERIODIC))
        wait_for(lambda p=proc, b=before: has_trained(out) and metric_steps(out)[-1] > b or p.poll() is not None)
        time.sleep(rng.uniform(0.0, 0.1))
        proc.send_signal(sig)
        code, err = finish(proc)
        assert code == EXIT_STOPPED, err
        assert f"{sig.name} received" in err and "--resume auto" not in err  # the hint goes to stdout
        stop = events(out, "stopped")[-1]
        assert stop["reason"] == sig.name and stop["seconds_after_request"] < 20
        step = find_checkpoint(out).step
        assert before < step == stop["step"] < STEPS  # the step in progress was finished and checkpointed
        verify_checkpoint(out / f"ckpt-{step:08d}")
        stops.append(step)
    assert main(train_args(data, out, "--resume", "auto", *NO_PERIODIC)) == 0
    assert same_weights(out / f"ckpt-{STEPS:08d}", reference)
    assert metric_steps(out) == list(range(1, STEPS + 1))  # every step logged once
    assert [p.name for p in checkpoint_folders(out)] == [f"ckpt-{s:08d}" for s in [*stops, STEPS]]


def test_a_signal_inside_a_checkpoint_write_and_a_second_one_while_stopping(data: Path, reference: Path,
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "run"
    # SIGTERM while the periodic checkpoint of step 2 writes its third file, then SIGTERM and SIGINT while
    # the stop's checkpoint (step 3) is written: the write finishes, the run stops once
    proc = spawn(train_args(data, out, "--checkpoint-every", "2", "--keep-last", "0"),
                 SIGNAL_AT_WRITES="3:SIGTERM,7:SIGTERM,9:SIGINT")
    code, err = finish(proc)
    assert code == EXIT_STOPPED, err
    assert err.count("received while stopping") == 2
    assert [p.name for p in checkpoint_folders(out)] == ["ckpt-00000002", "ckpt-00000003"]
    for folder in checkpoint_folders(out):
        verify_checkpoint(folder)
    assert events(out, "stopped")[-1]["reason"] == "SIGTERM"
    assert main(train_args(data, out, "--resume", *NO_PERIODIC)) == 0
    assert same_weights(out / f"ckpt-{STEPS:08d}", reference)


def test_a_grace_period_that_runs_out_exits_and_keeps_the_last_checkpoint(data: Path, reference: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(train_args(data, out, "--checkpoint-every", "2", steps=2)) == 0
    before = (out / "ckpt-00000002" / "model.safetensors").read_bytes()
    proc = spawn(train_args(data, out, "--resume", "--grace-period", "0.3", *NO_PERIODIC),
                 SLOW_WRITES="0.5")  # a checkpoint takes 2.5 s: longer than the grace period
    wait_for(lambda: metric_steps(out)[-1] > 2 or proc.poll() is not None)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 128 + signal.SIGTERM and "grace period" in err
    assert find_checkpoint(out).step == 2 and (out / "ckpt-00000002" / "model.safetensors").read_bytes() == before
    assert main(train_args(data, out, "--resume", *NO_PERIODIC)) == 0  # cleans the unfinished write up
    assert not list(out.glob(".tmp-ckpt-*"))
    assert same_weights(out / f"ckpt-{STEPS:08d}", reference)


def test_the_time_limit_stops_before_the_limit_with_a_checkpoint(data: Path, tmp_path: Path) -> None:
    cfg = apply_overrides(RunConfig(), {  # the tiny recipe of TINY, through the library call
        "data.dataset": str(data), "diffusion.timesteps": 50, "train.batch_size": 8, "train.device": "cpu",
        "train.steps": 1_000_000, "train.checkpoint_every": 1_000_000, "train.log_every": 1, "train.sample_every": 0,
        "train.tensorboard": False, "model.base_channels": 8, "model.channel_mult": (1, 2), "model.num_groups": 8,
        "train.time_limit": 4.0, "train.out_dir": str(tmp_path / "run")})
    started = time.monotonic()
    result = ddpm.fit(cfg, progress=False)
    assert time.monotonic() - started < 4.0
    assert result.stopped == TIME_LIMIT and 0 < result.step < 1_000_000
    assert find_checkpoint(tmp_path / "run").step == result.step
    assert summarize_run(tmp_path / "run").state == "stopped (time limit)"  # what `ddpm runs` shows
    more = ddpm.fit(apply_overrides(cfg, {"train.steps": result.step + 2, "train.time_limit": "none"}), resume="auto",
                    progress=False)
    assert more.stopped is None and more.step == result.step + 2


def test_resume_without_a_value_needs_a_run_and_resume_auto_needs_this_run(data: Path, tmp_path: Path,
                                                                           capsys) -> None:
    out = tmp_path / "run"
    assert main(train_args(data, out, "--resume", steps=2)) == 2  # a mistyped --out must not start a new run
    assert f"nothing to resume: {out} holds no checkpoint" in capsys.readouterr().err
    assert not checkpoint_folders(out)
    assert main(train_args(data, out, "--resume", "auto", steps=2)) == 0  # starts it
    assert main(train_args(data, out, "--resume", "auto", steps=4)) == 0  # continues it (steps may grow)
    assert find_checkpoint(out).step == 4
    assert main(train_args(data, out, "--resume", "auto", "--lr", "5e-4", steps=6)) == 2  # not this run
    err = capsys.readouterr().err
    assert "holds another run" in err and "optim.lr 0.001 -> 0.0005" in err
    assert main(train_args(data, out, "--resume", "--lr", "5e-4", steps=6)) == 0  # a plain --resume may change it


def test_parse_duration() -> None:
    assert parse_duration("90") == 90 and parse_duration("1h30m") == 5400 and parse_duration("2d") == 172800
    assert parse_duration("1-02:00:00") == 93600 and parse_duration("45:00") == 2700
    for bad in ("", "1x", "0", "h", "1:2:3:4"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


# ---------------------------------------------------------------------------------- two processes


def spawn_ranks(args: list[str], world: int = 2) -> list[subprocess.Popen]:
    port = str(free_port())
    return [spawn(args, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port) for r in range(world)]


def test_one_signalled_rank_stops_both_at_the_same_step_and_resume_is_bit_identical(data: Path,
                                                                                   tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert all(finish(p)[0] == 0 for p in spawn_ranks(train_args(data, reference, *NO_PERIODIC)))

    out = tmp_path / "run"
    ranks = spawn_ranks(train_args(data, out, "--resume", "auto", *NO_PERIODIC))
    wait_for(lambda: has_trained(out) or any(p.poll() is not None for p in ranks))
    time.sleep(random.Random(3).uniform(0.0, 0.1))
    ranks[1].send_signal(signal.SIGTERM)  # rank 1 only
    results = [finish(p) for p in ranks]
    assert [code for code, _ in results] == [EXIT_STOPPED, EXIT_STOPPED], [err[-2000:] for _, err in results]
    stop = events(out, "stopped")[-1]
    assert stop["reason"] == "a signal to another process"  # rank 0 writes the record; rank 1 was signalled
    assert 0 < find_checkpoint(out).step == stop["step"] < STEPS

    assert all(finish(p)[0] == 0 for p in spawn_ranks(train_args(data, out, "--resume", "auto", *NO_PERIODIC)))
    assert same_weights(out / f"ckpt-{STEPS:08d}", reference / f"ckpt-{STEPS:08d}")
    assert metric_steps(out) == list(range(1, STEPS + 1))
