"""Scoring an EM model on a labelled volume read from disk: ``data.test`` at the end of training and
``mitoseg evaluate --checkpoint RUN/best.pt --image VOL --label VOL``, one function for both, so the
two give the same numbers."""

from __future__ import annotations

import numpy as np
import torch

from mitoseg.config import loss_ignore_index
from mitoseg.data.datasets import apply_label_map, check_label_values
from mitoseg.data.readers import SliceReader, open_volume, select_slices
from mitoseg.data.transforms import compute_normalization, sample_for_stats
from mitoseg.errors import MitosegError
from mitoseg.inference.predictor import VolumePredictor, score_volume
from mitoseg.metrics import scores_from_confusion


def score_em_volume(model: torch.nn.Module, cfg, image: str, label: str, slices, device: torch.device,
                    slices_key: str = "data.test.slices", progress: bool = False, description: str = "test") -> dict:
    """Scores of ``model`` (a run's network, with the run's config ``cfg``: normalization, 2.5-D context,
    inference settings and post-processing) on the slices ``slices`` of ``image`` against ``label``.

    Both volumes are read slab by slab; the normalization statistics are the image volume's own, as
    ``mitoseg predict`` computes them. ``slices_key`` names the slice selection in error messages.
    """
    ignore_index = loss_ignore_index(cfg.train)
    k = cfg.data.num_classes
    with open_volume(image, finite=True) as image_volume, open_volume(label) as label_volume:
        if label_volume.shape != image_volume.shape:
            raise MitosegError(f"{label}: label shape {label_volume.shape} differs from image {image} shape "
                               f"{image_volume.shape}")
        indices = select_slices(slices, len(image_volume), slices_key)
        normalization = compute_normalization(sample_for_stats(image_volume), cfg.data.normalize, what=image)
        images = SliceReader(image_volume, indices, cfg.data.context_slices)
        labels = SliceReader(label_volume, indices)

        def read_label(start: int, stop: int) -> np.ndarray:
            values = apply_label_map(labels.read(start, stop), cfg.data.label_map)
            check_label_values(values, k, ignore_index, label)
            return values

        predictor = VolumePredictor(model, cfg, device)
        matrix = score_volume(predictor, images.read, read_label, len(indices), normalization, ignore_index,
                              progress=progress, description=description)
    scores = scores_from_confusion(matrix)
    scores.update({"image": image, "label": label, "slices": len(indices)})
    return scores
