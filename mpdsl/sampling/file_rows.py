"""Rows of a memory-mapped ``.npy`` array read with ``pread`` instead of through the mapping.

A read through a file mapping maps the page-cache folios it touches into the process (whole folios,
up to 2 MiB each on recent Linux kernels, whatever the row size), and they count in its resident set
until the kernel needs the memory: the random rows of one sampled batch can map most of a feature
file. ``pread`` copies the rows into the batch's own array and maps nothing, so a process's resident
memory stays its batches'. The kernel reads rows in parallel (Numba, ``pread`` is position-independent
and thread-safe) and is cached on disk like the backend's kernels.
"""

from __future__ import annotations

import mmap
import os
import threading

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from mpdsl.backends import cpu_kernels  # noqa: F401  (sets Numba's cache folder and threading layer)
from mpdsl.backends.cpu_kernels import launch

__all__ = ["mapped_file", "read_rows"]


@intrinsic
def _pread(typingctx, fd, address, count, offset):
    """libc's ``pread(fd, (void *) address, count, offset)``: the bytes read, or -1."""
    signature = types.int64(types.int64, types.uintp, types.int64, types.int64)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(i64, [ir.IntType(32), ir.IntType(8).as_pointer(), i64, i64]), "pread")
        fd_value, address_value, count_value, offset_value = args
        return builder.call(function, [builder.trunc(fd_value, ir.IntType(32)),
                                       builder.inttoptr(address_value, ir.IntType(8).as_pointer()),
                                       count_value, offset_value])

    return signature, codegen


@njit(parallel=True, nogil=True, cache=True, boundscheck=False)
def _read_rows(fd, offset, row_bytes, rows, out):
    """out's row i = the file's bytes [offset + rows[i] * row_bytes, + row_bytes); the count of rows
    that could not be read in full (0 on success)."""
    address = out.ctypes.data
    failed = 0
    for i in prange(rows.shape[0]):
        done = 0
        while done < row_bytes:
            got = _pread(fd, address + i * row_bytes + done, row_bytes - done, offset + rows[i] * row_bytes + done)
            if got <= 0:
                failed += 1
                break
            done += got
    return failed


_descriptors: dict[tuple[str, int], int] = {}
_descriptors_lock = threading.Lock()


def mapped_file(array: np.ndarray) -> np.memmap | None:
    """The memory-mapped ``.npy`` array (``numpy.load(mmap_mode=...)``: its file, offset and layout
    known) of which ``array`` is the whole (itself, or a view of all of it, such as a read-only one), or
    None: then ``read_rows`` cannot read it."""
    root: object = array
    while isinstance(root, np.ndarray) and not isinstance(root.base, mmap.mmap):
        root = root.base
    if not (isinstance(root, np.memmap) and getattr(root, "filename", None) is not None and hasattr(os, "pread")):
        return None
    same = (array.__array_interface__["data"][0] == root.__array_interface__["data"][0]
            and array.shape == root.shape and array.dtype == root.dtype and array.strides == root.strides)
    return root if same and root.ndim >= 1 and root.flags.c_contiguous else None


def read_rows(array: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = array[rows]`` for an array with a ``mapped_file``, read from its file (``rows`` int64,
    in range; ``out`` C-contiguous of the right shape and dtype)."""
    root = mapped_file(array)
    assert root is not None, "read_rows needs a whole memory-mapped .npy array"
    array = root
    filename = str(array.filename)
    key = (filename, os.getpid())
    with _descriptors_lock:
        fd = _descriptors.get(key)
        if fd is None:
            fd = _descriptors[key] = os.open(filename, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    row_bytes = array.itemsize * (array.size // array.shape[0] if array.shape[0] else 0)
    if rows.shape[0] == 0 or row_bytes == 0:
        return
    failed = launch(_read_rows, fd, int(array.offset), row_bytes, np.ascontiguousarray(rows, dtype=np.int64), out)
    if failed:
        raise OSError(f"could not read {failed} rows of {filename} (was the file truncated?)")
