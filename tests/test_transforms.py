"""Normalization, the weak and strong views, and the patch pipeline: values, shapes, dtypes, alignment."""

import numpy as np
import pytest
import tifffile
import torch
from monai.transforms import Compose, EnsureTyped

from mitoseg.config import AugmentConfig, DataConfig, NormalizeConfig, StrongConfig
from mitoseg.data import transforms
from mitoseg.data.datasets import PatchDataset, UnlabeledViewsDataset, VolumeSlices, sample_rng, seed_transform
from mitoseg.data.readers import open_volume
from mitoseg.data.transforms import (
    compute_normalization,
    sample_for_stats,
    strong_transform,
    weak_transform,
)
from mitoseg.errors import MitosegError

# ------------------------------------------------------------------ normalization


def em_like(dtype, shape=(4, 32, 32), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    values = rng.normal(120, 30, shape)
    if np.issubdtype(dtype, np.integer):
        return np.clip(values * (1 if dtype == np.uint8 else 200), 0, np.iinfo(dtype).max).astype(dtype)
    return values.astype(dtype)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_percentile_normalization_maps_the_percentiles_to_0_and_1(dtype):
    volume = em_like(dtype)
    norm = compute_normalization(volume, NormalizeConfig(mode="percentile", lower=2.0, upper=98.0))
    low, high = np.percentile(volume.astype(np.float64), [2, 98])
    assert norm.offset == pytest.approx(low) and norm.scale == pytest.approx(high - low)
    out = norm(volume)
    assert out.dtype == np.float32 and out.shape == volume.shape
    np.testing.assert_allclose(np.percentile(out, [2, 98]), [0.0, 1.0], atol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_meanstd_normalization_gives_zero_mean_and_unit_std(dtype):
    volume = em_like(dtype, seed=1)
    out = compute_normalization(volume, NormalizeConfig(mode="meanstd"))(volume)
    assert out.dtype == np.float32
    assert abs(float(out.mean())) < 1e-4 and float(out.std()) == pytest.approx(1.0, abs=1e-4)


def test_normalization_of_a_constant_volume_stays_finite_and_of_nan_is_an_error():
    flat = np.full((2, 8, 8), 7, np.uint8)
    for mode in ("percentile", "meanstd"):
        out = compute_normalization(flat, NormalizeConfig(mode=mode))(flat)
        assert np.all(out == 0.0)
    bad = np.zeros((2, 8, 8), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(MitosegError, match="stack.tif: intensities are not finite"):
        compute_normalization(bad, NormalizeConfig(), what="stack.tif")


def test_statistics_read_a_strided_subset_of_slices_of_a_large_volume(tmp_path, monkeypatch):
    monkeypatch.setattr(transforms, "_STATS_VOXELS", 1000)  # 50 slices of 10 x 10: every 5th slice
    volume = np.arange(50 * 10 * 10, dtype=np.uint16).reshape(50, 10, 10)
    np.testing.assert_array_equal(sample_for_stats(volume), volume[::5])
    tifffile.imwrite(tmp_path / "v.tif", volume, photometric="minisblack")
    with open_volume(str(tmp_path / "v.tif")) as opened:
        np.testing.assert_array_equal(sample_for_stats(opened), volume[::5])
    monkeypatch.setattr(transforms, "_STATS_VOXELS", 10**9)  # small volumes: every slice
    np.testing.assert_array_equal(sample_for_stats(volume), volume)


# ----------------------------------------------------------------------- weak view


def random_label(shape=(1, 24, 24), seed=0) -> np.ndarray:
    """An asymmetric binary label, so that every flip or quarter turn changes it."""
    return (np.random.default_rng(seed).random(shape) > 0.6).astype(np.int64)


def dihedral_variants(array: np.ndarray) -> list[np.ndarray]:
    """The 8 flips / quarter turns of the last two axes."""
    variants = []
    for k in range(4):
        turned = np.rot90(array, k, axes=(-2, -1))
        variants += [turned, np.flip(turned, -1)]
    return variants


@pytest.mark.parametrize("with_label", [True, False])
def test_weak_view_keeps_shape_and_gives_float32_image_and_int64_label(with_label):
    transform = weak_transform(DataConfig(), with_label=with_label)
    label = random_label()
    sample = {"image": label.astype(np.float32)}
    if with_label:
        sample["label"] = label
    seed_transform(transform, np.random.default_rng(0))
    out = transform(sample)
    assert set(out) == set(sample)
    # Plain tensors (no MONAI metadata): the DataLoader stacks them as they are.
    assert type(out["image"]) is torch.Tensor and out["image"].dtype == torch.float32
    assert tuple(out["image"].shape) == (1, 24, 24)
    if with_label:
        assert type(out["label"]) is torch.Tensor and out["label"].dtype == torch.int64
        assert tuple(out["label"].shape) == (1, 24, 24)


def test_flips_and_quarter_turns_move_image_and_label_together():
    transform = weak_transform(DataConfig(), with_label=True, intensity=False)
    changed = 0
    for seed in range(40):
        label = random_label(seed=seed)
        seed_transform(transform, np.random.default_rng(seed))
        out = transform({"image": label.astype(np.float32) * 3.0, "label": label})
        out_label = out["label"].numpy()
        # The label derived from the image is still the image's label after the transform.
        np.testing.assert_array_equal(out["image"].numpy(), out_label * 3.0)
        assert any(np.array_equal(out_label, v) for v in dihedral_variants(label)), seed
        changed += not np.array_equal(out_label, label)
    assert changed >= 20, "flips / rot90 were hardly ever applied"


def test_weak_intensity_jitter_keeps_the_label_readable_from_the_image():
    transform = weak_transform(DataConfig(augment=AugmentConfig(prob=1.0)), with_label=True)
    jittered = 0
    for seed in range(20):
        label = random_label(seed=seed)
        image = label.astype(np.float32)
        seed_transform(transform, np.random.default_rng(seed))
        out = transform({"image": image, "label": label})
        out_image, out_label = out["image"].numpy(), out["label"].numpy()
        np.testing.assert_array_equal(out_image > 0.5, out_label == 1)
        jittered += not np.array_equal(out_image, out_label.astype(np.float32))
    assert jittered == 20


def test_weak_view_without_augmentation_is_the_identity():
    off = DataConfig(augment=AugmentConfig(flip=False, rot90=False, intensity_scale=0, intensity_shift=0,
                                           noise_std=0))
    label = random_label()
    out = weak_transform(off, with_label=True)({"image": label.astype(np.float32), "label": label})
    np.testing.assert_array_equal(out["label"].numpy(), label)
    np.testing.assert_array_equal(out["image"].numpy(), label.astype(np.float32))


# --------------------------------------------------------------------- strong view


def test_strong_view_keeps_shape_and_dtype_changes_intensities_and_is_reproducible():
    weak = torch.from_numpy(random_label().astype(np.float32))
    transform = strong_transform(StrongConfig(prob=1.0, blur_prob=1.0))
    views = []
    for _ in range(2):
        seed_transform(transform, np.random.default_rng(5))
        views.append(transform({"image": weak.clone()})["image"])
    strong = views[0]
    assert type(strong) is torch.Tensor and strong.dtype == torch.float32 and strong.shape == weak.shape
    assert (strong - weak).abs().mean() > 0.01
    torch.testing.assert_close(views[0], views[1], rtol=0, atol=0)  # same draw, same view


# ----------------------------------------------------------------- patch pipeline


def blob_volume(n=6, size=128, blob=4, seed=0):
    """Slices with one small foreground square each (about 0.1 % of the pixels), image = f(label)."""
    rng = np.random.default_rng(seed)
    label = np.zeros((n, size, size), np.int64)
    for z in range(n):
        y, x = rng.integers(0, size - blob, 2)
        label[z, y:y + blob, x:x + blob] = 1
    image = (label * 100 + 50 + rng.integers(0, 5, label.shape)).astype(np.uint8)
    norm = compute_normalization(image, NormalizeConfig(mode="meanstd"))
    return VolumeSlices(image=image, label=label, indices=list(range(n)), normalization=norm, source="blobs.tif")


def plain(keys=("image", "label")):
    return Compose([EnsureTyped(keys=list(keys), track_meta=False)])


def foreground_share(dataset, samples=400) -> float:
    hits = sum(bool(dataset.crop(sample_rng(dataset.seed, i))["label"].any()) for i in range(samples))
    return hits / samples


def test_foreground_sampling_finds_rare_foreground_far_more_often_than_uniform():
    source = blob_volume()
    share = {p: foreground_share(PatchDataset(source, plain(), (16, 16), seed=3, length=400,
                                              foreground_sampling=p)) for p in (0.0, 0.5, 1.0)}
    # Uniform placement meets a 4 x 4 square in a 128 x 128 slice with a 16 x 16 patch ~3 % of the time.
    assert share[0.0] < 0.1
    assert share[1.0] == 1.0
    assert 0.35 < share[0.5] < 0.7


def test_foreground_sampling_does_not_centre_on_ignored_pixels():
    source = blob_volume()
    ignored = source.label.copy()
    band = np.zeros_like(ignored, dtype=bool)
    band[:, :, 64:] = True
    ignored[band & (ignored == 0)] = 255  # half of each slice ignored: ~500 times the foreground pixels
    source = VolumeSlices(image=source.image, label=ignored, indices=source.indices,
                          normalization=source.normalization, source=source.source)
    dataset = PatchDataset(source, plain(), (16, 16), seed=1, length=200, foreground_sampling=1.0,
                           ignore_index=255)
    for i in range(200):
        patch = dataset.crop(sample_rng(1, i))["label"]
        assert (patch == 1).any(), i


def test_patches_are_normalized_per_volume_aligned_and_of_the_documented_shapes():
    source = blob_volume()
    dataset = PatchDataset(source, weak_transform(DataConfig(), with_label=True, intensity=False), (32, 32),
                           seed=7, length=50, foreground_sampling=0.5)
    threshold = float(source.normalization(np.array([100.0]))[0])  # between background (~50) and foreground (~150)
    turned = 0
    for i in range(30):
        raw = dataset.crop(sample_rng(7, i))  # the crop __getitem__ starts from (same draw)
        assert raw["image"].dtype == torch.float32 and tuple(raw["image"].shape) == (1, 32, 32)
        assert raw["label"].dtype == torch.int64
        sample = dataset[i]
        assert sample["image"].dtype == torch.float32 and tuple(sample["image"].shape) == (1, 32, 32)
        assert sample["label"].dtype == torch.int64 and tuple(sample["label"].shape) == (32, 32)
        image, label = sample["image"][0].numpy(), sample["label"].numpy()
        np.testing.assert_array_equal(image > threshold, label == 1)
        # One flip / quarter turn of the normalized crop, the same for image and label.
        variants = zip(dihedral_variants(raw["image"][0]), dihedral_variants(raw["label"][0]))
        assert any(np.array_equal(image, vi) and np.array_equal(label, vl) for vi, vl in variants), i
        turned += not np.array_equal(label, raw["label"][0])
        # The same index is the same sample (resumed runs see the same data).
        assert torch.equal(dataset[i]["image"], sample["image"])
    assert turned > 0
    # Volume statistics, not patch statistics: the patch is the volume's mapping of its raw values.
    window = dataset.window(sample_rng(7, 0))
    v, z, top, left = window
    np.testing.assert_array_equal(dataset.crop(sample_rng(7, 0))["image"][0],
                                  source.normalization(source.image[z, top:top + 32, left:left + 32]))


def test_unlabeled_views_have_the_documented_keys_shapes_and_dtypes():
    source = blob_volume()
    dataset = UnlabeledViewsDataset(source, weak_transform(DataConfig(), with_label=True, intensity=False),
                                    strong_transform(StrongConfig(prob=1.0, blur_prob=1.0)), (32, 32), seed=2,
                                    length=8, cutmix_prob=1.0)
    sample = dataset[0]
    assert set(sample) == {"weak", "strong1", "strong2", "box1", "box2", "valid", "label"}
    for name in ("weak", "strong1", "strong2"):
        assert sample[name].dtype == torch.float32 and tuple(sample[name].shape) == (1, 32, 32)
    assert not torch.allclose(sample["strong1"], sample["weak"])
    assert not torch.allclose(sample["strong1"], sample["strong2"])
    for name in ("box1", "box2"):
        assert sample[name].dtype == torch.uint8 and tuple(sample[name].shape) == (32, 32)
    assert sample["valid"].dtype == torch.bool and bool(sample["valid"].all())
    assert sample["label"].dtype == torch.int64 and tuple(sample["label"].shape) == (32, 32)
    threshold = float(source.normalization(np.array([100.0]))[0])
    np.testing.assert_array_equal(sample["weak"][0].numpy() > threshold, sample["label"].numpy() == 1)
    again = dataset[0]
    assert all(torch.equal(sample[k], again[k]) for k in sample)


def test_slice_artefacts_blank_or_shift_a_neighbouring_slice_and_never_the_labeled_one():
    from mitoseg.data.transforms import RandSliceArtefactsd

    image = torch.arange(5 * 16 * 16, dtype=torch.float32).reshape(5, 16, 16) + 1
    label = torch.zeros(1, 16, 16)
    blanked, shifted = set(), set()
    for seed in range(40):
        t = RandSliceArtefactsd(["image", "label"], missing_prob=0.5, misalign_prob=0.5, misalign_max=3)
        t.set_random_state(seed)
        out = t({"image": image.clone(), "label": label.clone()})
        assert torch.equal(out["image"][2], image[2]) and torch.equal(out["label"], label)  # centre, label intact
        for c in (0, 1, 3, 4):
            if torch.equal(out["image"][c], image[c]):
                continue
            if not out["image"][c].any():
                blanked.add(c)
            else:  # a shift: the interior is the original moved by at most 3 pixels
                shifted.add(c)
                inner = out["image"][c][3:-3, 3:-3]
                assert any(torch.equal(inner, image[c][3 - dy:13 - dy, 3 - dx:13 - dx])
                           for dy in range(-3, 4) for dx in range(-3, 4))
    assert blanked == {0, 1, 3, 4} and shifted == {0, 1, 3, 4}
    # One-channel 2-D images have no neighbouring slice: unchanged.
    t = RandSliceArtefactsd(["image"], 1.0, 1.0, 3)
    single = torch.rand(1, 8, 8)
    assert torch.equal(t({"image": single.clone()})["image"], single)


def test_3d_misalignment_moves_image_and_label_together_from_one_plane_on():
    from mitoseg.data.transforms import RandSliceArtefactsd

    image = torch.rand(1, 6, 16, 16)
    label = (image > 0.5).float()
    for seed in range(20):
        t = RandSliceArtefactsd(["image", "label"], missing_prob=0.0, misalign_prob=1.0, misalign_max=2,
                                spatial_dims=3)
        t.set_random_state(seed)
        out = t({"image": image.clone(), "label": label.clone()})
        assert torch.equal(out["label"], (out["image"] > 0.5).float())  # still aligned with each other
        changed = [z for z in range(6) if not torch.equal(out["image"][0, z], image[0, z])]
        assert changed == list(range(changed[0], 6)) if changed else True


def test_elastic_deformation_moves_image_and_label_alike():
    from monai.transforms import Rand2DElasticd

    from mitoseg.config import config_from_dict

    cfg = config_from_dict({"data": {"train": {"image": "x"}, "augment": {
        "elastic_prob": 1.0, "flip": False, "rot90": False, "intensity_scale": 0.0, "intensity_shift": 0.0,
        "noise_std": 0.0}}})
    transform = weak_transform(cfg.data, with_label=True)
    assert any(isinstance(t, Rand2DElasticd) for t in transform.transforms)
    yy, xx = np.mgrid[:64, :64]
    label = ((yy // 8 + xx // 8) % 2).astype(np.int64)[None]
    image = torch.as_tensor(label, dtype=torch.float32)
    seed_transform(transform, np.random.default_rng(0))
    out = transform({"image": image, "label": torch.as_tensor(label)})
    warped = out["label"].long()
    assert not torch.equal(warped, torch.as_tensor(label))  # it moved
    assert set(torch.unique(warped).tolist()) <= {0, 1}  # labels resampled by nearest neighbour
    agree = ((out["image"] > 0.5).long() == warped).float().mean()
    assert agree > 0.97  # the image moved with its label (bilinear edges aside)
