"""``mitoseg view RUN [--image VOLUME]``: napari with the pseudo-label inspector on a run.

With ``--image``, the volume is opened too and predicted with the run's
checkpoint (``best.pt``, else ``last.pt``) in the background; the predict
widget shows the progress and can cancel. The inspection patches are then
placed to the right of the volume so the two do not overlap.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mitoseg.errors import MitosegError

INSPECTOR_DOCK_NAME = "mitoseg: pseudo-label inspector"
PREDICT_DOCK_NAME = "mitoseg: predict"


def open_run_viewer(run_dir: str | Path, image: str | None = None, viewer=None, predict: bool = True):
    """Open (or reuse) a napari viewer with the inspector docked on ``run_dir``.

    Returns ``(viewer, inspector, predict_widget)``; ``predict_widget`` is None
    without ``image``. Raises :class:`MitosegError` before any window opens
    when ``run_dir`` is not a run folder or ``image`` is not a readable volume.
    """
    from mitoseg_napari._inspection import resolve_run_dir, run_checkpoint

    run = resolve_run_dir(run_dir)
    image_layers = []
    if image is not None:
        from mitoseg_napari._reader import read_volume_layers

        image_layers = read_volume_layers(str(image))
        if not any(layer_type == "image" and data.ndim in (2, 3) for data, _, layer_type in image_layers):
            raise MitosegError(f"{image}: not a (z, y, x) image volume")

    napari = _require_napari()
    from mitoseg_napari._inspector_widget import InspectorWidget
    from mitoseg_napari._predict_widget import PredictWidget

    if viewer is None:
        _require_display()
        viewer = napari.Viewer(title=f"mitoseg: {run.name}")
    translate = (0.0, 0.0, 0.0)
    predict_widget = None
    if image_layers:
        added = [getattr(viewer, f"add_{layer_type}")(data, **kwargs) for data, kwargs, layer_type in image_layers]
        volume_layer = next(layer for layer in added
                            if isinstance(layer, napari.layers.Image) and layer.ndim in (2, 3))
        width = volume_layer.extent.world[1][-1] - volume_layer.extent.world[0][-1]
        translate = (0.0, 0.0, float(volume_layer.extent.world[1][-1] + 0.05 * width))
        predict_widget = PredictWidget(viewer)
        viewer.window.add_dock_widget(predict_widget, name=PREDICT_DOCK_NAME, area="right")
        predict_widget.image_layer.set_layer(volume_layer)
        checkpoint = run_checkpoint(run)
        if checkpoint is not None:
            predict_widget.checkpoint.setText(str(checkpoint))
            if predict:
                predict_widget.predict()
        else:
            predict_widget.status.setText(f"{run} holds no best.pt or last.pt; choose a checkpoint.")
    inspector = InspectorWidget(viewer, run_dir=run, translate=translate)
    viewer.window.add_dock_widget(inspector, name=INSPECTOR_DOCK_NAME, area="right",
                                  tabify=predict_widget is not None)
    return viewer, inspector, predict_widget


def _require_napari():
    try:
        import napari
    except ImportError as exc:
        raise MitosegError(f"`mitoseg view` needs napari and Qt ({exc}); install them with "
                           "pip install \"mitoseg[napari]\" (in a clone: pip install -e \".[napari]\")") from exc
    return napari


def _require_display() -> None:
    """Qt aborts the process without a display; say so instead (X11 / Wayland on Linux)."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                                                 or os.environ.get("QT_QPA_PLATFORM")):
        raise MitosegError("`mitoseg view` needs a display: no DISPLAY or WAYLAND_DISPLAY is set "
                           "(use X forwarding, a desktop session, or xvfb-run for a virtual one)")


def launch(run_dir: str, image: str | None = None) -> None:
    """Open napari with the pseudo-label inspector on ``run_dir`` (and ``image`` predicted) and run it
    until the window is closed. Raises MitosegError, before opening a window, for a bad run or image,
    without napari installed or without a display."""
    open_run_viewer(run_dir, image)
    _require_napari().run()
