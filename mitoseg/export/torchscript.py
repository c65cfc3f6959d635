"""TorchScript: the network traced with dynamic batch and spatial sizes, and the run's settings inside.

The file holds the traced network (input ``(b, c, y, x)``, or ``(b, c, z, y, x)`` for 3-D; output the class
logits at the input's size, as the PyTorch model's ``forward``) and, as the extra file ``mitoseg.json``
(``torch.jit.save(_extra_files=...)``), the run's resolved config and where the weights came from, so
``mitoseg predict --checkpoint model.pt`` normalises, adds the 2.5-D context, windows, augments (TTA) and
post-processes as the run's own checkpoint would. A TorchScript file runs TorchScript operations only: loading
one executes no Python code from it.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from mitoseg.atomic import write_atomic
from mitoseg.errors import MitosegError
from mitoseg.export.source import (METADATA_FORMAT, METADATA_NAME, METADATA_VERSION, ExportSource, check_equal,
                                   metadata_json)

TOLERANCE = 1e-4


class Probabilities(nn.Module):
    """A network followed by the softmax over its classes (the bioimage.io package's output)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(x), dim=1)


class Forward(nn.Module):
    """``model(x)`` only: tracing sees the plain forward pass, not the methods' keyword options."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def trace(source: ExportSource, probabilities: bool = False) -> torch.jit.ScriptModule:
    """The network traced on a random input, then checked on another batch and spatial size against the
    PyTorch model (within 1e-4): a size the trace baked in would show up as a wrong shape or values."""
    import warnings

    module = Probabilities(source.model) if probabilities else Forward(source.model)
    module.eval()
    first, second = source.example_sizes()
    example = source.example_input(first)
    with torch.no_grad(), warnings.catch_warnings():
        # Python conditions on tensor shapes (e.g. "resize only when the sizes differ") are recorded as taken;
        # the check below is what proves the trace right at other sizes. PyTorch 2.13 calls TorchScript
        # deprecated (and still runs it): not the user's concern.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        check = source.example_input(second, batch=2, seed=1)
        check_equal("TorchScript", traced(check), module(check), TOLERANCE)
    return traced


def save_torchscript(traced: torch.jit.ScriptModule, path: str | os.PathLike, metadata: dict) -> None:
    """``torch.jit.save`` with ``mitoseg.json`` as an extra file, written atomically."""
    import warnings

    extra = {METADATA_NAME: metadata_json(metadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "torch.jit.save is deprecated" (PyTorch 2.13)
        write_atomic(Path(path), lambda handle: torch.jit.save(traced, handle, _extra_files=extra))


def export_torchscript(source: ExportSource, output: Path) -> dict:
    traced = trace(source)
    metadata = source.metadata(output="logits")
    save_torchscript(traced, output, metadata)
    return metadata


# ---------------------------------------------------------------------------- reading it back


def is_torchscript_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding ``constants.pkl`` and ``code/``), as
    ``torch.load`` tells them apart; a mitoseg checkpoint is a zip without them."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in names) and \
        any("/code/" in name or name.startswith("code/") for name in names)


class TorchScriptSegmenter(nn.Module):
    """An exported TorchScript network as the predictor sees a run's model (``spatial_dims``, logits)."""

    def __init__(self, module: torch.jit.ScriptModule, spatial_dims: int, num_classes: int):
        super().__init__()
        self.module = module
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def read_metadata(path: str | os.PathLike, map_location="cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """The TorchScript module of ``path`` and its ``mitoseg.json``; one-line errors for a file that is not a
    mitoseg export."""
    import warnings

    extra = {METADATA_NAME: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "torch.jit.load is deprecated" (PyTorch 2.13)
            module = torch.jit.load(os.fspath(path), map_location=map_location, _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError for damaged archives
        raise MitosegError(f"{path}: a TorchScript file that cannot be loaded (damaged or from an incompatible "
                           f"PyTorch): {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") \
            from exc
    text = extra[METADATA_NAME]
    if not text:
        raise MitosegError(f"{path}: a TorchScript file without mitoseg's settings ({METADATA_NAME}); only files "
                           "written by mitoseg export --format torchscript can be used")
    try:
        metadata = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MitosegError(f"{path}: its {METADATA_NAME} is not valid JSON") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != METADATA_FORMAT or \
            not isinstance(metadata.get("config"), dict):
        raise MitosegError(f"{path}: its {METADATA_NAME} is not a mitoseg export's")
    if metadata.get("format_version", 0) > METADATA_VERSION:
        raise MitosegError(f"{path}: written by a newer mitoseg ({metadata.get('mitoseg_version')}); please upgrade")
    if metadata.get("output") != "logits":
        raise MitosegError(f"{path}: this TorchScript file outputs {metadata.get('output')}, not the logits mitoseg "
                           "predict needs (export it with mitoseg export --format torchscript)")
    return module, metadata


def load_torchscript_model(path: str | os.PathLike, weights: str | None = None, device="cpu"):
    """(model, config) of an exported TorchScript file, like ``model_from_checkpoint`` of a run's checkpoint:
    the model in eval mode on ``device``, the run's config as it was exported."""
    model, cfg, _ = load_torchscript(path, weights, device)
    return model, cfg


def load_torchscript(path: str | os.PathLike, weights: str | None = None, device="cpu"):
    """(model, config, metadata) of an exported TorchScript file: :func:`load_torchscript_model` with its
    ``mitoseg.json`` (weights, iteration, the model's ``pixel_size_nm``)."""
    from mitoseg.config import config_from_dict

    module, metadata = read_metadata(path, map_location=device)
    if weights is not None and weights != metadata.get("weights"):
        raise MitosegError(f"{path}: this TorchScript file holds the {metadata.get('weights')} weights only "
                           f"(--weights {weights} asked for the other ones; export them with --weights {weights})")
    try:
        cfg = config_from_dict(metadata["config"])
    except MitosegError as exc:
        raise MitosegError(f"{path}: the config stored in the TorchScript file is invalid: {exc}") from exc
    model = TorchScriptSegmenter(module, cfg.model.spatial_dims, cfg.data.num_classes)
    return model.to(device).eval(), cfg, metadata
