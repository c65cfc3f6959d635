"""Run logs: ``OUT/metrics.jsonl`` (one JSON object per line) and TensorBoard (``OUT/tb``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from torch.utils.tensorboard import SummaryWriter


def json_safe(value):
    """NaN / inf become null so the files stay valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class RunLogger:
    """Appends to ``metrics.jsonl`` and TensorBoard.

    On resume, records past ``start_iteration`` (written after the checkpoint by
    the interrupted run) are dropped so each iteration appears once.
    """

    def __init__(self, out_dir: Path, start_iteration: int = 0):
        self.path = out_dir / "metrics.jsonl"
        if start_iteration > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iter", 0) <= start_iteration]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif start_iteration == 0 and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        self._tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_iteration or None)

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(json_safe(record)) + "\n")
        self._file.flush()

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
        self._file.close()
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
    tmp = directory / f".{stem.name}.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, stem.with_suffix(".npz"))
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
    tmp_json = directory / f".{stem.name}.tmp.json"
    tmp_json.write_text(json.dumps(json_safe(meta), indent=2))
    os.replace(tmp_json, stem.with_suffix(".json"))
    return stem.with_suffix(".npz")
