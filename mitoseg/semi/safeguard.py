"""Safeguards of the unlabeled loss: pure functions and a small state.

A semi-supervised method must never make a model worse than training on the labeled slices alone. Two
things went wrong when it did (BENCHMARKS.md, "Semi-supervised on the Lucchi volume"):

- early pseudo-labels come from a model that has not learnt yet, and DAW's Gaussians of correct / wrong
  confidences start far from the model's (a threshold near 0.5: nearly every pseudo-label used, most of the
  wrong ones among them);
- pseudo-labels can drift to a class distribution the labeled data does not have (foreground spreading),
  and training on them feeds the drift.

Against the first, a supervised warm-up (``method.warmup``: the first part of the schedule trains on the
labeled batch alone, at a supervised step's cost, while DAW's statistics already follow the model) and a
ramp of the unlabeled terms after it (``method.rampup``: Laine & Aila's exp(-5 (1 - t)^2)). Against the
second, a guard (``method.guard_tolerance``): the running class shares of the pseudo-labels against the
running class shares of the labeled batches' labels; when one class's share drifts beyond the tolerance
(a ratio, either way) the unlabeled terms are down-weighted by the square of how far.

Everything is vectorised over classes and stays on the device (no host synchronisation).
"""

from __future__ import annotations

import math

import torch

from mitoseg.semi.state import TensorState

SHARE_MOMENTUM = 0.9  # running class shares: about the last ten steps
MIN_REFERENCE_SHARE = 0.01  # classes rarer than this in the labeled data are not compared (too noisy)


def rampup_weight(progress: float, start: float, length: float) -> float:
    """Weight of the unlabeled terms at ``progress`` (the fraction of the schedule done): 0 before ``start``
    (the supervised warm-up), then exp(-5 (1 - t)^2) with t = (progress - start) / length rising to 1, and 1
    after (``length`` 0: a step from 0 to 1 at ``start``)."""
    if progress < start:
        return 0.0
    if length <= 0 or progress >= start + length:
        return 1.0
    t = (progress - start) / length
    return math.exp(-5.0 * (1.0 - t) ** 2)


def class_shares(label: torch.Tensor, valid: torch.Tensor | None, num_classes: int,
                 ignore_index: int | None = None) -> torch.Tensor:
    """(K,) float32 share of each class among the valid pixels of ``label`` (class ids; ``ignore_index`` and
    ids outside 0 .. K - 1 are not valid). All zero when no pixel is valid."""
    label = label.reshape(-1)
    keep = (label >= 0) & (label < num_classes)
    if ignore_index is not None:
        keep &= label != ignore_index
    if valid is not None:
        keep &= valid.reshape(-1).bool()
    weight = keep.float()
    counts = torch.zeros(num_classes, device=label.device).index_add_(0, label.clamp(0, num_classes - 1), weight)
    return counts / weight.sum().clamp_min(1.0)


def share_drift(pseudo_share: torch.Tensor, reference_share: torch.Tensor,
                min_share: float = MIN_REFERENCE_SHARE) -> torch.Tensor:
    """How far the pseudo-labels' class shares are from the reference's: the largest ratio, either way
    (>= 1), over the classes holding at least ``min_share`` of the reference (1 when none does)."""
    ratio = pseudo_share.clamp_min(1e-6) / reference_share.clamp_min(1e-6)
    both_ways = torch.maximum(ratio, ratio.reciprocal())
    compared = reference_share >= min_share
    return torch.where(compared, both_ways, torch.ones_like(both_ways)).amax()


def guard_weight(drift: torch.Tensor, tolerance: float) -> torch.Tensor:
    """The unlabeled terms' factor for a ``drift`` (:func:`share_drift`): 1 within ``tolerance``, then
    (tolerance / drift)^2 (a drift of twice the tolerance: 0.25; all-foreground pseudo-labels: about 0)."""
    return (tolerance / drift).clamp(max=1.0) ** 2


class ShareGuard(TensorState):
    """Running class shares of the pseudo-labels and of the labeled labels, and the guard's factor.

    ``update`` returns the factor of this step (a device scalar); the first update sets the shares (no
    start value to forget). ``acted`` records, on the device, whether the factor has been below 1 yet.
    """

    TENSORS = ("pseudo_share", "reference_share", "started", "acted", "factor")

    def __init__(self, num_classes: int, tolerance: float, momentum: float = SHARE_MOMENTUM, device=None):
        self.num_classes = num_classes
        self.tolerance = tolerance
        self.momentum = momentum
        self.pseudo_share = torch.zeros(num_classes, device=device)
        self.reference_share = torch.zeros(num_classes, device=device)
        self.started = torch.zeros((), dtype=torch.bool, device=device)
        self.acted = torch.zeros((), dtype=torch.bool, device=device)
        self.factor = torch.ones((), device=device)

    @torch.no_grad()
    def update(self, pseudo_label: torch.Tensor, valid: torch.Tensor | None, label: torch.Tensor,
               ignore_index: int | None = None) -> torch.Tensor:
        pseudo = class_shares(pseudo_label, valid, self.num_classes)
        reference = class_shares(label, None, self.num_classes, ignore_index)
        m = torch.where(self.started, torch.tensor(self.momentum, device=pseudo.device), torch.zeros((), device=pseudo.device))
        self.pseudo_share = m * self.pseudo_share + (1 - m) * pseudo
        self.reference_share = m * self.reference_share + (1 - m) * reference
        self.started = torch.ones_like(self.started)
        self.factor = guard_weight(share_drift(self.pseudo_share, self.reference_share), self.tolerance)
        self.acted = self.acted | (self.factor < 1)
        return self.factor


