"""Fine-tuning: a new run that starts from the weights of a mitoseg checkpoint.

``model.init_from: RUN/best.pt`` loads the checkpoint's EMA or student weights
(``model.init_weights``; default: those its run validated) into the new run's
network before the EMA teacher and the optimizer are made, so the teacher starts
as the initialised student. The networks must match key for key and shape for
shape, except the classifier (the head's last 1x1 convolution) when
``data.num_classes`` differs: it keeps its fresh initialisation. ``model.freeze``
names parts (``encoder``, ``decoder``) that do not train until iteration
``model.freeze_iters``: no gradient, and their BatchNorm layers normalise with
the running statistics they were loaded with and keep them (as detectron2's
FrozenBatchNorm), so a frozen part is exactly the checkpoint's.

The checkpoint is read only when a run starts: ``--resume`` restores its own
``last.pt`` and never opens ``model.init_from`` again.
"""

from __future__ import annotations

from torch import nn

from mitoseg.config import Config, config_to_dict
from mitoseg.runs import checkpoint_config, load_checkpoint, validated_weights
from mitoseg.networks.loading import non_finite_keys
from mitoseg.errors import MitosegError

KEY = "config key 'model.init_from'"
# Model keys that do not shape the weights: they may differ between the checkpoint's run and the new one.
NOT_ARCHITECTURE = ("init_from", "init_weights", "freeze", "freeze_iters", "pretrained", "dropout")
MAX_LISTED = 10  # keys named per kind in a mismatch message (with the count of the rest)


def read_init_checkpoint(cfg: Config) -> dict:
    """The checkpoint of ``model.init_from``, read weights-only (``load_checkpoint``); errors name the key."""
    try:
        return load_checkpoint(cfg.model.init_from)
    except MitosegError as exc:
        raise MitosegError(f"{KEY}: {exc}") from exc


def architecture_differences(source: Config, target: Config) -> list[str]:
    """Config keys that shape the network and differ: ``model.*`` (except :data:`NOT_ARCHITECTURE`), the input
    channels (``data.context_slices``, ``model.in_channels``) and ``data.num_classes``, as ``key (a -> b)``."""
    a, b = config_to_dict(source)["model"], config_to_dict(target)["model"]
    found = [f"model.{key} ({a.get(key)} -> {b.get(key)})" for key in sorted(set(a) | set(b))
             if key not in NOT_ARCHITECTURE and a.get(key) != b.get(key)]
    if source.data.context_slices != target.data.context_slices:
        found.append(f"data.context_slices ({source.data.context_slices} -> {target.data.context_slices})")
    if source.data.num_classes != target.data.num_classes:
        found.append(f"data.num_classes ({source.data.num_classes} -> {target.data.num_classes})")
    return found


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f" and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else "")


def initialise_from_checkpoint(model: nn.Module, cfg: Config, state: dict) -> dict:
    """Load the weights of ``state`` (read from ``cfg.model.init_from``) into ``model``, built for ``cfg``.

    Returns the report kept in the run's checkpoints and summary: ``path``, ``weights`` (ema / student),
    ``iteration`` (of the checkpoint), ``num_classes`` (the checkpoint's) and ``reinitialised`` (the classifier
    keys left at their fresh initialisation, when the number of classes differs). A network that does not match
    is one MitosegError line listing the differing weights and the config keys behind them.
    """
    path = cfg.model.init_from
    source_cfg = checkpoint_config(state, path)
    weights = cfg.model.init_weights or validated_weights(state)
    key = {"ema": "ema_model", "student": "model"}[weights]
    source = state.get(key)
    if not isinstance(source, dict):
        raise MitosegError(f"{KEY}: {path} holds no '{weights}' weights (model.init_weights)")
    bad = non_finite_keys(source)
    if bad:
        raise MitosegError(f"{KEY}: the {weights} weights of {path} hold non-finite values (NaN or inf, e.g. "
                           f"{bad[0]}): its run diverged; start from an earlier checkpoint")
    reinitialised = []
    if source_cfg.data.num_classes != cfg.data.num_classes:
        reinitialised = list(model.classifier_keys())
    kept = {k: v for k, v in source.items() if k not in reinitialised}
    own = model.state_dict()
    wrong = [f"{k} {tuple(kept[k].shape)} -> {tuple(own[k].shape)}" for k in own
             if k in kept and tuple(kept[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in kept and k not in reinitialised]
    unexpected = [k for k in kept if k not in own]
    if not wrong and not unexpected:
        # strict=False: the load pre-hooks (an auxiliary BatchNorm made from the main one for checkpoints from
        # before MixBN) run first, and what is still missing afterwards is reported below.
        result = model.load_state_dict(kept, strict=False)
        missing = [k for k in result.missing_keys if k not in reinitialised]
    if wrong or missing or unexpected:
        parts = [f"{len(keys)} {label}: {_listed(keys)}" for label, keys in
                 (("missing from the checkpoint", missing), ("not in this network", unexpected),
                  ("with another shape", wrong)) if keys]
        differences = [d for d in architecture_differences(source_cfg, cfg) if not d.startswith("data.num_classes")]
        why = f"; the configs differ at {', '.join(differences)}" if differences else ""
        raise MitosegError(f"{KEY}: the network of {path} does not match this run's: " + "; ".join(parts) + why)
    return {"path": str(path), "weights": weights, "iteration": int(state.get("iteration", 0)),
            "num_classes": source_cfg.data.num_classes, "reinitialised": reinitialised}


def describe_initialisation(report: dict, num_classes: int) -> str:
    """The line a run prints when it starts from ``model.init_from``."""
    line = (f"model.init_from: the {report['weights']} weights of {report['path']} (iteration {report['iteration']})")
    if report["reinitialised"]:
        line += (f"; re-initialised for {num_classes} classes (the checkpoint has {report['num_classes']}): "
                 f"{', '.join(report['reinitialised'])}")
    return line


def _keep_statistics(module: nn.Module, args) -> None:
    """Forward pre-hook of a frozen BatchNorm: normalise with the running statistics and leave them alone,
    whatever mode the model was put in (methods switch the student between train and eval within a step)."""
    module.training = False


class PartFreezer:
    """``model.freeze`` of the student: the parts get no gradient and their BatchNorm layers keep their
    statistics while ``iteration < model.freeze_iters`` (always without it). :meth:`update` is called at the
    start of every step, so a resumed run is frozen or thawed exactly as the uninterrupted one."""

    def __init__(self, model: nn.Module, parts: list[str], until: int | None):
        modules = [module for part in parts for module in model.parts()[part]] if parts else []
        self.parts = list(parts)
        self.until = until
        self.params = [p for module in modules for p in module.parameters()]
        self.norms = [m for module in modules for m in module.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._handles: list = []
        self.active = False

    def frozen_at(self, iteration: int) -> bool:
        return bool(self.params) and (self.until is None or iteration < self.until)

    def update(self, iteration: int) -> bool:
        """Freeze or thaw for ``iteration``; True when this call thawed the parts."""
        frozen = self.frozen_at(iteration)
        if frozen == self.active:
            return False
        for p in self.params:
            p.requires_grad_(not frozen)
        if frozen:
            self._handles = [m.register_forward_pre_hook(_keep_statistics) for m in self.norms]
        else:
            for handle in self._handles:
                handle.remove()
            self._handles = []
        self.active = frozen
        return not frozen


def frozen_parameter_count(model: nn.Module, parts: list[str]) -> int:
    return sum(p.numel() for part in parts for module in model.parts()[part] for p in module.parameters())


__all__ = ["PartFreezer", "architecture_differences", "describe_initialisation", "frozen_parameter_count",
           "initialise_from_checkpoint", "read_init_checkpoint"]

