"""The Triton backend: generated Triton kernels for the graph ops, torch for dense algebra.

Graph ops (``gspmm``, ``match_gspmm``, ``attention`` and its backward passes, ``aggregate``,
``softmax``, ``typed_linear``, ``global_attention`` and its backward passes) run as Triton kernels
generated from the IR value (see ``mpdsl.backends.triton_kernels``: the source is built from the op's
attributes and static shapes, and cached by a hash of both). Every other op is a torch op with the
NumPy backend's semantics (left-aligned broadcasting, param values without a row axis). Values are torch tensors on the
device: CUDA when available, else the CPU, where the kernels run in Triton's interpreter.

Running it:

* on a CUDA GPU: ``mpdsl run model.mp --graph g.npz --backend triton``;
* without a GPU, in Triton's interpreter (slow; for tests): set ``TRITON_INTERPRET=1`` in the
  environment, or construct ``TritonBackend(interpret=True)``: the only switch by which the backend
  itself turns the interpreter on, and only while it defines its own kernels (lazily, at first use);
  ``interpret=False`` compiles them for the GPU even where TRITON_INTERPRET=1 is set.

Precision: float32 and float64 programs compute in their dtype. Half-precision programs (``f16``,
``bf16``; ``mpdsl.autodiff.retype(program, "f16")``) store every value in the half dtype but compute
in float32: the kernels load values into float32 and keep every accumulator in float32 (segment sums,
means, std, max/min, g-SpMM, the softmax's running max and exp-sum, the fused attention's, the COO
kernels' atomics into float32 scratch buffers, ``tl.dot`` in the typed matmul), rounding to the half
dtype once, when they store the result; dense ops run in torch on float32 copies of their operands
(matmul, einsum, axis reductions and softmax included), their results rounded once to the half dtype.
So a float16 sum of 3000 ones is 3000, not 2048. ``run`` returns float16 values as float16 arrays and
bfloat16 ones (NumPy has none) as float32 arrays holding the bfloat16 values. The tests
(tests/test_precision.py) hold the example models' f16 forward and gradient outputs to
``max |f16 - f32| <= 2e-2 * max |f32|`` against the f32 programs on the same f16-rounded data.
bfloat16 runs on a GPU only: Triton's interpreter has no bfloat16 arithmetic.
Options (``TritonBackend(...)``): ``layout`` ("coo" runs gspmm/attention with the COO + atomics
kernels whatever the plan chose, "csr" never), ``poison`` (fill every kernel output with NaN
before the kernel runs: tests check that kernels write every element), block sizes, ``device``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from mpdsl.backends import (
    Backend,
    BackendError,
    array_axis,
    batch_norm_statistics,
    batch_norm_training,
    carry_table,
    check_value_ids,
    edge_graph,
    expand_operand,
    feature_width,
    gather_index,
    graph_blocks,
    register_backend,
    rule,
    space_rows,
)
from mpdsl.backends.triton_kernels import (
    KERNELS,
    REDUCTION_KERNELS,
    Attention,
    AttentionScoreGrad,
    AttentionValueGrad,
    CooAttention,
    CooGspmm,
    GlobalAttention,
    KernelSpec,
    MatchSegmentSum,
    SegmentLogSumExp,
    SegmentReduce,
    SegmentSoftmax,
    TypedLinear,
    next_pow2,
)
from mpdsl.ir import Program, Value, print_program
from mpdsl.ops import COMPUTED_OPS, OPS, ArrayMath, MissingRule, choose, sequence_values
from mpdsl.plan import runs_a_kernel
from mpdsl.types import DTYPE_NAMES, HALF_DTYPES, Domain, TensorType

torch: Any = None  # imported by _runtime() on first use, so that this module imports without torch

INSTALL_HINT = 'pip install "mpdsl[triton]"'


def _runtime(interpret: bool | None) -> tuple[Any, bool]:
    """(torch, interpreting). A one-line BackendError when torch or triton is missing, or when
    there is neither a CUDA device nor Triton's interpreter."""
    global torch
    try:
        import torch as torch_module
        import triton  # noqa: F401
    except ImportError as err:
        missing = getattr(err, "name", None) or "torch/triton"
        raise BackendError(f"the triton backend needs torch and triton ({missing} is not installed): "
                           f"{INSTALL_HINT}") from None
    torch = torch_module
    interpreting = interpret if interpret is not None else os.environ.get("TRITON_INTERPRET") == "1"
    if not interpreting and not torch.cuda.is_available():
        raise BackendError("the triton backend needs a CUDA GPU; without one, run its kernels in Triton's "
                           "interpreter (slow, for testing) by setting TRITON_INTERPRET=1 in the environment, "
                           "e.g. TRITON_INTERPRET=1 mpdsl run model.mp --graph g.npz --backend triton")
    return torch, interpreting


def _tensor_device(*groups: dict) -> Any:
    """The device of the first torch tensor among the arrays (a backend without a device runs there)."""
    for group in groups:
        for value in group.values():
            if isinstance(value, torch.Tensor):
                return value.device
    return None


def _host(t) -> np.ndarray:
    """A tensor as a NumPy array on the host; bfloat16 (which NumPy lacks) as float32, exactly."""
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- graph structures on the device ---------------------------------------------------------


@dataclass
class Segments:
    """Rows grouped into segments, on the device: members ``perm[indptr[s]:indptr[s+1]]`` of
    segment s (edge ids, or node ids for graphs), ``cols`` the other endpoint of each member edge
    in the same order (gather source), ``order`` the segments by decreasing size, ``counts`` the
    sizes, ``read`` / ``write`` the COO endpoints of every edge (value read at, reduced onto)."""

    indptr: Any
    perm: Any
    order: Any
    counts: Any
    num_segments: int
    cols: Any = None
    read: Any = None
    write: Any = None


def _index_dtype(*sizes: int):
    return torch.int32 if max(sizes, default=0) < 2 ** 31 - 1 else torch.int64


def _segments(graph, by: str, device) -> Segments:
    def build() -> Segments:
        if by == "dst":
            indptr, perm = graph.csr_by_dst()
            read, write = graph.src, graph.dst
        elif by == "src":
            indptr, perm = graph.csr_by_src()
            read, write = graph.dst, graph.src
        elif by == "graph":
            indptr, perm = graph.segments_by_graph()
            read = write = None
        else:
            raise MissingRule(f"the triton backend has no segments by {by!r}")
        itype = _index_dtype(len(perm), len(indptr))
        counts = np.diff(indptr)
        order = np.argsort(-counts, kind="stable")

        def dev(a):
            return torch.from_numpy(np.array(a)).to(device=device, dtype=itype)

        seg = Segments(dev(indptr), dev(perm), dev(order), dev(counts), len(indptr) - 1)
        if read is not None:
            seg.cols, seg.read, seg.write = dev(read[perm]), dev(read), dev(write)
        return seg

    return graph.cached(("triton.segments", by, str(device)), build)


def _graph_index(graph, name: str, device):
    def build():
        array = gather_index(graph, name)
        return torch.from_numpy(np.array(array, dtype=np.int64)).to(device)

    return graph.cached(("triton.index", name, str(device)), build)


# ---- execution context ----------------------------------------------------------------------


@dataclass
class TritonContext:
    graph: Any
    program: Program
    device: Any
    dtype: Any           # torch float dtype of the program's values
    dtype_name: str      # f32 f16 f64
    training: bool
    interpret: bool
    generator: Any
    dims: dict[str, int]
    inputs: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    launches: list[str] = field(default_factory=list)
    state_updates: dict[str, Any] = field(default_factory=dict)  # param name -> new value (batch_norm)

    def edges(self, name: str):
        """The graph seen through the program's edge set ``name`` ("": the graph's own edges)."""
        return edge_graph(self.graph, self.program, name)

    def segments(self, by: str, edges: str = "") -> Segments:
        return _segments(self.edges(edges), by, self.device)

    def index(self, name: str, edges: str = ""):
        return _graph_index(self.edges(edges), name, self.device)

    def carry_table(self, edges: str) -> dict[str, Any]:
        """The derived edge set's ``CarryTable`` as device tensors (made once per graph and device)."""
        graph = self.edges(edges)

        def build() -> dict[str, Any]:
            table = carry_table(graph)
            tensors = {name: torch.from_numpy(np.array(getattr(table, name))).to(self.device)
                       for name in ("origin", "kept", "added", "added_nodes", "nonloop", "nonloop_dst",
                                    "nonloop_count")}
            tensors["kept_origin"] = tensors["origin"].index_select(0, tensors["kept"])
            tensors["base_edges"] = table.base_edges
            return tensors

        return graph.cached(("triton.carry", str(self.device)), build)


class TorchMath(ArrayMath):
    """``mpdsl.ops.ArrayMath`` on torch tensors: the elementwise ops' ``compute`` rules run with it.
    Python-float operands are accepted where the rules pass them."""

    @staticmethod
    def _tensor(x, like):
        return x if isinstance(x, torch.Tensor) else torch.as_tensor(x, dtype=like.dtype, device=like.device)

    def negative(self, x): return torch.neg(x)
    def add(self, a, b): return torch.add(a, b)
    def subtract(self, a, b): return torch.sub(a, b)
    def multiply(self, a, b): return torch.mul(a, b)
    def divide(self, a, b): return torch.div(a, b)
    def power(self, a, b): return torch.pow(a, b)
    def exp(self, x): return torch.exp(x)
    def expm1(self, x): return torch.expm1(x)
    def log(self, x): return torch.log(x)
    def sqrt(self, x): return torch.sqrt(x)
    def rsqrt(self, x): return torch.rsqrt(x)
    def tanh(self, x): return torch.tanh(x)
    def abs(self, x): return torch.abs(x)
    def erf(self, x): return torch.erf(x)
    def sigmoid(self, x): return torch.sigmoid(x)
    def softplus(self, x): return torch.logaddexp(torch.zeros_like(x), x)
    def log1p(self, x): return torch.log1p(x)
    def log2(self, x): return torch.log2(x)
    def log10(self, x): return torch.log10(x)
    def sin(self, x): return torch.sin(x)
    def cos(self, x): return torch.cos(x)
    def tan(self, x): return torch.tan(x)
    def asin(self, x): return torch.asin(x)
    def acos(self, x): return torch.acos(x)
    def atan(self, x): return torch.atan(x)
    def sinh(self, x): return torch.sinh(x)
    def cosh(self, x): return torch.cosh(x)
    def sign(self, x): return torch.sign(x)
    def floor(self, x): return torch.floor(x)
    def ceil(self, x): return torch.ceil(x)
    def round(self, x): return torch.round(x)  # halves to even
    def trunc(self, x): return torch.trunc(x)
    def greater(self, a, b): return torch.gt(a, b)
    def greater_equal(self, a, b): return torch.ge(a, b)
    def less(self, a, b): return torch.lt(a, b)
    def less_equal(self, a, b): return torch.le(a, b)
    def equal(self, a, b): return torch.eq(a, b)
    def not_equal(self, a, b): return torch.ne(a, b)
    def logical_and(self, a, b): return torch.logical_and(a, b)
    def logical_or(self, a, b): return torch.logical_or(a, b)
    def logical_not(self, x): return torch.logical_not(x)

    def atan2(self, a, b):
        return torch.atan2(a, self._tensor(b, a))

    def maximum(self, a, b):
        return torch.clamp_min(a, b) if not isinstance(b, torch.Tensor) else torch.maximum(a, b)

    def minimum(self, a, b):
        return torch.clamp_max(a, b) if not isinstance(b, torch.Tensor) else torch.minimum(a, b)

    def where(self, cond, a, b):
        return torch.where(cond, a, self._tensor(b, a) if isinstance(a, torch.Tensor) else b)


TORCH_MATH = TorchMath()
_AXIS_REDUCTIONS = {"sum": lambda x, axis: torch.sum(x, axis), "mean": lambda x, axis: torch.mean(x, axis),
                    "max": lambda x, axis: torch.amax(x, axis), "min": lambda x, axis: torch.amin(x, axis)}


def uses_coo(override: str | None, v: Value) -> bool:
    """Whether graph op ``v`` runs on COO + atomics: the backend's layout override ("coo" / "csr"),
    else the plan's choice for ``v``."""
    return override == "coo" or (override != "csr" and v.attr.get("layout") == "coo")


@register_backend("triton")
class TritonBackend(Backend):
    """Generated Triton kernels for graph ops, torch for the rest (see the module docstring)."""

    target = "gpu"

    def __init__(self, *, interpret: bool | None = None, device: str | None = None, layout: str | None = None,
                 poison: bool = False, block_rows: int | None = None, block_features: int | None = None,
                 block_edges: int | None = None, block_m: int | None = None):
        if layout not in (None, "coo", "csr"):
            raise BackendError(f"unknown layout override {layout!r}", "use 'coo', 'csr' or None (follow the plan)")
        self.interpret = interpret
        self.device = device
        self.layout = layout
        self.poison = poison
        self.block_rows = block_rows
        self.block_features = block_features
        self.block_edges = block_edges
        self.block_m = block_m
        self.last_op_seconds: dict[str, float] = {}
        self.last_launches: list[str] = []
        # param name -> new value: the running statistics updated by batch_norm ops in training form
        # (NumPy arrays after run, tensors after run_tensors)
        self.last_state_updates: dict[str, Any] = {}

    # ---- running -------------------------------------------------------------------------

    def run(self, program: Program, graph, inputs: dict, params: dict, dims: dict[str, int],
            training: bool = False, seed: int | None = None) -> dict[str, np.ndarray]:
        """Like ``run_tensors``, with NumPy arrays out: float16 values as float16 arrays, bfloat16 ones
        (NumPy has no bfloat16) as float32 arrays holding the bfloat16 values exactly."""
        outputs = self.run_tensors(program, graph, inputs, params, dims, training, seed)
        self.last_state_updates = {name: _host(t) for name, t in self.last_state_updates.items()}
        return {name: _host(t) for name, t in outputs.items()}

    def run_tensors(self, program: Program, graph, inputs: dict, params: dict, dims: dict[str, int],
                    training: bool = False, seed: int | None = None) -> dict[str, Any]:
        """Like ``run``, but inputs and params may be torch tensors already on the device, and the
        outputs are torch tensors (no host copies: what a GPU benchmark and the torch module run).
        Without a ``device`` option the program runs on the device of the tensors given."""
        _, interpreting = _runtime(self.interpret)
        device = torch.device(self.device or _tensor_device(inputs, params)
                              or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype_name = program.float_dtype
        dtype = getattr(torch, DTYPE_NAMES[dtype_name])
        generator = torch.Generator(device=device)
        if seed is None:  # a SeedSequence made without entropy draws a fresh int
            seed = int(cast(int, np.random.SeedSequence().entropy) % 2 ** 63)
        generator.manual_seed(seed)
        ctx = TritonContext(graph, program, device, dtype, dtype_name, training, interpreting, generator, dims,
                            {k: self._tensor(a, device, dtype) for k, a in inputs.items()},
                            {k: self._tensor(a, device, dtype) for k, a in params.items()})
        env: dict[int, Any] = {}
        timings: dict[str, float] = {}  # host time per op (kernel launches are asynchronous on a GPU)
        half = dtype_name in HALF_DTYPES
        for v in program.values:
            start = time.perf_counter()
            args = [env[id(o)] for o in v.operands]
            if half and v.op not in KERNEL_OPS:  # dense ops on half values compute in float32, rounded once
                args = [a.float() if a.is_floating_point() else a for a in args]
            out = self.rules[v.op](self, ctx, v, *args)
            if half and out.is_floating_point():
                out = out.to(dtype)
            env[id(v)] = out
            timings[v.op] = timings.get(v.op, 0.0) + time.perf_counter() - start
        self.last_op_seconds = timings
        self.last_launches = ctx.launches
        self.last_state_updates = ctx.state_updates
        return {name: env[id(v)] for name, v in program.outputs}

    @staticmethod
    def _tensor(array, device, dtype=None):
        if isinstance(array, torch.Tensor):
            t = array
        else:
            array = np.asarray(array)
            if not array.flags.writeable or not array.flags.c_contiguous:
                array = np.array(array)
            t = torch.from_numpy(array)
        return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)

    # ---- kernel plumbing -----------------------------------------------------------------

    def _kernels(self, ctx: TritonContext, spec: KernelSpec) -> dict[str, Any]:
        ctx.launches.append(spec.name)
        return KERNELS.get(spec, ctx.interpret)

    def _output(self, ctx: TritonContext, shape: tuple[int, ...]):
        if self.poison:
            return torch.full(shape, float("nan"), dtype=ctx.dtype, device=ctx.device)
        return torch.empty(shape, dtype=ctx.dtype, device=ctx.device)

    def _row_blocks(self, ctx: TritonContext, width: int) -> tuple[int, int]:
        """(BLOCK_R, BLOCK_F): the interpreter pays per program, a GPU wants ~4K elements per program."""
        if ctx.interpret:
            block_f = min(next_pow2(width), self.block_features or 256)
            return self.block_rows or 256, block_f
        block_f = min(next_pow2(width), self.block_features or 128)
        return self.block_rows or max(4, min(64, 4096 // block_f)), block_f

    def _edge_block(self, ctx: TritonContext) -> int:
        return self.block_edges or (1024 if ctx.interpret else 64)

    def _layout(self, v: Value) -> str:
        return "coo" if uses_coo(self.layout, v) else "csr"

    @staticmethod
    def _arg(t):
        """Kernels get a one-element tensor in place of an empty one (never read: no null pointers)."""
        return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device)

    def _segment_launch(self, ctx, spec, seg: Segments, tensors: list, width: int, out):
        rows = seg.num_segments
        if out.numel() == 0:
            return out
        block_r, block_f = self._row_blocks(ctx, width)
        (fn,) = self._kernels(ctx, spec).values()
        grid = (_cdiv(rows, block_r), _cdiv(width, block_f))
        fn[grid](seg.indptr, seg.order, *[self._arg(t) for t in tensors], out, rows, BLOCK_R=block_r, BLOCK_F=block_f)
        return out

    # ---- sources -------------------------------------------------------------------------

    @rule("const")
    def _const(self, ctx, v):
        return torch.tensor(v.attr["value"], dtype=ctx.dtype, device=ctx.device)

    @rule("degree")
    def _degree(self, ctx, v):
        by = "dst" if v.attr["dir"] == "in" else "src"
        return ctx.segments(by, v.attr["edges"]).counts.to(ctx.dtype)

    @rule("arange", "linspace")
    def _sequence(self, ctx, v):
        (count,) = (d.substitute(ctx.dims).value for d in v.type.shape)
        index = torch.arange(count, dtype=torch.float64, device=ctx.device)
        return sequence_values(v.op, v.attr, index, torch.where).to(ctx.dtype)

    # ---- elementwise ---------------------------------------------------------------------

    @rule(*COMPUTED_OPS)
    def _elementwise(self, ctx, v, *xs):
        """An elementwise op: its ``compute`` rule (mpdsl.ops) with torch, on the broadcast operands."""
        xs = [expand_operand(x, o.type, v.type) for x, o in zip(xs, v.operands)]
        out = OPS[v.op].compute(TORCH_MATH, *xs, **v.attr)
        return out if out.is_floating_point() else out.to(xs[0].dtype)

    @rule("dropout")
    def _dropout(self, ctx, v, x):
        p = v.attr["p"]
        if not ctx.training or p == 0:
            return x
        keep = torch.rand(x.shape, generator=ctx.generator, device=ctx.device) >= p
        return torch.where(keep, x / (1 - p), torch.zeros_like(x))

    @rule("batch_norm")
    def _batch_norm(self, ctx, v, x, running_mean, running_var, gamma, beta):
        eps = v.attr["eps"]
        if not batch_norm_training(v, ctx.training):
            return (x - running_mean) * torch.rsqrt(running_var + eps) * gamma + beta
        centred, var = batch_norm_statistics(v, x, ctx, lambda a: a.clone())
        return centred * torch.rsqrt(var + eps) * gamma + beta

    # ---- dense algebra -------------------------------------------------------------------

    @rule("matmul")
    def _matmul(self, ctx, v, a, b):
        ta, tb = (o.type for o in v.operands)
        k = a.shape[-1]
        a_shape, b_shape = tuple(a.shape), tuple(b.shape)
        if tb.domain is Domain.PARAM:
            a2 = a.reshape(feature_width(a_shape[:-1]), k)
            b2 = b.reshape(k, feature_width(b_shape[1:]))
            return (a2 @ b2).reshape(a_shape[:-1] + b_shape[1:])
        rows = b_shape[0]
        a_feat = a_shape[:-1] if ta.domain is Domain.PARAM else a_shape[1:-1]
        a3 = a.reshape((1 if ta.domain is Domain.PARAM else rows, feature_width(a_feat), k))
        b3 = b.reshape(rows, k, feature_width(b_shape[2:]))
        return torch.matmul(a3, b3).reshape((rows,) + a_feat + b_shape[2:])

    @rule("einsum")
    def _einsum(self, ctx, v, *xs):
        inputs, out = v.attr["spec"].replace(" ", "").split("->")
        terms = [("..." if o.type.domain is not Domain.PARAM else "") + term
                 for term, o in zip(inputs.split(","), v.operands)]
        row = "..." if v.type.domain is not Domain.PARAM else ""
        return torch.einsum(f"{','.join(terms)}->{row}{out}", *xs)

    @rule("reduce")
    def _reduce(self, ctx, v, x):
        dim = array_axis(v, v.attr["axis"])
        if x.shape[dim] == 0:  # an empty axis reduces to 0, as an empty group does
            return x.new_zeros(x.shape[:dim] + x.shape[dim + 1:])
        fn = choose(_AXIS_REDUCTIONS, v.op, "reduce", v.attr["reduce"], "the triton backend's axis reductions")
        return fn(x, dim)

    @rule("axis_softmax")
    def _axis_softmax(self, ctx, v, x):
        return torch.softmax(x, dim=array_axis(v, v.attr["axis"]))

    @rule("concat")
    def _concat(self, ctx, v, *xs):
        return torch.cat(xs, dim=array_axis(v, v.attr["axis"]))

    @rule("reshape")
    def _reshape(self, ctx, v, x):
        shape = tuple(d.substitute(ctx.dims).value for d in v.type.shape)
        return x.reshape(shape if v.type.domain is Domain.PARAM else (x.shape[0],) + shape)

    # ---- ops of gradient programs (torch) ------------------------------------------------

    @rule("contract_rows")
    def _contract_rows(self, ctx, v, *xs):
        inputs, out = v.attr["spec"].replace(" ", "").split("->")
        terms = [("" if o.type.domain is Domain.PARAM else "R") + term
                 for term, o in zip(inputs.split(","), v.operands)]
        return torch.einsum(f"{','.join(terms)}->{out}", *xs)

    @rule("broadcast")
    def _broadcast(self, ctx, v, x):
        shape = tuple(d.substitute(ctx.dims).value for d in v.type.shape)
        if v.type.domain is not Domain.PARAM:
            shape = (space_rows(ctx.graph, ctx.program, v.type.space),) + shape
        return expand_operand(x, v.operands[0].type, v.type).expand(shape).contiguous()

    @rule("slice")
    def _slice(self, ctx, v, x):
        start, stop = v.attr["start"], v.attr["stop"]
        return x.narrow(array_axis(v, v.attr["axis"]), start, stop - start).contiguous()

    @rule("pad")
    def _pad(self, ctx, v, x):
        axis = array_axis(v, v.attr["axis"])

        def zeros(n):
            shape = list(x.shape)
            shape[axis] = n
            return x.new_zeros(shape)

        return torch.cat([zeros(v.attr["before"]), x, zeros(v.attr["after"])], dim=axis)

    # ---- graph movement (torch) ----------------------------------------------------------

    @rule("gather")
    def _gather(self, ctx, v, x):
        return x.index_select(0, ctx.index(v.attr["index"], v.attr["edges"]))

    @rule("carry")
    def _carry(self, ctx, v, x):
        """Edge values carried onto a derived edge set (the NumPy backend's ``carry_values``, in torch)."""
        t = ctx.carry_table(v.attr["edges"])
        out = x.new_empty((len(t["origin"]),) + tuple(x.shape[1:]))
        out[t["kept"]] = x.index_select(0, t["kept_origin"])
        if v.attr["fill"] == "constant":
            out[t["added"]] = v.attr["value"]
            return out
        totals = self._loop_totals(x.index_select(0, t["nonloop"]), t, v.attr["fill"], accumulate=True)
        out[t["added"]] = totals.index_select(0, t["added_nodes"])
        return out

    @rule("carry_grad")
    def _carry_grad(self, ctx, v, g):
        """The transpose of ``carry``: each derived edge's row back at its origin, and with a mean / sum
        fill each added loop's row spread over the node's non-loop in-edges."""
        t = ctx.carry_table(v.attr["edges"])
        out = g.new_zeros((t["base_edges"],) + tuple(g.shape[1:]))
        out[t["kept_origin"]] = g.index_select(0, t["kept"])
        if v.attr["fill"] == "constant" or not len(t["added"]):
            return out
        loops = g.new_zeros((len(t["nonloop_count"]),) + tuple(g.shape[1:]))
        loops[t["added_nodes"]] = g.index_select(0, t["added"])
        loops = self._loop_totals(loops, t, v.attr["fill"], accumulate=False)
        out[t["nonloop"]] += loops.index_select(0, t["nonloop_dst"])
        return out

    @staticmethod
    def _loop_totals(values, t: dict[str, Any], fill: str, accumulate: bool):
        """Per node: the sum of ``values`` (one row per non-loop edge) over its non-loop in-edges
        (``accumulate``) or ``values`` as they are (one row per node), divided by the count for "mean"."""
        if accumulate:
            nodes = len(t["nonloop_count"])
            acc_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
            totals = values.new_zeros((nodes,) + tuple(values.shape[1:]), dtype=acc_dtype)
            totals.index_add_(0, t["nonloop_dst"], values.to(acc_dtype))
        else:
            totals = values
        if fill == "mean":
            divisor = t["nonloop_count"].clamp_min(1).to(totals.dtype)
            totals = totals / divisor.reshape((-1,) + (1,) * (totals.ndim - 1))
        return totals.to(values.dtype)

    @rule("take")
    def _take(self, ctx, v, w, index):
        check_value_ids(v, index, lambda k: w.shape[0])
        return w.index_select(0, index)

    @rule("one_hot")
    def _one_hot(self, ctx, v, ids):
        classes = v.attr["classes"]
        check_value_ids(v, ids, lambda k: classes)
        return torch.nn.functional.one_hot(ids, classes).to(ctx.dtype)

    # ---- graph ops (generated kernels) -----------------------------------------------------

    @rule("aggregate")
    def _aggregate(self, ctx, v, x):
        seg = ctx.segments(v.attr["by"], v.attr["edges"])
        width = feature_width(x.shape[1:])
        spec = SegmentReduce("aggregate", choose_reduce(v), False, width, 0, ctx.dtype_name)
        out = self._output(ctx, (seg.num_segments,) + tuple(x.shape[1:]))
        return self._segment_launch(ctx, spec, seg, [seg.perm, x.contiguous()], width, out)

    @rule("softmax")
    def _softmax(self, ctx, v, x):
        seg = ctx.segments(v.attr["by"], v.attr["edges"])
        width = feature_width(x.shape[1:])
        out = self._output(ctx, tuple(x.shape))
        return self._segment_launch(ctx, SegmentSoftmax(width, ctx.dtype_name), seg, [seg.perm, x.contiguous()],
                                    width, out)

    @rule("gspmm")
    def _gspmm(self, ctx, v, x, w=None):
        seg = ctx.segments(v.attr["by"], v.attr["edges"])
        width = feature_width(x.shape[1:])
        groups = 0 if w is None else max(1, feature_width(w.shape[1:]))
        out = self._output(ctx, (seg.num_segments,) + tuple(x.shape[1:]))
        weights = [] if w is None else [w.contiguous()]
        if self._layout(v) == "coo":
            spec = CooGspmm(choose_reduce(v), width, groups, ctx.dtype_name)
            return self._coo_gspmm(ctx, spec, seg, x.contiguous(), weights, width, out)
        spec = SegmentReduce("gspmm", choose_reduce(v), True, width, groups, ctx.dtype_name)
        return self._segment_launch(ctx, spec, seg, [seg.perm, seg.cols, x.contiguous()] + weights, width, out)

    @rule("match_gspmm")
    def _match_gspmm(self, ctx, v, a, b, x=None):
        """Over the CSR by ``by`` whatever the layout override (the kernel compares both endpoints of
        an edge, which a COO scatter would read the same way): a is read at sources, b at destinations."""
        seg = ctx.segments(v.attr["by"], v.attr["edges"])
        width = feature_width(a.shape[1:])
        out = self._output(ctx, (seg.num_segments,) + tuple(a.shape[1:]))
        columns, rows = (a, b) if v.attr["by"] == "dst" else (b, a)
        values = [] if x is None else [x.contiguous()]
        spec = MatchSegmentSum(width, x is not None, ctx.dtype_name)
        return self._segment_launch(ctx, spec, seg, [seg.cols, columns.contiguous(), rows.contiguous()] + values,
                                    width, out)

    @rule("attention")
    def _attention(self, ctx, v, s, x):
        seg = ctx.segments(v.attr["by"], v.attr["edges"])
        width = feature_width(x.shape[1:])
        groups = max(1, feature_width(s.shape[1:]))
        out = self._output(ctx, (seg.num_segments,) + tuple(x.shape[1:]))
        if self._layout(v) == "coo":
            return self._coo_attention(ctx, CooAttention(width, groups, ctx.dtype_name), seg, s.contiguous(),
                                       x.contiguous(), width, groups, out)
        spec = Attention(width, groups, ctx.dtype_name)
        return self._segment_launch(ctx, spec, seg, [seg.perm, seg.cols, s.contiguous(), x.contiguous()], width, out)

    @rule("segment_logsumexp")
    def _segment_logsumexp(self, ctx, v, s):
        seg = ctx.segments(v.attr["by"], v.attr["edges"])
        groups = _score_groups(feature_width(s.shape[1:]))
        out = self._output(ctx, (seg.num_segments,) + tuple(s.shape[1:]))
        return self._segment_launch(ctx, SegmentLogSumExp(groups, ctx.dtype_name), seg, [seg.perm, s.contiguous()],
                                    groups, out)

    @rule("attention_score_grad")
    def _attention_score_grad(self, ctx, v, s, lse, x, g, delta):
        seg = ctx.segments(v.attr["by"], v.attr["edges"])
        width, groups = feature_width(x.shape[1:]), _score_groups(feature_width(s.shape[1:]))
        out = self._output(ctx, tuple(s.shape))
        if out.numel() == 0:
            return out
        (fn,) = self._kernels(ctx, AttentionScoreGrad(width, groups, ctx.dtype_name)).values()
        block_r = self.block_rows or (256 if ctx.interpret else max(16, min(128, 1024 // next_pow2(groups))))
        tensors = [s, lse, x, g, delta]
        fn[(_cdiv(seg.num_segments, block_r),)](seg.indptr, seg.order, seg.perm, seg.cols,
                                                *[self._arg(t.contiguous()) for t in tensors], out, seg.num_segments,
                                                BLOCK_R=block_r)
        return out

    @rule("attention_value_grad")
    def _attention_value_grad(self, ctx, v, s, lse, g):
        seg = ctx.segments(v.attr["by"], v.attr["edges"])
        width, groups = feature_width(g.shape[1:]), _score_groups(feature_width(s.shape[1:]))
        out = self._output(ctx, (seg.num_segments,) + tuple(g.shape[1:]))
        spec = AttentionValueGrad(width, groups, ctx.dtype_name)
        return self._segment_launch(ctx, spec, seg, [seg.perm, seg.cols, s.contiguous(), lse.contiguous(),
                                                     g.contiguous()], width, out)

    def _accumulator(self, ctx, shape, fill: float):
        acc_dtype = torch.float64 if ctx.dtype == torch.float64 else torch.float32
        return torch.full(shape, fill, dtype=acc_dtype, device=ctx.device)

    def _coo_gspmm(self, ctx, spec: CooGspmm, seg: Segments, x, weights, width: int, out):
        rows = seg.num_segments
        if out.numel() == 0:
            return out
        scatter, finish = self._kernels(ctx, spec).values()
        fill = {"max": float("-inf"), "min": float("inf")}.get(spec.reduce, 0.0)
        acc = self._accumulator(ctx, (rows, width), fill)
        block_r, block_f = self._row_blocks(ctx, width)
        edges = len(seg.perm)
        if edges:
            block_e = self._edge_block(ctx)
            scatter[(_cdiv(edges, block_e), _cdiv(width, block_f))](
                seg.read, seg.write, self._arg(x), *weights, acc, edges, BLOCK_E=block_e, BLOCK_F=block_f)
        finish[(_cdiv(rows, block_r), _cdiv(width, block_f))](acc, seg.counts, out, rows,
                                                               BLOCK_R=block_r, BLOCK_F=block_f)
        return out

    def _coo_attention(self, ctx, spec: CooAttention, seg: Segments, s, x, width: int, groups: int, out):
        rows = seg.num_segments
        if out.numel() == 0:
            return out
        peak_fn, scatter, finish = self._kernels(ctx, spec).values()
        peak = self._accumulator(ctx, (rows, groups), float("-inf"))
        denom = self._accumulator(ctx, (rows, groups), 0.0)
        acc = self._accumulator(ctx, (rows, width), 0.0)
        block_r, block_f = self._row_blocks(ctx, width)
        edges = len(seg.perm)
        if edges:
            block_e = self._edge_block(ctx)
            peak_fn[(_cdiv(edges, block_e),)](seg.write, s, peak, edges, BLOCK_E=block_e)
            scatter[(_cdiv(edges, block_e), _cdiv(width, block_f))](
                seg.read, seg.write, s, peak, self._arg(x), denom, acc, edges, BLOCK_E=block_e, BLOCK_F=block_f)
        finish[(_cdiv(rows, block_r), _cdiv(width, block_f))](denom, acc, out, rows, BLOCK_R=block_r, BLOCK_F=block_f)
        return out

    # ---- global attention (generated kernels over blocks of each graph's nodes) -------------

    def _global_block(self, ctx: TritonContext, spec: GlobalAttention) -> int:
        """Nodes per block of the global attention kernels (BLOCK x BLOCK score tiles, BLOCK x lanes
        feature tiles): 16 in the interpreter (it pays per element of a tile), else up to 64 (32 in
        float64), fewer for wide heads so that a tile holds at most 4096 elements."""
        if self.block_rows:
            return max(16, next_pow2(self.block_rows))
        if ctx.interpret:
            return 16
        lanes = max(next_pow2(spec.keys), next_pow2(spec.width), 16)
        return max(16, min(32 if ctx.dtype == torch.float64 else 64, 4096 // lanes))

    def _global_launch(self, ctx, v, pass_: str, operands: list, out):
        if out.numel() == 0:
            return out
        heads, keys = operands[0].shape[1:]
        spec = GlobalAttention(pass_, heads, keys, operands[2].shape[2], v.attr["scale"], ctx.dtype_name)
        (fn,) = self._kernels(ctx, spec).values()
        block = self._global_block(ctx, spec)
        tables = _graph_blocks(ctx, block)
        fn[(len(tables[1]), heads)](*tables, *[t.contiguous() for t in operands], out, BLOCK=block)
        return out

    @rule("global_attention")
    def _global_attention(self, ctx, v, q, k, x):
        out = self._output(ctx, (q.shape[0], x.shape[1], x.shape[2] + 1))
        return self._global_launch(ctx, v, "forward", [q, k, x], out)

    @rule("global_attention_query_grad")
    def _global_attention_query_grad(self, ctx, v, q, k, x, lse, g, delta):
        return self._global_launch(ctx, v, "query_grad", [q, k, x, lse, g, delta], self._output(ctx, tuple(q.shape)))

    @rule("global_attention_key_grad")
    def _global_attention_key_grad(self, ctx, v, q, k, x, lse, g, delta):
        out = self._output(ctx, (q.shape[0], q.shape[1], q.shape[2] + x.shape[2]))
        return self._global_launch(ctx, v, "key_grad", [q, k, x, lse, g, delta], out)

    @rule("typed_linear")
    def _typed_linear(self, ctx, v, h, w, types):
        nodes = ctx.index(v.attr["index"], v.attr["edges"])
        relations = w.shape[0]
        check_value_ids(v, types, lambda k: relations)
        lead = tuple(h.shape[1:-1])                     # leading feature axes of h: one product each
        inner, width = h.shape[-1], feature_width(w.shape[2:])
        a = max(1, feature_width(lead))
        out_shape = lead + tuple(w.shape[2:])
        # Compact materialisation: one product per distinct (node, relation) pair, gathered to the edges.
        block_m = self.block_m or (128 if ctx.interpret else 64)
        count, inverse, rows_in, rows_out, table = _typed_rows(ctx, v.attr["index"], v.attr["edges"], nodes, types,
                                                               relations, a, block_m)
        compact = self._output(ctx, (count,) + out_shape)
        if count and width:
            tiles = table.shape[1]
            itype = _index_dtype(len(rows_in), h.numel())
            block_n = max(16, min(next_pow2(width), 64))
            block_k = max(16, min(next_pow2(inner), 64))
            (fn,) = self._kernels(ctx, TypedLinear(inner, width, ctx.dtype_name)).values()
            fn[(tiles, _cdiv(width, block_n))](
                table[0], table[1].to(itype), table[2].to(itype), rows_in.to(itype), rows_out.to(itype),
                h.contiguous(), w.contiguous(), compact, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
        return compact.index_select(0, inverse)


def _graph_blocks(ctx: TritonContext, block: int) -> tuple:
    """The global attention kernels' work items on the device (``mpdsl.backends.graph_blocks``): the nodes
    listed by graph, then per item its graph's first position and size and the item's first node."""
    def build() -> tuple:
        indptr, perm = ctx.graph.segments_by_graph()
        starts, counts, offsets, _ = graph_blocks(indptr, block)
        itype = _index_dtype(len(perm) + 1)
        return tuple(torch.from_numpy(np.array(a)).to(device=ctx.device, dtype=itype)
                     for a in (perm, starts, counts, offsets))

    return ctx.graph.cached(("triton.graph_blocks", block, str(ctx.device)), build)


def _typed_rows(ctx: TritonContext, index: str, edges: str, nodes, types, relations: int, lanes: int, block_m: int):
    """The compaction of a typed_linear: (count of distinct (node, relation) pairs, each edge's pair,
    the rows read and written by each pair and lane sorted by relation, the tile table (relation, first
    row, end row) of at most ``block_m`` rows each). Built once per graph and type ids (the same tensor
    unchanged, or equal contents): the tile table is sized on the host."""
    key = ("triton.typed_rows", index, relations, lanes, block_m, str(ctx.device))
    known = ctx.edges(edges).cached(key, dict)
    if known and ((known["original"] is types and known["version"] == types._version)
                  or (known["copy"].shape == types.shape and torch.equal(known["copy"], types))):
        return known["rows"]
    pairs, inverse = torch.unique(nodes * relations + types, return_inverse=True)
    pair_nodes, pair_types = pairs // relations, pairs % relations
    by_type = torch.argsort(pair_types, stable=True)
    lane = torch.arange(lanes, device=ctx.device)
    rows_in = (pair_nodes[by_type][:, None] * lanes + lane[None, :]).reshape(-1)
    rows_out = (by_type[:, None] * lanes + lane[None, :]).reshape(-1)
    per_type = torch.bincount(pair_types, minlength=relations).cpu().numpy() * lanes
    bounds = np.concatenate([[0], np.cumsum(per_type)])
    starts = [np.arange(bounds[r], bounds[r + 1], block_m) for r in range(relations)]
    rel = np.repeat(np.arange(relations), [len(s) for s in starts])
    lo = np.concatenate(starts).astype(np.int64)
    hi = np.minimum(lo + block_m, bounds[rel + 1])
    table = torch.from_numpy(np.stack([rel, lo, hi])).to(ctx.device)
    rows = (len(pairs), inverse, rows_in, rows_out, table)
    known.update(original=types, version=types._version, copy=types.detach().clone(), rows=rows)
    return rows


# ---- --emit triton ----------------------------------------------------------------------------


def kernel_specs(program: Program, dims: dict[str, int] | None = None, layout: str | None = None
                 ) -> list[tuple[Value, KernelSpec]]:
    """The kernel each graph op of ``program`` runs, from its attributes and static shapes (the
    same specs ``TritonBackend`` builds from the tensors at run time). Raises a BackendError
    naming the dims that are still unbound."""
    dims = dict(dims or {})
    dtype = program.float_dtype
    specs: list[tuple[Value, KernelSpec]] = []
    unbound: set[str] = set()

    def width(t: TensorType) -> int | None:
        size = 1
        for d in t.shape:
            d = d.substitute(dims)
            if not d.is_static:
                unbound.update(d.symbols)
                return None
            size *= d.value
        return size

    for v in program.values:
        builder = KERNEL_SPECS.get(v.op)
        if builder is None:
            continue
        widths = [width(o.type) for o in v.operands if o.type.is_float]
        if None in widths:
            continue
        spec = builder(v, widths, dtype, uses_coo(layout, v), width)
        if spec is not None:
            specs.append((v, spec))
    if unbound:
        names = ", ".join(sorted(unbound))
        raise BackendError(f"the Triton kernels are specialised to static shapes, but {names} "
                           f"{'is' if len(unbound) == 1 else 'are'} bound from the model's inputs",
                           f"pass --graph g.npz (or dims={{{', '.join(repr(n) + ': ...' for n in sorted(unbound))}}})")
    return specs


def _aggregate_spec(v: Value, widths: list, dtype: str, coo: bool, width) -> KernelSpec:
    return SegmentReduce("aggregate", choose_reduce(v), False, widths[0], 0, dtype)


def _softmax_spec(v: Value, widths: list, dtype: str, coo: bool, width) -> KernelSpec:
    return SegmentSoftmax(widths[0], dtype)


def _gspmm_spec(v: Value, widths: list, dtype: str, coo: bool, width) -> KernelSpec:
    groups = 0 if len(widths) == 1 else max(1, widths[1])
    reduce = choose_reduce(v)
    return CooGspmm(reduce, widths[0], groups, dtype) if coo else SegmentReduce("gspmm", reduce, True, widths[0],
                                                                                  groups, dtype)


def _match_gspmm_spec(v: Value, widths: list, dtype: str, coo: bool, width) -> KernelSpec:
    return MatchSegmentSum(widths[0], len(widths) == 3, dtype)


def _attention_spec(v: Value, widths: list, dtype: str, coo: bool, width) -> KernelSpec:
    return CooAttention(widths[1], widths[0], dtype) if coo else Attention(widths[1], widths[0], dtype)


def _score_groups(elements: int) -> int:
    """The score groups of an attention op from its score elements per edge (scalar scores: one)."""
    return max(1, elements)


def _logsumexp_spec(v: Value, widths: list, dtype: str, coo: bool, width) -> KernelSpec:
    return SegmentLogSumExp(_score_groups(widths[0]), dtype)


def _score_grad_spec(v: Value, widths: list, dtype: str, coo: bool, width) -> KernelSpec:
    return AttentionScoreGrad(widths[2], _score_groups(widths[0]), dtype)


def _value_grad_spec(v: Value, widths: list, dtype: str, coo: bool, width) -> KernelSpec:
    return AttentionValueGrad(widths[2], _score_groups(widths[0]), dtype)


def _typed_linear_spec(v: Value, widths: list, dtype: str, coo: bool, width) -> KernelSpec | None:
    h, w = v.operands[0].type, v.operands[1].type
    inner = width(h.with_(shape=h.shape[-1:]))
    out = width(w.with_(shape=w.shape[2:]))
    return None if inner is None or out is None else TypedLinear(inner, out, dtype)


def _global_spec(pass_: str):
    def build(v: Value, widths: list, dtype: str, coo: bool, width) -> KernelSpec | None:
        q, x = v.operands[0].type, v.operands[2].type
        sizes = [width(t.with_(shape=t.shape[i:i + 1])) for t, i in ((q, 0), (q, 1), (x, 1))]
        if None in sizes:
            return None
        heads, keys, values = sizes
        return GlobalAttention(pass_, heads, keys, values, v.attr["scale"], dtype)
    return build


# The ops that run as generated Triton kernels, each with the builder of its kernel spec
# (value, float operand widths, dtype, COO layout?, width function) -> spec; the others run as torch ops.
KERNEL_SPECS = {"aggregate": _aggregate_spec, "softmax": _softmax_spec, "gspmm": _gspmm_spec,
                "match_gspmm": _match_gspmm_spec, "attention": _attention_spec,
                "segment_logsumexp": _logsumexp_spec, "attention_score_grad": _score_grad_spec,
                "attention_value_grad": _value_grad_spec, "typed_linear": _typed_linear_spec,
                "global_attention": _global_spec("forward"), "global_attention_query_grad": _global_spec("query_grad"),
                "global_attention_key_grad": _global_spec("key_grad")}
KERNEL_OPS = tuple(KERNEL_SPECS)


def choose_reduce(v: Value) -> str:
    """``v``'s reduction, checked against the reductions the segment kernels generate."""
    choose(REDUCTION_KERNELS, v.op, "reduce", v.attr["reduce"],
           "the Triton segment-reduce generator (mpdsl.backends.triton_kernels.REDUCTION_KERNELS)")
    return v.attr["reduce"]


def emit_triton(program: Program, dims: dict[str, int] | None = None, layout: str | None = None) -> str:
    """The generated Triton source of ``program``'s graph ops, each kernel headed by the IR op it
    comes from (a kernel shared by several ops is printed once). Needs no GPU, torch or triton."""
    from mpdsl.backends.triton_kernels import HEADER
    from mpdsl.backends.triton_kernels import KERNELS as cache

    ir_lines = print_program(program).splitlines()[1:1 + len(program.values)]
    line_of = {id(v): text.strip() for v, text in zip(program.values, ir_lines)}
    specs = kernel_specs(program, dims, layout)
    bound = ", ".join(f"{k}={v}" for k, v in sorted((dims or {}).items()))
    parts = [f"# Triton kernels of @{program.name}" + (f" ({bound})" if bound else "") +
             ", generated from its IR by mpdsl; dense ops run as torch ops.",
             HEADER.rstrip("\n")]
    printed: dict[str, str] = {}
    for v, spec in specs:
        header = f"# {line_of[id(v)]}"
        if spec.key in printed:
            parts.append(f"{header}\n# -> {spec.name}, the kernel printed above for {printed[spec.key]} "
                         f"(same op and static shapes: cache key {spec.key})")
            continue
        printed[spec.key] = line_of[id(v)].split(" =", 1)[0]
        parts.append(f"{header}\n# cache key {spec.key}; {spec.launch}\n" + cache.source(spec).rstrip("\n"))
    dense: dict[str, int] = {}
    for v in program.values:
        if v.op not in KERNEL_OPS and runs_a_kernel(v):
            dense[v.op] = dense.get(v.op, 0) + 1
    if not specs:
        parts.append("# (no graph ops: nothing runs as a Triton kernel)")
    parts.append("# torch ops: " + (", ".join(f"{op} x{n}" for op, n in sorted(dense.items())) or "none"))
    return "\n\n\n".join(parts) + "\n"
