"""Connected components slab by slab, and the post-processing of predicted masks built on them."""

import numpy as np
import pytest
import tifffile
import yaml
from scipy import ndimage

from mitoseg.instances import find_components, postprocess_labels

from conftest import run_cli, tiny_config_dict

FACES = ndimage.generate_binary_structure(3, 1)


def components_by_slab(mask, slab):
    comps = find_components(lambda s, e: mask[s:e], len(mask), slab)
    ids = np.concatenate([comps.objects(s, mask[s:s + slab]) for s in range(0, len(mask), slab)])
    return comps, ids


@pytest.mark.parametrize("slab", [1, 2, 5, 7, 40])
def test_slab_components_equal_whole_volume_labelling_up_to_renumbering(slab):
    rng = np.random.default_rng(slab)
    for _ in range(5):
        mask = ndimage.binary_opening(rng.random((17, 30, 26)) > 0.45)
        reference, count = ndimage.label(mask, structure=FACES)
        comps, ids = components_by_slab(mask, slab)
        assert comps.count == count and ids.max() == count and ((ids > 0) == mask).all()
        pairs = np.unique(np.stack([reference[mask], ids[mask]]), axis=1)
        assert pairs.shape[1] == count  # a one-to-one renumbering
        assert sorted(np.bincount(reference.ravel())[1:]) == sorted(comps.sizes)
        touching = set(np.unique(np.concatenate([reference[0].ravel(), reference[-1].ravel(),
                                                 reference[:, 0].ravel(), reference[:, -1].ravel(),
                                                 reference[:, :, 0].ravel(), reference[:, :, -1].ravel()])))
        for ref_id, own in pairs.T:
            assert comps.touches_border[own - 1] == (ref_id in touching)


def test_an_object_split_by_slabs_is_one_object():
    mask = np.zeros((9, 8, 8), bool)
    mask[1:8, 3, 3] = True  # a column through three slabs of 3
    mask[4, 3, 3:7] = True  # an arm in the middle slab
    comps, ids = components_by_slab(mask, 3)
    assert comps.count == 1 and comps.sizes.tolist() == [10] and set(np.unique(ids)) == {0, 1}


def run_postprocess(labels, **options):
    out = labels.copy()

    def write(start, values):
        out[start:start + len(values)] = values

    postprocess_labels(lambda s, e: out[s:e], write, len(out), slab=2, **options)
    return out


def test_small_objects_are_removed_and_larger_ones_kept_whatever_the_slabs():
    labels = np.zeros((6, 20, 20), np.uint8)
    labels[0:6, 2:4, 2:4] = 1  # 24 voxels across all three slabs of 2: kept with min 20
    labels[2, 10:14, 10:14] = 1  # 16 voxels: removed
    labels[4:6, 15:18, 15:17] = 1  # 12 voxels: removed
    out = run_postprocess(labels, min_object_voxels=20)
    expected = np.zeros_like(labels)
    expected[0:6, 2:4, 2:4] = 1
    assert np.array_equal(out, expected)
    assert np.array_equal(run_postprocess(labels, min_object_voxels=0), labels)  # off: untouched
    assert not run_postprocess(labels, min_object_voxels=25).any()


def test_holes_enclosed_in_3d_are_filled_and_open_ones_are_not():
    labels = np.zeros((7, 12, 12), np.uint8)
    labels[1:6, 1:6, 1:6] = 1
    labels[2:5, 2:5, 2:5] = 0  # a cavity enclosed on all sides
    labels[1:6, 7:11, 7:11] = 1
    labels[2:7, 8:10, 8:10] = 0  # a tunnel open to the last slice: not a hole in 3-D
    out = run_postprocess(labels, fill_holes=True)
    assert out[2:5, 2:5, 2:5].all() and not out[2:7, 8:10, 8:10].any()
    filled = ndimage.binary_fill_holes(labels.astype(bool), structure=FACES)
    assert np.array_equal(out.astype(bool), filled)
    # Removal first, then filling: a small shell goes away with its hole instead of leaving a filled blob.
    small = np.zeros((5, 8, 8), np.uint8)
    small[1:4, 1:4, 1:4] = 1
    small[2, 2, 2] = 0
    assert not run_postprocess(small, min_object_voxels=30, fill_holes=True).any()


def test_predict_post_processes_in_bounded_memory_and_equals_the_in_memory_result(tmp_path, tiny_volumes, capsys):
    from mitoseg.data.readers import read_volume

    cfg = tiny_config_dict(tiny_volumes)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    code, _, err = run_cli(["train", "--config", config, "--out", run, "--no-progress"], capsys)
    assert code == 0, err
    plain, post = tmp_path / "plain.tif", tmp_path / "post.tif"
    for output, extra in ((plain, []), (post, ["--min-object-voxels", "40", "--fill-holes", "--slab", "1"])):
        code, _, err = run_cli(["predict", "--checkpoint", run / "best.pt", "--input", tiny_volumes["val_image"],
                                "--output", output, "--no-progress", *extra], capsys)
        assert code == 0, err
    raw, cleaned = read_volume(plain), read_volume(post)
    mask = raw > 0
    reference, _ = ndimage.label(mask, structure=FACES)
    sizes = np.bincount(reference.ravel())
    kept = mask & (sizes[reference] >= 40)
    expected = ndimage.binary_fill_holes(kept, structure=FACES)
    assert np.array_equal(cleaned > 0, expected)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.startswith("tmp")]
    code, _, err = run_cli(["predict", "--checkpoint", run / "best.pt", "--input", tiny_volumes["val_image"],
                            "--output", tmp_path / "x.tif", "--min-object-voxels", "-1"], capsys)
    assert code == 2 and "--min-object-voxels" in err


def test_post_processing_config_needs_two_classes():
    from mitoseg.config import config_from_dict
    from mitoseg.errors import MitosegError

    with pytest.raises(MitosegError, match="inference.min_object_voxels.*two classes"):
        config_from_dict({"data": {"train": {"image": "x"}, "num_classes": 3},
                          "inference": {"min_object_voxels": 10}})
    with pytest.raises(MitosegError, match="must be at least 0"):
        config_from_dict({"data": {"train": {"image": "x"}}, "inference": {"min_object_voxels": -5}})
