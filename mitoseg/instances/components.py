"""3-D connected components of a binary volume, slab by slab, in memory bounded by the slab.

Each slab of ``slab`` slices is labelled on its own (``scipy.ndimage.label``, face
connectivity); the labels of slab ``s`` are numbered after those of the slabs
before it, so every component piece has a global id. Pieces that touch across the
face between two slabs are joined: the pairs of ids facing each other are the
edges of a graph whose connected components (``scipy.sparse.csgraph``) are the 3-D
objects. Only one plane of ids is kept from slab to slab. A second pass labels
each slab again (the same ids, labelling is deterministic) and maps its pieces to
their objects; the result equals labelling the whole volume at once, up to the
numbering of the objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# Face connectivity (6 neighbours in 3-D): two voxels touching only at an edge or a corner are apart.
_STRUCTURE = ndimage.generate_binary_structure(3, 1)


def label_slab(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Face-connected components of a (z, y, x) boolean slab: int32 ids 1..n (0: outside the mask), n."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    count = ndimage.label(mask, structure=_STRUCTURE, output=labels)
    return labels, int(count)


def iter_slabs(num_slices: int, slab: int) -> Iterator[tuple[int, int]]:
    for start in range(0, num_slices, slab):
        yield start, min(start + slab, num_slices)


@dataclass
class SlabComponents:
    """What the first pass learnt: the object of every piece and every object's size and border contact.

    ``offsets[s]``: global id of slab s's piece 0 (its piece i has global id ``offsets[s] + i``; id 0
    of every slab is the outside); ``obj``: object index of each global id (``obj[offsets[s]]`` is
    unused); ``sizes``: voxels per object; ``touches_border``: whether the object reaches a face of
    the volume (first or last slice, or the y / x edges); ``bboxes``: each object's bounding box.
    """

    num_slices: int
    slab: int
    offsets: np.ndarray
    obj: np.ndarray
    count: int  # objects
    # None when find_components ran with measure=False (the ids alone are wanted)
    sizes: np.ndarray | None
    touches_border: np.ndarray | None
    bboxes: np.ndarray | None  # (objects, 6): z0, y0, x0, z1, y1, x1 (half-open) of every object

    def objects(self, start: int, mask: np.ndarray) -> np.ndarray:
        """Object index + 1 of every voxel of the slab starting at ``start`` (0 outside the mask), uint32."""
        labels, _ = label_slab(mask)
        return self.slab_table(start)[labels]

    def slab_table(self, start: int, final: np.ndarray | None = None) -> np.ndarray:
        """uint32 table from the piece labels of the slab starting at ``start`` (as :func:`label_slab` numbers
        them, 0 outside) to object index + 1, or to ``final[object index + 1]`` (a renumbering, 0: dropped): a
        table as small as the slab's pieces, indexed by its labels (no int64 volume of global ids)."""
        index = start // self.slab
        first = int(self.offsets[index])
        stop = int(self.offsets[index + 1]) if index + 1 < len(self.offsets) else self.obj.shape[0]
        objects = self.obj[first:stop] + 1  # the outside (obj -1) becomes 0
        return (final[objects] if final is not None else objects).astype(np.uint32)


def find_components(read_mask: Callable[[int, int], np.ndarray], num_slices: int, slab: int,
                    progress: Callable[[int], None] | None = None,
                    write_labels: Callable[[int, np.ndarray, int], None] | None = None,
                    measure: bool = True) -> SlabComponents:
    """First pass over a binary volume given by ``read_mask(start, stop)`` -> (n, y, x) bool. ``write_labels(start,
    labels, count)``: each slab's piece labels (int32, 0 outside, 1..count), kept by the caller so that a second pass maps them
    to objects with :meth:`SlabComponents.slab_table` instead of labelling the slab again. ``measure=False``: no
    sizes, boxes or border contact (a third of the pass), when only the objects' ids are wanted."""
    offsets, sizes, border_ids, piece_boxes = [], [], [], []
    edges_a, edges_b = [], []
    total = 0  # global ids used so far, each slab's id 0 included
    previous_last, previous_offset = None, 0
    for start, stop in iter_slabs(num_slices, slab):
        mask = np.asarray(read_mask(start, stop), dtype=bool)
        labels, count = label_slab(mask)
        if write_labels is not None:
            write_labels(start, labels, count)
        offsets.append(total)
        if measure:
            # A plane at a time: bincount widens its input to int64 (twice the int32 slab).
            sizes.append(sum(np.bincount(plane.ravel(), minlength=count + 1) for plane in labels))
            boxes = np.zeros((count + 1, 6), dtype=np.int64)  # row 0: the outside, left empty
            for i, box in enumerate(ndimage.find_objects(labels), start=1):
                boxes[i] = [box[0].start + start, box[1].start, box[2].start, box[0].stop + start, box[1].stop,
                            box[2].stop]
            piece_boxes.append(boxes)
            border = [labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]]
            if start == 0:
                border.append(labels[0])
            if stop == num_slices:
                border.append(labels[-1])
            border_ids.append(np.unique(np.concatenate([b.ravel() for b in border])) + total)
        if previous_last is not None:
            first = labels[0] + total
            touching = (previous_last > previous_offset) & (first > total)
            pairs = np.unique(np.stack([previous_last[touching], first[touching]]), axis=1)
            edges_a.append(pairs[0])
            edges_b.append(pairs[1])
        previous_last, previous_offset = labels[-1] + total, total
        total += count + 1
        del mask, labels  # before the next slab is read: one slab in memory at a time, not two
        if progress is not None:
            progress(stop - start)
    offsets = np.asarray(offsets, dtype=np.int64)
    a = np.concatenate(edges_a) if edges_a else np.zeros(0, np.int64)
    b = np.concatenate(edges_b) if edges_b else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(total, total))
    _, component = connected_components(graph, directed=False)
    # Number the objects 0.. in order of their first piece, leaving out the slabs' id 0 (the outside).
    is_piece = np.ones(total, dtype=bool)
    is_piece[offsets] = False
    roots, first_seen = np.unique(component[is_piece], return_index=True)
    order = np.argsort(first_seen)
    renumber = np.full(component.max() + 1 if total else 1, -1, dtype=np.int64)
    renumber[roots[order]] = np.arange(roots.size)
    obj = renumber[component]
    obj[~is_piece] = -1
    if not measure:
        return SlabComponents(num_slices=num_slices, slab=slab, offsets=offsets, obj=obj, count=int(roots.size),
                              sizes=None, touches_border=None, bboxes=None)
    piece_sizes = np.concatenate(sizes).astype(np.int64)
    object_sizes = np.bincount(obj[is_piece], weights=piece_sizes[is_piece], minlength=roots.size).astype(np.int64)
    touches = np.zeros(roots.size, dtype=bool)
    border_pieces = np.concatenate(border_ids) if border_ids else np.zeros(0, np.int64)
    border_pieces = border_pieces[is_piece[border_pieces]]
    touches[obj[border_pieces]] = True
    bboxes = np.zeros((roots.size, 6), dtype=np.int64)
    if roots.size:
        boxes = np.concatenate(piece_boxes)[is_piece]
        owner = obj[is_piece]
        bboxes[:, :3] = np.iinfo(np.int64).max
        np.minimum.at(bboxes[:, :3], owner, boxes[:, :3])
        np.maximum.at(bboxes[:, 3:], owner, boxes[:, 3:])
    return SlabComponents(num_slices=num_slices, slab=slab, offsets=offsets, obj=obj, count=int(roots.size),
                          sizes=object_sizes, touches_border=touches, bboxes=bboxes)


class MappedIds:
    """Object ids read like a (z, y, x) uint32 array (``ids[z0:z1]``, ``ids[z0:z1, y0:y1, x0:x1]``, ``.shape``)
    while they are held as each slab's piece labels (``pieces``, e.g. a scratch file written by
    :func:`find_components`) and a table per slab: mapped as they are read, so no pass writes the ids
    themselves."""

    dtype = np.dtype(np.uint32)

    def __init__(self, pieces, components: SlabComponents, final: np.ndarray | None = None):
        self.pieces = pieces
        self.shape = tuple(int(n) for n in pieces.shape)
        self.slab = components.slab
        self.tables = [components.slab_table(start, final) for start, _ in iter_slabs(self.shape[0], self.slab)]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        z, rest = key[0], key[1:]
        if isinstance(z, (int, np.integer)):
            index = int(z) % self.shape[0]
            return self[(slice(index, index + 1), *rest)][0]
        start, stop, step = z.indices(self.shape[0])
        if step != 1:
            raise IndexError("MappedIds reads contiguous z ranges")
        parts = []
        for first in range(start - start % self.slab, stop, self.slab):
            lo, hi = max(start, first), min(stop, first + self.slab)
            if lo < hi:
                parts.append(self.tables[first // self.slab][np.asarray(self.pieces[(slice(lo, hi), *rest)])])
        if not parts:
            return np.zeros((0, *np.broadcast_to(0, self.shape[1:])[rest].shape), np.uint32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype)
