"""Small Qt helpers shared by the widgets."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QComboBox, QFileDialog, QFrame, QHBoxLayout, QLineEdit, QPushButton, QScrollArea,
                            QVBoxLayout, QWidget)


def scroll_body(widget: QWidget) -> QWidget:
    """A body for ``widget`` inside a scroll area that fills it: the caller lays its controls out on the body.
    A dock then asks napari for little height (the scroll area's), so several docks and the canvas, dims slider
    and status bar fit a laptop screen (1366 x 768); a dock shorter than its controls scrolls."""
    area = QScrollArea(widget)
    area.setWidgetResizable(True)
    area.setFrameShape(QFrame.NoFrame)
    area.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)  # the dock's width follows its controls
    body = QWidget()
    area.setWidget(body)
    outer = QVBoxLayout(widget)
    outer.setContentsMargins(0, 0, 0, 0)
    outer.addWidget(area)
    widget.scroll_area = area
    return body


class LayerCombo(QComboBox):
    """A combo box listing the viewer's layers of some types, kept in sync with the layer list."""

    def __init__(self, viewer, layer_types: tuple[type, ...], parent=None):
        super().__init__(parent)
        self._viewer = viewer
        self._types = layer_types
        # napari holds bound methods weakly: the connections die with this widget.
        viewer.layers.events.inserted.connect(self._refresh)
        viewer.layers.events.removed.connect(self._refresh)
        viewer.layers.events.moved.connect(self._refresh)
        for layer in viewer.layers:
            if isinstance(layer, layer_types):
                layer.events.name.connect(self._refresh)
        self._refresh()

    def _refresh(self, event=None) -> None:
        if event is not None and getattr(event, "type", None) == "inserted":
            layer = event.value
            if isinstance(layer, self._types):
                layer.events.name.connect(self._refresh)
        current = self.currentText()
        names = [layer.name for layer in self._viewer.layers if isinstance(layer, self._types)]
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current in names:
            self.setCurrentText(current)
        self.blockSignals(False)
        if current not in names:
            self.currentIndexChanged.emit(self.currentIndex())

    def layer(self):
        """The chosen layer, or None."""
        name = self.currentText()
        if name and name in self._viewer.layers:
            layer = self._viewer.layers[name]
            if isinstance(layer, self._types):
                return layer
        return None

    def set_layer(self, layer) -> None:
        self._refresh()
        self.setCurrentText(layer.name)


class PathEdit(QWidget):
    """A line edit with a "Browse..." button for a file or a folder."""

    def __init__(self, placeholder: str, folder: bool = False, file_filter: str = "", parent=None):
        super().__init__(parent)
        self.edit = QLineEdit()
        self.edit.setPlaceholderText(placeholder)
        self.button = QPushButton("Browse...")
        self._folder = folder
        self._filter = file_filter
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.edit, 1)
        layout.addWidget(self.button)
        self.button.clicked.connect(self._browse)

    def _browse(self) -> None:
        if self._folder:
            path = QFileDialog.getExistingDirectory(self, "Choose a folder", self.text())
        else:
            path, _ = QFileDialog.getOpenFileName(self, "Choose a file", self.text(), self._filter)
        if path:
            self.edit.setText(path)
            self.edit.editingFinished.emit()

    def text(self) -> str:
        return self.edit.text().strip()

    def setText(self, text: str) -> None:  # noqa: N802 (Qt naming)
        self.edit.setText(str(text))
