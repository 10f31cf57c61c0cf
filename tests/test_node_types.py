"""Node types (heterogeneous graphs): named node sets and typed edge sets between them.

* ``examples/rgcn_typed.mp`` and ``rgat_typed.mp`` against PyG ``RGCNConv`` and ``RGATConv`` run on the
  same ``HeteroData`` converted with ``to_homogeneous()`` (the same weights, rows compared per node type), and ``examples/hgt_typed.mp``
  against PyG ``HGTConv`` on the ``HeteroData`` itself: 2 node types, 3 relations, float64 at rtol
  1e-10; gradients (parameters and inputs) through the torch module at rtol 1e-8, from a typed Graph,
  from the HeteroData and from per-type tensors.
* The Triton backend equals NumPy on the three examples (interpreter, small graphs).
* Hypothesis graphs with an empty node type and relations without edges against a plain NumPy RGCN.
* Diagnostics for misuse by line, column and message; runtime errors for a HeteroData the model does
  not match; the Graph API (naming of PyG's edge types, the .npz layout); IR round trip and verifier.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pyg_nn = pytest.importorskip("torch_geometric.nn")
pyg_data = pytest.importorskip("torch_geometric.data")

import mpdsl  # noqa: E402
from mpdsl.diagnostics import CompileError, GraphError, InputError  # noqa: E402
from mpdsl.graph import Graph  # noqa: E402
from mpdsl.ir import VerificationError, parse_program, print_program, verify  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from comparison import assert_close  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
F64 = "float64"
TYPES = ("paper", "author")
RELATIONS = (("author", "writes", "paper"), ("paper", "written_by", "author"), ("paper", "cites", "paper"))


def hetero(seed: int = 0, papers: int = 9, authors: int = 5, widths: tuple[int, int] = (5, 5),
           edges: tuple[int, int, int] = (12, 10, 8)):
    """A HeteroData with node types paper and author (features of the given widths) and the three
    relations of the examples, random edges (repeats and self loops of cites included)."""
    rng = np.random.default_rng(seed)
    data = pyg_data.HeteroData()
    counts = {"paper": papers, "author": authors}
    for node_type, width in zip(TYPES, widths):
        data[node_type].x = torch.from_numpy(rng.normal(size=(counts[node_type], width)))
        data[node_type].num_nodes = counts[node_type]
    for (src, rel, dst), count in zip(RELATIONS, edges):
        count = count if counts[src] and counts[dst] else 0
        index = np.stack([rng.integers(0, max(counts[src], 1), count), rng.integers(0, max(counts[dst], 1), count)])
        data[src, rel, dst].edge_index = torch.from_numpy(index.astype(np.int64))
    return data


def example(name: str, **kwargs) -> mpdsl.CompiledModel:
    return mpdsl.compile(EXAMPLES / f"{name}.mp", dtype=F64, **kwargs)


def triton_twin(model: mpdsl.CompiledModel) -> mpdsl.CompiledModel:
    pytest.importorskip("triton")
    from mpdsl.backends.triton_backend import TritonBackend

    return mpdsl.runtime.CompiledModel(model.ir, TritonBackend(interpret=True)).load_weights(model.params)


# ------------------------------------------------------------------------------------------------
# RGCN: RGCNConv on the homogeneous form


def rgcn_reference(model: mpdsl.CompiledModel):
    """PyG's two RGCNConv(aggr="mean") layers with the model's weights."""
    convs = []
    for i, (fan_in, fan_out) in enumerate(((5, 16), (16, 4)), start=1):
        conv = pyg_nn.RGCNConv(fan_in, fan_out, 3, aggr="mean").double()
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(model.params[f"W{i}"]))
            conv.root.copy_(torch.from_numpy(model.params[f"root{i}"]))
            conv.bias.copy_(torch.from_numpy(model.params[f"b{i}"]))
        convs.append(conv)
    return convs


def rgcn_pyg(convs, data) -> dict[str, torch.Tensor]:
    """The two relational layers (RGCNConv, RGATConv) stacked with a relu on ``data.to_homogeneous()`` (relations numbered in the order of its edge types), its
    rows split back by node type."""
    h = data.to_homogeneous()
    y = convs[1](torch.relu(convs[0](h.x, h.edge_index, h.edge_type)), h.edge_index, h.edge_type)
    return {t: y[h.node_type == k] for k, t in enumerate(data.node_types)}


@pytest.mark.parametrize("optimize", [True, False])
def test_rgcn_typed_equals_rgcnconv_on_the_homogeneous_graph(optimize):
    data = hetero(1)
    graph = Graph.from_pyg(data)
    model = example("rgcn_typed", optimize=optimize).init(3, graph=graph)
    with torch.no_grad():
        want = rgcn_pyg(rgcn_reference(model), data)
    got = model(graph)
    assert set(got) == set(TYPES)
    for t in TYPES:
        assert got[t].shape == (data[t].num_nodes, 4)
        assert_close(got[t], want[t].numpy(), F64, f"rgcn_typed {t}")
    assert model.last_layout is None  # typed graphs run in their given order


def test_rgcn_typed_gradients_through_the_torch_module_match_pyg():
    data = hetero(2)
    for x in (data["paper"].x, data["author"].x):
        x.requires_grad_(True)
    graph = Graph.from_pyg(data)
    model = example("rgcn_typed").init(0, graph=graph)
    module = model.to_torch(graph).double()
    convs = rgcn_reference(model)
    want = rgcn_pyg(convs, data)
    loss = (want["paper"] ** 2).sum() + torch.sin(want["author"]).sum()
    loss.backward()
    pyg_grads = {"W1": convs[0].weight.grad, "root1": convs[0].root.grad, "b2": convs[1].bias.grad,
                 "W2": convs[1].weight.grad, "x_paper": data["paper"].x.grad.clone(),
                 "x_author": data["author"].x.grad.clone()}
    for source in ("graph", "hetero", "tensors"):
        for x in (data["paper"].x, data["author"].x):
            x.grad = None
        module.zero_grad()
        if source == "graph":
            out = module(graph)
        elif source == "hetero":
            out = module(data)  # reads the HeteroData's tensors where they are: gradients reach them
        else:
            out = module(x_paper=data["paper"].x, x_author=data["author"].x,
                         **{f"{rel}_index": data[src, rel, dst].edge_index for src, rel, dst in RELATIONS})
        got = (out["paper"] ** 2).sum() + torch.sin(out["author"]).sum()
        np.testing.assert_allclose(got.item(), loss.item(), rtol=1e-10)
        got.backward()
        for name in ("W1", "root1", "W2", "b2"):
            np.testing.assert_allclose(getattr(module, name).grad.numpy(), pyg_grads[name].numpy(), rtol=1e-8,
                                       atol=1e-12, err_msg=f"{source}: d{name}")
        if source != "graph":
            for name, t in (("x_paper", "paper"), ("x_author", "author")):
                np.testing.assert_allclose(data[t].x.grad.numpy(), pyg_grads[name].numpy(), rtol=1e-8, atol=1e-12,
                                           err_msg=f"{source}: d{name}")


# ------------------------------------------------------------------------------------------------
# HGT: HGTConv on the HeteroData


HEADS, DH, CLASSES = 2, 4, 3


class HGTStack(torch.nn.Module):
    """PyG's HGT example: relu of a per-type Linear, two HGTConv layers, one Linear."""

    def __init__(self, data, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        hidden = HEADS * DH
        self.lin_in = torch.nn.ModuleDict({t: pyg_nn.Linear(data[t].x.shape[1], hidden) for t in TYPES})
        self.convs = torch.nn.ModuleList(pyg_nn.HGTConv(hidden, hidden, data.metadata(), heads=HEADS)
                                         for _ in range(2))
        self.out = pyg_nn.Linear(hidden, CLASSES)
        self.double()
        with torch.no_grad():
            for conv in self.convs:  # skip and p_rel start at 1: move every parameter off its init
                for p in conv.parameters():
                    p.uniform_(-0.8, 0.8)

    def forward(self, data):
        h = {t: torch.relu(self.lin_in[t](data[t].x)) for t in TYPES}
        for conv in self.convs:
            h = conv(h, data.edge_index_dict)
        return {t: self.out(h[t]) for t in TYPES}

    def mpdsl_params(self, data) -> dict[str, np.ndarray]:
        """The stack's weights as the example's parameters (see the mapping in its header)."""
        def n(t):
            return t.detach().numpy().copy()
        hidden, relations = HEADS * DH, len(data.edge_types)
        params = {}
        for i, conv in enumerate(self.convs, start=1):
            params[f"W_kqv{i}"] = np.stack([n(conv.kqv_lin.lins[t].weight).T.reshape(hidden, 3, HEADS, DH)
                                            for t in TYPES])
            params[f"b_kqv{i}"] = np.stack([n(conv.kqv_lin.lins[t].bias).reshape(3, HEADS, DH) for t in TYPES])
            k, v = n(conv.k_rel.weight), n(conv.v_rel.weight)
            params[f"W_att{i}"] = np.stack([np.stack([k[h * relations + r] for h in range(HEADS)])
                                            for r in range(relations)])
            params[f"W_msg{i}"] = np.stack([np.stack([v[h * relations + r] for h in range(HEADS)])
                                            for r in range(relations)])
            params[f"mu{i}"] = np.stack([n(conv.p_rel["__".join(et)])[0] for et in data.edge_types])
            params[f"W_a{i}"] = np.stack([n(conv.out_lin.lins[t].weight).T for t in TYPES])
            params[f"b_a{i}"] = np.stack([n(conv.out_lin.lins[t].bias) for t in TYPES])
            params[f"skip{i}"] = np.array([conv.skip[t].item() for t in TYPES])
        for t in TYPES:
            params[f"W_in_{t}"] = n(self.lin_in[t].weight).T
            params[f"b_in_{t}"] = n(self.lin_in[t].bias)
        params["W_out"], params["b_out"] = n(self.out.weight).T, n(self.out.bias)
        return params


def hgt_case(seed: int = 0):
    data = hetero(seed, widths=(5, 3))
    stack = HGTStack(data, seed)
    model = example("hgt_typed")
    model.params = stack.mpdsl_params(data)
    return data, stack, model


@pytest.mark.parametrize("optimize", [True, False])
def test_hgt_typed_equals_hgtconv(optimize):
    data, stack, model = hgt_case(4)
    if not optimize:
        model = example("hgt_typed", optimize=False).load_weights(model.params)
    with torch.no_grad():
        want = stack(data)
    got = model(Graph.from_pyg(data))
    for t in TYPES:
        assert_close(got[t], want[t].numpy(), F64, f"hgt_typed {t}")


def test_hgt_typed_gradients_through_the_torch_module_match_pyg():
    data, stack, model = hgt_case(5)
    data["paper"].x.requires_grad_(True)
    module = model.to_torch(data).double()
    want = stack(data)
    loss = (want["paper"] ** 2).sum() + torch.cos(want["author"]).sum()
    loss.backward()
    got = module(data)
    total = (got["paper"] ** 2).sum() + torch.cos(got["author"]).sum()
    np.testing.assert_allclose(total.item(), loss.item(), rtol=1e-10)
    want_x = data["paper"].x.grad.clone()
    data["paper"].x.grad = None
    total.backward()
    np.testing.assert_allclose(data["paper"].x.grad.numpy(), want_x.numpy(), rtol=1e-8, atol=1e-12)
    conv = stack.convs[0]
    k = conv.k_rel.weight.grad.numpy()
    relations = len(data.edge_types)
    mapped = {
        "W_att1": np.stack([np.stack([k[h * relations + r] for h in range(HEADS)]) for r in range(relations)]),
        "mu1": np.stack([conv.p_rel["__".join(et)].grad.numpy()[0] for et in data.edge_types]),
        "skip1": np.array([conv.skip[t].grad.item() for t in TYPES]),
        "W_a1": np.stack([conv.out_lin.lins[t].weight.grad.numpy().T for t in TYPES]),
        "W_in_author": stack.lin_in["author"].weight.grad.numpy().T,
        "W_out": stack.out.weight.grad.numpy().T,
    }
    for name, want_grad in mapped.items():
        np.testing.assert_allclose(getattr(module, name).grad.numpy(), want_grad, rtol=1e-8, atol=1e-12,
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("name", ["rgcn_typed", "hgt_typed", "rgat_typed"])
def test_triton_equals_numpy_on_the_typed_examples(name):
    data = hetero(6, widths=(5, 3) if name == "hgt_typed" else (5, 5))
    graph = Graph.from_pyg(data)
    model = example(name).init(1, graph=graph)
    want = model(graph)
    got = triton_twin(model)(graph)
    for t in TYPES:
        assert_close(got[t], want[t], F64, f"{name} {t} on triton")


# ------------------------------------------------------------------------------------------------
# Hypothesis: empty node types, relations without edges


def rgcn_numpy(params: dict, data) -> dict[str, np.ndarray]:
    """RGCN (mean per relation, summed, plus root and bias) written directly on the typed graph."""
    h = {t: data[t].x.numpy() for t in TYPES}
    for layer in (1, 2):
        new = {t: h[t] @ params[f"root{layer}"] + params[f"b{layer}"] for t in TYPES}
        for r, (src, rel, dst) in enumerate(RELATIONS):
            index = data[src, rel, dst].edge_index.numpy()
            total = np.zeros((h[dst].shape[0], h[src].shape[1]))
            np.add.at(total, index[1], h[src][index[0]])
            count = np.bincount(index[1], minlength=h[dst].shape[0])[:, None]
            new[dst] = new[dst] + (total / np.maximum(count, 1)) @ params[f"W{layer}"][r]
        h = {t: np.maximum(v, 0) for t, v in new.items()} if layer == 1 else new
    return h


@settings(max_examples=12, deadline=None)
@given(papers=st.integers(0, 6), authors=st.integers(0, 4), edges=st.tuples(*(st.integers(0, 9),) * 3),
       seed=st.integers(0, 100))
def test_rgcn_typed_on_graphs_with_empty_types_and_relations(papers, authors, edges, seed):
    data = hetero(seed, papers, authors, edges=edges)
    graph = Graph.from_pyg(data)
    model = example("rgcn_typed").init(seed, graph=graph, F=5)
    want = rgcn_numpy(model.params, data)
    got = model(graph)
    for t in TYPES:
        assert got[t].shape == want[t].shape
        np.testing.assert_allclose(got[t], want[t], rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Diagnostics


HEAD = "nodes paper\nnodes author\nedges writes: author -> paper\n"


def diagnose(source: str) -> CompileError:
    with pytest.raises(CompileError) as err:
        mpdsl.compile(source)
    return err.value


@pytest.mark.parametrize("source, line, col, message", [
    (HEAD + "model m(p: node<paper>[F], a: node<author>[F]) -> node<paper>[F] {\n  return p + a\n}",
     5, 14, "'+' combines node<author> and node<paper> values, which live on different node types"),
    (HEAD + "model m(p: node<paper>[F]) -> edge<writes>[F] {\n  return p[writes.src]\n}",
     5, 10, "x[src] reads node<author> values at the sources of writes, got node<paper> values"),
    (HEAD + "model m(a: node<author>[F]) -> edge<writes>[F] {\n  return a[writes.dst]\n}",
     5, 10, "x[dst] reads node<paper> values at the destinations of writes, got node<author> values"),
    (HEAD + "model m(a: node<author>[F]) -> edge[F] {\n  return a[src]\n}",
     5, 10, "x[src] reads node values at the sources of edge, got node<author> values"),
    (HEAD + "model m(x: node<venue>[F]) -> node<venue>[F] {\n  return x\n}",
     4, 17, "unknown node type 'venue'"),
    ("nodes paper\nedges cites: paper -> papr\nmodel m(x: node<paper>[F]) -> node<paper>[F] {\n  return x\n}",
     2, 23, "unknown node type 'papr'"),
    (HEAD + "edges looped = self_loops(writes)\nmodel m(x: node<paper>[F]) -> node<paper>[F] {\n  return x\n}",
     4, 27, "self_loops adds a self loop per node, and 'writes' runs between two node types"),
    (HEAD + "model m(p: node<paper>[F]) -> graph[F] {\n  return sum(p) by graph\n}",
     5, 14, "sum by graph reduces the graph's own nodes, got node<paper> values"),
    (HEAD + "model m(p: node<paper>[F]) -> node<author>[F] {\n  return p\n}",
     5, 10, "model 'm' returns node<paper>[F] f32 where it declares node<author>[F] f32"),
    ("nodes a__b\nmodel m(x: node[F]) -> node[F] {\n  return x\n}", 1, 7, "node type names have no '__', got 'a__b'"),
])
def test_misuse_is_a_located_error(source, line, col, message):
    err = diagnose(source)
    assert err.span is not None and (err.span.line, err.span.col) == (line, col), (err.span, err.message)
    assert err.message == message
    assert err.hint


def test_a_layer_keeps_its_arguments_node_types():
    err = diagnose(HEAD + "layer f(h: node<paper>[F]) -> node<paper>[F] {\n  return h\n}\n"
                   "model m(a: node<author>[F]) -> node<paper>[F] {\n  return f(a)\n}")
    assert (err.span.line, err.span.col) == (8, 12) and "node<author> is not node<paper>" in err.message


# ------------------------------------------------------------------------------------------------
# Runtime errors, the Graph API


def test_a_heterodata_the_model_does_not_match_is_refused_with_a_message():
    model = example("rgcn_typed")
    data = hetero(0)
    del data["paper", "cites", "paper"]
    with pytest.raises(InputError) as err:
        model(Graph.from_pyg(data))
    assert "edge set 'cites' from paper to paper" in err.value.message and "cites" in err.value.hint
    with pytest.raises(InputError) as err:
        model.to_torch(hetero(0)).double()(data)
    assert "edge set 'cites'" in err.value.message
    missing = pyg_data.HeteroData()
    missing["paper"].x = torch.zeros(3, 5, dtype=torch.float64)
    missing["paper", "cites", "paper"].edge_index = torch.zeros((2, 0), dtype=torch.int64)
    with pytest.raises(InputError) as err:
        model(Graph.from_pyg(missing))
    assert "author" in err.value.message
    wide = hetero(0, widths=(5, 6))
    with pytest.raises(InputError) as err:
        model(Graph.from_pyg(wide))
    assert "x_author" in err.value.message and "F" in err.value.message


def test_graph_from_pyg_names_edge_types_and_the_npz_layout_round_trips(tmp_path):
    data = hetero(3)
    data["author", "cites", "author"].edge_index = torch.tensor([[0, 1], [1, 2]])
    data["author", "writes", "paper"].weight = torch.ones(12, dtype=torch.float64)
    graph = Graph.from_pyg(data)
    assert graph.node_types == {"paper": 9, "author": 5}
    assert graph.edge_set_types == {"writes": ("author", "paper"), "written_by": ("paper", "author"),
                                    "paper__cites__paper": ("paper", "paper"),
                                    "author__cites__author": ("author", "author")}
    assert set(graph.edge_set_data["writes"]) == {"writes_weight"}
    path = tmp_path / "typed.npz"
    graph.save(path)
    names = set(np.load(path).files)
    assert {"paper__num_nodes", "paper__x", "author__writes__paper_index",
            "paper__paper__cites__paper__paper_index", "writes_weight"} <= names
    back = Graph.load(path)
    assert back.node_types == graph.node_types and back.edge_set_types == graph.edge_set_types
    for t in TYPES:
        np.testing.assert_array_equal(back.type_array(t, "x"), graph.type_array(t, "x"))
    for name, index in graph.edge_sets.items():
        np.testing.assert_array_equal(back.edge_sets[name], index)


def test_typed_graphs_check_each_row_of_a_typed_set_against_its_type():
    with pytest.raises(GraphError) as err:
        Graph(np.zeros((2, 0), np.int64), 0, node_types={"paper": 3, "author": 2},
              edge_sets={"writes": np.array([[0, 2], [1, 1]])}, edge_set_types={"writes": ("author", "paper")})
    assert err.value.message == "writes_index[0, 1] = 2 is out of range for the 2 nodes of type author"
    with pytest.raises(GraphError) as err:
        Graph(np.zeros((2, 0), np.int64), 0, node_types={"paper": 3},
              node_type_data={"paper": {"x": np.zeros((4, 2))}})
    assert err.value.message == "paper__x has 4 rows but the graph has 3 nodes of type paper"
    with pytest.raises(GraphError):
        Graph.batch([Graph.from_pyg(hetero(0)), Graph.from_pyg(hetero(1))])


def test_degrees_of_a_typed_set_are_per_destination_and_per_source_type():
    source = (HEAD + "model m(p: node<paper>[F], a: node<author>[F]) -> (i: node<paper>[], o: node<author>[]) {\n"
              "  return in_degree(writes), out_degree(writes)\n}")
    data = hetero(7)
    graph = Graph.from_pyg(data)
    out = mpdsl.compile(source, dtype=F64)(graph, p=graph.type_array("paper", "x"), a=graph.type_array("author", "x"))
    index = data["author", "writes", "paper"].edge_index.numpy()
    np.testing.assert_array_equal(out["i"], np.bincount(index[1], minlength=9))
    np.testing.assert_array_equal(out["o"], np.bincount(index[0], minlength=5))


def test_a_typed_graph_is_refused_by_graph_directories_and_the_samplers(tmp_path):
    typed = Graph(np.zeros((2, 0), np.int64), 0, node_types={"paper": 2})
    with pytest.raises(GraphError) as err:
        typed.save_directory(tmp_path / "g")
    assert "node types paper" in err.value.message
    from mpdsl.sampling.batch import make_batch

    with pytest.raises(GraphError) as err:
        make_batch(typed, np.zeros(0, np.int64), np.zeros((2, 0), np.int64), np.zeros(0, np.int64), 0)
    assert "node types paper" in err.value.message


# ------------------------------------------------------------------------------------------------
# IR


def test_typed_ir_round_trips_and_the_verifier_checks_node_types():
    model = example("rgcn_typed")
    text = print_program(model.ir)
    assert "edges(writes:author->paper, written_by:paper->author, cites:paper->paper)" in text
    assert print_program(verify(parse_program(text))) == text
    line = next(ln for ln in text.splitlines() if "= aggregate" in ln and "writes:author->paper" in ln)
    broken = text.replace(line, line.replace('edges="writes:author->paper"', 'edges="written_by:paper->author"'))
    assert broken != text
    with pytest.raises(VerificationError):
        verify(parse_program(broken))


@pytest.mark.parametrize("name", ["rgcn_typed", "hgt_typed"])
def test_the_passes_never_fuse_across_node_types(name):
    """After the pipeline, every op that is not a graph op reads node values of one node type only (the
    verifier checks each op's rule, this checks that no pass built a row-wise op over two types)."""
    from mpdsl.ops import OPS, Trait

    program = example(name).optimized_ir
    for v in program.values:
        spaces = {o.type.space for o in v.operands if o.type.domain.value == "node"}
        if not OPS[v.op].has(Trait.GRAPH):
            assert len(spaces) <= 1, (v, spaces)


# ------------------------------------------------------------------------------------------------
# RGAT: RGATConv (across-relation attention) on the homogeneous form


def rgat_reference(model: mpdsl.CompiledModel):
    """PyG's two RGATConv layers (defaults: across-relation additive attention; heads concatenated,
    then averaged) with the model's weights."""
    convs = []
    for i, (fan_in, width, concat) in enumerate(((5, 8, True), (16, 4, False)), start=1):
        conv = pyg_nn.RGATConv(fan_in, width, 3, heads=2, concat=concat).double()
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(model.params[f"W{i}"].reshape(3, fan_in, 2 * width)))
            conv.q.copy_(torch.from_numpy(model.params[f"q{i}"]))
            conv.k.copy_(torch.from_numpy(model.params[f"k{i}"]))
            conv.bias.copy_(torch.from_numpy(model.params[f"b{i}"]))
        convs.append(conv)
    return convs


@pytest.mark.parametrize("optimize", [True, False])
def test_rgat_typed_equals_rgatconv_on_the_homogeneous_graph(optimize):
    data = hetero(4, papers=11)   # some papers without in-edges of one relation or of both
    graph = Graph.from_pyg(data)
    model = example("rgat_typed", optimize=optimize).init(2, graph=graph)
    with torch.no_grad():
        want = rgcn_pyg(rgat_reference(model), data)
    got = model(graph)
    for t in TYPES:
        assert_close(got[t], want[t].numpy(), F64, f"rgat_typed {t}")


def test_rgat_typed_gradients_through_the_torch_module_match_pyg():
    data = hetero(5)
    for x in (data["paper"].x, data["author"].x):
        x.requires_grad_(True)
    graph = Graph.from_pyg(data)
    model = example("rgat_typed").init(1, graph=graph)
    convs = rgat_reference(model)
    want = rgcn_pyg(convs, data)
    ((want["paper"] ** 2).sum() + torch.sin(want["author"]).sum()).backward()
    expected = {"x_paper": data["paper"].x.grad.clone(), "x_author": data["author"].x.grad.clone()}
    for x in (data["paper"].x, data["author"].x):
        x.grad = None
    module = model.to_torch(graph).double()
    out = module(data)
    ((out["paper"] ** 2).sum() + torch.sin(out["author"]).sum()).backward()
    for i, conv in enumerate(convs, start=1):
        np.testing.assert_allclose(getattr(module, f"W{i}").grad.numpy().reshape(conv.weight.shape),
                                   conv.weight.grad.numpy(), rtol=1e-8, atol=1e-12, err_msg=f"dW{i}")
        for name in ("q", "k", "bias"):
            mine = getattr(module, f"{'b' if name == 'bias' else name}{i}").grad.numpy()
            np.testing.assert_allclose(mine, getattr(conv, name).grad.numpy(), rtol=1e-8, atol=1e-12,
                                       err_msg=f"d{name}{i}")
    for name, t in (("x_paper", "paper"), ("x_author", "author")):
        np.testing.assert_allclose(data[t].x.grad.numpy(), expected[name].numpy(), rtol=1e-8, atol=1e-12,
                                   err_msg=f"d{name}")
