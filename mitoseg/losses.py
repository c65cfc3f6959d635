"""Supervised losses on (B, K, H, W) logits and (B, H, W) integer labels."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss


def make_supervised_loss(train_cfg) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``dice_ce``: MONAI's Dice + cross-entropy, ``train.dice_weight`` * Dice + ``train.ce_weight`` * CE
    (EM, no ignore label);
    ``ce``: cross-entropy that skips ``train.ignore_index`` (natural images)."""
    if train_cfg.loss == "dice_ce":
        dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=train_cfg.dice_weight,
                             lambda_ce=train_cfg.ce_weight)

        def loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            return dice_ce(logits.float(), label.unsqueeze(1))

        return loss

    ignore_index = train_cfg.ignore_index

    def loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), label, ignore_index=ignore_index)

    return loss
