"""DDFP and DAW + DDFP: MixBN, the loss, the flow's training data, short real runs and exact resume."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mitoseg.config import config_from_dict, load_config
from mitoseg.engine.trainer import Trainer
from mitoseg.methods import StepContext, build_method
from mitoseg.methods.ddfp import DAWDDFP, DDFP, DDFP_LOGS
from mitoseg.networks import build_model
from mitoseg.networks.base import SegmentationHead
from mitoseg.semi.flow import EXCLUDED, UNLABELED

from test_semi import semi_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(autouse=True)
def one_thread():
    """These tests are many small tensor operations: a second thread only adds synchronisation, and on a
    busy machine (a CI runner, other jobs) waiting for it can make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ddfp_config(volumes, method, **ddfp):
    """4 iterations, the flow and the perturbed term from the second on, everything logged."""
    cfg = semi_config(volumes, method, iterations=4, log_every=1, val_every=2, checkpoint_every=2)
    cfg["train"]["inspect_every"] = 2
    cfg["method"]["ddfp"] = {"start_iter": 1, "hidden": 32, "max_pixels": 1024, "eps": 2.0, **ddfp}
    if method == "ddfp":
        cfg["method"]["pseudo_labels"] = "teacher"
        cfg["method"]["threshold"] = 0.5  # two classes: every pseudo-label is used, so each term is non-zero
    return cfg


def test_mixbn_keeps_separate_statistics_for_perturbed_features():
    torch.manual_seed(0)
    head = SegmentationHead(4, 6, 2).train()
    main, aux = head.block[1], head.aux_bn
    clean, perturbed = torch.randn(2, 4, 8, 8), 5 + 3 * torch.randn(2, 4, 8, 8)
    expected = head.classifier(head.block(clean.clone()))  # the default path is unchanged
    main_before = main.running_mean.clone()
    torch.testing.assert_close(head(clean), expected)
    aux_before = aux.running_mean.clone()
    assert torch.equal(aux.running_mean, torch.zeros(6)) and not torch.equal(main.running_mean, main_before)
    main_after_clean = main.running_mean.clone()
    head(perturbed, perturbed=True)
    assert torch.equal(main.running_mean, main_after_clean)  # perturbed batch: the main BN untouched
    assert not torch.equal(aux.running_mean, aux_before)
    conv, _, act = head.block
    torch.testing.assert_close(head.eval()(perturbed, perturbed=True),
                               head.classifier(act(aux(conv(perturbed)))))


def test_checkpoints_from_before_mixbn_still_load_with_the_aux_bn_copied_from_the_main_bn():
    cfg = config_from_dict({"data": {"train": {"image": "a.tif"}}})
    model = build_model(cfg.model, 2)
    model.seg_head.block[1].running_mean.fill_(0.5)
    old = {k: v for k, v in model.state_dict().items() if ".aux_bn." not in k}
    fresh = build_model(cfg.model, 2)
    fresh.load_state_dict(old, strict=True)
    assert torch.equal(fresh.seg_head.aux_bn.running_mean, torch.full_like(fresh.seg_head.aux_bn.running_mean, 0.5))


def test_losses_combine_as_documented():
    # ddfp (paper): L_x + 0.5 L_u + 0.5 L_u,perturbed; daw_ddfp: (L_x + 0.25 (L_s1 + L_s2 + L_fp + L_ddfp)) / 2
    assert DDFP.combine_ddfp(None, 1.0, 2.0, 3.0, 4.0, 5.0) == pytest.approx(1.0 + 1.0 + 2.5)
    assert DAWDDFP.combine_ddfp(None, 1.0, 2.0, 3.0, 4.0, 5.0) == pytest.approx((1.0 + 0.25 * 14.0) / 2)
    assert (DDFP.strong_views, DDFP.feature_perturbation, DDFP.weighting) == (1, False, "fixed")
    assert (DAWDDFP.strong_views, DAWDDFP.feature_perturbation, DAWDDFP.weighting) == (2, True, "daw")


def test_flow_trains_on_ground_truth_and_unlabeled_pixels_and_the_perturbation_leaves_bn_statistics_alone(
        tiny_volumes):
    cfg = config_from_dict(ddfp_config(tiny_volumes, "daw_ddfp"))
    cfg.train.loss, cfg.train.ignore_index = "ce", 255
    method = build_method(cfg, None)
    seen = {}
    method.flow.step = lambda features, labels: seen.update(features=features, labels=labels) or {}
    penultimate = torch.randn(2 + 2, 8, 4, 4)
    label = torch.zeros(2, 8, 8, dtype=torch.long)
    label[0, :4, :4], label[1, 4:, 4:] = 1, 255
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[1, :, :4] = False
    method.train_flow(penultimate, label, valid)
    labels = seen["labels"].reshape(4, 4, 4)
    assert seen["features"].shape == (64, 8)
    assert (labels[0, :2, :2] == 1).all() and (labels[1, 2:, 2:] == EXCLUDED).all()
    assert (labels[2] == UNLABELED).all()
    assert (labels[3, :, :2] == EXCLUDED).all() and (labels[3, :, 2:] == UNLABELED).all()

    student = build_model(cfg.model, 2).train()
    buffers = {k: v.clone() for k, v in student.named_buffers()}
    delta = method.perturbation(student, torch.randn(2, cfg.model.feature_channels, 8, 8))
    assert student.seg_head.block.training
    for name, value in student.named_buffers():
        assert torch.equal(value, buffers[name]), name
    torch.testing.assert_close(delta.norm(dim=1), torch.full((2, 8, 8), 2.0))


def check_run(out: Path, method: str) -> None:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["iter"] for r in train] == [1, 2, 3, 4]
    # Before ddfp.start_iter (the first step): no flow, no perturbed term.
    assert train[0]["flow_nll_bpd"] is None and train[0]["delta_norm"] is None and train[0]["loss_ddfp"] == 0.0
    for record in train[1:]:
        assert all(record[key] is not None and np.isfinite(record[key]) for key in DDFP_LOGS)
        assert record["delta_norm"] == pytest.approx(2.0, rel=1e-4)
        assert 0.0 <= record["flip_ratio"] <= 1.0 and record["flow_nll_bpd"] > 0
        assert record["loss_ddfp"] > 0
    assert ("loss_fp" in train[-1]) == (method == "daw_ddfp") and ("mu_pos" in train[-1]) == (method == "daw_ddfp")
    arrays = np.load(out / "inspect" / "iter_000004.npz")
    assert arrays["log_density"].shape == (4, 32, 32) and arrays["log_density"].dtype == np.float32
    assert np.isfinite(arrays["log_density"]).all()
    meta = json.loads((out / "inspect" / "iter_000004.json").read_text())
    assert meta["arrays"]["log_density"] == {"shape": [4, 32, 32], "dtype": "float32"}
    state = torch.load(out / "last.pt", weights_only=True)
    assert set(state["method"]["ddfp"]) == {"model", "optimizer", "scheduler"}
    assert state["method"]["ddfp"]["model"]["means"].shape == (2, 8)
    assert "seg_head.aux_bn.running_var" in state["model"]


def test_short_ddfp_run_logs_the_flow_and_perturbation_and_writes_a_log_density_map(tmp_path, tiny_volumes):
    summary = Trainer(config_from_dict(ddfp_config(tiny_volumes, "ddfp")), tmp_path / "ddfp", progress=False).fit()
    assert summary["completed"]
    check_run(tmp_path / "ddfp", "ddfp")


def test_ddfp_reads_pseudo_labels_from_the_teacher(tiny_volumes):
    """ddfp's pseudo-labels come from the EMA teacher (method.pseudo_labels: teacher), whose forward
    pass also yields the flow's training features."""
    cfg = config_from_dict(ddfp_config(tiny_volumes, "ddfp"))
    method = build_method(cfg, lambda logits, label: logits.sum() * 0)
    student, teacher = build_model(cfg.model, 2), build_model(cfg.model, 2).eval()
    calls = []
    teacher.features = lambda x, f=teacher.features: calls.append(x.shape[0]) or f(x)
    student.eval = lambda: pytest.fail("the student must not predict pseudo-labels")
    ctx = StepContext(student=student.train(), teacher=teacher, iteration=3, total_iterations=4)
    views = {"weak": torch.randn(4, 1, 32, 32), "strong1": torch.randn(4, 1, 32, 32),
             "box1": torch.zeros(4, 32, 32, dtype=torch.bool), "valid": torch.ones(4, 32, 32, dtype=torch.bool)}
    labeled = {"image": torch.randn(2, 1, 32, 32), "label": torch.randint(0, 2, (2, 32, 32))}
    out = method.training_step(ctx, labeled, views)
    assert calls == [2 + 4]  # one teacher pass: labeled batch + weak views (batch and mixing batch)
    assert torch.isfinite(out.loss) and out.loss.requires_grad


def test_shipped_ddfp_configs_use_the_teacher_for_ddfp_and_daw_for_daw_ddfp():
    for name, method, source in (("sample_daw_ddfp", "daw_ddfp", "student_train"), ("lucchi_ddfp", "ddfp", "teacher"),
                                 ("lucchi_daw_ddfp", "daw_ddfp", "student_train")):
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert cfg.method.name == method and cfg.method.pseudo_labels == source, name


def test_daw_ddfp_run_logs_everything_and_resume_restores_the_flow_its_optimizer_and_schedule_exactly(
        tmp_path, tiny_volumes):
    cfg = ddfp_config(tiny_volumes, "daw_ddfp")
    Trainer(config_from_dict(cfg), tmp_path / "full", progress=False).fit()
    Trainer(config_from_dict(cfg), tmp_path / "split", max_iters=2, progress=False).fit()
    check_run(tmp_path / "full", "daw_ddfp")
    resumed = Trainer(config_from_dict(cfg), tmp_path / "split", resume=True, progress=False)
    saved = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["method"]["ddfp"]
    restored = resumed.method.flow.state_dict()
    for name, value in saved["model"].items():
        assert torch.equal(value, restored["model"][name]), name
    assert saved["scheduler"]["last_epoch"] == restored["scheduler"]["last_epoch"] == 1  # one flow step (0-based iteration 1)
    resumed.fit()
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, tensor in a["method"]["ddfp"]["model"].items():
        assert torch.equal(tensor, b["method"]["ddfp"]["model"][name]), name
    for key, state in a["method"]["ddfp"]["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, b["method"]["ddfp"]["optimizer"]["state"][key][name]), (key, name)
    assert a["method"]["ddfp"]["scheduler"]["_last_lr"] == b["method"]["ddfp"]["scheduler"]["_last_lr"]
    for name, tensor in a["method"]["daw"].items():
        assert torch.equal(tensor, b["method"]["daw"][name]), name
