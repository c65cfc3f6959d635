"""3-D U-Nets: every method trains and resumes exactly on tiny (z, y, x) patches; 3-D views, boxes and
prediction in bounded slabs."""

import json

import numpy as np
import pytest
import tifffile
import torch

from mitoseg.config import config_from_dict
from mitoseg.data.datasets import PatchDataset, VolumeSlices, consecutive_starts
from mitoseg.data.transforms import Normalization, cutmix_box, weak_transform
from mitoseg.engine.trainer import Trainer
from mitoseg.errors import MitosegError
from mitoseg.inference import VolumePredictor

METHODS = ["supervised", "fixmatch", "unimatch", "daw", "ddfp", "daw_ddfp"]


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    from mitoseg.data.synthetic import make_em_volume

    root = tmp_path_factory.mktemp("volume3d")
    image, label = make_em_volume((10, 48, 48), seed=3)
    tifffile.imwrite(root / "image.tif", image)
    tifffile.imwrite(root / "label.tif", label)
    return root


def config_3d(root, method: str, **train) -> dict:
    image, label = str(root / "image.tif"), str(root / "label.tif")
    cfg = {
        "seed": 0,
        "data": {"train": {"image": image, "label": label, "slices": "0:5"},
                 "val": {"image": image, "label": label, "slices": "5:10"},
                 "patch_size": [4, 16, 16], "batch_size": 2},
        "model": {"spatial_dims": 3, "channels": [4, 8], "strides": [2], "num_res_units": 1,
                  "feature_channels": 4, "head_channels": 4},
        "method": {"name": method, "ddfp": {"start_iter": 1, "hidden": 8, "max_pixels": 256}},
        "train": {"iterations": 4, "val_every": 2, "log_every": 1, "checkpoint_every": 2, "inspect_every": 2,
                  **train},
        "inference": {"roi_size": [4, 16, 16], "slab": 2},
    }
    if method != "supervised":
        cfg["data"]["unlabeled"] = [{"label": label, "slices": "5:10"}]
    return cfg


@pytest.mark.parametrize("method", METHODS)
def test_3d_run_of_every_method_trains_and_resumes_exactly(tmp_path, volume, method):
    cfg = config_3d(volume, method)
    full = Trainer(config_from_dict(cfg), tmp_path / "full", progress=False)
    assert full.model.spatial_dims == 3 and isinstance(full.model.seg_head.block[0], torch.nn.Conv3d)
    summary = full.fit()
    assert summary["completed"] and 0.0 <= summary["final"]["fg_iou"] <= 1.0
    assert summary["final"]["pixels"] == 5 * 48 * 48  # every validation voxel predicted once
    logs = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in logs if r["split"] == "train")

    Trainer(config_from_dict(cfg), tmp_path / "split", max_iters=2, progress=False).fit()
    Trainer(config_from_dict(cfg), tmp_path / "split", resume=True, progress=False).fit()
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    for key in ("model", "ema_model"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{method}: {key}.{name} differs after resume"
    if method != "supervised":
        # Inspection files keep their (N, H, W) format: the middle z plane of each 3-D patch.
        arrays = np.load(tmp_path / "full" / "inspect" / "iter_000004.npz")
        assert arrays["image"].shape == arrays["pseudo_label"].shape == arrays["weight"].shape == (4, 16, 16)


def test_3d_patches_come_from_runs_of_consecutive_slices():
    assert consecutive_starts([0, 1, 2, 5, 6, 7, 8], 3) == [0, 3, 4]
    assert consecutive_starts([0, 2, 4], 1) == [0, 1, 2]
    image = np.arange(7, dtype=np.float32)[:, None, None] * np.ones((7, 8, 8), np.float32)
    src = VolumeSlices(image=image, label=np.zeros((7, 8, 8), np.int64), indices=[0, 1, 2, 5, 6, 7, 8],
                       normalization=Normalization(0.0, 1.0), source="v")
    from monai.transforms import Compose, EnsureTyped

    dataset = PatchDataset(src, Compose([EnsureTyped(keys=["image", "label"], track_meta=False)]), (3, 4, 4),
                           seed=0, length=50)
    firsts = set()
    for i in range(50):
        sample = dataset[i]
        assert sample["image"].shape == (1, 3, 4, 4) and sample["label"].shape == (3, 4, 4)
        planes = sample["image"][0, :, 0, 0].tolist()
        assert planes == [planes[0], planes[0] + 1, planes[0] + 2]  # stack positions 0-2, 3-5 or 4-6
        firsts.add(planes[0])
    assert firsts == {0.0, 3.0, 4.0}
    with pytest.raises(MitosegError, match="no run of 4 consecutive slices"):
        PatchDataset(VolumeSlices(image=image[:3], label=None, indices=[0, 2, 4], normalization=Normalization(0, 1),
                                  source="v"), None, (4, 4, 4), seed=0, length=1)


def test_3d_views_flip_in_z_and_turn_in_y_x_with_the_label():
    cfg = config_from_dict({"data": {"train": {"image": "x"}, "patch_size": [4, 8, 8]},
                            "model": {"spatial_dims": 3, "channels": [4, 8], "strides": [2]},
                            "inference": {"roi_size": [4, 8, 8]}})
    transform = weak_transform(cfg.data, with_label=True, intensity=False)
    from mitoseg.data.datasets import seed_transform

    image = torch.arange(4 * 8 * 8, dtype=torch.float32).reshape(1, 4, 8, 8)
    seen_z_flip = False
    for seed in range(30):
        seed_transform(transform, np.random.default_rng(seed))
        out = transform({"image": image.clone(), "label": image.clone().long()})
        assert torch.equal(out["image"].long(), out["label"].long())  # one geometry for image and label
        assert out["image"].shape == (1, 4, 8, 8)
        # Every y-x plane still holds one original plane's values: z stays z (possibly reversed).
        planes = [int(out["image"][0, z].min()) // 64 for z in range(4)]
        assert sorted(planes) == [0, 1, 2, 3] and planes in ([0, 1, 2, 3], [3, 2, 1, 0])
        seen_z_flip |= planes == [3, 2, 1, 0]
    assert seen_z_flip


def test_3d_cutmix_box_is_one_box_of_the_drawn_share():
    rng = np.random.default_rng(0)
    for _ in range(100):
        box = cutmix_box(rng, (8, 32, 32), prob=1.0)
        z, y, x = np.nonzero(box)
        extent = (z.max() - z.min() + 1) * (y.max() - y.min() + 1) * (x.max() - x.min() + 1)
        assert extent == box.sum() and 0.005 < box.mean() <= 0.45
    assert not cutmix_box(rng, (8, 32, 32), prob=0.0).any()


class _Pointwise3d(torch.nn.Module):
    """A 3-D 'model' with a 1x1x1 receptive field: any tiling of the volume gives the same numbers."""

    spatial_dims = 3

    def forward(self, x):
        return torch.cat([-x, x], dim=1) * 4


class _Mean3d(_Pointwise3d):
    """A 3-D 'model' whose foreground logit is a local 3x3x3 mean: its output depends on neighbouring slices."""

    def forward(self, x):
        return super().forward(torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1, count_include_pad=False))


def predict_3d(model, volume, roi, slab):
    cfg = config_from_dict({"data": {"train": {"image": "x"}, "patch_size": [4, 8, 8]},
                            "model": {"spatial_dims": 3, "channels": [4, 8], "strides": [2]},
                            "inference": {"roi_size": roi, "slab": slab, "overlap": 0.25}})
    predictor = VolumePredictor(model, cfg, torch.device("cpu"))
    slabs = list(predictor.slabs(lambda s, e: volume[s:e], len(volume), Normalization(0.0, 1.0)))
    return [(s, e) for s, e, _ in slabs], torch.cat([p for _, _, p in slabs])


def whole(model, volume):
    return torch.softmax(model(torch.from_numpy(volume)[None, None]), dim=1)[0].transpose(0, 1)


def test_3d_prediction_by_slabs_covers_every_slice_once_and_matches_one_pass():
    volume = np.random.default_rng(0).random((20, 16, 16)).astype(np.float32)
    ranges, probs = predict_3d(_Pointwise3d(), volume, [8, 8, 8], slab=3)
    assert ranges == [(s, min(s + 3, 20)) for s in range(0, 20, 3)]
    torch.testing.assert_close(probs, whole(_Pointwise3d(), volume), atol=1e-6, rtol=0)
    # A slab near a face of the volume is predicted within a full window of slices (8 here, the whole
    # volume): a model that reads neighbouring slices gives the numbers of one pass over the volume.
    small = volume[:8]
    _, probs = predict_3d(_Mean3d(), small, [8, 16, 16], slab=2)
    torch.testing.assert_close(probs, whole(_Mean3d(), small), atol=1e-6, rtol=0)


def test_3d_config_checks():
    base = {"data": {"train": {"image": "x"}}, "model": {"spatial_dims": 3}}
    with pytest.raises(MitosegError, match="data.patch_size.*3 values"):
        config_from_dict(base)
    good = {"data": {"train": {"image": "x"}, "patch_size": [8, 16, 16]},
            "model": {"spatial_dims": 3, "channels": [4, 8], "strides": [2]}, "inference": {"roi_size": [8, 16, 16]}}
    assert config_from_dict(good).model.spatial_dims == 3
    for change, message in (({"data": {"context_slices": 1}}, "context_slices"),
                            ({"data": {"patch_size": [5, 16, 16]}}, "multiples of 2"),
                            ({"data": {"augment": {"elastic_prob": 0.5}}}, "elastic_prob"),
                            ({"model": {"name": "deeplabv3plus"}}, "spatial_dims")):
        cfg = json.loads(json.dumps(good))
        for section, values in change.items():
            cfg[section].update(values)
        with pytest.raises(MitosegError, match=message):
            config_from_dict(cfg)


def test_predict_a_volume_with_a_3d_checkpoint(tmp_path, volume, capsys):
    from conftest import assert_one_line_error, run_cli

    from mitoseg.data.readers import read_volume

    Trainer(config_from_dict(config_3d(volume, "supervised", iterations=2)), tmp_path / "run", progress=False).fit()
    out = tmp_path / "pred.tif"
    code, _, err = run_cli(["predict", "--checkpoint", tmp_path / "run" / "best.pt", "--input", volume / "image.tif",
                            "--output", out, "--slab", "3", "--tta", "--no-progress"], capsys)
    assert code == 0, err
    labels = read_volume(out)
    assert labels.shape == (10, 48, 48) and labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1}
    code, _, err = run_cli(["predict", "--checkpoint", tmp_path / "run" / "best.pt", "--input", volume / "image.tif",
                            "--output", tmp_path / "x.tif", "--roi-size", "16", "16"], capsys)
    assert_one_line_error(code, err, "--roi-size", "3 values", "Z Y X")
