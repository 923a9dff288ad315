"""U-Net built from small named blocks: images in, logits out.

The network is a pure ``nn.Module``: no loss, no device moves, no I/O.  The channel plan is
computed once from :class:`~seg_core.config.ModelConfig` (``base_width * 2**i`` for stage ``i``)
and every block receives its widths from it, so there are no hard-coded channel numbers.

Any ``H x W`` is accepted: the input is padded on the bottom/right to a multiple of
``2**depth`` (reflect where the image is large enough, otherwise replicate) and the logits are
cropped back, so output pixel ``(i, j)`` always belongs to input pixel ``(i, j)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seg_core.config import ModelConfig, NormKind, UpsampleKind

_MAX_GROUPS = 8


def channel_plan(cfg: ModelConfig) -> tuple[int, ...]:
    """Widths of the encoder stages, shallowest first: ``depth + 1`` entries (last = bottleneck)."""
    if cfg.base_width < 1:
        raise ValueError(f"ModelConfig: base_width must be >= 1, got {cfg.base_width}")
    return tuple(cfg.base_width * 2**i for i in range(cfg.depth + 1))


def make_norm(kind: NormKind, channels: int) -> nn.Module:
    """BatchNorm, or GroupNorm with the largest group count <= 8 that divides ``channels``."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(_MAX_GROUPS, channels), channels)


class ConvBlock(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) twice, then optional channel dropout."""

    def __init__(self, in_ch: int, out_ch: int, norm: NormKind, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            make_norm(norm, out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            make_norm(norm, out_ch),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class EncoderStage(nn.Module):
    """Halve the resolution with 2x2 max-pooling, then a :class:`ConvBlock`."""

    def __init__(self, in_ch: int, out_ch: int, norm: NormKind, dropout: float) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.block = ConvBlock(in_ch, out_ch, norm, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.pool(x))


class DecoderStage(nn.Module):
    """Double the resolution, concatenate the skip connection, then a :class:`ConvBlock`.

    ``in_ch`` comes from the deeper stage; upsampling maps it to ``skip_ch`` so that the
    concatenation has ``2 * skip_ch`` channels, and the block reduces it back to ``skip_ch``.
    """

    def __init__(
        self, in_ch: int, skip_ch: int, upsample: UpsampleKind, norm: NormKind, dropout: float
    ) -> None:
        super().__init__()
        if upsample == "transpose":
            self.up: nn.Module = nn.ConvTranspose2d(in_ch, skip_ch, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_ch, skip_ch, kernel_size=1),
            )
        self.block = ConvBlock(2 * skip_ch, skip_ch, norm, dropout)

    def forward(self, x: torch.Tensor, skip_connection: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # N, skip_ch, 2h, 2w
        return self.block(torch.cat([skip_connection, x], dim=1))


class UNet(nn.Module):
    """Classic U-Net.  ``forward(x: N,C,H,W float) -> logits N,K,H,W`` for any ``H, W``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"ModelConfig: dropout must be in [0, 1), got {cfg.dropout}")
        self.config = cfg
        widths = channel_plan(cfg)
        self.stem = ConvBlock(cfg.in_channels, widths[0], cfg.norm)
        self.encoder = nn.ModuleList(
            EncoderStage(widths[i], widths[i + 1], cfg.norm, cfg.dropout)
            for i in range(cfg.depth)
        )
        # Decoder runs deepest-first: stage i maps widths[i+1] -> widths[i].
        self.decoder = nn.ModuleList(
            DecoderStage(widths[i + 1], widths[i], cfg.upsample, cfg.norm, cfg.dropout)
            for i in reversed(range(cfg.depth))
        )
        self.head = nn.Conv2d(widths[0], cfg.num_classes, kernel_size=1)

    @property
    def size_multiple(self) -> int:
        """Spatial sizes the conv stack handles without padding are multiples of this."""
        return 2**self.config.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``N, num_classes, H, W`` for images ``N, in_channels, H, W``."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"UNet: expected input N,{self.config.in_channels},H,W, got {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        x = _pad_to_multiple(x, self.size_multiple)
        skips = [self.stem(x)]
        for stage in self.encoder:
            skips.append(stage(skips[-1]))
        y = skips.pop()  # bottleneck
        for stage in self.decoder:
            y = stage(y, skips.pop())
        return self.head(y)[..., :height, :width]


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom/right of ``x`` (N,C,H,W) so that H and W are multiples of ``multiple``."""
    height, width = x.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    # reflect needs pad < size; tiny inputs fall back to replicate.
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
