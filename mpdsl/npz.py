"""Reading ``.npz`` archives (graphs, weights) safely: every problem is a user error, and nothing
is allocated before the sizes the archive declares have been checked.

Each member's ``.npy`` header is read first (without its data) and checked: its dtype (never
Python objects: nothing is unpickled), a data size the member really holds (a header
that declares more than the member's bytes is a damaged file), a declared uncompressed size that
its compressed bytes can produce, and the total against the memory budget (``mpdsl.memory``).
Only then are the arrays read.
"""

from __future__ import annotations

import os
import zipfile
import zlib

import numpy as np

from mpdsl import memory
from mpdsl.diagnostics import MpdslError

NPY_MAGIC = b"\x93NUMPY"
DEFLATE_MAX_RATIO = 1032  # deflate cannot expand data more than about 1032:1
_PICKLE_PROTOCOLS = tuple(bytes([0x80, p]) for p in range(2, 6))

TORCH_HINTS = {
    "graph file": "convert it in Python: `data = torch.load(path, weights_only=False)` then "
                  "`mpdsl.Graph.from_pyg(data).save('graph.npz')` (or np.savez('graph.npz', "
                  "edge_index=data.edge_index.numpy(), x=data.x.numpy(), ...))",
    "weights file": "convert a state dict in Python: `np.savez('weights.npz', **{k: v.numpy() for k, v "
                    "in torch.load(path).items()})`, one array per parameter, named as in the .mp file",
}


def read_npz(path: str | os.PathLike[str], error: type[MpdslError], what: str,
             memory_limit: memory.Limit = None) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` archive at ``path`` by name (member ``x.npy`` is ``x``).

    ``what`` names the file in messages ("graph file", "weights file"); every problem raises
    ``error``. Arrays are read only after all headers are checked against the member sizes and
    the memory budget for ``memory_limit``."""
    name = os.fspath(path)
    label = f"{what} {name!r}"
    write_hint = "write graphs with Graph.save or np.savez" if what == "graph file" else \
        "write weights with CompiledModel.save_weights or np.savez (one array per parameter)"
    if os.path.isdir(name):
        raise error(f"{label} is a directory", f"pass the path of an .npz file; {write_hint}")
    try:
        with open(name, "rb") as handle:
            head = handle.read(8)
            file_size = os.fstat(handle.fileno()).st_size
    except FileNotFoundError:
        raise error(f"{label} does not exist", "check the path (relative paths start at the current folder)") from None
    except OSError as err:
        raise error(f"cannot read {label}: {err.strerror or err}", "pass the path of a readable .npz file") from None
    if head.startswith(NPY_MAGIC):
        raise error(f"{label} holds a single .npy array, not an .npz archive", write_hint)
    if head.startswith(_PICKLE_PROTOCOLS):
        raise error(f"{label} holds pickled Python objects (a torch.save or pickle file), "
                    "which mpdsl never loads", TORCH_HINTS.get(what, write_hint))
    if not zipfile.is_zipfile(name):
        detail = "it is empty" if file_size == 0 else "it is not a zip archive, or a truncated one"
        raise error(f"{label} is not an .npz archive ({detail})", write_hint)
    try:
        archive = zipfile.ZipFile(name)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise error(f"{label} is not a readable .npz archive ({err})", write_hint) from None
    with archive:
        infos = archive.infolist()
        if any(i.filename == "data.pkl" or i.filename.endswith("/data.pkl") for i in infos):
            raise error(f"{label} is a PyTorch file (torch.save), not an .npz archive",
                        TORCH_HINTS.get(what, write_hint))
        members = _check_members(archive, infos, file_size, error, label, write_hint)
        total = sum(nbytes for _, _, _, _, nbytes in members)
        allowed = memory.budget(memory_limit)
        if not allowed.allows(total):
            key, _, shape, dtype, nbytes = max(members, key=lambda m: m[4])
            raise error(f"{label} declares {memory.format_bytes(total)} of arrays (the largest: "
                        f"{key} {memory.shape_text(shape)} {dtype}, {memory.format_bytes(nbytes)}), "
                        f"over {allowed.describe()}; nothing was read", memory.HINT)
        arrays: dict[str, np.ndarray] = {}
        for key, info, _, _, _ in members:
            try:
                with archive.open(info) as member:
                    arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError) as err:
                raise error(f"array {key!r} of {label} cannot be read ({err})",
                            "the file is damaged (truncated or corrupt): write it again") from None
    return arrays


def _check_members(archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo], file_size: int,
                   error: type[MpdslError], label: str, write_hint: str) -> list[tuple]:
    """(key, info, shape, dtype, data bytes) per member, after checking each header."""
    members = []
    seen: set[str] = set()
    for info in infos:
        if not info.filename.endswith(".npy") or info.is_dir():
            raise error(f"{label} holds {info.filename!r}, which is not a .npy array", write_hint)
        key = info.filename[:-4]
        if key in seen:
            raise error(f"{label} holds two arrays named {key!r}", write_hint)
        seen.add(key)
        damaged = f"array {key!r} of {label} is damaged"
        if info.flag_bits & 0x1:
            raise error(f"array {key!r} of {label} is encrypted", write_hint)
        if info.header_offset + info.compress_size > file_size:
            raise error(f"{damaged}: it extends past the end of the file (truncated)",
                        "write the file again")
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise error(f"{damaged}: its stored size {info.compress_size} differs from its "
                        f"declared size {info.file_size}", "write the file again")
        if info.compress_type == zipfile.ZIP_DEFLATED and \
                info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 1024:
            raise error(f"{damaged}: it declares {memory.format_bytes(info.file_size)} from "
                        f"{memory.format_bytes(info.compress_size)} of compressed data, more "
                        "than deflate can produce", "write the file again")
        try:
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(member)
                else:  # 2.0, and 3.0 (the same layout, utf-8 text)
                    shape, _, dtype = np.lib.format.read_array_header_2_0(member)
                header_bytes = member.tell()
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError,
                SyntaxError) as err:
            raise error(f"array {key!r} of {label} has no valid .npy header ({err})",
                        write_hint) from None
        if dtype.hasobject:
            raise error(f"array {key!r} of {label} holds Python objects (dtype {dtype}), which "
                        "mpdsl never loads (no unpickling)",
                        "store numbers: convert the array with .astype(np.float32) or .astype(np.int64)")
        nbytes = memory.array_bytes(shape, dtype.itemsize)
        if info.file_size < header_bytes + nbytes:
            raise error(f"{damaged}: its header declares {memory.shape_text(shape)} {dtype} "
                        f"({memory.format_bytes(nbytes)}) but it holds "
                        f"{memory.format_bytes(max(info.file_size - header_bytes, 0))} of data",
                        "the file is truncated or corrupt: write it again")
        members.append((key, info, tuple(int(s) for s in shape), dtype, nbytes))
    return members


def check_writable(path: str | os.PathLike[str], error: type[MpdslError], what: str) -> str:
    """``path`` as a string after checking that a file can be created there: not a directory,
    in a folder that exists. Files are written under exactly this name (no suffix is added)."""
    name = os.fspath(path)
    if not name:
        raise error(f"the {what} path is empty", "pass a file name such as out.npz")
    if os.path.isdir(name):
        raise error(f"cannot write the {what} to {name!r}: it is a directory",
                    f"pass a file name, e.g. {os.path.join(name, 'out.npz')!r}")
    folder = os.path.dirname(name) or "."
    if not os.path.isdir(folder):
        raise error(f"cannot write the {what} to {name!r}: the folder {folder!r} does not exist",
                    "create the folder first, or pass a path in an existing one")
    return name


def write_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], error: type[MpdslError],
              what: str) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` at exactly ``path`` (np.savez's format;
    unlike np.savez given a name, no ``.npz`` is appended)."""
    name = check_writable(path, error, what)
    try:
        with open(name, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub matches **kwds to allow_pickle
    except OSError as err:
        raise error(f"cannot write the {what} to {name!r}: {err.strerror or err}",
                    "choose a writable path on a disk with free space") from None
