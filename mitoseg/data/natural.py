"""Natural-image benchmarks: Pascal VOC 2012 and Cityscapes, as the semi-supervised papers use them.

Layouts under ``data.root``:

- Pascal VOC: ``JPEGImages/*.jpg`` and the preprocessed ``SegmentationClass/*.png``
  (class ids 0-20, 255 = ignore; palette PNGs read as indices).
- Cityscapes: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` and
  ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (train ids 0-18, 255 = ignore);
  where only ``*_gtFine_labelIds.png`` exists (or a list names it), its label ids are
  mapped to the 19 train ids (:data:`CITYSCAPES_LABEL_TO_TRAIN`).

Which images are labeled, unlabeled and validation comes from list files (lines
``IMAGE MASK`` relative to the root): the standard splits ship in ``mitoseg/splits/``
and are chosen with ``data.split``; ``data.labeled_list`` / ``unlabeled_list`` /
``val_list`` name a user's own files.

Training views follow UniMatch (``dataset/semi.py``, ``dataset/transform.py``): the long
side rescaled by a random factor in ``data.scale_range`` (image bilinear, mask nearest),
a random ``data.crop_size`` crop padded with 0 (image) / 255 (mask, or invalid for
unlabeled views), a horizontal flip with p 0.5; strong views add colour jitter
(brightness, contrast, saturation 0.5, hue 0.25) with p 0.8, grayscale with p 0.2,
Gaussian blur (sigma in [0.1, 2]) with p 0.5, and a CutMix box with p
``data.cutmix_prob``; images are normalised with the ImageNet mean and std. As for the
EM patches, every sample is a pure function of ``(seed, index)``: sample ``i`` reads the
``i mod N``-th image of a permutation of the list drawn for epoch ``i // N``, and its
augmentation is drawn from a generator seeded with ``(seed, i)``.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter
from torch.utils.data import Dataset

from mitoseg.config import unlabeled_batch_size
from mitoseg.data.datasets import sample_rng
from mitoseg.data.transforms import CutMixBoxes
from mitoseg.data.train_data import TrainData
from mitoseg.errors import MitosegError

IGNORE = 255
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

CLASS_NAMES = {
    "pascal": ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"],
    "cityscapes": ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                   "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                   "bicycle"],
}

SHIPPED_SPLITS = {
    "pascal": ["92", "183", "366", "732", "1464", "1_16", "1_8", "1_4", "u2pl_1_16", "u2pl_1_8", "u2pl_1_4"],
    "cityscapes": ["1_30", "1_16", "1_8", "1_4", "1_2"],
}

# Cityscapes label id -> train id (cityscapesScripts' labels.py); every other value -> 255.
_CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                         26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_LABEL_TO_TRAIN = np.full(256, IGNORE, dtype=np.uint8)
for _label_id, _train_id in _CITYSCAPES_TRAIN_IDS.items():
    CITYSCAPES_LABEL_TO_TRAIN[_label_id] = _train_id


def class_names(kind: str, num_classes: int) -> list[str]:
    names = CLASS_NAMES.get(kind, [])
    return names if len(names) == num_classes else [str(k) for k in range(num_classes)]


# ------------------------------------------------------------------------ split lists


def splits_dir() -> Path:
    """The shipped split lists (package data ``mitoseg/splits``)."""
    return Path(str(importlib.resources.files("mitoseg") / "splits"))


@dataclass
class SplitLists:
    labeled: Path | None
    unlabeled: Path | None
    val: Path | None


def resolve_lists(data_cfg, need_labeled: bool = True) -> SplitLists:
    """The list files of ``data.split`` (a shipped name or a folder with labeled.txt / unlabeled.txt), overridden
    by ``data.labeled_list`` / ``unlabeled_list`` / ``val_list``. ``need_labeled=False`` (evaluation) accepts a
    config without a labeled list: then ``labeled`` is None."""
    kind = data_cfg.kind
    labeled = unlabeled = None
    val = splits_dir() / kind / "val.txt"
    if data_cfg.split:
        folder = Path(data_cfg.split)
        if data_cfg.split in SHIPPED_SPLITS[kind]:
            folder = splits_dir() / kind / data_cfg.split
        elif not folder.is_dir():
            raise MitosegError(f"config key 'data.split': {data_cfg.split!r} is neither a shipped {kind} split "
                               f"({', '.join(SHIPPED_SPLITS[kind])}) nor a folder with labeled.txt")
        labeled = folder / "labeled.txt"
        if not labeled.is_file():
            raise MitosegError(f"config key 'data.split': {labeled} not found")
        if (folder / "unlabeled.txt").is_file():
            unlabeled = folder / "unlabeled.txt"
        if (folder / "val.txt").is_file():
            val = folder / "val.txt"
    for key, attr in (("labeled_list", "labeled"), ("unlabeled_list", "unlabeled"), ("val_list", "val")):
        value = getattr(data_cfg, key)
        if value:
            if not Path(value).is_file():
                raise MitosegError(f"config key 'data.{key}': file not found: {value}")
            if attr == "labeled":
                labeled = Path(value)
            elif attr == "unlabeled":
                unlabeled = Path(value)
            else:
                val = Path(value)
    if labeled is None and need_labeled:
        raise MitosegError("config key 'data.split' is required for natural images (or data.labeled_list)")
    return SplitLists(labeled=labeled, unlabeled=unlabeled, val=val if val.is_file() else None)


def read_list(path: Path, root: Path, need_mask: bool) -> list[tuple[Path, Path | None]]:
    """Lines ``IMAGE [MASK]`` of a list file, as paths under ``root``."""
    items = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) > 2 or (need_mask and len(parts) < 2):
            raise MitosegError(f"{path}:{number}: expected 'IMAGE MASK', got {line.strip()!r}")
        items.append((root / parts[0], root / parts[1] if len(parts) > 1 else None))
    if not items:
        raise MitosegError(f"{path}: the list is empty")
    return items


def check_natural_paths(cfg) -> None:
    """``data.root`` exists, the list files resolve, and the first entry of each list exists."""
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise MitosegError(f"config key 'data.root': folder not found: {root}")
    lists = resolve_lists(cfg.data)
    for name, path, need_mask in (("labeled", lists.labeled, True), ("unlabeled", lists.unlabeled, False),
                                  ("val", lists.val, True)):
        if path is None:
            continue
        image, mask = read_list(path, root, need_mask)[0]
        if not image.is_file():
            raise MitosegError(f"{name} list {path}: image not found: {image} (is data.root {root} right?)")
        if need_mask:
            resolve_mask(mask)


# ----------------------------------------------------------------------------- reading


def resolve_mask(path: Path) -> tuple[Path, bool]:
    """(file to read, whether its values are Cityscapes label ids to map to train ids)."""
    name = path.name
    if name.endswith("_labelIds.png"):
        return path, True
    if path.is_file():
        return path, False
    if name.endswith("_labelTrainIds.png"):
        fallback = path.with_name(name[: -len("_labelTrainIds.png")] + "_labelIds.png")
        if fallback.is_file():
            return fallback, True
    raise MitosegError(f"mask not found: {path}")


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise MitosegError(f"{path}: cannot read the image ({exc})") from exc


def read_mask(path: Path, num_classes: int) -> Image.Image:
    """A mode 'L' mask of class ids (255 = ignore); Cityscapes label ids are mapped to train ids."""
    file, label_ids = resolve_mask(path)
    try:
        with Image.open(file) as image:
            values = np.array(image)
    except (OSError, ValueError) as exc:
        raise MitosegError(f"{file}: cannot read the mask ({exc})") from exc
    if values.ndim != 2:
        raise MitosegError(f"{file}: a mask must be a single-channel (or palette) PNG, got shape {values.shape}")
    if label_ids:
        values = CITYSCAPES_LABEL_TO_TRAIN[values.astype(np.int64).clip(0, 255)]
    bad = (values >= num_classes) & (values != IGNORE)
    if bad.any():
        raise MitosegError(f"{file}: mask values {np.unique(values[bad])[:5].tolist()} are outside the classes "
                           f"0..{num_classes - 1} or {IGNORE} (data.num_classes = {num_classes})")
    return Image.fromarray(values.astype(np.uint8), mode="L")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32, ImageNet-normalised."""
    array = (np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


# ------------------------------------------------------------------------ augmentation


def random_rescale(image: Image.Image, mask: Image.Image, rng: np.random.Generator, scale_range) -> tuple:
    """UniMatch's ``resize``: the long side becomes an integer in [low * long, high * long]."""
    w, h = image.size
    long_side = int(rng.integers(int(max(h, w) * scale_range[0]), int(max(h, w) * scale_range[1]) + 1))
    long_side = max(long_side, 1)
    if h > w:
        oh, ow = long_side, max(1, int(w * long_side / h + 0.5))
    else:
        ow, oh = long_side, max(1, int(h * long_side / w + 0.5))
    return image.resize((ow, oh), Image.BILINEAR), mask.resize((ow, oh), Image.NEAREST)


def random_crop(image: Image.Image, mask: Image.Image, size: int, rng: np.random.Generator, fill_mask: int = IGNORE):
    """Pad to at least ``size`` (image 0, mask ``fill_mask``) on the right / bottom, then a random square crop.
    Returns the crops and the valid (not padding) mask."""
    w, h = image.size
    pw, ph = max(size - w, 0), max(size - h, 0)
    valid = np.ones((h + ph, w + pw), dtype=bool)
    if pw or ph:
        padded = Image.new("RGB", (w + pw, h + ph), (0, 0, 0))
        padded.paste(image, (0, 0))
        padded_mask = Image.new("L", (w + pw, h + ph), fill_mask)
        padded_mask.paste(mask, (0, 0))
        image, mask = padded, padded_mask
        valid[h:, :] = False
        valid[:, w:] = False
    w, h = image.size
    x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
    box = (x, y, x + size, y + size)
    return image.crop(box), mask.crop(box), valid[y:y + size, x:x + size]


def random_hflip(image, mask, valid, rng: np.random.Generator, p: float = 0.5):
    if rng.random() < p:
        return (image.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT),
                np.ascontiguousarray(valid[:, ::-1]))
    return image, mask, valid


def _adjust_hue(image: Image.Image, factor: float) -> Image.Image:
    """torchvision's PIL hue shift: rotate the HSV hue channel by ``factor`` of a turn."""
    h, s, v = image.convert("HSV").split()
    hue = np.asarray(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        hue = (hue + np.uint8(int(factor * 255) % 256)).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(hue, "L"), s, v)).convert("RGB")


def color_jitter(image: Image.Image, rng: np.random.Generator, brightness=0.5, contrast=0.5, saturation=0.5,
                 hue=0.25) -> Image.Image:
    """torchvision's ColorJitter(0.5, 0.5, 0.5, 0.25) on PIL images: the four adjustments in random order."""
    factors = [rng.uniform(1 - brightness, 1 + brightness), rng.uniform(1 - contrast, 1 + contrast),
               rng.uniform(1 - saturation, 1 + saturation), rng.uniform(-hue, hue)]
    for op in rng.permutation(4):
        if op == 0:
            image = ImageEnhance.Brightness(image).enhance(factors[0])
        elif op == 1:
            image = ImageEnhance.Contrast(image).enhance(factors[1])
        elif op == 2:
            image = ImageEnhance.Color(image).enhance(factors[2])
        else:
            image = _adjust_hue(image, factors[3])
    return image


def strong_view(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """UniMatch's strong view: colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur (p 0.5)."""
    if rng.random() < 0.8:
        image = color_jitter(image, rng)
    if rng.random() < 0.2:
        image = image.convert("L").convert("RGB")
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.1, 2.0))))
    return image


# ---------------------------------------------------------------------------- datasets


class NaturalDataset(Dataset):
    """Training samples from a list; ``index`` selects a draw (epoch permutation + augmentation)."""

    def __init__(self, items, data_cfg, seed: int, length: int, boxes: CutMixBoxes | None = None):
        self.items = list(items)
        self.kind = data_cfg.kind
        self.num_classes = data_cfg.num_classes
        self.crop_size = data_cfg.crop_size
        self.scale_range = tuple(data_cfg.scale_range)
        self.boxes = boxes or CutMixBoxes("unimatch", data_cfg.cutmix_prob, seed)
        self.seed = seed
        self.length = length
        self._permutation: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    def item_index(self, index: int) -> int:
        """Epoch ``index // N`` visits the list in its own seeded permutation."""
        n = len(self.items)
        epoch, position = divmod(index, n)
        if self._permutation is None or self._permutation[0] != epoch:
            self._permutation = (epoch, np.random.default_rng([self.seed, 2**31 + epoch]).permutation(n))
        return int(self._permutation[1][position])

    def load(self, index: int, with_mask: bool) -> tuple[Image.Image, Image.Image]:
        image_path, mask_path = self.items[self.item_index(index)]
        image = read_image(image_path)
        if with_mask and mask_path is not None:
            mask = read_mask(mask_path, self.num_classes)
            if mask.size != image.size:
                raise MitosegError(f"{mask_path}: mask size {mask.size} differs from image {image_path} {image.size}")
        else:
            mask = Image.new("L", image.size, 0)
        return image, mask

    def weak(self, image, mask, rng):
        image, mask = random_rescale(image, mask, rng, self.scale_range)
        image, mask, valid = random_crop(image, mask, self.crop_size, rng)
        return random_hflip(image, mask, valid, rng)


class NaturalLabeledDataset(NaturalDataset):
    """``{"image": (3, S, S) float32, "label": (S, S) int64}``, 255 on ignored and padded pixels."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = sample_rng(self.seed, index)
        image, mask = self.load(index, with_mask=True)
        image, mask, _ = self.weak(image, mask, rng)
        return {"image": to_tensor(image), "label": torch.from_numpy(np.array(mask, dtype=np.int64))}


class NaturalUnlabeledDataset(NaturalDataset):
    """UniMatch's unlabeled views: ``weak``, ``strong1``, ``strong2`` (3, S, S), ``box1``, ``box2`` (S, S)
    uint8 and ``valid`` (S, S) bool (False on padding). The list's masks are never read."""

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = sample_rng(self.seed, index)
        image, mask = self.load(index, with_mask=False)
        image, _, valid = self.weak(image, mask, rng)
        result = {"weak": to_tensor(image)}
        size = self.crop_size
        for v in (1, 2):
            result[f"strong{v}"] = to_tensor(strong_view(image, rng))
            result[f"box{v}"] = torch.from_numpy(self.boxes(rng, index, (size, size)))
        result["valid"] = torch.from_numpy(valid)
        return result


class NaturalEvalDataset(Dataset):
    """Whole validation images: ``(image (3, H, W), label (H, W) int64)``; ``center_crop`` crops both."""

    def __init__(self, items, data_cfg, mode: str):
        self.items = list(items)
        self.num_classes = data_cfg.num_classes
        self.mode = mode
        self.crop_size = data_cfg.crop_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.items[index]
        image, mask = read_image(image_path), read_mask(mask_path, self.num_classes)
        image, label = to_tensor(image), torch.from_numpy(np.array(mask, dtype=np.int64))
        if self.mode == "center_crop":
            h, w = label.shape
            top, left = max(0, (h - self.crop_size) // 2), max(0, (w - self.crop_size) // 2)
            image = image[:, top:top + self.crop_size, left:left + self.crop_size]
            label = label[top:top + self.crop_size, left:left + self.crop_size]
        return image, label


@dataclass
class ImageValidation:
    """The validation images of a natural-image run and the names of their classes (the per-class scores)."""

    images: NaturalEvalDataset
    class_names: list[str]


def eval_mode(data_cfg) -> str:
    return data_cfg.eval_mode or ("sliding_window" if data_cfg.kind == "cityscapes" else "full")


def iterations_per_epoch(cfg, uses_unlabeled: bool, world_size: int = 1) -> int:
    """UniMatch's epoch: one pass over the unlabeled list (semi-supervised) or the labeled list (supervised),
    ``drop_last``, with ``data.batch_size`` per rank."""
    lists = resolve_lists(cfg.data)
    root = Path(cfg.data.root)
    if uses_unlabeled:
        if lists.unlabeled is None:
            raise MitosegError("semi-supervised training needs an unlabeled list (data.split or data.unlabeled_list)")
        n = len(read_list(lists.unlabeled, root, need_mask=False))
        batch = unlabeled_batch_size(cfg.data)
    else:
        n = len(read_list(lists.labeled, root, need_mask=True))
        batch = cfg.data.batch_size
    return max(1, n // (batch * world_size))


def build_natural_data(cfg, uses_unlabeled: bool, length_labeled: int, length_unlabeled: int, log: bool = True):
    """The :class:`~mitoseg.data.train_data.TrainData` of Pascal VOC / Cityscapes: the labeled / unlabeled
    training streams, the inspection samples and the validation images."""
    data = cfg.data
    root = Path(data.root)
    lists = resolve_lists(data)
    labeled = NaturalLabeledDataset(read_list(lists.labeled, root, need_mask=True), data, cfg.seed, length_labeled)
    unlabeled = inspection = None
    if uses_unlabeled:
        if lists.unlabeled is None:
            raise MitosegError(f"method '{cfg.method.name}' needs unlabeled images: data.split "
                               f"{data.split!r} has no unlabeled.txt and data.unlabeled_list is not set")
        items = read_list(lists.unlabeled, root, need_mask=False)
        boxes = CutMixBoxes(cfg.method.cutmix, data.cutmix_prob, cfg.seed + 1,
                            group=unlabeled_batch_size(data))
        unlabeled = NaturalUnlabeledDataset(items, data, cfg.seed + 1, length_unlabeled, boxes)
        views = NaturalUnlabeledDataset(items, data, cfg.seed + 2, cfg.train.inspect_patches)
        inspection = {"image": torch.stack([views[i]["weak"] for i in range(len(views))])}
    validation = None
    if lists.val is not None:
        images = NaturalEvalDataset(read_list(lists.val, root, need_mask=True), data, eval_mode(data))
        validation = ImageValidation(images, class_names(data.kind, data.num_classes))
    return TrainData(labeled=labeled, unlabeled=unlabeled, inspection=inspection, validation=validation)


def build_eval_dataset(cfg, mode: str | None = None) -> NaturalEvalDataset:
    """The validation images of ``cfg`` (``data.val_list``, the split folder's val.txt or the shipped one), for
    evaluating a trained model; ``mode`` defaults to :func:`eval_mode`.

    Every listed image and mask is checked to exist before the first is read, so a wrong ``data.root`` or a
    gap in the data set ends the command at once instead of after hours of evaluation.
    """
    data = cfg.data
    root = Path(data.root)
    if not root.is_dir():
        raise MitosegError(f"config key 'data.root': folder not found: {root}")
    lists = resolve_lists(data, need_labeled=False)
    if lists.val is None:
        raise MitosegError(f"no validation list for {data.kind}: data.split {data.split!r} has no val.txt and "
                           "data.val_list is not set")
    items = read_list(lists.val, root, need_mask=True)
    for image, mask in items:
        if not image.is_file():
            raise MitosegError(f"val list {lists.val}: image not found: {image} (is data.root {root} right?)")
        resolve_mask(mask)
    return NaturalEvalDataset(items, data, mode or eval_mode(data))
