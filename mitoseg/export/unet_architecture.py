"""mitoseg's U-Net, standalone: the architecture of a bioimage.io package's ``pytorch_state_dict`` weights.

This file is copied into the package as it is and imports only PyTorch and MONAI (not mitoseg), so the
weights load wherever those two are installed. ``MitosegUNet(**kwargs)`` (the package lists the kwargs)
rebuilds the network of a mitoseg run with a U-Net: MONAI's residual ``UNet`` (``encoder_decoder``) whose
last map has ``feature_channels`` channels, then the segmentation head (``seg_head``: a 3x3 convolution,
BatchNorm and ReLU, ``block``, and a 1x1 convolution to the classes, ``classifier``). The state-dict keys
are those of mitoseg's own network (``mitoseg.networks.unet.UNetSegmenter``) without the head's auxiliary
BatchNorm, which only training uses. ``forward`` returns the class probabilities (softmax over the
channels), or the logits with ``probabilities=False``.
"""

from typing import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn


class SegmentationHead(nn.Module):
    def __init__(self, in_channels: int, hidden_channels: int, num_classes: int, spatial_dims: int = 2):
        super().__init__()
        conv, norm = (nn.Conv3d, nn.BatchNorm3d) if spatial_dims == 3 else (nn.Conv2d, nn.BatchNorm2d)
        self.block = nn.Sequential(conv(in_channels, hidden_channels, 3, padding=1, bias=False),
                                   norm(hidden_channels), nn.ReLU(inplace=True))
        self.classifier = conv(hidden_channels, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block(features))


class MitosegUNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int], strides: Sequence[int],
                 num_res_units: int, feature_channels: int, head_channels: int, norm: str = "batch",
                 dropout: float = 0.0, spatial_dims: int = 2, probabilities: bool = True):
        super().__init__()
        self.probabilities = probabilities
        self.encoder_decoder = UNet(spatial_dims=spatial_dims, in_channels=in_channels,
                                    out_channels=feature_channels, channels=tuple(channels), strides=tuple(strides),
                                    num_res_units=num_res_units, norm=norm, dropout=dropout)
        self.seg_head = SegmentationHead(feature_channels, head_channels, num_classes, spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.seg_head(self.encoder_decoder(x))
        return torch.softmax(logits, dim=1) if self.probabilities else logits
