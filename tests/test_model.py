import pytest
import torch

from mitoseg.config import ModelConfig
from mitoseg.errors import MitosegError
from mitoseg.networks import SegmentationModel, build_model


def small_cfg(**kw):
    return ModelConfig(channels=[8, 16, 32], strides=[2, 2], num_res_units=1, feature_channels=12,
                       head_channels=10, **kw)


def test_unet_exposes_features_and_head():
    model = build_model(small_cfg(), num_classes=3).eval()
    assert isinstance(model, SegmentationModel)
    x = torch.randn(2, 1, 48, 64)
    features = model.features(x)
    assert features.shape == (2, 12, 48, 64)
    logits = model.head(features)
    assert logits.shape == (2, 3, 48, 64)
    torch.testing.assert_close(model(x), logits)
    # The head's conv block gives the penultimate features the later methods read.
    assert model.seg_head.block(features).shape == (2, 10, 48, 64)


def test_gradients_reach_the_encoder_through_features_and_head():
    model = build_model(small_cfg(), num_classes=2)
    loss = model.head(model.features(torch.randn(2, 1, 32, 32))).sum()
    loss.backward()
    first = next(model.encoder_decoder.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0


def test_instance_norm_variant_builds():
    model = build_model(small_cfg(norm="instance"), num_classes=2)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.encoder_decoder.modules())


def test_unknown_model_name_is_a_clear_error():
    cfg = small_cfg()
    cfg.name = "transformer"
    with pytest.raises(MitosegError, match="unknown model 'transformer'"):
        build_model(cfg, 2)
