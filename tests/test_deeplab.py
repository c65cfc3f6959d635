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


# ------------------------------------------------------------------ UniMatch's fp branch


def test_features_with_fp_drops_c1_and_c4_and_decodes_both_versions_as_one_batch(monkeypatch):
    # UniMatch (model/semseg/deeplabv3plus.py, need_fp): outs = decode(cat(c1, Dropout2d(c1)), cat(c4, Dropout2d(c4))),
    # out, out_fp = outs.chunk(2). A known "dropout" (channel 0 zeroed, the rest doubled) makes the expected
    # perturbed features a formula of the clean backbone features.
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(2, 3, 40, 40)
    calls = []

    def known_dropout(t, p=0.5, training=True, inplace=False):
        calls.append((tuple(t.shape), p, training))
        out = 2 * t
        out[:, 0] = 0
        return out

    decoded = []
    original_decode = model._decode
    monkeypatch.setattr(model, "_decode", lambda c1, c4: decoded.append(c1.shape[0]) or original_decode(c1, c4))
    monkeypatch.setattr(F, "dropout2d", known_dropout)
    features, perturbed = model.features_with_fp(x, 0.3)
    monkeypatch.undo()
    c1, c4 = model.backbone(x)
    assert calls == [(tuple(c1.shape), 0.3, True), (tuple(c4.shape), 0.3, True)]  # always on, as nn.Dropout2d()
    assert decoded == [4]  # clean and dropped decoded together (the decoder's BatchNorms see both in training)
    dropped_c1, dropped_c4 = 2 * c1, 2 * c4
    dropped_c1[:, 0] = 0
    dropped_c4[:, 0] = 0
    torch.testing.assert_close(features, model.features(x))
    torch.testing.assert_close(perturbed, model._decode(dropped_c1, dropped_c4))
    assert not torch.allclose(features, perturbed)
    # p = 0 drops nothing: the two halves are the same features.
    same, also_same = model.features_with_fp(x, 0.0)
    torch.testing.assert_close(same, also_same)


# ------------------------------------------------------------------ the U2PL / DDFP decoder


def test_u2pl_decoder_has_ddfps_layout_304_channel_features_and_256_channel_penultimate():
    torch.manual_seed(0)
    model = DeepLabV3Plus(21, backbone="resnet50", feature_channels=304, head_channels=256, decoder="u2pl").eval()
    # DDFP model/model/decoder.py dec_deeplabv3_plus: 5 ASPP branches of 256 concatenated (1280), head conv 256.
    assert [model.aspp.pool.gap[1].out_channels, model.aspp.b0[0].out_channels] == [256, 256]
    assert model.aspp_head[0].in_channels == 1280 and model.aspp_head[0].out_channels == 256
    assert model.aspp_head[0].bias is None and isinstance(model.aspp_head[3], torch.nn.Dropout2d)
    assert model.aspp_head[3].p == 0.1
    assert model.aspp.b1[0].dilation == (6, 6) and model.aspp.b3[0].dilation == (18, 18)
    low = model.reduce[0]
    assert (low.in_channels, low.out_channels, low.kernel_size, low.bias is not None) == (256, 48, (1, 1), True)
    block = model.seg_head.block
    convs = [m for m in block if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias is not None) for c in convs] == [
        (304, 256, (3, 3), True), (256, 256, (3, 3), True)]
    assert [m.p for m in block if isinstance(m, torch.nn.Dropout2d)] == [0.1, 0.1]
    assert model.seg_head.classifier.in_channels == 256 and model.seg_head.classifier.out_channels == 21
    x = torch.randn(1, 3, 33, 33)
    with torch.no_grad():
        features = model.features(x)
        assert features.shape == (1, 304, 9, 9)
        assert model.seg_head.block(features).shape == (1, 256, 9, 9)
        assert model(x).shape == (1, 21, 33, 33)


def _u2pl_head():
    torch.manual_seed(0)
    model = tiny(decoder="u2pl", feature_channels=48 + 8, head_channels=12)
    return model, model.seg_head


def _manual_head(head, x, norms, dropout=False):
    """conv -> norm -> ReLU (-> the block's dropout) for each block, then the classifier: the head written out."""
    conv_a, conv_b = [m for m in head.block if isinstance(m, torch.nn.Conv2d)]
    drops = [m for m in head.block if isinstance(m, torch.nn.Dropout2d)]
    for i, (conv, norm) in enumerate(zip((conv_a, conv_b), norms)):
        x = torch.relu(norm(conv(x)))
        if dropout:
            x = drops[i](x)
    return x


def test_u2pl_head_dropout_is_on_in_train_mode_and_off_in_eval_mode():
    model, head = _u2pl_head()
    features = torch.randn(2, 56, 6, 6)
    main = [head.block[i] for i in head.norm_positions]
    assert head.norm_positions == [1, 5]
    head.eval()
    torch.testing.assert_close(head.block(features), _manual_head(head, features, main))
    torch.testing.assert_close(head(features), head.classifier(_manual_head(head, features, main)))
    # Train mode: each (sample, channel) map of the penultimate features is the dropout-free value times 0 or
    # 1 / (1 - 0.1), and some are 0 (Dropout2d(0.1) on 2 x 12 channels of two blocks).
    head.train()
    torch.manual_seed(3)
    caught = head.block(features)
    conv_a, conv_b = [m for m in head.block if isinstance(m, torch.nn.Conv2d)]
    torch.manual_seed(3)
    x = head.block[3](torch.relu(main[0](conv_a(features))))  # the first block, with the same dropout draw
    free = torch.relu(main[1](conv_b(x)))  # the second block without its dropout
    scale = caught.sum(dim=(2, 3)) / free.sum(dim=(2, 3))
    kept = (scale - 1 / 0.9).abs() < 1e-4
    assert bool((kept | (caught.abs().sum(dim=(2, 3)) == 0)).all()) and not bool(kept.all())
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.features(x), model.features(x))  # the ASPP head's dropout is off too
    model.train()
    torch.manual_seed(1)
    a = model.features(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, model.features(x))


def test_u2pl_head_mixbn_uses_the_auxiliary_batchnorm_in_both_blocks():
    # DDFP's MixSyncBatchNorm is in both classifier blocks: perturbed=True swaps each main BN for its aux BN.
    _, head = _u2pl_head()
    assert isinstance(head.aux_bn, torch.nn.ModuleList) and len(head.aux_bn) == 2
    for i, bn in enumerate(head.aux_bn):  # distinct statistics, so a wrong swap shows
        bn.running_mean.fill_(0.3 * (i + 1))
        bn.running_var.fill_(2.0 + i)
        bn.weight.data.fill_(1.5)
    features = torch.randn(2, 56, 6, 6)
    head.eval()
    main = [head.block[i] for i in head.norm_positions]
    expected = head.classifier(_manual_head(head, features, list(head.aux_bn)))
    torch.testing.assert_close(head(features, perturbed=True), expected)
    torch.testing.assert_close(head.penultimate(features, perturbed=True),
                               _manual_head(head, features, list(head.aux_bn)))
    assert not torch.allclose(head(features), expected)
    # Train mode: the perturbed batch moves both aux BNs and neither main BN.
    head.train()
    main_before = [bn.running_mean.clone() for bn in main]
    aux_before = [bn.running_mean.clone() for bn in head.aux_bn]
    head(features, perturbed=True)
    assert all(torch.equal(bn.running_mean, before) for bn, before in zip(main, main_before))
    assert all(not torch.equal(bn.running_mean, before) for bn, before in zip(head.aux_bn, aux_before))


def test_a_state_dict_without_aux_bn_loads_with_each_aux_bn_copied_from_its_blocks_main_bn():
    model, head = _u2pl_head()
    head.block[1].running_mean.fill_(0.5)
    head.block[5].running_mean.fill_(0.25)
    head.block[5].weight.data.fill_(3.0)
    old = {k: v for k, v in model.state_dict().items() if ".aux_bn." not in k}
    assert not any("aux_bn" in k for k in old)
    fresh, _ = _u2pl_head()
    fresh.load_state_dict(old, strict=True)
    aux = fresh.seg_head.aux_bn
    assert torch.equal(aux[0].running_mean, torch.full((12,), 0.5))
    assert torch.equal(aux[1].running_mean, torch.full((12,), 0.25))
    assert torch.equal(aux[1].weight, torch.full((12,), 3.0))
    # The single-block head keeps its checkpoint keys.
    keys = set(tiny().seg_head.state_dict())
    assert {"block.0.weight", "block.1.running_mean", "aux_bn.running_mean", "classifier.weight"} <= keys
    assert len([k for k in keys if k.startswith("block.")]) == 6 and "block.0.bias" not in keys


def test_registry_builds_the_u2pl_decoder_from_the_config():
    cfg = ModelConfig(name="deeplabv3plus", in_channels=3, backbone="resnet50", width=8, feature_channels=64,
                      head_channels=16, decoder="u2pl")
    model = build_model(cfg, 21)
    assert model.decoder_name == "u2pl" and model.seg_head.block[0].in_channels == 64
    with pytest.raises(MitosegError, match="more than 48"):
        tiny(decoder="u2pl", feature_channels=48)
