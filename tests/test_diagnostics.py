"""Diagnostics: every user error names file:line:col, shows the source line with a caret and
gives a one-line hint; the CLI reports them with exit code 1 and never a traceback."""

import sys
from pathlib import Path

import pytest

import mpdsl
from mpdsl import syntax, typecheck
from mpdsl.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from diagnostic_checks import assert_located  # noqa: E402

CASES = [
    ('syntax', 'model m(x: node[F]) -> node[F] {\n    y = x +\n    return y\n}\n',
     3, 5, "syntax error: unexpected 'return'"),
    ('unknown_name', 'model m(x: node[F]) -> node[F] {\n    return relu(h)\n}\n',
     2, 17, "unknown name 'h'"),
    ('unknown_function', 'model m(x: node[F]) -> node[F] {\n    return rellu(x)\n}\n',
     2, 12, "unknown function 'rellu'"),
    ('matmul_mismatch', 'model m(x: node[F], W: param[8, 4]) -> node[4] {\n    return x @ W\n}\n',
     2, 12, 'matmul shape mismatch: [F] @ [8, 4] (inner dims F and 8 differ)'),
    ('matmul_mismatch2', 'dim F = 3\nmodel m(x: node[F], W: param[8, 4]) -> node[4] {\n    return x @ W\n}\n',
     3, 12, 'matmul shape mismatch: [3] @ [8, 4] (inner dims 3 and 8 differ)'),
    ('gather_edge', 'model m(x: node[F]) -> node[F] {\n    e = x[src]\n    return sum(e[src]) by dst\n}\n',
     3, 16, 'cannot gather an edge value by src: [src] reads node values'),
    ('reduce_node', 'model m(x: node[F]) -> node[F] {\n    return sum(x) by dst\n}\n',
     2, 16, 'sum by dst reduces edge values to nodes, got a node value'),
    ('arity', 'model m(x: node[F]) -> node[F] {\n    return relu(x, x)\n}\n',
     2, 12, "'relu' takes 1 argument(s), got 2"),
    ('layer_arity', 'layer l(h: node[D], W: param[D, D]) -> node[D] {\n    return h @ W\n}\nmodel m(x: node[F], W: param[F, F]) -> node[F] {\n    return l(x)\n}\n',
     5, 12, "layer 'l' takes 2 argument(s), got 1"),
    ('unbound_dim', 'model m(x: node[F], W: param[F, H]) -> node[H] {\n    return x @ W\n}\n',
     1, 33, "unbound dimension 'H' in the type of 'W'"),
    ('rebound_type_error', 'dim K = 3\nmodel m(x: node[F], W: param[F, K]) -> node[F] {\n    h = x @ W\n'
     '    h = h + x\n    return h\n}\n', 4, 13, "'+': feature shapes [3] and [F] do not broadcast (axis 0: 3 vs F)"),
    ('wrong_reduction', 'model m(x: node[F]) -> node[F] {\n    return sum(x[src]) by nodes\n}\n',
     2, 27, "unknown reduction axis 'nodes'"),
    ('wrong_agg_name', 'model m(x: node[F]) -> node[F] {\n    return median(x[src]) by dst\n}\n',
     2, 12, "unknown function 'median'"),
    ('mixed_domains', 'model m(x: node[F]) -> node[F] {\n    return x + x[src]\n}\n',
     2, 12, "'+' combines edge and node values, which have different rows"),
    ('return_type', 'model m(x: node[F]) -> node[F] {\n    return x[src]\n}\n',
     2, 12, "model 'm' returns edge[F] f32 where it declares node[F] f32"),
    ('no_return', 'model m(x: node[F]) -> node[F] {\n    h = relu(x)\n}\n',
     1, 7, "model 'm' does not return a value"),
    ('layer_arg_type', 'layer l(h: node[D], W: param[D, D]) -> node[D] {\n    return h @ W\n}\nmodel m(x: node[F], W: param[F, 3]) -> node[F] {\n    return l(x, W)\n}\n',
     5, 17, "argument 2 ('W') of layer 'l': expected param[D, D], got param[F, 3] f32 (dim D = F but got 3)"),
    ('unexpected_char', 'model m(x: node[F]) -> node[F] {\n    return x $ x\n}\n',
     2, 14, "syntax error: unexpected character '$'"),
    ('eof', 'model m(x: node[F]) -> node[F] {\n    return x\n',
     2, 13, 'syntax error: unexpected end of file'),
    ('no_model', 'dim H = 3\n',
     1, 1, 'the program defines no model'),
    ('reserved', 'model m(x: node[F]) -> node[F] {\n    src = relu(x)\n    return src\n}\n',
     2, 5, "'src' is a reserved name"),
    ('by_on_relu', 'model m(x: node[F]) -> node[F] {\n    return relu(x) by dst\n}\n',
     2, 23, "'relu' does not take `by`"),
    ('index_float', 'model m(x: node[F], W: param[3, F]) -> node[F] {\n    return W[x]\n}\n',
     2, 14, 'cannot index by a node[F] f32 value'),
    ('reshape_bad', 'model m(x: node[F]) -> node[F] {\n    return reshape(x, [3])\n}\n',
     2, 12, 'cannot reshape [F] (F elements) to [3] (3 elements)'),
    ('bad_init', 'model m(x: node[F], W: param[F, F] = glorrot) -> node[F] {\n    return x @ W\n}\n',
     1, 21, "unknown initializer 'glorrot'"),
    ('int_arith', 'model m(x: node[F], t: node int) -> node[F] {\n    return x * t\n}\n',
     2, 16, "'*' needs float values, got node[] i64"),
    ('axis_range', 'model m(x: node[F]) -> node[] {\n    return sum(x, 2)\n}\n',
     2, 12, 'sum: axis 2 is out of range for 1 feature axes'),
    ('missing_by', 'model m(x: node[F]) -> node[F] {\n    return sum(x[src])\n}\n',
     2, 12, "'sum' needs `by dst`, `by src`, `by graph` or a feature axis"),
    ('recursion', 'layer l(h: node[D]) -> node[D] {\n    return l(h)\n}\nmodel m(x: node[F]) -> node[F] {\n    return l(x)\n}\n',
     2, 12, "layer 'l' calls itself"),
    ('broadcast', 'model m(x: node[F], b: param[3]) -> node[F] {\n    return x + b\n}\n',
     2, 16, "'+': feature shapes [F] and [3] do not broadcast (axis 0: F vs 3)"),
    ('dup_layer', 'layer l(h: node[D]) -> node[D] {\n    return h\n}\nlayer l(h: node[D]) -> node[D] {\n    return h\n}\nmodel m(x: node[F]) -> node[F] {\n    return l(x)\n}\n',
     4, 7, "duplicate definition of 'l'"),
    ('softmax_node', 'model m(x: node[F]) -> node[F] {\n    return softmax(x) by dst\n}\n',
     2, 20, 'softmax by dst reduces edge values to nodes, got a node value'),
    ('graph_by_edge', 'model m(x: node[F]) -> graph[F] {\n    return sum(x[src]) by graph\n}\n',
     2, 16, 'sum by graph reduces node values to their graphs, got an edge value'),
    ('slope_nonliteral', 'model m(x: node[F]) -> node[F] {\n    return leaky_relu(x, x)\n}\n',
     2, 26, 'slope must be a number literal'),
    ('dim_trailing_plus', 'model m(x: node[F], W: param[F + , 3]) -> node[3] {\n    return x @ W\n}\n',
     1, 34, "syntax error: unexpected ','"),
    ('dim_subtraction', 'model m(x: node[F], y: node[G], W: param[F - G, 3]) -> node[3] {\n    return x @ W\n}\n',
     1, 44, 'subtraction is not supported in dimensions'),
    ('dim_unbindable', 'model m(x: node[F + G]) -> node[F + G] {\n    return x\n}\n',
     1, 17, 'cannot bind F and G in dimension F + G: no input or parameter has any of them alone, and a dim is '
            'solved for one unknown only'),
    ('layer_dim_unbindable', 'layer l(x: node[D + E]) -> node[D + E] {\n    return x\n}\n'
     'model m(x: node[F]) -> node[F] {\n    return x\n}\n',
     1, 17, 'cannot bind D and E in dimension D + E: no other argument has any of them alone, and a dim is '
            'solved for one unknown only'),
    ('dim_not_integer', 'layer l(x: node[2 * D]) -> node[D] {\n    return sum(reshape(x, [2, D]), 0)\n}\n'
     'model m(x: node[F], W: param[F, 7]) -> node[F] {\n    return l(x @ W)\n}\n',
     5, 14, "argument 1 ('x') of layer 'l': expected node[2*D], got node[7] f32 (2*D = 7 gives D = 7/2, which "
            "is not an integer)"),
    ('dim_sum_mismatch', 'dim D = 16\ndim FE = 4\n'
     'layer l(e: edge[FE], h: node[D], W: param[2 * D + FE, H]) -> edge[H] {\n'
     '    return concat(h[dst], h[src], e) @ W\n}\n'
     'model m(x: node[D], e: edge[FE], W: param[35, 3]) -> edge[3] {\n    return l(e, x, W)\n}\n',
     7, 20, "argument 3 ('W') of layer 'l': expected param[2*D + FE, H], got param[35, 3] f32 "
            "(dim 2*D + FE = 2*16 + 4 = 36 but got 35)"),
]

@pytest.mark.parametrize("name,source,line,col,message", CASES, ids=[c[0] for c in CASES])
def test_error_location_and_message(name, source, line, col, message):
    with pytest.raises(mpdsl.CompileError) as info:
        typecheck.check(syntax.parse(source, "t.mp"))
    assert_located(info.value, source, line, col, message)


def test_at_least_fifteen_distinct_errors():
    assert len({c[4] for c in CASES}) >= 15


@pytest.mark.parametrize("name,source", [(c[0], c[1]) for c in CASES], ids=[c[0] for c in CASES])
def test_cli_reports_user_errors_without_traceback(name, source, tmp_path, capsys):
    path = tmp_path / "bad.mp"
    path.write_text(source)
    assert main(["check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{path}:" in err and "^" in err and "hint:" in err


def test_several_models_need_a_choice():
    source = ("model a(x: node[F]) -> node[F] {\n    return x\n}\n"
              "model b(x: node[F]) -> node[F] {\n    return relu(x)\n}\n")
    with pytest.raises(mpdsl.CompileError, match="several models"):
        mpdsl.compile(source)
    assert mpdsl.compile(source, model="b").ir.name == "b"
    with pytest.raises(mpdsl.CompileError, match="no model named 'c'"):
        mpdsl.compile(source, model="c")
