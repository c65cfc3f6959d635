"""Does the config ``mitoseg init --cpu`` writes help or hurt on a volume like a user's?

A user paints 3 slices of a volume and runs ``mitoseg init --cpu`` (method daw by default), ``mitoseg train``
and ``mitoseg predict``. This benchmark does exactly that on volumes built here (never the ones the project is
judged on), three ways, paired by volume and seed:

- ``supervised``: ``mitoseg init --cpu --method supervised``;
- ``daw_plain``: ``mitoseg init --cpu`` with the safeguards of the unlabeled loss switched off
  (``method.warmup=0``, ``method.guard_tolerance=null``): DAW as its paper runs it;
- ``daw``: what ``mitoseg init --cpu`` writes.

Each run trains on ``--minutes`` of wall time (``train.max_minutes``; init writes 30) with ``--threads``
threads, and its final weights (``best.pt``: without validation slices, the last ones; the student's or the EMA
teacher's as the config's ``train.eval_model`` says) are scored by ``mitoseg evaluate --checkpoint`` (the
run's TTA) on every slice that was not painted; both weights are also scored without TTA.

Volumes (``--volumes``):

- ``synthetic_sparse``: the sample generator, 20 x 512 x 512, a dozen mitochondria (about 3 % foreground);
- ``synthetic_dense``: the sample generator's default density (9-13 % foreground), 20 x 512 x 512;
- ``lucchi_coarse``: with ``--lucchi DIR`` (the 165-slice volume of shared/), the 27 labeled slices
  downsampled to 10 nm and declared as such (no resampling by init), 3 painted (2, 24, 75), the other 24
  scored: another pixel size and other painted slices than the volume benchmark's.

    python benchmarks/init_volumes.py --out runs/init_volumes --minutes 8 --threads 1 \\
        --volumes synthetic_sparse synthetic_dense --seeds 0
    python benchmarks/init_volumes.py --out /tmp/iv --tiny   # seconds, to try the script

Output in ``OUT``: ``results.json`` and ``table.md`` (fg IoU, precision, recall per volume and way; the
difference to supervised per seed). Finished runs are read back, not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
import yaml

WAYS = {
    "supervised": ("supervised", []),
    "daw_plain": ("daw", ["method.warmup=0", "method.guard_tolerance=null"]),
    "daw": ("daw", []),
}
LUCCHI_LABELED = [0, 1, 2, 3, 13, 17, 24, 28, 42, 45, 46, 47, 48, 61, 62, 63, 75, 89, 90, 91, 105, 118, 135,
                  161, 162, 163, 164]


def build_volume(name: str, folder: Path, lucchi: Path | None, tiny: bool) -> tuple[Path, Path, Path, list[int]]:
    """(image, painted labels, full labels, scored slices) of a volume, written once into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    image_path, painted_path, truth_path = folder / "image.tif", folder / "painted.tif", folder / "truth.tif"
    meta = folder / "volume.json"
    if not meta.is_file():
        if name.startswith("synthetic"):
            from mitoseg.data.synthetic import make_em_volume

            shape = (20, 96, 96) if tiny else (20, 512, 512)
            count = (2 if tiny else 12) if name == "synthetic_sparse" else None
            image, truth = make_em_volume(shape, seed=21 if name == "synthetic_sparse" else 22,
                                          num_mitochondria=count)
            painted_slices = [3, 10, 16]
        elif name == "lucchi_coarse":
            if lucchi is None:
                sys.exit("init_volumes: lucchi_coarse needs --lucchi DIR (the folder of train_image.tif)")
            import torch
            import torch.nn.functional as F

            full = tifffile.imread(lucchi / "train_image.tif")[LUCCHI_LABELED]
            labels = tifffile.imread(lucchi / "train_mito_27.tif")[LUCCHI_LABELED]
            if tiny:
                full, labels = full[:, :192, :192], labels[:, :192, :192]
            image = F.interpolate(torch.from_numpy(full).float()[:, None], scale_factor=0.5, mode="bilinear",
                                  antialias=True)[:, 0].round().clamp(0, 255).byte().numpy()
            truth = (F.interpolate(torch.from_numpy(labels).float()[:, None], scale_factor=0.5, mode="bilinear",
                                   antialias=True)[:, 0] >= 0.5).byte().numpy()
            painted_slices = [LUCCHI_LABELED.index(s) for s in (2, 24, 75)]
        else:
            sys.exit(f"init_volumes: unknown volume {name}")
        painted = np.zeros_like(truth)
        painted[painted_slices] = truth[painted_slices]
        resolution = {"resolution": (0.1, 0.1), "metadata": {"spacing": 10, "unit": "nm"}} \
            if name == "lucchi_coarse" else {}
        tifffile.imwrite(image_path, image, imagej=bool(resolution), **resolution)
        tifffile.imwrite(painted_path, painted)
        tifffile.imwrite(truth_path, truth)
        scored = [z for z in range(len(image)) if z not in painted_slices]
        meta.write_text(json.dumps({"painted": painted_slices, "scored": scored,
                                    "foreground": float(truth.mean())}))
    scored = json.loads(meta.read_text())["scored"]
    return image_path, painted_path, truth_path, scored


def run(command: list[str], log: Path) -> None:
    with open(log, "a") as out:
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True)


def evaluate(checkpoint: Path, image: Path, truth: Path, scored: list[int], out: Path, threads: int, log: Path,
             weights: str | None = None, tta: bool = True) -> dict:
    if not out.is_file():
        command = ["mitoseg", "evaluate", "--checkpoint", str(checkpoint), "--image", str(image), "--label",
                   str(truth), "--slices", ",".join(map(str, scored)), "--json", str(out), "--overwrite",
                   "--no-progress", "--threads", str(threads), "--set", f"inference.tta={str(tta).lower()}"]
        run(command + (["--weights", weights] if weights else []), log)
    return json.loads(out.read_text())


def one_run(folder: Path, image: Path, painted: Path, truth: Path, scored: list[int], way: str, seed: int,
            minutes: float, threads: int, tiny: bool) -> dict:
    result_path = folder / "score.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    method, overrides = WAYS[way]
    config = folder / "config.yaml"
    log = folder / "log.txt"
    # The config is written again each time (cheap): what init writes now, also for a run trained earlier
    # (train.eval_model, the one key init may have changed since, does not act during a run without validation).
    run(["mitoseg", "init", "--image", str(image), "--label", str(painted), "--cpu", "--method", method,
         "--output", str(config), "--overwrite"], log)
    sets = [f"seed={seed}", f"train.max_minutes={minutes}", *overrides]
    if tiny:
        sets += ["data.patch_size=[64,64]", "inference.roi_size=[64,64]", "train.log_every=5",
                 "train.val_every=20", "train.checkpoint_every=20"]
    if not (folder / "run" / "summary.json").is_file():
        train = ["mitoseg", "train", "--config", str(config), "--out", str(folder / "run"), "--no-progress",
                 "--threads", str(threads), "--overwrite"]
        for item in sets:
            train += ["--set", item]
        run(train, log)
    # What the user gets: best.pt's weights as the config chooses them, with the config's TTA; and both
    # weights without TTA (the EMA teacher lags a short run: BENCHMARKS.md).
    eval_model = yaml.safe_load(config.read_text())["train"].get("eval_model", "ema")
    checkpoint = folder / "run" / "best.pt"
    scores = evaluate(checkpoint, image, truth, scored, folder / f"evaluate_{eval_model}.json", threads, log,
                      weights=eval_model if eval_model in ("ema", "student") else None)
    both = {w: evaluate(checkpoint, image, truth, scored, folder / f"evaluate_{w}_no_tta.json", threads, log,
                        weights=w, tta=False)["fg_iou"] for w in ("ema", "student")}
    summary = json.loads((folder / "run" / "summary.json").read_text())
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    last = train_records[-1] if train_records else {}
    precision, recall = scores["per_class"]["precision"][1], scores["per_class"]["recall"][1]
    result = {"fg_iou": scores["fg_iou"], "weights": scores.get("weights"),
              "precision": precision if precision is not None else float("nan"), "recall": recall,
              "ema_no_tta": both["ema"], "student_no_tta": both["student"],
              "iterations": summary["iterations"], "cpu_minutes": summary.get("cpu_time_s", 0.0) / 60,
              "pseudo_fg": last.get("pseudo_fg"), "label_fg": last.get("label_fg"), "guard": last.get("guard"),
              "tau": last.get("tau")}
    result_path.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--volumes", nargs="+", default=["synthetic_sparse", "synthetic_dense"])
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    parser.add_argument("--lucchi", type=Path, help="folder of the 165-slice Lucchi volume (lucchi_coarse)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="train.max_minutes of every run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="a few seconds a run, to try the script")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    minutes = 0.05 if args.tiny else args.minutes
    results: dict[str, dict[str, list[dict]]] = {}
    for name in args.volumes:
        image, painted, truth, scored = build_volume(name, args.out / "volumes" / name, args.lucchi, args.tiny)
        for way in args.ways:
            for seed in args.seeds:
                folder = args.out / name / way / f"seed{seed}"
                print(f"{name} / {way} / seed {seed}", flush=True)
                r = one_run(folder, image, painted, truth, scored, way, seed, minutes, args.threads, args.tiny)
                r["seed"] = seed
                results.setdefault(name, {}).setdefault(way, []).append(r)
                print(f"  fg IoU {r['fg_iou']:.4f} (precision {r['precision']:.3f}, recall {r['recall']:.3f}), "
                      f"{r['iterations']} iterations", flush=True)
    rows = ["| volume | way | n | fg IoU (best.pt, TTA) | precision | recall | EMA / student, no TTA | iterations | "
            "minus supervised, per seed |", "|---|---|---|---|---|---|---|---|---|"]
    for name, ways in results.items():
        base = {r["seed"]: r["fg_iou"] for r in ways.get("supervised", [])}
        for way, runs in ways.items():
            values = [r["fg_iou"] for r in runs]
            deltas = ", ".join(f"{r['fg_iou'] - base[r['seed']]:+.3f}" for r in runs if r["seed"] in base)
            spread = f" ± {np.std(values):.3f}" if len(values) > 1 else ""
            rows.append(f"| {name} | {way} | {len(runs)} | {np.mean(values):.3f}{spread} | "
                        f"{np.mean([r['precision'] for r in runs]):.3f} | {np.mean([r['recall'] for r in runs]):.3f} | "
                        f"{np.mean([r['ema_no_tta'] for r in runs]):.3f} / {np.mean([r['student_no_tta'] for r in runs]):.3f} | "
                        f"{np.mean([r['iterations'] for r in runs]):.0f} | {deltas if way != 'supervised' else '-'} |")
    table = "\n".join(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
