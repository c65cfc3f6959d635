"""Checkpoints as training writes them: atomically, with the RNG states a bit-exact resume needs.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so
``torch.load(..., weights_only=True)`` reads it (:func:`mitoseg.runs.load_checkpoint`): a file from a
stranger cannot run code. The run's config travels inside it (as a plain dict), so ``predict``
rebuilds the exact architecture (:mod:`mitoseg.networks.loading`).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from mitoseg import __version__
from mitoseg.atomic import remove_stale_temporaries, write_atomic
from mitoseg.runs import CHECKPOINT_FORMAT, CHECKPOINT_VERSION


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` to ``path`` via a temporary file (``.NAME.tmp-PID``, flushed to disk) and a rename:
    never a half-written file. On a full disk the previous ``path`` stays and the error is one line
    naming it; temporaries of killed runs writing ``path`` are removed first."""
    path = Path(path)
    remove_stale_temporaries(path)
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "mitoseg_version": __version__,
               **state}
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
