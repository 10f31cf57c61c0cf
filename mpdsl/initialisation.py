"""Which initialiser, and which fans, each parameter of a program gets: decided once, from how the
program uses the parameter.

A parameter plays one role, found by one forward walk over the typed program with a rule per op
(``USE_RULES``; a missing op is ``MissingRule``):

* **weight**: an operand of a contraction (``x @ W``, ``W[etype]`` on the right of ``@``,
  ``einsum``, ``a @ V`` with a param on the left). Its fan-in is the product of the axes the
  contraction sums (``x @ W`` with W param[F, H, C]: F; ``h[src] @ W[etype]`` with W param[R, D, K]:
  D; ``einsum("hd,hde->he", k, W[etype])``: d), its fan-out the product of its other axes (without
  the axes that ``W[t]`` / ``W[etype]`` index).
* **bias**: a parameter added (``+`` / ``-``) to a value that is linear in a weight product (the
  product itself, or the product moved through gathers, sum/mean reductions, reshapes, scaling and
  other sums: ``h @ W + b``, GCN's ``sum(z[src] * norm[src]) by dst + z * norm + b``, GAT's
  ``reshape(sum(alpha * z[src]) by dst, ...) + b``). Its fan-in is that weight's (as
  ``torch.nn.Linear``'s bias), its fan-out its own size.
* **batch_norm statistic / scale / shift**: operands 1-4 of ``batch_norm``.
* **other**: every other parameter (attention vectors such as GAT's ``a_src``, GIN's ``eps``,
  scales applied with ``*``). Its fans are those of its own shape: fan-in its first axis, fan-out
  the product of the rest (after the axes that ``W[t]`` / ``W[etype]`` index).

The initialiser a parameter gets (``plan``): the one written on it in the file (``= glorot``,
``= zeros``, a number, ...), else the one its role gets under the model-wide default
(``DEFAULT_INITS``, ``mpdsl.compile(..., init=...)``):

=============== ============================== ===============================
role            ``init="torch"`` (default)     ``init="glorot"`` (PyG's GCNConv, GATConv)
=============== ============================== ===============================
weight          torch: U(+-1/sqrt(fan_in))     glorot: U(+-sqrt(6/(fan_in+fan_out)))
bias            torch: U(+-1/sqrt(fan_in))     zeros
running_mean    zeros                          zeros
running_var     ones                           ones
gamma / beta    ones / zeros                   ones / zeros
other           glorot with 2+ axes, else zeros (PyG's attention vectors; GIN's eps = 0)
=============== ============================== ===============================

``torch`` written on a parameter is the same rule: what torch (``torch.nn.Linear``,
``torch.nn.BatchNorm1d``) and PyG give a parameter of that role. The draws are a pure function of
(seed, parameter name, shapes): see ``mpdsl.runtime.initial_value``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mpdsl.diagnostics import MpdslError
from mpdsl.ir import Program, Value
from mpdsl.ops import (
    AGGREGATIONS,
    AXIS_REDUCTIONS,
    BATCH_NORM_INITIAL,
    DEFAULT_INITS,
    MissingRule,
    choose,
    parse_subscripts,
)
from mpdsl.types import Domain

# The init attribute of a param with no initialiser written in the file.
UNWRITTEN = "default"

ROLES = ("weight", "bias", "running_mean", "running_var", "gamma", "beta", "other")


@dataclass(frozen=True)
class Fan:
    """A fan size: the product of axes ``axes`` of parameter ``param`` (1 for no axes)."""

    param: str
    axes: tuple[int, ...]

    def size(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        shape = shapes[self.param]
        return math.prod(shape[a] for a in self.axes)


@dataclass(frozen=True)
class ParamInit:
    """How one parameter is initialised: ``init`` (a name of ``mpdsl.ops.INITIALIZERS``, "torch" only
    for a weight or a bias, or a number as text), its ``role`` (``ROLES``), its fans, and whether the initialiser
    was ``written`` in the file or chosen by the model-wide default."""

    init: str
    role: str
    fan_in: Fan
    fan_out: Fan
    written: bool

    def fans(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
        """(fan_in, fan_out) for the parameters' concrete ``shapes`` (name -> shape)."""
        return self.fan_in.size(shapes), self.fan_out.size(shapes)


@dataclass(frozen=True)
class _Weight:
    fan_in: Fan
    fan_out: Fan


# The weight fan a value is linear in, with the position (in the program) of the product that made
# it: where several products are summed, a bias belongs to the latest (``h + z @ O + b``: O's).
Carried = tuple[int, Fan]


class _Uses:
    """The facts the walk gathers: parameter views (a param, or W[t] / W[etype] of one: (name,
    indexed leading axes)), the weight fan each value is linear in, and each parameter's roles."""

    def __init__(self) -> None:
        self.views: dict[Value, tuple[str, int]] = {}
        self.carried: dict[Value, Carried | None] = {}
        self.weights: dict[str, _Weight] = {}
        self.biases: dict[str, Fan] = {}
        self.fills: dict[str, str] = {}
        self.indexed: dict[str, int] = {}
        self.position = 0  # of the value whose rule runs

    def view(self, v: Value) -> tuple[str, int] | None:
        return self.views.get(v)

    def fan(self, v: Value) -> Carried | None:
        return self.carried.get(v)

    def latest_fan(self, values) -> Carried | None:
        return max((f for f in map(self.fan, values) if f is not None), default=None, key=lambda f: f[0])

    def weight(self, v: Value, contracted: tuple[int, ...]) -> Carried | None:
        """Record ``v`` (if a parameter view) as a weight whose feature axes ``contracted`` are summed;
        the weight's fan-in."""
        view = self.view(v)
        if view is None:
            return None
        name, offset = view
        rest = tuple(a + offset for a in range(v.type.rank) if a not in contracted)
        fan_in = Fan(name, tuple(a + offset for a in contracted))
        self.weights.setdefault(name, _Weight(fan_in, Fan(name, rest)))
        return self.position, fan_in


UseRule = Callable[[Value, _Uses], "Carried | None"]


def _none(v: Value, uses: _Uses) -> Carried | None:
    return None


def _linear(v: Value, uses: _Uses) -> Carried | None:
    """Linear in its first operand (gather, reshape, scaling by a constant, ...)."""
    return uses.fan(v.operands[0])


def _any_linear(v: Value, uses: _Uses) -> Carried | None:
    """Linear in each operand that carries a weight fan (concat, mul: a product scaled by weights);
    the latest product's fan."""
    return uses.latest_fan(v.operands)


def _selection(v: Value, uses: _Uses) -> Carried | None:
    """where(cond, a, b) is a or b, row by row: linear where its selected operands are (the latest
    product's fan)."""
    return uses.latest_fan(v.operands[1:])


def _sum(v: Value, uses: _Uses) -> Carried | None:
    """add / sub: a parameter added to a value linear in a weight product is that weight's bias."""
    for i, operand in enumerate(v.operands):
        view = uses.view(operand)
        other = uses.fan(v.operands[1 - i])
        if view is not None and other is not None:
            uses.biases.setdefault(view[0], other[1])
    return uses.latest_fan(v.operands)


def _index(v: Value, uses: _Uses) -> Carried | None:
    """select / take: W[t] and W[etype] are views of W with one more indexed leading axis."""
    view = uses.view(v.operands[0])
    if view is not None:
        name, offset = view
        uses.views[v] = (name, offset + 1)
        uses.indexed[name] = max(uses.indexed.get(name, 0), offset + 1)
    return uses.fan(v.operands[0])


def _matmul(v: Value, uses: _Uses) -> Carried | None:
    a, b = v.operands
    right = uses.weight(b, (0,))
    left = uses.weight(a, (a.type.rank - 1,))
    # A matrix made of parameters (``a @ V``, its ``[etype]`` rows) passes its weight's fan on; one
    # computed from the data (an edge network's output) does not.
    made_of_params = b.type.domain is Domain.PARAM or (b.op in ("take", "select")
                                                       and b.operands[0].type.domain is Domain.PARAM)
    return right or left or (uses.fan(b) if made_of_params else None) or uses.fan(a)


def _einsum(v: Value, uses: _Uses) -> Carried | None:
    terms, out = parse_subscripts(v.attr["spec"])
    fans = [uses.weight(o, tuple(i for i, c in enumerate(term) if c not in out))
            for term, o in zip(terms, v.operands)]
    return next((f for f in fans if f is not None), None) or uses.latest_fan(v.operands)


def _typed_linear(v: Value, uses: _Uses) -> Carried | None:
    """h[index] @ W[t]: W param[R, D, ...] contracts its axis 1 (D)."""
    h, w, _ = v.operands
    view = uses.view(w)
    if view is None:
        return uses.fan(h)
    name, offset = view
    uses.indexed[name] = max(uses.indexed.get(name, 0), offset + 1)
    fan_in = Fan(name, (offset + 1,))
    uses.weights.setdefault(name, _Weight(fan_in, Fan(name, tuple(range(offset + 2, offset + w.type.rank)))))
    return uses.position, fan_in


def _reduction(linear: Mapping[str, bool]) -> UseRule:
    def rule(v: Value, uses: _Uses) -> Carried | None:
        keeps = choose(linear, v.op, "reduce", v.attr["reduce"], "the initialisation rules (mpdsl.initialisation)")
        return uses.fan(v.operands[0]) if keeps else None

    rule.__doc__ = "sum and mean are linear in their operand; the others are not."
    return rule


def _batch_norm(v: Value, uses: _Uses) -> Carried | None:
    """Operands 1-4 (running_mean, running_var, gamma, beta) start as torch.nn.BatchNorm1d's."""
    for operand, role in zip(v.operands[1:], BATCH_NORM_INITIAL):
        view = uses.view(operand)
        if view is not None:
            uses.fills.setdefault(view[0], role)
    return None


def _attention(v: Value, uses: _Uses) -> Carried | None:
    return uses.fan(v.operands[1])


def _global_attention(v: Value, uses: _Uses) -> Carried | None:
    """Linear in its values (the softmax-weighted sum; the log-sum-exp beside it carries no fan)."""
    return uses.fan(v.operands[2])


_LINEAR_AGGREGATIONS = {"sum": True, "mean": True, "max": False, "min": False, "std": False}
_LINEAR_AXIS_REDUCTIONS = {"sum": True, "mean": True, "max": False, "min": False}
assert set(_LINEAR_AGGREGATIONS) == set(AGGREGATIONS) and set(_LINEAR_AXIS_REDUCTIONS) == set(AXIS_REDUCTIONS)

# The rule of each op: records the roles its operands give parameters and returns the weight fan its
# result is linear in (None: none, or not linear).
USE_RULES: dict[str, UseRule] = {
    "input": _none, "param": _none, "const": _none, "degree": _none, "arange": _none, "linspace": _none,
    "neg": _linear, "dropout": _linear,
    **{name: _none for name in ("relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "abs", "gelu", "silu",
                                "softplus", "leaky_relu", "elu", "clamp", "sin", "cos", "tan", "asin", "acos",
                                "atan", "sinh", "cosh", "log1p", "expm1", "log2", "log10", "erf", "sign", "floor",
                                "ceil", "round", "trunc")},
    "add": _sum, "sub": _sum, "mul": _any_linear, "div": _linear,
    "pow": _none, "maximum": _none, "minimum": _none, "atan2": _none,
    **{name: _none for name in ("lt", "le", "gt", "ge", "eq", "ne", "logical_and", "logical_or", "logical_not")},
    "where": _selection,
    "matmul": _matmul, "einsum": _einsum, "typed_linear": _typed_linear,
    "reduce": _reduction(_LINEAR_AXIS_REDUCTIONS), "aggregate": _reduction(_LINEAR_AGGREGATIONS),
    "axis_softmax": _none, "softmax": _none, "one_hot": _none, "batch_norm": _batch_norm,
    "concat": _any_linear, "reshape": _linear, "gather": _linear, "broadcast": _linear, "slice": _linear,
    "pad": _linear, "select": _index, "take": _index,
    "gspmm": _linear, "attention": _attention, "global_attention": _global_attention, "carry": _linear,
    "contract_rows": _none,  # gradient programs only: its param-domain result is not initialised
    # gradient programs only (the fused backward of attention and of max / min aggregations)
    "segment_logsumexp": _none, "attention_score_grad": _none, "attention_value_grad": _none, "match_gspmm": _none,
    "global_attention_query_grad": _none, "global_attention_key_grad": _none, "carry_grad": _none,
}


def _walk(program: Program) -> _Uses:
    uses = _Uses()
    for uses.position, v in enumerate(program.values):
        if v.op == "param":
            uses.views[v] = (v.attr["name"], 0)
        rule = USE_RULES.get(v.op)
        if rule is None:
            raise MissingRule(f"the initialisation rules (mpdsl.initialisation) have no rule for op {v.op}")
        uses.carried[v] = rule(v, uses)
    return uses


def check_default(init: str) -> str:
    """``init`` after checking it is a model-wide default (``DEFAULT_INITS``)."""
    if init not in DEFAULT_INITS:
        close = difflib.get_close_matches(str(init), DEFAULT_INITS, n=1)
        raise MpdslError(f"unknown model-wide initialiser {init!r}",
                         (f"did you mean '{close[0]}'? " if close else "") + f"use one of {', '.join(DEFAULT_INITS)}"
                         " (init=, --init); a parameter's own `= name` in the .mp file takes any initialiser")
    return init


def _role_init(role: str, rank: int, scheme: str) -> str:
    """The initialiser of ``role`` under ``scheme`` ("torch" or "glorot"); ``rank``: of one slice."""
    if role == "weight":
        return scheme
    if role == "bias":
        return "torch" if scheme == "torch" else "zeros"
    if role == "other":
        return "glorot" if rank >= 2 else "zeros"
    return choose(BATCH_NORM_INITIAL, "batch_norm", "operand", role, "the initialisation rules (mpdsl.initialisation)")


def plan(program: Program, default: str = "torch") -> dict[str, ParamInit]:
    """Each parameter's initialisation (by name): its role, fans and initialiser, the written one
    or the one ``default`` (``DEFAULT_INITS``) gives its role (see the module docstring)."""
    check_default(default)
    uses = _walk(program)
    plans = {}
    for v in program.params:
        name, rank = v.attr["name"], v.type.rank
        offset = min(uses.indexed.get(name, 0), rank)
        own_in = Fan(name, tuple(range(offset, min(offset + 1, rank))))
        own_out = Fan(name, tuple(range(offset + 1, rank)))
        if name in uses.weights:
            role, fan_in, fan_out = "weight", uses.weights[name].fan_in, uses.weights[name].fan_out
        elif name in uses.biases:
            role, fan_in, fan_out = "bias", uses.biases[name], Fan(name, tuple(range(offset, rank)))
        elif name in uses.fills:
            role, fan_in, fan_out = uses.fills[name], own_in, own_out
        else:
            role, fan_in, fan_out = "other", own_in, own_out
        written = v.attr["init"] != UNWRITTEN
        init = v.attr["init"] if written else default
        if init == "torch":
            init = _role_init(role, rank - offset, "torch")
        elif not written:
            init = _role_init(role, rank - offset, default)
        plans[name] = ParamInit(init, role, fan_in, fan_out, written)
    return plans


__all__ = ["ROLES", "UNWRITTEN", "USE_RULES", "Fan", "ParamInit", "check_default", "plan"]
