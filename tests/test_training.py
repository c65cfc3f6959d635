import json

import pytest
import torch

from mitoseg.config import config_from_dict
from mitoseg.engine.trainer import Trainer
from mitoseg.errors import MitosegError

from conftest import tiny_config_dict


def test_tiny_run_writes_checkpoints_logs_and_summary(tmp_path, tiny_volumes):
    cfg = config_from_dict(tiny_config_dict(tiny_volumes))
    out = tmp_path / "run"
    summary = Trainer(cfg, out, progress=False).fit()
    for name in ("last.pt", "best.pt", "summary.json", "metrics.jsonl", "config.json"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    assert summary["iterations"] == 6 and summary["completed"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["best"]["metric"] == "fg_iou"
    assert 0.0 <= on_disk["final"]["fg_iou"] <= 1.0
    assert on_disk["wall_time_s"] > 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if r["split"] == "train"] == [2, 4, 6]
    assert [r["iter"] for r in records if r["split"] == "val"] == [3, 6]
    # Checkpoints are plain data: loadable without unpickling code.
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["iteration"] == 6 and state["format"] == "mitoseg-checkpoint"
    # No temporary files left behind by the atomic writes.
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_training_lowers_the_loss(tmp_path, tiny_volumes):
    cfg = config_from_dict(tiny_config_dict(tiny_volumes, iterations=40, log_every=5, val_every=40))
    Trainer(cfg, tmp_path / "run", progress=False).fit()
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(l)["split"] == "train"]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_volumes):
    cfg_dict = tiny_config_dict(tiny_volumes)
    full = tmp_path / "full"
    Trainer(config_from_dict(cfg_dict), full, progress=False).fit()

    split = tmp_path / "split"
    first = Trainer(config_from_dict(cfg_dict), split, max_iters=4, progress=False).fit()
    assert first["iterations"] == 4 and not first["completed"]
    Trainer(config_from_dict(cfg_dict), split, resume=True, progress=False).fit()

    a = torch.load(full / "last.pt", weights_only=True)
    b = torch.load(split / "last.pt", weights_only=True)
    assert b["iteration"] == 6
    for key in ("model", "ema_model"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    for group_a, group_b in zip(a["optimizer"]["param_groups"], b["optimizer"]["param_groups"]):
        assert group_a["lr"] == group_b["lr"]
    # The log holds each iteration once.
    iters = [json.loads(l)["iter"] for l in (split / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["split"] == "train"]
    assert iters == [2, 4, 6]


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(tmp_path, tiny_volumes):
    cfg_dict = tiny_config_dict(tiny_volumes)
    out = tmp_path / "run"
    with pytest.raises(MitosegError, match="no checkpoint to resume"):
        Trainer(config_from_dict(cfg_dict), out, resume=True, progress=False)
    Trainer(config_from_dict(cfg_dict), out, max_iters=2, progress=False).fit()
    cfg_dict["optim"]["lr"] = 0.1
    with pytest.raises(MitosegError, match="optim.lr"):
        Trainer(config_from_dict(cfg_dict), out, resume=True, progress=False)


def test_best_of_validates_student_and_teacher_and_keeps_the_better(tmp_path, tiny_volumes):
    from mitoseg.runs import load_checkpoint, validated_weights
    from mitoseg.networks.loading import model_from_checkpoint

    cfg = tiny_config_dict(tiny_volumes, eval_model="best_of", ema_decay=0.9)
    Trainer(config_from_dict(cfg), tmp_path / "run", progress=False).fit()
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in (r for r in records if r["split"] == "val"):
        student, ema = record["fg_iou_student"], record["fg_iou_ema"]
        assert record["fg_iou"] == max(student, ema)
    state = load_checkpoint(tmp_path / "run" / "best.pt")
    best = state["best"]["scores"]
    chosen = best["weights"]
    assert best["fg_iou"] == best[f"fg_iou_{chosen}"] >= best[f"fg_iou_{'ema' if chosen == 'student' else 'student'}"]
    assert validated_weights(state) == chosen
    # predict / evaluate default to the weights that won
    model, _ = model_from_checkpoint(tmp_path / "run" / "best.pt")
    key = {"ema": "ema_model", "student": "model"}[chosen]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor.cpu(), state[key][name]), name
    # a plain run validates its eval_model
    assert validated_weights({"config": {"train": {"eval_model": "student"}}}) == "student"
    assert validated_weights({}) == "ema"


def test_time_budget_schedule_decays_with_the_progress_and_ends_at_zero():
    from mitoseg.config import OptimConfig
    from mitoseg.engine.trainer import TimeBudget, lr_factor

    optim = OptimConfig(schedule="poly", poly_power=1.0)
    # The time fraction replaces iteration / iterations.
    assert lr_factor(10, 1000, optim, progress=0.25) == pytest.approx(0.75)
    assert lr_factor(10, 1000, optim, progress=1.5) == 0.0
    budget = TimeBudget(minutes=1.0)
    budget.observe(0, 0.0)
    assert budget.progress(50) == 0.0  # nothing measured yet
    budget.observe(10, 6.0)  # 0.6 s per iteration
    assert budget.progress(10) == pytest.approx(0.1)
    assert budget.progress(30) == pytest.approx(0.3)  # extrapolated between log steps
    budget.observe(20, 9.0)  # the mean since the start: 0.45 s per iteration
    assert budget.progress(30) == pytest.approx(0.3)  # never goes back ...
    assert budget.progress(40) == pytest.approx((9.0 + 20 * 0.45) / 60)  # ... and goes on from the clock
    assert budget.progress(1000) == 1.0 and not budget.spent()
    budget.observe(100, 60.0)
    assert budget.spent()


@pytest.mark.slow
def test_max_minutes_ends_the_run_with_the_learning_rate_at_zero(tmp_path, tiny_volumes):
    cfg = config_from_dict(tiny_config_dict(tiny_volumes, iterations=100000, max_minutes=0.1, log_every=2,
                                            val_every=100000, checkpoint_every=100000))
    summary = Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert summary["budget_spent"] and summary["completed"]
    assert 4 <= summary["iterations"] < 100000
    assert summary["wall_time_s"] >= 6.0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["split"] == "train"]
    assert lrs[0] > 0.0 and all(a >= b for a, b in zip(lrs, lrs[1:]))  # decays with the clock ...
    assert any(0.0 < lr < lrs[0] for lr in lrs)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.0  # ... and ends at zero
    assert [r for r in records if r["split"] == "val"]  # the last iteration validates


def test_val_tta_false_validates_without_tta_while_inference_keeps_it(tmp_path, tiny_volumes, monkeypatch):
    import mitoseg.inference.predictor as predictor

    calls = []
    original = predictor.predict_with_tta
    monkeypatch.setattr(predictor, "predict_with_tta", lambda *a, **k: calls.append(1) or original(*a, **k))
    data = tiny_config_dict(tiny_volumes, iterations=2, val_every=2, log_every=2, checkpoint_every=2)
    data["inference"]["tta"] = True
    data["train"]["val_tta"] = False
    cfg = config_from_dict(data)
    assert cfg.train.val_tta is False and cfg.inference.tta is True
    Trainer(cfg, tmp_path / "off", progress=False).fit()
    assert calls == []
    data["train"]["val_tta"] = None  # null: as inference.tta
    Trainer(config_from_dict(data), tmp_path / "default", progress=False).fit()
    assert calls
