"""The command line end to end: train -> predict -> evaluate, --help, and bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
import yaml

from mitoseg.cli import main
from mitoseg.data.readers import read_volume

from conftest import assert_one_line_error, run_cli, tiny_config_dict, train_tiny_run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_volumes):
    return train_tiny_run(tmp_path_factory.mktemp("cli"), tiny_volumes)


@pytest.mark.parametrize("command", ["sample-data", "configs", "init", "train", "predict", "evaluate", "instances",
                                     "view", "export"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert "usage: mitoseg " + command in capsys.readouterr().out


@pytest.mark.slow
def test_predict_and_evaluate(trained_run, tiny_volumes, tmp_path, capsys):
    pred = tmp_path / "pred.tif"
    probs = tmp_path / "probs.tif"
    code, out, err = run_cli(["predict", "--checkpoint", trained_run / "best.pt", "--input",
                              tiny_volumes["val_image"], "--output", pred, "--probabilities", probs,
                              "--no-progress"], capsys)
    assert code == 0, err
    labels = read_volume(pred)
    image = read_volume(tiny_volumes["val_image"])
    assert labels.shape == image.shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1}
    p = tifffile.imread(probs)
    assert p.shape == (image.shape[0], 2, *image.shape[1:]) and p.dtype == np.float16
    np.testing.assert_allclose(p.astype(np.float32).sum(1), 1.0, atol=2e-3)
    assert np.array_equal(p.argmax(1), labels) or np.mean(p.argmax(1) == labels) > 0.999

    code, out, err = run_cli(["evaluate", "--prediction", pred, "--label", tiny_volumes["val_label"]], capsys)
    assert code == 0, err
    assert "fg_iou" in out
    report = json.loads((tmp_path / "pred_metrics.json").read_text())
    truth = read_volume(tiny_volumes["val_label"])
    tp = np.sum((labels == 1) & (truth == 1))
    union = np.sum((labels == 1) | (truth == 1))
    assert report["fg_iou"] == pytest.approx(tp / union)
    assert set(report["per_class"]) == {"iou", "dice", "precision", "recall"}


def test_predict_reads_and_writes_hdf5(trained_run, tiny_volumes, tmp_path, capsys):
    import h5py

    source = tmp_path / "in.h5"
    with h5py.File(source, "w") as f:
        f["raw"] = read_volume(tiny_volumes["val_image"])
    code, _, err = run_cli(["predict", "--checkpoint", trained_run / "last.pt", "--input", f"{source}:/raw",
                            "--output", f"{tmp_path / 'out.h5'}:/pred", "--no-progress", "--slab", "1"], capsys)
    assert code == 0, err
    with h5py.File(tmp_path / "out.h5") as f:
        assert f["pred"].shape == (4, 64, 64)


# ------------------------------------------------------------------ bad input


def test_config_errors(tmp_path, tiny_volumes, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", tmp_path / "missing.yaml", "--out", out], capsys)
    assert_one_line_error(code, err, "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {train: [\n")
    code, _, err = run_cli(["train", "--config", bad, "--out", out], capsys)
    assert_one_line_error(code, err, "bad.yaml", "YAML")
    cfg = tiny_config_dict(tiny_volumes)
    cfg["train"]["iteratoins"] = 5
    (tmp_path / "unknown.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(["train", "--config", tmp_path / "unknown.yaml", "--out", out], capsys)
    assert_one_line_error(code, err, "train.iteratoins", "train.iterations")
    code, _, err = run_cli(["train", "--config", tmp_path / "unknown.yaml", "--out", out,
                            "--set", "train.iteratoins=3"], capsys)
    assert code == 2
    cfg = tiny_config_dict(tiny_volumes)
    code, _, err = run_cli(["train", "--config", tmp_path / "unknown.yaml", "--out", out], capsys)
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_cli(["train", "--config", tmp_path / "ok.yaml", "--out", out,
                            "--set", "data.batch_size=two"], capsys)
    assert_one_line_error(code, err, "data.batch_size", "int")
    assert not out.exists()


def write_config(tmp_path, tiny_volumes, **data_changes):
    cfg = tiny_config_dict(tiny_volumes)
    for key, value in data_changes.items():
        section, _, field = key.partition("__")
        cfg["data"][section][field] = str(value)
    path = tmp_path / f"c{len(list(tmp_path.glob('c*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_data_errors(tmp_path, tiny_volumes, capsys):
    out = tmp_path / "run"
    cases = []
    cases.append((write_config(tmp_path, tiny_volumes, train__image=tmp_path / "gone.tif"), ["gone.tif"]))
    for name, content in (("text.tif", b"this is not a tiff"), ("corrupt.tif", b"II*\x00\x08\x00\x00\x00\xff\xff")):
        (tmp_path / name).write_bytes(content)
        cases.append((write_config(tmp_path, tiny_volumes, train__image=tmp_path / name), [name]))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    cases.append((write_config(tmp_path, tiny_volumes, train__image=empty), ["empty_dir"]))
    tifffile.imwrite(tmp_path / "small_label.tif", np.zeros((8, 32, 32), np.uint8))
    cases.append((write_config(tmp_path, tiny_volumes, train__label=tmp_path / "small_label.tif"),
                  ["small_label.tif", "shape"]))
    tifffile.imwrite(tmp_path / "label7.tif", np.full((8, 64, 64), 7, np.uint8))
    cases.append((write_config(tmp_path, tiny_volumes, train__label=tmp_path / "label7.tif"), ["label7.tif", "7"]))
    for config, needles in cases:
        code, _, err = run_cli(["train", "--config", config, "--out", out, "--no-progress"], capsys)
        assert_one_line_error(code, err, *needles)
        assert not out.exists()
    # A crop larger than the image.
    config = write_config(tmp_path, tiny_volumes)
    code, _, err = run_cli(["train", "--config", config, "--out", out, "--set", "data.patch_size=[128, 128]",
                            "--set", "inference.roi_size=[128, 128]"], capsys)
    assert_one_line_error(code, err, "patch_size", "larger")
    assert not out.exists()


def test_checkpoint_and_output_errors(trained_run, tiny_volumes, tmp_path, capsys):
    pred = tmp_path / "pred.tif"
    base = ["predict", "--input", tiny_volumes["val_image"], "--output", pred, "--no-progress"]
    code, _, err = run_cli(base + ["--checkpoint", tmp_path / "none.pt"], capsys)
    assert_one_line_error(code, err, "none.pt")
    # A checkpoint whose weights belong to another architecture.
    state = torch.load(trained_run / "best.pt", weights_only=True)
    state["config"]["model"]["channels"] = [8, 16, 64]
    torch.save(state, tmp_path / "other.pt")
    code, _, err = run_cli(base + ["--checkpoint", tmp_path / "other.pt"], capsys)
    assert_one_line_error(code, err, "other.pt", "architecture")
    # Not a checkpoint at all.
    (tmp_path / "junk.pt").write_bytes(b"junk")
    code, _, err = run_cli(base + ["--checkpoint", tmp_path / "junk.pt"], capsys)
    assert_one_line_error(code, err, "junk.pt")
    assert not pred.exists()
    # Output exists: refused without --overwrite, replaced with it.
    pred.write_bytes(b"keep me")
    code, _, err = run_cli(base + ["--checkpoint", trained_run / "best.pt"], capsys)
    assert_one_line_error(code, err, "pred.tif", "--overwrite")
    assert pred.read_bytes() == b"keep me"
    code, _, err = run_cli(base + ["--checkpoint", trained_run / "best.pt", "--overwrite"], capsys)
    assert code == 0, err
    assert read_volume(pred).shape == (4, 64, 64)
    # Training into a used run directory is refused too.
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_volumes)))
    code, _, err = run_cli(["train", "--config", config, "--out", trained_run], capsys)
    assert_one_line_error(code, err, str(trained_run), "--overwrite")
    # evaluate: shapes differ, label values out of range.
    tifffile.imwrite(tmp_path / "wrong.tif", np.zeros((2, 64, 64), np.uint8))
    code, _, err = run_cli(["evaluate", "--prediction", pred, "--label", tmp_path / "wrong.tif"], capsys)
    assert_one_line_error(code, err, "shape")
    tifffile.imwrite(tmp_path / "nine.tif", np.full((4, 64, 64), 9, np.uint8), photometric="minisblack")
    code, _, err = run_cli(["evaluate", "--prediction", pred, "--label", tmp_path / "nine.tif",
                            "--num-classes", "2"], capsys)
    assert_one_line_error(code, err, "nine.tif", "9")


def test_data_test_scores_best_pt_and_evaluate_checkpoint_gives_the_same_numbers(tmp_path, tiny_volumes, capsys):
    cfg = tiny_config_dict(tiny_volumes)
    cfg["data"]["test"] = {"image": str(tiny_volumes["train_image"]), "label": str(tiny_volumes["train_label"]),
                           "slices": "2:7"}
    cfg["inference"].update({"tta": True, "min_object_voxels": 20, "fill_holes": True})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--config", config, "--out", run, "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads((run / "summary.json").read_text())
    test = summary["test"]
    assert test["slices"] == 5 and test["checkpoint"] == "best.pt" and test["weights"] == "ema"
    assert test["iteration"] == summary["best"]["iteration"]
    assert test["pixels"] == 5 * 64 * 64
    assert f"test ({tiny_volumes['train_image']}, 5 slices) with best.pt" in out
    assert f"fg_iou = {test['fg_iou']:.4f}" in out
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["fg_iou"] for r in logged if r["split"] == "test"] == [test["fg_iou"]]

    # The same volume through evaluate --checkpoint: by default the run's data.test, or named explicitly.
    code, out, err = run_cli(["evaluate", "--checkpoint", run / "best.pt", "--no-progress"], capsys)
    assert code == 0, err
    default = json.loads((run / "best_ema_train_image_metrics.json").read_text())
    report = tmp_path / "explicit.json"
    code, out, err = run_cli(["evaluate", "--checkpoint", run / "best.pt", "--image", tiny_volumes["train_image"],
                              "--label", tiny_volumes["train_label"], "--slices", "2:7", "--json", report,
                              "--no-progress"], capsys)
    assert code == 0, err
    explicit = json.loads(report.read_text())
    for scores in (default, explicit):
        assert scores["per_class"] == test["per_class"] and scores["fg_iou"] == test["fg_iou"]
        assert scores["inference"]["tta"] is True and scores["inference"]["min_object_voxels"] == 20
    # Changing the inference settings changes what is measured.
    code, out, err = run_cli(["evaluate", "--checkpoint", run / "best.pt", "--set", "inference.tta=false",
                              "--set", "inference.min_object_voxels=0", "--set", "inference.fill_holes=false",
                              "--json", tmp_path / "plain.json", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "plain.json").read_text())["inference"]["tta"] is False


def test_evaluate_em_checkpoint_bad_input_is_one_line(trained_run, tiny_volumes, capsys):
    before = sorted(p.name for p in trained_run.iterdir())
    checkpoint = trained_run / "best.pt"
    cases = [
        ([], ["best.pt", "EM model", "--image", "--label", "data.test"]),
        (["--image", tiny_volumes["val_image"]], ["--image", "--label"]),
        (["--image", tiny_volumes["val_image"], "--label", tiny_volumes["val_label"], "--eval-mode", "full"],
         ["--eval-mode", "Pascal"]),
        (["--image", tiny_volumes["val_image"], "--label", tiny_volumes["train_label"]],
         ["label shape", "differs"]),
        (["--image", tiny_volumes["val_image"], "--label", tiny_volumes["val_label"], "--slices", "9"],
         ["--slices", "out of range"]),
        (["--image", trained_run / "missing.tif", "--label", tiny_volumes["val_label"]],
         ["--image", "file not found", "missing.tif"]),
    ]
    for args, needles in cases:
        code, out, err = run_cli(["evaluate", "--checkpoint", checkpoint, *args, "--no-progress"], capsys)
        assert_one_line_error(code, err, *needles)
        assert out == "" and sorted(p.name for p in trained_run.iterdir()) == before


def test_errors_have_no_traceback_unless_debug(tmp_path):
    args = [sys.executable, "-m", "mitoseg", "train", "--config", str(tmp_path / "missing.yaml")]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"mitoseg: error: config file not found: {tmp_path / 'missing.yaml'}"
    result = subprocess.run(args[:3] + ["--debug"] + args[3:], capture_output=True, text=True)
    assert "Traceback" in result.stderr and "MitosegError" in result.stderr


def listing(folder):
    """Every path under ``folder`` with its content (files) or None (folders): what a command left there."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def test_train_resume_without_out_or_config_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default run folder, runs/, would appear here
    code, _, err = run_cli(["train", "--resume", "--no-progress"], capsys)
    assert_one_line_error(code, err, "--resume", "--out")
    assert "Traceback" not in err
    assert listing(tmp_path) == {}


def test_train_out_naming_a_file_is_one_line_error(tmp_path, tiny_config, capsys):
    work = tmp_path / "work"
    work.mkdir()
    target = work / "results"
    target.write_bytes(b"not a folder")
    before = listing(work)
    for args in (["--config", tiny_config], ["--resume"], ["--config", tiny_config, "--overwrite"]):
        code, _, err = run_cli(["train", *args, "--out", target, "--no-progress"], capsys)
        assert_one_line_error(code, err, str(target), "not a directory")
        assert "Traceback" not in err
        assert listing(work) == before


def test_train_refuses_resume_with_overwrite(tmp_path, tiny_config, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", tiny_config, "--out", out, "--resume", "--overwrite"], capsys)
    assert_one_line_error(code, err, "--resume", "--overwrite")
    assert not out.exists()


@pytest.mark.parametrize("setting, key", [
    ("data.num_workers=-1", "data.num_workers"),
    ("inference.sw_batch_size=0", "inference.sw_batch_size"),
    ("data.unlabeled_batch_size=0", "data.unlabeled_batch_size"),
    ("model.channels=[8]", "model.channels"),
])
def test_out_of_range_config_value_stops_before_any_output(tmp_path, tiny_config, setting, key, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", tiny_config, "--out", out, "--set", setting, "--no-progress"], capsys)
    assert_one_line_error(code, err, f"'{key}'", "tiny.yaml")
    assert not out.exists()


def test_train_overwrite_removes_the_previous_run_and_nothing_else(tmp_path, tiny_volumes, capsys):
    out = tmp_path / "run"
    stale = {
        "last.pt": b"old", "best.pt": b"old", "summary.json": b'{"old": true}', "config.json": b'{"old": true}',
        "metrics.jsonl": b'{"iter": 999, "split": "train", "loss": 1.0}\n',
        "tb/events.out.tfevents.1.old": b"old", "inspect/iter_000999.json": b"{}",
        "inspect/iter_000999.npz": b"old",
    }
    mine = {"notes.txt": b"keep", "mydata/volume.tif": b"keep", "tb_backup/events": b"keep",
            "best.pt.bak": b"keep"}
    for name, content in {**stale, **mine}.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(content)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_volumes)))

    # A start that fails (here: labels outside the classes) deletes nothing.
    tifffile.imwrite(tmp_path / "label7.tif", np.full((8, 64, 64), 7, np.uint8))
    code, _, err = run_cli(["train", "--config", config, "--out", out, "--overwrite", "--no-progress",
                            "--set", f"data.train.label={tmp_path / 'label7.tif'}"], capsys)
    assert_one_line_error(code, err, "label7.tif")
    assert all((out / name).read_bytes() == content for name, content in {**stale, **mine}.items())

    code, out_text, err = run_cli(["train", "--config", config, "--out", out, "--overwrite", "--no-progress"],
                                  capsys)
    assert code == 0, err
    # train ends with the final validation table (classes 0 and 1 of the EM labels, fg_iou).
    final = json.loads((out / "summary.json").read_text())["final"]
    assert "validation at iteration 6:" in out_text and f"fg_iou = {final['fg_iou']:.4f}" in out_text
    for name, content in mine.items():
        assert (out / name).read_bytes() == content, name
    # The supervised method writes no inspection files: the old ones are gone with their folder.
    assert not (out / "inspect").exists()
    assert not (out / "tb" / "events.out.tfevents.1.old").exists()
    assert list((out / "tb").iterdir()), "the new run's TensorBoard events are missing"
    iterations = [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert iterations and max(iterations) == 6
    assert json.loads((out / "summary.json").read_text())["iterations"] == 6
    assert json.loads((out / "config.json").read_text())["train"]["iterations"] == 6
    for name in ("last.pt", "best.pt"):
        assert torch.load(out / name, weights_only=True)["format"] == "mitoseg-checkpoint"


def test_remove_run_outputs_unlinks_links_and_refuses_foreign_kinds(tmp_path):
    from mitoseg.cli import remove_run_outputs
    from mitoseg.errors import MitosegError

    out = tmp_path / "run"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_text("keep")
    (out / "tb").symlink_to(elsewhere, target_is_directory=True)
    (out / "last.pt").write_bytes(b"old")
    assert sorted(p.name for p in remove_run_outputs(out)) == ["last.pt", "tb"]
    assert (elsewhere / "precious").read_text() == "keep" and list(out.iterdir()) == []
    # A folder where a run writes a file (or the reverse) is not a run's own: left alone, with an error.
    # Checked before anything is deleted: the old run stays whole.
    (out / "last.pt").write_bytes(b"old")
    (out / "best.pt").mkdir()
    with pytest.raises(MitosegError, match="best.pt is a folder"):
        remove_run_outputs(out)
    assert (out / "last.pt").read_bytes() == b"old"
    (out / "best.pt").rmdir()
    (out / "last.pt").unlink()
    (out / "inspect").write_text("mine")
    with pytest.raises(MitosegError, match="inspect is a file"):
        remove_run_outputs(out)
    assert (out / "inspect").read_text() == "mine"
