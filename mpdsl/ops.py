"""The IR's operations: one ``OpDef`` per op name, the single source of truth about it.

An ``OpDef`` declares, once, everything passes, planners and backends need to know of an op:

* its arity, attributes and *type rule* (operand types + attrs -> result type), and a contract;
* its ``traits`` (``Trait``: elementwise, row-wise, graph movement, reads edges in segment order,
  fused, source, model interface), from which the row fusion, the algebraic passes and the layout
  planner decide what they may do with it;
* its ``effect`` (``Effect``: pure, random, stateful), from which CSE and DCE decide what they may
  merge or drop;
* for elementwise ops, their math once (``compute`` over an array namespace: NumPy for the
  reference backend and constant folding, torch for the Triton backend's dense ops), the local
  vector-Jacobian product (``vjp``, used by ``mpdsl.autodiff``) and the algebraic identities
  (``identities``: x + 0 == x) the constant folder drops;
* ``no_gradient``: why an op carries no gradient, where it does not;
* for fused ops (made by the optimizer or by autodiff), their *unfused definition* (``unfused``: the
  composition of primitive ops they stand for, emitted through a gradient builder): their reference
  meaning, through which autodiff differentiates them unless it has a fused adjoint for them.

Attributes with behaviour (reduction names, gather indices, segment axes, layouts, initialisers)
take values from closed tuples declared here; every rule that dispatches on such a value goes
through ``choose``, which raises ``MissingRule`` for a value it has no entry for, so that a new
value is never silently treated as another. Rules that live elsewhere (backend lowerings, adjoints
of non-elementwise ops, cost formulas) are per-op tables keyed by name, and the coverage tests run
every (op, attribute value) pair through each of them. Source ops (``input``, ``param``, ``const``,
``degree``, ``arange``, ``linspace``) have no operands: their declared type is checked instead of
inferred.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import scipy.special

from mpdsl.types import (
    INT_DTYPE,
    Dim,
    Domain,
    Space,
    TensorType,
    TypeRuleError,
    broadcast_shapes,
    edge_set_ends,
    edge_set_relation,
    join_domains,
    join_spaces,
    node_label,
    shape_str,
)

Attrs = dict[str, Any]
TypeRule = Callable[[list[TensorType], Attrs, "TensorType | None"], TensorType]

AGGREGATIONS = ("sum", "mean", "max", "min", "std")
# How a program's edge sets are made (``Program.edge_sets``): "input" is read from the graph (an edge
# set it carries beside its edges); the others derive a set from another one, as PyTorch Geometric's
# utilities do: "self_loops" = remove_self_loops then add_self_loops (one loop per node, GATConv's
# add_self_loops=True), "remaining_self_loops" = add_remaining_self_loops (gcn_norm's: a node's existing
# loop is kept, with its edge values, one is added to a node without). Both give the base set's non-loop
# edges in their order, then one loop per node in node order. "k_hop" (with a hop count k >= 1, PyG's
# TwoHop transform for k = 2) is the pairs (j, i) joined by a path of 1..k base edges: the base's
# pattern (its loops kept) and those of its powers 2..k without their loops, duplicates merged,
# sorted by (source, destination); its edges come from no single base edge, so nothing carries onto it.
EDGE_SET_KINDS = ("input", "self_loops", "remaining_self_loops", "k_hop")
DERIVED_EDGE_SETS = EDGE_SET_KINDS[1:]
HOP_EDGE_SETS = ("k_hop",)  # the derivations that take a hop count (EdgeSetDef.hops)
CARRIED_EDGE_SETS = ("self_loops", "remaining_self_loops")  # the derived sets ``carry`` moves values onto
# How ``carry`` fills the edge values of the loops a derived set adds: a constant (PyG's fill_value
# number), or the mean / sum of the values of the node's non-loop in-edges in the base set (PyG's
# fill_value "mean" / "add").
CARRY_FILLS = ("constant", "mean", "sum")
DEFAULT_EDGES = {"edges": ""}  # the ``defaults`` of an op's edge set attribute: the graph's own edges
AXIS_REDUCTIONS = ("sum", "mean", "max", "min")
REDUCE_AXES = ("src", "dst", "graph")
GATHER_INDICES = ("src", "dst", "batch")
INITIALIZERS = ("torch", "glorot", "zeros", "ones", "normal", "uniform", "constant")
# The model-wide initialisers of parameters with none written (mpdsl.initialisation: what each role gets).
DEFAULT_INITS = ("torch", "glorot")


class Trait(enum.Enum):
    """What an op is, for the passes and planners that decide from it."""

    SOURCE = "source"            # no operands: the value's declared type is checked, not inferred
    INTERFACE = "interface"      # a model input or parameter: DCE keeps it, CSE never merges two
    ELEMENTWISE = "elementwise"  # element k of the result depends only on element k of each (broadcast) operand
    ROW_WISE = "row-wise"        # row r of the result depends only on row r of each operand of its domain
                                 # (and on whole params): it may run block by block and be hoisted over gathers
    ROW_SUM = "row-sum"          # a sum over the rows of its row operands into a param value: it may run block by
                                 # block beside row-wise ops, one partial sum per block, added in block order
    GRAPH = "graph"              # moves or reduces values along the edges: node and edge layouts apply to it
    EDGE_ORDER = "edge-order"    # reads its edge operands grouped by its ``by`` segment (edges sorted by it pay)
    FUSED = "fused"              # made by the optimizer or autodiff; means its unfused definition (``OpDef.unfused``)
    GRAPH_PAIRS = "graph-pairs"  # relates every pair of nodes of each graph (global attention): its work grows with
                                 # the sum of the squared graph sizes, not with the edges


class Effect(enum.Enum):
    """What running an op does besides computing its result."""

    PURE = "pure"          # a function of its operands: equal calls may be merged, unused ones dropped
    RANDOM = "random"      # draws random numbers (in training): two calls are two draws, never merged
    STATEFUL = "stateful"  # updates model state (in training): never merged, kept even when unused


class MissingRule(NotImplementedError):
    """An op, or an attribute value of one, that a rule table has no entry for: a compiler bug (the
    op table gained something a pass, backend or autodiff was not taught), never a user error."""


T = TypeVar("T")


def choose(table: Mapping[str, T], op: str, attr: str, value: Any, where: str) -> T:
    """``table[value]`` for attribute ``attr`` of ``op``; ``MissingRule`` naming ``where`` (the rule
    table to extend) when the value has no entry."""
    try:
        return table[value]
    except KeyError:
        raise MissingRule(f"{where} has no rule for {op}({attr}={value!r}); it handles {sorted(table)}") from None


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: int | None  # None: variadic (at least one operand)
    attrs: dict[str, Any]  # attr name -> tuple of allowed values (a closed enumeration), or a Python type
    rule: TypeRule = field(repr=False)
    doc: str = ""
    declared: bool = False  # the rule reads the value's declared type (sources, reshape, one_hot, broadcast)
    traits: frozenset[Trait] = frozenset()
    effect: Effect | Callable[[Attrs], Effect] = Effect.PURE
    compute: Callable[..., Any] | None = field(default=None, repr=False)  # elementwise math: compute(xp, *xs, **attrs)
    vjp: Callable[..., list] | None = field(default=None, repr=False)  # elementwise: vjp(b, v, g, needed)
    identities: tuple[tuple[int, float], ...] = ()  # (operand position, constant c): x op c == x
    no_gradient: str | None = None  # why the op carries no gradient (None: it has an adjoint rule)
    unfused: Callable[..., Any] | None = field(default=None, repr=False)  # fused ops: unfused(b, v) -> root value
    # Attributes that may be left out, with the value they then take (``complete``); the IR text omits
    # an attribute at its default. ``edges`` (the edge set an op moves values along) defaults to the
    # graph's own edges, so a program on one edge set reads as before edge sets existed.
    defaults: dict[str, Any] = field(default_factory=dict)

    def has(self, trait: Trait) -> bool:
        return trait in self.traits

    def effect_of(self, attrs: Attrs) -> Effect:
        """The effect of one call with ``attrs`` (batch_norm in eval mode is pure)."""
        return self.effect(attrs) if callable(self.effect) else self.effect

    def closed_attrs(self) -> dict[str, tuple]:
        """The attributes that take values from a closed enumeration, with their values."""
        return {k: v for k, v in self.attrs.items() if isinstance(v, tuple)}

    def complete(self, attrs: Mapping[str, Any]) -> Attrs:
        """``attrs`` with the defaulted attributes it leaves out (``defaults``) filled in."""
        if all(k in attrs for k in self.defaults):
            return dict(attrs)
        return {**self.defaults, **attrs}

    def check_attrs(self, attrs: Attrs) -> None:
        if set(attrs) != set(self.attrs):
            raise TypeRuleError(f"op {self.name} takes attributes {sorted(self.attrs)}, got {sorted(attrs)}")
        for key, allowed in self.attrs.items():
            value = attrs[key]
            ok = value in allowed if isinstance(allowed, tuple) else isinstance(value, allowed)
            if not ok:
                raise TypeRuleError(f"op {self.name}: attribute {key}={value!r} is not one of {allowed}")

    def infer(self, types: list[TensorType], attrs: Attrs, declared: TensorType | None = None) -> TensorType:
        if self.arity is not None and len(types) != self.arity:
            raise TypeRuleError(f"{self.name} takes {self.arity} operand(s), got {len(types)}")
        if self.arity is None and not types:
            raise TypeRuleError(f"{self.name} takes at least one operand")
        attrs = self.complete(attrs)
        self.check_attrs(attrs)
        return self.rule(types, attrs, declared)


def is_pure(v) -> bool:
    """Whether IR value ``v`` may be merged with an equal one or dropped when unused."""
    return OPS[v.op].effect_of(v.attr) is Effect.PURE


OPS: dict[str, OpDef] = {}


def op(name: str, arity: int | None, attrs: dict[str, Any] | None = None, *, source: bool = False,
       declared: bool = False, traits: tuple[Trait, ...] = (), **facts: Any):
    """Register the decorated type rule as op ``name``; its docstring is the op's contract. ``facts``
    are the other ``OpDef`` fields (effect, compute, vjp, identities, no_gradient, unfused)."""

    def register(rule: TypeRule) -> TypeRule:
        if name in OPS:
            raise MissingRule(f"op {name} is defined twice")
        all_traits = frozenset(traits) | ({Trait.SOURCE} if source else set())
        OPS[name] = OpDef(name, arity, attrs or {}, rule, (rule.__doc__ or "").strip(), source or declared,
                          all_traits, **facts)
        assert set(OPS[name].defaults) <= set(OPS[name].attrs), name
        return rule

    return register


def _require_float(t: TensorType, what: str, operand: int = 0) -> None:
    if not t.is_float:
        raise TypeRuleError(f"{what} needs float values, got {t}",
                            "int inputs (edge types, node types, batch ids) can only index parameters: W[etype]",
                            operand)


def _require_declared(declared: TensorType | None, name: str) -> TensorType:
    if declared is None:
        raise TypeRuleError(f"source op {name} needs a declared type")
    return declared


def _normalize_axis(axis: int, rank: int, what: str) -> int:
    if not -rank <= axis < rank:
        raise TypeRuleError(f"{what}: axis {axis} is out of range for {rank} feature axes",
                            "feature axes count from 0 (the row axis is implicit); -1 is the last")
    return axis % rank


# ---- sources -----------------------------------------------------------------------------


@op("input", 0, {"name": str}, source=True, traits=(Trait.INTERFACE,),
    no_gradient="a source: its gradient is an output of the gradient program when asked for")
def _input(types, attrs, declared):
    """A model input, looked up by name in the call's inputs, then in the graph's arrays."""
    t = _require_declared(declared, "input")
    if t.domain is Domain.PARAM:
        raise TypeRuleError("an input has domain node, edge or graph")
    return t


@op("param", 0, {"name": str, "init": str}, source=True, traits=(Trait.INTERFACE,),
    no_gradient="a source: its gradient is an output of the gradient program")
def _param(types, attrs, declared):
    """A learnable parameter, read from the model's parameter store by name."""
    t = _require_declared(declared, "param")
    if t.domain is not Domain.PARAM or not t.is_float:
        raise TypeRuleError("a parameter is a float param value")
    return t


@op("const", 0, {"value": float}, source=True, no_gradient="a constant")
def _const(types, attrs, declared):
    """A float scalar constant (param[])."""
    t = _require_declared(declared, "const")
    if t.domain is not Domain.PARAM or t.shape or not t.is_float:
        raise TypeRuleError("a constant is a float param[] scalar")
    return t


@op("degree", 0, {"dir": ("in", "out"), "edges": str}, source=True, no_gradient="depends on the graph only",
    defaults=DEFAULT_EDGES)
def _degree(types, attrs, declared):
    """Per-node edge count as float: ``in`` counts edges j->i at i, ``out`` at j (multi-edges count),
    of the edge set ``edges`` ("": the graph's own edges)."""
    t = _require_declared(declared, "degree")
    if t.domain is not Domain.NODE or t.shape or not t.is_float:
        raise TypeRuleError("a degree is a float node[] value")
    return t.on(_end_space(attrs, "dst" if attrs["dir"] == "in" else "src"))


def _sequence_type(declared: TensorType | None, name: str) -> TensorType:
    t = _require_declared(declared, name)
    if t.domain is not Domain.PARAM or t.rank != 1 or not t.is_float:
        raise TypeRuleError(f"{name} is a float param[N] constant, got {t}")
    count = t.shape[0]
    if count.is_static and count.value < 1:
        raise TypeRuleError(f"{name} of {count.value} elements: a constant sequence needs at least one",
                            f"{name} gives a param[N] with N >= 1")
    return t


@op("arange", 0, {"start": float, "step": float}, source=True, no_gradient="a constant")
def _arange(types, attrs, declared):
    """The constant param[N] start, start + step, ..., start + (N - 1) step (element i is
    start + i * step, computed in float64 and rounded once to the program's float dtype); N >= 1 is
    the declared length. Not a parameter: no gradient, never trained."""
    if attrs["step"] == 0:
        raise TypeRuleError("arange with step 0", "the step of arange is a nonzero number")
    return _sequence_type(declared, "arange")


@op("linspace", 0, {"start": float, "stop": float}, source=True, no_gradient="a constant")
def _linspace(types, attrs, declared):
    """The constant param[N] of N >= 1 evenly spaced values from start to stop, both included (one
    element: start), as torch.linspace: with step = (stop - start) / (N - 1), element i is
    start + i * step in the first half and stop - (N - 1 - i) * step in the second, in float64,
    rounded once to the program's float dtype. Not a parameter: no gradient, never trained."""
    return _sequence_type(declared, "linspace")


def sequence_values(op_name: str, attrs: Attrs, i, where: Callable):
    """The values of an ``arange`` or ``linspace`` from ``i``, the float64 indices 0 .. N-1 as a
    NumPy array or a torch tensor (``where``: ``np.where`` or ``torch.where``): both backends
    compute them with this one formula."""
    count = len(i)
    if op_name == "arange":
        return attrs["start"] + i * attrs["step"]
    start, stop = attrs["start"], attrs["stop"]
    if count == 1:
        return i + start
    step = (stop - start) / (count - 1)
    return where(i < count // 2, start + i * step, stop - (count - 1 - i) * step)


# ---- elementwise -------------------------------------------------------------------------
#
# An elementwise op's math is written once, as ``compute(m, *operands, **attrs)`` over an array
# namespace ``m`` with the functions of ``ArrayMath`` (NumPy for the reference backend and the
# constant folder, torch for the Triton backend's dense ops); backends broadcast the operands and
# cast the result to the program's float dtype. Its local vector-Jacobian product is
# ``vjp(b, v, g, needed)`` on a gradient builder ``b`` (``mpdsl.autodiff.GradBuilder``): one cotangent
# (or None) per operand, before un-broadcasting.


class ArrayMath:
    """The array functions elementwise ``compute`` rules may use; NumPy's (``NUMPY_MATH``) here, torch's
    in the Triton backend. Scalars (Python floats) are accepted wherever an operand is."""

    FUNCTIONS = ("negative", "add", "subtract", "multiply", "divide", "power", "maximum", "minimum", "exp",
                 "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt", "tanh", "abs", "erf", "sigmoid",
                 "softplus", "where", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh",
                 "sign", "floor", "ceil", "round", "trunc", "greater", "greater_equal", "less", "less_equal",
                 "equal", "not_equal", "logical_and", "logical_or", "logical_not")


class NumpyMath(ArrayMath):
    """``ArrayMath`` on NumPy arrays and scalars (SciPy for erf and the logistic sigmoid)."""

    def __init__(self):
        functions = {"negative": np.negative, "add": np.add, "subtract": np.subtract, "multiply": np.multiply,
                     "divide": np.divide, "power": np.power, "maximum": np.maximum, "minimum": np.minimum,
                     "exp": np.exp, "expm1": np.expm1, "log": np.log, "sqrt": np.sqrt, "tanh": np.tanh,
                     "abs": np.abs, "erf": scipy.special.erf, "sigmoid": scipy.special.expit, "where": np.where,
                     "log1p": np.log1p, "log2": np.log2, "log10": np.log10, "sin": np.sin, "cos": np.cos,
                     "tan": np.tan, "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan, "atan2": np.arctan2,
                     "sinh": np.sinh, "cosh": np.cosh, "sign": np.sign, "floor": np.floor, "ceil": np.ceil,
                     "round": np.rint, "trunc": np.trunc,  # rint: half to even, as torch.round
                     "greater": np.greater, "greater_equal": np.greater_equal, "less": np.less,
                     "less_equal": np.less_equal, "equal": np.equal, "not_equal": np.not_equal,
                     "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_not": np.logical_not,
                     "rsqrt": lambda x: 1 / np.sqrt(x), "softplus": lambda x: np.logaddexp(0, x)}
        assert set(functions) == set(self.FUNCTIONS)
        self.__dict__.update(functions)


NUMPY_MATH = NumpyMath()


def _unary_vjp(derivative: Callable) -> Callable:
    """The vjp of a unary op from its derivative dv/dx = derivative(b, v, x)."""
    def vjp(b, v, g, needed):
        return [b.mul(g, derivative(b, v, v.operands[0]))]
    return vjp


def _gelu_derivative(b, v, x):
    # Phi(x) + x phi(x); Phi(x) = gelu(x) / x, 1/2 at 0
    zero = b.eq(x, 0.0)
    cdf = b.div(b.add(v, b.mul(zero, 0.5)), b.add(x, zero))
    pdf = b.mul(b.unary("exp", b.mul(b.mul(x, x), -0.5)), 1.0 / math.sqrt(2.0 * math.pi))
    return b.add(cdf, b.mul(x, pdf))


def _silu_derivative(b, v, x):
    s = b.unary("sigmoid", x)  # s (1 + x (1 - s))
    return b.mul(s, b.add(1.0, b.mul(x, b.sub(1.0, s))))


def _elu_derivative(b, v, x):
    positive = b.gt(x, 0.0)  # 1 for x > 0, else alpha exp(x)
    negative = b.mul(b.unary("exp", b.minimum(x, 0.0)), v.attr["alpha"])
    return b.add(positive, b.mul(b.sub(1.0, positive), negative))


def _leaky_relu(m, x, slope):
    return m.maximum(x, x * slope) if 0 <= slope <= 1 else m.where(m.greater(x, 0), x, x * slope)


# name: (contract, compute, derivative(b, v, x) or a vjp)
_UNARY: dict[str, tuple[str, Callable, Callable]] = {
    # The masks read the output: v > 0 exactly where x > 0, and the output is usually saved anyway.
    "relu": ("max(x, 0)", lambda m, x: m.maximum(x, 0), lambda b, v, x: b.gt(v, 0.0)),
    "sigmoid": ("1 / (1 + exp(-x))", lambda m, x: m.sigmoid(x), lambda b, v, x: b.mul(v, b.sub(1.0, v))),
    "tanh": ("tanh(x)", lambda m, x: m.tanh(x), lambda b, v, x: b.sub(1.0, b.mul(v, v))),
    "exp": ("exp(x)", lambda m, x: m.exp(x), lambda b, v, x: v),
    "log": ("natural log", lambda m, x: m.log(x), lambda b, v, x: b.div(1.0, x)),
    "sqrt": ("square root", lambda m, x: m.sqrt(x), lambda b, v, x: b.div(0.5, v)),
    # d x^-1/2 = -1/2 x^-3/2 = -1/2 y / x
    "rsqrt": ("1 / sqrt(x)", lambda m, x: m.rsqrt(x), lambda b, v, x: b.mul(-0.5, b.div(v, x))),
    # sign(x), 0 at 0 (as torch)
    "abs": ("|x|", lambda m, x: m.abs(x), lambda b, v, x: b.sub(b.gt(x, 0.0), b.gt(0.0, x))),
    "gelu": ("x * Phi(x) (exact, erf form)", lambda m, x: 0.5 * x * (1 + m.erf(x / math.sqrt(2))),
             _gelu_derivative),
    "silu": ("x * sigmoid(x)", lambda m, x: x * m.sigmoid(x), _silu_derivative),
    "softplus": ("log(1 + exp(x))", lambda m, x: m.softplus(x), lambda b, v, x: b.unary("sigmoid", x)),
    "sin": ("sin(x) (radians)", lambda m, x: m.sin(x), lambda b, v, x: b.unary("cos", x)),
    "cos": ("cos(x) (radians)", lambda m, x: m.cos(x), lambda b, v, x: b.neg(b.unary("sin", x))),
    "tan": ("tan(x) (radians)", lambda m, x: m.tan(x), lambda b, v, x: b.add(1.0, b.mul(v, v))),
    # d asin = 1 / sqrt(1 - x^2), d acos = -1 / sqrt(1 - x^2), d atan = 1 / (1 + x^2)
    "asin": ("arcsine, in [-pi/2, pi/2] (NaN outside [-1, 1])", lambda m, x: m.asin(x),
             lambda b, v, x: b.unary("rsqrt", b.sub(1.0, b.mul(x, x)))),
    "acos": ("arccosine, in [0, pi] (NaN outside [-1, 1])", lambda m, x: m.acos(x),
             lambda b, v, x: b.neg(b.unary("rsqrt", b.sub(1.0, b.mul(x, x))))),
    "atan": ("arctangent, in (-pi/2, pi/2)", lambda m, x: m.atan(x),
             lambda b, v, x: b.div(1.0, b.add(1.0, b.mul(x, x)))),
    "sinh": ("hyperbolic sine", lambda m, x: m.sinh(x), lambda b, v, x: b.unary("cosh", x)),
    "cosh": ("hyperbolic cosine", lambda m, x: m.cosh(x), lambda b, v, x: b.unary("sinh", x)),
    "log1p": ("log(1 + x), accurate for small x", lambda m, x: m.log1p(x), lambda b, v, x: b.div(1.0, b.add(1.0, x))),
    "expm1": ("exp(x) - 1, accurate for small x", lambda m, x: m.expm1(x), lambda b, v, x: b.add(v, 1.0)),
    "log2": ("base-2 log", lambda m, x: m.log2(x), lambda b, v, x: b.div(1.0 / math.log(2.0), x)),
    "log10": ("base-10 log", lambda m, x: m.log10(x), lambda b, v, x: b.div(1.0 / math.log(10.0), x)),
    "erf": ("the error function 2/sqrt(pi) * integral of exp(-t^2) from 0 to x", lambda m, x: m.erf(x),
            lambda b, v, x: b.mul(b.unary("exp", b.mul(b.mul(x, x), -1.0)), 2.0 / math.sqrt(math.pi))),
}
# Piecewise-constant functions: their derivative is 0 wherever it exists, so they carry no gradient
# (the values they feed are constants to autodiff: a zero gradient, as torch's backward gives).
PIECEWISE_CONSTANT = "piecewise constant: zero gradient (as torch's backward gives)"
_UNARY_CONSTANT: dict[str, tuple[str, Callable]] = {
    "sign": ("-1, 0 or 1 by the sign of x (0 at 0, as torch.sign)", lambda m, x: m.sign(x)),
    "floor": ("the largest integer <= x", lambda m, x: m.floor(x)),
    "ceil": ("the smallest integer >= x", lambda m, x: m.ceil(x)),
    "round": ("the nearest integer, halves to even (as torch.round)", lambda m, x: m.round(x)),
    "trunc": ("x rounded towards 0", lambda m, x: m.trunc(x)),
}
_UNARY_WITH_ATTR: dict[str, tuple[str, str, Callable, Callable]] = {
    "leaky_relu": ("slope", "x if x > 0 else slope * x", _leaky_relu,
                   lambda b, v, x: b.add(b.mul(b.gt(v if v.attr["slope"] >= 0 else x, 0.0), 1.0 - v.attr["slope"]),
                                         v.attr["slope"])),
    "elu": ("alpha", "x if x > 0 else alpha * (exp(x) - 1)",
            lambda m, x, alpha: m.where(m.greater(x, 0), x, alpha * m.expm1(m.minimum(x, 0))), _elu_derivative),
}


def _pow_vjp(b, v, g, needed):
    x, y = v.operands
    gx = gy = None
    if needed[0]:
        if y.op == "const":                     # c x^(c-1); nothing for c == 0
            c = y.attr["value"]
            gx = None if c == 0 else b.mul(b.mul(g, c), b.binary("pow", x, c - 1.0))
        else:                                   # y x^(y-1), 0 where y == 0 (as torch)
            exponent = b.add(b.sub(y, 1.0), b.eq(y, 0.0))
            gx = b.mul(b.mul(g, y), b.binary("pow", x, exponent))
    if needed[1]:                               # x^y log x, 0 where x == 0 (as torch)
        gy = b.mul(b.mul(g, v), b.unary("log", b.add(x, b.eq(x, 0.0))))
    return [gx, gy]


def _atan2_vjp(b, v, g, needed):
    y, x = v.operands                           # d atan2(y, x) = (x dy - y dx) / (x^2 + y^2)
    scale = b.div(g, b.add(b.mul(x, x), b.mul(y, y)))
    return [b.mul(scale, x) if needed[0] else None, b.neg(b.mul(scale, y)) if needed[1] else None]


def _extremum_vjp(b, v, g, needed):
    x, y = v.operands                           # ties split in half (as torch)
    tie = b.mul(b.eq(x, y), 0.5)
    first, second = (x, y) if v.op == "maximum" else (y, x)
    return [b.mul(g, b.add(b.gt(first, second), tie)) if needed[0] else None,
            b.mul(g, b.add(b.gt(second, first), tie)) if needed[1] else None]


# name: (contract, compute, vjp, identities)
_BINARY: dict[str, tuple[str, Callable, Callable, tuple[tuple[int, float], ...]]] = {
    "add": ("a + b", lambda m, a, b: m.add(a, b),
            lambda b, v, g, needed: [g if needed[0] else None, g if needed[1] else None], ((0, 0.0), (1, 0.0))),
    "sub": ("a - b", lambda m, a, b: m.subtract(a, b),
            lambda b, v, g, needed: [g if needed[0] else None, b.neg(g) if needed[1] else None], ((1, 0.0),)),
    "mul": ("a * b", lambda m, a, b: m.multiply(a, b),
            lambda b, v, g, needed: [b.mul(g, v.operands[1]) if needed[0] else None,
                                     b.mul(g, v.operands[0]) if needed[1] else None], ((0, 1.0), (1, 1.0))),
    "div": ("a / b", lambda m, a, b: m.divide(a, b),
            lambda b, v, g, needed: [b.div(g, v.operands[1]) if needed[0] else None,
                                     b.neg(b.div(b.mul(g, v), v.operands[1])) if needed[1] else None], ((1, 1.0),)),
    "pow": ("a ** b", lambda m, a, b: m.power(a, b), _pow_vjp, ((1, 1.0),)),
    "maximum": ("elementwise max", lambda m, a, b: m.maximum(a, b), _extremum_vjp, ()),
    "minimum": ("elementwise min", lambda m, a, b: m.minimum(a, b), _extremum_vjp, ()),
    "atan2": ("atan2(a, b): the angle of the point (b, a) in radians, in [-pi, pi] (as torch.atan2)",
              lambda m, a, b: m.atan2(a, b), _atan2_vjp, ()),
}

# name: (source spelling, symbol in messages, compute) of the comparisons; each gives a float mask.
COMPARISONS: dict[str, tuple[str, Callable]] = {
    "lt": ("<", lambda m, a, b: m.less(a, b)), "le": ("<=", lambda m, a, b: m.less_equal(a, b)),
    "gt": (">", lambda m, a, b: m.greater(a, b)), "ge": (">=", lambda m, a, b: m.greater_equal(a, b)),
    "eq": ("==", lambda m, a, b: m.equal(a, b)), "ne": ("!=", lambda m, a, b: m.not_equal(a, b)),
}
# name: (source spelling, compute) of the logical operators on masks (nonzero is true).
LOGICAL: dict[str, tuple[str, Callable]] = {
    "logical_and": ("&", lambda m, a, b: m.logical_and(a, b)),
    "logical_or": ("|", lambda m, a, b: m.logical_or(a, b)),
    "logical_not": ("not", lambda m, x: m.logical_not(x)),
}

OPERATOR_SYMBOLS = {"add": "'+'", "sub": "'-'", "mul": "'*'", "div": "'/'", "pow": "'**'", "neg": "'-'",
                    **{name: f"'{spec[0]}'" for name, spec in COMPARISONS.items()},
                    **{name: f"'{spec[0]}'" for name, spec in LOGICAL.items()}}
ELEMENTWISE = (Trait.ELEMENTWISE, Trait.ROW_WISE)


def _unary_rule(name: str, contract: str):
    def rule(types, attrs, declared):
        _require_float(types[0], OPERATOR_SYMBOLS.get(name, f"'{name}'"))
        return types[0]
    rule.__doc__ = f"Elementwise {contract}; type preserved."
    return rule


def _broadcast_float_type(types: list[TensorType], shown: str) -> TensorType:
    """The type of an elementwise op over float operands: joined rows (domain and edge set), broadcast shape."""
    for i, t in enumerate(types):
        _require_float(t, shown, i)
    space = join_spaces(types, shown)
    return TensorType(space.domain, broadcast_shapes([t.shape for t in types], shown), types[0].dtype, space.name)


def _binary_rule(name: str, contract: str):
    shown = OPERATOR_SYMBOLS.get(name, f"'{name}'")

    def rule(types, attrs, declared):
        return _broadcast_float_type(types, shown)
    rule.__doc__ = (f"Elementwise {contract} with broadcasting (params uniform over rows, "
                    "feature shapes aligned from the left).")
    return rule


op("neg", 1, traits=ELEMENTWISE, compute=lambda m, x: m.negative(x),
   vjp=lambda b, v, g, needed: [b.neg(g)])(_unary_rule("neg", "-x"))
for _name, (_contract, _compute, _derivative) in _UNARY.items():
    op(_name, 1, traits=ELEMENTWISE, compute=_compute, vjp=_unary_vjp(_derivative))(_unary_rule(_name, _contract))
for _name, (_attr, _contract, _compute, _derivative) in _UNARY_WITH_ATTR.items():
    op(_name, 1, {_attr: float}, traits=ELEMENTWISE, compute=_compute,
       vjp=_unary_vjp(_derivative))(_unary_rule(_name, _contract))
# Inference semantics (identity) for gradients: training programs have their dropouts replaced by
# mask multiplications first (autodiff.mask_dropout), so that forward and backward share the mask.
op("dropout", 1, {"p": float}, traits=ELEMENTWISE, effect=Effect.RANDOM,
   vjp=lambda b, v, g, needed: [g])(_unary_rule(
       "dropout", "identity at inference; in training, zero with probability p and scale by 1/(1-p)"))
for _name, (_contract, _compute, _vjp, _identities) in _BINARY.items():
    op(_name, 2, traits=ELEMENTWISE, compute=_compute, vjp=_vjp, identities=_identities)(_binary_rule(_name, _contract))
for _name, (_contract, _compute) in _UNARY_CONSTANT.items():
    op(_name, 1, traits=ELEMENTWISE, compute=_compute, no_gradient=PIECEWISE_CONSTANT)(_unary_rule(_name, _contract))


def _clamp_vjp(b, v, g, needed):
    x = v.operands[0]                           # 1 where lo <= x <= hi, bounds included (as torch.clamp)
    inside = b.mul(b.binary("ge", x, v.attr["lo"]), b.binary("le", x, v.attr["hi"]))
    return [b.mul(g, inside)]


@op("clamp", 1, {"lo": float, "hi": float}, traits=ELEMENTWISE,
    compute=lambda m, x, lo, hi: m.minimum(m.maximum(x, lo), hi), vjp=_clamp_vjp)
def _clamp(types, attrs, declared):
    """Elementwise min(max(x, lo), hi) with constant bounds lo <= hi (either may be infinite: a
    one-sided clamp); type preserved. The gradient passes where lo <= x <= hi (as torch.clamp)."""
    _require_float(types[0], "clamp")
    if not attrs["lo"] <= attrs["hi"]:
        raise TypeRuleError(f"clamp needs lo <= hi, got lo={attrs['lo']!r}, hi={attrs['hi']!r}",
                            "clamp(x, lo, hi) keeps x within [lo, hi]")
    return types[0]


# ---- comparisons, logic and selection ----------------------------------------------------
#
# A comparison gives a mask: a float value (the dtype of its operands) holding 1.0 where it holds
# and 0.0 elsewhere, so that masks multiply, sum and select like any value. The logical operators
# read a nonzero element as true; ``where`` selects where its condition is nonzero.


def _comparison_rule(name: str, symbol: str):
    def rule(types, attrs, declared):
        for i, t in enumerate(types):
            if not t.is_float:
                raise TypeRuleError(f"'{symbol}' compares float values, got {t}",
                                    "ids compare through one_hot: one_hot(etype, R)[k] is 1.0 where etype == k", i)
        return _broadcast_float_type(types, f"'{symbol}'")

    rule.__doc__ = (f"Elementwise comparison a {symbol} b: a float mask, 1.0 where it holds and 0.0 elsewhere "
                    "(NaN compares false, except !=), with the broadcasting of binary ops. Piecewise constant: "
                    "no gradient.")
    return rule


def _logical_rule(name: str, symbol: str, contract: str):
    def rule(types, attrs, declared):
        return _broadcast_float_type(types, f"'{symbol}'")

    rule.__doc__ = (f"Elementwise {contract} of masks (a nonzero element is true): 1.0 or 0.0, with the "
                    "broadcasting of binary ops. No gradient.")
    return rule


for _name, (_symbol, _compute) in COMPARISONS.items():
    op(_name, 2, traits=ELEMENTWISE, compute=_compute, no_gradient=PIECEWISE_CONSTANT)(
        _comparison_rule(_name, _symbol))
for _name, (_symbol, _compute) in LOGICAL.items():
    op(_name, 1 if _name == "logical_not" else 2, traits=ELEMENTWISE, compute=_compute,
       no_gradient="a function of masks (piecewise constant)")(_logical_rule(
           _name, _symbol, {"logical_and": "a and b", "logical_or": "a or b", "logical_not": "not x"}[_name]))


def _where_vjp(b, v, g, needed):
    cond = v.operands[0]                        # the cotangent goes where each side was selected (as torch)
    return [None, b.emit("where", [cond, g, b.c(0.0)]) if needed[1] else None,
            b.emit("where", [cond, b.c(0.0), g]) if needed[2] else None]


@op("where", 3, traits=ELEMENTWISE, compute=lambda m, c, a, b: m.where(m.not_equal(c, 0), a, b), vjp=_where_vjp)
def _where(types, attrs, declared):
    """Elementwise selection: a where cond is nonzero (a mask from a comparison, say), else b; the three
    operands broadcast as binary ops do. The gradient goes to a where cond holds and to b elsewhere
    (none to cond)."""
    return _broadcast_float_type(types, "'where'")


UNARY_OPS = ("neg",) + tuple(_UNARY) + tuple(_UNARY_CONSTANT)  # the source language's unary functions (and '-')
UNARY_OPS_WITH_ATTR = {name: spec[0] for name, spec in _UNARY_WITH_ATTR.items()} | {"dropout": "p"}
BINARY_OPS = tuple(_BINARY)


# ---- dense algebra -----------------------------------------------------------------------


@op("matmul", 2, traits=(Trait.ROW_WISE,))
def _matmul(types, attrs, declared):
    """Contract the last feature axis of a with the first of b: a[..., K] @ b[K, ...] -> [..., ...].

    With a param b, every row of a is multiplied by the same matrix; with b of a's domain
    (e.g. W[etype] on edges), each row by its own."""
    a, b = types
    _require_float(a, "matmul", 0)
    _require_float(b, "matmul", 1)
    if a.rank < 1:
        raise TypeRuleError(f"matmul needs a feature axis on the left, got {a}",
                            "scale by a scalar with * instead", 0)
    if b.rank < 1:
        raise TypeRuleError(f"matmul needs a feature axis on the right, got {b}",
                            "scale by a scalar with * instead", 1)
    if a.shape[-1] != b.shape[0]:
        raise TypeRuleError(
            f"matmul shape mismatch: {shape_str(a.shape)} @ {shape_str(b.shape)} "
            f"(inner dims {a.shape[-1]} and {b.shape[0]} differ)",
            "the last feature dim of the left operand must equal the first dim of the right one")
    space = join_spaces(types, "matmul")
    return TensorType(space.domain, a.shape[:-1] + b.shape[1:], a.dtype, space.name)


@op("reduce", 1, {"reduce": AXIS_REDUCTIONS, "axis": int}, traits=(Trait.ROW_WISE,))
def _reduce(types, attrs, declared):
    """Reduce one feature axis (sum, mean, max, min); rows are kept."""
    (t,) = types
    _require_float(t, "reduce")
    axis = _normalize_axis(attrs["axis"], t.rank, f"{attrs['reduce']}")
    return t.with_(shape=t.shape[:axis] + t.shape[axis + 1:])


@op("axis_softmax", 1, {"axis": int}, traits=(Trait.ROW_WISE,))
def _axis_softmax(types, attrs, declared):
    """Softmax along one feature axis of each row."""
    (t,) = types
    _require_float(t, "softmax")
    _normalize_axis(attrs["axis"], t.rank, "softmax")
    return t


@op("concat", None, {"axis": int}, traits=(Trait.ROW_WISE,))
def _concat(types, attrs, declared):
    """Concatenate along a feature axis; all operands share domain (and edge set), rank and the other
    dims. The result's axis is the sum of theirs (symbolic dims too: ``edge[FE]`` and ``edge[D]`` twice
    give ``edge[2*D + FE]``)."""
    spaces = {t.space for t in types}
    if len(spaces) > 1:
        what = "domains" if len({s.domain for s in spaces}) > 1 else "edge sets"
        raise TypeRuleError(f"concat of values of different {what} ({', '.join(sorted(map(str, spaces)))})",
                            "gather or reduce to one domain (and edge set) first", 1)
    rank = types[0].rank
    if rank == 0:
        raise TypeRuleError("concat needs values with a feature axis", "reshape scalars with reshape(x, [1])", 0)
    axis = _normalize_axis(attrs["axis"], rank, "concat")
    total = Dim(0)
    for i, t in enumerate(types):
        _require_float(t, "concat", i)
        if t.rank != rank or t.shape[:axis] + t.shape[axis + 1:] != types[0].shape[:axis] + types[0].shape[axis + 1:]:
            raise TypeRuleError(f"concat: {t} does not match {types[0]} outside axis {axis}",
                                "all operands need the same feature shape except along the concat axis", i)
        total = total + t.shape[axis]
    return types[0].with_(shape=types[0].shape[:axis] + (total,) + types[0].shape[axis + 1:])


def parse_subscripts(spec: str) -> tuple[list[str], str]:
    """'hd,hde->he' -> (['hd', 'hde'], 'he'); letters name feature axes."""
    if spec.count("->") != 1:
        raise TypeRuleError(f"einsum subscripts {spec!r} need exactly one '->'", "e.g. \"hd,hde->he\"")
    lhs, out = spec.replace(" ", "").split("->")
    inputs = lhs.split(",")
    for term in inputs + [out]:
        if not all("a" <= c <= "z" for c in term):
            raise TypeRuleError(f"einsum subscripts {spec!r}: use the letters a-z, one per feature axis",
                                "the row axis is implicit and shared")
    return inputs, out


def _subscript_sizes(types, spec: str, what: str) -> tuple[dict[str, Dim], str]:
    """Check einsum-style subscripts against the operands (one letter per feature axis, a letter's
    axes of one size, distinct output letters from the inputs); the size of each letter and the
    output term."""
    inputs, out = parse_subscripts(spec)
    if len(inputs) != len(types):
        raise TypeRuleError(f"{what} subscripts {spec!r} name {len(inputs)} operand(s), got {len(types)}",
                            "one comma-separated term per operand, e.g. einsum(\"hd,hde->he\", a, b)")
    sizes: dict[str, Dim] = {}
    for i, (term, t) in enumerate(zip(inputs, types)):
        _require_float(t, what, i)
        if len(term) != t.rank:
            raise TypeRuleError(f"{what} term {term!r} has {len(term)} letters but operand {i + 1} is {t}",
                                "one letter per feature axis", i)
        for letter, dim in zip(term, t.shape):
            if sizes.setdefault(letter, dim) != dim:
                raise TypeRuleError(f"{what} axis {letter!r} is {sizes[letter]} in one operand and {dim} in another",
                                    "axes with the same letter need the same size", i)
    if len(set(out)) != len(out) or not set(out) <= set(sizes):
        raise TypeRuleError(f"{what} output {out!r} must use distinct letters from the inputs",
                            "each output letter once, each one a letter of an input term")
    return sizes, out


@op("einsum", None, {"spec": str}, traits=(Trait.ROW_WISE,))
def _einsum(types, attrs, declared):
    """Einstein summation over feature axes, e.g. "hd,hde->he" (per-head matmul); the row axis is
    implicit and shared by all non-param operands; letters absent from the output are summed."""
    sizes, out = _subscript_sizes(types, attrs["spec"], "einsum")
    space = join_spaces(types, "einsum")
    return TensorType(space.domain, tuple(sizes[c] for c in out), types[0].dtype, space.name)


def shape_size(shape) -> Dim:
    size = Dim(1)
    for d in shape:
        size = size * d
    return size


@op("reshape", 1, declared=True, traits=(Trait.ROW_WISE,))
def _reshape(types, attrs, declared):
    """Reshape each row's features to the declared shape (same number of elements)."""
    (t,) = types
    target = _require_declared(declared, "reshape")
    if shape_size(t.shape) != shape_size(target.shape):
        raise TypeRuleError(f"cannot reshape {shape_str(t.shape)} ({shape_size(t.shape)} elements) to "
                            f"{shape_str(target.shape)} ({shape_size(target.shape)} elements)",
                            "the new shape must hold the same number of elements per row")
    return t.with_(shape=target.shape)


@op("one_hot", 1, {"classes": int}, declared=True, traits=(Trait.ROW_WISE,),
    no_gradient="an indicator of int ids")
def _one_hot(types, attrs, declared):
    """Float indicator vector of each row's int id: one_hot(etype, R)[r] = 1 if etype == r (ids >= R are
    refused at run time)."""
    (t,) = types
    target = _require_declared(declared, "one_hot")
    if t.dtype != INT_DTYPE or t.domain is Domain.PARAM or t.rank != 0:
        raise TypeRuleError(f"one_hot takes int ids (a node, edge or graph int input), got {t}",
                            "declare the ids as, e.g., etype: edge int", 0)
    if attrs["classes"] < 1:
        raise TypeRuleError("one_hot needs at least one class")
    if not target.is_float or target.space != t.space or target.shape != (Dim(attrs["classes"]),):
        raise TypeRuleError(f"one_hot of {t} with {attrs['classes']} classes is {t.space}[{attrs['classes']}] float")
    return target


# ---- normalisation -----------------------------------------------------------------------

BATCH_NORM_MODES = ("auto", "train", "eval")
# batch_norm's parameter operands 1-4, in order, with their initialisers when none is written (torch.nn.BatchNorm1d's).
BATCH_NORM_INITIAL = {"running_mean": "zeros", "running_var": "ones", "gamma": "ones", "beta": "zeros"}


@op("batch_norm", 5, {"eps": float, "momentum": float, "mode": BATCH_NORM_MODES},
    effect=lambda attrs: Effect.PURE if attrs["mode"] == "eval" else Effect.STATEFUL)
def _batch_norm(types, attrs, declared):
    """Batch normalisation over the rows (Ioffe & Szegedy 2015), as torch.nn.BatchNorm1d: operands x
    (node, edge or graph values), running_mean, running_var, gamma, beta (params of x's feature
    shape). Training: (x - mu) / sqrt(var + eps) * gamma + beta with mu, var the mean and biased
    variance of each feature element over the rows, and the running statistics updated in place:
    running = (1 - momentum) * running + momentum * batch statistic (unbiased variance). Inference:
    the running statistics in place of mu and var. ``mode`` "train" / "eval" fixes the form; "auto"
    follows the run (train() / eval()) and is differentiated in its inference form."""
    x, *stats = types
    _require_float(x, "batch_norm")
    if x.domain is Domain.PARAM:
        raise TypeRuleError(f"batch_norm normalises over the rows of a node, edge or graph value, got {x}",
                            "apply it to per-node, per-edge or per-graph values", 0)
    for i, (name, t) in enumerate(zip(BATCH_NORM_INITIAL, stats), start=1):
        if t.domain is not Domain.PARAM or not t.is_float or t.shape != x.shape:
            raise TypeRuleError(f"batch_norm: {name} must be a param[{', '.join(map(str, x.shape))}] "
                                f"(the feature shape of x), got {t}", operand=i)
    if attrs["eps"] <= 0 or not 0 <= attrs["momentum"] <= 1:
        raise TypeRuleError(f"batch_norm needs eps > 0 and 0 <= momentum <= 1, got eps={attrs['eps']}, "
                            f"momentum={attrs['momentum']}")
    return x


def running_statistic(value) -> tuple[str, tuple[int, ...]] | None:
    """Where a batch_norm running statistic (operand 1 or 2, an IR value) lives: (param name, the
    static indices into it), for a param or a param indexed by constants (``bn_mean[t]`` in a loop);
    None for anything else (then training cannot update it)."""
    indices: list[int] = []
    while value.op == "select":
        indices.append(value.attr["index"])
        value = value.operands[0]
    if value.op != "param":
        return None
    return value.attr["name"], tuple(reversed(indices))


# ---- graph movement ----------------------------------------------------------------------


def edge_set_label(name: str) -> str:
    """An edge set as the source language names it: its name, ``edge`` for the graph's own edges
    (a typed set by its relation name: ``writes``)."""
    return edge_set_relation(name) or "edge"


def _end_space(attrs: Attrs, end: str) -> Space:
    """The node rows at the ``end`` ("src" / "dst") of the edge set ``attrs["edges"]``: its node type's
    (the graph's own nodes for an untyped set)."""
    src, dst = edge_set_ends(attrs["edges"])
    return Space(Domain.NODE, src if end == "src" else dst)


def _at_end(t: TensorType, attrs: Attrs, end: str, what: str, operand: int) -> None:
    """A node operand read at the ``end`` of the op's edge set lives on that end's node type."""
    want = _end_space(attrs, end)
    if t.domain is Domain.NODE and t.rowset != want.name:
        label = edge_set_label(attrs["edges"])
        where = "source" if end == "src" else "destination"
        raise TypeRuleError(
            f"{what} reads {node_label(want.name)} values at the {where}s of {label}, got {node_label(t.rowset)} "
            "values", f"the edges of {label} run from {node_label(_end_space(attrs, 'src').name)} to "
            f"{node_label(_end_space(attrs, 'dst').name)}: gather values of that type", operand)


def _edge_space(attrs: Attrs) -> Space:
    """The rows of the edge set an op's ``edges`` attribute names."""
    return Space(Domain.EDGE, attrs["edges"])


def _no_edge_set(attrs: Attrs, what: str) -> None:
    if attrs["edges"]:
        raise TypeRuleError(f"{what} does not move values along edges, so it takes no edge set "
                            f"(got {attrs['edges']!r})")


@op("gather", 1, {"index": GATHER_INDICES, "edges": str}, traits=(Trait.GRAPH,), defaults=DEFAULT_EDGES)
def _gather(types, attrs, declared):
    """Move values along the graph: node -> edge by ``src`` or ``dst`` endpoint of the edges of the
    edge set ``edges`` (its rows); graph -> node by ``batch``."""
    (t,) = types
    index = attrs["index"]
    if index == "batch":
        _no_edge_set(attrs, "a gather by batch")
    needed = Domain.GRAPH if index == "batch" else Domain.NODE
    if t.domain is not needed:
        if index == "batch":
            hint = "x[batch] broadcasts per-graph values to their nodes"
        elif t.domain is Domain.EDGE:
            hint = "it already has one row per edge: use it directly, or reduce it first: sum(...) by dst"
        else:
            hint = f"x[{index}] reads node values at each edge's {'source' if index == 'src' else 'destination'}"
        raise TypeRuleError(f"cannot gather {_a(t.domain)} value by {index}: [{index}] reads {needed} values", hint, 0)
    if index != "batch":
        _at_end(t, attrs, index, f"x[{index}]", 0)
    return t.on(Space(Domain.NODE) if index == "batch" else _edge_space(attrs))


@op("take", 2, traits=(Trait.ROW_WISE,))
def _take(types, attrs, declared):
    """Index a parameter's first axis by an int value per row: W[etype] gives each edge its W_r."""
    w, idx = types
    if w.domain is not Domain.PARAM or w.rank < 1:
        raise TypeRuleError(f"only a parameter with a leading axis can be indexed by {idx}, got {w}",
                            "declare it as param[R, ...] with R the number of types", 0)
    if idx.dtype != INT_DTYPE or idx.domain is Domain.PARAM or idx.rank != 0:
        raise TypeRuleError(f"a parameter index must be an int node, edge or graph value, got {idx}",
                            "declare the input as, e.g., etype: edge int", 1)
    return TensorType(idx.domain, w.shape[1:], w.dtype, idx.rowset)


@op("select", 1, {"index": int}, traits=(Trait.ROW_WISE,))
def _select(types, attrs, declared):
    """Static index into the first feature axis: W[t] with t a loop counter or an integer."""
    (t,) = types
    if t.rank < 1:
        raise TypeRuleError(f"cannot index {t}: it has no feature axis")
    size = t.shape[0]
    if size.is_static and not 0 <= attrs["index"] < size.value:
        raise TypeRuleError(f"index {attrs['index']} is out of range for an axis of size {size}")
    return t.with_(shape=t.shape[1:])


def _a(domain: Domain) -> str:
    return f"an {domain}" if domain is Domain.EDGE else f"a {domain}"


def _reduced_space(t: TensorType, attrs: Attrs, what: str) -> Space:
    by = attrs["by"]
    if by == "graph":
        _no_edge_set(attrs, f"{what} by graph")
        if t.domain is not Domain.NODE:
            where = f" (edge set {edge_set_label(t.rowset)})" if t.rowset else ""
            raise TypeRuleError(f"{what} by graph reduces node values to their graphs, got {_a(t.domain)} "
                                f"value{where}", "reduce edges to nodes first (sum(...) by dst)", 0)
        if t.rowset:
            raise TypeRuleError(f"{what} by graph reduces the graph's own nodes, got {node_label(t.rowset)} values",
                                "readouts by graph run on the graph's own nodes (node types have no batch vector)", 0)
        return Space(Domain.GRAPH)
    if t.domain is not Domain.EDGE:
        hint = (f"gather node values onto edges first: {what}(h[src]) by {by}" if t.domain is Domain.NODE
                else f"{what} by {by} reduces edge values onto nodes")
        raise TypeRuleError(f"{what} by {by} reduces edge values to nodes, got {_a(t.domain)} value", hint, 0)
    _on_edge_set(t, attrs, f"{what} by {by}", 0)
    return _end_space(attrs, by)


def _on_edge_set(t: TensorType, attrs: Attrs, what: str, operand: int) -> None:
    """An edge operand of an op over the edge set ``attrs["edges"]`` lives on that set."""
    if t.domain is Domain.EDGE and t.rowset != attrs["edges"]:
        raise TypeRuleError(f"{what} runs over the edges of {edge_set_label(attrs['edges'])}, but its operand "
                            f"lives on {t.space}", "reduce a value over the edge set it lives on", operand)


@op("aggregate", 1, {"reduce": AGGREGATIONS, "by": REDUCE_AXES, "edges": str}, traits=(Trait.GRAPH,),
    defaults=DEFAULT_EDGES)
def _aggregate(types, attrs, declared):
    """Reduce edge rows onto nodes (by dst: over in-edges; by src: over out-edges; the edges of the
    edge set ``edges``, which the operand lives on) or node rows onto graphs (by graph). sum, mean,
    max, min, std (population); an empty group gives 0."""
    (t,) = types
    _require_float(t, attrs["reduce"])
    return t.on(_reduced_space(t, attrs, attrs["reduce"]))


@op("softmax", 1, {"by": REDUCE_AXES, "edges": str}, traits=(Trait.GRAPH, Trait.EDGE_ORDER), defaults=DEFAULT_EDGES)
def _softmax(types, attrs, declared):
    """Segment softmax: normalise each edge row over the edges (of the edge set ``edges``) sharing its
    dst (or src) node, or each node row over the nodes of its graph; per feature element, max-subtracted."""
    (t,) = types
    _require_float(t, "softmax")
    _reduced_space(t, attrs, "softmax")
    return t


# ---- fused ops (created by the optimizer; see mpdsl/passes) ----------------------------------

LAYOUTS = ("auto", "csr_dst", "csr_src", "coo")
EDGE_AXES = ("src", "dst")  # the segment axes of the fused edge ops
OTHER_END = {"src": "dst", "dst": "src"}  # the endpoint an edge op reads at, for a segment axis
GRAPH_REDUCTIONS = ("sum", "mean", "max", "min")


def is_prefix(prefix, shape) -> bool:
    """Whether ``prefix`` is a leading part of ``shape``."""
    return len(prefix) <= len(shape) and tuple(shape[:len(prefix)]) == tuple(prefix)


def _edge_weights(w: TensorType, x: TensorType, what: str, attrs: Attrs) -> None:
    if w.domain is not Domain.EDGE or not w.is_float:
        raise TypeRuleError(f"{what}: weights must be float edge values, got {w}", operand=1)
    _on_edge_set(w, attrs, what, 1)
    if not is_prefix(w.shape, x.shape):
        raise TypeRuleError(f"{what}: weight shape {shape_str(w.shape)} is not a prefix of {shape_str(x.shape)}",
                            operand=1)


def _scores(s: TensorType, x: TensorType, what: str, attrs: Attrs, operand: int = 0) -> None:
    """Attention scores: float edge values (of the op's edge set) whose shape is a prefix of the
    aggregated values' ``x``."""
    if s.domain is not Domain.EDGE or not s.is_float or not is_prefix(s.shape, x.shape):
        raise TypeRuleError(f"{what} scores must be edge values with a prefix shape of {shape_str(x.shape)}, "
                            f"got {s}", operand=operand)
    _on_edge_set(s, attrs, what, operand)


def _node_values(t: TensorType, shape, what: str, operand: int) -> None:
    if t.domain is not Domain.NODE or not t.is_float or tuple(t.shape) != tuple(shape):
        raise TypeRuleError(f"{what} needs a float node[{', '.join(map(str, shape))}] value here, got {t}",
                            operand=operand)


def _gspmm_unfused(b, v):
    by = v.attr["by"]
    message = b.gather(v.operands[0], OTHER_END[by], v.attr["edges"])
    if len(v.operands) == 2:
        message = b.mul(message, v.operands[1])
    return b.aggregate(message, v.attr["reduce"], by)


@op("gspmm", None, {"reduce": GRAPH_REDUCTIONS, "by": EDGE_AXES, "layout": LAYOUTS, "edges": str},
    traits=(Trait.GRAPH, Trait.EDGE_ORDER, Trait.FUSED), unfused=_gspmm_unfused, defaults=DEFAULT_EDGES)
def _gspmm(types, attrs, declared):
    """Fused gather -> weight -> reduce (g-SpMM): by dst, out_i = reduce over edges j->i of w_e * x_j
    (by src, over edges j->i into j, of w_e * x_i), the edges of the edge set ``edges``. Operands: x
    node[S], optionally w edge[P] (on that set) with P a prefix of S (scalar or per-head weights).
    Never materialises an E x S tensor."""
    if len(types) not in (1, 2):
        raise TypeRuleError("gspmm takes x and optional edge weights")
    x = types[0]
    if x.domain is not Domain.NODE or not x.is_float:
        raise TypeRuleError(f"gspmm reads float node values, got {x}", operand=0)
    _at_end(x, attrs, OTHER_END[attrs["by"]], "gspmm", 0)
    if len(types) == 2:
        _edge_weights(types[1], x, "gspmm", attrs)
    return x.on(_end_space(attrs, attrs["by"]))


def _match_gspmm_unfused(b, v):
    by = v.attr["by"]
    a, b_, *weighted = v.operands
    edges = v.attr["edges"]
    weight = b.eq(b.gather(a, "src", edges), b.gather(b_, "dst", edges))
    if weighted:
        weight = b.mul(weight, b.gather(weighted[0], OTHER_END[by], edges))
    return b.aggregate(weight, "sum", by)


@op("match_gspmm", None, {"by": EDGE_AXES, "layout": LAYOUTS, "edges": str}, traits=(Trait.GRAPH, Trait.FUSED),
    unfused=_match_gspmm_unfused, defaults=DEFAULT_EDGES)
def _match_gspmm(types, attrs, declared):
    """Fused sum over the edges whose endpoint values match, per feature element: with m_e = [a_j == b_i]
    for an edge e = j->i (a read at its source, b at its destination), by dst, out_i = sum over edges
    j->i of m_e * x_j; by src, out_j = sum over edges j->i of m_e * x_i; x = 1 when absent (the
    number of matching edges), the edges of the edge set ``edges``. Operands a, b and optionally x:
    float node[S]. The backward of a max /
    min aggregation of gathered node values runs as two of them (the tie counts by the reducing
    endpoint, then the cotangent routed back over the other CSR); no E x S mask is materialised."""
    if len(types) not in (2, 3):
        raise TypeRuleError("match_gspmm takes a, b and an optional x")
    for i, t in enumerate(types):
        if t.domain is not Domain.NODE or not t.is_float or t.shape != types[0].shape or t.dtype != types[0].dtype:
            raise TypeRuleError(f"match_gspmm reads float node values of one type, got {t} and {types[0]}",
                                operand=i)
    by = attrs["by"]
    _at_end(types[0], attrs, "src", "match_gspmm", 0)
    _at_end(types[1], attrs, "dst", "match_gspmm", 1)
    if len(types) == 3:
        _at_end(types[2], attrs, OTHER_END[by], "match_gspmm", 2)
    return types[0].on(_end_space(attrs, by))


def _attention_unfused(b, v):
    by = v.attr["by"]
    s, x = v.operands
    alpha = b.emit("softmax", [s], {"by": by, "edges": v.attr["edges"]})
    return b.aggregate(b.mul(alpha, b.gather(x, OTHER_END[by], v.attr["edges"])), "sum", by)


@op("attention", 2, {"by": EDGE_AXES, "layout": LAYOUTS, "edges": str},
    traits=(Trait.GRAPH, Trait.EDGE_ORDER, Trait.FUSED), unfused=_attention_unfused, defaults=DEFAULT_EDGES)
def _attention(types, attrs, declared):
    """Fused edge softmax and weighted aggregation: by dst, out_i = sum over edges j->i of
    softmax_i(s)_e * x_j, the softmax over each node's in-edges (of the edge set ``edges``) per score
    element (online softmax: no normalised E x S tensor). s edge[P] (on that set), x node[S], P a
    prefix of S. Its gradient is a destination pass (``attention_score_grad``) and a source pass
    (``attention_value_grad``) that read the per-node log-sum-exp of the scores (``segment_logsumexp``):
    no E x S tensor either."""
    s, x = types
    if x.domain is not Domain.NODE or not x.is_float:
        raise TypeRuleError(f"attention aggregates float node values, got {x}", operand=1)
    _scores(s, x, "attention", attrs)
    _at_end(x, attrs, OTHER_END[attrs["by"]], "attention", 1)
    return x.on(_end_space(attrs, attrs["by"]))


def _segment_logsumexp_unfused(b, v):
    by = v.attr["by"]
    (s,) = v.operands
    peak = b.aggregate(s, "max", by)  # 0 for a node without edges
    total = b.aggregate(b.unary("exp", b.sub(s, b.gather(peak, by, v.attr["edges"]))), "sum", by)
    return b.add(b.unary("log", b.add(total, b.eq(total, 0.0))), peak)


@op("segment_logsumexp", 1, {"by": EDGE_AXES, "edges": str}, traits=(Trait.GRAPH, Trait.EDGE_ORDER, Trait.FUSED),
    unfused=_segment_logsumexp_unfused, defaults=DEFAULT_EDGES)
def _segment_logsumexp(types, attrs, declared):
    """Per-node log-sum-exp of edge scores: by dst, lse_i = log sum over edges j->i of exp(s_e)
    (max-shifted), per score element; 0 for a node without edges; the edges of the edge set ``edges``,
    which s lives on. s edge[P] -> node[P]: the softmax
    statistics (max and sum) the attention backward passes read, so that softmax_i(s)_e =
    exp(s_e - lse_i) is recomputed per edge instead of stored."""
    (s,) = types
    if s.domain is not Domain.EDGE or not s.is_float:
        raise TypeRuleError(f"segment_logsumexp reduces float edge scores, got {s}", operand=0)
    _on_edge_set(s, attrs, "segment_logsumexp", 0)
    return s.on(_end_space(attrs, attrs["by"]))


def _attention_score_grad_unfused(b, v):
    by = v.attr["by"]
    s, lse, x, g, delta = v.operands
    edges = v.attr["edges"]
    alpha = b.unary("exp", b.sub(s, b.gather(lse, by, edges)))
    letters = "abcdefghijklmnopqrstuvwxyz"[:x.type.rank]
    dot = b.contract([b.gather(g, by, edges), b.gather(x, OTHER_END[by], edges)], [letters, letters],
                     letters[:s.type.rank], s.type)
    return b.mul(alpha, b.sub(dot, b.gather(delta, by, edges)))


@op("attention_score_grad", 5, {"by": EDGE_AXES, "edges": str}, traits=(Trait.GRAPH, Trait.EDGE_ORDER, Trait.FUSED),
    unfused=_attention_score_grad_unfused, defaults=DEFAULT_EDGES)
def _attention_score_grad(types, attrs, declared):
    """The destination pass of the attention backward (by dst: over each node's in-edges): the
    cotangent of the scores, d s_e = a_e * (<g_i, x_j> - delta_i) for the edge e = j->i, with
    a_e = exp(s_e - lse_i) recomputed per edge and <.,.> summing the feature axes after the score's.
    Operands: s edge[P], lse node[P] (``segment_logsumexp`` of s), x node[S] (the aggregated values),
    g node[S] (the cotangent of the attention), delta node[P] (<g_i, out_i> with out the attention's
    result). Reads no E x S tensor and writes one edge[P] value."""
    s, lse, x, g, delta = types
    if x.domain is not Domain.NODE or not x.is_float:
        raise TypeRuleError(f"attention_score_grad reads float node values, got {x}", operand=2)
    _scores(s, x, "attention_score_grad", attrs)
    _node_values(lse, s.shape, "attention_score_grad: the log-sum-exp", 1)
    _node_values(g, x.shape, "attention_score_grad: the cotangent", 3)
    _node_values(delta, s.shape, "attention_score_grad: delta", 4)
    by = attrs["by"]
    _at_end(x, attrs, OTHER_END[by], "attention_score_grad", 2)
    for operand, t in ((1, lse), (3, g), (4, delta)):
        _at_end(t, attrs, by, "attention_score_grad", operand)
    return s


def _attention_value_grad_unfused(b, v):
    by = v.attr["by"]
    s, lse, g = v.operands
    edges = v.attr["edges"]
    alpha = b.unary("exp", b.sub(s, b.gather(lse, OTHER_END[by], edges)))
    return b.aggregate(b.mul(alpha, b.gather(g, OTHER_END[by], edges)), "sum", by)


@op("attention_value_grad", 3, {"by": EDGE_AXES, "edges": str}, traits=(Trait.GRAPH, Trait.EDGE_ORDER, Trait.FUSED),
    unfused=_attention_value_grad_unfused, defaults=DEFAULT_EDGES)
def _attention_value_grad(types, attrs, declared):
    """The source pass of the attention backward, the transpose of attention by the other axis:
    by src, out_j = sum over edges e = j->i of exp(s_e - lse_i) * g_i (a softmax-weighted g-SpMM
    onto sources, the weights recomputed per edge from the scores and the destinations'
    log-sum-exp). Operands: s edge[P], lse node[P] (``segment_logsumexp`` of s by the other axis),
    g node[S] (the cotangent of the attention), P a prefix of S. No E x S tensor."""
    s, lse, g = types
    if g.domain is not Domain.NODE or not g.is_float:
        raise TypeRuleError(f"attention_value_grad reads float node values, got {g}", operand=2)
    _scores(s, g, "attention_value_grad", attrs)
    _node_values(lse, s.shape, "attention_value_grad: the log-sum-exp", 1)
    by = attrs["by"]
    _at_end(lse, attrs, OTHER_END[by], "attention_value_grad", 1)
    _at_end(g, attrs, OTHER_END[by], "attention_value_grad", 2)
    return g.on(_end_space(attrs, by))


# ---- global attention: every pair of nodes of each graph (graph transformers, GPS) ------------------


def global_attention_sizes(types: list[TensorType], what: str, static: bool = True) -> tuple[Dim, Dim, Dim]:
    """(H, K, D) of global attention operands q, k node[H, K] and v node[H, D] (the first three of
    ``types``), after checking them; with ``static``, K and D must be static (the kernels and the
    packed results are sized by them: a layer checked alone, with symbolic sizes, checks the rest)."""
    q, k, v = types[:3]
    for i, t in enumerate(types):
        if t.domain is Domain.NODE and t.rowset:
            raise TypeRuleError(f"{what} runs among the graph's own nodes, got {node_label(t.rowset)} values",
                                "global attention needs a batch vector, which node types do not have", i)
    for i, (t, name) in enumerate(zip((q, k, v), ("queries", "keys", "values"))):
        if t.domain is not Domain.NODE or not t.is_float or t.rank != 2:
            hint = ("project and split the heads, e.g. q = h @ Wq with Wq: param[D, H, K] (one head: "
                    "reshape(x, [1, K]))" if t.domain is Domain.NODE and t.is_float else
                    "attention among a graph's nodes reads float node values (reduce edge values to "
                    "nodes first: sum(...) by dst)")
            raise TypeRuleError(f"{what}: the {name} must be float per-head node values node[H, K], got {t}",
                                hint, i)
    if k.shape != q.shape:
        raise TypeRuleError(f"{what}: queries {shape_str(q.shape)} and keys {shape_str(k.shape)} differ in shape",
                            "q and k need the same heads and per-head size", 1)
    if v.shape[0] != q.shape[0]:
        raise TypeRuleError(f"{what}: the values have {v.shape[0]} heads, the queries {q.shape[0]}",
                            "q, k and v need the same number of heads", 2)
    if len({t.dtype for t in (q, k, v)}) != 1:
        raise TypeRuleError(f"{what} needs q, k and v of one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    for i, d in ((0, q.shape[1]), (2, v.shape[1])):
        if static and not d.is_static:
            raise TypeRuleError(f"{what} needs static per-head sizes, got {d}",
                                f"declare it with `dim {d} = ...` (the kernels are sized by it)", i)
    return q.shape[0], q.shape[1], v.shape[1]


def _packed(t: TensorType, heads: Dim, width: int) -> TensorType:
    return TensorType(Domain.NODE, (heads, Dim(width)), t.dtype)


@op("global_attention", 3, {"scale": float}, traits=(Trait.GRAPH, Trait.GRAPH_PAIRS))
def _global_attention(types, attrs, declared):
    """Multi-head scaled dot-product attention among the nodes of each graph of a batch (graph
    transformers, GPS): per head, with s_ij = scale * <q_i, k_j> for the nodes j of i's graph, i
    included (no mask), out_i = sum_j softmax_j(s_i)_j * v_j and lse_i = log sum_j exp(s_ij). The
    result packs both, per head: node[H, D + 1] = [out_i (D features), lse_i]. Operands q, k
    node[H, K], v node[H, D], K and D static. The kernels run a blocked online softmax (a running
    max and sum per query node) over blocks of one graph's nodes: a graph's n x n scores are never
    formed, and the log-sum-exp, the one statistic the backward reads
    (``global_attention_query_grad``, ``global_attention_key_grad``), comes with the forward. A
    primitive: no composition of edge ops expresses it; the fused backward ops are defined by it.
    The source form ``global_attention(q, k, v, scale=1/sqrt(K)) by graph`` is the out part."""
    heads, _, width = global_attention_sizes(types, "global_attention")
    return _packed(types[0], heads, width.value + 1)


def _global_attention_grad_operands(types: list[TensorType], what: str) -> tuple[Dim, int, int]:
    """(H, K, D) of a global attention backward op after checking its operands q, k, v, lse, g, delta."""
    heads, keys, width = global_attention_sizes(types, what)
    _, _, v, lse, g, delta = types
    _node_values(lse, (heads,), f"{what}: the log-sum-exp", 3)
    _node_values(g, v.shape, f"{what}: the cotangent", 4)
    _node_values(delta, (heads,), f"{what}: delta", 5)
    return heads, keys.value, width.value


def _weighted_sum_unfused(b, query, key, values, scale: float, lse):
    """sum_j exp(scale * <query_i, key_j> - lse_i) * values_j over the nodes j of i's graph (lse None:
    0), from one ``global_attention`` (its softmax-weighted sum times exp(its lse - lse))."""
    heads, width = values.type.shape
    packed = b.emit("global_attention", [query, key, values], {"scale": scale})
    mean = b.emit("slice", [packed], {"axis": 1, "start": 0, "stop": width.value})
    own = b.reshape(b.emit("slice", [packed], {"axis": 1, "start": width.value, "stop": width.value + 1}), (heads,))
    return b.mul(mean, b.unary("exp", own if lse is None else b.sub(own, lse)))


def _outer(b, a, c):
    """Per head, the outer product of node[H, A] and node[H, C] flattened to node[H, A * C]."""
    heads, first = a.type.shape
    product = b.emit("einsum", [a, c], {"spec": "ha,hc->hac"})
    return b.reshape(product, (heads, first * c.type.shape[1]))


def _split(b, x, sizes: list[int]) -> list:
    """The pieces of node[H, sum(sizes)] along its feature axis."""
    pieces, start = [], 0
    for size in sizes:
        pieces.append(b.emit("slice", [x], {"axis": 1, "start": start, "stop": start + size}))
        start += size
    return pieces


def _global_attention_query_grad_unfused(b, v):
    # dq_i = scale * (sum_d g_id sum_j p_ij v_jd k_j - delta_i sum_j p_ij k_j): one global attention of
    # the values [v_j (x) k_j, k_j], renormalised from its own log-sum-exp to the operand lse
    q, k, val, lse, g, delta = v.operands
    heads, keys = q.type.shape
    width = val.type.shape[1]
    scale = v.attr["scale"]
    sums = _weighted_sum_unfused(b, q, k, b.emit("concat", [_outer(b, val, k), k], {"axis": -1}), scale, lse)
    vk, ks = _split(b, sums, [width.value * keys.value, keys.value])
    vk = b.reshape(vk, (heads, width, keys))
    return b.mul(b.sub(b.emit("einsum", [g, vk], {"spec": "hd,hdk->hk"}), b.mul(delta, ks)), scale)


@op("global_attention_query_grad", 6, {"scale": float},
    traits=(Trait.GRAPH, Trait.GRAPH_PAIRS, Trait.FUSED), unfused=_global_attention_query_grad_unfused)
def _global_attention_query_grad(types, attrs, declared):
    """The query pass of the global attention backward (flash-attention style): per query node i and
    head, dq_i = scale * sum_j p_ij * (<g_i, v_j> - delta_i) * k_j over the nodes j of i's graph, with
    p_ij = exp(scale * <q_i, k_j> - lse_i) recomputed per block of key nodes. Operands q, k node[H, K],
    v node[H, D], lse node[H] (the forward's log-sum-exp), g node[H, D] (the cotangent of the
    attention), delta node[H] (<g_i, out_i> less the cotangent of lse_i). Its unfused definition is
    one ``global_attention`` of the values [v_j (x) k_j, k_j] (an H x (D K + K) value per node,
    never a pair of nodes)."""
    heads, keys, _ = _global_attention_grad_operands(types, "global_attention_query_grad")
    return _packed(types[0], heads, keys)


def _global_attention_key_grad_unfused(b, v):
    # With p_ij = exp(<[k_j, 1], [scale q_i, -lse_i]>): attention of the key nodes over the query
    # nodes, scale 1, of [g_i (x) q_i, delta_i q_i, g_i]: dk_j = scale (sum_d v_jd (.)_d - (.)), dv_j
    q, k, val, lse, g, delta = v.operands
    heads, keys = q.type.shape
    width = val.type.shape[1]
    scale = v.attr["scale"]
    column = (heads, Dim(1))
    ones = b.broadcast(b.c(1.0), TensorType(Domain.NODE, column, q.type.dtype))
    query = b.emit("concat", [k, ones], {"axis": -1})
    key = b.emit("concat", [b.mul(q, scale), b.neg(b.reshape(lse, column))], {"axis": -1})
    values = b.emit("concat", [_outer(b, g, q), b.mul(q, b.reshape(delta, column)), g], {"axis": -1})
    sums = _weighted_sum_unfused(b, query, key, values, 1.0, None)
    gq, dq, dv = _split(b, sums, [width.value * keys.value, keys.value, width.value])
    gq = b.reshape(gq, (heads, width, keys))
    dk = b.mul(b.sub(b.emit("einsum", [val, gq], {"spec": "hd,hdk->hk"}), dq), scale)
    return b.emit("concat", [dk, dv], {"axis": -1})


@op("global_attention_key_grad", 6, {"scale": float},
    traits=(Trait.GRAPH, Trait.GRAPH_PAIRS, Trait.FUSED), unfused=_global_attention_key_grad_unfused)
def _global_attention_key_grad(types, attrs, declared):
    """The key pass of the global attention backward (flash-attention style): per key node j and
    head, dk_j = scale * sum_i p_ij * (<g_i, v_j> - delta_i) * q_i and dv_j = sum_i p_ij * g_i over the
    nodes i of j's graph, p_ij = exp(scale * <q_i, k_j> - lse_i) recomputed per block of query nodes;
    the result packs both per head: node[H, K + D] = [dk_j, dv_j]. Operands as
    ``global_attention_query_grad``. Its unfused definition is one ``global_attention`` of the key
    nodes over the query nodes ([k_j, 1] against [scale q_i, -lse_i], scale 1) of the values
    [g_i (x) q_i, delta_i q_i, g_i]."""
    heads, keys, width = _global_attention_grad_operands(types, "global_attention_key_grad")
    return _packed(types[0], heads, keys + width)


def _typed_linear_unfused(b, v):
    h, w, t = v.operands
    return b.emit("matmul", [b.gather(h, v.attr["index"], v.attr["edges"]), b.emit("take", [w, t])])


@op("typed_linear", 3, {"index": EDGE_AXES, "edges": str}, traits=(Trait.GRAPH, Trait.FUSED),
    unfused=_typed_linear_unfused, defaults=DEFAULT_EDGES)
def _typed_linear(types, attrs, declared):
    """Relation-typed matmul with compact materialisation: out_e = h[index_e] @ W[t_e], computed once
    per distinct (node, type) pair and gathered to the edges (of the edge set ``edges``). h node[..., D],
    W param[R, D, ...], t edge int (on that set)."""
    h, w, t = types
    if h.domain is not Domain.NODE or w.domain is not Domain.PARAM or w.rank < 2:
        raise TypeRuleError(f"typed_linear takes node values and a param[R, D, ...], got {h} and {w}")
    if t.domain is not Domain.EDGE or t.dtype != INT_DTYPE or t.rank != 0:
        raise TypeRuleError(f"typed_linear indexes by an int edge value, got {t}", operand=2)
    _on_edge_set(t, attrs, "typed_linear", 2)
    _at_end(h, attrs, attrs["index"], "typed_linear", 0)
    if h.rank < 1 or h.shape[-1] != w.shape[1]:
        raise TypeRuleError(f"typed_linear shape mismatch: {shape_str(h.shape)} @ {shape_str(w.shape[1:])}")
    return TensorType(Domain.EDGE, h.shape[:-1] + w.shape[2:], h.dtype, attrs["edges"])


# ---- edge values carried onto a derived edge set ------------------------------------------------


def _carried(t: TensorType, what: str) -> None:
    if t.domain is not Domain.EDGE or not t.is_float:
        raise TypeRuleError(f"{what} carries float edge values, got {t}",
                            "carry(x, looped, fill) takes an edge value of the set `looped` is derived from", 0)


@op("carry", 1, {"edges": str, "fill": CARRY_FILLS, "value": float}, traits=(Trait.GRAPH,))
def _carry(types, attrs, declared):
    """Edge values carried onto the derived edge set ``edges`` (``self_loops`` or
    ``remaining_self_loops`` of the set x lives on), as PyTorch Geometric's add_self_loops /
    add_remaining_self_loops carry ``edge_attr`` with their ``fill_value``: an edge of the derived set
    that comes from an edge of the base set (its non-loop edges; with remaining_self_loops also a
    node's own loop, the last of them in edge order when there are several) takes that edge's row; a
    loop the set adds takes the fill, ``value`` (fill "constant") or the mean / sum of the rows of the
    node's non-loop in-edges in the base set (fill "mean" / "sum"; 0 for a node without one).
    x edge<base>[S] -> edge<edges>[S]; linear in x (affine with a constant fill)."""
    (t,) = types
    _carried(t, "carry")
    if not attrs["edges"]:
        raise TypeRuleError("carry moves edge values onto a derived edge set, not onto the graph's own edges")
    return t.with_(rowset=attrs["edges"])


@op("carry_grad", 1, {"edges": str, "base": str, "fill": CARRY_FILLS}, traits=(Trait.GRAPH,))
def _carry_grad(types, attrs, declared):
    """The transpose of ``carry`` (its backward): the cotangent g of a carry onto the derived set
    ``edges`` from the set ``base``, back on the base set: each base edge gets the row of the derived
    edge it became (0 for a loop that self_loops dropped, or an extra loop of remaining_self_loops),
    and with fill "mean" / "sum" each non-loop edge j -> i also gets the row of the loop the set added
    at i (divided by i's count of non-loop in-edges for "mean"). g edge<edges>[S] -> edge<base>[S]."""
    (t,) = types
    _carried(t, "carry_grad")
    if t.rowset != attrs["edges"] or not attrs["edges"]:
        raise TypeRuleError(f"carry_grad reads a cotangent on {edge_set_label(attrs['edges'])}, got {t}")
    return t.with_(rowset=attrs["base"])


# ---- ops used by gradient programs (mpdsl.autodiff); not spelled in the source language ------------


@op("contract_rows", None, {"spec": str}, traits=(Trait.ROW_SUM,))
def _contract_rows(types, attrs, declared):
    """Einstein summation like einsum (letters name feature axes) that also sums the implicit row
    axis shared by the non-param operands, e.g. "k,m->km" on two node values is the sum over nodes of
    their outer products: the result is a param value. At least one operand has rows."""
    sizes, out = _subscript_sizes(types, attrs["spec"], "contract_rows")
    if join_domains(types, "contract_rows") is Domain.PARAM:
        raise TypeRuleError("contract_rows sums over rows: at least one operand must be a node, edge or "
                            "graph value", "use einsum on param values")
    return TensorType(Domain.PARAM, tuple(sizes[c] for c in out), types[0].dtype)


@op("broadcast", 1, declared=True)
def _broadcast(types, attrs, declared):
    """Expand to the declared type: feature axes of size 1 (and missing trailing axes) are repeated,
    shapes aligned from the left; a param value may be repeated over the rows of a node, edge or
    graph domain."""
    (t,) = types
    declared = _require_declared(declared, "broadcast")
    _require_float(t, "broadcast")
    if t.space != declared.space and t.domain is not Domain.PARAM:
        raise TypeRuleError(f"cannot broadcast {t} to {declared}: different rows")
    if t.rank > declared.rank or broadcast_shapes([t.shape, declared.shape], "broadcast") != declared.shape:
        raise TypeRuleError(f"cannot broadcast {t} to {declared}")
    if t.dtype != declared.dtype:
        raise TypeRuleError(f"broadcast keeps the dtype: {t} to {declared}")
    return declared


def _static_axis(t: TensorType, axis: int, what: str) -> tuple[int, int]:
    if t.rank < 1:
        raise TypeRuleError(f"{what} needs a feature axis, got {t}")
    axis = _normalize_axis(axis, t.rank, what)
    size = t.shape[axis]
    if not size.is_static:
        raise TypeRuleError(f"{what} along an axis of symbolic size {size}", "bind the dims first")
    return axis, size.value


@op("slice", 1, {"axis": int, "start": int, "stop": int}, traits=(Trait.ROW_WISE,))
def _slice(types, attrs, declared):
    """Elements start..stop-1 of one feature axis (of static size)."""
    (t,) = types
    axis, size = _static_axis(t, attrs["axis"], "slice")
    start, stop = attrs["start"], attrs["stop"]
    if not 0 <= start <= stop <= size:
        raise TypeRuleError(f"slice {start}:{stop} is out of range for an axis of size {size}")
    return t.with_(shape=t.shape[:axis] + (Dim(stop - start),) + t.shape[axis + 1:])


@op("pad", 1, {"axis": int, "before": int, "after": int}, traits=(Trait.ROW_WISE,))
def _pad(types, attrs, declared):
    """Zero-pad one feature axis with ``before`` and ``after`` elements (the transpose of slice);
    the axis grows by their sum (a symbolic size too: F + 3)."""
    (t,) = types
    _require_float(t, "pad")
    if t.rank < 1:
        raise TypeRuleError(f"pad needs a feature axis, got {t}")
    axis = _normalize_axis(attrs["axis"], t.rank, "pad")
    if attrs["before"] < 0 or attrs["after"] < 0:
        raise TypeRuleError("pad widths are not negative")
    return t.with_(shape=t.shape[:axis] + (t.shape[axis] + attrs["before"] + attrs["after"],) + t.shape[axis + 1:])


# The ops whose math is declared here (``compute``): the backends run them through one generic rule.
COMPUTED_OPS = tuple(name for name, opdef in OPS.items() if opdef.compute is not None)
