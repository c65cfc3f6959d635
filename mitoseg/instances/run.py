"""The commands' side of instances: volumes on disk in, an instance volume and a measurement table out
(``mitoseg instances``, ``mitoseg predict --instances``), and instance scores (``mitoseg evaluate
--instances``). The work is in :mod:`segment`, :mod:`measure` and :mod:`metrics`."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from mitoseg.data.metadata import voxel_size_nm
from mitoseg.data.readers import VolumeWriter, open_volume, split_spec
from mitoseg.data.scratch import scratch_volumes
from mitoseg.errors import MitosegError
from mitoseg.instances.components import iter_slabs
from mitoseg.instances.measure import Measurements, measure_objects, write_table
from mitoseg.instances.metrics import instance_scores
from mitoseg.instances import AUTO_MIN_FRACTION
from mitoseg.instances.segment import InstanceOptions, segment_instances


def default_table_path(output: str) -> Path:
    """``INST_objects.csv`` next to the instance volume."""
    file_part = Path(split_spec(output)[0])
    stem = file_part.name.split(".")[0] or "instances"
    return file_part.with_name(f"{stem}_objects.csv")


def check_table_target(table: Path, overwrite: bool) -> None:
    """Refused before any work: a folder, another format, a Parquet table without pyarrow, a place that cannot be
    written (:func:`mitoseg.atomic.check_output_path`); an existing table is replaced only with --overwrite."""
    import importlib.util

    from mitoseg.atomic import check_output_path

    if table.is_dir():
        raise MitosegError(f"--table {table} is a folder; name a .csv or .parquet file")
    if table.suffix.lower() not in (".csv", ".parquet"):
        raise MitosegError(f"--table {table}: name a .csv or .parquet file")
    if table.suffix.lower() == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise MitosegError(f"--table {table}: writing Parquet needs pyarrow (pip install pyarrow); or name a .csv file")
    check_output_path(table, "--table")
    if table.exists() and not overwrite:
        raise MitosegError(f"{table} exists; pass --overwrite to replace it")


def mask_reader(volume, spec: str, threshold: float | None = None) -> Callable[[int, int], np.ndarray]:
    """The foreground of a mask volume, slab by slab (``read(start, stop)`` -> bool): the nonzero voxels of an
    integer or boolean mask (``-1 / 0`` included, as scikit-image's ``label`` reads them); of a floating-point
    one (probabilities, a resampled mask) the voxels above ``threshold``, which it then needs (one line
    otherwise: a float mask read as "nonzero" is the whole volume). NaN / inf voxels are refused, naming the
    slice."""
    kind = volume.dtype.kind
    if kind == "f" and threshold is None:
        raise MitosegError(f"{spec}: a floating-point mask ({volume.dtype}, e.g. probabilities); pass --threshold T "
                           "to take the values above T as foreground, or give an integer or boolean mask")
    if kind != "f" and threshold is not None:
        raise MitosegError(f"--threshold is for floating-point masks; {spec} holds {volume.dtype} labels "
                           "(their nonzero voxels are the foreground)")

    def read(start: int, stop: int) -> np.ndarray:
        values = np.asarray(volume.read(start, stop))
        if kind != "f":
            return values != 0
        finite = np.isfinite(values)
        if not finite.all():
            z = start + int(np.argwhere(~finite)[0][0])
            raise MitosegError(f"{spec}: slice {z} holds NaN or inf values; a mask needs a value in every voxel")
        return values > threshold

    return read


def foreground_reader(probabilities) -> Callable[[int, int], np.ndarray]:
    """The foreground probability (1 - background) of a (z, C, y, x) probability volume, slab by slab."""
    def read(start: int, stop: int) -> np.ndarray:
        return 1.0 - probabilities.read(start, stop)[:, 0].astype(np.float32)

    return read


def make_instances(read_labels: Callable[[int, int], np.ndarray], shape: tuple[int, int, int], output: str,
                   options: InstanceOptions, voxel_size=None, read_probability=None, table: Path | None = None,
                   overwrite: bool = False, progress: bool = True,
                   ngff_version: str | None = None) -> tuple[Measurements, Path]:
    """Instances of the foreground (``read_labels(start, stop)``: bool, or labels whose nonzero voxels it is), written as uint32 to ``output`` with
    their measurements in ``table`` (default ``INST_objects.csv``). Memory is bounded by the slab. An output
    named ``*.ome.zarr`` is an OME-Zarr label image (scale: ``voxel_size``; ``ngff_version`` 0.5 or 0.4)."""
    table = Path(table) if table is not None else default_table_path(output)
    check_table_target(table, overwrite)
    if options.split == "probability" and read_probability is None:
        raise MitosegError("--split probability needs the class probabilities: pass --probabilities")
    with scratch_volumes(Path(split_spec(output)[0]).parent) as scratch, \
            VolumeWriter(output, shape, np.uint32, overwrite=overwrite, voxel_size=voxel_size, labels=True,
                         ngff_version=ngff_version) as writer:
        segmented = segment_instances(lambda s, e: np.asarray(read_labels(s, e)) != 0, shape, options,
                                      spacing=voxel_size or (1.0, 1.0, 1.0), read_probability=read_probability,
                                      scratch=scratch, progress=progress)
        measurements = measure_objects(segmented.ids, segmented.count, voxel_size, read_probability,
                                       slab=options.slab, progress=progress)
        for start, stop in iter_slabs(shape[0], options.slab):
            writer.write(start, segmented.ids[start:stop])
    write_table(measurements, table)
    measurements.removed_note = removed_note(segmented, options)
    return measurements, table


def removed_note(segmented, options: InstanceOptions) -> str:
    """What the minimum object size removed, in one clause ('' when nothing was)."""
    if not segmented.removed:
        return ""
    why = (f"the default: {AUTO_MIN_FRACTION:.0%} of the typical object" if options.min_voxels is None
           else "--min-voxels")
    return (f"{segmented.removed} objects smaller than {segmented.min_voxels} voxels removed ({why}; "
            f"--min-voxels 0 keeps every object)")


def instances_command(prediction: str, output: str, options: InstanceOptions, probabilities: str | None = None,
                      voxel_size=None, table: str | None = None, overwrite: bool = False,
                      progress: bool = True, metadata_from: str | None = None,
                      ngff_version: str | None = None, threshold: float | None = None) -> None:
    """``mitoseg instances``: the voxel size (nm, z y x) as given, else from the metadata of ``metadata_from``
    (default: the prediction's file)."""
    with contextlib.ExitStack() as stack:
        labels = stack.enter_context(open_volume(prediction))
        read_probability = None
        if probabilities is not None:
            probs = stack.enter_context(open_volume(probabilities, channels=True))
            if len(probs.shape) != 4 or probs.shape[0] != labels.shape[0] or probs.shape[2:] != labels.shape[1:]:
                raise MitosegError(f"{probabilities}: probabilities of shape {probs.shape} do not match the "
                                   f"prediction {prediction} of shape {labels.shape} (expected (z, C, y, x))")
            read_probability = foreground_reader(probs)
        size, source = resolve_voxel_size(voxel_size, metadata_from or prediction)
        read_mask = mask_reader(labels, prediction, threshold)
        measurements, table_path = make_instances(read_mask, labels.shape, output, options, size, read_probability,
                                                  Path(table) if table else None, overwrite, progress,
                                                  ngff_version=ngff_version)
    report(measurements, output, table_path, source)


def resolve_voxel_size(given, spec: str):
    """(voxel size in nm or None, where it came from)."""
    if given is not None:
        if len(given) != 3 or any(not np.isfinite(v) or v <= 0 for v in given):
            raise MitosegError(f"--voxel-size needs three positive numbers (z y x, nm), got {list(given)}")
        return tuple(float(v) for v in given), "--voxel-size"
    stored = voxel_size_nm(spec)
    if stored is not None:
        return stored, f"{spec}'s metadata"
    return None, None


def report(measurements: Measurements, output: str, table: Path, source: str | None) -> None:
    unit = (f"voxel size from {source}" if source else
            "no voxel size in the file and no --voxel-size: volumes in voxels")
    print(f"wrote {output} and {table} ({unit})")
    print(measurements.summary())
    if measurements.removed_note:
        print(measurements.removed_note)


def read_instances(spec: str, kind: str, slab: int, stack: contextlib.ExitStack, progress: bool):
    """(read, shape) of an instance volume; a semantic one (``kind`` semantic, or auto with values 0 / 1 only)
    is labelled into 3-D components first (in a scratch file). Object ids are integers: a floating-point
    volume, or one with NaN or negative values, is refused."""
    volume = stack.enter_context(open_volume(spec))
    if volume.dtype.kind == "f":
        raise MitosegError(f"{spec}: a floating-point volume ({volume.dtype}); objects and masks are integer or "
                           "boolean volumes (mitoseg instances --threshold T makes objects of probabilities)")
    if volume.dtype.kind == "i" and min(int(volume.read(s, e).min(initial=0))
                                        for s, e in iter_slabs(len(volume), slab)) < 0:
        raise MitosegError(f"{spec}: negative values; object ids and mask values are 0 (background) or positive")
    if kind == "auto":
        highest = max(int(volume.read(s, e).max(initial=0)) for s, e in iter_slabs(len(volume), slab))
        kind = "semantic" if highest <= 1 else "instance"
    if kind == "instance":
        return volume.read, volume.shape
    scratch = stack.enter_context(scratch_volumes(tempfile.gettempdir()))
    # Every component is an object here (a reference or a mask to score): no minimum size.
    ids = segment_instances(lambda s, e: volume.read(s, e) > 0, volume.shape, InstanceOptions(slab=slab, min_voxels=0),
                            scratch=scratch, progress=progress).ids
    return (lambda s, e: ids[s:e]), volume.shape


def evaluate_instances(prediction: str, label: str, probabilities: str | None = None, prediction_kind: str = "auto",
                       label_kind: str = "auto", slab: int = 16, progress: bool = True) -> dict:
    """Object scores of ``prediction`` against ``label`` (:func:`mitoseg.instances.metrics.instance_scores`)."""
    with contextlib.ExitStack() as stack:
        read_pred, shape = read_instances(prediction, prediction_kind, slab, stack, progress)
        read_truth, truth_shape = read_instances(label, label_kind, slab, stack, progress)
        if shape != truth_shape:
            raise MitosegError(f"{prediction}: shape {shape} differs from label {label} shape {truth_shape}")
        read_probability = None
        if probabilities is not None:
            probs = stack.enter_context(open_volume(probabilities, channels=True))
            if len(probs.shape) != 4 or probs.shape[0] != shape[0] or probs.shape[2:] != shape[1:]:
                raise MitosegError(f"{probabilities}: probabilities of shape {probs.shape} do not match {shape}")
            read_probability = foreground_reader(probs)
        scores = instance_scores(read_pred, read_truth, shape[0], slab, read_probability, progress)
    return {"prediction": prediction, "label": label, **scores}
