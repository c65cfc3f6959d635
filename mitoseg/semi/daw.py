"""Distribution-Aware Weighting (DAW, Sun et al., NeurIPS 2023): pure functions and a small state.

The confidence (max softmax probability) of pseudo-labels that would be correct
and of those that would be wrong are modelled as two Gaussians, estimated online
from the labeled batch, where correctness is known. The weight that minimises
the expected share of wrong pseudo-labels used plus correct ones discarded is a
step at the point where the two densities cross. Distribution alignment rescales
unlabeled class probabilities so their per-class confidence matches the labeled
data's.

Everything here is vectorised over classes and pixels and stays on the device:
no Python loop over classes, no host synchronisation. The training step's
update starts from the logits (``DAWState.update_logits``): confidences,
classes and aligned pseudo-labels are read off them without materialising a
softmax (``softmax_confidence``, ``scaled_confidence``; on the CPU in
cache-sized blocks of pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mitoseg import distributed
from mitoseg.semi.state import TensorState

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


# Pixels per block of the CPU passes over logits: K x 16384 float32 values (1.2 MiB for K = 19) stay in the
# cache between a block's operations, and no full-size temporary is allocated (on the CPU, fresh pages cost
# as much as the arithmetic).
CPU_BLOCK_PIXELS = 16384
LOG2_E = 1.4426950408889634


def _pixel_blocks(batch: int, pixels: int, device: torch.device):
    """Pixel slices of a (B, K, P) pass, each block spanning the batch: about ``CPU_BLOCK_PIXELS`` pixels on
    the CPU (in the cache), everything at once elsewhere (a GPU wants few, large kernels)."""
    if device.type != "cpu":
        yield slice(None)
        return
    step = max(256, CPU_BLOCK_PIXELS // batch)
    for start in range(0, pixels, step):
        yield slice(start, min(pixels, start + step))


def _first_marked(marks: torch.Tensor, k: int) -> torch.Tensor:
    """Class indices from the per-pixel maxima of ``floor(v) * (K .. 1)``, v in [0, 1] and exactly 1 at the
    maximum: the first class at the maximum (``argmax``'s choice among ties). A NaN pixel (NaN marks) gets K,
    which the DAW update reads as "not finite"; the public functions make it K - 1, a valid class."""
    return (k - marks.nan_to_num_(0.0)).long()


def _blocked_confidence(x: torch.Tensor, shift2: torch.Tensor | None, scale: torch.Tensor | None):
    """The loop of :func:`softmax_confidence` (``shift2``: per-class shift in base 2) and
    :func:`scaled_confidence` (``scale``) over pixel blocks of a (B, K, P) view. Per block: the values in
    [0, 1], exactly 1 at the max (2^(y - max y), or q / max q), their sum (-> the confidence) and float marks
    ``floor(v) * (K .. 1)`` whose max names the first class at the max (on the CPU a comparison to bool costs
    about five float operations)."""
    b, k, pixels = x.shape
    device = x.device
    confidence = torch.empty(b, pixels, device=device, dtype=torch.float32)
    marks = torch.empty(b, pixels, device=device, dtype=torch.float32)
    reverse = torch.arange(k, 0, -1, device=device, dtype=torch.float32).view(1, k, 1)
    work = scratch = None
    for cols in _pixel_blocks(b, pixels, device):
        block = x[:, :, cols]
        if work is None or work.shape != block.shape:
            work = torch.empty(block.shape, device=device, dtype=torch.float32)
            scratch = torch.empty_like(work)
        if scale is None:
            v = torch.add(shift2, block, alpha=LOG2_E, out=work)  # y log2(e): exp(y - max) = 2^(that - max)
            v.sub_(v.amax(dim=1, keepdim=True)).exp2_()  # torch's exp2 is three times as fast as exp on the CPU
            torch.sum(v, dim=1, out=confidence[:, cols])  # 1 / confidence
        else:
            v = torch.mul(block, scale, out=work)
            top = v.amax(dim=1, keepdim=True)
            torch.sum(v, dim=1, out=confidence[:, cols])
            v.div_(top)
            confidence[:, cols].mul_(top.squeeze(1).reciprocal())  # sum / max: 1 / confidence
        torch.floor(v, out=scratch).mul_(reverse)
        torch.amax(scratch, dim=1, out=marks[:, cols])
    return confidence.reciprocal_(), _first_marked(marks, k)


def _classes_view(t: torch.Tensor) -> torch.Tensor:
    """(B, K, *spatial) as a (B, K, P) view (channels-last tensors too: a copy only for other layouts)."""
    b, k = t.shape[:2]
    if t.dim() > 2 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous():
        return t.movedim(1, -1).reshape(b, -1, k).transpose(1, 2)
    return t.reshape(b, k, -1)


def _raw_softmax_confidence(logits, shift: torch.Tensor | None = None):
    """:func:`softmax_confidence` with class K for a non-finite pixel (the DAW update's mark)."""
    parts = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    k = parts[0].shape[1]
    shift2 = torch.zeros(1, k, 1, device=parts[0].device) if shift is None else \
        (shift.float() * LOG2_E).view(1, k, 1)
    results = []
    for part in parts:
        shape = (part.shape[0], *part.shape[2:])
        if part.numel() == 0:
            results.append((part.new_empty(shape, dtype=torch.float32), part.new_empty(shape, dtype=torch.int64)))
            continue
        confidence, index = _blocked_confidence(_classes_view(part.detach()), shift2, None)
        results.append((confidence.view(shape), index.view(shape)))
    if len(results) == 1:
        return results[0]
    return torch.cat([c for c, _ in results]), torch.cat([i for _, i in results])


def softmax_confidence(logits, shift: torch.Tensor | None = None):
    """``max_and_argmax(softmax(logits + shift, dim=1))`` for (B, K, *spatial) logits, without the softmax:
    the max probability is ``1 / sum_k exp(y_k - max y)`` (y = logits + shift), its class the first one at
    the max. ``shift`` (K,), added per class, makes it the aligned pseudo-label: softmax(l + log s) is
    ``align_distribution`` of softmax(l) with the factors s (:func:`alignment_scale`). ``logits`` may be a
    list of such tensors: the results are concatenated along the batch (no copy of the logits).

    Returns (confidence (B, *spatial) float32, index (B, *spatial) int64). A pixel with a NaN (or +inf)
    logit gets a NaN confidence and class K - 1, as through the softmax.
    """
    confidence, index = _raw_softmax_confidence(logits, shift)
    k = (logits if isinstance(logits, torch.Tensor) else logits[0]).shape[1]
    return confidence, index.clamp_(max=k - 1)


def scaled_confidence(probs: torch.Tensor, scale: torch.Tensor):
    """Max and first argmax over classes of ``p_k s_k / sum_j p_j s_j`` (distribution alignment,
    :func:`align_distribution`) without writing the aligned probabilities.

    ``probs``: (B, K, *spatial) probabilities (or any non-negative values proportional to them per pixel);
    ``scale``: (K,) positive (:func:`alignment_scale`). Returns (confidence, index) as
    :func:`softmax_confidence`.
    """
    b, k = probs.shape[:2]
    confidence, index = _blocked_confidence(_classes_view(probs.float()), None, scale.float().view(1, k, 1))
    return confidence.view(b, *probs.shape[2:]), index.clamp_(max=k - 1).view(b, *probs.shape[2:])


def alignment_scale(labeled_mean: torch.Tensor, unlabeled_mean: torch.Tensor) -> torch.Tensor:
    """The per-class factor of distribution alignment: m_lab / m_unlab."""
    return labeled_mean / unlabeled_mean.clamp_min(1e-8)


def grouped_sums(index: torch.Tensor, values: torch.Tensor, groups: int, squares: bool = True) -> torch.Tensor:
    """(groups, 3) float64 sums (n, sum x, sum x^2) of ``values`` by ``index`` (same shape, 0 .. groups - 1):
    one pass, moments that add up over parts of the data (:func:`moments`, :func:`mean_var_from_moments`);
    without ``squares`` the third column is 0. ``bincount`` on the CPU; ``index_add_`` elsewhere (on CUDA
    bincount reads its input's maximum back to the host, a synchronisation per step). NaN values stay in
    their group."""
    index, x = index.reshape(-1), values.reshape(-1).double()
    weights = [x, x * x] if squares else [x]
    if index.device.type == "cpu":
        columns = [torch.bincount(index, minlength=groups).double(),
                   *(torch.bincount(index, w, minlength=groups) for w in weights)]
    else:
        columns = [torch.zeros(groups, device=x.device, dtype=torch.float64).index_add_(0, index, v)
                   for v in (torch.ones_like(x), *weights)]
    if not squares:
        columns.append(torch.zeros_like(columns[0]))
    return torch.stack(columns, dim=-1)


def labeled_groups(prediction: torch.Tensor, target: torch.Tensor, num_classes: int,
                   ignore_index: int | None = None) -> torch.Tensor:
    """Each labeled pixel's group for :func:`grouped_sums`: its predicted class c when the prediction is
    correct, K + c when it is wrong, 2K when it takes part in no set (the ignore label, or a non-finite
    confidence: ``prediction`` K). Integer arithmetic, no boolean temporaries."""
    k = num_classes
    group = prediction + k * (prediction != target)
    if ignore_index is not None:
        group = torch.where(target == ignore_index, 2 * k, group)
    return group.clamp_(max=2 * k)


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
    scale = alignment_scale(labeled_mean, unlabeled_mean).view(1, -1, *[1] * (probs.dim() - 2))
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
    """The labeled batch's confidences and groups (:func:`labeled_groups`) of one update; the correct /
    wrong masks (for inspection) are made when asked for."""

    confidence: torch.Tensor
    group: torch.Tensor
    num_classes: int

    @property
    def positive(self) -> torch.Tensor:
        return self.group < self.num_classes

    @property
    def negative(self) -> torch.Tensor:
        return (self.group >= self.num_classes) & (self.group < 2 * self.num_classes)


class DAWState(TensorState):
    """Running Gaussians of correct / wrong confidences, the threshold, and the alignment means.

    Tensors live on the device; ``state_dict`` holds plain tensors for checkpoints.
    """

    TENSORS = ("mean", "var", "threshold", "safe_threshold", "labeled_class_mean", "unlabeled_class_mean")

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
        in one all-reduce), so every rank holds the same state. The training step uses
        :meth:`update_logits`, the same update read off the logits.
        """
        def confidence_and_class(probs):
            probs = probs.float()
            confidence, prediction = max_and_argmax(probs, self.workspace(probs))
            return confidence, torch.where(torch.isfinite(confidence), prediction, self.num_classes)

        unlabeled = None if unlabeled_probs is None else confidence_and_class(unlabeled_probs)
        return self.update_confidences(*confidence_and_class(labeled_probs), target, unlabeled, unlabeled_valid,
                                       ignore_index)

    @torch.no_grad()
    def update_logits(self, labeled_logits: torch.Tensor, target: torch.Tensor,
                      unlabeled_logits=None, unlabeled_valid: torch.Tensor | None = None,
                      ignore_index: int | None = None, align: bool = True):
        """:meth:`update` + :meth:`align` + the pseudo-labels, from the logits: no softmax is materialised.

        One pass over the labeled logits (confidence and class), one over the unlabeled logits for the
        alignment means, and, after the update, one for the aligned pseudo-labels (``align``; else the
        update leaves the alignment means alone and the pseudo-labels are the plain softmax's).
        ``unlabeled_logits``: a tensor or a list of parts along the batch (the batch, then its CutMix
        partners; not copied into one). Returns (statistics, confidence, pseudo-label) of the unlabeled
        batch ((B, *spatial) float32 and int64), equal within float rounding to
        ``max_and_argmax(align(softmax(unlabeled_logits)))`` after :meth:`update` of the softmaxes.
        """
        labeled = _raw_softmax_confidence(labeled_logits)
        if unlabeled_logits is None:
            return self.update_confidences(*labeled, target, None, None, ignore_index), None, None
        if not align:
            stats = self.update_confidences(*labeled, target, None, None, ignore_index)
            return stats, *softmax_confidence(unlabeled_logits)
        unlabeled = _raw_softmax_confidence(unlabeled_logits)  # class K: a non-finite pixel
        stats = self.update_confidences(*labeled, target, unlabeled, unlabeled_valid, ignore_index)
        scale = alignment_scale(self.labeled_class_mean, self.unlabeled_class_mean)
        return stats, *softmax_confidence(unlabeled_logits, scale.log())

    @torch.no_grad()
    def update_confidences(self, confidence: torch.Tensor, prediction: torch.Tensor, target: torch.Tensor,
                           unlabeled: tuple[torch.Tensor, torch.Tensor] | None = None,
                           unlabeled_valid: torch.Tensor | None = None,
                           ignore_index: int | None = None) -> DAWStatistics:
        """:meth:`update` from the labeled batch's max probabilities and classes (B, H, W) and, for the
        alignment means, the unlabeled batch's (``unlabeled``: (confidence, class)). A class of K marks a
        pixel whose confidence is not finite (an fp16 overflow, say): it takes part in no set, since one NaN
        would make every running statistic NaN for good."""
        k = self.num_classes
        group = labeled_groups(prediction, target, k, ignore_index)
        lab = grouped_sums(group, confidence, 2 * k + 1)  # correct by class, wrong by class, excluded
        sums = [torch.stack([lab[:k].sum(0), lab[k:2 * k].sum(0)])]  # (2, 3): positives, negatives
        if unlabeled is not None:
            u_confidence, u_prediction = unlabeled
            u_group = u_prediction if unlabeled_valid is None else torch.where(unlabeled_valid.bool(), u_prediction, k)
            unl = grouped_sums(u_group, u_confidence, k + 1, squares=False)[:k]
            # (2K, 3): labeled classes (correct or not), then unlabeled classes.
            sums.append(torch.cat([lab[:k] + lab[k:2 * k], unl]))

        if distributed.world_size() > 1:
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

        if unlabeled is not None:
            counts, means, _ = mean_var_from_moments(sums[1])
            lab_count, unl_count = counts.split(k)
            lab_mean, unl_mean = means.split(k)
            self.labeled_class_mean = ema_where(self.labeled_class_mean, lab_mean, self.momentum, lab_count > 0)
            self.unlabeled_class_mean = ema_where(self.unlabeled_class_mean, unl_mean, self.momentum, unl_count > 0)
        return DAWStatistics(confidence=confidence, group=group, num_classes=k)

    def align(self, unlabeled_probs: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        return align_distribution(unlabeled_probs, self.labeled_class_mean, self.unlabeled_class_mean,
                                  out=unlabeled_probs if in_place else None)

    def log_values(self) -> dict[str, torch.Tensor]:
        sigma = self.var.sqrt()
        scale = alignment_scale(self.labeled_class_mean, self.unlabeled_class_mean)
        return {"tau": self.threshold, "safe_tau": self.safe_threshold,
                # How far alignment tilts the classes: the largest per-class factor over the smallest.
                "align_ratio": scale.max() / scale.min().clamp_min(1e-12),
                "mu_pos": self.mean[0], "mu_neg": self.mean[1],
                "sigma_pos": sigma[0], "sigma_neg": sigma[1]}

