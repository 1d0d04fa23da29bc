"""Export to and import from diffusers pipeline folders, proven against diffusers' own schedulers.

With the same x_T and the same per-step noise, diffusers' DDPMScheduler loop over an exported folder
reproduces ``pipe.sample(..., sampler="ancestral")``, its DDIMScheduler reproduces ``sampler="ddim"``,
a pipeline saved by diffusers samples the same under both libraries, and run -> export -> load is
bit-identical.
"""

import json
from pathlib import Path

import pytest
import torch

import ddpm
from ddpm.config import ModelConfig, RunConfig
from ddpm.diffusers_format import DiffusersFormatError, diffusion_from_scheduler, scheduler_config
from ddpm.nn import UNet, unet_preset
from ddpm.pipeline import Pipeline
from ddpm.processes import GaussianConfig, build_process
from ddpm.seeding import item_seeds

diffusers = pytest.importorskip("diffusers")

TINY_UNET = dict(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                 image_size=8, num_groups=4, dropout=0.0)


def random_unet(seed: int, *, learned_sigma: bool = False) -> UNet:
    torch.manual_seed(seed)
    model = UNet(unet_preset("digits-8", **TINY_UNET, learned_sigma=learned_sigma))
    with torch.no_grad():  # the paper's init zeroes the last layers; randomise them so outputs are not trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def make_pipe(schedule: str, prediction: str, T: int, *, variance: str = "fixed_small", seed: int = 0) -> Pipeline:
    diffusion = GaussianConfig(schedule=schedule, timesteps=T, prediction=prediction, variance=variance,
                                loss="hybrid" if variance == "learned_range" else "simple")
    config = RunConfig(diffusion=diffusion, model=ModelConfig(data_shape=(1, 8, 8)))
    return Pipeline(random_unet(seed, learned_sigma=variance == "learned_range"),
                    build_process(diffusion), config, source=Path("memory"), weights="ema")


def generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in item_seeds(seed, range(n))]


@torch.no_grad()
def diffusers_loop(folder: Path, n: int, seed: int, scheduler_cls: str = "DDPMScheduler",
                   num_inference_steps: int | None = None, step_kwargs: dict | None = None,
                   **scheduler_overrides) -> torch.Tensor:
    """diffusers' own sampling loop over a pipeline folder, with our per-sample noise streams."""
    pipe = diffusers.DDPMPipeline.from_pretrained(str(folder))
    scheduler = getattr(diffusers, scheduler_cls).from_config(pipe.scheduler.config, **scheduler_overrides)
    scheduler.set_timesteps(num_inference_steps or scheduler.config.num_train_timesteps)
    gens = generators(seed, n)
    x = torch.stack([torch.randn(1, 8, 8, generator=g) for g in gens])
    for t in scheduler.timesteps:
        out = pipe.unet(x, t).sample
        x = scheduler.step(out, t, x, generator=gens, **(step_kwargs or {})).prev_sample
    return x


@pytest.mark.parametrize("schedule, prediction, T", [
    ("linear", "eps", 1000), ("cosine", "v", 200), ("linear", "v", 200), ("cosine", "eps", 200),
])
def test_exported_folder_samples_like_diffusers_ddpm_scheduler(tmp_path: Path, schedule: str, prediction: str,
                                                               T: int) -> None:
    pipe = make_pipe(schedule, prediction, T)
    folder = pipe.save_pretrained(tmp_path / "export")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    expected_name = {"cosine": "squaredcos_cap_v2", "linear": "linear"}[schedule]
    assert sched["beta_schedule"] == expected_name
    assert (sched["trained_betas"] is None) == (schedule == "cosine" or T == 1000)
    ours = pipe.sample(3, sampler="ancestral", seed=7)
    theirs = diffusers_loop(folder, 3, 7)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_exported_learned_range_model_samples_like_diffusers(tmp_path: Path) -> None:
    pipe = make_pipe("cosine", "eps", 100, variance="learned_range")
    folder = pipe.save_pretrained(tmp_path / "export")
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["variance_type"] == "learned_range"
    torch.testing.assert_close(diffusers_loop(folder, 2, 3), pipe.sample(2, sampler="ancestral", seed=3),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_at_50_steps_matches_diffusers_ddim_scheduler(tmp_path: Path, prediction: str) -> None:
    pipe = make_pipe("linear", prediction, 1000, seed=1)
    folder = pipe.save_pretrained(tmp_path / "export")
    # diffusers' DDIM keeps the unclipped eps when it clips x_0 (ours re-derives eps from the clipped x_0),
    # so the two agree exactly without clipping; "leading" is diffusers' DDIM default grid.
    ours = pipe.sample(3, sampler="ddim", steps=50, spacing="leading", seed=2, clip_denoised=False)
    theirs = diffusers_loop(folder, 3, 2, "DDIMScheduler", 50, clip_sample=False)  # eta = 0 in its step
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-5)  # unclipped: values reach the hundreds


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_clipped_ddim_is_diffusers_ddim_with_the_clipped_model_output(tmp_path: Path, prediction: str) -> None:
    """With x_0 clipped to [-1, 1], our DDIM re-derives eps from the clipped x_0 (Song et al.'s
    Eq. 12 with the clipped prediction, as improved-diffusion): diffusers' DDIMScheduler with
    ``use_clipped_model_output=True``. Its default keeps the network's eps, a different sampler."""
    pipe = make_pipe("linear", prediction, 1000, seed=1)
    folder = pipe.save_pretrained(tmp_path / "export")
    ours = pipe.sample(3, sampler="ddim", steps=20, spacing="leading", seed=2)  # clip_denoised by default
    clipped = diffusers_loop(folder, 3, 2, "DDIMScheduler", 20, step_kwargs={"use_clipped_model_output": True})
    torch.testing.assert_close(clipped, ours, atol=1e-4, rtol=0)
    default = diffusers_loop(folder, 3, 2, "DDIMScheduler", 20)
    assert (default - ours).abs().max() > 1e-2  # clipping was active: the conventions differ


@pytest.mark.parametrize("beta_schedule, prediction_type", [("squaredcos_cap_v2", "v_prediction"),
                                                            ("linear", "epsilon")])
def test_pipeline_saved_by_diffusers_samples_the_same_here(tmp_path: Path, beta_schedule: str,
                                                           prediction_type: str) -> None:
    from ddpm.nn.pretrained import config_to_diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**config_to_diffusers(random_unet(0).config))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=200, beta_schedule=beta_schedule,
                                        prediction_type=prediction_type)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(tmp_path / "theirs"))
    pipe = ddpm.load(tmp_path / "theirs", device="cpu")
    assert pipe.process.prediction == {"v_prediction": "v", "epsilon": "eps"}[prediction_type]
    assert pipe.config.diffusion.schedule == ("cosine" if beta_schedule == "squaredcos_cap_v2" else "linear")
    torch.testing.assert_close(pipe.sample(3, sampler="ancestral", seed=4), diffusers_loop(tmp_path / "theirs", 3, 4),
                               atol=1e-4, rtol=0)


def test_run_export_load_is_bit_identical(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from ddpm.config import apply_overrides

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8), mode="L").save(data / f"{i}.png")
    cfg = apply_overrides(RunConfig(), {
        "data.dataset": str(data), "diffusion.timesteps": 50, "diffusion.prediction": "v", "train.steps": 2,
        "train.batch_size": 4, "train.device": "cpu", "train.out_dir": str(tmp_path / "run"),
        "train.tensorboard": False, "train.sample_every": 0, "optim.warmup_steps": 1,
        "model.base_channels": 8, "model.channel_mult": [1, 2], "model.num_groups": 4,
    })
    result = ddpm.fit(cfg, progress=False)
    run = ddpm.load(result.checkpoint, device="cpu")
    exported = ddpm.load(run.save_pretrained(tmp_path / "export"), device="cpu")
    assert torch.equal(run.sample(4, sampler="ancestral", steps=10, seed=1),
                       exported.sample(4, sampler="ancestral", steps=10, seed=1))
    assert torch.equal(run.sample(2, sampler="ddim", seed=3), exported.sample(2, sampler="ddim", seed=3))


def test_import_refuses_what_it_cannot_honour() -> None:
    base = {"_class_name": "DDPMScheduler", "num_train_timesteps": 100}
    for field, value, match in [
        ("thresholding", True, "thresholding"),
        ("rescale_betas_zero_snr", True, "zero terminal SNR"),
        ("prediction_type", "flow", "prediction_type"),
        ("variance_type", "learned", "variance_type"),
        ("beta_schedule", "laplace", "beta_schedule"),
        ("clip_sample_range", 2.0, "clip_sample_range"),
        ("mystery_option", 1, "mystery_option"),
    ]:
        with pytest.raises(DiffusersFormatError, match=match):
            diffusion_from_scheduler({**base, field: value})
    with pytest.raises(DiffusersFormatError, match="_class_name"):
        diffusion_from_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler"})
    # inference-only settings do not change the model and are accepted
    cfg = diffusion_from_scheduler({**base, "timestep_spacing": "trailing", "steps_offset": 1, "clip_sample": False})
    assert cfg.clip_denoised is False and cfg.timesteps == 100


def test_scheduler_config_round_trip_keeps_the_betas() -> None:
    for diffusion in (GaussianConfig(schedule="linear", timesteps=1000),
                      GaussianConfig(schedule="cosine", timesteps=70),
                      GaussianConfig(schedule="linear", timesteps=70, prediction="x0", variance="fixed_large")):
        back = diffusion_from_scheduler(scheduler_config(diffusion, clip_sample=True))
        ours = build_process(diffusion).schedule.betas
        torch.testing.assert_close(build_process(back).schedule.betas, ours, rtol=0, atol=0)
        assert (back.prediction, back.variance) == (diffusion.prediction, diffusion.variance)


def test_mlp_models_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    from ddpm.nn import MLPConfig, MLPDenoiser

    config = RunConfig(model=ModelConfig(data_shape=(2,)))
    pipe = Pipeline(MLPDenoiser(MLPConfig()), build_process(config.diffusion), config,
                    source=Path("memory"), weights="ema")
    with pytest.raises(DiffusersFormatError, match="only U-Net"):
        pipe.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()
