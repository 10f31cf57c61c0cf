"""Malformed graphs and weights (.npz files with wrong shapes and dtypes, NaN, out-of-range
indices, huge declared headers, truncated or non-zip files, 0-d bool ``num_nodes``, pickled
object arrays, ...) and command lines (every command and flag, good and bad values)."""

from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

import numpy as np

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
KARATE = EXAMPLES / "data" / "karate.npz"


def npz(arrays: dict, compressed: bool = False, pickled: bool = False) -> bytes:
    """The bytes of an .npz archive of ``arrays`` (object arrays pickled when ``pickled``)."""
    buffer = io.BytesIO()
    if pickled:
        _savez_pickled(buffer, arrays)
    elif compressed:
        np.savez_compressed(buffer, **arrays)
    else:
        np.savez(buffer, **arrays)
    return buffer.getvalue()


def _savez_pickled(buffer, arrays: dict) -> None:
    with zipfile.ZipFile(buffer, "w") as archive:
        for key, value in arrays.items():
            with archive.open(key + ".npy", "w") as member:
                np.lib.format.write_array(member, np.asarray(value), allow_pickle=True)


def npy_with_header(shape, dtype="<f8", data: bytes = b"") -> bytes:
    """An .npy member whose header declares ``shape`` but holds only ``data``."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode("latin1")
    header += b" " * ((64 - (len(header) + 11) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


def zip_members(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _member(array) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
    return buffer.getvalue()


# ---- graphs -----------------------------------------------------------------------------------

GRAPH_MODELS = ("gcn", "gcn", "gine", "rgcn", "hgt", "gat", "mpnn", "pna", "sage_max")


def base_graph(rng: random.Random, model: str) -> dict:
    """Arrays of a valid graph for ``model`` (karate for the node models)."""
    with np.load(KARATE) as data:
        arrays = {k: data[k] for k in data.files}
    n, e = 34, arrays["edge_index"].shape[1]
    g = np.random.default_rng(rng.randrange(2**32))
    if model in ("gine", "mpnn", "pna"):
        arrays["edge_attr"] = g.normal(size=(e, 3)).astype(np.float32)
    if model in ("rgcn", "hgt"):
        arrays["edge_type"] = g.integers(0, 2, e)
    if model == "hgt":
        arrays["node_type"] = g.integers(0, 2, n)
    if rng.random() < 0.3:
        arrays["batch"] = np.repeat(np.arange(2), [17, 17])
    return arrays


def _corrupt(arrays: dict, rng: random.Random) -> dict:
    a = dict(arrays)
    n = int(a["x"].shape[0]) if "x" in a and getattr(a["x"], "ndim", 0) else 34
    e = a["edge_index"].shape[1] if getattr(a.get("edge_index"), "ndim", 0) == 2 else 10
    ei = a["edge_index"]
    choices = [
        lambda: a.update(edge_index=ei.T.copy()),
        lambda: a.update(edge_index=np.concatenate([ei, ei[:1]], axis=0)),
        lambda: a.update(edge_index=ei.reshape(-1)),
        lambda: a.update(edge_index=np.array(3)),
        lambda: a.update(edge_index=ei.astype(np.float64)),
        lambda: a.update(edge_index=np.where(np.arange(ei.size).reshape(ei.shape) == 5, np.nan, ei.astype(float))),
        lambda: a.update(edge_index=ei.astype(bool)),
        lambda: a.update(edge_index=ei.astype(np.complex64)),
        lambda: a.update(edge_index=ei.astype(str)),
        lambda: a.update(edge_index=np.where(np.arange(ei.size).reshape(ei.shape) == 7, -1, ei)),
        lambda: a.update(edge_index=np.where(np.arange(ei.size).reshape(ei.shape) == 7, n, ei)),
        lambda: a.update(edge_index=np.where(np.arange(ei.size).reshape(ei.shape) == 7, 2**62, ei)),
        lambda: a.update(edge_index=ei.astype(np.int8)),
        lambda: a.update(edge_index=ei.astype(np.uint64)),
        lambda: a.update(edge_index=ei.astype(">i8")),
        lambda: a.update(edge_index=np.asfortranarray(ei)),
        lambda: a.update(edge_index=np.zeros((2, 0), dtype=np.int64)),
        lambda: a.pop("edge_index"),
        lambda: a.update(num_nodes=np.array(True)),
        lambda: a.update(num_nodes=np.array(False)),
        lambda: a.update(num_nodes=np.array(34.5)),
        lambda: a.update(num_nodes=np.array(-1)),
        lambda: a.update(num_nodes=np.array(2**40)),
        lambda: a.update(num_nodes=np.array([34])),
        lambda: a.update(num_nodes=np.array("34")),
        lambda: a.update(num_nodes=np.array(0)),
        lambda: a.update(num_nodes=np.array(n + 5)),
        lambda: a.update(x=np.where(np.arange(a["x"].size).reshape(a["x"].shape) == 3, np.nan, a["x"])),
        lambda: a.update(x=np.full_like(a["x"], np.inf)),
        lambda: a.update(x=a["x"][:-1]),
        lambda: a.update(x=a["x"][:, 0]),
        lambda: a.update(x=a["x"][:, :, None]),
        lambda: a.update(x=a["x"].astype(np.int32)),
        lambda: a.update(x=a["x"].astype(bool)),
        lambda: a.update(x=a["x"].astype(np.complex128)),
        lambda: a.update(x=a["x"].astype(np.float16)),
        lambda: a.update(x=np.zeros((n, 0), dtype=np.float32)),
        lambda: a.update(x=np.array(1.0)),
        lambda: a.update(x=a["x"].astype("S3")),
        lambda: a.pop("x", None),
        lambda: a.update(edge_attr=np.ones((e + 1, 3))),
        lambda: a.update(edge_attr=np.full((e, 3), np.nan)),
        lambda: a.update(edge_attr=np.ones(e)),
        lambda: a.update(edge_type=-np.ones(e, dtype=np.int64)),
        lambda: a.update(edge_type=np.full(e, 7)),
        lambda: a.update(edge_type=np.ones(e) * 0.5),
        lambda: a.update(edge_type=np.ones((e, 2), dtype=np.int64)),
        lambda: a.update(node_type=np.full(n, 9)),
        lambda: a.update(batch=np.arange(n)[::-1].copy()),
        lambda: a.update(batch=np.full(n, -1)),
        lambda: a.update(batch=np.where(np.arange(n) < n // 2, 0, 5)),
        lambda: a.update(batch=np.full(n, 2**40)),
        lambda: a.update(batch=np.zeros(n + 1, dtype=np.int64)),
        lambda: a.update(y=np.zeros((n, 2, 2))),
        lambda: a.update(graph_y=np.zeros(7)),
        lambda: a.update(node_extra=np.zeros(n + 3)),
        lambda: a.update(**{"é/..": np.zeros(n)}),
        lambda: a.update(edge_weight=np.full(e, np.nan, dtype=np.float32)),
        lambda: a.update(x=np.zeros((n, 4), dtype=[("a", "<f4"), ("b", "<i4")])),
    ]
    for _ in range(rng.choice((1, 1, 2))):
        try:
            rng.choice(choices)()
        except (KeyError, IndexError, ValueError, TypeError):  # an array an earlier corruption removed
            pass
    return a


def graph_case(rng: random.Random, index: int) -> dict:
    model = rng.choice(GRAPH_MODELS)
    arrays = base_graph(rng, model)
    kind = rng.randrange(20)
    if kind < 13:
        data = npz(_corrupt(arrays, rng), compressed=rng.random() < 0.3)
    elif kind == 13:  # pickled object arrays
        objects = dict(arrays)
        objects[rng.choice(("x", "edge_index", "num_nodes"))] = np.array([{"a": 1}, None], dtype=object)
        data = npz(objects, pickled=True)
    elif kind == 14:  # a header that declares a huge array
        members = {k + ".npy": _member(v) for k, v in arrays.items()}
        name = rng.choice(("x", "edge_index", "edge_attr_big"))
        shape = rng.choice(((10**12, 34), (2, 10**13), (2**40,), (34, 2**62), (-1, 3)))
        members[name + ".npy"] = npy_with_header(shape, rng.choice(("<f8", "<i8", "|b1", "<f4")), b"\0" * 64)
        data = zip_members(members)
    elif kind == 15:  # truncated
        full = npz(arrays, compressed=rng.random() < 0.5)
        data = full[: rng.randrange(len(full))]
    elif kind == 16:  # not a zip at all
        data = rng.choice((b"", b"not a graph", bytes(rng.randrange(256) for _ in range(300)), _member(arrays["x"]),
                           b"PK\x03\x04" + b"\0" * 100))
    elif kind == 17:  # a zip of other things
        data = zip_members({"edge_index.npy": b"garbage", "x.txt": b"1 2 3", "dir/": b""})
    elif kind == 18:  # a compressed large array (a small file that loads big)
        big = dict(arrays)
        big["node_big"] = np.zeros((34, rng.choice((1000, 200000))), dtype=np.float64)
        data = npz(big, compressed=True)
    else:  # a valid graph (saved and reloaded by the worker)
        data = npz(arrays)
    return {"kind": "graph", "files": {"g.npz": data}, "main": "g.npz", "model": model,
            "dtype": rng.choice(("float32", "float64")), "save": kind == 19 or rng.random() < 0.1}


# ---- weights ----------------------------------------------------------------------------------

# Parameter shapes of the models the weights cases load (karate: F = 34).
WEIGHT_SHAPES = {
    "gcn": {"W1": (34, 16), "b1": (16,), "W2": (16, 4), "b2": (4,)},
    "gat": {"W1": (34, 8, 8), "a_src1": (8, 8), "a_dst1": (8, 8), "b1": (64,), "W2": (64, 8, 4),
            "a_src2": (8, 4), "a_dst2": (8, 4), "b2": (4,)},
    "sage_mean": {"W_s1": (34, 16), "W_n1": (34, 16), "b1": (16,), "W_s2": (16, 4), "W_n2": (16, 4), "b2": (4,)},
}


def weights_case(rng: random.Random, index: int) -> dict:
    model = rng.choice(tuple(WEIGHT_SHAPES))
    g = np.random.default_rng(rng.randrange(2**32))
    w = {k: g.normal(size=s).astype(np.float32) for k, s in WEIGHT_SHAPES[model].items()}
    names = sorted(w)
    k = rng.choice(names)
    kind = rng.randrange(24)
    data = None
    if kind == 0:
        w.pop(k)
    elif kind == 1:
        w["extra"] = np.zeros(3)
    elif kind == 2:
        w[k] = w[k].T.copy() if w[k].ndim > 1 else w[k][:-1]
    elif kind == 3:
        w[k] = np.full_like(w[k], np.nan)
    elif kind == 4:
        w[k] = np.full_like(w[k], np.inf)
    elif kind == 5:
        w[k] = w[k].astype(np.int64)
    elif kind == 6:
        w[k] = w[k].astype(bool)
    elif kind == 7:
        w[k] = w[k].astype(np.complex64)
    elif kind == 8:
        w[k] = np.array(1.0)
    elif kind == 9:
        w[k] = w[k][..., None]
    elif kind == 10:
        w[k] = w[k].astype(">f8")
    elif kind == 11:
        w[k] = w[k].astype("U4")
    elif kind == 12:
        w[k] = np.zeros((0,) + w[k].shape[1:], dtype=np.float32)
    elif kind == 13:  # a consistent other width: F, H or C changes everywhere it appears
        w = {name: np.zeros(tuple(17 if d == 16 else d for d in s), dtype=np.float32)
             for name, s in WEIGHT_SHAPES[model].items()}
    elif kind == 14:
        data = npz({**w, k: np.array([object(), 1], dtype=object)}, pickled=True)
    elif kind == 15:
        members = {name + ".npy": _member(v) for name, v in w.items()}
        members[k + ".npy"] = npy_with_header(rng.choice(((10**12,), (2**31, 2**31), (34, 10**11))), "<f4", b"\0" * 32)
        data = zip_members(members)
    elif kind == 16:
        full = npz(w)
        data = full[: rng.randrange(len(full))]
    elif kind == 17:
        data = rng.choice((b"", b"weights", _member(w[k])))
    elif kind == 18:
        w = {}
    elif kind == 19:
        w[k] = w[k].astype(np.float16)
    elif kind == 20:
        w[k] = np.asfortranarray(w[k])
    elif kind == 21 and model == "gat":  # the product dim HEADS * HID from a mismatching b1
        w["b1"] = np.zeros(63, dtype=np.float32)
    elif kind == 22:  # large, some past float32's range
        with np.errstate(over="ignore"):
            w[k] = w[k] * np.float32(1e38)
    files = {"w.npz": data if data is not None else npz(w)}
    return {"kind": "weights", "files": files, "main": "w.npz", "model": model}


# ---- command lines ----------------------------------------------------------------------------

EXAMPLE_NAMES = sorted(p.stem for p in EXAMPLES.glob("*.mp"))
NODE_MODELS = ("gcn", "gat", "gin", "sage_mean", "sage_max")  # they read only x: karate and lesmis fit
# examples that need edge features or types: run on a karate graph that has them (``base_graph``)
EDGE_DATA_MODELS = ("gine", "rgcn", "hgt", "mpnn", "pna", "gated_gcn", "meshgraphnets", "rgat")

# Bad values per flag; a case starts from a valid command and spoils none, one or two flags.
BAD = {
    "--dim": ("H=0", "H=-1", "H=abc", "=3", "H", "H=99999999999999999999", "HEADS=1", "T=100000", "ZZ=3",
              "H=1_000", "H=٣", f"H={2**63}", "C=0"),
    "--dtype": ("float16", "int", ""),
    "--model": ("nope", "", "m"),
    "--emit": ("bogus", ""),
    "--passes": ("bogus", "", ",,,", "cse,cse,cse", "fuse_attention", "select_layout,typed_matmul", "dce," * 50),
    "--graph": ("{dir}/none.npz", "{dir}", "{dir}/g.npz"),
    "--weights": ("{dir}/w.npz", "{dir}/none.npz", "{dir}"),
    "--out": ("{dir}", "{dir}/no/such/dir/o.npz", "{dir}/out", "/dev/full"),
    "--save-weights": ("{dir}", "{dir}/no/dir/w.npz", "{dir}/sw"),
    "--seed": ("-1", str(2**64), str(-2**70), "abc", "1e3"),
    "--backend": ("triton", "bogus"),
    "--layout": ("reorder", "bogus"),
    "--data": ("{dir}/g.npz", "{dir}/none.npz", "tpsa"),
    "--epochs": ("0", "-1", "x", "1000000000"),
    "--split": ("masks", "80-10-10", "bogus"),
    "--task": ("graph-regression", "bogus"),
    "--lr": ("0", "-1", "nan", "inf", "1e400"),
    "--batch-size": ("0", "1000000"),
    "--max-time": ("0.000001", "0", "-5"),
    "--history": ("{dir}", "{dir}/no/dir/h.json"),
    "--save": ("{dir}", "{dir}/no/dir/b.npz"),
    "--limit": ("0", "-1", "1"),
    "--log-every": ("0", "5"),
}


def cli_case(rng: random.Random, index: int, bases: list[tuple[str, dict]]) -> dict:
    files: dict[str, bytes | str] = {}
    command = rng.choice(("check", "compile", "compile", "run", "run", "run", "run", "train", "", "bogus", "--help"))
    pick = rng.randrange(10)
    if pick < 6:
        name = rng.choice(NODE_MODELS)
        model_file, graph = f"{{examples}}/{name}.mp", rng.choice(("{examples}/data/karate.npz",
                                                                   "{examples}/data/lesmis.npz"))
    elif pick < 8:  # an example that needs edge features or types, on a graph that has them
        name = rng.choice(EDGE_DATA_MODELS)
        model_file, graph = f"{{examples}}/{name}.mp", "{dir}/good.npz"
        files["good.npz"] = npz(base_graph(rng, name))
    elif pick < 9:  # a mutated or generated program
        main, base_files = rng.choice(bases)
        files.update(base_files)
        model_file, graph = f"{{dir}}/{main}", "{examples}/data/karate.npz"
    else:
        model_file = rng.choice(("{dir}/missing.mp", "{dir}", "{dir}/empty.mp", "{dir}/bad.mp", "{dir}/bom.mp", ""))
        graph = "{examples}/data/karate.npz"
        files["empty.mp"] = ""
        files["bad.mp"] = b"\xff\xfe model \x80"
        files["bom.mp"] = "\ufeff" + (EXAMPLES / "gcn.mp").read_text()
    flags: dict[str, str | None] = {}
    if command == "compile":
        flags["--emit"] = rng.choice(("ast", "ir", "ir-opt", "plan", "plan", "triton"))
        if rng.random() < 0.3:
            flags["--locations"] = None
        if flags["--emit"] in ("plan", "triton", "ir-opt") and rng.random() < 0.7:
            flags["--graph"] = graph
    if command in ("compile", "run") and rng.random() < 0.2:
        flags["--passes"] = rng.choice(("cse,dce", "constant_folding,cse,hoist_gathers,fuse_message_aggregate",
                                        "reorder_linear,typed_matmul,dce"))
    if command == "run":
        flags["--graph"] = graph
        for flag, value, p in (("--out", "{dir}/out.npz", 0.3), ("--save-weights", "{dir}/sw.npz", 0.3),
                               ("--seed", str(rng.randrange(100)), 0.3), ("--no-opt", None, 0.2),
                               ("--layout", rng.choice(("auto", "reorder", "none")), 0.2),
                               ("--dtype", "float64", 0.2)):
            if rng.random() < p:
                flags[flag] = value
        if rng.random() < 0.15:
            flags["--weights"] = "{dir}/w.npz"
            files["w.npz"] = weights_case(rng, index)["files"]["w.npz"]
    if command == "train":
        flags.update({"--data": graph if "karate" in graph or "good" in graph else "{examples}/data/karate.npz",
                      "--epochs": rng.choice(("1", "2")), "--no-progress": None})
        if "karate" in flags["--data"] and rng.random() < 0.7:
            flags["--split"] = "karate-4"
        for flag, value, p in (("--lr", "0.05", 0.2), ("--history", "{dir}/h.json", 0.2),
                               ("--save", "{dir}/best.npz", 0.2), ("--seed", "3", 0.2), ("--log-every", "1", 0.1),
                               ("--weight-decay", "0.001", 0.1)):
            if rng.random() < p:
                flags[flag] = value
    if command in ("check", "compile", "run", "train") and rng.random() < 0.15:
        flags["--dim"] = rng.choice(("H=8", "C=2", "HID=4", "T=2"))
    spoil = rng.choice((0, 0, 1, 1, 2))
    applicable = [f for f in BAD if f in flags or rng.random() < 0.05]
    for flag in rng.sample(applicable, min(spoil, len(applicable))):
        value = rng.choice(BAD[flag])
        flags[flag] = value
        if "{dir}/g.npz" in value:
            files["g.npz"] = graph_case(rng, index)["files"]["g.npz"]
        if value == "{dir}/w.npz":
            files["w.npz"] = weights_case(rng, index)["files"]["w.npz"]
    if flags.get("--epochs") == "1000000000":  # a valid request that runs as long as it is allowed to
        flags["--max-time"] = "1"
    argv = ([command] if command else []) + ([model_file] if command not in ("", "bogus", "--help") else [])
    for flag, value in flags.items():
        argv += [flag] if value is None else [flag, value]
    if rng.random() < 0.03:
        argv.append(rng.choice(("--unknown-flag", "-x", "--", "--dim")))
    if rng.random() < 0.03:  # flags apart from their values: usage errors
        rng.shuffle(argv)
    return {"kind": "cli", "files": files, "argv": argv, "subprocess": rng.random() < 0.04}
