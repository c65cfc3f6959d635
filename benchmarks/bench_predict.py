"""Prediction on the CPU: `predict` against the bare model over the same windows, the cost of TTA, and how
time and memory grow with the volume.

    python benchmarks/bench_predict.py --threads 1 --clock cpu [--config sample_daw --repeat 3]

The network is the config's (its weights do not change the cost), channels-last and in eval mode as a
checkpoint loads it, under the run's mixed precision (`train.amp`). The volume is the sample validation
volume tiled to --size x --size.

- predict: `inference.predict_volume` (slabs, MONAI's sliding window with Gaussian blending, softmax,
  argmax to uint8 labels) against the model's forward over the same windows (counted by running the
  inferer with a stand-in network), both the fastest of --repeat;
- TTA: the same with `inference.tta: true` (8 flips / quarter turns), its cost over the plain predict
  (target <= 8.5x);
- growth: predict time per voxel for volumes of --slices slices, and the peak resident memory of a
  `mitoseg predict` process (a fresh process per size, writing labels to a TIFF) for the smallest and the
  largest, which must not grow with the volume.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mitoseg.config import input_channels, load_config
from mitoseg.data.readers import open_volume, write_volume
from mitoseg.data.transforms import compute_normalization, sample_for_stats
from mitoseg.device import autocast, fast_memory_format
from mitoseg.inference import labels_from_probabilities, make_inferer, predict_volume
from mitoseg.networks import build_model

CLOCK = time.perf_counter


def fastest(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


def predict_seconds(model, cfg, volume: np.ndarray, repeat: int) -> float:
    normalization = compute_normalization(sample_for_stats(volume), cfg.data.normalize)
    device = torch.device("cpu")

    def run():
        labels = []
        predict_volume(model, lambda a, b: volume[a:b], volume.shape[0], normalization, cfg, device,
                       lambda start, probs: labels.append(labels_from_probabilities(probs)),
                       progress=False)
    return fastest(run, repeat)


def window_shapes(cfg, volume: np.ndarray) -> list[tuple]:
    shapes = []

    def counting(batch):
        shapes.append(tuple(batch.shape))
        return torch.zeros(batch.shape[0], cfg.data.num_classes, *batch.shape[2:])

    inferer = make_inferer(cfg.inference)
    z, y, x = volume.shape
    for start in range(0, z, cfg.inference.slab):
        inferer(torch.zeros(min(cfg.inference.slab, z - start), 1, y, x), counting)
    return shapes


def bare_seconds(model, cfg, shapes, repeat: int) -> float:
    batches = [torch.randn(shape).contiguous(memory_format=torch.channels_last) for shape in shapes]

    def run():
        with torch.no_grad(), autocast(torch.device("cpu"), cfg.train.amp):
            for batch in batches:
                model(batch)
    return fastest(run, repeat)


def peak_rss_of_predict(config: str, volume: Path, out: Path, threads: int) -> tuple[float, float, float]:
    """(peak RSS in MiB, wall seconds, CPU seconds) of a `mitoseg predict` process (start-up, checkpoint load,
    TIFF read, prediction, TIFF write) on a checkpoint of the config's network."""
    code = (
        "import resource, sys, time, torch; from mitoseg.cli import main; "
        f"torch.set_num_threads({threads}); start = time.perf_counter(); "
        f"rc = main(['predict', '--checkpoint', r'{out.parent / 'model.pt'}', '--input', r'{volume}', "
        f"'--output', r'{out}', '--no-progress', '--overwrite']); "
        "usage = resource.getrusage(resource.RUSAGE_SELF); "
        "print(usage.ru_maxrss / 1024, time.perf_counter() - start, usage.ru_utime + usage.ru_stime); "
        "sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rss, seconds, cpu = result.stdout.strip().splitlines()[-1].split()
    return float(rss), float(seconds), float(cpu)


def write_checkpoint(config: str, path: Path) -> None:
    """A checkpoint of the config's untrained network, written by a one-iteration run."""
    from mitoseg.engine.trainer import Trainer

    cfg = load_config(config, ["train.val_every=1000000000", "train.checkpoint_every=1", "method.name=supervised"])
    Trainer(cfg, path.parent / "run", max_iters=1, progress=False).fit()
    (path.parent / "run" / "last.pt").rename(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sample_daw")
    parser.add_argument("--size", type=int, default=512, help="y-x size of the tiled volume")
    parser.add_argument("--slices", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the `mitoseg predict` processes")
    args = parser.parse_args()
    global CLOCK
    torch.set_num_threads(args.threads)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    cfg = load_config(args.config)
    model = fast_memory_format(build_model(cfg.model, cfg.data.num_classes, input_channels(cfg))).eval()
    with open_volume(cfg.data.val.image) as val:
        sample = val.read(0, len(val))
    reps = -(-args.size // sample.shape[1])
    base = np.tile(sample, (-(-max(args.slices) // sample.shape[0]), reps, reps))[:, :args.size, :args.size]
    print(f"{args.config}: {cfg.model.name} {cfg.model.channels}, roi {cfg.inference.roi_size}, overlap "
          f"{cfg.inference.overlap}, sw_batch {cfg.inference.sw_batch_size}, slab {cfg.inference.slab}; "
          f"{torch.get_num_threads()} thread(s), {args.clock} time, fastest of {args.repeat}")

    volume = base[:8]
    shapes = window_shapes(cfg, volume)
    # Alternated pairs (predict, then the bare forward, repeat times): the ratio of each pair sees the same
    # machine, and their median is steadier than a ratio of two minimums taken minutes apart on a shared host.
    pairs = [(predict_seconds(model, cfg, volume, 1), bare_seconds(model, cfg, shapes, 1)) for _ in range(args.repeat)]
    plain, bare = min(p for p, _ in pairs), min(b for _, b in pairs)
    ratios = sorted(p / b for p, b in pairs)
    print(f"predict / bare forward of each pair: {', '.join(f'{r:.3f}' for r in ratios)}; median "
          f"{ratios[len(ratios) // 2]:.3f} (target <= 1.05)")
    voxels = volume.size
    print(f"predict, {volume.shape}: {plain:.2f} s ({voxels / plain / 1e6:.2f} Mvoxel/s); bare forward over the "
          f"same {sum(s[0] for s in shapes)} windows: {bare:.2f} s; predict / bare = {plain / bare:.2f}")
    tta_ratios = []
    for _ in range(max(1, args.repeat // 2)):
        cfg.inference.tta = True
        tta = predict_seconds(model, cfg, volume, 1)
        cfg.inference.tta = False
        tta_ratios.append(tta / predict_seconds(model, cfg, volume, 1))
    tta_ratios.sort()
    print(f"predict with TTA (8 transforms) / plain, alternated: {', '.join(f'{r:.2f}' for r in tta_ratios)}; "
          f"median {tta_ratios[len(tta_ratios) // 2]:.2f}x (target <= 8.2x)")

    # Read: the input volume as stored (its dtype); written: the uint8 labels. MB = 10^6 bytes, per second of
    # the clock above (compute: no disk in these in-memory runs; the processes below add the TIFF files).
    print(f"{'slices':>6} {'Mvoxel':>8} {'s':>8} {'ns / voxel':>11} {'MB/s read':>10} {'MB/s written':>13}")
    for n in args.slices:
        seconds = predict_seconds(model, cfg, base[:n], args.repeat)
        read_mb, written_mb = base[:n].nbytes / 1e6, base[:n].size / 1e6
        print(f"{n:>6} {base[:n].size / 1e6:8.2f} {seconds:8.2f} {seconds / base[:n].size * 1e9:11.1f} "
              f"{read_mb / seconds:10.2f} {written_mb / seconds:13.2f}")

    if not args.no_memory:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            write_checkpoint(args.config, tmp / "model.pt")
            for n in (min(args.slices), max(args.slices)):
                write_volume(tmp / f"vol{n}.tif", base[:n])
                rss, seconds, cpu = peak_rss_of_predict(args.config, tmp / f"vol{n}.tif", tmp / f"pred{n}.tif",
                                                        args.threads)
                read_mb, written_mb = (tmp / f"vol{n}.tif").stat().st_size / 1e6, (tmp / f"pred{n}.tif").stat().st_size / 1e6
                print(f"mitoseg predict, {n} slices of {args.size} x {args.size}: peak RSS {rss:.0f} MiB, "
                      f"{seconds:.1f} s wall, {cpu:.1f} s CPU (volume {base[:n].nbytes / 2**20:.0f} MiB as uint8); "
                      f"files {read_mb:.1f} MB read, {written_mb:.1f} MB written: {read_mb / cpu:.2f} and "
                      f"{written_mb / cpu:.2f} MB per CPU second")


if __name__ == "__main__":
    main()
