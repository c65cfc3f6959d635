"""Instances from a predicted mask: 3-D objects with uint32 ids 1..N, in memory bounded by the slab.

1. (``fill_holes``) background enclosed by foreground in 3-D becomes foreground
   (:func:`mitoseg.instances.postprocess.postprocess_labels`), so a hole joins the
   object around it;
2. face-connected components slab by slab (:mod:`mitoseg.instances.components`), each slab labelled
   once and its piece labels mapped to object ids by a table in a second pass (without a split, with
   step 4 in the same table), written into a scratch volume of uint32 ids (a file on disk for ``predict`` and
   ``instances``, :mod:`mitoseg.data.scratch`, so the volume never has to fit in memory);
3. (``split``) touching objects are cut apart one object at a time, each within its
   bounding box: a watershed of the negated distance to the background
   (``distance``, scipy's EDT in the voxel size's units) or of the negated
   foreground probability (``probability``), seeded by the local maxima at least
   ``min_distance`` voxels apart (scikit-image ``peak_local_max`` / ``watershed``);
4. objects smaller than ``min_voxels`` are removed and the ids renumbered 1..N.

Memory is the slab plus the bounding box of the largest object being split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from mitoseg.instances.components import MappedIds, find_components, iter_slabs
from mitoseg.instances.postprocess import postprocess_labels

SPLITS = ("none", "distance", "probability")


@dataclass
class InstanceOptions:
    min_voxels: int = 0  # objects smaller than this are removed (after splitting)
    fill_holes: bool = False
    split: str = "none"  # none | distance | probability
    min_distance: int = 10  # voxels between two seeds of a split
    slab: int = 16


def _scratch_array(shape: tuple, dtype) -> np.ndarray:
    return np.zeros(shape, dtype)


def split_object(mask: np.ndarray, min_distance: int, spacing=(1.0, 1.0, 1.0),
                 probability: np.ndarray | None = None) -> np.ndarray:
    """Pieces 1..k of one object (``mask``, a bool crop around it; 0 outside) by a seeded watershed of the
    negated distance to the background (or of the negated ``probability`` smoothed at ``min_distance / 2``
    voxels), seeds at the local maxima at least ``min_distance`` voxels apart. k = 1 when there is a
    single seed."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    if probability is None:
        relief = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    else:
        relief = ndimage.gaussian_filter(np.where(mask, probability, 0).astype(np.float32), max(min_distance / 2, 0.5))
    peaks = peak_local_max(relief, min_distance=max(1, int(min_distance)), labels=mask.astype(np.int32),
                           exclude_border=False)
    pieces = mask.astype(np.int32)
    if len(peaks) < 2:
        return pieces
    markers = np.zeros(mask.shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-relief, markers, mask=mask).astype(np.int32)


def segment_instances(read_mask: Callable[[int, int], np.ndarray], shape: tuple[int, int, int],
                      options: InstanceOptions, spacing=(1.0, 1.0, 1.0),
                      read_probability: Callable[[int, int], np.ndarray] | None = None,
                      scratch: Callable[[tuple, np.dtype], np.ndarray] | None = None,
                      progress: bool = False) -> tuple[np.ndarray, int]:
    """Instance ids (uint32, 0 background, 1..N) of the foreground ``read_mask(start, stop)`` (bool slabs)
    of a (z, y, x) volume of ``shape``, in a scratch volume made by ``scratch(shape, dtype)`` (default: an
    array in memory; :class:`mitoseg.data.scratch.ScratchVolume` keeps it on disk).
    ``read_probability(start, stop)``: the foreground probability, for ``split: probability``.
    Returns (the ids, N): the scratch volume, or (on disk, without a split) a :class:`MappedIds` that reads the
    ids off the kept piece labels."""
    if options.split not in SPLITS:
        raise ValueError(f"unknown split {options.split!r}; expected one of {SPLITS}")
    make = scratch or _scratch_array
    num_slices, slab = shape[0], options.slab
    ids = make(shape, np.uint32)
    with tqdm(total=4 * num_slices, desc="instances", unit="slice", disable=not progress, leave=False) as bar:
        # 1. (fill_holes) the mask with enclosed holes filled, in the scratch volume as 0 / 1
        if options.fill_holes:
            for start, stop in iter_slabs(num_slices, slab):
                ids[start:stop] = np.asarray(read_mask(start, stop), dtype=bool)

            def put(start: int, values: np.ndarray) -> None:
                ids[start:start + values.shape[0]] = values

            postprocess_labels(lambda s, e: ids[s:e], put, num_slices, fill_holes=True, slab=slab)
            read_mask = lambda s, e: ids[s:e] > 0  # noqa: E731  (the filled mask from here on)
        bar.update(num_slices)
        # 2. components, numbered 1..N in order of their first voxel: each slab labelled once, its piece labels
        # kept in the scratch volume and mapped to their objects by a table (without a split, straight to the
        # final ids 1..N with the small objects out: step 4 is then part of this pass)
        def write_labels(start: int, labels: np.ndarray) -> None:
            ids[start:start + labels.shape[0]] = labels

        # Sizes, boxes and border contact only where a split (boxes) or a minimum size (sizes) needs them.
        measure = options.split != "none" or options.min_voxels > 1
        components = find_components(read_mask, num_slices, slab, write_labels=write_labels, measure=measure)
        count = components.count
        final = None
        if options.split == "none":
            keep = components.sizes >= options.min_voxels if measure else np.ones(count, dtype=bool)
            final = np.zeros(count + 1, dtype=np.int64)
            final[1:][keep] = np.arange(1, int(keep.sum()) + 1)
            if scratch is not None:
                # On disk: the ids are mapped from the piece labels as they are read (no pass rewrites them).
                bar.update(3 * num_slices)
                return MappedIds(ids, components, final), int(keep.sum())
        for start, stop in iter_slabs(num_slices, slab):
            ids[start:stop] = components.slab_table(start, final)[ids[start:stop]]
        bar.update(num_slices)
        if options.split == "none":
            bar.update(2 * num_slices)
            return ids, int(keep.sum())
        # 3. splitting, object by object inside its bounding box
        next_id = count + 1
        for index, box in enumerate(components.bboxes):
            z0, y0, x0, z1, y1, x1 = (int(v) for v in box)
            crop = np.asarray(ids[z0:z1, y0:y1, x0:x1])
            mask = crop == index + 1
            probability = None
            if options.split == "probability":
                probability = np.asarray(read_probability(z0, z1), dtype=np.float32)[:, y0:y1, x0:x1]
            pieces = split_object(mask, options.min_distance, spacing, probability)
            k = int(pieces.max())
            if k > 1:
                new_ids = np.concatenate([[0, index + 1], np.arange(next_id, next_id + k - 1)]).astype(np.uint32)
                crop[mask] = new_ids[pieces[mask]]
                ids[z0:z1, y0:y1, x0:x1] = crop
                next_id += k - 1
        count = next_id - 1
        bar.update(num_slices)
        # 4. small objects out, ids 1..N
        sizes = np.zeros(count + 1, dtype=np.int64)
        for start, stop in iter_slabs(num_slices, slab):
            for plane in ids[start:stop]:  # a plane at a time: bincount widens its input to int64
                sizes += np.bincount(plane.ravel(), minlength=count + 1)
        keep = sizes >= max(1, options.min_voxels)
        keep[0] = False
        renumber = np.zeros(count + 1, dtype=np.uint32)
        renumber[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
        if not np.array_equal(renumber, np.arange(count + 1, dtype=np.uint32)):
            for start, stop in iter_slabs(num_slices, slab):
                ids[start:stop] = renumber[ids[start:stop]]
        bar.update(num_slices)
    return ids, int(keep.sum())
