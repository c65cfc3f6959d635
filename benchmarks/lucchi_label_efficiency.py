"""Label efficiency on real EM: the Lucchi subset with 3 labeled slices.

    python benchmarks/lucchi_label_efficiency.py --subset ../shared/data/lucchi-subset \
        [--iterations 400] [--methods supervised fixmatch unimatch daw oracle] [--seeds 0 1 2] \
        [--out runs/lucchi_le]

The subset holds 27 slices of the Lucchi training volume (their original indices
in slices.txt) in short runs of near-identical neighbours. The split keeps
neighbours on the same side:

- validation: subset slices 22-26 (original 135, 161-164), never trained on;
- labeled: subset slices 4, 13, 20 (original 13, 61, 105), far apart;
- unlabeled: the other 19 training slices (their labels read for analysis only);
- oracle: all 22 training slices labeled, supervised.

`ddfp` and `daw_ddfp` (also accepted by --methods) start their flow after a
quarter of the iterations.

Every method runs with the same model, iterations, batch sizes and seeds; the
tables report, per seed and as the mean and spread over seeds, the final
validation fg_iou of the EMA model, and the wall time of each run on this
machine. A run whose `OUT/seedS/METHOD/summary.json` exists is read back, not
repeated, and an interrupted run resumes from its `last.pt`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mitoseg.config import config_from_dict
from mitoseg.engine.trainer import Trainer

VALIDATION = list(range(22, 27))
LABELED = [4, 13, 20]
TRAINING = [i for i in range(27) if i not in VALIDATION]
UNLABELED = [i for i in TRAINING if i not in LABELED]


def config_for(method: str, subset: Path, iterations: int, seed: int) -> dict:
    image, label = str(subset / "train_image.tif"), str(subset / "train_mito.tif")
    oracle = method == "oracle"
    cfg = {
        "seed": seed,
        "data": {
            "train": {"image": image, "label": label, "slices": TRAINING if oracle else LABELED},
            "val": {"image": image, "label": label, "slices": VALIDATION},
            "num_classes": 2,
            "patch_size": [128, 128],
            "batch_size": 4,
            "unlabeled_batch_size": 4,
            "foreground_sampling": 0.5,
        },
        "model": {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2},
        "method": {"name": "supervised" if oracle else method},
        "optim": {"name": "adamw", "lr": 0.002},
        "train": {"iterations": iterations, "val_every": max(iterations // 4, 1), "log_every": 20,
                  "checkpoint_every": iterations, "inspect_every": iterations},
        "inference": {"roi_size": [256, 256], "overlap": 0.25, "sw_batch_size": 4},
    }
    if method not in ("supervised", "oracle"):
        cfg["data"]["unlabeled"] = [{"image": image, "label": label, "slices": UNLABELED}]
    if method == "ddfp":
        cfg["method"]["pseudo_labels"] = "teacher"  # the paper's mean teacher
    if method in ("ddfp", "daw_ddfp"):
        # The flow warms up for the first quarter of the run (method.ddfp.start_iter defaults to 500).
        cfg["method"]["ddfp"] = {"start_iter": iterations // 4}
    return cfg


def run_one(method: str, args, seed: int) -> dict:
    out = args.out / f"seed{seed}" / method
    if (out / "summary.json").is_file():  # finished earlier: read back
        summary = json.loads((out / "summary.json").read_text())
    else:
        cfg = config_from_dict(config_for(method, args.subset, args.iterations, seed))
        # An interrupted run continues from its last checkpoint.
        summary = Trainer(cfg, out, resume=(out / "last.pt").is_file(), progress=False).fit()
    return {"method": method, "seed": seed, "final_fg_iou": summary["final"]["fg_iou"],
            "best_fg_iou": summary["best"]["value"], "best_iteration": summary["best"]["iteration"],
            "minutes": summary["wall_time_s"] / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", type=Path, default=Path("../shared/data/lucchi-subset"))
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=["supervised", "fixmatch", "unimatch", "daw", "oracle"])
    parser.add_argument("--out", type=Path, default=Path("runs/lucchi_le"))
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        for method in args.methods:
            rows.append(run_one(method, args, seed))
            print(json.dumps(rows[-1]), flush=True)
            (args.out / "table.json").write_text(json.dumps(rows, indent=2))

    print(f"\n{args.iterations} iterations, labeled {LABELED} (oracle: {len(TRAINING)} slices), "
          f"validation {VALIDATION} of the subset, seeds {args.seeds}; final fg_iou of the EMA model\n")
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    print(f"| method | {seeds} | mean (std) | minutes per run |")
    print("| --- |" + " --- |" * (len(args.seeds) + 2))
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        scores = torch.tensor([r["final_fg_iou"] for r in mine], dtype=torch.float64)
        spread = f"{scores.std().item():.3f}" if len(mine) > 1 else "-"
        cells = " | ".join(f"{r['final_fg_iou']:.3f}" for r in mine)
        minutes = sum(r["minutes"] for r in mine) / len(mine)
        print(f"| {method} | {cells} | {scores.mean().item():.3f} ({spread}) | {minutes:.1f} |")


if __name__ == "__main__":
    main()
