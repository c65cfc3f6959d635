"""DDFP and DAW + DDFP: density-descending feature perturbation on top of the pseudo-label methods.

A normalizing flow (``mitoseg.semi.flow``) models the density of the head's
penultimate features. Features entering the head are moved, per pixel, a step
of norm ``eps`` up the gradient of the flow's negative log-likelihood (toward
lower density), pass the head with its auxiliary BatchNorm (MixBN,
``perturbed=True``), and are trained toward the pseudo-label: the decision
boundary is pushed into the low-density gaps between feature clusters.

``ddfp`` (Wang et al., CVPR 2024), by default as the authors' code
(github Gavinwxy/DDFP, train_ddfp_pascal.py; each choice is a ``method.ddfp``
key): pseudo-labels of the EMA teacher (``method.pseudo_labels: teacher``), whose
forward runs in train mode (``teacher_mode``), fixed threshold ``method.threshold``,
one CutMix strong view whose features are also perturbed, each unsupervised
cross-entropy averaged over the confident pixels (``method.unsup_normalize``).
The schedule (``schedule: official``) has three phases::

    iteration < start_iter:                L = L_x                        (the teacher restarts from the
    start_iter <= iteration < perturb_iter: L = L_x + L_u                  student at start_iter; the flow
    perturb_iter <= iteration:              L = L_x + 0.5 L_u + 0.5 L_p    trains from start_iter on)

and between start_iter and perturb_iter the strong view passes the head's
auxiliary BatchNorm (``mixbn_warmup``), which so learns before it is used.
``schedule: joint`` is mitoseg's earlier form: L = L_x + 0.5 L_u + 0.5 L_p
throughout, L_p = 0 before start_iter, where flow and perturbation both start.

``daw_ddfp`` (ours): DAW, i.e. UniMatch's two CutMix strong views and dropout
feature-perturbation branch on the weak view, DAW weights and distribution
alignment; the density-descending term perturbs the weak view's features (the
place of UniMatch's feature perturbation) and is weighted by the same DAW
weights::

    L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.25 L_fp + 0.25 L_ddfp) / 2

with L_ddfp = 0 before perturb_iter; the flow trains from start_iter on.

One step, once the flow trains:

1. The EMA teacher (no gradient) gives the penultimate features of the
   labeled batch and the unlabeled batch (and, for ``pseudo_labels: teacher``,
   the pseudo-labels from the same forward pass).
2. The flow takes one Adam step (every ``ddfp.flow_every``-th iteration; the
   teacher's forward of 1. is skipped in between unless it gives the pseudo-labels)
   on at most ``ddfp.max_pixels`` of these feature vectors: labeled pixels under
   their ground-truth class (nearest-downsampled to the feature grid,
   ``ignore_index`` excluded), unlabeled pixels under the mixture.
3. The student predicts: ``ddfp`` the labeled batch and the CutMix strong view
   in one forward pass (as the paper), ``daw_ddfp`` as DAW does (labeled batch +
   weak view with its dropout branch, then the two strong views).
4. From perturb_iter: delta = eps * normalised gradient, w.r.t. the perturbed
   view's features, of the flow's NLL summed over the pixels whose pseudo-label
   is used (``perturb_pixels: confident``), through the student's head with its
   auxiliary BatchNorm in train mode (``perturb_bn: aux_train``, as DDFP's
   attack.py: its batch statistics tie every pixel to the used ones, so the
   other pixels move too, in the direction that lowers the used pixels'
   density) or its main BatchNorm in eval mode (``main_eval``: pixels beyond the
   head's receptive field of a used pixel are not moved);
   ``f + delta`` (delta detached) goes through the head with MixBN; its
   cross-entropy to the pseudo-label is the density-descending term.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch

from mitoseg.config import perturb_start
from mitoseg.methods.base import StepContext, StepOutput, register_method
from mitoseg.methods.pseudo_label import (
    PseudoLabelMethod,
    cutmix,
    features_and_fp,
    middle_plane,
)
from mitoseg.semi.flow import (
    EXCLUDED,
    UNLABELED,
    DensityModel,
    FlowTrainer,
    density_descending_perturbation,
    flatten_pixels,
    labels_to_grid,
    subsample_mask,
)

DDFP_LOGS = ("loss_ddfp", "flow_nll_bpd", "logp_labeled", "logp_unlabeled", "delta_norm", "flip_ratio")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DensityDescendingMethod(PseudoLabelMethod):
    """Pseudo-label method + flow + density-descending term. ``perturb_view``: 'strong' or 'weak';
    ``supervised_warmup``: the official schedule's supervised-only phase before start_iter (ddfp)."""

    perturb_view = "strong"
    supervised_warmup = False

    def __init__(self, cfg, supervised_loss):
        super().__init__(cfg, supervised_loss)
        d = cfg.method.ddfp
        self.ddfp = d
        self.flow_start, self.perturb_start = d.start_iter, perturb_start(d)
        # DDFP's CutMix pastes from the next sample of the batch: no second unlabeled batch is needed.
        self.unlabeled_per_batch = 1 if cfg.method.cutmix == "ddfp" else 2
        self.official = d.schedule == "official"
        density = DensityModel(cfg.model.head_channels, self.num_classes, blocks=d.blocks, hidden=d.hidden,
                               clamp=d.clamp, seed=cfg.seed, init=d.flow_init, precision=d.flow_precision)
        flow_steps = -(-(cfg.train.iterations - d.start_iter) // d.flow_every)  # its learning rate decays over these
        self.flow = FlowTrainer(density, lr=d.lr, betas=d.betas, grad_clip=d.grad_clip,
                                final_lr_ratio=d.final_lr_ratio, total_steps=flow_steps,
                                noise=d.noise, max_pixels=d.max_pixels)
        # Benchmarks set a dict here: seconds spent in 'flow_training' and 'perturbation' (synchronised),
        # measured with ``clock``.
        self.timings: dict[str, float] | None = None
        self._flow_logs: dict[str, torch.Tensor] | None = None
        self.clock = time.perf_counter

    # The loss of each configuration, given whether the density-descending term counts yet.
    def combine_ddfp(self, loss_x, loss_s1, loss_s2, loss_fp, loss_p, perturbing: bool):
        raise NotImplementedError

    def partner(self, t: torch.Tensor, n_u: int) -> torch.Tensor:
        """What CutMix pastes into each of the batch's first ``n_u`` samples: the mixing batch's sample
        (UniMatch) or the next sample of the batch itself, cyclically (DDFP)."""
        return t[n_u:] if self.unlabeled_per_batch == 2 else t[:n_u].roll(-1, dims=0)

    def flow_trains(self, iteration: int) -> bool:
        """Whether the flow takes a step at ``iteration``: every ``method.ddfp.flow_every``-th from start_iter."""
        return iteration >= self.flow_start and (iteration - self.flow_start) % self.ddfp.flow_every == 0

    def supervised_only(self, iteration: int, progress: float) -> bool:
        """``method.warmup``, and the official ddfp schedule's supervised phase before start_iter."""
        return super().supervised_only(iteration, progress) or (
            self.supervised_warmup and self.official and iteration < self.flow_start)

    def teacher_restart_iteration(self) -> int | None:
        return self.flow_start if self.supervised_warmup and self.official and self.flow_start > 0 else None

    @contextmanager
    def _timed(self, name: str, device: torch.device):
        if self.timings is None:
            yield
            return
        _synchronize(device)
        start = self.clock()
        try:
            yield
        finally:
            _synchronize(device)
            self.timings[name] = self.timings.get(name, 0.0) + self.clock() - start

    @torch.no_grad()
    def teacher_pass(self, ctx: StepContext, images: torch.Tensor, with_logits: bool = True,
                     train_mode: bool | None = None):
        """The EMA teacher (in train mode with ``method.ddfp.teacher_mode: train``, as DDFP's code, else in
        eval mode; ``train_mode`` overrides): penultimate features (B, C, *grid) and, optionally
        (``with_logits``), the class logits at the images' size (the pseudo-labels are read off them)."""
        teacher = ctx.teacher
        was_training = teacher.training
        teacher.train(self.ddfp.teacher_mode == "train" if train_mode is None else train_mode)
        features = teacher.features(images)
        logits = None
        if with_logits:
            # The model's own logits (and resizing); its head block's output caught on the way.
            caught = []
            hook = teacher.seg_head.block.register_forward_hook(lambda module, args, out: caught.append(out))
            try:
                logits = teacher.logits(features, images.shape[2:])
            finally:
                hook.remove()
            penultimate = caught[0]
        else:
            penultimate = teacher.seg_head.penultimate(features)
        teacher.train(was_training)
        return penultimate, logits

    def perturbation(self, student, features: torch.Tensor, used: torch.Tensor | None) -> torch.Tensor:
        """delta for ``features`` (the head's input). ``used``: (B, *spatial) weight of each pixel's pseudo-label
        (with ``perturb_pixels: confident`` only their pixels pull the direction); the head runs with its
        auxiliary BatchNorm in train mode (``perturb_bn: aux_train``) or its main BatchNorm in eval mode."""
        head = student.seg_head
        mask = None
        if used is not None and self.ddfp.perturb_pixels == "confident":
            mask = labels_to_grid((used > 0).long(), features.shape[2:]) > 0  # the head keeps the grid
        if self.ddfp.perturb_max_pixels is not None:
            if mask is None:
                mask = torch.ones((features.shape[0], *features.shape[2:]), dtype=torch.bool, device=features.device)
            mask = subsample_mask(mask, self.ddfp.perturb_max_pixels)
        if self.ddfp.perturb_bn == "aux_train":
            return density_descending_perturbation(
                features.float(), lambda f: head.penultimate(f, perturbed=True), self.flow.model.log_density,
                self.ddfp.eps, chunk=self.ddfp.chunk_pixels, mask=mask)
        block = head.block
        was_training = block.training
        block.eval()
        try:
            return density_descending_perturbation(features.float(), head.penultimate, self.flow.model.log_density,
                                                   self.ddfp.eps, chunk=self.ddfp.chunk_pixels, mask=mask)
        finally:
            block.train(was_training)

    def train_flow(self, penultimate: torch.Tensor, label: torch.Tensor, valid_u: torch.Tensor):
        """One flow step on the teacher's features of [labeled batch, unlabeled batch]."""
        grid = penultimate.shape[2:]
        labeled = labels_to_grid(label, grid, self.ignore_index)
        unlabeled = torch.where(labels_to_grid(valid_u.long(), grid) > 0, UNLABELED, EXCLUDED)
        labels = torch.cat([labeled, unlabeled]).reshape(-1)
        return self.flow.step(flatten_pixels(penultimate.float()), labels)

    def supervised_step(self, ctx: StepContext, labeled: dict) -> StepOutput:
        """The labeled loss alone (the official schedule's first phase, ``method.warmup``): the unsupervised
        and flow logs are NaN."""
        out = super().supervised_step(ctx, labeled)
        nan = torch.full((), float("nan"), device=out.loss.device)
        out.logs["loss_ddfp"] = out.loss.new_zeros(())
        out.logs.update({key: nan for key in DDFP_LOGS[1:]})
        return out

    def training_step(self, ctx: StepContext, labeled: dict, unlabeled: dict | None) -> StepOutput:
        if unlabeled is None or self.supervised_only(ctx.iteration, ctx.progress):
            return self.supervised_step(ctx, labeled)
        student = ctx.student
        x, y = labeled["image"], labeled["label"]
        device = x.device
        n_x = x.shape[0]
        # The batch, then (UniMatch's CutMix) its mixing batch.
        n_u = unlabeled["weak"].shape[0] // self.unlabeled_per_batch
        weak_all, valid_all = unlabeled["weak"], unlabeled["valid"]
        size = x.shape[2:]
        flow_active = ctx.iteration >= self.flow_start
        flow_step = self.flow_trains(ctx.iteration)  # the teacher's features are read only for a flow step
        perturbing = ctx.iteration >= self.perturb_start
        logs: dict[str, torch.Tensor] = {}

        # 1. pseudo-label probabilities (student_train: the mixing batch's now, the batch's from the student's
        # train-mode forward in 3.); the teacher's penultimate features for the flow
        teacher_features = None
        train_forward = self.cfg.method.pseudo_labels == "student_train"
        if self.cfg.method.pseudo_labels == "teacher" and flow_active:  # pseudo-labels and flow features at once
            penultimate, logits = self.teacher_pass(ctx, torch.cat([x, weak_all]))
            teacher_features, logits_all = penultimate[:n_x + n_u], [logits[n_x:]]
        else:
            logits_all = [self.predict_pseudo(ctx, weak_all[n_u:] if train_forward else weak_all)]
            if flow_step:
                teacher_features, _ = self.teacher_pass(ctx, torch.cat([x, weak_all[:n_u]]), with_logits=False)

        # 2. one online step of the flow (every flow_every-th iteration)
        if flow_step:
            with self._timed("flow_training", device), torch.autocast(device.type, enabled=False):
                self._flow_logs = self.train_flow(teacher_features, y, valid_all[:n_u])
        if flow_active and self._flow_logs is not None:
            logs.update(self._flow_logs)  # between flow steps (flow_every > 1): those of the last one

        # 3. the student: labeled batch, views, (dropout branch)
        strong = [cutmix(unlabeled[f"strong{v}"][:n_u], self.partner(unlabeled[f"strong{v}"], n_u),
                         unlabeled[f"box{v}"][:n_u]) for v in range(1, self.strong_views + 1)]
        pred_fp = None
        if self.perturb_view == "strong":
            features = student.features(torch.cat([x, strong[0]]))
            if self.ddfp.mixbn_warmup and self.official and flow_active and not perturbing:
                # DDFP's 'warm_up' MixBN status: the strong view through the auxiliary BatchNorm.
                pred_x = student.logits(features[:n_x], size)
                clean = student.logits(features[n_x:], size, perturbed=True)
            else:
                logits = student.logits(features, size)
                pred_x, clean = logits[:n_x], logits[n_x:]
            pred_strong = [clean]
            if self.strong_views > 1:
                pred_strong += list(student(torch.cat(strong[1:])).chunk(self.strong_views - 1))
        else:
            if self.feature_perturbation:
                features, dropped = features_and_fp(student, torch.cat([x, weak_all[:n_u]]), n_x,
                                                    self.cfg.method.fp_placement, self.cfg.method.fp_dropout)
                logits = student.logits(torch.cat([features, dropped]), size)
                pred_fp = logits[-n_u:]  # the perturbed batch ends with the weak view's rows
            else:
                features = student.features(torch.cat([x, weak_all[:n_u]]))
                logits = student.logits(features, size)
            pred_x, clean = logits[:n_x], logits[n_x:n_x + n_u]
            pred_strong = list(student(torch.cat(strong)).chunk(self.strong_views))
        perturbed_features = features[n_x:]
        if train_forward:  # only with perturb_view 'weak' (config check): ``clean`` is the weak batch's
            logits_all = [clean, *logits_all]

        pl = self.make_pseudo_labels(logits_all, pred_x, y, valid_all)

        loss_x = self.supervised_loss(pred_x, y)
        losses_s, targets_s = [], []
        for v, pred in enumerate(pred_strong, start=1):
            box = unlabeled[f"box{v}"][:n_u]
            targets_s.append([cutmix(t[:n_u], self.partner(t, n_u), box) for t in (pl.label, pl.weight, valid_all)])
            losses_s.append(self.unsupervised_loss(pred, *targets_s[-1]))
        weak_target = (pl.label[:n_u], pl.weight[:n_u], valid_all[:n_u])
        zero = loss_x.new_zeros(())
        loss_fp = self.unsupervised_loss(pred_fp, *weak_target) if pred_fp is not None else zero

        # 4. the density-descending term
        loss_p = zero
        if perturbing:
            target = targets_s[0] if self.perturb_view == "strong" else weak_target
            with self._timed("perturbation", device), torch.autocast(device.type, enabled=False):
                delta = self.perturbation(student, perturbed_features, target[1] * target[2])
            pred_p = student.logits(perturbed_features + delta.to(perturbed_features.dtype), size, perturbed=True)
            loss_p = self.unsupervised_loss(pred_p, *target)
            with torch.no_grad():
                valid_p = target[2]
                flipped = (pred_p.argmax(dim=1) != clean.argmax(dim=1)) & valid_p
                logs["delta_norm"] = delta.norm(dim=1).mean()
                logs["flip_ratio"] = flipped.sum() / valid_p.sum().clamp_min(1)
        nan = torch.full((), float("nan"), device=device)
        for key in DDFP_LOGS[1:]:
            logs.setdefault(key, nan)
        logs["loss_ddfp"] = loss_p.detach()

        loss_s2 = losses_s[1] if len(losses_s) > 1 else zero
        logs.update(self.unsupervised_logs(pl, n_u, valid_all, unlabeled, y, loss_x, losses_s,
                                           loss_fp if pred_fp is not None else None))
        w = self.unsupervised_weight(ctx, pl, n_u, valid_all, y, logs)
        if isinstance(w, float) and w == 1.0:
            loss = self.combine_ddfp(loss_x, losses_s[0], loss_s2, loss_fp, loss_p, perturbing)
        else:
            loss = self.combine_ddfp(loss_x, w * losses_s[0], w * loss_s2, w * loss_fp, w * loss_p, perturbing)
        return StepOutput(loss=loss, logs=logs)

    @torch.no_grad()
    def inspect(self, ctx: StepContext, patches: dict) -> dict[str, np.ndarray]:
        """The pseudo-label inspection arrays plus ``log_density`` (N, h, w): the flow's log-density
        (mixture) of the teacher's penultimate features, per pixel of the feature grid."""
        out = super().inspect(ctx, patches)
        # Eval mode: looking must not move the teacher's BatchNorm statistics (inspection runs on rank 0 only).
        penultimate, _ = self.teacher_pass(ctx, patches["image"], with_logits=False, train_mode=False)
        log_p = self.flow.model.log_density(flatten_pixels(penultimate.float()))
        log_p = log_p.reshape(penultimate.shape[0], *penultimate.shape[2:])
        out["log_density"] = middle_plane(log_p, penultimate.dim() - 2).cpu().numpy().astype(np.float32)
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ddfp": self.flow.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.flow.load_state_dict(state["ddfp"])

    def to(self, device) -> "DensityDescendingMethod":
        super().to(device)
        self.flow.to(device)
        return self


@register_method("ddfp")
class DDFP(DensityDescendingMethod):
    """The paper's DDFP: one strong view (its features perturbed), fixed threshold, pseudo-labels from the
    EMA teacher unless ``method.pseudo_labels`` says otherwise (the config default for ddfp). Official
    schedule: L_x, then L_x + L_u, then L_x + 0.5 L_u + 0.5 L_p; joint: L_x + 0.5 L_u + 0.5 L_p."""

    strong_views = 1
    feature_perturbation = False
    perturb_view = "strong"
    supervised_warmup = True

    def combine_ddfp(self, loss_x, loss_s1, loss_s2, loss_fp, loss_p, perturbing: bool):
        if self.official and not perturbing:
            return loss_x + loss_s1
        return loss_x + 0.5 * loss_s1 + 0.5 * loss_p


@register_method("daw_ddfp")
class DAWDDFP(DensityDescendingMethod):
    """DAW (UniMatch terms, DAW weights and alignment) + the density-descending term on the weak view:
    L = (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.25 L_fp + 0.25 L_ddfp) / 2, L_ddfp = 0 before perturb_iter."""

    weighting = "daw"
    perturb_view = "weak"

    def combine_ddfp(self, loss_x, loss_s1, loss_s2, loss_fp, loss_p, perturbing: bool):
        return (loss_x + 0.25 * loss_s1 + 0.25 * loss_s2 + 0.25 * loss_fp + 0.25 * loss_p) / 2
