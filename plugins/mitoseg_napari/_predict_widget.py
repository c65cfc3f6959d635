"""Predict widget: a checkpoint and an image layer give a prediction and a confidence layer.

Prediction runs in a worker thread, one ``inference.slab`` of slices at a
time (:class:`mitoseg.inference.VolumePredictor`, the same code as ``mitoseg
predict``): the progress bar advances per slab and "Cancel" stops before the
next slab. The result is a Labels layer (uint8 classes) and an Image layer,
either the confidence (max class probability, float32, same shape as the
image) or the per-class probabilities (float32, (K, z, y, x)). With "3-D objects", the
worker then labels the objects of the predicted foreground
(:func:`mitoseg.instances.segment.segment_instances`: optional split, minimum
size) and measures them (:func:`mitoseg.instances.measure.measure_objects`, with
each object's mean foreground probability, in um^3 when the image layer's units
are lengths); the result is a ``<image> objects`` Labels layer (uint32) and the
Objects dock shows its table.
"""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_info
from qtpy.QtCore import Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import create_worker

from mitoseg.errors import MitosegError
from mitoseg_napari._layers import LAYER_KEY, report_error
from mitoseg_napari._objects import ObjectOptions, find_objects, objects_features, objects_metadata, voxel_size_nm
from mitoseg_napari._qt_utils import LayerCombo, PathEdit, scroll_body

OUTPUT_CONFIDENCE = "confidence"
OUTPUT_PROBABILITIES = "class probabilities"
DEVICES = ("auto", "cpu", "cuda")
OBJECTS_DOCK = "Objects"  # the npe2 widget that shows the measurements
#: what ``predict_steps`` yields after the slabs (the progress bar is busy meanwhile)
PHASE_OBJECTS, PHASE_DONE = "objects", "objects done"
TTA_CHOICES = {"as trained": None, "on": True, "off": False}


class _ArrayVolume:
    """``shape`` / ``read`` / ``read_slices`` over a (z, y, x) numpy or dask array (a layer's data)."""

    def __init__(self, data):
        self.data = data
        self.shape = tuple(int(n) for n in data.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.data[start:stop])

    def read_slices(self, indices) -> np.ndarray:
        return np.stack([np.asarray(self.data[int(i)]) for i in indices])


def volume_from_layer(layer: Image):
    """The (z, y, x) data of an image layer (a 2-D image is one slice); MitosegError if it has none."""
    if layer.rgb:
        raise MitosegError(f"layer '{layer.name}' is RGB; mitoseg predicts single-channel (grayscale) EM images")
    data = layer.data[0] if layer.multiscale else layer.data
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise MitosegError(f"layer '{layer.name}' has shape {tuple(data.shape)}; expected a 2-D image or a "
                           "(z, y, x) volume")
    if np.dtype(data.dtype).kind not in "biuf":
        raise MitosegError(f"layer '{layer.name}' has unsupported dtype {data.dtype}")
    return _ArrayVolume(data)


def predict_steps(volume, checkpoint: str, weights: str = "ema", device: str = "auto",
                  output: str = OUTPUT_CONFIDENCE, tta: bool | None = None, objects=None,
                  voxel_size=None) -> Generator[tuple[int, int] | str, None, dict]:
    """Predict ``volume`` slab by slab; yields ``(slices done, total)``, returns the arrays.

    Returns ``{"labels": uint8 (z, y, x), "image": float32 (z, y, x) confidence or (K, z, y, x)
    probabilities, "num_classes": K, "checkpoint": path}``. Between two yields the caller may stop
    the generator: that is how "Cancel" works. ``tta``: test-time augmentation on / off (None: the
    run's ``inference.tta``); the run's 2.5-D context and post-processing apply as in ``mitoseg predict``.
    ``objects``: :class:`~mitoseg.instances.segment.InstanceOptions`; then, after the slabs, yields
    ``PHASE_OBJECTS``, labels the objects of the foreground (label > 0), yields ``PHASE_DONE`` and adds
    ``"objects"`` (uint32 ids), ``"count"`` and ``"measurements"`` (with the mean foreground probability,
    1 - P(background); volumes in um^3 with ``voxel_size``, nm per voxel (z, y, x), else in voxels).
    ``voxel_size`` is also the layer's pixel size that a model with a working ``data.pixel_size`` is rescaled
    against (as ``mitoseg predict``: :mod:`mitoseg.inference.session`).
    """
    from mitoseg.data.resample import in_plane_nm
    from mitoseg.inference.session import Segmenter
    from mitoseg.semi.daw import max_and_argmax
    from mitoseg.instances import postprocess_labels

    segmenter = Segmenter.from_file(checkpoint, weights=weights, device=check_device(device))
    cfg = segmenter.cfg
    if tta is not None:
        cfg.inference.tta = tta
    num_slices = len(volume)
    yield 0, num_slices
    prepared = segmenter.prepare(volume, "image layer", in_plane_nm(voxel_size),
                                 "the layer's scale in nm per pixel (its units nm or um)")
    k = cfg.data.num_classes
    labels = np.zeros(volume.shape, np.uint8 if k <= 256 else np.uint16)
    if output == OUTPUT_PROBABILITIES:
        image = np.zeros((k, *volume.shape), np.float32)
    else:
        image = np.zeros(volume.shape, np.float32)
    # P(foreground) = 1 - P(background): kept for the objects' mean probability (the probabilities output
    # has it as 1 - image[0]; the confidence is that of the winning class, not of the foreground)
    foreground = None
    if objects is not None and output != OUTPUT_PROBABILITIES:
        foreground = np.zeros(volume.shape, np.float32)

    for start, stop, probs in prepared.slabs():
        confidence, classes = max_and_argmax(probs)
        labels[start:stop] = classes.cpu().numpy()
        if output == OUTPUT_PROBABILITIES:
            image[:, start:stop] = probs.transpose(0, 1).cpu().numpy()
        else:
            image[start:stop] = confidence.cpu().numpy()
        if foreground is not None:
            foreground[start:stop] = (1.0 - probs[:, 0]).cpu().numpy()
        yield stop, num_slices
    if prepared.predictor.postprocessing:
        def put(start: int, values: np.ndarray) -> None:
            labels[start:start + values.shape[0]] = values

        postprocess_labels(lambda s, e: labels[s:e], put, num_slices, cfg.inference.min_object_voxels,
                           cfg.inference.fill_holes, slab=cfg.inference.slab)
    result = {"labels": labels, "image": image, "num_classes": k, "checkpoint": str(checkpoint)}
    if objects is not None:
        yield PHASE_OBJECTS
        if foreground is None:
            foreground = _ForegroundOfProbabilities(image)
        ids, count, measurements = find_objects(labels, objects, voxel_size, foreground)
        result.update(objects=ids, count=count, measurements=measurements, voxel_size=voxel_size)
        yield PHASE_DONE
    return result


def suggest_slices(volume, checkpoint: str, labeled, device: str = "auto", voxel_size=None, n: int = 3) -> dict:
    """``mitoseg suggest`` on an image layer's ``volume``: ``{"suggestion": Suggestion, "map": float32 (z, y, x)
    per-pixel entropy of the scored slices (0 elsewhere), "checkpoint": path}``."""
    from mitoseg.data.resample import in_plane_nm
    from mitoseg.inference.session import Segmenter
    from mitoseg.suggest import checkpoint_band, suggest_volume

    segmenter = Segmenter.from_file(checkpoint, device=check_device(device))
    band = checkpoint_band(checkpoint, segmenter.cfg)
    entropy = np.zeros(volume.shape, np.float32)

    def on_map(index: int, values: np.ndarray) -> None:
        entropy[index] = values

    suggestion = suggest_volume(segmenter, volume, "image layer", n, list(labeled), volume_nm=in_plane_nm(voxel_size),
                                band=band, on_map=on_map, progress=False,
                                hint="the layer's scale in nm per pixel (its units nm or um)")
    return {"suggestion": suggestion, "map": entropy, "checkpoint": str(checkpoint)}


class _ForegroundOfProbabilities:
    """1 - P(background) of a (K, z, y, x) probability array, slab by slab (no copy of the volume)."""

    def __init__(self, probabilities: np.ndarray):
        self.probabilities = probabilities
        self.shape = probabilities.shape[1:]
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        return 1.0 - self.probabilities[0][key]


class PredictWidget(QWidget):
    """Checkpoint + image layer -> prediction (Labels) and confidence / probabilities (Image)."""

    #: "done", "cancelled" or "failed", when a prediction ends
    prediction_done = Signal(str)
    #: (slices done, total slices) after each slab
    progressed = Signal(int, int)

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self._viewer = napari_viewer
        self.worker = None
        self._source = None

        self.checkpoint = PathEdit("best.pt of a run", file_filter="mitoseg checkpoints (*.pt);;All files (*)")
        self.weights = QComboBox()
        self.weights.addItems(["ema", "student"])
        self.image_layer = LayerCombo(napari_viewer, (Image,))
        self.output = QComboBox()
        self.output.addItems([OUTPUT_CONFIDENCE, OUTPUT_PROBABILITIES])
        self.tta = QComboBox()
        self.tta.addItems(list(TTA_CHOICES))
        self.tta.setToolTip("test-time augmentation: the mean over the 8 flips / quarter turns (8x the time); "
                            "'as trained': the run's inference.tta")
        self.device = QComboBox()
        # No probing here: importing torch and asking for CUDA would freeze the interface for seconds
        # while the widget opens. The worker checks the choice (see ``check_device``).
        self.device.addItems(DEVICES)
        self.device.setToolTip("auto: the GPU when CUDA is available, else the CPU")
        self.objects = QCheckBox("3-D objects")
        self.objects.setToolTip("also label the 3-D objects of the predicted foreground as an '<image> objects' "
                                "Labels layer (uint32 ids) and measure them (the Objects dock)")
        self.object_options = ObjectOptions()
        self.object_options.setEnabled(False)
        self.predict_button = QPushButton("Predict")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m slices")
        self.status = QLabel("Choose a checkpoint and an image layer.")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("Checkpoint", self.checkpoint)
        form.addRow("Weights", self.weights)
        form.addRow("Image layer", self.image_layer)
        form.addRow("Output", self.output)
        form.addRow("Test-time augmentation", self.tta)
        form.addRow("Device", self.device)
        form.addRow("Instances", self.objects)
        # The object options in a box of their own under the form: as a row of the form they were squeezed
        # below their height (a form inside a form's row).
        objects_box = QGroupBox("3-D objects")
        QVBoxLayout(objects_box).addWidget(self.object_options)
        buttons = QHBoxLayout()
        buttons.addWidget(self.predict_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(scroll_body(self))
        layout.addLayout(form)
        layout.addWidget(objects_box)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.predict_button.clicked.connect(self.predict)
        self.cancel_button.clicked.connect(self.cancel)
        self.objects.toggled.connect(self.object_options.setEnabled)

    # ------------------------------------------------------------------ actions

    @property
    def running(self) -> bool:
        return self.worker is not None

    def predict(self) -> None:
        """Start predicting the chosen image layer (does nothing while a prediction runs)."""
        if self.running:
            return
        try:
            checkpoint = self.checkpoint.text()
            if not checkpoint:
                raise MitosegError("choose a checkpoint file (best.pt or last.pt of a run)")
            layer = self.image_layer.layer()
            if layer is None:
                raise MitosegError("choose an image layer to predict")
            volume = volume_from_layer(layer)
        except MitosegError as exc:
            report_error(exc, "Predict")
            return
        objects = self.object_options.options() if self.objects.isChecked() else None
        voxel_size = voxel_size_nm(layer)  # the objects' units and the pixel size a model may rescale to
        self._source = {"name": layer.name, "scale": tuple(layer.scale), "translate": tuple(layer.translate),
                        "units": getattr(layer, "units", None), "is_2d": layer.ndim == 2,
                        "output": self.output.currentText(), "total": len(volume)}
        worker = create_worker(predict_steps, volume, checkpoint, self.weights.currentText(),
                               self.device.currentText(), self.output.currentText(),
                               TTA_CHOICES[self.tta.currentText()], objects, voxel_size, _start_thread=False,
                               _ignore_errors=True)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(self._on_aborted)
        worker.finished.connect(self._on_finished)
        self.worker = worker
        self._outcome = "failed"
        self.predict_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setRange(0, 0)  # busy until the model is loaded
        self.status.setText(f"Loading {checkpoint} ...")
        worker.start()

    def cancel(self) -> None:
        """Stop the running prediction before its next slab."""
        if self.worker is not None:
            self.worker.quit()
            self.cancel_button.setEnabled(False)
            self.status.setText("Cancelling after the current slab ...")

    # ----------------------------------------------------------------- worker

    def _on_progress(self, value: tuple[int, int] | str) -> None:
        if value == PHASE_OBJECTS:
            self.progress.setRange(0, 0)  # busy: one step, not slice by slice
            self.status.setText(f"Finding and measuring the 3-D objects of {self._source['name']} ...")
            return
        if value == PHASE_DONE:
            total = self._source["total"]
            self.progress.setRange(0, max(total, 1))
            self.progress.setValue(total)
            return
        done, total = value
        self.progress.setRange(0, max(total, 1))
        self.progress.setValue(done)
        self.status.setText(f"Predicting {self._source['name']}: {done} / {total} slices")
        self.progressed.emit(done, total)

    def _on_returned(self, result: dict) -> None:
        src = self._source
        name, scale, translate = src["name"], src["scale"], src["translate"]
        labels, image = result["labels"], result["image"]
        if src["is_2d"]:
            labels, image = labels[0], image[..., 0, :, :]
        meta = {LAYER_KEY: {"role": "prediction", "checkpoint": result["checkpoint"], "source": name}}
        self._put_layer(Labels, f"{name} prediction", labels, scale=scale, translate=translate, metadata=meta,
                        opacity=0.5)
        if src["output"] == OUTPUT_PROBABILITIES:
            what = "probabilities"
            scale, translate = (1.0, *scale), (0.0, *translate)
        else:
            what = "confidence"
        self._put_layer(Image, f"{name} {what}", image, scale=scale, translate=translate, metadata=meta,
                        colormap="viridis", contrast_limits=(0.0, 1.0), visible=False)
        self._outcome = "done"
        self.status.setText(f"Done: '{name} prediction' ({result['num_classes']} classes) and '{name} {what}'.")
        if "objects" in result:
            self._add_objects(result)

    def _add_objects(self, result: dict) -> None:
        """The ``<image> objects`` layer, and the Objects dock showing its measurements."""
        src = self._source
        name = src["name"]
        ids = result["objects"][0] if src["is_2d"] else result["objects"]
        measurements = result["measurements"]
        meta = objects_metadata(measurements, result["voxel_size"], checkpoint=result["checkpoint"], source=name)
        units = {"units": src["units"]} if src["units"] is not None else {}  # napari >= 0.6
        layer = self._put_layer(Labels, f"{name} objects", ids, scale=src["scale"], translate=src["translate"],
                                metadata=meta, opacity=0.6, **units)
        layer.features = objects_features(measurements)
        self.status.setText(f"{self.status.text()[:-1]}, '{name} objects': {measurements.summary()}.")
        try:
            _, dock = self._viewer.window.add_plugin_dock_widget("mitoseg", OBJECTS_DOCK)
        except Exception as exc:  # noqa: BLE001 - the layer is there; only the table is missing
            report_error(exc, "Objects dock")
            return
        dock.show_layer(layer)

    def _put_layer(self, kind, name: str, data, **kwargs):
        """Replace the data of the layer ``name`` (same kind and dimensionality) or add a new one."""
        if name in self._viewer.layers:
            layer = self._viewer.layers[name]
            if isinstance(layer, kind) and layer.ndim == data.ndim:
                layer.data = data
                layer.scale, layer.translate = kwargs["scale"], kwargs["translate"]
                if "units" in kwargs:
                    layer.units = kwargs["units"]
                layer.metadata = kwargs["metadata"]
                return layer
        return self._viewer.add_layer(kind(data, name=name, **kwargs))

    def _on_error(self, exc: Exception) -> None:
        self._outcome = "failed"
        self.status.setText(f"Failed: {exc}")
        report_error(exc, "Predict")

    def _on_aborted(self) -> None:
        self._outcome = "cancelled"
        self.status.setText("Cancelled; no layers were added.")
        show_info("mitoseg: prediction cancelled")

    def _on_finished(self) -> None:
        self.worker = None
        self.predict_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if self._outcome != "done":
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
        self.prediction_done.emit(self._outcome)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt naming)
        self.cancel()
        super().closeEvent(event)


def check_device(device: str):
    """The torch device for the widget's choice; MitosegError (one line) for "cuda" without CUDA.

    Runs in the worker: the first ``import torch`` and the CUDA probe take seconds.
    """
    import torch

    from mitoseg.device import resolve_device

    if device.startswith("cuda") and not torch.cuda.is_available():
        why = "this PyTorch was built without CUDA" if torch.version.cuda is None else "no usable GPU was found"
        raise MitosegError(f"device '{device}' was chosen but CUDA is not available ({why}); "
                           "choose 'auto' or 'cpu'")
    return resolve_device(device)
