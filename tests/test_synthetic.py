"""Synthetic EM volumes and the sample data writer (mitoseg.data.synthetic)."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from mitoseg.data.synthetic import SAMPLE_FILES, TRAIN_SHAPE, VAL_SHAPE, make_em_volume, write_sample_data
from mitoseg.errors import MitosegError

SHAPE = (8, 128, 128)
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def volumes():
    return {seed: make_em_volume(SHAPE, seed=seed) for seed in SEEDS}


def best_threshold_iou(image: np.ndarray, label: np.ndarray) -> float:
    """IoU with the label of the best global threshold ``image <= t`` over every t."""
    fg = np.bincount(image[label == 1], minlength=256)
    bg = np.bincount(image[label == 0], minlength=256)
    true_pos = np.cumsum(fg)
    return float((true_pos / (fg.sum() + np.cumsum(bg))).max())


def test_shapes_and_dtypes(volumes):
    for image, label in volumes.values():
        assert image.shape == label.shape == SHAPE
        assert image.dtype == label.dtype == np.uint8
    image, label = make_em_volume((3, 40, 72), seed=5)
    assert image.shape == label.shape == (3, 40, 72)


def test_default_shape():
    # checked on the signature: generating a full default volume takes a couple of seconds
    assert inspect.signature(make_em_volume).parameters["shape"].default == (16, 256, 256)


def test_same_seed_gives_identical_arrays(volumes):
    image, label = make_em_volume(SHAPE, seed=1)
    assert image.tobytes() == volumes[1][0].tobytes()
    assert label.tobytes() == volumes[1][1].tobytes()


def test_different_seeds_differ(volumes):
    assert not np.array_equal(volumes[0][0], volumes[1][0])
    assert not np.array_equal(volumes[0][1], volumes[1][1])


def test_label_is_binary_and_foreground_fraction_sane(volumes):
    for image, label in volumes.values():
        assert set(np.unique(label).tolist()) == {0, 1}
        assert 0.05 <= label.mean() <= 0.2


def test_image_uses_a_plausible_grey_range(volumes):
    for image, label in volumes.values():
        background = image[label == 0]
        assert 120 <= np.median(background) <= 175  # grey cytoplasm
        assert np.percentile(image, 1) < 90  # dark membranes and mitochondria exist
        assert image.std() > 12  # texture and noise, not flat


def test_mitochondria_darker_but_not_separable_by_threshold(volumes):
    for image, label in volumes.values():
        mito, background = image[label == 1].astype(float), image[label == 0].astype(float)
        assert mito.mean() < background.mean() - 10
        # the histograms overlap: many mitochondrion voxels are brighter than the darkest background ones
        assert np.mean(mito > np.percentile(background, 10)) > 0.2
        iou = best_threshold_iou(image, label)
        assert 0.05 < iou < 0.9, iou


def test_objects_continue_across_slices(volumes):
    for _, label in volumes.values():
        mask = label.astype(bool)
        upper, lower = mask[1:], mask[:-1]
        iou = (upper & lower).sum() / (upper | lower).sum()
        assert iou > 0.6, iou
        # and each object spans several slices
        components, count = ndimage.label(mask)
        spans = [sl[0].stop - sl[0].start for sl in ndimage.find_objects(components)]
        assert count >= 1 and np.median(spans) >= 3, spans


def test_num_mitochondria():
    _, label = make_em_volume((6, 96, 96), seed=3, num_mitochondria=0)
    assert not label.any()
    _, label = make_em_volume((6, 128, 128), seed=3, num_mitochondria=3)
    # objects never touch, so they are separate 3-D components (26-connectivity)
    _, count = ndimage.label(label, structure=np.ones((3, 3, 3)))
    assert count == 3


@pytest.mark.parametrize("kwargs", [
    {"shape": (8, 64)}, {"shape": (0, 64, 64)}, {"shape": (4, 4, 64)}, {"shape": (4, 64.5, 64)},
    {"seed": -1}, {"seed": 1.5}, {"num_mitochondria": -2},
])
def test_bad_arguments_raise_mitoseg_error(kwargs):
    args = {"shape": (4, 32, 32), **kwargs}
    with pytest.raises(MitosegError):
        make_em_volume(**args)


def test_too_many_mitochondria_raise():
    with pytest.raises(MitosegError, match="could not place"):
        make_em_volume((2, 24, 24), seed=0, num_mitochondria=50)


# ----------------------------------------------------------------------------- sample data


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "sample_data"
    paths = write_sample_data(out, seed=0)
    return out, paths


@pytest.mark.slow
def test_write_sample_data_writes_readable_tifs(sample_dir):
    out, paths = sample_dir
    assert sorted(p.name for p in out.iterdir()) == sorted(SAMPLE_FILES.values())  # no temp files left
    assert {key: path.name for key, path in paths.items()} == SAMPLE_FILES
    expected = {"train": TRAIN_SHAPE, "val": VAL_SHAPE}
    assert TRAIN_SHAPE == (24, 256, 256) and VAL_SHAPE == (8, 256, 256)
    arrays = {}
    for key in ("train_image", "train_label", "val_image", "val_label"):
        with tifffile.TiffFile(paths[key]) as tif:
            assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            arrays[key] = tif.asarray()
        assert arrays[key].shape == expected[key.split("_")[0]]
        assert arrays[key].dtype == np.uint8
    for split in ("train", "val"):
        assert set(np.unique(arrays[f"{split}_label"]).tolist()) == {0, 1}
    # train and validation come from different seeds
    assert not np.array_equal(arrays["train_image"][:8], arrays["val_image"])
    assert "24" in paths["readme"].read_text()


def test_write_sample_data_is_deterministic(sample_dir):
    _, paths = sample_dir
    from mitoseg.data.synthetic import _derived_seeds

    _, val_seed = _derived_seeds(0)
    image, label = make_em_volume(VAL_SHAPE, val_seed)
    assert np.array_equal(tifffile.imread(paths["val_image"]), image)
    assert np.array_equal(tifffile.imread(paths["val_label"]), label)


def test_write_sample_data_refuses_to_overwrite(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    existing = out / "val_label.tif"
    existing.write_bytes(b"keep me")
    with pytest.raises(MitosegError) as info:
        write_sample_data(out)
    assert "val_label.tif" in str(info.value)
    assert existing.read_bytes() == b"keep me"
    assert sorted(p.name for p in out.iterdir()) == ["val_label.tif"]  # nothing else written


def test_write_sample_data_refuses_when_only_readme_exists(tmp_path):
    (tmp_path / "README.md").write_text("mine")
    with pytest.raises(MitosegError, match="README.md"):
        write_sample_data(tmp_path)
    assert (tmp_path / "README.md").read_text() == "mine"


def test_write_sample_data_overwrites_when_asked(tmp_path, monkeypatch):
    import mitoseg.data.synthetic as synthetic

    # small volumes keep this test fast; the real shapes are checked above
    monkeypatch.setattr(synthetic, "TRAIN_SHAPE", (3, 32, 32))
    monkeypatch.setattr(synthetic, "VAL_SHAPE", (2, 32, 32))
    for name in SAMPLE_FILES.values():
        (tmp_path / name).write_bytes(b"old")
    paths = write_sample_data(tmp_path, seed=4, overwrite=True)
    assert tifffile.imread(paths["train_image"]).shape == (3, 32, 32)
    assert tifffile.imread(paths["val_label"]).shape == (2, 32, 32)
    assert paths["readme"].read_text() != "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(SAMPLE_FILES.values())


def test_write_sample_data_rejects_a_file_as_directory(tmp_path):
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    with pytest.raises(MitosegError, match="not_a_dir"):
        write_sample_data(target)
