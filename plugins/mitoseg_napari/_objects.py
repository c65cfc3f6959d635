"""3-D objects for the widgets: instance ids from a mask, their measurements, the voxel size of a layer.

The work is :func:`mitoseg.instances.segment.segment_instances` and
:func:`mitoseg.instances.measure.measure_objects` (what ``mitoseg instances``
runs); this module adapts them to napari layers (numpy or dask arrays, 2-D or
3-D, any integer ids) and holds the option controls that the Predict widget and
the Objects dock share. No matplotlib here: the Predict widget imports it.
"""

from __future__ import annotations

import math

import numpy as np
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QSpinBox, QWidget

from mitoseg.errors import MitosegError
from mitoseg.instances import AUTO_MIN_FRACTION, SEED_DEPTH
from mitoseg_napari._layers import LAYER_KEY

SPLIT_CHOICES = ("none", "distance")
#: sparse ids (the highest above this and above twice the number of objects) are renumbered 1..K before
#: measuring: the measurement counts with arrays of (highest id + 1) entries per slice
DENSE_IDS = 4096


def voxel_size_nm(layer) -> tuple[float, float, float] | None:
    """nm per voxel (z, y, x) of a 3-D layer whose units are lengths (``layer.units``: nm, um, ...), from its
    scale; None when the layer is not 3-D or its units are not physical (napari's default is pixels)."""
    if layer is None or layer.ndim != 3:
        return None
    units = getattr(layer, "units", None)
    if units is None or len(units) != 3:
        return None
    sizes = []
    for scale, unit in zip(layer.scale, units):
        try:
            factor = float((1 * unit).to("nm").magnitude)
        except Exception:  # noqa: BLE001 - pint: not a length (pixel, second, ...)
            return None
        size = float(scale) * factor
        if not (math.isfinite(size) and size > 0):
            return None
        sizes.append(float(f"{size:.12g}"))  # 1 um -> 1000.0 nm, not 999.9999999999999
    return tuple(sizes)


def as_volume(data):
    """A (z, y, x) view of a 2-D or 3-D layer's data (a 2-D image is one slice)."""
    if data.ndim == 2:
        return data[None]
    if data.ndim != 3:
        raise MitosegError(f"expected a 2-D image or a (z, y, x) volume, got shape {tuple(data.shape)}")
    return data


def _slabs(n: int, slab: int):
    for start in range(0, n, slab):
        yield start, min(start + slab, n)


def find_objects(labels, options, voxel_size=None, foreground=None):
    """Instance ids (uint32 (z, y, x), 1..N) of the foreground (label > 0) of ``labels`` and their
    measurements. ``foreground``: the foreground probability (same shape), for the split by
    probability and the mean probability of each object. Returns (ids, N, Measurements)."""
    from mitoseg.instances.measure import measure_objects
    from mitoseg.instances.segment import segment_instances

    labels = as_volume(labels)
    if np.dtype(labels.dtype).kind not in "biu":
        raise MitosegError(f"finding objects needs integer labels, got {labels.dtype}")
    read_probability = None
    if foreground is not None:
        foreground = as_volume(foreground)

        def read_probability(start: int, stop: int) -> np.ndarray:
            return np.asarray(foreground[start:stop], dtype=np.float32)

    shape = tuple(int(n) for n in labels.shape)
    ids, count, *_ = segment_instances(lambda s, e: np.asarray(labels[s:e]) > 0, shape, options,
                                       spacing=voxel_size or (1.0, 1.0, 1.0), read_probability=read_probability)
    measurements = measure_objects(ids, count, voxel_size, read_probability, slab=options.slab)
    return ids, count, measurements


def measure_ids(data, voxel_size=None, slab: int = 16):
    """Measurements of the objects of an instance layer's data (ids > 0; any integer dtype; numpy or
    dask). Sparse large ids are renumbered for the measurement and given back in the table."""
    from mitoseg.instances.measure import measure_objects

    ids = as_volume(data)
    if np.dtype(ids.dtype).kind not in "biu":
        raise MitosegError(f"an instance layer holds integer ids, not {ids.dtype}")
    n = int(ids.shape[0])
    low, high, present = 0, 0, np.zeros(0, dtype=ids.dtype)
    for start, stop in _slabs(n, slab):
        block = np.asarray(ids[start:stop])
        if block.size:
            low, high = min(low, int(block.min())), max(high, int(block.max()))
            present = np.union1d(present, np.unique(block[block > 0]))
    if low < 0:
        raise MitosegError("object ids must not be negative")
    if high <= max(DENSE_IDS, 2 * len(present)):
        return measure_objects(ids, high, voxel_size, slab=slab)
    # e.g. random uint64 ids: measured as 1..K, then the rows get their ids back
    keys = np.concatenate([np.zeros(1, dtype=present.dtype), present])
    dense = np.empty(ids.shape, dtype=np.uint32)
    for start, stop in _slabs(n, slab):
        dense[start:stop] = np.searchsorted(keys, np.asarray(ids[start:stop]))
    measurements = measure_objects(dense, len(present), voxel_size, slab=slab)
    for row in measurements.rows:
        row["id"] = int(keys[row["id"]])
    return measurements


def objects_features(measurements) -> dict[str, list]:
    """Labels ``features``: hovering an object shows its volume and voxel count in the status bar."""
    unit = measurements.volume_unit
    rows = measurements.rows
    return {"index": [0] + [row["id"] for row in rows],
            f"volume ({unit})": [float("nan")] + [float(row["volume"]) for row in rows],
            "voxels": [0] + [int(row["voxels"]) for row in rows]}


def objects_metadata(measurements, voxel_size, **extra) -> dict:
    """``metadata`` of an instance Labels layer: what the Objects dock shows without measuring again."""
    return {LAYER_KEY: {"role": "objects", "measurements": measurements, "voxel_size_nm": voxel_size, **extra}}


class ObjectOptions(QWidget):
    """Split (none / distance), the split's seed depth and seed distance, minimum object size in voxels; the
    defaults are those of ``mitoseg instances`` (the minimum size from the volume's own objects)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.split = QComboBox()
        self.split.addItems(list(SPLIT_CHOICES))
        self.split.setToolTip("distance: cut touching objects apart by a seeded watershed of the distance to "
                              "the background")
        self.seed_depth = QDoubleSpinBox()
        self.seed_depth.setRange(0.05, 0.95)
        self.seed_depth.setSingleStep(0.05)
        self.seed_depth.setValue(SEED_DEPTH)
        self.seed_depth.setToolTip("a split cuts where the distance to the background dips by at least this "
                                   "fraction of the object's inscribed radius; larger splits less")
        self.min_distance = QSpinBox()
        self.min_distance.setRange(0, 10_000)
        self.min_distance.setSpecialValueText("none")  # 0: no seed merged for its distance
        self.min_distance.setValue(0)
        self.min_distance.setSuffix(" voxels")
        self.min_distance.setToolTip("also merge the seeds of a split closer than this")
        self.min_voxels = QSpinBox()
        self.min_voxels.setRange(-1, 2**31 - 1)
        self.min_voxels.setSpecialValueText("auto")  # -1: from the volume's objects
        self.min_voxels.setValue(-1)
        self.min_voxels.setSuffix(" voxels")
        self.min_voxels.setToolTip(f"objects smaller than this are removed (after splitting); auto: "
                                   f"{AUTO_MIN_FRACTION:.0%} of the volume's typical object; 0 keeps every object")
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.setRowWrapPolicy(QFormLayout.DontWrapRows)  # one line per option, never label over field
        form.addRow("Split", self.split)
        form.addRow("Split seed depth", self.seed_depth)
        form.addRow("Split seed distance", self.min_distance)
        form.addRow("Minimum object size", self.min_voxels)
        self.split.currentTextChanged.connect(self._update)
        self._update()

    def _update(self, *_) -> None:
        splitting = self.split.currentText() == "distance"
        self.min_distance.setEnabled(splitting)
        self.seed_depth.setEnabled(splitting)

    def options(self):
        from mitoseg.instances.segment import InstanceOptions

        min_voxels = self.min_voxels.value()
        return InstanceOptions(min_voxels=None if min_voxels < 0 else min_voxels, split=self.split.currentText(),
                               min_distance=self.min_distance.value() or None, seed_depth=self.seed_depth.value())
