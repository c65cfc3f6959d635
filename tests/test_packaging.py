"""The package as a pip user gets it: a wheel built from the sources, installed into a fresh virtual
environment, run from a directory that is not the repository.

The wheel must carry the built-in configs (``--config sample_daw``), the napari manifest and the license;
``mitoseg train --config sample_daw`` must work where there is no ``sample_data/`` (it writes the sample
data there first). The venv sees the already installed dependencies of the environment running the tests (a
``.pth`` file naming its site-packages: ``--system-site-packages`` would show the *base* interpreter's packages
when the tests run inside a venv, without torch) and gets mitoseg only from the wheel (``--no-deps``), so
nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("mitoseg", "plugins", "pyproject.toml", "README.md", "LICENSE")


def run(cmd, cwd, env, timeout=300):
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def outer_site_packages(venv: Path, python: Path, env: dict) -> None:
    """Make the site-packages of the interpreter running the tests (a venv's own, or the system's, and the
    user's) importable in ``venv``, after its own: a ``.pth`` file of plain paths (their own ``.pth`` files, such
    as an editable install's finder, are not run, so mitoseg comes from the venv alone)."""
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        paths.append(site.getusersitepackages())
    paths = [p for p in dict.fromkeys(paths) if Path(p).is_dir()]
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv, env).strip()
    Path(purelib).mkdir(parents=True, exist_ok=True)
    (Path(purelib) / "_outer_environment.pth").write_text("\n".join(paths) + "\n")


def test_wheel_installs_in_a_fresh_venv_and_trains_the_built_in_sample_config_outside_the_repository(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.setdefault("OMP_NUM_THREADS", "1")
    # Build from a copy of the sources, so the repository gets no build/ or egg-info of this test.
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", dist, src],
        tmp_path, env)
    (wheel,) = dist.glob("mitoseg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mitoseg/configs/sample_daw.yaml" in names and "mitoseg/configs/lucchi_cpu.yaml" in names
    assert "mitoseg_napari/napari.yaml" in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python, mitoseg = venv / "bin" / "python", venv / "bin" / "mitoseg"
    outer_site_packages(venv, python, env)
    # The outer pip (seen through the outer site-packages) installs into the venv; --ignore-installed
    # because the outer environment may hold mitoseg already (an editable install of this repository).
    run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "--quiet", wheel], tmp_path, env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = run([python, "-c", "import mitoseg, mitoseg_napari; print(mitoseg.__file__); "
                 "print(mitoseg_napari.__file__)"], work, env).split()
    assert all(Path(path).is_relative_to(venv) for path in where), where

    listing = run([mitoseg, "configs"], work, env)
    assert any(line.startswith("sample_daw ") for line in listing.splitlines()), listing
    assert run([mitoseg, "configs", "show", "sample_daw"], work, env).startswith("# Synthetic sample data")

    out = run([mitoseg, "train", "--config", "sample_daw", "--max-iters", "5", "--out", "run", "--no-progress",
               "--threads", "1"], work, env)
    assert "wrote the synthetic sample data" in out
    assert sorted(p.name for p in (work / "sample_data").glob("*.tif")) == [
        "train_image.tif", "train_label.tif", "val_image.tif", "val_label.tif"]
    summary = json.loads((work / "run" / "summary.json").read_text())
    assert summary["iterations"] == 5 and (work / "run" / "last.pt").is_file()
