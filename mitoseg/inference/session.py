"""Load a model, normalise a volume, build the predictor: the one path every prediction takes.

``mitoseg predict`` (in-process and its ``--dask`` workers), ``mitoseg evaluate --checkpoint`` and
``data.test`` (:mod:`mitoseg.inference.evaluation`), the napari Predict widget and the Train widget's
predictions all call :func:`load_model` (a run's checkpoint or a TorchScript file of ``mitoseg export``
-> network, config, device, the model's working pixel size), :func:`volume_normalization` (the volume's
intensity statistics, from a subsample of the volume at its own grid, as training computes them) and
:func:`make_predictor` (a :class:`~mitoseg.inference.VolumePredictor` resampling the input to the model's
pixel size: :func:`input_scale`). Nothing here imports the training loop (``mitoseg.engine.trainer``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from mitoseg.data.resample import PixelSize, is_identity, parse_pixel_size
from mitoseg.data.transforms import Normalization, compute_normalization, sample_for_stats
from mitoseg.device import resolve_device
from mitoseg.networks.loading import load_torchscript, model_from_state
from mitoseg.runs import is_torchscript_file, load_checkpoint, validated_weights


@dataclass
class LoadedModel:
    """A trained network ready to predict (eval mode, on ``device``) with its run's config."""

    model: torch.nn.Module
    cfg: object  # mitoseg.config.Config
    device: torch.device
    path: Path
    weights: str | None  # "ema" / "student" (None: unknown)
    iteration: int
    pixel: PixelSize  # the model's working pixel size


def recorded_pixel_size(record: dict, cfg) -> PixelSize:
    """The model's working pixel size as a checkpoint or an export's ``mitoseg.json`` records it:
    ``pixel_size_nm`` (the resolved nm, when the training volume's pixel size was known) and the config's
    ``data.pixel_size`` (a number: nm; ``"2x"``: a factor of the input's own pixel size)."""
    configured = parse_pixel_size(getattr(cfg.data, "pixel_size", None))
    nm = record.get("pixel_size_nm")
    nm = float(nm) if isinstance(nm, (int, float)) and nm > 0 else configured.nm
    return PixelSize(nm=nm, factor=configured.factor)


def as_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


def load_model(path: str | Path, weights: str | None = None, device: str | torch.device = "auto") -> LoadedModel:
    """A run's checkpoint (``torch.load(weights_only=True)``; ``weights`` None: those its run validated) or a
    TorchScript file of ``mitoseg export`` (recognised by its archive), on ``device`` (``auto``, ``cpu``,
    ``cuda:N`` or a torch device)."""
    torch_device = as_device(device)
    if is_torchscript_file(path):
        model, cfg, metadata = load_torchscript(path, weights, torch_device)
        return LoadedModel(model, cfg, torch_device, Path(path), metadata.get("weights"),
                           int(metadata.get("iteration") or 0), recorded_pixel_size(metadata, cfg))
    return from_state(load_checkpoint(path), path, weights, torch_device)


def from_state(state: dict, path: str | Path, weights: str | None = None,
               device: str | torch.device = "cpu") -> LoadedModel:
    """:func:`load_model` of a checkpoint already read with :func:`mitoseg.runs.load_checkpoint`."""
    torch_device = as_device(device)
    weights = weights or validated_weights(state)
    model, cfg = model_from_state(state, path, weights, torch_device)
    return LoadedModel(model, cfg, torch_device, Path(path), weights, int(state.get("iteration", 0) or 0),
                       recorded_pixel_size(state, cfg))


def volume_normalization(volume, cfg, what: str = "volume") -> Normalization:
    """The intensity mapping of ``volume`` (a reader's volume or an array (z, y, x)) under ``cfg.data.normalize``:
    statistics of a strided subsample at the volume's own grid, as training computes them."""
    return compute_normalization(sample_for_stats(volume), cfg.data.normalize, what=what)


def input_scale(pixel: PixelSize, volume_nm: float | None, what: str, hint: str, log: bool = True) -> float:
    """The factor a volume of ``volume_nm`` nm per pixel (None: unknown) is resampled by for a model working at
    ``pixel`` (1.0: its own grid), said in one line on stderr when it is not 1."""
    factor = pixel.scale_for(volume_nm, what, hint)
    if log and not is_identity(factor):
        if volume_nm is not None:
            target = volume_nm * factor
            print(f"mitoseg: rescaling the input {volume_nm:g} nm -> {target:g} nm per pixel (factor {factor:.2f})",
                  file=sys.stderr, flush=True)
        else:
            print(f"mitoseg: rescaling the input by the model's data.pixel_size {pixel.factor:g}x (factor "
                  f"{factor:.2f}; the input's pixel size is unknown)", file=sys.stderr, flush=True)
    return factor


def make_predictor(loaded: LoadedModel, cfg=None, scale: float = 1.0, amp: bool | None = None):
    """The :class:`~mitoseg.inference.VolumePredictor` of ``loaded`` under ``cfg`` (default: the run's), its
    input resampled by ``scale`` (:func:`input_scale`)."""
    from mitoseg.inference.predictor import VolumePredictor

    return VolumePredictor(loaded.model, cfg if cfg is not None else loaded.cfg, loaded.device, amp, scale=scale)


@dataclass
class PreparedVolume:
    """A volume ready to predict: its slices read with the run's 2.5-D context (``read(start, stop)``), its
    normalization, and the predictor resampling it to the model's pixel size."""

    predictor: object  # VolumePredictor
    read: object  # (start, stop) -> slices (n, y, x) or (n, C, y, x)
    num_slices: int
    normalization: Normalization

    def slabs(self):
        """(start, stop, probabilities) slab by slab."""
        return self.predictor.slabs(self.read, self.num_slices, self.normalization)


class Segmenter:
    """A trained model (a run's checkpoint or a TorchScript export) ready to segment volumes: the one path of
    ``mitoseg predict``, ``evaluate --checkpoint``, ``data.test``, the Dask workers and the napari widgets.
    ``cfg``: the run's config (default) or one that changes its inference settings."""

    def __init__(self, loaded: LoadedModel, cfg=None):
        self.loaded = loaded
        self.cfg = cfg if cfg is not None else loaded.cfg

    @classmethod
    def from_file(cls, path: str | Path, weights: str | None = None, device: str | torch.device = "auto"):
        return cls(load_model(path, weights, device))

    def predictor(self, scale: float = 1.0, amp: bool | None = None):
        """The :class:`~mitoseg.inference.VolumePredictor` for an input resampled by ``scale``."""
        return make_predictor(self.loaded, self.cfg, scale=scale, amp=amp)

    def prepare(self, volume, what: str, volume_nm: float | None = None, hint: str = "", indices=None,
                normalization: Normalization | None = None, log: bool = True) -> PreparedVolume:
        """``volume`` (a reader's :class:`~mitoseg.data.readers.Volume`, or anything with its ``read(start, stop)``,
        ``read_slices`` and ``len``) ready to predict: the factor its pixel size
        ``volume_nm`` (None: unknown) is resampled by (said on stderr with ``log``; ``what`` / ``hint`` name the
        volume and where its pixel size is set in errors), its normalization (computed unless given), the slices
        ``indices`` (None: all) with the run's 2.5-D context."""
        from mitoseg.data.readers import SliceReader

        scale = input_scale(self.loaded.pixel, volume_nm, what, hint, log=log)
        if normalization is None:
            normalization = volume_normalization(volume, self.cfg, what=what)
        reader = SliceReader(volume, indices, self.cfg.data.context_slices)
        return PreparedVolume(self.predictor(scale), reader.read, len(reader), normalization)
