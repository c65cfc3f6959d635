"""TorchScript: the network traced with dynamic batch and spatial sizes, and the run's settings inside.

The file holds the traced network (input ``(b, c, y, x)``, or ``(b, c, z, y, x)`` for 3-D; output the class
logits at the input's size, as the PyTorch model's ``forward``) and, as the extra file ``mitoseg.json``
(``torch.jit.save(_extra_files=...)``), the run's resolved config and where the weights came from, so
``mitoseg predict --checkpoint model.pt`` normalises, adds the 2.5-D context, windows, augments (TTA) and
post-processes as the run's own checkpoint would (reading it back: :func:`mitoseg.runs.read_torchscript`,
:func:`mitoseg.networks.loading.load_torchscript`). A TorchScript file runs TorchScript operations only: loading
one executes no Python code from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from mitoseg.atomic import write_atomic
from mitoseg.export.source import ExportSource, check_equal, metadata_json
from mitoseg.runs import EXPORT_METADATA

TOLERANCE = 1e-4


class Probabilities(nn.Module):
    """A network followed by the softmax over its classes (the bioimage.io package's output)."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.network(x), dim=1)


class Forward(nn.Module):
    """``model(x)`` only: tracing sees the plain forward pass, not the methods' keyword options."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def trace(source: ExportSource, probabilities: bool = False) -> torch.jit.ScriptModule:
    """The network traced on a random input, then checked on another batch and spatial size against the
    PyTorch model (within 1e-4): a size the trace baked in would show up as a wrong shape or values."""
    import warnings

    module = Probabilities(source.model) if probabilities else Forward(source.model)
    module.eval()
    first, second = source.example_sizes()
    example = source.example_input(first)
    with torch.no_grad(), warnings.catch_warnings():
        # Python conditions on tensor shapes (e.g. "resize only when the sizes differ") are recorded as taken;
        # the check below is what proves the trace right at other sizes. PyTorch 2.13 calls TorchScript
        # deprecated (and still runs it): not the user's concern.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(module, example, check_trace=False)
        check = source.example_input(second, batch=2, seed=1)
        check_equal("TorchScript", traced(check), module(check), TOLERANCE)
    return traced


def save_torchscript(traced: torch.jit.ScriptModule, path: str | os.PathLike, metadata: dict) -> None:
    """``torch.jit.save`` with ``mitoseg.json`` as an extra file, written atomically."""
    import warnings

    extra = {EXPORT_METADATA: metadata_json(metadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "torch.jit.save is deprecated" (PyTorch 2.13)
        write_atomic(Path(path), lambda handle: torch.jit.save(traced, handle, _extra_files=extra))


def export_torchscript(source: ExportSource, output: Path) -> dict:
    traced = trace(source)
    metadata = source.metadata(output="logits")
    save_torchscript(traced, output, metadata)
    return metadata
