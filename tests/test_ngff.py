"""OME-Zarr (NGFF 0.4 on Zarr v2, 0.5 on Zarr v3): levels read by path or --level with their voxel size;
predict and instances write OME-Zarr that the ome-zarr library and napari-ome-zarr read back with the
right axes, scale and data, atomically."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from mitoseg.data.metadata import voxel_size_nm
from mitoseg.data.ngff import resolve_level
from mitoseg.data.readers import VolumeWriter, open_volume, read_volume
from mitoseg.errors import MitosegError

from conftest import assert_one_line_error, run_cli
from model_helpers import em_like, random_checkpoint

VERSIONS = ["0.4", "0.5"]


def fmt_of(version):
    from ome_zarr.format import FormatV04, FormatV05

    return FormatV04() if version == "0.4" else FormatV05()


def write_pyramid(path, image, version, labels=None):
    """An OME-Zarr image of two levels (y, x halved) written by the ome-zarr library, 30 x 5 x 5 nm at
    level 0 (in micrometres), with a label image ``labels/mito``."""
    from ome_zarr.writer import write_image, write_labels

    fmt = fmt_of(version)
    group = zarr.open_group(str(path), mode="w", zarr_format=fmt.zarr_format)
    write_image(image, group, scale_factors=[2], fmt=fmt, axes="zyx", scale={"z": 0.03, "y": 0.005, "x": 0.005},
                axes_units={a: "micrometer" for a in "zyx"})
    if labels is not None:
        write_labels(labels, group, name="mito", scale_factors=[2], fmt=fmt, axes="zyx")
    return group


@pytest.mark.parametrize("version", VERSIONS)
def test_levels_are_read_by_path_or_index_with_their_voxel_size(tmp_path, version):
    image = em_like((3, 32, 48))
    labels = (image > 128).astype(np.uint8)
    path = tmp_path / "vol.ome.zarr"
    group = write_pyramid(path, image, version, labels)
    level_paths = [d["path"] for d in (group.attrs.get("ome", group.attrs))["multiscales"][0]["datasets"]]
    assert len(level_paths) == 2
    assert group.info._zarr_format == (2 if version == "0.4" else 3)

    np.testing.assert_array_equal(read_volume(path), image)  # the image: its level 0
    assert voxel_size_nm(path) == pytest.approx((30.0, 5.0, 5.0))
    level1 = resolve_level(str(path), 1)
    assert level1 == f"{path}:/{level_paths[1]}"
    with open_volume(level1) as volume:
        assert volume.shape == (3, 16, 24)
        np.testing.assert_array_equal(volume.read(0, 3), group[level_paths[1]][:])
        # A region reads only what it covers, in (z, y, x) order.
        np.testing.assert_array_equal(volume.read_region(1, 3, slice(2, 9), slice(5, 20)),
                                      group[level_paths[1]][1:3, 2:9, 5:20])
    assert voxel_size_nm(level1) == pytest.approx((30.0, 10.0, 10.0))
    # A label image inside it, by path, and its levels.
    np.testing.assert_array_equal(read_volume(f"{path}:/labels/mito"), labels)
    assert resolve_level(f"{path}:/labels/mito", 1).startswith(f"{path}:/labels/mito/")
    with pytest.raises(MitosegError, match="has 2 level"):
        resolve_level(str(path), 2)
    with pytest.raises(MitosegError, match="already names a level"):
        resolve_level(level1, 0)
    # A scale for the whole image multiplies each level's.
    attrs = group.attrs.asdict()
    ome = attrs.get("ome", attrs)
    ome["multiscales"][0]["coordinateTransformations"] = [{"type": "scale", "scale": [1.0, 2.0, 2.0]}]
    group.attrs.update(attrs)
    assert voxel_size_nm(level1) == pytest.approx((30.0, 20.0, 20.0))


@pytest.mark.parametrize("version", VERSIONS)
def test_five_dimensional_images_and_channels(tmp_path, version):
    from ome_zarr.writer import write_image

    fmt = fmt_of(version)
    data = em_like((1, 2, 3, 16, 20))  # t, c, z, y, x
    group = zarr.open_group(str(tmp_path / "tczyx.ome.zarr"), mode="w", zarr_format=fmt.zarr_format)
    write_image(data, group, scale_factors=[], fmt=fmt, axes="tczyx")
    with open_volume(tmp_path / "tczyx.ome.zarr", channels=True) as volume:  # one time point dropped
        assert volume.shape == (3, 2, 16, 20)
        np.testing.assert_array_equal(volume.read(0, 3), np.moveaxis(data[0], 0, 1))
    with pytest.raises(MitosegError, match=r"expected a 2-D or 3-D"):  # two channels are not an EM image
        open_volume(tmp_path / "tczyx.ome.zarr")
    one = zarr.open_group(str(tmp_path / "c1.ome.zarr"), mode="w", zarr_format=fmt.zarr_format)
    write_image(data[:, :1], one, scale_factors=[], fmt=fmt, axes="tczyx")
    np.testing.assert_array_equal(read_volume(tmp_path / "c1.ome.zarr"), data[0, 0])
    many = zarr.open_group(str(tmp_path / "t2.ome.zarr"), mode="w", zarr_format=fmt.zarr_format)
    write_image(np.concatenate([data, data]), many, scale_factors=[], fmt=fmt, axes="tczyx")
    with pytest.raises(MitosegError, match="2 time points"):
        open_volume(tmp_path / "t2.ome.zarr")


def read_with_ome_zarr(path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    nodes = list(Reader(parse_url(str(path)))())
    return nodes[0]


def read_with_napari_ome_zarr(path):
    from napari_ome_zarr import napari_get_reader

    reader = napari_get_reader(str(path))
    assert reader is not None
    return reader()


@pytest.mark.parametrize("version", VERSIONS)
def test_written_labels_and_probabilities_open_in_ome_zarr_and_napari_ome_zarr(tmp_path, version, capsys):
    labels = (em_like((5, 24, 40)) > 140).astype(np.uint8) * 3
    probs = np.random.default_rng(0).random((5, 2, 24, 40)).astype(np.float16)
    # Nested: napari-ome-zarr looks for a parent image two folders above a label image.
    out = tmp_path / "a" / "b"
    with VolumeWriter(out / "labels.ome.zarr", labels.shape, np.uint8, voxel_size=(40.0, 6.0, 6.0), labels=True,
                      ngff_version=version, tile=(16, 16)) as writer:
        for start in range(0, 5, 2):  # slab by slab
            writer.write(start, labels[start:start + 2])
            assert not (out / "labels.ome.zarr").exists()  # it appears only when complete
    with VolumeWriter(out / "probs.ome.zarr", probs.shape, np.float16, ngff_version=version) as writer:
        writer.write(0, probs)

    node = read_with_ome_zarr(out / "labels.ome.zarr")
    assert [a["name"] for a in node.metadata["axes"]] == ["z", "y", "x"]
    assert [a.get("unit") for a in node.metadata["axes"]] == ["nanometer"] * 3
    assert node.metadata["coordinateTransformations"][0][0] == {"type": "scale", "scale": [40.0, 6.0, 6.0]}
    np.testing.assert_array_equal(np.asarray(node.data[0]), labels)
    root = zarr.open_group(str(out / "labels.ome.zarr"), mode="r")
    assert root.info._zarr_format == (2 if version == "0.4" else 3)
    attrs = dict(root.attrs)
    ome = attrs["ome"] if version == "0.5" else attrs
    assert ome["image-label"]["version"] == version
    assert root["0"].chunks == (1, 16, 16)

    node = read_with_ome_zarr(out / "probs.ome.zarr")
    assert [a["name"] for a in node.metadata["axes"]] == ["c", "z", "y", "x"]
    assert node.metadata["coordinateTransformations"][0][0]["scale"] == [1.0, 1.0, 1.0, 1.0]  # no voxel size
    np.testing.assert_array_equal(np.asarray(node.data[0]), np.moveaxis(probs, 1, 0))
    np.testing.assert_array_equal(read_volume(out / "probs.ome.zarr", channels=True), probs)  # back as (z, C, y, x)

    layers = read_with_napari_ome_zarr(out / "labels.ome.zarr")
    assert [kind for _, _, kind in layers] == ["labels"]
    data, meta, _ = layers[0]
    assert list(meta["scale"]) == [40.0, 6.0, 6.0] and tuple(meta["axis_labels"]) == ("z", "y", "x")
    np.testing.assert_array_equal(np.asarray(data[0]), labels)
    layers = read_with_napari_ome_zarr(out / "probs.ome.zarr")
    assert [kind for _, _, kind in layers] == ["image"]
    data, meta, _ = layers[0]
    assert meta["channel_axis"] == 0 and [name.split(": ")[-1] for name in meta["name"]] == ["class 0", "class 1"]
    np.testing.assert_array_equal(np.asarray(data[0]), np.moveaxis(probs, 1, 0))
    capsys.readouterr()  # napari-ome-zarr prints the root group's attributes


def test_ome_zarr_outputs_are_atomic_and_never_delete_foreign_data(tmp_path):
    path = tmp_path / "out.ome.zarr"
    with pytest.raises(RuntimeError):
        with VolumeWriter(path, (4, 8, 8), np.uint8, labels=True) as writer:
            writer.write(0, np.ones((2, 8, 8), np.uint8))
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary
    with pytest.raises(MitosegError, match="whole store"):
        VolumeWriter(f"{path}:/labels", (4, 8, 8), np.uint8)
    with pytest.raises(MitosegError, match="cannot be written"):
        VolumeWriter(path, (4, 8, 8), np.uint8, ngff_version="0.3")
    assert list(tmp_path.iterdir()) == []
    # Replacing our own output is allowed; an image with labels (or other levels) inside is not.
    with VolumeWriter(path, (2, 8, 8), np.uint8) as writer:
        writer.write(0, np.zeros((2, 8, 8), np.uint8))
    with VolumeWriter(path, (2, 8, 8), np.uint8, overwrite=True) as writer:
        writer.write(0, np.ones((2, 8, 8), np.uint8))
    assert read_volume(path).min() == 1
    # 64 x 64: ome-zarr warns that smaller slices are "too small to downsample" to its second level
    write_pyramid(tmp_path / "image.ome.zarr", em_like((2, 64, 64)), "0.5", labels=np.zeros((2, 64, 64), np.uint8))
    with pytest.raises(MitosegError, match="holds other data"):
        VolumeWriter(tmp_path / "image.ome.zarr", (2, 8, 8), np.uint8, overwrite=True)
    assert (tmp_path / "image.ome.zarr" / "labels").is_dir()


@pytest.mark.parametrize("version", VERSIONS)
def test_predict_and_instances_read_a_level_and_write_ome_zarr_with_the_voxel_size(tmp_path, version, capsys):
    checkpoint = random_checkpoint(tmp_path / "model.pt")
    image = em_like((4, 64, 96))
    write_pyramid(tmp_path / "vol.ome.zarr", image, version)
    labels, probs = tmp_path / "pred.ome.zarr", tmp_path / "probs.ome.zarr"
    code, out, err = run_cli(["predict", "--checkpoint", checkpoint, "--input", tmp_path / "vol.ome.zarr",
                              "--level", "1", "--output", labels, "--probabilities", probs, "--ngff-version", version,
                              "--no-progress"], capsys)
    assert code == 0, err
    # The same prediction as of the level's array named by path, written as plain Zarr.
    level1 = resolve_level(str(tmp_path / "vol.ome.zarr"), 1)
    code, _, err = run_cli(["predict", "--checkpoint", checkpoint, "--input", level1, "--output",
                            tmp_path / "plain.zarr", "--no-progress"], capsys)
    assert code == 0, err
    expected = read_volume(tmp_path / "plain.zarr")
    assert expected.shape == (4, 32, 48) and 0 < expected.mean() < 1
    node = read_with_ome_zarr(labels)
    np.testing.assert_array_equal(np.asarray(node.data[0]), expected)
    assert node.metadata["coordinateTransformations"][0][0]["scale"] == pytest.approx([30.0, 10.0, 10.0])
    assert "image-label" in (dict(zarr.open_group(str(labels), mode="r").attrs).get("ome")
                             or dict(zarr.open_group(str(labels), mode="r").attrs))
    node = read_with_ome_zarr(probs)
    assert np.asarray(node.data[0]).shape == (2, 4, 32, 48)
    assert node.metadata["coordinateTransformations"][0][0]["scale"] == pytest.approx([1.0, 30.0, 10.0, 10.0])

    objects = tmp_path / "objects.ome.zarr"
    code, out, err = run_cli(["instances", "--prediction", labels, "--output", objects, "--ngff-version", version,
                              "--no-progress"], capsys)
    assert code == 0, err
    assert "voxel size from" in out  # the labels' own NGFF scale
    node = read_with_ome_zarr(objects)
    ids = np.asarray(node.data[0])
    assert ids.dtype == np.uint32 and ids.max() >= 1 and np.array_equal(ids > 0, expected > 0)
    assert node.metadata["coordinateTransformations"][0][0]["scale"] == pytest.approx([30.0, 10.0, 10.0])
    assert (tmp_path / "objects_objects.csv").is_file()


def test_level_and_ome_zarr_errors_are_one_line(tmp_path, capsys):
    checkpoint = random_checkpoint(tmp_path / "model.pt")
    write_pyramid(tmp_path / "vol.ome.zarr", em_like((2, 32, 32)), "0.5")
    image = tmp_path / "plain.zarr"
    zarr.create_array(str(image), data=em_like((2, 32, 32)))
    base = ["predict", "--checkpoint", checkpoint, "--output", tmp_path / "out.ome.zarr", "--no-progress"]
    code, _, err = run_cli(base + ["--input", tmp_path / "vol.ome.zarr", "--level", "5"], capsys)
    assert_one_line_error(code, err, "--level 5", "has 2 level")
    code, _, err = run_cli(base + ["--input", image, "--level", "1"], capsys)
    assert_one_line_error(code, err, "--level 1", "not an OME-Zarr image")
    code, _, err = run_cli(["predict", "--checkpoint", checkpoint, "--input", image, "--output",
                            f"{tmp_path / 'out.ome.zarr'}:/x", "--no-progress"], capsys)
    assert_one_line_error(code, err, "whole store")
    code, _, err = run_cli(base + ["--input", tmp_path / "vol.ome.zarr:/9"], capsys)
    assert_one_line_error(code, err, "vol.ome.zarr:/9", "not found")
    assert not (tmp_path / "out.ome.zarr").exists()
