"""The relational example models against PyTorch Geometric, with the same weights.

* ``examples/rgcn.mp``       vs two ``RGCNConv(aggr="mean")`` and two ``FastRGCNConv``;
* ``examples/rgcn_basis.mp`` vs the same with ``num_bases=B`` (``comp`` [R, B], ``weight`` [B, in, out]);
* ``examples/rgat.mp``       vs two ``RGATConv`` with the defaults (across-relation, additive
  self-attention, dim=1, mod=None), heads concatenated in layer 1, averaged in layer 2;
* ``examples/hgt.mp``        vs PyG's HGT stack: a per-node-type ``Linear`` + relu, two ``HGTConv``
  and a ``Linear``, run on a ``HeteroData`` built from the homogeneous arrays, whose per-type
  outputs are mapped back to the homogeneous node order.

Each PyG module gets seeded non-zero parameters (biases, skips and relation priors included),
which are copied into the mpdsl model; the outputs agree to rtol 1e-10 in float64 and 1e-5 in
float32 (atol scaled by the output's magnitude), and perturbing any one copied parameter breaks
the agreement.

Graphs: seeded random relational multigraphs whose node types fix each relation's source and
target type (as a heterogeneous graph needs), with isolated nodes, repeated edges, self loops, a
relation without edges (its target type then receives no messages at all), nodes whose in-edges
all have one relation beside nodes that mix relations; plus hypothesis-drawn graphs (empty,
edgeless, hubs, chains, stars, loops, parallel edges) with drawn node and edge types.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pyg_nn = pytest.importorskip("torch_geometric.nn")
pyg_data = pytest.importorskip("torch_geometric.data")

import mpdsl  # noqa: E402
from mpdsl.graph import Graph  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from comparison import DTYPES, a, assert_close, build, compare, is_close, lin_t  # noqa: E402
from comparison import one_torch_thread  # noqa: E402, F401  (autouse: torch on one thread here)
from strategies import graphs  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# ------------------------------------------------------------------------------------------------
# Graphs


@dataclass(frozen=True)
class RelGraph:
    """A typed graph: int64 edge_index [2, E], edge_type [E] in [0, R), node_type [N] in [0, T),
    float64 x [N, F]; relation r joins nodes of type ``relations[r][0]`` to ``relations[r][1]``."""

    name: str
    edge_index: np.ndarray
    edge_type: np.ndarray
    node_type: np.ndarray
    x: np.ndarray
    relations: tuple[tuple[int, int], ...]
    num_node_types: int

    @property
    def num_nodes(self) -> int:
        return len(self.x)

    def mpdsl_graph(self, dtype: str) -> Graph:
        return Graph.from_arrays(self.edge_index, self.num_nodes, x=self.x.astype(dtype),
                                 edge_type=self.edge_type, node_type=self.node_type)

    def torch_inputs(self, dtype: str):
        return (torch.from_numpy(self.x.astype(dtype)), torch.from_numpy(self.edge_index),
                torch.from_numpy(self.edge_type))

    # The heterogeneous view, for HGTConv. Type t's nodes keep their homogeneous order.
    def node_type_names(self) -> list[str]:
        return [f"n{t}" for t in range(self.num_node_types)]

    def edge_type_triples(self) -> list[tuple[str, str, str]]:
        return [(f"n{s}", f"r{r}", f"n{d}") for r, (s, d) in enumerate(self.relations)]

    def metadata(self):
        return self.node_type_names(), self.edge_type_triples()

    def hetero_data(self, dtype: str):
        """A HeteroData with every node type (possibly without nodes) and every relation (possibly
        without edges), inserted in relation order: HGTConv numbers k_rel / v_rel types by
        metadata order and assumes edge_index_dict follows it."""
        ends = np.array(self.relations, dtype=np.int64).reshape(-1, 2)  # [R, 2]: source, target type
        assert (self.node_type[self.edge_index] == ends[self.edge_type].T).all(), "relation/type clash"
        local = np.zeros(self.num_nodes, dtype=np.int64)
        for t in range(self.num_node_types):
            members = self.node_type == t
            local[members] = np.arange(members.sum())
        data = pyg_data.HeteroData()
        for t, name in enumerate(self.node_type_names()):
            data[name].x = torch.from_numpy(self.x[self.node_type == t].astype(dtype))
        for r, triple in enumerate(self.edge_type_triples()):
            edges = self.edge_index[:, self.edge_type == r]
            data[triple].edge_index = torch.from_numpy(np.ascontiguousarray(local[edges]))
        return data

    def gather_types(self, out_dict: dict, width: int, dtype: str) -> np.ndarray:
        """Per-type outputs back in homogeneous node order."""
        out = np.full((self.num_nodes, width), np.nan, dtype=dtype)
        for t, name in enumerate(self.node_type_names()):
            out[self.node_type == t] = out_dict[name].detach().numpy()
        assert not np.isnan(out).any()
        return out


# Relations of the seeded graphs, (source type, target type): type-1 targets mix relations 0 and 1
# (relation 1 has self loops), type-0 targets only ever see relation 2, relation 3 has no edges,
# so type 2 receives no message at all (it is still a target type for HGTConv).
RELATIONS = ((0, 1), (1, 1), (2, 0), (0, 2))
NUM_NODE_TYPES = 3


def _relational_multigraph(seed: int, num_nodes: int = 36, features: int = 5) -> RelGraph:
    rng = np.random.default_rng(seed)
    node_type = rng.permutation(np.arange(num_nodes) % NUM_NODE_TYPES).astype(np.int64)
    isolated = np.concatenate([np.flatnonzero(node_type == t)[:1] for t in range(NUM_NODE_TYPES)])
    usable = np.setdiff1d(np.arange(num_nodes), isolated)
    src, dst, etype = [], [], []
    for r, (s, d) in enumerate(RELATIONS[:3]):
        sources = usable[node_type[usable] == s]
        targets = usable[node_type[usable] == d]
        count = 30 + 10 * r
        src.append(rng.choice(sources, count))
        dst.append(rng.choice(targets, count))
        etype.append(np.full(count, r))
    # Type-1 node with in-edges of relation 0 only; explicit self loops in relation 1.
    ones = usable[node_type[usable] == 1]
    only_r0 = ones[0]
    keep = [~((d == only_r0) & (e == 1)) for d, e in zip(dst, etype)]
    src, dst, etype = ([part[k] for part, k in zip(arr, keep)] for arr in (src, dst, etype))
    src.append(ones[1:4])
    dst.append(ones[1:4])
    etype.append(np.full(3, 1))
    src, dst, etype = np.concatenate(src), np.concatenate(dst), np.concatenate(etype)
    repeat = rng.integers(0, len(src), 12)                # parallel edges, some three times
    src = np.concatenate([src, src[repeat], src[repeat[:4]]])
    dst = np.concatenate([dst, dst[repeat], dst[repeat[:4]]])
    etype = np.concatenate([etype, etype[repeat], etype[repeat[:4]]])
    order = rng.permutation(len(src))
    edge_index = np.stack([src[order], dst[order]]).astype(np.int64)
    edge_type = etype[order].astype(np.int64)

    # The awkward cases are really there.
    in_deg = np.bincount(edge_index[1], minlength=num_nodes)
    out_deg = np.bincount(edge_index[0], minlength=num_nodes)
    assert (in_deg[isolated] == 0).all() and (out_deg[isolated] == 0).all()
    assert not (edge_type == 3).any() and in_deg[node_type == 2].sum() == 0
    relations_at = [set(edge_type[edge_index[1] == v]) for v in range(num_nodes)]
    assert relations_at[only_r0] == {0}
    assert any(len(rs) >= 2 for rs in relations_at)
    assert (edge_index[0] == edge_index[1]).any()
    assert np.unique(np.vstack([edge_index, edge_type]), axis=1).shape[1] < edge_index.shape[1]
    x = rng.standard_normal((num_nodes, features))
    return RelGraph(f"relational-{seed}", edge_index, edge_type, node_type, x, RELATIONS,
                    NUM_NODE_TYPES)


@lru_cache(maxsize=None)
def relational_graph(seed: int) -> RelGraph:
    return _relational_multigraph(seed)


SEEDS = (7, 11)


# ------------------------------------------------------------------------------------------------
# The PyG stacks, each with the forward of its example and its weights under the example's names


class _TwoRelationalConvs(torch.nn.Module):
    """conv2(relu(conv1(x))), each conv called as conv(x, edge_index, edge_type)."""

    def forward(self, g: RelGraph, dtype: str) -> np.ndarray:
        x, edge_index, edge_type = g.torch_inputs(dtype)
        h = torch.relu(self.conv1(x, edge_index, edge_type))
        return self.conv2(h, edge_index, edge_type).detach().numpy()


class RGCNStack(_TwoRelationalConvs):
    """examples/rgcn.mp (or rgcn_basis.mp with num_bases): relu(conv(x)), conv."""

    def __init__(self, conv_cls, f: int, dims: dict, num_bases: int | None = None,
                 aggr: str = "mean"):
        super().__init__()
        r, h, c = dims["R"], dims["H"], dims["C"]
        self.conv1 = conv_cls(f, h, r, num_bases=num_bases, aggr=aggr)
        self.conv2 = conv_cls(h, c, r, num_bases=num_bases, aggr=aggr)

    def mpdsl_weights(self) -> dict[str, np.ndarray]:
        out = {}
        for i, conv in ((1, self.conv1), (2, self.conv2)):
            if conv.num_bases is None:
                out[f"W{i}"] = a(conv.weight)                   # [R, in, out]: x_j @ weight[r]
            else:
                out[f"a{i}"] = a(conv.comp)                     # [R, B]
                out[f"V{i}"] = a(conv.weight)                   # [B, in, out]
            out[f"root{i}"] = a(conv.root)                      # [in, out]: x_i @ root
            out[f"b{i}"] = a(conv.bias)
        return out


class RGATStack(_TwoRelationalConvs):
    """examples/rgat.mp: relu(RGATConv(concat=True)), RGATConv(concat=False)."""

    def __init__(self, f: int, dims: dict):
        super().__init__()
        r, heads, hid, c = dims["R"], dims["HEADS"], dims["HID"], dims["C"]
        self.conv1 = pyg_nn.RGATConv(f, hid, r, heads=heads, concat=True)
        self.conv2 = pyg_nn.RGATConv(heads * hid, c, r, heads=heads, concat=False)

    def mpdsl_weights(self) -> dict[str, np.ndarray]:
        out = {}
        for i, conv in ((1, self.conv1), (2, self.conv2)):
            w = a(conv.weight)                                  # [R, in, heads * out]
            out[f"W{i}"] = w.reshape(w.shape[0], w.shape[1], conv.heads, conv.out_channels)
            out[f"q{i}"] = a(conv.q)                            # [heads * out, heads]
            out[f"k{i}"] = a(conv.k)
            out[f"b{i}"] = a(conv.bias)
        return out


class HGTStack(torch.nn.Module):
    """examples/hgt.mp, as PyG's HGT example: per-type Linear + relu, two HGTConv, Linear."""

    def __init__(self, f: int, dims: dict, metadata):
        super().__init__()
        hidden = dims["HEADS"] * dims["DH"]
        self.heads = dims["HEADS"]
        self.node_types, self.edge_types = metadata
        # HGTConv returns only target types: every node type must be the target of some relation.
        assert set(self.node_types) == {dst for _, _, dst in self.edge_types}
        self.lin_in = torch.nn.ModuleDict({t: torch.nn.Linear(f, hidden) for t in self.node_types})
        self.convs = torch.nn.ModuleList(
            pyg_nn.HGTConv(hidden, hidden, metadata, heads=self.heads) for _ in range(2))
        self.lin_out = torch.nn.Linear(hidden, dims["C"])

    def forward(self, g: RelGraph, dtype: str) -> np.ndarray:
        data = g.hetero_data(dtype)
        x_dict = {t: torch.relu(self.lin_in[t](x)) for t, x in data.x_dict.items()}
        for conv in self.convs:
            x_dict = conv(x_dict, data.edge_index_dict)
        out = {t: self.lin_out(x) for t, x in x_dict.items()}
        return g.gather_types(out, self.lin_out.out_features, dtype)

    def mpdsl_weights(self) -> dict[str, np.ndarray]:
        stack = np.stack  # over node types (in type order) or relations (in relation order)
        types = self.node_types
        out = {"W_in": stack([lin_t(self.lin_in[t]) for t in types]),
               "b_in": stack([a(self.lin_in[t].bias) for t in types]),
               "W_out": lin_t(self.lin_out), "b_out": a(self.lin_out.bias)}
        for i, conv in enumerate(self.convs, 1):
            heads, width = conv.heads, conv.out_channels
            d, num_rel = width // heads, len(self.edge_types)
            kqv = [conv.kqv_lin.lins[t] for t in types]          # Linear(in, 3 * width): K | Q | V
            out[f"W_kqv{i}"] = stack([a(lin.weight).T.reshape(-1, 3, heads, d) for lin in kqv])
            out[f"b_kqv{i}"] = stack([a(lin.bias).reshape(3, heads, d) for lin in kqv])
            # HeteroLinear type h * num_rel + r holds head h of relation r; x @ weight[type].
            for mp_name, lin in (("W_att", conv.k_rel), ("W_msg", conv.v_rel)):
                w = a(lin.weight).reshape(heads, num_rel, d, d)
                out[f"{mp_name}{i}"] = w.transpose(1, 0, 2, 3).copy()
            out[f"mu{i}"] = stack([a(conv.p_rel["__".join(e)]).reshape(heads) for e in self.edge_types])
            out[f"W_a{i}"] = stack([lin_t(conv.out_lin.lins[t]) for t in types])
            out[f"b_a{i}"] = stack([a(conv.out_lin.lins[t].bias) for t in types])
            out[f"skip{i}"] = stack([a(conv.skip[t]).reshape(()) for t in types])
        return out


def _stack(example: str, g: RelGraph, dtype: str, seed: int, dims: dict, variant: str = ""):
    f = g.x.shape[1]
    if example == "rgcn":
        cls = pyg_nn.FastRGCNConv if variant == "fast" else pyg_nn.RGCNConv
        factory = lambda: RGCNStack(cls, f, dims)  # noqa: E731
    elif example == "rgcn_basis":
        cls = pyg_nn.FastRGCNConv if variant == "fast" else pyg_nn.RGCNConv
        factory = lambda: RGCNStack(cls, f, dims, num_bases=dims["B"])  # noqa: E731
    elif example == "rgat":
        factory = lambda: RGATStack(f, dims)  # noqa: E731
    else:
        factory = lambda: HGTStack(f, dims, g.metadata())  # noqa: E731
    return build(factory, dtype, seed)


@lru_cache(maxsize=None)
def compiled(example: str, dtype: str, dims: tuple = ()):
    return mpdsl.compile(EXAMPLES / f"{example}.mp", dtype=dtype, dims=dict(dims))


CASES = [("rgcn", ""), ("rgcn", "fast"), ("rgcn_basis", ""), ("rgcn_basis", "fast"),
         ("rgat", ""), ("hgt", "")]
CASE_IDS = ["rgcn-RGCNConv", "rgcn-FastRGCNConv", "rgcn_basis-RGCNConv",
            "rgcn_basis-FastRGCNConv", "rgat-RGATConv", "hgt-HGTConv"]


# ------------------------------------------------------------------------------------------------
# Tests


def test_pyg_layer_structure():
    """The PyG 2.8 parameter layouts the weight copying relies on."""
    names = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert names(pyg_nn.RGCNConv(5, 3, 4)) == {"weight": (4, 5, 3), "root": (5, 3), "bias": (3,)}
    assert names(pyg_nn.RGCNConv(5, 3, 4, num_bases=2)) == {
        "weight": (2, 5, 3), "comp": (4, 2), "root": (5, 3), "bias": (3,)}
    assert names(pyg_nn.RGATConv(5, 3, 4, heads=2)) == {
        "q": (6, 2), "k": (6, 2), "bias": (6,), "weight": (4, 5, 6),
        "w": (3,), "l1": (1, 3), "b1": (1, 3), "l2": (3, 3), "b2": (1, 3)}
    assert names(pyg_nn.RGATConv(5, 3, 4, heads=2, concat=False))["bias"] == (3,)
    g = relational_graph(SEEDS[0])
    hgt = pyg_nn.HGTConv(16, 16, g.metadata(), heads=2)
    expected = {"k_rel.weight": (8, 8, 8), "v_rel.weight": (8, 8, 8)}
    for t in g.node_type_names():
        expected.update({f"kqv_lin.lins.{t}.weight": (48, 16), f"kqv_lin.lins.{t}.bias": (48,),
                         f"out_lin.lins.{t}.weight": (16, 16), f"out_lin.lins.{t}.bias": (16,),
                         f"skip.{t}": (1,)})
    for e in g.edge_type_triples():
        expected[f"p_rel.{'__'.join(e)}"] = (1, 2)
    assert names(hgt) == expected
    assert hgt.k_rel.bias is None and hgt.v_rel.bias is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("example, variant", CASES, ids=CASE_IDS)
def test_example_matches_pyg(example, variant, seed, dtype):
    g = relational_graph(seed)
    model = compiled(example, dtype)
    stack = _stack(example, g, dtype, seed=seed + 100, dims=model.dims, variant=variant)
    want = stack(g, dtype)
    assert want.dtype == np.dtype(dtype)
    weights = stack.mpdsl_weights()
    assert set(weights) == set(model.param_types), "the weight map must cover every parameter"
    what = f"examples/{example}.mp vs {CASE_IDS[CASES.index((example, variant))]} on {g.name} ({dtype})"
    # Perturbations are checked once per example and dtype, to keep the file fast.
    compare(model, weights, g.mpdsl_graph(dtype), want, dtype, what, perturb=seed == SEEDS[0])


def test_rgcn_normalises_per_relation():
    """The 1 / c_ir normalisation is pinned down: with the same weights, RGCNConv(aggr="add")
    (no normalisation) differs from examples/rgcn.mp, which equals RGCNConv(aggr="mean")."""
    g = relational_graph(SEEDS[0])
    model = compiled("rgcn", "float64")
    stack = _stack("rgcn", g, "float64", seed=3, dims=model.dims)
    model.load_weights(stack.mpdsl_weights())
    got = model(g.mpdsl_graph("float64"))
    assert_close(got, stack(g, "float64"), "float64", "rgcn")
    summed = build(lambda: RGCNStack(pyg_nn.RGCNConv, g.x.shape[1], model.dims, aggr="add"),
                   "float64", seed=3)
    summed.load_state_dict(stack.state_dict())
    assert not is_close(got, summed(g, "float64"), "float64"), "aggr='add' should differ"


def test_rgat_mod_parameters_are_unused_by_default():
    """RGATConv's w, l1, b1, l2, b2 serve only the cardinality-preserving `mod` options; with the
    default mod=None they do not affect the output, which is why examples/rgat.mp has no such
    parameters."""
    g = relational_graph(SEEDS[0])
    model = compiled("rgat", "float64")
    stack = _stack("rgat", g, "float64", seed=5, dims=model.dims)
    want = stack(g, "float64")
    with torch.no_grad():
        for conv in (stack.conv1, stack.conv2):
            for p in (conv.w, conv.l1, conv.b1, conv.l2, conv.b2):
                p.add_(1.0)
    np.testing.assert_array_equal(stack(g, "float64"), want)


def test_hgt_relation_order_matters():
    """The mapping of k_rel / v_rel types (head h of relation r is type h * R + r) is pinned: the
    same weights with W_att's relations permuted disagree with HGTConv."""
    g = relational_graph(SEEDS[0])
    model = compiled("hgt", "float64")
    stack = _stack("hgt", g, "float64", seed=9, dims=model.dims)
    want = stack(g, "float64")
    weights = stack.mpdsl_weights()
    model.load_weights(weights)
    assert_close(model(g.mpdsl_graph("float64")), want, "float64", "hgt")
    for name in ("W_att1", "W_msg1"):
        swapped = dict(weights)
        swapped[name] = weights[name][[1, 0, 2, 3]]  # relations 0 and 1 share a target type
        model.load_weights(swapped)
        assert not is_close(model(g.mpdsl_graph("float64")), want, "float64"), name
        heads_swapped = dict(weights)
        heads_swapped[name] = weights[name][:, ::-1].copy()
        model.load_weights(heads_swapped)
        assert not is_close(model(g.mpdsl_graph("float64")), want, "float64"), name
    model.load_weights(weights)


# Hypothesis: drawn graphs with drawn node types; relations are (source type, target type, bit)
# so that they are consistent with the node types, two relations per pair of node types.
HYPO_T = 2
HYPO_RELATIONS = tuple((s, d) for s in range(HYPO_T) for d in range(HYPO_T) for _ in range(2))
HYPO_DIMS = {"rgcn": {"R": 8}, "rgcn_basis": {"R": 8}, "rgat": {"R": 8}, "hgt": {"R": 8, "T": HYPO_T}}
assert len(HYPO_RELATIONS) == 8


@given(graph=graphs(max_nodes=24, max_edges=80, features=(1, 5)),
       type_seed=st.integers(0, 2**32 - 1),
       example=st.sampled_from(["rgcn", "rgcn_basis", "rgat", "hgt"]),
       fast=st.booleans())
def test_examples_match_pyg_on_random_graphs(graph, type_seed, example, fast):
    rng = np.random.default_rng(type_seed)
    n = graph.num_nodes
    node_type = rng.integers(0, HYPO_T, n).astype(np.int64)
    src, dst = np.asarray(graph.src), np.asarray(graph.dst)
    bit = rng.integers(0, 2, len(src))
    edge_type = ((node_type[src] * HYPO_T + node_type[dst]) * 2 + bit).astype(np.int64)
    g = RelGraph("drawn", np.array(graph.edge_index, dtype=np.int64), edge_type, node_type,
                 np.array(graph["x"], dtype=np.float64), HYPO_RELATIONS, HYPO_T)
    dtype = "float64"
    model = compiled(example, dtype, tuple(sorted(HYPO_DIMS[example].items())))
    stack = _stack(example, g, dtype, seed=type_seed % 1000, dims=model.dims,
                   variant="fast" if fast else "")
    want = stack(g, dtype)
    model.load_weights(stack.mpdsl_weights())
    got = model(graph.with_data(edge_type=edge_type, node_type=node_type))
    assert_close(got, want, dtype, f"{example} on a drawn graph ({n} nodes, {len(src)} edges)")



@pytest.mark.parametrize("num_nodes", [4, 0])
@pytest.mark.parametrize("example", ["rgcn", "rgcn_basis", "rgat", "hgt"])
def test_example_without_edges(example, num_nodes):
    """No edges (or no nodes either): every aggregation is empty, as in PyG (for HGT the
    attention output is 0, so each node gets the gated out_lin bias plus its skip)."""
    rng = np.random.default_rng(num_nodes)
    node_type = np.arange(num_nodes, dtype=np.int64) % NUM_NODE_TYPES
    g = RelGraph("edgeless", np.zeros((2, 0), dtype=np.int64), np.zeros(0, dtype=np.int64),
                 node_type, rng.standard_normal((num_nodes, 3)), RELATIONS, NUM_NODE_TYPES)
    model = compiled(example, "float64")
    stack = _stack(example, g, "float64", seed=13, dims=model.dims)
    want = stack(g, "float64")
    got = model.load_weights(stack.mpdsl_weights())(g.mpdsl_graph("float64"))
    assert_close(got, want, "float64", f"{example} on a graph with {num_nodes} nodes, no edges")
