"""Scratch volumes: NumPy indexing on a file, and resident memory that does not grow with the volume."""

import re
import sys

import numpy as np
import pytest

from mitoseg.data.scratch import scratch_volumes


def resident_file_mib() -> float:
    """File-backed resident memory of this process (memory-mapped pages count here)."""
    status = open("/proc/self/status").read()
    return int(re.search(r"^RssFile:\s+(\d+)", status, re.M).group(1)) / 1024


def test_indexing_round_trip(tmp_path):
    reference = np.zeros((6, 7, 8), np.uint32)
    with scratch_volumes(tmp_path) as make:
        volume = make(reference.shape, np.uint32)
        assert volume.shape == reference.shape and volume.dtype == np.uint32 and len(volume) == 6
        assert not volume[...].any()  # starts as zeros
        rng = np.random.default_rng(0)
        for key in (np.s_[1:3], np.s_[2:5, 1:4, 3:8], np.s_[5], np.s_[0, :, 2]):
            values = rng.integers(0, 2 ** 32, size=reference[key].shape, dtype=np.uint32)
            volume[key] = values
            reference[key] = values
        np.testing.assert_array_equal(volume[...], reference)
        np.testing.assert_array_equal(volume[2:5, 1:4], reference[2:5, 1:4])
        np.testing.assert_array_equal(np.asarray(volume), reference)
        copy = volume[1:3]
        copy[:] = 0  # a read is a copy: the file is unchanged
        np.testing.assert_array_equal(volume[1:3], reference[1:3])
        assert list(tmp_path.iterdir()) == []  # the files have no name on disk


def test_empty_volume(tmp_path):
    with scratch_volumes(tmp_path) as make:
        assert make((0, 4, 4), np.uint8)[...].shape == (0, 4, 4)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_resident_memory_is_one_access(tmp_path):
    """Writing and reading 256 MiB slab by slab leaves the process's file-backed resident memory near the
    one 16 MiB slab; an open np.memmap would keep every page it touched (256 MiB)."""
    with scratch_volumes(tmp_path) as make:
        volume = make((64, 1024, 1024), np.uint32)
        before = resident_file_mib()
        slab = np.ones((4, 1024, 1024), np.uint32)
        for start in range(0, 64, 4):
            volume[start:start + 4] = slab * start
        total = sum(int(volume[start:start + 4, 0, 0].sum()) for start in range(0, 64, 4))
        assert total == sum(4 * start for start in range(0, 64, 4))
        assert resident_file_mib() - before < 64
