"""The Lucchi volume benchmark (benchmarks/lucchi_volume.py) end to end at tiny size, on a synthetic volume of
the same layout: supervised on 3 slices and DAW with the safeguards, curves, table, pseudo-label diagnostics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import tifffile

from mitoseg.data.synthetic import make_em_volume

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lucchi_volume.py"


def lucchi_layout_volume(tmp_path: Path) -> Path:
    """A synthetic volume of 165 slices of 64 x 64 pixels, stored as the Lucchi volume's two files."""
    image, label = make_em_volume((165, 64, 64), seed=3)
    volume = tmp_path / "volume"
    volume.mkdir()
    tifffile.imwrite(volume / "train_image.tif", image)
    tifffile.imwrite(volume / "train_mito_27.tif", label)
    return volume


def test_volume_benchmark_runs_end_to_end_at_tiny_size(tmp_path):
    volume = lucchi_layout_volume(tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--volume", str(volume), "--out", str(out), "--tiny", "--labels", "3",
               "--variants", "semi30_safe", "--methods", "supervised", "daw", "--seeds", "0", "--threads", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"semi30_safe / 3 / supervised", "semi30_safe / 3 / daw"}
    daw = results["semi30_safe / 3 / daw"][0]
    assert 0.0 <= daw["final_tta"] <= 1.0 and daw["curve"]
    diagnostics = daw["pseudo_labels"]
    assert 0.0 <= diagnostics["wrong_used"] <= 1.0 and 0.0 <= diagnostics["correct_discarded"] <= 1.0
    assert 0.0 < diagnostics["true_fg"] < 0.5
    config = (out / "semi30_safe" / "3" / "daw" / "seed0" / "config.yaml").read_text()
    assert "warmup: 0.5" in config and "guard_tolerance: 1.5" in config
    assert "pseudo / true" in (out / "table.md").read_text()
    assert (out / "curves.png").stat().st_size > 1000
    # A second call reads the finished runs back instead of training again.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "training " not in again.stdout
    # --report trains nothing: a method never run is left out of the table.
    report = subprocess.run([*command[:-4], "unimatch", "--seeds", "0", "--report"], capture_output=True, text=True,
                            timeout=600)
    assert report.returncode == 0 and "training " not in report.stdout and "unimatch" not in report.stdout


ROUNDS = Path(__file__).resolve().parents[1] / "benchmarks" / "suggest_rounds.py"


def test_suggest_rounds_benchmark_runs_end_to_end_at_tiny_size(tmp_path):
    # Two rounds of each strategy on a synthetic volume of the Lucchi layout: the slices come from the pool,
    # never twice, suggest's never neighbours; the table and curves are written, and --report trains nothing.
    volume = lucchi_layout_volume(tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, str(ROUNDS), "--volume", str(volume), "--out", str(out), "--tiny", "--rounds", "2",
               "--seeds", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())
    pool = {0, 1, 2, 3, 17, 24, 28, 42, 61, 62, 63, 105, 135}
    for strategy in ("suggest", "random", "even"):
        mine = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["round"])
        assert [r["labeled"] for r in mine] == [3, 5, 7]
        added = [s for r in mine[1:] for s in r["chosen"]]
        assert len(set(added)) == 4 and set(added) <= pool and all(0 <= r["fg_iou"] <= 1 for r in mine)
    suggested = [r["chosen"] for r in rows if r["strategy"] == "suggest" and r["round"] > 0]
    assert all(abs(a - b) >= 2 for pair in suggested for a, b in [pair])
    assert (out / "curves.png").stat().st_size > 1000 and "labeled slices" in (out / "table.md").read_text()
    report = subprocess.run([*command, "--report"], capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and "| 7 |" in report.stdout
