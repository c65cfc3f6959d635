"""The torch device of a command or run (``device: auto | cpu | cuda | cuda:N``), on the ground floor so
that prediction, the napari plugin and training resolve it the same way without importing each other."""

from __future__ import annotations

import torch

from mitoseg.errors import MitosegError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; a named device must exist (one-line error otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MitosegError(f"config key 'device': unknown device {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MitosegError(f"config key 'device': {name!r} requested but CUDA is not available")
    return device
