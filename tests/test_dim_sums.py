"""Dimensions that are sums of products (``param[2 * D + FE, H]``, ``node[F + S]``), how they are
normalised, typed, solved when bound from data, and the file-level dims that layers see.

The IR round trip of such dims is in ``test_ir.py`` (golden ``dim_sums.ir``), their located
diagnostics in ``test_diagnostics.py``, and MeshGraphNets' blocks, each MLP with one weight over
the whole concatenation, against plain torch in ``test_zoo_dense_mp.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

import mpdsl
from mpdsl.graph import Graph
from mpdsl.types import Dim, DimSolveError, solve_dim

D, FE, F, H, K = (Dim(1, (s,)) for s in ("D", "FE", "F", "H", "K"))


# ---- the algebra ------------------------------------------------------------------------------


def test_equal_dims_compare_and_hash_equal_however_they_are_built():
    a = D * 2 + FE
    b = FE + D + D
    c = Dim.parse("FE + 2*D")
    assert a == b == c and hash(a) == hash(b) == hash(c)
    assert H * (K + 1) == H * K + H
    assert (F + 1) * (F + 1) == F * F + F * 2 + 1
    assert D * 2 + FE != D + FE * 2 and D + FE != D * FE
    assert len({a, b, c, H * K + H}) == 2


def test_printing_is_stable_and_parses_back():
    assert str(D * 2 + FE) == str(FE + D * 2) == "2*D + FE"
    assert str(H * K + 1) == "H*K + 1"
    assert str(Dim(3) + F * 2 + Dim(1, ("C", "H"))) == "C*H + 2*F + 3"  # higher degree first, constant last
    assert str(K * H) == "H*K" and str(F * F) == "F*F" and str(Dim(0)) == "0"
    for dim in (D * 2 + FE, H * K + 1, F * F + F * 2 + 1, Dim(7), K):
        assert Dim.parse(str(dim)) == dim


def test_static_and_symbolic_parts():
    assert (Dim(2) + 3).is_static and (Dim(2) + 3).value == 5
    dim = D * 2 + FE
    assert not dim.is_static and dim.symbols == ("D", "FE") and dim.name is None and K.name == "K"
    assert dim.substitute({"D": 16, "FE": 4}) == Dim(36)
    assert dim.substitute({"D": 16}) == FE + 32
    assert dim.render({"D": 16, "FE": 4}) == "2*16 + 4"
    with pytest.raises(ValueError, match="symbolic"):
        _ = dim.value


@pytest.mark.parametrize("dim,symbol,target,solution", [
    (D * 2 + 4, "D", Dim(36), Dim(16)),
    (D * 2 + FE, "D", D * 2 + FE, D),               # symbolic: FE taken as known
    (D * 2 + FE, "D", F * 2 + FE + 6, F + 3),
    (H * D, "D", H * K, K),
    (FE + 1, "FE", Dim(5), Dim(4)),
    (F * F, "F", Dim(49), Dim(7)),                  # of degree 2, against a number
])
def test_solve(dim, symbol, target, solution):
    assert solve_dim(dim, symbol, target) == solution


@pytest.mark.parametrize("dim,symbol,target,reason", [
    (D * 2 + 4, "D", Dim(35), "= 31/2, which is not an integer"),
    (D * 2 + 4, "D", Dim(4), "= 0, which is not positive"),
    (D * 2 + 4, "D", Dim(2), "= -1, which is not positive"),
    (D + F, "D", F, "= 0, which is not positive"),
    (D + 1, "D", F, "= F - 1, which is not positive"),
    (D * 2, "D", F, "= F/2, which is not a sum of products of dims"),
    (F * F, "F", Dim(50), "= a number between 7 and 8, which is not an integer"),
    (F * F + 5, "F", Dim(3), "= a negative number, which is not positive"),
    (F * F, "F", D, "= a root of a polynomial, which is solved only against a number with no other unknown"),
])
def test_solve_refuses(dim, symbol, target, reason):
    with pytest.raises(DimSolveError) as info:
        solve_dim(dim, symbol, target)
    assert info.value.reason == reason


# ---- typing ---------------------------------------------------------------------------------------


CONCAT_SOURCE = """
dim H = 5
model m(x: node[D], e: edge[FE], W: param[2 * D + FE, H]) -> edge[H] {
    return concat(x[dst], x[src], e) @ W
}
"""


def test_concat_of_different_symbols_is_their_sum():
    program = mpdsl.compile(CONCAT_SOURCE).ir
    concat = next(v for v in program.values if v.op == "concat")
    assert concat.type.shape == (D * 2 + FE,)
    assert next(v for v in program.values if v.op == "param").type.shape == (FE + D * 2, Dim(5))


def test_a_layer_over_a_concatenation_takes_one_weight():
    """Checked generically (D, FE, K symbols of the layer), then at a call with other widths."""
    source = """
layer edge_mlp(e: edge[FE], h: node[D], W: param[FE + 2 * D, K], b: param[K]) -> edge[K] {
    return relu(concat(e, h[src], h[dst]) @ W + b)
}
model m(x: node[F], ea: edge[G], W: param[G + 2 * F, 3], b: param[3]) -> edge[3] {
    return edge_mlp(ea, x, W, b)
}
"""
    model = mpdsl.compile(source, dtype="float64")
    rng = np.random.default_rng(0)
    g = Graph(np.array([[0, 1, 2, 2], [1, 2, 0, 1]]), 3, node_data={"x": rng.standard_normal((3, 4))},
              edge_data={"ea": rng.standard_normal((4, 2))})
    W, b = rng.standard_normal((10, 3)), rng.standard_normal(3)
    with pytest.raises(mpdsl.WeightsError, match="cannot bind F and G"):  # the weights alone cannot say
        model.load_weights({"W": W, "b": b})
    out = model.init(0, graph=g).load_weights({"W": W, "b": b})(g)  # F and G kept from the graph
    src, dst = g.edge_index
    want = np.maximum(np.concatenate([g["ea"], g["x"][src], g["x"][dst]], axis=1) @ W + b, 0)
    np.testing.assert_allclose(out, want, rtol=1e-12)
    assert model.dims == {"F": 4, "G": 2}


def test_shape_literals_and_results_take_sums():
    source = """
layer widen(x: node[H, K], y: node[H, 1]) -> node[H * K + H] {
    return reshape(concat(x, y), [H * (K + 1)])
}
model m(x: node[H, K], y: node[H, 1]) -> node[(K + 1) * H] {
    return widen(x, y)
}
"""
    model = mpdsl.compile(source, dtype="float64")
    assert model.ir.outputs[0][1].type.shape == (H * K + H,)
    x, y = np.arange(24.0).reshape(2, 3, 4), -np.arange(6.0).reshape(2, 3, 1)
    g = Graph.from_arrays(np.zeros((2, 0), dtype=np.int64), 2)
    np.testing.assert_array_equal(model(g, x=x, y=y), np.concatenate([x, y], axis=2).reshape(2, 15))


def test_integers_and_parentheses():
    source = "model m(x: node[F], W: param[(F + 1) * 2, 3]) -> node[3] {\n" \
             "    return concat(x, x, reshape(in_degree(), [1]), reshape(out_degree(), [1])) @ W\n}\n"
    program = mpdsl.compile(source).ir
    assert next(v for v in program.values if v.op == "param").type.shape == (F * 2 + 2, Dim(3))


# ---- binding from data ------------------------------------------------------------------------------

BIND_SOURCE = """
model m(W: param[2 * D + FE, 3], x: node[D], e: edge[FE], bd: param[D]) -> edge[3] {
    return concat(x[src] + bd, x[dst], e) @ W
}
"""
GRAPH = Graph(np.array([[0, 1, 2], [1, 2, 0]]), 3, node_data={"x": np.ones((3, 16))}, edge_data={"e": np.ones((3, 4))})


def test_weights_bind_in_any_order():
    """W is declared first but only solvable once bd has bound D: FE = 36 - 2 * 16."""
    model = mpdsl.compile(BIND_SOURCE, dtype="float64")
    model.load_weights({"W": np.zeros((36, 3)), "bd": np.zeros(16)})
    assert model.dims == {"D": 16, "FE": 4}
    assert model(GRAPH).shape == (3, 3)


def test_inputs_bind_before_the_weights_they_solve():
    model = mpdsl.compile(BIND_SOURCE, dtype="float64").init(0, graph=GRAPH)
    assert model.params["W"].shape == (36, 3) and model.dims == {"D": 16, "FE": 4}


def test_a_sum_solved_for_an_input_dim():
    source = "model m(x: node[D + 1], y: node[D]) -> node[D] {\n    return y\n}\n"
    g = Graph.from_arrays(np.zeros((2, 0), dtype=np.int64), 2, x=np.ones((2, 6)), y=np.ones((2, 5)))
    assert mpdsl.compile(source).bind(g, {})[1]["D"] == 5
    with pytest.raises(mpdsl.InputError, match=r"needs D \+ 1 = 5 \+ 1 = 6"):
        mpdsl.compile(source).bind(g.with_data(x=np.ones((2, 7))), {})


def test_weight_mismatch_shows_the_expression_and_its_values():
    model = mpdsl.compile(BIND_SOURCE, dtype="float64").init(0, graph=GRAPH)
    model.params["W"] = np.zeros((35, 3))
    with pytest.raises(mpdsl.InputError) as info:
        model(GRAPH)
    assert info.value.message == ("parameter 'W' has W.shape[0] = 35 but its declaration W: param[2*D + FE, 3] "
                                  "needs 2*D + FE = 2*16 + 4 = 36")
    assert "D = 16 comes from the graph's array 'x'" in info.value.hint
    assert "FE = 4 comes from the graph's array 'e'" in info.value.hint


def test_torch_module_parameters_are_checked_against_sums():
    torch = pytest.importorskip("torch")
    model = mpdsl.compile(BIND_SOURCE, dtype="float64").init(0, graph=GRAPH)
    module = model.to_torch(GRAPH)
    assert module(GRAPH).shape == (3, 3)
    module.W = torch.nn.Parameter(torch.zeros(37, 3, dtype=torch.float64))
    with pytest.raises(mpdsl.InputError, match=r"needs 2\*D \+ FE = 2\*16 \+ 4 = 36"):
        module(GRAPH)


@pytest.mark.parametrize("rows,reason", [
    (35, "2*D + FE = 35 with FE = 4 gives D = 31/2, which is not an integer"),
    (4, "2*D + FE = 4 with FE = 4 gives D = 0, which is not positive"),
])
def test_a_solution_must_be_a_positive_integer(rows, reason):
    source = "model m(W: param[2 * D + FE, 3], x: node[D], e: edge[FE], be: param[FE]) -> node[D] {\n" \
             "    return x\n}\n"
    model = mpdsl.compile(source)
    with pytest.raises(mpdsl.WeightsError) as info:
        model.load_weights({"W": np.zeros((rows, 3)), "be": np.zeros(4)})
    assert info.value.message == (f"weight 'W' has W.shape[0] = {rows}, which its declaration "
                                  f"W: param[2*D + FE, 3] cannot fit: {reason}")
    assert "FE = 4 comes from the weights given to load_weights (be.shape[0] = 4)" in info.value.hint


def test_a_dim_with_two_unknowns_needs_another_array():
    model = mpdsl.compile(CONCAT_SOURCE)
    with pytest.raises(mpdsl.WeightsError) as info:
        model.load_weights({"W": np.zeros((36, 5))})
    assert info.value.message == ("weight 'W': cannot bind D and FE from W.shape[0] = 36 (declared "
                                  "W: param[2*D + FE, H]): 2*D + FE has 2 unknowns and no other array binds them")
    assert info.value.hint.startswith("bind D from an array that has it alone as a dim: run the model on a "
                                      "graph first, or init(seed, graph=g)")
    g = Graph(np.array([[0], [1]]), 2, node_data={"x": np.ones((2, 16))}, edge_data={"e": np.ones((1, 4))})
    model.init(0, graph=g)
    assert model.params["W"].shape == (36, 5)
    model.load_weights({"W": np.ones((36, 5))})  # D and FE keep their values with the parameters before
    assert model.dims == {"H": 5, "D": 16, "FE": 4} and model(g).shape == (1, 5)
    with pytest.raises(mpdsl.WeightsError, match=r"needs 2\*D \+ FE = 2\*16 \+ 4 = 36"):
        model.load_weights({"W": np.ones((37, 5))})


def test_a_dim_fixed_by_an_override_solves_the_rest():
    model = mpdsl.compile(CONCAT_SOURCE, dims={"D": 16})
    assert model.load_weights({"W": np.zeros((36, 5))}).dims["FE"] == 4


# ---- file-level dims inside layers -------------------------------------------------------------------


def test_a_layer_loops_over_a_file_dim_and_uses_it_in_its_signature():
    source = """
dim T = 3
dim K = 4
layer steps(h: node[D], W: param[T, D, D], b: param[K]) -> node[D] {
    for t in 0..T {
        h = relu(h @ W[t])
    }
    return h + sum(b, -1) * T
}
model m(x: node[F], W: param[T, F, F], b: param[K]) -> node[F] {
    return steps(x, W, b)
}
"""
    model = mpdsl.compile(source, dtype="float64")
    rng = np.random.default_rng(1)
    x, W, b = rng.standard_normal((3, 2)), rng.standard_normal((3, 2, 2)), rng.standard_normal(4)
    g = Graph.from_arrays(np.zeros((2, 0), dtype=np.int64), 3, x=x)
    h = x
    for t in range(3):
        h = np.maximum(h @ W[t], 0)
    np.testing.assert_allclose(model.load_weights({"W": W, "b": b})(g), h + b.sum() * 3, rtol=1e-12)
    assert sum(v.op == "matmul" for v in model.ir.values) == 3
    overridden = mpdsl.compile(source, dims={"T": 2})
    assert sum(v.op == "matmul" for v in overridden.ir.values) == 2


def test_a_file_dim_in_a_layer_signature_is_checked_at_each_call():
    source = "dim K = 4\nlayer l(b: param[K]) -> param[K] {\n    return b\n}\n" \
             "model m(x: node[F], b: param[5]) -> node[F] {\n    return x + sum(l(b), -1)\n}\n"
    with pytest.raises(mpdsl.CompileError, match=r"expected param\[K\], got param\[5\] f32 \(dim K = 4 but got 5\)"):
        mpdsl.compile(source)


LIB = """
dim T = 2          # the library's own dim
layer repeat(h: node[K], W: param[T, K, K]) -> node[K] {
    for t in 0..T {
        h = h @ W[t]
    }
    return h
}
"""


def test_imported_files_see_their_own_dims_and_lend_them_to_the_importer(tmp_path):
    """The library's layers see its `dim T`; the importing file's layers see it too; the importer's
    `dim K` does not capture the library's generic K."""
    (tmp_path / "lib.mp").write_text(LIB)
    (tmp_path / "main.mp").write_text("""
import "lib.mp"
dim K = 3
layer twice(h: node[D], W: param[T, D, D]) -> node[D] {
    for t in 0..T {
        h = repeat(h, W)
    }
    return h
}
model m(x: node[F], W: param[T, F, F], V: param[K, F]) -> node[F] {
    return twice(x, W) + sum(V, 0)
}
""")
    model = mpdsl.compile(tmp_path / "main.mp", dtype="float64")
    rng = np.random.default_rng(2)
    x, W, V = rng.standard_normal((4, 5)), rng.standard_normal((2, 5, 5)), rng.standard_normal((3, 5))
    g = Graph.from_arrays(np.zeros((2, 0), dtype=np.int64), 4, x=x)
    want = x @ W[0] @ W[1] @ W[0] @ W[1] + V.sum(0)
    np.testing.assert_allclose(model.load_weights({"W": W, "V": V})(g), want, rtol=1e-12)


def test_an_imported_file_does_not_see_the_importers_dims(tmp_path):
    (tmp_path / "lib.mp").write_text("layer l(h: node[D]) -> node[D] {\n    for t in 0..N {\n"
                                     "        h = relu(h)\n    }\n    return h\n}\n")
    (tmp_path / "main.mp").write_text('import "lib.mp"\ndim N = 2\n'
                                      "model m(x: node[F]) -> node[F] {\n    return l(x)\n}\n")
    with pytest.raises(mpdsl.CompileError) as info:
        mpdsl.compile(tmp_path / "main.mp")
    assert info.value.message == "loop bound 'N' is not a known integer"
    assert info.value.span.source.name == "lib.mp"
    assert info.value.hint == (f"`dim N` is declared in {tmp_path / 'main.mp'} (line 2), which this file does not "
                               "import: a layer sees the dims of its own file and of the files it imports")


# ---- limits ---------------------------------------------------------------------------------------


def test_a_long_flat_sum_is_one_level_and_deep_nesting_is_refused():
    flat = " + ".join(["F"] * 3000)
    program = mpdsl.compile(f"model m(x: node[F], W: param[{flat}, 2]) -> node[F] {{\n    return x\n}}\n").ir
    assert next(v for v in program.values if v.op == "param").type.shape == (F * 3000, Dim(2))
    nested = "F"
    for _ in range(60):
        nested = f"({nested} + 1) * 2"
    source = f"model m(x: node[F], W: param[{nested}, 2]) -> node[F] {{\n    return x\n}}\n"
    with pytest.raises(mpdsl.CompileError) as info:
        mpdsl.compile(source)
    assert info.value.message == "dimension nested more than 100 levels deep"
    # Each wrap adds a sum and a product: the 51st sum from inside is level 101, inside 9 more wraps
    # (the shape starts at column 30; that sum after the 10 parentheses of its own and the outer wraps).
    assert (info.value.line, info.value.col) == (1, 30 + 10)


def test_the_rules_that_add_dims_add_symbolic_ones():
    """concat and pad (autodiff's transpose of slice) grow an axis by a sum, symbolic or not."""
    from mpdsl.ops import OPS
    from mpdsl.types import Domain, TensorType

    node = TensorType(Domain.NODE, (H, F), "f32")
    assert OPS["pad"].infer([node], {"axis": -1, "before": 1, "after": 2}, None).shape == (H, F + 3)
    edge = [TensorType(Domain.EDGE, (d,), "f32") for d in (FE, D, D)]
    assert OPS["concat"].infer(edge, {"axis": 0}, None).shape == (D * 2 + FE,)
