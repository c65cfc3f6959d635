"""The Train widget's work that needs no Qt: rounds on disk, their configs, the training process, progress.

A *session folder* (the widget's output folder) holds the image volumes the
rounds trained on (``images/<layer>-<hash>.tif``, written once per distinct
image) and one run folder per round, ``round_001``, ``round_002``, ...: an
ordinary ``mitoseg train`` run folder (``config.json``, ``last.pt``,
``best.pt``, ``metrics.jsonl``, ``inspect/``, ``summary.json``) plus what the
widget put there before training: the painted labels (``labels.tif``, the whole
Labels layer; only the labeled slices are read), the config it trained with
(``train.yaml``), the trainer's output (``train.log``) and ``round.json``
(the labeled and validation slices, the parent round, the status and score).
``mitoseg train --resume --out ROUND`` continues a round from the shell.

Training runs as ``python -c BOOTSTRAP train --config ROUND/train.yaml --out
ROUND ...``: a separate process, so the viewer stays responsive; SIGINT (the
widget's Cancel) makes the trainer finish its iteration, save ``last.pt`` and
exit with status 130.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mitoseg.errors import MitosegError
from mitoseg.runs import CONFIG, LAST, METRICS, SUMMARY

ROUND_PREFIX = "round_"
ROUND_FILE = "round.json"
CONFIG_FILE = "train.yaml"
LABELS_FILE = "labels.tif"
LOG_FILE = "train.log"
IMAGES_DIR = "images"
METHODS = ("daw", "supervised", "daw_ddfp")
SEMI_SUPERVISED = ("daw", "daw_ddfp")
#: exit status -> round status (mitoseg/cli.py: 0 done, 2 an input error, 3 diverged, 130 Ctrl-C / Cancel)
STATUS_BY_EXIT = {0: "done", 130: "cancelled", 3: "diverged"}
RUNNING, STARTING = "running", "starting"

SAMPLE_CONFIG = "sample_daw"
# The napari rounds train the built-in sample_daw config's network and optimisation (about 5 minutes for 1000
# iterations on 2 CPU cores, fg_iou 0.84 on the sample data), read from it so the two never differ: a sound start
# for a biologist's first round. "Extra settings" (KEY=VALUE) change any.
SAMPLE_DATA_KEYS = ("num_classes", "patch_size", "batch_size", "unlabeled_batch_size", "foreground_sampling",
                    "cutmix_prob")
SAMPLE_TRAIN_KEYS = ("loss", "ema_decay", "inspect_patches")


def base_settings() -> dict:
    """The settings of a round from the built-in ``sample_daw`` config (its volumes, method and schedule are the
    round's own)."""
    from mitoseg.config import parse_yaml, resolve_config_path

    sample = parse_yaml(resolve_config_path(SAMPLE_CONFIG).read_text())
    return {
        "seed": sample["seed"],
        "data": {key: sample["data"][key] for key in SAMPLE_DATA_KEYS},
        "model": sample["model"],
        "optim": sample["optim"],
        # best_of: short rounds validate the student too (the EMA teacher lags it for the first hundreds of
        # iterations), as DAW's code evaluates both; best.pt and the predictions use the better one.
        "train": {**{key: sample["train"][key] for key in SAMPLE_TRAIN_KEYS}, "eval_model": "best_of"},
        "inference": sample["inference"],
    }


# model.* keys a Continue round takes from its parent (everything that shapes the network), so that its
# model.init_from always matches; the parent's fine-tuning keys are its own.
PARENT_MODEL_SKIP = ("init_from", "init_weights", "freeze", "freeze_iters", "pretrained")

# The training process: Ctrl-C's default meaning restored first, because a process started from a shell's
# background job (`napari &`) inherits an ignored SIGINT, and Cancel would then do nothing.
TRAIN_BOOTSTRAP = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "from mitoseg.cli import main; sys.exit(main(sys.argv[1:]))")


# ------------------------------------------------------------------------------------------ slices


def labeled_slices(labels) -> list[int]:
    """The slices of a (z, y, x) Labels volume holding at least one painted (non-zero) pixel."""
    if labels.ndim != 3:
        raise MitosegError(f"the labels have shape {tuple(labels.shape)}; expected a (z, y, x) volume")
    if isinstance(labels, np.ndarray):
        return [int(z) for z in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))]
    return [z for z in range(labels.shape[0]) if np.asarray(labels[z]).any()]


def parse_slices(text: str, num_slices: int, what: str) -> list[int]:
    """A slice selection as in configs (``"3, 7"``, ``"10:14"``); an empty text is no slice."""
    from mitoseg.config import parse_yaml
    from mitoseg.data.readers import select_slices

    text = text.strip()
    if not text:
        return []
    try:
        value = parse_yaml(text)
    except Exception:  # noqa: BLE001 - YAML's errors: the selection is then taken as written
        value = text
    if isinstance(value, (int, list)):
        return select_slices(value, num_slices, what)
    return select_slices(str(text), num_slices, what)


def num_classes_of(labels: np.ndarray, slices: list[int]) -> int:
    """Class ids 0 .. largest painted id in ``slices`` (at least 2: background and mitochondria)."""
    largest = max((int(np.asarray(labels[z]).max()) for z in slices), default=1)
    return max(2, largest + 1)


# ------------------------------------------------------------------------------------------ rounds


@dataclass
class RoundRequest:
    """What one round trains on, as the widget's controls set it."""

    session: Path
    image: object  # (z, y, x) array (numpy or dask) of the image layer
    image_name: str
    labels: np.ndarray  # (z, y, x) painted labels, a copy taken when the round starts
    labels_name: str
    train_slices: list[int]
    val_slices: list[int] = field(default_factory=list)
    excluded_slices: list[int] = field(default_factory=list)
    method: str = "daw"
    iterations: int = 1000
    max_minutes: float | None = None
    device: str = "auto"
    overrides: list[str] = field(default_factory=list)
    parent: Path | None = None  # Continue: the round whose last.pt the new one starts from


def check_request(request: RoundRequest) -> None:
    """The checks that need no disk: one line per problem (MitosegError)."""
    image_shape, label_shape = tuple(request.image.shape), tuple(request.labels.shape)
    if len(image_shape) != 3:
        raise MitosegError(f"the image layer '{request.image_name}' has shape {image_shape}; the Train widget needs "
                           "a (z, y, x) volume")
    if image_shape != label_shape:
        raise MitosegError(f"the labels layer '{request.labels_name}' has shape {label_shape}, the image layer "
                           f"'{request.image_name}' {image_shape}: they must match")
    if request.method not in METHODS:
        raise MitosegError(f"method must be one of {', '.join(METHODS)}, got {request.method!r}")
    if not request.train_slices:
        raise MitosegError(f"no labeled slice to train on: paint mitochondria in some slices of "
                           f"'{request.labels_name}' (a slice counts as labeled when it holds any painted pixel)")
    painted = set(labeled_slices(request.labels))
    unpainted = [z for z in request.val_slices if z not in painted]
    if unpainted:
        raise MitosegError(f"validation slices {unpainted} hold no painted pixel; validate on labeled slices")
    overlap = sorted(set(request.val_slices) & set(request.train_slices))
    if overlap:
        raise MitosegError(f"slices {overlap} are both training and validation slices")
    if request.method in SEMI_SUPERVISED and len(set(request.train_slices) | set(request.val_slices)) >= image_shape[0]:
        raise MitosegError(f"method '{request.method}' learns from unlabeled slices, but every slice is labeled or "
                           "validates; use supervised, or leave some slices unlabeled")
    if min(image_shape[1:]) < 8:
        raise MitosegError(f"the image is {image_shape[1]} x {image_shape[2]} pixels; the U-Net needs at least 8 x 8")
    if request.iterations < 1:
        raise MitosegError(f"iterations must be at least 1, got {request.iterations}")
    if request.parent is not None and not (request.parent / LAST).is_file():
        raise MitosegError(f"Continue: {request.parent} holds no last.pt to fine-tune from")


def round_dirs(session: Path) -> list[Path]:
    """The round folders of a session, in order."""
    session = Path(session)
    if not session.is_dir():
        return []
    found = [(int(p.name[len(ROUND_PREFIX):]), p) for p in session.iterdir()
             if p.is_dir() and re.fullmatch(rf"{ROUND_PREFIX}\d+", p.name)]
    return [p for _, p in sorted(found)]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "image"


def image_file(session: Path, image, name: str) -> Path:
    """``session/images/<name>-<hash>.tif``: the image volume, written the first time this content is trained on
    (the hash of its voxels names it, so earlier rounds keep theirs when the layer changes)."""
    import tifffile

    from mitoseg.atomic import write_atomic

    digest = hashlib.sha256(f"{tuple(image.shape)} {np.dtype(image.dtype).str}".encode())
    for z in range(image.shape[0]):
        digest.update(np.ascontiguousarray(np.asarray(image[z])).tobytes())
    path = Path(session) / IMAGES_DIR / f"{_safe_name(name)}-{digest.hexdigest()[:12]}.tif"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(handle) -> None:
            with tifffile.TiffWriter(handle) as tif:  # slice by slice: a lazy layer is never whole in memory
                for z in range(image.shape[0]):
                    tif.write(np.asarray(image[z]), contiguous=True, photometric="minisblack")

        write_atomic(path, write)
    return path


def _intervals(iterations: int) -> dict:
    """Validation, checkpoints and inspection ten times per run (each validation then has a last.pt of the same
    iteration for the live prediction); the log about 50 times, at most every 20 iterations."""
    every = max(1, iterations // 10)
    return {"val_every": every, "checkpoint_every": every, "inspect_every": every,
            "log_every": max(1, min(20, iterations // 50))}


def build_round_config(request: RoundRequest, image_path: Path, labels_path: Path, num_classes: int) -> dict:
    """The raw config of a round (validated by :func:`mitoseg.config.config_from_dict` before it is written)."""
    from mitoseg.config import apply_overrides

    cfg = base_settings()
    z, y, x = (int(n) for n in request.image.shape)
    # the sample's patch, made smaller (a multiple of 8) for smaller images
    patch = min(cfg["data"]["patch_size"][-1], (min(y, x) // 8) * 8)
    cfg["device"] = request.device
    cfg["data"].update(num_classes=num_classes, patch_size=[patch, patch],
                       train={"image": str(image_path), "label": str(labels_path),
                              "slices": sorted(request.train_slices)})
    if request.val_slices:
        cfg["data"]["val"] = {"image": str(image_path), "label": str(labels_path),
                              "slices": sorted(request.val_slices)}
    else:  # no validation: the final model is the student's (the EMA teacher lags a short round), as mitoseg init
        cfg["train"]["eval_model"] = "student"
    if request.method in SEMI_SUPERVISED:
        # Explicit: the default (every slice not trained on) would also take the validation slices.
        rest = sorted(set(range(z)) - set(request.train_slices) - set(request.val_slices))
        cfg["data"]["unlabeled"] = [{"image": str(image_path), "slices": rest}]
    cfg["method"] = {"name": request.method}
    if request.method in SEMI_SUPERVISED:
        from mitoseg.config import SEMI_SUPERVISED_SAFEGUARDS

        cfg["method"].update(SEMI_SUPERVISED_SAFEGUARDS)
    if request.method == "daw_ddfp":
        cfg["method"]["ddfp"] = {"start_iter": max(1, request.iterations // 5)}
    cfg["train"].update(iterations=request.iterations, **_intervals(request.iterations))
    if request.parent is not None:
        parent = json.loads((request.parent / CONFIG).read_text())
        cfg["model"] = {k: v for k, v in parent["model"].items() if k not in PARENT_MODEL_SKIP}
        cfg["data"]["context_slices"] = parent["data"].get("context_slices", 0)
        cfg["model"]["init_from"] = str(request.parent / LAST)
    return apply_overrides(cfg, list(request.overrides))


def prepare_round(request: RoundRequest) -> dict:
    """Write a new round folder (labels, image, config, round.json); returns its description for
    :func:`start_training`. Runs in a worker thread (hashing and writing a volume take a while)."""
    import tifffile
    import yaml

    from mitoseg.atomic import write_atomic, write_text_atomic
    from mitoseg.config import config_from_dict

    check_request(request)
    session = Path(request.session).expanduser().absolute()
    if session.exists() and not session.is_dir():
        raise MitosegError(f"output folder {session} is a file")
    session.mkdir(parents=True, exist_ok=True)
    existing = round_dirs(session)
    number = int(existing[-1].name[len(ROUND_PREFIX):]) + 1 if existing else 1
    run_dir = session / f"{ROUND_PREFIX}{number:03d}"
    labeled = sorted(set(request.train_slices) | set(request.val_slices))
    num_classes = num_classes_of(request.labels, labeled)
    # Validated before anything is written: a bad extra setting leaves no half-made round behind.
    image_path, labels_path = run_dir.parent / IMAGES_DIR / "pending.tif", run_dir / LABELS_FILE
    config_from_dict(build_round_config(request, image_path, labels_path, num_classes))

    run_dir.mkdir()
    image_path = image_file(session, request.image, request.image_name)
    labels = np.asarray(request.labels)
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    write_atomic(labels_path, lambda handle: tifffile.imwrite(handle, labels.astype(dtype, copy=False),
                                                              photometric="minisblack"))
    raw = build_round_config(request, image_path, labels_path, num_classes)
    config_from_dict(copy.deepcopy(raw))
    write_text_atomic(run_dir / CONFIG_FILE, yaml.safe_dump(raw, sort_keys=False))
    record = {
        "round": number,
        "parent": str(request.parent) if request.parent is not None else None,
        "init_from": raw["model"].get("init_from"),
        "image_layer": request.image_name,
        "labels_layer": request.labels_name,
        "image": str(image_path),
        "labels": str(labels_path),
        "labeled_slices": sorted(request.train_slices),
        "validation_slices": sorted(request.val_slices),
        "excluded_slices": sorted(request.excluded_slices),
        "num_classes": num_classes,
        "method": request.method,
        "iterations": request.iterations,
        "max_minutes": request.max_minutes,
        "device": request.device,
        "overrides": list(request.overrides),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "status": STARTING,
    }
    write_round(run_dir, record)
    return {"run_dir": run_dir, "record": record}


def write_round(run_dir: Path, record: dict) -> None:
    from mitoseg.atomic import write_text_atomic

    write_text_atomic(Path(run_dir) / ROUND_FILE, json.dumps(record, indent=2))


def read_round(run_dir: Path) -> dict:
    """``round.json`` with what the run folder says now: ``iteration`` (of last.pt's log), ``score`` (the best
    validation score, its metric) from summary.json or, while training, metrics.jsonl."""
    run_dir = Path(run_dir)
    try:
        record = json.loads((run_dir / ROUND_FILE).read_text())
    except (OSError, ValueError):
        record = {"round": int(run_dir.name[len(ROUND_PREFIX):]), "status": "unknown"}
    record["run_dir"] = str(run_dir)
    summary = None
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        pass
    if summary and summary.get("best"):
        record["score"] = (summary["best"]["metric"], summary["best"]["value"])
    else:
        val = [r for r in MetricsFollower(run_dir / METRICS).read_new() if r.get("split") == "val"]
        if val:
            metric = "fg_iou" if "fg_iou" in val[-1] else "miou"
            values = [r[metric] for r in val if isinstance(r.get(metric), (int, float))]
            if values:
                record["score"] = (metric, max(values))
    return record


class MetricsFollower:
    """New records of a growing ``metrics.jsonl``: complete lines only (the trainer may be writing the last one);
    a file that shrank (rewritten on resume) is read again from its start (``reset`` is then True)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self.reset = False

    def read_new(self) -> list[dict]:
        self.reset = False
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:
            self.offset, self.reset = 0, True
        if size == self.offset:
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(size - self.offset)
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        records = []
        for line in data[:end].decode("utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "iter" in record:
                records.append(record)
        return records


# ------------------------------------------------------------------------------------------ process


def training_command(run_dir: Path, max_minutes: float | None = None) -> list[str]:
    """``mitoseg train`` of a prepared round. ``--overwrite``: the folder already holds the round's inputs
    (labels.tif, train.yaml, round.json, train.log), which it never touches; it removes only a run's own files."""
    command = [sys.executable, "-c", TRAIN_BOOTSTRAP, "train", "--config", str(Path(run_dir) / CONFIG_FILE),
               "--out", str(run_dir), "--overwrite", "--no-progress"]
    if max_minutes:
        command += ["--max-minutes", f"{max_minutes:g}"]
    return command


def start_training(run_dir: Path, max_minutes: float | None = None) -> subprocess.Popen:
    """Start the training process of a prepared round; its output goes to ``ROUND/train.log``."""
    run_dir = Path(run_dir)
    log = open(run_dir / LOG_FILE, "ab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        return subprocess.Popen(training_command(run_dir, max_minutes), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=str(run_dir), env=env)
    finally:
        log.close()  # the child holds its own descriptor


def cancel_training(process: subprocess.Popen) -> None:
    """Ask the trainer to stop: it finishes the iteration, saves last.pt and exits with status 130."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)


def failure_line(run_dir: Path) -> str:
    """The trainer's one-line error (``mitoseg: error: ...``) from train.log, else its last line."""
    try:
        lines = [line.strip() for line in (Path(run_dir) / LOG_FILE).read_text(errors="replace").splitlines()
                 if line.strip()]
    except OSError:
        return "no train.log"
    errors = [line for line in lines if line.startswith("mitoseg: error:")]
    if errors:
        return errors[-1][len("mitoseg: error:"):].strip()
    return lines[-1] if lines else "the training process ended without output"


# ------------------------------------------------------------------------------------------ prediction


def load_model(checkpoint: Path, device: str = "auto"):
    """(model, config, iteration) of a checkpoint, with the weights its run validates."""
    loaded = load_session_model(checkpoint, device)
    return loaded.model, loaded.cfg, loaded.iteration


def load_session_model(checkpoint: Path, device: str = "auto"):
    """:func:`mitoseg.inference.session.load_model` with the weights the run validates, on the widget's device."""
    from mitoseg.inference.session import load_model as load
    from mitoseg_napari._predict_widget import check_device

    return load(checkpoint, None, check_device(device))


def predict_slice(volume, z: int, checkpoint: Path, device: str = "auto", normalization=None,
                  voxel_size=None) -> dict:
    """Class labels of slice ``z`` of ``volume`` (an ``_ArrayVolume``) by ``checkpoint``:
    ``{"z", "labels" (y, x), "iteration", "checkpoint"}``. ``normalization``: the volume's, when known;
    ``voxel_size``: the volume's (z, y, x) nm, for a model with a working ``data.pixel_size``."""
    from mitoseg.data.resample import in_plane_nm
    from mitoseg.inference.predictor import labels_from_probabilities
    from mitoseg.inference.session import Segmenter

    loaded = load_session_model(checkpoint, device)
    prepared = Segmenter(loaded).prepare(volume, "image layer", in_plane_nm(voxel_size),
                                         "the layer's scale in nm per pixel (its units nm or um)", indices=[int(z)],
                                         normalization=normalization, log=False)
    iteration, normalization = loaded.iteration, prepared.normalization
    labels = None
    for _, _, probs in prepared.slabs():
        labels = labels_from_probabilities(probs)[0]
    return {"z": int(z), "labels": labels, "iteration": iteration, "checkpoint": str(checkpoint),
            "normalization": normalization}
