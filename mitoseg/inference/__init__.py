"""Prediction of whole volumes: sliding windows slab by slab, test-time augmentation, mixed precision.

``VolumePredictor`` (``predictor.py``) is what validation, ``mitoseg predict``,
``mitoseg evaluate --checkpoint`` and the napari Predict widget call; ``tta.py``
holds the flips / quarter turns; ``session.py`` the one path from a model file to a
predictor (the autocast type and memory layout of a device: :mod:`mitoseg.device`).
"""

from mitoseg.inference.predictor import (
    VolumePredictor,
    labels_from_probabilities,
    make_inferer,
    predict_volume,
    score_volume,
)
from mitoseg.inference.tta import predict_with_tta, tta_transforms
from mitoseg.instances.components import iter_slabs

__all__ = ["VolumePredictor", "iter_slabs", "labels_from_probabilities", "make_inferer", "predict_volume", "predict_with_tta", "score_volume",
           "tta_transforms"]
