"""bioimage.io model package (spec 0.5) of an EM run: weights, tensors, normalisation, cover, README, citations.

What the package holds (one zip, or a folder when ``--output`` does not end in ``.zip``):

- ``rdf.yaml``: the description. Input ``raw``: ``(batch, channel, y, x)`` (3-D models ``(batch, channel, z,
  y, x)``), float32 raw intensities, the channels the 2.5-D context (``2k + 1`` neighbouring slices, centre in
  the middle); spatial sizes ``min + n * step`` with step the network's down-sampling factor. Output
  ``probabilities``: the class probabilities (softmax) at the input's size, one channel per class.
- Preprocessing, the run's ``data.normalize``: mitoseg normalises each *volume* at prediction time with its own
  statistics, so the package does the same per *sample*: ``scale_range`` with the run's percentiles
  (``(x - p_lower) / (p_upper - p_lower + 1e-6)``) or ``zero_mean_unit_variance`` (``meanstd``), computed
  over each sample's channels and space (a slice with its context, or a 3-D block). These are per-sample
  statistics, the kind every bioimage.io consumer computes itself; data-set statistics (``batch`` among the
  axes) would be accumulated over samples or needed beforehand. On an EM volume of one kind of tissue a
  slice's percentiles are close to the volume's, which ``mitoseg predict`` uses (estimated from a strided
  subsample of at most 8 M voxels); on a slice with little tissue they differ, and so may the result.
- Weights: ``pytorch_state_dict`` (U-Nets: the standalone ``mitoseg_unet.py``, PyTorch + MONAI only;
  DeepLabV3+: ``mitoseg.export.library`` from an installed mitoseg), ``torchscript`` (the network and softmax,
  traced; also carries ``mitoseg.json``) and ``onnx``; the last two are checked against PyTorch when written.
- Test tensors: a slice (2-D; with its context) or a block of slices (3-D) from the centre of the run's
  validation volume (``data.val``), at most 256 pixels a side; when that file is not there, of the synthetic
  sample volume (``mitoseg sample-data``, seed 0; the README says which). The expected output is the network's
  on the normalised input.
- ``cover.png`` (the test input beside its prediction), ``README.md`` (the run: method, network, data,
  normalisation, the scores of ``summary.json`` next to the checkpoint, how to use the package, what it leaves
  out), citations of DAW and DDFP, and ``config.mitoseg`` with the run's whole resolved config.

The package is checked when written: its description is validated by bioimageio.spec and bioimageio.core's
``test_model`` runs every weights format on the test tensors and on the parametrized sizes; a failure is an
error and nothing is written. Nothing is fetched from the web: the citation URL of DAW (no DOI exists) is not
requested while mitoseg validates.
"""

from __future__ import annotations

import contextlib
import gc
import getpass
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from mitoseg.atomic import make_folder, remove_path, remove_stale_temporaries, replace_path, temporary_path
from mitoseg.errors import MitosegError
from mitoseg.export.source import ExportSource, metadata_json
from mitoseg.runs import SUMMARY

TEST_SIDE = 256  # the test tensors' largest y / x size
EPS = 1e-6  # bioimage.io's default eps of scale_range / zero_mean_unit_variance
INPUT_ID = "raw"
OUTPUT_ID = "probabilities"

DAW_URL = "https://github.com/yuisuen/DAW"
CITATIONS = [
    {"text": "Sun et al. DAW: Exploring the Better Weighting Function for Semi-supervised Semantic Segmentation. "
             "Advances in Neural Information Processing Systems 36 (NeurIPS 2023). Distribution-aware weighting "
             "(DAW) of pseudo-labels, one of mitoseg's semi-supervised methods.",
     "url": DAW_URL},
    {"text": "Wang X., Bai H., Yu L., Zhao Y., Xiao J. Towards the Uncharted: Density-Descending Feature "
             "Perturbation for Semi-supervised Semantic Segmentation. CVPR 2024, pp. 3303-3312. "
             "Density-descending feature perturbation (DDFP), one of mitoseg's semi-supervised methods.",
     "doi": "10.48550/arXiv.2403.06462"},
]

ENVIRONMENT = """\
# Conda environment of the pytorch_state_dict weights ({architecture}).
name: mitoseg-model
channels:
  - conda-forge
  - nodefaults
dependencies:
  - python >=3.9
  - pytorch >=2.3
  - pip
  - pip:
      - monai >=1.3
{extra}"""


def _need_bioimageio():
    try:
        import bioimageio.core  # noqa: F401
        import bioimageio.spec  # noqa: F401
    except ImportError as exc:
        raise MitosegError("mitoseg export --format bioimageio needs bioimageio.core: pip install \"mitoseg[export]\" "
                           "(in a clone: pip install -e \".[export]\")") \
            from exc


@contextlib.contextmanager
def _quiet_bioimageio():
    """bioimageio.spec / .core log through loguru on stderr; mitoseg reports the outcome itself."""
    from loguru import logger

    logger.disable("bioimageio")
    try:
        yield
    finally:
        logger.enable("bioimageio")


# ---------------------------------------------------------------------------- test tensors


class _ArrayVolume:
    """A (z, y, x) array with the reading methods of :class:`~mitoseg.data.readers.Volume`."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.shape = array.shape

    def __len__(self) -> int:
        return self.array.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]

    def read_slices(self, indices) -> np.ndarray:
        return self.array[np.asarray(indices, dtype=np.int64)]


def _file_exists(spec: str) -> bool:
    from mitoseg.data.readers import split_spec

    return Path(split_spec(spec)[0]).exists()


def _centre_crop(size: int, step: int, limit: int, what: str) -> slice:
    side = min(size, limit) // step * step
    if side < step:
        raise MitosegError(f"{what} is {size} pixels, smaller than the network's step of {step}: too small for a "
                           "test tensor")
    start = (size - side) // 2
    return slice(start, start + side)


def _read_input(source: ExportSource, volume, indices: list[int], what: str, factor: float = 1.0) -> np.ndarray:
    """(1, C, y, x) or (1, 1, z, y, x) raw intensities (float32) from the centre of ``indices``, resampled in
    y-x by ``factor`` to the model's working pixel size (the package's input is at that pixel size)."""
    from mitoseg.data.readers import SliceReader
    from mitoseg.data.resample import reduce_image

    cfg, step = source.cfg, source.size_step
    if not indices:
        raise MitosegError(f"{what}: no slices selected for a test tensor")
    if source.spatial_dims == 3:
        depth = min(len(volume), max(cfg.inference.roi_size[0], step)) // step * step
        if depth < step:
            raise MitosegError(f"{what} has {len(volume)} slices, fewer than the 3-D network's step of {step}")
        centre = indices[len(indices) // 2]
        start = min(max(0, centre - depth // 2), len(volume) - depth)
        block = np.asarray(volume.read(start, start + depth))  # (z, y, x)
        array = block[None, None]
    else:
        centre = indices[len(indices) // 2]
        stack = np.asarray(SliceReader(volume, [centre], cfg.data.context_slices).read(0, 1))
        array = stack[:, None] if stack.ndim == 3 else stack  # (1, C, y, x)
    array = reduce_image(array[0], factor)[None]  # the leading axes (channels, or z of a 3-D block) kept
    y = _centre_crop(array.shape[-2], step, TEST_SIDE, f"{what} (y)")
    x = _centre_crop(array.shape[-1], step, TEST_SIDE, f"{what} (x)")
    array = np.ascontiguousarray(array[..., y, x], dtype=np.float32)
    if not np.isfinite(array).all():
        raise MitosegError(f"{what}: the test tensor holds NaN or inf values")
    return array


def run_test_input(source: ExportSource) -> tuple[np.ndarray, str]:
    """The raw test input and a sentence on where it comes from: the run's validation volume (``data.val``)
    when its file exists, else the synthetic sample volume."""
    from mitoseg.data.readers import open_volume, select_slices
    from mitoseg.data.resample import volume_pixel_nm
    from mitoseg.inference.session import recorded_pixel_size

    val = source.cfg.data.val
    if val is not None and val.image and _file_exists(val.image):
        pixel = recorded_pixel_size(source.state, source.cfg)
        factor = 1.0 if pixel.native else pixel.scale_for(volume_pixel_nm(val.image, val.voxel_size), val.image,
                                                          "data.val.voxel_size")
        with open_volume(val.image, finite=True) as volume:
            indices = select_slices(val.slices, len(volume), "data.val.slices")
            array = _read_input(source, volume, indices, val.image, factor)
        where = indices[len(indices) // 2]
        kind = "a block of slices around slice" if source.spatial_dims == 3 else "slice"
        return array, f"the run's validation volume `{val.image}` ({kind} {where}, centre crop)"
    from mitoseg.data.synthetic import make_em_volume

    depth = max(16, 2 * source.size_step) if source.spatial_dims == 3 else 16
    image, _ = make_em_volume((depth, TEST_SIDE, TEST_SIDE), seed=0)
    array = _read_input(source, _ArrayVolume(image), list(range(depth)), "the synthetic sample volume")
    reason = "the run has no data.val" if val is None or not val.image else f"{val.image} is not on this machine"
    return array, (f"the synthetic sample volume of `mitoseg sample-data` (seed 0; {reason}), "
                   f"{'a block of slices' if source.spatial_dims == 3 else 'its middle slice'}")


def normalize_sample(source: ExportSource, array: np.ndarray) -> np.ndarray:
    """The package's preprocessing, as bioimage.io computes it: statistics over the whole sample."""
    norm = source.cfg.data.normalize
    out = np.empty(array.shape, np.float32)
    for i, sample in enumerate(array.astype(np.float64)):  # each sample (batch entry) on its own
        if norm.mode == "percentile":
            low, high = np.percentile(sample, [norm.lower, norm.upper])
            out[i] = (sample - low) / (high - low + EPS)
        else:
            out[i] = (sample - sample.mean()) / (sample.std() + EPS)
    return out


def expected_output(source: ExportSource, raw: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = source.model(torch.from_numpy(normalize_sample(source, raw)))
        return torch.softmax(logits.float(), dim=1).numpy().astype(np.float32)


# ---------------------------------------------------------------------------- cover and README


def _grey(plane: np.ndarray) -> np.ndarray:
    low, high = np.percentile(plane, [1, 99])
    return (np.clip((plane - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)


PALETTE = np.array([[255, 0, 255], [0, 220, 0], [0, 160, 255], [255, 200, 0], [255, 80, 80], [0, 230, 230]], np.float32)


def cover_image(source: ExportSource, raw: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """(h, 2w, 3) uint8: the test input's (middle) plane, and the same with each foreground class tinted where
    it is predicted (magenta for the mitochondria of a two-class model), at least 256 pixels high."""
    if source.spatial_dims == 3:
        middle = raw.shape[2] // 2
        plane, probs = raw[0, 0, middle], probabilities[0, :, middle]
    else:
        plane, probs = raw[0, raw.shape[1] // 2], probabilities[0]
    grey = np.repeat(_grey(plane)[..., None], 3, axis=2).astype(np.float32)
    labels = probs.argmax(0)
    tinted = grey.copy()
    for k in range(1, probs.shape[0]):
        mask = labels == k
        tinted[mask] = 0.45 * grey[mask] + 0.55 * PALETTE[(k - 1) % len(PALETTE)]
    image = np.concatenate([grey, tinted], axis=1).astype(np.uint8)
    scale = max(1, -(-256 // image.shape[0]))
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def _read_summary(checkpoint: Path) -> dict | None:
    path = checkpoint.parent / SUMMARY
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _scores_lines(title: str, scores: dict | None) -> list[str]:
    if not isinstance(scores, dict):
        return []
    keys = [k for k in ("fg_iou", "miou", "mdice", "mean_iou", "mean_dice") if k in scores]
    keys += sorted(k for k in scores if k.startswith("iou/") and k not in keys)
    if not keys:
        return []
    return [f"| {title} | " + ", ".join(f"{k} {_number(scores[k])}" for k in keys) + " |"]


def readme_text(source: ExportSource, name: str, test_origin: str, summary: dict | None,
                formats: list[str]) -> str:
    cfg = source.cfg
    model = cfg.model
    norm = cfg.data.normalize
    if norm.mode == "percentile":
        normalisation = (f"percentiles {norm.lower:g} and {norm.upper:g} of the intensities mapped to 0 and 1 "
                         f"(`scale_range`: `(x - p{norm.lower:g}) / (p{norm.upper:g} - p{norm.lower:g} + 1e-6)`)")
    else:
        normalisation = "zero mean and unit variance (`zero_mean_unit_variance`: `(x - mean) / (std + 1e-6)`)"
    if model.name == "unet":
        network = (f"{model.spatial_dims}-D residual U-Net (MONAI `UNet`: channels {model.channels}, strides "
                   f"{model.strides}, {model.num_res_units} residual units, {model.norm} norm) and a "
                   f"{model.head_channels}-channel 3x3 head")
    elif model.name == "wide_unet":
        network = (f"2-D U-Net for the CPU (mitoseg `wide_unet`: a {model.stem}x{model.stem} space-to-depth stem, "
                   f"levels of {model.channels} channels with {model.num_res_units} residual blocks each) and a "
                   f"{model.head_channels}-channel 3x3 head")
    else:
        network = (f"DeepLabV3+ ({model.backbone}, output stride {model.output_stride}, decoder {model.decoder}, "
                   f"width {model.width})")
    context = cfg.data.context_slices
    axes = "(batch, channel, z, y, x)" if source.spatial_dims == 3 else "(batch, channel, y, x)"
    channel_text = (f"the slice with its {context} neighbouring slice(s) on each side of the volume (reflected at the "
                    f"volume's ends), {2 * context + 1} channels, the slice to segment in the middle"
                    if context else "one channel: the EM intensities")
    lines = [
        f"# {name}",
        "",
        f"Semantic segmentation of mitochondria in electron-microscopy volumes, trained with mitoseg (the "
        f"`{cfg.method.name}` method).",
        "",
        "## Model",
        "",
        f"- Network: {network}; {source.num_classes} classes; {source.in_channels} input channel(s).",
        f"- Input `{INPUT_ID}`: {axes}, float32 raw intensities; {channel_text}. Each spatial size is "
        f"`{source.size_step} * n` (at least {source.size_step}).",
        f"- Preprocessing: the run's normalisation (`data.normalize`), {normalisation}, with the statistics of "
        "each sample (its channels and space). `mitoseg predict` normalises a whole volume with the volume's "
        "statistics (from up to 8 M of its voxels); on a volume of one kind of tissue a slice's are close to "
        "them, on a slice with little tissue they differ, and so may the result.",
        f"- Output `{OUTPUT_ID}`: the class probabilities (softmax), {axes} with one channel per class, at the "
        "input's size.",
        f"- Weights: {', '.join(formats)}; the {source.weights} weights of `{source.checkpoint.name}` (iteration "
        f"{source.state.get('iteration')}).",
        "",
        "What the package does not do that `mitoseg predict` does: sliding windows with Gaussian blending "
        f"(`inference.roi_size` {cfg.inference.roi_size}, overlap {cfg.inference.overlap}), test-time "
        f"augmentation (`inference.tta` {str(cfg.inference.tta).lower()}), and the 3-D post-processing "
        f"(`inference.min_object_voxels` {cfg.inference.min_object_voxels}, `inference.fill_holes` "
        f"{str(cfg.inference.fill_holes).lower()}). The class of a pixel is the argmax of the probabilities.",
        "",
        "## Training",
        "",
        f"- Method: `{cfg.method.name}`; {cfg.train.iterations} iterations planned, batch {cfg.data.batch_size}, "
        f"patches {cfg.data.patch_size}, optimizer {cfg.optim.name} (lr {cfg.optim.lr:g}, {cfg.optim.schedule} "
        f"schedule), loss `{cfg.train.loss}`.",
        f"- Training volume: `{cfg.data.train.image}` (labeled slices: "
        f"{'all' if cfg.data.train.slices is None else cfg.data.train.slices}).",
        f"- Validation volume: `{cfg.data.val.image}`." if cfg.data.val is not None else "- No validation volume.",
    ]
    lines += ["", "## Validation", ""]
    if summary is None:
        lines.append("The run's `summary.json` was not found next to the checkpoint (an interrupted run?): no "
                     "scores to report.")
    else:
        best = summary.get("best") or {}
        lines.append(f"From the run's `summary.json`: {summary.get('iterations')} of "
                     f"{summary.get('total_iterations')} iterations in {_number(summary.get('wall_time_s'))} s on "
                     f"`{summary.get('device')}`"
                     + (f"; best {best.get('metric')} {_number(best.get('value'))} at iteration "
                        f"{best.get('iteration')}" if best else "") + ".")
        table = (_scores_lines("best (validation)", best.get("scores"))
                 + _scores_lines("final (validation)", summary.get("final"))
                 + _scores_lines("test (best.pt)", summary.get("test")))
        if table:
            lines += ["", "| scores | values |", "| --- | --- |", *table]
    lines += [
        "",
        f"The test tensors come from {test_origin}; the expected output is the network's on that input after "
        "the preprocessing above.",
        "",
        "## Use",
        "",
        "Any bioimage.io consumer (bioimageio.core, ilastik, deepImageJ, ...); in Python:",
        "",
        "```python",
        "from bioimageio.core import load_model_description, predict",
        "model = load_model_description('this_package.zip')",
        "sample = predict(model=model, inputs={'raw': image})  # image: " + axes,
        "```",
        "",
        "The TorchScript weights here output probabilities; `mitoseg predict` takes the file of `mitoseg export "
        "--format torchscript` instead (logits, with the run's settings inside).",
        "",
        "## Citations",
        "",
        "- " + CITATIONS[0]["text"] + f" Code: {DAW_URL}",
        "- " + CITATIONS[1]["text"] + f" doi:{CITATIONS[1]['doi']}",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the description


def _axes(source: ExportSource, output: bool) -> list[dict]:
    cfg = source.cfg
    k = cfg.data.context_slices
    if output:
        names = ["background", "mitochondrion"] if source.num_classes == 2 else \
            [f"class_{i}" for i in range(source.num_classes)]
        channel = {"type": "channel", "channel_names": names}
    elif k:
        names = [f"slice_minus_{-i}" if i < 0 else ("slice" if i == 0 else f"slice_plus_{i}") for i in range(-k, k + 1)]
        channel = {"type": "channel", "channel_names": names}
    else:
        channel = {"type": "channel", "channel_names": ["em"]}
    spatial = ["z", "y", "x"] if source.spatial_dims == 3 else ["y", "x"]
    axes = [{"type": "batch"}, channel]
    pixel_nm = source.pixel_size_nm  # the model's working pixel size (data.pixel_size): the y / x axes' scale
    for axis in spatial:
        if output:
            size = {"tensor_id": INPUT_ID, "axis_id": axis}
        else:
            size = {"min": source.size_step, "step": source.size_step}
        entry = {"type": "space", "id": axis, "size": size}
        if pixel_nm is not None and axis in ("y", "x"):
            entry.update(scale=float(pixel_nm), unit="nanometer")
        axes.append(entry)
    return axes


def _preprocessing(source: ExportSource) -> list[dict]:
    norm = source.cfg.data.normalize
    # Per sample (no "batch"): statistics over the channels and space of each sample; with "batch", bioimage.io
    # consumers take them for data-set statistics (accumulated over samples, or needed beforehand).
    axes = ["channel"] + (["z", "y", "x"] if source.spatial_dims == 3 else ["y", "x"])
    if norm.mode == "percentile":
        if norm.upper <= 1:
            raise MitosegError(f"data.normalize.upper is {norm.upper:g}: bioimage.io's scale_range needs an upper "
                               "percentile above 1")
        return [{"id": "scale_range", "kwargs": {"axes": axes, "min_percentile": float(norm.lower),
                                                  "max_percentile": float(norm.upper), "eps": EPS}}]
    return [{"id": "zero_mean_unit_variance", "kwargs": {"axes": axes, "eps": EPS}}]


def _architecture(source: ExportSource, folder: Path) -> tuple[dict, dict, str]:
    """(architecture entry, state dict to save, dependency line) of the pytorch_state_dict weights."""
    from mitoseg.export.torchscript import Probabilities

    model = source.cfg.model
    if model.name == "unet":
        shutil.copyfile(Path(__file__).with_name("unet_architecture.py"), folder / "mitoseg_unet.py")
        kwargs = {"in_channels": source.in_channels, "num_classes": source.num_classes,
                  "channels": list(model.channels), "strides": list(model.strides),
                  "num_res_units": model.num_res_units, "feature_channels": model.feature_channels,
                  "head_channels": model.head_channels, "norm": model.norm, "dropout": float(model.dropout),
                  "spatial_dims": model.spatial_dims, "probabilities": True}
        # The head's auxiliary BatchNorm (DDFP's MixBN) only trains: the standalone network has none.
        weights = {k: v for k, v in source.model.state_dict().items() if not k.startswith("seg_head.aux_bn")}
        return ({"source": "mitoseg_unet.py", "callable": "MitosegUNet", "kwargs": kwargs}, weights, "")
    from dataclasses import asdict

    kwargs = {"model": {k: v for k, v in asdict(model).items() if k != "pretrained"},
              "num_classes": source.num_classes, "in_channels": source.in_channels}
    weights = Probabilities(source.model).state_dict()
    return ({"import_from": "mitoseg.export.library", "callable": "MitosegNetwork", "kwargs": kwargs}, weights,
            "      - mitoseg  # not on PyPI: pip install it from its repository\n")


def build_package_files(source: ExportSource, folder: Path, name: str, summary: dict | None) -> tuple[dict, dict]:
    """Write every file of the package into ``folder``; returns (the rdf as a dict, facts for the report)."""
    import imageio.v3 as iio

    from mitoseg.export.onnx_export import onnx_model_bytes, onnx_opset
    from mitoseg.export.torchscript import Probabilities, save_torchscript, trace

    raw, origin = run_test_input(source)
    expected = expected_output(source, raw)
    np.save(folder / "test_input.npy", raw)
    np.save(folder / "test_output.npy", expected)
    # The same tensors as TIFF (the sample tensors, which viewers open; FAIR asks for them).
    import tifffile

    tifffile.imwrite(folder / "sample_input.tif", raw, photometric="minisblack")
    tifffile.imwrite(folder / "sample_output.tif", expected, photometric="minisblack")
    iio.imwrite(folder / "cover.png", cover_image(source, raw, expected))

    architecture, state_dict, extra_dependency = _architecture(source, folder)
    torch.save(state_dict, folder / "weights.pt")
    torch_version = torch.__version__.split("+")[0]
    (folder / "environment.yaml").write_text(ENVIRONMENT.format(
        architecture="mitoseg_unet.py" if "source" in architecture else "mitoseg.export.library",
        extra=extra_dependency))

    metadata = source.metadata(output="probabilities")
    save_torchscript(trace(source, probabilities=True), folder / "weights_torchscript.pt", metadata)
    probabilities = Probabilities(source.model).eval()
    onnx_bytes = onnx_model_bytes(source, probabilities, metadata, OUTPUT_ID)
    (folder / "weights.onnx").write_bytes(onnx_bytes)

    formats = ["pytorch_state_dict", "torchscript", "onnx"]
    (folder / "README.md").write_text(readme_text(source, name, origin, summary, formats))

    from bioimageio.spec.model.v0_5 import ModelDescr

    cfg = source.cfg
    tags = ["mitochondria", "electron-microscopy", "semantic-segmentation", "fib-sem", "mitoseg",
            f"{source.spatial_dims}d", cfg.method.name.replace("_", "-"), "pytorch", "monai"]
    rdf = {
        "type": "model",
        "format_version": ModelDescr.implemented_format_version,
        "name": name,
        "description": (f"Mitochondria segmentation in EM volumes: a {source.spatial_dims}-D "
                        f"{'DeepLabV3+' if cfg.model.name == 'deeplabv3plus' else 'U-Net'} trained with mitoseg "
                        f"({cfg.method.name})."),
        "authors": [],
        "cite": CITATIONS,
        "license": "MIT",
        "documentation": {"source": "README.md"},
        "covers": [{"source": "cover.png"}],
        "tags": tags,
        "inputs": [{
            "id": INPUT_ID,
            "description": "raw EM intensities" + (" with neighbouring slices as channels" if cfg.data.context_slices
                                                    else ""),
            "axes": _axes(source, output=False),
            "test_tensor": {"source": "test_input.npy"},
            "sample_tensor": {"source": "sample_input.tif"},
            "data": {"type": "float32"},
            "preprocessing": _preprocessing(source),
        }],
        "outputs": [{
            "id": OUTPUT_ID,
            "description": "class probabilities (softmax over the channels)",
            "axes": _axes(source, output=True),
            "test_tensor": {"source": "test_output.npy"},
            "sample_tensor": {"source": "sample_output.tif"},
            "data": {"type": "float32", "range": [0.0, 1.0]},
        }],
        "weights": {
            "pytorch_state_dict": {"source": "weights.pt", "architecture": architecture,
                                   "pytorch_version": torch_version, "dependencies": {"source": "environment.yaml"}},
            "torchscript": {"source": "weights_torchscript.pt", "pytorch_version": torch_version,
                            "parent": "pytorch_state_dict", "comment": "traced by mitoseg export; the network and "
                                                                      "its softmax"},
            "onnx": {"source": "weights.onnx", "opset_version": onnx_opset(onnx_bytes),
                     "parent": "pytorch_state_dict", "comment": "torch.onnx.export (dynamo) by mitoseg export"},
        },
        "config": {"mitoseg": json.loads(metadata_json(metadata))},
    }
    return rdf, {"test_origin": origin, "test_shape": list(raw.shape), "formats": formats}


def _summary_error(summary) -> str:
    """The first failed check of a bioimageio validation summary, on one line."""
    for detail in summary.details:
        if detail.status == "failed":
            errors = getattr(detail, "errors", None) or []
            message = errors[0].msg if errors else ""
            loc = ".".join(str(part) for part in getattr(errors[0], "loc", ())) if errors else ""
            text = f"{detail.name}" + (f" ({loc})" if loc else "") + (f": {message}" if message else "")
            return " ".join(text.split())[:400]
    return f"status {summary.status}"


def validate_and_test(rdf: dict, folder: Path):
    """The description validated by bioimageio.spec (with its files) and tested by bioimageio.core's
    ``test_model`` (every weights format on the test tensors and on parametrized sizes)."""
    from bioimageio.core import test_model
    from bioimageio.spec import InvalidDescr, ValidationContext, build_description

    # DAW's citation URL is the only remote address: known, so validation does not request it.
    context = ValidationContext(root=folder, perform_io_checks=True, known_files={DAW_URL: None})
    with _quiet_bioimageio(), context:
        descr = build_description(rdf, context=context)
        if isinstance(descr, InvalidDescr):
            raise MitosegError(f"the bioimage.io description is invalid: {_summary_error(descr.validation_summary)}")
        # bioimageio.core runs gc.collect() after each model it unloads (ten times), each a full pass over
        # every object of this process (the torch and MONAI modules...): most of the test's time. Objects
        # that exist now are left out of those passes; the test's own are still collected.
        gc.freeze()
        try:
            summary = test_model(descr)
        finally:
            gc.unfreeze()
    if summary.status != "passed":
        raise MitosegError(f"bioimageio.core's test of the package failed: {_summary_error(summary)}")
    return descr, summary


def export_bioimageio(source: ExportSource, output: Path, name: str | None = None,
                      authors: list[str] | None = None, overwrite: bool = False) -> dict:
    """Build, validate, test and write the package at ``output`` (``.zip``: a zip file; else a folder)."""
    _need_bioimageio()
    if source.cfg.data.kind != "em":
        raise MitosegError(f"{source.checkpoint} is a {source.cfg.data.kind} model: the bioimage.io package is for EM "
                           "models (data.kind em); export it with --format torchscript or onnx")
    from bioimageio.spec import ValidationContext, save_bioimageio_package, save_bioimageio_package_as_folder

    as_zip = output.suffix.lower() == ".zip"
    run = source.checkpoint.resolve().parent.name
    name = name or f"mitoseg {source.cfg.method.name} {source.cfg.model.name} {run}"
    authors = authors or [_default_author()]
    summary = _read_summary(source.checkpoint)
    if os.path.lexists(output):
        if not overwrite:
            raise MitosegError(f"{output} exists; pass --overwrite to replace it")
        if output.is_dir() == as_zip and not output.is_symlink():
            raise MitosegError(f"{output} is a {'folder' if output.is_dir() else 'file'}; --overwrite replaces a "
                               f"package {'file' if as_zip else 'folder'} only, so move it away first")
    make_folder(output.parent, "--output")
    remove_stale_temporaries(output)
    work = temporary_path(output)
    remove_path(work)
    try:
        files = work / "files"
        files.mkdir(parents=True)
        rdf, facts = build_package_files(source, files, name, summary)
        rdf["authors"] = [{"name": author} for author in authors]
        descr, test_summary = validate_and_test(rdf, files)
        with _quiet_bioimageio(), ValidationContext(perform_io_checks=False):
            if as_zip:
                built = Path(save_bioimageio_package(descr, output_path=work / "package.zip"))
            else:
                built = Path(save_bioimageio_package_as_folder(descr, output_path=work / "package"))
        replace_path(built, output)  # a previous folder package is swapped out in one step, then deleted
    finally:
        remove_path(work)
    facts.update({"name": name, "authors": authors,
                  "tests": [d.name for d in test_summary.details if d.status == "passed"]})
    return facts


def _default_author() -> str:
    try:
        return getpass.getuser() or "unknown"
    except Exception:  # no login name (e.g. a container without a passwd entry)
        return "unknown"
