"""Layout selection for fused graph ops. Graph-dependent choices (node reordering, row partitions
for skewed degrees) are made per graph at bind time by ``mpdsl.plan``."""

from __future__ import annotations

from mpdsl.ir import Program, Value
from mpdsl.passes import Pass, PassContext, register
from mpdsl.passes.rewrite import Rewriter, rewrite

REASONS = {
    "csr_dst": "CSR by destination: pull, one writer per output row, deterministic, no atomics",
    "csr_src": "CSR by source (the CSC of the graph): pull for reductions onto source nodes",
    "coo": "COO + atomics on a GPU for a sum onto source nodes: one pass over the destination-sorted edges, "
           "no second (by-source) CSR built or stored; not bitwise deterministic",
}


@register
class SelectLayout(Pass):
    """Give every fused graph op with layout "auto" a concrete layout: CSR by destination for
    reductions by dst, CSR by source for reductions by src; on a GPU target, sum/mean g-SpMMs by src
    (the reductions of backward passes) use COO + atomics over the destination-sorted edges instead of
    a second CSR. On the CPU the pull form is always chosen: as fast there, and deterministic."""

    name = "select_layout"

    def run(self, program: Program, ctx: PassContext) -> Program:
        def rule(v: Value, rw: Rewriter) -> Value | None:
            if v.attr.get("layout") != "auto":
                return None
            layout = "csr_dst" if v.attr["by"] == "dst" else "csr_src"
            if (ctx.target == "gpu" and v.op == "gspmm" and v.attr["by"] == "src"
                    and v.attr["reduce"] in ("sum", "mean")):
                layout = "coo"
            ctx.note(self.name, f"{v.op} by {v.attr['by']}: {REASONS[layout]}")
            return rw.emit(v.op, list(v.operands), {**v.attr, "layout": layout}, like=v)

        return rewrite(program, {"gspmm": [rule], "match_gspmm": [rule], "attention": [rule]})[0]
