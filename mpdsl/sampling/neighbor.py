"""GraphSAGE neighbour sampling (Hamilton, Ying & Leskovec, NeurIPS 2017) with the semantics of PyG's
``NeighborLoader``.

A batch starts from its seed nodes. Hop ``h`` samples, for every node first reached at hop ``h - 1``
(the seeds at hop 1), ``num_neighbors[h - 1]`` of its in-edges (all of them for -1); the sources of
these edges that are not in the batch yet join it, and are sampled at the next hop. Every node is
therefore sampled once, at the hop it is first reached. The batch's nodes are the seeds (in the given
order), then the nodes each hop added, in order of first appearance; its edges are the sampled edges,
``src`` = the sampled neighbour and ``dst`` = the node it was sampled for, hop by hop, with their
global ids in ``e_id``. A model of ``len(num_neighbors)`` layers computes the seed rows of the batch
from the sampled neighbourhood; with -1 everywhere, exactly as on the full graph.

Without replacement a node of in-degree ``d`` gets ``min(fanout, d)`` distinct in-edges, with
replacement ``fanout`` independent draws (none when ``d == 0``); multi-edges are distinct edges.
Sampling is deterministic in the batch's random key (``mpdsl.sampling.kernels``). Duplicate seeds are
refused: a seed counted twice would weigh twice in the loss and break "seeds are rows 0..batch_size-1".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
import torch.utils.data

from mpdsl.backends.cpu_kernels import launch, row_chunks
from mpdsl.graph import Graph
from mpdsl.limits import MAX_INT
from mpdsl.memory import RAISE, budget, format_bytes
from mpdsl.sampling import kernels
from mpdsl.sampling.batch import MiniBatch, make_batch
from mpdsl.sampling.loader import SampleLoader, SamplingError
from mpdsl.sampling.subgraph_kernels import csr_sources

__all__ = ["NeighborLoader", "NeighborSampler", "check_fanouts", "seed_nodes"]

# parallel chunks of a hop per Numba thread (balanced by sampled-edge count)
CHUNKS_PER_THREAD = 4
_KEY_LIMIT = 2**63
# a hop's three output arrays and the relabelling's two, int64 per sampled edge
BYTES_PER_SAMPLED_EDGE = 5 * 8
# hops that allocate less than this are not checked against the memory budget (reading it costs more)
BUDGET_CHECK_BYTES = 64 << 20


def check_fanouts(num_neighbors: Any) -> tuple[int, ...]:
    """``num_neighbors`` as a tuple of per-hop fanouts (each >= 1, or -1 for all neighbours), or a
    SamplingError naming the argument."""
    listed = isinstance(num_neighbors, (list, tuple)) or (isinstance(num_neighbors, np.ndarray)
                                                           and num_neighbors.ndim == 1)
    fanouts = list(num_neighbors) if listed else []
    if not fanouts or any(isinstance(f, (bool, np.bool_)) or not isinstance(f, (int, np.integer))
                          or not (1 <= f <= MAX_INT or f == -1) for f in fanouts):
        raise SamplingError(f"num_neighbors must be a non-empty list of positive integers or -1 (one per layer), "
                            f"got {num_neighbors!r}", "e.g. num_neighbors=[15, 10] for two layers, -1 for all "
                                                      "neighbours")
    return tuple(int(f) for f in fanouts)


def _check_graph(graph: Any) -> Graph:
    if not isinstance(graph, Graph):
        raise SamplingError(f"graph must be an mpdsl.Graph, got {type(graph).__name__}",
                            "build one with mpdsl.Graph(edge_index, ...) or Graph.load(path)")
    if "batch" in graph.node_data:
        raise SamplingError("graph has a 'batch' vector: neighbour sampling needs one graph",
                            "sample each graph separately, or train graph-level tasks with "
                            "Graph.select_graphs mini-batches")
    return graph


def seed_nodes(graph: Graph, input_nodes: Any) -> np.ndarray:
    """The seed node ids (int64, distinct, in the given order) that ``input_nodes`` selects: None = all
    nodes, a boolean mask [N] or an integer index array; a SamplingError naming the argument else."""
    count = graph.num_nodes
    if input_nodes is None:
        seeds = np.arange(count, dtype=np.int64)
    else:
        index = np.asarray(input_nodes)
        if index.ndim != 1 or not (index.dtype == np.bool_ or np.issubdtype(index.dtype, np.integer)):
            raise SamplingError(f"input_nodes must be a boolean mask [N] or a 1-D integer index array, got "
                                f"{index.dtype} {list(index.shape)}", "pass e.g. graph['train_mask'] or "
                                                                      "np.flatnonzero(mask)")
        if index.dtype == np.bool_:
            if index.shape[0] != count:
                raise SamplingError(f"input_nodes is a boolean mask of length {index.shape[0]}, but the graph has "
                                    f"{count} nodes", "pass a mask with one entry per node")
            seeds = np.flatnonzero(index).astype(np.int64)
        else:
            seeds = index.astype(np.int64)
            _check_range("input_nodes", seeds, count)
            seen = np.zeros(count, dtype=np.bool_)
            seen[seeds] = True
            if int(seen.sum()) != seeds.shape[0]:
                values, counts = np.unique(seeds, return_counts=True)
                raise SamplingError(f"input_nodes holds node {int(values[counts > 1][0])} more than once",
                                    "pass distinct seed nodes, e.g. np.unique(input_nodes)")
    if seeds.shape[0] == 0:
        raise SamplingError("input_nodes selects no nodes" if input_nodes is not None
                            else "input_nodes: the graph has no nodes to sample", "select at least one seed node")
    return seeds


def _check_range(name: str, ids: np.ndarray, count: int) -> None:
    if ids.shape[0] and (int(ids.min()) < 0 or int(ids.max()) >= count):
        bad = int(ids[(ids < 0) | (ids >= count)][0])
        raise SamplingError(f"{name} holds node {bad}, outside [0, {count})", f"node ids must be below {count}")


class NeighborSampler:
    """``sample(units, key) -> MiniBatch``: the neighbour-sampled batch of seed nodes ``units`` (distinct
    int node ids) with random key ``key`` (a 64-bit int, ``batch_key``), as the module doc defines it.
    ``num_neighbors``: per-hop fanouts (hop 1 first), each >= 1 or -1 (all in-edges).

    Structure is read through ``graph.csr_by_dst()`` and the ``csr_dst_sources`` cache (built here, once,
    unless a memory-mapped graph brought them). Per batch the cost is O(seeds + sampled edges): new nodes
    get their local ids through an int32 node map of N entries, allocated once per process (and per
    concurrent caller) and reset at the entries the batch touched. In a ``DataLoader`` worker the kernels
    use the worker's share of the Numba threads (all of them / num_workers), as torch limits its own."""

    def __init__(self, graph: Graph, num_neighbors: Sequence[int], *, replace: bool = False):
        self.graph = _check_graph(graph)
        self.fanouts = check_fanouts(num_neighbors)
        if not isinstance(replace, (bool, np.bool_)):
            raise SamplingError(f"replace must be True or False, got {replace!r}",
                                "replace=True samples with replacement")
        self.replace = bool(replace)
        self._read_structure()

    def _read_structure(self) -> None:
        self._indptr, self._edge_ids, self._sources = csr_sources(self.graph)
        self._free_maps: list[np.ndarray] = []

    def __getstate__(self) -> dict[str, Any]:
        """The graph and the options: a spawned worker reads the structure from the graph again (a
        memory-mapped graph pickles as its directory, so nothing of size O(E) or O(N) is copied)."""
        return {name: value for name, value in self.__dict__.items()
                if name not in ("_indptr", "_edge_ids", "_sources", "_free_maps")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._read_structure()

    def __call__(self, units: Any, key: int) -> MiniBatch:
        seeds = np.asarray(units)
        if seeds.ndim != 1 or not np.issubdtype(seeds.dtype, np.integer):
            raise SamplingError(f"units must be a 1-D integer array of seed nodes, got {seeds.dtype} "
                                f"{list(seeds.shape)}", "pass an int64 array of node ids")
        seeds = np.ascontiguousarray(seeds, dtype=np.int64)
        _check_range("units", seeds, self.graph.num_nodes)
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)) or not 0 <= key < _KEY_LIMIT:
            raise SamplingError(f"key must be an integer in [0, 2**63), got {key!r}",
                                "use mpdsl.sampling.loader.batch_key(seed, epoch, batch)")
        _share_threads_in_worker()
        try:
            node_map = self._free_maps.pop()
        except IndexError:
            node_map = np.full(self.graph.num_nodes, -1, dtype=np.int32)
        n_id, edge_index, e_id = self._sample(seeds, int(key), node_map)
        node_map[n_id] = -1
        self._free_maps.append(node_map)
        return make_batch(self.graph, n_id, edge_index, e_id, seeds.shape[0])

    def _sample(self, seeds: np.ndarray, key: int, node_map: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n_id, local edge_index, e_id) of the batch; leaves the batch's nodes in ``node_map``."""
        duplicate = kernels.register_seeds(seeds, node_map)
        if duplicate >= 0:
            self._free_maps.append(node_map)  # register_seeds left it clean
            raise SamplingError(f"units holds seed node {int(seeds[duplicate])} more than once",
                                "pass distinct seed nodes")
        nodes, sources, targets, edges = [seeds], [], [], []
        frontier, frontier_start = seeds, 0
        for hop, fanout in enumerate(self.fanouts):
            if frontier.shape[0] == 0:
                break
            counts = np.empty(frontier.shape[0], dtype=np.int64)
            launch(kernels.sample_counts, self._indptr, frontier, fanout, self.replace, counts)
            # exact before the int64 prefix sum: with replacement each node with in-edges draws fanout
            # of them, which the degrees do not bound (without, the total is at most E)
            sampled = fanout * int(np.count_nonzero(counts)) if self.replace and fanout > 0 else int(counts.sum())
            _check_hop_memory(hop, sampled)
            offsets = np.zeros(frontier.shape[0] + 1, dtype=np.int64)
            np.cumsum(counts, out=offsets[1:])
            hop_sources, hop_targets, hop_edges = (np.empty(sampled, dtype=np.int64) for _ in range(3))
            chunks = row_chunks(offsets, min(frontier.shape[0], CHUNKS_PER_THREAD * numba.get_num_threads()))
            launch(kernels.fill_samples, self._indptr, self._sources, self._edge_ids, frontier, offsets, chunks,
                   fanout, self.replace, key, hop, frontier_start, hop_sources, hop_targets, hop_edges)
            next_start = frontier_start + frontier.shape[0]
            local_sources, frontier = kernels.relabel(hop_sources, node_map, next_start)
            frontier_start = next_start
            nodes.append(frontier)
            sources.append(local_sources)
            targets.append(hop_targets)
            edges.append(hop_edges)
        n_id = np.concatenate(nodes)
        if not edges:
            return n_id, np.empty((2, 0), dtype=np.int64), np.empty(0, dtype=np.int64)
        return n_id, np.stack([np.concatenate(sources), np.concatenate(targets)]), np.concatenate(edges)


def _check_hop_memory(hop: int, sampled: int) -> None:
    """A SamplingError when the ``sampled`` edges of ``hop`` would not fit the memory budget
    (``mpdsl.memory``; fanouts with replacement are not bounded by the degrees)."""
    nbytes = sampled * BYTES_PER_SAMPLED_EDGE
    if nbytes >= BUDGET_CHECK_BYTES:
        limit = budget()
        if not limit.allows(nbytes):
            raise SamplingError(f"hop {hop + 1} of this batch samples {sampled} edges ({format_bytes(nbytes)}), "
                                f"past {limit.describe()}", f"use smaller num_neighbors or batch_size, or {RAISE}")


def _share_threads_in_worker() -> None:
    """In a DataLoader worker, use that worker's share of Numba's threads (the workers run at once)."""
    worker = torch.utils.data.get_worker_info()
    if worker is not None:
        numba.set_num_threads(max(1, numba.config.NUMBA_NUM_THREADS // worker.num_workers))  # type: ignore[attr-defined]


class NeighborLoader(SampleLoader):
    """Mini-batches of GraphSAGE neighbour samples (the module doc), PyG's ``NeighborLoader``: each batch
    is ``batch_size`` seeds of ``input_nodes`` (None = all nodes, a boolean mask [N] or an index array
    of distinct nodes) and their sampled ``num_neighbors``-hop neighbourhood; the seeds are its first
    ``MiniBatch.batch_size`` local nodes. ``replace`` samples with replacement. ``shuffle``, ``seed``,
    ``drop_last``, ``rank``, ``world_size`` and ``torch.utils.data.DataLoader`` options
    (``num_workers``, ...) as ``SampleLoader`` defines them."""

    def __init__(self, graph: Graph, num_neighbors: Sequence[int], *, input_nodes: Any = None,
                 batch_size: int = 1, replace: bool = False, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, **loader_options: Any):
        self.neighbor_sampler = NeighborSampler(graph, num_neighbors, replace=replace)
        self.input_nodes = seed_nodes(graph, input_nodes)
        super().__init__(self.input_nodes, batch_size, self.neighbor_sampler, shuffle=shuffle, seed=seed,
                         drop_last=drop_last, rank=rank, world_size=world_size, **loader_options)
