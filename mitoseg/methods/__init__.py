"""Training methods: objects the trainer calls once per iteration.

A method turns a labeled batch (and, for semi-supervised methods, an unlabeled
batch) into a loss and a dict of tensors to log. The trainer owns everything
else (optimizer, EMA teacher, schedule, checkpoints), so adding a method never
forks the training loop. Methods are built by name (``method.name``).
"""

from mitoseg.methods.base import Method, StepContext, StepOutput, build_method, method_class, register_method
from mitoseg.methods import pseudo_label as _pseudo_label  # noqa: F401  (fixmatch, unimatch, daw)
from mitoseg.methods import ddfp as _ddfp  # noqa: F401  (ddfp, daw_ddfp)
from mitoseg.methods import supervised as _supervised  # noqa: F401  (registers "supervised")

__all__ = ["Method", "StepContext", "StepOutput", "build_method", "method_class", "register_method"]
