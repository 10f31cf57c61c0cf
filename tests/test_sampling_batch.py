"""MiniBatch construction: rows gathered in the order asked, and the pages of memory-mapped arrays
released past the bound (so an epoch of random reads does not map the whole file)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mpdsl
from mpdsl.diagnostics import GraphError
from mpdsl.sampling import batch as batch_module
from mpdsl.sampling.batch import _PAGE, _gather_rows, _pages_spanned, make_batch


def _graph() -> mpdsl.Graph:
    edge_index = np.array([[0, 1, 2, 3], [1, 2, 3, 0]])
    return mpdsl.Graph(edge_index, node_data={"x": np.arange(8.0).reshape(4, 2), "y": np.array([0, 1, 0, 1])},
                       edge_data={"edge_attr": np.arange(4.0)[:, None]})


def test_make_batch_gathers_node_and_edge_rows_by_global_id():
    batch = make_batch(_graph(), np.array([2, 3, 0]), np.array([[0, 1], [1, 2]]), np.array([2, 3]), 1,
                       node_extra={"node_norm": np.ones(3)})
    assert batch.batch_size == 1 and batch.num_nodes == 3 and batch.num_edges == 2
    np.testing.assert_array_equal(batch["x"], [[4, 5], [6, 7], [0, 1]])
    np.testing.assert_array_equal(batch["edge_attr"], [[2], [3]])
    assert "node_norm" in batch and "node_norm" in batch.graph.node_data


def test_make_batch_refuses_a_batch_of_graphs():
    several = mpdsl.Graph.batch([_graph(), _graph()])
    with pytest.raises(GraphError, match="sampling needs one graph"):
        make_batch(several, np.array([0]), np.zeros((2, 0), dtype=np.int64), np.zeros(0, dtype=np.int64), 1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 49), max_size=60), st.integers(1, 3))
def test_gather_rows_equals_fancy_indexing(rows, width):
    array = np.arange(50 * width, dtype=np.float32).reshape(50, width)
    index = np.array(rows, dtype=np.int64)
    np.testing.assert_array_equal(_gather_rows(array, index), array[index])


@settings(max_examples=100, deadline=None)
@given(st.sets(st.integers(0, 3000), min_size=1, max_size=80), st.sampled_from([4, 100, 512, 4096, 5000, 9000]))
def test_pages_spanned_counts_distinct_pages(rows, row_bytes):
    ascending = np.array(sorted(rows), dtype=np.int64)
    pages = {p for r in rows for p in range(r * row_bytes // _PAGE, ((r + 1) * row_bytes - 1) // _PAGE + 1)}
    assert _pages_spanned(ascending, row_bytes) == len(pages)


def _mapped_kb(path: str) -> int:
    """Resident kB of this process's mappings of ``path`` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if fields and "-" in fields[0] and len(fields) >= 5:
                inside = fields[-1] == path
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_gathers_from_a_memory_mapped_file_map_nothing_or_release_their_pages(tmp_path, monkeypatch):
    path = str(tmp_path / "x.npy")
    np.save(path, np.random.default_rng(0).random((20000, 64), dtype=np.float32))  # 5 MB
    x = np.load(path, mmap_mode="r")
    rows = np.random.default_rng(1).integers(0, 20000, 4000)
    want = np.load(path)[rows]
    monkeypatch.setattr(batch_module, "MAPPED_BYTES", 1 << 40)
    np.testing.assert_array_equal(_gather_rows(x, rows), want)  # read with pread
    assert _mapped_kb(path) < 64
    part = x[1:]  # a view: read through the mapping
    np.testing.assert_array_equal(_gather_rows(part, rows - 1 + (rows == 0)), np.load(path)[rows + (rows == 0)])
    assert _mapped_kb(path) > 1000  # the random rows mapped most of the file's pages
    monkeypatch.setattr(batch_module, "MAPPED_BYTES", 1 << 20)
    _gather_rows(part, rows[rows > 0] - 1)
    assert _mapped_kb(path) < 64


def test_reading_rows_of_a_truncated_file_is_an_error(tmp_path):
    from mpdsl.sampling.file_rows import read_rows

    path = tmp_path / "x.npy"
    np.save(path, np.arange(4000.0).reshape(1000, 4))
    x = np.load(path, mmap_mode="r")
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 100)
    out = np.empty((2, 4))
    with pytest.raises(OSError, match="could not read 1 rows"):
        read_rows(x, np.array([0, 999]), out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_batches_of_a_memory_mapped_graph_read_their_feature_rows_from_the_file(tmp_path):
    rng = np.random.default_rng(3)
    graph = mpdsl.Graph.from_arrays(rng.integers(0, 20000, (2, 1000)), 20000,
                                    x=rng.random((20000, 64), dtype=np.float32))
    graph.save_directory(tmp_path / "g")
    mapped = mpdsl.Graph.load(tmp_path / "g", mmap=True)
    rows = rng.integers(0, 20000, 4000)
    batch = make_batch(mapped, rows, np.zeros((2, 0), dtype=np.int64), np.zeros(0, dtype=np.int64), 10)
    np.testing.assert_array_equal(batch["x"], graph["x"][rows])
    assert _mapped_kb(str(tmp_path / "g" / "x.npy")) < 64


def test_samplers_of_a_memory_mapped_graph_pickle_small_and_sample_alike(tmp_path):
    import pickle

    from mpdsl.sampling.neighbor import NeighborSampler
    from mpdsl.sampling.subgraph_kernels import InducedSubgraphs

    rng = np.random.default_rng(4)
    graph = mpdsl.Graph.from_arrays(rng.integers(0, 5000, (2, 40000)), 5000, x=rng.random((5000, 8)))
    graph.save_directory(tmp_path / "g")
    mapped = mpdsl.Graph.load(tmp_path / "g", mmap=True)
    sampler, subgraphs = NeighborSampler(mapped, [5, 3]), InducedSubgraphs(mapped)
    sampler_bytes, subgraph_bytes = pickle.dumps(sampler), pickle.dumps(subgraphs)
    assert len(sampler_bytes) < 4096 and len(subgraph_bytes) < 4096  # the graph travels as its directory
    seeds = np.arange(0, 5000, 50)
    want, got = sampler(seeds, 7), pickle.loads(sampler_bytes)(seeds, 7)
    np.testing.assert_array_equal(got.n_id, want.n_id)
    np.testing.assert_array_equal(got.graph.edge_index, want.graph.edge_index)
    for a, b in zip(pickle.loads(subgraph_bytes).edges(seeds), subgraphs.edges(seeds)):
        np.testing.assert_array_equal(a, b)
