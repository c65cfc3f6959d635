"""What every export starts from: a run's checkpoint, read without executing code, its network rebuilt on
the CPU in float32 (eval mode, the default memory layout), its config, and the metadata that travels with
each exported file (so ``mitoseg predict`` can use a TorchScript file with the run's settings)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from mitoseg import __version__
from mitoseg.config import Config, config_to_dict, input_channels, size_multiple
from mitoseg.errors import MitosegError
from mitoseg.networks.loading import model_from_state
from mitoseg.runs import EXPORT_FORMAT, EXPORT_VERSION, json_safe, load_checkpoint, validated_weights



@dataclass
class ExportSource:
    """A checkpoint's network (float32, CPU, eval mode), its run config and where they came from."""

    model: torch.nn.Module
    cfg: Config
    state: dict
    weights: str  # "ema" or "student"
    checkpoint: Path

    @property
    def spatial_dims(self) -> int:
        return self.cfg.model.spatial_dims

    @property
    def in_channels(self) -> int:
        return input_channels(self.cfg)

    @property
    def num_classes(self) -> int:
        return self.cfg.data.num_classes

    @property
    def size_step(self) -> int:
        """Input sizes along each spatial axis are multiples of this: ``config.size_multiple`` for the U-Nets, a
        DeepLabV3+'s output stride (it runs at any size, but its features then align with the input's)."""
        if self.cfg.model.name == "deeplabv3plus":
            return self.cfg.model.output_stride
        return size_multiple(self.cfg.model)

    @property
    def axes(self) -> str:
        """The input's axes: ``bcyx`` (2-D, the 2.5-D context as channels) or ``bczyx`` (3-D)."""
        return "bczyx" if self.spatial_dims == 3 else "bcyx"

    def example_input(self, spatial: tuple[int, ...], batch: int = 1, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch, self.in_channels, *spatial, generator=generator)

    def example_sizes(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Two different spatial sizes (valid for the network): the one a trace or export sees, and another one
        its result is checked on, so a size baked into the exported graph shows up as a mismatch."""
        step = self.size_step
        base = max(2 * step, 32)
        if self.spatial_dims == 3:
            return (base, base, base), (base + step, base, base + 2 * step)
        return (base, base), (base + step, base + 3 * step)

    @property
    def pixel_size_nm(self) -> float | None:
        """The model's working in-plane pixel size in nm (``data.pixel_size``, resolved when the run started;
        None: the training volume's own grid, or a factor ``"Nx"`` of a volume without a stored pixel size)."""
        from mitoseg.inference.session import recorded_pixel_size

        return recorded_pixel_size(self.state, self.cfg).nm

    def metadata(self, output: str = "logits") -> dict:
        """The run's settings an exported file carries: the whole resolved config (normalisation,
        2.5-D context, inference and post-processing settings), which weights, from which checkpoint."""
        best = self.state.get("best") or {}
        return {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_VERSION,
            "mitoseg_version": __version__,
            "checkpoint": str(self.checkpoint),
            "iteration": self.state.get("iteration"),
            "best": {k: best.get(k) for k in ("iteration", "metric", "value")} if best else None,
            "weights": self.weights,
            "axes": self.axes,
            "input_channels": self.in_channels,
            "num_classes": self.num_classes,
            "output": output,
            # predict rescales an input of another pixel size to this (with data.pixel_size in the config)
            "pixel_size_nm": self.pixel_size_nm,
            "config": config_to_dict(self.cfg),
        }


def load_source(checkpoint: str | Path, weights: str | None = None) -> ExportSource:
    """Read ``checkpoint`` (``torch.load(weights_only=True)``), rebuild its network with the chosen weights
    (None: those its run validated) on the CPU in float32."""

    checkpoint = Path(checkpoint)
    state = load_checkpoint(checkpoint)
    weights = weights or validated_weights(state)
    model, cfg = model_from_state(state, checkpoint, weights, device="cpu")
    # model_from_state gives the fast channels-last layout of 2-D models; exported graphs use the default one.
    model = model.to(memory_format=torch.contiguous_format).float().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return ExportSource(model=model, cfg=cfg, state=state, weights=weights, checkpoint=checkpoint)


def metadata_json(metadata: dict) -> str:
    return json.dumps(json_safe(metadata), indent=2, sort_keys=True)


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def check_equal(what: str, got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Refuse an export whose output differs from the PyTorch model's (shape or values)."""
    if tuple(got.shape) != tuple(expected.shape):
        raise MitosegError(f"{what}: the exported model's output has shape {tuple(got.shape)}, PyTorch's "
                           f"{tuple(expected.shape)}; this network cannot be exported to this format")
    difference = max_difference(got, expected)
    if not difference <= tolerance:  # also catches NaN
        raise MitosegError(f"{what}: the exported model's output differs from PyTorch's by up to {difference:.3g} "
                           f"(tolerance {tolerance:g}); this network cannot be exported to this format")
