"""Cluster-GCN mini-batches: METIS partitions of the graph, combined a few per batch.

The graph's nodes are split once into ``num_parts`` clusters by METIS (``mpdsl.metis``: the METIS of ``pymetis``, fixed
seed) on the symmetrised graph without self loops and repeated edges; ``cluster_partition`` computes
it and caches it on the graph. A batch is the subgraph induced by the nodes of ``batch_size`` clusters:
every edge of the graph between two of its nodes, also between different clusters of the batch
(Cluster-GCN's stochastic multiple partitions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mpdsl.graph import Graph
from mpdsl.metis import part_graph
from mpdsl.plan import symmetric_adjacency
from mpdsl.sampling.batch import MiniBatch, make_batch
from mpdsl.sampling.loader import SampleLoader, SamplingError, check_positive_int
from mpdsl.sampling.subgraph_kernels import InducedSubgraphs

__all__ = ["ClusterLoader", "ClusterPartition", "cluster_partition"]

METIS_SEED = 0


@dataclass(frozen=True)
class ClusterPartition:
    """A partition of a graph's nodes into clusters: cluster ``p`` is ``nodes[indptr[p]:indptr[p+1]]``
    (ascending ids); every node is in exactly one cluster, and a cluster may be empty (METIS leaves a
    part empty when the graph has too few nodes for it)."""

    indptr: np.ndarray
    nodes: np.ndarray

    @property
    def num_parts(self) -> int:
        return len(self.indptr) - 1

    def sizes(self) -> np.ndarray:
        """The node count of each cluster."""
        return np.diff(self.indptr)

    def cluster(self, part: int) -> np.ndarray:
        """The nodes of cluster ``part``."""
        return self.nodes[self.indptr[part]:self.indptr[part + 1]]

    def membership(self) -> np.ndarray:
        """The cluster of each node, int64 [N]."""
        parts = np.empty(len(self.nodes), dtype=np.int64)
        parts[self.nodes] = np.repeat(np.arange(self.num_parts, dtype=np.int64), self.sizes())
        return parts


def cluster_partition(graph: Graph, num_parts: int) -> ClusterPartition:
    """The METIS partition of ``graph`` into ``num_parts`` clusters (1 <= num_parts <= node count),
    computed on the symmetrised graph without self loops (seed ``METIS_SEED``) once per graph and
    part count."""
    num_parts = check_positive_int("num_parts", num_parts)
    if num_parts > graph.num_nodes:
        raise SamplingError(f"num_parts={num_parts} is larger than the graph's {graph.num_nodes} nodes",
                            f"use num_parts between 1 and {graph.num_nodes}" if graph.num_nodes
                            else "pass a graph with nodes to partition")
    return graph.cached(("cluster_partition", num_parts), lambda: _metis_partition(graph, num_parts))


def _metis_partition(graph: Graph, num_parts: int) -> ClusterPartition:
    num_nodes = graph.num_nodes
    if num_parts == 1:
        membership = np.zeros(num_nodes, dtype=np.int64)
    else:
        indptr, indices = symmetric_adjacency(graph.src, graph.dst, num_nodes)
        membership = part_graph(indptr, indices, num_parts, seed=METIS_SEED).astype(np.int64, copy=False)
    nodes = np.argsort(membership, kind="stable").astype(np.int64, copy=False)
    indptr = np.zeros(num_parts + 1, dtype=np.int64)
    np.cumsum(np.bincount(membership, minlength=num_parts), out=indptr[1:])
    return ClusterPartition(indptr, nodes)


class _ClusterSampler:
    """``(clusters, key) -> MiniBatch``: the subgraph induced by the clusters' nodes (picklable, for
    DataLoader workers)."""

    def __init__(self, subgraphs: InducedSubgraphs, partition: ClusterPartition):
        self.subgraphs, self.partition = subgraphs, partition

    def __call__(self, clusters: np.ndarray, key: int) -> MiniBatch:
        nodes = np.concatenate([self.partition.cluster(int(p)) for p in clusters] or [np.empty(0, np.int64)])
        edge_index, e_id = self.subgraphs.edges(nodes)
        return make_batch(self.subgraphs.graph, nodes, edge_index, e_id, len(nodes))


class ClusterLoader(SampleLoader):
    """Cluster-GCN batches of ``graph``: its METIS partition into ``num_parts`` clusters
    (``cluster_partition``), ``batch_size`` clusters per batch (in a seeded random order per epoch when
    ``shuffle``). A batch's nodes are its clusters' nodes, cluster by cluster (ascending ids within
    one), and its edges every edge of ``graph`` between two of them, grouped by destination;
    ``MiniBatch.batch_size`` is its node count (a loss selects its rows with e.g. ``train_mask``).
    Other arguments: as ``SampleLoader``."""

    def __init__(self, graph: Graph, num_parts: int, *, batch_size: int = 1, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 **loader_options: Any):
        subgraphs = InducedSubgraphs(graph)
        self.partition = cluster_partition(graph, num_parts)
        super().__init__(np.arange(self.partition.num_parts, dtype=np.int64), batch_size,
                         _ClusterSampler(subgraphs, self.partition), shuffle=shuffle, seed=seed,
                         drop_last=drop_last, rank=rank, world_size=world_size, **loader_options)
