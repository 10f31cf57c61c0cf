"""mpdsl against PyTorch Geometric: the same layers, the same weights, the same outputs.

Every comparison builds a PyG layer (or a two-layer PyG stack), fills all of its parameters
(biases and GIN's eps included) with seeded non-zero values, copies them into an mpdsl model
and compares the two forward passes on the same graph:

* single-layer programs written inline below, one per layer kind, against ``GCNConv``,
  ``SAGEConv`` (mean; max with ``project=True``), ``GINConv`` (two-layer MLP, learnable eps)
  and ``GATConv`` (heads concatenated and averaged);
* the bundled example models (``examples/*.mp``) against the equivalent two-layer PyG stacks.

Graphs: the bundled karate club and Les Miserables graphs, and a seeded random multigraph with
isolated nodes, a node with out-edges only, repeated edges and a hub of high in-degree. GCN
inputs carry no self loops (``GCNConv`` adds the missing ones itself, the .mp layer adds one
per node unconditionally); GAT inputs get exactly one self loop per node, given to both sides,
with ``GATConv(add_self_loops=False)``.

Weight layout: a PyG ``Linear`` stores ``weight`` as [out, in] and computes ``x @ weight.T``,
so an mpdsl ``param[in, out]`` is ``weight.T``; GAT's per-head ``param[in, H, C]`` is
``weight.T.reshape(in, H, C)`` (PyG views ``lin(x)`` as [N, H, C]) and ``att_src`` [1, H, C]
is ``param[H, C]``.

Every comparison is also shown able to fail: perturbing any one copied parameter must break
the agreement.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyg_nn = pytest.importorskip("torch_geometric.nn")
pyg_data = pytest.importorskip("torch_geometric.data")

import mpdsl  # noqa: E402
from mpdsl.graph import Graph  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from comparison import DTYPES, a, assert_close, build, compare, is_close, lin_t  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
DATA = EXAMPLES / "data"


# ------------------------------------------------------------------------------------------------
# Graphs


@dataclass(frozen=True)
class GraphCase:
    """A test graph: int64 edge_index [2, E] (no self loops), node count and float64 features."""

    name: str
    edge_index: np.ndarray
    num_nodes: int
    x: np.ndarray

    def with_self_loops(self) -> "GraphCase":
        """The same graph plus exactly one self loop per node (the graph GAT runs on)."""
        loops = np.arange(self.num_nodes, dtype=np.int64)
        edge_index = np.concatenate([self.edge_index, np.stack([loops, loops])], axis=1)
        return GraphCase(self.name + "+loops", edge_index, self.num_nodes, self.x)

    def mpdsl_graph(self, dtype: str) -> Graph:
        return Graph.from_arrays(self.edge_index, self.num_nodes, x=self.x.astype(dtype))

    def pyg_data(self, dtype: str):
        return pyg_data.Data(x=torch.from_numpy(self.x.astype(dtype)),
                             edge_index=torch.from_numpy(self.edge_index),
                             num_nodes=self.num_nodes)

    def torch_inputs(self, dtype: str):
        return torch.from_numpy(self.x.astype(dtype)), torch.from_numpy(self.edge_index)


def _bundled(name: str) -> GraphCase:
    g = Graph.load(DATA / f"{name}.npz")
    edge_index = np.array(g.edge_index)
    assert not (edge_index[0] == edge_index[1]).any(), f"{name}.npz unexpectedly has self loops"
    return GraphCase(name, edge_index, g.num_nodes, np.asarray(g["x"], dtype=np.float64))


def _random_multigraph(seed: int = 7, num_nodes: int = 40, features: int = 6) -> GraphCase:
    """A seeded random multigraph with the awkward cases the aggregations must get right.

    Nodes ``N-3 .. N-1`` are isolated, node ``N-4`` has out-edges only (in-degree 0), node 0 is
    a hub receiving an edge from every other connected node, some edges are repeated (up to
    three copies) and there are no self loops. Edge order is shuffled."""
    rng = np.random.default_rng(seed)
    connected = num_nodes - 3
    src = rng.integers(0, connected, 120)
    dst = rng.integers(0, connected, 120)
    hub_src = np.arange(1, connected)
    src = np.concatenate([src, hub_src, hub_src[:5]])           # five hub edges twice
    dst = np.concatenate([dst, np.zeros_like(hub_src), np.zeros(5, dtype=np.int64)])
    repeat = rng.integers(0, 120, 15)                             # some random edges repeated
    src = np.concatenate([src, src[repeat], src[repeat[:5]]])
    dst = np.concatenate([dst, dst[repeat], dst[repeat[:5]]])
    keep = (src != dst) & (dst != connected - 1)
    src, dst = src[keep], dst[keep]
    order = rng.permutation(len(src))
    edge_index = np.stack([src[order], dst[order]]).astype(np.int64)

    in_degree = np.bincount(edge_index[1], minlength=num_nodes)
    out_degree = np.bincount(edge_index[0], minlength=num_nodes)
    pairs, counts = np.unique(edge_index, axis=1, return_counts=True)
    assert (in_degree[-3:] == 0).all() and (out_degree[-3:] == 0).all()
    assert in_degree[connected - 1] == 0 and out_degree[connected - 1] > 0
    assert in_degree[0] >= connected - 1 and in_degree[0] > 4 * np.median(in_degree)
    assert counts.max() >= 3 and pairs.shape[1] < edge_index.shape[1]
    assert not (edge_index[0] == edge_index[1]).any()
    x = rng.standard_normal((num_nodes, features))
    return GraphCase("random", edge_index, num_nodes, x)


@lru_cache(maxsize=None)
def graph_case(name: str) -> GraphCase:
    return _random_multigraph() if name == "random" else _bundled(name)


GRAPHS = ("karate", "lesmis", "random")


# ------------------------------------------------------------------------------------------------
# Helpers


def gat_weights(conv, suffix: str = "") -> dict[str, np.ndarray]:
    """GATConv parameters under mpdsl names: W [in, H, C], a_src / a_dst [H, C], b."""
    heads, out = conv.heads, conv.out_channels
    return {
        f"W{suffix}": lin_t(conv.lin).reshape(-1, heads, out),
        f"a_src{suffix}": a(conv.att_src).reshape(heads, out),
        f"a_dst{suffix}": a(conv.att_dst).reshape(heads, out),
        f"b{suffix}": a(conv.bias),
    }


def pyg_forward(module, case: GraphCase, dtype: str) -> np.ndarray:
    x, edge_index = case.torch_inputs(dtype)
    with torch.no_grad():
        return module(x, edge_index).numpy()


# ------------------------------------------------------------------------------------------------
# 1. Single layers, written inline


GCN_SOURCE = """
dim K = 5
model gcn_layer(x: node[F], W: param[F, K], b: param[K]) -> node[K] {
    norm = rsqrt(in_degree() + 1)          # self loop counted in the degree
    z = x @ W
    return sum(z[src] * norm[src] * norm[dst]) by dst + z * norm * norm + b
}
"""

SAGE_MEAN_SOURCE = """
dim K = 5
model sage_mean_layer(x: node[F], W_s: param[F, K], W_n: param[F, K], b: param[K]) -> node[K] {
    return x @ W_s + (mean(x[src]) by dst) @ W_n + b
}
"""

# PyG 2.8 SAGEConv(project=True): x_j <- relu(lin(x_j)) with lin: Linear(F, F, bias=True) on the
# neighbour (source) side only; out = lin_l(aggr) + lin_r(x_i), lin_l with bias, lin_r without.
SAGE_MAX_SOURCE = """
dim K = 5
model sage_max_layer(x: node[F], W_p: param[F, F], b_p: param[F],
                     W_s: param[F, K], W_n: param[F, K], b: param[K]) -> node[K] {
    p = relu(x @ W_p + b_p)
    return x @ W_s + (max(p[src]) by dst) @ W_n + b
}
"""

GIN_SOURCE = """
dim HID = 9
dim K = 5
model gin_layer(x: node[F], eps: param[], W1: param[F, HID], b1: param[HID],
                W2: param[HID, K], b2: param[K]) -> node[K] {
    h = (1 + eps) * x + sum(x[src]) by dst
    return relu(h @ W1 + b1) @ W2 + b2
}
"""

GAT_CONCAT_SOURCE = """
dim HEADS = 3
dim K = 4
model gat_concat_layer(x: node[F], W: param[F, HEADS, K], a_src: param[HEADS, K],
                       a_dst: param[HEADS, K], b: param[HEADS * K]) -> node[HEADS * K] {
    z = x @ W
    score = leaky_relu(sum(z[src] * a_src, -1) + sum(z[dst] * a_dst, -1), 0.2)
    alpha = softmax(score) by dst
    return reshape(sum(alpha * z[src]) by dst, [HEADS * K]) + b
}
"""

GAT_MEAN_SOURCE = """
dim HEADS = 3
dim K = 4
model gat_mean_layer(x: node[F], W: param[F, HEADS, K], a_src: param[HEADS, K],
                     a_dst: param[HEADS, K], b: param[K]) -> node[K] {
    z = x @ W
    score = leaky_relu(sum(z[src] * a_src, -1) + sum(z[dst] * a_dst, -1), 0.2)
    alpha = softmax(score) by dst
    return mean(sum(alpha * z[src]) by dst, 0) + b
}
"""

K = 5
GIN_HIDDEN = 9
GAT_HEADS = 3
GAT_OUT = 4
GIN_EPS = 0.37


def _gin_factory(f: int):
    mlp = torch.nn.Sequential(torch.nn.Linear(f, GIN_HIDDEN), torch.nn.ReLU(),
                              torch.nn.Linear(GIN_HIDDEN, K))
    return pyg_nn.GINConv(mlp, train_eps=True)


def _gin_weights(conv) -> dict[str, np.ndarray]:
    return {"eps": a(conv.eps).reshape(()),
            "W1": lin_t(conv.nn[0]), "b1": a(conv.nn[0].bias),
            "W2": lin_t(conv.nn[2]), "b2": a(conv.nn[2].bias)}


@dataclass(frozen=True)
class LayerKind:
    source: str
    factory: Callable[[int], object]               # F -> PyG layer
    weights: Callable[[object], dict]              # PyG layer -> mpdsl weights
    self_loops: bool = False                       # give both sides one self loop per node


LAYERS = {
    "gcn": LayerKind(
        GCN_SOURCE,
        lambda f: pyg_nn.GCNConv(f, K),
        lambda conv: {"W": lin_t(conv.lin), "b": a(conv.bias)}),
    "sage_mean": LayerKind(
        SAGE_MEAN_SOURCE,
        lambda f: pyg_nn.SAGEConv(f, K, aggr="mean"),
        lambda conv: {"W_s": lin_t(conv.lin_r), "W_n": lin_t(conv.lin_l), "b": a(conv.lin_l.bias)}),
    "sage_max_project": LayerKind(
        SAGE_MAX_SOURCE,
        lambda f: pyg_nn.SAGEConv(f, K, aggr="max", project=True),
        lambda conv: {"W_p": lin_t(conv.lin), "b_p": a(conv.lin.bias), "W_s": lin_t(conv.lin_r),
                      "W_n": lin_t(conv.lin_l), "b": a(conv.lin_l.bias)}),
    "gin": LayerKind(GIN_SOURCE, _gin_factory, _gin_weights),
    "gat_concat": LayerKind(
        GAT_CONCAT_SOURCE,
        lambda f: pyg_nn.GATConv(f, GAT_OUT, heads=GAT_HEADS, concat=True, dropout=0.0,
                                 add_self_loops=False),
        gat_weights, self_loops=True),
    "gat_mean": LayerKind(
        GAT_MEAN_SOURCE,
        lambda f: pyg_nn.GATConv(f, GAT_OUT, heads=GAT_HEADS, concat=False, dropout=0.0,
                                 add_self_loops=False),
        gat_weights, self_loops=True),
}


def compiled_layer(kind: str, dtype: str):
    return mpdsl.compile(LAYERS[kind].source, dtype=dtype)


def test_pyg_layer_structure():
    """The PyG 2.8 parameter layouts the weight copying relies on."""
    f = 6
    sage = pyg_nn.SAGEConv(f, K, aggr="max", project=True)
    assert sage.lin.weight.shape == (f, f) and sage.lin.bias is not None  # projects x_j, F -> F
    assert sage.lin_l.bias is not None and sage.lin_r.bias is None
    assert {n for n, _ in sage.named_parameters()} == {
        "lin.weight", "lin.bias", "lin_l.weight", "lin_l.bias", "lin_r.weight"}
    gcn = pyg_nn.GCNConv(f, K)
    assert {n for n, _ in gcn.named_parameters()} == {"lin.weight", "bias"}
    gat = pyg_nn.GATConv(f, GAT_OUT, heads=GAT_HEADS, add_self_loops=False)
    assert {n for n, _ in gat.named_parameters()} == {"lin.weight", "att_src", "att_dst", "bias"}
    assert gat.att_src.shape == (1, GAT_HEADS, GAT_OUT)
    gin = _gin_factory(f)
    assert {n for n, _ in gin.named_parameters()} == {
        "eps", "nn.0.weight", "nn.0.bias", "nn.2.weight", "nn.2.bias"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("graph_name", GRAPHS)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_single_layer_matches_pyg(kind, graph_name, dtype):
    spec = LAYERS[kind]
    case = graph_case(graph_name)
    if spec.self_loops:
        case = case.with_self_loops()
    f = case.x.shape[1]
    conv = build(lambda: spec.factory(f), dtype, seed=11)
    if kind == "gin":
        with torch.no_grad():
            conv.eps.fill_(GIN_EPS)
    want = pyg_forward(conv, case, dtype)
    assert want.dtype == np.dtype(dtype)

    model = compiled_layer(kind, dtype)
    weights = spec.weights(conv)
    assert set(weights) == set(model.param_types), "the weight map must cover every parameter"
    what = f"{kind} on {case.name} ({dtype})"
    compare(model, weights, case.mpdsl_graph(dtype), want, dtype, what)


# ------------------------------------------------------------------------------------------------
# 2. The example models against two-layer PyG stacks


class GCNStack(torch.nn.Module):
    """examples/gcn.mp: relu(gcn(x)), dropout(0.5), gcn."""

    def __init__(self, f, dims):
        super().__init__()
        self.conv1 = pyg_nn.GCNConv(f, dims["H"])
        self.conv2 = pyg_nn.GCNConv(dims["H"], dims["C"])

    def forward(self, x, edge_index):
        h = torch.relu(self.conv1(x, edge_index))
        h = torch.nn.functional.dropout(h, 0.5, training=self.training)
        return self.conv2(h, edge_index)

    def mpdsl_weights(self):
        return {"W1": lin_t(self.conv1.lin), "b1": a(self.conv1.bias),
                "W2": lin_t(self.conv2.lin), "b2": a(self.conv2.bias)}


class SageMeanStack(torch.nn.Module):
    """examples/sage_mean.mp: relu(sage_mean(x)), sage_mean."""

    def __init__(self, f, dims):
        super().__init__()
        self.conv1 = pyg_nn.SAGEConv(f, dims["H"], aggr="mean")
        self.conv2 = pyg_nn.SAGEConv(dims["H"], dims["C"], aggr="mean")

    def forward(self, x, edge_index):
        return self.conv2(torch.relu(self.conv1(x, edge_index)), edge_index)

    def mpdsl_weights(self):
        out = {}
        for i, conv in ((1, self.conv1), (2, self.conv2)):
            out.update({f"W_s{i}": lin_t(conv.lin_r), f"W_n{i}": lin_t(conv.lin_l),
                        f"b{i}": a(conv.lin_l.bias)})
        return out


class SageMaxStack(torch.nn.Module):
    """examples/sage_max.mp: relu(sage_pool(x)), sage_pool; SAGEConv(aggr="max", project=True)."""

    def __init__(self, f, dims):
        super().__init__()
        self.conv1 = pyg_nn.SAGEConv(f, dims["H"], aggr="max", project=True)
        self.conv2 = pyg_nn.SAGEConv(dims["H"], dims["C"], aggr="max", project=True)

    def forward(self, x, edge_index):
        return self.conv2(torch.relu(self.conv1(x, edge_index)), edge_index)

    def mpdsl_weights(self):
        out = {}
        for i, conv in ((1, self.conv1), (2, self.conv2)):
            out.update({f"W_pool{i}": lin_t(conv.lin), f"b_pool{i}": a(conv.lin.bias),
                        f"W_s{i}": lin_t(conv.lin_r), f"W_n{i}": lin_t(conv.lin_l),
                        f"b{i}": a(conv.lin_l.bias)})
        return out


class GINStack(torch.nn.Module):
    """examples/gin.mp: relu(gin(x)), gin; each gin's MLP is Linear, ReLU, Linear."""

    def __init__(self, f, dims):
        super().__init__()
        h, c = dims["H"], dims["C"]
        mlp1 = torch.nn.Sequential(torch.nn.Linear(f, h), torch.nn.ReLU(), torch.nn.Linear(h, h))
        mlp2 = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, c))
        self.conv1 = pyg_nn.GINConv(mlp1, train_eps=True)
        self.conv2 = pyg_nn.GINConv(mlp2, train_eps=True)

    def forward(self, x, edge_index):
        return self.conv2(torch.relu(self.conv1(x, edge_index)), edge_index)

    def mpdsl_weights(self):
        out = {}
        for i, conv in ((1, self.conv1), (2, self.conv2)):
            out.update({f"eps{i}": a(conv.eps).reshape(()),
                        f"W{i}1": lin_t(conv.nn[0]), f"b{i}1": a(conv.nn[0].bias),
                        f"W{i}2": lin_t(conv.nn[2]), f"b{i}2": a(conv.nn[2].bias)})
        return out


class GATStack(torch.nn.Module):
    """examples/gat.mp: elu(gat(x), heads concatenated), gat with heads averaged."""

    def __init__(self, f, dims):
        super().__init__()
        heads, hid, c = dims["HEADS"], dims["HID"], dims["C"]
        self.conv1 = pyg_nn.GATConv(f, hid, heads=heads, concat=True, dropout=0.0,
                                    add_self_loops=False)
        self.conv2 = pyg_nn.GATConv(heads * hid, c, heads=heads, concat=False, dropout=0.0,
                                    add_self_loops=False)

    def forward(self, x, edge_index):
        return self.conv2(torch.nn.functional.elu(self.conv1(x, edge_index)), edge_index)

    def mpdsl_weights(self):
        return {**gat_weights(self.conv1, "1"), **gat_weights(self.conv2, "2")}


EXAMPLE_STACKS = {
    "gcn": (GCNStack, False),
    "sage_mean": (SageMeanStack, False),
    "sage_max": (SageMaxStack, False),
    "gin": (GINStack, False),
    "gat": (GATStack, True),
}


def compiled_example(name: str, dtype: str):
    return mpdsl.compile(EXAMPLES / f"{name}.mp", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("graph_name", GRAPHS)
@pytest.mark.parametrize("example", list(EXAMPLE_STACKS))
def test_example_model_matches_pyg_stack(example, graph_name, dtype):
    stack_cls, self_loops = EXAMPLE_STACKS[example]
    case = graph_case(graph_name)
    if self_loops:
        case = case.with_self_loops()
    model = compiled_example(example, dtype)
    stack = build(lambda: stack_cls(case.x.shape[1], model.dims), dtype, seed=23)
    want = pyg_forward(stack, case, dtype)

    weights = stack.mpdsl_weights()
    assert set(weights) == set(model.param_types), "the weight map must cover every parameter"
    if example == "gin":
        assert all(weights[e] != 0 for e in ("eps1", "eps2")), "eps must be exercised"
    what = f"examples/{example}.mp on {case.name} ({dtype})"
    # Run on the PyG Data itself (converted by Graph.from_pyg) as well as on an mpdsl Graph.
    model.load_weights(weights)
    assert_close(model(case.pyg_data(dtype)), want, dtype, what + " via Data")
    # Perturbations are checked once per example (on the random graph) to keep the file fast.
    compare(model, weights, case.mpdsl_graph(dtype), want, dtype, what,
            perturb=graph_name == "random")


def test_example_dropout_is_identity_at_inference():
    """The dropout in examples/gcn.mp must be the identity in eval mode (the default), as in the
    PyG stack; in training mode it must actually drop, else the check above proves nothing."""
    case = graph_case("karate")
    model = compiled_example("gcn", "float64")
    stack = build(lambda: GCNStack(case.x.shape[1], model.dims), "float64", seed=5)
    model.load_weights(stack.mpdsl_weights())
    graph = case.mpdsl_graph("float64")
    assert not model.training
    first = model(graph)
    np.testing.assert_array_equal(first, model(graph))
    assert_close(first, pyg_forward(stack, case, "float64"), "float64", "gcn eval")
    try:
        model.train()
        assert not is_close(model(graph), first, "float64"), "dropout in training mode did nothing"
    finally:
        model.eval()


# ------------------------------------------------------------------------------------------------
# 3. Edge cases


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["gcn", "sage_mean", "sage_max_project", "gin"])
def test_single_layer_on_graph_without_edges(kind, dtype):
    """Every node isolated: PyG aggregates each empty neighbourhood to 0 (GCN keeps its self
    loop); the README promises the same ("an empty group gives 0 (as PyG)")."""
    spec = LAYERS[kind]
    rng = np.random.default_rng(3)
    case = GraphCase("edgeless", np.zeros((2, 0), dtype=np.int64), 5, rng.standard_normal((5, 3)))
    conv = build(lambda: spec.factory(3), dtype, seed=13)
    want = pyg_forward(conv, case, dtype)
    model = compiled_layer(kind, dtype).load_weights(spec.weights(conv))
    try:
        got = model(case.mpdsl_graph(dtype))
    except ValueError as err:
        pytest.fail(f"{kind}: mpdsl raised on a graph with no edges ({err}); "
                    f"PyG returns an array of shape {want.shape}")
    assert_close(got, want, dtype, f"{kind} on a graph without edges ({dtype})")


def test_gcn_layer_adds_one_self_loop_even_when_present():
    """The .mp GCN layer (as examples/gcn.mp) always adds one self loop per node (deg + 1 and the
    z * norm * norm term), i.e. PyG's add_self_loops, not GCNConv's add_remaining_self_loops.
    On a graph that already has self loops it therefore equals GCNConv(add_self_loops=False) on
    the graph plus one more loop per node, and differs from a plain GCNConv on the graph."""
    dtype = "float64"
    base = graph_case("random")
    loops = np.array([[1, 2, 3, 3], [1, 2, 3, 3]], dtype=np.int64)  # node 3 has a double loop
    case = GraphCase("random+some-loops", np.concatenate([base.edge_index, loops], axis=1),
                     base.num_nodes, base.x)
    conv = build(lambda: pyg_nn.GCNConv(case.x.shape[1], K), dtype, seed=17)
    model = compiled_layer("gcn", dtype).load_weights(LAYERS["gcn"].weights(conv))
    got = model(case.mpdsl_graph(dtype))

    explicit = build(lambda: pyg_nn.GCNConv(case.x.shape[1], K, add_self_loops=False), dtype,
                     seed=17)
    explicit.load_state_dict(conv.state_dict())
    assert_close(got, pyg_forward(explicit, case.with_self_loops(), dtype), dtype,
                 "gcn layer vs GCNConv(add_self_loops=False) on graph + one loop per node")
    assert not is_close(got, pyg_forward(conv, case, dtype), dtype), \
        "on a graph with self loops the .mp GCN layer was expected to differ from GCNConv"
