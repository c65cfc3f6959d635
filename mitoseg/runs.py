"""A run folder and the files that carry a model: their names, and how a checkpoint or an exported
TorchScript file is read (without executing code from it).

On the ground floor: training writes these files, and prediction, export, the CLI and the napari plugin read
them, so their names and their reading live in one place below all of them. Nothing here imports torch at
module level: the CLI names run files before it decides whether torch is needed at all.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path

from mitoseg.errors import MitosegError

# ---------------------------------------------------------------------------- a run folder's layout

LAST = "last.pt"  # the latest state, for --resume (train.checkpoint_every, the end, Ctrl-C)
BEST = "best.pt"  # the best validation score (train.eval_model's weights)
METRICS = "metrics.jsonl"  # one JSON object per log / validation step
SUMMARY = "summary.json"  # written when the run ends
CONFIG = "config.json"  # the run's resolved config
TENSORBOARD = "tb"  # TensorBoard event files
INSPECT = "inspect"  # the pseudo-label inspection files (iter_NNNNNN.npz / .json)

# What a training run writes into its folder: `train --overwrite` removes exactly these, nothing else.
RUN_FILES = (LAST, BEST, METRICS, SUMMARY, CONFIG)
RUN_DIRS = (TENSORBOARD, INSPECT)
# Any of these marks a folder as a run's (the napari reader, `mitoseg view`).
RUN_MARKERS = (METRICS, CONFIG, SUMMARY, INSPECT)


class RunFolder:
    """The paths of a run folder's files (``RunFolder(root).metrics``, ...)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.last, self.best, self.metrics, self.inspect = (self.root / name for name in (LAST, BEST, METRICS, INSPECT))

    def is_run(self) -> bool:
        """Whether the folder holds a run's files."""
        return self.root.is_dir() and any((self.root / name).exists() for name in RUN_MARKERS)

    def final_checkpoint(self) -> Path:
        """``best.pt`` when validation wrote one, else ``last.pt``."""
        return self.best if self.best.is_file() else self.last


def json_safe(value):
    """NaN / inf become null so the run's JSON files (and an export's metadata) stay valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = "mitoseg-checkpoint"
CHECKPOINT_VERSION = 1


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a mitoseg checkpoint (``torch.load(weights_only=True)``); one-line errors for a missing, corrupt,
    foreign or newer file, and for a TorchScript export given where a run's checkpoint is needed."""
    path = Path(path)
    if path.is_dir():
        raise MitosegError(f"checkpoint {path} is a directory; name a checkpoint file (RUN/best.pt or RUN/last.pt)")
    if not path.is_file():
        raise MitosegError(f"checkpoint not found: {path}")
    if is_torchscript_file(path):
        raise MitosegError(f"{path} is a TorchScript file (mitoseg export), not a run's checkpoint: mitoseg predict "
                           "takes it; this command needs RUN/best.pt or RUN/last.pt")
    import torch

    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:  # no permission, an I/O error: the file itself may be fine
        raise MitosegError(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from exc
    except Exception as exc:  # torch raises many kinds for corrupt, truncated or unsafe files
        # torch's own message advises weights_only=False, i.e. running the file's code: not advice to pass on.
        raise MitosegError(f"{path}: not a mitoseg checkpoint, or the file is damaged or truncated (it does not "
                           "read as plain tensors and numbers)") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise MitosegError(f"{path}: not a mitoseg checkpoint")
    if state.get("format_version", 0) > CHECKPOINT_VERSION:
        raise MitosegError(f"{path}: written by a newer mitoseg ({state.get('mitoseg_version')}); please upgrade")
    return state


def checkpoint_config(state: dict, path: str | os.PathLike):
    """The run's :class:`~mitoseg.config.Config` stored in a checkpoint."""
    from mitoseg.config import config_from_dict

    try:
        return config_from_dict(state["config"])
    except (KeyError, MitosegError) as exc:
        raise MitosegError(f"{path}: checkpoint config is invalid: {exc}") from exc


def validated_weights(state: dict) -> str:
    """The weights (``ema`` or ``student``) a checkpoint's run validated: those of its best score
    (``train.eval_model: best_of`` keeps the better one), else its ``train.eval_model``, else ``ema``."""
    best = state.get("best") or {}
    weights = (best.get("scores") or {}).get("weights")
    if weights in ("ema", "student"):
        return weights
    chosen = (state.get("config") or {}).get("train", {}).get("eval_model")
    return chosen if chosen in ("ema", "student") else "ema"


# ---------------------------------------------------------------------------- exported files

# The JSON stored with an exported file: the TorchScript file's extra file ``mitoseg.json``, the ONNX model's
# metadata property ``mitoseg``, the bioimage.io package's ``config.mitoseg``.
EXPORT_FORMAT = "mitoseg-export"
EXPORT_VERSION = 1
EXPORT_METADATA = "mitoseg.json"


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


def read_torchscript(path: str | os.PathLike, map_location="cpu"):
    """The TorchScript module of ``path`` (``torch.jit.load``: TorchScript operations only, no Python code from
    the file) and its ``mitoseg.json``; one-line errors for a file that is not a mitoseg export of logits."""
    import warnings

    import torch

    extra = {EXPORT_METADATA: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "torch.jit.load is deprecated" (PyTorch 2.13)
            module = torch.jit.load(os.fspath(path), map_location=map_location, _extra_files=extra)
    except Exception as exc:  # torch raises RuntimeError for damaged archives
        raise MitosegError(f"{path}: a TorchScript file that cannot be loaded (damaged or from an incompatible "
                           f"PyTorch): {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") \
            from exc
    text = extra[EXPORT_METADATA]
    if not text:
        raise MitosegError(f"{path}: a TorchScript file without mitoseg's settings ({EXPORT_METADATA}); only files "
                           "written by mitoseg export --format torchscript can be used")
    try:
        metadata = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MitosegError(f"{path}: its {EXPORT_METADATA} is not valid JSON") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != EXPORT_FORMAT or \
            not isinstance(metadata.get("config"), dict):
        raise MitosegError(f"{path}: its {EXPORT_METADATA} is not a mitoseg export's")
    if metadata.get("format_version", 0) > EXPORT_VERSION:
        raise MitosegError(f"{path}: written by a newer mitoseg ({metadata.get('mitoseg_version')}); please upgrade")
    if metadata.get("output") != "logits":
        raise MitosegError(f"{path}: this TorchScript file outputs {metadata.get('output')}, not the logits mitoseg "
                           "predict needs (export it with mitoseg export --format torchscript)")
    return module, metadata
