"""Compiled CPU kernels of the NumPy backend's graph ops (Numba, parallel over row chunks).

Every kernel is pull-style over a CSR grouping: output row ``r`` reduces the edges
``indptr[r]:indptr[r + 1]``, reading input row ``columns[e]`` of each. Rows are split into
``chunks`` (row bounds, balanced by edge count) that run in parallel; each output row is written by
exactly one chunk, so there are no atomics and the result does not depend on the thread count.
Edges of a row are summed in CSR order, the order of SciPy's CSR product. Kernels are compiled on
first use and cached on disk: in ``NUMBA_CACHE_DIR`` when the user set it, else in a per-user folder
(``CACHE_DIR``: ``$XDG_CACHE_HOME/mpdsl/numba`` or ``~/.cache/mpdsl/numba``), never in the installed
package, which may be read-only or shared with other users (Numba's cache index is a pickle).

The gathers are latency-bound (the rows read are scattered over a feature array larger than L2), so
while summing edge ``e`` the kernels prefetch the input row of edge ``e + PREFETCH_DISTANCE``: every
cache line of it, since a row of 64 float32 features spans four lines.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from typing import Any, TypedDict

from mpdsl.cache_dirs import user_cache_folder

# Set before Numba reads its configuration (at import, or now if the user imported it already); a
# value the user set is left alone.
if "NUMBA_CACHE_DIR" not in os.environ:
    _folder = user_cache_folder("numba")
    if _folder is not None:
        os.environ["NUMBA_CACHE_DIR"] = _folder
        if "numba" in sys.modules:
            importlib.import_module("numba.core.config").reload_config()
CACHE_DIR = os.environ.get("NUMBA_CACHE_DIR") or None

import numba  # noqa: E402
import numpy as np  # noqa: E402
from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from mpdsl.backends import serial_row_copy  # noqa: E402


class _JitOptions(TypedDict):
    """Keyword options of ``njit`` shared by the parallel kernels (typed so ``njit(**_JIT)`` checks)."""

    parallel: bool
    nogil: bool
    cache: bool
    boundscheck: bool


_JIT: _JitOptions = {"parallel": True, "nogil": True, "cache": True, "boundscheck": False}

# Numba's default OpenMP layer keeps its threads spinning for a while after each kernel, which takes
# the cores from the BLAS and NumPy work that follows (measured: +5 ms on a 25 MB elementwise pass).
# The workqueue layer's threads sleep instead; it must not be entered from two threads at once, so
# every parallel launch goes through ``launch`` (the kernels use all cores anyway).
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"  # type: ignore[attr-defined]  # numba sets config at run time
_LAUNCH = threading.Lock()


def _fresh_launch_lock() -> None:
    """In a forked child (a DataLoader worker), replace the launch lock: a parent thread that was
    launching at the fork would have left the child's copy held forever. The workqueue layer itself
    is fork-safe: its own at-fork handler restarts its thread pool in the child."""
    global _LAUNCH
    _LAUNCH = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_launch_lock)


CACHE_LINE_BYTES = 64
# edges ahead; measured on the 100k-node, 1M-edge uniform graph with 64 float32 features: sum g-SpMM
# 27.6 ms without prefetching, 23.8 ms prefetching one line of a row 4-8 edges ahead, 14.9 ms
# prefetching all four lines 8 edges ahead (16.7 ms at 6 and at 12)
PREFETCH_DISTANCE = 8


def _prefetch_codegen(context, builder, signature, args):
    """LLVM's ``llvm.prefetch`` (read, keep in all levels) of the element of array ``args[0]`` at the
    integer indices ``args[1:]``."""
    array_type = signature.args[0]
    data = context.make_array(array_type)(context, builder, args[0])
    indices = [context.cast(builder, value, kind, types.intp)
               for value, kind in zip(args[1:], signature.args[1:])]
    pointer = cgutils.get_item_pointer(context, builder, array_type, data, indices,
                                       wraparound=False)
    byte_pointer = ir.IntType(8).as_pointer()
    int32 = ir.IntType(32)
    hint = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer, int32, int32, int32]),
        "llvm.prefetch.p0")
    builder.call(hint, [builder.bitcast(pointer, byte_pointer), ir.Constant(int32, 0),
                        ir.Constant(int32, 3), ir.Constant(int32, 1)])
    return context.get_dummy_value()


@intrinsic
def _prefetch(typingctx, array, row, column):
    """Hint the cache to load ``array[row, column]``; no effect on the program's values, and never
    a fault, whatever the address."""
    if not (isinstance(array, types.Array) and array.ndim == 2
            and isinstance(row, types.Integer) and isinstance(column, types.Integer)):
        return None
    return types.void(array, row, column), _prefetch_codegen


@intrinsic
def prefetch_item(typingctx, array, index):
    """Hint the cache to load ``array[index]`` of a 1-D array; no effect on the program's values,
    and never a fault, whatever the index."""
    if not (isinstance(array, types.Array) and array.ndim == 1 and isinstance(index, types.Integer)):
        return None
    return types.void(array, index), _prefetch_codegen


@njit(inline="always")
def _prefetch_row(x, columns, e):
    """Prefetch every cache line of ``x[columns[e]]`` when edge ``e`` exists."""
    if e < columns.shape[0]:
        row = columns[e]
        step = max(1, CACHE_LINE_BYTES // x.itemsize)
        for k in range(0, x.shape[1], step):
            _prefetch(x, row, k)


def launch(kernel, *args) -> Any:
    """Run a parallel kernel, one launch at a time in this process; returns what the kernel returns."""
    with _LAUNCH:
        return kernel(*args)


@njit(**_JIT)
def spmm(indptr, columns, weights, x, out, chunks, mean):
    """out[r] = sum_e w[e] * x[columns[e]] over row r's edges (w = 1 when ``weights`` is empty);
    with ``mean`` the sum is divided by the row's edge count (an empty row stays 0).
    x: [N, F], out: [M, F], weights: [E] in CSR order or empty."""
    width = x.shape[1]
    weighted = weights.shape[0] > 0
    for chunk in prange(chunks.shape[0] - 1):
        for r in range(chunks[chunk], chunks[chunk + 1]):
            for k in range(width):
                out[r, k] = 0
            lo, hi = indptr[r], indptr[r + 1]
            if weighted:
                for e in range(lo, hi):
                    _prefetch_row(x, columns, e + PREFETCH_DISTANCE)
                    j = columns[e]
                    w = weights[e]
                    for k in range(width):
                        out[r, k] += w * x[j, k]
            else:
                for e in range(lo, hi):
                    _prefetch_row(x, columns, e + PREFETCH_DISTANCE)
                    j = columns[e]
                    for k in range(width):
                        out[r, k] += x[j, k]
            if mean and hi > lo:
                scale = 1.0 / (hi - lo)
                for k in range(width):
                    out[r, k] *= scale


@njit(**_JIT)
def match_spmm(indptr, columns, column_values, row_values, x, out, chunks, weighted):
    """out[r, k] = sum_e [column_values[columns[e], k] == row_values[r, k]] * x[columns[e], k] over
    row r's edges (1 in place of x unless ``weighted``): the sums over matching endpoints of
    ``match_gspmm``. column_values, x: [N, F] (x may be [0, F] when not weighted), row_values,
    out: [M, F]."""
    width = out.shape[1]
    for chunk in prange(chunks.shape[0] - 1):
        for r in range(chunks[chunk], chunks[chunk + 1]):
            for k in range(width):
                out[r, k] = 0
            lo, hi = indptr[r], indptr[r + 1]
            if weighted:
                for e in range(lo, hi):
                    _prefetch_row(column_values, columns, e + PREFETCH_DISTANCE)
                    _prefetch_row(x, columns, e + PREFETCH_DISTANCE)
                    j = columns[e]
                    for k in range(width):
                        out[r, k] += (column_values[j, k] == row_values[r, k]) * x[j, k]
            else:
                for e in range(lo, hi):
                    _prefetch_row(column_values, columns, e + PREFETCH_DISTANCE)
                    j = columns[e]
                    for k in range(width):
                        out[r, k] += column_values[j, k] == row_values[r, k]


SUM, MEAN, NORMALIZED = 0, 1, 2  # grouped_spmm modes


@njit(**_JIT)
def grouped_spmm(indptr, columns, weights, x, out, chunks, mode, lse):
    """Per-group edge weights: out[r, g*C + c] = sum_e w[e, g] * x[columns[e], g*C + c], divided
    by the row's edge count (``MEAN``) or by the row's weight total of group g (``NORMALIZED``: a
    softmax when the weights are exponentiated scores); an empty row stays 0.
    x: [N, G*C], out: [M, G*C], weights: [E, G] in CSR order. ``lse`` [M, G] (or empty: not
    wanted), holding each row's score peaks (``shift_by_row_max``) when the weights are
    exp(score - peak), becomes the rows' log-sum-exp: peak + log(weight total), 0 for an empty row,
    as ``row_logsumexp`` computes it (the same sum in the same order: the same bits)."""
    groups = weights.shape[1]
    width = x.shape[1] // groups
    with_lse = lse.shape[0] > 0
    for chunk in prange(chunks.shape[0] - 1):
        acc = np.empty(x.shape[1], dtype=out.dtype)
        totals = np.empty(groups, dtype=out.dtype)
        for r in range(chunks[chunk], chunks[chunk + 1]):
            lo, hi = indptr[r], indptr[r + 1]
            acc[:] = 0
            totals[:] = 0
            for e in range(lo, hi):
                _prefetch_row(x, columns, e + PREFETCH_DISTANCE)
                j = columns[e]
                for g in range(groups):
                    w = weights[e, g]
                    totals[g] += w
                    base = g * width
                    for k in range(width):
                        acc[base + k] += w * x[j, base + k]
            for g in range(groups):
                if hi == lo or mode == SUM:
                    divisor = 1.0
                elif mode == MEAN:
                    divisor = hi - lo
                else:
                    divisor = totals[g]
                base = g * width
                for k in range(width):
                    out[r, base + k] = acc[base + k] / divisor
                if with_lse:
                    lse[r, g] = 0 if hi == lo else lse[r, g] + np.log(totals[g])


@njit(**_JIT)
def shift_by_row_max(indptr, scores, shifted, chunks, peaks):
    """shifted[e, g] = scores[e, g] - max over e's row of scores[., g] (the softmax shift), the
    maxima also written to ``peaks`` [M, G] unless it is empty. scores, shifted: [E, G] in CSR order."""
    groups = scores.shape[1]
    with_peaks = peaks.shape[0] > 0
    for chunk in prange(chunks.shape[0] - 1):
        peak = np.empty(groups, dtype=scores.dtype)
        for r in range(chunks[chunk], chunks[chunk + 1]):
            lo, hi = indptr[r], indptr[r + 1]
            peak[:] = -np.inf
            for e in range(lo, hi):
                for g in range(groups):
                    peak[g] = max(peak[g], scores[e, g])
            for e in range(lo, hi):
                for g in range(groups):
                    shifted[e, g] = scores[e, g] - peak[g]
            if with_peaks:
                for g in range(groups):
                    peaks[r, g] = peak[g]


@njit(**_JIT)
def row_logsumexp(indptr, scores, exps, out, chunks):
    """out[r, g] = max + log(sum of exps[e, g]) over row r's edges e, the max taken of scores[e, g]
    (``exps`` = exp(scores - row max), from ``shift_by_row_max`` and an exponential); 0 for an
    empty row. scores, exps: [E, G] in CSR order; out: [M, G]."""
    groups = scores.shape[1]
    for chunk in prange(chunks.shape[0] - 1):
        peak = np.empty(groups, dtype=scores.dtype)
        total = np.empty(groups, dtype=out.dtype)
        for r in range(chunks[chunk], chunks[chunk + 1]):
            lo, hi = indptr[r], indptr[r + 1]
            if hi == lo:
                for g in range(groups):
                    out[r, g] = 0
                continue
            peak[:] = -np.inf
            total[:] = 0
            for e in range(lo, hi):
                for g in range(groups):
                    peak[g] = max(peak[g], scores[e, g])
                    total[g] += exps[e, g]
            for g in range(groups):
                out[r, g] = peak[g] + np.log(total[g])


@njit(**_JIT)
def shift_by_node(indptr, columns, order, scores, per_node, shifted, chunks, at_column):
    """shifted[e, g] = scores[order[e], g] - per_node[n, g] for each edge e of row r (CSR order),
    n = columns[e] with ``at_column``, else r (the softmax shift by a log-sum-exp: exp(shifted) are the
    softmax weights). ``order``: the edge id of each CSR position, or empty when scores are in CSR
    order. scores: [E, G]; shifted: [E, G] in CSR order; per_node: [N, G]."""
    groups = scores.shape[1]
    reordered = order.shape[0] > 0
    for chunk in prange(chunks.shape[0] - 1):
        for r in range(chunks[chunk], chunks[chunk + 1]):
            for e in range(indptr[r], indptr[r + 1]):
                n = columns[e] if at_column else r
                edge = order[e] if reordered else e
                for g in range(groups):
                    shifted[e, g] = scores[edge, g] - per_node[n, g]


@njit(**_JIT)
def attention_score_grad(indptr, columns, weights, x, g, delta, out, chunks):
    """The destination pass of the attention backward: for each edge e of row r (CSR order) and group
    h, out[e, h] = weights[e, h] * (<g[r], x[columns[e]]>_h - delta[r, h]), the dot product over the
    K = width / G features of group h, summed in order. weights, out: [E, G]; delta: [M, G];
    x: [N, G*K]; g: [M, G*K]."""
    groups = weights.shape[1]
    width = x.shape[1] // groups
    for chunk in prange(chunks.shape[0] - 1):
        for r in range(chunks[chunk], chunks[chunk + 1]):
            for e in range(indptr[r], indptr[r + 1]):
                _prefetch_row(x, columns, e + PREFETCH_DISTANCE)
                j = columns[e]
                for h in range(groups):
                    base = h * width
                    dot = 0.0
                    for k in range(width):
                        dot += g[r, base + k] * x[j, base + k]
                    out[e, h] = weights[e, h] * (dot - delta[r, h])


# ---- global attention: every pair of nodes of each graph, blocked (flash-attention style) ---------------
#
# A work item is one block of GLOBAL_BLOCK consecutive nodes of one graph (its queries in the forward and
# the query pass, its keys in the key pass), which loops over the graph's nodes in blocks of the same size:
# the scores of one query row against one key block are the largest temporary, never a graph's n x n
# scores. ``nodes`` lists node ids grouped by graph (the batch's segments by graph), so the nodes of a graph
# need not be contiguous; ``starts``, ``counts`` and ``offsets`` give each item's graph (its first position
# in ``nodes`` and its size) and the item's first node within it (``mpdsl.backends.graph_blocks``). Items are split into
# ``chunks`` of about equal pair counts; every output row is written by one item.

GLOBAL_BLOCK = 64  # nodes per block (mpdsl.backends.graph_blocks)


@njit(**_JIT)
def global_attention(nodes, starts, counts, offsets, chunks, q, k, v, scale, out):
    """out[i, h] = [sum_j softmax_j(scale * <q_i, k_j>) v_j, log sum_j exp(scale * <q_i, k_j>)] per head h
    over the nodes j of i's graph: a running max and sum per query row, the accumulator rescaled as the
    max grows. q, k: [N, H, K]; v: [N, H, D]; out: [N, H, D + 1]."""
    heads, keys, width = q.shape[1], q.shape[2], v.shape[2]
    block = GLOBAL_BLOCK
    for chunk in prange(chunks.shape[0] - 1):
        qb = np.empty((block, keys), dtype=out.dtype)
        kb = np.empty((block, keys), dtype=out.dtype)
        vb = np.empty((block, width), dtype=out.dtype)
        scores = np.empty(block, dtype=out.dtype)
        acc = np.empty((block, width), dtype=out.dtype)
        peak = np.empty(block, dtype=out.dtype)
        total = np.empty(block, dtype=out.dtype)
        for item in range(chunks[chunk], chunks[chunk + 1]):
            start, count, first = starts[item], counts[item], offsets[item]
            rows = min(block, count - first)
            for h in range(heads):
                for a in range(rows):
                    i = nodes[start + first + a]
                    for c in range(keys):
                        qb[a, c] = q[i, h, c] * scale
                    peak[a] = -np.inf
                    total[a] = 0
                    acc[a, :] = 0
                for j0 in range(0, count, block):
                    cols = min(block, count - j0)
                    for b in range(cols):
                        j = nodes[start + j0 + b]
                        kb[b, :] = k[j, h, :]
                        vb[b, :] = v[j, h, :]
                    for a in range(rows):
                        top = peak[a]
                        for b in range(cols):
                            s = 0.0
                            for c in range(keys):
                                s += qb[a, c] * kb[b, c]
                            scores[b] = s
                            top = max(top, scores[b])
                        rescale = np.exp(peak[a] - top)
                        running = total[a] * rescale
                        for d in range(width):
                            acc[a, d] *= rescale
                        for b in range(cols):
                            weight = np.exp(scores[b] - top)
                            running += weight
                            for d in range(width):
                                acc[a, d] += weight * vb[b, d]
                        total[a] = running
                        peak[a] = top
                for a in range(rows):
                    i = nodes[start + first + a]
                    inverse = 1.0 / total[a]
                    for d in range(width):
                        out[i, h, d] = acc[a, d] * inverse
                    out[i, h, width] = peak[a] + np.log(total[a])


@njit(**_JIT)
def global_attention_query_grad(nodes, starts, counts, offsets, chunks, q, k, v, lse, g, delta, scale, out):
    """out[i, h] = scale * sum_j p_ij (<g_i, v_j> - delta_i) k_j per head h over the nodes j of i's graph,
    p_ij = exp(scale * <q_i, k_j> - lse_i) recomputed per key block. q, k, out: [N, H, K]; v, g: [N, H, D];
    lse, delta: [N, H]."""
    heads, keys, width = q.shape[1], q.shape[2], v.shape[2]
    block = GLOBAL_BLOCK
    for chunk in prange(chunks.shape[0] - 1):
        qb = np.empty((block, keys), dtype=out.dtype)
        gb = np.empty((block, width), dtype=out.dtype)
        kb = np.empty((block, keys), dtype=out.dtype)
        vb = np.empty((block, width), dtype=out.dtype)
        acc = np.empty((block, keys), dtype=out.dtype)
        for item in range(chunks[chunk], chunks[chunk + 1]):
            start, count, first = starts[item], counts[item], offsets[item]
            rows = min(block, count - first)
            for h in range(heads):
                for a in range(rows):
                    i = nodes[start + first + a]
                    for c in range(keys):
                        qb[a, c] = q[i, h, c] * scale
                    gb[a, :] = g[i, h, :]
                    acc[a, :] = 0
                for j0 in range(0, count, block):
                    cols = min(block, count - j0)
                    for b in range(cols):
                        j = nodes[start + j0 + b]
                        kb[b, :] = k[j, h, :]
                        vb[b, :] = v[j, h, :]
                    for a in range(rows):
                        i = nodes[start + first + a]
                        top, base = lse[i, h], delta[i, h]
                        for b in range(cols):
                            s = 0.0
                            for c in range(keys):
                                s += qb[a, c] * kb[b, c]
                            dp = 0.0
                            for d in range(width):
                                dp += gb[a, d] * vb[b, d]
                            ds = np.exp(s - top) * (dp - base)
                            for c in range(keys):
                                acc[a, c] += ds * kb[b, c]
                for a in range(rows):
                    i = nodes[start + first + a]
                    for c in range(keys):
                        out[i, h, c] = acc[a, c] * scale


@njit(**_JIT)
def global_attention_key_grad(nodes, starts, counts, offsets, chunks, q, k, v, lse, g, delta, scale, out):
    """out[j, h] = [scale * sum_i p_ij (<g_i, v_j> - delta_i) q_i, sum_i p_ij g_i] per head h over the nodes
    i of j's graph, p_ij = exp(scale * <q_i, k_j> - lse_i) recomputed per query block (the items are blocks
    of key nodes). q, k: [N, H, K]; v, g: [N, H, D]; lse, delta: [N, H]; out: [N, H, K + D]."""
    heads, keys, width = q.shape[1], q.shape[2], v.shape[2]
    block = GLOBAL_BLOCK
    for chunk in prange(chunks.shape[0] - 1):
        kb = np.empty((block, keys), dtype=out.dtype)
        vb = np.empty((block, width), dtype=out.dtype)
        qb = np.empty((block, keys), dtype=out.dtype)
        gb = np.empty((block, width), dtype=out.dtype)
        tops = np.empty(block, dtype=out.dtype)
        bases = np.empty(block, dtype=out.dtype)
        dk = np.empty((block, keys), dtype=out.dtype)
        dv = np.empty((block, width), dtype=out.dtype)
        for item in range(chunks[chunk], chunks[chunk + 1]):
            start, count, first = starts[item], counts[item], offsets[item]
            rows = min(block, count - first)
            for h in range(heads):
                for b in range(rows):
                    j = nodes[start + first + b]
                    for c in range(keys):
                        kb[b, c] = k[j, h, c] * scale
                    vb[b, :] = v[j, h, :]
                    dk[b, :] = 0
                    dv[b, :] = 0
                for i0 in range(0, count, block):
                    cols = min(block, count - i0)
                    for a in range(cols):
                        i = nodes[start + i0 + a]
                        qb[a, :] = q[i, h, :]
                        gb[a, :] = g[i, h, :]
                        tops[a] = lse[i, h]
                        bases[a] = delta[i, h]
                    for b in range(rows):
                        for a in range(cols):
                            s = 0.0
                            for c in range(keys):
                                s += qb[a, c] * kb[b, c]
                            dp = 0.0
                            for d in range(width):
                                dp += gb[a, d] * vb[b, d]
                            p = np.exp(s - tops[a])
                            ds = p * (dp - bases[a])
                            for d in range(width):
                                dv[b, d] += p * gb[a, d]
                            for c in range(keys):
                                dk[b, c] += ds * qb[a, c]
                for b in range(rows):
                    j = nodes[start + first + b]
                    for c in range(keys):
                        out[j, h, c] = dk[b, c] * scale
                    for d in range(width):
                        out[j, h, keys + d] = dv[b, d]


@njit(nogil=True, cache=True, boundscheck=False)
def _place_positions(ids, starts, perm):
    for e in range(ids.shape[0]):
        i = ids[e]
        perm[starts[i]] = e
        starts[i] += 1


def grouped_positions(ids: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """The positions of ``ids`` grouped by id, increasing within a group (``np.argsort(ids,
    kind="stable")``), by one counting pass: ``indptr`` [count + 1] holds the groups' bounds
    (the cumulative counts of the ids, each in 0..count-1)."""
    perm = np.empty(len(ids), dtype=np.int64)
    _place_positions(np.ascontiguousarray(ids, dtype=np.int64), indptr[:-1].astype(np.int64), perm)
    return perm


def row_chunks(indptr: np.ndarray, parts: int) -> np.ndarray:
    """Row bounds of ``parts`` chunks with about equal edge counts (a chunk may be empty)."""
    rows = len(indptr) - 1
    targets = np.linspace(0, int(indptr[-1]) if rows else 0, parts + 1)
    bounds = np.searchsorted(indptr, targets, side="left").clip(0, rows).astype(np.int64)
    bounds[0], bounds[-1] = 0, rows
    return np.maximum.accumulate(bounds)


@njit(**_JIT)
def _take_rows(x, index, out):
    for i in prange(index.shape[0]):
        out[i, :] = x[index[i], :]


def warm_up() -> None:
    """Load and launch a first kernel: Numba initialises its CPU target and threading layer at a
    process's first kernel, whichever it is (about 0.2 s), and the rest then load in milliseconds.
    ``_take_rows`` on one float32 row, the kernel that relabelling a graph's features runs first."""
    row = np.zeros((1, 1), dtype=np.float32)
    launch(_take_rows, row, np.zeros(1, dtype=np.int64), np.empty_like(row))


def _parallel_rows(x: np.ndarray, index: np.ndarray) -> np.ndarray | None:
    """``x`` as contiguous [rows, width] for a parallel row copy through ``index`` (after checking
    its bounds), or None when NumPy's own copy suits better (``serial_row_copy``)."""
    if serial_row_copy(x, index):
        return None
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(x)):
        raise IndexError("row index out of range")
    return np.ascontiguousarray(x).reshape(len(x), -1)


def take_rows(x: np.ndarray, index: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``np.take(x, index, axis=0)`` for a float array, copying rows in parallel (a relabelling of
    node or edge rows), into ``out`` when given (C-contiguous, the result's shape and dtype); other
    arrays and small ones go through ``np.take``."""
    flat = _parallel_rows(x, index)
    if flat is None:
        return np.take(x, index, axis=0, out=out)
    shape = (len(index),) + x.shape[1:]
    result = np.empty(shape, dtype=x.dtype) if out is None else out
    launch(_take_rows, flat, index, result.reshape(len(index), flat.shape[1]))
    return result


@njit(**_JIT)
def _put_rows(x, index, out):
    for i in prange(index.shape[0]):
        out[index[i], :] = x[i, :]


def put_rows(x: np.ndarray, index: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """An array ``out`` (new, or the one given: C-contiguous, of x's shape and dtype) with
    ``out[index[i]] = x[i]``, for ``index`` a permutation of x's rows (the inverse relabelling of
    ``take_rows``), copying rows in parallel."""
    if len(index) != len(x):
        raise IndexError("put_rows needs one index per row")
    result = np.empty_like(x) if out is None else out
    flat = _parallel_rows(x, index)
    if flat is None:
        result[index] = x
        return result
    launch(_put_rows, flat, index, result.reshape(flat.shape))
    return result
