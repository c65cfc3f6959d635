"""Throughput of `mitoseg predict --dask local:N` against single-process `mitoseg predict`.

    python benchmarks/bench_dask_predict.py --workers 1 2 --shape 32 512 512 --out /tmp/bench_dask

A synthetic EM-like volume (uint8, smoothed noise) of SHAPE is written to a Zarr array; the model is
`--checkpoint` or, by default, an untrained U-Net of the default architecture (channels 16-128, 256 x 256
windows: the cost of a forward pass does not depend on the weights). Then, all on this machine:

- single process: `mitoseg predict` in this process (once to warm up imports and caches, then timed);
  PyTorch uses every core (run the benchmark on an otherwise idle machine: busy cores slow multi-threaded
  PyTorch far more than single-threaded workers);
- Dask: for each N of `--workers`, a LocalCluster of N worker processes (each with cores / N PyTorch
  threads), `predict --dask local:N` through `mitoseg.inference.dask_predict.predict_with_dask`; the
  table gives the command's wall time (cluster start, worker imports, model loads included) and the
  prediction time (from submitting the blocks to the last block written, model loads included).

Every Dask output is checked against the single-process labels (they must be equal). The result is a
Markdown table (throughput in Mvoxel/s of the prediction time, and its ratio to the single process). On a
GPU machine pass `--device cuda`: N workers then share the GPU (workers per GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def make_volume(path: Path, shape, seed: int = 0) -> None:
    """Smoothed noise, slab by slab (never the whole volume in memory)."""
    import zarr
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    array = zarr.create_array(store=str(path), shape=tuple(shape), dtype=np.uint8,
                              chunks=(1, min(shape[1], 512), min(shape[2], 512)), overwrite=True)
    for start in range(0, shape[0], 8):
        stop = min(start + 8, shape[0])
        noise = rng.random((stop - start, *shape[1:]))
        slab = gaussian_filter(noise, (0, 3, 3))
        array[start:stop] = np.clip((slab - 0.5) * 8 * 255 + 128, 0, 255).astype(np.uint8)


def make_checkpoint(path: Path, roi: int, slab: int) -> None:
    """An untrained U-Net of the default config (the forward pass costs the same as a trained one's)."""
    import torch

    from mitoseg.config import config_from_dict, config_to_dict, input_channels
    from mitoseg.engine.checkpoint import save_checkpoint
    from mitoseg.networks import build_model

    cfg = config_from_dict({"data": {"train": {"image": "x"}},
                            "inference": {"roi_size": [roi, roi], "slab": slab, "overlap": 0.25}})
    torch.manual_seed(0)
    weights = build_model(cfg.model, cfg.data.num_classes, input_channels(cfg)).state_dict()
    save_checkpoint(path, {"config": config_to_dict(cfg), "model": weights, "ema_model": weights})


def single_process(checkpoint: Path, volume: str, output: Path, device: str) -> float:
    """Seconds of one `mitoseg predict` in this process (after a warm-up run)."""
    from mitoseg.cli import main

    args = ["predict", "--checkpoint", str(checkpoint), "--input", volume, "--output", str(output),
            "--device", device, "--overwrite", "--no-progress"]
    with contextlib.redirect_stdout(io.StringIO()):
        if main(args) != 0:  # warm-up: imports, allocator, caches
            sys.exit("single-process predict failed")
        started = time.perf_counter()
        if main(args) != 0:
            sys.exit("single-process predict failed")
    return time.perf_counter() - started


def dask_run(workers: int, checkpoint: Path, volume: str, output: Path, device: str, chunk) -> dict:
    from mitoseg.networks.loading import model_from_checkpoint
    from mitoseg.inference.dask_predict import predict_with_dask

    _, cfg = model_from_checkpoint(checkpoint)
    started = time.perf_counter()
    summary = predict_with_dask(f"local:{workers}", str(checkpoint), None, device, cfg, volume, str(output), None,
                                np.uint8, overwrite=True, chunk=chunk, progress=False)
    summary["wall"] = time.perf_counter() - started
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Dask worker processes (default: 1 2)")
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 512, 512], metavar=("Z", "Y", "X"))
    parser.add_argument("--chunk", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="--dask-chunk (default: predict's, one slab of whole slices up to 1024 x 1024; "
                             "smaller y-x blocks than about 4 windows repeat much of the work in their halos)")
    parser.add_argument("--checkpoint", type=Path, help="a run's best.pt (default: an untrained default U-Net)")
    parser.add_argument("--roi", type=int, default=256, help="window of the default model (default: 256)")
    parser.add_argument("--slab", type=int, default=8, help="inference.slab of the default model (default: 8)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, ...")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_dask_predict"))
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    args.out.mkdir(parents=True, exist_ok=True)
    volume = args.out / "volume.zarr"
    make_volume(volume, args.shape)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.out / "untrained.pt"
        make_checkpoint(checkpoint, args.roi, args.slab)
    from mitoseg.data.readers import read_volume
    from mitoseg.networks.loading import model_from_checkpoint

    slab = model_from_checkpoint(checkpoint)[1].inference.slab
    from mitoseg.inference.dask_predict import block_shape

    chunk = block_shape(tuple(args.shape), tuple(args.chunk) if args.chunk else None, slab)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)  # as local:N gives each of its N workers cores / N threads
    voxels = int(np.prod(args.shape))

    single = single_process(checkpoint, str(volume), args.out / "single.zarr", args.device)
    expected = read_volume(args.out / "single.zarr")
    rows = [("single process", "-", single, single, "-")]
    for workers in args.workers:
        summary = dask_run(workers, checkpoint, str(volume), args.out / f"dask{workers}.zarr", args.device, chunk)
        same = np.array_equal(read_volume(args.out / f"dask{workers}.zarr"), expected)
        rows.append((f"dask local:{workers}", f"{summary['blocks']}", summary["wall"], summary["predict_seconds"],
                     "yes" if same else "NO"))
        shutil.rmtree(args.out / f"dask{workers}.zarr", ignore_errors=True)

    cores = os.cpu_count()
    print(f"\nVolume {' x '.join(map(str, args.shape))} ({voxels / 1e6:.1f} Mvoxel), blocks of "
          f"{' x '.join(map(str, chunk))}, device {args.device}, {cores} cores, model {checkpoint.name}\n")
    print("| run | blocks | wall s | predict s | Mvoxel/s | ratio to single | labels equal |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, blocks, wall, predict, same in rows:
        throughput = voxels / predict / 1e6
        ratio = single / predict
        print(f"| {name} | {blocks} | {wall:.1f} | {predict:.1f} | {throughput:.2f} | {ratio:.2f} | {same} |")


if __name__ == "__main__":
    main()
