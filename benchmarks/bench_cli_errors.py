"""Wall time of `mitoseg` input errors: each ends before torch and MONAI are imported.

    python benchmarks/bench_cli_errors.py [--repeats 5]

Each case runs `python -m mitoseg ...` in a fresh process (interpreter start-up and imports included, as a
user waits for it) from a scratch directory holding a small volume, a file that is not a checkpoint, an
existing output and a non-empty run folder. Every case must end with exit status 2 and one
`mitoseg: error:` line; the table gives the median and the slowest of the repeats, and, for comparison,
the time of `python -c "import torch, monai"` alone, which every such error cost before the checks came
first. The target is under 1 s for every case (issue 17).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [
    ("missing config file", ["train", "--config", "missing.yaml"]),
    ("misspelled built-in config", ["train", "--config", "sample_dav"]),
    ("unknown config key", ["train", "--config", "sample_daw", "--set", "data.bach_size=4"]),
    ("value out of range", ["train", "--config", "sample_daw", "--set", "optim.lr=-1"]),
    ("non-empty run folder", ["train", "--config", "sample_daw", "--out", "run"]),
    ("missing data file", ["train", "--config", "missing_data.yaml", "--out", "new"]),
    ("predict: missing input", ["predict", "--checkpoint", "fake.pt", "--input", "nowhere.tif", "--output", "p.tif"]),
    ("predict: missing checkpoint", ["predict", "--checkpoint", "nowhere.pt", "--input", "vol.tif",
                                     "--output", "p.tif"]),
    ("predict: existing output", ["predict", "--checkpoint", "fake.pt", "--input", "vol.tif", "--output", "vol.tif"]),
    ("evaluate: existing JSON", ["evaluate", "--prediction", "vol.tif", "--label", "vol.tif", "--json", "e.json"]),
    ("instances: existing output", ["instances", "--prediction", "vol.tif", "--output", "vol.tif"]),
    ("init: missing label", ["init", "--image", "vol.tif", "--label", "nowhere.tif"]),
    ("suggest: existing CSV", ["suggest", "--checkpoint", "fake.pt", "--image", "vol.tif", "--csv", "e.json"]),
    ("bad MITOSEG_THREADS", ["train", "--config", "sample_daw", "--out", "new"], {"MITOSEG_THREADS": "many"}),
]


def prepare(folder: Path) -> None:
    import numpy as np
    import tifffile

    tifffile.imwrite(folder / "vol.tif", np.zeros((4, 32, 32), np.uint8))
    (folder / "fake.pt").write_bytes(b"not a checkpoint")
    (folder / "e.json").write_text("{}")
    (folder / "run").mkdir()
    (folder / "run" / "last.pt").write_bytes(b"x")
    (folder / "missing_data.yaml").write_text("data:\n  train: {image: nowhere.tif, label: nowhere.tif}\n")


def time_command(cmd: list[str], cwd: Path, env: dict, expect: int | None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if expect is not None:
        lines = result.stderr.strip().splitlines()
        if result.returncode != expect or len(lines) != 1 or not lines[0].startswith("mitoseg: error: "):
            raise SystemExit(f"{' '.join(cmd)}: expected exit {expect} and one error line, got "
                             f"{result.returncode}:\n{result.stderr}")
    return seconds, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base_env = {k: v for k, v in os.environ.items() if k != "MITOSEG_THREADS"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepare(folder)
        for case in CASES:
            name, argv, extra = case if len(case) == 3 else (*case, {})
            env = {**base_env, **extra}
            times, message = [], ""
            for _ in range(args.repeats):
                seconds, result = time_command([sys.executable, "-m", "mitoseg", *argv], folder, env, expect=2)
                times.append(seconds)
                message = result.stderr.strip()
            rows.append((name, statistics.median(times), max(times), message))
            print(f"{name}: median {rows[-1][1]:.2f} s, max {rows[-1][2]:.2f} s  ({message[:100]})", flush=True)
        torch_times = [time_command([sys.executable, "-c", "import torch, monai"], folder, base_env, None)[0]
                       for _ in range(max(1, args.repeats // 2))]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\n{args.repeats} runs per case, {cores} CPUs available, load average "
          f"{os.getloadavg()[0]:.1f}, Python {sys.version.split()[0]}\n")
    print("| input error | median (s) | slowest (s) |\n| --- | --- | --- |")
    for name, median, slowest, _ in rows:
        print(f"| {name} | {median:.2f} | {slowest:.2f} |")
    print(f"| (for comparison: `import torch, monai` alone) | {statistics.median(torch_times):.2f} | "
          f"{max(torch_times):.2f} |")
    worst = max(row[2] for row in rows)
    print(f"\nslowest input error: {worst:.2f} s ({'under' if worst < 1 else 'OVER'} the 1 s target)")


if __name__ == "__main__":
    main()
