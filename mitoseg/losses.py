"""Supervised losses on (B, K, H, W) logits and (B, H, W) integer labels."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss


def ohem_cross_entropy(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255, thresh: float = 0.7,
                       min_kept: int = 200000) -> torch.Tensor:
    """Cross-entropy over the hard pixels: the official ``ProbOhemCrossEntropy2d`` of UniMatch / DAW
    (``util/ohem.py``, after TorchSemiSeg), vectorised and without a host synchronisation.

    ``p`` is the softmax probability of a pixel's true class (1 for ignored pixels). With ``n_valid``
    non-ignored pixels of the batch:

    - ``min_kept > n_valid`` or ``min_kept == 0``: every valid pixel is kept (plain cross-entropy);
    - otherwise the threshold is ``max(thresh, p_(min_kept))``, ``p_(k)`` the k-th smallest ``p`` of the
      batch, and the valid pixels with ``p <= threshold`` are kept (ties included: at least ``min_kept``).

    The loss is the mean cross-entropy over the kept pixels (NaN when none is valid, as
    ``F.cross_entropy`` with every pixel ignored).
    """
    ce = F.cross_entropy(logits.float(), label, ignore_index=ignore_index, reduction="none").flatten()
    valid = (label != ignore_index).flatten()
    keep = valid
    if 0 < min_kept <= valid.numel():  # more than the batch's pixels: certainly more than its valid ones
        p = torch.exp(-ce)  # the true class's softmax probability; 1 on ignored pixels (their CE is 0)
        kth = torch.kthvalue(p, min_kept).values
        threshold = torch.clamp(kth, min=thresh)  # raised to the min_kept-th smallest p when that is larger
        mine = valid.sum() >= min_kept  # fewer valid pixels than min_kept: no mining
        keep = valid & ((p <= threshold) | ~mine)
    keep = keep.to(ce.dtype)
    return (ce * keep).sum() / keep.sum()


def make_supervised_loss(train_cfg) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``dice_ce``: MONAI's Dice + cross-entropy, ``train.dice_weight`` * Dice + ``train.ce_weight`` * CE
    (EM, no ignore label);
    ``ce``: cross-entropy that skips ``train.ignore_index`` (natural images);
    ``ohem``: :func:`ohem_cross_entropy` with ``train.ohem_thresh`` and ``train.ohem_min_kept`` (the
    official UniMatch / DAW Cityscapes criterion)."""
    if train_cfg.loss == "dice_ce":
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=train_cfg.dice_weight,
                             lambda_ce=train_cfg.ce_weight)

        def loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            return dice_ce(logits.float(), label.unsqueeze(1))

        return loss

    ignore_index = train_cfg.ignore_index
    if train_cfg.loss == "ohem":
        thresh, min_kept = train_cfg.ohem_thresh, train_cfg.ohem_min_kept

        def loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            return ohem_cross_entropy(logits, label, ignore_index, thresh, min_kept)

        return loss

    def loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), label, ignore_index=ignore_index)

    return loss
