"""Algebraic reordering: compute row-wise work on the smaller domain and move linear maps across
aggregations (Graphiler's "reorder", PIGEON's linear operator reordering)."""

from __future__ import annotations

from mpdsl.ir import Program, Value
from mpdsl.ops import OPS, Trait, is_pure, shape_size
from mpdsl.passes import Pass, PassContext, register
from mpdsl.passes.rewrite import Rewriter, rewrite_to_fixpoint
from mpdsl.types import Dim, Domain, Space, edge_set_ends


@register
class HoistGathers(Pass):
    """Row-wise ops whose row operands are all gathers by the same index run on the gathered-from
    rows, then one gather moves the result: op(x[src], W) -> op(x, W)[src]. This moves linear maps
    before gathers ((h[src]) @ W == (h @ W)[src]) and computes per-node terms once per node instead of
    once per edge (assumes E >= N; graph -> node broadcasts always shrink)."""

    name = "hoist_gathers"

    def run(self, program: Program, ctx: PassContext) -> Program:
        def rule(v: Value, rw: Rewriter) -> Value | None:
            if not OPS[v.op].has(Trait.ROW_WISE) or not is_pure(v):
                return None  # a random op hoisted would share one draw among all edges of a node
            rows = [o for o in v.operands if o.type.domain is not Domain.PARAM]
            if not rows or any(o.op != "gather" for o in rows):
                return None
            indices = {(o.attr["index"], o.attr["edges"]) for o in rows}
            if len(indices) != 1:
                return None
            index, edges = indices.pop()
            operands = [o.operands[0] if o.op == "gather" else o for o in v.operands]
            ends = edge_set_ends(edges)
            source = Space(Domain.GRAPH) if index == "batch" else Space(Domain.NODE, ends[0 if index == "src" else 1])
            declared = v.type.on(source) if OPS[v.op].declared else None
            inner = rw.emit(v.op, operands, v.attr, like=v, declared=declared)
            return rw.emit("gather", [inner], {"index": index, "edges": edges}, like=v)

        result, rounds = rewrite_to_fixpoint(program, rule)
        if rounds:
            ctx.note(self.name, "moved row-wise work before gathers (computed per node, not per edge)")
        return result


def _known(dim: Dim, dims: dict[str, int]) -> int | None:
    d = dim.substitute(dims)
    return d.value if d.is_static else None


@register
class ReorderLinear(Pass):
    """Move linear maps and destination-constant factors across reductions:
    (sum(m) by dst) @ W -> sum(m @ W) by dst when W narrows the features (decided from the dims;
    left for bind time when they are unknown); sum(m * b[dst]) by dst -> b * sum(m) by dst
    (likewise b[src] by src, v[batch] by graph, and division by such a factor); a feature-axis
    sum of (x @ W) * p becomes x @ (the same sum of W * p), computed once on the weight; and the
    sum over rows of <a_i W, x_i> (a scale's gradient through a linear layer: GIN's eps) becomes
    <W, sum over rows of a_i^T x_i> when nothing else reads a @ W: the same multiply-adds as one
    row contraction (a sum of products; no rows x F value written and read back)."""

    name = "reorder_linear"

    def run(self, program: Program, ctx: PassContext) -> Program:
        decisions: list[str] = []
        # readers per value of the input program: no rule here adds a reader to a value read once, and
        # a value a rule rebuilds is not found (so kept as it is)
        uses: dict[int, int] = {}
        for value in program.values:
            for o in value.operands:
                uses[id(o)] = uses.get(id(o), 0) + 1
        for _, value in program.outputs:
            uses[id(value)] = uses.get(id(value), 0) + 1

        def across_aggregation(v: Value, rw: Rewriter) -> Value | None:
            agg, w = v.operands
            if agg.op != "aggregate" or agg.attr["reduce"] not in ("sum", "mean") or w.type.domain is not Domain.PARAM:
                return None
            d_in, d_out = _known(w.type.shape[0], ctx.dims), _known(shape_size(w.type.shape[1:]), ctx.dims)
            if d_in is None or d_out is None:
                decisions.append(f"{agg.attr['reduce']} by {agg.attr['by']} @ {w.type}: widths unknown, kept "
                                 "(decided at bind time)")
                return None
            if d_out >= d_in:
                return None
            decisions.append(f"moved @ {w.type} before {agg.attr['reduce']} by {agg.attr['by']}: "
                             f"width {d_in} -> {d_out}")
            inner = rw.emit("matmul", [agg.operands[0], w], like=v)
            return rw.emit("aggregate", [inner], agg.attr, like=agg)

        def constant_factor(v: Value, rw: Rewriter) -> Value | None:
            (m,) = v.operands
            if v.attr["reduce"] not in ("sum", "mean") or m.op not in ("mul", "div"):
                return None
            index = {"dst": "dst", "src": "src", "graph": "batch"}[v.attr["by"]]
            for pos in ((0, 1) if m.op == "mul" else (1,)):
                factor, rest = m.operands[pos], m.operands[1 - pos]
                if (factor.op == "gather" and factor.attr["index"] == index
                        and factor.attr["edges"] == v.attr["edges"]
                        and rest.type.space == m.type.space and rest.type.shape == m.type.shape):
                    decisions.append(f"pulled a factor constant per {index} out of "
                                     f"{v.attr['reduce']} by {v.attr['by']}")
                    reduced = rw.emit("aggregate", [rest], v.attr, like=v)
                    return rw.emit(m.op, [factor.operands[0], reduced] if pos == 0 else [reduced, factor.operands[0]],
                                   like=m)
            return None

        def reduce_into_weight(v: Value, rw: Rewriter) -> Value | None:
            """sum((x @ W) * p, axis) -> x @ sum(W * p, axis + 1): the reduction happens once on the
            weight instead of on every row (e.g. GAT's attention logits a . (x W))."""
            if v.attr["reduce"] not in ("sum", "mean"):
                return None
            (m,) = v.operands
            scale = None
            if m.op == "mul":
                a, b = m.operands
                mm, scale = (a, b) if a.op == "matmul" else (b, a)
                if mm.op != "matmul" or scale.type.domain is not Domain.PARAM:
                    return None
            elif m.op == "matmul":
                mm = m
            else:
                return None
            x, w = mm.operands
            if x.type.rank != 1 or w.type.domain is not Domain.PARAM or x.type.domain is Domain.PARAM:
                return None
            if scale is not None and (scale.type.rank > w.type.rank - 1 or any(
                    d not in (Dim(1), e) for d, e in zip(scale.type.shape, w.type.shape[1:]))):
                return None
            if scale is not None:
                lifted = rw.emit("reshape", [scale], like=v,
                                 declared=scale.type.with_(shape=(Dim(1),) + scale.type.shape))
                w = rw.emit("mul", [w, lifted], like=v)
            axis = v.attr["axis"] % mm.type.rank
            folded = rw.emit("reduce", [w], {"reduce": v.attr["reduce"], "axis": axis + 1}, like=v)
            decisions.append(f"{v.attr['reduce']} over an axis of (x @ W){' * p' if scale is not None else ''} "
                             "folded into the weight")
            return rw.emit("matmul", [x, folded], like=v)

        def common_factor(v: Value, rw: Rewriter) -> Value | None:
            """a * n + b * n -> (a + b) * n: one multiplication pass instead of two."""
            left, right = v.operands
            if left.op != "mul" or right.op != "mul":
                return None
            for i in (0, 1):
                for j in (0, 1):
                    n, a, b = left.operands[i], left.operands[1 - i], right.operands[1 - j]
                    if n is right.operands[j] and a.type == b.type == v.type:
                        decisions.append("factored a common multiplier out of a sum")
                        return rw.emit("mul", [rw.emit("add", [a, b], like=v), n], like=v)
            return None

        def contract_before_the_map(v: Value, rw: Rewriter) -> Value | None:
            """contract_rows(a @ W, x, "f,f->") -> einsum(contract_rows(a, x, "k,f->kf"), W, "kf,kf->")."""
            terms, out = v.attr["spec"].replace(" ", "").split("->")
            left, _, right = terms.partition(",")
            if out or len(left) != 1 or left != right or len(v.operands) != 2:
                return None
            for pos in (0, 1):
                mm, x = v.operands[pos], v.operands[1 - pos]
                if mm.op != "matmul" or uses.get(id(mm), 0) != 1 or x.type.space != mm.type.space:
                    continue
                a, w = mm.operands
                if a.type.rank != 1 or w.type.domain is not Domain.PARAM or w.type.rank != 2 or x.type.rank != 1:
                    continue
                decisions.append("a row contraction through a linear map contracts the rows first")
                rows = rw.emit("contract_rows", [a, x], {"spec": "k,f->kf"}, like=v)
                return rw.emit("einsum", [rows, w], {"spec": "kf,kf->"}, like=v)
            return None

        result, _ = rewrite_to_fixpoint(program, {"matmul": [across_aggregation], "aggregate": [constant_factor],
                                                  "reduce": [reduce_into_weight], "add": [common_factor],
                                                  "contract_rows": [contract_before_the_map]})
        for text in dict.fromkeys(decisions):
            ctx.note(self.name, text)
        return result
