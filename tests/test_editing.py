"""Editing with a trained model: exact properties of inpainting (RePaint), SDEdit, inversion and interpolation.

Inversion is checked on data N(mu, diag(s^2)), where the Bayes-optimal denoiser and the exact
probability-flow ODE are known (see ``tests/test_solvers.py``); the rest on small random networks,
where the properties hold for any network.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import GaussianDiffusion, make_betas
from ddpm.config import ModelConfig, RunConfig
from ddpm.editing import (
    encode,
    inpaint,
    parse_mask,
    repaint_evaluations,
    repaint_schedule,
    sdedit,
    slerp,
    start_timestep,
)
from ddpm.errors import UserError
from ddpm.nn import UNet, UNetConfig
from ddpm.pipeline import Pipeline
from ddpm.processes import GaussianConfig, build_process
from ddpm.samplers import sample, sampling_chain

from .test_solvers import gaussian_denoiser

MU = torch.tensor([0.3, -0.5, 0.1, 0.0], dtype=torch.float64)
S = torch.tensor([0.2, 0.5, 1.0, 0.3], dtype=torch.float64)


def image_pipe(*, num_classes: int | None = None, prediction: str = "eps", seed: int = 0) -> Pipeline:
    """A random 1x8x8 U-Net on T = 20 steps (every parameter random, so no output is trivially zero)."""
    config = RunConfig(model=ModelConfig(data_shape=(1, 8, 8), cond_drop=0.1 if num_classes else 0.0),
                       diffusion=GaussianConfig(schedule="cosine", timesteps=20, prediction=prediction))
    net = UNet(UNetConfig(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                          attention_resolutions=(), image_size=8, num_groups=4, num_classes=num_classes))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return Pipeline(net, build_process(config.diffusion), config, source=Path("memory"), weights="ema")


def images(n: int, seed: int = 1) -> torch.Tensor:
    """Images on the 256-level grid, as data are."""
    levels = torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    return levels.float() / 127.5 - 1


# ------------------------------------------------------------------------------------------------ masks
def test_named_masks_fill_what_their_names_say() -> None:
    half, center, lines = (parse_mask(name, 8, 6) for name in ("half", "center", "lines"))
    assert half[:4].all() and not half[4:].any()
    assert not center[2:6, 1:4].any() and int(center.sum()) == 48 - 12
    assert lines[0::2].all() and not lines[1::2].any()
    box = parse_mask("box:1,2,3,5", 8, 6)  # columns 1..2, rows 2..4
    assert not box[2:5, 1:3].any() and int(box.sum()) == 48 - 6


def test_mask_file_white_keeps_black_fills(tmp_path: Path) -> None:
    pixels = np.full((8, 6), 255, np.uint8)
    pixels[5:, :2] = 0
    Image.fromarray(pixels).save(tmp_path / "m.png")
    keep = parse_mask(str(tmp_path / "m.png"), 8, 6)
    assert torch.equal(keep, torch.from_numpy(pixels == 255))
    pixels[0, 0] = 128
    Image.fromarray(pixels).save(tmp_path / "grey.png")
    with pytest.raises(UserError, match="not binary.*128"):
        parse_mask(str(tmp_path / "grey.png"), 8, 6)
    with pytest.raises(UserError, match="6x8 pixels, the images are 8x8"):
        parse_mask(str(tmp_path / "m.png"), 8, 8)
    with pytest.raises(UserError, match="neither a mask name"):
        parse_mask(str(tmp_path / "missing.png"), 8, 6)
    with pytest.raises(UserError, match="0 <= x0 < x1 <= 6"):
        parse_mask("box:0,0,7,2", 8, 6)
    with pytest.raises(UserError, match="four integers"):
        parse_mask("box:1,2", 8, 6)


# --------------------------------------------------------------------------------------------- RePaint
def diffusers_levels(points: int, resample: int, jump: int) -> list[tuple[int, int]]:
    """The moves of diffusers' RePaintScheduler, in the levels of ddpm.editing.inpaint, one level at a time."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.RePaintScheduler(num_train_timesteps=points)
    scheduler.set_timesteps(points, jump_length=jump, jump_n_sample=resample)
    moves, last = [], points  # an evaluation at index t takes level t + 1 to t; an undo step goes up one
    for t in scheduler.timesteps.tolist():
        moves.append((t + 1, t) if t < last else (t - 1, t))
        last = t
    return moves


@pytest.mark.parametrize("points, resample, jump", [(6, 3, 2), (20, 3, 5), (25, 5, 5), (10, 10, 10), (12, 1, 1)])
def test_repaint_schedule_is_the_papers(points: int, resample: int, jump: int) -> None:
    ours = []
    for start, end in repaint_schedule(points, resample, jump):
        step = 1 if end > start else -1
        ours += [(level, level + step) for level in range(start, end, step)]
    assert ours == diffusers_levels(points, resample, jump)
    assert repaint_evaluations(points, resample, jump) == sum(1 for a, b in ours if b < a)
    assert repaint_evaluations(points, 1, jump) == points


def test_all_known_mask_returns_the_input_and_all_unknown_is_sampling() -> None:
    pipe, x0 = image_pipe(), images(3)
    everything = pipe.inpaint(x0, torch.ones(8, 8), steps=6, resample=2, jump=2, seed=5)
    assert torch.equal(everything, x0)
    nothing = pipe.inpaint(x0, torch.zeros(8, 8), steps=6, resample=1, seed=5)
    assert torch.equal(nothing, pipe.sample(3, sampler="ancestral", steps=6, seed=5))


def test_one_pass_without_jumps_is_the_replacement_method() -> None:
    """U = 1: x_{t-1} = m q(x_{t-1} | x_0) + (1 - m) p(x_{t-1} | x_t) at every step (written out here)."""
    process = GaussianDiffusion(make_betas("cosine", 20))
    model = gaussian_denoiser(process, torch.tensor(0.2), torch.tensor(0.5))
    x0 = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keep = torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.5
    chain = process.respaced(7)
    result = inpaint(chain, lambda x, t: model(x.flatten(1), t).view_as(x), x0, keep,
                     generator=torch.Generator().manual_seed(2), known_generator=torch.Generator().manual_seed(3),
                     clip_denoised=False)
    g, known_g = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    x = torch.randn(x0.shape, generator=g)
    abar = chain.schedule.alphas_cumprod
    for i in range(6, -1, -1):
        p = chain.p_mean_variance(lambda x, t: model(x.flatten(1), t).view_as(x), x, torch.full((4,), i))
        x = p.mean + torch.exp(0.5 * p.log_variance) * torch.randn(x.shape, generator=g) if i > 0 else p.mean
        known = x0 if i == 0 else abar[i - 1].sqrt() * x0 + (1 - abar[i - 1]).sqrt() * torch.randn(
            x0.shape, generator=known_g)
        x = keep * known + ~keep * x
    torch.testing.assert_close(result, x, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("sampler, resample, jump, prediction", [
    ("ancestral", 3, 2, "eps"), ("ddim", 2, 3, "v"), ("ancestral", 1, 1, "x0")])
def test_known_pixels_are_the_inputs_exactly(sampler: str, resample: int, jump: int, prediction: str) -> None:
    pipe, x0 = image_pipe(prediction=prediction), images(4)
    per_image = torch.stack([parse_mask(m, 8, 8) for m in ("half", "center", "lines", "box:0,0,3,8")])[:, None]
    out = pipe.inpaint(x0, per_image, steps=8, resample=resample, jump=jump, sampler=sampler, seed=1)
    assert torch.equal(out[per_image.expand_as(x0)], x0[per_image.expand_as(x0)])
    assert not torch.equal(out, x0) and out.abs().max() <= 1
    again = pipe.inpaint(x0, per_image, steps=8, resample=resample, jump=jump, sampler=sampler, seed=1,
                         batch_size=3)  # image i draws from its own seed, whatever the batch
    torch.testing.assert_close(again, out, atol=1e-5, rtol=0)


def test_conditional_inpainting_with_guidance_follows_the_class() -> None:
    pipe, x0 = image_pipe(num_classes=3), images(2)
    keep = parse_mask("half", 8, 8)
    a = pipe.inpaint(x0, keep, steps=5, classes=0, guidance=2.0, seed=0)
    b = pipe.inpaint(x0, keep, steps=5, classes=2, guidance=2.0, seed=0)
    assert torch.equal(a[:, :, :4], x0[:, :, :4]) and not torch.equal(a, b)
    with pytest.raises(UserError, match="guidance needs class labels"):
        pipe.inpaint(x0, keep, steps=5, guidance=2.0)


def test_inpainting_refuses_bad_input() -> None:
    pipe, x0 = image_pipe(), images(2)
    with pytest.raises(UserError, match=r"mask of shape \[1, 1, 8, 7\] does not fit images of shape \[2, 1, 8, 8\]"):
        pipe.inpaint(x0, torch.ones(8, 7))
    with pytest.raises(UserError, match="binary"):
        pipe.inpaint(x0, torch.full((8, 8), 0.5))
    with pytest.raises(UserError, match=r"images of shape \[2, 1, 4, 4\] do not fit a model of \[1, 8, 8\]"):
        pipe.inpaint(torch.zeros(2, 1, 4, 4), torch.ones(4, 4))
    with pytest.raises(UserError, match=r"\[-1, 1\]"):
        pipe.inpaint(x0 * 3, torch.ones(8, 8))
    with pytest.raises(UserError, match="ancestral or ddim, not 'dpm\\+\\+2m'"):
        pipe.inpaint(x0, torch.ones(8, 8), sampler="dpm++2m", steps=5)


# ---------------------------------------------------------------------------------------------- SDEdit
def test_sdedit_keeps_the_input_as_strength_falls_and_samples_at_one() -> None:
    process = GaussianDiffusion(make_betas("linear", 1000), prediction="v")
    model = gaussian_denoiser(process, MU, S)
    x0 = (MU + S * torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).clamp(-1, 1)
    errors = []
    for strength in (0.1, 0.01, 0.001):
        out = sdedit(process, model, x0, strength, sampler="ddim", steps=10, clip_denoised=False,
                     generator=torch.Generator().manual_seed(1))
        errors.append(float((out - x0).abs().max()))
    sigma = math.sqrt(1 - float(process.schedule.alphas_cumprod[start_timestep(0.001, 1000)]))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 5 * sigma, (errors, sigma)  # 256 values: |eps| < 4
    # strength 1: x_{T-1} = sqrt(abar) x_0 + sqrt(1 - abar) eps with the eps that sampling draws as x_T
    edited = sdedit(process, model, x0, 1.0, sampler="ddim", steps=10, clip_denoised=False,
                    generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float32).double()
    abar = float(process.schedule.alphas_cumprod[-1])
    start = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps
    assert torch.equal(edited, sample(process, model, x0.shape, sampler="ddim", steps=10, clip_denoised=False,
                                      noise=start, generator=g))
    scratch = sample(process, model, x0.shape, sampler="ddim", steps=10, clip_denoised=False, noise=eps)
    gap = math.sqrt(abar) * float(x0.abs().max()) + (1 - math.sqrt(1 - abar)) * float(eps.abs().max())
    assert float((edited - scratch).abs().max()) <= 2 * gap  # the ODE map contracts for s <= 1


def test_sdedit_strength_and_seeds() -> None:
    pipe, x0 = image_pipe(), images(3)
    assert start_timestep(0.5, 20) == 10 and start_timestep(1.0, 20) == 19
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(UserError, match=r"strength must lie in \(0, 1\]"):
            pipe.edit(x0, bad)
    out = pipe.edit(x0, 0.5, sampler="dpm++2m-sde", steps=5, seed=2)
    torch.testing.assert_close(pipe.edit(x0, 0.5, sampler="dpm++2m-sde", steps=5, seed=2, batch_size=2),
                               out, atol=1e-5, rtol=0)  # image i draws from its own seed, whatever the batch
    assert not torch.equal(out, pipe.edit(x0, 0.5, sampler="dpm++2m-sde", steps=5, seed=3))
    # a start at t0 = 2 has three timesteps: 20 evaluations cannot be spent there, three are
    assert pipe.edit(x0, 0.1, sampler="ddim", steps=20).shape == x0.shape


# ------------------------------------------------------------------------------------------- inversion
# (solver, the order its round trip error falls at: DDIM's first order; DPM-Solver++(2M)'s measured 2.7-3.0, above
# the solver's 2: the errors of the two directions partly cancel)
@pytest.mark.parametrize("sampler, order", [("ddim", 1), ("dpm++2m", 2.85)])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_round_trip_error_falls_at_the_solvers_order(sampler: str, order: float, prediction: str) -> None:
    process = GaussianDiffusion(make_betas("linear", 1000), prediction=prediction)
    model = gaussian_denoiser(process, MU, S)
    x0 = MU + S * torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    nfes, errors = [16, 32, 64], []
    for k in nfes:
        chain = sampling_chain(process, sampler, k, "karras")
        x_T = encode(chain, model, x0, sampler=sampler)
        back = sample(process, model, x0.shape, sampler=sampler, steps=k, spacing="karras", noise=x_T,
                      clip_denoised=False)
        errors.append(float((back - x0).abs().max()))
    slopes = [math.log(errors[i] / errors[i + 1]) / math.log(2) for i in range(2)]
    assert all(abs(s - order) < 0.35 for s in slopes), (errors, slopes)


def test_encoding_approaches_the_exact_ode_solution() -> None:
    """z = (x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) is constant along the exact flow."""
    process = GaussianDiffusion(make_betas("linear", 1000))
    model = gaussian_denoiser(process, MU, S)
    x0 = MU + S * torch.randn(32, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for k in (16, 64):
        chain = sampling_chain(process, "dpm++2m", k, "karras")
        abar = chain.schedule.alphas_cumprod[-1].double()
        exact = abar.sqrt() * MU + (abar * S**2 + 1 - abar).sqrt() * (x0 - MU) / S
        errors.append(float((encode(chain, model, x0, sampler="dpm++2m") - exact).abs().max()))
    assert errors[0] / errors[1] > 4 ** 1.7, errors  # second order: 16 for four times the evaluations


def test_encode_decode_and_interpolation_through_the_pipeline() -> None:
    pipe, x0 = image_pipe(prediction="v"), images(2)
    z = pipe.encode(x0, sampler="dpm++2m", steps=10)
    assert z.shape == x0.shape and torch.isfinite(z).all()
    decoded = pipe.decode(z, sampler="dpm++2m", steps=10)
    frames = pipe.interpolate(x0[0], x0[1], frames=5, sampler="dpm++2m", steps=10)
    assert frames.shape == (5, 1, 8, 8)
    torch.testing.assert_close(frames[0], decoded[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(frames[-1], decoded[1], atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="deterministic solver"):
        pipe.encode(x0, sampler="ancestral")
    with pytest.raises(UserError, match="eta = 0"):
        from ddpm.editing import check_inversion_sampler

        check_inversion_sampler("ddim", {"eta": 1.0})
    with pytest.raises(UserError, match="at least 2 frames"):
        pipe.interpolate(x0[0], x0[1], frames=1)


def test_slerp_ends_and_norm() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1000, generator=g), torch.randn(3, 1000, generator=g)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    torch.testing.assert_close(slerp(a, b, 0.3).norm(dim=1), torch.ones(3))  # stays on the sphere
    torch.testing.assert_close(slerp(a, a, 0.5), a)  # parallel: no division by sin(0)


def test_editing_needs_gaussian_image_models() -> None:
    from ddpm.processes import CategoricalConfig

    config = RunConfig(model=ModelConfig(data_shape=(1, 8, 8)), diffusion=CategoricalConfig(timesteps=5, num_states=4,
                                                                                 transition="uniform"))
    process = build_process(config.diffusion)
    pipe = Pipeline(image_pipe().model, process, config, source=Path("memory"), weights="ema")
    with pytest.raises(UserError, match="Gaussian diffusion; memory is a 'categorical' model"):
        pipe.inpaint(images(1), torch.ones(8, 8))


def test_class_weights_mix_the_embeddings_and_one_hot_rows_are_the_labels() -> None:
    pipe = image_pipe(num_classes=3)
    x, t = images(4), torch.tensor([0, 5, 10, 19])
    labels = torch.tensor([0, 2, 3, 1])  # 3: the null class
    onehot = torch.nn.functional.one_hot(labels, 4).float()
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(x, t, y=onehot), pipe.model(x, t, y=labels))
        half = pipe.model(x, t, y=0.5 * onehot + 0.5 * torch.nn.functional.one_hot(torch.tensor([1, 1, 1, 1]), 4))
    assert not torch.allclose(half, pipe.model(x, t, y=labels))
    with pytest.raises(ValueError, match=r"class weights \[4, 4\]"):
        pipe.model(x, t, y=torch.ones(4, 3))


def test_conditional_interpolation_walks_from_one_class_to_the_other() -> None:
    pipe, x0 = image_pipe(num_classes=3, prediction="v"), images(2)
    frames = pipe.interpolate(x0[0], x0[1], frames=4, steps=6, classes=(0, 2), guidance=1.5)
    ends = pipe.decode(pipe.encode(x0, steps=6, classes=[0, 2], guidance=1.5), steps=6, classes=[0, 2], guidance=1.5)
    torch.testing.assert_close(frames[0], ends[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(frames[-1], ends[1], atol=1e-5, rtol=0)
    same = pipe.interpolate(x0[0], x0[1], frames=4, steps=6, classes=0, guidance=1.5)
    assert not torch.allclose(same[1:], frames[1:])  # the class embedding moves along the path
