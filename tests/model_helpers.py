"""Checkpoints of small untrained networks for prediction tests (no training: a second, not a minute).

The weights are scaled up so that the softmax is far from uniform and the labels vary across the image:
a prediction test then compares real decisions, not a constant background.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from conftest import tiny_config_dict


def random_checkpoint(path: Path, *, seed: int = 0, gain: float = 3.0, **sections) -> Path:
    """A mitoseg checkpoint of the tiny 2-D U-Net (``tiny_config_dict``), its config sections updated
    by ``sections`` (e.g. ``inference={"tta": True}``, ``model={"spatial_dims": 3}``)."""
    from mitoseg.config import config_from_dict, config_to_dict, input_channels
    from mitoseg.engine.checkpoint import save_checkpoint
    from mitoseg.networks import build_model

    data = tiny_config_dict({"train_image": "x", "train_label": "y", "val_image": "x", "val_label": "y"})
    for key, values in sections.items():
        data[key] = {**data.get(key, {}), **values}
    cfg = config_from_dict(data)
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.data.num_classes, input_channels(cfg))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(gain)
    weights = model.state_dict()
    save_checkpoint(path, {"config": config_to_dict(cfg), "model": weights, "ema_model": weights})
    return Path(path)


def em_like(shape, seed: int = 0) -> np.ndarray:
    """A uint8 volume with structure at several scales (smoothed noise), so predictions are not flat."""
    from scipy.ndimage import gaussian_filter

    noise = np.random.default_rng(seed).random(shape)
    lead = (0,) * (len(shape) - 3)  # (t, c) axes of a 5-D image are not smoothed
    smooth = gaussian_filter(noise, lead + (1, 3, 3)) * 0.7 + gaussian_filter(noise, lead + (0, 1, 1)) * 0.3
    smooth = (smooth - smooth.min()) / (np.ptp(smooth) or 1)
    return (smooth * 255).astype(np.uint8)
