"""Backends: classes registered by name, each with one lowering rule per IR op.

A backend subclasses ``Backend`` and marks methods with ``@rule("op", ...)``. An op a backend
cannot run must still appear, as ``unsupported("op", reason)``, so that coverage is explicit:
``missing_rules()`` lists the ops with neither, and the test suite fails on any.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, cast

import numpy as np

from mpdsl.diagnostics import InputError, MpdslError
from mpdsl.graph import edge_set_view
from mpdsl.ops import OPS, MissingRule, choose, running_statistic
from mpdsl.types import DTYPE_NAMES, FLOAT_DTYPES, HALF_DTYPES, Domain, TensorType

CPU_WORKERS = max(1, min(8, os.cpu_count() or 1))  # threads the CPU backend computes on, the caller's included

_BACKEND_MODULES = {"numpy": "mpdsl.backends.numpy_backend", "triton": "mpdsl.backends.triton_backend"}
BACKENDS: dict[str, type[Backend]] = {}


class BackendError(MpdslError):
    """A program that a backend cannot run (an unsupported op, a missing runtime)."""


class _Marked(Protocol):
    """A function marked by ``rule`` with the ops it lowers."""

    __mpdsl_ops__: tuple[str, ...]


def rule(*ops: str) -> Callable:
    """Mark a backend method as the lowering rule of ``ops``."""

    def mark(fn: Callable) -> Callable:
        cast(_Marked, fn).__mpdsl_ops__ = ops
        return fn

    return mark


class _Unsupported:
    def __init__(self, op: str, reason: str):
        self.op, self.reason = op, reason

    def __call__(self, backend: Backend, *args: Any) -> Any:
        raise BackendError(f"the {backend.name} backend cannot run op '{self.op}': {self.reason}",
                           "run this model with --backend numpy")


def unsupported(op: str, reason: str) -> _Unsupported:
    """An explicit 'this backend does not run ``op``' entry, with the reason users will see."""
    return _Unsupported(op, reason)


class Backend:
    """Executes a verified IR program. ``rules`` maps each op name to its lowering rule."""

    name: ClassVar[str] = ""
    rules: ClassVar[dict[str, Callable]] = {}
    target: ClassVar[str] = "cpu"  # the device kind the optimizer plans layouts for ("cpu" or "gpu")
    dtypes: ClassVar[tuple[str, ...]] = FLOAT_DTYPES  # the float dtypes it computes in

    @classmethod
    def check_dtype(cls, dtype: str) -> None:
        """Refuse, with one BackendError, a float dtype the backend does not compute in (before anything
        runs)."""
        if dtype in cls.dtypes:
            return
        names = " or ".join(DTYPE_NAMES[d] for d in cls.dtypes)
        raise BackendError(f"the {cls.name} backend computes in {names}, not {DTYPE_NAMES.get(dtype, repr(dtype))}",
                           "run half precision on the triton backend, or use float32" if dtype in HALF_DTYPES
                           else "use float32")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        rules: dict[str, Callable] = {}
        for klass in reversed(cls.__mro__):  # a subclass's rules override its bases'
            for attr in vars(klass).values():
                for op in getattr(attr, "__mpdsl_ops__", ()):
                    rules[op] = attr
                if isinstance(attr, _Unsupported):
                    rules[attr.op] = attr
        cls.rules = rules

    @rule("input")
    def _input(self, ctx, v):
        """A model input: the array bound to its name (every backend's context has ``inputs``)."""
        return ctx.inputs[v.attr["name"]]

    @rule("param")
    def _param(self, ctx, v):
        """A parameter: the array bound to its name (every backend's context has ``params``)."""
        return ctx.params[v.attr["name"]]

    @rule("select")
    def _select(self, ctx, v, x):
        """Static index into the first feature axis (after the row axis of a row-domain value)."""
        return x[v.attr["index"]] if v.operands[0].type.domain is Domain.PARAM else x[:, v.attr["index"]]

    @classmethod
    def missing_rules(cls) -> list[str]:
        return sorted(set(OPS) - set(cls.rules))

    def warm_up(self) -> None:
        """The process-wide set-up of a first run that needs neither program nor data (loading
        compiled kernels), for a caller that overlaps it with other work (a node order computed on
        another thread: ``plan.decide_node_order``); nothing by default, and cheap once done."""

    def run(self, program, graph, inputs: dict, params: dict, dims: dict[str, int],
            training: bool = False, seed: int | None = None) -> dict[str, Any]:
        raise NotImplementedError


def register_backend(name: str) -> Callable[[type[Backend]], type[Backend]]:
    def register(cls: type[Backend]) -> type[Backend]:
        cls.name = name
        BACKENDS[name] = cls
        return cls

    return register


def available_backends() -> list[str]:
    return sorted(set(_BACKEND_MODULES) | set(BACKENDS))


def get_backend(name: str) -> Backend:
    """An instance of the backend registered as ``name`` (its module is imported on demand)."""
    if name not in BACKENDS and name in _BACKEND_MODULES:
        importlib.import_module(_BACKEND_MODULES[name])
    if name not in BACKENDS:
        raise BackendError(f"unknown backend '{name}'", f"available backends: {', '.join(available_backends())}")
    return BACKENDS[name]()


def edge_graph(graph, program, name: str):
    """The graph seen through the program's edge set ``name`` ("": ``graph`` itself): an input set the
    graph carries (``Graph.edge_set``) or a set derived from its base (``Graph.derived``), each built
    once per graph (its CSR orders cached on it)."""
    if not name:
        return graph
    definition = program.edge_set(name)
    if definition is None:
        raise MissingRule(f"the program has no edge set {name!r} (the verifier checks every one it names)")
    base = graph if definition.kind == "input" else edge_graph(graph, program, definition.base)
    return edge_set_view(graph, base, definition)


def carry_table(graph):
    """The ``mpdsl.graph.CarryTable`` of a derived edge set's graph (``Graph.derived``): how its edges
    come from its base's."""
    table = graph.cached_only("carry")
    if table is None:
        raise MissingRule("carry needs a derived edge set (made by Graph.derived); the verifier checks that")
    return table


def space_rows(graph, program, space) -> int:
    """The row count of values on ``space`` (a domain and edge set) on ``graph``."""
    if space.domain is Domain.EDGE:
        return edge_graph(graph, program, space.name).num_edges
    if space.domain is Domain.NODE and space.name:
        return graph.num_type_nodes(space.name)
    return graph.num_rows(space.domain)


def gather_index(graph, index: str):
    """The per-row node (or graph) ids a gather by ``index`` reads: an edge's src or dst, a node's batch
    (``graph`` is the graph seen through the gather's edge set: ``edge_graph``)."""
    table = {"src": lambda: graph.src, "dst": lambda: graph.dst, "batch": lambda: graph.batch}
    return choose(table, "gather", "index", index, "the backends' gather indices (mpdsl.backends.gather_index)")()


# ---- row relabelling of host arrays (graph layouts) ----------------------------------------------

PARALLEL_COPY_ELEMENTS = 1 << 16  # a float array's row copy of at least this many elements runs in parallel


def serial_row_copy(x: np.ndarray, index: np.ndarray) -> bool:
    """Whether relabelling ``x``'s rows through ``index`` is NumPy's own copy (not a float array, or
    fewer than ``PARALLEL_COPY_ELEMENTS`` elements) rather than the compiled parallel one."""
    return x.dtype not in (np.float32, np.float64) or x.ndim == 0 \
        or len(index) * max(1, x[:1].size) < PARALLEL_COPY_ELEMENTS


def take_rows(x: np.ndarray, index: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``np.take(x, index, axis=0)``, into ``out`` when given (a C-contiguous array of the result's
    shape and dtype); a large float array's rows are copied in parallel (``cpu_kernels.take_rows``,
    loaded only then: small graphs never load Numba)."""
    if serial_row_copy(x, index):
        return np.take(x, index, axis=0, out=out)
    from mpdsl.backends import cpu_kernels
    return cpu_kernels.take_rows(x, index, out)


@contextlib.contextmanager
def relabelling_arrays(backend, layout):
    """``allocate(shape, dtype)`` for the relabelled inputs and outputs of ``layout``
    (``GraphLayout.apply`` / ``restore``): from the backend's buffer pool where it has one (lent
    when the block ends, so that repeated calls reuse them), else None (each copy allocates its own;
    None also without a layout: nothing is relabelled)."""
    pool = getattr(backend, "pool", None)
    if layout is None or pool is None or not hasattr(pool, "lending"):
        yield None
        return
    with pool.lending() as allocate:
        yield allocate


def put_rows(x: np.ndarray, index: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """An array ``out`` (new, or the one given: C-contiguous, of x's shape and dtype) with
    ``out[index[i]] = x[i]`` for ``index`` a permutation of x's rows (the inverse of ``take_rows``),
    large float arrays copied in parallel (``cpu_kernels.put_rows``)."""
    if len(index) == len(x) and serial_row_copy(x, index):
        out = np.empty_like(x) if out is None else out
        out[index] = x
        return out
    from mpdsl.backends import cpu_kernels
    return cpu_kernels.put_rows(x, index, out)


# ---- shared by the backends (array-library neutral: NumPy arrays or torch tensors) ------------------


def graph_blocks(indptr: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(starts, counts, offsets, pairs) of the work items of a global attention over the graphs of the
    segments ``indptr`` (graph g's nodes at positions indptr[g]:indptr[g+1]): per item, its graph's first
    position and node count, the item's first node within the graph, and the node pairs it computes."""
    sizes = np.diff(indptr).astype(np.int64)
    per_graph = (sizes + block - 1) // block
    graph = np.repeat(np.arange(len(sizes)), per_graph)
    first = np.cumsum(per_graph) - per_graph
    offsets = (np.arange(len(graph), dtype=np.int64) - first[graph]) * block
    counts = sizes[graph]
    return (np.ascontiguousarray(indptr[:-1][graph], dtype=np.int64), counts, offsets,
            np.minimum(block, counts - offsets) * counts)


def feature_width(shape) -> int:
    """Number of elements of a (feature) shape; explicit so that zero-row arrays reshape too."""
    return math.prod(int(d) for d in shape)


def expand_operand(x, t: TensorType, result: TensorType):
    """Reshape an operand of an elementwise op for NumPy / torch broadcasting under mpdsl's rules
    (params have no row axis; feature shapes align from the left)."""
    pad = (1,) * (result.rank - t.rank)
    if t.domain is Domain.PARAM and result.domain is not Domain.PARAM:
        return x.reshape((1,) + tuple(x.shape) + pad)
    return x.reshape(tuple(x.shape) + pad)


def array_axis(v, axis: int) -> int:
    """The array axis of feature axis ``axis`` of ``v``'s first operand (after its row axis, if any)."""
    t = v.operands[0].type
    axis %= t.rank
    return axis if t.domain is Domain.PARAM else axis + 1


# ---- shared by the backends' batch_norm rules ------------------------------------------------------


def batch_norm_training(v, training: bool) -> bool:
    """Whether a batch_norm value runs in its training form (batch statistics) in a run with ``training``."""
    return v.attr["mode"] == "train" or (v.attr["mode"] == "auto" and training)


def check_batch_norm_rows(v, rows: int) -> int:
    """The row count of a batch_norm in training, which needs two rows at least (as torch's BatchNorm)."""
    if rows < 2:
        domain = v.operands[0].type.domain
        raise InputError(f"batch_norm in training needs more than one {domain} to take statistics over, got {rows}",
                         "run the model in eval mode (model.eval()) or on a larger batch")
    return rows


def batch_norm_statistics(v, x, ctx, copy):
    """Batch statistics of a batch_norm in its training form: (x - batch mean, biased batch variance),
    over the rows of ``x``. Records the running-statistic updates (momentum; the variance update uses
    the unbiased batch variance, as torch's BatchNorm) in ``ctx.state_updates``, starting from the
    parameter (``copy`` of it) or from an earlier update of the same statistic in this run."""
    rows = check_batch_norm_rows(v, x.shape[0])
    mean = x.mean(0)
    centred = x - mean
    var = (centred * centred).mean(0)
    momentum = v.attr["momentum"]
    for operand, batch in ((v.operands[1], mean), (v.operands[2], var * (rows / (rows - 1)))):
        where = running_statistic(operand)
        if where is not None:
            name, index = where
            current = ctx.state_updates.get(name)
            if current is None:
                current = ctx.state_updates[name] = copy(ctx.params[name])
            current[index] = (1 - momentum) * current[index] + momentum * batch
    return centred, var


# Ops that index with int ids: op -> (the operand holding the ids, the bound of the ids given the
# op's operand arrays' leading sizes or attributes, what the ids index, for messages).
ID_OPERANDS: dict[str, tuple[int, Callable[[Any, Callable[[int], int]], int], str]] = {
    "take": (1, lambda v, rows: rows(0), "a parameter with {} entries"),
    "typed_linear": (2, lambda v, rows: rows(1), "a parameter with {} entries"),
    "one_hot": (0, lambda v, rows: v.attr["classes"], "one_hot with {} classes"),
}


def check_value_ids(v, ids, rows: Callable[[int], int]) -> None:
    """The id check of op ``v`` (in ``ID_OPERANDS``) on ``ids``; ``rows(k)``: the leading size of
    operand k."""
    operand, bound_of, what = ID_OPERANDS[v.op]
    bound = bound_of(v, rows)
    check_ids(ids, bound, v.operands[operand], what.format(bound))


def check_input_ids(program, arrays: Mapping[str, Any], dims: Mapping[str, int]) -> None:
    """The id checks of ``program`` whose ids are model inputs, on ``arrays`` as the caller gave them:
    run before the graph is laid out, so that a message names the caller's position."""
    for v in program.values:
        entry = ID_OPERANDS.get(v.op)
        if entry is None:
            continue
        source = v.operands[entry[0]]
        if source.op != "input" or source.attr["name"] not in arrays:
            continue

        def rows(k: int, v=v) -> int:
            return v.operands[k].type.shape[0].substitute(dict(dims)).value

        check_value_ids(v, arrays[source.attr["name"]], rows)


def check_ids(ids, bound: int, source, what: str) -> None:
    """Refuse int ids (a 1-D NumPy array or torch tensor) at or above ``bound``, naming the input that
    holds them and the first offending position."""
    if len(ids) and int(ids.max()) >= bound:
        pos = int((ids >= bound).nonzero()[0][0])
        name = source.attr.get("name", "the ids")
        raise InputError(f"{name}[{pos}] = {int(ids[pos])} is out of range for {what}",
                         f"{name} values must be below {bound}")
