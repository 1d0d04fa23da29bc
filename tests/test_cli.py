"""The command line end to end, on tiny models and data the tests write: train, resume, sample, nll,
forward, eval, sweep; bad input gives a clear message and exit status 2."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.cli import main
from ddpm.samplers import SAMPLERS

TINY = ["--timesteps", "50", "--batch-size", "8", "--checkpoint-every", "2", "--log-every", "1",
        "--sample-every", "0", "--warmup-steps", "1", "--lr", "1e-3", "--device", "cpu",
        "--set", "train.tensorboard=false", "--set", "model.base_channels=8", "--set", "model.channel_mult=1,2"]


def write_folder(root: Path, n: int = 24, size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        arr = (rng.random((size, size)) * 255).astype(np.uint8)
        folder = root / "sub" if i % 2 else root
        Image.fromarray(arr, mode="L").save(folder / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    data = write_folder(tmp / "data")
    out = tmp / "run"
    args = ["train", "--data", str(data), "--steps", "4", "--out", str(out), "--set", "model.num_groups=8", *TINY]
    assert main(args) == 0
    return out


def test_train_writes_checkpoints_metrics_and_resolved_config(trained_run: Path) -> None:
    ckpts = sorted(p.name for p in trained_run.glob("ckpt-*"))
    assert ckpts[-1] == "ckpt-00000004"
    config = (trained_run / ckpts[-1] / "config.toml").read_text()
    assert 'preset = "digits-8"' in config and "data_shape = [1, 8, 8]" in config
    lines = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in lines)


def test_resume_continues_to_more_steps(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    data = tmp_path / "data"
    write_folder(data)
    args = ["train", "--data", str(data), "--steps", "6", "--out", str(run), "--resume",
            "--set", "model.num_groups=8", *TINY]
    assert main(args) == 0
    assert (run / "ckpt-00000006").is_dir()


def test_sample_writes_grid_npz_pngs_and_animation(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    code = main(["sample", str(trained_run), "-n", "5", "--steps", "5", "--out", str(out),
                 "--format", "grid,png,npz", "--animate", "--batch-size", "2", "--device", "cpu"])
    assert code == 0
    images = np.load(out / "samples.npz")["images"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    assert len(list((out / "png").glob("*.png"))) == 5
    assert Image.open(out / "reverse_chain.gif").n_frames > 2
    # sample i depends on its own seeds only (x_T and the step noise of the default SDE sampler), not on the batch
    out2 = tmp_path / "s2"
    assert main(["sample", str(trained_run), "-n", "3", "--steps", "5", "--out", str(out2), "--batch-size", "3",
                 "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.load(out2 / "samples.npz")["images"], images[:3])


def test_nll_exact_and_estimate(trained_run: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_folder(data)
    out = tmp_path / "nll"
    assert main(["nll", str(trained_run), "--data", str(data), "--split", "train", "-n", "4", "--out", str(out),
                 "--device", "cpu"]) == 0
    exact = json.loads((out / "nll.json").read_text())
    parts = exact["prior_bpd"] + exact["kl_bpd"] + exact["decoder_bpd"]
    assert exact["total_bpd"] == pytest.approx(parts, rel=1e-9)
    assert (out / "terms.png").is_file()
    estimate = ["nll", str(trained_run), "--data", str(data), "--split", "train", "-n", "4", "--estimate", "10",
                "--out", str(out), "--device", "cpu"]
    assert main(estimate) == 2  # never overwrites the exact result silently
    assert json.loads((out / "nll.json").read_text()) == exact
    assert main([*estimate, "--force"]) == 0
    est = json.loads((out / "nll.json").read_text())
    assert est["stderr_bpd"] > 0 and est["mode"].startswith("importance")


def test_forward_strip(tmp_path: Path) -> None:
    img = tmp_path / "cat.png"
    Image.fromarray((np.arange(16 * 16 * 3) % 255).astype(np.uint8).reshape(16, 16, 3)).save(img)
    out = tmp_path / "strip.png"
    assert main(["forward", str(img), "--out", str(out), "--t", "0,10,999"]) == 0
    assert Image.open(out).size[0] > 0


def test_bad_input_is_a_clear_error(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--data", str(empty), "--steps", "1", "--out", str(tmp_path / "r"), *TINY]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["train", "--data", "nosuchset", "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    assert "unknown dataset 'nosuchset'" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--set", "train.stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err
    assert main(["forward", str(tmp_path / "none.png")]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["sample", str(trained_run), "--sampler", "euler"])
    assert exc.value.code == 2
    # a sampler option that does not apply, or a value the sampler cannot take: an error before anything is written
    for command, flags, message in [("sample", ["--sampler", "ddim", "--churn", "3"], "no option(s) ['churn']"),
                                    ("eval", ["--sampler", "unipc", "--order", "5"], "order must be one of 1, 2, 3")]:
        assert main([command, str(trained_run), *flags, "--out", str(tmp_path / command), "--device", "cpu"]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / command).exists()


def test_corrupt_image_names_the_file_unless_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_folder(tmp_path / "data")
    (data / "broken.png").write_bytes(b"not a png")
    args = ["train", "--data", str(data), "--steps", "1", "--out", str(tmp_path / "r"), "--set", "model.num_groups=8",
            *TINY]
    assert main(args) == 2
    assert "broken.png" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="skipped 1"):
        assert main([*args, "--skip-bad-images"]) == 0


def test_checkpoint_of_another_architecture_is_refused(trained_run: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    data = write_folder(tmp_path / "data")
    args = ["train", "--data", str(data), "--steps", "6", "--out", str(run), "--resume", *TINY,
            "--set", "model.base_channels=16", "--set", "model.num_groups=8"]
    assert main(args) == 2
    assert "another architecture" in capsys.readouterr().err


def test_eval_and_sweep_on_2d_data(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--data", "gmm", "--steps", "30", "--out", str(out), "--timesteps", "50",
                 "--batch-size", "64", "--checkpoint-every", "30", "--sample-every", "0", "--warmup-steps", "1",
                 "--device", "cpu", "--set", "data.num_points=512"]) == 0
    assert main(["eval", str(out), "-n", "200", "--steps", "10", "--out", str(tmp_path / "e"), "--device", "cpu"]) == 0
    card = json.loads((tmp_path / "e" / "eval_card.json").read_text())
    assert {"sliced_wasserstein", "mmd_rbf", "mean_log_density_samples"} <= set(card["metrics"])
    assert main(["sweep", str(out), "-n", "100", "--steps", "5,10", "--out", str(tmp_path / "w"),
                 "--device", "cpu"]) == 0
    rows = json.loads((tmp_path / "w" / "sweep.json").read_text())["rows"]
    expected = [(name, nfe) for name in SAMPLERS for nfe in (5, 10)]  # every sampler, by network evaluations
    assert [(r["sampler"], r["nfe"]) for r in rows] == expected
    assert main(["sample", str(out), "-n", "50", "--steps", "10", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 0
    assert (tmp_path / "s" / "scatter.png").is_file()
    samples = torch.from_numpy(np.load(tmp_path / "s" / "samples.npz")["samples"])
    assert samples.shape == (50, 2)
    assert samples.abs().max() > 1.0  # vectors are not clipped to the image range [-1, 1]


def test_sample_never_overwrites_earlier_results(trained_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    args = ["sample", str(run), "-n", "2", "--steps", "3", "--device", "cpu"]
    assert main(args) == 0 and main([*args, "--seed", "1"]) == 0  # default folders: samples, samples-2
    first, second = np.load(run / "samples" / "samples.npz")["images"], np.load(run / "samples-2" / "samples.npz")
    assert not np.array_equal(first, second["images"])
    out = tmp_path / "mine"
    assert main([*args, "--out", str(out)]) == 0
    before = (out / "samples.npz").read_bytes()
    assert main([*args, "--out", str(out), "--seed", "5"]) == 2
    assert "--force" in capsys.readouterr().err and (out / "samples.npz").read_bytes() == before
    assert main([*args, "--out", str(out), "--seed", "5", "--force"]) == 0
    assert (out / "samples.npz").read_bytes() != before
    assert main([*args, "--out", str(tmp_path / "f"), "--format", "jpeg"]) == 2
    assert "jpeg" in capsys.readouterr().err and not (tmp_path / "f").exists()


def test_help_shows_the_configuration_defaults(capsys: pytest.CaptureFixture) -> None:
    from ddpm.config import RunConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    defaults = RunConfig()
    assert "(default: None)" not in text
    for flag, value in (("--steps", defaults.train.steps), ("--lr", defaults.optim.lr),
                        ("--batch-size", defaults.train.batch_size), ("--ema-decay", defaults.ema.decay)):
        assert f"(default: {value})" in text.split(f" {flag} ", 1)[1].split(" --", 1)[0], flag


def test_export_and_every_command_on_a_diffusers_folder(trained_run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    export = tmp_path / "export"
    assert main(["export", str(trained_run), str(export)]) == 0
    assert (export / "model_index.json").is_file()
    assert (export / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert main(["export", str(trained_run), str(export)]) == 2  # never over an earlier export
    assert "not empty" in capsys.readouterr().err
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["-n", "3", "--steps", "5", "--device", "cpu", "--format", "npz"]
    assert main(["sample", str(trained_run), "--out", str(a), *common]) == 0
    assert main(["sample", str(export), "--out", str(b), *common]) == 0
    np.testing.assert_array_equal(np.load(a / "samples.npz")["images"], np.load(b / "samples.npz")["images"])
    data = write_folder(tmp_path / "data")
    nll = ["nll", str(export), "-n", "2", "--estimate", "4", "--out", str(tmp_path / "n"), "--device", "cpu"]
    assert main(nll) == 2
    assert "pass --data" in capsys.readouterr().err
    assert main(["nll", str(export), "--data", str(data), "--split", "train", "-n", "2", "--estimate", "4",
                 "--out", str(tmp_path / "n"), "--device", "cpu"]) == 0


def test_prepare_then_train_streaming_from_the_cache(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_folder(tmp_path / "data")
    (data / "broken.png").write_bytes(b"not a png")
    cache = tmp_path / "prepared"
    assert main(["prepare", str(data), "--image-size", "8", "--workers", "1", "--out", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "25 images" not in out and "24 images" in out and "1 undecodable" in out and "broken.png" in out
    args = ["train", "--data", str(cache), "--steps", "2", "--out", str(tmp_path / "r"), "--loader", "stream",
            "--workers", "0", "--set", "model.num_groups=8", *TINY]
    assert main(args) == 2 and "broken.png" in capsys.readouterr().err  # stops on the bad file unless skipped
    with pytest.warns(UserWarning, match="skipped 1"):
        assert main([*args, "--skip-bad-images"]) == 0
    assert (tmp_path / "r" / "ckpt-00000002").is_dir()
    assert main(["prepare", str(tmp_path / "nowhere")]) == 2


def test_inpaint_edit_and_interpolate_write_their_folders(trained_run: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    from ddpm.data.images import find_images

    rng = np.random.default_rng(1)
    pixels = (rng.random((3, 8, 8, 1)) * 255).astype(np.uint8)
    np.savez(tmp_path / "in.npz", images=pixels)
    out = tmp_path / "inpainted"
    args = ["inpaint", str(trained_run), "--images", str(tmp_path / "in.npz"), "--mask", "half", "--steps", "5",
            "--resample", "2", "--jump", "2", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    result = np.load(out / "samples.npz")["images"]
    assert result.shape == (3, 8, 8, 1) and np.array_equal(result[:, :4], pixels[:, :4])  # kept pixels, exactly
    assert not np.array_equal(result, pixels) and (out / "grid.png").is_file()
    info = json.loads((out / "inpaint_info.json").read_text())
    # 5 steps down, and one jump of 2 levels back up at levels 0 and 2: two more steps each
    assert info["network_evaluations"] == 5 + 2 * 2 and info["images"][2] == f"{tmp_path / 'in.npz'}[2]"
    assert main(args) == 2 and "already holds samples.npz" in capsys.readouterr().err  # never over earlier results
    assert main([*args, "--force", "--sampler", "ddim", "--eta", "0.5"]) == 0

    folder = write_folder(tmp_path / "data", n=4)
    edited = tmp_path / "edited"
    assert main(["edit", str(trained_run), "--images", str(folder), "--strength", "0.4", "--sampler", "ddim",
                 "--steps", "3", "--device", "cpu", "--out", str(edited)]) == 0
    info = json.loads((edited / "edit_info.json").read_text())
    assert np.load(edited / "samples.npz")["images"].shape == (4, 8, 8, 1)
    assert info["images"] == [str(p) for p in find_images(folder)]  # in the folder's order
    assert info["network_evaluations"] == 3 and max(info["timesteps"]) == round(0.4 * 49)

    a, b = sorted(folder.glob("*.png"))[:2]
    path = tmp_path / "path"
    assert main(["interpolate", str(trained_run), str(a), str(b), "--frames", "4", "--steps", "5", "--device", "cpu",
                 "--out", str(path)]) == 0
    assert np.load(path / "samples.npz")["images"].shape == (4, 8, 8, 1)
    assert (path / "strip.png").is_file() and Image.open(path / "interpolation.gif").n_frames == 4


def test_editing_commands_refuse_bad_input(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(big)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(small)
    grey_mask = tmp_path / "mask.png"
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(grey_mask)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    cases = [
        (["inpaint", "--images", str(big), "--mask", "half"], "big.png is 16x16 pixels; the model of"),
        (["inpaint", "--images", str(small), "--mask", str(grey_mask)], "not binary"),
        (["inpaint", "--images", str(small), "--mask", "box:0,0,9,9"], "0 <= x0 < x1 <= 8"),
        (["inpaint", "--images", str(small), "--mask", "half", "--sampler", "ancestral", "--eta", "1"],
         "--eta applies to --sampler ddim"),
        (["inpaint", "--images", str(broken), "--mask", "half"], "cannot decode image file"),
        (["inpaint", "--images", str(tmp_path / "none.png"), "--mask", "half"], "none.png does not exist"),
        (["edit", "--images", str(small), "--strength", "0"], "strength must lie in (0, 1]"),
        (["edit", "--images", str(small), "--strength", "1.5"], "strength must lie in (0, 1]"),
        (["edit", "--images", str(small), "--class", "3"], "unconditional model"),
        (["interpolate", str(small), str(big)], "big.png is 16x16 pixels"),
        (["interpolate", str(small), str(small), "--frames", "1"], "--frames must be >= 2"),
    ]
    for command, message in cases:
        out = tmp_path / f"out-{len(message)}"
        assert main([command[0], str(trained_run), *command[1:], "--device", "cpu", "--out", str(out)]) == 2, command
        err = capsys.readouterr().err
        assert message in err, (command, err)
        assert not (out / "samples.npz").exists()
