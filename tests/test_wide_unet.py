"""model.name wide_unet (the CPU network: space-to-depth stem, wide residual levels): shapes, parts, config
checks, training with every method's interface, exact resume, 2.5-D input."""

import pytest
import torch

from mitoseg.config import ModelConfig, config_from_dict, size_multiple
from mitoseg.engine.trainer import Trainer
from mitoseg.errors import MitosegError
from mitoseg.networks import SegmentationModel, build_model

from conftest import tiny_config_dict


def wide_cfg(**kw) -> ModelConfig:
    values = {"name": "wide_unet", "channels": [16, 24, 32], "strides": [2, 2], "stem": 2, "num_res_units": 1,
              "feature_channels": 12, "head_channels": 10}
    values.update(kw)
    return ModelConfig(**values)


def wide_config_dict(volumes, **train):
    data = tiny_config_dict(volumes, **train)
    data["model"] = {"name": "wide_unet", "channels": [16, 24, 32], "strides": [2, 2], "stem": 2,
                     "num_res_units": 1, "feature_channels": 12, "head_channels": 8}
    return data


@pytest.mark.parametrize("stem", [1, 2, 4])
def test_features_run_at_the_stems_resolution_and_logits_at_the_inputs(stem):
    model = build_model(wide_cfg(stem=stem), num_classes=3, in_channels=3).eval()
    assert isinstance(model, SegmentationModel)
    x = torch.randn(2, 3, 16 * stem, 32 * stem)
    features = model.features(x)
    assert features.shape == (2, 12, 16, 32)  # 1 / stem of the input
    assert model(x).shape == (2, 3, 16 * stem, 32 * stem)
    assert model.seg_head.block(features).shape == (2, 10, 16, 32)


def test_the_stem_is_lossless_and_gradients_reach_the_first_convolution():
    model = build_model(wide_cfg(stem=2), num_classes=2)
    x = torch.randn(1, 1, 8, 8)
    folded = model.stem(x)
    assert folded.shape == (1, 4, 4, 4)
    assert torch.equal(torch.nn.functional.pixel_shuffle(folded, 2), x)  # nothing lost before the first conv
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    first = model.encoder[0].entry[0].weight
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_parts_cover_every_parameter_but_the_head():
    model = build_model(wide_cfg(), num_classes=2)
    parts = model.parts()
    in_parts = {id(p) for modules in parts.values() for m in modules for p in m.parameters()}
    outside = [name for name, p in model.named_parameters() if id(p) not in in_parts]
    assert outside and all(name.startswith("seg_head.") for name in outside)


def test_window_sizes_must_be_multiples_of_stem_times_strides(tiny_volumes):
    data = wide_config_dict(tiny_volumes)
    assert size_multiple(config_from_dict(data).model) == 8
    data["data"]["patch_size"] = [36, 36]
    with pytest.raises(MitosegError, match=r"data.patch_size.*multiples of 8 \(model.stem 2"):
        config_from_dict(data)
    data = wide_config_dict(tiny_volumes)
    data["model"]["strides"] = [2, 4]
    with pytest.raises(MitosegError, match="must all be 2 for model.name wide_unet"):
        config_from_dict(data)
    data = wide_config_dict(tiny_volumes)
    data["model"]["spatial_dims"] = 3
    with pytest.raises(MitosegError, match="model.spatial_dims"):
        config_from_dict(data)


def test_training_resumes_to_the_same_weights(tmp_path, tiny_volumes):
    data = wide_config_dict(tiny_volumes)
    full = tmp_path / "full"
    Trainer(config_from_dict(data), full, progress=False).fit()
    split = tmp_path / "split"
    Trainer(config_from_dict(data), split, max_iters=4, progress=False).fit()
    Trainer(config_from_dict(data), split, resume=True, progress=False).fit()
    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    for key in ("model", "ema_model"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"


@pytest.mark.parametrize("method", ["daw", "daw_ddfp"])
def test_semi_supervised_methods_train_it_with_2_5d_context(tmp_path, tiny_volumes, method):
    data = wide_config_dict(tiny_volumes, iterations=4, val_every=4, log_every=2, checkpoint_every=4)
    data["data"]["context_slices"] = 1
    data["data"]["train"]["slices"] = [0, 3]
    data["method"] = {"name": method, "ddfp": {"start_iter": 2, "max_pixels": 256}}
    summary = Trainer(config_from_dict(data), tmp_path / "run", progress=False).fit()
    assert summary["completed"] and 0.0 <= summary["final"]["fg_iou"] <= 1.0
