"""IR: printer/parser round trip, golden dumps of every example, verifier, backend coverage."""

import os
from pathlib import Path

import pytest

import mpdsl
from mpdsl.backends import BACKENDS, available_backends, get_backend
from mpdsl.ir import IRParseError, Program, VerificationError, make_value, parse_program, print_program, verify
from mpdsl.ops import OPS
from mpdsl.types import Dim, Domain, TensorType

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.mp"))
GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
@pytest.mark.parametrize("locations", [False, True])
def test_round_trip(path, locations):
    program = mpdsl.compile(path).ir
    text = print_program(program, locations=locations)
    reparsed = verify(parse_program(text))
    assert print_program(reparsed, locations=locations) == text
    assert [v.type for v in reparsed.values] == [v.type for v in program.values]
    assert [(v.op, v.attrs) for v in reparsed.values] == [(v.op, v.attrs) for v in program.values]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_golden_ir(path):
    """`mpdsl compile --emit ir` of each example; regenerate with MPDSL_UPDATE_GOLDEN=1."""
    text = print_program(mpdsl.compile(path).ir)
    golden = GOLDEN / f"{path.stem}.ir"
    if os.environ.get("MPDSL_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"no golden file for {path.name}: run with MPDSL_UPDATE_GOLDEN=1"
    assert text == golden.read_text()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_golden_optimized_ir(path):
    """`mpdsl compile --emit ir-opt` of each example (dims known at compile time; others symbolic)."""
    text = print_program(verify(mpdsl.compile(path).optimized_ir))
    golden = GOLDEN / f"{path.stem}.opt.ir"
    if os.environ.get("MPDSL_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"no golden file for {path.name}: run with MPDSL_UPDATE_GOLDEN=1"
    assert text == golden.read_text()


# Dims that are sums of products, bound from the data (D, FE, K) and fixed (H): printed normalised.
DIM_SUMS_SOURCE = """
dim H = 4
layer edge_update(e: edge[FE], h: node[D], W: param[FE + 2 * D, H]) -> edge[H] {
    return relu(concat(e, h[src], h[dst]) @ W)
}
model dim_sums(x: node[D], edge_attr: edge[FE], y: node[K, D], W: param[2 * D + FE, H],
               V: param[D * (K + 1) + H, 3]) -> node[3] {
    m = sum(edge_update(edge_attr, x, W)) by dst                      # node[H]
    z = reshape(concat(y, reshape(x, [1, D]), axis=0), [D * K + D])   # node[D*K + D]
    return concat(z, m) @ V                                           # node[D*K + D + H] @ V
}
"""


def test_dim_sums_round_trip_and_golden():
    """Sums of products in types print normalised (``2*D + FE``), parse back and verify; golden
    ``dim_sums.ir``, regenerated with MPDSL_UPDATE_GOLDEN=1."""
    program = mpdsl.compile(DIM_SUMS_SOURCE).ir
    text = print_program(program)
    assert "param[2*D + FE, 4]" in text and "edge[2*D + FE]" in text
    reparsed = verify(parse_program(text))
    assert print_program(reparsed) == text
    assert [v.type for v in reparsed.values] == [v.type for v in program.values]
    golden = GOLDEN / "dim_sums.ir"
    if os.environ.get("MPDSL_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_every_example_has_golden_files():
    stems = {p.stem for p in EXAMPLES}
    assert stems <= {p.name[:-3] for p in GOLDEN.glob("*.ir") if not p.name.endswith(".opt.ir")}
    assert stems <= {p.name[:-7] for p in GOLDEN.glob("*.opt.ir")}


def test_float64_programs_print_f64():
    text = print_program(mpdsl.compile(ROOT / "examples" / "gcn.mp", dtype="float64").ir)
    assert " f64" in text and " f32" not in text


def _small_program() -> Program:
    node = TensorType(Domain.NODE, (Dim(1, ("F",)),), "f32")
    x = make_value("input", [], {"name": "x"}, node)
    r = make_value("relu", [x], {}, node)
    return Program("p", (("F", None),), (x, r), (("out", r),))


def test_verifier_accepts_a_well_formed_program():
    verify(_small_program())


@pytest.mark.parametrize("breakage", ["wrong_type", "use_before_def", "unknown_op", "bad_attr",
                                      "undeclared_dim", "dangling_output", "duplicate_input"])
def test_verifier_rejects(breakage):
    p = _small_program()
    x, r = p.values
    node = x.type
    if breakage == "wrong_type":
        bad = make_value("relu", [x], {}, node.with_(domain=Domain.EDGE))
        p = Program("p", p.dims, (x, bad), (("out", bad),))
    elif breakage == "use_before_def":
        p = Program("p", p.dims, (r, x), (("out", r),))
    elif breakage == "unknown_op":
        bad = make_value("frobnicate", [x], {}, node)
        p = Program("p", p.dims, (x, bad), (("out", bad),))
    elif breakage == "bad_attr":
        bad = make_value("gather", [x], {"index": "sideways"}, node.with_(domain=Domain.EDGE))
        p = Program("p", p.dims, (x, bad), (("out", bad),))
    elif breakage == "undeclared_dim":
        p = Program("p", (), p.values, p.outputs)
    elif breakage == "dangling_output":
        other = make_value("neg", [x], {}, node)
        p = Program("p", p.dims, p.values, (("out", other),))
    elif breakage == "duplicate_input":
        x2 = make_value("input", [], {"name": "x"}, node)
        p = Program("p", p.dims, (x, x2, r), (("out", r),))
    with pytest.raises(VerificationError):
        verify(p)


def test_ir_parser_rejects_malformed_text():
    with pytest.raises(IRParseError):
        parse_program("program @p dims() {\n  %0 = relu %x : node[] f32\n  return %0 as out\n}\n")
    with pytest.raises(IRParseError):
        parse_program("program @p {")


def test_every_op_has_a_rule_in_every_backend():
    for name in available_backends():
        get_backend(name)
    assert BACKENDS, "no backend registered"
    for name, cls in BACKENDS.items():
        assert cls.missing_rules() == [], f"backend {name} has no rule for {cls.missing_rules()}"


def test_coverage_check_can_fail():
    from mpdsl.backends import Backend

    class Partial(Backend):
        pass

    assert set(Partial.missing_rules()) == set(OPS) - {"input", "param", "select"}  # these come from Backend


def test_every_op_documents_its_contract():
    assert all(op.doc for op in OPS.values()), [n for n, op in OPS.items() if not op.doc]
