"""A small name -> builder registry (in the spirit of timm's)."""

from __future__ import annotations

from typing import Callable

from mitoseg.errors import MitosegError

_BUILDERS: dict[str, Callable] = {}


def register_model(name: str):
    def decorator(builder: Callable) -> Callable:
        _BUILDERS[name] = builder
        return builder

    return decorator


def build_model(model_cfg, num_classes: int):
    """Build the network named by ``model_cfg.name`` for ``num_classes`` classes."""
    try:
        builder = _BUILDERS[model_cfg.name]
    except KeyError:
        raise MitosegError(f"unknown model '{model_cfg.name}'; available: {', '.join(sorted(_BUILDERS))}") from None
    return builder(model_cfg, num_classes)
