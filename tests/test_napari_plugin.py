"""The napari plugin (plugins/mitoseg_napari) in a real viewer: run under Xvfb with Mesa (.ci/run).

One short real DAW run with analysis labels (made once for the module) feeds
the inspector and gives the checkpoint the predict widget uses.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from napari.layers import Image, Labels
from napari.utils.notifications import notification_manager

from mitoseg.config import config_from_dict
from mitoseg.engine.trainer import Trainer

from conftest import tiny_config_dict

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def daw_run(tmp_path_factory, tiny_volumes) -> Path:
    """A 2-iteration DAW run with analysis labels: inspection files at iterations 1 and 2."""
    cfg = tiny_config_dict(tiny_volumes, iterations=2, inspect_every=1, log_every=1)
    del cfg["data"]["val"]
    # momentum 0: DAW's Gaussians follow each batch, so the threshold moves and both used and discarded
    # pixels occur within two iterations (with the default 0.99 everything stays used).
    cfg["method"] = {"name": "daw", "daw": {"momentum": 0.0}}
    cfg["data"]["train"]["slices"] = "0:3"
    cfg["data"]["unlabeled"] = [{"slices": "3:8", "label": str(tiny_volumes["train_label"])}]
    cfg["data"]["unlabeled_batch_size"] = 2
    # One 256 x 256 window per slice and 4 slices per slab: 4 progress steps on the sample volume.
    cfg["inference"] = {"roi_size": [256, 256], "overlap": 0.25, "sw_batch_size": 2, "slab": 4}
    out = tmp_path_factory.mktemp("napari_runs") / "daw"
    Trainer(config_from_dict(cfg), out, progress=False).fit()
    return out


@pytest.fixture
def notifications():
    """Messages of the napari notifications shown during the test."""
    seen: list[str] = []

    def keep(event):
        seen.append(str(event.message if hasattr(event, "message") else event))

    notification_manager.notification_ready.connect(keep)
    yield seen
    notification_manager.notification_ready.disconnect(keep)


def recorded(run: Path, iteration: int) -> tuple[dict, dict]:
    stem = run / "inspect" / f"iter_{iteration:06d}"
    meta = json.loads(stem.with_suffix(".json").read_text())
    arrays = dict(np.load(stem.with_suffix(".npz")))
    return meta, arrays


def docked(viewer) -> set[str]:
    """Names of the viewer's dock widgets (napari >= 0.6.2: ``dock_widgets``)."""
    window = viewer.window
    return set(window.dock_widgets if hasattr(type(window), "dock_widgets") else window._dock_widgets)


def by_role(viewer, role: str):
    found = [layer for layer in viewer.layers if layer.metadata.get("mitoseg", {}).get("role") == role]
    assert len(found) == 1, [layer.name for layer in viewer.layers]
    return found[0]


# --------------------------------------------------------------------------- packaging


def test_napari_finds_the_plugin_and_its_manifest_is_valid(tmp_path):
    from npe2 import PluginManager, PluginManifest

    manifest = PluginManifest.from_distribution("mitoseg")  # via the napari.manifest entry point
    manifest.validate_imports()
    contributions = manifest.contributions
    assert {w.display_name for w in contributions.widgets} == {"Predict", "Pseudo-label inspector", "Evaluate",
                                                               "Objects", "Train"}
    assert [s.key for s in contributions.sample_data] == ["synthetic_em"]
    assert contributions.readers[0].accepts_directories
    pm = PluginManager.instance()
    pm.discover()
    assert "mitoseg" in pm

    def offered(path) -> bool:
        return "mitoseg" in {r.plugin_name for r in pm.iter_compatible_readers([str(path)])}

    run = tmp_path / "run"
    (run / "inspect").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    for path in ("volume.h5", "volume.hdf5", "stack.tif", "STACK.TIFF", "mito_objects.tif", run, run / "inspect",
                 run / "inspect" / "iter_000010.npz", run / "inspect" / "iter_000010.json", run / "metrics.jsonl"):
        assert offered(path), path
    # Other plugins keep what mitoseg cannot read.
    for path in ("notes.txt", "image.jpg", "photo.png", "arrays.npz", "config.json", "table.csv"):
        assert not offered(path), path


def test_reader_says_not_mine_for_what_it_cannot_look_at(tmp_path, monkeypatch):
    from mitoseg_napari import _reader

    folder = tmp_path / "locked"
    folder.mkdir()
    (tmp_path / "stack.tif").write_bytes(b"")
    real_listdir = os.listdir

    def listdir(path):
        if Path(path) == folder:  # as for a folder without read permission (root ignores chmod)
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(_reader.os, "listdir", listdir)
    assert _reader.napari_get_reader(str(folder)) is None
    assert _reader.napari_get_reader([str(folder), str(folder)]) is None
    assert _reader.napari_get_reader(str(tmp_path / "stack.tif")) is _reader.read_paths
    assert _reader.napari_get_reader(str(tmp_path / "missing.tif")) is None
    assert _reader.napari_get_reader([]) is None


def test_widgets_open_from_the_plugins_menu_registry(make_napari_viewer):
    from mitoseg_napari._evaluate_widget import EvaluateWidget
    from mitoseg_napari._inspector_widget import InspectorWidget
    from mitoseg_napari._objects_widget import ObjectsWidget
    from mitoseg_napari._predict_widget import PredictWidget
    from mitoseg_napari._train_widget import TrainWidget

    viewer = make_napari_viewer()
    for name, cls in (("Predict", PredictWidget), ("Pseudo-label inspector", InspectorWidget),
                      ("Evaluate", EvaluateWidget), ("Objects", ObjectsWidget), ("Train", TrainWidget)):
        dock, widget = viewer.window.add_plugin_dock_widget("mitoseg", name)
        assert isinstance(widget, cls)
        assert name in dock.name


LAPTOP = (1366, 768)  # the screen every dock layout must fit


@pytest.mark.parametrize("docks", [("Predict", "Objects", "Evaluate"),
                                   ("Train", "Pseudo-label inspector", "Predict", "Objects", "Evaluate")])
def test_docks_fit_a_laptop_screen_and_scroll_what_does_not(make_napari_viewer, qtbot, docks):
    # Every dock of the set open at once on a 1366 x 768 window: the window's minimum size fits the screen (the
    # canvas, dims slider and status bar stay on it), each dock asks for little height because its controls
    # scroll, and no row of a form is squeezed below its own height.
    from qtpy.QtWidgets import QFormLayout

    viewer = make_napari_viewer(show=True)
    window = viewer.window._qt_window
    window.resize(*LAPTOP)
    viewer.open_sample("mitoseg", "synthetic_em")
    widgets = {name: viewer.window.add_plugin_dock_widget("mitoseg", name)[1] for name in docks}
    qtbot.wait(1000)  # the docks' layouts settle
    minimum = window.minimumSizeHint()
    assert minimum.width() <= LAPTOP[0] and minimum.height() <= LAPTOP[1], (minimum.width(), minimum.height())
    assert window.height() <= LAPTOP[1] and window.width() <= LAPTOP[0]
    for name, widget in widgets.items():
        assert widget.minimumSizeHint().height() <= 200, name  # the scroll area, not every control
        body = widget.scroll_area.widget()  # what scrolls: the controls at their full height
        for form in body.findChildren(QFormLayout):
            for row in range(form.rowCount()):
                item = form.itemAt(row, QFormLayout.FieldRole)
                field = item.widget() if item is not None else None
                if field is not None and field.isVisible():
                    # 2 px: a line edit beside a button is laid out at the edit's height, a pixel under the
                    # button's; the squeeze this guards against was rows at a quarter of their height
                    assert field.height() >= field.minimumSizeHint().height() - 2, (name, row)
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.height() >= 200 and canvas.width() >= 300  # the data stay in view
    ARTIFACTS.mkdir(exist_ok=True)
    shot = viewer.screenshot(str(ARTIFACTS / f"docks_{len(docks)}_1366x768.png"), canvas_only=False, flash=False)
    assert shot.shape[0] <= LAPTOP[1] and shot.shape[1] <= LAPTOP[0]


# --------------------------------------------------------------------------- reader


def test_reader_opens_tiff_hdf5_zarr_and_large_volumes_lazily(make_napari_viewer, tmp_path, monkeypatch):
    from mitoseg_napari import _reader

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (3, 20, 24), dtype=np.uint8)
    label = (image > 128).astype(np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", image, photometric="minisblack")
    with h5py.File(tmp_path / "pair.h5", "w") as f:
        f["raw"] = image
        f["label"] = label
    zarr.create_array(str(tmp_path / "vol.zarr"), data=image.astype(np.float32))

    viewer = make_napari_viewer()
    layers = viewer.open(tmp_path / "stack.tif", plugin="mitoseg")
    assert isinstance(layers[0], Image)
    np.testing.assert_array_equal(layers[0].data, image)
    layers = viewer.open(tmp_path / "pair.h5", plugin="mitoseg")  # several datasets: one layer each
    assert {layer.name: type(layer) for layer in layers} == {"pair label": Labels, "pair raw": Image}
    np.testing.assert_array_equal(viewer.layers["pair label"].data, label)
    layers = viewer.open(str(tmp_path / "vol.zarr"), plugin="mitoseg")
    assert layers[0].data.dtype == np.float32 and layers[0].data.shape == image.shape

    monkeypatch.setattr(_reader, "EAGER_BYTES", 100)
    [(lazy, _, _)] = _reader.read_paths(str(tmp_path / "stack.tif"))
    assert not isinstance(lazy, np.ndarray)  # a dask array, read slice by slice
    np.testing.assert_array_equal(np.asarray(lazy[1:3, 5:9]), image[1:3, 5:9])
    np.testing.assert_array_equal(np.asarray(lazy[2]), image[2])

    (tmp_path / "broken.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(Exception, match="broken.tif"):
        viewer.open(tmp_path / "broken.tif", plugin="mitoseg")
    assert _reader.napari_get_reader(str(tmp_path / "notes.txt")) is None


def test_reader_opens_zarr_groups_and_slice_folders(make_napari_viewer, tmp_path):
    import imageio.v3 as iio

    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (3, 12, 14), dtype=np.uint8)
    label = (image > 100).astype(np.uint8)
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    group.create_array("em/raw", data=image)
    group.create_array("em/labels", data=label)
    slices = tmp_path / "slices"
    slices.mkdir()
    for i, plane in enumerate(image, start=9):  # slice9, slice10, slice11: natural order, not by name
        iio.imwrite(slices / f"slice{i}.png", plane)

    viewer = make_napari_viewer()
    layers = viewer.open(str(tmp_path / "group.zarr"), plugin="mitoseg")  # one layer per array
    assert {layer.name: type(layer) for layer in layers} == {"group em/raw": Image, "group em/labels": Labels}
    np.testing.assert_array_equal(viewer.layers["group em/raw"].data, image)
    np.testing.assert_array_equal(viewer.layers["group em/labels"].data, label)
    [layer] = viewer.open(str(slices), plugin="mitoseg")
    assert isinstance(layer, Image) and layer.name == "slices"
    np.testing.assert_array_equal(layer.data, image)


def test_reader_opens_an_inspection_file_npz_or_json_at_its_iteration(make_napari_viewer, daw_run):
    viewer = make_napari_viewer()
    for iteration, suffix in ((1, ".npz"), (2, ".json"), (1, ".json")):
        meta, arrays = recorded(daw_run, iteration)
        viewer.layers.clear()
        viewer.open(str(daw_run / "inspect" / f"iter_{iteration:06d}{suffix}"), plugin="mitoseg")
        image = by_role(viewer, "image")
        assert image.name == f"daw {iteration}: image"
        assert image.metadata["mitoseg"]["iteration"] == iteration
        np.testing.assert_array_equal(image.data, arrays["image"])
        np.testing.assert_array_equal(by_role(viewer, "confidence").data, arrays["confidence"])
        weight = by_role(viewer, "weight")
        assert int((weight.data == 1).sum()) == meta["used_pixels"]
        assert int((weight.data == 2).sum()) == meta["discarded_pixels"]
        used, correct = arrays["weight"] == 1, arrays["pseudo_label"] == arrays["label"]
        np.testing.assert_array_equal(by_role(viewer, "outcome").data == 2, used & ~correct)  # wrong used


def test_reader_opens_a_run_folder_at_its_latest_inspection(make_napari_viewer, daw_run):
    meta, arrays = recorded(daw_run, 2)
    viewer = make_napari_viewer()
    viewer.open(str(daw_run), plugin="mitoseg")
    weight = by_role(viewer, "weight")
    assert int((weight.data == 1).sum()) == meta["used_pixels"]
    assert int((weight.data == 2).sum()) == meta["discarded_pixels"]
    np.testing.assert_array_equal(by_role(viewer, "image").data, arrays["image"])
    assert by_role(viewer, "outcome").data.max() <= 4


# --------------------------------------------------------------------------- sample data + predict


def test_predict_on_the_sample_data_adds_prediction_and_confidence(make_napari_viewer, qtbot, daw_run):
    import torch

    from mitoseg.data.transforms import compute_normalization, sample_for_stats
    from mitoseg.networks.loading import model_from_checkpoint
    from mitoseg.inference import predict_volume

    viewer = make_napari_viewer()
    viewer.open_sample("mitoseg", "synthetic_em")
    image = viewer.layers["synthetic EM"].data
    assert image.shape == (16, 256, 256) and image.dtype == np.uint8
    assert isinstance(viewer.layers["synthetic EM labels"], Labels)

    _, widget = viewer.window.add_plugin_dock_widget("mitoseg", "Predict")
    widget.checkpoint.setText(str(daw_run / "best.pt"))
    widget.image_layer.setCurrentText("synthetic EM")
    steps = []
    widget.progressed.connect(lambda done, total: steps.append((done, total)))
    with qtbot.waitSignal(widget.prediction_done, timeout=WAIT_MS) as done:
        widget.predict_button.click()
        assert not widget.predict_button.isEnabled() and widget.cancel_button.isEnabled()
    assert done.args == ["done"]
    assert steps[-1] == (16, 16) and len(steps) >= 4  # one progress step per slab of 4 slices
    assert widget.progress.value() == 16 and widget.predict_button.isEnabled()

    prediction = viewer.layers["synthetic EM prediction"]
    confidence = viewer.layers["synthetic EM confidence"]
    assert isinstance(prediction, Labels) and isinstance(confidence, Image)
    assert prediction.data.shape == confidence.data.shape == (16, 256, 256)
    assert prediction.data.dtype == np.uint8 and confidence.data.dtype == np.float32
    # Same numbers as calling mitoseg's inference directly on the whole volume.
    model, cfg = model_from_checkpoint(daw_run / "best.pt")
    norm = compute_normalization(sample_for_stats(image), cfg.data.normalize)
    expected = np.zeros(image.shape, np.float32)

    def consume(start, probs):
        expected[start:start + len(probs)] = probs.max(1).values.numpy()

    predict_volume(model, lambda s, e: image[s:e], len(image), norm, cfg, torch.device("cpu"),
                   consume, progress=False)
    np.testing.assert_allclose(confidence.data, expected, atol=1e-5)
    assert 0.5 <= confidence.data.min() and confidence.data.max() <= 1.0

    # A 2-D image with per-class probabilities.
    viewer.add_image(image[3], name="one slice")
    widget.image_layer.setCurrentText("one slice")
    widget.output.setCurrentText("class probabilities")
    with qtbot.waitSignal(widget.prediction_done, timeout=WAIT_MS) as done:
        widget.predict()
    assert done.args == ["done"]
    probabilities = viewer.layers["one slice probabilities"].data
    assert probabilities.shape == (2, 256, 256) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(0), 1.0, atol=1e-5)
    expected = np.zeros((1, 2, 256, 256), np.float32)  # the slice is normalized on its own statistics
    predict_volume(model, lambda s, e: image[3:4][s:e], 1, compute_normalization(image[3], cfg.data.normalize),
                   cfg, torch.device("cpu"), lambda s, p: expected.__setitem__(slice(s, s + 1), p.numpy()),
                   progress=False)
    np.testing.assert_allclose(probabilities, expected[0], atol=1e-5)
    np.testing.assert_array_equal(viewer.layers["one slice prediction"].data, probabilities.argmax(0))

    # Evaluate the volume prediction against the sample labels.
    evaluate, outcome = run_evaluate_widget(viewer, qtbot, "synthetic EM prediction", "synthetic EM labels")
    assert outcome == "done"
    pred, truth = prediction.data.astype(bool), viewer.layers["synthetic EM labels"].data.astype(bool)
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert evaluate.scores["fg_iou"] == pytest.approx(iou)
    assert evaluate.table.item(1, 0).text() == f"{iou:.4f}"
    assert evaluate.table.item(1, 1).text() == f"{2 * (pred & truth).sum() / (pred.sum() + truth.sum()):.4f}"
    errors = viewer.layers["synthetic EM prediction errors"].data
    assert int((errors == 1).sum()) == int((pred & ~truth).sum())  # false positives
    assert int((errors == 2).sum()) == int((~pred & truth).sum())  # false negatives


def test_predict_widget_applies_test_time_augmentation_when_asked(make_napari_viewer, qtbot, daw_run):
    import torch

    from mitoseg.data.transforms import compute_normalization
    from mitoseg.networks.loading import model_from_checkpoint
    from mitoseg.inference import VolumePredictor

    image = np.random.default_rng(1).integers(0, 255, (2, 64, 64), dtype=np.uint8)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="em")
    _, widget = viewer.window.add_plugin_dock_widget("mitoseg", "Predict")
    widget.checkpoint.setText(str(daw_run / "last.pt"))
    widget.image_layer.setCurrentText("em")
    widget.output.setCurrentText("class probabilities")
    model, cfg = model_from_checkpoint(daw_run / "last.pt")
    assert cfg.inference.tta is False and widget.tta.currentText() == "as trained"
    norm = compute_normalization(image, cfg.data.normalize)
    results = {}
    for choice in ("on", "as trained"):
        widget.tta.setCurrentText(choice)
        with qtbot.waitSignal(widget.prediction_done, timeout=WAIT_MS) as done:
            widget.predict()
        assert done.args == ["done"]
        results[choice] = viewer.layers["em probabilities"].data.copy()
    cfg.inference.tta = True
    expected = VolumePredictor(model, cfg, torch.device("cpu")).probabilities(
        torch.from_numpy(norm(image))[:, None]).transpose(0, 1).numpy()
    np.testing.assert_allclose(results["on"], expected, atol=1e-5)
    assert not np.allclose(results["on"], results["as trained"], atol=1e-4)  # the run's setting: no TTA


def test_predict_cancel_stops_between_slabs_and_adds_nothing(make_napari_viewer, qtbot, daw_run, monkeypatch,
                                                            notifications):
    from mitoseg_napari import _predict_widget

    cancelled = threading.Event()
    reads = []

    class GatedVolume(_predict_widget._ArrayVolume):
        def read(self, start, stop):
            reads.append(start)
            if start >= 4:  # the second slab waits until "Cancel" was pressed
                assert cancelled.wait(30)
            return super().read(start, stop)

    monkeypatch.setattr(_predict_widget, "volume_from_layer", lambda layer: GatedVolume(layer.data))
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).integers(0, 255, (16, 64, 64), dtype=np.uint8), name="em")
    _, widget = viewer.window.add_plugin_dock_widget("mitoseg", "Predict")
    widget.checkpoint.setText(str(daw_run / "last.pt"))

    def cancel_after_first_slab(done, total):
        if done == 4:
            widget.cancel_button.click()
            cancelled.set()

    widget.progressed.connect(cancel_after_first_slab)
    with qtbot.waitSignal(widget.prediction_done, timeout=WAIT_MS) as done:
        widget.predict()
    assert done.args == ["cancelled"]
    # Cancelled while slab 2 waited (or before it began): slabs 3 and 4 are never read.
    assert reads in ([0], [0, 4])
    assert [layer.name for layer in viewer.layers] == ["em"]
    assert widget.predict_button.isEnabled() and not widget.cancel_button.isEnabled()
    assert any("cancelled" in message for message in notifications)


def test_predict_widget_opens_without_torch_and_refuses_cuda_without_it(make_napari_viewer, qtbot, daw_run,
                                                                        monkeypatch, notifications):
    import sys

    import torch

    from mitoseg_napari._predict_widget import PredictWidget

    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((2, 32, 32), np.uint8), name="em")
    with monkeypatch.context() as m:
        # Building the widget must neither import torch nor probe CUDA (seconds on the GUI thread):
        # with torch unimportable it still offers every device.
        m.setitem(sys.modules, "torch", None)
        widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget)
    assert [widget.device.itemText(i) for i in range(widget.device.count())] == ["auto", "cpu", "cuda"]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a machine with a GPU
    widget.checkpoint.setText(str(daw_run / "best.pt"))
    widget.device.setCurrentText("cuda")
    with qtbot.waitSignal(widget.prediction_done, timeout=WAIT_MS) as done:
        widget.predict()
    assert done.args == ["failed"]
    assert [m for m in notifications if "'cuda'" in m and "CUDA is not available" in m and "'cpu'" in m], \
        notifications
    assert [layer.name for layer in viewer.layers] == ["em"] and widget.predict_button.isEnabled()


def run_evaluate_widget(viewer, qtbot, prediction: str, truth: str):
    """Dock an Evaluate widget, choose the two layers, click Evaluate: (widget, 'done' or 'failed')."""
    from mitoseg_napari._evaluate_widget import EvaluateWidget

    evaluate = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(evaluate)
    evaluate.prediction_layer.setCurrentText(prediction)
    evaluate.truth_layer.setCurrentText(truth)
    with qtbot.waitSignal(evaluate.evaluation_done, timeout=WAIT_MS) as done:
        evaluate.evaluate_button.click()
    return evaluate, done.args[0]


def test_evaluate_failure_is_a_notification_and_the_error_layer_follows_the_prediction(
        make_napari_viewer, qtbot, notifications):
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 2, (3, 16, 16), dtype=np.uint8)
    pred = truth.copy()
    pred[0, :2] = 1 - pred[0, :2]  # 32 wrong pixels in the first slice
    viewer = make_napari_viewer(show=True)  # shown: the dock's layout is checked
    viewer.add_labels(truth, name="gt")
    viewer.add_labels(pred[:2], name="short prediction")
    evaluate, outcome = run_evaluate_widget(viewer, qtbot, "short prediction", "gt")
    assert outcome == "failed"
    assert [m for m in notifications if "(2, 16, 16)" in m and "(3, 16, 16)" in m and "must match" in m], \
        notifications
    assert "short prediction errors" not in viewer.layers and evaluate.evaluate_button.isEnabled()

    prediction = viewer.add_labels(pred, name="prediction", scale=(2.0, 1.0, 1.0), translate=(0.0, 5.0, 0.0))
    evaluate.prediction_layer.setCurrentText("prediction")
    with qtbot.waitSignal(evaluate.evaluation_done, timeout=WAIT_MS) as done:
        evaluate.evaluate()
    assert done.args == ["done"]
    errors = viewer.layers["prediction errors"]
    false_positive, false_negative = int(((pred == 1) & (truth == 0)).sum()), int(((pred == 0) & (truth == 1)).sum())
    assert false_positive + false_negative == 32
    assert f"{false_positive:,} false positive and {false_negative:,} false negative" in evaluate.status.text()
    qtbot.wait(100)
    assert evaluate.status.geometry().top() >= evaluate.table.geometry().bottom()  # the status under the table
    assert evaluate.status.height() >= evaluate.status.heightForWidth(evaluate.status.width()) - 2
    # The prediction moves: evaluating again updates the same layer and puts it where the prediction is.
    prediction.scale, prediction.translate = (3.0, 0.5, 0.5), (1.0, 2.0, 4.0)
    errors.opacity = 0.3
    with qtbot.waitSignal(evaluate.evaluation_done, timeout=WAIT_MS) as done:
        evaluate.evaluate()
    assert done.args == ["done"]
    assert viewer.layers["prediction errors"] is errors and errors.opacity == pytest.approx(0.3)
    np.testing.assert_allclose(errors.scale, prediction.scale)
    np.testing.assert_allclose(errors.translate, prediction.translate)
    np.testing.assert_array_equal(errors.data == 1, (pred == 1) & (truth == 0))


def test_failures_are_notifications_not_crashes(make_napari_viewer, qtbot, tmp_path, notifications):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((2, 32, 32), np.uint8), name="em")
    _, predict = viewer.window.add_plugin_dock_widget("mitoseg", "Predict")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"this is not a checkpoint")
    predict.checkpoint.setText(str(bad))
    with qtbot.waitSignal(predict.prediction_done, timeout=WAIT_MS) as done:
        predict.predict()
    assert done.args == ["failed"]
    assert any("bad.pt" in m and "checkpoint" in m for m in notifications), notifications
    assert predict.predict_button.isEnabled() and [layer.name for layer in viewer.layers] == ["em"]

    predict.checkpoint.setText("")
    predict.predict()  # refused at once, with a message
    assert predict.worker is None and any("choose a checkpoint" in m for m in notifications)

    _, inspector = viewer.window.add_plugin_dock_widget("mitoseg", "Pseudo-label inspector")
    (tmp_path / "empty").mkdir()
    with qtbot.waitSignal(inspector.failed, timeout=WAIT_MS):
        inspector.open_run(tmp_path / "empty")
    assert any("not a mitoseg run folder" in m for m in notifications), notifications


# --------------------------------------------------------------------------- inspector


def test_inspector_shows_what_the_run_recorded(make_napari_viewer, qtbot, daw_run):
    from mitoseg_napari._inspector_widget import PLOT_DOCK_NAME

    viewer = make_napari_viewer()
    _, inspector = viewer.window.add_plugin_dock_widget("mitoseg", "Pseudo-label inspector")
    with qtbot.waitSignal(inspector.iteration_shown, timeout=WAIT_MS) as shown:
        inspector.open_run(daw_run)
    assert shown.args == [2]  # opens at the latest saved iteration
    assert inspector.iterations == [1, 2] and inspector.slider.maximum() == 1
    assert PLOT_DOCK_NAME in docked(viewer)

    counts = [recorded(daw_run, it)[0] for it in (1, 2)]  # the checks below can tell used from discarded
    assert any(m["used_pixels"] > 0 for m in counts) and any(m["discarded_pixels"] > 0 for m in counts)
    records = [json.loads(line) for line in (daw_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    layers = {}
    for iteration in (2, 1):
        if iteration == 1:
            with qtbot.waitSignal(inspector.iteration_shown, timeout=WAIT_MS) as shown:
                inspector.slider.setValue(0)
            assert shown.args == [1]
        meta, arrays = recorded(daw_run, iteration)
        text = inspector.summary.text()
        assert f"used pixels: <b>{meta['used_pixels']:,}</b>" in text
        assert f"discarded pixels: <b>{meta['discarded_pixels']:,}</b>" in text
        assert f"threshold τ = {meta['tau']:.3f}" in text and f"safe τ = {meta['safe_tau']:.3f}" in text
        weight = by_role(viewer, "weight")
        assert int((weight.data == 1).sum()) == meta["used_pixels"]
        assert int((weight.data == 2).sum()) == meta["discarded_pixels"]
        outcome = by_role(viewer, "outcome").data
        correct = arrays["pseudo_label"] == arrays["label"]
        used = arrays["weight"] == 1
        expected = {1: correct & used, 2: ~correct & used, 3: correct & ~used, 4: ~correct & ~used}
        for value, mask in expected.items():
            np.testing.assert_array_equal(outcome == value, mask)
        assert f"wrong used: <b>{int(expected[2].sum()):,}</b>" in text
        np.testing.assert_array_equal(by_role(viewer, "confidence").data, arrays["confidence"])
        np.testing.assert_array_equal(by_role(viewer, "pseudo_label").data, arrays["pseudo_label"])
        drawn = inspector.plots.drawn
        assert drawn["iteration"] == iteration and drawn["tau"] == pytest.approx(float(arrays["tau"]))
        assert drawn["gaussian_pos"] == pytest.approx((float(arrays["mu_pos"]), float(arrays["sigma_pos"])))
        assert drawn["hist_positive"] + drawn["hist_negative"] == int(arrays["hist_positive"].sum()
                                                                       + arrays["hist_negative"].sum())
        assert drawn["curves"]["mask_ratio"] == ([r["iter"] for r in train], [r["mask_ratio"] for r in train])
        assert drawn["curves"]["tau"][1] == pytest.approx([r["tau"] for r in train])
        # Readable: the thresholds' range (0.93-0.9999) spans most of the histogram's width (a logit axis),
        # and the legends sit under their axes, not over the data.
        plots = inspector.plots
        plots.canvas.draw()
        ax = plots.ax_hist
        x_low, x_high = (ax.transData.transform((x, 1.0))[0] for x in (0.93, 0.9999))
        assert (x_high - x_low) / ax.bbox.width > 0.5
        renderer = plots.canvas.get_renderer()
        for axes in (plots.ax_hist, plots.ax_curves):
            legend = axes.get_legend()
            assert legend is not None and legend.get_window_extent(renderer).y1 <= axes.bbox.y0 + 1
        layers[iteration] = {layer.name: layer for layer in viewer.layers}
    assert layers[1] == layers[2]  # the same layers, updated in place
    assert len(viewer.layers) == 5  # image, confidence, pseudo-label, weight, outcome
    with qtbot.waitSignal(inspector.iteration_shown, timeout=WAIT_MS) as shown:
        inspector.refresh_button.click()  # re-reads the folder and stays on the shown iteration
    assert shown.args == [1] and inspector.slider.value() == 0


def test_inspector_reopened_after_a_slider_move_shows_the_latest_iteration(make_napari_viewer, qtbot, daw_run):
    viewer = make_napari_viewer()
    _, inspector = viewer.window.add_plugin_dock_widget("mitoseg", "Pseudo-label inspector")
    with qtbot.waitSignal(inspector.iteration_shown, timeout=WAIT_MS):
        inspector.open_run(daw_run)
    with qtbot.waitSignal(inspector.iteration_shown, timeout=WAIT_MS) as shown:
        inspector.slider.setValue(0)
    assert shown.args == [1]
    qtbot.waitUntil(lambda: inspector.worker is None, timeout=WAIT_MS)

    seen = []
    inspector.iteration_shown.connect(seen.append)
    inspector.open_run(daw_run)
    qtbot.waitUntil(lambda: inspector.worker is None and bool(seen), timeout=WAIT_MS)
    qtbot.wait(50)  # a stale slider position would start one more load here
    qtbot.waitUntil(lambda: inspector.worker is None, timeout=WAIT_MS)
    assert seen == [2]  # opened at the run's last iteration, and nothing after it
    assert inspector.inspection.iteration == 2 and inspector.slider.value() == 1
    assert by_role(viewer, "image").metadata["mitoseg"]["iteration"] == 2


def test_inspector_opens_a_run_with_fewer_inspection_files(make_napari_viewer, qtbot, daw_run, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(daw_run, short)
    for file in (short / "inspect").glob("iter_000001.*"):
        file.unlink()
    viewer = make_napari_viewer()
    _, inspector = viewer.window.add_plugin_dock_widget("mitoseg", "Pseudo-label inspector")
    with qtbot.waitSignal(inspector.iteration_shown, timeout=WAIT_MS):
        inspector.open_run(daw_run)
    for index, iteration in ((0, 1), (1, 2)):  # the slider was moved, last to the second position
        with qtbot.waitSignal(inspector.iteration_shown, timeout=WAIT_MS) as shown:
            inspector.slider.setValue(index)
        assert shown.args == [iteration]
    qtbot.waitUntil(lambda: inspector.worker is None, timeout=WAIT_MS)

    seen = []
    inspector.iteration_shown.connect(seen.append)
    inspector.open_run(short)
    qtbot.waitUntil(lambda: inspector.worker is None and bool(seen), timeout=WAIT_MS)
    qtbot.wait(50)
    qtbot.waitUntil(lambda: inspector.worker is None, timeout=WAIT_MS)
    assert seen == [2] and inspector.run_dir == short and inspector.iterations == [2]
    assert (inspector.slider.minimum(), inspector.slider.maximum(), inspector.slider.value()) == (0, 0, 0)
    assert not inspector.slider.isEnabled()
    image = by_role(viewer, "image")
    assert image.name.startswith("short: ") and image.metadata["mitoseg"]["path"] == str(
        short / "inspect" / "iter_000002.npz")

    # Back to the longer run while a load is still running: the open wins, at the last iteration.
    with qtbot.waitSignal(inspector.iteration_shown, timeout=WAIT_MS):
        inspector.open_run(daw_run)
    qtbot.waitUntil(lambda: inspector.worker is None, timeout=WAIT_MS)
    inspector.slider.setValue(0)  # starts loading iteration 1 of the long run
    assert inspector.worker is not None
    inspector.open_run(short)  # queued behind that load
    inspector.slider.setValue(1)  # a position in the long run's list, meaningless for the short one
    qtbot.waitUntil(lambda: inspector.worker is None and inspector.run_dir == short, timeout=WAIT_MS)
    qtbot.wait(50)
    qtbot.waitUntil(lambda: inspector.worker is None, timeout=WAIT_MS)
    assert inspector.run_dir == short and inspector.inspection.iteration == 2
    assert (inspector.slider.maximum(), inspector.slider.value()) == (0, 0)


def test_inspection_with_log_density_adds_an_aligned_layer(make_napari_viewer, qtbot, daw_run, tmp_path):
    run = tmp_path / "ddfp"
    shutil.copytree(daw_run, run)
    npz = run / "inspect" / "iter_000002.npz"
    arrays = dict(np.load(npz))
    arrays["log_density"] = np.random.default_rng(0).normal(size=(4, 8, 8)).astype(np.float32)
    np.savez_compressed(npz, **arrays)
    viewer = make_napari_viewer()
    _, inspector = viewer.window.add_plugin_dock_widget("mitoseg", "Pseudo-label inspector")
    with qtbot.waitSignal(inspector.iteration_shown, timeout=WAIT_MS):
        inspector.open_run(run)
    density = by_role(viewer, "log_density")
    np.testing.assert_array_equal(density.data, arrays["log_density"])
    image = by_role(viewer, "image")

    def bounds(layer):  # world coordinates of the outer pixel edges
        return layer.extent.world[0] - layer.scale / 2, layer.extent.world[1] + layer.scale / 2

    np.testing.assert_allclose(bounds(density), bounds(image))  # the 8 x 8 map covers the 32 x 32 patch
    assert density.scale[-1] == 4
    with qtbot.waitSignal(inspector.iteration_shown, timeout=WAIT_MS):
        inspector.slider.setValue(0)  # iteration 1 has no log-density: the layer goes
    assert not [layer for layer in viewer.layers if layer.metadata["mitoseg"]["role"] == "log_density"]


# --------------------------------------------------------------------------- mitoseg view + screenshot


def test_view_refuses_a_bad_run_image_or_display_before_opening_a_window(daw_run, tiny_volumes, tmp_path,
                                                                         monkeypatch):
    import napari

    from mitoseg_napari import launch as launch_module

    from mitoseg.errors import MitosegError

    def no_window(*args, **kwargs):
        raise AssertionError("a window was opened")

    monkeypatch.setattr(napari, "Viewer", no_window)
    monkeypatch.setattr(napari, "run", no_window)
    with pytest.raises(MitosegError, match="not a mitoseg run folder"):
        launch_module.launch(str(tiny_volumes["val_image"].parent))
    with pytest.raises(MitosegError, match="missing.tif"):
        launch_module.launch(str(daw_run), image=str(tmp_path / "missing.tif"))
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch_module.sys, "platform", "linux")
    with pytest.raises(MitosegError, match="needs a display"):
        launch_module.launch(str(daw_run))


def test_view_opens_the_inspector_with_the_image_and_a_screenshot_is_not_blank(
        make_napari_viewer, qtbot, daw_run, tiny_volumes):
    from mitoseg_napari.launch import INSPECTOR_DOCK_NAME, open_run_viewer

    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1280, 900)
    viewer, inspector, predict = open_run_viewer(daw_run, image=str(tiny_volumes["val_image"]), viewer=viewer)
    assert INSPECTOR_DOCK_NAME in docked(viewer)
    if inspector.inspection is None:
        qtbot.waitSignal(inspector.iteration_shown, timeout=WAIT_MS).wait()
    if predict.running:
        with qtbot.waitSignal(predict.prediction_done, timeout=WAIT_MS) as done:
            pass
        assert done.args == ["done"]
    assert viewer.layers["val_image prediction"].data.shape == (4, 64, 64)
    assert by_role(viewer, "image").translate[-1] > 64  # patches to the right of the volume
    meta, _ = recorded(daw_run, 2)
    assert f"{meta['used_pixels']:,}" in inspector.summary.text()

    # In view as opened, without pressing Home: the camera spans the volume and the patches beside it.
    qtbot.wait(200)
    patches = by_role(viewer, "image")
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari >= 0.9: scene
    half_width = viewer.canvas.size[-1] / camera.zoom / 2
    assert patches.extent.world[1][-1] <= camera.center[-1] + half_width + 1
    viewer.layers["val_image prediction"].visible = False
    viewer.reset_view()
    qtbot.wait(200)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = viewer.screenshot(str(ARTIFACTS / "inspector.png"), canvas_only=False, flash=False)
    canvas = viewer.screenshot(canvas_only=True, flash=False)
    assert (ARTIFACTS / "inspector.png").stat().st_size > 10_000
    assert shot.shape[0] >= 600 and shot.shape[1] >= 1000
    # Not blank: the rendered canvas shows the volume and the patches, not one flat colour.
    rgb = canvas[..., :3].astype(float)
    assert rgb.std() > 10 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 100
    if os.environ.get("MITOSEG_UPDATE_SCREENSHOT"):
        (REPO / "docs" / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(ARTIFACTS / "inspector.png", REPO / "docs" / "images" / "inspector.png")


def test_napari_runs_on_qt6():
    """The napari extra installs Qt 6 (PyQt6): napari drops PyQt5, and .ci/system-deps.sh installs the
    system libraries of Qt 6's xcb platform plugin."""
    import qtpy

    assert qtpy.QT_VERSION.startswith("6."), (qtpy.API_NAME, qtpy.QT_VERSION)
    assert qtpy.API_NAME in ("PyQt6", "PySide6")
