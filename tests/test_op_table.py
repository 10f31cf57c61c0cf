"""The op table (``mpdsl.ops.OPS``) is the single source of truth, and every rule table covers it.

For every op and every combination of its closed attribute values (``op_samples.attr_cases``), a
one-op program is built from ``op_samples.SAMPLES`` and

* run by the NumPy backend (inference and training) and by the Triton backend (its interpreter),
  which must agree;
* differentiated (unless the op declares ``no_gradient``) and checked against central differences;
* costed by the planner (``--emit plan``).

An attribute value or op that some table lacks fails here with ``MissingRule``, never silently:
``test_a_new_reduction_value_fails_every_table`` and ``test_a_new_elementwise_op_is_derived_or_reported``
replay the two ways that used to go unnoticed (a reduction name added to ``ops.py`` alone; a unary
op added without its derivative). Effects: random and stateful ops are never merged by CSE, and
stateful ones are never dropped by DCE.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mpdsl.autodiff import grad_program, missing_adjoints  # noqa: E402
from mpdsl.backends import _BACKEND_MODULES, BACKENDS, get_backend  # noqa: E402
from mpdsl.backends.row_fusion import is_row_wise  # noqa: E402
from mpdsl.ir import EdgeSetDef, Program, make_value, verify  # noqa: E402
from mpdsl.ops import (ELEMENTWISE, OPS, Effect, MissingRule, NUMPY_MATH, ArrayMath, Trait, op)  # noqa: E402
from mpdsl.passes import optimize  # noqa: E402
from mpdsl.plan import op_cost, space_rows  # noqa: E402
from mpdsl.types import Domain  # noqa: E402
from op_samples import IDS, RELATIONS, SAMPLE_EDGE_SETS, SAMPLES, attr_cases, missing_samples, sample_values  # noqa: E402
from test_passes import random_graph  # noqa: E402

GRAPH = random_graph(3, nodes=9, edges=24, self_loops=True)
CASES = [(name, attrs) for name in OPS if SAMPLES.get(name) is not None for attrs in attr_cases(name)]


def case_id(case) -> str:
    name, attrs = case
    closed = OPS[name].closed_attrs()
    return name + "".join(f"-{attrs[k]}" for k in sorted(closed))


def sample_program(name: str, attrs: dict) -> Program:
    """``out = name(operands...)`` with one input or param per operand (ids: ``etype``)."""
    operand_types, declared = SAMPLES[name](attrs)
    operands = []
    for i, ty in enumerate(operand_types):
        if ty.domain is Domain.PARAM:
            operands.append(make_value("param", [], {"name": f"p{i}", "init": "normal"}, ty))
        else:
            operands.append(make_value("input", [], {"name": "etype" if ty == IDS else f"x{i}"}, ty))
    result = OPS[name].infer([o.type for o in operands], attrs, declared)
    out = make_value(name, operands, attrs, result)
    return verify(Program(f"sample_{name}", (), tuple(operands) + (out,), (("out", out),),
                          tuple(EdgeSetDef(*s) for s in SAMPLE_EDGE_SETS)))


def rows_of(program: Program, t) -> int:
    """The rows of a value of type ``t`` of ``program`` on GRAPH (its edge set's, for an edge value)."""
    return space_rows(program, GRAPH)[t.space]


def sample_data(program: Program, seed: int = 0) -> tuple[dict, dict]:
    """Inputs and params for a sample program: floats in [0.5, 1.5] (positive, so that log, sqrt and
    pow are smooth; running variances are positive) unless ``op_samples.SAMPLE_VALUES`` gives the
    operand other values, ids below every sample's class count."""
    rng = np.random.default_rng(seed)
    op = program.outputs[0][1].op
    inputs, params = {}, {}
    for v in program.inputs:
        rows = rows_of(program, v.type)
        if v.type.is_float:
            position = int(v.attr["name"][1:])  # x<i>: operand i
            inputs[v.attr["name"]] = sample_values(op, position, (rows,) + tuple(d.value for d in v.type.shape), rng)
        else:
            inputs[v.attr["name"]] = rng.integers(0, min(3, RELATIONS), rows)
    for v in program.params:
        position = int(v.attr["name"][1:])  # p<i>: operand i
        params[v.attr["name"]] = sample_values(op, position, tuple(d.value for d in v.type.shape), rng)
    return inputs, params


def run_numpy(program, inputs, params, training=False):
    return get_backend("numpy").run(program, GRAPH, inputs, params, {}, training=training, seed=0)["out"]


def test_every_op_has_a_sample():
    assert missing_samples() == [], "add the op (or its open attribute) to tests/op_samples.py"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_numpy_backend_runs_every_op_and_attribute_value(case):
    name, attrs = case
    program = sample_program(name, attrs)
    inputs, params = sample_data(program)
    out = run_numpy(program, inputs, params)
    rows = rows_of(program, program.outputs[0][1].type) if program.outputs[0][1].type.domain is not Domain.PARAM \
        else None
    shape = tuple(d.value for d in program.outputs[0][1].type.shape)
    assert out.shape == ((rows,) if rows is not None else ()) + shape
    assert np.isfinite(out).all()
    trained = run_numpy(program, inputs, params, training=True)
    assert trained.shape == out.shape and np.isfinite(trained).all()


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_planner_costs_every_op_and_attribute_value(case):
    name, attrs = case
    program = sample_program(name, attrs)
    rows = space_rows(program, GRAPH)
    for v in program.values:
        cost = op_cost(v, rows, {}, 8)
        assert cost.bytes_out >= 0 and cost.flops >= 0


def test_planner_counts_the_multiply_adds_of_einsums_and_row_contractions():
    """A weight gradient sums a product over the rows: as many FLOPs as the forward product it
    transposes (2 N F K), not one per element of its small result; an einsum likewise per row."""
    from mpdsl.types import Dim, TensorType
    x = make_value("input", [], {"name": "x"}, TensorType(Domain.NODE, (Dim.of(8),), "f64"))
    g = make_value("input", [], {"name": "g"}, TensorType(Domain.NODE, (Dim.of(4),), "f64"))
    weight_grad = make_value("contract_rows", [x, g], {"spec": "f,k->fk"},
                             TensorType(Domain.PARAM, (Dim.of(8), Dim.of(4)), "f64"))
    h = make_value("input", [], {"name": "h"}, TensorType(Domain.NODE, (Dim.of(2), Dim.of(3)), "f64"))
    w = make_value("param", [], {"name": "w", "init": "normal"}, TensorType(Domain.PARAM, (Dim.of(2), Dim.of(3), Dim.of(5)), "f64"))
    heads = make_value("einsum", [h, w], {"spec": "hd,hde->he"}, TensorType(Domain.NODE, (Dim.of(2), Dim.of(5)), "f64"))
    rows = {Domain.NODE: 9, Domain.EDGE: 20, Domain.PARAM: 1}
    assert op_cost(weight_grad, rows, {}, 8).flops == 2 * 9 * 8 * 4
    assert op_cost(heads, rows, {}, 8).flops == 2 * 9 * 2 * 3 * 5


DIFFERENTIABLE = [c for c in CASES if OPS[c[0]].no_gradient is None]


@pytest.mark.parametrize("case", DIFFERENTIABLE, ids=case_id)
def test_autodiff_differentiates_every_op_and_attribute_value(case):
    """The gradient program against central differences of <R, out> (float64, NumPy backend);
    batch_norm in mode "auto" and dropout are differentiated in their inference form."""
    name, attrs = case
    program = sample_program(name, attrs)
    inputs, params = sample_data(program)
    float_inputs = [v.attr["name"] for v in program.inputs if v.type.is_float]
    backward = grad_program(program, inputs=float_inputs)
    rng = np.random.default_rng(1)
    out = run_numpy(program, inputs, params)
    projection = rng.normal(size=out.shape)
    grads = get_backend("numpy").run(backward, GRAPH, {**inputs, "d_out": projection}, {**params, "d_out": projection}, {})

    def loss(inputs, params) -> float:
        return float(np.sum(run_numpy(program, inputs, params) * projection))

    h = 1e-6
    for store in (inputs, params):
        for key in [k for k in store if k != "etype"]:
            analytic = grads[f"d_{key}"]
            assert analytic.shape == store[key].shape
            for index in {tuple(int(rng.integers(0, s)) for s in store[key].shape) for _ in range(4)}:
                plus, minus = store[key].copy(), store[key].copy()
                plus[index] += h
                minus[index] -= h
                args = [(dict(inputs, **{key: a}), params) if store is inputs else (inputs, dict(params, **{key: a}))
                        for a in (plus, minus)]
                numeric = (loss(*args[0]) - loss(*args[1])) / (2 * h)
                assert abs(numeric - analytic[index]) <= 1e-6 * max(1.0, abs(numeric)), \
                    f"d <R, {name}> / d {key}{list(index)}: finite differences {numeric!r}, gradient {analytic[index]!r}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_backend_agrees_with_numpy_on_every_op_and_attribute_value(case):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from mpdsl.backends.triton_backend import TritonBackend

    name, attrs = case
    program = sample_program(name, attrs)
    inputs, params = sample_data(program)
    want = run_numpy(program, inputs, params)
    got = TritonBackend(interpret=True, device="cpu", poison=True).run(program, GRAPH, inputs, params, {})["out"]
    got = got.cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_backends_and_autodiff_have_a_rule_for_every_op():
    for module in _BACKEND_MODULES.values():  # every backend registers itself on import
        importlib.import_module(module)
    assert set(BACKENDS) == set(_BACKEND_MODULES)
    for backend in BACKENDS.values():
        assert backend.missing_rules() == [], f"{backend.name}: {backend.missing_rules()}"
    assert missing_adjoints() == []


def test_every_fused_op_has_an_unfused_definition_of_its_type():
    """A fused op means its unfused definition (``OpDef.unfused``): every one has it, and it builds a
    value of the op's type from primitive ops."""
    from mpdsl.autodiff import GradBuilder

    fused = [name for name, d in OPS.items() if d.has(Trait.FUSED)]
    assert {"gspmm", "attention", "segment_logsumexp", "attention_score_grad", "attention_value_grad"} <= set(fused)
    for name in fused:
        assert OPS[name].unfused is not None, name
        for attrs in attr_cases(name):
            program = sample_program(name, attrs)
            v = program.outputs[0][1]
            b = GradBuilder("f64")
            b.like = v
            root = OPS[name].unfused(b, v)
            assert root.type == v.type, (name, attrs)
            assert not any(OPS[e.op].has(Trait.FUSED) for e in b.values), (name, [e.op for e in b.values])


def test_array_namespaces_have_every_function():
    assert all(callable(getattr(NUMPY_MATH, f)) for f in ArrayMath.FUNCTIONS)
    torch = pytest.importorskip("torch")
    from mpdsl.backends.triton_backend import TORCH_MATH, _runtime

    _runtime(True)
    x = torch.linspace(0.5, 1.5, 7, dtype=torch.float64)
    for f in ArrayMath.FUNCTIONS:
        unary = ("negative", "exp", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "tanh", "abs", "erf",
                 "sigmoid", "softplus", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "sign", "floor",
                 "ceil", "round", "trunc", "logical_not")
        args = {"where": (x > 1.0, x, 0.0)}.get(f) or ((x - 1.0,) if f in unary else (x, x.flip(0) - 1.0))
        with np.errstate(all="ignore"):  # log, sqrt, asin, ... of negatives: NaN in both namespaces
            want = getattr(NUMPY_MATH, f)(*(a.numpy() if isinstance(a, torch.Tensor) else a for a in args))
        np.testing.assert_allclose(getattr(TORCH_MATH, f)(*args).numpy(), want, rtol=1e-12, err_msg=f)


# ---- the two experiments that used to pass unnoticed -------------------------------------------------


@pytest.fixture
def aggregate_with_prod(monkeypatch):
    """``aggregate`` with a reduction value that no rule table knows."""
    opdef = OPS["aggregate"]
    widened = dataclasses.replace(opdef, attrs=dict(opdef.attrs, reduce=opdef.attrs["reduce"] + ("prod",)))
    monkeypatch.setitem(OPS, "aggregate", widened)
    return sample_program("aggregate", {"reduce": "prod", "by": "dst"})


def test_a_new_reduction_value_fails_every_table(aggregate_with_prod):
    program = aggregate_with_prod
    inputs, params = sample_data(program)
    with pytest.raises(MissingRule, match="prod"):
        run_numpy(program, inputs, params)
    with pytest.raises(MissingRule, match="prod"):
        grad_program(program, inputs=["x0"])
    fused, _ = optimize(program, dims={})  # not fused into a gspmm that has no such reduction
    assert not any(v.op == "gspmm" for v in fused.values)
    pytest.importorskip("triton")
    from mpdsl.backends.triton_backend import TritonBackend
    with pytest.raises(MissingRule, match="prod"):
        TritonBackend(interpret=True, device="cpu").run(program, GRAPH, inputs, params, {})


def test_a_new_elementwise_op_is_derived_or_reported():
    """A unary op declared with its math but without a derivative: the fusion and folding passes
    derive it from its traits, and the coverage checks name what is missing."""
    from op_samples import missing_samples as samples_missing

    op("cos_for_test", 1, traits=ELEMENTWISE, compute=lambda m, x: m.sigmoid(x))(
        lambda types, attrs, declared: types[0])
    try:
        assert "cos_for_test" in missing_adjoints()
        assert "cos_for_test" in samples_missing()
        for backend in BACKENDS.values():  # a backend built before the op existed lacks its rule
            assert "cos_for_test" in backend.missing_rules()
        x = make_value("input", [], {"name": "x"}, SAMPLES["relu"]({})[0][0])
        assert is_row_wise(make_value("cos_for_test", [x], {}, x.type))
    finally:
        OPS.pop("cos_for_test")
    assert missing_adjoints() == []


# ---- effects: CSE and DCE decide from them ---------------------------------------------------------


EFFECTFUL = [c for c in CASES if OPS[c[0]].effect_of(c[1]) is not Effect.PURE]


def test_effectful_cases_exist():
    assert {c[0] for c in EFFECTFUL} == {"dropout", "batch_norm"}


@pytest.mark.parametrize("case", EFFECTFUL, ids=case_id)
def test_cse_never_merges_and_dce_never_drops_effects(case):
    name, attrs = case
    program = sample_program(name, attrs)
    first = program.outputs[0][1]
    second = make_value(name, first.operands, attrs, first.type)
    total = make_value("add", [first, second], {}, first.type)
    doubled = Program(program.name, (), program.values + (second, total), (("out", total),))
    optimized, _ = optimize(verify(doubled), ["cse"], {})
    assert sum(v.op == name for v in optimized.values) == 2, "CSE merged two calls of an effectful op"
    unused = Program(program.name, (), program.values, (("out", first.operands[0]),))
    kept = sum(v.op == name for v in optimize(verify(unused), ["dce"], {})[0].values)
    assert kept == (1 if OPS[name].effect_of(attrs) is Effect.STATEFUL else 0)


def test_pure_equal_values_are_merged():
    program = sample_program("relu", {})
    first = program.outputs[0][1]
    second = make_value("relu", first.operands, {}, first.type)
    total = make_value("add", [first, second], {}, first.type)
    doubled = Program(program.name, (), program.values + (second, total), (("out", total),))
    assert sum(v.op == "relu" for v in optimize(verify(doubled), ["cse"], {})[0].values) == 1


def test_every_trait_is_used_by_some_op():
    used = {t for d in OPS.values() for t in d.traits}
    assert used == set(Trait)


def test_docs_op_reference_is_generated_from_the_op_table():
    from mpdsl.op_reference import reference

    path = Path(__file__).resolve().parents[1] / "docs" / "ops.md"
    assert path.read_text() == reference(), "regenerate it: python -m mpdsl.op_reference > docs/ops.md"
    for name in OPS:
        assert f"## `{name}`" in path.read_text()


def test_every_named_initializer_has_a_rule():
    from mpdsl.ops import INITIALIZERS
    from mpdsl.runtime import initial_value

    rng = np.random.default_rng(0)
    for init in [i for i in INITIALIZERS if i != "constant"] + ["0.25"]:
        value = initial_value(init, (3, 4), rng, np.float32)
        assert value.shape == (3, 4) and value.dtype == np.float32 and np.isfinite(value).all(), init
    with pytest.raises(MissingRule, match="init='xavier'"):
        initial_value("xavier", (3, 4), rng, np.float32)


def test_every_op_has_an_initialisation_rule():
    from mpdsl.initialisation import USE_RULES

    assert set(USE_RULES) == set(OPS), "add the op to mpdsl.initialisation.USE_RULES"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_the_initialisation_plan_covers_every_op_and_attribute_value(case):
    """Each param operand of each op gets a role, fans that its shape gives and a runnable initialiser;
    unwritten, as written."""
    from mpdsl.initialisation import ROLES, UNWRITTEN, plan
    from mpdsl.runtime import initial_value

    name, attrs = case
    program = sample_program(name, attrs)
    renamed: dict = {}
    for v in program.values:
        renamed[v] = (dataclasses.replace(v, attrs=(("init", UNWRITTEN), ("name", v.attr["name"])))
                      if v.op == "param" else dataclasses.replace(v, operands=tuple(renamed[o] for o in v.operands)))
    unwritten = Program(program.name, program.dims, tuple(renamed.values()),
                        tuple((k, renamed[v]) for k, v in program.outputs))
    for prog in (program, unwritten):
        plans = plan(prog)
        shapes = {v.attr["name"]: tuple(d.value for d in v.type.shape) for v in prog.params}
        assert set(plans) == set(shapes)
        for param, chosen in plans.items():
            assert chosen.role in ROLES and chosen.written == (prog is program)
            fan_in, fan_out = chosen.fans(shapes)
            assert fan_in >= 1 and fan_out >= 1
            value = initial_value(chosen.init, shapes[param], np.random.default_rng(0), np.float32, (fan_in, fan_out))
            assert np.isfinite(value).all()
