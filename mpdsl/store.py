"""Graphs stored as a directory of ``.npy`` files, for graphs larger than memory.

The format (version 1)::

    big/
      graph.json        {"format": "mpdsl.graph", "version": 1, "num_nodes": N}
      edge_index.npy    integer [2, E] (int64, or a narrower integer type)
      x.npy, y.npy, train_mask.npy, edge_attr.npy, ...
      .mpdsl/           written by mpdsl: the validation stamp and the saved CSR

Every ``<name>.npy`` file of the directory (dot-files aside) is the array ``name``, classified by
its name exactly as in an ``.npz`` graph file (``mpdsl.graph.classify_name``); other files are
ignored. Arrays are C-ordered ``.npy`` files of numbers or booleans in native byte order (never
Python objects: nothing is unpickled). ``graph.json`` is written last by ``write_directory``, so
a directory being written is never read as a graph.

``open_graph(path, mmap=True)`` memory-maps every array read-only, so a sampled batch reads only
its rows. Headers are checked against each other on every open (dtypes, row counts, file sizes);
the contents (edge range, finite features, non-negative ids) are checked once, in chunks of
``SCAN_CHUNK_BYTES`` read into one buffer, and recorded in ``.mpdsl/stamp.json`` with each file's
size, mtime and inode, so a later open skips the scan of every unchanged array. The CSR by
destination is built once, out of core (``CSR_BUFFER_BYTES`` of output buffers, whatever E), and
saved as ``.mpdsl/csr_dst_{indptr,perm,sources}.npy``; an open pre-fills the graph's cache with it
(``"csr_dst"``, ``"csr_dst_sources"``), memory-mapped. Integer ids stored narrower than int64
(``edge_index``, ``batch``, ``node_type``, ``edge_type``) get an int64 copy there too, since a
``Graph`` holds them as int64.

Where the data directory cannot be written, ``.mpdsl`` is used as it is when it is up to date, else
the same files go to ``$XDG_CACHE_HOME/mpdsl/graphs/<hash of the directory's real path>`` (default
``~/.cache``). Concurrent opens (ranks of a distributed run) take a file lock, so the scan and the
CSR are done once.

Pages that reads map count in the process's resident memory although they belong to the OS page
cache; ``release_pages(graph)`` unmaps them. A memory-mapped graph pickles as its path.

``open_graph(path, mmap=False)`` reads the arrays into memory (within the memory budget of
``mpdsl.memory``) and builds the graph with ``Graph``'s full validation, as for an ``.npz`` file;
it neither reads nor writes ``.mpdsl``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap as _mmap_module
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpdsl import memory
from mpdsl.cache_dirs import user_cache_root
from mpdsl.diagnostics import GraphError
from mpdsl.graph import (
    INDEX_ARRAYS,
    NAMED_FEATURES,
    RESERVED_NAMES,
    Graph,
    classify_name,
    position_text,
)

__all__ = ["GraphDirectoryWriter", "open_graph", "release_pages", "write_directory"]

FORMAT = "mpdsl.graph"
VERSION = 1
META_FILE = "graph.json"
CACHE_FOLDER = ".mpdsl"
STAMP_FILE = "stamp.json"
STAMP_FORMAT = "mpdsl.graph.stamp"
CSR_FILES = {"indptr": "csr_dst_indptr.npy", "perm": "csr_dst_perm.npy",
             "sources": "csr_dst_sources.npy"}
WIDE_INT = frozenset(INDEX_ARRAYS) | {"edge_index"}
"""Arrays a Graph holds as int64 (a narrower file gets an int64 copy beside the data)."""

SCAN_CHUNK_BYTES = 16 << 20
"""Bytes read at a time by the content checks and the CSR build (their resident memory)."""
CSR_BUFFER_BYTES = 1 << 30
"""Bytes of output buffers of the CSR build (perm + sources); E edges take ceil(16 E / this) passes."""

FORMAT_HINT = ("a graph directory holds graph.json ({\"format\": \"mpdsl.graph\", \"version\": 1, "
               "\"num_nodes\": N}), edge_index.npy and one <name>.npy per array; write one with "
               "Graph.save_directory")


@dataclass(frozen=True)
class ArrayFile:
    """The checked ``.npy`` header of the array ``name`` at ``path``: data from byte ``offset``."""

    name: str
    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    stat: tuple[int, int, int]

    @property
    def nbytes(self) -> int:
        return memory.array_bytes(self.shape, self.dtype.itemsize)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def label(self) -> str:
        return os.path.basename(self.path)


@dataclass(frozen=True)
class Layout:
    """A graph directory after its headers are checked: arrays by kind (``edge_index`` apart)."""

    directory: str
    num_nodes: int
    edge_index: ArrayFile
    arrays: dict[str, tuple[str, ArrayFile]]  # name -> (kind, file)

    def files(self) -> dict[str, ArrayFile]:
        """Every array's file by name, ``edge_index`` first."""
        return {"edge_index": self.edge_index, **{name: file for name, (_, file) in self.arrays.items()}}

    def error(self, message: str, hint: str | None = None) -> GraphError:
        return GraphError(f"in graph directory {self.directory!r}: {message}", hint=hint)


def _file_stat(path: str) -> tuple[int, int, int]:
    status = os.stat(path)
    return int(status.st_size), int(status.st_mtime_ns), int(status.st_ino)


# ------------------------------------------------------------------------------------------------
# Opening: graph.json and the headers


def _read_meta(directory: str) -> int:
    """``num_nodes`` from the directory's graph.json, after checking the file."""
    path = os.path.join(directory, META_FILE)
    where = f"graph directory {directory!r}"
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(1 << 16)
    except FileNotFoundError:
        npy = sorted(n for n in os.listdir(directory) if n.endswith(".npy"))
        held = f" (it holds {', '.join(npy[:6])})" if npy else ""
        raise GraphError(f"{where} has no {META_FILE}{held}", hint=FORMAT_HINT) from None
    except (OSError, UnicodeDecodeError) as err:
        raise GraphError(f"cannot read {META_FILE} of {where}: {err}", hint=FORMAT_HINT) from None
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise GraphError(f"{META_FILE} of {where} is not valid JSON ({err})", hint=FORMAT_HINT) from None
    if not isinstance(meta, dict):
        raise GraphError(f"{META_FILE} of {where} must hold a JSON object, got {type(meta).__name__}",
                         hint=FORMAT_HINT)
    expected = {"format", "version", "num_nodes"}
    missing, unknown = sorted(expected - meta.keys()), sorted(meta.keys() - expected)
    if missing or unknown:
        detail = "; ".join(([f"lacks {', '.join(map(repr, missing))}"] if missing else [])
                           + ([f"has unknown key {', '.join(map(repr, unknown))}"] if unknown else []))
        raise GraphError(f"{META_FILE} of {where} {detail}", hint=FORMAT_HINT)
    if meta["format"] != FORMAT:
        raise GraphError(f"{META_FILE} of {where} has format {meta['format']!r}, not {FORMAT!r}",
                         hint=FORMAT_HINT)
    if meta["version"] != VERSION or isinstance(meta["version"], bool):
        raise GraphError(f"{META_FILE} of {where} has version {meta['version']!r}; this mpdsl reads "
                         f"version {VERSION}", hint="write the directory again with this mpdsl")
    count = meta["num_nodes"]
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= np.iinfo(np.int64).max:
        raise GraphError(f"{META_FILE} of {where}: num_nodes must be a non-negative integer, got {count!r}",
                         hint="num_nodes is the node count, e.g. 1000")
    return count


def read_header(path: str, name: str, where: str) -> ArrayFile:
    """The header of the ``.npy`` file at ``path`` after checking it describes data the file holds
    (numbers or booleans, native byte order, C order, exactly the declared bytes)."""
    label = f"{os.path.basename(path)} of {where}"
    try:
        with open(path, "rb") as handle:
            try:
                version = np.lib.format.read_magic(handle)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            except (ValueError, EOFError, SyntaxError) as err:
                raise GraphError(f"{label} is not a valid .npy file ({err})",
                                 hint="write arrays with numpy.save (or Graph.save_directory)") from None
            offset = handle.tell()
            stat = _file_stat(path)
    except IsADirectoryError:
        raise GraphError(f"{label} is a directory, not a .npy file") from None
    except OSError as err:
        raise GraphError(f"cannot read {label}: {err.strerror or err}") from None
    if dtype.hasobject:
        raise GraphError(f"{label} holds Python objects (dtype {dtype}), which mpdsl never loads "
                         "(no unpickling)", hint=f"store numbers, e.g. {name}.astype(np.float32)")
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise GraphError(f"{label} has dtype {dtype}; graph arrays hold numbers or booleans",
                         hint=f"convert it, e.g. {name}.astype(np.float32)")
    if not dtype.isnative:
        raise GraphError(f"{label} has the non-native byte order of dtype {dtype.str}",
                         hint=f"write it with {name}.astype({dtype.newbyteorder('=').name!r})")
    if fortran and len(shape) > 1:
        raise GraphError(f"{label} is stored in Fortran order; the graph format stores rows "
                         "contiguously (C order)", hint=f"write np.ascontiguousarray({name})")
    header = ArrayFile(name, path, tuple(int(s) for s in shape), np.dtype(dtype), offset, stat)
    held = stat[0] - offset
    if held != header.nbytes:
        state = "truncated" if held < header.nbytes else "damaged (longer than its header says)"
        raise GraphError(f"{label} is {state}: its header declares {memory.shape_text(header.shape)} "
                         f"{dtype} ({memory.format_bytes(header.nbytes)}) but it holds "
                         f"{memory.format_bytes(max(held, 0))} of data", hint="write the file again")
    return header


def _check_dtype(header: ArrayFile, kind: str, where: str) -> None:
    """The checks of ``Graph`` that depend on an array's dtype and rank alone."""
    name, dtype, label = header.name, header.dtype, f"{header.label} of {where}"
    if not header.shape:
        raise GraphError(f"{label} is a scalar but {kind} arrays need one row per {kind}",
                         hint=f"give {name} a leading dimension of one row per {kind}")
    if name in INDEX_ARRAYS:
        if dtype.kind not in "iu":
            raise GraphError(f"{label} must hold integers, got dtype {dtype}",
                             hint=f"cast it with {name}.astype(np.int64)")
        if len(header.shape) != 1:
            raise GraphError(f"{label} must be 1-D, got shape {memory.shape_text(header.shape)}",
                             hint=f"flatten it with {name}.reshape(-1)")
        if INDEX_ARRAYS[name] != kind:
            raise GraphError(f"{label} must be a {INDEX_ARRAYS[name]} array, not a {kind} array")
    elif dtype.kind == "b" and name in NAMED_FEATURES:
        raise GraphError(f"{label} must hold real numbers, got dtype {dtype}",
                         hint=f"convert it, e.g. {name}.astype(np.float32)")


def open_layout(path: str | os.PathLike[str]) -> Layout:
    """The checked layout of the graph directory at ``path``: graph.json, every array's header,
    dtypes and row counts (graph arrays against ``batch`` are checked once its contents are)."""
    directory = os.fspath(path)
    where = f"graph directory {directory!r}"
    num_nodes = _read_meta(directory)
    names = sorted(entry[:-4] for entry in os.listdir(directory)
                   if entry.endswith(".npy") and not entry.startswith("."))
    if "edge_index" not in names:
        found = ", ".join(f"{n}.npy" for n in names[:8]) or "no .npy files"
        raise GraphError(f"{where} has no edge_index.npy (it holds {found})",
                         hint="store the edges as an integer array of shape [2, E] in edge_index.npy")
    edge_index = read_header(os.path.join(directory, "edge_index.npy"), "edge_index", where)
    if edge_index.dtype.kind not in "iu":
        raise GraphError(f"edge_index.npy of {where} must hold integers, got dtype {edge_index.dtype}",
                         hint="cast it with .astype(np.int64)")
    if len(edge_index.shape) != 2 or edge_index.shape[0] != 2:
        raise GraphError(f"edge_index.npy of {where} must have shape [2, E], got "
                         f"{memory.shape_text(edge_index.shape)}",
                         hint="row 0 holds sources, row 1 destinations (an [E, 2] list must be transposed)")
    num_edges = edge_index.shape[1]
    arrays: dict[str, tuple[str, ArrayFile]] = {}
    for name in names:
        if name == "edge_index":
            continue
        if name in RESERVED_NAMES:
            raise GraphError(f"{where} holds {name}.npy, but {name} belongs in {META_FILE}",
                             hint=f"remove {name}.npy")
        header = read_header(os.path.join(directory, f"{name}.npy"), name, where)
        kind = classify_name(name, header.shape[0] if header.shape else None, num_nodes)
        _check_dtype(header, kind, where)
        expected = {"node": num_nodes, "edge": num_edges}.get(kind)
        if expected is not None and header.shape[0] != expected:
            plural = "nodes" if kind == "node" else "edges"
            raise GraphError(f"{header.label} of {where} has {header.shape[0]} rows but the graph has "
                             f"{expected} {plural} ({'graph.json' if kind == 'node' else 'edge_index.npy'})",
                             hint=f"{kind} arrays need one row per {kind}")
        arrays[name] = (kind, header)
    return Layout(directory, num_nodes, edge_index, arrays)


# ------------------------------------------------------------------------------------------------
# Reading in chunks, and the content checks


def read_chunks(header: ArrayFile, start: int = 0, stop: int | None = None,
                chunk_bytes: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(flat start, elements) of the array's flat elements ``start:stop`` in chunks, read into one
    reused buffer (valid until the next chunk): resident memory stays one chunk whatever the size."""
    stop = header.size if stop is None else stop
    itemsize = header.dtype.itemsize
    step = max(1, (chunk_bytes or SCAN_CHUNK_BYTES) // itemsize)
    buffer = np.empty(min(step, max(stop - start, 0)), dtype=header.dtype)
    with open(header.path, "rb", buffering=0) as handle:
        for first in range(start, stop, step):
            count = min(step, stop - first)
            view = buffer[:count]
            handle.seek(header.offset + first * itemsize)
            if handle.readinto(view.data.cast("B")) != count * itemsize:
                raise GraphError(f"{header.label} was truncated while it was read",
                                 hint="another process is writing it; open the graph when it is done")
            yield first, view


def _first_bad(header: ArrayFile, flat_start: int, chunk: np.ndarray, bad: np.ndarray) -> tuple[str, Any]:
    """The position text and value of the first True of ``bad`` in the chunk at ``flat_start``."""
    local = int(np.flatnonzero(bad)[0])
    position = np.unravel_index(flat_start + local, header.shape)
    return position_text(tuple(int(i) for i in position)), chunk[local]


def _scan(layout: Layout, name: str, header: ArrayFile, wide: NpyWriter | None) -> int | None:
    """Check the contents of one array chunk by chunk (as ``Graph`` checks them in memory), writing
    its int64 copy to ``wide`` when given; the largest id of an index array (else None)."""
    where = f"in graph directory {layout.directory!r}"
    is_edges = name == "edge_index"
    is_index = is_edges or name in INDEX_ARRAYS
    limit = layout.num_nodes if is_edges else np.iinfo(np.int64).max + 1
    largest = -1
    for first, chunk in read_chunks(header):
        if chunk.dtype.kind == "f":
            # min and max are NaN when any element is; one pass, no mask unless something is wrong
            if not (np.isfinite(chunk.min()) and np.isfinite(chunk.max())):
                position, value = _first_bad(header, first, chunk, ~np.isfinite(chunk))
                raise GraphError(f"{where}: {name}{position} is {value}",
                                 hint="features must be finite (no NaN or infinity)")
        elif is_index and chunk.size:
            low, high = int(chunk.min()), int(chunk.max())
            if low < 0 or high >= limit:
                position, value = _first_bad(header, first, chunk, chunk < 0 if low < 0 else chunk >= limit)
                if low < 0:
                    problem = "is negative"
                elif is_edges:
                    problem = f"is out of range for num_nodes={layout.num_nodes}"
                else:
                    problem = "is too large"
                hint = ("node indices run from 0 to num_nodes - 1; set a larger num_nodes in graph.json if "
                        "the graph has more nodes" if is_edges else f"{name} holds ids counted from 0")
                raise GraphError(f"{where}: {name}{position} = {value} {problem}", hint=hint)
            largest = max(largest, high)
        if wide is not None:
            wide.write(first, chunk)
    return largest if name in INDEX_ARRAYS else None


# ------------------------------------------------------------------------------------------------
# Writing .npy files in chunks


class NpyWriter:
    """A ``.npy`` file of a given shape and dtype written in pieces (``write`` at a flat element
    offset), under a temporary name until ``commit`` renames it into place (readers that memory-map
    the old file keep it)."""

    def __init__(self, path: str, shape: tuple[int, ...], dtype: Any):
        self.path, self.shape, self.dtype = path, tuple(int(s) for s in shape), np.dtype(dtype)
        self.temporary = os.path.join(os.path.dirname(path) or ".",
                                      f".{os.path.basename(path)}.{os.getpid()}.tmp")
        self.handle = open(self.temporary, "wb")  # noqa: SIM115  # closed by commit / discard
        np.lib.format.write_array_header_1_0(self.handle, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": self.shape})
        self.offset = self.handle.tell()
        self.handle.truncate(self.offset + memory.array_bytes(self.shape, self.dtype.itemsize))

    def write(self, flat_start: int, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype).reshape(-1)
        self.handle.seek(self.offset + flat_start * self.dtype.itemsize)
        self.handle.write(data.data.cast("B"))

    def write_array(self, array: np.ndarray) -> None:
        """All of ``array`` (this file's shape), copied in chunks of ``SCAN_CHUNK_BYTES``."""
        if array.ndim == 0:
            self.write(0, array)
            return
        row_elements = max(1, int(np.prod(array.shape[1:], dtype=np.int64)))
        rows = max(1, SCAN_CHUNK_BYTES // (row_elements * max(1, array.dtype.itemsize)))
        for first in range(0, array.shape[0], rows):
            self.write(first * row_elements, array[first:first + rows])

    def commit(self) -> None:
        self.handle.close()
        os.replace(self.temporary, self.path)

    def discard(self) -> None:
        self.handle.close()
        with contextlib.suppress(OSError):
            os.unlink(self.temporary)


class GraphDirectoryWriter:
    """Writes a graph directory array by array (``array`` returns an ``NpyWriter``; whole arrays
    with ``put``); graph.json is written when the block ends without an error, so an interrupted
    write never reads as a graph. An existing graph directory is replaced only with ``overwrite``."""

    def __init__(self, path: str | os.PathLike[str], num_nodes: int, *, overwrite: bool = False):
        self.directory = os.fspath(path)
        self.num_nodes = int(num_nodes)
        self.overwrite = overwrite
        self.writers: list[NpyWriter] = []

    def __enter__(self) -> GraphDirectoryWriter:
        directory = self.directory
        if os.path.exists(directory) and not os.path.isdir(directory):
            raise GraphError(f"cannot write a graph directory at {directory!r}: it is a file",
                             hint="pass a new folder name")
        occupied = os.path.isdir(directory) and bool(os.listdir(directory))
        if occupied and not (self.overwrite and os.path.exists(os.path.join(directory, META_FILE))):
            raise GraphError(f"cannot write a graph directory at {directory!r}: the folder is not empty",
                             hint="pass a new folder" + (", or overwrite=True (make_big_graph.py: --overwrite) "
                                                         "to replace the graph stored there"
                                                         if not self.overwrite else ""))
        try:
            if occupied:
                os.unlink(os.path.join(directory, META_FILE))  # first: from now on it is no graph
                for entry in os.listdir(directory):
                    if entry.endswith(".npy"):
                        os.unlink(os.path.join(directory, entry))
                shutil.rmtree(os.path.join(directory, CACHE_FOLDER), ignore_errors=True)
            os.makedirs(directory, exist_ok=True)
        except OSError as err:
            raise GraphError(f"cannot write a graph directory at {directory!r}: {err.strerror or err}",
                             hint="choose a writable folder") from None
        return self

    def array(self, name: str, shape: tuple[int, ...], dtype: Any) -> NpyWriter:
        if not name or name.startswith(".") or os.sep in name or name in RESERVED_NAMES - {"edge_index"}:
            raise GraphError(f"{name!r} cannot be an array name in a graph directory")
        writer = NpyWriter(os.path.join(self.directory, f"{name}.npy"), shape, dtype)
        self.writers.append(writer)
        return writer

    def put(self, name: str, array: np.ndarray) -> None:
        self.array(name, array.shape, array.dtype).write_array(array)

    def __exit__(self, kind: Any, error: BaseException | None, _traceback: Any) -> None:
        if kind is None:
            try:
                for writer in self.writers:
                    writer.commit()
                _write_json(os.path.join(self.directory, META_FILE),
                            {"format": FORMAT, "version": VERSION, "num_nodes": self.num_nodes})
                return
            except OSError as err:
                error = err
        for writer in self.writers:
            writer.discard()  # a committed file is in place: nothing of it is left to remove
        if isinstance(error, OSError):
            raise GraphError(f"cannot write the graph directory {self.directory!r}: {error.strerror or error}",
                             hint="choose a writable folder on a disk with free space") from None


def _write_json(path: str, value: Any) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1)
        handle.write("\n")
    os.replace(temporary, path)


def write_directory(graph: Graph, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Write ``graph`` as a graph directory at ``path`` (a new or empty folder; with ``overwrite``,
    an existing graph directory is replaced), arrays copied in chunks."""
    names = graph.keys()
    if graph.node_types:
        raise GraphError(f"a graph directory holds one node set, but this graph has the node types "
                         f"{', '.join(graph.node_types)}", hint="save it as an .npz file (Graph.save), which holds "
                         "a typed graph")
    if graph.edge_sets:
        raise GraphError(f"a graph directory holds one edge set (edge_index), but this graph also carries "
                         f"{', '.join(graph.edge_sets)}", hint="save it as an .npz file (Graph.save), which "
                         "holds every edge set")
    for name in names:
        kind = graph._kind_of(name)
        read_back = classify_name(name, graph[name].shape[0], graph.num_nodes)
        if read_back != kind:
            raise GraphError(f"{kind} array {name} would be read back as a {read_back} array",
                             hint=f"rename it to {kind}_{name} before saving")
    with GraphDirectoryWriter(path, graph.num_nodes, overwrite=overwrite) as out:
        out.put("edge_index", graph.edge_index)
        for name in names:
            out.put(name, graph[name])


# ------------------------------------------------------------------------------------------------
# The cache folder (stamp, CSR, int64 copies)


def _user_cache_root() -> str | None:
    root = user_cache_root()
    return None if root is None else os.path.join(root, "graphs")


def _candidate_folders(directory: str) -> list[str]:
    """Where the stamp and derived files may live: beside the data, then the user's cache."""
    folders = [os.path.join(directory, CACHE_FOLDER)]
    root = _user_cache_root()
    if root is not None:
        digest = hashlib.sha256(os.path.realpath(directory).encode()).hexdigest()[:16]
        folders.append(os.path.join(root, digest))
    return folders


def _writable(folder: str) -> bool:
    try:
        os.makedirs(folder, mode=0o755, exist_ok=True)
        probe = os.path.join(folder, f".probe.{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
        return True
    except OSError:
        return False


def _read_stamp(folder: str) -> dict[str, Any]:
    """The stamp in ``folder``; an absent, unreadable or foreign one reads as empty (all stale)."""
    try:
        with open(os.path.join(folder, STAMP_FILE), encoding="utf-8") as handle:
            stamp = json.load(handle)
    except (OSError, ValueError):
        return {}
    if not isinstance(stamp, dict) or stamp.get("format") != STAMP_FORMAT or stamp.get("version") != VERSION:
        return {}
    return stamp


@contextlib.contextmanager
def _locked(folder: str) -> Iterator[None]:
    """An exclusive lock on ``folder`` (one process scans and builds; the others then reuse)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (writes are atomic renames all the same)
        yield
        return
    with open(os.path.join(folder, "lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _stale(layout: Layout, folder: str, stamp: dict[str, Any]) -> list[str]:
    """What the stamp in ``folder`` does not vouch for: array names, and "csr_dst"."""
    entries = stamp.get("arrays", {}) if isinstance(stamp.get("arrays"), dict) else {}
    stale = []
    for name, header in layout.files().items():
        entry = entries.get(name)
        if not isinstance(entry, dict) or entry.get("source") != list(header.stat) \
                or entry.get("num_nodes") != layout.num_nodes:
            stale.append(name)
            continue
        if _needs_wide(name, header) and entry.get("wide") != _stat_or_none(_wide_path(folder, name)):
            stale.append(name)
    csr = stamp.get("csr_dst")
    if not isinstance(csr, dict) or csr.get("edge_index") != list(layout.edge_index.stat) \
            or csr.get("num_nodes") != layout.num_nodes or csr.get("files") != {
                key: _stat_or_none(os.path.join(folder, file)) for key, file in CSR_FILES.items()}:
        stale.append("csr_dst")
    return stale


def _stat_or_none(path: str) -> list[int] | None:
    try:
        return list(_file_stat(path))
    except OSError:
        return None


def _needs_wide(name: str, header: ArrayFile) -> bool:
    return name in WIDE_INT and header.dtype != np.int64


def _wide_path(folder: str, name: str) -> str:
    return os.path.join(folder, f"{name}.int64.npy")


def _prepare(layout: Layout) -> tuple[str, dict[str, Any]]:
    """The cache folder holding an up-to-date stamp and CSR for ``layout``, scanning and building
    what is stale; and the stamp."""
    folders = _candidate_folders(layout.directory)
    for candidate in folders:
        stamp = _read_stamp(candidate)
        if stamp and not _stale(layout, candidate, stamp):
            return candidate, stamp
    folder = next((f for f in folders if _writable(f)), None)
    if folder is None:
        raise layout.error(f"the validation stamp and CSR cannot be saved: none of {', '.join(folders)} is "
                           "writable", hint="make the directory writable once (the files are built once), "
                                            "or set XDG_CACHE_HOME to a writable folder")
    with _locked(folder):
        stamp = _read_stamp(folder) or {"format": STAMP_FORMAT, "version": VERSION, "arrays": {}}
        stale = _stale(layout, folder, stamp)
        headers = layout.files()
        try:
            for name in stale:
                if name == "csr_dst":
                    continue
                header = headers[name]
                wide = NpyWriter(_wide_path(folder, name), header.shape, np.int64) \
                    if _needs_wide(name, header) else None
                try:
                    largest = _scan(layout, name, header, wide)
                except BaseException:
                    if wide is not None:
                        wide.discard()
                    raise
                if wide is not None:
                    wide.commit()
                stamp["arrays"][name] = {"source": list(header.stat), "num_nodes": layout.num_nodes,
                                         "max": largest,
                                         "wide": _stat_or_none(_wide_path(folder, name)) if wide else None}
                _write_json(os.path.join(folder, STAMP_FILE), stamp)
            if "csr_dst" in stale:
                edges = _edge_file(layout, folder)
                build_csr(edges, layout.num_nodes, folder)
                stamp["csr_dst"] = {"edge_index": list(layout.edge_index.stat), "num_nodes": layout.num_nodes,
                                    "files": {key: _stat_or_none(os.path.join(folder, file))
                                              for key, file in CSR_FILES.items()}}
                _write_json(os.path.join(folder, STAMP_FILE), stamp)
        except OSError as err:
            raise layout.error(f"cannot write the derived files in {folder!r}: {err.strerror or err}",
                               hint="free disk space, or set XDG_CACHE_HOME to a folder with room") from None
    return folder, stamp


def _edge_file(layout: Layout, folder: str) -> ArrayFile:
    """The int64 edge_index file (the data's own, or its int64 copy in ``folder``)."""
    if not _needs_wide("edge_index", layout.edge_index):
        return layout.edge_index
    return read_header(_wide_path(folder, "edge_index"), "edge_index", f"folder {folder!r}")


# ------------------------------------------------------------------------------------------------
# The CSR by destination, out of core


def _csr_kernels() -> tuple[Any, Any]:
    """The Numba kernels of ``build_csr`` (compiled on first use, cached on disk)."""
    from mpdsl.backends.cpu_kernels import njit  # that module sets Numba's cache folder first

    @njit(cache=True, nogil=True, boundscheck=False)
    def count_into(dst, counts):  # pragma: no cover - compiled
        for i in range(dst.shape[0]):
            counts[dst[i]] += 1

    @njit(cache=True, nogil=True, boundscheck=False)
    def place(src, dst, first_edge, cursor, low, high, perm, sources):  # pragma: no cover - compiled
        # Edges arrive in id order and each destination's cursor only grows: a stable counting sort.
        for i in range(dst.shape[0]):
            slot = cursor[dst[i]]
            cursor[dst[i]] = slot + 1
            if low <= slot < high:
                perm[slot - low] = first_edge + i
                sources[slot - low] = src[i]

    return count_into, place


_KERNELS: tuple[Any, Any] | None = None


def build_csr(edges: ArrayFile, num_nodes: int, folder: str, buffer_bytes: int | None = None) -> None:
    """Write ``csr_dst_indptr.npy`` [N+1], ``csr_dst_perm.npy`` [E] (edges grouped by destination,
    in id order within a group: ``Graph.csr_by_dst()``) and ``csr_dst_sources.npy`` [E] (= src[perm])
    into ``folder`` from the int64 [2, E] ``edges`` file, with a counting sort: one pass counting
    in-degrees, then one pass per ``buffer_bytes`` of output, each reading the edges in chunks.
    Memory: 24 bytes per node (counts, indptr, cursors), the output buffers, two read chunks."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _csr_kernels()
    count_into, place = _KERNELS
    num_edges = edges.shape[1]
    counts = np.zeros(num_nodes, dtype=np.int64)
    for _, dst in read_chunks(edges, num_edges, 2 * num_edges):
        count_into(dst, counts)
    indptr = np.zeros(num_nodes + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    del counts
    per_pass = max(1, (buffer_bytes or CSR_BUFFER_BYTES) // 16)
    perm_out = NpyWriter(os.path.join(folder, CSR_FILES["perm"]), (num_edges,), np.int64)
    sources_out = NpyWriter(os.path.join(folder, CSR_FILES["sources"]), (num_edges,), np.int64)
    indptr_out = NpyWriter(os.path.join(folder, CSR_FILES["indptr"]), (num_nodes + 1,), np.int64)
    try:
        perm = np.empty(min(per_pass, num_edges), dtype=np.int64)
        sources = np.empty_like(perm)
        for low in range(0, num_edges, per_pass):
            high = min(low + per_pass, num_edges)
            cursor = indptr[:-1].copy()
            for (first, src), (_, dst) in zip(read_chunks(edges, 0, num_edges),
                                              read_chunks(edges, num_edges, 2 * num_edges)):
                place(src, dst, first, cursor, low, high, perm, sources)
            perm_out.write(low, perm[:high - low])
            sources_out.write(low, sources[:high - low])
        indptr_out.write(0, indptr)
    except BaseException:
        for writer in (perm_out, sources_out, indptr_out):
            writer.discard()
        raise
    for writer in (perm_out, sources_out, indptr_out):
        writer.commit()


# ------------------------------------------------------------------------------------------------
# Opening a graph


def _memmap(header: ArrayFile) -> np.ndarray:
    """The array of ``header`` memory-mapped read-only (an empty one is an empty array)."""
    if header.nbytes == 0:
        empty = np.empty(header.shape, dtype=header.dtype)
        empty.flags.writeable = False
        return empty
    return np.memmap(header.path, dtype=header.dtype, mode="r", offset=header.offset, shape=header.shape)


def _read_whole(header: ArrayFile) -> np.ndarray:
    array = np.empty(header.shape, dtype=header.dtype)
    flat = array.reshape(-1)
    for first, chunk in read_chunks(header):
        flat[first:first + chunk.size] = chunk
    return array


def open_graph(path: str | os.PathLike[str], *, mmap: bool = False,
               memory_limit: memory.Limit = None) -> Graph:
    """The graph stored in the graph directory at ``path`` (see the module doc): memory-mapped
    with ``mmap`` (validated once, then trusted through the stamp; CSR pre-filled), else read into
    memory within the memory budget and validated as ``Graph`` validates arrays."""
    layout = open_layout(path)
    if not mmap:
        return _read_graph(layout, memory_limit)
    folder, stamp = _prepare(layout)
    entries = stamp["arrays"]

    def array_of(name: str, header: ArrayFile) -> np.ndarray:
        return _memmap(read_header(_wide_path(folder, name), name, f"folder {folder!r}")
                       if _needs_wide(name, header) else header)

    edge_index = array_of("edge_index", layout.edge_index)
    groups: dict[str, dict[str, np.ndarray]] = {"node": {}, "edge": {}, "graph": {}}
    for name, (kind, header) in layout.arrays.items():
        groups[kind][name] = array_of(name, header)
    num_graphs = 1
    if "batch" in groups["node"]:
        num_graphs = int(entries["batch"]["max"]) + 1
    for name, array in groups["graph"].items():
        if array.shape[0] != num_graphs:
            raise layout.error(f"{name}.npy has {array.shape[0]} rows but the graph has {num_graphs} graphs "
                               "(batch.npy)", hint="graph arrays need one row per graph")
    csr = {key: _memmap(read_header(os.path.join(folder, file), key, f"folder {folder!r}"))
           for key, file in CSR_FILES.items()}
    cache = {"csr_dst": (csr["indptr"], csr["perm"]), "csr_dst_sources": csr["sources"]}
    return Graph._trusted(edge_index, layout.num_nodes, num_graphs, groups, cache,
                          source=os.path.abspath(layout.directory))


def _read_graph(layout: Layout, memory_limit: memory.Limit) -> Graph:
    headers = list(layout.files().values())
    total = sum(h.nbytes for h in headers)
    allowed = memory.budget(memory_limit)
    if not allowed.allows(total):
        largest = max(headers, key=lambda h: h.nbytes)
        raise layout.error(f"the arrays take {memory.format_bytes(total)} (the largest: {largest.label} "
                           f"{memory.shape_text(largest.shape)} {largest.dtype}, "
                           f"{memory.format_bytes(largest.nbytes)}), over {allowed.describe()}; nothing was "
                           "read", hint="open it memory-mapped: Graph.load(path, mmap=True); or " + memory.RAISE)
    groups: dict[str, dict[str, np.ndarray]] = {"node": {}, "edge": {}, "graph": {}}
    for name, (kind, header) in layout.arrays.items():
        groups[kind][name] = _read_whole(header)
    try:
        return Graph(_read_whole(layout.edge_index), layout.num_nodes, node_data=groups["node"],
                     edge_data=groups["edge"], graph_data=groups["graph"])
    except GraphError as exc:
        raise layout.error(exc.message, hint=exc.hint) from None


def reopen(path: str) -> Graph:
    """The memory-mapped graph at ``path`` again (how such a graph is pickled: by its path)."""
    return open_graph(path, mmap=True)



def release_pages(graph: Graph) -> int:
    """Unmap from this process the pages of ``graph``'s memory-mapped arrays (and its saved CSR)
    that reads have mapped: they stay in the OS page cache, so a later read maps them again without
    disk I/O, but no longer count in this process's resident memory. Gathers from a memory map
    map whole page-cache folios (up to 2 MiB each on recent Linux kernels, whatever the row size),
    so a sampler that must keep its RSS low calls this every few batches. Returns how many
    mappings were released (0 for an in-memory graph or where ``madvise`` is unavailable)."""
    arrays = [graph.edge_index, *graph.node_data.values(), *graph.edge_data.values(),
              *graph.graph_data.values()]
    for key in ("csr_dst", "csr_dst_sources"):
        cached = graph.cached_only(key)
        arrays.extend(cached if isinstance(cached, tuple) else [cached] if cached is not None else [])
    mappings = {id(m): m for a in arrays
                if isinstance(a, np.memmap) and (m := getattr(a, "_mmap", None)) is not None}
    return sum(unmap_pages(mapping) for mapping in mappings.values())


def unmap_pages(mapping: _mmap_module.mmap) -> bool:
    """Unmap the pages of the file mapping ``mapping`` from this process (``MADV_DONTNEED``: they stay
    in the page cache, and a later read maps them again without disk I/O); False where the platform
    has no ``madvise``."""
    advice = getattr(_mmap_module, "MADV_DONTNEED", None)
    if advice is None or not hasattr(mapping, "madvise"):
        return False
    mapping.madvise(advice)
    return True
