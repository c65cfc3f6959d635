"""The README's napari screenshots from a real round: the Train widget with its defaults (DAW, 1000 iterations,
the default network) on the sample volume, slices 3, 7, 11 painted with the ground truth, 7 validating.

    xvfb-run -a -s "-screen 0 1600x1100x24" python benchmarks/napari_round_screenshots.py OUT_DIR

Writes OUT_DIR/train_1_paint.png (before the round) and OUT_DIR/train_2_watch.png (the round done: the volume's
prediction, the inspector's plots, the suggestions); docs/images/ holds the copies. 2026-12-07: 138 s for the
1000 iterations on the 2-core machine, best validation fg IoU 0.979.
"""
import sys
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

PAINTED = (3, 7, 11)


def paint(layer, truth, z):
    ys, xs = np.nonzero(truth[z])
    layer.data_setitem((np.full_like(ys, z), ys, xs), 1)


out = Path(sys.argv[1] if len(sys.argv) > 1 else "screenshots")
out.mkdir(parents=True, exist_ok=True)
viewer = napari.Viewer(show=True)
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
widget.validation.setText("7")
widget.output.setText(str(out / "session"))
app = QApplication.instance()
done = []
widget.round_finished.connect(lambda status: done.append(status))
def pump(seconds):
    end = time.time() + seconds
    while time.time() < end:
        app.processEvents(); time.sleep(0.05)
pump(2)
viewer.dims.set_current_step(0, 3)
viewer.reset_view(); pump(1)
viewer.screenshot(str(out / "train_1_paint.png"), canvas_only=False, flash=False)
widget.train_button.click()
start = time.time()
while not done and time.time() - start < 660:
    pump(1)
print("status", done, time.time() - start, widget.status.text(), flush=True)
viewer.dims.set_current_step(0, 3)
viewer.reset_view(); pump(3)
viewer.screenshot(str(out / "train_2_watch.png"), canvas_only=False, flash=False)
print(widget.record, flush=True)
viewer.close()
