"""Pseudo-label methods: FixMatch, UniMatch and DAW, one class with three configurations.

One step (UniMatch's recipe, with the pseudo-label source a config choice):

1. Pseudo-labels for the unlabeled batch and for the mixing batch come from
   their weak views (``method.pseudo_labels``): by default, as UniMatch's and
   DAW's code, the unlabeled batch's from the student's train-mode forward of
   step 2 (detached) and the mixing batch's from the student in eval mode
   (``student_train``); or both from the student in eval mode (``student``) or
   from the EMA teacher (``teacher``), without gradient.
2. The student predicts the labeled batch and the weak views together; with
   feature perturbation, the weak views' features also pass the head after
   channel dropout (the ``fp`` branch; ``method.fp_placement``: of the head
   input, or of DeepLabV3+'s backbone features decoded again, as UniMatch).
3. Each strong view gets a CutMix box pasted from the mixing batch's strong
   view; pseudo-labels, weights and ignore masks are mixed with the same box.
4. DAW only: the labeled batch updates the alignment means and the Gaussians
   of correct / wrong confidences; unlabeled probabilities are aligned; the
   weight is a step at the Gaussians' crossing. FixMatch / UniMatch use a fixed
   threshold.
5. Each unsupervised term is the weighted cross-entropy summed over pixels and
   divided by the number of valid pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mitoseg.config import loss_ignore_index
from mitoseg.methods.base import Method, StepContext, StepOutput, register_method
from mitoseg.semi.daw import DAWState, alignment_scale, correct_and_wrong, softmax_confidence
from mitoseg.semi.safeguard import ShareGuard, rampup_weight

# Bin edges of the inspection's confidence histograms: 10 even bins up to 0.9, then 40 bins even in
# log(1 - confidence) down to 1 - 1e-4, and the last one to 1: the thresholds that matter (0.9-0.999) get
# most of the bins (a plot on a logit axis shows them evenly).
HISTOGRAM_EDGES = np.concatenate([np.linspace(0.0, 0.9, 10, endpoint=False), 1.0 - np.geomspace(0.1, 1e-4, 40),
                                  [1.0]]).astype(np.float32)


def confidence_histogram(confidence: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Counts of ``confidence`` in the bins of ``edges`` (the last bin closed), float32: one bucketize, one
    bincount."""
    index = torch.bucketize(confidence.reshape(-1), edges[1:-1], right=True)
    return torch.bincount(index, minlength=edges.numel() - 1).float()


# ------------------------------------------------------------ pure functions


def cutmix(target: torch.Tensor, source: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """``source`` inside ``box`` (B, *spatial), ``target`` elsewhere; for images (B, C, *spatial) or maps
    (B, *spatial), 2-D or 3-D."""
    mask = box.bool()
    if target.dim() == mask.dim() + 1:
        mask = mask.unsqueeze(1)
    return torch.where(mask, source, target)


def channel_dropout(features: torch.Tensor, p: float) -> torch.Tensor:
    """UniMatch's feature perturbation: whole channels dropped, of a 2-D (B, C, H, W) or 3-D map."""
    dropout = F.dropout3d if features.dim() == 5 else F.dropout2d
    return dropout(features, p=p, training=True)


def features_and_fp(student, images: torch.Tensor, n_x: int, placement: str,
                    p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's features of ``images`` ([labeled, weak]) and the perturbed features whose head output
    is the fp branch (``method.fp_placement``): ``head_input`` the weak view's features after channel
    dropout (B_u rows); ``backbone`` UniMatch's dropout of the backbone features c1 and c4 of the whole
    batch, decoded together with the clean ones (``features_with_fp``; B_x + B_u rows, of which UniMatch
    keeps the weak view's). Either way the weak view's perturbed features are the last rows."""
    if placement == "backbone":
        return student.features_with_fp(images, p)
    features = student.features(images)
    return features, channel_dropout(features[n_x:], p)


def middle_plane(t: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """The y-x plane an inspection file shows: ``t`` itself in 2-D, the middle z plane of a 3-D patch
    (images (N, C, D, H, W) or maps (N, D, H, W))."""
    if spatial_dims == 2:
        return t
    return t.select(-3, t.shape[-3] // 2)


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                           valid: torch.Tensor, normalize: str = "valid") -> torch.Tensor:
    """sum(CE * weight) over valid pixels, divided by the number of valid pixels (``valid``: UniMatch's and
    DAW's code) or by the summed weight of the valid pixels (``confident``: the mean over the pixels whose
    pseudo-label is used, as DDFP's code, which ignores the others)."""
    loss = F.cross_entropy(logits.float(), target, reduction="none")
    valid = valid.to(loss.dtype)
    total = (loss * weight * valid).sum()
    if normalize == "confident":
        return total / (weight * valid).sum().clamp_min(1.0)
    return total / valid.sum().clamp_min(1.0)


def pseudo_label_quality(used: torch.Tensor, pseudo_label: torch.Tensor, truth: torch.Tensor,
                         valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """The trade-off DAW is about: share of wrong pseudo-labels used, of correct ones discarded."""
    correct = (pseudo_label == truth) & valid
    wrong = (pseudo_label != truth) & valid
    used = used.bool()
    return {
        "wrong_used": (wrong & used).sum() / wrong.sum().clamp_min(1),
        "correct_discarded": (correct & ~used).sum() / correct.sum().clamp_min(1),
        "pseudo_accuracy": correct.sum() / valid.sum().clamp_min(1),
    }


def foreground_share(label: torch.Tensor, valid: torch.Tensor | None, ignore_index: int | None = None) -> torch.Tensor:
    """Share of the valid pixels of ``label`` that are not background (class 0); ``ignore_index`` pixels are
    not valid."""
    valid = torch.ones_like(label, dtype=torch.bool) if valid is None else valid.bool()
    if ignore_index is not None:
        valid = valid & (label != ignore_index)
    return ((label != 0) & valid).sum() / valid.sum().clamp_min(1)


@dataclass
class PseudoLabels:
    confidence: torch.Tensor  # (B, H, W) max probability (of the aligned probabilities for DAW)
    label: torch.Tensor  # (B, H, W) int64
    weight: torch.Tensor  # (B, H, W) float


# -------------------------------------------------------------------- method


class PseudoLabelMethod(Method):
    uses_unlabeled = True
    strong_views = 2
    feature_perturbation = True
    weighting = "fixed"

    def __init__(self, cfg, supervised_loss):
        super().__init__(cfg, supervised_loss)
        self.num_classes = cfg.data.num_classes
        self.ignore_index = loss_ignore_index(cfg.train)
        self.daw = None
        if self.weighting == "daw":
            d = cfg.method.daw
            self.daw = DAWState(self.num_classes, momentum=d.momentum, alpha=d.alpha,
                                initial_threshold=d.initial_threshold)
        # The last labeled batch, for inspection: DAW's statistics, or (logits, label).
        self._last_labeled = None
        m = cfg.method
        self.guard = ShareGuard(self.num_classes, m.guard_tolerance) if m.guard_tolerance is not None else None
        self._guard_noted = False  # the guard's first action is said once (notices)

    # The loss of each configuration.
    def combine(self, loss_x, loss_s1, loss_s2, loss_fp):
        return (loss_x + 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp) / 2

    def unsupervised_loss(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                          valid: torch.Tensor) -> torch.Tensor:
        """An unsupervised cross-entropy term, normalised as ``method.unsup_normalize`` says."""
        return weighted_cross_entropy(logits, target, weight, valid, self.cfg.method.unsup_normalize)

    def threshold(self) -> torch.Tensor | float:
        return self.daw.threshold if self.daw is not None else self.cfg.method.threshold

    def threshold_tensor(self, device: torch.device) -> torch.Tensor:
        """The threshold as a device tensor, for the logs. A fixed threshold is filled in on the device
        (``torch.full``): copying a host number to the GPU would wait for the GPU every step."""
        threshold = self.threshold()
        if isinstance(threshold, torch.Tensor):
            return threshold.float()
        return torch.full((), threshold, dtype=torch.float32, device=device)

    @torch.no_grad()
    def predict_pseudo(self, ctx: StepContext, weak: torch.Tensor) -> torch.Tensor:
        """The pseudo-label source's logits of ``weak`` (no gradient; eval mode)."""
        model = ctx.teacher if self.cfg.method.pseudo_labels == "teacher" else ctx.student
        was_training = model.training
        model.eval()
        logits = model(weak)
        model.train(was_training)
        return logits

    def make_pseudo_labels(self, logits: list[torch.Tensor], labeled_logits: torch.Tensor, label: torch.Tensor,
                           valid: torch.Tensor) -> PseudoLabels:
        """Pseudo-labels of the unlabeled samples from their logits (``logits``: parts along the batch, in
        order), read off without a softmax (``softmax_confidence``); DAW updates its statistics from the
        labeled logits and aligns (``DAWState.update_logits``)."""
        logits = [t.detach() for t in logits]
        if self.daw is not None:
            stats, confidence, pseudo = self.daw.update_logits(labeled_logits.detach(), label, logits, valid,
                                                               self.ignore_index, self.cfg.method.daw.alignment)
            self._last_labeled = stats  # its correct / wrong masks are made at inspection only
        else:
            self._last_labeled = (labeled_logits.detach(), label)
            parts = [softmax_confidence(t) for t in logits]
            confidence, pseudo = (torch.cat(column) for column in zip(*parts))
        weight = (confidence >= self.threshold()).float()
        return PseudoLabels(confidence=confidence, label=pseudo, weight=weight)

    def labeled_sets(self):
        """(confidence, correct, wrong) of the last labeled batch, for the inspection histograms."""
        if self._last_labeled is None:
            return None
        if isinstance(self._last_labeled, tuple):
            logits, label = self._last_labeled
            confidence, prediction = softmax_confidence(logits)
            return (confidence, *correct_and_wrong(prediction, label, self.ignore_index))
        stats = self._last_labeled
        return stats.confidence, stats.positive, stats.negative

    def supervised_step(self, ctx: StepContext, labeled: dict) -> StepOutput:
        """A step on the labeled batch alone (the warm-up, ``supervised_only``); DAW's Gaussians of correct /
        wrong confidences follow the model meanwhile, so its threshold is the model's when the unlabeled terms
        start. The unsupervised logs are NaN."""
        x, y = labeled["image"], labeled["label"]
        logits = ctx.student(x)
        loss_x = self.supervised_loss(logits, y)
        if self.daw is not None:
            self._last_labeled, _, _ = self.daw.update_logits(logits.detach(), y, ignore_index=self.ignore_index)
        else:
            self._last_labeled = (logits.detach(), y)
        nan = torch.full((), float("nan"), device=loss_x.device)
        logs = {"loss_x": loss_x.detach(), "loss_s": nan, "mask_ratio": nan,
                "tau": self.threshold_tensor(loss_x.device)}
        if self.daw is not None:
            logs.update(self.daw.log_values())
        return StepOutput(loss=loss_x, logs=logs)

    def unsupervised_weight(self, ctx: StepContext, pl: PseudoLabels, n_u: int, valid: torch.Tensor,
                            label: torch.Tensor, logs: dict) -> torch.Tensor | float:
        """The factor of every unsupervised term this step: the ramp after the warm-up (``method.rampup``)
        times the class-share guard's (``method.guard_tolerance``); 1.0 without either."""
        m = self.cfg.method
        weight = rampup_weight(ctx.progress, m.warmup, m.rampup) if m.rampup > 0 else 1.0
        if m.rampup > 0:
            logs["rampup"] = torch.full((), weight, device=label.device)
        if self.guard is not None:
            factor = self.guard.update(pl.label[:n_u], valid[:n_u], label, self.ignore_index)
            logs["guard"], logs["guard_acted"] = factor, self.guard.acted.float()
            weight = weight * factor
        return weight

    def notices(self, iteration: int, values: dict[str, float]) -> list[str]:
        if self.guard is None or self._guard_noted or not values.get("guard_acted", 0.0) > 0:
            return []
        self._guard_noted = True
        return [f"iteration {iteration}: the pseudo-labels' class shares have drifted from the labeled slices' "
                f"(foreground {values.get('pseudo_fg', float('nan')):.1%} of the pseudo-labels against "
                f"{values.get('label_fg', float('nan')):.1%} of the labels this step): the unlabeled loss is "
                f"down-weighted while they differ by more than method.guard_tolerance = "
                f"{self.guard.tolerance:g} (now x{values.get('guard', float('nan')):.2f})"]

    def training_step(self, ctx: StepContext, labeled: dict, unlabeled: dict | None) -> StepOutput:
        if unlabeled is None or self.supervised_only(ctx.iteration, ctx.progress):
            return self.supervised_step(ctx, labeled)
        student = ctx.student
        x, y = labeled["image"], labeled["label"]
        n_x = x.shape[0]
        n_u = unlabeled["weak"].shape[0] // 2  # first half: the batch; second half: the mixing batch
        weak = unlabeled["weak"][:n_u]
        valid_all = unlabeled["valid"]

        train_forward = self.cfg.method.pseudo_labels == "student_train"
        # Without gradient: the partner batch (student_train), or both halves (student in eval mode, teacher).
        logits_pseudo = self.predict_pseudo(ctx, unlabeled["weak"][n_u:] if train_forward else unlabeled["weak"])

        size = x.shape[2:]
        if self.feature_perturbation:
            features, perturbed = features_and_fp(student, torch.cat([x, weak]), n_x, self.cfg.method.fp_placement,
                                                  self.cfg.method.fp_dropout)
            logits = student.logits(torch.cat([features, perturbed]), size)
            # The perturbed batch ends with the weak view's: its last n_u rows are the fp branch.
            pred_x, pred_u, pred_fp = logits[:n_x], logits[n_x:n_x + n_u], logits[-n_u:]
        else:
            features = student.features(torch.cat([x, weak]))
            logits = student.logits(features, size)
            pred_x, pred_u, pred_fp = logits[:n_x], logits[n_x:], None
        logits_all = [pred_u, logits_pseudo] if train_forward else [logits_pseudo]

        strong = [cutmix(unlabeled[f"strong{v}"][:n_u], unlabeled[f"strong{v}"][n_u:], unlabeled[f"box{v}"][:n_u])
                  for v in range(1, self.strong_views + 1)]
        pred_strong = student(torch.cat(strong)).chunk(self.strong_views)

        pl = self.make_pseudo_labels(logits_all, pred_x, y, valid_all)

        loss_x = self.supervised_loss(pred_x, y)
        losses_s = []
        for v, pred in enumerate(pred_strong, start=1):
            box = unlabeled[f"box{v}"][:n_u]
            mixed = [cutmix(t[:n_u], t[n_u:], box) for t in (pl.label, pl.weight, valid_all)]
            losses_s.append(self.unsupervised_loss(pred, *mixed))
        zero = loss_x.new_zeros(())
        loss_fp = zero
        if pred_fp is not None:
            loss_fp = self.unsupervised_loss(pred_fp, pl.label[:n_u], pl.weight[:n_u], valid_all[:n_u])
        loss_s2 = losses_s[1] if len(losses_s) > 1 else zero
        logs = self.unsupervised_logs(pl, n_u, valid_all, unlabeled, y, loss_x, losses_s,
                                      loss_fp if pred_fp is not None else None)
        w = self.unsupervised_weight(ctx, pl, n_u, valid_all, y, logs)
        if isinstance(w, float) and w == 1.0:
            loss = self.combine(loss_x, losses_s[0], loss_s2, loss_fp)
        else:
            loss = self.combine(loss_x, w * losses_s[0], w * loss_s2, w * loss_fp)
        return StepOutput(loss=loss, logs=logs)

    def unsupervised_logs(self, pl: PseudoLabels, n_u: int, valid_all: torch.Tensor, unlabeled: dict,
                          label: torch.Tensor, loss_x: torch.Tensor, losses_s: list[torch.Tensor],
                          loss_fp: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The step's logged values (tensors: read back only at log steps): losses, mask ratio, the
        threshold, DAW's Gaussians and, with analysis labels, the used-wrong / discarded-correct trade-off."""
        valid_u = valid_all[:n_u]
        logs = {
            "loss_x": loss_x.detach(),
            "loss_s": (sum(losses_s) / len(losses_s)).detach(),
            "mask_ratio": (pl.weight[:n_u] * valid_u).sum() / valid_u.sum().clamp_min(1),
            "tau": self.threshold_tensor(loss_x.device),
            # Share of the pseudo-labels (used or not) that are not background (class 0), against the labeled
            # batch's label_fg: the first sign of pseudo-labels that spread foreground.
            "pseudo_fg": foreground_share(pl.label[:n_u], valid_u),
            "label_fg": foreground_share(label, None, self.ignore_index),
        }
        if loss_fp is not None:
            logs["loss_fp"] = loss_fp.detach()
        if self.daw is not None:
            logs.update(self.daw.log_values())
        if "label" in unlabeled:
            logs["true_fg"] = foreground_share(unlabeled["label"][:n_u], valid_u)
            logs.update(pseudo_label_quality(pl.weight[:n_u] > 0, pl.label[:n_u], unlabeled["label"][:n_u], valid_u))
        return logs

    @torch.no_grad()
    def inspect(self, ctx: StepContext, patches: dict) -> dict[str, np.ndarray]:
        """Pseudo-labels of fixed unlabeled patches under the current model and weighting, plus the
        labeled confidence histograms of the last step (see docs/INSPECTION.md)."""
        logits = self.predict_pseudo(ctx, patches["image"])
        shift = None
        if self.daw is not None and self.cfg.method.daw.alignment:
            shift = alignment_scale(self.daw.labeled_class_mean, self.daw.unlabeled_class_mean).log()
        dims = patches["image"].dim() - 2
        confidence, pseudo = (middle_plane(t, dims) for t in softmax_confidence(logits, shift))
        weight = (confidence >= self.threshold()).float()
        image = middle_plane(patches["image"], dims)
        out = {
            # The middle channel: the slice itself when neighbouring slices come as channels (2.5-D).
            "image": image[:, image.shape[1] // 2].cpu().numpy().astype(np.float32),
            "confidence": confidence.cpu().numpy().astype(np.float32),
            "pseudo_label": pseudo.cpu().numpy().astype(np.uint8),
            "weight": weight.cpu().numpy().astype(np.uint8),
            "tau": np.float32(float(self.threshold())),
            "histogram_edges": HISTOGRAM_EDGES,
        }
        sets = self.labeled_sets()
        if sets is not None:
            conf, positive, negative = sets
            edges = torch.from_numpy(HISTOGRAM_EDGES).to(conf.device)
            out["hist_positive"] = confidence_histogram(conf[positive].float(), edges).cpu().numpy()
            out["hist_negative"] = confidence_histogram(conf[negative].float(), edges).cpu().numpy()
        if self.daw is not None:
            sigma = self.daw.var.sqrt()
            out.update({
                "mu_pos": np.float32(self.daw.mean[0].item()), "sigma_pos": np.float32(sigma[0].item()),
                "mu_neg": np.float32(self.daw.mean[1].item()), "sigma_neg": np.float32(sigma[1].item()),
                "safe_tau": np.float32(self.daw.safe_threshold.item()),
            })
        if "label" in patches:
            out["label"] = middle_plane(patches["label"], dims).cpu().numpy().astype(np.uint8)
        return out

    def state_dict(self) -> dict:
        state = {"daw": self.daw.state_dict()} if self.daw is not None else {}
        if self.guard is not None:
            state["guard"] = self.guard.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.daw is not None:
            self.daw.load_state_dict(state["daw"])
        if self.guard is not None and "guard" in state:  # checkpoints from before the guard have none
            self.guard.load_state_dict(state["guard"])
            self._guard_noted = bool(self.guard.acted)

    def to(self, device) -> "PseudoLabelMethod":
        if self.daw is not None:
            self.daw.to(device)
        if self.guard is not None:
            self.guard.to(device)
        return self


@register_method("fixmatch")
class FixMatch(PseudoLabelMethod):
    """One strong view, fixed threshold, no feature perturbation: (L_x + L_s) / 2."""

    strong_views = 1
    feature_perturbation = False

    def combine(self, loss_x, loss_s1, loss_s2, loss_fp):
        return (loss_x + loss_s1) / 2


@register_method("unimatch")
class UniMatch(PseudoLabelMethod):
    """Two strong views and the feature-perturbation branch, fixed threshold."""


@register_method("daw")
class DAW(PseudoLabelMethod):
    """UniMatch with the DAW weight (Gaussian crossing) and distribution alignment."""

    weighting = "daw"
