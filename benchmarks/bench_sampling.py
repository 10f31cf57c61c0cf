"""Sampling benchmark: the cost of a neighbour-sampled mini-batch, mpdsl's ``NeighborLoader`` (Numba
kernels) against a plain vectorised NumPy implementation of the same sampling (``NumpyNeighborSampler``
below: no Numba, no Python loop over nodes or edges; Floyd's algorithm vectorised over the nodes of a
hop, first-appearance relabelling through ``np.unique`` and an O(N) node map kept between batches).

    python benchmarks/bench_sampling.py [--nodes 1000000] [--edges 10000000] [--features 64]
                                        [--fanouts 15,10] [--batch-size 1024] [--batches 40]
                                        [--replace] [--results benchmarks/RESULTS.md]

Graph (seeded): a directed Chung-Lu power-law graph, both endpoints of each edge drawn with weight
``(rank + 1) ** -(1 / (gamma - 1))``, gamma 2.5, node ids shuffled; float32 features ``x``. Seeds:
all nodes, shuffled (seed 0); the first ``batches`` batches of the epoch, after one untimed batch.
Per batch it times the whole batch (sampling, relabelling, and the gather of the batch's feature
rows by ``make_batch``) and the sampling alone (the same on a copy of the graph without features,
sharing its CSR), and reports ms per batch (median) and sampled edges per second of sampling.
Both run in this process, one after the other, on the same seed batches; the NumPy sampler draws
from its own generator (same distribution, other draws), so its edge counts are compared, not its
edges. This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numba
import numpy as np

import mpdsl
from mpdsl.sampling.batch import make_batch
from mpdsl.sampling.neighbor import NeighborLoader, NeighborSampler, check_fanouts


def power_law_graph(nodes: int, edges: int, features: int, seed: int = 0, gamma: float = 2.5) -> mpdsl.Graph:
    """The benchmark graph (see the module doc)."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, nodes + 1, dtype=np.float64) ** (-1.0 / (gamma - 1.0))
    cumulative = np.cumsum(weights)
    cumulative /= cumulative[-1]
    relabel = rng.permutation(nodes)
    endpoints = relabel[np.searchsorted(cumulative, rng.random(2 * edges), side="right").clip(0, nodes - 1)]
    x = rng.standard_normal((nodes, features), dtype=np.float32)
    return mpdsl.Graph(endpoints.reshape(2, edges), nodes, node_data={"x": x})


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of ``arange(s, s + l)`` over (starts, lengths)."""
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    return np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)


class NumpyNeighborSampler:
    """The baseline: the sampling rules of ``mpdsl.sampling.neighbor`` in vectorised NumPy.
    ``sample(seeds) -> (n_id, local edge_index, e_id)``."""

    def __init__(self, graph: mpdsl.Graph, fanouts: tuple[int, ...], replace: bool, seed: int = 0):
        self.indptr, self.edge_ids = graph.csr_by_dst()
        self.sources = graph.cached("csr_dst_sources", lambda: graph.src[self.edge_ids])
        self.fanouts, self.replace = fanouts, replace
        self.rng = np.random.default_rng(seed)
        self.node_map = np.full(graph.num_nodes, -1, dtype=np.int64)

    def _positions(self, frontier: np.ndarray, fanout: int) -> tuple[np.ndarray, np.ndarray]:
        """CSR positions of the sampled in-edges of ``frontier`` (grouped by node) and their counts."""
        start = self.indptr[frontier]
        degree = self.indptr[frontier + 1] - start
        if fanout == -1:
            return _ranges(start, degree), degree
        if self.replace:
            counts = np.where(degree > 0, fanout, 0)
            draws = (self.rng.random((frontier.shape[0], fanout)) * degree[:, None]).astype(np.int64)
            return (start[:, None] + draws)[degree > 0].ravel(), counts
        counts = np.minimum(degree, fanout)
        offsets = np.cumsum(counts) - counts
        positions = np.empty(int(counts.sum()), dtype=np.int64)
        small = degree <= fanout
        positions[_ranges(offsets[small], degree[small])] = _ranges(start[small], degree[small])
        big_degree = degree[~small]
        chosen = np.empty((big_degree.shape[0], fanout), dtype=np.int64)
        for j in range(fanout):  # Floyd's algorithm, one step for every node at once
            bound = big_degree - fanout + j + 1
            pick = (self.rng.random(bound.shape[0]) * bound).astype(np.int64)
            taken = (chosen[:, :j] == pick[:, None]).any(axis=1)
            chosen[:, j] = np.where(taken, bound - 1, pick)
        positions[(offsets[~small][:, None] + np.arange(fanout)).ravel()] = (start[~small][:, None] + chosen).ravel()
        return positions, counts

    def sample(self, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        node_map = self.node_map
        node_map[seeds] = np.arange(seeds.shape[0])
        nodes, sources, targets, edges = [seeds], [], [], []
        frontier, frontier_start = seeds, 0
        for fanout in self.fanouts:
            positions, counts = self._positions(frontier, fanout)
            next_start = frontier_start + frontier.shape[0]
            targets.append(np.repeat(np.arange(frontier_start, next_start), counts))
            edges.append(self.edge_ids[positions])
            hop_sources = self.sources[positions]
            fresh = hop_sources[node_map[hop_sources] < 0]
            unique, first = np.unique(fresh, return_index=True)
            frontier = unique[np.argsort(first)]
            node_map[frontier] = np.arange(next_start, next_start + frontier.shape[0])
            sources.append(node_map[hop_sources])
            nodes.append(frontier)
            frontier_start = next_start
        n_id = np.concatenate(nodes)
        node_map[n_id] = -1
        return n_id, np.stack([np.concatenate(sources), np.concatenate(targets)]), np.concatenate(edges)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--edges", type=int, default=10_000_000)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--fanouts", default="15,10")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--replace", action="store_true")
    parser.add_argument("--results", type=Path, help="append the results section to this file")
    args = parser.parse_args()
    fanouts = check_fanouts([int(f) for f in args.fanouts.split(",")])

    began = time.perf_counter()
    graph = power_law_graph(args.nodes, args.edges, args.features)
    indptr, perm = graph.csr_by_dst()
    sources = graph.cached("csr_dst_sources", lambda: graph.src[perm])
    bare = mpdsl.Graph(graph.edge_index, graph.num_nodes)
    bare.cached("csr_dst", lambda: (indptr, perm))
    bare.cached("csr_dst_sources", lambda: sources)
    setup_s = time.perf_counter() - began
    degree = np.diff(indptr)

    loader = NeighborLoader(graph, fanouts, batch_size=args.batch_size, replace=args.replace, shuffle=True)
    schedule = list(loader.schedule)[:args.batches + 1]  # (key, seeds) of the first batches of epoch 0
    keys, seed_batches = [key for key, _ in schedule], [units for _, units in schedule]
    ours_bare = NeighborSampler(bare, fanouts, replace=args.replace)
    numpy_full = NumpyNeighborSampler(graph, fanouts, args.replace)
    numpy_bare = NumpyNeighborSampler(bare, fanouts, args.replace)

    def numpy_batch(sampler: NumpyNeighborSampler, source: mpdsl.Graph, units: np.ndarray):
        n_id, edge_index, e_id = sampler.sample(units)
        return make_batch(source, n_id, edge_index, e_id, units.shape[0])

    systems = {
        "mpdsl NeighborLoader": (lambda k: loader.neighbor_sampler(seed_batches[k], keys[k]),
                                 lambda k: ours_bare(seed_batches[k], keys[k])),
        "NumPy baseline": (lambda k: numpy_batch(numpy_full, graph, seed_batches[k]),
                           lambda k: numpy_batch(numpy_bare, bare, seed_batches[k])),
    }
    rows = []
    for name, (whole, sampling_only) in systems.items():
        whole(0), sampling_only(0)  # untimed: kernels loaded from the cache, node maps allocated
        whole_ms, sampling_ms, edges, nodes = [], [], 0, 0
        for k in range(1, len(seed_batches)):
            began = time.perf_counter()
            batch = whole(k)
            whole_ms.append((time.perf_counter() - began) * 1e3)
            began = time.perf_counter()
            sampling_only(k)
            sampling_ms.append((time.perf_counter() - began) * 1e3)
            edges += batch.num_edges
            nodes += batch.num_nodes
        count = len(whole_ms)
        rows.append((name, float(np.median(whole_ms)), float(np.median(sampling_ms)),
                     edges / (sum(sampling_ms) / 1e3), edges / count, nodes / count))

    command = "python benchmarks/bench_sampling.py" + "".join(
        f" --{flag.replace('_', '-')} {getattr(args, flag)}" for flag in ("nodes", "edges", "features", "batches"))
    command += f" --fanouts {args.fanouts} --batch-size {args.batch_size}" + (" --replace" if args.replace else "")
    lines = [
        f"### Neighbour sampling: NeighborLoader against plain NumPy ({'with' if args.replace else 'without'} "
        "replacement)", "",
        f"Command: `{command}`; power-law graph (Chung-Lu, gamma 2.5, seed 0) of {graph.num_nodes} nodes, "
        f"{graph.num_edges} edges (in-degree max {int(degree.max())}, mean {degree.mean():.1f}), {args.features} "
        f"float32 features; fanouts {args.fanouts}, batch {args.batch_size}, {count} batches after one untimed; "
        f"{platform.machine()}, {os.cpu_count()} cores, {numba.get_num_threads()} Numba threads, load average "
        f"{os.getloadavg()[0]:.1f} at the end; graph + CSR built in {setup_s:.1f} s.", "",
        "| sampler | ms per batch (with feature rows) | ms per batch (sampling) | sampled edges / s | "
        "edges per batch | nodes per batch |", "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {name} | {whole:.1f} | {sampling:.1f} | {rate / 1e6:.2f} M | {edges:.0f} | {nodes:.0f} |"
              for name, whole, sampling, rate, edges, nodes in rows]
    lines += ["", f"Sampling: mpdsl {rows[1][2] / rows[0][2]:.1f}x faster than the NumPy baseline "
                  f"(medians); with the feature gather {rows[1][1] / rows[0][1]:.1f}x.", ""]
    text = "\n".join(lines)
    print(text)
    if args.results:
        with args.results.open("a") as out:
            out.write("\n" + text)


if __name__ == "__main__":
    main()
