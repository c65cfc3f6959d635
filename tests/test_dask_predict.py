"""``predict --dask``: blocks with the windows that reach into them equal whole-slice prediction at the
seams (2-D, 2.5-D, TTA, 3-D); on a LocalCluster of 2 worker processes the output equals single-process
``predict``, each worker loads the model once, and a worker killed mid-run loses nothing."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time

import numpy as np
import pytest
import torch
import zarr

from mitoseg.data.readers import context_indices, read_volume
from mitoseg.data.transforms import Normalization
from mitoseg.networks.loading import model_from_checkpoint
from mitoseg.errors import MitosegError
from mitoseg.inference import VolumePredictor
from mitoseg.inference import dask_predict
from mitoseg.inference.predictor import window_span

from conftest import assert_one_line_error, run_cli
from model_helpers import em_like, random_checkpoint

RUN_TIMEOUT_S = 240  # one predict on the cluster; a hang fails the test instead of blocking the suite


# ------------------------------------------------------------------ the maths, in this process


def test_window_span_covers_exactly_the_windows_monai_places_over_the_core():
    from monai.data.utils import dense_patch_slices

    for size, roi, overlap in [(100, 16, 0.25), (100, 16, 0.5), (37, 16, 0.6), (16, 16, 0.25), (9, 16, 0.5),
                               (61, 12, 0.0)]:
        interval = max(1, int(roi * (1 - overlap)))
        starts = [s[0].start for s in dense_patch_slices((max(size, roi),), (roi,), (interval,))]
        for c0, c1 in [(0, 1), (0, size), (size // 3, size // 2 + 1), (size - 1, size)]:
            touching = [s for s in starts if s < c1 and s + roi > c0]
            expected = (min(touching), min(max(touching) + roi, size)) if size > roi else (0, size)
            assert window_span((c0, c1), size, roi, overlap) == expected
            # On a flipped axis the windows are laid out from the other end.
            m0, m1 = window_span((size - c1, size - c0), size, roi, overlap)
            assert window_span((c0, c1), size, roi, overlap, reverse=True) == (size - m1, size - m0)
    # At overlap 0.5 the halo is half a window on each side of a core on the window grid.
    assert window_span((32, 64), 200, 32, 0.5) == (16, 80)


def test_addresses_and_blocks():
    assert dask_predict.parse_address("local:3") == ("local", 3)
    assert dask_predict.parse_address("tcp://10.0.0.5:8786") == ("address", "tcp://10.0.0.5:8786")
    for bad in ("local:0", "local:x", "10.0.0.5:8786", "tcp://"):
        with pytest.raises(MitosegError):
            dask_predict.parse_address(bad)
    # Z rounded up to whole slabs, everything clipped to the volume; default one slab of 1024 x 1024.
    assert dask_predict.block_shape((20, 3000, 500), (5, 256, 256), 4) == (8, 256, 256)
    assert dask_predict.block_shape((20, 3000, 500), None, 4) == (4, 1024, 500)
    blocks = dask_predict.plan_blocks((5, 10, 7), (2, 4, 7))
    assert len(blocks) == 3 * 3 and blocks[-1] == ((4, 5), (8, 10), (0, 7))
    covered = np.zeros((5, 10, 7), int)
    for (z0, z1), (y0, y1), (x0, x1) in blocks:
        covered[z0:z1, y0:y1, x0:x1] += 1
    assert (covered == 1).all()


@pytest.mark.parametrize("kind", ["tif", "h5", "zarr", "png"])
def test_read_region_is_read_then_crop(tmp_path, kind):
    import imageio.v3 as iio

    from mitoseg.data.readers import open_volume, write_volume

    data = em_like((4, 30, 40))
    spec = {"tif": tmp_path / "v.tif", "h5": f"{tmp_path}/v.h5:/raw", "zarr": tmp_path / "v.zarr",
            "png": tmp_path / "slices"}[kind]
    if kind == "png":
        spec.mkdir()
        for i, page in enumerate(data):
            iio.imwrite(spec / f"s{i}.png", page)
    else:
        write_volume(spec, data)
    with open_volume(spec) as volume:
        for z, rows, cols in [((1, 3), slice(5, 17), slice(0, 40)), ((0, 4), slice(29, 30), slice(3, 4)),
                              ((2, 3), slice(None), slice(10, None))]:
            np.testing.assert_array_equal(volume.read_region(*z, rows, cols), data[z[0]:z[1], rows, cols])
    bad = data.astype(np.float32)
    bad[2, 20, 30] = np.nan
    write_volume(tmp_path / "nan.zarr", bad)
    with open_volume(tmp_path / "nan.zarr", finite=True) as volume:
        assert volume.read_region(0, 4, slice(0, 10), slice(0, 40)).shape == (4, 10, 40)  # the NaN is elsewhere
        with pytest.raises(MitosegError, match="slice 2 holds 1 non-finite"):
            volume.read_region(1, 4, slice(15, 25), slice(25, 35))


def blocks_of(shape, chunk):
    axes = [[(s, min(s + c, n)) for s in range(0, n, c)] for n, c in zip(shape, chunk)]
    return list(itertools.product(*axes))


def predict_by_blocks(predictor, volume, normalization, chunk, context=0):
    def read_full(start, stop):
        if context:
            return volume[context_indices(range(start, stop), context, len(volume))]
        return volume[start:stop]

    whole = torch.cat([p for _, _, p in predictor.slabs(read_full, len(volume), normalization)])
    pieces = torch.full_like(whole, float("nan"))
    for z, rows, cols in blocks_of(volume.shape, chunk):
        def read(start, stop, r, c):
            return read_full(start, stop)[..., r, c]

        for start, stop, probs in predictor.block_slabs(read, volume.shape, normalization, z, rows, cols):
            pieces[start:stop, :, rows[0]:rows[1], cols[0]:cols[1]] = probs
    return whole, pieces


@pytest.mark.parametrize("case", ["2d", "2.5d+tta", "3d+tta"])
def test_blocks_equal_whole_slices_at_the_seams(tmp_path, case):
    sections = {"2d": {"inference": {"overlap": 0.25}},
                "2.5d+tta": {"data": {"context_slices": 1}, "inference": {"tta": True, "overlap": 0.5}},
                "3d+tta": {"model": {"spatial_dims": 3, "channels": [4, 8], "strides": [2]},
                           "data": {"patch_size": [4, 16, 16]},
                           "inference": {"roi_size": [4, 16, 16], "tta": True, "slab": 3, "overlap": 0.25}}}[case]
    model, cfg = model_from_checkpoint(random_checkpoint(tmp_path / "m.pt", **sections))
    predictor = VolumePredictor(model, cfg, torch.device("cpu"))
    volume = em_like((6, 45, 53)).astype(np.float32)
    normalization = Normalization(120.0, 60.0)
    chunk = (cfg.inference.slab, 17, 20)  # seams that fall between the windows' starts
    whole, pieces = predict_by_blocks(predictor, volume, normalization, chunk, cfg.data.context_slices)
    assert not torch.isnan(pieces).any()
    assert float(whole[:, 1].std()) > 0.05  # a prediction that varies, not a constant
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=0)
    for seam in (17, 34):  # the rows on both sides of each seam
        torch.testing.assert_close(pieces[:, :, seam - 1:seam + 1], whole[:, :, seam - 1:seam + 1], atol=1e-5, rtol=0)
    # The test can fail: blocks predicted with windows placed from their own edges (a plain half-window
    # halo) do not give the whole-slice values.
    if case == "2d":
        import mitoseg.inference.predictor as module

        original = module.window_span
        try:
            module.window_span = lambda core, size, roi, overlap, reverse=False: (
                max(0, core[0] - roi // 2), min(size, core[1] + roi // 2))
            _, naive = predict_by_blocks(predictor, volume, normalization, chunk)
        finally:
            module.window_span = original
        assert float((naive - whole).abs().max()) > 1e-3


# ------------------------------------------------------------------ on a cluster of 2 worker processes


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as local, distributed.Client(local) as client:
        yield local, client


def run_with_timeout(target, seconds=RUN_TIMEOUT_S):
    """``target()`` in a thread; its result, or a failure after ``seconds`` (never a hanging suite)."""
    box = {}

    def body():
        try:
            box["result"] = target()
        except BaseException as exc:  # handed to the test's thread
            box["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no result after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """A Zarr image, the same as HDF5, a 2-D checkpoint (post-processing on) and its single-process
    predictions ``single.zarr`` / ``single_p.zarr``."""
    import h5py

    root = tmp_path_factory.mktemp("dask")
    image = em_like((7, 70, 90))
    zarr.open_group(str(root / "image.zarr"), mode="w").create_array("raw", data=image, chunks=(1, 32, 32))
    with h5py.File(root / "image.h5", "w") as f:
        f["raw"] = image
    checkpoint = random_checkpoint(root / "model.pt", inference={"slab": 2, "min_object_voxels": 10})
    from mitoseg.cli import main

    assert main([str(a) for a in predict_args(checkpoint, f"{root}/image.zarr:/raw", root / "single.zarr",
                                              root / "single_p.zarr")]) == 0
    return root, checkpoint


def predict_args(checkpoint, source, output, probabilities, *extra):
    return ["predict", "--checkpoint", checkpoint, "--input", source, "--output", output,
            "--probabilities", probabilities, "--no-progress", *extra]


def loads(client) -> dict:
    return client.run(lambda: dask_predict.LOADS["count"])


def test_dask_predict_equals_single_process_predict(cluster, volumes, tmp_path, capsys):
    _, client = cluster
    root, checkpoint = volumes
    before = loads(client)
    address = client.scheduler.address
    code, out, err = run_with_timeout(lambda: run_cli(predict_args(
        checkpoint, f"{root}/image.h5:/raw", tmp_path / "dask.ome.zarr", tmp_path / "dask_p.zarr",
        "--dask", address, "--dask-chunk", "3", "25", "40"), capsys))
    assert code == 0, err
    assert f"wrote {tmp_path / 'dask.ome.zarr'}" in out
    labels, expected = read_volume(tmp_path / "dask.ome.zarr"), read_volume(root / "single.zarr")
    np.testing.assert_array_equal(labels, expected)  # post-processed (inference.min_object_voxels) as well
    probs, expected_probs = (read_volume(tmp_path / "dask_p.zarr", channels=True),
                             read_volume(root / "single_p.zarr", channels=True))
    assert expected.mean() > 0.005 and (expected_probs.argmax(1) != expected).any()  # objects, some removed
    np.testing.assert_allclose(probs.astype(np.float32), expected_probs.astype(np.float32), atol=1e-3, rtol=0)
    # The seams of the blocks (z: 4 = two slabs; y: 25, 50; x: 40, 80) are no different from elsewhere.
    for index in (np.s_[3:5], np.s_[:, :, 24:26], np.s_[:, :, :, 39:41]):
        np.testing.assert_allclose(probs[index].astype(np.float32), expected_probs[index].astype(np.float32),
                                   atol=1e-3, rtol=0)
    # Output chunks are the blocks' tiles, so no two blocks write one chunk.
    assert zarr.open_array(str(tmp_path / "dask_p.zarr"), mode="r").chunks == (1, 2, 25, 40)
    # Each worker loaded the model at most once for the 3 x 3 x 3 blocks, and together they did.
    after = loads(client)
    added = [after[w] - before.get(w, 0) for w in after]
    assert all(0 <= n <= 1 for n in added) and sum(added) >= 1
    assert sorted(os.listdir(tmp_path)) == ["dask.ome.zarr", "dask_p.zarr"]


def test_dask_errors_are_one_line_and_leave_nothing(cluster, volumes, tmp_path, capsys):
    _, client = cluster
    root, checkpoint = volumes
    base = ["predict", "--checkpoint", checkpoint, "--input", f"{root}/image.zarr:/raw", "--no-progress"]
    for extra, needles in [
        (["--output", tmp_path / "o.zarr", "--dask", "local:0"], ["local:N"]),
        (["--output", tmp_path / "o.zarr", "--dask", "somewhere"], ["tcp://HOST"]),
        (["--output", tmp_path / "o.tif", "--dask", "local:2"], ["--output", "Zarr"]),
        (["--output", tmp_path / "o.zarr", "--probabilities", tmp_path / "p.h5:/p", "--dask", "local:2"],
         ["--probabilities", "Zarr"]),
        (["--output", tmp_path / "o.zarr", "--dask-chunk", "1", "8", "8"], ["--dask-chunk", "--dask local:N"]),
    ]:
        code, _, err = run_cli(base + extra, capsys)
        assert_one_line_error(code, err, *needles)
    # A block that fails on a worker ends the run with the worker's one-line error (here: the workers cannot
    # find the checkpoint, as on machines that do not share its folder); the other blocks are cancelled and
    # no output or temporary is left.
    _, cfg = model_from_checkpoint(checkpoint)
    with pytest.raises(MitosegError, match="checkpoint not found") as info:
        run_with_timeout(lambda: dask_predict.predict_with_dask(
            client.scheduler.address, str(tmp_path / "elsewhere" / "model.pt"), None, "cpu", cfg,
            f"{root}/image.zarr:/raw", str(tmp_path / "o.zarr"), str(tmp_path / "p.ome.zarr"), np.uint8, False,
            chunk=(2, 35, 45), progress=False))
    assert "Dask worker" in str(info.value) and "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []
    assert not any(client.run(dask_predict._running_blocks, "mitoseg-block").values())  # none still running


def test_local_workers_are_started_and_stopped_by_the_command(volumes, tmp_path, capsys):
    psutil = pytest.importorskip("psutil")
    root, checkpoint = volumes
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    code, out, err = run_with_timeout(lambda: run_cli(
        ["predict", "--checkpoint", checkpoint, "--input", f"{root}/image.zarr:/raw", "--output",
         tmp_path / "local.zarr", "--dask", "local:1", "--dask-chunk", "4", "70", "90"], capsys))
    assert code == 0, err
    assert "dask: 2 blocks of 4 x 70 x 90 on 1 worker(s)" in out and "Mvoxel/s" in out  # --no-progress not given
    np.testing.assert_array_equal(read_volume(tmp_path / "local.zarr"), read_volume(root / "single.zarr"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # its worker processes end with the command
        left = {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE} - before
        if not left:
            break
        time.sleep(0.5)
    assert not left


def test_a_killed_worker_s_blocks_are_recomputed_and_the_output_is_complete(cluster, volumes, tmp_path, capsys):
    local, client = cluster
    root, checkpoint = volumes
    client.wait_for_workers(2, timeout=120)
    pids = client.run(os.getpid)
    killed = {}

    def kill_a_busy_worker():
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline and not killed:
            for worker, keys in client.processing().items():
                if any(str(key).startswith("mitoseg-block") for key in keys) and worker in pids:
                    os.kill(pids[worker], signal.SIGKILL)
                    killed.update(worker=worker, pid=pids[worker], at=time.monotonic())
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    killer.start()
    code, _, err = run_with_timeout(lambda: run_cli(predict_args(
        checkpoint, f"{root}/image.zarr:/raw", tmp_path / "dask.zarr", tmp_path / "dask_p.ome.zarr",
        "--dask", client.scheduler.address, "--dask-chunk", "2", "35", "30"), capsys))
    finished = time.monotonic()
    killer.join(5)
    assert code == 0, err
    assert killed and killed["at"] < finished, "no worker was killed while blocks were running"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)  # it is gone: its blocks were computed again elsewhere
    np.testing.assert_array_equal(read_volume(tmp_path / "dask.zarr"), read_volume(root / "single.zarr"))
    np.testing.assert_allclose(read_volume(tmp_path / "dask_p.ome.zarr", channels=True).astype(np.float32),
                               read_volume(root / "single_p.zarr", channels=True).astype(np.float32),
                               atol=1e-3, rtol=0)
    assert sorted(os.listdir(tmp_path)) == ["dask.zarr", "dask_p.ome.zarr"]


@pytest.mark.parametrize("case", ["2d x2", "2.5d+tta x1.5", "3d x2", "2d x0.5", "2d x1.5", "2.5d+tta x2"])
def test_resampled_blocks_equal_whole_slices_at_the_seams(tmp_path, case):
    """With a working pixel size each block is read with the input pixels that its model-grid windows and the
    resampling filter reach; its probabilities equal whole-slice prediction: the block's resampling is the
    same taps as the whole slice's (bit for bit), so only the windows' float rounding is left, as without
    resampling (1e-5; a random network amplifies any difference in its input, 1e-6 can move a value by 0.3)."""
    kind, scale = case.split(" x")
    sections = {"2d": {"inference": {"overlap": 0.25}},
                "2.5d+tta": {"data": {"context_slices": 1}, "inference": {"tta": True, "overlap": 0.5}},
                "3d": {"model": {"spatial_dims": 3, "channels": [4, 8], "strides": [2]},
                       "data": {"patch_size": [4, 16, 16]},
                       "inference": {"roi_size": [4, 16, 16], "slab": 3, "overlap": 0.25}}}[kind]
    model, cfg = model_from_checkpoint(random_checkpoint(tmp_path / "m.pt", **sections))
    predictor = VolumePredictor(model, cfg, torch.device("cpu"), scale=float(scale))
    shape = (6, 90, 106) if float(scale) > 1 else (6, 30, 35)
    volume = em_like(shape).astype(np.float32)
    normalization = Normalization(120.0, 60.0)
    chunk = (cfg.inference.slab, shape[1] // 3 + 1, shape[2] // 3 + 1)  # seams off the factor's grid
    whole, pieces = predict_by_blocks(predictor, volume, normalization, chunk, cfg.data.context_slices)
    assert whole.shape == (6, 2, *shape[1:]) and not torch.isnan(pieces).any()
    assert float(whole[:, 1].std()) > 0.05
    torch.testing.assert_close(pieces, whole, atol=1e-5, rtol=0)
