"""Graph and weights files that are damaged, of another format or too large: each one is a user
error naming the file (and the array), never an internal error, a hang or an allocation."""

import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

import mpdsl
from mpdsl.cli import main

ROOT = Path(__file__).resolve().parents[1]
GCN = str(ROOT / "examples" / "gcn.mp")
KARATE = ROOT / "examples" / "data" / "karate.npz"


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def header_only(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def write_zip(path: Path, members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


EDGES = npy_bytes(np.array([[0, 1], [1, 0]]))


def bad_files(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, a phrase its error must contain)."""
    good = KARATE.read_bytes()
    files = {}

    def add(name, data, phrase):
        path = tmp / name
        path.write_bytes(data)
        files[name] = (path, phrase)

    add("truncated.npz", good[: len(good) // 2], "not an .npz archive")
    add("empty.npz", b"", "it is empty")
    add("text.npz", b"hello, world\n", "not an .npz archive")
    add("single.npz", npy_bytes(np.zeros(3)), "single .npy array")
    add("pickled.npz", pickle.dumps({"edge_index": [[0], [1]]}, protocol=4), "pickled Python objects")
    files["huge_header.npz"] = (write_zip(tmp / "huge_header.npz", {
        "edge_index.npy": EDGES, "x.npy": header_only((10 ** 12,)) + b"\0" * 64}),
        "'x' of graph file")
    files["data_cut.npz"] = (write_zip(tmp / "data_cut.npz", {
        "edge_index.npy": EDGES, "x.npy": npy_bytes(np.ones((2, 3)))[:-8]}), "holds 40 B of data")
    files["objects.npz"] = (write_zip(tmp / "objects.npz", {
        "edge_index.npy": EDGES, "x.npy": header_only((2,), "|O") + b"\0" * 16}), "Python objects")
    files["not_npy.npz"] = (write_zip(tmp / "not_npy.npz", {"edge_index.npy": EDGES, "notes.txt": b"hi"}),
                            "'notes.txt', which is not a .npy array")
    files["bad_header.npz"] = (write_zip(tmp / "bad_header.npz", {"edge_index.npy": b"\x93NUMPY\x01\x00zz"}),
                               "no valid .npy header")
    return files


def test_damaged_graph_files_are_graph_errors(tmp_path):
    for name, (path, phrase) in bad_files(tmp_path).items():
        with pytest.raises(mpdsl.GraphError) as info:
            mpdsl.Graph.load(path)
        message = str(info.value)
        assert phrase in message and name in message, (name, message)


def test_damaged_weights_files_are_weights_errors(tmp_path):
    model = mpdsl.compile(GCN)
    for name, (path, phrase) in bad_files(tmp_path).items():
        with pytest.raises(mpdsl.WeightsError) as info:
            model.load_weights(path)
        message = str(info.value).replace("weights file", "graph file")
        assert phrase in message and name in message, (name, message)


def test_a_declared_size_beyond_what_deflate_produces_is_refused_unread(tmp_path):
    """A member whose zip entry claims 3 GiB from a few compressed bytes (a zip bomb's shape)."""
    path = write_zip(tmp_path / "bomb.npz", {"edge_index.npy": EDGES}, zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    claimed = struct.pack("<I", 3 << 30)
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    data[local + 22:local + 26] = claimed  # the uncompressed size in the local header
    data[central + 24:central + 28] = claimed  # and in the central directory
    path.write_bytes(bytes(data))
    with pytest.raises(mpdsl.GraphError, match="more than deflate can produce"):
        mpdsl.Graph.load(path)


def test_a_graph_file_over_the_memory_budget_is_refused_before_reading(tmp_path):
    path = tmp_path / "g.npz"
    np.savez(path, edge_index=np.zeros((2, 1000), np.int64), x=np.zeros((1, 1 << 16)))
    with pytest.raises(mpdsl.GraphError, match=r"declares 527\.6 KiB of arrays \(the largest: x \[1, 65536\] "
                                               r"float64, 512\.0 KiB\), over the memory budget of 64\.0 KiB"):
        mpdsl.Graph.load(path, memory_limit="64K")
    assert mpdsl.Graph.load(path, memory_limit="1M").num_nodes == 1
    with pytest.raises(mpdsl.WeightsError, match="weights file .* over the memory budget"):
        mpdsl.compile(GCN, memory_limit=1000).load_weights(path)


def test_pytorch_files_name_the_format_and_the_conversion(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    pytest.importorskip("torch_geometric")
    from torch_geometric.data import Data

    path = tmp_path / "data.pt"
    torch.save(Data(x=torch.randn(3, 2), edge_index=torch.tensor([[0, 1], [1, 2]])), path)
    assert main(["run", GCN, "--graph", str(path)]) == 1
    err = capsys.readouterr().err
    assert "is a PyTorch file (torch.save), not an .npz archive" in err and "Graph.from_pyg" in err
    assert "Traceback" not in err
    weights = tmp_path / "w.pt"
    torch.save({"W1": torch.zeros(3)}, weights)
    with pytest.raises(mpdsl.WeightsError, match="PyTorch file") as info:
        mpdsl.compile(GCN).load_weights(weights)
    assert "np.savez" in info.value.hint


def test_an_archive_without_edge_index_lists_what_it_holds(tmp_path):
    path = tmp_path / "g.npz"
    np.savez(path, x=np.zeros((3, 2)), y=np.zeros(3))
    with pytest.raises(mpdsl.GraphError, match=r"has no edge_index array \(it holds x, y\)"):
        mpdsl.Graph.load(path)


def test_num_nodes_must_be_an_integer_in_a_file(tmp_path):
    for value in (np.array(True), np.array(3.0), np.array([3])):
        path = tmp_path / "g.npz"
        np.savez(path, edge_index=np.array([[0], [0]]), num_nodes=value)
        with pytest.raises(mpdsl.GraphError, match="num_nodes must be a non-negative integer"):
            mpdsl.Graph.load(path)
    np.savez(path, edge_index=np.array([[0], [0]]), num_nodes=np.array(3, np.int32))
    assert mpdsl.Graph.load(path).num_nodes == 3


def test_cli_reports_damaged_files_without_a_traceback(tmp_path, capsys):
    files = bad_files(tmp_path)
    truncated = str(files["truncated.npz"][0])
    assert main(["run", GCN, "--graph", truncated]) == 1
    assert main(["run", GCN, "--graph", str(KARATE), "--weights", truncated]) == 1
    assert main(["run", GCN, "--graph", str(files["huge_header.npz"][0])]) == 1
    assert main(["run", GCN, "--graph", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("error: ") == 4 and "Traceback" not in err
    assert "has no graph.json" in err and "weights file" in err and "[1000000000000] float64" in err


def test_graph_save_reports_bad_paths(tmp_path):
    graph = mpdsl.Graph.load(KARATE)
    with pytest.raises(mpdsl.GraphError, match="the folder .* does not exist"):
        graph.save(tmp_path / "missing" / "g.npz")
    with pytest.raises(mpdsl.GraphError, match="it is a directory"):
        graph.save(tmp_path)
    graph.save(tmp_path / "g")
    assert [p.name for p in tmp_path.iterdir()] == ["g"] and mpdsl.Graph.load(tmp_path / "g").num_nodes == 34
