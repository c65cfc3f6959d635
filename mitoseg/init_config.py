"""``mitoseg init``: a commented config for your own image and label volumes.

The volumes are inspected (shape, dtype, which slices hold labels, the label values) slab by slab, in
bounded memory, and a config is written for them: the labeled slices found, a validation slice held out
when there are enough, the unlabeled slices for the semi-supervised methods, a ``label_map`` when the
labels are not 0, 1, 2, ... (e.g. 0 / 255 masks), and a patch size, network and schedule sized to the
slices and the device. Nothing here imports torch unless the device has to be detected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mitoseg.config import ModelConfig, size_multiple
from mitoseg.errors import MitosegError

METHODS = ("supervised", "fixmatch", "unimatch", "daw", "ddfp", "daw_ddfp")
SEMI_SUPERVISED = ("fixmatch", "unimatch", "daw", "ddfp", "daw_ddfp")
MAX_LABEL_VALUES = 64  # more distinct values than this: not a label volume
MIN_LABELED_FOR_VALIDATION = 4  # fewer labeled slices all train; a validation slice would leave too few
# The working pixel size written for fine EM volumes (data.pixel_size): at 10 nm a window sees four times the
# area of 5 nm pixels for the same FLOPs, which scored better on Lucchi (5 nm FIB-SEM). Volumes finer than
# EM_FINE_NM get it; coarser or unknown ones train at their own grid.
EM_WORKING_PIXEL_NM = 10.0
EM_FINE_NM = 0.75 * EM_WORKING_PIXEL_NM


def working_pixel_size(voxel_nm) -> float | None:
    """The ``data.pixel_size`` ``mitoseg init`` writes for a volume of ``voxel_nm`` (z, y, x) nm: the one
    default, :data:`EM_WORKING_PIXEL_NM`, for a volume finer than :data:`EM_FINE_NM` per pixel; None (the
    volume's own grid) for coarser volumes and for volumes whose pixel size is unknown (``voxel_nm`` None)."""
    if voxel_nm is None:
        return None
    in_plane = float(voxel_nm[1])
    return EM_WORKING_PIXEL_NM if 0 < in_plane < EM_FINE_NM else None


@dataclass
class Inspection:
    shape: tuple[int, int, int]
    image_dtype: str
    label_dtype: str
    values: list[int]  # the label values found, sorted
    labeled: list[int]  # slices holding a non-zero label
    voxel_nm: tuple[float, float, float] | None = None  # (z, y, x) nm per voxel from the image's metadata


@dataclass
class Profile:
    """Network and schedule for a device."""

    device: str
    channels: list[int]
    strides: list[int]
    max_patch: int
    batch_size: int
    iterations: int  # the schedule's length; with ``minutes`` an upper bound
    roi: int
    lr: float
    minutes: float | None = None  # train.max_minutes: the schedule spans a time budget


# The CPU recipe of configs/lucchi_cpu.yaml (BENCHMARKS.md, "Accuracy per CPU minute on the Lucchi volume"):
# the 16-128 U-Net on 256-pixel patches at the working pixel size, its schedule a 30-minute budget.
CPU = Profile("cpu", [16, 32, 64, 128], [2, 2, 2], 256, 4, 1000000, 256, 0.002, minutes=30.0)
GPU = Profile("cuda", [32, 64, 128, 256, 512], [2, 2, 2, 2], 256, 8, 10000, 512, 0.001)


def format_selection(indices: list[int]) -> str:
    """Slices as the config's selection syntax: runs of two or more consecutive slices as ``start:stop``
    (``[0, 1, 2, 5, 7, 8]`` -> ``"0:3, 5, 7:9"``)."""
    parts, i = [], 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        parts.append(str(indices[i]) if j == i else f"{indices[i]}:{indices[j] + 1}")
        i = j + 1
    return ", ".join(parts)


def _short(indices: list[int], limit: int = 12) -> str:
    if len(indices) <= limit:
        return ", ".join(map(str, indices))
    return ", ".join(map(str, indices[:limit // 2])) + ", ..., " + ", ".join(map(str, indices[-2:]))


def _file_part(spec: str) -> str:
    return spec.split(":/", 1)[0] if ":/" in spec else spec


def absolute_spec(spec: str) -> str:
    """The volume spec with its file made absolute (``vol.h5:/raw`` keeps its dataset), so the config
    works from any directory."""
    file_part = _file_part(spec)
    rest = spec[len(file_part):]
    return str(Path(file_part).resolve()) + rest


def check_inputs(image: str, label: str, output: Path, overwrite: bool) -> None:
    """The errors found without reading a volume: missing inputs, an existing output."""
    from mitoseg.atomic import check_output_path

    for flag, spec in (("--image", image), ("--label", label)):
        file_part = _file_part(spec)
        if not Path(file_part).exists():
            raise MitosegError(f"{flag}: file not found: {file_part}")
    if output.is_dir():
        raise MitosegError(f"--output {output} is a directory; name a YAML file")
    check_output_path(output, "--output")
    if output.exists() and not overwrite:
        raise MitosegError(f"{output} exists; pass --overwrite to replace it")


def inspect_volumes(image: str, label: str, slab: int = 16) -> Inspection:
    """Shape and dtype of both volumes, the label values and the slices holding a non-zero label."""
    from mitoseg.data.readers import open_volume

    # finite: a NaN / inf pixel, which training would refuse, is named here, by its slice.
    with open_volume(image, finite=True) as img, open_volume(label) as lab:
        if len(img.shape) != 3:
            raise MitosegError(f"--image {image}: a (z, y, x) volume is needed, got shape {tuple(img.shape)}")
        if tuple(img.shape) != tuple(lab.shape):
            raise MitosegError(f"--label {label}: shape {tuple(lab.shape)} differs from the image's "
                               f"{tuple(img.shape)}")
        if not (np.issubdtype(lab.dtype, np.integer) or np.issubdtype(lab.dtype, np.floating)
                or lab.dtype == bool):
            raise MitosegError(f"--label {label}: dtype {lab.dtype} is not a label volume")
        values: set[int] = set()
        labeled: list[int] = []
        for start in range(0, lab.shape[0], slab):
            img.read(start, min(start + slab, img.shape[0]))  # the image's values checked with the labels'
            block = np.asarray(lab.read(start, min(start + slab, lab.shape[0])))
            if block.dtype.kind == "f":
                if not np.all(np.isfinite(block)) or np.any(block != np.round(block)):
                    raise MitosegError(f"--label {label}: holds values that are not whole numbers (slices "
                                       f"{start}-{start + len(block) - 1}); labels are class ids")
            block = block.astype(np.int64, copy=False)
            if block.min(initial=0) < 0:
                raise MitosegError(f"--label {label}: holds negative values; labels are class ids >= 0")
            values.update(int(v) for v in np.unique(block))
            if len(values) > MAX_LABEL_VALUES:
                raise MitosegError(f"--label {label}: more than {MAX_LABEL_VALUES} distinct values: an image, or "
                                   "instance ids? mitoseg trains on class ids (make a mask of 0 / 1 first)")
            flat = block.reshape(len(block), -1)
            labeled.extend(start + int(i) for i in np.flatnonzero(flat.any(axis=1)))
        from mitoseg.data.metadata import voxel_size_nm

        return Inspection(tuple(int(s) for s in img.shape), str(img.dtype), str(lab.dtype), sorted(values), labeled,
                          voxel_size_nm(image))


def classes_from_values(values: list[int]) -> tuple[int, dict[int, int] | None]:
    """``num_classes`` and a ``label_map``: values 0, 1, ..., K-1 are classes as they are; any other set
    (0 / 255 masks, 0 / 2 / 5) maps its non-zero values in order to 1, 2, ..."""
    foreground = [v for v in values if v != 0]
    if foreground == list(range(1, len(foreground) + 1)):
        return max(2, len(foreground) + 1), None
    return len(foreground) + 1, {v: i + 1 for i, v in enumerate(foreground)}


def split_validation(labeled: list[int]) -> tuple[list[int], list[int]]:
    """Training and validation slices: with at least MIN_LABELED_FOR_VALIDATION labeled slices, one in five
    (at least one) is held out, spread over the volume; fewer all train."""
    if len(labeled) < MIN_LABELED_FOR_VALIDATION:
        return list(labeled), []
    count = max(1, round(len(labeled) / 5))
    picks = sorted({labeled[min(len(labeled) - 1, int((i + 0.5) * len(labeled) / count))] for i in range(count)})
    return [s for s in labeled if s not in picks], picks


def multiple_below(size: int, factor: int) -> int:
    return size // factor * factor


def detect_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _yaml(value) -> str:
    """A value in YAML flow style (JSON is YAML; strings quoted, so selections with ':' stay strings)."""
    return json.dumps(value)


def build_config_text(image: str, label: str, method: str, profile: Profile, found: Inspection,
                      image_arg: str, label_arg: str) -> tuple[str, dict]:
    """The commented YAML and a summary of what was chosen."""
    z, y, x = found.shape
    factor = size_multiple(ModelConfig(name="unet", channels=profile.channels, strides=profile.strides))
    pixel = working_pixel_size(found.voxel_nm)
    scale = pixel / found.voxel_nm[1] if pixel is not None else 1.0
    # Patches and windows are cut from the slices at the working pixel size.
    side = multiple_below(min(round(y / scale), round(x / scale)), factor)
    if side < 2 * factor:
        raise MitosegError(f"--image {image_arg}: slices of {y} x {x} pixels are too small for the U-Net "
                           f"(at least {2 * factor} x {2 * factor})")
    patch = min(profile.max_patch, side)
    roi = min(profile.roi, side)
    num_classes, label_map = classes_from_values(found.values)
    if not found.labeled:
        raise MitosegError(f"--label {label_arg}: every voxel is 0, no slice holds a label; paint the "
                           "mitochondria of a few slices (any value > 0)")
    train_slices, val_slices = split_validation(found.labeled)
    semi = method in SEMI_SUPERVISED
    unlabeled = [s for s in range(z) if s not in set(found.labeled)]
    if semi and not unlabeled:
        raise MitosegError(f"--label {label_arg}: every slice holds labels, so there are no unlabeled slices "
                           f"for --method {method}; use --method supervised")
    iterations = profile.iterations
    # Validation and checkpoints every fifth of the run; under a time budget every 500 iterations.
    interval = 500 if profile.minutes is not None else max(1, iterations // 5)
    batch = profile.batch_size if semi else 2 * profile.batch_size
    train_sel = train_slices if len(train_slices) <= 20 else format_selection(train_slices)

    lines = [
        f"# {method} on {Path(_file_part(image_arg)).name}: written by mitoseg init from the volumes below.",
        "#",
        f"# image: {image_arg} ({z} x {y} x {x}, {found.image_dtype})",
        f"# label: {label_arg} ({found.label_dtype}; values {', '.join(map(str, found.values))})",
        f"# {len(found.labeled)} of {z} slices hold labels (a slice counts as labeled when any pixel of it is",
        "# non-zero; paint every mitochondrion of a slice you label, its unpainted pixels are background).",
        "# Every key is documented in docs/configuration.md; change any, or override it with --set KEY=VALUE.",
        "# Train: mitoseg train --config THIS_FILE",
        "seed: 0",
        f"device: {profile.device}  # auto: CUDA when available; cpu; cuda; cuda:N",
        "data:",
        "  train:",
        f"    image: {_yaml(image)}",
        f"    label: {_yaml(label)}",
        f"    slices: {_yaml(train_sel)}  # the labeled slices that train"
        + ("" if val_slices else " (all of them: too few to hold one out for validation)"),
    ]
    if val_slices:
        lines += [
            f"  val:  # {len(val_slices)} labeled slice(s) held out: validation scores and best.pt come from them",
            f"    image: {_yaml(image)}",
            f"    label: {_yaml(label)}",
            f"    slices: {_yaml(val_slices)}",
        ]
    else:
        lines += [f"  # val: no validation slice (fewer than {MIN_LABELED_FOR_VALIDATION} labeled slices): "
                  "best.pt is the final model.", "  #   Label more slices, or add {image, label, slices} here."]
    if semi:
        lines += [
            f"  unlabeled:  # the {len(unlabeled)} slices without labels (the labeled ones are not repeated here)",
            f"    - image: {_yaml(image)}",
            f"      slices: {_yaml(format_selection(unlabeled))}",
        ]
    if found.voxel_nm is None:
        lines.append("  pixel_size: null  # the image's pixel size is unknown: train at its own grid (set it, e.g. 10, "
                     "with data.train.voxel_size: [z, y, x] in nm, to train coarser)")
    elif pixel is None:
        lines.append(f"  pixel_size: null  # {found.voxel_nm[1]:g} nm per pixel is coarse enough: train at the "
                     "volume's own grid")
    else:
        lines.append(f"  pixel_size: {pixel:g}  # nm per pixel the model works at: the {found.voxel_nm[1]:g} nm "
                     f"volume is resampled to it (more context per window for the same FLOPs); null: its own grid")
    lines.append(f"  num_classes: {num_classes}  # background + {num_classes - 1} class(es)")
    if label_map is not None:
        what = "0 / 255 masks: 255 is mitochondrion" if found.values == [0, 255] else "label values -> class ids"
        mapping = ", ".join(f"{raw}: {cls}" for raw, cls in label_map.items())
        lines.append(f"  label_map: {{{mapping}}}  # {what}")
    lines += [
        f"  patch_size: [{patch}, {patch}]  # training patch (y, x): at most {profile.max_patch} on "
        f"{'a GPU' if profile.device == 'cuda' else 'the CPU'}, a multiple of {factor} (the U-Net's strides)",
        f"  batch_size: {batch}",
    ]
    if semi:
        lines.append(f"  unlabeled_batch_size: {batch}")
    lines += [
        "  foreground_sampling: 0.5  # share of patches centred on a labeled mitochondrion",
        "  normalize: {mode: percentile, lower: 1, upper: 99}",
        "model:",
        "  name: unet",
        f"  channels: {_yaml(profile.channels)}"
        + ("  # a GPU-sized U-Net" if profile.device == "cuda" else "  # a CPU-sized U-Net (the sample configs')"),
        f"  strides: {_yaml(profile.strides)}",
        "  num_res_units: 2",
        "  feature_channels: 32",
        "  head_channels: 32",
        "method:",
        f"  name: {method}",
    ]
    if semi:
        from mitoseg.config import SEMI_SUPERVISED_SAFEGUARDS as safe

        lines += [f"  warmup: {safe['warmup']}  # the first {safe['warmup']:.0%} of the schedule trains on the "
                  "labeled slices alone (BENCHMARKS.md: a semi-supervised default must never lose to that)",
                  f"  guard_tolerance: {safe['guard_tolerance']}  # down-weight the unlabeled loss when the "
                  "pseudo-labels' foreground share drifts from the labels' by more than this ratio"]
    if method in ("ddfp", "daw_ddfp"):
        start = 250 if profile.minutes is not None else iterations // 4
        lines += ["  ddfp:", f"    start_iter: {start}  # the density model (flow) trains from here; "
                             "the perturbed term from twice that"]
    lines += [
        "optim:",
        "  name: adamw",
        f"  lr: {profile.lr}",
        "  weight_decay: 0.0001",
        "train:",
    ]
    if profile.minutes is not None:
        lines += [
            f"  iterations: {iterations}  # an upper bound: the time budget below ends the run",
            f"  max_minutes: {profile.minutes:g}  # the learning-rate schedule spans this many minutes and ends "
            "at zero (more minutes: a better model, up to a point)",
        ]
    else:
        lines.append(f"  iterations: {iterations}  # --max-minutes M stops earlier with a checkpoint; --resume "
                     "continues")
    lines += [
        "  loss: dice_ce",
        "  ema_decay: 0.99",
        # Without validation slices the final weights are the model: the student's, since the EMA teacher
        # lags a short run (BENCHMARKS.md, "Safeguards on volumes like a user's": 0.13 against 0.88).
        "  eval_model: best_of  # validations score the student and the EMA teacher; best.pt keeps the better"
        if val_slices else
        "  eval_model: student  # no validation slices: the final model is the student (the EMA teacher lags a short run)",
        f"  val_every: {interval}",
        "  val_tta: false  # validations without test-time augmentation: the time goes to training",
        "  log_every: 20",
        f"  checkpoint_every: {interval}",
    ]
    if semi:
        lines.append(f"  inspect_every: {interval}  # pseudo-label inspection files (mitoseg view RUN)")
    lines += [
        "inference:",
        f"  roi_size: [{roi}, {roi}]  # sliding window of validation and mitoseg predict",
        "  overlap: 0.25",
        "  sw_batch_size: 4",
        "  tta: true  # predict and best.pt's scores average the 8 flips / quarter turns: more accurate, 8x the "
        "prediction time",
        "",
    ]
    summary = {"patch": patch, "classes": num_classes, "label_map": label_map, "train": train_slices,
               "val": val_slices, "unlabeled": unlabeled if semi else [], "iterations": iterations,
               "batch": batch, "pixel_size": pixel}
    return "\n".join(lines), summary


def init_command(image: str, label: str, method: str, device: str | None, output: str | None,
                 overwrite: bool) -> Path:
    """``mitoseg init``: inspect, write the config (validated first), print what was found and the command."""
    from mitoseg.atomic import write_text_atomic
    from mitoseg.config import config_from_dict, parse_yaml
    from mitoseg.data.factory import check_paths_exist

    if method not in METHODS:
        raise MitosegError(f"--method must be one of {', '.join(METHODS)}, got {method}")
    out = Path(output) if output else Path(f"{Path(_file_part(image)).name.split('.')[0] or 'volume'}_{method}.yaml")
    check_inputs(image, label, out, overwrite)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise MitosegError("--gpu: this machine has no CUDA GPU, and train refuses device cuda without one; "
                               "write the config on the GPU machine, or use --cpu here")
    found = inspect_volumes(image, label)
    profile = {"cpu": CPU, "cuda": GPU}[device or detect_device()]
    text, summary = build_config_text(absolute_spec(image), absolute_spec(label), method, profile, found,
                                      image, label)
    try:  # the config must load as written
        cfg = config_from_dict(parse_yaml(text))
        check_paths_exist(cfg)
    except MitosegError as exc:  # a bug here, not the user's input
        raise RuntimeError(f"mitoseg init wrote a config that does not load: {exc}") from exc
    write_text_atomic(out, text.replace("--config THIS_FILE", f"--config {out}"))
    z, y, x = found.shape
    voxel = (f", {' x '.join(f'{v:g}' for v in found.voxel_nm)} nm per voxel" if found.voxel_nm is not None
             else ", pixel size unknown")
    pixel = (f"; the model works at {summary['pixel_size']:g} nm per pixel (data.pixel_size)"
             if summary["pixel_size"] is not None else "")
    print(f"image {image}: {z} x {y} x {x}, {found.image_dtype}{voxel}{pixel}")
    classes = f"{summary['classes']} classes"
    if summary["label_map"]:
        classes += f", label_map {summary['label_map']}"
    print(f"label {label}: values {', '.join(map(str, found.values))} ({classes})")
    print(f"labeled slices: {len(found.labeled)} ({_short(found.labeled)}); training on {len(summary['train'])}"
          + (f", validation on {len(summary['val'])} ({_short(summary['val'])})" if summary["val"]
             else ", none held out for validation (fewer than 4)")
          + (f"; {len(summary['unlabeled'])} unlabeled slices" if method in SEMI_SUPERVISED else ""))
    print(f"{method} on {profile.device}: U-Net {profile.channels[0]}-{profile.channels[-1]}, patches "
          f"{summary['patch']} x {summary['patch']}, batch {summary['batch']}, "
          + (f"a {profile.minutes:g}-minute schedule" if profile.minutes is not None
             else f"{summary['iterations']} iterations"))
    run = Path("runs") / out.stem
    print(f"wrote {out}; train with:")
    print(f"  mitoseg train --config {out} --out {run}")
    return out
