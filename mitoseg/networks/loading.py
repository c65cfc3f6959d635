"""A trained network rebuilt from a file: a run's checkpoint (its config rebuilds the architecture, its student
or EMA weights are loaded) or an exported TorchScript file (wrapped so it looks like a run's model). The files'
names and reading are :mod:`mitoseg.runs`; this is the step from what they hold to a ``torch.nn.Module``."""

from __future__ import annotations

import os

import torch
from torch import nn

from mitoseg.config import Config, config_from_dict, input_channels
from mitoseg.device import fast_memory_format
from mitoseg.errors import MitosegError
from mitoseg.networks.registry import build_model
from mitoseg.runs import checkpoint_config, is_torchscript_file, load_checkpoint, read_torchscript, validated_weights


def non_finite_keys(weights: dict) -> list[str]:
    """The keys of a state dict whose tensors hold NaN or inf values."""
    return [k for k, t in weights.items() if torch.is_tensor(t) and t.is_floating_point()
            and not bool(torch.isfinite(t).all())]


def load_weights(model: nn.Module, weights: dict, path: str | os.PathLike, what: str = "model") -> None:
    """``load_state_dict`` with one clear message when the architecture does not match."""
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        own = model.state_dict()
        missing = [k for k in own if k not in weights]
        unexpected = [k for k in weights if k not in own]
        mismatched = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        detail = "; ".join(parts) or str(exc).splitlines()[0]
        raise MitosegError(f"{path}: {what} weights do not match the architecture: {detail}") from exc


def model_from_state(state: dict, path: str | os.PathLike, weights: str | None = None,
                     device="cpu") -> tuple[nn.Module, Config]:
    """The network of a checkpoint already read with :func:`mitoseg.runs.load_checkpoint`, with its student or
    EMA weights (None: those its run validated, :func:`mitoseg.runs.validated_weights`), in eval mode."""
    cfg = checkpoint_config(state, path)
    weights = weights or validated_weights(state)
    key = {"ema": "ema_model", "student": "model"}[weights]
    if key not in state:
        raise MitosegError(f"{path}: checkpoint holds no '{weights}' weights")
    if not isinstance(state[key], dict):
        raise MitosegError(f"{path}: not a mitoseg checkpoint (its '{weights}' weights are not a state dict)")
    bad = non_finite_keys(state[key])
    if bad:
        raise MitosegError(f"{path}: the {weights} weights hold non-finite values (NaN or inf, e.g. {bad[0]}): "
                           "the run diverged; use an earlier checkpoint or train again with a lower optim.lr")
    model = build_model(cfg.model, cfg.data.num_classes, input_channels(cfg))
    load_weights(model, state[key], path, what=weights)
    return fast_memory_format(model.to(device)).eval(), cfg


class TorchScriptSegmenter(nn.Module):
    """An exported TorchScript network as the predictor sees a run's model (``spatial_dims``, logits)."""

    def __init__(self, module: torch.jit.ScriptModule, spatial_dims: int, num_classes: int):
        super().__init__()
        self.module = module
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def load_torchscript(path: str | os.PathLike, weights: str | None = None, device="cpu"):
    """(model, config, metadata) of an exported TorchScript file: the model in eval mode on ``device``, the run's
    config as it was exported, its ``mitoseg.json`` (weights, iteration, the model's ``pixel_size_nm``)."""
    module, metadata = read_torchscript(path, map_location=device)
    if weights is not None and weights != metadata.get("weights"):
        raise MitosegError(f"{path}: this TorchScript file holds the {metadata.get('weights')} weights only "
                           f"(--weights {weights} asked for the other ones; export them with --weights {weights})")
    try:
        cfg = config_from_dict(metadata["config"])
    except MitosegError as exc:
        raise MitosegError(f"{path}: the config stored in the TorchScript file is invalid: {exc}") from exc
    model = TorchScriptSegmenter(module, cfg.model.spatial_dims, cfg.data.num_classes)
    return model.to(device).eval(), cfg, metadata


def model_from_checkpoint(path: str | os.PathLike, weights: str | None = None,
                          device="cpu") -> tuple[nn.Module, Config]:
    """Rebuild the network of a run's checkpoint and load its student or EMA weights (None: those its run
    validated), in eval mode; a TorchScript file of ``mitoseg export --format torchscript`` works too (its
    traced network, with the run's config stored inside it)."""
    if is_torchscript_file(path):
        model, cfg, _ = load_torchscript(path, weights, device)
        return model, cfg
    return model_from_state(load_checkpoint(path), path, weights, device)
