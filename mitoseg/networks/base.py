"""The interface every segmentation network implements."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationHead(nn.Module):
    """A small conv block (its output: the penultimate features) then a 1x1 classifier."""

    def __init__(self, in_channels: int, hidden_channels: int, num_classes: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, hidden_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(hidden_channels, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.block(features))


class SegmentationModel(nn.Module):
    """Base class: subclasses define ``encoder_decoder`` (x -> features) and ``seg_head``."""

    num_classes: int
    seg_head: SegmentationHead

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.seg_head(features)

    def logits(self, features: torch.Tensor, size) -> torch.Tensor:
        """``head(features)`` resized to ``size`` (the input's H, W)."""
        logits = self.head(features)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x), x.shape[-2:])
