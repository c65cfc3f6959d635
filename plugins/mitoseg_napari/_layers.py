"""Layer data shared by the reader and the widgets: inspection layers, colours, error reporting."""

from __future__ import annotations

import logging

import numpy as np
from napari.utils.colormaps import DirectLabelColormap
from napari.utils.notifications import notification_manager, show_error

from mitoseg.errors import MitosegError
from mitoseg_napari._inspection import (
    CORRECT_DISCARDED,
    CORRECT_USED,
    DISCARDED,
    OUTCOME_NAMES,
    USED,
    WEIGHT_NAMES,
    WRONG_DISCARDED,
    WRONG_USED,
    Inspection,
)

log = logging.getLogger("mitoseg_napari")

# RGBA colours, also used by the plots and the inspector's legend.
COLORS = {
    "used": (0.20, 0.85, 0.30, 1.0),
    "discarded": (0.95, 0.25, 0.85, 1.0),
    "correct used": (0.20, 0.85, 0.30, 1.0),
    "wrong used": (1.00, 0.15, 0.15, 1.0),
    "correct discarded": (0.25, 0.55, 1.00, 1.0),
    "wrong discarded": (1.00, 0.80, 0.10, 1.0),
    "false positive": (1.00, 0.15, 0.15, 1.0),
    "false negative": (0.25, 0.55, 1.00, 1.0),
    "wrong class": (1.00, 0.80, 0.10, 1.0),
}
TRANSPARENT = (0.0, 0.0, 0.0, 0.0)

# Error layer of the evaluate widget.
FALSE_POSITIVE, FALSE_NEGATIVE, WRONG_CLASS = 1, 2, 3
ERROR_NAMES = {FALSE_POSITIVE: "false positive", FALSE_NEGATIVE: "false negative", WRONG_CLASS: "wrong class"}

LAYER_KEY = "mitoseg"  # layer.metadata[LAYER_KEY] = {"role": ..., ...}


def direct_colormap(names: dict[int, str]) -> DirectLabelColormap:
    """A Labels colormap with ``COLORS[name]`` for each value and nothing else drawn."""
    color_dict = {None: TRANSPARENT, 0: TRANSPARENT}
    color_dict.update({value: COLORS[name] for value, name in names.items()})
    return DirectLabelColormap(color_dict=color_dict)


def label_features(names: dict[int, str], column: str) -> dict[str, list]:
    """Labels ``features`` so that hovering a pixel shows its meaning in the status bar."""
    top = max(names)
    return {"index": list(range(top + 1)), column: ["" if v not in names else names[v] for v in range(top + 1)]}


def contrast(array: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """Percentile contrast limits over the finite values (never an empty range)."""
    finite = np.asarray(array, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [low, high]))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def inspection_layer_data(insp: Inspection, prefix: str = "", translate=(0.0, 0.0, 0.0)) -> list[tuple]:
    """napari layer-data tuples ``(data, kwargs, type)`` for one inspection file.

    Roles (``metadata["mitoseg"]["role"]``): image, pseudo_label, weight,
    confidence, log_density (DDFP runs) and outcome (runs with analysis labels).
    """
    a = insp.arrays
    n, h, w = insp.shape
    translate = tuple(float(t) for t in translate)

    def meta(role: str) -> dict:
        return {LAYER_KEY: {"role": role, "iteration": insp.iteration, "path": str(insp.path)}}

    daw = "DAW weight" if insp.method.startswith("daw") else "weight"
    layers = [
        (a["image"], {"name": f"{prefix}image", "colormap": "gray", "contrast_limits": contrast(a["image"]),
                      "translate": translate, "metadata": meta("image")}, "image"),
        (a["confidence"], {"name": f"{prefix}confidence", "colormap": "viridis", "contrast_limits": (0.0, 1.0),
                           "visible": False, "translate": translate, "metadata": meta("confidence")}, "image"),
    ]
    if "log_density" in a:
        density = np.asarray(a["log_density"], dtype=np.float32)
        sy, sx = h / density.shape[1], w / density.shape[2]
        # A coarse feature-map pixel covers sy x sx patch pixels; centre it on them.
        layers.append((density, {
            "name": f"{prefix}log-density", "colormap": "magma", "contrast_limits": contrast(density),
            "visible": False, "scale": (1.0, sy, sx),
            "translate": (translate[0], translate[1] + (sy - 1) / 2, translate[2] + (sx - 1) / 2),
            "metadata": meta("log_density")}, "image"))
    layers.append((a["pseudo_label"].astype(np.uint8), {
        "name": f"{prefix}pseudo-label", "opacity": 0.5, "visible": False, "translate": translate,
        "metadata": meta("pseudo_label")}, "labels"))
    outcome = insp.outcome_map()
    layers.append((insp.weight_map(), {
        "name": f"{prefix}{daw} (used / discarded)", "colormap": direct_colormap(WEIGHT_NAMES), "opacity": 0.45,
        "visible": outcome is None, "translate": translate, "features": label_features(WEIGHT_NAMES, "pseudo-label"),
        "metadata": meta("weight")}, "labels"))
    if outcome is not None:
        layers.append((outcome, {
            "name": f"{prefix}outcome (correct / wrong x used / discarded)",
            "colormap": direct_colormap(OUTCOME_NAMES), "opacity": 0.45, "translate": translate,
            "features": label_features(OUTCOME_NAMES, "outcome"), "metadata": meta("outcome")}, "labels"))
    return layers


def report_error(exc: BaseException, what: str) -> None:
    """A napari notification for a failure: the one-line message of a MitosegError, else the
    exception with its traceback (napari's error notification offers to show it)."""
    if isinstance(exc, MitosegError):
        show_error(f"{what}: {exc}")
        return
    log.error("%s failed", what, exc_info=(type(exc), exc, exc.__traceback__))
    wrapped = RuntimeError(f"{what} failed: {type(exc).__name__}: {exc}")
    wrapped.__cause__ = exc
    notification_manager.receive_error(type(wrapped), wrapped, exc.__traceback__)


__all__ = ["COLORS", "CORRECT_DISCARDED", "CORRECT_USED", "DISCARDED", "ERROR_NAMES", "FALSE_NEGATIVE",
           "FALSE_POSITIVE", "LAYER_KEY", "USED", "WRONG_CLASS", "WRONG_DISCARDED", "WRONG_USED", "contrast",
           "direct_colormap", "inspection_layer_data", "label_features", "report_error"]
