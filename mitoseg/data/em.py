"""EM volumes as training data: the labeled slices as patches, the unlabeled slices as weak / strong views,
a fixed set of inspection patches, the validation slices, each volume brought to the model's pixel size
(``data.pixel_size``). The factory of :func:`mitoseg.data.train_data.build_train_data` for ``data.kind: em``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mitoseg.config import VolumeConfig, loss_ignore_index, unlabeled_batch_size
from mitoseg.data.datasets import PatchDataset, UnlabeledViewsDataset, VolumeSlices, load_volume_slices
from mitoseg.data.readers import open_volume, select_slices
from mitoseg.data.resample import parse_pixel_size, volume_pixel_nm
from mitoseg.data.transforms import CutMixBoxes, strong_transform, weak_transform
from mitoseg.data.train_data import TrainData
from mitoseg.errors import MitosegError


@dataclass
class VolumeValidation:
    """Validation slices kept at their own grid (validation scores the native labels), and the factor the
    predictor resamples them by to the model's pixel size and back."""

    slices: VolumeSlices
    scale: float = 1.0


def check_test_volume(test: VolumeConfig) -> None:
    """``data.test`` is read only when training ends: its shapes and slices are checked at the start, so
    that a mistake there does not surface hours later."""
    with open_volume(test.image) as image, open_volume(test.label) as label:
        if image.shape != label.shape:
            raise MitosegError(f"{test.label}: label shape {label.shape} differs from image {test.image} shape "
                               f"{image.shape}")
        select_slices(test.slices, len(image), "data.test.slices")


class PixelSizes:
    """The factor each data entry's volume is resampled by for ``data.pixel_size`` (1.0 without one: no metadata
    is read), and the model's working pixel size in nm, which the training volume decides (its pixel size times
    a factor ``"Nx"``; stored in checkpoints so predict rescales other volumes)."""

    def __init__(self, cfg, log: bool):
        self.cfg = cfg
        self.pixel = parse_pixel_size(cfg.data.pixel_size)
        self.log = log
        self.model_nm: float | None = None

    def scale(self, entry: VolumeConfig, key: str, record: bool = False) -> float:
        if self.pixel.native:
            return 1.0
        volume_nm = volume_pixel_nm(entry.image, entry.voxel_size)
        scale = self.pixel.scale_for(volume_nm, f"{key}.image {entry.image}",
                                     f"{key}.voxel_size: [z, y, x] in nm, or data.pixel_size to a factor such as '2x'")
        if record:
            pixel = self.pixel
            self.model_nm = pixel.nm if pixel.nm is not None else \
                (pixel.factor * volume_nm if volume_nm is not None else None)
            if self.log:
                seen = f"{volume_nm:g} nm -> {volume_nm * scale:g} nm" if volume_nm is not None else "its own"
                print(f"data.pixel_size {self.cfg.data.pixel_size}: {key} resampled {seen} per pixel (factor "
                      f"{scale:.2f})", flush=True)
        return scale


def unlabeled_sources(cfg, train_slices: VolumeSlices, sizes: PixelSizes) -> list[VolumeSlices]:
    """``data.unlabeled``, or by default the training slices not selected as labeled."""
    k, norm = cfg.data.num_classes, cfg.data.normalize
    if cfg.data.unlabeled is None:
        with open_volume(cfg.data.train.image) as volume:
            rest = sorted(set(range(len(volume))) - set(train_slices.indices))
        if not rest:
            raise MitosegError(f"method '{cfg.method.name}' needs unlabeled slices, but data.train.slices "
                               "selects every slice of data.train.image; set data.train.slices or data.unlabeled")
        entries = [VolumeConfig(image=cfg.data.train.image, slices=rest, voxel_size=cfg.data.train.voxel_size)]
    else:
        # An entry without an image means the training volume.
        entries = [VolumeConfig(image=v.image or cfg.data.train.image, label=v.label, slices=v.slices,
                                voxel_size=v.voxel_size if v.image else v.voxel_size or cfg.data.train.voxel_size)
                   for v in cfg.data.unlabeled]
    sources = []
    for i, entry in enumerate(entries):
        key = f"data.unlabeled[{i}]" if cfg.data.unlabeled is not None else "data.train"
        sources.append(load_volume_slices(entry, f"data.unlabeled[{i}]", k, norm, require_label=False,
                                          ignore_index=loss_ignore_index(cfg.train), label_map=cfg.data.label_map,
                                          context=cfg.data.context_slices, scale=sizes.scale(entry, key)))
    return sources


def inspection_patches(cfg, sources: list[VolumeSlices]) -> dict[str, torch.Tensor]:
    """A fixed set of unlabeled patches (no augmentation) for the inspection files."""
    from monai.transforms import Compose, EnsureTyped

    with_label = all(src.label is not None for src in sources)
    keys = ["image", "label"] if with_label else ["image"]
    dataset = PatchDataset(sources, Compose([EnsureTyped(keys=keys, track_meta=False)]), cfg.data.patch_size,
                           seed=cfg.seed + 2, length=cfg.train.inspect_patches)
    samples = [dataset[i] for i in range(len(dataset))]
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def build_em_data(cfg, uses_unlabeled: bool, labeled_length: int, unlabeled_length: int, log: bool = True):
    """The :class:`~mitoseg.data.train_data.TrainData` of EM volumes: ``labeled_length`` labeled patches and
    ``unlabeled_length`` unlabeled samples (``uses_unlabeled``), each a pure function of ``(seed, index)``."""
    num_classes, ignore_index = cfg.data.num_classes, loss_ignore_index(cfg.train)
    context = cfg.data.context_slices
    sizes = PixelSizes(cfg, log)
    train_slices = load_volume_slices(cfg.data.train, "data.train", num_classes, cfg.data.normalize,
                                      require_label=True, ignore_index=ignore_index, label_map=cfg.data.label_map,
                                      context=context, scale=sizes.scale(cfg.data.train, "data.train", record=True))
    validation = None
    if cfg.data.val is not None:
        scale = sizes.scale(cfg.data.val, "data.val")
        validation = VolumeValidation(load_volume_slices(cfg.data.val, "data.val", num_classes, cfg.data.normalize,
                                                         require_label=True, ignore_index=ignore_index,
                                                         label_map=cfg.data.label_map, context=context), scale)
    if cfg.data.test is not None:
        check_test_volume(cfg.data.test)
        sizes.scale(cfg.data.test, "data.test")  # an unknown pixel size fails now, not after training
    labeled = PatchDataset(train_slices, weak_transform(cfg.data, with_label=True), cfg.data.patch_size,
                           seed=cfg.seed, length=labeled_length, foreground_sampling=cfg.data.foreground_sampling,
                           ignore_index=ignore_index)
    unlabeled = inspection = None
    if uses_unlabeled:
        sources = unlabeled_sources(cfg, train_slices, sizes)
        with_label = all(src.label is not None for src in sources)
        group = unlabeled_batch_size(cfg.data)
        unlabeled = UnlabeledViewsDataset(
            sources,
            weak_transform(cfg.data, with_label=with_label, intensity=False),
            strong_transform(cfg.data.strong, len(cfg.data.patch_size)),
            cfg.data.patch_size,
            seed=cfg.seed + 1,  # a stream of its own, independent of the labeled one
            length=unlabeled_length,
            boxes=CutMixBoxes(cfg.method.cutmix, cfg.data.cutmix_prob, cfg.seed + 1, group=group),
        )
        inspection = inspection_patches(cfg, sources)
    return TrainData(labeled=labeled, unlabeled=unlabeled, inspection=inspection, validation=validation,
                     pixel_size_nm=sizes.model_nm)
