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


def parse_yaml(text: str):
    return yaml.load(text, Loader=_ConfigLoader)


# --------------------------------------------------------------------------- schema

SliceSelection = Union[int, str, list]  # see mitoseg.data.readers.select_slices


@dataclass
class VolumeConfig:
    """An image volume, its optional label volume and the slices to use."""

    image: str = ""
    label: Optional[str] = None
    slices: Optional[SliceSelection] = None  # None: every slice
    # (z, y, x) nm per voxel: overrides / supplies what the file's metadata says (data.pixel_size in nm needs it)
    voxel_size: Optional[list[float]] = None


@dataclass
class NormalizeConfig:
    mode: Literal["percentile", "meanstd"] = "percentile"
    lower: float = 1.0  # percentile mode: these percentiles map to 0 and 1
    upper: float = 99.0


@dataclass
class AugmentConfig:
    """Weak (label-preserving) augmentations of the labeled stream."""

    flip: bool = True
    rot90: bool = True
    intensity_scale: float = 0.1  # image * (1 + U(-s, s))
    intensity_shift: float = 0.1  # image + U(-s, s)
    noise_std: float = 0.02  # additive Gaussian noise, std drawn in [0, noise_std]
    prob: float = 0.5  # probability of each intensity augmentation
    gamma: list[float] = field(default_factory=lambda: [1.0, 1.0])  # contrast gamma range ([1, 1]: off), with prob
    # Elastic deformation (MONAI Rand2DElasticd / Rand3DElasticd, image bilinear, label nearest): control
    # points every elastic_spacing pixels, displaced by a magnitude drawn from elastic_magnitude (pixels).
    elastic_prob: float = 0.0
    elastic_spacing: int = 32
    elastic_magnitude: list[float] = field(default_factory=lambda: [1.0, 3.0])
    # Sectioning artefacts, for 2.5-D (data.context_slices) and 3-D inputs: a blank slice, and a slice
    # (3-D: the rest of the patch) shifted by up to misalign_max pixels.
    missing_slice_prob: float = 0.0
    misalign_prob: float = 0.0
    misalign_max: int = 8


@dataclass
class StrongConfig:
    """Photometric perturbations of the strong views (on top of the weak view)."""

    brightness: float = 0.2  # image + U(-b, b)
    contrast: float = 0.2  # image * (1 + U(-c, c))
    gamma: list[float] = field(default_factory=lambda: [0.7, 1.5])
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 1.5])
    blur_prob: float = 0.5
    noise_std: float = 0.05
    prob: float = 0.8  # probability of each of brightness, contrast, gamma and noise


@dataclass
class DataConfig:
    # "em": volumes (data.train / data.val / data.unlabeled); "pascal" / "cityscapes": natural
    # images under data.root, chosen by split lists (mitoseg/data/natural.py).
    kind: Literal["em", "pascal", "cityscapes"] = "em"
    root: Optional[str] = None  # natural: the dataset root (JPEGImages/ + SegmentationClass/, or leftImg8bit/ + gtFine/)
    # natural: a shipped split name (pascal: 92, 183, 366, 732, 1464, 1_16, 1_8, 1_4, u2pl_1_16, u2pl_1_8,
    # u2pl_1_4; cityscapes: 1_30, 1_16, 1_8, 1_4, 1_2) or a folder holding labeled.txt (+ unlabeled.txt).
    split: Optional[str] = None
    labeled_list: Optional[str] = None  # natural: own list files (lines "IMAGE MASK"), override data.split
    unlabeled_list: Optional[str] = None
    val_list: Optional[str] = None  # default: the shipped val.txt of the data set
    crop_size: int = 321  # natural: square training crop (pascal 321 or 513, cityscapes 801)
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])  # natural: random rescale of the long side
    eval_mode: Optional[Literal["full", "center_crop", "sliding_window"]] = None  # natural; default: pascal full, cityscapes sliding_window
    train: VolumeConfig = field(default_factory=VolumeConfig)
    val: Optional[VolumeConfig] = None
    # An independent volume scored with best.pt when training ends (the run's inference settings), into
    # summary.json ("test") and the final table; `mitoseg evaluate --checkpoint` gives the same numbers.
    test: Optional[VolumeConfig] = None
    # Unlabeled volumes for the semi-supervised methods. Default (null): the
    # training volume's slices not selected in data.train.slices. An entry's
    # `label` is read for analysis only (pseudo-label quality), never trained on;
    # an entry without `image` means the training volume.
    unlabeled: Optional[list[VolumeConfig]] = None
    unlabeled_batch_size: Optional[int] = None  # default: data.batch_size
    strong: StrongConfig = field(default_factory=StrongConfig)
    cutmix_prob: float = 0.5
    num_classes: int = 2
    # Raw label value -> class id, applied when labels are read, e.g. {255: 1} for
    # the official Lucchi ground truth (0 / 255). Unmapped values stay as they are.
    label_map: Optional[dict[int, int]] = None
    patch_size: list[int] = field(default_factory=lambda: [128, 128])
    # The model's working in-plane (y, x) pixel size: nm per pixel, or a factor of each volume's own ("2x");
    # null: the volumes' own grid. Training slices are resampled once when read; validation, data.test and
    # predict resample each slab down, predict, and bring the probabilities back to the volume's grid.
    pixel_size: Optional[Union[float, str]] = None
    # 2.5-D: each slice comes with this many neighbouring slices on each side as extra input channels
    # (reflected at the volume's ends), in training, views, validation and predict.
    context_slices: int = 0
    batch_size: int = 8
    foreground_sampling: float = 0.5  # share of patches centred on a foreground pixel
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    num_workers: int = 0


@dataclass
class ModelConfig:
    # unet: MONAI's residual U-Net (2-D or 3-D); wide_unet: a 2-D U-Net for the CPU (space-to-depth stem, wide
    # levels: mitoseg/networks/wide_unet.py); deeplabv3plus: natural images.
    name: Literal["unet", "wide_unet", "deeplabv3plus"] = "unet"
    # unet: 2 (slices) or 3 (volumes: data.patch_size and inference.roi_size are (z, y, x))
    spatial_dims: Literal[2, 3] = 2
    in_channels: int = 1
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 2
    norm: Literal["batch", "instance"] = "batch"
    feature_channels: int = 32  # channels of the last decoder feature map
    head_channels: int = 32  # channels of the head's conv block (its penultimate features)
    dropout: float = 0.0
    # wide_unet only: each stem x stem block of pixels becomes channels before the first convolution (1: none)
    stem: int = 2
    # deeplabv3plus only
    backbone: Literal["resnet50", "resnet101"] = "resnet101"
    output_stride: Literal[8, 16] = 16  # 16: dilation in the last ResNet stage; 8: in the last two
    # "unimatch": UniMatch's decoder (features = the first fuse conv, feature_channels 256; head = the second
    # fuse conv + classifier); "u2pl": U2PL's / DDFP's dec_deeplabv3_plus (features = the 48 low-level
    # channels + the ASPP head's, feature_channels 304; head = two 3x3 conv blocks with bias and
    # Dropout2d(0.1), head_channels 256, + classifier).
    decoder: Literal["unimatch", "u2pl"] = "unimatch"
    aspp_dilations: Optional[list[int]] = None  # default: [6, 12, 18] at output stride 16, [12, 24, 36] at 8
    deep_stem: bool = False  # ResNet-v1c stem (three 3x3 convs, 128 channels), as UniMatch's pretrained files
    width: int = 64  # ResNet base width: 64 is the standard ResNet (smaller: tiny test networks only)
    pretrained: Optional[str] = None  # torchvision-style ResNet state dict for the backbone (.pth)
    # Fine-tuning (mitoseg/engine/finetune.py): the weights of a mitoseg checkpoint (RUN/best.pt, RUN/last.pt)
    # start a new run; another data.num_classes re-initialises the classifier only. Read once: --resume does not.
    init_from: Optional[str] = None
    init_weights: Optional[Literal["ema", "student"]] = None  # default: the weights the checkpoint's run validated
    # Parts that do not train (their BatchNorm statistics stay as loaded too), e.g. [encoder] for small label sets;
    # freeze_iters: the iteration at which they thaw (null: frozen for the whole run).
    freeze: list[Literal["encoder", "decoder"]] = field(default_factory=list)
    freeze_iters: Optional[int] = None


@dataclass
class DAWConfig:
    momentum: float = 0.99  # EMA of the confidence Gaussians and of the alignment means
    alpha: float = 1.0  # prior ratio of wrong to correct pseudo-labels at the crossing
    initial_threshold: float = 0.95
    alignment: bool = True  # distribution alignment of unlabeled to labeled confidences


@dataclass
class DDFPConfig:
    """Density-descending feature perturbation (ddfp, daw_ddfp): the flow and the perturbation."""

    start_iter: int = 500  # warm-up: the flow trains and the perturbed term counts from this iteration on
    eps: float = 4.0  # L2 norm of the perturbation per pixel (depends on the feature scale)
    blocks: int = 2  # GLOW coupling blocks (each followed by a fixed random permutation)
    hidden: int = 256  # width of the coupling subnetworks
    clamp: float = 2.0  # soft clamp of the coupling log-scales
    lr: float = 1e-3  # Adam, decaying exponentially to final_lr_ratio * lr at the end of training
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    final_lr_ratio: float = 0.01
    grad_clip: float = 50.0  # gradient-norm clipping of the flow and its prior
    max_pixels: int = 20480  # feature vectors sampled per step for the flow
    noise: float = 0.05  # Gaussian noise added to the flow's training inputs
    # The perturbation's flow pass runs on blocks of this many pixels: bounds its memory and, on
    # the CPU, keeps the activations in cache; on a GPU larger blocks (e.g. 65536) launch fewer kernels.
    chunk_pixels: int = 4096
    # The flow (and the teacher's forward that feeds it) trains every flow_every-th iteration from start_iter
    # on, its learning rate decaying over its own steps; 1 = every iteration, as the paper.
    flow_every: int = 1
    # Faithful to DDFP's code by default; each key restores mitoseg's earlier choice.
    flow_init: Literal["official", "identity"] = "official"  # 3-layer subnets, 0.05 N(0,1) | identity start
    # official: ddfp trains supervised only before start_iter, then the flow trains and L = L_x + L_u, and
    # from perturb_iter on L = L_x + 0.5 L_u + 0.5 L_p (the teacher restarts from the student at start_iter);
    # joint: flow and perturbation start together at start_iter, L = L_x + 0.5 L_u + 0.5 L_p throughout.
    schedule: Literal["official", "joint"] = "official"
    perturb_iter: Optional[int] = None  # default: 2 * start_iter (official), start_iter (joint)
    perturb_pixels: Literal["confident", "all"] = "confident"  # delta only where the pseudo-label is used
    # The perturbation's direction through the head with its auxiliary BatchNorm in train mode (as DDFP's
    # attack.py), or with the main BatchNorm in eval mode (running statistics, nothing updated).
    perturb_bn: Literal["aux_train", "main_eval"] = "aux_train"
    mixbn_warmup: bool = True  # ddfp: between start_iter and perturb_iter the strong view uses the auxiliary BN
    teacher_mode: Literal["train", "eval"] = "train"  # the teacher's forward for the flow features (and pseudo-labels)


@dataclass
class MethodConfig:
    name: Literal["supervised", "fixmatch", "unimatch", "daw", "ddfp", "daw_ddfp"] = "supervised"
    threshold: float = 0.95  # fixed confidence threshold of fixmatch / unimatch
    # Where the weak views' pseudo-labels come from: "student_train" the student's train-mode forward of the
    # labeled + weak batch (detached; the CutMix partner batch in eval mode), as UniMatch's and DAW's code
    # (the default of fixmatch, unimatch, daw, daw_ddfp); "student" the student in eval mode; "teacher" the
    # EMA teacher (ddfp's default, the paper's mean teacher). See _method_defaults.
    pseudo_labels: Literal["student_train", "student", "teacher"] = "student_train"
    fp_dropout: float = 0.5  # UniMatch's feature-perturbation dropout
    # Where the fp branch drops channels: "backbone" the DeepLabV3+ backbone features c1 and c4 of the whole
    # [labeled, weak] batch, decoded again (UniMatch's model/semseg/deeplabv3plus.py, need_fp; the default of
    # deeplabv3plus), or "head_input" the weak view's features(x) (unet's default). See _fp_placement_default.
    fp_placement: Literal["head_input", "backbone"] = "head_input"
    # Each unsupervised cross-entropy divided by the valid pixels (UniMatch's and DAW's code) or averaged
    # over the pixels whose pseudo-label is used (DDFP's code; ddfp's default, see _method_defaults).
    unsup_normalize: Literal["valid", "confident"] = "valid"
    # CutMix of the strong views: UniMatch's (a 2-40 % box per view with probability data.cutmix_prob, from a
    # second unlabeled batch) or DDFP's (with probability data.cutmix_prob for the whole batch, a box of half
    # the area from the next sample of the same batch; ddfp's default).
    cutmix: Literal["unimatch", "ddfp"] = "unimatch"
    # Safeguards of the unlabeled loss (mitoseg/semi/safeguard.py), for every semi-supervised method:
    # the first `warmup` of the schedule (a fraction of train.iterations or of train.max_minutes) trains on
    # the labeled batch alone, at a supervised step's cost (no unlabeled batch is drawn; DAW's statistics
    # already follow the model); the unlabeled terms then ramp up from 0 over the next `rampup` of it
    # (exp(-5 (1 - t)^2)); with `guard_tolerance` T, the unlabeled terms are down-weighted by (T / d)^2 when
    # the running class shares of the pseudo-labels differ from the labeled batches' by a ratio d > T.
    warmup: float = 0.0
    rampup: float = 0.0
    guard_tolerance: Optional[float] = None
    daw: DAWConfig = field(default_factory=DAWConfig)
    ddfp: DDFPConfig = field(default_factory=DDFPConfig)


# The safeguards mitoseg writes for a semi-supervised method where a user starts (``mitoseg init``, the napari
# Train widget, the EM configs lucchi_daw / lucchi_cpu's note): each measured alone in BENCHMARKS.md
# ("Semi-supervised on the Lucchi volume", "Safeguards on volumes like a user's"). The dataclass defaults
# above stay the papers' (no warm-up, no guard), so the paper configs run DAW, UniMatch and DDFP as published.
SEMI_SUPERVISED_SAFEGUARDS = {"warmup": 0.5, "guard_tolerance": 1.5}


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    schedule: Literal["poly", "cosine"] = "poly"  # learning-rate decay over train.iterations
    poly_power: float = 0.9  # poly: lr = base_lr * (1 - it / iterations) ** poly_power
    warmup_iters: int = 0  # linear warm-up from warmup_ratio * lr to lr over these first iterations
    warmup_ratio: float = 0.1
    head_lr_multiplier: float = 1.0  # lr of everything but a pretrained backbone (deeplabv3plus) = lr * this


@dataclass
class TrainConfig:
    iterations: int = 2000
    # A time budget: the learning-rate schedule spans this many minutes of the run's wall time (validation and
    # checkpoints included, summed over resumed sessions) and reaches zero when they are spent, which ends the
    # run; train.iterations is then an upper bound. The schedule follows the clock, so a resumed run is not
    # bit-identical to an uninterrupted one. null: the schedule spans train.iterations.
    max_minutes: Optional[float] = None
    # Natural data: train this many passes over the unlabeled list (semi-supervised) or the labeled list
    # (supervised) instead; sets iterations = epochs * (list length // (batch size * ranks)).
    epochs: Optional[int] = None
    # "ohem" (natural images): cross-entropy over the hard pixels, the official UniMatch / DAW Cityscapes criterion
    # (ProbOhemCrossEntropy2d): pixels whose true-class probability is <= ohem_thresh, at least ohem_min_kept of them.
    loss: Literal["dice_ce", "ce", "ohem"] = "dice_ce"
    dice_weight: float = 1.0  # dice_ce: weight of the Dice term (MONAI DiceCELoss lambda_dice)
    ce_weight: float = 1.0  # dice_ce: weight of the cross-entropy term (lambda_ce)
    ignore_index: int = 255  # label value excluded from the loss ("ce" and "ohem" only)
    ohem_thresh: float = 0.7  # ohem: keep pixels whose true-class probability is at most this ...
    ohem_min_kept: int = 200000  # ... but at least this many (the hardest) per batch; 0: no mining (plain CE)
    ema_decay: float = 0.99
    # EMA warm-up of DAW's and DDFP's code: the decay of update n (0-based) is min(ema_decay, 1 - 1 / (n + 1)).
    ema_warmup: bool = False
    # Which weights validation and best.pt measure: the EMA teacher, the student, or both, keeping the better
    # (DAW's code evaluates both every epoch); predict / evaluate then default to the weights that won.
    eval_model: Literal["ema", "student", "best_of"] = "ema"
    # Test-time augmentation in the validations during training (null: as inference.tta). false keeps a time
    # budget for training while predict, evaluate and data.test still use inference.tta.
    val_tta: Optional[bool] = None
    val_every: int = 200
    log_every: int = 20
    checkpoint_every: int = 200
    # Mixed precision: float16 on CUDA; bfloat16 on a CPU with native bf16 (AVX512-BF16 or AMX); ignored elsewhere.
    amp: bool = True
    grad_clip: Optional[float] = None
    # A step whose loss or gradient is not finite is skipped (weights, optimizer, BatchNorm statistics unchanged);
    # after this many consecutive ones training stops with exit status 3 (mitoseg/engine/trainer.py).
    max_bad_steps: int = 20
    inspect_every: int = 500  # pseudo-label inspection files (semi-supervised methods)
    inspect_patches: int = 4  # fixed unlabeled patches saved in each inspection file


@dataclass
class InferenceConfig:
    roi_size: list[int] = field(default_factory=lambda: [256, 256])
    overlap: float = 0.25
    sw_batch_size: int = 4
    blend: Literal["gaussian", "constant"] = "gaussian"
    slab: int = 8  # slices read, predicted and written together (bounds memory)
    # Test-time augmentation: the softmax averaged over the 8 flips / quarter turns in y-x.
    tta: bool = False
    # Post-processing of the predicted labels (two classes): foreground objects (3-D, face-connected)
    # smaller than this many voxels become background; 0: off.
    min_object_voxels: int = 0
    fill_holes: bool = False  # background enclosed by foreground in 3-D becomes foreground


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)


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

# Every numeric scalar key and its allowed values. A value outside would crash
# training after the run directory exists (a DataLoader with -1 workers, a
# sliding window batch of 0) or silently mean something else (a negative weight
# decay, a probability of 2). ``None`` (where a key allows it) means its default.
_RANGES: dict[str, _Range] = {
    "seed": _Range(0, 2**32 - 1),  # NumPy's global seed takes 0 .. 2**32 - 1
    "data.crop_size": _Range(8),
    "data.unlabeled_batch_size": _AT_LEAST_1,
    "data.cutmix_prob": _PROBABILITY,
    "data.num_classes": _Range(2),
    "data.batch_size": _AT_LEAST_1,
    "data.context_slices": _AT_LEAST_0,
    "data.foreground_sampling": _PROBABILITY,
    "data.num_workers": _AT_LEAST_0,
    "data.normalize.lower": _Range(0, 100),
    "data.normalize.upper": _Range(0, 100),
    # A scale factor 1 + U(-s, s) must stay positive, or the jitter inverts the contrast.
    "data.augment.intensity_scale": _UNIT,
    "data.augment.intensity_shift": _AT_LEAST_0,
    "data.augment.noise_std": _AT_LEAST_0,
    "data.augment.prob": _PROBABILITY,
    "data.augment.elastic_prob": _PROBABILITY,
    "data.augment.elastic_spacing": _Range(4),
    "data.augment.missing_slice_prob": _PROBABILITY,
    "data.augment.misalign_prob": _PROBABILITY,
    "data.augment.misalign_max": _AT_LEAST_0,
    "data.strong.brightness": _AT_LEAST_0,
    "data.strong.contrast": _UNIT,
    "data.strong.blur_prob": _PROBABILITY,
    "data.strong.noise_std": _AT_LEAST_0,
    "data.strong.prob": _PROBABILITY,
    "model.in_channels": _AT_LEAST_1,
    "model.num_res_units": _AT_LEAST_0,
    "model.feature_channels": _AT_LEAST_1,
    "model.head_channels": _AT_LEAST_1,
    "model.dropout": _UNIT,
    "model.stem": _Range(1, 8),
    "train.max_minutes": _Range(0, low_open=True),
    "model.width": _Range(4),
    "model.freeze_iters": _AT_LEAST_1,  # 0 would freeze nothing
    "method.threshold": _PROBABILITY,
    "method.fp_dropout": _UNIT,
    "method.warmup": _UNIT,  # 1 would never use the unlabeled slices
    "method.rampup": _PROBABILITY,
    "method.guard_tolerance": _Range(1, low_open=True),  # a ratio: 1 or less would always act
    "method.daw.momentum": _PROBABILITY,
    "method.daw.alpha": _POSITIVE,
    "method.daw.initial_threshold": _PROBABILITY,
    "method.ddfp.start_iter": _AT_LEAST_0,
    "method.ddfp.eps": _AT_LEAST_0,
    "method.ddfp.blocks": _AT_LEAST_1,
    "method.ddfp.hidden": _AT_LEAST_1,
    "method.ddfp.clamp": _POSITIVE,
    "method.ddfp.lr": _POSITIVE,
    "method.ddfp.final_lr_ratio": _Range(0, 1, low_open=True),
    "method.ddfp.grad_clip": _POSITIVE,
    "method.ddfp.max_pixels": _AT_LEAST_1,
    "method.ddfp.noise": _AT_LEAST_0,
    "method.ddfp.chunk_pixels": _AT_LEAST_1,
    "method.ddfp.flow_every": _AT_LEAST_1,
    "method.ddfp.perturb_iter": _AT_LEAST_0,
    "optim.lr": _POSITIVE,
    "optim.weight_decay": _AT_LEAST_0,
    "optim.momentum": _UNIT,
    "optim.poly_power": _AT_LEAST_0,
    "optim.warmup_iters": _AT_LEAST_0,
    "optim.warmup_ratio": _Range(0, 1, low_open=True),
    "optim.head_lr_multiplier": _POSITIVE,
    "train.iterations": _AT_LEAST_1,
    "train.epochs": _AT_LEAST_1,
    "train.ema_decay": _UNIT,
    "train.dice_weight": _AT_LEAST_0,
    "train.ce_weight": _AT_LEAST_0,
    "train.ohem_thresh": _PROBABILITY,
    "train.ohem_min_kept": _AT_LEAST_0,  # 0: no mining, as the official ProbOhemCrossEntropy2d
    "train.val_every": _AT_LEAST_1,
    "train.log_every": _AT_LEAST_1,
    "train.checkpoint_every": _AT_LEAST_1,
    "train.grad_clip": _POSITIVE,  # null: no clipping (0 would silently mean the same)
    "train.max_bad_steps": _AT_LEAST_1,
    "train.inspect_every": _AT_LEAST_1,
    "train.inspect_patches": _AT_LEAST_1,
    "inference.overlap": _UNIT,
    "inference.sw_batch_size": _AT_LEAST_1,
    "inference.slab": _AT_LEAST_1,
    "inference.min_object_voxels": _AT_LEAST_0,
}

# Integer lists whose every value has a lower bound (lengths are checked in _check_values).
_LIST_MINIMUM: dict[str, int] = {
    "model.channels": 1,
    "model.strides": 1,  # a stride of 0 has no meaning (and the patch size check divides by it)
    "model.aspp_dilations": 1,
}

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
