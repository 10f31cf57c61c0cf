"""Execution plans: graph-dependent layout decisions (node reordering for locality) and the cost
report of ``mpdsl compile --emit plan`` (kernels, bytes materialised, FLOPs, layouts and why)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from mpdsl.graph import Graph
from mpdsl.ir import Program, Value, value_names
from mpdsl.ops import OPS, MissingRule, Trait, parse_subscripts
from mpdsl.types import ITEMSIZE, Domain, Space, TensorType

LAYOUT_MODES = ("auto", "reorder", "none")
REORDER_MIN_NODES = 50_000  # below this the node features fit in the last-level cache anyway
# Node rows the program's graph ops read per call (N x ``gathered_row_bytes``) below which "auto"
# keeps the order: relabelling a call's inputs and outputs (one pass over each) then costs more
# than the locality gains. Measured on community graphs, 64 float32 features: one-layer steps
# (one graph op) 8-18% slower reordered at 100k nodes, 8-15% at 200k, 9% at 300k (77 MB); faster
# at 500k (128 MB: 5-43%), and so is the two-layer GCN's forward at 200k (102 MB: 6-24%).
REORDER_MIN_BYTES = 90_000_000
SORT_MIN_EDGES = 65_536  # below this "auto" keeps the edge order: per-edge values fit in cache anyway
LOCALITY_WINDOW = 64  # an edge is local when |src - dst| < N / LOCALITY_WINDOW
SAMPLE_EDGES = 4096  # edges the layout estimate reads
NEIGHBOURS_READ = 32  # in-neighbours per sampled endpoint the estimate compares
ALREADY_LOCAL = 0.5  # sampled local fraction at which the given order is kept
SHARED_NEIGHBOUR_MIN = 0.1  # sampled fraction with a common in-neighbour below which no order pays
ORDER_METHOD = "METIS partition"
PARTITION_EDGES_PER_NODE = 5  # edges per node (sampled) that the partition reads at most

T = TypeVar("T")


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
              from_graph: frozenset[str] = frozenset(), allocate: Allocate | None = None
              ) -> tuple[Graph, dict[str, np.ndarray]]:
        """The laid-out graph (built once per graph) and the inputs in its order; inputs named in
        ``from_graph`` were read from the graph and are taken from its laid-out copy. The relabelled
        inputs are written into arrays from ``allocate(shape, dtype)`` when given (a backend's pool:
        no fresh pages per call)."""
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
                array = take_rows(array, self.nodes.perm, _target(allocate, array))
            elif domain is Domain.EDGE and not input_types[name].rowset and self.edge_perm is not None:
                array = take_rows(array, self.edge_perm, _target(allocate, array))
            moved[name] = array
        return laid_out, moved

    def restore(self, outputs: dict[str, np.ndarray], types: Mapping[str, TensorType],
                allocate: Allocate | None = None) -> dict[str, np.ndarray]:
        """The outputs back in the caller's node and edge order (row k of a laid-out output goes back
        to row ``perm[k]``), written into arrays from ``allocate(shape, dtype)`` when given."""
        from mpdsl.backends import put_rows

        restored = {}
        for name, array in outputs.items():
            domain = types[name].domain
            if domain is Domain.NODE and self.nodes is not None:
                array = put_rows(array, self.nodes.perm, _target(allocate, array))
            elif domain is Domain.EDGE and not types[name].rowset and self.edge_perm is not None:
                array = put_rows(array, self.edge_perm, _target(allocate, array))
            restored[name] = array
        return restored


Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]


def _target(allocate: Allocate | None, like: np.ndarray) -> np.ndarray | None:
    """An array for a relabelled copy of ``like`` from ``allocate`` (None: the copy allocates its own)."""
    return None if allocate is None else allocate(like.shape, like.dtype)


@dataclass(frozen=True)
class LocalityEstimate:
    """What a sample of edges says about the given node order, read before any order is computed:
    ``local`` is the fraction of the sampled edges that are already local (see ``locality``),
    ``shared`` the fraction whose endpoints have an in-neighbour in common (the community structure
    that a partition turns into locality). ``entries_read`` counts the CSR entries the estimate
    read: at most ``2 * NEIGHBOURS_READ`` per sampled edge, whatever the graph's size."""

    sampled_edges: int
    local: float
    shared: float
    entries_read: int
    seconds: float

    def describe(self) -> str:
        return (f"{self.sampled_edges} sampled edges: {self.local:.0%} local, {self.shared:.0%} with a common "
                f"in-neighbour (estimated in {self.seconds * 1e3:.0f} ms)")


@dataclass
class LayoutDecision:
    """The node-order decision for a graph: the order (None: as given), why, and what it cost
    (``deciding_seconds``: the estimate; ``ordering_seconds``: computing the order, 0 when none
    was computed)."""

    order: NodeOrder | None
    reason: str
    estimate: LocalityEstimate | None = None
    deciding_seconds: float = 0.0
    ordering_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.deciding_seconds + self.ordering_seconds

    def summary(self) -> str:
        """One line for a run's timing summary."""
        if self.order is not None:
            return (f"nodes reordered ({ORDER_METHOD}, decided in {self.deciding_seconds * 1e3:.0f} ms, "
                    f"ordered in {self.ordering_seconds * 1e3:.0f} ms)")
        return f"nodes as given (decided in {self.seconds * 1e3:.0f} ms)"


def locality(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> float:
    """Fraction of edges whose endpoints' ids are within N / LOCALITY_WINDOW of each other."""
    if len(src) == 0:
        return 1.0
    return float(np.mean(np.abs(src - dst) < max(1, num_nodes // LOCALITY_WINDOW)))


def sample_edges(num_edges: int, sample: int = SAMPLE_EDGES) -> np.ndarray:
    """Positions of ``min(sample, num_edges)`` edges drawn with a fixed seed (the same graph gets
    the same decision in every process)."""
    if num_edges <= sample:
        return np.arange(num_edges)
    return np.random.default_rng(0).integers(0, num_edges, sample)


def estimate_locality(graph: Graph, sample: int = SAMPLE_EDGES) -> LocalityEstimate:
    """The ``LocalityEstimate`` of ``graph`` from ``sample`` edges: O(sample) work on the graph's
    CSR by destination when it is built, else one pass over the edges (``Graph.csr_by_dst_of``
    the sampled endpoints: a relabelled graph builds its own CSR, so the estimate does not build
    this one)."""
    start = time.perf_counter()
    picked = sample_edges(graph.num_edges, sample)
    src, dst = graph.src[picked], graph.dst[picked]
    indptr, perm = graph.csr_by_dst_of(np.concatenate([src, dst]))
    all_src = graph.src

    def in_neighbours(nodes: np.ndarray, pad: int) -> tuple[np.ndarray, int]:
        """[len(nodes), NEIGHBOURS_READ] in-neighbour ids (the first ones in CSR order), ``pad`` where
        a node has fewer, and the number of entries read."""
        first = indptr[nodes]
        count = np.minimum(indptr[nodes + 1] - first, NEIGHBOURS_READ)
        slot = np.arange(NEIGHBOURS_READ)
        present = slot < count[:, None]
        at = np.where(present, first[:, None] + slot, 0)
        ids = np.where(present, all_src[perm[at]], pad)
        return ids, int(count.sum())

    # A common in-neighbour w of an edge u -> v, other than u and v themselves: the two sides'
    # padding and excluded entries (-1, -2) never match.
    near_src, read_src = in_neighbours(src, -1)
    near_dst, read_dst = in_neighbours(dst, -2)
    near_src = np.where((near_src == src[:, None]) | (near_src == dst[:, None]), -1, near_src)
    near_dst = np.where((near_dst == src[:, None]) | (near_dst == dst[:, None]), -2, near_dst)
    common = (near_src[:, :, None] == near_dst[:, None, :]).any(axis=(1, 2))
    shared = float(common.mean()) if len(picked) else 0.0
    return LocalityEstimate(len(picked), locality(src, dst, graph.num_nodes), shared, read_src + read_dst,
                            time.perf_counter() - start)


def symmetric_adjacency(src: np.ndarray, dst: np.ndarray, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) int32 of the undirected simple graph of the edges: both directions, no self
    loops, no repeated neighbours (the form METIS takes)."""
    import scipy.sparse as sp

    keep = src != dst
    a = sp.csr_matrix((np.ones(int(keep.sum()), dtype=bool), (src[keep], dst[keep])), shape=(num_nodes, num_nodes))
    both = (a + a.T).tocsr()
    return both.indptr.astype(np.int32), both.indices.astype(np.int32)


def overlapped(work: Callable[[], T], meanwhile: Callable[[], object] | None) -> T:
    """``work()``, run on a worker thread while ``meanwhile()`` runs on this one (``work()`` here
    without it); returns once both are done. For work that releases the GIL (``metis.part_graph``)."""
    if meanwhile is None:
        return work()
    with ThreadPoolExecutor(1, thread_name_prefix="mpdsl-order") as pool:
        result = pool.submit(work)
        meanwhile()
        return result.result()


def community_order(src: np.ndarray, dst: np.ndarray, num_nodes: int,
                    meanwhile: Callable[[], object] | None = None) -> np.ndarray:
    """Nodes sorted by their part in a METIS k-way partition into ``LOCALITY_WINDOW`` parts (fixed
    seed; ties by id), so that nodes which share neighbours get nearby ids and an edge inside a
    part is local. METIS partitions at most ``PARTITION_EDGES_PER_NODE * N`` of the edges (a
    fixed-seed sample: the communities show as well in it, at a fraction of the time). Graphs of
    fewer than ``4 * LOCALITY_WINDOW`` nodes keep the given order. ``meanwhile`` runs on this
    thread while METIS works on another (``overlapped``)."""
    parts = LOCALITY_WINDOW if num_nodes >= 4 * LOCALITY_WINDOW else 0
    if parts < 2:
        return np.arange(num_nodes)
    from mpdsl.metis import part_graph

    kept = PARTITION_EDGES_PER_NODE * num_nodes
    if len(src) > kept:
        picked = np.random.default_rng(0).random(len(src)) < kept / len(src)
        src, dst = src[picked], dst[picked]
    indptr, indices = symmetric_adjacency(src, dst, num_nodes)
    part = overlapped(lambda: part_graph(indptr, indices, parts, seed=0), meanwhile)
    return np.lexsort((np.arange(num_nodes), part))


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
    """``inverse[perm[k]] = k``."""
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(len(perm))
    return inverse


def _order_from_perm(perm: np.ndarray) -> NodeOrder:
    return NodeOrder(perm, inverse_permutation(perm))


def decide_node_order(graph: Graph, mode: str, sample: int = SAMPLE_EDGES,
                      meanwhile: Callable[[], object] | None = None) -> LayoutDecision:
    """Whether to relabel ``graph``'s nodes, decided from ``estimate_locality`` before any order is
    computed ("auto"): small graphs, graphs already local and graphs without community structure
    keep their order; otherwise the ``community_order`` is computed and kept if it makes the
    sampled edges local. "reorder" computes the order whatever the estimate; "none" keeps the order.
    ``meanwhile`` (a caller's set-up that needs no order) runs while the order is computed."""
    n = graph.num_nodes
    if mode == "none":
        return LayoutDecision(None, "node reordering disabled")
    if mode == "auto" and n < REORDER_MIN_NODES:
        return LayoutDecision(None, f"no reordering: {n} nodes is below {REORDER_MIN_NODES} (features stay in cache)")
    estimate = estimate_locality(graph, sample)
    seen = f"estimate from {estimate.describe()}"
    if mode == "auto" and estimate.local >= ALREADY_LOCAL:
        return LayoutDecision(None, f"no reordering: {seen}; already local", estimate, estimate.seconds)
    if mode == "auto" and estimate.shared < SHARED_NEIGHBOUR_MIN:
        return LayoutDecision(None, f"no reordering: {seen}; under {SHARED_NEIGHBOUR_MIN:.0%} share one, so no "
                                    "community structure for an order to exploit", estimate, estimate.seconds)
    start = time.perf_counter()
    order = _order_from_perm(community_order(graph.src, graph.dst, n, meanwhile))
    ordering = time.perf_counter() - start
    picked = sample_edges(graph.num_edges, sample)
    after = locality(order.inverse[graph.src[picked]], order.inverse[graph.dst[picked]], n)
    cost = f"{ORDER_METHOD} order computed in {ordering * 1e3:.0f} ms"
    if mode == "auto" and not (after >= 2 * estimate.local and after >= 0.3):
        return LayoutDecision(None, f"no reordering: {seen}; the {cost} would make {after:.0%} of them local; "
                                    "not worth it", estimate, estimate.seconds, ordering)
    return LayoutDecision(order, f"nodes reordered by {ORDER_METHOD}: {seen}; {cost} (once per graph); sampled "
                                 f"local edges {estimate.local:.0%} -> {after:.0%}", estimate, estimate.seconds,
                          ordering)


def fixed_order_reason(program: Program) -> str | None:
    """Why ``program`` runs its graph in the given order whatever the layout mode (None: it need not):
    a program with edge sets besides the graph's edges (their values, and the loops a derived set
    adds in node order, are not relabelled)."""
    typed = sorted({v.type.rowset for v in program.values if v.type.domain is Domain.NODE and v.type.rowset})
    if typed:
        return (f"the program reads node types ({', '.join(typed)}): the graph runs in its given order (no node "
                "reordering, no edge sorting)")
    if not program.edge_sets:
        return None
    names = ", ".join(s.name for s in program.edge_sets)
    return (f"the program reads edge sets besides the graph's edges ({names}): the graph runs in its given "
            "order (no node reordering, no edge sorting)")


def choose_layout(graph: Graph, program: Program, mode: str,
                  meanwhile: Callable[[], object] | None = None) -> GraphLayout | None:
    """The layout to run ``program`` on ``graph`` with (None: as given); decisions cached per graph.
    ``meanwhile`` runs while a node order is computed, when one is (``decide_node_order``)."""
    fixed, graph_ops, per_edge_by_dst, row_bytes = _layout_facts(program)
    if fixed or not graph_ops or graph.num_nodes == 0:
        return None
    few_rows = _reads_too_few_rows(graph, mode, row_bytes)
    return graph.cached(("layout", mode, per_edge_by_dst, few_rows),
                        lambda: _decide_layout(graph, mode, per_edge_by_dst, row_bytes, meanwhile))


def gathered_row_bytes(program: Program) -> int:
    """Bytes per node that the program's graph ops read through edges, summed over the ops (each
    its widest node operand's row): what a node order makes local at every call, against the one
    relabelling pass per input and output. 0 when a width is symbolic."""
    total = 0
    for v in program.values:
        if not OPS[v.op].has(Trait.GRAPH):
            continue
        widest = 0
        for o in v.operands:
            if o.type.domain is Domain.NODE:
                if not all(d.is_static for d in o.type.shape):
                    return 0
                widest = max(widest, _size(o.type, {}) * ITEMSIZE[o.type.dtype])
        total += widest
    return total


def _reads_too_few_rows(graph: Graph, mode: str, row_bytes: int) -> bool:
    """Whether "auto" keeps ``graph``'s order for a program reading ``row_bytes`` of node rows per
    node: under ``REORDER_MIN_BYTES`` per call."""
    return mode == "auto" and 0 < graph.num_nodes * row_bytes < REORDER_MIN_BYTES


def node_order_for(graph: Graph, mode: str, row_bytes: int,
                   meanwhile: Callable[[], object] | None = None) -> LayoutDecision:
    """The node-order decision for a program reading ``row_bytes`` of node rows per node
    (``gathered_row_bytes``): the graph's order kept under ``REORDER_MIN_BYTES`` per call, else
    ``node_order``."""
    if _reads_too_few_rows(graph, mode, row_bytes):
        total = graph.num_nodes * row_bytes
        return graph.cached(("node_order", mode, "few rows"), lambda: LayoutDecision(
            None, f"no reordering: the graph ops read {row_bytes} bytes of node rows per node, "
                  f"{_fmt_bytes(total)} per call, under {_fmt_bytes(REORDER_MIN_BYTES)}: relabelling each call's "
                  "inputs and outputs would cost more than the locality gains"))
    return node_order(graph, mode, meanwhile)


_LAYOUT_FACTS: dict[int, tuple[Program, tuple[bool, bool, bool, int]]] = {}


def _layout_facts(program: Program) -> tuple[bool, bool, bool, int]:
    """(the program runs its graph in the given order (``fixed_order_reason``), it has graph ops, it
    reduces edge values by destination, ``gathered_row_bytes``), kept per program (immutable; a
    batch loop asks at each call)."""
    known = _LAYOUT_FACTS.get(id(program))
    if known is not None and known[0] is program:
        return known[1]
    facts = (fixed_order_reason(program) is not None, any(OPS[v.op].has(Trait.GRAPH) for v in program.values),
             any(OPS[v.op].has(Trait.EDGE_ORDER) and v.attr["by"] == "dst"
                 and any(o.type.domain is Domain.EDGE for o in v.operands) for v in program.values),
             gathered_row_bytes(program))
    if len(_LAYOUT_FACTS) >= 256:
        _LAYOUT_FACTS.clear()
    _LAYOUT_FACTS[id(program)] = (program, facts)
    return facts


def node_order(graph: Graph, mode: str, meanwhile: Callable[[], object] | None = None) -> LayoutDecision:
    """``decide_node_order``, cached per graph and mode."""
    return graph.cached(("node_order", mode), lambda: decide_node_order(graph, mode, meanwhile=meanwhile))


def decided_node_order(graph: Graph, mode: str) -> LayoutDecision | None:
    """The node-order decision a run made for ``graph`` in ``mode`` (``node_order_for``; None: none
    was; nothing is computed)."""
    return graph.cached_only(("node_order", mode)) or graph.cached_only(("node_order", mode, "few rows"))


def _decide_layout(graph: Graph, mode: str, per_edge_by_dst: bool, row_bytes: int,
                   meanwhile: Callable[[], object] | None) -> GraphLayout | None:
    nodes = node_order_for(graph, mode, row_bytes, meanwhile)
    reasons = [nodes.reason]
    edge_perm = None
    if mode != "none" and per_edge_by_dst and graph.num_edges and (mode != "auto" or graph.num_edges >= SORT_MIN_EDGES):
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


def _subscript_flops(v: Value, count: int, rows: int, width: int, dims: Mapping[str, int]) -> int:
    """An einsum or a row contraction: per row and combination of its letters' indices, a product of
    the operands and a sum (one operation per operand); ``rows``: the rows summed or kept."""
    inputs, _ = parse_subscripts(v.attr["spec"])
    sizes = {letter: d.substitute(dims).value for term, o in zip(inputs, v.operands)
             for letter, d in zip(term, o.type.shape)}
    return rows * int(np.prod(list(sizes.values()), dtype=np.int64)) * len(v.operands)


def _no_flops(v: Value, count: int, edges: int, width: int, dims: Mapping[str, int]) -> int:
    return 0


def _per_element_flops(v: Value, count: int, edges: int, width: int, dims: Mapping[str, int]) -> int:
    return count * max(1, len(v.operands))


def _pair_flops(per_pair):
    """The FLOPs of a global attention op (``Trait.GRAPH_PAIRS``: its ``edges`` are the same-graph node
    pairs): ``per_pair(K, D)`` per pair and head, with q node[H, K] and v node[H, D]."""
    def rule(v: Value, count: int, pairs: int, width: int, dims: Mapping[str, int]) -> int:
        heads, keys = (d.substitute(dims).value for d in v.operands[0].type.shape)
        return pairs * heads * per_pair(keys, v.operands[2].type.shape[1].substitute(dims).value)
    return rule


def node_pairs(rows: Mapping) -> int:
    """The same-graph node pairs of a batch known by its row counts only (``rows_on``): N^2 / G, exact
    for graphs of one size (a batch of unequal sizes has more: ``graph_pairs``)."""
    return rows_on(rows, Space(Domain.NODE)) ** 2 // max(1, rows_on(rows, Space(Domain.GRAPH)))


def graph_pairs(graph: Graph) -> int:
    """The same-graph node pairs (i, j) of ``graph``'s batch, i == j included: the sum of the squared
    graph sizes, the work of a global attention."""
    sizes = np.diff(graph.segments_by_graph()[0])
    return int(np.dot(sizes, sizes))


# Floating-point operations per op: (value, result elements, edges, result row width, dims) -> FLOPs.
# Ops absent here fall back on their traits (elementwise and row-wise: one per result element and
# operand); an op with neither is a MissingRule. For ops with ``Trait.GRAPH_PAIRS`` the edges are the
# same-graph node pairs.
FLOP_RULES = {
    "input": _no_flops, "param": _no_flops, "const": _no_flops, "degree": _no_flops,
    "arange": _per_element_flops, "linspace": _per_element_flops,  # one multiply-add per element
    "gather": _no_flops, "select": _no_flops, "reshape": _no_flops, "take": _no_flops, "one_hot": _no_flops,
    "matmul": _matmul_flops,
    "gspmm": lambda v, count, edges, width, dims: (2 if len(v.operands) == 2 else 1) * edges * width,
    "match_gspmm": lambda v, count, edges, width, dims: (2 if len(v.operands) == 3 else 1) * edges * width,
    "attention": lambda v, count, edges, width, dims: 2 * edges * width + 6 * edges * _size(v.operands[0].type, dims),
    # max, exp and sum per score element
    "segment_logsumexp": lambda v, count, edges, width, dims: 3 * edges * _size(v.operands[0].type, dims),
    # the dot product per edge over x's features, then exp, subtract and scale per score element
    "attention_score_grad": lambda v, count, edges, width, dims: (2 * edges * _size(v.operands[2].type, dims)
                                                                  + 4 * edges * width),
    # exp per score element, multiply-add per feature
    "attention_value_grad": lambda v, count, edges, width, dims: (2 * edges * width
                                                                  + 2 * edges * _size(v.operands[0].type, dims)),
    "typed_linear": _typed_linear_flops,
    # per pair and head: the score (2K), the running max, exp, sum and rescale (4), the weighted sum (2D)
    "global_attention": _pair_flops(lambda k, d: 2 * k + 2 * d + 4),
    # the score and p (2K + 2), dp = <g_i, v_j> (2D), ds (2), dq += ds k_j (2K)
    "global_attention_query_grad": _pair_flops(lambda k, d: 4 * k + 2 * d + 4),
    # as the query pass, and dv += p g_i (2D)
    "global_attention_key_grad": _pair_flops(lambda k, d: 4 * k + 4 * d + 4),
    # a mean / sum fill sums the rows of the base set's edges per node (counted on the derived set's edges)
    "carry": lambda v, count, edges, width, dims: 0 if v.attr["fill"] == "constant" else edges * width,
    "carry_grad": lambda v, count, edges, width, dims: 0 if v.attr["fill"] == "constant" else edges * width,
    "aggregate": lambda v, count, edges, width, dims: edges * width,
    "softmax": _per_element_flops, "batch_norm": _per_element_flops,
    # counted over the rows each keeps (einsum) or sums (contract_rows: op_edges gives them)
    "einsum": lambda v, count, edges, width, dims: _subscript_flops(v, count, count // max(1, width), width, dims),
    "contract_rows": _subscript_flops,
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


def rows_on(rows: Mapping, space: Space) -> int:
    """The rows of ``space`` in a row count table keyed by ``Space`` (``space_rows``), or by ``Domain``
    for the graph's own rows."""
    if space in rows:
        return rows[space]
    if space.name:
        raise MissingRule(f"the row counts have no entry for {space}")
    return rows[space.domain]


def op_edges(v: Value) -> Space:
    """The edges an op's cost is counted over: an aggregation's operand rows, the rows a sum over
    rows (``Trait.ROW_SUM``) sums, else its edge set."""
    if v.op == "aggregate":
        return v.operands[0].type.space
    if OPS[v.op].has(Trait.ROW_SUM):
        return next(o.type.space for o in v.operands if o.type.domain is not Domain.PARAM)
    if v.op in ("carry", "carry_grad"):
        return v.type.space
    return Space(Domain.EDGE, v.attr.get("edges", ""))


def op_cost(v: Value, rows: Mapping, dims: Mapping[str, int], itemsize: int,
            pairs: int | None = None) -> OpCost:
    """Bytes the op materialises (its result) and its floating-point operations; ``rows``: the rows of
    each space (``space_rows``; for a program on the graph's own edges, keys by ``Domain`` do);
    ``pairs``: the batch's same-graph node pairs (``graph_pairs``; None: ``node_pairs`` of the rows)."""
    if not runs_a_kernel(v):
        return OpCost(v, 0, 0)
    width = _size(v.type, dims)
    count = rows_on(rows, v.type.space) * width
    if OPS[v.op].has(Trait.GRAPH_PAIRS):
        edges = node_pairs(rows) if pairs is None else pairs
    else:
        edges = rows_on(rows, op_edges(v))
    flops = flop_rule(v.op)(v, count, edges, width, dims)
    return OpCost(v, count * (8 if v.type.dtype == "i64" else itemsize), flops)


def program_costs(program: Program, rows: Mapping, dims: Mapping[str, int],
                  pairs: int | None = None) -> list[OpCost]:
    itemsize = ITEMSIZE[program.float_dtype]
    return [op_cost(v, rows, dims, itemsize, pairs) for v in program.values]


def _fmt_bytes(n: int) -> str:
    size: float = n
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


def _fmt_flops(n: int) -> str:
    return f"{n / 1e9:.3f} GFLOP" if n >= 1e7 else f"{n / 1e6:.3f} MFLOP"


ASSUMED_NODES, ASSUMED_EDGES = 100_000, 1_000_000  # the plan's sizes when no graph is given


def space_rows(program: Program, graph=None) -> dict[Space, int]:
    """The rows of every space ``program``'s values live on: a ``Graph``'s (edge sets resolved and
    derived sets built, once per graph), a graph of given sizes (``num_nodes``, ``num_edges``,
    ``num_graphs`` and ``edge_set_rows``: the rows of each edge set by name), or without a graph the
    plan's assumed sizes (an input edge set as many edges as the graph, a self-loop set its base's
    plus one loop per node, a k-hop set its base's times the hops, at most one per pair of nodes)."""
    from mpdsl.backends import edge_graph

    if graph is None:
        rows = {Space(Domain.NODE): ASSUMED_NODES, Space(Domain.EDGE): ASSUMED_EDGES, Space(Domain.GRAPH): 1}
        for s in program.edge_sets:
            base = rows[Space(Domain.EDGE, s.base)]
            rows[Space(Domain.EDGE, s.name)] = (ASSUMED_EDGES if s.kind == "input"
                                                else min(base * s.hops, ASSUMED_NODES ** 2) if s.kind == "k_hop"
                                                else base + ASSUMED_NODES)
    else:
        rows = {Space(Domain.NODE): graph.num_nodes, Space(Domain.EDGE): graph.num_edges,
                Space(Domain.GRAPH): graph.num_graphs}
        for s in program.edge_sets:
            rows[Space(Domain.EDGE, s.name)] = (edge_graph(graph, program, s.name).num_edges
                                                if isinstance(graph, Graph) else graph.edge_set_rows[s.name])
    for space in program.row_spaces:
        if space.domain is Domain.NODE and space.name and space not in rows:
            rows[space] = (ASSUMED_NODES if graph is None or not hasattr(graph, "num_type_nodes")
                           else graph.num_type_nodes(space.name))
    rows[Space(Domain.PARAM)] = 1
    return rows


def _plan_rows(program: Program, graph: Graph | None) -> tuple[dict[Space, int], int, str]:
    """Rows per space the plan is sized for, the same-graph node pairs (``graph_pairs``) and the line
    saying so."""
    rows = space_rows(program, graph)
    pairs = node_pairs(rows) if graph is None else graph_pairs(graph)
    sets = "".join(f", {rows[Space(Domain.NODE, t)]} nodes of type {t}" for t in program.node_types
                   if Space(Domain.NODE, t) in rows)
    sets += "".join(f", {rows[Space(Domain.EDGE, s.name)]} edges of {s.name}" for s in program.edge_sets)
    if graph is not None:
        return rows, pairs, (f"graph: {graph.num_nodes} nodes, {graph.num_edges} edges, {graph.num_graphs} graph(s)"
                      + sets)
    return rows, pairs, (f"graph: none given; figures for {ASSUMED_NODES} nodes, {ASSUMED_EDGES} edges, 1 graph{sets} "
                  "(pass --graph for real ones)")


def _kernel_table(program: Program, costs: list[OpCost], marks: Mapping[int, str] | None = None) -> list[str]:
    """One line per kernel of ``program``: op, result (name and type), layout, bytes out, FLOPs, and
    the mark of the value in ``marks`` (by id), if any."""
    names = value_names(program)
    lines = [f"{'kernel':<8} {'op':<14} {'result':<24} {'layout':<9} {'bytes out':>11} {'flops':>15}"]
    kernel = 0
    for c in costs:
        v = c.value
        if not runs_a_kernel(v):
            continue
        kernel += 1
        layout = v.attr.get("layout", f"csr_{v.attr['by']}" if v.attr.get("by") in ("src", "dst")
                            and OPS[v.op].has(Trait.GRAPH) else "-")
        if v.attr.get("edges"):  # the edge set a graph op runs over (the graph's own edges: not named)
            layout = f"({v.attr['edges']})" if layout == "-" else f"{layout} ({v.attr['edges']})"
        mark = f"  {marks[id(v)]}" if marks and id(v) in marks else ""
        lines.append(f"{kernel:<8} {v.op:<14} {names[v] + ' ' + str(v.type):<24} {layout:<9} "
                     f"{_fmt_bytes(c.bytes_out):>11} {_fmt_flops(c.flops):>15}{mark}")
    return lines


def _totals(costs: list[OpCost]) -> tuple[int, int, int, int]:
    """(kernels, bytes materialised, of which per-edge, FLOPs)."""
    kernels = sum(1 for c in costs if runs_a_kernel(c.value))
    edge_bytes = sum(c.bytes_out for c in costs if c.value.type.domain is Domain.EDGE)
    return kernels, sum(c.bytes_out for c in costs), edge_bytes, sum(c.flops for c in costs)


def _totals_table(reference: tuple[int, int, int, int], optimized: tuple[int, int, int, int]) -> list[str]:
    rk, rb, re_, rf = reference
    ok, ob, oe, of = optimized
    return [f"{'':<26} {'unoptimized':>14} {'optimized':>14}",
            f"{'kernels':<26} {rk:>14} {ok:>14}",
            f"{'bytes materialised':<26} {_fmt_bytes(rb):>14} {_fmt_bytes(ob):>14}",
            f"{'  of which per-edge':<26} {_fmt_bytes(re_):>14} {_fmt_bytes(oe):>14}",
            f"{'FLOPs':<26} {_fmt_flops(rf):>14} {_fmt_flops(of):>14}"]


def report(reference: Program, optimized: Program, notes: list[tuple[str, str]], dims: Mapping[str, int],
           graph: Graph | None, layout_reasons: list[str]) -> str:
    """The text of ``--emit plan``."""
    rows, pairs, sizes = _plan_rows(optimized, graph)
    dims_text = ", ".join(f"{k}={v}" for k, v in sorted(dims.items()))
    lines = [f"plan for @{optimized.name} ({dims_text})", sizes, ""]
    costs = program_costs(optimized, rows, dims, pairs)
    lines += _kernel_table(optimized, costs)
    lines += [""] + _totals_table(_totals(program_costs(reference, rows, dims, pairs)), _totals(costs))
    lines += ["", "decisions:"]
    for pass_name, text in notes:
        lines.append(f"  [{pass_name}] {text}")
    for reason in layout_reasons:
        lines.append(f"  [graph layout] {reason}")
    return "\n".join(lines) + "\n"


def training_report(gradient: Program, train_forward: Program, backward: Program, residuals: list[str],
                    wrt: list[str], dims: Mapping[str, int], graph: Graph | None) -> str:
    """The training step's part of ``--emit plan --training``: the kernel tables of the train-forward
    program (the outputs, and the residuals the backward reads, marked as such) and of the backward
    program (``d_<param>`` for ``wrt``), and their totals against ``gradient``, the unoptimized
    gradient program computing the same (forward values included)."""
    rows, pairs, sizes = _plan_rows(train_forward, graph)
    residual_values = {id(v): f"-> {name}" for name, v in train_forward.outputs if name in set(residuals)}
    forward_costs = program_costs(train_forward, rows, dims, pairs)
    backward_costs = program_costs(backward, rows, dims, pairs)
    lines = [f"training step of @{train_forward.name}: the gradient of every output with respect to "
             f"{', '.join(wrt) or 'nothing'}", sizes, "",
             f"train-forward (outputs, then {len(residuals)} residual(s) for the backward):"]
    lines += _kernel_table(train_forward, forward_costs, residual_values)
    saved = sum(c.bytes_out for c in forward_costs if id(c.value) in residual_values)
    saved_edges = sum(c.bytes_out for c in forward_costs
                      if id(c.value) in residual_values and c.value.type.domain is Domain.EDGE)
    lines += [f"residuals: {_fmt_bytes(saved)} (per-edge {_fmt_bytes(saved_edges)})", "", "backward:"]
    lines += _kernel_table(backward, backward_costs)
    step = _totals(forward_costs + backward_costs)
    lines += ["", "training step (train-forward + backward):"]
    lines += _totals_table(_totals(program_costs(gradient, rows, dims, pairs)), step)
    return "\n".join(lines) + "\n"
