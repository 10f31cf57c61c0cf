"""Tests of the graph container: validation, layouts, files, converters and batching."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpdsl.diagnostics import GraphError
from mpdsl import graph as graph_module
from mpdsl.graph import Graph

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategies import graphs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"

TRIANGLE = [[0, 1, 2], [1, 2, 0]]


def graph_error(call, *fragments: str) -> GraphError:
    """Run ``call``, expecting a GraphError whose message holds every fragment."""
    with pytest.raises(GraphError) as caught:
        call()
    for fragment in fragments:
        assert fragment in caught.value.message, (fragment, caught.value.message)
    return caught.value


# ------------------------------------------------------------------------------------------------
# Construction and basic properties


def test_basic_properties():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    g = Graph(TRIANGLE, node_data={"x": x}, edge_data={"edge_weight": np.ones(3)})
    assert g.num_nodes == 3 and g.num_edges == 3 and g.num_graphs == 1
    assert g.edge_index.dtype == np.int64 and g.edge_index.flags.c_contiguous
    assert g.edge_index.shape == (2, 3)
    np.testing.assert_array_equal(g.src, [0, 1, 2])
    np.testing.assert_array_equal(g.dst, [1, 2, 0])
    assert g.src.dtype == np.int64 and g.dst.dtype == np.int64
    np.testing.assert_array_equal(g["x"], x)
    assert g["x"].dtype == np.float32
    assert "x" in g and "edge_weight" in g and "nope" not in g
    assert g.keys() == ["x", "edge_weight"]
    assert set(g.node_data) == {"x"} and set(g.edge_data) == {"edge_weight"}
    assert g.graph_data == {}
    np.testing.assert_array_equal(g.batch, np.zeros(3, dtype=np.int64))
    assert g.batch.dtype == np.int64
    with pytest.raises(KeyError):
        g["nope"]


def test_repr():
    g = Graph.load(DATA / "karate.npz")
    assert repr(g) == "Graph(num_nodes=34, num_edges=156, x=[34, 34], y=[34])"


def test_arrays_are_read_only():
    g = Graph(TRIANGLE, node_data={"x": np.zeros((3, 2))})
    with pytest.raises(ValueError):
        g.edge_index[0, 0] = 2
    with pytest.raises(ValueError):
        g["x"][0, 0] = 1.0
    indptr, perm = g.csr_by_dst()
    with pytest.raises(ValueError):
        perm[0] = 1


def test_lookup_order_node_then_edge_then_graph():
    g = Graph(TRIANGLE, node_data={"a": np.zeros(3)}, edge_data={"b": np.ones(3)},
              graph_data={"c": np.full(1, 2.0)})
    assert g["a"][0] == 0 and g["b"][0] == 1 and g["c"][0] == 2
    assert g.keys() == ["a", "b", "c"]


def test_empty_graph():
    for edge_index in ([], np.zeros((2, 0), dtype=np.int64), np.zeros(0, dtype=np.int32)):
        g = Graph(edge_index)
        assert g.num_nodes == 0 and g.num_edges == 0 and g.num_graphs == 1
        assert g.edge_index.shape == (2, 0) and g.edge_index.dtype == np.int64
        indptr, perm = g.csr_by_dst()
        np.testing.assert_array_equal(indptr, [0])
        assert perm.shape == (0,)
        assert g.in_degree().shape == (0,)
    g = Graph([], node_data={"batch": np.zeros(0, dtype=np.int64)})
    assert g.num_graphs == 0


def test_num_nodes_defaults():
    assert Graph(TRIANGLE).num_nodes == 3
    assert Graph([[0], [7]]).num_nodes == 8
    assert Graph([], node_data={"x": np.zeros((5, 2))}).num_nodes == 5
    # node arrays decide, so isolated trailing nodes are kept
    assert Graph(TRIANGLE, node_data={"x": np.zeros((6, 2))}).num_nodes == 6


def test_isolated_nodes():
    g = Graph(TRIANGLE, num_nodes=5)
    assert g.num_nodes == 5
    np.testing.assert_array_equal(g.in_degree(), [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(g.out_degree(), [1, 1, 1, 0, 0])
    indptr, _ = g.csr_by_dst()
    np.testing.assert_array_equal(indptr, [0, 1, 2, 3, 3, 3])


def test_self_loops_and_multi_edges_preserved():
    edge_index = [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    g = Graph(edge_index)
    np.testing.assert_array_equal(g.edge_index, edge_index)
    np.testing.assert_array_equal(g.in_degree(), [2, 3])
    np.testing.assert_array_equal(g.out_degree(), [3, 2])
    indptr, perm = g.csr_by_dst()
    np.testing.assert_array_equal(indptr, [0, 2, 5])
    np.testing.assert_array_equal(perm, [0, 4, 1, 2, 3])


def test_integer_features_kept_and_index_arrays_int64():
    g = Graph.from_arrays(TRIANGLE, x=np.arange(6, dtype=np.int16).reshape(3, 2),
                          node_type=np.array([0, 1, 1], dtype=np.uint8),
                          edge_type=np.array([2, 0, 1], dtype=np.int32))
    assert g["x"].dtype == np.int16
    assert g["node_type"].dtype == np.int64 and g["edge_type"].dtype == np.int64


def test_boolean_masks_allowed_outside_named_features():
    g = Graph.from_arrays(TRIANGLE, train_mask=np.array([True, False, True]))
    assert g.node_data["train_mask"].dtype == np.bool_


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    g = Graph(torch.tensor(TRIANGLE), node_data={"x": torch.ones(3, 2, requires_grad=True)})
    assert g.edge_index.dtype == np.int64 and g["x"].shape == (3, 2)


def test_with_data():
    g = Graph(TRIANGLE, num_nodes=4)
    h = g.with_data(x=np.ones((4, 2)), edge_attr=np.zeros((3, 5)), graph_label=np.ones(1),
                    y=np.zeros(4, dtype=np.int64))
    assert set(h.node_data) == {"x", "y"} and set(h.edge_data) == {"edge_attr"}
    assert set(h.graph_data) == {"graph_label"}
    assert g.keys() == []  # the original is unchanged
    replaced = h.with_data(x=np.zeros((4, 3)))
    assert replaced["x"].shape == (4, 3)
    custom = Graph(TRIANGLE, edge_data={"w": np.ones(3)}).with_data(w=np.zeros(3))
    assert set(custom.edge_data) == {"w"}  # a replaced array keeps its kind
    graph_error(lambda: g.with_data(x=np.ones((3, 2))), "x has 3 rows", "4 nodes")


# ------------------------------------------------------------------------------------------------
# Validation errors


def test_edge_index_dtype_errors():
    error = graph_error(lambda: Graph(np.array(TRIANGLE, dtype=np.float64)), "edge_index",
                        "float64")
    assert error.hint and "astype" in error.hint
    graph_error(lambda: Graph(np.ones((2, 3), dtype=bool)), "edge_index", "bool")
    graph_error(lambda: Graph(np.array([[0, "a"], [1, 2]], dtype=object)), "edge_index")


def test_edge_index_shape_errors():
    error = graph_error(lambda: Graph(np.array(TRIANGLE).T), "edge_index", "[2, E]", "(3, 2)")
    assert ".T" in error.hint
    graph_error(lambda: Graph(np.zeros((3, 4), dtype=np.int64)), "edge_index", "(3, 4)")
    graph_error(lambda: Graph(np.zeros(5, dtype=np.int64)), "edge_index", "(5,)")
    graph_error(lambda: Graph(np.zeros((2, 2, 2), dtype=np.int64)), "edge_index")


def test_edge_index_negative():
    edge_index = np.array([[0, 1, 2, 0, 1, -1], [1, 2, 0, 0, 0, 0]])
    error = graph_error(lambda: Graph(edge_index), "edge_index[0, 5] = -1 is negative")
    assert error.hint


def test_edge_index_out_of_range():
    edge_index = np.zeros((2, 20), dtype=np.int64)
    edge_index[1, 17] = 40
    error = graph_error(lambda: Graph(edge_index, num_nodes=34),
                        "edge_index[1, 17] = 40 is out of range for num_nodes=34")
    assert error.hint
    graph_error(lambda: Graph(TRIANGLE, node_data={"x": np.zeros((2, 1))}),
                "edge_index[0, 2] = 2 is out of range for num_nodes=2")
    graph_error(lambda: Graph(np.array([[0, 2**63 + 5]], dtype=np.uint64).reshape(2, 1)),
                "edge_index[1, 0] = 9223372036854775813 is too large")


@pytest.mark.parametrize("bad", [-1, 2.0, "3", True, np.array([3])])
def test_num_nodes_must_be_non_negative_int(bad):
    graph_error(lambda: Graph([], num_nodes=bad), "num_nodes")


def test_num_nodes_accepts_numpy_integers():
    assert Graph([], num_nodes=np.int32(4)).num_nodes == 4
    assert Graph([], num_nodes=np.array(4)).num_nodes == 4


def test_node_array_rows():
    error = graph_error(lambda: Graph(TRIANGLE, num_nodes=34, node_data={"x": np.zeros((33, 2))}),
                        "x has 33 rows but the graph has 34 nodes")
    assert error.hint
    graph_error(lambda: Graph(TRIANGLE, node_data={"x": np.zeros((3, 2)),
                                                   "pos": np.zeros((4, 3))}),
                "pos has 4 rows but the graph has 3 nodes")


def test_edge_array_rows():
    error = graph_error(lambda: Graph(TRIANGLE, edge_data={"edge_attr": np.zeros((2, 4))}),
                        "edge_attr has 2 rows but the graph has 3 edges")
    assert error.hint


def test_graph_array_rows():
    batch = np.array([0, 0, 1])
    error = graph_error(lambda: Graph(TRIANGLE, node_data={"batch": batch},
                                      graph_data={"graph_y": np.zeros(3)}),
                        "graph_y has 3 rows but the graph has 2 graphs")
    assert error.hint
    graph_error(lambda: Graph(TRIANGLE, graph_data={"graph_y": np.zeros(2)}),
                "graph_y has 2 rows but the graph has 1 graphs")


def test_scalar_arrays_refused():
    graph_error(lambda: Graph(TRIANGLE, graph_data={"graph_y": np.float32(1.0)}),
                "graph_y is a scalar")


@pytest.mark.parametrize("dtype", [bool, np.complex64, object, str])
@pytest.mark.parametrize("name", ["x", "pos"])
def test_feature_dtype_refused(name, dtype):
    values = np.zeros((3, 2)).astype(dtype)
    error = graph_error(lambda: Graph(TRIANGLE, node_data={name: values}), name,
                        "real numbers")
    assert error.hint


@pytest.mark.parametrize("dtype", [np.complex128, object])
def test_edge_feature_dtype_refused(dtype):
    values = np.zeros((3, 4)).astype(dtype)
    graph_error(lambda: Graph(TRIANGLE, edge_data={"edge_attr": values}), "edge_attr",
                "real numbers")
    graph_error(lambda: Graph(TRIANGLE, edge_data={"edge_weight": np.ones(3, dtype=bool)}),
                "edge_weight", "real numbers")


@pytest.mark.parametrize("value, text", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "-inf")])
def test_non_finite_features_refused(value, text):
    x = np.zeros((34, 10), dtype=np.float32)
    x[3, 7] = value
    x[5, 1] = value
    error = graph_error(lambda: Graph([], num_nodes=34, node_data={"x": x}),
                        f"x[3, 7] is {text}")
    assert error.hint
    weights = np.ones(3)
    weights[2] = value
    graph_error(lambda: Graph(TRIANGLE, edge_data={"edge_weight": weights}),
                f"edge_weight[2] is {text}")


def test_ragged_array_refused():
    graph_error(lambda: Graph(TRIANGLE, node_data={"x": [[1.0], [1.0, 2.0], [3.0]]}), "x")


@pytest.mark.parametrize("name, kind", [("batch", "node"), ("node_type", "node"),
                                        ("edge_type", "edge")])
def test_index_array_errors(name, kind):
    put = (lambda a: Graph(TRIANGLE, node_data={name: a})) if kind == "node" else \
        (lambda a: Graph(TRIANGLE, edge_data={name: a}))
    error = graph_error(lambda: put(np.array([0.0, 1.0, 1.0])), name, "integers", "float64")
    assert "astype" in error.hint
    graph_error(lambda: put(np.array([True, False, True])), name, "integers")
    graph_error(lambda: put(np.array([0, -2, 1])), f"{name}[1] = -2 is negative")
    graph_error(lambda: put(np.zeros((3, 1), dtype=np.int64)), name, "1-D", "(3, 1)")


def test_index_array_in_wrong_kind_refused():
    graph_error(lambda: Graph(TRIANGLE, edge_data={"batch": np.zeros(3, dtype=np.int64)}),
                "batch must be a node array")


def test_name_errors():
    graph_error(lambda: Graph(TRIANGLE, node_data={"a": np.zeros(3)}, edge_data={"a": np.zeros(3)}),
                "a is given as both")
    graph_error(lambda: Graph(TRIANGLE, node_data={"edge_index": np.zeros(3)}), "edge_index")


def test_batch_need_not_be_sorted():
    g = Graph(TRIANGLE, num_nodes=4, node_data={"batch": np.array([1, 0, 1, 0])})
    assert g.num_graphs == 2
    indptr, perm = g.segments_by_graph()
    np.testing.assert_array_equal(indptr, [0, 2, 4])
    np.testing.assert_array_equal(perm, [1, 3, 0, 2])


# ------------------------------------------------------------------------------------------------
# Classification by name


def test_from_arrays_classification():
    g = Graph.from_arrays(
        TRIANGLE, num_nodes=4,
        x=np.zeros((4, 2)), pos=np.zeros((4, 3)), node_feat=np.zeros(4), other=np.zeros(4),
        edge_attr=np.zeros((3, 1)), edge_weight=np.ones(3), edge_label=np.zeros(3),
        graph_label=np.zeros(1), y=np.zeros(4, dtype=np.int64),
    )
    assert set(g.node_data) == {"x", "pos", "node_feat", "other", "y"}
    assert set(g.edge_data) == {"edge_attr", "edge_weight", "edge_label"}
    assert set(g.graph_data) == {"graph_label"}
    graph_level = Graph.from_arrays(TRIANGLE, y=np.array([1.5]))
    assert set(graph_level.graph_data) == {"y"}


def test_from_arrays_infers_num_nodes_before_classifying_y():
    g = Graph.from_arrays(TRIANGLE, x=np.zeros((5, 1)), y=np.zeros(5))
    assert g.num_nodes == 5 and "y" in g.node_data


# ------------------------------------------------------------------------------------------------
# Layouts and degrees


def brute_force_csr(endpoint: np.ndarray, num_nodes: int):
    groups = [[e for e in range(len(endpoint)) if endpoint[e] == node] for node in range(num_nodes)]
    indptr = np.cumsum([0] + [len(group) for group in groups])
    perm = [e for group in groups for e in group]
    return indptr, np.array(perm, dtype=np.int64)


@settings(max_examples=150, deadline=None)
@given(graphs(max_nodes=12, max_edges=40))
def test_csr_layouts_match_brute_force(g):
    for layout, endpoint in ((g.csr_by_dst, g.dst), (g.csr_by_src, g.src)):
        indptr, perm = layout()
        expected_indptr, expected_perm = brute_force_csr(endpoint, g.num_nodes)
        assert indptr.dtype == np.int64 and perm.dtype == np.int64
        np.testing.assert_array_equal(indptr, expected_indptr)
        np.testing.assert_array_equal(perm, expected_perm)
    in_degree = [sum(int(d) == i for d in g.dst) for i in range(g.num_nodes)]
    out_degree = [sum(int(s) == i for s in g.src) for i in range(g.num_nodes)]
    np.testing.assert_array_equal(g.in_degree(), in_degree)
    np.testing.assert_array_equal(g.out_degree(), out_degree)
    assert g.in_degree().dtype == np.int64 and g.in_degree().shape == (g.num_nodes,)


@settings(max_examples=100, deadline=None)
@given(graphs(max_nodes=12, max_edges=40), st.data())
def test_the_csr_of_some_nodes_is_the_full_csr_restricted_to_them(g, data):
    nodes = np.array(data.draw(st.lists(st.integers(0, max(g.num_nodes - 1, 0)), max_size=6)) if g.num_nodes else [],
                     dtype=np.int64)
    indptr, perm = g.csr_by_dst_of(nodes)
    full_indptr, full_perm = brute_force_csr(g.dst, g.num_nodes)
    for node in range(g.num_nodes):
        expected = full_perm[full_indptr[node]:full_indptr[node + 1]] if node in nodes else []
        np.testing.assert_array_equal(perm[indptr[node]:indptr[node + 1]], expected)
    assert g.cached_only("csr_dst") is None  # nothing built for the whole graph
    built = g.csr_by_dst()
    assert g.csr_by_dst_of(nodes) is built


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 9), max_size=60))
def test_the_counting_sort_groups_positions_stably(ids):
    from mpdsl.backends.cpu_kernels import grouped_positions
    ids = np.array(ids, dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=10))])
    np.testing.assert_array_equal(grouped_positions(ids, indptr), np.argsort(ids, kind="stable"))


def test_large_csrs_are_grouped_by_the_counting_sort(monkeypatch):
    from mpdsl.backends import cpu_kernels
    calls = []
    counting = cpu_kernels.grouped_positions
    monkeypatch.setattr(cpu_kernels, "grouped_positions", lambda *args: calls.append(1) or counting(*args))
    rng = np.random.default_rng(0)
    num_nodes, num_edges = 70_000, graph_module.COUNTING_SORT_MIN
    g = Graph(rng.integers(0, num_nodes, (2, num_edges)), num_nodes)
    indptr, perm = g.csr_by_dst()
    assert calls == [1]
    np.testing.assert_array_equal(perm, np.argsort(g.dst, kind="stable"))
    np.testing.assert_array_equal(indptr, np.concatenate([[0], np.cumsum(np.bincount(g.dst, minlength=num_nodes))]))


def test_layouts_are_cached():
    g = Graph(TRIANGLE)
    assert g.csr_by_dst()[1] is g.csr_by_dst()[1]
    assert g.csr_by_src()[0] is g.csr_by_src()[0]
    assert g.segments_by_graph()[1] is g.segments_by_graph()[1]


# ------------------------------------------------------------------------------------------------
# Files


def test_npz_round_trip(tmp_path):
    g = Graph.from_arrays(
        [[0, 1, 2, 4], [1, 2, 0, 4]], num_nodes=6,
        x=np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32),
        edge_attr=np.arange(8, dtype=np.float64).reshape(4, 2), edge_type=np.array([0, 1, 0, 2]),
        batch=np.array([0, 0, 0, 1, 1, 1]), graph_label=np.array([3, 4]),
        node_mask=np.array([True, False, True, True, False, False]),
    )
    path = tmp_path / "graph.npz"
    g.save(path)
    h = Graph.load(path)
    assert h.num_nodes == 6 and h.num_graphs == 2
    np.testing.assert_array_equal(h.edge_index, g.edge_index)
    for kind in ("node_data", "edge_data", "graph_data"):
        mine, theirs = getattr(g, kind), getattr(h, kind)
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert mine[name].dtype == theirs[name].dtype
            np.testing.assert_array_equal(mine[name], theirs[name])


def test_save_writes_exact_path_and_is_deterministic(tmp_path):
    g = Graph.from_arrays(TRIANGLE, x=np.ones((3, 2), dtype=np.float32))
    first, second = tmp_path / "a.graph", tmp_path / "b.graph"
    g.save(first)
    g.save(second)
    assert first.exists() and not (tmp_path / "a.graph.npz").exists()
    assert first.read_bytes() == second.read_bytes()
    with np.load(first, allow_pickle=False) as loaded:
        assert loaded["num_nodes"].shape == ()


def test_save_preserves_isolated_nodes_without_node_arrays(tmp_path):
    Graph(TRIANGLE, num_nodes=10).save(tmp_path / "g.npz")
    assert Graph.load(tmp_path / "g.npz").num_nodes == 10


def test_save_refuses_names_that_would_change_kind(tmp_path):
    g = Graph(TRIANGLE, edge_data={"weight": np.ones(3)})
    error = graph_error(lambda: g.save(tmp_path / "g.npz"), "weight", "node")
    assert "edge_weight" in error.hint


def test_load_without_num_nodes(tmp_path):
    np.savez(tmp_path / "g.npz", edge_index=np.array(TRIANGLE), x=np.zeros((4, 2)),
             y=np.array([0, 1, 1, 0]))
    g = Graph.load(tmp_path / "g.npz")
    assert g.num_nodes == 4 and "y" in g.node_data


def test_load_missing_file(tmp_path):
    graph_error(lambda: Graph.load(tmp_path / "absent.npz"), "absent.npz", "does not exist")


def test_load_non_npz(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("not a graph")
    error = graph_error(lambda: Graph.load(text), "notes.npz", "not an .npz")
    assert error.hint
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    graph_error(lambda: Graph.load(empty), "empty.npz")
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    graph_error(lambda: Graph.load(single), "single.npy", ".npy")


def test_load_without_edge_index(tmp_path):
    path = tmp_path / "edgeless.npz"
    np.savez(path, x=np.zeros((3, 2)))
    error = graph_error(lambda: Graph.load(path), "edgeless.npz", "edge_index")
    assert error.hint


def test_load_refuses_object_arrays(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, edge_index=np.array(TRIANGLE), x=np.array([{"a": 1}, 2, 3], dtype=object))
    graph_error(lambda: Graph.load(path), "objects.npz")


def test_load_reports_invalid_arrays_with_file_name(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, edge_index=np.array([[0, 1], [1, 5]]), num_nodes=np.array(3))
    graph_error(lambda: Graph.load(path), "bad.npz", "edge_index[1, 1] = 5")


def test_bundled_karate():
    g = Graph.load(DATA / "karate.npz")
    assert (g.num_nodes, g.num_edges) == (34, 156)
    assert g["x"].shape == (34, 34) and g["x"].dtype == np.float32
    np.testing.assert_array_equal(g["x"], np.eye(34))
    assert g["y"].shape == (34,) and g["y"].dtype == np.int64
    assert set(np.unique(g["y"])) <= {0, 1, 2, 3}
    pairs = set(zip(g.src.tolist(), g.dst.tolist()))
    assert all((d, s) in pairs for s, d in pairs)  # both directions of every edge
    assert len(pairs) == 156


def test_bundled_lesmis():
    g = Graph.load(DATA / "lesmis.npz")
    assert (g.num_nodes, g.num_edges) == (77, 508)
    assert g["x"].shape == (77, 16) and g["x"].dtype == np.float32
    assert g["edge_weight"].shape == (508,) and g["edge_weight"].dtype == np.float32
    assert set(g.edge_data) == {"edge_weight"}
    weight = dict(zip(zip(g.src.tolist(), g.dst.tolist()), g["edge_weight"].tolist()))
    assert all(weight[(d, s)] == w for (s, d), w in weight.items())


def test_bundled_graphs_match_their_sources():
    nx = pytest.importorskip("networkx")
    karate = Graph.load(DATA / "karate.npz")
    expected = nx.karate_club_graph()
    assert {tuple(sorted(p)) for p in zip(karate.src.tolist(), karate.dst.tolist())} == \
        {tuple(sorted(e)) for e in expected.edges}
    lesmis = Graph.load(DATA / "lesmis.npz")
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(lesmis["x"], rng.standard_normal((77, 16), dtype=np.float32))


# ------------------------------------------------------------------------------------------------
# Converters


def test_import_is_numpy_only():
    code = ("import sys, mpdsl.graph; print(sorted(m for m in "
            "('torch', 'networkx', 'torch_geometric') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"


def test_from_networkx_undirected_gives_both_directions():
    nx = pytest.importorskip("networkx")
    G = nx.Graph()
    G.add_nodes_from(["c", "a", "b"])
    G.add_edges_from([("c", "a"), ("a", "b"), ("b", "b")])
    g = Graph.from_networkx(G)
    assert g.num_nodes == 3
    pairs = sorted(zip(g.src.tolist(), g.dst.tolist()))
    # c=0, a=1, b=2; the self-loop appears once, as in PyG's from_networkx
    assert pairs == [(0, 1), (1, 0), (1, 2), (2, 1), (2, 2)]


def test_from_networkx_matches_pyg_order():
    nx = pytest.importorskip("networkx")
    pytest.importorskip("torch_geometric")
    from torch_geometric.utils import from_networkx

    G = nx.les_miserables_graph()
    np.testing.assert_array_equal(Graph.from_networkx(G).edge_index,
                                  from_networkx(G).edge_index.numpy())


def test_from_networkx_directed_and_isolated():
    nx = pytest.importorskip("networkx")
    G = nx.DiGraph()
    G.add_nodes_from(range(4))
    G.add_edges_from([(2, 0), (0, 1)])
    g = Graph.from_networkx(G)
    assert g.num_nodes == 4
    assert sorted(zip(g.src.tolist(), g.dst.tolist())) == [(0, 1), (2, 0)]


def test_from_networkx_multigraph():
    nx = pytest.importorskip("networkx")
    G = nx.MultiDiGraph([(0, 1), (0, 1), (1, 0)])
    g = Graph.from_networkx(G)
    assert sorted(zip(g.src.tolist(), g.dst.tolist())) == [(0, 1), (0, 1), (1, 0)]
    U = nx.MultiGraph([(0, 1), (0, 1)])
    assert Graph.from_networkx(U).num_edges == 4


def test_from_networkx_attributes():
    nx = pytest.importorskip("networkx")
    G = nx.Graph()
    G.add_node(0, mass=1.0, vel=[0.5, 0.25])
    G.add_node(1, mass=2.0, vel=[1.0, 2.0])
    G.add_edge(0, 1, weight=3)
    g = Graph.from_networkx(G, group_node_attrs=["mass", "vel"], group_edge_attrs=["weight"])
    assert g["x"].dtype == np.float32
    np.testing.assert_array_equal(g["x"], [[1.0, 0.5, 0.25], [2.0, 1.0, 2.0]])
    np.testing.assert_array_equal(g["edge_attr"], [[3.0], [3.0]])
    x = np.ones((2, 5))
    np.testing.assert_array_equal(Graph.from_networkx(G, x=x)["x"], x)
    graph_error(lambda: Graph.from_networkx(G, group_node_attrs=["charge"]), "charge")
    G.nodes[1]["mass"] = "heavy"
    graph_error(lambda: Graph.from_networkx(G, group_node_attrs=["mass"]), "mass", "not numeric")


def test_from_scipy_direction_and_weights():
    sparse = pytest.importorskip("scipy.sparse")
    A = sparse.csr_matrix(np.array([[0, 2.5, 0], [0, 0, 1], [4, 0, 0]]))
    g = Graph.from_scipy(A)
    assert g.num_nodes == 3
    np.testing.assert_array_equal(g.edge_index, [[0, 1, 2], [1, 2, 0]])  # A[i, j]: i -> j
    np.testing.assert_array_equal(g["edge_weight"], [2.5, 1.0, 4.0])
    unweighted = Graph.from_scipy(sparse.coo_array(np.array([[0, 1], [1, 0]])),
                                  x=np.zeros((2, 3)))
    assert "edge_weight" not in unweighted and unweighted["x"].shape == (2, 3)


def test_from_scipy_drops_explicit_zeros_and_sums_duplicates():
    sparse = pytest.importorskip("scipy.sparse")
    A = sparse.coo_array((np.array([1.0, 0.0, 2.0, 3.0]),
                          (np.array([2, 0, 0, 2]), np.array([0, 1, 2, 0]))), shape=(4, 4))
    g = Graph.from_scipy(A)
    assert g.num_nodes == 4
    np.testing.assert_array_equal(g.edge_index, [[0, 2], [2, 0]])
    np.testing.assert_array_equal(g["edge_weight"], [2.0, 4.0])


def test_from_scipy_errors():
    sparse = pytest.importorskip("scipy.sparse")
    graph_error(lambda: Graph.from_scipy(sparse.csr_array(np.ones((2, 3)))), "square")
    graph_error(lambda: Graph.from_scipy(np.ones((2, 2))), "sparse")


def test_pyg_round_trip():
    pytest.importorskip("torch_geometric")
    import torch
    from torch_geometric.data import Data

    data = Data(x=torch.randn(5, 3), edge_index=torch.tensor([[0, 1, 4], [1, 2, 3]]),
                edge_attr=torch.randn(3, 2), y=torch.tensor([0, 1, 0, 1, 1]),
                train_mask=torch.tensor([True, False, True, False, True]), num_nodes=5)
    g = Graph.from_pyg(data)
    assert g.num_nodes == 5 and g.num_edges == 3
    assert set(g.node_data) == {"x", "y", "train_mask"} and set(g.edge_data) == {"edge_attr"}
    np.testing.assert_array_equal(g["x"], data.x.numpy())
    back = g.to_pyg()
    assert back.num_nodes == 5
    for key in ("x", "edge_index", "edge_attr", "y", "train_mask"):
        assert torch.equal(back[key], data[key]), key


def test_from_pyg_karate_and_batch():
    pytest.importorskip("torch_geometric")
    from torch_geometric.data import Batch
    from torch_geometric.datasets import KarateClub

    karate = KarateClub()[0]
    g = Graph.from_pyg(karate)
    bundled = Graph.load(DATA / "karate.npz")
    np.testing.assert_array_equal(g.edge_index, bundled.edge_index)
    np.testing.assert_array_equal(g["y"], bundled["y"])
    batched = Graph.from_pyg(Batch.from_data_list([karate, karate]))
    assert batched.num_graphs == 2 and "ptr" not in batched


def test_from_pyg_refuses_other_objects():
    pytest.importorskip("torch_geometric")
    graph_error(lambda: Graph.from_pyg({"edge_index": None}), "Data")


# ------------------------------------------------------------------------------------------------
# Batching


def small_graph(num_nodes: int, edges: list[tuple[int, int]], seed: int) -> Graph:
    rng = np.random.default_rng(seed)
    edge_index = np.array(edges, dtype=np.int64).reshape(-1, 2).T
    return Graph.from_arrays(
        edge_index, num_nodes,
        x=rng.standard_normal((num_nodes, 3)).astype(np.float32),
        edge_attr=rng.standard_normal((len(edges), 2)),
        graph_label=np.array([seed]),
    )


def test_batch_and_unbatch_round_trip():
    graphs = [small_graph(3, [(0, 1), (1, 2)], 0), small_graph(2, [(1, 0)], 1),
              small_graph(4, [(3, 3), (0, 2), (2, 0)], 2)]
    b = Graph.batch(graphs)
    assert b.num_nodes == 9 and b.num_edges == 6 and b.num_graphs == 3
    np.testing.assert_array_equal(b.batch, [0, 0, 0, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(b.edge_index, [[0, 1, 4, 8, 5, 7], [1, 2, 3, 8, 7, 5]])
    np.testing.assert_array_equal(b["graph_label"], [0, 1, 2])
    for original, piece in zip(graphs, b.unbatch_nodes(b["x"])):
        np.testing.assert_array_equal(piece, original["x"])
    assert b.unbatch_graphs(b["graph_label"]) == [0, 1, 2]
    np.testing.assert_array_equal(b["edge_attr"],
                                  np.concatenate([g["edge_attr"] for g in graphs]))


def test_batch_of_batches_renumbers_graphs():
    a = Graph.batch([small_graph(2, [(0, 1)], 0), small_graph(1, [], 1)])
    b = Graph.batch([a, small_graph(2, [(1, 0)], 2)])
    np.testing.assert_array_equal(b.batch, [0, 0, 1, 2, 2])
    np.testing.assert_array_equal(b["graph_label"], [0, 1, 2])


def test_batch_with_empty_graph_in_the_middle():
    empty = Graph.from_arrays([], 0, x=np.zeros((0, 3), dtype=np.float32),
                              edge_attr=np.zeros((0, 2)), graph_label=np.array([9]))
    b = Graph.batch([small_graph(2, [(0, 1)], 0), empty, small_graph(1, [], 1)])
    assert b.num_graphs == 3
    assert [len(piece) for piece in b.unbatch_nodes(b["x"])] == [2, 0, 1]
    graph_error(lambda: Graph.batch([small_graph(2, [(0, 1)], 0), empty]), "no nodes")


def test_unbatch_nodes_with_unsorted_batch():
    g = Graph([], num_nodes=4, node_data={"batch": np.array([1, 0, 1, 0])})
    pieces = g.unbatch_nodes(np.array([10, 20, 30, 40]))
    assert [p.tolist() for p in pieces] == [[20, 40], [10, 30]]
    graph_error(lambda: g.unbatch_nodes(np.zeros(3)), "unbatch_nodes")
    graph_error(lambda: g.unbatch_graphs(np.zeros(3)), "unbatch_graphs")


def test_batch_errors():
    a = small_graph(2, [(0, 1)], 0)
    graph_error(lambda: Graph.batch([]), "empty")
    missing = Graph.from_arrays([[0], [1]], 2, x=np.zeros((2, 3), dtype=np.float32),
                                graph_label=np.array([1]))
    graph_error(lambda: Graph.batch([a, missing]), "graph 0", "edge_attr", "graph 1")
    wide = a.with_data(x=np.zeros((2, 4), dtype=np.float32))
    graph_error(lambda: Graph.batch([a, a, wide]), "graph 2", "x")
    graph_error(lambda: Graph.batch([a, "not a graph"]), "graph 1")


@pytest.mark.parametrize("count", [1, 7, 1 << 16, (1 << 16) + 1, 1 << 20])
@pytest.mark.parametrize("order", ["random", "sorted", "runs"])
def test_grouping_by_id_is_a_stable_sort(count, order):
    """The CSR grouping (``_segments``) on each of its paths: ids already grouped, ids of 16 bits
    (a radix sort) and larger ids (distinct (id, position) keys)."""
    from mpdsl.graph import _segments
    rng = np.random.default_rng(count)
    ids = rng.integers(0, count, 3000)
    if order == "sorted":
        ids.sort()
    elif order == "runs":
        ids = np.sort(ids.reshape(30, 100), axis=1).ravel()
    indptr, perm = _segments(ids, count)
    np.testing.assert_array_equal(perm, np.argsort(ids, kind="stable"))
    np.testing.assert_array_equal(indptr, np.concatenate([[0], np.cumsum(np.bincount(ids, minlength=count))]))
