"""DDFP and DAW + DDFP: MixBN, the loss, the flow's training data, short real runs and exact resume."""

import json
import math
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

from mitoseg.config import BUILTIN_CONFIG_DIR as CONFIGS  # the configs shipped inside the package


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
    from types import SimpleNamespace

    official, joint = SimpleNamespace(official=True), SimpleNamespace(official=False)
    # ddfp, official schedule: L_x + L_u until the perturbed term counts, then L_x + 0.5 L_u + 0.5 L_p.
    assert DDFP.combine_ddfp(official, 1.0, 2.0, 3.0, 4.0, 5.0, False) == pytest.approx(1.0 + 2.0)
    assert DDFP.combine_ddfp(official, 1.0, 2.0, 3.0, 4.0, 5.0, True) == pytest.approx(1.0 + 1.0 + 2.5)
    # joint (mitoseg's earlier schedule): 0.5 / 0.5 throughout.
    assert DDFP.combine_ddfp(joint, 1.0, 2.0, 3.0, 4.0, 5.0, False) == pytest.approx(1.0 + 1.0 + 2.5)
    # daw_ddfp: (L_x + 0.25 (L_s1 + L_s2 + L_fp + L_ddfp)) / 2
    assert DAWDDFP.combine_ddfp(official, 1.0, 2.0, 3.0, 4.0, 5.0, True) == pytest.approx((1.0 + 0.25 * 14.0) / 2)
    assert (DDFP.strong_views, DDFP.feature_perturbation, DDFP.weighting) == (1, False, "fixed")
    assert (DAWDDFP.strong_views, DAWDDFP.feature_perturbation, DAWDDFP.weighting) == (2, True, "daw")


def test_official_schedule_phases_by_iteration_and_the_teacher_restart(tiny_volumes):
    def method(name, **ddfp):
        return build_method(config_from_dict(ddfp_config(tiny_volumes, name, start_iter=10, **ddfp)), None)

    ddfp = method("ddfp")
    assert ddfp.official and (ddfp.flow_start, ddfp.perturb_start) == (10, 20)  # perturb_iter: 2 * start_iter
    assert [ddfp.supervised_only(i, 0.0) for i in (0, 9, 10, 25)] == [True, True, False, False]
    assert ddfp.teacher_restart_iteration() == 10
    assert method("ddfp", perturb_iter=15).perturb_start == 15
    joint = method("ddfp", schedule="joint")
    assert (joint.flow_start, joint.perturb_start) == (10, 10) and not joint.supervised_only(0, 0.0)
    assert joint.teacher_restart_iteration() is None
    daw_ddfp = method("daw_ddfp")
    assert not daw_ddfp.supervised_only(0, 0.0) and daw_ddfp.teacher_restart_iteration() is None
    with pytest.raises(Exception, match="perturb_iter"):
        method("ddfp", perturb_iter=5)


def test_the_ema_teacher_warms_up_and_restarts_from_the_student():
    from mitoseg.engine.ema import ModelEMA

    student = torch.nn.Linear(1, 1, bias=False)
    ema = ModelEMA(student, decay=0.9, warmup=True)
    values = []
    for step in range(1, 6):
        with torch.no_grad():
            student.weight.fill_(float(step))
        ema.update(student)
        values.append(ema.module.weight.item())
    # decay of update n (0-based): min(0.9, 1 - 1 / (n + 1)) = 0, 1/2, 2/3, 3/4, 0.8: the running mean.
    expected, teacher = [], 0.0
    for n, step in enumerate(range(1, 6)):
        decay = min(0.9, 1 - 1 / (n + 1))
        teacher = decay * teacher + (1 - decay) * step
        expected.append(teacher)
    assert values == pytest.approx(expected) and values[-1] == pytest.approx(3.0)
    with torch.no_grad():
        student.weight.fill_(-7.0)
    ema.restart(student)
    assert ema.module.weight.item() == -7.0 and ema.n_averaged == 0


def test_the_unsupervised_loss_is_the_mean_over_confident_pixels_for_ddfp():
    from mitoseg.methods.pseudo_label import weighted_cross_entropy

    logits = torch.tensor([[[[2.0, 0.0, 1.0]], [[0.0, 1.0, 1.0]]]])  # (1, 2, 1, 3)
    target = torch.tensor([[[0, 0, 1]]])
    weight = torch.tensor([[[1.0, 0.0, 1.0]]])
    valid = torch.tensor([[[True, True, True]]])
    ce = [np.log(1 + np.exp(-2.0)), np.log(1 + np.exp(1.0)), np.log(2.0)]
    assert weighted_cross_entropy(logits, target, weight, valid, "valid").item() == pytest.approx((ce[0] + ce[2]) / 3)
    assert weighted_cross_entropy(logits, target, weight, valid, "confident").item() == pytest.approx(
        (ce[0] + ce[2]) / 2)
    base = {"data": {"train": {"image": "a.tif"}}}
    assert config_from_dict({**base, "method": {"name": "ddfp"}}).method.unsup_normalize == "confident"
    assert config_from_dict({**base, "method": {"name": "daw"}}).method.unsup_normalize == "valid"


def test_the_official_flow_has_three_layer_subnets_initialised_at_0_05_n01():
    from mitoseg.semi.flow import DensityModel

    official = DensityModel(16, 2, hidden=32, seed=0)
    linears = [m for m in official.flow.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 2 * 3  # 2 blocks x 2 subnets x Linear-ReLU-Linear-ReLU-Linear
    weights = torch.cat([p.detach().reshape(-1) for p in official.flow.parameters() if p.requires_grad])
    assert abs(weights.mean().item()) < 0.005 and weights.std().item() == pytest.approx(0.05, rel=0.05)
    x = torch.randn(8, 16)
    z, log_jac = official.flow(x)
    assert not torch.allclose(z.sort(1).values, x.sort(1).values, atol=1e-3) and log_jac.abs().max() > 1e-4
    # identity: zero last layers, so each block only permutes the channels and the volume is kept
    z, log_jac = DensityModel(16, 2, hidden=32, seed=0, init="identity").flow(x)
    torch.testing.assert_close(z.sort(1).values, x.sort(1).values)
    assert log_jac.abs().max() == 0


def test_the_perturbation_follows_the_nll_of_used_pixels_only_through_the_auxiliary_bn(tiny_volumes):
    cfg = config_from_dict(ddfp_config(tiny_volumes, "daw_ddfp"))
    method = build_method(cfg, None)
    student = build_model(cfg.model, 2).train()
    features = torch.randn(2, cfg.model.feature_channels, 8, 8)
    used = torch.zeros(2, 8, 8)
    used[0, 2:5, 2:5] = 1.0
    head, log_density = student.seg_head, method.flow.model.log_density
    main, aux = head.block[1], head.aux_bn
    main_before, aux_before = main.running_mean.clone(), aux.running_mean.clone()
    delta = method.perturbation(student, features, used)
    # DDFP's attack.py: eps * normalised gradient of -(sum of log p over the used pixels), the head with the
    # auxiliary BN in train mode (batch statistics), written out here.
    f = features.clone().requires_grad_(True)
    h = head.penultimate(f, perturbed=True)
    log_p = log_density(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])).reshape(2, 8, 8)
    (grad,) = torch.autograd.grad(-(log_p * (used > 0)).sum(), f)
    expected = 2.0 * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)
    # Its statistics move (train mode), the main BN's not.
    assert torch.equal(main.running_mean, main_before) and not torch.equal(aux.running_mean, aux_before)


def test_with_the_main_bn_in_eval_mode_unused_pixels_are_not_perturbed(tiny_volumes):
    cfg = config_from_dict(ddfp_config(tiny_volumes, "daw_ddfp", perturb_bn="main_eval"))
    method = build_method(cfg, None)
    student = build_model(cfg.model, 2).train()
    features = torch.randn(2, cfg.model.feature_channels, 8, 8)
    used = torch.zeros(2, 8, 8)
    used[0, 2:5, 2:5] = 1.0
    norms = method.perturbation(student, features, used).norm(dim=1)
    # eps where a used pixel is within the head's 3x3 convolution, 0 elsewhere and in the other sample
    torch.testing.assert_close(norms[0, 1:6, 1:6], torch.full((5, 5), 2.0))
    assert norms[1].max() == 0 and norms[0, 6:, :].max() == 0 and norms[0, :, 6:].max() == 0
    assert norms[0, :1].max() == 0 and norms[0, :, :1].max() == 0
    cfg.method.ddfp.perturb_pixels = "all"
    assert (build_method(cfg, None).perturbation(student, features, used).norm(dim=1) > 1.99).all()


def test_perturb_max_pixels_pulls_the_direction_with_a_random_sample_of_the_used_pixels(tiny_volumes):
    cfg = config_from_dict(ddfp_config(tiny_volumes, "daw_ddfp", perturb_bn="main_eval", perturb_max_pixels=2))
    method = build_method(cfg, None)
    student = build_model(cfg.model, 2).train()
    features = torch.randn(2, cfg.model.feature_channels, 8, 8)
    used = torch.zeros(2, 8, 8)
    used[0, 2:6, 2:6] = 1.0
    moved = method.perturbation(student, features, used).norm(dim=1) > 0
    # two of the 16 used pixels pull: with the main BN in eval mode only their 3x3 neighbourhoods move
    assert 9 <= int(moved.sum()) <= 18 and not moved[1].any()
    assert not moved[0, :1].any() and not moved[0, 7:].any()  # nothing beyond the used block's neighbourhood


def test_a_daw_ddfp_run_with_the_cpu_flow_settings_trains_its_flow_in_bfloat16(tmp_path, tiny_volumes):
    cfg = ddfp_config(tiny_volumes, "daw_ddfp", flow_precision="bfloat16", perturb_max_pixels=64)
    trainer = Trainer(config_from_dict(cfg), tmp_path / "run", progress=False)
    dtypes = set()
    linear = trainer.method.flow.model.flow.module_list[0].subnet1[0]
    linear.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    trainer.fit()
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert dtypes == {torch.bfloat16} and all(math.isfinite(r["flow_nll_bpd"]) for r in train[1:])
    assert math.isfinite(train[-1]["loss_ddfp"]) and train[-1]["delta_norm"] == pytest.approx(2.0, rel=1e-3)
    assert 0 < train[-1]["label_fg"] < 1  # the guard's notice names it (it said nan for daw_ddfp)


def test_the_main_eval_perturbation_leaves_bn_statistics_alone(tiny_volumes):
    cfg = config_from_dict(ddfp_config(tiny_volumes, "daw_ddfp", perturb_bn="main_eval", perturb_pixels="all"))
    method = build_method(cfg, None)
    student = build_model(cfg.model, 2).train()
    buffers = {k: v.clone() for k, v in student.named_buffers()}
    delta = method.perturbation(student, torch.randn(2, cfg.model.feature_channels, 8, 8), None)
    assert student.seg_head.block.training
    for name, value in student.named_buffers():
        assert torch.equal(value, buffers[name]), name
    torch.testing.assert_close(delta.norm(dim=1), torch.full((2, 8, 8), 2.0))


def test_flow_trains_on_ground_truth_and_unlabeled_pixels(tiny_volumes):
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


def test_between_flow_start_and_perturbation_the_strong_view_trains_the_auxiliary_bn(tiny_volumes):
    for warmup in (True, False):
        cfg = config_from_dict(ddfp_config(tiny_volumes, "ddfp", mixbn_warmup=warmup))
        method = build_method(cfg, lambda logits, label: torch.nn.functional.cross_entropy(logits, label))
        student, teacher = build_model(cfg.model, 2).train(), build_model(cfg.model, 2)
        aux_before = student.seg_head.aux_bn.running_mean.clone()
        ctx = StepContext(student=student, teacher=teacher, iteration=1, total_iterations=4)  # flow on, no delta
        views = {"weak": torch.randn(4, 1, 32, 32), "strong1": torch.randn(4, 1, 32, 32),
                 "box1": torch.zeros(4, 32, 32, dtype=torch.bool), "valid": torch.ones(4, 32, 32, dtype=torch.bool)}
        labeled = {"image": torch.randn(2, 1, 32, 32), "label": torch.randint(0, 2, (2, 32, 32))}
        out = method.training_step(ctx, labeled, views)
        assert float(out.logs["loss_ddfp"]) == 0.0 and np.isnan(float(out.logs["delta_norm"]))
        assert torch.equal(student.seg_head.aux_bn.running_mean, aux_before) != warmup


def check_run(out: Path, method: str) -> None:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["iter"] for r in train] == [1, 2, 3, 4]
    # Iteration 0, before ddfp.start_iter: no flow, no perturbed term; ddfp trains supervised only.
    assert train[0]["flow_nll_bpd"] is None and train[0]["delta_norm"] is None and train[0]["loss_ddfp"] == 0.0
    assert (train[0]["loss_s"] is None) == (method == "ddfp")
    # Iteration 1: the flow trains, the perturbation waits for perturb_iter (2 * start_iter = 2).
    assert train[1]["flow_nll_bpd"] > 0 and train[1]["delta_norm"] is None and train[1]["loss_ddfp"] == 0.0
    for record in train[2:]:
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


def test_ddfp_cutmix_is_half_the_area_for_the_whole_batch_from_the_next_sample(tiny_volumes):
    from mitoseg.data.transforms import CutMixBoxes, half_area_box

    rng = np.random.default_rng(0)
    for shape in ((32, 48), (33, 513), (4, 16, 20)):
        box = half_area_box(rng, shape)
        h, w = shape[-2:]
        ys, xs = np.nonzero(box.reshape(-1, h, w)[0])
        assert box.reshape(-1, h, w).all(axis=0).sum() == box.reshape(-1, h, w)[0].sum()  # every slice alike
        assert (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1) == box.reshape(-1, h, w)[0].sum()
        width = xs.max() - xs.min() + 1
        assert int(w / 2 + 1) <= width < w and ys.max() - ys.min() + 1 == round(h * w / 2 / width)
    boxes = CutMixBoxes("ddfp", 0.5, seed=3, group=4)
    mixed = [[boxes(np.random.default_rng(i), i, (16, 16)).any() for i in range(g * 4, g * 4 + 4)] for g in range(200)]
    assert all(len(set(group)) == 1 for group in mixed)  # one draw per batch
    assert 70 < sum(group[0] for group in mixed) < 130
    # The trainer streams one unlabeled batch for ddfp, and each sample is mixed with the next one.
    cfg = config_from_dict(ddfp_config(tiny_volumes, "ddfp"))
    assert cfg.method.cutmix == "ddfp" and build_method(cfg, None).unlabeled_per_batch == 1
    trainer = Trainer(cfg, Path("/nonexistent/never-written"), progress=False)
    # (none before start_iter: the official schedule's supervised phase draws no unlabeled batch)
    assert next(trainer.batches(0))[1] is None
    _, unlabeled = next(trainer.batches(trainer.method.flow_start))
    assert unlabeled["weak"].shape[0] == cfg.data.unlabeled_batch_size
    t = torch.arange(3)
    assert trainer.method.partner(t, 3).tolist() == [1, 2, 0]
    with pytest.raises(Exception, match="method.cutmix"):
        config_from_dict({**ddfp_config(tiny_volumes, "daw_ddfp"), "method": {"name": "daw_ddfp", "cutmix": "ddfp"}})
