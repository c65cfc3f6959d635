"""The EMA teacher: an exponential moving average of the student's parameters and buffers."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA(nn.Module):
    """``ema = decay * ema + (1 - decay) * student`` for every floating-point parameter and buffer
    (BatchNorm's running statistics too); integer buffers (``num_batches_tracked``) are copied.

    The numbers are those of ``torch.optim.swa_utils.AveragedModel`` with ``get_ema_multi_avg_fn``
    and ``use_buffers=True`` (the first update copies the student, later ones are one foreach
    ``lerp_``). AveragedModel keeps its update counter in a CPU tensor and copies it to the GPU on
    every update, a host synchronisation per training step; here the counter is a Python int.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        super().__init__()
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.n_averaged = 0

    def current_decay(self) -> float:
        """The decay of the next update: ``decay``, or with ``warmup`` (DAW's and DDFP's code)
        ``min(decay, 1 - 1 / (n + 1))`` after n updates, so early teachers follow the student closely."""
        if self.warmup:
            return min(self.decay, 1.0 - 1.0 / (self.n_averaged + 1))
        return self.decay

    @torch.no_grad()
    def restart(self, model: nn.Module) -> None:
        """The teacher becomes a copy of ``model`` and averaging starts over (DDFP's code copies the student
        into the teacher when its unsupervised phase begins)."""
        ema = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        for target, source in zip(ema, current):
            target.copy_(source)
        self.n_averaged = 0

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema = [*self.module.parameters(), *self.module.buffers()]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if len(ema) != len(current):
            raise ValueError("ModelEMA.update: the model's parameters and buffers differ from the EMA copy's")
        floating = [i for i, t in enumerate(ema) if t.is_floating_point()]
        other = [i for i, t in enumerate(ema) if not t.is_floating_point()]
        if self.n_averaged == 0:
            torch._foreach_copy_([ema[i] for i in floating], [current[i] for i in floating])
        elif floating:
            torch._foreach_lerp_([ema[i] for i in floating], [current[i] for i in floating],
                                 1.0 - self.current_decay())
        for i in other:
            ema[i].copy_(current[i])
        self.n_averaged += 1
