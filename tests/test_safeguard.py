"""Safeguards of the unlabeled loss (mitoseg/semi/safeguard.py): the supervised warm-up, the ramp and the
class-share guard, as pure functions, inside a method's step, and in training runs that resume exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mitoseg.config import config_from_dict
from mitoseg.engine.trainer import Trainer
from mitoseg.semi.safeguard import ShareGuard, class_shares, guard_weight, rampup_weight, share_drift
from test_ddfp import ddfp_config
from test_semi import SignModel, semi_config, sign_batches, sign_method


# ------------------------------------------------------------------ pure functions

def test_rampup_is_zero_in_the_warmup_then_rises_to_one():
    assert rampup_weight(0.1, start=0.2, length=0.3) == 0.0
    assert rampup_weight(0.2, start=0.2, length=0.3) == pytest.approx(math.exp(-5))
    assert rampup_weight(0.35, start=0.2, length=0.3) == pytest.approx(math.exp(-5 * 0.25))
    assert rampup_weight(0.5, start=0.2, length=0.3) == 1.0
    assert rampup_weight(0.9, start=0.2, length=0.3) == 1.0
    assert rampup_weight(0.2, start=0.2, length=0.0) == 1.0  # no ramp: a step at the warm-up's end
    values = [rampup_weight(p / 100, 0.2, 0.3) for p in range(20, 51)]
    assert values == sorted(values)


def test_class_shares_count_valid_pixels_only():
    label = torch.tensor([[0, 1, 1, 255], [0, 0, 1, 2]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, True]])
    shares = class_shares(label, valid, 3, ignore_index=255)
    torch.testing.assert_close(shares, torch.tensor([3, 2, 1]) / 6.0)
    assert class_shares(label, torch.zeros_like(valid), 3).sum() == 0


def test_share_drift_is_the_largest_ratio_either_way_over_common_classes():
    reference = torch.tensor([0.9, 0.1])
    assert float(share_drift(torch.tensor([0.9, 0.1]), reference)) == pytest.approx(1.0)
    assert float(share_drift(torch.tensor([0.7, 0.3]), reference)) == pytest.approx(3.0)
    assert float(share_drift(torch.tensor([0.95, 0.05]), reference)) == pytest.approx(2.0)
    # A class under 1 % of the reference is not compared (a rare class's share is noise).
    assert float(share_drift(torch.tensor([0.89, 0.1, 0.01]), torch.tensor([0.895, 0.1, 0.005]))) < 1.01


def test_guard_weight_is_one_within_the_tolerance_then_falls_as_the_square():
    assert float(guard_weight(torch.tensor(1.4), 1.5)) == 1.0
    assert float(guard_weight(torch.tensor(3.0), 1.5)) == pytest.approx(0.25)
    assert float(guard_weight(torch.tensor(1e4), 1.5)) < 1e-7


def test_share_guard_catches_all_foreground_pseudo_labels_and_keeps_its_state():
    guard = ShareGuard(2, tolerance=1.5)
    label = torch.zeros(2, 16, 16, dtype=torch.long)
    label[:, :4] = 1  # 25 % foreground in the labeled batches
    fine = label.clone()
    assert float(guard.update(fine, None, label)) == 1.0 and not bool(guard.acted)
    everything = torch.ones_like(label)
    factors = [float(guard.update(everything, None, label)) for _ in range(30)]  # momentum 0.9: ~20 steps
    assert factors[-1] < 0.05 and factors == sorted(factors, reverse=True)
    assert bool(guard.acted)
    restored = ShareGuard(2, tolerance=1.5)
    restored.load_state_dict(guard.state_dict())
    assert float(restored.update(everything, None, label)) == float(guard.update(everything, None, label))


# ------------------------------------------------------------- inside a method's step

@pytest.mark.parametrize("name", ["fixmatch", "unimatch", "daw"])
def test_warmup_steps_train_on_the_labeled_batch_alone(name):
    from mitoseg.methods import StepContext

    method = sign_method(name, warmup=0.5)
    labeled, unlabeled = sign_batches(strong_sign=-1.0)  # strong views that would cost
    student = SignModel()
    early = StepContext(student=student, teacher=SignModel(), iteration=0, total_iterations=10, progress=0.2)
    assert method.supervised_only(0, 0.2) and not method.supervised_only(5, 0.5)
    out = method.training_step(early, labeled, unlabeled)
    torch.testing.assert_close(out.loss.detach(), out.logs["loss_x"])
    assert math.isnan(float(out.logs["loss_s"]))
    late = StepContext(student=student, teacher=SignModel(), iteration=5, total_iterations=10, progress=0.5)
    assert float(method.training_step(late, labeled, unlabeled).logs["loss_s"]) > 1.0
    # The trainer passes no unlabeled batch in the warm-up: the same supervised step.
    torch.testing.assert_close(method.training_step(early, labeled, None).loss, out.loss)


def test_daw_statistics_follow_the_model_during_the_warmup():
    from mitoseg.methods import StepContext

    method = sign_method("daw", warmup=0.5)
    before = float(method.daw.mean[0])
    ctx = StepContext(student=SignModel(), teacher=SignModel(), iteration=0, total_iterations=10, progress=0.0)
    labeled, _ = sign_batches()
    method.training_step(ctx, labeled, None)
    assert float(method.daw.mean[0]) != before


def test_rampup_scales_every_unsupervised_term():
    from mitoseg.methods import StepContext

    labeled, unlabeled = sign_batches(strong_sign=-1.0)
    labeled["label"][:, :4] = 1 - labeled["label"][:, :4]
    ctx = StepContext(student=SignModel(), teacher=SignModel(), iteration=3, total_iterations=10, progress=0.3)
    out = sign_method("unimatch", warmup=0.2, rampup=0.4).training_step(ctx, labeled, unlabeled)
    w = rampup_weight(0.3, 0.2, 0.4)
    assert 0 < w < 1 and float(out.logs["rampup"]) == pytest.approx(w)
    expected = (out.logs["loss_x"] + w * 0.5 * out.logs["loss_s"] + w * 0.5 * out.logs["loss_fp"]) / 2
    torch.testing.assert_close(out.loss.detach(), expected)


def test_guard_down_weights_pseudo_labels_forced_to_foreground_and_says_so_once():
    from mitoseg.methods import StepContext

    method = sign_method("unimatch", guard_tolerance=1.5)
    labeled, unlabeled = sign_batches(strong_sign=-1.0)
    ctx = StepContext(student=SignModel(), teacher=SignModel(), iteration=0, total_iterations=10, progress=0.5)
    honest = method.training_step(ctx, labeled, unlabeled)
    assert float(honest.logs["guard"]) == 1.0 and method.notices(1, {k: float(v) for k, v in honest.logs.items()}) == []
    make = method.make_pseudo_labels

    def all_foreground(*args, **kwargs):
        pl = make(*args, **kwargs)
        pl.label = torch.ones_like(pl.label)
        pl.weight = torch.ones_like(pl.weight)
        return pl

    method.make_pseudo_labels = all_foreground
    for _ in range(25):  # the running shares (momentum 0.9) move in about 20 steps
        out = method.training_step(ctx, labeled, unlabeled)
    logs = {k: float(v) for k, v in out.logs.items()}
    assert logs["guard"] < 0.2 and logs["pseudo_fg"] == 1.0
    expected = (logs["loss_x"] + logs["guard"] * (0.5 * logs["loss_s"] + 0.5 * logs["loss_fp"])) / 2
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5)
    lines = method.notices(5, logs)
    assert len(lines) == 1 and "method.guard_tolerance" in lines[0] and "100.0%" in lines[0]
    assert method.notices(6, logs) == []


# --------------------------------------------------------------- training runs

def test_warmup_draws_no_unlabeled_batch_until_it_ends(tmp_path, tiny_volumes):
    cfg = semi_config(tiny_volumes, "daw", iterations=8)
    cfg["method"]["warmup"] = 0.5
    trainer = Trainer(config_from_dict(cfg), tmp_path / "run", progress=False)
    drawn = [unlabeled is not None for _, unlabeled in trainer.batches(0)]
    assert drawn == [False] * 4 + [True] * 4
    # Resumed inside the warm-up or after it: the same unlabeled samples for the same iterations.
    a = [u for _, u in trainer.batches(0)][-1]
    b = [u for _, u in trainer.batches(6)][-1]
    assert torch.equal(a["weak"], b["weak"])


def test_a_time_budget_that_ends_inside_the_warmup_ends_the_batches_without_an_error(tmp_path, tiny_volumes):
    # A train.max_minutes budget spent before the warm-up's end sets total_iterations to the last iteration;
    # the progress is then 1, past the warm-up, and the unlabeled stream must not start (it would be empty).
    cfg = semi_config(tiny_volumes, "daw", iterations=8)
    cfg["method"]["warmup"] = 0.5
    trainer = Trainer(config_from_dict(cfg), tmp_path / "run", progress=False)
    batches = trainer.batches(0)
    assert [next(batches)[1] is None for _ in range(3)] == [True] * 3
    trainer.total_iterations = trainer.stop_iteration = 3  # what the TimeBudget handler does when spent
    assert list(batches) == []


def test_guard_acts_on_a_tiny_volume_whose_pseudo_labels_are_forced_to_foreground(tmp_path, tiny_volumes, capsys):
    cfg = semi_config(tiny_volumes, "daw", iterations=8, log_every=1)
    cfg["method"]["guard_tolerance"] = 1.5
    trainer = Trainer(config_from_dict(cfg), tmp_path / "run", progress=False)
    make = trainer.method.make_pseudo_labels

    def all_foreground(*args, **kwargs):
        pl = make(*args, **kwargs)
        pl.label = torch.ones_like(pl.label)
        return pl

    trainer.method.make_pseudo_labels = all_foreground
    trainer.fit()
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    guard = [r["guard"] for r in records if r["split"] == "train"]
    assert guard[-1] < 0.1 and all(r["pseudo_fg"] == 1.0 for r in records if r["split"] == "train")
    said = [line for line in capsys.readouterr().out.splitlines() if "method.guard_tolerance" in line]
    assert len(said) == 1


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fixmatch", "unimatch", "daw", "ddfp", "daw_ddfp"])
def test_every_method_with_the_safeguards_trains_and_resumes_exactly(method, tmp_path, tiny_volumes):
    cfg = ddfp_config(tiny_volumes, method) if method in ("ddfp", "daw_ddfp") else semi_config(tiny_volumes, method)
    cfg["train"].update({"iterations": 8, "checkpoint_every": 3})
    cfg["method"].update({"warmup": 0.25, "rampup": 0.25, "guard_tolerance": 1.5})
    Trainer(config_from_dict(cfg), tmp_path / "full", progress=False).fit()
    Trainer(config_from_dict(cfg), tmp_path / "split", max_iters=3, progress=False).fit()  # inside the ramp
    Trainer(config_from_dict(cfg), tmp_path / "split", resume=True, progress=False).fit()
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, tensor in a["method"]["guard"].items():
        assert torch.equal(tensor, b["method"]["guard"][name]), name
    records = [json.loads(l) for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert "guard" in train[-1] and 0 < train[-1]["guard"] <= 1
