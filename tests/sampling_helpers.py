"""Samplers for the training tests, written in a few NumPy lines on top of ``make_batch`` and
``SampleLoader`` (independent of mpdsl's Numba samplers), and the small graphs they run on.

* ``NumpyNeighborLoader``: neighbour sampling with NeighborLoader's signature: per hop, each frontier
  node keeps min(fanout, in-degree) of its in-edges chosen by the batch's random key (-1: all); the
  batch is the seeds, then each hop's new nodes.
* ``block_loader``: Cluster-GCN-like: node ``i`` is in part ``i % parts``; a batch is the induced
  subgraph of its parts' nodes, optionally with a GraphSAINT-like ``node_norm`` array.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

import mpdsl
from mpdsl.graph import Graph
from mpdsl.sampling.batch import MiniBatch, make_batch
from mpdsl.sampling.loader import SampleLoader
from mpdsl.sampling.spec import Sampler

SAGE = str(Path(__file__).resolve().parents[1] / "examples" / "sage_mean.mp")
DIMS = {"C": 3, "H": 8}


def compiled(path: str = SAGE, seed: int = 0):
    """The model at ``path`` (default: 2-layer GraphSAGE) in float64, 3 classes, 8 hidden features."""
    return mpdsl.compile(path, dtype="float64", dims=DIMS, seed=seed)


def _neighbor_batch(graph: Graph, fanouts: list[int], units: np.ndarray, key: int) -> MiniBatch:
    rng = np.random.default_rng(key)
    src, dst = graph.src, graph.dst
    local = np.full(graph.num_nodes, -1, dtype=np.int64)
    local[units] = np.arange(len(units))
    nodes, edges, frontier = [units], [], units
    for fanout in fanouts:
        in_frontier = np.zeros(graph.num_nodes, dtype=bool)
        in_frontier[frontier] = True
        chosen = np.flatnonzero(in_frontier[dst])
        if fanout != -1:
            chosen = chosen[np.lexsort((rng.random(len(chosen)), dst[chosen]))]
            targets = dst[chosen]
            chosen = chosen[np.arange(len(chosen)) - np.searchsorted(targets, targets) < fanout]
        edges.append(chosen)
        reached = src[chosen][local[src[chosen]] < 0]
        _, first = np.unique(reached, return_index=True)
        frontier = reached[np.sort(first)]
        local[frontier] = sum(len(n) for n in nodes) + np.arange(len(frontier))
        nodes.append(frontier)
    n_id, e_id = np.concatenate(nodes), np.concatenate(edges).astype(np.int64)
    return make_batch(graph, n_id, np.stack([local[src[e_id]], local[dst[e_id]]]), e_id, len(units))


class NumpyNeighborLoader(SampleLoader):
    """``mpdsl.sampling.neighbor.NeighborLoader``'s signature and batch layout, in NumPy."""

    def __init__(self, graph, num_neighbors, *, input_nodes=None, batch_size=1, replace=False, shuffle=False,
                 seed=0, drop_last=False, rank=0, world_size=1, **loader_options):
        assert not replace
        seeds = np.arange(graph.num_nodes) if input_nodes is None else np.asarray(input_nodes, dtype=np.int64)
        super().__init__(seeds, batch_size, functools.partial(_neighbor_batch, graph, list(num_neighbors)),
                         shuffle=shuffle, seed=seed, drop_last=drop_last, rank=rank, world_size=world_size,
                         **loader_options)


def neighbor_sampler(fanouts: tuple[int, ...]) -> Sampler:
    """A seeded ``Sampler`` drawing with ``NumpyNeighborLoader``."""
    return Sampler("numpy-neighbor", functools.partial(_build_neighbor, fanouts), seeded=True)


def _build_neighbor(fanouts, graph, seeds, *, batch_size, shuffle, seed, rank, world_size, **options):
    return NumpyNeighborLoader(graph, fanouts, input_nodes=seeds, batch_size=batch_size, shuffle=shuffle, seed=seed,
                               rank=rank, world_size=world_size, **options)


def _block_batch(graph: Graph, parts: int, norm: float | None, units: np.ndarray, key: int) -> MiniBatch:
    n_id = np.flatnonzero(np.isin(np.arange(graph.num_nodes) % parts, units))
    local = np.full(graph.num_nodes, -1, dtype=np.int64)
    local[n_id] = np.arange(len(n_id))
    e_id = np.flatnonzero((local[graph.src] >= 0) & (local[graph.dst] >= 0))
    extra = {} if norm is None else {"node_norm": np.full(len(n_id), norm)}
    return make_batch(graph, n_id, np.stack([local[graph.src[e_id]], local[graph.dst[e_id]]]), e_id, len(n_id),
                      node_extra=extra)


def block_sampler(parts: int, norm: float | None = None, covers: bool = True) -> Sampler:
    """A subgraph ``Sampler``: ``batch_size`` of the ``parts`` node blocks per batch (``norm``: every
    batch node's ``node_norm``)."""
    return Sampler("blocks", functools.partial(_build_blocks, parts, norm), seeded=False, covers=covers, batch_size=1)


def _build_blocks(parts, norm, graph, seeds, *, batch_size, shuffle, seed, rank, world_size, **options):
    return SampleLoader(np.arange(parts), batch_size, functools.partial(_block_batch, graph, parts, norm),
                        shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, **options)


def community_graph(num_nodes: int = 60, classes: int = 3, features: int = 5, seed: int = 0) -> Graph:
    """A random graph whose nodes link mostly within their class, with class-dependent features and
    train / val / test masks (half / quarter / quarter)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, num_nodes)
    src = rng.integers(0, num_nodes, 6 * num_nodes)
    same = np.array([rng.choice(np.flatnonzero(y == y[s])) for s in src])
    dst = np.where(rng.random(len(src)) < 0.8, same, rng.integers(0, num_nodes, len(src)))
    keep = src != dst
    x = rng.normal(size=(num_nodes, features)) + np.eye(classes, features)[y]
    order = rng.permutation(num_nodes)
    masks = {}
    for name, part in zip(("train_mask", "val_mask", "test_mask"),
                          np.split(order, [num_nodes // 2, 3 * num_nodes // 4])):
        masks[name] = np.zeros(num_nodes, dtype=bool)
        masks[name][part] = True
    return Graph(np.stack([src[keep], dst[keep]]), num_nodes, node_data={"x": x, "y": y, **masks})


def reference_curve(data, sampler: Sampler, epochs: int, batch_size: int, lr: float, world_size: int = 1,
                    seed: int = 0):
    """The per-epoch loss and final weights of seeded sampled training written out: the loaders of
    every rank, each step the mean of the ranks' batch losses (what DDP's averaged gradients
    descend), Adam."""
    model = compiled()
    torch.manual_seed(seed)
    module = model.to_torch(data.graph)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    loaders = [sampler.loader(data.graph, data.train, batch_size=batch_size, shuffle=True, seed=seed, rank=r,
                              world_size=world_size) for r in range(world_size)]
    labels = torch.from_numpy(data.y)
    curve = []
    for epoch in range(epochs):
        for loader in loaders:
            loader.set_epoch(epoch)
        losses = []
        for batches in zip(*loaders):
            optimizer.zero_grad()
            value = sum(torch.nn.functional.cross_entropy(module(b.graph)[:b.batch_size],
                                                          labels[b.n_id[:b.batch_size]]) for b in batches)
            value = value / world_size
            value.backward()
            optimizer.step()
            losses.append(value.item())
        curve.append(float(np.mean(losses)))
    return curve, module.weights()
