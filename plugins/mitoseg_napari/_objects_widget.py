"""Objects dock: the per-object table of an instance Labels layer, a histogram of volumes, a summary.

The table has the columns of :data:`mitoseg.instances.measure.COLUMNS` that
have values (the mean probability only when the objects came with one); a
click on a column header sorts by it. Selecting a row centres the viewer on
the object's centroid (camera centre and current slice) and highlights it
(``show_selected_label``). Measurements come from the Predict widget (its
``3-D objects`` option) or from "Measure" on any instance Labels layer; "Find
objects" labels the 3-D objects of a semantic mask (a prediction) into a new
``<layer> objects`` layer first. Both run in a worker thread. "Export CSV"
writes the table with :func:`mitoseg.instances.measure.write_table` (the
columns of ``mitoseg instances``).

Volumes are in um^3 when the layer's units are lengths (``layer.units`` with
its ``scale``: nm per voxel), else in voxels.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.layers import Labels
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import create_worker

from mitoseg.errors import MitosegError
from mitoseg_napari._layers import LAYER_KEY, report_error
from mitoseg_napari._objects import (
    ObjectOptions,
    as_volume,
    find_objects,
    measure_ids,
    objects_features,
    objects_metadata,
    voxel_size_nm,
)
from mitoseg_napari._plots import BACKGROUND, FOREGROUND, InspectionPlots
from mitoseg_napari._qt_utils import LayerCombo, scroll_body

OBJECTS_COLOR = "#4fb0ff"
SELECTED_COLOR = "#ffcc33"


def camera_of(viewer):
    """The viewer's camera (``viewer.scene.camera`` from napari 0.9, ``viewer.camera`` before)."""
    scene = getattr(viewer, "scene", None)
    return scene.camera if scene is not None and hasattr(scene, "camera") else viewer.camera


def _header(column: str, measurements) -> str:
    units = {"volume": measurements.volume_unit, "surface_area": measurements.area_unit,
             "centroid_z": measurements.length_unit, "centroid_y": measurements.length_unit,
             "centroid_x": measurements.length_unit}
    name = column.replace("_", " ")
    return f"{name} ({units[column]})" if column in units else name


def _text(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.4g}"


def _key(value) -> float:
    if value is None:
        return -math.inf
    value = float(value)
    return -math.inf if math.isnan(value) else value


class _Item(QTableWidgetItem):
    """A cell that shows a formatted number and sorts by the number itself."""

    def __init__(self, value):
        super().__init__(_text(value))
        self.key = _key(value)
        self.setTextAlignment(int(Qt.AlignRight | Qt.AlignVCenter))

    def __lt__(self, other) -> bool:
        if isinstance(other, _Item):
            return self.key < other.key
        return super().__lt__(other)


def measure_layer_data(data, voxel_size, find: bool, options=None) -> dict:
    """Worker: measurements of ``data`` as instance ids, or (``find``) the 3-D objects of its foreground."""
    if find:
        ids, count, measurements = find_objects(data, options, voxel_size)
        return {"ids": ids if data.ndim == 3 else ids[0], "count": count, "measurements": measurements}
    return {"ids": None, "measurements": measure_ids(data, voxel_size)}


class VolumeHistogram(QWidget):
    """Histogram of object volumes (log-spaced bins when they span more than two decades)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.figure = Figure(figsize=(4.0, 2.4), dpi=90, facecolor=BACKGROUND, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.canvas.setMinimumHeight(170)
        self.ax = self.figure.subplots()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        #: what was drawn last (for tests and scripts): counts, edges, selected volume
        self.drawn: dict = {}
        self.show_volumes([], "")

    def show_volumes(self, volumes, unit: str, selected: float | None = None) -> None:
        ax = self.ax
        ax.clear()
        InspectionPlots._style(ax)
        volumes = np.asarray(volumes, dtype=np.float64)
        volumes = volumes[np.isfinite(volumes) & (volumes > 0)]
        self.drawn = {"n": int(volumes.size)}
        if volumes.size:
            low, high = float(volumes.min()), float(volumes.max())
            bins = int(np.clip(np.sqrt(volumes.size) * 2, 10, 60))
            logarithmic = high > 100 * low
            if logarithmic:
                edges = np.geomspace(low, high * 1.0001, bins + 1)
                ax.set_xscale("log")
            else:
                edges = np.linspace(low - 0.5 * (high == low), high + 0.5 * (high == low), bins + 1)
            counts, edges = np.histogram(volumes, bins=edges)
            ax.stairs(counts, edges, fill=True, alpha=0.45, color=OBJECTS_COLOR)
            ax.stairs(counts, edges, color=OBJECTS_COLOR, lw=1.2)
            self.drawn.update(counts=counts.tolist(), edges=edges.tolist(), log=logarithmic)
            if selected is not None:
                ax.axvline(selected, color=SELECTED_COLOR, lw=1.5)
                self.drawn["selected"] = float(selected)
            ax.set_xlabel(f"volume ({unit})", fontsize=8)
            ax.set_ylabel("objects", fontsize=8)
            ax.set_title(f"{volumes.size} objects", fontsize=9, color=FOREGROUND)
        else:
            ax.text(0.5, 0.5, "no objects measured", ha="center", va="center", color=FOREGROUND,
                    transform=ax.transAxes, fontsize=8)
        self.canvas.draw_idle()


class ObjectsWidget(QWidget):
    """An instance Labels layer -> per-object table, volume histogram, summary; rows go to their objects."""

    #: emitted when a measurement ends: "done" or "failed"
    measured = Signal(str)
    #: emitted with the object id after the view moved to it
    object_shown = Signal(int)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self._viewer = napari_viewer
        self.worker = None
        self.measurements = None
        self.voxel_size = None
        self._layer = None  # the layer whose measurements are shown
        self._rows: dict[int, dict] = {}
        self._columns: list[str] = []

        self.layer_combo = LayerCombo(napari_viewer, (Labels,))
        self.measure_button = QPushButton("Measure")
        self.measure_button.setToolTip("measure the layer's objects (each id > 0 is one object)")
        self.export_button = QPushButton("Export CSV...")
        self.export_button.setEnabled(False)
        self.find_options = ObjectOptions()
        self.find_button = QPushButton("Find objects")
        self.find_button.setToolTip("3-D objects (face-connected) of the foreground (label > 0) of a mask, as a "
                                    "new '<layer> objects' layer, then measured")
        self.summary = QLabel("Choose an instance Labels layer and press Measure.")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.table = QTableWidget(0, 0)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.setSortingEnabled(True)
        self.table.setMinimumHeight(180)
        self.histogram = VolumeHistogram()

        form = QFormLayout()
        form.addRow("Instance layer", self.layer_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.measure_button)
        buttons.addWidget(self.export_button)
        find_box = QGroupBox("Objects of a mask (e.g. a prediction)")
        find_layout = QVBoxLayout(find_box)
        find_layout.addWidget(self.find_options)
        find_layout.addWidget(self.find_button)
        layout = QVBoxLayout(scroll_body(self))
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(find_box)
        layout.addWidget(self.summary)
        layout.addWidget(self.table, 2)
        layout.addWidget(self.histogram, 1)

        self.measure_button.clicked.connect(self.measure)
        self.find_button.clicked.connect(self.find)
        self.export_button.clicked.connect(self._export_dialog)
        self.layer_combo.currentIndexChanged.connect(self._on_layer_chosen)
        self.table.itemSelectionChanged.connect(self._on_selection)
        self._on_layer_chosen()

    # ----------------------------------------------------------------- public

    def show_layer(self, layer) -> None:
        """Choose ``layer`` and show the measurements stored with it (by Predict or a previous Measure)."""
        self.layer_combo.set_layer(layer)
        self._on_layer_chosen()

    def measure(self) -> None:
        """Measure the chosen layer's objects in a worker thread."""
        self._start(find=False)

    def find(self) -> None:
        """Find the 3-D objects of the chosen (mask) layer's foreground, add them as a layer and measure them."""
        self._start(find=True)

    def export_table(self, path) -> None:
        """Write the shown table to ``path`` (.csv, or .parquet with pyarrow)."""
        from mitoseg.instances.measure import write_table

        try:
            if self.measurements is None:
                raise MitosegError("nothing to export: measure an instance layer first")
            written = write_table(self.measurements, path)
        except (MitosegError, OSError) as exc:
            report_error(exc, "Export")
            return
        self.summary.setText(f"{self.measurements.summary()}\nTable written to {written}.")

    def go_to(self, object_id: int) -> None:
        """Centre the view on the object's centroid and highlight it."""
        layer, row = self._layer, self._rows.get(int(object_id))
        if layer is None or row is None or layer not in self._viewer.layers:
            return
        centroid = np.array([row["centroid_z"], row["centroid_y"], row["centroid_x"]], dtype=np.float64)
        if self.measurements.length_unit != "voxel":  # um -> voxels
            centroid = centroid * 1000.0 / np.asarray(self.voxel_size, dtype=np.float64)
        data_point = centroid if layer.ndim == 3 else centroid[1:]
        world = np.asarray(layer.data_to_world(data_point), dtype=np.float64)
        dims = self._viewer.dims
        offset = dims.ndim - layer.ndim  # the layer's axes are the viewer's last ones
        for axis in range(layer.ndim):
            if offset + axis not in dims.displayed:
                dims.set_point(offset + axis, float(world[axis]))
        shown = [a - offset for a in dims.displayed if a >= offset]
        if len(shown) == len(dims.displayed):
            camera_of(self._viewer).center = tuple(float(world[a]) for a in shown)
        layer.visible = True
        layer.selected_label = int(object_id)
        layer.show_selected_label = True
        self.histogram.show_volumes([r["volume"] for r in self.measurements.rows], self.measurements.volume_unit,
                                    selected=row["volume"])
        self.object_shown.emit(int(object_id))

    def selected_id(self) -> int | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        return int(self.table.item(rows[0].row(), 0).key)

    # ---------------------------------------------------------------- private

    def _start(self, find: bool) -> None:
        if self.worker is not None:
            return
        layer = self.layer_combo.layer()
        try:
            if layer is None:
                raise MitosegError("choose a Labels layer")
            if layer.multiscale:
                raise MitosegError(f"layer '{layer.name}' is multiscale; measure its full-resolution data")
            as_volume(layer.data)
        except MitosegError as exc:
            report_error(exc, "Objects")
            self.measured.emit("failed")
            return
        voxel_size = voxel_size_nm(layer)
        options = self.find_options.options() if find else None
        self._job = {"layer": layer, "find": find, "voxel_size": voxel_size, "options": options}
        worker = create_worker(measure_layer_data, layer.data, voxel_size, find, options, _start_thread=False,
                               _ignore_errors=True)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._outcome = "failed"
        self.measure_button.setEnabled(False)
        self.find_button.setEnabled(False)
        self.summary.setText(f"{'Finding objects in' if find else 'Measuring'} '{layer.name}' ...")
        worker.start()

    def _on_returned(self, result: dict) -> None:
        job = self._job
        layer, voxel_size = job["layer"], job["voxel_size"]
        measurements = result["measurements"]
        if job["find"]:
            meta = objects_metadata(measurements, voxel_size, source=layer.name)
            name = f"{layer.name} objects"
            existing = self._viewer.layers[name] if name in self._viewer.layers else None
            if isinstance(existing, Labels) and existing.data.ndim == result["ids"].ndim:
                existing.data = result["ids"]
                existing.scale, existing.translate = layer.scale, layer.translate
                existing.metadata = meta
                target = existing
            else:
                units = {"units": layer.units} if getattr(layer, "units", None) is not None else {}
                target = self._viewer.add_labels(result["ids"], name=name, scale=layer.scale,
                                                 translate=layer.translate, metadata=meta, **units)
        else:
            target = layer
            meta = dict(layer.metadata)
            meta[LAYER_KEY] = {**meta.get(LAYER_KEY, {}), "measurements": measurements, "voxel_size_nm": voxel_size}
            layer.metadata = meta
        target.features = objects_features(measurements)
        self._outcome = "done"
        self.show_layer(target)

    def _on_error(self, exc: Exception) -> None:
        self.summary.setText(f"Failed: {exc}")
        report_error(exc, "Objects")

    def _on_finished(self) -> None:
        self.worker = None
        self.measure_button.setEnabled(True)
        self.find_button.setEnabled(True)
        self.measured.emit(self._outcome)

    def _on_layer_chosen(self, *_) -> None:
        layer = self.layer_combo.layer()
        if layer is self._layer and layer is not None and self.measurements is not None \
                and self._stored(layer) is self.measurements:
            return
        self._watch(layer)
        stored = self._stored(layer)
        if stored is None:
            self._show(None, None)
            self.summary.setText("Choose an instance Labels layer and press Measure." if layer is None else
                                 f"'{layer.name}' is not measured yet: press Measure (an instance layer) or Find "
                                 "objects (a mask).")
            return
        self._show(stored, layer.metadata[LAYER_KEY].get("voxel_size_nm"))

    @staticmethod
    def _stored(layer):
        if layer is None:
            return None
        return layer.metadata.get(LAYER_KEY, {}).get("measurements")

    def _watch(self, layer) -> None:
        """Forget the measurements when the shown layer's data changes (replaced or painted)."""
        if self._layer is not None:
            for event in (self._layer.events.data, self._layer.events.paint):
                event.disconnect(self._on_data_changed)
        self._layer = layer
        if layer is not None:
            layer.events.data.connect(self._on_data_changed)
            layer.events.paint.connect(self._on_data_changed)

    def _on_data_changed(self, event=None) -> None:
        layer = self._layer
        if layer is None:
            return
        layer.metadata.get(LAYER_KEY, {}).pop("measurements", None)
        if self.measurements is not None:
            self._show(None, None)
            self.summary.setText(f"'{layer.name}' changed since it was measured: press Measure.")

    def _show(self, measurements, voxel_size) -> None:
        from mitoseg.instances.measure import COLUMNS

        self.measurements, self.voxel_size = measurements, voxel_size
        rows = measurements.rows if measurements is not None else []
        self._rows = {int(row["id"]): row for row in rows}
        self._columns = [c for c in COLUMNS if any(row.get(c) is not None for row in rows)] if rows else []
        table = self.table
        table.blockSignals(True)
        table.setSortingEnabled(False)  # filling a sorted table moves rows while they are filled
        table.clearContents()
        table.setColumnCount(len(self._columns))
        table.setHorizontalHeaderLabels([_header(c, measurements) for c in self._columns])
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, column in enumerate(self._columns):
                table.setItem(r, c, _Item(row[column]))
        table.setSortingEnabled(True)
        table.horizontalHeader().setSortIndicatorShown(True)
        table.sortItems(0, Qt.AscendingOrder)
        table.blockSignals(False)
        self.export_button.setEnabled(measurements is not None)
        if measurements is None:
            self.histogram.show_volumes([], "")
            return
        self.histogram.show_volumes([row["volume"] for row in rows], measurements.volume_unit)
        units = ("voxel size from the layer's scale: " + " x ".join(f"{s:g}" for s in voxel_size) + " nm"
                 if voxel_size else "volumes in voxels (the layer's units are not lengths)")
        self.summary.setText(f"{measurements.summary()}\n{units}. Click a row to go to the object.")

    def _on_selection(self) -> None:
        object_id = self.selected_id()
        if object_id is not None:
            self.go_to(object_id)

    def _export_dialog(self) -> None:
        layer = self._layer
        default = f"{layer.name.replace(' ', '_')}.csv" if layer is not None else "objects.csv"
        path, _ = QFileDialog.getSaveFileName(self, "Export the object table", default,
                                              "CSV (*.csv);;Parquet (*.parquet)")
        if path:
            self.export_table(path)
