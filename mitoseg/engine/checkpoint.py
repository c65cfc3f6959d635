"""Checkpoints: written atomically, read without executing code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
``torch.load(..., weights_only=True)`` reads it: a file from a stranger cannot
run code. The run's config travels inside it (as a plain dict), so ``predict``
rebuilds the exact architecture.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from mitoseg import __version__
from mitoseg.atomic import remove_stale_temporaries, write_atomic
from mitoseg.config import Config, config_from_dict, input_channels
from mitoseg.errors import MitosegError
from mitoseg.networks import build_model

FORMAT = "mitoseg-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` to ``path`` via a temporary file (``.NAME.tmp-PID``, flushed to disk) and a rename:
    never a half-written file. On a full disk the previous ``path`` stays and the error is one line
    naming it; temporaries of killed runs writing ``path`` are removed first."""
    path = Path(path)
    remove_stale_temporaries(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "mitoseg_version": __version__, **state}
    kept = f"the previous {path.name} is kept" if path.exists() else None
    write_atomic(path, lambda handle: torch.save(payload, handle), kept=kept)


def weights_are_finite(*state_dicts: dict) -> bool:
    """Whether every floating-point tensor of the state dicts is finite (no NaN or inf): one host
    synchronisation for all of them."""
    flags = [torch.isfinite(t.detach()).all() for weights in state_dicts for t in weights.values()
             if torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    if not flags:
        return True
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def non_finite_keys(weights: dict) -> list[str]:
    """The keys of a state dict whose tensors hold NaN or inf values."""
    return [k for k, t in weights.items() if torch.is_tensor(t) and t.is_floating_point()
            and not bool(torch.isfinite(t).all())]


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a mitoseg checkpoint (weights only); clear errors for a missing, corrupt or foreign file."""
    path = Path(path)
    if path.is_dir():
        raise MitosegError(f"checkpoint {path} is a directory; name a checkpoint file (RUN/best.pt or RUN/last.pt)")
    if not path.is_file():
        raise MitosegError(f"checkpoint not found: {path}")
    from mitoseg.export.torchscript import is_torchscript_file

    if is_torchscript_file(path):
        raise MitosegError(f"{path} is a TorchScript file (mitoseg export), not a run's checkpoint: mitoseg predict "
                           "takes it; this command needs RUN/best.pt or RUN/last.pt")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:  # no permission, an I/O error: the file itself may be fine
        raise MitosegError(f"{path}: cannot read the checkpoint ({exc.strerror or exc})") from exc
    except Exception as exc:  # torch raises many kinds for corrupt, truncated or unsafe files
        # torch's own message advises weights_only=False, i.e. running the file's code: not advice to pass on.
        raise MitosegError(f"{path}: not a mitoseg checkpoint, or the file is damaged or truncated (it does not "
                           "read as plain tensors and numbers)") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MitosegError(f"{path}: not a mitoseg checkpoint")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise MitosegError(f"{path}: written by a newer mitoseg ({state.get('mitoseg_version')}); please upgrade")
    return state


def checkpoint_config(state: dict, path: str | Path) -> Config:
    try:
        return config_from_dict(state["config"])
    except (KeyError, MitosegError) as exc:
        raise MitosegError(f"{path}: checkpoint config is invalid: {exc}") from exc


def load_weights(model: torch.nn.Module, weights: dict, path: str | Path, what: str = "model") -> None:
    """``load_state_dict`` with one clear message when the architecture does not match."""
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        missing, unexpected = [], []
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


def validated_weights(state: dict) -> str:
    """The weights (``ema`` or ``student``) a checkpoint's run validated: those of its best score
    (``train.eval_model: best_of`` keeps the better one), else its ``train.eval_model``, else ``ema``."""
    best = state.get("best") or {}
    weights = (best.get("scores") or {}).get("weights")
    if weights in ("ema", "student"):
        return weights
    chosen = (state.get("config") or {}).get("train", {}).get("eval_model")
    return chosen if chosen in ("ema", "student") else "ema"


def model_from_checkpoint(path: str | Path, weights: str | None = None, device="cpu") -> tuple[torch.nn.Module, Config]:
    """Rebuild the network of a checkpoint and load its student or EMA weights (None: the weights its run
    validated, :func:`validated_weights`), in eval mode. A TorchScript file of ``mitoseg export --format
    torchscript`` works too: its traced network, with the run's config stored inside it."""
    from mitoseg.export.torchscript import is_torchscript_file, load_torchscript_model

    if is_torchscript_file(path):
        return load_torchscript_model(path, weights, device)
    return model_from_state(load_checkpoint(path), path, weights, device)


def model_from_state(state: dict, path: str | Path, weights: str | None = None,
                     device="cpu") -> tuple[torch.nn.Module, Config]:
    """:func:`model_from_checkpoint` of a checkpoint already read with :func:`load_checkpoint`."""
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
    from mitoseg.inference import fast_memory_format

    return fast_memory_format(model.to(device)).eval(), cfg


def capture_rng_state(device: torch.device | None = None) -> dict:
    """Every RNG a training step may touch, as weights-only-loadable values: Python's, NumPy's, torch's
    CPU generator and, on CUDA, the generator of ``device`` (this process's GPU)."""
    np_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda":
        if "cuda_device" in state:
            torch.cuda.set_rng_state(state["cuda_device"], device)
        elif "cuda" in state:  # checkpoints of mitoseg <= 0.1.0 held every GPU's generator
            torch.cuda.set_rng_state(state["cuda"][device.index or 0], device)
