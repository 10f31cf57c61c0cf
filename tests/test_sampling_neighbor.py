"""Tests of GraphSAGE neighbour sampling (``mpdsl.sampling.neighbor``): every batch is checked against
the graph by an independent reading of the sampling rules (``check_batch``), the draws against their
distribution, the batches across threads, keys and DataLoader worker processes, and a model on an
all-neighbour batch against the same model on the full graph."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import mpdsl
from mpdsl.backends import cpu_kernels
from mpdsl.sampling import neighbor
from mpdsl.sampling.loader import SamplingError, batch_key
from mpdsl.sampling.neighbor import NeighborLoader, NeighborSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategies import graphs

ROOT = Path(__file__).resolve().parents[1]


def random_graph(seed: int = 0, nodes: int = 300, edges: int = 3000) -> mpdsl.Graph:
    """Random edges plus a hub (node 0 receives from a third of the nodes), self loops, parallel
    edges and isolated nodes (the last ten), with float64 features ``x``."""
    rng = np.random.default_rng(seed)
    live = nodes - 10
    pairs = [rng.integers(0, live, (2, edges)), np.stack([np.arange(1, live, 3), np.zeros_like(np.arange(1, live, 3))]),
             np.stack([np.arange(0, live, 7)] * 2)]
    edge_index = np.concatenate(pairs, axis=1)
    edge_index = np.concatenate([edge_index, edge_index[:, :200]], axis=1)  # parallel copies
    edge_index = edge_index[:, rng.permutation(edge_index.shape[1])]
    return mpdsl.Graph(edge_index, nodes, node_data={"x": rng.normal(size=(nodes, 3))},
                       edge_data={"edge_w": rng.normal(size=edge_index.shape[1])})


def expected_count(degree: int, fanout: int, replace: bool) -> int:
    if fanout == -1:
        return degree
    if replace:
        return fanout if degree else 0
    return min(fanout, degree)


def check_batch(graph: mpdsl.Graph, batch, seeds, fanouts, replace: bool) -> None:
    """``batch`` is the neighbour sample of ``seeds``: an exact subgraph, seeds first, hop by hop, each
    node sampled once with its expected number of distinct (or drawn) in-edges."""
    n_id, e_id = batch.n_id, batch.e_id
    src, dst = batch.graph.edge_index
    assert batch.batch_size == len(seeds) and n_id.dtype == e_id.dtype == np.int64
    np.testing.assert_array_equal(n_id[:len(seeds)], seeds)
    assert np.unique(n_id).size == n_id.size
    np.testing.assert_array_equal(graph.src[e_id], n_id[src])
    np.testing.assert_array_equal(graph.dst[e_id], n_id[dst])
    np.testing.assert_array_equal(batch["x"], graph["x"][n_id])
    if "edge_w" in graph:
        np.testing.assert_array_equal(batch["edge_w"], graph["edge_w"][e_id])
    degree = np.bincount(graph.dst, minlength=graph.num_nodes)
    start, end, position = 0, len(seeds), 0
    for fanout in fanouts:
        counts = [expected_count(int(degree[v]), fanout, replace) for v in n_id[start:end]]
        hop = slice(position, position + sum(counts))
        assert np.all((dst[hop] >= start) & (dst[hop] < end))
        np.testing.assert_array_equal(np.bincount(dst[hop] - start, minlength=end - start), counts)
        if not replace:
            assert np.unique(e_id[hop]).size == sum(counts)
        for local in range(start, end):
            if fanout == -1 or (not replace and degree[n_id[local]] <= fanout):
                mine = np.sort(e_id[hop][dst[hop] == local])
                np.testing.assert_array_equal(mine, np.flatnonzero(graph.dst == n_id[local]))
        new = [s for s in dict.fromkeys(src[hop].tolist()) if s >= end]
        assert new == list(range(end, end + len(new)))
        start, end, position = end, end + len(new), hop.stop
    assert position == len(e_id) and end == len(n_id)


@pytest.mark.parametrize("replace", [False, True])
@pytest.mark.parametrize("fanouts", [[3, 2], [-1, 4], [1], [2, 2, 2], [-1, -1]])
def test_batches_follow_the_sampling_rules(fanouts, replace):
    graph = random_graph()
    seeds = np.random.default_rng(1).permutation(graph.num_nodes)[:40]
    seeds[:3] = [0, 295, 296]  # the hub and two isolated nodes
    batch = NeighborSampler(graph, fanouts, replace=replace)(seeds, 12345)
    check_batch(graph, batch, seeds, fanouts, replace)


@given(graph=graphs(0, 40, 200), fanouts=st.lists(st.sampled_from([-1, 1, 2, 3, 5]), min_size=1, max_size=3),
       replace=st.booleans(), draw=st.integers(0, 2**32 - 1), key=st.integers(0, 2**63 - 1))
def test_any_graph(graph, fanouts, replace, draw, key):
    rng = np.random.default_rng(draw)
    seeds = rng.permutation(graph.num_nodes)[:rng.integers(0, graph.num_nodes + 1)]
    check_batch(graph, NeighborSampler(graph, fanouts, replace=replace)(seeds, key), seeds, fanouts, replace)


def same_batch(a, b) -> bool:
    return (a.batch_size == b.batch_size and np.array_equal(a.n_id, b.n_id) and np.array_equal(a.e_id, b.e_id)
            and np.array_equal(a.graph.edge_index, b.graph.edge_index))


@pytest.mark.parametrize("replace", [False, True])
def test_the_key_alone_decides_the_batch(replace):
    graph = random_graph()
    sampler = NeighborSampler(graph, [4, 3], replace=replace)
    seeds = np.arange(30)
    first = sampler(seeds, 7)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        serial = sampler(seeds, 7)
    finally:
        numba.set_num_threads(threads)
    assert same_batch(first, serial) and same_batch(first, sampler(seeds, 7))
    assert same_batch(first, NeighborSampler(graph, [4, 3], replace=replace)(seeds, 7))
    assert not same_batch(first, sampler(seeds, 8))


@pytest.mark.parametrize("replace", [False, True])
def test_draws_are_uniform(replace):
    """Node 0 has 50 in-edges; over 4000 keys each is sampled as often as the others (chi-square)."""
    graph = mpdsl.Graph(np.stack([np.arange(1, 51), np.zeros(50, dtype=np.int64)]), 51)
    sampler = NeighborSampler(graph, [5], replace=replace)
    picks = np.concatenate([sampler(np.array([0]), batch_key(0, 0, k)).e_id for k in range(4000)])
    assert picks.size == 20000
    assert stats.chisquare(np.bincount(picks, minlength=50)).pvalue > 1e-4


def test_hub_without_replacement_costs_its_fanout_not_its_degree():
    """Two seeds with 3M in-edges each: a batch (best of 20) takes far less than one pass over their
    edges would (about 0.2 ms against several)."""
    hubs = 3_000_000
    edge_index = np.stack([np.arange(2 * hubs) % 1000 + 2, np.repeat([0, 1], hubs)])
    sampler = NeighborSampler(mpdsl.Graph(edge_index, 1002), [10])
    seeds = np.array([0, 1])
    assert sampler(seeds, 0).num_edges == 20
    times = []
    for key in range(20):
        began = time.perf_counter()
        sampler(seeds, key)
        times.append(time.perf_counter() - began)
    assert min(times) < 2e-3, times


@pytest.mark.parametrize("name", ["sage_mean", "gin"])
def test_all_neighbour_batch_equals_the_full_graph(name):
    graph = random_graph(2)
    model = mpdsl.compile(ROOT / "examples" / f"{name}.mp", dtype="float64", seed=0)
    full = model(graph)
    seeds = np.random.default_rng(3).permutation(graph.num_nodes)[:50]
    batch = NeighborSampler(graph, [-1, -1])(seeds, 99)
    np.testing.assert_allclose(model(batch.graph)[:batch.batch_size], full[seeds], rtol=1e-10, atol=1e-12)
    partial = NeighborSampler(graph, [-1])(seeds, 99)  # one hop is not enough for two layers
    assert not np.allclose(model(partial.graph)[:partial.batch_size], full[seeds], rtol=1e-10, atol=1e-12)


def test_memory_mapped_structure(tmp_path):
    """Structure pre-filled from read-only memory-mapped files (as Graph.load(mmap=True) does) gives
    the batches of the in-memory graph."""
    graph = random_graph()
    indptr, perm = graph.csr_by_dst()
    for name, array in (("indptr", indptr), ("perm", perm), ("sources", graph.src[perm])):
        np.save(tmp_path / f"{name}.npy", array)
    mapped = mpdsl.Graph(graph.edge_index, graph.num_nodes, node_data=graph.node_data)
    loaded = {name: np.load(tmp_path / f"{name}.npy", mmap_mode="r") for name in ("indptr", "perm", "sources")}
    mapped.cached("csr_dst", lambda: (loaded["indptr"], loaded["perm"]))
    mapped.cached("csr_dst_sources", lambda: loaded["sources"])
    seeds = np.arange(0, 300, 7)
    for replace in (False, True):
        assert same_batch(NeighborSampler(mapped, [5, 5], replace=replace)(seeds, 3),
                          NeighborSampler(graph, [5, 5], replace=replace)(seeds, 3))


def test_loader_batches_and_workers():
    """Seeds in the loader's order, batch_size per batch; worker processes (forked after this process
    ran the kernels) yield the batches this process samples."""
    graph = random_graph()
    mask = np.zeros(graph.num_nodes, dtype=bool)
    mask[::3] = True
    options = dict(input_nodes=mask, batch_size=16, shuffle=True, seed=5)
    in_process = list(NeighborLoader(graph, [4, 2], **options))
    seeds = np.concatenate([b.n_id[:b.batch_size] for b in in_process])
    assert [b.batch_size for b in in_process] == [16] * 6 + [4]
    np.testing.assert_array_equal(np.sort(seeds), np.flatnonzero(mask))
    for batch in in_process:
        check_batch(graph, batch, batch.n_id[:batch.batch_size], [4, 2], False)
    workers = NeighborLoader(graph, [4, 2], num_workers=2, multiprocessing_context="fork", timeout=60, **options)
    assert all(same_batch(a, b) for a, b in zip(in_process, workers, strict=True))


def test_workers_start_while_another_thread_launches_kernels():
    """A thread of this process holds the kernel launch lock while the workers fork: they must not
    inherit it held (they would hang)."""
    graph = random_graph()
    loader = NeighborLoader(graph, [3], batch_size=50, num_workers=2, multiprocessing_context="fork", timeout=30)
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with cpu_kernels._LAUNCH:
            held.set()
            done.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    try:
        assert sum(batch.batch_size for batch in loader) == graph.num_nodes
    finally:
        done.set()
        holder.join()


def test_empty_graph_and_tensor_seeds():
    empty = mpdsl.Graph(np.empty((2, 0), dtype=np.int64), 0)
    batch = NeighborSampler(empty, [2, -1])(np.empty(0, dtype=np.int64), 0)
    assert batch.num_nodes == batch.num_edges == batch.batch_size == 0
    refused("the graph has no nodes to sample", NeighborLoader, empty, [2])
    torch = pytest.importorskip("torch")
    graph = random_graph()
    mask = torch.zeros(graph.num_nodes, dtype=torch.bool)
    mask[[5, 9]] = True
    by_mask = next(iter(NeighborLoader(graph, [2], input_nodes=mask, batch_size=8)))
    by_index = next(iter(NeighborLoader(graph, [2], input_nodes=torch.tensor([5, 9]), batch_size=8)))
    assert same_batch(by_mask, by_index) and by_mask.n_id[:2].tolist() == [5, 9]


def test_import_mpdsl_leaves_sampling_alone():
    code = ("import sys, mpdsl; assert 'mpdsl.sampling' not in sys.modules; import mpdsl.sampling as s; "
            "assert 'mpdsl.sampling.neighbor' not in sys.modules; s.NeighborLoader; s.NeighborSampler")
    subprocess.run([sys.executable, "-c", code], check=True)


def refused(fragment: str, call, *args, **kwargs) -> None:
    with pytest.raises(SamplingError, match=fragment):
        call(*args, **kwargs)


@pytest.mark.parametrize("fanouts", [[], [0], [-2], [1.5], [True], [2, None], "15", 15, [[2]], np.array([[2]]),
                                     np.array(5), [2**63]])
def test_bad_fanouts(fanouts):
    refused("num_neighbors must be a non-empty list of positive integers or -1", NeighborLoader, random_graph(),
            fanouts)


def test_bad_loader_arguments():
    graph = random_graph()
    n = graph.num_nodes
    refused("batch_size must be a positive integer", NeighborLoader, graph, [2], batch_size=0)
    refused(f"input_nodes holds node {n}, outside", NeighborLoader, graph, [2], input_nodes=[0, n])
    refused("input_nodes holds node -1, outside", NeighborLoader, graph, [2], input_nodes=np.array([-1, 2]))
    refused(f"boolean mask of length {n - 1}, but the graph has {n} nodes", NeighborLoader, graph, [2],
            input_nodes=np.ones(n - 1, dtype=bool))
    refused("input_nodes must be a boolean mask", NeighborLoader, graph, [2], input_nodes=np.ones(n))
    refused("input_nodes must be a boolean mask", NeighborLoader, graph, [2], input_nodes=np.ones((n, 1), bool))
    refused("input_nodes holds node 4 more than once", NeighborLoader, graph, [2], input_nodes=[3, 4, 5, 4])
    refused("input_nodes selects no nodes", NeighborLoader, graph, [2], input_nodes=np.zeros(n, dtype=bool))
    refused("replace must be True or False", NeighborLoader, graph, [2], replace="yes")
    refused("graph must be an mpdsl.Graph", NeighborLoader, graph.edge_index, [2])
    batched = mpdsl.Graph.batch([graph, graph])
    refused("graph has a 'batch' vector", NeighborLoader, batched, [2])


def test_a_hop_past_the_memory_budget(monkeypatch):
    """With replacement a hop is not bounded by the degrees: past the budget it is refused, and the
    sampler is left usable."""
    monkeypatch.setenv("MPDSL_MEMORY_LIMIT", "1M")
    monkeypatch.setattr(neighbor, "BUDGET_CHECK_BYTES", 0)
    graph, seeds = random_graph(), np.arange(10)
    sampler = NeighborSampler(graph, [2, 2000], replace=True)
    refused(r"hop 2 of this batch samples \d+ edges \(.*\), past the memory budget of 1.0 MiB", sampler, seeds, 0)
    monkeypatch.setenv("MPDSL_MEMORY_LIMIT", "none")
    check_batch(graph, sampler(seeds, 0), seeds, [2, 2000], True)
    monkeypatch.setenv("MPDSL_MEMORY_LIMIT", "64G")  # a total past int64 is refused, not wrapped around
    huge = NeighborSampler(graph, [2**63 - 1], replace=True)
    refused(r"hop 1 of this batch samples 92233720368547758070 edges", huge, seeds, 0)


def test_bad_sampler_calls():
    graph = random_graph()
    sampler = NeighborSampler(graph, [2])
    refused("units holds seed node 7 more than once", sampler, np.array([7, 1, 7]), 0)
    refused("units holds node 300, outside", sampler, np.array([1, 300]), 0)
    refused("units must be a 1-D integer array", sampler, np.array([1.0]), 0)
    refused(r"key must be an integer in \[0, 2\*\*63\)", sampler, np.array([1]), -1)
    check_batch(graph, sampler(np.array([7, 1]), 0), [7, 1], [2], False)  # the refused call left no trace
