"""`ddpm demo` end to end at a tiny budget: every file it promises, the card's numbers, both modes."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from ddpm import evaluate
from ddpm.cli import main


@pytest.mark.parametrize("class_cond", [False, True], ids=["unconditional", "class-cond"])
def test_demo_writes_every_promised_file(class_cond: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    # one epoch of the feature classifier: this test is about the plumbing, not the numbers
    monkeypatch.setattr(evaluate, "classifier_for", functools.partial(evaluate.classifier_for, epochs=1))
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "3", "--num-samples", "20", "--nll-images", "2"]
    assert main(argv + (["--class-cond"] if class_cond else [])) == 0
    printed = capsys.readouterr().out
    expected = "unipc" if class_cond else "dpm++2m-sde"
    assert f"sampling with {expected} at 10 network evaluations" in printed
    assert "images/s on " in printed  # the training speed, with the machine it was measured on
    for name in ["samples.npz", "samples.png", "reverse_chain.gif", "reverse_chain.png", "forward_chain.png",
                 "loss.png", "eval_card.json", "eval_card.md"] + (["guidance.png"] if class_cond else []):
        assert (out / name).is_file(), name
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (20, 28, 28, 1) and images.dtype == np.uint8
    card = json.loads((out / "eval_card.json").read_text())
    assert card["sampler"] == expected and card["network_evaluations"] == 10
    assert np.isfinite(card["metrics"]["frechet_distance"]) and card["bits_per_dim"]["images"] == 2
    assert card["training_speed"]["images_per_sec"] > 0 and card["training_speed"]["machine"]
    if class_cond:
        assert [r["guidance"] for r in card["guidance_sweep"]] == [0.0, 1.0, 2.0, 4.0]
        assert 0.0 <= card["metrics"]["label_accuracy"] <= 1.0
    if not class_cond:  # a second demo into the same folder replaces its own run instead of failing or mixing runs
        first = (out / "run" / "ckpt-00000003").stat().st_mtime_ns
        assert main(argv) == 0
        assert (out / "run" / "ckpt-00000003").stat().st_mtime_ns != first


def test_the_categorical_demo_writes_the_same_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(evaluate, "classifier_for", functools.partial(evaluate.classifier_for, epochs=1))
    out = tmp_path / "demo"
    argv = ["demo", "--process", "categorical", "--out", str(out), "--steps", "2", "--num-samples", "10",
            "--nll-images", "2", "--sample-steps", "3"]
    assert main(argv) == 0
    assert "training categorical diffusion" in capsys.readouterr().out
    for name in ["samples.npz", "samples.png", "reverse_chain.gif", "reverse_chain.png", "forward_chain.png",
                 "loss.png", "eval_card.json", "eval_card.md"]:
        assert (out / name).is_file(), name
    card = json.loads((out / "eval_card.json").read_text())
    assert (card["sampler"], card["network_evaluations"]) == ("ancestral", 3)
    assert np.isfinite(card["metrics"]["frechet_distance"]) and card["bits_per_dim"]["total_bpd"] > 0
