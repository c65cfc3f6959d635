"""Prediction of whole volumes: sliding windows slab by slab, test-time augmentation, mixed precision.

``VolumePredictor`` (``predictor.py``) is what validation, ``mitoseg predict``,
``mitoseg evaluate --checkpoint`` and the napari Predict widget call; ``tta.py``
holds the flips / quarter turns, ``precision.py`` the autocast type and memory
layout of a device.
"""

from mitoseg.inference.precision import amp_dtype, autocast, cpu_has_native_bf16, fast_memory_format
from mitoseg.inference.predictor import (
    VolumePredictor,
    labels_from_probabilities,
    make_inferer,
    predict_volume,
    score_volume,
)
from mitoseg.inference.tta import predict_with_tta, tta_transforms
from mitoseg.instances.components import iter_slabs

__all__ = ["VolumePredictor", "amp_dtype", "autocast", "cpu_has_native_bf16", "fast_memory_format", "iter_slabs",
           "labels_from_probabilities", "make_inferer", "predict_volume", "predict_with_tta", "score_volume",
           "tta_transforms"]
