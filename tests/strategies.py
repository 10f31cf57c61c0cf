"""Hypothesis strategies for mpdsl graphs, shared by the property-based tests.

* ``graphs(...)`` draws one ``mpdsl.Graph`` with a float64 ``x``. Its edge layout is a drawn
  *shape*: ``uniform`` (random pairs), ``hub`` (one node receives most edges), ``chain``,
  ``star`` (one centre, some nodes left isolated) or ``no-edges``; self loops and parallel
  edges are then added on request of the draw, and the edge order is shuffled. The empty graph
  (0 nodes) is reachable whenever ``min_nodes == 0``.
* ``batched_graphs(...)`` draws several such graphs (same feature width) and joins them with
  ``mpdsl.Graph.batch``; single-node and edge-less members are drawn on purpose.

Importing this module registers and loads the hypothesis profile ``mpdsl`` (``mpdsl-ci``,
derandomized, when the environment variable ``CI`` is set) unless ``HYPOTHESIS_PROFILE``
names another registered profile.

Random structure is drawn from a NumPy generator seeded by a hypothesis-drawn integer: cheap to
generate, reproducible, and the sizes (which matter most for shrinking) are drawn directly.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import mpdsl

__all__ = ["SHAPES", "FEATURE_KINDS", "graphs", "batched_graphs", "edge_list", "node_features"]

# ---- settings ---------------------------------------------------------------------------------

_COMMON = dict(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("mpdsl", **_COMMON)
settings.register_profile("mpdsl-ci", derandomize=True, database=None, print_blob=True, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE")
                      or ("mpdsl-ci" if os.environ.get("CI") else "mpdsl"))

# ---- pieces -----------------------------------------------------------------------------------

SHAPES = ("uniform", "hub", "chain", "star", "no-edges")
"""Edge layouts ``graphs`` chooses from."""

FEATURE_KINDS = ("normal", "integers", "constant", "wide")
"""Feature distributions: N(0, 1); small integers (ties for max/min, exact zero spreads);
one value everywhere; N(0, 1) scaled by a drawn power of ten in [1e-3, 1e3]."""


def edge_list(rng: np.random.Generator, shape: str, n: int, budget: int) -> np.ndarray:
    """An int64 [2, E] edge_index on ``n`` nodes with the given layout and at most ``budget``
    edges (``n == 0`` or ``budget == 0`` gives no edges)."""
    if n == 0 or budget == 0 or shape == "no-edges":
        return np.zeros((2, 0), dtype=np.int64)
    if shape == "uniform":
        count = int(rng.integers(0, budget + 1))
        return rng.integers(0, n, size=(2, count)).astype(np.int64)
    if shape == "hub":
        hub = int(rng.integers(0, n))
        count = int(rng.integers(1, budget + 1))
        into_hub = max(1, int(round(count * rng.uniform(0.6, 1.0))))
        src = rng.integers(0, n, size=count)
        dst = np.concatenate([np.full(into_hub, hub), rng.integers(0, n, size=count - into_hub)])
        return np.stack([src, dst]).astype(np.int64)
    if shape == "chain":
        order = rng.permutation(n)
        pairs = np.stack([order[:-1], order[1:]])
        if rng.random() < 0.5:  # both directions
            pairs = np.concatenate([pairs, pairs[::-1]], axis=1)
        return pairs[:, :budget].astype(np.int64)
    if shape == "star":
        centre = int(rng.integers(0, n))
        others = np.array([v for v in range(n) if v != centre], dtype=np.int64)
        leaves = others[rng.random(len(others)) < rng.uniform(0.3, 1.0)]  # the rest stay isolated
        centres = np.full(len(leaves), centre)
        direction = rng.integers(0, 3)  # 0: into the centre, 1: out of it, 2: both
        if direction == 0:
            pairs = np.stack([leaves, centres])
        elif direction == 1:
            pairs = np.stack([centres, leaves])
        else:
            pairs = np.concatenate([np.stack([leaves, centres]), np.stack([centres, leaves])], axis=1)
        return pairs[:, :budget].astype(np.int64).reshape(2, -1)
    raise ValueError(f"unknown graph shape {shape!r}")


def node_features(rng: np.random.Generator, kind: str, n: int, f: int) -> np.ndarray:
    """float64 [n, f] node features of the given kind (see ``FEATURE_KINDS``)."""
    if kind == "normal":
        return rng.standard_normal((n, f))
    if kind == "integers":
        return rng.integers(-3, 4, size=(n, f)).astype(np.float64)
    if kind == "constant":
        return np.full((n, f), float(rng.integers(-3, 4)) + 0.5)
    if kind == "wide":
        return rng.standard_normal((n, f)) * 10.0 ** int(rng.integers(-3, 4))
    raise ValueError(f"unknown feature kind {kind!r}")


def _sized(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@st.composite
def graphs(draw, min_nodes: int = 0, max_nodes: int = 40, max_edges: int = 200,
           features: int | tuple[int, int] = (1, 6), *, min_edges: int = 0,
           shapes: tuple[str, ...] = SHAPES, self_loops: bool = True,
           multi_edges: bool = True) -> mpdsl.Graph:
    """An ``mpdsl.Graph`` with a float64 ``x`` of a drawn width in ``features`` (an int fixes it).

    ``min_edges`` > 0 excludes the ``no-edges`` shape and tops up the edge list with random
    edges; it needs ``max_nodes >= 1``. ``self_loops`` / ``multi_edges`` allow the draw to add
    self loops / parallel copies of existing edges (the layouts themselves may produce either).
    """
    if min_edges > max_edges:
        raise ValueError("min_edges > max_edges")
    min_nodes = max(min_nodes, 1 if min_edges else 0)
    if min_nodes > max_nodes:
        raise ValueError("min_nodes > max_nodes")
    usable = tuple(s for s in shapes if not (min_edges and s == "no-edges"))
    if not usable:
        raise ValueError("no usable graph shape")
    f_lo, f_hi = _sized(features)
    n = draw(st.integers(min_nodes, max_nodes), label="num_nodes")
    shape = draw(st.sampled_from(usable), label="shape")
    f = draw(st.integers(f_lo, f_hi), label="features")
    kind = draw(st.sampled_from(FEATURE_KINDS), label="feature kind")
    add_loops = self_loops and draw(st.booleans(), label="add self loops")
    add_parallel = multi_edges and draw(st.booleans(), label="add parallel edges")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    rng = np.random.default_rng(seed)

    edges = edge_list(rng, shape, n, max_edges)
    extra = []
    if add_loops and n:
        nodes = rng.choice(n, size=int(rng.integers(1, min(n, 5) + 1)), replace=False)
        extra.append(np.stack([nodes, nodes]))
    if add_parallel and edges.shape[1]:
        copies = rng.integers(0, edges.shape[1], size=int(rng.integers(1, min(edges.shape[1], 8) + 1)))
        extra.append(edges[:, copies])
    if extra:
        edges = np.concatenate([edges, *extra], axis=1)
    if edges.shape[1] < min_edges:
        top_up = rng.integers(0, n, size=(2, min_edges - edges.shape[1]))
        edges = np.concatenate([edges, top_up], axis=1)
    edges = edges[:, rng.permutation(edges.shape[1])][:, :max_edges]
    edges = np.ascontiguousarray(edges, dtype=np.int64)
    return mpdsl.Graph.from_arrays(edges, num_nodes=n, x=node_features(rng, kind, n, f))



@st.composite
def batched_graphs(draw, min_graphs: int = 1, max_graphs: int = 5, max_nodes: int = 8,
                   max_edges: int = 20, features: int | tuple[int, int] = (1, 4), *,
                   empty_members: bool = False) -> mpdsl.Graph:
    """Several ``graphs`` (one feature width, each of 1..``max_nodes`` nodes) joined with
    ``mpdsl.Graph.batch``. Single-node and edge-less members are drawn often. With
    ``empty_members``, members with no nodes may appear anywhere but last (a batch vector
    cannot record a trailing empty graph); their graph id then has no nodes."""
    f_lo, f_hi = _sized(features)
    f = draw(st.integers(f_lo, f_hi), label="features")
    count = draw(st.integers(min_graphs, max_graphs), label="num_graphs")
    members = []
    for index in range(count):
        last = index == count - 1
        kind = draw(st.sampled_from(("any", "single", "no-edges", "empty")
                                    if empty_members and not last else ("any", "single", "no-edges")),
                    label="member kind")
        if kind == "single":
            member = draw(graphs(1, 1, 2, f))
        elif kind == "no-edges":
            member = draw(graphs(1, max_nodes, 0, f, shapes=("no-edges",)))
        elif kind == "empty":
            member = draw(graphs(0, 0, 0, f))
        else:
            member = draw(graphs(1, max_nodes, max_edges, f))
        members.append(member)
    return mpdsl.Graph.batch(members)
