"""GraphSAINT mini-batches (Zeng et al., ICLR 2020): subgraphs induced by randomly drawn node sets, with
the normalisation coefficients that make a sampled model's aggregation and loss unbiased.

Samplers (one subgraph per step, ``num_steps`` steps per epoch, each drawn from its step's random key;
the node set is sorted by id):

* node (``GraphSAINTNodeLoader``): the sources of ``budget`` edges drawn uniformly with replacement,
  so node v is drawn with probability proportional to its out-degree (PyG's GraphSAINTNodeSampler);
* edge (``GraphSAINTEdgeLoader``): ``budget`` edges drawn with replacement, edge u -> v with
  probability proportional to ``1 / out_degree(u) + 1 / in_degree(v)`` (the paper's
  ``1 / deg(u) + 1 / deg(v)``; PyG's GraphSAINTEdgeSampler inverts its degrees twice and weighs
  ``in_degree(u) + out_degree(v)`` instead), and both ends of each;
* random walk (``GraphSAINTRandomWalkLoader``): ``num_roots`` roots drawn uniformly, each walking
  ``walk_length`` steps, every step to a uniformly drawn in-neighbour (the source of a uniformly drawn
  in-edge; a node without in-edges stays). Walking in-edges follows messages backwards, so the walk
  collects the nodes whose messages reach the root, and reads only the by-destination CSR a
  memory-mapped graph stores; on a symmetric graph it is PyG's walk over out-neighbours.

The batch is the induced subgraph (every edge between two drawn nodes) with node array ``node_norm``
[n] and edge array ``edge_norm`` [m], computed as PyG's ``GraphSAINTSampler`` computes them but for
the aggregating node of ``edge_norm`` (below). With
``sample_coverage`` c > 0 the loader first draws subgraphs, ``num_steps`` at a time, until they hold
at least ``c * N`` nodes in total (``num_samples`` subgraphs), counting ``C_v`` (the subgraphs holding
node v) and ``C_e`` (those holding edge e); then, globally,

* ``node_norm[v] = num_samples / (C_v * N)`` (``C_v`` = 0 read as 0.1): the loss weight, so that
  ``sum_v node_norm[v] * loss_v`` over a batch estimates the mean loss over all N nodes (counting
  the nodes the sampler can draw: the node and edge samplers never draw a node without edges);
* ``edge_norm[e] = clamp(C_dst / C_e, 0, 1e4)`` for e = src -> dst (0.1 where ``C_dst = C_e = 0``):
  the aggregation weight, so that over the batches holding node v, ``sum_{sampled e into v}
  edge_norm[e] * x[src]`` estimates the full ``sum_{e into v} x[src]`` (GraphSAINT's ``alpha_{u,v} = p_{u,v} / p_v``
  of the aggregating node v; PyG divides the count of ``edge_index[0]``, the source, which is
  GraphSAINT's coefficient only for messages flowing target to source).

With ``sample_coverage = 0`` nothing is pre-sampled (PyG then leaves both arrays out); the batches
carry the neutral ``node_norm = 1 / n`` (a weighted sum is the batch mean) and ``edge_norm = 1`` (plain
aggregation), so a model that reads them runs either way. Coefficients are float32, computed once per
(graph, sampler, num_steps, sample_coverage, seed) and cached on the graph; the loader exposes them
as ``node_norm`` [N] and ``edge_norm`` [E] (None without pre-sampling). Every rank of a distributed
run computes the same coefficients (the pre-sampling keys depend on ``seed`` only).

Memory, once per loader: the O(N) scratch map of the induced subgraphs, the coefficients (4 bytes per
node and per edge), during pre-sampling the int64 counts, and for the edge sampler the running sums of
the edge weights (8 bytes per edge). Per batch: O(nodes + their in-edges).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mpdsl.backends.cpu_kernels import launch
from mpdsl.graph import Graph
from mpdsl.sampling.batch import MiniBatch, make_batch
from mpdsl.sampling.loader import SampleLoader, SamplingError, check_positive_int
from mpdsl.sampling.subgraph_kernels import (
    InducedSubgraphs,
    edge_cumulative,
    edge_draws,
    edge_norm_from_counts,
    node_draws,
    walk_draws,
)

__all__ = ["GraphSAINTEdgeLoader", "GraphSAINTNodeLoader", "GraphSAINTRandomWalkLoader", "coverage_key"]

COEFFICIENTS = ("node_norm", "edge_norm")
_COVERAGE_STREAM = 0x5A17  # spawn key of the pre-sampling draws (apart from the epochs' batch keys)


def coverage_key(seed: int, sample: int) -> int:
    """The 64-bit random key of pre-sampled subgraph ``sample`` (counted from 0) of a loader seeded
    ``seed``."""
    sequence = np.random.SeedSequence([seed, sample], spawn_key=(_COVERAGE_STREAM,))
    return int(sequence.generate_state(1, np.uint64)[0] & np.uint64(0x7FFF_FFFF_FFFF_FFFF))


class _SaintSampler:
    """``(steps, key) -> MiniBatch`` of one GraphSAINT sampler (picklable, for DataLoader workers);
    subclasses define ``draw(key)``, the sorted distinct nodes of a subgraph, and ``identity``."""

    node_norm: np.ndarray | None = None
    edge_norm: np.ndarray | None = None

    def __init__(self, graph: Graph):
        self.subgraphs = InducedSubgraphs(graph)
        for name in COEFFICIENTS:
            if name in graph:
                raise SamplingError(f"graph already has a '{name}' array, which GraphSAINT batches set",
                                    f"rename the graph's '{name}' array")
        if graph.num_nodes == 0:
            raise SamplingError("graph has no nodes to sample", "pass a graph with at least one node")

    def identity(self) -> tuple[Any, ...]:
        raise NotImplementedError

    def draw(self, key: int) -> np.ndarray:
        raise NotImplementedError

    def normalise(self, sample_coverage: int, num_steps: int, seed: int) -> None:
        """Set the coefficients from pre-sampling (see the module doc); none when ``sample_coverage``
        is 0."""
        if sample_coverage > 0:
            cache_key = ("graphsaint_norm", self.identity(), num_steps, sample_coverage, seed)
            self.node_norm, self.edge_norm = self.subgraphs.graph.cached(
                cache_key, lambda: self._coefficients(sample_coverage, num_steps, seed))

    def _coefficients(self, sample_coverage: int, num_steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        graph = self.subgraphs.graph
        num_nodes = graph.num_nodes
        node_count = np.zeros(num_nodes, dtype=np.int64)
        edge_count = np.zeros(graph.num_edges, dtype=np.int64)
        num_samples = sampled_nodes = 0
        while sampled_nodes < num_nodes * sample_coverage:
            for sample in range(num_samples, num_samples + num_steps):
                nodes = self.draw(coverage_key(seed, sample))
                _, e_id = self.subgraphs.edges(nodes)
                node_count[nodes] += 1  # nodes and e_id hold distinct ids
                edge_count[e_id] += 1
                sampled_nodes += len(nodes)
            num_samples += num_steps
        node_norm = (num_samples / np.where(node_count == 0, 0.1, node_count) / num_nodes).astype(np.float32)
        edge_norm = np.empty(graph.num_edges, dtype=np.float32)
        launch(edge_norm_from_counts, self.subgraphs.indptr, self.subgraphs.perm, node_count, edge_count, edge_norm)
        return node_norm, edge_norm

    def __call__(self, steps: np.ndarray, key: int) -> MiniBatch:
        nodes = self.draw(key)
        edge_index, e_id = self.subgraphs.edges(nodes)
        if self.node_norm is None or self.edge_norm is None:
            node_norm = np.full(len(nodes), 1.0 / len(nodes), dtype=np.float32)
            edge_norm = np.ones(len(e_id), dtype=np.float32)
        else:
            node_norm, edge_norm = self.node_norm[nodes], self.edge_norm[e_id]
        return make_batch(self.subgraphs.graph, nodes, edge_index, e_id, len(nodes),
                          node_extra={"node_norm": node_norm}, edge_extra={"edge_norm": edge_norm})


class _NodeSampler(_SaintSampler):
    def __init__(self, graph: Graph, budget: int):
        super().__init__(graph)
        self.budget = budget
        _need_edges(graph, "node")

    def identity(self) -> tuple[Any, ...]:
        return ("node", self.budget)

    def draw(self, key: int) -> np.ndarray:
        return launch(node_draws, key, self.budget, self.subgraphs.sources)


class _EdgeSampler(_SaintSampler):
    def __init__(self, graph: Graph, budget: int):
        super().__init__(graph)
        self.budget = budget
        _need_edges(graph, "edge")
        sources = self.subgraphs.sources
        out_degree = np.bincount(sources, minlength=graph.num_nodes)
        self.cumulative = edge_cumulative(self.subgraphs.indptr, sources, out_degree)

    def identity(self) -> tuple[Any, ...]:
        return ("edge", self.budget)

    def draw(self, key: int) -> np.ndarray:
        return launch(edge_draws, key, self.budget, self.subgraphs.indptr, self.subgraphs.sources, self.cumulative)


class _WalkSampler(_SaintSampler):
    def __init__(self, graph: Graph, num_roots: int, walk_length: int):
        super().__init__(graph)
        self.num_roots, self.walk_length = num_roots, walk_length

    def identity(self) -> tuple[Any, ...]:
        return ("random-walk", self.num_roots, self.walk_length)

    def draw(self, key: int) -> np.ndarray:
        return launch(walk_draws, key, self.num_roots, self.walk_length, self.subgraphs.indptr,
                      self.subgraphs.sources)


def _need_edges(graph: Graph, kind: str) -> None:
    if graph.num_edges == 0:
        raise SamplingError(f"graph has no edges for GraphSAINT's {kind} sampler to draw",
                            "use GraphSAINTRandomWalkLoader, or a graph with edges")


def _check_coverage(sample_coverage: Any) -> int:
    if (isinstance(sample_coverage, (bool, np.bool_)) or not isinstance(sample_coverage, (int, np.integer))
            or sample_coverage < 0):
        raise SamplingError(f"sample_coverage must be a non-negative integer, got {sample_coverage!r}",
                            "pass sample_coverage=0 (no normalisation) or e.g. 100")
    return int(sample_coverage)


class _GraphSAINTLoader(SampleLoader):
    """A GraphSAINT loader: ``num_steps`` batches per epoch, batch k of epoch e drawn with key
    ``batch_key(seed, e, k)``; rank r of ``world_size`` yields steps r, r + world_size, ...; other
    keywords go to ``torch.utils.data.DataLoader``. ``node_norm`` [N] / ``edge_norm`` [E]: the
    coefficients (None when ``sample_coverage`` is 0)."""

    def __init__(self, sampler: _SaintSampler, num_steps: int, sample_coverage: int, seed: int, rank: int,
                 world_size: int, loader_options: dict[str, Any]):
        num_steps = check_positive_int("num_steps", num_steps)
        sample_coverage = _check_coverage(sample_coverage)
        self.subgraph_sampler = sampler
        super().__init__(np.arange(num_steps, dtype=np.int64), 1, sampler, seed=seed, rank=rank,
                         world_size=world_size, **loader_options)
        sampler.normalise(sample_coverage, num_steps, int(seed))

    @property
    def node_norm(self) -> np.ndarray | None:
        return self.subgraph_sampler.node_norm

    @property
    def edge_norm(self) -> np.ndarray | None:
        return self.subgraph_sampler.edge_norm


class GraphSAINTNodeLoader(_GraphSAINTLoader):
    """GraphSAINT's node sampler: each batch is induced by the sources of ``budget`` uniformly drawn
    edges (see the module doc for the coefficients and the other arguments)."""

    def __init__(self, graph: Graph, budget: int, *, num_steps: int, sample_coverage: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, **loader_options: Any):
        sampler = _NodeSampler(graph, check_positive_int("budget", budget))
        super().__init__(sampler, num_steps, sample_coverage, seed, rank, world_size, loader_options)


class GraphSAINTEdgeLoader(_GraphSAINTLoader):
    """GraphSAINT's edge sampler: each batch is induced by both ends of ``budget`` edges drawn with
    probability proportional to ``1 / out_degree(src) + 1 / in_degree(dst)`` (see the module doc)."""

    def __init__(self, graph: Graph, budget: int, *, num_steps: int, sample_coverage: int = 0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, **loader_options: Any):
        sampler = _EdgeSampler(graph, check_positive_int("budget", budget))
        super().__init__(sampler, num_steps, sample_coverage, seed, rank, world_size, loader_options)


class GraphSAINTRandomWalkLoader(_GraphSAINTLoader):
    """GraphSAINT's random-walk sampler: each batch is induced by the nodes of ``num_roots`` walks of
    ``walk_length`` steps over in-edges from uniformly drawn roots (see the module doc)."""

    def __init__(self, graph: Graph, num_roots: int, walk_length: int, *, num_steps: int,
                 sample_coverage: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
                 **loader_options: Any):
        sampler = _WalkSampler(graph, check_positive_int("num_roots", num_roots),
                               check_positive_int("walk_length", walk_length))
        super().__init__(sampler, num_steps, sample_coverage, seed, rank, world_size, loader_options)
