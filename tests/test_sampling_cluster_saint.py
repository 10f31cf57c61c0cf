"""Cluster-GCN and GraphSAINT loaders (``mpdsl.sampling.cluster`` / ``saint``).

Batches are checked against an induced subgraph computed here with plain NumPy; GraphSAINT's
coefficients against PyG's formulas (transcribed from ``GraphSAINTSampler._compute_norm``, since the
sampler itself needs torch-sparse, which is not installed) applied to occurrence counts recounted
here, and statistically: over fresh batches, the edge_norm-weighted aggregation of every sampled node
and the node_norm-weighted loss are unbiased estimates of their full-graph values.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mpdsl
from mpdsl.graph import Graph
from mpdsl.sampling import (
    ClusterLoader,
    GraphSAINTEdgeLoader,
    GraphSAINTNodeLoader,
    GraphSAINTRandomWalkLoader,
    cluster_partition,
)
from mpdsl.sampling.loader import SamplingError, batch_key
from mpdsl.sampling.saint import coverage_key
from mpdsl.sampling.subgraph_kernels import InducedSubgraphs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategies import graphs

SAINT_LOADERS = {
    "node": lambda graph, **options: GraphSAINTNodeLoader(graph, 12, **options),
    "edge": lambda graph, **options: GraphSAINTEdgeLoader(graph, 6, **options),
    "walk": lambda graph, **options: GraphSAINTRandomWalkLoader(graph, 4, 2, **options),
}


def random_graph(num_nodes: int = 60, num_edges: int = 400, seed: int = 0) -> Graph:
    rng = np.random.default_rng(seed)
    edge_index = rng.integers(0, num_nodes, size=(2, num_edges))
    return Graph(edge_index, num_nodes, node_data={"x": rng.normal(size=(num_nodes, 3)),
                                                   "train_mask": rng.random(num_nodes) < 0.5},
                 edge_data={"w": rng.normal(size=num_edges)})


def skewed_graph(seed: int = 3) -> Graph:
    """30 nodes, node 29 isolated; out-degrees fall and in-degrees rise with the node id (so a node's
    sampling probability differs from its neighbours'), plus a self loop and a doubled edge."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, 30)
    weights /= weights.sum()
    src, dst = rng.choice(29, size=150, p=weights), rng.choice(29, size=150, p=weights[::-1])
    edge_index = np.concatenate([np.stack([src, dst]), [[4, 7, 7], [4, 20, 20]]], axis=1)
    return Graph(edge_index, 30, node_data={"x": rng.uniform(1.0, 2.0, size=(30, 1))})


def expected_edges(graph: Graph, nodes: np.ndarray) -> np.ndarray:
    """The ids of the edges between two of ``nodes``, ascending (the independent reference)."""
    inside = np.zeros(graph.num_nodes, dtype=bool)
    inside[nodes] = True
    return np.flatnonzero(inside[graph.src] & inside[graph.dst])


def check_induced(graph: Graph, batch) -> None:
    """``batch`` is the subgraph of ``graph`` induced by its nodes, with its arrays gathered."""
    assert len(np.unique(batch.n_id)) == len(batch.n_id)
    np.testing.assert_array_equal(np.sort(batch.e_id), expected_edges(graph, batch.n_id))
    np.testing.assert_array_equal(batch.n_id[batch.graph.edge_index], graph.edge_index[:, batch.e_id])
    for name, array in graph.node_data.items():
        np.testing.assert_array_equal(batch[name], array[batch.n_id])
    for name, array in graph.edge_data.items():
        np.testing.assert_array_equal(batch[name], array[batch.e_id])


def same_batches(first, second) -> None:
    first, second = list(first), list(second)
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.n_id, b.n_id)
        np.testing.assert_array_equal(a.e_id, b.e_id)
        np.testing.assert_array_equal(a.graph.edge_index, b.graph.edge_index)
        assert a.batch_size == b.batch_size
        for name in ("node_norm", "edge_norm"):
            if name in a:
                np.testing.assert_array_equal(a[name], b[name])


# ---- the induced-subgraph kernel --------------------------------------------------------------


@given(graphs(max_nodes=30, max_edges=120, features=1), st.data())
@settings(max_examples=60)
def test_induced_subgraph_is_exact(graph, data):
    subgraphs = InducedSubgraphs(graph)
    nodes = np.asarray(data.draw(st.permutations(range(graph.num_nodes)), label="order"), dtype=np.int64)
    nodes = nodes[:data.draw(st.integers(0, graph.num_nodes), label="size")]
    edge_index, e_id = subgraphs.edges(nodes)
    np.testing.assert_array_equal(np.sort(e_id), expected_edges(graph, nodes))
    np.testing.assert_array_equal(nodes[edge_index], graph.edge_index[:, e_id])
    assert np.all(np.diff(edge_index[1]) >= 0)  # grouped by destination, in the order of ``nodes``
    assert np.all(subgraphs.local_of == -1)


# ---- Cluster-GCN ------------------------------------------------------------------------------


@pytest.mark.parametrize("num_parts", [1, 2, 7, 60])
def test_partition_covers_every_node_once(num_parts):
    graph = random_graph()
    partition = cluster_partition(graph, num_parts)
    assert partition.num_parts == num_parts
    np.testing.assert_array_equal(np.sort(partition.nodes), np.arange(graph.num_nodes))
    membership = partition.membership()
    for part in range(num_parts):
        cluster = partition.cluster(part)
        assert np.all(np.diff(cluster) > 0)
        assert np.all(membership[cluster] == part)
    assert cluster_partition(graph, num_parts) is partition  # computed once per (graph, num_parts)


def test_partition_keeps_communities_together():
    """Two dense 20-node communities joined by one edge: METIS cuts only that edge."""
    rng = np.random.default_rng(1)
    halves = [rng.integers(0, 20, size=(2, 120)) + offset for offset in (0, 20)]
    graph = Graph(np.concatenate(halves + [np.array([[0], [20]])], axis=1), 40)
    membership = cluster_partition(graph, 2).membership()
    assert len(set(membership[:20])) == 1 and len(set(membership[20:])) == 1
    assert membership[0] != membership[20]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_cluster_batches_are_induced_subgraphs_of_their_clusters(batch_size):
    graph = random_graph()
    loader = ClusterLoader(graph, 8, batch_size=batch_size, shuffle=True, seed=5)
    partition = loader.partition
    seen = []
    for batch in loader:
        check_induced(graph, batch)
        assert batch.batch_size == batch.num_nodes
        seen.append(batch.n_id)
        clusters = np.unique(partition.membership()[batch.n_id])
        assert len(clusters) <= batch_size
        np.testing.assert_array_equal(np.sort(batch.n_id),
                                      np.sort(np.concatenate([partition.cluster(p) for p in clusters])))
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(graph.num_nodes))
    assert len(seen) == -(-8 // batch_size)


@given(graphs(min_nodes=1, max_nodes=30, max_edges=120, features=1), st.integers(1, 4), st.data())
@settings(max_examples=25)
def test_cluster_batches_on_drawn_graphs(graph, batch_size, data):
    num_parts = data.draw(st.integers(1, graph.num_nodes), label="num_parts")
    loader = ClusterLoader(graph, num_parts, batch_size=batch_size, shuffle=True)
    batches = list(loader)
    for batch in batches:
        check_induced(graph, batch)
    np.testing.assert_array_equal(np.sort(np.concatenate([b.n_id for b in batches])), np.arange(graph.num_nodes))


def test_cluster_loader_ranks_share_the_batches():
    graph = random_graph()
    whole = list(ClusterLoader(graph, 8, batch_size=2, shuffle=True, seed=3))
    for rank in (0, 1):
        share = list(ClusterLoader(graph, 8, batch_size=2, shuffle=True, seed=3, rank=rank, world_size=2))
        same_batches(share, whole[rank::2])


# ---- GraphSAINT: batches ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SAINT_LOADERS))
def test_saint_batches_are_induced_subgraphs(kind):
    graph = random_graph()
    loader = SAINT_LOADERS[kind](graph, num_steps=6, sample_coverage=5)
    batches = list(loader)
    assert len(batches) == 6
    for batch in batches:
        check_induced(graph, batch)
        assert np.all(np.diff(batch.n_id) > 0) and batch.batch_size == batch.num_nodes
        np.testing.assert_array_equal(batch["node_norm"], loader.node_norm[batch.n_id])
        np.testing.assert_array_equal(batch["edge_norm"], loader.edge_norm[batch.e_id])
    assert len({tuple(b.n_id) for b in batches}) > 1


@given(graphs(min_nodes=1, max_nodes=30, max_edges=120, features=1), st.sampled_from(sorted(SAINT_LOADERS)))
@settings(max_examples=40)
def test_saint_batches_on_drawn_graphs(graph, kind):
    if kind != "walk" and graph.num_edges == 0:
        return
    loader = SAINT_LOADERS[kind](graph, num_steps=3)
    for batch in loader:
        check_induced(graph, batch)
        assert batch.num_nodes >= 1
        np.testing.assert_allclose(batch["node_norm"], 1.0 / batch.num_nodes, rtol=1e-6)
        np.testing.assert_array_equal(batch["edge_norm"], 1.0)
        if kind == "node":  # the sources of drawn edges
            assert np.all(graph.out_degree()[batch.n_id] >= 1)
        if kind == "edge":  # both ends of drawn edges: every node has an edge in the batch
            ends = np.zeros(batch.num_nodes, dtype=bool)
            ends[batch.graph.edge_index.ravel()] = True
            assert ends.all()
        if kind == "walk":
            assert batch.num_nodes <= 4 * 3


def test_node_sampler_draws_in_proportion_to_out_degree():
    graph = skewed_graph()
    loader = GraphSAINTNodeLoader(graph, 1, num_steps=4000)
    counts = np.bincount(np.concatenate([b.n_id for b in loader]), minlength=graph.num_nodes)
    expected = 4000 * graph.out_degree() / graph.num_edges
    assert np.all(np.abs(counts - expected) <= 4.5 * np.sqrt(expected) + 1)


def test_edge_sampler_draws_in_proportion_to_inverse_degrees():
    """Budget 1 on a graph whose node pairs identify their edge: a batch holds the drawn edge alone."""
    edge_index = np.array([[0, 0, 0, 1, 2, 3, 4, 4], [1, 2, 3, 2, 4, 4, 5, 6]])
    graph = Graph(edge_index, 7)
    loader = GraphSAINTEdgeLoader(graph, 1, num_steps=4000)
    drawn = [b.e_id for b in loader]
    assert all(len(e) == 1 for e in drawn)
    weights = 1.0 / graph.out_degree()[graph.src] + 1.0 / graph.in_degree()[graph.dst]
    expected = 4000 * weights / weights.sum()
    counts = np.bincount(np.concatenate(drawn), minlength=graph.num_edges)
    assert np.all(np.abs(counts - expected) <= 4.5 * np.sqrt(expected) + 1)


def test_random_walks_follow_in_edges():
    """On a directed path 0 -> 1 -> ... -> 9, a walk from a root r visits r, r-1, ..., down to 0."""
    graph = Graph(np.stack([np.arange(9), np.arange(1, 10)]), 10)
    for batch in GraphSAINTRandomWalkLoader(graph, 1, 3, num_steps=50):
        root = batch.n_id[-1]
        np.testing.assert_array_equal(batch.n_id, np.arange(max(root - 3, 0), root + 1))


def test_samplers_read_the_stored_by_destination_structure(tmp_path):
    """With the CSR by destination memory-mapped into the graph's cache (as a stored graph has it),
    every loader samples from it and builds no other structure."""
    graph = random_graph()
    indptr, perm = graph.csr_by_dst()
    stored = {}
    for name, array in (("indptr", indptr), ("perm", perm), ("sources", graph.src[perm])):
        np.save(tmp_path / f"{name}.npy", array)
        stored[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
    mapped = Graph(graph.edge_index, graph.num_nodes, node_data=graph.node_data, edge_data=graph.edge_data)
    mapped.cached("csr_dst", lambda: (stored["indptr"], stored["perm"]))
    mapped.cached("csr_dst_sources", lambda: stored["sources"])
    loaders = [ClusterLoader(mapped, 4)] + [make(mapped, num_steps=3, sample_coverage=1)
                                            for make in SAINT_LOADERS.values()]
    for loader in loaders:
        for batch in loader:
            check_induced(graph, batch)
    assert mapped.cached_only("csr_src") is None


# ---- GraphSAINT: determinism ------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SAINT_LOADERS))
def test_saint_batches_depend_on_the_key_only(kind):
    graph = random_graph()
    make = SAINT_LOADERS[kind]
    loader = make(graph, num_steps=4, sample_coverage=2, seed=11)
    first_epoch = list(loader)
    same_batches(first_epoch, make(graph, num_steps=4, sample_coverage=2, seed=11))
    second_epoch = list(loader)
    assert any(not np.array_equal(a.n_id, b.n_id) for a, b in zip(first_epoch, second_epoch))
    loader.set_epoch(0)
    same_batches(loader, first_epoch)
    other_seed = make(graph, num_steps=4, sample_coverage=2, seed=12)
    assert any(not np.array_equal(a.n_id, b.n_id) for a, b in zip(first_epoch, other_seed))

    sampler, key = loader.subgraph_sampler, batch_key(11, 0, 2)
    same_batches([sampler(np.arange(1), key)], [first_epoch[2]])
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single_thread = sampler(np.arange(1), key)
    finally:
        numba.set_num_threads(threads)
    same_batches([single_thread], [first_epoch[2]])


def test_worker_processes_give_the_same_batches():
    graph = random_graph()
    loaders = [
        lambda **options: ClusterLoader(graph, 8, batch_size=2, shuffle=True, seed=2, **options),
        lambda **options: GraphSAINTRandomWalkLoader(graph, 4, 3, num_steps=6, sample_coverage=3, **options),
        lambda **options: GraphSAINTEdgeLoader(graph, 10, num_steps=6, **options),
    ]
    for make in loaders:
        same_batches(make(num_workers=0), make(num_workers=2))


def test_saint_ranks_share_the_steps():
    graph = random_graph()
    whole = list(GraphSAINTNodeLoader(graph, 10, num_steps=6, seed=4))
    for rank in (0, 1):
        share = list(GraphSAINTNodeLoader(graph, 10, num_steps=6, seed=4, rank=rank, world_size=2))
        same_batches(share, whole[rank::2])


# ---- GraphSAINT: normalisation ----------------------------------------------------------------


def recount(loader, graph: Graph, sample_coverage: int, num_steps: int, seed: int):
    """(C_v, C_e, num_samples) of the loader's pre-sampling, recounted from its reproduced subgraphs
    (each checked against the NumPy induced subgraph)."""
    node_count = np.zeros(graph.num_nodes)
    edge_count = np.zeros(graph.num_edges)
    num_samples = 0
    while node_count.sum() < graph.num_nodes * sample_coverage:
        for sample in range(num_samples, num_samples + num_steps):
            batch = loader.subgraph_sampler(np.arange(1), coverage_key(seed, sample))
            np.testing.assert_array_equal(np.sort(batch.e_id), expected_edges(graph, batch.n_id))
            node_count[batch.n_id] += 1
            edge_count[batch.e_id] += 1
        num_samples += num_steps
    return node_count, edge_count, num_samples


def pyg_coefficients(node_count, edge_count, num_samples, aggregating_end):
    """The last lines of PyG's ``GraphSAINTSampler._compute_norm`` (float32 as there); PyG takes
    ``row = edge_index[0]`` for ``aggregating_end``."""
    node_count = torch.tensor(node_count, dtype=torch.float)
    edge_count = torch.tensor(edge_count, dtype=torch.float)
    t = node_count[torch.tensor(np.array(aggregating_end))]
    edge_norm = (t / edge_count).clamp_(0, 1e4)
    edge_norm[torch.isnan(edge_norm)] = 0.1
    node_count[node_count == 0] = 0.1
    node_norm = num_samples / node_count / node_count.numel()
    return node_norm.numpy(), edge_norm.numpy()


@pytest.mark.parametrize("kind", sorted(SAINT_LOADERS))
def test_coefficients_follow_pygs_formulas(kind):
    """Low coverage, so that some edges are never sampled (edge_norm 1e4, or 0.1 where their
    destination never was either)."""
    graph = skewed_graph()
    loader = SAINT_LOADERS[kind](graph, num_steps=3, sample_coverage=2, seed=7)
    node_count, edge_count, num_samples = recount(loader, graph, 2, 3, 7)
    node_norm, edge_norm = pyg_coefficients(node_count, edge_count, num_samples, graph.dst)
    np.testing.assert_allclose(loader.node_norm, node_norm, rtol=1e-6)
    np.testing.assert_allclose(loader.edge_norm, edge_norm, rtol=1e-6)
    assert np.any(edge_norm == np.float32(1e4))
    if kind == "node":
        assert np.any(edge_norm == np.float32(0.1)) and np.any(node_norm > 1)  # nodes never drawn


@pytest.mark.parametrize("kind", sorted(SAINT_LOADERS))
def test_coefficients_make_aggregation_and_loss_unbiased(kind):
    """Over 2000 fresh batches: for each node v, the mean over the batches holding v of
    ``sum over sampled edges e into v of edge_norm[e] * x[src]`` is the full sum over v's in-edges,
    and the mean of ``sum over batch nodes of node_norm[v] * loss[v]`` is the full mean loss, within
    4.5 standard errors (of the batches drawn and of the pre-sampling counts). The coefficients PyG
    computes (dividing the source's count) fail the same test on this graph."""
    graph, coverage, seed = skewed_graph(), 300, 1
    loader = SAINT_LOADERS[kind](graph, num_steps=500, sample_coverage=coverage, seed=seed)
    node_count, edge_count, num_samples = recount(loader, graph, coverage, 500, seed)
    _, pyg_edge_norm = pyg_coefficients(node_count, edge_count, num_samples, graph.src)
    x = graph["x"][:, 0]
    loss = np.linspace(0.5, 2.0, graph.num_nodes)
    sums, pyg_sums, squares, pyg_squares, hits = (np.zeros(graph.num_nodes) for _ in range(5))
    batch_losses = []
    for _ in range(4):
        for batch in loader:
            src, dst = batch.graph.edge_index
            for weights, total, square in ((batch["edge_norm"], sums, squares),
                                           (pyg_edge_norm[batch.e_id], pyg_sums, pyg_squares)):
                aggregated = np.bincount(dst, weights=weights * x[batch.n_id[src]], minlength=batch.num_nodes)
                total[batch.n_id] += aggregated
                square[batch.n_id] += aggregated ** 2
            hits[batch.n_id] += 1
            batch_losses.append(np.sum(batch["node_norm"] * loss[batch.n_id]))

    full = np.bincount(graph.dst, weights=x[graph.src], minlength=graph.num_nodes)
    counted = np.maximum(edge_count, 1)
    coverage_variance = (full ** 2 / np.maximum(node_count, 1)
                         + np.bincount(graph.dst, weights=x[graph.src] ** 2 / counted, minlength=graph.num_nodes))
    tested = hits >= 50
    assert tested.sum() >= 15

    def deviations(total, square):
        mean = total[tested] / hits[tested]
        variance = np.maximum(square[tested] / hits[tested] - mean ** 2, 0) / hits[tested]
        return np.abs(mean - full[tested]) / np.sqrt(variance + coverage_variance[tested] + 1e-12)

    assert np.max(deviations(sums, squares)) <= 4.5
    assert np.max(deviations(pyg_sums, pyg_squares)) > 4.5

    reachable = node_count > 0
    full_loss = loss[reachable].sum() / graph.num_nodes
    spread = (np.var(batch_losses) / len(batch_losses)
              + np.sum((loss[reachable] / graph.num_nodes) ** 2 / node_count[reachable]))
    assert abs(np.mean(batch_losses) - full_loss) <= 4.5 * np.sqrt(spread)


def test_coefficients_are_cached_on_the_graph():
    graph = skewed_graph()
    first = GraphSAINTNodeLoader(graph, 12, num_steps=3, sample_coverage=4)
    second = GraphSAINTNodeLoader(graph, 12, num_steps=3, sample_coverage=4)
    assert first.edge_norm is second.edge_norm
    assert GraphSAINTNodeLoader(graph, 12, num_steps=3).node_norm is None


SAINT_MODEL = """
dim C = 2
model saint_sum(x: node[F], edge_norm: edge[], node_norm: node[], W: param[F, C]) -> node[C] {
    z = x @ W
    return (sum(z[src] * edge_norm) by dst) * node_norm
}
"""


def test_models_read_the_coefficients_and_run_on_batches():
    """A compiled model takes ``edge_norm`` / ``node_norm`` as edge / node inputs of a batch (its
    NumPy run and its torch module agree with the formula); a single-cluster batch is the whole
    graph, where the model gives the full-graph result."""
    graph = random_graph().with_data(node_norm=np.ones(60), edge_norm=np.ones(400))
    model = mpdsl.compile(SAINT_MODEL, dtype="float64", seed=0)
    full = model(graph)
    whole = next(iter(ClusterLoader(graph, 1)))
    np.testing.assert_array_equal(whole.n_id, np.arange(60))
    np.testing.assert_allclose(model(whole.graph), full, rtol=1e-10)

    plain = random_graph()
    batch = next(iter(GraphSAINTRandomWalkLoader(plain, 6, 3, num_steps=2, sample_coverage=4)))
    z = batch["x"] @ model.params["W"]
    src, dst = batch.graph.edge_index
    expected = np.zeros_like(z)
    np.add.at(expected, dst, z[src] * batch["edge_norm"].astype(np.float64)[:, None])
    expected *= batch["node_norm"].astype(np.float64)[:, None]
    np.testing.assert_allclose(model(batch.graph), expected, rtol=1e-10)
    module = model.to_torch(batch.graph)
    np.testing.assert_allclose(module(batch.graph).detach().numpy(), expected, rtol=1e-10)


# ---- bad input --------------------------------------------------------------------------------


def batched_graph() -> Graph:
    return Graph(np.array([[0, 2], [1, 3]]), 4, node_data={"batch": np.array([0, 0, 1, 1])})


@pytest.mark.parametrize("build, message", [
    (lambda g: ClusterLoader(g, 0), "num_parts must be a positive integer"),
    (lambda g: ClusterLoader(g, 2.0), "num_parts must be a positive integer"),
    (lambda g: ClusterLoader(g, 61), "num_parts=61 is larger than the graph's 60 nodes"),
    (lambda g: cluster_partition(g, 61), "num_parts=61"),
    (lambda g: ClusterLoader(g, 4, batch_size=0), "batch_size must be a positive integer"),
    (lambda g: GraphSAINTNodeLoader(g, 0, num_steps=2), "budget must be a positive integer"),
    (lambda g: GraphSAINTEdgeLoader(g, 1.5, num_steps=2), "budget must be a positive integer"),
    (lambda g: GraphSAINTNodeLoader(g, 5, num_steps=0), "num_steps must be a positive integer"),
    (lambda g: GraphSAINTEdgeLoader(g, 5, num_steps=-1), "num_steps must be a positive integer"),
    (lambda g: GraphSAINTRandomWalkLoader(g, 0, 2, num_steps=2), "num_roots must be a positive integer"),
    (lambda g: GraphSAINTRandomWalkLoader(g, 2, 0, num_steps=2), "walk_length must be a positive integer"),
    (lambda g: GraphSAINTRandomWalkLoader(g, 2, True, num_steps=2), "walk_length must be a positive integer"),
    (lambda g: GraphSAINTNodeLoader(g, 5, num_steps=2, sample_coverage=-1),
     "sample_coverage must be a non-negative integer"),
    (lambda g: GraphSAINTRandomWalkLoader(g, 2, 2, num_steps=2, sample_coverage=0.5),
     "sample_coverage must be a non-negative integer"),
    (lambda g: GraphSAINTNodeLoader(g.with_data(node_norm=np.ones(60)), 5, num_steps=2),
     "graph already has a 'node_norm' array"),
    (lambda g: GraphSAINTNodeLoader(Graph(np.zeros((2, 0), np.int64), 5), 5, num_steps=2),
     "graph has no edges for GraphSAINT's node sampler"),
    (lambda g: GraphSAINTEdgeLoader(Graph(np.zeros((2, 0), np.int64), 5), 5, num_steps=2),
     "graph has no edges for GraphSAINT's edge sampler"),
    (lambda g: GraphSAINTRandomWalkLoader(Graph(np.zeros((2, 0), np.int64), 0), 2, 2, num_steps=2),
     "graph has no nodes"),
    (lambda g: ClusterLoader(batched_graph(), 2), "graph has a 'batch' vector"),
    (lambda g: GraphSAINTNodeLoader(batched_graph(), 2, num_steps=2), "graph has a 'batch' vector"),
    (lambda g: GraphSAINTEdgeLoader(batched_graph(), 2, num_steps=2), "graph has a 'batch' vector"),
    (lambda g: GraphSAINTRandomWalkLoader(batched_graph(), 2, 2, num_steps=2), "graph has a 'batch' vector"),
])
def test_bad_arguments_are_refused_by_name(build, message):
    with pytest.raises(SamplingError, match=message.replace("(", r"\(")):
        build(random_graph())
