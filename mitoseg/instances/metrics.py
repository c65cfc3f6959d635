"""Object-level scores of an instance volume against instance ground truth, slab by slab.

The overlaps of every (prediction, ground truth) pair of objects are counted slab by
slab (one ``numpy.unique`` of the pair codes per slab), so memory is bounded by the
slab and the number of overlapping pairs. From them:

- precision, recall and F1 at IoU 0.5: a prediction is a true positive when it
  overlaps a ground-truth object with IoU > 0.5 (such a match is unique);
- AP at IoU 0.5 and 0.75 as the MitoEM challenge computes it (its mAP_3Dvolume tool,
  COCO's procedure): predictions ranked by score (the mean foreground probability
  when given, else the voxel count), each matched greedily to the unmatched
  ground-truth object of highest IoU at or above the threshold, and the precision
  envelope averaged over the 101 recall levels 0, 0.01, ..., 1;
- the mean IoU of the pairs matched at 0.5;
- split ground-truth objects (two or more predictions lie mostly, > 50 % of their
  voxels, inside one) and merged predictions (two or more ground-truth objects lie
  mostly inside one).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from mitoseg.instances.components import iter_slabs

RECALL_LEVELS = np.linspace(0.0, 1.0, 101)


def overlaps(read_prediction: Callable[[int, int], np.ndarray], read_truth: Callable[[int, int], np.ndarray],
             num_slices: int, slab: int = 16, progress: bool = False):
    """(pred ids, gt ids, intersections) of every overlapping pair, and the voxel counts of every predicted
    and ground-truth id ({id: count}, 0 the background)."""
    codes: dict[int, int] = {}
    pred_sizes: dict[int, int] = {}
    truth_sizes: dict[int, int] = {}

    def add(table: dict, keys: np.ndarray, counts: np.ndarray) -> None:
        for key, count in zip(keys.tolist(), counts.tolist()):
            table[key] = table.get(key, 0) + count

    for start, stop in tqdm(list(iter_slabs(num_slices, slab)), desc="overlaps", unit="slab", disable=not progress,
                            leave=False):
        pred = np.asarray(read_prediction(start, stop)).astype(np.uint64).ravel()
        truth = np.asarray(read_truth(start, stop)).astype(np.uint64).ravel()
        add(pred_sizes, *np.unique(pred, return_counts=True))
        add(truth_sizes, *np.unique(truth, return_counts=True))
        both = (pred > 0) & (truth > 0)
        add(codes, *np.unique((pred[both] << np.uint64(32)) | truth[both], return_counts=True))
    keys = np.fromiter(codes.keys(), dtype=np.uint64, count=len(codes))
    inter = np.fromiter(codes.values(), dtype=np.int64, count=len(codes))
    return (keys >> np.uint64(32)).astype(np.int64), (keys & np.uint64(0xFFFFFFFF)).astype(np.int64), inter, \
        pred_sizes, truth_sizes


def average_precision(scores: np.ndarray, pred_ids: np.ndarray, pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
                      num_truth: int, threshold: float) -> float:
    """COCO / MitoEM AP at one IoU threshold. ``pairs``: (pred id, gt id, IoU) of every overlapping pair."""
    if num_truth == 0:
        return float("nan")
    if len(pred_ids) == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    p, g, iou = pairs
    by_pred: dict[int, list[tuple[float, int]]] = {}
    for pi, gi, value in zip(p.tolist(), g.tolist(), iou.tolist()):
        if value >= threshold:
            by_pred.setdefault(pi, []).append((value, gi))
    matched: set[int] = set()
    hits = np.zeros(len(pred_ids), dtype=bool)
    for rank, index in enumerate(order):
        for value, gi in sorted(by_pred.get(int(pred_ids[index]), []), reverse=True):
            if gi not in matched:
                matched.add(gi)
                hits[rank] = True
                break
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / num_truth
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # precision at recall r: the best at any r' >= r
    at = np.searchsorted(recall, RECALL_LEVELS, side="left")
    return float(np.mean(np.where(at < len(envelope), envelope[np.minimum(at, len(envelope) - 1)], 0.0)))


def instance_scores(read_prediction: Callable[[int, int], np.ndarray], read_truth: Callable[[int, int], np.ndarray],
                    num_slices: int, slab: int = 16, read_probability: Callable[[int, int], np.ndarray] | None = None,
                    progress: bool = False) -> dict:
    """The object-level scores of the module docstring, as a JSON-ready dict."""
    p, g, inter, pred_sizes, truth_sizes = overlaps(read_prediction, read_truth, num_slices, slab, progress)
    pred_ids = np.array(sorted(k for k in pred_sizes if k > 0), dtype=np.int64)
    truth_ids = np.array(sorted(k for k in truth_sizes if k > 0), dtype=np.int64)
    size_p = np.array([pred_sizes[int(i)] for i in p], dtype=np.int64)
    size_g = np.array([truth_sizes[int(i)] for i in g], dtype=np.int64)
    iou = inter / np.maximum(size_p + size_g - inter, 1)
    scores = np.array([pred_sizes[int(i)] for i in pred_ids], dtype=np.float64)
    score_kind = "voxel count"
    if read_probability is not None:
        sums: dict[int, float] = {}
        for start, stop in iter_slabs(num_slices, slab):
            pred = np.asarray(read_prediction(start, stop)).astype(np.int64).ravel()
            prob = np.asarray(read_probability(start, stop), dtype=np.float64).ravel()
            keys, index = np.unique(pred, return_inverse=True)
            for key, value in zip(keys.tolist(), np.bincount(index, weights=prob).tolist()):
                sums[key] = sums.get(key, 0.0) + value
        scores = np.array([sums.get(int(i), 0.0) / pred_sizes[int(i)] for i in pred_ids])
        score_kind = "mean foreground probability"
    matched = iou > 0.5
    tp = int(matched.sum())
    n_pred, n_truth = len(pred_ids), len(truth_ids)
    precision = tp / n_pred if n_pred else float("nan")
    recall = tp / n_truth if n_truth else float("nan")
    f1 = 2 * tp / (n_pred + n_truth) if n_pred + n_truth else float("nan")
    # Split: >= 2 predictions mostly inside one ground-truth object; merge: >= 2 ground-truth objects
    # mostly inside one prediction.
    inside_truth = inter > 0.5 * size_p
    inside_pred = inter > 0.5 * size_g
    split = int((np.bincount(np.searchsorted(truth_ids, g[inside_truth]), minlength=n_truth) >= 2).sum()) \
        if n_truth else 0
    merged = int((np.bincount(np.searchsorted(pred_ids, p[inside_pred]), minlength=n_pred) >= 2).sum()) \
        if n_pred else 0
    pairs = (p, g, iou)
    return {
        "objects_predicted": n_pred, "objects_truth": n_truth, "true_positives_iou50": tp,
        "precision_iou50": precision, "recall_iou50": recall, "f1_iou50": f1,
        "ap50": average_precision(scores, pred_ids, pairs, n_truth, 0.5),
        "ap75": average_precision(scores, pred_ids, pairs, n_truth, 0.75),
        "mean_matched_iou": float(iou[matched].mean()) if tp else float("nan"),
        "split_truth_objects": split, "merged_predictions": merged, "ap_score": score_kind,
    }
