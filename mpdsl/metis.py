"""METIS graph partitioning through METIS's C API, from the library that ``pymetis`` ships.

``pymetis.part_graph`` holds the GIL for the whole partition, so nothing else in the process runs
while it works (a first run's kernel loading, for one). Its extension module exports METIS's own C
functions; called through ``ctypes`` they run with the GIL released. The result is the one
``pymetis.part_graph`` gives for the same graph and seed: the same function (recursive bisection
for at most 8 parts, k-way beyond) with the same options. A ``pymetis`` build without the exported
functions is called through ``pymetis.part_graph``.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

# From metis.h (METIS 5): the size of the options array, the seed's slot in it, the success status.
METIS_NOPTIONS = 40
METIS_OPTION_SEED = 8
METIS_OK = 1
RECURSIVE_MAX_PARTS = 8  # pymetis's choice, after METIS's manual: recursive bisection up to 8 parts


class MetisError(RuntimeError):
    """METIS returned an error status."""


class _Library(NamedTuple):
    """METIS's C functions, and its index type (``idx_t``)."""

    set_default_options: Callable[..., int]
    part_graph_recursive: Callable[..., int]
    part_graph_kway: Callable[..., int]
    idx: np.dtype


@functools.cache
def _library() -> _Library | None:
    """METIS's functions in pymetis's extension, or None when it does not export them."""
    import pymetis
    import pymetis._internal as internal

    try:
        library = ctypes.CDLL(internal.__file__)
        defaults = library.METIS_SetDefaultOptions
        recursive, kway = library.METIS_PartGraphRecursive, library.METIS_PartGraphKway
    except (OSError, AttributeError):
        return None
    defaults.argtypes, defaults.restype = [ctypes.c_void_p], ctypes.c_int
    for function in (recursive, kway):
        function.argtypes, function.restype = [ctypes.c_void_p] * 13, ctypes.c_int
    return _Library(defaults, recursive, kway, np.dtype(pymetis.zero_copy_dtype()))


def part_graph(indptr: np.ndarray, indices: np.ndarray, parts: int, seed: int = 0) -> np.ndarray:
    """The part (0..parts-1) of each vertex in METIS's partition of the undirected graph
    (``indptr``, ``indices``: both directions of every edge, no self loops, no repeated neighbours)
    into ``parts`` >= 2 parts, with the given seed. The GIL is released while METIS works."""
    library = _library()
    if library is None:
        import pymetis

        partition = pymetis.part_graph(parts, adjacency=pymetis.CSRAdjacency(indptr, indices),
                                       options=pymetis.Options(seed=seed))
        return np.asarray(partition.vertex_part)
    idx = library.idx
    xadj = np.ascontiguousarray(indptr, dtype=idx)
    adjncy = np.ascontiguousarray(indices, dtype=idx)
    options = np.zeros(METIS_NOPTIONS, dtype=idx)
    library.set_default_options(options.ctypes.data)
    options[METIS_OPTION_SEED] = seed
    nvtxs, ncon, nparts, objval = (np.array([value], dtype=idx) for value in (len(xadj) - 1, 1, parts, 0))
    part = np.empty(len(xadj) - 1, dtype=idx)
    function, name = ((library.part_graph_recursive, "METIS_PartGraphRecursive") if parts <= RECURSIVE_MAX_PARTS
                      else (library.part_graph_kway, "METIS_PartGraphKway"))
    status = function(nvtxs.ctypes.data, ncon.ctypes.data, xadj.ctypes.data, adjncy.ctypes.data, None, None, None,
                      nparts.ctypes.data, None, None, options.ctypes.data, objval.ctypes.data, part.ctypes.data)
    if status != METIS_OK:
        raise MetisError(f"{name} returned status {status} for a graph of {len(part)} vertices and "
                         f"{len(adjncy)} adjacency entries into {parts} parts")
    return part
