"""Comparisons, logic, ``where``, the math functions, ``pi`` and the constant tensors of the language.

* parsing: precedence (``|`` < ``&`` < ``not`` < comparisons < ``+ -``), comparisons do not chain
  (a located error at the second operator), ``not`` is a keyword;
* every function and operator against torch on the same float64 inputs (rtol 1e-10), on the NumPy
  backend and on the Triton backend under its interpreter;
* gradients through the compiled torch module against torch autograd (rtol 1e-8): ``where`` routes
  the cotangent to the selected side, ``clamp`` passes it inside its closed bounds, comparisons and
  the piecewise-constant functions give zero gradients (as torch's backward does), ``atan2``;
* ``arange`` / ``linspace`` / ``full`` against ``torch.arange`` / ``torch.linspace`` / ``torch.full``
  (sizes from integers, expressions of file-level dims, run-time dims), their dtype (the program's
  float dtype), that they are not parameters, and the constant folder on ``full``;
* misuse: each located by line, column and message.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

import mpdsl
from mpdsl import ast, syntax
from mpdsl.diagnostics import CompileError
from mpdsl.ir import print_program
from mpdsl.passes import optimize

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))
from comparison import one_torch_thread  # noqa: E402, F401  (autouse: torch on one thread here)
from diagnostic_checks import assert_located  # noqa: E402
from test_passes import random_graph  # noqa: E402

RTOL = 1e-10
GRAD_RTOL = 1e-8


def model_source(body: str, args: str = "x: node[F], y: node[F]", result: str = "node[F]", header: str = "") -> str:
    return f"{header}model m({args}) -> {result} {{\n    {body}\n}}\n"


def graph_with(n: int = 9, seed: int = 0, **arrays) -> mpdsl.Graph:
    rng = np.random.default_rng(seed)
    edge_index = rng.integers(0, n, (2, 3 * n))
    return mpdsl.Graph.from_arrays(edge_index, n, **arrays)


def run_both_backends(source: str, graph: mpdsl.Graph, **inputs) -> np.ndarray:
    """The model's output on the NumPy backend, checked equal to the Triton backend's (interpreter)."""
    pytest.importorskip("triton")
    from mpdsl.backends.triton_backend import TritonBackend
    from mpdsl.runtime import CompiledModel

    model = mpdsl.compile(source, dtype="float64", seed=0)
    want = model(graph, **inputs)
    twin = CompiledModel(model.ir, TritonBackend(interpret=True, device="cpu"), seed=0).load_weights(model.params)
    got = twin(graph, **inputs)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-14, equal_nan=True)
    return want


# ---- parsing -------------------------------------------------------------------------------------


def parsed_expr(text: str) -> ast.Expr:
    module = syntax.parse(model_source(f"return {text}"))
    return module.models[0].body[-1].values[0]


def shape_of(e) -> str:
    """The operator tree of an expression: op(lhs, rhs), not(x), names."""
    if isinstance(e, ast.BinOp):
        return f"{e.op}({shape_of(e.lhs)}, {shape_of(e.rhs)})"
    if isinstance(e, ast.Not):
        return f"not({shape_of(e.operand)})"
    if isinstance(e, ast.Neg):
        return f"neg({shape_of(e.operand)})"
    if isinstance(e, ast.Name):
        return e.id
    if isinstance(e, ast.Number):
        return str(e.value)
    return type(e).__name__


@pytest.mark.parametrize("text,tree", [
    ("a < b + 1", "lt(a, add(b, 1.0))"),
    ("a * 2 >= b - c", "ge(mul(a, 2.0), sub(b, c))"),
    ("a > 0 & b > 0 | c == d", "logical_or(logical_and(gt(a, 0.0), gt(b, 0.0)), eq(c, d))"),
    ("a | b & c", "logical_or(a, logical_and(b, c))"),
    ("not a < b & c", "logical_and(not(lt(a, b)), c)"),
    ("not not a", "not(not(a))"),
    ("a & b & c", "logical_and(logical_and(a, b), c)"),
    ("-a <= b ** 2", "le(neg(a), pow(b, 2.0))"),
    ("(a < b) != (c > d)", "ne(lt(a, b), gt(c, d))"),
    ("(a < b) < c", "lt(lt(a, b), c)"),
])
def test_precedence(text, tree):
    assert shape_of(parsed_expr(text)) == tree


def test_not_is_a_keyword():
    with pytest.raises(CompileError) as err:
        syntax.parse(model_source("not = x\n    return x"))
    assert (err.value.span.line, err.value.span.col) == (2, 5)


def test_long_logical_chains_are_one_nesting_level():
    chain = " & ".join(["x > 0"] * 300)
    model = mpdsl.compile(model_source(f"return x * ({chain})"), dtype="float64")
    assert sum(v.op == "logical_and" for v in model.ir.values) == 299


# ---- values against torch -------------------------------------------------------------------------

# (mpdsl expression of x, y: node[3] in (-0.9, 0.9) and z: node[3] in (0.5, 2)), torch function of them
FUNCTIONS = [
    ("sin(x)", lambda x, y, z: torch.sin(x)),
    ("cos(x)", lambda x, y, z: torch.cos(x)),
    ("tan(x)", lambda x, y, z: torch.tan(x)),
    ("asin(x)", lambda x, y, z: torch.asin(x)),
    ("acos(x)", lambda x, y, z: torch.acos(x)),
    ("atan(3 * x)", lambda x, y, z: torch.atan(3 * x)),
    ("atan2(x, y)", lambda x, y, z: torch.atan2(x, y)),
    ("sinh(2 * x)", lambda x, y, z: torch.sinh(2 * x)),
    ("cosh(2 * x)", lambda x, y, z: torch.cosh(2 * x)),
    ("log1p(x)", lambda x, y, z: torch.log1p(x)),
    ("expm1(x)", lambda x, y, z: torch.expm1(x)),
    ("log2(z)", lambda x, y, z: torch.log2(z)),
    ("log10(z)", lambda x, y, z: torch.log10(z)),
    ("erf(2 * x)", lambda x, y, z: torch.erf(2 * x)),
    ("sign(x)", lambda x, y, z: torch.sign(x)),
    ("floor(3 * x)", lambda x, y, z: torch.floor(3 * x)),
    ("ceil(3 * x)", lambda x, y, z: torch.ceil(3 * x)),
    ("round(3 * x)", lambda x, y, z: torch.round(3 * x)),
    ("round(2 * floor(4 * x) + 0.5)", lambda x, y, z: torch.round(2 * torch.floor(4 * x) + 0.5)),  # halves to even
    ("trunc(3 * x)", lambda x, y, z: torch.trunc(3 * x)),
    ("clamp(x, -0.3, 0.5)", lambda x, y, z: torch.clamp(x, -0.3, 0.5)),
    ("clamp(x, min=0.2)", lambda x, y, z: torch.clamp(x, min=0.2)),
    ("clamp(x, max=-0.2)", lambda x, y, z: torch.clamp(x, max=-0.2)),
    ("x * pi", lambda x, y, z: x * math.pi),
    ("x < y", lambda x, y, z: (x < y).double()),
    ("x <= floor(y)", lambda x, y, z: (x <= torch.floor(y)).double()),
    ("x > y", lambda x, y, z: (x > y).double()),
    ("floor(x) >= floor(y)", lambda x, y, z: (torch.floor(x) >= torch.floor(y)).double()),
    ("sign(x) == sign(y)", lambda x, y, z: (torch.sign(x) == torch.sign(y)).double()),
    ("sign(x) != sign(y)", lambda x, y, z: (torch.sign(x) != torch.sign(y)).double()),
    ("x > 0 & y > 0", lambda x, y, z: ((x > 0) & (y > 0)).double()),
    ("x > 0 | y > 0", lambda x, y, z: ((x > 0) | (y > 0)).double()),
    ("not x > 0", lambda x, y, z: (~(x > 0)).double()),
    ("not floor(3 * x)", lambda x, y, z: torch.logical_not(torch.floor(3 * x)).double()),
    ("where(x > y, x, y)", lambda x, y, z: torch.where(x > y, x, y)),
    ("where(floor(2 * x), z, 0)", lambda x, y, z: torch.where(torch.floor(2 * x) != 0, z, torch.zeros(()).double())),
    ("where(x > 0, sum(z, -1), y)", lambda x, y, z: torch.where(x > 0, z.sum(-1, keepdim=True), y)),
]


@pytest.mark.parametrize("expr,reference", FUNCTIONS, ids=[f[0] for f in FUNCTIONS])
def test_functions_equal_torch_on_both_backends(expr, reference):
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-0.9, 0.9, (2, 9, 3))
    z = rng.uniform(0.5, 2.0, (9, 3))
    x[0, 0], y[0, 0] = 0.5, 0.5  # a tie, and ...
    x[1, 1], y[1, 1] = 0.0, -0.25  # ... a zero
    graph = graph_with(x=x, y=y, z=z)
    got = run_both_backends(model_source(f"return {expr}", "x: node[F], y: node[F], z: node[F]"), graph)
    want = reference(*(torch.from_numpy(a) for a in (x, y, z))).numpy()
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=RTOL, atol=1e-14)


def test_gcn_norm_mask_with_where():
    """where(in_degree() > 0, rsqrt(in_degree()), 0): finite, 0 at nodes without in-edges."""
    graph = random_graph(0, nodes=12, edges=30)
    got = run_both_backends(model_source("return where(in_degree() > 0, rsqrt(in_degree()), 0)", "",
                                         "node[]"), graph)
    degree = np.bincount(graph.edge_index[1], minlength=graph.num_nodes)
    assert (degree == 0).any() and np.isfinite(got).all()
    np.testing.assert_array_equal(got == 0, degree == 0)
    np.testing.assert_allclose(got[degree > 0], 1 / np.sqrt(degree[degree > 0]), rtol=RTOL)


# ---- gradients through the torch module -----------------------------------------------------------


def torch_module_and_reference_grads(source: str, reference, graph, weights: dict[str, np.ndarray],
                                     inputs: dict[str, np.ndarray]):
    """(mpdsl's gradients, torch autograd's) of <out, R> for a fixed R, with respect to the weights
    and the float inputs, through the compiled torch module on ``graph``."""
    model = mpdsl.compile(source, dtype="float64").load_weights(weights)
    module = model.to_torch(graph)
    given = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.items()}
    out = module(graph, **given)
    projection = torch.from_numpy(np.random.default_rng(5).normal(size=tuple(out.shape)))
    (out * projection).sum().backward()
    got = {k: _grad(getattr(module, k)) for k in weights} | {k: _grad(t) for k, t in given.items()}
    ref_w = {k: torch.tensor(v, requires_grad=True) for k, v in weights.items()}
    ref_i = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.items()}
    ref_out = reference(**ref_w, **ref_i)
    np.testing.assert_allclose(out.detach().numpy(), ref_out.detach().numpy(), rtol=RTOL, atol=1e-13)
    (ref_out * projection).sum().backward()
    want = {k: _grad(t) for k, t in (ref_w | ref_i).items()}
    return got, want


def _grad(t) -> np.ndarray:
    """A leaf's gradient (zeros where nothing reached it)."""
    return t.grad.numpy() if t.grad is not None else np.zeros(tuple(t.shape))


H: dict = {}  # the reference's other inputs: the expressions below read x and y from here


@pytest.mark.parametrize("expr,reference", [
    ("where(h > 0.1, h * h, 2 * h)", lambda h: torch.where(h > 0.1, h * h, 2 * h)),
    ("where(x < y, h, 0) + where(x < y, 0, sin(h))",
     lambda h: torch.where(H["x"] < H["y"], h, 0.0) + torch.where(H["x"] < H["y"], 0.0, torch.sin(h))),
    ("clamp(h, -0.5, 0.25)", lambda h: torch.clamp(h, -0.5, 0.25)),
    ("clamp(h, min=0.0) * h", lambda h: torch.clamp(h, min=0.0) * h),
    ("floor(3 * h) * h + round(h) + sign(h) + ceil(h) + trunc(h)",
     lambda h: torch.floor(3 * h) * h + torch.round(h) + torch.sign(h) + torch.ceil(h) + torch.trunc(h)),
    ("(h > 0) * h + (h < x) * x", lambda h: (h > 0).double() * h + (h < H["x"]).double() * H["x"]),
    ("atan2(h, x + 2)", lambda h: torch.atan2(h, H["x"] + 2)),
    ("sin(h) * cos(x) + tan(0.5 * h) + asin(0.5 * tanh(h)) + acos(0.5 * tanh(x + h)) + atan(h)",
     lambda h: (torch.sin(h) * torch.cos(H["x"]) + torch.tan(0.5 * h) + torch.asin(0.5 * torch.tanh(h))
                + torch.acos(0.5 * torch.tanh(H["x"] + h)) + torch.atan(h))),
    ("sinh(h) + cosh(h) + log1p(h * h) + expm1(h) + log2(1 + h * h) + log10(2 + h) + erf(h)",
     lambda h: (torch.sinh(h) + torch.cosh(h) + torch.log1p(h * h) + torch.expm1(h) + torch.log2(1 + h * h)
                + torch.log10(2 + h) + torch.erf(h))),
], ids=["where", "where-both-sides", "clamp", "clamp-min", "piecewise-constant", "comparisons", "atan2", "trig",
        "hyperbolic-log"])
def test_gradients_through_the_torch_module_equal_torch(expr, reference):
    rng = np.random.default_rng(2)
    n = 10
    x, y = rng.uniform(-1, 1, (2, n, 3))
    W = rng.normal(size=(3, 3)) / 2
    graph = graph_with(n, x=x, y=y)
    source = model_source(f"h = x @ W\n    return {expr}", "x: node[3], y: node[3], W: param[3, 3]", "node[3]")
    H.clear()

    def ref(W, x, y):
        H.update(x=x, y=y)
        return reference(x @ W)

    got, want = torch_module_and_reference_grads(source, ref, graph, {"W": W}, {"x": x, "y": y})
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=GRAD_RTOL, atol=1e-12, err_msg=key)


def test_clamp_gradient_includes_the_bounds_as_torch():
    graph = graph_with(4, x=np.array([[-1.0], [-0.5], [0.25], [0.7]]))
    got, want = torch_module_and_reference_grads(
        model_source("return clamp(x * s, -0.5, 0.25)", "x: node[1], s: param[1]", "node[1]"),
        lambda s, x: torch.clamp(x * s, -0.5, 0.25), graph, {"s": np.array([1.0])}, {"x": graph["x"]})
    np.testing.assert_allclose(got["x"], want["x"], rtol=GRAD_RTOL)
    assert (got["x"][1:3] != 0).all() and got["x"][0] == 0 and got["x"][3] == 0  # bounds included


def test_a_parameter_only_behind_piecewise_constant_ops_gets_a_zero_gradient():
    graph = graph_with(5, x=np.linspace(-1, 1, 15).reshape(5, 3))
    source = model_source("return x + floor(x * s) + (x * s > 0) + sign(x * s)", "x: node[3], s: param[3]",
                          "node[3]")
    got, want = torch_module_and_reference_grads(
        source, lambda s, x: x + torch.floor(x * s) + (x * s > 0).double() + torch.sign(x * s), graph,
        {"s": np.array([0.5, 1.5, -2.0])}, {"x": graph["x"]})
    assert (want["s"] == 0).all() and (got["s"] == 0).all()
    np.testing.assert_allclose(got["x"], want["x"], rtol=GRAD_RTOL)


# ---- constants ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("expr,reference", [
    ("arange(5)", lambda: torch.arange(5)),
    ("arange(1, 9)", lambda: torch.arange(1, 9)),
    ("arange(0, 10, 3)", lambda: torch.arange(0, 10, 3)),
    ("arange(10, 0, -3)", lambda: torch.arange(10, 0, -3)),
    ("arange(-2, 3)", lambda: torch.arange(-2, 3)),
    ("arange(0.5, 2.0, 0.25)", lambda: torch.arange(0.5, 2.0, 0.25, dtype=torch.float64)),
    ("arange(1, 1.3, 0.1)", lambda: torch.arange(1, 1.3 - 1e-12, 0.1, dtype=torch.float64)),  # 3 steps, not 4
    ("arange(0, 2 * pi, pi / 4)", lambda: torch.arange(0, 2 * math.pi, math.pi / 4, dtype=torch.float64)),
    ("arange(1, NB + 1)", lambda: torch.arange(1, 9)),
    ("arange(NB * 2)", lambda: torch.arange(16)),
    ("linspace(0, 1, 5)", lambda: torch.linspace(0, 1, 5, dtype=torch.float64)),
    ("linspace(-3, 7.5, 1)", lambda: torch.linspace(-3, 7.5, 1, dtype=torch.float64)),
    ("linspace(0, 5, NB)", lambda: torch.linspace(0, 5, 8, dtype=torch.float64)),
    ("linspace(2, -1, 7)", lambda: torch.linspace(2, -1, 7, dtype=torch.float64)),
    ("linspace(0.1, 1.0, 4)", lambda: torch.linspace(0.1, 1.0, 4, dtype=torch.float64)),  # 0.1 + 3 * 0.3 < 1.0
    ("linspace(0.1, 0.7, 2 * NB + 1)", lambda: torch.linspace(0.1, 0.7, 17, dtype=torch.float64)),
    ("full([3], 0.5)", lambda: torch.full((3,), 0.5, dtype=torch.float64)),
    ("full([2, NB], -pi)", lambda: torch.full((2, 8), -math.pi, dtype=torch.float64)),
])
def test_constant_tensors_equal_torch(expr, reference):
    want = reference().double().numpy()
    shape = ", ".join(map(str, want.shape))
    source = model_source(f"return {expr}", "x: node[F]", f"param[{shape}]", "dim NB = 8\n")
    got = run_both_backends(source, graph_with(x=np.ones((9, 2))))
    assert got.dtype == np.float64 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=1e-15)
    if expr.startswith("linspace"):  # both ends exactly, as torch's (the second half counts back from stop)
        assert (got[0], got[-1]) == (want[0], want[-1])
    single = mpdsl.compile(source, dtype="float32")(graph_with(x=np.ones((9, 2))))
    assert single.dtype == np.float32
    np.testing.assert_allclose(single, want.astype(np.float32), rtol=1e-7)


def test_constants_from_run_time_dims():
    source = model_source("return x * linspace(0, 1, F) + arange(F) + full([F], 2)", "x: node[F]")
    for width in (1, 4):
        x = np.random.default_rng(width).normal(size=(6, width))
        got = run_both_backends(source, graph_with(6, x=x))
        want = x * torch.linspace(0, 1, width, dtype=torch.float64).numpy() + np.arange(width) + 2
        np.testing.assert_allclose(got, want, rtol=RTOL)


def test_constants_are_not_parameters_and_get_no_gradient():
    source = model_source("return x @ W * arange(1, 4) + full([3], 0.5) + linspace(0, 1, 3)",
                          "x: node[2], W: param[2, 3]", "node[3]")
    model = mpdsl.compile(source, dtype="float64", seed=0)
    assert set(model.param_types) == {"W"} and set(model.param_inits) == {"W"}
    graph = graph_with(5, x=np.ones((5, 2)))
    module = model.to_torch(graph)
    assert [n for n, _ in module.named_parameters()] == ["W"]
    module(graph).sum().backward()
    want = np.ones((5, 1)).T @ np.ones((5, 2))  # d sum / d W[i, j] = (sum of x[:, i]) * (j + 1)
    np.testing.assert_allclose(module.W.grad.numpy(), want.T * np.arange(1, 4), rtol=GRAD_RTOL)


def test_the_constant_folder_sees_through_full():
    """full([2], c) is a broadcast constant: products of them fold into one, x * full(.., 1) is x,
    and + full(.., 0) vanishes."""
    x = np.arange(6.0).reshape(3, 2)
    for body, kept, want in [
        ("x * full([2], 1.0) + full([2], 2.0) * full([2], 3.0)", ["add", "broadcast", "value=6.0"], x + 6),
        ("x * full([2], 1.0) + full([2], 2.0) * full([2], 3.0) * 0", [], x),
    ]:
        model = mpdsl.compile(model_source(f"return {body}", "x: node[2]", "node[2]"), dtype="float64")
        folded, _ = optimize(model.ir, ["constant_folding", "dce"], {})
        ops = [v.op for v in folded.values if v.op != "input"]
        assert ops == (["const", "broadcast", "add"] if kept else []), print_program(folded)
        assert all(k in print_program(folded) for k in kept)
        np.testing.assert_array_equal(model(graph_with(3, x=x)), want)


def test_pi_is_a_name_that_the_program_may_shadow():
    graph = graph_with(3, x=np.ones((3, 1)))
    assert mpdsl.compile(model_source("return x * pi", "x: node[1]", "node[1]"), dtype="float64")(graph)[0, 0] == math.pi
    shadowed = mpdsl.compile(model_source("pi = x * 3\n    return pi", "x: node[1]", "node[1]"), dtype="float64")
    assert shadowed(graph)[0, 0] == 3.0


def test_constants_in_layers_use_the_dims_of_each_call():
    source = ("layer scaled(h: node[D]) -> node[D] {\n    return h * arange(1, D + 1) + linspace(0, D, D)\n}\n"
              "model m(x: node[4], y: node[2]) -> node[4] {\n    return scaled(x) + sum(scaled(y), -1)\n}\n")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 4)), rng.normal(size=(5, 2))
    got = run_both_backends(source, graph_with(5, x=x, y=y))
    want = x * np.arange(1, 5) + np.linspace(0, 4, 4) + (y * np.arange(1, 3) + np.linspace(0, 2, 2)).sum(-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=RTOL)


# ---- misuse ------------------------------------------------------------------------------------------

MISUSE = [
    ("chain", model_source("return x * (x < y < 2)"), 2, 23, "comparisons do not chain: '<' and then '<'"),
    ("chain_eq", model_source("return x * (x == y != x)"), 2, 24, "comparisons do not chain: '==' and then '!='"),
    ("int_compare", model_source("return x * (t == 1)", "x: node[F], t: node int"), 2, 17,
     "'==' compares float values, got node[] i64"),
    ("where_arity", model_source("return where(x > 0, x)"), 2, 12, "'where' takes 3 argument(s), got 2"),
    ("where_domains", model_source("return where(x > 0, x[src], y)"), 2, 12,
     "'where' combines edge and node values, which have different rows"),
    ("where_shapes", model_source("return where(x > 0, x, b)", "x: node[F], b: param[3]"), 2, 28,
     "'where': feature shapes [F] and [F] and [3] do not broadcast (axis 0: F vs 3)"),
    ("not_float", model_source("return x * (not t)", "x: node[F], t: node int"), 2, 21,
     "'not' needs float values, got node[] i64"),
    ("clamp_order", model_source("return clamp(x, 2, 1)"), 2, 12, "clamp needs lo <= hi, got lo=2.0, hi=1.0"),
    ("clamp_bound", model_source("return clamp(x, y, 1)"), 2, 21, "the min of clamp must be a constant number"),
    ("clamp_twice", model_source("return clamp(x, 0, min=1)"), 2, 24, "clamp's min is given twice"),
    ("clamp_none", model_source("return clamp(x)"), 2, 12, "'clamp' takes x and one or two bounds, got 1 argument(s)"),
    ("arange_fraction", model_source("return x * arange(0, 1, 0.3)"), 2, 16,
     "arange(0, 1, 0.3) has a non-integer number of steps: (stop - start) / step = 3.33333"),
    ("arange_empty", model_source("return x * arange(5, 1)"), 2, 16,
     "arange(5, 1) is empty: stop is not beyond start in the direction of the step"),
    ("arange_zero_step", model_source("return x * arange(0, 4, 0)"), 2, 29, "arange(0, 4, 0): the step is 0"),
    ("arange_arity", model_source("return x * arange(0, 4, 1, 2)"), 2, 16, "'arange' takes 3 argument(s), got 4"),
    ("arange_value", model_source("return x * arange(x)"), 2, 23, "the stop of arange must be a constant number"),
    ("arange_run_time", model_source("return x * arange(1, F)"), 2, 16,
     "the length of this arange depends on 'F', which is only known at run time"),
    ("arange_run_time_expr", model_source("return x * arange(0, F * 2)"), 2, 26,
     "dimension 'F' is only known at run time, but the stop of arange is needed at compile time"),
    ("arange_huge", model_source("return x * arange(0, 10 ** 100)"), 2, 26, "the stop of arange is larger than 2**63 - 1"),
    ("arange_div_zero", model_source("return x * arange(0, 1 / 0)"), 2, 26, "the stop of arange: division by zero"),
    ("arange_unknown", model_source("return x * arange(0, NB)"), 2, 26, "unknown name 'NB'"),
    ("linspace_zero", model_source("return x * linspace(0, 1, 0)"), 2, 31, "linspace(..., 0) has no elements"),
    ("linspace_negative", model_source("return x * linspace(0, 1, -2)"), 2, 31, "linspace(..., -2) has no elements"),
    ("linspace_fraction", model_source("return x * linspace(0, 1, 2.5)"), 2, 31,
     "the count of linspace must be a whole number, got 2.5"),
    ("linspace_arity", model_source("return x * linspace(0, 1)"), 2, 16, "'linspace' takes 3 argument(s), got 2"),
    ("full_shape", model_source("return x * full(3, 1.0)"), 2, 21, "the shape of full must be a literal like [H, C]"),
    ("full_value", model_source("return x * full([F], y)"), 2, 26, "the value of full must be a constant number"),
    ("full_dim", model_source("return x * full([K], 1)"), 2, 22, "unbound dimension 'K' in full"),
    ("full_broadcast", model_source("return x * full([3], 1)", "x: node[2]", "node[2]"), 2, 16,
     "'*': feature shapes [2] and [3] do not broadcast (axis 0: 2 vs 3)"),
    ("pi_typo", model_source("return x * pii"), 2, 16, "unknown name 'pii'"),
    ("sin_arity", model_source("return sin(x, 2)"), 2, 12, "'sin' takes 1 argument(s), got 2"),
    ("atan2_arity", model_source("return atan2(x)"), 2, 12, "'atan2' takes 2 argument(s), got 1"),
]


@pytest.mark.parametrize("name,source,line,col,message", MISUSE, ids=[c[0] for c in MISUSE])
def test_misuse_is_located(name, source, line, col, message):
    with pytest.raises(CompileError) as err:
        mpdsl.compile(source)
    assert_located(err.value, source, line, col, message)


def test_a_count_bound_at_run_time_is_checked_when_bound():
    model = mpdsl.compile(model_source("return x * linspace(0, 1, F)", "x: node[F]"))
    with pytest.raises(CompileError) as err:
        model(graph_with(3, x=np.ones((3, 0))))
    e = err.value
    assert (e.span.line, e.span.col) == (2, 16)
    assert e.message == ("linspace of 0 elements: a constant sequence needs at least one "
                         "(with F = 0 from input 'x')")
