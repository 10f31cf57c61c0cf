"""Edge splits for link prediction and the ROC AUC (mpdsl.link_split)."""

from __future__ import annotations

import numpy as np
import pytest

from mpdsl.diagnostics import GraphError
from mpdsl.graph import Graph
from mpdsl.link_split import roc_auc, split_edges


def _keys(pairs: np.ndarray, n: int) -> set[int]:
    lo, hi = np.minimum(pairs[0], pairs[1]), np.maximum(pairs[0], pairs[1])
    return set((lo * n + hi).tolist())


def test_split_of_the_bundled_graph_holds_out_edges_from_message_passing():
    graph = Graph.load("examples/data/lesmis.npz")
    split = split_edges(graph, val=0.1, test=0.2, seed=3)
    n = graph.num_nodes
    edges = _keys(graph.edge_index, n)
    positives = [p[:, labels == 1] for p, labels in ((split.train_pairs, split.train_labels),
                                                      (split.val_pairs, split.val_labels),
                                                      (split.test_pairs, split.test_labels))]
    train, val, test = (_keys(p, n) for p in positives)
    assert (len(val), len(test)) == (25, 50)            # 254 undirected edges, rounded down
    assert train | val | test == edges and not (train & val or train & test or val & test)
    assert _keys(split.train_graph.edge_index, n) == train  # held-out edges carry no messages
    assert split.train_graph.num_edges == 2 * len(train)
    np.testing.assert_array_equal(split.train_graph["x"], graph["x"])
    kept = split.train_graph["edge_weight"]
    assert kept.shape == (split.train_graph.num_edges,)
    negatives = [_keys(p[:, labels == 0], n) for p, labels in ((split.train_pairs, split.train_labels),
                                                              (split.val_pairs, split.val_labels),
                                                              (split.test_pairs, split.test_labels))]
    assert [len(k) for k in negatives] == [len(train), len(val), len(test)]
    drawn = set().union(*negatives)
    assert len(drawn) == sum(len(k) for k in negatives) and not drawn & edges
    assert all(p[0] != p[1] for p in split.test_pairs.T)


def test_the_seed_alone_decides_the_split():
    graph = Graph.load("examples/data/karate.npz")
    a, b, c = (split_edges(graph, seed=s) for s in (1, 1, 2))
    np.testing.assert_array_equal(a.test_pairs, b.test_pairs)
    assert not np.array_equal(a.test_pairs, c.test_pairs)


def test_roc_auc_counts_ordered_pairs_with_ties_as_half():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=40).astype(float)
    labels = rng.integers(0, 2, size=40)
    pos, neg = scores[labels == 1], scores[labels == 0]
    expected = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (pos.size * neg.size)
    assert roc_auc(scores, labels) == pytest.approx(expected, rel=1e-12)
    assert roc_auc([0.1, 0.9], [0, 1]) == 1.0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"val": 1.5}, "val must be a fraction"),
    ({"val": 0.5, "test": 0.5}, "must leave edges to train on"),
    ({"negatives": -1}, "negatives must be a number"),
])
def test_bad_split_arguments(kwargs, message):
    with pytest.raises(GraphError, match=message):
        split_edges(Graph.load("examples/data/karate.npz"), **kwargs)


def test_graphs_that_cannot_be_split():
    with pytest.raises(GraphError, match="undirected"):
        split_edges(Graph(np.array([[0], [1]]), 3))
    with pytest.raises(GraphError, match="at least one edge"):
        split_edges(Graph(np.zeros((2, 0), dtype=np.int64), 3))
    complete = np.array([[i, j] for i in range(4) for j in range(4) if i != j]).T
    with pytest.raises(GraphError, match="too few node pairs"):
        split_edges(Graph(complete, 4), val=0.0, test=0.0)


def test_bad_auc_inputs():
    with pytest.raises(ValueError, match="at least one of each"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([np.nan, 0.2], [0, 1])
