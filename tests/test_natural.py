"""Natural-image benchmarks: Pascal VOC / Cityscapes layouts, split lists, views, evaluation, one step per method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mitoseg.config import config_from_dict
from mitoseg.data.factory import check_paths_exist
from mitoseg.data import natural
from mitoseg.inference import images
from mitoseg.engine.trainer import Trainer
from mitoseg.errors import MitosegError

from conftest import assert_one_line_error, run_cli

pytestmark = pytest.mark.filterwarnings("ignore:model.pretrained is not set")


def _image(rng, h, w) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def make_pascal(root: Path, n_labeled=2, n_unlabeled=4, n_val=2, size=(48, 64), seed=0) -> Path:
    """A tiny Pascal VOC layout (JPEGImages/*.jpg, palette SegmentationClass/*.png with 0-20 and 255 borders)
    and a split folder ``root/split`` with labeled.txt, unlabeled.txt and val.txt."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    names = [f"2007_{i:06d}" for i in range(n_labeled + n_unlabeled + n_val)]
    h, w = size
    palette = list(rng.integers(0, 256, 768, dtype=np.uint8))
    for name in names:
        _image(rng, h, w).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(1, 21)
        mask[:2] = 255  # object borders / "void" in the preprocessed masks
        png = Image.fromarray(mask, mode="P")
        png.putpalette(palette)
        png.save(root / "SegmentationClass" / f"{name}.png")
    lines = [f"JPEGImages/{n}.jpg SegmentationClass/{n}.png" for n in names]
    split = root / "split"
    split.mkdir(exist_ok=True)
    (split / "labeled.txt").write_text("\n".join(lines[:n_labeled]) + "\n")
    (split / "unlabeled.txt").write_text("\n".join(lines[n_labeled:n_labeled + n_unlabeled]))
    (split / "val.txt").write_text("\n".join(lines[n_labeled + n_unlabeled:]) + "\n")
    return split


def make_cityscapes(root: Path, size=(32, 64), seed=0) -> Path:
    """leftImg8bit/ + gtFine/ with labelTrainIds for the first image and only labelIds for the others."""
    rng = np.random.default_rng(seed)
    h, w = size
    lines = []
    for i, (split, city) in enumerate([("train", "aachen"), ("train", "bochum"), ("train", "bochum"),
                                       ("val", "frankfurt")]):
        stem = f"{city}_000000_{i:06d}"
        image = root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
        gt = root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        gt.parent.mkdir(parents=True, exist_ok=True)
        _image(rng, h, w).save(image)
        label_ids = np.full((h, w), 7, dtype=np.uint8)  # road
        label_ids[:, w // 2:] = 26  # car
        label_ids[: h // 4] = 0  # unlabeled -> 255
        label_ids[-2:] = 33  # bicycle
        if i == 0:
            Image.fromarray(natural.CITYSCAPES_LABEL_TO_TRAIN[label_ids]).save(gt)
        else:
            Image.fromarray(label_ids).save(str(gt).replace("_labelTrainIds", "_labelIds"))
        lines.append(f"{image.relative_to(root)} {gt.relative_to(root)}")
    folder = root / "split"
    folder.mkdir(exist_ok=True)
    (folder / "labeled.txt").write_text("\n".join(lines[:1]) + "\n")
    (folder / "unlabeled.txt").write_text("\n".join(lines[1:3]) + "\n")
    (folder / "val.txt").write_text(lines[3] + "\n")
    return folder


def tiny_natural_config(root: Path, split: Path, method="supervised", kind="pascal", **train) -> dict:
    """A DeepLabV3+ (ResNet-50 layout at width 8) on 32-pixel crops: one step in about a second."""
    return {
        "seed": 0,
        "device": "cpu",
        "data": {"kind": kind, "root": str(root), "split": str(split), "num_classes": 21 if kind == "pascal" else 19,
                 "crop_size": 32, "batch_size": 2, "unlabeled_batch_size": 2},
        "model": {"name": "deeplabv3plus", "in_channels": 3, "backbone": "resnet50", "width": 8, "deep_stem": True,
                  "feature_channels": 16, "head_channels": 16},
        "method": {"name": method, "ddfp": {"start_iter": 0, "hidden": 16, "blocks": 1, "max_pixels": 512}},
        "optim": {"name": "sgd", "lr": 0.01, "head_lr_multiplier": 10.0},
        "train": {"iterations": 1, "loss": "ce", "val_every": 1, "log_every": 1, "checkpoint_every": 1,
                  "inspect_every": 1, "inspect_patches": 2, **train},
        "inference": {"sw_batch_size": 2, "overlap": 0.333, "blend": "constant"},
    }


@pytest.fixture(scope="module")
def pascal(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    return root, make_pascal(root)


# ------------------------------------------------------------------------------ lists


def test_shipped_split_lists_resolve_with_their_standard_sizes(tmp_path):
    cfg = config_from_dict({"data": {"kind": "pascal", "root": str(tmp_path), "split": "92", "num_classes": 21},
                            "model": {"in_channels": 3}})
    lists = natural.resolve_lists(cfg.data)
    assert len(natural.read_list(lists.labeled, tmp_path, need_mask=True)) == 92
    assert len(natural.read_list(lists.unlabeled, tmp_path, need_mask=False)) == 10582 - 92
    assert len(natural.read_list(lists.val, tmp_path, need_mask=True)) == 1449
    cfg = config_from_dict({"data": {"kind": "cityscapes", "root": str(tmp_path), "split": "1_30", "num_classes": 19},
                            "model": {"in_channels": 3}})
    lists = natural.resolve_lists(cfg.data)
    labeled = natural.read_list(lists.labeled, tmp_path, need_mask=True)
    assert len(labeled) == 100 and labeled[0][1].name.endswith("_gtFine_labelTrainIds.png")
    assert len(natural.read_list(lists.val, tmp_path, need_mask=True)) == 500
    for kind, names in natural.SHIPPED_SPLITS.items():
        for name in names:
            assert (natural.splits_dir() / kind / name / "labeled.txt").is_file(), (kind, name)


def test_own_list_files_and_clear_errors(tmp_path, pascal):
    root, split = pascal
    cfg = config_from_dict(tiny_natural_config(root, split))
    check_paths_exist(cfg)
    lists = natural.resolve_lists(cfg.data)
    assert lists.labeled == split / "labeled.txt" and lists.val == split / "val.txt"
    items = natural.read_list(lists.labeled, root, need_mask=True)
    assert items[0] == (root / "JPEGImages" / "2007_000000.jpg", root / "SegmentationClass" / "2007_000000.png")
    bad = tmp_path / "bad.txt"
    bad.write_text("JPEGImages/a.jpg\n")
    with pytest.raises(MitosegError, match="bad.txt:1: expected 'IMAGE MASK'"):
        natural.read_list(bad, root, need_mask=True)
    with pytest.raises(MitosegError, match="neither a shipped pascal split"):
        natural.resolve_lists(config_from_dict({"data": {"kind": "pascal", "root": str(root), "split": "7"},
                                                "model": {"in_channels": 3}}).data)
    with pytest.raises(MitosegError, match="data.root"):
        config_from_dict({"data": {"kind": "pascal", "split": "92"}, "model": {"in_channels": 3}})
    missing_root = tiny_natural_config(tmp_path / "nowhere", split)
    with pytest.raises(MitosegError, match="data.root.*folder not found"):
        check_paths_exist(config_from_dict(missing_root))


# ------------------------------------------------------------------------ masks, views


def test_cityscapes_label_ids_map_to_train_ids_and_train_ids_are_read_as_they_are(tmp_path):
    split = make_cityscapes(tmp_path)
    items = natural.read_list(split / "unlabeled.txt", tmp_path, need_mask=True)
    listed = items[0][1]
    assert listed.name.endswith("_labelTrainIds.png") and not listed.exists()
    mask = np.array(natural.read_mask(listed, 19))  # falls back to *_labelIds.png and maps
    assert mask[0, 0] == 255  # id 0 (unlabeled) -> ignore
    assert mask[-1, 0] == 18  # bicycle
    assert mask[20, 0] == 0 and mask[20, -1] == 13  # road, car
    train_ids = natural.read_list(split / "labeled.txt", tmp_path, need_mask=True)[0][1]
    np.testing.assert_array_equal(np.array(natural.read_mask(train_ids, 19)), mask)
    lut = natural.CITYSCAPES_LABEL_TO_TRAIN
    assert sorted(set(lut.tolist()) - {255}) == list(range(19))


def test_mask_values_outside_the_classes_are_an_error(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray(np.full((4, 4), 30, dtype=np.uint8)).save(path)
    with pytest.raises(MitosegError, match=r"mask values \[30\]"):
        natural.read_mask(path, 21)


def test_labeled_samples_keep_ignore_pad_with_255_and_are_a_function_of_seed_and_index(pascal):
    root, split = pascal
    cfg = config_from_dict(tiny_natural_config(root, split))
    cfg.data.crop_size = 140  # larger than the 48 x 64 images even at scale 2: padding
    items = natural.read_list(split / "labeled.txt", root, need_mask=True)
    dataset = natural.NaturalLabeledDataset(items, cfg.data, seed=0, length=100)
    a, b = dataset[5], dataset[5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert a["image"].shape == (3, 140, 140) and a["image"].dtype == torch.float32
    assert a["label"].shape == (140, 140) and a["label"].dtype == torch.int64
    values = set(torch.unique(a["label"]).tolist())
    assert 255 in values and values <= set(range(21)) | {255}
    # Epochs visit every image once, in a seeded order.
    assert sorted(dataset.item_index(i) for i in range(len(items))) == list(range(len(items)))
    # With no rescale and a crop as large as the image, the ignore border survives intact.
    cfg.data.scale_range, cfg.data.crop_size = [1.0, 1.0], 48
    exact = natural.NaturalLabeledDataset(items, cfg.data, seed=0, length=10)[0]["label"]
    assert (exact == 255).sum() == 2 * 48


def test_unlabeled_views_mark_padding_invalid_and_strong_views_differ(pascal):
    root, split = pascal
    cfg = config_from_dict(tiny_natural_config(root, split))
    cfg.data.crop_size = 140
    items = natural.read_list(split / "unlabeled.txt", root, need_mask=False)
    dataset = natural.NaturalUnlabeledDataset(items, cfg.data, seed=1, length=10)
    sample = dataset[3]
    assert set(sample) == {"weak", "strong1", "strong2", "box1", "box2", "valid"}
    assert sample["weak"].shape == sample["strong1"].shape == (3, 140, 140)
    assert sample["valid"].dtype == torch.bool and 0 < sample["valid"].sum() < 140 * 140
    assert sample["box1"].dtype == torch.uint8 and sample["box1"].shape == (140, 140)
    assert any(not torch.equal(sample["weak"], dataset[i]["strong1"]) for i in range(3, 6))
    assert torch.equal(dataset[3]["strong2"], sample["strong2"])
    # Padding is zero in the image before normalisation: -mean/std after.
    padded = ~sample["valid"]
    expected = torch.from_numpy(-natural.IMAGENET_MEAN / natural.IMAGENET_STD)
    torch.testing.assert_close(sample["weak"][:, padded][:, 0], expected)


# ------------------------------------------------------------------------- evaluation


def test_sliding_window_evaluation_equals_full_image_when_the_window_covers_the_image(pascal):
    from mitoseg.networks import build_model

    root, split = pascal
    cfg = config_from_dict(tiny_natural_config(root, split))
    cfg.data.crop_size = 64  # >= both sides of the 48 x 64 images: one window, clamped to the image
    torch.manual_seed(0)
    model = build_model(cfg.model, 21).eval()
    items = natural.read_list(split / "val.txt", root, need_mask=True)
    dataset = natural.NaturalEvalDataset(items, cfg.data, "full")
    image, _ = dataset[0]
    full = images.predict_image(model, image[None], "full", cfg.inference, 64, torch.device("cpu"))
    sliding = images.predict_image(model, image[None], "sliding_window", cfg.inference, 64, torch.device("cpu"))
    torch.testing.assert_close(sliding, full)
    a = images.evaluate(model, dataset, cfg, torch.device("cpu"), mode="full")
    b = images.evaluate(model, dataset, cfg, torch.device("cpu"), mode="sliding_window")
    assert torch.equal(a, b) and a.sum() == 2 * (48 * 64 - 2 * 64)  # the ignore rows are not counted
    # Smaller windows still cover every pixel once blended.
    cfg.data.crop_size = 24
    small = images.predict_image(model, image[None], "sliding_window", cfg.inference, 24, torch.device("cpu"))
    assert small.shape == full.shape
    torch.testing.assert_close(small.sum(1), torch.ones(1, 48, 64))


def test_center_crop_evaluation_crops_image_and_label(pascal):
    root, split = pascal
    cfg = config_from_dict(tiny_natural_config(root, split))
    cfg.data.crop_size = 40
    items = natural.read_list(split / "val.txt", root, need_mask=True)
    image, label = natural.NaturalEvalDataset(items, cfg.data, "center_crop")[0]
    assert image.shape == (3, 40, 40) and label.shape == (40, 40)
    full_image, full_label = natural.NaturalEvalDataset(items, cfg.data, "full")[0]
    assert torch.equal(label, full_label[4:44, 12:52])


# ------------------------------------------------------------------------------ OHEM


def logits_with_true_class_probs(probs, labels, num_classes=3):
    """(1, K, 1, N) logits whose softmax gives each pixel's true class ``probs[i]`` (the rest shared equally
    by the other classes), and the (1, 1, N) labels; an ignored pixel (255) gets class 0's layout."""
    columns = []
    for p, label in zip(probs, labels):
        cls = 0 if label == 255 else label
        column = [(1 - p) / (num_classes - 1)] * num_classes
        column[cls] = p
        columns.append(column)
    logits = torch.tensor(columns, dtype=torch.float64).log().T.reshape(1, num_classes, 1, -1)
    return logits.float(), torch.tensor(labels).reshape(1, 1, -1)


def mean_nll(probs):
    return float(-np.log(np.array(probs)).mean())


# True-class probabilities of 6 valid pixels (classes 0, 1, 2) and one ignored pixel.
OHEM_P = [0.9, 0.1, 0.6, 0.95, 0.3, 0.8, 0.5]
OHEM_LABELS = [0, 1, 2, 1, 0, 2, 255]


@pytest.mark.parametrize("thresh, min_kept, kept", [
    # the 2nd / 3rd smallest p (0.3 / 0.6) is below 0.7: the threshold stays 0.7 (3 valid pixels below it)
    (0.7, 2, [0.1, 0.6, 0.3]),
    (0.7, 3, [0.1, 0.6, 0.3]),
    # min_kept 5: the 5th smallest p (0.9; the ignored pixel counts as p = 1) is above 0.7: threshold 0.9
    (0.7, 5, [0.9, 0.1, 0.6, 0.3, 0.8]),
    (0.7, 4, [0.1, 0.6, 0.3, 0.8]),
    # min_kept = number of valid pixels: the 6th smallest is 0.95, every valid pixel is kept
    (0.7, 6, [0.9, 0.1, 0.6, 0.95, 0.3, 0.8]),
    # more than the valid pixels (7 <= all pixels, 1000 > all pixels): no mining, plain CE over the valid ones
    (0.7, 7, [0.9, 0.1, 0.6, 0.95, 0.3, 0.8]),
    (0.7, 1000, [0.9, 0.1, 0.6, 0.95, 0.3, 0.8]),
    # min_kept 0: the official code skips the mining altogether
    (0.7, 0, [0.9, 0.1, 0.6, 0.95, 0.3, 0.8]),
    # a low threshold with min_kept 1: only p <= 0.2
    (0.2, 1, [0.1]),
])
def test_ohem_keeps_the_hard_pixels_as_the_official_prob_ohem_cross_entropy(thresh, min_kept, kept):
    # UniMatch / DAW util/ohem.py ProbOhemCrossEntropy2d: threshold = max(thresh, min_kept-th smallest true-class
    # probability) unless min_kept exceeds the valid pixels; mean CE over the valid pixels with p <= threshold.
    from mitoseg.losses import ohem_cross_entropy

    logits, labels = logits_with_true_class_probs(OHEM_P, OHEM_LABELS)
    loss = ohem_cross_entropy(logits, labels, 255, thresh, min_kept)
    assert float(loss) == pytest.approx(mean_nll(kept), rel=1e-5)


def test_ohem_keeps_ties_at_the_raised_threshold_and_gives_gradients_to_kept_pixels_only():
    from mitoseg.losses import ohem_cross_entropy

    # The two 0.8 pixels have the same class and logits: bitwise the same p.
    logits, labels = logits_with_true_class_probs([0.1, 0.8, 0.8, 0.9, 0.4], [1, 2, 2, 0, 255])
    logits.requires_grad_(True)
    loss = ohem_cross_entropy(logits, labels, 255, 0.7, 2)  # 2nd smallest p = 0.8: both 0.8 pixels are kept
    assert float(loss.detach()) == pytest.approx(mean_nll([0.1, 0.8, 0.8]), rel=1e-5)
    loss.backward()
    touched = logits.grad.abs().sum(dim=(0, 1, 2))
    assert [bool(t > 0) for t in touched] == [True, True, True, False, False]
    # Every pixel ignored: NaN, as cross-entropy with ignore_index.
    logits, labels = logits_with_true_class_probs([0.5, 0.5], [255, 255])
    assert torch.isnan(ohem_cross_entropy(logits, labels, 255, 0.7, 1))


def test_ohem_loss_from_the_config_on_a_batch_of_images():
    from mitoseg.losses import make_supervised_loss

    # Two 2 x 3 images, two classes; the true-class probability of each pixel is sigmoid(+-z).
    z = torch.tensor([[[2.0, -1.0, 0.5], [3.0, 0.0, -2.0]], [[1.0, 4.0, -0.5], [0.2, 2.5, 1.5]]])
    labels = torch.tensor([[[0, 1, 0], [1, 255, 0]], [[1, 1, 0], [0, 255, 1]]])
    logits = torch.stack([z, torch.zeros_like(z)], dim=1)  # class 0 logit z, class 1 logit 0
    p_true = torch.where(labels == 0, torch.sigmoid(z), torch.sigmoid(-z))
    valid = labels != 255
    cfg = config_from_dict({"data": {"kind": "cityscapes", "root": "cs", "split": "1_16", "num_classes": 19},
                            "model": {"in_channels": 3},
                            "train": {"loss": "ohem", "ohem_thresh": 0.5, "ohem_min_kept": 6}})
    loss = make_supervised_loss(cfg.train)(logits, labels)
    p = sorted(float(v) for v in p_true[valid])  # 10 valid pixels
    threshold = max(0.5, p[5])  # the 6th smallest
    assert float(loss) == pytest.approx(mean_nll([v for v in p if v <= threshold]), rel=1e-5)
    cfg.train.ohem_min_kept = 11  # more than the valid pixels: every valid pixel
    assert float(make_supervised_loss(cfg.train)(logits, labels)) == pytest.approx(mean_nll(p), rel=1e-5)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", ["supervised", "fixmatch", "unimatch", "daw", "ddfp", "daw_ddfp"])
def test_one_training_iteration_per_method_on_pascal_layout(method, tmp_path, pascal):
    root, split = pascal
    out = tmp_path / method
    cfg = config_from_dict(tiny_natural_config(root, split, method))
    trainer = Trainer(cfg, out, progress=False)
    summary = trainer.fit()
    assert summary["completed"] and summary["iterations"] == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"][0]
    assert 0.0 <= val["miou"] <= 1.0 and "iou/aeroplane" in val and "iou/tvmonitor" in val
    assert summary["final"]["classes"][15] == "person"
    train = [r for r in records if r["split"] == "train"][0]
    assert np.isfinite(train["loss"])
    # Backbone at optim.lr, decoder and head at 10x (UniMatch's lr_multi).
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and groups[1]["initial_lr"] == pytest.approx(10 * groups[0]["initial_lr"])
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()
    if method != "supervised":
        assert (out / "inspect" / "iter_000001.npz").is_file()


def test_ddfp_trains_with_the_u2pl_decoder(tmp_path, pascal):
    # DDFP's network: the flow models the 2-block classifier's penultimate features, the perturbation moves the
    # 304-channel (here 48 + 8) decoder features.
    root, split = pascal
    cfg = tiny_natural_config(root, split, "ddfp", val_every=10, inspect_every=10)
    cfg["model"].update(decoder="u2pl", feature_channels=56, head_channels=16)
    trainer = Trainer(config_from_dict(cfg), tmp_path / "run", progress=False)
    assert trainer.model.seg_head.block[0].in_channels == 56 and len(trainer.model.seg_head.aux_bn) == 2
    summary = trainer.fit()
    assert summary["completed"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"][0]
    assert np.isfinite(train["loss"])


def test_cityscapes_layout_trains_and_evaluates_with_sliding_windows(tmp_path):
    split = make_cityscapes(tmp_path / "cs")
    cfg = tiny_natural_config(tmp_path / "cs", split, "daw", kind="cityscapes", iterations=1)
    cfg["data"]["batch_size"] = cfg["data"]["unlabeled_batch_size"] = 1
    cfg["data"]["crop_size"] = 24  # windows smaller than the 32 x 64 validation image
    cfg["train"]["amp"] = False  # full precision: the tiny network's windowed and whole-image predictions differ
    cfg["train"].update(loss="ohem", ohem_min_kept=100)  # the Cityscapes recipe's supervised loss
    trainer = Trainer(config_from_dict(cfg), tmp_path / "run", progress=False)
    assert trainer.data.validation.images.mode == "sliding_window"
    assert trainer.method.ignore_index == 255  # DAW's labeled statistics skip the ignored pixels under ohem too
    summary = trainer.fit()
    assert summary["final"]["classes"][13] == "car" and summary["final"]["pixels"] == 32 * 64 - 8 * 64


def test_epochs_set_iterations_from_the_unlabeled_list(tmp_path, pascal):
    root, split = pascal
    cfg = tiny_natural_config(root, split, "fixmatch", epochs=3)
    cfg["data"]["unlabeled_batch_size"] = 1
    trainer = Trainer(config_from_dict(cfg), tmp_path / "run", max_iters=1, progress=False)
    assert trainer.total_iterations == 3 * 4  # 4 unlabeled images, batch 1
    with pytest.raises(MitosegError, match="train.epochs"):
        config_from_dict({"train": {"epochs": 2}, "data": {"train": {"image": "x.tif", "label": "y.tif"}}})


def test_resume_on_natural_images_reaches_the_same_weights(tmp_path, pascal):
    root, split = pascal
    cfg = tiny_natural_config(root, split, "daw", iterations=2, val_every=10, inspect_every=10)
    Trainer(config_from_dict(cfg), tmp_path / "full", progress=False).fit()
    Trainer(config_from_dict(cfg), tmp_path / "split", max_iters=1, progress=False).fit()
    Trainer(config_from_dict(cfg), tmp_path / "split", resume=True, progress=False).fit()
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


@pytest.mark.parametrize("dataset", ["pascal", "cityscapes"])
def test_shipped_benchmark_configs_load_with_the_papers_settings(dataset):
    from mitoseg.config import BUILTIN_CONFIG_DIR as configs  # the configs shipped inside the package
    from mitoseg.config import load_config

    for method in ("supervised", "unimatch", "daw", "ddfp", "daw_ddfp"):
        cfg = load_config(configs / f"{dataset}_{method}.yaml")
        assert cfg.method.name == method and cfg.data.kind == dataset
        assert cfg.model.name == "deeplabv3plus" and cfg.model.backbone == "resnet101"
        assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4
        assert cfg.data.scale_range == [0.5, 2.0]
        # UniMatch's / DAW's configs/cityscapes.yaml: OHEM (thresh 0.7, min_kept 200000), also in supervised.py;
        # DDFP ships no Cityscapes config (its Pascal one: CELoss); Pascal: CELoss everywhere.
        ohem = dataset == "cityscapes" and method != "ddfp"
        assert cfg.train.loss == ("ohem" if ohem else "ce"), method
        assert (cfg.train.ohem_thresh, cfg.train.ohem_min_kept) == (0.7, 200000)
        # DDFP's decoder (model/model/decoder.py): 304-channel features, 256-channel classifier blocks.
        assert cfg.model.decoder == ("u2pl" if method == "ddfp" else "unimatch"), method
        if method == "ddfp":
            assert (cfg.model.feature_channels, cfg.model.head_channels) == (304, 256)
        # UniMatch's / DAW's fp branch drops the backbone features (daw_ddfp too, on the weak view).
        assert cfg.method.fp_placement == "backbone", method
        if dataset == "pascal":
            assert cfg.optim.head_lr_multiplier == 10.0 and cfg.data.crop_size in (321, 513)
            assert cfg.data.split in natural.SHIPPED_SPLITS["pascal"]
        else:
            assert cfg.data.crop_size == 801 and natural.eval_mode(cfg.data) == "sliding_window"
    if dataset == "pascal":  # DAW's configs/pascal.yaml and DDFP's config.yaml: crop_size 513 (UniMatch's: 321)
        for method in ("daw", "ddfp", "daw_ddfp"):
            assert load_config(configs / f"pascal_{method}.yaml").data.crop_size == 513, method
        assert load_config(configs / "pascal_unimatch.yaml").data.crop_size == 321
    # The values the fidelity issue names, method by method.
    for method in ("unimatch", "daw", "daw_ddfp"):
        cfg = load_config(configs / f"{dataset}_{method}.yaml")
        # UniMatch's / DAW's pseudo-labels: the train-mode forward, the partner batch in eval mode;
        # each unsupervised term divided by the valid pixels; UniMatch's CutMix from a second batch.
        assert (cfg.method.pseudo_labels, cfg.method.unsup_normalize, cfg.method.cutmix) == (
            "student_train", "valid", "unimatch"), method
    for method in ("daw", "daw_ddfp", "ddfp"):
        cfg = load_config(configs / f"{dataset}_{method}.yaml")
        # DAW's EMA(model, 0.999) / DDFP's ema_decay 0.999, both with the 1 - 1/(n + 1) warm-up, and the
        # better of student and EMA kept.
        assert (cfg.train.ema_decay, cfg.train.ema_warmup, cfg.train.eval_model) == (0.999, True, "best_of"), method
    ddfp = load_config(configs / f"{dataset}_ddfp.yaml")
    d = ddfp.method.ddfp
    assert (ddfp.method.pseudo_labels, ddfp.method.unsup_normalize, ddfp.method.cutmix) == (
        "teacher", "confident", "ddfp")
    assert (d.schedule, d.perturb_pixels, d.perturb_bn, d.mixbn_warmup, d.teacher_mode, d.flow_init) == (
        "official", "confident", "aux_train", True, "train", "official")
    # DDFP config.yaml: eps 4.0, flow n_blocks 2, layer_dims 256, clamping 2.0, lr 0.001, noise 0.05, grad_clip 50,
    # 20480 sampled features, threshold 0.95, sup_only_epoch = nf_start_epoch = 1 (start_iter: one epoch).
    assert (d.eps, d.blocks, d.hidden, d.clamp, d.lr, d.noise, d.grad_clip, d.max_pixels) == (
        4.0, 2, 256, 2.0, 0.001, 0.05, 50.0, 20480)
    assert ddfp.method.threshold == 0.95 and d.perturb_iter is None  # perturbation from 2 * start_iter


# ------------------------------------------------------------- mitoseg evaluate --checkpoint


def direct_scores(checkpoint: Path, dataset_root: Path, split: Path, mode: str, **data) -> tuple[dict, list]:
    """The scores of ``checkpoint``'s EMA weights computed without the CLI: model_from_checkpoint + the
    validation images + natural.evaluate, as JSON would hold them (NaN -> null)."""
    from mitoseg.networks.loading import model_from_checkpoint
    from mitoseg.runs import json_safe
    from mitoseg.metrics import scores_from_confusion

    model, cfg = model_from_checkpoint(checkpoint)
    for key, value in data.items():
        setattr(cfg.data, key, value)
    items = natural.read_list(split / "val.txt", dataset_root, need_mask=True)
    matrix = images.evaluate(model, natural.NaturalEvalDataset(items, cfg.data, mode), cfg, torch.device("cpu"),
                              amp=cfg.train.amp)  # the precision evaluate uses (bfloat16 on a CPU with it)
    names = natural.class_names(cfg.data.kind, cfg.data.num_classes)
    return json_safe(scores_from_confusion(matrix, names)), matrix.tolist()


def test_trained_pascal_checkpoint_evaluates_through_the_cli_in_full_and_center_crop_modes(tmp_path, pascal,
                                                                                              capsys):
    import yaml

    root, split = pascal
    config = tmp_path / "voc.yaml"
    config.write_text(yaml.safe_dump(tiny_natural_config(root, split, iterations=2)))
    run = tmp_path / "run"
    code, out, err = run_cli(["train", "--config", config, "--out", run, "--no-progress"], capsys)
    assert code == 0, err
    # train ends with the final validation table, one row per Pascal class by name.
    summary = json.loads((run / "summary.json").read_text())
    table = out[out.index("validation at iteration 2:"):]
    for name in natural.CLASS_NAMES["pascal"]:
        assert f"\n{name} " in table, name
    assert f"\nmean{summary['final']['miou']:>20.4f}" in table

    pixels = {"full": 2 * (48 * 64 - 2 * 64),  # the two ignore rows of each 48 x 64 image left out
              "center_crop": 2 * 32 * 32}  # crop_size 32 from rows 8..40: no ignore row inside
    for mode in ("full", "center_crop"):
        code, out, err = run_cli(["evaluate", "--checkpoint", run / "best.pt", "--eval-mode", mode, "--no-progress"],
                             capsys)
        assert code == 0, err
        report = json.loads((run / f"best_ema_{mode}_metrics.json").read_text())
        assert report["classes"] == natural.CLASS_NAMES["pascal"] and len(report["per_class"]["iou"]) == 21
        assert report["eval_mode"] == mode and report["images"] == 2 and report["pixels"] == pixels[mode]
        expected, matrix = direct_scores(run / "best.pt", root, split, mode)
        assert report["confusion_matrix"] == matrix
        assert report["per_class"] == expected["per_class"] and report["miou"] == expected["miou"]
        assert f"mIoU = {expected['miou']:.4f} (pascal, 2 images, {mode}" in out
        assert "\ntvmonitor " in out and "\nbackground " in out
        if mode == "full":
            # The training run validated best.pt's EMA weights the same way: the same numbers.
            assert report["per_class"] == json.loads(json.dumps(summary["best"]["scores"]["per_class"]))
    # center_crop is not full under another name.
    assert json.loads((run / "best_ema_full_metrics.json").read_text())["pixels"] != pixels["center_crop"]

    # An existing report is kept unless --overwrite.
    target = run / "best_ema_full_metrics.json"
    before = target.read_bytes()
    code, _, err = run_cli(["evaluate", "--checkpoint", run / "best.pt", "--eval-mode", "full", "--no-progress"], capsys)
    assert_one_line_error(code, err, str(target), "--overwrite")
    assert target.read_bytes() == before
    # --set changes the data: a num_classes that does not fit the weights is refused, nothing written.
    code, _, err = run_cli(["evaluate", "--checkpoint", run / "best.pt", "--set", "data.num_classes=19",
                        "--json", tmp_path / "x.json", "--no-progress"], capsys)
    assert_one_line_error(code, err, "19 classes", "21 classes")
    assert not (tmp_path / "x.json").exists()


def test_cityscapes_checkpoint_evaluates_with_sliding_windows_on_a_moved_data_root(tmp_path, capsys):
    import shutil

    split = make_cityscapes(tmp_path / "cs")
    cfg = tiny_natural_config(tmp_path / "cs", split, kind="cityscapes", iterations=1)
    cfg["data"]["crop_size"] = 24  # windows smaller than the 32 x 64 validation image
    cfg["train"]["amp"] = False  # full precision: the tiny network's windowed and whole-image predictions differ
    Trainer(config_from_dict(cfg), tmp_path / "run", progress=False).fit()
    checkpoint = tmp_path / "run" / "best.pt"
    # The data set moves after training: the stored data.root no longer exists ...
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "cs", moved)
    code, _, err = run_cli(["evaluate", "--checkpoint", checkpoint, "--no-progress"], capsys)
    assert_one_line_error(code, err, "data.root", str(tmp_path / "cs"))
    assert not list((tmp_path / "run").glob("*_metrics.json"))
    code, _, err = run_cli(["evaluate", "--checkpoint", checkpoint, "--image", tmp_path / "em.tif", "--no-progress"],
                           capsys)
    assert_one_line_error(code, err, "--image", "only for EM models", "cityscapes")
    # ... and --set points evaluation at the new place; Cityscapes defaults to sliding windows.
    code, out, err = run_cli(["evaluate", "--checkpoint", checkpoint, "--set", f"data.root={moved}",
                          "--set", f"data.split={moved / 'split'}", "--no-progress"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "run" / "best_ema_sliding_window_metrics.json").read_text())
    assert report["eval_mode"] == "sliding_window" and report["crop_size"] == 24
    assert report["classes"] == natural.CLASS_NAMES["cityscapes"] and "\ntraffic light " in out
    assert report["pixels"] == 32 * 64 - 8 * 64  # the top quarter is label id 0 -> ignored
    expected, matrix = direct_scores(checkpoint, moved, moved / "split", "sliding_window", root=str(moved))
    assert report["confusion_matrix"] == matrix and report["per_class"] == expected["per_class"]
    # The windows are what was measured: one forward pass over the whole image predicts differently here.
    _, full_matrix = direct_scores(checkpoint, moved, moved / "split", "full", root=str(moved))
    assert full_matrix != matrix


def test_evaluate_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    missing = tmp_path / "run" / "best.pt"
    cases = [
        (["--checkpoint", missing], ["checkpoint not found", str(missing)]),
        (["--checkpoint", missing, "--prediction", tmp_path / "p.tif", "--label", tmp_path / "l.tif"],
         ["--checkpoint", "--prediction", "only one"]),
        ([], ["--checkpoint", "--prediction"]),
        (["--prediction", tmp_path / "p.tif"], ["--label"]),
        (["--checkpoint", missing, "--slab", "4"], ["--slab", "--checkpoint"]),
        (["--prediction", tmp_path / "p.tif", "--label", tmp_path / "l.tif", "--eval-mode", "full"],
         ["--eval-mode", "--prediction"]),
        (["--checkpoint", missing, "--set", "model.width=4"], ["model.width", "checkpoint"]),
    ]
    for args, needles in cases:
        code, out, err = run_cli(["evaluate", *args, "--no-progress"], capsys)
        assert_one_line_error(code, err, *needles)
        assert "Traceback" not in err and out == ""
    assert list(tmp_path.iterdir()) == []
