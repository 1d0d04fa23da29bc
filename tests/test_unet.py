"""The DDPM U-Net: shapes, parameter counts, timestep embedding, initialisation, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from ddpm.nn import PRESETS, UNet, UNetConfig, param_count, timestep_embedding, unet_preset
from ddpm.nn.unet import _SUBPIXEL_TAPS, AttentionBlock, Upsample, upsample_conv_subpixel

TINY = UNetConfig(
    in_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
    attention_resolutions=(4,), image_size=8, num_groups=4, dropout=0.1,
)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter, including the zero-initialised ones, with small noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("name", ["ddpm-cifar10", "mnist-28", "digits-8"])
def test_preset_output_shape(name):
    cfg = unet_preset(name)
    model = UNet(cfg).eval()
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    with torch.inference_mode():
        out = model(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert out.is_contiguous()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ddpm-cifar10", 35_746_307),  # "35.7M" in Ho et al. 2020, Table/Appendix B
        ("ddpm-celebahq256", 113_673_219),  # google/ddpm-celebahq-256
        ("ddpm-lsun256", 113_673_219),
    ],
)
def test_paper_parameter_counts(name, expected):
    with torch.device("meta"):
        model = UNet(unet_preset(name))
    assert param_count(model) == expected


def test_small_presets_are_small():
    for name in ("mnist-28", "digits-8"):
        with torch.device("meta"):
            assert param_count(UNet(unet_preset(name))) < 1_000_000, name


def test_cifar10_parameter_count_matches_diffusers():
    from diffusers import UNet2DModel

    with torch.device("meta"):
        ref = UNet2DModel(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
            layers_per_block=2, attention_head_dim=None,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
        )
        ours = UNet(unet_preset("ddpm-cifar10"))
    assert param_count(ours) == param_count(ref) == 35_746_307


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="ddpm-cifar10"):
        unet_preset("cifar")


def test_preset_overrides():
    cfg = unet_preset("ddpm-cifar10", dropout=0.0, learned_sigma=True)
    assert cfg.dropout == 0.0 and cfg.output_channels == 6
    assert PRESETS["ddpm-cifar10"].dropout == 0.1  # the preset itself is untouched
    with pytest.raises(TypeError, match="no_such_field"):
        unet_preset("ddpm-cifar10", no_such_field=1)


def test_config_round_trip():
    cfg = unet_preset("mnist-28", learned_sigma=True)
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("channels", [1, 3, 5])
def test_odd_channel_counts(channels):
    cfg = TINY.replace(in_channels=channels)
    model = UNet(cfg)
    out = model(torch.randn(2, channels, 8, 8), torch.tensor([1, 2]))
    assert out.shape == (2, channels, 8, 8)


def test_learned_sigma_doubles_output_channels():
    cfg = TINY.replace(in_channels=5, learned_sigma=True)
    assert cfg.output_channels == 10
    assert UNet(cfg)(torch.randn(1, 5, 8, 8), torch.tensor([3])).shape == (1, 10, 8, 8)
    assert TINY.replace(out_channels=2, learned_sigma=True).output_channels == 4


def test_rectangular_and_larger_inputs():
    model = UNet(TINY)
    assert model(torch.randn(1, 3, 8, 16), torch.tensor([3])).shape == (1, 3, 8, 16)


# --------------------------------------------------------------------------- timestep embedding
def test_timestep_embedding_formula_sin_then_cos():
    dim, half = 16, 8
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, dim)
    for row, tv in zip(emb, t.tolist(), strict=True):
        for i in range(half):
            freq = math.exp(-math.log(10000.0) * i / (half - 1))
            assert row[i].item() == pytest.approx(math.sin(tv * freq), abs=1e-4)
            assert row[half + i].item() == pytest.approx(math.cos(tv * freq), abs=1e-4)
    # t = 0: all sines 0, all cosines 1
    assert torch.equal(emb[0, :half], torch.zeros(half)) and torch.equal(emb[0, half:], torch.ones(half))


def test_timestep_embedding_variants():
    t = torch.arange(5)
    flipped = timestep_embedding(t, 8, flip_sin_to_cos=True)
    plain = timestep_embedding(t, 8)
    assert torch.allclose(flipped, torch.cat([plain[:, 4:], plain[:, :4]], dim=1))
    assert timestep_embedding(t, 9).shape == (5, 9)
    with pytest.raises(ValueError, match="shape"):
        timestep_embedding(torch.zeros(2, 2), 8)


def test_distinct_timesteps_give_distinct_embeddings():
    emb = timestep_embedding(torch.arange(1000), 128)
    dists = torch.cdist(emb, emb) + torch.eye(1000) * 1e3
    assert dists.min() > 1e-3


# ------------------------------------------------------------------------------- initialisation
def test_fresh_model_predicts_zero():
    """The last conv of each branch and conv_out start at zero (paper initialisation)."""
    model = UNet(TINY)
    assert torch.count_nonzero(model(torch.randn(2, 3, 8, 8), torch.tensor([5, 6]))) == 0
    for res in model.down[0].res:
        assert torch.count_nonzero(res.conv2.weight) == 0


def test_output_depends_on_t():
    model = randomise(UNet(TINY)).eval()
    x = torch.randn(1, 3, 8, 8).expand(3, -1, -1, -1)
    out = model(x, torch.tensor([0, 1, 500]))
    assert not torch.allclose(out[0], out[1], atol=1e-6)
    assert not torch.allclose(out[1], out[2], atol=1e-6)
    # scalar t is broadcast over the batch
    assert torch.allclose(model(x, torch.tensor(1)), model(x, torch.tensor([1, 1, 1])))


def test_gradients_reach_every_parameter():
    for cfg in (TINY, TINY.replace(scale_shift_norm=True, learned_sigma=True)):
        model = randomise(UNet(cfg))
        out = model(torch.randn(2, 3, 8, 8), torch.tensor([3, 700]))
        out.square().mean().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_determinism_under_seed():
    def run():
        torch.manual_seed(123)
        model = randomise(UNet(TINY)).train()  # dropout active
        return model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))

    assert torch.equal(run(), run())


def _set_kernels(model: UNet, *, kernel: str = "sdpa", subpixel: bool = False) -> UNet:
    for m in model.modules():
        if isinstance(m, AttentionBlock):
            m.kernel = kernel
        elif isinstance(m, Upsample):
            m.subpixel = subpixel
    return model


@pytest.mark.parametrize(
    "variant", ["channels_last", "checkpoint", "matmul_attention", "subpixel_upsample", "all_cpu_kernels"]
)
def test_layouts_and_kernels_do_not_change_results(variant):
    """Every runtime variant computes the reference function (NCHW, SDPA, nearest + conv), with its gradients."""
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([10, 20, 30, 40])

    def run(model: UNet) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x, t)
        out.square().sum().backward()
        return out, torch.cat([p.grad.flatten() for p in model.parameters()])

    cfg = TINY.replace(dropout=0.0, use_checkpoint=variant == "checkpoint")
    model = randomise(UNet(cfg))
    if variant in ("channels_last", "all_cpu_kernels"):
        model.to(memory_format=torch.channels_last)
        assert model.memory_format() == torch.channels_last
    _set_kernels(model, kernel="matmul" if "attention" in variant or variant == "all_cpu_kernels" else "sdpa",
                 subpixel=variant in ("subpixel_upsample", "all_cpu_kernels"))
    ref_out, ref_grad = run(randomise(UNet(TINY.replace(dropout=0.0))))
    out, grad = run(model)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_upsample_conv_is_nearest_upsample_then_conv(channels_last):
    """The phase decomposition against F.interpolate + conv2d, values and gradients, odd sizes included."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 6, generator=g, requires_grad=True)
    weight = torch.randn(4, 5, 3, 3, generator=g, requires_grad=True)
    bias = torch.randn(4, generator=g, requires_grad=True)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    ref = F.conv2d(F.interpolate(xin, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)
    out = upsample_conv_subpixel(xin, weight, bias, _SUBPIXEL_TAPS)
    assert out.shape == (3, 4, 14, 12)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn(ref.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, (x, weight, bias), grad_out),
                    torch.autograd.grad(ref, (x, weight, bias), grad_out), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_subpixel_taps_sum_to_the_kernel():
    """Each output phase sees every 3x3 tap exactly once, so the 2x2 taps of a phase sum to the 3x3 sum."""
    taps = _SUBPIXEL_TAPS.view(2, 2, 4, 9)  # [a, b, (p q), (k l)]
    assert torch.equal(taps.sum(2), torch.ones(2, 2, 9))
    # Phase (0, 0), tap (0, 0) is kernel tap (0, 0) alone: output (0, 0) sees input (-1, -1) only through it.
    assert torch.equal(taps[0, 0, 0], torch.eye(9)[0])


def test_multi_head_attention():
    cfg = TINY.replace(num_heads=4)
    out = randomise(UNet(cfg))(torch.randn(1, 3, 8, 8), torch.tensor([1]))
    assert out.shape == (1, 3, 8, 8)
    assert UNet(TINY.replace(head_channels=8)).down[1].attn[0].heads == 4


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_groups": 5}, r"not divisible by num_groups=5"),
        ({"image_size": 9}, r"image_size 9 is not divisible by 2"),
        ({"attention_resolutions": (3,)}, r"attention_resolutions \[3\] match no level"),
        ({"num_heads": 3}, r"num_heads=3 does not divide"),
        ({"channel_mult": ()}, r"channel_mult"),
        ({"dropout": 1.5}, r"dropout"),
        ({"downsample_padding": 2}, r"downsample_padding"),
    ],
)
def test_bad_config_raises(changes, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**changes)


def test_bad_input_raises_clear_errors():
    model = UNet(unet_preset("mnist-28"))
    with pytest.raises(ValueError, match=r"input size 30x30 is not divisible by 4"):
        model(torch.randn(1, 1, 30, 30), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"built for 1 input channels, got x_t with 3"):
        model(torch.randn(1, 3, 28, 28), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        model(torch.randn(2, 1, 28, 28), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.randn(1, 28, 28), torch.tensor([0]))
