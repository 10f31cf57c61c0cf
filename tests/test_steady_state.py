"""Steady state of the NumPy backend: from the second call on, a forward pass or a training step
through the torch module takes no fresh buffers (so it takes no page faults for them), and the
buffers it reuses are never ones the caller still refers to; ``contract_rows`` on many rows
(parameter gradients) gives the one-pass result whatever the worker count."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mpdsl  # noqa: E402
from mpdsl.backends import numpy_backend  # noqa: E402
from model_inputs import synth_inputs  # noqa: E402

torch = pytest.importorskip("torch")

ROWS = 2 * numpy_backend.PARALLEL_ROWS + 17  # above the row count from which ops write pooled buffers


def large_graph(nodes: int = ROWS, degree: int = 4, seed: int = 0) -> mpdsl.Graph:
    """A random graph with ``degree`` in-edges per node on average, a hub (node 0) and isolated nodes."""
    rng = np.random.default_rng(seed)
    edges = degree * nodes
    src = rng.integers(0, nodes - 10, edges)
    dst = np.where(rng.random(edges) < 0.05, 0, rng.integers(0, nodes - 10, edges))
    return mpdsl.Graph.from_arrays(np.stack([src, dst]), nodes)


def compiled(name: str, graph: mpdsl.Graph, dtype: str = "float32", layout: str = "none"):
    """The example model, and the graph with its inputs (read from the graph by the model and the module)."""
    model = mpdsl.compile(ROOT / "examples" / f"{name}.mp", dtype=dtype, seed=0, layout=layout)
    graph = graph.with_data(**synth_inputs(model, graph, np.random.default_rng(1)))
    model.init(seed=0, graph=graph)
    return model, graph


def step(module, graph):
    module.zero_grad(set_to_none=True)
    out = module(graph)
    (out * out).sum().backward()
    return out


@pytest.mark.parametrize("name", ["gin", "gcn", "sage_mean"])
def test_training_steps_take_no_fresh_buffers_after_the_first(name):
    graph = large_graph()
    model, graph = compiled(name, graph)
    module = model.to_torch(graph)
    pool = model.backend.pool
    for _ in range(2):
        step(module, graph)
    fresh = pool.fresh_bytes
    assert fresh > 0
    for _ in range(3):
        step(module, graph)
    assert pool.fresh_bytes == fresh, f"{pool.fresh_bytes - fresh} bytes allocated anew in later steps"


def test_forward_calls_take_no_fresh_buffers_after_the_second():
    graph = large_graph()
    model, graph = compiled("gin", graph)
    for _ in range(2):
        model(graph)
    fresh = model.backend.pool.fresh_bytes
    for _ in range(3):
        model(graph)
    assert model.backend.pool.fresh_bytes == fresh


@pytest.mark.parametrize("call", ["forward", "step"])
def test_a_reordered_graph_relabels_into_reused_buffers(call):
    """Under a node reordering, the outputs relabelled back into the caller's order (and the step's
    cotangent relabelled into the run's) are written into buffers of the backend's pool: from the
    third call on, nothing the relabelling allocates is new (tracemalloc sees NumPy's allocations,
    with the stack that made them)."""
    import tracemalloc

    from mpdsl import plan

    model, graph = compiled("gcn", large_graph(), layout="reorder")
    module = model.to_torch(graph)

    def call_once():
        return model(graph) if call == "forward" else step(module, graph)

    for _ in range(3):
        call_once()
    assert (model.last_layout if call == "forward" else module.last_layout) is not None
    made_by_relabelling = [tracemalloc.Filter(True, plan.__file__, all_frames=True)]
    tracemalloc.start(64)
    try:
        before = tracemalloc.take_snapshot().filter_traces(made_by_relabelling)
        out = call_once()
        after = tracemalloc.take_snapshot().filter_traces(made_by_relabelling)
    finally:
        tracemalloc.stop()
    new = sum(stat.size_diff for stat in after.compare_to(before, "filename") if stat.size_diff > 0)
    assert new < out.numel() * 4 if call == "step" else new < out.nbytes, f"{new} bytes allocated by the relabelling"


@pytest.mark.parametrize("layout", ["none", "reorder"])
def test_reused_buffers_are_never_ones_the_caller_still_holds(layout):
    """Outputs kept by the caller (as arrays, or as tensors of the torch module, whose step also keeps
    its residuals until backward; relabelled into the caller's order under a reordering) keep their
    values while later calls run with other weights."""
    graph = large_graph()
    model, graph = compiled("gin", graph, layout=layout)
    kept_arrays = [model(graph)]
    copies = [kept_arrays[0].copy()]
    module = model.to_torch(graph)
    kept_tensors, tensor_copies = [], []
    for _ in range(4):
        out = step(module, graph)
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(0.9)
        kept_tensors.append(out.detach())
        tensor_copies.append(out.detach().clone())
        module.sync()
        kept_arrays.append(model(graph))
        copies.append(kept_arrays[-1].copy())
    for i, (array, copy) in enumerate(zip(kept_arrays, copies)):
        np.testing.assert_array_equal(array, copy, err_msg=f"output {i} was overwritten")
    for i, (tensor, copy) in enumerate(zip(kept_tensors, tensor_copies)):
        assert torch.equal(tensor, copy), f"step {i}'s output was overwritten"
    assert not torch.equal(kept_tensors[0], kept_tensors[-1])  # the weights changed between steps


def test_pool_takes_back_a_lent_array_only_once_nothing_refers_to_it():
    pool = numpy_backend.BufferPool()
    lent = pool.take((4, 3), np.float64)
    view = lent[1:]
    tensor = torch.from_numpy(lent)
    pool.lend([lent])
    del lent
    assert pool.held_bytes == 0
    del view
    assert pool.held_bytes == 0  # the tensor still refers to it
    del tensor
    assert pool.held_bytes == 4 * 3 * 8
    assert pool.take((4, 3), np.float64).shape == (4, 3)
    assert pool.held_bytes == 0


def gradients(graph, pieces: int, workers: int, monkeypatch) -> dict[str, np.ndarray]:
    monkeypatch.setattr(numpy_backend, "CONTRACT_PIECE_ROWS", pieces)
    monkeypatch.setattr(numpy_backend, "WORKERS", workers)
    model, graph = compiled("gin", graph, dtype="float64")
    module = model.to_torch(graph)
    step(module, graph)
    return {n: p.grad.numpy().copy() for n, p in module.named_parameters()}


def test_contract_rows_in_pieces_equals_one_pass_whatever_the_workers(monkeypatch):
    graph = large_graph(nodes=3000)
    one_pass = gradients(graph, 1 << 40, 2, monkeypatch)
    two_workers = gradients(graph, 128, 2, monkeypatch)
    one_worker = gradients(graph, 128, 1, monkeypatch)
    for name, expected in one_pass.items():
        np.testing.assert_allclose(two_workers[name], expected, rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_array_equal(one_worker[name], two_workers[name], err_msg=name)


SPIN_PROBE = """
import os, sys, time
{first}
import torch
torch.set_num_threads(2)
t = torch.ones(4_000_000)
spins = []
for _ in range(3):
    t * t  # a parallel torch op; then the process sleeps
    start = time.process_time()
    time.sleep(0.05)
    spins.append(time.process_time() - start)
print(os.environ.get("OMP_WAIT_POLICY"), 1e3 * min(spins))
"""


def spin_after_torch_ops(first: str, env: dict) -> tuple[str, float]:
    """(OMP_WAIT_POLICY, ms of CPU the process used while sleeping after a parallel torch op)."""
    environment = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    proc = subprocess.run([sys.executable, "-c", SPIN_PROBE.format(first=first)], capture_output=True, text=True,
                          env=environment, check=True)
    policy, ms = proc.stdout.split()
    return policy, float(ms)


def test_torch_threads_imported_after_mpdsl_sleep_between_ops():
    """torch's OpenMP threads must not spin on the cores after torch ops (the NumPy backend's kernels
    of the same training step need them); a policy the user set is kept."""
    policy, ms = spin_after_torch_ops("import mpdsl", {})
    assert policy == "PASSIVE"
    assert ms < 2.0, f"torch's threads used {ms:.1f} ms of CPU while the process slept"
    kept = subprocess.run([sys.executable, "-c", "import os, mpdsl; print(os.environ['OMP_WAIT_POLICY'])"],
                          capture_output=True, text=True, env=os.environ | {"OMP_WAIT_POLICY": "ACTIVE"}, check=True)
    assert kept.stdout.strip() == "ACTIVE"


MALLOC_PROBE = """
import ctypes, resource, sys
{first}
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 20 << 20
faults = []
for step in range(5):  # a step's three large tensors, allocated, written and freed together
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(3)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(max(faults[2:]))
"""


def faults_of_later_steps(first: str, env: dict) -> int:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MPDSL_MALLOC"} | env
    proc = subprocess.run([sys.executable, "-c", MALLOC_PROBE.format(first=first)], capture_output=True, text=True,
                          env=environment, check=True)
    return int(proc.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_after_importing_mpdsl_freed_large_blocks_are_reused_without_fresh_pages():
    """A step's freed tensors stay in the heap for the next step (``mpdsl.malloc_settings``); with
    glibc's defaults, or ``MPDSL_MALLOC=default``, their pages go back to the kernel at each step."""
    pages = 3 * (20 << 20) // 4096
    assert faults_of_later_steps("import mpdsl", {}) < pages // 20
    assert faults_of_later_steps("", {}) > pages // 2  # the defaults: fresh pages at every step
    assert faults_of_later_steps("import mpdsl", {"MPDSL_MALLOC": "default"}) > pages // 2


CHAIN = """
model chain(x: node[F]) -> node[F] {
    h1 = sum(x[src]) by dst
    h2 = sum(h1[src]) by dst
    h3 = sum(h2[src]) by dst
    return sum(h3[src]) by dst
}
"""


def test_a_run_reuses_the_blocks_of_values_no_later_step_reads():
    import scipy.sparse as sp

    graph = large_graph(nodes=2000).with_data(x=np.random.default_rng(2).random((2000, 16), dtype=np.float32))
    model = mpdsl.compile(CHAIN, layout="none")
    model.backend.compiled_programs = False  # the op-by-op run's pool (a small graph runs compiled otherwise)
    out = model(graph)
    block = numpy_backend.size_class(2000 * 16) * 4
    # h1's block is free once h2 is computed, so h3 takes it, and the output takes h2's
    assert model.backend.pool.fresh_bytes == 2 * block
    adjacency = sp.csr_matrix((np.ones(graph.num_edges), (graph.dst, graph.src)), shape=(2000, 2000))
    want = graph["x"].astype(np.float64)
    for _ in range(4):
        want = adjacency @ want
    np.testing.assert_allclose(out, want, rtol=1e-5)


def test_arrays_of_nearby_sizes_share_a_block_size():
    pool = numpy_backend.BufferPool()
    first = pool.take((1000, 64), np.float32)
    pool.give([first])
    second = pool.take((1010, 64), np.float32)  # a slightly larger batch: the same block
    assert numpy_backend.block_of(second) is numpy_backend.block_of(first)
    assert pool.fresh_bytes == numpy_backend.size_class(1000 * 64) * 4 < 1.125 * 1010 * 64 * 4
    for count in range(1, 5000):
        size = numpy_backend.size_class(count)
        assert count <= size <= max(count, 1.125 * count) and numpy_backend.size_class(size) == size
