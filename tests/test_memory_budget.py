"""The memory budget (mpdsl.memory): sizes, where the budget comes from, and the checks made from
declared sizes before parameters are initialised and before a run."""

import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

import mpdsl
from mpdsl import memory
from mpdsl.cli import main
from mpdsl.runtime import initial_value

ROOT = Path(__file__).resolve().parents[1]
GCN = ROOT / "examples" / "gcn.mp"
KARATE = mpdsl.Graph.load(ROOT / "examples" / "data" / "karate.npz")

HUGE_PARAM = """dim H = 100000000
model m(x: node[F], b: param[4], W: param[H, H]) -> node[F] {
    return x
}
"""
EDGE_PRODUCT = """model m(x: node[F]) -> edge[F] {
    return x[src] * x[dst]
}
"""


@pytest.mark.parametrize("text,expected", [
    ("1024", 1024), ("4G", 4 << 30), ("512M", 512 << 20), ("512m", 512 << 20), ("1.5GiB", 3 << 29),
    ("2KB", 2048), (" 3 T ", 3 << 40), ("none", None), ("NONE", None),
])
def test_parse_size(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "4Q", "-1G", "G", "1e9", "4 GB extra", "²"])
def test_parse_size_refuses_other_text(text):
    with pytest.raises(ValueError, match="is not a size"):
        memory.parse_size(text)


def fake_machine(monkeypatch, available: int) -> list[int]:
    """The machine's available memory as ``available`` bytes from now on (no earlier reading kept);
    the list returned counts the readings."""
    readings: list[int] = []
    monkeypatch.setattr(memory, "_recent_bounds", None)
    monkeypatch.setattr(memory, "available_bounds", lambda: readings.append(1) or {memory.AVAILABLE: available})
    return readings


def test_a_small_check_reuses_a_recent_reading_of_the_machine(monkeypatch):
    monkeypatch.delenv(memory.ENV_VAR, raising=False)
    readings = fake_machine(monkeypatch, 1 << 30)
    assert memory.budget(needed=1 << 20).limit == 1 << 30
    assert memory.budget(needed=1 << 20).limit == 1 << 30
    assert len(readings) == 1, "a small check within a second of a reading reuses it"
    memory.budget(needed=(1 << 30) // memory.SMALL_SHARE)
    assert len(readings) == 2, "a check of 1/16 of the reading or more reads the machine again"
    memory.budget()
    assert len(readings) == 3, "a check that does not say what it needs reads the machine"
    now = time.monotonic()
    monkeypatch.setattr(memory.time, "monotonic", lambda: now + memory.RECENT_SECONDS)
    memory.budget(needed=1)
    assert len(readings) == 4, "a reading a second old is not reused"


def test_budget_precedence(monkeypatch):
    fake_machine(monkeypatch, 5 << 30)
    monkeypatch.delenv(memory.ENV_VAR, raising=False)
    assert memory.budget() == memory.Budget(5 << 30, "the machine's available memory")
    monkeypatch.setenv(memory.ENV_VAR, "2G")
    assert memory.budget() == memory.Budget(2 << 30, memory.ENV_VAR)
    with memory.limited("1G"):
        assert memory.budget() == memory.Budget(1 << 30, "--memory-limit")
        assert memory.budget(1000) == memory.Budget(1000, "memory_limit")
        assert memory.budget("none").limit is None
    assert memory.budget().limit == 2 << 30, "the CLI's limit ends with its block"
    monkeypatch.setenv(memory.ENV_VAR, "lots")
    with pytest.raises(mpdsl.MpdslError, match=f"{memory.ENV_VAR}: 'lots' is not a size"):
        memory.budget()
    with pytest.raises(mpdsl.MpdslError, match="memory_limit must not be negative"):
        mpdsl.compile(GCN, memory_limit=-1)
    with pytest.raises(mpdsl.MpdslError, match="memory_limit: '4Q' is not a size"):
        mpdsl.compile(GCN, memory_limit="4Q")


def test_available_memory_is_known_here():
    assert memory.available_memory() > 0


def test_huge_parameters_are_refused_before_initialisation():
    with pytest.raises(mpdsl.CompileError) as info:
        mpdsl.compile(HUGE_PARAM)
    err = info.value
    assert (err.line, err.col) == (2, 34), "the span of W's declaration"
    assert "parameter 'W' [100000000, 100000000] float32 needs 35.5 PiB" in err.message
    assert "(35.5 PiB for all 2), over the memory budget of" in err.message
    assert "--memory-limit" in err.hint
    assert mpdsl.compile(HUGE_PARAM, dims={"H": 3}).params["W"].shape == (3, 3)
    with pytest.raises(mpdsl.CompileError, match="parameter 'W' \\[3, 3\\] float32 needs 36 B \\(52 B for all 2\\)"):
        mpdsl.compile(HUGE_PARAM, dims={"H": 3}, memory_limit=50)


def test_parameters_bound_from_the_data_are_checked_too():
    src = "model m(x: node[F], W: param[F, F]) -> node[F] {\n    return x @ W\n}\n"
    model = mpdsl.compile(src, memory_limit="1K")
    with pytest.raises(mpdsl.CompileError, match="parameter 'W' param\\[F, F\\] = \\[34, 34\\] float32 needs "
                                                 "4.5 KiB, over the memory budget of 1.0 KiB \\(memory_limit\\)"):
        model(KARATE)
    model.memory_limit = "1M"
    assert model(KARATE).shape == (34, 34)


def test_a_run_over_the_budget_names_its_largest_value():
    rng = np.random.default_rng(0)
    graph = mpdsl.Graph.from_arrays(rng.integers(0, 1000, (2, 200_000)), 1000, x=rng.normal(size=(1000, 16)))
    model = mpdsl.compile(EDGE_PRODUCT, memory_limit="8M")
    with pytest.raises(mpdsl.InputError) as info:
        model(graph)
    message = info.value.message
    assert message.startswith("running 'm' on this graph (1000 nodes, 200000 edges) needs about 15.3 MiB, "
                              "over the memory budget of 8.0 MiB (memory_limit)")
    assert "the largest value is `x[src] * x[dst]` (<string>:2:12), edge[16] f32 on 200000 edges: 12.2 MiB" in message
    model.memory_limit = "64M"
    assert model(graph).shape == (200_000, 16)


def test_the_run_check_follows_the_graph_it_runs_on():
    """The planned bytes are reused only for a graph of the same sizes: a larger graph after a small
    one is checked anew."""
    rng = np.random.default_rng(0)
    small = mpdsl.Graph.from_arrays(rng.integers(0, 100, (2, 1000)), 100, x=rng.normal(size=(100, 16)))
    large = mpdsl.Graph.from_arrays(rng.integers(0, 1000, (2, 200_000)), 1000, x=rng.normal(size=(1000, 16)))
    model = mpdsl.compile(EDGE_PRODUCT, memory_limit="8M")
    for _ in range(2):
        assert model(small).shape == (1000, 16)
    with pytest.raises(mpdsl.InputError, match="over the memory budget of 8.0 MiB"):
        model(large)


def test_cli_memory_limit(tmp_path, capsys):
    program = tmp_path / "edge.mp"
    program.write_text(EDGE_PRODUCT)
    karate = str(ROOT / "examples" / "data" / "karate.npz")
    assert main(["run", str(program), "--graph", karate, "--memory-limit", "64K"]) == 1
    err = capsys.readouterr().err
    assert "over the memory budget of 64.0 KiB (--memory-limit)" in err and "edge[34] f32 on 156 edges" in err
    assert "Traceback" not in err
    assert main(["run", str(program), "--graph", karate, "--memory-limit", "1M"]) == 0
    assert main(["run", str(program), "--graph", karate, "--memory-limit", "lots"]) == 2
    assert main(["run", str(program), "--graph", karate, "--memory-limit", "1K"]) == 1
    assert "graph file" in capsys.readouterr().err, "the graph file is checked against the limit too"


def test_float32_parameters_are_drawn_without_a_float64_copy():
    shape = (1024, 1024)  # 4 MiB in float32, 8 MiB in float64
    tracemalloc.start()
    try:
        value = initial_value("glorot", shape, np.random.default_rng(0), np.float32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert value.dtype == np.float32
    assert peak < 4.5 * (1 << 20) + 8 * (1 << 20) // 2, f"peak {peak} B: a whole float64 draw was made"


@pytest.mark.parametrize("init", ["glorot", "normal", "uniform", "zeros", "ones", "0.1"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_initial_values_are_one_float64_draw_cast(init, dtype):
    """The values are unchanged by drawing in pieces: float64 exactly as one draw, float32 that
    draw cast (so a fixed seed gives the same parameters as before)."""
    shape = (1500, 1000)  # more than one piece
    rng = np.random.default_rng([7, zlib.crc32(b"W")])
    bound = np.sqrt(6.0 / (1500 + 1000))
    reference = {"glorot": lambda: rng.uniform(-bound, bound, shape),
                 "normal": lambda: rng.normal(0.0, 1.0 / np.sqrt(1500), shape),
                 "uniform": lambda: rng.uniform(-1 / np.sqrt(1500), 1 / np.sqrt(1500), shape),
                 "zeros": lambda: np.zeros(shape), "ones": lambda: np.ones(shape),
                 "0.1": lambda: np.full(shape, 0.1)}[init]().astype(dtype)
    got = initial_value(init, shape, np.random.default_rng([7, zlib.crc32(b"W")]), dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, reference)


def test_float32_initialisation_is_deterministic():
    a = mpdsl.compile(GCN, seed=3).init(3, F=7).params
    b = mpdsl.compile(GCN, seed=3).init(3, F=7).params
    assert all(np.array_equal(a[k], b[k]) and a[k].dtype == np.float32 for k in a)


def test_a_huge_node_count_is_refused_before_any_index_is_built(tmp_path, capsys):
    graph = tmp_path / "g.npz"
    np.savez(graph, edge_index=np.array([[0], [1]]), num_nodes=np.array(10 ** 12), edge_e=np.ones((1, 2)))
    program = tmp_path / "deg.mp"
    program.write_text("model m(edge_e: edge[F], b: param[1]) -> node[1] {\n    return in_degree() + b\n}\n")
    assert main(["run", str(program), "--graph", str(graph), "--memory-limit", "1G"]) == 1
    err = capsys.readouterr().err
    assert "running 'm' on this graph (1000000000000 nodes, 1 edges) needs about" in err
    assert "over the memory budget of 1.0 GiB (--memory-limit)" in err and "Traceback" not in err
    assert main(["compile", str(program), "--emit", "plan", "--graph", str(graph), "--memory-limit", "1G"]) == 1
    assert "the graph's CSR indices (1000000000000 nodes, 1 edges) need 14.6 TiB" in capsys.readouterr().err
    model = mpdsl.compile(program, memory_limit="1G")
    with pytest.raises(mpdsl.InputError, match=r"\(1000000000000 nodes, 1 edges\) needs about"):
        model.to_torch(mpdsl.Graph.load(graph))(mpdsl.Graph.load(graph))


def test_buffers_kept_for_reuse_count_towards_the_available_memory(monkeypatch):
    rng = np.random.default_rng(0)
    graph = mpdsl.Graph.from_arrays(rng.integers(0, 1000, (2, 200_000)), 1000, x=rng.normal(size=(1000, 16)))
    monkeypatch.delenv(memory.ENV_VAR, raising=False)
    fake_machine(monkeypatch, 10 << 20)  # the run needs about 15.3 MiB
    model = mpdsl.compile(EDGE_PRODUCT)
    model.backend = type(model.backend)()  # a backend of its own, with an empty pool
    with pytest.raises(mpdsl.InputError, match="over the memory budget of 10.0 MiB \\(the machine's available"):
        model(graph)
    model.backend.pool._held = 8 << 20  # what the pool holds is reused by the run
    assert model(graph).shape == (200_000, 16)
    with pytest.raises(mpdsl.InputError, match="over the memory budget of 10.0 MiB \\(memory_limit\\)"):
        model.memory_limit = 10 << 20  # an explicit limit bounds the run's whole size
        model(graph)


def test_the_default_budget_honours_the_address_space_limit():
    """Under ``ulimit -v`` the budget is the address space left, so a parameter past it is refused by
    name instead of failing in NumPy (a subprocess: the limit stays there)."""
    script = (
        "import resource, mpdsl\n"
        "from mpdsl import memory\n"
        "resource.setrlimit(resource.RLIMIT_AS, (memory._read_kib('/proc/self/status', 'VmSize:') + (2 << 30),"
        " resource.RLIM_INFINITY))\n"
        "print(memory.budget().source)\n"
        "try:\n"
        "    mpdsl.compile('model m(x: node[F], W: param[F, 1000000000]) -> node[1000000000] { return x @ W }')"
        ".init(0, F=3)\n"
        "except mpdsl.MpdslError as err:\n"
        "    print(err)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    first, message = done.stdout.split("\n", 1)
    assert first == memory.ADDRESS_SPACE
    assert "parameter 'W'" in message and "address-space limit" in message and "nothing was allocated" in message
