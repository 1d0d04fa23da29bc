"""Class conditioning and classifier-free guidance: the arithmetic, the networks, and diffusers' layout."""

from pathlib import Path

import pytest
import torch

from ddpm import GaussianDiffusion, make_betas
from ddpm.guidance import Guided
from ddpm.nn import MLPConfig, MLPDenoiser, UNet, unet_preset
from ddpm.processes.gaussian import eps_from_x0, x0_from_prediction

TINY = dict(in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
            image_size=8, num_groups=4)


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def conditional_unet(num_classes: int = 3, **kw) -> UNet:
    torch.manual_seed(0)
    return randomised(UNet(unet_preset("digits-8", **TINY, num_classes=num_classes, **kw)))


def test_guidance_weights_0_and_1_are_the_unconditional_and_conditional_models() -> None:
    net = conditional_unet()
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 5, 50, 99]), torch.tensor([0, 1, 2, 1])
    null = torch.full_like(y, 3)
    cond, uncond = net(x, t, y=y), net(x, t, y=null)
    assert not torch.allclose(cond, uncond)
    torch.testing.assert_close(Guided(net, 0.0, 3)(x, t, y=y), uncond)
    torch.testing.assert_close(Guided(net, 1.0, 3)(x, t, y=y), cond)
    # w = 2.5 through the one batched call of 2B equals the formula on two separate calls
    torch.testing.assert_close(Guided(net, 2.5, 3)(x, t, y=y), uncond + 2.5 * (cond - uncond), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net(x, t), uncond)  # no labels = the null class


def test_learned_variance_is_taken_from_the_conditional_half() -> None:
    net = conditional_unet(learned_sigma=True)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 70]), torch.tensor([2, 0])
    cond, uncond = net(x, t, y=y), net(x, t, y=torch.full_like(y, 3))
    out = Guided(net, 3.0, 3, prediction_channels=1)(x, t, y=y)
    torch.testing.assert_close(out[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 1:], cond[:, 1:], atol=1e-5, rtol=1e-5)  # a 2B batch rounds differently


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_guiding_x0_or_v_outputs_is_guiding_eps(prediction: str) -> None:
    """At fixed x_t, x_0 and v are affine in eps: combining them is combining the implied eps."""
    x_t = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    alpha, sigma = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    out_c, out_u, w = torch.randn_like(x_t), torch.randn_like(x_t), 3.0
    eps = lambda out: eps_from_x0(x_t, x0_from_prediction(prediction, out, x_t, alpha, sigma), alpha, sigma)  # noqa: E731
    guided_output = out_u + w * (out_c - out_u)
    torch.testing.assert_close(eps(guided_output), eps(out_u) + w * (eps(out_c) - eps(out_u)))


def test_labels_are_checked() -> None:
    net = conditional_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"0\.\.3"):
        net(x, t, y=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="unconditional"):
        UNet(unet_preset("digits-8", **TINY))(x, t, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs class labels"):
        Guided(net, 2.0, 3)(x, t)


def test_conditional_mlp_and_guided_sampling_runs_with_every_label() -> None:
    torch.manual_seed(0)
    mlp = randomised(MLPDenoiser(MLPConfig(dim=2, hidden=16, num_blocks=1, num_classes=2)))
    d = GaussianDiffusion(make_betas("cosine", 50))
    from ddpm import sample

    y = torch.tensor([0, 1, 0, 1])
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    a = sample(d, Guided(mlp, 2.0, 2), (4, 2), sampler="ddim", steps=10, y=y, generator=gens(), clip_denoised=False)
    b = sample(d, mlp, (4, 2), sampler="ddim", steps=10, y=y, generator=gens(), clip_denoised=False)
    assert a.shape == (4, 2) and torch.isfinite(a).all() and not torch.allclose(a, b)


def test_conditional_unet_exports_to_diffusers_num_class_embeds(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers")
    from ddpm.nn import load_pretrained
    from ddpm.nn.pretrained import config_to_diffusers, to_diffusers_state_dict

    net = conditional_unet(num_classes=5)
    kwargs = config_to_diffusers(net.config)
    assert kwargs["num_class_embeds"] == 6  # five classes and the null class
    theirs = diffusers.UNet2DModel(**kwargs).eval()
    theirs.load_state_dict(to_diffusers_state_dict(net))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 40, 90]), torch.tensor([4, 0, 5])
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, class_labels=y).sample, net(x, t, y=y), atol=1e-5, rtol=1e-5)
    theirs.save_pretrained(str(tmp_path / "unet"))
    back = load_pretrained(tmp_path / "unet")  # without ddpm's null-class marker: 6 plain classes
    assert back.config.num_classes == 6 and not back.config.null_class
    with torch.no_grad():
        torch.testing.assert_close(back(x, t, y=y), net(x, t, y=y), atol=1e-5, rtol=1e-5)
