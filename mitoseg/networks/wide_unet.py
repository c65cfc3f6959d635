"""A 2-D U-Net built for the CPU: it leaves the input's resolution at once and spends its FLOPs on wide layers.

On a CPU core a 3x3 convolution of 16 channels runs at a third of the FLOP/s of one of 64-384 channels
(bfloat16, BENCHMARKS.md "Network throughput"), and a classic U-Net spends half its FLOPs in its 16- and
32-channel full-resolution levels. This network folds each ``stem`` x ``stem`` block of pixels into channels
(space-to-depth, lossless: ``nn.PixelUnshuffle``), so its first convolution already runs at 1/``stem`` of
the resolution with ``channels[0]`` channels; every level is residual basic blocks (ResNet's: 3x3 conv - BN
- ReLU - 3x3 conv - BN, plus the input) of at least 64 channels. The decoder upsamples bilinearly,
concatenates the skip, and fuses with one 3x3 convolution and one basic block per level, back to the stem's
resolution; the shared segmentation head runs there and :meth:`SegmentationModel.logits` brings the logits
to the input's size (bilinear, as DeepLabV3+ does from its output stride 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mitoseg.networks.base import SegmentationHead, SegmentationModel
from mitoseg.networks.registry import register_model


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class BasicBlock(nn.Module):
    """ResNet's basic block at constant width: relu(x + bn(conv(relu(bn(conv(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class EncoderLevel(nn.Module):
    """A stride-2 3x3 convolution to ``out_channels`` (the stem's convolution at the first level, stride 1),
    then ``blocks`` basic blocks."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, stride: int):
        super().__init__()
        self.entry = conv_bn_relu(in_channels, out_channels, stride)
        self.blocks = nn.Sequential(*[BasicBlock(out_channels) for _ in range(blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.entry(x))


class DecoderLevel(nn.Module):
    """The deeper map upsampled bilinearly to the skip's size, concatenated with it, fused by a 3x3
    convolution to ``out_channels``, then one basic block."""

    def __init__(self, deep_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.fuse = conv_bn_relu(deep_channels + skip_channels, out_channels)
        self.block = BasicBlock(out_channels)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        deep = F.interpolate(deep, size=skip.shape[2:], mode="bilinear", align_corners=False)
        return self.block(self.fuse(torch.cat([deep, skip], dim=1)))


class WideUNet(SegmentationModel):
    """Space-to-depth stem (``stem`` x ``stem`` pixels -> channels), encoder levels of ``channels`` (each after
    the first halves the resolution: ``strides`` are all 2), ``blocks`` basic blocks per encoder level, a
    decoder back to the stem's resolution ending in ``feature_channels`` channels, and the shared head.
    Input sizes must be multiples of ``stem * 2 ** (len(channels) - 1)``."""

    spatial_dims = 2

    def __init__(self, in_channels: int, num_classes: int, channels, stem: int = 2, blocks: int = 1,
                 feature_channels: int = 64, head_channels: int = 64):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.PixelUnshuffle(stem) if stem > 1 else nn.Identity()
        widths = list(channels)
        self.encoder = nn.ModuleList()
        previous = in_channels * stem * stem
        for level, width in enumerate(widths):
            self.encoder.append(EncoderLevel(previous, width, blocks, stride=1 if level == 0 else 2))
            previous = width
        # Decoder widths: each level's skip width, the shallowest one feature_channels.
        outs = [feature_channels] + widths[1:-1]
        self.decoder = nn.ModuleList(
            DecoderLevel(widths[level + 1] if level == len(widths) - 2 else outs[level + 1], widths[level],
                         outs[level])
            for level in range(len(widths) - 1))
        self.seg_head = SegmentationHead(feature_channels, head_channels, num_classes, spatial_dims=2)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        x = self.stem(x)
        for level in self.encoder:
            x = level(x)
            skips.append(x)
        x = skips.pop()
        for level in reversed(self.decoder):
            x = level(x, skips.pop())
        return x

    def parts(self) -> dict[str, list[nn.Module]]:
        return {"encoder": [self.stem, *self.encoder], "decoder": list(self.decoder)}


@register_model("wide_unet")
def build_wide_unet(cfg, num_classes: int) -> WideUNet:
    return WideUNet(
        in_channels=cfg.in_channels,
        num_classes=num_classes,
        channels=cfg.channels,
        stem=cfg.stem,
        blocks=cfg.num_res_units,
        feature_channels=cfg.feature_channels,
        head_channels=cfg.head_channels,
    )
