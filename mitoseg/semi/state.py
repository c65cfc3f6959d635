"""Running statistics kept as named device tensors: moved, saved in checkpoints and restored alike."""

from __future__ import annotations

import torch


class TensorState:
    """A method's running state whose attributes named in ``TENSORS`` are tensors: ``to`` moves them,
    ``state_dict`` holds detached copies for checkpoints, ``load_state_dict`` restores them on each
    tensor's current device and dtype."""

    TENSORS: tuple[str, ...] = ()

    def to(self, device):
        for name in self.TENSORS:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach().clone() for name in self.TENSORS}

    def load_state_dict(self, state: dict) -> None:
        for name in self.TENSORS:
            current = getattr(self, name)
            setattr(self, name, state[name].to(current.device, current.dtype))
