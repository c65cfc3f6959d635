"""Reading and writing EM volumes: lazy z-range readers and atomic slab-wise writers.

A volume is given by a *spec*, the same for input and output:

=============================  ===============================================
``stack.tif`` / ``.tiff``      TIFF stack (z, y, x); one 2-D page reads as (1, y, x)
``file.h5:/group/dataset``     HDF5 dataset (also ``.hdf5``); on read the dataset
                               part may be left out if the file holds only one
``dir.zarr``                   Zarr array at the root of ``dir.zarr``
``dir.zarr:/path/in/group``    Zarr array inside a group (same rule as HDF5)
``vol.ome.zarr[:/LEVEL]``      OME-Zarr image (NGFF 0.4 / 0.5): level 0, or the level
                               at path LEVEL (:mod:`mitoseg.data.ngff`); outputs
                               named ``*.ome.zarr`` are written as OME-Zarr
``folder/``                    2-D ``*.png`` / ``*.tif`` / ``*.tiff`` slices, one
                               per file, in natural order (read only)
=============================  ===============================================

:func:`open_volume` returns a :class:`Volume` that reads z ranges on demand, so a
volume larger than memory is never loaded whole. :class:`VolumeWriter` writes a
volume slab by slab into a hidden sibling of the output and moves it into place
only when every slice is written. Problems with the user's files raise
:class:`~mitoseg.errors.MitosegError` with a one-line message naming the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import operator
import os
import re
import threading
from collections.abc import Sequence

import numpy as np
import tifffile

from mitoseg.atomic import (
    check_output_path,
    disk_full_cause,
    disk_full_error,
    remove_path,
    remove_stale_temporaries,
    replace_path,
    temporary_path,
)
from mitoseg.data.paths import (  # noqa: F401  (READABLE, WRITABLE, split_spec: readers' names for callers)
    H5_SUFFIXES,
    READABLE,
    SLICE_SUFFIXES,
    TIFF_SUFFIXES,
    WRITABLE,
    ZARR_SUFFIX,
    file_suffix,
    is_ome_zarr_name,
    split_spec,
)
from mitoseg.errors import MitosegError

_SUPPORTED_KINDS = "biuf"  # bool, signed and unsigned integers, floats
_MAX_LISTED = 20


def _brief(exc: BaseException) -> str:
    """The first line of an exception's message: library messages can span many lines."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join("/" + name for name in names[:_MAX_LISTED])
    return shown + (", ..." if len(names) > _MAX_LISTED else "") if names else "none"


def _natural_key(name: str) -> list:
    # re.split with a group alternates text and digit runs, so keys compare str to str, int to int.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------------------- reading


class Volume:
    """A (z, y, x) volume read lazily by z ranges; a context manager that closes its file.

    ``path`` is the spec as given, ``shape`` is (z, y, x) (a 2-D image is one
    slice) and ``dtype`` the stored dtype in native byte order.
    """

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    # Refuse NaN / inf values in what is read (images: the network needs finite intensities).
    finite: bool = False

    def __init__(self, path: str):
        self.path = path

    def __len__(self) -> int:
        return self.shape[0]

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    def read(self, start: int, stop: int) -> np.ndarray:
        """Slices ``[start, stop)`` as an (n, y, x) array of the volume's dtype."""
        start, stop = operator.index(start), operator.index(stop)
        if not 0 <= start <= stop <= len(self):
            raise MitosegError(f"{self.path}: slices {start}:{stop} are out of range for {len(self)} slices")
        if start == stop:
            return np.empty((0, *self.shape[1:]), self.dtype)
        try:
            data = self._read(start, stop)
        except MitosegError:
            raise
        except Exception as exc:
            # Whatever the storage library raises here means the file is damaged or unreadable.
            raise MitosegError(f"{self.path}: cannot read slices {start}:{stop} ({_brief(exc)})") from exc
        data = np.asarray(data, dtype=self.dtype).reshape(stop - start, *self.shape[1:])
        if self.finite:
            check_finite(data, self.path, start)
        return data

    def read_region(self, start: int, stop: int, rows: slice, cols: slice) -> np.ndarray:
        """Slices ``[start, stop)`` cropped to ``rows`` x ``cols`` (y, x; slices with steps of 1): HDF5 and
        Zarr read only the chunks covering the region, other formats whole slices."""
        rows = slice(*rows.indices(self.shape[-2]))
        cols = slice(*cols.indices(self.shape[-1]))
        if not (0 <= start < stop <= len(self) and rows.step == cols.step == 1 and rows.start < rows.stop
                and cols.start < cols.stop):
            return self.read(start, stop)[..., rows, cols]  # read() refuses a bad range; an empty crop is empty
        try:
            data = self._read_region(start, stop, rows, cols)
        except MitosegError:
            raise
        except Exception as exc:
            raise MitosegError(f"{self.path}: cannot read slices {start}:{stop} ({_brief(exc)})") from exc
        data = np.asarray(data, dtype=self.dtype).reshape(
            stop - start, *self.shape[1:-2], rows.stop - rows.start, cols.stop - cols.start)
        if self.finite:
            check_finite(data, self.path, start)
        return data

    def _read_region(self, start: int, stop: int, rows: slice, cols: slice) -> np.ndarray:
        """Whole slices, cropped (formats that cannot read less)."""
        return np.asarray(self._read(start, stop)).reshape(stop - start, *self.shape[1:])[..., rows, cols]

    def read_slices(self, indices: Sequence[int]) -> np.ndarray:
        """The slices ``indices`` (any order, repeats allowed) as a (len(indices), y, x) array."""
        wanted = np.array([operator.index(i) for i in indices], dtype=np.int64)
        bad = wanted[(wanted < 0) | (wanted >= len(self))]
        if bad.size:
            raise MitosegError(f"{self.path}: slice {bad[0]} is out of range for {len(self)} slices")
        out = np.empty((len(wanted), *self.shape[1:]), self.dtype)
        # One read per run of consecutive slices: far fewer file accesses than slice by slice.
        unique = np.unique(wanted)
        for run in np.split(unique, np.flatnonzero(np.diff(unique) != 1) + 1) if unique.size else []:
            start, stop = int(run[0]), int(run[-1]) + 1
            chosen = (wanted >= start) & (wanted < stop)
            out[chosen] = self.read(start, stop)[wanted[chosen] - start]
        return out

    def close(self) -> None:
        """Release the file; reading afterwards is an error."""

    def _read(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def _check(self, shape: tuple[int, ...], dtype, channels: bool) -> None:
        """Set ``shape`` and ``dtype`` from the stored ones, or raise if they are not a volume."""
        dtype = np.dtype(dtype)
        if dtype.kind not in _SUPPORTED_KINDS:
            raise MitosegError(f"{self.path}: unsupported dtype {dtype} (expected integers or floats)")
        shape = tuple(int(n) for n in shape)
        if len(shape) == 2:
            shape = (1, *shape)
        if len(shape) != 3 and not (channels and len(shape) == 4):
            expected = "(z, y, x) or (z, C, y, x)" if channels else "2-D or 3-D (z, y, x)"
            raise MitosegError(f"{self.path}: expected a {expected} volume, got shape {shape}")
        if 0 in shape:
            raise MitosegError(f"{self.path}: volume is empty (shape {shape})")
        self.shape, self.dtype = shape, dtype.newbyteorder("=")


class _TiffLog(logging.Handler):
    """Collects what tifffile logs in one thread (it reports a broken chain of pages, a truncated file or a
    failed decode as log records, not exceptions, and Python would print them on the user's terminal)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.thread = threading.get_ident()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append(record)

    def errors(self) -> list[str]:
        """The error-level messages, without tifffile's object prefix ("<tifffile.TiffPages @8> ...")."""
        return [re.sub(r"^<[^>]*>\s*", "", r.getMessage()) for r in self.records if r.levelno >= logging.ERROR]


_TIFF_LOG_LOCK = threading.Lock()
_tiff_log_users = 0
_tiff_log_propagate = True


@contextlib.contextmanager
def _tifffile_log():
    """tifffile's log records of this thread while the block runs, kept off the terminal (its warnings
    about metadata are dropped; its errors are turned into MitosegError by the caller)."""
    global _tiff_log_users, _tiff_log_propagate
    logger = logging.getLogger("tifffile")
    handler = _TiffLog()
    with _TIFF_LOG_LOCK:
        if _tiff_log_users == 0:
            _tiff_log_propagate, logger.propagate = logger.propagate, False
        _tiff_log_users += 1
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        with _TIFF_LOG_LOCK:
            logger.removeHandler(handler)
            _tiff_log_users -= 1
            if _tiff_log_users == 0:
                logger.propagate = _tiff_log_propagate


class _TiffVolume(Volume):
    """A TIFF stack (its first series), read page by page, or memory-mapped when it has a single IFD.

    A file cut short or damaged is an error naming the page that cannot be read, found when the file is
    opened (a broken chain of pages, page data past the end of the file) or when the page is decoded;
    never a shorter volume.
    """

    def __init__(self, path: str, file: str):
        super().__init__(path)
        self._memmap = None
        with _tifffile_log() as log:
            try:
                self._tif = tifffile.TiffFile(file)
            except (OSError, ValueError, IndexError, KeyError) as exc:  # tifffile.TiffFileError is a ValueError
                raise MitosegError(f"{path}: not a readable TIFF file ({_brief(exc)})") from exc
            try:
                self._open_series(file, log)
            except MitosegError:
                self._tif.close()
                raise
            except Exception as exc:  # tifffile parsing a damaged file
                self._tif.close()
                raise MitosegError(f"{path}: not a readable TIFF file ({_brief(exc)})") from exc
            except BaseException:
                self._tif.close()
                raise

    def _damaged(self, page: int, reason: str) -> MitosegError:
        return MitosegError(f"{self.path}: page {page} cannot be read; the TIFF file is truncated or damaged "
                            f"({reason})")

    def _open_series(self, file: str, log: _TiffLog) -> None:
        # Walk the whole chain of pages now (headers only): a chain that breaks off means a cut file.
        count = len(self._tif.pages)
        if log.errors():
            raise self._damaged(count, log.errors()[0][:200])
        if not self._tif.series:
            raise MitosegError(f"{self.path}: TIFF file holds no images")
        series = self._tif.series[0]
        if log.errors():  # e.g. a shaped series whose pages are missing
            raise self._damaged(count, log.errors()[0][:200])
        size = os.path.getsize(file)
        for index, page in enumerate(self._tif.pages):
            ends = [o + n for o, n in zip(getattr(page, "dataoffsets", ()), getattr(page, "databytecounts", ()))]
            if ends and max(ends) > size:
                raise self._damaged(index, f"its data ends at byte {max(ends)}, the file has {size}")
        self._raw_shape = tuple(series.shape)
        self._pages = series.pages
        self._page_size = math.prod(self._pages[0].shape)
        if len(self._pages) * self._page_size != math.prod(self._raw_shape):
            if series.dataoffset is None:
                raise MitosegError(f"{self.path}: unsupported TIFF layout ({len(self._pages)} pages of shape "
                                   f"{self._pages[0].shape} for a volume of shape {self._raw_shape})")
            # ImageJ stacks over 4 GB keep one IFD for all pages; their data is contiguous.
            page_bytes = self._page_size * np.dtype(series.dtype).itemsize
            end = series.dataoffset + math.prod(self._raw_shape) * np.dtype(series.dtype).itemsize
            if end > size:  # the first page whose data is not all there
                raise self._damaged(max(0, size - series.dataoffset) // page_bytes,
                                    f"the image data ends at byte {end}, the file has {size}")
            self._memmap = tifffile.memmap(file, series=0, mode="r")
        self._dtype = series.dtype

    def _page(self, index: int) -> np.ndarray:
        with _tifffile_log() as log:
            try:
                data = self._pages[index].asarray()
            except MitosegError:
                raise
            except Exception as exc:
                raise self._damaged(index, _brief(exc)) from exc
        if log.errors():
            raise self._damaged(index, log.errors()[0][:200])
        return data

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self._memmap is not None:
            return np.array(self._memmap.reshape(self.shape)[start:stop])  # a copy: detach from the map
        # Slices and pages need not align: a page may hold one channel of a slice, or (planar
        # samples) several slices. Read just the pages spanning the slices' elements.
        slice_size = math.prod(self.shape[1:])
        first, last = start * slice_size, stop * slice_size
        pages = range(first // self._page_size, -(-last // self._page_size))
        flat = np.concatenate([self._page(i).ravel() for i in pages])
        offset = pages.start * self._page_size
        return flat[first - offset:last - offset]

    def close(self) -> None:
        self._memmap = None
        self._tif.close()


class _ArrayVolume(Volume):
    """An HDF5 dataset or Zarr array: slicing reads only the chunks covering the slices."""

    _array = None

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self._array.ndim == 2:
            return self._array[()][None]  # a single slice; read() has checked start=0, stop=1
        return self._array[start:stop]

    def _read_region(self, start: int, stop: int, rows: slice, cols: slice) -> np.ndarray:
        if self._array.ndim == 2:
            return self._array[rows, cols][None]
        return self._array[(slice(start, stop),) + (slice(None),) * (self._array.ndim - 3) + (rows, cols)]


def _only_member(path: str, names: list[str], kind: str) -> str:
    """The member of a container to read when the spec names none: it must hold exactly one."""
    if len(names) == 1:
        return names[0]
    if not names:
        raise MitosegError(f"{path}: holds no {kind}s")
    raise MitosegError(f"{path}: holds {len(names)} {kind}s ({_listing(names)}); name one as {path}:/NAME")


class _H5Volume(_ArrayVolume):
    def __init__(self, path: str, file: str, inner: str | None):
        import h5py

        super().__init__(path)
        try:
            self._file = h5py.File(file, "r")
        except OSError as exc:
            raise MitosegError(f"{path}: not a readable HDF5 file ({_brief(exc)})") from exc
        try:
            names: list[str] = []
            self._file.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
            name = inner if inner is not None else _only_member(path, names, "dataset")
            array = self._file.get(name)
            if not isinstance(array, h5py.Dataset):
                raise MitosegError(f"{path}: dataset '/{name}' not found; datasets in the file: {_listing(names)}")
            self._array = array
        except BaseException:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()


class _ZarrVolume(_ArrayVolume):
    def __init__(self, path: str, file: str, inner: str | None):
        import zarr

        super().__init__(path)
        try:
            node = zarr.open(file, mode="r")
        except (OSError, ValueError, KeyError, TypeError) as exc:  # zarr.errors.* derive from these
            raise MitosegError(f"{path}: not a readable Zarr array or group ({_brief(exc)})") from exc
        if isinstance(node, zarr.Array):
            if inner is not None:
                raise MitosegError(f"{path}: {file} is a single array, it has no '/{inner}'")
            self._array = node
            return
        from mitoseg.data.ngff import ngff_array

        self._array = ngff_array(node, inner, path)  # an OME-Zarr image or one of its levels
        if self._array is not None:
            return
        names = [name for name, member in node.members(max_depth=None) if isinstance(member, zarr.Array)]
        name = inner if inner is not None else _only_member(path, names, "array")
        try:
            self._array = node[name]
        except KeyError:
            self._array = None
        if not isinstance(self._array, zarr.Array):
            raise MitosegError(f"{path}: array '/{name}' not found; arrays in the group: {_listing(names)}")


class _SliceFolderVolume(Volume):
    """A folder of 2-D images, one slice per file; files are decoded only when read."""

    def __init__(self, path: str, folder: str):
        import imageio.v3 as iio

        super().__init__(path)
        self._iio = iio
        names = sorted((entry.name for entry in os.scandir(folder)
                        if entry.is_file() and not entry.name.startswith(".")
                        and file_suffix(entry.name) in SLICE_SUFFIXES), key=_natural_key)
        if not names:
            raise MitosegError(f"{path}: folder holds no {'/'.join(SLICE_SUFFIXES)} images")
        self._files = [os.path.join(folder, name) for name in names]
        # Headers only: every slice must match the first, checked up front so errors come early.
        first = None
        for file in self._files:
            with _tifffile_log() as log:  # .tif slices are read by tifffile, which logs what it finds wrong
                try:
                    props = iio.improps(file)
                except Exception as exc:  # imageio raises OSError, ValueError, or a plugin's own errors
                    raise MitosegError(f"{file}: not a readable image ({_brief(exc)})") from exc
            if log.errors():
                raise MitosegError(f"{file}: not a readable image ({log.errors()[0][:200]})")
            layout = (self._slice_shape(file, props.shape), props.dtype)
            if first is None:
                first = layout
            elif layout != first:
                raise MitosegError(f"{file}: slice shape {layout[0]} {layout[1]} differs from {self._files[0]} "
                                   f"({first[0]} {first[1]})")
        self._raw_shape = (len(self._files), *first[0])
        self._dtype = first[1]

    @staticmethod
    def _slice_shape(file: str, shape: tuple[int, ...]) -> tuple[int, int]:
        if len(shape) == 2 or (len(shape) == 3 and shape[2] in (3, 4)):
            return tuple(shape[:2])
        raise MitosegError(f"{file}: expected a 2-D grayscale image, got shape {tuple(shape)}")

    def _read(self, start: int, stop: int) -> np.ndarray:
        return np.stack([self._gray(file) for file in self._files[start:stop]])

    def _gray(self, file: str) -> np.ndarray:
        with _tifffile_log() as log:
            try:
                image = self._iio.imread(file)
            except Exception as exc:
                raise MitosegError(f"{file}: not a readable image ({_brief(exc)})") from exc
        if log.errors():
            raise MitosegError(f"{file}: not a readable image ({log.errors()[0][:200]})")
        if image.ndim == 3 and image.shape[2] in (3, 4):
            # Gray saved as RGB(A) is common; alpha carries no EM signal and is dropped.
            if not (np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])):
                raise MitosegError(f"{file}: colour image; EM slices must be grayscale")
            image = image[..., 0]
        if image.shape != self.shape[1:] or image.dtype != self.dtype:
            raise MitosegError(f"{file}: decoded as {image.shape} {image.dtype}, expected {self.shape[1:]} "
                               f"{self.dtype}")
        return image


def check_finite(data: np.ndarray, path: str, start: int = 0) -> np.ndarray:
    """``data`` (slices ``start ..`` of the volume ``path``) if every value is finite; else a one-line
    error naming the first slice with NaN or +/-inf values. Integer data are always finite."""
    if data.dtype.kind not in "fc" or not data.size:
        return data
    finite = np.isfinite(data)
    if finite.all():
        return data
    bad = ~finite.reshape(len(data), -1)
    z = int(np.argmax(bad.any(1)))
    values = data[z].reshape(-1)[bad[z]]
    kinds = [name for name, present in (("NaN", np.isnan(values).any()), ("+inf", (values == np.inf).any()),
                                        ("-inf", (values == -np.inf).any())) if present]
    count = int(bad[z].sum())
    raise MitosegError(f"{path}: slice {start + z} holds {count} non-finite value{'s' if count > 1 else ''} "
                       f"({', '.join(kinds)}); intensities must be finite numbers")


def open_volume(spec: str | os.PathLike, *, channels: bool = False, finite: bool = False) -> Volume:
    """Open the volume ``spec`` for lazy reading (see the module docstring for spec forms).

    With ``channels=True`` a 4-D (z, C, y, x) volume, such as the probabilities
    written by ``predict``, is accepted too. With ``finite=True`` reading a slice
    that holds NaN or +/-inf values is an error naming the slice.
    """
    path = os.fspath(spec)
    file, inner = split_spec(path)
    if not os.path.exists(file):
        raise MitosegError(f"{path}: no such file or directory")
    suffix = file_suffix(file)
    if suffix == ZARR_SUFFIX:
        volume = _ZarrVolume(path, file, inner)
    elif suffix in H5_SUFFIXES:
        volume = _H5Volume(path, file, inner)
    elif os.path.isdir(file):
        volume = _SliceFolderVolume(path, file)
    elif suffix in TIFF_SUFFIXES:
        volume = _TiffVolume(path, file)
    else:
        raise MitosegError(f"{path}: unsupported format '{suffix or os.path.basename(file)}'; "
                           f"expected {READABLE}")
    volume.finite = finite
    try:
        if isinstance(volume, _ArrayVolume):
            volume._check(volume._array.shape, volume._array.dtype, channels)
        else:
            volume._check(volume._raw_shape, volume._dtype, channels)
    except BaseException:
        volume.close()
        raise
    return volume


def read_volume(spec: str | os.PathLike, slices: Sequence[int] | None = None, *,
                channels: bool = False) -> np.ndarray:
    """The whole volume ``spec``, or only the slice indices ``slices``, as a (z, y, x) array."""
    with open_volume(spec, channels=channels) as volume:
        return volume.read(0, len(volume)) if slices is None else volume.read_slices(slices)


# ---------------------------------------------------------------------- neighbouring slices (2.5-D)


def context_indices(indices: Sequence[int], context: int, num_slices: int) -> np.ndarray:
    """(n, 2 * context + 1) slice numbers: each of ``indices`` with its ``context`` neighbours on each
    side, in z order, reflected at the ends of the volume (slice -1 is slice 1, slice z is z - 2, as
    ``numpy.pad(mode="reflect")``)."""
    index = np.asarray(indices, dtype=np.int64)[:, None] + np.arange(-context, context + 1)
    if num_slices == 1:
        return np.zeros_like(index)
    period = 2 * (num_slices - 1)
    index = np.mod(index, period)
    return np.where(index >= num_slices, period - index, index)


class SliceReader:
    """Chosen slices of a volume as a stack, each with ``context`` neighbours on each side as channels.

    ``read(start, stop)`` returns the stack's slices ``start .. stop-1``: (n, y, x) without context,
    (n, 2 * context + 1, y, x) with it (the neighbours come from the volume, not from the stack, so
    a selection of distant slices still sees each slice's true neighbours). ``volume``: a
    :class:`Volume` or anything with ``read_slices`` and ``len``.
    """

    def __init__(self, volume, indices: Sequence[int] | None = None, context: int = 0):
        self.volume = volume
        self.indices = list(range(len(volume))) if indices is None else [int(i) for i in indices]
        self.context = context

    def __len__(self) -> int:
        return len(self.indices)

    def read(self, start: int, stop: int) -> np.ndarray:
        chosen = self.indices[start:stop]
        if not self.context:
            if chosen and chosen[-1] - chosen[0] == len(chosen) - 1:  # a run of consecutive slices
                return self.volume.read(chosen[0], chosen[-1] + 1)
            return self.volume.read_slices(chosen)
        stack = context_indices(chosen, self.context, len(self.volume))
        data = self.volume.read_slices(stack.ravel())
        return data.reshape(stack.shape[0], stack.shape[1], *data.shape[1:])


# ---------------------------------------------------------------------------- slice selections


def select_slices(selection, num_slices: int, what: str) -> list[int]:
    """Sorted unique slice indices chosen by a config value.

    ``selection`` is None (all slices), an index, a string such as ``"0:10"``
    (Python-style half-open, negative indices and a step allowed), ``"3,7,12"``
    or ``"0:5, 40, 60:62"``, or a list of indices and such strings. ``what`` (the
    config key) names the value in error messages. Indices and range bounds
    outside the volume are errors, not clipped: they usually mean the wrong
    volume or a typo.
    """
    if selection is None:
        chosen = set(range(num_slices))
    else:
        chosen = set()
        for item in selection if isinstance(selection, (list, tuple)) else [selection]:
            if isinstance(item, str):
                for part in item.split(","):
                    if not part.strip():
                        raise MitosegError(f"{what}: empty item in '{item}'")
                    chosen.update(_parse_selection_part(part.strip(), num_slices, what))
            elif isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_)):
                chosen.add(_check_index(int(item), num_slices, what, f"slice {int(item)}"))
            else:
                raise MitosegError(f"{what}: cannot use {item!r} as a slice selection "
                                   "(expected an index, 'start:stop[:step]' or a list of these)")
    if not chosen:
        raise MitosegError(f"{what}: selects no slices (the volume has {num_slices})")
    return sorted(chosen)


def _check_index(index: int, num_slices: int, what: str, item: str, *, bound: bool = False) -> int:
    """``index`` made non-negative; a range bound may also equal ``num_slices``."""
    high = num_slices + 1 if bound else num_slices
    if not -num_slices <= index < high:
        raise MitosegError(f"{what}: {item} is out of range for a volume of {num_slices} slices")
    return index + num_slices if index < 0 else index


def _parse_selection_part(part: str, num_slices: int, what: str) -> range | list[int]:
    fields = part.split(":")
    try:
        if len(fields) > 3:
            raise ValueError(part)
        numbers = [int(field) if field.strip() else None for field in fields]
    except ValueError:
        raise MitosegError(f"{what}: cannot parse '{part}' (expected an index, 'start:stop[:step]' "
                           "or a comma-separated list of these)") from None
    if len(numbers) == 1:
        return [_check_index(numbers[0], num_slices, what, f"slice {numbers[0]}")]
    start, stop, step = (numbers + [None])[:3]
    if step == 0:
        raise MitosegError(f"{what}: step 0 in '{part}'")
    for bound in (start, stop):
        if bound is not None:
            _check_index(bound, num_slices, what, f"'{part}'", bound=True)
    chosen = range(num_slices)[slice(start, stop, step)]
    if not chosen:
        raise MitosegError(f"{what}: '{part}' selects no slices (the volume has {num_slices})")
    return chosen


# ---------------------------------------------------------------------------- writing

_PENDING: set[str] = set()  # final paths of writers open in this process


def _output_kind(file: str) -> str:
    suffix = file_suffix(file)

    if is_ome_zarr_name(file):
        return "ome-zarr"
    for kind, suffixes in (("tiff", TIFF_SUFFIXES), ("h5", H5_SUFFIXES), ("zarr", (ZARR_SUFFIX,))):
        if suffix in suffixes:
            return kind
    raise MitosegError(f"{file}: cannot write this format; outputs can be {WRITABLE}")


def _chunks(shape: tuple[int, ...], tile: tuple[int, int] | None = None) -> tuple[int, ...]:
    """One slice per chunk (slabs are written and read by z), tiled in y, x (``tile``, default 1024 x 1024)."""
    ty, tx = tile or (1024, 1024)
    return (1, *shape[1:-2], min(shape[-2], ty), min(shape[-1], tx))


class _TiffSink:
    def __init__(self, tmp: str, inner: str | None, shape: tuple[int, ...], dtype: np.dtype):
        self._shape = shape
        # Classic TIFF addresses 4 GB; zlib output is rarely larger than the raw data.
        self._tif = tifffile.TiffWriter(tmp, bigtiff=math.prod(shape) * dtype.itemsize > 2**32 - 2**28)
        self._first = True

    def write(self, start: int, data: np.ndarray) -> None:
        for page in data.reshape(-1, *self._shape[-2:]):
            # The first page carries the full shape (tifffile's "shaped" JSON), so tifffile
            # reads a (z, C, y, x) volume back as such, not as a flat stack of pages.
            # Always compressed: tifffile takes uncompressed pages written one by one for one
            # contiguous block when they are tiny, and then reads them back wrongly.
            extra = {"description": json.dumps({"shape": list(self._shape)})} if self._first else {}
            self._tif.write(page, photometric="minisblack", compression="zlib", compressionargs={"level": 1},
                            metadata=None, **extra)
            self._first = False

    def close(self) -> None:
        self._tif.close()


class _H5Sink:
    def __init__(self, tmp: str, inner: str, shape: tuple[int, ...], dtype: np.dtype):
        import h5py

        self._file = h5py.File(tmp, "w")
        try:
            self._array = self._file.create_dataset(inner, shape=shape, dtype=dtype, chunks=_chunks(shape),
                                                    compression="gzip", compression_opts=1)
        except BaseException:
            self._file.close()
            raise

    def write(self, start: int, data: np.ndarray) -> None:
        self._array[start:start + len(data)] = data

    def close(self) -> None:
        self._file.close()


class _ZarrSink:
    def __init__(self, tmp: str, inner: str | None, shape: tuple[int, ...], dtype: np.dtype,
                 tile: tuple[int, int] | None = None):
        import zarr

        self._tmp, self._inner = tmp, inner
        if inner is None:
            self._array = zarr.create_array(store=tmp, shape=shape, dtype=dtype, chunks=_chunks(shape, tile))
        else:
            group = zarr.open_group(tmp, mode="w")
            self._array = group.create_array(name=inner, shape=shape, dtype=dtype, chunks=_chunks(shape, tile))

    def write(self, start: int, data: np.ndarray) -> None:
        self._array[start:start + len(data)] = data

    def target(self):
        """Where other processes write blocks of this array (:class:`mitoseg.data.ngff.ZarrBlockTarget`)."""
        from mitoseg.data.ngff import ZarrBlockTarget

        return ZarrBlockTarget(self._tmp, self._inner or "")

    def close(self) -> None:
        pass  # every write is already on disk


_SINKS = {"tiff": _TiffSink, "h5": _H5Sink, "zarr": _ZarrSink}


def _members(kind: str, file: str) -> list[str] | None:
    """Datasets/arrays in an existing HDF5 or Zarr output ("" for a root array); None if unreadable."""
    try:
        if kind == "h5":
            import h5py

            with h5py.File(file, "r") as f:
                names: list[str] = []
                f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
                return names
        import zarr

        node = zarr.open(file, mode="r")
        if isinstance(node, zarr.Array):
            return [""]
        return [name for name, member in node.members(max_depth=None) if isinstance(member, zarr.Array)]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_arrays(file: str) -> list[str] | None:
    """Paths of the arrays inside an HDF5 file or Zarr store ("" for a root Zarr array);
    None for other formats or an unreadable file."""
    suffix = file_suffix(file)
    if suffix in H5_SUFFIXES:
        return _members("h5", file)
    if suffix == ZARR_SUFFIX:
        return _members("zarr", file)
    return None


def _remove(path: str) -> None:
    remove_path(path)


class VolumeWriter:
    """Writes a (z, ...) volume slab by slab, atomically.

    ``shape`` is (z, y, x) or has axes between z and (y, x), e.g. (z, C, y, x)
    probabilities. Data goes to a hidden temporary sibling (``.NAME.tmp-PID``);
    :meth:`close` moves it to the final path once all ``z`` slices are written,
    :meth:`abort` deletes it. As a context manager it closes on success and
    aborts on an exception, so a failed run never leaves a partial output.

    TIFF output is zlib-compressed; HDF5 and Zarr are chunked one slice per
    chunk. HDF5 and Zarr outputs replace the whole file or directory: an
    existing one is refused without ``overwrite``, and even with it when it
    holds datasets other than the one being written (those would be lost).
    Two open writers may not target the same file.

    An output named ``*.ome.zarr`` is an OME-Zarr image (:class:`mitoseg.data.ngff.NgffSink`): ``voxel_size``
    (z, y, x nm, or None) becomes its scale, ``labels`` adds the image-label metadata, ``ngff_version`` is
    "0.5" (Zarr v3, default) or "0.4" (Zarr v2). ``tile`` is the (y, x) size of Zarr chunks (default
    1024 x 1024). :meth:`block_target` lets other processes write blocks of a Zarr output
    (``predict --dask``), :meth:`finish_blocks` declares them all written.
    """

    def __init__(self, spec: str | os.PathLike, shape: tuple[int, ...], dtype, overwrite: bool = False, *,
                 voxel_size=None, labels: bool = False, ngff_version: str | None = None,
                 tile: tuple[int, int] | None = None):
        self.path = os.fspath(spec)
        self.shape = tuple(operator.index(n) for n in shape)
        self.dtype = np.dtype(dtype)
        if len(self.shape) < 3 or min(self.shape) < 1:
            raise ValueError(f"{self.path}: cannot write a volume of shape {self.shape}; expected (z, ..., y, x)")
        file, inner = split_spec(self.path)
        if os.path.isdir(file) and file_suffix(file) != ZARR_SUFFIX:
            raise MitosegError(f"{file} is a directory; name the file to write ({WRITABLE})")
        kind = _output_kind(file)
        if kind == "h5" and inner is None:
            raise MitosegError(f"{self.path}: name the dataset to write, e.g. {file}:/data")
        if kind == "ome-zarr" and inner is not None:
            raise MitosegError(f"{self.path}: an OME-Zarr output is a whole store; write it as {file}")
        self._final = os.path.abspath(file)
        self._overwrite = overwrite
        check_output_path(self._final, "output")
        if os.path.lexists(file):
            if not overwrite:
                raise MitosegError(f"{file} exists; pass --overwrite to replace it")
            self._check_replaceable(kind, file, inner)
        if self._final in _PENDING:
            raise MitosegError(f"{file} is already being written by another output; write to a different file")
        parent = os.path.dirname(self._final)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            if disk_full_cause(exc):
                raise disk_full_error(self._final) from exc
            raise MitosegError(f"{file}: cannot create its folder {parent} ({exc.strerror})") from exc
        # A hidden sibling named after this process: temporaries of killed runs (their process gone) are
        # recognised and removed here, those of a run writing the same output right now are not.
        self._tmp = os.fspath(temporary_path(self._final))
        _remove(self._tmp)  # left over by a killed run that had the same process id
        remove_stale_temporaries(self._final)
        _PENDING.add(self._final)
        self._next = 0
        self._sink = None
        try:
            if kind == "ome-zarr":
                from mitoseg.data.ngff import NgffSink

                self._sink = NgffSink(self._tmp, inner, self.shape, self.dtype, voxel_size=voxel_size,
                                      labels=labels, ngff_version=ngff_version, tile=tile,
                                      name=os.path.basename(self._final))
            else:
                self._sink = _SINKS[kind](self._tmp, inner, self.shape, self.dtype,
                                          **({"tile": tile} if kind == "zarr" else {}))
        except BaseException as exc:
            self.abort()
            self._raise_write_error(exc)
            raise

    def _raise_write_error(self, exc: BaseException) -> None:
        """A full disk, a permission or I/O problem while writing: one line naming the output (the
        temporary is already gone and the final path untouched)."""
        if disk_full_cause(exc):
            raise disk_full_error(self._final, "nothing was written there") from exc
        if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError,)) and exc.errno is not None:
            raise MitosegError(f"{self._final}: cannot write ({exc.strerror})") from exc

    def _check_replaceable(self, kind: str, file: str, inner: str | None) -> None:
        if kind == "tiff":
            if os.path.isdir(file):
                raise MitosegError(f"{file} is a directory; cannot replace it with a TIFF file")
            return
        members = _members(kind, file)
        if members is None:
            if os.path.isdir(file):  # never delete an arbitrary folder
                raise MitosegError(f"{file} exists and is not a Zarr store; remove it or choose another output")
            return
        # An OME-Zarr output is its one level "0": other levels or labels inside would be lost.
        mine = {"0", ""} if kind == "ome-zarr" else {inner or ""}
        others = [name for name in members if name not in mine]
        if others:
            raise MitosegError(f"{file} holds other data ({_listing(others)}) that --overwrite would delete; "
                               "write to a new file")

    def __enter__(self) -> VolumeWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, start: int, data: np.ndarray) -> None:
        """Store ``data`` of shape (n, *shape[1:]) as slices ``[start, start + n)``; slabs come in z order."""
        if self._sink is None:
            raise MitosegError(f"{self.path}: writer is already closed")
        data = np.asarray(data)
        if data.ndim != len(self.shape) or data.shape[1:] != self.shape[1:]:
            raise MitosegError(f"{self.path}: slab of shape {data.shape} does not fit a volume of shape {self.shape}")
        if start != self._next:
            raise MitosegError(f"{self.path}: slab starts at slice {start}, expected {self._next} "
                               "(slabs must be written in order, without gaps)")
        if start + len(data) > self.shape[0]:
            raise MitosegError(f"{self.path}: slab {start}:{start + len(data)} goes past the {self.shape[0]} slices")
        if not np.can_cast(data.dtype, self.dtype, "same_kind"):
            raise MitosegError(f"{self.path}: cannot store {data.dtype} data as {self.dtype}")
        if len(data):
            try:
                self._sink.write(start, data.astype(self.dtype, copy=False))
            except Exception as exc:
                self.abort()
                self._raise_write_error(exc)
                raise
        self._next += len(data)

    def block_target(self):
        """Where processes other than this one (Dask workers) write blocks of a Zarr or OME-Zarr output
        (:class:`mitoseg.data.ngff.ZarrBlockTarget`: the temporary store); other formats are refused."""
        target = getattr(self._sink, "target", None)
        if target is None:
            raise MitosegError(f"{self.path}: only Zarr outputs (DIR.zarr, DIR.zarr:/ARRAY, DIR.ome.zarr) can be "
                               "written by several processes; write to one of those")
        return target()

    def finish_blocks(self) -> None:
        """Declare every slice written through :meth:`block_target`, so :meth:`close` moves the output into
        place (the caller has seen every block written)."""
        if self._sink is None:
            raise MitosegError(f"{self.path}: writer is already closed")
        self._next = self.shape[0]

    def close(self) -> None:
        """Finish the file and move it to its final path (only now does the output appear)."""
        if self._sink is None:
            return
        if self._next != self.shape[0]:
            self.abort()
            raise MitosegError(f"{self.path}: only {self._next} of {self.shape[0]} slices were written")
        try:
            self._sink.close()
            if not self._overwrite and os.path.lexists(self._final):  # created while we were writing
                raise MitosegError(f"{self._final} exists; pass --overwrite to replace it")
            replace_path(self._tmp, self._final)  # a folder output swapped in one step
        except BaseException as exc:
            self.abort()
            self._raise_write_error(exc)
            raise
        self._sink = None
        _PENDING.discard(self._final)

    def abort(self) -> None:
        """Delete the temporary output; the final path is left as it was."""
        sink, self._sink = self._sink, None
        if sink is not None:
            try:
                sink.close()
            except Exception:
                pass  # the file is being thrown away
        _remove(self._tmp)
        _PENDING.discard(self._final)


def write_volume(spec: str | os.PathLike, array: np.ndarray, overwrite: bool = False) -> None:
    """Write ``array`` (z, ..., y, x) to ``spec`` atomically; a 2-D array is written as one slice."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    with VolumeWriter(spec, array.shape, array.dtype, overwrite=overwrite) as writer:
        writer.write(0, array)
