"""The mpdsl IR: a typed SSA dataflow program.

One uniform, immutable node type, ``Value``: the result of one op, with its operands, static
attributes, type (domain, feature shape, dtype) and the source span it came from. A
``Program`` is a topologically ordered tuple of values plus named outputs and the dims it is
symbolic in. ``print_program`` gives the text form (golden format of the tests), ``parse_program``
reads it back, ``verify`` checks every invariant.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import lark

from mpdsl.diagnostics import Source, Span
from mpdsl.ops import (
    CARRIED_EDGE_SETS,
    DERIVED_EDGE_SETS,
    EDGE_SET_KINDS,
    HOP_EDGE_SETS,
    OPS,
    Effect,
    Trait,
    edge_set_label,
)
from mpdsl.types import FLOAT_DTYPES, INT_DTYPE, Dim, Domain, Space, TensorType, TypeRuleError, edge_set_ends


@dataclass(frozen=True, eq=False)
class Value:
    """The result of one op. Compared by identity (SSA)."""

    op: str
    operands: tuple[Value, ...]
    attrs: tuple[tuple[str, Any], ...]
    type: TensorType
    span: Span | None = field(default=None, repr=False)

    @property
    def attr(self) -> dict[str, Any]:
        return dict(self.attrs)

    @property
    def name(self) -> str | None:
        """The declared name of an input or param (None for other ops)."""
        return self.attr.get("name") if self.op in ("input", "param") else None

    def __repr__(self) -> str:
        return f"Value({self.op}, {self.type})"


def make_value(op: str, operands: Iterable[Value], attrs: Mapping[str, Any], type: TensorType,
               span: Span | None = None) -> Value:
    """A new value; attributes the op defaults (``OpDef.defaults``) may be left out."""
    opdef = OPS.get(op)
    full = opdef.complete(attrs) if opdef is not None else attrs
    return Value(op, tuple(operands), tuple(sorted(full.items())), type, span)


@dataclass(frozen=True)
class EdgeSetDef:
    """An edge set of a program besides the graph's own edges: ``kind`` "input" (read from the graph,
    which carries it by ``name``) or a derivation (``mpdsl.ops.DERIVED_EDGE_SETS``) of the set ``base``
    ("": the graph's own edges); ``hops`` the hop count of a ``k_hop`` set (0 for the other kinds).
    Values on it have types ``edge<name>[...]``."""

    name: str
    kind: str
    base: str = ""
    span: Span | None = field(default=None, compare=False, repr=False)
    hops: int = 0

    def __str__(self) -> str:
        if self.kind == "input":
            return self.name
        count = f", {self.hops}" if self.kind in HOP_EDGE_SETS else ""
        return f"{self.name}={self.kind}({edge_set_label(self.base)}{count})"


@dataclass(frozen=True)
class Program:
    name: str
    dims: tuple[tuple[str, int | None], ...]  # symbol -> bound value, None = bound from inputs at run time
    values: tuple[Value, ...]
    outputs: tuple[tuple[str, Value], ...]
    edge_sets: tuple[EdgeSetDef, ...] = ()  # the program's edge sets besides the graph's own, bases first

    def edge_set(self, name: str) -> EdgeSetDef | None:
        """The definition of edge set ``name`` (None for "", the graph's own edges)."""
        return next((s for s in self.edge_sets if s.name == name), None) if name else None

    @functools.cached_property  # a program is immutable; its runs ask for this on every call
    def node_types(self) -> tuple[str, ...]:
        """The node types the program's values and edge sets live on (besides the graph's own nodes), sorted."""
        found = {v.type.rowset for v in self.values if v.type.domain is Domain.NODE and v.type.rowset}
        found |= {end for s in self.edge_sets for end in edge_set_ends(s.name) if end}
        return tuple(sorted(found))

    @functools.cached_property
    def row_spaces(self) -> tuple[Space, ...]:
        """The row spaces (nodes, node types, edge sets, graphs) the program's values live on, in order
        of first use."""
        return tuple(dict.fromkeys(v.type.space for v in self.values if v.type.domain is not Domain.PARAM))

    def rebuilt(self, values: tuple[Value, ...], outputs: tuple[tuple[str, Value], ...], name: str | None = None,
                dims: tuple[tuple[str, int | None], ...] | None = None) -> Program:
        """A program of new values and outputs with this one's name, dims and edge sets (unless given)."""
        return Program(self.name if name is None else name, self.dims if dims is None else dims, values, outputs,
                       self.edge_sets)

    @property
    def inputs(self) -> tuple[Value, ...]:
        return tuple(v for v in self.values if v.op == "input")

    @property
    def params(self) -> tuple[Value, ...]:
        return tuple(v for v in self.values if v.op == "param")

    @property
    def float_dtype(self) -> str:
        """The float dtype of the program's values (one per program)."""
        return next((v.type.dtype for v in self.values if v.type.is_float), "f32")

    def __str__(self) -> str:
        return print_program(self)


# ---- printing ----------------------------------------------------------------------------


def _format_literal(value: Any) -> str:
    if isinstance(value, bool):
        raise TypeError("bool attributes are not part of the IR")
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    raise TypeError(f"unsupported attribute value {value!r}")


def prune(program: Program) -> Program:
    """Drop values no output depends on. Inputs and params stay (they are the interface), and so do
    stateful values (``Effect.STATEFUL``, e.g. a batch_norm updating its running statistics) with
    what they read."""
    live: set[int] = set()
    stack = [v for _, v in program.outputs]
    stack += [v for v in program.values if OPS[v.op].effect_of(v.attr) is Effect.STATEFUL]
    while stack:
        v = stack.pop()
        if id(v) not in live:
            live.add(id(v))
            stack.extend(v.operands)
    values = tuple(v for v in program.values if id(v) in live or OPS[v.op].has(Trait.INTERFACE))
    return program.rebuilt(values, program.outputs)


def value_names(program: Program) -> dict[Value, str]:
    """Printed names: inputs and params keep their declared names, other values are numbered."""
    names: dict[Value, str] = {}
    counter = 0
    for v in program.values:
        if v.name is not None:
            names[v] = f"%{v.name}"
        else:
            names[v] = f"%{counter}"
            counter += 1
    return names


def print_program(program: Program, locations: bool = False) -> str:
    names = value_names(program)
    dims = ", ".join(k if v is None else f"{k}={v}" for k, v in program.dims)
    edge_sets = f" edges({', '.join(map(str, program.edge_sets))})" if program.edge_sets else ""
    lines = [f"program @{program.name} dims({dims}){edge_sets} {{"]
    for v in program.values:
        text = f"  {names[v]} = {v.op}"
        if v.operands:
            text += " " + ", ".join(names[o] for o in v.operands)
        defaults = OPS[v.op].defaults if v.op in OPS else {}
        attrs = [(k, x) for k, x in v.attrs if not (v.op in ("input", "param") and k == "name")
                 and not (k in defaults and defaults[k] == x)]
        if attrs:
            text += " {" + ", ".join(f"{k}={_format_literal(x)}" for k, x in attrs) + "}"
        text += f" : {v.type}"
        if locations and v.span is not None:
            s = v.span
            text += f' loc("{s.source.name}":{s.line}:{s.col}-{s.end_line}:{s.end_col})'
        lines.append(text)
    lines.append("  return " + ", ".join(f"{names[v]} as {name}" for name, v in program.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---- parsing -----------------------------------------------------------------------------


class IRParseError(Exception):
    """IR text that is not well formed (a compiler-developer error, not a user error)."""


@functools.lru_cache(maxsize=1)
def _ir_parser() -> lark.Lark:
    grammar = resources.files("mpdsl.grammar").joinpath("ir.lark").read_text()
    return lark.Lark(grammar, parser="lalr")


def parse_program(text: str) -> Program:
    """Read the text form of ``print_program`` back into a Program (then ``verify`` it)."""
    try:
        tree = _ir_parser().parse(text)
    except lark.LarkError as err:
        raise IRParseError(str(err)) from None
    name_tok, *rest = tree.children
    dims: list[tuple[str, int | None]] = []
    edge_sets: list[EdgeSetDef] = []
    env: dict[str, Value] = {}
    values: list[Value] = []
    sources: dict[str, Source] = {}
    outputs: list[tuple[str, Value]] = []
    for child in rest:
        if child is None:
            continue
        node = _tree(child)
        if node.data == "dim_binding":
            key, bound = node.children
            dims.append((str(key), int(str(bound)) if bound is not None else None))
        elif node.data == "edge_sets":
            for item in node.children:
                set_name, kind, base, hops = _tree(item).children
                if kind is None:
                    edge_sets.append(EdgeSetDef(str(set_name), "input"))
                else:
                    edge_sets.append(EdgeSetDef(str(set_name), str(kind), "" if str(base) == "edge" else str(base),
                                                hops=0 if hops is None else int(str(hops))))
        elif node.data == "value":
            vname, opname, operands, attrs, typ, loc = node.children
            if str(vname) in env:
                raise IRParseError(f"{vname} is defined twice")
            ops = []
            operand_list = _optional_tree(operands)
            for o in (operand_list.children if operand_list is not None else []):
                if str(o) not in env:
                    raise IRParseError(f"{o} is used before it is defined")
                ops.append(env[str(o)])
            attr_map = {}
            attr_list = _optional_tree(attrs)
            for a in (attr_list.children if attr_list is not None else []):
                if a is None:
                    continue
                key, lit = _tree(a).children
                attr_map[str(key)] = _literal(_tree(lit))
            if str(opname) in ("input", "param"):
                attr_map["name"] = str(vname)[1:]
            span = None
            loc_tree = _optional_tree(loc)
            if loc_tree is not None:
                fname, l1, c1, l2, c2 = (str(t) for t in loc_tree.children)
                src = sources.setdefault(fname[1:-1], Source(fname[1:-1], ""))
                span = Span(src, int(l1), int(c1), int(l2), int(c2))
            value = make_value(str(opname), ops, attr_map, _type(_tree(typ)), span)
            env[str(vname)] = value
            values.append(value)
        elif node.data == "ret":
            for item in node.children:
                vname, out = _tree(item).children
                if str(vname) not in env:
                    raise IRParseError(f"return of undefined {vname}")
                outputs.append((str(out), env[str(vname)]))
    return Program(str(name_tok), tuple(dims), tuple(values), tuple(outputs), tuple(edge_sets))


def _tree(node: lark.Tree[lark.Token] | lark.Token) -> lark.Tree[lark.Token]:
    """A child the IR grammar makes a rule, so lark gives a Tree and never a bare Token."""
    assert isinstance(node, lark.Tree), node
    return node


def _optional_tree(node: lark.Tree[lark.Token] | lark.Token | None) -> lark.Tree[lark.Token] | None:
    """An optional rule (``[operands]``, ``[attrs]``, ``[loc]``): None where it is absent."""
    return None if node is None else _tree(node)


def _literal(tree: lark.Tree) -> Any:
    tok = str(tree.children[0])
    if tree.data == "string":
        return tok[1:-1]
    if tree.data == "int_":
        return int(tok)
    return float(tok)


def _type(tree: lark.Tree) -> TensorType:
    domain, rowset, *dims, dtype = tree.children
    shape = tuple(Dim.parse(" + ".join(str(t) for t in _tree(d).children)) for d in dims if d is not None)
    if str(dtype) not in FLOAT_DTYPES + (INT_DTYPE,):
        raise IRParseError(f"unknown dtype {str(dtype)!r} (one of {', '.join(FLOAT_DTYPES + (INT_DTYPE,))})")
    try:
        kind = Domain(str(domain))
    except ValueError:
        raise IRParseError(f"unknown domain {str(domain)!r}") from None
    return TensorType(kind, shape, str(dtype), "" if rowset is None else str(_tree(rowset).children[0]))


# ---- verification ------------------------------------------------------------------------


class VerificationError(Exception):
    """An IR invariant does not hold: a compiler bug, reported with the offending op."""


def verify(program: Program) -> Program:
    """Check SSA order, op names, attributes, types (re-inferred by each op's rule), unique
    input/param names, dims and outputs. Returns the program for chaining."""
    seen: set[int] = set()
    names: dict[tuple[str, str], Value] = {}
    known_dims = {k for k, _ in program.dims}
    edge_sets = _verify_edge_sets(program)
    for index, v in enumerate(program.values):
        where = f"value #{index} ({v.op})"
        if id(v) in seen:
            raise VerificationError(f"{where} appears twice")
        opdef = OPS.get(v.op)
        if opdef is None:
            raise VerificationError(f"{where}: unknown op {v.op!r}")
        for o in v.operands:
            if id(o) not in seen:
                raise VerificationError(f"{where}: operand {o!r} is not defined before use")
        try:
            inferred = opdef.infer([o.type for o in v.operands], v.attr, v.type if opdef.declared else None)
        except TypeRuleError as err:
            raise VerificationError(f"{where}: {err.message}") from None
        if inferred != v.type:
            raise VerificationError(f"{where}: stored type {v.type} but the op's rule gives {inferred}")
        _verify_value_edge_sets(v, where, edge_sets)
        for d in v.type.shape:
            missing = set(d.symbols) - known_dims
            if missing:
                raise VerificationError(f"{where}: dimension(s) {sorted(missing)} are not declared by the program")
        if v.name is not None:
            key = (v.op, v.name)
            if key in names:
                raise VerificationError(f"{where}: {v.op} {v.name!r} is declared twice")
            names[key] = v
        seen.add(id(v))
    if not program.outputs:
        raise VerificationError("the program has no outputs")
    for out_name, v in program.outputs:
        if id(v) not in seen:
            raise VerificationError(f"output {out_name!r} is not a value of the program")
    return program


def _verify_edge_sets(program: Program) -> dict[str, EdgeSetDef]:
    """The program's edge sets by name, after checking each: a unique name, a known kind, and a base
    ("" or a set defined before it) for a derived one."""
    known: dict[str, EdgeSetDef] = {}
    for s in program.edge_sets:
        if not s.name or s.name == "edge" or s.name in known:
            what = "defined twice" if s.name in known else "not a set name"
            raise VerificationError(f"edge set {s.name!r} is {what}")
        if s.kind not in EDGE_SET_KINDS:
            raise VerificationError(f"edge set {s.name!r} has unknown kind {s.kind!r} (one of {EDGE_SET_KINDS})")
        if s.kind == "input" and s.base:
            raise VerificationError(f"input edge set {s.name!r} has a base ({s.base!r})")
        if (s.kind in HOP_EDGE_SETS) != (s.hops != 0) or s.hops < 0:
            raise VerificationError(f"edge set {s.name!r} of kind {s.kind!r} has hop count {s.hops} "
                                    f"(a set of {' or '.join(HOP_EDGE_SETS)} takes one >= 1, the other kinds none)")
        if s.kind in DERIVED_EDGE_SETS and s.base and s.base not in known:
            raise VerificationError(f"edge set {s.name!r} is derived from {s.base!r}, which is not defined before it")
        known[s.name] = s
    return known


def _verify_value_edge_sets(v: Value, where: str, edge_sets: Mapping[str, EdgeSetDef]) -> None:
    """The edge sets ``v`` names (its type's, its ``edges`` attribute's) are the program's; a carry
    moves values from the base of a derived set onto it."""
    if v.type.rowset and v.type.domain is Domain.NODE:
        if not v.type.rowset.isidentifier():
            raise VerificationError(f"{where}: its type {v.type} names a node type that is not an identifier")
    elif v.type.rowset and (v.type.domain is not Domain.EDGE or v.type.rowset not in edge_sets):
        raise VerificationError(f"{where}: its type {v.type} names an edge set the program does not define")
    named = v.attr.get("edges", "")
    if named and named not in edge_sets:
        raise VerificationError(f"{where}: edge set {named!r} is not defined by the program")
    if v.op in ("carry", "carry_grad"):
        target = edge_sets.get(named)
        base = v.operands[0].type.rowset if v.op == "carry" else v.attr["base"]
        if target is None or target.kind not in DERIVED_EDGE_SETS or target.base != base:
            raise VerificationError(f"{where}: {edge_set_label(named)} is not derived from {edge_set_label(base)}")
        if target.kind not in CARRIED_EDGE_SETS:
            raise VerificationError(f"{where}: nothing carries onto {named} ({target.kind}: its edges come from "
                                    "no single base edge)")
