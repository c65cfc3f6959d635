"""Pseudo-label inspector: a run folder's inspection files, iteration by iteration.

Layers (one set per run, updated in place when the iteration changes, so the
user's contrast and visibility choices stay): the unlabeled patches, their
pseudo-labels, the weight (used / discarded in two colours), the confidence,
the log-density for DDFP runs, and, when the run had analysis labels, the four
outcomes (correct used, wrong used, correct discarded, wrong discarded). The
numbers the run recorded (``used_pixels``, ``discarded_pixels``, ``tau``, ...)
are shown in the widget; the plot dock shows histograms and curves. Files are
read in a worker thread.
"""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QPushButton, QSizePolicy, QSlider, QVBoxLayout, QWidget
from superqt.utils import create_worker

from mitoseg.errors import MitosegError
from mitoseg_napari._inspection import (
    OUTCOME_NAMES,
    Inspection,
    list_inspections,
    load_inspection,
    read_train_metrics,
    resolve_run_dir,
)
from mitoseg_napari._layers import COLORS, LAYER_KEY, inspection_layer_data, report_error
from mitoseg_napari._plots import InspectionPlots
from mitoseg_napari._qt_utils import PathEdit, scroll_body

PLOT_DOCK_NAME = "mitoseg: pseudo-label plots"


def _open_run(path: str, iteration: int | None = None) -> dict:
    """Worker: the run's inspection files, its training records and its inspection at ``iteration``
    (the latest one when None or not saved)."""
    run_dir = resolve_run_dir(path)
    files = list_inspections(run_dir)
    iterations = [it for it, _ in files]
    index = iterations.index(iteration) if iteration in iterations else len(files) - 1
    return {"run_dir": run_dir, "files": files, "records": read_train_metrics(run_dir),
            "index": index, "inspection": load_inspection(files[index][1], run_dir)}


def _load(run_dir: Path, files: list, index: int) -> dict:
    return {"index": index, "inspection": load_inspection(files[index][1], run_dir),
            "records": read_train_metrics(run_dir)}


def _swatch(name: str) -> str:
    r, g, b = (int(255 * c) for c in COLORS[name][:3])
    return f'<span style="color: rgb({r},{g},{b})">&#9632;</span>'


class InspectorWidget(QWidget):
    """Open a run folder; a slider over its saved inspection iterations."""

    #: emitted with the iteration number once its layers and plots are shown
    iteration_shown = Signal(int)
    #: emitted with the message when opening or loading fails
    failed = Signal(str)

    def __init__(self, napari_viewer, run_dir: str | Path | None = None, translate=(0.0, 0.0, 0.0), parent=None):
        super().__init__(parent)
        self._viewer = napari_viewer
        self._translate = tuple(translate)
        self.run_dir: Path | None = None
        self.files: list[tuple[int, Path]] = []
        self.records: list[dict] = []
        self.inspection: Inspection | None = None
        self.layers: dict = {}  # role -> napari layer
        self.worker = None
        # The iteration (not the slider index: the list of files changes when a run is (re)opened) the
        # slider asked for while a worker was busy; loaded when the worker ends, dropped by an open.
        self._wanted: int | None = None
        self._queued_open: tuple | None = None
        self._plots_dock = None

        self.path = PathEdit("a run folder (mitoseg train --out RUN)", folder=True)
        self.open_button = QPushButton("Open run")
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.setToolTip("Re-read the run folder (a training run may have written new files)")
        self.slider = QSlider(Qt.Horizontal)
        self.slider.setRange(0, 0)
        self.slider.setEnabled(False)
        self.slider.setPageStep(1)
        self.slider_label = QLabel("iteration: -")
        self.summary = QLabel("Open the run folder of a semi-supervised method<br>(fixmatch, unimatch, daw, ...).")
        self.summary.setTextFormat(Qt.RichText)  # short lines, no word wrap: the label's height is exact
        self.summary.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.plots = InspectionPlots()

        top = QHBoxLayout()
        top.addWidget(self.open_button)
        top.addWidget(self.refresh_button)
        slider_row = QHBoxLayout()
        slider_row.addWidget(self.slider, 1)
        slider_row.addWidget(self.slider_label)
        layout = QVBoxLayout(scroll_body(self))
        layout.addWidget(QLabel("Run folder"))
        layout.addWidget(self.path)
        layout.addLayout(top)
        layout.addLayout(slider_row)
        layout.addWidget(self.summary)
        # Take only the height the controls need: the plot dock below gets the rest.
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Maximum)

        self.open_button.clicked.connect(lambda: self.open_run(self.path.text()))
        self.path.edit.returnPressed.connect(lambda: self.open_run(self.path.text()))
        self.refresh_button.clicked.connect(self.refresh)
        self.slider.valueChanged.connect(self.show_index)
        if run_dir is not None:
            self.path.setText(str(run_dir))
            self.open_run(str(run_dir))

    # ----------------------------------------------------------------- public

    def open_run(self, path: str | Path) -> None:
        """Open the run at ``path`` (in a worker thread) and show its latest inspection."""
        if not str(path).strip():
            self._fail(MitosegError("choose a run folder"))
            return
        self._request_open(str(path), None)

    def refresh(self) -> None:
        """Re-read the run folder (new inspection files of a running training), staying on this iteration."""
        if self.run_dir is not None:
            self._request_open(str(self.run_dir), self.inspection.iteration if self.inspection else None)

    def show_index(self, index: int) -> None:
        """Show the ``index``-th saved iteration (the slider position)."""
        if not 0 <= index < len(self.files):
            return
        self._wanted = self.files[index][0]
        if self.worker is None:
            self._load_wanted()

    @property
    def iterations(self) -> list[int]:
        return [it for it, _ in self.files]

    # ----------------------------------------------------------------- worker

    def _request_open(self, path: str, iteration: int | None) -> None:
        # Opening decides the iteration itself: a slider position asked for before belongs to the files
        # shown until now, not to what the open will list.
        self._wanted = None
        if self.worker is not None:
            self._queued_open = (path, iteration)  # the latest open wins; started when the worker ends
            return
        self._run(_open_run, path, iteration)

    def _load_wanted(self) -> None:
        """Start loading the iteration the slider asks for, unless it is already shown or no longer listed."""
        wanted, self._wanted = self._wanted, None
        iterations = self.iterations
        if wanted is None or wanted not in iterations or (
                self.inspection is not None and self.inspection.iteration == wanted):
            if self.inspection is not None and self.inspection.iteration in iterations:
                self._set_slider(iterations.index(self.inspection.iteration))
            return
        index = iterations.index(wanted)
        self._set_slider(index)
        self._run(_load, self.run_dir, self.files, index)

    def _set_slider(self, index: int) -> None:
        """Move the slider without asking for a load: to the iteration being loaded, or back to the one
        shown when nothing is (after a failed load, or a refresh that lost the wanted iteration)."""
        if self.slider.value() != index:
            self.slider.blockSignals(True)
            self.slider.setValue(index)
            self.slider.blockSignals(False)

    def _run(self, func, *args) -> None:
        worker = create_worker(func, *args, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(self._on_loaded)
        worker.errored.connect(self._fail)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        worker.start()

    def _on_finished(self) -> None:
        self.worker = None
        if self._queued_open is not None:
            args, self._queued_open = self._queued_open, None
            self._run(_open_run, *args)
        else:
            self._load_wanted()

    def _fail(self, exc: Exception) -> None:
        report_error(exc, "Pseudo-label inspector")
        self.summary.setWordWrap(True)
        self.summary.setText(f"<b>Could not open:</b> {exc}")
        self.failed.emit(str(exc))

    def _on_loaded(self, result: dict) -> None:
        if "run_dir" in result:
            if self.run_dir is not None and Path(result["run_dir"]) != self.run_dir:
                self._remove_layers()
                self._wanted = None  # an iteration of the previous run
            self.run_dir = Path(result["run_dir"])
            self.files = result["files"]
            self.path.setText(str(self.run_dir))
            # Range and position of the new file list, set without signals: the slider does not ask for
            # an iteration, it shows the one opened (a move made meanwhile is still in ``_wanted``).
            self.slider.blockSignals(True)
            self.slider.setRange(0, len(self.files) - 1)
            self.slider.setValue(result["index"])
            self.slider.setEnabled(len(self.files) > 1)
            self.slider.blockSignals(False)
            self._ensure_plot_dock()
        self.records = result["records"]
        self._show(result["inspection"], result["index"])

    # ----------------------------------------------------------------- display

    def _show(self, insp: Inspection, index: int) -> None:
        first = self.inspection is None
        self.inspection = insp
        prefix = f"{self.run_dir.name}: " if self.run_dir is not None else ""
        for data, kwargs, layer_type in inspection_layer_data(insp, prefix=prefix, translate=self._translate):
            role = kwargs["metadata"][LAYER_KEY]["role"]
            layer = self.layers.get(role)
            if layer is not None and layer in self._viewer.layers and layer.data.shape == data.shape:
                layer.data = data
                layer.metadata = kwargs["metadata"]
                if role == "log_density":
                    layer.contrast_limits = kwargs["contrast_limits"]
            else:
                if layer is not None and layer in self._viewer.layers:
                    self._viewer.layers.remove(layer)
                self.layers[role] = getattr(self._viewer, f"add_{layer_type}")(data, **kwargs)
        for role in [r for r in self.layers if r not in _roles(insp)]:
            if self.layers[role] in self._viewer.layers:
                self._viewer.layers.remove(self.layers[role])
            del self.layers[role]
        if first:
            # The patches lie beside the volume (translate): the view napari fitted to the first layer
            # left them off the canvas. Fitted once, at the first inspection; later ones keep the user's view.
            self._viewer.reset_view()
        self.slider_label.setText(f"iteration {insp.iteration} ({index + 1} of {len(self.files)})")
        self.summary.setWordWrap(False)
        self.summary.setText(self.summary_html(insp))
        self.plots.show_inspection(insp, self.records)
        self.iteration_shown.emit(insp.iteration)

    def summary_html(self, insp: Inspection) -> str:
        """The recorded numbers of ``insp``: method, thresholds, used / discarded pixels, outcomes."""
        total = insp.used_pixels + insp.discarded_pixels
        n, h, w = insp.shape

        def pct(count: int) -> str:
            return f"{100.0 * count / total:.1f} %" if total else "-"

        lines = [f"<b>{self.run_dir.name if self.run_dir else insp.path.stem}</b>: method <b>{insp.method}</b>, "
                 f"iteration <b>{insp.iteration}</b>", f"{n} unlabeled patches of {h} x {w} pixels"]
        thresholds = []
        for key, label in (("tau", "threshold τ"), ("safe_tau", "safe τ")):
            value = insp.scalar(key)
            if value is not None:
                thresholds.append(f"{label} = {value:.3f}")
        if thresholds:
            lines.append(", ".join(thresholds))
        lines.append(f"{_swatch('used')} used pixels: <b>{insp.used_pixels:,}</b> ({pct(insp.used_pixels)})")
        lines.append(f"{_swatch('discarded')} discarded pixels: <b>{insp.discarded_pixels:,}</b> "
                     f"({pct(insp.discarded_pixels)})")
        counts = insp.outcome_counts()
        if counts is not None:
            lines.append("against the analysis labels:")
            for name in OUTCOME_NAMES.values():
                lines.append(f"&nbsp;&nbsp;{_swatch(name)} {name}: <b>{counts[name]:,}</b> ({pct(counts[name])})")
        else:
            lines.append("<i>no analysis labels in this run (data.unlabeled[*].label)</i>")
        return "<br>".join(lines)

    def _remove_layers(self) -> None:
        for layer in self.layers.values():
            if layer in self._viewer.layers:
                self._viewer.layers.remove(layer)
        self.layers = {}
        self.inspection = None

    def _ensure_plot_dock(self) -> None:
        window = getattr(self._viewer, "window", None)
        if window is None:
            return
        if self._plots_dock is not None:
            try:
                self._plots_dock.objectName()
                return
            except RuntimeError:  # the dock was closed and deleted: dock a new plot widget
                self.plots = InspectionPlots()
        self._plots_dock = window.add_dock_widget(self.plots, name=PLOT_DOCK_NAME, area="right")

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        if self.worker is not None:
            self.worker.quit()
        super().closeEvent(event)


def _roles(insp: Inspection) -> set[str]:
    roles = {"image", "confidence", "pseudo_label", "weight"}
    if "log_density" in insp.arrays:
        roles.add("log_density")
    if insp.has_label:
        roles.add("outcome")
    return roles


__all__ = ["InspectorWidget", "PLOT_DOCK_NAME"]
