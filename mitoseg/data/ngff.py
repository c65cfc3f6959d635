"""OME-Zarr (OME-NGFF 0.4 on Zarr v2, 0.5 on Zarr v3): reading a multiscale level, writing images and labels.

Reading needs only zarr: an OME-Zarr image is a Zarr group whose ``multiscales`` metadata (the group's
attributes in 0.4, ``attributes["ome"]`` in 0.5) lists its resolution levels (``datasets``, full resolution
first) and names its axes (``t``, ``c``, ``z``, ``y``, ``x``). :func:`ngff_array` turns a level into a
(z, y, x) volume, or (z, C, y, x) when it has several channels (``c`` moves behind ``z``; a single time
point or channel is dropped), read lazily as any Zarr array. ``vol.ome.zarr`` reads level 0,
``vol.ome.zarr:/2`` the level stored at path ``2``, ``vol.ome.zarr:/labels/mito`` a label image inside it;
:func:`resolve_level` picks a level by its index (``--level``).

Writing (:class:`NgffSink`, used by :class:`~mitoseg.data.readers.VolumeWriter` for outputs named
``*.ome.zarr``) stores one level ``0`` with (z, y, x) or (c, z, y, x) axes, the scale of the voxel size
in nanometres when it is known, and for labels the ``image-label`` metadata; the metadata is written by the
``ome-zarr`` library (``ome_zarr.writer``), so napari-ome-zarr and other NGFF viewers open the result.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from mitoseg.data.paths import ZARR_SUFFIX, file_suffix, split_spec
from mitoseg.errors import MitosegError

NGFF_VERSIONS = ("0.4", "0.5")
DEFAULT_NGFF_VERSION = "0.5"
_AXIS_ORDER = "tczyx"


def ome_attributes(group) -> dict:
    """The NGFF metadata of a Zarr group: ``attributes["ome"]`` (0.5) or the attributes themselves (0.4)."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome")
    return ome if isinstance(ome, dict) else attrs


def multiscale(group) -> dict | None:
    """The first ``multiscales`` entry of a group, or None if it is not an OME-Zarr image."""
    entries = ome_attributes(group).get("multiscales")
    if isinstance(entries, list) and entries and isinstance(entries[0], dict):
        return entries[0]
    return None


def axis_names(image: dict) -> list[str]:
    """Axis names of a multiscales entry; NGFF 0.3 stored them as plain strings."""
    return [a.get("name") if isinstance(a, dict) else str(a) for a in image.get("axes", [])]


def axis_units(image: dict) -> list[str | None]:
    return [a.get("unit") if isinstance(a, dict) else None for a in image.get("axes", [])]


def level_paths(image: dict) -> list[str]:
    return [str(d.get("path", "")).strip("/") for d in image.get("datasets", []) if isinstance(d, dict)]


def _scale_of(transforms) -> list[float] | None:
    for transform in transforms or []:
        if isinstance(transform, dict) and transform.get("type") == "scale" and "scale" in transform:
            return [float(v) for v in transform["scale"]]
    return None


def level_scale(image: dict, path: str) -> list[float] | None:
    """The scale of level ``path`` per axis: the dataset's scale times the multiscale-wide one (if any)."""
    for dataset in image.get("datasets", []):
        if isinstance(dataset, dict) and str(dataset.get("path", "")).strip("/") == path.strip("/"):
            scale = _scale_of(dataset.get("coordinateTransformations"))
            if scale is None:
                return None
            overall = _scale_of(image.get("coordinateTransformations"))
            if overall is not None and len(overall) == len(scale):
                scale = [a * b for a, b in zip(scale, overall)]
            return scale
    return None


def _image_group(root, inner: str | None):
    """(image group, its path, the level path inside it or None) when ``inner`` names an OME-Zarr image or
    one of its levels; None otherwise."""
    import zarr

    parts = [p for p in (inner or "").split("/") if p]
    node = root
    for i, part in enumerate(parts):
        if not isinstance(node, zarr.Group):
            return None
        try:
            node = node[part]
        except KeyError:
            return None
    if isinstance(node, zarr.Group):
        return (node, "/".join(parts), None) if multiscale(node) is not None else None
    # An array: a level if its parent group is an image listing it.
    if not parts:
        return None
    parent = root if len(parts) == 1 else root["/".join(parts[:-1])]
    image = multiscale(parent)
    if image is not None and parts[-1] in level_paths(image):
        return parent, "/".join(parts[:-1]), parts[-1]
    return None


def describe_levels(group, image: dict) -> str:
    shown = []
    for index, path in enumerate(level_paths(image)):
        try:
            shape = tuple(group[path].shape)
        except KeyError:
            shape = "missing"
        shown.append(f"{index}: /{path} {shape}")
    return "; ".join(shown) or "none"


def resolve_level(spec: str, level: int | None) -> str:
    """``spec`` with level ``level`` (0 = full resolution) of the OME-Zarr image it names, as a path spec
    (``vol.ome.zarr`` + 1 -> ``vol.ome.zarr:/1``); ``spec`` itself when ``level`` is None."""
    if level is None:
        return spec
    file, inner = split_spec(spec)
    what = f"--level {level}"
    if file_suffix(file) != ZARR_SUFFIX:
        raise MitosegError(f"{what}: {spec} is not an OME-Zarr image (levels exist only in .zarr / .ome.zarr stores)")
    if not os.path.exists(file):
        raise MitosegError(f"{spec}: no such file or directory")
    import zarr

    try:
        root = zarr.open(file, mode="r")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MitosegError(f"{spec}: not a readable Zarr array or group ({exc})") from exc
    found = _image_group(root, inner) if isinstance(root, zarr.Group) else None
    if found is None:
        raise MitosegError(f"{what}: {spec} is not an OME-Zarr image (no NGFF multiscales metadata)")
    group, group_path, chosen = found
    if chosen is not None:
        raise MitosegError(f"{what}: {spec} already names a level; name the image ({split_spec(spec)[0]}"
                           f"{':/' + group_path if group_path else ''}) or drop --level")
    image = multiscale(group)
    paths = level_paths(image)
    if not 0 <= level < len(paths):
        raise MitosegError(f"{what}: {spec} has {len(paths)} level(s) ({describe_levels(group, image)})")
    inner_path = "/".join(p for p in (group_path, paths[level]) if p)
    return f"{file}:/{inner_path}"


class NgffArray:
    """A level of an OME-Zarr image seen as (z, y, x) or (z, C, y, x): what
    :class:`~mitoseg.data.readers._ArrayVolume` slices. Only slices are accepted as indices."""

    def __init__(self, array, names: list[str], where: str):
        self.array = array
        self.dtype = array.dtype
        shape = dict(zip(names, array.shape))
        if len(names) != array.ndim or len(set(names)) != len(names):
            raise MitosegError(f"{where}: its NGFF axes {names} do not match the array's {array.ndim} dimensions")
        unknown = [n for n in names if n not in _AXIS_ORDER and shape[n] != 1]
        if unknown:
            raise MitosegError(f"{where}: unsupported axis '{unknown[0]}' of size {shape[unknown[0]]} "
                               "(mitoseg reads t, c, z, y, x)")
        if "y" not in shape or "x" not in shape:
            raise MitosegError(f"{where}: an image needs y and x axes; its NGFF axes are {names}")
        if shape.get("t", 1) != 1:
            raise MitosegError(f"{where}: {shape['t']} time points; mitoseg reads one (name a single time point "
                               "or write it as its own image)")
        # The axes the volume keeps, in mitoseg's order: z, then channels (when more than one), then y, x.
        self.kept = [n for n in ("z", "c", "y", "x") if n in shape and (n != "c" or shape[n] > 1)]
        self.names = names
        self.shape = tuple(shape[n] for n in self.kept)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if any(not isinstance(k, slice) for k in key) or len(key) > self.ndim:
            raise TypeError(f"NgffArray takes up to {self.ndim} slices, got {key!r}")
        key = key + (slice(None),) * (self.ndim - len(key))
        wanted = dict(zip(self.kept, key))
        index = tuple(wanted.get(name, 0) for name in self.names)  # dropped axes (t, one c) at 0
        data = np.asarray(self.array[index])
        stored = [n for n in self.names if n in wanted]
        return np.transpose(data, [stored.index(n) for n in self.kept])


def ngff_array(root, inner: str | None, where: str) -> NgffArray | None:
    """The level ``inner`` names (an image group: its level 0; a level's path: that level) as an
    :class:`NgffArray`, or None when ``inner`` is not part of an OME-Zarr image (read as plain Zarr)."""
    found = _image_group(root, inner)
    if found is None:
        return None
    group, group_path, chosen = found
    image = multiscale(group)
    paths = level_paths(image)
    if chosen is None:
        if not paths:
            raise MitosegError(f"{where}: OME-Zarr image without levels (its multiscales lists no datasets)")
        chosen = paths[0]
    try:
        array = group[chosen]
    except KeyError:
        raise MitosegError(f"{where}: level /{chosen} listed in the NGFF metadata is missing; levels: "
                           f"{describe_levels(group, image)}") from None
    names = axis_names(image)
    if not names:  # NGFF 0.1 / 0.2: always (t, c, z, y, x)
        names = list(_AXIS_ORDER[-array.ndim:])
    return NgffArray(array, names, where)


# ---------------------------------------------------------------------------- writing


def _format(version: str):
    from ome_zarr.format import FormatV04, FormatV05

    if version not in NGFF_VERSIONS:
        raise MitosegError(f"NGFF version {version!r} cannot be written; choose one of {', '.join(NGFF_VERSIONS)}")
    return FormatV04() if version == "0.4" else FormatV05()


@dataclass(frozen=True)
class ZarrBlockTarget:
    """Where a Zarr output being written lives, so that other processes (Dask workers) can write blocks of
    it: the store (the writer's temporary), the array's path in it and whether its channels come first
    ((c, z, y, x) OME-Zarr probabilities) or second ((z, C, y, x) plain Zarr)."""

    store: str
    path: str
    channels_first: bool = False

    def open(self, mode: str = "r+"):
        import zarr

        return zarr.open_array(store=self.store, path=self.path, mode=mode)

    def write(self, start: int, rows: slice, cols: slice, data: np.ndarray, array=None) -> None:
        """Store ``data`` ((n, y, x) or (n, C, y, x)) at slices ``start ..`` and ``rows``, ``cols``; refused
        once the store is gone (the run was given up and its temporary deleted: writing would recreate it)."""
        if not os.path.isdir(self.store):
            raise MitosegError(f"{self.store}: the output being written is gone (the run ended)")
        array = self.open() if array is None else array
        z = slice(start, start + data.shape[0])
        if data.ndim == 3:
            array[z, rows, cols] = data
        elif self.channels_first:
            array[:, z, rows, cols] = np.moveaxis(data, 1, 0)
        else:
            array[z, :, rows, cols] = data

    def read(self, start: int, stop: int, array=None) -> np.ndarray:
        """Whole slices ``start .. stop-1`` in (z, ...) order."""
        array = self.open("r") if array is None else array
        data = np.asarray(array[:, start:stop] if self.channels_first else array[start:stop])
        return np.moveaxis(data, 0, 1) if self.channels_first else data


class NgffSink:
    """A VolumeWriter sink for ``*.ome.zarr``: level ``0`` written slab by slab, NGFF metadata via ome-zarr."""

    def __init__(self, tmp: str, inner: str | None, shape: tuple[int, ...], dtype: np.dtype, *,
                 voxel_size=None, labels: bool = False, ngff_version: str | None = None,
                 tile: tuple[int, int] | None = None, name: str | None = None):
        import zarr

        if inner is not None:
            raise MitosegError(f"{tmp}: an OME-Zarr output is a whole store; write it as DIR.ome.zarr without "
                               f"':/{inner}'")
        fmt = _format(ngff_version or DEFAULT_NGFF_VERSION)
        try:
            from ome_zarr.writer import add_metadata, write_multiscales_metadata
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise MitosegError("writing OME-Zarr needs the ome-zarr package: pip install ome-zarr") from exc
        ty, tx = tile or (1024, 1024)
        ty, tx = min(shape[-2], ty), min(shape[-1], tx)
        self._channels = len(shape) == 4
        if self._channels:  # NGFF orders channels before space: (c, z, y, x)
            stored, chunks = (shape[1], shape[0], shape[2], shape[3]), (1, 1, ty, tx)
        else:
            stored, chunks = tuple(shape), (1, ty, tx)
        extra = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if fmt.zarr_format == 2 else {}
        group = zarr.open_group(tmp, mode="w", zarr_format=fmt.zarr_format)
        self._array = group.create_array("0", shape=stored, dtype=dtype, chunks=chunks, fill_value=0, **extra)
        if voxel_size is not None:
            scale = [float(v) for v in voxel_size]
            space = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
        else:  # unknown: voxel units (no unit, scale 1)
            scale = [1.0, 1.0, 1.0]
            space = [{"name": n, "type": "space"} for n in "zyx"]
        axes = ([{"name": "c", "type": "channel"}] if self._channels else []) + space
        if self._channels:
            scale = [1.0] + scale
        metadata = {}
        if self._channels:
            metadata["omero"] = {"channels": [
                {"label": f"class {k}", "color": "FFFFFF", "active": True,
                 "window": {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0}} for k in range(shape[1])]}
        write_multiscales_metadata(group, [{"path": "0", "coordinateTransformations": [
            {"type": "scale", "scale": scale}]}], fmt=fmt, axes=axes, name=name, metadata=metadata)
        if labels:
            add_metadata(group, {"image-label": {"version": fmt.version}}, fmt=fmt)
        self._target = ZarrBlockTarget(tmp, "0", channels_first=self._channels)

    def write(self, start: int, data: np.ndarray) -> None:
        self._target.write(start, slice(None), slice(None), data, array=self._array)

    def target(self) -> ZarrBlockTarget:
        return self._target

    def close(self) -> None:
        pass  # every write is already on disk
