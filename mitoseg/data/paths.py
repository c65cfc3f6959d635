"""Volume specs as names: which format a path names, and its file and inner dataset parts. Pure string
checks (no torch, no format library), shared by the readers (:mod:`mitoseg.data.readers`), OME-Zarr
(:mod:`mitoseg.data.ngff`), metadata and the CLI, which checks names before it imports anything heavy."""

from __future__ import annotations

import os
import re

TIFF_SUFFIXES = (".tif", ".tiff")
H5_SUFFIXES = (".h5", ".hdf5")
ZARR_SUFFIX = ".zarr"
OME_ZARR_SUFFIX = ".ome.zarr"
SLICE_SUFFIXES = (".png", ".tif", ".tiff")
READABLE = ("a TIFF stack (.tif, .tiff), HDF5 (.h5, .hdf5, optionally FILE:/DATASET), "
            "Zarr (.zarr, optionally DIR:/ARRAY; OME-Zarr images .ome.zarr, optionally DIR:/LEVEL) "
            "or a folder of .png/.tif/.tiff slices")
WRITABLE = ("TIFF (.tif, .tiff), HDF5 (FILE.h5:/DATASET), Zarr (DIR.zarr or DIR.zarr:/ARRAY) "
            "or OME-Zarr (DIR.ome.zarr)")

_CONTAINER_SPEC = re.compile(r"(.+?\.(?:h5|hdf5|zarr)):(/.*)", re.IGNORECASE)


def split_spec(spec: str) -> tuple[str, str | None]:
    """The file part of a spec and its dataset path inside the file (None if not given)."""
    match = _CONTAINER_SPEC.fullmatch(spec)
    if match:
        return match[1], match[2].strip("/") or None
    return spec, None


def file_suffix(path: str) -> str:
    """The lower-case suffix of a file or folder name (``.zarr`` of ``vol.zarr/``)."""
    return os.path.splitext(path.rstrip("/" + os.sep))[1].lower()


def is_ome_zarr_name(file: str) -> bool:
    """Whether an output is to be written as OME-Zarr: its name ends in ``.ome.zarr``."""
    return os.path.basename(file.rstrip("/" + os.sep)).lower().endswith(OME_ZARR_SUFFIX)
