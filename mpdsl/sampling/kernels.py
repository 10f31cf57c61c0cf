"""Compiled kernels of the samplers (Numba; parallel over the nodes of a hop, cached on disk).

Randomness is counter-based: the draws for node ``v`` at hop ``h`` of a batch with key ``key`` are
the outputs of a splitmix64 generator whose seed is ``node_stream(key, h, v)``. A sample therefore
depends only on (key, hop, node): not on the thread count, the chunking, or which process samples it.

Importing ``mpdsl.backends.cpu_kernels`` first sets Numba's on-disk cache folder and threading layer
(workqueue, whose thread pool restarts itself in a forked child); every parallel kernel here is run
through its ``launch``, one launch at a time per process.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mpdsl.backends.cpu_kernels import _JIT, prefetch_item

__all__ = ["fill_samples", "node_stream", "register_seeds", "relabel", "sample_counts"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
_SHIFT_1, _SHIFT_2, _SHIFT_3 = np.uint64(30), np.uint64(27), np.uint64(31)

# Nodes ahead whose CSR entry (indptr) and first in-edges (sources, edge ids) the fill prefetches: the
# reads are scattered over arrays far larger than the caches. Measured on the 1M-node, 10M-edge
# power-law graph of benchmarks/bench_sampling.py (fanouts 15, 10, batch 1024; CPU time per batch,
# median of 4 interleaved rounds, 1 thread): 3.8 ms without, 3.0 ms with (3.9 / 3.0 with replacement).
PREFETCH_NODES = 16
# sampled edges ahead whose source's node-map entry the relabelling prefetches (about 7% less CPU time
# per batch on the same graph, and on its 5M-node version)
PREFETCH_EDGES = 16

@njit(inline="always", cache=True)
def _draw(seed, counter):
    """Output ``counter`` (0, 1, ...) of the splitmix64 generator seeded with ``seed`` (uint64)."""
    z = seed + (np.uint64(counter) + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> _SHIFT_1)) * _MIX_1
    z = (z ^ (z >> _SHIFT_2)) * _MIX_2
    return z ^ (z >> _SHIFT_3)


@njit(inline="always", cache=True)
def node_stream(key, hop, node):
    """The generator seed of ``node`` at ``hop`` in the batch with 64-bit key ``key``."""
    return _draw(_draw(np.uint64(key), hop), node)


@njit(inline="always", cache=True)
def _below(value, bound):
    """``value`` (uniform uint64) reduced to [0, bound); the bias is below bound / 2**64."""
    return np.int64(value % np.uint64(bound))


@njit(inline="always", cache=True)
def _sample_count(degree, fanout, replace):
    """Edges sampled for a node of in-degree ``degree``: all of them for fanout -1, else
    ``fanout`` draws with replacement (none without neighbours) or ``min(fanout, degree)`` without."""
    if fanout < 0:
        return degree
    if replace:
        return fanout if degree > 0 else 0
    return min(fanout, degree)


@njit(**_JIT)
def sample_counts(indptr, targets, fanout, replace, counts):
    """counts[i] = the number of in-edges sampled for node ``targets[i]`` (CSR ``indptr`` by dst)."""
    for i in prange(targets.shape[0]):
        node = targets[i]
        counts[i] = _sample_count(indptr[node + 1] - indptr[node], fanout, replace)


@njit(inline="always", cache=True)
def _table_size(count):
    """The smallest power of two of at least 2 x ``count`` slots (at least 1)."""
    size = 1
    while size < 2 * count:
        size *= 2
    return size


@njit(inline="always", cache=True)
def _insert(table, mask, value):
    """Insert ``value`` (>= 0) into the open-addressing set ``table[:mask + 1]`` (-1 = empty slot);
    False when it was there already."""
    slot = value & mask
    while table[slot] >= 0:
        if table[slot] == value:
            return False
        slot = (slot + 1) & mask
    table[slot] = value
    return True


@njit(**_JIT)
def fill_samples(indptr, sources, edge_ids, targets, offsets, chunks, fanout, replace, key, hop,
                 first_local, out_sources, out_targets, out_edges):
    """Sample the in-edges of every node ``targets[i]`` (local id ``first_local + i``) into
    ``out_*[offsets[i]:offsets[i + 1]]`` (``offsets``: the prefix sums of ``sample_counts``): the
    global source, the local target and the global edge id of each sampled edge. ``sources`` and
    ``edge_ids`` are the edges' sources and ids grouped by destination (CSR ``indptr``). Without
    replacement a node takes all its edges when it has at most ``fanout``, else Floyd's algorithm picks
    ``fanout`` distinct ones with a hash set of 2-4 x fanout slots (one table per chunk): O(fanout) per
    node whatever its degree. ``chunks``: node bounds of the parallel chunks (balanced by sampled-edge count)."""
    for chunk in prange(chunks.shape[0] - 1):
        begin, end = chunks[chunk], chunks[chunk + 1]
        largest = 0
        for i in range(begin, end):
            largest = max(largest, offsets[i + 1] - offsets[i])
        table = np.empty(_table_size(largest) if fanout > 0 and not replace else 1, np.int64)
        for i in range(begin, end):
            if i + PREFETCH_NODES < end:
                prefetch_item(indptr, targets[i + PREFETCH_NODES])
            if i + PREFETCH_NODES // 2 < end:
                ahead = indptr[targets[i + PREFETCH_NODES // 2]]
                prefetch_item(sources, ahead)
                prefetch_item(edge_ids, ahead)
            node, out, count = targets[i], offsets[i], offsets[i + 1] - offsets[i]
            start, degree = indptr[node], indptr[node + 1] - indptr[node]
            stream = node_stream(key, hop, node)
            if fanout < 0 or (count == degree and not replace):
                for j in range(count):
                    out_sources[out + j] = start + j
            elif replace:
                for j in range(count):
                    out_sources[out + j] = start + _below(_draw(stream, j), degree)
            else:
                mask = _table_size(count) - 1
                table[:mask + 1] = -1
                for j in range(degree - count, degree):
                    pick = _below(_draw(stream, j), j + 1)
                    if not _insert(table, mask, pick):
                        _insert(table, mask, j)  # j is new: every earlier pick is below j
                        pick = j
                    out_sources[out + j - (degree - count)] = start + pick
                    prefetch_item(sources, start + pick)
                    prefetch_item(edge_ids, start + pick)
            for j in range(out, out + count):
                position = out_sources[j]
                out_sources[j] = sources[position]
                out_edges[j] = edge_ids[position]
                out_targets[j] = first_local + i


@njit(nogil=True, cache=True, boundscheck=False)
def register_seeds(seeds, node_map):
    """node_map[seeds[i]] = i; returns -1, or the position of the first seed seen twice (then every
    entry this call set is -1 again). ``node_map`` holds -1 at every node not in the batch."""
    for i in range(seeds.shape[0]):
        if node_map[seeds[i]] >= 0:
            for k in range(i):
                node_map[seeds[k]] = -1
            return i
        node_map[seeds[i]] = i
    return -1


@njit(nogil=True, cache=True, boundscheck=False)
def relabel(sampled_sources, node_map, next_local):
    """Local ids of ``sampled_sources`` (global ids): a node not in ``node_map`` yet gets the next
    local id, from ``next_local`` on, in order of first appearance. Returns (local ids, the newly
    added global ids in local-id order); O(len(sampled_sources))."""
    local = np.empty(sampled_sources.shape[0], np.int64)
    added = np.empty(sampled_sources.shape[0], np.int64)
    fresh = 0
    for e in range(sampled_sources.shape[0]):
        if e + PREFETCH_EDGES < sampled_sources.shape[0]:
            prefetch_item(node_map, sampled_sources[e + PREFETCH_EDGES])
        node = sampled_sources[e]
        if node_map[node] < 0:
            node_map[node] = next_local + fresh
            added[fresh] = node
            fresh += 1
        local[e] = node_map[node]
    return local, added[:fresh]
