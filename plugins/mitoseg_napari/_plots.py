"""The inspector's plot dock: matplotlib in Qt.

Top: the confidence histograms of the last labeled batch (correct = positive,
wrong = negative pixels) as densities, DAW's fitted Gaussians and the
thresholds. Bottom: mask ratio and threshold over the training iterations
(``metrics.jsonl``), with the shown inspection iteration marked.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter
from qtpy.QtWidgets import QSizePolicy, QVBoxLayout, QWidget

from mitoseg_napari._inspection import Inspection
from mitoseg_napari._layers import COLORS

BACKGROUND = "#262930"  # napari's dark theme
FOREGROUND = "#d6d6d6"
POSITIVE = COLORS["correct used"][:3]
NEGATIVE = COLORS["wrong used"][:3]
THRESHOLD = "#ffffff"
SAFE_THRESHOLD = "#ffcc33"
LOGIT_LOW = 1e-4  # the histogram's logit axis ends at this distance from 0 and 1

# metrics.jsonl keys drawn over iterations, with their labels and styles
CURVES = (
    ("mask_ratio", "mask ratio", {"color": COLORS["used"][:3], "lw": 1.8}),
    ("tau", "τ", {"color": THRESHOLD, "lw": 1.5}),
    ("safe_tau", "safe τ", {"color": SAFE_THRESHOLD, "lw": 1.2, "ls": "--"}),
    ("wrong_used", "wrong used", {"color": NEGATIVE, "lw": 1.0, "alpha": 0.8}),
    ("correct_discarded", "correct discarded", {"color": COLORS["correct discarded"][:3], "lw": 1.0, "alpha": 0.8}),
)


class InspectionPlots(QWidget):
    """Histograms + Gaussians + thresholds of one inspection, and the run's curves."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.figure = Figure(figsize=(4.2, 4.4), dpi=90, facecolor=BACKGROUND, layout="constrained")
        self.figure.get_layout_engine().set(h_pad=0.06, w_pad=0.04)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.canvas.setMinimumHeight(300)
        self.ax_hist, self.ax_curves = self.figure.subplots(2, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 8, 0, 0)
        layout.addWidget(self.canvas)
        #: what was drawn last, for tests and for anyone scripting the viewer
        self.drawn: dict = {}
        self._style(self.ax_hist)
        self._style(self.ax_curves)
        self.canvas.draw_idle()

    @staticmethod
    def _style(ax) -> None:
        ax.set_facecolor(BACKGROUND)
        for spine in ax.spines.values():
            spine.set_color(FOREGROUND)
        ax.tick_params(colors=FOREGROUND, labelsize=8)
        ax.xaxis.label.set_color(FOREGROUND)
        ax.yaxis.label.set_color(FOREGROUND)
        ax.title.set_color(FOREGROUND)

    @staticmethod
    def _legend(ax) -> None:
        """Under the axes (the constrained layout makes room): a legend inside covered the histograms."""
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6.5, frameon=False, labelcolor=FOREGROUND, loc="upper center",
                      bbox_to_anchor=(0.5, -0.22), ncol=2, handlelength=1.5, columnspacing=0.8, borderaxespad=0.0)

    def show_inspection(self, insp: Inspection, train_records: list[dict]) -> None:
        """Redraw both plots for ``insp`` and the run's ``"split": "train"`` records."""
        self.drawn = {"iteration": insp.iteration}
        self._draw_histograms(insp)
        self._draw_curves(insp.iteration, train_records)
        self.canvas.draw_idle()

    def _draw_histograms(self, insp: Inspection) -> None:
        """The share of the labeled batch's correct / wrong pixels in each confidence bin, DAW's two Gaussians
        as the share each puts in the same bins, and the thresholds, on a logit axis: 0.9, 0.99 and 0.999 are
        evenly spaced, so the range the thresholds live in is wide enough to read."""
        from scipy.special import ndtr

        ax = self.ax_hist
        ax.clear()
        self._style(ax)
        a = insp.arrays
        edges = np.asarray(a.get("histogram_edges", np.linspace(0, 1, 51)), dtype=np.float64)
        shown = np.clip(edges, LOGIT_LOW, 1.0 - LOGIT_LOW)  # 0 and 1 lie at infinity on the axis
        top, lowest = 0.0, 1.0
        for key, label, color in (("hist_positive", "correct", POSITIVE), ("hist_negative", "wrong", NEGATIVE)):
            counts = np.asarray(a.get(key, []), dtype=np.float64)
            if counts.size != edges.size - 1 or counts.sum() <= 0:
                continue
            share = counts / counts.sum()
            ax.stairs(share, shown, fill=True, alpha=0.35, color=color)
            ax.stairs(share, shown, color=color, lw=1.2, label=f"{label} (n={int(counts.sum())})")
            top = max(top, float(share.max()))
            lowest = min(lowest, float(edges[np.flatnonzero(counts)[0]]))
            self.drawn[key] = int(counts.sum())
        for sign, label, color in (("pos", "⁺", POSITIVE), ("neg", "⁻", NEGATIVE)):
            mu, sigma = insp.scalar(f"mu_{sign}"), insp.scalar(f"sigma_{sign}")
            if mu is None or sigma is None or not (math.isfinite(mu) and math.isfinite(sigma)) or sigma <= 0:
                continue
            mass = np.diff(ndtr((edges - mu) / sigma))  # the Gaussian's share in each bin
            ax.stairs(mass, shown, color=color, lw=1.4, ls="-.", label=f"N(μ{label}={mu:.2f}, σ{label}={sigma:.2f})")
            top = max(top, min(float(mass.max()), 3 * top if top else float(mass.max())))
            self.drawn[f"gaussian_{sign}"] = (mu, sigma)
        tau = insp.scalar("tau")
        if tau is not None:
            ax.axvline(min(max(tau, LOGIT_LOW), 1 - LOGIT_LOW), color=THRESHOLD, lw=1.5, label=f"τ = {tau:.3f}")
            self.drawn["tau"] = tau
        safe = insp.scalar("safe_tau")
        if safe is not None:
            ax.axvline(min(max(safe, LOGIT_LOW), 1 - LOGIT_LOW), color=SAFE_THRESHOLD, lw=1.2, ls="--",
                       label=f"safe τ = {safe:.3f}")
            self.drawn["safe_tau"] = safe
        ax.set_xscale("logit")
        # From the lowest confidence seen (at most 0.5: the two-class floor) to where the bins end.
        ax.set_xlim(max(LOGIT_LOW, min(lowest, 0.5)), 1.0 - LOGIT_LOW)
        ticks = [t for t in (0.1, 0.5, 0.9, 0.99, 0.999, 0.9999) if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        self.drawn["xlim"] = ax.get_xlim()
        if top > 0:
            # Log scale: correct pixels pile up near 1 while the wrong ones spread thinly.
            ax.set_yscale("log")
            ax.set_ylim(max(top * 1e-4, 1e-5), top * 2.0)
        ax.set_xlabel("confidence (max class probability, logit axis)", fontsize=8)
        ax.set_ylabel("share of pixels per bin", fontsize=8)
        ax.set_title(f"confidence on the labeled batch, iteration {insp.iteration}", fontsize=9)
        if "hist_positive" not in self.drawn and "hist_negative" not in self.drawn:
            ax.text(0.5, 0.5, "no labeled histogram in this file", ha="center", va="center",
                    color=FOREGROUND, transform=ax.transAxes, fontsize=8)
        self._legend(ax)

    def _draw_curves(self, iteration: int, records: list[dict]) -> None:
        ax = self.ax_curves
        ax.clear()
        self._style(ax)
        self.drawn["curves"] = {}
        for key, label, style in CURVES:
            points = [(r["iter"], r[key]) for r in records
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if not points:
                continue
            its, values = zip(*points)
            ax.plot(its, values, label=label, **style)
            self.drawn["curves"][key] = (list(its), list(values))
        if self.drawn["curves"]:
            ax.axvline(iteration, color="#aaaaaa", lw=1.0, ls=":")
            ax.set_ylim(-0.02, 1.05)
        else:
            ax.text(0.5, 0.5, "no training records in metrics.jsonl", ha="center", va="center",
                    color=FOREGROUND, transform=ax.transAxes, fontsize=8)
        ax.set_xlabel("iteration", fontsize=8)
        ax.set_title("mask ratio and threshold over training", fontsize=9)
        self._legend(ax)


# metrics.jsonl keys of the Train widget's live plot: (key, split, label, style); the loss on its own axes
TRAINING_CURVES = (
    ("mask_ratio", "train", "mask ratio", {"color": COLORS["used"][:3], "lw": 1.5}),
    ("tau", "train", "DAW τ", {"color": THRESHOLD, "lw": 1.3}),
    ("fg_iou", "val", "validation fg IoU", {"color": "#4da6ff", "lw": 1.8, "marker": "o", "ms": 3}),
    ("miou", "val", "validation mIoU", {"color": "#4da6ff", "lw": 1.8, "marker": "o", "ms": 3}),
)


class TrainingPlots(QWidget):
    """The Train widget's live plot of a run's ``metrics.jsonl``: the loss (top), and the mask ratio, DAW's
    threshold and the validation score (bottom), over the iterations."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.figure = Figure(figsize=(4.0, 3.4), dpi=90, facecolor=BACKGROUND, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self.canvas.setMinimumHeight(200)
        self.ax_loss, self.ax_scores = self.figure.subplots(2, 1, sharex=True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 4, 0, 0)
        layout.addWidget(self.canvas)
        #: the curves drawn last: key -> (iterations, values), for tests and scripts
        self.drawn: dict = {}
        self.show_records([], None)

    def show_records(self, records: list[dict], total: int | None, title: str = "") -> None:
        """Redraw from all records of a run so far (``total``: its iterations, the x range)."""
        self.drawn = {}
        for ax in (self.ax_loss, self.ax_scores):
            ax.clear()
            InspectionPlots._style(ax)
        train = [r for r in records if r.get("split") == "train"]
        loss = [(r["iter"], r["loss"]) for r in train if _finite(r.get("loss"))]
        if loss:
            its, values = zip(*loss)
            self.ax_loss.plot(its, values, color="#ff9f40", lw=1.5, label="loss")
            self.drawn["loss"] = (list(its), list(values))
        self.ax_loss.set_ylabel("loss", fontsize=8)
        self.ax_loss.set_title(title or "training", fontsize=9)
        for key, split, label, style in TRAINING_CURVES:
            points = [(r["iter"], r[key]) for r in records if r.get("split") == split and _finite(r.get(key))]
            if not points or (key == "miou" and "fg_iou" in self.drawn):
                continue
            its, values = zip(*points)
            self.ax_scores.plot(its, values, label=label, **style)
            self.drawn[key] = (list(its), list(values))
        self.ax_scores.set_ylim(-0.02, 1.05)
        self.ax_scores.set_xlabel("iteration", fontsize=8)
        if total:
            self.ax_scores.set_xlim(0, total)
        if not records:
            self.ax_loss.text(0.5, 0.5, "no training records yet", ha="center", va="center", color=FOREGROUND,
                              transform=self.ax_loss.transAxes, fontsize=8)
        InspectionPlots._legend(self.ax_scores)
        self.canvas.draw_idle()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
