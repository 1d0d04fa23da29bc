"""Loading diffusers-format DDPM checkpoints: exact outputs, and clear refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddpm.nn import PretrainedError, UNet, load_pretrained, param_count, unet_preset
from ddpm.nn.pretrained import config_from_diffusers, config_to_diffusers

DOWN = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
UP = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
# google/ddpm-cifar10-32's config.json, as published.
CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": list(DOWN),
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": list(UP),
}


def diffusers_unet(seed: int = 0, **overrides):
    """A diffusers UNet2DModel with every weight random (also the ones it zero-initialises)."""
    from diffusers import UNet2DModel

    cfg = {k: v for k, v in {**CIFAR10_CONFIG, **overrides}.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    model = UNet2DModel(**cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(p[0].numel(), 1) ** 0.5)
    return model


SMALL = {"block_out_channels": [32, 64, 64, 64], "norm_num_groups": 8}


def assert_same_outputs(ref, ours, *, channels, size, batch=2, atol=1e-5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, channels, size, size, generator=g)
    with torch.no_grad():
        for t in ([0, 1], [10, 999], [500, 250]):
            t = torch.tensor(t[:batch])
            expected = ref(x, t).sample
            torch.testing.assert_close(ours(x, t), expected, rtol=0, atol=atol)


VARIANTS = [
    {},
    {"resnet_time_scale_shift": "scale_shift", "attn_norm_num_groups": 8},
    {"attention_head_dim": 16, "downsample_padding": 1, "dropout": 0.1},
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_reduced_width_cifar10_matches_diffusers(tmp_path, overrides):
    ref = diffusers_unet(**SMALL, **overrides)
    ref.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert ours.config.scale_shift_norm == ("resnet_time_scale_shift" in overrides)
    assert param_count(ours) == param_count(ref)
    assert not ours.training
    assert_same_outputs(ref, ours, channels=3, size=32)


def test_full_size_cifar10_matches_diffusers(tmp_path):
    ref = diffusers_unet()
    ref.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    # dropout is not in the released config.json (diffusers default 0.0)
    assert ours.config == unet_preset("ddpm-cifar10", dropout=0.0, out_channels=3)
    assert param_count(ours) == param_count(ref) == 35_746_307
    assert_same_outputs(ref, ours, channels=3, size=32, batch=2)


def test_bin_weights_and_old_attention_names(tmp_path):
    """The .bin variant (read with weights_only=True), with pre-0.14 attention tensor names."""
    ref = diffusers_unet(**SMALL)
    ref.save_pretrained(tmp_path, safe_serialization=False)
    file = tmp_path / "diffusion_pytorch_model.bin"
    assert file.is_file() and not (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in torch.load(file, weights_only=True).items():
        for new, legacy in old.items():
            k = k.replace(f".{new}.", f".{legacy}.")
        state[k] = v
    assert any(".query." in k for k in state)
    torch.save(state, file)
    assert_same_outputs(ref, load_pretrained(tmp_path), channels=3, size=32)


def test_one_channel_small_config(tmp_path):
    ref = diffusers_unet(
        in_channels=1,
        out_channels=2,
        sample_size=28,
        block_out_channels=[16, 32, 64],
        norm_num_groups=8,
        down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
        layers_per_block=1,
    )
    ref.save_pretrained(tmp_path / "unet")  # a pipeline folder with a unet/ sub-folder
    ours = load_pretrained(tmp_path)
    assert ours.config.attention_resolutions == (7,) and ours.config.output_channels == 2
    assert_same_outputs(ref, ours, channels=1, size=28)


# -------------------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    diffusers_unet(**SMALL).save_pretrained(folder)
    return folder


def copy_with(saved, tmp_path, *, config=None, state=None):
    cfg = json.loads((saved / "config.json").read_text())
    tensors = load_file(saved / "diffusion_pytorch_model.safetensors")
    if config:
        cfg.update(config)
    if state:
        state(tensors)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    return tmp_path


def test_unknown_block_type_is_refused(saved, tmp_path):
    folder = copy_with(
        saved,
        tmp_path,
        config={"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]},
    )
    with pytest.raises(PretrainedError, match=r"down_block_types.*'CrossAttnDownBlock2D' \(index 1\)"):
        load_pretrained(folder)


def test_missing_tensor_is_refused(saved, tmp_path):
    folder = copy_with(saved, tmp_path, state=lambda s: s.pop("down_blocks.0.resnets.1.conv2.weight"))
    with pytest.raises(PretrainedError, match=r"missing tensor.*down_blocks\.0\.resnets\.1\.conv2\.weight"):
        load_pretrained(folder)


def test_unexpected_tensor_is_refused(saved, tmp_path):
    folder = copy_with(saved, tmp_path, state=lambda s: s.update({"mid_block.extra.weight": torch.zeros(3)}))
    with pytest.raises(PretrainedError, match=r"unexpected tensor.*mid_block\.extra\.weight"):
        load_pretrained(folder)


def test_wrong_shape_is_refused(saved, tmp_path):
    def shrink(s):
        s["conv_in.weight"] = s["conv_in.weight"][:, :2].contiguous()

    with pytest.raises(PretrainedError, match=r"shape mismatch.*conv_in\.weight \(32, 2, 3, 3\)"):
        load_pretrained(copy_with(saved, tmp_path, state=shrink))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"_class_name": "UNet2DConditionModel"}, r"_class_name"),
        ({"time_embedding_type": "fourier"}, r"time_embedding_type.*'fourier'"),
        ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]}, r"does not mirror"),
        ({"class_embed_type": "timestep"}, r"class_embed_type"),
        ({"cross_attention_dim": 768}, r"unknown field.*cross_attention_dim"),
        ({"norm_num_groups": 5}, r"num_groups=5"),
        ({"block_out_channels": [32, 48, 64, 64]}, r"block_out_channels.*integer multiples"),
        ({"sample_size": [32, 64]}, r"sample_size.*square"),
        ({"resnet_time_scale_shift": "scale_shift"}, r"attn_norm_num_groups"),
    ],
)
def test_non_ddpm_configs_are_refused(changes, message):
    with pytest.raises(PretrainedError, match=message):
        config_from_diffusers({**CIFAR10_CONFIG, **SMALL, **changes})


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(PretrainedError, match="no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CIFAR10_CONFIG))
    with pytest.raises(PretrainedError, match="no weights file"):
        load_pretrained(tmp_path)


def test_loaded_model_keeps_training():
    """Loaded weights live in an ordinary UNet (trainable, state dict round trip)."""
    model = UNet(unet_preset("digits-8"))
    assert set(UNet(model.config).state_dict()) == set(model.state_dict())


@pytest.mark.parametrize(
    "config",
    [
        unet_preset("ddpm-cifar10"),
        unet_preset("mnist-28", scale_shift_norm=True, learned_sigma=True),
        unet_preset("digits-8", num_heads=2, mid_attention=False),
    ],
)
def test_config_round_trip_through_diffusers(config):
    from diffusers import UNet2DModel

    kwargs = config_to_diffusers(config)
    back = config_from_diffusers(kwargs)
    assert back == config.replace(
        out_channels=config.output_channels,
        learned_sigma=False,
        head_channels=back.head_channels,
        num_heads=1,
    )
    with torch.device("meta"):
        assert param_count(UNet2DModel(**kwargs)) == param_count(UNet(config))
