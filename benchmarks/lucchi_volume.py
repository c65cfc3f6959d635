"""Accuracy per CPU minute on the whole Lucchi training volume (165 slices, 27 labeled): the CPU recipe.

    # screen the recipe: each change alone on one seed and a short budget (one thread, 8 minutes a run)
    python benchmarks/lucchi_volume.py --volume ../shared/data/lucchi-volume --out runs/lucchi_volume \\
        --screen --seeds 0 --minutes 8 --threads 1
    # confirm: the shipped recipe (configs/lucchi_cpu.yaml) at its own budget, 3 seeds, both cores
    python benchmarks/lucchi_volume.py --volume ../shared/data/lucchi-volume --out runs/lucchi_volume \\
        --variants recipe --seeds 0 1 2 --threads 2
    # the semi-supervised setting: 3 labeled slices and the unlabeled volume
    python benchmarks/lucchi_volume.py --volume ../shared/data/lucchi-volume --out runs/lucchi_volume \\
        --variants recipe --labels 3 --methods supervised daw --seeds 0 1 2 --threads 2
    # tiny, to try the whole script in a minute
    python benchmarks/lucchi_volume.py --volume ../shared/data/lucchi-volume --out /tmp/lv --tiny

The split (the same for every benchmark of the volume, so numbers compare):

- validation: slices 45-48, 89-91, 161-164 (11 slices in three places); their neighbours within 2 slices
  train on nothing, labeled or unlabeled;
- ``--labels 3``: slices 13, 75, 118 labeled; ``--labels oracle``: the 16 other labeled training slices too
  (0-3, 13, 17, 24, 28, 42, 61-63, 75, 105, 118, 135);
- unlabeled (semi-supervised methods): every other slice outside the validation neighbourhoods.

Every run is ``mitoseg train`` on a config this script writes into its folder
(``OUT/VARIANT/LABELS/METHOD/seedS/config.yaml``): the shipped ``lucchi_cpu`` recipe with the volume, the
split and the variant's keys; ``--minutes`` sets ``train.max_minutes`` (the schedule spans the budget).
Validation every ``train.val_every`` iterations (without TTA, to spend the budget on training) gives the
curve against the run's CPU minutes (``metrics.jsonl``: ``cpu_time_s``). When a run ends, its final weights
(``last.pt``: no selection on the validation slices) are scored on the validation slices by ``mitoseg
evaluate --checkpoint`` with the recipe's test-time augmentation. A finished run is read back; an
interrupted one resumes from its ``last.pt`` (so the runs of a benchmark can span sessions).

Output in ``OUT``: ``results.json``, a Markdown table on stdout and in ``table.md`` (mean, std and each
seed), and ``curves.png`` (validation fg IoU against CPU minutes, mean and spread over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from mitoseg.config import BUILTIN_CONFIG_DIR

VALIDATION = [45, 46, 47, 48, 89, 90, 91, 161, 162, 163, 164]
NEIGHBOURHOOD = 2  # slices within this distance of a validation slice train on nothing
LABELED = {
    "3": [13, 75, 118],
    "oracle": [0, 1, 2, 3, 13, 17, 24, 28, 42, 61, 62, 63, 75, 105, 118, 135],
}
NUM_SLICES = 165
IMAGE, LABEL = "train_image.tif", "train_mito_27.tif"


def unlabeled_slices(labeled: list[int]) -> list[int]:
    """Every slice that is neither labeled nor within NEIGHBOURHOOD of a validation slice."""
    near = {v + d for v in VALIDATION for d in range(-NEIGHBOURHOOD, NEIGHBOURHOOD + 1)}
    return [i for i in range(NUM_SLICES) if i not in near and i not in labeled]


def _wide(channels, stem, features=None):
    return {"model.name": "wide_unet", "model.channels": channels, "model.strides": [2] * (len(channels) - 1),
            "model.stem": stem, "model.num_res_units": 1, "model.feature_channels": features or channels[0],
            "model.head_channels": 64}


# The recipe before this benchmark (lucchi_cpu until 2026-12): MONAI's residual U-Net 16-128 at the volume's
# own 5 nm, 128-pixel patches.
UNET_5NM = {"data.pixel_size": None, "model.name": "unet", "model.channels": [16, 32, 64, 128],
            "model.strides": [2, 2, 2], "model.num_res_units": 2, "model.feature_channels": 32,
            "model.head_channels": 32, "data.patch_size": [128, 128], "inference.roi_size": [256, 256]}

# Variants: dotted config keys on top of the shipped recipe. "recipe" is the shipped config unchanged; the
# screen changes one thing at a time from the old recipe, then takes the CPU network at each pixel size.
VARIANTS: dict[str, dict] = {
    "recipe": {},
    "recipe_15min": {"train.max_minutes": 15},  # the same recipe on half the budget
    # The semi-supervised setting (--labels 3) on a 30-minute budget, and each safeguard of the unlabeled
    # loss alone and together (mitoseg/semi/safeguard.py); a supervised run ignores the method keys.
    "semi30": {"train.max_minutes": 30},
    "semi30_warmup": {"train.max_minutes": 30, "method.warmup": 0.5},
    "semi30_guard": {"train.max_minutes": 30, "method.guard_tolerance": 1.5},
    "semi30_safe": {"train.max_minutes": 30, "method.warmup": 0.5, "method.guard_tolerance": 1.5},
    # daw_ddfp's flow made affordable on a CPU (BENCHMARKS.md, "Cost of a daw_ddfp step"): its matrix products
    # in bfloat16, 8192 sampled pixels for its training step and for the perturbation's direction.
    "semi30_safe_flow_cpu": {"train.max_minutes": 30, "method.warmup": 0.5, "method.guard_tolerance": 1.5,
                             "method.ddfp.flow_precision": "bfloat16", "method.ddfp.max_pixels": 8192,
                             "method.ddfp.perturb_max_pixels": 8192},
    "unet_5nm_p128": UNET_5NM,
    "unet_10nm_p128": {**UNET_5NM, "data.pixel_size": 10},
    "unet_20nm_p128": {**UNET_5NM, "data.pixel_size": 20},
    "wide2_10nm_p128": {**UNET_5NM, **_wide([64, 128, 192, 256], 2), "data.pixel_size": 10},
    "wide2_10nm_p256": {**UNET_5NM, **_wide([64, 128, 192, 256], 2), "data.pixel_size": 10,
                        "data.patch_size": [256, 256]},
    "wide4_5nm_p256": {**UNET_5NM, **_wide([96, 128, 192, 256], 4, features=96), "data.patch_size": [256, 256]},
    "unet_10nm_p256": {**UNET_5NM, "data.pixel_size": 10, "data.patch_size": [256, 256]},
    "unet_5nm_p256": {**UNET_5NM, "data.patch_size": [256, 256]},
    "wide2_5nm_p128": {**UNET_5NM, **_wide([64, 128, 192, 256], 2)},
    "unet_5nm_p128_ctx1": {**UNET_5NM, "data.context_slices": 1},
    "unet_5nm_p128_b8": {**UNET_5NM, "data.batch_size": 8},
    "unet_5nm_p128_lr4": {**UNET_5NM, "optim.lr": 0.004},
    "wide4_10nm_p256": {**UNET_5NM, **_wide([96, 128, 192, 256], 4, features=96), "data.pixel_size": 10,
                        "data.patch_size": [256, 256]},
}
SCREEN = ["unet_5nm_p128", "unet_10nm_p128", "unet_20nm_p128", "unet_10nm_p256", "unet_5nm_p256",
          "unet_5nm_p128_ctx1", "wide2_5nm_p128", "wide2_10nm_p128", "wide2_10nm_p256", "wide4_5nm_p256",
          "wide4_10nm_p256"]


def set_key(cfg: dict, dotted: str, value) -> None:
    node = cfg
    *path, last = dotted.split(".")
    for key in path:
        node = node.setdefault(key, {})
    node[last] = value


def run_config(volume: Path, variant: str, labels: str, method: str, seed: int, minutes: float | None,
               tiny: bool, voxel_size=None) -> dict:
    cfg = yaml.safe_load((BUILTIN_CONFIG_DIR / "lucchi_cpu.yaml").read_text())
    labeled = LABELED[labels]
    image, label = str(volume / IMAGE), str(volume / LABEL)
    cfg["seed"] = seed
    data = cfg["data"]
    data["train"] = {"image": image, "label": label, "slices": labeled}
    data["val"] = {"image": image, "label": label, "slices": VALIDATION}
    if voxel_size is not None:  # a volume whose file stores no pixel size
        for entry in (data["train"], data["val"]):
            entry["voxel_size"] = list(voxel_size)
    data.pop("test", None)  # the official test volume is not in shared/
    data.pop("label_map", None)  # the volume's masks are 0 / 1
    if method != "supervised":
        data["unlabeled"] = [{"slices": unlabeled_slices(labeled)}]
        if voxel_size is not None:
            data["unlabeled"][0].update(image=image, voxel_size=list(voxel_size))
    cfg["method"] = {"name": method}
    cfg["train"]["val_tta"] = False  # validation during training; the final score adds TTA
    for key, value in VARIANTS[variant].items():
        set_key(cfg, key, value)
    if minutes is not None:
        cfg["train"]["max_minutes"] = minutes
    if tiny:  # seconds, on any volume of 165 slices of at least 64 x 64 pixels (the suite's synthetic one)
        cfg["train"].update({"max_minutes": 0.05, "val_every": 10, "log_every": 5, "checkpoint_every": 10})
        cfg["data"].update({"pixel_size": None, "patch_size": [64, 64], "batch_size": 2})
        cfg["model"].update({"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1,
                             "feature_channels": 8, "head_channels": 8})
        cfg["inference"].update({"roi_size": [64, 64], "tta": False})
    return cfg


def train(folder: Path, cfg: dict, threads: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yaml"
    resume = (folder / "last.pt").is_file()
    if not resume:
        config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    command = ["mitoseg", "train", "--out", str(folder), "--no-progress", "--threads", str(threads)]
    command += ["--resume"] if resume else ["--config", str(config), "--overwrite"]
    with open(folder / "train.log", "a") as log:
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)


def score_final(folder: Path, cfg: dict, threads: int, weights: str, tta: bool) -> float:
    """fg IoU of the run's final ``weights`` (ema / student) on the validation slices, with or without TTA."""
    out = folder / f"final_{weights}{'_tta' if tta else ''}.json"
    if not out.is_file():
        data = cfg["data"]
        subprocess.run(["mitoseg", "evaluate", "--checkpoint", str(folder / "last.pt"), "--weights", weights,
                        "--image", data["val"]["image"], "--label", data["val"]["label"], "--slices",
                        ",".join(map(str, VALIDATION)), "--set", f"inference.tta={str(tta).lower()}", "--json",
                        str(out), "--overwrite", "--no-progress", "--threads", str(threads)],
                       stdout=subprocess.DEVNULL, check=True)
    return json.loads(out.read_text())["fg_iou"]


def pseudo_label_diagnostics(folder: Path, cfg: dict) -> dict:
    """The final pseudo-labels of a semi-supervised run, where they can be checked: on the oracle slices that
    ``--labels 3`` never trains on (their labels known). The student's probabilities (eval mode, no TTA), DAW's
    alignment and threshold as ``last.pt`` holds them (fixmatch / unimatch: method.threshold): the share of
    wrong pseudo-labels used, of correct ones discarded, and the pseudo-labels' foreground share against the
    truth's (spreading foreground shows there first)."""
    import torch

    from mitoseg.data.readers import SliceReader, open_volume
    from mitoseg.data.resample import volume_pixel_nm
    from mitoseg.inference.session import Segmenter, from_state
    from mitoseg.runs import load_checkpoint

    out = folder / "pseudo_labels.json"
    if out.is_file():
        return json.loads(out.read_text())
    state = load_checkpoint(folder / "last.pt")
    loaded = from_state(state, folder / "last.pt", "student")
    run_cfg = loaded.cfg
    run_cfg.inference.tta = False
    daw = state.get("method", {}).get("daw")
    tau = float(daw["threshold"]) if daw is not None else run_cfg.method.threshold
    scale = None
    if daw is not None and run_cfg.method.daw.alignment:
        scale = (daw["labeled_class_mean"] / daw["unlabeled_class_mean"].clamp_min(1e-8)).float()
    slices = [s for s in LABELED["oracle"] if s not in LABELED["3"]]
    image, label = cfg["data"]["val"]["image"], cfg["data"]["val"]["label"]
    voxel = cfg["data"]["val"].get("voxel_size")
    counts = dict.fromkeys(("wrong", "wrong_used", "correct", "correct_discarded", "pseudo_fg", "true_fg", "n"), 0)
    with open_volume(image) as volume, open_volume(label) as truth_volume:
        prepared = Segmenter(loaded, run_cfg).prepare(volume, image, volume_pixel_nm(image, voxel), indices=slices,
                                                      log=False)
        truth = SliceReader(truth_volume, slices)
        for start, stop, probs in prepared.slabs():
            if scale is not None:
                probs = probs * scale.view(1, -1, 1, 1)
                probs = probs / probs.sum(dim=1, keepdim=True)
            confidence, pseudo = probs.max(dim=1)
            y = torch.from_numpy(truth.read(start, stop).astype(np.int64)) > 0
            used, pseudo = confidence.cpu() >= tau, pseudo.cpu() > 0
            correct = pseudo == y
            counts["wrong"] += int((~correct).sum())
            counts["wrong_used"] += int((~correct & used).sum())
            counts["correct"] += int(correct.sum())
            counts["correct_discarded"] += int((correct & ~used).sum())
            counts["pseudo_fg"] += int(pseudo.sum())
            counts["true_fg"] += int(y.sum())
            counts["n"] += y.numel()
    result = {"tau": tau, "align_fg_over_bg": float(scale[1] / scale[0]) if scale is not None else 1.0,
              "wrong_used": counts["wrong_used"] / max(1, counts["wrong"]),
              "correct_discarded": counts["correct_discarded"] / max(1, counts["correct"]),
              "pseudo_accuracy": counts["correct"] / max(1, counts["n"]),
              "pseudo_fg": counts["pseudo_fg"] / max(1, counts["n"]), "true_fg": counts["true_fg"] / max(1, counts["n"])}
    out.write_text(json.dumps(result, indent=1))
    return result


def read_run(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    return {
        "iterations": summary["iterations"],
        "cpu_minutes": summary.get("cpu_time_s", 0.0) / 60,
        "wall_minutes": summary["wall_time_s"] / 60,
        "final": summary["final"]["fg_iou"],
        "curve": [(r.get("cpu_time_s", 0.0) / 60, r["fg_iou"]) for r in val],
    }


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in results.items():
        curves = [r["curve"] for r in runs if r["curve"]]
        if not curves:
            continue
        # Between the first and the last validation every seed has (no line before a run's first point).
        start, end = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
        grid = np.linspace(start, end, 60)
        values = np.array([np.interp(grid, [t for t, _ in c], [v for _, v in c]) for c in curves])
        line, = ax.plot(grid, values.mean(0), label=f"{name} (n={len(curves)})")
        ax.plot([t for t, _ in curves[0]], [v for _, v in curves[0]], "o", color=line.get_color(), markersize=3)
        if len(curves) > 1:
            ax.fill_between(grid, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("CPU minutes of the run (all threads)")
    ax.set_ylabel("validation fg IoU (EMA, no TTA)")
    ax.set_ylim(0.5, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("Lucchi volume, validation slices 45-48, 89-91, 161-164")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--volume", type=Path, required=True, help="folder of train_image.tif, train_mito_27.tif")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=["recipe"], choices=sorted(VARIANTS))
    parser.add_argument("--screen", action="store_true", help="the screening variants")
    parser.add_argument("--labels", nargs="+", choices=sorted(LABELED), default=["oracle"])
    parser.add_argument("--methods", nargs="+", default=["supervised"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--minutes", type=float, help="train.max_minutes of every run (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--voxel-size", type=float, nargs=3, metavar=("Z", "Y", "X"),
                        help="nm per voxel, for a volume whose file does not store it (default: its metadata)")
    parser.add_argument("--tiny", action="store_true", help="3-second runs on small models, to try the script")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: the table and curves of the finished runs among those named")
    args = parser.parse_args()
    for name in (IMAGE, LABEL):
        if not (args.volume / name).is_file():
            sys.exit(f"lucchi_volume: {args.volume / name} not found")
    variants = SCREEN if args.screen else args.variants
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    results: dict[str, list[dict]] = {}
    runs = [(v, labels, m) for v in variants for labels in args.labels for m in args.methods
            if not (labels == "oracle" and m != "supervised")]  # the oracle has no unlabeled slices to speak of
    for variant, labels, method in runs:
        name = f"{variant} / {labels} / {method}"
        for seed in args.seeds:
            folder = args.out / variant / labels / method / f"seed{seed}"
            cfg = run_config(args.volume, variant, labels, method, seed, args.minutes, args.tiny,
                             args.voxel_size)
            if not (folder / "summary.json").is_file():
                if args.report:
                    continue
                print(f"training {folder}", flush=True)
                train(folder, cfg, args.threads)
            run = read_run(folder)
            run["seed"] = seed
            # The final weights both ways: the EMA lags far behind a short run's student (its BatchNorm
            # statistics and weights average a fast-moving trajectory), which a fixed budget makes visible.
            for weights in ("ema", "student"):
                run[f"final_{weights}"] = score_final(folder, cfg, args.threads, weights, tta=False)
            run["final_tta"] = score_final(folder, cfg, args.threads, cfg["train"].get("eval_model", "ema")
                                           if cfg["train"].get("eval_model") in ("ema", "student") else
                                           max(("ema", "student"), key=lambda w: run[f"final_{w}"]), tta=True)
            if method != "supervised":
                run["pseudo_labels"] = pseudo_label_diagnostics(folder, cfg)
            results.setdefault(name, []).append(run)
            print(f"{name} seed {seed}: {run['iterations']} iterations, {run['cpu_minutes']:.1f} CPU min, "
                  f"final fg IoU EMA {run['final_ema']:.4f}, student {run['final_student']:.4f}, "
                  f"with TTA {run['final_tta']:.4f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = ["| variant / labels / method | n | iterations | CPU min | wall min | final EMA | final student | "
            "validated weights + TTA | seeds (TTA) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        tta = [r["final_tta"] for r in runs]
        rows.append(f"| {name} | {len(runs)} | {np.mean([r['iterations'] for r in runs]):.0f} | "
                    f"{np.mean([r['cpu_minutes'] for r in runs]):.1f} | {np.mean([r['wall_minutes'] for r in runs]):.1f} | "
                    f"{mean_std([r['final_ema'] for r in runs])} | {mean_std([r['final_student'] for r in runs])} | "
                    f"{mean_std(tta)} | {', '.join(f'{v:.3f}' for v in tta)} |")
    semi = [(name, r) for name, runs in results.items() for r in runs if "pseudo_labels" in r]
    if semi:
        rows += ["", "Final pseudo-labels on the 13 oracle slices no `--labels 3` run trains on (student, no TTA, the "
                 "run's last threshold and alignment):", "",
                 "| variant / labels / method | seed | threshold | alignment fg / bg | wrong used | correct discarded | "
                 "pseudo-label accuracy | foreground: pseudo / true |", "|---|---|---|---|---|---|---|---|"]
        for name, r in semi:
            p = r["pseudo_labels"]
            rows.append(f"| {name} | {r['seed']} | {p['tau']:.3f} | {p['align_fg_over_bg']:.3f} | {p['wrong_used']:.3f} | "
                        f"{p['correct_discarded']:.3f} | {p['pseudo_accuracy']:.3f} | {p['pseudo_fg']:.3f} / "
                        f"{p['true_fg']:.3f} |")
    table = "\n".join(rows)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "curves.png")


if __name__ == "__main__":
    main()
