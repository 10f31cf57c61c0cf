"""k-hop edge sets: ``edges two = k_hop(edge, k)``, the pairs joined by a path of 1..k edges.

* Structure against PyTorch Geometric's ``TwoHop`` transform (k = 2, its edge order: coalesced) and
  against a NumPy reference of dense matrix powers (k = 1, 3, 4, and a hop count past the graph's
  size), on hypothesis graphs: empty, isolated nodes, self loops, multi-edges, hubs.
* A mixed-hop model on the set (``examples/mixhop.mp``) against plain torch with the same weights
  (float64, rtol 1e-10), its gradients through the torch module (rtol 1e-8); degrees, softmax and
  every reduction on a k-hop set equal the same ops on a graph whose own edges are that set, on both
  backends (Triton in its interpreter).
* The memory budget refuses a hub's k-hop set before any product is formed.
* Diagnostics by line, column and message; IR round trip and verifier.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

import mpdsl  # noqa: E402
from mpdsl.diagnostics import CompileError, GraphError  # noqa: E402
from mpdsl.graph import Graph, derive_k_hop, k_hop_bytes  # noqa: E402
from mpdsl.ir import VerificationError, parse_program, print_program, verify  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from strategies import graphs  # noqa: E402
from test_edge_sets import check_every_op_on_a_set  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
F64 = "float64"


def pyg_two_hop(graph: Graph) -> np.ndarray:
    """PyG's TwoHop of ``graph``'s edges. TwoHop's sparse product reads past its arrays on a repeated
    edge (it may crash the process), so it gets each distinct pair once, in a shuffled order: the
    duplicates would be merged by its coalesce anyway, and it sorts its input by row itself."""
    from torch_geometric.data import Data
    from torch_geometric.transforms import TwoHop

    n = graph.num_nodes
    keys = graph.src * max(n, 1) + graph.dst
    _, first = np.unique(keys, return_index=True)
    order = np.random.default_rng(len(first)).permutation(np.sort(first))
    data = Data(edge_index=torch.from_numpy(np.ascontiguousarray(graph.edge_index[:, order])), num_nodes=n)
    return TwoHop()(data).edge_index.numpy()


def matrix_powers(graph: Graph, hops: int) -> np.ndarray:
    """The k-hop set from dense matrix powers: A's pattern, loops included, or'ed with those of
    A^2..A^k without their diagonal; the pairs in row-major order (source, then destination)."""
    n = graph.num_nodes
    a = np.zeros((n, n), dtype=np.int64)
    np.add.at(a, (graph.src, graph.dst), 1)
    a = (a > 0).astype(np.int64)
    reach = a.astype(bool)
    power = a.copy()
    for _ in range(2, hops + 1):
        power = ((power @ a) > 0).astype(np.int64)
        further = power.astype(bool)
        np.fill_diagonal(further, False)
        reach |= further
    return np.stack(np.nonzero(reach)).astype(np.int64).reshape(2, -1)


# ------------------------------------------------------------------------------------------------
# 1. Structure


@settings(max_examples=60, deadline=None)
@given(graph=graphs(max_nodes=14, max_edges=40))
def test_two_hop_is_pyg_s(graph):
    """k_hop(edge, 2) is TwoHop: the same pairs in the same (coalesced) order, the base's loops kept
    and none from the square."""
    got = graph.derived("k_hop", 2).edge_index
    want = pyg_two_hop(graph)
    np.testing.assert_array_equal(got, want.reshape(2, -1))
    assert graph.derived("k_hop", 2) is graph.derived("k_hop", 2)  # built once per graph


@settings(max_examples=60, deadline=None)
@given(graph=graphs(max_nodes=12, max_edges=36), hops=st.sampled_from([1, 3, 4]))
def test_k_hop_is_the_union_of_matrix_powers(graph, hops):
    np.testing.assert_array_equal(derive_k_hop(graph, hops), matrix_powers(graph, hops))
    if hops == 4:  # two hops of the two-hop set: a pair joined by a walk of <= 4 edges is by a path
        np.testing.assert_array_equal(graph.derived("k_hop", 2).derived("k_hop", 2).edge_index,
                                      matrix_powers(graph, 4))


def test_k_hop_on_edge_cases():
    """Empty graphs, a loop only, a chain (a longer path adds pairs until it runs out), a hop count far
    past the graph's size (the products stop once no pair is added), a 2-cycle (its nodes join
    themselves in two hops, which the set drops)."""
    assert derive_k_hop(Graph(np.zeros((2, 0), np.int64), 0), 3).shape == (2, 0)
    assert derive_k_hop(Graph(np.zeros((2, 0), np.int64), 4), 3).shape == (2, 0)
    np.testing.assert_array_equal(derive_k_hop(Graph(np.array([[1, 1], [1, 1]]), 3), 5), [[1], [1]])
    chain = Graph(np.array([[0, 1, 2, 3], [1, 2, 3, 4]]), 5)
    assert [derive_k_hop(chain, k).shape[1] for k in (1, 2, 3, 4, 5)] == [4, 7, 9, 10, 10]
    start = time.perf_counter()
    np.testing.assert_array_equal(derive_k_hop(chain, 2**62), derive_k_hop(chain, 4))
    assert time.perf_counter() - start < 5
    np.testing.assert_array_equal(derive_k_hop(Graph(np.array([[0, 1], [1, 0]]), 2), 2), [[0, 1], [1, 0]])
    with pytest.raises(GraphError, match="hop count >= 1"):
        derive_k_hop(chain, 0)


def test_degrees_of_a_k_hop_set():
    graph = Graph.from_arrays(np.array([[0, 0, 1, 2, 3, 3], [1, 2, 3, 3, 4, 4]]), 6, x=np.ones((6, 1)))
    model = mpdsl.compile("""
        edges two = k_hop(edge, 2)
        edges three = k_hop(two, 2)
        model m(x: node[F]) -> (a: node[], b: node[], c: node[]) {
            return in_degree(two), out_degree(two), in_degree(three)
        }""", dtype=F64)
    out = model(graph)
    two = matrix_powers(graph, 2)
    np.testing.assert_array_equal(out["a"], np.bincount(two[1], minlength=6))
    np.testing.assert_array_equal(out["b"], np.bincount(two[0], minlength=6))
    four = matrix_powers(graph, 4)  # two hops of the two-hop set: paths of 1..4 edges
    np.testing.assert_array_equal(out["c"], np.bincount(four[1], minlength=6))


# ------------------------------------------------------------------------------------------------
# 2. Models on a k-hop set


def hub_graph(seed: int = 4, nodes: int = 18, features: int = 3) -> Graph:
    """A hub (node 0) with edges both ways, random edges, a repeated edge, self loops (one repeated),
    and two isolated nodes (the last ones)."""
    rng = np.random.default_rng(seed)
    connected = nodes - 2
    src = np.concatenate([rng.integers(0, connected, 30), np.arange(1, 6), np.zeros(5, np.int64), [7, 7, 3, 3, 3]])
    dst = np.concatenate([rng.integers(0, connected, 30), np.zeros(5, np.int64), np.arange(6, 11), [8, 8, 3, 3, 9]])
    return Graph.from_arrays(np.stack([src, dst]).astype(np.int64), nodes,
                             x=rng.standard_normal((nodes, features)))


def mean_by(values: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    total = torch.zeros(n, values.shape[1], dtype=values.dtype).index_add(0, dst, values)
    count = torch.zeros(n, dtype=values.dtype).index_add(0, dst, torch.ones_like(dst, dtype=values.dtype))
    return total / count.clamp(min=1).unsqueeze(1)


def mixhop_reference(graph: Graph, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """examples/mixhop.mp in plain torch, its second hop set from PyG's TwoHop."""
    n = graph.num_nodes
    src, dst = torch.from_numpy(np.array(graph.src)), torch.from_numpy(np.array(graph.dst))
    two = torch.from_numpy(pyg_two_hop(graph))

    def conv(h, W0, W1, W2, b):
        return h @ W0 + mean_by((h @ W1)[src], dst, n) + mean_by((h @ W2)[two[0]], two[1], n) + b

    h = torch.relu(conv(torch.from_numpy(np.array(graph["x"])), w["W0"], w["W1"], w["W2"], w["b1"]))
    return conv(h, w["V0"], w["V1"], w["V2"], w["b2"])


def random_weights(model, graph: Graph, seed: int = 7) -> dict[str, np.ndarray]:
    model.init(seed, graph=graph)
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(np.shape(value)) * 0.5 for name, value in model.params.items()}


def test_mixhop_matches_plain_torch():
    graph = hub_graph()
    model = mpdsl.compile(EXAMPLES / "mixhop.mp", dtype=F64)
    weights = random_weights(model, graph)
    model.load_weights(weights)
    want = mixhop_reference(graph, {k: torch.from_numpy(v) for k, v in weights.items()}).numpy()
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(model(graph), want, rtol=1e-10, atol=1e-12)
    unoptimized = mpdsl.compile(EXAMPLES / "mixhop.mp", dtype=F64, optimize=False).load_weights(weights)
    np.testing.assert_allclose(unoptimized(graph), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_mixhop_gradients_through_torch_match_autograd(backend):
    graph = hub_graph(5, nodes=12)
    model = mpdsl.compile(EXAMPLES / "mixhop.mp", dtype=F64)
    weights = random_weights(model, graph, seed=3)
    reference = {k: torch.tensor(v, requires_grad=True) for k, v in weights.items()}
    projection = torch.from_numpy(np.random.default_rng(1).standard_normal((graph.num_nodes, 4)))
    (mixhop_reference(graph, reference) * projection).sum().backward()
    model.load_weights(weights)
    if backend == "triton":
        from mpdsl.backends.triton_backend import TritonBackend
        model = mpdsl.runtime.CompiledModel(model.ir, TritonBackend(interpret=True)).load_weights(model.params)
    module = model.to_torch(graph).eval()
    (module(graph) * projection).sum().backward()
    for name, tensor in reference.items():
        want = tensor.grad.numpy()
        got = getattr(module, name).grad.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * max(1.0, np.abs(want).max()),
                                   err_msg=f"{backend}: d {name}")


def test_graph_ops_on_a_k_hop_set_equal_the_ops_on_a_graph_of_that_set():
    graph = hub_graph(2, nodes=12)
    three = graph.derived("k_hop", 3)
    np.testing.assert_array_equal(three.edge_index, matrix_powers(graph, 3))
    check_every_op_on_a_set(graph, "edges three = k_hop(edge, 3)", "three", three, "in_degree")


# ------------------------------------------------------------------------------------------------
# 3. The memory budget


def star(leaves: int) -> Graph:
    """A hub with edges to and from every leaf: its two-hop set joins every pair of nodes."""
    leaf = np.arange(1, leaves + 1, dtype=np.int64)
    hub = np.zeros(leaves, np.int64)
    return Graph(np.stack([np.concatenate([leaf, hub]), np.concatenate([hub, leaf])]), leaves + 1)


def test_a_hub_s_k_hop_set_is_refused_before_it_is_built():
    """200k leaves: the two-hop set would hold 4e10 pairs; the bound from the degrees refuses it at
    once, before any product (which would not fit in this machine's memory), and nothing is cached."""
    graph = star(200_000)
    pairs, needed = k_hop_bytes(graph, 2)
    assert pairs == 200_001 ** 2 and needed > 48 * pairs  # every pair; the set has all but the loops
    start = time.perf_counter()
    with pytest.raises(GraphError, match=r"the 2-hop edge set of this graph \(200001 nodes, 400000 edges\) may "
                                         r"have up to 40000400001 pairs and needs about .* over the memory budget"):
        graph.derived("k_hop", 2, memory_limit="1G")
    assert time.perf_counter() - start < 10
    with pytest.raises(GraphError, match="fewer hubs"):
        graph.derived("k_hop", 2, memory_limit="1G")  # still refused: a failed build is not cached
    small = star(40)
    assert small.derived("k_hop", 2, memory_limit="1M").num_edges == 41 * 41 - 41  # every pair but the loops


def test_a_model_s_memory_limit_refuses_the_set_by_name():
    model = mpdsl.compile(EXAMPLES / "mixhop.mp", dtype=F64, memory_limit="64M")
    graph = star(3000).with_data(x=np.ones((3001, 2)))
    with pytest.raises(GraphError, match="2-hop edge set"):
        model(graph)
    with pytest.raises(GraphError, match="2-hop edge set"):
        model.init(0, graph=graph).to_torch(graph)(graph)


def test_the_run_memory_counts_a_k_hop_set_s_index():
    from mpdsl.runtime import edge_set_bytes

    graph = hub_graph()
    model = mpdsl.compile(EXAMPLES / "mixhop.mp")
    pairs = graph.derived("k_hop", 2).num_edges
    assert edge_set_bytes(model.ir, graph) == 16 * (graph.num_nodes + 1 + pairs) + 16 * pairs


def test_the_plan_runs_without_a_graph(capsys):
    from mpdsl.cli import main
    assert main(["compile", str(EXAMPLES / "mixhop.mp"), "--emit", "plan", "--dim", "F=3"]) == 0
    assert "edges of two" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# 4. Diagnostics, IR


def diagnose(source: str) -> CompileError:
    with pytest.raises(CompileError) as err:
        mpdsl.compile(source)
    return err.value


BODY = "\nmodel m(x: node[F]) -> node[F] {\n  return sum(x[two.src]) by dst\n}"


@pytest.mark.parametrize("source, line, col, message", [
    ("edges two = k_hop(edge)" + BODY, 1, 13, "k_hop needs a hop count"),
    ("edges two = k_hop(edge, 0)" + BODY, 1, 25, "the hop count of k_hop must be at least 1, got 0"),
    ("edges two = k_hop(edge, -2)" + BODY, 1, 25, "the hop count of k_hop must be at least 1, got -2"),
    ("edges two = k_hop(edge, 2.5)" + BODY, 1, 25,
     "the hop count of k_hop must be an integer literal, and '2.5' is not an integer"),
    ("dim K = 2\nedges two = k_hop(edge, K)" + BODY, 2, 25,
     "the hop count of k_hop must be an integer literal, and 'K' is a name"),
    ("edges two = k_hop(edge, 99999999999999999999999)" + BODY, 1, 25,
     "the hop count 99999999999999999999999 is too large"),
    ("edges two = self_loops(edge, 2)" + BODY, 1, 30, "self_loops takes no hop count"),
    ("edges two = two_hop(edge)" + BODY, 1, 13, "unknown edge set derivation 'two_hop'"),
    ("edges two = k_hop(node, 2)" + BODY, 1, 19, "k_hop derives an edge set from an edge set, not from 'node'"),
    ("edges two = k_hop(edge, 2)\nmodel m(w: edge[]) -> edge<two>[] {\n  return carry(w, two, 0.0)\n}", 3, 19,
     "nothing carries onto two = k_hop(edge, 2): its edges are pairs joined by paths, not edges of its base"),
])
def test_misuse_is_a_located_error(source, line, col, message):
    err = diagnose(source)
    assert err.span is not None and (err.span.line, err.span.col) == (line, col), (err.span, err.message)
    assert err.message == message
    assert err.hint


def test_hints_name_the_forms():
    assert diagnose("edges two = two_hop(edge)" + BODY).hint == "the two-hop set is k_hop(edge, 2)"
    assert "k_hop(edge, k)" in diagnose("edges two = kk(edge)" + BODY).hint
    assert "h[two.src]" in diagnose("edges two = k_hop(edge, 2)\nmodel m(w: edge[]) -> edge<two>[] {\n"
                                    "  return carry(w, two, 0.0)\n}").hint


def test_ir_round_trip_keeps_the_hop_count():
    program = mpdsl.compile("edges two = k_hop(edge, 2)\nedges six = k_hop(two, 3)\n"
                            "model m(x: node[F]) -> node[F] {\n"
                            "  return sum(x[six.src]) by dst + sum(x[two.src]) by dst\n}").ir
    text = print_program(program)
    assert "edges(two=k_hop(edge, 2), six=k_hop(two, 3))" in text
    again = verify(parse_program(text))
    assert again.edge_sets == program.edge_sets and [s.hops for s in again.edge_sets] == [2, 3]
    assert print_program(again) == text
    for edit, message in ((lambda t: t.replace("k_hop(edge, 2)", "k_hop(edge, 0)"), "hop count 0"),
                          (lambda t: t.replace("k_hop(edge, 2)", "k_hop(edge)"), "hop count 0"),
                          (lambda t: t.replace("k_hop(edge, 2)", "self_loops(edge, 2)"), "hop count 2")):
        with pytest.raises(VerificationError, match=message):
            verify(parse_program(edit(text)))


def test_the_verifier_refuses_a_carry_onto_a_k_hop_set():
    text = print_program(mpdsl.compile("edges looped = self_loops(edge)\nmodel m(w: edge[]) -> edge<looped>[] {\n"
                                       "  return carry(w, looped, 0.0)\n}").ir)
    with pytest.raises(VerificationError, match="nothing carries onto looped"):
        verify(parse_program(text.replace("looped=self_loops(edge)", "looped=k_hop(edge, 2)")))


def test_a_batch_derives_the_k_hop_sets_of_its_graphs():
    """A batch of two graphs: its k-hop set is the union of the graphs' own (no pair across them)."""
    a, b = hub_graph(1, nodes=13), hub_graph(2, nodes=12)
    batch = Graph.batch([a, b])
    got = batch.derived("k_hop", 3).edge_index
    want = np.concatenate([matrix_powers(a, 3), matrix_powers(b, 3) + a.num_nodes], axis=1)
    np.testing.assert_array_equal(got, want)
