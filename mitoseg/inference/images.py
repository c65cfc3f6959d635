"""Whole natural images (Pascal VOC, Cityscapes) predicted into a confusion matrix: validation during
training and ``mitoseg evaluate --checkpoint`` of a natural-image model, in UniMatch's evaluation modes
(``full``, ``center_crop``, ``sliding_window``; the images themselves come from :mod:`mitoseg.data.natural`)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from mitoseg.data.natural import IGNORE, NaturalEvalDataset
from mitoseg.device import autocast
from mitoseg.inference.predictor import make_inferer
from mitoseg.metrics import confusion_matrix
from mitoseg.semi.daw import max_and_argmax


@torch.no_grad()
def predict_image(model: torch.nn.Module, image: torch.Tensor, mode: str, inference_cfg, crop_size: int,
                  device: torch.device, amp: bool = False) -> torch.Tensor:
    """Class probabilities (1, K, H, W) of one image (1, 3, H, W) on ``device``.

    ``full`` / ``center_crop``: one forward pass; ``sliding_window``: MONAI's sliding-window
    inferer over ``crop_size`` windows (clamped to the image), blending softmax probabilities
    as UniMatch sums them.
    """
    image = image.to(device)
    with autocast(device, amp):
        if mode != "sliding_window":
            return model(image).float().softmax(dim=1)
        h, w = image.shape[-2:]
        roi = [min(crop_size, h), min(crop_size, w)]
        inferer = make_inferer(inference_cfg)
        inferer.roi_size = tuple(roi)
        return inferer(image, lambda x: model(x).float().softmax(dim=1)).float()


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: NaturalEvalDataset, cfg, device: torch.device, amp: bool = False,
             rank: int = 0, world_size: int = 1, mode: str | None = None, progress: bool = False) -> torch.Tensor:
    """The confusion matrix (K x K, int64, CPU) of this rank's share of the validation images
    (images ``rank, rank + W, ...``); the caller sums it over ranks. ``progress``: a bar over the images
    (``mitoseg evaluate``; validation during training keeps the training bar alone)."""
    k = cfg.data.num_classes
    mode = mode or dataset.mode
    matrix = torch.zeros(k, k, dtype=torch.int64)
    was_training = model.training
    model.eval()
    try:
        for index in tqdm(range(rank, len(dataset), world_size), desc=f"evaluate ({mode})", unit="image",
                          disable=not progress, dynamic_ncols=True):
            image, label = dataset[index]
            probs = predict_image(model, image[None], mode, cfg.inference, cfg.data.crop_size, device, amp)
            matrix += confusion_matrix(max_and_argmax(probs)[1].cpu(), label[None], k, IGNORE)
    finally:
        model.train(was_training)
    return matrix
