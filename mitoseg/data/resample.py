"""A model's working pixel size (``data.pixel_size``) and the in-plane resampling it needs, written once.

A model may train and predict at a pixel size other than the volume's own (Lucchi's FIB-SEM volume is 5 nm
per pixel; at 10 nm a window sees four times the area for the same FLOPs). The scale factor of a volume is
``model pixel size / volume pixel size`` (2.0: the model sees half as many pixels per axis); a volume of
``n`` pixels along y or x becomes ``round(n / factor)`` pixels. Only y and x are resampled: z is never
touched (2-D and 2.5-D models see whole slices; a 3-D model's windows keep the volume's slices, so its
``inference.roi_size`` / ``data.patch_size`` depth stays in the volume's slices).

One operator resamples everything, images, one-hot labels and probabilities:
``F.interpolate(mode="bilinear", antialias=True, align_corners=False)`` on float32. Chosen over area averaging
because it also handles factors that are not whole numbers (6 nm -> 10 nm is 1.67) with one rule, and it is
a proper low-pass filter when reducing (a triangle of ``factor`` input pixels each side: a checkerboard
comes out a flat grey); when enlarging it is plain bilinear interpolation. Its weights along an axis sum to 1,
so the affine intensity normalization commutes with it (normalizing before or after is the same up to float
rounding). The weights are applied tap by tap (:func:`axis_taps`, :func:`apply_taps`), so a range of output
pixels computed from a block of a volume (``predict --dask``) is bit for bit that of the whole slice.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mitoseg.errors import MitosegError

_FACTOR = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*[xX]\s*$")


# ------------------------------------------------------------------------------------------ pixel sizes


@dataclass(frozen=True)
class PixelSize:
    """A model's working in-plane pixel size: ``nm`` (nanometres per pixel) and / or ``factor`` (times the
    volume's own pixel size, for volumes whose files do not say it); neither: the volume's own grid."""

    nm: float | None = None
    factor: float | None = None

    @property
    def native(self) -> bool:
        return self.nm is None and self.factor is None

    def scale_for(self, volume_nm: float | None, what: str, hint: str) -> float:
        """The scale factor of a volume of ``volume_nm`` nm per pixel (None: unknown). With the model's nm and
        the volume's: their ratio; else the model's factor; a model in nm and a volume of unknown pixel size:
        one-line error naming ``what`` and ``hint`` (the key or option that supplies it)."""
        if self.nm is not None and volume_nm is not None:
            return self.nm / volume_nm
        if self.factor is not None:
            return self.factor
        if self.nm is not None:
            raise MitosegError(f"{what}: its pixel size is unknown (the file stores none) and the model works at "
                               f"{self.nm:g} nm per pixel; set {hint}")
        return 1.0

    def describe(self) -> str:
        return f"{self.nm:g} nm" if self.nm is not None else f"{self.factor:g}x" if self.factor else "the volume's own"


def parse_pixel_size(value) -> PixelSize:
    """``data.pixel_size`` as a :class:`PixelSize`: a number (nm), a string ``"2x"`` (a factor) or None."""
    if value is None:
        return PixelSize()
    if isinstance(value, str):
        match = _FACTOR.match(value)
        if not match:
            raise MitosegError(f"config key 'data.pixel_size' must be a number (nm per pixel) or a factor such as "
                               f"'2x', got {value!r}")
        return PixelSize(factor=float(match.group(1)))
    return PixelSize(nm=float(value))


def in_plane_nm(voxel_size) -> float | None:
    """The in-plane (y) pixel size of a (z, y, x) voxel size in nm, or None. x is taken to equal y (EM
    sections have square pixels)."""
    if voxel_size is None:
        return None
    value = float(voxel_size[1])
    return value if math.isfinite(value) and value > 0 else None


def volume_pixel_nm(spec: str, voxel_size=None) -> float | None:
    """A volume's in-plane nm per pixel: ``voxel_size`` (a config's ``voxel_size`` / ``--voxel-size``) when
    given, else what its file stores (:func:`mitoseg.data.metadata.voxel_size_nm`), else None."""
    if voxel_size is not None:
        return in_plane_nm(voxel_size)
    from mitoseg.data.metadata import voxel_size_nm

    return in_plane_nm(voxel_size_nm(spec))


def is_identity(factor: float) -> bool:
    return abs(float(factor) - 1.0) < 1e-9


def output_size(size: int, factor: float) -> int:
    """Pixels along an axis of ``size`` pixels at ``factor``: ``round(size / factor)``, at least 1 (halves up)."""
    return max(1, int(math.floor(size / factor + 0.5)))


def scaled_shape(shape: tuple[int, int], factor: float) -> tuple[int, int]:
    return output_size(shape[0], factor), output_size(shape[1], factor)


# ------------------------------------------------------------------------------------------ resampling


def resample(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``tensor`` (..., y, x) resampled in y-x to ``size`` (float32, same device); the input itself when the
    size is already right. Every leading axis (slices, channels, classes, z of a 3-D slab) is kept. The
    weights are ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)``'s (equal within float
    rounding), applied tap by tap (:func:`axis_taps`), y first, so a block of a volume resampled with the
    same rows (:func:`axis_taps`) gets bit for bit the values of the whole slice."""
    size = (int(size[0]), int(size[1]))
    if tuple(tensor.shape[-2:]) == size:
        return tensor
    rows = axis_taps(tensor.shape[-2], size[0], 0, size[0])
    cols = axis_taps(tensor.shape[-1], size[1], 0, size[1])
    return apply_taps(tensor, rows, cols)


def reduce_image(array: np.ndarray, factor: float, chunk: int = 16) -> np.ndarray:
    """Image slices (n, y, x) or (n, C, y, x), any dtype, at ``factor``: float32 (..., round(y / f), round(x / f)),
    anti-aliased; ``chunk`` slices at a time (bounded memory); the array itself at factor 1."""
    if is_identity(factor):
        return array
    size = scaled_shape(array.shape[-2:], factor)
    out = np.empty((*array.shape[:-2], *size), np.float32)
    for start in range(0, len(array), chunk):
        part = torch.from_numpy(np.ascontiguousarray(array[start:start + chunk], dtype=np.float32))
        out[start:start + chunk] = resample(part, size).numpy()
    return out


def reduce_labels(label: np.ndarray, factor: float, num_classes: int, ignore_index: int | None = None,
                  chunk: int = 16) -> np.ndarray:
    """Class ids (n, y, x) at ``factor``: each class's indicator resampled like the image (one-hot, the same
    anti-aliased filter), then the most present class per pixel. ``ignore_index`` is one more indicator: a
    pixel mostly covered by ignored pixels stays ignored, one mostly labeled takes the labels' majority.
    int64; the labels themselves at factor 1."""
    if is_identity(factor):
        return label
    size = scaled_shape(label.shape[-2:], factor)
    ids = torch.arange(num_classes + (ignore_index is not None)).view(1, -1, 1, 1)
    out = np.empty((len(label), *size), np.int64)
    for start in range(0, len(label), chunk):
        part = torch.from_numpy(np.asarray(label[start:start + chunk], dtype=np.int64))
        if ignore_index is not None:  # the ignore value becomes the last indicator
            part = torch.where(part == ignore_index, num_classes, part)
        onehot = (part.unsqueeze(1) == ids).float()  # (n, K(+1), y, x)
        best = resample(onehot, size).argmax(1)
        if ignore_index is not None:
            best = torch.where(best == num_classes, ignore_index, best)
        out[start:start + chunk] = best.numpy()
    return out


def axis_taps(size_in: int, size_out: int, start: int, stop: int) -> tuple[int, int, torch.Tensor, torch.Tensor]:
    """Output pixels ``start .. stop-1`` of an axis of ``size_in`` -> ``size_out`` pixels as taps: PyTorch's
    anti-aliased bilinear weights (a triangle of half-width ``max(1, size_in / size_out)`` input pixels,
    normalised over the pixels inside the axis). Returns ``(first, stop_in, index, weight)``: the input pixels
    ``first .. stop_in-1`` they read, and per output pixel a fixed number of taps (that of the axis, whatever
    the range): ``index`` into that range, float32 ``weight`` (0 for padding taps). A row's taps do not depend
    on the range asked for, which is what makes a block's resampling the whole slice's."""
    scale = size_in / size_out
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    count = int(math.ceil(2 * support)) + 1
    centre = scale * (np.arange(start, stop, dtype=np.float64) + 0.5)
    low = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    high = np.minimum((centre + support + 0.5).astype(np.int64), size_in)
    j = low[:, None] + np.arange(count)[None, :]
    w = np.clip(1.0 - np.abs((j - centre[:, None] + 0.5) * invscale), 0.0, None)
    w[j >= high[:, None]] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    first, last = int(low.min()), int(high.max())
    index = np.clip(j, first, last - 1) - first
    return first, last, torch.from_numpy(index), torch.from_numpy(w.astype(np.float32))


def _apply_axis(tensor: torch.Tensor, axis: int, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    index, weight = index.to(tensor.device), weight.to(tensor.device)
    shape = (-1, 1) if axis == -2 else (-1,)
    out = None
    for t in range(index.shape[1]):  # a handful of taps, each one vectorised over the whole tensor
        part = tensor.index_select(tensor.dim() + axis, index[:, t]) * weight[:, t].view(shape)
        out = part if out is None else out + part
    return out


def apply_taps(tensor: torch.Tensor, rows, cols) -> torch.Tensor:
    """``tensor`` (..., h, w) covering the input pixels of ``rows`` / ``cols`` (:func:`axis_taps`) -> the
    output pixels they describe (..., len(rows), len(cols)), float32; y first, then x."""
    tensor = tensor.float()
    return _apply_axis(_apply_axis(tensor, -2, rows[2], rows[3]), -1, cols[2], cols[3])
