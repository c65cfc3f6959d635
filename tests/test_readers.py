"""Volume readers, writers and slice selections (mitoseg.data.readers)."""

from __future__ import annotations

import os

import h5py
import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import zarr

from mitoseg.data.readers import (
    Volume,
    VolumeWriter,
    open_volume,
    read_volume,
    select_slices,
    write_volume,
)
from mitoseg.errors import MitosegError


def random_volume(shape, dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.random(shape).astype(dtype)
    return rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)


def raises_naming(name, fn, *args, **kwargs) -> MitosegError:
    """Call fn, expect a one-line MitosegError whose message names ``name``."""
    with pytest.raises(MitosegError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert str(name) in message, message
    assert "\n" not in message
    return info.value


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_round_trip(tmp_path, dtype):
    path = tmp_path / "stack.tif"
    data = random_volume((5, 20, 30), dtype)
    write_volume(path, data)
    back = read_volume(path)
    assert back.dtype == dtype and back.shape == data.shape
    np.testing.assert_array_equal(back, data)
    np.testing.assert_array_equal(tifffile.imread(path), data)  # other tools see the same volume


def test_tiff_round_trip_of_tiny_slices(tmp_path):
    # Pages this small are where tifffile mistakes separately written pages for one block.
    path = tmp_path / "tiny.tiff"
    data = random_volume((3, 4, 5))
    write_volume(path, data)
    np.testing.assert_array_equal(read_volume(path), data)
    np.testing.assert_array_equal(tifffile.imread(path), data)


def test_tiff_4d_float16_round_trip(tmp_path):
    path = tmp_path / "probs.tif"
    data = random_volume((4, 3, 16, 18), np.float16)
    with VolumeWriter(path, data.shape, np.float16) as writer:
        writer.write(0, data[:3])  # uneven slabs
        writer.write(3, data[3:])
    back = read_volume(path, channels=True)
    assert back.shape == (4, 3, 16, 18) and back.dtype == np.float16
    np.testing.assert_array_equal(back, data)
    assert tifffile.imread(path).shape == data.shape
    with open_volume(path, channels=True) as volume:
        np.testing.assert_array_equal(volume.read(1, 3), data[1:3])
        np.testing.assert_array_equal(volume.read_slices([3, 0]), data[[3, 0]])
    # As an image volume, 4-D is refused.
    assert "(4, 3, 16, 18)" in str(raises_naming("probs.tif", open_volume, path))


@pytest.mark.filterwarnings("ignore:<tifffile.TiffWriter.write> data with shape:DeprecationWarning")
def test_tiff_written_by_other_tools(tmp_path):
    data = random_volume((6, 10, 12), np.uint16, seed=3)
    tifffile.imwrite(tmp_path / "plain.tif", data)
    tifffile.imwrite(tmp_path / "zlib.tif", data, compression="zlib")
    tifffile.imwrite(tmp_path / "imagej.tif", data, imagej=True)
    # tifffile stores 3 or 4 slices as one RGB(A) page with separate planes.
    tifffile.imwrite(tmp_path / "planar.tif", data[:3], compression="zlib")
    with tifffile.TiffFile(tmp_path / "planar.tif") as tif:
        assert len(tif.pages) == 1
    with open_volume(tmp_path / "planar.tif") as volume:
        np.testing.assert_array_equal(volume.read(1, 3), data[1:3])
    # One IFD for all pages, like ImageJ stacks over 4 GB: read through a memory map.
    tifffile.imwrite(tmp_path / "truncated.tif", data, truncate=True)
    with tifffile.TiffFile(tmp_path / "truncated.tif") as tif:
        assert len(tif.pages) == 1
    for name in ("plain.tif", "zlib.tif", "imagej.tif", "truncated.tif"):
        with open_volume(tmp_path / name) as volume:
            assert volume.shape == data.shape, name
            np.testing.assert_array_equal(volume.read(2, 5), data[2:5], err_msg=name)
            np.testing.assert_array_equal(volume.read_slices([5, 0, 5]), data[[5, 0, 5]], err_msg=name)


def test_single_page_tiff_is_one_slice(tmp_path):
    image = random_volume((10, 12))
    tifffile.imwrite(tmp_path / "page.tif", image)
    back = read_volume(tmp_path / "page.tif")
    assert back.shape == (1, 10, 12)
    np.testing.assert_array_equal(back[0], image)


def test_tiff_read_is_lazy(tmp_path):
    path = tmp_path / "stack.tif"
    data = random_volume((4, 64, 64))
    tifffile.imwrite(path, data, compression="zlib", photometric="minisblack")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[3].dataoffsets[0]
    with open(path, "r+b") as f:  # damage only the last page's compressed data
        f.seek(offset)
        f.write(b"\xff" * 32)
    with open_volume(path) as volume:
        np.testing.assert_array_equal(volume.read(0, 3), data[:3])  # never touches page 3
        np.testing.assert_array_equal(volume.read_slices([2, 0]), data[[2, 0]])
        error = raises_naming("stack.tif", volume.read, 2, 4)
    assert error.__cause__ is not None


def test_h5_round_trip_with_dataset_path(tmp_path):
    path = tmp_path / "out.h5"
    data = random_volume((5, 12, 14), np.uint16)
    write_volume(f"{path}:/group/pred", data)
    with h5py.File(path) as f:
        assert list(f) == ["group"]
        np.testing.assert_array_equal(f["group/pred"][()], data)
    np.testing.assert_array_equal(read_volume(f"{path}:/group/pred"), data)
    np.testing.assert_array_equal(read_volume(f"{path}:/group/pred/"), data)


def test_h5_single_dataset_without_path(tmp_path):
    path = tmp_path / "raw.hdf5"
    data = random_volume((3, 8, 9), np.float32)
    with h5py.File(path, "w") as f:
        f.create_group("meta")
        f["volumes/raw"] = data
    back = read_volume(path)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, data)


def test_h5_2d_dataset_is_one_slice(tmp_path):
    path = tmp_path / "image.h5"
    image = random_volume((8, 9))
    with h5py.File(path, "w") as f:
        f["image"] = image
    with open_volume(f"{path}:/image") as volume:
        assert volume.shape == (1, 8, 9)
        np.testing.assert_array_equal(volume.read(0, 1)[0], image)


def test_h5_big_endian_data_reads_native(tmp_path):
    path = tmp_path / "be.h5"
    data = random_volume((2, 5, 6), np.uint16)
    with h5py.File(path, "w") as f:
        f.create_dataset("raw", data=data.astype(">u2"))
    back = read_volume(path)
    assert back.dtype == np.uint16 and back.dtype.isnative
    np.testing.assert_array_equal(back, data)


def test_zarr_root_array_round_trip(tmp_path):
    path = tmp_path / "vol.zarr"
    data = random_volume((6, 10, 11), np.uint8)
    write_volume(path, data)
    assert isinstance(zarr.open(str(path), mode="r"), zarr.Array)
    np.testing.assert_array_equal(read_volume(path), data)
    np.testing.assert_array_equal(read_volume(f"{path}/"), data)


def test_zarr_group_path_round_trip(tmp_path):
    path = tmp_path / "vol.zarr"
    data = random_volume((4, 2, 10, 11), np.float16)
    write_volume(f"{path}:/predictions/probs", data)
    group = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(group["predictions/probs"][:], data)
    np.testing.assert_array_equal(read_volume(f"{path}:/predictions/probs", channels=True), data)
    # The group holds exactly one array, so the path may be left out.
    np.testing.assert_array_equal(read_volume(path, channels=True), data)


def test_png_folder_natural_order(tmp_path):
    folder = tmp_path / "slices"
    folder.mkdir()
    data = random_volume((12, 9, 10))
    for i, image in enumerate(data, start=1):
        iio.imwrite(folder / f"slice{i}.png", image)
    (folder / "notes.txt").write_text("not an image")
    with open_volume(folder) as volume:
        assert volume.shape == (12, 9, 10)
        np.testing.assert_array_equal(volume.read(0, 12), data)  # slice2 before slice10
        np.testing.assert_array_equal(volume.read(9, 11), data[9:11])
        np.testing.assert_array_equal(volume.read_slices([11, 1]), data[[11, 1]])


def test_tiff_slice_folder_uint16(tmp_path):
    data = random_volume((3, 7, 8), np.uint16)
    for i, image in enumerate(data):
        tifffile.imwrite(tmp_path / f"z{i:03d}.tiff", image)
    back = read_volume(tmp_path)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, data)


def test_gray_rgb_png_is_reduced_to_one_channel(tmp_path):
    data = random_volume((2, 6, 7))
    for i, image in enumerate(data):
        iio.imwrite(tmp_path / f"{i}.png", np.stack([image] * 3, axis=-1))
    back = read_volume(tmp_path)
    assert back.shape == (2, 6, 7)
    np.testing.assert_array_equal(back, data)


# ---------------------------------------------------------------- lazy access, all formats


@pytest.fixture(params=["tif", "h5", "zarr", "zarr-group", "png"])
def stored(request, tmp_path):
    data = random_volume((7, 9, 10), seed=5)
    if request.param == "png":
        spec = tmp_path / "png"
        spec.mkdir()
        for i, image in enumerate(data):
            iio.imwrite(spec / f"s{i}.png", image)
    else:
        spec = {"tif": f"{tmp_path}/v.tif", "h5": f"{tmp_path}/v.h5:/raw", "zarr": f"{tmp_path}/v.zarr",
                "zarr-group": f"{tmp_path}/g.zarr:/a/raw"}[request.param]
        write_volume(spec, data)
    return spec, data


def test_read_ranges_and_selected_slices(stored):
    spec, data = stored
    with open_volume(spec) as volume:
        assert isinstance(volume, Volume)
        assert volume.path == str(spec)
        assert volume.shape == data.shape and len(volume) == 7 and volume.dtype == np.uint8
        for start, stop in [(0, 7), (2, 5), (6, 7), (3, 3)]:
            np.testing.assert_array_equal(volume.read(start, stop), data[start:stop])
        np.testing.assert_array_equal(volume.read_slices([5, 1, 2, 3, 5]), data[[5, 1, 2, 3, 5]])
        assert volume.read_slices([]).shape == (0, 9, 10)
        name = os.path.basename(str(spec).split(":")[0])
        raises_naming(name, volume.read, 5, 8)
        raises_naming(name, volume.read, -1, 2)
        raises_naming(name, volume.read, 4, 3)
        raises_naming(name, volume.read_slices, [0, 7])
        raises_naming(name, volume.read_slices, [-1])
    np.testing.assert_array_equal(read_volume(spec, slices=[6, 0]), data[[6, 0]])


# ---------------------------------------------------------------- reader errors


def test_missing_inputs(tmp_path):
    for spec in ("nothing.tif", "nothing.h5:/raw", "nothing.zarr", "no_folder"):
        raises_naming(spec, open_volume, tmp_path / spec)


def test_unknown_extension(tmp_path):
    path = tmp_path / "volume.nii"
    path.write_bytes(b"\0" * 64)
    error = raises_naming("volume.nii", open_volume, path)
    assert ".tif" in str(error) and ".h5" in str(error) and ".zarr" in str(error)


@pytest.mark.parametrize("name", ["garbage.tif", "empty.tiff", "garbage.h5"])
def test_not_a_volume_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else b"this is not an image at all" * 10)
    error = raises_naming(name, open_volume, path)
    assert error.__cause__ is not None


def test_not_a_zarr_store(tmp_path):
    (tmp_path / "plain.zarr").mkdir()
    raises_naming("plain.zarr", open_volume, tmp_path / "plain.zarr")


@pytest.mark.filterwarnings("ignore:The legacy `DICOM` plugin:DeprecationWarning")  # imageio probing
def test_corrupt_png_in_folder(tmp_path):
    for i in range(3):
        iio.imwrite(tmp_path / f"s{i}.png", random_volume((5, 5), seed=i))
    (tmp_path / "s3.png").write_bytes(b"\x89PNG broken")
    error = raises_naming("s3.png", open_volume, tmp_path)
    assert error.__cause__ is not None


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    raises_naming(tmp_path.name, open_volume, tmp_path)


def test_folder_slices_must_match(tmp_path):
    for i in range(1, 12):
        shape = (6, 6) if i < 9 else (6, 7)
        iio.imwrite(tmp_path / f"slice{i}.png", random_volume(shape, seed=i))
    # slice9 is the first mismatch in natural order (lexicographically slice10 would be).
    error = raises_naming("slice9.png", open_volume, tmp_path)
    assert "slice10" not in str(error)


def test_folder_dtypes_must_match(tmp_path):
    iio.imwrite(tmp_path / "a1.png", random_volume((6, 6)))
    iio.imwrite(tmp_path / "a2.png", random_volume((6, 6), np.uint16))
    raises_naming("a2.png", open_volume, tmp_path)


def test_colour_png_is_an_error(tmp_path):
    iio.imwrite(tmp_path / "colour.png", random_volume((6, 6, 3)))
    with open_volume(tmp_path) as volume:  # headers alone cannot tell gray RGB from colour
        raises_naming("colour.png", volume.read, 0, 1)


def test_empty_arrays(tmp_path):
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_dataset("raw", shape=(0, 4, 4), dtype=np.uint8)
    raises_naming("empty.h5", open_volume, tmp_path / "empty.h5")
    zarr.create_array(store=str(tmp_path / "empty.zarr"), shape=(3, 0, 4), dtype=np.uint8)
    raises_naming("empty.zarr", open_volume, tmp_path / "empty.zarr")
    with h5py.File(tmp_path / "nothing.h5", "w") as f:
        f.create_group("only_a_group")
    raises_naming("nothing.h5", open_volume, tmp_path / "nothing.h5")


def test_wrong_number_of_dimensions(tmp_path):
    with h5py.File(tmp_path / "dims.h5", "w") as f:
        f["line"] = np.zeros(5, np.uint8)
        f["rgb"] = np.zeros((2, 4, 4, 3), np.uint8)
    error = raises_naming("dims.h5:/line", open_volume, f"{tmp_path}/dims.h5:/line")
    assert "(5,)" in str(error)
    error = raises_naming("dims.h5:/rgb", open_volume, f"{tmp_path}/dims.h5:/rgb")
    assert "(2, 4, 4, 3)" in str(error)


def test_unsupported_dtype(tmp_path):
    with h5py.File(tmp_path / "complex.h5", "w") as f:
        f["raw"] = np.zeros((2, 3, 3), np.complex64)
    raises_naming("complex.h5", open_volume, tmp_path / "complex.h5")


def test_h5_dataset_not_found_lists_datasets(tmp_path):
    path = tmp_path / "two.h5"
    with h5py.File(path, "w") as f:
        f["raw"] = np.zeros((2, 3, 3), np.uint8)
        f["labels/mito"] = np.zeros((2, 3, 3), np.uint8)
    error = raises_naming("two.h5", open_volume, f"{path}:/missing")
    assert "/raw" in str(error) and "/labels/mito" in str(error)
    error = raises_naming("two.h5", open_volume, f"{path}:/labels")  # a group, not a dataset
    assert "/labels/mito" in str(error)
    error = raises_naming("two.h5", open_volume, path)  # ambiguous without a dataset
    assert "/raw" in str(error) and "/labels/mito" in str(error)


def test_zarr_array_not_found_lists_arrays(tmp_path):
    path = tmp_path / "g.zarr"
    group = zarr.open_group(str(path), mode="w")
    group.create_array(name="raw", shape=(2, 3, 3), dtype=np.uint8)
    group.create_array(name="seg/mito", shape=(2, 3, 3), dtype=np.uint8)
    error = raises_naming("g.zarr", open_volume, f"{path}:/nope")
    assert "/raw" in str(error) and "/seg/mito" in str(error)
    raises_naming("g.zarr", open_volume, path)
    np.testing.assert_array_equal(read_volume(f"{path}:/seg/mito"), np.zeros((2, 3, 3)))


# ---------------------------------------------------------------- writing and atomicity


@pytest.mark.parametrize("spec", ["out.tif", "out.h5:/pred", "out.zarr", "out.zarr:/a/pred"])
def test_writer_appears_only_on_close(tmp_path, spec):
    data = random_volume((4, 8, 8))
    final = tmp_path / spec.split(":")[0]
    with VolumeWriter(tmp_path / spec, data.shape, data.dtype) as writer:
        writer.write(0, data[:2])
        assert not final.exists()
        writer.write(2, data[2:])
        assert not final.exists()
    np.testing.assert_array_equal(read_volume(tmp_path / spec), data)
    assert os.listdir(tmp_path) == [final.name]  # no temporary left behind


@pytest.mark.parametrize("spec", ["out.tif", "out.h5:/pred", "out.zarr"])
def test_aborted_writer_leaves_nothing(tmp_path, spec):
    with pytest.raises(RuntimeError):
        with VolumeWriter(tmp_path / spec, (4, 8, 8), np.uint8) as writer:
            writer.write(0, np.ones((2, 8, 8), np.uint8))
            assert os.listdir(tmp_path)  # the temporary exists while writing
            raise RuntimeError("inference failed")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("spec", ["out.tif", "out.h5:/pred", "out.zarr"])
def test_overwrite(tmp_path, spec):
    old, new = random_volume((2, 5, 5), seed=1), random_volume((3, 5, 5), seed=2)
    write_volume(tmp_path / spec, old)
    name = spec.split(":")[0]
    raises_naming(f"{name} exists; pass --overwrite", write_volume, tmp_path / spec, new)
    np.testing.assert_array_equal(read_volume(tmp_path / spec), old)
    # An aborted overwrite keeps the old output.
    with pytest.raises(RuntimeError):
        with VolumeWriter(tmp_path / spec, new.shape, new.dtype, overwrite=True) as writer:
            writer.write(0, new)
            raise RuntimeError("stop")
    np.testing.assert_array_equal(read_volume(tmp_path / spec), old)
    write_volume(tmp_path / spec, new, overwrite=True)
    np.testing.assert_array_equal(read_volume(tmp_path / spec), new)
    assert os.listdir(tmp_path) == [name]


def test_overwrite_refuses_to_drop_other_datasets(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f["raw"] = np.zeros((2, 4, 4), np.uint8)
    raises_naming("data.h5", VolumeWriter, f"{path}:/pred", (2, 4, 4), np.uint8)
    error = raises_naming("data.h5", VolumeWriter, f"{path}:/pred", (2, 4, 4), np.uint8, overwrite=True)
    assert "/raw" in str(error)
    with h5py.File(path) as f:
        assert list(f) == ["raw"]


def test_overwrite_refuses_to_delete_a_plain_folder(tmp_path):
    folder = tmp_path / "precious.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    raises_naming("precious.zarr", VolumeWriter, folder, (2, 4, 4), np.uint8, overwrite=True)
    assert (folder / "notes.txt").exists()


def test_same_file_twice_is_refused(tmp_path):
    with VolumeWriter(f"{tmp_path}/out.h5:/labels", (1, 4, 4), np.uint8) as writer:
        raises_naming("out.h5", VolumeWriter, f"{tmp_path}/out.h5:/probs", (1, 2, 4, 4), np.float16)
        writer.write(0, np.zeros((1, 4, 4), np.uint8))
    assert read_volume(f"{tmp_path}/out.h5:/labels").shape == (1, 4, 4)


def test_writer_rejects_bad_slabs(tmp_path):
    path = tmp_path / "out.tif"
    with pytest.raises(MitosegError):
        with VolumeWriter(path, (4, 6, 6), np.uint8) as writer:
            raises_naming("out.tif", writer.write, 0, np.zeros((2, 6, 7), np.uint8))  # wrong shape
            raises_naming("out.tif", writer.write, 0, np.zeros((2, 6), np.uint8))  # wrong ndim
            raises_naming("out.tif", writer.write, 1, np.zeros((1, 6, 6), np.uint8))  # gap
            writer.write(0, np.zeros((2, 6, 6), np.uint8))
            raises_naming("out.tif", writer.write, 0, np.zeros((1, 6, 6), np.uint8))  # out of order
            raises_naming("out.tif", writer.write, 2, np.zeros((3, 6, 6), np.uint8))  # past the end
            raises_naming("out.tif", writer.write, 2, np.zeros((1, 6, 6), np.float32))  # lossy cast
            writer.write(2, np.zeros((1, 6, 6), np.uint8))
        # leaving the block closes with a slice missing
    assert os.listdir(tmp_path) == []


def test_unwritable_outputs(tmp_path):
    error = raises_naming("out.png", VolumeWriter, tmp_path / "out.png", (2, 4, 4), np.uint8)
    assert ".tif" in str(error) and ".zarr" in str(error)
    raises_naming("slices", VolumeWriter, tmp_path / "slices", (2, 4, 4), np.uint8)
    raises_naming("out.h5", VolumeWriter, tmp_path / "out.h5", (2, 4, 4), np.uint8)  # no dataset given
    assert os.listdir(tmp_path) == []


def test_writer_creates_missing_parent_folders(tmp_path):
    data = random_volume((2, 4, 4))
    write_volume(tmp_path / "a" / "b" / "out.tif", data)
    np.testing.assert_array_equal(read_volume(tmp_path / "a" / "b" / "out.tif"), data)


# ---------------------------------------------------------------- select_slices


@pytest.mark.parametrize("selection, expected", [
    (None, list(range(10))),
    (3, [3]),
    (-1, [9]),
    ("0:3", [0, 1, 2]),
    ("7:", [7, 8, 9]),
    (":2", [0, 1]),
    ("0:10:4", [0, 4, 8]),
    ("-3:", [7, 8, 9]),
    ("8:5:-1", [6, 7, 8]),
    ("3,7, 1", [1, 3, 7]),
    ("0:2, 5, 8:10", [0, 1, 5, 8, 9]),
    ([4, "0:2", "6,8", 4], [0, 1, 4, 6, 8]),
    ((np.int64(2), "2"), [2]),
    ("0:10", list(range(10))),
])
def test_select_slices_forms(selection, expected):
    assert select_slices(selection, 10, "data.train.slices") == expected


@pytest.mark.parametrize("selection, offending", [
    (10, "10"),
    (-11, "-11"),
    ("0:11", "0:11"),
    ("-12:3", "-12:3"),
    ("3,12", "12"),
    ([1, 40], "40"),
    ("a:3", "a:3"),
    ("1.5", "1.5"),
    ("1:2:3:4", "1:2:3:4"),
    ("0:5:0", "0:5:0"),
    ("3,,4", "3,,4"),
    ("5:5", "5:5"),
    ([1.0], "1.0"),
    (True, "True"),
    ({"start": 1}, "start"),
    ([], "selects no slices"),
])
def test_select_slices_errors(selection, offending):
    with pytest.raises(MitosegError) as info:
        select_slices(selection, 10, "data.train.slices")
    message = str(info.value)
    assert message.startswith("data.train.slices: "), message
    assert offending in message, message


# ---------------------------------------------------------------- damaged files


@pytest.mark.filterwarnings("ignore:<tifffile.TiffWriter.write> data with shape:DeprecationWarning")
def test_a_tiff_cut_anywhere_is_an_error_naming_a_page_or_reads_whole(tmp_path, capfd):
    data = random_volume((8, 16, 16), seed=4)
    writers = {
        "plain.tif": lambda path: tifffile.imwrite(path, data, photometric="minisblack"),
        "zlib.tif": lambda path: tifffile.imwrite(path, data, photometric="minisblack", compression="zlib"),
        "imagej.tif": lambda path: tifffile.imwrite(path, data, imagej=True),
        "one_ifd.tif": lambda path: tifffile.imwrite(path, data, truncate=True),
        "mitoseg.tif": lambda path: write_volume(path, data),
    }
    for name, write in writers.items():
        write(tmp_path / name)
        content = (tmp_path / name).read_bytes()
        for cut in range(16, len(content), max(1, len(content) // 60)):
            (tmp_path / "cut.tif").write_bytes(content[:cut])
            try:
                with open_volume(tmp_path / "cut.tif") as volume:
                    back = volume.read(0, len(volume))
            except MitosegError as exc:
                message = str(exc)
                assert "cut.tif" in message and "\n" not in message, (name, cut, message)
                assert "page" in message or "TIFF" in message, (name, cut, message)
                continue
            # Never fewer slices: a file that opens is the whole volume.
            assert back.shape == data.shape and np.array_equal(back, data), (name, cut)
    (tmp_path / "cut.tif").write_bytes((tmp_path / "zlib.tif").read_bytes()[:1500])
    with pytest.raises(MitosegError, match=r"cut.tif: page \d+ cannot be read; the TIFF file is truncated"):
        open_volume(tmp_path / "cut.tif")
    assert capfd.readouterr().err == ""  # tifffile's log records never reach the terminal


def test_check_finite_names_the_slice_and_the_kind(tmp_path):
    from mitoseg.data.readers import check_finite

    data = np.zeros((4, 3, 3), np.float32)
    check_finite(data, "v.tif")
    check_finite(np.zeros((2, 2, 2), np.uint8), "v.tif")
    data[2, 1, 1], data[2, 0, 0], data[3, 0, 0] = np.inf, np.nan, -np.inf
    with pytest.raises(MitosegError, match=r"v.tif: slice 12 holds 2 non-finite values \(NaN, \+inf\)"):
        check_finite(data, "v.tif", start=10)
    write_volume(tmp_path / "v.tif", data)
    with open_volume(tmp_path / "v.tif") as volume:
        volume.read(0, 4)  # reading is not checking, unless asked
    with open_volume(tmp_path / "v.tif", finite=True) as volume:
        np.testing.assert_array_equal(volume.read(0, 2), data[:2])
        raises_naming("slice 3", volume.read_slices, [3])


def test_writer_removes_temporaries_of_dead_processes_only(tmp_path):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = tmp_path / f".out.tif.tmp-{proc.pid}"
    dead.write_bytes(b"left by kill -9")
    dead_zarr = tmp_path / f".out.zarr.tmp-{proc.pid}"
    dead_zarr.mkdir()
    living = tmp_path / f".out.tif.tmp-{os.getppid()}"  # a living process writing the same output
    living.write_bytes(b"in use")
    other = tmp_path / f".other.tif.tmp-{proc.pid}"  # not this output's: left alone
    other.write_bytes(b"x")
    write_volume(tmp_path / "out.tif", random_volume((2, 4, 4)))
    write_volume(tmp_path / "out.zarr", random_volume((2, 4, 4)))
    assert not dead.exists() and not dead_zarr.exists() and living.exists() and other.exists()


def test_writer_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "FILE").write_bytes(b"x")
    raises_naming("FILE is a file, not a directory", VolumeWriter, tmp_path / "FILE" / "o.tif", (1, 4, 4), np.uint8)
    (tmp_path / "o.tif").mkdir()
    raises_naming("o.tif is a directory", VolumeWriter, tmp_path / "o.tif", (1, 4, 4), np.uint8, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE", "o.tif"]
