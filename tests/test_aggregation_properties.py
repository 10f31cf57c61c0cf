"""Property tests of the graph ops of the NumPy reference backend.

Small inline .mp programs are run on hypothesis graphs (see ``strategies.py``) and checked
against brute-force Python loops written here: aggregations by dst / src / graph, edge and graph
softmax, degrees, gathers, graph -> node broadcast, permutation equivariance, and the
empty-neighbourhood conventions (an empty group reduces to 0).
"""

from __future__ import annotations

import functools
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mpdsl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategies import FEATURE_KINDS, batched_graphs, graphs, node_features  # noqa: E402

REDUCES = ("sum", "mean", "max", "min", "std")

@functools.lru_cache(maxsize=None)
def compiled(source: str, dtype: str = "float64") -> mpdsl.CompiledModel:
    return mpdsl.compile(source, dtype=dtype)


def edge_values(rng_seed: int, kind: str, rows: int, f: int) -> np.ndarray:
    return node_features(np.random.default_rng(rng_seed), kind, rows, f)


@st.composite
def graph_and_edge_values(draw, **graph_kwargs):
    """(graph, float64 [E, F] edge values), F the width of the graph's x."""
    g = draw(graphs(**graph_kwargs), label="graph")
    kind = draw(st.sampled_from(FEATURE_KINDS), label="edge value kind")
    seed = draw(st.integers(0, 2**32 - 1), label="edge value seed")
    return g, edge_values(seed, kind, g.num_edges, g["x"].shape[1])


# ---- brute-force references -------------------------------------------------------------------

POPULATION = {
    "sum": lambda rows: np.sum(rows, axis=0),
    "mean": lambda rows: np.mean(rows, axis=0),
    "max": lambda rows: np.max(rows, axis=0),
    "min": lambda rows: np.min(rows, axis=0),
    "std": lambda rows: np.std(rows, axis=0),  # ddof=0: population
}


def groups_of(keys, count: int) -> list[list[int]]:
    """groups[k] = positions p (in order) with keys[p] == k, for k < count."""
    groups = defaultdict(list)
    for position, key in enumerate(keys):
        groups[int(key)].append(position)
    return [groups[k] for k in range(count)]


def loop_reduce(values: np.ndarray, keys, count: int, reduce: str) -> np.ndarray:
    out = np.zeros((count,) + values.shape[1:])
    for k, members in enumerate(groups_of(keys, count)):
        if members:
            out[k] = POPULATION[reduce](np.stack([values[p] for p in members]))
    return out


def loop_softmax(values: np.ndarray, keys, count: int) -> np.ndarray:
    out = np.zeros_like(values, dtype=np.float64)
    for members in groups_of(keys, count):
        if members:
            rows = np.stack([values[p] for p in members])
            e = np.exp(rows - rows.max(axis=0))
            for p, row in zip(members, e / e.sum(axis=0)):
                out[p] = row
    return out


def scale_of(*arrays) -> float:
    return max([1.0] + [float(np.abs(a).max(initial=0.0)) for a in arrays])


def assert_reduction(out, expected, values, reduce, what):
    assert out.shape == expected.shape, (what, out.shape, expected.shape)
    s = scale_of(values)
    if reduce == "std":
        assert np.all(out >= 0), what
        np.testing.assert_allclose(out, expected, rtol=1e-9, atol=1e-9 * s, err_msg=what)
    else:
        tol = 1e-12 * s * (max(1, len(values)) if reduce == "sum" else 1)
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=tol, err_msg=what)


# ---- edge -> node aggregations ----------------------------------------------------------------


@pytest.mark.parametrize("by", ["dst", "src"])
@pytest.mark.parametrize("reduce", REDUCES)
@given(case=graph_and_edge_values())
def test_aggregation_matches_loop(reduce, by, case):
    g, v = case
    model = compiled(f"model m(v: edge[F]) -> node[F] {{ return {reduce}(v) by {by} }}")
    out = model(g, v=v)
    keys = g.dst if by == "dst" else g.src
    assert_reduction(out, loop_reduce(v, keys, g.num_nodes, reduce), v, reduce, f"{reduce} by {by}")


@pytest.mark.parametrize("reduce", REDUCES + ("softmax",))
@settings(max_examples=20)
@given(case=graph_and_edge_values())
def test_float32_aggregation_matches_loop(reduce, case):
    """The float32 build computes in float32 and agrees with the float64 loop to ~1e-5."""
    g, v = case
    if reduce == "softmax":
        source = "model m(v: edge[F]) -> edge[F] { return softmax(v) by dst }"
        expected = loop_softmax(v, g.dst, g.num_nodes)
    else:
        source = f"model m(v: edge[F]) -> node[F] {{ return {reduce}(v) by dst }}"
        expected = loop_reduce(v, g.dst, g.num_nodes, reduce)
    out = compiled(source, "float32")(g, v=v)
    assert out.dtype == np.float32 and out.shape == expected.shape
    s = scale_of(v)
    if reduce == "std":  # variances, as in assert_reduction (float32 eps ~ 6e-8)
        np.testing.assert_allclose(out.astype(np.float64) ** 2, expected ** 2, rtol=1e-4, atol=1e-6 * s * s)
    else:
        terms = max(1, len(v)) if reduce == "sum" else 1
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6 * s * terms)


@pytest.mark.parametrize("reduce", REDUCES)
@given(g=graphs())
def test_aggregation_of_gathered_node_values(reduce, g):
    """{reduce}(x[src]) by dst (over in-neighbours) and {reduce}(x[dst]) by src (over
    out-neighbours), in one two-output program."""
    model = compiled(f"model m(x: node[F]) -> (a: node[F], b: node[F]) {{ "
                     f"return {reduce}(x[src]) by dst, {reduce}(x[dst]) by src }}")
    out = model(g)
    assert set(out) == {"a", "b"}
    x = np.asarray(g["x"])
    at_src = np.array([x[j] for j in g.src.tolist()]).reshape(g.num_edges, x.shape[1])
    at_dst = np.array([x[i] for i in g.dst.tolist()]).reshape(g.num_edges, x.shape[1])
    incoming = loop_reduce(at_src, g.dst, g.num_nodes, reduce)
    outgoing = loop_reduce(at_dst, g.src, g.num_nodes, reduce)
    assert_reduction(out["a"], incoming, x, reduce, f"{reduce}(x[src]) by dst")
    assert_reduction(out["b"], outgoing, x, reduce, f"{reduce}(x[dst]) by src")


@pytest.mark.parametrize("by", ["dst", "src"])
@pytest.mark.parametrize("reduce", REDUCES)
@given(g=graphs(min_nodes=1))
def test_isolated_nodes_aggregate_to_zero(reduce, by, g):
    """Messages all lie in [5, 15], so 0 can only come from an empty group: it must be exactly 0
    where the node has no edge on that side, and nowhere else (except a std of equal values)."""
    model = compiled(f"model m(v: edge[F]) -> node[F] {{ return {reduce}(v) by {by} }}")
    v = 10.0 + np.tanh(np.arange(g.num_edges * 3, dtype=np.float64).reshape(-1, 3)) * 5.0
    out = model(g, v=v)
    degree = g.in_degree() if by == "dst" else g.out_degree()
    assert np.all(out[degree == 0] == 0.0), f"{reduce} by {by}: a node without edges is not 0"
    if reduce != "std":
        assert np.all(np.abs(out[degree > 0]) >= 5.0), f"{reduce} by {by}: a nonempty group gave < 5"


@pytest.mark.parametrize("num_nodes", [0, 3], ids=["empty-graph", "no-edges"])
@pytest.mark.parametrize("by", ["dst", "src"])
@pytest.mark.parametrize("reduce", REDUCES)
def test_edgeless_aggregation(reduce, by, num_nodes):
    """No edges: the output has one row per node (possibly none), all 0, and no error."""
    x = np.arange(num_nodes * 2, dtype=np.float64).reshape(num_nodes, 2) + 1
    g = mpdsl.Graph.from_arrays(np.zeros((2, 0), dtype=np.int64), num_nodes=num_nodes, x=x)
    out = compiled(f"model m(x: node[F]) -> node[F] {{ return {reduce}(x[src]) by {by} }}")(g)
    assert out.shape == (num_nodes, 2)
    assert np.all(out == 0)


# ---- softmax --------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["dst", "src"])
@given(case=graph_and_edge_values())
def test_edge_softmax(by, case):
    g, s = case
    alpha = compiled(f"model m(s: edge[F]) -> edge[F] {{ return softmax(s) by {by} }}")(g, s=s)
    keys = g.dst if by == "dst" else g.src
    assert alpha.shape == s.shape
    assert np.all(np.isfinite(alpha)) and np.all(alpha >= 0) and np.all(alpha <= 1 + 1e-12)
    totals = np.zeros((g.num_nodes, s.shape[1]))
    np.add.at(totals, keys, alpha)
    nonempty = np.bincount(keys, minlength=g.num_nodes) > 0
    np.testing.assert_allclose(totals[nonempty], 1.0, rtol=0, atol=1e-12)
    assert np.all(totals[~nonempty] == 0)
    np.testing.assert_allclose(alpha, loop_softmax(s, keys, g.num_nodes), rtol=1e-12, atol=1e-15)


def test_edge_softmax_is_shift_invariant_and_stable():
    """Huge scores (exp overflows without max subtraction) still give the exact softmax."""
    g = mpdsl.Graph.from_arrays(np.array([[0, 1, 2, 0], [1, 1, 1, 2]]), num_nodes=3)
    s = np.array([[1000.0], [1001.0], [999.0], [-1000.0]])
    alpha = compiled("model m(s: edge[F]) -> edge[F] { return softmax(s) by dst }")(g, s=s)
    e = np.exp(np.array([-1.0, 0.0, -2.0]))
    np.testing.assert_allclose(alpha[:3, 0], e / e.sum(), rtol=1e-13)
    assert alpha[3, 0] == 1.0  # alone in its neighbourhood


@pytest.mark.parametrize("num_nodes", [0, 3], ids=["empty-graph", "no-edges"])
def test_edgeless_softmax(num_nodes):
    g = mpdsl.Graph.from_arrays(np.zeros((2, 0), dtype=np.int64), num_nodes=num_nodes,
                                x=np.ones((num_nodes, 2)))
    out = compiled("model m(x: node[F]) -> edge[F] { return softmax(x[src]) by dst }")(g)
    assert out.shape == (0, 2)


# ---- graph readouts and broadcast ------------------------------------------------------------


@pytest.mark.parametrize("reduce", REDUCES)
@given(g=batched_graphs(empty_members=True))
def test_readout_by_graph(reduce, g):
    out = compiled(f"model m(x: node[F]) -> graph[F] {{ return {reduce}(x) by graph }}")(g)
    x = np.asarray(g["x"])
    assert out.shape == (g.num_graphs, x.shape[1])
    expected = loop_reduce(x, g.batch, g.num_graphs, reduce)
    assert_reduction(out, expected, x, reduce, f"{reduce} by graph")
    counts = np.bincount(g.batch, minlength=g.num_graphs)
    assert np.all(out[counts == 0] == 0), "a graph without nodes must read out 0"


@given(g=batched_graphs(empty_members=True))
def test_softmax_by_graph(g):
    out = compiled("model m(x: node[F]) -> node[F] { return softmax(x) by graph }")(g)
    x = np.asarray(g["x"])
    np.testing.assert_allclose(out, loop_softmax(x, g.batch, g.num_graphs), rtol=1e-12, atol=1e-15)


@given(g=batched_graphs(empty_members=True))
def test_graph_to_node_broadcast(g):
    """v[batch] gives every node its graph's row: a per-graph sum and a per-graph max."""
    model = compiled("model m(x: node[F]) -> (s: node[F], c: node[F]) { "
                     "return (sum(x) by graph)[batch], x - (max(x) by graph)[batch] }")
    out = model(g)
    x = np.asarray(g["x"])
    totals = {gid: x[g.batch == gid].sum(axis=0) for gid in set(g.batch.tolist())}
    highest = {gid: x[g.batch == gid].max(axis=0) for gid in set(g.batch.tolist())}
    expected_s = np.stack([totals[int(b)] for b in g.batch])
    expected_c = np.stack([x[v] - highest[int(b)] for v, b in enumerate(g.batch)])
    np.testing.assert_allclose(out["s"], expected_s, rtol=1e-12, atol=1e-12 * scale_of(x) * len(x))
    np.testing.assert_array_equal(out["c"], expected_c)


@pytest.mark.parametrize("reduce", REDUCES)
def test_readout_of_empty_graph(reduce):
    """An unbatched graph is one graph (num_graphs == 1) even with 0 nodes: one row of 0."""
    g = mpdsl.Graph.from_arrays(np.zeros((2, 0), dtype=np.int64), num_nodes=0, x=np.zeros((0, 3)))
    assert g.num_graphs == 1
    out = compiled(f"model m(x: node[F]) -> graph[F] {{ return {reduce}(x) by graph }}")(g)
    np.testing.assert_array_equal(out, np.zeros((1, 3)))


# ---- degrees and gathers ---------------------------------------------------------------------


@given(g=graphs())
def test_degrees(g):
    out = compiled("model m(x: node[F]) -> (i: node[], o: node[]) { return in_degree(), out_degree() }")(g)
    into, out_of = np.zeros(g.num_nodes), np.zeros(g.num_nodes)
    for j, i in zip(g.src.tolist(), g.dst.tolist()):
        into[i] += 1  # a self loop counts once on each side
        out_of[j] += 1
    assert out["i"].dtype == np.float64 and out["i"].shape == (g.num_nodes,)
    np.testing.assert_array_equal(out["i"], into)
    np.testing.assert_array_equal(out["o"], out_of)
    assert out["i"].sum() == out["o"].sum() == g.num_edges


def test_degree_counts_multi_edges_and_self_loops():
    g = mpdsl.Graph.from_arrays(np.array([[0, 0, 1, 2, 2], [1, 1, 1, 2, 0]]), num_nodes=4)
    out = compiled("model m(x: node[F]) -> (i: node[], o: node[]) { return in_degree(), out_degree() }")(
        g, x=np.zeros((4, 1)))
    np.testing.assert_array_equal(out["i"], [1, 3, 1, 0])
    np.testing.assert_array_equal(out["o"], [2, 1, 2, 0])


@given(g=graphs())
def test_gather_src_and_dst(g):
    out = compiled("model m(x: node[F]) -> (a: edge[F], b: edge[F]) { return x[src], x[dst] }")(g)
    x = np.asarray(g["x"])
    f = x.shape[1]
    expected_a = np.array([x[j] for j in g.src.tolist()]).reshape(-1, f)
    expected_b = np.array([x[i] for i in g.dst.tolist()]).reshape(-1, f)
    assert out["a"].shape == out["b"].shape == (g.num_edges, f)
    np.testing.assert_array_equal(out["a"], expected_a)
    np.testing.assert_array_equal(out["b"], expected_b)


# ---- permutation equivariance -------------------------------------------------------------

GCN_LAYER = """
dim K = 4
layer gcn_conv(h: node[D], W: param[D, K], b: param[K]) -> node[K] {
    norm = rsqrt(in_degree() + 1)
    z = h @ W
    return sum(z[src] * norm[src] * norm[dst]) by dst + z * norm * norm + b
}
model gcn(x: node[F], W: param[F, K], b: param[K]) -> node[K] { return gcn_conv(x, W, b) }
"""


@functools.lru_cache(maxsize=None)
def gcn_layer(features: int) -> mpdsl.CompiledModel:
    model = mpdsl.compile(GCN_LAYER, dtype="float64")
    rng = np.random.default_rng(features)
    return model.load_weights({"W": rng.standard_normal((features, 4)), "b": rng.standard_normal(4)})


@given(g=graphs(), seed=st.integers(0, 2**32 - 1))
def test_gcn_layer_is_permutation_equivariant(g, seed):
    """Relabel node v as position[v] (and shuffle the edge list): the output rows move along."""
    rng = np.random.default_rng(seed)
    n = g.num_nodes
    order = rng.permutation(n)  # new node k is old node order[k]
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    edges = position[g.edge_index][:, rng.permutation(g.num_edges)]
    h = mpdsl.Graph.from_arrays(edges, num_nodes=n, x=np.asarray(g["x"])[order])
    model = gcn_layer(g["x"].shape[1])
    out, out_relabelled = model(g), model(h)
    assert out.shape == (n, 4)
    np.testing.assert_allclose(out_relabelled, out[order], rtol=1e-12, atol=1e-12 * scale_of(out))


def test_permutation_check_detects_a_non_equivariant_change():
    """Sanity check of the test above: without moving the features along, outputs differ."""
    g = mpdsl.Graph.from_arrays(np.array([[0, 1, 1, 2], [1, 0, 2, 2]]), num_nodes=3,
                                x=np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 1.0]]))
    order = np.array([2, 0, 1])
    position = np.empty(3, dtype=np.int64)
    position[order] = np.arange(3)
    h = mpdsl.Graph.from_arrays(position[g.edge_index], num_nodes=3, x=np.asarray(g["x"]))
    model = gcn_layer(2)
    assert not np.allclose(model(h), model(g)[order])


# ---- std precision ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, offset", [("float64", 1e8), ("float32", 1e4)])
def test_std_is_accurate_for_a_large_mean(dtype, offset):
    g = mpdsl.Graph.from_arrays(np.array([[0, 0, 0], [1, 1, 1]]), num_nodes=2)
    v = offset + np.array([[0.0], [1.0], [2.0]])
    out = compiled("model m(v: edge[F]) -> node[F] { return std(v) by dst }", dtype)(g, v=v)
    expected = np.std([0.0, 1.0, 2.0])  # shift invariant: 0.8165
    assert abs(float(out[1, 0]) - expected) < 1e-3 * expected, (
        f"std of {offset:g} + [0, 1, 2] in {dtype} is {float(out[1, 0])}, expected {expected}")
