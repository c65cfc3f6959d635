"""A small name -> builder registry (in the spirit of timm's)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from mitoseg.errors import MitosegError

_BUILDERS: dict[str, Callable] = {}


def register_model(name: str):
    def decorator(builder: Callable) -> Callable:
        _BUILDERS[name] = builder
        return builder

    return decorator


def build_model(model_cfg, num_classes: int, in_channels: int | None = None):
    """Build the network named by ``model_cfg.name`` for ``num_classes`` classes and ``in_channels`` input
    channels (default ``model_cfg.in_channels``; a 2.5-D run passes ``config.input_channels``)."""
    try:
        builder = _BUILDERS[model_cfg.name]
    except KeyError:
        raise MitosegError(f"unknown model '{model_cfg.name}'; available: {', '.join(sorted(_BUILDERS))}") from None
    if in_channels is not None and in_channels != model_cfg.in_channels:
        model_cfg = dataclasses.replace(model_cfg, in_channels=in_channels)
    return builder(model_cfg, num_classes)
