"""The architecture of a bioimage.io package's ``pytorch_state_dict`` weights for networks other than the U-Net
(DeepLabV3+), imported from an installed mitoseg: ``MitosegNetwork(model=..., num_classes=..., in_channels=...)``
is the run's network followed by the softmax over its classes; its state dict is the one the package holds."""

from __future__ import annotations

import dataclasses

from mitoseg.config import ModelConfig
from mitoseg.export.torchscript import Probabilities
from mitoseg.networks import build_model


def MitosegNetwork(model: dict, num_classes: int, in_channels: int) -> Probabilities:  # noqa: N802 (a class-like name)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in model.items() if k in names})
    return Probabilities(build_model(cfg, num_classes, in_channels)).eval()
