"""The NumPy backend's compiled-program tier (``backends/c_programs.py``) against op-by-op runs.

* every op and attribute value (``op_samples``): its one-op program compiles and equals the op-by-op
  run (float64, rtol 1e-10, also on an empty graph), or the translation refuses it with the reason
  ``C_UNSUPPORTED`` gives: no op is left without a decision;
* every example: the optimized training programs (train-forward with its residuals, then the
  backward) run as C functions give the unfused gradient program's outputs and gradients on
  hypothesis graphs (empty, isolated nodes, self loops, multi-edges, a hub) and on a fixed batch;
  the molecule models and the message-passing examples named in ``COMPILED`` must compile;
* the tier in use: it runs from a program's first run on a small graph, stays off on large ones, with
  ``MPDSL_C_PROGRAMS=0`` and without a C compiler, and a torch module trains GINE on molecules with
  the same loss curve with and without it;
* the cache: a second build of the same source loads the library the first one wrote.

The rest of the suite runs with the tier off (``conftest.py``), so that its differential tests
compare the op-by-op rules; this file turns it on for its own backends.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

from model_inputs import synth_inputs
from op_samples import SAMPLES
from strategies import graphs
from test_fused_backward import TrainingCase
from test_op_table import CASES, GRAPH, case_id, sample_data, sample_program
from test_passes import EXAMPLES, assert_same, random_graph

import mpdsl
from mpdsl.backends import c_programs
from mpdsl.backends.numpy_backend import NumpyBackend
from mpdsl.ops import OPS

ROOT = Path(__file__).resolve().parents[1]
def _gine3() -> Path:
    """The molecule benchmark's GINE x 3 (``benchmarks/models/gine3.mp``, which needs ``dim K``)."""
    path = Path(tempfile.mkdtemp(prefix="mpdsl-c-programs-")) / "gine3.mp"
    path.write_text("dim K = 16\n" + (ROOT / "benchmarks" / "models" / "gine3.mp").read_text())
    return path


MODELS = EXAMPLES + [_gine3()]
# Examples whose forward, train-forward and backward programs must all run as C functions.
COMPILED = {"gated_gcn", "gcn", "gcn_self_loops", "gin", "gine", "gine3", "link_pairs", "link_sage", "meshgraphnets",
            "mixhop", "mpnn", "mpnn_virtual_node", "pna", "sage_mean", "schnet_bessel", "tgn_embedding"}
# Ops whose training form has no C rule (their eval form has one).
TRAINING_FORMS = {"batch_norm": "batch_norm in training", "dropout": "dropout in training"}
pytestmark = pytest.mark.skipif(c_programs._compiler() is None, reason="no C compiler")


def compiled_backend() -> NumpyBackend:
    """A NumPy backend with the tier on."""
    return NumpyBackend(compiled_programs=True)


def refusal(program, dims=None) -> str | None:
    try:
        c_programs.translate(program, dims or {})
    except c_programs.Unsupported as e:
        return str(e)
    return None


# ---- every op -----------------------------------------------------------------------------------------

def test_every_op_has_a_c_rule_or_a_stated_reason():
    decided = set(c_programs.C_RULES) | set(c_programs.C_UNSUPPORTED) | set(c_programs.SOURCE_OPS) | {"input", "param"}
    assert sorted(set(OPS) - decided) == [], "give the op a C rule in C_RULES or its reason in C_UNSUPPORTED"
    assert not set(c_programs.C_RULES) & set(c_programs.C_UNSUPPORTED)


@pytest.mark.parametrize("case", [c for c in CASES if SAMPLES.get(c[0])], ids=case_id)
def test_every_op_and_attribute_value_compiles_and_agrees_or_is_refused(case):
    name, attrs = case
    program = sample_program(name, attrs)
    reason = refusal(program)
    if reason is not None:
        assert name in c_programs.C_UNSUPPORTED or reason.startswith(TRAINING_FORMS.get(name, "-")) \
            or "int values" in reason, reason
        return
    inputs, params = sample_data(program)
    reference = NumpyBackend(compiled_programs=False)
    backend = compiled_backend()
    empty = mpdsl.Graph.from_arrays(np.zeros((2, 0), np.int64), 0)
    for graph in (GRAPH, empty):
        data = inputs if graph is GRAPH else \
            {k: np.resize(v, (empty_rows(program, graph, k),) + v.shape[1:]) for k, v in inputs.items()}
        want = reference.run(program, graph, data, params, {})
        got = backend.run(program, graph, data, params, {})
        assert "compiled program" in backend.last_op_seconds
        assert_same(want, got, f"{name} {attrs}")


def program_input(program, name):
    return next(v for v in program.inputs if v.attr["name"] == name)


def empty_rows(program, graph, name) -> int:
    from mpdsl.plan import space_rows
    return space_rows(program, graph)[program_input(program, name).type.space]


def test_refusals_name_the_op_and_why():
    program = sample_program("dropout", {"p": 0.5})
    assert refusal(program) is None  # eval form: the identity
    with pytest.raises(c_programs.Unsupported, match="dropout in training: draws random numbers"):
        c_programs.translate(program, {}, training=True)
    program = sample_program("attention", {"by": "dst", "layout": "auto", "edges": ""})
    assert refusal(program) == f"attention: {c_programs.C_UNSUPPORTED['attention']}"


# ---- every example ------------------------------------------------------------------------------------

@functools.cache
def training_case(path: Path) -> TrainingCase:
    return TrainingCase(path)


def compiles(case: TrainingCase) -> list[str]:
    """The refusals of the case's three programs (empty: all compile)."""
    programs = (case.programs.forward, case.programs.train_forward, case.programs.backward)
    return [r for r in (refusal(p, case.dims) for p in programs) if r is not None]


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_the_named_models_compile(path):
    reasons = compiles(training_case(path))
    if path.stem in COMPILED:
        assert reasons == []


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
@settings(max_examples=5, deadline=None)
@given(graph=graphs(max_nodes=10, max_edges=30, features=1), seed=st.integers(0, 2**16))
def test_compiled_training_programs_equal_the_unfused_gradient(path, graph, seed):
    case = training_case(path)
    if compiles(case):
        return
    backend = compiled_backend()
    case.check(graph, seed, backend=backend)
    assert "compiled program" in backend.last_op_seconds


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_compiled_training_programs_on_a_batch_with_a_hub(path):
    case = training_case(path)
    if compiles(case):
        return
    backend = compiled_backend()
    case.check(random_graph(5, nodes=14, edges=50, self_loops=True), seed=5, backend=backend)
    assert "compiled program" in backend.last_op_seconds


# ---- ops split over the runtime's threads -------------------------------------------------------------

def split_everything(monkeypatch, threads: int) -> None:
    """Every op with rows split (no least work), products and row contractions in chunks of 3 rows."""
    monkeypatch.setattr(c_programs, "SPLIT_WORK", 0)
    monkeypatch.setattr(c_programs, "CHUNK_ROWS", 3)
    monkeypatch.setattr(c_programs, "THREADS", threads)


@pytest.mark.parametrize("path", [p for p in MODELS if p.stem in COMPILED], ids=lambda p: p.stem)
def test_split_ops_give_the_same_bits_on_any_thread_count_and_the_unfused_gradient(path, monkeypatch):
    case = training_case(path)
    graph = random_graph(5, nodes=23, edges=70, self_loops=True)
    runs = []
    for threads in (1, 2, 3):
        split_everything(monkeypatch, threads)
        backend = compiled_backend()
        runs.append(case.run(*case.arguments(graph, 3), backend))
        assert "compiled program" in backend.last_op_seconds
    for other in runs[1:]:
        assert other.keys() == runs[0].keys()
        for name in runs[0]:
            assert np.array_equal(other[name], runs[0][name], equal_nan=True), name
    split_everything(monkeypatch, 2)
    case.check(graph, seed=5, backend=compiled_backend())
    case.check(random_graph(1, nodes=0, edges=0), seed=1, backend=compiled_backend())


def test_a_split_program_runs_its_ops_in_pieces_over_the_threads(monkeypatch):
    split_everything(monkeypatch, 2)
    tr = c_programs.translate(sample_program("relu", {}), {})
    assert "mp_split(par, " in tr.body
    monkeypatch.setattr(c_programs, "SPLIT_WORK", 1 << 60)  # nothing large enough: one piece
    model = gcn_model()
    model.backend.compiled_programs = True
    graph = random_graph(2, nodes=40, edges=120)
    x = np.random.default_rng(0).normal(size=(graph.num_nodes, 8))
    whole = model.run(graph, x=x)
    monkeypatch.setattr(c_programs, "SPLIT_WORK", 0)
    for name, value in model.run(graph, x=x).items():
        assert np.array_equal(value, whole[name]), name


def runtime_calls(n: int, grain: int, threads: int) -> list[tuple[int, int, int]]:
    """The pieces (lo, hi, thread id) that ``mp_parallel`` gives a task over [0, n)."""
    import ctypes
    import threading
    library, parallel = c_programs._runtime()
    assert parallel, "the runtime did not build"
    pieces: list[tuple[int, int, int]] = []
    task_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)

    @task_type
    def task(ctx, lo, hi):
        pieces.append((lo, hi, threading.get_native_id()))

    run = ctypes.CFUNCTYPE(None, task_type, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64)(parallel)
    run(task, None, n, grain, threads)
    return sorted(pieces)


@pytest.mark.parametrize("n,grain,threads", [(10, 1, 2), (1000, 256, 2), (7, 3, 3), (5, 1, 8), (300, 256, 2)])
def test_the_runtime_covers_the_range_in_grain_aligned_pieces_one_on_the_calling_thread(n, grain, threads):
    import threading
    pieces = runtime_calls(n, grain, threads)
    assert [lo for lo, _, _ in pieces][0] == 0 and pieces[-1][1] == n
    for (_, hi, _), (lo, _, _) in zip(pieces, pieces[1:]):
        assert hi == lo  # contiguous, no overlap
    assert all(lo % grain == 0 and lo < hi for lo, hi, _ in pieces)
    assert len(pieces) <= threads
    assert pieces[0][2] == threading.get_native_id()
    if n >= 2 * grain:
        assert len({tid for _, _, tid in pieces}) == len(pieces) > 1


def test_the_runtime_works_in_a_forked_child():
    import multiprocessing
    runtime_calls(100, 1, 2)  # the parent's workers exist
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        pieces = pool.apply_async(runtime_calls, (100, 1, 2)).get(timeout=60)
    assert pieces[0][0] == 0 and pieces[-1][1] == 100 and len(pieces) == 2


# ---- the products ------------------------------------------------------------------------------------

@functools.cache
def library_product(dtype: str, tiled: bool | None = None, torch_sums: bool | None = None):
    """The products library's ``mp_product`` as a ctypes function (``product(ta, tb, m, n, k, a, lda,
    b, ldb, c, ldc)``: row-major C = op(A) op(B)); ``tiled``: the register tiles forced on or off;
    ``torch_sums``: the sums over rows through torch's MKL (skips where torch has none)."""
    import ctypes
    if torch_sums:
        import torch  # noqa: F401  (loads the MKL)
        if c_programs._torch_mkl() is None:
            pytest.skip("this torch build has no MKL")
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    signature = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, i64, i64, i64, pointer, i64, pointer, i64, pointer, i64)
    return signature(c_programs.product_pointer(np.dtype(dtype), tiled, torch_sums))


# m, n, k: every row-tile remainder, widths of 1 to 33 vectors and one that is not a whole vector
# (BLAS), sums across the transposed form's 64-row blocks, one wider than the tiles take (BLAS)
PRODUCT_SHAPES = [(1, 16, 1), (5, 64, 7), (7, 64, 64), (11, 48, 3), (23, 32, 65), (25, 16, 130), (64, 80, 200),
                  (6, 8, 5), (13, 24, 9), (3, 528, 4), (600, 64, 64), (0, 64, 3), (4, 64, 0)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("tiled,torch_sums", [(True, False), (False, False), (False, True), (None, None)],
                         ids=["tiles", "openblas", "mkl-sums", "native"])
@pytest.mark.parametrize("m,n,k", PRODUCT_SHAPES)
def test_the_programs_products_equal_numpys_on_strided_operands(dtype, transposed, tiled, torch_sums, m, n, k):
    rng = np.random.default_rng(m * 1000 + n + k)
    # operands inside wider arrays (leading dimensions larger than the widths), C's other columns kept
    a_full = rng.normal(size=(k, m + 3) if transposed else (m, k + 5)).astype(dtype)
    a = a_full[:, :m] if transposed else a_full[:, :k]
    b_full = rng.normal(size=(k, n + 16)).astype(dtype)
    b = b_full[:, :n]
    c_full = np.full((m, n + 32), 7.0, dtype=dtype)
    product = library_product(dtype, tiled, torch_sums)
    product(int(transposed), 0, m, n, k, a_full.ctypes.data, a_full.shape[1], b_full.ctypes.data, b_full.shape[1],
            c_full.ctypes.data, c_full.shape[1])
    expected = (a.T if transposed else a).astype(np.float64) @ b.astype(np.float64)
    tolerance = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(c_full[:, :n], expected, rtol=tolerance, atol=tolerance * max(1, k))
    assert (c_full[:, n:] == 7.0).all()


def test_each_choice_of_blas_for_the_sums_is_a_products_library_of_its_own():
    """The BLAS pointers are a library's globals: the sums through MKL and through OpenBLAS must not
    share one library (the one set last would run both)."""
    library_product("float32", False, True)  # skips without torch's MKL
    with_mkl = c_programs.product_pointer(np.dtype("float32"), False, True)
    with_openblas = c_programs.product_pointer(np.dtype("float32"), False, False)
    assert with_mkl != with_openblas


def test_a_sum_through_torchs_mkl_restores_the_calling_threads_mkl_thread_count():
    import ctypes
    product = library_product("float32", False, True)
    local_threads = c_programs._torch_mkl().mkl_set_num_threads_local  # sets, returns the one before
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5000, 64)).astype("float32"), rng.normal(size=(5000, 64)).astype("float32")
    c = np.empty((64, 64), "float32")
    use_global = ctypes.c_int(0)
    local_threads(ctypes.byref(use_global))
    product(1, 0, 64, 64, 5000, a.ctypes.data, 64, b.ctypes.data, 64, c.ctypes.data, 64)
    np.testing.assert_allclose(c, a.T.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)
    # torch's own products on this thread would otherwise run on one thread from here on
    assert local_threads(ctypes.byref(use_global)) == 0


# ---- the tier in use ----------------------------------------------------------------------------------

def gcn_model(**options):
    return mpdsl.compile(ROOT / "examples" / "gcn.mp", dtype="float64", seed=0, **options)


def test_the_tier_runs_from_the_first_run_and_only_on_small_graphs(monkeypatch):
    model = gcn_model()
    backend = model.backend
    backend.compiled_programs = True
    graph = random_graph(1, nodes=30, edges=90)
    x = np.random.default_rng(0).normal(size=(graph.num_nodes, 8))
    first = model.run(graph, x=x)
    assert "compiled program" in backend.last_op_seconds
    second = model.run(graph, x=x)
    assert "compiled program" in backend.last_op_seconds
    for name in first:  # one path for every run: the same bits
        assert np.array_equal(first[name], second[name])
    monkeypatch.setattr(c_programs, "SMALL_ROWS", 16)
    big = model.run(graph, x=x)
    assert "compiled program" not in backend.last_op_seconds
    assert_same(big, first, "gcn")


def test_later_runs_never_overwrite_what_an_earlier_one_returned():
    graph = random_graph(2, nodes=30, edges=90)
    for name in ("gcn", "gated_gcn", "mpnn"):
        model = mpdsl.compile(ROOT / "examples" / f"{name}.mp", dtype="float64", seed=0)
        model.backend.compiled_programs = True
        inputs = synth_inputs(model, graph, np.random.default_rng(0))
        first = model.run(graph, **inputs)
        assert "compiled program" in model.backend.last_op_seconds
        kept = {n: a.copy() for n, a in first.items()}
        for k in range(3):
            model.run(graph, **{n: a + k + 1.0 if a.dtype.kind == "f" else a for n, a in inputs.items()})
        assert_same(kept, first, name)


def test_the_environment_and_a_missing_compiler_turn_it_off(monkeypatch):
    model = gcn_model()
    graph = random_graph(1, nodes=30, edges=90)
    x = np.random.default_rng(0).normal(size=(graph.num_nodes, 8))
    backend = model.backend
    backend.compiled_programs = None
    monkeypatch.setenv("MPDSL_C_PROGRAMS", "0")
    model.run(graph, x=x)
    assert "compiled program" not in backend.last_op_seconds
    program = next(iter(backend._compiled.values()), None) if backend._compiled else None
    assert program is None
    monkeypatch.setenv("MPDSL_C_PROGRAMS", "1")
    monkeypatch.setattr(c_programs, "_compiler", lambda: None)
    monkeypatch.setattr(c_programs, "CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp"))))
    other = gcn_model()
    other.backend.compiled_programs = None
    want = other.run(graph, x=x)
    got = other.run(graph, x=x)
    assert "compiled program" not in other.backend.last_op_seconds
    assert_same(want, got, "gcn")
    (entry,) = [e for e in other.backend._compiled.values() if e.reason]
    assert "no C compiler" in entry.reason


def test_a_second_build_loads_the_cached_library(tmp_path, monkeypatch):
    monkeypatch.setattr(c_programs, "CACHE_DIR", str(tmp_path))
    program = sample_program("relu", {})
    c_programs.compile_program(program, {}, np.dtype(np.float64))
    built = sorted(tmp_path.glob("mp_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    c_programs.compile_program(program, {}, np.dtype(np.float64))
    assert sorted(tmp_path.glob("mp_*.so")) == built and built[0].stat().st_mtime_ns == stamp


def test_the_plan_reports_the_decision(capsys, monkeypatch):
    from mpdsl.cli import main
    monkeypatch.setenv("MPDSL_C_PROGRAMS", "1")
    assert main(["compile", str(ROOT / "examples" / "gcn.mp"), "--emit", "plan", "--dim", "F=8", "--training"]) == 0
    out = capsys.readouterr().out
    assert "[compiled program] runs as one C function when every row space has fewer than 8192 rows" in out
    assert "[compiled program] backward: runs as one C function" in out
    assert "[compiled program] train-forward: runs as one C function" in out  # dropout: its masks are inputs
    assert main(["compile", str(ROOT / "examples" / "gat.mp"), "--emit", "plan", "--dim", "F=8"]) == 0
    out = capsys.readouterr().out
    assert "[compiled program] runs op by op: attention: a fused compiled kernel" in out
    # its row groups (the projections, the edge scores) still run each block as one C function
    groups = [line for line in out.splitlines() if "[row_fusion]" in line]
    assert groups and all("rows; each block one C function)" in line for line in groups), groups


def test_a_torch_module_trains_molecules_the_same_with_the_tier():
    import torch

    from mpdsl import chem

    data = chem.tpsa_dataset(limit=48)
    source = "dim K = 16\n" + (ROOT / "benchmarks" / "models" / "gine3.mp").read_text()

    def curve(tier: bool) -> list[float]:
        model = mpdsl.compile(source, dtype="float64", seed=0)
        model.backend.compiled_programs = tier
        module = model.to_torch(data.graph)
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
        losses = []
        for _ in range(3):
            for start in range(0, 48, 16):
                batch = data.graph.select_graphs(np.arange(start, start + 16))
                out = module(batch)
                loss = torch.nn.functional.mse_loss(out, torch.from_numpy(data.y[start:start + 16]).reshape(-1, 1))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        assert ("compiled program" in model.backend.last_op_seconds) == tier
        return losses

    np.testing.assert_allclose(curve(True), curve(False), rtol=1e-10)
