"""Global attention among the nodes of each graph (``global_attention(q, k, v) by graph``).

* The op against a dense NumPy softmax written per graph (and its gradient against torch autograd of
  the same dense form), float64 rtol 1e-10, on hypothesis batches: graph sizes 0..n (graph ids without
  nodes, single-node graphs), one big graph of several kernel blocks, batch ids in node order or
  shuffled (the nodes of a graph need not be contiguous), the empty batch; several heads and widths.
* The fused backward passes (``global_attention_query_grad``, ``global_attention_key_grad``) equal
  their unfused definitions (global attentions of wider per-node values) on hypothesis batches.
* The Triton kernels, in the interpreter, equal the NumPy backend: forward and gradient in float32 and
  float64, and float16 within the precision contract.
* ``examples/gps.mp`` equals a PyG stack of ``GPSConv(C, GINEConv(nn), heads=H,
  attn_type="multihead")`` layers with the same weights (batch norm in eval mode with random running
  statistics) on a batch of graphs of different sizes with edge features, one of a single node and one
  of more than a kernel block: outputs float64 rtol 1e-10, every copied weight matters; the gradients
  of every parameter and input through the compiled torch module equal PyG's, rtol 1e-8.
* Training programs save the attention's log-sum-exp with its output (no recomputation of the scores
  in the backward); the plan counts the sum of squared graph sizes; bad uses get located diagnostics.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

import mpdsl  # noqa: E402
from diagnostic_checks import assert_located  # noqa: E402
from mpdsl import syntax, typecheck  # noqa: E402
from mpdsl.autodiff import GradBuilder, grad_program  # noqa: E402
from mpdsl.backends import get_backend  # noqa: E402
from mpdsl.ir import Program, make_value, verify  # noqa: E402
from mpdsl.ops import OPS  # noqa: E402
from mpdsl.plan import graph_pairs, program_costs  # noqa: E402
from mpdsl.types import Dim, Domain, TensorType  # noqa: E402

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
NUMPY = get_backend("numpy")
BACKWARD = ("global_attention_query_grad", "global_attention_key_grad")
SOURCE = """
dim H = 2
dim K = 3
dim D = 4
model m(q: node[H, K], k: node[H, K], v: node[H, D]) -> node[H, D] {
    return global_attention(q, k, v{scale}) by graph
}
"""


@functools.lru_cache(maxsize=None)
def attention_model(heads: int, keys: int, width: int, scale: float | None, dtype: str = "float64"):
    text = SOURCE.replace("{scale}", "" if scale is None else f", scale={scale!r}")
    return mpdsl.compile(text, dtype=dtype, dims={"H": heads, "K": keys, "D": width})


def batch_graph(sizes: list[int], shuffle: bool, seed: int) -> mpdsl.Graph:
    """A batch of graphs of ``sizes`` nodes (no edges: global attention reads none), its batch ids in
    node order or shuffled; a size 0 is a graph id without nodes (a trailing one cannot be recorded)."""
    batch = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    if shuffle:
        np.random.default_rng(seed).shuffle(batch)
    return mpdsl.Graph.from_arrays(np.zeros((2, 0), np.int64), len(batch), batch=batch)


def dense_attention(q, k, v, batch, scale):
    """(out, lse) per node and head: the softmax of each graph's full n x n scores (the reference)."""
    out = np.zeros(v.shape)
    lse = np.zeros(q.shape[:2])
    for g in np.unique(batch):
        nodes = np.flatnonzero(batch == g)
        scores = np.einsum("ihc,jhc->hij", q[nodes], k[nodes]) * scale
        top = scores.max(-1, keepdims=True)
        weights = np.exp(scores - top)
        total = weights.sum(-1, keepdims=True)
        out[nodes] = np.einsum("hij,jhd->ihd", weights / total, v[nodes])
        lse[nodes] = (top + np.log(total))[..., 0].T
    return out, lse


def dense_gradients(q, k, v, batch, scale, cotangent):
    """d <cotangent, out> / d (q, k, v) by torch autograd of the dense per-graph softmax."""
    tensors = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
    tq, tk, tv = tensors
    total = torch.zeros((), dtype=torch.float64)
    for g in np.unique(batch):
        nodes = torch.from_numpy(np.flatnonzero(batch == g))
        weights = torch.softmax(torch.einsum("ihc,jhc->hij", tq[nodes], tk[nodes]) * scale, -1)
        out = torch.einsum("hij,jhd->ihd", weights, tv[nodes])
        total = total + (out * torch.from_numpy(cotangent[nodes.numpy()])).sum()
    if total.requires_grad:
        total.backward()
    return [np.zeros_like(a) if t.grad is None else t.grad.numpy() for a, t in zip((q, k, v), tensors)]


def assert_close(got, want, what: str, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    """``got`` equals ``want`` to ``rtol``, and to ``atol`` times the largest |want| (at least 1)."""
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=what)


@st.composite
def layouts(draw):
    """(graph sizes, shuffled ids?, heads, K, D, scale or None, seed): sizes 0..12 and sometimes one
    graph of more than one or two CPU kernel blocks (64 nodes)."""
    sizes = draw(st.lists(st.integers(0, 12), min_size=0, max_size=6), label="sizes")
    big = draw(st.sampled_from([0, 0, 65, 140]), label="big graph")
    if big:
        sizes.insert(draw(st.integers(0, len(sizes)), label="big at"), big)
    while sizes and sizes[-1] == 0:  # a batch vector cannot record a trailing empty graph
        sizes.pop()
    return (sizes, draw(st.booleans(), label="shuffled"), draw(st.integers(1, 3), label="heads"),
            draw(st.integers(1, 5), label="K"), draw(st.integers(1, 4), label="D"),
            draw(st.sampled_from([None, 0.3, -1.2]), label="scale"), draw(st.integers(0, 2**32 - 1), label="seed"))


def random_operands(n: int, heads: int, keys: int, width: int, seed: int, spread: float = 1.5):
    rng = np.random.default_rng(seed)
    return (spread * rng.normal(size=(n, heads, keys)), spread * rng.normal(size=(n, heads, keys)),
            rng.normal(size=(n, heads, width)), rng.normal(size=(n, heads, width)))


# ---- the op against the dense softmax -----------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(layout=layouts())
def test_global_attention_and_its_gradient_equal_the_dense_softmax_per_graph(layout):
    sizes, shuffled, heads, keys, width, scale, seed = layout
    graph = batch_graph(sizes, shuffled, seed)
    model = attention_model(heads, keys, width, scale)
    q, k, v, cotangent = random_operands(graph.num_nodes, heads, keys, width, seed)
    used = 1 / np.sqrt(keys) if scale is None else scale
    assert model.ir.values[3].attr["scale"] == used
    want, _ = dense_attention(q, k, v, graph.batch, used)
    assert_close(model.run(graph, q=q, k=k, v=v)['out'], want, "attention")
    gradient = grad_program(model.ir, inputs=["q", "k", "v"])
    assert set(BACKWARD) <= {x.op for x in gradient.values}
    got = NUMPY.run(gradient, graph, {"q": q, "k": k, "v": v, "d_out": cotangent}, {}, {})
    for name, expected in zip("qkv", dense_gradients(q, k, v, graph.batch, used, cotangent)):
        assert_close(got[f"d_{name}"], expected, f"d_{name}", rtol=1e-9)


def test_the_packed_result_holds_the_log_sum_exp_and_a_single_node_attends_to_itself():
    graph = batch_graph([1, 4, 0, 70, 1], True, 3)
    q, k, v, _ = random_operands(graph.num_nodes, 2, 3, 4, 3)
    model = attention_model(2, 3, 4, 0.5)
    packed = model.ir.values[3]
    program = verify(Program("packed", (), model.ir.values[:4], (("out", packed),)))
    got = NUMPY.run(program, graph, {"q": q, "k": k, "v": v}, {}, {})["out"]
    out, lse = dense_attention(q, k, v, graph.batch, 0.5)
    assert_close(got[..., :4], out, "attention")
    assert_close(got[..., 4], lse, "log-sum-exp")
    alone = np.flatnonzero(np.isin(graph.batch, [0, 4]))
    np.testing.assert_array_equal(got[alone, :, :4], v[alone])  # softmax over one node: weight exactly 1
    assert_close(got[alone, :, 4], 0.5 * np.einsum("ihc,ihc->ih", q[alone], k[alone]), "lse of one node")


def test_the_empty_batch_and_heads_without_features():
    empty = batch_graph([], False, 0)
    q, k, v, cotangent = random_operands(0, 2, 3, 4, 0)
    assert attention_model(2, 3, 4, None).run(empty, q=q, k=k, v=v)['out'].shape == (0, 2, 4)
    gradient = grad_program(attention_model(2, 3, 4, None).ir, inputs=["q", "k", "v"])
    got = NUMPY.run(gradient, empty, {"q": q, "k": k, "v": v, "d_out": cotangent}, {}, {})
    assert got["d_q"].shape == (0, 2, 3) and got["d_v"].shape == (0, 2, 4)
    graph = batch_graph([3, 2], False, 0)
    q, k, v, _ = random_operands(5, 2, 0, 3, 1)  # K = 0: every score is 0, a plain mean per graph
    means = np.concatenate([np.repeat(v[:3].mean(0, keepdims=True), 3, 0), np.repeat(v[3:].mean(0, keepdims=True), 2, 0)])
    assert_close(attention_model(2, 0, 3, 1.0).run(graph, q=q, k=k, v=v)['out'], means, "K = 0")


def test_the_result_does_not_depend_on_the_node_order_within_the_batch():
    """Relabelling the nodes (their graph ids with them) relabels the result: ids need not be sorted."""
    graph = batch_graph([5, 1, 70, 3], False, 0)
    q, k, v, _ = random_operands(graph.num_nodes, 2, 3, 4, 5)
    model = attention_model(2, 3, 4, None)
    want = model.run(graph, q=q, k=k, v=v)['out']
    order = np.random.default_rng(1).permutation(graph.num_nodes)
    moved = mpdsl.Graph.from_arrays(np.zeros((2, 0), np.int64), graph.num_nodes, batch=graph.batch[order])
    assert_close(model.run(moved, q=q[order], k=k[order], v=v[order])['out'], want[order], "relabelled")


# ---- the fused backward passes against their unfused definitions -----------------------------------------


def one_op_programs(op: str, heads: int, keys: int, width: int, scale: float) -> tuple[Program, Program]:
    """(the op alone, its unfused definition) as programs of the inputs q, k, v, lse, g, delta."""
    node = [(heads, keys), (heads, keys), (heads, width), (heads,), (heads, width), (heads,)]
    types = [TensorType(Domain.NODE, tuple(Dim(d) for d in shape), "f64") for shape in node]
    inputs = [make_value("input", [], {"name": n}, t) for n, t in zip(("q", "k", "v", "lse", "g", "delta"), types)]
    value = make_value(op, inputs, {"scale": scale}, OPS[op].infer(types, {"scale": scale}))
    builder = GradBuilder("f64")
    builder.like = value
    root = OPS[op].unfused(builder, value)
    assert not {x.op for x in builder.values} & set(BACKWARD), "the definition uses the primitive only"
    return (verify(Program("fused", (), tuple(inputs) + (value,), (("out", value),))),
            verify(Program("unfused", (), tuple(inputs) + tuple(builder.values), (("out", root),))))


@settings(max_examples=25, deadline=None)
@given(layout=layouts(), op=st.sampled_from(BACKWARD))
def test_fused_backward_passes_equal_their_unfused_definitions(layout, op):
    sizes, shuffled, heads, keys, width, scale, seed = layout
    graph = batch_graph(sizes, shuffled, seed)
    scale = 0.7 if scale is None else scale
    q, k, v, g = random_operands(graph.num_nodes, heads, keys, width, seed, spread=1.0)
    rng = np.random.default_rng(seed + 1)
    _, lse = dense_attention(q, k, v, graph.batch, scale)
    arrays = {"q": q, "k": k, "v": v, "g": g, "lse": lse + rng.uniform(-1, 1, lse.shape),  # any lse, not only the true one
              "delta": rng.normal(size=lse.shape)}
    fused, unfused = one_op_programs(op, heads, keys, width, scale)
    want = NUMPY.run(unfused, graph, arrays, {}, {})["out"]
    assert_close(NUMPY.run(fused, graph, arrays, {}, {})["out"], want, op, rtol=1e-9)


# ---- Triton in its interpreter against NumPy -----------------------------------------------------------------


@pytest.fixture
def triton_backend():
    pytest.importorskip("triton")
    from mpdsl.backends.triton_backend import TritonBackend

    return TritonBackend(interpret=True, device="cpu", poison=True)


TRITON_LAYOUTS = {"empty": ([], False), "one node": ([1], False), "mixed, shuffled": ([3, 1, 0, 20], True),
                  "one big graph": ([40, 2], False)}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", sorted(TRITON_LAYOUTS))
def test_triton_kernels_equal_numpy_in_the_interpreter(triton_backend, dtype, layout):
    sizes, shuffled = TRITON_LAYOUTS[layout]
    graph = batch_graph(sizes, shuffled, 4)
    model = attention_model(2, 3, 5, None, dtype)
    gradient = grad_program(model.ir, inputs=["q", "k", "v"])
    q, k, v, cotangent = random_operands(graph.num_nodes, 2, 3, 5, 4)
    arrays = {name: a.astype(dtype) for name, a in (("q", q), ("k", k), ("v", v), ("d_out", cotangent))}
    want = NUMPY.run(gradient, graph, arrays, {}, {})
    got = triton_backend.run(gradient, graph, arrays, {}, {})
    launched = " ".join(triton_backend.last_launches)
    for kind in ("global_attention", "global_attention_query_grad", "global_attention_key_grad"):
        assert (f"mpdsl_{kind}_" in launched) == (graph.num_nodes > 0)  # nothing to launch for no nodes
    rtol, atol = (1e-10, 1e-12) if dtype == "float64" else (1e-5, 1e-6)
    for name in want:
        assert got[name].dtype == np.dtype(dtype)
        assert_close(got[name], want[name], f"triton {name}", rtol=rtol, atol=atol)


def test_triton_float16_computes_in_float32(triton_backend):
    """A float16 program stores float16 and computes in float32: within the backend's precision contract of
    the float32 NumPy result on the same float16-rounded data."""
    from mpdsl.autodiff import retype

    graph = batch_graph([3, 1, 30], True, 5)
    model = attention_model(2, 3, 5, None, "float32")
    gradient = grad_program(model.ir, inputs=["q", "k", "v"])
    q, k, v, cotangent = random_operands(graph.num_nodes, 2, 3, 5, 5)
    arrays = {name: a.astype(np.float16) for name, a in (("q", q), ("k", k), ("v", v), ("d_out", cotangent))}
    want = NUMPY.run(gradient, graph, {n: a.astype(np.float32) for n, a in arrays.items()}, {}, {})
    got = triton_backend.run(retype(gradient, "f16"), graph, arrays, {}, {})
    for name in want:
        assert got[name].dtype == np.float16
        assert np.abs(got[name].astype(np.float32) - want[name]).max() <= 2e-2 * np.abs(want[name]).max(), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype,heads,keys", [("float32", 4, 16), ("float64", 2, 8), ("float32", 1, 100)])
def test_compiled_kernels_on_a_gpu_equal_numpy(dtype, heads, keys):
    """Compiled for the GPU (not interpreted): a batch with a 300-node graph (many blocks of the key loop)
    and single-node graphs, ids shuffled; several heads, padded and wide head sizes."""
    pytest.importorskip("triton")
    from mpdsl.backends.triton_backend import TritonBackend

    graph = batch_graph([1, 300, 0, 70, 5, 1], True, 6)
    model = attention_model(heads, keys, keys, None, dtype)
    gradient = grad_program(model.ir, inputs=["q", "k", "v"])
    q, k, v, cotangent = random_operands(graph.num_nodes, heads, keys, keys, 6, spread=0.5)
    arrays = {name: a.astype(dtype) for name, a in (("q", q), ("k", k), ("v", v), ("d_out", cotangent))}
    want = NUMPY.run(gradient, graph, arrays, {}, {})
    got = TritonBackend(device="cuda", interpret=False, poison=True).run(gradient, graph, arrays, {}, {})
    rtol, atol = (1e-10, 1e-12) if dtype == "float64" else (1e-4, 1e-5)
    for name in want:
        assert_close(got[name], want[name], f"gpu {name}", rtol=rtol, atol=atol)


def test_emitted_triton_names_the_global_attention_kernels():
    from mpdsl.backends.triton_backend import emit_triton
    from mpdsl.backends.triton_kernels import BUILTINS, GlobalAttention, generate

    text = emit_triton(attention_model(2, 3, 5, None).ir)
    assert "mpdsl_global_attention_" in text and "tl.dot" in text and "tl.reduce" in text
    for pass_ in ("forward", "query_grad", "key_grad"):
        import re

        assert set(re.findall(r"tl\.(\w+)", generate(GlobalAttention(pass_, 3, 5, 7, 0.25, "f16")))) <= BUILTINS


# ---- GPS against PyG's GPSConv -------------------------------------------------------------------------------

pyg_nn = pytest.importorskip("torch_geometric.nn")
from comparison import assert_close as assert_model_close  # noqa: E402
from comparison import build, compare, lin_t, one_torch_thread  # noqa: E402, F401  (one torch thread here)

GPS_DIMS = {"C": 8, "H": 2, "K": 4, "L": 2, "T": 2}
F, FE = 5, 3


class PygGPS(torch.nn.Module):
    """PyG's graph_gps example without encodings: node and edge embeddings, L GPSConv(GINEConv) layers,
    sum pooling and a linear head."""

    def __init__(self, channels: int, heads: int, layers: int, targets: int):
        super().__init__()
        self.node_emb = torch.nn.Linear(F, channels)
        self.edge_emb = torch.nn.Linear(FE, channels)
        self.layers = torch.nn.ModuleList(
            pyg_nn.GPSConv(channels, pyg_nn.GINEConv(torch.nn.Sequential(
                torch.nn.Linear(channels, channels), torch.nn.ReLU(), torch.nn.Linear(channels, channels)),
                train_eps=True), heads=heads, dropout=0.0, attn_type="multihead", norm="batch_norm")
            for _ in range(layers))
        self.head = torch.nn.Linear(channels, targets)

    def forward(self, x, edge_index, edge_attr, batch):
        h, e = self.node_emb(x), self.edge_emb(edge_attr)
        for layer in self.layers:
            h = layer(h, edge_index, batch, edge_attr=e)
        return h, self.head(pyg_nn.global_add_pool(h, batch))


def gps_weights(reference: PygGPS, grad: bool = False) -> dict[str, np.ndarray]:
    """The mpdsl parameters of ``examples/gps.mp`` from the PyG stack's (their gradients with ``grad``;
    the running statistics, which have none, left out then)."""
    c, heads, keys = GPS_DIMS["C"], GPS_DIMS["H"], GPS_DIMS["K"]

    def a(t) -> np.ndarray:
        t = t.grad if grad else t
        return t.detach().numpy().copy()

    def weight(linear) -> np.ndarray:
        return a(linear.weight).T.copy()

    per_layer: dict[str, list[np.ndarray]] = {}
    for layer in reference.layers:
        attn, conv, mlp = layer.attn, layer.conv, layer.mlp
        proj, bias = a(attn.in_proj_weight), a(attn.in_proj_bias)
        entries = {"eps": a(conv.eps).reshape(()), "W1": weight(conv.nn[0]), "b1": a(conv.nn[0].bias),
                   "W2": weight(conv.nn[2]), "b2": a(conv.nn[2].bias),
                   "Wo": weight(attn.out_proj), "bo": a(attn.out_proj.bias),
                   "M1": weight(mlp[0]), "c1": a(mlp[0].bias), "M2": weight(mlp[3]), "c2": a(mlp[3].bias)}
        for i, name in enumerate("qkv"):
            entries[f"W{name}"] = proj[i * c:(i + 1) * c].T.reshape(c, heads, keys)
            entries[f"b{name}"] = bias[i * c:(i + 1) * c].reshape(heads, keys)
        for i, norm in enumerate((layer.norm1, layer.norm2, layer.norm3), start=1):
            bn = norm.module
            entries[f"gamma{i}"], entries[f"beta{i}"] = a(bn.weight), a(bn.bias)
            if not grad:
                entries[f"mean{i}"], entries[f"var{i}"] = a(bn.running_mean), a(bn.running_var)
        for name, value in entries.items():
            per_layer.setdefault(name, []).append(value)
    weights = {name: np.stack(values) for name, values in per_layer.items()}
    weights.update(W_x=weight(reference.node_emb), b_x=a(reference.node_emb.bias),
                   W_e=weight(reference.edge_emb), b_e=a(reference.edge_emb.bias),
                   W_out=weight(reference.head), b_out=a(reference.head.bias))
    return weights


def gps_batch(seed: int = 0) -> mpdsl.Graph:
    """Graphs of 6, 1 (no edges), 9 and 70 nodes (more than one kernel block) with random edges (multi-edges,
    a self loop), node features and edge features."""
    rng = np.random.default_rng(seed)
    members = []
    for nodes, edges in ((6, 10), (1, 0), (9, 20), (70, 200)):
        ends = rng.integers(0, nodes, size=(2, edges))
        if edges:
            ends[1, 0] = ends[0, 0]
        members.append(mpdsl.Graph(ends, nodes, node_data={"x": rng.normal(size=(nodes, F))},
                                   edge_data={"edge_attr": rng.normal(size=(edges, FE))}))
    return mpdsl.Graph.batch(members)


def pyg_run(reference: PygGPS, graph: mpdsl.Graph, x=None, edge_attr=None):
    x = torch.from_numpy(np.array(graph["x"])) if x is None else x
    edge_attr = torch.from_numpy(np.array(graph["edge_attr"])) if edge_attr is None else edge_attr
    return reference(x, torch.from_numpy(np.array(graph.edge_index)), edge_attr,
                     torch.from_numpy(np.array(graph.batch)))


@pytest.fixture(scope="module")
def gps_case():
    reference = build(lambda: PygGPS(GPS_DIMS["C"], GPS_DIMS["H"], GPS_DIMS["L"], GPS_DIMS["T"]), "float64", seed=3)
    with torch.no_grad():
        for layer in reference.layers:
            layer.conv.eps.fill_(0.3 + 0.1 * len(layer.conv.eps))
    model = mpdsl.compile(ROOT / "examples" / "gps.mp", dtype="float64", dims=GPS_DIMS, seed=0)
    return reference, model, gps_batch()


def test_gps_example_equals_pyg_gpsconv(gps_case):
    reference, model, graph = gps_case
    with torch.no_grad():
        h, y = pyg_run(reference, graph)
    want = {"h": h.numpy(), "y": y.numpy()}
    # the key bias adds <q_i, bk> to every score of query i: the softmax over j does not see it
    compare(model, gps_weights(reference), graph, want, "float64", "gps vs PyG GPSConv", invariant=frozenset({"bk"}))
    assert "global_attention" in {v.op for v in model.ir.values}


def test_gps_gradients_through_the_torch_module_equal_pygs(gps_case):
    reference, model, graph = gps_case
    model.load_weights(gps_weights(reference))
    module = model.to_torch(graph).eval()
    rng = np.random.default_rng(9)
    x = torch.from_numpy(np.array(graph["x"])).requires_grad_()
    edge_attr = torch.from_numpy(np.array(graph["edge_attr"])).requires_grad_()
    theirs_x, theirs_e = x.detach().clone().requires_grad_(), edge_attr.detach().clone().requires_grad_()
    out = module(graph, x=x, edge_attr=edge_attr)
    projections = {name: torch.from_numpy(rng.normal(size=tuple(out[name].shape))) for name in ("h", "y")}
    sum((out[name] * p).sum() for name, p in projections.items()).backward()
    reference.zero_grad()
    h, y = pyg_run(reference, graph, theirs_x, theirs_e)
    assert_model_close(out["h"].detach().numpy(), h.detach().numpy(), "float64", "h")
    ((h * projections["h"]).sum() + (y * projections["y"]).sum()).backward()
    want = gps_weights(reference, grad=True)
    got = {name: p.grad.numpy() for name, p in module.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for name, expected in want.items():
        if name == "bk":  # the softmax is invariant to the key bias: its gradient is 0 up to rounding
            assert np.abs(expected).max() < 1e-12 and np.abs(got[name]).max() < 1e-12
            continue
        assert np.abs(expected).max() > 1e-3, f"d {name} is about zero: the comparison would prove little"
        assert_close(got[name], expected, f"d {name}", rtol=1e-8)
    assert_close(x.grad.numpy(), theirs_x.grad.numpy(), "d x", rtol=1e-8)
    assert_close(edge_attr.grad.numpy(), theirs_e.grad.numpy(), "d edge_attr", rtol=1e-8)


def test_gps_training_saves_the_log_sum_exp_and_never_recomputes_the_scores(gps_case):
    _, model, graph = gps_case
    arrays, dims = model.bind(graph, {})
    params = list(model.params)
    programs = model.context.training_programs(dims, "f64", False, [], params)
    forward_ops = [v.op for v in programs.train_forward.values]
    backward_ops = [v.op for v in programs.backward.values]
    assert forward_ops.count("global_attention") == GPS_DIMS["L"] and "global_attention" not in backward_ops
    assert backward_ops.count("global_attention_query_grad") == GPS_DIMS["L"]
    assert backward_ops.count("global_attention_key_grad") == GPS_DIMS["L"]
    saved = dict(programs.train_forward.outputs)
    parts = [saved[n] for n in programs.residuals]
    parts = [p.operands[0] if p.op == "reshape" else p for p in parts]
    read = [(p.attr["start"], p.attr["stop"]) for p in parts if p.op == "slice" and p.operands[0].op == "global_attention"]
    keys = GPS_DIMS["K"]
    assert read.count((keys, keys + 1)) == GPS_DIMS["L"]  # each layer's log-sum-exp, saved by its forward
    assert read.count((0, keys)) >= GPS_DIMS["L"]  # and its output
    assert not any(v.op == "pad" and v.type.domain is Domain.NODE for v in programs.backward.values)


def test_plan_counts_the_pairs_of_nodes_of_each_graph(gps_case):
    _, model, graph = gps_case
    assert graph_pairs(graph) == 6 ** 2 + 1 + 9 ** 2 + 70 ** 2
    rows = {Domain.NODE: graph.num_nodes, Domain.EDGE: graph.num_edges, Domain.GRAPH: graph.num_graphs,
            Domain.PARAM: 1}
    _, dims = model.bind(graph, {})
    costs = program_costs(model.ir, rows, dims, graph_pairs(graph))
    attention = [c for c in costs if c.value.op == "global_attention"]
    heads, keys = GPS_DIMS["H"], GPS_DIMS["K"]
    assert len(attention) == GPS_DIMS["L"]
    assert all(a.flops == graph_pairs(graph) * heads * (2 * keys + 2 * keys + 4) for a in attention)
    assert all(a.bytes_out == graph.num_nodes * heads * (keys + 1) * 8 for a in attention)  # no pair is stored
    estimated = [c for c in program_costs(model.ir, rows, dims) if c.value.op == "global_attention"]
    assert estimated[0].flops == graph.num_nodes ** 2 // graph.num_graphs * heads * (4 * keys + 4)
    from mpdsl.plan import report

    text = report(model.ir, model.ir, [], dims, graph, [])
    line = next(row for row in text.splitlines() if " global_attention " in row)
    assert f"{attention[0].flops / 1e6:.3f} MFLOP" in line


# ---- diagnostics ------------------------------------------------------------------------------------------

HEADER = "dim H = 2\ndim K = 3\n"
DIAGNOSTICS = [
    ("no by", "model m(q: node[H, K]) -> node[H, K] {\n    return global_attention(q, q, q)\n}\n",
     4, 12, "global_attention attends over the nodes of each graph: it needs `by graph`"),
    ("by dst", "model m(q: node[H, K]) -> node[H, K] {\n    return global_attention(q, q, q) by dst\n}\n",
     4, 41, "global_attention attends over the nodes of each graph: it needs `by graph`"),
    ("edge values", "model m(q: node[H, K], e: edge[H, K]) -> node[H, K] {\n"
     "    return global_attention(q, e, q) by graph\n}\n",
     4, 32, "global_attention: the keys must be float per-head node values node[H, K], got edge[2, 3] f32"),
    ("one head axis", "model m(q: node[K]) -> node[K] {\n    return global_attention(q, q, q) by graph\n}\n",
     4, 29, "global_attention: the queries must be float per-head node values node[H, K], got node[3] f32"),
    ("key shape", "model m(q: node[H, K], k: node[H, H]) -> node[H, K] {\n"
     "    return global_attention(q, k, q) by graph\n}\n",
     4, 32, "global_attention: queries [2, 3] and keys [2, 2] differ in shape"),
    ("heads", "model m(q: node[H, K], v: node[K, K]) -> node[K, K] {\n"
     "    return global_attention(q, q, v) by graph\n}\n",
     4, 35, "global_attention: the values have 3 heads, the queries 2"),
    ("run-time size", "model m(q: node[H, K], v: node[H, F]) -> node[H, F] {\n"
     "    return global_attention(q, q, v) by graph\n}\n",
     4, 35, "global_attention needs static per-head sizes, got F"),
    ("keyword", "model m(q: node[H, K]) -> node[H, K] {\n    return global_attention(q, q, q, temperature=2) by graph\n}\n",
     4, 38, "'global_attention' has no keyword argument 'temperature'"),
    ("scale literal", "model m(q: node[H, K], s: param[]) -> node[H, K] {\n"
     "    return global_attention(q, q, q, scale=s) by graph\n}\n",
     4, 44, "scale must be a number literal"),
    ("in a layer", "layer att(q: node[A, B], v: node[A, B]) -> node[A, B] {\n    return global_attention(q, q, v[src]) by graph\n}\n"
     "model m(q: node[H, K]) -> node[H, K] {\n    return att(q, q)\n}\n",
     4, 35, "global_attention: the values must be float per-head node values node[H, K], got edge[A, B] f32"),
]


@pytest.mark.parametrize("name,source,line,col,message", DIAGNOSTICS, ids=[d[0] for d in DIAGNOSTICS])
def test_bad_uses_get_located_diagnostics(name, source, line, col, message):
    source = HEADER + source
    with pytest.raises(mpdsl.CompileError) as info:
        typecheck.check(syntax.parse(source, "t.mp"))
    assert_located(info.value, source, line, col, message)


def test_a_generic_layer_with_symbolic_sizes_checks_and_each_call_gets_real_ones():
    source = ("dim H = 2\ndim K = 4\n"
              "layer att(q: node[A, B], v: node[A, C]) -> node[A, C] {\n    return global_attention(q, q, v) by graph\n}\n"
              "model m(q: node[H, K], v: node[H, 3]) -> node[H, 3] {\n    return att(q, v)\n}\n")
    model = mpdsl.compile(source, dtype="float64")
    (op,) = [v for v in model.ir.values if v.op == "global_attention"]
    assert op.attr["scale"] == 0.5 and op.type.shape == (Dim(2), Dim(4))
