"""DDPM-style UNet noise/velocity predictor (Ho et al. 2020, CIFAR-10 architecture).

This is an independent implementation of the architecture described in
"Denoising Diffusion Probabilistic Models" (Ho, Jain & Abbeel, 2020), appendix B,
as used by progressive distillation (Salimans & Ho, 2022) for CIFAR-10.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["UNet", "UNetConfig", "num_groups_for", "timestep_embedding"]


def num_groups_for(channels: int, max_groups: int = 32) -> int:
    """Return the number of GroupNorm groups to use for ``channels``.

    Uses ``max_groups`` when it divides ``channels``; otherwise the largest divisor of
    ``channels`` that does not exceed ``max_groups`` (so tiny widths still work).

    Args:
        channels: Number of channels to normalise.
        max_groups: Preferred (maximum) number of groups.

    Returns:
        A group count that divides ``channels``.

    Example:
        >>> num_groups_for(128), num_groups_for(24)
        (32, 24)
    """
    if channels <= 0:
        raise ValueError(f"channels must be positive, got {channels}")
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1  # pragma: no cover - unreachable, 1 always divides


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups_for(channels), channels, eps=1e-6)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly continuous) time values, as in DDPM.

    The computation is carried out in float32 regardless of autocast.

    Args:
        t: Tensor of shape ``[B]`` with the (already scaled) time values.
        dim: Embedding dimension.
        max_period: Controls the minimum frequency of the embedding.

    Returns:
        Float32 tensor of shape ``[B, dim]`` laid out as ``[sin, cos]``.

    Example:
        >>> timestep_embedding(torch.tensor([0.0, 500.0]), 128).shape
        torch.Size([2, 128])
    """
    half = dim // 2
    t = t.float()
    denom = max(half - 1, 1)
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / denom
    )
    args = t[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


@dataclass
class UNetConfig:
    """Hyperparameters of :class:`UNet`.

    The defaults reproduce the DDPM CIFAR-10 model (about 35.7M parameters).

    Attributes:
        image_size: Nominal input resolution; used to decide where attention is placed.
        in_channels: Number of input image channels.
        out_channels: Number of output channels; ``None`` means ``in_channels``.
        ch: Base channel width.
        ch_mult: Channel multiplier per resolution level.
        num_res_blocks: Residual blocks per level on the downsampling path.
        attn_resolutions: Spatial resolutions at which self-attention is applied.
        dropout: Dropout probability inside residual blocks.
        num_classes: Number of classes for class conditioning, or ``None``.
        time_embed_scale: Multiplier applied to ``t`` before the sinusoidal embedding
            (use ``1000.0`` when ``t`` lies in ``[0, 1]``).
        num_heads: Number of attention heads in the self-attention blocks.

    Example:
        >>> cfg = UNetConfig.tiny()
        >>> UNetConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_classes: int | None = None
    time_embed_scale: float = 1.0
    num_heads: int = 1

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.in_channels <= 0:
            raise ValueError(f"in_channels must be positive, got {self.in_channels}")
        if self.out_channels is not None and self.out_channels <= 0:
            raise ValueError(f"out_channels must be positive or None, got {self.out_channels}")
        if self.ch <= 0:
            raise ValueError(f"ch must be positive, got {self.ch}")
        if len(self.ch_mult) == 0 or any(m <= 0 for m in self.ch_mult):
            raise ValueError(
                f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult}"
            )
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {self.num_res_blocks}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes <= 0:
            raise ValueError(f"num_classes must be positive or None, got {self.num_classes}")
        if self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor != 0:
            raise ValueError(
                f"image_size={self.image_size} must be divisible by 2**(len(ch_mult)-1)={factor}"
            )

    @property
    def resolved_out_channels(self) -> int:
        """Output channel count (``out_channels`` or ``in_channels``)."""
        return self.in_channels if self.out_channels is None else self.out_channels

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (tuples become lists)."""
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        """Build a config from a dict such as the one returned by :meth:`to_dict`.

        Raises:
            ValueError: If ``d`` contains unknown keys.
        """
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown UNetConfig keys: {sorted(unknown)}; allowed: {sorted(known)}"
            )
        return cls(**d)

    @classmethod
    def paper(cls, **overrides: Any) -> UNetConfig:
        """The DDPM CIFAR-10 configuration (35.7M parameters); same as the defaults."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides: Any) -> UNetConfig:
        """A very small configuration for CPU tests and smoke runs (~1.1M parameters)."""
        kwargs: dict[str, Any] = dict(
            ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0
        )
        kwargs.update(overrides)
        return cls(**kwargs)


class ResBlock(nn.Module):
    """Residual block with time-embedding addition (DDPM style)."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = _norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip: nn.Module = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None].to(h.dtype)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = self.skip(x)
        return skip.to(h.dtype) + h


class AttnBlock(nn.Module):
    """Spatial multi-head self-attention with a residual connection."""

    def __init__(self, channels: int, num_heads: int = 1) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"channels={channels} not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        qkv = self.qkv(self.norm(x))
        # The qkv channels are laid out (q|k|v, head, channel-in-head); the positions become
        # the sequence. The result is a view, so SDPA sees the same strides as a plain reshape.
        q, k, v = rearrange(
            qkv, "b (three heads d) h w -> b three heads (h w) d", three=3, heads=self.num_heads
        ).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = rearrange(out, "b heads (h w) d -> b (heads d) h w", h=h, w=w)
        out = self.proj_out(out)
        return x.to(out.dtype) + out


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """Blocks of one resolution level (residual blocks + optional attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()


class UNet(nn.Module):
    """DDPM-style UNet mapping ``(z_t, t[, y])`` to a tensor shaped like ``z_t``.

    The architecture follows Ho et al. (2020): a sinusoidal time embedding fed
    through a two-layer MLP, residual blocks with additive time conditioning,
    self-attention at selected resolutions, strided-conv downsampling,
    nearest+conv upsampling and skip connections between the two paths.
    Optional class conditioning adds a learned label embedding to the time
    embedding. The output parameterisation (epsilon, x or v) is up to the caller.

    Args:
        config: A :class:`UNetConfig`; defaults to ``UNetConfig()`` (35.7M params).
            Keyword arguments are accepted instead, e.g. ``UNet(ch=64)``.
        **kwargs: Config fields, used when ``config`` is ``None``.

    Attributes:
        config: The :class:`UNetConfig` used to build the model.
        in_channels: Number of input channels.
        out_channels: Number of output channels.
        num_classes: Number of classes, or ``None`` if unconditional.

    Example:
        >>> model = UNet(UNetConfig.tiny(time_embed_scale=1000.0)).eval()
        >>> z = torch.randn(2, 3, 32, 32)
        >>> t = torch.rand(2)  # continuous time in [0, 1]
        >>> model(z, t).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        elif kwargs:
            raise ValueError("pass either a UNetConfig or keyword arguments, not both")
        if not isinstance(config, UNetConfig):
            raise TypeError(f"config must be a UNetConfig, got {type(config).__name__}")
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.resolved_out_channels
        self.num_classes = config.num_classes

        ch = config.ch
        temb_ch = 4 * ch
        self.temb_ch = temb_ch
        self.time_mlp = nn.Sequential(
            nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch)
        )
        self.label_emb: nn.Embedding | None = (
            nn.Embedding(config.num_classes, temb_ch) if config.num_classes is not None else None
        )

        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        # Downsampling path.
        res = config.image_size
        chans = [ch]
        cur = ch
        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        n_levels = len(config.ch_mult)
        for i, mult in enumerate(config.ch_mult):
            level = _Level()
            out = ch * mult
            for _ in range(config.num_res_blocks):
                level.res.append(ResBlock(cur, out, temb_ch, config.dropout))
                cur = out
                level.attn.append(
                    AttnBlock(cur, config.num_heads)
                    if res in config.attn_resolutions
                    else nn.Identity()
                )
                chans.append(cur)
            self.down.append(level)
            if i != n_levels - 1:
                self.downsamplers.append(Downsample(cur))
                chans.append(cur)
                res //= 2
            else:
                self.downsamplers.append(nn.Identity())

        # Middle.
        self.mid_res1 = ResBlock(cur, cur, temb_ch, config.dropout)
        self.mid_attn = AttnBlock(cur, config.num_heads)
        self.mid_res2 = ResBlock(cur, cur, temb_ch, config.dropout)

        # Upsampling path.
        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i, mult in reversed(list(enumerate(config.ch_mult))):
            level = _Level()
            out = ch * mult
            for _ in range(config.num_res_blocks + 1):
                level.res.append(ResBlock(cur + chans.pop(), out, temb_ch, config.dropout))
                cur = out
                level.attn.append(
                    AttnBlock(cur, config.num_heads)
                    if res in config.attn_resolutions
                    else nn.Identity()
                )
            self.up.append(level)
            if i != 0:
                self.upsamplers.append(Upsample(cur))
                res *= 2
            else:
                self.upsamplers.append(nn.Identity())
        assert not chans

        self.norm_out = _norm(cur)
        self.conv_out = nn.Conv2d(cur, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @classmethod
    def from_config(cls, config: UNetConfig | dict[str, Any]) -> UNet:
        """Build a model from a :class:`UNetConfig` or a plain dict of its fields."""
        if isinstance(config, dict):
            config = UNetConfig.from_dict(config)
        return cls(config)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Total number of (optionally only trainable) parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _validate(self, z_t: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        if not isinstance(z_t, Tensor):
            raise TypeError(f"z_t must be a Tensor, got {type(z_t).__name__}")
        if z_t.ndim != 4:
            raise ValueError(f"z_t must have shape [B, C, H, W], got shape {tuple(z_t.shape)}")
        if z_t.shape[1] != self.in_channels:
            raise ValueError(
                f"z_t must have {self.in_channels} channels, got shape {tuple(z_t.shape)}"
            )
        factor = 2 ** (len(self.config.ch_mult) - 1)
        if z_t.shape[2] % factor != 0 or z_t.shape[3] % factor != 0:
            raise ValueError(
                f"z_t spatial size {tuple(z_t.shape[2:])} must be divisible by {factor}"
            )
        if not z_t.is_floating_point():
            raise ValueError(f"z_t must be a floating point tensor, got dtype {z_t.dtype}")
        b = z_t.shape[0]
        if not isinstance(t, Tensor):
            t = torch.as_tensor(t, device=z_t.device)
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(
                f"t must be a real floating point or integer tensor, got dtype {t.dtype}"
            )
        if t.ndim == 0:
            t = t.expand(b)
        elif t.ndim != 1:
            raise ValueError(f"t must have shape [B], got shape {tuple(t.shape)}")
        elif t.shape[0] != b:
            raise ValueError(f"t has batch size {t.shape[0]} but z_t has batch size {b}")
        if self.label_emb is None:
            if y is not None:
                raise ValueError("y was given but the model is unconditional (num_classes=None)")
        else:
            if y is None:
                raise ValueError(
                    f"y is required: the model is class-conditional (num_classes={self.num_classes})"
                )
            if not isinstance(y, Tensor):
                raise ValueError(f"y must be a Tensor of class indices, got {type(y).__name__}")
            if y.ndim != 1 or y.shape[0] != b:
                raise ValueError(f"y must have shape [B]=[{b}], got shape {tuple(y.shape)}")
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ValueError(
                    f"y must be an integer tensor of class indices, got dtype {y.dtype}"
                )
        return t

    def forward(self, z_t: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """Run the network.

        Args:
            z_t: Noisy input of shape ``[B, C, H, W]``.
            t: Time values of shape ``[B]`` (float or integer); a 0-d tensor is
                broadcast over the batch. Multiplied by ``config.time_embed_scale``.
            y: Integer class labels of shape ``[B]``; required iff the model is
                class-conditional, must be ``None`` otherwise.

        Returns:
            Tensor with the shape of ``z_t`` (channels ``out_channels``).

        Raises:
            ValueError: On malformed ``z_t``, ``t`` or ``y``.
        """
        t = self._validate(z_t, t, y)
        t = t.to(device=z_t.device, dtype=torch.float32) * self.config.time_embed_scale
        temb = self.time_mlp(timestep_embedding(t, self.config.ch))
        if self.label_emb is not None:
            assert y is not None
            temb = temb + self.label_emb(y.to(device=z_t.device, dtype=torch.long)).to(temb.dtype)

        h = self.conv_in(z_t)
        hs = [h]
        for level, downsample in zip(self.down, self.downsamplers, strict=True):
            for block, attn in zip(level.res, level.attn, strict=True):
                h = attn(block(h, temb))
                hs.append(h)
            if not isinstance(downsample, nn.Identity):
                h = downsample(h)
                hs.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, temb)), temb)

        for level, upsample in zip(self.up, self.upsamplers, strict=True):
            for block, attn in zip(level.res, level.attn, strict=True):
                skip = hs.pop()
                h = attn(block(torch.cat([h, skip.to(h.dtype)], dim=1), temb))
            h = upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))
