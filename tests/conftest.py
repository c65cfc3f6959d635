"""Shared fixtures: tiny synthetic EM volumes and a matching fast config; the ``slow`` mark."""

from __future__ import annotations

from pathlib import Path

import pytest
import tifffile
import yaml

# Whole modules of end-to-end checks (subprocess CLIs, napari windows, torchrun, Dask clusters, exports checked
# by ONNX Runtime and bioimage.io, a wheel in a venv): `pytest -m "not slow"` leaves them out. Single slow tests
# elsewhere carry @pytest.mark.slow.
SLOW_MODULES = {"test_reliability", "test_benchmark_volume", "test_napari_plugin", "test_napari_train",
                "test_napari_instances", "test_dask_predict", "test_distributed", "test_export", "test_packaging"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_volumes(tmp_path_factory) -> dict[str, Path]:
    """Train (8 slices) and validation (4 slices) volumes of 64 x 64 pixels, with labels."""
    from mitoseg.data.synthetic import make_em_volume

    root = tmp_path_factory.mktemp("tiny_volumes")
    paths = {}
    for split, shape, seed in (("train", (8, 64, 64), 1), ("val", (4, 64, 64), 2)):
        image, label = make_em_volume(shape, seed=seed)
        paths[f"{split}_image"] = root / f"{split}_image.tif"
        paths[f"{split}_label"] = root / f"{split}_label.tif"
        tifffile.imwrite(paths[f"{split}_image"], image, photometric="minisblack")
        tifffile.imwrite(paths[f"{split}_label"], label, photometric="minisblack")
    return paths


def tiny_config_dict(volumes: dict[str, Path], **train) -> dict:
    """A config that trains a very small U-Net for a few iterations in about a second."""
    return {
        "seed": 0,
        "data": {
            "train": {"image": str(volumes["train_image"]), "label": str(volumes["train_label"])},
            "val": {"image": str(volumes["val_image"]), "label": str(volumes["val_label"])},
            "num_classes": 2,
            "patch_size": [32, 32],
            "batch_size": 2,
            "foreground_sampling": 0.5,
        },
        "model": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1,
                  "feature_channels": 8, "head_channels": 8},
        "optim": {"name": "adamw", "lr": 0.003},
        "train": {"iterations": 6, "val_every": 3, "log_every": 2, "checkpoint_every": 3, **train},
        "inference": {"roi_size": [32, 32], "overlap": 0.25, "sw_batch_size": 4, "slab": 3},
    }


@pytest.fixture
def tiny_config(tmp_path, tiny_volumes) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_volumes)))
    return path


def train_tiny_run(folder: Path, volumes: dict[str, Path]) -> Path:
    """A finished run of ``tiny_config_dict`` trained through ``mitoseg train`` in ``folder/run``."""
    from mitoseg.cli import main

    out = folder / "run"
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(volumes)))
    assert main(["train", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    return out


def run_cli(args, capsys):
    """``mitoseg ARGS`` in this process: (exit status, stdout, stderr)."""
    from mitoseg.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    """Exit status 2 and one ``mitoseg: error:`` line on stderr that contains every needle."""
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mitoseg: error:")
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
