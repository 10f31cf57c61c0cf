"""Sampled mini-batch training: the --sampler specs (and their errors), ``fit_sampled`` against
full-batch ``fit`` and against a training loop written out in the test, the two evaluation modes,
the loss rows of seeded and subgraph batches, and ``mpdsl train --sampler`` end to end (through a
NumPy stand-in for NeighborLoader here; with the real loaders once they are installed)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mpdsl  # noqa: E402
from mpdsl.cli import main  # noqa: E402
from mpdsl.sampling import spec  # noqa: E402
from mpdsl.sampling.loader import SamplingError  # noqa: E402
from mpdsl.sampling.spec import parse_sampler  # noqa: E402
from mpdsl.train import TrainError, batch_loss, evaluation_mode, fit, fit_sampled, load_data  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sampling_helpers import (  # noqa: E402
    SAGE,
    NumpyNeighborLoader,
    block_sampler,
    community_graph,
    compiled,
    neighbor_sampler,
    reference_curve,
)

GCN = str(Path(__file__).resolve().parents[1] / "examples" / "gcn.mp")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data():
    return load_data(community_graph())


# ------------------------------------------------------------------------------------------------
# Specs


@pytest.mark.parametrize("text, name, seeded, covers, batch_size", [
    ("neighbor:15,10", "neighbor", True, True, 1024),
    ("neighbor:-1, 5 ,replace=yes", "neighbor", True, True, 1024),
    ("cluster:100", "cluster", False, True, 1),
    ("saint-node:6000,steps=5,coverage=100", "saint-node", False, False, None),
    ("saint-edge:4000", "saint-edge", False, False, None),
    ("SAINT-RW:2000,4,coverage=0", "saint-rw", False, False, None),
])
def test_specs_parse_without_importing_their_loaders(text, name, seeded, covers, batch_size):
    sampler = parse_sampler(text)
    assert (sampler.name, sampler.seeded, sampler.covers, sampler.batch_size) == (name, seeded, covers, batch_size)


@pytest.mark.parametrize("text, message", [
    ("metis:4", "unknown sampler 'metis'"),
    ("neighbor", "needs its sizes after a colon"),
    ("neighbor:", "needs its sizes after a colon"),
    ("neighbor:15,0", "fanout 2 must be an integer >= 1 or -1 (all neighbours), got '0'"),
    ("neighbor:15,-2", "fanout 2 must be an integer >= 1 or -1"),
    ("neighbor:15,x", "fanout 2 must be an integer"),
    ("neighbor:1.5", "fanout 1 must be an integer"),
    ("neighbor:15,,10", "empty value"),
    ("neighbor:15,replace=maybe", "replace=maybe is not yes or no"),
    ("neighbor:15,steps=3", "the neighbor sampler has no option 'steps'"),
    ("neighbor:replace=yes,15", "'15' comes after the options"),
    ("cluster:0", "the part count must be an integer >= 1, got '0'"),
    ("cluster:4,2", "cluster takes one part count"),
    ("saint-rw:2000", "saint-rw takes the root count and the walk length"),
    ("saint-node:100,steps=0", "steps must be an integer >= 1, got '0'"),
    ("saint-edge:100,coverage=-1", "coverage must be an integer >= 0"),
    ("saint-node:100,steps=2,steps=3", "option steps is given twice"),
])
def test_bad_specs_are_refused_with_one_message(text, message, capsys):
    with pytest.raises(SamplingError, match=None) as caught:
        parse_sampler(text)
    assert message in caught.value.message
    assert main(["train", SAGE, "--data", "unused.npz", "--sampler", text]) == 2
    err = capsys.readouterr().err
    assert "argument --sampler: " in err and message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_parsed_samplers_pickle_as_their_spec():
    import pickle

    sampler = parse_sampler("neighbor:4,-1,replace=yes")
    restored = pickle.loads(pickle.dumps(sampler))
    assert (restored.text, restored.name, restored.seeded) == ("neighbor:4,-1,replace=yes", "neighbor", True)
    helper = pickle.loads(pickle.dumps(neighbor_sampler((2,))))  # a builder defined at module level
    assert helper.name == "numpy-neighbor" and helper.build.args == ((2,),)


def test_a_graphsaint_sampler_takes_no_batch_size(data):
    with pytest.raises(SamplingError, match="draws one subgraph per step and takes no batch size"):
        parse_sampler("saint-node:10").loader(data.graph, data.train, batch_size=4)


def test_default_steps_make_about_one_pass_over_the_nodes(monkeypatch, data):
    built = {}

    def fake(module, name):
        return lambda graph, *sizes, **kw: built.update(name=name, sizes=sizes, **kw)

    monkeypatch.setattr(spec, "_constructor", fake)
    n = data.graph.num_nodes  # 60
    for text, steps in (("saint-node:7", 9), ("saint-edge:7", 5), ("saint-rw:3,4", 4), ("saint-rw:3,4,steps=2", 2)):
        parse_sampler(text).loader(data.graph, data.train)
        assert built["num_steps"] == steps == (int(text.split("=")[1]) if "steps" in text else steps)
        assert "sample_coverage" not in built
    assert -(-n // 7) == 9 and -(-n // 14) == 5 and -(-n // 15) == 4
    parse_sampler("saint-rw:3,4,coverage=20").loader(data.graph, data.train, seed=5, rank=1, world_size=2)
    assert built == {"name": "GraphSAINTRandomWalkLoader", "sizes": (3, 4), "num_steps": 4, "seed": 5, "rank": 1,
                     "world_size": 2, "sample_coverage": 20}
    parse_sampler("neighbor:5,-1,replace=yes").loader(data.graph, data.train, batch_size=8, shuffle=True)
    assert built["name"] == "NeighborLoader" and built["sizes"] == ([5, -1],) and built["replace"] is True
    assert built["batch_size"] == 8 and built["shuffle"] is True
    np.testing.assert_array_equal(built["input_nodes"], data.train)


# ------------------------------------------------------------------------------------------------
# The loss rows


def test_seeded_batches_train_on_their_seed_rows(data):
    loader = neighbor_sampler((2, 2)).loader(data.graph, data.train, batch_size=7, seed=3)
    batch = next(iter(loader))
    out = torch.randn(batch.num_nodes, 3, dtype=torch.float64)
    labels = torch.from_numpy(data.y)
    value, correct, rows = batch_loss(out, batch, labels, None)
    seeds = batch.n_id[:7]
    np.testing.assert_array_equal(seeds, data.train[:7])
    expected = torch.nn.functional.cross_entropy(out[:7], labels[seeds])
    assert rows == 7 and value.item() == pytest.approx(expected.item(), rel=1e-12)
    assert correct == int((out[:7].argmax(1) == labels[seeds]).sum())


def test_subgraph_batches_train_on_their_training_rows_weighted_by_node_norm(data):
    members = np.zeros(data.graph.num_nodes, dtype=bool)
    members[data.train] = True
    labels = torch.from_numpy(data.y)
    for norm in (None, 0.25):
        batch = next(iter(block_sampler(3, norm).loader(data.graph, data.train, batch_size=1)))
        out = torch.randn(batch.num_nodes, 3, dtype=torch.float64)
        value, _, rows = batch_loss(out, batch, labels, members)
        local = np.flatnonzero(members[batch.n_id])
        losses = torch.nn.functional.cross_entropy(out[local], labels[batch.n_id[local]], reduction="none")
        expected = losses.mean() if norm is None else (losses * norm).sum()  # GraphSAINT: the weighted sum
        assert rows == len(local) > 0 and value.item() == pytest.approx(expected.item(), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# fit_sampled


def test_full_neighbourhood_batches_train_exactly_as_full_batch(data):
    """One batch of every training node with all their 2-hop in-edges: the seeds' outputs of a
    2-layer GraphSAGE are the full graph's, so every step, loss and validation figure is fit's."""
    sampled = fit_sampled(compiled(), data, neighbor_sampler((-1, -1)), batch_size=len(data.train), epochs=6,
                          lr=0.05)
    full = fit(compiled(), data, epochs=6, lr=0.05)
    for key in ("loss", "val_loss", "val_metric"):
        np.testing.assert_allclose([r[key] for r in sampled.history], [r[key] for r in full.history], rtol=1e-10)
    for name, weights in full.weights.items():
        np.testing.assert_allclose(sampled.weights[name], weights, rtol=1e-10, atol=1e-14)
    for part in ("train", "val", "test"):
        assert sampled.final[f"{part}_acc"] == full.final[f"{part}_acc"]
        assert sampled.final[f"{part}_loss"] == pytest.approx(full.final[f"{part}_loss"], rel=1e-10)


def test_the_loss_curve_is_the_written_out_loop(data):
    sampler = neighbor_sampler((3, 2))
    result = fit_sampled(compiled(), data, sampler, batch_size=8, epochs=3, lr=0.03)
    curve, weights = reference_curve(data, sampler, epochs=3, batch_size=8, lr=0.03)
    np.testing.assert_allclose([r["loss"] for r in result.history], curve, rtol=1e-10)
    assert len(result.history) == 3 and result.history[0]["loss"] != result.history[1]["loss"]
    if not data.val.size or result.best_epoch == 3:
        for name, value in weights.items():
            np.testing.assert_allclose(result.weights[name], value, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("sampler", [neighbor_sampler((-1, -1)), block_sampler(1)], ids=["neighbor", "blocks"])
def test_sampled_evaluation_is_exact_when_the_batches_are(sampler, data):
    """Full 2-hop neighbourhoods (or one block holding the whole graph) make every evaluated row the
    full graph's, so --eval sampled reports what --eval full does."""
    figures = {}
    for mode in ("full", "sampled"):
        result = fit_sampled(compiled(), data, sampler, batch_size=4 if sampler.seeded else 1, epochs=2,
                             evaluation=mode)
        assert result.final["evaluation"] == mode
        figures[mode] = result
    for key in ("train_acc", "val_acc", "test_acc", "train_loss", "val_loss", "test_loss"):
        assert figures["sampled"].final[key] == pytest.approx(figures["full"].final[key], rel=1e-10)
    np.testing.assert_allclose([r["val_loss"] for r in figures["sampled"].history],
                               [r["val_loss"] for r in figures["full"].history], rtol=1e-10)


def test_sampled_evaluation_of_subgraphs_counts_every_split_node_once(data):
    result = fit_sampled(compiled(GCN), data, block_sampler(4), batch_size=3, epochs=1, evaluation="sampled")
    assert result.final["sizes"] == {"train": 30, "val": 15, "test": 15}
    for part in ("train", "val", "test"):  # accuracy = correct / count: a multiple of 1 / |split|
        size = result.final["sizes"][part]
        assert abs(result.final[f"{part}_acc"] * size - round(result.final[f"{part}_acc"] * size)) < 1e-9


def test_evaluation_modes_and_their_errors(data):
    uncovering = block_sampler(2, covers=False)
    with pytest.raises(TrainError, match="--eval sampled needs a sampler whose one pass covers every node"):
        fit_sampled(compiled(), data, uncovering, epochs=1, evaluation="sampled")
    assert fit_sampled(compiled(), data, uncovering, epochs=1).final["evaluation"] == "full"
    mapped = dataclasses.replace(data, memory_mapped=True)  # a graph directory: too large for one forward
    assert evaluation_mode("auto", block_sampler(2), mapped) == "sampled"
    assert evaluation_mode("auto", uncovering, mapped) == "full"
    assert evaluation_mode("auto", block_sampler(2), data) == "full"
    with pytest.raises(TrainError, match="unknown evaluation 'layerwise'"):
        fit_sampled(compiled(), data, uncovering, epochs=1, evaluation="layerwise")
    with pytest.raises(TrainError, match="sampled training is for node classification"):
        graphs = mpdsl.Graph.batch([community_graph(8, seed=s) for s in range(3)])
        fit_sampled(compiled(), load_data(graphs.with_data(graph_y=np.ones(3)), "graph-regression"), uncovering)


def test_worker_processes_sample_the_same_batches(data):
    runs = [fit_sampled(compiled(), data, neighbor_sampler((3, 2)), batch_size=8, epochs=2, evaluation="sampled",
                        num_workers=workers) for workers in (0, 2)]
    assert runs[0].history[0]["loss"] != runs[0].history[1]["loss"]
    for key in ("loss", "val_loss", "train_metric"):
        np.testing.assert_allclose([r[key] for r in runs[1].history], [r[key] for r in runs[0].history], rtol=1e-12)
    assert runs[1].final == runs[0].final


def test_max_time_stops_sampled_training_after_an_epoch(data):
    result = fit_sampled(compiled(), data, neighbor_sampler((2,)), batch_size=4, epochs=50, max_seconds=1e-9)
    assert len(result.history) == 1 and "stopped after epoch 1" in result.notes[0]


# ------------------------------------------------------------------------------------------------
# The command line, through the NumPy stand-in for NeighborLoader


@pytest.fixture
def numpy_neighbor_loader(monkeypatch):
    real = spec._constructor
    monkeypatch.setattr(spec, "_constructor", lambda module, name: NumpyNeighborLoader if name == "NeighborLoader"
                        else real(module, name))


def test_cli_trains_on_sampled_batches(tmp_path, capsys, numpy_neighbor_loader):
    pytest.importorskip("matplotlib")
    graph_file = tmp_path / "g.npz"
    community_graph().save(graph_file)
    weights, plot, history = tmp_path / "w.npz", tmp_path / "curve.png", tmp_path / "h.json"
    assert main(["train", SAGE, "--data", str(graph_file), "--dim", "C=3", "--dim", "H=8", "--sampler",
                 "neighbor:3,2", "--batch-size", "8", "--epochs", "4", "--lr", "0.05", "--save", str(weights),
                 "--plot", str(plot), "--history", str(history), "--progress"]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 4 and "train_acc" in lines[0] and "val_acc" in lines[0]
    assert "sampler neighbor:3,2" in out and "evaluated full" in out
    assert "[#" in err and "trained sage: 4 epochs" in err and "Traceback" not in err
    record = json.loads(history.read_text())
    assert len(record["history"]) == 4 and record["options"]["sampler"] == "neighbor:3,2"
    assert record["final"]["evaluation"] == "full"
    model = compiled()
    model.load_weights(str(weights))
    assert set(np.load(weights)) == set(model.params)
    scores = model.run(mpdsl.Graph.load(graph_file))["out"]
    data = load_data(str(graph_file))
    accuracy = float((scores[data.test].argmax(1) == data.y[data.test]).mean())
    assert accuracy == pytest.approx(record["final"]["test_acc"])
    assert plot.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "0"], "argument --nproc: expected a positive integer, got '0'"),
    (["--sampler", "neighbor:2", "--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
    (["--sampler", "neighbor:2", "--workers", "-1"], "argument --workers: expected an integer >= 0, got '-1'"),
    (["--sampler", "neighbor:2", "--eval", "layerwise"], "argument --eval: invalid choice: 'layerwise'"),
    (["--dist-timeout", "0"], "argument --dist-timeout: expected a positive number, got '0'"),
])
def test_cli_usage_errors(argv, message, capsys):
    assert main(["train", SAGE, "--data", "unused.npz", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "2"], "2 processes share the batches of an epoch, and full-batch training has one"),
    (["--eval", "sampled"], "--eval sampled evaluates through the --sampler"),
    (["--workers", "2"], "--workers sets the processes sampling batches"),
    (["--sampler", "neighbor:2", "--task", "graph-regression"], "--sampler samples one large graph"),
    (["--sampler", "saint-node:10", "--batch-size", "4"], "takes no batch size"),
    (["--sampler", "saint-node:10", "--eval", "sampled"], "--eval sampled needs a sampler whose one pass"),
])
def test_cli_option_errors(argv, message, tmp_path, capsys):
    graph_file = tmp_path / "g.npz"
    community_graph().save(graph_file)
    assert main(["train", SAGE, "--data", str(graph_file), "--dim", "C=3", *argv]) == 1
    out, err = capsys.readouterr()
    assert message in err and "Traceback" not in err and "epoch" not in out


def test_cli_refuses_nproc_inside_torchrun(monkeypatch, capsys):
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    assert main(["train", SAGE, "--data", "unused.npz", "--sampler", "neighbor:2", "--nproc", "2"]) == 1
    assert "--nproc starts its own ranks, but this process is rank 0 of 2 already" in capsys.readouterr().err
    monkeypatch.delenv("MASTER_PORT")
    assert main(["train", SAGE, "--data", "unused.npz", "--sampler", "neighbor:2"]) == 1
    assert "MASTER_PORT not" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The real loaders, once installed


@pytest.mark.parametrize("module, sampler, batch", [
    ("neighbor", "neighbor:4,3", ["--batch-size", "8"]),
    ("cluster", "cluster:6", ["--batch-size", "2"]),
    ("saint", "saint-rw:4,2,steps=3", []),
    ("saint", "saint-node:12,steps=3,coverage=5", []),
])
def test_cli_trains_with_the_mpdsl_loaders(module, sampler, batch, tmp_path, capsys):
    pytest.importorskip(f"mpdsl.sampling.{module}")
    graph_file = tmp_path / "g.npz"
    community_graph().save(graph_file)
    history = tmp_path / "h.json"
    assert main(["train", SAGE, "--data", str(graph_file), "--dim", "C=3", "--dim", "H=8", "--sampler", sampler,
                 *batch, "--epochs", "3", "--history", str(history)]) == 0
    out, err = capsys.readouterr()
    assert len([line for line in out.splitlines() if line.startswith("epoch")]) == 3, err
    record = json.loads(history.read_text())
    assert len(record["history"]) == 3 and all(np.isfinite(r["loss"]) for r in record["history"])
