"""The NumPy/SciPy backend: the reference semantics of mpdsl programs.

Values are NumPy arrays: a node / edge / graph value has its row axis first, a param value
none. ``global_attention`` and its backward passes run as compiled blocked kernels over each graph's
nodes (``cpu_kernels``: work items of 64 nodes of one graph, chunked by pair count, no n x n scores).
Graph ops over the edges (``gspmm`` sums and means, ``match_gspmm``, ``attention``) run as compiled pull-style
CSR kernels (``cpu_kernels``: parallel over row chunks, no atomics), or on small graphs as SciPy CSR
products in the same summation order (``SMALL_PRODUCT``; Numba is loaded only when a kernel first
runs); ``aggregate`` sums and means
are SciPy CSR products; max, min and softmax use sorted-segment ``reduceat``; no per-edge Python
loop and no ``np.add.at``. An empty group reduces to 0. Row-wise ops run in fused row groups
(``row_fusion``) block by block on large inputs. Arrays the backend allocates for intermediate values
are kept for the next runs (``BufferPool``).

Precision: float32 and float64 programs, computed in their dtype. Half-precision programs (f16,
bf16) are refused before anything runs (``Backend.check_dtype``): run them on the Triton backend.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
import scipy.special
from numpy.lib.array_utils import byte_bounds

from mpdsl.backends import (
    CPU_WORKERS,
    Backend,
    array_axis,
    batch_norm_statistics,
    batch_norm_training,
    c_programs,
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
from mpdsl.backends.row_fusion import RowGroup, fuse_rows, group_program, is_row_sum
from mpdsl.ir import Program, Value
from mpdsl.ops import COMPUTED_OPS, NUMPY_MATH, OPS, ArrayMath, MissingRule, choose, sequence_values
from mpdsl.types import Domain, Space, TensorType

if TYPE_CHECKING:
    from mpdsl.graph import Graph

WORKERS = CPU_WORKERS
_POOL = ThreadPoolExecutor(WORKERS, thread_name_prefix="mpdsl-numpy")  # sparse products release the GIL
PARALLEL_ROWS = 8192  # below this many rows a dense op runs in one piece
CONTRACT_PIECE_ROWS = 16384  # rows per partial sum of a parallel contract_rows
PARTIAL_SUM_BYTES = 16 << 20  # at most about this many bytes of partial sums per row group's row sums
# Below this many multiply-adds (edges x feature width) a g-SpMM or an attention runs as SciPy CSR
# products on this thread instead of the compiled parallel kernels: waking the kernels' worker
# threads costs more than the arithmetic of a small graph (a batch of 64 molecules: 0.2-0.5 ms per
# launch on 2 busy cores, against tens of microseconds of product), and a process that only runs
# small graphs never loads Numba (about 130 MB of resident memory).
SMALL_PRODUCT = 1 << 18
_NO_WEIGHTS = {np.dtype(t): np.empty(0, dtype=t) for t in (np.float32, np.float64)}
_NO_LSE = {np.dtype(t): np.empty((0, 0), dtype=t) for t in (np.float32, np.float64)}  # grouped_spmm: no log-sum-exp
RUN_DTYPES = {"f32": np.float32, "f64": np.float64}  # the float dtypes the backend computes in


class _BlasThreads:
    """The thread count of the OpenBLAS builds loaded in this process (NumPy's, SciPy's). While a
    program runs, BLAS is held to one thread and the backend splits rows over its own pool instead:
    idle OpenBLAS workers spin after each call and would steal the cores from the sparse kernels,
    and OpenBLAS's rounding depends on how it splits a product over its threads.

    The hold is process-wide and reference-counted under one lock: the first run to enter saves
    the counts in force (the user's setting) and sets one thread, runs entering meanwhile only count
    themselves in, and the last to leave restores the saved counts. So every run multiplies on one
    thread from its start to its end however runs overlap, and once none runs the user's setting is
    back. ``set_threads`` during a hold changes the counts the last run restores."""

    _SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                "scipy_openblas_set_num_threads", "openblas_set_num_threads64_")

    def __init__(self):
        self._libs: list | None = None  # (set, get) of each library, in the order of ``_paths``
        self._paths: list[str] = []
        self._lock = threading.Lock()
        self._holders = 0
        self._saved: list[int] = []
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork)

    def _load(self) -> list:
        if self._libs is None:
            self._libs, self._paths = [], []
            self._add_new()
        return self._libs

    def _add_new(self) -> list:
        """Add the OpenBLAS libraries loaded in the process and not known yet; return their (set, get)."""
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
        except OSError:
            paths = set()
        added = []
        for path in sorted(paths - set(self._paths)):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for name in self._SETTERS:
                getter = name.replace("set_num", "get_num")
                if hasattr(lib, name) and hasattr(lib, getter):
                    added.append((getattr(lib, name), getattr(lib, getter)))
                    self._paths.append(path)
                    break
        assert self._libs is not None
        self._libs.extend(added)
        return added

    def rescan(self) -> None:
        """Look for OpenBLAS libraries loaded since the last look (one was loaded since: SciPy's, by a
        compiled program): at the next hold, or during a hold at once, holding them to one thread
        too until it ends."""
        with self._lock:
            if self._holders == 0:
                self._libs = None
            elif self._libs is not None:
                for set_, get in self._add_new():
                    self._saved.append(get())
                    set_(1)

    def threads(self) -> list[int]:
        """The thread count in force in each OpenBLAS library (1 while a run holds them)."""
        with self._lock:
            return [get() for _, get in self._load()]

    def set_threads(self, threads: int) -> None:
        """Set every OpenBLAS library's thread count; during a hold, the count restored at its end."""
        with self._lock:
            libs = self._load()
            if self._holders:
                self._saved = [threads] * len(libs)
            else:
                for set_, _ in libs:
                    set_(threads)

    @contextlib.contextmanager
    def single_threaded(self):
        """Hold every OpenBLAS library to one thread for the duration (see the class)."""
        with self._lock:
            libs = self._load()
            if self._holders == 0:
                self._saved = [get() for _, get in libs]
                for set_, _ in libs:
                    set_(1)
            self._holders += 1
        try:
            yield
        finally:
            with self._lock:
                self._holders -= 1
                if self._holders == 0:
                    for (set_, _), count in zip(libs, self._saved):  # rescan extends this list
                        set_(count)

    def _after_fork(self) -> None:
        # a child forked during a hold has none of the holding threads: give it the user's setting back
        self._lock = threading.Lock()
        if self._holders:
            self._holders = 0
            for (set_, _), count in zip(self._libs or [], self._saved):
                set_(count)


BLAS = _BlasThreads()


MADV_NOHUGEPAGE = 15  # Linux's madvise advice


@functools.cache
def _madvise():
    """libc's ``madvise`` (None off Linux or where it cannot be loaded)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return function


def fresh_block(count: int, dtype) -> np.ndarray:
    """``np.empty(count, dtype)`` advised to 4 KB pages (``MADV_NOHUGEPAGE`` on its whole pages),
    against the transparent-huge-page advice NumPy gives arrays of 4 MB and more. Under the common
    ``defrag=madvise`` setting the kernel compacts memory synchronously at an advised block's first
    touch: on a long-running machine a fresh 50 MB block took 200-300 ms of system time, against
    about 10 ms in 4 KB pages, so a call that took a new block (the first; the second and third,
    whose outputs the caller still held; a batch of a new size) ran 2-3x slower than the next ones.
    Reused blocks lose the huge pages' fewer TLB misses: about 5% of a 200k-node forward once every
    block is warm."""
    block = np.empty(count, dtype=dtype)
    madvise = _madvise()
    if madvise is not None and block.nbytes >= 4 << 20:
        page = 4096
        start = -(-block.ctypes.data // page) * page
        stop = (block.ctypes.data + block.nbytes) // page * page
        if stop > start:
            madvise(start, stop - start, MADV_NOHUGEPAGE)  # advice only: a failure changes nothing else
    return block


class BufferPool:
    """Memory blocks of intermediate values kept for reuse. A fresh array of tens of megabytes costs
    its page faults (the kernel zeroes every page) each time it is first written, about as long as an
    elementwise pass over it; a reused one costs nothing. Blocks are kept by size class
    (``size_class``) and dtype and handed out as views of the shape asked for, so a node[8, 8] value
    reuses a node[64] block and a batch's value the block of the same value of a slightly larger batch.
    Only blocks the backend allocated itself come back here: within a run, those of values no later
    step reads (``recycle``); at its end, the rest (``give``). Those that an output or state update of
    the run refers to are *lent*: the pool keeps a reference to each and takes it back once nothing
    else refers to it any more (the caller, and any view or torch tensor made from it, dropped it), so
    a loop of training steps, whose outputs, residuals and gradients live until the next step, reuses
    them too. Holds at most ``max_bytes`` and ``per_shape`` free blocks of each size, follows at most
    ``max_lent`` lent blocks (the oldest is forgotten beyond that: the caller keeps it), and keeps only
    sizes taken or given during the last ``keep_runs`` runs (``give`` ends a run): runs on batches of
    changing sizes (a new size every batch) would otherwise fill the pool with blocks no later run
    takes, while a training loop on one graph (the same sizes every run) keeps all of them. A take
    with no free block of its class uses the smallest free one up to ``LARGER_BLOCK_FACTOR`` times
    larger. ``fresh_bytes`` counts the bytes it ever allocated anew."""

    def __init__(self, max_bytes: int = 1 << 30, per_shape: int = 16, max_lent: int = 64, keep_runs: int = 4):
        self.max_bytes = max_bytes
        self.per_shape = per_shape
        self.max_lent = max_lent
        self.keep_runs = keep_runs
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._lent: list[np.ndarray] = []
        self._used: dict[tuple, int] = {}  # size key -> the run that last took or gave one
        self._run = 0
        self._held = 0
        self.fresh_bytes = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # a copied or pickled backend starts with an empty pool
        return {"max_bytes": self.max_bytes, "per_shape": self.per_shape, "max_lent": self.max_lent,
                "keep_runs": self.keep_runs}

    def __setstate__(self, state: dict) -> None:
        type(self).__init__(self, **state)

    @property
    def held_bytes(self) -> int:
        """The bytes of the free blocks (lent ones that nothing refers to any more included)."""
        with self._lock:
            self._reclaim()
            return self._held

    def take(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised array of ``shape``: a view of the start of a free block of its size class
        (``size_class``) when there is one, else of a new block (``block_of`` gives the block)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        block_count = size_class(count)
        key = (block_count * dtype.itemsize, dtype.str)
        with self._lock:
            self._used[key] = self._run
            free = self._free.get(key)
            if not free and self._lent:
                self._reclaim()
                free = self._free.get(key)
            if not free:
                larger = self._larger_free(key)
                if larger is not None:
                    key, free = larger, self._free.get(larger)
                    self._used[key] = self._run
            if free:
                block = free.pop()
                self._held -= block.nbytes
                return block[:count].reshape(shape)
            self.fresh_bytes += key[0]
        return fresh_block(block_count, dtype)[:count].reshape(shape)

    def give(self, arrays) -> None:
        """Keep the blocks of ``arrays`` (a run's, at its end) for later runs, and drop the kept blocks
        of sizes that the last ``keep_runs`` runs did not use."""
        with self._lock:
            for array in arrays:
                block = block_of(array)
                self._used[(block.nbytes, block.dtype.str)] = self._run
                self._keep(block)
            self._run += 1
            stale = [key for key, run in self._used.items() if run <= self._run - 1 - self.keep_runs]
            for key in stale:
                del self._used[key]
                self._held -= sum(a.nbytes for a in self._free.pop(key, ()))

    def recycle(self, blocks: list[np.ndarray]) -> list[np.ndarray]:
        """Keep the blocks of ``blocks`` that nothing else refers to (for the rest of this run and later
        runs); return the others."""
        with self._lock:
            return self._keep_unreferenced(blocks)

    def lend(self, arrays) -> None:
        """Follow the blocks of ``arrays`` (handed to the caller inside a run's outputs) to take them
        back later."""
        with self._lock:
            self._lent.extend(block_of(a) for a in arrays)
            del self._lent[:max(0, len(self._lent) - self.max_lent)]

    @contextlib.contextmanager
    def lending(self):
        """``allocate(shape, dtype)`` for arrays made around a run and handed on (the inputs and
        outputs of a graph layout's relabelling): taken from the pool, and lent when the block ends."""
        taken: list[np.ndarray] = []

        def allocate(shape: tuple[int, ...], dtype) -> np.ndarray:
            taken.append(self.take(shape, dtype))
            return taken[-1]

        try:
            yield allocate
        finally:
            self.lend(taken)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._lent.clear()
            self._used.clear()
            self._held = 0

    def _keep(self, block: np.ndarray) -> None:
        """Keep ``block`` free if it is a block of a size class in use and there is room (lock held)."""
        key = (block.nbytes, block.dtype.str)
        if key not in self._used or block.ndim != 1 or block.size != size_class(block.size) \
                or not block.flags.c_contiguous:
            return
        free = self._free.setdefault(key, [])
        if len(free) < self.per_shape and self._held + block.nbytes <= self.max_bytes:
            free.append(block)
            self._held += block.nbytes

    def _larger_free(self, key: tuple[int, str]) -> tuple[int, str] | None:
        """The key of the smallest free block of ``key``'s dtype larger than its size and at most
        ``LARGER_BLOCK_FACTOR`` times it, or None (lock held). Batches whose sizes change from step to
        step fall into a few neighbouring size classes: without this, a step whose class the last
        runs did not use took a fresh block and paid its page faults (2.3 MB per 64-molecule step)."""
        nbytes, dtype = key
        fits = [k for k, blocks in self._free.items()
                if blocks and k[1] == dtype and nbytes < k[0] <= nbytes * LARGER_BLOCK_FACTOR]
        return min(fits) if fits else None

    def _reclaim(self) -> None:
        """Move the lent blocks that only this pool refers to back to the free ones (lock held)."""
        self._lent = self._keep_unreferenced(self._lent)

    def _keep_unreferenced(self, blocks: list[np.ndarray]) -> list[np.ndarray]:
        """Keep the blocks of the list ``blocks`` that only the list refers to; return the others (lock held)."""
        still_used = []
        for i in range(len(blocks)):
            # two references: the list's and getrefcount's argument; every view (a value, a torch
            # tensor over one) holds one more
            if sys.getrefcount(blocks[i]) <= 2:
                self._keep(blocks[i])
            else:
                still_used.append(blocks[i])
        return still_used


LARGER_BLOCK_FACTOR = 2  # a take may use a free block of up to this many times its size class


def size_class(count: int) -> int:
    """The element count of the pool's blocks for arrays of ``count`` elements: ``count`` rounded up to
    one of 8 steps per power of two (at most 12.5% more), so that the arrays of sampled batches, whose
    sizes differ a little from batch to batch, reuse each other's blocks."""
    if count <= 16:
        return count
    step = 1 << (count.bit_length() - 4)  # an eighth of the power of two below count
    return -(-count // step) * step


def block_of(array: np.ndarray) -> np.ndarray:
    """The array owning ``array``'s memory (``array`` itself when it owns it): what the pool keeps."""
    return array if array.base is None or not isinstance(array.base, np.ndarray) else array.base


def _kernels():
    """The compiled kernels module (imported on first use: Numba takes a moment to load)."""
    from mpdsl.backends import cpu_kernels
    return cpu_kernels


_WORKER = threading.local()  # set while a pool worker runs a row range


def row_parallel(rows: int, work, force: bool = False) -> None:
    """Run ``work(start, stop)`` over row blocks on the backend's pool (one block when small and
    not ``force``d). Called from a pool worker (a rule inside a row group's block) it runs inline:
    waiting on the pool from its own workers could deadlock."""
    if (rows < PARALLEL_ROWS and not force) or WORKERS == 1 or rows < WORKERS or getattr(_WORKER, "busy", False):
        work(0, rows)
        return
    bounds = np.linspace(0, rows, WORKERS + 1).astype(int)

    def run(i: int) -> None:
        _WORKER.busy = True
        try:
            work(bounds[i], bounds[i + 1])
        finally:
            _WORKER.busy = False

    list(_POOL.map(run, range(WORKERS)))


def _exp_in_place(a: np.ndarray) -> None:
    """a = exp(a), in row pieces on the pool's workers."""
    row_parallel(len(a), lambda lo, hi: np.exp(a[lo:hi], out=a[lo:hi]))


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
        flat = rows.reshape(len(rows), feature_width(rows.shape[1:]))
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
    column indices the nodes they read. The compiled kernels (``cpu_kernels``) split rows into
    chunks of equal edge count, so a skewed degree distribution still balances; index arrays are
    int32 where they fit."""

    def __init__(self, indptr: np.ndarray, perm: np.ndarray, read: np.ndarray, num_nodes: int):
        small = len(perm) < 2 ** 31 - 1 and num_nodes < 2 ** 31 - 1
        itype: type[np.signedinteger[Any]] = np.int32 if small else np.int64
        self.indptr = indptr.astype(itype)
        self.perm = perm
        self.in_edge_order = bool(np.array_equal(perm, np.arange(len(perm))))  # edges already sorted
        self.columns = read[perm].astype(itype)
        self.num_nodes = num_nodes

    @functools.cached_property
    def chunks(self) -> np.ndarray:
        """Row bounds of the kernels' parallel chunks (about equal edge counts)."""
        kernels = _kernels()
        return kernels.row_chunks(self.indptr, 4 * kernels.numba.get_num_threads())

    @property
    def num_edges(self) -> int:
        return len(self.columns)

    def _small(self, width: int) -> bool:
        """Whether a product over ``width`` features runs as SciPy CSR products (``SMALL_PRODUCT``)."""
        return self.num_edges * max(width, 1) < SMALL_PRODUCT

    def _matrix(self, data: np.ndarray, columns: np.ndarray, num_columns: int) -> sp.csr_matrix:
        return sp.csr_matrix((data, columns, self.indptr), shape=(self.num_nodes, num_columns))

    @functools.cached_property
    def _edge_positions(self) -> np.ndarray:
        return np.arange(self.num_edges, dtype=self.columns.dtype)

    def _small_grouped(self, x2: np.ndarray, weights: np.ndarray, out2: np.ndarray, mode: str) -> None:
        """``cpu_kernels.grouped_spmm`` as SciPy products: the weighted rows of every edge, summed
        per row in CSR order, then divided as the kernel divides (``mode``: sum, mean, normalized)."""
        groups = weights.shape[1]
        edges = self.num_edges
        width = x2.shape[1] // groups
        values = np.take(x2, self.columns, axis=0).reshape(edges, groups, width) * weights[:, :, None]
        rows = self._matrix(np.ones(edges, dtype=x2.dtype), self._edge_positions, edges)
        out2[...] = rows @ values.reshape(edges, groups * width)
        if mode == "sum":
            return
        counts = np.diff(self.indptr)
        divisor = (rows @ weights) if mode == "normalized" else counts.astype(x2.dtype)[:, None]
        divisor = np.where(counts[:, None] > 0, divisor, 1).astype(x2.dtype, copy=False)
        grouped = out2.reshape(self.num_nodes, groups, width)
        np.divide(grouped, divisor[:, :, None], out=grouped)

    def ordered(self, per_edge: np.ndarray) -> np.ndarray:
        """Per-edge values in CSR order (no copy when the edges are stored sorted)."""
        return per_edge if self.in_edge_order else np.take(per_edge, self.perm, axis=0)

    def spmm(self, x: np.ndarray, data: np.ndarray | None = None, mean: bool = False, empty=np.empty) -> np.ndarray:
        """out[i] = sum over row i's edges e of data[e] * x[column[e]] (divided by the row's edge
        count with ``mean``); ``data`` in CSR order, None for all ones, or [E, G] per-group weights
        that scale the G groups of x's leading feature axes they cover. ``empty(shape, dtype)``
        allocates the result."""
        out = empty((self.num_nodes,) + x.shape[1:], x.dtype)
        groups = 1 if data is None or data.ndim == 1 else feature_width(data.shape[1:])
        if out.size == 0 or groups == 0:
            out.fill(0)
            return out
        x2 = np.ascontiguousarray(x.reshape(x.shape[0], feature_width(x.shape[1:])))
        out2 = out.reshape(self.num_nodes, x2.shape[1])
        if self._small(x2.shape[1]):
            if groups == 1:
                weights = np.ones(self.num_edges, x.dtype) if data is None else \
                    np.ascontiguousarray(data.reshape(-1), dtype=x.dtype)
                out2[...] = self._matrix(weights, self.columns, x2.shape[0]) @ x2
                if mean:  # as the kernel: times the reciprocal of the count, in float64
                    counts = np.diff(self.indptr)
                    scale = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 1.0)
                    np.multiply(out2, scale[:, None], out=out2, casting="unsafe")
            else:
                assert data is not None  # groups > 1 only with per-group weights
                self._small_grouped(x2, np.ascontiguousarray(data.reshape(len(data), groups), dtype=x.dtype), out2,
                                    "mean" if mean else "sum")
            return out
        kernels = _kernels()
        if groups == 1:
            weights = _NO_WEIGHTS[x.dtype] if data is None else np.ascontiguousarray(data.reshape(-1), dtype=x.dtype)
            kernels.launch(kernels.spmm, self.indptr, self.columns, weights, x2, out2, self.chunks, mean)
        else:
            assert data is not None  # groups > 1 only with per-group weights
            weights = np.ascontiguousarray(data.reshape(len(data), groups), dtype=x.dtype)
            mode = kernels.MEAN if mean else kernels.SUM
            kernels.launch(kernels.grouped_spmm, self.indptr, self.columns, weights, x2, out2, self.chunks, mode,
                           _NO_LSE[x.dtype])
        return out

    @functools.cached_property
    def _positions(self) -> np.ndarray:
        """The edge id of each CSR position, in the index type of the columns."""
        return self.perm.astype(self.columns.dtype)

    def edge_sum(self, per_edge: np.ndarray, empty=np.empty) -> np.ndarray | None:
        """out[i] = the sum over row i's edges of per_edge[e] (edge order), in CSR order: the
        parallel kernel, with the bits of the segment sum's SciPy product; None on a small graph
        (SciPy's product is quicker there)."""
        width = feature_width(per_edge.shape[1:])
        if self._small(width):
            return None
        out = empty((self.num_nodes,) + per_edge.shape[1:], per_edge.dtype)
        if out.size:
            kernels = _kernels()
            kernels.launch(kernels.spmm, self.indptr, self._positions, _NO_WEIGHTS[per_edge.dtype],
                           np.ascontiguousarray(per_edge.reshape(len(per_edge), width)),
                           out.reshape(self.num_nodes, width), self.chunks, False)
        return out

    def attention(self, scores: np.ndarray, x: np.ndarray, empty=np.empty, lse: np.ndarray | None = None
                  ) -> np.ndarray:
        """out[i] = sum over row i's edges of softmax(scores)[e] * x[column[e]], the softmax taken
        over the row's edges per group (scores [E] or [E, G...] in CSR order, covering x's leading
        feature axes); 0 for a row without edges. ``empty(shape, dtype)`` allocates the result and
        the per-edge weights. ``lse`` (rows x scores' groups, of x's dtype): also written with the
        rows' log-sum-exp of the scores, as ``logsumexp`` computes it (the same bits), where the
        compiled kernels run (``attention_writes_lse``); left as it was elsewhere."""
        groups = feature_width(scores.shape[1:])
        out = empty((self.num_nodes,) + x.shape[1:], x.dtype)
        if out.size == 0 or groups == 0:
            out.fill(0)
            return out
        x2 = np.ascontiguousarray(x.reshape(x.shape[0], feature_width(x.shape[1:])))
        scores2 = np.ascontiguousarray(scores.reshape(len(scores), groups), dtype=x.dtype)
        weights = empty(scores2.shape, x.dtype)
        if not self.attention_writes_lse(x, scores):
            counts = np.diff(self.indptr)
            nonempty = counts > 0
            peak = np.zeros((self.num_nodes, groups), x.dtype)
            if self.num_edges:
                peak[nonempty] = np.maximum.reduceat(scores2, self.indptr[:-1][nonempty], axis=0)
            np.subtract(scores2, np.repeat(peak, counts, axis=0), out=weights)
            np.exp(weights, out=weights)
            self._small_grouped(x2, weights, out.reshape(self.num_nodes, x2.shape[1]), "normalized")
            return out
        kernels = _kernels()
        per_row = _NO_LSE[x.dtype] if lse is None else lse.reshape(self.num_nodes, groups)
        kernels.launch(kernels.shift_by_row_max, self.indptr, scores2, weights, self.chunks, per_row)
        _exp_in_place(weights)
        kernels.launch(kernels.grouped_spmm, self.indptr, self.columns, weights, x2,
                       out.reshape(self.num_nodes, x2.shape[1]), self.chunks, kernels.NORMALIZED, per_row)
        return out

    def attention_writes_lse(self, x: np.ndarray, scores: np.ndarray) -> bool:
        """Whether ``attention`` of these operands runs the compiled kernels (and so writes ``lse``):
        not on a small graph, where SciPy's products run it."""
        return not self._small(feature_width(x.shape[1:]) + feature_width(scores.shape[1:]))

    def match_spmm(self, column_values: np.ndarray, row_values: np.ndarray, x: np.ndarray | None,
                   empty=np.empty) -> np.ndarray:
        """out[i] = sum over row i's edges e of [column_values[column[e]] == row_values[i]] *
        x[column[e]] per feature element (1 in place of x when None); all operands [N, ...] of one
        shape. ``empty(shape, dtype)`` allocates the result."""
        out = empty((self.num_nodes,) + row_values.shape[1:], row_values.dtype)
        if out.size == 0:
            out.fill(0)
            return out
        kernels = _kernels()
        width = feature_width(row_values.shape[1:])

        def flat(a: np.ndarray) -> np.ndarray:
            return np.ascontiguousarray(a.reshape(a.shape[0], width))

        values = flat(x) if x is not None else np.empty((0, width), dtype=row_values.dtype)
        kernels.launch(kernels.match_spmm, self.indptr, self.columns, flat(column_values), flat(row_values), values,
                       out.reshape(self.num_nodes, width), self.chunks, x is not None)
        return out

    def unordered(self, per_edge: np.ndarray) -> np.ndarray:
        """Per-edge values in CSR order back in edge order (the inverse of ``ordered``)."""
        return per_edge if self.in_edge_order else _kernels().put_rows(per_edge, self.perm)

    def logsumexp(self, scores: np.ndarray, empty=np.empty) -> np.ndarray:
        """out[i] = log sum over row i's edges of exp(scores[e]) per score element, 0 for a row
        without edges (scores in CSR order). The exponentials are one vectorised pass."""
        out = empty((self.num_nodes,) + scores.shape[1:], scores.dtype)
        if out.size == 0:
            return out
        kernels = _kernels()
        scores2 = np.ascontiguousarray(scores.reshape(len(scores), feature_width(scores.shape[1:])))
        exps = empty(scores2.shape, scores2.dtype)
        kernels.launch(kernels.shift_by_row_max, self.indptr, scores2, exps, self.chunks, _NO_LSE[scores2.dtype])
        _exp_in_place(exps)
        kernels.launch(kernels.row_logsumexp, self.indptr, scores2, exps, out.reshape(self.num_nodes, -1), self.chunks)
        return out

    def softmax_weights(self, scores: np.ndarray, lse: np.ndarray, at_column: bool, empty=np.empty) -> np.ndarray:
        """exp(scores[e] - lse[n]) per edge in CSR order, [E, G] (G score elements; scores in edge
        order), with n the edge's column node (``at_column``) or its row: the softmax weights of
        scores normalised by the nodes at that end, recomputed from their log-sum-exp (one vectorised
        exponential)."""
        groups = feature_width(scores.shape[1:])
        scores2 = np.ascontiguousarray(scores.reshape(len(scores), groups))
        weights = empty(scores2.shape, scores2.dtype)
        kernels = _kernels()
        order = self.perm[:0] if self.in_edge_order else self.perm
        kernels.launch(kernels.shift_by_node, self.indptr, self.columns, order, scores2,
                       np.ascontiguousarray(lse.reshape(len(lse), groups), dtype=scores2.dtype), weights, self.chunks,
                       at_column)
        _exp_in_place(weights)
        return weights

    def attention_score_grad(self, scores: np.ndarray, lse: np.ndarray, x: np.ndarray, g: np.ndarray,
                             delta: np.ndarray, empty=np.empty) -> np.ndarray:
        """d s_e = exp(s_e - lse_r) * (<g_r, x[column_e]> - delta_r) for the edges e of each row r, in
        CSR order (scores in edge order; lse, g, delta per row, x per column node)."""
        out = empty(scores.shape, x.dtype)
        if out.size == 0:
            return out
        weights = self.softmax_weights(scores, lse, False, empty)
        x2 = np.ascontiguousarray(x.reshape(x.shape[0], feature_width(x.shape[1:])))
        kernels = _kernels()
        kernels.launch(kernels.attention_score_grad, self.indptr, self.columns, weights, x2,
                       np.ascontiguousarray(g.reshape(len(g), x2.shape[1])),
                       np.ascontiguousarray(delta.reshape(len(delta), weights.shape[1])),
                       out.reshape(len(out), weights.shape[1]), self.chunks)
        return out

    def attention_value_grad(self, scores: np.ndarray, lse: np.ndarray, g: np.ndarray, empty=np.empty) -> np.ndarray:
        """out_r = sum over row r's edges e of exp(s_e - lse[column_e]) * g[column_e] (scores in edge
        order; lse and g per column node): the weighted g-SpMM with the weights recomputed."""
        out = empty((self.num_nodes,) + g.shape[1:], g.dtype)
        if out.size == 0:
            return out
        if len(scores) == 0:
            out.fill(0)
            return out
        weights = self.softmax_weights(scores, lse, True, empty)
        g2 = np.ascontiguousarray(g.reshape(g.shape[0], feature_width(g.shape[1:])))
        kernels = _kernels()
        kernels.launch(kernels.grouped_spmm, self.indptr, self.columns, weights, g2,
                       out.reshape(self.num_nodes, g2.shape[1]), self.chunks, kernels.SUM, _NO_LSE[g2.dtype])
        return out

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


class GraphBlocks:
    """The work items of the global attention kernels over a batch's graphs (``cpu_kernels.graph_blocks``):
    blocks of consecutive nodes of one graph, the nodes listed by graph (``Graph.segments_by_graph``, so a
    graph's nodes need not be contiguous in the batch), and the items split into chunks of about equal
    pair counts for the workers."""

    def __init__(self, indptr: np.ndarray, perm: np.ndarray):
        kernels = _kernels()
        self.nodes = np.ascontiguousarray(perm, dtype=np.int64)
        self.starts, self.counts, self.offsets, pairs = graph_blocks(indptr, kernels.GLOBAL_BLOCK)
        cumulative = np.concatenate([[0], np.cumsum(pairs)]).astype(np.int64)
        self.chunks = kernels.row_chunks(cumulative, 4 * kernels.numba.get_num_threads())

    def launch(self, kernel, *args) -> None:
        kernels = _kernels()
        kernels.launch(kernel, self.nodes, self.starts, self.counts, self.offsets, self.chunks, *args)


@dataclass
class ExecContext:
    graph: Graph
    program: Program
    inputs: dict[str, np.ndarray]
    params: dict[str, np.ndarray]
    dims: dict[str, int]
    float_dtype: np.dtype
    training: bool
    seed: int | None
    pool: BufferPool
    state_updates: dict[str, np.ndarray] = field(default_factory=dict)  # param name -> new value (batch_norm)
    allocated: list[np.ndarray] = field(default_factory=list)  # taken from the pool by this run
    # results a rule computed on the way for a later op of the run, by that op's value id (it pops them)
    handed_on: dict[int, np.ndarray] = field(default_factory=dict)

    @functools.cached_property
    def rng(self) -> np.random.Generator:
        """The run's random generator (from ``seed``), made when a rule first draws."""
        return np.random.default_rng(self.seed)

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """An uninitialised array for an intermediate value of this run (from the backend's pool; its
        block goes back there once no value of the run refers to it, unless an output does)."""
        array = self.pool.take(shape, dtype)
        self.allocated.append(block_of(array))
        return array

    def recycle(self) -> None:
        """Return to the pool the blocks of this run that no live value refers to any more."""
        self.allocated = self.pool.recycle(self.allocated)

    def release(self, kept: list[np.ndarray]) -> None:
        """Return this run's arrays to the pool; those whose memory overlaps ``kept`` (the run's
        outputs and state updates: ``np.may_share_memory``'s bounds test, all pairs at once) are lent."""
        lent: list[np.ndarray] = []
        free: list[np.ndarray] = []
        bounds = np.array([byte_bounds(k) for k in kept if isinstance(k, np.ndarray) and k.nbytes])
        for a in self.allocated:
            low, high = byte_bounds(a)
            overlaps = len(bounds) and a.nbytes and np.any((bounds[:, 0] < high) & (low < bounds[:, 1]))
            (lent if overlaps else free).append(a)
        self._end(free, lent)

    def lend_all(self) -> None:
        """End the run with every array it took lent to the caller (its outputs are views of them all:
        no overlap test needed)."""
        self._end([], self.allocated)

    def _end(self, free: list[np.ndarray], lent: list[np.ndarray]) -> None:
        """End the run: ``free`` back to the pool, ``lent`` followed until the caller drops them."""
        self.pool.give(free)
        self.pool.lend(lent)
        self.allocated = []

    def edges(self, name: str) -> Graph:
        """The graph seen through the program's edge set ``name`` ("": the graph's own edges)."""
        return edge_graph(self.graph, self.program, name)

    def segments_by(self, by: str, edges: str = "") -> Segments:
        """The rows of the edge set ``edges`` grouped by dst or src, or the nodes by graph (cached on
        the graph, like ``pull``)."""
        g = self.edges(edges)

        builders = {"dst": lambda: Segments(g.dst, *g.csr_by_dst()), "src": lambda: Segments(g.src, *g.csr_by_src()),
                    "graph": lambda: Segments(g.batch, *g.segments_by_graph())}
        build = choose(builders, "aggregate", "by", by, "the numpy backend's segments")

        return g.cached(("numpy.segments", by), build)

    def graph_blocks(self) -> GraphBlocks:
        """The global attention kernels' work items over the graph's batch (cached on the graph)."""
        g = self.graph
        return g.cached("numpy.graph_blocks", lambda: GraphBlocks(*g.segments_by_graph()))

    def pull(self, by: str, edges: str = "") -> PullCSR:
        g = self.edges(edges)
        if by == "dst":
            return g.cached("numpy.pull_dst", lambda: PullCSR(*g.csr_by_dst(), g.src, g.num_dst_nodes))
        if by == "src":
            return g.cached("numpy.pull_src", lambda: PullCSR(*g.csr_by_src(), g.dst, g.num_src_nodes))
        raise MissingRule(f"the numpy backend has no pull CSR by {by!r}")

    def rows(self, space: Space) -> int:
        """The row count of values on ``space`` (a domain and edge set)."""
        return space_rows(self.graph, self.program, space)

    def concrete_shape(self, t: TensorType) -> tuple[int, ...]:
        return tuple(d.substitute(self.dims).value for d in t.shape)


def _numpy_dtype(ctx: ExecContext, v: Value) -> np.dtype:
    """The array dtype of ``v``'s values: the program's float dtype, or int64 for ids."""
    return ctx.float_dtype if v.type.is_float else np.dtype(np.int64)


def _gather_index(ctx: ExecContext, v: Value) -> np.ndarray:
    return gather_index(ctx.edges(v.attr["edges"]), v.attr["index"])


def _rows_of(ctx: ExecContext, *arrays: np.ndarray) -> list[np.ndarray]:
    """Node arrays as C-contiguous arrays of the program's float dtype (what the compiled kernels read)."""
    return [np.ascontiguousarray(a, dtype=ctx.float_dtype) for a in arrays]




class _Operand:
    """A stand-in for operand ``i`` while probing a ``compute`` rule (it supports no arithmetic)."""

    def __init__(self, i: int):
        self.i = i


class _Call:
    def __init__(self, name: str, args: tuple):
        self.name, self.args = name, args


class _Probe(ArrayMath):
    """An ``ArrayMath`` whose functions record their call instead of computing."""

    def __getattribute__(self, name: str):
        if name in ArrayMath.FUNCTIONS:
            return lambda *args: _Call(name, args)
        return super().__getattribute__(name)


@functools.cache
def single_ufunc(op: str, attrs: tuple) -> tuple[np.ufunc, tuple] | None:
    """(ufunc, arguments) when op's ``compute`` rule is one NumPy ufunc call on its operands and
    constants (``_Operand`` i marks operand i): then it can write into a buffer (``out=``) and split
    rows among workers. None for composite rules."""
    opdef = OPS[op]
    if opdef.compute is None:  # no elementwise math: not a ufunc
        return None
    try:
        call = opdef.compute(_Probe(), *(_Operand(i) for i in range(opdef.arity or 0)), **dict(attrs))
    except TypeError:  # arithmetic on an operand: a composite rule
        return None
    if not isinstance(call, _Call):
        return None
    ufunc = getattr(NUMPY_MATH, call.name)
    if not isinstance(ufunc, np.ufunc) or not all(isinstance(a, (_Operand, int, float)) for a in call.args):
        return None
    return ufunc, call.args


@functools.cache
def row_contraction_plan(spec: str):
    """A direct evaluation of ``contract_rows`` with ``spec`` when every operand has rows, for the
    forms gradient programs use (operands of one subscript multiplied elementwise first): one
    subscript left, a column sum (``a,a->a``, ``a->a``, ``a,a->``); two with no shared letter whose
    concatenation is the output, one BLAS product of the row-flattened operands (``a,b->ab``,
    ``a,b,b->ab``). None for other specs (then einsum runs): NumPy's optimizing einsum costs tens of
    microseconds per call to plan its path, more than the product on a small batch."""
    inputs, out = (part.strip() for part in spec.split("->"))
    terms = [term.strip() for term in inputs.split(",")]
    if any(len(set(t)) != len(t) for t in terms + [out]):
        return None
    distinct = list(dict.fromkeys(terms))
    members = [[i for i, t in enumerate(terms) if t == d] for d in distinct]

    def products(xs) -> list:
        result = []
        for group in members:
            value = xs[group[0]]
            for i in group[1:]:
                value = np.multiply(value, xs[i])
            result.append(value)
        return result

    if len(distinct) == 1 and set(out) <= set(distinct[0]):
        term = distinct[0]
        if out == term:
            return lambda xs: column_sum(products(xs)[0])
        return lambda xs: np.einsum(f"{term}->{out}", products(xs)[0].sum(axis=0))
    if len(distinct) == 2 and not set(distinct[0]) & set(distinct[1]) and out in (distinct[0] + distinct[1],
                                                                                   distinct[1] + distinct[0]):
        first, second = (0, 1) if out == distinct[0] + distinct[1] else (1, 0)

        def outer(xs):
            values = products(xs)
            a, b = values[first], values[second]
            rows = a.shape[0]
            product = a.reshape(rows, feature_width(a.shape[1:])).T @ b.reshape(rows, feature_width(b.shape[1:]))
            return product.reshape(a.shape[1:] + b.shape[1:])

        return outer
    return None


def _add_partial(pieces: list, piece: int, part: np.ndarray, dtype) -> None:
    """Add a block's partial sum ``part`` to ``pieces[piece]`` (a copy of it when the piece has none)."""
    if pieces[piece] is None:
        pieces[piece] = np.array(part, dtype=dtype)
    else:
        pieces[piece] += part


def column_sum(x: np.ndarray) -> np.ndarray:
    """x summed over its rows. A float matrix sums as one BLAS product with a vector of ones: several
    times faster than NumPy's reduction down the rows, which adds one row at a time."""
    if x.ndim < 2 or x.dtype not in (np.float32, np.float64) or not x.flags.c_contiguous or not len(x):
        return x.sum(axis=0)
    return (np.ones(len(x), dtype=x.dtype) @ x.reshape(len(x), -1)).reshape(x.shape[1:])


def _ufunc_args(template: tuple, xs) -> list:
    return [xs[a.i] if isinstance(a, _Operand) else a for a in template]


def _per_node(table, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The sum per node (``table.nonloop_count`` nodes) of ``values`` at the nodes ``rows`` (a SciPy
    incidence product, not an unbuffered scatter)."""
    nodes = len(table.nonloop_count)
    flat = values.reshape(len(values), feature_width(values.shape[1:]))
    incidence = sp.csr_matrix((np.ones(len(rows), dtype=values.dtype), (rows, np.arange(len(rows)))),
                              shape=(nodes, len(rows)))
    return np.asarray(incidence @ flat).reshape((nodes,) + values.shape[1:])


def _loop_divisor(table, like: np.ndarray) -> np.ndarray:
    """max(non-loop in-degree, 1) per node, shaped to divide per-node rows like ``like``."""
    return np.maximum(table.nonloop_count, 1).astype(like.dtype).reshape((-1,) + (1,) * (like.ndim - 1))


def carry_values(table, x: np.ndarray, fill: str, value: float, empty=np.empty) -> np.ndarray:
    """``carry``: the rows of x at each derived edge's origin; the loops the set adds filled with
    ``value`` or with the mean / sum of x over the node's non-loop in-edges (0 for none)."""
    out = empty((len(table.origin),) + x.shape[1:], x.dtype)
    out[table.kept] = np.take(x, table.origin[table.kept], axis=0)
    if fill == "constant":
        out[table.added] = value
        return out
    totals = _per_node(table, table.nonloop_dst, np.take(x, table.nonloop, axis=0))
    if fill == "mean":
        totals /= _loop_divisor(table, totals)
    out[table.added] = np.take(totals, table.added_nodes, axis=0)
    return out


def carry_transpose(table, g: np.ndarray, fill: str, zeros=np.zeros) -> np.ndarray:
    """``carry_grad``, the transpose of ``carry_values``: g's row of each derived edge back at its
    origin, and with a mean / sum fill each added loop's row spread over the node's non-loop in-edges."""
    out = zeros((table.base_edges,) + g.shape[1:], g.dtype)
    out[table.origin[table.kept]] = np.take(g, table.kept, axis=0)
    if fill == "constant" or not len(table.added):
        return out
    loops = np.zeros((len(table.nonloop_count),) + g.shape[1:], g.dtype)
    loops[table.added_nodes] = np.take(g, table.added, axis=0)
    if fill == "mean":
        loops /= _loop_divisor(table, loops)
    out[table.nonloop] += np.take(loops, table.nonloop_dst, axis=0)
    return out


def _segment_mean(seg: Segments, x: np.ndarray) -> np.ndarray:
    return seg.sum(x) / _segment_sizes(seg, x)


def _segment_sizes(seg: Segments, x: np.ndarray) -> np.ndarray:
    """max(count, 1) per segment, shaped to divide a per-segment array like ``x``'s rows."""
    return np.maximum(seg.counts, 1).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def _segment_std(seg: Segments, x: np.ndarray) -> np.ndarray:
    """Population standard deviation, two-pass (deviations from the group mean) for accuracy."""
    centred = x - seg.broadcast(_segment_mean(seg, x))
    return np.sqrt(seg.sum(centred * centred) / _segment_sizes(seg, x))


# aggregate's reductions: (segments, edge or node rows) -> one row per segment (0 for an empty one)
_SEGMENT_REDUCTIONS = {
    "sum": lambda seg, x: seg.sum(x),
    "mean": _segment_mean,
    "max": lambda seg, x: seg.extreme(x, np.maximum),
    "min": lambda seg, x: seg.extreme(x, np.minimum),
    "std": _segment_std,
}
_GSPMM_KINDS = {"sum": "sum", "mean": "mean", "max": np.maximum, "min": np.minimum}
_AXIS_REDUCTIONS = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min}


@dataclass
class _CompiledEntry:
    """A program's state in the compiled-program tier: its C function or the reason it has none."""

    program: Program
    compiled: c_programs.CompiledProgram | None = None
    reason: str | None = None


@register_backend("numpy")
class NumpyBackend(Backend):
    """Interprets the IR op by op with NumPy and SciPy sparse products (the reference).

    After a run, ``last_state_updates`` maps parameter names to their new values: the running
    statistics that the run's batch_norm ops in training form updated (empty otherwise); the caller
    (``CompiledModel.run``, the torch module) stores them."""

    dtypes = tuple(RUN_DTYPES)

    def __init__(self, fuse_min_rows: int = PARALLEL_ROWS, block_bytes: int = 512 << 10,
                 block_rows: int | None = None, pool_bytes: int = 1 << 30, compiled_programs: bool | None = None):
        """``fuse_min_rows``: row groups (``row_fusion``) run block by block from this many rows on,
        op by op below; a block holds ``block_rows`` rows, or by default as many as fit the widest
        member's rows in ``block_bytes`` (at most PARALLEL_ROWS - 1: larger blocks measured no faster;
        at least 256: each op of each block costs a few microseconds of Python and BLAS set-up).
        ``pool_bytes``: the most memory kept between runs for intermediate values (``BufferPool``;
        ``pool.clear()`` frees it). ``compiled_programs``: run programs on small graphs as one C
        function (``c_programs``); None: unless the environment sets ``MPDSL_C_PROGRAMS=0``."""
        self.fuse_min_rows = fuse_min_rows
        self.block_bytes = block_bytes
        self.block_rows = block_rows
        self.pool = BufferPool(pool_bytes)
        self._schedules: dict[int, tuple[Program, list, list[list[int]]]] = {}
        self._compiled: dict[tuple, _CompiledEntry] = {}
        self._group_programs: dict[int, tuple[RowGroup, Program, tuple[Value, ...]]] = {}
        self.compiled_programs = compiled_programs
        self.last_state_updates: dict[str, np.ndarray] = {}

    def warm_up(self) -> None:
        """Import the compiled kernels and load one (``cpu_kernels.warm_up``)."""
        _kernels().warm_up()

    def __getstate__(self) -> dict:  # compiled C functions stay with the process that loaded them
        return {**self.__dict__, "_compiled": {}}

    def schedule(self, program: Program) -> list:
        """The program's execution schedule (``row_fusion.fuse_rows``), cached per program."""
        return self._planned(program)[1]

    def _planned(self, program: Program) -> tuple[Program, list, list[list[int]]]:
        """(program, schedule, dying): ``dying[i]`` lists the ids of the values that no step after
        step ``i`` of the schedule reads and that are not outputs (freed after step ``i``)."""
        cached = self._schedules.get(id(program))
        if cached is None or cached[0] is not program:
            schedule = fuse_rows(program)
            last: dict[int, int] = {}
            for i, step in enumerate(schedule):
                members = step.members if isinstance(step, RowGroup) else (step,)
                for v in members:
                    last.setdefault(id(v), i)
                    for o in v.operands:
                        last[id(o)] = i
            for _, v in program.outputs:
                last.pop(id(v), None)
            dying: list[list[int]] = [[] for _ in schedule]
            for key, i in last.items():
                dying[i].append(key)
            cached = self._schedules[id(program)] = (program, schedule, dying)
        return cached

    def _run_group(self, ctx: ExecContext, group: RowGroup, env: dict) -> None:
        """Run a row group block by block over the pool's workers (op by op when small). Exports
        are written straight into their full arrays; each worker keeps one block-sized buffer per
        other member, so ops with an ``out=`` form (``_compute_into``) allocate nothing per block.
        A row sum member adds each block's partial sum into the partial of its piece (a run of
        whole blocks, one worker's); the pieces' partials are added in piece order, so the result
        does not depend on the worker count."""
        rows = ctx.rows(group.space)
        if rows < self.fuse_min_rows:
            for v in group.members:
                env[id(v)] = self.rules[v.op](self, ctx, v, *[env[id(o)] for o in v.operands])
            return

        def row_bytes(v: Value) -> int:  # of a row of v (of the whole of a param value)
            return ctx.float_dtype.itemsize * max(1, feature_width(ctx.concrete_shape(v.type)))

        widest = max(row_bytes(o) for v in group.members for o in (v.operands if is_row_sum(v) else (v,))
                     if o.type.space == group.space)
        block = self.block_rows or int(min(PARALLEL_ROWS - 1, max(256, self.block_bytes // widest)))
        sums = [v for v in group.members if is_row_sum(v)]
        blocks = -(-rows // block)
        sum_bytes = sum(row_bytes(v) for v in sums)
        piece_blocks = max(1, -(-blocks * sum_bytes // PARTIAL_SUM_BYTES))
        piece_rows = piece_blocks * block
        partials: dict[int, list] = {id(v): [None] * -(-blocks // piece_blocks) for v in sums}
        for v in group.exports:
            if not is_row_sum(v):
                env[id(v)] = ctx.empty((rows,) + ctx.concrete_shape(v.type), _numpy_dtype(ctx, v))
        compiled = self._compiled_group(ctx, group)
        if compiled is not None:
            run_range = self._compiled_blocks(ctx, group, env, *compiled, block, piece_rows, partials)
        else:
            run_range = self._numpy_blocks(ctx, group, env, block, piece_rows, partials)
        pieces = -(-rows // piece_rows)
        row_parallel(pieces, lambda lo, hi: run_range(lo * piece_rows, min(hi * piece_rows, rows)), force=True)
        for v in sums:
            total = np.zeros(ctx.concrete_shape(v.type), dtype=ctx.float_dtype)
            for part in partials[id(v)]:
                if part is not None:  # None: a sum no value reads, which the compiled blocks skip
                    total += part
            env[id(v)] = total

    def _numpy_blocks(self, ctx: ExecContext, group: RowGroup, env: dict, block: int, piece_rows: int,
                      partials: dict[int, list]):
        """``run_range(lo, hi)`` running the group's blocks in rows lo:hi member by member, by the
        members' rules (``_compute_into`` where an op has an ``out=`` form)."""
        member_ids = {id(v) for v in group.members}
        exported = {id(v) for v in group.exports}

        def run_range(lo: int, hi: int) -> None:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # as the run's: per thread
                blocks(lo, hi)

        def blocks(lo: int, hi: int) -> None:
            scratch: dict[int, np.ndarray] = {}
            for start in range(lo, hi, block):
                stop = min(start + block, hi)
                local: dict[int, np.ndarray] = {}
                for v in group.members:
                    args = []
                    for o in v.operands:
                        if id(o) in member_ids:
                            args.append(local[id(o)])
                        elif o.type.space == group.space:
                            args.append(env[id(o)][start:stop])
                        else:
                            args.append(env[id(o)])
                    if id(v) in partials:
                        _add_partial(partials[id(v)], start // piece_rows, self.rules[v.op](self, ctx, v, *args),
                                     ctx.float_dtype)
                        continue
                    if id(v) in exported:
                        target = env[id(v)][start:stop]
                    else:
                        if id(v) not in scratch:
                            scratch[id(v)] = np.empty((block,) + ctx.concrete_shape(v.type), dtype=_numpy_dtype(ctx, v))
                        target = scratch[id(v)][:stop - start]
                    if self._compute_into(ctx, v, args, target, start, stop):
                        local[id(v)] = target
                    else:
                        result = self.rules[v.op](self, ctx, v, *args)
                        if id(v) in exported:
                            target[...] = result
                        local[id(v)] = result

        return run_range

    def _compiled_group(self, ctx: ExecContext, group: RowGroup
                        ) -> tuple[c_programs.CompiledProgram, tuple[Value, ...]] | None:
        """The C function a row group's blocks run as (``row_fusion.group_program`` compiled by
        ``c_programs``) and the values it reads, or None to run the blocks member by member: the
        tier is off or a member has no C rule. Compiled at the group's first blocked run (once per
        machine: the library is cached), so that all its blocked runs take one path."""
        if not self._compiling():
            return None
        known = self._group_programs.get(id(group))
        if known is None or known[0] is not group:
            if len(self._group_programs) >= 256:
                self._group_programs.clear()
            known = self._group_programs[id(group)] = (group, *group_program(ctx.program, group))
        _, program, outside = known
        compiled = self._compile(self._compiled_entry(program, ctx.dims, ctx.float_dtype, ctx.training), ctx)
        return None if compiled is None else (compiled, outside)

    def _compiled_blocks(self, ctx: ExecContext, group: RowGroup, env: dict, compiled: c_programs.CompiledProgram,
                         outside: tuple[Value, ...], block: int, piece_rows: int, partials: dict[int, list]):
        """``run_range(lo, hi)`` running the group's blocks in rows lo:hi as one call of its C
        function each (the GIL released for the whole block), on row slices of the arrays it reads
        and writes; a row sum's block goes to a buffer of the worker's, added to its piece's partial."""
        by_name = {f"a{k}": o for k, o in enumerate(outside)}
        keep: list[np.ndarray] = []  # alive until the group ends
        bases: list[tuple[int, int]] = []  # per external: (address, bytes per row of the group; 0: read whole)
        for ext in compiled.externals:
            if ext.kind == "index":
                array = compiled.index_array(ctx.graph, ext)
                sliced = Space(Domain.EDGE, ext.key[0]) == group.space
            else:
                o = by_name[ext.key[0]]
                array = np.ascontiguousarray(env[id(o)], dtype=ctx.float_dtype)
                sliced = o.type.space == group.space  # others (a gather's node rows, params) read whole
            keep.append(array)
            bases.append((array.ctypes.data, array.strides[0] if sliced else 0))
        outputs: list[tuple[int, int] | None] = []  # per export: (address, bytes per row); None: a row sum
        for v in group.exports:
            if is_row_sum(v):
                outputs.append(None)
            else:
                array = env[id(v)]
                outputs.append((array.ctypes.data, array.strides[0]))
        fixed_rows = [None if s == group.space else ctx.rows(s) for s in compiled.spaces]
        sums = [(k, v) for k, v in enumerate(group.exports) if is_row_sum(v)]

        def run_range(lo: int, hi: int) -> None:
            buffers = {k: np.empty(ctx.concrete_shape(v.type), dtype=ctx.float_dtype) for k, v in sums}
            sum_addresses = {k: b.ctypes.data for k, b in buffers.items()}
            for start in range(lo, hi, block):
                stop = min(start + block, hi)
                compiled.run_rows([address + start * stride for address, stride in bases],
                                  [stop - start if n is None else n for n in fixed_rows],
                                  [sum_addresses[k] if out is None else out[0] + start * out[1]
                                   for k, out in enumerate(outputs)])
                for k, v in sums:
                    _add_partial(partials[id(v)], start // piece_rows, buffers[k], ctx.float_dtype)

        run_range.keep = keep  # type: ignore[attr-defined]
        return run_range

    def _compute_into(self, ctx: ExecContext, v: Value, args: list, target: np.ndarray, start: int, stop: int) -> bool:
        """Compute rows start:stop of a row-wise ``v`` into ``target`` (the same values as its rule)
        if the op has an ``out=`` form; False otherwise (the caller runs the rule)."""
        if target.dtype != ctx.float_dtype:
            return False
        if v.op == "gather":
            if args[0].dtype != target.dtype:
                return False
            np.take(args[0], _gather_index(ctx, v)[start:stop], axis=0, out=target)
            return True
        fast = single_ufunc(v.op, v.attrs)
        if fast is not None:
            xs = [expand_operand(x, o.type, v.type) for x, o in zip(args, v.operands)]
            if np.broadcast_shapes(*(x.shape for x in xs)) != target.shape:
                return False
            ufunc, template = fast
            ufunc(*_ufunc_args(template, xs), out=target)
            return True
        if v.op == "leaky_relu" and args[0].shape == target.shape and args[0].dtype == target.dtype:
            slope = target.dtype.type(v.attr["slope"])
            if 0 <= slope <= 1:  # the rule's max(x, x * slope), without its temporary
                np.multiply(args[0], slope, out=target)
                np.maximum(args[0], target, out=target)
                return True
        if v.op == "matmul" and v.operands[1].type.domain is Domain.PARAM and target.flags.c_contiguous \
                and args[0].dtype == args[1].dtype == target.dtype \
                and target.shape == args[0].shape[:-1] + args[1].shape[1:]:
            a, b = args  # as the rule: the last axis of a against the first of b, the others flattened
            k = a.shape[-1]
            np.matmul(a.reshape(-1, k), b.reshape(k, -1), out=target.reshape(-1, feature_width(b.shape[1:])))
            return True
        return False

    def compiled_program(self, program: Program, ctx: ExecContext) -> c_programs.CompiledProgram | None:
        """The C function ``program`` runs as in the run ``ctx`` (``c_programs``), or None to run it
        op by op: the tier is off, a row space of the run is not small, or the program has no C
        translation (the reason is kept in its entry; ``compiled_program_reason`` for plans). A program
        is compiled at its first run on a small graph (once per machine: the library is cached), so
        that all its runs there take one path and give the same bits."""
        if not self._compiling():
            return None
        entry = self._compiled_entry(program, ctx.dims, ctx.float_dtype, ctx.training)
        if any(ctx.rows(space) >= c_programs.SMALL_ROWS for space in program.row_spaces):
            return None
        return self._compile(entry, ctx)

    @staticmethod
    def _compile(entry: _CompiledEntry, ctx: ExecContext) -> c_programs.CompiledProgram | None:
        """The entry's C function, compiled at its first use in the run ``ctx`` (None, with the reason
        kept in the entry, when it has no C translation)."""
        if entry.compiled is None and entry.reason is None:
            try:
                entry.compiled = c_programs.compile_program(entry.program, dict(ctx.dims), ctx.float_dtype,
                                                            ctx.training)
            except c_programs.Unsupported as e:
                entry.reason = str(e)
            BLAS.rescan()  # the compiled programs multiply through SciPy's BLAS, which may be new here
        return entry.compiled

    def compiled_program_reason(self, program: Program, dims: dict[str, int], training: bool = False) -> str:
        """Whether ``program`` runs as one C function on small graphs, and if not why (for plans)."""
        if not self._compiling():
            return "off (MPDSL_C_PROGRAMS=0)"
        try:
            c_programs.translate(program, dict(dims), training)
        except c_programs.Unsupported as e:
            return f"runs op by op: {e}"
        return f"runs as one C function when every row space has fewer than {c_programs.SMALL_ROWS} rows"

    def compiled_group_reason(self, program: Program, group: RowGroup, dims: dict[str, int],
                              training: bool = False) -> str:
        """How a row group of ``program`` runs its blocks, and if not compiled why (for plans)."""
        if not self._compiling():
            return "member by member (MPDSL_C_PROGRAMS=0)"
        try:
            c_programs.translate(group_program(program, group)[0], dict(dims), training)
        except c_programs.Unsupported as e:
            return f"member by member: {e}"
        return "each block one C function"

    def _compiling(self) -> bool:
        """Whether the compiled-program tier is on (``compiled_programs``, else the environment)."""
        return c_programs.enabled() if self.compiled_programs is None else self.compiled_programs

    def _compiled_entry(self, program: Program, dims, float_dtype, training: bool) -> _CompiledEntry:
        key = (id(program), np.dtype(float_dtype), tuple(sorted(dims.items())), training)
        entry = self._compiled.get(key)
        if entry is None or entry.program is not program:
            if len(self._compiled) >= 256:
                self._compiled.clear()
            entry = self._compiled[key] = _CompiledEntry(program)
        return entry

    def run(self, program: Program, graph, inputs: dict, params: dict, dims: dict[str, int],
            training: bool = False, seed: int | None = None) -> dict[str, np.ndarray]:
        self.check_dtype(program.float_dtype)
        float_dtype = np.dtype(RUN_DTYPES[program.float_dtype])
        ctx = ExecContext(graph, program, inputs, params, dims, float_dtype, training,
                          seed, self.pool)
        compiled = self.compiled_program(program, ctx)
        if compiled is not None:
            start = time.perf_counter()
            with BLAS.single_threaded():
                outputs = compiled.run(ctx, lambda v: self.rules[v.op](self, ctx, v))
            ctx.lend_all()  # the outputs' one block
            self.last_op_seconds = {"compiled program": time.perf_counter() - start}
            self.last_state_updates = {}
            return outputs
        env: dict[int, np.ndarray] = {}
        timings: dict[str, float] = {}
        _, schedule, dying = self._planned(program)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"), BLAS.single_threaded():
            for step, dead in zip(schedule, dying):
                start = time.perf_counter()
                if isinstance(step, RowGroup):
                    self._run_group(ctx, step, env)
                    key = f"fused {step.space} ops"
                else:
                    env[id(step)] = self.rules[step.op](self, ctx, step, *[env[id(o)] for o in step.operands])
                    key = step.op
                if dead:
                    for value_id in dead:
                        env.pop(value_id, None)
                    ctx.recycle()
                timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
        outputs = {name: env[id(v)] for name, v in program.outputs}
        ctx.release(list(outputs.values()) + list(ctx.state_updates.values()))
        self.last_op_seconds = timings
        self.last_state_updates = ctx.state_updates
        return outputs

    # ---- sources -------------------------------------------------------------------------

    @rule("const")
    def _const(self, ctx, v):
        return np.asarray(v.attr["value"], dtype=ctx.float_dtype)

    @rule("degree")
    def _degree(self, ctx, v):
        g = ctx.edges(v.attr["edges"])
        counts = g.in_degree() if v.attr["dir"] == "in" else g.out_degree()
        return counts.astype(ctx.float_dtype)

    @rule("arange", "linspace")
    def _sequence(self, ctx, v):
        (count,) = ctx.concrete_shape(v.type)
        return sequence_values(v.op, v.attr, np.arange(count, dtype=np.float64), np.where).astype(ctx.float_dtype)

    # ---- elementwise ---------------------------------------------------------------------

    @rule(*COMPUTED_OPS)
    def _elementwise(self, ctx, v, *xs):
        """An elementwise op: its ``compute`` rule (mpdsl.ops) on the broadcast operands; a one-ufunc
        rule over many rows writes into a pooled buffer, its rows split among the workers."""
        xs = [expand_operand(x, o.type, v.type) for x, o in zip(xs, v.operands)]
        fast = single_ufunc(v.op, v.attrs)
        if fast is None or v.type.domain is Domain.PARAM or max(x.shape[0] for x in xs) < PARALLEL_ROWS:
            return np.asarray(OPS[v.op].compute(NUMPY_MATH, *xs, **v.attr)).astype(ctx.float_dtype, copy=False)
        ufunc, template = fast
        out = ctx.empty(np.broadcast_shapes(*(x.shape for x in xs)), ctx.float_dtype)

        def rows(x, lo, hi):
            return x[lo:hi] if not isinstance(x, np.ndarray) or x.shape[0] != 1 else x

        row_parallel(out.shape[0], lambda lo, hi: ufunc(*(rows(a, lo, hi) if isinstance(a, np.ndarray) else a
                                                          for a in _ufunc_args(template, xs)), out=out[lo:hi]))
        return out

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

    # ---- dense algebra -------------------------------------------------------------------

    @rule("matmul")
    def _matmul(self, ctx, v, a, b):
        ta, tb = (o.type for o in v.operands)
        k = a.shape[-1]
        if tb.domain is Domain.PARAM:
            a2 = a.reshape(feature_width(a.shape[:-1]), k)
            b2 = b.reshape(k, feature_width(b.shape[1:]))
            out = ctx.empty((a2.shape[0], b2.shape[1]), np.result_type(a, b))
            row_parallel(a2.shape[0], lambda lo, hi: np.matmul(a2[lo:hi], b2, out=out[lo:hi]))
            return out.reshape(a.shape[:-1] + b.shape[1:])
        rows = b.shape[0]
        a_feat = a.shape[:-1] if ta.domain is Domain.PARAM else a.shape[1:-1]
        a3 = a.reshape((1 if ta.domain is Domain.PARAM else rows, feature_width(a_feat), k))
        b3 = b.reshape(rows, k, feature_width(b.shape[2:]))
        return np.matmul(a3, b3).reshape((rows,) + a_feat + b.shape[2:])

    @rule("einsum")
    def _einsum(self, ctx, v, *xs):
        inputs, out = v.attr["spec"].split("->")
        terms = [("..." if o.type.domain is not Domain.PARAM else "") + term
                 for term, o in zip(inputs.split(","), v.operands)]
        row = "..." if v.type.domain is not Domain.PARAM else ""
        return np.einsum(f"{','.join(terms)}->{row}{out}", *xs, optimize=len(xs) > 2)

    @rule("reduce")
    def _reduce(self, ctx, v, x):
        axis = array_axis(v, v.attr["axis"])
        if x.shape[axis] == 0:  # an empty axis reduces to 0, as an empty group does
            return np.zeros(x.shape[:axis] + x.shape[axis + 1:], dtype=x.dtype)
        fn = choose(_AXIS_REDUCTIONS, v.op, "reduce", v.attr["reduce"], "the numpy backend's axis reductions")
        return fn(x, axis=axis)

    @rule("axis_softmax")
    def _axis_softmax(self, ctx, v, x):
        if x.size == 0:
            return np.zeros_like(x)
        return scipy.special.softmax(x, axis=array_axis(v, v.attr["axis"])).astype(x.dtype, copy=False)

    @rule("concat")
    def _concat(self, ctx, v, *xs):
        return np.concatenate(xs, axis=array_axis(v, v.attr["axis"]))

    @rule("reshape")
    def _reshape(self, ctx, v, x):
        shape = ctx.concrete_shape(v.type)
        return x.reshape(shape if v.type.domain is Domain.PARAM else (x.shape[0],) + shape)

    # ---- graph movement ------------------------------------------------------------------

    @rule("gather")
    def _gather(self, ctx, v, x):
        return np.take(x, _gather_index(ctx, v), axis=0)  # np.take: faster than fancy indexing for row gathers

    @rule("take")
    def _take(self, ctx, v, w, index):
        check_value_ids(v, index, lambda k: w.shape[0])
        return np.take(w, index, axis=0)

    @rule("one_hot")
    def _one_hot(self, ctx, v, ids):
        classes = v.attr["classes"]
        check_value_ids(v, ids, lambda k: classes)
        return np.eye(classes, dtype=ctx.float_dtype)[ids]

    @rule("aggregate")
    def _aggregate(self, ctx, v, x):
        if v.attr["reduce"] == "sum" and v.attr["by"] in ("dst", "src") and x.dtype in _NO_WEIGHTS:
            total = ctx.pull(v.attr["by"], v.attr["edges"]).edge_sum(x, empty=ctx.empty)
            if total is not None:
                return total
        seg = ctx.segments_by(v.attr["by"], v.attr["edges"])
        rule = choose(_SEGMENT_REDUCTIONS, v.op, "reduce", v.attr["reduce"], "the numpy backend's segment reductions")
        return rule(seg, x)

    @rule("softmax")
    def _softmax(self, ctx, v, x):
        seg = ctx.segments_by(v.attr["by"], v.attr["edges"])
        shifted = np.exp(x - seg.broadcast(seg.extreme(x, np.maximum)))
        return shifted / seg.broadcast(seg.sum(shifted))

    # ---- fused graph ops -----------------------------------------------------------------

    @rule("gspmm")
    def _gspmm(self, ctx, v, x, w=None):
        csr = ctx.pull(v.attr["by"], v.attr["edges"])
        kind = choose(_GSPMM_KINDS, v.op, "reduce", v.attr["reduce"], "the numpy backend's g-SpMM kernels")
        weights = None if w is None else csr.ordered(w)
        if isinstance(kind, np.ufunc):
            return csr.extreme(x, kind, weights)
        return csr.spmm(x, weights, mean=kind == "mean", empty=ctx.empty)

    @rule("match_gspmm")
    def _match_gspmm(self, ctx, v, a, b, x=None):
        csr = ctx.pull(v.attr["by"], v.attr["edges"])
        # a is read at each edge's source, b at its destination: the columns of the CSR by dst are
        # sources, those of the CSR by src destinations.
        columns, rows = (a, b) if v.attr["by"] == "dst" else (b, a)
        return csr.match_spmm(columns, rows, x, empty=ctx.empty)

    @rule("attention")
    def _attention(self, ctx, v, s, x):
        """With a later segment_logsumexp of the same scores over the same edges (the training
        forward's residual), the kernels' softmax also yields that log-sum-exp, which the later op
        takes (``ExecContext.handed_on``) instead of a pass over the edges of its own."""
        csr = ctx.pull(v.attr["by"], v.attr["edges"])
        if x.dtype != s.dtype or not csr.attention_writes_lse(x, s):
            return csr.attention(csr.ordered(s), x, empty=ctx.empty)
        later = [u for u in ctx.program.values if u.op == "segment_logsumexp" and u.operands[0] is v.operands[0]
                 and u.attr["by"] == v.attr["by"] and u.attr["edges"] == v.attr["edges"]]
        if not later:
            return csr.attention(csr.ordered(s), x, empty=ctx.empty)
        lse = ctx.empty((csr.num_nodes,) + s.shape[1:], s.dtype)
        out = csr.attention(csr.ordered(s), x, empty=ctx.empty, lse=lse)
        for u in later:
            ctx.handed_on[id(u)] = lse
        return out

    @rule("segment_logsumexp")
    def _segment_logsumexp(self, ctx, v, s):
        handed = ctx.handed_on.pop(id(v), None)
        if handed is not None:
            return handed
        csr = ctx.pull(v.attr["by"], v.attr["edges"])
        return csr.logsumexp(csr.ordered(s), empty=ctx.empty)

    @rule("attention_score_grad")
    def _attention_score_grad(self, ctx, v, s, lse, x, g, delta):
        csr = ctx.pull(v.attr["by"], v.attr["edges"])
        return csr.unordered(csr.attention_score_grad(s, lse, x, g, delta, empty=ctx.empty))

    @rule("attention_value_grad")
    def _attention_value_grad(self, ctx, v, s, lse, g):
        csr = ctx.pull(v.attr["by"], v.attr["edges"])
        return csr.attention_value_grad(s, lse, g, empty=ctx.empty)

    @rule("global_attention")
    def _global_attention(self, ctx, v, q, k, x):
        heads, width = x.shape[1:]
        out = ctx.empty((len(q), heads, width + 1), ctx.float_dtype)
        if out.size:
            ctx.graph_blocks().launch(_kernels().global_attention, *_rows_of(ctx, q, k, x), v.attr["scale"], out)
        return out

    @rule("global_attention_query_grad")
    def _global_attention_query_grad(self, ctx, v, q, k, x, lse, g, delta):
        out = ctx.empty(q.shape, ctx.float_dtype)
        if out.size:
            ctx.graph_blocks().launch(_kernels().global_attention_query_grad, *_rows_of(ctx, q, k, x, lse, g, delta),
                                      v.attr["scale"], out)
        return out

    @rule("global_attention_key_grad")
    def _global_attention_key_grad(self, ctx, v, q, k, x, lse, g, delta):
        out = ctx.empty((len(q), q.shape[1], q.shape[2] + x.shape[2]), ctx.float_dtype)
        if out.size:
            ctx.graph_blocks().launch(_kernels().global_attention_key_grad, *_rows_of(ctx, q, k, x, lse, g, delta),
                                      v.attr["scale"], out)
        return out

    @rule("typed_linear")
    def _typed_linear(self, ctx, v, h, w, types):
        g = ctx.edges(v.attr["edges"])
        nodes = gather_index(g, v.attr["index"])
        relations = w.shape[0]
        check_value_ids(v, types, lambda k: relations)
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
                product = (block.reshape(feature_width(block.shape[:-1]), k)
                           @ w[r].reshape(k, feature_width(w.shape[2:])))
                compact[rows] = product.reshape((len(rows),) + out_shape)
        return compact[inverse]

    # ---- edge values carried onto a derived edge set ---------------------------------------

    @rule("carry")
    def _carry(self, ctx, v, x):
        table = carry_table(ctx.edges(v.attr["edges"]))
        return carry_values(table, x, v.attr["fill"], v.attr["value"], np.empty)

    @rule("carry_grad")
    def _carry_grad(self, ctx, v, g):
        table = carry_table(ctx.edges(v.attr["edges"]))
        return carry_transpose(table, g, v.attr["fill"], np.zeros)

    # ---- ops of gradient programs --------------------------------------------------------

    @rule("contract_rows")
    def _contract_rows(self, ctx, v, *xs):
        """The einsum of the operands, summed over their rows too. On many rows a product with an
        outer axis (``a,b->ab``: a matrix product) is contracted in pieces of CONTRACT_PIECE_ROWS rows
        on the pool's workers, and the partial results are summed in piece order (so the result does
        not depend on the worker count); on fewer rows the forms gradient programs use run as a
        column sum or one BLAS product (``row_contraction_plan``: no einsum path planning per call);
        other sums of elementwise products (``a,a->a``) run in NumPy's own einsum loop, several times
        faster than BLAS's for them."""
        inputs, out = v.attr["spec"].split("->")
        by_rows = [o.type.domain is not Domain.PARAM for o in v.operands]
        terms = [term.strip() for term in inputs.split(",")]
        spec = ",".join(("R" if row else "") + term for term, row in zip(terms, by_rows)) + "->" + out.strip()
        outer = len(terms) > 2 or any(set(out.strip()) - set(term) for term in terms)
        rows = max(len(x) for x, row in zip(xs, by_rows) if row)
        few_rows = rows < 2 * CONTRACT_PIECE_ROWS
        plan = row_contraction_plan(v.attr["spec"]) if few_rows and all(by_rows) else None
        if plan is not None:
            return np.asarray(plan(xs), dtype=ctx.float_dtype)
        if not outer or few_rows or sum(by_rows) < 2:
            return np.asarray(np.einsum(spec, *xs, optimize=outer), dtype=ctx.float_dtype)
        bounds = list(range(0, rows, CONTRACT_PIECE_ROWS)) + [rows]

        def piece(p: int) -> list:
            return [x[bounds[p]:bounds[p + 1]] if row else x for x, row in zip(xs, by_rows)]

        path = np.einsum_path(spec, *piece(0), optimize="greedy")[0]
        partial: list[Any] = [None] * (len(bounds) - 1)

        def contract(lo: int, hi: int) -> None:
            for p in range(lo, hi):
                partial[p] = np.einsum(spec, *piece(p), optimize=path)

        row_parallel(len(partial), contract, force=True)
        total = np.array(partial[0], dtype=ctx.float_dtype)
        for part in partial[1:]:
            total += part
        return total

    @rule("broadcast")
    def _broadcast(self, ctx, v, x):
        shape = ctx.concrete_shape(v.type)
        if v.type.domain is Domain.PARAM:
            full, arr = shape, x.reshape(x.shape + (1,) * (len(shape) - x.ndim))
        else:
            full = (ctx.rows(v.type.space),) + shape
            arr = expand_operand(x, v.operands[0].type, v.type)
        return np.array(np.broadcast_to(arr, full), dtype=ctx.float_dtype)

    @rule("slice")
    def _slice(self, ctx, v, x):
        axis = array_axis(v, v.attr["axis"])
        return np.ascontiguousarray(x[(slice(None),) * axis + (slice(v.attr["start"], v.attr["stop"]),)])

    @rule("pad")
    def _pad(self, ctx, v, x):
        widths = [(0, 0)] * x.ndim
        widths[array_axis(v, v.attr["axis"])] = (v.attr["before"], v.attr["after"])
        return np.pad(x, widths)
