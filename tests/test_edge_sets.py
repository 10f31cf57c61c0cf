"""Edge sets besides the graph's edges: self-loop sets with PyTorch Geometric's semantics and input
edge sets given with the graph.

* The derived sets against PyG's own utilities (``remove_self_loops`` + ``add_self_loops``, GATConv's
  default; ``add_remaining_self_loops``, gcn_norm's) on hypothesis graphs (empty, isolated nodes,
  multi-edges, hubs, self loops), structure and carried edge values (``carry`` with PyG's fill values).
* ``GCNConv`` and ``GATConv`` with their default ``add_self_loops=True`` on raw graphs that already hold
  self loops (one of them repeated) and isolated nodes, no preprocessing: the examples
  (``gcn_self_loops.mp``, ``gat_self_loops.mp``) and single layers with edge weights / edge features,
  float64 at rtol 1e-10, and their gradients through the torch module against PyG's at rtol 1e-8.
* A dot-product decoder over a second edge set (``link_pairs.mp``) against plain torch.
* Every graph op on a derived set equals the same op on a graph whose own edges are that set, on
  both backends (Triton in its interpreter); the passes never fuse across edge sets.
* Diagnostics for misuse, by line, column and message; IR round trip and verifier; the Graph API.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pyg_nn = pytest.importorskip("torch_geometric.nn")
pyg_utils = pytest.importorskip("torch_geometric.utils")
pyg_data = pytest.importorskip("torch_geometric.data")

import mpdsl  # noqa: E402
from mpdsl.diagnostics import CompileError, GraphError, InputError  # noqa: E402
from mpdsl.graph import Graph, derive_edges  # noqa: E402
from mpdsl.ir import VerificationError, parse_program, print_program, verify  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from comparison import a, assert_close, build, compare, lin_t  # noqa: E402
from diagnostic_checks import assert_located  # noqa: E402
from strategies import graphs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
F64 = "float64"
KINDS = ("self_loops", "remaining_self_loops")


# ------------------------------------------------------------------------------------------------
# Graphs


def raw_graph(seed: int = 3, nodes: int = 30, features: int = 5) -> Graph:
    """A raw graph as a user has it: a hub (node 0), repeated edges, self loops at nodes 2 and 9 and a
    repeated one at node 5, and three isolated nodes (the last ones)."""
    rng = np.random.default_rng(seed)
    connected = nodes - 3
    src = rng.integers(0, connected, 70)
    dst = np.where(rng.random(70) < 0.3, 0, rng.integers(0, connected, 70))
    src[:4], dst[:4] = 7, 8                                   # a repeated edge
    src, dst = src[src != dst], dst[src != dst]
    loops = np.array([2, 5, 9, 5])                            # node 5's loop twice
    src, dst = np.concatenate([src, loops]), np.concatenate([dst, loops])
    order = rng.permutation(len(src))
    edge_index = np.stack([src[order], dst[order]]).astype(np.int64)
    graph = Graph.from_arrays(edge_index, nodes, x=rng.standard_normal((nodes, features)),
                              edge_weight=rng.uniform(0.5, 2.0, edge_index.shape[1]),
                              edge_attr=rng.standard_normal((edge_index.shape[1], 3)))
    is_loop = edge_index[0] == edge_index[1]
    assert is_loop.sum() == 4 and np.bincount(edge_index[0][is_loop]).max() == 2
    assert graph.in_degree()[-3:].sum() == 0 and graph.out_degree()[-3:].sum() == 0
    return graph


def pyg_tensors(graph: Graph):
    return (torch.from_numpy(np.array(graph["x"])), torch.from_numpy(np.array(graph.edge_index)),
            torch.from_numpy(np.array(graph["edge_weight"])), torch.from_numpy(np.array(graph["edge_attr"])))


def pyg_derived(kind: str, graph: Graph, attr: np.ndarray | None = None, fill=None):
    """PyG's own derivation of an edge set (and its edge values) from ``graph``."""
    edge_index = torch.from_numpy(np.array(graph.edge_index))
    values = None if attr is None else torch.from_numpy(np.array(attr))
    if kind == "self_loops":
        edge_index, values = pyg_utils.remove_self_loops(edge_index, values)
        edge_index, values = pyg_utils.add_self_loops(edge_index, values, fill_value=fill,
                                                      num_nodes=graph.num_nodes)
    else:
        edge_index, values = pyg_utils.add_remaining_self_loops(edge_index, values, fill_value=fill,
                                                                num_nodes=graph.num_nodes)
    return edge_index.numpy(), None if values is None else values.numpy()


# ------------------------------------------------------------------------------------------------
# 1. The derived sets: PyG's structure and edge values


CARRY_SOURCE = """
edges looped = {kind}(edge)
model m(edge_attr: edge[F]) -> edge<looped>[F] {{
    return carry(edge_attr, looped, {fill})
}}
"""


@settings(max_examples=40, deadline=None)
@given(graph=graphs(max_nodes=12, max_edges=40), kind=st.sampled_from(KINDS),
       fill=st.sampled_from(['"mean"', '"sum"', "0.5", "-2.0"]))
def test_derived_sets_are_pyg_s(graph, kind, fill):
    """Structure (edge order included) and carried values of both derivations against PyG's utilities,
    on empty graphs, isolated nodes, multi-edges, hubs and self loops (repeated ones too)."""
    index, table = derive_edges(graph, kind)
    want_index, _ = pyg_derived(kind, graph)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(graph.derived(kind).edge_index, want_index)
    attr = np.random.default_rng(graph.num_edges).standard_normal((graph.num_edges, 2))
    pyg_fill = {'"mean"': "mean", '"sum"': "add"}[fill] if fill.startswith('"') else float(fill)
    _, want = pyg_derived(kind, graph, attr, pyg_fill)
    got = carry_model(kind, fill)(graph, edge_attr=attr)
    assert got.shape == (len(table.origin), 2)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@functools.lru_cache(maxsize=None)
def carry_model(kind: str, fill: str):
    return mpdsl.compile(CARRY_SOURCE.format(kind=kind, fill=fill), dtype=F64)


def test_remaining_self_loops_keeps_the_last_of_repeated_loops():
    """add_remaining_self_loops keeps one loop per node; with a repeated loop its value is the last
    one's (PyG's index assignment), and the loop sits at the end with the others, in node order."""
    graph = Graph.from_arrays(np.array([[0, 1, 1, 2, 1], [1, 0, 1, 2, 1]]), 4)
    w = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    index, want = pyg_derived("remaining_self_loops", graph, w, 1.0)
    model = mpdsl.compile(CARRY_SOURCE.format(kind="remaining_self_loops", fill="1.0").replace("[F]", "[]"),
                          dtype=F64)
    np.testing.assert_array_equal(graph.derived("remaining_self_loops").edge_index, index)
    np.testing.assert_array_equal(model(graph, edge_attr=w), want)
    np.testing.assert_array_equal(want, [1.0, 2.0, 1.0, 5.0, 4.0, 1.0])


def test_degrees_take_an_edge_set():
    graph = raw_graph()
    model = mpdsl.compile("""
        edges looped = self_loops(edge)
        edges kept = remaining_self_loops(edge)
        model m(x: node[F]) -> (a: node[], b: node[], c: node[], d: node[]) {
            return in_degree(looped), out_degree(looped), in_degree(kept), in_degree()
        }""", dtype=F64)
    out = model(graph)
    for name, kind, row in (("a", "self_loops", 1), ("b", "self_loops", 0), ("c", "remaining_self_loops", 1)):
        index, _ = pyg_derived(kind, graph)
        np.testing.assert_array_equal(out[name], np.bincount(index[row], minlength=graph.num_nodes))
    np.testing.assert_array_equal(out["d"], graph.in_degree())
    assert (out["a"] >= 1).all() and (out["a"] != out["d"]).any()


# ------------------------------------------------------------------------------------------------
# 2. GCNConv and GATConv with add_self_loops=True on raw graphs


class GCNStack(torch.nn.Module):
    """examples/gcn_self_loops.mp: relu(GCNConv(x)), dropout, GCNConv (defaults: self loops added)."""

    def __init__(self, f, dims):
        super().__init__()
        self.conv1 = pyg_nn.GCNConv(f, dims["H"])
        self.conv2 = pyg_nn.GCNConv(dims["H"], dims["C"])

    def forward(self, x, edge_index):
        h = torch.nn.functional.dropout(torch.relu(self.conv1(x, edge_index)), 0.5, training=self.training)
        return self.conv2(h, edge_index)

    def mpdsl_weights(self):
        return {"W1": lin_t(self.conv1.lin), "b1": a(self.conv1.bias),
                "W2": lin_t(self.conv2.lin), "b2": a(self.conv2.bias)}

    def mpdsl_grads(self):
        return {"W1": a(self.conv1.lin.weight.grad).T, "b1": a(self.conv1.bias.grad),
                "W2": a(self.conv2.lin.weight.grad).T, "b2": a(self.conv2.bias.grad)}


def gat_weights(conv, suffix: str, grad: bool = False) -> dict[str, np.ndarray]:
    heads, out = conv.heads, conv.out_channels

    def value(p):
        return a(p.grad if grad else p)

    return {f"W{suffix}": value(conv.lin.weight).T.reshape(-1, heads, out),
            f"a_src{suffix}": value(conv.att_src).reshape(heads, out),
            f"a_dst{suffix}": value(conv.att_dst).reshape(heads, out),
            f"b{suffix}": value(conv.bias)}


class GATStack(torch.nn.Module):
    """examples/gat_self_loops.mp: elu(GATConv(x), heads concatenated), GATConv averaging heads."""

    def __init__(self, f, dims):
        super().__init__()
        heads, hid, c = dims["HEADS"], dims["HID"], dims["C"]
        self.conv1 = pyg_nn.GATConv(f, hid, heads=heads, concat=True, dropout=0.0)
        self.conv2 = pyg_nn.GATConv(heads * hid, c, heads=heads, concat=False, dropout=0.0)

    def forward(self, x, edge_index):
        return self.conv2(torch.nn.functional.elu(self.conv1(x, edge_index)), edge_index)

    def mpdsl_weights(self):
        return {**gat_weights(self.conv1, "1"), **gat_weights(self.conv2, "2")}

    def mpdsl_grads(self):
        return {**gat_weights(self.conv1, "1", True), **gat_weights(self.conv2, "2", True)}


STACKS = {"gcn_self_loops": GCNStack, "gat_self_loops": GATStack}


def projection(out: torch.Tensor) -> torch.Tensor:
    """A loss weighting every output element differently."""
    return (out * torch.sin(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape)).sum()


@pytest.mark.parametrize("seed", [3, 8])
@pytest.mark.parametrize("example", list(STACKS))
def test_example_matches_pyg_with_default_self_loops(example, seed):
    graph = raw_graph(seed)
    model = mpdsl.compile(EXAMPLES / f"{example}.mp", dtype=F64)
    stack = build(lambda: STACKS[example](graph["x"].shape[1], model.dims), F64, seed=seed)
    x, edge_index, _, _ = pyg_tensors(graph)
    with torch.no_grad():
        want = stack(x, edge_index).numpy()
    compare(model, stack.mpdsl_weights(), graph, want, F64, f"{example} on a raw graph", perturb=seed == 3)
    # the PyG Data itself, converted by Graph.from_pyg
    assert_close(model(pyg_data.Data(x=x, edge_index=edge_index)), want, F64, f"{example} via Data")


@pytest.mark.parametrize("backend", ["numpy", "triton"])
@pytest.mark.parametrize("example", list(STACKS))
def test_example_gradients_through_torch_match_pyg(example, backend):
    """The parameters' gradients of the torch module (the compiler's backward program, fused on the
    derived edge set) against PyG's autograd, rtol 1e-8; the Triton backend runs in its interpreter."""
    graph = raw_graph(5, nodes=16)
    model = mpdsl.compile(EXAMPLES / f"{example}.mp", dtype=F64)
    stack = build(lambda: STACKS[example](graph["x"].shape[1], model.dims), F64, seed=2)
    x, edge_index, _, _ = pyg_tensors(graph)
    projection(stack(x, edge_index)).backward()
    want = stack.mpdsl_grads()
    model.load_weights(stack.mpdsl_weights())
    if backend == "triton":
        from mpdsl.backends.triton_backend import TritonBackend
        model = mpdsl.runtime.CompiledModel(model.ir, TritonBackend(interpret=True)).load_weights(model.params)
    module = model.to_torch(graph).eval()
    projection(module(graph)).backward()
    for name, value in want.items():
        got = getattr(module, name).grad.numpy()
        np.testing.assert_allclose(got, value, rtol=1e-8, atol=1e-10 * max(1.0, np.abs(value).max()),
                                   err_msg=f"{example} ({backend}): d {name}")


WEIGHTED_GCN = """
edges looped = remaining_self_loops(edge)
model gcn(x: node[F], edge_weight: edge[], W: param[F, K], b: param[K]) -> node[K] {
    w = carry(edge_weight, looped, 1.0)          # gcn_norm: a missing loop gets weight 1
    norm = rsqrt(sum(w) by dst)
    z = x @ W
    return sum(z[looped.src] * w * norm[looped.src] * norm[looped.dst]) by dst + b
}
"""

EDGE_GAT = """
edges looped = self_loops(edge)
model gat(x: node[F], edge_attr: edge[E], W: param[F, H, K], W_e: param[E, H, K], a_src: param[H, K],
          a_dst: param[H, K], a_edge: param[H, K], b: param[H * K]) -> node[H * K] {
    z = x @ W
    e = carry(edge_attr, looped, FILL) @ W_e                      # edge<looped>[H, K]
    score = leaky_relu(sum(z[looped.src] * a_src, -1) + sum(z[looped.dst] * a_dst, -1)
                       + sum(e * a_edge, -1), 0.2)
    return reshape(sum(softmax(score) by dst * z[looped.src]) by dst, [H * K]) + b
}
"""


def test_weighted_gcn_layer_matches_gcnconv():
    graph = raw_graph(4)
    model = mpdsl.compile(WEIGHTED_GCN, dtype=F64, dims={"K": 6})
    conv = build(lambda: pyg_nn.GCNConv(5, 6), F64, seed=9)
    x, edge_index, edge_weight, _ = pyg_tensors(graph)
    with torch.no_grad():
        want = conv(x, edge_index, edge_weight).numpy()
    compare(model, {"W": lin_t(conv.lin), "b": a(conv.bias)}, graph, want, F64, "weighted GCNConv")


@pytest.mark.parametrize("fill", ['"mean"', "0.5"])
def test_gat_layer_with_edge_features_matches_gatconv(fill):
    """GATConv(edge_dim=...) carries edge_attr onto its loops with fill_value ("mean": the mean of the
    node's in-edge features, its default; or a constant)."""
    graph = raw_graph(6)
    heads, out, dim = 2, 3, graph["edge_attr"].shape[1]
    model = mpdsl.compile(EDGE_GAT.replace("FILL", fill), dtype=F64, dims={"H": heads, "K": out})
    pyg_fill = "mean" if fill == '"mean"' else float(fill)
    conv = build(lambda: pyg_nn.GATConv(5, out, heads=heads, edge_dim=dim, fill_value=pyg_fill), F64, seed=4)
    x, edge_index, _, edge_attr = pyg_tensors(graph)
    with torch.no_grad():
        want = conv(x, edge_index, edge_attr).numpy()
    weights = {**gat_weights(conv, ""), "W_e": lin_t(conv.lin_edge).reshape(dim, heads, out),
               "a_edge": a(conv.att_edge).reshape(heads, out)}
    compare(model, weights, graph, want, F64, f"GATConv(edge_dim, fill_value={fill})")
    # the gradient with respect to the edge features flows back through the carried loops
    conv.zero_grad()
    attr = edge_attr.clone().requires_grad_(True)
    projection(conv(x, edge_index, attr)).backward()
    module = model.to_torch(graph).eval()
    attr_mp = torch.from_numpy(np.array(graph["edge_attr"])).requires_grad_(True)
    projection(module(graph, edge_attr=attr_mp)).backward()
    np.testing.assert_allclose(attr_mp.grad.numpy(), attr.grad.numpy(), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(module.W_e.grad.numpy(), a(conv.lin_edge.weight.grad).T.reshape(dim, heads, out),
                               rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# 3. A second edge set: a dot-product decoder over pairs


def link_pairs_reference(graph: Graph, pairs: np.ndarray, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """examples/link_pairs.mp in plain torch: GCN (dense normalised adjacency with gcn_norm's loops),
    relu, GCN, then z_u . z_v per pair."""
    n = graph.num_nodes
    src, dst = (torch.from_numpy(np.array(r)) for r in graph.edge_index)
    keep = src != dst
    adjacency = torch.zeros(n, n, dtype=torch.float64)
    adjacency.index_put_((dst[keep], src[keep]), torch.ones(int(keep.sum()), dtype=torch.float64), accumulate=True)
    adjacency += torch.eye(n, dtype=torch.float64)
    norm = adjacency.sum(1).rsqrt()
    propagate = norm[:, None] * adjacency * norm[None, :]
    x = torch.from_numpy(np.array(graph["x"]))
    h = torch.relu(propagate @ (x @ weights["W1"]) + weights["b1"])
    z = propagate @ (h @ weights["W2"]) + weights["b2"]
    p = torch.from_numpy(pairs)
    return (z[p[0]] * z[p[1]]).sum(-1)


def test_link_pairs_scores_a_second_edge_set_against_plain_torch():
    graph = raw_graph(7)
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, graph.num_nodes, (2, 25))
    pairs[:, 0] = [29, 29]                                    # an isolated node, with itself
    with_pairs = graph.with_data(pairs_index=pairs)
    model = mpdsl.compile(EXAMPLES / "link_pairs.mp", dtype=F64).init(1, graph=graph)
    weights = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in model.params.items()}
    want = link_pairs_reference(graph, pairs, weights)
    got = model(with_pairs)
    assert got.shape == (25,)
    assert_close(got, want.detach().numpy(), F64, "link_pairs")
    assert_close(model(graph, pairs_index=pairs), want.detach().numpy(), F64, "link_pairs, pairs as a keyword")
    # gradients through the torch module (graph with its pairs; then tensors, PyG style)
    projection(want).backward()
    module = model.to_torch(with_pairs).eval()
    projection(module(with_pairs)).backward()
    for name, w in weights.items():
        np.testing.assert_allclose(getattr(module, name).grad.numpy(), w.grad.numpy(), rtol=1e-8, atol=1e-12,
                                   err_msg=f"d {name}")
    tensors = module(x=torch.from_numpy(np.array(graph["x"])), edge_index=torch.from_numpy(np.array(graph.edge_index)),
                     pairs_index=torch.from_numpy(pairs))
    np.testing.assert_allclose(tensors.detach().numpy(), want.detach().numpy(), rtol=1e-10)
    # a PyG Data with the pairs as an edge_index-like attribute
    data = pyg_data.Data(x=torch.from_numpy(np.array(graph["x"])),
                         edge_index=torch.from_numpy(np.array(graph.edge_index)), pairs_index=torch.from_numpy(pairs))
    np.testing.assert_allclose(module(data).detach().numpy(), want.detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(model(data), want.detach().numpy(), rtol=1e-10)


def test_a_graph_without_the_input_edge_set_is_refused_by_name():
    model = mpdsl.compile(EXAMPLES / "link_pairs.mp", dtype=F64)
    with pytest.raises(InputError) as err:
        model(raw_graph())
    assert "reads the edge set 'pairs' (declared at" in err.value.message and "link_pairs.mp:13:1" in err.value.message
    assert "pairs_index" in err.value.hint
    module = model.init(0, graph=raw_graph().with_data(pairs_index=np.zeros((2, 1), np.int64))).to_torch()
    with pytest.raises(InputError, match="reads the edge set 'pairs'"):
        module(raw_graph())
    with pytest.raises(InputError, match="pass its index as pairs_index"):
        module(x=torch.zeros(30, 5, dtype=torch.float64), edge_index=torch.zeros(2, 0, dtype=torch.int64))


# ------------------------------------------------------------------------------------------------
# 4. Every graph op on a derived set, and no fusion across edge sets


def every_op(edge_set: str, degree: str) -> str:
    """Each graph op (attention, weighted g-SpMM, g-SpMM by src, max g-SpMM, softmax by src, std,
    min, a degree) on the edge set ``edge_set`` ("": the graph's own edges); the last output adds a
    sum over the graph's own edges to one over the set (two sets, two g-SpMMs) when there is a set."""
    on = f"<{edge_set}>" if edge_set else ""
    of = f"{edge_set}." if edge_set else ""
    beside = " + sum(x[src]) by dst" if edge_set else ""
    return f"""
model m(x: node[F], s: edge{on}[2], w: edge{on}[], a: param[F, 2, 3]) -> (g: node[2, 3], h: node[F],
        k: node[F], l: node[F], n: edge{on}[2], o: node[F], p: node[F], q: node[], r: node[F]) {{
    z = x @ a
    return sum(softmax(s) by dst * z[{of}src]) by dst, sum(x[{of}src] * w) by dst, mean(x[{of}dst]) by src,
           max(x[{of}src] * w) by dst, softmax(s) by src, std(x[{of}src] * w) by dst,
           min(x[{of}src]) by dst + sum(x[{of}src]) by src, {degree}({edge_set}), sum(x[{of}src] * w) by dst{beside}
}}
"""


def check_every_op_on_a_set(graph: Graph, declaration: str, edge_set: str, derived: Graph, degree: str) -> None:
    """Each graph op (fused or not, NumPy and Triton's interpreter) run on the edge set ``edge_set``
    (declared by ``declaration``; ``derived`` its edges on ``graph``) equals the same op run on a
    graph whose own edges are that set; the sum over the graph's own edges beside it keeps to them."""
    source = declaration + "\n" + every_op(edge_set, degree)
    rng = np.random.default_rng(1)
    inputs = {"s": rng.standard_normal((derived.num_edges, 2)), "w": rng.uniform(0.5, 1.5, derived.num_edges)}
    model = mpdsl.compile(source, dtype=F64).init(0, F=3)
    program = model.optimized_for(model.bind(graph, inputs)[1])[0]
    fused = {v.op for v in program.values}
    assert {"attention", "gspmm"} <= fused, fused
    assert {v.attr["edges"] for v in program.values if v.op == "gspmm"} == {"", edge_set}
    reference = mpdsl.compile(every_op("", degree), dtype=F64).load_weights(model.params)
    want = reference(Graph.from_arrays(derived.edge_index, graph.num_nodes, x=graph["x"]), **inputs)
    want["r"] = want["r"] + mpdsl.compile("model m(x: node[F]) -> node[F] { return sum(x[src]) by dst }",
                                          dtype=F64)(graph)
    from mpdsl.backends.triton_backend import TritonBackend
    unfused = mpdsl.compile(source, dtype=F64, optimize=False).load_weights(model.params)
    triton = mpdsl.runtime.CompiledModel(model.ir, TritonBackend(interpret=True)).load_weights(model.params)
    for what, candidate in (("optimized", model), ("unoptimized", unfused), ("triton", triton)):
        out = candidate(graph, **inputs)
        for name in want:
            np.testing.assert_allclose(out[name], want[name], rtol=1e-10, atol=1e-12, err_msg=f"{what}: {name}")


def test_graph_ops_on_a_derived_set_equal_the_ops_on_a_graph_of_that_set():
    graph = raw_graph(2, nodes=14, features=3)
    check_every_op_on_a_set(graph, "edges looped = self_loops(edge)", "looped", graph.derived("self_loops"),
                            "out_degree")


def test_passes_never_merge_or_fuse_across_edge_sets():
    source = """
    edges looped = self_loops(edge)
    model m(x: node[F]) -> node[F] { return sum(x[looped.src]) by dst + sum(x[src]) by dst }
    """
    model = mpdsl.compile(source, dtype=F64)
    text = print_program(model.optimized_ir)
    assert 'gspmm %x {by="dst", edges="looped", layout="csr_dst", reduce="sum"}' in text
    assert 'gspmm %x {by="dst", layout="csr_dst", reduce="sum"}' in text
    graph = raw_graph()
    want = mpdsl.compile(source, dtype=F64, optimize=False)(graph)
    np.testing.assert_allclose(model(graph), want, rtol=1e-12)


def test_the_plan_names_the_edge_set(tmp_path, capsys):
    from mpdsl.cli import main
    path = tmp_path / "g.npz"
    raw_graph().save(path)
    assert main(["compile", str(EXAMPLES / "gat_self_loops.mp"), "--emit", "plan", "--graph", str(path)]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "csr_dst (looped)" in out
    assert "edges of looped" in out
    assert "the program reads edge sets besides the graph's edges (looped)" in out


# ------------------------------------------------------------------------------------------------
# 5. Diagnostics


def diagnose(source: str) -> CompileError:
    with pytest.raises(CompileError) as err:
        mpdsl.compile(source)
    return err.value


@pytest.mark.parametrize("source, line, col, message", [
    ("model m(x: node[F]) -> node[F] {\n  return sum(x[pairs.src]) by dst\n}",
     2, 16, "unknown edge set 'pairs'"),
    ("edges looped = self_loops(edge)\nmodel m(x: node[F]) -> node[F] {\n  return sum(x[loped.src]) by dst\n}",
     3, 16, "unknown edge set 'loped'"),
    ("edges looped = self_loops(edge)\nmodel m(x: edge<lopped>[F]) -> node[F] {\n  return sum(x) by dst\n}",
     2, 17, "unknown edge set 'lopped'"),
    ("edges looped = self_loops(edge)\nmodel m(x: node[F]) -> node[F] {\n  return x + sum(x[looped.src] + x[src]) by dst\n}",
     3, 34, "'+' combines edge and edge<looped> values, which live on different edge sets"),
    ("edges pairs\nmodel m(x: node[F]) -> graph[F] {\n  return sum(x[pairs.src]) by graph\n}",
     3, 14, "sum by graph reduces node values to their graphs, got an edge value (edge set pairs)"),
    ("edges pairs\nedges looped = self_loops(edge)\nmodel m(x: node[F]) -> node[F] {\n"
     "  return sum(x[looped.src]) by pairs.dst\n}", 4, 32,
     "sum(...) by pairs.dst reduces values of the edge set pairs, but its operand lives on edge<looped>"),
    ("edges looped = self_loops(edge)\nmodel m(x: node[F]) -> node[F] {\n  return sum(x[looped.end]) by dst\n}",
     3, 23, "an edge set's endpoints are src and dst, not 'end'"),
    ("edges looped = self_loops(edge)\nmodel m(x: node[F]) -> node[F] {\n  return looped\n}",
     3, 10, "'looped' is an edge set, not a value"),
    ("edges looped = self_loop(edge)\nmodel m(x: node[F]) -> node[F] {\n  return x\n}",
     1, 16, "unknown edge set derivation 'self_loop'"),
    ("edges looped = self_loops(pairs)\nmodel m(x: node[F]) -> node[F] {\n  return x\n}",
     1, 27, "unknown edge set 'pairs'"),
    ("edges looped = self_loops(edge)\nedges looped\nmodel m(x: node[F]) -> node[F] {\n  return x\n}",
     2, 7, "duplicate definition of 'looped'"),
    ("edges looped = self_loops(edge)\nmodel m(x: node<looped>[F]) -> node[F] {\n  return x\n}",
     2, 17, "only edge values live on an edge set, not node values"),
    ("edges pairs\nmodel m(w: edge[]) -> edge<pairs>[] {\n  return carry(w, pairs, 1.0)\n}",
     3, 19, "carry moves edge values onto a derived edge set, and pairs is not one"),
    ("edges pairs\nedges looped = self_loops(edge)\nmodel m(w: edge<pairs>[]) -> edge<looped>[] {\n"
     "  return carry(w, looped, 1.0)\n}", 4, 16,
     "carry onto looped takes values of the edge set it is derived from (edge), got edge<pairs>[] f32"),
    ("edges looped = self_loops(edge)\nmodel m(w: edge[]) -> edge<looped>[] {\n  return carry(w, looped, \"max\")\n}",
     3, 27, "unknown fill 'max'"),
    ("edges looped = self_loops(edge)\nmodel m(x: node[F]) -> node[] {\n  return in_degree(x)\n}",
     3, 20, "unknown edge set 'x'"),
    ("edges looped = self_loops(edge)\nmodel m(x: node[F]) -> node[F] {\n  looped = x\n  return looped\n}",
     3, 3, "'looped' shadows the edge set of the same name"),
    ("edges looped = self_loops(edge)\nlayer f(e: edge<looped>[F]) -> node[F] {\n  return sum(e) by dst\n}\n"
     "model m(x: node[F]) -> node[F] {\n  return f(x[src])\n}", 6, 12,
     "argument 1 ('e') of layer 'f': expected edge<looped>[F], got edge[F] f32 (edge set edge is not looped)"),
])
def test_misuse_is_a_located_error(source, line, col, message):
    assert_located(diagnose(source), source, line, col, message)


def test_values_of_two_edge_sets_never_combine_even_in_a_layer():
    err = diagnose("edges a\nedges b\nmodel m(x: edge<a>[F], y: edge<b>[F]) -> edge<a>[F] {\n  return x * y\n}")
    assert (err.span.line, err.span.col) == (4, 14) and "live on different edge sets" in err.message
    assert "never combine row by row" in err.hint


# ------------------------------------------------------------------------------------------------
# 6. IR, verifier, Graph API


def test_ir_round_trip_keeps_the_edge_sets():
    for name in ("gcn_self_loops", "gat_self_loops", "link_pairs"):
        program = mpdsl.compile(EXAMPLES / f"{name}.mp").ir
        text = print_program(program)
        again = verify(parse_program(text))
        assert again.edge_sets == program.edge_sets and print_program(again) == text
    text = print_program(mpdsl.compile(EXAMPLES / "link_pairs.mp").ir)
    assert "edges(pairs, looped=remaining_self_loops(edge))" in text
    assert 'gather %12 {edges="pairs", index="src"} : edge<pairs>[8] f32' in print_program(
        mpdsl.compile(EXAMPLES / "link_pairs.mp").optimized_ir)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("edges(pairs, looped=remaining_self_loops(edge)) ", ""), "edge set"),
    (lambda t: t.replace("looped=remaining_self_loops(edge)", "looped=remaining_self_loops(nope)"),
     "derived from 'nope'"),
    (lambda t: t.replace("edges(pairs, ", "edges(pairs, pairs, "), "defined twice"),
    (lambda t: t.replace('{dir="in", edges="looped"}', '{dir="in", edges="nope"}', 1), "not defined"),
])
def test_verifier_checks_edge_sets(edit, message):
    text = print_program(mpdsl.compile(EXAMPLES / "link_pairs.mp").ir)
    with pytest.raises(VerificationError, match=message):
        verify(parse_program(edit(text)))


def test_verifier_checks_a_carry_s_base():
    source = "edges l = self_loops(edge)\nedges p\nmodel m(w: edge[]) -> edge<l>[] { return carry(w, l, 1.0) }"
    text = print_program(mpdsl.compile(source).ir)
    broken = text.replace("%w = input : edge[] f32", "%w = input : edge<p>[] f32").replace("edges(l=self_loops(edge))",
                                                                                           "edges(l=self_loops(edge), p)")
    with pytest.raises(VerificationError, match="l is not derived from p"):
        verify(parse_program(broken))


def test_graph_carries_edge_sets_through_files_batches_and_pyg(tmp_path):
    graph = raw_graph().with_data(pairs_index=np.array([[0, 3, 4], [1, 1, 29]]), pairs_label=np.array([1.0, 0.0, 1.0]))
    assert set(graph.edge_sets) == {"pairs"} and graph.edge_set_data["pairs"].keys() == {"pairs_label"}
    assert graph.edge_set("pairs").num_edges == 3 and graph["pairs_label"].shape == (3,)
    path = tmp_path / "g.npz"
    graph.save(path)
    back = Graph.load(path)
    np.testing.assert_array_equal(back.edge_sets["pairs"], graph.edge_sets["pairs"])
    np.testing.assert_array_equal(back["pairs_label"], graph["pairs_label"])
    both = Graph.batch([graph, graph])
    np.testing.assert_array_equal(both.edge_sets["pairs"][:, 3:], graph.edge_sets["pairs"] + graph.num_nodes)
    np.testing.assert_array_equal(both.select_graphs([1]).edge_sets["pairs"], graph.edge_sets["pairs"])
    data = graph.to_pyg()
    assert torch.equal(data.pairs_index, torch.from_numpy(np.array(graph.edge_sets["pairs"])))
    again = Graph.from_pyg(data)
    np.testing.assert_array_equal(again.edge_sets["pairs"], graph.edge_sets["pairs"])
    # PyG's link-prediction attributes: edge_label_index is the edge set edge_label, with edge_label its array
    pyg = pyg_data.Data(x=torch.zeros(4, 1), edge_index=torch.tensor([[0, 1], [1, 2]]),
                        edge_label_index=torch.tensor([[0, 3], [2, 1]]), edge_label=torch.tensor([1.0, 0.0]))
    converted = Graph.from_pyg(pyg)
    assert set(converted.edge_sets) == {"edge_label"} and "edge_label" in converted.edge_set_data["edge_label"]
    assert "edge_label" not in converted.edge_data


def test_graph_refuses_bad_edge_sets_by_name():
    with pytest.raises(GraphError, match=r"pairs_index\[1, 0\] = 9 is out of range for num_nodes=4"):
        Graph.from_arrays(np.zeros((2, 0), np.int64), 4, pairs_index=np.array([[0], [9]]))
    with pytest.raises(GraphError, match="pairs_label has 2 rows but the edge set pairs has 1 edges"):
        Graph(np.zeros((2, 0), np.int64), 4, edge_sets={"pairs": np.array([[0], [1]])},
              edge_set_data={"pairs": {"pairs_label": np.ones(2)}})
    with pytest.raises(GraphError, match="graph 1 has the edge set pairs but graph 0 does not"):
        Graph.batch([raw_graph(), raw_graph().with_data(pairs_index=np.zeros((2, 1), np.int64))])
    with pytest.raises(GraphError, match="cannot hold edge sets|holds one edge set"):
        raw_graph().with_data(pairs_index=np.zeros((2, 1), np.int64)).save_directory(
            Path(os.environ.get("TMPDIR", "/tmp")) / "mpdsl-edge-set-dir-test")


# ------------------------------------------------------------------------------------------------
# 7. Sampled mini-batches: derived sets per batch graph


def test_sampled_batches_derive_their_own_self_loop_sets():
    from mpdsl.sampling import NeighborLoader

    graph = raw_graph(9, nodes=40)
    model = mpdsl.compile(EXAMPLES / "gcn_self_loops.mp", dtype=F64).init(0, graph=graph)
    loader = NeighborLoader(graph, [3, 2], batch_size=8, shuffle=False, seed=0)
    module = model.to_torch(graph).eval()
    for batch in loader:
        sub = batch.graph
        want_index, _ = pyg_derived("remaining_self_loops", sub)
        np.testing.assert_array_equal(sub.derived("remaining_self_loops").edge_index, want_index)
        stack = GCNStack(5, model.dims).double().eval()
        with torch.no_grad():
            stack.conv1.lin.weight.copy_(torch.from_numpy(model.params["W1"].T.copy()))
            stack.conv1.bias.copy_(torch.from_numpy(model.params["b1"]))
            stack.conv2.lin.weight.copy_(torch.from_numpy(model.params["W2"].T.copy()))
            stack.conv2.bias.copy_(torch.from_numpy(model.params["b2"]))
            want = stack(torch.from_numpy(np.array(sub["x"])), torch.from_numpy(np.array(sub.edge_index))).numpy()
        np.testing.assert_allclose(model(sub), want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(module(sub).detach().numpy(), want, rtol=1e-10, atol=1e-12)


def test_sampled_batches_carry_input_edge_sets_among_their_nodes():
    from mpdsl.sampling import NeighborLoader

    graph = raw_graph(9, nodes=40)
    pairs = np.random.default_rng(2).integers(0, 40, (2, 60))
    source = graph.with_data(pairs_index=pairs, pairs_label=np.arange(60.0))
    model = mpdsl.compile(EXAMPLES / "link_pairs.mp", dtype=F64).init(0, graph=graph)
    for batch in NeighborLoader(source, [3, 2], batch_size=8, seed=0):
        local = np.full(40, -1)
        local[batch.n_id] = np.arange(len(batch.n_id))
        ends = local[pairs]
        kept = (ends >= 0).all(0)
        np.testing.assert_array_equal(batch.graph.edge_sets["pairs"], ends[:, kept])
        np.testing.assert_array_equal(batch["pairs_label"], np.arange(60.0)[kept])
        scores = model(batch.graph)
        assert scores.shape == (kept.sum(),)


def test_torch_compile_and_export_with_edge_sets():
    graph = raw_graph(4)
    x, edge_index, _, _ = pyg_tensors(graph)
    model = mpdsl.compile(EXAMPLES / "gcn_self_loops.mp", dtype=F64).init(0, graph=graph)
    module = model.to_torch(graph).eval()
    kwargs = {"x": x, "edge_index": edge_index}
    expected = module(**kwargs).detach()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="eager")
    torch.testing.assert_close(compiled(**kwargs), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(Exception, match="derived edge set, whose size depends on the graph's values"):
        torch.export.export(module, (), kwargs)
    # an input edge set only: exported, its index a structure tensor
    source = """
    edges pairs
    model m(x: node[F], W: param[F, 4]) -> edge<pairs>[] {
        z = sum((x @ W)[src]) by dst
        return sum(z[pairs.src] * z[pairs.dst], -1)
    }"""
    pairs = torch.from_numpy(np.random.default_rng(0).integers(0, graph.num_nodes, (2, 9)))
    model = mpdsl.compile(source, dtype=F64).init(0, graph=graph)
    module = model.to_torch(graph).eval()
    kwargs = {"x": x, "edge_index": edge_index, "pairs_index": pairs}
    expected = module(**kwargs).detach()
    np.testing.assert_allclose(expected.numpy(), model(graph, pairs_index=pairs.numpy()), rtol=1e-12)
    exported = torch.export.export(module, (), kwargs)
    torch.testing.assert_close(exported.module()(**kwargs), expected, rtol=1e-10, atol=1e-12)


def test_the_memory_budget_counts_the_edge_sets_structures():
    from mpdsl.runtime import edge_set_bytes, graph_index_bytes

    graph = raw_graph().with_data(pairs_index=np.zeros((2, 5), np.int64))
    model = mpdsl.compile(EXAMPLES / "link_pairs.mp")
    looped = graph.derived("remaining_self_loops").num_edges
    n = graph.num_nodes
    assert edge_set_bytes(model.ir, graph) == 16 * (n + 1 + 5) + 16 * (n + 1 + looped) + 56 * looped
    assert edge_set_bytes(mpdsl.compile(EXAMPLES / "gcn.mp").ir, graph) == 0
    model.init(0, graph=graph)
    program = model.program_for(model.bind(graph, {})[1])
    planned = sum(b for _, b in model.planned_bytes(program, graph, model.dims))
    need = planned + graph_index_bytes(graph)
    model.memory_limit = need + edge_set_bytes(model.ir, graph) // 2  # enough without the edge sets only
    with pytest.raises(InputError, match="over the memory budget"):
        model(graph)
    model.memory_limit = None
    assert model(graph).shape == (5,)
