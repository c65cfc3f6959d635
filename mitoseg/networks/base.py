"""The interface every segmentation network implements."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationHead(nn.Module):
    """``num_blocks`` conv blocks (their output: the penultimate features) then a 1x1 classifier.

    Each block is conv (3x3, ``conv_bias``) -> BatchNorm -> ReLU (-> channel dropout when ``dropout`` > 0),
    all in one ``nn.Sequential`` ``block``. The default, one block without bias or dropout, is mitoseg's
    original head (UniMatch's second fuse convolution); DDFP's / U2PL's classifier is two blocks with bias
    and ``Dropout2d(0.1)``.

    MixBN (DDFP): ``aux_bn`` replaces each block's BatchNorm for perturbed features (``perturbed=True``), so
    their statistics never mix with the clean ones: one BatchNorm for a single block (the checkpoint keys
    ``aux_bn.*`` of the original head), an ``nn.ModuleList`` of one per block otherwise (``aux_bn.<i>.*``).
    """

    def __init__(self, in_channels: int, hidden_channels: int, num_classes: int, spatial_dims: int = 2,
                 num_blocks: int = 1, dropout: float = 0.0, conv_bias: bool = False):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        conv, norm = (nn.Conv3d, nn.BatchNorm3d) if spatial_dims == 3 else (nn.Conv2d, nn.BatchNorm2d)
        drop = nn.Dropout3d if spatial_dims == 3 else nn.Dropout2d
        layers: list[nn.Module] = []
        self.norm_positions: list[int] = []  # indices of the main BatchNorms in ``block``
        for i in range(num_blocks):
            layers.append(conv(in_channels if i == 0 else hidden_channels, hidden_channels, 3, padding=1,
                               bias=conv_bias))
            self.norm_positions.append(len(layers))
            layers += [norm(hidden_channels), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(drop(dropout))
        self.block = nn.Sequential(*layers)
        self.classifier = conv(hidden_channels, num_classes, 1)
        if num_blocks == 1:
            self.aux_bn = norm(hidden_channels)
        else:
            self.aux_bn = nn.ModuleList(norm(hidden_channels) for _ in range(num_blocks))
        self.register_load_state_dict_pre_hook(_aux_bn_from_main_bn)

    def aux_norms(self) -> list[nn.Module]:
        """The auxiliary BatchNorm of each block, in order."""
        return list(self.aux_bn) if isinstance(self.aux_bn, nn.ModuleList) else [self.aux_bn]

    def aux_key_prefixes(self) -> list[str]:
        """``aux_bn.`` (one block) or ``aux_bn.<i>.``: the state-dict prefix of each block's auxiliary BN."""
        if isinstance(self.aux_bn, nn.ModuleList):
            return [f"aux_bn.{i}." for i in range(len(self.aux_bn))]
        return ["aux_bn."]

    def penultimate(self, features: torch.Tensor, perturbed: bool = False) -> torch.Tensor:
        if not perturbed:
            return self.block(features)
        replace = dict(zip(self.norm_positions, self.aux_norms()))
        x = features
        for i, layer in enumerate(self.block):
            x = replace.get(i, layer)(x)
        return x

    def forward(self, features: torch.Tensor, perturbed: bool = False) -> torch.Tensor:
        return self.classifier(self.penultimate(features, perturbed))


def _aux_bn_from_main_bn(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before MixBN have no ``aux_bn``: start each block's as a copy of its main BN."""
    for position, aux_prefix in zip(module.norm_positions, module.aux_key_prefixes()):
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            main, aux = f"{prefix}block.{position}.{name}", f"{prefix}{aux_prefix}{name}"
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

    def classifier_keys(self) -> list[str]:
        """The state-dict keys of the head's last 1x1 convolution, the only weights whose shape depends on the
        number of classes: fine-tuning to another ``data.num_classes`` re-initialises them."""
        return [f"seg_head.classifier.{name}" for name, _ in self.seg_head.classifier.named_parameters()]

    def parts(self) -> dict[str, list[nn.Module]]:
        """The modules of each part ``model.freeze`` can name: ``encoder`` (the down-sampling path) and
        ``decoder`` (the rest of ``features(x)``); the head is never frozen."""
        raise NotImplementedError(f"{type(self).__name__} does not name its parts")
