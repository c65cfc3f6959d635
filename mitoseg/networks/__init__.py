"""Segmentation networks behind one interface.

Every network is a :class:`SegmentationModel`: ``features(x)`` returns the last
decoder feature map, ``head(features)`` the class logits at feature resolution,
and ``forward(x)`` the logits at input resolution. Feature-level methods
(UniMatch's dropout, DDFP's perturbation) work through ``features``/``head`` only.
Networks are built by name from a small registry (``build_model``).
"""

from mitoseg.networks.base import SegmentationHead, SegmentationModel
from mitoseg.networks.registry import build_model, register_model
from mitoseg.networks import unet as _unet  # noqa: F401  (registers "unet")
from mitoseg.networks import deeplab as _deeplab  # noqa: F401  (registers "deeplabv3plus")
from mitoseg.networks import wide_unet as _wide_unet  # noqa: F401  (registers "wide_unet")

__all__ = ["SegmentationHead", "SegmentationModel", "build_model", "register_model"]
