"""Validation during training, for every kind of data: the scores of a model on a run's validation data
(:attr:`mitoseg.data.train_data.TrainData.validation`), so the trainer calls one function whatever it trains on.
EM slices are predicted as ``mitoseg predict`` predicts a volume (sliding windows, the run's TTA and
post-processing, resampled to the model's pixel size and back); natural images as ``mitoseg evaluate`` does."""

from __future__ import annotations

import torch

from mitoseg import distributed
from mitoseg.data.em import VolumeValidation
from mitoseg.data.natural import ImageValidation
from mitoseg.inference.images import evaluate
from mitoseg.inference.predictor import VolumePredictor, score_volume
from mitoseg.metrics import scores_from_confusion


def validation_scores(model: torch.nn.Module, validation, cfg, device: torch.device, amp: bool,
                      ignore_index: int | None, tta: bool = False) -> dict:
    """IoU, Dice and the rest of ``model`` on ``validation``; under torchrun each rank predicts its share of
    natural images and the confusion matrices are summed (EM slices: every rank predicts them all)."""
    if isinstance(validation, ImageValidation):
        matrix = evaluate(model, validation.images, cfg, device, amp=amp, rank=distributed.rank(),
                          world_size=distributed.world_size())
        return scores_from_confusion(distributed.all_reduce_sum(matrix), validation.class_names)
    if isinstance(validation, VolumeValidation):
        val = validation.slices
        predictor = VolumePredictor(model, cfg, device, scale=validation.scale, tta=tta)
        matrix = score_volume(predictor, lambda s, e: val.image[s:e], lambda s, e: val.label[s:e], len(val.image),
                              val.normalization, ignore_index)
        return scores_from_confusion(matrix)
    raise TypeError(f"no validation for {type(validation).__name__}")
