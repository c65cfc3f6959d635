"""Post-processing of a predicted two-class label volume, as published EM pipelines do.

1. Foreground objects (3-D, face-connected) smaller than ``inference.min_object_voxels``
   become background: isolated false detections.
2. With ``inference.fill_holes``, background regions enclosed by foreground in 3-D
   (not reaching any face of the volume) become foreground.

Both work slab by slab (``mitoseg.instances.components``): memory is bounded by
the slab, whatever the volume, and the labels are rewritten in place through
``read`` / ``write`` (a NumPy array, or a scratch file on disk for ``predict``,
:mod:`mitoseg.data.scratch`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from mitoseg.instances.components import find_components, iter_slabs


def _rewrite(read: Callable[[int, int], np.ndarray], write: Callable[[int, np.ndarray], None], num_slices: int,
             slab: int, select: Callable[[np.ndarray], np.ndarray], keep: Callable[[np.ndarray], np.ndarray],
             value: int, bar) -> None:
    """Voxels of the components of ``select(labels)`` whose object index fails ``keep`` are set to ``value``."""
    components = find_components(lambda s, e: select(read(s, e)), num_slices, slab, progress=bar.update)
    drop = ~keep(components)
    if not drop.any():
        bar.update(num_slices)
        return
    dropped = np.concatenate([[False], drop])  # index 0: outside the selection
    for start, stop in iter_slabs(num_slices, slab):
        labels = read(start, stop)
        change = dropped[components.objects(start, select(labels))]
        if change.any():
            labels = labels.copy()
            labels[change] = value
            write(start, labels)
        bar.update(stop - start)


def postprocess_labels(read: Callable[[int, int], np.ndarray], write: Callable[[int, np.ndarray], None],
                       num_slices: int, min_object_voxels: int = 0, fill_holes: bool = False, slab: int = 16,
                       progress: bool = False) -> None:
    """Remove small foreground objects, then fill enclosed holes, of the labels (0 / 1) given by
    ``read(start, stop)``; changed slabs are stored with ``write(start, labels)``."""
    steps = (min_object_voxels > 0) + bool(fill_holes)
    if not steps:
        return
    with tqdm(total=2 * steps * num_slices, desc="post-process", unit="slice", disable=not progress,
              leave=False) as bar:
        if min_object_voxels > 0:
            _rewrite(read, write, num_slices, slab, lambda labels: labels > 0,
                     lambda c: c.sizes >= min_object_voxels, 0, bar)
        if fill_holes:
            _rewrite(read, write, num_slices, slab, lambda labels: labels == 0,
                     lambda c: c.touches_border, 1, bar)
