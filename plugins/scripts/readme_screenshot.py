"""Regenerate docs/images/inspector.png, the README's screenshot of the pseudo-label inspector.

    mitoseg train --config sample_daw --out runs/sample_daw --max-iters 200
    xvfb-run -a -s "-screen 0 1280x1024x24" python plugins/scripts/readme_screenshot.py \\
        runs/sample_daw sample_data/val_image.tif docs/images/inspector.png

Opens the viewer as ``mitoseg view RUN --image VOLUME`` does, waits for the
prediction and the inspector, shows the patch with the most wrong
pseudo-labels, and saves a 256-colour PNG (about 100 kB).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("image")
    parser.add_argument("out")
    parser.add_argument("--size", type=int, nargs=2, default=(1280, 860), metavar=("W", "H"))
    args = parser.parse_args()

    import napari
    from PIL import Image
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    from mitoseg_napari.launch import open_run_viewer

    viewer = napari.Viewer(show=True, title="mitoseg view")
    window = viewer.window._qt_window
    window.resize(*args.size)
    viewer, inspector, predict = open_run_viewer(args.run, image=args.image, viewer=viewer)
    app = QApplication.instance()

    def settle(condition=lambda: False, timeout: float = 1.0) -> None:
        end = time.time() + timeout
        while time.time() < end and not condition():
            app.processEvents()
            time.sleep(0.05)

    settle(lambda: not predict.running and inspector.inspection is not None, timeout=600)
    outcome = next(layer for layer in viewer.layers if layer.metadata.get("mitoseg", {}).get("role") == "outcome")
    viewer.layers.selection.active = outcome
    wrong = ((outcome.data == 2) | (outcome.data == 4)).sum(axis=(1, 2))
    viewer.dims.set_current_step(0, int(np.argmax(wrong)))
    next(layer for layer in viewer.layers if layer.name.endswith(" prediction")).opacity = 0.35
    docks = [dock for name, dock in viewer.window._wrapped_dock_widgets.items() if name.startswith("mitoseg")]
    window.resizeDocks(docks, [430] * len(docks), Qt.Horizontal)
    settle()
    viewer.reset_view()
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for widget in QApplication.topLevelWidgets() + window.findChildren(NapariQtNotification):
        if isinstance(widget, NapariQtNotification):
            widget.close()
    settle()
    shot = viewer.screenshot(canvas_only=False, flash=False)
    image = Image.fromarray(shot[..., :3])
    image.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE).save(
        args.out, optimize=True)
    print(f"saved {args.out}")
    viewer.close()


if __name__ == "__main__":
    main()
