"""Checks made when data meets a program at run time, and the CLI's handling of options and
output paths: each problem is a user error (exit 1, or 2 for bad usage), never a traceback."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest

import mpdsl
from mpdsl.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_inputs import graph_holding, synth_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GCN = str(ROOT / "examples" / "gcn.mp")
KARATE_PATH = str(ROOT / "examples" / "data" / "karate.npz")
KARATE = mpdsl.Graph.load(KARATE_PATH)
EXAMPLES = sorted((ROOT / "examples").glob("*.mp"))

STATIC_INDEX = "model m(x: node[F], W: param[F, 2]) -> node[] {\n    h = x @ W\n    return x[7] + h[1]\n}\n"


def small_graph(nodes: int = 4, features: int = 4) -> mpdsl.Graph:
    return mpdsl.Graph([[0, 1, 2, 3], [1, 2, 3, 0]], nodes, node_data={"x": np.ones((nodes, features))})


# ---- static shape rules with dims bound from the data --------------------------------------------


def test_a_static_index_beyond_a_dim_bound_from_data_points_at_the_index():
    model = mpdsl.compile(STATIC_INDEX)
    with pytest.raises(mpdsl.CompileError) as info:
        model(small_graph(features=4))
    err = info.value
    assert (err.line, err.col) == (3, 12)
    assert err.message == "index 7 is out of range for an axis of size 4 (with F = 4 from input 'x')"
    assert model(small_graph(features=8)).shape == (4,)


def test_a_static_index_beyond_a_dim_bound_from_weights():
    model = mpdsl.compile(STATIC_INDEX).load_weights({"W": np.zeros((5, 2))})
    with pytest.raises(mpdsl.CompileError, match=r"size 5 \(with F = 5 from weight 'W'\)"):
        model(small_graph(features=5))
    with pytest.raises(mpdsl.CompileError, match=r"size 6 \(with F = 6 from init\(F=6\)\)"):
        model.init(0, F=6)(small_graph(features=6))


# ---- keyword inputs ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,where", [(np.nan, "x[3, 5] is nan"), (np.inf, "x[3, 5] is inf"),
                                       (-np.inf, "x[3, 5] is -inf")])
def test_non_finite_keyword_inputs_are_refused_as_a_graphs_are(bad, where):
    x = np.ones((34, 34))
    x[3, 5] = bad
    model = mpdsl.compile(GCN)
    with pytest.raises(mpdsl.InputError, match=re.escape(f"input {where}")):
        model(KARATE, x=x)
    with pytest.raises(mpdsl.GraphError, match=re.escape(where)):
        KARATE.with_data(x=x)


def test_float64_values_beyond_float32_are_refused_not_made_infinite():
    x = np.zeros((34, 34))
    x[2, 9] = 1e39
    with pytest.raises(mpdsl.InputError, match=r"input x\[2, 9\] = 1e\+39 is beyond the range of float32"):
        mpdsl.compile(GCN)(KARATE, x=x)
    with pytest.raises(mpdsl.InputError, match=r"input x\[2, 9\] = 1e\+39 is beyond"):
        mpdsl.compile(GCN)(KARATE.with_data(x=x))
    assert np.isfinite(mpdsl.compile(GCN, dtype="float64")(KARATE, x=x)).all()
    model = mpdsl.compile(GCN).init(0, graph=KARATE)
    weights = {k: v.astype(np.float64) for k, v in model.params.items()}
    weights["b2"][1] = -1e300
    with pytest.raises(mpdsl.WeightsError, match=r"weight b2\[1\] = -1e\+300 is beyond the range of float32"):
        model.load_weights(weights)


# ---- seeds and dims ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True])
def test_bad_seeds_are_user_errors(seed):
    with pytest.raises(mpdsl.InputError, match="seed must be a non-negative integer"):
        mpdsl.compile(GCN, seed=seed)
    with pytest.raises(mpdsl.InputError, match="seed must be a non-negative integer"):
        mpdsl.compile(GCN).init(seed, graph=KARATE)


def test_unknown_dim_names_are_errors_with_a_suggestion():
    for wrong in ("h", "HH"):
        with pytest.raises(mpdsl.CompileError, match=f"model 'gcn' has no dim named '{wrong}'") as info:
            mpdsl.compile(GCN, dims={wrong: 8})
        assert info.value.hint == "did you mean 'H'? its dims are: C, F, H"
    with pytest.raises(mpdsl.CompileError, match="no dim named 'WIDTH'") as info:
        mpdsl.compile(GCN, dims={"WIDTH": 8})
    assert info.value.hint == "its dims are: C, F, H"
    assert mpdsl.compile(GCN, dims={"H": 8, "F": 34})(KARATE).shape == (34, 4), "F of an input type may be fixed"
    with pytest.raises(mpdsl.MpdslError, match="dims must be a mapping"):
        mpdsl.compile(GCN, dims=[("H", 8)])
    with pytest.raises(mpdsl.CompileError, match="not a non-negative integer"):
        mpdsl.compile(GCN, dims={"H": True})


@pytest.mark.parametrize("argv,phrase", [
    (["--dim", "H=²"], "--dim expects NAME=INT"),
    (["--dim", "H=١٢"], "--dim expects NAME=INT"),
    (["--dim", "H=4", "--dim", "H=5"], "--dim H is given twice"),
    (["--seed", "-1"], "--seed: must be a non-negative integer"),
    (["--seed", "²"], "--seed: must be a non-negative integer"),
])
def test_cli_usage_errors(argv, phrase, capsys):
    assert main(["run", GCN, "--graph", KARATE_PATH, *argv]) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err


def test_cli_unknown_dim_name(capsys):
    assert main(["run", GCN, "--graph", KARATE_PATH, "--dim", "Hh=3"]) == 1
    err = capsys.readouterr().err
    assert "model 'gcn' has no dim named 'Hh'" in err and "did you mean 'H'?" in err


# ---- output paths --------------------------------------------------------------------------------


def test_out_writes_exactly_the_path_given(tmp_path, capsys):
    out, weights = tmp_path / "result", tmp_path / "params.bin"
    assert main(["run", GCN, "--graph", KARATE_PATH, "--out", str(out), "--save-weights", str(weights)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.bin", "result"]
    assert np.load(out)["out"].shape == (34, 4)
    assert set(np.load(weights).files) == {"W1", "b1", "W2", "b2"}


@pytest.mark.parametrize("option", ["--out", "--save-weights"])
def test_bad_output_paths_fail_before_running(option, tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "out.npz"
    assert main(["run", GCN, "--graph", KARATE_PATH, option, str(missing)]) == 1
    out, err = capsys.readouterr()
    assert f"the folder '{missing.parent}' does not exist" in err and "Traceback" not in err
    assert out == "", "the path is checked before the model runs"
    assert main(["run", GCN, "--graph", KARATE_PATH, option, str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "it is a directory" in err
    assert list(tmp_path.iterdir()) == [] and not Path(str(tmp_path) + ".npz").exists()


def test_save_weights_writes_exactly_the_path_given(tmp_path):
    model = mpdsl.compile(GCN).init(0, graph=KARATE)
    model.save_weights(tmp_path / "w")
    assert [p.name for p in tmp_path.iterdir()] == ["w"]
    with pytest.raises(mpdsl.WeightsError, match="does not exist"):
        model.save_weights(tmp_path / "missing" / "w.npz")


# ---- weights round trips -------------------------------------------------------------------------


def test_product_dims_from_the_data_load_back(tmp_path, capsys):
    program = tmp_path / "product.mp"
    program.write_text("model m(x: node[F], W: param[2 * F, 4]) -> node[4] {\n"
                       "    return concat(x, x, axis=-1) @ W\n}\n")
    graph = tmp_path / "g.npz"
    small_graph(features=3).save(graph)
    w, out1, out2 = tmp_path / "w.npz", tmp_path / "o1.npz", tmp_path / "o2.npz"
    assert main(["run", str(program), "--graph", str(graph), "--seed", "5", "--save-weights", str(w),
                 "--out", str(out1)]) == 0
    assert main(["run", str(program), "--graph", str(graph), "--weights", str(w), "--out", str(out2)]) == 0
    np.testing.assert_array_equal(np.load(out1)["out"], np.load(out2)["out"])


def example_graph(model: mpdsl.CompiledModel) -> mpdsl.Graph:
    """A 12-node graph holding every input the model reads."""
    rng = np.random.default_rng(1)
    nodes = 12
    edge_index = np.concatenate([np.stack([np.arange(nodes), (np.arange(nodes) + 1) % nodes]),
                                 rng.integers(0, nodes, (2, 24))], axis=1)
    base = mpdsl.Graph(edge_index, nodes, node_data={"batch": np.repeat([0, 1], nodes // 2)})
    return graph_holding(model, base, synth_inputs(model, base, rng), {"batch": base["batch"]})


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_examples_saved_weights_load_back_through_the_cli(example, tmp_path, capsys):
    graph = tmp_path / "g.npz"
    example_graph(mpdsl.compile(example)).save(graph)
    w, out1, out2 = tmp_path / "w.npz", tmp_path / "o1.npz", tmp_path / "o2.npz"
    common = ["run", str(example), "--graph", str(graph)]
    assert main(common + ["--seed", "3", "--save-weights", str(w), "--out", str(out1)]) == 0, capsys.readouterr().err
    assert main(common + ["--seed", "4", "--weights", str(w), "--out", str(out2)]) == 0, capsys.readouterr().err
    first, second = np.load(out1), np.load(out2)
    assert first.files == second.files
    for name in first.files:
        np.testing.assert_array_equal(first[name], second[name])


@pytest.mark.parametrize("name", ["rgcn", "hgt", "rgat"])
def test_out_of_range_ids_name_the_callers_position_when_the_graph_is_reordered(name):
    """A reordered graph (layout "reorder") must not move the position an id error names: the ids that
    are model inputs are checked before the layout, by CompiledModel.run and by the torch module."""
    from test_passes import random_graph

    graph = random_graph(0, nodes=30, edges=90)
    model = mpdsl.compile(ROOT / "examples" / f"{name}.mp", layout="reorder")
    inputs = synth_inputs(model, graph, np.random.default_rng(0), keep_graph_features=True)
    key = "edge_type" if "edge_type" in inputs else "node_type"
    inputs[key] = inputs[key].copy()
    inputs[key][3] = 99
    with pytest.raises(mpdsl.InputError) as err:
        model.run(graph, **inputs)
    assert err.value.message.startswith(f"{key}[3] = 99 is out of range"), err.value.message
    assert model.last_layout is None or model.last_layout.nodes is not None
    torch = pytest.importorskip("torch")
    module = model.to_torch(graph)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with pytest.raises(mpdsl.InputError) as err:
        module(graph, **tensors)
    assert err.value.message.startswith(f"{key}[3] = 99 is out of range"), err.value.message
