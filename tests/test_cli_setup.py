"""What a new user meets first: built-in configs, `mitoseg init` for their own volumes, input errors found
before torch is imported, and the number of CPU threads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tifffile
import yaml

from mitoseg.config import builtin_configs, load_config, resolve_config_path
from mitoseg.errors import MitosegError
from mitoseg.init_config import classes_from_values, format_selection, split_validation

from conftest import assert_one_line_error, run_cli, tiny_config_dict

# ------------------------------------------------------------------ built-in configs


def test_configs_lists_every_built_in_config_with_its_first_comment_line(capsys):
    code, out, _ = run_cli(["configs"], capsys)
    assert code == 0
    lines = [line for line in out.splitlines() if line.strip()]
    for name, path in builtin_configs().items():
        (line,) = [line for line in lines if line.split()[0] == name]
        assert line.split(None, 1)[1] == path.read_text().splitlines()[0].lstrip("# ")


def test_configs_show_prints_the_file_and_a_wrong_name_suggests_the_closest(capsys):
    code, out, _ = run_cli(["configs", "show", "sample_daw"], capsys)
    assert code == 0 and out == builtin_configs()["sample_daw"].read_text()
    code, _, err = run_cli(["configs", "show", "sample_dav"], capsys)
    assert_one_line_error(code, err, "config file not found: sample_dav", "did you mean the built-in config "
                                                                          "'sample_daw'")


def test_config_takes_a_built_in_name_or_a_path_and_a_file_there_wins(tmp_path, monkeypatch):
    assert resolve_config_path("sample_daw") == builtin_configs()["sample_daw"]
    assert resolve_config_path("sample_daw.yaml") == builtin_configs()["sample_daw"]
    assert load_config("sample_daw").method.name == "daw"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sample_daw.yaml").write_text(builtin_configs()["sample_daw"].read_text().replace("seed: 0", "seed: 7"))
    assert load_config("sample_daw.yaml").seed == 7  # the file in the current directory
    assert load_config("sample_daw").seed == 0
    with pytest.raises(MitosegError, match="built-in config|sample_daw"):
        load_config("sample_daw", ["data.bogus=1"])


@pytest.mark.slow
def test_built_in_sample_config_writes_the_sample_data_where_it_reads_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["train", "--config", "sample_supervised", "--max-iters", "1", "--no-progress",
                              "--set", "train.val_every=1000000", "--set", "data.batch_size=2",
                              "--set", "data.patch_size=[64,64]", "--out", "run"], capsys)
    assert code == 0, err
    assert "wrote the synthetic sample data" in out
    assert (tmp_path / "sample_data" / "train_image.tif").is_file()
    # a second run finds them and writes nothing
    code, out, err = run_cli(["train", "--config", "sample_supervised", "--max-iters", "1", "--no-progress",
                              "--set", "train.val_every=1000000", "--set", "data.batch_size=2",
                              "--set", "data.patch_size=[64,64]", "--out", "run2"], capsys)
    assert code == 0 and "wrote the synthetic sample data" not in out


# ------------------------------------------------------------------ input errors before torch

EARLY_ERRORS = textwrap.dedent('''
    import os, sys, json
    from pathlib import Path
    from mitoseg.cli import main

    os.chdir(sys.argv[1])
    cases = json.loads(sys.argv[2])
    codes = []
    for argv, env in cases:
        os.environ.pop("MITOSEG_THREADS", None)
        os.environ.update(env)
        codes.append(main(argv))
    print(json.dumps({"codes": codes, "torch": "torch" in sys.modules, "monai": "monai" in sys.modules}))
''')


def test_input_errors_are_found_before_torch_and_monai_are_imported(tmp_path, tiny_volumes):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "something").write_text("x")
    (tmp_path / "exists.tif").write_bytes(b"x")
    (tmp_path / "exists.json").write_text("{}")
    import zipfile

    with zipfile.ZipFile(tmp_path / "fake.pt", "w") as archive:  # a zip, as torch.save writes: checked later
        archive.writestr("data.pkl", b"x")
    (tmp_path / "image.pt").write_bytes(b"\x89PNG not a model")
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07onnx protobuf")
    good = tiny_config_dict(tiny_volumes)
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(good))
    missing_data = tiny_config_dict(tiny_volumes)
    missing_data["data"]["val"]["image"] = "nowhere.tif"
    (tmp_path / "missing_data.yaml").write_text(yaml.safe_dump(missing_data))
    image, label = str(tiny_volumes["train_image"]), str(tiny_volumes["train_label"])
    cases = [
        (["train", "--config", "missing.yaml"], {}),
        (["train", "--config", "sample_dav"], {}),
        (["train", "--config", "sample_daw", "--set", "data.bogus=1"], {}),
        (["train", "--config", "sample_daw", "--set", "optim.lr=-1"], {}),
        (["train", "--config", "good.yaml", "--out", "out"], {}),
        (["train", "--config", "missing_data.yaml", "--out", "new"], {}),
        (["train", "--resume", "--out", "nowhere"], {}),
        (["train", "--config", "good.yaml", "--out", "new2"], {"MITOSEG_THREADS": "zero"}),
        (["predict", "--checkpoint", "fake.pt", "--input", "nowhere.tif", "--output", "p.tif"], {}),
        (["predict", "--checkpoint", "nowhere.pt", "--input", image, "--output", "p.tif"], {}),
        (["predict", "--checkpoint", "fake.pt", "--input", image, "--output", "exists.tif"], {}),
        (["evaluate", "--prediction", "nowhere.tif", "--label", label], {}),
        (["evaluate", "--prediction", image, "--label", label, "--json", "exists.json"], {}),
        (["evaluate", "--checkpoint", "nowhere.pt", "--image", image, "--label", label], {}),
        (["instances", "--prediction", "nowhere.tif", "--output", "i.tif"], {}),
        (["instances", "--prediction", label, "--output", "exists.tif"], {}),
        (["export", "--checkpoint", "nowhere.pt", "--format", "torchscript", "--output", "m.pt"], {}),
        (["init", "--image", "nowhere.tif", "--label", label], {}),
        (["init", "--image", image, "--label", label, "--output", "exists.json"], {}),
        (["predict", "--checkpoint", "image.pt", "--input", image, "--output", "q.tif"], {}),
        (["predict", "--checkpoint", "model.onnx", "--input", image, "--output", "q.tif"], {}),
        (["evaluate", "--checkpoint", "fake.pt", "--image", image, "--label", str(tiny_volumes["val_label"])], {}),
        (["instances", "--prediction", label, "--output", "i.tif", "--min-distance", "0"], {}),
        (["instances", "--prediction", label, "--output", "i.tif", "--table", "exists.tif/t.csv"], {}),
        (["suggest", "--checkpoint", "fake.pt", "--image", "nowhere.tif"], {}),
        (["suggest", "--checkpoint", "fake.pt", "--image", image, "--csv", "exists.json"], {}),
        (["suggest", "--checkpoint", "fake.pt", "--image", image, "--labeled", "99", "--csv", "new.csv"], {}),
        (["instances", "--prediction", label, "--output", "i.tif", "--seed-depth", "1.5"], {}),
    ]
    result = subprocess.run([sys.executable, "-c", EARLY_ERRORS, str(tmp_path), json.dumps(cases)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    errors = result.stderr.strip().splitlines()
    assert report["codes"] == [2] * len(cases), list(zip(report["codes"], errors))
    assert len(errors) == len(cases) and all(line.startswith("mitoseg: error: ") for line in errors), errors
    assert not report["torch"] and not report["monai"]
    assert "MITOSEG_THREADS must be a whole number" in errors[7]
    assert "exists.tif exists; pass --overwrite" in errors[10]
    assert "image.pt: not a mitoseg checkpoint" in errors[19] and "ONNX Runtime" in errors[20]
    assert "label shape" in errors[21] and "--min-distance must be at least 1" in errors[22]
    assert "exists.tif is a file, not a directory" in errors[23]
    assert "nowhere.tif" in errors[24] and "exists.json exists" in errors[25] and "99" in errors[26]
    assert "--seed-depth must be between 0 and 1" in errors[27]


# ------------------------------------------------------------------ threads


def test_threads_come_from_the_option_then_the_environment_then_the_cores():
    from mitoseg.threads import allowed_cpus, default_threads, resolve_threads

    assert resolve_threads(3, {"MITOSEG_THREADS": "2"}) == (3, "--threads")
    assert resolve_threads(None, {"MITOSEG_THREADS": "2", "OMP_NUM_THREADS": "4"}) == (2, "MITOSEG_THREADS")
    assert resolve_threads(None, {"OMP_NUM_THREADS": "4"}) == (4, "OMP_NUM_THREADS")
    count, source = resolve_threads(None, {})
    assert count == default_threads() and 1 <= count <= len(allowed_cpus())
    with pytest.raises(MitosegError, match="MITOSEG_THREADS must be at least 1"):
        resolve_threads(None, {"MITOSEG_THREADS": "0"})


def test_threads_option_sets_torch_threads(tmp_path, tiny_config, capsys):
    import torch

    before = torch.get_num_threads()
    try:
        code, _, err = run_cli(["train", "--config", tiny_config, "--out", tmp_path / "run", "--max-iters", "1",
                                "--no-progress", "--threads", "1"], capsys)
        assert code == 0, err
        assert torch.get_num_threads() == 1
        with pytest.raises(SystemExit) as info:  # argparse's error: one line, exit status 2
            run_cli(["train", "--config", tiny_config, "--threads", "0"], capsys)
        assert info.value.code == 2 and "--threads: must be at least 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ mitoseg init


def test_selections_classes_and_validation_slices():
    assert format_selection([0, 1, 2, 5, 7, 8]) == "0:3, 5, 7:9"
    assert format_selection([4]) == "4"
    assert classes_from_values([0, 255]) == (2, {255: 1})
    assert classes_from_values([0, 1]) == (2, None)
    assert classes_from_values([0, 1, 2]) == (3, None)
    assert classes_from_values([0, 2, 5]) == (3, {2: 1, 5: 2})
    assert split_validation([1, 2, 3]) == ([1, 2, 3], [])  # too few to hold one out
    train, val = split_validation([0, 10, 20, 30, 40])
    assert len(val) == 1 and val[0] in (10, 20, 30) and sorted(train + val) == [0, 10, 20, 30, 40]
    train, val = split_validation(list(range(20)))
    assert len(val) == 4 and not set(train) & set(val)


@pytest.fixture
def painted(tmp_path):
    """A 12-slice volume with mitochondria painted as 255 on slices 1, 4, 7, 10 (the others are 0)."""
    from mitoseg.data.synthetic import make_em_volume

    image, label = make_em_volume((12, 64, 64), seed=0)  # foreground on every slice
    painted = np.zeros_like(label)
    for s in (1, 4, 7, 10):
        painted[s] = (label[s] > 0) * 255
    tifffile.imwrite(tmp_path / "stack.tif", image)
    tifffile.imwrite(tmp_path / "labels.tif", painted)
    return tmp_path


def test_init_writes_a_commented_config_for_the_painted_slices_that_trains(painted, monkeypatch, capsys):
    monkeypatch.chdir(painted)
    code, out, err = run_cli(["init", "--image", "stack.tif", "--label", "labels.tif", "--cpu",
                              "--output", "out.yaml"], capsys)
    assert code == 0, err
    assert "mitoseg train --config out.yaml" in out and "labeled slices: 4" in out
    text = (painted / "out.yaml").read_text()
    assert text.startswith("# daw on stack.tif") and "label_map: {255: 1}" in text
    raw = yaml.safe_load(text)
    cfg = load_config(painted / "out.yaml")
    assert cfg.method.name == "daw" and cfg.device == "cpu" and cfg.data.label_map == {255: 1}
    held_out = raw["data"]["val"]["slices"]
    assert len(held_out) == 1 and sorted(raw["data"]["train"]["slices"] + held_out) == [1, 4, 7, 10]
    assert raw["data"]["unlabeled"][0]["slices"] == "0, 2:4, 5:7, 8:10, 11"
    assert cfg.data.patch_size == [64, 64] and cfg.inference.roi_size == [64, 64]  # sized to the 64 x 64 slices
    assert cfg.model.channels == [16, 32, 64, 128]
    # the CPU recipe: a time budget, validations without TTA, predictions with it
    assert cfg.train.max_minutes == 30 and cfg.train.val_tta is False and cfg.inference.tta is True
    assert "a 30-minute schedule" in out
    # a semi-supervised default carries the safeguards of the unlabeled loss (one source: the config module)
    from mitoseg.config import SEMI_SUPERVISED_SAFEGUARDS

    assert raw["method"] == {"name": "daw", **SEMI_SUPERVISED_SAFEGUARDS}
    assert cfg.method.warmup > 0 and cfg.method.guard_tolerance is not None
    assert cfg.train.eval_model == "best_of"  # validation slices pick the better of student and EMA teacher
    # the config it writes trains
    code, out, err = run_cli(["train", "--config", "out.yaml", "--max-iters", "2", "--no-progress",
                              "--out", "run"], capsys)
    assert code == 0, err
    assert json.loads((painted / "run" / "summary.json").read_text())["iterations"] == 2
    # it refuses to replace the config
    code, _, err = run_cli(["init", "--image", "stack.tif", "--label", "labels.tif", "--cpu",
                            "--output", "out.yaml"], capsys)
    assert_one_line_error(code, err, "out.yaml exists; pass --overwrite")


def test_init_sizes_for_a_gpu_and_handles_supervised_and_few_labels(painted, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(painted)
    arguments = ["init", "--image", "stack.tif", "--label", "labels.tif", "--gpu", "--method", "supervised",
                 "--output", "gpu.yaml"]
    # train would refuse device cuda on a machine without one: init says so (and writes nothing) ...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(arguments, capsys)
    assert_one_line_error(code, err, "--gpu", "no CUDA GPU", "--cpu")
    assert not (painted / "gpu.yaml").exists()
    # ... and on a machine with one it writes the GPU recipe
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    code, _, err = run_cli(arguments, capsys)
    assert code == 0, err
    cfg = load_config("gpu.yaml")
    assert cfg.device == "cuda" and cfg.model.channels == [32, 64, 128, 256, 512] and cfg.model.strides == [2] * 4
    assert cfg.data.patch_size == [64, 64] and cfg.data.unlabeled is None and cfg.method.name == "supervised"
    assert cfg.method.warmup == 0 and cfg.method.guard_tolerance is None  # nothing to guard
    code, _, err = run_cli(["init", "--image", "stack.tif", "--label", "labels.tif", "--gpu", "--output",
                            "gpu_daw.yaml"], capsys)
    assert code == 0, err
    assert load_config("gpu_daw.yaml").method.guard_tolerance is not None  # the GPU default is guarded too
    # two painted slices: both train, no validation
    label = tifffile.imread("labels.tif")
    label[7:] = 0
    tifffile.imwrite("few.tif", label)
    code, out, err = run_cli(["init", "--image", "stack.tif", "--label", "few.tif", "--cpu", "--output",
                              "few.yaml"], capsys)
    assert code == 0, err
    raw = yaml.safe_load(open("few.yaml"))
    assert raw["data"]["train"]["slices"] == [1, 4] and "val" not in raw["data"]
    # no validation: the final model is the student (the EMA teacher lags a short run)
    assert raw["train"]["eval_model"] == "student"


def test_init_refuses_what_it_cannot_configure(painted, monkeypatch, capsys):
    monkeypatch.chdir(painted)
    tifffile.imwrite("empty.tif", np.zeros((12, 64, 64), np.uint8))
    tifffile.imwrite("full.tif", np.ones((12, 64, 64), np.uint8))
    tifffile.imwrite("short.tif", np.zeros((5, 64, 64), np.uint8))
    for label, needle in (("empty.tif", "no slice holds a label"),
                          ("full.tif", "no unlabeled slices for --method daw"),
                          ("short.tif", "differs from the image's")):
        code, _, err = run_cli(["init", "--image", "stack.tif", "--label", label, "--cpu", "--output",
                                f"{label}.yaml"], capsys)
        assert_one_line_error(code, err, needle)


def test_a_missing_torch_is_one_line_naming_the_install_command(tmp_path, tiny_volumes):
    code = ("import sys; sys.modules['torch'] = None; from mitoseg.cli import main; "
            "sys.exit(main(['predict', '--checkpoint', sys.argv[1], '--input', sys.argv[2], '--output', 'p.tif']))")
    import zipfile

    with zipfile.ZipFile(tmp_path / "m.pt", "w") as archive:
        archive.writestr("data.pkl", b"x")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.pt"), str(tiny_volumes["val_image"])],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs the Python package 'torch'" in lines[0] and "pip install torch" in lines[0]
