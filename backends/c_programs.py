"""Whole programs as one compiled C call: the NumPy backend's tier for small graphs.

On a small graph (a batch of 64 molecules: ~1,000 nodes) a program run op by op costs the fixed
costs of its ~100 NumPy and SciPy calls (10-90 microseconds each), several times its arithmetic.
``compile_program`` translates a program whose every op has a C rule (``C_RULES``) into C that one
call runs (a function per op, so that the compiler's time stays linear): loops for elementwise
math, gathers and segment reductions (in the summation orders of the op-by-op rules), and dense
products through ``PRODUCTS`` (register tiles sized for the machine's vector registers, else OpenBLAS:
``_openblas``), a library built once per float type and passed in as a function pointer. The
system's C compiler builds a program once; the shared library is cached on disk (``CACHE_DIR``) under
the hash of its source, the compiler, its flags and the CPU's features, so a later process loads
it without compiling. ``NumpyBackend.run`` compiles and calls it from a program's first run on a
graph whose every row space is small (``SMALL_ROWS``), so that every such run takes the same path
and gives the same bits (the C function rounds differently from the op-by-op rules);
``MPDSL_C_PROGRAMS=0`` turns the tier off.

A run splits its ops over rows (``_Translation.row_range``: elementwise ops, gathers, segment
reductions and softmaxes, products, row contractions) over ``THREADS`` threads of the runtime
(``RUNTIME``, a pthread pool shared by every program); the pieces' bounds are multiples of a fixed
grain and products and row contractions run in chunks of ``CHUNK_ROWS`` rows whose partials are added
in chunk order, so a run's bits do not depend on the thread count. A row group's blocks
(``run_rows``, called from the backend's own pool) run on their calling thread in one chunk.

Contract: a compiled program's outputs equal the op-by-op run's to rounding (float64: rtol 1e-10
in the tests; contractions are not fused into FMAs, ``-ffp-contract=off``), on any graph, empty
ones included. It has no error paths: ops that check their data (ids) have no C rule, nor the
training forms of dropout (random draws) and batch_norm (a side result); ``C_UNSUPPORTED`` says
why for each op without one, and a program with one of them, or on a typed graph, runs op by op.
Sources without operands (``const``, ``degree``, ``arange``, ``linspace``) run their NumPy rule and
are passed in. Elementwise values and gathers used once by an elementwise op or a segment
reduction are computed inside that op's loop, never stored (``_inlined_values``); the others live
in one workspace reused between runs, a slot reused once its value is dead. Without a C compiler,
or when the build fails, programs run op by op; ``NumpyBackend.compiled_program_reason`` (shown by
``--emit plan``) says which and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpdsl.backends import (
    CPU_WORKERS,
    array_axis,
    batch_norm_training,
    edge_graph,
    feature_width,
    gather_index,
    space_rows,
)
from mpdsl.cache_dirs import user_cache_folder
from mpdsl.ir import Program, Value
from mpdsl.ops import COMPUTED_OPS, OPS, ArrayMath
from mpdsl.types import Domain, Space

SMALL_ROWS = 8192  # a run uses its compiled program when no row space has this many rows or more
# -O2 with -O3's loop vectorizer: -O3 itself measured no faster here and compiled up to 8x slower
FLAGS = ("-O2", "-ftree-vectorize", "-fvect-cost-model=dynamic", "-march=native", "-ffp-contract=off",
         "-fno-math-errno", "-std=gnu11", "-shared", "-fPIC")

# Ops without a C rule, and why: a program with one of them runs op by op.
C_UNSUPPORTED: dict[str, str] = {
    "take": "checks its ids against the parameter's rows",
    "one_hot": "checks its ids against the class count",
    "typed_linear": "checks its relation ids",
    "carry": "reads the derived edge set's carry table",
    "carry_grad": "reads the derived edge set's carry table",
    **{name: "a fused compiled kernel of its own (cpu_kernels)"
       for name in ("attention", "segment_logsumexp", "attention_score_grad", "attention_value_grad", "match_gspmm",
                    "global_attention", "global_attention_query_grad", "global_attention_key_grad")},
}
SOURCE_OPS = ("const", "arange", "linspace")  # run by their NumPy rule, passed in
MAX_INLINED_CHAIN = 32  # values computed inside one consumer's loop, at most, along a chain of operands
MAX_OPS = 1500  # larger programs run op by op (the compiler's time grows with the op count)
THREADS = CPU_WORKERS  # threads a run's split ops use (``run_rows``: one)
SPLIT_WORK = 16384  # an op touching fewer elements runs on the calling thread alone
CHUNK_ROWS = 256  # rows of a product's fixed pieces, and of a row contraction's partial sums
# How long a worker spins for the next piece before it sleeps: a training step's Python between its two
# program calls takes about a millisecond (a 64-molecule GINE step: 200 us gave 6% longer epochs, and a
# sleeping worker takes about 100 us to wake on a VM); like OpenMP's spin, it holds a core meanwhile.
SPIN_SECONDS = 1e-3
WHOLE_ROWS = 1 << 40  # the chunk of ``run_rows``: one piece (its caller splits the rows)


CACHE_DIR = user_cache_folder("c_programs")


def enabled() -> bool:
    """Whether the tier is on (``MPDSL_C_PROGRAMS`` unset or not "0")."""
    return os.environ.get("MPDSL_C_PROGRAMS", "1") != "0"


# ---- C expressions of elementwise compute rules -----------------------------------------------------

def _literal(x: float) -> str:
    if math.isnan(x):
        return "((T)NAN)"
    if math.isinf(x):
        return "((T)INFINITY)" if x > 0 else "(-(T)INFINITY)"
    return f"((T){float(x)!r})"


class CExpr:
    """A C expression of type T, built by an elementwise ``compute`` rule through ``CMath``."""

    def __init__(self, text: str):
        self.text = text

    @staticmethod
    def of(x: Any) -> CExpr:
        if isinstance(x, CExpr):
            return x
        if isinstance(x, bool):
            return CExpr(_literal(float(x)))
        if isinstance(x, (int, float)):
            return CExpr(_literal(float(x)))
        raise TypeError(f"no C form for {x!r}")

    def _bin(self, op: str, other: Any, flip: bool = False) -> CExpr:
        a, b = (CExpr.of(other), self) if flip else (self, CExpr.of(other))
        return CExpr(f"({a.text} {op} {b.text})")

    def __add__(self, o): return self._bin("+", o)
    def __radd__(self, o): return self._bin("+", o, True)
    def __sub__(self, o): return self._bin("-", o)
    def __rsub__(self, o): return self._bin("-", o, True)
    def __mul__(self, o): return self._bin("*", o)
    def __rmul__(self, o): return self._bin("*", o, True)
    def __truediv__(self, o): return self._bin("/", o)
    def __rtruediv__(self, o): return self._bin("/", o, True)
    def __neg__(self): return CExpr(f"(-{self.text})")


def _call(name: str) -> Callable[..., CExpr]:
    return lambda *args: CExpr(f"{name}({', '.join(CExpr.of(a).text for a in args)})")


def _compare(op: str) -> Callable[..., CExpr]:
    return lambda a, b: CExpr(f"((T)({CExpr.of(a).text} {op} {CExpr.of(b).text}))")


class CMath(ArrayMath):
    """``ArrayMath`` that writes C: each function gives the expression computing it on one element,
    with NumPy's semantics (NaN propagation of maximum/minimum, sign of NaN, halves to even)."""

    def __init__(self):
        functions: dict[str, Callable[..., CExpr]] = {
            "negative": lambda a: -CExpr.of(a), "add": lambda a, b: CExpr.of(a) + b,
            "subtract": lambda a, b: CExpr.of(a) - b, "multiply": lambda a, b: CExpr.of(a) * b,
            "divide": lambda a, b: CExpr.of(a) / b, "power": _call("pow"), "maximum": _call("mp_max"),
            "minimum": _call("mp_min"), "exp": _call("exp"), "expm1": _call("expm1"), "log": _call("log"),
            "log1p": _call("log1p"), "log2": _call("log2"), "log10": _call("log10"), "sqrt": _call("sqrt"),
            "rsqrt": lambda a: CExpr(f"((T)1 / sqrt({CExpr.of(a).text}))"), "tanh": _call("tanh"),
            "abs": _call("fabs"), "erf": _call("erf"), "sigmoid": _call("mp_sigmoid"),
            "softplus": _call("mp_softplus"), "sin": _call("sin"), "cos": _call("cos"), "tan": _call("tan"),
            "asin": _call("asin"), "acos": _call("acos"), "atan": _call("atan"), "atan2": _call("atan2"),
            "sinh": _call("sinh"), "cosh": _call("cosh"), "sign": _call("mp_sign"), "floor": _call("floor"),
            "ceil": _call("ceil"), "round": _call("rint"), "trunc": _call("trunc"),
            "where": lambda c, a, b: CExpr(f"(({CExpr.of(c).text}) != 0 ? {CExpr.of(a).text} : {CExpr.of(b).text})"),
            "greater": _compare(">"), "greater_equal": _compare(">="), "less": _compare("<"),
            "less_equal": _compare("<="), "equal": _compare("=="), "not_equal": _compare("!="),
            "logical_and": lambda a, b: CExpr(f"((T)(({CExpr.of(a).text}) != 0 && ({CExpr.of(b).text}) != 0))"),
            "logical_or": lambda a, b: CExpr(f"((T)(({CExpr.of(a).text}) != 0 || ({CExpr.of(b).text}) != 0))"),
            "logical_not": lambda a: CExpr(f"((T)(({CExpr.of(a).text}) == 0))"),
        }
        assert set(functions) == set(self.FUNCTIONS)
        self.__dict__.update(functions)


C_MATH = CMath()

PRELUDE = r"""
#include <math.h>
#include <tgmath.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
/* row-major C[m x n] = op(A) op(B): the products library's mp_product (PRODUCTS), passed in */
typedef void (*gemm_t)(int, int, int64_t, int64_t, int64_t, const T *, int64_t, const T *, int64_t, T *, int64_t);
#define mp_gemm(gemm, ...) (gemm)(__VA_ARGS__)
/* the runtime's parallel loop (RUNTIME): task(ctx, lo, hi) over [0, n) in at most `threads` pieces
   whose bounds are multiples of grain */
typedef void (*mp_task)(void *, int64_t, int64_t);
typedef void (*parallel_t)(mp_task, void *, int64_t, int64_t, int64_t);
/* an op: items r_lo:r_hi of its outermost loop when it is split (mp_split), else all of them */
typedef void (*mp_op)(void **, void **, T *const *, const int64_t *, gemm_t, int64_t, int64_t);
struct mp_call { mp_op op; void **A; void **O; T *const *S; const int64_t *R; gemm_t gemm; };
static void mp_call_task(void *c, int64_t lo, int64_t hi) {
    const struct mp_call *k = (const struct mp_call *)c;
    k->op(k->A, k->O, k->S, k->R, k->gemm, lo, hi);
}
/* The run's settings, before the row counts: R[-3] threads, R[-2] the least work (elements) split
   over them, R[-1] the rows of a chunk (CHUNK_ROWS: the products' fixed pieces) */
#define MP_THREADS R[-3]
#define MP_SPLIT_WORK R[-2]
#define RC R[-1]
static void mp_split(parallel_t par, mp_op op, void **A, void **O, T *const *S, const int64_t *R, gemm_t gemm,
                     int64_t n, int64_t grain, int64_t work) {
    if (par == 0 || MP_THREADS < 2 || work < MP_SPLIT_WORK || n <= grain) { op(A, O, S, R, gemm, 0, n); return; }
    struct mp_call k = {op, A, O, S, R, gemm};
    par(mp_call_task, &k, n, grain, MP_THREADS);
}
static inline T mp_max(T a, T b) { return a != a ? a : (b != b ? b : (a >= b ? a : b)); }
static inline T mp_min(T a, T b) { return a != a ? a : (b != b ? b : (a <= b ? a : b)); }
static inline T mp_sign(T a) { return a != a ? a : (T)((a > 0) - (a < 0)); }
static inline T mp_sigmoid(T a) { return (T)1 / ((T)1 + exp(-a)); }
static inline T mp_softplus(T x) {  /* numpy's logaddexp(0, x) */
    if (x == 0) return (T)0.6931471805599453;
    if (x > 0) return x + log1p(exp(-x));
    if (x <= 0) return log1p(exp(x));
    return x;
}
#define MP_I64 ((int64_t)(sizeof(int64_t) / sizeof(T)))  /* T elements per int64 of a workspace slot */
/* indptr [count + 1] and perm [n]: the positions of ids grouped by id, in order within a group (a
   stable counting sort; ids in [0, count)) */
static void mp_group(const int64_t *ids, int64_t n, int64_t count, int64_t *indptr, int64_t *perm) {
    memset(indptr, 0, sizeof(int64_t) * (size_t)(count + 1));
    for (int64_t i = 0; i < n; i++) indptr[ids[i] + 1]++;
    for (int64_t c = 0; c < count; c++) indptr[c + 1] += indptr[c];
    for (int64_t i = n - 1; i >= 0; i--) perm[--indptr[ids[i] + 1]] = i;  /* indptr[c + 1]: start of c */
    for (int64_t c = 0; c < count; c++) indptr[c] = indptr[c + 1];
    indptr[count] = n;
}
"""

# The dense products every program calls (``mp_product``, passed in as ``gemm``): register tiles
# for the programs' widths, OpenBLAS for the others. One library per float type, built and
# cached like a program, so that a program's own source stays small (the tiles, unrolled for the
# machine's vector registers, take the compiler about half a second).
PRODUCTS = r"""
#include <stdint.h>
#include <string.h>
/* Products of the programs' shapes (widths a multiple of one vector, MP_L elements): a tile of R rows
   x NV vectors of C stays in registers over the whole sum, which runs over k in order (so a result's
   bits do not depend on its tile). first: C starts at 0, else the sum adds to C. The vector and the
   tiles follow the instruction set the library is built for (-march=native): with AVX-512's 32
   registers of 64 bytes a tile holds 24 vectors of sums; with 16 registers (AVX2: 32 bytes; SSE and
   NEON: 16) at most 12, leaving registers for B's row and A's element (a larger tile spills).
   MP_TILED: whether products take the tiles (else BLAS always). With AVX-512 they measured about
   twice OpenBLAS's speed on the 64-wide products of these models; with AVX2 (Zen 3) 0.6-1.25x of
   it, so there BLAS runs them. */
#if !defined(MP_TILED) && defined(__AVX512F__)
#define MP_TILED 1
#elif !defined(MP_TILED)
#define MP_TILED 0
#endif
#if defined(__AVX512F__)
#define MP_VBYTES 64
#define MP_R4 6   /* the rows of a tile of 4, 2 and 1 vectors */
#define MP_R2 12
#define MP_R1 24
#else
#if defined(__AVX__)
#define MP_VBYTES 32
#else
#define MP_VBYTES 16
#endif
#define MP_R4 2
#define MP_R2 6
#define MP_R1 12
#endif
#define MP_L ((int64_t)(MP_VBYTES / sizeof(T)))
typedef T mp_vec __attribute__((vector_size(MP_VBYTES), aligned(sizeof(T)), may_alias));
#define MP_TILE(NAME, R, NV, A_AT)                                                                      \
static void NAME(int64_t k, int first, const T *a, int64_t lda, const T *b, int64_t ldb, T *c, int64_t ldc) { \
    mp_vec acc[R][NV];                                                                                  \
    _Pragma("GCC unroll 32") for (int r = 0; r < R; r++)                                               \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                                           \
            acc[r][v] = first ? (mp_vec){0} : *(const mp_vec *)(c + r * ldc + v * MP_L);                \
    for (int64_t p = 0; p < k; p++) {                                                                   \
        mp_vec w[NV];                                                                                   \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) w[v] = *(const mp_vec *)(b + p * ldb + v * MP_L); \
        _Pragma("GCC unroll 32") for (int r = 0; r < R; r++) {                                         \
            const T s = A_AT;                                                                           \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) acc[r][v] += s * w[v];               \
        }                                                                                               \
    }                                                                                                   \
    _Pragma("GCC unroll 32") for (int r = 0; r < R; r++)                                               \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) *(mp_vec *)(c + r * ldc + v * MP_L) = acc[r][v]; \
}
#define MP_NAME_(KIND, R, NV) mp_##KIND##_##R##x##NV
#define MP_NAME(KIND, R, NV) MP_NAME_(KIND, R, NV)  /* R and NV expanded before they are pasted */
/* A [m x k] row-major (A_AT a[r * lda + p]) or, transposed, [k x m] (a[p * lda + r]); R is never 4 */
#define MP_TILES_(NV, R) \
    MP_TILE(MP_NAME(nn, R, NV), R, NV, a[r * lda + p]) MP_TILE(MP_NAME(nn, 4, NV), 4, NV, a[r * lda + p]) \
    MP_TILE(MP_NAME(nn, 1, NV), 1, NV, a[r * lda + p]) MP_TILE(MP_NAME(tn, R, NV), R, NV, a[p * lda + r]) \
    MP_TILE(MP_NAME(tn, 4, NV), 4, NV, a[p * lda + r]) MP_TILE(MP_NAME(tn, 1, NV), 1, NV, a[p * lda + r])
#define MP_TILES(NV, R) MP_TILES_(NV, R)
MP_TILES(4, MP_R4) MP_TILES(2, MP_R2) MP_TILES(1, MP_R1)
typedef void (*mp_tile)(int64_t, int, const T *, int64_t, const T *, int64_t, T *, int64_t);
#define MP_KIND_TILES(KIND) {                                                                        \
    {MP_NAME(KIND, MP_R4, 4), MP_NAME(KIND, 4, 4), MP_NAME(KIND, 1, 4)},                             \
    {MP_NAME(KIND, MP_R2, 2), MP_NAME(KIND, 4, 2), MP_NAME(KIND, 1, 2)},                             \
    {MP_NAME(KIND, MP_R1, 1), MP_NAME(KIND, 4, 1), MP_NAME(KIND, 1, 1)}}
/* C[m x n] (+)= op(A) B over k, tiled: column blocks of 4, 2, then 1 vector, each over row tiles of
   its most rows, then 4 rows (where fewer than the most), then 1 */
static void mp_tiled(int ta, int64_t m, int64_t n, int64_t k, int first,
                     const T *a, int64_t lda, const T *b, int64_t ldb, T *c, int64_t ldc) {
    static const mp_tile tiles[2][3][3] = {MP_KIND_TILES(nn), MP_KIND_TILES(tn)};
    static const int64_t rows[3][3] = {{MP_R4, 4, 1}, {MP_R2, 4, 1}, {MP_R1, 4, 1}}, vectors[3] = {4, 2, 1};
    const int64_t row_step = ta ? 1 : lda;  /* from C's row i to A's */
    int64_t j = 0;
    for (int s = 0; s < 3; s++)
        for (; j + vectors[s] * MP_L <= n; j += vectors[s] * MP_L) {
            int64_t i = 0;
            for (int t = 0; t < 3; t++)
                for (; i + rows[s][t] <= m; i += rows[s][t])
                    tiles[ta][s][t](k, first, a + i * row_step, lda, b + j, ldb, c + i * ldc + j, ldc);
        }
}
#define MP_TILED_WIDTH 512  /* the widest n (and m of a transposed A) the tiles take; wider: BLAS */
#define MP_TILED_SUM 64     /* a transposed A's sum runs in blocks of this many rows (B's in L1) */
typedef void (*blas_t)(char *, char *, int *, int *, int *, T *, T *, int *, T *, int *, T *, T *, int *);
typedef int (*local_threads_t)(int *);
/* MP_TORCH_SUMS: whether sums over rows (a transposed A: the weight gradients) go to torch's MKL
   (sum_gemm), with MKL's per-thread thread count held at one around each call and restored (a
   program's caller is the user's thread), else to gemm. A part of the source, so that each choice is
   a library of its own: the pointers below are the library's globals. */
#ifndef MP_TORCH_SUMS
#define MP_TORCH_SUMS 0
#endif
static blas_t gemm, sum_gemm;  /* set once at load (mp_set_blas): OpenBLAS's ?gemm, MKL's */
static local_threads_t sum_local_threads;
void mp_set_blas(blas_t f, blas_t sum, local_threads_t local_threads) {
    gemm = f; sum_gemm = sum; sum_local_threads = local_threads;
}
/* row-major C[m x n] = op(A) op(B): the tiles where B is not transposed and n is a multiple of MP_L,
   else through column-major gemm: C^T = op(B)^T op(A)^T */
void mp_product(int ta, int tb, int64_t m, int64_t n, int64_t k,
                const T *a, int64_t lda, const T *b, int64_t ldb, T *c, int64_t ldc) {
    if (m == 0 || n == 0) return;
    if (k == 0) { for (int64_t i = 0; i < m; i++) memset(c + i * ldc, 0, sizeof(T) * n); return; }
    if (MP_TILED && !tb && n % MP_L == 0 && n <= MP_TILED_WIDTH && (!ta || m <= MP_TILED_WIDTH)) {
        if (!ta) { mp_tiled(0, m, n, k, 1, a, lda, b, ldb, c, ldc); return; }
        for (int64_t p = 0; p < k; p += MP_TILED_SUM) {
            const int64_t block = k - p < MP_TILED_SUM ? k - p : MP_TILED_SUM;
            mp_tiled(1, m, n, block, p == 0, a + p * lda, lda, b + p * ldb, ldb, c, ldc);
        }
        return;
    }
    char tra = tb ? 'T' : 'N', trb = ta ? 'T' : 'N';
    int M = (int)n, N = (int)m, K = (int)k, LDA = (int)ldb, LDB = (int)lda, LDC = (int)ldc;
    T one = 1, zero = 0;
    if (!ta || !MP_TORCH_SUMS) {
        gemm(&tra, &trb, &M, &N, &K, &one, (T *)b, &LDA, (T *)a, &LDB, &zero, c, &LDC);
        return;
    }
    int single = 1, before = sum_local_threads(&single);
    sum_gemm(&tra, &trb, &M, &N, &K, &one, (T *)b, &LDA, (T *)a, &LDB, &zero, c, &LDC);
    sum_local_threads(&before);
}
"""

# The runtime: worker threads that the programs' split ops run on (one set per process, shared by
# every program; built and cached like a program). ``mp_parallel(task, ctx, n, grain, threads)``
# runs task on [0, n) in ``threads`` pieces (bounds multiples of grain), piece 0 on the calling
# thread, and returns when all are done. Workers spin for ``SPIN_SECONDS`` after a piece (the next op of a
# program comes microseconds later), then sleep on a condition variable. One caller at a time: a
# call while another runs (programs run from two Python threads) runs its task whole, on its own
# thread. A forked child starts with no workers and makes its own.
RUNTIME = r"""
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
typedef void (*mp_task)(void *, int64_t, int64_t);
#define MP_MAX_THREADS 64
static _Atomic int64_t spin_ns = 1000000;  /* how long a worker spins before it sleeps (mp_set_spin) */
void mp_set_spin(int64_t ns) { atomic_store(&spin_ns, ns); }
#if defined(__x86_64__) || defined(__i386__)
#define mp_pause() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define mp_pause() __asm__ __volatile__("yield")
#else
#define mp_pause() ((void)0)
#endif
static struct {
    pthread_mutex_t lock; pthread_cond_t wake;
    atomic_uint_fast64_t generation; atomic_uint_fast64_t alarms; atomic_int pending; atomic_int sleepers;
    atomic_flag busy;
    mp_task task; void *ctx; int64_t n, grain; int threads;  /* the current call's */
    int started;  /* workers running */
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, ATOMIC_FLAG_INIT, 0, 0, 0, 0, 0, 0};
static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
static uint_fast64_t born[MP_MAX_THREADS];  /* the generation when each worker was made: it answers later ones */

static void run_piece(int k) {
    int64_t pieces = (P.n + P.grain - 1) / P.grain;  /* grains, shared out evenly */
    int64_t lo = pieces * k / P.threads * P.grain, hi = pieces * (k + 1) / P.threads * P.grain;
    if (hi > P.n) hi = P.n;
    if (lo < hi) P.task(P.ctx, lo, hi);
}
static int64_t now_ns(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}
static void *worker(void *arg) {
    const int k = (int)(intptr_t)arg;
    uint_fast64_t seen = born[k];
    for (;;) {
        uint_fast64_t g;
        int64_t until = now_ns() + atomic_load(&spin_ns);
        for (int spin = 0; (g = atomic_load(&P.generation)) == seen; spin++) {
            mp_pause();
            if ((spin & 255) == 255 && now_ns() > until) {
                uint_fast64_t alarm = atomic_load(&P.alarms);
                pthread_mutex_lock(&P.lock);
                atomic_fetch_add(&P.sleepers, 1);
                while ((g = atomic_load(&P.generation)) == seen && atomic_load(&P.alarms) == alarm)
                    pthread_cond_wait(&P.wake, &P.lock);
                atomic_fetch_sub(&P.sleepers, 1);
                pthread_mutex_unlock(&P.lock);
                until = now_ns() + atomic_load(&spin_ns);  /* woken by work, or by mp_wake: spin again */
            }
        }
        seen = g;
        if (k < P.threads) run_piece(k);
        atomic_fetch_sub(&P.pending, 1);
    }
    return 0;
}
static void after_fork_in_child(void) {
    pthread_mutex_init(&P.lock, 0); pthread_cond_init(&P.wake, 0); pthread_mutex_init(&start_lock, 0);
    P.started = 0; atomic_store(&P.sleepers, 0); atomic_store(&P.pending, 0); atomic_flag_clear(&P.busy);
}
static int start(int threads) {  /* workers 1 .. threads - 1; the count running */
    pthread_mutex_lock(&start_lock);
    static int registered;
    if (!registered) { pthread_atfork(0, 0, after_fork_in_child); registered = 1; }
    while (P.started < threads - 1 && P.started < MP_MAX_THREADS - 1) {
        pthread_t t;
        born[P.started + 1] = atomic_load(&P.generation);
        pthread_attr_t attr; pthread_attr_init(&attr); pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, worker, (void *)(intptr_t)(P.started + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        P.started++;
    }
    int running = P.started + 1;
    pthread_mutex_unlock(&start_lock);
    return running;
}
/* Wakes sleeping workers to spin again: called as a run starts its preparation, so that they are
   spinning when its first split op comes (a sleeping worker takes about 100 us to wake on a VM) */
void mp_wake(void) {
    if (atomic_load(&P.sleepers)) {
        pthread_mutex_lock(&P.lock); atomic_fetch_add(&P.alarms, 1); pthread_cond_broadcast(&P.wake);
        pthread_mutex_unlock(&P.lock);
    }
}
void mp_parallel(mp_task task, void *ctx, int64_t n, int64_t grain, int64_t threads) {
    if (grain < 1) grain = 1;
    if (threads > (n + grain - 1) / grain) threads = (n + grain - 1) / grain;  /* no empty pieces */
    if (threads < 2 || atomic_flag_test_and_set(&P.busy)) { task(ctx, 0, n); return; }
    int running = P.started + 1 >= threads ? P.started + 1 : start((int)threads);
    if (running < 2) { atomic_flag_clear(&P.busy); task(ctx, 0, n); return; }
    P.task = task; P.ctx = ctx; P.n = n; P.grain = grain;
    P.threads = running < threads ? running : (int)threads;
    atomic_store(&P.pending, running - 1);  /* every worker answers, those past P.threads idle */
    atomic_fetch_add(&P.generation, 1);
    if (atomic_load(&P.sleepers)) {
        pthread_mutex_lock(&P.lock); pthread_cond_broadcast(&P.wake); pthread_mutex_unlock(&P.lock);
    }
    run_piece(0);
    while (atomic_load(&P.pending) > 0) mp_pause();
    atomic_flag_clear(&P.busy);
}
"""


# ---- the translation ---------------------------------------------------------------------------------

class Unsupported(Exception):
    """A program (or one of its values) has no C translation."""


@dataclass(frozen=True)
class External:
    """An array the C function reads: ``kind`` "input" / "param" (by name), "source" (a source value,
    computed by its NumPy rule) or "index" (edge set, "src" / "dst" / "batch"); the program groups
    rows by an index itself (``_Translation.segments``)."""

    kind: str
    key: tuple


class _Translation:
    """The C source of one program, and what its function reads and writes."""

    def __init__(self, program: Program, dims: dict[str, int], training: bool = False):
        self.program = program
        self.dims = dims
        self.training = training
        self.body = ""  # the C text of the program's functions, once translated
        self.lines: list[str] = []
        self.names: dict[int, str] = {}
        self.externals: list[External] = []
        self.external_slot: dict[External, int] = {}
        self.spaces: list[Space] = []
        self.slot_counts: list[str] = []  # C expressions of each workspace slot's element count
        self.free_slots: list[int] = []
        self.counter = 0
        self.output_values: list[Value] = []
        self.lazy: set[int] = set()  # values computed inside their one consumer's loop (never stored)
        self.functions: list[str] = []  # the C functions, in the order of their calls
        self.calls: list[str] = []
        self.groupings: dict[tuple[str, str], tuple[str, str]] = {}  # (by, edges) -> (indptr, perm) in C
        self.split: tuple[str, str, str] | None = None  # the op being translated: its (n, grain, work)
        self.after: list[str] = []  # the op's lines run once its split part is done (on one thread)

    # -- bookkeeping
    def shape(self, v: Value) -> tuple[int, ...]:
        return tuple(d.substitute(self.dims).value for d in v.type.shape)

    def rows(self, space: Space) -> str:
        if space not in self.spaces:
            self.spaces.append(space)
        return f"R{self.spaces.index(space)}"

    def full_shape(self, v: Value) -> list[str]:
        """C expressions of the array shape of ``v`` (rows first for row values)."""
        feature = [str(d) for d in self.shape(v)]
        return feature if v.type.domain is Domain.PARAM else [self.rows(v.type.space)] + feature

    def count(self, v: Value) -> str:
        return " * ".join(["(int64_t)1"] + self.full_shape(v))

    def external(self, ext: External, ctype: str = "T") -> str:
        if ext not in self.external_slot:
            self.external_slot[ext] = len(self.externals)
            self.externals.append(ext)
        return f"(({ctype} *)A[{self.external_slot[ext]}])"

    def fresh(self, prefix: str = "t") -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def emit(self, *lines: str) -> None:
        self.lines.extend(lines)

    def row_range(self, n: str, work: str, grain: str = "1") -> tuple[str, str]:
        """The bounds (C names) of the op's outermost loop, over ``n`` independent items (a result's
        rows, segments, chunks): the op is split into pieces over the runtime's threads when its
        ``work`` (C expression, about elements touched) is large enough, each piece a range of items
        whose bounds are multiples of ``grain``. An item's result must not depend on the split."""
        if self.split is None:
            self.split = (n, grain, work)
        elif self.split[:2] != (n, grain):
            raise AssertionError(f"one op split over two ranges: {self.split[0]} and {n}")
        return "r_lo", "r_hi"

    def graph_index(self, edges: str, index: str) -> str:
        return self.external(External("index", (edges, index)), "const int64_t")

    def segments(self, by: str, edges: str) -> tuple[str, str]:
        """C expressions of (indptr, perm) grouping the rows of edge set ``edges`` by their ``by`` end
        ("dst", "src"), or the nodes by graph ("graph"): computed by the program itself, by a stable
        counting sort of the index, before the first op that reads them (no grouping per batch graph
        in NumPy), into a workspace slot kept to the end of the run."""
        known = self.groupings.get((by, edges))
        if known is not None:
            return known
        if by == "graph":
            ids, n, count = (self.graph_index("", "batch"), self.rows(Space(Domain.NODE)),
                             self.rows(Space(Domain.GRAPH)))
        else:
            ids, n, count = (self.graph_index(edges, by), self.rows(Space(Domain.EDGE, edges)),
                             self.rows(Space(Domain.NODE)))
        slot = self.allocate(f"(({count}) + 1 + ({n})) * MP_I64")  # never released: any later op may read it
        indptr = f"((int64_t *)S[{slot[1:]}])"
        perm = f"({indptr} + ({count}) + 1)"
        function = f"group{len(self.groupings)}"
        saved, self.lines = self.lines, [f"mp_group({ids}, {n}, {count}, {indptr}, {perm});"]
        self.functions.append(self._function(function, f"rows of {edges or 'edge'} grouped by {by}", {}))
        self.calls.append(f"{function}(A, O, S, R, gemm, 0, 0);")
        self.lines = saved
        self.groupings[(by, edges)] = (f"((const int64_t *){indptr})", f"((const int64_t *){perm})")
        return self.groupings[(by, edges)]

    # -- the program
    def translate(self) -> str:
        program = self.program
        if len(program.values) > MAX_OPS:
            raise Unsupported(f"{len(program.values)} values: more than the {MAX_OPS} compiled at once")
        for v in program.values:
            if not v.type.is_float:
                raise Unsupported(f"{v.op} has int values")
            if v.type.rowset and v.type.domain is Domain.NODE:
                raise Unsupported("typed node sets")
        outputs: dict[int, Value] = {}
        for _, v in program.outputs:
            outputs.setdefault(id(v), v)
        self.output_values = list(outputs.values())
        output_slots = {id(v): i for i, v in enumerate(self.output_values)}
        for v in self.output_values:  # the outputs' row counts size their buffers
            if v.type.domain is not Domain.PARAM:
                self.rows(v.type.space)
        uses: dict[int, list[Value]] = {}  # value id -> the values reading it, in program order
        for v in program.values:
            for o in v.operands:
                uses.setdefault(id(o), []).append(v)
        self.lazy = _inlined_values(self, program, output_slots, uses)
        position = {id(v): i for i, v in enumerate(program.values)}

        def effective(v: Value) -> int:  # where v is computed: at its one consumer's loop when inlined
            while id(v) in self.lazy:
                v = uses[id(v)][0]
            return position[id(v)]

        last_use: dict[int, int] = {}
        for v in program.values:
            for o in v.operands:
                last_use[id(o)] = max(last_use.get(id(o), -1), effective(v))
        dying: dict[int, list[Value]] = {}
        for v in program.values:
            if id(v) in last_use and id(v) not in output_slots:
                dying.setdefault(last_use[id(v)], []).append(v)
        placed_in = _reshaped_in_place(program, self.lazy, output_slots, uses)
        slot_of: dict[int, str] = {}
        pointers: dict[str, str] = {}  # value name -> its C declaration's right side
        functions, calls = self.functions, self.calls
        for i, v in enumerate(program.values):
            name = f"v{len(self.names)}"
            self.names[id(v)] = name
            if v.op in ("input", "param") or v.op in SOURCE_OPS:
                ext = External(v.op, (v.attr["name"],)) if v.op in ("input", "param") else External("source", (id(v),))
                pointers[name] = f"(const T *){self.external(ext, 'const T')}"
                continue
            rule = C_RULES.get(v.op)
            if rule is None:
                raise Unsupported(f"{v.op}: {C_UNSUPPORTED.get(v.op, 'no C rule')}")
            if id(v) in self.lazy:
                continue
            if v.op == "reshape" and id(v.operands[0]) in placed_in:  # its operand was written in its place
                pointers[name] = pointers[self.names[id(v.operands[0])]]
            else:
                home = placed_in.get(id(v), v)  # where the value is stored: its own buffer, or its reshape's
                if id(home) in output_slots:
                    pointers[name] = f"(T *)O[{output_slots[id(home)]}]"
                else:
                    slot_of[id(home)] = self.allocate(self.count(v))
                    pointers[name] = f"S[{slot_of[id(home)][1:]}]"
                self.lines, self.split, self.after = [], None, []
                rule(self, v, name, [self.names[id(o)] for o in v.operands])
                function = f"op{len(functions)}"
                split, after = self.split, self.after
                functions.append(self._function(function, f"{name} = {v.op}", pointers))
                if split is None:
                    calls.append(f"{function}(A, O, S, R, gemm, 0, 0);")
                else:
                    n, grain, work = split
                    calls.append(f"mp_split(par, {function}, A, O, S, R, gemm, {n}, {grain}, {work});")
                if after:
                    self.lines = after
                    functions.append(self._function(f"{function}_then", f"{name} = {v.op}, its last part", pointers))
                    calls.append(f"{function}_then(A, O, S, R, gemm, 0, 0);")
            for dead in dying.get(i, []):
                if id(dead) in slot_of:
                    self.release(slot_of.pop(id(dead)))
        # outputs that are inputs, params or sources: copied into their buffers
        copies = [f"memcpy(O[{output_slots[id(v)]}], {pointers[self.names[id(v)]]}, sizeof(T) * {self.count(v)});"
                  for v in self.output_values if v.op in ("input", "param") or v.op in SOURCE_OPS]
        rows = [f"const int64_t R{i} = R[{i}];" for i in range(len(self.spaces))]
        # each slot's elements rounded up to whole 64-byte lines, at a running offset
        places = ["int64_t off = 0;"]
        for k, count in enumerate(self.slot_counts):
            places.append(f"S[{k}] = W + off; off += ((({count}) + 7) & ~(int64_t)7);")
        return "\n".join([*functions,
                          "int64_t mp_workspace(const int64_t *R) {", *("    " + r for r in rows),
                          "    int64_t off = 0;",
                          *(f"    off += ((({count}) + 7) & ~(int64_t)7);" for count in self.slot_counts),
                          "    return off;", "}", "",
                          "int mp_program(void **A, void **O, const int64_t *R, T *W, gemm_t gemm, parallel_t par) {",
                          *("    " + r for r in rows), f"    T *S[{max(1, len(self.slot_counts))}];",
                          *("    " + p for p in places), *("    " + c for c in calls), *("    " + c for c in copies),
                          "    return 0;", "}"])

    def _function(self, function: str, what: str, pointers: dict[str, str]) -> str:
        """One op's lines as a function of its own (small functions keep the compiler's time linear
        in the program's size), declaring the row counts, values and slots they use."""
        text = "\n".join(self.lines)
        used_rows = sorted({int(m) for m in re.findall(r"\bR(\d+)\b", text)})
        used_values = sorted({int(m) for m in re.findall(r"\bv(\d+)\b", text)})
        used_slots = sorted({int(m) for m in re.findall(r"\bS(\d+)\b", text)})
        header = [f"const int64_t R{k} = R[{k}];" for k in used_rows]
        for k in used_values:
            right = pointers[f"v{k}"]
            kind = "const T" if right.startswith("(const T *)") else "T"
            header.append(f"{kind} *restrict v{k} = {right};")
        header += [f"T *restrict S{k} = S[{k}];" for k in used_slots]
        return "\n".join([f"/* {what} */",
                          f"static __attribute__((noinline)) void {function}(void **A, void **O, T *const *S, "
                          "const int64_t *R, gemm_t gemm, int64_t r_lo, int64_t r_hi) {",
                          "    (void)A; (void)O; (void)S; (void)R; (void)gemm; (void)r_lo; (void)r_hi;",
                          *("    " + h for h in header), *("    " + line for line in self.lines), "}", ""])

    def allocate(self, count: str) -> str:
        """A workspace slot of ``count`` elements: a free one of the same size, else a new one."""
        for k in self.free_slots:
            if self.slot_counts[k] == count:
                self.free_slots.remove(k)
                return f"S{k}"
        self.slot_counts.append(count)
        return f"S{len(self.slot_counts) - 1}"

    def release(self, slot: str) -> None:
        self.free_slots.append(int(slot[1:]))


# ---- the rules: rule(translation, value, its buffer, operand buffers) emits C filling the buffer -------

def _strides(shape: list[str]) -> list[str]:
    out = ["1"] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        out[i] = f"({out[i + 1]} * {shape[i + 1]})"
    return out


def _expanded(tr: _Translation, o: Value, result: Value) -> list[str]:
    """The operand's array shape under ``expand_operand`` (params: a leading 1; trailing 1s)."""
    shape = tr.full_shape(o)
    if o.type.domain is Domain.PARAM and result.type.domain is not Domain.PARAM:
        shape = ["1"] + shape
    return shape + ["1"] * (result.type.rank - o.type.rank)


def _broadcast_index(tr: _Translation, o: Value, result: Value, indices: list[str]) -> str:
    shape = _expanded(tr, o, result)
    rshape = tr.full_shape(result)
    strides = _strides(shape)
    terms = [f"{i} * {s}" for i, s, d, rd in zip(indices, strides, shape, rshape) if d != "1" or rd == "1"]
    return " + ".join(terms) or "0"


def _inlined_values(tr: _Translation, program: Program, outputs: dict[int, int],
                    uses: dict[int, list[Value]]) -> set[int]:
    """Values computed inside their consumer's loop instead of stored: an elementwise value or a
    gather of node rows, used once (``uses``: each value's readers), not an output, by an elementwise
    op of its own shape (no broadcasting) or by a segment reduction that reads it row by row (at most
    one feature axis)."""
    lazy: set[int] = set()
    depth: dict[int, int] = {}  # the chain of inlined values a read of v computes
    for v in program.values:
        depth[id(v)] = 1 + max((depth[id(o)] for o in v.operands if id(o) in lazy), default=0)
        if depth[id(v)] > MAX_INLINED_CHAIN:  # stored: a read is a load again
            continue
        if id(v) in outputs or len(uses.get(id(v), ())) != 1 or v.type.domain is Domain.PARAM:
            continue
        if not (v.op in COMPUTED_OPS or (v.op == "gather" and v.attr["index"] in ("src", "dst", "batch"))):
            continue
        user = uses[id(v)][0]
        if user.op in COMPUTED_OPS:
            if user.type.domain is not Domain.PARAM and _expanded(tr, v, user) == tr.full_shape(user):
                lazy.add(id(v))
        elif user.op == "aggregate" and user.operands[0] is v and v.type.rank <= 1 \
                and user.attr["reduce"] in ("sum", "mean", "max", "min"):
            lazy.add(id(v))
    return lazy


def _reshaped_in_place(program: Program, lazy: set[int], outputs: dict[int, int],
                       uses: dict[int, list[Value]]) -> dict[int, Value]:
    """Computed values whose only use is a reshape, not outputs themselves, each mapped to the last
    reshape of its chain: a reshape keeps the elements in order, so the value is written where that
    reshape's result lives (its output buffer or its workspace slot) and the reshapes copy nothing."""
    def only_reshape(v: Value) -> Value | None:  # v's one reader, when that is a reshape
        readers = uses.get(id(v), [])
        return readers[0] if len(readers) == 1 and readers[0].op == "reshape" else None

    placed: dict[int, Value] = {}
    for v in program.values:
        target = only_reshape(v)
        if v.op in ("input", "param") or v.op in SOURCE_OPS or id(v) in lazy or id(v) in outputs or target is None:
            continue
        while id(target) not in outputs and (after := only_reshape(target)) is not None:
            target = after
        placed[id(v)] = target
    return placed


def _read(tr: _Translation, o: Value, buffer: str, indices: list[str], body: list[str],
          flat: str | None = None) -> str:
    """A local holding ``o`` at ``indices`` (its full shape's; ``flat``: the stored element, default
    from the indices), with the statements computing it appended to ``body``: a stored value is
    loaded, an inlined one computed."""
    local = tr.fresh("a")
    if id(o) not in tr.lazy:
        strides = _strides(tr.full_shape(o))
        at = flat if flat is not None else (" + ".join(f"{i} * {s}" for i, s in zip(indices, strides)) or "0")
        body.append(f"const T {local} = {buffer}[{at}];")
        return local
    if o.op == "gather":
        width = feature_width(tr.shape(o))
        index = tr.graph_index(o.attr["edges"], o.attr["index"])
        inner = " + ".join(f"{i} * {s}" for i, s in zip(indices[1:], _strides(tr.full_shape(o))[1:])) or "0"
        body.append(f"const T {local} = {tr.names[id(o.operands[0])]}[{index}[{indices[0]}] * {width} + {inner}];")
        return local
    body.append(f"const T {local} = {_compute_at(tr, o, indices, body)};")
    return local


def _compute_at(tr: _Translation, v: Value, indices: list[str], body: list[str]) -> str:
    """The C expression of elementwise ``v`` at ``indices``, its operands read into locals first."""
    reads = []
    for o in v.operands:
        name = tr.names[id(o)]
        if id(o) in tr.lazy:
            reads.append(CExpr(_read(tr, o, name, indices, body)))
        else:
            reads.append(CExpr(_read(tr, o, name, indices, body, _broadcast_index(tr, o, v, indices))))
    compute = OPS[v.op].compute
    assert compute is not None  # only ops with a compute rule are elementwise
    try:
        return CExpr.of(compute(C_MATH, *reads, **v.attr)).text
    except TypeError as e:
        raise Unsupported(f"{v.op}: its compute rule has no C form ({e})") from None


def _loops(shape: list[str], indices: list[str]) -> tuple[list[str], list[str]]:
    opens = [f"for (int64_t {i} = 0; {i} < {n}; {i}++) {{" for i, n in zip(indices, shape)]
    return opens, ["}"] * len(shape)


def _row_loops(tr: _Translation, v: Value, shape: list[str], indices: list[str]) -> tuple[list[str], list[str]]:
    """``_loops`` over ``v``'s full shape, the rows' loop split (``row_range``) when ``v`` has rows."""
    opens, closes = _loops(shape, indices)
    if v.type.domain is not Domain.PARAM and shape:
        lo, hi = tr.row_range(shape[0], tr.count(v))
        opens[0] = f"for (int64_t {indices[0]} = {lo}; {indices[0]} < {hi}; {indices[0]}++) {{"
    return opens, closes


def _elementwise(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    shape = tr.full_shape(v)
    indices = [tr.fresh("i") for _ in shape]
    body: list[str] = []
    expr = _compute_at(tr, v, indices, body)
    opens, closes = _row_loops(tr, v, shape, indices)
    flat = " + ".join(f"{i} * {s}" for i, s in zip(indices, _strides(shape))) or "0"
    tr.emit(*opens, *body, f"{out}[{flat}] = {expr};", *closes)


def _matmul(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    ta, tb = (o.type for o in v.operands)
    a, b = args
    sa, sb = tr.shape(v.operands[0]), tr.shape(v.operands[1])
    k = sa[-1]
    n = feature_width(sb[1:])
    if tb.domain is Domain.PARAM and ta.domain is Domain.PARAM:
        m = " * ".join(tr.full_shape(v.operands[0])[:-1] or ["1"])
        tr.emit(f"mp_gemm(gemm, 0, 0, ({m}), {n}, {k}, {a}, {k}, {b}, {n}, {out}, {n});")
        return
    if tb.domain is Domain.PARAM:  # a product of each chunk of RC rows: the same bits however split
        rows = tr.rows(v.type.space)
        inner = feature_width(sa[:-1])  # product rows per row
        lo, hi = tr.row_range(rows, f"{rows} * {inner * n} * {max(1, k // 8)}", grain="RC")
        start, stop = tr.fresh("i"), tr.fresh("i")
        tr.emit(f"for (int64_t {start} = {lo}; {start} < {hi}; {start} += RC) {{",
                f"const int64_t {stop} = {hi} - {start} < RC ? {hi} : {start} + RC;",
                f"mp_gemm(gemm, 0, 0, ({stop} - {start}) * {inner}, {n}, {k}, {a} + {start} * {inner * k}, {k}, "
                f"{b}, {n}, {out} + {start} * {inner * n}, {n}); }}")
        return
    # b has rows: one small product per row (a a param or of the same rows)
    rows = tr.rows(v.type.space)
    m = feature_width(sa[:-1]) if ta.domain is Domain.PARAM else feature_width(sa[1:-1])
    r, i, j, q = (tr.fresh("i") for _ in range(4))
    a_row = "0" if ta.domain is Domain.PARAM else f"{r} * {m * k}"
    lo, hi = tr.row_range(rows, f"{rows} * {m * n * k}")
    tr.emit(f"for (int64_t {r} = {lo}; {r} < {hi}; {r}++) {{",
            f"for (int64_t {i} = 0; {i} < {m}; {i}++) for (int64_t {j} = 0; {j} < {n}; {j}++) {{",
            "T acc = 0;",
            f"for (int64_t {q} = 0; {q} < {k}; {q}++) acc += {a}[{a_row} + {i} * {k} + {q}] * "
            f"{b}[{r} * {k * n} + {q} * {n} + {j}];",
            f"{out}[{r} * {m * n} + {i} * {n} + {j}] = acc;", "}", "}")


def _einsum_loops(tr: _Translation, v: Value, out: str, args: list[str], terms: list[str], out_term: str,
                  rows_letter: str | None, row_bounds: tuple[str, str] | None = None) -> None:
    """A loop nest computing out[out_term] = sum over the other letters of the product of the
    operands (letters are axes; ``rows_letter`` the row axis of row operands, over ``row_bounds``
    (C expressions) when given, else all rows)."""
    sizes: dict[str, str] = {}
    for term, o in zip(terms, v.operands):
        for letter, size in zip(term, tr.full_shape(o)):
            sizes.setdefault(letter, size)
    for letter, size in zip(out_term, tr.full_shape(v)):
        sizes.setdefault(letter, size)
    index = {letter: tr.fresh("i") for letter in sizes}

    def at(term: str, shape: list[str]) -> str:
        return " + ".join(f"{index[c]} * {s}" for c, s in zip(term, _strides(shape))) or "0"

    # The row axis outermost, then the summed letters, then the output's in order (the last one
    # innermost: contiguous in the output and usually in the operands), accumulating into the zeroed
    # output: a sum over rows adds row after row, as NumPy's reduction along axis 0.
    summed = [c for c in sizes if c not in out_term]
    order = ([rows_letter] if rows_letter in sizes else []) + [c for c in summed if c != rows_letter] + \
        [c for c in out_term if c != rows_letter]
    opens, closes = _loops([sizes[c] for c in order], [index[c] for c in order])
    if row_bounds is not None and order and order[0] == rows_letter:
        i = index[rows_letter]
        opens[0] = f"for (int64_t {i} = {row_bounds[0]}; {i} < {row_bounds[1]}; {i}++) {{"
    product = " * ".join(f"{a}[{at(t, tr.full_shape(o))}]" for a, t, o in zip(args, terms, v.operands)) or "1"
    j = tr.fresh("i")
    tr.emit(f"for (int64_t {j} = 0; {j} < {tr.count(v)}; {j}++) {out}[{j}] = 0;",
            *opens, f"{out}[{at(out_term, tr.full_shape(v))}] += {product};", *closes)


def _einsum(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    inputs, out_term = (part.strip() for part in v.attr["spec"].split("->"))
    letter = "Z"
    terms = [(letter if o.type.domain is not Domain.PARAM else "") + t.strip()
             for t, o in zip(inputs.split(","), v.operands)]
    out_term = (letter if v.type.domain is not Domain.PARAM else "") + out_term
    if any(len(set(t)) != len(t) for t in terms) or letter in "".join(inputs):
        raise Unsupported("einsum with a repeated subscript")
    _einsum_loops(tr, v, out, args, terms, out_term, letter)


def _contract_rows(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    inputs, out_term = (part.strip() for part in v.attr["spec"].split("->"))
    terms = [t.strip() for t in inputs.split(",")]
    by_rows = [o.type.domain is not Domain.PARAM for o in v.operands]
    if any(len(set(t)) != len(t) for t in terms) or "Z" in inputs:
        raise Unsupported("contract_rows with a repeated subscript")
    distinct = list(dict.fromkeys(terms))
    if all(by_rows) and len(distinct) == 2 and not set(distinct[0]) & set(distinct[1]) \
            and out_term in (distinct[0] + distinct[1], distinct[1] + distinct[0]):
        # a sum over rows of outer products: a BLAS product of the (multiplied) row-flattened groups
        # per chunk of RC rows (the op's pieces), into a partial each; the partials then added in
        # chunk order, so the bits do not depend on how the chunks are split over threads
        first, second = distinct if out_term == distinct[0] + distinct[1] else distinct[::-1]
        rows = tr.rows(v.operands[0].type.space)
        chunks, c, start, stop = _open_row_chunks(tr, v, rows)
        groups = []
        for d in (first, second):
            members = [(a, o) for a, o, t in zip(args, v.operands, terms) if t == d]
            width = feature_width(tr.shape(members[0][1]))
            if len(members) == 1:
                groups.append((members[0][0], width))
                continue
            name = tr.allocate(f"{rows} * {width}")
            j = tr.fresh("i")
            product = " * ".join(f"{a}[{j}]" for a, _ in members)
            tr.emit(f"for (int64_t {j} = {start} * {width}; {j} < {stop} * {width}; {j}++) {name}[{j}] = {product};")
            groups.append((name, width))
        (a, p), (b, q) = groups
        partials = tr.allocate(f"{chunks} * {p * q}")
        tr.emit(f"mp_gemm(gemm, 1, 0, {p}, {q}, {stop} - {start}, {a} + {start} * {p}, {p}, {b} + {start} * {q}, {q}, "
                f"{partials} + {c} * {p * q}, {q}); }}")
        _add_partials(tr, out, partials, chunks, p * q)
        for name in [name for name, _ in groups] + [partials]:
            if name.startswith("S"):
                tr.release(name)
        return
    # the loop nest on each chunk of RC rows, into a partial each, added in chunk order
    letter = "Z"
    full_terms = [(letter if row else "") + t for t, row in zip(terms, by_rows)]
    rows = tr.rows(next(o for o, row in zip(v.operands, by_rows) if row).type.space)
    chunks, c, start, stop = _open_row_chunks(tr, v, rows)
    size = math.prod(tr.shape(v))
    partials = tr.allocate(f"{chunks} * {size}")
    _einsum_loops(tr, v, f"({partials} + {c} * {size})", args, full_terms, out_term, letter, (start, stop))
    tr.emit("}")
    _add_partials(tr, out, partials, chunks, size)
    tr.release(partials)


def _open_row_chunks(tr: _Translation, v: Value, rows: str) -> tuple[str, str, str, str]:
    """Opens the loop of a row contraction ``v`` over its chunks of RC of ``rows`` (split over the
    threads); the C names (chunk count, chunk, its first row, the row past its last). The caller
    emits the chunk's body and closes the loop."""
    chunks = f"(({rows}) + RC - 1) / RC"
    c, start, stop = tr.fresh("i"), tr.fresh("i"), tr.fresh("i")
    lo, hi = tr.row_range(chunks, f"{rows} * {sum(feature_width(tr.shape(o)) for o in v.operands)}")
    tr.emit(f"for (int64_t {c} = {lo}; {c} < {hi}; {c}++) {{",
            f"const int64_t {start} = {c} * RC, {stop} = {rows} - {start} < RC ? {rows} : {start} + RC;")
    return chunks, c, start, stop


def _add_partials(tr: _Translation, out: str, partials: str, chunks: str, size: int) -> None:
    """``out`` (``size`` elements) = the sum of the ``chunks`` partials, in chunk order (0 + the first
    + the second ...), run once the op's split part is done."""
    j, c = tr.fresh("i"), tr.fresh("i")
    tr.after = [f"for (int64_t {j} = 0; {j} < {size}; {j}++) {{ T acc = 0;",
                f"for (int64_t {c} = 0; {c} < {chunks}; {c}++) acc += {partials}[{c} * {size} + {j}];",
                f"{out}[{j}] = acc; }}"]


def _segment_reduce(tr: _Translation, out: str, x: str, indptr: str, perm: str, segments: str, width: int,
                    reduce: str, weights: str | None = None, read: str | None = None, groups: int = 1,
                    operand: Value | None = None) -> None:
    """out[s] = reduce over rows r in perm[indptr[s]:indptr[s+1]] of x[read[r] or r] (times
    weights[r], whose ``groups`` columns each scale width / groups consecutive features), in row
    order; an empty segment gives 0; mean: the sum times 1/count in double."""
    s, j, f, e = (tr.fresh("i") for _ in range(4))
    row = f"{read}[{e}]" if read else e
    weight = f"{weights}[{e}]" if groups == 1 else f"{weights}[{e} * {groups} + {f} / {width // groups}]"
    if operand is not None and id(operand) in tr.lazy:
        body: list[str] = []
        local = _read(tr, operand, x, [e, f] if operand.type.rank else [e], body)
        term = "({ " + " ".join(body) + f" {local}; }})"  # a statement expression (GNU C)
    else:
        term = f"{x}[{row} * {width} + {f}]"
    if weights:
        term = f"{weight} * {term}"
    lo, hi = tr.row_range(segments, _segment_work(tr, indptr, segments, width))
    tr.emit(f"for (int64_t {s} = {lo}; {s} < {hi}; {s}++) {{", f"T *o = {out} + {s} * {width};",
            f"const int64_t lo = {indptr}[{s}], hi = {indptr}[{s} + 1];")
    if reduce in ("sum", "mean"):
        tr.emit(f"for (int64_t {f} = 0; {f} < {width}; {f}++) o[{f}] = 0;",
                f"for (int64_t {j} = lo; {j} < hi; {j}++) {{ const int64_t {e} = {perm}[{j}];",
                f"for (int64_t {f} = 0; {f} < {width}; {f}++) o[{f}] += {term}; }}")
        if reduce == "mean":
            tr.emit("if (hi > lo) { const double scale = 1.0 / (double)(hi - lo);",
                    f"for (int64_t {f} = 0; {f} < {width}; {f}++) o[{f}] = (T)(o[{f}] * scale); }}")
    else:
        pick = "mp_max" if reduce == "max" else "mp_min"
        tr.emit(f"if (hi == lo) {{ for (int64_t {f} = 0; {f} < {width}; {f}++) o[{f}] = 0; }} else {{",
                f"{{ const int64_t {e} = {perm}[lo]; for (int64_t {f} = 0; {f} < {width}; {f}++) o[{f}] = {term}; }}",
                f"for (int64_t {j} = lo + 1; {j} < hi; {j}++) {{ const int64_t {e} = {perm}[{j}];",
                f"for (int64_t {f} = 0; {f} < {width}; {f}++) o[{f}] = {pick}(o[{f}], {term}); }} }}")
    tr.emit("}")


def _segment_work(tr: _Translation, indptr: str, segments: str, width: int) -> str:
    """A segment op's work: (its rows + its segments) x ``width``."""
    return f"({indptr}[{segments}] + {segments}) * {width}"


def _aggregate(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    by, edges, reduce = v.attr["by"], v.attr["edges"], v.attr["reduce"]
    if reduce not in ("sum", "mean", "max", "min", "std"):
        raise Unsupported(f"aggregate {reduce}")
    if reduce == "std":  # two passes, as the op-by-op rule: deviations from the group mean
        indptr, perm = tr.segments(by, edges)
        width = feature_width(tr.shape(v))
        x = args[0]
        s_, j, f = tr.fresh("i"), tr.fresh("i"), tr.fresh("i")
        segments = tr.rows(v.type.space)
        lo, hi = tr.row_range(segments, _segment_work(tr, indptr, segments, 2 * width))
        tr.emit(f"for (int64_t {s_} = {lo}; {s_} < {hi}; {s_}++) {{",
                f"T *o = {out} + {s_} * {width}; const int64_t lo = {indptr}[{s_}], hi = {indptr}[{s_} + 1];",
                "const T d = (T)(hi - lo > 1 ? hi - lo : 1);",
                f"for (int64_t {f} = 0; {f} < {width}; {f}++) {{ T mean = 0, acc = 0;",
                f"for (int64_t {j} = lo; {j} < hi; {j}++) mean += {x}[{perm}[{j}] * {width} + {f}];",
                "mean = mean / d;",
                f"for (int64_t {j} = lo; {j} < hi; {j}++) {{ const T c = {x}[{perm}[{j}] * {width} + {f}] - mean; "
                "acc += c * c; }",
                f"o[{f}] = sqrt(acc / d); }} }}")
        return
    if reduce == "mean":  # the op-by-op rule divides the sum by max(count, 1) in the value's dtype
        indptr, perm = tr.segments(by, edges)
        width = feature_width(tr.shape(v))
        _segment_reduce(tr, out, args[0], indptr, perm, tr.rows(v.type.space), width, "sum",
                        operand=v.operands[0])
        s, f = tr.fresh("i"), tr.fresh("i")
        lo, hi = tr.row_range(tr.rows(v.type.space), "0")  # the same pieces as the sum's
        tr.emit(f"for (int64_t {s} = {lo}; {s} < {hi}; {s}++) {{",
                f"const int64_t c = {indptr}[{s} + 1] - {indptr}[{s}]; const T d = (T)(c > 1 ? c : 1);",
                f"for (int64_t {f} = 0; {f} < {width}; {f}++) {out}[{s} * {width} + {f}] /= d; }}")
        return
    indptr, perm = tr.segments(by, edges)
    _segment_reduce(tr, out, args[0], indptr, perm, tr.rows(v.type.space), feature_width(tr.shape(v)), reduce,
                    operand=v.operands[0])


def _gspmm(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    by, edges, reduce = v.attr["by"], v.attr["edges"], v.attr["reduce"]
    if reduce not in ("sum", "mean", "max", "min"):
        raise Unsupported(f"gspmm {reduce}")
    weights = args[1] if len(args) > 1 else None
    width = feature_width(tr.shape(v))
    groups = feature_width(tr.shape(v.operands[1])) if weights is not None else 1
    if groups == 0 or width % groups:
        raise Unsupported("gspmm whose weights do not cover its features")
    indptr, perm = tr.segments(by, edges)
    read = tr.graph_index(edges, "dst" if by == "src" else "src")
    _segment_reduce(tr, out, args[0], indptr, perm, tr.rows(v.type.space), width, reduce, weights, read, groups)


def _softmax(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    """exp(x - the segment's max) / the segment's sum of it, per feature, the sum in row order."""
    by, edges = v.attr["by"], v.attr["edges"]
    indptr, perm = tr.segments(by, edges)
    segments = _segment_count(tr, v)
    width = feature_width(tr.shape(v))
    x = args[0]
    s_, j, f = tr.fresh("i"), tr.fresh("i"), tr.fresh("i")
    lo, hi = tr.row_range(segments, _segment_work(tr, indptr, segments, 3 * width))
    tr.emit(f"for (int64_t {s_} = {lo}; {s_} < {hi}; {s_}++) {{",
            f"const int64_t lo = {indptr}[{s_}], hi = {indptr}[{s_} + 1]; if (hi == lo) continue;",
            f"for (int64_t {f} = 0; {f} < {width}; {f}++) {{",
            f"T m = {x}[{perm}[lo] * {width} + {f}], total = 0;",
            f"for (int64_t {j} = lo + 1; {j} < hi; {j}++) m = mp_max(m, {x}[{perm}[{j}] * {width} + {f}]);",
            f"for (int64_t {j} = lo; {j} < hi; {j}++) {{ const int64_t r = {perm}[{j}] * {width} + {f}; "
            f"{out}[r] = exp({x}[r] - m); total += {out}[r]; }}",
            f"for (int64_t {j} = lo; {j} < hi; {j}++) {out}[{perm}[{j}] * {width} + {f}] /= total; }} }}")


def _segment_count(tr: _Translation, v: Value) -> str:
    """The number of segments of a softmax by dst / src (nodes) or by graph (graphs)."""
    domain = Domain.GRAPH if v.attr["by"] == "graph" else Domain.NODE
    return tr.rows(Space(domain, ""))


def _axis_softmax(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    """SciPy's softmax along a feature axis: exp(x - max) / the sum of it."""
    axis = array_axis(v, v.attr["axis"])
    shape = tr.full_shape(v)
    before, size, after = shape[:axis], shape[axis], shape[axis + 1:]
    outer = " * ".join(["(int64_t)1"] + before)
    inner = " * ".join(["(int64_t)1"] + after)
    p, q, j = tr.fresh("i"), tr.fresh("i"), tr.fresh("i")
    at = f"({p} * {size} + {j}) * ({inner}) + {q}"
    tr.emit(f"for (int64_t {p} = 0; {p} < {outer}; {p}++) for (int64_t {q} = 0; {q} < {inner}; {q}++) {{",
            f"if ({size} == 0) continue; T m = -(T)INFINITY, total = 0;",
            f"for (int64_t {j} = 0; {j} < {size}; {j}++) m = mp_max(m, {args[0]}[{at}]);",
            f"for (int64_t {j} = 0; {j} < {size}; {j}++) {{ {out}[{at}] = exp({args[0]}[{at}] - m); "
            f"total += {out}[{at}]; }}",
            f"for (int64_t {j} = 0; {j} < {size}; {j}++) {out}[{at}] /= total; }}")


def _dropout(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    """The identity in eval form (and with p = 0); in training form it draws NumPy's random numbers."""
    if tr.training and v.attr["p"] != 0:
        raise Unsupported("dropout in training: draws random numbers (NumPy's generator)")
    _copy(tr, v, out, args)


def _batch_norm(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    """The eval form: (x - running mean) / sqrt(running var + eps) * gamma + beta; the training form
    takes batch statistics and updates the running ones (a side result)."""
    if batch_norm_training(v, tr.training):
        raise Unsupported("batch_norm in training: updates its running statistics as a side result")
    shape = tr.full_shape(v)
    indices = [tr.fresh("i") for _ in shape]
    body: list[str] = []
    x, mean, var, gamma, beta = (_read(tr, o, a, indices, body, _broadcast_index(tr, o, v, indices))
                                 for a, o in zip(args, v.operands))
    eps = _literal(v.attr["eps"])
    opens, closes = _loops(shape, indices)
    flat = " + ".join(f"{i} * {s}" for i, s in zip(indices, _strides(shape))) or "0"
    tr.emit(*opens, *body, f"{out}[{flat}] = ({x} - {mean}) * ((T)1 / sqrt({var} + {eps})) * {gamma} + {beta};",
            *closes)


def _degree(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    """Each node's count of edges of the set into it ("in") or out of it ("out"), multi-edges counted."""
    edges = v.attr["edges"]
    ids = tr.graph_index(edges, "dst" if v.attr["dir"] == "in" else "src")
    i, e = tr.fresh("i"), tr.fresh("i")
    tr.emit(f"for (int64_t {i} = 0; {i} < {tr.rows(v.type.space)}; {i}++) {out}[{i}] = 0;",
            f"for (int64_t {e} = 0; {e} < {tr.rows(Space(Domain.EDGE, edges))}; {e}++) {out}[{ids}[{e}]] += 1;")


def _gather(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    index = tr.graph_index(v.attr["edges"], v.attr["index"])
    width = feature_width(tr.shape(v))
    r, f = tr.fresh("i"), tr.fresh("i")
    lo, hi = tr.row_range(tr.rows(v.type.space), tr.count(v))
    tr.emit(f"for (int64_t {r} = {lo}; {r} < {hi}; {r}++) {{",
            f"const T *src = {args[0]} + {index}[{r}] * {width};",
            f"for (int64_t {f} = 0; {f} < {width}; {f}++) {out}[{r} * {width} + {f}] = src[{f}]; }}")


def _copy(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    """reshape: the same elements in the same order."""
    j = tr.fresh("i")
    tr.emit(f"for (int64_t {j} = 0; {j} < {tr.count(v)}; {j}++) {out}[{j}] = {args[0]}[{j}];")


def _broadcast(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    o = v.operands[0]
    shape = tr.full_shape(v)
    if v.type.domain is Domain.PARAM:
        src_shape = tr.full_shape(o) + ["1"] * (len(shape) - len(tr.full_shape(o)))
    else:
        src_shape = _expanded(tr, o, v)
    indices = [tr.fresh("i") for _ in shape]
    strides = _strides(src_shape)
    src = " + ".join(f"{i} * {s}" for i, s, d in zip(indices, strides, src_shape) if d != "1") or "0"
    opens, closes = _loops(shape, indices)
    flat = " + ".join(f"{i} * {s}" for i, s in zip(indices, _strides(shape))) or "0"
    tr.emit(*opens, f"{out}[{flat}] = {args[0]}[{src}];", *closes)


def _strided_copy(tr: _Translation, v: Value, out: str, src: str, src_shape: list[str], axis: int,
                  offset: str, out_offset: str = "0", shape: list[str] | None = None) -> None:
    """out[... i_axis + out_offset ...] = src[... i_axis + offset ...] over ``shape`` (default: src's)."""
    shape = shape if shape is not None else src_shape
    out_shape = tr.full_shape(v)
    indices = [tr.fresh("i") for _ in shape]
    src_at = " + ".join(f"({i}{' + ' + offset if k == axis else ''}) * {s}"
                        for k, (i, s) in enumerate(zip(indices, _strides(src_shape)))) or "0"
    out_at = " + ".join(f"({i}{' + ' + out_offset if k == axis else ''}) * {s}"
                        for k, (i, s) in enumerate(zip(indices, _strides(out_shape)))) or "0"
    opens, closes = _loops(shape, indices)
    tr.emit(*opens, f"{out}[{out_at}] = {src}[{src_at}];", *closes)


def _select(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    """x[index] (a param) or x[:, index] (rows): the block of the index on the first feature axis."""
    o = v.operands[0]
    size = tr.shape(o)[0]
    rest = feature_width(tr.shape(o)[1:])
    index = v.attr["index"] % size
    rows = "1" if o.type.domain is Domain.PARAM else tr.rows(o.type.space)
    r, f = tr.fresh("i"), tr.fresh("i")
    tr.emit(f"for (int64_t {r} = 0; {r} < {rows}; {r}++) for (int64_t {f} = 0; {f} < {rest}; {f}++) "
            f"{out}[{r} * {rest} + {f}] = {args[0]}[({r} * {size} + {index}) * {rest} + {f}];")


def _slice(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    axis = array_axis(v, v.attr["axis"])
    src_shape = tr.full_shape(v.operands[0])
    shape = list(src_shape)
    shape[axis] = str(int(v.attr["stop"]) - int(v.attr["start"]))
    _strided_copy(tr, v, out, args[0], src_shape, axis, str(v.attr["start"]), shape=shape)


def _pad(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    j = tr.fresh("i")
    tr.emit(f"for (int64_t {j} = 0; {j} < {tr.count(v)}; {j}++) {out}[{j}] = 0;")
    axis = array_axis(v, v.attr["axis"])
    _strided_copy(tr, v, out, args[0], tr.full_shape(v.operands[0]), axis, "0", str(v.attr["before"]))


def _concat(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    axis = array_axis(v, v.attr["axis"])
    offset = 0
    for a, o in zip(args, v.operands):
        shape = tr.full_shape(o)
        _strided_copy(tr, v, out, a, shape, axis, "0", str(offset))
        offset += int(shape[axis])


def _reduce(tr: _Translation, v: Value, out: str, args: list[str]) -> None:
    reduce = v.attr["reduce"]
    axis = array_axis(v, v.attr["axis"])
    src_shape = tr.full_shape(v.operands[0])
    before, size, after = src_shape[:axis], src_shape[axis], src_shape[axis + 1:]
    outer = " * ".join(["(int64_t)1"] + before)
    inner = " * ".join(["(int64_t)1"] + after)
    p, q, j = tr.fresh("i"), tr.fresh("i"), tr.fresh("i")
    x = args[0]
    read = f"{x}[({p} * {size} + {j}) * ({inner}) + {q}]"
    tr.emit(f"for (int64_t {p} = 0; {p} < {outer}; {p}++) for (int64_t {q} = 0; {q} < {inner}; {q}++) {{")
    if reduce in ("sum", "mean"):
        tr.emit("T acc = 0;", f"for (int64_t {j} = 0; {j} < {size}; {j}++) acc += {read};")
        if reduce == "mean":
            tr.emit(f"acc = {size} ? acc / (T){size} : 0;")
    else:
        pick = "mp_max" if reduce == "max" else "mp_min"
        tr.emit(f"T acc = 0; if ({size}) {{ int64_t {j} = 0; acc = {read};",
                f"for ({j} = 1; {j} < {size}; {j}++) acc = {pick}(acc, {read}); }}")
    tr.emit(f"{out}[{p} * ({inner}) + {q}] = acc;", "}")


C_RULES: dict[str, Callable[[_Translation, Value, str, list[str]], None]] = {
    **{op: _elementwise for op in COMPUTED_OPS},
    "matmul": _matmul, "einsum": _einsum, "contract_rows": _contract_rows, "aggregate": _aggregate,
    "gspmm": _gspmm, "gather": _gather, "degree": _degree, "reshape": _copy, "broadcast": _broadcast, "select": _select,
    "slice": _slice, "pad": _pad, "concat": _concat, "reduce": _reduce, "softmax": _softmax,
    "axis_softmax": _axis_softmax, "dropout": _dropout, "batch_norm": _batch_norm,
}


# ---- building and loading ----------------------------------------------------------------------------

def _compiler() -> str | None:
    for name in (os.environ.get("CC", ""), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.cache
def _openblas() -> ctypes.CDLL | None:
    """The OpenBLAS of the ``scipy-openblas32`` wheel (a dependency), held to one thread: products run
    inside the programs' own split of rows. None where that wheel is not installed. It is a newer
    OpenBLAS than SciPy's own (0.3.30 in SciPy 1.17): there a 64 x 64 sum over 100k rows (a weight
    gradient) took 1.3x as long on AVX2 (Zen 3; interleaved medians 38.9 against 29.8 ms)."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    library = ctypes.CDLL(os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True)))
    set_threads = library.scipy_openblas_set_num_threads
    set_threads.restype, set_threads.argtypes = None, [ctypes.c_int]
    set_threads(1)
    return library


@functools.cache
def _blas_pointer(float_dtype: np.dtype) -> int:
    """The address of ``sgemm`` / ``dgemm`` (Fortran interface, 32-bit ints): ``_openblas``'s, else the
    one SciPy ships."""
    single = np.dtype(float_dtype) == np.float32
    library = _openblas()
    if library is not None:
        return _function_address(library, "scipy_sgemm_" if single else "scipy_dgemm_")
    from scipy.linalg import cython_blas
    capsule = cython_blas.__pyx_capi__["sgemm" if single else "dgemm"]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return int(get_pointer(capsule, get_name(capsule)))


def _torch_mkl() -> ctypes.CDLL | None:
    """The MKL inside torch's x86 wheels (``libtorch_cpu`` exports its Fortran BLAS and
    ``mkl_set_num_threads_local``) when torch is already imported, else None (torch is not imported
    for it). On AVX2 (Zen 3) its ``sgemm`` ran a 64 x 64 sum over 100k rows, a weight gradient, in
    0.75x of OpenBLAS 0.3.34's time (interleaved medians 18.3 against 24.9 ms) and the other forms
    no faster (20-26 against 19-23 ms), so it runs the sums only: torch's own steps take the same."""
    torch_file = getattr(sys.modules.get("torch"), "__file__", None)
    if not torch_file:
        return None
    try:
        library = ctypes.CDLL(os.path.join(os.path.dirname(torch_file), "lib", "libtorch_cpu.so"),
                              mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except OSError:
        return None
    return library if all(hasattr(library, name) for name in ("sgemm_", "dgemm_", "mkl_set_num_threads_local")) \
        else None


def _function_address(library: ctypes.CDLL | None, name: str) -> int:
    """The address of the function ``name`` of ``library`` (0 without a library)."""
    return 0 if library is None else int(ctypes.cast(getattr(library, name), ctypes.c_void_p).value or 0)


@functools.cache
def product_pointer(float_dtype: np.dtype, tiled: bool | None = None, torch_sums: bool | None = None) -> int:
    """The address of the products library's ``mp_product`` for ``float_dtype`` (float32 or float64:
    ``mp_product(ta, tb, m, n, k, a, lda, b, ldb, c, ldc)``, row-major C = op(A) op(B)); built on
    first use (raises ``Unsupported`` when it cannot be). ``tiled``: force the register tiles on or
    off (tests; None: the machine's choice, ``MP_TILED``). ``torch_sums``: whether sums over rows that
    BLAS runs take torch's MKL (``_torch_mkl``; tests; None: where torch is imported by the first call,
    so a process keeps one choice). ctypes never unloads a library, so the address stays valid."""
    float_dtype = np.dtype(float_dtype)
    ctype = "float" if float_dtype == np.float32 else "double"
    mkl = _torch_mkl() if torch_sums is not False else None
    if torch_sums and mkl is None:
        raise Unsupported("torch's MKL is not loaded (torch is not imported, or its build has no MKL)")
    choice = "" if tiled is None else f"#define MP_TILED {int(tiled)}\n"
    choice += f"#define MP_TORCH_SUMS {int(mkl is not None)}\n"
    library = _library(f"typedef {ctype} T;\n{choice}{PRODUCTS}")
    library.mp_set_blas.restype, library.mp_set_blas.argtypes = None, [ctypes.c_void_p] * 3
    library.mp_set_blas(_blas_pointer(float_dtype), _function_address(mkl, "sgemm_" if ctype == "float" else "dgemm_"),
                        _function_address(mkl, "mkl_set_num_threads_local"))
    return _function_address(library, "mp_product")


@functools.cache
def _compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]


@functools.cache
def _cpu_features() -> str:
    """The CPU's feature flags (``-march=native`` builds for them: a cache folder shared between
    machines must not hand one machine's library to another CPU)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_BUILD_LOCK = threading.Lock()


def _library(source: str, libraries: tuple[str, ...] = ("-lm",)) -> ctypes.CDLL:
    """The shared library built from ``source`` (cached on disk by the hash of the source, the
    compiler, the flags and the CPU's features)."""
    cc = _compiler()
    if cc is None:
        raise Unsupported("no C compiler found (set CC)")
    key = "\0".join([source, cc, _compiler_version(cc), _cpu_features(), *FLAGS, *libraries])
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    folder = CACHE_DIR or tempfile.gettempdir()
    library = os.path.join(folder, f"mp_{digest}.so")
    with _BUILD_LOCK:
        if not os.path.exists(library):
            with tempfile.TemporaryDirectory(dir=folder) as work:
                c_file = os.path.join(work, "program.c")
                with open(c_file, "w") as f:
                    f.write(source)
                built = os.path.join(work, "program.so")
                result = subprocess.run([cc, *FLAGS, c_file, "-o", built, *libraries], capture_output=True,
                                        text=True, check=False)
                if result.returncode != 0:
                    raise Unsupported(f"the C compiler failed: {result.stderr.strip().splitlines()[:3]}")
                os.replace(built, library)  # atomic: a concurrent process sees a whole library or none
        return ctypes.CDLL(library)


@functools.cache
def _runtime() -> tuple[ctypes.CDLL | None, int]:
    """The runtime library and the address of its ``mp_parallel`` (0 where it cannot be built:
    programs then run on the calling thread)."""
    try:
        library = _library(RUNTIME, ("-pthread",))
    except Unsupported:
        return None, 0
    library.mp_wake.restype, library.mp_wake.argtypes = None, []
    library.mp_set_spin.restype, library.mp_set_spin.argtypes = None, [ctypes.c_int64]
    library.mp_set_spin(int(SPIN_SECONDS * 1e9))
    return library, _function_address(library, "mp_parallel")


def wake_workers() -> None:
    """Have the runtime's sleeping workers spin again (a run about to call a program does this
    first, so that its first split op does not wait for a worker to wake)."""
    library = _runtime()[0]
    if library is not None and THREADS > 1:
        library.mp_wake()


SETTINGS = 3  # the run's settings before the row counts of ``R`` (see ``PRELUDE``)


def _settings(threads: int, chunk: int, rows: list[int]) -> np.ndarray:
    """A call's settings and row counts; the C functions' ``R`` is ``_row_counts`` of it."""
    return np.array([threads, SPLIT_WORK, chunk, *rows], dtype=np.int64)


def _row_counts(settings: np.ndarray) -> int:
    """The address of the row counts in ``settings``."""
    return settings.ctypes.data + SETTINGS * settings.itemsize


def _build(source: str) -> tuple[Callable, Callable]:
    """The ``mp_program`` and ``mp_workspace`` functions of the library built from ``source``."""
    loaded = _library(source)
    function, workspace = loaded.mp_program, loaded.mp_workspace
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 6
    workspace.restype = ctypes.c_int64
    workspace.argtypes = [ctypes.c_void_p]
    return function, workspace


@dataclass
class CompiledProgram:
    """One program as a C function, with what it reads (``externals``), the row spaces of its
    ``R`` array and its output values."""

    program: Program
    source: str
    function: Callable
    workspace_size: Callable
    externals: list[External]
    spaces: list[Space]
    outputs: list[Value]
    gemm: int
    float_dtype: np.dtype
    output_layout: list[tuple[int, tuple[int, ...]]]  # per output: its row space's index (-1: a param), shape
    _workspace: np.ndarray | None = None  # the intermediate values' memory, kept between runs
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread_workspaces: threading.local = field(default_factory=threading.local)  # ``run_rows``' own

    def __post_init__(self) -> None:
        self._sources = {id(v): v for v in self.program.values if v.op in SOURCE_OPS}
        # per external: (a weak reference to the array last read, its shape, its address); an array
        # that is still the same object of the same shape is at the same address
        self._addresses: list[tuple[Any, tuple[int, ...], int] | None] = [None] * len(self.externals)
        slot = {id(v): i for i, v in enumerate(self.outputs)}
        self._output_slots = [(name, slot[id(v)]) for name, v in self.program.outputs]
        self._pointer_type = ctypes.c_void_p * max(1, len(self.externals))
        self._out_type = ctypes.c_void_p * max(1, len(self.outputs))

    def run(self, ctx, source_values: Callable[[Value], np.ndarray]) -> dict[str, np.ndarray]:
        """The program's outputs on the run context ``ctx`` (an ``ExecContext``); ``source_values(v)``
        computes a source value by its NumPy rule."""
        wake_workers()
        dtype = self.float_dtype
        keep: list[np.ndarray] = []  # alive until the call returns
        addresses = []
        known = self._addresses
        for i, ext in enumerate(self.externals):
            array = self._resolve(ctx, ext, self._sources, source_values)
            keep.append(array)
            seen = known[i]
            if seen is not None and seen[0]() is array and seen[1] == array.shape:
                addresses.append(seen[2])
            else:
                address = array.ctypes.data
                known[i] = (weakref.ref(array), array.shape, address)
                addresses.append(address)
        pointers = self._pointer_type(*addresses)
        rows = [space_rows(ctx.graph, self.program, s) for s in self.spaces]
        settings = _settings(THREADS, CHUNK_ROWS, rows)
        row_address = _row_counts(settings)
        # the outputs: views of one block of the backend's pool (no fresh pages per run), each on a
        # 64-byte line
        shapes = [shape if space < 0 else (rows[space],) + shape for space, shape in self.output_layout]
        line = 64 // dtype.itemsize
        counts = [math.prod(shape) for shape in shapes]
        block = ctx.empty((sum(-(-c // line) * line for c in counts) + line,), dtype)
        base = block.ctypes.data
        offset = (-base % 64) // dtype.itemsize
        results, out_addresses = [], []
        for shape, count in zip(shapes, counts):
            results.append(block[offset:offset + count].reshape(shape))
            out_addresses.append(base + offset * dtype.itemsize)
            offset += -(-count // line) * line
        size = int(self.workspace_size(row_address)) + line  # room to start on a 64-byte line
        shared = self._lock.acquire(blocking=False)  # a concurrent run of the same program gets its own
        try:
            if not shared:
                workspace = np.empty(size, dtype=dtype)
            else:
                if self._workspace is None or len(self._workspace) < size:
                    self._workspace = np.empty(size, dtype=dtype)
                workspace = self._workspace
            start = workspace.ctypes.data
            self.function(pointers, self._out_type(*out_addresses), row_address, start + (-start % 64),
                          self.gemm, _runtime()[1])
        finally:
            if shared:
                self._lock.release()
        return {name: results[k] for name, k in self._output_slots}

    def run_rows(self, addresses: list[int], rows: list[int], out_addresses: list[int]) -> None:
        """One call on arrays given by address: ``addresses`` in ``externals`` order (C-contiguous, the
        run's dtype; index arrays int64), ``rows`` the row count of each of ``spaces``, the results
        written at ``out_addresses`` (contiguous, in ``outputs`` order). The caller keeps the arrays
        alive. Safe to call from several threads at once: each thread has a workspace of its own.
        A row group's compiled blocks run this way (``NumpyBackend._run_group``)."""
        settings = _settings(1, WHOLE_ROWS, rows)
        row_address = _row_counts(settings)
        size = int(self.workspace_size(row_address)) + 64 // self.float_dtype.itemsize
        workspace = getattr(self._thread_workspaces, "array", None)
        if workspace is None or len(workspace) < size:
            workspace = self._thread_workspaces.array = np.empty(size, dtype=self.float_dtype)
        start = workspace.ctypes.data
        self.function(self._pointer_type(*addresses), self._out_type(*out_addresses), row_address,
                      start + (-start % 64), self.gemm, None)

    def index_array(self, graph, ext: External) -> np.ndarray:
        """The int64 ids an "index" external reads on ``graph`` (kept on the graph)."""
        edges, index = ext.key
        g = edge_graph(graph, self.program, edges)
        return g.cached(("c_programs.index", index),
                        lambda: np.ascontiguousarray(gather_index(g, index), dtype=np.int64))

    def _contiguous(self, a) -> np.ndarray:
        """``a`` itself when it is a C-contiguous array of the run's dtype (a 0-d one too, which
        ``np.ascontiguousarray`` would copy), else a converted copy."""
        if isinstance(a, np.ndarray) and a.dtype == self.float_dtype and a.flags.c_contiguous:
            return a
        return np.ascontiguousarray(a, dtype=self.float_dtype)

    def _resolve(self, ctx, ext: External, sources: dict, source_values) -> np.ndarray:
        if ext.kind == "input":
            return self._contiguous(ctx.inputs[ext.key[0]])
        if ext.kind == "param":
            return self._contiguous(ctx.params[ext.key[0]])
        if ext.kind == "source":
            return self._contiguous(source_values(sources[ext.key[0]]))
        return self.index_array(ctx.graph, ext)  # "index"


def translate(program: Program, dims: dict[str, int], training: bool = False) -> _Translation:
    """The C translation of ``program`` with ``dims`` (raises ``Unsupported`` naming the first op
    without a C form)."""
    tr = _Translation(program, dims, training)
    tr.body = tr.translate()
    return tr


def compile_program(program: Program, dims: dict[str, int], float_dtype: np.dtype,
                    training: bool = False) -> CompiledProgram:
    """``program`` as a C function for runs in ``training`` or eval form (raises ``Unsupported`` with
    the reason when it has none)."""
    tr = translate(program, dims, training)
    ctype = "float" if float_dtype == np.float32 else "double"
    source = f"typedef {ctype} T;\n{PRELUDE}\n{tr.body}\n"
    function, workspace = _build(source)
    layout = [(-1 if v.type.domain is Domain.PARAM else tr.spaces.index(v.type.space), tr.shape(v))
              for v in tr.output_values]
    return CompiledProgram(program, source, function, workspace, tr.externals, tr.spaces, tr.output_values,
                           product_pointer(float_dtype), np.dtype(float_dtype), layout)


__all__ = [
    "CACHE_DIR",
    "C_RULES",
    "C_UNSUPPORTED",
    "SMALL_ROWS",
    "SOURCE_OPS",
    "CompiledProgram",
    "Unsupported",
    "compile_program",
    "enabled",
    "translate",
]
