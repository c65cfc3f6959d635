"""Expected wall time of the papers' official schedules (the shipped Pascal VOC / Cityscapes configs).

    python benchmarks/official_schedules.py [--gpus 1 4]

Iterations come from the configs (``train.epochs``, per-process batch sizes) and the shipped split
lists: an epoch is one pass over the unlabeled list (semi-supervised) or the labeled list
(supervised) split among the processes, as UniMatch's and DAW's code count it. Seconds per step are
the H200 measurements of ``benchmarks/bench_deeplab.py`` in BENCHMARKS.md (AMP, ResNet-101, the
trainer's full ``train_step``); a config whose crop and batch were not measured gets an estimate
affine in its pixels per step (see ``seconds_per_step``), marked so. Evaluation
and data loading stalls are not counted. With several GPUs each process keeps its batch, so the
iterations divide by the number of GPUs (the all-reduce of the gradients is not counted either).
"""

from __future__ import annotations

import argparse
import tempfile

from mitoseg.config import BUILTIN_CONFIG_DIR, load_config
from mitoseg.data import natural
from mitoseg.methods.base import _METHODS

CONFIGS = BUILTIN_CONFIG_DIR  # the configs shipped inside the package
# (method, crop, labeled batch) -> seconds per step on one H200 (BENCHMARKS.md, "DeepLabV3+").
MEASURED = {
    ("supervised", 321, 2): 0.066, ("unimatch", 321, 2): 0.107, ("daw", 321, 2): 0.116,
    ("ddfp", 321, 2): 0.106, ("daw_ddfp", 321, 2): 0.188,
    ("daw", 513, 4): 0.185, ("daw_ddfp", 513, 4): 0.240,
}


def seconds_per_step(method: str, crop: int, batch: int) -> tuple[float, str]:
    """Measured, or estimated as ``a + b * pixels per step``: a GPU step is partly fixed cost (kernel
    launches) and partly proportional to the pixels. ``b`` is fitted on the methods measured at two shapes
    (daw, daw_ddfp) and, for the others, taken as daw's scaled by the ratio of the two methods' times at
    the shape both were measured at."""
    if (method, crop, batch) in MEASURED:
        return MEASURED[method, crop, batch], "measured"
    pixels = crop ** 2 * batch
    points = sorted((c ** 2 * b, t) for (m, c, b), t in MEASURED.items() if m == method)
    if len(points) >= 2:
        (p0, t0), (p1, t1) = points[0], points[-1]
        slope = (t1 - t0) / (p1 - p0)
        return t0 + slope * (pixels - p0), "interpolated in pixels"
    (p0, t0), = points
    daw = sorted((c ** 2 * b, t) for (m, c, b), t in MEASURED.items() if m == "daw")
    slope = (daw[-1][1] - daw[0][1]) / (daw[-1][0] - daw[0][0]) * t0 / MEASURED["daw", 321, 2]
    return t0 + slope * (pixels - p0), "extrapolated in pixels"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    header = " | ".join(f"{g} GPU{'s' if g > 1 else ''}: iterations, hours" for g in args.gpus)
    print(f"| config | epochs | crop, batch per GPU | seconds per step (H200) | {header} |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in args.gpus) + " |")
    with tempfile.TemporaryDirectory() as root:  # the lists are read relative to a data root; no image is opened
        for dataset in ("pascal", "cityscapes"):
            for method in ("supervised", "unimatch", "daw", "ddfp", "daw_ddfp"):
                cfg = load_config(CONFIGS / f"{dataset}_{method}.yaml", [f"data.root={root}"])
                uses_unlabeled = _METHODS[method].uses_unlabeled
                step, how = seconds_per_step(method, cfg.data.crop_size, cfg.data.batch_size)
                cells = []
                for gpus in args.gpus:
                    iterations = cfg.train.epochs * natural.iterations_per_epoch(cfg, uses_unlabeled, gpus)
                    cells.append(f"{iterations:,}, {iterations * step / 3600:.1f}")
                print(f"| `{dataset}_{method}` | {cfg.train.epochs} | {cfg.data.crop_size}, {cfg.data.batch_size} "
                      f"| {step:.3f} ({how}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
