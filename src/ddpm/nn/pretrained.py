"""Load diffusers-format DDPM U-Nets (e.g. ``google/ddpm-cifar10-32``) into :class:`ddpm.nn.UNet`.

A diffusers model folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or
``.bin``). The config is translated field by field into a :class:`UNetConfig`; every tensor is
renamed onto ours. Anything without an exact counterpart is refused with an error naming the
field, value or tensor: this module never silently drops or invents weights.

``.bin`` files are read with ``torch.load(..., weights_only=True)`` only (no pickled code).
diffusers itself is not needed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ddpm.errors import UserError
from ddpm.nn.unet import UNet, UNetConfig

__all__ = [
    "PretrainedError",
    "config_from_diffusers",
    "config_to_diffusers",
    "convert_diffusers_state_dict",
    "load_pretrained",
    "to_diffusers_state_dict",
]

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class PretrainedError(UserError):
    """A diffusers folder that cannot be mapped exactly onto :class:`UNet`."""


# Values a config.json field may take when absent: diffusers' own UNet2DModel defaults.
_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True, "down_block_types": None, "mid_block_type": "UNetMidBlock2D",
    "up_block_types": None, "block_out_channels": None, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}
# Fields that must hold exactly this value (anything else is not the DDPM architecture).
_REQUIRED = {
    "center_input_sample": False, "time_embedding_type": "positional", "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv",
    "class_embed_type": None,
}
# A key diffusers ignores (leading underscore) that ddpm writes on export: the label of the null
# class of a class-conditional model trained for classifier-free guidance (its last embedding row).
NULL_CLASS_KEY = "_ddpm_null_class"
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}


def config_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
    """Translate a diffusers ``UNet2DModel`` config.json dict into a :class:`UNetConfig`."""

    def fail(field: str, msg: str) -> None:
        raise PretrainedError(f"config.json field {field!r}: {msg}")

    cls = cfg.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        fail("_class_name", f"{cls!r} is not supported; only 'UNet2DModel' maps onto ddpm.nn.UNet")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _DEFAULTS)
    num_class_embeds = cfg.get("num_class_embeds")
    null_class = cfg.get(NULL_CLASS_KEY)
    if num_class_embeds is not None and (not isinstance(num_class_embeds, int) or num_class_embeds < 1):
        raise PretrainedError(f"config.json field 'num_class_embeds': {num_class_embeds!r} is not a positive integer")
    if null_class is not None and null_class != (num_class_embeds or 0) - 1:
        raise PretrainedError(f"config.json field {NULL_CLASS_KEY!r}: {null_class!r} is not the last class "
                              f"embedding ({(num_class_embeds or 0) - 1})")
    if unknown:
        fail(unknown[0], f"unknown field(s) {unknown}; refusing to guess their meaning")
    c = {**_DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")}}

    for key, want in _REQUIRED.items():
        if c[key] != want:
            fail(key, f"value {c[key]!r} is not supported (the DDPM U-Net needs {want!r})")
    if c["act_fn"] not in ("silu", "swish"):
        fail("act_fn", f"value {c['act_fn']!r} is not supported (only 'silu')")
    shift = c["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        fail("resnet_time_scale_shift", f"value {shift!r} is not supported ('default' or 'scale_shift')")
    if c["attn_norm_num_groups"] not in (None, c["norm_num_groups"]):
        fail("attn_norm_num_groups", f"value {c['attn_norm_num_groups']!r} differs from norm_num_groups")
    if shift == "scale_shift" and c["add_attention"] and c["attn_norm_num_groups"] is None:
        fail(
            "attn_norm_num_groups",
            "null with resnet_time_scale_shift='scale_shift' makes diffusers drop the GroupNorm of the "
            "middle attention block; ddpm.nn.UNet always normalises before attention",
        )
    if c["downsample_padding"] not in (0, 1):
        fail("downsample_padding", f"value {c['downsample_padding']!r} is not supported (0 or 1)")

    boc = c["block_out_channels"]
    if not boc:
        fail("block_out_channels", "missing or empty")
    base = int(boc[0])
    if any(int(ch) % base for ch in boc):
        fail("block_out_channels", f"{list(boc)} are not all integer multiples of the first entry {base}")
    n = len(boc)
    down, up = c["down_block_types"], c["up_block_types"]
    if down is None or len(down) != n:
        fail("down_block_types", f"{down!r} must list one block type per block_out_channels entry ({n})")
    if up is None or len(up) != n:
        fail("up_block_types", f"{up!r} must list one block type per block_out_channels entry ({n})")
    for i, b in enumerate(down):
        if b not in _DOWN:
            fail("down_block_types", f"block type {b!r} (index {i}) is not supported; known: {sorted(_DOWN)}")
    for i, b in enumerate(up):
        if b not in _UP:
            fail("up_block_types", f"block type {b!r} (index {i}) is not supported; known: {sorted(_UP)}")
    attn_down = [_DOWN[b] for b in down]
    attn_up = [_UP[b] for b in reversed(up)]
    if attn_down != attn_up:
        fail("up_block_types", f"{list(up)} does not mirror the attention placement of {list(down)}")

    size = c["sample_size"]
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            fail("sample_size", f"{size!r}: only square images are supported")
        size = size[0]
    if not isinstance(size, int):
        fail("sample_size", f"{size!r}: an integer is needed to place attention on levels")
    if size % 2 ** (n - 1):
        fail("sample_size", f"{size} is not divisible by 2**{n - 1}")
    resolutions = tuple(size // 2**i for i, a in enumerate(attn_down) if a)
    head_dim = c["attention_head_dim"]
    try:
        return UNetConfig(
            in_channels=int(c["in_channels"]),
            out_channels=int(c["out_channels"]),
            base_channels=base,
            channel_mult=tuple(int(ch) // base for ch in boc),
            num_res_blocks=int(c["layers_per_block"]),
            attention_resolutions=resolutions,
            image_size=size,
            num_heads=1,
            head_channels=None if head_dim is None else int(head_dim),
            dropout=float(c["dropout"]),
            num_groups=int(c["norm_num_groups"]),
            norm_eps=float(c["norm_eps"]),
            scale_shift_norm=shift == "scale_shift",
            mid_attention=bool(c["add_attention"]),
            time_embed_dim=None if c["time_embedding_dim"] is None else int(c["time_embedding_dim"]),
            embed_freq_shift=float(c["freq_shift"]),
            embed_flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
            downsample_padding=1 if int(c["downsample_padding"]) == 1 else 0,  # validated above: 0 or 1
            num_classes=None if num_class_embeds is None else num_class_embeds - int(null_class is not None),
            null_class=num_class_embeds is None or null_class is not None,
        )
    except ValueError as e:
        raise PretrainedError(f"config.json does not describe a valid U-Net: {e}") from e


def config_to_diffusers(config: UNetConfig) -> dict[str, Any]:
    """The diffusers ``UNet2DModel`` keyword arguments of the same architecture as ``config``.

    The inverse of :func:`config_from_diffusers` (used by the benchmark and the tests).
    """
    attn = config.attention_levels
    return {
        "sample_size": config.image_size,
        "in_channels": config.in_channels,
        "out_channels": config.output_channels,
        "block_out_channels": list(config.level_channels),
        "layers_per_block": config.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "attention_head_dim": _single_head(config) if config.head_channels is None else config.head_channels,
        "norm_num_groups": config.num_groups,
        "attn_norm_num_groups": config.num_groups if config.scale_shift_norm else None,
        "norm_eps": config.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if config.scale_shift_norm else "default",
        "add_attention": config.mid_attention,
        "time_embedding_dim": config.time_embed_dim,
        "freq_shift": config.embed_freq_shift,
        "flip_sin_to_cos": config.embed_flip_sin_to_cos,
        "downsample_padding": config.downsample_padding,
        "dropout": config.dropout,
        "act_fn": "silu",
        "time_embedding_type": "positional",
        "num_class_embeds": config.num_class_embeds or None,
    }


def _single_head(config: UNetConfig) -> int | None:
    if config.num_heads == 1:
        return None  # diffusers: one head spanning all channels
    widths = {c for c, a in zip(config.level_channels, config.attention_levels, strict=True) if a}
    if config.mid_attention:
        widths.add(config.level_channels[-1])
    dims = {c // config.num_heads for c in widths}
    if len(dims) > 1:
        raise ValueError(
            f"num_heads={config.num_heads} gives head sizes {sorted(dims)}; diffusers needs one "
            "attention_head_dim: set head_channels instead"
        )
    return dims.pop() if dims else None


# Our module names -> diffusers' (applied in order to the prefix of each of our keys).
_PREFIX_RULES = [
    (re.compile(r"^time_embed\.fc([12])\."), r"time_embedding.linear_\1."),
    (re.compile(r"^class_embed\."), "class_embedding."),
    (re.compile(r"^(down|up)\.(\d+)\.res\.(\d+)\."), r"\1_blocks.\2.resnets.\3."),
    (re.compile(r"^(down|up)\.(\d+)\.attn\.(\d+)\."), r"\1_blocks.\2.attentions.\3."),
    (re.compile(r"^down\.(\d+)\.resample\."), r"down_blocks.\1.downsamplers.0."),
    (re.compile(r"^up\.(\d+)\.resample\."), r"up_blocks.\1.upsamplers.0."),
    (re.compile(r"^mid\.res1\."), "mid_block.resnets.0."),
    (re.compile(r"^mid\.res2\."), "mid_block.resnets.1."),
    (re.compile(r"^mid\.attn\."), "mid_block.attentions.0."),
    (re.compile(r"^norm_out\."), "conv_norm_out."),
]
_LEAF_RULES = {"emb_proj": "time_emb_proj", "skip": "conv_shortcut", "norm": "group_norm", "proj": "to_out.0"}
# Pre-0.14 diffusers attention names -> current ones.
_OLD_ATTENTION = re.compile(r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_OLD_TO_NEW = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _diffusers_names(our_key: str) -> list[str]:
    """The diffusers tensor name(s) our parameter ``our_key`` is made of (3 for a fused qkv)."""
    key = our_key
    for pattern, repl in _PREFIX_RULES:
        key, hits = pattern.subn(repl, key)
        if hits:
            break
    *path, leaf, kind = key.split(".")
    if leaf == "qkv":
        return [".".join([*path, name, kind]) for name in ("to_q", "to_k", "to_v")]
    return [".".join([*path, _LEAF_RULES.get(leaf, leaf), kind])]


def _normalise_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        m = _OLD_ATTENTION.match(name)
        new = f"{m.group(1)}{_OLD_TO_NEW[m.group(2)]}.{m.group(3)}" if m else name
        if new in out:
            raise PretrainedError(f"tensor {name!r} duplicates {new!r} (old and new attention names mixed)")
        out[new] = tensor
    return out


def convert_diffusers_state_dict(state: Mapping[str, Tensor], model: UNet) -> dict[str, Tensor]:
    """Rename a diffusers ``UNet2DModel`` state dict onto ``model``'s; refuse any mismatch."""
    state = _normalise_names(state)
    ours = model.state_dict()
    sources = {key: _diffusers_names(key) for key in ours}
    expected = {name for names in sources.values() for name in names}
    missing = sorted(expected - state.keys())
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise PretrainedError(f"missing tensor(s) in checkpoint: {missing[:5]}{more}")
    unexpected = sorted(state.keys() - expected)
    if unexpected:
        raise PretrainedError(
            f"unexpected tensor(s) in checkpoint, no counterpart in ddpm.nn.UNet: "
            f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    converted: dict[str, Tensor] = {}
    for key, names in sources.items():
        parts = []
        for name in names:
            t = state[name]
            if t.ndim == 4 and ours[key].ndim == 2 and t.shape[2:] == (1, 1):
                t = t[:, :, 0, 0]  # attention projections stored as 1x1 convs
            parts.append(t)
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tensor.shape != ours[key].shape:
            shapes = ", ".join(f"{n} {tuple(state[n].shape)}" for n in names)
            raise PretrainedError(
                f"shape mismatch: checkpoint {shapes} cannot fill {key} {tuple(ours[key].shape)}"
            )
        converted[key] = tensor
    return converted


def to_diffusers_state_dict(model: UNet) -> dict[str, Tensor]:
    """``model``'s weights under diffusers' ``UNet2DModel`` names (the inverse of :func:`convert_diffusers_state_dict`).

    A fused qkv projection is split into ``to_q``, ``to_k`` and ``to_v``; tensors are contiguous CPU copies.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in model.state_dict().items():
        names = _diffusers_names(key)
        parts = tensor.chunk(len(names), dim=0) if len(names) > 1 else (tensor,)
        for name, part in zip(names, parts, strict=True):
            out[name] = part.detach().to("cpu").contiguous().clone()
    return out


def _read_weights(folder: Path) -> dict[str, Tensor]:
    for name in WEIGHT_FILES:
        file = folder / name
        if not file.is_file():
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(file), device="cpu")
        state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise PretrainedError(f"{file}: expected a state dict, got {type(state).__name__}")
        return dict(state)
    present = sorted(p.name for p in folder.iterdir())
    raise PretrainedError(f"{folder}: no weights file; looked for {list(WEIGHT_FILES)}, found {present}")


def load_pretrained(path: str | Path) -> UNet:
    """Build a :class:`UNet` from a diffusers-format folder; its config is ``model.config``.

    ``path`` is the model folder (``config.json`` + weights) or a pipeline folder with a
    ``unet/`` sub-folder. The model is returned in eval mode, on the CPU, in float32 and NCHW
    (``ddpm.nn.policy.resolve_policy(device).prepare(model)`` sets it up for a device).
    """
    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / "unet" / "config.json").is_file():
        folder = folder / "unet"
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise PretrainedError(f"{folder}: no config.json")
    with open(cfg_file) as f:
        config = config_from_diffusers(json.load(f))
    model = UNet(config)
    state = convert_diffusers_state_dict(_read_weights(folder), model)
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return model.eval()
