"""Scoring an EM model on a labelled volume read from disk: ``data.test`` at the end of training and
``mitoseg evaluate --checkpoint RUN/best.pt --image VOL --label VOL``, one function for both, so the
two give the same numbers."""

from __future__ import annotations

import numpy as np

from mitoseg.config import loss_ignore_index
from mitoseg.data.datasets import apply_label_map, check_label_values
from mitoseg.data.readers import SliceReader, open_volume, select_slices
from mitoseg.data.resample import volume_pixel_nm
from mitoseg.errors import MitosegError
from mitoseg.inference.predictor import score_volume
from mitoseg.inference.session import LoadedModel, Segmenter
from mitoseg.metrics import scores_from_confusion


def score_em_volume(loaded: LoadedModel, cfg, image: str, label: str, slices, voxel_size=None,
                    slices_key: str = "data.test.slices", pixel_hint: str = "data.test.voxel_size: [z, y, x]",
                    progress: bool = False, description: str = "test") -> dict:
    """Scores of ``loaded`` (a run's network; ``cfg``: the run's config or an evaluation config with its
    normalization, 2.5-D context, inference settings and post-processing) on the slices ``slices`` of ``image``
    against ``label``, always on the volumes' own grid: with a working pixel size (``data.pixel_size``) the
    predictor resamples the image to it and the probabilities back before the argmax.

    Both volumes are read slab by slab; the normalization statistics are the image volume's own, as
    ``mitoseg predict`` computes them. ``voxel_size`` (z, y, x nm) overrides the image's metadata;
    ``slices_key`` / ``pixel_hint`` name the slice selection / where to set the pixel size in error messages.
    """
    ignore_index = loss_ignore_index(cfg.train)
    k = cfg.data.num_classes
    segmenter = Segmenter(loaded, cfg)
    with open_volume(image, finite=True) as image_volume, open_volume(label) as label_volume:
        if label_volume.shape != image_volume.shape:
            raise MitosegError(f"{label}: label shape {label_volume.shape} differs from image {image} shape "
                               f"{image_volume.shape}")
        indices = select_slices(slices, len(image_volume), slices_key)
        prepared = segmenter.prepare(image_volume, image, volume_pixel_nm(image, voxel_size), pixel_hint, indices)
        labels = SliceReader(label_volume, indices)

        def read_label(start: int, stop: int) -> np.ndarray:
            values = apply_label_map(labels.read(start, stop), cfg.data.label_map)
            check_label_values(values, k, ignore_index, label)
            return values

        matrix = score_volume(prepared.predictor, prepared.read, read_label, len(indices), prepared.normalization,
                              ignore_index, progress=progress, description=description)
    scores = scores_from_confusion(matrix)
    scores.update({"image": image, "label": label, "slices": len(indices)})
    return scores
