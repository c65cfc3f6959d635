"""The ``mitoseg`` command: sample-data, configs, init, train, predict, evaluate, instances, view, export.

Input problems raise :class:`MitosegError`; ``main`` prints them as one line on
stderr and returns 2 (``--debug`` re-raises to show the traceback). Arguments,
configs, input files and outputs are checked before torch and MONAI are imported
(each command imports them only once its checks pass), so an input error costs
well under a second (``benchmarks/bench_cli_errors.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
from pathlib import Path

from mitoseg import __version__
from mitoseg.config import config_to_dict, input_channels, size_multiple, size_multiple_reason
from mitoseg.errors import MitosegError
from mitoseg.instances import AUTO_MIN_FRACTION, SEED_DEPTH
from mitoseg.runs import LAST, RUN_DIRS, RUN_FILES

EXAMPLES = """\
examples:
  mitoseg sample-data
  mitoseg configs
  mitoseg train --config sample_supervised --out runs/sample
  mitoseg init --image stack.tif --label labels.tif --output my.yaml
  mitoseg predict --checkpoint runs/sample/best.pt --input sample_data/val_image.tif --output pred.tif
  mitoseg evaluate --prediction pred.tif --label sample_data/val_label.tif
  mitoseg evaluate --checkpoint runs/pascal_daw/best.pt --eval-mode center_crop
  mitoseg view runs/sample_daw --image sample_data/val_image.tif
  mitoseg export --checkpoint runs/sample/best.pt --format bioimageio --output sample_model.zip
"""


# ----------------------------------------------------------------- commands


def cmd_sample_data(args) -> None:
    from mitoseg.data.synthetic import write_sample_data

    paths = write_sample_data(args.out_dir, seed=args.seed, overwrite=args.overwrite)
    for path in paths.values():
        print(path)


def cmd_configs(args) -> None:
    """``mitoseg configs``: the built-in configs, one line each; ``configs show NAME``: one of them."""
    from mitoseg.config import builtin_configs, config_description, config_reference, resolve_config_path

    if args.action == "keys":
        print(config_reference(), end="")
        return
    if args.action is None:
        configs = builtin_configs()
        width = max(map(len, configs))
        for name, path in configs.items():
            print(f"{name:<{width}}  {config_description(path)}")
        print("\nmitoseg configs show NAME prints one (to start your own); mitoseg train --config NAME trains it")
        return
    if args.action != "show" or args.name is None:
        raise MitosegError("usage: mitoseg configs [show NAME | keys]")
    sys.stdout.write(resolve_config_path(args.name).read_text())


def cmd_init(args) -> None:
    from mitoseg.init_config import init_command

    init_command(args.image, args.label, args.method, "cuda" if args.gpu else "cpu" if args.cpu else None,
                 args.output, args.overwrite)


# The built-in sample configs read sample_data/ relative to where mitoseg runs; a pip user has no such
# folder, so `train --config sample_daw` writes it there first (the same files as `mitoseg sample-data`).
SAMPLE_DIR = "sample_data"


def ensure_sample_data(cfg, config_name: str | None) -> None:
    """For a built-in ``sample_*`` config whose ``sample_data/`` files are all missing: write them."""
    if config_name is None or not config_name.startswith("sample_") or cfg.data.kind != "em":
        return
    from mitoseg.data.synthetic import SAMPLE_FILES, write_sample_data

    specs = [vol for vol in [cfg.data.train, cfg.data.val, cfg.data.test, *(cfg.data.unlabeled or [])]
             if vol is not None]
    files = {Path(part) for vol in specs for part in (vol.image, vol.label) if part}
    sample = {Path(SAMPLE_DIR) / name for name in SAMPLE_FILES.values() if name.endswith(".tif")}
    if not files or not files <= sample or any(path.exists() for path in sample):
        return
    write_sample_data(SAMPLE_DIR, seed=0)
    print(f"{SAMPLE_DIR}/ was not here: wrote the synthetic sample data into it (as mitoseg sample-data)")


def check_checkpoint_file(path, flag: str = "--checkpoint") -> None:
    """A missing checkpoint, before torch is imported (the messages of ``checkpoint.load_checkpoint``)."""
    path = Path(path)
    if path.is_dir():
        raise MitosegError(f"checkpoint {path} is a directory; name a checkpoint file (RUN/best.pt or RUN/last.pt)")
    if not path.is_file():
        raise MitosegError(f"checkpoint not found: {path}")
    import zipfile

    # torch.save and torch.jit.save write zip archives: anything else cannot be a model, and saying so needs
    # no torch import.
    if not zipfile.is_zipfile(path):
        if path.suffix.lower() == ".onnx":
            raise MitosegError(f"{path} is an ONNX export (mitoseg export --format onnx), for ONNX Runtime and "
                               "other tools; mitoseg takes the run's checkpoint (RUN/best.pt) or a TorchScript "
                               "export (--format torchscript)")
        raise MitosegError(f"{path}: not a mitoseg checkpoint, or the file is damaged or truncated (it is not a "
                           "PyTorch file); name RUN/best.pt, RUN/last.pt or a TorchScript export")


def check_input_volume(spec: str) -> None:
    """A missing input volume, before torch is imported (the message of ``readers.open_volume``)."""
    from mitoseg.data.readers import split_spec

    if not Path(split_spec(spec)[0]).exists():
        raise MitosegError(f"{spec}: no such file or directory")


# Floating-point inputs up to this size are checked for NaN / inf whole before torch is imported; larger ones
# on evenly spaced slices (the prediction checks every slab it reads anyway).
WHOLE_CHECK_BYTES = 2 * 2**30


def check_input_content(spec: str) -> tuple[int, ...]:
    """The input's content, before torch is imported (refusals in well under a second): the volume opens (an empty
    slice folder, a truncated TIFF, a wrong shape or dtype are one line), and a floating-point one holds no NaN /
    inf (every slice up to WHOLE_CHECK_BYTES, else evenly spaced ones). Returns its shape."""
    import numpy as np

    from mitoseg.data.readers import open_volume

    with open_volume(spec, finite=True) as volume:
        if volume.dtype.kind == "f":
            z = len(volume)
            size = int(np.prod(volume.shape)) * volume.dtype.itemsize
            if size <= WHOLE_CHECK_BYTES:
                for start in range(0, z, 16):
                    volume.read(start, min(z, start + 16))
            else:
                count = max(2, int(z * WHOLE_CHECK_BYTES / size))
                for index in sorted({int(i) for i in np.linspace(0, z - 1, num=count)}):
                    volume.read(index, index + 1)
        return tuple(volume.shape)


def check_output_volume(spec: str | None, flag: str, overwrite: bool) -> None:
    """An output that exists (without --overwrite), or under a regular file, before any work is done (the
    messages of ``readers.VolumeWriter``, which checks again when it opens)."""
    from mitoseg.atomic import check_output_path
    from mitoseg.data.readers import split_spec

    if not spec:
        return
    file = split_spec(spec)[0]
    check_output_path(file, flag)
    from mitoseg.data.paths import WRITABLE, ZARR_SUFFIX, file_suffix

    if Path(file).is_dir() and file_suffix(file) != ZARR_SUFFIX:
        raise MitosegError(f"{file} is a directory; name the file to write ({WRITABLE})")
    if Path(file).exists() or Path(file).is_symlink():
        if not overwrite:
            raise MitosegError(f"{file} exists; pass --overwrite to replace it")


def threads_from(args) -> None:
    """Apply the resolved ``--threads`` / ``MITOSEG_THREADS`` (checked in ``main``) to torch."""
    from mitoseg.threads import apply_threads

    if getattr(args, "threads_count", None) is not None:
        apply_threads(args.threads_count)


def remove_run_outputs(out_dir: Path) -> list[Path]:
    """Delete the files and folders of a previous run in ``out_dir``; returns what was removed.

    Everything is checked before anything is deleted, so a refusal leaves the old run whole.
    """
    found = []
    for name in RUN_FILES + RUN_DIRS:
        path = out_dir / name
        if not (path.exists() or path.is_symlink()):
            continue
        # A link is removed as a link: its target is not part of the run.
        is_dir = path.is_dir() and not path.is_symlink()
        if is_dir and name in RUN_FILES:
            raise MitosegError(f"{path} is a folder, but a run writes a file there; --overwrite only "
                               "removes a run's own files, so move it away first")
        if not is_dir and not path.is_symlink() and name in RUN_DIRS:
            raise MitosegError(f"{path} is a file, but a run writes a folder there; --overwrite only "
                               "removes a run's own files, so move it away first")
        found.append((path, is_dir))
    for path, is_dir in found:
        if is_dir:
            shutil.rmtree(path)
        else:
            path.unlink()
    return [path for path, _ in found]


def cmd_train(args) -> None:
    from mitoseg.config import builtin_config_name, config_from_dict, load_config
    from mitoseg.data.factory import check_paths_exist

    if args.config is None and not args.resume:
        raise MitosegError("train needs --config (or --resume --out RUN to continue a run)")
    if args.config is None and args.out is None:
        raise MitosegError("train --resume needs --out RUN: the run directory to continue (or --config, "
                           "for the default runs/<config name>)")
    if args.resume and args.overwrite:
        raise MitosegError("--resume continues the run in --out and --overwrite deletes it: pass only one")
    out_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if out_dir.exists() and not out_dir.is_dir():
        raise MitosegError(f"--out {out_dir} is a file, not a directory")
    from mitoseg.atomic import check_output_path

    check_output_path(out_dir, "--out")  # FILE/run: a parent that is a file
    # Under torchrun every rank checks --out before any rank writes into it (no rank writes before all
    # have joined the process group in distributed.setup).
    if not args.resume and not args.overwrite and out_dir.exists() and any(out_dir.iterdir()):
        raise MitosegError(f"output directory {out_dir} exists and is not empty; pass --overwrite to replace "
                           "its run files or --resume to continue its run")
    if args.config is not None:
        cfg = load_config(args.config, args.set)
        ensure_sample_data(cfg, builtin_config_name(args.config))
    else:
        check_checkpoint_file(out_dir / LAST)
        from mitoseg.runs import load_checkpoint

        state = load_checkpoint(out_dir / LAST)
        from mitoseg.config import apply_overrides
        cfg = config_from_dict(apply_overrides(state["config"], args.set))
    check_paths_exist(cfg)
    threads_from(args)
    from mitoseg import distributed

    info = distributed.setup(cfg.device)
    distributed.barrier()
    from mitoseg.engine.trainer import Trainer

    trainer = Trainer(cfg, out_dir, resume=args.resume, max_iters=args.max_iters, progress=not args.no_progress,
                      max_minutes=args.max_minutes)
    # Only now, with the data read and the model built (errors in either end the command
    # before this point), is the old run deleted: a failed start leaves it intact.
    if args.overwrite and info.is_main and out_dir.is_dir():
        remove_run_outputs(out_dir)
    distributed.barrier()
    summary = trainer.fit()
    distributed.cleanup()
    if not info.is_main:
        return
    if summary["final"] is not None:
        from mitoseg.metrics import format_table

        # The loop validates when it stops, so these are the scores of the final weights (last.pt, measured
        # with train.eval_model); best.pt's are in summary.json.
        print(f"validation at iteration {summary['iterations']}:")
        print(format_table(summary["final"]))
    if summary.get("test") is not None:
        from mitoseg.metrics import format_table

        test = summary["test"]
        print(f"test ({test['image']}, {test['slices']} slices) with best.pt from iteration {test['iteration']}:")
        print(format_table(test))
    best = summary["best"]
    line = f"done: {summary['iterations']}/{summary['total_iterations']} iterations in {summary['wall_time_s']:.0f} s"
    if best is not None:
        line += f"; best {best['metric']} = {best['value']:.4f} at iteration {best['iteration']}"
    print(line)
    print(f"outputs in {out_dir}")


def cmd_predict(args) -> None:
    import numpy as np

    from mitoseg.data.readers import VolumeWriter, open_volume, split_spec
    from mitoseg.data.scratch import scratch_volumes

    # Everything that can be checked without torch first: the input, the checkpoint, the outputs.
    check_input_volume(args.input)
    check_checkpoint_file(args.checkpoint)
    for flag, spec in (("--output", args.output), ("--probabilities", args.probabilities)):
        check_output_volume(spec, flag, args.overwrite)
    if args.instances:  # the objects' volume, table and options too: a refusal must come before the prediction
        instance_options(args)
        check_instance_outputs(args.instances, args.table, args.overwrite, "--instances")
    from mitoseg.data.ngff import resolve_level

    args.input = resolve_level(args.input, args.level)  # --level N: that level of an OME-Zarr image
    check_dask_options(args)
    z, y, x = check_input_content(args.input)[:3]
    # Room for the uncompressed TIFF outputs (labels uint8, probabilities float16 of at least 2 classes).
    from mitoseg.atomic import check_output_path
    from mitoseg.data.paths import TIFF_SUFFIXES, file_suffix

    for spec, per_voxel, flag in ((args.output, 1, "--output"), (args.probabilities, 4, "--probabilities")):
        if spec and file_suffix(spec) in TIFF_SUFFIXES:
            check_output_path(spec, flag, size=z * y * x * per_voxel)
    threads_from(args)
    from mitoseg.data.resample import volume_pixel_nm
    from mitoseg.inference.session import Segmenter, input_scale

    # With --dask the workers run the model (each resolves --device); here the checkpoint is only checked.
    segmenter = Segmenter.from_file(args.checkpoint, weights=args.weights,
                                    device=args.device if args.dask is None else "cpu")
    cfg = segmenter.cfg
    inference = cfg.inference
    for key in ("overlap", "slab", "sw_batch_size", "blend", "tta", "min_object_voxels", "fill_holes"):
        value = getattr(args, key)
        if value is not None:
            setattr(inference, key, value)
    if args.roi_size is not None:
        if len(args.roi_size) != cfg.model.spatial_dims:
            axes = "Z Y X" if cfg.model.spatial_dims == 3 else "Y X"
            raise MitosegError(f"--roi-size needs {cfg.model.spatial_dims} values ({axes}) for {args.checkpoint}'s "
                               f"{cfg.model.spatial_dims}-D model, got {args.roi_size}")
        # As data.patch_size / inference.roi_size in a config: windows the U-Net cannot halve evenly are
        # padded inside every forward pass (a 7 x 7 window costs as much as a 32 x 32 one).
        factor = size_multiple(cfg.model)
        if any(size % factor for size in args.roi_size):
            raise MitosegError(f"--roi-size must be multiples of {factor} ({size_multiple_reason(cfg.model)} of "
                               f"{args.checkpoint}), got {' '.join(map(str, args.roi_size))}")
        inference.roi_size = list(args.roi_size)
    num_classes = cfg.data.num_classes
    if (inference.min_object_voxels or inference.fill_holes) and num_classes != 2:
        raise MitosegError(f"--min-object-voxels and --fill-holes need a two-class model; {args.checkpoint} "
                           f"predicts {num_classes} classes")
    label_dtype = np.uint8 if num_classes <= 256 else np.uint16
    from mitoseg.data.metadata import voxel_size_nm

    voxel_size = voxel_size_nm(args.input)  # the scale of OME-Zarr outputs
    # The model's working pixel size against the input's (--voxel-size, else its metadata).
    volume_nm = volume_pixel_nm(args.input, args.voxel_size)
    pixel_hint = "--voxel-size Z Y X (nm per voxel of --input)"
    if args.dask is not None:
        scale = input_scale(segmenter.loaded.pixel, volume_nm, args.input, pixel_hint)
        from mitoseg.inference.dask_predict import predict_with_dask

        predict_with_dask(args.dask, args.checkpoint, args.weights, args.device, cfg, args.input, args.output,
                          args.probabilities, label_dtype, args.overwrite, chunk=args.dask_chunk,
                          voxel_size=voxel_size, ngff_version=args.ngff_version, progress=not args.no_progress,
                          scale=scale)
        finish_predict(args)
        return
    ngff = {"voxel_size": voxel_size, "ngff_version": args.ngff_version}
    with contextlib.ExitStack() as stack:
        volume = stack.enter_context(open_volume(args.input, finite=True))
        z, y, x = volume.shape
        prepared = segmenter.prepare(volume, args.input, volume_nm, pixel_hint)
        labels_out = stack.enter_context(VolumeWriter(args.output, (z, y, x), label_dtype, overwrite=args.overwrite,
                                                      labels=True, **ngff))
        probs_out = None
        if args.probabilities:
            probs_out = stack.enter_context(
                VolumeWriter(args.probabilities, (z, num_classes, y, x), np.float16, overwrite=args.overwrite, **ngff)
            )

        # Labels waiting for post-processing go to a scratch file next to the output (memory stays bounded
        # by the slab).
        scratch = stack.enter_context(scratch_volumes(Path(split_spec(args.output)[0]).parent))
        prepared.predictor.predict_labels(
            prepared.read, z, prepared.normalization, labels_out.write,
            (lambda start, probs: probs_out.write(start, probs.cpu().numpy().astype(np.float16)))
            if probs_out is not None else None,
            scratch=scratch, progress=not args.no_progress)
    finish_predict(args)


def check_dask_options(args) -> None:
    """``--dask`` writes Zarr outputs block by block; ``--dask-chunk`` goes with it."""
    if args.dask is None:
        if args.dask_chunk is not None:
            raise MitosegError("--dask-chunk sets the blocks of --dask; pass --dask local:N or --dask tcp://HOST:PORT")
        return
    from mitoseg.data.paths import ZARR_SUFFIX, file_suffix, split_spec
    from mitoseg.inference.dask_predict import parse_address

    parse_address(args.dask)
    for flag, spec in (("--output", args.output), ("--probabilities", args.probabilities)):
        if spec and file_suffix(split_spec(spec)[0]) != ZARR_SUFFIX:
            raise MitosegError(f"--dask: {flag} {spec}: the workers write Zarr outputs; name DIR.zarr, "
                               "DIR.zarr:/ARRAY or DIR.ome.zarr")


def finish_predict(args) -> None:
    """What predict says and does once the outputs are in place: the line naming them, ``--instances``."""
    print(f"wrote {args.output}" + (f" and {args.probabilities}" if args.probabilities else ""))
    if args.instances:
        from mitoseg.instances.run import instances_command

        # The labels just written carry no voxel size: the image's metadata does.
        try:
            instances_command(args.output, args.instances, instance_options(args), args.probabilities,
                              args.voxel_size, args.table, args.overwrite, progress=not args.no_progress,
                              metadata_from=args.input, ngff_version=args.ngff_version)
        except MitosegError as exc:
            raise MitosegError(f"{exc} ({args.output} is written and kept: mitoseg instances {args.output} --output "
                               f"{args.instances} finishes the objects)") from exc


def instance_options(args):
    from mitoseg.instances.segment import InstanceOptions

    if args.min_voxels is not None and args.min_voxels < 0:
        raise MitosegError(f"--min-voxels must be at least 0, got {args.min_voxels}")
    if args.min_distance is not None and args.min_distance < 1:
        raise MitosegError(f"--min-distance must be at least 1 (voxels between two seeds), got {args.min_distance}")
    if not 0 < args.seed_depth < 1:
        raise MitosegError(f"--seed-depth must be between 0 and 1 (a fraction of an object's inscribed radius), "
                           f"got {args.seed_depth}")
    return InstanceOptions(min_voxels=args.min_voxels, fill_holes=bool(getattr(args, "instance_fill_holes", False)),
                           split=args.split, min_distance=args.min_distance, seed_depth=args.seed_depth,
                           slab=args.slab or 16)


def check_instance_outputs(output: str, table: str | None, overwrite: bool, flag: str = "--output") -> None:
    """The instance volume and its table, checked before any work (the table's default is next to the volume)."""
    from mitoseg.instances.run import check_table_target, default_table_path

    check_output_volume(output, flag, overwrite)
    check_table_target(Path(table) if table else default_table_path(output), overwrite)


def cmd_instances(args) -> None:
    check_input_volume(args.prediction)
    if args.probabilities:
        check_input_volume(args.probabilities)
    options = instance_options(args)
    check_instance_outputs(args.output, args.table, args.overwrite)
    if args.threshold is not None and not math.isfinite(args.threshold):
        raise MitosegError(f"--threshold must be a finite number, got {args.threshold}")
    threads_from(args)
    from mitoseg.instances.run import instances_command

    instances_command(args.prediction, args.output, options, args.probabilities, args.voxel_size,
                      args.table, args.overwrite, progress=not args.no_progress, ngff_version=args.ngff_version,
                      threshold=args.threshold)


def cmd_suggest(args) -> None:
    """``mitoseg suggest``: the slices worth labeling next, with their reasons; every scored slice in a CSV."""
    check_input_volume(args.image)
    check_checkpoint_file(args.checkpoint)
    if args.label:
        check_input_volume(args.label)
    if args.n < 1:
        raise MitosegError(f"-n must be at least 1, got {args.n}")
    if args.min_gap < 1:
        raise MitosegError(f"--min-gap must be at least 1 (1: neighbours allowed), got {args.min_gap}")
    if not 1 <= args.views <= 4:
        raise MitosegError(f"--views must be 1 to 4 (identity, flips of x, y, both), got {args.views}")
    csv_path = Path(args.csv)
    check_file_target(csv_path, args.overwrite, "--csv")
    check_output_volume(args.map, "--map", args.overwrite)
    num_slices = check_input_content(args.image)[0]
    from mitoseg.data.readers import select_slices

    labeled = select_slices(args.labeled, num_slices, "--labeled") if args.labeled else []
    candidates = select_slices(args.slices, num_slices, "--slices") if args.slices else None
    threads_from(args)
    if args.label:
        from mitoseg.data.readers import open_volume
        from mitoseg.suggest import labeled_slices

        with open_volume(args.label) as painted:
            if len(painted) != num_slices:
                raise MitosegError(f"--label {args.label} has {len(painted)} slices, --image {args.image} has "
                                   f"{num_slices}; they must match")
            labeled = sorted(set(labeled) | set(labeled_slices(painted)))
    from mitoseg.suggest import suggest, write_scores

    result = suggest(args.checkpoint, args.image, args.n, labeled, candidates, args.stride, args.views,
                     args.min_gap, args.device, args.weights, args.voxel_size, args.map, args.overwrite,
                     progress=not args.no_progress)
    write_scores(result, csv_path)
    print(f"scored {len(result.scored)} of {result.num_slices} slices (every {result.stride}"
          f"{'st' if result.stride == 1 else 'th'} slice without labels, {result.views} view(s)); "
          f"labeled: {', '.join(map(str, result.labeled)) or 'none'}; band: {result.band.source}")
    for s in result.chosen:
        print(f"{s.rank}. {s.reason}")
    for note in result.notes:
        print(note)
    written = f"wrote {csv_path}" + (f" and {args.map} (per-pixel entropy of the scored slices)" if args.map else "")
    print(written)


def default_metrics_path(prediction: str) -> Path:
    file_part = Path(prediction.split(":/", 1)[0])
    stem = file_part.name.split(".")[0] or "prediction"
    return file_part.with_name(f"{stem}_metrics.json")


def check_file_target(path: Path, overwrite: bool, flag: str) -> None:
    """An output file named by ``flag``, refused before any work is done, so a refused run costs nothing and
    leaves nothing behind."""
    from mitoseg.atomic import check_output_path

    if path.is_dir():
        raise MitosegError(f"{flag} {path} is a directory; name a file")
    check_output_path(path, flag)
    if path.exists() and not overwrite:
        raise MitosegError(f"{path} exists; pass --overwrite to replace it")


def check_json_target(json_path: Path, overwrite: bool) -> None:
    check_file_target(json_path, overwrite, "--json")


def write_json(json_path: Path, report: dict) -> None:
    """Written to a temporary file (``.NAME.tmp-PID``) and renamed: an interrupted run or a full disk never
    leaves half a report or the temporary; temporaries of killed runs are removed first."""
    from mitoseg.atomic import make_folder, remove_path, remove_stale_temporaries, write_text_atomic
    from mitoseg.runs import json_safe

    make_folder(json_path.parent, "--json")
    remove_stale_temporaries(json_path)
    remove_path(json_path.with_name(f".{json_path.name}.tmp"))  # the temporary of mitoseg <= 0.2
    write_text_atomic(json_path, json.dumps(json_safe(report), indent=2))
    print(f"wrote {json_path}")


# The options of each evaluate mode; passing one of the other mode's is an error rather than silently ignored.
VOLUME_ONLY = {"num_classes": "--num-classes", "ignore_index": "--ignore-index", "slab": "--slab",
               "instances": "--instances", "probabilities": "--probabilities"}
CHECKPOINT_ONLY = {"config": "--config", "set": "--set", "eval_mode": "--eval-mode", "weights": "--weights",
                   "device": "--device", "image": "--image", "slices": "--slices", "pixel_size": "--pixel-size"}
EM_CHECKPOINT_ONLY = {"image": "--image", "label": "--label", "slices": "--slices", "pixel_size": "--pixel-size"}


def cmd_evaluate(args) -> None:
    if args.checkpoint is not None and args.prediction is not None:
        raise MitosegError("--checkpoint (evaluate a Pascal VOC / Cityscapes model on its validation images) and "
                           "--prediction (score a predicted volume against --label) are two modes: pass only one")
    if args.checkpoint is None and args.prediction is None:
        raise MitosegError("evaluate needs --checkpoint RUN/best.pt (with --image VOLUME --label VOLUME for an EM "
                           "model) or --prediction VOLUME --label VOLUME (a predicted volume)")
    other, mode = ((VOLUME_ONLY, "--checkpoint") if args.checkpoint is not None
                   else (CHECKPOINT_ONLY, "--prediction"))
    given = [flag for key, flag in other.items() if getattr(args, key) not in (None, [], False)]
    if given:
        raise MitosegError(f"{', '.join(given)} cannot be used with {mode}")
    if args.checkpoint is not None:
        evaluate_checkpoint(args)
    else:
        if args.label is None:
            raise MitosegError("--prediction needs --label VOLUME, the ground truth to score it against")
        if args.instances:
            evaluate_instance_volume(args)
            return
        if args.probabilities is not None:
            raise MitosegError("--probabilities ranks the objects of --instances; add --instances")
        evaluate_volume(args)


def evaluate_instance_volume(args) -> None:
    """``evaluate --instances``: object-level precision, recall, F1, AP and split / merge counts."""
    from mitoseg.instances.run import evaluate_instances

    if args.num_classes is not None or args.ignore_index is not None:
        raise MitosegError("--num-classes and --ignore-index are for the semantic scores, not --instances")
    file_part = Path(args.prediction.split(":/", 1)[0])
    json_path = Path(args.json) if args.json else file_part.with_name(
        f"{file_part.name.split('.')[0] or 'prediction'}_instance_metrics.json")
    check_json_target(json_path, args.overwrite)
    scores = evaluate_instances(args.prediction, args.label, args.probabilities, slab=args.slab or 16,
                                progress=not args.no_progress)
    print(f"objects: {scores['objects_predicted']} predicted, {scores['objects_truth']} in the ground truth; "
          f"at IoU 0.5 precision {scores['precision_iou50']:.4f}, recall {scores['recall_iou50']:.4f}, "
          f"F1 {scores['f1_iou50']:.4f}; AP50 {scores['ap50']:.4f}, AP75 {scores['ap75']:.4f}; "
          f"{scores['split_truth_objects']} split, {scores['merged_predictions']} merged")
    write_json(json_path, scores)


def evaluate_volume(args) -> None:
    from mitoseg.data.readers import open_volume

    slab = args.slab or 16
    json_path = Path(args.json) if args.json else default_metrics_path(args.prediction)
    check_json_target(json_path, args.overwrite)
    check_input_volume(args.prediction)
    check_input_volume(args.label)
    threads_from(args)
    import torch

    from mitoseg.data.datasets import check_label_values
    from mitoseg.inference import iter_slabs
    from mitoseg.metrics import confusion_matrix, format_table, scores_from_confusion
    # finite: a float prediction (or label) with NaN / inf is refused by the slice that holds it.
    with open_volume(args.prediction, finite=True) as prediction, open_volume(args.label, finite=True) as label:
        if prediction.shape != label.shape:
            raise MitosegError(f"{args.prediction}: shape {prediction.shape} differs from label "
                               f"{args.label} shape {label.shape}")
        num_classes = args.num_classes
        if num_classes is None:
            # Two passes over the volumes: the first only finds the largest class id.
            highest = 0
            for start, stop in iter_slabs(len(label), slab):
                for vol in (prediction, label):
                    values = vol.read(start, stop)
                    if args.ignore_index is not None:
                        values = values[values != args.ignore_index]
                    if values.size:
                        highest = max(highest, int(values.max()))
            num_classes = max(2, highest + 1)
        matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        for start, stop in iter_slabs(len(label), slab):
            pred_slab, label_slab = prediction.read(start, stop), label.read(start, stop)
            check_label_values(label_slab, num_classes, args.ignore_index, args.label)
            check_label_values(pred_slab, num_classes, None, args.prediction)
            matrix += confusion_matrix(torch.from_numpy(pred_slab.astype("int64")),
                                       torch.from_numpy(label_slab.astype("int64")), num_classes, args.ignore_index)
    scores = scores_from_confusion(matrix)
    print(format_table(scores))
    write_json(json_path, {"prediction": args.prediction, "label": args.label, "num_classes": num_classes, **scores})


def default_checkpoint_metrics_path(checkpoint: Path, weights: str, mode: str) -> Path:
    """``RUN/best_ema_full_metrics.json``: weights and mode in the name, so evaluating one checkpoint
    several ways keeps every report."""
    return checkpoint.with_name(f"{checkpoint.stem}_{weights}_{mode}_metrics.json")


def evaluate_checkpoint(args) -> None:
    """A checkpoint on labelled data: a Pascal VOC / Cityscapes model on its validation list, an EM model on
    a volume. The model is the checkpoint's; the data (root, lists, crop size, eval mode) and inference
    settings are its stored config's, or --config's, with --set applied."""
    from mitoseg.config import apply_overrides, config_from_dict, config_to_dict, load_config, parse_override

    for text in args.set:
        # The weights fix the architecture: a changed model key would only make them fail to load, or
        # (a silent ignore) suggest a change that did not happen.
        if parse_override(text)[0][0] == "model":
            raise MitosegError(f"--set {text}: the model is rebuilt from the checkpoint; only data, inference "
                               "and train.amp settings apply to evaluate")
    checkpoint = Path(args.checkpoint)
    check_checkpoint_file(checkpoint)
    if args.image is not None and args.label is not None:  # an EM model's volumes, checked before torch
        for flag, spec in (("--image", args.image), ("--label", args.label)):
            if not Path(spec.split(":/", 1)[0]).exists():
                raise MitosegError(f"{flag}: file not found: {spec}")
        shapes = check_input_content(args.image), check_input_content(args.label)
        if shapes[0] != shapes[1]:
            raise MitosegError(f"{args.label}: label shape {shapes[1]} differs from image {args.image} shape "
                               f"{shapes[0]}")
    # --image / --label are checked once the checkpoint says whether it is an EM model (they are refused
    # for the others), in evaluate_em_checkpoint.
    if args.json:
        check_json_target(Path(args.json), args.overwrite)
    cfg = load_config(args.config, args.set) if args.config is not None else None
    threads_from(args)
    from mitoseg.data.natural import build_eval_dataset, class_names, eval_mode
    from mitoseg.inference.images import evaluate
    from mitoseg.runs import load_checkpoint
    from mitoseg.inference.session import from_state
    from mitoseg.metrics import format_table, scores_from_confusion

    loaded = from_state(load_checkpoint(checkpoint), checkpoint, args.weights, args.device or "auto")
    model, stored, weights, device = loaded.model, loaded.cfg, loaded.weights, loaded.device
    if cfg is None:
        cfg = config_from_dict(apply_overrides(config_to_dict(stored), args.set))
    if stored.data.kind == "em":
        evaluate_em_checkpoint(args, checkpoint, loaded, cfg)
        return
    given = [flag for key, flag in EM_CHECKPOINT_ONLY.items() if getattr(args, key) is not None]
    if given:
        raise MitosegError(f"{', '.join(given)}: only for EM models; {checkpoint} is a {stored.data.kind} model, "
                           "evaluated on its validation list")
    if cfg.data.kind != stored.data.kind or cfg.data.num_classes != stored.data.num_classes:
        raise MitosegError(f"the evaluation data ({cfg.data.kind}, {cfg.data.num_classes} classes) do not match "
                           f"{checkpoint}'s model ({stored.data.kind}, {stored.data.num_classes} classes)")
    mode = args.eval_mode or eval_mode(cfg.data)
    json_path = Path(args.json) if args.json else default_checkpoint_metrics_path(checkpoint, weights, mode)
    check_json_target(json_path, args.overwrite)
    dataset = build_eval_dataset(cfg, mode)
    names = class_names(cfg.data.kind, cfg.data.num_classes)
    matrix = evaluate(model, dataset, cfg, device, amp=cfg.train.amp, mode=mode,
                      progress=not args.no_progress)
    scores = scores_from_confusion(matrix, names)
    print(format_table(scores))
    print(f"mIoU = {scores['miou']:.4f} ({cfg.data.kind}, {len(dataset)} images, {mode}"
          + (f", crop {cfg.data.crop_size}" if mode != "full" else "") + f", {weights} weights)")
    write_json(json_path, {
        "checkpoint": str(checkpoint), "weights": weights, "kind": cfg.data.kind, "root": cfg.data.root,
        "eval_mode": mode, "crop_size": cfg.data.crop_size, "images": len(dataset),
        "num_classes": cfg.data.num_classes, **scores,
        # rows = label class, columns = predicted class: lets reports be merged or re-scored later.
        "confusion_matrix": matrix.tolist(),
    })


def evaluate_em_checkpoint(args, checkpoint: Path, loaded, cfg) -> None:
    """An EM checkpoint on a labelled volume (``--image`` / ``--label``, default the run's ``data.test``),
    with the run's normalization, context and inference settings (``--set inference.*`` to change them):
    the numbers of ``data.test`` at the end of training."""
    from mitoseg.inference.evaluation import score_em_volume
    from mitoseg.metrics import format_table

    stored, weights = loaded.cfg, loaded.weights
    if args.eval_mode is not None:
        raise MitosegError("--eval-mode is for Pascal VOC / Cityscapes models; an EM model is scored on a volume "
                           "with sliding windows (inference.* settings)")
    if cfg.data.kind != "em" or input_channels(cfg) != input_channels(stored) or \
            cfg.data.num_classes != stored.data.num_classes:
        raise MitosegError(f"the evaluation config does not match {checkpoint}'s model (data.kind, "
                           "data.num_classes and data.context_slices must stay the run's)")
    image, label, slices, voxel_size = args.image, args.label, args.slices, None
    hint = "--pixel-size NM (nm per pixel of --image)"
    if image is None and label is None and cfg.data.test is not None:
        image, label, slices = cfg.data.test.image, cfg.data.test.label, cfg.data.test.slices
        voxel_size, hint = cfg.data.test.voxel_size, "--pixel-size NM or data.test.voxel_size: [z, y, x]"
    if args.pixel_size is not None:
        if not args.pixel_size > 0:
            raise MitosegError(f"--pixel-size must be a positive number of nm per pixel, got {args.pixel_size:g}")
        voxel_size = [args.pixel_size] * 3
    if image is None or label is None:
        raise MitosegError(f"{checkpoint} is an EM model: pass --image VOLUME --label VOLUME (the run has no "
                           "data.test to default to)")
    for what, spec in (("--image", image), ("--label", label)):
        file_part = spec.split(":/", 1)[0] if ":/" in spec else spec
        if not Path(file_part).exists():
            raise MitosegError(f"{what}: file not found: {file_part}")
    stem = Path(image.split(":/", 1)[0]).name.split(".")[0] or "volume"
    json_path = Path(args.json) if args.json else checkpoint.with_name(f"{checkpoint.stem}_{weights}_{stem}_metrics.json")
    check_json_target(json_path, args.overwrite)
    scores = score_em_volume(loaded, cfg, image, label, slices, voxel_size,
                             slices_key="--slices" if args.slices else "data.test.slices", pixel_hint=hint,
                             progress=not args.no_progress, description="evaluate")
    print(format_table(scores))
    write_json(json_path, {"checkpoint": str(checkpoint), "weights": weights, **scores,
                           "inference": config_to_dict(cfg)["inference"]})


def cmd_view(args) -> None:
    try:
        from mitoseg_napari.launch import launch
    except ImportError as exc:
        raise MitosegError("mitoseg view needs the napari plugin: pip install \"mitoseg[napari]\" (in a clone: "
                           "pip install -e \".[napari]\")") from exc
    launch(args.run, args.image)


def cmd_export(args) -> None:
    from mitoseg.export import export_checkpoint

    if args.format != "bioimageio":
        given = [flag for flag, value in (("--name", args.name), ("--author", args.author)) if value]
        if given:
            raise MitosegError(f"{', '.join(given)}: only for --format bioimageio (the package's description)")
    check_checkpoint_file(args.checkpoint)  # export_checkpoint checks --output before it imports torch
    result = export_checkpoint(args.checkpoint, args.format, args.output, weights=args.weights,
                               overwrite=args.overwrite, name=args.name, authors=args.author or None)
    if args.format == "bioimageio":
        print(f"wrote {args.output}: bioimage.io model package (spec 0.5), weights {', '.join(result['formats'])}; "
              f"test tensors from {result['test_origin']}; bioimageio.core's test_model passed "
              f"({len(result['tests'])} checks)")
    else:
        print(f"wrote {args.output}: {args.format} of the {result['weights']} weights of {args.checkpoint} "
              f"(input {result['axes']} with {result['input_channels']} channel(s), output {result['num_classes']}-"
              f"class logits; dynamic batch and spatial sizes; equal to PyTorch within 1e-4)")


# ------------------------------------------------------------------- parser


def add_instance_options(p) -> None:
    """The options shared by instances and predict --instances."""
    p.add_argument("--split", choices=["none", "distance", "probability"], default="none",
                   help="cut touching objects apart by a seeded watershed of the distance to the background or "
                        "of the foreground probability (default: none)")
    p.add_argument("--seed-depth", type=float, metavar="F", default=SEED_DEPTH,
                   help="a split cuts where the relief (distance to the background, or probability) dips by at "
                        f"least F of the object's own height: a neck narrower than (1 - F) of its inscribed "
                        f"radius (default: {SEED_DEPTH}); larger splits less")
    p.add_argument("--min-distance", type=int, metavar="N",
                   help="also merge the seeds of a split closer than N voxels (default: none)")
    p.add_argument("--min-voxels", type=int, metavar="N",
                   help=f"remove objects smaller than N voxels (default: {100 * AUTO_MIN_FRACTION:g} %% of the typical "
                        "object of the volume, the voxel-weighted median size: specks of false foreground go, "
                        "mitochondria stay; 0 keeps every object)")
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"),
                   help="nm per voxel (default: from the file's metadata, else volumes are in voxels); predict: "
                        "also the input's pixel size that a model with data.pixel_size is rescaled against")
    p.add_argument("--table", metavar="PATH",
                   help="the per-object table, .csv or .parquet (default: <instances>_objects.csv)")


def add_threads_option(p) -> None:
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads for PyTorch (default: $MITOSEG_THREADS, else $OMP_NUM_THREADS, else the "
                        "physical cores this process may use; fewer on a machine shared with other jobs)")


def add_ngff_option(p) -> None:
    p.add_argument("--ngff-version", choices=["0.4", "0.5"], default="0.5",
                   help="outputs named *.ome.zarr: OME-NGFF 0.5 (Zarr v3; default) or 0.4 (Zarr v2, for older "
                        "viewers)")


class OneLineParser(argparse.ArgumentParser):
    """argparse with the promise of every other error: one line on stderr, exit status 2 (argparse prints
    its whole usage block first; ``--help`` still shows it)."""

    def error(self, message: str):
        self.exit(2, f"mitoseg: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="mitoseg",
        description="Semi-supervised segmentation of mitochondria in electron-microscopy volumes.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mitoseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("sample-data", help="write the synthetic EM sample volumes",
                       description="Write the synthetic EM sample data set (train and validation volumes with "
                                   "mitochondria labels, as TIFF stacks) into OUT_DIR (default: sample_data, where "
                                   "the built-in sample_* configs read it). Deterministic from --seed.")
    p.add_argument("out_dir", metavar="OUT_DIR", nargs="?", default="sample_data",
                   help="folder to write (default: sample_data)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0, the shipped sample_data/)")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.set_defaults(func=cmd_sample_data)

    p = sub.add_parser("configs", help="list the built-in configs, print one (configs show NAME) or every key "
                                       "(configs keys)",
                       description="The configs that ship with mitoseg, one line each. `mitoseg configs show NAME` "
                                   "prints one, to start your own from (mitoseg configs show sample_daw > my.yaml). "
                                   "Every --config takes a built-in NAME or a YAML file. `mitoseg configs keys` prints "
                                   "every config key with its default, allowed values and meaning (Markdown).",
                       epilog="examples:\n  mitoseg configs\n  mitoseg configs show lucchi_cpu > my.yaml\n"
                              "  mitoseg train --config sample_daw",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", choices=["show", "keys"],
                   help="show: print the config NAME; keys: every config key, its default and meaning")
    p.add_argument("name", nargs="?", metavar="NAME", help="a built-in config (or a YAML file)")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("init", help="write a config for your own image and label volumes",
                       description="Inspect an image volume and its label volume (shape, dtype, which slices hold "
                                   "labels, the label values) and write a commented config for them: the labeled "
                                   "slices found, a validation slice held out when there are at least 4, the "
                                   "unlabeled slices for a semi-supervised method, a label_map for 0 / 255 masks, "
                                   "and a patch size and U-Net sized to the slices and the device. A slice counts as "
                                   "labeled when any of its pixels is non-zero. Prints the command to train it.",
                       epilog="example: mitoseg init --image stack.tif --label labels.tif --method daw --output "
                              "my.yaml && mitoseg train --config my.yaml")
    p.add_argument("--image", required=True, metavar="VOLUME", help="the image volume (z, y, x)")
    p.add_argument("--label", required=True, metavar="VOLUME",
                   help="its labels, same shape: 0 = background or unlabeled slice, > 0 = mitochondrion (or class)")
    p.add_argument("--method", default="daw",
                   choices=["supervised", "fixmatch", "unimatch", "daw", "ddfp", "daw_ddfp"],
                   help="training method (default: daw, semi-supervised: the unlabeled slices train too)")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--gpu", action="store_true", help="size network and patches for a CUDA GPU")
    device.add_argument("--cpu", action="store_true", help="size them for the CPU (default: the GPU when CUDA is "
                                                          "available)")
    p.add_argument("--output", metavar="YAML", help="config to write (default: <image name>_<method>.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train a segmentation model. Writes OUT/last.pt, OUT/best.pt, "
                                   "OUT/metrics.jsonl, OUT/tb (TensorBoard), OUT/summary.json, OUT/config.json "
                                   "and, for the semi-supervised methods, OUT/inspect.",
                       epilog="example: mitoseg train --config sample_supervised --out runs/sample "
                              "--set optim.lr=0.002 --set train.iterations=500")
    p.add_argument("--config", metavar="NAME|YAML",
                   help="a built-in config (mitoseg configs lists them) or a YAML file (docs/configuration.md)")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<config name>)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config value by dotted key, e.g. --set data.batch_size=4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--max-iters", type=positive_int, metavar="N",
                   help="stop after iteration N (the schedule still spans train.iterations; --resume continues)")
    p.add_argument("--max-minutes", type=positive_float, metavar="M",
                   help="stop at the first log step (train.log_every) after M minutes of training, with a "
                        "validation and last.pt (the schedule still spans train.iterations; --resume continues)")
    p.add_argument("--overwrite", action="store_true",
                   help="train into a non-empty --out: first delete the previous run's files there ("
                        + ", ".join(RUN_FILES + tuple(f"{d}/" for d in RUN_DIRS))
                        + "); nothing else in --out is touched. Not with --resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_option(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="segment a volume with a trained checkpoint",
                       description="Sliding-window prediction over a whole volume, slab by slab (bounded memory). "
                                   "Writes class labels (uint8) and optionally per-class probabilities "
                                   "(float16, shape z, C, y, x). Volumes: .tif/.tiff, file.h5:/dataset, "
                                   "dir.zarr, vol.ome.zarr (OME-Zarr images; outputs named *.ome.zarr are "
                                   "written as OME-Zarr), or a folder of PNG/TIFF slices (input only).")
    p.add_argument("--checkpoint", required=True, metavar="PT",
                   help="best.pt or last.pt of a run, or a TorchScript file of mitoseg export")
    p.add_argument("--input", required=True, metavar="VOLUME", help="image volume (z, y, x)")
    p.add_argument("--output", required=True, metavar="VOLUME", help="label volume to write")
    p.add_argument("--probabilities", metavar="VOLUME", help="also write per-class probabilities here")
    p.add_argument("--weights", choices=["ema", "student"],
                   help="which weights (default: those the run validated, usually ema)")
    p.add_argument("--overlap", type=float, help="window overlap in [0, 1) (default: the run's inference.overlap)")
    p.add_argument("--batch-size", dest="sw_batch_size", type=positive_int,
                   help="windows per forward pass (default: the run's inference.sw_batch_size)")
    p.add_argument("--roi-size", type=positive_int, nargs="+", metavar="N",
                   help="window size: Y X (Z Y X for a 3-D model)")
    p.add_argument("--blend", choices=["gaussian", "constant"], help="window blending (default: gaussian)")
    p.add_argument("--slab", type=positive_int, help="slices processed together (bounds memory)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time augmentation: average over the 8 flips / quarter turns (default: the run's "
                        "inference.tta)")
    p.add_argument("--min-object-voxels", type=int, metavar="N",
                   help="remove foreground objects smaller than N voxels (3-D; default: the run's "
                        "inference.min_object_voxels, 0 = off)")
    p.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=None,
                   help="fill background enclosed by foreground in 3-D (default: the run's inference.fill_holes)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--level", type=int, metavar="N",
                   help="OME-Zarr input: predict resolution level N (0 = full resolution; default: 0, or the "
                        "level named as vol.ome.zarr:/PATH)")
    p.add_argument("--dask", metavar="ADDRESS",
                   help="predict block by block on a Dask cluster: local:N (N worker processes here) or the "
                        "scheduler tcp://HOST:PORT (e.g. of dask-jobqueue); outputs must be Zarr / OME-Zarr")
    p.add_argument("--dask-chunk", type=positive_int, nargs=3, metavar=("Z", "Y", "X"),
                   help="block size of --dask (default: one slab of 1024 x 1024; Z rounded up to whole slabs)")
    add_ngff_option(p)
    p.add_argument("--instances", metavar="VOLUME",
                   help="also write the 3-D objects (uint32 ids) and their measurements, as mitoseg instances")
    add_instance_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_option(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("instances", help="3-D objects and their measurements from a predicted mask",
                       description="3-D connected components of the foreground (nonzero voxels; of a floating-point "
                                   "mask, those above --threshold) of a predicted volume, "
                                   "optionally split where objects touch (a seeded watershed), small ones removed; "
                                   "uint32 ids 1..N, written slab by slab in bounded memory. Also writes a table "
                                   "of per-object measurements (CSV, or Parquet with pyarrow).",
                       epilog="example: mitoseg instances --prediction pred.tif --output objects.tif "
                              "--split distance --min-voxels 500 --voxel-size 5 5 5")
    p.add_argument("--prediction", required=True, metavar="VOLUME",
                   help="predicted label volume (mitoseg predict), or any integer / boolean mask")
    p.add_argument("--output", required=True, metavar="VOLUME", help="instance volume to write (uint32)")
    p.add_argument("--threshold", type=float, metavar="T",
                   help="a floating-point mask (probabilities): its voxels above T are the foreground (required for "
                        "such masks; integer and boolean masks need none)")
    p.add_argument("--probabilities", metavar="VOLUME",
                   help="the class probabilities (mitoseg predict --probabilities): each object's mean foreground "
                        "probability, and the relief of --split probability")
    add_instance_options(p)
    p.add_argument("--fill-holes", dest="instance_fill_holes", action="store_true",
                   help="background enclosed by foreground in 3-D joins the object around it")
    p.add_argument("--slab", type=positive_int, help="slices processed together (default: 16)")
    add_ngff_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_option(p)
    p.set_defaults(func=cmd_instances)

    p = sub.add_parser("suggest", help="which slices to label next, and why",
                       description="Ranks the slices without labels by what labeling them is expected to teach the "
                                   "model: DAW's uncertain mass (foreground-candidate pixels between the wrong "
                                   "pseudo-labels' mean confidence and the step threshold), predictive entropy and "
                                   "disagreement between test-time views, chosen so that no two suggestions are "
                                   "neighbours and each is far, in z and in appearance, from the labeled slices. "
                                   "Prints the top -n with their reasons and writes every scored slice to a CSV.",
                       epilog="example: mitoseg suggest --checkpoint runs/my/best.pt --image stack.tif "
                              "--label labels.tif -n 3")
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a run's best.pt / last.pt or an export")
    p.add_argument("--image", required=True, metavar="VOLUME", help="the volume to label")
    p.add_argument("--label", metavar="VOLUME", help="the painted labels: their slices with any label are labeled")
    p.add_argument("--labeled", metavar="SLICES", help='labeled slices, e.g. "13,75,118" (with or instead of --label)')
    p.add_argument("--slices", metavar="SLICES", help='the slices to choose from, e.g. "0:40, 90:165" (default: all)')
    p.add_argument("-n", type=int, default=3, help="how many slices to suggest (default: 3)")
    p.add_argument("--stride", type=positive_int,
                   help="score every N-th candidate slice (default: enough to score at most 48)")
    p.add_argument("--views", type=int, default=4,
                   help="test-time views whose disagreement counts: 1-4 (identity, flip x, flip y, both; default 4)")
    p.add_argument("--min-gap", type=int, default=2,
                   help="suggestions at least this many slices from each other and from labeled ones (default: 2,"
                        " never neighbours)")
    p.add_argument("--csv", default="suggestions.csv", metavar="PATH",
                   help="every scored slice's scores (default: suggestions.csv)")
    p.add_argument("--map", metavar="VOLUME", help="also write the per-pixel entropy of the scored slices (float32)")
    p.add_argument("--weights", choices=["ema", "student"], help="a checkpoint's weights (default: those validated)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"),
                   help="nm per voxel of --image (default: its metadata)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_option(p)
    p.set_defaults(func=cmd_suggest)

    p = sub.add_parser("evaluate", help="score a predicted volume, or a trained checkpoint",
                       description="Two modes, one per call:\n"
                                   "  --prediction VOLUME --label VOLUME   score a predicted label volume against "
                                   "ground truth\n"
                                   "  --checkpoint PT                      score a trained model: an EM model on "
                                   "--image / --label\n"
                                   "                                       (default: the run's data.test) with "
                                   "the run's inference\n"
                                   "                                       settings; a Pascal VOC / Cityscapes "
                                   "model on its\n"
                                   "                                       validation images (full image, centre "
                                   "crop or\n"
                                   "                                       sliding window)\n"
                                   "Both print per-class IoU, Dice, precision and recall (and fg_iou for binary "
                                   "labels)\nand write them as JSON.",
                       epilog="examples:\n"
                              "  mitoseg evaluate --prediction pred.tif --label sample_data/val_label.tif\n"
                              "  mitoseg evaluate --checkpoint runs/sample_daw/best.pt --image "
                              "sample_data/val_image.tif --label sample_data/val_label.tif\n"
                              "  mitoseg evaluate --checkpoint runs/lucchi/best.pt --set inference.tta=true\n"
                              "  mitoseg evaluate --checkpoint runs/pascal_daw/best.pt --eval-mode center_crop\n"
                              "  mitoseg evaluate --checkpoint runs/cs/best.pt --set data.root=/data/cityscapes",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    volume = p.add_argument_group("predicted volume")
    volume.add_argument("--prediction", metavar="VOLUME", help="predicted label volume")
    volume.add_argument("--label", metavar="VOLUME", help="ground-truth label volume (also for an EM --checkpoint)")
    volume.add_argument("--num-classes", type=positive_int, help="default: largest class id + 1 (at least 2)")
    volume.add_argument("--ignore-index", type=int, help="label value to leave out (e.g. 255)")
    volume.add_argument("--slab", type=positive_int, help="slices read at a time (default: 16)")
    volume.add_argument("--instances", action="store_true",
                        help="object-level scores: precision / recall / F1 at IoU 0.5, AP50 and AP75 (MitoEM's "
                             "definition), split and merged objects; volumes with only 0 / 1 are first labelled "
                             "into 3-D objects")
    volume.add_argument("--probabilities", metavar="VOLUME",
                        help="with --instances: class probabilities; the objects' mean foreground probability "
                             "ranks them for AP (default: their size)")
    natural = p.add_argument_group("trained checkpoint")
    natural.add_argument("--checkpoint", metavar="PT", help="best.pt or last.pt of a run")
    natural.add_argument("--image", metavar="VOLUME",
                         help="EM model: the image volume to segment and score against --label "
                              "(default: the run's data.test)")
    natural.add_argument("--slices", metavar="SELECTION",
                         help="EM model: which slices of --image / --label, e.g. '0:10' or '3,7,12' (default: all)")
    natural.add_argument("--config", metavar="NAME|YAML",
                         help="take data and inference settings from this config (a built-in name or a file) "
                              "instead of the checkpoint's "
                              "(the model is always the checkpoint's)")
    natural.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                         help="override a data or inference value, e.g. --set inference.tta=true or "
                              "--set data.root=/data/voc (repeatable)")
    natural.add_argument("--eval-mode", choices=["full", "center_crop", "sliding_window"],
                         help="Pascal VOC / Cityscapes: default the config's data.eval_mode (Pascal full, "
                              "Cityscapes sliding_window); center_crop and sliding_window use data.crop_size")
    natural.add_argument("--weights", choices=["ema", "student"],
                         help="which weights (default: those the run validated, usually ema)")
    natural.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    natural.add_argument("--pixel-size", type=float, metavar="NM",
                         help="EM model: nm per pixel (y, x) of --image, for a model with a working data.pixel_size "
                              "(default: the image's metadata, or data.test.voxel_size)")
    p.add_argument("--json", metavar="PATH",
                   help="where to write the scores (default: <prediction>_metrics.json; for a checkpoint next to "
                        "it, <checkpoint>_<weights>_<image>_metrics.json (EM) or "
                        "<checkpoint>_<weights>_<mode>_metrics.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (--checkpoint)")
    add_threads_option(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("view", help="open napari with the pseudo-label inspector on a run",
                       description="Open napari with the mitoseg pseudo-label inspector docked on RUN (a train "
                                   "--out directory). With --image, the volume is opened too and predicted with "
                                   "the run's checkpoint. Needs the napari extra: pip install \"mitoseg[napari]\" (in a clone: "
                                   "pip install -e \".[napari]\").")
    p.add_argument("run", metavar="RUN", help="run directory (with inspect/ and metrics.jsonl)")
    p.add_argument("--image", metavar="VOLUME", help="an image volume to open and predict")
    p.set_defaults(func=cmd_view)

    p = sub.add_parser("export", help="export a trained model: bioimage.io package, TorchScript or ONNX",
                       description="Export a run's network. bioimageio: a bioimage.io model package (spec 0.5; "
                                   "a .zip, or a folder for other names) with pytorch_state_dict, torchscript and "
                                   "onnx weights, the run's normalisation as preprocessing, test tensors from its "
                                   "validation volume, a cover, a README with the training summary and the "
                                   "citations, checked with bioimageio.core's test_model (EM models). torchscript "
                                   "/ onnx: the network (logits) with dynamic batch and spatial sizes, checked "
                                   "against PyTorch within 1e-4; a TorchScript file carries the run's settings "
                                   "and mitoseg predict --checkpoint takes it. Needs pip install \"mitoseg[export]\" (in a clone: "
                                   "pip install -e \".[export]\").",
                       epilog="examples:\n"
                              "  mitoseg export --checkpoint runs/sample/best.pt --format bioimageio --output "
                              "sample_model.zip --author 'Ada Lovelace'\n"
                              "  mitoseg export --checkpoint runs/sample/best.pt --format torchscript --output "
                              "sample.pt\n"
                              "  mitoseg predict --checkpoint sample.pt --input sample_data/val_image.tif "
                              "--output pred.tif",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="PT", help="best.pt or last.pt of a run")
    p.add_argument("--format", required=True, choices=["bioimageio", "torchscript", "onnx"], help="what to write")
    p.add_argument("--output", required=True, metavar="PATH",
                   help="file to write (bioimageio: PACKAGE.zip, or a folder when the name does not end in .zip)")
    p.add_argument("--weights", choices=["ema", "student"],
                   help="which weights (default: those the run validated, usually ema)")
    p.add_argument("--name", help="bioimageio: the model's name (default: mitoseg METHOD MODEL RUN)")
    p.add_argument("--author", action="append", default=[], metavar="NAME",
                   help="bioimageio: an author of the model (repeatable; default: your login name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_export)
    return parser


# How to install what a command needs when this Python lacks it (the CPU build of PyTorch avoids GBs of CUDA).
INSTALL_HINTS = {
    "torch": "pip install torch --index-url https://download.pytorch.org/whl/cpu (or a CUDA build from "
             "pytorch.org), then pip install mitoseg",
    "monai": "pip install mitoseg (it brings MONAI)",
    "distributed": "pip install 'mitoseg[dask]'",
    "onnx": "pip install 'mitoseg[export]'", "onnxruntime": "pip install 'mitoseg[export]'",
    "bioimageio": "pip install 'mitoseg[export]'", "napari": "pip install 'mitoseg[napari]'",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    previous_sigterm = install_sigterm_handler()
    try:
        if hasattr(args, "threads"):  # checked here, applied by the command once its inputs are checked
            from mitoseg.threads import resolve_threads

            args.threads_count = resolve_threads(args.threads)[0]
        if args.command == "predict" and args.overlap is not None and not 0 <= args.overlap < 1:
            raise MitosegError(f"--overlap must be in [0, 1), got {args.overlap}")
        if args.command == "predict" and args.min_object_voxels is not None and args.min_object_voxels < 0:
            raise MitosegError(f"--min-object-voxels must be at least 0, got {args.min_object_voxels}")
        args.func(args)
    except MitosegError as exc:
        if args.debug:
            raise
        print(f"mitoseg: error: {exc}", file=sys.stderr)
        return exc.exit_code  # 2; 3 when training diverged (TrainingDiverged)
    except ModuleNotFoundError as exc:
        # A dependency missing from this Python (torch in a fresh virtual environment): how to install it.
        package = (exc.name or "").split(".")[0]
        if args.debug or not package or package == "mitoseg":
            raise
        hint = INSTALL_HINTS.get(package, f"pip install {package}")
        print(f"mitoseg: error: {args.command} needs the Python package '{package}', which this Python "
              f"({sys.executable}) does not have: {hint}", file=sys.stderr)
        return 2
    except Exception as exc:
        # A full disk wherever it strikes (a library's own write) is the machine's state, not a bug.
        from mitoseg.atomic import disk_full_cause

        full = disk_full_cause(exc)
        if full is None or args.debug:
            raise
        where = f" writing {full.filename}" if full.filename else ""
        print(f"mitoseg: error: no space left on device{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        from mitoseg.errors import Terminated

        if isinstance(exc, Terminated):
            print("mitoseg: terminated (SIGTERM); outputs not finished were removed", file=sys.stderr)
            return Terminated.exit_code
        print("mitoseg: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous_sigterm is not None:
            import signal

            signal.signal(signal.SIGTERM, previous_sigterm)
    return 0


def install_sigterm_handler():
    """SIGTERM raises :class:`~mitoseg.errors.Terminated` (a KeyboardInterrupt: every cleanup of Ctrl-C runs);
    returns the previous handler (None: not the main thread, where handlers cannot be installed)."""
    import signal
    import threading

    from mitoseg.errors import raise_terminated

    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, raise_terminated)
    return previous if previous is not None else signal.SIG_DFL
