"""Compiled CPU kernels of the NumPy backend's graph ops (Numba, parallel over row chunks).

Every kernel is pull-style over a CSR grouping: output row ``r`` reduces the edges
``indptr[r]:indptr[r + 1]``, reading input row ``columns[e]`` of each. Rows are split into
``chunks`` (row bounds, balanced by edge count) that run in parallel; each output row is written by
exactly one chunk, so there are no atomics and the result does not depend on the thread count.
Edges of a row are summed in CSR order, the order of SciPy's CSR product. Kernels are compiled on
first use and cached on disk.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np
from numba import njit, prange

_JIT = dict(parallel=True, nogil=True, cache=True, boundscheck=False)

# Numba's default OpenMP layer keeps its threads spinning for a while after each kernel, which takes
# the cores from the BLAS and NumPy work that follows (measured: +5 ms on a 25 MB elementwise pass).
# The workqueue layer's threads sleep instead; it must not be entered from two threads at once, so
# every parallel launch goes through ``launch`` (the kernels use all cores anyway).
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"
_LAUNCH = threading.Lock()


def launch(kernel, *args) -> None:
    """Run a parallel kernel, one launch at a time in this process."""
    with _LAUNCH:
        kernel(*args)


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
                    j = columns[e]
                    w = weights[e]
                    for k in range(width):
                        out[r, k] += w * x[j, k]
            else:
                for e in range(lo, hi):
                    j = columns[e]
                    for k in range(width):
                        out[r, k] += x[j, k]
            if mean and hi > lo:
                scale = 1.0 / (hi - lo)
                for k in range(width):
                    out[r, k] *= scale


SUM, MEAN, NORMALIZED = 0, 1, 2  # grouped_spmm modes


@njit(**_JIT)
def grouped_spmm(indptr, columns, weights, x, out, chunks, mode):
    """Per-group edge weights: out[r, g*C + c] = sum_e w[e, g] * x[columns[e], g*C + c], divided
    by the row's edge count (``MEAN``) or by the row's weight total of group g (``NORMALIZED``: a
    softmax when the weights are exponentiated scores); an empty row stays 0.
    x: [N, G*C], out: [M, G*C], weights: [E, G] in CSR order."""
    groups = weights.shape[1]
    width = x.shape[1] // groups
    for chunk in prange(chunks.shape[0] - 1):
        acc = np.empty(width, dtype=out.dtype)
        for r in range(chunks[chunk], chunks[chunk + 1]):
            lo, hi = indptr[r], indptr[r + 1]
            # group by group: the row's edges and their input rows stay in L1 across the groups, and
            # the inner loop runs over one group's contiguous features
            for g in range(groups):
                base = g * width
                acc[:] = 0
                for e in range(lo, hi):
                    j = columns[e]
                    w = weights[e, g]
                    for k in range(width):
                        acc[k] += w * x[j, base + k]
                if hi > lo and mode == MEAN:
                    acc /= hi - lo
                elif hi > lo and mode == NORMALIZED:
                    total = weights[lo, g]
                    for e in range(lo + 1, hi):
                        total += weights[e, g]
                    acc /= total
                out[r, base:base + width] = acc


@njit(**_JIT)
def shift_by_row_max(indptr, scores, shifted, chunks):
    """shifted[e, g] = scores[e, g] - max over e's row of scores[., g] (the softmax shift).
    scores, shifted: [E, G] in CSR order."""
    groups = scores.shape[1]
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


def take_rows(x: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``np.take(x, index, axis=0)`` for a float array, copying rows in parallel (a relabelling of
    node or edge rows); other arrays and small ones go through ``np.take``."""
    if x.dtype not in (np.float32, np.float64) or x.ndim == 0 or len(index) * max(1, x[:1].size) < 1 << 16:
        return np.take(x, index, axis=0)
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= len(x)):
        raise IndexError("row index out of range")
    flat = np.ascontiguousarray(x).reshape(len(x), -1)
    out = np.empty((len(index), flat.shape[1]), dtype=x.dtype)
    launch(_take_rows, flat, index, out)
    return out.reshape((len(index),) + x.shape[1:])
