"""Triton kernel generation for the graph ops of the mpdsl IR.

A kernel is *generated*: its Python/Triton source text is assembled from the IR op's attributes
(reduction, direction, layout) and its static shapes (feature width, weight groups, inner dims,
dtype), so that every size is a literal in the source and every branch on an attribute is taken
here, in the generator, not at run time in the kernel. A ``KernelSpec`` holds exactly what the
source depends on; its hash names the kernel and keys the cache (``KERNELS``), which counts the
compilations so that tests can check that equal ops share one kernel.

Kernels (all deterministic except the COO ones, which use atomics):

* ``SegmentReduce``: sum / mean / max / min / std over CSR segments (the edges into a node, out of
  a node, or the nodes of a graph). With ``gather`` the value of a member edge is read at its
  other endpoint (fused message-aggregate, g-SpMM), optionally scaled by an edge weight that is a
  scalar or one per group of features (per-head weights); otherwise at the member row itself
  (``aggregate``). One program per (block of segments, block of features); the segments are
  visited in order of decreasing size, so the rows of one block have similar degrees and the
  block's first segment gives its loop bound (no reduction needed).
* ``MatchSegmentSum``: ``match_gspmm``, a sum over each node's edges of the other endpoint's row
  (or of 1) where the two endpoints' values are equal, per feature element (the max / min
  backward: tie counts, and the cotangent routed to the tied edges).
* ``SegmentSoftmax``: softmax over each segment (``softmax`` by dst / src / graph): an online
  max-and-sum pass, then a normalising pass that writes every member row.
* ``Attention``: fused edge softmax by destination and weighted sum of the source rows in ONE pass
  over the edges with an online softmax (running max, running sum, rescaled accumulator), per
  head (score groups).
* ``SegmentLogSumExp``: the per-node log-sum-exp of edge scores (online max and sum): the softmax
  statistics the attention backward reads.
* ``AttentionScoreGrad``: the destination pass of the attention backward: per edge and head,
  exp(s - lse) * (<g_i, x_j> - delta_i), one program per block of segments holding all heads, the
  dot product summed feature by feature (in order, as the CPU kernel); writes every edge once.
* ``AttentionValueGrad``: the source pass of the attention backward, over the segments by source:
  sum over out-edges of exp(s - lse_dst) * g_dst, the weights recomputed per edge (no atomics).
* ``TypedLinear``: relation-typed grouped matmul: tiles of (node, relation) pairs of one relation
  times that relation's matrix.
* ``GlobalAttention``: attention among the nodes of each graph, per head, one program per (block of
  BLOCK nodes of one graph, head) with ``tl.dot`` tiles of BLOCK x BLOCK scores: the forward (an
  online softmax over the graph's key blocks, writing the output and the log-sum-exp), and the two
  backward passes (dq over the key blocks; dk and dv over the query blocks), the weights recomputed
  from the saved log-sum-exp. Row maxima and sums use ``tl.reduce`` with combine functions defined in
  the kernel's own source (so they are decorated in the kernel's mode).
* ``CooGspmm`` / ``CooAttention``: COO layout, one program per block of edges, accumulation with
  atomics into scratch buffers, then a finishing kernel that writes every output element.

This module imports neither torch nor triton at import time: ``generate`` only builds text, and
``KERNELS.get`` imports triton when it compiles. Generated kernels call Triton builtins only (no
``triton.language`` helper that is itself a jit function, such as ``tl.max``, ``tl.sum``, ``tl.zeros``),
so a kernel runs in the interpreter or compiled according to the mode it was decorated in, whatever
the mode in which ``triton`` was imported.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import linecache
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from mpdsl.ops import MissingRule, choose

BUILTINS = frozenset({"arange", "atomic_add", "atomic_max", "atomic_min", "constexpr", "dot", "exp", "full",
                      "load", "log", "maximum", "minimum", "program_id", "reduce", "sqrt", "store", "where",
                      "bfloat16", "float16", "float32", "float64", "int64"})
"""The triton.language names generated kernels may use (builtins, not jit functions)."""

STORE = {"f32": "tl.float32", "f16": "tl.float16", "bf16": "tl.bfloat16", "f64": "tl.float64"}
"""The dtype a kernel loads and stores values in: the program's dtype."""
ACCUMULATE = {"f32": "tl.float32", "f16": "tl.float32", "bf16": "tl.float32", "f64": "tl.float64"}
"""The dtype a kernel computes in: every value is converted to it as it is loaded, every running sum,
max, softmax normaliser and dot product is kept in it, and the result is rounded to ``STORE`` once,
by the final store. Half precision (f16, bf16) accumulates in float32: a float16 sum saturates at
2048 when it adds ones (2048 + 1 rounds back to 2048), a bfloat16 one at 256."""
NEG_SENTINEL = "-3.0e38"  # the running max of an online softmax before any edge (finite: no inf - inf)

HEADER = "import triton\nimport triton.language as tl\n"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# ---- specs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelSpec:
    """What a kernel's source depends on (and nothing else): the fused op and its static shapes."""

    @property
    def kind(self) -> str:
        """The kernel family, part of its name (a class attribute or a property in subclasses)."""
        return "kernel"

    @functools.cached_property  # read twice per launch: by the kernel name and the cache lookup
    def key(self) -> str:
        text = self.kind + repr(tuple((f.name, getattr(self, f.name)) for f in fields(self)))
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    @property
    def name(self) -> str:
        return f"mpdsl_{self.kind}_{self.key}"

    def functions(self) -> tuple[str, ...]:
        """Names of the @triton.jit functions the source defines, in launch order."""
        return (self.name,)

    @property
    def launch(self) -> str:
        """How the kernel is launched (for the emitted header)."""
        return (f"grid (cdiv(segments, BLOCK_R), cdiv({getattr(self, 'width', 0)}, BLOCK_F)), segments by decreasing "
                "size")


@dataclass(frozen=True)
class SegmentReduce(KernelSpec):
    """out[s, f] = reduce over the members m of segment s of value(m)[f].

    ``gather``: value(m) = w[m, f // (width // groups)] * x[cols[m], f] (g-SpMM; ``groups`` 0 means no
    weight); otherwise value(m) = x[m, f]."""

    op: str          # "gspmm" or "aggregate" (naming only)
    reduce: str      # sum mean max min std
    gather: bool
    width: int       # feature elements per row (the flattened feature shape)
    groups: int      # weight groups: 0 none, 1 a scalar per edge, G one per group of width // G features
    dtype: str       # f32 f64 f16 bf16

    @property
    def kind(self) -> str:
        return f"{self.op}_{self.reduce}"


@dataclass(frozen=True)
class MatchSegmentSum(KernelSpec):
    """out[r, f] = sum over the member edges e of segment r of [cv[cols[e], f] == rv[r, f]] *
    x[cols[e], f] (1 in place of x unless ``weighted``): ``match_gspmm`` over a CSR."""

    width: int
    weighted: bool
    dtype: str
    kind = "match_gspmm"


@dataclass(frozen=True)
class SegmentSoftmax(KernelSpec):
    """out[m, f] = softmax of x[., f] over the members of m's segment."""

    width: int
    dtype: str
    kind = "softmax"


@dataclass(frozen=True)
class Attention(KernelSpec):
    """out[i, f] = sum over members e of i of softmax_i(score[., f // K])[e] * x[cols[e], f] (K = width // groups)."""

    width: int
    groups: int
    dtype: str
    kind = "attention"


@dataclass(frozen=True)
class SegmentLogSumExp(KernelSpec):
    """out[s, g] = log sum over the members e of segment s of exp(score[e, g]); 0 for an empty segment."""

    groups: int      # score elements per edge
    dtype: str
    kind = "logsumexp"


@dataclass(frozen=True)
class AttentionScoreGrad(KernelSpec):
    """out[e, g] = exp(score[e, g] - lse[i, g]) * (sum_k gi[i, g*K + k] * x[cols[e], g*K + k] - delta[i, g])
    for the members e of segment i (K = width // groups)."""

    width: int
    groups: int
    dtype: str
    kind = "attention_score_grad"

    @property
    def launch(self) -> str:
        return ("grid (cdiv(segments, BLOCK_R),): a program holds BLOCK_R segments and all "
                f"{self.groups} score group(s), segments by decreasing size")


@dataclass(frozen=True)
class AttentionValueGrad(KernelSpec):
    """out[j, f] = sum over members e of segment j of exp(score[e, f // K] - lse[cols[e], f // K]) * g[cols[e], f]."""

    width: int
    groups: int
    dtype: str
    kind = "attention_value_grad"


@dataclass(frozen=True)
class TypedLinear(KernelSpec):
    """compact[r_out, :] = h[r_in, :] @ W[rel] for tiles of rows that share the relation rel."""

    inner: int       # D: contracted dim
    width: int       # B: output columns per row
    dtype: str
    kind = "typed_linear"

    @property
    def launch(self) -> str:
        return f"grid (tiles of BLOCK_M rows of one relation, cdiv({self.width}, BLOCK_N))"


GLOBAL_PASSES = {
    "forward": "global_attention",
    "query_grad": "global_attention_query_grad",
    "key_grad": "global_attention_key_grad",
}
"""The global attention kernels: the forward and the two passes of its backward, by their op."""


@dataclass(frozen=True)
class GlobalAttention(KernelSpec):
    """Attention among the nodes of each graph, per head, in blocks of BLOCK nodes of one graph: one
    program per (block, head) with ``tl.dot`` tiles of BLOCK x BLOCK scores. ``forward``: out[i] =
    [softmax-weighted sum of v, lse] (online softmax over the key blocks); ``query_grad``: dq over the key
    blocks; ``key_grad``: [dk, dv] over the query blocks, the weights recomputed from the saved lse."""

    pass_: str      # forward, query_grad, key_grad (GLOBAL_PASSES)
    heads: int      # H
    keys: int       # K: features per head of q and k
    width: int      # D: features per head of v
    scale: float
    dtype: str

    @property
    def kind(self) -> str:
        return choose(GLOBAL_PASSES, "global attention", "pass", self.pass_, "the Triton global attention generator")

    @property
    def launch(self) -> str:
        return ("grid (work items: blocks of BLOCK nodes of one graph, the nodes listed by graph; "
                f"{self.heads} heads)")


@dataclass(frozen=True)
class CooGspmm(KernelSpec):
    """gspmm over a COO edge list: atomics into a scratch accumulator, then a finishing kernel."""

    reduce: str
    width: int
    groups: int
    dtype: str

    @property
    def kind(self) -> str:
        return f"gspmm_coo_{self.reduce}"

    @property
    def launch(self) -> str:
        return (f"scatter: grid (cdiv(edges, BLOCK_E), cdiv({self.width}, BLOCK_F)); finish: grid (cdiv(nodes, "
                f"BLOCK_R), cdiv({self.width}, BLOCK_F))")

    def functions(self) -> tuple[str, ...]:
        return (f"{self.name}_scatter", f"{self.name}_finish")


@dataclass(frozen=True)
class CooAttention(KernelSpec):
    """attention over a COO edge list: atomic max of the scores, atomic sums of the exponentials
    and the weighted rows, then a finishing kernel that divides."""

    width: int
    groups: int
    dtype: str
    kind = "attention_coo"

    @property
    def launch(self) -> str:
        return (f"peak: grid (cdiv(edges, BLOCK_E),); scatter: grid (cdiv(edges, BLOCK_E), cdiv({self.width}, "
                f"BLOCK_F)); finish: grid (cdiv(nodes, BLOCK_R), cdiv({self.width}, BLOCK_F))")

    def functions(self) -> tuple[str, ...]:
        return (f"{self.name}_peak", f"{self.name}_scatter", f"{self.name}_finish")


# ---- source building ------------------------------------------------------------------------


class _Code:
    """Lines of source with an indentation level."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.level = 0

    def __call__(self, *lines: str) -> _Code:
        for line in lines:
            self.lines.append("    " * self.level + line if line else "")
        return self

    @contextlib.contextmanager
    def block(self, header: str):
        self(header)
        self.level += 1
        try:
            yield
        finally:
            self.level -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _group_index(base: str, groups: int, width: int) -> str:
    """Index of the per-(row, group) element for feature lanes ``feat`` (groups of width // groups)."""
    per = width // groups
    if groups == 1:
        return f"{base}[:, None] + feat[None, :] * 0"
    if per == 1:
        return f"{base}[:, None] * {groups} + feat[None, :]"
    return f"{base}[:, None] * {groups} + feat[None, :] // {per}"


def _segment_rows(code: _Code) -> None:
    """The program's block of segments (axis 0): ``row`` (by decreasing size), ``row_ok``, each
    segment's ``start`` and ``count``, and ``longest``, the loop bound."""
    code("pid_r = tl.program_id(0)",
         "slot = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)",
         "row_ok = slot < n_rows",
         "row = tl.load(order + slot, mask=row_ok, other=0).to(tl.int64)  # segments by decreasing size",
         "start = tl.load(indptr + row, mask=row_ok, other=0).to(tl.int64)",
         "count = tl.load(indptr + row + 1, mask=row_ok, other=0).to(tl.int64) - start",
         "first = tl.load(order + pid_r * BLOCK_R).to(tl.int64)  # the block's first segment is its longest",
         "longest = tl.load(indptr + first + 1) - tl.load(indptr + first)")


def _segment_prologue(code: _Code, width: int) -> None:
    """``_segment_rows`` and the program's block of features (axis 1): ``feat``, ``feat_ok``, ``out_ok``."""
    _segment_rows(code)
    code("pid_f = tl.program_id(1)",
         "feat = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)",
         f"feat_ok = feat < {width}",
         "out_ok = row_ok[:, None] & feat_ok[None, :]")


def _member_loads(code: _Code, *, gather: bool, need_member: bool, width: int, acc: str,
                  other: str = "0.0") -> None:
    """Inside the loop over member position i: ``live``, ``ok``, ``member`` (the edge / node id
    of the member), ``node`` (gather: the endpoint the value is read at) and ``val``."""
    code("live = i < count",
         "ok = live[:, None] & feat_ok[None, :]")
    if need_member:
        code("member = tl.load(perm + start + i, mask=live, other=0).to(tl.int64)")
    read = "member"
    if gather:
        code("node = tl.load(cols + start + i, mask=live, other=0).to(tl.int64)")
        read = "node"
    code(f"val = tl.load(x + {read}[:, None] * {width} + feat[None, :], mask=ok, other={other}).to({acc})")


def _weight_line(code: _Code, groups: int, width: int, acc: str) -> None:
    if groups == 1:
        code(f"val = val * tl.load(w + member, mask=live, other=0.0).to({acc})[:, None]")
    else:
        code(f"val = val * tl.load(w + {_group_index('member', groups, width)}, mask=ok, other=0.0).to({acc})")


def _store_rows(code: _Code, width: int, value: str, store: str) -> None:
    code(f"tl.store(out + row[:, None] * {width} + feat[None, :], {value}.to({store}), mask=out_ok)")


# The reductions the segment-reduce kernels generate, with the contract their docstrings state.
REDUCTION_KERNELS = {"sum": "sum", "mean": "mean (sum / max(count, 1))", "max": "max (0 if empty)",
                     "min": "min (0 if empty)", "std": "population std, two passes (0 if empty)"}
# The COO g-SpMM's atomic per reduction (mean: a sum, divided when finishing).
COO_ATOMICS = {"sum": "tl.atomic_add", "mean": "tl.atomic_add", "max": "tl.atomic_max", "min": "tl.atomic_min"}


def _gen_segment_reduce(spec: SegmentReduce) -> str:
    F, G, acc, store = spec.width, spec.groups, ACCUMULATE[spec.dtype], STORE[spec.dtype]
    args = ["indptr", "order", "perm"] + (["cols"] if spec.gather else []) + ["x"] + (["w"] if G else []) + \
        ["out", "n_rows"]
    if spec.gather:
        term = "x[cols[e], f]" if not G else (
            "w[e] * x[cols[e], f]" if G == 1 else f"w[e, f // {F // G}] * x[cols[e], f]")
    else:
        term = "x[e, f]"
    what = choose(REDUCTION_KERNELS, spec.op, "reduce", spec.reduce, "the Triton segment-reduce generator")
    code = _Code()
    code("@triton.jit")
    with code.block(f"def {spec.name}({', '.join(args)}, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):"):
        code(f'"""out[s, f] = {what} over the members e of segment s of {term}; {F} features, '
             f'{acc} accumulation."""')
        _segment_prologue(code, F)
        init = {"max": 'float("-inf")', "min": 'float("inf")'}.get(spec.reduce)
        if init:
            code(f"acc = tl.full([BLOCK_R, BLOCK_F], {init}, dtype={acc})")
        else:
            code(f"acc = tl.full([BLOCK_R, BLOCK_F], 0.0, dtype={acc})")

        def load_values() -> None:  # val: the i-th member's (weighted) row of each segment
            _member_loads(code, gather=spec.gather, need_member=bool(G) or not spec.gather, width=F, acc=acc)
            if G:
                _weight_line(code, G, F, acc)

        with code.block("for i in range(0, longest):"):
            load_values()
            if spec.reduce in ("max", "min"):
                fn = "tl.maximum" if spec.reduce == "max" else "tl.minimum"
                code(f"acc = tl.where(ok, {fn}(acc, val), acc)")
            else:
                code("acc += val")
        if spec.reduce == "sum":
            result = "acc"
        elif spec.reduce in ("mean", "std"):
            code(f"size = tl.maximum(count, 1).to({acc})[:, None]",
                 "mean = acc / size")
            result = "mean"
            if spec.reduce == "std":
                code(f"sq = tl.full([BLOCK_R, BLOCK_F], 0.0, dtype={acc})")
                with code.block("for i in range(0, longest):"):
                    load_values()
                    code("dev = tl.where(ok, val - mean, 0.0)",
                         "sq += dev * dev")
                code("std = tl.sqrt(sq / size)")
                result = "std"
        elif spec.reduce in ("max", "min"):
            code("acc = tl.where(count[:, None] > 0, acc, 0.0)")
            result = "acc"
        else:
            raise MissingRule(f"the Triton segment-reduce generator does not finish reduce={spec.reduce!r}")
        _store_rows(code, F, result, store)
    return code.text()


def _gen_match_segment_sum(spec: MatchSegmentSum) -> str:
    F, acc, store = spec.width, ACCUMULATE[spec.dtype], STORE[spec.dtype]
    args = ["indptr", "order", "cols", "column_values", "row_values"] + (["x"] if spec.weighted else []) + \
        ["out", "n_rows"]
    term = "x[cols[e], f]" if spec.weighted else "1"
    code = _Code()
    code("@triton.jit")
    with code.block(f"def {spec.name}({', '.join(args)}, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):"):
        code(f'"""out[s, f] = sum over the members e of segment s of [column_values[cols[e], f] == '
             f'row_values[s, f]] * {term}; {F} features, {acc} accumulation."""')
        _segment_prologue(code, F)
        code(f"mine = tl.load(row_values + row[:, None] * {F} + feat[None, :], mask=out_ok, other=0.0)",
             f"acc = tl.full([BLOCK_R, BLOCK_F], 0.0, dtype={acc})")
        with code.block("for i in range(0, longest):"):
            code("live = i < count",
                 "ok = live[:, None] & feat_ok[None, :]",
                 "node = tl.load(cols + start + i, mask=live, other=0).to(tl.int64)",
                 f"theirs = tl.load(column_values + node[:, None] * {F} + feat[None, :], mask=ok, other=0.0)",
                 "hit = ok & (theirs == mine)")
            if spec.weighted:
                code(f"val = tl.load(x + node[:, None] * {F} + feat[None, :], mask=ok, other=0.0).to({acc})",
                     "acc += tl.where(hit, 1.0, 0.0) * val")
            else:
                code("acc += tl.where(hit, 1.0, 0.0)")
        _store_rows(code, F, "acc", store)
    return code.text()


def _gen_segment_softmax(spec: SegmentSoftmax) -> str:
    F, acc, store = spec.width, ACCUMULATE[spec.dtype], STORE[spec.dtype]
    code = _Code()
    code("@triton.jit")
    with code.block(f"def {spec.name}(indptr, order, perm, x, out, n_rows, BLOCK_R: tl.constexpr, "
                    "BLOCK_F: tl.constexpr):"):
        code(f'"""out[e, f] = exp(x[e, f] - max) / sum over the members of e\'s segment (per feature); '
             f'{F} features: an online max-and-sum pass, then a pass that writes every member."""')
        _segment_prologue(code, F)
        code(f"peak = tl.full([BLOCK_R, BLOCK_F], {NEG_SENTINEL}, dtype={acc})",
             f"total = tl.full([BLOCK_R, BLOCK_F], 0.0, dtype={acc})")
        with code.block("for i in range(0, longest):"):
            _member_loads(code, gather=False, need_member=True, width=F, acc=acc)
            code("val = tl.where(ok, val, peak)",
                 "new_peak = tl.maximum(peak, val)",
                 "total = tl.where(ok, total * tl.exp(peak - new_peak) + tl.exp(val - new_peak), total)",
                 "peak = new_peak")
        code("total = tl.where(total > 0, total, 1.0)")
        with code.block("for i in range(0, longest):"):
            _member_loads(code, gather=False, need_member=True, width=F, acc=acc)
            code("val = tl.where(ok, val, peak)")
            code(f"tl.store(out + member[:, None] * {F} + feat[None, :], "
                 f"(tl.exp(val - peak) / total).to({store}), mask=ok)")
    return code.text()


def _gen_attention(spec: Attention) -> str:
    F, G, acc, store = spec.width, spec.groups, ACCUMULATE[spec.dtype], STORE[spec.dtype]
    code = _Code()
    code("@triton.jit")
    with code.block(f"def {spec.name}(indptr, order, perm, cols, score, x, out, n_rows, "
                    "BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):"):
        code(f'"""out[i, f] = sum over edges e of i of softmax_i(score)[e, f // {F // G}] * x[cols[e], f]; '
             f'{G} score group(s) of {F // G} features, one pass with an online softmax."""')
        _segment_prologue(code, F)
        code(f"peak = tl.full([BLOCK_R, BLOCK_F], {NEG_SENTINEL}, dtype={acc})  # running max",
             f"total = tl.full([BLOCK_R, BLOCK_F], 0.0, dtype={acc})  # running sum of exp(score - peak)",
             f"acc = tl.full([BLOCK_R, BLOCK_F], 0.0, dtype={acc})  # running sum of exp(score - peak) * x")
        with code.block("for i in range(0, longest):"):
            _member_loads(code, gather=True, need_member=True, width=F, acc=acc)
            code(f"s = tl.load(score + {_group_index('member', G, F)}, mask=ok, other=0.0).to({acc})",
                 "s = tl.where(ok, s, peak)",
                 "new_peak = tl.maximum(peak, s)",
                 "scale = tl.exp(peak - new_peak)",
                 "p = tl.exp(s - new_peak)",
                 "total = tl.where(ok, total * scale + p, total)",
                 "acc = tl.where(ok, acc * scale + p * val, acc)",
                 "peak = new_peak")
        code("result = tl.where(total > 0, acc / tl.where(total > 0, total, 1.0), 0.0)")
        _store_rows(code, F, "result", store)
    return code.text()


def _gen_segment_logsumexp(spec: SegmentLogSumExp) -> str:
    G, acc, store = spec.groups, ACCUMULATE[spec.dtype], STORE[spec.dtype]
    code = _Code()
    code("@triton.jit")
    with code.block(f"def {spec.name}(indptr, order, perm, x, out, n_rows, BLOCK_R: tl.constexpr, "
                    "BLOCK_F: tl.constexpr):"):
        code(f'"""out[s, g] = log sum over the members e of segment s of exp(x[e, g]) ({G} score element(s)), '
             'online max and sum; 0 for an empty segment."""')
        _segment_prologue(code, G)
        code(f"peak = tl.full([BLOCK_R, BLOCK_F], {NEG_SENTINEL}, dtype={acc})",
             f"total = tl.full([BLOCK_R, BLOCK_F], 0.0, dtype={acc})")
        with code.block("for i in range(0, longest):"):
            _member_loads(code, gather=False, need_member=True, width=G, acc=acc)
            code("val = tl.where(ok, val, peak)",
                 "new_peak = tl.maximum(peak, val)",
                 "total = tl.where(ok, total * tl.exp(peak - new_peak) + tl.exp(val - new_peak), total)",
                 "peak = new_peak")
        code("result = tl.where(count[:, None] > 0, peak + tl.log(tl.where(total > 0, total, 1.0)), 0.0)")
        _store_rows(code, G, "result", store)
    return code.text()


def _gen_attention_score_grad(spec: AttentionScoreGrad) -> str:
    F, G, acc, store = spec.width, spec.groups, ACCUMULATE[spec.dtype], STORE[spec.dtype]
    K = F // G
    code = _Code()
    code("@triton.jit")
    with code.block(f"def {spec.name}(indptr, order, perm, cols, score, lse, x, g, delta, out, n_rows, "
                    "BLOCK_R: tl.constexpr):"):
        code(f'"""out[e, h] = exp(score[e, h] - lse[i, h]) * (<g[i], x[cols[e]]>_h - delta[i, h]) for the members e '
             f'of segment i; {G} group(s) of {K} features, the dot product summed feature by feature."""')
        _segment_rows(code)
        code(f"grp = tl.arange(0, {next_pow2(G)})",
             f"head_ok = row_ok[:, None] & (grp < {G})[None, :]",
             f"top = tl.load(lse + row[:, None] * {G} + grp[None, :], mask=head_ok, other=0.0).to({acc})",
             f"base = tl.load(delta + row[:, None] * {G} + grp[None, :], mask=head_ok, other=0.0).to({acc})")
        with code.block("for i in range(0, longest):"):
            code("live = i < count",
                 f"ok = live[:, None] & (grp < {G})[None, :]",
                 "member = tl.load(perm + start + i, mask=live, other=0).to(tl.int64)",
                 "node = tl.load(cols + start + i, mask=live, other=0).to(tl.int64)",
                 f"dot = tl.full([BLOCK_R, {next_pow2(G)}], 0.0, dtype={acc})")
            with code.block(f"for k in range(0, {K}):"):
                code(f"feature = grp[None, :] * {K} + k",
                     f"gk = tl.load(g + row[:, None] * {F} + feature, mask=ok, other=0.0).to({acc})",
                     f"xk = tl.load(x + node[:, None] * {F} + feature, mask=ok, other=0.0).to({acc})",
                     "dot += gk * xk")
            code(f"s = tl.load(score + member[:, None] * {G} + grp[None, :], mask=ok, other=0.0).to({acc})",
                 f"tl.store(out + member[:, None] * {G} + grp[None, :], (tl.exp(s - top) * (dot - base)).to({store}), "
                 "mask=ok)")
    return code.text()


def _gen_attention_value_grad(spec: AttentionValueGrad) -> str:
    F, G, acc, store = spec.width, spec.groups, ACCUMULATE[spec.dtype], STORE[spec.dtype]
    code = _Code()
    code("@triton.jit")
    with code.block(f"def {spec.name}(indptr, order, perm, cols, score, lse, x, out, n_rows, "
                    "BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):"):
        code(f'"""out[j, f] = sum over the members e of segment j of exp(score[e, f // {F // G}] - lse[cols[e], '
             f'f // {F // G}]) * x[cols[e], f]; {G} score group(s) of {F // G} features, weights recomputed per '
             'edge."""')
        _segment_prologue(code, F)
        code(f"acc = tl.full([BLOCK_R, BLOCK_F], 0.0, dtype={acc})")
        with code.block("for i in range(0, longest):"):
            _member_loads(code, gather=True, need_member=True, width=F, acc=acc)
            code(f"s = tl.load(score + {_group_index('member', G, F)}, mask=ok, other=0.0).to({acc})",
                 f"top = tl.load(lse + {_group_index('node', G, F)}, mask=ok, other=0.0).to({acc})",
                 "acc += tl.where(ok, tl.exp(s - top) * val, 0.0)")
        _store_rows(code, F, "acc", store)
    return code.text()


def _gen_typed_linear(spec: TypedLinear) -> str:
    D, B, acc, store = spec.inner, spec.width, ACCUMULATE[spec.dtype], STORE[spec.dtype]
    code = _Code()
    code("@triton.jit")
    with code.block(f"def {spec.name}(tile_rel, tile_lo, tile_hi, rows_in, rows_out, h, w, out, "
                    "BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):"):
        code(f'"""out[rows_out[m]] = h[rows_in[m]] @ W[rel] for the rows m of one tile, all of relation rel; '
             f'W[rel] is [{D}, {B}]."""')
        code("tile = tl.program_id(0)",
             "pid_n = tl.program_id(1)",
             "rel = tl.load(tile_rel + tile).to(tl.int64)",
             "lo = tl.load(tile_lo + tile)",
             "hi = tl.load(tile_hi + tile)",
             "m = lo + tl.arange(0, BLOCK_M)",
             "m_ok = m < hi",
             "row_in = tl.load(rows_in + m, mask=m_ok, other=0).to(tl.int64)",
             "row_out = tl.load(rows_out + m, mask=m_ok, other=0).to(tl.int64)",
             "n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)",
             f"n_ok = n < {B}",
             f"acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype={acc})")
        with code.block(f"for k0 in range(0, {D}, BLOCK_K):"):
            code("k = k0 + tl.arange(0, BLOCK_K)",
                 f"k_ok = k < {D}",
                 f"a = tl.load(h + row_in[:, None] * {D} + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)",
                 f"b = tl.load(w + rel * {D * B} + k[:, None] * {B} + n[None, :], mask=k_ok[:, None] & n_ok[None, :], "
                 "other=0.0)")
            if spec.dtype in ("f32", "f64"):
                code('acc = tl.dot(a, b, acc, input_precision="ieee")')
            else:
                code(f"acc = tl.dot(a, b, acc)  # {spec.dtype} operands, f32 accumulation")
        code(f"tl.store(out + row_out[:, None] * {B} + n[None, :], acc.to({store}), "
             "mask=m_ok[:, None] & n_ok[None, :])")
    return code.text()


def _lanes(n: int) -> int:
    """Padded lanes of a per-head axis of n features (a power of two, at least 16 for ``tl.dot``)."""
    return max(16, next_pow2(n))


def _node_tile(array: str, nodes: str, ok: str, lanes: str, per_head: int, row_width: int, acc: str,
               transposed: bool = False) -> str:
    """The load of head h's features of ``nodes`` from a [N, H, per_head]-laid-out array with rows of
    ``row_width``: [BLOCK, lanes] (or [lanes, BLOCK] ``transposed``), 0 outside ``ok`` and the lanes."""
    n, f = ("[None, :]", "[:, None]") if transposed else ("[:, None]", "[None, :]")
    return (f"tl.load({array} + {nodes}{n} * {row_width} + h * {per_head} + {lanes}{f}, "
            f"mask={ok}{n} & ({lanes} < {per_head}){f}, other=0.0).to({acc})")


def _gen_global_attention(spec: GlobalAttention) -> str:
    H, K, D, acc, store = spec.heads, spec.keys, spec.width, ACCUMULATE[spec.dtype], STORE[spec.dtype]
    scale = repr(float(spec.scale))
    name = spec.name
    args = {"forward": "q, k, v, out", "query_grad": "q, k, v, lse, g, delta, out",
            "key_grad": "q, k, v, lse, g, delta, out"}[spec.pass_]
    code = _Code()
    for helper, body in (("max", "tl.maximum(a, b)"), ("sum", "a + b")):
        code("@triton.jit")
        with code.block(f"def {name}_{helper}(a, b):"):
            code(f"return {body}")
        code("", "")
    code("@triton.jit")
    with code.block(f"def {name}(nodes, starts, counts, offsets, {args}, BLOCK: tl.constexpr):"):
        doc = {"forward": f"out[i, h] = [sum_j softmax_j({scale} * <q_i, k_j>) v_j, lse_i] over the nodes j of i's "
                          "graph: an online softmax over the key blocks",
               "query_grad": f"out[i, h] = {scale} * sum_j p_ij (<g_i, v_j> - delta_i) k_j, p_ij = exp({scale} * "
                             "<q_i, k_j> - lse_i), over the key blocks of i's graph",
               "key_grad": f"out[j, h] = [{scale} * sum_i p_ij (<g_i, v_j> - delta_i) q_i, sum_i p_ij g_i] over the "
                           "query blocks of j's graph"}[spec.pass_]
        code(f'"""{doc}; {H} head(s), K = {K}, D = {D}, {acc} tiles."""',
             "item = tl.program_id(0)",
             "h = tl.program_id(1).to(tl.int64)",
             "start = tl.load(starts + item).to(tl.int64)",
             "count = tl.load(counts + item).to(tl.int64)",
             "pos = tl.load(offsets + item).to(tl.int64) + tl.arange(0, BLOCK)",
             "row_ok = pos < count",
             "row = tl.load(nodes + start + pos, mask=row_ok, other=0).to(tl.int64)",
             f"kk = tl.arange(0, {_lanes(K)})",
             f"dd = tl.arange(0, {_lanes(D)})")

        def loop_columns() -> None:
            code("cpos = c0 + tl.arange(0, BLOCK)",
                 "col_ok = cpos < count",
                 "col = tl.load(nodes + start + cpos, mask=col_ok, other=0).to(tl.int64)")

        def tile(array: str, nodes: str, per_head: str, transposed: bool = False) -> str:
            size = {"K": K, "D": D}[per_head]
            lanes = {"K": "kk", "D": "dd"}[per_head]
            ok = "row_ok" if nodes == "row" else "col_ok"
            return _node_tile(array, nodes, ok, lanes, size, H * size, acc, transposed)

        def per_head(array: str, nodes: str) -> str:
            ok = "row_ok" if nodes == "row" else "col_ok"
            return f"tl.load({array} + {nodes} * {H} + h, mask={ok}, other=0.0).to({acc})"

        dot = 'input_precision="ieee"'
        if spec.pass_ == "forward":
            code(f"qt = {tile('q', 'row', 'K')} * {scale}",
                 f"peak = tl.full([BLOCK], {NEG_SENTINEL}, dtype={acc})  # running max",
                 f"total = tl.full([BLOCK], 0.0, dtype={acc})  # running sum of exp(s - peak)",
                 f"acc = tl.full([BLOCK, {_lanes(D)}], 0.0, dtype={acc})  # running sum of exp(s - peak) v")
            with code.block("for c0 in range(0, count, BLOCK):"):
                loop_columns()
                code(f"s = tl.dot(qt, {tile('k', 'col', 'K', True)}, {dot})",
                     f"s = tl.where(col_ok[None, :], s, {NEG_SENTINEL})",
                     f"new_peak = tl.maximum(peak, tl.reduce(s, 1, {name}_max))",
                     "p = tl.where(col_ok[None, :], tl.exp(s - new_peak[:, None]), 0.0)",
                     "rescale = tl.exp(peak - new_peak)",
                     f"total = total * rescale + tl.reduce(p, 1, {name}_sum)",
                     f"acc = acc * rescale[:, None] + tl.dot(p, {tile('v', 'col', 'D')}, {dot})",
                     "peak = new_peak")
            code(f"out_row = out + row * {H * (D + 1)} + h * {D + 1}",
                 f"tl.store(out_row[:, None] + dd[None, :], (acc / total[:, None]).to({store}), "
                 f"mask=row_ok[:, None] & (dd < {D})[None, :])",
                 f"tl.store(out_row + {D}, (peak + tl.log(total)).to({store}), mask=row_ok)")
        elif spec.pass_ == "query_grad":
            code(f"qt = {tile('q', 'row', 'K')} * {scale}",
                 f"gt = {tile('g', 'row', 'D')}",
                 f"top = {per_head('lse', 'row')}",
                 f"base = {per_head('delta', 'row')}",
                 f"dq = tl.full([BLOCK, {_lanes(K)}], 0.0, dtype={acc})")
            with code.block("for c0 in range(0, count, BLOCK):"):
                loop_columns()
                code(f"s = tl.dot(qt, {tile('k', 'col', 'K', True)}, {dot})",
                     "p = tl.where(col_ok[None, :], tl.exp(s - top[:, None]), 0.0)",
                     f"dp = tl.dot(gt, {tile('v', 'col', 'D', True)}, {dot})",
                     f"dq += tl.dot(p * (dp - base[:, None]), {tile('k', 'col', 'K')}, {dot})")
            code(f"tl.store(out + row[:, None] * {H * K} + h * {K} + kk[None, :], (dq * {scale}).to({store}), "
                 f"mask=row_ok[:, None] & (kk < {K})[None, :])")
        else:
            code(f"kt = {tile('k', 'row', 'K')} * {scale}",
                 f"vt = {tile('v', 'row', 'D')}",
                 f"dk = tl.full([BLOCK, {_lanes(K)}], 0.0, dtype={acc})",
                 f"dv = tl.full([BLOCK, {_lanes(D)}], 0.0, dtype={acc})")
            with code.block("for c0 in range(0, count, BLOCK):"):
                loop_columns()
                code(f"s = tl.dot(kt, {tile('q', 'col', 'K', True)}, {dot})  # [keys, queries]",
                     f"p = tl.where(col_ok[None, :], tl.exp(s - {per_head('lse', 'col')}[None, :]), 0.0)",
                     f"dp = tl.dot(vt, {tile('g', 'col', 'D', True)}, {dot})",
                     f"ds = p * (dp - {per_head('delta', 'col')}[None, :])",
                     f"dv += tl.dot(p, {tile('g', 'col', 'D')}, {dot})",
                     f"dk += tl.dot(ds, {tile('q', 'col', 'K')}, {dot})")
            code(f"out_row = out + row * {H * (K + D)} + h * {K + D}",
                 f"tl.store(out_row[:, None] + kk[None, :], (dk * {scale}).to({store}), "
                 f"mask=row_ok[:, None] & (kk < {K})[None, :])",
                 f"tl.store(out_row[:, None] + {K} + dd[None, :], dv.to({store}), "
                 f"mask=row_ok[:, None] & (dd < {D})[None, :])")
    return code.text()


def _coo_prologue(code: _Code, width: int) -> None:
    code("pid_e = tl.program_id(0)",
         "pid_f = tl.program_id(1)",
         "edge = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)",
         "live = edge < n_edges",
         "feat = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)",
         f"feat_ok = feat < {width}",
         "ok = live[:, None] & feat_ok[None, :]",
         "member = edge.to(tl.int64)",
         "target = tl.load(write + edge, mask=live, other=0).to(tl.int64)")


def _finish_prologue(code: _Code, width: int) -> None:
    code("pid_r = tl.program_id(0)",
         "pid_f = tl.program_id(1)",
         "row = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)",
         "row_ok = row < n_rows",
         "feat = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)",
         f"feat_ok = feat < {width}",
         "out_ok = row_ok[:, None] & feat_ok[None, :]")


def _gen_coo_gspmm(spec: CooGspmm) -> str:
    F, G, acc, store = spec.width, spec.groups, ACCUMULATE[spec.dtype], STORE[spec.dtype]
    scatter, finish = spec.functions()
    atomic = choose(COO_ATOMICS, "gspmm", "reduce", spec.reduce, "the Triton COO g-SpMM generator")
    code = _Code()
    code("@triton.jit")
    args = ["read", "write", "x"] + (["w"] if G else []) + ["acc", "n_edges"]
    with code.block(f"def {scatter}({', '.join(args)}, BLOCK_E: tl.constexpr, BLOCK_F: tl.constexpr):"):
        code(f'"""COO: {atomic}(acc[write[e], f], value of edge e) for a block of edges; {F} features."""')
        _coo_prologue(code, F)
        code("node = tl.load(read + edge, mask=live, other=0).to(tl.int64)",
             f"val = tl.load(x + node[:, None] * {F} + feat[None, :], mask=ok, other=0.0).to({acc})")
        if G:
            _weight_line(code, G, F, acc)
        code(f"{atomic}(acc + target[:, None] * {F} + feat[None, :], val, mask=ok)")
    code("")
    code("")
    code("@triton.jit")
    with code.block(f"def {finish}(acc, count, out, n_rows, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):"):
        code(f'"""Writes every output element: the {spec.reduce} from the accumulator (0 for rows without edges)."""')
        _finish_prologue(code, F)
        code(f"value = tl.load(acc + row[:, None] * {F} + feat[None, :], mask=out_ok, other=0.0)",
             "n = tl.load(count + row, mask=row_ok, other=0)")
        if spec.reduce == "mean":
            code(f"value = value / tl.maximum(n, 1).to({acc})[:, None]")
        elif spec.reduce in ("max", "min"):
            code("value = tl.where(n[:, None] > 0, value, 0.0)")
        elif spec.reduce != "sum":
            raise MissingRule(f"the Triton COO g-SpMM generator does not finish reduce={spec.reduce!r}")
        _store_rows(code, F, "value", store)
    return code.text()


def _gen_coo_attention(spec: CooAttention) -> str:
    F, G, acc, store = spec.width, spec.groups, ACCUMULATE[spec.dtype], STORE[spec.dtype]
    K = F // G
    peak_fn, scatter, finish = spec.functions()
    code = _Code()
    code("@triton.jit")
    with code.block(f"def {peak_fn}(write, score, peak, n_edges, BLOCK_E: tl.constexpr):"):
        code(f'"""COO: peak[write[e], g] = max of the scores of the edges into each node, per group ({G})."""')
        code("edge = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)",
             "live = edge < n_edges",
             f"grp = tl.arange(0, {next_pow2(G)})",
             f"ok = live[:, None] & (grp < {G})[None, :]",
             "target = tl.load(write + edge, mask=live, other=0).to(tl.int64)",
             f"s = tl.load(score + edge.to(tl.int64)[:, None] * {G} + grp[None, :], mask=ok, other=0.0).to({acc})",
             f"tl.atomic_max(peak + target[:, None] * {G} + grp[None, :], s, mask=ok)")
    code("")
    code("")
    code("@triton.jit")
    with code.block(f"def {scatter}(read, write, score, peak, x, denom, acc, n_edges, BLOCK_E: tl.constexpr, "
                    "BLOCK_F: tl.constexpr):"):
        code('"""COO: p = exp(score - peak); denom[write[e], g] += p (once per group); '
             'acc[write[e], f] += p * x[read[e], f]."""')
        _coo_prologue(code, F)
        code("node = tl.load(read + edge, mask=live, other=0).to(tl.int64)",
             f"s = tl.load(score + {_group_index('member', G, F)}, mask=ok, other=0.0).to({acc})",
             f"top = tl.load(peak + {_group_index('target', G, F)}, mask=ok, other=0.0)",
             "p = tl.where(ok, tl.exp(s - top), 0.0)",
             f"val = tl.load(x + node[:, None] * {F} + feat[None, :], mask=ok, other=0.0).to({acc})",
             f"tl.atomic_add(denom + {_group_index('target', G, F)}, p, mask=ok & (feat[None, :] % {K} == 0))",
             f"tl.atomic_add(acc + target[:, None] * {F} + feat[None, :], p * val, mask=ok)")
    code("")
    code("")
    code("@triton.jit")
    with code.block(f"def {finish}(denom, acc, out, n_rows, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):"):
        code('"""Writes every output element: acc / denom (0 for rows without edges)."""')
        _finish_prologue(code, F)
        code(f"value = tl.load(acc + row[:, None] * {F} + feat[None, :], mask=out_ok, other=0.0)",
             f"d = tl.load(denom + {_group_index('row', G, F)}, mask=out_ok, other=0.0)",
             "value = tl.where(d > 0, value / tl.where(d > 0, d, 1.0), 0.0)")
        _store_rows(code, F, "value", store)
    return code.text()


# each generator takes its own spec class, the key it is filed under
_GENERATORS: dict[type[KernelSpec], Callable[[Any], str]] = {
    SegmentReduce: _gen_segment_reduce, MatchSegmentSum: _gen_match_segment_sum,
    SegmentSoftmax: _gen_segment_softmax, Attention: _gen_attention,
    SegmentLogSumExp: _gen_segment_logsumexp, AttentionScoreGrad: _gen_attention_score_grad,
    AttentionValueGrad: _gen_attention_value_grad, TypedLinear: _gen_typed_linear, CooGspmm: _gen_coo_gspmm,
    CooAttention: _gen_coo_attention, GlobalAttention: _gen_global_attention}


def generate(spec: KernelSpec) -> str:
    """The source text of the kernel(s) of ``spec`` (without the module header)."""
    return _GENERATORS[type(spec)](spec)


# ---- compilation cache ----------------------------------------------------------------------


@contextlib.contextmanager
def _interpreter(on: bool):
    """Triton decides at decoration time (from TRITON_INTERPRET) whether a function runs in its
    interpreter; kernels are decorated here, lazily, so the mode asked for only needs to hold while
    they are (``on`` False compiles for the GPU even where TRITON_INTERPRET=1 is set)."""
    wanted = "1" if on else None
    previous = os.environ.get("TRITON_INTERPRET")
    if (previous == "1") == on:
        yield
        return
    if wanted is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = wanted
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


class KernelCache:
    """Generated kernels by hash. ``sources`` maps a spec's key to its text; ``compilations``
    counts the sources turned into Triton functions (one per key and interpreter mode)."""

    def __init__(self) -> None:
        self.sources: dict[str, str] = {}
        self._compiled: dict[tuple[str, bool], dict[str, Any]] = {}
        self.compilations = 0
        self._lock = threading.Lock()

    def source(self, spec: KernelSpec) -> str:
        key = spec.key
        if key not in self.sources:
            self.sources[key] = generate(spec)
        return self.sources[key]

    def get(self, spec: KernelSpec, interpret: bool) -> dict[str, Any]:
        """The jit functions of ``spec`` by name (compiled on first use)."""
        cache_key = (spec.key, interpret)
        found = self._compiled.get(cache_key)
        if found is not None:
            return found
        with self._lock:
            if cache_key not in self._compiled:
                text = HEADER + "\n\n" + self.source(spec)
                filename = f"<mpdsl-triton {spec.name}{' interpreted' if interpret else ''}>"
                # Triton reads a kernel's source with inspect.getsourcelines: register it with linecache.
                linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
                namespace: dict[str, Any] = {"__name__": f"mpdsl_triton_{spec.key}"}
                with _interpreter(interpret):
                    exec(compile(text, filename, "exec"), namespace)
                self._compiled[cache_key] = {name: namespace[name] for name in spec.functions()}
                self.compilations += 1
        return self._compiled[cache_key]

    def clear(self) -> None:
        self.sources.clear()
        self._compiled.clear()
        self.compilations = 0


KERNELS = KernelCache()
