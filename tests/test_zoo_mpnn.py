"""The edge-feature models of the zoo against PyTorch references with the same weights.

* ``examples/mpnn.mp`` (Gilmer et al. 2017) against a torch module made of PyG's
  ``NNConv(D, D, nn, aggr="mean")`` (root weight and bias on), a ``torch.nn.GRU`` run for T steps
  with shared weights as in PyG's QM9 NNConv example, ``global_add_pool`` and an MLP readout;
* ``examples/gine.mp`` (Hu et al. 2020) against two ``GINEConv(nn, train_eps=True, edge_dim=Fe)``
  layers with ``BatchNorm1d`` (eval mode), ``global_mean_pool`` and a ``Linear`` head;
* ``examples/mpnn_virtual_node.mp`` against a plain-torch module written from the equations in
  that file's header (``index_add_`` for the scatters; no PyG layer exists for it).

Every parameter (biases, eps, the virtual node's start vector, batch-norm statistics) is filled
with seeded non-zero values. Graphs: one unbatched random multigraph, a ``Graph.batch`` of
members that include a 1-node graph, an edge-less graph and a 1-node graph with a self loop, the
same batch with its edges shuffled, and hypothesis-drawn batches (``strategies.batched_graphs``,
members without nodes included) with ``edge_attr`` added. Per-graph outputs are also checked
against running each member alone (``unbatch_graphs`` / ``unbatch_nodes``). Every comparison is
shown able to fail: perturbing any one copied parameter must break the agreement.

Tolerances (``comparison.py``, as in ``test_pyg_reference.py``): float64 rtol 1e-10, float32
rtol 1e-5, atol scaled by the magnitude of the reference output.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pyg_nn = pytest.importorskip("torch_geometric.nn")

import mpdsl  # noqa: E402
from mpdsl.graph import Graph  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison import (  # noqa: E402
    DTYPES, TORCH_DTYPES, a, as_outputs, assert_close, assert_nontrivial,
    assert_perturbations_detected, build, lin_t)
from comparison import one_torch_thread  # noqa: E402, F401  (autouse: torch on one thread here)
from strategies import batched_graphs  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

F = 5    # node feature width of the fixed test graphs
FE = 3   # edge feature width


# ------------------------------------------------------------------------------------------------
# Helpers


def torch_inputs(graph: Graph, dtype: str):
    """(x, edge_index, edge_attr, batch, num_graphs) of an mpdsl graph, as torch tensors."""
    t = TORCH_DTYPES[dtype]
    batch = graph["batch"] if "batch" in graph else np.zeros(graph.num_nodes, dtype=np.int64)
    return (torch.from_numpy(np.array(graph["x"])).to(t),
            torch.from_numpy(np.array(graph.edge_index)),
            torch.from_numpy(np.array(graph["edge_attr"])).to(t),
            torch.from_numpy(np.array(batch)),
            graph.num_graphs)


# ------------------------------------------------------------------------------------------------
# References


class MPNNRef(torch.nn.Module):
    """examples/mpnn.mp: relu(Linear) embedding; T x (m = relu(NNConv mean); h = GRU(m, h)) with
    shared weights; global_add_pool; Linear, ReLU, Linear."""

    def __init__(self, f, fe, dims):
        super().__init__()
        d, eh, rh = dims["D"], dims["EH"], dims["RH"]
        self.steps = dims["T"]
        self.lin0 = torch.nn.Linear(f, d)
        edge_nn = torch.nn.Sequential(torch.nn.Linear(fe, eh), torch.nn.ReLU(),
                                      torch.nn.Linear(eh, d * d))
        self.conv = pyg_nn.NNConv(d, d, edge_nn, aggr="mean", root_weight=True, bias=True)
        self.gru = torch.nn.GRU(d, d)
        self.readout = torch.nn.Sequential(torch.nn.Linear(d, rh), torch.nn.ReLU(),
                                           torch.nn.Linear(rh, 1))

    def forward(self, x, edge_index, edge_attr, batch, num_graphs):
        out = torch.relu(self.lin0(x))
        h = out.unsqueeze(0)
        for _ in range(self.steps):
            m = torch.relu(self.conv(out, edge_index, edge_attr))
            out, h = self.gru(m.unsqueeze(0), h)
            out = out.squeeze(0)
        return {"out": self.readout(pyg_nn.global_add_pool(out, batch, size=num_graphs))}

    def mpdsl_weights(self):
        d = self.conv.out_channels
        gru = self.gru
        return {
            "W0": lin_t(self.lin0), "b0": a(self.lin0.bias),
            "We1": lin_t(self.conv.nn[0]), "be1": a(self.conv.nn[0].bias),
            "We2": lin_t(self.conv.nn[2]), "be2": a(self.conv.nn[2].bias),
            "W_root": lin_t(self.conv.lin), "b_conv": a(self.conv.bias),
            # torch stacks the gates r, z, n along the rows of weight_ih [3D, in].
            "W_ih": a(gru.weight_ih_l0).T.reshape(d, 3, d), "W_hh": a(gru.weight_hh_l0).T.reshape(d, 3, d),
            "b_ih": a(gru.bias_ih_l0).reshape(3, d), "b_hh": a(gru.bias_hh_l0).reshape(3, d),
            "Wr1": lin_t(self.readout[0]), "br1": a(self.readout[0].bias),
            "Wr2": lin_t(self.readout[2]), "br2": a(self.readout[2].bias),
        }


class GINERef(torch.nn.Module):
    """examples/gine.mp: relu(bn1(GINE1)), bn2(GINE2) as `h`; Linear(global_mean_pool(h)) as `y`."""

    def __init__(self, f, fe, dims):
        super().__init__()
        h, m, c = dims["H"], dims["M"], dims["C"]

        def mlp(i):
            return torch.nn.Sequential(torch.nn.Linear(i, m), torch.nn.ReLU(), torch.nn.Linear(m, h))

        self.conv1 = pyg_nn.GINEConv(mlp(f), train_eps=True, edge_dim=fe)
        self.bn1 = torch.nn.BatchNorm1d(h)
        self.conv2 = pyg_nn.GINEConv(mlp(h), train_eps=True, edge_dim=fe)
        self.bn2 = torch.nn.BatchNorm1d(h)
        self.head = torch.nn.Linear(h, c)

    def forward(self, x, edge_index, edge_attr, batch, num_graphs):
        h1 = torch.relu(self.bn1(self.conv1(x, edge_index, edge_attr)))
        h2 = self.bn2(self.conv2(h1, edge_index, edge_attr))
        return {"h": h2, "y": self.head(pyg_nn.global_mean_pool(h2, batch, size=num_graphs))}

    def mpdsl_weights(self):
        out = {}
        for i, (conv, bn) in enumerate(((self.conv1, self.bn1), (self.conv2, self.bn2)), start=1):
            out.update({
                f"eps{i}": a(conv.eps).reshape(()),
                f"W_e{i}": lin_t(conv.lin), f"b_e{i}": a(conv.lin.bias),
                f"W{i}1": lin_t(conv.nn[0]), f"b{i}1": a(conv.nn[0].bias),
                f"W{i}2": lin_t(conv.nn[2]), f"b{i}2": a(conv.nn[2].bias),
                f"mean{i}": a(bn.running_mean), f"var{i}": a(bn.running_var),
                f"gamma{i}": a(bn.weight), f"beta{i}": a(bn.bias),
            })
        out.update({"W_out": lin_t(self.head), "b_out": a(self.head.bias)})
        return out


class VirtualNodeRef(torch.nn.Module):
    """examples/mpnn_virtual_node.mp, from its header's equations, one module per layer:
        u = h + v[batch];  h = relu(MLP_t((1 + eps_t) u + sum_j relu(u_j + lin_e,t(e_ij))))
        v = relu(MLP'_t(v + sum_{i in g} u_i));  y = Linear(v + sum_{i in g} h_i)."""

    def __init__(self, f, fe, dims):
        super().__init__()
        d, k, layers, c = dims["D"], dims["K"], dims["L"], dims["C"]

        def mlp():
            return torch.nn.Sequential(torch.nn.Linear(d, k), torch.nn.ReLU(), torch.nn.Linear(k, d))

        self.lin_in = torch.nn.Linear(f, d)
        self.v0 = torch.nn.Parameter(torch.zeros(d))
        self.eps = torch.nn.Parameter(torch.zeros(layers))
        self.edge_lins = torch.nn.ModuleList(torch.nn.Linear(fe, d) for _ in range(layers))
        self.mlps = torch.nn.ModuleList(mlp() for _ in range(layers))
        self.vn_mlps = torch.nn.ModuleList(mlp() for _ in range(layers))
        self.out = torch.nn.Linear(d, c)

    def forward(self, x, edge_index, edge_attr, batch, num_graphs):
        src, dst = edge_index
        h = self.lin_in(x)
        v = self.v0.expand(num_graphs, -1)
        for t in range(len(self.mlps)):
            u = h + v[batch]
            messages = torch.relu(u[src] + self.edge_lins[t](edge_attr))
            neighbours = torch.zeros_like(u).index_add_(0, dst, messages)
            h = torch.relu(self.mlps[t]((1 + self.eps[t]) * u + neighbours))
            pooled = u.new_zeros(num_graphs, u.shape[1]).index_add_(0, batch, u)
            v = torch.relu(self.vn_mlps[t](v + pooled))
        pooled = h.new_zeros(num_graphs, h.shape[1]).index_add_(0, batch, h)
        return {"out": self.out(v + pooled)}

    def mpdsl_weights(self):
        def stack(fn, modules):
            return np.stack([fn(m) for m in modules])

        return {
            "W_in": lin_t(self.lin_in), "b_in": a(self.lin_in.bias), "v0": a(self.v0), "eps": a(self.eps),
            "W_e": stack(lin_t, self.edge_lins), "b_e": stack(lambda m: a(m.bias), self.edge_lins),
            "W1": stack(lambda m: lin_t(m[0]), self.mlps), "b1": stack(lambda m: a(m[0].bias), self.mlps),
            "W2": stack(lambda m: lin_t(m[2]), self.mlps), "b2": stack(lambda m: a(m[2].bias), self.mlps),
            "Wv1": stack(lambda m: lin_t(m[0]), self.vn_mlps), "bv1": stack(lambda m: a(m[0].bias), self.vn_mlps),
            "Wv2": stack(lambda m: lin_t(m[2]), self.vn_mlps), "bv2": stack(lambda m: a(m[2].bias), self.vn_mlps),
            "W_out": lin_t(self.out), "b_out": a(self.out.bias),
        }


@dataclass(frozen=True)
class Spec:
    reference: Callable   # (F, Fe, dims) -> torch module
    graph_level: tuple    # names of the per-graph outputs (the rest are per node)


MODELS = {
    "mpnn": Spec(MPNNRef, ("out",)),
    "gine": Spec(GINERef, ("y",)),
    "mpnn_virtual_node": Spec(VirtualNodeRef, ("out",)),
}


@lru_cache(maxsize=None)
def compiled(name: str, dtype: str):
    return mpdsl.compile(EXAMPLES / f"{name}.mp", dtype=dtype)


@lru_cache(maxsize=None)
def reference(name: str, dtype: str, f: int, fe: int, seed: int = 29):
    """(torch module in eval mode, mpdsl weights copied from it)."""
    model = compiled(name, dtype)
    module = build(lambda: MODELS[name].reference(f, fe, model.dims), dtype, seed,
                   running_var=(0.5, 2.0))
    weights = module.mpdsl_weights()
    assert set(weights) == set(model.param_types), "the weight map must cover every parameter"
    return module, weights


def run_reference(module, graph: Graph, dtype: str) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: a(v) for k, v in module(*torch_inputs(graph, dtype)).items()}


def run_mpdsl(name: str, dtype: str, weights, graph: Graph) -> dict[str, np.ndarray]:
    model = compiled(name, dtype)
    model.load_weights(weights)
    return as_outputs(model(graph))


# ------------------------------------------------------------------------------------------------
# Graphs


def member(rng, num_nodes: int, num_edges: int, *, self_loop: bool = False) -> Graph:
    src = rng.integers(0, num_nodes, num_edges)
    dst = rng.integers(0, num_nodes, num_edges)
    if num_edges:  # a parallel copy of the first edge
        src, dst = np.append(src, src[0]), np.append(dst, dst[0])
    if self_loop:
        src, dst = np.append(src, 0), np.append(dst, 0)
    edge_index = np.stack([src, dst]).astype(np.int64).reshape(2, -1)
    return Graph.from_arrays(edge_index, num_nodes, x=rng.standard_normal((num_nodes, F)),
                             edge_attr=rng.standard_normal((edge_index.shape[1], FE)))


def batch_members() -> list[Graph]:
    rng = np.random.default_rng(5)
    return [member(rng, 9, 30, self_loop=True),   # multi-edges, a self loop, likely isolated nodes
            member(rng, 1, 0),                    # a single node
            member(rng, 6, 0),                    # no edges
            member(rng, 1, 0, self_loop=True),    # a single node with a self loop
            member(rng, 12, 25)]


@lru_cache(maxsize=None)
def zoo_graph(kind: str) -> Graph:
    if kind == "single":
        return member(np.random.default_rng(3), 15, 45, self_loop=True)
    batched = Graph.batch(batch_members())
    if kind == "batched":
        return batched
    assert kind == "batched-shuffled"  # same graphs, edges in a random order across members
    perm = np.random.default_rng(11).permutation(batched.num_edges)
    return Graph.from_arrays(batched.edge_index[:, perm], batched.num_nodes, x=batched["x"],
                             edge_attr=batched["edge_attr"][perm], batch=batched["batch"])


GRAPHS = ("single", "batched", "batched-shuffled")


# ------------------------------------------------------------------------------------------------
# Tests


def test_reference_layouts():
    """The torch/PyG parameter layouts the weight copying relies on."""
    conv = pyg_nn.NNConv(4, 4, torch.nn.Linear(2, 16), aggr="mean")
    assert {n for n, _ in conv.named_parameters()} == {"lin.weight", "bias", "nn.weight", "nn.bias"}
    assert conv.lin.bias is None
    gine = pyg_nn.GINEConv(torch.nn.Sequential(torch.nn.Linear(4, 8)), train_eps=True, edge_dim=3)
    assert gine.lin.weight.shape == (4, 3) and gine.lin.bias is not None
    assert {n for n, _ in gine.named_parameters()} == {"eps", "nn.0.weight", "nn.0.bias",
                                                       "lin.weight", "lin.bias"}
    gru = torch.nn.GRU(4, 4)
    assert gru.weight_ih_l0.shape == (12, 4) and gru.bias_hh_l0.shape == (12,)


def test_gru_update_is_gru_cell():
    """The GRU of the PyG QM9 example, run one step at a time, is torch.nn.GRUCell (the prelude's
    gru_cell) with the same weights."""
    gru = torch.nn.GRU(4, 4).double()
    cell = torch.nn.GRUCell(4, 4).double()
    cell.load_state_dict({k[:-3]: v for k, v in gru.state_dict().items()})
    x, h = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    out, _ = gru(x.unsqueeze(0), h.unsqueeze(0))
    torch.testing.assert_close(out.squeeze(0), cell(x, h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("graph_kind", GRAPHS)
@pytest.mark.parametrize("name", list(MODELS))
def test_model_matches_reference(name, graph_kind, dtype):
    graph = zoo_graph(graph_kind)
    module, weights = reference(name, dtype, F, FE)
    want = run_reference(module, graph, dtype)
    what = f"examples/{name}.mp on {graph_kind} ({dtype})"
    assert_nontrivial(want, what, single_row_ok=True)  # one graph: graph-level outputs have one row
    for out in MODELS[name].graph_level:
        assert want[out].shape[0] == graph.num_graphs
    got = run_mpdsl(name, dtype, weights, graph)
    assert_close(got, want, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_perturbing_any_weight_breaks_the_match(name, dtype):
    """Every copied parameter matters, so the comparison above is able to fail."""
    graph = zoo_graph("batched")
    module, weights = reference(name, dtype, F, FE)
    want = run_reference(module, graph, dtype)
    assert_perturbations_detected(compiled(name, dtype), weights, graph, want, dtype, name)


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_outputs_equal_each_graph_alone(name):
    """One row per graph, and row g of the batched run (unbatch_graphs) equals the model run on
    member g alone; per-node outputs split by unbatch_nodes likewise."""
    dtype = "float64"
    members = batch_members()
    batched = Graph.batch(members)
    _, weights = reference(name, dtype, F, FE)
    got = run_mpdsl(name, dtype, weights, batched)
    for out, value in got.items():
        per_graph = out in MODELS[name].graph_level
        parts = batched.unbatch_graphs(value) if per_graph else batched.unbatch_nodes(value)
        assert len(parts) == len(members) == batched.num_graphs
        for index, (part, alone) in enumerate(zip(parts, members)):
            single = run_mpdsl(name, dtype, weights, alone)[out]
            if per_graph:
                assert single.shape[0] == 1
                single = single[0]
            np.testing.assert_allclose(part, single, rtol=1e-12, atol=1e-12,
                                       err_msg=f"{name}/{out}: graph {index} of the batch")


@st.composite
def batch_with_edge_attr(draw):
    graph = draw(batched_graphs(max_graphs=4, max_nodes=7, max_edges=16, features=F,
                                empty_members=True))
    seed = draw(st.integers(0, 2**32 - 1), label="edge_attr seed")
    edge_attr = np.random.default_rng(seed).standard_normal((graph.num_edges, FE))
    return graph.with_data(edge_attr=edge_attr)


@pytest.mark.parametrize("name", list(MODELS))
@given(graph=batch_with_edge_attr())
def test_matches_reference_on_random_batches(name, graph):
    dtype = "float64"
    module, weights = reference(name, dtype, F, FE)
    want = run_reference(module, graph, dtype)
    for out in MODELS[name].graph_level:
        assert want[out].shape[0] == graph.num_graphs
    assert_close(run_mpdsl(name, dtype, weights, graph), want, dtype, f"{name} on {graph}")


def test_per_edge_matmul_on_a_graph_without_edges():
    """`h[src] @ A` with a per-edge matrix A (examples/mpnn.mp's message) on a graph with no
    edges: zero rows must give an empty product, and the aggregation zeros (a regression test:
    the NumPy backend once reshaped zero rows with -1 and raised)."""
    graph = Graph.from_arrays(np.zeros((2, 0), dtype=np.int64), 2, x=np.ones((2, 3)),
                              edge_w=np.zeros((0, 3, 3)))
    source = "model m(x: node[D], edge_w: edge[D, D]) -> node[D] { return sum(x[src] @ edge_w) by dst }"
    np.testing.assert_array_equal(mpdsl.compile(source, dtype="float64")(graph), np.zeros((2, 3)))
