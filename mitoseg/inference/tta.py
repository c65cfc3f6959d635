"""Test-time augmentation: the dihedral group of the y-x plane (and a z flip in 3-D).

Each transform acts on the last two axes (y, x) of a tensor, and in 3-D also on
the z axis before them. The prediction of a model under TTA is the mean over
the group of ``inverse(softmax(model(forward(x))))``: equivariant to every
transform of the group (for a square field of view), and equal to the plain
prediction for a model that already is.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Transform(NamedTuple):
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    inverse: Callable[[torch.Tensor], torch.Tensor]


def _dihedral(quarter_turns: int, flip: bool, flip_z: bool) -> Transform:
    def forward(t: torch.Tensor) -> torch.Tensor:
        if flip_z:
            t = t.flip(-3)
        if flip:
            t = t.flip(-1)
        return torch.rot90(t, quarter_turns, dims=(-2, -1))

    def inverse(t: torch.Tensor) -> torch.Tensor:
        t = torch.rot90(t, -quarter_turns, dims=(-2, -1))
        if flip:
            t = t.flip(-1)
        if flip_z:
            t = t.flip(-3)
        return t

    name = f"rot{90 * quarter_turns}" + ("+flip_x" if flip else "") + ("+flip_z" if flip_z else "")
    return Transform(name, forward, inverse)


def tta_transforms(spatial_dims: int = 2) -> list[Transform]:
    """The 8 flips / quarter turns in y-x (identity first); 16 with the z flip for 3-D."""
    flips_z = (False, True) if spatial_dims == 3 else (False,)
    return [_dihedral(k, flip, flip_z) for flip_z in flips_z for flip in (False, True) for k in range(4)]


def predict_with_tta(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                     spatial_dims: int = 2) -> torch.Tensor:
    """Mean over the group of ``inverse(predict(forward(images)))``; ``predict`` returns probabilities
    with the same spatial axes as its input (e.g. (n, K, y, x) for (n, C, y, x))."""
    total = None
    transforms = tta_transforms(spatial_dims)
    for transform in transforms:
        # Contiguous: windows cut from a rotated view keep its strides, and the network's convolutions then
        # reorder every window (a quarter more time per TTA view on the CPU).
        probs = transform.inverse(predict(transform.forward(images).contiguous()))
        if total is None:
            total = probs.contiguous()
        else:
            total.add_(probs)
    return total / len(transforms)
