"""The mini-batch every sampling loader yields, and its construction from global ids.

A ``MiniBatch`` is a subgraph of a source graph: ``graph`` holds its local edges and the rows of the
source's node and edge arrays its nodes and edges select. ``n_id[i]`` is the source id of local node
``i`` and ``e_id[k]`` that of local edge ``k``; the first ``batch_size`` local nodes are the seed nodes
(the rows a node-level loss uses, PyG's convention), in the order the loader chose them.
"""

from __future__ import annotations

import mmap
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpdsl.diagnostics import GraphError
from mpdsl.graph import Graph

__all__ = ["MAPPED_BYTES", "MiniBatch", "make_batch", "release_mapped_pages"]

MAPPED_BYTES = 1 << 30  # file pages a memory-mapped array may keep mapped before they are released
_PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class MiniBatch:
    """One sampled subgraph. ``graph``: local edge_index, node arrays ``source[name][n_id]``, edge arrays
    ``source[name][e_id]`` (plus any arrays the sampler adds, e.g. GraphSAINT's coefficients);
    ``n_id`` int64 [n] and ``e_id`` int64 [m]: global ids; ``batch_size``: the seed count, the seeds
    being local nodes ``0 .. batch_size - 1``."""

    graph: Graph
    n_id: np.ndarray
    e_id: np.ndarray
    batch_size: int

    @property
    def num_nodes(self) -> int:
        return self.graph.num_nodes

    @property
    def num_edges(self) -> int:
        return self.graph.num_edges

    def __getitem__(self, name: str) -> np.ndarray:
        return self.graph[name]

    def __contains__(self, name: object) -> bool:
        return name in self.graph


def make_batch(source: Graph, n_id: np.ndarray, local_edge_index: np.ndarray, e_id: np.ndarray,
               batch_size: int, *, node_extra: dict[str, Any] | None = None,
               edge_extra: dict[str, Any] | None = None) -> MiniBatch:
    """The ``MiniBatch`` of ``source`` with nodes ``n_id`` and edges ``e_id`` (global ids, int64),
    whose edges are ``local_edge_index`` (int64 [2, m], indices into ``n_id``). Node and edge arrays
    of ``source`` are gathered by row (a memory-mapped array reads only those rows); ``node_extra``
    and ``edge_extra`` add arrays (one row per local node / edge). Graph arrays are kept when the
    source holds one graph. The source's further edge sets (``Graph.edge_sets``) come restricted to the
    batch's nodes: the edges of a set with both ends among them, in the set's order, with their rows of
    the set's arrays (a derived set, such as self loops, is derived from the batch graph itself)."""
    if source.node_types:
        raise GraphError("sampling draws nodes of one node set, but this graph has the node types "
                         f"{', '.join(source.node_types)}", hint="run a typed graph whole (full batch)")
    if "batch" in source.node_data:
        raise GraphError("sampling needs one graph, but this graph has a 'batch' vector",
                         hint="sample each graph separately, or train graph-level tasks with "
                              "Graph.select_graphs mini-batches")
    node_data = {name: _gather_rows(array, n_id) for name, array in source.node_data.items()}
    edge_data = {name: _gather_rows(array, e_id) for name, array in source.edge_data.items()}
    node_data.update(node_extra or {})
    edge_data.update(edge_extra or {})
    set_indices, set_data = _induced_edge_sets(source, n_id)
    graph = Graph(local_edge_index, int(n_id.shape[0]), node_data=node_data, edge_data=edge_data,
                  graph_data=dict(source.graph_data), edge_sets=set_indices, edge_set_data=set_data)
    return MiniBatch(graph, n_id, e_id, int(batch_size))


def _induced_edge_sets(source: Graph, n_id: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The source's edge sets among the nodes ``n_id`` (local indices), with their arrays' rows."""
    sets = source.edge_sets
    if not sets:
        return {}, {}
    local = np.full(source.num_nodes, -1, dtype=np.int64)
    local[n_id] = np.arange(n_id.shape[0], dtype=np.int64)
    indices, data = {}, {}
    for name, index in sets.items():
        ends = local[index]
        kept = np.flatnonzero((ends[0] >= 0) & (ends[1] >= 0))
        indices[name] = ends[:, kept]
        data[name] = {k: _gather_rows(v, kept) for k, v in source.edge_set_data[name].items()}
    return indices, data


def _gather_rows(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``array[rows]``. A whole memory-mapped ``.npy`` array is read from its file with ``pread``
    (``mpdsl.sampling.file_rows``: nothing mapped); another memory-mapped one (a view) is read in
    increasing row order (sequential pages), and the pages its gathers touched are released once they
    may exceed ``MAPPED_BYTES`` (``release_mapped_pages``); an array in memory is indexed directly."""
    if not isinstance(array, np.memmap):
        return array[rows]
    from mpdsl.sampling.file_rows import mapped_file, read_rows

    gathered = np.empty((rows.shape[0],) + array.shape[1:], dtype=array.dtype)
    if mapped_file(array) is not None:  # read from the file: nothing mapped
        read_rows(array, rows, gathered)
        return gathered
    order = np.argsort(rows, kind="stable")
    ascending = rows[order]
    gathered[order] = array[ascending]
    if rows.shape[0]:
        release_mapped_pages(array, _pages_spanned(ascending, gathered.nbytes // rows.shape[0]) * _PAGE)
    return gathered


def _pages_spanned(ascending_rows: np.ndarray, row_bytes: int) -> int:
    """The number of file pages rows ``ascending_rows`` (sorted) of ``row_bytes`` bytes each span in a
    row-major array, counted from the array's start (exact for distinct rows; a repeated row of more
    than a page is counted again: an upper bound)."""
    first = ascending_rows * row_bytes // _PAGE
    last = ((ascending_rows + 1) * row_bytes - 1) // _PAGE
    shared = np.count_nonzero(first[1:] == last[:-1])  # a page that ends one row and starts the next
    return int((last - first + 1).sum()) - int(shared)


_touched: dict[int, int] = {}  # id of an mmap -> upper bound of its bytes mapped since its last release
_touched_lock = threading.Lock()


def release_mapped_pages(array: np.ndarray, touched: int) -> None:
    """Record that a read of the memory-mapped ``array`` touched at most ``touched`` bytes of file pages,
    and unmap the file's pages from this process once the bound passes ``MAPPED_BYTES``: a read page
    stays mapped (and counted in the resident set) until the kernel needs the memory, so an epoch of
    random row reads would otherwise map the whole file. The pages stay in the page cache: a later
    read maps them again without disk I/O."""
    mapping = getattr(array, "_mmap", None)
    if mapping is None:
        return
    with _touched_lock:
        total = _touched.get(id(mapping), 0) + touched
        release = total > MAPPED_BYTES
        _touched[id(mapping)] = 0 if release else total
    if release:
        from mpdsl.store import unmap_pages

        unmap_pages(mapping)
