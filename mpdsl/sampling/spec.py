"""Sampler specs: the text of ``mpdsl train --sampler`` as a recipe for loaders.

Syntax: ``NAME:ARG,ARG,...[,KEY=VALUE,...]``, positional integers first, then options:

==============================================  ==========================================================
``neighbor:F1,F2,...[,replace=yes]``            ``NeighborLoader``: fanout per layer (hop 1 first), each
                                                >= 1 or -1 (all neighbours); ``replace`` samples with
                                                replacement (default no). Batch: ``batch_size`` seeds.
``cluster:K``                                   ``ClusterLoader``: K METIS parts; ``batch_size`` parts per
                                                batch.
``saint-node:BUDGET[,steps=S][,coverage=C]``    ``GraphSAINTNodeLoader``: BUDGET nodes per subgraph.
``saint-edge:BUDGET[,steps=S][,coverage=C]``    ``GraphSAINTEdgeLoader``: BUDGET edges per subgraph.
``saint-rw:ROOTS,LENGTH[,steps=S][,coverage=C]``  ``GraphSAINTRandomWalkLoader``: ROOTS walks of LENGTH.
==============================================  ==========================================================

GraphSAINT draws one subgraph per step: ``steps`` is the number of steps of an epoch (default: about
one pass over the nodes, ceil(N / nodes per subgraph), with 2 * BUDGET nodes per edge subgraph and
ROOTS * (LENGTH + 1) per walk subgraph); ``coverage`` is GraphSAINT's sample coverage for its
normalisation coefficients (the loader's default when not given). A GraphSAINT batch size is one
subgraph, so these samplers take no ``batch_size``.

``parse_sampler(text)`` returns a ``Sampler``; its ``loader(graph, seeds, ...)`` builds the loader
(constructors imported when first used, from ``mpdsl.sampling.neighbor`` / ``.cluster`` / ``.saint``).
A ``Sampler`` can also be made directly around any function that builds a ``SampleLoader``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mpdsl.graph import Graph
from mpdsl.sampling.loader import SampleLoader, SamplingError

__all__ = ["SAMPLER_SYNTAX", "Sampler", "parse_sampler"]

# build(graph, seeds, *, batch_size, shuffle, seed, rank, world_size, **loader_options) -> SampleLoader
LoaderBuilder = Callable[..., SampleLoader]


@dataclass(frozen=True)
class Sampler:
    """How training batches are drawn. ``build(graph, seeds, *, batch_size, shuffle, seed, rank,
    world_size, **loader_options)`` returns the loader whose batches hold ``seeds`` (int64 node ids;
    a seed-based sampler yields them first, ``seeded``; a subgraph sampler, not ``seeded``, covers the
    graph and its loss uses the rows in the split). ``covers``: a pass over the unshuffled loader of
    one rank visits every seed (seeded) or every node (subgraph) exactly once, so it can evaluate a
    split (``--eval sampled``). ``batch_size``: the default units per batch, or None when the sampler
    fixes it (one GraphSAINT subgraph)."""

    name: str
    build: LoaderBuilder
    seeded: bool
    covers: bool = True
    batch_size: int | None = 1024
    text: str = field(default="", compare=False)

    def __reduce__(self) -> tuple:
        """Pickled as its spec when parsed from one (its loader builder is a closure), else field by field."""
        if self.text:
            return parse_sampler, (self.text,)
        return Sampler, (self.name, self.build, self.seeded, self.covers, self.batch_size)

    def loader(self, graph: Graph, seeds: np.ndarray, *, batch_size: int | None = None, shuffle: bool = False,
               seed: int = 0, rank: int = 0, world_size: int = 1, **loader_options: Any) -> SampleLoader:
        """The loader of ``seeds`` (``batch_size`` None: the sampler's default)."""
        if batch_size is not None and self.batch_size is None:
            raise SamplingError(f"the {self.name} sampler draws one subgraph per step and takes no batch size",
                                "set the subgraph size in the sampler spec and drop the batch size")
        size = batch_size if batch_size is not None else (self.batch_size or 1)
        return self.build(graph, np.asarray(seeds, dtype=np.int64), batch_size=size, shuffle=shuffle, seed=seed,
                          rank=rank, world_size=world_size, **loader_options)


def _constructor(module: str, name: str):
    """The loader class ``name`` of ``mpdsl.sampling.<module>``, imported when a loader is built."""
    path = f"mpdsl.sampling.{module}"
    try:
        return getattr(importlib.import_module(path), name)
    except ModuleNotFoundError as err:
        if err.name != path:  # a module the loader needs: its own message says which
            raise
    except AttributeError:
        pass
    raise SamplingError(f"the sampler loader {name} ({path}) is not available in this installation",
                        "use another --sampler")


def _yes_no(key: str, text: str) -> bool:
    value = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}.get(text.lower())
    if value is None:
        raise SamplingError(f"{key}={text} is not yes or no", f"write {key}=yes or {key}=no")
    return value


def _integer(what: str, text: str, lowest: int, all_allowed: bool = False) -> int:
    """``text`` as an int >= ``lowest`` (or -1 with ``all_allowed``)."""
    try:
        value: int | None = int(text)
    except ValueError:
        value = None
    if value is None or not (value >= lowest or (all_allowed and value == -1)):
        wanted = f"an integer >= {lowest}" + (" or -1 (all neighbours)" if all_allowed else "")
        raise SamplingError(f"{what} must be {wanted}, got {text!r}")
    return value


def _neighbor(args: list[str], options: dict[str, str]) -> Sampler:
    if not args:
        raise SamplingError("neighbor needs one fanout per layer, e.g. neighbor:15,10")
    fanouts = [_integer(f"fanout {i + 1}", a, 1, all_allowed=True) for i, a in enumerate(args)]
    replace = _yes_no("replace", options.pop("replace", "no"))

    def build(graph, seeds, *, batch_size, shuffle, seed, rank, world_size, **loader_options):
        NeighborLoader = _constructor("neighbor", "NeighborLoader")
        return NeighborLoader(graph, fanouts, input_nodes=seeds, batch_size=batch_size, replace=replace,
                              shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, **loader_options)

    return Sampler("neighbor", build, seeded=True, batch_size=1024)


def _cluster(args: list[str], options: dict[str, str]) -> Sampler:
    if len(args) != 1:
        raise SamplingError(f"cluster takes one part count, e.g. cluster:100, got {len(args)} values")
    num_parts = _integer("the part count", args[0], 1)

    def build(graph, seeds, *, batch_size, shuffle, seed, rank, world_size, **loader_options):
        ClusterLoader = _constructor("cluster", "ClusterLoader")
        return ClusterLoader(graph, num_parts, batch_size=batch_size, shuffle=shuffle, seed=seed, rank=rank,
                             world_size=world_size, **loader_options)

    return Sampler("cluster", build, seeded=False, batch_size=1)


def _saint(kind: str, args: list[str], options: dict[str, str]) -> Sampler:
    names = {"saint-node": ("GraphSAINTNodeLoader", ["the node budget"]),
             "saint-edge": ("GraphSAINTEdgeLoader", ["the edge budget"]),
             "saint-rw": ("GraphSAINTRandomWalkLoader", ["the root count", "the walk length"])}
    loader_name, what = names[kind]
    if len(args) != len(what):
        example = "saint-rw:2000,4" if kind == "saint-rw" else f"{kind}:6000"
        raise SamplingError(f"{kind} takes {' and '.join(what)}, e.g. {example}, got {len(args)} values")
    sizes = [_integer(w, a, 1) for w, a in zip(what, args)]
    steps = _integer("steps", options.pop("steps"), 1) if "steps" in options else None
    coverage = {"sample_coverage": _integer("coverage", options.pop("coverage"), 0)} if "coverage" in options else {}
    nodes_per_step = {"saint-node": sizes[0], "saint-edge": 2 * sizes[0]}.get(kind, sizes[0] * (sizes[-1] + 1))

    def build(graph, seeds, *, batch_size, shuffle, seed, rank, world_size, **loader_options):
        num_steps = steps if steps is not None else max(1, math.ceil(graph.num_nodes / nodes_per_step))
        Loader = _constructor("saint", loader_name)
        return Loader(graph, *sizes, num_steps=num_steps, seed=seed, rank=rank, world_size=world_size,
                      **coverage, **loader_options)

    # each node appears in a subgraph with some probability: no pass covers every node once
    return Sampler(kind, build, seeded=False, covers=False, batch_size=None)


SAMPLERS: dict[str, Callable[[list[str], dict[str, str]], Sampler]] = {
    "neighbor": _neighbor,
    "cluster": _cluster,
    "saint-node": lambda args, options: _saint("saint-node", args, options),
    "saint-edge": lambda args, options: _saint("saint-edge", args, options),
    "saint-rw": lambda args, options: _saint("saint-rw", args, options),
}
OPTIONS = {"neighbor": ("replace",), "cluster": (), "saint-node": ("steps", "coverage"),
           "saint-edge": ("steps", "coverage"), "saint-rw": ("steps", "coverage")}
SYNTAX = {"neighbor": "neighbor:F1,F2,... (one fanout per layer, each >= 1 or -1; option replace=yes)",
          "cluster": "cluster:K (K >= 1 parts)",
          "saint-node": "saint-node:BUDGET[,steps=S][,coverage=C]",
          "saint-edge": "saint-edge:BUDGET[,steps=S][,coverage=C]",
          "saint-rw": "saint-rw:ROOTS,LENGTH[,steps=S][,coverage=C]"}
SAMPLER_SYNTAX = "write one of " + "; ".join(SYNTAX.values())


def parse_sampler(text: str) -> Sampler:
    """The ``Sampler`` of a spec (module docstring), or a SamplingError naming what is wrong."""
    name, colon, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name not in SAMPLERS:
        raise SamplingError(f"unknown sampler {name!r}", SAMPLER_SYNTAX)
    syntax = f"write {SYNTAX[name]}"
    if not colon or not rest.strip():
        raise SamplingError(f"the {name} sampler needs its sizes after a colon", syntax)
    args: list[str] = []
    options: dict[str, str] = {}
    for item in (part.strip() for part in rest.split(",")):
        if not item:
            raise SamplingError(f"empty value in {text!r}", syntax)
        key, equals, value = item.partition("=")
        if not equals:
            if options:
                raise SamplingError(f"{item!r} comes after the options", "write the sizes first, then KEY=VALUE")
            args.append(item)
            continue
        key = key.strip().lower()
        if key not in OPTIONS[name]:
            known = ", ".join(OPTIONS[name]) or "none"
            raise SamplingError(f"the {name} sampler has no option {key!r}", f"its options: {known}")
        if key in options:
            raise SamplingError(f"option {key} is given twice", "give each option once")
        options[key] = value.strip()
    try:
        sampler = SAMPLERS[name](args, options)
    except SamplingError as err:
        raise SamplingError(err.message, err.hint or syntax) from None
    return Sampler(sampler.name, sampler.build, sampler.seeded, sampler.covers, sampler.batch_size, text.strip())
