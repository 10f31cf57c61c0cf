"""Molecules as graphs: SMILES to ``Graph`` with fixed atom and bond feature layouts, and the
TPSA regression set bundled with RDKit.

RDKit is an optional dependency (``pip install "mpdsl[chem]"``), imported only when a function
here needs it; importing this module never requires it.

A molecule becomes one graph: one node per heavy atom (hydrogens are counted on their atom, as
RDKit's ``MolFromSmiles`` leaves them implicit), and two directed edges per bond, j -> i and
i -> j, with the same features, sorted by (source, destination) as PyTorch Geometric's
``from_smiles`` does. A molecule of one atom is one node and no edges. ``x`` is float32
[N, ATOM_DIM] and ``edge_attr`` float32 [E, BOND_DIM]; every group below is a one-hot block (one
column set per atom or bond) except the flags, which are 0/1.

Atom features (``ATOM_FEATURES``, ``ATOM_DIM = 35`` columns):

| columns | group | values |
|---|---|---|
| 0-10 | element | H, C, N, O, F, P, S, Cl, Br, I, other (any other element) |
| 11-16 | degree (heavy-atom neighbours) | 0, 1, 2, 3, 4, 5 or more |
| 17-21 | formal charge | -2 or less, -1, 0, +1, +2 or more |
| 22-26 | total hydrogen count (implicit + explicit) | 0, 1, 2, 3, 4 or more |
| 27-32 | hybridisation | SP, SP2, SP3, SP3D, SP3D2, other (S, unspecified, ...) |
| 33 | aromatic | 1 if the atom is aromatic (RDKit's aromaticity model) |
| 34 | in ring | 1 if the atom is in a ring |

Bond features (``BOND_FEATURES``, ``BOND_DIM = 6`` columns):

| columns | group | values |
|---|---|---|
| 0-3 | bond type | single, double, triple, aromatic (any other type, e.g. dative: all four 0) |
| 4 | conjugated | 1 if the bond is conjugated |
| 5 | in ring | 1 if the bond is in a ring |

``ATOM_GROUPS`` / ``BOND_GROUPS`` give each group's column slice, and ``ATOM_FEATURES`` /
``BOND_FEATURES`` name every column (``"element=C"``, ``"degree=5+"``, ``"aromatic"``, ...).

Command line: ``python -m mpdsl.chem tpsa --out tpsa.npz [--limit N]`` writes the TPSA set as
one batched graph with the targets as the graph array ``graph_y``;
``python -m mpdsl.chem smiles CCO c1ccccc1 --out mols.npz`` writes the given molecules.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .diagnostics import GraphError, MpdslError
from .graph import Graph

__all__ = [
    "ATOM_DIM",
    "ATOM_FEATURES",
    "ATOM_GROUPS",
    "BOND_DIM",
    "BOND_FEATURES",
    "BOND_GROUPS",
    "ELEMENTS",
    "ChemError",
    "MoleculeDataset",
    "from_smiles",
    "main",
    "molecules",
    "split",
    "tpsa_dataset",
    "tpsa_path",
]

INSTALL_HINT = 'pip install "mpdsl[chem]"'

# ---------------------------------------------------------------------------------------------
# Feature layouts

ELEMENTS = ("H", "C", "N", "O", "F", "P", "S", "Cl", "Br", "I")
"""Elements with their own column; any other element sets the ``element=other`` column."""

_HYBRIDISATIONS = ("SP", "SP2", "SP3", "SP3D", "SP3D2")
_BOND_TYPES = ("SINGLE", "DOUBLE", "TRIPLE", "AROMATIC")

_ATOM_LAYOUT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("element", (*ELEMENTS, "other")),
    ("degree", ("0", "1", "2", "3", "4", "5+")),
    ("formal_charge", ("-2-", "-1", "0", "+1", "+2+")),
    ("num_hs", ("0", "1", "2", "3", "4+")),
    ("hybridisation", (*_HYBRIDISATIONS, "other")),
    ("aromatic", ()),
    ("in_ring", ()),
)
_BOND_LAYOUT: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("bond_type", ("single", "double", "triple", "aromatic")),
    ("conjugated", ()),
    ("in_ring", ()),
)


def _columns(layout) -> tuple[tuple[str, ...], dict[str, slice]]:
    names: list[str] = []
    groups: dict[str, slice] = {}
    for group, values in layout:
        start = len(names)
        names.extend([f"{group}={v}" for v in values] if values else [group])
        groups[group] = slice(start, len(names))
    return tuple(names), groups


ATOM_FEATURES, ATOM_GROUPS = _columns(_ATOM_LAYOUT)
"""Names of the columns of ``x`` and the column slice of each group (see the module doc)."""
BOND_FEATURES, BOND_GROUPS = _columns(_BOND_LAYOUT)
"""Names of the columns of ``edge_attr`` and the column slice of each group."""
ATOM_DIM = len(ATOM_FEATURES)
BOND_DIM = len(BOND_FEATURES)

# Column offsets of the one-hot groups, in the order of the code columns built by _encode.
_ATOM_ONE_HOT = tuple(ATOM_GROUPS[g].start for g in
                      ("element", "degree", "formal_charge", "num_hs", "hybridisation"))
_ATOM_FLAGS = (ATOM_GROUPS["aromatic"].start, ATOM_GROUPS["in_ring"].start)
_BOND_FLAGS = (BOND_GROUPS["conjugated"].start, BOND_GROUPS["in_ring"].start)
_ELEMENT_INDEX = {symbol: i for i, symbol in enumerate(ELEMENTS)}
_HYBRIDISATION_INDEX = {name: i for i, name in enumerate(_HYBRIDISATIONS)}
_BOND_TYPE_INDEX = {name: i for i, name in enumerate(_BOND_TYPES)}
_NO_COLUMN = -1  # a bond type with no column


class ChemError(MpdslError):
    """RDKit or its bundled data is not available."""


def _rdkit() -> Any:
    """The ``rdkit`` package, with ``Chem`` and ``RDConfig`` loaded, or a ChemError."""
    try:
        import rdkit
        from rdkit import Chem, RDConfig, rdBase  # noqa: F401  (loads the submodules)
    except ImportError:
        raise ChemError("mpdsl.chem needs RDKit, which is not installed",
                        hint=INSTALL_HINT) from None
    return rdkit


# ---------------------------------------------------------------------------------------------
# Encoding

def _read_smiles(smiles: str) -> tuple[Any, str | None]:
    """(the sanitised RDKit molecule, None), or (None, why RDKit refuses ``smiles``)."""
    rdkit = _rdkit()
    Chem = rdkit.Chem
    with rdkit.rdBase.BlockLogs():
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            raw = Chem.MolFromSmiles(smiles, sanitize=False)
            if raw is None:
                return None, "RDKit cannot parse it"
            try:
                Chem.SanitizeMol(raw)
            except Exception as exc:  # RDKit's sanitisation exceptions share no base class
                return None, f"RDKit cannot sanitise it: {exc}"
            return None, "RDKit refuses it"
    if mol.GetNumAtoms() == 0:
        return None, "it has no atoms"
    return mol, None


def _parse(smiles: Any, index: int | None = None) -> Any:
    """The sanitised RDKit molecule of ``smiles`` (hydrogens implicit), or a GraphError naming
    the string and, where RDKit says, why it was refused."""
    what = "SMILES" if index is None else f"SMILES {index}"
    if not isinstance(smiles, str):
        raise GraphError(f"{what} must be a string, got {type(smiles).__name__} {smiles!r}")
    mol, reason = _read_smiles(smiles)
    if mol is None:
        where = "" if index is None else f" (item {index} of the list)"
        raise GraphError(f"SMILES {smiles!r}{where} is not a valid molecule: {reason}",
                         hint="check the SMILES string, e.g. with RDKit's Chem.MolFromSmiles")
    return mol


def _encode(mol: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(atom codes int64 [n, 7], edge_index int64 [2, 2b], bond codes int64 [2b, 3]) of a
    molecule: per atom the index within each one-hot group then the two flags; per directed
    edge the bond-type index (or _NO_COLUMN) then the two flags."""
    other_element = len(ELEMENTS)
    other_hybridisation = len(_HYBRIDISATIONS)
    atoms = [
        (_ELEMENT_INDEX.get(atom.GetSymbol(), other_element),
         min(atom.GetDegree(), 5),
         min(max(atom.GetFormalCharge(), -2), 2) + 2,
         min(atom.GetTotalNumHs(), 4),
         _HYBRIDISATION_INDEX.get(str(atom.GetHybridization()), other_hybridisation),
         int(atom.GetIsAromatic()),
         int(atom.IsInRing()))
        for atom in mol.GetAtoms()
    ]
    src: list[int] = []
    dst: list[int] = []
    bonds: list[tuple[int, int, int]] = []
    for bond in mol.GetBonds():
        i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        code = (_BOND_TYPE_INDEX.get(str(bond.GetBondType()), _NO_COLUMN),
                int(bond.GetIsConjugated()), int(bond.IsInRing()))
        src += [i, j]
        dst += [j, i]
        bonds += [code, code]
    atom_codes = np.array(atoms, dtype=np.int64).reshape(len(atoms), 7)
    edge_index = np.array([src, dst], dtype=np.int64).reshape(2, len(src))
    bond_codes = np.array(bonds, dtype=np.int64).reshape(len(bonds), 3)
    order = np.lexsort((edge_index[1], edge_index[0]))  # by source, then destination
    return atom_codes, edge_index[:, order], bond_codes[order]


def _atom_matrix(codes: np.ndarray) -> np.ndarray:
    x = np.zeros((codes.shape[0], ATOM_DIM), dtype=np.float32)
    rows = np.arange(codes.shape[0])
    for column, offset in enumerate(_ATOM_ONE_HOT):
        x[rows, offset + codes[:, column]] = 1.0
    for column, offset in enumerate(_ATOM_FLAGS, start=len(_ATOM_ONE_HOT)):
        x[:, offset] = codes[:, column]
    return x


def _bond_matrix(codes: np.ndarray) -> np.ndarray:
    edge_attr = np.zeros((codes.shape[0], BOND_DIM), dtype=np.float32)
    typed = codes[:, 0] != _NO_COLUMN
    edge_attr[np.flatnonzero(typed), BOND_GROUPS["bond_type"].start + codes[typed, 0]] = 1.0
    for column, offset in enumerate(_BOND_FLAGS, start=1):
        edge_attr[:, offset] = codes[:, column]
    return edge_attr


def _assemble(encoded: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
              batched: bool) -> Graph:
    """One graph from encoded molecules: their disjoint union, with a ``batch`` vector when
    ``batched`` (the same graph ``Graph.batch`` gives for the molecules one by one)."""
    sizes = np.array([atoms.shape[0] for atoms, _, _ in encoded], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    atom_codes = np.concatenate([atoms for atoms, _, _ in encoded])
    edge_index = np.concatenate([edges + offset for (_, edges, _), offset
                                 in zip(encoded, offsets)], axis=1)
    bond_codes = np.concatenate([bonds for _, _, bonds in encoded])
    node_data = {"x": _atom_matrix(atom_codes)}
    if batched:
        node_data["batch"] = np.repeat(np.arange(len(encoded), dtype=np.int64), sizes)
    return Graph(edge_index, int(sizes.sum()), node_data=node_data,
                 edge_data={"edge_attr": _bond_matrix(bond_codes)})


def from_smiles(smiles: str) -> Graph:
    """The molecule ``smiles`` as a graph with ``x`` [N, ATOM_DIM] and ``edge_attr``
    [E, BOND_DIM] (float32; layouts in the module doc), two directed edges per bond.

    An unparsable or chemically invalid SMILES (or one with no atoms) raises a ``GraphError``
    naming the string."""
    return _assemble([_encode(_parse(smiles))], batched=False)


def molecules(smiles_list: Iterable[str]) -> Graph:
    """The molecules of ``smiles_list`` batched into one graph, as ``Graph.batch`` of their
    ``from_smiles`` graphs: graph g is the g-th SMILES, ``batch`` gives each atom's molecule.
    The first invalid SMILES raises a ``GraphError`` naming it and its position."""
    smiles_list = [smiles_list] if isinstance(smiles_list, str) else list(smiles_list)
    if not smiles_list:
        raise GraphError("molecules needs at least one SMILES string")
    encoded: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for index, smiles in enumerate(smiles_list):
        encoded.append(_encode(_parse(smiles, index)))
    return _assemble(encoded, batched=True)


# ---------------------------------------------------------------------------------------------
# The TPSA data set

class MoleculeDataset(tuple):
    """``(graph, y)``: unpacks as a pair. Also keeps ``smiles`` (one string per graph, in graph
    order), ``skipped`` (``(line number, SMILES, reason)`` for every data row that was not
    loaded) and ``source`` (the file read)."""

    smiles: tuple[str, ...]
    skipped: tuple[tuple[int, str, str], ...]
    source: str

    def __new__(cls, graph: Graph, y: np.ndarray, smiles: Sequence[str],
                skipped: Sequence[tuple[int, str, str]], source: str) -> MoleculeDataset:
        self = super().__new__(cls, (graph, y))
        self.smiles = tuple(smiles)
        self.skipped = tuple(skipped)
        self.source = source
        return self

    @property
    def graph(self) -> Graph:
        return self[0]

    @property
    def y(self) -> np.ndarray:
        return self[1]

    def __repr__(self) -> str:
        return (f"MoleculeDataset({len(self.smiles)} molecules, {len(self.skipped)} rows skipped, "
                f"graph={self.graph!r})")


def tpsa_path() -> str:
    """The path of RDKit's bundled ``Data/NCI/first_5k.tpsa.csv`` (SMILES, TPSA in square
    angstroms, computed by Ertl's method with Daylight tools)."""
    rdkit = _rdkit()
    path = os.path.join(rdkit.RDConfig.RDDataDir, "NCI", "first_5k.tpsa.csv")
    if not os.path.isfile(path):
        raise ChemError(f"RDKit's TPSA data file is missing (looked for {path})",
                        hint=f"reinstall RDKit with its data files: {INSTALL_HINT}")
    return path


def tpsa_dataset(limit: int | None = None) -> MoleculeDataset:
    """The TPSA regression set: ``(graph, y)`` with one molecule per graph of the batched
    ``graph`` and ``y`` float32 [G] its topological polar surface area.

    Reads RDKit's bundled CSV (no download) in file order, skipping comment lines (``#``) and
    blank lines. Rows whose SMILES RDKit refuses or whose target is not a finite number are
    skipped and recorded in ``.skipped`` (with RDKit 2026.9, 8 of the file's 4999 rows:
    hypervalent or organometallic SMILES, leaving 4991 molecules). ``limit`` keeps the first
    ``limit`` molecules that load. Deterministic."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    path = tpsa_path()
    encoded: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    targets: list[float] = []
    smiles_kept: list[str] = []
    skipped: list[tuple[int, str, str]] = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if limit is not None and len(encoded) == limit:
                break
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            smiles, sep, value = line.rpartition(",")
            if not sep:
                skipped.append((line_number, line, "no comma-separated target"))
                continue
            try:
                target = float(value)
            except ValueError:
                target = math.nan
            if not math.isfinite(target):
                skipped.append((line_number, smiles, f"target {value!r} is not a finite number"))
                continue
            mol, reason = _read_smiles(smiles)
            if mol is None:
                assert reason is not None  # _read_smiles gives a reason whenever it gives no molecule
                skipped.append((line_number, smiles, reason))
                continue
            encoded.append(_encode(mol))
            targets.append(target)
            smiles_kept.append(smiles)
    if not encoded:
        raise ChemError(f"no molecule could be read from {path}")
    return MoleculeDataset(_assemble(encoded, batched=True), np.array(targets, dtype=np.float32),
                           smiles_kept, skipped, path)


def split(n: int, fractions: Sequence[float] = (0.8, 0.1, 0.1),
          seed: int = 0) -> tuple[np.ndarray, ...]:
    """Fixed index arrays splitting ``range(n)`` into ``len(fractions)`` disjoint parts that
    cover it: a seeded permutation cut at ``round(n * cumsum(fractions))``, each part sorted
    (int64). The same ``n``, ``fractions`` and ``seed`` always give the same split."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    shares = np.asarray(fractions, dtype=np.float64)
    if shares.ndim != 1 or shares.size == 0 or not np.all(np.isfinite(shares)) \
            or np.any(shares < 0) or not math.isclose(shares.sum(), 1.0, abs_tol=1e-9):
        raise ValueError(f"fractions must be non-negative and sum to 1, got {shares.tolist()}")
    order = np.random.default_rng(seed).permutation(int(n))
    cuts = np.rint(np.cumsum(shares)[:-1] * n).astype(np.int64)
    return tuple(np.sort(part).astype(np.int64) for part in np.split(order, cuts))


# ---------------------------------------------------------------------------------------------
# Command line

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mpdsl.chem",
        description="Write molecules as a batched mpdsl graph (.npz) for `mpdsl run`.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    tpsa = sub.add_parser("tpsa", help="RDKit's bundled TPSA set, targets as graph_y")
    tpsa.add_argument("--out", required=True, help="the .npz file to write")
    tpsa.add_argument("--limit", type=int, help="keep the first N molecules")
    smiles = sub.add_parser("smiles", help="the given SMILES strings, one graph each")
    smiles.add_argument("smiles", nargs="+", help="SMILES strings")
    smiles.add_argument("--out", required=True, help="the .npz file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes as ``mpdsl``'s: 0 ok, 1 user error, 2 bad usage."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0) and 2
    start = time.perf_counter()
    try:
        if args.command == "tpsa":
            if args.limit is not None and args.limit < 1:
                print("python -m mpdsl.chem: error: --limit must be at least 1", file=sys.stderr)
                return 2
            data = tpsa_dataset(limit=args.limit)
            graph = data.graph.with_data(graph_y=data.y)
            note = f" ({len(data.skipped)} rows skipped)"
        else:
            graph = molecules(args.smiles)
            note = ""
        graph.save(args.out)
    except (MpdslError, OSError) as err:
        print(err.render() if isinstance(err, MpdslError) else f"error: {err}", file=sys.stderr)
        return 1
    print(f"[mpdsl.chem] wrote {args.out}: {graph.num_graphs} molecules{note}, "
          f"{graph.num_nodes} atoms, {graph.num_edges} directed bonds, "
          f"{'; '.join(f'{k} {list(graph[k].shape)}' for k in graph.keys())} "  # noqa: SIM118
          f"in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
