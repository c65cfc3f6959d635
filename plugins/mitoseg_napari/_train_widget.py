"""Train widget: label a few slices, train semi-supervised, watch it learn, correct, retrain.

The loop, in rounds (each an ordinary run folder, see ``_training``):

1. **Train** a round from the image layer and the slices painted in a Labels
   layer (a slice counts as labeled when it holds any painted pixel; the list
   lets you leave some out, the validation field names slices that validate
   instead of training). The trainer runs in a separate process
   (``mitoseg train``): the viewer stays responsive; **Cancel** stops it with a
   checkpoint (``last.pt`` at the iteration reached; ``mitoseg train --resume
   --out ROUND`` continues it).
2. While it trains the widget follows the run folder: the progress bar and
   the live plot (loss, mask ratio, DAW's threshold, validation score) from
   ``metrics.jsonl``; at each checkpoint (written with each validation) the
   model predicts the current slice into the ``<image> prediction`` layer; the
   pseudo-label inspector dock opens on the run's inspection files and moves to
   each new one. When the round ends, the whole volume is predicted with
   ``best.pt`` in the background.
3. **Copy prediction to labels** puts the prediction of the current slice into
   the Labels layer where it is unpainted (painted pixels are kept; napari's
   undo reverts it): correct it with the brush, eraser and fill, and the slice
   joins the labeled set.
4. **Continue** fine-tunes from the last round's ``last.pt`` (``model.init_from``)
   on the enlarged labeled set, in a new round folder that records its parent.

The history table lists each round: labeled slices, validation score, status.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_info
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QComboBox,
    QDockWidget,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import create_worker

from mitoseg.errors import MitosegError
from mitoseg.runs import INSPECT, LAST, METRICS, RunFolder
from mitoseg_napari._layers import LAYER_KEY, report_error
from mitoseg_napari._objects import voxel_size_nm
from mitoseg_napari._plots import TrainingPlots
from mitoseg_napari._predict_widget import DEVICES, predict_steps, suggest_slices, volume_from_layer
from mitoseg_napari._qt_utils import LayerCombo, PathEdit, scroll_body
from mitoseg_napari._training import (
    METHODS,
    RUNNING,
    STATUS_BY_EXIT,
    MetricsFollower,
    RoundRequest,
    cancel_training,
    check_request,
    failure_line,
    labeled_slices,
    parse_slices,
    predict_slice,
    prepare_round,
    read_round,
    round_dirs,
    start_training,
    write_round,
)

INSPECTOR_DOCK_NAME = "mitoseg: pseudo-label inspector"
POLL_MS = 300  # how often the run folder is looked at while training (a stat and a read of the new lines)
HISTORY_COLUMNS = ("round", "method", "labeled", "val", "iters", "score", "status")


class TrainWidget(QWidget):
    """Image + painted Labels layer -> training rounds, live progress, predictions, corrections."""

    #: the round folder, once its training process has started
    round_started = Signal(str)
    #: "done", "cancelled", "diverged" or "failed", when a round has ended (after the final prediction)
    round_finished = Signal(str)
    #: (iteration, total iterations) of the running round
    progressed = Signal(int, int)
    #: (slice, iteration of the checkpoint) after each prediction of one slice
    slice_predicted = Signal(int, int)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self._viewer = napari_viewer
        self.process = None
        self.run_dir: Path | None = None
        self.record: dict | None = None
        self.records: list[dict] = []
        self.total = 0
        self.follower: MetricsFollower | None = None
        self.prepare_worker = None
        self.predict_worker = None
        self._pending = None  # ("slice", z, checkpoint) or ("volume", checkpoint): the next prediction to run
        self._job = None  # the running prediction's
        self.rounds: list[dict] = []  # the history's records (read_round)
        self._finish_status: str | None = None  # emitted once the final prediction is placed
        self._checkpoint_stamp = None
        self._inspections = 0
        self._volume = None  # the image layer's data of the running round, as an _ArrayVolume
        self._voxel_size = None  # its (z, y, x) nm from the layer's scale and units, when they are lengths
        self._image_name = ""
        self._layer_place: dict = {}
        self._normalization = None
        self._excluded: set[int] = set()
        self._watched = None  # the Labels layer whose painting refreshes the slice list
        self.inspector = None
        self._inspector_dock = None

        self.image_layer = LayerCombo(napari_viewer, (Image,))
        self.labels_layer = LayerCombo(napari_viewer, (Labels,))
        self.slices = QListWidget()
        self.slices.setMinimumHeight(60)
        self.slices.setMaximumHeight(100)
        self.slices.setToolTip("slices holding painted pixels; uncheck a slice to leave it out of training")
        self.validation = QLineEdit()
        self.validation.setPlaceholderText("optional: labeled slices that validate, e.g. 7 or 20:24")
        self.method = QComboBox()
        self.method.addItems(list(METHODS))
        self.method.setCurrentText("daw")
        self.iterations = QSpinBox()
        self.iterations.setRange(1, 10_000_000)
        self.iterations.setValue(1000)
        self.minutes = QDoubleSpinBox()
        self.minutes.setRange(0.0, 100_000.0)
        self.minutes.setDecimals(1)
        self.minutes.setSpecialValueText("none")
        self.minutes.setSuffix(" min")
        self.minutes.setToolTip("stop after this many minutes (at a log step, with a validation and last.pt), "
                                "if the iterations are not done by then; the schedule still spans the iterations")
        self.device = QComboBox()
        self.device.addItems(DEVICES)
        self.output = PathEdit("a folder for the rounds (round_001, round_002, ...)", folder=True)
        self.extra = QPlainTextEdit()
        self.extra.setPlaceholderText("extra settings, one KEY=VALUE per line (as mitoseg train --set), "
                                      "e.g. optim.lr=0.001")
        self.extra.setMaximumHeight(max(80, self.extra.minimumSizeHint().height()))
        self.train_button = QPushButton("Train")
        self.train_button.setToolTip("a new round from scratch on the labeled slices")
        self.continue_button = QPushButton("Continue")
        self.continue_button.setToolTip("fine-tune from the last round's last.pt on the labeled slices, now "
                                        "including the corrected ones, in a new round")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("no round running")
        self.status = QLabel("Paint mitochondria in a few slices of a Labels layer, choose an output folder, Train.")
        self.status.setWordWrap(True)
        self.plots = TrainingPlots()
        self.predict_button = QPushButton("Predict slice")
        self.predict_button.setToolTip("predict the current slice with the latest checkpoint")
        self.copy_button = QPushButton("Copy prediction to labels")
        self.copy_button.setToolTip("the prediction of the current slice fills its unpainted pixels in the Labels "
                                    "layer (undo with Ctrl-Z); the slice then counts as labeled")
        self.history = QTableWidget(0, len(HISTORY_COLUMNS))
        self.history.setHorizontalHeaderLabels(list(HISTORY_COLUMNS))
        self.history.verticalHeader().setVisible(False)
        self.history.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.history.setSelectionBehavior(QAbstractItemView.SelectRows)
        header = self.history.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeToContents)
        header.setSectionResizeMode(HISTORY_COLUMNS.index("labeled"), QHeaderView.Stretch)
        self.history.setMinimumHeight(90)
        self.history.setMaximumHeight(130)
        self.suggestions = QListWidget()
        self.suggestions.setMinimumHeight(60)
        self.suggestions.setMaximumHeight(110)
        self.suggestions.setWordWrap(True)
        self.suggestions.setToolTip("after each round, the slices worth labeling next (mitoseg suggest); click one "
                                    "to go to it; '<image> uncertainty' shows where the model is unsure")
        self.suggestion: object | None = None  # the last round's mitoseg.suggest.Suggestion

        form = QFormLayout()
        form.addRow("Image layer", self.image_layer)
        form.addRow("Labels layer", self.labels_layer)
        form.addRow("Labeled slices", self.slices)
        form.addRow("Validation slices", self.validation)
        form.addRow("Method", self.method)
        form.addRow("Iterations", self.iterations)
        form.addRow("or stop after", self.minutes)
        form.addRow("Device", self.device)
        form.addRow("Output folder", self.output)
        form.addRow("Extra settings", self.extra)
        buttons = QHBoxLayout()
        for button in (self.train_button, self.continue_button, self.cancel_button):
            buttons.addWidget(button)
        correct = QHBoxLayout()
        correct.addWidget(self.predict_button)
        correct.addWidget(self.copy_button)
        layout = QVBoxLayout(scroll_body(self))
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.plots, 1)
        layout.addLayout(correct)
        layout.addWidget(QLabel("Label next"))
        layout.addWidget(self.suggestions)
        layout.addWidget(QLabel("Rounds"))
        layout.addWidget(self.history)

        self.timer = QTimer(self)
        self.timer.setInterval(POLL_MS)
        self.timer.timeout.connect(self.poll)
        self._slice_timer = QTimer(self)  # painting fires many events: the list is refreshed once they pause
        self._slice_timer.setSingleShot(True)
        self._slice_timer.setInterval(250)
        self._slice_timer.timeout.connect(self.refresh_slices)

        self.train_button.clicked.connect(lambda: self.start_round(continue_from_last=False))
        self.continue_button.clicked.connect(lambda: self.start_round(continue_from_last=True))
        self.cancel_button.clicked.connect(self.cancel)
        self.predict_button.clicked.connect(self.predict_current_slice)
        self.copy_button.clicked.connect(self.copy_prediction_to_labels)
        self.labels_layer.currentIndexChanged.connect(self._watch_labels)
        self.slices.itemChanged.connect(self._on_slice_checked)
        self.suggestions.itemClicked.connect(self._go_to_suggestion)
        self.output.edit.editingFinished.connect(self.refresh_history)
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._stop_process)  # no orphan trainer when napari quits
        self._watch_labels()
        self._update_buttons()

    # ------------------------------------------------------------------ labeled slices

    def _watch_labels(self, *args) -> None:
        layer = self.labels_layer.layer()
        if layer is self._watched:
            return
        if self._watched is not None:
            for emitter in (self._watched.events.paint, self._watched.events.data):
                emitter.disconnect(self._schedule_slice_refresh)
        self._watched = layer
        if layer is not None:
            layer.events.paint.connect(self._schedule_slice_refresh)
            layer.events.data.connect(self._schedule_slice_refresh)
        self.refresh_slices()

    def _schedule_slice_refresh(self, event=None) -> None:
        self._slice_timer.start()

    def refresh_slices(self) -> None:
        """List the slices of the Labels layer that hold painted pixels (checked unless left out)."""
        layer = self.labels_layer.layer()
        self.slices.blockSignals(True)
        self.slices.clear()
        if layer is not None and layer.data.ndim == 3:
            data = layer.data
            for z in labeled_slices(data):
                count = int(np.count_nonzero(np.asarray(data[z])))
                item = QListWidgetItem(f"slice {z}: {count:,} painted pixels")
                item.setData(Qt.UserRole, z)
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Unchecked if z in self._excluded else Qt.Checked)
                self.slices.addItem(item)
        self.slices.blockSignals(False)

    def _on_slice_checked(self, item: QListWidgetItem) -> None:
        z = int(item.data(Qt.UserRole))
        if item.checkState() == Qt.Checked:
            self._excluded.discard(z)
        else:
            self._excluded.add(z)

    def labeled(self) -> list[int]:
        """The painted slices shown in the list (checked or not)."""
        return [int(self.slices.item(i).data(Qt.UserRole)) for i in range(self.slices.count())]

    def set_excluded(self, slices) -> None:
        """Leave ``slices`` out of training (as unchecking them in the list)."""
        self._excluded = {int(z) for z in slices}
        self.refresh_slices()

    # ------------------------------------------------------------------ rounds

    @property
    def running(self) -> bool:
        """A round is being prepared, trains, or waits for its final prediction."""
        return self.process is not None or self.prepare_worker is not None or self._finish_status is not None

    def session(self) -> Path | None:
        text = self.output.text()
        return Path(text).expanduser() if text else None

    def last_round(self) -> Path | None:
        """The latest round of the output folder with a last.pt: what Continue fine-tunes from."""
        session = self.session()
        for run_dir in reversed(round_dirs(session) if session is not None else []):
            if (run_dir / LAST).is_file():
                return run_dir
        return None

    def start_round(self, continue_from_last: bool = False) -> None:
        """Train (a new round from scratch) or Continue (fine-tune from the last round); nothing while a round
        runs."""
        if self.running:
            return
        try:
            request = self._request(continue_from_last)
        except MitosegError as exc:
            report_error(exc, "Train")
            self.status.setText(f"Not started: {exc}")
            return
        self._image_name = request.image_name
        layer = self.image_layer.layer()
        self._layer_place = {"scale": tuple(layer.scale), "translate": tuple(layer.translate)}
        self._volume = volume_from_layer(layer)
        self._voxel_size = voxel_size_nm(layer)
        self._normalization = None
        worker = create_worker(prepare_round, request, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_prepared)
        worker.errored.connect(self._on_prepare_failed)
        worker.finished.connect(self._on_prepare_finished)
        self.prepare_worker = worker
        what = f"Continue from {request.parent.name}" if request.parent is not None else "Train"
        self.status.setText(f"{what}: writing the round's labels and config ...")
        self._update_buttons()
        worker.start()

    def _request(self, continue_from_last: bool) -> RoundRequest:
        session = self.session()
        if session is None:
            raise MitosegError("choose an output folder for the rounds")
        image_layer, labels_layer = self.image_layer.layer(), self.labels_layer.layer()
        if image_layer is None:
            raise MitosegError("choose an image layer")
        if labels_layer is None:
            raise MitosegError("choose a Labels layer with painted slices (Layers > New Labels layer, then paint)")
        volume = volume_from_layer(image_layer)
        labels = np.array(labels_layer.data, copy=True)  # what is painted now; painting on goes to the next round
        self.refresh_slices()
        painted = labeled_slices(labels)
        val = parse_slices(self.validation.text(), volume.shape[0], "validation slices")
        train = [z for z in painted if z not in self._excluded and z not in val]
        parent = None
        if continue_from_last:
            parent = self.last_round()
            if parent is None:
                raise MitosegError(f"Continue needs a finished or cancelled round with last.pt in {session}; "
                                   "Train one first")
        overrides = [line.strip() for line in self.extra.toPlainText().splitlines() if line.strip()]
        request = RoundRequest(
            session=session, image=volume.data, image_name=image_layer.name, labels=labels,
            labels_name=labels_layer.name, train_slices=train, val_slices=val,
            excluded_slices=sorted(z for z in self._excluded if z in painted), method=self.method.currentText(),
            iterations=self.iterations.value(), max_minutes=self.minutes.value() or None,
            device=self.device.currentText(), overrides=overrides, parent=parent)
        check_request(request)
        return request

    def _on_prepared(self, result: dict) -> None:
        self.run_dir = Path(result["run_dir"])
        self.record = result["record"]
        self.total = self.record["iterations"]
        self.records = []
        self.follower = MetricsFollower(self.run_dir / METRICS)
        self._checkpoint_stamp = None
        self._inspections = 0
        try:
            self.process = start_training(self.run_dir, self.record["max_minutes"])
        except OSError as exc:
            self.record["status"] = "failed"
            write_round(self.run_dir, self.record)
            report_error(MitosegError(f"cannot start the training process: {exc}"), "Train")
            self.refresh_history()
            self.round_finished.emit("failed")
            return
        self.record["status"] = RUNNING
        write_round(self.run_dir, self.record)
        self.progress.setRange(0, self.total)
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m iterations")
        parent = f", fine-tuning {Path(self.record['parent']).name}" if self.record["parent"] else ""
        self.status.setText(f"{self.run_dir.name}: {self.record['method']} on slices "
                            f"{_slices_text(self.record['labeled_slices'])}{parent}; starting ...")
        self.plots.show_records([], self.total, self._plot_title())
        self.refresh_history()
        self.timer.start()
        self.round_started.emit(str(self.run_dir))

    def _on_prepare_failed(self, exc: Exception) -> None:
        report_error(exc, "Train")
        self.status.setText(f"Not started: {exc}")

    def _on_prepare_finished(self) -> None:
        self.prepare_worker = None
        self._update_buttons()

    def cancel(self) -> None:
        """Stop the running round: the trainer finishes its iteration and saves last.pt (resumable)."""
        if self.process is not None:
            cancel_training(self.process)
            self.cancel_button.setEnabled(False)
            self.status.setText(f"{self.run_dir.name}: cancelling: saving last.pt at the end of this iteration ...")

    def _stop_process(self) -> None:
        if self.process is not None:
            cancel_training(self.process)

    # ------------------------------------------------------------------ following the run

    def poll(self) -> None:
        """Read what the trainer wrote since the last look; handle its end."""
        if self.run_dir is None:
            return
        new = self.follower.read_new()
        if self.follower.reset:
            self.records = []
        if new:
            self.records += new
            done = max(r["iter"] for r in self.records)
            self.progress.setValue(min(done, self.total))
            self.status.setText(self._progress_text(done))
            self.plots.show_records(self.records, self.total, self._plot_title())
            self.progressed.emit(done, self.total)
        self._follow_checkpoint()
        self._follow_inspections()
        if self.process is not None and self.process.poll() is not None:
            self._on_process_end(self.process.returncode)

    def _progress_text(self, iteration: int) -> str:
        text = f"{self.run_dir.name}: iteration {iteration} / {self.total}"
        train = [r for r in self.records if r.get("split") == "train"]
        val = [r for r in self.records if r.get("split") == "val"]
        if train and isinstance(train[-1].get("loss"), (int, float)):
            text += f", loss {train[-1]['loss']:.3f}"
        if val:
            metric = "fg_iou" if "fg_iou" in val[-1] else "miou"
            if isinstance(val[-1].get(metric), (int, float)):
                text += f", validation {metric} {val[-1][metric]:.3f}"
        return text

    def _plot_title(self) -> str:
        return f"{self.run_dir.name}: {self.record['method']}" if self.run_dir is not None else ""

    def _follow_checkpoint(self) -> None:
        """A new last.pt (written with each validation): the current model predicts the current slice."""
        try:
            stat = (self.run_dir / LAST).stat()
        except OSError:
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._checkpoint_stamp:
            self._checkpoint_stamp = stamp
            if self.process is not None:  # a finished round is predicted whole instead
                self._request_prediction(("slice", self.current_slice(), self.run_dir / LAST))

    def _follow_inspections(self) -> None:
        folder = self.run_dir / INSPECT
        try:
            count = sum(1 for entry in os.scandir(folder) if entry.name.endswith(".npz"))
        except OSError:
            return
        if count != self._inspections:
            self._inspections = count
            self._show_inspector()

    def _show_inspector(self) -> None:
        from mitoseg_napari._inspector_widget import InspectorWidget

        alive = self.inspector is not None
        if alive:
            try:
                self.inspector.objectName()
            except RuntimeError:  # its dock was closed and deleted
                alive = False
        if not alive:
            self.inspector = InspectorWidget(self._viewer, translate=self._inspector_translate())
            self._inspector_dock = self._viewer.window.add_dock_widget(self.inspector, name=INSPECTOR_DOCK_NAME,
                                                                       area="right", tabify=True)
            self._raise_own_dock()  # the inspector's tab opens behind this one: its plots dock shows below
        self.inspector.open_run(self.run_dir)

    def _raise_own_dock(self) -> None:
        widget = self.parentWidget()
        while widget is not None and not isinstance(widget, QDockWidget):
            widget = widget.parentWidget()
        if widget is not None:
            widget.raise_()

    def _inspector_translate(self) -> tuple[float, float, float]:
        """The inspection patches go to the right of the image, so the two do not overlap."""
        layer = self.image_layer.layer()
        if layer is None or layer.ndim != 3:
            return (0.0, 0.0, 0.0)
        low, high = layer.extent.world[0][-1], layer.extent.world[1][-1]
        return (0.0, 0.0, float(high + 0.05 * (high - low)))

    def _on_process_end(self, code: int) -> None:
        self.timer.stop()
        self.process = None
        self.cancel_button.setEnabled(False)
        # What the trainer wrote after the last look (its last records, last.pt, the last inspection file).
        new = self.follower.read_new()
        self.records = ([] if self.follower.reset else self.records) + new
        if self.records:
            self.progress.setValue(min(max(r["iter"] for r in self.records), self.total))
        self.plots.show_records(self.records, self.total, self._plot_title())
        self._follow_inspections()
        status = STATUS_BY_EXIT.get(code, "failed")
        self.record["status"] = status
        self.record["exit_status"] = code
        current = read_round(self.run_dir)
        if "score" in current:
            self.record["score"] = current["score"]
        write_round(self.run_dir, self.record)
        self.refresh_history()
        name = self.run_dir.name
        if status == "done":
            checkpoint = RunFolder(self.run_dir).final_checkpoint()
            self.status.setText(f"{name}: done; predicting the whole volume with {checkpoint.name} ...")
            self._finish_status = status
            self._request_prediction(("volume", checkpoint))
            return
        if status == "cancelled":
            self.status.setText(f"{name}: cancelled; last.pt is saved (mitoseg train --resume --out {self.run_dir} "
                                "continues it, or Continue fine-tunes from it)")
            show_info(f"mitoseg: {name} cancelled; last.pt is saved")
        else:
            message = failure_line(self.run_dir)
            self.status.setText(f"{name}: {status}: {message}")
            report_error(MitosegError(f"{name} {status}: {message}"), "Train")
        self._finish(status)

    def _finish(self, status: str) -> None:
        self._finish_status = None
        self._update_buttons()
        self.round_finished.emit(status)

    # ------------------------------------------------------------------ predictions

    def current_slice(self) -> int:
        """The slice of the image shown in the viewer."""
        layer = self.image_layer.layer() or self.labels_layer.layer()
        if layer is None:
            return 0
        z = int(round(float(layer.world_to_data(self._viewer.dims.point)[0])))
        return int(np.clip(z, 0, layer.data.shape[0] - 1)) if layer.ndim == 3 else 0

    def predict_current_slice(self) -> None:
        """Predict the current slice with the latest checkpoint (of the running or the last round)."""
        run_dir = self.run_dir if self.run_dir is not None and (self.run_dir / LAST).is_file() \
            else self.last_round()
        if run_dir is None:
            report_error(MitosegError("no checkpoint yet: train a round first"), "Predict slice")
            return
        if self._volume is None or self.run_dir != run_dir:
            layer = self.image_layer.layer()
            if layer is None:
                report_error(MitosegError("choose an image layer"), "Predict slice")
                return
            self._volume = volume_from_layer(layer)
            self._voxel_size = voxel_size_nm(layer)
            self._image_name = layer.name
            self._layer_place = {"scale": tuple(layer.scale), "translate": tuple(layer.translate)}
            self._normalization = None
        self._request_prediction(("slice", self.current_slice(), run_dir / LAST))

    def _request_prediction(self, job: tuple) -> None:
        """Run ``job`` now, or after the running prediction (the whole volume replaces a queued slice)."""
        if self.predict_worker is None:
            self._run_prediction(job)
        elif not (self._pending is not None and self._pending[0] == "volume" and job[0] == "slice"):
            self._pending = job

    def _run_prediction(self, job: tuple) -> None:
        if job[0] == "slice":
            _, z, checkpoint = job
            # The layer's scale in physical units: a model with a working pixel size in nm rescales the slice.
            worker = create_worker(predict_slice, self._volume, z, checkpoint, self.device.currentText(),
                                   self._normalization, self._voxel_size, _start_thread=False, _ignore_errors=True)
            worker.returned.connect(self._on_slice_predicted)
        elif job[0] == "suggest":
            worker = create_worker(suggest_slices, self._volume, str(job[1]), self.labeled(),
                                   self.device.currentText(), self._voxel_size, _start_thread=False,
                                   _ignore_errors=True)
            worker.returned.connect(self._on_suggested)
        else:
            worker = create_worker(predict_steps, self._volume, str(job[1]), None, self.device.currentText(),
                                   voxel_size=self._voxel_size, _start_thread=False, _ignore_errors=True)
            worker.yielded.connect(self._on_volume_progress)
            worker.returned.connect(self._on_volume_predicted)
        worker.errored.connect(self._on_prediction_failed)
        worker.finished.connect(self._on_prediction_finished)
        self.predict_worker = worker
        self._job = job
        worker.start()

    def prediction_layer(self, create: bool = True) -> Labels | None:
        """The ``<image> prediction`` Labels layer (uint8 classes, the image's shape), made when missing."""
        name = f"{self._image_name} prediction"
        shape = self._volume.shape if self._volume is not None else None
        if name in self._viewer.layers:
            layer = self._viewer.layers[name]
            if isinstance(layer, Labels) and shape is not None and tuple(layer.data.shape) == tuple(shape):
                return layer
            if not create:
                return layer if isinstance(layer, Labels) else None
            self._viewer.layers.remove(layer)
        if not create or shape is None:
            return None
        meta = {LAYER_KEY: {"role": "prediction", "source": self._image_name, "checkpoint": None}}
        return self._viewer.add_labels(np.zeros(shape, np.uint8), name=name, opacity=0.5, metadata=meta,
                                       **self._layer_place)

    def _on_slice_predicted(self, result: dict) -> None:
        layer = self.prediction_layer()
        layer.data[result["z"]] = result["labels"]
        layer.metadata = {LAYER_KEY: {**layer.metadata.get(LAYER_KEY, {}), "checkpoint": result["checkpoint"],
                                      "iteration": result["iteration"]}}
        layer.refresh()
        self._normalization = result.get("normalization", self._normalization)
        self.slice_predicted.emit(result["z"], result["iteration"])

    def _on_volume_progress(self, value) -> None:
        if isinstance(value, tuple):
            done, total = value
            self.status.setText(f"{self.run_dir.name}: done; predicting the whole volume: {done} / {total} slices")

    def _on_volume_predicted(self, result: dict) -> None:
        layer = self.prediction_layer()
        layer.data = result["labels"]
        layer.metadata = {LAYER_KEY: {**layer.metadata.get(LAYER_KEY, {}), "checkpoint": result["checkpoint"]}}
        score = self.record.get("score") if self.record else None
        scored = f"; best validation {score[0]} {score[1]:.3f}" if score else ""
        self.status.setText(f"{self.run_dir.name}: done{scored}; '{layer.name}' holds the whole volume's "
                            "prediction. Copy a slice to the labels, correct it, Continue.")

    def _on_prediction_failed(self, exc: Exception) -> None:
        report_error(exc, "Train: prediction")

    def _on_suggested(self, result: dict) -> None:
        """The suggestions as a list (click: go to the slice) and the uncertainty map as a layer."""
        suggestion = result["suggestion"]
        self.suggestion = suggestion
        self.suggestions.clear()
        for s in suggestion.chosen:
            item = QListWidgetItem(f"{s.rank}. {s.reason}")
            item.setData(Qt.UserRole, s.index)
            self.suggestions.addItem(item)
        if not suggestion.chosen:
            self.suggestions.addItem("no slice to suggest: every candidate is labeled or next to a labeled one")
        name = f"{self._image_name} uncertainty"
        meta = {LAYER_KEY: {"role": "uncertainty", "source": self._image_name, "checkpoint": result["checkpoint"]}}
        if name in self._viewer.layers and tuple(self._viewer.layers[name].data.shape) == result["map"].shape:
            layer = self._viewer.layers[name]
            layer.data, layer.metadata = result["map"], meta
        else:
            if name in self._viewer.layers:
                self._viewer.layers.remove(name)
            self._viewer.add_image(result["map"], name=name, colormap="magma", blending="additive", opacity=0.6,
                                   contrast_limits=(0.0, 1.0), visible=False, metadata=meta, **self._layer_place)

    def _go_to_suggestion(self, item: QListWidgetItem) -> None:
        z = item.data(Qt.UserRole)
        if z is None:
            return
        layer = self.image_layer.layer() or self.labels_layer.layer()
        world = layer.data_to_world((int(z), 0, 0))[0] if layer is not None and layer.ndim == 3 else float(z)
        self._viewer.dims.set_point(0, world)

    def _on_prediction_finished(self) -> None:
        self.predict_worker = None
        job, self._job = self._job, None
        if job is not None and job[0] == "volume" and self._finish_status == "done":
            self._run_prediction(("suggest", job[1]))  # what to label next, before the round is declared over
            return
        if job is not None and job[0] in ("volume", "suggest") and self._finish_status is not None:
            self._finish(self._finish_status)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._run_prediction(pending)

    def copy_prediction_to_labels(self) -> None:
        """The prediction of the current slice fills the slice's unpainted pixels of the Labels layer."""
        labels = self.labels_layer.layer()
        if not self._image_name and self.image_layer.layer() is not None:
            self._image_name = self.image_layer.layer().name
        prediction = self.prediction_layer(create=False)
        try:
            if labels is None:
                raise MitosegError("choose the Labels layer to copy into")
            if prediction is None:
                raise MitosegError("no prediction yet: train a round, or Predict slice")
            if tuple(prediction.data.shape) != tuple(labels.data.shape):
                raise MitosegError(f"the prediction has shape {tuple(prediction.data.shape)}, the labels "
                                   f"'{labels.name}' {tuple(labels.data.shape)}")
        except MitosegError as exc:
            report_error(exc, "Copy prediction to labels")
            return
        z = self.current_slice()
        predicted = np.asarray(prediction.data[z])
        painted = np.asarray(labels.data[z])
        ys, xs = np.nonzero((predicted > 0) & (painted == 0))
        if ys.size == 0:
            show_info(f"mitoseg: the prediction of slice {z} has nothing to add to '{labels.name}'")
            return
        # One undoable edit (napari's data_setitem keeps the history), painted pixels untouched.
        labels.data_setitem((np.full_like(ys, z), ys, xs), predicted[ys, xs])
        self.refresh_slices()
        self.status.setText(f"Copied {ys.size:,} predicted pixels into slice {z} of '{labels.name}': correct them "
                            "with the brush, eraser and fill, then Continue.")

    # ------------------------------------------------------------------ history

    def refresh_history(self) -> None:
        """The rounds of the output folder: labeled slices, validation score, status."""
        session = self.session()
        rounds = [read_round(run_dir) for run_dir in (round_dirs(session) if session is not None else [])]
        self.history.setRowCount(len(rounds))
        for row, record in enumerate(rounds):
            score = record.get("score")
            values = (str(record.get("round", Path(record["run_dir"]).name)), record.get("method", "?"),
                      _slices_text(record.get("labeled_slices", [])),
                      _slices_text(record.get("validation_slices", [])) or "-", str(record.get("iterations", "?")),
                      f"{score[1]:.3f}" if score else "-", record.get("status", "?"))
            tip = record["run_dir"] + (f"\nparent: {record['parent']}" if record.get("parent") else "")
            tip += f"\nbest validation {score[0]} {score[1]:.4f}" if score else "\nno validation score"
            for column, value in enumerate(values):
                item = QTableWidgetItem(value)
                item.setToolTip(tip)
                self.history.setItem(row, column, item)
        self.rounds = rounds
        self._update_buttons()

    def _update_buttons(self) -> None:
        running = self.running
        self.train_button.setEnabled(not running)
        self.continue_button.setEnabled(not running and self.last_round() is not None)
        self.cancel_button.setEnabled(self.process is not None)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        self._stop_process()
        super().closeEvent(event)


def _slices_text(slices) -> str:
    return ", ".join(str(z) for z in slices)


__all__ = ["INSPECTOR_DOCK_NAME", "TrainWidget"]
