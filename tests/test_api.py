"""The Python API: compile, params, init, weights, inputs, outputs."""

from pathlib import Path

import numpy as np
import pytest

import mpdsl

ROOT = Path(__file__).resolve().parents[1]
KARATE = mpdsl.Graph.load(ROOT / "examples" / "data" / "karate.npz")

TWO_OUTPUTS = """
model two(x: node[F], e: edge[F], W: param[F, F]) -> (h: node[F], m: edge[F]) {
    m = e + x[src] @ W
    return sum(m) by dst, m
}
"""


def test_compile_from_path_and_source_agree():
    path = ROOT / "examples" / "gcn.mp"
    a = mpdsl.compile(path, seed=1)
    b = mpdsl.compile(path.read_text(), seed=1)
    c = mpdsl.compile(str(path), seed=1)
    np.testing.assert_array_equal(a(KARATE), b(KARATE))
    np.testing.assert_array_equal(a(KARATE), c(KARATE))


def test_params_are_named_as_declared_and_created_from_the_data():
    m = mpdsl.compile(ROOT / "examples" / "gcn.mp")
    assert list(m.param_types) == ["W1", "b1", "W2", "b2"]
    assert m.params == {}, "W1's shape needs F from the data"
    m(KARATE)
    assert {k: v.shape for k, v in m.params.items()} == {"W1": (34, 16), "b1": (16,), "W2": (16, 4), "b2": (4,)}
    bound = 1 / np.sqrt(34)  # torch.nn.Linear(34, 16)'s: W1 and b1 contract (follow) the 34 features
    assert m.params["W1"].std() > 0 and np.abs(m.params["W1"]).max() <= bound
    assert m.params["b1"].std() > 0 and np.abs(m.params["b1"]).max() <= bound


def test_init_is_deterministic_per_seed():
    m = mpdsl.compile(ROOT / "examples" / "gcn.mp")
    first = {k: v.copy() for k, v in m.init(7, graph=KARATE).params.items()}
    assert all(np.array_equal(first[k], v) for k, v in m.init(7, graph=KARATE).params.items())
    assert not np.array_equal(first["W1"], m.init(8, graph=KARATE).params["W1"])
    assert m.init(1, F=5).params["W1"].shape == (5, 16)


def test_init_without_dims_is_a_clear_error():
    m = mpdsl.compile(ROOT / "examples" / "gcn.mp")
    with pytest.raises(mpdsl.InputError, match="depends on F"):
        m.init(0)


def test_weights_round_trip(tmp_path):
    m = mpdsl.compile(ROOT / "examples" / "gat.mp", seed=2)
    out = m(KARATE)
    m.save_weights(tmp_path / "w.npz")
    m2 = mpdsl.compile(ROOT / "examples" / "gat.mp", seed=99).load_weights(tmp_path / "w.npz")
    np.testing.assert_array_equal(out, m2(KARATE))


@pytest.mark.parametrize("change,match", [
    (lambda w: w.pop("b1"), "missing b1"),
    (lambda w: w.update(extra=np.zeros(3)), "unknown extra"),
    (lambda w: w.update(b1=np.zeros(5)), "weight 'b1' has b1.shape\\[0\\] = 5 but its declaration b1: param\\[H\\] needs H = 16"),
    (lambda w: w.update(W2=np.zeros((16, 4, 1))), "weight 'W2' has shape"),
    (lambda w: w.update(b2=np.array([np.nan] * 4)), "non-finite"),
    (lambda w: w.update(b2=np.array(["a"] * 4)), "dtype"),
])
def test_bad_weights_are_refused(change, match):
    m = mpdsl.compile(ROOT / "examples" / "gcn.mp").init(0, graph=KARATE)
    weights = dict(m.params)
    change(weights)
    with pytest.raises(mpdsl.WeightsError, match=match):
        m.load_weights(weights)


def test_weights_bind_input_dims_and_then_check_inputs():
    m = mpdsl.compile(ROOT / "examples" / "gcn.mp").init(0, F=5)
    with pytest.raises(mpdsl.InputError, match="input 'x' has x.shape\\[1\\] = 34 but its declaration x: node\\[F\\] "
                                               "needs F = 5") as info:
        m(KARATE)
    assert "F = 5 comes from init(..., F=5)" in info.value.hint and "gcn.mp:18:11" in info.value.hint


def test_unreadable_weights_file(tmp_path):
    bad = tmp_path / "w.npz"
    bad.write_text("not a zip")
    with pytest.raises(mpdsl.WeightsError, match="weights file .* is not an .npz archive"):
        mpdsl.compile(ROOT / "examples" / "gcn.mp").load_weights(bad)


def test_multiple_outputs_and_keyword_inputs():
    m = mpdsl.compile(TWO_OUTPUTS, dtype="float64")
    rng = np.random.default_rng(0)
    e = rng.normal(size=(KARATE.num_edges, 34))
    out = m(KARATE, e=e)
    assert set(out) == {"h", "m"} and out["h"].shape == (34, 34) and out["m"].shape == (156, 34)
    x = KARATE["x"].astype(np.float64)
    expected_m = e + x[KARATE.src] @ m.params["W"]
    np.testing.assert_allclose(out["m"], expected_m, rtol=1e-12)
    override = m(KARATE, e=e, x=2 * x)
    np.testing.assert_allclose(override["m"], e + 2 * x[KARATE.src] @ m.params["W"], rtol=1e-12)


@pytest.mark.parametrize("inputs,match", [
    ({}, "model input 'e' .* is not given"),
    ({"e": np.zeros((10, 34))}, "input 'e' has 10 rows but the graph has 156 edges"),
    ({"e": np.zeros((156, 3))}, "input 'e' has e.shape\\[1\\] = 3 but its declaration e: edge\\[F\\] needs F = 34"),
    ({"e": np.zeros(156)}, "input 'e' has shape \\[\\] but is declared \\[F\\]"),
    ({"e": np.zeros((156, 34)), "q": 1}, "no input named q"),
    ({"e": np.array([["a"] * 34] * 156)}, "dtype"),
])
def test_bad_inputs_are_refused(inputs, match):
    with pytest.raises(mpdsl.InputError, match=match):
        mpdsl.compile(TWO_OUTPUTS)(KARATE, **inputs)


def test_int_inputs_index_parameters_and_are_range_checked():
    src = """
model typed(x: node[F], etype: edge int, W: param[3, F, 2]) -> node[2] {
    return sum(x[src] @ W[etype]) by dst
}
"""
    m = mpdsl.compile(src, dtype="float64")
    etype = np.arange(KARATE.num_edges) % 3
    out = m(KARATE, etype=etype)
    x, W = KARATE["x"].astype(float), m.params["W"]
    expected = np.zeros((34, 2))
    for e, (s, d) in enumerate(zip(KARATE.src, KARATE.dst)):
        expected[d] += x[s] @ W[etype[e]]
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    with pytest.raises(mpdsl.InputError, match=r"etype\[2\] = 3 is out of range"):
        m(KARATE, etype=np.where(np.arange(156) == 2, 3, 0))
    with pytest.raises(mpdsl.InputError, match=r"etype\[0\] = -1 is negative"):
        m(KARATE, etype=-np.ones(156, dtype=np.int64))
    with pytest.raises(mpdsl.InputError, match="declared int"):
        m(KARATE, etype=np.zeros(156))


def test_float32_and_float64_agree():
    m32 = mpdsl.compile(ROOT / "examples" / "gin.mp", dtype="float32").init(0, graph=KARATE)
    m64 = mpdsl.compile(ROOT / "examples" / "gin.mp", dtype="float64").load_weights(m32.params)
    a, b = m32(KARATE), m64(KARATE)
    assert a.dtype == np.float32 and b.dtype == np.float64
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_graph_from_path_and_pyg():
    m = mpdsl.compile(ROOT / "examples" / "sage_mean.mp", seed=0)
    ref = m(KARATE)
    np.testing.assert_array_equal(ref, m(str(ROOT / "examples" / "data" / "karate.npz")))
    pytest.importorskip("torch_geometric")
    np.testing.assert_allclose(ref, m(KARATE.to_pyg()), rtol=1e-6)


def test_not_a_graph():
    with pytest.raises(mpdsl.GraphError, match="cannot use a int as a graph"):
        mpdsl.compile(ROOT / "examples" / "gcn.mp")(3)


def test_loops_unroll_with_shared_and_per_step_parameters():
    src = """
dim T = 3
model loop(x: node[F], W: param[F, F], Ws: param[T, F, F]) -> node[F] {
    h = x
    for t in 0..T {
        h = relu(h @ W + (sum(h[src]) by dst) @ Ws[t])
    }
    return h
}
"""
    m = mpdsl.compile(src, dtype="float64", seed=0)
    out = m(KARATE)
    x = KARATE["x"].astype(float)
    A = np.zeros((34, 34))
    np.add.at(A, (KARATE.dst, KARATE.src), 1)
    h = x
    for t in range(3):
        h = np.maximum(h @ m.params["W"] + (A @ h) @ m.params["Ws"][t], 0)
    np.testing.assert_allclose(out, h, rtol=1e-10)
    assert sum(v.op == "aggregate" for v in m.ir.values) == 3


def test_training_mode_dropout():
    src = "model d(x: node[F]) -> node[F] {\n    return dropout(x, 0.5)\n}\n"
    m = mpdsl.compile(src, dtype="float64")
    x = np.ones((34, 8))
    np.testing.assert_array_equal(m(KARATE, x=x), x)
    out = m.train()(KARATE, x=x)
    assert set(np.unique(out)) <= {0.0, 2.0} and 0 < (out == 0).mean() < 1


def test_weights_with_product_dims_bind_in_any_order():
    m = mpdsl.compile("model m(x: node[F], W: param[2 * F, F]) -> node[F] {\n    return concat(x, x) @ W\n}\n")
    m.load_weights({"W": np.zeros((6, 3))})
    assert m.dims["F"] == 3
    only_product = mpdsl.compile("model m(x: node[F], W: param[2 * F, 3]) -> node[3] {\n"
                                 "    return concat(x, x) @ W\n}\n")
    assert only_product.load_weights({"W": np.zeros((6, 3))}).dims["F"] == 3  # F solved from 2 * F = 6
    with pytest.raises(mpdsl.WeightsError, match="W.shape\\[0\\] = 7, which its declaration W: param\\[2\\*F, 3\\] "
                       "cannot fit: 2\\*F = 7 gives F = 7/2, which is not an integer"):
        only_product.load_weights({"W": np.zeros((7, 3))})


def test_stacked_parameters_take_glorot_fans_from_one_slice():
    src = "dim T = 50\nmodel m(x: node[F], W: param[T, F, F] = glorot) -> node[F] {\n    return x @ W[3]\n}\n"
    W = mpdsl.compile(src).init(0, F=4).params["W"]
    assert np.abs(W).max() <= np.sqrt(6 / 8) and np.abs(W).max() > np.sqrt(6 / 54)
