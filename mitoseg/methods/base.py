"""The method interface and its registry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from mitoseg.errors import MitosegError


@dataclass
class StepContext:
    """What a method may use in one training step."""

    student: torch.nn.Module  # the model being optimised (train mode)
    teacher: torch.nn.Module  # the EMA copy (eval mode, no gradients)
    iteration: int  # 0-based index of this step
    total_iterations: int
    # The fraction of the schedule done (of train.iterations, or of train.max_minutes under a time budget).
    progress: float = 0.0


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. the student
    # Detached scalars for logging; the trainer converts them to floats only at log steps.
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """Base class. ``uses_unlabeled``: whether the trainer must feed an unlabeled stream."""

    name = "base"
    uses_unlabeled = False
    # Unlabeled samples per iteration, in units of data.unlabeled_batch_size: 2 = the batch and its CutMix
    # partners (UniMatch), 1 = the batch alone (DDFP's CutMix mixes within it).
    unlabeled_per_batch = 2

    def __init__(self, cfg, supervised_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.cfg = cfg
        self.supervised_loss = supervised_loss

    def training_step(self, ctx: StepContext, labeled: dict, unlabeled: dict | None) -> StepOutput:
        raise NotImplementedError

    def supervised_only(self, iteration: int, progress: float) -> bool:
        """Whether the step at ``iteration`` (``progress``: the fraction of the schedule done) trains on the
        labeled batch alone: the trainer then draws no unlabeled batch for it and passes None. A
        semi-supervised method's warm-up (``method.warmup``)."""
        return self.uses_unlabeled and progress < self.cfg.method.warmup

    def notices(self, iteration: int, values: dict[str, float]) -> list[str]:
        """Lines worth a user's attention, read off a log step's values (host floats); each said once."""
        return []

    def teacher_restart_iteration(self) -> int | None:
        """The iteration at whose start the EMA teacher becomes a copy of the student and averaging starts
        over (None: never); DDFP's schedule restarts it when its unsupervised phase begins."""
        return None

    def to(self, device) -> "Method":
        """Move tensors the method keeps (running statistics) to ``device``."""
        return self

    def state_dict(self) -> dict:
        """Method state that must survive ``--resume`` (e.g. running statistics)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


_METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    def decorator(cls: type[Method]) -> type[Method]:
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def method_class(name: str) -> type[Method]:
    """The registered method class of ``name``."""
    try:
        return _METHODS[name]
    except KeyError:
        raise MitosegError(f"unknown method '{name}'; available: {', '.join(sorted(_METHODS))}") from None


def build_method(cfg, supervised_loss) -> Method:
    return method_class(cfg.method.name)(cfg, supervised_loss)
