"""Regenerate the bundled example graphs ``karate.npz`` and ``lesmis.npz`` in this folder.

Usage: ``python examples/data/make_graphs.py``. Needs networkx and torch_geometric (no network
access: PyG ships the karate club labels inside the package). The output depends only on
the inputs, so re-running reproduces the files byte for byte.

* ``karate.npz``: Zachary's karate club (``nx.karate_club_graph()``), 34 nodes, both directions
  of each of the 78 edges (156), sorted by (source, destination), which is exactly the
  ``edge_index`` of PyG's ``KarateClub``. ``x`` is the float32 identity [34, 34] and ``y`` the
  int64 four-community labels (0..3) of PyG's ``KarateClub``, not networkx's two-way ``club``
  split.
* ``lesmis.npz``: the Les Miserables co-occurrence graph (``nx.les_miserables_graph()``),
  77 nodes in networkx's node order, both directions of each of the 254 edges (508) in PyG's
  ``from_networkx`` order, ``edge_weight`` the float32 co-occurrence counts and ``x`` float32
  [77, 16] standard normal features from ``np.random.default_rng(0)``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import networkx as nx
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, for running without installing

from mpdsl.graph import Graph  # noqa: E402

LESMIS_FEATURES = 16
LESMIS_SEED = 0


def karate_club() -> Graph:
    """The karate club with PyG's features and community labels."""
    from torch_geometric.datasets import KarateClub

    reference = KarateClub()[0]
    undirected = Graph.from_networkx(nx.karate_club_graph(), exclude=["club", "name"])
    order = np.lexsort((undirected.dst, undirected.src))
    edge_index = undirected.edge_index[:, order]
    if not np.array_equal(edge_index, reference.edge_index.numpy()):
        raise SystemExit("networkx and torch_geometric disagree on the karate club's edges")
    num_nodes = undirected.num_nodes
    return Graph.from_arrays(
        edge_index,
        num_nodes,
        x=np.eye(num_nodes, dtype=np.float32),
        y=reference.y.numpy().astype(np.int64),
    )


def les_miserables() -> Graph:
    """Les Miserables with co-occurrence weights and seeded random features."""
    weighted = Graph.from_networkx(nx.les_miserables_graph())
    rng = np.random.default_rng(LESMIS_SEED)
    features = rng.standard_normal((weighted.num_nodes, LESMIS_FEATURES), dtype=np.float32)
    return Graph.from_arrays(
        weighted.edge_index,
        weighted.num_nodes,
        x=features,
        edge_weight=weighted["edge_weight"].astype(np.float32),
    )


def main() -> None:
    for name, graph in (("karate", karate_club()), ("lesmis", les_miserables())):
        path = HERE / f"{name}.npz"
        graph.save(path)
        print(f"wrote {path.name}: {graph}")


if __name__ == "__main__":
    main()
