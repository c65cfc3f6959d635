"""Sliding-window prediction of whole volumes, slab by slab.

A slab of ``inference.slab`` slices is read, normalized, predicted with MONAI's
sliding-window inferer (the slices form the batch; with ``inference.tta`` under
each of the 8 flips / quarter turns) and handed on before the next slab is read:
memory is bounded by the slab, not the volume. Validation during training,
``mitoseg predict``, ``mitoseg evaluate --checkpoint`` and the napari Predict
widget share this code.

With a scale factor (``scale``: the model's working pixel size over the volume's, see
:mod:`mitoseg.data.resample`) each slab is resampled in y-x to the model's grid after normalization, predicted
there, and its probabilities are resampled back to the slab's own y-x size before anything else sees them:
outputs always have the input's shape. z is never resampled (a 3-D slab likewise in y-x only).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from tqdm.auto import tqdm

from mitoseg.data.resample import apply_taps, axis_taps, is_identity, resample, scaled_shape
from mitoseg.data.transforms import Normalization
from mitoseg.device import autocast
from mitoseg.inference.tta import predict_with_tta, tta_transforms
from mitoseg.instances.components import iter_slabs
from mitoseg.instances.postprocess import postprocess_labels
from mitoseg.semi.daw import max_and_argmax


def make_inferer(inference_cfg) -> SlidingWindowInferer:
    return SlidingWindowInferer(
        roi_size=tuple(inference_cfg.roi_size),
        sw_batch_size=inference_cfg.sw_batch_size,
        overlap=inference_cfg.overlap,
        mode=inference_cfg.blend,
        progress=False,
    )


def window_span(core: tuple[int, int], size: int, roi: int, overlap: float, reverse: bool = False) -> tuple[int, int]:
    """The range of an axis of ``size`` pixels covered by the sliding windows that reach into ``core``
    (``[c0, c1)``), with the windows placed as MONAI places them on the whole axis: starts at multiples of
    the scan interval ``int(roi * (1 - overlap))``, the last one flush with the end (``reverse``: laid out
    from the other end, as on a flipped axis). Predicting just that range places the same windows over
    ``core``, so ``core`` gets the same blended values as in a prediction of the whole axis."""
    from monai.data.utils import dense_patch_slices

    c0, c1 = core
    if reverse:
        a, b = window_span((size - c1, size - c0), size, roi, overlap)
        return size - b, size - a
    if size <= roi:  # one window (padded by the inferer) covers the whole axis
        return 0, size
    interval = max(1, int(roi * (1 - overlap)))
    starts = np.array([s[0].start for s in dense_patch_slices((size,), (roi,), (interval,))])
    touching = starts[(starts < c1) & (starts + roi > c0)]
    return int(touching.min()), int(touching.max()) + roi


def transformed_axes(transform, spatial_dims: int = 2) -> tuple[tuple[int, bool], tuple[int, bool]]:
    """For the y and x axes of an image: (the axis, 0 = y or 1 = x, they become under ``transform``,
    whether it runs backwards there). None: the identity."""
    if transform is None:
        return (0, False), (1, False)
    h, w = 2, 3
    lead = (1, 1, 1) if spatial_dims == 3 else (1, 1)
    ys = torch.arange(h, dtype=torch.float32).view(*lead, h, 1).expand(*lead, h, w)
    xs = torch.arange(w, dtype=torch.float32).view(*lead, 1, w).expand(*lead, h, w)
    found = []
    for coords in (ys, xs):
        moved = transform.forward(coords).reshape(transform.forward(coords).shape[-2:])
        for axis in (0, 1):
            step = moved.diff(dim=axis)
            if step.numel() and bool((step != 0).any()):
                found.append((axis, bool(step.flatten()[0] < 0)))
                break
    return found[0], found[1]


def labels_from_probabilities(probs: torch.Tensor, dtype=np.uint8) -> np.ndarray:
    """Class ids (n, y, x) of probabilities (n, K, y, x), as a host array (the first class at the max, as
    ``argmax``; read off the maxima: ``argmax`` over the class axis is 15x slower on the CPU)."""
    return max_and_argmax(probs)[1].cpu().numpy().astype(dtype)


class VolumePredictor:
    """Class probabilities of the slices of a volume under a run's inference settings (``cfg.inference``:
    window, overlap, blending, slab, TTA) with mixed precision where ``train.amp`` allows it; ``scale``: the
    factor the volume is resampled by in y-x for the model (1: its own grid, nothing resampled)."""

    def __init__(self, model: torch.nn.Module, cfg, device: torch.device, amp: bool | None = None,
                 scale: float = 1.0, tta: bool | None = None):
        self.model = model
        self.tta = cfg.inference.tta if tta is None else tta  # validation during training may leave it out
        self.scale = float(scale)
        self.resamples = not is_identity(self.scale)
        self.cfg = cfg
        self.inference = cfg.inference
        self.device = device
        self.amp = cfg.train.amp if amp is None else amp
        self.spatial_dims = getattr(model, "spatial_dims", 2)
        self.inferer = make_inferer(cfg.inference)

    @torch.no_grad()
    def warm(self) -> None:
        """One forward pass of a batch of windows of zeros: a process's one-off setup of the convolutions for
        these shapes (oneDNN's primitives on the CPU, cuDNN's algorithm choice) happens here instead of in its
        first slab or block."""
        from mitoseg.config import input_channels

        shape = (self.inference.sw_batch_size, input_channels(self.cfg), *self.inference.roi_size)
        with autocast(self.device, self.amp):
            self.model(torch.zeros(shape, device=self.device))

    def _softmax(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp):
            logits = self.inferer(images, self.model)
        return torch.softmax(logits.float(), dim=1)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """(n, C, y, x) normalized images -> (n, K, y, x) float32 probabilities on the device."""
        images = images.to(self.device)
        if self.tta:
            return predict_with_tta(self._softmax, images, self.spatial_dims)
        return self._softmax(images)

    def input_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images (n, C, y, x) or (1, 1, z, y, x) at the volume's grid -> probabilities (n, K, y, x) /
        (1, K, z, y, x) at the same grid: resampled to the model's pixel size and back when ``scale`` says so."""
        if not self.resamples:
            return self.probabilities(images)
        size = tuple(images.shape[-2:])
        small = resample(images.to(self.device), scaled_shape(size, self.scale))
        return resample(self.probabilities(small), size)

    def slabs(self, read: Callable[[int, int], np.ndarray], num_slices: int,
              normalization: Normalization) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, probabilities) per slab of slices ``0 .. num_slices-1`` read by ``read(start, stop)``
        ((n, y, x) slices, or (n, C, y, x) stacks of channels); the model is in eval mode meanwhile."""
        was_training = self.model.training
        self.model.eval()
        try:
            for start, stop in iter_slabs(num_slices, self.inference.slab):
                if self.spatial_dims == 3:
                    yield start, stop, self._volume_slab(read, num_slices, normalization, start, stop)
                    continue
                images = torch.from_numpy(normalization(read(start, stop)))
                if images.dim() == 3:
                    images = images.unsqueeze(1)
                yield start, stop, self.input_probabilities(images)
        finally:
            self.model.train(was_training)

    def _volume_slab(self, read, num_slices: int, normalization: Normalization, start: int, stop: int) -> torch.Tensor:
        """3-D model: slices ``start .. stop-1`` predicted with half a window of neighbouring slices on each
        side (so windows near the slab's faces still see their context), at least one window deep where the
        volume allows (a shorter stack would be padded), then cut out: (n, K, y, x)."""
        low, high = self.slab_range(start, stop, num_slices)
        images = torch.from_numpy(normalization(read(low, high)))[None, None]  # (1, 1, z, y, x)
        probs = self.input_probabilities(images)[0]  # (K, z, y, x)
        return probs[:, start - low:stop - low].transpose(0, 1)

    def slab_range(self, start: int, stop: int, num_slices: int) -> tuple[int, int]:
        """3-D model: the slices read to predict slices ``start .. stop-1``: half a window on each side, at
        least one window deep where the volume allows."""
        depth = self.inference.roi_size[0]
        halo = depth // 2
        low, high = max(0, start - halo), min(num_slices, stop + halo)
        if high - low < depth:  # near a face of the volume: take the missing slices from the other side
            high = min(num_slices, low + depth)
            low = max(0, high - depth)
        return low, high

    # ------------------------------------------------------------------ blocks (predict --dask)

    def block_regions(self, shape: tuple[int, int, int], rows: tuple[int, int], cols: tuple[int, int]) -> list:
        """Per transform (one without TTA, else as in ``tta_transforms``): the y-x region
        ``((y0, y1), (x0, x1))`` holding every sliding window that reaches into ``rows`` x ``cols``, laid
        out as on whole slices of a volume of ``shape`` (see :func:`window_span`)."""
        roi = tuple(self.inference.roi_size[-2:])
        size = shape[-2:]
        regions = []
        for transform in tta_transforms(self.spatial_dims) if self.tta else [None]:
            axes = transformed_axes(transform, self.spatial_dims)
            regions.append(tuple(window_span(core, n, roi[axes[a][0]], self.inference.overlap, axes[a][1])
                                 for a, (core, n) in enumerate(zip((rows, cols), size))))
        return regions

    def block_slabs(self, read: Callable[[int, int, slice, slice], np.ndarray], shape: tuple[int, int, int],
                    normalization: Normalization, z: tuple[int, int], rows: tuple[int, int],
                    cols: tuple[int, int]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, stop, probabilities (n, K, rows, cols)) per slab of the block ``z`` x ``rows`` x ``cols``
        of a volume of ``shape``, equal to what :meth:`slabs` gives there for whole slices (within float
        rounding): the block is read with the windows reaching into it (``read(start, stop, rows, cols)``:
        raw (n, y, x) or (n, C, y, x) of that region), each window placed as on whole slices, under each TTA
        transform; slabs start where :meth:`slabs` starts them (``z[0]`` a multiple of ``inference.slab``)."""
        slab = self.inference.slab
        if z[0] % slab or (z[1] % slab and z[1] != shape[0]):
            raise ValueError(f"block slices {z} do not start and end on slabs of {slab} slices")
        transforms = tta_transforms(self.spatial_dims) if self.tta else [None]
        was_training = self.model.training
        self.model.eval()
        try:
            if not self.resamples:
                regions = self.block_regions(shape, rows, cols)
                yield from self._block_slabs(read, shape, normalization, z, rows, cols, transforms, regions)
            else:
                yield from self._resampled_block_slabs(read, shape, normalization, z, rows, cols, transforms)
        finally:
            self.model.train(was_training)

    def _resampled_block_slabs(self, read, shape, normalization, z, rows, cols, transforms):
        """:meth:`block_slabs` at a scale: the rows / columns of the model's grid that the block's probabilities
        are interpolated from, predicted as in :meth:`_block_slabs` on the model's grid of the whole slice (the
        windows reaching into them); their image is the rows of the whole slice's resampling
        (:func:`~mitoseg.data.resample.axis_taps`) applied to the input pixels they read, so the block gets the
        values of whole-slice prediction, at the seams too."""
        size = tuple(shape[-2:])
        small = scaled_shape(size, self.scale)
        # Up: the block's input rows / columns from model rows [c0, c1) / columns [d0, d1).
        up_rows, up_cols = (axis_taps(m, n, *core) for m, n, core in zip(small, size, (rows, cols)))
        (c0, c1), (d0, d1) = up_rows[:2], up_cols[:2]
        model_shape = (shape[0], *small)
        regions = self.block_regions(model_shape, (c0, c1), (d0, d1))
        w0, w1 = min(r[0][0] for r in regions), max(r[0][1] for r in regions)
        v0, v1 = min(r[1][0] for r in regions), max(r[1][1] for r in regions)
        # Down: model rows [w0, w1) / columns [v0, v1) from input rows [a0, a1) / columns [b0, b1).
        down_rows, down_cols = axis_taps(size[0], small[0], w0, w1), axis_taps(size[1], small[1], v0, v1)
        (a0, a1), (b0, b1) = down_rows[:2], down_cols[:2]

        def read_small(low: int, high: int, r: slice, c: slice) -> torch.Tensor:
            raw = np.asarray(read(low, high, slice(a0, a1), slice(b0, b1)))
            images = torch.from_numpy(normalization(raw))
            return apply_taps(images.to(self.device), down_rows, down_cols)

        for start, stop, total in self._block_slabs(read_small, model_shape, None, z, (c0, c1), (d0, d1),
                                                     transforms, regions):
            yield start, stop, apply_taps(total, up_rows, up_cols)

    def _block_slabs(self, read, shape, normalization, z, rows, cols, transforms, regions):
        slab = self.inference.slab
        y0, y1 = min(r[0][0] for r in regions), max(r[0][1] for r in regions)
        x0, x1 = min(r[1][0] for r in regions), max(r[1][1] for r in regions)
        for start in range(z[0], z[1], slab):
            stop = min(start + slab, z[1])
            low, high = self.slab_range(start, stop, shape[0]) if self.spatial_dims == 3 else (start, stop)
            images = read(low, high, slice(y0, y1), slice(x0, x1))
            images = images if normalization is None else torch.from_numpy(normalization(images))
            images = images[None, None] if self.spatial_dims == 3 else images.unsqueeze(1) if images.dim() == 3 \
                else images
            images = images.to(self.device)
            total = None
            with torch.no_grad():
                for transform, ((ry0, ry1), (rx0, rx1)) in zip(transforms, regions):
                    crop = images[..., ry0 - y0:ry1 - y0, rx0 - x0:rx1 - x0]
                    if transform is None:
                        probs = self._softmax(crop)
                    else:
                        probs = transform.inverse(self._softmax(transform.forward(crop)))
                    probs = probs[..., rows[0] - ry0:rows[1] - ry0, cols[0] - rx0:cols[1] - rx0]
                    total = probs if total is None else total + probs
            if len(transforms) > 1:  # as predict_with_tta: the sum in the same order, then the mean
                total = total / len(transforms)
            if self.spatial_dims == 3:
                total = total[0][:, start - low:stop - low].transpose(0, 1)
            yield start, stop, total

    @property
    def postprocessing(self) -> bool:
        return self.inference.min_object_voxels > 0 or self.inference.fill_holes

    def predict_labels(self, read: Callable[[int, int], np.ndarray], num_slices: int, normalization: Normalization,
                       write_labels: Callable[[int, np.ndarray], None],
                       write_probabilities: Callable[[int, torch.Tensor], None] | None = None,
                       scratch: Callable[[tuple, np.dtype], np.ndarray] | None = None, progress: bool = False,
                       description: str = "predict") -> None:
        """Labels (and optionally probabilities) of every slice, post-processed as ``cfg.inference`` says.

        Without post-processing each slab's labels go straight to ``write_labels``. With it they are
        collected in ``scratch(shape, dtype)`` (default: an array in memory; ``predict`` passes a
        scratch file on disk, :mod:`mitoseg.data.scratch`, so memory stays bounded), post-processed slab
        by slab, then written.
        """
        dtype = np.uint8 if self.cfg.data.num_classes <= 256 else np.uint16
        store = None
        for start, stop, probs in tqdm(self.slabs(read, num_slices, normalization),
                                       total=-(-num_slices // self.inference.slab), desc=description, unit="slab",
                                       disable=not progress, leave=False):
            labels = labels_from_probabilities(probs, dtype)
            if write_probabilities is not None:
                write_probabilities(start, probs)
            if not self.postprocessing:
                write_labels(start, labels)
                continue
            if store is None:
                shape = (num_slices, *labels.shape[1:])
                store = scratch(shape, dtype) if scratch is not None else np.empty(shape, dtype)
            store[start:stop] = labels
        if store is None:
            return

        def put(start: int, labels: np.ndarray) -> None:
            store[start:start + labels.shape[0]] = labels

        postprocess_labels(lambda s, e: store[s:e], put, num_slices, self.inference.min_object_voxels,
                           self.inference.fill_holes, slab=self.inference.slab, progress=progress)
        for start, stop in iter_slabs(num_slices, self.inference.slab):
            write_labels(start, np.asarray(store[start:stop]))


def predict_volume(model: torch.nn.Module, read: Callable[[int, int], np.ndarray], num_slices: int,
                   normalization: Normalization, cfg, device: torch.device,
                   consume: Callable[[int, torch.Tensor], None], amp: bool | None = None,
                   progress: bool = True, description: str = "predict") -> None:
    """Probabilities of slices ``0 .. num_slices-1``: ``consume(start, probs)`` per slab (no post-processing)."""
    predictor = VolumePredictor(model, cfg, device, amp)
    with tqdm(total=num_slices, desc=description, unit="slice", disable=not progress, leave=False) as bar:
        for start, stop, probs in predictor.slabs(read, num_slices, normalization):
            consume(start, probs)
            bar.update(stop - start)


def score_volume(predictor: VolumePredictor, read_image: Callable[[int, int], np.ndarray],
                 read_label: Callable[[int, int], np.ndarray], num_slices: int, normalization: Normalization,
                 ignore_index: int | None = None, scratch: Callable[[tuple, np.dtype], np.ndarray] | None = None,
                 progress: bool = False, description: str = "evaluate") -> torch.Tensor:
    """The confusion matrix (K x K, rows: label) of the predicted, post-processed labels of a volume
    against ``read_label(start, stop)``: validation, ``data.test`` and ``mitoseg evaluate --checkpoint``."""
    from mitoseg.metrics import confusion_matrix

    k = predictor.cfg.data.num_classes
    matrix = torch.zeros(k, k, dtype=torch.int64)

    def consume(start: int, labels: np.ndarray) -> None:
        nonlocal matrix
        target = np.asarray(read_label(start, start + labels.shape[0]))
        matrix += confusion_matrix(torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(target.astype(np.int64)),
                                   k, ignore_index)

    predictor.predict_labels(read_image, num_slices, normalization, consume, scratch=scratch, progress=progress,
                             description=description)
    return matrix
