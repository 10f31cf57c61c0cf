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


# A sum onto source nodes: CSR by source on the cpu target, COO + atomics on the gpu target.
BY_SRC = """
dim F = 8

model out_sum(x: node[F], W: param[F, F]) -> node[F] {
    return sum(x[dst] @ W) by src
}
"""


def by_src_program(tmp_path) -> str:
    path = tmp_path / "by_src.mp"
    path.write_text(BY_SRC)
    return str(path)


def test_emit_triton_shows_the_gpu_targets_coo_kernel(tmp_path, capsys):
    path = by_src_program(tmp_path)
    assert main(["compile", path, "--emit", "triton"]) == 0
    out = capsys.readouterr().out
    assert '{by="src", layout="coo", reduce="sum"}' in out
    assert "def mpdsl_gspmm_coo_sum_" in out and "tl.atomic_add" in out
    assert "csr_src" not in out
    assert main(["compile", path, "--emit", "triton", "--target", "gpu"]) == 0
    assert capsys.readouterr().out == out


def test_emit_triton_with_target_cpu_is_a_usage_error(tmp_path, capsys):
    assert main(["compile", by_src_program(tmp_path), "--emit", "triton", "--target", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "--emit triton" in err and "gpu" in err and "Traceback" not in err


def test_target_picks_the_layouts_of_emit_ir_opt(tmp_path, capsys):
    path = by_src_program(tmp_path)
    expected = {"cpu": 'layout="csr_src"', "gpu": 'layout="coo"'}
    for target, layout in expected.items():
        assert main(["compile", path, "--emit", "ir-opt", "--target", target]) == 0
        out = capsys.readouterr().out
        assert layout in out and expected["gpu" if target == "cpu" else "cpu"] not in out
    assert main(["compile", path, "--emit", "ir-opt"]) == 0  # numpy backend: the cpu target
    assert expected["cpu"] in capsys.readouterr().out


def test_backend_triton_defaults_to_the_gpu_target(tmp_path, capsys):
    pytest.importorskip("triton")
    assert main(["compile", by_src_program(tmp_path), "--emit", "ir-opt", "--backend", "triton"]) == 0
    assert 'layout="coo"' in capsys.readouterr().out


def test_target_in_emit_plan(tmp_path, capsys):
    path = by_src_program(tmp_path)
    rng = np.random.default_rng(0)
    graph = tmp_path / "g.npz"
    np.savez(graph, edge_index=rng.integers(0, 20, (2, 60)), x=rng.normal(size=(20, 8)).astype(np.float32))
    assert main(["compile", path, "--emit", "plan", "--graph", str(graph), "--target", "cpu"]) == 0
    cpu = capsys.readouterr().out
    assert main(["compile", path, "--emit", "plan", "--graph", str(graph), "--target", "gpu"]) == 0
    gpu = capsys.readouterr().out
    assert "csr_src" in cpu and "coo" not in cpu
    assert "coo" in gpu and "csr_src" not in gpu
    assert "gpu target: the graph runs in its given order" in gpu and "given order" not in cpu


@pytest.mark.parametrize("argv", [
    ["compile", GCN, "--emit", "ir-opt", "--target", "tpu"],
    ["compile", GCN, "--emit", "ir-opt", "--target"],
    ["run", GCN, "--graph", KARATE, "--target", "CPU"],
])
def test_bad_target_is_a_usage_error(argv, capsys):
    assert main(argv) == 2
    assert "--target" in capsys.readouterr().err


def test_run_with_the_gpu_target(tmp_path, capsys):
    out_cpu, out_gpu = tmp_path / "cpu.npz", tmp_path / "gpu.npz"
    assert main(["run", GCN, "--graph", KARATE, "--layout", "reorder", "--out", str(out_cpu)]) == 0
    assert main(["run", GCN, "--graph", KARATE, "--layout", "reorder", "--target", "gpu", "--out", str(out_gpu)]) == 0
    np.testing.assert_allclose(np.load(out_gpu)["out"], np.load(out_cpu)["out"], rtol=1e-5, atol=1e-6)
