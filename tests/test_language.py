"""Language features beyond single files: imports, the prelude, domain-generic layers, one_hot."""

import numpy as np
import pytest

import mpdsl

KARATE = mpdsl.Graph.load(__import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "data" / "karate.npz")

MAIN = """
import "lib/layers.mp"
model m(x: node[F], W: param[F, K]) -> node[K] {
    return double(x @ W)
}
"""


def test_imports_are_relative_and_transitive(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "layers.mp").write_text(
        'import "base.mp"\nlayer double(h: any[D]) -> any[D] {\n    return twice * h\n}\n'
        'model ignored(x: node[F]) -> node[F] {\n    return x\n}\n')
    (tmp_path / "lib" / "base.mp").write_text("dim K = 3\nlayer unused(h: node[D]) -> node[D] {\n    return h\n}\n")
    main = tmp_path / "main.mp"
    main.write_text(MAIN.replace("twice", "2.0"))
    (tmp_path / "lib" / "layers.mp").write_text(
        (tmp_path / "lib" / "layers.mp").read_text().replace("twice", "2.0"))
    m = mpdsl.compile(main, dtype="float64")
    out = m(KARATE)
    np.testing.assert_allclose(out, 2.0 * KARATE["x"] @ m.params["W"])
    assert out.shape == (34, 3)


def test_missing_import_is_located(tmp_path):
    main = tmp_path / "main.mp"
    main.write_text(MAIN)
    with pytest.raises(mpdsl.CompileError) as info:
        mpdsl.compile(main)
    assert (info.value.line, info.value.col) == (2, 1)
    assert info.value.message == "cannot import 'lib/layers.mp': no such file"


def test_duplicate_across_files_names_the_other_file(tmp_path):
    (tmp_path / "a.mp").write_text("dim K = 3\n")
    main = tmp_path / "main.mp"
    main.write_text('import "a.mp"\ndim K = 4\nmodel m(x: node[F]) -> node[F] {\n    return x\n}\n')
    with pytest.raises(mpdsl.CompileError, match="duplicate definition of 'K'") as info:
        mpdsl.compile(main)
    assert "a.mp" in info.value.hint


def test_errors_inside_imported_files_point_into_them(tmp_path):
    (tmp_path / "bad.mp").write_text("layer l(h: node[D]) -> node[D] {\n    return relu(q)\n}\n")
    main = tmp_path / "main.mp"
    main.write_text('import "bad.mp"\nmodel m(x: node[F]) -> node[F] {\n    return l(x)\n}\n')
    with pytest.raises(mpdsl.CompileError) as info:
        mpdsl.compile(main)
    assert info.value.render().startswith("bad.mp:2:17: error: unknown name 'q'")


def test_prelude_layers_and_shadowing():
    uses_prelude = "model m(x: node[F], g: param[F] = ones, b: param[F]) -> node[F] {\n    return layer_norm(x, g, b)\n}\n"
    m = mpdsl.compile(uses_prelude, dtype="float64")
    x = np.random.default_rng(0).normal(size=(34, 6))
    out = m(KARATE, x=x)
    expected = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    shadowed = "layer layer_norm(x: any[D], g: param[D], b: param[D]) -> any[D] {\n    return x + b\n}\n" + uses_prelude
    np.testing.assert_allclose(mpdsl.compile(shadowed, dtype="float64")(KARATE, x=x), x)


def test_any_layers_run_on_nodes_and_edges():
    src = """
layer affine(h: any[D], W: param[D, K]) -> any[K] {
    return h @ W
}
model m(x: node[F], e: edge[F], W: param[F, 2]) -> (n: node[2], m: edge[2]) {
    return affine(x, W), affine(e, W)
}
"""
    m = mpdsl.compile(src, dtype="float64")
    e = np.ones((156, 34))
    out = m(KARATE, e=e)
    np.testing.assert_allclose(out["m"], e @ m.params["W"])
    np.testing.assert_allclose(out["n"], KARATE["x"] @ m.params["W"])


@pytest.mark.parametrize("source,message", [
    ("layer l(a: any[D], b: any[D]) -> any[D] {\n    return a + b\n}\n"
     "model m(x: node[F], e: edge[F]) -> node[F] {\n    return l(x, e)\n}\n",
     "argument 2 ('b') of layer 'l': expected any[D], got edge[F] f32 ('any' is already node in this call)"),
    ("layer l(a: any[D]) -> any[D] {\n    return a\n}\n"
     "model m(x: node[F], W: param[F]) -> node[F] {\n    return l(W)\n}\n",
     "argument 1 ('a') of layer 'l': expected any[D], got param[F] f32 ('any' stands for a node, edge or graph value)"),
    ("model m(x: any[F]) -> node[F] {\n    return x\n}\n", "a model's arguments have a concrete domain"),
    ("layer l(W: param[D]) -> any[D] {\n    return W\n}\nmodel m(x: node[F]) -> node[F] {\n    return x\n}\n",
     "'any' in the result type of 'l' is not bound by an argument"),
])
def test_any_errors(source, message):
    with pytest.raises(mpdsl.CompileError) as info:
        mpdsl.compile(source)
    assert info.value.message == message


def test_one_hot():
    src = "model m(t: node int) -> node[3] {\n    return one_hot(t, 3)\n}\n"
    m = mpdsl.compile(src, dtype="float64")
    t = np.arange(34) % 3
    np.testing.assert_array_equal(m(KARATE, t=t), np.eye(3)[t])
    with pytest.raises(mpdsl.InputError, match=r"t\[0\] = 5 is out of range for one_hot"):
        m(KARATE, t=np.full(34, 5))
    with pytest.raises(mpdsl.CompileError, match="one_hot takes int ids"):
        mpdsl.compile("model m(x: node[F]) -> node[3] {\n    return one_hot(x, 3)\n}\n")


def test_einsum_per_head_matmul_and_contraction():
    src = '''
model m(x: node[F], W: param[F, 2, 3], R: param[2, 3, 4]) -> (a: edge[2, 4], b: node[]) {
    k = x @ W
    return einsum("hd,hde->he", k[src], R), einsum("hd,hd->", k, k)
}'''
    m = mpdsl.compile(src, dtype="float64")
    out = m(KARATE)
    k = (KARATE["x"] @ m.params["W"].reshape(34, 6)).reshape(34, 2, 3)
    expected = np.stack([k[KARATE.src][:, h] @ m.params["R"][h] for h in range(2)], axis=1)
    np.testing.assert_allclose(out["a"], expected, rtol=1e-12)
    np.testing.assert_allclose(out["b"], (k * k).sum((1, 2)), rtol=1e-12)
    from mpdsl.ir import parse_program, print_program
    assert print_program(parse_program(print_program(m.ir))) == print_program(m.ir)


@pytest.mark.parametrize("call,message", [
    ('einsum("d->dd", x)', "einsum output 'dd' must use distinct letters from the inputs"),
    ('einsum("hd,d->h", x, x)', "einsum term 'hd' has 2 letters but operand 1 is node[F] f32"),
    ('einsum("d,d", x, x)', "einsum subscripts 'd,d' need exactly one '->'"),
    ('einsum(x, x)', "einsum takes the subscripts as a string, then the operands"),
    ('relu("d")', "a string is only allowed as the subscripts of einsum"),
])
def test_einsum_errors(call, message):
    with pytest.raises(mpdsl.CompileError) as info:
        mpdsl.compile(f"model m(x: node[F]) -> node[F] {{\n    return {call}\n}}\n")
    assert info.value.message == message


def test_layer_dims_as_numbers_and_one_hot_classes():
    src = """
dim R = 3
dim F = 34
layer typed(h: node[D], etype: edge int, W: param[N, D, K]) -> node[K] {
    count = sum(one_hot(etype, N)) by dst
    return (sum(h[src] @ W[etype]) by dst) / sqrt(D) + sum(count, -1)
}
model m(x: node[F], etype: edge int, W: param[R, F, 2]) -> node[2] {
    return typed(x, etype, W)
}
"""
    m = mpdsl.compile(src, dtype="float64")
    etype = np.arange(156) % 3
    out = m(KARATE, etype=etype)
    x, W = KARATE["x"].astype(float), m.params["W"]
    expected = np.zeros((34, 2))
    for e, (s, d) in enumerate(zip(KARATE.src, KARATE.dst)):
        expected[d] += x[s] @ W[etype[e]]
    expected = expected / np.sqrt(34) + np.bincount(KARATE.dst, minlength=34)[:, None]
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_run_time_dims_are_not_numbers_even_through_layers():
    src = """
layer scale(h: node[D]) -> node[D] {
    return h / sqrt(D)
}
model m(x: node[F]) -> node[F] {
    return scale(x)
}
"""
    with pytest.raises(mpdsl.CompileError, match="dimension 'D' is only known at run time"):
        mpdsl.compile(src)


REBOUND = """
model m(x: node[F], W: param[F, F]) -> node[F] {
    x = x @ W
    h = relu(x)
    first = h
    h = (sum(h[src]) by dst) + h
    h = tanh(h)
    return h + first
}
"""

RENAMED = """
model m(x: node[F], W: param[F, F]) -> node[F] {
    x1 = x @ W
    h1 = relu(x1)
    first = h1
    h2 = (sum(h1[src]) by dst) + h1
    h3 = tanh(h2)
    return h3 + first
}
"""


def test_rebinding_a_name_is_ssa_renaming():
    """``h = relu(h)`` (arguments included) gives the program the renamed source gives; a name read
    before its rebinding keeps the earlier value."""
    from mpdsl.ir import print_program

    rebound, renamed = (mpdsl.lower(text, dims={"F": 4})[1] for text in (REBOUND, RENAMED))
    assert print_program(rebound) == print_program(renamed)
