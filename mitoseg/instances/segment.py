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
   foreground probability (``probability``), seeded by the maxima of that relief whose
   dynamic (how far the relief falls on the way to a higher maximum) is at least ``seed_depth``
   of the object's own relief (the h-dome transform, scikit-image ``reconstruction`` /
   ``watershed``): by default (0.35) two mitochondria touching through a neck thinner than
   about 0.65 of their inscribed radius are cut there, while the bumps of a rod whose thickness
   varies by a quarter are not seeds; ``min_distance``, when given, also merges seeds closer
   than that many voxels;
4. objects smaller than ``min_voxels`` are removed and the ids renumbered 1..N; by default
   (``None``) the minimum comes from the volume's own objects: ``AUTO_MIN_FRACTION`` of the
   typical object (the voxel-weighted median size), which removes specks of false foreground
   and keeps objects of the size the volume's mitochondria have, at any voxel size.

Memory is the slab plus the bounding box of the largest object being split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from mitoseg.instances import AUTO_MIN_FRACTION, SEED_DEPTH
from mitoseg.instances.components import MappedIds, find_components, iter_slabs
from mitoseg.instances.postprocess import postprocess_labels

SPLITS = ("none", "distance", "probability")


@dataclass
class InstanceOptions:
    min_voxels: int | None = None  # objects smaller than this are removed (after splitting); None: from the data
    fill_holes: bool = False
    split: str = "none"  # none | distance | probability
    min_distance: int | None = None  # voxels: seeds of a split closer than this merge (None: no such merging)
    seed_depth: float = SEED_DEPTH  # a seed's dynamic, as a fraction of its object's relief
    slab: int = 16


class PieceLabels:
    """Each slab's piece labels (0 outside, 1..count) in a scratch volume made by ``make(shape, dtype)``: uint16
    while every slab written has at most 65535 pieces, then (the first slab with more) copied to a uint32 one.
    Read like an array (``pieces[z0:z1, ...]``, ``.shape``)."""

    def __init__(self, make: Callable[[tuple, np.dtype], np.ndarray], shape: tuple):
        self.make = make
        self.shape = tuple(shape)
        self.array = make(self.shape, np.uint16)
        self.written = 0  # slices written so far, in order

    def write(self, start: int, labels: np.ndarray, count: int) -> None:
        if self.array.dtype == np.uint16 and count > np.iinfo(np.uint16).max:
            wider = self.make(self.shape, np.uint32)
            for z in range(0, self.written, 16):
                wider[z:min(self.written, z + 16)] = self.array[z:min(self.written, z + 16)]
            self.array = wider
        self.array[start:start + labels.shape[0]] = labels.astype(self.array.dtype, copy=False)
        self.written = max(self.written, start + labels.shape[0])

    def __getitem__(self, key):
        return self.array[key]


class Segmented(NamedTuple):
    """What :func:`segment_instances` returns."""

    ids: np.ndarray  # (z, y, x) uint32 ids 0..count, read like an array
    count: int
    min_voxels: int  # the minimum object size applied (from the data unless given)
    removed: int  # objects smaller than it, removed


def typical_object_voxels(sizes: np.ndarray) -> int:
    """The voxel-weighted median object size: half of the foreground lies in objects at least this large.
    Unlike the plain median it is not pulled down by many specks of false foreground. 0 without objects."""
    sizes = np.sort(np.asarray(sizes, dtype=np.int64))
    sizes = sizes[sizes > 0]
    if sizes.size == 0:
        return 0
    cumulative = np.cumsum(sizes)
    return int(sizes[np.searchsorted(cumulative, cumulative[-1] / 2)])


def auto_min_voxels(sizes: np.ndarray) -> int:
    """The default minimum object size: ``AUTO_MIN_FRACTION`` of :func:`typical_object_voxels`, at least 1."""
    return max(1, int(AUTO_MIN_FRACTION * typical_object_voxels(sizes)))


def _scratch_array(shape: tuple, dtype) -> np.ndarray:
    return np.zeros(shape, dtype)


def split_object(mask: np.ndarray, min_distance: int | None = None, spacing=(1.0, 1.0, 1.0),
                 probability: np.ndarray | None = None, seed_depth: float = SEED_DEPTH) -> np.ndarray:
    """Pieces 1..k of one object (``mask``, a bool crop around it; 0 outside) by a seeded watershed of the
    negated relief: the distance to the background (in the units of ``spacing``), or ``probability``
    smoothed by one voxel. Seeds: the relief's maxima of dynamic at least ``seed_depth`` times the object's
    relief height (its inscribed radius; for a probability, its peak above the 0.5 boundary), each a
    connected plateau; with ``min_distance`` (voxels), a seed closer than that to a higher one is dropped.
    k = 1 when there is a single seed."""
    from skimage.morphology import local_maxima, reconstruction
    from skimage.segmentation import watershed

    if probability is None:
        relief = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
        height = float(relief.max()) if relief.size else 0.0
    else:
        relief = ndimage.gaussian_filter(np.where(mask, probability, 0).astype(np.float32), 1.0)
        height = max(float(relief[mask].max()) - 0.5, 0.0) if mask.any() else 0.0
    pieces = mask.astype(np.int32)
    if height <= 0:
        return pieces
    relief = np.where(mask, relief, 0).astype(np.float64)
    # The h-dome transform: the relief lowered by h and rebuilt under itself. Each maximum whose dynamic is at
    # least h leaves one plateau on top (its seed); lesser maxima merge into the plateau of a higher one.
    domes = reconstruction(relief - seed_depth * height, relief, method="dilation")
    seeds = local_maxima(domes, connectivity=mask.ndim, allow_borders=True) & mask
    markers, k = ndimage.label(seeds, structure=np.ones((3,) * mask.ndim))
    if k > 1 and min_distance:
        markers, k = _merge_close_seeds(relief, markers, k, min_distance)
    if k < 2:
        return pieces
    return watershed(-relief, markers, mask=mask).astype(np.int32)


def _merge_close_seeds(relief: np.ndarray, markers: np.ndarray, k: int, min_distance: float):
    """Drop every seed whose peak lies within ``min_distance`` voxels of a higher seed's (a handful of seeds
    per object: one k x k distance table)."""
    index = np.arange(1, k + 1)
    peaks = np.asarray(ndimage.maximum_position(relief, markers, index), dtype=np.float64)
    heights = np.asarray(ndimage.maximum(relief, markers, index))
    order = np.argsort(-heights, kind="stable")
    peaks = peaks[order]
    close = np.linalg.norm(peaks[:, None] - peaks[None], axis=-1) < min_distance
    kept = np.zeros(k, dtype=bool)
    for i in range(k):  # greedy, highest first: k is the seeds of one object
        kept[i] = not (close[i, :i] & kept[:i]).any()
    renumber = np.zeros(k + 1, dtype=np.int32)
    renumber[index[order][kept]] = np.arange(1, int(kept.sum()) + 1)
    return renumber[markers], int(kept.sum())


def segment_instances(read_mask: Callable[[int, int], np.ndarray], shape: tuple[int, int, int],
                      options: InstanceOptions, spacing=(1.0, 1.0, 1.0),
                      read_probability: Callable[[int, int], np.ndarray] | None = None,
                      scratch: Callable[[tuple, np.dtype], np.ndarray] | None = None,
                      progress: bool = False) -> Segmented:
    """Instance ids (uint32, 0 background, 1..N) of the foreground ``read_mask(start, stop)`` (bool slabs)
    of a (z, y, x) volume of ``shape``, in a scratch volume made by ``scratch(shape, dtype)`` (default: an
    array in memory; :class:`mitoseg.data.scratch.ScratchVolume` keeps it on disk).
    ``read_probability(start, stop)``: the foreground probability, for ``split: probability``.
    Returns :class:`Segmented`: the ids (the scratch volume, or, on disk without a split, a :class:`MappedIds`
    that reads them off the kept piece labels), N, the minimum size applied and how many objects it removed."""
    if options.split not in SPLITS:
        raise ValueError(f"unknown split {options.split!r}; expected one of {SPLITS}")
    make = scratch or _scratch_array
    num_slices, slab = shape[0], options.slab
    # On disk without a split or a filled mask the scratch volume only keeps the piece labels until MappedIds
    # reads them: in uint16 while every slab has fewer than 65536 pieces (half the bytes written).
    compact = scratch is not None and options.split == "none" and not options.fill_holes
    ids = PieceLabels(make, shape) if compact else make(shape, np.uint32)
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
        def write_labels(start: int, labels: np.ndarray, count: int) -> None:
            if compact:
                ids.write(start, labels, count)
            else:
                ids[start:start + labels.shape[0]] = labels.view(np.uint32)

        # Sizes, boxes and border contact only where a split (boxes) or a minimum size (sizes) needs them.
        measure = options.split != "none" or options.min_voxels is None or options.min_voxels > 1
        components = find_components(read_mask, num_slices, slab, write_labels=write_labels, measure=measure)
        count = components.count
        final = None
        if options.split == "none":
            min_voxels = auto_min_voxels(components.sizes) if options.min_voxels is None else options.min_voxels
            keep = components.sizes >= min_voxels if measure else np.ones(count, dtype=bool)
            final = np.zeros(count + 1, dtype=np.int64)
            final[1:][keep] = np.arange(1, int(keep.sum()) + 1)
            result = Segmented(ids, int(keep.sum()), min_voxels, count - int(keep.sum()))
            if scratch is not None:
                # On disk: the ids are mapped from the piece labels as they are read (no pass rewrites them).
                bar.update(3 * num_slices)
                return result._replace(ids=MappedIds(ids, components, final))
        for start, stop in iter_slabs(num_slices, slab):
            ids[start:stop] = components.slab_table(start, final)[ids[start:stop]]
        bar.update(num_slices)
        if options.split == "none":
            bar.update(2 * num_slices)
            return result
        # 3. splitting, object by object inside its bounding box
        next_id = count + 1
        for index, box in enumerate(components.bboxes):
            z0, y0, x0, z1, y1, x1 = (int(v) for v in box)
            crop = np.asarray(ids[z0:z1, y0:y1, x0:x1])
            mask = crop == index + 1
            probability = None
            if options.split == "probability":
                probability = np.asarray(read_probability(z0, z1), dtype=np.float32)[:, y0:y1, x0:x1]
            pieces = split_object(mask, options.min_distance, spacing, probability, options.seed_depth)
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
        min_voxels = auto_min_voxels(sizes[1:]) if options.min_voxels is None else options.min_voxels
        keep = sizes >= max(1, min_voxels)
        keep[0] = False
        removed = int((sizes[1:] > 0).sum() - keep.sum())
        renumber = np.zeros(count + 1, dtype=np.uint32)
        renumber[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
        if not np.array_equal(renumber, np.arange(count + 1, dtype=np.uint32)):
            for start, stop in iter_slabs(num_slices, slab):
                ids[start:stop] = renumber[ids[start:stop]]
        bar.update(num_slices)
    return Segmented(ids, int(keep.sum()), min_voxels, removed)
