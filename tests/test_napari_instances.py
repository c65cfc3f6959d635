"""Instances in the napari plugin, in a real viewer (under Xvfb, as tests/test_napari_plugin.py):
the Predict widget's "3-D objects" option, the Objects dock (table, sorting, histogram, going to an
object, CSV export) and the reader's rule for instance volumes."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from napari.layers import Image, Labels
from qtpy.QtCore import QPoint, Qt
from scipy import ndimage

from mitoseg.config import config_from_dict
from mitoseg.engine.trainer import Trainer

from conftest import tiny_config_dict

WAIT_MS = 60_000
# (centre z, y, x, radius): three balls with volumes not in the order of their ids (ids follow the first voxel)
BALLS = ((5, 10, 12, 4), (6, 28, 34, 3), (3, 30, 8, 2))
SHAPE = (12, 40, 48)


def balls() -> list[np.ndarray]:
    z, y, x = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    return [(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r for cz, cy, cx, r in BALLS]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_volumes) -> Path:
    """A tiny supervised run whose prediction of the sample volume has many objects of many sizes."""
    cfg = tiny_config_dict(tiny_volumes, iterations=100, val_every=1000, checkpoint_every=100, log_every=50)
    del cfg["data"]["val"]
    cfg["optim"]["lr"] = 0.01
    cfg["inference"] = {"roi_size": [256, 256], "overlap": 0.25, "sw_batch_size": 2, "slab": 4}
    out = tmp_path_factory.mktemp("napari_instances") / "run"
    Trainer(config_from_dict(cfg), out, progress=False).fit()
    return out / "last.pt"


def camera_of(viewer):
    from mitoseg_napari._objects_widget import camera_of

    return camera_of(viewer)


def objects_dock(viewer):
    from mitoseg_napari._objects_widget import ObjectsWidget

    _, widget = viewer.window.add_plugin_dock_widget("mitoseg", "Objects")
    assert isinstance(widget, ObjectsWidget)
    return widget


def column(widget, name: str) -> list[str]:
    headers = [widget.table.horizontalHeaderItem(c).text() for c in range(widget.table.columnCount())]
    index = headers.index(name)
    return [widget.table.item(r, index).text() for r in range(widget.table.rowCount())]


def click_header(qtbot, widget, name: str) -> None:
    header = widget.table.horizontalHeader()
    headers = [widget.table.horizontalHeaderItem(c).text() for c in range(widget.table.columnCount())]
    section = headers.index(name)
    x = header.sectionViewportPosition(section) + header.sectionSize(section) // 2
    qtbot.mouseClick(header.viewport(), Qt.LeftButton, pos=QPoint(x, header.height() // 2))


def run_dock(qtbot, widget, button) -> str:
    with qtbot.waitSignal(widget.measured, timeout=WAIT_MS) as done:
        button.click()
    return done.args[0]


# --------------------------------------------------------------------------- the Objects dock


def test_find_objects_of_balls_gives_a_labels_layer_a_sortable_table_and_goes_to_an_object(
        make_napari_viewer, qtbot):
    masks = balls()
    prediction = np.zeros(SHAPE, np.uint8)
    for mask in masks:
        prediction[mask] = 1
    scale, translate = (2.0, 1.5, 1.5), (10.0, 0.0, 5.0)
    viewer = make_napari_viewer()
    viewer.add_labels(prediction, name="balls prediction", scale=scale, translate=translate)
    widget = objects_dock(viewer)
    widget.layer_combo.setCurrentText("balls prediction")
    assert run_dock(qtbot, widget, widget.find_button) == "done"

    objects = viewer.layers["balls prediction objects"]
    assert isinstance(objects, Labels) and objects.data.dtype == np.uint32 and objects.data.shape == SHAPE
    np.testing.assert_allclose(objects.scale, scale)
    np.testing.assert_allclose(objects.translate, translate)
    ids = [np.unique(objects.data[mask]) for mask in masks]
    assert all(len(i) == 1 and i[0] > 0 for i in ids)  # each ball is one object ...
    ids = [int(i[0]) for i in ids]
    assert sorted(ids) == [1, 2, 3]  # ... of its own, ids 1..N
    np.testing.assert_array_equal(objects.data > 0, prediction > 0)

    # The table: one row per ball, its voxel count; no probability column (none was given).
    assert widget.layer_combo.currentText() == "balls prediction objects"
    assert widget.table.rowCount() == 3
    expected = {i: int(mask.sum()) for i, mask in zip(ids, masks)}
    assert dict(zip(map(int, column(widget, "id")), map(int, column(widget, "voxels")))) == expected
    headers = [widget.table.horizontalHeaderItem(c).text() for c in range(widget.table.columnCount())]
    assert "volume (voxels)" in headers and not any("probability" in h for h in headers)
    assert widget.summary.text().startswith("3 objects;") and "in voxels" in widget.summary.text()
    assert widget.histogram.drawn["n"] == 3 and sum(widget.histogram.drawn["counts"]) == 3
    histogram = widget.histogram
    histogram.canvas.draw()
    label = histogram.ax.xaxis.label.get_window_extent(histogram.canvas.get_renderer())
    assert label.y0 >= 0 and label.y1 <= histogram.figure.bbox.height  # the x label inside the canvas
    # Hovering an object shows its voxel count.
    features = objects.features.set_index("index")
    assert int(features.loc[ids[1], "voxels"]) == expected[ids[1]]

    # Sorting by clicking a column header: ascending, then descending voxel counts.
    click_header(qtbot, widget, "voxels")
    assert [int(v) for v in column(widget, "voxels")] == sorted(expected.values())
    click_header(qtbot, widget, "voxels")
    assert [int(v) for v in column(widget, "voxels")] == sorted(expected.values(), reverse=True)
    assert sorted(ids, key=lambda i: -expected[i]) == [int(v) for v in column(widget, "id")]

    # Selecting the row of the middle-sized ball centres the view on it and highlights it.
    assert viewer.dims.ndisplay == 2
    target = ids[1]
    row = [int(v) for v in column(widget, "id")].index(target)
    with qtbot.waitSignal(widget.object_shown, timeout=WAIT_MS) as shown:
        widget.table.selectRow(row)
    assert shown.args == [target]
    centroid = np.argwhere(masks[1]).mean(0)
    world = centroid * np.asarray(scale) + np.asarray(translate)
    assert viewer.dims.point[0] == pytest.approx(world[0], abs=scale[0] / 2)
    assert viewer.dims.current_step[0] == int(round(centroid[0]))
    assert tuple(camera_of(viewer).center[-2:]) == pytest.approx(tuple(world[1:]))
    assert objects.selected_label == target and objects.show_selected_label
    assert widget.histogram.drawn["selected"] == pytest.approx(expected[target])
    # Another row moves there.
    row = [int(v) for v in column(widget, "id")].index(ids[0])
    widget.table.selectRow(row)
    world = np.argwhere(masks[0]).mean(0) * np.asarray(scale) + np.asarray(translate)
    assert tuple(camera_of(viewer).center[-2:]) == pytest.approx(tuple(world[1:]))
    assert viewer.dims.current_step[0] == int(round(np.argwhere(masks[0]).mean(0)[0]))
    assert objects.selected_label == ids[0]


def test_find_objects_removes_small_ones_and_splits_touching_balls(make_napari_viewer, qtbot):
    z, y, x = np.mgrid[:14, :30, :44]
    left = (z - 7) ** 2 + (y - 15) ** 2 + (x - 14) ** 2 <= 36
    right = (z - 7) ** 2 + (y - 15) ** 2 + (x - 25) ** 2 <= 36  # overlaps the left ball: one component
    speck = (z == 1) & (y == 2) & (x < 3)  # 3 voxels
    mask = (left | right | speck).astype(np.uint8)
    assert ndimage.label(mask)[1] == 2
    viewer = make_napari_viewer()
    viewer.add_labels(mask, name="touching")
    widget = objects_dock(viewer)
    widget.layer_combo.setCurrentText("touching")
    widget.find_options.min_voxels.setValue(10)
    widget.find_options.split.setCurrentText("distance")
    widget.find_options.min_distance.setValue(5)
    assert run_dock(qtbot, widget, widget.find_button) == "done"
    ids = viewer.layers["touching objects"].data
    assert int(ids.max()) == 2 and widget.table.rowCount() == 2
    assert not ids[speck].any()  # smaller than 10 voxels: gone
    np.testing.assert_array_equal(ids > 0, (left | right))
    assert len(np.unique(ids[left & ~right])) == 1 and len(np.unique(ids[right & ~left])) == 1
    assert ids[7, 15, 10] != ids[7, 15, 29]  # the two balls are cut apart


def test_measure_uses_physical_units_and_exports_csv(make_napari_viewer, qtbot, tmp_path):
    masks = balls()
    instances = np.zeros(SHAPE, np.uint32)
    for value, mask in zip((7, 3, 12), masks):  # ids need not be 1..N
        instances[mask] = value
    viewer = make_napari_viewer()
    layer = viewer.add_labels(instances, name="cells", scale=(30.0, 0.005, 0.005), units=("nm", "um", "um"))
    widget = objects_dock(viewer)
    widget.layer_combo.setCurrentText("cells")
    assert widget.table.rowCount() == 0 and not widget.export_button.isEnabled()
    assert run_dock(qtbot, widget, widget.measure_button) == "done"
    assert widget.voxel_size == (30.0, 5.0, 5.0)
    voxel_um3 = 30 * 5 * 5 / 1e9
    ids = [int(v) for v in column(widget, "id")]
    assert ids == [3, 7, 12]
    by_id = {7: masks[0], 3: masks[1], 12: masks[2]}
    volumes = [float(v) for v in column(widget, "volume (um^3)")]
    assert volumes == pytest.approx([by_id[i].sum() * voxel_um3 for i in ids], rel=1e-3)
    assert "um^3" in widget.summary.text() and "30 x 5 x 5 nm" in widget.summary.text()
    # Centroids in um, and the view goes to the right place in the layer's world (nm / um scale).
    row = ids.index(12)
    centroid_um = float(column(widget, "centroid y (um)")[row])
    assert centroid_um == pytest.approx(np.argwhere(masks[2]).mean(0)[1] * 0.005, rel=1e-3)
    widget.table.selectRow(row)
    world = np.argwhere(masks[2]).mean(0) * np.asarray(layer.scale)
    assert tuple(camera_of(viewer).center[-2:]) == pytest.approx(tuple(world[1:]))
    assert layer.selected_label == 12

    path = tmp_path / "cells_objects.csv"
    widget.export_table(path)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["id"]) for r in rows] == [3, 7, 12]
    assert [int(r["voxels"]) for r in rows] == [int(by_id[i].sum()) for i in (3, 7, 12)]
    assert float(rows[0]["volume_um3"]) == pytest.approx(by_id[3].sum() * voxel_um3, rel=1e-4)

    # Painting the layer makes the table stale: it is cleared until measured again.
    layer.paint((5, 10, 12), 0, refresh=True)
    assert widget.table.rowCount() == 0 and "changed" in widget.summary.text()
    assert run_dock(qtbot, widget, widget.measure_button) == "done"
    assert widget.table.rowCount() == 3


# --------------------------------------------------------------------------- reader


def test_reader_opens_instance_volumes_as_labels(make_napari_viewer, qtbot, tmp_path):
    masks = balls()
    instances = np.zeros(SHAPE, np.uint32)
    for value, mask in enumerate(masks, start=1):
        instances[mask] = value
    tifffile.imwrite(tmp_path / "mito_objects.tif", instances, photometric="minisblack")
    tifffile.imwrite(tmp_path / "volume.tif", instances.astype(np.uint64), photometric="minisblack")
    tifffile.imwrite(tmp_path / "run_inst.tif", instances.astype(np.uint16), photometric="minisblack")
    tifffile.imwrite(tmp_path / "cell_instances.tif", instances.astype(np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "raw.tif", instances.astype(np.uint16), photometric="minisblack")
    tifffile.imwrite(tmp_path / "instrument.tif", instances.astype(np.uint8), photometric="minisblack")
    viewer = make_napari_viewer()
    kinds = {}
    for name in ("mito_objects", "volume", "run_inst", "cell_instances", "raw", "instrument"):
        [layer] = viewer.open(tmp_path / f"{name}.tif", plugin="mitoseg")
        kinds[name] = type(layer)
        np.testing.assert_array_equal(layer.data, instances)
    assert kinds == {"mito_objects": Labels, "volume": Labels, "run_inst": Labels, "cell_instances": Labels,
                     "raw": Image, "instrument": Image}
    assert viewer.layers["mito_objects"].data.dtype == np.uint32

    widget = objects_dock(viewer)
    widget.layer_combo.setCurrentText("mito_objects")
    assert run_dock(qtbot, widget, widget.measure_button) == "done"
    assert [int(v) for v in column(widget, "voxels")] == [int(m.sum()) for m in masks]


# --------------------------------------------------------------------------- predict


def test_predict_with_objects_adds_the_objects_layer_and_fills_the_dock(make_napari_viewer, qtbot, checkpoint):
    viewer = make_napari_viewer()
    viewer.open_sample("mitoseg", "synthetic_em")
    _, widget = viewer.window.add_plugin_dock_widget("mitoseg", "Predict")
    widget.checkpoint.setText(str(checkpoint))
    widget.image_layer.setCurrentText("synthetic EM")
    assert not widget.object_options.isEnabled()
    widget.objects.setChecked(True)
    assert widget.object_options.isEnabled()
    assert widget.object_options.options().min_voxels is None  # auto, as mitoseg instances
    widget.object_options.min_voxels.setValue(0)  # every component, to compare with ndimage.label below
    with qtbot.waitSignal(widget.prediction_done, timeout=WAIT_MS) as done:
        widget.predict_button.click()
    assert done.args == ["done"]
    assert widget.progress.value() == 16

    prediction = viewer.layers["synthetic EM prediction"].data
    objects = viewer.layers["synthetic EM objects"]
    confidence = viewer.layers["synthetic EM confidence"].data
    assert isinstance(objects, Labels) and objects.data.dtype == np.uint32 and objects.data.shape == (16, 256, 256)
    np.testing.assert_array_equal(objects.data > 0, prediction > 0)
    _, components = ndimage.label(prediction > 0)  # face connectivity, as mitoseg's components
    assert components >= 5, "the checkpoint should predict several objects"
    assert int(objects.data.max()) == components
    np.testing.assert_array_equal(np.unique(objects.data), np.arange(components + 1))
    assert objects.metadata["mitoseg"]["role"] == "objects"

    dock = objects_dock(viewer)
    assert dock.layer_combo.currentText() == "synthetic EM objects" and dock.table.rowCount() == components
    voxels = [int(v) for v in column(dock, "voxels")]
    assert sum(voxels) == int((prediction > 0).sum())
    # The mean foreground probability: two classes, so the confidence of the foreground voxels.
    ids = [int(v) for v in column(dock, "id")]
    means = [float(v) for v in column(dock, "mean probability")]
    for object_id in (ids[0], ids[int(np.argmax(voxels))]):
        expected = confidence[objects.data == object_id].mean()
        assert means[ids.index(object_id)] == pytest.approx(expected, abs=1e-3)
    assert all(0.5 <= m <= 1.0 for m in means)

    # Again with a minimum size: the same layer, without the small objects; the dock follows.
    sizes = np.bincount(ndimage.label(prediction > 0)[0].ravel())[1:]
    threshold = int(np.sort(sizes)[len(sizes) // 2]) + 1
    assert 0 < (sizes >= threshold).sum() < components
    layer = objects
    widget.object_options.min_voxels.setValue(threshold)
    with qtbot.waitSignal(widget.prediction_done, timeout=WAIT_MS) as done:
        widget.predict()
    assert done.args == ["done"]
    assert viewer.layers["synthetic EM objects"] is layer
    labelled, _ = ndimage.label(prediction > 0)
    kept = np.isin(labelled, 1 + np.flatnonzero(sizes >= threshold))
    np.testing.assert_array_equal(layer.data > 0, kept)
    assert int(layer.data.max()) == int((sizes >= threshold).sum()) == dock.table.rowCount()
    assert min(int(v) for v in column(dock, "voxels")) >= threshold


def test_cancel_during_the_objects_step_adds_nothing(make_napari_viewer, qtbot, checkpoint, monkeypatch):
    from mitoseg_napari import _predict_widget

    cancelled = threading.Event()
    calls = []
    real = _predict_widget.find_objects

    def gated(*args, **kwargs):  # the real step, started only once "Cancel" was pressed
        calls.append(1)
        assert cancelled.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(_predict_widget, "find_objects", gated)
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (4, 64, 64), dtype=np.uint8), name="em")
    _, widget = viewer.window.add_plugin_dock_widget("mitoseg", "Predict")
    widget.checkpoint.setText(str(checkpoint))
    widget.objects.setChecked(True)

    def on_yield(value):
        if value == _predict_widget.PHASE_OBJECTS:
            assert widget.cancel_button.isEnabled()
            widget.cancel_button.click()
            cancelled.set()

    with qtbot.waitSignal(widget.prediction_done, timeout=WAIT_MS) as done:
        widget.predict()
        widget.worker.yielded.connect(on_yield)
    # Cancelled before the objects step began, or while it ran (the step itself is not interrupted).
    assert done.args == ["cancelled"] and calls in ([], [1])
    assert [layer.name for layer in viewer.layers] == ["em"]
    assert widget.predict_button.isEnabled() and not widget.cancel_button.isEnabled()
