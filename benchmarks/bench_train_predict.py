"""Training and prediction throughput on the sample data, and prediction memory vs volume size.

    python benchmarks/bench_train_predict.py [--iters 40] [--config sample_supervised]

Prints: training iterations/s; prediction voxels/s; the bare model forward time
over the same sliding-window tiles (the floor predict is compared with); peak
resident memory of `mitoseg predict` on volumes of 16 and 64 slices (each in its
own process), which must be set by the slab, not by the volume.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mitoseg.config import load_config
from mitoseg.data.readers import open_volume, write_volume
from mitoseg.data.transforms import compute_normalization, sample_for_stats
from mitoseg.engine.trainer import Trainer
from mitoseg.device import autocast
from mitoseg.inference import make_inferer, predict_volume


def bench_training(config: str, iters: int, out: Path) -> tuple[float, Trainer]:
    """Iterations per second of training (data pipeline included; set-up and validation excluded)."""
    cfg = load_config(config, [f"train.val_every={10**9}", f"train.checkpoint_every={10**9}"])
    trainer = Trainer(cfg, out / "run", max_iters=iters, progress=False)
    start = time.perf_counter()
    trainer.fit()
    return iters / (time.perf_counter() - start), trainer


def bench_predict(model, cfg, volume_spec: str) -> dict:
    device = torch.device("cpu")
    with open_volume(volume_spec) as volume:
        normalization = compute_normalization(sample_for_stats(volume), cfg.data.normalize)
        z, y, x = volume.shape
        sink = []
        start = time.perf_counter()
        predict_volume(model, volume.read, z, normalization, cfg, device,
                       lambda s, p: sink.append(p.argmax(1).numpy().astype(np.uint8)), progress=False)
        predict_s = time.perf_counter() - start

    # The same tiles through the bare model: count the windows the inferer makes per slab.
    shapes = []

    def counting(batch):
        shapes.append(tuple(batch.shape))
        return torch.zeros(batch.shape[0], cfg.data.num_classes, *batch.shape[2:])

    inferer = make_inferer(cfg.inference)
    for start_z in range(0, z, cfg.inference.slab):
        n = min(cfg.inference.slab, z - start_z)
        inferer(torch.zeros(n, 1, y, x), counting)
    model.eval()
    start = time.perf_counter()
    with torch.no_grad(), autocast(device, cfg.train.amp):  # the precision predict uses
        for shape in shapes:
            model(torch.randn(shape))
    forward_s = time.perf_counter() - start
    return {"voxels": z * y * x, "predict_s": predict_s, "forward_s": forward_s,
            "windows": sum(s[0] for s in shapes)}


def peak_memory_of_predict(checkpoint: Path, volume: Path, out: Path) -> float:
    """Peak RSS (MiB) of a `mitoseg predict` process."""
    code = (
        "import resource, sys; from mitoseg.cli import main; "
        f"rc = main(['predict', '--checkpoint', r'{checkpoint}', '--input', r'{volume}', '--output', r'{out}', "
        "'--no-progress', '--overwrite']); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sample_supervised")  # a built-in config name or a YAML file
    parser.add_argument("--iters", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        it_per_s, trainer = bench_training(args.config, args.iters, tmp)
        cfg, model = trainer.cfg, trainer.ema.module
        print(f"training: {it_per_s:.2f} it/s (batch {cfg.data.batch_size} x {cfg.data.patch_size}, "
              f"{torch.get_num_threads()} threads)")

        with open_volume(cfg.data.val.image) as val:
            image = val.read(0, 8)
        # 1024 x 1024 slices (the sample tiled 4 x 4): 16 for throughput, 16 vs 64 for memory.
        big = np.tile(image, (8, 4, 4))[:64]
        for n in (16, 64):
            write_volume(tmp / f"vol{n}.tif", big[:n])
        result = bench_predict(model, cfg, str(tmp / "vol16.tif"))
        print(f"predict: {result['voxels'] / result['predict_s'] / 1e6:.2f} Mvoxel/s "
              f"({result['predict_s']:.2f} s for {result['voxels'] / 1e6:.1f} Mvoxel, {result['windows']} windows)")
        print(f"bare forward over the same windows: {result['forward_s']:.2f} s; "
              f"predict / forward = {result['predict_s'] / result['forward_s']:.2f} (target <= 1.2)")
        checkpoint = tmp / "run" / "last.pt"
        memory = {n: peak_memory_of_predict(checkpoint, tmp / f"vol{n}.tif", tmp / f"pred{n}.tif") for n in (16, 64)}
        print("predict peak RSS: " + ", ".join(f"{n} slices {m:.0f} MiB" for n, m in memory.items())
              + f" (volume of 64 slices: {big.nbytes / 2**20:.0f} MiB as uint8, "
              f"{big.nbytes * 4 * cfg.data.num_classes / 2**20:.0f} MiB as float32 probabilities)")
        print(json.dumps({"train_it_per_s": it_per_s, **result, "peak_rss_mib": memory}))


if __name__ == "__main__":
    main()
