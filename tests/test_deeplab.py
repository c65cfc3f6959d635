"""DeepLabV3+ / dilated ResNet: shapes, torchvision key names, dilation, the features/head interface,
pretrained loading with good and bad state dicts, and the optimizer's parameter groups."""

from __future__ import annotations

import pytest
import torch

from mitoseg.config import ModelConfig, OptimConfig
from mitoseg.engine.trainer import make_optimizer
from mitoseg.errors import MitosegError
from mitoseg.networks import build_model
from mitoseg.networks.deeplab import DeepLabV3Plus, ResNet, load_pretrained_backbone


def tiny(**kwargs) -> DeepLabV3Plus:
    args = dict(backbone="resnet50", width=8, feature_channels=16, head_channels=16)
    args.update(kwargs)
    return DeepLabV3Plus(5, **args)


@pytest.mark.parametrize("output_stride", [16, 8])
def test_features_at_quarter_resolution_and_logits_at_input_size(output_stride):
    torch.manual_seed(0)
    model = tiny(output_stride=output_stride).eval()
    x = torch.randn(2, 3, 50, 66)
    features = model.features(x)
    assert features.shape == (2, 16, 13, 17)
    logits = model(x)
    assert logits.shape == (2, 5, 50, 66)
    torch.testing.assert_close(model.logits(features, x.shape[-2:]), logits)
    # The shared head: penultimate features from its block, then the classifier (UniMatch's fuse[3:] + classifier).
    penultimate = model.seg_head.block(features)
    assert penultimate.shape == (2, 16, 13, 17)
    torch.testing.assert_close(model.head(features), model.seg_head.classifier(penultimate))
    assert model.head(features, perturbed=True).shape == (2, 5, 13, 17)  # DDFP's MixBN branch


def test_dilation_replaces_stride_in_the_last_stages():
    def conv2(layer):
        return layer[-1].conv2

    os16, os8 = ResNet([3, 4, 6, 3], 16, width=8), ResNet([3, 4, 6, 3], 8, width=8)
    assert conv2(os16.layer3).dilation == (1, 1) and conv2(os16.layer4).dilation == (2, 2)
    assert os16.layer4[0].conv2.stride == (1, 1) and os16.layer3[0].conv2.stride == (2, 2)
    assert conv2(os8.layer3).dilation == (2, 2) and conv2(os8.layer4).dilation == (4, 4)
    assert os8.layer3[0].conv2.stride == (1, 1)
    x = torch.randn(1, 3, 64, 64)
    assert os16.eval()(x)[1].shape[-1] == 4 and os8.eval()(x)[1].shape[-1] == 8
    # ASPP dilations follow the output stride unless given.
    assert tiny(output_stride=8).aspp.b1[0].dilation == (12, 12)
    assert tiny(output_stride=16).aspp.b3[0].dilation == (18, 18)
    assert tiny(dilations=[1, 2, 3]).aspp.b3[0].dilation == (3, 3)
    assert tiny().reduce[0].out_channels == 48


def test_backbone_uses_torchvision_key_names():
    keys = set(ResNet([3, 4, 23, 3]).state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
                "layer3.22.conv3.weight", "layer4.2.bn3.bias"):
        assert key in keys, key
    assert not any(k.startswith("fc.") for k in keys)
    assert ResNet([3, 4, 23, 3]).conv1.weight.shape == (64, 3, 7, 7)
    deep = set(ResNet([3, 4, 6, 3], deep_stem=True).state_dict())
    assert {"conv1.0.weight", "conv1.1.weight", "conv1.3.weight", "conv1.4.weight", "conv1.6.weight"} <= deep
    assert "layer3.22.conv3.weight" not in deep and "layer3.5.conv3.weight" in deep


def test_registry_builds_deeplab_from_the_config():
    cfg = ModelConfig(name="deeplabv3plus", in_channels=3, backbone="resnet50", width=8, feature_channels=16,
                      head_channels=16, output_stride=8, deep_stem=True)
    model = build_model(cfg, 21)
    assert isinstance(model, DeepLabV3Plus) and model.seg_head.classifier.out_channels == 21
    assert model.backbone.layer4[-1].conv2.dilation == (4, 4)


def test_pretrained_loads_a_torchvision_style_state_dict(tmp_path):
    torch.manual_seed(1)
    source = tiny()
    state = {f"module.{k}": v.clone() for k, v in source.backbone.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 256)  # ImageNet classifier: ignored
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet50.pth"
    torch.save({"state_dict": state}, path)
    torch.manual_seed(2)
    model = tiny()
    load_pretrained_backbone(model, path)
    for name, tensor in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name


def test_pretrained_with_wrong_keys_names_them_all_in_one_message(tmp_path):
    state = dict(tiny().backbone.state_dict())
    del state["layer2.0.conv1.weight"]
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    state["bn1.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(MitosegError) as info:
        load_pretrained_backbone(tiny(), path)
    message = str(info.value)
    assert "1 missing: layer2.0.conv1.weight" in message
    assert "1 unexpected: layer5.0.conv1.weight" in message
    assert "1 wrong shape: bn1.weight (3,) vs (8,)" in message
    # A deep-stem file for a torchvision-stem model: the hint says which setting to change.
    deep = tmp_path / "deep.pth"
    torch.save(tiny(deep_stem=True).backbone.state_dict(), deep)
    with pytest.raises(MitosegError, match="set model.deep_stem: true"):
        load_pretrained_backbone(tiny(), deep)
    # ResNet-50 weights for a ResNet-101.
    r50 = tmp_path / "r50.pth"
    torch.save(tiny().backbone.state_dict(), r50)
    with pytest.raises(MitosegError, match="missing: layer3.6"):
        load_pretrained_backbone(tiny(backbone="resnet101"), r50)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(MitosegError, match="not a readable state dict"):
        load_pretrained_backbone(tiny(), garbage)
    with pytest.raises(MitosegError, match="file not found"):
        load_pretrained_backbone(tiny(), tmp_path / "missing.pth")


def test_head_learning_rate_multiplier_applies_to_everything_but_the_backbone():
    model = tiny()
    optimizer = make_optimizer(model, OptimConfig(name="sgd", lr=0.001, head_lr_multiplier=10.0))
    backbone, rest = optimizer.param_groups
    assert backbone["lr"] == pytest.approx(0.001) and rest["lr"] == pytest.approx(0.01)
    assert len(backbone["params"]) == len(list(model.backbone.parameters()))
    assert len(backbone["params"]) + len(rest["params"]) == len(list(model.parameters()))
    assert backbone["momentum"] == 0.9 and backbone["weight_decay"] == 1e-4
