"""The NumPy/SciPy backend: the reference semantics of mpdsl programs.

Values are NumPy arrays: a node / edge / graph value has its row axis first, a param value
none. Sum and mean aggregations are CSR sparse products (an n_segments x n_rows incidence
matrix in CSR order times the dense rows); max, min and softmax use sorted-segment
``reduceat``; no per-edge Python loop and no ``np.add.at``. An empty group reduces to 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import contextlib
import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
import scipy.special
from scipy.sparse import _sparsetools  # csr_matvecs writes into a slice of the output (no copy)

from mpdsl.backends import Backend, batch_norm_statistics, batch_norm_training, check_ids, register_backend, rule
from mpdsl.ir import Program, Value
from mpdsl.types import Domain, TensorType


WORKERS = max(1, min(8, os.cpu_count() or 1))
_POOL = ThreadPoolExecutor(WORKERS, thread_name_prefix="mpdsl-numpy")  # sparse products release the GIL
PARALLEL_ROWS = 8192  # below this many rows a dense op runs in one piece


class _BlasThreads:
    """The thread count of the OpenBLAS builds loaded in this process (NumPy's). While a program
    runs, BLAS is held to one thread and the backend splits rows over its own pool instead: idle
    OpenBLAS workers spin after each call and would steal the cores from the sparse kernels."""

    _SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                "scipy_openblas_set_num_threads", "openblas_set_num_threads64_")

    def __init__(self):
        self._libs = None

    def _load(self) -> list:
        if self._libs is None:
            self._libs = []
            try:
                paths = {line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.lower()}
            except OSError:
                paths = set()
            for path in sorted(paths):
                try:
                    lib = ctypes.CDLL(path)
                except OSError:
                    continue
                for name in self._SETTERS:
                    getter = name.replace("set_num", "get_num")
                    if hasattr(lib, name) and hasattr(lib, getter):
                        self._libs.append((getattr(lib, name), getattr(lib, getter)))
                        break
        return self._libs

    @contextlib.contextmanager
    def limited(self, threads: int):
        libs = self._load()
        previous = [get() for _, get in libs]
        for set_, _ in libs:
            set_(threads)
        try:
            yield
        finally:
            for (set_, _), count in zip(libs, previous):
                set_(count)


BLAS = _BlasThreads()


def row_parallel(rows: int, work) -> None:
    """Run ``work(start, stop)`` over row blocks on the backend's pool (one block when small)."""
    if rows < PARALLEL_ROWS or WORKERS == 1:
        work(0, rows)
        return
    bounds = np.linspace(0, rows, WORKERS + 1).astype(int)
    list(_POOL.map(lambda i: work(bounds[i], bounds[i + 1]), range(WORKERS)))


@dataclass
class Segments:
    """A grouping of rows into segments: ``perm`` lists rows grouped by segment (stable), rows
    ``perm[indptr[s]:indptr[s+1]]`` belong to segment ``s``."""

    index: np.ndarray
    indptr: np.ndarray
    perm: np.ndarray
    _matrices: dict = field(default_factory=dict)

    @property
    def num_segments(self) -> int:
        return len(self.indptr) - 1

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)

    def incidence(self, dtype) -> sp.csr_matrix:
        """The num_segments x num_rows 0/1 matrix whose row s selects the rows of segment s."""
        key = np.dtype(dtype)
        if key not in self._matrices:
            data = np.ones(len(self.perm), dtype=key)
            self._matrices[key] = sp.csr_matrix((data, self.perm, self.indptr),
                                                shape=(self.num_segments, len(self.index)))
        return self._matrices[key]

    def sum(self, rows: np.ndarray) -> np.ndarray:
        flat = rows.reshape(len(rows), _width(rows.shape[1:]))
        out = np.asarray(self.incidence(rows.dtype) @ flat)
        return out.reshape((self.num_segments,) + rows.shape[1:])

    def extreme(self, rows: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
        out = np.zeros((self.num_segments,) + rows.shape[1:], dtype=rows.dtype)
        nonempty = self.indptr[1:] > self.indptr[:-1]
        if nonempty.any():
            # Empty segments contribute no rows, so the starts of the non-empty ones delimit them exactly.
            out[nonempty] = ufunc.reduceat(np.take(rows, self.perm, axis=0), self.indptr[:-1][nonempty], axis=0)
        return out

    def broadcast(self, per_segment: np.ndarray) -> np.ndarray:
        return np.take(per_segment, self.index, axis=0)


class PullCSR:
    """A graph's edges grouped by the node they reduce onto (dst, or src for by-src ops), for
    pull-style sparse products: row i of the N x N matrix holds the edges reducing onto i, its
    column indices the nodes they read. Rows are split into blocks of equal edge count (one per
    worker) so a skewed degree distribution still balances; index arrays are int32 where they fit."""

    def __init__(self, indptr: np.ndarray, perm: np.ndarray, read: np.ndarray, num_nodes: int,
                 workers: int = WORKERS):
        small = len(perm) < 2 ** 31 - 1 and num_nodes < 2 ** 31 - 1
        itype = np.int32 if small else np.int64
        self.indptr = indptr.astype(itype)
        self.perm = perm
        self.in_edge_order = bool(np.array_equal(perm, np.arange(len(perm))))  # edges already sorted
        self.row_of_edge = np.repeat(np.arange(num_nodes, dtype=itype), np.diff(indptr))  # CSR order
        self.columns = read[perm].astype(itype)
        self.num_nodes = num_nodes
        self.nnz = len(perm)
        targets = np.linspace(0, self.nnz, workers + 1)
        bounds = np.searchsorted(indptr, targets, side="left").clip(0, num_nodes)
        bounds[0], bounds[-1] = 0, num_nodes
        self.blocks = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        self._local_indptr = [self.indptr[a:b + 1] - self.indptr[a] for a, b in self.blocks]
        self._ones: dict = {}  # cached edge values: all ones per dtype, mean weights per dtype
        self._expanded: dict[int, PullCSR] = {}

    def expanded(self, groups: int) -> "PullCSR":
        """The same edges over (node, group) rows: row i * groups + q holds row i's edges, reading
        node j's group q (row j * groups + q of the input); its per-edge values are the CSR-ordered
        [E, groups] weights flattened. Cached per group count."""
        if groups not in self._expanded:
            lengths = np.diff(self.indptr).astype(np.int64)
            big_indptr = np.concatenate([[0], np.cumsum(np.repeat(lengths, groups))])
            big_rows = np.repeat(np.arange(self.num_nodes * groups), np.repeat(lengths, groups))
            position = np.arange(len(big_rows)) - big_indptr[big_rows]
            node, group = big_rows // groups, big_rows % groups
            edge = self.indptr[node].astype(np.int64) + position  # CSR position of the edge
            value_index = edge * groups + group                    # into the flattened [E, groups] values
            read = np.empty(len(value_index), dtype=np.int64)
            read[value_index] = self.columns[edge].astype(np.int64) * groups + group
            self._expanded[groups] = PullCSR(big_indptr, value_index, read, self.num_nodes * groups)
        return self._expanded[groups]

    def ordered(self, per_edge: np.ndarray) -> np.ndarray:
        """Per-edge values in CSR order (no copy when the edges are stored sorted)."""
        return per_edge if self.in_edge_order else np.take(per_edge, self.perm, axis=0)

    def mean_weights(self, dtype) -> np.ndarray:
        """Per-edge 1 / (edge count of its row), in CSR order: an SpMM with these is a mean."""
        key = ("mean", np.dtype(dtype))
        if key not in self._ones:
            counts = np.maximum(np.diff(self.indptr), 1)
            self._ones[key] = np.repeat((1.0 / counts).astype(dtype), np.diff(self.indptr))
        return self._ones[key]

    def ones(self, dtype) -> np.ndarray:
        key = np.dtype(dtype)
        if key not in self._ones:
            self._ones[key] = np.ones(self.nnz, dtype=key)
        return self._ones[key]

    def spmm(self, x: np.ndarray, data: np.ndarray | None = None) -> np.ndarray:
        """out[i] = sum over row i's edges e of data[e] * x[column[e]]; ``data`` in CSR order
        (None: all ones). x is [N, F] (any trailing shape is flattened)."""
        if x.dtype == np.float16:  # SciPy's sparse kernels have no float16: accumulate in float32
            half = None if data is None else data.astype(np.float32)
            return self.spmm(x.astype(np.float32), half).astype(np.float16)
        x2 = np.ascontiguousarray(x.reshape(x.shape[0], _width(x.shape[1:])))
        data = self.ones(x.dtype) if data is None else np.ascontiguousarray(data, dtype=x.dtype)
        out = np.zeros((self.num_nodes, x2.shape[1]), dtype=x.dtype)
        if self.nnz and x2.shape[1]:
            width = x2.shape[1]

            def run(block: int) -> None:
                a, b = self.blocks[block]
                lo, hi = int(self.indptr[a]), int(self.indptr[b])
                _sparsetools.csr_matvecs(b - a, x2.shape[0], width, self._local_indptr[block],
                                         self.columns[lo:hi], data[lo:hi], x2.ravel(), out[a:b].ravel())

            if len(self.blocks) > 1:
                list(_POOL.map(run, range(len(self.blocks))))
            else:
                run(0)
        return out.reshape((self.num_nodes,) + x.shape[1:])

    def extreme(self, x: np.ndarray, ufunc: np.ufunc, weights: np.ndarray | None) -> np.ndarray:
        """out[i] = max (or min) over row i's edges of weight * x[column]; 0 for empty rows. Works
        in row blocks so at most ~4M gathered elements exist at once."""
        out = np.zeros((self.num_nodes,) + x.shape[1:], dtype=x.dtype)
        row_size = max(1, int(np.prod(x.shape[1:])))
        step = max(1, (4 << 20) // row_size)
        lengths = np.diff(self.indptr)
        start_row = 0
        while start_row < self.num_nodes:
            lo = int(self.indptr[start_row])
            end_row = int(np.searchsorted(self.indptr, lo + step, side="right")) - 1
            end_row = min(max(end_row, start_row + 1), self.num_nodes)
            hi = int(self.indptr[end_row])
            if hi > lo:
                values = np.take(x, self.columns[lo:hi], axis=0)
                if weights is not None:
                    w = weights[lo:hi]
                    values = values * w.reshape(w.shape + (1,) * (values.ndim - w.ndim))
                rows = np.nonzero(lengths[start_row:end_row])[0]
                starts = self.indptr[start_row:end_row][rows] - lo
                out[start_row + rows] = ufunc.reduceat(values, starts, axis=0)
            start_row = end_row
        return out


@dataclass
class ExecContext:
    program: Program
    graph: Any
    inputs: dict[str, np.ndarray]
    params: dict[str, np.ndarray]
    dims: dict[str, int]
    float_dtype: np.dtype
    training: bool
    rng: np.random.Generator
    segments: dict[str, Segments] = field(default_factory=dict)
    state_updates: dict[str, np.ndarray] = field(default_factory=dict)  # param name -> new value (batch_norm)

    def segments_by(self, by: str) -> Segments:
        if by not in self.segments:
            g = self.graph
            if by == "dst":
                indptr, perm = g.csr_by_dst()
                index = g.dst
            elif by == "src":
                indptr, perm = g.csr_by_src()
                index = g.src
            else:
                indptr, perm = g.segments_by_graph()
                index = g.batch
            self.segments[by] = Segments(index, indptr, perm)
        return self.segments[by]

    def pull(self, by: str) -> PullCSR:
        g = self.graph
        if by == "dst":
            return g.cached("numpy.pull_dst", lambda: PullCSR(*g.csr_by_dst(), g.src, g.num_nodes))
        return g.cached("numpy.pull_src", lambda: PullCSR(*g.csr_by_src(), g.dst, g.num_nodes))

    def rows(self, domain: Domain) -> int:
        g = self.graph
        return {Domain.NODE: g.num_nodes, Domain.EDGE: g.num_edges, Domain.GRAPH: g.num_graphs}[domain]

    def concrete_shape(self, t: TensorType) -> tuple[int, ...]:
        return tuple(d.substitute(self.dims).value for d in t.shape)


def _width(shape) -> int:
    """Number of elements of a (feature) shape; explicit so that zero-row arrays reshape too."""
    return int(np.prod(shape, dtype=np.int64))


def _expand(arr: np.ndarray, t: TensorType, result: TensorType) -> np.ndarray:
    """Reshape an operand for NumPy broadcasting under mpdsl's rules (param: no row axis;
    feature shapes aligned from the left)."""
    pad = (1,) * (result.rank - t.rank)
    if result.domain is Domain.PARAM:
        return arr.reshape(arr.shape + pad)
    if t.domain is Domain.PARAM:
        return arr.reshape((1,) + arr.shape + pad)
    return arr.reshape(arr.shape + pad)


_UNARY = {
    "neg": np.negative,
    "relu": lambda x: np.maximum(x, 0),
    "sigmoid": scipy.special.expit,
    "tanh": np.tanh,
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "rsqrt": lambda x: 1 / np.sqrt(x),
    "abs": np.abs,
    "gelu": lambda x: 0.5 * x * (1 + scipy.special.erf(x / math.sqrt(2))),
    "silu": lambda x: x * scipy.special.expit(x),
    "softplus": lambda x: np.logaddexp(0, x),
}
_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum,
}


@register_backend("numpy")
class NumpyBackend(Backend):
    """Interprets the IR op by op with NumPy and SciPy sparse products (the reference).

    After a run, ``last_state_updates`` maps parameter names to their new values: the running
    statistics that the run's batch_norm ops in training form updated (empty otherwise); the caller
    (``CompiledModel.run``, the torch module) stores them."""

    last_state_updates: dict[str, np.ndarray] = {}

    def run(self, program: Program, graph, inputs: dict, params: dict, dims: dict[str, int],
            training: bool = False, seed: int | None = None) -> dict[str, np.ndarray]:
        float_dtype = np.dtype({"f32": np.float32, "f64": np.float64, "f16": np.float16}[program.float_dtype])
        ctx = ExecContext(program, graph, inputs, params, dims, float_dtype, training,
                          np.random.default_rng(seed))
        env: dict[int, np.ndarray] = {}
        timings: dict[str, float] = {}
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"), BLAS.limited(1):
            for v in program.values:
                start = time.perf_counter()
                args = [env[id(o)] for o in v.operands]
                out = self.rules[v.op](self, ctx, v, *args)
                env[id(v)] = out
                timings[v.op] = timings.get(v.op, 0.0) + time.perf_counter() - start
        self.last_op_seconds = timings
        self.last_state_updates = ctx.state_updates
        return {name: env[id(v)] for name, v in program.outputs}

    # ---- sources -------------------------------------------------------------------------

    @rule("const")
    def _const(self, ctx, v):
        return np.asarray(v.attr["value"], dtype=ctx.float_dtype)

    @rule("degree")
    def _degree(self, ctx, v):
        g = ctx.graph
        counts = g.in_degree() if v.attr["dir"] == "in" else g.out_degree()
        return counts.astype(ctx.float_dtype)

    # ---- elementwise ---------------------------------------------------------------------

    @rule(*_UNARY)
    def _unary(self, ctx, v, x):
        return _UNARY[v.op](x).astype(x.dtype, copy=False)

    @rule("leaky_relu")
    def _leaky_relu(self, ctx, v, x):
        slope = x.dtype.type(v.attr["slope"])
        if 0 <= slope <= 1:
            return np.maximum(x, x * slope)
        return np.where(x > 0, x, x * slope)

    @rule("elu")
    def _elu(self, ctx, v, x):
        return np.where(x > 0, x, x.dtype.type(v.attr["alpha"]) * np.expm1(np.minimum(x, 0)))

    @rule("dropout")
    def _dropout(self, ctx, v, x):
        p = v.attr["p"]
        if not ctx.training or p == 0:
            return x
        keep = ctx.rng.random(x.shape) >= p
        return np.where(keep, x / x.dtype.type(1 - p), 0).astype(x.dtype, copy=False)

    @rule("batch_norm")
    def _batch_norm(self, ctx, v, x, running_mean, running_var, gamma, beta):
        eps = x.dtype.type(v.attr["eps"])
        if not batch_norm_training(v, ctx.training):
            return ((x - running_mean) * (1 / np.sqrt(running_var + eps)) * gamma + beta).astype(x.dtype, copy=False)
        centred, var = batch_norm_statistics(v, x, ctx, lambda a: np.array(a, copy=True))
        return (centred * (1 / np.sqrt(var + eps)) * gamma + beta).astype(x.dtype, copy=False)

    @rule(*_BINARY)
    def _binary(self, ctx, v, a, b):
        ta, tb = (o.type for o in v.operands)
        a, b = _expand(a, ta, v.type), _expand(b, tb, v.type)
        shape = np.broadcast_shapes(a.shape, b.shape)
        ufunc = _BINARY[v.op]
        if v.type.domain is Domain.PARAM or shape[0] < PARALLEL_ROWS:
            return ufunc(a, b).astype(ctx.float_dtype, copy=False)
        out = np.empty(shape, dtype=ctx.float_dtype)

        def rows(x, lo, hi):
            return x[lo:hi] if x.shape[0] != 1 else x

        row_parallel(shape[0], lambda lo, hi: ufunc(rows(a, lo, hi), rows(b, lo, hi), out=out[lo:hi]))
        return out

    # ---- dense algebra -------------------------------------------------------------------

    @rule("matmul")
    def _matmul(self, ctx, v, a, b):
        ta, tb = (o.type for o in v.operands)
        k = a.shape[-1]
        if tb.domain is Domain.PARAM:
            a2 = a.reshape(_width(a.shape[:-1]), k)
            b2 = b.reshape(k, _width(b.shape[1:]))
            out = np.empty((a2.shape[0], b2.shape[1]), dtype=np.result_type(a, b))
            row_parallel(a2.shape[0], lambda lo, hi: np.matmul(a2[lo:hi], b2, out=out[lo:hi]))
            return out.reshape(a.shape[:-1] + b.shape[1:])
        rows = b.shape[0]
        a_feat = a.shape[:-1] if ta.domain is Domain.PARAM else a.shape[1:-1]
        a3 = a.reshape((1 if ta.domain is Domain.PARAM else rows, _width(a_feat), k))
        b3 = b.reshape(rows, k, _width(b.shape[2:]))
        return np.matmul(a3, b3).reshape((rows,) + a_feat + b.shape[2:])

    @staticmethod
    def _axis(v: Value, axis: int) -> int:
        t = v.operands[0].type
        axis %= t.rank
        return axis if t.domain is Domain.PARAM else axis + 1

    @rule("einsum")
    def _einsum(self, ctx, v, *xs):
        inputs, out = v.attr["spec"].split("->")
        terms = [("..." if o.type.domain is not Domain.PARAM else "") + term
                 for term, o in zip(inputs.split(","), v.operands)]
        row = "..." if v.type.domain is not Domain.PARAM else ""
        return np.einsum(f"{','.join(terms)}->{row}{out}", *xs, optimize=len(xs) > 2)

    @rule("reduce")
    def _reduce(self, ctx, v, x):
        fn = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min}[v.attr["reduce"]]
        return fn(x, axis=self._axis(v, v.attr["axis"]))

    @rule("axis_softmax")
    def _axis_softmax(self, ctx, v, x):
        return scipy.special.softmax(x, axis=self._axis(v, v.attr["axis"])).astype(x.dtype, copy=False)

    @rule("concat")
    def _concat(self, ctx, v, *xs):
        return np.concatenate(xs, axis=self._axis(v, v.attr["axis"]))

    @rule("reshape")
    def _reshape(self, ctx, v, x):
        shape = ctx.concrete_shape(v.type)
        return x.reshape(shape if v.type.domain is Domain.PARAM else (x.shape[0],) + shape)

    # ---- graph movement ------------------------------------------------------------------

    @rule("gather")
    def _gather(self, ctx, v, x):
        g = ctx.graph
        index = {"src": g.src, "dst": g.dst, "batch": g.batch}[v.attr["index"]]
        return np.take(x, index, axis=0)  # np.take: faster than fancy indexing for row gathers

    @rule("take")
    def _take(self, ctx, v, w, index):
        check_ids(index, w.shape[0], v.operands[1], f"a parameter with {w.shape[0]} entries")
        return np.take(w, index, axis=0)

    @rule("one_hot")
    def _one_hot(self, ctx, v, ids):
        classes = v.attr["classes"]
        check_ids(ids, classes, v.operands[0], f"one_hot with {classes} classes")
        return np.eye(classes, dtype=ctx.float_dtype)[ids]

    @rule("aggregate")
    def _aggregate(self, ctx, v, x):
        seg = ctx.segments_by(v.attr["by"])
        kind = v.attr["reduce"]
        if kind == "max":
            return seg.extreme(x, np.maximum)
        if kind == "min":
            return seg.extreme(x, np.minimum)
        total = seg.sum(x)
        if kind == "sum":
            return total
        counts = np.maximum(seg.counts, 1).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        mean = total / counts
        if kind == "mean":
            return mean
        # std: population standard deviation, two-pass (deviations from the group mean) for accuracy.
        centred = x - seg.broadcast(mean)
        return np.sqrt(seg.sum(centred * centred) / counts)

    @rule("softmax")
    def _softmax(self, ctx, v, x):
        seg = ctx.segments_by(v.attr["by"])
        shifted = np.exp(x - seg.broadcast(seg.extreme(x, np.maximum)))
        return shifted / seg.broadcast(seg.sum(shifted))

    # ---- fused graph ops -----------------------------------------------------------------

    @staticmethod
    def _grouped_spmm(csr: PullCSR, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """out[i, q] = sum over row i's edges e of w[e, q] * x[column e, q] for each group q of the
        leading feature axes the weights cover (per-head weights): one sparse product over the
        (node, group) rows, reading x in place. ``w`` is in CSR order."""
        groups = _width(w.shape[1:])
        expanded = csr.expanded(groups)
        xs = x.reshape((x.shape[0] * groups, _width(x.shape[1:]) // max(groups, 1)))
        out = expanded.spmm(xs, expanded.ordered(w.reshape(-1) if w.size else w.reshape(0)))
        return out.reshape(x.shape)

    @rule("gspmm")
    def _gspmm(self, ctx, v, x, w=None):
        csr = ctx.pull(v.attr["by"])
        kind = v.attr["reduce"]
        if kind in ("max", "min"):
            ufunc = np.maximum if kind == "max" else np.minimum
            return csr.extreme(x, ufunc, None if w is None else csr.ordered(w))
        if w is None:
            # mean: the 1 / count of each row is the product's edge value (no division pass)
            return csr.spmm(x, csr.mean_weights(x.dtype) if kind == "mean" else None)
        out = csr.spmm(x, csr.ordered(w)) if w.ndim == 1 else self._grouped_spmm(csr, x, csr.ordered(w))
        if kind == "mean":
            counts = np.maximum(np.diff(csr.indptr), 1).astype(x.dtype)
            out /= counts.reshape((-1,) + (1,) * (x.ndim - 1))
        return out

    @rule("attention")
    def _attention(self, ctx, v, s, x):
        csr = ctx.pull(v.attr["by"])
        scores = csr.ordered(s)
        rows = np.diff(csr.indptr) > 0
        starts = csr.indptr[:-1][rows]
        out = np.zeros_like(x)
        if not len(starts):
            return out
        # Softmax per row: subtract the row max, exponentiate, aggregate, then divide the aggregated
        # row (N x S) by the row total instead of normalising every edge weight (E x P).
        peak = np.zeros((csr.num_nodes,) + s.shape[1:], dtype=s.dtype)
        peak[rows] = np.maximum.reduceat(scores, starts, axis=0)
        weights = scores - np.take(peak, csr.row_of_edge, axis=0)
        np.exp(weights, out=weights)
        totals = np.add.reduceat(weights, starts, axis=0)
        out = csr.spmm(x, weights) if weights.ndim == 1 else self._grouped_spmm(csr, x, weights)
        out[rows] /= totals.reshape(totals.shape + (1,) * (x.ndim - totals.ndim))
        return out

    @rule("typed_linear")
    def _typed_linear(self, ctx, v, h, w, types):
        g = ctx.graph
        nodes = g.src if v.attr["index"] == "src" else g.dst
        relations = w.shape[0]
        check_ids(types, relations, v.operands[2], f"a parameter with {relations} entries")
        pairs, inverse = np.unique(nodes * relations + types, return_inverse=True)
        pair_nodes, pair_types = pairs // relations, pairs % relations
        k = h.shape[-1]
        out_shape = h.shape[1:-1] + w.shape[2:]
        compact = np.empty((len(pairs),) + out_shape, dtype=h.dtype)
        order = np.argsort(pair_types, kind="stable")
        bounds = np.searchsorted(pair_types[order], np.arange(relations + 1))
        for r in range(relations):
            rows = order[bounds[r]:bounds[r + 1]]
            if len(rows):
                block = h[pair_nodes[rows]]
                product = block.reshape(_width(block.shape[:-1]), k) @ w[r].reshape(k, _width(w.shape[2:]))
                compact[rows] = product.reshape((len(rows),) + out_shape)
        return compact[inverse]

    # ---- ops of gradient programs --------------------------------------------------------

    @rule("gt", "eq")
    def _compare(self, ctx, v, a, b):
        ta, tb = (o.type for o in v.operands)
        ufunc = np.greater if v.op == "gt" else np.equal
        return ufunc(_expand(a, ta, v.type), _expand(b, tb, v.type)).astype(ctx.float_dtype)

    @rule("contract_rows")
    def _contract_rows(self, ctx, v, *xs):
        inputs, out = v.attr["spec"].split("->")
        terms = [("" if o.type.domain is Domain.PARAM else "R") + term.strip()
                 for term, o in zip(inputs.split(","), v.operands)]
        return np.asarray(np.einsum(f"{','.join(terms)}->{out.strip()}", *xs, optimize=True), dtype=ctx.float_dtype)

    @rule("broadcast")
    def _broadcast(self, ctx, v, x):
        shape = ctx.concrete_shape(v.type)
        if v.type.domain is Domain.PARAM:
            full, arr = shape, x.reshape(x.shape + (1,) * (len(shape) - x.ndim))
        else:
            full = (ctx.rows(v.type.domain),) + shape
            arr = _expand(x, v.operands[0].type, v.type)
        return np.array(np.broadcast_to(arr, full), dtype=ctx.float_dtype)

    @rule("slice")
    def _slice(self, ctx, v, x):
        axis = self._axis(v, v.attr["axis"])
        return np.ascontiguousarray(x[(slice(None),) * axis + (slice(v.attr["start"], v.attr["stop"]),)])

    @rule("pad")
    def _pad(self, ctx, v, x):
        widths = [(0, 0)] * x.ndim
        widths[self._axis(v, v.attr["axis"])] = (v.attr["before"], v.attr["after"])
        return np.pad(x, widths)
