"""mpdsl.chem: SMILES to graphs (feature layouts on known molecules), batching, RDKit's TPSA set,
the fixed split, ``python -m mpdsl.chem`` and a model run over a batch of molecules."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdkit")

import mpdsl  # noqa: E402
from mpdsl import chem  # noqa: E402
from mpdsl.cli import main as mpdsl_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TPSA_MOLECULES = 4991  # RDKit's first_5k.tpsa.csv: 4999 data rows, 8 refused by RDKit
TPSA_SKIPPED = 8

MOLECULE_MODEL = """
dim H = 16
# A GIN-like update on atoms and bonds, sum-pooled per molecule, then a linear head.
model mol_gin(x: node[F], edge_attr: edge[Fe], W_in: param[F, H], b_in: param[H], W_e: param[Fe, H],
              eps: param[] = 0.0, W1: param[H, H], b1: param[H], W2: param[H, H], b2: param[H],
              W_out: param[H, 1], b_out: param[1]) -> graph[1] {
    h0 = relu(x @ W_in + b_in)
    m = relu(h0[src] + edge_attr @ W_e)
    h1 = relu(mlp2((1 + eps) * h0 + sum(m) by dst, W1, b1, W2, b2))
    return (sum(h1) by graph) @ W_out + b_out
}
"""


def columns(row: np.ndarray) -> list[str]:
    return [chem.ATOM_FEATURES[i] for i in np.flatnonzero(row)]


def column(name: str) -> int:
    return chem.ATOM_FEATURES.index(name)


def bond_column(name: str) -> int:
    return chem.BOND_FEATURES.index(name)


@pytest.fixture(scope="module")
def tpsa():
    return chem.tpsa_dataset()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "mol_gin.mp"
    path.write_text(MOLECULE_MODEL)
    return path


# ---- feature layouts -----------------------------------------------------------------------

def test_layouts_are_fixed_and_named():
    assert chem.ATOM_DIM == len(chem.ATOM_FEATURES) == 35
    assert chem.BOND_DIM == len(chem.BOND_FEATURES) == 6
    for names, groups in ((chem.ATOM_FEATURES, chem.ATOM_GROUPS),
                          (chem.BOND_FEATURES, chem.BOND_GROUPS)):
        assert len(set(names)) == len(names)
        covered = [i for s in groups.values() for i in range(s.start, s.stop)]
        assert covered == list(range(len(names))), "groups are contiguous and cover every column"
        for group, s in groups.items():
            assert all(n.split("=")[0] == group for n in names[s])
    assert chem.ATOM_FEATURES[:11] == tuple(f"element={e}" for e in
                                            ("H", "C", "N", "O", "F", "P", "S", "Cl", "Br", "I",
                                             "other"))
    assert chem.BOND_FEATURES == ("bond_type=single", "bond_type=double", "bond_type=triple",
                                  "bond_type=aromatic", "conjugated", "in_ring")


def test_ethanol():
    g = chem.from_smiles("CCO")
    assert (g.num_nodes, g.num_edges, g.num_graphs) == (3, 4, 1)
    assert g["x"].dtype == np.float32 and g["x"].shape == (3, chem.ATOM_DIM)
    assert g["edge_attr"].dtype == np.float32 and g["edge_attr"].shape == (4, chem.BOND_DIM)
    assert "batch" not in g
    np.testing.assert_array_equal(g.edge_index, [[0, 1, 1, 2], [1, 0, 2, 1]])
    assert columns(g["x"][0]) == ["element=C", "degree=1", "formal_charge=0", "num_hs=3",
                                  "hybridisation=SP3"]
    assert columns(g["x"][1]) == ["element=C", "degree=2", "formal_charge=0", "num_hs=2",
                                  "hybridisation=SP3"]
    assert columns(g["x"][2]) == ["element=O", "degree=1", "formal_charge=0", "num_hs=1",
                                  "hybridisation=SP3"]
    np.testing.assert_array_equal(g["edge_attr"], [[1, 0, 0, 0, 0, 0]] * 4)


@pytest.mark.parametrize("smiles", ["CCO", "c1ccccc1O", "CC(=O)[O-].[Na+]", "C#N", "C1CC1C=C",
                                    "OC(=O)c1ccccc1N"])
def test_one_hot_groups_and_both_directions(smiles):
    g = chem.from_smiles(smiles)
    x, e = g["x"], g["edge_attr"]
    assert set(np.unique(x)) <= {0.0, 1.0} and set(np.unique(e)) <= {0.0, 1.0}
    for group in ("element", "degree", "formal_charge", "num_hs", "hybridisation"):
        np.testing.assert_array_equal(x[:, chem.ATOM_GROUPS[group]].sum(1), 1, err_msg=group)
    # every bond of these molecules has a type column; edges come sorted by (source, dest)
    np.testing.assert_array_equal(e[:, chem.BOND_GROUPS["bond_type"]].sum(1), 1)
    keys = g.src * g.num_nodes + g.dst
    assert np.all(np.diff(keys) > 0)
    edges = {(int(s), int(d)): i for i, (s, d) in enumerate(g.edge_index.T)}
    assert len(edges) == g.num_edges and g.num_edges % 2 == 0
    for (s, d), i in edges.items():
        assert s != d
        np.testing.assert_array_equal(e[i], e[edges[(d, s)]])
    # degree column agrees with the graph's own in-degree
    degree = np.argmax(x[:, chem.ATOM_GROUPS["degree"]], axis=1)
    np.testing.assert_array_equal(degree, np.minimum(g.in_degree(), 5))


def test_benzene_is_aromatic():
    g = chem.from_smiles("c1ccccc1")
    assert (g.num_nodes, g.num_edges) == (6, 12)
    x = g["x"]
    assert np.all(x[:, column("aromatic")] == 1) and np.all(x[:, column("in_ring")] == 1)
    assert np.all(x[:, column("hybridisation=SP2")] == 1) and np.all(x[:, column("num_hs=1")] == 1)
    for name in ("bond_type=aromatic", "conjugated", "in_ring"):
        assert np.all(g["edge_attr"][:, bond_column(name)] == 1), name
    cyclohexane = chem.from_smiles("C1CCCCC1")["x"]
    assert np.all(cyclohexane[:, column("aromatic")] == 0)
    assert np.all(cyclohexane[:, column("in_ring")] == 1)
    ethane = chem.from_smiles("CC")
    assert np.all(ethane["x"][:, column("in_ring")] == 0)
    assert np.all(ethane["edge_attr"][:, bond_column("in_ring")] == 0)


def test_bond_types_and_hybridisation():
    g = chem.from_smiles("C=CC#N")
    e = g["edge_attr"]
    kinds = {(int(s), int(d)): chem.BOND_FEATURES[int(np.argmax(row[:4]))]
             for (s, d), row in zip(g.edge_index.T, e)}
    assert kinds[(0, 1)] == kinds[(1, 0)] == "bond_type=double"
    assert kinds[(1, 2)] == "bond_type=single"
    assert kinds[(2, 3)] == "bond_type=triple"
    assert np.all(e[:, bond_column("conjugated")] == 1)
    assert columns(g["x"][3])[4] == "hybridisation=SP"
    assert columns(g["x"][0])[4] == "hybridisation=SP2"


def test_charged_atoms():
    x = chem.from_smiles("C[N+](C)(C)C")["x"]
    assert columns(x[1]) == ["element=N", "degree=4", "formal_charge=+1", "num_hs=0",
                             "hybridisation=SP3"]
    x = chem.from_smiles("CC(=O)[O-]")["x"]
    assert x[3, column("formal_charge=-1")] == 1 and x[3, column("element=O")] == 1
    x = chem.from_smiles("[O-2]")["x"]
    assert x[0, column("formal_charge=-2-")] == 1
    x = chem.from_smiles("[Fe+3]")["x"]
    assert x[0, column("formal_charge=+2+")] == 1 and x[0, column("element=other")] == 1


def test_single_atom_has_no_edges():
    g = chem.from_smiles("[Na+]")
    assert (g.num_nodes, g.num_edges) == (1, 0)
    assert g["edge_attr"].shape == (0, chem.BOND_DIM) and g.edge_index.shape == (2, 0)
    assert columns(g["x"][0]) == ["element=other", "degree=0", "formal_charge=+1", "num_hs=0",
                                  "hybridisation=other"]
    methane = chem.from_smiles("C")
    assert methane.num_edges == 0 and methane["x"][0, column("num_hs=4+")] == 1


def test_hydrogens_kept_as_atoms_count_as_element_h():
    g = chem.from_smiles("[H][H]")
    assert (g.num_nodes, g.num_edges) == (2, 2)
    assert np.all(g["x"][:, column("element=H")] == 1)


def test_matches_pyg_from_smiles_structure():
    utils = pytest.importorskip("torch_geometric.utils")
    for smiles in ("CCO", "c1ccccc1O", "CC(=O)[O-].[Na+]", "OC(=O)c1ccccc1N", "[Na+]"):
        ours, theirs = chem.from_smiles(smiles), utils.from_smiles(smiles)
        assert ours.num_nodes == theirs.num_nodes
        np.testing.assert_array_equal(ours.edge_index, theirs.edge_index.numpy())
        # PyG's integer features: column 0 atomic number, column 4 formal charge (+5 offset)
        elements = [chem.ATOM_FEATURES[i] for i in np.argmax(ours["x"][:, :11], axis=1)]
        symbols = {1: "H", 6: "C", 7: "N", 8: "O", 11: "other"}
        assert elements == [f"element={symbols[int(z)]}" for z in theirs.x[:, 0]]


@pytest.mark.parametrize("smiles, reason", [
    ("C1CC", "RDKit cannot parse it"),
    ("not a molecule", "RDKit cannot parse it"),
    ("CO(C)C", "Explicit valence"),
    ("", "it has no atoms"),
])
def test_invalid_smiles_names_the_string(smiles, reason):
    with pytest.raises(mpdsl.GraphError) as info:
        chem.from_smiles(smiles)
    assert repr(smiles) in info.value.message and reason in info.value.message
    with pytest.raises(mpdsl.GraphError, match="must be a string"):
        chem.from_smiles(None)


# ---- batching ------------------------------------------------------------------------------

def test_molecules_batches_like_graph_batch():
    smiles = ["CCO", "[Na+]", "c1ccccc1", "CC(=O)[O-]"]
    g = chem.molecules(smiles)
    ref = mpdsl.Graph.batch([chem.from_smiles(s) for s in smiles])
    assert g.num_graphs == 4 and g.num_nodes == 3 + 1 + 6 + 4
    np.testing.assert_array_equal(g.batch, [0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3])
    np.testing.assert_array_equal(g.edge_index, ref.edge_index)
    for name in ("x", "edge_attr", "batch"):
        np.testing.assert_array_equal(g[name], ref[name], err_msg=name)
    assert chem.molecules(iter(["C"])).num_graphs == 1
    with pytest.raises(mpdsl.GraphError, match=r"'C1CC' \(item 1 of the list\)"):
        chem.molecules(["CC", "C1CC"])
    with pytest.raises(mpdsl.GraphError, match="at least one"):
        chem.molecules([])


# ---- the TPSA set --------------------------------------------------------------------------

def test_tpsa_full_set(tpsa):
    graph, y = tpsa
    assert graph.num_graphs == len(y) == len(tpsa.smiles) == TPSA_MOLECULES
    assert len(tpsa.skipped) == TPSA_SKIPPED
    assert tpsa.source.endswith("first_5k.tpsa.csv")
    for line, smiles, reason in tpsa.skipped:
        assert isinstance(line, int) and line > 1 and smiles and reason
    assert y.dtype == np.float32 and y.shape == (TPSA_MOLECULES,)
    assert np.all(np.isfinite(y)) and y.min() >= 0 and y.max() < 1000
    assert 30 < y.mean() < 90
    assert graph["x"].shape == (graph.num_nodes, chem.ATOM_DIM)
    assert graph["edge_attr"].shape == (graph.num_edges, chem.BOND_DIM)
    assert np.all(np.bincount(graph.batch, minlength=graph.num_graphs) > 0)
    # the first data row of the file
    assert tpsa.smiles[0] == "CC1=CC(=O)C=CC1=O" and y[0] == np.float32(34.14)


def test_tpsa_limit_is_a_deterministic_prefix(tpsa):
    a, b = chem.tpsa_dataset(limit=50), chem.tpsa_dataset(limit=50)
    assert a.graph.num_graphs == 50 and a.smiles == tpsa.smiles[:50]
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.y, tpsa.y[:50])
    nodes = int(np.sum(tpsa.graph.batch < 50))
    np.testing.assert_array_equal(a.graph["x"], tpsa.graph["x"][:nodes])
    np.testing.assert_array_equal(a.graph.edge_index, b.graph.edge_index)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="limit"):
            chem.tpsa_dataset(limit=bad)


def test_split_is_disjoint_covering_and_fixed():
    train, val, test = chem.split(TPSA_MOLECULES)
    assert (len(train), len(val), len(test)) == (3993, 499, 499)
    joined = np.concatenate([train, val, test])
    np.testing.assert_array_equal(np.sort(joined), np.arange(TPSA_MOLECULES))
    for part in (train, val, test):
        assert part.dtype == np.int64 and np.all(np.diff(part) > 0)
    for again, first in zip(chem.split(TPSA_MOLECULES), (train, val, test)):
        np.testing.assert_array_equal(again, first)
    assert not np.array_equal(chem.split(TPSA_MOLECULES, seed=1)[2], test)
    parts = chem.split(10, fractions=(0.5, 0.5))
    assert len(parts) == 2 and sorted(np.concatenate(parts).tolist()) == list(range(10))
    assert [len(p) for p in chem.split(0)] == [0, 0, 0]
    for fractions in ((0.5, 0.4), (1.2, -0.2), ()):
        with pytest.raises(ValueError, match="fractions"):
            chem.split(10, fractions=fractions)
    with pytest.raises(ValueError, match="n must"):
        chem.split(-1)


# ---- command line and models ---------------------------------------------------------------

def test_module_command_writes_a_graph_mpdsl_can_load(tmp_path):
    out = tmp_path / "tpsa.npz"
    result = subprocess.run([sys.executable, "-m", "mpdsl.chem", "tpsa", "--out", str(out),
                             "--limit", "50"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "50 molecules" in result.stderr
    graph = mpdsl.Graph.load(out)
    reference = chem.tpsa_dataset(limit=50)
    assert graph.num_graphs == 50 and "graph_y" in graph.graph_data
    np.testing.assert_array_equal(graph["graph_y"], reference.y)
    np.testing.assert_array_equal(graph["x"], reference.graph["x"])
    np.testing.assert_array_equal(graph["edge_attr"], reference.graph["edge_attr"])
    np.testing.assert_array_equal(graph.batch, reference.graph.batch)


def test_module_command_errors(tmp_path, capsys):
    assert chem.main(["smiles", "CCO", "C1CC", "--out", str(tmp_path / "m.npz")]) == 1
    assert "'C1CC'" in capsys.readouterr().err
    assert chem.main(["tpsa"]) == 2
    assert chem.main(["tpsa", "--out", str(tmp_path / "t.npz"), "--limit", "0"]) == 2
    assert chem.main(["smiles", "CCO", "[Na+]", "--out", str(tmp_path / "m.npz")]) == 0
    assert mpdsl.Graph.load(tmp_path / "m.npz").num_graphs == 2


def test_model_gives_one_row_per_molecule(model_file):
    data = chem.tpsa_dataset(limit=50)
    model = mpdsl.compile(model_file, seed=0)
    out = model(data.graph)
    assert out.shape == (50, 1) and out.dtype == np.float32 and np.all(np.isfinite(out))
    # batching does not mix molecules: each row is that molecule run on its own
    for index in (0, 17, 49):
        alone = model(chem.from_smiles(data.smiles[index]))
        np.testing.assert_allclose(alone[0], out[index], rtol=1e-5, atol=1e-5)
    assert len(data.graph.unbatch_graphs(out)) == 50


def test_mpdsl_run_on_the_written_graph(tmp_path, model_file, capsys):
    path = tmp_path / "tpsa.npz"
    assert chem.main(["tpsa", "--out", str(path), "--limit", "20"]) == 0
    out = tmp_path / "out.npz"
    assert mpdsl_main(["run", str(model_file), "--graph", str(path), "--out", str(out)]) == 0
    assert np.load(out)["out"].shape == (20, 1)


def test_example_script(model_file):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "tpsa.py"), str(model_file),
                             "--limit", "50"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "output [50, 1] float32" in result.stdout
    assert "MAE" in result.stdout and "untrained" in result.stdout


# ---- missing dependency / data -------------------------------------------------------------

def test_missing_rdkit_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "rdkit", None)
    with pytest.raises(mpdsl.MpdslError) as info:
        chem.from_smiles("CCO")
    assert isinstance(info.value, chem.ChemError)
    assert "RDKit" in info.value.message and 'pip install "mpdsl[chem]"' in info.value.render()


def test_missing_data_file_is_a_clear_error(monkeypatch, tmp_path):
    from rdkit import RDConfig

    monkeypatch.setattr(RDConfig, "RDDataDir", str(tmp_path))
    with pytest.raises(chem.ChemError, match="first_5k.tpsa.csv"):
        chem.tpsa_dataset(limit=1)
