"""Fault injection: every way issue #11 found to lose work, reproduced, with the fix proven.

kill -9 at random points and inside a checkpoint write, between the two renames of a re-save,
corrupted checkpoint files of each kind, a second concurrent run, a run into another run's
folder, a blow-up with ``--checkpoint-every 1 --keep-last 1``, and bad input. Each ends with a
clear ``ddpm: error`` (exit 2), a clear stop (exit 1, naming the last good checkpoint) or a correct
result, and no checkpoint is lost. Runs are tiny (8x8 grey images, a 0.04M-parameter U-Net);
killed runs are real subprocesses.

"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm
from ddpm import checkpoint as ckpt_mod
from ddpm.checkpoint import (
    checkpoint_folders,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from ddpm.choices import SAMPLE_FORMATS, parse_choice_list
from ddpm.cli import main
from ddpm.data import load_dataset
from ddpm.data.images import sixteen_to_eight_bits
from ddpm.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError, OutputError, UserError
from ddpm.outputs import check_output_folder
from ddpm.tensors import check_finite
from ddpm.train import run_folder
from ddpm.train.run_folder import (
    RunFolderInUseError,
    RunFolderLock,
    check_run_folder,
    read_lock_owner,
    recover_interrupted_saves,
    truncate_metrics,
)
from ddpm.train.trainer import StepStats, norms_finite

from .test_cli import TINY, write_folder
from .test_train import TinyNet, make_config, make_trainer

torch.set_num_threads(1)

SRC = Path(ddpm.__file__).resolve().parents[1]
GOOD = "ckpt-00000004"


def train_args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--steps", str(steps), "--out", str(out), "--set", "model.num_groups=8",
            *TINY, *extra]


def sample_args(run: Path | str, out: Path, *extra: str) -> list[str]:
    return ["sample", str(run), "-n", "3", "--steps", "3", "--out", str(out), "--device", "cpu", *extra]


def file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def metric_steps(run: Path) -> list[int]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["step"] for x in lines if "loss" in x]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("faults") / "data")


@pytest.fixture(scope="module")
def good_run(data: Path) -> Path:
    """A finished 4-step run with ckpt-00000002 and ckpt-00000004 (never modified: tests copy it)."""
    out = data.parent / "good"
    assert main(train_args(data, out, 4)) == 0
    assert [p.name for p in checkpoint_folders(out)] == ["ckpt-00000002", GOOD]
    return out


@pytest.fixture
def run(good_run: Path, tmp_path: Path) -> Path:
    """A copy of the good run to damage."""
    return Path(shutil.copytree(good_run, tmp_path / "run"))


# ------------------------------------------------------------------------------ subprocesses
PRELUDE = """
import json, os, signal, sys
from ddpm import checkpoint as c
from ddpm.cli import main

kill_at = int(os.environ.get("KILL_AT_WRITE", "0"))
if kill_at:  # kill -9 inside the kill_at-th file write of a checkpoint, half the bytes written
    real, calls = c._write_bytes, [0]

    def write(path, data):
        calls[0] += 1
        if calls[0] == kill_at:
            real(path, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, data)

    c._write_bytes = write
sys.exit(main(json.loads(sys.argv[1])))
"""


def spawn(args: list[str], **env: str) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, "-c", PRELUDE, json.dumps(args)], env=environ,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the subprocess never got there")
        time.sleep(0.02)


# ------------------------------------------------------------------------------- kill -9


def test_kill_9_at_random_points_and_inside_checkpoint_writes_then_resume_is_bit_identical(
        data: Path, tmp_path: Path) -> None:
    steps, every = ["--checkpoint-every", "1", "--keep-last", "2"], 14
    reference = tmp_path / "reference"
    assert main(train_args(data, reference, every, *steps)) == 0

    out, rng, kills = tmp_path / "killed", random.Random(11), 0
    for round_ in range(3):
        if round_ == 0:  # a kill from outside at a random moment during training
            proc = spawn(train_args(data, out, every, *steps, "--resume", "auto"))
            wait_for(lambda p=proc: (out / "metrics.jsonl").exists() or p.poll() is not None)
            time.sleep(rng.uniform(0.0, 0.1))
            proc.send_signal(signal.SIGKILL)
        else:  # kill -9 inside a checkpoint write (5 files each), at a random file
            proc = spawn(train_args(data, out, every, *steps, "--resume", "auto"), KILL_AT_WRITE=str(rng.randint(2, 9)))
        kills += proc.wait(timeout=60) == -signal.SIGKILL
        proc.stderr.close()
        assert not list(out.glob("ckpt-*")) or find_checkpoint(out)  # whatever is left is usable
    assert kills >= 2
    assert list(out.glob(".tmp-ckpt-*"))  # a killed write left its temporary folder behind ...
    assert main(train_args(data, out, every, *steps, "--resume")) == 0
    assert not list(out.glob(".tmp-ckpt-*"))  # ... which the resumed run removed

    final = f"ckpt-{every:08d}"
    for name in ("model.safetensors", "ema.safetensors"):
        assert (out / final / name).read_bytes() == (reference / final / name).read_bytes(), name
    assert metric_steps(out) == list(range(1, every + 1))  # every step logged once
    assert [p.name for p in checkpoint_folders(out)] == [f"ckpt-{every - 1:08d}", final]
    for folder in checkpoint_folders(out):
        verify_checkpoint(folder)


RESAVE = """
import os, shutil, signal, sys
from pathlib import Path
from ddpm import checkpoint as c

final = Path(sys.argv[1])
tmp = final.with_name(".tmp-ckpt-" + final.name[5:] + "-1-1")
shutil.copytree(final, tmp)  # a complete new version of the same step
real = c._rename

def rename(src, dst):  # kill -9 right after the first rename: ckpt-N is now .replaced-ckpt-N-...
    real(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)

c._rename = rename
c._put_in_place(tmp, final)
"""


def test_kill_between_the_two_renames_of_a_resave_loses_nothing(run: Path, data: Path, tmp_path: Path) -> None:
    shutil.rmtree(run / "ckpt-00000002")  # as with --keep-last 1: the re-saved step is the only checkpoint
    before = file_bytes(run / GOOD)
    proc = subprocess.run([sys.executable, "-c", RESAVE, str(run / GOOD)], env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.returncode == -signal.SIGKILL
    assert not (run / GOOD).exists() and list(run.glob(".replaced-ckpt-00000004-*"))

    assert find_checkpoint(run).step == 4  # readers still find the step's complete checkpoint
    assert main(sample_args(run, tmp_path / "s")) == 0
    assert main(train_args(data, run, 5, "--resume")) == 0  # restored, resumed at 4, not restarted at 0
    assert file_bytes(run / GOOD) == before
    assert [p.name for p in checkpoint_folders(run)] == [GOOD, "ckpt-00000005"]
    assert not list(run.glob(".*ckpt-*"))
    assert metric_steps(run) == [1, 2, 3, 4, 5]


def test_interrupted_resave_in_process_puts_the_old_checkpoint_back(run: Path, monkeypatch) -> None:
    before = file_bytes(run / GOOD)
    tmp = run / ".tmp-ckpt-00000004-1-1"
    shutil.copytree(run / GOOD, tmp)
    real, calls = ckpt_mod._rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(ckpt_mod, "_rename", rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod._put_in_place(tmp, run / GOOD)
    assert file_bytes(run / GOOD) == before and not list(run.glob(".replaced-*"))


def test_recovery_restores_interrupted_resaves_and_removes_temporaries(run: Path) -> None:
    os.replace(run / GOOD, run / ".replaced-ckpt-00000004-5")
    shutil.copytree(run / "ckpt-00000002", run / ".replaced-ckpt-00000002-5")  # its re-save had finished
    (run / ".tmp-ckpt-00000006-1-1").mkdir()
    done = recover_interrupted_saves(run)
    assert len(done) == 3 and (run / GOOD).is_dir()
    assert sorted(p.name for p in run.iterdir() if "ckpt" in p.name) == ["ckpt-00000002", GOOD]


# ------------------------------------------------------------------------------- NaN guard


def test_blowup_keeps_the_last_good_checkpoint_and_it_samples(run: Path, data: Path, good_run: Path, tmp_path: Path,
                                                              capsys) -> None:
    before = file_bytes(run / GOOD)
    code = main(train_args(data, run, 12, "--resume", "--lr", "1e6", "--checkpoint-every", "1", "--keep-last", "1"))
    err = capsys.readouterr().err
    assert code == 1 and "last good checkpoint is" in err and str(run / GOOD) in err
    assert [p.name for p in checkpoint_folders(run)] == ["ckpt-00000002", GOOD]  # no blown-up checkpoint, none pruned
    assert file_bytes(run / GOOD) == before
    assert max(v.abs().max().item() for v in load_weights(run, "raw").values()) < 10  # not 1e6

    assert main(sample_args(run, tmp_path / "a")) == 0
    assert main(sample_args(good_run, tmp_path / "b")) == 0
    images = np.load(tmp_path / "a" / "samples.npz")["images"]
    assert images.std() > 0 and np.array_equal(images, np.load(tmp_path / "b" / "samples.npz")["images"])


def test_update_that_makes_weights_infinite_stops_before_the_ema_takes_them(tmp_path: Path) -> None:
    make_trainer(make_config(tmp_path, **{"train.steps": 3})).run()
    blown = make_trainer(make_config(tmp_path))
    update = blown.optimizer_step

    def overflowing_update(step: int) -> None:  # an update that overflows one weight, as at a huge step size
        update(step)
        if step == 3:
            with torch.no_grad():
                blown.model.inp.weight[0, 0, 0, 0] = float("inf")

    blown.optimizer_step = overflowing_update
    with pytest.raises(NonFiniteLossError, match=r"step 4: its update .* non-finite \(inp\.weight\).*ckpt-00000003"):
        blown.run(resume="auto")
    assert blown.ema.num_updates == 3 and all(torch.isfinite(v).all() for v in blown.ema.state_dict().values())
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["ckpt-00000003"]
    load_checkpoint(tmp_path, TinyNet())  # the last good checkpoint loads


def test_weight_check_after_each_update_is_exact(tmp_path: Path) -> None:
    assert norms_finite([torch.ones(3), torch.zeros(2)])
    assert not norms_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
    trainer = make_trainer(make_config(tmp_path))
    with torch.no_grad():
        trainer.model.inp.weight[0, 0, 0, 0] = 1e20  # finite, but its squared norm overflows float32
    assert not norms_finite(list(trainer.model.parameters()))
    stats = StepStats(step=1, loss=1.0, error=1.0, grad_norm=1.0, lr=1.0, applied=True, error_sum_by_t=[],
                      count_by_t=[])
    trainer.check_weights_finite(stats)  # a false alarm of the fast check is confirmed exactly: no stop
    with torch.no_grad():
        trainer.model.out.bias[0] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"1 parameter tensor\(s\) non-finite \(out\.bias\)"):
        trainer.check_weights_finite(stats)


def test_checkpoint_guard_is_the_loss_of_the_next_step(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, **{"train.checkpoint_every": 1, "train.log_every": 1, "train.steps": 5})
    make_trainer(cfg).run()
    lines = map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    losses = {x["step"]: x["loss"] for x in lines if "loss" in x}  # not the runtime line
    for step in range(1, 5):
        meta = verify_checkpoint(tmp_path / f"ckpt-{step:08d}")
        assert meta["guard"]["next_batch_loss"] == pytest.approx(losses[step + 1], rel=1e-6)
    assert np.isfinite(verify_checkpoint(tmp_path / "ckpt-00000005")["guard"]["next_batch_loss"])


def test_pruning_never_deletes_the_newest_good_checkpoint(tmp_path: Path) -> None:
    trainer = make_trainer(make_config(tmp_path, **{"train.steps": 4, "train.checkpoint_every": 1}))
    trainer.run()
    (tmp_path / "ckpt-00000004" / "state.pt").write_bytes(b"rot")  # the newest is corrupt
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["ckpt-00000001", "ckpt-00000002"]
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["ckpt-00000003", "ckpt-00000004"]
    # saving an older step never prunes newer checkpoints, nor the one just written
    path = save_checkpoint(tmp_path, 2, model=trainer.model, ema_state=trainer.ema.state_dict(),
                           train_state=trainer.train_state(), config=trainer.config, keep_last=1)
    assert [p.name for p in checkpoint_folders(tmp_path)] == [path.name, "ckpt-00000003", "ckpt-00000004"]


# -------------------------------------------------------------------------- run ownership


def test_new_run_in_another_runs_folder_is_refused(run: Path, data: Path, capsys) -> None:
    before = file_bytes(run)
    assert main(train_args(data, run, 6)) == 2
    err = capsys.readouterr().err
    assert "ddpm train: error:" in err and "holds another run's checkpoints" in err
    assert "--resume" in err and "--overwrite" in err
    assert file_bytes(run) == before


def test_overwrite_starts_over_library(run: Path) -> None:
    cfg = make_config(run, **{"train.steps": 2, "train.checkpoint_every": 1})
    with pytest.raises(CheckpointError, match="another run's checkpoints"):
        make_trainer(cfg).run()
    summary = make_trainer(cfg).run(overwrite=True)
    assert [p.name for p in checkpoint_folders(run)] == ["ckpt-00000001", "ckpt-00000002"]
    assert summary["checkpoint"] == run / "ckpt-00000002" and metric_steps(run) == [2]
    with pytest.raises(ConfigError, match="pass one of them"):
        make_trainer(cfg).run(resume="auto", overwrite=True)


def test_overwrite_starts_over_cli(run: Path, data: Path) -> None:
    assert main(train_args(data, run, 2, "--overwrite")) == 0
    assert [p.name for p in checkpoint_folders(run)] == ["ckpt-00000002"] and metric_steps(run) == [1, 2]


def test_resume_from_an_older_checkpoint_sets_the_newer_ones_aside(run: Path, data: Path, capsys) -> None:
    newest = file_bytes(run / GOOD)
    assert main(train_args(data, run, 3, "--resume", str(run / "ckpt-00000002"), "--checkpoint-every", "1")) == 0
    printed = capsys.readouterr().out.split("checkpoint: ")[-1].strip()
    assert Path(printed) == run / "ckpt-00000003" and Path(printed).is_dir()
    assert [p.name for p in checkpoint_folders(run)] == ["ckpt-00000002", "ckpt-00000003"]
    (aside,) = (run / "set-aside").iterdir()
    assert file_bytes(aside / GOOD) == newest  # moved, never deleted
    assert [json.loads(x)["step"] for x in (aside / "metrics.jsonl").read_text().splitlines()] == [3, 4]
    assert metric_steps(run) == [1, 2, 3]


def test_resume_from_outside_into_another_runs_folder_is_refused(run: Path, good_run: Path, data: Path,
                                                                 capsys) -> None:
    before = file_bytes(run)
    assert main(train_args(data, run, 6, "--resume", str(good_run / GOOD))) == 2
    assert "would mix two runs" in capsys.readouterr().err and file_bytes(run) == before


def test_a_second_concurrent_run_is_refused_and_a_killed_runs_lock_is_stale(data: Path, tmp_path: Path,
                                                                             capsys) -> None:
    out = tmp_path / "run"
    first = spawn(train_args(data, out, 10_000, "--checkpoint-every", "1", "--keep-last", "2"))
    try:
        wait_for(lambda: (read_lock_owner(out) or {}).get("pid") == first.pid and (out / "ckpt-00000001").is_dir())
        for extra in ((), ("--resume",)):
            assert main(train_args(data, out, 3, *extra)) == 2
            err = capsys.readouterr().err
            assert f"in use by pid {first.pid} on host {socket.gethostname()}" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        first.stderr.close()
    last = find_checkpoint(out).step
    assert main(train_args(data, out, last + 2, "--resume", "--checkpoint-every", "1")) == 0  # the stale lock is taken
    assert find_checkpoint(out).step == last + 2 and not (out / "run.lock").exists()
    steps = metric_steps(out)
    assert steps == sorted(set(steps)) and steps[-1] == last + 2


def test_lock_names_its_owner_and_a_stale_lock_is_taken_over(tmp_path: Path) -> None:
    lock = RunFolderLock(tmp_path / "run")
    lock.acquire()
    with pytest.raises(RunFolderInUseError, match=rf"in use by pid {os.getpid()} on host"):
        RunFolderLock(tmp_path / "run").acquire()
    with pytest.raises(RunFolderInUseError):
        check_run_folder(tmp_path / "run", resume=None)
    lock.release()
    assert not (tmp_path / "run" / "run.lock").exists()
    (tmp_path / "run" / "run.lock").write_text(json.dumps({"host": "gone", "pid": 2**22 + 1}))  # left by a kill
    again = RunFolderLock(tmp_path / "run")
    again.acquire()
    assert again.stale_owner == {"host": "gone", "pid": 2**22 + 1}
    assert read_lock_owner(tmp_path / "run")["pid"] == os.getpid()
    again.release()


def test_lock_without_flock_uses_the_owners_pid(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(run_folder, "fcntl", None)  # as on Windows
    lock = RunFolderLock(tmp_path)
    lock.acquire()
    with pytest.raises(RunFolderInUseError, match=rf"in use by pid {os.getpid()}"):
        RunFolderLock(tmp_path).acquire()
    with pytest.raises(RunFolderInUseError):
        check_run_folder(tmp_path, resume=None)
    lock.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = {"host": socket.gethostname(), "pid": int(dead.stdout)}  # a process of this host that has ended
    (tmp_path / "run.lock").write_text(json.dumps(owner))
    again = RunFolderLock(tmp_path)
    again.acquire()
    assert again.stale_owner == owner
    again.release()


# -------------------------------------------------------------------------- resume fallback


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _randomize(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


CORRUPTIONS = {
    "truncated model.safetensors": lambda c: _truncate(c / "model.safetensors"),
    "random ema.safetensors": lambda c: _randomize(c / "ema.safetensors"),
    "truncated state.pt": lambda c: _truncate(c / "state.pt"),
    "random state.pt": lambda c: _randomize(c / "state.pt"),
    "missing state.pt": lambda c: (c / "state.pt").unlink(),
    "garbage meta.json": lambda c: (c / "meta.json").write_text("{not json"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(kind: str, run: Path, data: Path, tmp_path: Path,
                                                             caplog) -> None:
    CORRUPTIONS[kind](run / GOOD)
    damaged = file_bytes(run / GOOD)
    file = kind.split()[-1]
    assert main(sample_args(run, tmp_path / "s")) == 0
    assert json.loads((tmp_path / "s" / "sample_info.json").read_text())["checkpoint"] == str(run / "ckpt-00000002")
    assert any(f"skipping checkpoint {run / GOOD}" in r.message and file in r.message for r in caplog.records)

    assert main(train_args(data, run, 3, "--resume")) == 0  # continues the previous good one
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert events[-1]["checkpoint"] == str(run / "ckpt-00000002")
    (aside,) = (run / "set-aside").iterdir()
    assert file_bytes(aside / GOOD) == damaged  # the corrupt one is kept, out of the way

    with pytest.raises(CheckpointError, match=file.replace(".", r"\.")):
        find_checkpoint(aside / GOOD)  # named explicitly, a corrupt checkpoint is an error, never replaced


def test_nothing_loadable_is_an_error_not_a_silent_restart(run: Path, data: Path, tmp_path: Path, capsys) -> None:
    shutil.rmtree(run / "ckpt-00000002")
    (run / GOOD / "state.pt").unlink()
    before = file_bytes(run)
    assert main(train_args(data, run, 6, "--resume")) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "state.pt missing" in err
    assert main(sample_args(run / GOOD, tmp_path / "s")) == 2
    assert "state.pt missing" in capsys.readouterr().err
    assert file_bytes(run) == before


def test_pickle_refused_by_weights_only_is_a_clear_error(run: Path, data: Path, capsys) -> None:
    state = run / GOOD / "state.pt"
    torch.save({"step": 4, "hook": print}, state)  # a pickle naming a global: weights_only refuses it
    meta = json.loads((run / GOOD / "meta.json").read_text())  # as a crafted file would: checksums fixed up
    meta["files"]["state.pt"] = {"bytes": state.stat().st_size,
                                 "sha256": hashlib.sha256(state.read_bytes()).hexdigest()}
    (run / GOOD / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(run / "ckpt-00000002")
    assert main(train_args(data, run, 6, "--resume", str(run / GOOD))) == 2
    err = capsys.readouterr().err
    assert "refused by the safe loader" in err and "state.pt" in err and "Traceback" not in err


def test_format_1_checkpoints_without_checksums_still_load(run: Path, tmp_path: Path) -> None:
    for folder in checkpoint_folders(run):
        meta = json.loads((folder / "meta.json").read_text())
        del meta["files"], meta["guard"]
        (folder / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    assert main(sample_args(run, tmp_path / "s")) == 0
    _truncate(run / GOOD / "ema.safetensors")  # no checksum to catch it: the parser does, naming the file
    with pytest.raises(CheckpointError, match=r"ema\.safetensors is not a readable safetensors file"):
        load_weights(run / GOOD)


# ----------------------------------------------------------------- errors instead of tracebacks


def test_device_cuda_without_a_gpu(run: Path, data: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*train_args(data, tmp_path / "r", 2), "--device", "cuda"]) == 2
    assert main(sample_args(run, tmp_path / "s", "--device", "cuda")) == 2
    err = capsys.readouterr().err
    assert err.count("no usable CUDA GPU") == 2 and "Traceback" not in err


def test_train_out_that_is_a_file_or_unwritable(data: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    assert main(train_args(data, tmp_path / "file", 2)) == 2
    assert "is an existing file" in capsys.readouterr().err
    assert main(train_args(data, Path("/proc/ddpm-fault-test/run"), 2)) == 2
    assert "/proc/ddpm-fault-test/run' cannot be written" in capsys.readouterr().err


def test_check_output_folder(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"--out '.*file' is an existing file"):
        check_output_folder(tmp_path / "file")
    with pytest.raises(OutputError, match="cannot be written: Not a directory"):
        check_output_folder(tmp_path / "file" / "sub")
    with pytest.raises(OutputError, match="cannot be written"):
        check_output_folder("/proc/ddpm-fault-test", name="--out")
    assert check_output_folder(tmp_path / "a" / "b").is_dir()


def _count_network_calls(monkeypatch) -> list[int]:
    calls = [0]
    forward = ddpm.UNet.forward

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ddpm.UNet, "forward", counting)
    return calls


@pytest.mark.parametrize("where", ["file", "unwritable"])
def test_sample_out_is_checked_before_sampling(where: str, good_run: Path, tmp_path: Path, monkeypatch,
                                               capsys) -> None:
    out = tmp_path / "file" if where == "file" else Path("/proc/ddpm-fault-test/s")
    (tmp_path / "file").write_text("x")
    calls = _count_network_calls(monkeypatch)
    assert main(sample_args(good_run, out)) == 2
    assert str(out) in capsys.readouterr().err and calls[0] == 0


def test_full_disk_during_a_checkpoint_write(run: Path, data: Path, monkeypatch, capsys) -> None:
    before = file_bytes(run / GOOD)

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(ckpt_mod, "_write_bytes", full)
    assert main(train_args(data, run, 6, "--resume")) == 2
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "No space left on device" in err and "Traceback" not in err
    assert file_bytes(run / GOOD) == before and not list(run.glob(".tmp-*")) and not (run / "run.lock").exists()


@pytest.mark.parametrize("flag", [["--lr", "inf"], ["--lr", "nan"], ["--lr", "1e39"],
                                  ["--set", "optim.weight_decay=inf"], ["--set", "optim.betas=0.9,nan"]])
def test_non_finite_hyperparameters_are_refused(flag: list[str], data: Path, tmp_path: Path, capsys) -> None:
    assert main([*train_args(data, tmp_path / "r", 2), *flag]) == 2
    key = "optim.lr" if flag[0] == "--lr" else flag[1].split("=")[0]
    assert f"{key}=" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_sample_formats_are_a_closed_choice() -> None:
    assert parse_choice_list("--format", "grid, npz,grid", SAMPLE_FORMATS) == ("grid", "npz")
    with pytest.raises(UserError, match=r"unknown --format 'jpeg'; valid: 'grid', 'png', 'npz'"):
        parse_choice_list("--format", "grid,jpeg", SAMPLE_FORMATS)
    with pytest.raises(UserError, match="names nothing"):
        parse_choice_list("--format", " , ", SAMPLE_FORMATS)


def test_sample_unknown_format_is_an_error(good_run: Path, tmp_path: Path, capsys) -> None:
    assert main(sample_args(good_run, tmp_path / "s", "--format", "jpeg")) == 2
    assert "'jpeg'" in capsys.readouterr().err and not list((tmp_path / "s").glob("*"))


def _rewrite_weights(folder: Path, scale: float) -> None:
    """Re-save a checkpoint with its EMA weights multiplied by ``scale`` (checksums correct)."""
    net_state = load_weights(folder, "raw")
    ema = {k: v * scale for k, v in load_weights(folder, "ema").items()}
    meta = verify_checkpoint(folder)
    blobs = {"model.safetensors": ckpt_mod._tensors_for_file(net_state),
             "ema.safetensors": ckpt_mod._tensors_for_file(ema)}
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
        meta["files"][name] = {"bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (folder / "meta.json").write_text(json.dumps(meta))


def test_sampling_from_non_finite_weights_is_an_error(run: Path, tmp_path: Path, capsys) -> None:
    _rewrite_weights(run / GOOD, float("nan"))
    assert main(sample_args(run / GOOD, tmp_path / "s")) == 2
    assert "ema.safetensors holds NaN or infinite values" in capsys.readouterr().err


def test_sampling_that_produces_non_finite_values_is_an_error(run: Path, tmp_path: Path, capsys) -> None:
    _rewrite_weights(run / GOOD, 1e30)  # finite weights, infinite activations
    assert main(sample_args(run / GOOD, tmp_path / "s")) == 2
    assert "NaN or infinite" in capsys.readouterr().err


def test_check_finite() -> None:
    check_finite(torch.zeros(3), what="x")
    with pytest.raises(UserError, match=r"samples from c: 2 of 4 values are NaN or infinite"):
        check_finite(torch.tensor([0.0, float("nan"), float("inf"), 1.0]), what="samples from c")


def test_npz_keys_are_chosen_explicitly(data: Path, tmp_path: Path, capsys) -> None:
    x = np.random.default_rng(0).integers(0, 256, (24, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "odd.npz", labels=np.arange(24), foo=x)
    with pytest.raises(DataError, match=r"no array named images, x, data, arr_0; its arrays are \['labels', 'foo'\]"):
        load_dataset(tmp_path / "odd.npz")
    np.savez(tmp_path / "two.npz", x=x, images=x)
    with pytest.raises(DataError, match=r"several data arrays \(images, x\).*--data-key"):
        load_dataset(tmp_path / "two.npz")
    assert load_dataset(tmp_path / "two.npz", array_key="x", holdout_fraction=0).shape == (1, 8, 8)
    out = tmp_path / "r"
    assert main(train_args(tmp_path / "odd.npz", out, 1)) == 2
    assert "--data-key" in capsys.readouterr().err
    assert main(train_args(tmp_path / "odd.npz", out, 1, "--set", "data.data_key=foo")) == 0


def test_data_key_flag(tmp_path: Path) -> None:
    np.savez(tmp_path / "odd.npz", foo=np.zeros((24, 8, 8), np.uint8))
    assert main(train_args(tmp_path / "odd.npz", tmp_path / "r", 1, "--data-key", "foo")) == 0


def test_16_bit_images_are_scaled_exactly(tmp_path: Path) -> None:
    v = np.arange(65536, dtype=np.int64)
    assert np.array_equal(sixteen_to_eight_bits(v), np.round(v * 255 / 65535).astype(np.uint8))
    folder = tmp_path / "grey16"
    folder.mkdir()
    dark = np.full((8, 8), 200, np.uint16)  # 200 of 65535 = 0.78 of 255: near black, not 200 of 255 (78% bright)
    ramp = (np.arange(64, dtype=np.uint16) * 1040).reshape(8, 8)
    for i, img in enumerate((dark, ramp)):
        Image.fromarray(img).save(folder / f"{i}.png")
    ds = load_dataset(folder, holdout_fraction=0)
    assert Image.open(folder / "0.png").mode.startswith("I")
    assert np.array_equal(ds.data[0, 0].numpy(), np.ones((8, 8), np.uint8))
    assert np.array_equal(ds.data[1, 0].numpy(), np.round(ramp.astype(np.int64) * 255 / 65535).astype(np.uint8))


def test_resume_with_a_changed_hyperparameter_warns_and_records_it(run: Path, data: Path, caplog) -> None:
    assert main(train_args(data, run, 6, "--resume", "--lr", "5e-4")) == 0  # --steps changes too: not reported
    assert any("changed hyperparameters: optim.lr 0.001 -> 0.0005" in r.message and r.levelname == "WARNING"
               for r in caplog.records)
    (event,) = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert event == {"step": 4, "event": "resumed", "checkpoint": str(run / GOOD),
                     "changed": {"optim.lr": [0.001, 0.0005]}}


def test_metrics_are_truncated_to_the_resumed_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "event": "x"}\n{"note": "no step"}\n{"step": 3}\n{"step": 4, "lo')
    assert truncate_metrics(path, 2) == ['{"step": 3}']  # the torn last line of a kill is dropped too
    assert path.read_text() == '{"step": 1}\n{"step": 2, "event": "x"}\n{"note": "no step"}\n'

