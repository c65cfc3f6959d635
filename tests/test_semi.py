"""Semi-supervised training: views, CutMix, losses and short real runs of each method."""

import json

import numpy as np
import pytest
import torch

from mitoseg.config import StrongConfig, config_from_dict
from mitoseg.data.transforms import cutmix_box, strong_transform
from mitoseg.engine.trainer import Trainer
from mitoseg.errors import MitosegError
from mitoseg.methods.pseudo_label import cutmix, pseudo_label_quality, weighted_cross_entropy

from conftest import tiny_config_dict


def test_cutmix_keeps_image_pseudo_label_and_weight_aligned():
    rng = np.random.default_rng(0)
    b, h, w = 4, 24, 24
    boxes = torch.from_numpy(np.stack([cutmix_box(rng, (h, w), prob=1.0) for _ in range(b)]))
    assert boxes.sum() > 0
    image_u, image_mix = torch.zeros(b, 1, h, w), torch.ones(b, 1, h, w)
    label_u, label_mix = torch.zeros(b, h, w, dtype=torch.long), torch.ones(b, h, w, dtype=torch.long)
    weight_u, weight_mix = torch.full((b, h, w), 0.25), torch.full((b, h, w), 0.75)
    image = cutmix(image_u, image_mix, boxes)
    label = cutmix(label_u, label_mix, boxes)
    weight = cutmix(weight_u, weight_mix, boxes)
    assert torch.equal(image[:, 0].long(), label)
    assert torch.equal((weight == 0.75).long(), label)
    assert torch.equal(label, boxes.long())


def test_cutmix_box_is_a_single_rectangle_and_respects_its_probability():
    rng = np.random.default_rng(3)
    for _ in range(20):
        box = cutmix_box(rng, (32, 48), prob=1.0)
        ys, xs = np.nonzero(box)
        assert box.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        assert 0.02 * 32 * 48 * 0.5 <= box.sum() <= 0.4 * 32 * 48
    assert sum(cutmix_box(rng, (16, 16), prob=0.5).any() for _ in range(400)) in range(150, 250)
    assert not cutmix_box(rng, (16, 16), prob=0.0).any()


def test_strong_view_changes_intensities_only():
    weak = torch.rand(1, 32, 32)
    off = StrongConfig(brightness=0, contrast=0, gamma=[1.0, 1.0], blur_sigma=[0.0, 0.0], noise_std=0)
    torch.testing.assert_close(strong_transform(off)({"image": weak.clone()})["image"], weak)
    transform = strong_transform(StrongConfig(prob=1.0, blur_prob=1.0))
    transform.set_random_state(seed=1)
    strong = transform({"image": weak.clone()})["image"]
    assert strong.shape == weak.shape and not torch.allclose(strong, weak)


def test_weighted_cross_entropy_divides_by_valid_pixels():
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    weight = (torch.rand(2, 4, 4) > 0.5).float()
    valid = torch.rand(2, 4, 4) > 0.3
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    expected = (ce * weight * valid).sum() / valid.sum()
    torch.testing.assert_close(weighted_cross_entropy(logits, target, weight, valid), expected)
    assert weighted_cross_entropy(logits, target, torch.zeros_like(weight), valid) == 0


def test_pseudo_label_quality_counts_the_trade_off():
    pseudo = torch.tensor([1, 1, 0, 0])
    truth = torch.tensor([1, 0, 0, 1])
    used = torch.tensor([True, True, False, False])
    quality = pseudo_label_quality(used, pseudo, truth, torch.ones(4, dtype=torch.bool))
    assert quality["wrong_used"].item() == pytest.approx(0.5)  # wrong: idx 1 (used), 3 (not)
    assert quality["correct_discarded"].item() == pytest.approx(0.5)  # correct: idx 0 (used), 2 (not)


def semi_config(volumes, method, **train):
    cfg = tiny_config_dict(volumes, inspect_every=3, **train)
    cfg["method"] = {"name": method}
    cfg["data"]["train"]["slices"] = "0:3"
    cfg["data"]["unlabeled"] = [{"slices": "3:8", "label": str(volumes["train_label"])}]
    cfg["data"]["unlabeled_batch_size"] = 2
    return cfg


@pytest.mark.parametrize("method", ["fixmatch", "unimatch", "daw"])
def test_short_semi_supervised_run_logs_threshold_mask_ratio_and_writes_inspection_files(
        method, tmp_path, tiny_volumes):
    out = tmp_path / method
    summary = Trainer(config_from_dict(semi_config(tiny_volumes, method)), out, progress=False).fit()
    assert summary["completed"]
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    for record in train:
        assert 0.0 <= record["mask_ratio"] <= 1.0
        assert 0.0 <= record["wrong_used"] <= 1.0 and 0.0 <= record["correct_discarded"] <= 1.0
        assert "tau" in record
    if method == "daw":
        assert all(k in train[-1] for k in ("safe_tau", "mu_pos", "mu_neg", "sigma_pos", "sigma_neg", "loss_fp"))
    else:
        assert all(r["tau"] == pytest.approx(0.95) for r in train)
    files = sorted(p.name for p in (out / "inspect").iterdir())
    assert files == ["iter_000003.json", "iter_000003.npz", "iter_000006.json", "iter_000006.npz"]
    arrays = np.load(out / "inspect" / "iter_000006.npz")
    meta = json.loads((out / "inspect" / "iter_000006.json").read_text())
    assert arrays["image"].shape == arrays["confidence"].shape == arrays["pseudo_label"].shape == (4, 32, 32)
    assert arrays["label"].shape == (4, 32, 32)
    np.testing.assert_array_equal(arrays["weight"], arrays["confidence"] >= arrays["tau"])
    assert meta["used_pixels"] == int(arrays["weight"].sum())
    assert meta["used_pixels"] + meta["discarded_pixels"] == 4 * 32 * 32
    assert arrays["hist_positive"].sum() + arrays["hist_negative"].sum() == 2 * 32 * 32


def test_resume_restores_the_daw_state_and_reaches_the_same_weights(tmp_path, tiny_volumes):
    cfg = semi_config(tiny_volumes, "daw")
    Trainer(config_from_dict(cfg), tmp_path / "full", progress=False).fit()
    Trainer(config_from_dict(cfg), tmp_path / "split", max_iters=4, progress=False).fit()
    resumed = Trainer(config_from_dict(cfg), tmp_path / "split", resume=True, progress=False)
    saved = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["method"]["daw"]
    for name, value in saved.items():
        assert torch.equal(value, resumed.method.daw.state_dict()[name]), name
    resumed.fit()
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, tensor in a["method"]["daw"].items():
        assert torch.equal(tensor, b["method"]["daw"][name]), name


def test_default_unlabeled_slices_are_the_unselected_training_slices(tmp_path, tiny_volumes):
    cfg = semi_config(tiny_volumes, "fixmatch")
    del cfg["data"]["unlabeled"]
    trainer = Trainer(config_from_dict(cfg), tmp_path / "run", progress=False)
    assert trainer.data.unlabeled.sources[0].indices == [3, 4, 5, 6, 7]
    assert trainer.data.unlabeled.sources[0].label is None
    cfg["data"]["train"]["slices"] = None
    with pytest.raises(MitosegError, match="needs unlabeled slices"):
        Trainer(config_from_dict(cfg), tmp_path / "run2", progress=False)


class SignModel(torch.nn.Module):
    """Class 1 where the image is positive, class 0 elsewhere, with near-certainty: its pseudo-labels
    are a known function of the pixels. ``sign = -1`` predicts the opposite. Records the train/eval
    mode of every call."""

    def __init__(self, sign: float = 1.0):
        super().__init__()
        self.sign = sign
        self.scale = torch.nn.Parameter(torch.tensor(20.0))
        self.modes = []

    def features(self, x):
        self.modes.append(self.training)
        return torch.cat([-x, x], 1) * self.scale * self.sign

    def logits(self, features, size, perturbed=False):
        return features

    def forward(self, x):
        return self.logits(self.features(x), x.shape[-2:])


def sign_batches(n=2, size=16, seed=0, strong_sign=1.0):
    """A labeled batch the sign model gets right, and unlabeled views whose strong views are the weak
    view times ``strong_sign``, each with its own CutMix box."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    def away_from_zero(*shape):  # |pixel| >= 0.5: the sign model is certain everywhere
        return torch.randn(*shape, generator=g).sign() * (0.5 + torch.rand(*shape, generator=g))

    image = away_from_zero(n, 1, size, size)
    weak = away_from_zero(2 * n, 1, size, size)
    boxes = [torch.from_numpy(np.stack([cutmix_box(rng, (size, size), prob=1.0) for _ in range(2 * n)]))
             for _ in range(2)]
    assert not torch.equal(boxes[0], boxes[1])
    unlabeled = {"weak": weak, "strong1": weak * strong_sign, "strong2": weak * strong_sign,
                 "box1": boxes[0], "box2": boxes[1], "valid": torch.ones(2 * n, size, size, dtype=torch.bool)}
    return {"image": image, "label": (image[:, 0] > 0).long()}, unlabeled


def sign_method(name: str, **method):
    from mitoseg.losses import make_supervised_loss
    from mitoseg.methods import build_method

    cfg = config_from_dict({"data": {"train": {"image": "x.tif", "label": "y.tif"}},
                            "train": {"loss": "ce"}, "method": {"name": name, "threshold": 0.5, **method}})
    return build_method(cfg, make_supervised_loss(cfg.train))


@pytest.mark.parametrize("name", ["fixmatch", "unimatch", "daw"])
def test_strong_views_learn_the_pseudo_labels_cutmixed_with_their_own_boxes(name):
    # The student predicts every mixed strong view exactly as its pseudo-labels say only if the labels
    # were pasted with that view's box: with the other view's box, or unmixed, the loss is large.
    from mitoseg.methods import StepContext

    student = SignModel()
    ctx = StepContext(student=student, teacher=SignModel(), iteration=0, total_iterations=10)
    labeled, unlabeled = sign_batches()
    out = sign_method(name).training_step(ctx, labeled, unlabeled)
    assert float(out.logs["loss_s"]) < 1e-6
    assert float(out.logs["mask_ratio"]) > 0.9
    # Strong views that contradict the weak view do cost: the loss sees the pixels.
    labeled, contradicting = sign_batches(strong_sign=-1.0)
    assert float(sign_method(name).training_step(ctx, labeled, contradicting).logs["loss_s"]) > 1.0


@pytest.mark.parametrize("name,weights", [("fixmatch", (1, 1, 0)), ("unimatch", (1, 1, 1)), ("daw", (1, 1, 1))])
def test_losses_combine_with_the_documented_weights(name, weights):
    # fixmatch: (L_x + L_s) / 2; unimatch and daw: (L_x + 0.25 L_s1 + 0.25 L_s2 + 0.5 L_fp) / 2, where
    # 0.25 L_s1 + 0.25 L_s2 = 0.5 * mean(L_s) (the logged loss_s).
    from mitoseg.methods import StepContext

    torch.manual_seed(0)
    student = SignModel()
    ctx = StepContext(student=student, teacher=SignModel(), iteration=0, total_iterations=10)
    labeled, unlabeled = sign_batches(strong_sign=-1.0)
    labeled["label"][:, :4] = 1 - labeled["label"][:, :4]  # a non-zero supervised loss too
    out = sign_method(name).training_step(ctx, labeled, unlabeled)
    logs = out.logs
    assert float(logs["loss_x"]) > 0.1 and float(logs["loss_s"]) > 0.1
    w_x, w_s, w_fp = weights
    if name == "fixmatch":
        expected = (logs["loss_x"] + logs["loss_s"]) / 2
        assert "loss_fp" not in logs
    else:
        assert float(logs["loss_fp"]) > 0
        expected = (logs["loss_x"] + 0.5 * logs["loss_s"] + 0.5 * logs["loss_fp"]) / 2
    torch.testing.assert_close(out.loss.detach(), expected)


@pytest.mark.parametrize("source", ["student", "teacher"])
def test_pseudo_labels_come_from_the_student_in_eval_mode_or_from_the_teacher(source):
    from mitoseg.methods import StepContext

    student, teacher = SignModel(), SignModel(sign=-1.0)  # the teacher disagrees everywhere
    student.train()
    ctx = StepContext(student=student, teacher=teacher, iteration=0, total_iterations=10)
    labeled, unlabeled = sign_batches()
    out = sign_method("unimatch", pseudo_labels=source).training_step(ctx, labeled, unlabeled)
    if source == "student":
        assert float(out.logs["loss_s"]) < 1e-6
        assert student.modes[0] is False  # the weak views were predicted in eval mode ...
        assert student.training and all(student.modes[1:])  # ... and train mode is back for the rest
        assert teacher.modes == []
    else:
        assert float(out.logs["loss_s"]) > 1.0  # the student is trained toward the teacher's labels
        assert len(teacher.modes) == 1


class ModeModel(SignModel):
    """The sign model in train mode, its opposite in eval mode: which forward gave a pseudo-label shows."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def features(self, x):
        self.batch_sizes.append(x.shape[0])
        return super().features(x) * (1.0 if self.training else -1.0)


@pytest.mark.parametrize("name", ["fixmatch", "unimatch", "daw"])
def test_student_train_takes_the_batch_pseudo_labels_from_the_train_mode_forward(name):
    from mitoseg.methods import StepContext

    losses = {}
    for source in ("student_train", "student"):
        student = ModeModel()
        student.train()
        ctx = StepContext(student=student, teacher=SignModel(), iteration=0, total_iterations=10)
        labeled, unlabeled = sign_batches()
        out = sign_method(name, pseudo_labels=source).training_step(ctx, labeled, unlabeled)
        losses[source] = float(out.logs["loss_s"])
        if source == "student_train":
            # Without gradient only the mixing batch, in eval mode; the weak batch rides with the labeled one.
            assert student.modes[0] is False and student.batch_sizes[0] == 2
            assert all(student.modes[1:]) and student.batch_sizes[1] == 2 + 2
        else:
            assert student.modes[0] is False and student.batch_sizes[0] == 4  # both halves in eval mode
    # The strong views equal the weak ones: train-mode pseudo-labels are what the student predicts on them
    # outside the CutMix boxes, eval-mode ones are the opposite everywhere.
    assert losses["student_train"] < 0.6 * losses["student"]


class BackboneFPModel(SignModel):
    """The sign model with UniMatch's ``features_with_fp``: the perturbed features of row i are the clean ones
    of row i negated and scaled by ``1 + i`` (every row its own), so which rows became the fp prediction shows."""

    def __init__(self):
        super().__init__()
        self.fp_calls = []

    def features_with_fp(self, x, p):
        self.fp_calls.append((x.shape[0], p))
        features = self.features(x)
        scale = torch.arange(1, x.shape[0] + 1, dtype=features.dtype).reshape(-1, 1, 1, 1)
        return features, -features * scale


@pytest.mark.parametrize("name", ["unimatch", "daw"])
def test_backbone_fp_placement_takes_the_weak_views_part_of_the_dropped_whole_batch(name):
    # UniMatch (unimatch.py): preds, preds_fp = model(cat(img_x, img_u_w), need_fp=True); pred_u_w_fp =
    # preds_fp[num_lb:]. With the model above the fp logits of weak image j are -(1 + n_x + j) * clean logits.
    import torch.nn.functional as F

    from mitoseg.losses import make_supervised_loss
    from mitoseg.methods import StepContext, build_method

    cfg = config_from_dict({"data": {"kind": "pascal", "root": "voc", "split": "92", "num_classes": 2},
                            "model": {"name": "deeplabv3plus", "in_channels": 3},
                            "method": {"name": name, "threshold": 0.5, "fp_dropout": 0.3}})
    assert cfg.method.fp_placement == "backbone"  # the default for deeplabv3plus
    method = build_method(cfg, make_supervised_loss(cfg.train))
    student = BackboneFPModel()
    ctx = StepContext(student=student, teacher=SignModel(), iteration=0, total_iterations=10)
    labeled, unlabeled = sign_batches()
    n_x, n_u = 2, 2
    out = method.training_step(ctx, labeled, unlabeled)
    assert student.fp_calls == [(n_x + n_u, 0.3)]  # one call on [labeled, weak]
    weak = unlabeled["weak"][:n_u]
    clean = student.features(weak)
    scale = torch.arange(n_x + 1, n_x + n_u + 1, dtype=clean.dtype).reshape(-1, 1, 1, 1)
    # The sign model is certain everywhere: every pseudo-label is its clean argmax, used with weight 1 (DAW's
    # threshold starts at 0.95, below the model's confidence; alignment keeps the argmax of a near one-hot).
    expected = F.cross_entropy(-clean * scale, clean.argmax(dim=1))
    torch.testing.assert_close(out.logs["loss_fp"], expected)
    # head_input keeps the old branch: the weak view's features(x) after channel dropout, no features_with_fp.
    cfg.method.fp_placement = "head_input"
    student = BackboneFPModel()
    ctx = StepContext(student=student, teacher=SignModel(), iteration=0, total_iterations=10)
    method = build_method(cfg, make_supervised_loss(cfg.train))
    out = method.training_step(ctx, labeled, unlabeled)
    # Dropout keeps the signs or zeroes a sample's logits: at most log 2 per pixel (the backbone branch: > 100).
    assert student.fp_calls == [] and float(out.logs["loss_fp"]) <= np.log(2) + 1e-6


def test_student_train_is_the_default_except_for_ddfp_which_cannot_use_it():
    base = {"data": {"train": {"image": "x"}}}
    for name in ("fixmatch", "unimatch", "daw", "daw_ddfp"):
        assert config_from_dict({**base, "method": {"name": name}}).method.pseudo_labels == "student_train"
    assert config_from_dict({**base, "method": {"name": "ddfp"}}).method.pseudo_labels == "teacher"
    with pytest.raises(MitosegError, match="student_train"):
        config_from_dict({**base, "method": {"name": "ddfp", "pseudo_labels": "student_train"}})


def test_daw_threshold_and_gaussians_move_during_training_steps():
    from mitoseg.methods import StepContext

    method = sign_method("daw", daw={"momentum": 0.9})
    ctx = StepContext(student=SignModel(), teacher=SignModel(), iteration=0, total_iterations=10)
    before = {k: float(v) for k, v in method.daw.log_values().items()}
    for seed in range(5):
        labeled, unlabeled = sign_batches(seed=seed)
        # Some wrong predictions, less confident than the right ones: both Gaussians move, and apart.
        labeled["image"][:, :, :3] *= 0.05
        labeled["label"][:, :3] = 1 - labeled["label"][:, :3]
        out = method.training_step(ctx, labeled, unlabeled)
    after = {k: float(v) for k, v in method.daw.log_values().items()}
    assert after["mu_pos"] > before["mu_pos"] + 0.02 and after["mu_neg"] > before["mu_neg"] + 0.02
    assert after["tau"] != before["tau"]
    assert float(out.logs["tau"]) == after["tau"]
