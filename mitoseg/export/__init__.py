"""Exporting a trained run: TorchScript, ONNX and bioimage.io model packages (``mitoseg export``).

- ``source.py``: the checkpoint read (``torch.load(weights_only=True)``), its network on the CPU in float32, the
  run's settings that travel with every exported file (``mitoseg.json``).
- ``torchscript.py``: the traced network (dynamic batch and spatial sizes; the run's settings as the extra file
  ``mitoseg.json``), and reading such a file back for ``mitoseg predict`` (``load_torchscript_model``).
- ``onnx_export.py``: ``torch.onnx.export`` (dynamo) with dynamic axes, checked with ONNX Runtime.
- ``bioimageio_package.py``: the bioimage.io model package (spec 0.5), validated and tested with
  bioimageio.spec / bioimageio.core when written; ``unet_architecture.py`` is its standalone U-Net source
  (PyTorch + MONAI), ``library.py`` the architecture of other networks from an installed mitoseg.

Every output is written atomically (a hidden temporary renamed into place) and each exported network is checked
against the PyTorch model on a random input of another size (within 1e-4) before it is written.
"""

from __future__ import annotations

from pathlib import Path

from mitoseg.errors import MitosegError

FORMATS = ("bioimageio", "torchscript", "onnx")


def export_checkpoint(checkpoint: str | Path, fmt: str, output: str | Path, weights: str | None = None,
                      overwrite: bool = False, name: str | None = None, authors: list[str] | None = None) -> dict:
    """Export ``checkpoint`` to ``output`` in ``fmt`` (one of :data:`FORMATS`); returns what was written (the
    metadata of TorchScript / ONNX files, a report of the package)."""
    import os

    from mitoseg.atomic import check_output_path, make_folder, remove_stale_temporaries
    from mitoseg.export.source import load_source

    if fmt not in FORMATS:
        raise MitosegError(f"--format must be one of {', '.join(FORMATS)}, got {fmt}")
    output = Path(output)
    check_output_path(output, "--output")
    if fmt != "bioimageio":
        if output.is_dir():
            raise MitosegError(f"--output {output} is a directory; name the file to write")
        if os.path.lexists(output) and not overwrite:
            raise MitosegError(f"{output} exists; pass --overwrite to replace it")
    elif os.path.lexists(output) and not overwrite:
        raise MitosegError(f"{output} exists; pass --overwrite to replace it")
    if fmt == "onnx":
        from mitoseg.export.onnx_export import _need_onnx

        _need_onnx()
    if fmt == "bioimageio":
        from mitoseg.export.bioimageio_package import _need_bioimageio

        _need_bioimageio()
    source = load_source(checkpoint, weights)
    if fmt == "bioimageio":
        from mitoseg.export.bioimageio_package import export_bioimageio

        return export_bioimageio(source, output, name=name, authors=authors, overwrite=overwrite)
    make_folder(output.parent, "--output")
    remove_stale_temporaries(output)
    if fmt == "torchscript":
        from mitoseg.export.torchscript import export_torchscript

        return export_torchscript(source, output)
    from mitoseg.export.onnx_export import export_onnx

    return export_onnx(source, output)


__all__ = ["FORMATS", "export_checkpoint"]
