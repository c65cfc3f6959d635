"""Intensity normalization, weak and strong views (MONAI transforms) and CutMix boxes.

Samples are dicts ``{"image": (1, H, W) float32, "label": (1, H, W) int64}``.
Normalization statistics are computed once per *volume* (not per patch), so a
patch and the whole-volume prediction see the same intensity mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import (
    Compose,
    MapTransform,
    EnsureTyped,
    NormalizeIntensity,
    NormalizeIntensityd,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianSmoothd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandomizableTransform,
)

from mitoseg.errors import MitosegError

# At most this many voxels are read to estimate a volume's intensity statistics.
_STATS_VOXELS = 8_000_000


@dataclass(frozen=True)
class Normalization:
    """Maps raw intensities to the network's range: ``(x - offset) / scale``.

    percentile mode: the lower/upper percentiles go to 0 and 1;
    meanstd mode: zero mean, unit standard deviation.
    """

    offset: float
    scale: float

    def transform(self, keys="image") -> NormalizeIntensityd:
        """The mapping as a MONAI dict transform (the patch pipelines' first step after the crop)."""
        return NormalizeIntensityd(keys=keys, subtrahend=self.offset, divisor=self.scale, dtype=np.float32)

    def __call__(self, array: np.ndarray) -> np.ndarray:
        """The mapping of an array (a slab of slices to predict), as float32 numpy."""
        normalize = NormalizeIntensity(subtrahend=self.offset, divisor=self.scale, dtype=np.float32)
        return np.asarray(normalize(array), dtype=np.float32)


def sample_for_stats(volume) -> np.ndarray:
    """A strided subset of slices of a :class:`~mitoseg.data.readers.Volume` or array."""
    z, y, x = volume.shape
    step = max(1, int(np.ceil(z * y * x / _STATS_VOXELS)))
    indices = list(range(0, z, step))
    if isinstance(volume, np.ndarray):
        return volume[indices]
    return volume.read_slices(indices)


def compute_normalization(voxels: np.ndarray, cfg, what: str = "volume") -> Normalization:
    """Statistics of ``voxels`` (any shape) under ``cfg`` (:class:`NormalizeConfig`)."""
    values = np.asarray(voxels, dtype=np.float64).ravel()
    # Percentiles step over a few +/-inf voxels; the network would not (one inf makes every loss NaN).
    if not np.isfinite(values).all():
        raise MitosegError(f"{what}: intensities are not finite (NaN or inf values)")
    if cfg.mode == "percentile":
        low, high = np.percentile(values, [cfg.lower, cfg.upper])
        offset, scale = float(low), float(high - low)
    else:
        offset, scale = float(values.mean()), float(values.std())
    if not np.isfinite(offset) or not np.isfinite(scale):
        raise MitosegError(f"{what}: intensities are not finite (NaN or inf values)")
    if scale <= 0:
        # A constant volume: keep it finite rather than dividing by zero.
        scale = 1.0
    return Normalization(offset=offset, scale=scale)


class RandSliceArtefactsd(RandomizableTransform, MapTransform):
    """Sectioning artefacts of serial EM, for inputs that see several slices: 2.5-D stacks (C = 2k + 1
    slices as channels of a (C, H, W) image) and 3-D patches ((1, D, H, W)).

    - a missing slice (probability ``missing_prob``): one slice other than the labeled centre slice of a
      2.5-D stack, or any z plane of a 3-D patch, becomes 0 (the normalized intensity of a blank section);
    - a misalignment (probability ``misalign_prob``): one neighbouring slice of a 2.5-D stack, or every z
      plane from a random one on of a 3-D patch (image and label alike), is shifted by up to
      ``misalign_max`` pixels in y and x, the uncovered border repeating the edge.

    Plain 2-D images (one channel) are returned unchanged.
    """

    def __init__(self, keys, missing_prob: float, misalign_prob: float, misalign_max: int, spatial_dims: int = 2):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        self.missing_prob, self.misalign_prob, self.misalign_max = missing_prob, misalign_prob, misalign_max
        self.spatial_dims = spatial_dims

    @staticmethod
    def _shift(plane: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
        """``plane`` (..., H, W) moved by (dy, dx) pixels, the uncovered border repeating the edge."""
        h, w = plane.shape[-2:]
        y = (torch.arange(h) - dy).clamp_(0, h - 1)
        x = (torch.arange(w) - dx).clamp_(0, w - 1)
        return plane[..., y[:, None], x[None, :]]

    def __call__(self, data):
        d = dict(data)
        image = torch.as_tensor(d["image"])
        if self.spatial_dims == 3:
            planes, centre = image.shape[1], None
        else:
            planes, centre = image.shape[0], image.shape[0] // 2
        if planes < 2:
            return d
        candidates = [i for i in range(planes) if i != centre]
        missing = self.R.random() < self.missing_prob
        missing_plane = candidates[self.R.randint(len(candidates))]
        misalign = self.R.random() < self.misalign_prob
        moved_plane = candidates[self.R.randint(len(candidates))]
        dy, dx = (int(v) for v in self.R.randint(-self.misalign_max, self.misalign_max + 1, size=2))
        if misalign and (dy or dx):
            image = image.clone()
            if self.spatial_dims == 3:
                image[:, moved_plane:] = self._shift(image[:, moved_plane:], dy, dx)
                if "label" in d:
                    label = torch.as_tensor(d["label"]).clone()
                    label[:, moved_plane:] = self._shift(label[:, moved_plane:], dy, dx)
                    d["label"] = label
            else:
                image[moved_plane] = self._shift(image[moved_plane], dy, dx)
        if missing:
            image = image.clone()
            if self.spatial_dims == 3:
                image[:, missing_plane] = 0
            else:
                image[missing_plane] = 0
        d["image"] = image
        return d


def geometric_transforms(aug, keys, spatial_dims: int = 2):
    """Flips (in 3-D also in z), quarter turns in y-x and elastic deformation (2-D): applied identically
    to image and label (the label resampled by nearest neighbour)."""
    transforms = []
    if aug.flip:
        transforms += [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(spatial_dims)]
    if aug.rot90:
        transforms.append(RandRotate90d(keys=keys, prob=0.75, max_k=3,
                                        spatial_axes=(spatial_dims - 2, spatial_dims - 1)))
    if aug.elastic_prob > 0:
        modes = ["bilinear" if key == "image" else "nearest" for key in keys]
        transforms.append(Rand2DElasticd(keys=keys, spacing=aug.elastic_spacing,
                                         magnitude_range=tuple(aug.elastic_magnitude), prob=aug.elastic_prob,
                                         mode=modes, padding_mode="reflection"))
    return transforms


def intensity_transforms(aug):
    """Mild intensity scale/shift and noise (weak view: labels stay valid)."""
    transforms = []
    if aug.intensity_scale > 0:
        transforms.append(RandScaleIntensityd(keys="image", factors=aug.intensity_scale, prob=aug.prob))
    if aug.intensity_shift > 0:
        transforms.append(RandShiftIntensityd(keys="image", offsets=aug.intensity_shift, prob=aug.prob))
    if aug.gamma != [1.0, 1.0]:
        transforms.append(RandAdjustContrastd(keys="image", gamma=tuple(aug.gamma), prob=aug.prob))
    if aug.noise_std > 0:
        transforms.append(RandGaussianNoised(keys="image", prob=aug.prob, std=aug.noise_std, sample_std=True))
    return transforms


def weak_transform(data_cfg, with_label: bool, intensity: bool = True) -> Compose:
    """Weak view of a normalized, cropped patch: flips/rot90 and (for the labeled stream)
    mild intensity jitter, as plain tensors."""
    keys = ["image", "label"] if with_label else ["image"]
    aug, dims = data_cfg.augment, len(data_cfg.patch_size)
    artefacts = []
    if aug.missing_slice_prob > 0 or aug.misalign_prob > 0:
        artefacts.append(RandSliceArtefactsd(keys, aug.missing_slice_prob, aug.misalign_prob, aug.misalign_max, dims))
    return Compose(
        [
            *geometric_transforms(aug, keys, dims),
            *artefacts,
            *(intensity_transforms(aug) if intensity else []),
            EnsureTyped(keys=keys, track_meta=False),
        ]
    )


def strong_transform(strong_cfg, spatial_dims: int = 2) -> Compose:
    """Photometric perturbation of a weak view for EM (image only; geometry unchanged):
    brightness / contrast / gamma jitter, Gaussian blur and noise."""
    transforms = []
    if strong_cfg.brightness > 0:
        transforms.append(RandShiftIntensityd(keys="image", offsets=strong_cfg.brightness, prob=strong_cfg.prob))
    if strong_cfg.contrast > 0:
        transforms.append(RandScaleIntensityd(keys="image", factors=strong_cfg.contrast, prob=strong_cfg.prob))
    if strong_cfg.gamma != [1.0, 1.0]:
        transforms.append(RandAdjustContrastd(keys="image", gamma=tuple(strong_cfg.gamma), prob=strong_cfg.prob))
    if strong_cfg.blur_sigma[1] > 0:
        sigma = tuple(strong_cfg.blur_sigma)
        sigmas = {"sigma_x": sigma, "sigma_y": sigma, **({"sigma_z": sigma} if spatial_dims == 3 else {})}
        transforms.append(RandGaussianSmoothd(keys="image", prob=strong_cfg.blur_prob, **sigmas))
    if strong_cfg.noise_std > 0:
        transforms.append(RandGaussianNoised(keys="image", prob=strong_cfg.prob, std=strong_cfg.noise_std,
                                             sample_std=True))
    return Compose([*transforms, EnsureTyped(keys="image", track_meta=False)])


def cutmix_box(rng: np.random.Generator, shape, prob: float = 0.5, area=(0.02, 0.4),
               aspect=(0.3, 1 / 0.3)) -> np.ndarray:
    """A uint8 mask of ``shape`` ((height, width), or (depth, height, width) for 3-D patches) with one
    random box of ones, with probability ``prob`` (else all zeros). Box area (share of the patch) and
    y-x aspect ratio as in UniMatch; a 3-D box spans the cube root of its share in z and the rest in y-x."""
    shape = tuple(int(n) for n in shape)
    mask = np.zeros(shape, dtype=np.uint8)
    if rng.random() >= prob:
        return mask
    height, width = shape[-2:]
    share = rng.uniform(*area)
    z0, z1 = 0, 1
    if len(shape) == 3:
        depth = shape[0]
        box_d = min(depth, max(1, int(round(depth * share ** (1 / 3)))))
        share = share * depth / box_d  # what the y-x face must cover for the box's share of the volume
        z0 = int(rng.integers(0, depth - box_d + 1))
        z1 = z0 + box_d
    size = min(share, 1.0) * height * width
    while True:
        ratio = rng.uniform(*aspect)
        box_w, box_h = int(np.sqrt(size / ratio)), int(np.sqrt(size * ratio))
        x, y = int(rng.integers(0, width + 1)), int(rng.integers(0, height + 1))
        if 0 < box_w and 0 < box_h and x + box_w <= width and y + box_h <= height:
            break
    mask.reshape(-1, height, width)[z0:z1, y:y + box_h, x:x + box_w] = 1
    return mask


def half_area_box(rng: np.random.Generator, shape) -> np.ndarray:
    """DDFP's CutMix region (its dataset/transform.py, generate_cutout_mask): a box of half the y-x area,
    width drawn from W/2 + 1 .. W - 1, height round(H W / 2 / width), at a random place; in 3-D it spans
    every slice. A uint8 mask of ``shape``."""
    shape = tuple(int(n) for n in shape)
    height, width = shape[-2:]
    box_w = int(rng.integers(int(width / 2 + 1), width)) if width > 2 else width
    box_h = min(height, int(round(height * width / 2 / box_w)))
    x, y = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
    mask = np.zeros(shape, dtype=np.uint8)
    mask[..., y:y + box_h, x:x + box_w] = 1
    return mask


class CutMixBoxes:
    """The CutMix regions of the unlabeled samples (``method.cutmix``):

    - ``unimatch``: each strong view of each sample, with probability ``prob``, a box of 2-40 % of the patch
      (:func:`cutmix_box`), pasted from the mixing batch;
    - ``ddfp``: with probability ``prob`` for a whole batch (one draw per ``group`` consecutive samples, the
      batch of one iteration on one process), every sample a box of half the area (:func:`half_area_box`),
      pasted from the next sample of the same batch (DDFP's train_ddfp_pascal.py).
    """

    def __init__(self, mode: str, prob: float, seed: int, group: int = 1):
        self.mode, self.prob, self.seed, self.group = mode, prob, seed, max(1, group)

    def __call__(self, rng: np.random.Generator, index: int, shape) -> np.ndarray:
        if self.mode == "unimatch":
            return cutmix_box(rng, shape, self.prob)
        batch_draw = np.random.default_rng([self.seed, 2**31 + index // self.group]).random()
        box = half_area_box(rng, shape)  # drawn either way, so the sample's other draws do not depend on it
        return box if batch_draw < self.prob else np.zeros_like(box)
