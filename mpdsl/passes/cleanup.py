"""Clean-up passes: dead-code elimination, common-subexpression elimination, constant folding."""

from __future__ import annotations

import math

import numpy as np

from mpdsl.ir import Program, Value
from mpdsl.ops import BINARY_OPS, UNARY_OPS, UNARY_OPS_WITH_ATTR
from mpdsl.passes import Pass, PassContext, register
from mpdsl.passes.rewrite import Rewriter, prune, rewrite

IMPURE_OPS = {"dropout"}  # random in training: two calls are two draws


@register
class DeadCodeElimination(Pass):
    """Remove values no output depends on; inputs and params stay (they are the model's interface)."""

    name = "dce"

    def run(self, program: Program, ctx: PassContext) -> Program:
        pruned = prune(program)
        removed = len(program.values) - len(pruned.values)
        if removed:
            ctx.note(self.name, f"removed {removed} dead value(s)")
        return pruned


@register
class CommonSubexpressionElimination(Pass):
    """Replace a pure value by an earlier one with the same op, operands, attributes and type."""

    name = "cse"

    def run(self, program: Program, ctx: PassContext) -> Program:
        seen: dict[tuple, Value] = {}

        def rule(v: Value, rw: Rewriter) -> Value | None:
            if v.op in IMPURE_OPS or v.op in ("input", "param"):
                return None
            key = (v.op, tuple(id(o) for o in v.operands), v.attrs, v.type)
            earlier = seen.get(key)
            if earlier is not None:
                return earlier
            seen[key] = v
            return None

        result, changed = rewrite(program, rule)
        removed = len(program.values) - len(result.values)
        if removed:
            ctx.note(self.name, f"merged {removed} duplicate value(s)")
        return result


_NUMPY_UNARY = {
    "neg": np.negative, "relu": lambda x: max(x, 0.0), "sigmoid": lambda x: 1 / (1 + math.exp(-x)),
    "tanh": math.tanh, "exp": math.exp, "log": math.log, "sqrt": math.sqrt, "rsqrt": lambda x: 1 / math.sqrt(x),
    "abs": abs, "silu": lambda x: x / (1 + math.exp(-x)), "softplus": lambda x: math.log1p(math.exp(x)),
    "gelu": lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2))),
}
_NUMPY_BINARY = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
                 "div": lambda a, b: a / b, "pow": lambda a, b: a ** b, "maximum": max, "minimum": min}
# (op, constant operand position, constant value): x op c == x
_IDENTITIES = {("add", 1, 0.0), ("add", 0, 0.0), ("sub", 1, 0.0), ("mul", 1, 1.0), ("mul", 0, 1.0),
               ("div", 1, 1.0), ("pow", 1, 1.0)}


def _const_value(v: Value) -> float | None:
    return v.attr["value"] if v.op == "const" else None


@register
class ConstantFolding(Pass):
    """Evaluate elementwise ops on scalar constants at compile time, and drop identities
    (x + 0, x * 1, x / 1, x ** 1) when they do not change the type."""

    name = "constant_folding"

    def run(self, program: Program, ctx: PassContext) -> Program:
        folded = 0

        def rule(v: Value, rw: Rewriter) -> Value | None:
            nonlocal folded
            consts = [_const_value(o) for o in v.operands]
            if v.operands and all(c is not None for c in consts):
                try:
                    with np.errstate(all="ignore"):
                        if v.op in _NUMPY_UNARY:
                            value = float(_NUMPY_UNARY[v.op](consts[0]))
                        elif v.op in UNARY_OPS_WITH_ATTR and v.op != "dropout":
                            x, a = consts[0], next(iter(v.attr.values()))
                            value = x if x > 0 else (a * x if v.op == "leaky_relu" else a * math.expm1(x))
                        elif v.op in _NUMPY_BINARY:
                            value = float(_NUMPY_BINARY[v.op](*consts))
                        else:
                            return None
                except (ValueError, OverflowError, ZeroDivisionError):
                    return None
                folded += 1
                return rw.const(value, v.type.dtype, like=v)
            if v.op in BINARY_OPS:
                for pos, c in enumerate(consts):
                    other = v.operands[1 - pos]
                    if c is not None and (v.op, pos, c) in _IDENTITIES and other.type == v.type:
                        folded += 1
                        return other
            return None

        assert set(_NUMPY_UNARY) == set(UNARY_OPS) and set(_NUMPY_BINARY) == set(BINARY_OPS)
        result, _ = rewrite(program, rule)
        if folded:
            ctx.note(self.name, f"folded {folded} constant expression(s)")
        return result
