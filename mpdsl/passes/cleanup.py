"""Clean-up passes: dead-code elimination, common-subexpression elimination, constant folding,
canonicalization, reuse of computed products."""

from __future__ import annotations

import math

import numpy as np

from mpdsl.ir import Program, Value
from mpdsl.ops import NUMPY_MATH, OPS, Trait, is_pure, parse_subscripts
from mpdsl.passes import Pass, PassContext, register
from mpdsl.passes.rewrite import Rewriter, prune, rewrite
from mpdsl.types import Domain


@register
class DeadCodeElimination(Pass):
    """Remove values no output depends on; inputs and params stay (they are the model's interface),
    and so do stateful values (``Effect.STATEFUL``: a batch_norm in training updates its running
    statistics even when its result is unused)."""

    name = "dce"

    def run(self, program: Program, ctx: PassContext) -> Program:
        pruned = prune(program)
        removed = len(program.values) - len(pruned.values)
        if removed:
            ctx.note(self.name, f"removed {removed} dead value(s)")
        return pruned


@register
class CommonSubexpressionElimination(Pass):
    """Replace a pure value (``Effect.PURE``) by an earlier one with the same op, operands, attributes
    and type; random and stateful values, and the model's interface, are never merged."""

    name = "cse"

    def run(self, program: Program, ctx: PassContext) -> Program:
        seen: dict[tuple, Value] = {}

        def rule(v: Value, rw: Rewriter) -> Value | None:
            if not is_pure(v) or OPS[v.op].has(Trait.INTERFACE):
                return None
            key = (v.op, tuple(id(o) for o in v.operands), v.attrs, v.type)
            earlier = seen.get(key)
            if earlier is not None:
                return earlier
            seen[key] = v
            return None

        result, _ = rewrite(program, rule)
        removed = len(program.values) - len(result.values)
        if removed:
            ctx.note(self.name, f"merged {removed} duplicate value(s)")
        return result


def _const_value(v: Value) -> float | None:
    """The value of a scalar constant, or of one broadcast to a param shape (``full([H], c)``)."""
    if v.op == "const":
        return v.attr["value"]
    if v.op == "broadcast" and v.type.domain is Domain.PARAM and v.operands[0].op == "const":
        return v.operands[0].attr["value"]
    return None


@register
class ConstantFolding(Pass):
    """Evaluate pure elementwise ops on scalar constants (and on constants broadcast to a param
    shape, ``full``) at compile time with the op's own ``compute`` rule (in float64, NumPy: the
    reference semantics), keeping non-finite results for run time, and drop the identities each op
    declares (x + 0, x * 1, x / 1, x ** 1) when they do not change the type."""

    name = "constant_folding"

    def run(self, program: Program, ctx: PassContext) -> Program:
        folded = 0

        def rule(v: Value, rw: Rewriter) -> Value | None:
            nonlocal folded
            opdef = OPS[v.op]
            consts = [_const_value(o) for o in v.operands]
            if v.operands and all(c is not None for c in consts):
                if opdef.compute is None or not is_pure(v):
                    return None
                with np.errstate(all="ignore"):
                    value = float(opdef.compute(NUMPY_MATH, *map(np.float64, consts), **v.attr))
                if not math.isfinite(value):
                    return None
                folded += 1
                scalar = rw.const(value, v.type.dtype, like=v)
                return scalar if scalar.type == v.type else rw.emit("broadcast", [scalar], like=v, declared=v.type)
            for pos, c in enumerate(consts):
                if c is not None and (pos, c) in opdef.identities:
                    other = v.operands[1 - pos]
                    if other.type == v.type:
                        folded += 1
                        return other
            return None

        result, _ = rewrite(program, rule)
        if folded:
            ctx.note(self.name, f"folded {folded} constant expression(s)")
        return result


@register
class Canonicalize(Pass):
    """Spell equal computations one way, so that CSE merges them: an einsum whose operands all have
    the result's type and subscripts (an elementwise product, "a,a->a") becomes a chain of muls, and
    an aggregation of a feature-axis reshape becomes the reshape of the aggregation (aggregations
    work element by element). Gradient programs produce both spellings of one product."""

    name = "canonicalize"

    def run(self, program: Program, ctx: PassContext) -> Program:
        changed = 0

        def product(v: Value, rw: Rewriter) -> Value | None:
            nonlocal changed
            terms, out = parse_subscripts(v.attr["spec"])
            if len(terms) < 2 or any(term != out for term in terms) or any(o.type != v.type for o in v.operands):
                return None
            result = v.operands[0]
            for o in v.operands[1:]:
                result = rw.emit("mul", [result, o], like=v)
            changed += 1
            return result

        def aggregate_of_reshape(v: Value, rw: Rewriter) -> Value | None:
            nonlocal changed
            reshaped = v.operands[0]
            if reshaped.op != "reshape" or reshaped.operands[0].type.domain is not reshaped.type.domain:
                return None
            inner = rw.emit("aggregate", [reshaped.operands[0]], v.attr, like=v)
            changed += 1
            return rw.emit("reshape", [inner], like=v, declared=v.type)

        result, _ = rewrite(program, {"einsum": [product], "aggregate": [aggregate_of_reshape]})
        if changed:
            ctx.note(self.name, f"rewrote {changed} value(s) into their canonical form")
        return result


@register
class ReuseProducts(Pass):
    """A contraction (``contract_rows``, ``einsum``) of two operands with the same subscripts and type
    reads their product when the program already computes it (``mul`` of the two, of their type):
    sum_r a_r (b_r c_r) with ``m = b * c`` computed for another use becomes sum_r a_r m_r, and a
    column sum of b * c the column sum of m. Gradient programs write both: the differentiation
    merges a product into each contraction it feeds, the product itself feeds the next layer's
    cotangent. Only products computed before the contraction are read."""

    name = "reuse_products"

    def run(self, program: Program, ctx: PassContext) -> Program:
        products: dict[frozenset[int], Value] = {}
        reused = 0

        def record(v: Value, rw: Rewriter) -> None:
            a, b = v.operands
            if is_pure(v) and a.type == b.type == v.type:
                products.setdefault(frozenset((id(a), id(b))), v)
            return None

        def computed_pair(operands: list[Value], terms: list[str]) -> tuple[int, int, Value] | None:
            """Two operands of the same subscripts and type whose product is computed, and that product."""
            for i in range(len(operands)):
                for j in range(i + 1, len(operands)):
                    a, b = operands[i], operands[j]
                    m = products.get(frozenset((id(a), id(b)))) if a is not b else None
                    if m is not None and terms[i] == terms[j] and a.type == b.type:
                        return i, j, m
            return None

        def reuse(v: Value, rw: Rewriter) -> Value | None:
            nonlocal reused
            terms, out = parse_subscripts(v.attr["spec"])
            operands = list(v.operands)
            changed = False
            while (pair := computed_pair(operands, terms)) is not None:
                i, j, m = pair
                operands = [o for k, o in enumerate(operands) if k not in (i, j)] + [m]
                terms = [t for k, t in enumerate(terms) if k not in (i, j)] + [terms[i]]
                changed = True
            if not changed:
                return None
            reused += 1
            return rw.emit(v.op, operands, {**v.attr, "spec": f"{','.join(terms)}->{out}"}, like=v)

        result, _ = rewrite(program, {"mul": [record], "contract_rows": [reuse], "einsum": [reuse]})
        if reused:
            ctx.note(self.name, f"{reused} contraction(s) read a product already computed")
        return result
