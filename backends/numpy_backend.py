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

import numpy as np
import scipy.sparse as sp
import scipy.special

from mpdsl.backends import Backend, register_backend, rule
from mpdsl.diagnostics import InputError
from mpdsl.ir import Program, Value
from mpdsl.types import Domain, TensorType


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
        flat = rows.reshape(len(rows), int(np.prod(rows.shape[1:])))
        out = np.asarray(self.incidence(rows.dtype) @ flat)
        return out.reshape((self.num_segments,) + rows.shape[1:])

    def extreme(self, rows: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
        out = np.zeros((self.num_segments,) + rows.shape[1:], dtype=rows.dtype)
        nonempty = self.indptr[1:] > self.indptr[:-1]
        if nonempty.any():
            # Empty segments contribute no rows, so the starts of the non-empty ones delimit them exactly.
            out[nonempty] = ufunc.reduceat(rows[self.perm], self.indptr[:-1][nonempty], axis=0)
        return out

    def broadcast(self, per_segment: np.ndarray) -> np.ndarray:
        return per_segment[self.index]


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

    def concrete_shape(self, t: TensorType) -> tuple[int, ...]:
        return tuple(d.substitute(self.dims).value for d in t.shape)


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
    """Interprets the IR op by op with NumPy and SciPy sparse products (the reference)."""

    def run(self, program: Program, graph, inputs: dict, params: dict, dims: dict[str, int],
            training: bool = False, seed: int | None = None) -> dict[str, np.ndarray]:
        float_dtype = np.dtype({"f32": np.float32, "f64": np.float64, "f16": np.float16}[program.float_dtype])
        ctx = ExecContext(program, graph, inputs, params, dims, float_dtype, training,
                          np.random.default_rng(seed))
        env: dict[int, np.ndarray] = {}
        timings: dict[str, float] = {}
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for v in program.values:
                start = time.perf_counter()
                args = [env[id(o)] for o in v.operands]
                out = self.rules[v.op](self, ctx, v, *args)
                env[id(v)] = out
                timings[v.op] = timings.get(v.op, 0.0) + time.perf_counter() - start
        self.last_op_seconds = timings
        return {name: env[id(v)] for name, v in program.outputs}

    # ---- sources -------------------------------------------------------------------------

    @rule("input")
    def _input(self, ctx, v):
        return ctx.inputs[v.attr["name"]]

    @rule("param")
    def _param(self, ctx, v):
        return ctx.params[v.attr["name"]]

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
        return np.where(x > 0, x, x * x.dtype.type(v.attr["slope"]))

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

    @rule(*_BINARY)
    def _binary(self, ctx, v, a, b):
        ta, tb = (o.type for o in v.operands)
        out = _BINARY[v.op](_expand(a, ta, v.type), _expand(b, tb, v.type))
        return out.astype(ctx.float_dtype, copy=False)

    # ---- dense algebra -------------------------------------------------------------------

    @rule("matmul")
    def _matmul(self, ctx, v, a, b):
        ta, tb = (o.type for o in v.operands)
        k = a.shape[-1]
        if tb.domain is Domain.PARAM:
            out = a.reshape(-1, k) @ b.reshape(k, -1)
            return out.reshape(a.shape[:-1] + b.shape[1:])
        rows = b.shape[0]
        a3 = a.reshape((1 if ta.domain is Domain.PARAM else rows), -1, k)
        b3 = b.reshape(rows, k, -1)
        out = np.matmul(a3, b3)
        a_feat = a.shape[:-1] if ta.domain is Domain.PARAM else a.shape[1:-1]
        return out.reshape((rows,) + a_feat + b.shape[2:])

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
        return x[index]

    @rule("take")
    def _take(self, ctx, v, w, index):
        if len(index) and index.max() >= w.shape[0]:
            pos = int(np.argmax(index >= w.shape[0]))
            source = v.operands[1]
            name = source.attr.get("name", "the index")
            raise InputError(f"{name}[{pos}] = {int(index[pos])} is out of range for a parameter with "
                             f"{w.shape[0]} entries", f"{name} values must be below {w.shape[0]}")
        return w[index]

    @rule("one_hot")
    def _one_hot(self, ctx, v, ids):
        classes = v.attr["classes"]
        if len(ids) and ids.max() >= classes:
            pos = int(np.argmax(ids >= classes))
            name = v.operands[0].attr.get("name", "the ids")
            raise InputError(f"{name}[{pos}] = {int(ids[pos])} is out of range for one_hot with {classes} classes",
                             f"{name} values must be below {classes}")
        return np.eye(classes, dtype=ctx.float_dtype)[ids]

    @rule("select")
    def _select(self, ctx, v, x):
        return x[v.attr["index"]] if v.operands[0].type.domain is Domain.PARAM else x[:, v.attr["index"]]

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
