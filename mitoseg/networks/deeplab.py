"""DeepLabV3+ with a dilated ResNet-50 / ResNet-101 backbone (the natural-image benchmarks).

The network is UniMatch's (``model/semseg/deeplabv3plus.py``): a ResNet whose last
stage (output stride 16) or last two stages (output stride 8) use dilation instead
of stride, ASPP on the last stage (dilations 6, 12, 18 or 12, 24, 36, plus image
pooling), a 48-channel projection of the stride-4 ``layer1`` features, two 3x3
fuse convolutions and a 1x1 classifier. In mitoseg's interface the first fuse
convolution ends :meth:`features` (256 channels at 1/4 resolution) and the second
one is the shared :class:`SegmentationHead`'s block (``model.head_channels``, 256 in
the shipped configs), so ``head(features(x))`` is exactly UniMatch's network and
UniMatch's dropout branch, DAW and DDFP run on it through ``features`` / ``head``.

The ResNet is written here with torchvision's module names (``conv1``, ``bn1``,
``layer1`` .. ``layer4``, ``downsample.0/1``), so the papers' ImageNet files load with
:func:`load_pretrained_backbone`. ``deep_stem`` selects the ResNet-v1c stem (three
3x3 convolutions, 128 channels: ``conv1.0/1/3/4/6``) of UniMatch's and DDFP's files.

``decoder="u2pl"`` is the decoder of U2PL and DDFP (DDFP ``model/model/decoder.py``,
``dec_deeplabv3_plus``): an ASPP of five ``high // 8`` (256) channel branches concatenated
without projection (1280 channels), a head (3x3 conv 256, BN, ReLU, Dropout2d(0.1)) upsampled to
the stride-4 grid, the low-level projection (1x1 conv 256 -> 48 with bias, BN, ReLU) and their
concatenation (304 channels): that is :meth:`features`, the point where DDFP perturbs. Its
classifier (two 3x3 conv blocks of 256 channels with bias, BN, ReLU, Dropout2d(0.1), then the
1x1 conv) is the :class:`SegmentationHead`; DDFP's MixBN (``MixSyncBatchNorm``) is in both
classifier blocks, as ``aux_bn`` here.

:meth:`DeepLabV3Plus.features_with_fp` is UniMatch's feature perturbation (``forward(x,
need_fp=True)``): the backbone runs once, and the clean (c1, c4) and the channel-dropped
(dropout2d(c1), dropout2d(c4)) features are decoded together as one batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mitoseg.errors import MitosegError
from mitoseg.networks.base import SegmentationHead, SegmentationModel
from mitoseg.networks.registry import register_model

LAYERS = {"resnet50": [3, 4, 6, 3], "resnet101": [3, 4, 23, 3]}
DEFAULT_DILATIONS = {16: [6, 12, 18], 8: [12, 24, 36]}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """torchvision's ResNet-v1.5 bottleneck (stride on the 3x3 convolution)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A dilated ResNet returning (layer1, layer4) features; torchvision key names, no ``fc``."""

    def __init__(self, layers: list[int], output_stride: int = 16, deep_stem: bool = False, in_channels: int = 3,
                 width: int = 64):
        super().__init__()
        w = width  # 64: the standard ResNet; smaller widths only make tiny test networks
        if output_stride not in (8, 16):
            raise MitosegError(f"model.output_stride must be 8 or 16, got {output_stride}")
        dilate = [False, output_stride == 8, True]  # layer2, layer3, layer4
        if deep_stem:
            self.inplanes = 2 * w
            self.conv1 = nn.Sequential(
                nn.Conv2d(in_channels, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            )
        else:
            self.inplanes = w
            self.conv1 = nn.Conv2d(in_channels, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.dilation = 1
        self.layer1 = self._make_layer(w, layers[0])
        self.layer2 = self._make_layer(2 * w, layers[1], stride=2, dilate=dilate[0])
        self.layer3 = self._make_layer(4 * w, layers[2], stride=2, dilate=dilate[1])
        self.layer4 = self._make_layer(8 * w, layers[3], stride=2, dilate=dilate[2])
        self.low_channels, self.high_channels = 4 * w, 32 * w
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                                       nn.BatchNorm2d(planes * Bottleneck.expansion))
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes, dilation=self.dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c1 = self.layer1(x)
        c4 = self.layer4(self.layer3(self.layer2(c1)))
        return c1, c4


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = 0 if kernel == 1 else dilation
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=padding, dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class ASPPPooling(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                 nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.gap(x), x.shape[-2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """1x1 branch, three dilated 3x3 branches, image pooling; projected to ``in_channels // 8``."""

    def __init__(self, in_channels: int, dilations: list[int]):
        super().__init__()
        out = in_channels // 8
        self.b0 = _conv_bn_relu(in_channels, out)
        self.b1, self.b2, self.b3 = (_conv_bn_relu(in_channels, out, 3, d) for d in dilations)
        self.b4 = ASPPPooling(in_channels, out)
        self.project = _conv_bn_relu(5 * out, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1))


class ASPPConcat(nn.Module):
    """U2PL's / DDFP's ASPP: image pooling, a 1x1 branch and three dilated 3x3 branches, each
    ``out_channels``, concatenated in that order (5 * ``out_channels``), without projection."""

    def __init__(self, in_channels: int, out_channels: int, dilations: list[int]):
        super().__init__()
        self.pool = ASPPPooling(in_channels, out_channels)
        self.b0 = _conv_bn_relu(in_channels, out_channels)
        self.b1, self.b2, self.b3 = (_conv_bn_relu(in_channels, out_channels, 3, d) for d in dilations)
        self.out_channels = 5 * out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.pool(x), self.b0(x), self.b1(x), self.b2(x), self.b3(x)], dim=1)


LOW_LEVEL_CHANNELS = 48  # the low-level projection of both decoders
DECODERS = ("unimatch", "u2pl")


class DeepLabV3Plus(SegmentationModel):
    """``decoder="unimatch"``: ``features(x)`` is the first fuse convolution's output (``feature_channels``,
    256 in the paper, at 1/4 resolution); ``seg_head``: the second fuse convolution (its block) + the 1x1
    classifier. ``decoder="u2pl"``: ``features(x)`` is the concatenation of the low-level projection (48
    channels) and the upsampled ASPP head (``feature_channels - 48``: 304 = 48 + 256 in DDFP); ``seg_head``:
    DDFP's classifier, two conv blocks of ``head_channels`` (256) with bias and Dropout2d(0.1) + the 1x1 conv."""

    align_corners = True  # UniMatch upsamples with align_corners=True

    def __init__(self, num_classes: int, backbone: str = "resnet101", output_stride: int = 16,
                 dilations: list[int] | None = None, feature_channels: int = 256, head_channels: int = 256,
                 deep_stem: bool = False, in_channels: int = 3, width: int = 64, decoder: str = "unimatch"):
        super().__init__()
        if decoder not in DECODERS:
            raise MitosegError(f"model.decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
        self.num_classes = num_classes
        self.decoder_name = decoder
        self.backbone = ResNet(LAYERS[backbone], output_stride, deep_stem, in_channels, width)
        high, low = self.backbone.high_channels, self.backbone.low_channels  # 2048, 256 at width 64
        dilations = list(dilations or DEFAULT_DILATIONS[output_stride])
        if decoder == "unimatch":
            self.aspp = ASPP(high, dilations)
            self.reduce = _conv_bn_relu(low, LOW_LEVEL_CHANNELS)
            self.fuse = _conv_bn_relu(high // 8 + LOW_LEVEL_CHANNELS, feature_channels, kernel=3)
            self.seg_head = SegmentationHead(feature_channels, head_channels, num_classes)
        else:
            if feature_channels <= LOW_LEVEL_CHANNELS:
                raise MitosegError(f"model.feature_channels must be more than {LOW_LEVEL_CHANNELS} for "
                                   f"model.decoder u2pl, got {feature_channels}")
            self.aspp = ASPPConcat(high, high // 8, dilations)  # DDFP: inner_planes 256
            self.aspp_head = nn.Sequential(
                nn.Conv2d(self.aspp.out_channels, feature_channels - LOW_LEVEL_CHANNELS, 3, padding=1, bias=False),
                nn.BatchNorm2d(feature_channels - LOW_LEVEL_CHANNELS), nn.ReLU(inplace=True), nn.Dropout2d(0.1))
            self.reduce = nn.Sequential(nn.Conv2d(low, LOW_LEVEL_CHANNELS, 1, bias=True),
                                        nn.BatchNorm2d(LOW_LEVEL_CHANNELS), nn.ReLU(inplace=True))
            self.seg_head = SegmentationHead(feature_channels, head_channels, num_classes, num_blocks=2,
                                             dropout=0.1, conv_bias=True)

    def _decode(self, c1: torch.Tensor, c4: torch.Tensor) -> torch.Tensor:
        """Backbone features (layer1, layer4) -> :meth:`features`."""
        if self.decoder_name == "unimatch":
            c4 = F.interpolate(self.aspp(c4), size=c1.shape[-2:], mode="bilinear", align_corners=True)
            return self.fuse(torch.cat([self.reduce(c1), c4], dim=1))
        c4 = F.interpolate(self.aspp_head(self.aspp(c4)), size=c1.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([self.reduce(c1), c4], dim=1)  # DDFP: cat((low_feat, aspp_out))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._decode(*self.backbone(x))

    def features_with_fp(self, x: torch.Tensor, p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
        """UniMatch's feature perturbation (``forward(x, need_fp=True)``): the backbone once, then the clean
        (c1, c4) and the dropped (dropout2d(c1, p), dropout2d(c4, p); always on, as UniMatch's fresh
        ``nn.Dropout2d(0.5)`` modules) features decoded as one batch of 2B, so the decoder's BatchNorms see
        both. Returns (features, perturbed features), each (B, feature_channels, H/4, W/4)."""
        c1, c4 = self.backbone(x)
        both = self._decode(torch.cat([c1, F.dropout2d(c1, p, training=True)]),
                            torch.cat([c4, F.dropout2d(c4, p, training=True)]))
        features, perturbed = both.chunk(2)
        return features, perturbed

    def logits(self, features: torch.Tensor, size, perturbed: bool = False) -> torch.Tensor:
        logits = self.head(features, perturbed=perturbed)
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)
        return logits

    def parts(self) -> dict[str, list[nn.Module]]:
        """The encoder is the ResNet backbone; the decoder ASPP, the low-level projection and the fuse
        convolution (``unimatch``) or the ASPP head (``u2pl``)."""
        decoder = [self.aspp, self.reduce, self.fuse if self.decoder_name == "unimatch" else self.aspp_head]
        return {"encoder": [self.backbone], "decoder": decoder}

    def backbone_parameters(self) -> list[nn.Parameter]:
        """The pretrained part (base learning rate); everything else gets ``optim.head_lr_multiplier``."""
        return list(self.backbone.parameters())


@register_model("deeplabv3plus")
def build_deeplab(cfg, num_classes: int) -> DeepLabV3Plus:
    return DeepLabV3Plus(num_classes, backbone=cfg.backbone, output_stride=cfg.output_stride,
                         dilations=cfg.aspp_dilations, feature_channels=cfg.feature_channels,
                         head_channels=cfg.head_channels, deep_stem=cfg.deep_stem, in_channels=cfg.in_channels,
                         width=cfg.width, decoder=cfg.decoder)


# ------------------------------------------------------------------ pretrained weights


def _unwrap_state_dict(state) -> dict:
    """A plain ``{name: tensor}`` dict from common wrappers (``state_dict``/``model`` keys, ``module.`` prefixes)."""
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MitosegError("not a state dict of tensors")
    prefixes = ("module.", "backbone.", "encoder.")
    out = {}
    for name, value in state.items():
        for prefix in prefixes:
            if name.startswith(prefix):
                name = name[len(prefix):]
        out[name] = value
    return out


def load_pretrained_backbone(model: DeepLabV3Plus, path: str | Path) -> None:
    """Load a torchvision-style ResNet state dict into ``model.backbone`` (``fc.*`` ignored).

    Any missing, unexpected or wrongly shaped key is an error that lists them all in one
    message: a partly loaded backbone would silently spoil a reproduction.
    """
    path = Path(path)
    key = "model.pretrained"
    if not path.is_file():
        raise MitosegError(f"config key '{key}': file not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        weights = _unwrap_state_dict(raw)
    except MitosegError as exc:
        raise MitosegError(f"{key} {path}: {exc}") from exc
    except Exception as exc:  # torch raises many kinds for corrupt or unsafe files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MitosegError(f"{key} {path}: not a readable state dict ({first[:200]})") from exc
    weights = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    own = model.backbone.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    mismatched = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in own
                  if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}")
        hint = ""
        deep_in_file = any(k.startswith("conv1.0.") for k in weights)
        deep_in_model = any(k.startswith("conv1.0.") for k in own)
        if deep_in_file != deep_in_model:
            hint = (f"; the file has {'a deep (ResNet-v1c)' if deep_in_file else 'a torchvision (7x7)'} stem: "
                    f"set model.deep_stem: {str(deep_in_file).lower()}")
        raise MitosegError(f"{key} {path} does not match the {type(model).__name__} backbone "
                           f"({len(own)} tensors): " + "; ".join(parts) + hint)
    model.backbone.load_state_dict({k: weights[k] for k in own}, strict=True)
