"""The interface every segmentation network implements."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationHead(nn.Module):
    """A small conv block (its output: the penultimate features) then a 1x1 classifier.

    MixBN (DDFP): ``aux_bn`` replaces the block's BatchNorm for perturbed features
    (``perturbed=True``), so their statistics never mix with the clean ones.
    """

    def __init__(self, in_channels: int, hidden_channels: int, num_classes: int, spatial_dims: int = 2):
        super().__init__()
        conv, norm = (nn.Conv3d, nn.BatchNorm3d) if spatial_dims == 3 else (nn.Conv2d, nn.BatchNorm2d)
        self.block = nn.Sequential(
            conv(in_channels, hidden_channels, 3, padding=1, bias=False),
            norm(hidden_channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = conv(hidden_channels, num_classes, 1)
        self.aux_bn = norm(hidden_channels)
        self.register_load_state_dict_pre_hook(_aux_bn_from_main_bn)

    def penultimate(self, features: torch.Tensor, perturbed: bool = False) -> torch.Tensor:
        if not perturbed:
            return self.block(features)
        conv, _, act = self.block
        return act(self.aux_bn(conv(features)))

    def forward(self, features: torch.Tensor, perturbed: bool = False) -> torch.Tensor:
        return self.classifier(self.penultimate(features, perturbed))


def _aux_bn_from_main_bn(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before MixBN have no ``aux_bn``: start it as a copy of the main BN."""
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        main, aux = f"{prefix}block.1.{name}", f"{prefix}aux_bn.{name}"
        if aux not in state_dict and main in state_dict:
            state_dict[aux] = state_dict[main].clone()


class SegmentationModel(nn.Module):
    """Base class: subclasses define ``encoder_decoder`` (x -> features) and ``seg_head``.

    ``spatial_dims``: 2 for (B, C, H, W) images, 3 for (B, C, D, H, W) volumes."""

    num_classes: int
    seg_head: SegmentationHead
    spatial_dims: int = 2

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, features: torch.Tensor, perturbed: bool = False) -> torch.Tensor:
        return self.seg_head(features, perturbed=perturbed)

    def logits(self, features: torch.Tensor, size, perturbed: bool = False) -> torch.Tensor:
        """``head(features)`` resized to ``size`` (the input's spatial size); ``perturbed``: the head's MixBN
        branch."""
        logits = self.head(features, perturbed=perturbed)
        if tuple(logits.shape[2:]) != tuple(size):
            mode = "trilinear" if logits.dim() == 5 else "bilinear"
            logits = F.interpolate(logits, size=tuple(size), mode=mode, align_corners=False)
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x), x.shape[2:])
