"""Fine-tuning (model.init_from, model.init_weights, model.freeze, model.freeze_iters) and --max-minutes."""

from __future__ import annotations

import json

import pytest
import torch

from mitoseg.config import config_from_dict
from mitoseg.runs import load_checkpoint, validated_weights
from mitoseg.engine.trainer import Trainer, seed_everything
from mitoseg.errors import MitosegError
from mitoseg.networks import build_model

from conftest import tiny_config_dict

METHODS = ("supervised", "fixmatch", "unimatch", "daw", "ddfp", "daw_ddfp")


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_volumes):
    """A finished 6-iteration supervised run whose best.pt validated the better of student and teacher."""
    out = tmp_path_factory.mktemp("finetune") / "parent"
    Trainer(config_from_dict(tiny_config_dict(tiny_volumes, eval_model="best_of", ema_decay=0.5)), out,
            progress=False).fit()
    return out


def child_config(tiny_volumes, parent, **model) -> dict:
    cfg = tiny_config_dict(tiny_volumes)
    cfg["model"].update(init_from=str(parent / "best.pt"), **model)
    return cfg


def weights_of(state: dict, which: str) -> dict:
    return state[{"ema": "ema_model", "student": "model"}[which]]


def assert_equal_weights(a: dict, b: dict, keys=None) -> None:
    for key in keys if keys is not None else a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


def test_init_from_loads_the_weights_the_parent_validated_and_the_teacher_starts_as_them(tmp_path, tiny_volumes,
                                                                                     parent, capsys):
    state = load_checkpoint(parent / "best.pt")
    chosen = validated_weights(state)
    trainer = Trainer(config_from_dict(child_config(tiny_volumes, parent)), tmp_path / "child", progress=False)
    assert_equal_weights(weights_of(state, chosen), trainer.model.state_dict())
    assert_equal_weights(weights_of(state, chosen), trainer.ema.module.state_dict())
    assert trainer.init_report == {"path": str(parent / "best.pt"), "weights": chosen,
                                   "iteration": state["iteration"], "num_classes": 2, "reinitialised": []}
    assert f"model.init_from: the {chosen} weights of {parent / 'best.pt'}" in capsys.readouterr().out
    other = "student" if chosen == "ema" else "ema"
    assert not torch.equal(weights_of(state, chosen)["seg_head.classifier.weight"],
                           weights_of(state, other)["seg_head.classifier.weight"])  # the choice below can fail
    trainer = Trainer(config_from_dict(child_config(tiny_volumes, parent, init_weights=other)), tmp_path / "other",
                      progress=False)
    assert_equal_weights(weights_of(state, other), trainer.model.state_dict())
    assert_equal_weights(weights_of(state, other), trainer.ema.module.state_dict())


def test_another_number_of_classes_reinitialises_only_the_classifier_and_says_so(tmp_path, tiny_volumes, parent,
                                                                                capsys):
    cfg = child_config(tiny_volumes, parent)
    cfg["data"]["num_classes"] = 3  # the tiny labels hold 0 / 1: valid class ids of 3 classes
    summary = Trainer(config_from_dict(cfg), tmp_path / "child", progress=False, max_iters=1).fit()
    out = capsys.readouterr().out
    keys = ["seg_head.classifier.weight", "seg_head.classifier.bias"]
    assert ("re-initialised for 3 classes (the checkpoint has 2): seg_head.classifier.weight, "
            "seg_head.classifier.bias") in out
    assert summary["init"]["reinitialised"] == keys
    assert json.loads((tmp_path / "child" / "summary.json").read_text())["init"]["reinitialised"] == keys

    # Before any step: every weight is the parent's but the classifier's, which is a fresh one of 3 classes
    # (the one a run from scratch would start with).
    state = load_checkpoint(parent / "best.pt")
    trainer = Trainer(config_from_dict(cfg), tmp_path / "again", progress=False)
    own = trainer.model.state_dict()
    parent_weights = weights_of(state, validated_weights(state))
    assert_equal_weights(parent_weights, own, [k for k in own if k not in keys])
    seed_everything(0)
    fresh = build_model(config_from_dict(cfg).model, 3, 1).state_dict()
    assert own["seg_head.classifier.weight"].shape == (3, 8, 1, 1)
    assert_equal_weights(fresh, own, keys)


def test_a_network_that_does_not_match_is_refused_in_one_line_listing_the_keys(tmp_path, tiny_volumes, parent):
    cfg = child_config(tiny_volumes, parent)
    cfg["model"]["channels"] = [8, 16, 64]
    with pytest.raises(MitosegError) as info:
        Trainer(config_from_dict(cfg), tmp_path / "a", progress=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith("config key 'model.init_from': the network of")
    assert "9 with another shape" in message
    assert "encoder_decoder.model.1.submodule.1.submodule.conv.unit0.conv.weight (32, 16, 3, 3) -> (64, 16, 3, 3)" \
        in message
    assert "the configs differ at model.channels ([8, 16, 32] -> [8, 16, 64])" in message

    cfg = child_config(tiny_volumes, parent)
    cfg["data"]["context_slices"] = 1  # three input channels: the first convolutions differ
    with pytest.raises(MitosegError, match=r"with another shape: .*\(8, 1, 3, 3\) -> \(8, 3, 3, 3\).*"
                                           r"the configs differ at data.context_slices \(0 -> 1\)"):
        Trainer(config_from_dict(cfg), tmp_path / "b", progress=False)

    cfg = child_config(tiny_volumes, parent)
    cfg["model"]["norm"] = "instance"  # no BatchNorm statistics: keys missing from this network
    with pytest.raises(MitosegError, match=r"not in this network: encoder_decoder\.model\.0\.conv\.unit0\.adn\.N\."
                                           r"weight.* and \d+ more;.*model.norm \(batch -> instance\)"):
        Trainer(config_from_dict(cfg), tmp_path / "c", progress=False)

    cfg = child_config(tiny_volumes, tmp_path / "nowhere")
    with pytest.raises(MitosegError, match="config key 'model.init_from': checkpoint not found: .*nowhere"):
        Trainer(config_from_dict(cfg), tmp_path / "d", progress=False)
    assert not (tmp_path / "d").exists()


def test_freeze_keeps_the_encoder_and_its_statistics_then_thaws_and_resume_is_exact(tmp_path, tiny_volumes,
                                                                                    parent):
    state = load_checkpoint(parent / "best.pt")
    start = weights_of(state, validated_weights(state))
    cfg = child_config(tiny_volumes, parent, freeze=["encoder"], freeze_iters=3)
    full = Trainer(config_from_dict(cfg), tmp_path / "full", progress=False)
    encoder = {name for module in full.model.parts()["encoder"] for name, _ in module.named_parameters()}
    prefix = {id(m): n for n, m in full.model.named_modules()}
    encoder_keys = [f"{prefix[id(module)]}.{name}" for module in full.model.parts()["encoder"]
                    for name in module.state_dict()]
    assert encoder and any("running_mean" in k for k in encoder_keys)
    full.fit()

    split = tmp_path / "split"
    Trainer(config_from_dict(cfg), split, max_iters=3, progress=False).fit()
    at_3 = load_checkpoint(split / "last.pt")
    # Frozen for iterations 0-2: the encoder's weights and BatchNorm statistics are the parent's, bit for bit,
    # in the student and in the teacher; the decoder and head have moved.
    assert_equal_weights(start, at_3["model"], encoder_keys)
    assert_equal_weights(start, at_3["ema_model"], encoder_keys)
    assert not torch.equal(start["seg_head.classifier.weight"], at_3["model"]["seg_head.classifier.weight"])
    # --resume restores last.pt and never reads model.init_from again: the parent's file may be gone.
    moved = tmp_path / "moved.pt"
    (parent / "best.pt").rename(moved)
    try:
        Trainer(config_from_dict(cfg), split, resume=True, progress=False).fit()
    finally:
        moved.rename(parent / "best.pt")
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(split / "last.pt")
    assert b["iteration"] == 6
    for key in ("model", "ema_model"):
        assert_equal_weights(a[key], b[key])
    # Thawed from iteration 3: the encoder trained.
    assert any(not torch.equal(start[k], b["model"][k]) for k in encoder_keys if "running" not in k)
    assert b["init"] == a["init"] and a["init"]["path"] == str(parent / "best.pt")


@pytest.mark.parametrize("method", METHODS)
def test_fine_tuning_works_with_every_method(tmp_path, tiny_volumes, parent, method):
    cfg = child_config(tiny_volumes, parent, freeze=["encoder", "decoder"])
    cfg["method"] = {"name": method}
    if method in ("ddfp", "daw_ddfp"):
        cfg["method"]["ddfp"] = {"start_iter": 1, "max_pixels": 256}
    if method != "supervised":
        cfg["data"]["train"]["slices"] = "0:3"
    cfg["train"].update(iterations=3, val_every=3, checkpoint_every=3, inspect_every=3)
    summary = Trainer(config_from_dict(cfg), tmp_path / method, progress=False).fit()
    assert summary["completed"] and summary["init"]["path"] == str(parent / "best.pt")
    state = load_checkpoint(parent / "best.pt")
    start, end = weights_of(state, validated_weights(state)), load_checkpoint(tmp_path / method / "last.pt")
    features = [k for k in start if k.startswith("encoder_decoder.")]
    assert_equal_weights(start, end["model"], features)  # encoder and decoder frozen throughout
    assert not torch.equal(start["seg_head.classifier.weight"], end["model"]["seg_head.classifier.weight"])


def test_unet_and_deeplab_parts_cover_the_feature_extractor_once():
    from mitoseg.config import ModelConfig

    for model in (build_model(ModelConfig(channels=[8, 16, 32, 64], strides=[2, 2, 2], num_res_units=1), 2),
                  build_model(ModelConfig(channels=[8, 16], strides=[2], spatial_dims=3), 2),
                  build_model(ModelConfig(name="deeplabv3plus", backbone="resnet50", width=4, feature_channels=16,
                                          head_channels=8, in_channels=3), 3),
                  build_model(ModelConfig(name="deeplabv3plus", backbone="resnet50", width=4, feature_channels=56,
                                          head_channels=8, in_channels=3, decoder="u2pl"), 3)):
        parts = model.parts()
        named = [id(p) for part in ("encoder", "decoder") for m in parts[part] for p in m.parameters()]
        head = [id(p) for p in model.seg_head.parameters()]
        assert len(set(named)) == len(named) and sorted(named + head) == sorted(id(p) for p in model.parameters())
        assert model.classifier_keys() == ["seg_head.classifier.weight", "seg_head.classifier.bias"]
    assert parts["encoder"] == [model.backbone]


@pytest.mark.parametrize("model, needle", [
    ({"init_weights": "ema"}, "'model.init_weights' chooses the weights of model.init_from's checkpoint"),
    ({"freeze": ["encoder"]}, "'model.freeze' keeps parts of a network at their starting weights"),
    ({"init_from": "a.pt", "freeze": ["encoder", "encoder"]}, "'model.freeze' names a part twice"),
    ({"init_from": "a.pt", "freeze_iters": 5}, "'model.freeze_iters' is the iteration at which"),
    ({"init_from": "a.pt", "freeze": ["encoder"], "freeze_iters": 0}, "'model.freeze_iters' must be at least 1, got 0"),
    ({"init_from": "a.pt", "freeze": ["encoder"], "freeze_iters": 2000},
     "'model.freeze_iters' must be less than train.iterations (2000), got 2000"),
    ({"init_from": "a.pt", "freeze": ["head"]}, "'model.freeze[0]' expects one of 'encoder', 'decoder'"),
    ({"init_from": ""}, "'model.init_from' must name a mitoseg checkpoint"),
    ({"init_from": "a.pt", "init_weights": "best"}, "'model.init_weights' expects one of 'ema', 'student' or null"),
    ({"name": "deeplabv3plus", "in_channels": 3, "init_from": "a.pt", "pretrained": "r.pth"},
     "'model.pretrained' and model.init_from cannot both be set"),
])
def test_fine_tuning_keys_are_checked_in_one_line(model, needle):
    data = {"data": {"train": {"image": "a.tif", "label": "b.tif"}}, "model": model}
    with pytest.raises(MitosegError) as info:
        config_from_dict(data)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
    good = {"init_from": "a.pt", "init_weights": "student", "freeze": ["encoder", "decoder"], "freeze_iters": 1999}
    assert config_from_dict({**data, "model": good}).model.freeze == ["encoder", "decoder"]


def test_max_minutes_stops_at_a_log_step_with_a_validation_and_resume_continues(tmp_path, tiny_volumes):
    cfg = tiny_config_dict(tiny_volumes)
    out = tmp_path / "run"
    summary = Trainer(config_from_dict(cfg), out, progress=False, max_minutes=1e-9).fit()
    assert summary["iterations"] == 2 and summary["time_limit_reached"] and not summary["completed"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["split"]) for r in records] == [(2, "train"), (2, "val")]
    assert load_checkpoint(out / "last.pt")["iteration"] == 2
    summary = Trainer(config_from_dict(cfg), out, resume=True, progress=False).fit()
    assert summary["iterations"] == 6 and summary["completed"] and not summary["time_limit_reached"]


def test_max_minutes_must_be_a_positive_number(capsys):
    from conftest import assert_one_line_error

    from mitoseg.cli import main

    for bad in ("0", "-1", "nan", "inf", "soon"):
        with pytest.raises(SystemExit) as info:
            main(["train", "--config", "c.yaml", "--max-minutes", bad])
        assert_one_line_error(info.value.code, capsys.readouterr().err, "--max-minutes", bad)
