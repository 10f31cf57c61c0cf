"""The example models against independent dense-adjacency formulas.

Each example in ``examples/*.mp`` (gcn, sage_mean, sage_max, gin, gat) is written out again
here with a dense matrix ``A[i, j]`` = number of edges j -> i (parallel edges counted, a self
loop on the diagonal), in plain NumPy and float64, from the papers' equations rather than from
mpdsl's edge-wise program. The compiled model and the formula get the same random weights
(biases and GIN's eps nonzero, so every term shows) and must agree to rtol 1e-10. The float32
build of each model must agree with the float64 one to rtol 1e-4.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mpdsl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategies import graphs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
KARATE = EXAMPLES / "data" / "karate.npz"

MODELS = ("gcn", "sage_mean", "sage_max", "gin", "gat")
DIMS = {
    "gcn": {"H": 5, "C": 3},
    "sage_mean": {"H": 5, "C": 3},
    "sage_max": {"H": 5, "C": 3},
    "gin": {"H": 6, "C": 3},
    "gat": {"HEADS": 2, "HID": 3, "C": 3},
}
OUT_DIM = {name: dims["C"] for name, dims in DIMS.items()}

# ---- compiled models and weights ----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _compiled(name: str, dtype: str, features: int) -> mpdsl.CompiledModel:
    # One model per (example, dtype, feature width): tests never rely on re-binding F.
    return mpdsl.compile(EXAMPLES / f"{name}.mp", dtype=dtype, dims=DIMS[name])


def model_for(name: str, dtype: str, g: mpdsl.Graph) -> mpdsl.CompiledModel:
    return _compiled(name, dtype, g["x"].shape[1])


def random_weights(model: mpdsl.CompiledModel, g: mpdsl.Graph, seed: int) -> dict[str, np.ndarray]:
    """float64 weights of the shapes ``model`` declares for ``g``: matrices ~ N(0, 1/fan_in),
    vectors and scalars ~ N(0, 0.5^2) (so biases and eps are not the zeros they start at)."""
    model.init(seed, graph=g)
    rng = np.random.default_rng(seed)
    weights = {}
    for key, value in sorted(model.params.items()):
        scale = 1.0 / np.sqrt(value.shape[0]) if value.ndim >= 2 else 0.5
        weights[key] = rng.normal(0.0, scale, value.shape)
    return weights


def run(name: str, dtype: str, g: mpdsl.Graph, weights: dict[str, np.ndarray]) -> np.ndarray:
    model = model_for(name, dtype, g)
    model.init(0, graph=g)
    model.load_weights(weights)
    out = model(g)
    assert isinstance(out, np.ndarray), type(out)
    assert out.dtype == np.dtype(dtype), (out.dtype, dtype)
    return out


# ---- dense formulas -------------------------------------------------------------------------


def adjacency(g: mpdsl.Graph) -> np.ndarray:
    """A[i, j] = number of edges j -> i."""
    A = np.zeros((g.num_nodes, g.num_nodes))
    np.add.at(A, (g.dst, g.src), 1.0)
    return A


def relu(x):
    return np.maximum(x, 0.0)


def gcn_dense(A, X, w):
    n = len(A)
    d = 1.0 / np.sqrt(A.sum(1) + 1.0)  # degree of A + I
    A_hat = d[:, None] * (A + np.eye(n)) * d[None, :]

    def conv(h, W, b):
        return A_hat @ (h @ W) + b

    return conv(relu(conv(X, w["W1"], w["b1"])), w["W2"], w["b2"])


def sage_mean_dense(A, X, w):
    P = A / np.maximum(A.sum(1), 1.0)[:, None]

    def conv(h, Ws, Wn, b):
        return h @ Ws + (P @ h) @ Wn + b

    h = relu(conv(X, w["W_s1"], w["W_n1"], w["b1"]))
    return conv(h, w["W_s2"], w["W_n2"], w["b2"])


def masked_max(A, p):
    """out[i] = max over in-neighbours j (A[i, j] > 0) of p[j]; 0 for a node without any."""
    if len(A) == 0:
        return np.zeros_like(p)
    filled = np.where(A[:, :, None] > 0, p[None, :, :], -np.inf)
    out = filled.max(axis=1)
    out[A.sum(1) == 0] = 0.0
    return out


def sage_max_dense(A, X, w):
    def conv(h, Wp, bp, Ws, Wn, b):
        return h @ Ws + masked_max(A, relu(h @ Wp + bp)) @ Wn + b

    h = relu(conv(X, w["W_pool1"], w["b_pool1"], w["W_s1"], w["W_n1"], w["b1"]))
    return conv(h, w["W_pool2"], w["b_pool2"], w["W_s2"], w["W_n2"], w["b2"])


def gin_dense(A, X, w):
    def conv(h, eps, W1, b1, W2, b2):
        return relu(((1.0 + eps) * h + A @ h) @ W1 + b1) @ W2 + b2

    h = relu(conv(X, w["eps1"], w["W11"], w["b11"], w["W12"], w["b12"]))
    return conv(h, w["eps2"], w["W21"], w["b21"], w["W22"], w["b22"])


def gat_conv_dense(A, X, W, a_src, a_dst, multiplicity=True):
    """[N, heads, K]. Edge softmax over the in-edges of i: a pair j -> i with A[i, j] parallel
    edges contributes A[i, j] equal terms, so exp(score) is weighted by A[i, j]
    (``multiplicity=False`` gives the wrong, set-based formula, for the sensitivity check)."""
    n, heads = len(A), W.shape[1]
    weight = A if multiplicity else (A > 0).astype(float)
    out = np.zeros((n, heads, W.shape[2]))
    for k in range(heads):
        Z = X @ W[:, k, :]
        raw = (Z @ a_dst[k])[:, None] + (Z @ a_src[k])[None, :]  # [i, j]
        score = np.where(raw > 0, raw, 0.2 * raw)
        score = np.where(A > 0, score, -np.inf)
        top = score.max(axis=1, initial=-np.inf)
        top = np.where(np.isfinite(top), top, 0.0)
        e = weight * np.exp(score - top[:, None])
        total = e.sum(axis=1)
        alpha = e / np.where(total > 0, total, 1.0)[:, None]
        out[:, k, :] = alpha @ Z
    return out


def elu(x):
    return np.where(x > 0, x, np.expm1(np.minimum(x, 0.0)))


def gat_dense(A, X, w, multiplicity=True):
    h1 = gat_conv_dense(A, X, w["W1"], w["a_src1"], w["a_dst1"], multiplicity)
    h = elu(h1.reshape(len(A), h1.shape[1] * h1.shape[2]) + w["b1"])  # heads concatenated, head-major
    h2 = gat_conv_dense(A, h, w["W2"], w["a_src2"], w["a_dst2"], multiplicity)
    return h2.mean(axis=1) + w["b2"]


DENSE = {"gcn": gcn_dense, "sage_mean": sage_mean_dense, "sage_max": sage_max_dense,
         "gin": gin_dense, "gat": gat_dense}


def reference(name: str, g: mpdsl.Graph, weights: dict[str, np.ndarray]) -> np.ndarray:
    return DENSE[name](adjacency(g), np.asarray(g["x"], dtype=np.float64), weights)


def assert_close(actual, expected, rtol, what=""):
    """allclose with an absolute floor relative to the output's scale (cancellation to ~0)."""
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), f"{what}: non-finite output"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def check_against_dense(name: str, g: mpdsl.Graph, seed: int) -> np.ndarray:
    weights = random_weights(model_for(name, "float64", g), g, seed)
    out = run(name, "float64", g, weights)
    assert out.shape == (g.num_nodes, OUT_DIM[name])
    assert_close(out, reference(name, g, weights), 1e-10, f"{name} vs dense formula")
    return out


def check_float32(name: str, g: mpdsl.Graph, seed: int) -> None:
    weights = random_weights(model_for(name, "float64", g), g, seed)
    out64 = run(name, "float64", g, weights)
    out32 = run(name, "float32", g, weights)
    assert_close(out32.astype(np.float64), out64, 1e-4, f"{name}: float32 vs float64")


# ---- fixed graphs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def karate() -> mpdsl.Graph:
    return mpdsl.Graph.load(KARATE)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("seed", [0, 1])
def test_karate_matches_dense(name, seed, karate):
    out = check_against_dense(name, karate, seed)
    assert np.abs(out).max() > 1e-3  # the comparison is not between two near-zero arrays


@pytest.mark.parametrize("name", MODELS)
def test_karate_float32_matches_float64(name, karate):
    check_float32(name, karate, 3)


@pytest.mark.parametrize("name", MODELS)
def test_karate_with_features_is_not_degenerate(name, karate):
    """Non-identity features, so that the neighbourhood terms are not a permutation of W."""
    x = np.random.default_rng(7).standard_normal((karate.num_nodes, 5))
    check_against_dense(name, karate.with_data(x=x), 4)


def _small_multigraph() -> mpdsl.Graph:
    # Node 1 receives 0 -> 1 three times, 2 -> 1 once and a self loop; node 3 is isolated;
    # node 0 receives from 2 twice; node 4 only sends.
    edge_index = np.array([[0, 2, 0, 1, 0, 2, 2, 4],
                           [1, 1, 1, 1, 1, 0, 0, 2]])
    x = np.random.default_rng(11).standard_normal((5, 3))
    return mpdsl.Graph.from_arrays(edge_index, num_nodes=5, x=x)


@pytest.mark.parametrize("name", MODELS)
def test_multigraph_with_self_loop_and_isolated_node(name):
    g = _small_multigraph()
    check_against_dense(name, g, 5)
    check_float32(name, g, 5)


def test_gat_counts_parallel_edges_in_the_softmax():
    """The multiplicity-weighted dense formula is the one that holds, and differs from a
    set-based softmax on this graph, so the comparison above can tell the two apart."""
    g = _small_multigraph()
    weights = random_weights(model_for("gat", "float64", g), g, 6)
    out = run("gat", "float64", g, weights)
    A = adjacency(g)
    as_set = gat_dense(A, np.asarray(g["x"]), weights, multiplicity=False)
    assert not np.allclose(out, as_set, rtol=1e-6, atol=1e-6)
    assert_close(out, gat_dense(A, np.asarray(g["x"]), weights), 1e-10, "gat")


def test_gcn_dropout_is_identity_at_inference():
    """gcn.mp holds dropout(h, 0.5); outside training it must not change anything (the dense
    formula has no dropout), and in training it must."""
    g = _small_multigraph()
    model = model_for("gcn", "float64", g)
    weights = random_weights(model, g, 8)
    model.load_weights(weights)
    assert not model.training
    first, second = model(g), model(g)
    np.testing.assert_array_equal(first, second)
    assert_close(first, reference("gcn", g, weights), 1e-10, "gcn eval")
    try:
        model.train()
        assert not np.allclose(model(g), first), "dropout(h, 0.5) did nothing in training mode"
    finally:
        model.eval()


@pytest.mark.parametrize("name", MODELS)
def test_empty_graph(name):
    """0 nodes: an output of shape (0, C), no error (every aggregation is over nothing)."""
    g = mpdsl.Graph.from_arrays(np.zeros((2, 0), dtype=np.int64), num_nodes=0, x=np.zeros((0, 4)))
    out = check_against_dense(name, g, 0)
    assert out.shape == (0, OUT_DIM[name])


@pytest.mark.parametrize("name", MODELS)
def test_graph_without_edges(name):
    """No edges: every aggregation is over an empty neighbourhood (0), only self terms remain."""
    x = np.random.default_rng(9).standard_normal((4, 3))
    g = mpdsl.Graph.from_arrays(np.zeros((2, 0), dtype=np.int64), num_nodes=4, x=x)
    check_against_dense(name, g, 1)


# ---- hypothesis graphs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
@given(data=st.data())
def test_random_graphs_match_dense(name, data):
    g = data.draw(graphs(max_nodes=24, max_edges=80), label="graph")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    check_against_dense(name, g, seed)


@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=15)
@given(data=st.data())
def test_hub_graphs_match_dense(name, data):
    g = data.draw(graphs(min_nodes=2, max_nodes=30, max_edges=200, shapes=("hub",), min_edges=1),
                  label="graph")
    assert g.in_degree().max() >= 0.5 * g.num_edges - 8  # most edges enter one node (+ extras)
    check_against_dense(name, g, data.draw(st.integers(0, 2**16), label="seed"))


@pytest.mark.parametrize("name", MODELS)
@settings(max_examples=20)
@given(data=st.data())
def test_random_graphs_float32_matches_float64(name, data):
    g = data.draw(graphs(max_nodes=24, max_edges=80), label="graph")
    check_float32(name, g, data.draw(st.integers(0, 2**16), label="seed"))
