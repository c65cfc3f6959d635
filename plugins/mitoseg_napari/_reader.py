"""napari reader: EM volumes (TIFF, HDF5, Zarr, slice folders), mitoseg run folders, inspection files.

Volumes are read through :func:`mitoseg.data.readers.open_volume`, so napari
accepts exactly what ``mitoseg`` accepts. A volume larger than
``EAGER_BYTES`` becomes a dask array read slice by slice when napari shows it.
An HDF5 file or Zarr group holding several arrays opens each as a layer.
A run folder (or one of its ``inspect/iter_*.npz|json`` files) opens the
layers of its latest (or that) inspection iteration; the pseudo-label
inspector widget adds the iteration slider and the plots.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from pathlib import Path

import numpy as np

from mitoseg.data import readers
from mitoseg.errors import MitosegError
from mitoseg.runs import INSPECT, METRICS
from mitoseg_napari._inspection import is_run_dir, list_inspections, load_inspection, resolve_run_dir

EAGER_BYTES = 512 * 2**20  # volumes up to this size are read into memory at once
_VOLUME_SUFFIXES = (*readers.TIFF_SUFFIXES, *readers.H5_SUFFIXES, readers.ZARR_SUFFIX)
# A name part like these (between non-letters) marks an integer volume as labels; the last ones name
# instance volumes (``mitoseg instances`` output, ``*_objects.tif``, ...).
_LABEL_NAME = re.compile(r"(?<![a-z])(labels?|masks?|seg|segmentation|groundtruth|gt|pred|predictions?"
                         r"|inst|instances?|objects?)(?![a-z])", re.IGNORECASE)
# Unsigned integers of 32 / 64 bits (images come in 8 / 16 bits or floats) hold instance ids: labels
# whatever the name.
_LABEL_MIN_UNSIGNED_BYTES = 4
_INSPECTION_FILE = re.compile(r"iter_\d+\.(npz|json)")


def _kind(path: str) -> str | None:
    """What ``path`` is: "volume", "run", "inspection" or None (not for this reader)."""
    file, _ = readers.split_spec(path)
    name = os.path.basename(file.rstrip("/" + os.sep))
    if _INSPECTION_FILE.fullmatch(name) and os.path.isfile(file):
        return "inspection"
    if os.path.isdir(file):
        if file.lower().rstrip("/" + os.sep).endswith(readers.ZARR_SUFFIX):
            return "volume"
        if is_run_dir(file):
            return "run"
        if os.path.basename(file.rstrip("/" + os.sep)) == INSPECT and is_run_dir(os.path.dirname(
                os.path.abspath(file).rstrip("/" + os.sep))):
            return "run"
        if any(n.lower().endswith(readers.SLICE_SUFFIXES) for n in os.listdir(file)):
            return "volume"
        return None
    if name == METRICS and is_run_dir(os.path.dirname(os.path.abspath(file))):
        return "run"
    if os.path.splitext(name)[1].lower() in _VOLUME_SUFFIXES and os.path.exists(file):
        return "volume"
    return None


def napari_get_reader(path):
    """npe2 reader command: a reader function for ``path``, or None if mitoseg cannot read it."""
    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    if not paths:
        return None
    try:
        kinds = {_kind(str(p)) for p in paths}
    except OSError:
        # A folder that cannot be listed, a file that cannot be looked at: napari asks every reader
        # with a matching pattern, so "not mine" lets it try the others (or say nothing can read it).
        return None
    if len(kinds) != 1 or None in kinds:
        return None
    return read_paths


def read_paths(path) -> list[tuple]:
    """Layer-data tuples for one path or a list of paths (each opened on its own)."""
    paths = [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]
    layers: list[tuple] = []
    for p in paths:
        kind = _kind(p)
        if kind == "run":
            layers += read_run(p)
        elif kind == "inspection":
            layers += read_inspection(p)
        else:
            layers += read_volume_layers(p)
    return layers


# ----------------------------------------------------------------------------- volumes


class _LazyVolume:
    """An array-like over a :class:`~mitoseg.data.readers.Volume` for ``dask.array.from_array``."""

    def __init__(self, volume):
        self.volume = volume
        self.shape = tuple(volume.shape)
        self.dtype = np.dtype(volume.dtype)
        self.ndim = len(self.shape)
        self._lock = threading.Lock()
        # The file stays open while napari holds the layer and is closed when the layer (and this array)
        # is collected, not left to the interpreter (a ResourceWarning of an unclosed file).
        weakref.finalize(self, volume.close)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        z, rest = (key[0] if key else slice(None)), key[1:]
        if isinstance(z, (int, np.integer)):
            index = int(z) + self.shape[0] if z < 0 else int(z)
            with self._lock:
                return self.volume.read(index, index + 1)[0][rest]
        start, stop, step = z.indices(self.shape[0])
        with self._lock:
            if step == 1:
                data = self.volume.read(start, max(start, stop))
            else:
                data = self.volume.read_slices(list(range(start, stop, step)))
        return data[(slice(None), *rest)]


def volume_array(spec: str):
    """A volume as a numpy array, or a lazy dask array when it is larger than ``EAGER_BYTES``."""
    volume = readers.open_volume(spec, channels=True)
    nbytes = int(np.prod(volume.shape)) * np.dtype(volume.dtype).itemsize
    if nbytes <= EAGER_BYTES:
        with volume:
            return volume.read(0, len(volume))
    import dask.array as da

    # The file stays open for as long as napari holds the layer.
    chunks = (1, *volume.shape[1:])
    return da.from_array(_LazyVolume(volume), chunks=chunks, asarray=True, fancy=False)


def _is_label_volume(name: str, dtype) -> bool:
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and dtype.itemsize >= _LABEL_MIN_UNSIGNED_BYTES:
        return True
    return dtype.kind in "biu" and bool(_LABEL_NAME.search(name.replace("ground_truth", "groundtruth")))


def _members(spec: str) -> list[str] | None:
    """The arrays inside an HDF5 file / Zarr group named without an inner path, if several."""
    file, inner = readers.split_spec(spec)
    suffix = os.path.splitext(file.rstrip("/" + os.sep))[1].lower()
    if inner is not None or suffix not in (*readers.H5_SUFFIXES, readers.ZARR_SUFFIX):
        return None
    names = readers.list_arrays(file)
    if names is None or len(names) < 2:
        return None
    return names


def read_volume_layers(spec: str) -> list[tuple]:
    """One Image layer per array in ``spec``; Labels for integer volumes named like labels or instances, and
    for uint32 / uint64 volumes."""
    members = _members(spec)
    specs = [f"{spec}:/{name}" for name in members] if members else [spec]
    layers, errors = [], []
    for s in specs:
        try:
            data = volume_array(s)
        except MitosegError as exc:
            if not members:
                raise
            errors.append(str(exc))  # e.g. a 1-D dataset next to the volume: skip it
            continue
        file, inner = readers.split_spec(s)
        name = Path(file.rstrip("/" + os.sep)).stem + (f" {inner}" if inner else "")
        layer_type = "labels" if _is_label_volume(name, data.dtype) else "image"
        kwargs = {"name": name, "metadata": {"mitoseg": {"role": "volume", "spec": s}}}
        if layer_type == "image" and data.ndim == 4:
            kwargs["name"] = f"{name} (z, C, y, x)"
        layers.append((data, kwargs, layer_type))
    if not layers:
        raise MitosegError(f"{spec}: no readable volume ({'; '.join(errors)})")
    return layers


# ----------------------------------------------------------------------------- runs


def read_inspection(path: str) -> list[tuple]:
    from mitoseg_napari._layers import inspection_layer_data

    insp = load_inspection(path)
    run = resolve_run_dir(path).name if is_run_dir(Path(path).parent.parent) else Path(path).stem
    return inspection_layer_data(insp, prefix=f"{run} {insp.iteration}: ")


def read_run(path: str) -> list[tuple]:
    """The layers of the latest inspection iteration of the run at (or containing) ``path``."""
    from mitoseg_napari._layers import inspection_layer_data

    run_dir = resolve_run_dir(path)
    iteration, npz = list_inspections(run_dir)[-1]
    insp = load_inspection(npz, run_dir)
    return inspection_layer_data(insp, prefix=f"{run_dir.name} {iteration}: ")
