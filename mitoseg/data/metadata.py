"""Physical voxel sizes stored with a volume: TIFF (ImageJ metadata and resolution tags), HDF5
(``element_size_um``, as ilastik and Fiji write it) and OME-Zarr (NGFF ``multiscales`` scales and axis units).

:func:`voxel_size_nm` returns (z, y, x) in nanometres, or None when the file does not say (or says it
in a unit that is not a length), so callers fall back to ``--voxel-size`` or to voxel units.
"""

from __future__ import annotations

import os

from mitoseg.data.paths import H5_SUFFIXES, TIFF_SUFFIXES, ZARR_SUFFIX, file_suffix, split_spec

# Length units -> nanometres (ImageJ writes "micron" or "\\u00B5m"; NGFF uses UDUNITS names).
UNITS_NM = {
    "nm": 1.0, "nanometer": 1.0, "nanometre": 1.0,
    "um": 1e3, "µm": 1e3, "\\u00b5m": 1e3, "micron": 1e3, "microns": 1e3, "micrometer": 1e3, "micrometre": 1e3,
    "mm": 1e6, "millimeter": 1e6, "millimetre": 1e6, "cm": 1e7, "centimeter": 1e7, "m": 1e9, "meter": 1e9,
    "angstrom": 0.1, "å": 0.1, "pm": 1e-3, "picometer": 1e-3,
}


def _nm(unit) -> float | None:
    return UNITS_NM.get(str(unit).strip().lower()) if unit is not None else None


def _tiff(file: str):
    import tifffile

    with tifffile.TiffFile(file) as tif:
        ij = tif.imagej_metadata or {}
        scale = _nm(ij.get("unit"))
        if scale is None:
            return None
        page = tif.pages[0]
        sizes = []
        for tag in ("YResolution", "XResolution"):
            value = page.tags.get(tag)
            if value is None:
                return None
            numerator, denominator = value.value
            if numerator == 0:
                return None
            sizes.append(denominator / numerator * scale)  # pixels per unit -> nm per pixel
        z = float(ij.get("spacing", 0)) * scale or sizes[1]
        return (z, sizes[0], sizes[1])


def _h5(file: str, inner: str | None):
    import h5py

    with h5py.File(file, "r") as handle:
        if inner is None:
            names = []
            handle.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            if len(names) != 1:
                return None
            inner = names[0]
        size = handle[inner].attrs.get("element_size_um")
        if size is None or len(size) != 3:
            return None
        return tuple(float(v) * 1e3 for v in size)


def _ngff_scale(image: dict, path: str):
    """(z, y, x) nm of the multiscale level ``path`` of an NGFF ``multiscales`` entry (0.4 or 0.5): the
    level's scale times the image-wide one, in the axes' units; None without z, y, x lengths."""
    from mitoseg.data.ngff import axis_names, axis_units, level_scale

    names, units = axis_names(image), [_nm(u) for u in axis_units(image)]
    scale = level_scale(image, path)
    if scale is None or len(scale) != len(names) or not all(n in names for n in "zyx"):
        return None
    result = []
    for axis in "zyx":
        i = names.index(axis)
        if units[i] is None or not scale[i] > 0:
            return None
        result.append(float(scale[i]) * units[i])
    return tuple(result)


def _zarr(file: str, inner: str | None):
    """An OME-Zarr image (its level 0), one of its levels or a label image inside it."""
    import zarr

    from mitoseg.data.ngff import _image_group, level_paths, multiscale

    root = zarr.open(file, mode="r")
    if isinstance(root, zarr.Array):
        return None
    found = _image_group(root, inner)
    if found is None:
        return None
    group, _, level = found
    image = multiscale(group)
    if level is None:
        paths = level_paths(image)
        if not paths:
            return None
        level = paths[0]
    return _ngff_scale(image, level)


def voxel_size_nm(spec: str | os.PathLike) -> tuple[float, float, float] | None:
    """(z, y, x) nm per voxel as the volume ``spec`` stores it, or None."""
    file, inner = split_spec(os.fspath(spec))
    suffix = file_suffix(file)
    try:
        if suffix in TIFF_SUFFIXES and os.path.isfile(file):
            return _tiff(file)
        if suffix in H5_SUFFIXES:
            return _h5(file, inner)
        if suffix == ZARR_SUFFIX:
            return _zarr(file, inner)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable metadata: the reader reports a broken file itself
    return None
