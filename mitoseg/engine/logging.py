"""Run logs: ``OUT/metrics.jsonl`` (one JSON object per line) and TensorBoard (``OUT/tb``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from torch.utils.tensorboard import SummaryWriter

from mitoseg.atomic import disk_full_cause, disk_full_error, write_atomic, write_text_atomic
from mitoseg.runs import METRICS, TENSORBOARD, json_safe


class RunLogger:
    """Appends to ``metrics.jsonl`` and TensorBoard.

    On resume, records past ``start_iteration`` (written after the checkpoint by
    the interrupted run) are dropped so each iteration appears once, and so is a
    last line cut short by a run that was killed while writing it. The log is
    rewritten atomically: a full disk then leaves it as it was.
    """

    def __init__(self, out_dir: Path, start_iteration: int = 0):
        self.path = out_dir / METRICS
        if start_iteration > 0 and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line) if line.strip() else None
                except ValueError:
                    record = None  # a partial line
                if isinstance(record, dict) and record.get("iter", 0) <= start_iteration:
                    kept.append(line)
            write_text_atomic(self.path, "".join(line + "\n" for line in kept), "metrics.jsonl is kept")
        elif start_iteration == 0 and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        self._tb = SummaryWriter(str(out_dir / TENSORBOARD), purge_step=start_iteration or None)

    def _write(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(json_safe(record)) + "\n")
            self._file.flush()
        except OSError as exc:
            if disk_full_cause(exc):
                raise disk_full_error(self.path) from exc
            raise

    def log_train(self, iteration: int, values: dict[str, float]) -> None:
        self._write({"iter": iteration, "split": "train", **values})
        for key, value in values.items():
            self._tb.add_scalar(f"train/{key}", value, iteration)

    def log_validation(self, iteration: int, scores: dict, split: str = "val") -> None:
        flat = {k: v for k, v in scores.items() if isinstance(v, float)}
        for metric, values in scores["per_class"].items():
            for name, v in zip(scores["classes"], values):
                flat[f"{metric}/{name}"] = v
        self._write({"iter": iteration, "split": split, **flat})
        for key, value in flat.items():
            if math.isfinite(value):
                self._tb.add_scalar(f"{split}/{key}", value, iteration)

    def log_test(self, iteration: int, scores: dict) -> None:
        """The ``data.test`` scores of best.pt, logged at the iteration training ended."""
        self.log_validation(iteration, scores, split="test")

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # a full disk: already reported by the write that met it
        self._tb.close()


class NullLogger:
    """What ranks other than 0 log to under torchrun: nothing."""

    def log_train(self, iteration: int, values: dict[str, float]) -> None:
        pass

    def log_validation(self, iteration: int, scores: dict, split: str = "val") -> None:
        pass

    def log_test(self, iteration: int, scores: dict) -> None:
        pass

    def close(self) -> None:
        pass


def write_inspection(directory: Path, iteration: int, arrays: dict[str, np.ndarray], method: str) -> Path:
    """``iter_NNNNNN.npz`` (arrays) + ``iter_NNNNNN.json`` (scalars and array shapes), atomically.

    The format is documented in docs/INSPECTION.md; the napari plugin reads it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"iter_{iteration:06d}"
    write_atomic(stem.with_suffix(".npz"), lambda handle: np.savez_compressed(handle, **arrays))
    scalars = {k: float(v) for k, v in arrays.items() if np.ndim(v) == 0}
    meta = {
        "iteration": iteration,
        "method": method,
        "arrays": {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
                   for k, v in arrays.items() if np.ndim(v) > 0},
        **scalars,
        "used_pixels": int(np.asarray(arrays["weight"]).sum()),
        "discarded_pixels": int(np.asarray(arrays["weight"]).size - np.asarray(arrays["weight"]).sum()),
    }
    write_text_atomic(stem.with_suffix(".json"), json.dumps(json_safe(meta), indent=2))
    return stem.with_suffix(".npz")
