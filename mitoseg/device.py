"""The torch device of a command or run (``device: auto | cpu | cuda | cuda:N``), its mixed precision and the
memory layout of its networks: on the ground floor, so that prediction, the napari plugin and training resolve
them the same way without importing each other. (Threads: :mod:`mitoseg.threads`, which the CLI applies before
torch is imported.)"""

from __future__ import annotations

import contextlib
import functools

import torch

from mitoseg.errors import MitosegError


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; a named device must exist (one-line error otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MitosegError(f"config key 'device': unknown device {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MitosegError(f"config key 'device': {name!r} requested but CUDA is not available")
    return device

@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where oneDNN's bf16
    convolutions run 2-3x faster than float32. Elsewhere bf16 would be emulated, and slower."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:  # not Linux
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast type of mixed precision (``train.amp``) on ``device``: float16 on CUDA, bfloat16
    on a CPU with native bf16, None (full precision) otherwise or when ``enabled`` is false."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, enabled: bool):
    """Mixed precision where :func:`amp_dtype` offers it, else a no-op context."""
    dtype = amp_dtype(device, enabled)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def fast_memory_format(model: torch.nn.Module) -> torch.nn.Module:
    """Channels-last weights for 2-D models, the fast layout of oneDNN's and cuDNN's convolutions (1.4x for
    the 2-D U-Net on the CPU); the numbers are those of the default layout up to float rounding. 3-D models
    keep the default layout: oneDNN's bfloat16 3-D convolutions in channels-last are not deterministic
    (a resumed run would drift from the uninterrupted one). Returns ``model``."""
    if getattr(model, "spatial_dims", 2) == 2:
        model = model.to(memory_format=torch.channels_last)
    return model
