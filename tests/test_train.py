"""Training: ``mpdsl train`` end to end (node classification on the karate club, graph regression on
a few of RDKit's TPSA molecules), the saved weights and plot, user errors (exit 1, a message, no
traceback), usage errors (exit 2) and ``Graph.select_graphs``."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mpdsl  # noqa: E402
from mpdsl.cli import main  # noqa: E402
from mpdsl.diagnostics import GraphError  # noqa: E402
from mpdsl.graph import Graph  # noqa: E402
from mpdsl.train import TrainError, fit, load_data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GCN = str(ROOT / "examples" / "gcn.mp")
MPNN = str(ROOT / "examples" / "mpnn.mp")
KARATE = str(ROOT / "examples" / "data" / "karate.npz")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def karate_with_masks(path: Path, **drop: bool) -> str:
    graph = Graph.load(KARATE)
    rng = np.random.default_rng(0)
    order = rng.permutation(graph.num_nodes)
    masks = {}
    for name, part in zip(("train_mask", "val_mask", "test_mask"), np.split(order, [12, 20])):
        mask = np.zeros(graph.num_nodes, dtype=bool)
        mask[part] = True
        if not drop.get(name):
            masks[name] = mask
    graph.with_data(**masks).save(path)
    return str(path)


def accuracy_of_saved_weights(tmp_path: Path, weights: Path, nodes: np.ndarray) -> float:
    out = tmp_path / "out.npz"
    assert main(["run", GCN, "--graph", KARATE, "--weights", str(weights), "--out", str(out)]) == 0
    scores = np.load(out)["out"]
    y = np.load(KARATE)["y"]
    return float((scores[nodes].argmax(-1) == y[nodes]).mean())


# ------------------------------------------------------------------------------------------------
# Node classification


def test_cli_trains_gcn_on_karate_and_writes_weights_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    weights, plot, history = tmp_path / "best.npz", tmp_path / "curve.png", tmp_path / "h.json"
    assert main(["train", GCN, "--data", KARATE, "--split", "karate-4", "--epochs", "30",
                 "--weight-decay", "5e-4", "--save", str(weights), "--plot", str(plot),
                 "--history", str(history), "--progress"]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 30 and "loss" in lines[0] and "train_acc" in lines[0] and " s" in lines[0]
    assert "train/val/test 4/0/30 nodes" in out and "best epoch 30 (no validation split" in out
    assert "[#" in err and "%" in err and "trained gcn: 30 epochs" in err          # the progress bar
    record = json.loads(history.read_text())
    assert record["best_epoch"] == 30 and len(record["history"]) == 30
    assert record["history"][-1]["loss"] < record["history"][0]["loss"]
    # karate-4 is PyG's KarateClub train_mask: the first node of each class; test on the other 30
    data = load_data(KARATE, split="karate-4")
    np.testing.assert_array_equal(data.train, [0, 4, 8, 24])
    test_acc = record["final"]["test_acc"]
    assert f"test_acc {test_acc:.4f}" in out and test_acc > 0.5
    assert accuracy_of_saved_weights(tmp_path, weights, data.test) == pytest.approx(test_acc)
    assert plot.read_bytes()[:8] == PNG_SIGNATURE and plot.stat().st_size > 2000


def test_best_epoch_is_chosen_by_validation_accuracy(tmp_path, capsys):
    data_file = karate_with_masks(tmp_path / "k.npz")
    weights, history = tmp_path / "best.npz", tmp_path / "h.json"
    assert main(["train", GCN, "--data", data_file, "--epochs", "25", "--lr", "0.02", "--seed", "3",
                 "--save", str(weights), "--history", str(history), "--log-every", "10"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith("epoch")]) == 4  # 1, 10, 20, 25
    record = json.loads(history.read_text())
    epochs = record["history"]
    best = max(epochs, key=lambda r: (r["val_metric"], -r["val_loss"]))
    assert record["best_epoch"] == best["epoch"]
    assert record["final"]["val_acc"] == pytest.approx(best["val_metric"])
    data = load_data(data_file)
    assert data.split == "masks" and (data.train.size, data.val.size, data.test.size) == (12, 8, 14)
    assert accuracy_of_saved_weights(tmp_path, weights, data.val) == pytest.approx(record["final"]["val_acc"])
    assert accuracy_of_saved_weights(tmp_path, weights, data.test) == pytest.approx(record["final"]["test_acc"])


def test_training_is_repeatable_and_uses_dropout_only_in_training():
    data = load_data(KARATE, split="karate-4")
    runs = []
    for _ in range(2):
        model = mpdsl.compile(GCN, seed=1)
        runs.append(fit(model, data, epochs=5, lr=0.01, seed=1))
    assert [r["loss"] for r in runs[0].history] == [r["loss"] for r in runs[1].history]
    # the final (eval-mode) training accuracy of the last epoch is the logged one: no dropout in eval
    assert runs[0].final["train_acc"] == runs[0].history[-1]["train_metric"]


# ------------------------------------------------------------------------------------------------
# Graph regression


@pytest.fixture(scope="module")
def molecules(tmp_path_factory):
    chem = pytest.importorskip("mpdsl.chem")
    pytest.importorskip("rdkit")
    dataset = chem.tpsa_dataset(limit=160)
    path = tmp_path_factory.mktemp("tpsa") / "tpsa160.npz"
    dataset.graph.with_data(graph_y=dataset.y).save(path)
    return path


def test_graph_regression_loss_decreases_and_weights_predict_in_target_units(molecules):
    data = load_data(str(molecules))
    assert data.task == "graph-regression" and data.split == "80-10-10"
    assert (data.train.size, data.val.size, data.test.size) == (128, 16, 16)
    model = mpdsl.compile(MPNN, seed=0)
    result = fit(model, data, epochs=4, lr=0.005, batch_size=16, seed=0)
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < losses[0], losses
    assert result.target_scale is not None                     # ... @ Wr2 + br2: standardised, folded
    # the compiled model holds the best weights with the scale folded in: raw TPSA predictions
    predicted = model(data.graph).reshape(-1)
    mae = float(np.abs(predicted[data.test] - data.y[data.test, 0]).mean())
    assert mae == pytest.approx(result.final["test_mae"], rel=1e-4)
    assert result.final["baseline_test_mae"] > 0


def test_cli_graph_regression_on_tpsa_subset(tmp_path, capsys):
    pytest.importorskip("rdkit")
    weights = tmp_path / "w.npz"
    assert main(["train", MPNN, "--data", "tpsa", "--limit", "100", "--epochs", "2", "--batch-size", "20",
                 "--loss", "l1", "--lr", "0.003", "--save", str(weights)]) == 0
    out = capsys.readouterr().out
    assert "graph-regression" in out and "train/val/test 80/10/10 graphs" in out
    assert "train_mae" in out and "test_mae" in out and "baseline (training mean" in out
    assert set(np.load(weights).files) == set(mpdsl.compile(MPNN).param_types)


def test_output_that_cannot_absorb_the_scale_trains_on_the_raw_target(molecules):
    source = "model pooled(x: node[F], W: param[F, 1]) -> graph[1] { return sum(x @ W) by graph }"
    data = load_data(str(molecules))
    result = fit(mpdsl.compile(source), data, epochs=2, lr=0.05, batch_size=32)
    assert result.target_scale is None and "not standardised" in result.notes[0]
    assert result.history[-1]["loss"] < result.history[0]["loss"]


# ------------------------------------------------------------------------------------------------
# Errors


def user_error(argv, capsys, *fragments):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_user_errors_exit_1_with_a_message(tmp_path, capsys, monkeypatch):
    user_error(["train", GCN, "--data", KARATE], capsys, "no train_mask", "--split karate-4")
    no_labels = tmp_path / "nolabels.npz"
    np.savez(no_labels, edge_index=np.load(KARATE)["edge_index"], x=np.load(KARATE)["x"])
    user_error(["train", GCN, "--data", str(no_labels), "--split", "karate-4"], capsys, "no node labels 'y'")
    user_error(["train", GCN, "--data", KARATE, "--split", "karate-4", "--dim", "C=2"], capsys,
               "4 classes", "C=4")
    user_error(["train", MPNN, "--data", KARATE, "--split", "karate-4"], capsys, "does not fit node-classification")
    user_error(["train", GCN, "--data", KARATE, "--task", "graph-regression"], capsys, "no graph targets 'graph_y'")
    only_train = karate_with_masks(tmp_path / "partial.npz", val_mask=True)
    user_error(["train", GCN, "--data", only_train, "--split", "masks"], capsys, "no val_mask")
    user_error(["train", GCN, "--data", str(tmp_path / "missing.npz"), "--split", "karate-4"], capsys,
               "does not exist")
    user_error(["train", str(tmp_path / "missing.mp"), "--data", KARATE, "--split", "karate-4"], capsys,
               "no such file")
    user_error(["train", GCN, "--data", KARATE, "--split", "80-10-10"], capsys, "graph regression")
    monkeypatch.setitem(sys.modules, "matplotlib", None)                 # matplotlib not installed
    user_error(["train", GCN, "--data", KARATE, "--split", "karate-4", "--plot", str(tmp_path / "c.png")],
               capsys, "matplotlib", "mpdsl[train]")
    assert not (tmp_path / "c.png").exists()


def test_graph_regression_user_errors(molecules, capsys):
    user_error(["train", GCN, "--data", str(molecules)], capsys, "does not fit graph-regression")
    user_error(["train", MPNN, "--data", str(molecules), "--task", "node-classification"], capsys,
               "no node labels 'y'")
    user_error(["train", MPNN, "--data", str(molecules), "--split", "karate-4"], capsys, "node classification")
    with pytest.raises(TrainError, match="--limit"):
        load_data(KARATE, split="karate-4", limit=3)


@pytest.mark.parametrize("argv", [
    ["train", GCN],                                                    # --data missing
    ["train", GCN, "--data", KARATE, "--epochs", "0"],
    ["train", GCN, "--data", KARATE, "--lr", "-1"],
    ["train", GCN, "--data", KARATE, "--task", "link-prediction"],
    ["train", GCN, "--data", KARATE, "--split", "random"],
    ["train", GCN, "--data", KARATE, "--loss", "huber"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2


# ------------------------------------------------------------------------------------------------
# Graph.select_graphs


def small_graphs() -> list[Graph]:
    rng = np.random.default_rng(5)
    graphs = []
    for g, n in enumerate([3, 1, 4, 2]):
        edges = rng.integers(0, n, size=(2, 2 * n))
        graphs.append(Graph(edges, n, node_data={"x": rng.normal(size=(n, 2))},
                            edge_data={"edge_attr": rng.normal(size=(2 * n, 3))},
                            graph_data={"graph_y": np.array([float(g)])}))
    return graphs


def assert_same_graph(a: Graph, b: Graph) -> None:
    assert a.num_nodes == b.num_nodes and a.num_graphs == b.num_graphs and sorted(a.keys()) == sorted(b.keys())
    np.testing.assert_array_equal(a.edge_index, b.edge_index)
    for name in a.keys():
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_select_graphs_is_the_batch_of_the_selected_graphs():
    graphs = small_graphs()
    batch = Graph.batch(graphs)
    for picks in ([2, 0], [3], [0, 1, 2, 3], [1, 3, 0]):
        assert_same_graph(batch.select_graphs(picks), Graph.batch([graphs[i] for i in picks]))
    assert_same_graph(batch.select_graphs(np.array([3, 1], dtype=np.uint8)), Graph.batch([graphs[3], graphs[1]]))
    single = graphs[2].select_graphs([0])                      # no batch vector: one graph
    assert single.num_graphs == 1 and np.array_equal(single.edge_index, graphs[2].edge_index)
    empty = batch.select_graphs([])
    assert empty.num_nodes == 0 and empty.num_graphs == 0 and empty["graph_y"].shape == (0,)


def test_select_graphs_groups_nodes_by_graph_as_derived():
    """select_graphs knows its result's grouping by graph without sorting; it equals the one derived
    from the batch vector (empty graphs and an empty selection included)."""
    graphs = small_graphs()
    no_nodes = Graph(np.zeros((2, 0), dtype=np.int64), 0, node_data={"x": np.zeros((0, 2))},
                     edge_data={"edge_attr": np.zeros((0, 3))}, graph_data={"graph_y": np.array([9.0])})
    batch = Graph.batch(graphs[:2] + [no_nodes] + graphs[2:])
    for picks in ([2, 0], [3], [0, 1, 2, 3, 4], [1, 2, 4, 0], []):
        selected = batch.select_graphs(picks)
        derived = Graph(selected.edge_index, selected.num_nodes, node_data=selected.node_data)
        for got, expected in zip(selected.segments_by_graph(), derived.segments_by_graph()):
            np.testing.assert_array_equal(got, expected)
            assert got.dtype == expected.dtype and not got.flags.writeable


def test_select_graphs_with_unsorted_batch_and_cross_edges():
    # nodes of two graphs interleaved; the edge 0 -> 1 joins graph 0 to graph 1
    graph = Graph([[0, 1, 2, 3], [1, 3, 0, 2]], 4, node_data={"batch": np.array([0, 1, 0, 1]),
                                                               "x": np.arange(4.0)})
    swapped = graph.select_graphs([1, 0])
    np.testing.assert_array_equal(swapped["x"], [1.0, 3.0, 0.0, 2.0])
    np.testing.assert_array_equal(swapped["batch"], [0, 0, 1, 1])
    # edges grouped by their destination's graph (0 -> 1 and 1 -> 3, then 2 -> 0 and 3 -> 2), renumbered
    np.testing.assert_array_equal(swapped.edge_index, [[2, 0, 3, 1], [0, 1, 2, 3]])
    alone = graph.select_graphs([1])
    np.testing.assert_array_equal(alone.edge_index, [[0], [1]])  # edges with an end outside are dropped


@pytest.mark.parametrize("indices, message", [
    ([4], "indices[0] = 4 is out of range for num_graphs=4"),
    ([1, -1], "indices[1] = -1 is out of range"),
    ([2, 0, 2], "indices[2] = 2 is selected twice (also indices[0])"),
    ([[0, 1]], "1-D array of graph ids"),
    ([0.5], "1-D array of graph ids"),
])
def test_select_graphs_errors(indices, message):
    with pytest.raises(GraphError, match=re.escape(message)):
        Graph.batch(small_graphs()).select_graphs(indices)
