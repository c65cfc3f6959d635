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
import torch.distributed as dist

MIN_SET_SIZE = 10  # a confidence set smaller than this keeps its previous statistics


# ---------------------------------------------------------------- statistics


def confidence_sets(probs: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None):
    """Max probability and the correct / wrong masks of a labeled batch.

    probs: (B, K, H, W) softmax; target: (B, H, W) class ids.
    Returns (confidence (B, H, W), positive mask, negative mask); ignored pixels are in neither.
    """
    confidence, prediction = probs.max(dim=1)
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    positive = (prediction == target) & valid
    negative = (prediction != target) & valid
    return confidence, positive, negative


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


def class_mean_confidence(probs: torch.Tensor, valid: torch.Tensor | None, num_classes: int):
    """Per class: number of pixels predicted as it and their mean max probability (one scatter pass).

    probs: (B, K, H, W); valid: (B, H, W) bool or None. Returns (count (K,), mean (K,)).
    """
    confidence, prediction = probs.max(dim=1)
    weight = torch.ones_like(confidence) if valid is None else valid.to(confidence.dtype)
    index = prediction.reshape(-1)
    count = torch.zeros(num_classes, device=probs.device, dtype=confidence.dtype).index_add_(
        0, index, weight.reshape(-1))
    total = torch.zeros_like(count).index_add_(0, index, (confidence * weight).reshape(-1))
    return count, total / count.clamp_min(1)


def align_distribution(probs: torch.Tensor, labeled_mean: torch.Tensor, unlabeled_mean: torch.Tensor):
    """p_u * m_lab / m_unlab per class, renormalised per pixel. probs: (B, K, H, W)."""
    scale = (labeled_mean / unlabeled_mean.clamp_min(1e-8)).view(1, -1, 1, 1)
    aligned = probs * scale
    return aligned / aligned.sum(dim=1, keepdim=True).clamp_min(1e-12)


def ema_where(old: torch.Tensor, new: torch.Tensor, momentum: float, update: torch.Tensor):
    """``momentum * old + (1 - momentum) * new`` where ``update``, else ``old``."""
    return torch.where(update, momentum * old + (1 - momentum) * new, old)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average over DDP ranks (a no-op outside distributed training)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


# --------------------------------------------------------------------- state


@dataclass
class DAWStatistics:
    """One step's batch statistics (tensors on the device), for logging."""

    pos_count: torch.Tensor
    neg_count: torch.Tensor


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

    def to(self, device) -> "DAWState":
        for name in self._tensor_names():
            setattr(self, name, getattr(self, name).to(device))
        return self

    @staticmethod
    def _tensor_names():
        return ("mean", "var", "threshold", "safe_threshold", "labeled_class_mean", "unlabeled_class_mean")

    @torch.no_grad()
    def update_threshold(self, labeled_probs: torch.Tensor, target: torch.Tensor,
                         ignore_index: int | None = None) -> DAWStatistics:
        """Update the Gaussians from a labeled batch's softmax and recompute the threshold."""
        confidence, positive, negative = confidence_sets(labeled_probs.float(), target, ignore_index)
        count, batch_mean, batch_var = masked_mean_var(confidence, torch.stack([positive, negative]))
        # Averaged over DDP ranks (counts too, so every rank takes the same branch).
        count, batch_mean, batch_var = (all_reduce_mean(t) for t in (count, batch_mean, batch_var))
        enough = count >= MIN_SET_SIZE
        self.mean = ema_where(self.mean, batch_mean, self.momentum, enough)
        self.var = ema_where(self.var, batch_var, self.momentum, enough)
        sigma = self.var.clamp_min(1e-12).sqrt()
        crossing = gaussian_crossing(self.mean[0], sigma[0], self.mean[1], sigma[1], self.alpha)
        low = 1.0 / self.num_classes
        self.threshold = torch.where(torch.isfinite(crossing), crossing.clamp(low, 1.0), self.threshold)
        self.safe_threshold = (self.mean[0] - 3 * sigma[0]).clamp(low, 1.0)
        return DAWStatistics(pos_count=count[0], neg_count=count[1])

    @torch.no_grad()
    def update_alignment(self, labeled_probs: torch.Tensor, labeled_valid: torch.Tensor | None,
                         unlabeled_probs: torch.Tensor, unlabeled_valid: torch.Tensor | None) -> None:
        """EMA of the per-class mean confidence of labeled and unlabeled predictions."""
        k = self.num_classes
        lab_count, lab_mean = class_mean_confidence(labeled_probs.float(), labeled_valid, k)
        unl_count, unl_mean = class_mean_confidence(unlabeled_probs.float(), unlabeled_valid, k)
        self.labeled_class_mean = ema_where(self.labeled_class_mean, all_reduce_mean(lab_mean), self.momentum,
                                            all_reduce_mean(lab_count) > 0)
        self.unlabeled_class_mean = ema_where(self.unlabeled_class_mean, all_reduce_mean(unl_mean), self.momentum,
                                              all_reduce_mean(unl_count) > 0)

    def align(self, unlabeled_probs: torch.Tensor) -> torch.Tensor:
        return align_distribution(unlabeled_probs, self.labeled_class_mean, self.unlabeled_class_mean)

    def weights(self, aligned_confidence: torch.Tensor) -> torch.Tensor:
        """The optimal step weight: 1 where the (aligned) confidence reaches the threshold."""
        return (aligned_confidence >= self.threshold).to(aligned_confidence.dtype)

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
