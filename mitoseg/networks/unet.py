"""2-D and 3-D U-Nets for EM, built from MONAI's UNet."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet
from torch import nn

from mitoseg.networks.base import SegmentationHead, SegmentationModel
from mitoseg.networks.registry import register_model


class PReLU(nn.PReLU):
    """``nn.PReLU`` (the same weight and numbers) whose forward under autograd is ``relu(x) - a relu(-x)``:
    in bfloat16 on the CPU torch's PReLU backward kernel costs 2.5 times these two ReLUs, and it was a
    sixth of a training step of the 2-D U-Net. Without gradients (prediction) it is ``F.prelu``, the faster
    forward. For x < 0, ``-(a (-x))`` rounds as ``a x`` does: the values are PReLU's exactly, and so are
    the gradients except at an input of exactly 0, where this takes the subgradient 0 and torch's PReLU
    ``a`` (a measure-zero set after a normalisation layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return super().forward(x)
        weight = self.weight.to(x.dtype)  # as autocast casts PReLU's weight
        if weight.numel() > 1:
            weight = weight.view(1, -1, *[1] * (x.dim() - 2))
        return F.relu(x) - weight * F.relu(-x)


def use_fast_prelu(module: nn.Module) -> nn.Module:
    """Every ``nn.PReLU`` of ``module`` becomes :class:`PReLU` (in place; parameters and keys unchanged)."""
    for child in module.modules():
        if type(child) is nn.PReLU:
            child.__class__ = PReLU
    return module


class UNetSegmenter(SegmentationModel):
    """MONAI's residual U-Net as the feature extractor, plus the shared segmentation head.

    MONAI's UNet ends with a plain convolution; asking it for ``feature_channels``
    outputs instead of classes makes that last decoder map our feature map.
    """

    def __init__(self, in_channels: int, num_classes: int, channels, strides, num_res_units: int,
                 feature_channels: int, head_channels: int, norm: str = "batch", dropout: float = 0.0,
                 spatial_dims: int = 2):
        super().__init__()
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.encoder_decoder = UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=feature_channels,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            norm=norm,
            dropout=dropout,
        )
        use_fast_prelu(self.encoder_decoder)
        self.seg_head = SegmentationHead(feature_channels, head_channels, num_classes, spatial_dims)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder_decoder(x)

    def parts(self) -> dict[str, list[nn.Module]]:
        """MONAI's UNet nests each level as ``Sequential(down, SkipConnection(deeper levels), up)`` around the
        bottom block: the encoder is every ``down`` and the bottom, the decoder every ``up``."""
        encoder, decoder = [], []
        node = self.encoder_decoder.model
        while isinstance(node, nn.Sequential) and len(node) == 3 and isinstance(node[1], SkipConnection):
            encoder.append(node[0])
            decoder.append(node[2])
            node = node[1].submodule
        encoder.append(node)
        return {"encoder": encoder, "decoder": decoder}


@register_model("unet")
def build_unet(cfg, num_classes: int) -> UNetSegmenter:
    return UNetSegmenter(
        in_channels=cfg.in_channels,
        num_classes=num_classes,
        channels=cfg.channels,
        strides=cfg.strides,
        num_res_units=cfg.num_res_units,
        feature_channels=cfg.feature_channels,
        head_channels=cfg.head_channels,
        norm=cfg.norm,
        dropout=cfg.dropout,
        spatial_dims=cfg.spatial_dims,
    )
