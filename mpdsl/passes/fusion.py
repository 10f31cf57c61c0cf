"""Fusion: message-aggregate (g-SpMM), sums over matching endpoints (the max / min backward),
attention (edge softmax + weighted sum) and relation-typed matmuls with compact materialisation."""

from __future__ import annotations

from mpdsl.ir import Program, Value
from mpdsl.ops import OPS, is_prefix
from mpdsl.passes import Pass, PassContext, register
from mpdsl.passes.rewrite import Rewriter, rewrite
from mpdsl.types import Domain

OPPOSITE = {"dst": "src", "src": "dst"}


def _mul_factors(v: Value) -> list[Value]:
    if v.op == "mul":
        return _mul_factors(v.operands[0]) + _mul_factors(v.operands[1])
    return [v]


@register
class TypedMatmul(Pass):
    """x[src] @ W[etype] -> typed_linear(x, W, etype): each distinct (node, type) product is computed
    once (compact materialisation, PIGEON) instead of once per edge, and no E x D x K weight tensor
    is gathered."""

    name = "typed_matmul"

    def run(self, program: Program, ctx: PassContext) -> Program:
        def rule(v: Value, rw: Rewriter) -> Value | None:
            a, b = v.operands
            if (a.op == "gather" and a.attr["index"] in ("src", "dst") and b.op == "take"
                    and b.operands[1].type.domain is Domain.EDGE and b.operands[0].type.rank >= 2):
                relation = b.operands[1].attr.get("name", "type")
                ctx.note(self.name, f"{a.attr['index']}-gathered {a.type} @ W[{relation}]: "
                                    "one product per distinct (node, type) pair")
                return rw.emit("typed_linear", [a.operands[0], b.operands[0], b.operands[1]],
                               {"index": a.attr["index"], "edges": a.attr["edges"]}, like=v)
            return None

        return rewrite(program, {"matmul": [rule]})[0]


@register
class FuseAttention(Pass):
    """sum(softmax(s) by dst * x[src]) by dst -> attention(s, x): the normalised attention weights
    and the E x F messages are never materialised (online softmax in kernels that support it)."""

    name = "fuse_attention"

    def run(self, program: Program, ctx: PassContext) -> Program:
        def rule(v: Value, rw: Rewriter) -> Value | None:
            by = v.attr["by"]
            if v.attr["reduce"] != "sum" or by not in OPPOSITE or v.operands[0].op != "mul":
                return None
            m = v.operands[0]
            for pos in (0, 1):
                alpha, msg = m.operands[pos], m.operands[1 - pos]
                edges = v.attr["edges"]
                if (alpha.op == "softmax" and alpha.attr["by"] == by and alpha.attr["edges"] == edges
                        and msg.op == "gather" and msg.attr["index"] == OPPOSITE[by] and msg.attr["edges"] == edges
                        and msg.type == m.type and is_prefix(alpha.type.shape, msg.type.shape)):
                    ctx.note(self.name, f"softmax by {by} and weighted sum of {msg.operands[0].type} fused"
                             + _on_set(edges))
                    return rw.emit("attention", [alpha.operands[0], msg.operands[0]],
                                   {"by": by, "layout": "auto", "edges": edges}, like=v)
            return None

        return rewrite(program, {"aggregate": [rule]})[0]


@register
class FuseMessageAggregate(Pass):
    """reduce(x[src] * w1 * w2 ...) by dst -> gspmm(x, w1 * w2 ...) (DGL's g-SpMM): the gathered
    E x F messages are never materialised; edge factors narrower than x (scalars, per-head weights)
    are multiplied into one edge weight; param factors are applied to x per node."""

    name = "fuse_message_aggregate"

    def run(self, program: Program, ctx: PassContext) -> Program:
        def rule(v: Value, rw: Rewriter) -> Value | None:
            by = v.attr["by"]
            if by not in OPPOSITE or v.attr["reduce"] not in OPS["gspmm"].attrs["reduce"]:
                return None
            factors = _mul_factors(v.operands[0])
            edges = v.attr["edges"]
            wide = [f for f in factors if f.op == "gather" and f.attr["index"] == OPPOSITE[by]
                    and f.attr["edges"] == edges and f.type.shape == v.type.shape]
            if len(wide) != 1:
                return None
            x = wide[0].operands[0]
            others = [f for f in factors if f is not wide[0]]
            params = [f for f in others if f.type.domain is Domain.PARAM]
            weights = [f for f in others if f.type.domain is Domain.EDGE and f.type.rowset == edges]
            if len(params) + len(weights) != len(others):
                return None
            if any(not is_prefix(w.type.shape, x.type.shape) for w in weights):
                return None  # an E x F weight: nothing to gain over the plain product
            if v.attr["reduce"] in ("max", "min") and params:
                return None  # a negative scale would swap max and min
            for p in params:
                x = rw.emit("mul", [x, p], like=v)
                if x.type != wide[0].operands[0].type:
                    return None
            operands = [x]
            if weights:
                w = weights[0]
                for other in weights[1:]:
                    w = rw.emit("mul", [w, other], like=v)
                operands.append(w)
            kind = "weighted " if weights else ""
            ctx.note(self.name, f"{v.attr['reduce']} by {by} of {kind}{OPPOSITE[by]}-gathered {x.type} fused (g-SpMM)"
                     + _on_set(edges))
            return rw.emit("gspmm", operands, {"reduce": v.attr["reduce"], "by": by, "layout": "auto", "edges": edges},
                           like=v)

        return rewrite(program, {"aggregate": [rule]})[0]


def _on_set(edges: str) -> str:
    """The edge set a fusion note is about ("" for the graph's own edges)."""
    return f" on the edge set {edges}" if edges else ""


def _endpoint_match(w: Value, edges: str) -> tuple[Value, Value] | None:
    """(a, b) when ``w`` is the edge mask eq(a[src], b[dst]) (in either operand order) of two node
    values of ``w``'s type, gathered onto the edge set ``edges``, else None."""
    if w.op != "eq":
        return None
    for p, q in (w.operands, w.operands[::-1]):
        if (p.op == "gather" and p.attr["index"] == "src" and q.op == "gather" and q.attr["index"] == "dst"
                and p.attr["edges"] == edges and q.attr["edges"] == edges and p.type == w.type and q.type == w.type):
            return p.operands[0], q.operands[0]
    return None


@register
class FuseMatchAggregate(Pass):
    """sum(eq(a[src], b[dst])) by dst|src -> match_gspmm(a, b), and the g-SpMM sum weighted by that
    mask, gspmm(x, eq(a[src], b[dst])) -> match_gspmm(a, b, x): the E x F mask is never
    materialised; each kernel compares the two endpoint rows as it reads an edge. These are the sums
    of the max / min adjoint (the tie counts, and the cotangent routed to the tied edges), so a
    max-aggregation backward keeps node values only (the operand and the result) for its residuals.
    Runs after ``fuse_message_aggregate`` (which makes the weighted g-SpMM)."""

    name = "fuse_match_aggregate"

    def run(self, program: Program, ctx: PassContext) -> Program:
        def fused(v: Value, rw: Rewriter, mask: Value, x: Value | None) -> Value | None:
            edges = v.attr["edges"]
            match = _endpoint_match(mask, edges)
            if match is None or v.attr["reduce"] != "sum" or v.attr["by"] not in OPPOSITE:
                return None
            if x is not None and x.type != match[0].type:
                return None
            what = "routed to the matching edges" if x is not None else "matching edges counted"
            ctx.note(self.name, f"sum by {v.attr['by']} over eq(a[src], b[dst]) of {match[0].type}: {what} "
                                "in one pass (no E x F mask)" + _on_set(edges))
            return rw.emit("match_gspmm", list(match) + ([] if x is None else [x]),
                           {"by": v.attr["by"], "layout": "auto", "edges": edges}, like=v)

        def count_rule(v: Value, rw: Rewriter) -> Value | None:
            return fused(v, rw, v.operands[0], None)

        def route_rule(v: Value, rw: Rewriter) -> Value | None:
            return fused(v, rw, v.operands[1], v.operands[0]) if len(v.operands) == 2 else None

        return rewrite(program, {"aggregate": [count_rule], "gspmm": [route_rule]})[0]
