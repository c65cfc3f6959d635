"""Instances: 3-D objects from masks (slab-wise, split, filtered), their measurements and object-level scores."""

import csv
import json
import math

import h5py
import numpy as np
import pytest
import tifffile
from scipy import ndimage

from mitoseg.data.metadata import voxel_size_nm
from mitoseg.instances.measure import measure_objects
from mitoseg.instances.metrics import average_precision, instance_scores
from mitoseg.instances.segment import InstanceOptions, segment_instances

from conftest import assert_one_line_error, run_cli

FACES = ndimage.generate_binary_structure(3, 1)


def ellipsoid(shape, centre, radii):
    zz, yy, xx = np.mgrid[tuple(slice(0, n) for n in shape)]
    return sum(((c - m) / r) ** 2 for c, m, r in zip((zz, yy, xx), centre, radii)) <= 1.0


def segment(mask, **options):
    """(ids, count); every component kept unless ``min_voxels`` is given."""
    options.setdefault("min_voxels", 0)
    return segment_instances(lambda s, e: mask[s:e], mask.shape, InstanceOptions(**options))[:2]


def test_known_objects_are_counted_and_their_volumes_are_the_analytic_ones():
    shape = (48, 96, 96)
    ball = ellipsoid(shape, (24, 24, 24), (15, 15, 15))
    blob = ellipsoid(shape, (24, 64, 64), (10, 14, 20))
    ids, count = segment(ball | blob, slab=5)
    assert count == 2 and ids.dtype == np.uint32 and set(np.unique(ids)) == {0, 1, 2}
    rows = measure_objects(ids, count, voxel_size_nm=(5.0, 5.0, 5.0)).rows
    analytic = [4 / 3 * math.pi * 15 ** 3, 4 / 3 * math.pi * 10 * 14 * 20]  # in voxels
    for row, volume in zip(rows, analytic):
        assert row["voxels"] == pytest.approx(volume, rel=0.02)
        assert row["volume"] == pytest.approx(volume * 125 / 1e9, rel=0.02)  # um^3 at 5 nm voxels
        assert not row["touches_border"]
    ball_row = rows[0]
    assert ball_row["z_extent"] == 31 and (ball_row["bbox_z0"], ball_row["bbox_z1"]) == (9, 40)
    assert ball_row["centroid_z"] == pytest.approx(24 * 0.005) and ball_row["centroid_x"] == pytest.approx(24 * 0.005)
    # A ball's marching-cubes surface is close to 4 pi r^2 (a little more: the voxel staircase) and its
    # sphericity close to 1; the elongated blob is less spherical.
    assert ball_row["surface_area"] == pytest.approx(4 * math.pi * (15 * 0.005) ** 2, rel=0.12)
    assert 0.85 < ball_row["sphericity"] <= 1.0 and rows[1]["sphericity"] < ball_row["sphericity"]


def test_anisotropic_voxels_scale_the_volumes():
    # A ball of radius 100 nm sampled at 10 x 5 x 5 nm: radii 10, 20, 20 voxels.
    shape = (30, 60, 60)
    ids, count = segment(ellipsoid(shape, (15, 30, 30), (10, 20, 20)))
    row = measure_objects(ids, count, voxel_size_nm=(10.0, 5.0, 5.0)).rows[0]
    assert row["volume"] == pytest.approx(4 / 3 * math.pi * 0.1 ** 3, rel=0.02)
    assert row["sphericity"] > 0.85  # round in physical space
    in_voxels = measure_objects(ids, count).rows[0]
    assert in_voxels["volume"] == in_voxels["voxels"]  # no voxel size: voxel units


def test_touching_balls_are_split_by_the_distance_watershed_and_not_without_it():
    shape = (40, 60, 80)
    pair = ellipsoid(shape, (20, 30, 24), (12, 12, 12)) | ellipsoid(shape, (20, 30, 44), (12, 12, 12))
    assert segment(pair)[1] == 1
    ids, count = segment(pair, split="distance", min_distance=6, slab=7)
    assert count == 2
    sizes = np.bincount(ids.ravel())[1:]
    assert sizes.sum() == pair.sum() and abs(int(sizes[0]) - int(sizes[1])) < 0.05 * sizes.sum()
    left, right = ids[20, 30, 14], ids[20, 30, 54]
    assert left != right and {left, right} == {1, 2}
    # by the foreground probability: a blurred mask, less sure where the two meet (a membrane between them)
    membrane = 1 - 0.6 * np.exp(-((np.arange(shape[2]) - 34) ** 2) / 8.0)
    probability = ndimage.gaussian_filter(pair.astype(np.float32), 2.0) * membrane.astype(np.float32)
    ids, count, *_ = segment_instances(lambda s, e: pair[s:e], shape,
                                       InstanceOptions(split="probability", min_voxels=0),
                                       read_probability=lambda s, e: probability[s:e])
    assert count == 2
    flat = ndimage.gaussian_filter(pair.astype(np.float32), 2.0)  # no dip: one object
    assert segment_instances(lambda s, e: pair[s:e], shape, InstanceOptions(split="probability"),
                             read_probability=lambda s, e: flat[s:e]).count == 1


@pytest.mark.parametrize("slab", [1, 3, 16])
def test_slab_wise_instances_equal_whole_volume_labelling_and_small_objects_go(slab):
    rng = np.random.default_rng(slab)
    mask = ndimage.binary_opening(rng.random((20, 32, 30)) > 0.5)
    reference, count = ndimage.label(mask, structure=FACES)
    ids, n = segment(mask, slab=slab)
    assert n == count and ids.max() == n
    pairs = np.unique(np.stack([reference[mask], ids[mask]]), axis=1)
    assert pairs.shape[1] == count  # a one-to-one renumbering
    sizes = np.bincount(reference.ravel())
    ids, n = segment(mask, slab=slab, min_voxels=10)
    assert n == int((sizes[1:] >= 10).sum()) and set(np.unique(ids)) == set(range(n + 1))  # ids 1..N
    assert np.array_equal(ids > 0, mask & (sizes[reference] >= 10))


def test_average_precision_follows_the_coco_procedure():
    # Three ground-truth objects; predictions ranked 1, 2, 3 with IoUs 0.9 (gt 1), 0.6 (gt 2), 0.55 (gt 2 again).
    pred_ids = np.array([1, 2, 3])
    scores = np.array([3.0, 2.0, 1.0])
    pairs = (np.array([1, 2, 3]), np.array([1, 2, 2]), np.array([0.9, 0.6, 0.55]))
    # At 0.5: TP, TP, FP -> precision 1, 1, 2/3 at recall 1/3, 2/3, 2/3: recall levels 0..0.66 at precision 1.
    assert average_precision(scores, pred_ids, pairs, 3, 0.5) == pytest.approx(67 / 101)
    # At 0.75 only the first matches: levels 0..0.33 (34 of them) at precision 1.
    assert average_precision(scores, pred_ids, pairs, 3, 0.75) == pytest.approx(34 / 101)
    # A better-ranked false positive lowers the precision of what follows.
    reordered = np.array([1.0, 2.0, 3.0])
    assert average_precision(reordered, pred_ids, pairs, 3, 0.75) == pytest.approx(34 / 101 / 3)


def test_instance_scores_count_matches_splits_and_merges():
    truth = np.zeros((8, 40, 40), np.uint32)
    truth[1:5, 2:12, 2:12], truth[1:5, 20:30, 20:30], truth[5:8, 30:38, 2:12] = 1, 2, 3
    pred = truth.copy()
    pred[1:5, 20:30, 26:30] = 4  # gt 2 split 60 / 40
    pred[5:8, 30:38, 2:12] = 0  # gt 3 missed
    pred[1:5, 34:38, 34:38] = 5  # a false positive
    scores = instance_scores(lambda s, e: pred[s:e], lambda s, e: truth[s:e], 8, slab=3)
    assert (scores["objects_predicted"], scores["objects_truth"], scores["true_positives_iou50"]) == (4, 3, 2)
    assert scores["precision_iou50"] == pytest.approx(2 / 4) and scores["recall_iou50"] == pytest.approx(2 / 3)
    assert scores["f1_iou50"] == pytest.approx(2 * 2 / (4 + 3))
    assert scores["split_truth_objects"] == 1 and scores["merged_predictions"] == 0
    assert scores["mean_matched_iou"] == pytest.approx((1.0 + 0.6) / 2)
    merged = truth.copy()
    merged[merged == 2] = 1
    assert instance_scores(lambda s, e: merged[s:e], lambda s, e: truth[s:e], 8)["merged_predictions"] == 1


def test_voxel_sizes_are_read_from_tiff_and_hdf5_metadata(tmp_path):
    volume = np.zeros((4, 16, 16), np.uint8)
    tifffile.imwrite(tmp_path / "ij.tif", volume, imagej=True, resolution=(1 / 0.005, 1 / 0.006),
                     metadata={"spacing": 0.03, "unit": "micron", "axes": "ZYX"})
    assert voxel_size_nm(tmp_path / "ij.tif") == pytest.approx((30.0, 6.0, 5.0))
    tifffile.imwrite(tmp_path / "plain.tif", volume, photometric="minisblack")  # (4, 16, 16): not RGB
    assert voxel_size_nm(tmp_path / "plain.tif") is None
    with h5py.File(tmp_path / "v.h5", "w") as handle:
        handle.create_dataset("raw", data=volume).attrs["element_size_um"] = [0.04, 0.008, 0.008]
    assert voxel_size_nm(f"{tmp_path / 'v.h5'}:/raw") == pytest.approx((40.0, 8.0, 8.0))


def tube(shape, z, y, x0, x1, radius, wobble=0.0):
    """A mitochondrion-like rod along x: a capsule of ``radius`` whose radius wobbles by ``wobble`` voxels."""
    zz, yy, xx = np.mgrid[tuple(slice(0, n) for n in shape)]
    r = radius + wobble * np.sin(xx / 3.0)
    along = np.clip(xx, x0, x1)
    return (zz - z) ** 2 + (yy - y) ** 2 + (xx - along) ** 2 <= r ** 2


def test_the_default_split_keeps_elongated_objects_whole_and_cuts_touching_ones_at_their_neck():
    shape = (24, 40, 120)
    # one long wobbly rod: its distance ridge has many small maxima, none a seed at the default depth
    rod = tube(shape, 12, 20, 10, 110, 6, wobble=1.0)
    assert segment(rod, split="distance")[1] == 1
    # two balls through a narrow neck: cut there (default seed depth, no seed distance)
    pair = ellipsoid(shape, (12, 20, 40), (9, 9, 9)) | ellipsoid(shape, (12, 20, 62), (9, 9, 9))
    pair |= tube(shape, 12, 20, 40, 62, 3)
    ids, count = segment(pair, split="distance")
    assert count == 2 and ids[12, 20, 36] != ids[12, 20, 66]
    # a deeper seed depth asks for a narrower neck: the same pair stays one object
    assert segment(pair, split="distance", seed_depth=0.9)[1] == 1
    # the seed distance merges seeds closer than it
    assert segment(pair, split="distance", min_distance=30)[1] == 1


def test_the_default_minimum_size_removes_specks_and_keeps_objects_of_the_volume_s_own_size():
    from mitoseg.instances.segment import auto_min_voxels, typical_object_voxels

    sizes = np.array([5000, 6000, 7000] + [3] * 40)  # three mitochondria and 40 specks of false foreground
    assert typical_object_voxels(sizes) == 6000 and auto_min_voxels(sizes) == 300
    assert typical_object_voxels(np.array([], dtype=np.int64)) == 0 and auto_min_voxels(np.zeros(0)) == 1
    shape = (20, 64, 64)
    objects = ellipsoid(shape, (10, 20, 20), (6, 8, 8)) | ellipsoid(shape, (10, 44, 44), (6, 9, 7))
    specks = np.zeros(shape, bool)
    specks[2, 2:60:6, 60] = specks[18, 60, 2:60:6] = True
    result = segment_instances(lambda s, e: (objects | specks)[s:e], shape, InstanceOptions())
    assert result.count == 2 and result.removed == int(ndimage.label(specks, FACES)[1])
    assert result.min_voxels == auto_min_voxels(np.bincount(ndimage.label(objects | specks, FACES)[0].ravel())[1:])
    # small objects are kept when every object is small: the minimum follows the volume
    small = ellipsoid(shape, (10, 20, 20), (2, 2, 2)) | ellipsoid(shape, (10, 44, 44), (2, 2, 2))
    assert segment_instances(lambda s, e: small[s:e], shape, InstanceOptions()).count == 2
    assert segment_instances(lambda s, e: small[s:e], shape, InstanceOptions(split="distance")).count == 2


def test_instances_command_writes_ids_and_a_measurement_table(tmp_path, capsys):
    shape = (32, 64, 64)
    pair = ellipsoid(shape, (16, 32, 20), (10, 10, 10)) | ellipsoid(shape, (16, 32, 37), (10, 10, 10))
    speck = ellipsoid(shape, (5, 8, 8), (1, 1, 1))
    tifffile.imwrite(tmp_path / "pred.tif", (pair | speck).astype(np.uint8), imagej=True,
                     resolution=(1 / 0.005, 1 / 0.005), metadata={"spacing": 0.005, "unit": "micron", "axes": "ZYX"})
    code, out, err = run_cli(["instances", "--prediction", tmp_path / "pred.tif", "--output", tmp_path / "inst.tif",
                              "--split", "distance", "--seed-depth", "0.3", "--min-distance", "5", "--min-voxels", "20",
                              "--no-progress"],
                             capsys)
    assert code == 0, err
    ids = tifffile.imread(tmp_path / "inst.tif")
    assert ids.dtype == np.uint32 and ids.shape == shape and set(np.unique(ids)) == {0, 1, 2}  # the speck removed
    assert "voxel size from" in out and "2 objects; volume median" in out
    with open(tmp_path / "inst_objects.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["id"]) for r in rows] == [1, 2] and "volume_um3" in rows[0] and "surface_area_um2" in rows[0]
    assert sum(int(r["voxels"]) for r in rows) == int(pair.sum())
    # The table is refused before any work when it exists, and Parquet needs pyarrow.
    code, _, err = run_cli(["instances", "--prediction", tmp_path / "pred.tif", "--output", tmp_path / "other.tif",
                            "--table", tmp_path / "inst_objects.csv"], capsys)
    assert_one_line_error(code, err, "inst_objects.csv", "exists", "--overwrite")
    assert not (tmp_path / "other.tif").exists()
    code, _, err = run_cli(["instances", "--prediction", tmp_path / "pred.tif", "--output", tmp_path / "p.tif",
                            "--split", "probability"], capsys)
    assert_one_line_error(code, err, "--split probability", "--probabilities")


def test_predict_instances_and_evaluate_instances_through_the_cli(tmp_path, tiny_volumes, capsys):
    import yaml

    from conftest import tiny_config_dict

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config_dict(tiny_volumes)))
    code, _, err = run_cli(["train", "--config", config, "--out", tmp_path / "run", "--no-progress"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["predict", "--checkpoint", tmp_path / "run" / "best.pt", "--input",
                              tiny_volumes["val_image"], "--output", tmp_path / "pred.tif", "--probabilities",
                              tmp_path / "probs.tif", "--instances", tmp_path / "inst.tif", "--voxel-size", "5", "5",
                              "5", "--no-progress"], capsys)
    assert code == 0, err
    labels, ids = tifffile.imread(tmp_path / "pred.tif"), tifffile.imread(tmp_path / "inst.tif")
    assert np.array_equal(ids > 0, labels > 0)
    reference, count = ndimage.label(labels > 0, structure=FACES)
    assert ids.max() == count
    with open(tmp_path / "inst_objects.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == count and all(0.0 <= float(r["mean_probability"]) <= 1.0 for r in rows)
    code, out, err = run_cli(["evaluate", "--instances", "--prediction", tmp_path / "inst.tif", "--label",
                              tiny_volumes["val_label"], "--probabilities", tmp_path / "probs.tif", "--no-progress"],
                             capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "inst_instance_metrics.json").read_text())
    truth, _ = ndimage.label(tifffile.imread(tiny_volumes["val_label"]) > 0, structure=FACES)
    assert report["objects_predicted"] == count and report["objects_truth"] == truth.max()
    assert report["ap_score"] == "mean foreground probability"
    assert 0.0 <= report["ap50"] <= 1.0 and 0.0 <= report["f1_iou50"] <= 1.0


@pytest.mark.parametrize("options", [dict(), dict(min_voxels=0), dict(min_voxels=3, slab=2),
                                     dict(split="distance", min_voxels=0, slab=3), dict(fill_holes=True, slab=4)])
def test_ids_kept_on_disk_equal_the_ids_in_memory(tmp_path, options):
    # On disk without a split the piece labels wait in a uint16 scratch file (MappedIds maps them as they are
    # read); the ids must be those of the in-memory path to the last voxel.
    from mitoseg.data.scratch import scratch_volumes

    rng = np.random.default_rng(7)
    mask = ndimage.binary_opening(rng.random((11, 48, 40)) < 0.45)
    expected = segment_instances(lambda s, e: mask[s:e], mask.shape, InstanceOptions(**options))
    with scratch_volumes(tmp_path) as scratch:
        kept = segment_instances(lambda s, e: mask[s:e], mask.shape, InstanceOptions(**options), scratch=scratch)
        assert kept.count == expected.count and kept.min_voxels == expected.min_voxels
        np.testing.assert_array_equal(np.asarray(kept.ids[:]), np.asarray(expected.ids[:]))


def test_a_slab_of_more_than_65535_pieces_moves_the_scratch_labels_to_uint32(tmp_path):
    from mitoseg.data.scratch import scratch_volumes
    from mitoseg.instances.segment import PieceLabels

    mask = np.zeros((4, 400, 400), bool)
    mask[0] = (np.indices((400, 400)).sum(0) % 2) == 0  # a checkerboard: 80 000 one-voxel pieces in slab 0
    mask[2:, 100:200, 100:200] = True
    with scratch_volumes(tmp_path) as scratch:
        made = []
        result = segment_instances(lambda s, e: mask[s:e], mask.shape, InstanceOptions(min_voxels=0, slab=2),
                                   scratch=lambda shape, dtype: made.append(np.dtype(dtype)) or scratch(shape, dtype))
        assert made == [np.uint16, np.uint32] and result.count == 80_001
        ids = np.asarray(result.ids[:])
        assert ids[0][mask[0]].min() == 1 and len(np.unique(ids[0][mask[0]])) == 80_000
        assert len(np.unique(ids[2:][mask[2:]])) == 1
    pieces = PieceLabels(lambda shape, dtype: np.zeros(shape, dtype), (2, 2, 2))
    pieces.write(0, np.array([[[1, 2], [3, 0]]], np.int32), 3)
    assert pieces.array.dtype == np.uint16 and pieces[0:1].tolist() == [[[1, 2], [3, 0]]]
