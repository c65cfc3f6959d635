"""ONNX: the network through ``torch.onnx.export`` (the TorchScript-based exporter, else the torch.export-based
one, which needs ``onnxscript``), with dynamic batch and spatial axes, the run's settings as the model's metadata
property ``mitoseg`` (JSON), and the result checked with ONNX Runtime against PyTorch at a batch and size other
than the ones exported (within 1e-4)."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import torch

from mitoseg.atomic import write_atomic
from mitoseg.errors import MitosegError
from mitoseg.export.source import ExportSource, check_equal, metadata_json

TOLERANCE = 1e-4
OPSET = 18
INPUT_NAME = "input"


def _need_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise MitosegError(f"mitoseg export --format onnx needs onnx, onnxscript and onnxruntime ({exc.name} is "
                           "missing): pip install \"mitoseg[export]\" (in a clone: pip install -e \".[export]\")") from exc


@contextlib.contextmanager
def _quiet():
    """The exporter reports progress on stdout and warns about optional packages (torchvision) through
    logging; neither is the user's business."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# Tried in this order; the first whose ONNX Runtime output matches PyTorch's is kept. The TorchScript-based
# exporter (``dynamo=False``; deprecated since PyTorch 2.9, still there) exports mitoseg's networks 20-30x
# faster than the torch.export-based one and into smaller files; the latter takes over where the former fails
# or is gone.
EXPORTERS = ("torchscript", "dynamo")


def _export(exporter: str, source: ExportSource, module: torch.nn.Module, output_name: str) -> bytes:
    first, _ = source.example_sizes()
    example = source.example_input(first)
    if exporter == "dynamo":
        spatial = {axis: torch.export.Dim.DYNAMIC for axis in range(2, 2 + source.spatial_dims)}
        program = torch.onnx.export(module, (example,), dynamo=True,
                                    dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC, **spatial}},
                                    input_names=[INPUT_NAME], output_names=[output_name], opset_version=OPSET,
                                    verbose=False, optimize=True)
        return program.model_proto.SerializeToString()
    names = ["z", "y", "x"][-source.spatial_dims:]
    axes = {0: "batch", **{2 + i: name for i, name in enumerate(names)}}
    buffer = io.BytesIO()
    torch.onnx.export(module, (example,), buffer, dynamo=False, input_names=[INPUT_NAME], output_names=[output_name],
                      opset_version=OPSET, dynamic_axes={INPUT_NAME: axes, output_name: axes}, do_constant_folding=True)
    return buffer.getvalue()


def onnx_model_bytes(source: ExportSource, module: torch.nn.Module, metadata: dict | None,
                     output_name: str) -> bytes:
    """The serialized ONNX model of ``module`` (one input ``(b, c, [z,] y, x)``, every axis but c dynamic),
    checked with ONNX Runtime against PyTorch on another batch and size (within 1e-4), with ``metadata`` as
    the model's metadata property ``mitoseg``."""
    import warnings

    import onnx

    _need_onnx()
    module.eval()
    failures = []
    for exporter in EXPORTERS:
        try:
            with _quiet(), warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                data = _export(exporter, source, module, output_name)
            check_onnx(source, module, data)
        except Exception as exc:  # an exporter that cannot, or whose result differs: try the next one
            text = str(exc).strip()
            failures.append(f"{exporter} exporter: {text.splitlines()[0] if text else type(exc).__name__}")
            continue
        if metadata is None:
            return data
        model = onnx.load_from_string(data)
        onnx.helper.set_model_props(model, {"mitoseg": metadata_json(metadata)})
        return model.SerializeToString()
    raise MitosegError("ONNX: this network cannot be exported (" + "; ".join(failures) + ")")


def run_onnx(model: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def check_onnx(source: ExportSource, module: torch.nn.Module, model: bytes) -> None:
    """ONNX Runtime's output on a batch of 2 at the second example size equals PyTorch's within 1e-4."""
    _, second = source.example_sizes()
    check = source.example_input(second, batch=2, seed=1)
    with torch.no_grad():
        expected = module(check)
    got = torch.from_numpy(run_onnx(model, check.numpy()))
    check_equal("ONNX", got, expected, TOLERANCE)


def export_onnx(source: ExportSource, output: Path) -> dict:
    metadata = source.metadata(output="logits")
    from mitoseg.export.torchscript import Forward

    module = Forward(source.model).eval()
    model = onnx_model_bytes(source, module, metadata, "logits")
    write_atomic(output, lambda handle: handle.write(model))
    return metadata


def onnx_opset(model: bytes) -> int:
    import onnx

    proto = onnx.load_from_string(model)
    return max((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), default=OPSET)


def onnx_available() -> bool:
    try:
        _need_onnx()
    except MitosegError:
        return False
    return True


__all__ = ["export_onnx", "onnx_model_bytes", "check_onnx", "run_onnx", "onnx_available", "onnx_opset", "OPSET",
           "TOLERANCE"]
