"""The napari Train widget in a real viewer (under Xvfb): paint, train, watch, correct, Continue, Cancel.

The training rounds are real ``mitoseg train`` processes on the sample volume with a tiny network
(TINY), so a 30-iteration DAW round takes about half a minute on two CPU cores. Each step of the loop
leaves a screenshot in test-artifacts/ (copied to docs/images/ with MITOSEG_UPDATE_SCREENSHOT=1), the
README's walk-through.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from qtpy.QtCore import Qt

from mitoseg.config import config_from_dict
from mitoseg.runs import load_checkpoint
from mitoseg.errors import MitosegError

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
ROUND_MS = 240_000  # a round: process start (imports), training, the final prediction
TINY = ["model.channels=[8, 16, 32]", "model.strides=[2, 2]", "model.num_res_units=1", "model.feature_channels=8",
        "model.head_channels=8", "data.patch_size=[64, 64]", "data.batch_size=2", "data.unlabeled_batch_size=2",
        "optim.lr=0.003", "inference.sw_batch_size=2"]
PAINTED = (3, 7, 11)  # slices painted with the sample's ground truth; 7 validates


def paint(layer, truth: np.ndarray, z: int) -> None:
    """Paint the mitochondria of slice ``z`` as a user would, through the layer's editing API (undoable)."""
    ys, xs = np.nonzero(truth[z])
    layer.data_setitem((np.full_like(ys, z), ys, xs), 1)


def screenshot(viewer, qtbot, name: str) -> None:
    viewer.reset_view()
    qtbot.wait(300)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = viewer.screenshot(str(ARTIFACTS / name), canvas_only=False, flash=False)
    assert shot.shape[0] >= 600 and (ARTIFACTS / name).stat().st_size > 10_000
    if os.environ.get("MITOSEG_UPDATE_SCREENSHOT"):
        (REPO / "docs" / "images").mkdir(parents=True, exist_ok=True)
        shutil.copy(ARTIFACTS / name, REPO / "docs" / "images" / name)


@pytest.fixture
def painted_viewer(make_napari_viewer):
    """The sample volume, a 'painted' Labels layer with PAINTED slices painted, and the Train widget on them."""
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 1000)
    viewer.open_sample("mitoseg", "synthetic_em")
    truth = viewer.layers["synthetic EM labels"].data
    viewer.layers["synthetic EM labels"].visible = False
    painted = viewer.add_labels(np.zeros_like(truth), name="painted")
    for z in PAINTED:
        paint(painted, truth, z)
    _, widget = viewer.window.add_plugin_dock_widget("mitoseg", "Train")
    widget.image_layer.setCurrentText("synthetic EM")
    widget.labels_layer.setCurrentText("painted")
    yield viewer, widget, painted, truth
    if widget.process is not None:  # a failed test must not leave a trainer behind
        widget.process.kill()
        widget.process.wait()


def wait_round(qtbot, widget, start) -> str:
    with qtbot.waitSignal(widget.round_finished, timeout=ROUND_MS) as finished:
        start()
    return finished.args[0]


def table(widget) -> list[list[str]]:
    return [[widget.history.item(r, c).text() for c in range(widget.history.columnCount())]
            for r in range(widget.history.rowCount())]


def test_label_train_watch_correct_and_continue(painted_viewer, qtbot, tmp_path):
    viewer, widget, painted, truth = painted_viewer
    session = tmp_path / "session"
    qtbot.waitUntil(lambda: widget.labeled() == list(PAINTED), timeout=5000)  # the list follows the painting
    widget.validation.setText("7")
    widget.method.setCurrentText("daw")
    widget.iterations.setValue(30)
    widget.output.setText(str(session))
    widget.extra.setPlainText("\n".join(TINY))
    viewer.dims.set_current_step(0, 3)
    screenshot(viewer, qtbot, "train_1_paint.png")

    # Round 1: 30 iterations of DAW on slices 3 and 11, validated on slice 7.
    progress = []
    predicted = []
    widget.progressed.connect(lambda done, total: progress.append((done, total)))
    widget.slice_predicted.connect(lambda z, iteration: predicted.append((z, iteration)))
    assert wait_round(qtbot, widget, widget.train_button.click) == "done", widget.status.text()
    run = session / "round_001"
    # An ordinary run folder: what mitoseg train writes, and the round's own inputs.
    for name in ("config.json", "last.pt", "best.pt", "metrics.jsonl", "summary.json", "train.yaml", "labels.tif",
                 "round.json", "train.log"):
        assert (run / name).is_file(), name
    cfg = config_from_dict(json.loads((run / "config.json").read_text()))
    assert cfg.method.name == "daw" and cfg.data.train.slices == [3, 11] and cfg.data.val.slices == [7]
    assert cfg.data.unlabeled[0].slices == [z for z in range(16) if z not in PAINTED]
    assert cfg.model.init_from is None and cfg.train.iterations == 30
    np.testing.assert_array_equal(tifffile.imread(cfg.data.train.label), painted.data)
    np.testing.assert_array_equal(tifffile.imread(cfg.data.train.image), viewer.layers["synthetic EM"].data)
    assert load_checkpoint(run / "last.pt")["iteration"] == 30
    summary = json.loads((run / "summary.json").read_text())
    assert summary["completed"] and summary["best"]["metric"] == "fg_iou"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["split"] == "train"] == list(range(1, 31))
    assert [r["iter"] for r in records if r["split"] == "val"] == list(range(3, 31, 3))
    assert sorted(p.name for p in (run / "inspect").glob("*.npz")) == [f"iter_{i:06d}.npz" for i in range(3, 31, 3)]
    # The widget followed it: progress, the live plot, a prediction at a checkpoint, the inspector, the history.
    assert progress[-1] == (30, 30) and widget.progress.value() == 30
    drawn = widget.plots.drawn
    assert drawn["loss"][0] == list(range(1, 31))
    # (the warm-up's steps have no mask ratio: the plot starts where the unlabeled loss does)
    assert drawn["mask_ratio"][1] == pytest.approx([r["mask_ratio"] for r in records
                                                    if r["split"] == "train" and r["mask_ratio"] is not None])
    assert drawn["tau"][0] == list(range(1, 31)) and drawn["fg_iou"][0] == list(range(3, 31, 3))
    assert predicted and all(z == 3 for z, _ in predicted) and all(0 < it <= 30 for _, it in predicted)
    assert widget.inspector is not None and widget.inspector.run_dir == run
    qtbot.waitUntil(lambda: widget.inspector.inspection is not None and widget.inspector.inspection.iteration == 30,
                    timeout=30_000)
    prediction = viewer.layers["synthetic EM prediction"]
    assert prediction.data.shape == (16, 256, 256) and prediction.data.dtype == np.uint8
    assert prediction.metadata["mitoseg"]["checkpoint"] == str(run / "best.pt")
    best = summary["best"]
    assert table(widget) == [["1", "daw", "3, 11", "7", "30", f"{best['value']:.3f}", "done"]]
    assert json.loads((run / "round.json").read_text())["status"] == "done"
    assert widget.continue_button.isEnabled() and not widget.cancel_button.isEnabled()
    # mitoseg train --resume works on it (a finished run: nothing left to train).
    from mitoseg.cli import main

    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0
    # What to label next: the suggestions list (never a painted slice, never two neighbours), the uncertainty map.
    suggested = [widget.suggestions.item(i).data(Qt.UserRole) for i in range(widget.suggestions.count())]
    assert len(suggested) == 3 and not set(suggested) & set(PAINTED), suggested
    assert all(abs(a - b) >= 2 for i, a in enumerate(suggested) for b in suggested[i + 1:])
    assert widget.suggestions.item(0).text().startswith(f"1. slice {suggested[0]}:")
    uncertainty = viewer.layers["synthetic EM uncertainty"]
    assert uncertainty.data.shape == (16, 256, 256) and uncertainty.data[suggested[0]].max() > 0
    assert not uncertainty.data[list(PAINTED)].any()  # painted slices are not scored
    widget.suggestions.itemClicked.emit(widget.suggestions.item(1))  # a click goes to the slice
    assert widget.current_slice() == suggested[1]
    screenshot(viewer, qtbot, "train_2_watch.png")

    # Correct: the prediction of the unlabeled slice with the most predicted mitochondria goes to the labels.
    unlabeled = [z for z in range(16) if z not in PAINTED]
    z = max(unlabeled, key=lambda s: int(np.count_nonzero(prediction.data[s])))
    assert np.count_nonzero(prediction.data[z]) > 0
    viewer.dims.set_current_step(0, z)
    assert widget.current_slice() == z
    widget.copy_button.click()
    np.testing.assert_array_equal(painted.data[z], prediction.data[z])
    qtbot.waitUntil(lambda: widget.labeled() == sorted([*PAINTED, z]), timeout=5000)
    painted.undo()  # one undoable edit
    assert not painted.data[z].any()
    painted.redo()
    np.testing.assert_array_equal(painted.data[z], prediction.data[z])
    # A correction with the eraser: napari's paint with label 0 at a predicted pixel.
    ys, xs = np.nonzero(painted.data[z])
    painted.brush_size = 3
    painted.paint((z, ys[0], xs[0]), 0)
    assert painted.data[z, ys[0], xs[0]] == 0
    corrected = painted.data.copy()
    viewer.layers["synthetic EM prediction"].visible = False
    viewer.layers.selection.active = painted
    painted.mode = "paint"
    screenshot(viewer, qtbot, "train_3_correct.png")
    viewer.layers["synthetic EM prediction"].visible = True

    # Continue: 10 iterations fine-tuned from round 1's last.pt, on the enlarged labeled set, in round_002.
    widget.iterations.setValue(10)
    assert wait_round(qtbot, widget, widget.continue_button.click) == "done", widget.status.text()
    child = session / "round_002"
    record = json.loads((child / "round.json").read_text())
    assert record["parent"] == str(run) and record["init_from"] == str(run / "last.pt")
    assert record["labeled_slices"] == sorted([3, 11, z]) and record["validation_slices"] == [7]
    cfg = config_from_dict(json.loads((child / "config.json").read_text()))
    assert cfg.model.init_from == str(run / "last.pt") and cfg.data.train.slices == sorted([3, 11, z])
    assert cfg.train.iterations == 10 and cfg.model.channels == [8, 16, 32]
    np.testing.assert_array_equal(tifffile.imread(cfg.data.train.label), corrected)
    assert cfg.data.train.image == str(next((session / "images").glob("*.tif")))  # the image is written once
    summary = json.loads((child / "summary.json").read_text())
    assert summary["init"]["path"] == str(run / "last.pt") and summary["iterations"] == 10
    assert f"model.init_from: the " in (child / "train.log").read_text()
    rows = table(widget)
    assert [row[0] for row in rows] == ["1", "2"]
    assert rows[1][2] == ", ".join(str(s) for s in sorted([3, 11, z])) and rows[1][4] == "10" and rows[1][6] == "done"
    assert viewer.layers["synthetic EM prediction"].metadata["mitoseg"]["checkpoint"] == str(child / "best.pt")
    assert widget.inspector.run_dir == child
    screenshot(viewer, qtbot, "train_4_continue.png")


def test_cancel_mid_run_leaves_a_resumable_run(painted_viewer, qtbot, tmp_path):
    viewer, widget, painted, truth = painted_viewer
    widget.iterations.setValue(100_000)  # far more than the test waits for
    widget.method.setCurrentText("supervised")
    widget.output.setText(str(tmp_path / "session"))
    widget.extra.setPlainText("\n".join(TINY))
    with qtbot.waitSignal(widget.round_started, timeout=60_000):
        widget.train_button.click()
    assert not widget.train_button.isEnabled() and widget.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: widget.progress.value() >= 3, timeout=ROUND_MS)
    with qtbot.waitSignal(widget.round_finished, timeout=120_000) as finished:
        widget.cancel_button.click()
    assert finished.args == ["cancelled"]
    run = tmp_path / "session" / "round_001"
    reached = load_checkpoint(run / "last.pt")["iteration"]
    assert 3 <= reached < 100_000
    assert json.loads((run / "round.json").read_text())["status"] == "cancelled"
    assert table(widget)[0][-1] == "cancelled" and widget.continue_button.isEnabled()
    assert "interrupted at iteration" in (run / "train.log").read_text()
    from mitoseg.cli import main

    assert main(["train", "--resume", "--out", str(run), "--max-iters", str(reached + 2), "--no-progress"]) == 0
    assert load_checkpoint(run / "last.pt")["iteration"] == reached + 2


def test_train_refuses_what_it_cannot_train_on_in_one_line(painted_viewer, qtbot, tmp_path):
    from napari.utils.notifications import notification_manager

    viewer, widget, painted, truth = painted_viewer
    seen = []
    notification_manager.notification_ready.connect(lambda event: seen.append(str(event.message)))
    widget.train_button.click()
    assert "choose an output folder" in widget.status.text() and widget.process is None
    widget.output.setText(str(tmp_path / "session"))
    widget.validation.setText("5")
    widget.train_button.click()
    assert "validation slices [5] hold no painted pixel" in widget.status.text()
    widget.validation.setText("")
    widget.set_excluded(PAINTED)
    widget.train_button.click()
    assert "no labeled slice to train on" in widget.status.text()
    widget.set_excluded([])
    widget.continue_button.click()  # disabled: nothing to continue from
    assert widget.prepare_worker is None and not (tmp_path / "session").exists()
    widget.extra.setPlainText("optim.lr=-1")  # checked in the worker that prepares the round
    widget.train_button.click()
    qtbot.waitUntil(lambda: widget.prepare_worker is None, timeout=30_000)
    assert "config key 'optim.lr' must be greater than 0" in widget.status.text()
    assert not list((tmp_path / "session").glob("round_*"))
    assert any("optim.lr" in m for m in seen), seen


# ------------------------------------------------------------------------------------------ without Qt


def test_round_helpers_find_labeled_slices_follow_metrics_and_build_the_config(tmp_path):
    from mitoseg_napari._training import (
        MetricsFollower,
        RoundRequest,
        build_round_config,
        check_request,
        labeled_slices,
        num_classes_of,
        parse_slices,
        training_command,
    )

    labels = np.zeros((6, 40, 40), np.uint8)
    labels[1, 3, 4] = 1
    labels[4, :2] = 2
    assert labeled_slices(labels) == [1, 4]
    assert num_classes_of(labels, [1]) == 2 and num_classes_of(labels, [1, 4]) == 3
    assert parse_slices("4", 6, "validation slices") == [4] and parse_slices("0:2, 5", 6, "v") == [0, 1, 5]
    assert parse_slices(" ", 6, "v") == []
    with pytest.raises(MitosegError, match="validation slices"):
        parse_slices("9", 6, "validation slices")

    path = tmp_path / "metrics.jsonl"
    follower = MetricsFollower(path)
    assert follower.read_new() == []
    path.write_text('{"iter": 1, "split": "train", "loss": 1.0}\n{"iter": 2, "spl')  # the trainer mid-line
    assert [r["iter"] for r in follower.read_new()] == [1]
    with open(path, "a") as handle:
        handle.write('it": "train", "loss": 0.5}\n')
    assert [r["iter"] for r in follower.read_new()] == [2] and not follower.reset
    path.write_text('{"iter": 1, "split": "train"}\n')  # rewritten (a resumed run): read again from the start
    assert [r["iter"] for r in follower.read_new()] == [1] and follower.reset

    image = np.zeros((6, 40, 40), np.uint8)
    request = RoundRequest(session=tmp_path, image=image, image_name="em", labels=labels, labels_name="l",
                           train_slices=[1], val_slices=[4], method="daw", iterations=200,
                           overrides=["optim.lr=0.01"])
    check_request(request)
    raw = build_round_config(request, tmp_path / "em.tif", tmp_path / "labels.tif", 3)
    cfg = config_from_dict(raw)
    assert cfg.data.patch_size == [40, 40] and cfg.data.num_classes == 3 and cfg.optim.lr == 0.01
    assert cfg.data.unlabeled[0].slices == [0, 2, 3, 5] and cfg.data.val.slices == [4]
    assert (cfg.train.val_every, cfg.train.checkpoint_every, cfg.train.log_every) == (20, 20, 4)
    assert cfg.train.eval_model == "best_of"
    from mitoseg.config import SEMI_SUPERVISED_SAFEGUARDS  # the widget's default method is guarded as init's

    assert {k: getattr(cfg.method, k) for k in SEMI_SUPERVISED_SAFEGUARDS} == SEMI_SUPERVISED_SAFEGUARDS
    unvalidated = build_round_config(RoundRequest(**{**request.__dict__, "val_slices": []}), tmp_path / "em.tif",
                                     tmp_path / "labels.tif", 3)
    assert config_from_dict(unvalidated).train.eval_model == "student"  # no validation: the student, as init
    command = training_command(tmp_path / "round_001", max_minutes=2.5)
    assert command[3:] == ["train", "--config", str(tmp_path / "round_001" / "train.yaml"), "--out",
                           str(tmp_path / "round_001"), "--overwrite", "--no-progress", "--max-minutes", "2.5"]
    for change, needle in ((dict(val_slices=[1]), "both training and validation"),
                           (dict(train_slices=[0, 1, 2, 3, 5]), "every slice is labeled"),
                           (dict(labels=labels[:5]), "must match"),
                           (dict(parent=tmp_path / "nothing"), "holds no last.pt")):
        with pytest.raises(MitosegError, match=needle):
            check_request(RoundRequest(**{**request.__dict__, **change}))
