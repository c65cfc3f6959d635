"""Evaluate widget: a prediction layer and a ground-truth layer give IoU / Dice and an error layer.

Scores come from :func:`mitoseg.metrics.confusion_matrix` and
:func:`mitoseg.metrics.scores_from_confusion` (the numbers ``mitoseg
evaluate`` prints), accumulated slice by slice in a worker thread. The error
layer marks false positives (predicted foreground on background), false
negatives (background predicted on foreground) and, with more than two
classes, foreground of the wrong class.
"""

from __future__ import annotations

import math

import numpy as np
from napari.layers import Labels
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QFormLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import create_worker

from mitoseg.errors import MitosegError
from mitoseg_napari._layers import (
    ERROR_NAMES,
    FALSE_NEGATIVE,
    FALSE_POSITIVE,
    LAYER_KEY,
    WRONG_CLASS,
    direct_colormap,
    label_features,
    report_error,
)
from mitoseg_napari._qt_utils import LayerCombo, scroll_body

METRICS = ("iou", "dice", "precision", "recall")
_HEADERS = ("IoU", "Dice", "Precision", "Recall")


def error_map(prediction: np.ndarray, target: np.ndarray) -> np.ndarray:
    """uint8: 1 = false positive, 2 = false negative, 3 = wrong foreground class, 0 = correct."""
    out = np.zeros(prediction.shape, np.uint8)
    wrong = prediction != target
    out[wrong & (target == 0)] = FALSE_POSITIVE
    out[wrong & (prediction == 0)] = FALSE_NEGATIVE
    out[wrong & (target != 0) & (prediction != 0)] = WRONG_CLASS
    return out


def evaluate_arrays(prediction, target) -> dict:
    """Worker: scores, error map and its per-kind pixel counts of two label arrays of the same shape."""
    from mitoseg.metrics import confusion_matrix, scores_from_confusion

    if tuple(prediction.shape) != tuple(target.shape):
        raise MitosegError(f"the prediction has shape {tuple(prediction.shape)} but the ground truth has "
                           f"{tuple(target.shape)}; they must match")
    pred = np.asarray(prediction)
    truth = np.asarray(target)
    if pred.dtype.kind not in "biu" or truth.dtype.kind not in "biu":
        raise MitosegError("prediction and ground truth must hold integer class ids")
    if (pred.size and pred.min() < 0) or (truth.size and truth.min() < 0):
        raise MitosegError("class ids must not be negative")
    num_classes = max(2, int(pred.max(initial=0)) + 1, int(truth.max(initial=0)) + 1)
    matrix = None
    planes = zip(pred.reshape(-1, *pred.shape[-2:]), truth.reshape(-1, *truth.shape[-2:]))
    for p, t in planes:
        m = confusion_matrix(p, t, num_classes)
        matrix = m if matrix is None else matrix + m
    scores = scores_from_confusion(matrix)
    scores["confusion"] = matrix.tolist()
    errors = error_map(pred, truth)
    # Counted here, not in the GUI thread: a pass over the whole volume.
    counts = np.bincount(errors.ravel(), minlength=len(ERROR_NAMES) + 1)
    return {"scores": scores, "errors": errors, "counts": {value: int(counts[value]) for value in ERROR_NAMES}}


class EvaluateWidget(QWidget):
    """Prediction + ground truth Labels layers -> IoU / Dice table and an error layer."""

    #: emitted when an evaluation ends: "done" or "failed"
    evaluation_done = Signal(str)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self._viewer = napari_viewer
        self.worker = None
        self.scores: dict | None = None
        self.prediction_layer = LayerCombo(napari_viewer, (Labels,))
        self.truth_layer = LayerCombo(napari_viewer, (Labels,))
        self.evaluate_button = QPushButton("Evaluate")
        self.table = QTableWidget(0, len(_HEADERS))
        self.table.setHorizontalHeaderLabels(_HEADERS)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.setMinimumHeight(120)
        self.status = QLabel("Choose a prediction and a ground-truth Labels layer.")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Prediction", self.prediction_layer)
        form.addRow("Ground truth", self.truth_layer)
        layout = QVBoxLayout(scroll_body(self))
        layout.addLayout(form)
        layout.addWidget(self.evaluate_button)
        layout.addWidget(self.table)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self.evaluate_button.clicked.connect(self.evaluate)
        napari_viewer.layers.events.inserted.connect(self._guess_layers)
        self._guess_layers()

    def _guess_layers(self, event=None) -> None:
        """Preselect a layer named like a prediction and another one as ground truth, unless the user
        already chose two different layers."""
        names = [layer.name for layer in self._viewer.layers if isinstance(layer, Labels)]
        preds = [n for n in names if "prediction" in n.lower() and not n.endswith(" errors")]
        truths = [n for n in names if n not in preds and not n.endswith(" errors")]
        current = self.prediction_layer.currentText()
        if preds and (current == self.truth_layer.currentText() or current not in preds):
            self.prediction_layer.setCurrentText(preds[-1])
        if truths and self.truth_layer.currentText() in (self.prediction_layer.currentText(), ""):
            self.truth_layer.setCurrentText(truths[0])
        elif truths and self.truth_layer.currentText() in preds:
            self.truth_layer.setCurrentText(truths[0])

    def evaluate(self) -> None:
        if self.worker is not None:
            return
        pred, truth = self.prediction_layer.layer(), self.truth_layer.layer()
        try:
            if pred is None or truth is None:
                raise MitosegError("choose a prediction layer and a ground-truth layer (Labels layers)")
            if pred is truth:
                raise MitosegError("the prediction and the ground truth are the same layer")
        except MitosegError as exc:
            report_error(exc, "Evaluate")
            return
        self._pair = (pred.name, truth.name, tuple(pred.scale), tuple(pred.translate))
        worker = create_worker(evaluate_arrays, pred.data, truth.data, _start_thread=False,
                               _ignore_errors=True)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._outcome = "failed"
        self.evaluate_button.setEnabled(False)
        self.status.setText(f"Evaluating '{pred.name}' against '{truth.name}' ...")
        worker.start()

    def _on_returned(self, result: dict) -> None:
        scores = result["scores"]
        self.scores = scores
        pred_name, truth_name, scale, translate = self._pair
        classes = scores["classes"]
        self.table.setRowCount(len(classes) + 1)
        self.table.setVerticalHeaderLabels([f"class {c}" for c in classes] + ["mean"])
        for row in range(len(classes)):
            for col, metric in enumerate(METRICS):
                self.table.setItem(row, col, QTableWidgetItem(_fmt(scores["per_class"][metric][row])))
        self.table.setItem(len(classes), 0, QTableWidgetItem(_fmt(scores["miou"])))
        self.table.setItem(len(classes), 1, QTableWidgetItem(_fmt(scores["mdice"])))
        for col in (2, 3):
            self.table.setItem(len(classes), col, QTableWidgetItem(""))
        errors = result["errors"]
        name = f"{pred_name} errors"
        kwargs = {"colormap": direct_colormap(ERROR_NAMES), "features": label_features(ERROR_NAMES, "error"),
                  "metadata": {LAYER_KEY: {"role": "errors", "prediction": pred_name, "truth": truth_name}}}
        layer = self._viewer.layers[name] if name in self._viewer.layers else None
        if isinstance(layer, Labels) and layer.data.shape == errors.shape:
            # Reused so that the user's opacity and visibility stay; placed where the prediction is now.
            layer.data = errors
            layer.scale, layer.translate = scale, translate
            layer.metadata = kwargs["metadata"]
        else:
            self._viewer.add_labels(errors, name=name, scale=scale, translate=translate, opacity=0.7, **kwargs)
        counts = result["counts"]
        headline = f"fg IoU = {_fmt(scores['fg_iou'])}, fg Dice = {_fmt(scores['fg_dice'])}; " \
            if "fg_iou" in scores else f"mIoU = {_fmt(scores['miou'])}; "
        self.status.setText(f"{headline}{counts[FALSE_POSITIVE]:,} false positive and {counts[FALSE_NEGATIVE]:,} "
                            f"false negative pixels" + (f", {counts[WRONG_CLASS]:,} of a wrong class"
                                                        if counts[WRONG_CLASS] else "") + f" (layer '{name}').")
        self._outcome = "done"

    def _on_error(self, exc: Exception) -> None:
        self.status.setText(f"Failed: {exc}")
        report_error(exc, "Evaluate")

    def _on_finished(self) -> None:
        self.worker = None
        self.evaluate_button.setEnabled(True)
        self.evaluation_done.emit(self._outcome)


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
