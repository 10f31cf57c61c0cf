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


def synth_inputs(model, graph, rng: np.random.Generator, keep_graph_features: bool = False) -> dict:
    """Random inputs for every input of ``model`` on ``graph``: ids within their bound, normal features
    (dims bound from data get SYNTH_FEATURES). With ``keep_graph_features``, float inputs the graph
    already holds are left to it."""
    inputs = {}
    for name, t in model.input_types.items():
        n = graph.num_rows(t.domain)
        if t.dtype == "i64":
            inputs[name] = rng.integers(0, index_bound(model, name), n)
        elif not (keep_graph_features and name in graph):
            shape = tuple(d.value if d.is_static else SYNTH_FEATURES for d in t.shape)
            inputs[name] = rng.normal(size=(n,) + shape)
    return inputs
