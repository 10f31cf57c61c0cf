"""The command line: check / compile / run, exit codes 0 (ok), 1 (user error), 2 (usage)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpdsl.cli import main

ROOT = Path(__file__).resolve().parents[1]
GCN = str(ROOT / "examples" / "gcn.mp")
KARATE = str(ROOT / "examples" / "data" / "karate.npz")


def test_run_prints_result_and_summary(capsys):
    assert main(["run", GCN, "--graph", KARATE]) == 0
    out, err = capsys.readouterr()
    assert "out: shape [34, 4], dtype float32" in out
    assert "[mpdsl] gcn on 34 nodes / 156 edges" in err and "ms" in err and "out: [34, 4] float32" in err


def test_run_writes_outputs_and_weights_that_reload(tmp_path, capsys):
    out1, w = tmp_path / "o1.npz", tmp_path / "w.npz"
    assert main(["run", GCN, "--graph", KARATE, "--seed", "3", "--out", str(out1), "--save-weights", str(w)]) == 0
    out2 = tmp_path / "o2.npz"
    assert main(["run", GCN, "--graph", KARATE, "--weights", str(w), "--out", str(out2)]) == 0
    a, b = np.load(out1)["out"], np.load(out2)["out"]
    np.testing.assert_array_equal(a, b)
    out3 = tmp_path / "o3.npz"
    assert main(["run", GCN, "--graph", KARATE, "--seed", "4", "--out", str(out3)]) == 0
    assert not np.allclose(a, np.load(out3)["out"]), "another seed must give other weights"


def test_run_float64_and_dim_override(tmp_path, capsys):
    out = tmp_path / "o.npz"
    assert main(["run", GCN, "--graph", KARATE, "--dtype", "float64", "--dim", "C=7", "--out", str(out)]) == 0
    result = np.load(out)["out"]
    assert result.shape == (34, 7) and result.dtype == np.float64


def test_check_and_emit(capsys):
    assert main(["check", GCN]) == 0
    assert "ok: model gcn" in capsys.readouterr().out
    assert main(["compile", GCN, "--emit", "ir"]) == 0
    assert capsys.readouterr().out.startswith("program @gcn dims(")
    assert main(["compile", GCN, "--emit", "ast"]) == 0
    assert capsys.readouterr().out.startswith("Module")
    assert main(["compile", GCN, "--emit", "ir", "--locations"]) == 0
    assert 'loc("' in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["run", GCN],                                  # --graph missing
    ["compile", GCN, "--emit", "nonsense"],
    ["frobnicate"],
    [],
    ["run", GCN, "--graph", KARATE, "--dim", "C"],
])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2


def test_user_errors_exit_1(tmp_path, capsys):
    assert main(["check", str(tmp_path / "missing.mp")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert main(["run", GCN, "--graph", str(tmp_path / "missing.npz")]) == 1
    bad_graph = tmp_path / "bad.npz"
    np.savez(bad_graph, edge_index=np.array([[0, 1], [1, 9]]), x=np.zeros((3, 2), np.float32))
    assert main(["run", GCN, "--graph", str(bad_graph)]) == 1
    err = capsys.readouterr().err
    assert "edge_index[1, 1]" in err and "Traceback" not in err
    bad_weights = tmp_path / "w.npz"
    np.savez(bad_weights, W1=np.zeros((34, 16)))
    assert main(["run", GCN, "--graph", KARATE, "--weights", str(bad_weights)]) == 1
    assert "missing" in capsys.readouterr().err


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "mpdsl.cli", "check", GCN], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
