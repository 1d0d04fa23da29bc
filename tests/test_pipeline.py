"""The run API: ddpm.load / Pipeline behaviour that the command line relies on."""

from pathlib import Path

import pytest
import torch

import ddpm
from ddpm.build import resolve_hflip
from ddpm.config import DataConfig, ModelConfig, RunConfig
from ddpm.data import ArrayDataset
from ddpm.errors import CheckpointError, UserError
from ddpm.nn import MLPConfig, MLPDenoiser
from ddpm.pipeline import Pipeline
from ddpm.processes import GaussianConfig, build_process


def vector_pipe(model: torch.nn.Module) -> Pipeline:
    config = RunConfig(model=ModelConfig(data_shape=(2,)), diffusion=GaussianConfig(schedule="cosine", timesteps=20))
    return Pipeline(model, build_process(config.diffusion), config, source=Path("memory"), weights="ema")


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


LOAD_AND_SAMPLE = """
import json, sys
import ddpm
pipe = ddpm.load(sys.argv[1], device="cpu")
x = pipe.sample(2, sampler="ancestral", steps=3)
assert x.shape == (2, 1, 8, 8)
print(json.dumps(sorted(m for m in sys.modules if m == "ddpm.train" or m.startswith("ddpm.train."))))
"""


def test_inference_does_not_load_the_trainer(tmp_path: Path) -> None:
    """``import ddpm; ddpm.load(run).sample(...)`` in a fresh interpreter imports no module of ddpm.train."""
    import json
    import os
    import subprocess
    import sys

    from ddpm.cli import main

    from .test_cli import TINY, write_folder

    run = tmp_path / "run"
    assert main(["train", "--data", str(write_folder(tmp_path / "data")), "--steps", "2", "--out", str(run),
                 "--set", "model.num_groups=8", *TINY]) == 0
    src = str(Path(ddpm.__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", LOAD_AND_SAMPLE, str(run)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
