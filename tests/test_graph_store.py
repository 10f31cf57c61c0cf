"""Tests of the graph directory format (mpdsl.store): round trips, memory maps, the saved CSR,
the validation stamp, and every kind of bad directory."""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpdsl import store
from mpdsl.diagnostics import GraphError
from mpdsl.graph import Graph

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategies import batched_graphs, graphs

REPO = Path(__file__).resolve().parents[1]


def sample_graph(num_nodes: int = 50, num_edges: int = 300, features: int = 4, seed: int = 0) -> Graph:
    rng = np.random.default_rng(seed)
    return Graph.from_arrays(
        rng.integers(0, num_nodes, size=(2, num_edges)), num_nodes,
        x=rng.standard_normal((num_nodes, features)).astype(np.float32),
        y=rng.integers(0, 3, num_nodes), train_mask=rng.random(num_nodes) < 0.5,
        edge_weight=rng.random(num_edges), edge_type=rng.integers(0, 2, num_edges))


def assert_same_graph(loaded: Graph, graph: Graph) -> None:
    assert loaded.num_nodes == graph.num_nodes and loaded.num_graphs == graph.num_graphs
    np.testing.assert_array_equal(loaded.edge_index, graph.edge_index)
    assert loaded.edge_index.dtype == np.int64
    for kind in ("node_data", "edge_data", "graph_data"):
        mine, theirs = getattr(loaded, kind), getattr(graph, kind)
        assert sorted(mine) == sorted(theirs)
        for name, array in theirs.items():
            np.testing.assert_array_equal(mine[name], array)
            assert mine[name].dtype == array.dtype and mine[name].shape == array.shape


def assert_same_csr(loaded: Graph, graph: Graph) -> None:
    for mine, theirs in zip(loaded.csr_by_dst(), graph.csr_by_dst()):
        np.testing.assert_array_equal(mine, theirs)
    sources = loaded.cached_only("csr_dst_sources")
    np.testing.assert_array_equal(sources, graph.src[graph.csr_by_dst()[1]])


def write_meta(directory: Path, **meta) -> None:
    content = {"format": "mpdsl.graph", "version": 1, **meta}
    (directory / "graph.json").write_text(json.dumps(content))


def hand_written(tmp_path: Path, num_nodes: int = 4, **arrays) -> Path:
    """A graph directory written with plain numpy (np.save) and a graph.json, as a user would."""
    directory = tmp_path / "hand"
    directory.mkdir(exist_ok=True)
    write_meta(directory, num_nodes=num_nodes)
    for name, array in arrays.items():
        np.save(directory / f"{name}.npy", array, allow_pickle=True)
    return directory


EDGES = np.array([[0, 1, 2, 3], [1, 2, 3, 0]])


# ------------------------------------------------------------------------------------------------
# Round trips


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(graph=st.one_of(graphs(), batched_graphs()), mmap=st.booleans())
def test_a_saved_directory_reads_back_the_same_graph(tmp_path_factory, graph, mmap):
    directory = tmp_path_factory.mktemp("g") / "graph"
    graph.save_directory(directory)
    loaded = Graph.load(directory, mmap=mmap)
    assert_same_graph(loaded, graph)
    assert_same_csr(loaded, graph) if mmap else None
    np.testing.assert_array_equal(loaded.in_degree(), graph.in_degree())


def test_mmap_arrays_are_read_only_memory_maps_with_the_csr_prefilled(tmp_path):
    graph = sample_graph()
    graph.save_directory(tmp_path / "g")
    loaded = Graph.load(tmp_path / "g", mmap=True)
    for name in ["x", "y", "train_mask", "edge_weight", "edge_type"]:
        assert isinstance(loaded[name], np.memmap), name
        assert not loaded[name].flags.writeable
    assert isinstance(loaded.edge_index, np.memmap) and loaded.edge_index.flags.c_contiguous
    indptr, perm = loaded.cached_only("csr_dst")
    assert all(isinstance(a, np.memmap) for a in (indptr, perm, loaded.cached_only("csr_dst_sources")))
    assert_same_csr(loaded, graph)
    rows = np.array([3, 7, 7, 0])
    gathered = loaded["x"][rows]
    assert type(gathered) is np.ndarray and not np.shares_memory(gathered, loaded["x"])
    np.testing.assert_array_equal(gathered, graph["x"][rows])
    in_memory = Graph.load(tmp_path / "g")
    assert all(type(in_memory[name]) is np.ndarray for name in in_memory.keys())  # noqa: SIM118  # a Graph is not iterable
    assert in_memory.cached_only("csr_dst") is None and not (tmp_path / "g2").exists()


@pytest.mark.parametrize(("chunk_bytes", "buffer_bytes"), [(8, 16), (24, 16 * 7), (1 << 20, 16 * 300)])
def test_the_out_of_core_csr_equals_the_in_memory_one(tmp_path, monkeypatch, chunk_bytes, buffer_bytes):
    # chunks that split rows of edge_index, passes that split a destination's edges
    monkeypatch.setattr(store, "SCAN_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(store, "CSR_BUFFER_BYTES", buffer_bytes)
    graph = sample_graph(num_nodes=30, num_edges=250, seed=3)
    graph.save_directory(tmp_path / "g")
    assert_same_csr(Graph.load(tmp_path / "g", mmap=True), graph)


def test_narrow_integer_ids_get_int64_copies(tmp_path):
    directory = hand_written(tmp_path, num_nodes=4, edge_index=EDGES.astype(np.int32),
                             edge_type=np.array([0, 1, 1, 0], dtype=np.uint8),
                             x=np.ones((4, 2), dtype=np.float16))
    loaded = Graph.load(directory, mmap=True)
    assert loaded.edge_index.dtype == np.int64 and loaded["edge_type"].dtype == np.int64
    assert isinstance(loaded.edge_index, np.memmap) and loaded["x"].dtype == np.float16
    np.testing.assert_array_equal(loaded.edge_index, EDGES)
    np.testing.assert_array_equal(loaded["edge_type"], [0, 1, 1, 0])
    assert_same_graph(loaded, Graph.load(directory))
    wide = directory / ".mpdsl" / "edge_index.int64.npy"
    assert wide.stat().st_size > (directory / "edge_index.npy").stat().st_size


def test_graph_arrays_are_checked_against_the_batch_vector(tmp_path):
    graph = Graph.batch([sample_graph(5, 6, seed=s) for s in range(3)]).with_data(graph_y=np.arange(3.0))
    graph.save_directory(tmp_path / "g")
    loaded = Graph.load(tmp_path / "g", mmap=True)
    assert loaded.num_graphs == 3 and Graph.load(tmp_path / "g", mmap=True).num_graphs == 3
    np.save(tmp_path / "g" / "graph_y.npy", np.arange(4.0))
    with pytest.raises(GraphError, match=r"graph_y.npy has 4 rows but the graph has 3 graphs"):
        Graph.load(tmp_path / "g", mmap=True)


def test_a_memory_mapped_graph_pickles_as_its_path(tmp_path):
    graph = sample_graph(num_nodes=2000, features=16)
    graph.save_directory(tmp_path / "g")
    loaded = Graph.load(tmp_path / "g", mmap=True)
    data = pickle.dumps(loaded)
    assert len(data) < 1000  # not the 128 KB of features
    again = pickle.loads(data)
    assert isinstance(again["x"], np.memmap)
    assert_same_graph(again, graph)
    assert len(pickle.dumps(graph)) > graph["x"].nbytes  # in-memory graphs pickle their arrays


def test_save_directory_needs_a_new_or_empty_folder(tmp_path):
    graph = sample_graph()
    graph.save_directory(tmp_path / "g")
    with pytest.raises(GraphError, match="the folder is not empty"):
        graph.save_directory(tmp_path / "g")
    other = sample_graph(seed=9)
    other.save_directory(tmp_path / "g", overwrite=True)
    assert_same_graph(Graph.load(tmp_path / "g", mmap=True), other)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep")
    with pytest.raises(GraphError, match="not empty"):
        graph.save_directory(tmp_path / "notes", overwrite=True)  # not a graph directory: kept
    assert (tmp_path / "notes" / "a.txt").exists()


def test_a_memory_mapped_graph_saves_to_npz_and_back(tmp_path):
    graph = sample_graph()
    graph.save_directory(tmp_path / "g")
    Graph.load(tmp_path / "g", mmap=True).save(tmp_path / "g.npz")
    assert_same_graph(Graph.load(tmp_path / "g.npz"), graph)


# ------------------------------------------------------------------------------------------------
# The stamp


def counting_scans(monkeypatch) -> list[str]:
    scanned: list[str] = []
    original = store._scan

    def scan(layout, name, header, wide):
        scanned.append(name)
        return original(layout, name, header, wide)

    monkeypatch.setattr(store, "_scan", scan)
    return scanned


def test_the_stamp_skips_the_scan_of_unchanged_arrays(tmp_path, monkeypatch):
    scanned = counting_scans(monkeypatch)
    graph = sample_graph()
    graph.save_directory(tmp_path / "g")
    Graph.load(tmp_path / "g", mmap=True)
    assert sorted(scanned) == sorted(["edge_index", *graph.keys()])
    scanned.clear()
    Graph.load(tmp_path / "g", mmap=True)
    assert scanned == []
    csr_before = (tmp_path / "g" / ".mpdsl" / "csr_dst_perm.npy").stat().st_mtime_ns
    np.save(tmp_path / "g" / "x.npy", np.zeros((50, 4), dtype=np.float32))
    loaded = Graph.load(tmp_path / "g", mmap=True)
    assert scanned == ["x"] and not loaded["x"].any()
    assert (tmp_path / "g" / ".mpdsl" / "csr_dst_perm.npy").stat().st_mtime_ns == csr_before


def test_a_changed_array_is_validated_again(tmp_path):
    graph = sample_graph()
    graph.save_directory(tmp_path / "g")
    Graph.load(tmp_path / "g", mmap=True)
    x = np.array(graph["x"])
    x[7, 2] = np.nan
    np.save(tmp_path / "g" / "x.npy", x)
    with pytest.raises(GraphError, match=r"x\[7, 2\] is nan"):
        Graph.load(tmp_path / "g", mmap=True)


def test_changed_edges_rebuild_the_csr(tmp_path):
    graph = sample_graph()
    graph.save_directory(tmp_path / "g")
    Graph.load(tmp_path / "g", mmap=True)
    flipped = graph.edge_index[::-1]
    np.save(tmp_path / "g" / "edge_index.npy", flipped)
    assert_same_csr(Graph.load(tmp_path / "g", mmap=True), Graph(flipped, graph.num_nodes))
    write_meta(tmp_path / "g", num_nodes=49)  # a smaller graph: the edges are checked again
    np.save(tmp_path / "g" / "x.npy", np.zeros((49, 4), dtype=np.float32))
    for name in ("y", "train_mask"):
        np.save(tmp_path / "g" / f"{name}.npy", np.array(graph[name])[:49])
    assert int(flipped.max()) == 49
    with pytest.raises(GraphError, match="out of range for num_nodes=49"):
        Graph.load(tmp_path / "g", mmap=True)


def test_concurrent_opens_scan_and_build_once(tmp_path):
    graph = sample_graph(num_nodes=500, num_edges=4000)
    graph.save_directory(tmp_path / "g")
    # each scan is slowed down so that the two processes' opens overlap
    script = (f"import time; from mpdsl import store; from mpdsl.graph import Graph; scanned = []\n"
              f"scan = store._scan; store._scan = lambda *a: scanned.append(time.sleep(0.2)) or scan(*a)\n"
              f"g = Graph.load({str(tmp_path / 'g')!r}, mmap=True)\n"
              f"print(len(scanned), int(g.csr_by_dst()[1] @ range(g.num_edges)))")
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = sorted(run.communicate(timeout=120)[0].split() for run in runs)
    expected = str(int(graph.csr_by_dst()[1] @ np.arange(graph.num_edges)))
    assert outputs == [["0", expected], [str(1 + len(graph.keys())), expected]]


def test_a_read_only_data_folder_uses_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    graph = sample_graph()
    graph.save_directory(tmp_path / "g")
    (tmp_path / "g" / ".mpdsl").write_text("")  # the data folder's cache cannot be created
    assert_same_csr(Graph.load(tmp_path / "g", mmap=True), graph)
    [folder] = (tmp_path / "cache" / "mpdsl" / "graphs").iterdir()
    assert (folder / "stamp.json").exists() and (folder / "csr_dst_perm.npy").exists()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "g" / "x.npy"))  # a file: nothing is writable
    with pytest.raises(GraphError, match="cannot be saved: none of"):
        Graph.load(tmp_path / "g", mmap=True)


def test_an_up_to_date_cache_is_used_without_writing(tmp_path, monkeypatch):
    graph = sample_graph()
    graph.save_directory(tmp_path / "g")
    Graph.load(tmp_path / "g", mmap=True)
    monkeypatch.setattr(store, "_writable", lambda folder: pytest.fail(f"tried to write {folder}"))
    assert_same_csr(Graph.load(tmp_path / "g", mmap=True), graph)


# ------------------------------------------------------------------------------------------------
# Memory


def test_open_and_gather_keep_the_features_on_disk(tmp_path, monkeypatch):
    """Opening a 32 MiB feature file (validation scan and CSR build included) and gathering rows of
    it allocates a small fraction of the file: the chunks, never a copy of an array."""
    graph = sample_graph(num_nodes=1 << 14, num_edges=1 << 16, features=1)
    graph.save_directory(tmp_path / "g")
    features = np.lib.format.open_memmap(tmp_path / "g" / "x.npy", mode="w+", dtype=np.float32,
                                         shape=(1 << 14, 512))
    for first in range(0, 1 << 14, 4096):
        features[first:first + 4096] = np.float32(first)
    features.flush()
    del features
    sample_graph(4, 4).save_directory(tmp_path / "warm")
    Graph.load(tmp_path / "warm", mmap=True)  # imports and compiles (or loads) the CSR kernels
    monkeypatch.setattr(store, "SCAN_CHUNK_BYTES", 1 << 20)
    tracemalloc.start()
    try:
        loaded = Graph.load(tmp_path / "g", mmap=True)
        rows = np.random.default_rng(0).integers(0, loaded.num_nodes, 256)
        gathered = loaded["x"][rows]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(gathered[:, 0], rows // 4096 * 4096)
    assert isinstance(loaded["x"], np.memmap)
    assert peak < 4 << 20, f"opening and gathering allocated {peak / 2**20:.1f} MiB for a 32 MiB feature file"


def resident_file_bytes() -> int | None:
    """This process's resident file-backed memory (``RssFile`` of /proc/self/status), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def test_release_pages_unmaps_what_gathers_mapped(tmp_path):
    if resident_file_bytes() is None:
        pytest.skip("needs /proc/self/status")
    graph = sample_graph(num_nodes=1 << 14, num_edges=1 << 10, features=256)
    graph.save_directory(tmp_path / "g")
    loaded = Graph.load(tmp_path / "g", mmap=True)
    before = resident_file_bytes()
    gathered = loaded["x"][np.arange(0, 1 << 14, 16)]  # a row from every 16 KiB
    np.testing.assert_array_equal(gathered, graph["x"][::16])
    mapped = resident_file_bytes()
    assert mapped - before > 8 << 20  # most of the 16 MiB file is mapped now
    assert store.release_pages(loaded) == 1 + len(loaded.keys()) + 3  # edge_index, the arrays, the CSR
    assert resident_file_bytes() - before < 2 << 20
    np.testing.assert_array_equal(loaded["x"][np.arange(0, 1 << 14, 16)], gathered)  # still readable
    assert store.release_pages(graph) == 0


def test_an_in_memory_load_is_held_to_the_memory_budget(tmp_path):
    sample_graph(num_nodes=1000, features=64).save_directory(tmp_path / "g")
    with pytest.raises(GraphError, match=r"over the memory budget of 64\.0 KiB .*nothing was read") as info:
        Graph.load(tmp_path / "g", memory_limit="64K")
    assert "x.npy [1000, 64] float32" in str(info.value) and "mmap=True" in str(info.value)
    assert Graph.load(tmp_path / "g", mmap=True, memory_limit="64K").num_nodes == 1000


# ------------------------------------------------------------------------------------------------
# Bad directories: one clear GraphError each, naming the file


def bad_directories(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    cases: dict[str, tuple[Path, str]] = {}
    counter = iter(range(100))

    def case(label: str, phrase: str, num_nodes: int | None = 4, meta: str | None = None, **arrays) -> None:
        directory = tmp_path / f"{next(counter)}_{label}"
        directory.mkdir()
        if meta is not None:
            (directory / "graph.json").write_text(meta)
        elif num_nodes is not None:
            write_meta(directory, num_nodes=num_nodes)
        for name, array in arrays.items():
            if isinstance(array, bytes):
                (directory / f"{name}.npy").write_bytes(array)
            else:
                np.save(directory / f"{name}.npy", array, allow_pickle=True)
        cases[label] = (directory, phrase)

    x = np.ones((4, 2), dtype=np.float32)
    case("no edge_index", "has no edge_index.npy (it holds x.npy)", x=x)
    case("no graph.json", "has no graph.json (it holds edge_index.npy)", num_nodes=None, edge_index=EDGES)
    case("not json", "graph.json of graph directory", meta="{num_nodes: 4", edge_index=EDGES)
    case("json list", "must hold a JSON object", meta="[4]", edge_index=EDGES)
    case("json missing key", "lacks 'num_nodes'", meta='{"format": "mpdsl.graph", "version": 1}',
         edge_index=EDGES)
    case("json unknown key", "unknown key 'num_node'",
         meta='{"format": "mpdsl.graph", "version": 1, "num_nodes": 4, "num_node": 4}', edge_index=EDGES)
    case("json version", "has version 2; this mpdsl reads version 1",
         meta='{"format": "mpdsl.graph", "version": 2, "num_nodes": 4}', edge_index=EDGES)
    case("json num_nodes", "num_nodes must be a non-negative integer, got -1", num_nodes=-1, edge_index=EDGES)
    case("json num_nodes bool", "num_nodes must be a non-negative integer, got True",
         meta='{"format": "mpdsl.graph", "version": 1, "num_nodes": true}', edge_index=EDGES)
    case("edge_index float", "edge_index.npy of graph directory", edge_index=EDGES.astype(np.float64))
    case("edge_index shape", "must have shape [2, E], got [4, 2]", edge_index=EDGES.T.copy())
    case("node rows", "x.npy of graph directory", edge_index=EDGES, x=np.ones((5, 2)))
    case("edge rows", "edge_weight.npy of graph directory", edge_index=EDGES, edge_weight=np.ones(3))
    case("complex features", "has dtype complex128", edge_index=EDGES, x=np.ones((4, 2), dtype=complex))
    case("boolean features", "must hold real numbers, got dtype bool", edge_index=EDGES, x=np.ones((4, 2), bool))
    case("float ids", "node_type.npy of graph directory", edge_index=EDGES, node_type=np.zeros(4))
    case("2-d ids", "must be 1-D, got shape [4, 1]", edge_index=EDGES, node_type=np.zeros((4, 1), np.int64))
    case("objects", "holds Python objects (dtype object)", edge_index=EDGES,
         x=np.array([{"a": 1}] * 4, dtype=object))
    case("strings", "has dtype <U1", edge_index=EDGES, x=np.array(list("abcd")))
    case("big-endian", "non-native byte order", edge_index=EDGES, x=x.astype(">f4"))
    case("fortran", "is stored in Fortran order", edge_index=EDGES, x=np.asfortranarray(np.ones((4, 2))))
    case("scalar", "x.npy of graph directory", edge_index=EDGES, x=np.float32(1))
    case("num_nodes file", "holds num_nodes.npy, but num_nodes belongs in graph.json", edge_index=EDGES)
    np.save(cases["num_nodes file"][0] / "num_nodes.npy", np.int64(4))
    truncated = (tmp_path / "t.npy")
    np.save(truncated, x)
    case("truncated", "x.npy of graph directory", edge_index=EDGES, x=truncated.read_bytes()[:-3])
    case("too long", "damaged (longer than its header says)", edge_index=EDGES, x=truncated.read_bytes() + b"\0")
    case("not npy", "x.npy of graph directory", edge_index=EDGES, x=b"PK\x03\x04 not an array")
    case("out of range", "edge_index[1, 2] = 4 is out of range for num_nodes=4", edge_index=np.array(
        [[0, 1, 2, 3], [1, 2, 4, 0]]))
    case("negative edge", "edge_index[0, 3] = -1 is negative", edge_index=np.array([[0, 1, 2, -1], [1, 2, 3, 0]]))
    case("negative id", "edge_type[2] = -3 is negative", edge_index=EDGES, edge_type=np.array([0, 1, -3, 0]))
    case("nan", "x[2, 1] is nan", edge_index=EDGES, x=np.where(np.arange(8).reshape(4, 2) == 5, np.nan, 1.0))
    case("inf", "edge_weight[3] is inf", edge_index=EDGES, edge_weight=np.array([1, 2, 3, np.inf]))
    return cases


EXACT = {  # the messages whose wording the tests pin down in full
    "node rows": "x.npy of graph directory {d!r} has 5 rows but the graph has 4 nodes (graph.json)",
    "edge rows": "edge_weight.npy of graph directory {d!r} has 3 rows but the graph has 4 edges (edge_index.npy)",
    "truncated": "x.npy of graph directory {d!r} is truncated: its header declares [4, 2] float32 (32 B) but "
                 "it holds 29 B of data",
    "edge_index float": "edge_index.npy of graph directory {d!r} must hold integers, got dtype float64",
    "float ids": "node_type.npy of graph directory {d!r} must hold integers, got dtype float64",
    "scalar": "x.npy of graph directory {d!r} is a scalar but node arrays need one row per node",
    "out of range": "in graph directory {d!r}: edge_index[1, 2] = 4 is out of range for "
                    "num_nodes=4",
}


@pytest.mark.parametrize("mmap", [True, False])
def test_bad_directories_are_one_graph_error_naming_the_file(tmp_path, mmap):
    for label, (directory, phrase) in bad_directories(tmp_path).items():
        with pytest.raises(GraphError) as info:
            Graph.load(directory, mmap=mmap)
        message = info.value.message
        assert phrase in message and str(directory) in message, (label, message)
        if label in EXACT:
            assert message == EXACT[label].format(d=str(directory)), (label, message)
        assert "\n" not in message and info.value.hint, label


def test_bad_paths_for_mmap(tmp_path):
    sample_graph().save(tmp_path / "g.npz")
    with pytest.raises(GraphError, match=r"mmap=True needs a graph directory, but .* is a file"):
        Graph.load(tmp_path / "g.npz", mmap=True)
    with pytest.raises(GraphError, match="does not exist"):
        Graph.load(tmp_path / "nowhere", mmap=True)
    assert Graph.load(tmp_path / "g.npz").num_nodes == 50  # .npz files load as before


def test_other_files_and_dot_files_are_ignored(tmp_path):
    directory = hand_written(tmp_path, edge_index=EDGES, x=np.ones((4, 2)))
    (directory / "README.txt").write_text("notes")
    np.save(directory / "._x.npy", np.ones(3))
    assert Graph.load(directory, mmap=True).keys() == ["x"]


# ------------------------------------------------------------------------------------------------
# The README's example


def test_the_readme_example_runs(tmp_path, monkeypatch):
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Graphs larger than memory"):]
    code = section[section.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "big" / "graph.json").exists() and (tmp_path / "big" / ".mpdsl" / "stamp.json").exists()


# ------------------------------------------------------------------------------------------------
# The generator of large graphs


def test_make_big_graph_writes_a_seeded_learnable_graph(tmp_path):
    spec = importlib.util.spec_from_file_location("make_big_graph", REPO / "benchmarks" / "make_big_graph.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    sizes = ["--nodes", "3000", "--edges", "30000", "--features", "8", "--classes", "4"]
    summary = generator.generate(generator.arguments([str(tmp_path / "a"), *sizes]))
    generator.generate(generator.arguments([str(tmp_path / "b"), *sizes]))
    assert summary["nodes"] == 3000 and 0.75 < summary["edge_homophily"] < 0.87
    for name in ("edge_index", "x", "y", "train_mask", "val_mask", "test_mask"):
        assert (tmp_path / "a" / f"{name}.npy").read_bytes() == (tmp_path / "b" / f"{name}.npy").read_bytes()
    graph = Graph.load(tmp_path / "a", mmap=True)
    assert graph["x"].shape == (3000, 8) and graph["x"].dtype == np.float32 and graph.num_edges == 30000
    masks = np.stack([graph[name] for name in ("train_mask", "val_mask", "test_mask")])
    assert (masks.sum(axis=0) == 1).all() and 0.07 < masks[0].mean() < 0.13
    y, x = np.asarray(graph["y"]), np.asarray(graph["x"])
    means = np.stack([x[y == c].mean(axis=0) for c in range(4)])
    assert np.linalg.norm(means[0] - means[1]) > 0.2  # features carry the class
    in_degree = graph.in_degree()
    assert in_degree.max() > 20 * in_degree.mean()  # a heavy tail
    with pytest.raises(SystemExit):
        generator.arguments([str(tmp_path / "c"), "--exponent", "2"])
