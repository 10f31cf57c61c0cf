"""Compiled kernels of the subgraph samplers (Cluster-GCN, GraphSAINT): the induced subgraph of a node
set, GraphSAINT's node / edge / random-walk draws and its edge coefficients.

Structure is read only as the CSR grouping by destination (``Graph.csr_by_dst`` and the
``"csr_dst_sources"`` cache key): ``indptr`` [N+1], ``perm`` [E] and ``sources`` [E], so that position
``p`` in ``indptr[v]:indptr[v+1]`` is the in-edge ``perm[p]`` of node ``v``, from node ``sources[p]``.
A batch's work is proportional to the edges of its nodes, never to E: the nodes of a set are marked
in ``local_of`` (an int64 [N] map, -1 outside the set, allocated once per sampler) and unmarked
before the kernel returns.

Randomness: draw ``c`` of a batch is the splitmix64 hash of the batch's 64-bit key and the counter
``c``; every draw has its own counter, so a batch depends on its key only, not on the thread count
or on which worker process samples it. Kernels are cached on disk in mpdsl's kernel cache folder
(``mpdsl.backends.cpu_kernels``) and launched through its ``launch`` (one parallel launch at a time
per process, which also makes the shared ``local_of`` map safe).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

from mpdsl.backends.cpu_kernels import _JIT, launch
from mpdsl.graph import Graph
from mpdsl.sampling.loader import SamplingError

__all__ = ["InducedSubgraphs", "csr_sources"]

# Loop fusion is off: consecutive loops of a kernel communicate through ``local_of`` (written at the
# entries of some nodes by one loop, read at other nodes' entries by the next), a dependence Numba's
# fusion test cannot see (fused, the induced subgraph loses edges).
_PARALLEL: dict[str, Any] = {**_JIT, "parallel": {"fusion": False}}
_SERIAL: dict[str, Any] = {**_JIT, "parallel": False}

# Work (edges read, draws made) below which a kernel runs serially: starting the threads of a parallel
# loop costs ~100 us here, the time of ~100k serial edge reads.
PARALLEL_WORK = 1 << 17

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's counter increment
_UNIT = 1.0 / 9007199254740992.0  # 2**-53


@njit(inline="always")
def _mix(z):
    """splitmix64's finaliser: a bijection of uint64 whose output bits all depend on every input bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def _stream(key):
    """The hash state of batch key ``key`` (a non-negative int64)."""
    return _mix(np.uint64(key) ^ np.uint64(0x6A09E667F3BCC909))


@njit(inline="always")
def _uniform(stream, counter):
    """Draw ``counter`` of ``stream`` as a float64 uniform in [0, 1)."""
    bits = _mix(stream + _GOLDEN * np.uint64(counter + 1))
    return np.float64(bits >> np.uint64(11)) * _UNIT


@njit(inline="always")
def _below(stream, counter, n):
    """Draw ``counter`` of ``stream`` as an int uniform in [0, n) (n >= 1)."""
    return min(np.int64(_uniform(stream, counter) * n), n - 1)


@njit(inline="always")
def _kept_edges(v, indptr, sources, local_of):
    """The number of in-edges of node ``v`` from marked nodes."""
    kept = 0
    for p in range(indptr[v], indptr[v + 1]):
        if local_of[sources[p]] >= 0:
            kept += 1
    return kept


@njit(inline="always")
def _write_kept_edges(i, v, k, indptr, perm, sources, local_of, edge_index, e_id):
    """Write the in-edges of node ``v`` (local ``i``) from marked nodes from position ``k`` on."""
    for p in range(indptr[v], indptr[v + 1]):
        u = local_of[sources[p]]
        if u >= 0:
            edge_index[0, k] = u
            edge_index[1, k] = i
            e_id[k] = perm[p]
            k += 1


@njit(**_PARALLEL)
def induced_subgraph(nodes, indptr, perm, sources, local_of):
    """(edge_index int64 [2, m], e_id int64 [m]): every edge between two nodes of ``nodes`` (distinct
    global ids; local node i is ``nodes[i]``), grouped by destination in the order of ``nodes``,
    each group in CSR order. ``local_of`` is all -1 on entry and on return. Runs in parallel over
    the nodes when their in-edges are at least ``PARALLEL_WORK``."""
    n = nodes.shape[0]
    work = 0
    for i in range(n):
        local_of[nodes[i]] = i
        work += indptr[nodes[i] + 1] - indptr[nodes[i]]
    parallel = work >= PARALLEL_WORK
    offsets = np.empty(n + 1, np.int64)  # (np.zeros would be a parallel loop of its own)
    offsets[0] = 0
    if parallel:
        for i in prange(n):
            offsets[i + 1] = _kept_edges(nodes[i], indptr, sources, local_of)
    else:
        for i in range(n):
            offsets[i + 1] = _kept_edges(nodes[i], indptr, sources, local_of)
    for i in range(n):
        offsets[i + 1] += offsets[i]
    edge_index = np.empty((2, offsets[n]), np.int64)
    e_id = np.empty(offsets[n], np.int64)
    if parallel:
        for i in prange(n):
            _write_kept_edges(i, nodes[i], offsets[i], indptr, perm, sources, local_of, edge_index, e_id)
    else:
        for i in range(n):
            _write_kept_edges(i, nodes[i], offsets[i], indptr, perm, sources, local_of, edge_index, e_id)
    for i in range(n):
        local_of[nodes[i]] = -1
    return edge_index, e_id


@njit(**_PARALLEL)
def node_draws(key, budget, sources):
    """GraphSAINT's node sampler (PyG's ``GraphSAINTNodeSampler``): the sources of ``budget`` edges
    drawn uniformly with replacement (a node is drawn in proportion to its out-degree), distinct and
    sorted. Needs E >= 1."""
    stream = _stream(key)
    drawn = np.empty(budget, np.int64)
    if budget >= PARALLEL_WORK:
        for i in prange(budget):
            drawn[i] = sources[_below(stream, i, sources.shape[0])]
    else:
        for i in range(budget):
            drawn[i] = sources[_below(stream, i, sources.shape[0])]
    return np.unique(drawn)


@njit(**_SERIAL)
def edge_cumulative(indptr, sources, out_degree):
    """The running sums, in CSR order, of GraphSAINT's edge weights ``1 / out_degree[src] +
    1 / in_degree[dst]`` (both at least 1 at an edge's ends)."""
    cumulative = np.empty(sources.shape[0], np.float64)
    total = 0.0
    for v in range(indptr.shape[0] - 1):
        into = 1.0 / max(indptr[v + 1] - indptr[v], 1)
        for p in range(indptr[v], indptr[v + 1]):
            total += 1.0 / out_degree[sources[p]] + into
            cumulative[p] = total
    return cumulative


@njit(inline="always")
def _draw_edge(stream, i, indptr, sources, cumulative, drawn):
    """Draw edge ``i`` of a batch by its weight; write its ends to ``drawn[2i]``, ``drawn[2i + 1]``."""
    last = cumulative.shape[0] - 1
    p = min(np.searchsorted(cumulative, _uniform(stream, i) * cumulative[last], side="right"), last)
    drawn[2 * i] = sources[p]
    drawn[2 * i + 1] = np.searchsorted(indptr, p, side="right") - 1


@njit(**_PARALLEL)
def edge_draws(key, budget, indptr, sources, cumulative):
    """GraphSAINT's edge sampler: ``budget`` edges drawn with replacement, edge p with probability
    proportional to its weight (``cumulative``: ``edge_cumulative``), and the nodes at both ends of
    them, distinct and sorted. Needs E >= 1."""
    stream = _stream(key)
    drawn = np.empty(2 * budget, np.int64)
    if budget >= PARALLEL_WORK // 16:  # a draw is two binary searches
        for i in prange(budget):
            _draw_edge(stream, i, indptr, sources, cumulative, drawn)
    else:
        for i in range(budget):
            _draw_edge(stream, i, indptr, sources, cumulative, drawn)
    return np.unique(drawn)


@njit(inline="always")
def _walk(stream, r, walk_length, indptr, sources, visited):
    """Walk ``r`` of a batch: its root and the nodes of its steps, to ``visited[r * (walk_length + 1):]``."""
    stride = walk_length + 1
    v = _below(stream, r * stride, indptr.shape[0] - 1)
    visited[r * stride] = v
    for step in range(1, stride):
        degree = indptr[v + 1] - indptr[v]
        if degree > 0:
            v = sources[indptr[v] + _below(stream, r * stride + step, degree)]
        visited[r * stride + step] = v


@njit(**_PARALLEL)
def walk_draws(key, num_roots, walk_length, indptr, sources):
    """GraphSAINT's random-walk sampler: ``num_roots`` roots drawn uniformly with replacement, each
    walking ``walk_length`` steps to a uniformly drawn in-neighbour (a parallel edge counts once per
    copy; a node without in-edges stays where it is); the nodes visited, distinct and sorted."""
    stream = _stream(key)
    visited = np.empty(num_roots * (walk_length + 1), np.int64)
    if num_roots * walk_length >= PARALLEL_WORK // 4:  # a step reads two scattered entries
        for r in prange(num_roots):
            _walk(stream, r, walk_length, indptr, sources, visited)
    else:
        for r in range(num_roots):
            _walk(stream, r, walk_length, indptr, sources, visited)
    return np.unique(visited)


@njit(**_PARALLEL)
def edge_norm_from_counts(indptr, perm, node_count, edge_count, edge_norm):
    """``edge_norm[e] = node_count[dst] / edge_count[e]`` for every edge e into node dst, clamped to
    [0, 1e4] (an edge never sampled whose destination was: 1e4), and 0.1 where both counts are 0."""
    for v in prange(indptr.shape[0] - 1):
        for p in range(indptr[v], indptr[v + 1]):
            e = perm[p]
            if edge_count[e] > 0:
                edge_norm[e] = min(node_count[v] / edge_count[e], 1e4)
            elif node_count[v] > 0:
                edge_norm[e] = 1e4
            else:
                edge_norm[e] = 0.1


def csr_sources(graph: Graph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr [N+1], perm [E], sources [E]) of ``graph``: its CSR by destination and the source of
    each CSR position (the shared ``"csr_dst_sources"`` cache key; a memory-mapped graph has both)."""
    indptr, perm = graph.csr_by_dst()
    sources = graph.cached("csr_dst_sources", lambda: graph.src[graph.csr_by_dst()[1]])
    return indptr, perm, sources


class InducedSubgraphs:
    """The induced subgraphs of node sets of one graph, for a subgraph sampler: holds the graph's CSR
    structure and the O(N) scratch map of the kernels. Refuses a graph holding several graphs."""

    def __init__(self, graph: Graph):
        if "batch" in graph.node_data:
            raise SamplingError("graph has a 'batch' vector: subgraph sampling needs one graph",
                                "sample each graph separately, or train graph-level tasks on "
                                "Graph.select_graphs mini-batches")
        self.graph = graph
        self._read_structure()

    def _read_structure(self) -> None:
        self.indptr, self.perm, self.sources = csr_sources(self.graph)
        self.local_of = np.full(self.graph.num_nodes, -1, dtype=np.int64)

    def __getstate__(self) -> dict:
        """The graph alone: a spawned worker reads the structure from it again (a memory-mapped graph
        pickles as its directory, so nothing of size O(E) or O(N) is copied)."""
        return {"graph": self.graph}

    def __setstate__(self, state: dict) -> None:
        self.graph = state["graph"]
        self._read_structure()

    def edges(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(local edge_index [2, m], e_id [m]) of the subgraph induced by ``nodes`` (distinct ids):
        every edge of the graph between two of them, grouped by destination."""
        return launch(induced_subgraph, np.ascontiguousarray(nodes, dtype=np.int64), self.indptr, self.perm,
                      self.sources, self.local_of)
