"""The validated graph container that compiled models run on.

A ``Graph`` holds an ``edge_index`` (int64 [2, E]; row 0 = source j, row 1 = destination i of an
edge j -> i, as in PyTorch Geometric) plus named numpy arrays of three kinds:

* node arrays, one row per node (``x``, ``pos``, ``batch``, ``node_type``, ...);
* edge arrays, one row per edge (``edge_attr``, ``edge_type``, ``edge_weight``, ...);
* graph arrays, one row per graph of a batch (``graph_*``, graph-level ``y``).

Beside its edges a graph may carry further **edge sets** over the same nodes (candidate pairs for
link prediction, a k-hop edge list, ...): set ``S`` has an index ``S_index`` (int [2, K], the same
conventions as ``edge_index``) and its own arrays, one row per edge of the set (in a flat mapping,
the arrays called ``S`` or ``S_*``: PyG's ``edge_label_index`` and ``edge_label``). ``edge_set(S)``
is the graph seen through set S (its edges are S's, the node and graph arrays are shared), and
``derived(kind)`` the edge set derived from the graph's edges by PyG's self-loop utilities or its
TwoHop transform (``derived("k_hop", hops)``; ``mpdsl.ops.DERIVED_EDGE_SETS``), built once per graph
with its CSR orders.

Every problem with user-supplied arrays or files is a ``GraphError`` that names the array and
the first offending position. Arrays are stored read-only and derived layouts (CSR orderings,
degrees) are computed once and cached, so a ``Graph`` can be shared freely.

Only numpy is imported here; scipy, networkx, torch and torch_geometric are imported inside
the converters (and, scipy, the k-hop derivation) that need them.
"""

from __future__ import annotations

import operator
import os
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .diagnostics import GraphError
from .types import Domain, edge_set_relation

__all__ = ["CarryTable", "Graph", "derive_edges", "derive_k_hop", "edge_set_view", "k_hop_bytes", "resolve_edge_sets"]

INDEX_ARRAYS = {"batch": "node", "node_type": "node", "edge_type": "edge"}
"""Arrays holding non-negative integer ids (1-D), with the kind each must be."""

NAMED_FEATURES = frozenset({"x", "pos", "edge_attr", "edge_weight"})
"""Value arrays that must be numbers proper; other value arrays may also be boolean masks."""

RESERVED_NAMES = frozenset({"edge_index", "num_nodes"})
EDGE_SET_SUFFIX = "_index"  # edge set S is stored as S_index [2, K]

_KIND_PLURAL = {"node": "nodes", "edge": "edges", "graph": "graphs"}
_INT64_MAX = np.iinfo(np.int64).max
COUNTING_SORT_MIN = 1 << 18  # ids from which CSR grouping runs a compiled counting sort, not NumPy's sort


def classify_name(name: str, leading_dim: int | None, num_nodes: int) -> str:
    """The kind ("node", "edge" or "graph") an array called ``name`` belongs to.

    ``y`` is a node array when its leading dimension equals ``num_nodes``, else a graph array;
    every name not matched by a rule is a node array.
    """
    if name in ("x", "pos", "batch", "node_type") or name.startswith("node_"):
        return "node"
    if name in ("edge_attr", "edge_type", "edge_weight") or name.startswith("edge_"):
        return "edge"
    if name.startswith("graph_"):
        return "graph"
    if name == "y":
        return "node" if leading_dim == num_nodes else "graph"
    return "node"


def edge_set_of_name(name: str, array: np.ndarray | None = None) -> str | None:
    """The edge set ``S`` whose index an array called ``name`` is (``S_index``, integer [2, K]), else None."""
    if not name.endswith(EDGE_SET_SUFFIX) or name == "edge_index":
        return None
    if array is not None and (array.ndim != 2 or array.shape[0] != 2 or array.dtype.kind not in "iu"):
        return None
    set_name = name[:-len(EDGE_SET_SUFFIX)]
    return set_name if set_name.isidentifier() else None


def edge_set_member(name: str, sets: Iterable[str]) -> str | None:
    """The edge set (of ``sets``) an array called ``name`` belongs to: ``S`` itself or ``S_*`` (the
    longest such S), else None."""
    owners = [s for s in sets if name == s or (name.startswith(s + "_") and name != s + EDGE_SET_SUFFIX)]
    return max(owners, key=len) if owners else None


@dataclass
class _TypedParts:
    counts: dict[str, int]
    data: dict[str, dict[str, np.ndarray]]
    set_indices: dict[str, np.ndarray]
    set_arrays: dict[str, dict[str, np.ndarray]]
    ends: dict[str, tuple[str, str]]


def _typed_parts(arrays: dict[str, np.ndarray], known: Iterable[str] = ()) -> _TypedParts:
    """The node types and typed edge sets of flat arrays (an .npz), removed from ``arrays``: ``T__num_nodes``
    (scalar) declares node type T, ``T__<attr>`` are its arrays, ``SRC__S__DST_index`` is the typed edge set S
    from SRC to DST (its arrays ``S_*`` as any edge set's); ``known``: node types there already."""
    parts = _TypedParts({}, {}, {}, {}, {})
    for name in [n for n in arrays if n.endswith("__num_nodes")]:
        node_type = name[:-len("__num_nodes")]
        parts.counts[node_type] = _to_num_nodes(arrays.pop(name))
        parts.data[node_type] = {}
    types = set(parts.counts) | set(known)
    if not types:
        return parts
    for name in list(arrays):
        if name.endswith(EDGE_SET_SUFFIX) and name.count("__") >= 2:
            pieces = name[:-len(EDGE_SET_SUFFIX)].split("__")
            src, dst, set_name = pieces[0], pieces[-1], "__".join(pieces[1:-1])
            if src in types and dst in types:
                parts.set_indices[set_name] = arrays.pop(name)
                parts.ends[set_name] = (src, dst)
                continue
        node_type, _, attr = name.partition("__")
        if attr and node_type in types:
            parts.data.setdefault(node_type, {})[attr] = arrays.pop(name)
    for name in list(arrays):
        owner = edge_set_member(name, parts.set_indices)
        if owner is not None:
            parts.set_arrays.setdefault(owner, {})[name] = arrays.pop(name)
    return parts


def position_text(index: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(int(i)) for i in index) + "]"


def first_true(mask: np.ndarray) -> tuple[int, ...]:
    """Row-major index of the first True entry of a mask known to hold one."""
    return tuple(int(i) for i in np.unravel_index(int(np.flatnonzero(mask)[0]), mask.shape))


def _as_numpy(name: str, value: Any) -> np.ndarray:
    """``value`` as a numpy array (CPU torch tensors included, without importing torch)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise GraphError(
            f"{name} cannot be converted to a numpy array ({exc})",
            hint="give a rectangular numeric array",
        ) from None


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def _to_num_nodes(value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, np.ndarray) and value.dtype.kind not in "iu"):
        raise GraphError(f"num_nodes must be a non-negative integer, got {value!r}",
                         hint="pass the node count as an int")
    try:
        count = operator.index(value.item() if isinstance(value, np.ndarray) and value.ndim == 0
                               else value)
    except TypeError:
        raise GraphError(f"num_nodes must be a non-negative integer, got {value!r}",
                         hint="pass the node count as an int") from None
    if not 0 <= count <= _INT64_MAX:
        raise GraphError(f"num_nodes must be a non-negative integer, got {count}",
                         hint="pass the node count as an int >= 0")
    return count


def _coerce_edge_index(value: Any, name: str = "edge_index") -> np.ndarray:
    """``value`` as an integer [2, E] array (dtype not yet converted); range not yet checked."""
    edge_index = _as_numpy(name, value)
    no_edges = edge_index.size == 0 and edge_index.shape in ((0,), (2, 0))
    if no_edges and edge_index.dtype.kind in "biuf":  # `[]` converts to float64
        return np.zeros((2, 0), dtype=np.int64)
    if edge_index.dtype.kind not in "iu":
        hint = ("cast it with .astype(np.int64)" if edge_index.dtype.kind == "f"
                else f"{name} holds integer node indices")
        raise GraphError(f"{name} must hold integers, got dtype {edge_index.dtype}", hint=hint)
    if edge_index.ndim != 2 or edge_index.shape[0] != 2:
        hint = (f"an edge list of shape [E, 2] must be transposed: {name}.T"
                if edge_index.ndim == 2 and edge_index.shape[1] == 2
                else "row 0 holds sources, row 1 destinations")
        raise GraphError(f"{name} must have shape [2, E], got {tuple(edge_index.shape)}",
                         hint=hint)
    if edge_index.dtype.kind == "u" and edge_index.size and edge_index.max() > _INT64_MAX:
        pos = first_true(edge_index > _INT64_MAX)
        raise GraphError(f"{name}{position_text(pos)} = {edge_index[pos]} is too large",
                         hint="node indices run from 0 to num_nodes - 1")
    return edge_index


def _check_edge_range(edge_index: np.ndarray, num_nodes: int, name: str = "edge_index") -> np.ndarray:
    """The int64, C-contiguous ``edge_index`` after checking every index is in [0, num_nodes)."""
    if edge_index.dtype.kind == "i":
        negative = edge_index < 0
        if negative.any():
            pos = first_true(negative)
            raise GraphError(
                f"{name}{position_text(pos)} = {edge_index[pos]} is negative",
                hint="node indices run from 0 to num_nodes - 1",
            )
    too_large = edge_index >= num_nodes
    if too_large.any():
        pos = first_true(too_large)
        raise GraphError(
            f"{name}{position_text(pos)} = {edge_index[pos]} is out of range for "
            f"num_nodes={num_nodes}",
            hint="node indices run from 0 to num_nodes - 1; pass a larger num_nodes if the "
                 "graph has more nodes than its arrays show",
        )
    return np.ascontiguousarray(edge_index, dtype=np.int64)


def _check_typed_range(edge_index: np.ndarray, ends: tuple[str, str], counts: Mapping[str, int],
                       name: str) -> np.ndarray:
    """``_check_edge_range`` for a typed edge set: row 0 indexes nodes of type ``ends[0]``, row 1 of
    type ``ends[1]``."""
    for row, node_type in enumerate(ends):
        ids = edge_index[row]
        count = counts[node_type]
        bad = (ids < 0) | (ids >= count) if ids.dtype.kind == "i" else ids >= count
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            what = "is negative" if ids[pos] < 0 else f"is out of range for the {count} nodes of type {node_type}"
            raise GraphError(f"{name}[{row}, {pos}] = {ids[pos]} {what}",
                             hint=f"row {row} of {name} indexes the nodes of type {node_type}, 0 to {count - 1}")
    return np.ascontiguousarray(edge_index, dtype=np.int64)


def _coerce_array(name: str, value: Any, kind: str) -> np.ndarray:
    """``value`` as a numpy array after the checks that do not depend on the graph's sizes."""
    array = _as_numpy(name, value)
    if array.ndim == 0:
        raise GraphError(f"{name} is a scalar but {kind} arrays need one row per {kind}",
                         hint=f"give {name} a leading dimension of one row per {kind}")
    if name in INDEX_ARRAYS:
        return _coerce_index_array(name, array)
    dtype_kind = array.dtype.kind
    if dtype_kind not in "iuf" and not (dtype_kind == "b" and name not in NAMED_FEATURES):
        raise GraphError(f"{name} must hold real numbers, got dtype {array.dtype}",
                         hint=f"convert it, e.g. {name}.astype(np.float32)")
    if dtype_kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            pos = first_true(~finite)
            raise GraphError(f"{name}{position_text(pos)} is {array[pos]}",
                             hint="features must be finite (no NaN or infinity)")
    return array


def _coerce_index_array(name: str, array: np.ndarray) -> np.ndarray:
    if array.dtype.kind not in "iu":
        raise GraphError(f"{name} must hold integers, got dtype {array.dtype}",
                         hint=f"cast it with {name}.astype(np.int64)")
    if array.ndim != 1:
        raise GraphError(f"{name} must be 1-D, got shape {tuple(array.shape)}",
                         hint=f"flatten it with {name}.reshape(-1)")
    if array.dtype.kind == "i" and (array < 0).any():
        pos = first_true(array < 0)
        raise GraphError(f"{name}{position_text(pos)} = {array[pos]} is negative",
                         hint=f"{name} holds ids counted from 0")
    if array.size and array.dtype.kind == "u" and array.max() > _INT64_MAX:
        pos = first_true(array > _INT64_MAX)
        raise GraphError(f"{name}{position_text(pos)} = {array[pos]} is too large",
                         hint=f"{name} holds ids counted from 0")
    return array.astype(np.int64, copy=False)


def _check_rows(name: str, array: np.ndarray, kind: str, expected: int) -> None:
    if array.shape[0] != expected:
        raise GraphError(
            f"{name} has {array.shape[0]} rows but the graph has {expected} {_KIND_PLURAL[kind]}",
            hint=f"{kind} arrays need one row per {kind}",
        )


def _segments(ids: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr [count+1], perm) grouping positions of ``ids`` by id, stable within a group."""
    indptr = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(np.bincount(ids, minlength=count), out=indptr[1:])
    if not len(ids) or bool((ids[1:] >= ids[:-1]).all()):  # already grouped (a batch vector, edges by source)
        perm = np.arange(len(ids), dtype=np.int64)
    elif len(ids) >= COUNTING_SORT_MIN:  # one compiled counting pass: O(E), a third of a sort's time at 2M
        from mpdsl.backends.cpu_kernels import grouped_positions
        perm = grouped_positions(ids, indptr)
    elif count <= 1 << 16:  # ids fit 16 bits: NumPy's stable sort of them is a radix sort
        perm = np.argsort(ids.astype(np.uint16), kind="stable")
    elif count * len(ids) < _INT64_MAX:  # (id, position) keys are distinct: any sort of them is stable
        perm = np.argsort(ids * len(ids) + np.arange(len(ids)))
    else:
        perm = np.argsort(ids, kind="stable")
    perm = perm.astype(np.int64, copy=False)
    return _read_only(indptr), _read_only(perm)


@dataclass(frozen=True)
class CarryTable:
    """How the edges of a derived edge set (``derive_edges``) come from its base set's edges, for
    ``carry`` (edge values carried onto the set) and its transpose. ``origin[k]`` is the base edge
    that derived edge k is (-1 for a loop the set adds); ``added`` lists the added loops' positions and
    ``added_nodes`` their nodes; ``nonloop`` the base's non-loop edges (positions) and ``nonloop_dst``
    their destinations; ``nonloop_count`` the non-loop in-edges of each node; ``base_edges`` the
    base's edge count."""

    origin: np.ndarray
    kept: np.ndarray
    added: np.ndarray
    added_nodes: np.ndarray
    nonloop: np.ndarray
    nonloop_dst: np.ndarray
    nonloop_count: np.ndarray
    base_edges: int


def derive_edges(base: Graph, kind: str) -> tuple[np.ndarray, CarryTable]:
    """The edge index of the edge set ``kind`` derived from ``base``'s edges, and its ``CarryTable``,
    as PyTorch Geometric's utilities make it: both kinds are the base's non-loop edges in their order,
    then one loop (i, i) per node in node order; "self_loops" (remove_self_loops + add_self_loops)
    adds every loop, "remaining_self_loops" (add_remaining_self_loops) keeps a node's own loop in that
    place (its origin is the node's last loop in edge order, whose values the loop carries)."""
    if kind not in ("self_loops", "remaining_self_loops"):
        raise GraphError(f"unknown edge set derivation {kind!r}",
                         hint="self_loops or remaining_self_loops (k_hop: Graph.derived('k_hop', k))")
    n = base.num_nodes
    src, dst = base.src, base.dst
    is_loop = src == dst
    nonloop = np.flatnonzero(~is_loop).astype(np.int64)
    nodes = np.arange(n, dtype=np.int64)
    edge_index = np.concatenate([base.edge_index[:, nonloop], np.stack([nodes, nodes])], axis=1)
    loop_origin = np.full(n, -1, dtype=np.int64)
    if kind == "remaining_self_loops":
        loops = np.flatnonzero(is_loop)[::-1]  # the last loop of a node first: np.unique keeps it
        loop_nodes, first = np.unique(src[loops], return_index=True)
        loop_origin[loop_nodes] = loops[first]
    origin = np.concatenate([nonloop, loop_origin])
    added = np.flatnonzero(origin < 0).astype(np.int64)
    nonloop_dst = dst[nonloop]
    table = CarryTable(_read_only(origin), _read_only(np.flatnonzero(origin >= 0).astype(np.int64)),
                       _read_only(added), _read_only(added - len(nonloop)), _read_only(nonloop),
                       _read_only(nonloop_dst), _read_only(np.bincount(nonloop_dst, minlength=n).astype(np.int64)),
                       base.num_edges)
    return np.ascontiguousarray(edge_index), table


def _pattern(base: Graph) -> Any:
    """The base's edges as a boolean CSR matrix (row = source, column = destination), each pair once."""
    from scipy import sparse

    n = base.num_nodes
    matrix = sparse.csr_array((np.ones(base.num_edges, dtype=bool), (base.src, base.dst)), shape=(n, n))
    matrix.sum_duplicates()
    return matrix


def k_hop_bytes(base: Graph, hops: int, cap: int | None = None) -> tuple[int, int]:
    """(a bound on the pairs of ``derive_k_hop(base, hops)``, a bound on the bytes building it takes),
    from the base's degrees alone (no product is formed): a node's row of the t-th power has at most
    ``min(n, sum of its out-neighbours' rows of the (t-1)-th)`` entries, its row of the union at most n.
    The bytes count every live CSR matrix of a step at 8 bytes per column index and 1 per value (the
    largest power twice, the union twice) and the set's edge index and CSR orders (48 bytes a pair).
    The bound only grows with the hops: it stops as soon as its bytes pass ``cap``."""
    from scipy import sparse

    n = base.num_nodes
    if n == 0 or base.num_edges == 0:
        return 0, 0
    matrix = _pattern(base)
    adjacency = sparse.csr_array((np.ones(matrix.nnz), matrix.indices, matrix.indptr), shape=(n, n))
    power = np.diff(matrix.indptr).astype(np.float64)  # float: sums of up to n * E stay exact enough
    union = power.copy()
    largest = float(power.sum())

    def figures() -> tuple[int, int]:
        pairs = int(union.sum())
        return pairs, int(9 * (2 * largest + 2 * pairs) + 8 * (n + 1) * 4 + 48 * pairs)

    for _ in range(2, hops + 1):
        grown = np.minimum(adjacency @ power, n)
        widened = np.minimum(union + grown, n)
        largest = max(largest, float(grown.sum()))
        if np.array_equal(widened, union) and np.array_equal(grown, power):
            break  # a fixed point: no longer path widens the bound
        power, union = grown, widened
        if cap is not None and figures()[1] > cap:
            break
    return figures()


def derive_k_hop(base: Graph, hops: int, memory_limit: Any = None) -> np.ndarray:
    """The edge index of the k-hop set of ``base`` (``hops`` = k >= 1): the pairs (j, i) joined by a
    path of 1 to k of its edges, as PyTorch Geometric's ``TwoHop`` transform makes them for k = 2: the
    base's pattern (its own loops kept) united with those of its powers 2..k with their loops removed,
    each pair once, sorted by (source, destination) as ``coalesce`` sorts. Built with scipy sparse
    products, refused (``GraphError``) before it starts when ``k_hop_bytes`` is over the memory budget
    (``memory_limit``, else the budget in force)."""
    from . import memory

    if hops < 1:
        raise GraphError(f"a k-hop edge set needs a hop count >= 1, got {hops}", hint="k_hop(edge, 2): two hops")
    n = base.num_nodes
    allowed = memory.budget(memory_limit)
    pairs, needed = k_hop_bytes(base, hops, allowed.limit)
    if not allowed.allows(needed):
        raise GraphError(f"the {hops}-hop edge set of this graph ({n} nodes, {base.num_edges} edges) may have up to "
                         f"{pairs} pairs and needs about {memory.format_bytes(needed)} to build, over "
                         f"{allowed.describe()}",
                         hint="use fewer hops or a graph with fewer hubs (a node with d in-edges and d out-edges "
                              f"joins d * d pairs), or {memory.RAISE}")
    matrix = _pattern(base)
    union, power = matrix, matrix
    for _ in range(2, hops + 1):
        power = power @ matrix
        widened = union + power
        if widened.nnz == union.nnz:
            break  # no new pair: every longer path joins pairs already joined (union A^1..A^t is closed)
        union = widened
    union.sort_indices()
    src = np.repeat(np.arange(n, dtype=np.int64), np.diff(union.indptr))
    dst = union.indices.astype(np.int64)
    base_loop = np.zeros(n, dtype=bool)
    base_loop[base.src[base.src == base.dst]] = True
    keep = (src != dst) | base_loop[src]  # loops of the powers go (remove_self_loops), the base's stay
    return np.ascontiguousarray(np.stack([src[keep], dst[keep]]))


def resolve_edge_sets(graph: Graph, definitions: Iterable[Any], memory_limit: Any = None) -> dict[str, Graph]:
    """The graph seen through each edge set of a program (``definitions``: its ``EdgeSetDef``s, bases
    first): "" is ``graph``; an input set is ``graph.edge_set(name)``; a derived set is derived from
    its base's view (each built once per graph; a k-hop set within ``memory_limit``)."""
    views: dict[str, Graph] = {"": graph}
    for d in definitions:
        views[d.name] = edge_set_view(graph, views[d.base], d, memory_limit)
    return views


def edge_set_view(graph: Graph, base: Graph, definition: Any, memory_limit: Any = None) -> Graph:
    """The graph seen through the edge set of ``definition`` (an ``EdgeSetDef``): an input set that
    ``graph`` carries under its relation's name, or the set derived from ``base``, the view of its base
    set (a k-hop set within ``memory_limit``)."""
    if definition.kind == "input":
        return graph.edge_set(edge_set_relation(definition.name))
    return base.derived(definition.kind, definition.hops, memory_limit)


class _ClassOrInstance:
    """``Graph.batch(graphs)`` on the class concatenates graphs; ``graph.batch`` on an instance
    is that graph's batch vector. One name serves both, as the public API requires."""

    def __get__(self, instance: Graph | None, owner: type[Graph]) -> Any:
        if instance is None:
            return owner._batch_graphs
        return instance._batch_vector()


class Graph:
    """A validated graph: ``edge_index`` plus node, edge and graph arrays (see the module doc).

    ``num_nodes`` defaults to the row count of the node arrays, else to the largest index in
    ``edge_index`` plus one, else 0. Arrays are stored read-only; use ``with_data`` to derive a
    graph with more arrays.
    """

    __slots__ = (
        "__weakref__",
        "_cache",
        "_edge_data",
        "_edge_index",
        "_edge_sets",
        "_ends",
        "_graph_data",
        "_node_data",
        "_node_types",
        "_num_graphs",
        "_num_nodes",
        "_set_types",
        "_source",
    )

    def __init__(
        self,
        edge_index: Any,
        num_nodes: int | None = None,
        *,
        node_data: Mapping[str, Any] | None = None,
        edge_data: Mapping[str, Any] | None = None,
        graph_data: Mapping[str, Any] | None = None,
        edge_sets: Mapping[str, Any] | None = None,
        edge_set_data: Mapping[str, Mapping[str, Any]] | None = None,
        node_types: Mapping[str, int] | None = None,
        node_type_data: Mapping[str, Mapping[str, Any]] | None = None,
        edge_set_types: Mapping[str, tuple[str, str]] | None = None,
    ):
        """``edge_sets`` maps each further edge set's name to its index (int [2, K]); ``edge_set_data``
        maps a set's name to its arrays (one row per edge of the set). A typed (heterogeneous) graph
        has ``node_types`` (type name -> node count) with their arrays in ``node_type_data`` (type ->
        {array name: array with one row per node of the type}), and ``edge_set_types`` gives an edge
        set's (source type, destination type): its row 0 indexes nodes of the source type, row 1
        nodes of the destination type."""
        type_counts = {t: _to_num_nodes(n) for t, n in (node_types or {}).items()}
        for node_type in list(type_counts) + list(node_type_data or {}):
            if not isinstance(node_type, str) or not node_type.isidentifier() or "__" in node_type \
                    or node_type == "node":
                raise GraphError(f"node type names are identifiers other than 'node' without '__', got {node_type!r}",
                                 hint="name it like a variable, e.g. 'paper'")
            if node_type not in type_counts:
                raise GraphError(f"arrays are given for the node type {node_type} but not its node count",
                                 hint=f"pass node_types={{{node_type!r}: count}}")
        set_types = {k: (str(v[0]), str(v[1])) for k, v in (edge_set_types or {}).items()}
        for set_name, ends in set_types.items():
            if set_name not in (edge_sets or {}):
                raise GraphError(f"node types are given for the edge set {set_name} but not its index",
                                 hint=f"pass edge_sets={{{set_name!r}: index}} with its [2, K] index")
            for end in ends:
                if end not in type_counts:
                    raise GraphError(f"the edge set {set_name} joins the node type {end!r}, which the graph lacks",
                                     hint=f"its node types: {', '.join(type_counts) or 'none'}")
        type_arrays: dict[str, dict[str, np.ndarray]] = {}
        for node_type, arrays in (node_type_data or {}).items():
            type_checked = {}
            for name, value in arrays.items():
                where = f"{node_type}__{name}"
                array = _coerce_array(where, value, "node")
                if array.shape[0] != type_counts[node_type]:
                    raise GraphError(f"{where} has {array.shape[0]} rows but the graph has "
                                     f"{type_counts[node_type]} nodes of type {node_type}",
                                     hint=f"arrays of the node type {node_type} need one row per node of it")
                type_checked[name] = _read_only(array)
            type_arrays[node_type] = type_checked
        self._node_types = {t: (n, type_arrays.get(t, {})) for t, n in type_counts.items()}
        self._set_types = set_types
        self._ends: tuple[int, int] | None = None
        groups = {"node": dict(node_data or {}), "edge": dict(edge_data or {}),
                  "graph": dict(graph_data or {})}
        set_indices = dict(edge_sets or {})
        set_groups = {s: dict(arrays) for s, arrays in (edge_set_data or {}).items()}
        for set_name in list(set_indices) + list(set_groups):
            if not isinstance(set_name, str) or not set_name.isidentifier() or set_name == "edge":
                raise GraphError(f"edge set names are identifiers other than 'edge', got {set_name!r}",
                                 hint="name it like a variable, e.g. 'pairs'")
        for set_name in set_groups:
            if set_name not in set_indices:
                raise GraphError(f"arrays are given for the edge set {set_name} but not its index",
                                 hint=f"pass edge_sets={{{set_name!r}: index}} with its [2, K] index")
        seen: dict[str, str] = {f"{s}{EDGE_SET_SUFFIX}": f"edge set {s}'s index" for s in set_indices}
        for kind, arrays in [*groups.items(), *((f"edge set {s}", a) for s, a in set_groups.items())]:
            for name in arrays:
                if not isinstance(name, str) or not name:
                    raise GraphError(f"array names must be non-empty strings, got {name!r}")
                if name in RESERVED_NAMES:
                    raise GraphError(f"{name} cannot be a {kind} array",
                                     hint=f"pass {name} as its own argument")
                if name in seen:
                    raise GraphError(f"{name} is given as both a {seen[name]} and a {kind} array",
                                     hint="every array name must be unique")
                if INDEX_ARRAYS.get(name, kind) != kind and not (kind.startswith("edge set")
                                                                 and INDEX_ARRAYS[name] == "edge"):
                    raise GraphError(f"{name} must be a {INDEX_ARRAYS[name]} array, not a {kind} "
                                     "array")
                seen[name] = kind
                arrays[name] = _coerce_array(name, arrays[name], "edge" if kind.startswith("edge set") else kind)

        raw_edge_index = _coerce_edge_index(edge_index)
        if num_nodes is not None:
            count = _to_num_nodes(num_nodes)
        elif groups["node"]:
            count = next(iter(groups["node"].values())).shape[0]
        elif raw_edge_index.size:
            count = int(raw_edge_index.max()) + 1
        else:
            count = 0
        self._num_nodes = count
        self._edge_index = _read_only(_check_edge_range(raw_edge_index, count))
        self._edge_sets = {}
        for set_name, index in set_indices.items():
            where = f"{set_name}{EDGE_SET_SUFFIX}"
            if set_name in set_types:
                checked = _read_only(_check_typed_range(_coerce_edge_index(index, where), set_types[set_name],
                                                        type_counts, where))
            else:
                checked = _read_only(_check_edge_range(_coerce_edge_index(index, where), count, where))
            arrays = {k: _read_only(v) for k, v in set_groups.get(set_name, {}).items()}
            for name, array in arrays.items():
                if array.shape[0] != checked.shape[1]:
                    raise GraphError(f"{name} has {array.shape[0]} rows but the edge set {set_name} has "
                                     f"{checked.shape[1]} edges", hint=f"arrays of {set_name} need one row per edge "
                                     f"of {where}")
            self._edge_sets[set_name] = (checked, arrays)

        for name, array in groups["node"].items():
            _check_rows(name, array, "node", count)
        for name, array in groups["edge"].items():
            _check_rows(name, array, "edge", self.num_edges)
        batch = groups["node"].get("batch")
        if batch is None:
            self._num_graphs = 1
        else:
            self._num_graphs = int(batch.max()) + 1 if batch.size else 0
        for name, array in groups["graph"].items():
            _check_rows(name, array, "graph", self._num_graphs)

        self._node_data = {k: _read_only(v) for k, v in groups["node"].items()}
        self._edge_data = {k: _read_only(v) for k, v in groups["edge"].items()}
        self._graph_data = {k: _read_only(v) for k, v in groups["graph"].items()}
        self._cache: dict[str, Any] = {}
        self._source: str | None = None

    @classmethod
    def _trusted(cls, edge_index: np.ndarray, num_nodes: int, num_graphs: int,
                 groups: Mapping[str, Mapping[str, np.ndarray]], cache: Mapping[str, Any], *,
                 source: str | None = None) -> Graph:
        """A graph from arrays its caller has validated as the constructor would (the graph store):
        ``edge_index`` int64 [2, E] C-contiguous, ``groups`` {"node"|"edge"|"graph": arrays} with
        the right rows and dtypes. Arrays are kept as they are (memory maps stay memory maps: no
        copy, no scan); ``cache`` pre-fills the layouts; ``source`` is the directory a pickled graph
        is reopened from."""
        graph = cls.__new__(cls)
        graph._num_nodes = num_nodes
        graph._num_graphs = num_graphs
        graph._edge_index = _read_only(edge_index)
        graph._node_data = {k: _read_only(v) for k, v in groups["node"].items()}
        graph._edge_data = {k: _read_only(v) for k, v in groups["edge"].items()}
        graph._graph_data = {k: _read_only(v) for k, v in groups["graph"].items()}
        graph._edge_sets = {}
        graph._node_types = {}
        graph._set_types = {}
        graph._ends = None
        graph._cache = dict(cache)
        graph._source = source
        return graph

    def __reduce_ex__(self, protocol: Any) -> Any:
        """A memory-mapped graph pickles as its directory (a worker process reopens it: the stamp
        makes that cheap), never as a copy of its arrays; other graphs pickle as usual."""
        if self._source is not None:
            from .store import reopen

            return reopen, (self._source,)
        return super().__reduce_ex__(protocol)

    # ----------------------------------------------------------------------------------------
    # Construction from flat name -> array mappings

    @classmethod
    def from_arrays(
        cls,
        edge_index: Any,
        num_nodes: int | None = None,
        x: Any = None,
        edge_attr: Any = None,
        edge_type: Any = None,
        batch: Any = None,
        node_type: Any = None,
        y: Any = None,
        **extra: Any,
    ) -> Graph:
        """A graph from named arrays, each sorted into node/edge/graph data by its name
        (see ``classify_name``); arguments left as None are absent."""
        arrays = {"x": x, "edge_attr": edge_attr, "edge_type": edge_type, "batch": batch,
                  "node_type": node_type, "y": y, **extra}
        return cls._from_flat(edge_index, num_nodes,
                              {k: v for k, v in arrays.items() if v is not None})

    @classmethod
    def _from_flat(cls, edge_index: Any, num_nodes: Any, arrays: Mapping[str, Any]) -> Graph:
        arrays = {name: _as_numpy(name, value) for name, value in arrays.items()}
        typed = _typed_parts(arrays)
        # Edge sets first: S_index (integer [2, K]) is set S; the arrays called S or S_* are its arrays.
        set_indices = {}
        for name, array in list(arrays.items()):
            set_name = edge_set_of_name(name, array)
            if set_name is not None:
                set_indices[set_name] = arrays.pop(name)
        set_groups: dict[str, dict[str, np.ndarray]] = {}
        for name in list(arrays):
            owner = edge_set_member(name, set_indices)
            if owner is not None:
                set_groups.setdefault(owner, {})[name] = arrays.pop(name)
        if num_nodes is None:
            # Resolve num_nodes as the constructor would, so that `y` is classified against it.
            node_arrays = [a for n, a in arrays.items()
                           if n != "y" and a.ndim and classify_name(n, None, 0) == "node"]
            if node_arrays:
                num_nodes = node_arrays[0].shape[0]
            else:
                raw = _coerce_edge_index(edge_index)
                num_nodes = int(raw.max()) + 1 if raw.size else 0
        count = _to_num_nodes(num_nodes)
        groups: dict[str, dict[str, np.ndarray]] = {"node": {}, "edge": {}, "graph": {}}
        for name, array in arrays.items():
            leading = array.shape[0] if array.ndim else None
            groups[classify_name(name, leading, count)][name] = array
        set_indices.update(typed.set_indices)
        for set_name in typed.set_indices:
            set_groups.setdefault(set_name, {}).update(typed.set_arrays.get(set_name, {}))
        return cls(edge_index, count, node_data=groups["node"], edge_data=groups["edge"],
                   graph_data=groups["graph"], edge_sets=set_indices, edge_set_data=set_groups,
                   node_types=typed.counts, node_type_data=typed.data, edge_set_types=typed.ends)

    def with_data(self, **arrays: Any) -> Graph:
        """A new graph with ``arrays`` added; a name already present keeps its kind and is
        replaced, a new name is classified by ``classify_name``."""
        groups = {"node": dict(self._node_data), "edge": dict(self._edge_data),
                  "graph": dict(self._graph_data)}
        set_indices = {s: index for s, (index, _) in self._edge_sets.items()}
        set_groups = {s: dict(data) for s, (_, data) in self._edge_sets.items()}
        type_data = self.node_type_data
        type_counts = self.node_types
        set_types = dict(self._set_types)
        arrays = {name: _as_numpy(name, value) for name, value in arrays.items()}
        typed = _typed_parts(arrays, set(type_counts))  # node types and typed sets in the .npz names
        type_counts.update(typed.counts)
        for node_type, data in typed.data.items():
            type_data.setdefault(node_type, {}).update(data)
        set_indices.update(typed.set_indices)
        set_types.update(typed.ends)
        for typed_set, data in typed.set_arrays.items():
            set_groups.setdefault(typed_set, {}).update(data)
        for name, value in arrays.items():
            array = _as_numpy(name, value)
            set_name = edge_set_of_name(name, array)
            if set_name is not None:
                set_indices[set_name] = array
                continue
            owner = self._set_of(name) or edge_set_member(name, set_indices)
            if owner is not None:
                set_groups.setdefault(owner, {})[name] = value
                continue
            kind = self._kind_of(name)
            if kind is None:
                kind = classify_name(name, array.shape[0] if array.ndim else None,
                                     self._num_nodes)
            groups[kind][name] = value
        return type(self)(self._edge_index, self._num_nodes, node_data=groups["node"],
                          edge_data=groups["edge"], graph_data=groups["graph"], edge_sets=set_indices,
                          edge_set_data=set_groups, node_types=type_counts, node_type_data=type_data,
                          edge_set_types=set_types)

    # ----------------------------------------------------------------------------------------
    # Sizes and arrays

    @property
    def num_nodes(self) -> int:
        return self._num_nodes

    @property
    def num_edges(self) -> int:
        return self._edge_index.shape[1]

    def num_rows(self, domain: Domain) -> int:
        """The row count of a node, edge or graph value on this graph (edges: its own edges)."""
        return {Domain.NODE: self.num_nodes, Domain.EDGE: self.num_edges, Domain.GRAPH: self.num_graphs}[domain]

    @property
    def num_graphs(self) -> int:
        """``batch.max() + 1`` when a batch vector exists (0 for no nodes), else 1."""
        return self._num_graphs

    @property
    def edge_index(self) -> np.ndarray:
        """int64 [2, E], C-contiguous, read-only."""
        return self._edge_index

    @property
    def src(self) -> np.ndarray:
        """Source node of each edge (row 0 of ``edge_index``), int64 [E]."""
        return self._edge_index[0]

    @property
    def dst(self) -> np.ndarray:
        """Destination node of each edge (row 1 of ``edge_index``), int64 [E]."""
        return self._edge_index[1]

    @property
    def node_data(self) -> dict[str, np.ndarray]:
        return dict(self._node_data)

    @property
    def edge_data(self) -> dict[str, np.ndarray]:
        return dict(self._edge_data)

    @property
    def graph_data(self) -> dict[str, np.ndarray]:
        return dict(self._graph_data)

    # ----------------------------------------------------------------------------------------
    # Edge sets besides the graph's edges

    @property
    def edge_sets(self) -> dict[str, np.ndarray]:
        """The further edge sets this graph carries: name -> index (int64 [2, K], read-only)."""
        return {name: index for name, (index, _) in self._edge_sets.items()}

    @property
    def edge_set_data(self) -> dict[str, dict[str, np.ndarray]]:
        """The arrays of each further edge set: set name -> {array name: array}."""
        return {name: dict(data) for name, (_, data) in self._edge_sets.items()}

    def _set_of(self, name: str) -> str | None:
        return next((s for s, (_, data) in self._edge_sets.items() if name in data), None)

    def edge_set(self, name: str) -> Graph:
        """This graph seen through its edge set ``name`` (built once): a graph with the same nodes,
        node and graph arrays, whose edges are the set's (in its order) and whose edge arrays are the
        set's arrays; its CSR orders are cached on it. ``""`` is this graph itself."""
        if not name:
            return self
        if name not in self._edge_sets:
            have = ", ".join(self._edge_sets) or "none besides edge_index"
            raise GraphError(f"the graph carries no edge set {name!r} (its edge sets: {have})",
                             hint=f"add it as {name}{EDGE_SET_SUFFIX} [2, K] (Graph(..., edge_sets={{{name!r}: "
                                  "index}), or an array of that name in the .npz / PyG Data)")

        def build() -> Graph:
            index, data = self._edge_sets[name]
            view = self._view(index, data, {})
            if name in self._set_types:
                src, dst = self._set_types[name]
                view._ends = (self._node_types[src][0], self._node_types[dst][0])
            return view

        return self.cached(("edge_set", name), build)

    # ----------------------------------------------------------------------------------------
    # Node types (typed graphs)

    @property
    def node_types(self) -> dict[str, int]:
        """The node types of a typed graph: name -> node count (empty for a graph of one node set)."""
        return {t: n for t, (n, _) in self._node_types.items()}

    @property
    def node_type_data(self) -> dict[str, dict[str, np.ndarray]]:
        """The arrays of each node type: type -> {array name: array}."""
        return {t: dict(data) for t, (_, data) in self._node_types.items()}

    @property
    def edge_set_types(self) -> dict[str, tuple[str, str]]:
        """The typed edge sets: name -> (source node type, destination node type)."""
        return dict(self._set_types)

    def num_type_nodes(self, node_type: str) -> int:
        """The node count of ``node_type`` ("": the graph's own nodes)."""
        if not node_type:
            return self._num_nodes
        if node_type not in self._node_types:
            raise GraphError(f"the graph has no node type {node_type!r} (its node types: "
                             f"{', '.join(self._node_types) or 'none'})",
                             hint=f"give it with node_types={{{node_type!r}: count}} (PyG: HeteroData['{node_type}'])")
        return self._node_types[node_type][0]

    def type_array(self, node_type: str, name: str) -> np.ndarray | None:
        """The array of ``node_type`` a model input called ``name`` reads: the type's array ``name``,
        else, for ``name`` = ``<attr>_<type>`` (``x_paper``), the type's array ``attr``; None if neither."""
        data = self._node_types[node_type][1] if node_type in self._node_types else {}
        if name in data:
            return data[name]
        suffix = f"_{node_type}"
        if name.endswith(suffix) and name[:-len(suffix)] in data:
            return data[name[:-len(suffix)]]
        return None

    @property
    def num_src_nodes(self) -> int:
        """The node count its edges' sources index (a typed edge set's view: its source type's)."""
        return self._num_nodes if self._ends is None else self._ends[0]

    @property
    def num_dst_nodes(self) -> int:
        """The node count its edges' destinations index (a typed edge set's view: its destination type's)."""
        return self._num_nodes if self._ends is None else self._ends[1]

    def derived(self, kind: str, hops: int = 0, memory_limit: Any = None) -> Graph:
        """The edge set derived from this graph's edges by ``kind`` (``mpdsl.ops.DERIVED_EDGE_SETS``), as
        a graph with the same nodes (built once, with its CSR orders; see ``derive_edges``, and for
        "k_hop" with its hop count ``hops`` ``derive_k_hop``, refused over ``memory_limit``)."""
        def build() -> Graph:
            if kind == "k_hop":
                return self._view(derive_k_hop(self, hops, memory_limit), {}, {})
            if hops:
                raise GraphError(f"the edge set derivation {kind!r} takes no hop count", hint="k_hop takes one")
            index, table = derive_edges(self, kind)
            return self._view(index, {}, {"carry": table})

        return self.cached(("derived", kind, hops) if hops else ("derived", kind), build)

    def _view(self, edge_index: np.ndarray, edge_data: Mapping[str, np.ndarray], cache: Mapping[str, Any]) -> Graph:
        """A graph with this one's nodes, node and graph arrays and ``edge_index`` as its edges."""
        view = type(self).__new__(type(self))
        view._num_nodes = self._num_nodes
        view._num_graphs = self._num_graphs
        view._edge_index = _read_only(edge_index)
        view._node_data = self._node_data
        view._edge_data = dict(edge_data)
        view._graph_data = self._graph_data
        view._edge_sets = {}
        view._node_types = self._node_types
        view._set_types = {}
        view._ends = None
        view._cache = dict(cache)
        if "segments_graph" in self._cache:
            view._cache["segments_graph"] = self._cache["segments_graph"]
        view._source = None
        return view

    batch = _ClassOrInstance()

    def _batch_vector(self) -> np.ndarray:
        """The ``batch`` node array, or all zeros (int64 [N]) when there is none."""
        batch = self._node_data.get("batch")
        if batch is not None:
            return batch
        return self.cached("zero_batch", lambda: _read_only(np.zeros(self._num_nodes, dtype=np.int64)))

    def _kind_of(self, name: str) -> str | None:
        for kind, arrays in (("node", self._node_data), ("edge", self._edge_data),
                             ("graph", self._graph_data)):
            if name in arrays:
                return kind
        return None

    def __getitem__(self, name: str) -> np.ndarray:
        """The node, edge or graph array called ``name`` (looked up in that order), else the array of
        that name of an edge set."""
        for arrays in (self._node_data, self._edge_data, self._graph_data):
            if name in arrays:
                return arrays[name]
        for _, data in self._edge_sets.values():
            if name in data:
                return data[name]
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(name in arrays for arrays in (self._node_data, self._edge_data,
                                                  self._graph_data)) \
            or any(name in data for _, data in self._edge_sets.values())

    def keys(self) -> list[str]:
        """Names of all node, edge and graph arrays, in that order (``edge_index`` excluded)."""
        return [*self._node_data, *self._edge_data, *self._graph_data]

    def __repr__(self) -> str:
        parts = [f"num_nodes={self._num_nodes}", f"num_edges={self.num_edges}"]
        parts += [f"{name}={list(self[name].shape)}" for name in self.keys()]
        for set_name, (index, data) in self._edge_sets.items():
            parts.append(f"{set_name}{EDGE_SET_SUFFIX}={list(index.shape)}")
            parts += [f"{name}={list(array.shape)}" for name, array in data.items()]
        for node_type, (count, data) in self._node_types.items():
            parts.append(f"{node_type}={count} nodes")
            parts += [f"{node_type}__{name}={list(array.shape)}" for name, array in data.items()]
        return f"{type(self).__name__}({', '.join(parts)})"

    # ----------------------------------------------------------------------------------------
    # Cached layouts

    def cached(self, key: Any, build: Any) -> Any:
        """A derived structure cached on this (immutable) graph: ``build()`` runs on first use."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def cached_only(self, key: Any) -> Any:
        """The structure ``cached`` under ``key``, None when none was built (builds nothing)."""
        return self._cache.get(key)

    def csr_by_dst(self) -> tuple[np.ndarray, np.ndarray]:
        """(indptr [N+1], perm [E]): ``perm[indptr[i]:indptr[i+1]]`` are the edges into node i,
        in their original order."""
        return self.cached("csr_dst", lambda: _segments(self.dst, self.num_dst_nodes))

    def csr_by_dst_of(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``csr_by_dst`` restricted to the edges into ``nodes`` (other nodes' rows empty): the full
        CSR when it is built, else one pass over the edges and a sort of those into ``nodes`` only
        (an estimate from a few nodes need not pay for the whole CSR, which a relabelling discards)."""
        built = self.cached_only("csr_dst")
        if built is not None:
            return built
        wanted = np.zeros(self.num_dst_nodes, dtype=bool)
        wanted[nodes] = True
        into = np.flatnonzero(wanted[self.dst])
        indptr, order = _segments(self.dst[into], self.num_dst_nodes)
        return indptr, into[order]

    def csr_by_src(self) -> tuple[np.ndarray, np.ndarray]:
        """(indptr [N+1], perm [E]): ``perm[indptr[j]:indptr[j+1]]`` are the edges out of node j,
        in their original order."""
        return self.cached("csr_src", lambda: _segments(self.src, self.num_src_nodes))

    def segments_by_graph(self) -> tuple[np.ndarray, np.ndarray]:
        """(indptr [G+1], perm [N]): ``perm[indptr[g]:indptr[g+1]]`` are the nodes of graph g,
        in node order."""
        return self.cached("segments_graph", lambda: _segments(self._batch_vector(), self._num_graphs))

    def in_degree(self) -> np.ndarray:
        """Number of edges into each node, int64 [N] (self-loops and multi-edges counted)."""
        return np.diff(self.csr_by_dst()[0])

    def out_degree(self) -> np.ndarray:
        """Number of edges out of each node, int64 [N] (self-loops and multi-edges counted)."""
        return np.diff(self.csr_by_src()[0])

    # ----------------------------------------------------------------------------------------
    # Batching

    @classmethod
    def _batch_graphs(cls, graphs: Iterable[Graph]) -> Graph:
        """The disjoint union of ``graphs``: node indices offset, node and edge arrays
        concatenated, graph arrays concatenated, and a ``batch`` vector giving graph i's nodes
        the id i (graphs that are batches themselves keep their own graphs, renumbered)."""
        graphs = list(graphs)
        if not graphs:
            raise GraphError("cannot batch an empty list of graphs")
        for index, graph in enumerate(graphs):
            if not isinstance(graph, Graph):
                raise GraphError(f"graph {index} is a {type(graph).__name__}, not a Graph")
        first = graphs[0]
        if any(g._node_types for g in graphs):
            raise GraphError("graphs with node types cannot be batched", hint="run a typed graph on its own")
        for index, graph in enumerate(graphs[1:], start=1):
            for set_name in sorted(graph._edge_sets.keys() ^ first._edge_sets.keys()):
                has, lacks = (index, 0) if set_name in graph._edge_sets else (0, index)
                raise GraphError(f"graph {has} has the edge set {set_name} but graph {lacks} does not",
                                 hint="every graph in a batch needs the same edge sets")
            for set_name, (_, data) in graph._edge_sets.items():
                theirs_data = first._edge_sets[set_name][1]
                for name in sorted(data.keys() ^ theirs_data.keys()):
                    has, lacks = (index, 0) if name in data else (0, index)
                    raise GraphError(f"graph {has} has the {set_name} array {name} but graph {lacks} does not",
                                     hint="every graph in a batch needs the same arrays")
            for kind in ("node", "edge", "graph"):
                mine = {n: a for n, a in getattr(graph, f"_{kind}_data").items() if n != "batch"}
                theirs = {n: a for n, a in getattr(first, f"_{kind}_data").items()
                          if n != "batch"}
                for name in sorted(mine.keys() ^ theirs.keys()):
                    has, lacks = (index, 0) if name in mine else (0, index)
                    raise GraphError(f"graph {has} has {kind} array {name} but graph {lacks} "
                                     "does not",
                                     hint="every graph in a batch needs the same arrays")
                for name, array in mine.items():
                    if array.shape[1:] != theirs[name].shape[1:]:
                        raise GraphError(
                            f"graph {index} has {name} of shape {list(array.shape)}, which does "
                            f"not match graph 0's {list(theirs[name].shape)} after the first "
                            "dimension",
                            hint="every graph in a batch needs the same trailing shapes",
                        )

        node_offsets = np.cumsum([0] + [g.num_nodes for g in graphs])
        graph_offsets = np.cumsum([0] + [g.num_graphs for g in graphs])
        edge_index = np.concatenate(
            [g.edge_index + offset for g, offset in zip(graphs, node_offsets)], axis=1)
        batch = np.concatenate(
            [g._batch_vector() + offset for g, offset in zip(graphs, graph_offsets)])
        if (int(batch.max()) + 1 if batch.size else 0) != graph_offsets[-1]:
            raise GraphError(
                f"graph {len(graphs) - 1} (the last one) has no nodes, which a batch vector "
                "cannot record",
                hint="drop empty graphs, or place them before a non-empty one",
            )
        node_data = {"batch": batch}
        groups: dict[str, dict[str, np.ndarray]] = {"node": node_data, "edge": {}, "graph": {}}
        for kind, arrays in groups.items():
            for name in getattr(first, f"_{kind}_data"):
                if name != "batch":
                    arrays[name] = np.concatenate([g[name] for g in graphs])
        set_indices = {s: np.concatenate([g._edge_sets[s][0] + offset for g, offset in zip(graphs, node_offsets)],
                                         axis=1) for s in first._edge_sets}
        set_groups = {s: {name: np.concatenate([g._edge_sets[s][1][name] for g in graphs]) for name in data}
                      for s, (_, data) in first._edge_sets.items()}
        return cls(edge_index, int(node_offsets[-1]), node_data=groups["node"],
                   edge_data=groups["edge"], graph_data=groups["graph"], edge_sets=set_indices,
                   edge_set_data=set_groups)

    def select_graphs(self, indices: Any) -> Graph:
        """Graphs ``indices`` of this batch as a new batch, in that order: graph k of the result
        is graph ``indices[k]`` here, with its nodes and edges in their order here, node and edge
        arrays taken with them, graph arrays taken by row and ``batch`` renumbered (the graph
        ``Graph.batch`` gives for the selected graphs one by one). An edge between two graphs is
        kept when both ends are selected, with its destination's graph."""
        if self._node_types:
            raise GraphError("select_graphs needs a batch of graphs of one node set; this graph has node types",
                             hint="run a typed graph on its own")
        index = _as_numpy("indices", indices)
        if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
            raise GraphError(f"select_graphs needs a 1-D array of graph ids, got shape "
                             f"{list(index.shape)} and dtype {index.dtype}",
                             hint="pass integer graph ids, e.g. np.flatnonzero(mask)")
        index = index.astype(np.int64)
        bad = (index < 0) | (index >= self._num_graphs)
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            raise GraphError(f"indices[{pos}] = {index[pos]} is out of range for "
                             f"num_graphs={self._num_graphs}",
                             hint="graph ids run from 0 to num_graphs - 1")
        _, first = np.unique(index, return_index=True)
        if first.size < index.size:
            repeated = np.ones(index.size, dtype=bool)
            repeated[first] = False
            pos = int(np.flatnonzero(repeated)[0])
            earlier = int(np.flatnonzero(index == index[pos])[0])
            raise GraphError(f"indices[{pos}] = {index[pos]} is selected twice (also indices[{earlier}])",
                             hint="each graph can be selected once")
        position = np.full(self._num_graphs, -1, dtype=np.int64)
        position[index] = np.arange(index.size)
        indptr, perm = self.segments_by_graph()
        sizes = np.diff(indptr)[index]
        if index.size and sizes[-1] == 0:
            raise GraphError(f"graph {index[-1]} (the last one selected) has no nodes, which a "
                             "batch vector cannot record",
                             hint="drop empty graphs, or place them before a non-empty one")
        total = int(sizes.sum())
        starts = np.cumsum(sizes) - sizes
        nodes = perm[np.repeat(indptr[index] - starts, sizes) + np.arange(total, dtype=np.int64)]
        new_id = np.full(self._num_nodes, -1, dtype=np.int64)
        new_id[nodes] = np.arange(total, dtype=np.int64)
        batch_vector = self._batch_vector()

        def kept_edges(edge_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """(the positions of the edges kept, in the order of their destinations' graphs; their index)"""
            src, dst = new_id[edge_index[0]], new_id[edge_index[1]]
            edges = np.flatnonzero((src >= 0) & (dst >= 0))
            edges = edges[np.argsort(position[batch_vector[edge_index[1][edges]]], kind="stable")]
            return edges, np.stack([src[edges], dst[edges]])

        edges, edge_index = kept_edges(self._edge_index)
        set_indices, set_groups = {}, {}
        for set_name, (set_index, data) in self._edge_sets.items():
            kept, set_indices[set_name] = kept_edges(set_index)
            set_groups[set_name] = {name: array[kept] for name, array in data.items()}
        node_data = {name: array[nodes] for name, array in self._node_data.items() if name != "batch"}
        node_data["batch"] = np.repeat(np.arange(index.size, dtype=np.int64), sizes)
        selected = type(self)(edge_index, total, node_data=node_data,
                              edge_data={name: array[edges] for name, array in self._edge_data.items()},
                              graph_data={name: array[index] for name, array in self._graph_data.items()},
                              edge_sets=set_indices, edge_set_data=set_groups)
        # The nodes come graph by graph: their grouping by graph is known without sorting.
        graph_indptr = np.zeros(index.size + 1, dtype=np.int64)
        np.cumsum(sizes, out=graph_indptr[1:])
        selected._cache["segments_graph"] = (_read_only(graph_indptr), _read_only(np.arange(total, dtype=np.int64)))
        return selected

    def unbatch_nodes(self, array: Any) -> list[np.ndarray]:
        """A node-level array split per graph: entry g holds graph g's rows in node order."""
        array = _as_numpy("array", array)
        if array.ndim == 0 or array.shape[0] != self._num_nodes:
            raise GraphError(f"unbatch_nodes needs one row per node ({self._num_nodes}), got "
                             f"shape {list(array.shape)}")
        indptr, perm = self.segments_by_graph()
        return np.split(array[perm], indptr[1:-1])

    def unbatch_graphs(self, array: Any) -> list[np.ndarray]:
        """A graph-level array split into its rows, one per graph."""
        array = _as_numpy("array", array)
        if array.ndim == 0 or array.shape[0] != self._num_graphs:
            raise GraphError(f"unbatch_graphs needs one row per graph ({self._num_graphs}), got "
                             f"shape {list(array.shape)}")
        return list(array)

    # ----------------------------------------------------------------------------------------
    # Files

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool = False, memory_limit: Any = None) -> Graph:
        """The graph stored at ``path``: an ``.npz`` file (``edge_index``, an optional 0-d integer
        ``num_nodes`` and arrays classified by name) or a graph directory (``mpdsl.store``: one
        ``.npy`` per array and ``graph.json``). Never unpickles. A file, or a directory without
        ``mmap``, is read into memory after the sizes it declares are checked against the memory
        budget (``mpdsl.memory``; ``memory_limit`` overrides it). ``mmap=True`` (directories only)
        memory-maps the arrays read-only: validated once and stamped, the CSR by destination saved
        beside the data and pre-filled, so a sampled batch reads only its rows."""
        from .npz import read_npz

        name = os.fspath(path)
        if os.path.isdir(name):
            from .store import open_graph

            return open_graph(name, mmap=mmap, memory_limit=memory_limit)
        if mmap:
            if not os.path.exists(name):
                raise GraphError(f"graph directory {name!r} does not exist",
                                 hint="check the path (relative paths start at the current folder)")
            raise GraphError(f"mmap=True needs a graph directory, but {name!r} is a file",
                             hint="convert it once: mpdsl.Graph.load(path).save_directory('big/'), then "
                                  "Graph.load('big/', mmap=True)")
        arrays = read_npz(name, GraphError, "graph file", memory_limit)
        if "edge_index" not in arrays:
            found = ", ".join(sorted(arrays)[:8]) or "no arrays"
            raise GraphError(f"graph file {name!r} has no edge_index array (it holds {found})",
                             hint="store the edges as an int array of shape [2, E] under "
                                  "'edge_index'; a PyG Data converts with "
                                  "mpdsl.Graph.from_pyg(data).save(path)")
        edge_index = arrays.pop("edge_index")
        num_nodes = arrays.pop("num_nodes", None)
        try:
            return cls._from_flat(edge_index, num_nodes, arrays)
        except GraphError as exc:
            raise GraphError(f"in graph file {name!r}: {exc.message}", hint=exc.hint) from None

    def save_directory(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the graph as a graph directory (``mpdsl.store``) at ``path``, a new or empty
        folder (``overwrite=True`` replaces a graph directory there), which ``load(path,
        mmap=True)`` memory-maps. Arrays are copied in chunks, so a memory-mapped graph is saved
        without reading it into memory."""
        from .store import write_directory

        write_directory(self, path, overwrite=overwrite)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the graph to ``path`` (exactly that name) in the format ``load`` reads: a
        compressed ``.npz`` whose bytes depend only on the graph's contents."""
        arrays = {"edge_index": self._edge_index,
                  "num_nodes": np.asarray(self._num_nodes, dtype=np.int64)}
        for name in self.keys():
            kind = self._kind_of(name)
            array = self[name]
            if edge_set_member(name, self._edge_sets) is not None:
                raise GraphError(f"{kind} array {name} would be read back as an array of the edge set "
                                 f"{edge_set_member(name, self._edge_sets)}", hint="rename it before saving")
            if classify_name(name, array.shape[0], self._num_nodes) != kind:
                raise GraphError(
                    f"{kind} array {name} would be read back as a "
                    f"{classify_name(name, array.shape[0], self._num_nodes)} array",
                    hint=f"rename it to {kind}_{name} before saving",
                )
            arrays[name] = array
        for node_type, (count, data) in self._node_types.items():
            arrays[f"{node_type}__num_nodes"] = np.asarray(count, dtype=np.int64)
            arrays.update({f"{node_type}__{name}": array for name, array in data.items()})
        for set_name, (index, data) in self._edge_sets.items():
            if set_name in self._set_types:
                src, dst = self._set_types[set_name]
                arrays[f"{src}__{set_name}__{dst}{EDGE_SET_SUFFIX}"] = index
            else:
                arrays[f"{set_name}{EDGE_SET_SUFFIX}"] = index
            for name, array in data.items():
                if edge_set_member(name, self._edge_sets) != set_name:
                    raise GraphError(f"array {name} of the edge set {set_name} would not be read back as one",
                                     hint=f"name the arrays of {set_name} {set_name} or {set_name}_* before saving")
                arrays[name] = array
        from .npz import check_writable

        name = check_writable(path, GraphError, "graph")
        try:
            with zipfile.ZipFile(name, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                for key, array in arrays.items():
                    # A fixed timestamp keeps the file byte-identical across runs.
                    info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_DEFLATED
                    with archive.open(info, "w", force_zip64=True) as member:
                        np.lib.format.write_array(member, array, allow_pickle=False)
        except OSError as err:
            raise GraphError(f"cannot write the graph to {name!r}: {err.strerror or err}") from None

    # ----------------------------------------------------------------------------------------
    # Converters

    @classmethod
    def from_networkx(
        cls,
        G: Any,
        group_node_attrs: str | Iterable[str] | None = None,
        group_edge_attrs: str | Iterable[str] | None = None,
        *,
        x: Any = None,
        exclude: str | Iterable[str] = (),
    ) -> Graph:
        """A graph from a networkx graph, nodes numbered 0..N-1 in ``G.nodes`` order, following
        PyG's ``from_networkx``.

        Undirected edges become both directions (a self-loop once), in the order of PyG's
        ``from_networkx``; multi-edges are kept. Every attribute is kept by name: node attribute
        ``a`` becomes node array ``a`` (``node_a`` if the name would read back as another kind);
        edge attribute ``weight`` becomes ``edge_weight`` and ``a`` becomes ``edge_a`` (names
        starting with ``edge_`` are kept); graph attribute ``a`` (``G.graph``) becomes the graph
        array ``graph_a`` with one row. ``group_node_attrs`` / ``group_edge_attrs`` (names, or
        "all") are concatenated per node / edge, each flattened, into float32 ``x`` /
        ``edge_attr`` instead, as PyG does; ``x`` may be given directly instead. Every node (edge)
        must carry the same attributes. Attributes that are not numbers (strings, ...) are
        refused by name unless listed in ``exclude``, which leaves them out.
        """
        if x is not None and group_node_attrs is not None:
            raise GraphError("from_networkx takes x or group_node_attrs, not both")
        excluded = {exclude} if isinstance(exclude, str) else set(exclude)
        nodes = list(G.nodes)
        position = {node: i for i, node in enumerate(nodes)}
        directed = G if G.is_directed() else G.to_directed(as_view=True)
        edges = list(directed.edges(data=True))
        edge_index = np.array([[position[u] for u, _, _ in edges],
                               [position[v] for _, v, _ in edges]],
                              dtype=np.int64).reshape(2, len(edges))
        node_table = _attribute_columns("node", [(repr(n), G.nodes[n]) for n in nodes], excluded)
        edge_table = _attribute_columns("edge", [(f"({u!r}, {v!r})", d) for u, v, d in edges],
                                          excluded)
        node_data = _kept_attributes("node", node_table, group_node_attrs, "x", len(nodes),
                                     lambda name: _node_array_name(name, len(nodes)))
        edge_data = _kept_attributes("edge", edge_table, group_edge_attrs, "edge_attr", len(edges),
                                     _edge_array_name)
        if x is not None:
            if "x" in node_data:
                raise GraphError("x is given, and the nodes also have an attribute 'x'",
                                 hint="pass exclude=['x'] to replace it with the given x")
            node_data["x"] = x
        graph_data: dict[str, np.ndarray] = {}
        for key, value in G.graph.items():
            key = str(key)
            if key in ("node_default", "edge_default") or key in excluded:
                continue  # networkx's defaults, as PyG
            array = _numeric_value(value)
            if array is None:
                raise GraphError(f"graph attribute {key!r} = {value!r} is not numeric, so it would be "
                                 "lost (mpdsl graphs hold numeric arrays)",
                                 hint=f"pass exclude=[{key!r}] to leave it out, or encode it as numbers")
            graph_data[key if key.startswith("graph_") else f"graph_{key}"] = array[None]
        return cls(edge_index, len(nodes), node_data=node_data, edge_data=edge_data,
                   graph_data=graph_data)

    @classmethod
    def from_scipy(cls, A: Any, x: Any = None, **extra: Any) -> Graph:
        """A graph from a square sparse adjacency matrix: a nonzero ``A[i, j]`` is an edge i -> j
        (src = row, dst = col, as PyG's ``from_scipy_sparse_matrix``), edges in row-major
        order. The entries become ``edge_weight`` unless they are all one; ``x`` and ``extra``
        are classified by name."""
        from scipy import sparse

        if not sparse.issparse(A):
            raise GraphError(f"from_scipy needs a scipy sparse matrix, got {type(A).__name__}",
                             hint="wrap dense arrays with scipy.sparse.csr_array")
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise GraphError(f"adjacency matrix must be square, got shape {tuple(A.shape)}")
        coo = sparse.coo_array(A, copy=True)
        coo.sum_duplicates()
        order = np.lexsort((coo.col, coo.row))
        kept = order[coo.data[order] != 0]
        edge_index = np.stack([coo.row[kept], coo.col[kept]]).astype(np.int64)
        weights = coo.data[kept]
        arrays = dict(extra)
        if x is not None:
            arrays["x"] = x
        if not np.all(weights == 1):
            if "edge_weight" in arrays:
                raise GraphError("edge_weight is given but the matrix already holds weights")
            arrays["edge_weight"] = weights
        return cls._from_flat(edge_index, A.shape[0], arrays)

    @classmethod
    def from_pyg(cls, data: Any, *, exclude: str | Iterable[str] = ()) -> Graph:
        """A graph from a ``torch_geometric.data.Data``: ``edge_index``, ``num_nodes`` and every
        tensor attribute, classified by name (``ptr`` of a ``Batch`` is dropped: it is derived
        from ``batch``). Numbers and 0-d tensors (``data.num_classes = 4``) become graph arrays
        with one row, named ``graph_<name>`` (``graph_*`` names kept). Other attributes (strings,
        lists, ...) are refused by name unless listed in ``exclude``, which leaves them out."""
        Data = _import_pyg_data()
        from torch_geometric.data import HeteroData

        if isinstance(data, HeteroData):
            return cls._from_hetero(data, exclude)
        if not isinstance(data, Data):
            raise GraphError(f"from_pyg needs a torch_geometric Data or HeteroData, got {type(data).__name__}")
        excluded = {exclude} if isinstance(exclude, str) else set(exclude)
        arrays: dict[str, np.ndarray] = {}
        lost: list[str] = []
        edge_index = np.zeros((2, 0), dtype=np.int64)
        for key in data.keys():  # noqa: SIM118
            value = data[key]
            if key == "edge_index":
                edge_index = value
                continue
            if key in ("ptr", "num_nodes") or key in excluded or value is None:
                continue
            if hasattr(value, "detach"):
                try:
                    array = value.detach().cpu().numpy()
                except (TypeError, RuntimeError) as exc:
                    raise GraphError(f"{key} cannot be converted to a numpy array ({exc})",
                                     hint="use a dense tensor of a numpy dtype") from None
            elif isinstance(value, np.ndarray):
                array = value
            else:
                array = _numeric_value(value) if isinstance(value, (bool, int, float, np.generic)) else None
                if array is None:
                    lost.append(f"{key} ({type(value).__name__})")
                    continue
            if array.ndim == 0:
                if not key.startswith("graph_"):
                    if f"graph_{key}" in data.keys():  # noqa: SIM118
                        raise GraphError(f"the scalar {key!r} would become the graph array 'graph_{key}', "
                                         "which the Data already has",
                                         hint=f"rename one of them, or pass exclude=[{key!r}]")
                    key = f"graph_{key}"
                array = array[None]
            arrays[key] = array
        if lost:
            names = [item.split(" ")[0] for item in lost]
            several = len(lost) > 1
            raise GraphError(f"the Data's attribute{'s' if several else ''} {', '.join(lost)} "
                             f"{'are not tensors or numbers' if several else 'is not a tensor or a number'}, "
                             "so it would be lost (mpdsl graphs hold numeric arrays)",
                             hint=f"pass exclude={names!r} to leave {'them' if several else 'it'} out, or "
                                  "store it as a tensor")
        return cls._from_flat(edge_index, data.num_nodes, arrays)

    @classmethod
    def _from_hetero(cls, data: Any, exclude: str | Iterable[str]) -> Graph:
        """A typed graph from a PyG ``HeteroData``: each node type is a node type (its ``num_nodes``
        and tensor attributes, ``x`` as ``x``), each edge type (src, rel, dst) a typed edge set named
        ``rel`` when no other edge type has that relation, else ``src__rel__dst``, with its tensor
        attributes as the set's arrays (``edge_attr`` of ``writes`` as ``writes_edge_attr``)."""
        excluded = {exclude} if isinstance(exclude, str) else set(exclude)

        def numpy_of(where: str, value: Any) -> np.ndarray | None:
            if hasattr(value, "detach"):
                return value.detach().cpu().numpy()
            if isinstance(value, np.ndarray):
                return value
            return None

        counts: dict[str, int] = {}
        type_data: dict[str, dict[str, np.ndarray]] = {}
        for node_type in data.node_types:
            store = data[node_type]
            counts[node_type] = int(store.num_nodes or 0)
            arrays = {}
            for key in store.keys():  # noqa: SIM118
                if key == "num_nodes" or key in excluded:
                    continue
                array = numpy_of(f"{node_type}.{key}", store[key])
                if array is None:
                    raise GraphError(f"the HeteroData's attribute {node_type}.{key} is not a tensor, so it would be "
                                     "lost", hint=f"pass exclude=[{key!r}] to leave it out")
                arrays[key] = array
            type_data[node_type] = arrays
        relations = [rel for _, rel, _ in data.edge_types]
        set_indices: dict[str, np.ndarray] = {}
        set_arrays: dict[str, dict[str, np.ndarray]] = {}
        ends: dict[str, tuple[str, str]] = {}
        for src, rel, dst in data.edge_types:
            name = rel if relations.count(rel) == 1 else f"{src}__{rel}__{dst}"
            store = data[src, rel, dst]
            arrays = {}
            for key in store.keys():  # noqa: SIM118
                if key in excluded:
                    continue
                array = numpy_of(f"{src}__{rel}__{dst}.{key}", store[key])
                if array is None:
                    raise GraphError(f"the HeteroData's attribute {key} of ({src}, {rel}, {dst}) is not a tensor, "
                                     "so it would be lost", hint=f"pass exclude=[{key!r}] to leave it out")
                if key == "edge_index":
                    set_indices[name] = array
                else:
                    arrays[f"{name}_{key}"] = array
            if name not in set_indices:
                set_indices[name] = np.zeros((2, 0), dtype=np.int64)
            set_arrays[name] = arrays
            ends[name] = (src, dst)
        return cls(np.zeros((2, 0), dtype=np.int64), 0, edge_sets=set_indices, edge_set_data=set_arrays,
                   node_types=counts, node_type_data=type_data, edge_set_types=ends)

    def to_pyg(self) -> Any:
        """This graph as a ``torch_geometric.data.Data`` (arrays copied into tensors)."""
        if self._node_types:
            raise GraphError("to_pyg converts a graph of one node set; this graph has node types",
                             hint="read its arrays with graph.node_type_data and graph.edge_sets")
        Data = _import_pyg_data()
        import torch

        tensors = {name: torch.from_numpy(np.array(self[name])) for name in self.keys()}
        for set_name, (index, data) in self._edge_sets.items():
            tensors[f"{set_name}{EDGE_SET_SUFFIX}"] = torch.from_numpy(np.array(index))
            tensors.update({name: torch.from_numpy(np.array(array)) for name, array in data.items()})
        return Data(edge_index=torch.from_numpy(np.array(self._edge_index)),
                    num_nodes=self._num_nodes, **tensors)


def _import_pyg_data() -> type[Any]:
    try:
        from torch_geometric.data import Data
    except ImportError:
        raise GraphError("torch_geometric is not installed",
                         hint="pip install torch-geometric") from None
    return Data


def _node_array_name(attribute: str, num_nodes: int) -> str:
    """The node array that keeps a node attribute: its own name, unless that reads back as
    another kind of array (``edge_*``, ``graph_*``, a reserved name), then ``node_<name>``."""
    if attribute in RESERVED_NAMES or classify_name(attribute, num_nodes, num_nodes) != "node":
        return f"node_{attribute}"
    return attribute


def _edge_array_name(attribute: str) -> str:
    """The edge array that keeps an edge attribute: ``weight`` is ``edge_weight``; names that
    read back as edge arrays (``edge_*``) are kept; ``a`` is ``edge_a``."""
    if attribute == "weight":
        return "edge_weight"
    if attribute not in RESERVED_NAMES and classify_name(attribute, None, 0) == "edge":
        return attribute
    return f"edge_{attribute}"


def _numeric_value(value: Any) -> np.ndarray | None:
    """``value`` as a numeric (bool, int or float) array, or None if it is not one."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return None
    return array if array.dtype.kind in "biuf" else None


def _attribute_columns(kind: str, items: list[tuple[str, Mapping[str, Any]]],
                       excluded: set[str]) -> tuple[dict[str, list[Any]], list[str]]:
    """The attributes of the nodes (edges) as name -> one value per item, and the items' labels;
    every item must have the same attribute names (those in ``excluded`` aside)."""
    if not items:
        return {}, []
    first_label, first = items[0]
    names = [str(k) for k in first if str(k) not in excluded]
    expected = set(names)
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for label, attributes in items:
        keys = {str(k): v for k, v in attributes.items() if str(k) not in excluded}
        if set(keys) != expected:
            missing, extra = sorted(expected - set(keys)), sorted(set(keys) - expected)
            detail = "; ".join(([f"lacks {', '.join(map(repr, missing))}"] if missing else []) +
                               ([f"has {', '.join(map(repr, extra))} in addition"] if extra else []))
            raise GraphError(f"{kind} {label} {detail}, unlike {kind} {first_label}",
                             hint=f"every {kind} needs the same attributes (as in PyG's from_networkx); "
                                  "exclude=[...] leaves attributes out")
        for name in names:
            columns[name].append(keys[name])
    return columns, [label for label, _ in items]


def _numeric_column(kind: str, name: str, values: list[Any], labels: list[str]) -> np.ndarray:
    """One attribute of every node (edge) as an array [rows, ...]; refuses non-numbers."""
    for label, value in zip(labels, values):
        if _numeric_value(value) is None:
            raise GraphError(f"{kind} {label} attribute {name!r} = {value!r} is not numeric, so it "
                             "cannot be kept (mpdsl graphs hold numeric arrays)",
                             hint=f"pass exclude=[{name!r}] to leave it out, or encode it as numbers")
    try:
        return np.asarray(values) if values else np.zeros(0)
    except ValueError:
        shapes: dict[tuple[int, ...], str] = {}
        for label, value in zip(labels, values):
            shapes.setdefault(np.shape(value), label)
        listed = ", ".join(f"{list(shape)} at {kind} {label}" for shape, label in list(shapes.items())[:3])
        raise GraphError(f"{kind} attribute {name!r} has different shapes across {kind}s ({listed})",
                         hint=f"every {kind} needs the same attribute shapes") from None


def _kept_attributes(kind: str, table: tuple[dict[str, list[Any]], list[str]],
                     group: str | Iterable[str] | None, grouped_name: str, rows: int,
                     rename) -> dict[str, np.ndarray]:
    """The attributes as arrays by their graph names: ``group`` (names or "all") concatenated
    into ``grouped_name``, each other one on its own under ``rename(name)``."""
    columns, labels = table
    if group is None:
        grouped: list[str] = []
    elif isinstance(group, str) and group == "all":
        grouped = list(columns)
    else:
        grouped = [group] if isinstance(group, str) else [str(g) for g in group]
    data: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for name in grouped:
        if name not in columns and rows:
            raise GraphError(f"the {kind}s have no attribute {name!r} to group",
                             hint=f"their attributes are: {', '.join(map(repr, columns)) or 'none'}")
    if group is not None:
        parts = [_numeric_column(kind, name, columns[name], labels).reshape(rows, -1).astype(np.float32)
                 for name in grouped if name in columns]
        data[grouped_name] = (np.concatenate(parts, axis=1) if parts
                              else np.zeros((rows, len(grouped)), dtype=np.float32))
        origin[grouped_name] = f"the grouped attributes {grouped}"
    for name, values in columns.items():
        if name in grouped:
            continue
        key = rename(name)
        if key in data:
            raise GraphError(f"{kind} attribute {name!r} would be stored as {key!r}, the name of "
                             f"{origin[key]}", hint=f"rename one of them, or pass exclude=[{name!r}]")
        data[key] = _numeric_column(kind, name, values, labels)
        origin[key] = f"attribute {name!r}"
    return data


