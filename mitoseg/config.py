"""Typed, validated configuration.

A YAML file is read into nested dataclasses (:class:`Config`). Every key is
checked: an unknown key names the closest valid one, a wrong type names the key
and the expected type. ``--set a.b=value`` overrides are applied to the raw
mapping before validation, so they are checked exactly like the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from mitoseg.errors import MitosegError

# ---------------------------------------------------------------------- YAML loading


class _ConfigLoader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers: ``slices: 40:45`` must stay the string "40:45"
    (PyYAML would read it as the integer 2445)."""


_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


class DuplicateKey(yaml.YAMLError):
    """A mapping that names a key twice: YAML would silently keep the last value."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            if key in seen:
                raise DuplicateKey(f"key '{key}' appears twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        except TypeError:  # an unhashable key: the constructor below reports it
            continue
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_ConfigLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                              lambda loader, node: _construct_mapping(loader, node))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_ConfigLoader)


# --------------------------------------------------------------------------- schema

@dataclass(frozen=True)
class _Range:
    """An interval of allowed values; ``high=None``: no upper bound."""

    low: float
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"greater than {self.low}" if self.low_open else f"at least {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


_AT_LEAST_0 = _Range(0)
_AT_LEAST_1 = _Range(1)
_POSITIVE = _Range(0, low_open=True)
_PROBABILITY = _Range(0, 1)
_UNIT = _Range(0, 1, high_open=True)  # decays, momenta, dropout, overlap: 1 would freeze, drop or repeat everything


def option(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None, allowed: _Range | None = None,
           items_at_least: int | None = None, note: str | None = None) -> Any:
    """A config key: its default (or ``factory`` for a mutable one), its one-line documentation (the reference in
    docs/configuration.md is generated from it: ``mitoseg configs keys``), the values a number may take
    (``allowed``; a list: ``items_at_least`` for each item) and ``note``, a default that another key changes.
    The one place each key is described."""
    metadata = {"doc": doc, "allowed": allowed, "items_at_least": items_at_least, "note": note}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


SliceSelection = Union[int, str, list]  # see mitoseg.data.readers.select_slices


@dataclass
class VolumeConfig:
    """An image volume, its optional label volume and the slices to use."""

    image: str = option(
        "",
        "the image volume: a TIFF stack, `FILE.h5:/DATASET`, a Zarr / OME-Zarr store or a folder of slices ([Data "
        "formats](data.md))",
    )
    label: Optional[str] = option(
        None,
        "its label volume (same shape); `data.unlabeled` entries: read for analysis only, never trained on",
    )
    slices: Optional[SliceSelection] = option(
        None,
        "which slices to use (selection syntax: [Data formats](data.md)); `null`: every slice",
    )
    voxel_size: Optional[list[float]] = option(
        None,
        "`[z, y, x]` nm per voxel of a `data.train` / `val` / `test` / `unlabeled` entry's volume: overrides or "
        "supplies what its file stores (TIFF ImageJ, HDF5 `element_size_um`, OME-Zarr scales)",
    )


@dataclass
class NormalizeConfig:
    mode: Literal["percentile", "meanstd"] = option(
        "percentile",
        "per-volume intensity normalization: `percentile` (these percentiles of a strided subsample map to 0 and 1) "
        "or `meanstd` (zero mean, unit variance)",
    )
    lower: float = option(1.0, "`percentile`: the percentile that maps to 0", allowed=_Range(0, 100))
    upper: float = option(99.0, "`percentile`: the percentile that maps to 1", allowed=_Range(0, 100))


@dataclass
class AugmentConfig:
    """Weak (label-preserving) augmentations of the labeled stream."""

    flip: bool = option(True, "weak view: random flips in y and x (3-D: and z)")
    rot90: bool = option(True, "weak view: random quarter turns in y-x; needs a square `data.patch_size` in y-x")
    intensity_scale: float = option(0.1, "weak view: image * (1 + U(-s, s)), with probability `prob`", allowed=_UNIT)
    intensity_shift: float = option(0.1, "weak view: image + U(-s, s), with probability `prob`", allowed=_AT_LEAST_0)
    noise_std: float = option(
        0.02,
        "weak view: additive Gaussian noise, its std drawn in [0, noise_std], with probability `prob`",
        allowed=_AT_LEAST_0,
    )
    prob: float = option(0.5, "probability of each intensity augmentation of the weak view", allowed=_PROBABILITY)
    gamma: list[float] = option(
        factory=lambda: [1.0, 1.0],
        doc="contrast gamma range of the labeled stream, with `prob` (`[1, 1]`: off)",
    )
    elastic_prob: float = option(
        0.0,
        "elastic deformation (MONAI `Rand2DElasticd`, 2-D only) with this probability; image bilinear, label nearest",
        allowed=_PROBABILITY,
    )
    elastic_spacing: int = option(32, "elastic deformation: control points every this many pixels", allowed=_Range(4))
    elastic_magnitude: list[float] = option(
        factory=lambda: [1.0, 3.0],
        doc="elastic deformation: the range of the control points' displacement, in pixels",
    )
    missing_slice_prob: float = option(
        0.0,
        "sectioning artefact for inputs with several slices (2.5-D or 3-D): a blank slice (never the labeled centre "
        "slice of a 2.5-D stack), with this probability",
        allowed=_PROBABILITY,
    )
    misalign_prob: float = option(
        0.0,
        "sectioning artefact for inputs with several slices: a slice (3-D: the rest of the patch, label included) "
        "shifted in y-x, with this probability",
        allowed=_PROBABILITY,
    )
    misalign_max: int = option(8, "the largest shift of a misaligned slice, in pixels", allowed=_AT_LEAST_0)


@dataclass
class StrongConfig:
    """Photometric perturbations of the strong views (on top of the weak view)."""

    brightness: float = option(0.2, "strong views: image + U(-b, b), with probability `prob`", allowed=_AT_LEAST_0)
    contrast: float = option(0.2, "strong views: image * (1 + U(-c, c)), with probability `prob`", allowed=_UNIT)
    gamma: list[float] = option(
        factory=lambda: [0.7, 1.5],
        doc="strong views: contrast gamma range, with probability `prob`",
    )
    blur_sigma: list[float] = option(
        factory=lambda: [0.1, 1.5],
        doc="strong views: Gaussian blur sigma range, with probability `blur_prob`",
    )
    blur_prob: float = option(0.5, "strong views: probability of the blur", allowed=_PROBABILITY)
    noise_std: float = option(
        0.05,
        "strong views: additive Gaussian noise std, with probability `prob`",
        allowed=_AT_LEAST_0,
    )
    prob: float = option(
        0.8,
        "strong views: probability of each of brightness, contrast, gamma and noise",
        allowed=_PROBABILITY,
    )


@dataclass
class DataConfig:
    kind: Literal["em", "pascal", "cityscapes"] = option(
        "em",
        "`em` (volumes) or the natural-image benchmarks `pascal`, `cityscapes` (see [Pascal VOC and "
        "Cityscapes](datasets.md#pascal-voc-and-cityscapes))",
    )
    root: Optional[str] = option(None, "natural images: the data set's root folder")
    split: Optional[str] = option(
        None,
        "natural images: a shipped split (`92`, `183`, `366`, `732`, `1464`, `1_16`, `1_8`, `1_4`, `u2pl_1_16`, "
        "`u2pl_1_8`, `u2pl_1_4` for Pascal; `1_30`, `1_16`, `1_8`, `1_4`, `1_2` for Cityscapes) or a folder with "
        "`labeled.txt` (+ `unlabeled.txt`, `val.txt`)",
    )
    labeled_list: Optional[str] = option(
        None,
        "natural images: your own list of labeled images (lines `IMAGE MASK` relative to `data.root`); overrides "
        "`data.split`",
    )
    unlabeled_list: Optional[str] = option(
        None,
        "natural images: your own list of unlabeled images (lines `IMAGE`, relative to `data.root`); overrides "
        "`data.split`",
    )
    val_list: Optional[str] = option(
        None,
        "natural images: your own validation list (lines `IMAGE MASK`); default: the split folder's or the shipped "
        "`val.txt`",
    )
    crop_size: int = option(
        321,
        "natural images: square training crop (Pascal 321 or 513, Cityscapes 801); also the sliding window",
        allowed=_Range(8),
    )
    scale_range: list[float] = option(factory=lambda: [0.5, 2.0], doc="natural images: random rescale of the long side")
    eval_mode: Optional[Literal["full", "center_crop", "sliding_window"]] = option(
        None,
        "natural images: `full`, `center_crop` (a `crop_size` centre crop) or `sliding_window` (`crop_size` windows, "
        "`inference.overlap` / `.blend`); default `full` for Pascal, `sliding_window` for Cityscapes",
    )
    train: VolumeConfig = option(
        factory=VolumeConfig,
        doc="the training volume: `{image, label, slices, voxel_size}`; `slices` are the labeled ones",
    )
    val: Optional[VolumeConfig] = option(
        None,
        "`{image, label, slices}` for validation; without it `best.pt` is the final model",
    )
    test: Optional[VolumeConfig] = option(
        None,
        "`{image, label, slices}`: an independent volume scored with `best.pt` when training ends (the run's "
        "inference settings: TTA, post-processing), into `summary.json` (`test`), `metrics.jsonl` (`split: test`) and"
        " the final table; `mitoseg evaluate --checkpoint RUN/best.pt` gives the same numbers",
    )
    unlabeled: Optional[list[VolumeConfig]] = option(
        None,
        "list of `{image, label, slices}` for the semi-supervised methods; default: the training slices not in "
        "`data.train.slices`. `label` is read for analysis only (never trained on); an entry without `image` means "
        "the training volume",
    )
    unlabeled_batch_size: Optional[int] = option(
        None,
        "unlabeled patches per iteration (plus as many CutMix partners); default `data.batch_size`",
        allowed=_AT_LEAST_1,
    )
    strong: StrongConfig = option(
        factory=StrongConfig,
        doc="photometric perturbations of the strong views (`data.strong.*`)",
    )
    cutmix_prob: float = option(0.5, "probability of a CutMix box in each strong view", allowed=_PROBABILITY)
    num_classes: int = option(2, "classes including background", allowed=_Range(2))
    label_map: Optional[dict[int, int]] = option(
        None,
        "raw label value -> class, e.g. `{255: 1}` for Lucchi's 0/255 masks",
    )
    patch_size: list[int] = option(
        factory=lambda: [128, 128],
        doc="training patch (y, x), or (z, y, x) for `model.spatial_dims: 3`; multiples of the product of "
            "`model.strides`",
    )
    pixel_size: Optional[Union[float, str]] = option(
        None,
        "the model's working in-plane (y, x) pixel size: nm per pixel (e.g. `10` for Lucchi's 5 nm volume: four times"
        " the context per window for the same FLOPs), or a factor of each volume's own pixel size as a string "
        "(`\"2x\"`, for files that store none); `null`: the volumes' own grid, nothing resampled. Training slices are "
        "resampled once when read (image anti-aliased, labels by their classes' resampled indicators); validation, "
        "`data.test`, `predict`, `evaluate --checkpoint` and napari resample each slab to it, predict, and bring the "
        "probabilities back before the argmax, so scores and outputs are on the volume's grid. In nm it needs each "
        "volume's pixel size (its metadata or `voxel_size`); the checkpoint records it (`pixel_size_nm`), so "
        "`predict` rescales an input of another pixel size (its metadata or `--voxel-size`; `evaluate --pixel-size`),"
        " saying so on stderr. z is never resampled. `mitoseg init` writes `10` for volumes finer than 7.5 nm",
    )
    context_slices: int = option(
        0,
        "2.5-D input: each slice comes with this many neighbouring slices on each side of the volume as extra "
        "channels (reflected at the volume's ends), in training, views, CutMix, validation, `predict` and napari; the"
        " network reads `model.in_channels * (2k + 1)` channels",
        allowed=_AT_LEAST_0,
    )
    batch_size: int = option(8, "patches per iteration", allowed=_AT_LEAST_1)
    foreground_sampling: float = option(0.5, "share of patches centred on a foreground pixel", allowed=_PROBABILITY)
    normalize: NormalizeConfig = option(
        factory=NormalizeConfig,
        doc="per-volume intensity normalization (`data.normalize.*`)",
    )
    augment: AugmentConfig = option(
        factory=AugmentConfig,
        doc="weak augmentations of the labeled stream (`data.augment.*`)",
    )
    num_workers: int = option(0, "DataLoader worker processes", allowed=_AT_LEAST_0)


@dataclass
class ModelConfig:
    name: Literal["unet", "wide_unet", "deeplabv3plus"] = option(
        "unet",
        "network (registry name): `unet` (MONAI's residual U-Net, 2-D or 3-D), `wide_unet` (2-D, for the CPU: "
        "`mitoseg/networks/wide_unet.py`), `deeplabv3plus`",
    )
    spatial_dims: Literal[2, 3] = option(
        2,
        "`unet`: 2 (slices) or 3 (a 3-D U-Net on (z, y, x) patches, drawn from runs of consecutive selected slices; "
        "every method, per-voxel statistics, 3-D CutMix boxes, 3-D sliding windows slab by slab with a halo of half a"
        " window)",
    )
    in_channels: int = option(1, "image channels (3 for natural images)", allowed=_AT_LEAST_1)
    channels: list[int] = option(factory=lambda: [16, 32, 64, 128], doc="U-Net widths, one per level", items_at_least=1)
    strides: list[int] = option(
        factory=lambda: [2, 2, 2],
        doc="U-Net down-sampling between levels (`wide_unet`: all 2); `data.patch_size` and `inference.roi_size` are "
            "multiples of their product (times `model.stem` for `wide_unet`)",
        items_at_least=1,
    )
    num_res_units: int = option(
        2,
        "residual units per U-Net block (`wide_unet`: residual basic blocks per encoder level)",
        allowed=_AT_LEAST_0,
    )
    norm: Literal["batch", "instance"] = option("batch", "`batch` or `instance`")
    feature_channels: int = option(
        32,
        "channels of the last decoder feature map (`features(x)`; `deeplabv3plus` with `model.decoder: u2pl`: 48 + "
        "the ASPP head's, more than 48)",
        allowed=_AT_LEAST_1,
    )
    head_channels: int = option(32, "channels of the head's conv block", allowed=_AT_LEAST_1)
    dropout: float = option(0.0, "dropout inside the U-Net", allowed=_UNIT)
    stem: int = option(
        2,
        "`wide_unet`: each stem x stem block of pixels becomes channels before the first convolution (space-to-depth:"
        " nothing is lost), so every convolution runs at 1/stem of the resolution or less; the head runs at 1/stem "
        "and its logits are resized to the input",
        allowed=_Range(1, 8),
    )
    backbone: Literal["resnet50", "resnet101"] = option("resnet101", "`deeplabv3plus`: `resnet50` or `resnet101`")
    output_stride: Literal[8, 16] = option(
        16,
        "`deeplabv3plus`: 16 (dilation in the last ResNet stage) or 8 (last two)",
    )
    decoder: Literal["unimatch", "u2pl"] = option(
        "unimatch",
        "`deeplabv3plus`: `unimatch` (UniMatch's decoder: `features(x)` = the first 3x3 fuse conv, `feature_channels`"
        " 256; head = the second fuse conv + classifier) or `u2pl` (U2PL's / DDFP's `dec_deeplabv3_plus`: ASPP of "
        "five 256-channel branches concatenated, a 3x3 conv 256 + Dropout2d(0.1), and the 48-channel low-level "
        "projection; `features(x)` = their concatenation, `feature_channels` 48 + 256 = 304, where DDFP perturbs; "
        "head = two 3x3 conv blocks of `head_channels` (256) with bias, BatchNorm (each with its MixBN twin), ReLU, "
        "Dropout2d(0.1), + classifier)",
    )
    aspp_dilations: Optional[list[int]] = option(
        None,
        "`deeplabv3plus`: default `[6, 12, 18]` at output stride 16, `[12, 24, 36]` at 8",
        items_at_least=1,
    )
    deep_stem: bool = option(
        False,
        "`deeplabv3plus`: ResNet-v1c stem (three 3x3 convolutions), as in UniMatch's / DDFP's pretrained files",
    )
    width: int = option(
        64,
        "`deeplabv3plus`: ResNet base width (64 = the standard ResNet; smaller for tests only)",
        allowed=_Range(4),
    )
    pretrained: Optional[str] = option(
        None,
        "`deeplabv3plus`: a torchvision-style ResNet state dict (`.pth`) for the backbone; without it, random weights"
        " and a warning",
    )
    init_from: Optional[str] = option(
        None,
        "fine-tuning: a mitoseg checkpoint (`RUN/best.pt`, `RUN/last.pt`) whose weights start the run (the EMA "
        "teacher starts as them too); the network must match it key for key (else one line lists the differing "
        "weights and config keys), except the classifier (the head's last 1x1 conv) when `data.num_classes` differs, "
        "which is re-initialised (the run prints which keys); read once, never by `--resume`; not with "
        "`model.pretrained` (see [Fine-tuning](fine-tuning.md))",
    )
    init_weights: Optional[Literal["ema", "student"]] = option(
        None,
        "`ema` or `student` weights of `model.init_from`; default: the weights its run validated",
    )
    freeze: list[Literal["encoder", "decoder"]] = option(
        factory=list,
        doc="parts that do not train: `encoder` (U-Net: the down-sampling path and the bottom; DeepLabV3+: the "
            "ResNet) and / or `decoder` (the rest of the feature extractor; the head always trains); their BatchNorm "
            "layers keep the loaded statistics. Needs `model.init_from` (or `model.pretrained`)",
    )
    freeze_iters: Optional[int] = option(
        None,
        "the iteration at which the frozen parts thaw (at least 1, less than `train.iterations`); `null`: frozen for "
        "the whole run",
        allowed=_AT_LEAST_1,
    )


@dataclass
class DAWConfig:
    momentum: float = option(0.99, "EMA momentum of the DAW Gaussians and alignment means", allowed=_PROBABILITY)
    alpha: float = option(
        1.0,
        "prior ratio of wrong to correct pseudo-labels at the Gaussians' crossing",
        allowed=_POSITIVE,
    )
    initial_threshold: float = option(0.95, "threshold until the Gaussians first cross", allowed=_PROBABILITY)
    alignment: bool = option(True, "distribution alignment of unlabeled to labeled confidences")


@dataclass
class DDFPConfig:
    """Density-descending feature perturbation (ddfp, daw_ddfp): the flow and the perturbation."""

    start_iter: int = option(
        500,
        "`ddfp`, `daw_ddfp`: iteration from which the flow trains (and, for `ddfp` under the official schedule, the "
        "unsupervised terms count)",
        allowed=_AT_LEAST_0,
    )
    eps: float = option(
        4.0,
        "norm of the density-descending perturbation per pixel (scale of the head's input features)",
        allowed=_AT_LEAST_0,
    )
    blocks: int = option(
        2,
        "flow: GLOW coupling blocks (each followed by a fixed random permutation)",
        allowed=_AT_LEAST_1,
    )
    hidden: int = option(256, "flow: width of the coupling subnetworks", allowed=_AT_LEAST_1)
    clamp: float = option(2.0, "flow: soft clamp of the coupling log-scales", allowed=_POSITIVE)
    lr: float = option(
        1e-3,
        "flow optimizer: Adam's learning rate, decaying exponentially to `final_lr_ratio * lr` at the end of training",
        allowed=_POSITIVE,
    )
    betas: list[float] = option(factory=lambda: [0.5, 0.9], doc="flow optimizer: Adam's betas, each in [0, 1)")
    final_lr_ratio: float = option(
        0.01,
        "flow optimizer: the learning rate at the end of training, as a fraction of `lr`",
        allowed=_Range(0, 1, low_open=True),
    )
    grad_clip: float = option(
        50.0,
        "flow optimizer: gradient-norm clipping of the flow and its prior",
        allowed=_POSITIVE,
    )
    max_pixels: int = option(20480, "feature vectors sampled per flow step", allowed=_AT_LEAST_1)
    noise: float = option(0.05, "Gaussian noise added to the flow's training inputs", allowed=_AT_LEAST_0)
    chunk_pixels: int = option(
        4096,
        "pixels per block of the perturbation's flow pass (memory bound; CPU cache); e.g. `65536` on a GPU",
        allowed=_AT_LEAST_1,
    )
    flow_every: int = option(
        1,
        "the flow (and the teacher's forward that feeds it) takes a step every k-th iteration from `start_iter` on, "
        "its learning rate decaying over its own steps; between steps the last flow logs are repeated. `1` = every "
        "iteration, as the paper; larger k lowers a `daw_ddfp` / `ddfp` step's cost (BENCHMARKS.md, Performance)",
        allowed=_AT_LEAST_1,
    )
    flow_precision: Literal["float32", "bfloat16"] = option(
        "float32",
        "the flow's coupling subnetworks (its matrix products) in `float32` (the paper) or `bfloat16` (2x faster "
        "on a CPU with AMX / AVX512-BF16 or a GPU; log-determinants and prior stay float32), for training and "
        "perturbation",
    )
    perturb_max_pixels: Optional[int] = option(
        None,
        "the direction's flow NLL summed over at most this many of the used pixels, drawn at random each step (an "
        "estimate of the sum over all; every pixel still moves through the head's convolution and BatchNorm); "
        "`null`: every used pixel (the paper). The perturbation's flow pass costs in proportion",
        allowed=_AT_LEAST_1,
    )
    flow_init: Literal["official", "identity"] = option(
        "official",
        "`official`: coupling subnets Linear-ReLU-Linear-ReLU-Linear, every flow parameter drawn from 0.05 N(0, 1) "
        "(DDFP's model/flow/model.py); `identity`: Linear-ReLU-Linear with a zero last layer, the flow starts as the "
        "identity",
    )
    schedule: Literal["official", "joint"] = option(
        "official",
        "`official` (DDFP's code): `ddfp` trains `L_x` alone before `start_iter`, where the EMA teacher restarts from"
        " the student; then the flow trains and `L = L_x + L_u`; from `perturb_iter` `L = L_x + 0.5 L_u + 0.5 L_p`. "
        "`joint`: flow and perturbation from `start_iter`, `L = L_x + 0.5 L_u + 0.5 L_p` throughout (mitoseg before "
        "0.2)",
    )
    perturb_iter: Optional[int] = option(
        None,
        "iteration from which the perturbed term counts; default `2 * start_iter` (`official`: one flow warm-up after"
        " the flow starts), `start_iter` (`joint`)",
        allowed=_AT_LEAST_0,
    )
    perturb_pixels: Literal["confident", "all"] = option(
        "confident",
        "the flow NLL whose gradient is the direction sums over the pixels whose pseudo-label is used (DDFP's "
        "attack.py), or over `all` pixels",
    )
    perturb_bn: Literal["aux_train", "main_eval"] = option(
        "aux_train",
        "the direction is taken through the head with its auxiliary BatchNorm in train mode (DDFP's code; batch "
        "statistics tie every pixel to the used ones) or with the main BatchNorm in eval mode (`main_eval`: no "
        "statistics touched)",
    )
    mixbn_warmup: bool = option(
        True,
        "`ddfp`, official schedule: between `start_iter` and `perturb_iter` the strong view passes the head's "
        "auxiliary BatchNorm (DDFP's `warm_up` MixBN status)",
    )
    teacher_mode: Literal["train", "eval"] = option(
        "train",
        "the EMA teacher's forward for the flow's features and `ddfp`'s pseudo-labels in train mode (DDFP's code) or "
        "`eval` mode",
    )


@dataclass
class MethodConfig:
    name: Literal["supervised", "fixmatch", "unimatch", "daw", "ddfp", "daw_ddfp"] = option(
        "supervised",
        "`supervised`, `fixmatch`, `unimatch`, `daw`, `ddfp`, `daw_ddfp`",
    )
    threshold: float = option(0.95, "fixed confidence threshold (`fixmatch`, `unimatch`, `ddfp`)", allowed=_PROBABILITY)
    pseudo_labels: Literal["student_train", "student", "teacher"] = option(
        "student_train",
        "where the weak views' pseudo-labels come from: `student_train` the student's train-mode forward of the "
        "labeled + weak batch, detached (the CutMix partner batch in eval mode), as UniMatch's and DAW's code; "
        "`student` the student in eval mode; `teacher` the EMA teacher (DDFP's mean teacher)",
    )
    fp_dropout: float = option(0.5, "UniMatch's feature-perturbation dropout", allowed=_UNIT)
    fp_placement: Literal["head_input", "backbone"] = option(
        "head_input",
        "where the `fp` branch drops channels: `backbone`, as UniMatch's code, drops channels of the DeepLabV3+ "
        "backbone features (layer1 and layer4) of the whole labeled + weak batch and decodes them together with the "
        "clean ones (the weak view's part is the `fp` prediction); `head_input` drops channels of the weak view's "
        "`features(x)`. `backbone` needs `deeplabv3plus` and is not implemented for `daw_ddfp`",
        note="`backbone` for `deeplabv3plus`",
    )
    unsup_normalize: Literal["valid", "confident"] = option(
        "valid",
        "each unsupervised cross-entropy divided by the valid pixels (UniMatch's and DAW's code) or averaged over the"
        " pixels whose pseudo-label is used (DDFP's code)",
    )
    cutmix: Literal["unimatch", "ddfp"] = option(
        "unimatch",
        "`unimatch`: per strong view a box of 2-40 % with probability `data.cutmix_prob`, pasted from a second "
        "unlabeled batch; `ddfp`: with probability `data.cutmix_prob` for the whole batch, a box of half the area "
        "pasted from the next sample of the same batch (no second batch is read)",
    )
    warmup: float = option(
        0.0,
        "safeguard (`mitoseg/semi/safeguard.py`), every semi-supervised method: the first fraction of the schedule "
        "(of `train.iterations`, or of `train.max_minutes`) trains on the labeled batch alone, at a supervised step's"
        " cost (no unlabeled batch is drawn); DAW's Gaussians follow the model meanwhile",
        allowed=_UNIT,
    )
    rampup: float = option(
        0.0,
        "safeguard: after the warm-up the unlabeled terms ramp up from 0 over this fraction of the schedule (`exp(-5 "
        "(1 - t)^2)`)",
        allowed=_PROBABILITY,
    )
    guard_tolerance: Optional[float] = option(
        None,
        "safeguard: when the running class shares of the pseudo-labels differ from those of the labeled batches' "
        "labels by a ratio `d` above this (either way, classes of at least 1 %), the unlabeled terms are multiplied "
        "by `(tolerance / d)^2`; said once in the log (`guard`, `guard_acted` in `metrics.jsonl`)",
        allowed=_Range(1, low_open=True),
    )
    daw: DAWConfig = option(factory=DAWConfig, doc="DAW (`method.daw.*`)")
    ddfp: DDFPConfig = option(factory=DDFPConfig, doc="DDFP's flow and perturbation (`method.ddfp.*`)")


# The safeguards mitoseg writes for a semi-supervised method where a user starts (``mitoseg init``, the napari
# Train widget, the EM configs lucchi_daw / lucchi_cpu's note): each measured alone in BENCHMARKS.md
# ("Semi-supervised on the Lucchi volume", "Safeguards on volumes like a user's"). The dataclass defaults
# above stay the papers' (no warm-up, no guard), so the paper configs run DAW, UniMatch and DDFP as published.
SEMI_SUPERVISED_SAFEGUARDS = {"warmup": 0.5, "guard_tolerance": 1.5}


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = option("adamw", "`adamw` or `sgd`")
    lr: float = option(1e-3, "learning rate (the start of the schedule)", allowed=_POSITIVE)
    weight_decay: float = option(1e-4, "weight decay (AdamW: decoupled)", allowed=_AT_LEAST_0)
    momentum: float = option(0.9, "SGD only: momentum", allowed=_UNIT)
    schedule: Literal["poly", "cosine"] = option(
        "poly",
        "learning-rate decay over `train.iterations`: `poly` (`lr0 * (1 - it / iterations) ** poly_power`) or "
        "`cosine` (`lr0 * (1 + cos(pi it / iterations)) / 2`)",
    )
    poly_power: float = option(0.9, "exponent of the poly schedule", allowed=_AT_LEAST_0)
    warmup_iters: int = option(
        0,
        "linear warm-up over these first iterations (the decay still spans the whole run); less than "
        "`train.iterations`",
        allowed=_AT_LEAST_0,
    )
    warmup_ratio: float = option(0.1, "the warm-up starts at `warmup_ratio * lr`", allowed=_Range(0, 1, low_open=True))
    head_lr_multiplier: float = option(
        1.0,
        "`deeplabv3plus`: everything but the backbone trains at `lr * this` (10 for Pascal, as UniMatch)",
        allowed=_POSITIVE,
    )


@dataclass
class TrainConfig:
    iterations: int = option(2000, "training length (with `train.max_minutes`: an upper bound)", allowed=_AT_LEAST_1)
    max_minutes: Optional[float] = option(
        None,
        "a time budget: the learning-rate schedule spans this many minutes of the run's wall time (validation and "
        "checkpoints included, summed over resumed sessions) instead of `train.iterations`, and the run ends with the"
        " learning rate at zero when they are spent. The clock is read at log steps (every rank alike under torchrun)"
        " and extrapolated between them; the schedule follows the clock, so a resumed run is not bit-identical to an "
        "uninterrupted one. `mitoseg train --max-minutes` is different: it stops a run early, its schedule still "
        "spanning `train.iterations`, and `--resume` continues",
        allowed=_Range(0, low_open=True),
    )
    epochs: Optional[int] = option(
        None,
        "natural images: train this many passes over the unlabeled list (supervised: the labeled list) instead; sets "
        "`iterations = epochs * (list length // (batch size * processes))`",
        allowed=_AT_LEAST_1,
    )
    loss: Literal["dice_ce", "ce", "ohem"] = option(
        "dice_ce",
        "`dice_ce` (MONAI Dice + CE), `ce` (cross-entropy with `train.ignore_index`) or `ohem` (natural images only: "
        "online hard example mining, below); natural images need `ce` or `ohem` with `ignore_index: 255`",
        note="`ce` for natural images",
    )
    dice_weight: float = option(
        1.0,
        "`dice_ce`: weight of the Dice term (the loss is `dice_weight * Dice + ce_weight * CE`)",
        allowed=_AT_LEAST_0,
    )
    ce_weight: float = option(1.0, "`dice_ce`: weight of the cross-entropy term", allowed=_AT_LEAST_0)
    ignore_index: int = option(255, "label value the `ce` and `ohem` losses skip (natural images: must be 255)")
    ohem_thresh: float = option(
        0.7,
        "`ohem`, the official UniMatch / DAW Cityscapes criterion (`ProbOhemCrossEntropy2d`): the mean cross-entropy "
        "over the valid pixels whose true-class probability is at most this, the threshold raised to the "
        "`ohem_min_kept`-th smallest probability of the batch (per process) when that is larger (ties kept)",
        allowed=_PROBABILITY,
    )
    ohem_min_kept: int = option(
        200000,
        "`ohem`: at least this many (the hardest) pixels per batch; no mining when the batch has fewer valid pixels, "
        "or when it is 0",
        allowed=_AT_LEAST_0,
    )
    ema_decay: float = option(0.99, "EMA teacher decay", allowed=_UNIT)
    ema_warmup: bool = option(
        False,
        "the decay of update n (0-based) is `min(ema_decay, 1 - 1 / (n + 1))`, as DAW's and DDFP's code",
    )
    eval_model: Literal["ema", "student", "best_of"] = option(
        "ema",
        "weights that validation and `best.pt` selection use: `ema`, `student`, or `best_of` (both validated, the "
        "better kept); without validation the final weights of this choice are the model (`best_of`: the EMA "
        "teacher), and a short run's EMA teacher lags its student badly (BENCHMARKS.md, \"Safeguards on volumes like a"
        " user's\")",
        note="`mitoseg init` and the napari Train widget: `best_of` with validation slices, `student` without",
    )
    val_tta: Optional[bool] = option(
        None,
        "test-time augmentation in the validations during training; `null`: as `inference.tta`. `false` spends a time"
        " budget on training (8x less validation time) while `predict`, `evaluate` and `data.test` still use "
        "`inference.tta`",
    )
    val_every: int = option(200, "validation interval in iterations (and at the last)", allowed=_AT_LEAST_1)
    log_every: int = option(
        20,
        "logging interval in iterations (`metrics.jsonl`, TensorBoard; the one host synchronisation of a step)",
        allowed=_AT_LEAST_1,
    )
    checkpoint_every: int = option(
        200,
        "`last.pt` interval in iterations (and at the last, and on Ctrl-C)",
        allowed=_AT_LEAST_1,
    )
    amp: bool = option(
        True,
        "mixed precision: float16 (with a gradient scaler) on CUDA, bfloat16 on a CPU with native bf16 (AVX512-BF16 "
        "or AMX, 2-3x faster there); full precision elsewhere. Also used by validation, `predict` and `evaluate`",
    )
    grad_clip: Optional[float] = option(
        None,
        "gradient-norm clipping (a positive norm; `null`: none)",
        allowed=_POSITIVE,
    )
    max_bad_steps: int = option(
        20,
        "a step whose loss or gradient is not finite (NaN / inf) is skipped: weights, optimizer state, EMA teacher "
        "and BatchNorm statistics stay as they were; after this many consecutive skipped steps (counted on the "
        "device, read at the next log step) training stops with exit status 3",
        allowed=_AT_LEAST_1,
    )
    inspect_every: int = option(
        500,
        "inspection files of semi-supervised runs (`inspect/`): interval in iterations",
        allowed=_AT_LEAST_1,
    )
    inspect_patches: int = option(
        4,
        "inspection files: the number of fixed unlabeled patches in each",
        allowed=_AT_LEAST_1,
    )


@dataclass
class InferenceConfig:
    roi_size: list[int] = option(factory=lambda: [256, 256], doc="sliding window size")
    overlap: float = option(0.25, "window overlap", allowed=_UNIT)
    sw_batch_size: int = option(4, "windows per forward pass", allowed=_AT_LEAST_1)
    blend: Literal["gaussian", "constant"] = option("gaussian", "`gaussian` or `constant`")
    slab: int = option(
        8,
        "slices predicted together (3-D: plus half a window of slices on each side)",
        allowed=_AT_LEAST_1,
    )
    tta: bool = option(
        False,
        "test-time augmentation: the softmax averaged over the 8 flips / quarter turns in y-x (16 with the z flip in "
        "3-D); 8x (16x) the prediction time",
    )
    min_object_voxels: int = option(
        0,
        "post-processing (two classes): foreground objects (3-D, face-connected) smaller than this become background;"
        " found slab by slab in bounded memory",
        allowed=_AT_LEAST_0,
    )
    fill_holes: bool = option(
        False,
        "post-processing (two classes): background enclosed by foreground in 3-D becomes foreground (after the "
        "small-object removal)",
    )


@dataclass
class Config:
    seed: int = option(0, "seeds sampling, augmentation and initialisation", allowed=_Range(0, 2**32 - 1))
    device: str = option("auto", "`auto` (CUDA if available), `cpu`, `cuda`, `cuda:N`")
    data: DataConfig = option(factory=DataConfig, doc="data (`data.*`)")
    model: ModelConfig = option(factory=ModelConfig, doc="network (`model.*`)")
    method: MethodConfig = option(factory=MethodConfig, doc="method (`method.*`)")
    optim: OptimConfig = option(factory=OptimConfig, doc="optimizer (`optim.*`)")
    train: TrainConfig = option(factory=TrainConfig, doc="training (`train.*`)")
    inference: InferenceConfig = option(factory=InferenceConfig, doc="prediction (`inference.*`)")


def schema_keys(cls: type = None, prefix: str = ""):
    """``(dotted key, dataclasses.Field, type)`` of every key of the schema, sections expanded, in file order."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from schema_keys(hints[f.name], key + ".")
        else:
            yield key, f, hints[f.name]


# Every numeric key's allowed values and the lower bound of integer lists' items, from the schema. A value outside
# would crash training after the run directory exists (a DataLoader with -1 workers, a sliding window batch of 0)
# or silently mean something else (a negative weight decay, a probability of 2). ``None`` (where a key allows it)
# means its default.
_RANGES: dict[str, _Range] = {k: f.metadata["allowed"] for k, f, _ in schema_keys() if f.metadata.get("allowed")}
_LIST_MINIMUM: dict[str, int] = {k: f.metadata["items_at_least"] for k, f, _ in schema_keys()
                                 if f.metadata.get("items_at_least") is not None}


# ----------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return "list" if item is Any else f"list of {_type_name(item)}"
    if origin is dict:
        return "mapping of {} to {}".format(*(_type_name(a) for a in typing.get_args(tp)))
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None  # not an empty dataclass: `data.val: null` must stay null (e.g. on --resume)
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key)
            except MitosegError:
                continue
        raise _type_error(key, tp, value)
    if tp is type(None):
        if value is None:
            return None
        raise _type_error(key, tp, value)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise _type_error(key, tp, value)
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _type_error(key, tp, value)
        return {_convert(k, key_type, f"{key} key"): _convert(v, value_type, f"{key}[{k!r}]") for k, v in value.items()}
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise _type_error(key, tp, value)
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _type_error(key, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(key, tp, value)
    if tp in (str, bool):
        if isinstance(value, tp):
            return value
        raise _type_error(key, tp, value)
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")  # a bug in the schema


def _type_error(key: str, tp: Any, value: Any) -> MitosegError:
    return MitosegError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MitosegError(f"config key '{prefix or '<top level>'}' expects a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            # cutoff 0: always name the closest valid key, however far, so the user sees
            # what this level accepts even for a key unlike any of them.
            (close,) = difflib.get_close_matches(str(key), names, n=1, cutoff=0.0)
            suggestion = f"{prefix}.{close}" if prefix else close
            raise MitosegError(f"unknown config key '{full}'; did you mean '{suggestion}'?")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


NATURAL_KINDS = ("pascal", "cityscapes")


def _lookup(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _numbers(node: Any, key: str):
    """(dotted key, value) of every float anywhere in a config (lists and mappings included)."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from _numbers(getattr(node, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _numbers(item, f"{key}[{i}]")
    elif isinstance(node, dict):
        for name, item in node.items():
            yield from _numbers(item, f"{key}[{name!r}]")
    elif isinstance(node, float):
        yield key, node


def _check_values(cfg: Config) -> None:
    """Ranges of numeric keys, and constraints between values that types alone cannot express."""

    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise MitosegError(f"config key '{key}' {message}")

    # inf or nan in any number (YAML's .inf, .nan) would pass "at least" ranges and poison training.
    for key, value in _numbers(cfg, ""):
        need(math.isfinite(value), key, f"must be a finite number, got {value}")
    for key, allowed in _RANGES.items():
        value = _lookup(cfg, key)
        if value is not None:
            need(value in allowed, key, f"must be {allowed}, got {value}")
    for key, minimum in _LIST_MINIMUM.items():
        values = _lookup(cfg, key)
        if values is not None:
            need(all(v >= minimum for v in values), key, f"values must be at least {minimum}, got {values}")

    natural = cfg.data.kind != "em"
    need(natural or bool(cfg.data.train.image), "data.train.image", "is required")
    need(not natural or bool(cfg.data.root), "data.root", f"is required for data.kind '{cfg.data.kind}'")
    need(not natural or bool(cfg.data.split or cfg.data.labeled_list), "data.split",
         "is required for natural images (or data.labeled_list)")
    # Natural images mark ignored and padded pixels 255 (mitoseg/data/natural.py): only the
    # 'ce' loss skips them; Dice + CE would read 255 as a class id and fail in the middle of training.
    need(not natural or cfg.train.loss in ("ce", "ohem"), "train.loss",
         f"must be 'ce' or 'ohem' for data.kind '{cfg.data.kind}' (natural images mark ignored pixels 255: "
         "use train.loss: ce or ohem with train.ignore_index: 255)")
    # ohem is the natural-image criterion; the EM code paths know only ce's ignore label.
    need(natural or cfg.train.loss != "ohem", "train.loss",
         "ohem is for natural images (data.kind pascal or cityscapes); use dice_ce or ce for EM volumes")
    need(not natural or cfg.train.ignore_index == 255, "train.ignore_index",
         f"must be 255 for data.kind '{cfg.data.kind}' (the value natural images mark ignored pixels with), "
         f"got {cfg.train.ignore_index}")
    need(len(cfg.data.scale_range) == 2 and 0 < cfg.data.scale_range[0] <= cfg.data.scale_range[1],
         "data.scale_range", "must be [low, high] with 0 < low <= high")
    need(cfg.train.epochs is None or natural, "train.epochs",
         "needs natural images (data.kind pascal or cityscapes)")
    need(cfg.model.pretrained is None or cfg.model.name == "deeplabv3plus", "model.pretrained",
         "is only used by model.name deeplabv3plus")
    _check_fine_tuning(cfg, need)
    _check_pixel_sizes(cfg, need)
    need(cfg.model.aspp_dilations is None or len(cfg.model.aspp_dilations) == 3, "model.aspp_dilations",
         "must have 3 values")
    need(not natural or cfg.data.context_slices == 0, "data.context_slices",
         f"needs EM volumes (neighbouring slices), not data.kind '{cfg.data.kind}'")
    need(not natural or cfg.model.in_channels == 3, "model.in_channels",
         f"must be 3 for the RGB images of data.kind '{cfg.data.kind}'")
    if cfg.data.label_map:
        ignore = cfg.train.ignore_index if cfg.train.loss in ("ce", "ohem") else None
        bad = {raw: cls for raw, cls in cfg.data.label_map.items()
               if not (0 <= cls < cfg.data.num_classes or cls == ignore)}
        allowed = f"0..{cfg.data.num_classes - 1}" + (f" or train.ignore_index {ignore}" if ignore is not None else "")
        need(not bad, "data.label_map", f"must map to class ids {allowed} (data.num_classes = "
             f"{cfg.data.num_classes}), got {bad}")
    need(cfg.data.normalize.lower < cfg.data.normalize.upper, "data.normalize.lower",
         f"must be less than data.normalize.upper, got {cfg.data.normalize.lower} >= {cfg.data.normalize.upper}")
    aug = cfg.data.augment
    need(len(aug.gamma) == 2 and 0 < aug.gamma[0] <= aug.gamma[1], "data.augment.gamma",
         f"must be [low, high] with 0 < low <= high, got {aug.gamma}")
    need(len(aug.elastic_magnitude) == 2 and 0 <= aug.elastic_magnitude[0] <= aug.elastic_magnitude[1],
         "data.augment.elastic_magnitude", f"must be [low, high] with 0 <= low <= high, got {aug.elastic_magnitude}")
    need(cfg.train.loss != "dice_ce" or cfg.train.dice_weight + cfg.train.ce_weight > 0, "train.dice_weight",
         "and train.ce_weight cannot both be 0")
    need(cfg.optim.warmup_iters == 0 or cfg.train.epochs is not None or cfg.optim.warmup_iters < cfg.train.iterations,
         "optim.warmup_iters",
         f"must be less than train.iterations ({cfg.train.iterations}), got {cfg.optim.warmup_iters}")
    need(cfg.data.test is None or not natural, "data.test",
         f"is an EM volume; data.kind '{cfg.data.kind}' is scored on its validation list")
    need(cfg.data.test is None or natural or bool(cfg.data.test.image and cfg.data.test.label), "data.test",
         "needs both image and label")
    postprocess = cfg.inference.min_object_voxels > 0 or cfg.inference.fill_holes
    need(not postprocess or cfg.data.num_classes == 2, "inference.min_object_voxels",
         f"and inference.fill_holes need two classes (background / foreground), got data.num_classes "
         f"{cfg.data.num_classes}")
    need(not postprocess or not natural, "inference.min_object_voxels",
         f"and inference.fill_holes post-process EM volumes, not data.kind '{cfg.data.kind}'")
    gamma, sigma = cfg.data.strong.gamma, cfg.data.strong.blur_sigma
    need(len(gamma) == 2 and 0 < gamma[0] <= gamma[1], "data.strong.gamma",
         f"must be [low, high] with 0 < low <= high, got {gamma}")
    need(len(sigma) == 2 and 0 <= sigma[0] <= sigma[1], "data.strong.blur_sigma",
         f"must be [low, high] with 0 <= low <= high, got {sigma}")
    need(len(cfg.method.ddfp.betas) == 2 and all(b in _UNIT for b in cfg.method.ddfp.betas), "method.ddfp.betas",
         f"must be two values {_UNIT}, got {cfg.method.ddfp.betas}")
    # MONAI's UNet needs an encoder and at least one down-sampling level.
    need(len(cfg.model.channels) >= 2, "model.channels", f"must have at least 2 values, got {cfg.model.channels}")
    need(len(cfg.model.strides) == len(cfg.model.channels) - 1, "model.strides",
         f"must have one value fewer than model.channels ({len(cfg.model.channels) - 1}), got {cfg.model.strides}")
    dims = cfg.model.spatial_dims
    axes = "(z, y, x)" if dims == 3 else "(y, x)"
    need(dims == 2 or (not natural and cfg.model.name == "unet"), "model.spatial_dims",
         "3 needs model.name unet and EM volumes")
    need(dims == 2 or cfg.data.context_slices == 0, "data.context_slices",
         "is for 2-D models (a 3-D model sees the neighbouring slices itself); set it to 0")
    need(dims == 2 or cfg.data.augment.elastic_prob == 0, "data.augment.elastic_prob",
         "is for 2-D models; set it to 0 for model.spatial_dims 3")
    artefacts = cfg.data.augment.missing_slice_prob > 0 or cfg.data.augment.misalign_prob > 0
    need(not artefacts or dims == 3 or cfg.data.context_slices > 0, "data.augment.missing_slice_prob",
         "and data.augment.misalign_prob need several slices per input: data.context_slices > 0 or "
         "model.spatial_dims 3")
    need(len(cfg.data.patch_size) == dims, "data.patch_size", f"must have {dims} values {axes}")
    need(len(cfg.inference.roi_size) == dims, "inference.roi_size", f"must have {dims} values {axes}")
    need(cfg.model.name != "wide_unet" or all(s == 2 for s in cfg.model.strides), "model.strides",
         f"must all be 2 for model.name wide_unet (each level halves the resolution), got {cfg.model.strides}")
    factor = size_multiple(cfg.model)
    for key, size in (("data.patch_size", cfg.data.patch_size), ("inference.roi_size", cfg.inference.roi_size)):
        need(all(s > 0 and s % factor == 0 for s in size), key,
             f"must be positive multiples of {factor} ({size_multiple_reason(cfg.model)}), got {size}")
    # A quarter turn swaps y and x: patches of one batch would differ in shape and fail to stack.
    need(natural or not cfg.data.augment.rot90 or cfg.data.patch_size[-2] == cfg.data.patch_size[-1],
         "data.augment.rot90", f"needs a square data.patch_size, got {cfg.data.patch_size}; "
         "make the patch square in y-x or set data.augment.rot90: false")
    need(cfg.method.cutmix == "unimatch" or cfg.method.name == "ddfp", "method.cutmix",
         f"ddfp (DDFP's one strong view) is for method ddfp; {cfg.method.name} mixes with a second batch (unimatch)")
    need(cfg.method.pseudo_labels != "student_train" or cfg.method.name != "ddfp", "method.pseudo_labels",
         "student_train needs the weak view in the student's forward, which ddfp (one strong view perturbed) "
         "does not make; use teacher (the paper's) or student")
    d = cfg.method.ddfp
    need(d.perturb_iter is None or d.perturb_iter >= d.start_iter, "method.ddfp.perturb_iter",
         f"must be at least method.ddfp.start_iter ({d.start_iter}): the flow must train before it perturbs, "
         f"got {d.perturb_iter}")
    need(cfg.model.head_channels >= 2 or cfg.method.name not in ("ddfp", "daw_ddfp"), "model.head_channels",
         "must be at least 2 for the ddfp flow (it splits the channels in two)")
    deeplab = cfg.model.name == "deeplabv3plus"
    need(deeplab or cfg.model.decoder == "unimatch", "model.decoder",
         f"is a deeplabv3plus option; remove it for model.name {cfg.model.name}")
    need(cfg.model.decoder != "u2pl" or cfg.model.feature_channels > 48, "model.feature_channels",
         f"must be more than 48 for model.decoder u2pl (48 low-level channels + the ASPP head's; DDFP: 304), "
         f"got {cfg.model.feature_channels}")
    need(deeplab or cfg.method.fp_placement != "backbone", "method.fp_placement",
         f"backbone drops channels of the DeepLabV3+ backbone features; use head_input for model.name "
         f"{cfg.model.name}")


PIXEL_SIZE_NM = _Range(0.01, 100_000)  # data.pixel_size in nm: from sub-angstrom to 100 um per pixel
PIXEL_FACTOR = _Range(0.05, 64)  # data.pixel_size "Nx": 1/20 to 64 times the volume's own pixel size


def _check_pixel_sizes(cfg: Config, need) -> None:
    """``data.pixel_size`` (nm or "Nx") and the ``voxel_size`` of every volume entry."""
    import re

    value = cfg.data.pixel_size
    need(value is None or cfg.data.kind == "em", "data.pixel_size", "is for EM volumes; remove it for natural images")
    if isinstance(value, str):
        match = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*[xX]\s*$", value)
        need(match is not None, "data.pixel_size",
             f"must be a number (nm per pixel) or a factor of the volume's own pixel size such as '2x', got {value!r}")
        need(float(match.group(1)) in PIXEL_FACTOR, "data.pixel_size", f"factor must be {PIXEL_FACTOR}, got {value!r}")
    elif value is not None:
        need(value in PIXEL_SIZE_NM, "data.pixel_size", f"must be {PIXEL_SIZE_NM} nm, got {value}")
    entries = [("data.train", cfg.data.train), ("data.val", cfg.data.val), ("data.test", cfg.data.test)]
    entries += [(f"data.unlabeled[{i}]", v) for i, v in enumerate(cfg.data.unlabeled or [])]
    for key, entry in entries:
        size = entry.voxel_size if entry is not None else None
        need(size is None or (len(size) == 3 and all(v > 0 for v in size)), f"{key}.voxel_size",
             f"must be three positive sizes [z, y, x] in nm, got {size}")


def _check_fine_tuning(cfg: Config, need) -> None:
    """``model.init_from`` / ``.init_weights`` / ``.freeze`` / ``.freeze_iters`` (mitoseg/engine/finetune.py)."""
    model = cfg.model
    need(model.init_weights is None or model.init_from is not None, "model.init_weights",
         "chooses the weights of model.init_from's checkpoint; set model.init_from too")
    need(model.init_from is None or bool(model.init_from.strip()), "model.init_from",
         "must name a mitoseg checkpoint (RUN/best.pt or RUN/last.pt)")
    need(model.init_from is None or model.pretrained is None, "model.pretrained",
         "and model.init_from cannot both be set: the checkpoint of model.init_from replaces every weight, "
         "the backbone's too")
    need(len(set(model.freeze)) == len(model.freeze), "model.freeze", f"names a part twice: {model.freeze}")
    # A frozen part keeps the weights it starts with: random ones would never learn.
    need(not model.freeze or model.init_from is not None or model.pretrained is not None, "model.freeze",
         "keeps parts of a network at their starting weights, so it needs trained ones: set model.init_from "
         "(or model.pretrained for deeplabv3plus)")
    need(model.freeze_iters is None or bool(model.freeze), "model.freeze_iters",
         "is the iteration at which the parts of model.freeze thaw; set model.freeze too")
    need(model.freeze_iters is None or cfg.train.epochs is not None or model.freeze_iters < cfg.train.iterations,
         "model.freeze_iters", f"must be less than train.iterations ({cfg.train.iterations}), got "
         f"{model.freeze_iters} (null: frozen for the whole run)")


def _natural_loss_default(data: dict) -> dict:
    """Natural images default to ``train.loss: ce``: only it skips their ignore label 255.

    Applied to the raw mapping, so an explicit ``train.loss: dice_ce`` is still
    seen (and refused) by :func:`_check_values`. Returns a new mapping.
    """
    section, train = data.get("data"), data.get("train")
    if (isinstance(section, dict) and section.get("kind") in NATURAL_KINDS
            and (train is None or (isinstance(train, dict) and "loss" not in train))):
        return {**data, "train": {**(train or {}), "loss": "ce"}}
    return data


# Method-dependent defaults: DDFP is a mean-teacher method (the paper's teacher predicts the unlabeled
# images) whose code averages each unsupervised loss over the confident pixels; the other methods take the
# pseudo-labels from the student's train-mode forward and divide by the valid pixels, as UniMatch's and
# DAW's code (the dataclass defaults).
_METHOD_DEFAULTS = {"ddfp": {"pseudo_labels": "teacher", "unsup_normalize": "confident", "cutmix": "ddfp"}}


def _method_defaults(data: dict) -> dict:
    """``_METHOD_DEFAULTS`` of ``method.name``, applied to the raw mapping so explicit values are kept.
    Returns a new mapping."""
    method = data.get("method")
    if not isinstance(method, dict):
        return data
    defaults = _METHOD_DEFAULTS.get(method.get("name"), {})
    missing = {key: value for key, value in defaults.items() if key not in method}
    return {**data, "method": {**method, **missing}} if missing else data


def _fp_placement_default(data: dict) -> dict:
    """``model.name: deeplabv3plus`` defaults to ``method.fp_placement: backbone`` (UniMatch's dropout of the
    backbone features c1 and c4); unet keeps the dataclass default ``head_input``. Applied to the raw
    mapping, so an explicit value is kept (and ``backbone`` for unet refused by :func:`_check_values`).
    Returns a new mapping."""
    model, method = data.get("model"), data.get("method")
    if not (isinstance(model, dict) and model.get("name") == "deeplabv3plus"):
        return data
    if method is not None and not isinstance(method, dict):
        return data  # a type error, reported by _build
    method = method or {}
    if "fp_placement" in method:
        return data
    return {**data, "method": {**method, "fp_placement": "backbone"}}


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, _fp_placement_default(_method_defaults(_natural_loss_default(data))), "")
    _check_values(cfg)
    return cfg


def unlabeled_batch_size(data_cfg) -> int:
    """Unlabeled samples per iteration and rank: ``data.unlabeled_batch_size``, by default ``data.batch_size``."""
    return data_cfg.unlabeled_batch_size or data_cfg.batch_size


def loss_ignore_index(train_cfg) -> int | None:
    """The label value the supervised loss skips: ``train.ignore_index`` for the ``ce`` and ``ohem`` losses,
    None for ``dice_ce`` (every label value is a class)."""
    return train_cfg.ignore_index if train_cfg.loss in ("ce", "ohem") else None


def size_multiple(model_cfg: ModelConfig) -> int:
    """Window sizes (``data.patch_size``, ``inference.roi_size``, ``predict --roi-size``) along each spatial axis
    must be multiples of this: the product of a U-Net's strides (each level halves and the decoder doubles back
    exactly), times a wide_unet's stem; 1 for DeepLabV3+ (it resizes its logits to any input)."""
    if model_cfg.name == "deeplabv3plus":
        return 1
    factor = model_cfg.stem if model_cfg.name == "wide_unet" else 1
    for stride in model_cfg.strides:
        factor *= stride
    return factor


def size_multiple_reason(model_cfg: ModelConfig) -> str:
    """Where :func:`size_multiple` comes from, for error messages."""
    if model_cfg.name == "wide_unet":
        return f"model.stem {model_cfg.stem} times the product of model.strides {model_cfg.strides}"
    return f"the product of model.strides {model_cfg.strides}"


def input_channels(cfg: Config) -> int:
    """Channels the network reads: the image's (``model.in_channels``) for each of the
    ``2 * data.context_slices + 1`` slices of a 2.5-D input."""
    return cfg.model.in_channels * (2 * cfg.data.context_slices + 1)


def perturb_start(ddfp_cfg) -> int:
    """The iteration from which the density-descending term counts (``method.ddfp.perturb_iter``, by
    default one flow warm-up after start_iter under the official schedule, start_iter under joint)."""
    if ddfp_cfg.perturb_iter is not None:
        return ddfp_cfg.perturb_iter
    return 2 * ddfp_cfg.start_iter if ddfp_cfg.schedule == "official" else ddfp_cfg.start_iter


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------- reference

REFERENCE_BEGIN = "<!-- generated by `mitoseg configs keys` from mitoseg/config.py: do not edit by hand -->"
REFERENCE_END = "<!-- end of generated reference -->"


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return str(value)


def _default_notes(key: str, f: dataclasses.Field) -> list[str]:
    """The defaults other keys or tools set for ``key``: method-dependent ones (``_METHOD_DEFAULTS``), those
    ``mitoseg init`` and the napari Train widget write (``SEMI_SUPERVISED_SAFEGUARDS``), the field's own note."""
    notes = []
    section, _, name = key.rpartition(".")
    if section == "method":
        notes += [f"`{_yaml_value(values[name])}` for `{method}`" for method, values in _METHOD_DEFAULTS.items()
                  if name in values]
        if name in SEMI_SUPERVISED_SAFEGUARDS:
            notes.append(f"`mitoseg init` and the napari Train widget: `{SEMI_SUPERVISED_SAFEGUARDS[name]}`")
    if f.metadata.get("note"):
        notes.append(f.metadata["note"])
    return notes


def config_reference() -> str:
    """The Markdown table of every config key (default, allowed values, meaning), generated from the schema: the
    reference of docs/configuration.md (``mitoseg configs keys``)."""
    rows = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for key, f, tp in schema_keys():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        shown = "required" if key == "data.train.image" else f"`{_yaml_value(default)}`"
        notes = _default_notes(key, f)
        if notes:
            shown += f" ({'; '.join(notes)})"
        allowed = _type_name(tp).replace("NoneType", "null")
        if f.metadata.get("allowed") is not None:
            allowed += f", {f.metadata['allowed']}"
        if f.metadata.get("items_at_least") is not None:
            allowed += f", each at least {f.metadata['items_at_least']}"
        doc = f.metadata.get("doc", "").replace("|", "\\|")
        rows.append(f"| `{key}` | {shown} | {allowed} | {doc} |")
    return "\n".join(rows) + "\n"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.01"`` -> (["optim", "lr"], 0.01); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise MitosegError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise MitosegError(f"--set {key}: value {raw!r} is not valid YAML") from exc
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in the raw mapping; unknown keys are caught by validation."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


# The configs that ship inside the package (`mitoseg configs` lists them; `--config NAME` reads one).
BUILTIN_CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def builtin_configs() -> dict[str, Path]:
    """The built-in configs by name (``sample_daw`` -> ``.../mitoseg/configs/sample_daw.yaml``), sorted."""
    return {path.stem: path for path in sorted(BUILTIN_CONFIG_DIR.glob("*.yaml"))}


def config_description(path: Path) -> str:
    """A config's one-line description: its first comment line (empty when it starts with a key)."""
    for line in path.read_text().splitlines():
        if line.strip():
            return line.strip().lstrip("#").strip() if line.lstrip().startswith("#") else ""
    return ""


def builtin_config_name(spec: str | Path) -> str | None:
    """The built-in config ``spec`` names, or None when it is a path. A file that exists wins over a built-in
    name, so ``--config sample_daw`` reads ``./sample_daw`` only if such a file is there."""
    text = str(spec)
    if Path(text).exists() or "/" in text or "\\" in text:
        return None
    name = text[:-len(".yaml")] if text.endswith(".yaml") else text
    return name if name in builtin_configs() else None


def resolve_config_path(spec: str | Path) -> Path:
    """``--config``: a YAML file, or the name of a built-in config (``sample_daw``, ``lucchi_cpu``, ...)."""
    name = builtin_config_name(spec)
    if name is not None:
        return builtin_configs()[name]
    path = Path(spec)
    if path.is_dir():
        raise MitosegError(f"config file {path} is a directory; name a YAML file")
    if not path.is_file():
        hint = ""
        if "/" not in str(spec) and "\\" not in str(spec):
            close = difflib.get_close_matches(str(spec).removesuffix(".yaml"), list(builtin_configs()), n=1)
            hint = (f" (did you mean the built-in config {close[0]!r}? `mitoseg configs` lists them)" if close
                    else " (nor a built-in config: `mitoseg configs` lists them)")
        raise MitosegError(f"config file not found: {path}{hint}")
    return path


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a config file, or a built-in config by name (:func:`resolve_config_path`), apply ``--set``
    overrides and validate."""
    shown = builtin_config_name(path) or path  # a built-in config's errors name it, not its installed path
    path = resolve_config_path(path)
    try:
        data = parse_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise MitosegError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise MitosegError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    apply_overrides(data, overrides or [])
    try:
        return config_from_dict(data)
    except MitosegError as exc:
        raise MitosegError(f"{shown}: {exc}") from exc
