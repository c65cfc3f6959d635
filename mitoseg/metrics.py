"""Segmentation scores from a streamed confusion matrix.

Whole EM volumes are scored slab by slab, so the counts are accumulated in a
K x K confusion matrix (one ``bincount`` per slab, no one-hot tensors) and the
scores are derived once at the end with MONAI's confusion-matrix metrics.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_confusion_matrix_metric

# MONAI's names for the scores we report.
_MONAI_NAMES = {"iou": "threat score", "dice": "f1 score", "precision": "precision", "recall": "recall"}


def confusion_matrix(prediction, target, num_classes: int, ignore_index: int | None = None) -> torch.Tensor:
    """K x K counts, rows = target class, columns = predicted class (int64, CPU)."""
    prediction = torch.as_tensor(prediction).reshape(-1).long()
    target = torch.as_tensor(target).reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    if not bool(keep.all()):
        prediction, target = prediction[keep], target[keep]
    counts = torch.bincount(target * num_classes + prediction.clamp(0, num_classes - 1),
                            minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu()


def scores_from_confusion(matrix: torch.Tensor, class_names: list[str] | None = None) -> dict:
    """Per-class IoU, Dice, precision and recall, plus mIoU / mDice (and ``fg_iou`` for 2 classes).

    A class absent from both prediction and target has NaN scores and is left
    out of the means (``null`` in JSON).
    """
    matrix = matrix.double()
    tp = matrix.diag()
    fp = matrix.sum(0) - tp
    fn = matrix.sum(1) - tp
    tn = matrix.sum() - tp - fp - fn
    per_class_counts = torch.stack([tp, fp, tn, fn], dim=1)  # MONAI's (tp, fp, tn, fn) layout
    num_classes = matrix.shape[0]
    names = class_names or [str(k) for k in range(num_classes)]
    per_class = {}
    for key, monai_name in _MONAI_NAMES.items():
        per_class[key] = compute_confusion_matrix_metric(monai_name, per_class_counts).tolist()
    result = {
        "classes": names,
        "per_class": per_class,
        "miou": float(np.nanmean(per_class["iou"])) if not all(np.isnan(per_class["iou"])) else float("nan"),
        "mdice": float(np.nanmean(per_class["dice"])) if not all(np.isnan(per_class["dice"])) else float("nan"),
        "pixels": int(matrix.sum().item()),
    }
    if num_classes == 2:
        result["fg_iou"] = per_class["iou"][1]
        result["fg_dice"] = per_class["dice"][1]
    return result


def headline_metric(scores: dict) -> tuple[str, float]:
    """The number a run is selected by: ``fg_iou`` for binary tasks, else ``miou``."""
    key = "fg_iou" if "fg_iou" in scores else "miou"
    return key, scores[key]


def format_table(scores: dict) -> str:
    """A fixed-width text table of the per-class scores and the means (``mean`` row: mIoU, mDice)."""
    # Wide enough for the longest class name ("traffic light", or a user's own), so columns stay aligned.
    width = max([16] + [len(str(name)) + 2 for name in scores["classes"]])
    header = f"{'class':<{width}}{'IoU':>8}{'Dice':>8}{'Prec':>8}{'Recall':>8}"
    lines = [header, "-" * len(header)]
    pc = scores["per_class"]
    for k, name in enumerate(scores["classes"]):
        values = [pc[m][k] for m in ("iou", "dice", "precision", "recall")]
        lines.append(f"{name:<{width}}" + "".join(f"{v:>8.4f}" for v in values))
    lines.append("-" * len(header))
    lines.append(f"{'mean':<{width}}{scores['miou']:>8.4f}{scores['mdice']:>8.4f}")
    # The means skip classes absent from both label and prediction (nan rows): say how many,
    # since a reader comparing with a paper's 21- or 19-class mIoU needs to know.
    absent = int(np.isnan(np.asarray(pc["iou"], dtype=float)).sum())
    if absent:
        lines.append(f"({absent} of {len(scores['classes'])} classes absent from label and prediction: "
                     "nan, left out of the means)")
    if "fg_iou" in scores:
        lines.append(f"fg_iou = {scores['fg_iou']:.4f}")
    return "\n".join(lines)
