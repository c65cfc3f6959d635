import math

import numpy as np
import torch

from mitoseg.metrics import confusion_matrix, format_table, headline_metric, scores_from_confusion


def test_confusion_matrix_counts_and_ignore():
    pred = torch.tensor([0, 1, 1, 0, 1, 2])
    target = torch.tensor([0, 1, 0, 0, 255, 2])
    matrix = confusion_matrix(pred, target, 3, ignore_index=255)
    expected = torch.tensor([[2, 1, 0], [0, 1, 0], [0, 0, 1]])
    assert torch.equal(matrix, expected)


def test_scores_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, size=5000)
    target = rng.integers(0, 3, size=5000)
    scores = scores_from_confusion(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), 3))
    for k in range(3):
        tp = np.sum((pred == k) & (target == k))
        fp = np.sum((pred == k) & (target != k))
        fn = np.sum((pred != k) & (target == k))
        assert math.isclose(scores["per_class"]["iou"][k], tp / (tp + fp + fn))
        assert math.isclose(scores["per_class"]["dice"][k], 2 * tp / (2 * tp + fp + fn))
        assert math.isclose(scores["per_class"]["precision"][k], tp / (tp + fp))
        assert math.isclose(scores["per_class"]["recall"][k], tp / (tp + fn))
    assert math.isclose(scores["miou"], np.mean(scores["per_class"]["iou"]))
    assert "fg_iou" not in scores
    assert headline_metric(scores)[0] == "miou"


def test_binary_scores_report_foreground_iou_and_skip_absent_classes():
    pred = torch.tensor([1, 1, 0, 0])
    target = torch.tensor([1, 0, 0, 0])
    scores = scores_from_confusion(confusion_matrix(pred, target, 2))
    assert math.isclose(scores["fg_iou"], 0.5)
    assert headline_metric(scores) == ("fg_iou", scores["fg_iou"])
    absent = scores_from_confusion(confusion_matrix(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 3))
    assert math.isnan(absent["per_class"]["iou"][2])
    assert absent["miou"] == 1.0
    assert "fg_iou" in format_table(scores)
