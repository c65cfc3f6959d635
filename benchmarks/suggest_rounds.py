"""Does `mitoseg suggest` save labels? Rounds of labeling on the Lucchi volume, three ways of choosing the slices.

    python benchmarks/suggest_rounds.py --volume ../shared/data/lucchi-volume --out runs/suggest_rounds \\
        --seeds 0 1 --rounds 4 --first-minutes 8 --minutes 3 --threads 1 --jobs 2
    python benchmarks/suggest_rounds.py --volume ../shared/data/lucchi-volume --out runs/suggest_rounds --report
    python benchmarks/suggest_rounds.py --volume ../shared/data/lucchi-volume --out /tmp/sr --tiny   # a minute

The split and the CPU recipe of benchmarks/lucchi_volume.py (validation slices 45-48, 89-91, 161-164; the
recipe `lucchi_cpu`: supervised U-Net 16-128 at 10 nm). Round 0 trains on the 3 labeled slices 13, 75, 118
for ``--first-minutes``. Each next round adds ``--per-round`` slices from the **pool** (the volume's other
labeled training slices: 0-3, 17, 24, 28, 42, 61-63, 105, 135; the only ones whose labels can be revealed),
chosen by

- ``suggest``: ``mitoseg suggest`` with the previous round's final weights (every pool slice scored, the
  default views and diversity);
- ``random``: drawn at random (seeded);
- ``even``: the pool slice farthest in z from every labeled slice, then the next farthest (evenly spaced);

and fine-tunes the previous round's final weights (``model.init_from``) for ``--minutes``. Every run is
``mitoseg train`` (one thread each, ``--jobs`` at once); each round is scored by the fg IoU of its final
weights (EMA) on the validation slices, at its last validation (no TTA). Round 0 is shared by the three.

Output in ``OUT``: ``results.json``, ``table.md`` (mean over seeds per strategy and number of labeled slices)
and ``curves.png`` (fg IoU against labeled slices, one line per strategy, the spread over seeds).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lucchi_volume import IMAGE, LABEL, LABELED, VALIDATION, run_config  # noqa: E402

STRATEGIES = ("suggest", "random", "even")
START = LABELED["3"]
POOL = [s for s in LABELED["oracle"] if s not in START]


def final_score(folder: Path) -> float:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    scores = [r["fg_iou"] for r in records if r.get("split") == "val" and "fg_iou" in r]
    if not scores:
        raise RuntimeError(f"{folder}: no validation score")
    return float(scores[-1])


def train(folder: Path, cfg: dict, threads: int) -> float:
    if (folder / "summary.json").is_file():
        return final_score(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with open(folder / "train.log", "w") as log:
        subprocess.run(["mitoseg", "train", "--config", str(folder / "config.yaml"), "--out", str(folder),
                        "--overwrite", "--no-progress", "--threads", str(threads)],
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    return final_score(folder)


def round_config(volume: Path, labeled: list[int], seed: int, minutes: float, init_from: Path | None,
                 tiny: bool) -> dict:
    cfg = run_config(volume, "recipe", "3", "supervised", seed, minutes, tiny)
    cfg["data"]["train"]["slices"] = sorted(labeled)
    cfg["train"]["val_every"] = 10**9 if not tiny else cfg["train"]["val_every"]  # only the final validation
    if init_from is not None:
        cfg["model"]["init_from"] = str(init_from)
    return cfg


def choose_even(labeled: list[int], pool: list[int], k: int) -> list[int]:
    chosen = []
    for _ in range(k):
        left = [s for s in pool if s not in chosen and s not in labeled]
        if not left:
            break
        taken = labeled + chosen
        chosen.append(max(left, key=lambda s: (min(abs(s - t) for t in taken), -s)))
    return chosen


def choose_suggest(folder: Path, volume: Path, labeled: list[int], pool: list[int], k: int, threads: int,
                   tiny: bool) -> list[int]:
    csv_path = folder / "suggestions.csv"
    left = [s for s in pool if s not in labeled]
    command = ["mitoseg", "suggest", "--checkpoint", str(folder / "last.pt"), "--image", str(volume / IMAGE),
               "--labeled", ",".join(map(str, labeled)), "--slices", ",".join(map(str, left)), "-n", str(k),
               "--stride", "1", "--csv", str(csv_path), "--overwrite", "--no-progress", "--threads", str(threads)]
    if tiny:
        command += ["--views", "2"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    (folder / "suggest.log").write_text(result.stdout + result.stderr)
    import csv

    with open(csv_path) as handle:
        rows = [r for r in csv.DictReader(handle) if r["rank"]]
    return [int(r["slice"]) for r in sorted(rows, key=lambda r: int(r["rank"]))]


def run_strategy(args, seed: int, strategy: str, first: Path) -> list[dict]:
    rng = random.Random(seed * 1000 + 17)
    labeled, previous = list(START), first
    rows = [{"seed": seed, "strategy": strategy, "round": 0, "labeled": len(labeled), "slices": list(labeled),
             "fg_iou": final_score(first)}]
    for r in range(1, args.rounds + 1):
        folder = args.out / f"seed{seed}" / strategy / f"round{r}"
        folder.mkdir(parents=True, exist_ok=True)
        chosen_file = folder / "chosen.json"
        if chosen_file.is_file():
            chosen = json.loads(chosen_file.read_text())
        else:
            left = [s for s in POOL if s not in labeled]
            if strategy == "suggest":
                chosen = choose_suggest(previous, args.volume, labeled, POOL, args.per_round, args.threads, args.tiny)
            elif strategy == "random":
                chosen = rng.sample(left, min(args.per_round, len(left)))
            else:
                chosen = choose_even(labeled, POOL, args.per_round)
            chosen_file.write_text(json.dumps(chosen))
        labeled = sorted(labeled + chosen)
        cfg = round_config(args.volume, labeled, seed, args.minutes, previous / "last.pt", args.tiny)
        score = train(folder, cfg, args.threads)
        rows.append({"seed": seed, "strategy": strategy, "round": r, "labeled": len(labeled), "slices": labeled,
                     "chosen": chosen, "fg_iou": score})
        previous = folder
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for strategy in STRATEGIES:
        mine = [r for r in rows if r["strategy"] == strategy]
        counts = sorted({r["labeled"] for r in mine})
        if not counts:
            continue
        scores = [[r["fg_iou"] for r in mine if r["labeled"] == c] for c in counts]
        mean = np.array([np.mean(s) for s in scores])
        line, = ax.plot(counts, mean, "o-", label=f"{strategy} (seeds: {len(scores[-1])})")
        low, high = np.array([min(s) for s in scores]), np.array([max(s) for s in scores])
        ax.fill_between(counts, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("labeled slices")
    ax.set_ylabel("validation fg IoU (EMA, no TTA)")
    ax.set_title("Lucchi volume: slices chosen by mitoseg suggest, at random, evenly")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def report(rows: list[dict], out: Path) -> str:
    lines = ["| labeled slices | " + " | ".join(f"{s} (mean, seeds)" for s in STRATEGIES) + " |",
             "|---|" + "---|" * len(STRATEGIES)]
    for count in sorted({r["labeled"] for r in rows}):
        cells = []
        for strategy in STRATEGIES:
            scores = [r["fg_iou"] for r in rows if r["strategy"] == strategy and r["labeled"] == count]
            cells.append(f"{np.mean(scores):.3f} ({', '.join(f'{s:.3f}' for s in scores)})" if scores else "")
        lines.append(f"| {count} | " + " | ".join(cells) + " |")
    picks = ["", "Slices added per round:", ""]
    for r in rows:
        if r["round"] > 0:
            picks.append(f"- seed {r['seed']}, {r['strategy']}, round {r['round']}: {r['chosen']}")
    text = "\n".join(lines + picks) + "\n"
    (out / "table.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volume", type=Path, required=True, help=f"folder of {IMAGE}, {LABEL}")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--first-minutes", type=float, default=8.0)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (give each --threads)")
    parser.add_argument("--tiny", action="store_true", help="seconds-long runs on small models, to try the script")
    parser.add_argument("--report", action="store_true", help="train nothing: the table and curves of the results")
    args = parser.parse_args()
    args.volume = args.volume.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    if args.report:
        rows = json.loads(results_path.read_text())
    else:
        def seed_rows(seed: int) -> list[dict]:
            first = args.out / f"seed{seed}" / "round0"
            train(first, round_config(args.volume, START, seed, args.first_minutes, None, args.tiny), args.threads)
            with ThreadPoolExecutor(max(1, args.jobs // len(args.seeds))) as pool:
                return sum(pool.map(lambda s: run_strategy(args, seed, s, first), STRATEGIES), [])

        with ThreadPoolExecutor(min(args.jobs, len(args.seeds))) as pool:
            rows = sum(pool.map(seed_rows, args.seeds), [])
        results_path.write_text(json.dumps(rows, indent=1))
    print(report(rows, args.out))
    plot(rows, args.out / "curves.png")
    print(f"wrote {args.out / 'table.md'}, {args.out / 'curves.png'}, {results_path}")


if __name__ == "__main__":
    main()
