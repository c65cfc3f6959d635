"""Run folders and inspection files (docs/INSPECTION.md), read without napari or Qt.

A run folder is what ``mitoseg train --out RUN`` writes: ``metrics.jsonl``,
``config.json``, checkpoints and, for semi-supervised methods,
``inspect/iter_NNNNNN.npz`` + ``.json``. Everything here raises
:class:`~mitoseg.errors.MitosegError` with a one-line message for a folder or
file that is not what it should be; the widgets show that message as a napari
notification.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mitoseg.errors import MitosegError
from mitoseg.runs import CONFIG, RunFolder

_ITER_FILE = re.compile(r"iter_(\d+)\.npz")
REQUIRED_ARRAYS = ("image", "confidence", "pseudo_label", "weight")
DEFAULT_IGNORE_INDEX = 255

# Values of the derived label maps (0 = nothing, transparent in napari).
USED, DISCARDED = 1, 2
CORRECT_USED, WRONG_USED, CORRECT_DISCARDED, WRONG_DISCARDED = 1, 2, 3, 4
OUTCOME_NAMES = {CORRECT_USED: "correct used", WRONG_USED: "wrong used",
                 CORRECT_DISCARDED: "correct discarded", WRONG_DISCARDED: "wrong discarded"}
WEIGHT_NAMES = {USED: "used", DISCARDED: "discarded"}


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``mitoseg train``."""
    path = Path(path)
    return path.suffix.lower() != ".zarr" and RunFolder(path).is_run()


def resolve_run_dir(path: str | Path) -> Path:
    """The run folder for ``path``: the run itself, its ``inspect/`` folder or a file inside either."""
    path = Path(path).expanduser()
    if not path.exists():
        raise MitosegError(f"{path}: no such run folder")
    candidates = [path] if path.is_dir() else []
    candidates += [path.parent, path.parent.parent] if path.is_file() else [path.parent]
    for candidate in candidates:
        if is_run_dir(candidate):
            return candidate
    raise MitosegError(f"{path}: not a mitoseg run folder (expected metrics.jsonl, config.json or inspect/ "
                       "as written by `mitoseg train --out RUN`)")


def list_inspections(run_dir: str | Path) -> list[tuple[int, Path]]:
    """``(iteration, npz path)`` of every inspection file of a run, in iteration order."""
    run_dir = Path(run_dir)
    folder = RunFolder(run_dir).inspect
    found = []
    if folder.is_dir():
        for file in folder.iterdir():
            match = _ITER_FILE.fullmatch(file.name)
            if match and file.is_file():
                found.append((int(match[1]), file))
    if not found:
        raise MitosegError(f"{run_dir}: no inspection files in {folder} (only semi-supervised runs write them, "
                           "every train.inspect_every iterations and at the end)")
    return sorted(found)


@dataclass
class Inspection:
    """One ``iter_NNNNNN.npz`` and its ``.json``: arrays, scalars and pixel counts."""

    path: Path
    iteration: int
    method: str
    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)
    ignore_index: int | None = DEFAULT_IGNORE_INDEX

    @property
    def shape(self) -> tuple[int, ...]:
        return self.arrays["image"].shape

    @property
    def has_label(self) -> bool:
        return "label" in self.arrays

    def scalar(self, name: str) -> float | None:
        """A 0-d array of the file (``tau``, ``mu_pos``, ...), or None if the method does not write it."""
        value = self.arrays.get(name)
        if value is None or np.ndim(value) != 0:
            value = self.meta.get(name)
        return None if value is None else float(value)

    @property
    def used_pixels(self) -> int:
        """``used_pixels`` as recorded by the run (the ``.json``), else counted from ``weight``."""
        if "used_pixels" in self.meta:
            return int(self.meta["used_pixels"])
        return int(np.count_nonzero(self.arrays["weight"]))

    @property
    def discarded_pixels(self) -> int:
        if "discarded_pixels" in self.meta:
            return int(self.meta["discarded_pixels"])
        return int(self.arrays["weight"].size - np.count_nonzero(self.arrays["weight"]))

    def weight_map(self) -> np.ndarray:
        """uint8 map: 1 = pseudo-label used, 2 = discarded."""
        return np.where(self.arrays["weight"] > 0, USED, DISCARDED).astype(np.uint8)

    def outcome_map(self) -> np.ndarray | None:
        """uint8 map of the four outcomes (1..4, see ``OUTCOME_NAMES``); 0 where the label is ignored.

        None without analysis labels.
        """
        if not self.has_label:
            return None
        return outcome_map(self.arrays["pseudo_label"], self.arrays["label"], self.arrays["weight"],
                           self.ignore_index)

    def outcome_counts(self) -> dict[str, int] | None:
        outcome = self.outcome_map()
        if outcome is None:
            return None
        counts = np.bincount(outcome.ravel(), minlength=5)
        return {name: int(counts[value]) for value, name in OUTCOME_NAMES.items()}


def outcome_map(pseudo_label: np.ndarray, label: np.ndarray, weight: np.ndarray,
                ignore_index: int | None = DEFAULT_IGNORE_INDEX) -> np.ndarray:
    """Correct used (1), wrong used (2), correct discarded (3), wrong discarded (4); 0 = ignored label."""
    correct = pseudo_label == label
    used = weight > 0
    out = np.where(used, np.where(correct, CORRECT_USED, WRONG_USED),
                   np.where(correct, CORRECT_DISCARDED, WRONG_DISCARDED)).astype(np.uint8)
    if ignore_index is not None:
        out[label == ignore_index] = 0
    return out


def _ignore_index(run_dir: Path) -> int | None:
    """The run's ignore index when its loss uses one (``train.loss: ce`` or ``ohem``), from ``config.json``."""
    try:
        train = json.loads((run_dir / CONFIG).read_text()).get("train", {})
    except (OSError, ValueError, AttributeError):
        return DEFAULT_IGNORE_INDEX
    if train.get("loss", "dice_ce") not in ("ce", "ohem"):
        return None  # as in the methods: only the "ce" and "ohem" losses have an ignore index
    return train.get("ignore_index", DEFAULT_IGNORE_INDEX)


def load_inspection(npz_path: str | Path, run_dir: str | Path | None = None) -> Inspection:
    """Read ``iter_NNNNNN.npz`` and, when present, its ``.json``; check the arrays documented as required."""
    npz_path = Path(npz_path)
    if npz_path.suffix == ".json":
        npz_path = npz_path.with_suffix(".npz")
    match = _ITER_FILE.fullmatch(npz_path.name)
    if not match:
        raise MitosegError(f"{npz_path}: not an inspection file (expected inspect/iter_NNNNNN.npz)")
    if not npz_path.is_file():
        raise MitosegError(f"{npz_path}: no such inspection file")
    try:
        with np.load(npz_path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise MitosegError(f"{npz_path}: not a readable inspection file ({first})") from exc
    missing = [name for name in REQUIRED_ARRAYS if name not in arrays]
    if missing:
        raise MitosegError(f"{npz_path}: inspection file lacks {', '.join(missing)} (see docs/INSPECTION.md)")
    shape = arrays["image"].shape
    if len(shape) != 3:
        raise MitosegError(f"{npz_path}: 'image' has shape {shape}, expected (N, H, W)")
    for name in ("confidence", "pseudo_label", "weight", "label"):
        if name in arrays and arrays[name].shape != shape:
            raise MitosegError(f"{npz_path}: '{name}' has shape {arrays[name].shape}, 'image' has {shape}")
    if "log_density" in arrays and (arrays["log_density"].ndim != 3 or arrays["log_density"].shape[0] != shape[0]):
        raise MitosegError(f"{npz_path}: 'log_density' has shape {arrays['log_density'].shape}, "
                           f"expected ({shape[0]}, h, w)")
    meta = {}
    json_path = npz_path.with_suffix(".json")
    if json_path.is_file():
        try:
            meta = json.loads(json_path.read_text())
        except (OSError, ValueError) as exc:
            raise MitosegError(f"{json_path}: not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise MitosegError(f"{json_path}: expected a JSON object")
    if run_dir is None and is_run_dir(npz_path.parent.parent):
        run_dir = npz_path.parent.parent
    ignore = _ignore_index(Path(run_dir)) if run_dir is not None else DEFAULT_IGNORE_INDEX
    return Inspection(path=npz_path, iteration=int(meta.get("iteration", int(match[1]))),
                      method=str(meta.get("method", "unknown")), arrays=arrays, meta=meta, ignore_index=ignore)


def read_train_metrics(run_dir: str | Path) -> list[dict]:
    """The ``"split": "train"`` records of ``metrics.jsonl`` (empty without the file).

    A line that is not JSON (the last line while a training run is still writing
    it) is skipped.
    """
    path = RunFolder(run_dir).metrics
    if not path.is_file():
        return []
    records = []
    try:
        text = path.read_text()
    except OSError as exc:
        raise MitosegError(f"{path}: cannot read ({exc})") from exc
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("split") == "train" and "iter" in record:
            records.append(record)
    return records


def run_checkpoint(run_dir: str | Path) -> Path | None:
    """``best.pt`` of a run, else ``last.pt``, else None."""
    checkpoint = RunFolder(run_dir).final_checkpoint()
    return checkpoint if checkpoint.is_file() else None
