"""Many small batches through one compiled model: what the call path keeps between calls (bound dims,
the run memory plan, graph tables, layouts, parameter views, the buffer pool) never serves a stale
value, and does not grow with the batches.

* A long-lived torch module trained over a stream of batches (batches of one shape signature, the
  same node, edge and graph counts with other edges and features, and batches of other sizes; graphs
  and PyG-style tensors in turn; training and eval mode in turn; an Adam step after each) equals, on
  every batch, a fresh model compiled for that batch alone with the same weights, running statistics
  and dropout masks: outputs, gradients and updated running statistics, float64 rtol 1e-10. GINE
  with batch norm (``examples/gine.mp``) and GCN with dropout (``examples/gcn.mp``).
* The small-graph SciPy products of the NumPy backend's pull CSR equal its compiled kernels
  (``SMALL_PRODUCT = 0``) on hypothesis batches: g-SpMM sums and means (unweighted, per-edge and
  per-group weights) and attention.
* ``contract_rows``' direct plans equal einsum; the buffer pool and the torch module's graph table
  stay bounded when every batch has new sizes.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import mpdsl  # noqa: E402
import mpdsl.torch_module as torch_module  # noqa: E402
from mpdsl.backends import numpy_backend  # noqa: E402
from mpdsl.graph import Graph  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comparison import one_torch_thread  # noqa: E402, F401  (autouse: torch on one thread here)
from strategies import batched_graphs  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
F, FE = 5, 3


def member(rng: np.random.Generator, nodes: int, edges: int, *, self_loop: bool = False) -> Graph:
    """A small molecule-like graph: ``edges`` random edges (multi-edges possible), features ``x`` and
    ``edge_attr``; an isolated node when edges are few."""
    ends = rng.integers(0, nodes, size=(2, edges))
    if self_loop and edges:
        ends[1, 0] = ends[0, 0]
    return Graph(ends, nodes, node_data={"x": rng.normal(size=(nodes, F))},
                 edge_data={"edge_attr": rng.normal(size=(edges, FE))})


def batches(seed: int = 3) -> list[Graph]:
    """Batches 0-2 share one shape signature (members of 3, 4 and 1 nodes with 5, 7 and 0 edges);
    batch 3 has other sizes (a self loop included), batch 4 the signature of 0-2 again."""
    rng = np.random.default_rng(seed)
    same = [Graph.batch([member(rng, 3, 5), member(rng, 4, 7, self_loop=True), member(rng, 1, 0)]) for _ in range(3)]
    other = Graph.batch([member(rng, 6, 9, self_loop=True), member(rng, 2, 1)])
    last = Graph.batch([member(rng, 3, 5), member(rng, 4, 7), member(rng, 1, 0)])
    return [*same, other, last]


def tensor_call(module, graph: Graph):
    """The module on ``graph`` given as PyG-style tensors (found through the module's graph table)."""
    kwargs = {"edge_index": torch.from_numpy(np.array(graph.edge_index)),
              "batch": torch.from_numpy(np.array(graph["batch"])), "num_graphs": graph.num_graphs}
    for name in module.compiled.input_types:
        kwargs[name] = torch.from_numpy(np.array(graph[name]))
    return module(**kwargs)


def loss_of(result) -> torch.Tensor:
    outputs = result.values() if isinstance(result, dict) else [result]
    return sum((o.double() ** 2).sum() for o in outputs)


def as_arrays(result) -> dict[str, np.ndarray]:
    items = result.items() if isinstance(result, dict) else [("out", result)]
    return {k: v.detach().numpy().copy() for k, v in items}


@pytest.mark.parametrize("name", ["gine", "gcn"])
def test_long_lived_module_equals_a_fresh_one_on_every_batch(name):
    source = EXAMPLES / f"{name}.mp"
    stream = batches()
    if name == "gcn":  # node features only: its x is F wide (gcn.mp binds F from the data)
        stream = [g.with_data(edge_attr=np.zeros((g.num_edges, FE))) for g in stream]
    model = mpdsl.compile(source, dtype="float64", seed=1)
    model.init(1, graph=stream[0])
    rng = np.random.default_rng(0)
    for key, value in model.params.items():  # non-zero biases, eps and statistics
        model.params[key] = value + 0.1 * rng.uniform(0.5, 1.5, size=value.shape)
    module = model.to_torch(stream[0])
    optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
    statistics = sorted(module._statistics)
    for step, graph in enumerate(stream * 2):
        training = step % 3 != 2
        by_tensors = step % 2 == 1
        weights = module.weights()
        fresh_model = mpdsl.compile(source, dtype="float64")
        fresh_model.load_weights(weights)
        fresh = fresh_model.to_torch().train(training)
        module.train(training)
        optimizer.zero_grad()
        torch.manual_seed(step)
        got = tensor_call(module, graph) if by_tensors else module(graph)
        loss_of(got).backward()
        torch.manual_seed(step)
        want = fresh(graph)
        loss_of(want).backward()
        for key, value in as_arrays(want).items():
            np.testing.assert_allclose(as_arrays(got)[key], value, rtol=1e-10, atol=1e-12,
                                       err_msg=f"{name} batch {step % len(stream)} step {step}: {key}")
        for pname, p in fresh.named_parameters():
            np.testing.assert_allclose(getattr(module, pname).grad.numpy(), p.grad.numpy(), rtol=1e-10, atol=1e-12,
                                       err_msg=f"{name} step {step}: gradient of {pname}")
        for sname in statistics:
            np.testing.assert_allclose(getattr(module, sname).numpy(), getattr(fresh, sname).numpy(),
                                       rtol=1e-10, atol=1e-12, err_msg=f"{name} step {step}: {sname}")
        optimizer.step()
    if name == "gine":
        assert statistics, "gine.mp's batch norms keep running statistics"


def test_graph_table_and_pool_stay_bounded_over_batches_of_new_sizes():
    rng = np.random.default_rng(4)
    model = mpdsl.compile(EXAMPLES / "gine.mp", dtype="float64")
    first = Graph.batch([member(rng, 3, 4)])
    model.init(0, graph=first)
    module = model.to_torch(first)
    pool = model.backend.pool
    graphs = []
    for size in range(2, 40):
        graph = Graph.batch([member(rng, size, 2 * size), member(rng, 2, 1)])
        loss_of(module(graph) if size % 2 else tensor_call(module, graph)).backward()
        graphs.append(graph)
    assert len(torch_module._GRAPHS) <= torch_module.GRAPH_CACHE_SIZE
    assert sum(len(entries) for entries in torch_module._GRAPHS.values()) <= torch_module.GRAPH_CACHE_SIZE ** 2
    # the pool holds blocks for the sizes the last two steps' graphs use (4 runs: forward and backward),
    # not of every size seen: no more sizes than a fresh pool takes for those two steps, each of them
    # one of those sizes or a larger block that served one (at most LARGER_BLOCK_FACTOR times it)
    held_sizes = {key for key, blocks in pool._free.items() if blocks}
    model.backend.pool = numpy_backend.BufferPool()
    for graph in graphs[-2:]:
        loss_of(module(graph)).backward()
    recent = set(model.backend.pool._used)
    assert held_sizes and len(held_sizes) <= len(recent), (held_sizes, recent)
    for nbytes, dtype in held_sizes:
        assert any(d == dtype and n <= nbytes <= n * numpy_backend.LARGER_BLOCK_FACTOR for n, d in recent), \
            ((nbytes, dtype), recent)
    model.backend.pool = pool
    graph = Graph.batch([member(rng, 5, 9)])
    for _ in range(3):  # one graph again and again: its arrays are reused
        loss_of(module(graph)).backward()
    before = pool.held_bytes
    loss_of(module(graph)).backward()
    assert pool.held_bytes == before > 0


def test_pool_drops_sizes_its_last_runs_did_not_use():
    pool = numpy_backend.BufferPool(keep_runs=2)
    for rows in range(1, 8):
        array = pool.take((rows, 4), np.float64)
        pool.give([array])
    assert pool.held_bytes == sum(rows * 4 * 8 for rows in (6, 7))  # the last two runs
    kept = pool.take((7, 4), np.float64)  # reused, not allocated
    pool.give([kept])
    again = pool.take((2, 14), np.float64)  # a view of the same block, in the shape asked for
    assert again.shape == (2, 14) and numpy_backend.block_of(again) is numpy_backend.block_of(kept)


def test_a_take_without_a_block_of_its_class_uses_a_larger_free_one_up_to_twice_its_size():
    pool = numpy_backend.BufferPool()
    big = pool.take((1000,), np.float32)
    pool.give([big])
    fresh = pool.fresh_bytes
    smaller = pool.take((700,), np.float32)  # another size class, a block of up to twice it is free
    assert numpy_backend.block_of(smaller) is numpy_backend.block_of(big) and pool.fresh_bytes == fresh
    pool.give([smaller])
    tiny = pool.take((400,), np.float32)  # the free block is more than twice this one's class: a fresh one
    assert numpy_backend.block_of(tiny) is not numpy_backend.block_of(big) and pool.fresh_bytes > fresh
    other = pool.take((700,), np.float64)  # another dtype never shares
    assert numpy_backend.block_of(other) is not numpy_backend.block_of(big)


@pytest.mark.parametrize("spec", ["a,a->a", "a->a", "a,a->", "a,b->ab", "a,b,b->ab", "ab,c->abc", "a,b->ba",
                                  "ab,b->a", "a,a,b->ab", "ab,bc->ac"])
def test_contract_rows_plans_equal_einsum(spec):
    rng = np.random.default_rng(2)
    sizes = {"a": 3, "b": 4, "c": 2}
    terms = spec.split("->")[0].split(",")
    for rows in (0, 1, 7):
        xs = [rng.normal(size=(rows,) + tuple(sizes[c] for c in t)) for t in terms]
        want = np.einsum(",".join("R" + t for t in terms) + "->" + spec.split("->")[1], *xs)
        plan = numpy_backend.row_contraction_plan(spec)
        if spec in ("ab,b->a", "ab,bc->ac"):  # not of the planned forms: einsum runs
            assert plan is None
            continue
        np.testing.assert_allclose(plan(xs), want, rtol=1e-12, atol=1e-12, err_msg=f"{spec} on {rows} rows")


FUSED_GRAPH_OPS = {  # programs whose optimized form runs gspmm / attention on the pull CSR
    "sum": "model m(x: node[F]) -> node[F] { return sum(x[src]) by dst }",
    "mean": "model m(x: node[F]) -> node[F] { return mean(x[src]) by dst }",
    "weighted": "model m(x: node[F], w: edge[]) -> node[F] { return sum(w * x[src]) by dst }",
    "weighted mean by src": "model m(x: node[F], w: edge[]) -> node[F] { return mean(w * x[dst]) by src }",
    "per group": "model m(x: node[F], w: edge[F]) -> node[F] { return sum(w * x[src]) by dst }",
    "per group mean": "model m(x: node[F], w: edge[F]) -> node[F] { return mean(w * x[src]) by dst }",
    "gat": EXAMPLES / "gat.mp",
}


@functools.cache
def fused_model(which: str):
    return mpdsl.compile(FUSED_GRAPH_OPS[which], dtype="float64", seed=5)


@settings(max_examples=15, deadline=None)
@given(graph=batched_graphs(max_graphs=4, max_nodes=8, max_edges=20, empty_members=True), seed=st.integers(0, 99))
def test_small_graph_products_equal_the_kernels(graph, seed):
    rng = np.random.default_rng(seed)
    width = graph["x"].shape[1]
    for which in FUSED_GRAPH_OPS:
        model = fused_model(which)
        inputs = {name: rng.uniform(0.1, 2.0, size=(graph.num_edges,) + ((width,) if t.rank else ()))
                  for name, t in model.input_types.items() if name != "x"}
        ops = {v.op for v in model.optimized_for({**model.static_dims, "F": width})[0].values}
        assert ops & {"gspmm", "attention"}, f"{which}: no fused graph op to compare"
        model.init(seed, F=width)
        small = model(graph, **inputs)
        original = numpy_backend.SMALL_PRODUCT
        numpy_backend.SMALL_PRODUCT = 0  # every product through the compiled kernels
        try:
            kernels = model(graph, **inputs)
        finally:
            numpy_backend.SMALL_PRODUCT = original
        np.testing.assert_allclose(small, kernels, rtol=1e-12, atol=1e-14, err_msg=which)


def test_graphs_given_to_the_module_are_not_kept_alive_by_it():
    """A loop over sampled batches drops each batch graph: the module's table of known graphs holds the
    graphs it was given weakly (it still finds a live one again from its tensors)."""
    import gc
    import weakref

    rng = np.random.default_rng(7)
    model = mpdsl.compile(EXAMPLES / "gine.mp", dtype="float64")
    first = Graph.batch([member(rng, 4, 6)])
    model.init(0, graph=first)
    module = model.to_torch(first)
    given = []
    for size in range(3, 8):
        graph = Graph.batch([member(rng, size, 2 * size)])
        loss_of(module(graph)).backward()
        given.append(weakref.ref(graph))
    live = Graph.batch([member(rng, 9, 12)])
    loss_of(module(live)).backward()
    del graph
    gc.collect()
    assert all(ref() is None for ref in given)
    structure = torch_module._structure_tensors(live, torch.device("cpu"))
    assert torch_module.graph_of(structure, live.num_nodes) is live
