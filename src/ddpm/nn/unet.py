"""The U-Net noise predictor of Ho et al. 2020 (Appendix B), built from a typed config.

Layout (the paper's, and the one of diffusers' ``UNet2DModel`` with ``DownBlock2D`` /
``AttnDownBlock2D`` / ``UpBlock2D`` / ``AttnUpBlock2D``, so released checkpoints load one to one):

* ``conv_in`` (3x3) to ``base_channels``;
* one *level* per entry of ``channel_mult``, at resolutions ``image_size / 2**i``: on the way down
  ``num_res_blocks`` residual blocks (each followed by self-attention when the level's
  resolution is in ``attention_resolutions``), then a stride-2 3x3 conv except at the last level;
* a middle block: residual block, self-attention, residual block;
* on the way up ``num_res_blocks + 1`` residual blocks per level, each fed the concatenation of
  the running features and one skip tensor saved on the way down, then nearest x2 + 3x3 conv;
* GroupNorm, SiLU, ``conv_out`` (3x3).

The timestep ``t`` (0-based indices ``0..T-1``, shape ``[B]``) is embedded sinusoidally
(:func:`ddpm.nn.embedding.timestep_embedding`, dimension ``base_channels``), passed through a
two-layer MLP to ``4 * base_channels`` and projected into every residual block: added after the
first conv, or as a scale and shift after the second GroupNorm (``scale_shift_norm``, AdaGN of
Dhariwal & Nichol 2021). A class-conditional network (``num_classes``) adds a learned embedding of
the label ``y`` to the time embedding (as improved-diffusion and diffusers' ``num_class_embeds``);
label ``num_classes`` is the "null" class that classifier-free guidance uses for p(x).

Initialisation follows the paper's code: Xavier-uniform weights, zero biases, and the last conv
of every residual block, the attention output projection and ``conv_out`` set to zero, so every
block starts as the identity and the untrained network predicts zeros.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ddpm.errors import ConfigError
from ddpm.nn.embedding import as_timesteps, timestep_embedding

__all__ = ["UNetConfig", "UNet", "PRESETS", "unet_preset", "param_count"]


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of :class:`UNet`. Frozen; derive variants with :meth:`replace`."""

    in_channels: int = 3
    out_channels: int | None = None  # None: in_channels; doubled when learned_sigma
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # one level per entry
    num_res_blocks: int = 2  # per level on the way down (+1 on the way up)
    attention_resolutions: tuple[int, ...] = (16,)  # spatial sizes (in pixels) that get self-attention
    image_size: int = 32  # training resolution; places attention_resolutions on levels
    num_heads: int = 1  # attention heads, used when head_channels is None
    head_channels: int | None = None  # channels per head; overrides num_heads
    dropout: float = 0.0  # in every residual block, before its last conv
    num_groups: int = 32  # GroupNorm groups; must divide every channel count
    norm_eps: float = 1e-6  # GroupNorm epsilon (1e-6 in the paper's code)
    scale_shift_norm: bool = False  # AdaGN: timestep as scale and shift after the 2nd GroupNorm
    learned_sigma: bool = False  # double the output: prediction, then variance interpolation v
    mid_attention: bool = True  # self-attention between the two middle residual blocks
    time_embed_dim: int | None = None  # None: 4 * base_channels
    embed_freq_shift: float = 1.0  # see timestep_embedding; 1 as in the paper's code
    embed_flip_sin_to_cos: bool = False  # cos first instead of sin first
    downsample_padding: Literal[0, 1] = 0  # 0: pad right/bottom only (TF "SAME", paper); 1: symmetric
    use_checkpoint: bool = False  # gradient checkpointing of every block (saves memory, costs time)
    # How the network runs (memory layout, autocast) is not architecture: see ddpm.nn.policy.
    num_classes: int | None = None  # class-conditional: labels 0..num_classes-1, plus the null class
    null_class: bool = True  # whether label num_classes exists as the "no label" class (guidance needs it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        self.validate()

    # ----------------------------------------------------------------------------------- derived
    @property
    def output_channels(self) -> int:
        out = self.in_channels if self.out_channels is None else self.out_channels
        return out * 2 if self.learned_sigma else out

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def level_resolutions(self) -> tuple[int, ...]:
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mult)))

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        return tuple(r in self.attention_resolutions for r in self.level_resolutions)

    @property
    def emb_dim(self) -> int:
        return self.time_embed_dim or 4 * self.base_channels

    @property
    def num_class_embeds(self) -> int:
        """Rows of the class embedding (0 when unconditional): the classes and, if any, the null class."""
        return 0 if self.num_classes is None else self.num_classes + int(self.null_class)

    @property
    def size_divisor(self) -> int:
        """Input height and width must be multiples of this (one halving per level but the last)."""
        return 2 ** (len(self.channel_mult) - 1)

    def heads_for(self, channels: int) -> int:
        if self.head_channels is None:
            return self.num_heads
        return channels // self.head_channels

    # ------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ConfigError(f"UNetConfig: {msg}")

        positive = ("in_channels", "base_channels", "num_res_blocks", "image_size", "num_groups", "num_heads")
        for name in positive:
            if int(getattr(self, name)) < 1:
                fail(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes is not None and self.num_classes < 1:
            fail(f"num_classes must be >= 1 or None, got {self.num_classes}")
        if self.out_channels is not None and self.out_channels < 1:
            fail(f"out_channels must be >= 1 or None, got {self.out_channels}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            fail(f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout}")
        if self.downsample_padding not in (0, 1):
            fail(f"downsample_padding must be 0 or 1, got {self.downsample_padding}")
        if self.image_size % self.size_divisor:
            fail(
                f"image_size {self.image_size} is not divisible by {self.size_divisor} "
                f"(= 2**{len(self.channel_mult) - 1} for {len(self.channel_mult)} levels)"
            )
        widths = sorted({self.base_channels, *self.level_channels})
        bad = [c for c in widths if c % self.num_groups]
        if bad:
            fail(
                f"channel counts {bad} are not divisible by num_groups={self.num_groups} "
                f"(GroupNorm needs whole groups); pick num_groups dividing all of {widths}"
            )
        unreachable = [r for r in self.attention_resolutions if r not in self.level_resolutions]
        if unreachable:
            fail(
                f"attention_resolutions {unreachable} match no level; the levels of image_size "
                f"{self.image_size} run at {list(self.level_resolutions)}"
            )
        attn_widths = [c for c, a in zip(self.level_channels, self.attention_levels, strict=True) if a]
        if self.mid_attention:
            attn_widths.append(self.level_channels[-1])
        for c in attn_widths:
            if self.head_channels is not None:
                if self.head_channels < 1 or c % self.head_channels:
                    fail(f"head_channels={self.head_channels} does not divide attention width {c}")
            elif c % self.num_heads:
                fail(f"num_heads={self.num_heads} does not divide attention width {c}")

    # ------------------------------------------------------------------------------ round trips
    def replace(self, **changes: Any) -> UNetConfig:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"UNetConfig has no field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"UNetConfig.from_dict: unknown field(s) {unknown}")
        return cls(**d)


# ------------------------------------------------------------------------------------ presets
PRESETS: dict[str, UNetConfig] = {
    # Ho et al. 2020, CIFAR-10: 35.7M parameters.
    "ddpm-cifar10": UNetConfig(
        in_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
        attention_resolutions=(16,), image_size=32, dropout=0.1,
    ),
    # Ho et al. 2020, CelebA-HQ / LSUN church 256x256 (google/ddpm-celebahq-256, ddpm-church-256): 113.7M.
    "ddpm-celebahq256": UNetConfig(
        in_channels=3, base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(16,), image_size=256, dropout=0.0,
    ),
    "ddpm-lsun256": UNetConfig(
        in_channels=3, base_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
        attention_resolutions=(16,), image_size=256, dropout=0.0,
    ),
    # Small CPU presets, sized for images/s on two cores rather than for sample quality.
    # 28 = 7 * 4 allows three levels (28, 14, 7); 16 channels at full resolution keep it cheap
    # (its forward GFLOP per image: benchmarks/results/speed.md), the width goes to the cheap 7x7 level.
    "mnist-28": UNetConfig(
        in_channels=1, base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
        attention_resolutions=(7,), image_size=28, dropout=0.0, num_groups=8,
    ),
    "digits-8": UNetConfig(
        in_channels=1, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(4,), image_size=8, dropout=0.0, num_groups=8,
    ),
}


def unet_preset(name: str, **overrides: Any) -> UNetConfig:
    """The named preset from :data:`PRESETS`, with ``overrides`` applied to its fields."""
    if name not in PRESETS:
        raise ConfigError(f"unknown U-Net preset {name!r}; valid names: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]


def param_count(model: nn.Module, *, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ------------------------------------------------------------------------------------ blocks
def _norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    h = norm(x)
    # Without autograd nothing needs the GroupNorm output, so SiLU may overwrite it.
    return F.silu(h, inplace=not torch.is_grad_enabled())


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of ``t`` followed by Linear-SiLU-Linear (paper, Appendix B)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.sin_dim = config.base_channels
        self.freq_shift = config.embed_freq_shift
        self.flip = config.embed_flip_sin_to_cos
        self.fc1 = nn.Linear(config.base_channels, config.emb_dim)
        self.fc2 = nn.Linear(config.emb_dim, config.emb_dim)

    def forward(self, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.sin_dim, freq_shift=self.freq_shift, flip_sin_to_cos=self.flip)
        return self.fc2(F.silu(self.fc1(emb.to(self.fc1.weight.dtype))))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + timestep, GroupNorm-SiLU-dropout-conv, + (1x1-projected) input."""

    def __init__(self, in_ch: int, out_ch: int, config: UNetConfig) -> None:
        super().__init__()
        self.scale_shift = config.scale_shift_norm
        self.dropout = config.dropout
        self.norm1 = nn.GroupNorm(config.num_groups, in_ch, eps=config.norm_eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(config.emb_dim, out_ch * (2 if self.scale_shift else 1))
        self.norm2 = nn.GroupNorm(config.num_groups, out_ch, eps=config.norm_eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, emb_act: Tensor) -> Tensor:
        """``x``: [B, in_ch, H, W]; ``emb_act``: SiLU of the time embedding, [B, emb_dim]."""
        h = self.conv1(_norm_silu(self.norm1, x))
        e = self.emb_proj(emb_act)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = torch.addcmul(shift, self.norm2(h), scale + 1.0)
            h = F.silu(h, inplace=True)
        else:
            h += e  # the conv output is saved by no backward, so in place is safe
            h = _norm_silu(self.norm2, h)
        if self.dropout and self.training:
            h = F.dropout(h, p=self.dropout, training=True)
        h = self.conv2(h)
        h += x if self.skip is None else self.skip(x)
        return h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions, with GroupNorm in front and a residual connection.

    ``kernel`` (set by :mod:`ddpm.nn.policy`) picks how softmax(q k^T / sqrt(d)) v is computed:
    ``"sdpa"``, PyTorch's fused kernels, or ``"matmul"``, two batched matmuls around a softmax, which
    on CPUs runs bf16 at the matmul units' rate where the fused CPU kernel computes in float32.
    """

    kernel: Literal["sdpa", "matmul"] = "sdpa"

    def __init__(self, channels: int, config: UNetConfig) -> None:
        super().__init__()
        self.heads = config.heads_for(channels)
        self.norm = nn.GroupNorm(config.num_groups, channels, eps=config.norm_eps)
        self.qkv = nn.Linear(channels, 3 * channels)  # q, k, v stacked along the output
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # [B, C, H, W] -> [B, HW, C]: a free view when x is channels_last.
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        q, k, v = self.qkv(tokens).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.kernel == "matmul":
            weights = (q @ k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5).softmax(dim=-1)  # [B, heads, HW, HW]
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, C/heads]
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))
        # [B, HW, C] -> [B, C, H, W] in channels_last layout, again without a copy.
        return x + out.view(b, h, w, c).permute(0, 3, 1, 2)


class Downsample(nn.Module):
    def __init__(self, channels: int, padding: int) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # TF "SAME" for stride 2: one extra row/column at the end
        return self.conv(x)


# Nearest x2 upsampling followed by a 3x3 conv, phase by phase: output row 2i + a sees input rows
# (i - 1, i, i) through the kernel rows (0, 1, 2) when a = 0 and (i, i, i + 1) when a = 1, so it is a
# 2-tap conv with taps (w0, w1 + w2) at rows (i - 1, i), or (w0 + w1, w2) at rows (i, i + 1); the same
# for columns. _PHASE_TAPS[a] maps the 3 kernel rows onto the 2 taps of phase a.
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
# [(a, b, p, q), (k, l)]: 2x2 tap (p, q) of output phase (a, b) as a sum of 3x3 taps (k, l).
_SUBPIXEL_TAPS = torch.einsum("apk,bql->abpqkl", _PHASE_TAPS, _PHASE_TAPS).reshape(16, 9)
SUBPIXEL_MIN_PIXELS = 256  # B*H*W below which the weight transform costs more than it saves (CPU)


def upsample_conv_subpixel(x: Tensor, weight: Tensor, bias: Tensor | None, taps: Tensor) -> Tensor:
    """``conv3x3(nearest_upsample_x2(x))`` with 4 instead of 9 multiply-adds per output value.

    ``x`` [B, C_in, H, W], ``weight`` [C_out, C_in, 3, 3], ``taps`` :data:`_SUBPIXEL_TAPS` on the
    device -> [B, C_out, 2H, 2W], in the memory format of ``x``. One 2x2 conv with 4 * C_out outputs
    (one block per phase) runs on the (H+1) x (W+1) grid that zero padding of 1 gives; phase (a, b)
    of output pixel (2i + a, 2j + b) is that conv's value at (i + a, j + b).
    """
    b, _, h, w = x.shape
    c_out, c_in = weight.shape[:2]
    w4 = (weight.reshape(c_out * c_in, 9) @ taps.to(weight.dtype).T).view(c_out, c_in, 2, 2, 2, 2)
    w4 = w4.permute(2, 3, 0, 1, 4, 5).reshape(4 * c_out, c_in, 2, 2)  # [(a, b, o), i, p, q]
    y = F.conv2d(x, w4, None if bias is None else bias.repeat(4), padding=1)  # [B, 4 C_out, H+1, W+1]
    out = torch.empty((b, c_out, 2 * h, 2 * w), dtype=y.dtype, device=y.device, memory_format=memory_format_of(x))
    for i, (pa, pb) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, pa::2, pb::2] = y[:, i * c_out : (i + 1) * c_out, pa : pa + h, pb : pb + w]
    return out


def memory_format_of(x: Tensor) -> torch.memory_format:
    """``torch.channels_last`` if ``x`` [B, C, H, W] is stored NHWC (and C > 1), else the default."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class Upsample(nn.Module):
    """Nearest x2 upsampling, then a 3x3 conv.

    ``subpixel`` (set by :mod:`ddpm.nn.policy`) computes the same function phase by phase
    (:func:`upsample_conv_subpixel`): 2.25x fewer multiply-adds, the same weights and outputs up
    to float rounding.
    """

    subpixel: bool = False

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.register_buffer("taps", _SUBPIXEL_TAPS.clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        if self.subpixel and b * h * w >= SUBPIXEL_MIN_PIXELS:
            return upsample_conv_subpixel(x, self.conv.weight, self.conv.bias, cast(Tensor, self.taps))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The residual blocks (+ attention) of one resolution, and the resampler leaving it."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()  # empty, or one per residual block
        self.resample: nn.Module | None = None


class MidBlock(nn.Module):
    def __init__(self, channels: int, config: UNetConfig) -> None:
        super().__init__()
        self.res1 = ResBlock(channels, channels, config)
        self.attn = AttentionBlock(channels, config) if config.mid_attention else None
        self.res2 = ResBlock(channels, channels, config)


# -------------------------------------------------------------------------------------- U-Net
class UNet(nn.Module):
    """``UNet(config)(x_t, t[, y])``: ``x_t`` [B, C, H, W] float, ``t`` [B] (0-based) -> [B, C_out, H, W].

    ``C_out`` is ``config.output_channels``: with ``learned_sigma`` the first half of the channels
    is the prediction (eps, x0, ...) and the second half the variance interpolation ``v``.
    """

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or UNetConfig()
        chans = config.level_channels
        self.time_embed = TimeEmbedding(config)
        self.class_embed = nn.Embedding(config.num_class_embeds, config.emb_dim) if config.num_classes else None
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1)

        self.down = nn.ModuleList()
        skip_chans = [config.base_channels]
        ch = config.base_channels
        for i, out_ch in enumerate(chans):
            level = Level()
            for _ in range(config.num_res_blocks):
                level.res.append(ResBlock(ch, out_ch, config))
                ch = out_ch
                if config.attention_levels[i]:
                    level.attn.append(AttentionBlock(ch, config))
                skip_chans.append(ch)
            if i < len(chans) - 1:
                level.resample = Downsample(ch, config.downsample_padding)
                skip_chans.append(ch)
            self.down.append(level)

        self.mid = MidBlock(ch, config)

        self.up = nn.ModuleList()  # up[0] is the lowest resolution, as diffusers' up_blocks[0]
        for i in reversed(range(len(chans))):
            level = Level()
            for _ in range(config.num_res_blocks + 1):
                level.res.append(ResBlock(ch + skip_chans.pop(), chans[i], config))
                ch = chans[i]
                if config.attention_levels[i]:
                    level.attn.append(AttentionBlock(ch, config))
            if i > 0:
                level.resample = Upsample(ch)
            self.up.append(level)

        self.norm_out = nn.GroupNorm(config.num_groups, ch, eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch, config.output_channels, 3, padding=1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Paper initialisation: Xavier-uniform, zero biases, zero last layers of every branch."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                nn.init.zeros_(m.conv2.weight)
            elif isinstance(m, AttentionBlock):
                nn.init.zeros_(m.proj.weight)
        nn.init.zeros_(self.conv_out.weight)

    # ------------------------------------------------------------------------------ forward
    def _check_input(self, x: Tensor, t: Tensor) -> Tensor:
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(f"UNet expects x_t of shape [B, C, H, W], got {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet built for {cfg.in_channels} input channels, got x_t with {x.shape[1]}")
        h, w = x.shape[-2:]
        d = cfg.size_divisor
        if h % d or w % d:
            raise ValueError(
                f"input size {h}x{w} is not divisible by {d} (= 2**{len(cfg.channel_mult) - 1}, "
                f"one halving per level of channel_mult={cfg.channel_mult} but the last)"
            )
        return as_timesteps(t, x.shape[0], x.device)

    def _check_labels(self, y: Tensor | None, x: Tensor) -> Tensor | None:
        cfg = self.config
        if cfg.num_classes is None:
            if y is not None:
                raise ValueError("this U-Net is unconditional (num_classes is None) but got class labels y")
            return None
        if y is None:
            if not cfg.null_class:
                raise ValueError("this U-Net has no null class: class labels y are required")
            return torch.full((x.shape[0],), cfg.num_classes, device=x.device, dtype=torch.long)
        if y.dtype.is_floating_point and y.shape == (x.shape[0], cfg.num_class_embeds):
            return y.to(x.device)  # class weights: a mixture of the class embeddings
        if y.shape != (x.shape[0],) or y.dtype.is_floating_point:
            raise ValueError(f"class labels y must be integers of shape [{x.shape[0]}] (or class weights "
                             f"[{x.shape[0]}, {cfg.num_class_embeds}]), got {y.dtype} {tuple(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= cfg.num_class_embeds):
            raise ValueError(f"class labels must lie in 0..{cfg.num_class_embeds - 1} (the last is the null class), "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
        return y.to(x.device)

    def _run(self, block: nn.Module, *args: Tensor) -> Tensor:
        if self.config.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def memory_format(self) -> torch.memory_format:
        """The layout of the 4-D weights (set with ``model.to(memory_format=...)``); activations follow it."""
        return memory_format_of(self.conv_out.weight)  # [C_out, base_channels, 3, 3]

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``y``: class labels ``[B]`` of a class-conditional network (None: the null class), or class weights
        ``[B, num_class_embeds]``: the embedding is their mixture of the class embeddings (one-hot rows are
        the labels; interpolation between classes walks between their rows)."""
        t = self._check_input(x, t)
        y = self._check_labels(y, x)
        emb = self.time_embed(t.to(x.device))
        if self.class_embed is not None and y is not None:
            # diffusers: emb = time_embedding + class_embedding
            class_emb = y.to(self.class_embed.weight.dtype) @ self.class_embed.weight if y.dtype.is_floating_point \
                else self.class_embed(y)
            emb = emb + class_emb.to(emb.dtype)
        emb_act = F.silu(emb.to(x.dtype))
        x = x.contiguous(memory_format=self.memory_format())

        h = self.conv_in(x)
        skips = [h]
        for level in cast("list[Level]", self.down):
            for j, res in enumerate(level.res):
                h = self._run(res, h, emb_act)
                if len(level.attn):
                    h = self._run(level.attn[j], h)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self._run(self.mid.res1, h, emb_act)
        if self.mid.attn is not None:
            h = self._run(self.mid.attn, h)
        h = self._run(self.mid.res2, h, emb_act)

        for level in cast("list[Level]", self.up):
            for j, res in enumerate(level.res):
                h = self._run(res, torch.cat([h, skips.pop()], dim=1), emb_act)
                if len(level.attn):
                    h = self._run(level.attn[j], h)
            if level.resample is not None:
                h = level.resample(h)

        out = self.conv_out(F.silu(self.norm_out(h)))
        return out.contiguous()  # callers get the default (NCHW) layout
