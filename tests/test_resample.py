"""The working pixel size (``data.pixel_size``): the resampling maths, the pixel size read from files and
checkpoints, and a model trained at one pixel size predicting a volume of another."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import tifffile
import torch
import yaml

from mitoseg.config import config_from_dict
from mitoseg.data.resample import (
    PixelSize,
    apply_taps,
    axis_taps,
    output_size,
    parse_pixel_size,
    reduce_image,
    reduce_labels,
    resample,
    volume_pixel_nm,
)
from mitoseg.data.transforms import Normalization
from mitoseg.errors import MitosegError
from mitoseg.inference import VolumePredictor

from conftest import assert_one_line_error, run_cli, tiny_config_dict
from model_helpers import em_like, random_checkpoint


# ------------------------------------------------------------------ the maths


def test_output_size_is_the_rounded_quotient():
    assert [output_size(n, 2.0) for n in (64, 65, 66, 1)] == [32, 33, 33, 1]
    assert output_size(100, 1.5) == 67 and output_size(10, 0.5) == 20
    assert reduce_image(np.zeros((3, 45, 53), np.uint8), 2.0).shape == (3, 23, 27)  # halves round up
    assert reduce_image(np.zeros((2, 3, 40, 40), np.uint8), 2.0).shape == (2, 3, 20, 20)  # 2.5-D channels kept
    image = np.arange(24, dtype=np.uint16).reshape(1, 4, 6)
    assert reduce_image(image, 1.0) is image  # factor 1: the array itself, bit for bit


def test_a_checkerboard_reduces_to_a_flat_grey():
    """The anti-aliased reduction is a low-pass filter: plain subsampling would give all black or all white."""
    board = (np.indices((64, 64)).sum(0) % 2 * 200).astype(np.uint8)[None]
    for factor in (2.0, 4.0):
        inner = reduce_image(board, factor)[0][1:-1, 1:-1]  # border pixels: normalised over the slice's pixels
        assert np.allclose(inner, 100.0, atol=1e-3), (factor, inner.min(), inner.max())
    inner = reduce_image(board, 2.5)[0][1:-1, 1:-1]  # not a whole factor: nearly flat
    assert np.ptp(inner) < 25 and abs(float(inner.mean()) - 100.0) < 2
    assert np.ptp(board[0, ::2, ::2]) == 0 and board[0, 0, 0] != 100  # plain subsampling aliases


def test_labels_reduce_by_majority_and_keep_ignored_regions():
    label = np.zeros((1, 32, 32), np.int64)
    label[0, 8:24, 8:24] = 1  # a 16 x 16 object
    label[0, :, 28:] = 255  # an ignored strip
    small = reduce_labels(label, 2.0, num_classes=2, ignore_index=255)
    assert small.shape == (1, 16, 16) and small.dtype == np.int64
    assert (small[0, 5:11, 5:11] == 1).all() and small[0, 0, 0] == 0
    assert (small[0, :, 15] == 255).all() and (small[0, :, :13] != 255).all()
    assert set(np.unique(small).tolist()) == {0, 1, 255}
    assert abs(int((small == 1).sum()) - 64) <= 8  # the object keeps its area (16^2 / 4)
    assert reduce_labels(label, 1.0, 2, 255) is label


def test_probabilities_come_back_to_the_input_grid():
    probs = torch.softmax(torch.randn(2, 3, 23, 27), 1)
    back = resample(probs, (45, 53))
    assert back.shape == (2, 3, 45, 53)
    torch.testing.assert_close(back.sum(1), torch.ones(2, 45, 53))  # still probabilities (weights sum to 1)
    assert resample(probs, (23, 27)) is probs


@pytest.mark.parametrize("sizes", [(45, 23), (64, 32), (60, 25), (23, 45), (101, 50), (106, 71)])
def test_resampling_is_torchs_antialiased_bilinear_and_a_block_gets_the_whole_slices_values(sizes):
    """The taps are ``F.interpolate(bilinear, antialias)``'s weights; a block resampled with the rows of
    :func:`axis_taps` equals the same rows of the whole slice bit for bit (predict --dask relies on it)."""
    n_in, n_out = sizes
    image = torch.rand(2, n_in, n_in)
    whole = resample(image, (n_out, n_out))
    reference = torch.nn.functional.interpolate(image[None], size=(n_out, n_out), mode="bilinear",
                                                antialias=True, align_corners=False)[0]
    torch.testing.assert_close(whole, reference, atol=1e-5, rtol=0)
    for start, stop in [(0, n_out), (n_out // 3, n_out // 2 + 1), (n_out - 1, n_out)]:
        rows = axis_taps(n_in, n_out, start, stop)
        cols = axis_taps(n_in, n_out, n_out // 4, n_out)
        part = apply_taps(image[:, rows[0]:rows[1], cols[0]:cols[1]], rows, cols)
        assert torch.equal(part, whole[:, start:stop, n_out // 4:])


def test_pixel_sizes_parse_and_need_the_volume_size_in_nm():
    assert parse_pixel_size(None).native
    assert parse_pixel_size(10.0) == PixelSize(nm=10.0)
    assert parse_pixel_size("2x") == PixelSize(factor=2.0) and parse_pixel_size(" 1.5X").factor == 1.5
    assert PixelSize(nm=10.0).scale_for(5.0, "v", "k") == 2.0
    assert PixelSize(factor=2.0).scale_for(None, "v", "k") == 2.0
    assert PixelSize(nm=10.0, factor=2.0).scale_for(2.5, "v", "k") == 4.0  # nm wins where both are known
    assert PixelSize().scale_for(5.0, "v", "k") == 1.0
    with pytest.raises(MitosegError, match="vol.tif: its pixel size is unknown .* set data.train.voxel_size"):
        PixelSize(nm=10.0).scale_for(None, "vol.tif", "data.train.voxel_size")
    for bad, needle in [("2", "such as '2x'"), ("0.01x", "factor must be"), (-3, "must be in"),
                        ("abc", "must be a number")]:
        with pytest.raises(MitosegError, match=needle):
            config_from_dict({"data": {"train": {"image": "a"}, "pixel_size": bad}})
    with pytest.raises(MitosegError, match="data.train.voxel_size' must be three positive sizes"):
        config_from_dict({"data": {"train": {"image": "a", "voxel_size": [5, 5]}}})
    cfg = config_from_dict({"data": {"train": {"image": "a", "voxel_size": [30, 5, 5]}, "pixel_size": 10}})
    assert cfg.data.pixel_size == 10.0 and cfg.data.train.voxel_size == [30.0, 5.0, 5.0]


def test_the_pixel_size_is_read_from_tiff_hdf5_and_ome_zarr_metadata(tmp_path):
    from mitoseg.data.readers import VolumeWriter

    volume = np.zeros((4, 16, 16), np.uint8)
    tifffile.imwrite(tmp_path / "ij.tif", volume, imagej=True, resolution=(1 / 0.005, 1 / 0.005),
                     metadata={"spacing": 0.03, "unit": "micron", "axes": "ZYX"})
    assert volume_pixel_nm(str(tmp_path / "ij.tif")) == pytest.approx(5.0)
    assert volume_pixel_nm(str(tmp_path / "ij.tif"), [30, 7, 7]) == 7.0  # a config's voxel_size wins
    with h5py.File(tmp_path / "v.h5", "w") as handle:
        handle.create_dataset("raw", data=volume).attrs["element_size_um"] = [0.04, 0.008, 0.008]
    assert volume_pixel_nm(f"{tmp_path / 'v.h5'}:/raw") == pytest.approx(8.0)
    with VolumeWriter(str(tmp_path / "v.ome.zarr"), volume.shape, np.uint8, voxel_size=(30.0, 6.0, 6.0)) as out:
        out.write(0, volume)
    assert volume_pixel_nm(str(tmp_path / "v.ome.zarr")) == pytest.approx(6.0)
    tifffile.imwrite(tmp_path / "plain.tif", volume, photometric="minisblack")
    assert volume_pixel_nm(str(tmp_path / "plain.tif")) is None


# ------------------------------------------------------------------ the predictor


class Constant(torch.nn.Module):
    """Logits that do not depend on the image: the same class probabilities everywhere."""

    spatial_dims = 2

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([0.2, 0.9]))

    def forward(self, x):
        return self.bias.view(1, -1, 1, 1).expand(x.shape[0], -1, *x.shape[2:]) + 0 * x[:, :1]


def _cfg(**inference):
    data = tiny_config_dict({"train_image": "x", "train_label": "y", "val_image": "x", "val_label": "y"})
    data["inference"].update(inference)
    return config_from_dict(data)


@pytest.mark.parametrize("scale", [1.0, 2.0, 1.5, 0.5])
def test_a_resampled_prediction_has_the_input_shape_and_a_constant_model_the_same_labels(scale):
    volume = em_like((5, 45, 53))
    norm = Normalization(100.0, 50.0)
    predictor = VolumePredictor(Constant(), _cfg(), torch.device("cpu"), scale=scale)
    probs = torch.cat([p for _, _, p in predictor.slabs(lambda s, e: volume[s:e], len(volume), norm)])
    assert probs.shape == (5, 2, 45, 53)
    expected = torch.softmax(torch.tensor([0.2, 0.9]), 0).view(1, 2, 1, 1).expand_as(probs)
    torch.testing.assert_close(probs, expected)
    labels = []
    predictor.predict_labels(lambda s, e: volume[s:e], len(volume), norm, lambda start, lab: labels.append(lab))
    assert np.concatenate(labels).shape == (5, 45, 53) and (np.concatenate(labels) == 1).all()


def test_a_resampled_prediction_sees_the_image_at_the_model_grid(tmp_path):
    """The network runs on the reduced image (fewer pixels); at factor 1 nothing is resampled."""
    from mitoseg.networks.loading import model_from_checkpoint

    model, cfg = model_from_checkpoint(random_checkpoint(tmp_path / "m.pt"))
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    volume = em_like((2, 64, 64))
    norm = Normalization(120.0, 60.0)

    def predict(scale):
        seen.clear()
        predictor = VolumePredictor(model, cfg, torch.device("cpu"), scale=scale)
        return torch.cat([p for *_, p in predictor.slabs(lambda s, e: volume[s:e], 2, norm)])

    native = predict(1.0)
    assert sum(shape[0] for shape in seen) == 2 * 9  # 64 x 64 slices at overlap 0.25: 3 x 3 windows of 32
    halved = predict(2.0)
    assert sum(shape[0] for shape in seen) == 2 * 1  # the 32 x 32 model grid: one window per slice
    assert halved.shape == native.shape == (2, 2, 64, 64)
    assert float((halved - native).abs().max()) > 1e-3  # another grid, another prediction


# ------------------------------------------------------------------ end to end


def _write_tiff(path, array, nm):
    tifffile.imwrite(path, array, imagej=True, resolution=(1e3 / nm, 1e3 / nm),
                     metadata={"spacing": nm / 1e3, "unit": "micron", "axes": "ZYX"})


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    """A tiny run trained at 10 nm per pixel on synthetic volumes stored at 5 nm per pixel."""
    from mitoseg.cli import main
    from mitoseg.data.synthetic import make_em_volume

    root = tmp_path_factory.mktemp("pixel_run")
    volumes = {}
    for split, shape, seed in (("train", (6, 96, 96), 1), ("val", (3, 96, 96), 2)):
        image, label = make_em_volume(shape, seed=seed)
        for kind, array in (("image", image), ("label", label)):
            volumes[f"{split}_{kind}"] = root / f"{split}_{kind}.tif"
            _write_tiff(volumes[f"{split}_{kind}"], array, 5.0)
    data = tiny_config_dict(volumes, iterations=4, val_every=2, checkpoint_every=2)
    data["data"]["pixel_size"] = 10
    data["data"]["test"] = {"image": str(volumes["val_image"]), "label": str(volumes["val_label"])}
    config = root / "pixel.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["train", "--config", str(config), "--out", str(root / "run"), "--no-progress"]) == 0
    return root, volumes


def test_the_checkpoint_records_the_pixel_size_and_the_test_scores_the_native_grid(pixel_run):
    from mitoseg.runs import load_checkpoint
    from mitoseg.inference.session import load_model

    root, _ = pixel_run
    state = load_checkpoint(root / "run" / "best.pt")
    assert state["pixel_size_nm"] == 10.0 and state["config"]["data"]["pixel_size"] == 10.0
    assert load_model(root / "run" / "best.pt", device="cpu").pixel == PixelSize(nm=10.0)
    summary = json.loads((root / "run" / "summary.json").read_text())
    assert summary["test"]["slices"] == 3 and 0.0 <= summary["test"]["fg_iou"] <= 1.0


def test_predict_rescales_an_input_of_another_pixel_size(pixel_run, tmp_path, capsys):
    root, volumes = pixel_run
    best = root / "run" / "best.pt"
    image = tifffile.imread(volumes["val_image"])
    # The same tissue at 20 nm per pixel: the model's 10 nm is a factor 0.5 (the input is enlarged).
    coarse = reduce_image(image, 4.0).round().astype(np.uint8)
    _write_tiff(tmp_path / "coarse.tif", coarse, 20.0)
    code, _, err = run_cli(["predict", "--checkpoint", best, "--input", tmp_path / "coarse.tif", "--output",
                            tmp_path / "coarse_pred.tif", "--probabilities", tmp_path / "p.tif", "--no-progress"],
                           capsys)
    assert code == 0, err
    assert "rescaling the input 20 nm -> 10 nm per pixel (factor 0.50)" in err
    assert tifffile.imread(tmp_path / "coarse_pred.tif").shape == coarse.shape
    assert tifffile.imread(tmp_path / "p.tif").shape == (coarse.shape[0], 2, *coarse.shape[1:])
    # The volume it trained on: 5 nm -> 10 nm; --voxel-size overrides the metadata.
    code, _, err = run_cli(["predict", "--checkpoint", best, "--input", volumes["val_image"], "--output",
                            tmp_path / "fine_pred.tif", "--no-progress"], capsys)
    assert code == 0 and "rescaling the input 5 nm -> 10 nm per pixel (factor 2.00)" in err
    assert tifffile.imread(tmp_path / "fine_pred.tif").shape == image.shape
    code, _, err = run_cli(["predict", "--checkpoint", best, "--input", volumes["val_image"], "--output",
                            tmp_path / "same.tif", "--voxel-size", "5", "10", "10", "--no-progress"], capsys)
    assert code == 0 and "rescaling" not in err
    # A volume without a stored pixel size: one line naming the option that supplies it.
    tifffile.imwrite(tmp_path / "plain.tif", image, photometric="minisblack")
    code, _, err = run_cli(["predict", "--checkpoint", best, "--input", tmp_path / "plain.tif", "--output",
                            tmp_path / "plain_pred.tif", "--no-progress"], capsys)
    assert_one_line_error(code, err, "plain.tif", "pixel size is unknown", "--voxel-size")


def test_evaluate_checkpoint_takes_the_pixel_size_option(pixel_run, tmp_path, capsys):
    root, volumes = pixel_run
    image, label = tifffile.imread(volumes["val_image"]), tifffile.imread(volumes["val_label"])
    tifffile.imwrite(tmp_path / "plain.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "plain_label.tif", label, photometric="minisblack")
    args = ["evaluate", "--checkpoint", root / "run" / "best.pt", "--image", tmp_path / "plain.tif", "--label",
            tmp_path / "plain_label.tif", "--json", tmp_path / "s.json", "--no-progress"]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "pixel size is unknown", "--pixel-size")
    code, _, err = run_cli(args + ["--pixel-size", "5"], capsys)
    assert code == 0, err
    assert "factor 2.00" in err and json.loads((tmp_path / "s.json").read_text())["slices"] == 3


def test_training_without_a_known_pixel_size_names_the_key(tiny_volumes, tmp_path, capsys):
    data = tiny_config_dict(tiny_volumes)
    data["data"]["pixel_size"] = 10
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    code, _, err = run_cli(["train", "--config", config, "--out", tmp_path / "run", "--no-progress"], capsys)
    assert_one_line_error(code, err, "data.train.image", "pixel size is unknown", "data.train.voxel_size")
    # A factor needs no metadata.
    data["data"]["pixel_size"] = "2x"
    data["train"].update(iterations=2, val_every=2, checkpoint_every=2)
    config.write_text(yaml.safe_dump(data))
    code, out, err = run_cli(["train", "--config", config, "--out", tmp_path / "run2", "--no-progress"], capsys)
    assert code == 0, err
    assert "data.pixel_size 2x: data.train resampled its own per pixel (factor 2.00)" in out


def test_exports_carry_the_pixel_size(pixel_run, tmp_path):
    from mitoseg.export import export_checkpoint
    from mitoseg.export.bioimageio_package import _axes
    from mitoseg.export.source import load_source
    from mitoseg.inference.session import load_model

    root, _ = pixel_run
    source = load_source(root / "run" / "best.pt")
    assert source.metadata()["pixel_size_nm"] == 10.0
    spaces = {axis["id"]: axis for axis in _axes(source, output=False) if axis["type"] == "space"}
    assert spaces["y"]["scale"] == spaces["x"]["scale"] == 10.0 and spaces["y"]["unit"] == "nanometer"
    outputs = {axis["id"]: axis for axis in _axes(source, output=True) if axis["type"] == "space"}
    assert outputs["x"]["scale"] == 10.0
    export_checkpoint(root / "run" / "best.pt", "torchscript", tmp_path / "m.pt")
    assert load_model(tmp_path / "m.pt", device="cpu").pixel == PixelSize(nm=10.0)  # predict rescales with it
    # The bioimage.io test input is at the model's pixel size: the 96 x 96 validation slice at 5 nm -> 48 x 48.
    from mitoseg.export.bioimageio_package import run_test_input

    array, origin = run_test_input(source)
    assert array.shape == (1, 1, 48, 48) and "validation volume" in origin


def test_init_writes_the_working_pixel_size_of_fine_volumes(tmp_path, monkeypatch, capsys):
    from mitoseg.data.synthetic import make_em_volume
    from mitoseg.init_config import EM_WORKING_PIXEL_NM, working_pixel_size

    assert working_pixel_size((30, 5, 5)) == EM_WORKING_PIXEL_NM and working_pixel_size((30, 12, 12)) is None
    assert working_pixel_size(None) is None
    monkeypatch.chdir(tmp_path)
    image, label = make_em_volume((12, 64, 64), seed=0)
    painted = np.zeros_like(label)
    painted[[1, 4, 7, 10]] = (label[[1, 4, 7, 10]] > 0) * 255
    expected = {}
    for nm, pixel in ((5.0, 10.0), (12.0, None)):
        _write_tiff(tmp_path / f"stack{nm:g}.tif", image, nm)
        tifffile.imwrite(tmp_path / "labels.tif", painted)
        code, out, err = run_cli(["init", "--image", f"stack{nm:g}.tif", "--label", "labels.tif", "--cpu",
                                  "--output", f"c{nm:g}.yaml"], capsys)
        assert code == 0, err
        text = (tmp_path / f"c{nm:g}.yaml").read_text()
        expected[nm] = yaml.safe_load(text)["data"]
        assert expected[nm]["pixel_size"] == pixel
        assert "pixel_size: " + ("10  # nm per pixel the model works at" if pixel else "null  # 12 nm") in text
    assert expected[5.0]["patch_size"] == [32, 32]  # sized to the 32 x 32 slices at 10 nm


@pytest.mark.slow
def test_prediction_never_imports_the_training_loop():
    import subprocess
    import sys

    code = ("import sys; import mitoseg.cli, mitoseg.inference.session, mitoseg.inference.evaluation, "
            "mitoseg.inference.dask_predict, mitoseg_napari._predict_widget, mitoseg_napari._training; "
            "assert 'mitoseg.engine.trainer' not in sys.modules, 'engine.trainer imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
