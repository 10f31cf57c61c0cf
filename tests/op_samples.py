"""One small, well-typed use of every IR op, for the coverage tests (``test_op_table.py``).

``SAMPLES[op]`` is a function of the op's attributes returning its operand types (and the declared
result type of ops that read one). ``attr_cases(op)`` enumerates the attribute combinations to try:
every value of each closed attribute (a tuple in ``OpDef.attrs``) crossed with the others, and a
fixed value (``OPEN_ATTRS``) for each open one. An op without a sample, or an open attribute
without a value, fails ``test_every_op_has_a_sample``: a new op is covered the day it is added.
"""

from __future__ import annotations

import itertools

from mpdsl.ops import OPS
from mpdsl.types import Dim, Domain, INT_DTYPE, TensorType

F64 = "f64"
NODE, EDGE, GRAPH, PARAM = Domain.NODE, Domain.EDGE, Domain.GRAPH, Domain.PARAM
RELATIONS = 4  # int ids (``etype``) are below this


def t(domain: Domain, *shape: int) -> TensorType:
    return TensorType(domain, tuple(Dim(d) for d in shape), F64)


IDS = TensorType(EDGE, (), INT_DTYPE)
# The edge set every sample program declares (``EdgeSetDef``s by name, kind, base): carry moves edge
# values onto it from the graph's own edges.
SAMPLE_EDGE_SETS = (("looped", "remaining_self_loops", ""),)


def _unary(attrs):
    return [t(NODE, 2, 3)], None


def _binary(attrs):
    return [t(NODE, 2, 3), t(PARAM, 2)], None


def _by_domain(by: str) -> Domain:
    return NODE if by == "graph" else EDGE


SAMPLES = {
    "input": None, "param": None,  # every sample program has inputs and params
    "const": lambda attrs: ([], t(PARAM)),
    "degree": lambda attrs: ([], t(NODE)),
    **{name: _unary for name, d in OPS.items() if d.arity == 1 and d.compute is not None or name == "dropout"},
    "arange": lambda attrs: ([], t(PARAM, 4)),
    "linspace": lambda attrs: ([], t(PARAM, 5)),
    **{name: _binary for name in ("add", "sub", "mul", "div", "pow", "maximum", "minimum", "atan2")},
    **{name: (lambda attrs: ([t(NODE, 3), t(NODE, 3)], None))
       for name in ("lt", "le", "gt", "ge", "eq", "ne", "logical_and", "logical_or")},
    "where": lambda attrs: ([t(NODE, 2, 3), t(NODE, 2, 3), t(PARAM, 2)], None),
    "matmul": lambda attrs: ([t(EDGE, 2, 3), t(PARAM, 3, 2)], None),
    "reduce": lambda attrs: ([t(NODE, 2, 3)], None),
    "axis_softmax": lambda attrs: ([t(NODE, 2, 3)], None),
    "concat": lambda attrs: ([t(NODE, 2), t(NODE, 3)], None),
    "einsum": lambda attrs: ([t(EDGE, 2, 3), t(PARAM, 2, 3, 4)], None),
    "reshape": lambda attrs: ([t(NODE, 2, 3)], t(NODE, 6)),
    "one_hot": lambda attrs: ([IDS], t(EDGE, attrs["classes"])),
    "batch_norm": lambda attrs: ([t(NODE, 3)] + [t(PARAM, 3)] * 4, None),
    "gather": lambda attrs: ([t(GRAPH if attrs["index"] == "batch" else NODE, 3)], None),
    "take": lambda attrs: ([t(PARAM, RELATIONS, 3), IDS], None),
    "select": lambda attrs: ([t(NODE, 3, 2)], None),
    "aggregate": lambda attrs: ([t(_by_domain(attrs["by"]), 3)], None),
    "softmax": lambda attrs: ([t(_by_domain(attrs["by"]), 2)], None),
    "gspmm": lambda attrs: ([t(NODE, 2, 3), t(EDGE, 2)], None),
    "match_gspmm": lambda attrs: ([t(NODE, 2, 3)] * 3, None),
    "attention": lambda attrs: ([t(EDGE, 2), t(NODE, 2, 3)], None),
    "segment_logsumexp": lambda attrs: ([t(EDGE, 2)], None),
    "attention_score_grad": lambda attrs: ([t(EDGE, 2), t(NODE, 2), t(NODE, 2, 3), t(NODE, 2, 3), t(NODE, 2)], None),
    "attention_value_grad": lambda attrs: ([t(EDGE, 2), t(NODE, 2), t(NODE, 2, 3)], None),
    "typed_linear": lambda attrs: ([t(NODE, 3), t(PARAM, RELATIONS, 3, 2), IDS], None),
    "global_attention": lambda attrs: ([t(NODE, 2, 3), t(NODE, 2, 3), t(NODE, 2, 4)], None),
    **{name: (lambda attrs: ([t(NODE, 2, 3), t(NODE, 2, 3), t(NODE, 2, 4), t(NODE, 2), t(NODE, 2, 4), t(NODE, 2)],
                             None))
       for name in ("global_attention_query_grad", "global_attention_key_grad")},
    "carry": lambda attrs: ([t(EDGE, 3)], None),
    "carry_grad": lambda attrs: ([TensorType(EDGE, (Dim(3),), F64, "looped")], None),
    "contract_rows": lambda attrs: ([t(NODE, 3), t(NODE, 2)], None),
    "broadcast": lambda attrs: ([t(PARAM, 3)], t(NODE, 3, 2)),
    "slice": lambda attrs: ([t(NODE, 5)], None),
    "pad": lambda attrs: ([t(NODE, 3)], None),
}

# A value for each open (typed) attribute, per op.
OPEN_ATTRS = {
    "const": {"value": 0.5}, "arange": {"start": 0.5, "step": 0.25}, "linspace": {"start": -1.0, "stop": 2.0},
    "clamp": {"lo": 0.8, "hi": 1.2},
    "leaky_relu": {"slope": 0.2}, "elu": {"alpha": 1.0}, "dropout": {"p": 0.5},
    "reduce": {"axis": -1}, "axis_softmax": {"axis": 0}, "concat": {"axis": -1},
    "einsum": {"spec": "hd,hde->he"}, "one_hot": {"classes": 3},
    "batch_norm": {"eps": 1e-5, "momentum": 0.1}, "select": {"index": 1},
    "contract_rows": {"spec": "k,m->km"},
    **{name: {"scale": 0.6} for name in ("global_attention", "global_attention_query_grad",
                                          "global_attention_key_grad")},
    "slice": {"axis": 0, "start": 1, "stop": 3}, "pad": {"axis": 0, "before": 1, "after": 2},
    "carry": {"edges": "looped", "value": 0.5}, "carry_grad": {"edges": "looped", "base": ""},
}


# Where an op's sample operands are drawn from, by operand position, when the default uniform [0.5, 1.5]
# does not suit it: (low, high) for a range inside the op's domain, "mask" for 0.0 / 1.0 values, "grid" for
# values of {0.5, 1.0, 1.5} (ties, where comparisons differ).
SAMPLE_VALUES: dict[str, dict[int, tuple[float, float] | str]] = {
    "asin": {0: (-0.9, 0.9)}, "acos": {0: (-0.9, 0.9)}, "atan": {0: (-2.0, 2.0)}, "sin": {0: (-3.0, 3.0)},
    "cos": {0: (-3.0, 3.0)}, "sinh": {0: (-2.0, 2.0)}, "cosh": {0: (-2.0, 2.0)}, "erf": {0: (-2.0, 2.0)},
    "log1p": {0: (-0.5, 1.5)}, "expm1": {0: (-1.0, 1.0)}, "sign": {0: (-1.0, 1.0)},
    "floor": {0: (-2.2, 2.2)}, "ceil": {0: (-2.2, 2.2)}, "round": {0: (-2.2, 2.2)}, "trunc": {0: (-2.2, 2.2)},
    "clamp": {0: (0.5, 1.5)}, "atan2": {0: (-1.5, 1.5), 1: (-1.5, 1.5)},
    **{name: {0: "grid", 1: "grid"} for name in ("lt", "le", "gt", "ge", "eq", "ne")},
    "logical_and": {0: "mask", 1: "mask"}, "logical_or": {0: "mask", 1: "mask"}, "logical_not": {0: "mask"},
    "where": {0: "mask", 1: (-1.0, 1.0), 2: (-1.0, 1.0)},
}


def sample_values(op: str, position: int, shape: tuple[int, ...], rng):
    """Operand ``position``'s sample values of op (``SAMPLE_VALUES``; default uniform [0.5, 1.5])."""
    kind = SAMPLE_VALUES.get(op, {}).get(position, (0.5, 1.5))
    if kind == "mask":
        return rng.integers(0, 2, shape).astype(float)
    if kind == "grid":
        return rng.integers(1, 4, shape) * 0.5
    low, high = kind
    return rng.uniform(low, high, shape)


def attr_cases(op: str) -> list[dict]:
    """Every combination of op's closed attribute values, with ``OPEN_ATTRS`` for the open ones."""
    opdef = OPS[op]
    closed = opdef.closed_attrs()
    fixed = {k: OPEN_ATTRS[op][k] for k in opdef.attrs if k not in closed and k not in opdef.defaults}
    keys = sorted(closed)
    return [dict(fixed, **dict(zip(keys, values))) for values in itertools.product(*(closed[k] for k in keys))]


def missing_samples() -> list[str]:
    """Ops (or ``op.attr``) the coverage tests cannot build: a new op or open attribute needs a sample."""
    missing = []
    for name, opdef in OPS.items():
        if name not in SAMPLES:
            missing.append(name)
            continue
        for key, allowed in opdef.attrs.items():
            if not isinstance(allowed, tuple) and key not in OPEN_ATTRS.get(name, {}) and SAMPLES[name] is not None \
                    and key not in opdef.defaults:
                missing.append(f"{name}.{key}")
    return missing
