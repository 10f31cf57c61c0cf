"""Radial bases, time encodings and masked normalisation against torch and PyG with the same inputs.

* the Bessel radial basis of DimeNet / MACE, ``sqrt(2/c) sin(n pi r / c) / r`` with ``n = arange(1, 9)``
  and DimeNet's polynomial envelope (p = 6), on edge lengths computed from node positions: against
  the formula in plain torch and against PyG's ``BesselBasisLayer`` (which drops the sqrt(2/c) / c
  factor and holds the frequencies n pi as a parameter);
* TGN's time encoding ``cos(t * w + b)`` against PyG's ``TimeEncoder`` (a Linear(1, D), then cos);
* ``where(in_degree() > 0, rsqrt(in_degree()), 0)`` on a graph with isolated nodes: the edge weights
  of PyG's ``gcn_norm(add_self_loops=False)`` (which masks the infinite ``deg ** -0.5`` to 0) and a
  ``GCNConv(add_self_loops=False)`` with the same weights;
* ``examples/schnet_bessel.mp`` against a plain-torch transcription of its equations (SchNet's
  interaction blocks on that basis), on a batch of two small molecules, and on the Triton backend
  (its interpreter) against the NumPy backend.

Outputs in float64 at rtol 1e-10; gradients through the compiled torch module (``to_torch``: the
parameters', and the positions' or timestamps' given as tensors that require grad) against torch
autograd at rtol 1e-8.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")
from torch_geometric.nn import GCNConv  # noqa: E402
from torch_geometric.nn.conv.gcn_conv import gcn_norm  # noqa: E402
from torch_geometric.nn.models.dimenet import BesselBasisLayer  # noqa: E402
from torch_geometric.nn.models.tgn import TimeEncoder  # noqa: E402

import mpdsl  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison import assert_nontrivial, compare, one_torch_thread  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-10, 1e-12
GRAD_RTOL = 1e-8
CUTOFF, NR, P = 5.0, 8, 6

BESSEL = """
dim NR = 8
model bessel(pos: node[3], W: param[NR, 3]) -> (basis: edge[NR], energy: node[3]) {
    delta = pos[src] - pos[dst]
    r = sqrt(sum(delta * delta, -1))
    c = 5.0
    n = arange(1, 9)
    x = r / c
    u = 1 - 28 * x ** 6 + 48 * x ** 7 - 21 * x ** 8          # DimeNet's envelope, p = 6
    basis = where(x < 1, u, 0) * sqrt(2 / c) * sin(n * pi * r / c) / r
    return basis, sum(basis @ W) by dst
}
"""


def molecule_graph(seed: int, atoms: int, box: float, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """(edge_index, pos): random positions in a box, both directions of every pair closer than
    ``cutoff`` (no self loops)."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, box, (atoms, 3))
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    src, dst = np.nonzero((dist < cutoff) & ~np.eye(atoms, dtype=bool))
    return np.stack([src, dst]), pos


def envelope(x):
    """DimeNet's u(x) (eq. 8), 0 from x = 1 on."""
    u = 1 - (P + 1) * (P + 2) / 2 * x ** P + P * (P + 2) * x ** (P + 1) - P * (P + 1) / 2 * x ** (P + 2)
    return torch.where(x < 1, u, torch.zeros_like(u))


def bessel_reference(r):
    """sqrt(2/c) sin(n pi r / c) / r * u(r / c), n = 1 .. NR: edge[NR]."""
    n = torch.arange(1, NR + 1, dtype=torch.float64)
    r = r[:, None]
    return envelope(r / CUTOFF) * math.sqrt(2 / CUTOFF) * torch.sin(n * math.pi * r / CUTOFF) / r


def test_bessel_radial_basis_equals_torch_and_pyg():
    edge_index, pos = molecule_graph(0, atoms=14, box=7.0, cutoff=8.0)  # some edges beyond the 5.0 cutoff
    graph = mpdsl.Graph.from_arrays(edge_index, 14, pos=pos)
    rng = np.random.default_rng(1)
    W = rng.normal(size=(NR, 3))
    model = mpdsl.compile(BESSEL, dtype="float64").load_weights({"W": W})

    src, dst = torch.from_numpy(edge_index)
    pos_t = torch.tensor(pos, requires_grad=True)
    r = (pos_t[src] - pos_t[dst]).norm(dim=-1)
    assert (r.detach() > CUTOFF).any() and (r.detach() < CUTOFF).any()
    want = bessel_reference(r)
    assert_nontrivial(want.detach().numpy(), "bessel basis")
    out = model(graph)
    np.testing.assert_allclose(out["basis"], want.detach().numpy(), rtol=RTOL, atol=ATOL)
    assert (out["basis"][r.detach().numpy() >= CUTOFF] == 0).all()

    pyg = BesselBasisLayer(NR, cutoff=CUTOFF, envelope_exponent=P - 1).double()
    with torch.no_grad():
        pyg.freq.copy_(torch.arange(1, NR + 1, dtype=torch.float64) * math.pi)
        scaled = pyg(r) * math.sqrt(2 / CUTOFF) / CUTOFF
    np.testing.assert_allclose(out["basis"], scaled.numpy(), rtol=RTOL, atol=ATOL)

    # gradients through the torch module: the weights' and the positions' (forces)
    module = model.to_torch(graph)
    given = torch.tensor(pos, requires_grad=True)
    got = module(graph, pos=given)
    weights = torch.tensor(W, requires_grad=True)
    energy = torch.zeros(14, 3, dtype=torch.float64).index_add_(0, dst, want @ weights)
    projections = [torch.from_numpy(rng.normal(size=tuple(t.shape))) for t in (want, energy)]
    ((got["basis"] * projections[0]).sum() + (got["energy"] * projections[1]).sum()).backward()
    ((want * projections[0]).sum() + (energy * projections[1]).sum()).backward()
    np.testing.assert_allclose(module.W.grad.numpy(), weights.grad.numpy(), rtol=GRAD_RTOL, atol=1e-12)
    np.testing.assert_allclose(given.grad.numpy(), pos_t.grad.numpy(), rtol=GRAD_RTOL, atol=1e-12)


TIME_ENCODING = """
dim D = 6
model time_encoding(t: edge[], w: param[D], b: param[D]) -> edge[D] {
    return cos(t * w + b)
}
"""


def test_time_encoding_equals_pyg_tgn():
    rng = np.random.default_rng(2)
    edge_index = rng.integers(0, 7, (2, 25))
    timestamps = rng.uniform(0, 10, 25)
    graph = mpdsl.Graph.from_arrays(edge_index, 7, edge_t=timestamps)
    encoder = TimeEncoder(6).double()
    with torch.no_grad():
        encoder.lin.weight.copy_(torch.from_numpy(rng.normal(size=(6, 1))))
        encoder.lin.bias.copy_(torch.from_numpy(rng.normal(size=6)))
    weights = {"w": encoder.lin.weight.detach().numpy()[:, 0].copy(), "b": encoder.lin.bias.detach().numpy().copy()}
    model = mpdsl.compile(TIME_ENCODING, dtype="float64").load_weights(weights)

    t = torch.tensor(timestamps, requires_grad=True)
    want = encoder(t)
    assert_nontrivial(want.detach().numpy(), "time encoding")
    module = model.to_torch(graph)
    given = torch.tensor(timestamps, requires_grad=True)
    got = module(graph, t=given)
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=RTOL, atol=ATOL)
    projection = torch.from_numpy(rng.normal(size=(25, 6)))
    (got * projection).sum().backward()
    (want * projection).sum().backward()
    np.testing.assert_allclose(module.w.grad.numpy(), encoder.lin.weight.grad.numpy()[:, 0], rtol=GRAD_RTOL)
    np.testing.assert_allclose(module.b.grad.numpy(), encoder.lin.bias.grad.numpy(), rtol=GRAD_RTOL)
    np.testing.assert_allclose(given.grad.numpy(), t.grad.numpy(), rtol=GRAD_RTOL)


GCN_MASKED = """
model gcn_masked(x: node[F], W: param[F, H], b: param[H]) -> (norm: edge[], out: node[H], dis: node[]) {
    dis = where(in_degree() > 0, rsqrt(in_degree()), 0)     # 0 where in_degree() ** -0.5 is infinite
    norm = dis[src] * dis[dst]
    return norm, sum(norm * (x @ W)[src]) by dst + b, dis
}
"""


def test_where_masks_gcn_norm_as_pyg():
    rng = np.random.default_rng(3)
    n = 12  # nodes 9..11 have no edges; nodes 7, 8 only send
    src = rng.integers(0, 9, 30)
    dst = rng.integers(0, 7, 30)
    edge_index = np.stack([src, dst])
    x = rng.normal(size=(n, 4))
    conv = GCNConv(4, 3, add_self_loops=False, normalize=True).double()
    with torch.no_grad():
        conv.lin.weight.copy_(torch.from_numpy(rng.normal(size=(3, 4))))
        conv.bias.copy_(torch.from_numpy(rng.normal(size=3)))
    weights = {"W": conv.lin.weight.detach().numpy().T.copy(), "b": conv.bias.detach().numpy().copy()}
    graph = mpdsl.Graph.from_arrays(edge_index, n, x=x)
    model = mpdsl.compile(GCN_MASKED, dtype="float64", dims={"H": 3}).load_weights(weights)
    got = model(graph)

    ei = torch.from_numpy(edge_index)
    _, norm = gcn_norm(ei, None, n, add_self_loops=False, dtype=torch.float64)
    degree = np.bincount(dst, minlength=n)
    assert (degree == 0).sum() == 5 and np.isfinite(got["dis"]).all() and np.isfinite(got["norm"]).all()
    np.testing.assert_array_equal(got["dis"][degree == 0], 0)
    np.testing.assert_allclose(got["norm"], norm.numpy(), rtol=RTOL, atol=ATOL)
    xt = torch.from_numpy(x)
    want = conv(xt, ei)
    np.testing.assert_allclose(got["out"], want.detach().numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got["out"][degree == 0], np.broadcast_to(weights["b"], (5, 3)), rtol=RTOL)

    module = model.to_torch(graph)
    projection = torch.from_numpy(rng.normal(size=(n, 3)))
    (module(graph)["out"] * projection).sum().backward()
    (want * projection).sum().backward()
    np.testing.assert_allclose(module.W.grad.numpy(), conv.lin.weight.grad.numpy().T, rtol=GRAD_RTOL)
    np.testing.assert_allclose(module.b.grad.numpy(), conv.bias.grad.numpy(), rtol=GRAD_RTOL)


# ---- examples/schnet_bessel.mp ------------------------------------------------------------------------

SCHNET = ROOT / "examples" / "schnet_bessel.mp"
H, T, ELEMENTS = 16, 2, 4
SCHNET_SHAPES = {"W_emb": (ELEMENTS, H), "F1": (T, NR, H), "f1": (T, H), "F2": (T, H, H), "f2": (T, H),
                 "V": (T, H, H), "U": (T, H, H), "bu": (T, H), "O": (T, H, H), "bo": (T, H), "A": (H, H),
                 "ba": (H,), "B": (H, 1), "bb": (1,)}


def ssp(v):
    return torch.nn.functional.softplus(v) - math.log(2.0)


def schnet_reference(w: dict, x, pos, edge_index, batch, num_graphs: int):
    """examples/schnet_bessel.mp's equations in plain torch."""
    src, dst = edge_index
    length = (pos[src] - pos[dst]).norm(dim=-1)
    d = torch.where(length > 0, length, torch.full_like(length, CUTOFF))
    e = bessel_reference(d)
    h = x @ w["W_emb"]
    for t in range(T):
        filt = ssp(e @ w["F1"][t] + w["f1"][t]) @ w["F2"][t] + w["f2"][t]
        m = torch.zeros_like(h).index_add_(0, dst, (h @ w["V"][t])[src] * filt)
        h = h + ssp(m @ w["U"][t] + w["bu"][t]) @ w["O"][t] + w["bo"][t]
    atom = ssp(h @ w["A"] + w["ba"]) @ w["B"] + w["bb"]
    return torch.zeros(num_graphs, 1, dtype=atom.dtype).index_add_(0, batch, atom)


def molecules() -> mpdsl.Graph:
    """Two molecules (9 and 6 atoms, one-hot element features), edges within 6.0: some beyond the
    basis's cutoff of 5.0."""
    parts = []
    rng = np.random.default_rng(4)
    for seed, atoms in ((5, 9), (6, 6)):
        edge_index, pos = molecule_graph(seed, atoms, box=4.5, cutoff=6.0)
        x = np.eye(ELEMENTS)[rng.integers(0, ELEMENTS, atoms)]
        parts.append(mpdsl.Graph.from_arrays(edge_index, atoms, x=x, pos=pos))
    return mpdsl.Graph.batch(parts)


def schnet_weights(seed: int = 7) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s) / math.sqrt(s[-2] if len(s) >= 2 else 4) for k, s in SCHNET_SHAPES.items()}


def torch_call(graph: mpdsl.Graph, weights: dict, pos=None):
    w = {k: torch.tensor(v, requires_grad=True) for k, v in weights.items()}
    pos = pos if pos is not None else torch.from_numpy(np.array(graph["pos"]))
    out = schnet_reference(w, torch.from_numpy(np.array(graph["x"])), pos, torch.from_numpy(np.array(graph.edge_index)),
                           torch.from_numpy(np.array(graph["batch"])), graph.num_graphs)
    return w, out


def test_schnet_bessel_equals_plain_torch():
    graph = molecules()
    lengths = np.linalg.norm(graph["pos"][graph.edge_index[0]] - graph["pos"][graph.edge_index[1]], axis=-1)
    assert (lengths > CUTOFF).any() and graph.num_graphs == 2
    weights = schnet_weights()
    model = mpdsl.compile(SCHNET, dtype="float64", seed=0)
    _, want = torch_call(graph, weights)
    compare(model, weights, graph, want.detach().numpy(), "float64", "schnet_bessel")


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_schnet_bessel_gradients_equal_torch(backend):
    """The gradients of every parameter and of the positions (the forces' negatives), through the
    torch module of the NumPy backend and of the Triton backend (interpreter), against autograd."""
    graph = molecules()
    weights = schnet_weights()
    model = mpdsl.compile(SCHNET, dtype="float64", seed=0).load_weights(weights)
    if backend == "triton":
        pytest.importorskip("triton")
        from mpdsl.backends.triton_backend import TritonBackend
        from mpdsl.runtime import CompiledModel

        model = CompiledModel(model.ir, TritonBackend(interpret=True, device="cpu"), seed=0).load_weights(weights)
    module = model.to_torch(graph)
    pos = torch.tensor(np.array(graph["pos"]), requires_grad=True)
    got = module(graph, pos=pos)
    ref_pos = torch.tensor(np.array(graph["pos"]), requires_grad=True)
    w, want = torch_call(graph, weights, ref_pos)
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=RTOL, atol=ATOL)
    got.sum().backward()
    want.sum().backward()
    for name in weights:
        np.testing.assert_allclose(getattr(module, name).grad.numpy(), w[name].grad.numpy(), rtol=GRAD_RTOL,
                                   atol=1e-12, err_msg=name)
    assert np.abs(ref_pos.grad.numpy()).max() > 1e-3
    np.testing.assert_allclose(pos.grad.numpy(), ref_pos.grad.numpy(), rtol=GRAD_RTOL, atol=1e-12)


def test_schnet_bessel_on_triton_equals_numpy():
    pytest.importorskip("triton")
    from mpdsl.backends.triton_backend import TritonBackend
    from mpdsl.runtime import CompiledModel

    graph = molecules()
    for dtype, rtol in (("float64", 1e-12), ("float32", 1e-5)):
        model = mpdsl.compile(SCHNET, dtype=dtype, seed=3).init(3, graph=graph)
        twin = CompiledModel(model.ir, TritonBackend(interpret=True, device="cpu"), seed=3).load_weights(model.params)
        want = model(graph)
        np.testing.assert_allclose(twin(graph), want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_schnet_bessel_arange_is_a_constant_of_the_program():
    model = mpdsl.compile(SCHNET)
    assert set(model.param_types) == set(SCHNET_SHAPES)
    (sequence,) = [v for v in model.ir.values if v.op == "arange"]
    assert sequence.attr == {"start": 1.0, "step": 1.0} and str(sequence.type) == "param[8] f32"
    assert model.param_inits["F1"].role == "weight" and model.param_inits["f1"].role == "bias"


def test_tgn_embedding_equals_pygs_time_encoder_and_transformer_conv():
    """examples/tgn_embedding.mp against PyG's TGN embedding (TimeEncoder, then TransformerConv over
    [time encoding || message], as PyG's TGN example), same weights: forward and gradients."""
    from comparison import heads_t, lin_t
    from torch_geometric.nn import TransformerConv

    rng = np.random.default_rng(5)
    n, e, f, fm = 9, 30, 5, 3
    edge_index = rng.integers(0, n, (2, e))
    edge_index[:, :3] = [[0, 0, 4], [2, 2, 4]]                 # a repeated edge and a self loop; node 8 isolated
    edge_index[edge_index == 8] = 1
    graph = mpdsl.Graph.from_arrays(edge_index, n, x=rng.normal(size=(n, f)), last_update=rng.uniform(0, 5, n))
    edge_inputs = {"edge_time": rng.uniform(5, 10, e), "edge_msg": rng.normal(size=(e, fm))}
    encoder = TimeEncoder(8).double()
    conv = TransformerConv(f, 8, heads=2, concat=True, beta=False, dropout=0.0, edge_dim=8 + fm,
                           root_weight=True).double().eval()
    with torch.no_grad():
        for p in [*encoder.parameters(), *conv.parameters()]:
            p.copy_(torch.from_numpy(rng.normal(size=tuple(p.shape))))
    h = conv.heads
    weights = {"w_time": encoder.lin.weight.detach().numpy()[:, 0].copy(),
               "b_time": encoder.lin.bias.detach().numpy().copy(),
               "Wq": heads_t(conv.lin_query, h), "bq": conv.lin_query.bias.detach().numpy().reshape(h, -1),
               "Wk": heads_t(conv.lin_key, h), "bk": conv.lin_key.bias.detach().numpy().reshape(h, -1),
               "Wv": heads_t(conv.lin_value, h), "bv": conv.lin_value.bias.detach().numpy().reshape(h, -1),
               "We": heads_t(conv.lin_edge, h), "W_skip": lin_t(conv.lin_skip),
               "b_skip": conv.lin_skip.bias.detach().numpy()}
    model = mpdsl.compile(ROOT / "examples" / "tgn_embedding.mp", dtype="float64").load_weights(
        {k: np.ascontiguousarray(v) for k, v in weights.items()})

    def reference(x, last_update, edge_time, edge_msg):
        src = torch.from_numpy(edge_index[0])
        rel_t = last_update[src] - edge_time
        return conv(x, torch.from_numpy(edge_index), torch.cat([encoder(rel_t), edge_msg], dim=-1))

    arrays = {"x": np.array(graph["x"]), "last_update": np.array(graph["last_update"]), **edge_inputs}
    tensors = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in arrays.items()}
    want = reference(**tensors)
    assert_nontrivial(want.detach().numpy(), "tgn embedding")
    np.testing.assert_allclose(model(graph, **edge_inputs), want.detach().numpy(), rtol=RTOL, atol=ATOL)
    module = model.to_torch(graph)
    given = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in arrays.items()}
    got = module(graph, **given)
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), rtol=RTOL, atol=ATOL)
    projection = torch.from_numpy(rng.normal(size=tuple(want.shape)))
    (got * projection).sum().backward()
    (want * projection).sum().backward()
    np.testing.assert_allclose(module.w_time.grad.numpy(), encoder.lin.weight.grad.numpy()[:, 0], rtol=GRAD_RTOL)
    np.testing.assert_allclose(module.We.grad.numpy().reshape(8 + fm, -1), conv.lin_edge.weight.grad.numpy().T,
                               rtol=GRAD_RTOL)
    for name in tensors:
        np.testing.assert_allclose(given[name].grad.numpy(), tensors[name].grad.numpy(), rtol=GRAD_RTOL, atol=1e-12,
                                   err_msg=f"d {name}")
