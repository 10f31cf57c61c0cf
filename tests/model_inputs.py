"""Random inputs for any mpdsl model on a graph (no torch needed: the optimizer and backend tests use
these without the PyTorch references)."""

from __future__ import annotations

import numpy as np

SYNTH_FEATURES = 5  # width of input dims that are bound from the data


def index_bound(model, name: str) -> int:
    """Largest id + 1 an int input may hold: the leading dim of the parameter it indexes, or the class
    count of a one_hot of it."""
    bounds = []
    for v in model.ir.values:
        if any(o.op == "input" and o.attr["name"] == name for o in v.operands):
            if v.op == "take" and v.operands[1].attr.get("name") == name:
                bounds.append(v.operands[0].type.shape[0].value)
            if v.op == "one_hot":
                bounds.append(v.attr["classes"])
    return min(bounds) if bounds else 1


def synth_edge_sets(model, graph, rng: np.random.Generator) -> dict:
    """Random indices (``<name>_index``, [2, K] with K half the graph's edges, at least one edge when
    there are nodes) for the model's input edge sets that ``graph`` does not carry. For a model with
    node types, the typed graph's parts in the .npz layout: each node type the graph lacks (its first
    type with the graph's node count, the others with about half as many) and each typed set
    (``SRC__S__DST_index``) over them."""
    from mpdsl.types import edge_set_ends, edge_set_relation

    sets: dict = {}
    counts = dict(graph.node_types)
    for k, node_type in enumerate(model.ir.node_types):
        if node_type not in counts:
            counts[node_type] = graph.num_nodes if k == 0 else (graph.num_nodes + 1) // 2
            sets[f"{node_type}__num_nodes"] = np.asarray(counts[node_type])
    for s in model.ir.edge_sets:
        src, dst = edge_set_ends(s.name)
        name = edge_set_relation(s.name)
        if src and s.kind == "input" and name not in graph.edge_sets:
            count = max(1, graph.num_edges // 2) if counts[src] and counts[dst] else 0
            ends = [rng.integers(0, max(counts[src], 1), count), rng.integers(0, max(counts[dst], 1), count)]
            sets[f"{src}__{name}__{dst}_index"] = np.stack(ends).astype(np.int64)
    for s in model.ir.edge_sets:
        if edge_set_ends(s.name)[0]:
            continue
        if s.kind == "input" and s.name not in graph.edge_sets:
            count = max(1, graph.num_edges // 2) if graph.num_nodes else 0
            sets[f"{s.name}_index"] = rng.integers(0, max(graph.num_nodes, 1), (2, count)).astype(np.int64)
    return sets


def with_edge_sets(model, graph, seed: int = 0):
    """``graph`` carrying random indices (``synth_edge_sets``) for the model's input edge sets it lacks."""
    sets = synth_edge_sets(model, graph, np.random.default_rng(seed))
    return graph.with_data(**sets) if sets else graph


def synth_inputs(model, graph, rng: np.random.Generator, keep_graph_features: bool = False) -> dict:
    """Random inputs for every input of ``model`` on ``graph``: ids within their bound, normal features
    (dims bound from data get SYNTH_FEATURES), and the indices of the model's input edge sets the
    graph lacks (``synth_edge_sets``: given as ``<name>_index``, as ``CompiledModel.run`` takes them).
    With ``keep_graph_features``, float inputs the graph already holds are left to it."""
    inputs = synth_edge_sets(model, graph, rng)
    if inputs:
        graph = graph.with_data(**inputs)
    for name, t in model.input_types.items():
        n = _rows(model, graph, t)
        if t.dtype == "i64":
            inputs[name] = rng.integers(0, index_bound(model, name), n)
        elif not (keep_graph_features and name in graph):
            shape = tuple(d.value if d.is_static else SYNTH_FEATURES for d in t.shape)
            inputs[name] = rng.normal(size=(n,) + shape)
    return inputs


def _rows(model, graph, t) -> int:
    """Rows of an input of type ``t``: the graph's, or those of the edge set it lives on."""
    if t.domain.value == "node" and t.rowset:
        return graph.num_type_nodes(t.rowset)
    if not t.rowset:
        return graph.num_rows(t.domain)
    from mpdsl.backends import edge_graph
    return edge_graph(graph, model.ir, t.rowset).num_edges


def graph_holding(model, base, inputs: dict, node_data: dict | None = None):
    """A graph with ``base``'s edges (and ``node_data``) holding every input of ``model`` in ``inputs`` as
    a graph array (a typed node input as an array of its node type), and the input edge sets and typed
    graph parts among them (``<name>_index``, .npz names)."""
    from mpdsl import Graph

    kinds: dict[str, dict] = {"node": dict(node_data or {}), "edge": {}, "graph": {}}
    extra = {}
    for name, array in inputs.items():
        t = model.input_types.get(name)
        if t is None:  # an input edge set's index, a part of a typed graph
            extra[name] = array
        elif t.domain.value == "node" and t.rowset:
            extra[f"{t.rowset}__{name}"] = array
        else:
            kinds[t.domain.value][name] = array
    graph = Graph(base.edge_index, base.num_nodes, node_data=kinds["node"], edge_data=kinds["edge"],
                  graph_data=kinds["graph"])
    return graph.with_data(**extra) if extra else graph


def residual_arguments(backward, residuals, forward_results: dict) -> tuple[dict, dict]:
    """The residuals a train-forward run returned (``forward_results``), as the backward program
    reads them: (its inputs, its params) by name."""
    kinds = {v.name: v.op for v in backward.values if v.name in residuals}
    return ({k: forward_results[k] for k in kinds if kinds[k] == "input"},
            {k: forward_results[k] for k in kinds if kinds[k] == "param"})
