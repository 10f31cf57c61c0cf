"""Held-out edge splits for link prediction, and the ROC AUC of scored pairs.

``split_edges`` follows PyG's ``RandomLinkSplit(is_undirected=True)``: the undirected edges of a
graph (each stored in both directions) are shuffled with a seed and split into training,
validation and test pairs; the training graph keeps only the training edges (both directions) and any self loops,
so held-out edges never carry messages. Each split's supervision pairs are its positive pairs
followed by as many negative pairs per positive as asked for: node pairs ``u != v`` that are
not edges of the whole graph, drawn uniformly without repeats, disjoint across the splits.

Every pair array is int64 ``[2, P]`` (row 0 and row 1 the two endpoints), with float labels
(1 for an edge, 0 for a negative) in the same order.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .diagnostics import GraphError
from .graph import Graph

__all__ = ["LinkSplit", "roc_auc", "sample_negatives", "split_edges"]

_DRAW_ROUNDS = 64
"""Rounds of vectorised negative draws before a graph is judged too dense for the count asked."""


@dataclass(frozen=True)
class LinkSplit:
    """A graph's edges split for link prediction (see the module doc)."""

    train_graph: Graph
    train_pairs: np.ndarray
    train_labels: np.ndarray
    val_pairs: np.ndarray
    val_labels: np.ndarray
    test_pairs: np.ndarray
    test_labels: np.ndarray


def _fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise GraphError(f"{name} must be a fraction in [0, 1), got {value!r}")
    return float(value)


def _undirected_pairs(graph: Graph) -> np.ndarray:
    """The graph's undirected edges as unique pairs (u < v), refusing a graph that is not symmetric."""
    src, dst = graph.src, graph.dst
    n = graph.num_nodes
    keys = np.unique(src * n + dst)
    if not np.array_equal(keys, np.unique(dst * n + src)):
        raise GraphError("split_edges needs an undirected graph (every edge j -> i also as i -> j)",
                         hint="add the reverse edges first, e.g. with Graph.from_networkx of an undirected graph")
    u, v = keys // n, keys % n
    upper = u < v
    return np.stack([u[upper], v[upper]])


def _draw_negatives(count: int, num_nodes: int, taken: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``count`` distinct pairs ``u < v`` whose keys ``u * num_nodes + v`` are not in sorted ``taken``."""
    found = np.empty(0, dtype=np.int64)
    for _ in range(_DRAW_ROUNDS):
        if found.size >= count:
            break
        need = count - found.size
        u = rng.integers(0, num_nodes, size=2 * need + 16)
        v = rng.integers(0, num_nodes, size=2 * need + 16)
        lo, hi = np.minimum(u, v), np.maximum(u, v)
        keys = lo[lo != hi] * num_nodes + hi[lo != hi]
        keys = keys[~np.isin(keys, taken, assume_unique=False)]
        keys = keys[~np.isin(keys, found)]
        _, first = np.unique(keys, return_index=True)
        found = np.concatenate([found, keys[np.sort(first)][:need]])
    if found.size < count:
        raise GraphError(f"the graph has too few node pairs without an edge for {count} negative pairs",
                         hint="ask for fewer negatives per positive (negatives=)")
    return np.stack([found // num_nodes, found % num_nodes])


def split_edges(graph: Graph, *, val: float = 0.1, test: float = 0.1, negatives: float = 1.0,
                seed: int = 0) -> LinkSplit:
    """Split ``graph``'s undirected edges into training / validation / test pairs (module doc).

    ``val`` and ``test`` are fractions of the undirected edges (rounded down, as PyG); the rest
    trains. ``negatives`` is the number of negative pairs per positive pair of each split. The
    training graph keeps the graph's node arrays; its edge arrays are the kept edges' rows.
    """
    val, test = _fraction("val", val), _fraction("test", test)
    if val + test >= 1:
        raise GraphError(f"val + test must leave edges to train on, got {val} + {test}")
    if isinstance(negatives, bool) or not isinstance(negatives, (int, float)) or negatives < 0:
        raise GraphError(f"negatives must be a number >= 0 of negative pairs per positive, got {negatives!r}")
    pairs = _undirected_pairs(graph)
    if pairs.shape[1] == 0:
        raise GraphError("split_edges needs a graph with at least one edge between two different nodes")
    rng = np.random.default_rng(seed)
    pairs = pairs[:, rng.permutation(pairs.shape[1])]
    n_val, n_test = int(val * pairs.shape[1]), int(test * pairs.shape[1])
    val_pos, test_pos = pairs[:, :n_val], pairs[:, n_val:n_val + n_test]
    train_pos = pairs[:, n_val + n_test:]

    n = graph.num_nodes
    train_keys = np.sort(np.concatenate([train_pos[0] * n + train_pos[1], train_pos[1] * n + train_pos[0]]))
    keep = np.isin(graph.src * n + graph.dst, train_keys) | (graph.src == graph.dst)
    train_graph = Graph(graph.edge_index[:, keep], n, node_data=graph.node_data,
                        edge_data={k: a[keep] for k, a in graph.edge_data.items()},
                        graph_data=graph.graph_data)

    counts = [round(negatives * p.shape[1]) for p in (train_pos, val_pos, test_pos)]
    taken = np.sort(pairs[0] * n + pairs[1])
    drawn = _draw_negatives(sum(counts), n, taken, rng)
    bounds = np.cumsum([0, *counts])
    splits = []
    for positive, (lo, hi) in zip((train_pos, val_pos, test_pos), itertools.pairwise(bounds)):
        negative = drawn[:, lo:hi]
        splits.append(np.concatenate([positive, negative], axis=1))
        splits.append(np.concatenate([np.ones(positive.shape[1]), np.zeros(negative.shape[1])]))
    return LinkSplit(train_graph, *splits)


def sample_negatives(graph: Graph, count: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """``count`` distinct node pairs ``u < v`` (int64 [2, count]) with no edge between them in
    ``graph`` (either direction): fresh negatives for a training epoch, as PyG's
    ``negative_sampling``, drawn uniformly without repeats."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise GraphError(f"count must be an integer >= 0 of negative pairs, got {count!r}")
    n = graph.num_nodes
    lo, hi = np.minimum(graph.src, graph.dst), np.maximum(graph.src, graph.dst)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return _draw_negatives(int(count), n, np.unique(lo * n + hi), rng)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The area under the ROC curve: the chance that a positive outscores a negative (ties count half)."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"roc_auc: {scores.size} scores for {labels.size} labels")
    if not np.isfinite(scores).all():
        raise ValueError("roc_auc: the scores hold NaN or infinite values")
    positive = labels == 1
    n_pos, n_neg = int(positive.sum()), int((labels == 0).sum())
    if n_pos + n_neg != labels.size or n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs labels of 0 and 1 only, with at least one of each")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
