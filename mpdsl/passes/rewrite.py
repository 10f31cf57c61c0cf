"""Rebuilding programs: a rewriter walks values in order with operands already rewritten and lets
rules replace a value by new ones (emitted through it, typed by the ops' rules)."""

from __future__ import annotations

from collections.abc import Callable

from mpdsl.ir import Program, Value, make_value, prune
from mpdsl.ops import OPS
from mpdsl.types import Domain, TensorType

Rule = Callable[[Value, "Rewriter"], "Value | None"]


class Rewriter:
    def __init__(self) -> None:
        self.values: list[Value] = []
        self.changed = False

    def emit(self, op: str, operands, attrs: dict | None = None, like: Value | None = None,
             declared: TensorType | None = None) -> Value:
        """Append a new value; its type comes from the op's rule (``declared`` for declared-type ops)."""
        attrs = dict(attrs or {})
        t = OPS[op].infer([o.type for o in operands], attrs, declared)
        value = make_value(op, operands, attrs, t, like.span if like is not None else None)
        self.values.append(value)
        return value

    def const(self, value: float, dtype: str, like: Value | None = None) -> Value:
        return self.emit("const", [], {"value": float(value)}, like, TensorType(Domain.PARAM, (), dtype))


def rewrite(program: Program, rules: dict[str, list[Rule]] | Callable[[Value, Rewriter], Value | None]
            ) -> tuple[Program, bool]:
    """Apply rules once over the program in order (a rule returning None keeps the value).
    ``rules`` is a table op name -> rules (tried in order), or one function for every value."""
    rw = Rewriter()
    mapping: dict[int, Value] = {}
    for v in program.values:
        operands = tuple(mapping[id(o)] for o in v.operands)
        current = v if all(a is b for a, b in zip(operands, v.operands)) else \
            Value(v.op, operands, v.attrs, v.type, v.span)
        replacement = None
        candidates = rules.get(v.op, []) if isinstance(rules, dict) else [rules]
        for rule in candidates:
            replacement = rule(current, rw)
            if replacement is not None:
                break
        if replacement is None or replacement is current:
            rw.values.append(current)
            mapping[id(v)] = current
        else:
            if replacement.type != v.type:
                raise AssertionError(f"rewrite of {v.op} changed its type {v.type} -> {replacement.type}")
            rw.changed = True
            mapping[id(v)] = replacement
    outputs = tuple((name, mapping[id(v)]) for name, v in program.outputs)
    return prune(program.rebuilt(tuple(rw.values), outputs)), rw.changed


def rewrite_to_fixpoint(program: Program, rules, limit: int = 50) -> tuple[Program, int]:
    """Repeat ``rewrite`` until nothing changes; returns the program and the number of rounds that changed it."""
    rounds = 0
    for _ in range(limit):
        program, changed = rewrite(program, rules)
        if not changed:
            break
        rounds += 1
    return program, rounds




def specialize(program: Program, dims: dict[str, int]) -> Program:
    """The program with the given dims substituted into every type (they become static)."""
    mapping: dict[int, Value] = {}
    values = []
    for v in program.values:
        operands = tuple(mapping[id(o)] for o in v.operands)
        nv = Value(v.op, operands, v.attrs, v.type.substitute(dims), v.span)
        mapping[id(v)] = nv
        values.append(nv)
    bound = tuple((k, dims.get(k, v)) for k, v in program.dims)
    return program.rebuilt(tuple(values), tuple((n, mapping[id(v)]) for n, v in program.outputs), dims=bound)
