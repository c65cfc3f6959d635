"""Slices of EM volumes in memory, and 2-D training patches sampled from them.

Every training sample is a pure function of ``(seed, index)``: the slice, the
crop window and every random augmentation are drawn from a generator seeded by
both. The batch of iteration ``i`` is therefore the same whether a run is
interrupted and resumed or not, and whichever DataLoader worker makes it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import Randomizable, SpatialCropd
from torch.utils.data import Dataset

from mitoseg.data.readers import SliceReader, open_volume, select_slices
from mitoseg.data.transforms import CutMixBoxes, Normalization, compute_normalization, sample_for_stats
from mitoseg.errors import MitosegError


@dataclass
class VolumeSlices:
    """Selected slices of one volume (raw dtype), their labels and the volume's normalization."""

    image: np.ndarray  # (n, y, x), or (n, 2k+1, y, x) with k neighbouring slices on each side (data.context_slices);
    # float32 at the model's pixel size when resampled (``scale`` of load_volume_slices)
    label: np.ndarray | None  # (n, y, x) int64, or None
    indices: list[int]  # slice numbers in the source volume
    normalization: Normalization
    source: str


def apply_label_map(label: np.ndarray, label_map: dict[int, int] | None) -> np.ndarray:
    """Replace raw label values by class ids (e.g. 255 -> 1); one vectorised pass."""
    if not label_map:
        return label
    out = label.copy()
    for raw, cls in label_map.items():  # a handful of entries, each a vectorised pass
        out[label == raw] = cls
    return out


def check_label_values(label: np.ndarray, num_classes: int, ignore_index: int | None, source: str) -> None:
    """Label values must be class ids ``0 .. num_classes-1`` (or the ignore value)."""
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)):
            raise MitosegError(f"{source}: label volume holds non-finite values (NaN or inf); labels are class ids")
        if np.any(label != np.round(label)):
            raise MitosegError(f"{source}: label volume holds non-integer values")
    bad = (label < 0) | (label >= num_classes)
    if ignore_index is not None:
        bad &= label != ignore_index
    if bad.any():
        values = np.unique(label[bad])[:5].tolist()
        allowed = f"0..{num_classes - 1}" + (f" or {ignore_index}" if ignore_index is not None else "")
        raise MitosegError(
            f"{source}: label values {values} are outside the classes {allowed} (data.num_classes = {num_classes})"
        )


def load_volume_slices(vol_cfg, key: str, num_classes: int, norm_cfg, *, require_label: bool,
                       ignore_index: int | None = None, label_map: dict[int, int] | None = None,
                       context: int = 0, scale: float = 1.0) -> VolumeSlices:
    """Read the slices ``vol_cfg.slices`` of ``vol_cfg.image`` (and its label) into memory; with
    ``context`` k, each slice with its k neighbours in the volume on each side as channels (2.5-D).

    ``scale`` (the model's pixel size over the volume's, ``data.pixel_size``): image and label are resampled
    in y-x once, here (:mod:`mitoseg.data.resample`: the image anti-aliased, the label by its classes'
    resampled indicators); the normalization statistics stay those of the volume at its own grid, as predict
    computes them (the affine mapping commutes with the resampling). ``key`` is the config key (e.g.
    ``data.train``) used in error messages.
    """
    from mitoseg.data.resample import reduce_image, reduce_labels

    if require_label and not vol_cfg.label:
        raise MitosegError(f"config key '{key}.label' is required")
    with open_volume(vol_cfg.image, finite=True) as volume:
        indices = select_slices(vol_cfg.slices, len(volume), f"{key}.slices")
        normalization = compute_normalization(sample_for_stats(volume), norm_cfg, what=vol_cfg.image)
        image = SliceReader(volume, indices, context).read(0, len(indices))
        shape = volume.shape
    label = None
    if vol_cfg.label:
        with open_volume(vol_cfg.label) as label_volume:
            if label_volume.shape != shape:
                raise MitosegError(
                    f"{vol_cfg.label}: label shape {label_volume.shape} differs from image {vol_cfg.image} shape {shape}"
                )
            raw = apply_label_map(label_volume.read_slices(indices), label_map)
        check_label_values(raw, num_classes, ignore_index, vol_cfg.label)
        label = reduce_labels(raw.astype(np.int64), scale, num_classes, ignore_index)
    image = reduce_image(image, scale)
    return VolumeSlices(image=image, label=label, indices=indices, normalization=normalization, source=vol_cfg.image)


@contextmanager
def without_meta_tracking():
    """MONAI transforms on plain tensors while a sample is made: the patch pipelines use no MONAI
    metadata, and MetaTensor bookkeeping costs several times the crop and normalization themselves
    (MONAI's own advice for fast training); the global setting is restored afterwards."""
    previous = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(previous)


def sample_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def seed_transform(transform, rng: np.random.Generator) -> None:
    """Give every random transform of a (flat) MONAI Compose one RandomState drawn from ``rng``.

    MONAI's ``Compose.set_random_state`` builds a new RandomState per child, which
    costs more than the augmentations themselves for small patches; sharing one
    keeps each sample a pure function of its draw at a fraction of the cost. The
    shared RandomState is made once per transform and reseeded afterwards (the same
    stream as a new one with that seed, at 1/70 of the cost of building one).
    """
    seed = int(rng.integers(2**31))
    state = getattr(transform, "_mitoseg_random_state", None)
    if state is not None and all(getattr(child, "R", state) is state for child in transform.transforms
                                 if isinstance(child, Randomizable)):
        state.seed(seed)
        return
    state = np.random.RandomState(seed)
    transform._mitoseg_random_state = state
    for child in transform.transforms:
        if isinstance(child, Randomizable):
            child.set_random_state(state=state)


def consecutive_starts(indices: list[int], depth: int) -> list[int]:
    """Positions ``i`` in ``indices`` where ``indices[i : i + depth]`` are consecutive slice numbers: where a
    3-D patch of ``depth`` slices may start (every position for depth 1)."""
    index = np.asarray(indices, dtype=np.int64)
    if depth == 1:
        return list(range(len(index)))
    ends = np.arange(len(index) - depth + 1)
    return [int(i) for i in ends if index[i + depth - 1] - index[i] == depth - 1]


class PatchDataset(Dataset):
    """Random patches from the slices of one or more volumes, with labels when they have them: 2-D
    (``patch_size`` (y, x)) or 3-D (``patch_size`` (z, y, x), from runs of consecutive selected slices).

    ``index`` selects the random draw, not a fixed patch, so the dataset can be
    read for as many samples as training needs. A patch is drawn from a slice
    (3-D: a first slice) chosen uniformly over all volumes' slices; with labels and
    ``foreground_sampling = p``, a share p of the patches is centred on a random
    foreground pixel (label > 0) of that slice (3-D: of a random slice of the
    patch), the rest are placed uniformly. The crop is normalized with its volume's
    statistics, then ``transform`` (MONAI, random state seeded from the same draw)
    makes the view.
    """

    def __init__(self, sources: VolumeSlices | list[VolumeSlices], transform, patch_size, seed: int, length: int,
                 foreground_sampling: float = 0.0, ignore_index: int | None = None):
        self.sources = [sources] if isinstance(sources, VolumeSlices) else list(sources)
        self.transform = transform
        self.patch_size = tuple(int(s) for s in patch_size)
        self.depth = self.patch_size[0] if len(self.patch_size) == 3 else 1
        self.seed = seed
        self.length = length
        self.with_label = all(src.label is not None for src in self.sources)
        self.foreground_sampling = foreground_sampling if self.with_label else 0.0
        for src in self.sources:
            height, width = src.image.shape[-2:]
            if self.patch_size[-2] > height or self.patch_size[-1] > width:
                raise MitosegError(f"{src.source}: data.patch_size {list(self.patch_size)} is larger than the "
                                   f"image slices ({height}, {width})")
        self._normalize = [src.normalization.transform("image") for src in self.sources]
        # (volume, first slice) of every patch position, so a slice is drawn uniformly across volumes.
        self._slices = [(v, z) for v, src in enumerate(self.sources) for z in consecutive_starts(src.indices,
                                                                                                 self.depth)]
        if not self._slices:
            raise MitosegError(f"data.patch_size {list(self.patch_size)}: no run of {self.depth} consecutive slices "
                               f"in the selected slices of {', '.join(sorted({s.source for s in self.sources}))}; "
                               "a 3-D patch needs that many neighbouring slices")
        self._foreground = None
        if self.foreground_sampling > 0:
            # Flat indices of foreground pixels per slice (int32: a small fraction of the volume).
            self._foreground = {}
            for v, src in enumerate(self.sources):
                fg = src.label > 0
                if ignore_index is not None:
                    fg &= src.label != ignore_index
                for z in range(fg.shape[0]):
                    self._foreground[v, z] = np.flatnonzero(fg[z]).astype(np.int32)

    def __len__(self) -> int:
        return self.length

    def window(self, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(volume, first slice, top, left) of a patch."""
        v, z = self._slices[int(rng.integers(len(self._slices)))]
        height, width = self.sources[v].image.shape[-2:]
        ph, pw = self.patch_size[-2:]
        foreground = None
        if self._foreground is not None:
            centre_slice = z if self.depth == 1 else z + int(rng.integers(self.depth))
            foreground = self._foreground[v, centre_slice]
        if foreground is not None and rng.random() < self.foreground_sampling and foreground.size:
            cy, cx = divmod(int(foreground[rng.integers(foreground.size)]), width)
            top = int(np.clip(cy - ph // 2, 0, height - ph))
            left = int(np.clip(cx - pw // 2, 0, width - pw))
        else:
            top = int(rng.integers(height - ph + 1))
            left = int(rng.integers(width - pw + 1))
        return v, z, top, left

    def crop(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """A normalized patch ``{"image": (C, ph, pw) float32, "label": (1, ph, pw) int64}`` (3-D: (C, pz, ph,
        pw) and (1, pz, ph, pw)): the window drawn by :meth:`window`, cut by MONAI's ``SpatialCropd`` and
        normalized with the volume's statistics by ``NormalizeIntensityd``. C is 1, or 2k + 1 with k
        neighbouring slices on each side (2.5-D)."""
        v, z, top, left = self.window(rng)
        src = self.sources[v]
        ph, pw = self.patch_size[-2:]
        if self.depth == 1 and len(self.patch_size) == 2:
            image = src.image[z]
            sample = {"image": image[None] if image.ndim == 2 else image}  # (channels, y, x)
            if src.label is not None:
                sample["label"] = src.label[z][None]
            start, end = (top, left), (top + ph, left + pw)
        else:
            sample = {"image": src.image[z:z + self.depth][None]}  # (1, z, y, x)
            if src.label is not None:
                sample["label"] = src.label[z:z + self.depth][None]
            start, end = (0, top, left), (self.depth, top + ph, left + pw)
        crop = SpatialCropd(keys=list(sample), roi_start=start, roi_end=end)
        return self._normalize[v](crop(sample))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        with without_meta_tracking():
            return self.make_sample(index)

    def make_sample(self, index: int) -> dict[str, torch.Tensor]:
        rng = sample_rng(self.seed, index)
        sample = self.crop(rng)
        seed_transform(self.transform, rng)
        out = self.transform(sample)
        result = {"image": torch.as_tensor(out["image"], dtype=torch.float32)}
        if "label" in out:
            result["label"] = torch.as_tensor(out["label"], dtype=torch.int64)[0]
        return result


class UnlabeledViewsDataset(PatchDataset):
    """Unlabeled patches as UniMatch's views: a weak view and two strong views, plus CutMix boxes.

    Keys: ``weak``, ``strong1``, ``strong2`` (C, H, W) float32; ``box1``, ``box2``
    (H, W) uint8 (the region to paste from the mixing batch into each strong
    view); ``valid`` (H, W) bool (False where a pixel is padding and must be
    ignored); ``label`` (H, W) int64 when the volume has analysis labels. 3-D
    patches have a (D, H, W) grid instead of (H, W), and boxes in 3-D.
    """

    def __init__(self, sources, weak, strong, patch_size, seed: int, length: int, cutmix_prob: float = 0.5,
                 boxes: CutMixBoxes | None = None):
        super().__init__(sources, weak, patch_size, seed, length, foreground_sampling=0.0)
        self.strong = strong
        self.boxes = boxes or CutMixBoxes("unimatch", cutmix_prob, seed)

    def make_sample(self, index: int) -> dict[str, torch.Tensor]:
        rng = sample_rng(self.seed, index)
        sample = self.crop(rng)
        seed_transform(self.transform, rng)
        weak = self.transform(sample)
        result = {"weak": torch.as_tensor(weak["image"], dtype=torch.float32)}
        for name in ("strong1", "strong2"):
            seed_transform(self.strong, rng)
            result[name] = torch.as_tensor(self.strong({"image": weak["image"].clone()})["image"],
                                           dtype=torch.float32)
        for name in ("box1", "box2"):
            result[name] = torch.from_numpy(self.boxes(rng, index, self.patch_size))
        result["valid"] = torch.ones(self.patch_size, dtype=torch.bool)
        if "label" in weak:
            result["label"] = torch.as_tensor(weak["label"], dtype=torch.int64)[0]
        return result
