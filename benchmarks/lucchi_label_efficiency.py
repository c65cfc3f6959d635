"""Accuracy on real EM at convergence: the Lucchi subset, its label efficiency and an ablation of the recipe.

    # the methods at convergence, 3 seeds, two runs at a time with one thread each (2-core CPU)
    python benchmarks/lucchi_label_efficiency.py --recipe cpu --methods supervised daw oracle \\
        --seeds 0 1 2 --jobs 2 --threads 1 --out runs/lucchi
    # each change of the recipe alone, then all together, on the same seeds
    python benchmarks/lucchi_label_efficiency.py --recipe baseline --ablation --methods oracle \\
        --seeds 0 1 --jobs 2 --threads 1 --out runs/lucchi_ablation
    # on a GPU machine: many runs at once on the one GPU, the CPU cores shared among them
    python benchmarks/lucchi_label_efficiency.py --recipe gpu --methods supervised fixmatch unimatch daw \\
        ddfp daw_ddfp oracle --seeds 0 1 2 --jobs 12 --threads 1 --out $OUT/lucchi
    # tiny, to try the whole script (and a GPU script) on a CPU in a minute
    python benchmarks/lucchi_label_efficiency.py --recipe cpu --tiny --methods supervised daw --jobs 2

The subset (``../shared/data/lucchi-subset``) holds 27 slices of the Lucchi training
volume (their original indices in slices.txt) in short runs of near-identical
neighbours. The split keeps neighbours on the same side:

- validation: subset slices 22-26 (original 135, 161-164), never trained on;
- labeled: subset slices 4, 13, 20 (original 13, 61, 105), far apart;
- unlabeled: the other 19 training slices (their labels read for analysis only);
- oracle: all 22 training slices labeled, supervised.

Every run is ``mitoseg train`` on a config this script writes into the run folder
(``OUT/RECIPE/VARIANT/seedS/METHOD/config.yaml``), with ``OMP_NUM_THREADS`` set to
``--threads``; ``--jobs`` runs go at once. Validation every ``train.val_every``
iterations gives the curve (``metrics.jsonl``). When a run ends, its final weights
(``last.pt``, EMA: no selection on the validation slices) are scored on the
validation slices by ``mitoseg evaluate --checkpoint`` three ways: plain, with
test-time augmentation, and with TTA + post-processing. A finished run is read back,
an interrupted one resumes from its ``last.pt``.

Output, in ``OUT/RECIPE/`` (``methods_*`` or, with ``--ablation``, ``ablation_*``):
``*_results.json``, a Markdown table on stdout and in ``*_table.md``, and the curves,
mean and spread over seeds of every method and variant, in ``*_curves.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from mitoseg.config import BUILTIN_CONFIG_DIR

VALIDATION = list(range(22, 27))
LABELED = [4, 13, 20]
TRAINING = [i for i in range(27) if i not in VALIDATION]
UNLABELED = [i for i in TRAINING if i not in LABELED]
SEMI_SUPERVISED = ("fixmatch", "unimatch", "daw", "ddfp", "daw_ddfp")

# Recipes: config values on top of the common base (dotted keys). "baseline" is the recipe of the
# first version of this benchmark (400 iterations, far from converged); the others train until the
# validation curve has flattened.
BASE = {
    "data.num_classes": 2,
    "data.patch_size": [128, 128],
    "data.batch_size": 4,
    "data.unlabeled_batch_size": 4,
    "data.foreground_sampling": 0.5,
    "model.channels": [16, 32, 64, 128],
    "model.strides": [2, 2, 2],
    "model.num_res_units": 2,
    "optim.name": "adamw",
    "optim.lr": 0.002,
    "train.iterations": 400,
    "train.log_every": 20,
    "inference.roi_size": [256, 256],
    "inference.overlap": 0.25,
    "inference.sw_batch_size": 4,
}
CONFIGS = BUILTIN_CONFIG_DIR  # the configs shipped inside the package
# Keys of a shipped config that are not the recipe: the data it reads, the method, the logging cadence.
NOT_RECIPE = ("seed", "device", "data.train", "data.val", "data.test", "data.unlabeled", "data.label_map",
              "data.num_workers", "method", "train.val_every", "train.log_every", "train.checkpoint_every",
              "train.inspect_every", "train.inspect_patches")


def recipe_from_config(name: str) -> dict:
    """The recipe of the built-in config ``NAME`` (``mitoseg/configs/NAME.yaml``) as dotted keys (model, optimizer, schedule, patches, augmentation,
    inference): the benchmark measures exactly what the shipped config trains."""
    flat: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if any(dotted == skip or dotted.startswith(skip + ".") for skip in NOT_RECIPE):
                continue
            if isinstance(value, dict):
                walk(value, dotted + ".")
            else:
                flat[dotted] = value

    walk(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()), "")
    return flat


RECIPES = {
    "baseline": lambda: {},
    "baseline_long": lambda: {"train.iterations": 3000},
    "cpu": lambda: recipe_from_config("lucchi_cpu"),  # 30 minutes on 2 CPU cores
    "gpu": lambda: recipe_from_config("lucchi_supervised"),  # the GPU configs' recipe (lucchi_*)
}
# The changes the ablation tries, each alone on the recipe, then all together.
VARIANTS = {
    "patch256": {"data.patch_size": [256, 256]},
    "deeper": {"model.channels": [16, 32, 64, 128, 256], "model.strides": [2, 2, 2, 2]},
    "warmup_cosine": {"optim.warmup_iters": 200, "optim.schedule": "cosine"},
    "fg_sampling_0.1": {"data.foreground_sampling": 0.1},
    "ce_only": {"train.dice_weight": 0.0},
    "elastic_gamma": {"data.augment.elastic_prob": 0.5, "data.augment.gamma": [0.7, 1.4]},
    "fp32": {"train.amp": False},
}
# Post-processing scored on every run's final weights (after TTA).
POSTPROCESS = {"inference.min_object_voxels": 500, "inference.fill_holes": True}


def set_dotted(cfg: dict, key: str, value) -> None:
    node = cfg
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = copy.deepcopy(value)


def config_for(method: str, subset: Path, overrides: dict, seed: int) -> dict:
    image, label = str(subset / "train_image.tif"), str(subset / "train_mito.tif")
    oracle = method == "oracle"
    cfg: dict = {"seed": seed}
    for key, value in {**BASE, **overrides}.items():
        set_dotted(cfg, key, value)
    iterations = cfg["train"]["iterations"]
    cfg["train"].setdefault("val_every", max(iterations // 20, 1))
    cfg["train"].setdefault("checkpoint_every", max(iterations // 10, 1))
    cfg["train"].setdefault("inspect_every", iterations)
    # The subset's TIFF stores no pixel size: Lucchi's is 5 nm (a recipe with data.pixel_size in nm needs it).
    voxel = [5.0, 5.0, 5.0]
    cfg["data"]["train"] = {"image": image, "label": label, "slices": TRAINING if oracle else LABELED,
                            "voxel_size": voxel}
    cfg["data"]["val"] = {"image": image, "label": label, "slices": VALIDATION, "voxel_size": voxel}
    cfg.setdefault("method", {})["name"] = "supervised" if oracle else method
    if method in SEMI_SUPERVISED:
        cfg["data"]["unlabeled"] = [{"image": image, "label": label, "slices": UNLABELED, "voxel_size": voxel}]
    if method in ("ddfp", "daw_ddfp"):
        # The flow warms up for the first quarter of the run (method.ddfp.start_iter defaults to 500).
        cfg["method"].setdefault("ddfp", {})["start_iter"] = iterations // 4
    return cfg


def runs_of(args) -> list[dict]:
    """Every run the arguments ask for: (variant, seed, method) with its config overrides."""
    recipe = RECIPES[args.recipe]()
    if args.iterations:
        recipe["train.iterations"] = args.iterations
    if args.tiny:
        recipe.update({"train.iterations": 8, "train.val_every": 4, "train.checkpoint_every": 4,
                       "data.patch_size": [64, 64], "inference.roi_size": [128, 128]})
    variants = {"recipe": {}}
    if args.ablation:
        chosen = args.variants or list(VARIANTS)
        variants.update({name: VARIANTS[name] for name in chosen})
        if len(chosen) > 1:
            variants["all"] = {k: v for name in chosen for k, v in VARIANTS[name].items()}
    runs = []
    for variant, changes in variants.items():
        for seed in args.seeds:
            for method in args.methods:
                # Validation during training without TTA (8x cheaper): the curves; the final weights are
                # scored with and without TTA at the end.
                overrides = {**recipe, **changes, "inference.tta": False}
                if args.tiny:  # keep the tiny sizes whatever the variant says
                    overrides.update({k: recipe[k] for k in ("data.patch_size", "inference.roi_size")})
                    overrides["optim.warmup_iters"] = min(overrides.get("optim.warmup_iters", 0), 2)
                    if "model.strides" in overrides and len(overrides["model.strides"]) > 3:
                        overrides["data.patch_size"] = [64, 64]
                runs.append({"variant": variant, "seed": seed, "method": method,
                             "dir": args.out / args.recipe / variant / f"seed{seed}" / method,
                             "config": config_for(method, args.subset, overrides, seed)})
    return runs


def mitoseg(*argv, threads: int, log) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-m", "mitoseg", *map(str, argv)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"mitoseg {' '.join(map(str, argv[:1]))} failed ({result.returncode}); see {log.name}")


def score_ways() -> dict[str, list[str]]:
    """``mitoseg evaluate`` settings of the final-weights scores: plain, TTA, TTA + post-processing."""
    post = [f"--set=inference.{k.split('.')[1]}={str(v).lower()}" for k, v in POSTPROCESS.items()]
    return {"plain": ["--set=inference.tta=false"], "tta": ["--set=inference.tta=true"],
            "tta_post": ["--set=inference.tta=true", *post]}


def run_one(run: dict, args) -> dict:
    out: Path = run["dir"]
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    config.write_text(yaml.safe_dump(run["config"], sort_keys=False))
    with open(out / "log.txt", "a") as log:
        if not (out / "summary.json").is_file() or not json.loads((out / "summary.json").read_text())["completed"]:
            resume = ["--resume"] if (out / "last.pt").is_file() else ["--overwrite"]
            mitoseg("train", "--config", config, "--out", out, "--no-progress", *resume, threads=args.threads, log=log)
        for way, settings in score_ways().items():
            target = out / f"final_{way}.json"
            if not target.is_file():
                mitoseg("evaluate", "--checkpoint", out / "last.pt", "--image", args.subset / "train_image.tif",
                        "--label", args.subset / "train_mito.tif", "--slices", "22:27", *settings, "--json", target,
                        "--overwrite", "--no-progress", threads=args.threads, log=log)
        objects = out / "final_instances.json"
        if not objects.is_file():
            # Objects in 3-D need neighbouring slices: the validation run 23-26 (original 161-164), predicted
            # with TTA, its components against the ground truth's.
            image, label = contiguous_validation(args)
            prediction = out / "validation_161_164_prediction.tif"
            mitoseg("predict", "--checkpoint", out / "last.pt", "--input", image, "--output", prediction, "--tta",
                    "--overwrite", "--no-progress", threads=args.threads, log=log)
            mitoseg("evaluate", "--instances", "--prediction", prediction, "--label", label, "--json", objects,
                    "--overwrite", "--no-progress", threads=args.threads, log=log)
    summary = json.loads((out / "summary.json").read_text())
    curve = [(r["iter"], r["fg_iou"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r.get("split") == "val"]
    finals = {way: json.loads((out / f"final_{way}.json").read_text()) for way in score_ways()}
    return {"variant": run["variant"], "seed": run["seed"], "method": run["method"],
            "iterations": summary["iterations"], "minutes": summary["wall_time_s"] / 60,
            "final": summary["final"]["fg_iou"], "best": summary["best"]["value"],
            "best_iteration": summary["best"]["iteration"],
            **{f"final_{way}": scores["fg_iou"] for way, scores in finals.items()},
            "plateau": float(np.mean([v for _, v in curve[-5:]])),
            "precision": finals["plain"]["per_class"]["precision"][1],
            "recall": finals["plain"]["per_class"]["recall"][1],
            **{f"objects_{key}": json.loads(objects.read_text())[key] for key in ("f1_iou50", "ap50")},
            "curve": curve}


def is_finished(out: Path) -> bool:
    """A run trained to its end and scored every way (what ``run_one`` reads back without running anything)."""
    summary = out / "summary.json"
    return (summary.is_file() and json.loads(summary.read_text()).get("completed", False)
            and all((out / f"final_{way}.json").is_file() for way in (*score_ways(), "instances")))


def contiguous_validation(args) -> tuple[Path, Path]:
    """The subset's validation slices 23-26 (the training volume's 161-164, neighbours) as their own TIFFs."""
    import tifffile

    folder = args.out / "validation_161_164"
    image, label = folder / "image.tif", folder / "label.tif"
    if not label.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(image, tifffile.imread(args.subset / "train_image.tif")[23:27])
        tifffile.imwrite(label, tifffile.imread(args.subset / "train_mito.tif")[23:27])
    return image, label


def mean_std(values: list[float]) -> str:
    values = np.asarray(values, dtype=np.float64)
    spread = f" ± {values.std(ddof=1):.3f}" if len(values) > 1 else ""
    return f"{values.mean():.3f}{spread}"


def table(rows: list[dict], args) -> str:
    lines = [f"recipe `{args.recipe}`, seeds {args.seeds}: fg IoU on the validation slices (subset 22-26), mean ± "
             "std over seeds. plateau: mean of the last 5 validations (EMA model); final: the final EMA weights "
             "(last.pt), plain, with TTA, with TTA + post-processing; precision / recall: final, plain; object F1 "
             "(IoU 0.5) and AP50: 3-D objects of slices 23-26 (neighbours in the volume), final weights with TTA; "
             "best: the highest validation (selected on these slices, so optimistic)", "",
             "| variant | method | iterations | plateau | final | + TTA | + TTA + post | precision | recall "
             "| object F1 | object AP50 | best (iteration) | minutes per run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["method"]), []).append(row)
    for (variant, method), mine in groups.items():
        best_iters = ", ".join(str(r["best_iteration"]) for r in mine)
        lines.append(f"| {variant} | {method} (n = {len(mine)}) | {mine[0]['iterations']} | {mean_std([r['plateau'] for r in mine])} "
                     f"| {mean_std([r['final'] for r in mine])} "
                     f"| {mean_std([r['final_tta'] for r in mine])} | {mean_std([r['final_tta_post'] for r in mine])} "
                     f"| {mean_std([r['precision'] for r in mine])} | {mean_std([r['recall'] for r in mine])} "
                     f"| {mean_std([r['objects_f1_iou50'] for r in mine])} | {mean_std([r['objects_ap50'] for r in mine])} "
                     f"| {mean_std([r['best'] for r in mine])} ({best_iters}) "
                     f"| {np.mean([r['minutes'] for r in mine]):.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["method"]), []).append(row)
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for (variant, method), mine in groups.items():
        iterations = sorted(set.intersection(*(set(i for i, _ in r["curve"]) for r in mine)))
        values = np.array([[dict(r["curve"])[i] for i in iterations] for r in mine], dtype=np.float64)
        mean = values.mean(0)
        label = method if variant == "recipe" else f"{variant}: {method}"
        line, = ax.plot(iterations, mean, label=f"{label} (n={len(mine)})")
        if len(mine) > 1:
            std = values.std(0, ddof=1)
            ax.fill_between(iterations, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation fg IoU (EMA model)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", type=Path, default=Path("../shared/data/lucchi-subset"))
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iterations", type=int, help="train this many iterations instead of the recipe's "
                        "(the schedule follows: poly / cosine decay to the end)")
    parser.add_argument("--methods", nargs="+", default=["supervised", "daw", "oracle"],
                        choices=["supervised", *SEMI_SUPERVISED, "oracle"])
    parser.add_argument("--ablation", action="store_true", help="also each of --variants alone, then all together")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help="default: every variant")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (processes)")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1)), help="torch threads per run")
    parser.add_argument("--tiny", action="store_true", help="a few iterations on small patches: try the script")
    parser.add_argument("--out", type=Path, default=Path("runs/lucchi"))
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: the table and curves of the runs already finished under --out")
    args = parser.parse_args()
    runs = runs_of(args)
    if args.collect:
        finished = [run for run in runs if is_finished(run["dir"])]
        for run in runs:
            if run not in finished:
                print(f"not finished, left out: {run['dir']}", flush=True)
        runs = finished
        if not runs:
            parser.error(f"--collect: no finished run under {args.out / args.recipe}")
    started = time.perf_counter()
    print(f"{len(runs)} runs, {args.jobs} at a time, {args.threads} thread(s) each", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = []
        for row in pool.map(lambda run: run_one(run, args), runs):
            rows.append(row)
            brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "curve"}
            print(json.dumps(brief), flush=True)
    folder = args.out / args.recipe
    stem = "ablation" if args.ablation else "methods"
    (folder / f"{stem}_results.json").write_text(json.dumps(rows, indent=1))
    text = table(rows, args)
    (folder / f"{stem}_table.md").write_text(text + "\n")
    print("\n" + text)
    plot(rows, folder / f"{stem}_curves.png", f"Lucchi subset, recipe '{args.recipe}': validation fg IoU, mean ± std "
                                              "over seeds (n: runs per method)")
    print(f"\ncurves: {folder / f'{stem}_curves.png'}; {len(runs)} runs in "
          f"{(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
