"""mitoseg export: TorchScript and ONNX equal PyTorch (dynamic sizes), predict takes the TorchScript file,
the bioimage.io package passes bioimageio.core's own test offline, and bad input is one line."""

import gc
import json
import os
import warnings
import zipfile

import numpy as np
import pytest
import tifffile
import torch
import yaml

from mitoseg.cli import main
from mitoseg.config import config_from_dict, config_to_dict, input_channels
from mitoseg.data.readers import read_volume
from mitoseg.runs import load_checkpoint, validated_weights
from mitoseg.networks.loading import model_from_checkpoint
from mitoseg.engine.checkpoint import save_checkpoint
from mitoseg.networks import build_model

from conftest import assert_one_line_error, run_cli, tiny_config_dict, train_tiny_run

pytest.importorskip("onnxruntime")
pytest.importorskip("bioimageio.core")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_volumes):
    return train_tiny_run(tmp_path_factory.mktemp("export"), tiny_volumes)


def synthetic_checkpoint(path, volumes, change):
    """A checkpoint of an untrained network of the config ``tiny_config_dict`` changed by ``change``, with
    random BatchNorm statistics (so eval-mode BatchNorm is not the identity); seconds instead of a run."""
    data = tiny_config_dict(volumes)
    change(data)
    cfg = config_from_dict(data)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.data.num_classes, input_channels(cfg))
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    weights = model.state_dict()
    save_checkpoint(path, {"config": config_to_dict(cfg), "iteration": 0, "model": weights, "ema_model": weights})
    return path


def with_context(data):
    data["data"]["context_slices"] = 1


def three_d(data):
    data["model"]["spatial_dims"] = 3
    data["data"]["patch_size"] = [8, 32, 32]
    data["inference"]["roi_size"] = [8, 32, 32]


def wide_unet(data):
    data["model"] = {"name": "wide_unet", "channels": [16, 24, 32], "strides": [2, 2], "stem": 2,
                     "num_res_units": 1, "feature_channels": 16, "head_channels": 8}


def deeplab_em(data):
    data["model"] = {"name": "deeplabv3plus", "backbone": "resnet50", "width": 8, "feature_channels": 32,
                     "head_channels": 16}


def deeplab_pascal(data):
    data["data"] = {"kind": "pascal", "root": "/nonexistent", "split": "92", "num_classes": 21, "crop_size": 64}
    data["model"] = {"name": "deeplabv3plus", "backbone": "resnet50", "width": 8, "in_channels": 3,
                     "feature_channels": 32, "head_channels": 16}
    data["train"] = {"loss": "ce", "ignore_index": 255}
    data.pop("inference")


def pytorch_logits(checkpoint, x):
    model, _ = model_from_checkpoint(checkpoint)
    with torch.no_grad():
        return model(x)


def onnx_run(path, x):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


# --------------------------------------------------------------------------- TorchScript and ONNX


def test_export_has_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["export", "--help"])
    assert info.value.code == 0
    assert "usage: mitoseg export" in capsys.readouterr().out


def test_torchscript_equals_pytorch_at_other_sizes_and_carries_the_run_settings(trained_run, tmp_path, capsys):
    checkpoint, out = trained_run / "best.pt", tmp_path / "model.pt"
    code, stdout, err = run_cli(["export", "--checkpoint", checkpoint, "--format", "torchscript", "--output", out],
                                capsys)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    extra = {"mitoseg.json": ""}
    scripted = torch.jit.load(str(out), _extra_files=extra)
    metadata = json.loads(extra["mitoseg.json"])
    state = load_checkpoint(checkpoint)
    assert metadata["weights"] == validated_weights(state)
    assert metadata["output"] == "logits" and metadata["axes"] == "bcyx"
    assert config_from_dict(metadata["config"]) == config_from_dict(state["config"])
    for shape in ((1, 1, 64, 64), (3, 1, 48, 112), (2, 1, 8, 20)):  # sizes and batches the trace never saw
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        expected = pytorch_logits(checkpoint, x)
        with torch.no_grad():
            got = scripted(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() <= 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_onnx_equals_pytorch_in_onnxruntime_with_dynamic_sizes(trained_run, tmp_path, capsys):
    import onnx

    checkpoint, out = trained_run / "best.pt", tmp_path / "model.onnx"
    code, stdout, err = run_cli(["export", "--checkpoint", checkpoint, "--format", "onnx", "--output", out,
                                 "--weights", "student"], capsys)
    assert code == 0, err
    model = onnx.load(str(out))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1] == 1
    assert all(dims[i].dim_param for i in (0, 2, 3))  # batch, y, x are symbolic
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["mitoseg"])["weights"] == "student"
    student, _ = model_from_checkpoint(checkpoint, weights="student")
    for shape in ((1, 1, 64, 64), (2, 1, 40, 96)):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[2]))
        with torch.no_grad():
            expected = student(x).numpy()
        got = onnx_run(out, x)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-4


@pytest.mark.parametrize("change", [with_context, three_d, wide_unet, deeplab_em, deeplab_pascal],
                         ids=["2.5d", "3d", "wide_unet", "deeplabv3plus", "deeplabv3plus_pascal"])
def test_2_5d_3d_and_deeplab_export_to_torchscript_and_onnx(change, tmp_path, tiny_volumes):
    from mitoseg.export import export_checkpoint

    checkpoint = synthetic_checkpoint(tmp_path / "ckpt.pt", tiny_volumes, change)
    cfg = config_from_dict(load_checkpoint(checkpoint)["config"])
    channels = input_channels(cfg)
    spatial = (12, 40, 24) if cfg.model.spatial_dims == 3 else (48, 80)
    x = torch.randn(2, channels, *spatial, generator=torch.Generator().manual_seed(3))
    expected = pytorch_logits(checkpoint, x)
    assert expected.shape == (2, cfg.data.num_classes, *spatial)
    meta = export_checkpoint(checkpoint, "torchscript", tmp_path / "m.pt")
    assert meta["input_channels"] == channels and meta["num_classes"] == cfg.data.num_classes
    with torch.no_grad():
        got = torch.jit.load(str(tmp_path / "m.pt"))(x)
    assert (got - expected).abs().max() <= 1e-4
    export_checkpoint(checkpoint, "onnx", tmp_path / "m.onnx")
    assert np.abs(onnx_run(tmp_path / "m.onnx", x) - expected.numpy()).max() <= 1e-4


def test_the_torch_export_based_onnx_exporter_takes_over_when_the_first_one_fails(trained_run, tmp_path,
                                                                                   monkeypatch):
    from mitoseg.export import export_checkpoint
    from mitoseg.export import onnx_export

    used, real = [], onnx_export._export

    def first_one_broken(exporter, *args):
        used.append(exporter)
        if exporter == "torchscript":
            raise RuntimeError("the TorchScript-based exporter is gone")
        return real(exporter, *args)

    monkeypatch.setattr(onnx_export, "_export", first_one_broken)
    checkpoint = trained_run / "best.pt"
    export_checkpoint(checkpoint, "onnx", tmp_path / "m.onnx")
    assert used == ["torchscript", "dynamo"]
    x = torch.randn(2, 1, 36, 52, generator=torch.Generator().manual_seed(5))
    assert np.abs(onnx_run(tmp_path / "m.onnx", x) - pytorch_logits(checkpoint, x).numpy()).max() <= 1e-4


def test_predict_with_the_torchscript_file_gives_the_checkpoints_result(trained_run, tiny_volumes, tmp_path,
                                                                        capsys):
    checkpoint, exported = trained_run / "best.pt", tmp_path / "model.pt"
    assert run_cli(["export", "--checkpoint", checkpoint, "--format", "torchscript", "--output", exported],
                   capsys)[0] == 0
    outputs = {}
    for name, source in (("checkpoint", checkpoint), ("torchscript", exported)):
        # TTA and a window smaller than the image: the run's inference path, with the file's stored settings.
        code, _, err = run_cli(["predict", "--checkpoint", source, "--input", tiny_volumes["val_image"],
                                "--output", tmp_path / f"{name}.tif", "--probabilities", tmp_path / f"{name}_p.tif",
                                "--tta", "--no-progress"], capsys)
        assert code == 0, err
        outputs[name] = (read_volume(tmp_path / f"{name}.tif"), tifffile.imread(tmp_path / f"{name}_p.tif"))
    assert np.array_equal(outputs["checkpoint"][0], outputs["torchscript"][0])
    np.testing.assert_allclose(outputs["checkpoint"][1].astype(np.float32), outputs["torchscript"][1].astype(np.float32),
                               atol=1e-3)


def test_predict_with_a_2_5d_torchscript_file_reads_the_context_from_the_stored_config(tiny_volumes, tmp_path,
                                                                                         capsys):
    from mitoseg.export import export_checkpoint

    checkpoint = synthetic_checkpoint(tmp_path / "ctx.pt", tiny_volumes, with_context)
    export_checkpoint(checkpoint, "torchscript", tmp_path / "ctx_ts.pt")
    probabilities = []
    for source in (checkpoint, tmp_path / "ctx_ts.pt"):
        out = tmp_path / f"{source.stem}_p.tif"
        code, _, err = run_cli(["predict", "--checkpoint", source, "--input", tiny_volumes["val_image"],
                                "--output", tmp_path / f"{source.stem}.tif", "--probabilities", out, "--no-progress"],
                               capsys)
        assert code == 0, err
        probabilities.append(tifffile.imread(out).astype(np.float32))
    np.testing.assert_allclose(probabilities[0], probabilities[1], atol=1e-3)


# --------------------------------------------------------------------------- bioimage.io


@pytest.fixture
def offline(monkeypatch):
    """No network: every HTTP request bioimageio.spec / .core would make fails at once, as on a machine
    without one, and is recorded."""
    import httpx

    attempted = []

    def refuse(method, url, *args, **kwargs):
        attempted.append(str(url))
        raise httpx.ConnectError("no network in the tests")

    monkeypatch.setattr(httpx, "request", refuse)
    monkeypatch.setattr(httpx, "stream", refuse)
    return attempted


def test_bioimageio_package_passes_bioimageio_core_test_offline(trained_run, tiny_volumes, tmp_path, offline,
                                                                 capsys):
    import importlib.util

    from bioimageio.core import test_description

    from mitoseg.export.bioimageio_package import DAW_URL

    checkpoint, package = trained_run / "best.pt", tmp_path / "model.zip"
    code, stdout, err = run_cli(["export", "--checkpoint", checkpoint, "--format", "bioimageio", "--output",
                                 package, "--author", "Ada Lovelace", "--name", "tiny mitochondria"], capsys)
    assert code == 0, err
    assert "test_model passed" in stdout
    assert offline == []  # exporting (and its own test of the package) asked the network for nothing

    # bioimageio.core's own test: validates the description and runs every weights format on the test tensors
    # and on the parametrized sizes.
    gc.freeze()  # as mitoseg export does: bioimageio.core's gc.collect() calls skip this process's objects
    try:
        summary = test_description(str(package))
    finally:
        gc.unfreeze()
    assert summary.status == "passed", summary.format()
    names = [d.name for d in summary.details]
    for weights_format in ("pytorch_state_dict", "torchscript", "onnx"):
        assert f"Reproduce test outputs from test inputs ({weights_format})" in names
    assert set(offline) <= {DAW_URL}  # the only remote address: a citation, not a file

    with zipfile.ZipFile(package) as archive:
        archive.extractall(tmp_path / "unzipped")
    root = tmp_path / "unzipped"
    rdf = yaml.safe_load((root / "rdf.yaml").read_text())
    assert rdf["format_version"].startswith("0.5") and rdf["name"] == "tiny mitochondria"
    assert rdf["authors"] == [{"name": "Ada Lovelace"}]
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript", "onnx"}
    (raw,) = rdf["inputs"]
    assert [a.get("id", a["type"]) for a in raw["axes"]] == ["batch", "channel", "y", "x"]
    steps = [a["size"] for a in raw["axes"] if a["type"] == "space"]
    assert steps == [{"min": 4, "step": 4}] * 2  # the U-Net's strides [2, 2]
    scale = [p for p in raw["preprocessing"] if p["id"] == "scale_range"]
    assert scale and scale[0]["kwargs"]["min_percentile"] == 1.0 and scale[0]["kwargs"]["max_percentile"] == 99.0
    (probs,) = rdf["outputs"]
    assert next(a for a in probs["axes"] if a["type"] == "channel")["channel_names"] == ["background",
                                                                                         "mitochondrion"]
    cites = " ".join(c["text"] for c in rdf["cite"])
    assert "DAW" in cites and "NeurIPS 2023" in cites and "Density-Descending" in cites and "CVPR 2024" in cites
    assert any(c.get("doi") == "10.48550/arXiv.2403.06462" for c in rdf["cite"])
    for entry in [rdf["documentation"], *rdf["covers"], *rdf["weights"].values()]:
        assert "://" not in entry["source"]  # every file is in the package
    assert rdf["config"]["mitoseg"]["config"] == config_to_dict(config_from_dict(load_checkpoint(checkpoint)["config"]))

    # The test input is the middle slice of the run's validation volume; the expected output is the
    # network's on it after the per-sample percentile scaling.
    test_in = np.load(root / raw["test_tensor"]["source"])
    val = read_volume(tiny_volumes["val_image"])
    assert np.array_equal(test_in[0, 0], val[len(val) // 2].astype(np.float32))
    low, high = np.percentile(test_in.astype(np.float64), [1, 99])
    normalized = torch.from_numpy(((test_in - low) / (high - low + 1e-6)).astype(np.float32))
    expected = torch.softmax(pytorch_logits(checkpoint, normalized), 1).numpy()
    test_out = np.load(root / probs["test_tensor"]["source"])
    assert np.abs(test_out - expected).max() <= 1e-4

    # The state dict loads into the standalone architecture file (PyTorch + MONAI only) and gives the same.
    spec = importlib.util.spec_from_file_location("packaged_unet", root / "mitoseg_unet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    architecture = rdf["weights"]["pytorch_state_dict"]["architecture"]
    net = getattr(module, architecture["callable"])(**architecture["kwargs"])
    net.load_state_dict(torch.load(root / "weights.pt", weights_only=True), strict=True)
    with torch.no_grad():
        assert np.abs(net.eval()(normalized).numpy() - test_out).max() <= 1e-4

    readme = (root / "README.md").read_text()
    run_summary = json.loads((trained_run / "summary.json").read_text())
    assert "## Validation" in readme and f"best fg_iou {run_summary['best']['value']:.4f}" in readme
    assert "NeurIPS 2023" in readme and "CVPR 2024" in readme
    import imageio.v3 as iio

    image = iio.imread(root / rdf["covers"][0]["source"])
    assert image.ndim == 3 and image.shape[1] == 2 * image.shape[0] and image.shape[0] >= 256
    assert np.array_equal(tifffile.imread(root / "sample_input.tif"), test_in)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


@pytest.mark.parametrize("change", [with_context, three_d, wide_unet, deeplab_em],
                         ids=["2.5d", "3d", "wide_unet", "deeplabv3plus"])
def test_bioimageio_packages_of_2_5d_3d_and_deeplab_models_pass_the_test(change, tmp_path, tiny_volumes,
                                                                         offline):
    from mitoseg.export import export_checkpoint

    def changed(data):
        change(data)
        if change is with_context:  # the validation volume is gone: the synthetic sample volume stands in
            data["data"]["val"]["image"] = str(tmp_path / "moved_away.tif")

    checkpoint = synthetic_checkpoint(tmp_path / "ckpt.pt", tiny_volumes, changed)
    package = tmp_path / "package"  # no .zip: a folder
    report = export_checkpoint(checkpoint, "bioimageio", package)  # runs bioimageio.core's test_model
    assert any(name.startswith("Reproduce test outputs from test inputs (onnx)") for name in report["tests"])
    assert offline == []
    rdf = yaml.safe_load((package / "rdf.yaml").read_text())
    axes = rdf["inputs"][0]["axes"]
    test_in = np.load(package / rdf["inputs"][0]["test_tensor"]["source"])
    if change is with_context:
        assert axes[1]["channel_names"] == ["slice_minus_1", "slice", "slice_plus_1"]
        assert test_in.shape == (1, 3, 256, 256)
        assert "synthetic sample volume" in report["test_origin"]
        assert "synthetic sample volume" in (package / "README.md").read_text()
    elif change is three_d:
        assert [a.get("id", a["type"]) for a in axes] == ["batch", "channel", "z", "y", "x"]
        assert test_in.shape == (1, 1, 4, 64, 64)  # the validation volume's 4 slices
    else:
        assert rdf["weights"]["pytorch_state_dict"]["architecture"]["import_from"] == "mitoseg.export.library"


# --------------------------------------------------------------------------- bad input


def test_export_errors_are_one_line_and_leave_nothing(trained_run, tiny_volumes, tmp_path, capsys, monkeypatch):
    checkpoint = trained_run / "best.pt"
    code, _, err = run_cli(["export", "--checkpoint", tmp_path / "gone.pt", "--format", "onnx", "--output",
                            tmp_path / "m.onnx"], capsys)
    assert_one_line_error(code, err, "gone.pt")
    existing = tmp_path / "existing.pt"
    existing.write_bytes(b"keep me")
    code, _, err = run_cli(["export", "--checkpoint", checkpoint, "--format", "torchscript", "--output", existing],
                           capsys)
    assert_one_line_error(code, err, "existing.pt", "--overwrite")
    assert existing.read_bytes() == b"keep me"
    code, _, err = run_cli(["export", "--checkpoint", checkpoint, "--format", "onnx", "--output",
                            existing / "m.onnx"], capsys)
    assert_one_line_error(code, err, "is a file")
    code, _, err = run_cli(["export", "--checkpoint", checkpoint, "--format", "torchscript", "--output",
                            tmp_path / "m.pt", "--name", "x"], capsys)
    assert_one_line_error(code, err, "--name", "bioimageio")
    with pytest.raises(SystemExit) as info:  # argparse's own check, one line too
        main(["export", "--checkpoint", str(checkpoint), "--format", "keras", "--output", str(tmp_path / "k")])
    assert_one_line_error(info.value.code, capsys.readouterr().err, "--format", "keras")
    pascal = synthetic_checkpoint(tmp_path / "pascal.pt", tiny_volumes, deeplab_pascal)
    code, _, err = run_cli(["export", "--checkpoint", pascal, "--format", "bioimageio", "--output",
                            tmp_path / "p.zip"], capsys)
    assert_one_line_error(code, err, "pascal", "EM models", "torchscript")

    # An export that does not reproduce PyTorch is refused, and nothing (not even a temporary) is written.
    from mitoseg.export import torchscript

    monkeypatch.setattr(torchscript, "TOLERANCE", -1.0)
    code, _, err = run_cli(["export", "--checkpoint", checkpoint, "--format", "torchscript", "--output",
                            tmp_path / "bad.pt"], capsys)
    assert_one_line_error(code, err, "TorchScript", "differs from PyTorch")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.pt", "pascal.pt"]


def test_predict_and_evaluate_refuse_torchscript_files_they_cannot_use(trained_run, tiny_volumes, tmp_path, capsys):
    exported = tmp_path / "model.pt"
    assert run_cli(["export", "--checkpoint", trained_run / "best.pt", "--format", "torchscript", "--output",
                    exported, "--weights", "ema"], capsys)[0] == 0
    code, _, err = run_cli(["predict", "--checkpoint", exported, "--weights", "student", "--input",
                            tiny_volumes["val_image"], "--output", tmp_path / "p.tif"], capsys)
    assert_one_line_error(code, err, "ema weights only", "--weights student")
    code, _, err = run_cli(["evaluate", "--checkpoint", exported], capsys)
    assert_one_line_error(code, err, "TorchScript", "predict")
    foreign = tmp_path / "foreign.pt"
    with warnings.catch_warnings():  # PyTorch 2.13 calls TorchScript deprecated; this file must be one
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.trace(torch.nn.Conv2d(1, 2, 3), torch.zeros(1, 1, 8, 8)), str(foreign))
    code, _, err = run_cli(["predict", "--checkpoint", foreign, "--input", tiny_volumes["val_image"], "--output",
                            tmp_path / "p.tif"], capsys)
    assert_one_line_error(code, err, "foreign.pt", "mitoseg.json")
    assert not (tmp_path / "p.tif").exists()
    assert os.path.exists(exported)
