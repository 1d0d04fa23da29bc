"""The run API: ddpm.load / Pipeline behaviour that the command line relies on."""

from pathlib import Path

import pytest
import torch

import ddpm
from ddpm.build import build_diffusion, resolve_hflip
from ddpm.data import ArrayDataset
from ddpm.errors import CheckpointError, UserError
from ddpm.nn import MLPConfig, MLPDenoiser
from ddpm.pipeline import Pipeline
from ddpm.train.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig


def vector_pipe(model: torch.nn.Module) -> Pipeline:
    config = RunConfig(model=ModelConfig(data_shape=(2,)), diffusion=DiffusionConfig(schedule="cosine", timesteps=20))
    return Pipeline(model, build_diffusion(config.diffusion), config, source=Path("memory"), weights="ema")


def test_sample_i_does_not_depend_on_the_batch_size() -> None:
    torch.manual_seed(0)
    pipe = vector_pipe(MLPDenoiser(MLPConfig(dim=2, hidden=16, num_blocks=1)))
    whole = pipe.sample(7, sampler="ancestral", seed=3, batch_size=7)
    pieces = pipe.sample(7, sampler="ancestral", seed=3, batch_size=2)
    torch.testing.assert_close(whole, pieces, atol=1e-5, rtol=1e-5)  # the same noise; only matmul blocking differs
    assert not torch.equal(whole, pipe.sample(7, sampler="ancestral", seed=4))
    assert pipe.network_evaluations("ancestral", None) == 20 and pipe.network_evaluations("ddim", 5) == 5


def test_non_finite_samples_are_an_error_naming_the_weights() -> None:
    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(float("nan")))

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return x * self.w

    with pytest.raises(UserError, match="samples from memory.*NaN or infinite"):
        vector_pipe(Broken()).sample(3, sampler="ddim", steps=4)


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        ddpm.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="unknown weights 'best'"):
        ddpm.load(tmp_path, weights="best")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    (tmp_path / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DModel"]}')
    with pytest.raises(UserError, match="scheduler"):
        ddpm.load(tmp_path)


@pytest.mark.parametrize("dataset, hflip, expected", [
    ("mnist5k", None, False), ("digits", None, False), ("MNIST", None, False), ("cifar10", None, True),
    ("/some/folder", None, True), ("digits", True, True), ("cifar10", False, False),
])
def test_flips_default_off_for_digits_only(dataset: str, hflip: bool | None, expected: bool) -> None:
    images = ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), kind="image", name=dataset)
    assert resolve_hflip(DataConfig(dataset=dataset, hflip=hflip), images) is expected
    points = ArrayDataset(torch.zeros(2, 2), kind="vector", name=dataset)
    assert resolve_hflip(DataConfig(dataset=dataset, hflip=True), points) is False
