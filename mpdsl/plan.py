"""Execution plans: graph-dependent layout decisions (node reordering for locality) and the cost
report of ``mpdsl compile --emit plan`` (kernels, bytes materialised, FLOPs, layouts and why)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mpdsl.graph import Graph
from mpdsl.ir import Program, Value, value_names
from mpdsl.ops import OPS, MissingRule, Trait
from mpdsl.types import ITEMSIZE, Domain, TensorType

LAYOUT_MODES = ("auto", "reorder", "none")
REORDER_MIN_NODES = 50_000  # below this the node features fit in the last-level cache anyway
LOCALITY_WINDOW = 64  # an edge is local when |src - dst| < N / LOCALITY_WINDOW


# ---- node reordering --------------------------------------------------------------------------


@dataclass
class NodeOrder:
    """A relabelling of nodes: new node k is old node ``perm[k]``."""

    perm: np.ndarray
    inverse: np.ndarray


@dataclass
class GraphLayout:
    """How a graph is laid out for running: nodes relabelled (``nodes``: new node k is old node
    ``nodes.perm[k]``) and/or edges stored in another order (``edge_perm``: new edge k is old edge
    ``edge_perm[k]``). Applied to the graph and the inputs before running, undone on the outputs."""

    nodes: NodeOrder | None
    edge_perm: np.ndarray | None
    reasons: tuple[str, ...]

    def apply(self, graph: Graph, arrays: dict[str, np.ndarray], input_types: Mapping[str, TensorType],
              from_graph: frozenset[str] = frozenset()) -> tuple[Graph, dict[str, np.ndarray]]:
        """The laid-out graph (built once per graph) and the inputs in its order; inputs named in
        ``from_graph`` were read from the graph and are taken from its laid-out copy."""
        def build() -> Graph:
            edge_index = graph.edge_index
            node_data, edge_data = graph.node_data, graph.edge_data
            if self.nodes is not None:
                edge_index = self.nodes.inverse[edge_index]
                node_data = {k: np.take(v, self.nodes.perm, axis=0) for k, v in node_data.items()}
            if self.edge_perm is not None:
                edge_index = edge_index[:, self.edge_perm]
                edge_data = {k: np.take(v, self.edge_perm, axis=0) for k, v in edge_data.items()}
            return Graph(edge_index, graph.num_nodes, node_data=node_data, edge_data=edge_data,
                         graph_data=graph.graph_data)

        from mpdsl.backends import take_rows

        laid_out = graph.cached(("laid_out", id(self)), build)
        moved = {}
        for name, array in arrays.items():
            domain = input_types[name].domain
            if name in from_graph:
                array = laid_out[name].astype(array.dtype, copy=False)
            elif domain is Domain.NODE and self.nodes is not None:
                array = take_rows(array, self.nodes.perm)
            elif domain is Domain.EDGE and self.edge_perm is not None:
                array = take_rows(array, self.edge_perm)
            moved[name] = array
        return laid_out, moved

    def restore(self, outputs: dict[str, np.ndarray], types: Mapping[str, TensorType]) -> dict[str, np.ndarray]:
        """The outputs back in the caller's node and edge order (row k of a laid-out output goes back
        to row ``perm[k]``)."""
        from mpdsl.backends import put_rows

        restored = {}
        for name, array in outputs.items():
            domain = types[name].domain
            if domain is Domain.NODE and self.nodes is not None:
                array = put_rows(array, self.nodes.perm)
            elif domain is Domain.EDGE and self.edge_perm is not None:
                array = put_rows(array, self.edge_perm)
            restored[name] = array
        return restored


@dataclass
class LayoutDecision:
    order: NodeOrder | None
    reason: str
    seconds: float


def locality(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> float:
    """Fraction of edges whose endpoints' ids are within N / LOCALITY_WINDOW of each other."""
    if len(src) == 0:
        return 1.0
    return float(np.mean(np.abs(src - dst) < max(1, num_nodes // LOCALITY_WINDOW)))


def community_order(src: np.ndarray, dst: np.ndarray, num_nodes: int, rounds: int = 5) -> np.ndarray:
    """Nodes sorted by label-propagation community (synchronous, ties to the smallest label), so
    that nodes which share neighbours get nearby ids."""
    a = np.concatenate([src, dst])
    b = np.concatenate([dst, src])
    labels = np.arange(num_nodes)
    for _ in range(rounds):
        keys, counts = np.unique(b * num_nodes + labels[a], return_counts=True)
        node, label = keys // num_nodes, keys % num_nodes
        best = np.lexsort((label, -counts, node))
        first = np.ones(len(best), dtype=bool)
        first[1:] = node[best][1:] != node[best][:-1]
        updated = labels.copy()
        updated[node[best][first]] = label[best][first]
        changed = np.mean(updated != labels)
        labels = updated
        if changed < 0.01:
            break
    return np.lexsort((np.arange(num_nodes), labels))


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """``inverse[perm[k]] = k``."""
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(len(perm))
    return inverse


def _order_from_perm(perm: np.ndarray) -> NodeOrder:
    return NodeOrder(perm, inverse_permutation(perm))


def decide_node_order(graph: Graph, mode: str) -> LayoutDecision:
    start = time.perf_counter()
    n = graph.num_nodes
    before = locality(graph.src, graph.dst, n)
    if mode == "none":
        return LayoutDecision(None, "node reordering disabled", 0.0)
    if mode == "auto" and n < REORDER_MIN_NODES:
        return LayoutDecision(None, f"no reordering: {n} nodes is below {REORDER_MIN_NODES} (features stay in cache)",
                              0.0)
    if mode == "auto" and before >= 0.5:
        return LayoutDecision(None, f"no reordering: {before:.0%} of edges are already local", 0.0)
    order = _order_from_perm(community_order(graph.src, graph.dst, n))
    after = locality(order.inverse[graph.src], order.inverse[graph.dst], n)
    seconds = time.perf_counter() - start
    if mode == "auto" and not (after >= 2 * before and after >= 0.3):
        return LayoutDecision(None, f"no reordering: community order would make {after:.0%} of edges local "
                                    f"(now {before:.0%}); not worth it", seconds)
    return LayoutDecision(order, f"nodes reordered by community: local edges {before:.0%} -> {after:.0%} "
                                 f"(computed once per graph in {seconds * 1e3:.0f} ms)", seconds)


def choose_layout(graph: Graph, program: Program, mode: str) -> GraphLayout | None:
    """The layout to run ``program`` on ``graph`` with (None: as given); decisions cached per graph."""
    if not any(OPS[v.op].has(Trait.GRAPH) for v in program.values) or graph.num_nodes == 0:
        return None
    per_edge_by_dst = any(OPS[v.op].has(Trait.EDGE_ORDER) and v.attr["by"] == "dst"
                          and any(o.type.domain is Domain.EDGE for o in v.operands) for v in program.values)
    return graph.cached(("layout", mode, per_edge_by_dst), lambda: _decide_layout(graph, mode, per_edge_by_dst))


def node_order(graph: Graph, mode: str) -> LayoutDecision:
    """``decide_node_order``, cached per graph and mode."""
    return graph.cached(("node_order", mode), lambda: decide_node_order(graph, mode))


def _decide_layout(graph: Graph, mode: str, per_edge_by_dst: bool) -> GraphLayout | None:
    nodes = node_order(graph, mode)
    reasons = [nodes.reason]
    edge_perm = None
    if mode != "none" and per_edge_by_dst and graph.num_edges:
        def sorted_edges() -> np.ndarray | None:
            dst = graph.dst if nodes.order is None else nodes.order.inverse[graph.dst]
            perm = np.argsort(dst, kind="stable")
            return None if np.array_equal(perm, np.arange(len(perm))) else perm
        edge_perm = graph.cached(("edge_order", mode), sorted_edges)
        if edge_perm is not None:
            reasons.append("edges stored sorted by destination: per-edge values (scores, weights) are read "
                           "in CSR order without a permutation")
    if nodes.order is None and edge_perm is None:
        return None
    return GraphLayout(nodes.order, edge_perm, tuple(reasons))


def degree_balance(graph: Graph) -> str:
    """How the CSR kernels split rows among workers, and why (degree bucketing for skew)."""
    degrees = graph.in_degree()
    if not len(degrees) or not graph.num_edges:
        return "no edges: nothing to balance"
    peak, mean = int(degrees.max()), float(degrees.mean())
    skew = "skewed" if peak > 32 * max(mean, 1.0) else "even"
    return (f"in-degrees {skew} (max {peak}, mean {mean:.1f}): CSR rows are split among workers in blocks of "
            "equal edge count, not equal row count")


# ---- cost report ------------------------------------------------------------------------------


@dataclass
class OpCost:
    value: Value
    bytes_out: int
    flops: int


def _size(t: TensorType, dims: Mapping[str, int]) -> int:
    return int(np.prod([d.substitute(dims).value for d in t.shape], dtype=np.int64)) if t.shape else 1


def _matmul_flops(v: Value, count: int, edges: int, width: int, dims: Mapping[str, int]) -> int:
    return 2 * count * v.operands[0].type.shape[-1].substitute(dims).value


def _typed_linear_flops(v: Value, count: int, edges: int, width: int, dims: Mapping[str, int]) -> int:
    w = v.operands[1].type
    return 2 * edges * _size(w, dims) // max(1, w.shape[0].substitute(dims).value)


def _no_flops(v: Value, count: int, edges: int, width: int, dims: Mapping[str, int]) -> int:
    return 0


def _per_element_flops(v: Value, count: int, edges: int, width: int, dims: Mapping[str, int]) -> int:
    return count * max(1, len(v.operands))


# Floating-point operations per op: (value, result elements, edges, result row width, dims) -> FLOPs.
# Ops absent here fall back on their traits (elementwise and row-wise: one per result element and
# operand); an op with neither is a MissingRule.
FLOP_RULES = {
    "input": _no_flops, "param": _no_flops, "const": _no_flops, "degree": _no_flops,
    "gather": _no_flops, "select": _no_flops, "reshape": _no_flops, "take": _no_flops, "one_hot": _no_flops,
    "matmul": _matmul_flops,
    "gspmm": lambda v, count, edges, width, dims: (2 if len(v.operands) == 2 else 1) * edges * width,
    "attention": lambda v, count, edges, width, dims: 2 * edges * width + 6 * edges * _size(v.operands[0].type, dims),
    "typed_linear": _typed_linear_flops,
    "aggregate": lambda v, count, edges, width, dims: edges * width,
    "softmax": _per_element_flops, "batch_norm": _per_element_flops, "contract_rows": _per_element_flops,
    "broadcast": _per_element_flops,
}


def flop_rule(op: str):
    """The FLOP formula of ``op``: its entry in ``FLOP_RULES``, else by its traits."""
    rule = FLOP_RULES.get(op)
    if rule is not None:
        return rule
    if OPS[op].has(Trait.ELEMENTWISE) or OPS[op].has(Trait.ROW_WISE):
        return _per_element_flops
    raise MissingRule(f"the cost report has no FLOP rule for op {op}: add one to mpdsl.plan.FLOP_RULES")


def runs_a_kernel(v: Value) -> bool:
    """Whether ``v`` is computed at run time (model inputs, params and constants are not)."""
    return not (OPS[v.op].has(Trait.INTERFACE) or v.op == "const")


def op_cost(v: Value, rows: Mapping[Domain, int], dims: Mapping[str, int], itemsize: int) -> OpCost:
    """Bytes the op materialises (its result) and its floating-point operations."""
    if not runs_a_kernel(v):
        return OpCost(v, 0, 0)
    width = _size(v.type, dims)
    count = rows[v.type.domain] * width
    edges = rows[v.operands[0].type.domain] if v.op == "aggregate" else rows[Domain.EDGE]
    flops = flop_rule(v.op)(v, count, edges, width, dims)
    return OpCost(v, count * (8 if v.type.dtype == "i64" else itemsize), flops)


def program_costs(program: Program, rows: Mapping[Domain, int], dims: Mapping[str, int]) -> list[OpCost]:
    itemsize = ITEMSIZE[program.float_dtype]
    return [op_cost(v, rows, dims, itemsize) for v in program.values]


def _fmt_bytes(n: int) -> str:
    size: float = n
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


def _fmt_flops(n: int) -> str:
    return f"{n / 1e9:.3f} GFLOP" if n >= 1e7 else f"{n / 1e6:.3f} MFLOP"


def report(reference: Program, optimized: Program, notes: list[tuple[str, str]], dims: Mapping[str, int],
           graph: Graph | None, layout_reasons: list[str]) -> str:
    """The text of ``--emit plan``."""
    if graph is not None:
        rows = {Domain.NODE: graph.num_nodes, Domain.EDGE: graph.num_edges, Domain.GRAPH: graph.num_graphs,
                Domain.PARAM: 1}
        sizes = f"graph: {graph.num_nodes} nodes, {graph.num_edges} edges, {graph.num_graphs} graph(s)"
    else:
        rows = {Domain.NODE: 100_000, Domain.EDGE: 1_000_000, Domain.GRAPH: 1, Domain.PARAM: 1}
        sizes = "graph: none given; figures for 100000 nodes, 1000000 edges, 1 graph (pass --graph for real ones)"
    dims_text = ", ".join(f"{k}={v}" for k, v in sorted(dims.items()))
    lines = [f"plan for @{optimized.name} ({dims_text})", sizes, ""]
    names = value_names(optimized)
    costs = program_costs(optimized, rows, dims)
    lines.append(f"{'kernel':<8} {'op':<14} {'result':<24} {'layout':<9} {'bytes out':>11} {'flops':>15}")
    kernel = 0
    for c in costs:
        v = c.value
        if not runs_a_kernel(v):
            continue
        kernel += 1
        layout = v.attr.get("layout", "csr_dst" if v.op in ("aggregate", "softmax") and v.attr["by"] == "dst"
                            else "csr_src" if v.op in ("aggregate", "softmax") and v.attr["by"] == "src" else "-")
        lines.append(f"{kernel:<8} {v.op:<14} {names[v] + ' ' + str(v.type):<24} {layout:<9} "
                     f"{_fmt_bytes(c.bytes_out):>11} {_fmt_flops(c.flops):>15}")
    ref_costs = program_costs(reference, rows, dims)

    def totals(cs: list[OpCost]) -> tuple[int, int, int, int]:
        kernels = sum(1 for c in cs if runs_a_kernel(c.value))
        edge_bytes = sum(c.bytes_out for c in cs if c.value.type.domain is Domain.EDGE)
        return kernels, sum(c.bytes_out for c in cs), edge_bytes, sum(c.flops for c in cs)

    rk, rb, re_, rf = totals(ref_costs)
    ok, ob, oe, of = totals(costs)
    lines += ["", f"{'':<26} {'unoptimized':>14} {'optimized':>14}",
              f"{'kernels':<26} {rk:>14} {ok:>14}",
              f"{'bytes materialised':<26} {_fmt_bytes(rb):>14} {_fmt_bytes(ob):>14}",
              f"{'  of which per-edge':<26} {_fmt_bytes(re_):>14} {_fmt_bytes(oe):>14}",
              f"{'FLOPs':<26} {_fmt_flops(rf):>14} {_fmt_flops(of):>14}", "", "decisions:"]
    for pass_name, text in notes:
        lines.append(f"  [{pass_name}] {text}")
    for reason in layout_reasons:
        lines.append(f"  [graph layout] {reason}")
    return "\n".join(lines) + "\n"
