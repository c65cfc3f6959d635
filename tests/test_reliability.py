"""What happens when things go wrong (issue 13), through the real command line in a subprocess.

Each test asserts the exit status, the one line on stderr and what is left on disk: divergence,
non-finite pixels, truncated files, outputs under a file, a full disk, temporaries of killed runs,
bad options, Ctrl-C, and kill -9 in the middle of training (resumed, bit-identical to a run that was
never interrupted). The skip of a non-finite step is also checked in-process, state by state.
"""

from __future__ import annotations

import copy
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import yaml

from mitoseg.cli import main

from conftest import run_cli, tiny_config_dict

# ------------------------------------------------------------------------------------------------ helpers


def mitoseg(*args, cwd=None, timeout=300):
    """``python -m mitoseg ARGS`` in a subprocess: (exit status, stdout, stderr)."""
    result = subprocess.run([sys.executable, "-m", "mitoseg", *map(str, args)], capture_output=True, text=True,
                            cwd=cwd, timeout=timeout)
    return result.returncode, result.stdout, result.stderr


def one_line(code, err, expected_code, *needles):
    """Exit status ``expected_code`` and exactly one ``mitoseg: error:`` line holding every needle."""
    assert code == expected_code, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mitoseg: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


def listing(folder: Path) -> dict:
    """Every path under ``folder`` with its bytes (files) or None (folders)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name)


def write_config(path: Path, volumes: dict, **train) -> Path:
    path.write_text(yaml.safe_dump(tiny_config_dict(volumes, **train)))
    return path


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def finite(state: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for key in ("model", "ema_model") for t in state[key].values()
               if t.is_floating_point())


class Payload:
    """Pickled as a reference to code, which weights-only loading refuses."""


def dead_pid() -> int:
    """The PID of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_volumes):
    """A finished tiny run (trained in this process; the tests run the CLI in subprocesses)."""
    out = tmp_path_factory.mktemp("reliability") / "run"
    config = write_config(out.parent / "tiny.yaml", tiny_volumes)
    assert main(["train", "--config", str(config), "--out", str(out), "--no-progress"]) == 0
    return out


# ------------------------------------------------------------------------------ 1. divergence


def test_divergence_at_a_huge_learning_rate_stops_with_exit_3_and_keeps_the_last_good_checkpoints(
        tmp_path, tiny_volumes, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_volumes, iterations=40, log_every=1, checkpoint_every=1,
                          val_every=1, max_bad_steps=3)
    run = tmp_path / "run"
    code, _, err = mitoseg("train", "--config", config, "--out", run, "--no-progress", "--set", "optim.lr=1e6")
    line = one_line(code, err, 3, "training diverged at iteration", "likely cause: the learning rate",
                    "optim.lr = 1e+06", "last good last.pt and best.pt", "are kept")
    stopped = int(re.search(r"at iteration (\d+)", line)[1])
    # Checkpoints are written every iteration: the last ones are those of the last good step, finite.
    last, best = load(run / "last.pt"), load(run / "best.pt")
    assert 1 <= last["iteration"] < stopped and best["iteration"] <= last["iteration"]
    assert finite(last) and finite(best)
    assert temporaries(run) == [] and not (run / "summary.json").exists()
    # predict uses them.
    code, _, err = run_cli(["predict", "--checkpoint", run / "last.pt", "--input", tiny_volumes["val_image"],
                            "--output", tmp_path / "pred.tif", "--no-progress"], capsys)
    assert code == 0, err

    # No checkpoint yet when the streak begins: nothing is written, each skipped step is logged.
    quiet = tmp_path / "quiet"
    code, _, err = mitoseg("train", "--config", config, "--out", quiet, "--no-progress", "--set", "optim.lr=1e6",
                           "--set", "train.checkpoint_every=100", "--set", "train.val_every=100")
    line = one_line(code, err, 3, "3 consecutive steps", "were skipped (train.max_bad_steps = 3)",
                    "likely cause: the learning rate", "no checkpoint of it was written")
    stopped = int(re.search(r"at iteration (\d+)", line)[1])
    since = int(re.search(r"from iteration (\d+)", line)[1])
    assert stopped == since + 2
    assert sorted(p.name for p in quiet.iterdir()) == ["config.json", "metrics.jsonl", "tb"]
    records = [json.loads(line) for line in (quiet / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], r.get("skipped_steps"), r["loss"]) for r in records[-3:]] == [
        (since, 1, None), (since + 1, 2, None), (since + 2, 3, None)]


def test_non_finite_inputs_are_blamed_on_the_data(tmp_path, tiny_volumes):
    # Finite in float64, infinite once normalized in float32: the network sees +inf pixels.
    image = tifffile.imread(tiny_volumes["train_image"]).astype(np.float64)
    image[:, 8:56, 8:56] = 1e300
    tifffile.imwrite(tmp_path / "huge.tif", image, photometric="minisblack")
    config = write_config(tmp_path / "tiny.yaml", tiny_volumes, iterations=20, log_every=1, max_bad_steps=2)
    code, _, err = mitoseg("train", "--config", config, "--out", tmp_path / "run", "--no-progress",
                           "--set", f"data.train.image={tmp_path / 'huge.tif'}")
    one_line(code, err, 3, "training diverged", "2 consecutive steps", "likely cause: non-finite input images",
             "check the data")
    assert not list((tmp_path / "run").glob("*.pt"))


def test_infinite_and_out_of_range_numbers_are_refused_with_their_key(tmp_path, tiny_volumes, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_volumes)
    code, _, err = mitoseg("train", "--config", config, "--out", tmp_path / "run", "--set", "optim.lr=.inf")
    one_line(code, err, 2, "config key 'optim.lr' must be a finite number, got inf")
    for setting, key in (("train.grad_clip=.nan", "train.grad_clip"), ("optim.lr=-.inf", "optim.lr"),
                         ("data.augment.gamma=[0.5, .inf]", "data.augment.gamma[1]"),
                         ("train.max_bad_steps=0", "train.max_bad_steps")):
        code, _, err = run_cli(["train", "--config", config, "--out", tmp_path / "run", "--set", setting], capsys)
        one_line(code, err, 2, f"config key '{key}'")
    assert not (tmp_path / "run").exists()


def test_predict_and_evaluate_refuse_a_checkpoint_with_non_finite_weights(tmp_path, trained, tiny_volumes, capsys):
    state = load(trained / "best.pt")
    name = next(k for k, t in state["ema_model"].items() if t.is_floating_point())
    state["ema_model"][name] = state["ema_model"][name].clone()
    state["ema_model"][name].view(-1)[0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    before = listing(tmp_path)
    code, _, err = mitoseg("predict", "--checkpoint", tmp_path / "nan.pt", "--input", tiny_volumes["val_image"],
                           "--output", tmp_path / "pred.tif", "--no-progress")
    one_line(code, err, 2, "nan.pt", "ema weights hold non-finite values", "diverged")
    code, _, err = mitoseg("evaluate", "--checkpoint", tmp_path / "nan.pt", "--image", tiny_volumes["val_image"],
                           "--label", tiny_volumes["val_label"], "--no-progress")
    one_line(code, err, 2, "nan.pt", "non-finite")
    assert listing(tmp_path) == before
    # The student's weights are finite: they can still be used.
    code, _, err = run_cli(["predict", "--checkpoint", tmp_path / "nan.pt", "--weights", "student", "--input",
                            tiny_volumes["val_image"], "--output", tmp_path / "pred.tif", "--no-progress"], capsys)
    assert code == 0, err
    # Nor does training continue from such weights.
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.copy(tmp_path / "nan.pt", run / "last.pt")
    before = listing(run)
    code, _, err = run_cli(["train", "--resume", "--out", run, "--no-progress"], capsys)
    one_line(code, err, 2, "--resume", "last.pt holds non-finite weights")
    assert listing(run) == before


def test_a_skipped_step_changes_no_weights_optimizer_state_ema_or_batchnorm_statistics(tmp_path, tiny_volumes):
    from mitoseg.config import config_from_dict
    from mitoseg.engine.trainer import Trainer

    # Without and with gradient clipping, and with a gradient scaler (CUDA's fp16 path, here on the CPU).
    for grad_clip, scaler in ((None, False), (1.0, False), (None, True)):
        trainer = Trainer(config_from_dict(tiny_config_dict(tiny_volumes, grad_clip=grad_clip)),
                          tmp_path / f"run{grad_clip}{scaler}", progress=False)
        if scaler:
            trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        batches = trainer.batches(0)
        labeled, _ = next(batches)
        trainer.train_step(labeled, None)  # a good step: the optimizer has state now
        trainer.iteration += 1
        assert int(trainer.bad_steps) == 0

        def snapshot():
            return copy.deepcopy({"model": trainer.model.state_dict(), "ema": trainer.ema.module.state_dict(),
                                  "optimizer": trainer.optimizer.state_dict()["state"],
                                  "n_averaged": trainer.ema.n_averaged})

        before = snapshot()
        labeled, _ = next(batches)
        poisoned = {**labeled, "image": labeled["image"].clone()}
        poisoned["image"][0, 0, 3, 3] = float("nan")
        logs = trainer.train_step(poisoned, None)
        trainer.iteration += 1
        assert not torch.isfinite(logs["loss"])
        after = snapshot()
        assert after["n_averaged"] == before["n_averaged"]
        for part in ("model", "ema"):  # running_mean / running_var / num_batches_tracked included
            for key, tensor in before[part].items():
                assert torch.equal(tensor, after[part][key]), (part, key)
        for index, state in before["optimizer"].items():
            for key, tensor in state.items():
                assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(after["optimizer"][index][key]))
        assert int(trainer.bad_steps) == 1 and bool(trainer.bad_inputs) and int(trainer.bad_since) == 2
        if scaler:  # the overflow lowers the scale, as GradScaler.step's own skip would
            assert trainer.scaler.get_scale() == 2.0 ** 9
        trainer.train_step(labeled, None)  # a good step ends the streak
        assert int(trainer.bad_steps) == 0 and not bool(trainer.bad_inputs)


def test_the_ddfp_flow_skips_a_non_finite_step():
    from mitoseg.semi.flow import DensityModel, FlowTrainer

    torch.manual_seed(0)
    trainer = FlowTrainer(DensityModel(4, 2, hidden=8, seed=0), total_steps=10, max_pixels=64)
    features, labels = torch.randn(100, 4), torch.randint(0, 2, (100,))
    trainer.step(features, labels)
    before = copy.deepcopy((trainer.model.state_dict(), trainer.optimizer.state_dict()["state"]))
    bad = features.clone()
    bad[:, 0] = float("inf")
    logs = trainer.step(bad, labels)
    assert not torch.isfinite(logs["flow_nll_bpd"])
    model, state = trainer.model.state_dict(), trainer.optimizer.state_dict()["state"]
    assert all(torch.equal(t, model[k]) for k, t in before[0].items())
    assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(state[i][k]))
               for i, s in before[1].items() for k, v in s.items())  # step counts too
    trainer.step(features, labels)
    assert not torch.equal(trainer.model.means, before[0]["means"])


# ----------------------------------------------------------------------------- 2. +/-inf pixels


def test_non_finite_pixels_are_refused_by_train_and_predict(tmp_path, tiny_volumes, trained, capsys):
    config = write_config(tmp_path / "tiny.yaml", tiny_volumes)
    for value, shown in ((np.inf, "+inf"), (-np.inf, "-inf"), (np.nan, "NaN")):
        image = tifffile.imread(tiny_volumes["train_image"]).astype(np.float32)
        image[5, 10, 10] = value
        bad = tmp_path / "bad.tif"
        tifffile.imwrite(bad, image, photometric="minisblack")
        # +inf through the command in a subprocess, the others through main() in this process.
        cli = (lambda *args: mitoseg(*args)) if value == np.inf else (lambda *args: run_cli(args, capsys))
        code, _, err = cli("train", "--config", config, "--out", tmp_path / "run", "--no-progress",
                           "--set", f"data.train.image={bad}")
        one_line(code, err, 2, "bad.tif", "slice 5", "1 non-finite value", shown)
        assert not (tmp_path / "run").exists()
        code, _, err = cli("predict", "--checkpoint", trained / "best.pt", "--input", bad,
                           "--output", tmp_path / "pred.tif", "--no-progress")
        one_line(code, err, 2, "bad.tif", "slice 5", shown)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tif", "tiny.yaml"]


def test_evaluate_refuses_a_float_prediction_with_nan_or_inf(tmp_path, tiny_volumes, capsys):
    label = tifffile.imread(tiny_volumes["val_label"])
    for value in (np.nan, np.inf):
        prediction = label.astype(np.float32)
        prediction[2, 0, 0] = value
        tifffile.imwrite(tmp_path / "pred.tif", prediction, photometric="minisblack")
        cli = (lambda *args: mitoseg(*args)) if value == np.inf else (lambda *args: run_cli(args, capsys))
        code, out, err = cli("evaluate", "--prediction", tmp_path / "pred.tif", "--label", tiny_volumes["val_label"])
        one_line(code, err, 2, "pred.tif", "slice 2", "non-finite")
        assert out == "" and not (tmp_path / "pred_metrics.json").exists()


# ------------------------------------------------------------------------------ 3. truncated TIFF


def test_a_truncated_tiff_is_an_error_naming_the_file_and_the_page(tmp_path, tiny_volumes, trained, capsys):
    data = Path(tiny_volumes["train_image"]).read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[:len(data) // 2])  # an 8-slice stack cut in half
    # Written by mitoseg itself (zlib pages, shaped metadata): cut in half too.
    from mitoseg.data.readers import write_volume

    write_volume(tmp_path / "mine.tif", tifffile.imread(tiny_volumes["train_image"]))
    data = (tmp_path / "mine.tif").read_bytes()
    (tmp_path / "mine_cut.tif").write_bytes(data[:len(data) // 2])
    config = write_config(tmp_path / "tiny.yaml", tiny_volumes)
    for name in ("cut.tif", "mine_cut.tif"):
        cli = (lambda *args: mitoseg(*args)) if name == "cut.tif" else (lambda *args: run_cli(args, capsys))
        code, _, err = cli("train", "--config", config, "--out", tmp_path / "run", "--no-progress",
                           "--set", f"data.train.image={tmp_path / name}")
        one_line(code, err, 2, name, "page", "cannot be read", "truncated or damaged")
        assert not (tmp_path / "run").exists()
        code, out, err = cli("predict", "--checkpoint", trained / "best.pt", "--input", tmp_path / name,
                             "--output", tmp_path / "pred.tif", "--no-progress")
        one_line(code, err, 2, name, "page")
        assert not (tmp_path / "pred.tif").exists() and temporaries(tmp_path) == []


# ------------------------------------------------------------------------------ 4. user errors


def test_outputs_under_a_regular_file_are_one_line_errors(tmp_path, tiny_volumes, trained, capsys):
    blocker = tmp_path / "FILE"
    blocker.write_bytes(b"a file, not a folder")
    config = write_config(tmp_path / "tiny.yaml", tiny_volumes)
    before = listing(tmp_path)
    code, _, err = mitoseg("predict", "--checkpoint", trained / "best.pt", "--input", tiny_volumes["val_image"],
                           "--output", blocker / "o.tif", "--no-progress")
    one_line(code, err, 2, "--output", "FILE is a file, not a directory")
    code, _, err = mitoseg("train", "--config", config, "--out", blocker / "run", "--no-progress")
    one_line(code, err, 2, "--out", "FILE is a file, not a directory")
    code, _, err = run_cli(["evaluate", "--prediction", tiny_volumes["val_label"], "--label",
                            tiny_volumes["val_label"], "--json", blocker / "e.json"], capsys)
    one_line(code, err, 2, "--json", "FILE is a file, not a directory")
    assert listing(tmp_path) == before


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MiB tmpfs mounted for the test (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the full-disk test mounts a small tmpfs, which needs root")
    if shutil.which("mount") is None:
        pytest.skip("the full-disk test needs the mount command")
    point = tmp_path / "disk"
    point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(point)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(folder: Path, leave: int) -> None:
    """Fill the file system of ``folder`` up to ``leave`` bytes (one more filler file per call)."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    with open(folder / f"filler{len(list(folder.glob('filler*')))}", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmpfs, tiny_volumes, trained, capsys):
    config = write_config(tmpfs.parent / "tiny.yaml", tiny_volumes, val_every=100, checkpoint_every=2)
    run = tmpfs / "run"
    code, _, err = run_cli(["train", "--config", config, "--out", run, "--no-progress", "--max-iters", "2"], capsys)
    assert code == 0, err
    kept = (run / "last.pt").read_bytes()
    fill(tmpfs, leave=64 * 1024)  # room for the logs, not for a checkpoint
    code, _, err = mitoseg("train", "--resume", "--out", run, "--no-progress")
    one_line(code, err, 2, "no space left on device", "last.pt", "the previous last.pt is kept")
    assert (run / "last.pt").read_bytes() == kept and load(run / "last.pt")["iteration"] == 2
    assert temporaries(tmpfs) == []

    fill(tmpfs, leave=0)
    code, _, err = mitoseg("predict", "--checkpoint", trained / "best.pt", "--input", tiny_volumes["val_image"],
                           "--output", tmpfs / "pred.tif", "--no-progress")
    one_line(code, err, 2, "no space left on device", "pred.tif")
    code, _, err = run_cli(["predict", "--checkpoint", trained / "best.pt", "--input", tiny_volumes["val_image"],
                            "--output", f"{tmpfs / 'pred.h5'}:/labels", "--no-progress"], capsys)
    one_line(code, err, 2, "no space left on device", "pred.h5")
    code, _, err = mitoseg("evaluate", "--prediction", tiny_volumes["val_label"], "--label",
                           tiny_volumes["val_label"], "--json", tmpfs / "e.json")
    one_line(code, err, 2, "no space left on device", "e.json")
    assert sorted(p.name for p in tmpfs.iterdir()) == ["filler0", "filler1", "run"] and temporaries(tmpfs) == []


# --------------------------------------------------------------------------- 5. temporaries


def test_a_later_run_removes_the_temporaries_of_killed_runs_and_keeps_living_ones(tmp_path, tiny_volumes, trained,
                                                                                  capsys):
    # A big enough input that predict is still writing when it is killed.
    big = tmp_path / "big.tif"
    tifffile.imwrite(big, np.random.default_rng(0).integers(0, 255, (64, 256, 256), dtype=np.uint8),
                     photometric="minisblack")
    out = tmp_path / "pred.tif"
    proc = subprocess.Popen([sys.executable, "-m", "mitoseg", "predict", "--checkpoint", str(trained / "best.pt"),
                             "--input", str(big), "--output", str(out), "--slab", "1", "--tta", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = tmp_path / f".pred.tif.tmp-{proc.pid}"
    deadline = time.monotonic() + 120
    while not tmp.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tmp.exists(), "predict did not start writing"
    proc.kill()
    proc.wait()
    assert tmp.exists() and not out.exists()  # what kill -9 leaves
    living = tmp_path / f".pred.tif.tmp-{os.getpid()}"  # another run writing the same output right now
    living.write_bytes(b"in use")
    dead_json = tmp_path / f".e.json.tmp-{dead_pid()}"
    dead_json.write_bytes(b"{")
    legacy_json = tmp_path / ".e.json.tmp"
    legacy_json.write_bytes(b"{")

    code, _, err = mitoseg("predict", "--checkpoint", trained / "best.pt", "--input", tiny_volumes["val_image"],
                           "--output", out, "--no-progress")
    assert code == 0, err
    assert out.exists() and not tmp.exists() and living.read_bytes() == b"in use"
    code, _, err = run_cli(["evaluate", "--prediction", out, "--label", tiny_volumes["val_label"], "--json",
                            tmp_path / "e.json"], capsys)
    assert code == 0, err
    assert (tmp_path / "e.json").exists() and not dead_json.exists() and not legacy_json.exists()
    assert temporaries(tmp_path) == [living.name]

    # A checkpoint's temporary left by a killed training run goes with the next run in that folder.
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    stale = run / f".last.pt.tmp-{dead_pid()}"
    stale.write_bytes(b"half a checkpoint")
    code, _, err = run_cli(["train", "--resume", "--out", run, "--no-progress"], capsys)
    assert code == 0, err
    assert temporaries(run) == []


# ------------------------------------------------------------------- 6. options and messages


def test_bad_options_and_foreign_files_are_one_line_errors(tmp_path, tiny_volumes, trained, capsys):
    base = ["predict", "--input", tiny_volumes["val_image"], "--output", tmp_path / "pred.tif", "--no-progress"]
    code, _, err = mitoseg(*base, "--checkpoint", trained / "best.pt", "--roi-size", "7", "7")
    one_line(code, err, 2, "--roi-size", "multiples of 4", "7 7")
    # argparse's own errors: one line, no usage block.
    code, _, err = mitoseg("predict", "--checkpoint", trained / "best.pt")
    one_line(code, err, 2, "--input", "--output", "mitoseg predict --help")
    code, _, err = mitoseg("train", "--max-iters", "0")
    one_line(code, err, 2, "--max-iters", "at least 1")
    code, _, err = mitoseg("frobnicate")
    one_line(code, err, 2, "invalid choice")
    # Checkpoints that are not mitoseg's: no advice to run their code.
    (tmp_path / "junk.pt").write_bytes(b"junk")
    torch.save({"x": Payload()}, tmp_path / "code.pt")
    data = (trained / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    for name in ("junk.pt", "code.pt", "cut.pt"):
        cli = (lambda *args: mitoseg(*args)) if name == "code.pt" else (lambda *args: run_cli(args, capsys))
        code, _, err = cli(*base, "--checkpoint", tmp_path / name)
        line = one_line(code, err, 2, name, "not a mitoseg checkpoint, or the file is damaged")
        assert "weights_only" not in line
    # A directory where a file is expected.
    code, _, err = run_cli([*base, "--checkpoint", trained], capsys)
    one_line(code, err, 2, str(trained), "is a directory")
    code, _, err = run_cli(["train", "--config", tmp_path, "--out", tmp_path / "run"], capsys)
    one_line(code, err, 2, "is a directory")
    (tmp_path / "out.tif").mkdir()
    code, _, err = run_cli(["predict", "--checkpoint", trained / "best.pt", "--input", tiny_volumes["val_image"],
                            "--output", tmp_path / "out.tif", "--no-progress"], capsys)
    one_line(code, err, 2, "out.tif is a directory")
    code, _, err = run_cli(["evaluate", "--prediction", tiny_volumes["val_label"], "--label",
                            tiny_volumes["val_label"], "--json", tmp_path], capsys)
    one_line(code, err, 2, "is a directory")
    assert not (tmp_path / "pred.tif").exists() and list((tmp_path / "out.tif").iterdir()) == []


# ------------------------------------------------------------- 7. Ctrl-C and kill -9 in training


@pytest.fixture(scope="module")
def long_config(tmp_path_factory, tiny_volumes):
    """A config of 24 iterations, checkpoints every 5, and the last.pt of an uninterrupted run of it."""
    folder = tmp_path_factory.mktemp("long")
    config = write_config(folder / "long.yaml", tiny_volumes, iterations=24, log_every=1, checkpoint_every=5,
                          val_every=6)
    code, _, err = mitoseg("train", "--config", config, "--out", folder / "full", "--no-progress")
    assert code == 0, err
    return config, load(folder / "full" / "last.pt")


def logged_iteration(run: Path) -> int:
    """The last iteration in the run's metrics.jsonl (0 before the first)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["iter"]
        except ValueError:
            continue
    return 0


def start_training(*args) -> subprocess.Popen:
    # The child must see Ctrl-C as a foreground terminal job does. A child inherits an ignored SIGINT (pytest
    # started as a background job of a non-interactive shell ignores it), and mitoseg keeps an ignored Ctrl-C
    # ignored; a handled one is reset to the default by exec, so the parent handles it while starting the child.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([sys.executable, "-m", "mitoseg", "train", *map(str, args), "--no-progress"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def wait_for_iteration(proc: subprocess.Popen, run: Path, target: int) -> None:
    deadline = time.monotonic() + 180
    while logged_iteration(run) < target:
        assert proc.poll() is None, f"training ended before iteration {target}: {proc.communicate()}"
        assert time.monotonic() < deadline, "training is too slow"
        time.sleep(0.01)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["iteration"] == b["iteration"]
    for key in ("model", "ema_model"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs"
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][name]))


def test_ctrl_c_saves_last_pt_at_the_iteration_reached_and_resume_is_exact(tmp_path, long_config):
    config, reference = long_config
    run = tmp_path / "run"
    target = random.Random().randint(7, 14)  # past the first checkpoint (5), before the second's neighbour
    proc = start_training("--config", config, "--out", run)
    wait_for_iteration(proc, run, target)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "mitoseg: interrupted"
    reached = int(re.search(r"interrupted at iteration (\d+); last.pt is saved at this iteration", out)[1])
    assert reached >= target
    assert load(run / "last.pt")["iteration"] == reached and temporaries(run) == []
    code, _, err = mitoseg("train", "--resume", "--out", run, "--no-progress")
    assert code == 0, err
    assert_same_training_state(reference, load(run / "last.pt"))
    iterations = [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["split"] == "train"]
    assert iterations == list(range(1, 25))


def test_training_killed_at_random_iterations_and_resumed_three_times_ends_bit_identical(tmp_path, long_config):
    config, reference = long_config
    run = tmp_path / "run"
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    checkpoint, kills = 0, []
    for attempt in range(3):
        target = min(20, rng.randint(checkpoint + 6, checkpoint + 9))  # a new checkpoint before the kill
        proc = start_training(*(["--config", config] if attempt == 0 else ["--resume"]), "--out", run)
        wait_for_iteration(proc, run, target)
        time.sleep(rng.random() * 0.05)  # anywhere in the iteration: the step, a log line, a checkpoint
        proc.kill()
        proc.communicate()
        checkpoint = load(run / "last.pt")["iteration"]
        kills.append((target, checkpoint))
        # Iteration `target` was logged, so every checkpoint before it was complete.
        assert checkpoint >= 5 * ((target - 1) // 5), (seed, kills)
    code, _, err = mitoseg("train", "--resume", "--out", run, "--no-progress")
    assert code == 0, (seed, kills, err)
    assert_same_training_state(reference, load(run / "last.pt"))
    assert temporaries(run) == []
    iterations = [json.loads(line)["iter"] for line in (run / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["split"] == "train"]
    assert iterations == list(range(1, 25)), (seed, kills)


# ---------------------------------------------------- 8. Reliability II: outputs, masks, signals, refusals


def read_only(monkeypatch, folder: Path) -> None:
    """``folder`` reports a read-only file system (as a read-only mount does) to mitoseg's checks."""
    real = os.statvfs
    folder = os.path.abspath(folder)

    class Flags:
        def __init__(self, result):
            self._result = result
            self.f_flag = result.f_flag | os.ST_RDONLY

        def __getattr__(self, name):
            return getattr(self._result, name)

    monkeypatch.setattr(os, "statvfs", lambda path: Flags(real(path)) if os.path.abspath(path) == folder
                        else real(path))


def test_an_output_on_a_read_only_file_system_is_one_line_before_any_work(tmp_path, tiny_volumes, trained, capsys,
                                                                           monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    image, label = tiny_volumes["val_image"], tiny_volumes["val_label"]
    cases = [
        ["init", "--image", image, "--label", label, "--cpu", "--output", ro / "c.yaml"],
        ["export", "--checkpoint", trained / "best.pt", "--format", "torchscript", "--output", ro / "m.pt"],
        ["export", "--checkpoint", trained / "best.pt", "--format", "onnx", "--output", ro / "m.onnx"],
        ["export", "--checkpoint", trained / "best.pt", "--format", "bioimageio", "--output", ro / "pkg.zip"],
        ["evaluate", "--prediction", label, "--label", label, "--json", ro / "m.json"],
        ["instances", "--prediction", label, "--output", tmp_path / "i.tif", "--table", ro / "t.csv"],
        ["predict", "--checkpoint", trained / "best.pt", "--input", image, "--output", ro / "p.tif"],
        ["train", "--config", write_config(tmp_path / "c.yaml", tiny_volumes), "--out", ro / "run"],
    ]
    for args in cases:
        code, out, err = run_cli([*args, "--no-progress"] if args[0] in ("predict", "train", "instances", "evaluate")
                                 else args, capsys)
        one_line(code, err, 2, "read-only file system", ro)
        assert out == "", (args, out)
    assert list(ro.iterdir()) == [] and not (tmp_path / "i.tif").exists()


def test_resume_into_a_folder_that_became_read_only_is_one_line(tmp_path, tiny_volumes, capsys, monkeypatch):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", tiny_volumes, iterations=4, checkpoint_every=2)
    assert main(["train", "--config", str(config), "--out", str(run), "--no-progress", "--max-iters", "2"]) == 0
    capsys.readouterr()
    read_only(monkeypatch, run)
    code, _, err = run_cli(["train", "--resume", "--out", run, "--no-progress"], capsys)
    one_line(code, err, 2, "read-only file system", run)


def test_any_write_failure_of_the_file_system_is_one_line(tmp_path):
    """Permission denied, a read-only file system met while writing, ...: one line naming the output."""
    import errno

    from mitoseg.atomic import write_atomic
    from mitoseg.errors import MitosegError

    for code, reason in ((errno.EACCES, "permission denied"), (errno.EROFS, "a read-only file system")):
        def fail(handle, code=code):
            raise OSError(code, os.strerror(code))

        with pytest.raises(MitosegError, match=f"out.bin: cannot write \\({reason}\\)"):
            write_atomic(tmp_path / "out.bin", fail)
        assert list(tmp_path.iterdir()) == []


def test_every_output_of_predict_and_instances_is_checked_before_the_first_byte(tmp_path, tiny_volumes, trained,
                                                                                capsys):
    (tmp_path / "file").write_text("x")
    image, label = tiny_volumes["val_image"], tiny_volumes["val_label"]
    predict = ["predict", "--checkpoint", trained / "best.pt", "--input", image, "--output", tmp_path / "p.tif",
               "--no-progress"]
    cases = [
        ([*predict, "--instances", tmp_path / "i.tif", "--table", tmp_path / "file" / "t.csv"], "is a file"),
        ([*predict, "--instances", tmp_path / "i.tif", "--table", tmp_path / "t.parquet"], "pyarrow"),
        ([*predict, "--instances", tmp_path / "file" / "i.tif"], "is a file"),
        ([*predict, "--instances", tmp_path / "i.tif", "--min-distance", "0"], "--min-distance"),
        (["instances", "--prediction", label, "--output", tmp_path / "i.tif", "--table", tmp_path / "file" / "t.csv"],
         "is a file"),
        (["instances", "--prediction", label, "--output", tmp_path / "i.tif", "--table", tmp_path / "t.parquet"],
         "pyarrow"),
    ]
    for args, needle in cases:
        code, out, err = run_cli(args, capsys)
        one_line(code, err, 2, needle)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["file"], args


def test_instances_reads_masks_as_masks(tmp_path, capsys):
    cubes = np.zeros((12, 24, 24), np.float32)
    cubes[2:6, 2:8, 2:8] = 0.9
    cubes[6:10, 12:20, 12:20] = 0.9
    cubes[cubes == 0] = 0.2  # a probability map: "nonzero" would be the whole volume
    tifffile.imwrite(tmp_path / "p.tif", cubes)
    base = ["instances", "--prediction", tmp_path / "p.tif", "--no-progress"]
    code, _, err = run_cli([*base, "--output", tmp_path / "a.tif"], capsys)
    one_line(code, err, 2, "floating-point mask", "--threshold")
    assert not (tmp_path / "a.tif").exists()
    code, out, err = run_cli([*base, "--output", tmp_path / "a.tif", "--threshold", "0.5"], capsys)
    assert code == 0, err
    assert int(tifffile.imread(tmp_path / "a.tif").max()) == 2
    nan = cubes.copy()
    nan[7, 0, 0] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    code, _, err = run_cli(["instances", "--prediction", tmp_path / "nan.tif", "--output", tmp_path / "b.tif",
                            "--threshold", "0.5", "--no-progress"], capsys)
    one_line(code, err, 2, "slice 7", "NaN")
    assert not (tmp_path / "b.tif").exists()
    signed = np.where(cubes > 0.5, -1, 0).astype(np.int16)  # a -1 / 0 mask: its nonzero voxels are objects
    tifffile.imwrite(tmp_path / "s.tif", signed)
    code, _, err = run_cli(["instances", "--prediction", tmp_path / "s.tif", "--output", tmp_path / "c.tif",
                            "--no-progress"], capsys)
    assert code == 0, err
    assert int(tifffile.imread(tmp_path / "c.tif").max()) == 2
    code, _, err = run_cli(["instances", "--prediction", tmp_path / "s.tif", "--output", tmp_path / "d.tif",
                            "--split", "distance", "--min-distance", "0"], capsys)
    one_line(code, err, 2, "--min-distance must be at least 1")
    code, _, err = run_cli(["evaluate", "--prediction", tmp_path / "p.tif", "--label", tmp_path / "s.tif",
                            "--instances", "--no-progress"], capsys)
    one_line(code, err, 2, "floating-point")


def test_a_config_naming_a_key_twice_is_refused(tmp_path, tiny_volumes, capsys):
    text = yaml.safe_dump(tiny_config_dict(tiny_volumes)).replace("optim:\n", "optim:\n  lr: 0.5\n", 1)
    (tmp_path / "dup.yaml").write_text(text)
    code, _, err = run_cli(["train", "--config", tmp_path / "dup.yaml", "--out", tmp_path / "run"], capsys)
    one_line(code, err, 2, "dup.yaml", "key 'lr' appears twice")
    assert not (tmp_path / "run").exists()


def test_init_refuses_an_image_with_nan(tmp_path, tiny_volumes, capsys):
    image = tifffile.imread(tiny_volumes["train_image"]).astype(np.float32)
    image[3, 1, 1] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", image, photometric="minisblack")
    code, _, err = run_cli(["init", "--image", tmp_path / "nan.tif", "--label", tiny_volumes["train_label"],
                            "--cpu", "--output", tmp_path / "c.yaml"], capsys)
    one_line(code, err, 2, "nan.tif", "slice 3")
    assert not (tmp_path / "c.yaml").exists()


def test_content_refusals_of_predict_come_before_torch(tmp_path, tiny_volumes, trained):
    """An empty slice folder, NaN pixels, a truncated TIFF: refused before torch is imported."""
    (tmp_path / "empty").mkdir()
    image = tifffile.imread(tiny_volumes["val_image"]).astype(np.float32)
    image[2, 0, 0] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", image, photometric="minisblack")
    data = Path(tiny_volumes["val_image"]).read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    code = ("import json, sys; from mitoseg.cli import main; codes = [main(['predict', '--checkpoint', sys.argv[1], "
            "'--input', i, '--output', 'o.tif', '--no-progress']) for i in sys.argv[2:]]; "
            "print(json.dumps([codes, 'torch' in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", code, str(trained / "best.pt"), "empty", "nan.tif", "cut.tif"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    codes, torch_imported = json.loads(result.stdout.strip().splitlines()[-1])
    assert codes == [2, 2, 2] and not torch_imported, result.stderr
    errors = result.stderr.strip().splitlines()
    assert "empty" in errors[0] and "slice 2" in errors[1] and "cut.tif" in errors[2], errors


def wait_for(condition, proc, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.005)


def test_sigterm_during_predict_is_a_line_exit_143_and_nothing_left(tmp_path, trained):
    tifffile.imwrite(tmp_path / "big.tif", np.random.default_rng(0).integers(0, 255, (160, 128, 128), np.uint8))
    proc = subprocess.Popen([sys.executable, "-m", "mitoseg", "predict", "--checkpoint", trained / "best.pt",
                             "--input", tmp_path / "big.tif", "--output", tmp_path / "p.tif", "--no-progress",
                             "--tta", "--slab", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: temporaries(tmp_path) != [], proc, "the output's temporary")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("mitoseg: terminated (SIGTERM)")
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.tif"]


def test_sigterm_during_training_saves_last_pt_and_exits_143(tmp_path, long_config):
    config, reference = long_config
    run = tmp_path / "run"
    proc = start_training("--config", config, "--out", run)
    wait_for_iteration(proc, run, 7)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    reached = int(re.search(r"terminated \(SIGTERM\) at iteration (\d+); last.pt is saved at this iteration", out)[1])
    assert load(run / "last.pt")["iteration"] == reached >= 7 and temporaries(run) == []
    code, _, err = mitoseg("train", "--resume", "--out", run, "--no-progress")
    assert code == 0, err
    assert_same_training_state(reference, load(run / "last.pt"))


def test_a_folder_output_is_never_missing_while_it_is_replaced(tmp_path):
    from mitoseg.atomic import remove_stale_temporaries, replace_path

    final, new = tmp_path / "out.zarr", tmp_path / ".out.zarr.tmp-1"
    (final / "old").mkdir(parents=True)
    (new / "new").mkdir(parents=True)
    replace_path(new, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"] and (final / "new").is_dir()
    # A replacement killed between its two renames (systems without an atomic exchange): the old output is put
    # back by the next write of the same output, or removed when a new one took its place.
    pid = dead_pid()
    final.rename(tmp_path / f".out.zarr.old-{pid}")
    remove_stale_temporaries(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"] and (final / "new").is_dir()
    (tmp_path / f".out.zarr.old-{pid}").mkdir()
    remove_stale_temporaries(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]


def test_the_object_table_temporary_belongs_to_its_process(tmp_path, capsys):
    mask = np.zeros((6, 16, 16), np.uint8)
    mask[1:4, 2:6, 2:6] = 1
    tifffile.imwrite(tmp_path / "m.tif", mask)
    stale = tmp_path / f".t.csv.tmp-{dead_pid()}"
    stale.write_text("half a table")
    code, _, err = run_cli(["instances", "--prediction", tmp_path / "m.tif", "--output", tmp_path / "i.tif",
                            "--table", tmp_path / "t.csv", "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.tif", "m.tif", "t.csv"]


def test_an_unreachable_dask_scheduler_is_refused_within_seconds(tmp_path, tiny_volumes, trained):
    pytest.importorskip("distributed")
    start = time.monotonic()
    code, _, err = mitoseg("predict", "--checkpoint", trained / "best.pt", "--input", tiny_volumes["val_image"],
                           "--output", tmp_path / "p.zarr", "--dask", "tcp://127.0.0.1:1", "--no-progress")
    one_line(code, err, 2, "tcp://127.0.0.1:1", "cannot reach the scheduler")
    assert time.monotonic() - start < 25  # torch and the checkpoint take a few seconds; Dask's default waits 30
    assert not (tmp_path / "p.zarr").exists()


def test_an_output_that_cannot_fit_is_refused_before_work(tmp_path):
    import shutil as sh

    from mitoseg.atomic import check_output_path
    from mitoseg.errors import MitosegError

    free = sh.disk_usage(tmp_path).free
    check_output_path(tmp_path / "fits.tif", "--output", size=1)
    with pytest.raises(MitosegError, match="no space left on device for --output .*huge.tif: .* free in"):
        check_output_path(tmp_path / "huge.tif", "--output", size=free * 2)
