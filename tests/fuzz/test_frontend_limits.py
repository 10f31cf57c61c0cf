"""The frontend faults the fuzz campaign found, each now a located user error (or, where the
input is fine, a result): unbounded compile work, deep nesting, huge numbers, non-ASCII einsum
subscripts, zero-size reductions, `= constant` without a value, several models, and source
lines quoted as the parser counts them."""

from __future__ import annotations

import numpy as np
import pytest

import mpdsl
from mpdsl import ast, syntax
from mpdsl.cli import main
from mpdsl.limits import MAX_BRACKET_DEPTH, MAX_INT, MAX_NESTING, MAX_STEPS

KARATE = mpdsl.Graph.from_arrays(np.array([[0, 1, 2, 3], [1, 2, 3, 0]]), x=np.eye(4, dtype=np.float32))


def model(body: str, args: str = "x: node[F]", result: str = "node[F]", head: str = "") -> str:
    return f"{head}model m({args}) -> {result} {{\n{body}\n}}\n"


def located(source: str, line: int, col: int, message: str) -> mpdsl.CompileError:
    with pytest.raises(mpdsl.CompileError) as info:
        mpdsl.compile(source)
    err = info.value
    assert message in err.message
    assert (err.line, err.col) == (line, col), err.render()
    assert err.hint, err.render()
    return err


DOUBLING = "layer l0(h: node[D]) -> node[D] {\n    return h\n}\n" + "".join(
    f"layer l{i}(h: node[D]) -> node[D] {{\n    return l{i - 1}(l{i - 1}(h))\n}}\n" for i in range(1, 40))


@pytest.mark.parametrize("source,line,col,message", [
    (model("    h = x\n    for t in 0..1000000000 { h = relu(h) }\n    return h"), 3, 14,
     f"runs 1000000000 iterations; at most {MAX_STEPS} can be unrolled"),
    (model("    h = x\n    for t in 0..10000 { for u in 0..10000 { h = h } }\n    return h"), 3, 14,
     f"this loop expands to more than {MAX_STEPS} steps"),
    (DOUBLING + model("    return l39(x)"), 44, 12, "the call of layer 'l13' expands to more than"),  # l14 alone
    (model("    return " + " + ".join(["x"] * (MAX_STEPS + 10))), 2, 12, f"more than {MAX_STEPS} IR values"),
], ids=["huge-loop", "nested-loops", "layer-doubling", "huge-flat-sum"])
def test_unbounded_compile_work_is_refused(source, line, col, message):
    err = located(source, line, col, message)
    assert "unroll" in err.hint or "split" in err.hint


@pytest.mark.parametrize("nesting,col", [
    ("relu({})", 12 + 5 * MAX_NESTING),  # the first construct past the limit, counted from the outside
    ("-{}", 12 + MAX_NESTING),
    ("{}[src][dst]", 12),  # a postfix chain starts at its base
    ("x ** {}", 12 + 5 * MAX_NESTING),
    ("exp(sum({}, -1) + x)", 12 + 8 * (MAX_NESTING // 2)),  # two levels per copy
])
def test_deep_nesting_is_a_located_error(nesting, col):
    expr = "x"
    for _ in range(1000):
        expr = nesting.format(expr)
    result = "edge[F]" if "[src]" in nesting else "node[F]"
    source = model(f"    return {expr}", result=result)
    err = located(source, 2, col, f"nested more than {MAX_NESTING}")
    assert "h1 = " in err.hint
    with pytest.raises(mpdsl.CompileError) as parsed:  # refused by the parser already: no deep AST exists
        syntax.parse(source)
    assert (parsed.value.line, parsed.value.col) == (2, col)


def test_nesting_up_to_the_limit_compiles():
    expr = "x"
    for _ in range(MAX_NESTING):
        expr = f"relu({expr})"
    assert mpdsl.compile(model(f"    return {expr}"))(KARATE).shape == (4, 4)
    located(model(f"    return relu({expr})"), 2, 12 + 5 * MAX_NESTING, "nested more than")
    right = "x"
    for _ in range(MAX_NESTING):
        right = f"x + ({right})"
    assert mpdsl.compile(model(f"    return {right}"))(KARATE).shape == (4, 4)
    located(model(f"    return x + ({right})"), 2, 12 + 5 * (MAX_NESTING + 1), "nested more than")  # the right operand


def test_nesting_through_inlined_layers_is_counted():
    chain = "layer l0(h: node[D]) -> node[D] {\n    return relu(h)\n}\n" + "".join(
        f"layer l{i}(h: node[D]) -> node[D] {{\n    y = l{i - 1}(h)\n    return y\n}}\n" for i in range(1, 300))
    with pytest.raises(mpdsl.CompileError, match=f"nested more than {MAX_NESTING} levels deep"):
        mpdsl.compile(chain + model("    return l299(x)"))


def test_a_long_flat_chain_just_works():
    source = model("    return " + " + ".join(["x"] * 1000) + " - x * 2 * 3")
    out = mpdsl.compile(source, dtype="float64")(KARATE)
    np.testing.assert_allclose(out, (1000 - 6) * np.eye(4))
    parens = model("    return " + "(" * 5000 + "x" + ")" * 5000)
    np.testing.assert_allclose(mpdsl.compile(parens)(KARATE), np.eye(4))
    dumped = ast.dump(syntax.parse(source))  # the AST dump walks the chain without recursion
    assert dumped.count("BinOp") == 999 + 3


@pytest.mark.parametrize("source,line,col,message", [
    (model("    return x * " + "9" * 5000), 2, 16, "(5000 digits) is too large"),
    (model("    return x * 1e400"), 2, 16, "number 1e400 is too large"),
    ("dim K = " + "9" * 5000 + "\n" + model("    return x"), 1, 9, "(5000 digits) is too large"),
    (f"dim K = {2**63}\n" + model("    return x"), 1, 9, f"dimension {2**63} is too large"),
    (model("    return x @ W[" + "9" * 30 + "]", "x: node[F], W: param[3, F, F]"), 2, 18,
     "index 9999999999...999999 (30 digits) is too large"),
    (model("    return x @ W[" + "9" * 400 + "]", "x: node[F], W: param[3, F, F]"), 2, 18, "number 9999999999...999999 (400 digits) is too large"),
    (model("    return sum(x, " + "9" * 30 + ")", result="node[]"), 2, 19, "axis 9999999999...999999 (30 digits) is too large"),
    (model("    return leaky_relu(x, " + "9" * 400 + ")"), 2, 26, "is too large"),
    (model("    return one_hot(t, " + "9" * 25 + ")", "x: node[F], t: node int", "node[3]"), 2, 23, "too large"),
    (f"dim K = {2**62}\n" + model("    return x @ W", "x: node[F], W: param[F, K, 4]", "node[K, 4]"), 2, 24,
     "the type of 'W' has more than 2**63 - 1 elements per row"),
    (f"dim K = {2**62}\n" + model("    return concat(x @ W, x @ W)", "x: node[F], W: param[F, K]", "node[K]", ), 3, 12,
     "larger than 2**63 - 1"),
], ids=["float-5000-digits", "float-overflow", "dim-5000-digits", "dim-2**63", "index", "index-400-digits", "axis",
        "slope", "classes", "param-size", "concat-size"])
def test_out_of_range_numbers_are_located(source, line, col, message):
    located(source, line, col, message)


def test_largest_dim_is_accepted():
    program = mpdsl.compile(f"dim K = {MAX_INT}\n" + model("    return x"))
    assert program.ir.dims[0] == ("K", MAX_INT)


@pytest.mark.parametrize("spec", ["äb,bc->ac", "ab,bc->aé", "AB,BC->AC", "a\u0301b,bc->ac", "ab,bc->a٣"])
def test_einsum_subscripts_are_ascii_letters(spec):
    source = model(f'    return einsum("{spec}", x, W)', "x: node[A, B], W: param[B, C]", "node[A, C]",
                   "dim A = 2\ndim B = 3\ndim C = 4\n")
    located(source, 5, 12, "use the letters a-z")


@pytest.mark.parametrize("backend", ["numpy", "triton"])
def test_zero_size_feature_axes_reduce_to_zero(backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    for reduce in ("max", "min", "mean", "sum"):
        source = model(f"    return {reduce}(x @ W, -1)", "x: node[F], W: param[F, K]", "node[]", "dim K = 0\n")
        for optimize in (True, False):
            out = mpdsl.compile(source, backend=backend, optimize=optimize)(KARATE)
            np.testing.assert_array_equal(np.asarray(out), np.zeros(4))
    source = model("    return softmax(x @ W, -1)", "x: node[F], W: param[F, K]", "node[K]", "dim K = 0\n")
    assert mpdsl.compile(source, backend=backend)(KARATE).shape == (4, 0)


def test_constant_initializer_needs_a_value():
    err = located(model("    return x @ W", "x: node[F], W: param[F, F] = constant"), 1, 21, "`= constant` needs its value")
    assert "= 0.1" in err.hint
    assert mpdsl.compile(model("    return x @ W", "x: node[F], W: param[F, F] = 0.25")).init(0, F=4).params["W"][0, 0] == 0.25


def test_several_models_are_located_at_the_second():
    source = model("    return x").replace("model m", "model a") + model("    return relu(x)").replace("model m", "model b")
    err = located(source, 4, 7, "the program defines several models (a, b)")
    assert "--model" in err.hint


@pytest.mark.parametrize("space", ["\f", "\v", "\x85", "\u2028", "\u2029", "\r", "\x1c"])
def test_source_lines_are_counted_as_the_parser_counts_them(space):
    source = f"model m(x: node[F]) -> node[F] {{\n    h = x {space} y = h\n    return y + q\n}}\n"
    with pytest.raises(mpdsl.CompileError) as info:
        mpdsl.compile(source)
    err = info.value
    if err.message.startswith("syntax error"):  # \v, U+0085, U+2028, ... are not whitespace: refused where they are
        assert (err.line, err.col) == (2, 11)
        quoted = "    h = x   y = h"
    else:
        assert (err.line, err.message) == (3, "unknown name 'q'")
        quoted = "    return y + q"
    lines = err.render().splitlines()
    assert lines[1] == f"   {err.line} | {quoted}", err.render()
    assert lines[2].index("^") - lines[1].index("|") - 2 == err.col - 1
    assert all(c.isprintable() for line in lines for c in line)


def test_long_lines_are_cut_around_the_caret():
    source = model("    return " + " + ".join(["x"] * 300) + " + q")
    err = located(source, 2, 12 + 4 * 300, "unknown name 'q'")
    quoted, caret = err.render().splitlines()[1:3]
    assert len(quoted) < 140 and quoted.endswith("x + q") and "..." in quoted
    assert quoted[caret.index("^")] == "q"


def test_tabs_keep_the_caret_under_its_column():
    err = located("model m(x: node[F]) -> node[F] {\n\t\treturn\tq\n}\n", 2, 10, "unknown name 'q'")
    caret = err.render().splitlines()[2]
    assert caret.split("| ", 1)[1] == "\t\t      \t^"


@pytest.mark.parametrize("source", [
    model("    h = x\n    for t in 0..1000000000 { h = relu(h) }\n    return h"),
    model("    return " + "relu(" * 1000 + "x" + ")" * 1000),
    model("    return x * " + "9" * 5000),
    model('    return einsum("ä,äb->b", x, W)', "x: node[F], W: param[F, F]"),
    model("    return x @ W", "x: node[F], W: param[F, F] = constant"),
    "dim K = 99999999999999999999\n" + model("    return x"),
], ids=["loop", "nesting", "digits", "einsum", "constant", "dim"])
def test_cli_reports_them_with_exit_1_and_no_traceback(source, tmp_path, capsys):
    path = tmp_path / "bad.mp"
    path.write_text(source)
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{path}:" in err and "^" in err and "hint:" in err


def test_an_unreadable_program_file_has_a_hint(tmp_path, capsys):
    path = tmp_path / "latin1.mp"
    path.write_bytes("# caf\xe9\n".encode("latin-1") + model("    return x").encode())
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "not UTF-8 text" in err and "latin1.mp:1:6" in err and "save the file as UTF-8" in err and "codec" not in err


def test_absurdly_deep_brackets_are_refused_before_parsing():
    """A text of 20,000 nested calls is refused at the first bracket past MAX_BRACKET_DEPTH, before the
    parser reads it (in well under a second); brackets in comments do not count. A text past the
    size limit is refused before that."""
    import time

    expr = "relu(" * 20_000 + "x" + ")" * 20_000
    source = model(f"    return {expr}")
    start = time.perf_counter()
    err = located(source, 2, 12 + 5 * MAX_BRACKET_DEPTH + 4, f"nested more than {MAX_BRACKET_DEPTH} levels")
    assert time.perf_counter() - start < 1.0
    assert "h1 = " in err.hint
    commented = "# " + "(" * (2 * MAX_BRACKET_DEPTH) + "\n" + model("    return relu(x)")
    assert mpdsl.compile(commented)(KARATE).shape == (4, 4)
    with pytest.raises(mpdsl.CompileError, match="larger than 256 KiB"):
        syntax.parse(model("    return " + " + ".join(["x"] * 100_000)))
