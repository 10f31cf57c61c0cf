"""The NumPy backend's execution machinery: the row-block fusion schedule and the compiled kernels.

Row groups run block by block only from ``fuse_min_rows`` rows on (8192 by default), so these
tests force small blocks on small graphs and compare with the op-by-op run of the same program.
"""

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mpdsl  # noqa: E402
from mpdsl.backends import c_programs, cpu_kernels  # noqa: E402
from mpdsl.backends.numpy_backend import BLAS, NumpyBackend  # noqa: E402
from mpdsl.backends.row_fusion import RowGroup, fuse_rows, is_row_sum, is_row_wise, row_space  # noqa: E402
from mpdsl.passes import optimize  # noqa: E402
from mpdsl.passes.rewrite import specialize  # noqa: E402
from mpdsl.types import Domain  # noqa: E402
from model_inputs import synth_inputs, with_edge_sets  # noqa: E402
from strategies import batched_graphs  # noqa: E402
from test_passes import EXAMPLES, assert_same, random_graph  # noqa: E402

OP_BY_OP = NumpyBackend(fuse_min_rows=1 << 62)


def optimized_program(path, graph, seed=0):
    model = mpdsl.compile(path, dtype="float64", seed=seed, layout="none")
    inputs = synth_inputs(model, graph, np.random.default_rng(seed))
    model.run(graph, **inputs)  # initialises the params
    arrays, dims = model.bind(graph, inputs)
    program, _ = optimize(specialize(model.ir, dims), None, dims, verify_each=True)
    return model, program, arrays, dims


def run_with(backend, model, program, graph, arrays, dims):
    return backend.run(program, graph, arrays, model.params, dims)


def check_schedule(program, schedule):
    """Every value once, after its operands; group members share a row space and are row-wise, or
    sums over the rows of that space that no member reads; a reshape in a group reshapes a member
    (one of a value computed before runs alone, as a view)."""
    order = []
    for step in schedule:
        if isinstance(step, RowGroup):
            assert len(step.members) >= 2
            assert all((m.type.space == step.space and is_row_wise(m)) or (is_row_sum(m) and row_space(m) == step.space)
                       for m in step.members)
            members = set(map(id, step.members))
            sums = {id(m) for m in step.members if is_row_sum(m)}
            assert not any(id(o) in sums for m in step.members for o in m.operands), "a member reads a partial sum"
            assert sums <= set(map(id, step.exports))
            assert all(id(m.operands[0]) in members for m in step.members if m.op == "reshape")
            assert set(map(id, step.exports)) <= set(map(id, step.members))
            order.extend(step.members)
        else:
            order.append(step)
    assert sorted(map(id, order)) == sorted(map(id, program.values))
    seen = set()
    for v in order:
        assert all(id(o) in seen for o in v.operands), f"{v.op} scheduled before an operand"
        seen.add(id(v))


TIERS = ["numpy-blocks", "compiled-blocks"]


def tier_backend(tier: str, monkeypatch):
    """``make(block_rows)``: a backend running every row group block by block on ``tier``: member
    by member in NumPy, or as each group's C function (``group_program``) where its members have C
    rules (whole programs never run as one C function here)."""
    compiled = tier == "compiled-blocks"
    if compiled:
        if c_programs._compiler() is None:
            pytest.skip("no C compiler")
        monkeypatch.setattr(c_programs, "SMALL_ROWS", 0)
    return lambda block_rows: NumpyBackend(fuse_min_rows=0, block_rows=block_rows, compiled_programs=compiled)


@pytest.fixture
def blocks_backend(request, monkeypatch):
    """``tier_backend`` for the test's ``tier`` parameter."""
    return tier_backend(request.node.callspec.params["tier"], monkeypatch)


def compiled_groups(backend) -> int:
    """How many row groups ``backend`` ran as C functions."""
    return sum(entry.compiled is not None for entry in backend._compiled.values())


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_row_blocks_equal_op_by_op_on_every_example(path, tier, blocks_backend):
    graph = with_edge_sets(mpdsl.compile(path), random_graph())
    model, program, arrays, dims = optimized_program(path, graph)
    check_schedule(program, fuse_rows(program))
    want = run_with(OP_BY_OP, model, program, graph, arrays, dims)
    for block_rows in (1, 7):  # one row per block; blocks that straddle the workers' ranges
        backend = blocks_backend(block_rows)
        got = run_with(backend, model, program, graph, arrays, dims)
        assert_same(want, got, f"{path.stem}, blocks of {block_rows} rows")
        if tier == "compiled-blocks" and path.stem in ("gcn", "gin", "sage_mean", "mpnn"):
            assert compiled_groups(backend), "no row group ran compiled"


@pytest.mark.parametrize("tier", TIERS)
@settings(max_examples=25, deadline=None)
@given(graph=batched_graphs(), which=st.sampled_from(EXAMPLES), seed=st.integers(0, 1000),
       block_rows=st.integers(1, 9))
def test_row_blocks_on_random_graphs(tier, graph, which, seed, block_rows):
    graph = with_edge_sets(mpdsl.compile(which), graph, seed)
    model, program, arrays, dims = optimized_program(which, graph, seed)
    want = run_with(OP_BY_OP, model, program, graph, arrays, dims)
    with pytest.MonkeyPatch.context() as monkeypatch:
        got = run_with(tier_backend(tier, monkeypatch)(block_rows), model, program, graph, arrays, dims)
    assert_same(want, got, which.stem)


def test_sage_runs_its_dense_work_as_one_group_after_the_sparse_product():
    model = mpdsl.compile("dim K = 64\n" + (ROOT / "benchmarks" / "models" / "sage.mp").read_text())
    program, _ = optimize(specialize(model.ir, {"F": 64}), None, {"F": 64})
    schedule = fuse_rows(program)
    groups = [s for s in schedule if isinstance(s, RowGroup)]
    assert len(groups) == 1
    ops = [m.op for m in groups[0].members]
    assert ops.count("matmul") == 2 and "add" in ops
    gspmm_at = next(i for i, s in enumerate(schedule) if not isinstance(s, RowGroup) and s.op == "gspmm")
    assert gspmm_at < schedule.index(groups[0])
    assert [e.op for e in groups[0].exports] == ["add"]  # only the layer's result is materialised


def test_default_blocks_on_a_graph_past_the_threshold():
    rng = np.random.default_rng(3)
    nodes, edges = 9000, 40000
    graph = mpdsl.Graph.from_arrays(rng.integers(0, nodes, (2, edges)), nodes)
    for name in ("gcn", "gin", "gat"):
        model, program, arrays, dims = optimized_program(ROOT / "examples" / f"{name}.mp", graph)
        fused = NumpyBackend()
        got = run_with(fused, model, program, graph, arrays, dims)
        assert any(k.startswith("fused") for k in fused.last_op_seconds), name
        assert_same(run_with(OP_BY_OP, model, program, graph, arrays, dims), got, name)


def test_edge_group_fuses_the_attention_scores():
    graph = random_graph()
    _, program, _, _ = optimized_program(ROOT / "examples" / "gat.mp", graph)
    edge_groups = [s for s in fuse_rows(program) if isinstance(s, RowGroup) and s.domain is Domain.EDGE]
    assert edge_groups and {"gather", "leaky_relu"} <= {m.op for m in edge_groups[0].members}


def test_values_run_ahead_of_a_group_are_grouped_among_themselves():
    """The GAT training backward recomputes the edge scores (two gathers of node residuals, an add,
    the leaky ReLU) while a node group (delta) is open: the chain runs ahead of it as an edge group
    of its own, materialising the scores only, not as four whole E x H passes. The reshape of the
    output cotangent runs alone (a view of it)."""
    model = mpdsl.compile(ROOT / "benchmarks" / "models" / "gat.mp", dims={"F": 64, "H": 8, "C": 8})
    params = [v.name for v in model.ir.values if v.op == "param"]
    backward = model.context.training_programs({"F": 64, "H": 8, "C": 8}, "f32", True, [], params).backward
    schedule = fuse_rows(backward)
    check_schedule(backward, schedule)
    groups = [s for s in schedule if isinstance(s, RowGroup)]
    (scores,) = [g for g in groups if any(m.op == "leaky_relu" for m in g.members)]
    assert scores.domain is Domain.EDGE and [m.op for m in scores.members] == ["gather", "gather", "add", "leaky_relu"]
    assert [e.op for e in scores.exports] == ["leaky_relu"]
    (delta,) = [v for v in backward.values if v.op == "einsum"]  # <g, out> per node: open when the chain came
    assert backward.values.index(delta) < backward.values.index(scores.members[0])
    (delta_step,) = [i for i, s in enumerate(schedule)
                     if s is delta or (isinstance(s, RowGroup) and delta in s.members)]
    assert schedule.index(scores) < delta_step
    # the cotangent's reshape to [H, C] that the attention passes read is a view, not a copy in a group
    (view,) = [v for v in backward.values if v.op == "reshape" and v.operands[0].name == "d_out" and v.type.rank == 2]
    assert view in schedule


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_training_programs_in_row_blocks_equal_the_unfused_gradient(path, tier, blocks_backend):
    """Every example's train-forward and backward (whose recomputed values run in row groups of their
    own, and whose weight gradients are row sums in them), block by block, against the unfused
    gradient program."""
    from test_fused_backward import training_case

    case = training_case(path)
    for program in (case.programs.train_forward, case.programs.backward):
        check_schedule(program, fuse_rows(program))
    for block_rows in (1, 7):
        backend = blocks_backend(block_rows)
        case.check(random_graph(3, nodes=12, edges=40, self_loops=True), seed=3, backend=backend)
        if tier == "compiled-blocks" and path.stem in ("gcn", "gin", "sage_mean", "mpnn"):
            assert compiled_groups(backend), "no row group ran compiled"


def test_weight_gradients_are_row_sums_of_the_backward_group():
    """GIN's backward is one node group: the products by the transposed weights, the relu' mask, and
    the five weight gradients as sums over its blocks, with no N x F value materialised."""
    model = mpdsl.compile("dim K = 64\n" + (ROOT / "benchmarks" / "models" / "gin.mp").read_text())
    params = [v.name for v in model.ir.values if v.op == "param"]
    backward = model.context.training_programs({"F": 64}, "f32", True, [], params).backward
    schedule = fuse_rows(backward)
    check_schedule(backward, schedule)
    (group,) = [s for s in schedule if isinstance(s, RowGroup)]
    assert sorted(m.op for m in group.members if is_row_sum(m)) == ["contract_rows"] * 5
    assert all(e.type.domain is Domain.PARAM for e in group.exports)


@pytest.mark.parametrize("tier", TIERS)
def test_row_sums_do_not_depend_on_the_worker_count_or_the_pieces(tier, blocks_backend, monkeypatch):
    """A group's row sums add their blocks' partial sums in piece order: the same bits on one worker
    as on several, and equal to the op-by-op run when the partials are capped to one piece."""
    from mpdsl.backends import numpy_backend

    path = ROOT / "examples" / "gin.mp"
    graph = random_graph(4, nodes=60, edges=300)
    model, _, _, dims = optimized_program(path, graph)
    params = [v.name for v in model.ir.values if v.op == "param"]
    backward = model.context.training_programs(dims, "f64", True, [], params).backward
    rng = np.random.default_rng(4)
    inputs = {v.name: rng.normal(size=(graph.num_nodes,) + tuple(d.value for d in v.type.shape))
              for v in backward.values if v.op == "input"}
    backward_params = {**model.params, **{v.name: rng.normal(size=tuple(d.value for d in v.type.shape))
                                          for v in backward.values if v.op == "param" and v.name not in model.params}}
    assert any(is_row_sum(m) for s in fuse_rows(backward) if isinstance(s, RowGroup) for m in s.members)

    def run(workers):
        monkeypatch.setattr(numpy_backend, "WORKERS", workers)
        return blocks_backend(5).run(backward, graph, inputs, backward_params, dims)

    several = run(2)
    one = run(1)
    for name in several:
        assert np.array_equal(several[name], one[name]), name
    monkeypatch.setattr(numpy_backend, "PARTIAL_SUM_BYTES", 1)  # one piece: every block's partial in one sum
    assert_same(OP_BY_OP.run(backward, graph, inputs, backward_params, dims), run(2), "one piece")


# ---- kernels -----------------------------------------------------------------------------------


def random_csr(rng, rows, cols, edges):
    dst = np.sort(rng.integers(0, rows, edges))
    indptr = np.searchsorted(dst, np.arange(rows + 1)).astype(np.int32)
    return indptr, rng.integers(0, cols, edges).astype(np.int32)


def dense(indptr, columns, rows, cols, values):
    a = np.zeros((rows, cols) + values.shape[1:])
    for r in range(rows):
        for e in range(indptr[r], indptr[r + 1]):
            a[r, columns[e]] += values[e]
    return a


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 12), edges=st.integers(0, 40), groups=st.sampled_from([1, 2, 4]),
       width=st.integers(1, 3), chunks=st.integers(1, 5), seed=st.integers(0, 99))
def test_kernels_equal_dense_formulas(rows, edges, groups, width, chunks, seed):
    rng = np.random.default_rng(seed)
    cols = 6
    edges = edges if rows else 0
    indptr, columns = random_csr(rng, rows, cols, edges)
    x = rng.normal(size=(cols, groups * width))
    w = rng.normal(size=(edges, groups))
    bounds = cpu_kernels.row_chunks(indptr, chunks)
    counts = np.maximum(np.diff(indptr), 1)[:, None]

    out = np.full((rows, groups * width), np.nan)
    cpu_kernels.spmm(indptr, columns, w[:, 0].copy(), x, out, bounds, False)
    a = dense(indptr, columns, rows, cols, w[:, 0])
    np.testing.assert_allclose(out, a @ x, atol=1e-12)
    cpu_kernels.spmm(indptr, columns, np.empty(0), x, out, bounds, True)
    np.testing.assert_allclose(out, (dense(indptr, columns, rows, cols, np.ones(edges)) @ x) / counts, atol=1e-12)

    a_g = dense(indptr, columns, rows, cols, w)  # [rows, cols, groups]
    x_g = x.reshape(cols, groups, width)
    want = np.einsum("rcg,cgk->rgk", a_g, x_g).reshape(rows, groups * width)
    cpu_kernels.grouped_spmm(indptr, columns, w, x, out, bounds, cpu_kernels.SUM, np.empty((0, 0)))
    np.testing.assert_allclose(out, want, atol=1e-12)
    cpu_kernels.grouped_spmm(indptr, columns, w, x, out, bounds, cpu_kernels.MEAN, np.empty((0, 0)))
    np.testing.assert_allclose(out, want / counts, atol=1e-12)
    positive = np.exp(w)  # softmax weights: each group's row total divides (an empty row stays 0)
    a_p = dense(indptr, columns, rows, cols, positive)
    totals = np.where(a_p.sum(axis=1) > 0, a_p.sum(axis=1), 1.0)  # [rows, groups]
    softmax = np.einsum("rcg,cgk->rgk", a_p, x_g) / totals[:, :, None]
    cpu_kernels.grouped_spmm(indptr, columns, positive, x, out, bounds, cpu_kernels.NORMALIZED, np.empty((0, 0)))
    np.testing.assert_allclose(out, softmax.reshape(rows, groups * width), atol=1e-12)

    shifted = np.full_like(w, np.nan)
    cpu_kernels.shift_by_row_max(indptr, w, shifted, bounds, np.empty((0, 0)))
    row_of_edge = np.repeat(np.arange(rows), np.diff(indptr))
    peak = np.full((rows, groups), -np.inf)
    np.maximum.at(peak, row_of_edge, w)
    np.testing.assert_allclose(shifted, w - peak[row_of_edge], atol=0)

    # the peaks, and the normalised product's log-sum-exp from them: row_logsumexp's bits (an
    # empty row: 0 in both)
    peaks = np.full((rows, groups), np.nan)
    cpu_kernels.shift_by_row_max(indptr, w, shifted, bounds, peaks)
    np.testing.assert_array_equal(peaks, peak)
    exps = np.exp(shifted)
    lse = peaks.copy()
    cpu_kernels.grouped_spmm(indptr, columns, exps, x, out, bounds, cpu_kernels.NORMALIZED, lse)
    expected = np.full((rows, groups), np.nan)
    cpu_kernels.row_logsumexp(indptr, w, exps, expected, bounds)
    np.testing.assert_array_equal(lse, expected)


@pytest.mark.parametrize("by", ["dst", "src"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_edge_sums_past_the_small_graph_size_run_the_kernel_with_scipys_bits(by, dtype):
    """A sum of edge values by dst or by src (a GAT backward's score cotangents onto each end):
    on a graph past the small-graph size the parallel kernel runs it, with the bits of the
    segment sum's SciPy product; a hub, multi-edges, self-loops and isolated nodes included."""
    from mpdsl.backends.numpy_backend import ExecContext
    rng = np.random.default_rng(7)
    nodes, edges = 3000, 40000
    src, dst = rng.integers(0, nodes - 500, edges), rng.integers(0, nodes - 500, edges)  # the last 500: isolated
    dst[:3000] = 11  # a hub
    src[3000:3100], dst[3000:3100] = 5, 6  # a multi-edge
    dst[3100:3200] = src[3100:3200]  # self-loops
    graph = mpdsl.Graph.from_arrays(np.stack([src, dst]), nodes)
    model = mpdsl.compile(f"model m(e: edge[8]) -> node[8] {{ return sum(e) by {by} }}", dtype=dtype)
    values = rng.normal(size=(edges, 8)).astype(dtype)
    got = model.run(graph, e=values)["out"]
    ctx = ExecContext(graph, model.ir, {}, {}, {}, np.dtype(dtype), False, None, NumpyBackend().pool)
    csr = ctx.pull(by)
    assert csr.edge_sum(values) is not None  # past the small-graph size
    np.testing.assert_array_equal(got, ctx.segments_by(by).sum(values))
    index = dst if by == "dst" else src
    want = np.zeros((nodes, 8))
    np.add.at(want, index, values.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-4 if dtype == "float32" else 1e-12, atol=1e-4)


def test_take_rows_matches_np_take_and_checks_bounds():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 3, 7)).astype(np.float32)
    index = rng.permutation(5000)
    np.testing.assert_array_equal(cpu_kernels.take_rows(x, index), np.take(x, index, axis=0))
    with pytest.raises(IndexError):
        cpu_kernels.take_rows(x, np.array([0, 5000] * 5000))


def test_concurrent_runs_from_two_threads_agree():
    """The parallel kernels are launched one at a time and row groups use per-call buffers, so two
    threads may run models at once."""
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(5)
    nodes = 9000
    graph = mpdsl.Graph.from_arrays(rng.integers(0, nodes, (2, 50000)), nodes, x=rng.normal(size=(nodes, 16)))
    models = [mpdsl.compile(ROOT / "examples" / f"{name}.mp", dtype="float64", seed=1) for name in ("gcn", "gat")]
    want = [m(graph) for m in models]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: models[i % 2](graph), range(8)))
    for i, out in enumerate(got):
        np.testing.assert_array_equal(out, want[i % 2])


def test_blas_hold_is_reference_counted_and_restores_the_users_setting():
    """Two overlapping runs: the first to leave must not give BLAS its threads back while the
    other still multiplies, and the last must restore the count the user had set."""
    original = BLAS.threads()
    if not original:
        pytest.skip("no OpenBLAS library in this process")
    ones, threes = [1] * len(original), [3] * len(original)
    BLAS.set_threads(3)
    try:
        a, b = BLAS.single_threaded(), BLAS.single_threaded()
        a.__enter__()
        b.__enter__()
        assert BLAS.threads() == ones
        a.__exit__(None, None, None)
        assert BLAS.threads() == ones
        BLAS.set_threads(3)  # the user's new setting, taken up when the hold ends
        assert BLAS.threads() == ones
        b.__exit__(None, None, None)
        assert BLAS.threads() == threes
    finally:
        BLAS.set_threads(original[0])


def test_a_blas_library_loaded_during_a_hold_is_held_too():
    """A library found by ``rescan`` while a run holds BLAS (SciPy's, loaded by a program compiled
    inside the run) is held to one thread for the rest of the hold and gets its count back after."""
    from mpdsl.backends.numpy_backend import _BlasThreads

    blas = _BlasThreads()
    if not blas.threads():
        pytest.skip("no OpenBLAS library in this process")
    blas.set_threads(2)
    try:
        blas._paths.pop()  # as if the last library were loaded after the hold began
        _, late = blas._libs.pop()
        with blas.single_threaded():
            assert late() == 2
            blas.rescan()
            assert late() == 1 and blas.threads() == [1] * len(blas._libs)
        assert late() == 2 and blas.threads() == [2] * len(blas._libs)
    finally:
        blas.set_threads(BLAS.threads()[0] if BLAS.threads() else 1)


def test_pool_blocks_are_advised_to_small_pages():
    """The pool's blocks are faulted in 4 KB pages (``fresh_block``): NumPy advises huge pages for
    large arrays, and the kernel's synchronous compaction then made calls that took new blocks 2-3x
    slower (see ``fresh_block``). Read from the mapping's ``VmFlags`` (``hg``: huge-page advice,
    ``nh``: no huge pages)."""
    from mpdsl.backends.numpy_backend import BufferPool

    def advised(array: np.ndarray) -> bool | None:
        address = array.ctypes.data + array.nbytes // 2  # NumPy advises the whole huge pages inside
        try:
            lines = Path("/proc/self/smaps").read_text().splitlines()
        except OSError:
            return None
        inside = False
        for line in lines:
            head = line.split()[0] if line else ""
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= address < high
            elif inside and line.startswith("VmFlags:"):
                return " hg" in line and " nh" not in line
        return None

    size = 8 << 20
    plain = np.empty(size // 8)
    if not advised(plain):
        pytest.skip("NumPy gives no huge-page advice here")
    block = BufferPool().take((size // 8,), np.float64)
    assert advised(block) is False


def test_concurrent_runs_are_bitwise_identical_in_fresh_processes():
    """The determinism contract of the README: the same inputs and thread setting give bitwise-identical
    outputs run alone, concurrently (4 threads) or in another process (20 fresh processes), and the
    user's OpenBLAS thread count is what it was once the runs are over."""
    command = [sys.executable, str(ROOT / "tests" / "concurrency_probe.py"), "--threads", "4", "--runs", "6",
               "--blas", "3"]
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda _: subprocess.run(command, capture_output=True, text=True, timeout=300),
                             range(20)))
    reports = []
    for proc in done:
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads(proc.stdout.splitlines()[-1]))
    for report in reports:
        assert report["differ"] == {"pna": 0, "mpnn": 0}, report
        assert report["blas_after"] == report["blas_before"] == [3] * len(report["blas_before"]), report
    assert len({json.dumps(r["digests"], sort_keys=True) for r in reports}) == 1


def test_take_rows_and_put_rows_are_inverse():
    rng = np.random.default_rng(1)
    for rows, width in ((5000, (3, 7)), (10, (2,))):  # the parallel kernel and the small-array path
        x = rng.normal(size=(rows,) + width)
        index = rng.permutation(rows)
        put = cpu_kernels.put_rows(x, index)
        np.testing.assert_array_equal(put[index], x)
        np.testing.assert_array_equal(cpu_kernels.take_rows(put, index), x)
    with pytest.raises(IndexError):
        cpu_kernels.put_rows(x, index[:-1])


def test_a_relabelled_layout_gives_the_callers_order():
    rng = np.random.default_rng(2)
    nodes = 60_000  # past REORDER_MIN_NODES, with community structure that makes reordering pay
    src = rng.integers(0, nodes, 300_000)
    dst = np.minimum(src // 100 * 100 + rng.integers(0, 100, len(src)), nodes - 1)
    shuffle = rng.permutation(nodes)
    graph = mpdsl.Graph.from_arrays(np.stack([shuffle[src], shuffle[dst]]), nodes, x=rng.normal(size=(nodes, 8)))
    outs = {}
    for layout in ("reorder", "none"):
        model = mpdsl.compile(ROOT / "examples" / "gcn.mp", dtype="float64", seed=1, layout=layout)
        outs[layout] = model(graph)
        if layout == "reorder":
            assert model.last_layout.nodes is not None
    np.testing.assert_allclose(outs["reorder"], outs["none"], rtol=1e-10, atol=1e-12)


def test_pooled_buffers_never_alias_returned_outputs():
    """Intermediate arrays are reused between runs; outputs and batch-norm state updates are not
    (a later run must not overwrite what an earlier one returned)."""
    graph = random_graph()
    for name in ("gcn", "gated_gcn", "mpnn"):
        model, program, arrays, dims = optimized_program(ROOT / "examples" / f"{name}.mp", graph)
        backend = NumpyBackend(fuse_min_rows=0, block_rows=5, compiled_programs=False)  # the op-by-op pool
        first = run_with(backend, model, program, graph, arrays, dims)
        kept = {n: a.copy() for n, a in first.items()}
        assert backend.pool.held_bytes > 0
        other = {n: (a + 1.0 if a.dtype.kind == "f" else a) for n, a in arrays.items()}
        for _ in range(3):
            run_with(backend, model, program, graph, other, dims)
        assert_same(first, kept, name)
    backend.pool.clear()
    assert backend.pool.held_bytes == 0


def test_batch_norm_state_updates_survive_later_runs():
    source = """
    model bn(x: node[4], rm: param[4] = zeros, rv: param[4] = ones, g: param[4] = ones, b: param[4] = zeros)
        -> node[4] {
        return relu(batch_norm(x * 2.0, rm, rv, g, b)) + x
    }
    """
    rng = np.random.default_rng(0)
    graph = random_graph()
    model = mpdsl.compile(source, dtype="float64").train()
    model.backend = NumpyBackend(fuse_min_rows=0, block_rows=3)
    x = rng.normal(size=(graph.num_nodes, 4))
    model(graph, x=x)
    updates = {n: a.copy() for n, a in model.backend.last_state_updates.items()}
    assert updates
    held = dict(model.backend.last_state_updates)
    model(graph, x=x + 5.0)
    for n, a in held.items():
        np.testing.assert_array_equal(a, updates[n])


def test_blocks_past_the_parallel_threshold_do_not_wait_on_their_own_pool():
    """A block of PARALLEL_ROWS rows or more runs rules that would split rows over the pool; from a
    pool worker they run inline instead (waiting on the pool from its workers deadlocked)."""
    import threading
    from mpdsl.backends.numpy_backend import PARALLEL_ROWS
    rng = np.random.default_rng(4)
    nodes = 3 * PARALLEL_ROWS
    graph = mpdsl.Graph.from_arrays(rng.integers(0, nodes, (2, 4 * nodes)), nodes, x=rng.normal(size=(nodes, 8)))
    # GAT's x @ W (W: [F, H, C]) runs its rule inside the group, which splits rows over the pool
    model = mpdsl.compile(ROOT / "examples" / "gat.mp", dtype="float64", seed=1)
    want = model(graph)
    model.backend = NumpyBackend(fuse_min_rows=0, block_rows=2 * PARALLEL_ROWS)
    got = []
    runner = threading.Thread(target=lambda: got.append(model(graph)), daemon=True)
    runner.start()
    runner.join(60)
    assert got, "the run did not finish"
    np.testing.assert_allclose(got[0], want, rtol=1e-12)
