"""Graph layout decisions: reordering is decided from a sampled estimate before any order is computed
(an order only where it pays), the estimate reads O(sample) edges, the plan report and the run
summary name the decision and its cost, and the order never shows in results."""

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given

sys.path.insert(0, str(Path(__file__).parent))

import mpdsl  # noqa: E402
from mpdsl import plan  # noqa: E402
from strategies import graphs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NODES = plan.REORDER_MIN_NODES + 10_000  # past the size below which auto never reorders


def shuffled_community_graph(nodes=NODES, edges_per_node=5, size=100, seed=2):
    """Communities of ``size`` nodes, 90% of the edges inside one, node ids shuffled."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, nodes, nodes * edges_per_node)
    inside = rng.random(len(src)) < 0.9
    dst = np.where(inside, np.minimum(src // size * size + rng.integers(0, size, len(src)), nodes - 1),
                   rng.integers(0, nodes, len(src)))
    shuffle = rng.permutation(nodes)
    return mpdsl.Graph.from_arrays(np.stack([shuffle[src], shuffle[dst]]), nodes, x=rng.normal(size=(nodes, 4)))


def uniform_graph(nodes=NODES, edges_per_node=5, seed=3):
    rng = np.random.default_rng(seed)
    edge_index = rng.integers(0, nodes, (2, nodes * edges_per_node))
    return mpdsl.Graph.from_arrays(edge_index, nodes, x=rng.normal(size=(nodes, 4)))


@pytest.fixture(scope="module")
def community():
    return shuffled_community_graph()


@pytest.fixture(scope="module")
def uniform():
    return uniform_graph()


def test_reordering_pays_on_a_shuffled_community_graph(community):
    decision = plan.decide_node_order(community, "auto")
    assert decision.order is not None, decision.reason
    assert decision.estimate is not None and decision.estimate.shared >= plan.SHARED_NEIGHBOUR_MIN
    assert decision.estimate.local < plan.ALREADY_LOCAL
    assert decision.ordering_seconds > 0 and decision.deciding_seconds > 0
    before = plan.locality(community.src, community.dst, community.num_nodes)
    order = decision.order
    after = plan.locality(order.inverse[community.src], order.inverse[community.dst], community.num_nodes)
    assert before < 0.1 and after > 0.6, (before, after)
    assert np.array_equal(np.sort(order.perm), np.arange(community.num_nodes))


def test_no_order_is_computed_where_reordering_does_not_pay(uniform, monkeypatch):
    def no_order(*args):
        raise AssertionError("an order was computed although the estimate says it does not pay")

    monkeypatch.setattr(plan, "community_order", no_order)
    decision = plan.decide_node_order(uniform, "auto")
    assert decision.order is None and decision.ordering_seconds == 0
    assert decision.estimate is not None and decision.estimate.shared < plan.SHARED_NEIGHBOUR_MIN
    assert "no community structure" in decision.reason
    with pytest.raises(AssertionError, match="an order was computed"):  # "reorder" computes it regardless
        plan.decide_node_order(uniform, "reorder")


def test_a_graph_already_local_keeps_its_order(community, monkeypatch):
    order = plan.decide_node_order(community, "reorder").order
    relabelled = mpdsl.Graph.from_arrays(order.inverse[community.edge_index], community.num_nodes)
    monkeypatch.setattr(plan, "community_order", lambda *args: pytest.fail("order computed for a local graph"))
    decision = plan.decide_node_order(relabelled, "auto")
    assert decision.order is None and "already local" in decision.reason


@pytest.mark.parametrize("sample", [64, 1000])
def test_the_estimate_reads_a_bounded_number_of_edges(sample):
    small, big = uniform_graph(nodes=2_000), uniform_graph(nodes=40_000, edges_per_node=20)
    rng = np.random.default_rng(0)
    hub = mpdsl.Graph.from_arrays(np.stack([rng.integers(0, 5_000, 100_000), np.zeros(100_000, np.int64)]), 5_000)
    for graph in (small, big, hub):
        estimate = plan.estimate_locality(graph, sample)
        assert estimate.sampled_edges == sample
        assert 0 < estimate.entries_read <= 2 * plan.NEIGHBOURS_READ * sample, (graph, estimate)
    assert plan.estimate_locality(hub, sample).entries_read > plan.NEIGHBOURS_READ * sample  # the hub is capped
    assert plan.estimate_locality(uniform_graph(nodes=50, edges_per_node=2), sample).sampled_edges == min(sample, 100)


def test_the_plan_report_names_the_decision_and_its_cost(community, uniform, tmp_path, capsys, monkeypatch):
    from mpdsl.cli import main
    monkeypatch.setattr(plan, "REORDER_MIN_BYTES", 0)  # these graphs' rows are small: decide from the estimate
    for name, graph in (("community", community), ("uniform", uniform)):
        graph.save(tmp_path / f"{name}.npz")
        assert main(["compile", str(ROOT / "examples" / "gcn.mp"), "--emit", "plan",
                     "--graph", str(tmp_path / f"{name}.npz")]) == 0
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if "[graph layout]" in x and "sampled edges" in x)
        assert "estimate from 4096 sampled edges" in line and "estimated in" in line, line
        if name == "community":
            assert "nodes reordered by METIS partition" in line and "order computed in" in line, line
        else:
            assert "no reordering" in line and "no community structure" in line, line
        assert main(["run", str(ROOT / "examples" / "gcn.mp"), "--graph", str(tmp_path / f"{name}.npz")]) == 0
        summary = capsys.readouterr().err
        expected = ("nodes reordered (METIS partition, decided in" if name == "community"
                    else "nodes as given (decided in")
        assert f"(layout: {expected}" in summary, summary


def test_reordering_a_big_graph_is_invisible(community, monkeypatch):
    monkeypatch.setattr(plan, "REORDER_MIN_BYTES", 0)
    outs = {}
    for layout in ("auto", "none"):
        model = mpdsl.compile(ROOT / "examples" / "sage_max.mp", dtype="float64", seed=1, layout=layout)
        outs[layout] = model(community)
        assert (model.last_layout is not None and model.last_layout.nodes is not None) == (layout == "auto")
    np.testing.assert_allclose(outs["auto"], outs["none"], rtol=1e-10, atol=1e-12)


@given(graphs(min_nodes=4 * plan.LOCALITY_WINDOW, max_nodes=400, max_edges=1500))
def test_reordering_is_invisible_on_drawn_graphs(graph):
    estimate = plan.estimate_locality(graph)
    assert 0 <= estimate.local <= 1 and 0 <= estimate.shared <= 1
    assert estimate.sampled_edges == min(graph.num_edges, plan.SAMPLE_EDGES)
    assert estimate.entries_read <= 2 * plan.NEIGHBOURS_READ * estimate.sampled_edges
    outs = {}
    for layout in ("reorder", "none"):
        model = mpdsl.compile(ROOT / "examples" / "gcn.mp", dtype="float64", seed=1, layout=layout)
        outs[layout] = model(graph)
    np.testing.assert_allclose(outs["reorder"], outs["none"], rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def community_adjacency(community):
    return plan.symmetric_adjacency(community.src, community.dst, community.num_nodes)


@pytest.mark.parametrize("parts", [4, plan.LOCALITY_WINDOW])  # recursive bisection, k-way
@pytest.mark.parametrize("through", ["C API", "pymetis"])
def test_the_partition_is_pymetis_s_for_the_same_graph_and_seed(community_adjacency, through, parts, monkeypatch):
    import pymetis

    from mpdsl import metis
    indptr, indices = community_adjacency
    if through == "pymetis":  # a pymetis build that does not export METIS's functions
        monkeypatch.setattr(metis, "_library", lambda: None)
    expected = pymetis.part_graph(parts, adjacency=pymetis.CSRAdjacency(indptr, indices),
                                  options=pymetis.Options(seed=3)).vertex_part
    np.testing.assert_array_equal(metis.part_graph(indptr, indices, parts, seed=3), expected)


def test_metis_works_with_the_gil_released(community_adjacency):
    """This thread keeps running Python while METIS partitions on another: it ticks all through the
    middle half of the partition's time (with the GIL held it could not tick there at all)."""
    import threading
    import time

    from mpdsl.metis import part_graph
    indptr, indices = community_adjacency
    span: list[float] = []
    finished = threading.Event()

    def work():
        span.append(time.perf_counter())
        part = part_graph(indptr, indices, plan.LOCALITY_WINDOW)
        span.append(time.perf_counter())
        finished.set()
        return part

    ticks: list[float] = []

    def meanwhile():
        while not finished.is_set():
            ticks.append(time.perf_counter())

    plan.overlapped(work, meanwhile)
    start, end = span
    middle = [t for t in ticks if start + (end - start) / 4 <= t <= end - (end - start) / 4]
    assert len(middle) > 100, (len(ticks), end - start)


def test_a_metis_error_is_reported_with_its_status(capfd):
    from mpdsl.metis import MetisError, part_graph
    with pytest.raises(MetisError, match="METIS_PartGraphRecursive returned status -2 .* into 0 parts"):
        part_graph(np.array([0, 1, 2]), np.array([1, 0]), 0)
    capfd.readouterr()  # METIS prints its own message too


def test_the_first_run_loads_the_kernels_while_the_order_is_computed(community, monkeypatch):
    """The backend's warm-up runs once, during the first run's ordering (while METIS works on another
    thread), and the order is the one computed without it."""
    model = mpdsl.compile(ROOT / "examples" / "gcn.mp", seed=1, layout="reorder")
    calls = []
    warm_up = type(model.backend).warm_up
    monkeypatch.setattr(type(model.backend), "warm_up", lambda self: calls.append(1) or warm_up(self))
    graph = mpdsl.Graph.from_arrays(community.edge_index, community.num_nodes, x=community["x"])
    model(graph)
    assert calls == [1]
    model(graph)
    assert calls == [1]
    np.testing.assert_array_equal(model.last_layout.nodes.perm, plan.decide_node_order(community, "reorder").order.perm)


def test_auto_keeps_the_order_where_the_rows_read_stay_small(community, tmp_path, capsys, monkeypatch):
    """Under ``REORDER_MIN_BYTES`` of node rows read by the graph ops, "auto" computes no order (a
    call's relabelling would cost more than it gains); "reorder" still does; past it, the estimate decides."""
    model = mpdsl.compile(ROOT / "examples" / "gcn.mp", dims={"H": 32, "C": 8}, seed=1)
    graph = mpdsl.Graph.from_arrays(community.edge_index, community.num_nodes, x=community["x"])
    program = model.program_for(model.bind(graph, {})[1])
    row_bytes = plan.gathered_row_bytes(program)
    assert row_bytes == (32 + 8) * 4  # the two gspmms read h @ W rows: [N, 32] and [N, 8] float32
    assert graph.num_nodes * row_bytes < plan.REORDER_MIN_BYTES
    monkeypatch.setattr(plan, "community_order", lambda *args: pytest.fail("an order was computed"))
    model(graph)
    assert model.last_layout is None or model.last_layout.nodes is None
    decision = plan.decided_node_order(graph, "auto")
    assert decision is not None and decision.order is None and "160 bytes of node rows per node" in decision.reason
    graph.save(tmp_path / "community.npz")
    from mpdsl.cli import main
    assert main(["compile", str(ROOT / "examples" / "gcn.mp"), "--dim", "H=32", "--dim", "C=8", "--emit", "plan",
                 "--graph", str(tmp_path / "community.npz")]) == 0
    assert "no reordering: the graph ops read" in capsys.readouterr().out
    monkeypatch.setattr(plan, "REORDER_MIN_BYTES", graph.num_nodes * row_bytes)  # now just past it
    fresh = mpdsl.Graph.from_arrays(community.edge_index, community.num_nodes, x=community["x"])
    with pytest.raises(pytest.fail.Exception, match="an order was computed"):
        model(fresh)


def test_the_rows_read_sum_each_graph_op_s_widest_node_operand():
    model = mpdsl.compile(ROOT / "examples" / "gat.mp", dtype="float64", dims={"HEADS": 4, "HID": 8, "C": 3}, seed=1)
    graph = mpdsl.Graph.from_arrays(np.array([[0, 1], [1, 0]]), 2, x=np.zeros((2, 5)))
    program = model.program_for(model.bind(graph, {})[1])
    graph_ops = [v for v in program.values if plan.OPS[v.op].has(plan.Trait.GRAPH)]
    assert [v.op for v in graph_ops] == ["gather", "gather", "attention"] * 2
    # per layer: two gathers of the per-node scores [HEADS], the attention's z [HEADS, K] (K = HID, C)
    assert plan.gathered_row_bytes(program) == 8 * (2 * 4 + 4 * 8) + 8 * (2 * 4 + 4 * 3)
