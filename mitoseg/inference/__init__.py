"""Sliding-window prediction of whole volumes, slab by slab.

A slab of ``inference.slab`` slices is read, normalized, predicted with MONAI's
sliding-window inferer (the slices form the batch) and handed to a consumer
before the next slab is read: memory is bounded by the slab, not the volume.
Validation during training and ``mitoseg predict`` share this code.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from tqdm.auto import tqdm

from mitoseg.data.transforms import Normalization


def make_inferer(inference_cfg) -> SlidingWindowInferer:
    return SlidingWindowInferer(
        roi_size=tuple(inference_cfg.roi_size),
        sw_batch_size=inference_cfg.sw_batch_size,
        overlap=inference_cfg.overlap,
        mode=inference_cfg.blend,
        progress=False,
    )


def autocast(device: torch.device, enabled: bool):
    """Mixed precision on CUDA only (CPU autocast is slower for these convolutions)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_slab(model: torch.nn.Module, inferer: SlidingWindowInferer, slab: np.ndarray,
                 normalization: Normalization, device: torch.device, amp: bool = False) -> torch.Tensor:
    """Class probabilities (n, K, y, x), float32 on ``device``, for raw slices (n, y, x)."""
    images = torch.from_numpy(normalization(slab)).unsqueeze(1).to(device)
    with autocast(device, amp):
        logits = inferer(images, model)
    return torch.softmax(logits.float(), dim=1)


def iter_slabs(num_slices: int, slab: int) -> Iterator[tuple[int, int]]:
    for start in range(0, num_slices, slab):
        yield start, min(start + slab, num_slices)


def predict_volume(model: torch.nn.Module, read: Callable[[int, int], np.ndarray], num_slices: int,
                   normalization: Normalization, inference_cfg, device: torch.device,
                   consume: Callable[[int, torch.Tensor], None], amp: bool = False,
                   progress: bool = True, description: str = "predict") -> None:
    """Predict slices ``0 .. num_slices-1`` read by ``read(start, stop)``; ``consume(start, probs)`` per slab."""
    inferer = make_inferer(inference_cfg)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=num_slices, desc=description, unit="slice", disable=not progress, leave=False) as bar:
            for start, stop in iter_slabs(num_slices, inference_cfg.slab):
                probs = predict_slab(model, inferer, read(start, stop), normalization, device, amp)
                consume(start, probs)
                bar.update(stop - start)
    finally:
        model.train(was_training)
