"""Scratch volumes on disk for the work that must see a whole volume (post-processing, instances) while
memory stays bounded by a slab.

A :class:`ScratchVolume` lives in a temporary file without a name on disk, so nothing is left behind,
even after kill -9. Each read or write maps the file, copies the slices or the box it needs and unmaps
it again: the process's resident memory is that one access, whatever the volume (a memory map kept
open would count every page it ever touched as resident, which grows with the volume). The pages stay
in the kernel's page cache, which writes them to disk and frees them under memory pressure.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np


class ScratchVolume:
    """A zero-filled array of ``shape`` and ``dtype`` in the open binary file ``handle``, indexed like a
    NumPy array: ``volume[key]`` returns a copy, ``volume[key] = values`` writes through."""

    def __init__(self, handle, shape: tuple[int, ...], dtype):
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._handle = handle
        self._nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self._handle.truncate(self._nbytes)  # a sparse file of zeros

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _mapped(self) -> np.ndarray:
        # A fresh map per access, dropped (unmapped) as soon as the access is done.
        if self._nbytes == 0:
            return np.zeros(self.shape, self.dtype)  # mmap refuses an empty file
        return np.memmap(self._handle, dtype=self.dtype, mode="r+", shape=self.shape)

    def __getitem__(self, key) -> np.ndarray:
        return np.array(self._mapped()[key])

    def __setitem__(self, key, values) -> None:
        self._mapped()[key] = values

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype, copy=False)


@contextlib.contextmanager
def scratch_volumes(folder: str | Path) -> Iterator[Callable[[tuple, np.dtype], ScratchVolume]]:
    """``make(shape, dtype)`` -> a :class:`ScratchVolume` in ``folder`` (next to the output, where there is
    room for it); the files are closed, and so gone, when the block ends."""
    with contextlib.ExitStack() as stack:
        def make(shape, dtype) -> ScratchVolume:
            handle = stack.enter_context(tempfile.TemporaryFile(dir=folder))
            return ScratchVolume(handle, shape, dtype)

        yield make
