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
    """Halve the resolution with 2x2 max-pooling, then a :class:`ConvBlock` (or ``block``)."""

    def __init__(self, in_ch: int, out_ch: int, norm: NormKind, dropout: float,
                 block: type[nn.Sequential] = ConvBlock) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.block = block(in_ch, out_ch, norm, dropout)

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


class SeparableBlock(nn.Sequential):
    """(depthwise 3x3 -> norm -> ReLU -> pointwise 1x1 -> norm -> ReLU) ``repeats`` times (2, or
    1 in the lite decoder), then optional channel dropout: the :class:`ConvBlock` of the lite
    U-Net.

    Per output pixel it costs ``9*in + in*out + 9*out + out*out`` multiply-adds against
    ``9*in*out + 9*out*out`` for two full 3x3 convolutions: about 7x fewer at 32 channels.
    """

    def __init__(self, in_ch: int, out_ch: int, norm: NormKind, dropout: float = 0.0,
                 repeats: int = 2) -> None:
        layers: list[nn.Module] = []
        for cin in (in_ch, out_ch)[:repeats]:
            layers += [nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
                       make_norm(norm, cin), nn.ReLU(inplace=True),
                       nn.Conv2d(cin, out_ch, 1, bias=False),
                       make_norm(norm, out_ch), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        super().__init__(*layers)


class LiteDecoderStage(nn.Module):
    """Bilinear x2 and a 1x1 projection to ``skip_ch``, *added* to the skip connection (no
    concatenation: the block sees ``skip_ch`` channels, not twice that), then one separable
    layer (a :class:`SeparableBlock` with one repeat)."""

    def __init__(self, in_ch: int, skip_ch: int, norm: NormKind, dropout: float) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(in_ch, skip_ch, 1, bias=False),
                                     make_norm(norm, skip_ch))
        self.block = SeparableBlock(skip_ch, skip_ch, norm, dropout, repeats=1)

    def forward(self, x: torch.Tensor, skip_connection: torch.Tensor) -> torch.Tensor:
        # project at the low resolution first: the upsampling then moves skip_ch channels
        x = F.interpolate(self.project(x), size=skip_connection.shape[-2:], mode="bilinear",
                          align_corners=False)
        return self.block(x + skip_connection)


class UNet(nn.Module):
    """U-Net.  ``forward(x: N,C,H,W float) -> logits N,K,H,W`` for any ``H, W``.

    ``config.arch`` picks the blocks: ``unet`` (classic: :class:`ConvBlock`, transposed or
    bilinear upsampling, concatenated skips) or ``lite`` (:class:`SeparableBlock` and
    :class:`LiteDecoderStage`); the stem's first convolution is a full 3x3 in both.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"ModelConfig: dropout must be in [0, 1), got {cfg.dropout}")
        self.config = cfg
        widths = channel_plan(cfg)
        deep = list(reversed(range(cfg.depth)))  # the decoder runs deepest-first
        if cfg.arch == "lite":
            self.stem: nn.Module = nn.Sequential(
                nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1, bias=False),
                make_norm(cfg.norm, widths[0]), nn.ReLU(inplace=True),
                SeparableBlock(widths[0], widths[0], cfg.norm))
            self.encoder = nn.ModuleList(
                EncoderStage(widths[i], widths[i + 1], cfg.norm, cfg.dropout, SeparableBlock)
                for i in range(cfg.depth))
            self.decoder = nn.ModuleList(
                LiteDecoderStage(widths[i + 1], widths[i], cfg.norm, cfg.dropout) for i in deep)
        else:
            self.stem = ConvBlock(cfg.in_channels, widths[0], cfg.norm)
            self.encoder = nn.ModuleList(
                EncoderStage(widths[i], widths[i + 1], cfg.norm, cfg.dropout)
                for i in range(cfg.depth))
            # stage i maps widths[i+1] -> widths[i]
            self.decoder = nn.ModuleList(
                DecoderStage(widths[i + 1], widths[i], cfg.upsample, cfg.norm, cfg.dropout)
                for i in deep)
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


def input_channels(model: nn.Module) -> int:
    """Channels the model takes: its first convolution's input channels."""
    return next(m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d))


def conv_macs(model: nn.Module, height: int, width: int) -> int:
    """Multiply-adds of every convolution in one forward of a ``1 x C x height x width`` input
    (GFLOPs = 2 * MACs / 1e9; pooling, norms, activations and interpolation not counted)."""
    total = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        if isinstance(module, nn.ConvTranspose2d):   # each input pixel feeds k*k outputs
            total += inputs[0].numel() * (module.out_channels // module.groups) * kh * kw
        else:
            total += output.numel() * (module.in_channels // module.groups) * kh * kw

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, input_channels(model), height, width))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that directly follows a convolution in an ``nn.Sequential`` into that
    convolution's weights and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``), in place, and
    return the model in eval mode.

    Inference only: the running statistics become constants, so the model must not be trained
    afterwards.  The logits agree with the unfolded model up to float rounding; the norms cost a
    third of the lite U-Net's CPU forward and a sixth of the base U-Net's.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        for index in range(len(module) - 1):
            conv, norm = module[index], module[index + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                module[index] = fuse_conv_bn_eval(conv, norm)
                module[index + 1] = nn.Identity()
    return model


HEAD_PREFIX = "head."   # the 1x1 convolution that maps features to class logits


def warm_start(model: "UNet", state: dict[str, torch.Tensor]) -> str:
    """Load a trained U-Net's weights into ``model`` (a fresh one) and say what was loaded.

    Same architecture and classes: every weight.  Same architecture, another class count: every
    weight but the head, which keeps its fresh initialisation.  Anything else (other width,
    depth, arch, input channels) raises ``ValueError`` listing the first mismatches.
    """
    own = model.state_dict()
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    body_problems = missing + unexpected + [k for k in mismatched if not k.startswith(HEAD_PREFIX)]
    if body_problems:
        raise ValueError(
            f"warm start: the trained model's layers do not fit this model ({len(body_problems)} "
            f"differ, e.g. {body_problems[:3]}); warm starts keep model.arch, depth, base_width "
            f"and in_channels (only num_classes may change)")
    if mismatched:   # only the head: another class count
        keep = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
        model.load_state_dict({**own, **keep})
        before = state[f"{HEAD_PREFIX}weight"].shape[0]
        after = own[f"{HEAD_PREFIX}weight"].shape[0]
        return (f"warm start: every layer but the head loaded; the head was re-initialised for "
                f"{after} classes (the trained model had {before})")
    model.load_state_dict(state)
    return "warm start: every layer loaded"
