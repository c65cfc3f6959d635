"""Distribution-Aware Weighting (DAW, Sun et al., NeurIPS 2023): pure functions and a small state.

The confidence (max softmax probability) of pseudo-labels that would be correct
and of those that would be wrong are modelled as two Gaussians, estimated online
from the labeled batch, where correctness is known. The weight that minimises
the expected share of wrong pseudo-labels used plus correct ones discarded is a
step at the point where the two densities cross. Distribution alignment rescales
unlabeled class probabilities so their per-class confidence matches the labeled
data's.

Everything here is vectorised over classes and pixels and stays on the device:
no Python loop over classes, no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mitoseg.engine import distributed

MIN_SET_SIZE = 10  # a confidence set smaller than this keeps its previous statistics


# ---------------------------------------------------------------- statistics


def max_and_argmax(probs: torch.Tensor, workspace: torch.Tensor | None = None):
    """``probs.max(dim=1)`` for (B, K, H, W) (or (B, K, D, H, W)): (max, first index of the max).

    On the CPU, ``max``/``argmax`` over a non-innermost dimension are an order of
    magnitude slower than ``amax`` (no vectorised kernel), so the index is read
    off the maxima instead: mark the classes that reach the max with K - k and
    take ``amax`` again, which picks the first one, as ``argmax`` does. The marks
    are one byte each (a quarter of the memory traffic of float marks).
    ``workspace`` (a ``argmax_workspace(probs)`` tensor) avoids a fresh allocation.
    A pixel with a NaN probability (an overflow under fp16 autocast, say) gets a NaN
    confidence and an index that is a valid class (K - 1), never K: downstream
    indexing with it must not fail (on CUDA a device-side assert ends the process).
    """
    k = probs.shape[1]
    if k > 255 or probs.device.type != "cpu":
        # Beyond 255 classes the marks would not fit in a byte; on a GPU ``max`` is one fast kernel
        # (its index of a NaN is the NaN's class, a valid one).
        confidence, index = probs.max(dim=1)
        return confidence, index
    confidence = probs.amax(dim=1)
    marks = argmax_workspace(probs) if workspace is None else workspace
    torch.ge(probs, confidence.unsqueeze(1), out=marks.view(torch.bool))
    marks.mul_(torch.arange(k, 0, -1, device=probs.device, dtype=marks.dtype).view(1, k, *[1] * (probs.dim() - 2)))
    index = (k - marks.amax(dim=1).long()).clamp_(max=k - 1)
    return confidence, index


def argmax_workspace(probs: torch.Tensor) -> torch.Tensor:
    """Scratch marks for ``max_and_argmax``: one byte per value."""
    return torch.empty(probs.shape, device=probs.device, dtype=torch.uint8)


def correct_and_wrong(prediction: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None):
    """Masks of correctly and wrongly predicted labeled pixels (B, H, W); ignored pixels are in neither."""
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    return (prediction == target) & valid, (prediction != target) & valid


def masked_mean_var(values: torch.Tensor, masks: torch.Tensor):
    """Mean and unbiased variance of ``values`` under each of S boolean masks, in one pass.

    values: (...,); masks: (S, ...). Returns (count (S,), mean (S,), var (S,)); empty sets give 0.
    """
    weights = masks.reshape(masks.shape[0], -1).to(values.dtype)
    flat = values.reshape(1, -1)
    count = weights.sum(1)
    mean = (weights * flat).sum(1) / count.clamp_min(1)
    var = (weights * (flat - mean[:, None]) ** 2).sum(1) / (count - 1).clamp_min(1)
    return count, mean, var


def gaussian_crossing(mu_pos, sigma_pos, mu_neg, sigma_neg, alpha: float = 1.0):
    """Where alpha * N(mu_neg, sigma_neg) and N(mu_pos, sigma_pos) cross; NaN when they never do.

    Solves A t^2 + B t + C = 0 with A = s+^2 - s-^2, B = 2 (mu+ s-^2 - mu- s+^2),
    C = (mu- s+)^2 - (mu+ s-)^2 + 2 (s+ s-)^2 ln(s- / (alpha s+)), and returns the
    root where the positive density overtakes the negative one going up in t:
    t = (-B + sqrt(D)) / (2A), which is the larger root when s+ > s-. It is
    evaluated as 2C / (-B - sqrt(D)) (the same number), which stays finite as
    A -> 0: equal variances give the linear root -C / B, the midpoint of the
    means for alpha = 1.
    """
    var_pos, var_neg = sigma_pos**2, sigma_neg**2
    a = var_pos - var_neg
    b = 2 * (mu_pos * var_neg - mu_neg * var_pos)
    c = (mu_neg * sigma_pos) ** 2 - (mu_pos * sigma_neg) ** 2 + 2 * var_pos * var_neg * torch.log(
        sigma_neg / (alpha * sigma_pos)
    )
    disc = b * b - 4 * a * c
    root = 2 * c / (-b - torch.sqrt(disc.clamp_min(0)))
    return torch.where(disc >= 0, root, torch.full_like(root, float("nan")))


def class_mean_confidence(confidence: torch.Tensor, prediction: torch.Tensor, valid: torch.Tensor | None,
                          num_classes: int):
    """Per class: number of pixels predicted as it and their mean max probability (one scatter pass).

    confidence, prediction: (B, H, W) max probability and its class; valid: (B, H, W) bool or None.
    Returns (count (K,), mean (K,)). ``index_add_`` rather than ``bincount``: on CUDA
    bincount reads its input's maximum back to the host, a synchronisation per step.
    """
    weight = torch.ones_like(confidence) if valid is None else valid.to(confidence.dtype)
    index = prediction.reshape(-1)
    count = torch.zeros(num_classes, device=confidence.device, dtype=confidence.dtype).index_add_(
        0, index, weight.reshape(-1))
    total = torch.zeros_like(count).index_add_(0, index, (confidence * weight).reshape(-1))
    return count, total / count.clamp_min(1)


def align_distribution(probs: torch.Tensor, labeled_mean: torch.Tensor, unlabeled_mean: torch.Tensor,
                       out: torch.Tensor | None = None):
    """p_u * m_lab / m_unlab per class, renormalised per pixel. probs: (B, K, H, W).

    ``out`` may be ``probs`` itself (in place: no second copy of the probabilities).
    """
    scale = (labeled_mean / unlabeled_mean.clamp_min(1e-8)).view(1, -1, *[1] * (probs.dim() - 2))
    aligned = torch.mul(probs, scale, out=out) if out is not None else probs * scale
    return aligned.div_(aligned.sum(dim=1, keepdim=True).clamp_min_(1e-12))


def ema_where(old: torch.Tensor, new: torch.Tensor, momentum: float, update: torch.Tensor):
    """``momentum * old + (1 - momentum) * new`` where ``update``, else ``old``."""
    return torch.where(update, momentum * old + (1 - momentum) * new, old)


def moments(count: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(count, mean, unbiased variance) of S sets -> (S, 3) sums (n, sum x, sum x^2) in float64, which
    add up over disjoint parts of the data (the pixels of several DDP ranks)."""
    n, m = count.double(), mean.double()
    return torch.stack([n, n * m, (n - 1).clamp_min(0) * var.double() + n * m * m], dim=-1)


def mean_var_from_moments(sums: torch.Tensor):
    """Inverse of :func:`moments` on summed moments: (count, mean, unbiased variance), float32."""
    n, total, squares = sums.unbind(-1)
    mean = total / n.clamp_min(1)
    var = (squares - n * mean * mean) / (n - 1).clamp_min(1)
    return n.float(), mean.float(), var.clamp_min(0).float()


# --------------------------------------------------------------------- state


@dataclass
class DAWStatistics:
    """The labeled batch's confidences and correct / wrong masks of one update (for inspection)."""

    confidence: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor


class DAWState:
    """Running Gaussians of correct / wrong confidences, the threshold, and the alignment means.

    Tensors live on the device; ``state_dict`` holds plain tensors for checkpoints.
    """

    def __init__(self, num_classes: int, momentum: float = 0.99, alpha: float = 1.0,
                 initial_threshold: float = 0.95, device=None):
        self.num_classes = num_classes
        self.momentum = momentum
        self.alpha = alpha
        k = num_classes
        # (positive, negative): mean starts at 1/K, variance at 0.5.
        self.mean = torch.full((2,), 1.0 / k, device=device)
        self.var = torch.full((2,), 0.5, device=device)
        self.threshold = torch.tensor(initial_threshold, device=device)
        self.safe_threshold = torch.tensor(initial_threshold, device=device)
        self.labeled_class_mean = torch.full((k,), 1.0 / k, device=device)
        self.unlabeled_class_mean = torch.full((k,), 1.0 / k, device=device)
        self._workspace = torch.empty(0, device=device, dtype=torch.uint8)  # reused by max_and_argmax (no per-step allocation)

    def workspace(self, like: torch.Tensor) -> torch.Tensor:
        """Scratch marks for ``max_and_argmax`` on a tensor shaped like ``like``, reused across steps."""
        if self._workspace.numel() < like.numel() or self._workspace.device != like.device:
            self._workspace = torch.empty(like.numel(), device=like.device, dtype=torch.uint8)
        return self._workspace[: like.numel()].view(like.shape)

    def to(self, device) -> "DAWState":
        for name in self._tensor_names():
            setattr(self, name, getattr(self, name).to(device))
        return self

    @staticmethod
    def _tensor_names():
        return ("mean", "var", "threshold", "safe_threshold", "labeled_class_mean", "unlabeled_class_mean")

    @torch.no_grad()
    def update(self, labeled_probs: torch.Tensor, target: torch.Tensor, unlabeled_probs: torch.Tensor | None = None,
               unlabeled_valid: torch.Tensor | None = None, ignore_index: int | None = None) -> DAWStatistics:
        """One step's update from the labeled batch's softmax (B, K, H, W) and its labels (B, H, W).

        The Gaussians of correct / wrong confidences move toward the batch's mean and
        unbiased variance (a set under ``MIN_SET_SIZE`` pixels keeps its values) and the
        threshold is recomputed (kept when the Gaussians do not cross). With
        ``unlabeled_probs``, the per-class alignment means of both streams move too.
        The labeled argmax is computed once for both. Under DDP the statistics are those
        of the pixels of all ranks together (counts, sums and sums of squares are added
        in one all-reduce), so every rank holds the same state.
        """
        k = self.num_classes
        labeled_probs = labeled_probs.float()
        confidence, prediction = max_and_argmax(labeled_probs, self.workspace(labeled_probs))
        # A non-finite confidence (fp16 overflow) would make every running statistic NaN for good:
        # such pixels take part in no set and count as 0 (masks multiply, and 0 * NaN is NaN).
        finite = torch.isfinite(confidence)
        confidence = confidence.nan_to_num_(0.0, 0.0, 0.0)
        positive, negative = correct_and_wrong(prediction, target, ignore_index)
        positive, negative = positive & finite, negative & finite
        count, batch_mean, batch_var = masked_mean_var(confidence, torch.stack([positive, negative]))
        sums = [moments(count, batch_mean, batch_var)]  # (2, 3): positives, negatives

        if unlabeled_probs is not None:
            labeled_valid = finite if ignore_index is None else finite & (target != ignore_index)
            lab_count, lab_mean = class_mean_confidence(confidence, prediction, labeled_valid, k)
            unlabeled_probs = unlabeled_probs.float()
            u_confidence, u_prediction = max_and_argmax(unlabeled_probs, self.workspace(unlabeled_probs))
            u_finite = torch.isfinite(u_confidence)
            u_valid = u_finite if unlabeled_valid is None else u_finite & unlabeled_valid
            unl_count, unl_mean = class_mean_confidence(u_confidence.nan_to_num_(0.0, 0.0, 0.0), u_prediction,
                                                        u_valid, k)
            # (2K, 3) rows of (n, sum, unused): labeled classes, then unlabeled classes.
            counts, means = torch.cat([lab_count, unl_count]), torch.cat([lab_mean, unl_mean])
            sums.append(moments(counts, means, torch.zeros_like(means)))

        pooled = distributed.world_size() > 1
        if pooled:
            sums = list(distributed.all_reduce_sum(torch.cat(sums)).split([len(part) for part in sums]))
            count, batch_mean, batch_var = mean_var_from_moments(sums[0])
        enough = count >= MIN_SET_SIZE
        self.mean = ema_where(self.mean, batch_mean, self.momentum, enough)
        self.var = ema_where(self.var, batch_var, self.momentum, enough)
        sigma = self.var.clamp_min(1e-12).sqrt()
        crossing = gaussian_crossing(self.mean[0], sigma[0], self.mean[1], sigma[1], self.alpha)
        low = 1.0 / k
        self.threshold = torch.where(torch.isfinite(crossing), crossing.clamp(low, 1.0), self.threshold)
        self.safe_threshold = (self.mean[0] - 3 * sigma[0]).clamp(low, 1.0)

        if unlabeled_probs is not None:
            if pooled:
                counts, means, _ = mean_var_from_moments(sums[1])
            lab_count, unl_count = counts.split(k)
            lab_mean, unl_mean = means.split(k)
            self.labeled_class_mean = ema_where(self.labeled_class_mean, lab_mean, self.momentum, lab_count > 0)
            self.unlabeled_class_mean = ema_where(self.unlabeled_class_mean, unl_mean, self.momentum, unl_count > 0)
        return DAWStatistics(confidence=confidence, positive=positive, negative=negative)

    def align(self, unlabeled_probs: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        return align_distribution(unlabeled_probs, self.labeled_class_mean, self.unlabeled_class_mean,
                                  out=unlabeled_probs if in_place else None)

    def log_values(self) -> dict[str, torch.Tensor]:
        sigma = self.var.sqrt()
        return {"tau": self.threshold, "safe_tau": self.safe_threshold,
                "mu_pos": self.mean[0], "mu_neg": self.mean[1],
                "sigma_pos": sigma[0], "sigma_neg": sigma[1]}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().clone() for name in self._tensor_names()}

    def load_state_dict(self, state: dict) -> None:
        for name in self._tensor_names():
            current = getattr(self, name)
            setattr(self, name, state[name].to(current.device, current.dtype))
