"""A zoo of dense message-passing models against independent references, same weights.

Examples (``examples/*.mp``) and what they are compared with:

* ``gated_gcn.mp`` (GatedGCN with edge features, node and edge outputs) against a plain-torch
  GatedGCN written here from the equations (``torch.nn.Linear``, ``BatchNorm1d`` in eval mode with
  seeded running statistics); its gating core (layers ``node_gate_logits`` and
  ``gated_messages``) against PyG ``ResGatedGraphConv`` without edge features.
* ``meshgraphnets.mp`` (encode-process-decode) against a plain-torch MeshGraphNets written here; its
  processor layers ``edge_block`` and ``node_block`` at the data's widths (``mgn_blocks``: each MLP's
  first weight one matrix over a concatenation of different widths, ``param[FE + 2 * D, K]``); for
  both, the gradients through the torch module, and the Triton backend against NumPy.
* ``pna.mp``: the layer ``pna_conv`` against PyG ``PNAConv(edge_dim=...)``, ``pna_update`` with a
  two-input pre-NN against ``PNAConv`` without ``edge_dim`` (both towers=1, pre_layers=1,
  post_layers=1, aggregators mean/max/min/std, scalers identity/amplification/attenuation), and the
  whole model against a torch stack of ``PNAConv`` + ``BatchNorm1d`` + ReLU + residual.
* ``graph_transformer.mp``: the model (Graph Transformer layer with edge features, layer norm)
  against a plain-torch implementation written here; the layer ``transformer_conv`` against PyG
  ``TransformerConv(concat=True, root_weight=True, beta=False, edge_dim=...)``.

Layer-level comparisons are small programs written below that ``import`` the example file and
call its layers, so they test the example's own code. Every parameter of a reference is filled
with seeded non-zero values (biases and norm statistics included), copied under mpdsl's names and
layouts (a torch ``Linear`` weight [out, in] is ``param[in, out]`` = ``weight.T``; per-head
weights ``weight.T.reshape(in, H, C)``; per-layer weights stacked on a leading axis for ``W[t]``).

Graphs: seeded random multigraphs with isolated nodes, a node with out-edges only, repeated
edges, self loops and a hub; a sparse graph where most nodes have in-degree 0 or 1 (PNA's std mask
and attenuation clamp); the bundled karate club graph; and hypothesis-drawn graphs (empty ones
included). Tolerances: float64 rtol 1e-10, float32 rtol 1e-5, atol scaled by the largest output.
Every fixed-graph comparison is shown able to fail: perturbing any one copied parameter breaks it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pyg_nn = pytest.importorskip("torch_geometric.nn")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from comparison import (  # noqa: E402
    DTYPES, a, as_outputs, assert_close, build, compare, heads_t, lin_t)
from strategies import graphs  # noqa: E402

import mpdsl  # noqa: E402
from mpdsl.graph import Graph  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA = EXAMPLES / "data"

nn = torch.nn


# ------------------------------------------------------------------------------------------------
# Graphs


@dataclass(frozen=True)
class Case:
    """A test graph: int64 edge_index [2, E], node count, float64 x [N, F] and edge_attr [E, FE]."""

    name: str
    edge_index: np.ndarray
    num_nodes: int
    x: np.ndarray
    edge_attr: np.ndarray

    def graph(self, dtype: str) -> Graph:
        return Graph.from_arrays(self.edge_index, self.num_nodes, x=self.x.astype(dtype),
                                 edge_attr=self.edge_attr.astype(dtype))

    def torch_inputs(self, dtype: str):
        return (torch.from_numpy(self.x.astype(dtype)), torch.from_numpy(self.edge_index),
                torch.from_numpy(self.edge_attr.astype(dtype)))


F_IN, FE_IN = 6, 3     # feature widths of the fixed graphs


def _multigraph(seed: int = 3, n: int = 30) -> Case:
    """Nodes n-3..n-1 isolated, node n-4 with out-edges only, node 0 a hub, repeated edges
    (up to 3 copies), a few self loops (one doubled); edge order shuffled."""
    rng = np.random.default_rng(seed)
    connected = n - 3
    src = rng.integers(0, connected, 70)
    dst = rng.integers(0, connected, 70)
    keep = (src != dst) & (dst != connected - 1)
    src, dst = src[keep], dst[keep]
    hub = np.arange(1, connected)
    rep = rng.integers(0, len(src), 8)
    loops = np.array([2, 5, 5, 9])
    src = np.concatenate([src, hub, hub[:4], src[rep], src[rep[:3]], loops])
    dst = np.concatenate([dst, np.zeros_like(hub), np.zeros(4, dtype=np.int64), dst[rep], dst[rep[:3]], loops])
    order = rng.permutation(len(src))
    edge_index = np.stack([src[order], dst[order]]).astype(np.int64)
    indeg = np.bincount(edge_index[1], minlength=n)
    outdeg = np.bincount(edge_index[0], minlength=n)
    assert (indeg[-3:] == 0).all() and (outdeg[-3:] == 0).all()
    assert indeg[connected - 1] == 0 and outdeg[connected - 1] > 0
    assert indeg[0] > 4 * np.median(indeg)
    assert np.unique(edge_index, axis=1, return_counts=True)[1].max() >= 3
    return Case("multigraph", edge_index, n, rng.standard_normal((n, F_IN)),
                rng.standard_normal((edge_index.shape[1], FE_IN)))


def _sparse(seed: int = 5, n: int = 14) -> Case:
    """Mostly in-degree 0 or 1, one node receiving the same edge twice (zero variance)."""
    rng = np.random.default_rng(seed)
    edge_index = np.array([[1, 2, 3, 4, 4, 6, 7, 8, 9, 10],
                           [0, 0, 1, 5, 5, 7, 8, 9, 10, 11]], dtype=np.int64)
    return Case("sparse", edge_index, n, rng.standard_normal((n, F_IN)),
                rng.standard_normal((edge_index.shape[1], FE_IN)))


def _karate(seed: int = 11) -> Case:
    g = Graph.load(DATA / "karate.npz")
    rng = np.random.default_rng(seed)
    edge_index = np.array(g.edge_index)
    return Case("karate", edge_index, g.num_nodes, rng.standard_normal((g.num_nodes, F_IN)),
                rng.standard_normal((edge_index.shape[1], FE_IN)))


@lru_cache(maxsize=None)
def case(name: str) -> Case:
    return {"multigraph": _multigraph, "sparse": _sparse, "karate": _karate}[name]()


GRAPHS = ("multigraph", "sparse", "karate")


# ------------------------------------------------------------------------------------------------
# Torch helpers


def stack(values) -> np.ndarray:
    return np.stack(list(values))


def scatter_sum(values, index, n: int):
    return values.new_zeros((n,) + tuple(values.shape[1:])).index_add_(0, index, values)


def segment_softmax(score, index, n: int):
    """softmax of edge scores over the edges sharing their index (per trailing element)."""
    expanded = index.view(-1, *([1] * (score.dim() - 1))).expand_as(score)
    top = score.new_full((n,) + tuple(score.shape[1:]), -math.inf)
    top = top.scatter_reduce(0, expanded, score, "amax", include_self=True)
    ex = torch.exp(score - top[index])
    return ex / scatter_sum(ex, index, n)[index]


def bn_weights(bns, prefix: str) -> dict[str, np.ndarray]:
    """Per-layer BatchNorm1d statistics and affine parameters, stacked on a leading axis."""
    return {f"{prefix}_mean": stack(a(b.running_mean) for b in bns),
            f"{prefix}_var": stack(a(b.running_var) for b in bns),
            f"{prefix}_gamma": stack(a(b.weight) for b in bns),
            f"{prefix}_beta": stack(a(b.bias) for b in bns)}


# ------------------------------------------------------------------------------------------------
# References


class GatedGCNRef(nn.Module):
    """examples/gated_gcn.mp from the equations: embeddings, then per layer
    eh = A h_i + B h_j + C e_ij, s = sigmoid(eh),
    h' = h + relu(BN_h(U h_i + sum_j s V h_j / (sum_j s + 1e-6))), e' = e + relu(BN_e(eh))."""

    def __init__(self, f: int, fe: int, hid: int = 16, layers: int = 2):
        super().__init__()
        self.emb_h, self.emb_e = nn.Linear(f, hid), nn.Linear(fe, hid)
        self.layers = nn.ModuleList(nn.ModuleDict({k: nn.Linear(hid, hid) for k in "ABCUV"})
                                    for _ in range(layers))
        self.bn_h = nn.ModuleList(nn.BatchNorm1d(hid) for _ in range(layers))
        self.bn_e = nn.ModuleList(nn.BatchNorm1d(hid) for _ in range(layers))

    def forward(self, x, edge_index, edge_attr):
        src, dst = edge_index
        n = x.shape[0]
        h, e = self.emb_h(x), self.emb_e(edge_attr)
        for lin, bn_h, bn_e in zip(self.layers, self.bn_h, self.bn_e):
            eh = lin["A"](h)[dst] + lin["B"](h)[src] + lin["C"](e)
            s = torch.sigmoid(eh)
            agg = scatter_sum(s * lin["V"](h)[src], dst, n) / (scatter_sum(s, dst, n) + 1e-6)
            h, e = h + torch.relu(bn_h(lin["U"](h) + agg)), e + torch.relu(bn_e(eh))
        return {"h": h, "e": e}

    def mpdsl_weights(self):
        w = {"W_h": lin_t(self.emb_h), "b_h": a(self.emb_h.bias),
             "W_e": lin_t(self.emb_e), "b_e": a(self.emb_e.bias)}
        for k in "ABCUV":
            w[k] = stack(lin_t(layer[k]) for layer in self.layers)
            w["b" + k] = stack(a(layer[k].bias) for layer in self.layers)
        return {**w, **bn_weights(self.bn_h, "bn_h"), **bn_weights(self.bn_e, "bn_e")}


def _mlp(d_in: int, hid: int, d_out: int, norm: bool) -> nn.Sequential:
    layers = [nn.Linear(d_in, hid), nn.ReLU(), nn.Linear(hid, hid), nn.ReLU(), nn.Linear(hid, d_out)]
    return nn.Sequential(*layers, *([nn.LayerNorm(d_out)] if norm else []))


def _mlp_weights(mlp: nn.Sequential, prefix: str) -> dict[str, np.ndarray]:
    w = {f"{prefix}W{i}": lin_t(mlp[j]) for i, j in ((1, 0), (2, 2), (3, 4))}
    w.update({f"{prefix}b{i}": a(mlp[j].bias) for i, j in ((1, 0), (2, 2), (3, 4))})
    if len(mlp) == 6:
        w.update({f"{prefix}gamma": a(mlp[5].weight), f"{prefix}beta": a(mlp[5].bias)})
    return w


class MeshGraphNetsRef(nn.Module):
    """examples/meshgraphnets.mp: encoder MLPs (+LayerNorm), T blocks
    e' = e + MLP_e([e, h_src, h_dst]), h' = h + MLP_v([h, sum_dst e']), decoder MLP; node latents of
    width ``lat``, edge latents of width ``lat_e``, each MLP's first Linear over the whole concatenation."""

    def __init__(self, f: int, fe: int, lat: int = 16, lat_e: int = 8, blocks: int = 3, c: int = 3):
        super().__init__()
        self.enc_v, self.enc_e = _mlp(f, lat, lat, True), _mlp(fe, lat_e, lat_e, True)
        self.proc_e = nn.ModuleList(_mlp(lat_e + 2 * lat, lat_e, lat_e, True) for _ in range(blocks))
        self.proc_v = nn.ModuleList(_mlp(lat + lat_e, lat, lat, True) for _ in range(blocks))
        self.dec = _mlp(lat, lat, c, False)

    def forward(self, x, edge_index, edge_attr):
        src, dst = edge_index
        h, e = self.enc_v(x), self.enc_e(edge_attr)
        for mlp_e, mlp_v in zip(self.proc_e, self.proc_v):
            e = e + mlp_e(torch.cat([e, h[src], h[dst]], dim=-1))
            h = h + mlp_v(torch.cat([h, scatter_sum(e, dst, x.shape[0])], dim=-1))
        return {"out": self.dec(h)}

    def mpdsl_weights(self):
        w = {**_mlp_weights(self.enc_v, "enc_v_"), **_mlp_weights(self.enc_e, "enc_e_"),
             **_mlp_weights(self.dec, "dec_")}
        for name, mlps in (("proc_e_", self.proc_e), ("proc_v_", self.proc_v)):
            per_block = [_mlp_weights(m, name) for m in mlps]
            w.update({k: stack(b[k] for b in per_block) for k in per_block[0]})
        return w


class MeshGraphNetsBlocks(nn.Module):
    """meshgraphnets.mp's layers edge_block then node_block on the raw features (node width f, edge
    width fe, hidden width ``hid``): e' = e + MLP_e([e, x_src, x_dst]), h = x + MLP_v([x, sum_dst e']),
    each MLP's first Linear one weight over the whole concatenation of different widths."""

    def __init__(self, f: int, fe: int, hid: int):
        super().__init__()
        self.mlp_e = _mlp(fe + 2 * f, hid, fe, True)
        self.mlp_v = _mlp(f + fe, hid, f, True)

    def forward(self, x, edge_index, edge_attr):
        src, dst = edge_index
        e = edge_attr + self.mlp_e(torch.cat([edge_attr, x[src], x[dst]], dim=-1))
        h = x + self.mlp_v(torch.cat([x, scatter_sum(e, dst, x.shape[0])], dim=-1))
        return {"h": h, "e": e}

    def mpdsl_weights(self):
        return {**_mlp_weights(self.mlp_e, "e_"), **_mlp_weights(self.mlp_v, "v_")}


AGGREGATORS = ["mean", "max", "min", "std"]
SCALERS = ["identity", "amplification", "attenuation"]


def degree_histogram(seed: int = 21) -> torch.Tensor:
    """The in-degree histogram of a 'training set' (a seeded random graph) for PNA's delta."""
    rng = np.random.default_rng(seed)
    dst = rng.integers(0, 50, 160)
    return torch.from_numpy(np.bincount(np.bincount(dst, minlength=50)))


def pna_conv(f: int, k: int, fe: int | None) -> nn.Module:
    return pyg_nn.PNAConv(f, k, aggregators=AGGREGATORS, scalers=SCALERS, deg=degree_histogram(),
                          edge_dim=fe, towers=1, pre_layers=1, post_layers=1, divide_input=False)


def pna_conv_weights(conv) -> dict[str, np.ndarray]:
    """PNAConv's parameters under pna.mp's names (edge encoder only when edge_dim is set)."""
    w = {"W_pre": lin_t(conv.pre_nns[0][0]), "b_pre": a(conv.pre_nns[0][0].bias),
         "W_post": lin_t(conv.post_nns[0][0]), "b_post": a(conv.post_nns[0][0].bias),
         "W_lin": lin_t(conv.lin), "b_lin": a(conv.lin.bias)}
    if conv.edge_dim is not None:
        w.update({"W_enc": lin_t(conv.edge_encoder), "b_enc": a(conv.edge_encoder.bias)})
    return w


def pna_delta(conv) -> np.ndarray:
    return a(conv.aggr_module.avg_deg_log).reshape(())


class PNAStack(nn.Module):
    """examples/pna.mp: h = W_in x + b_in; T times h = h + relu(BN(PNAConv(h, edge_attr)));
    out = W_out h + b_out."""

    def __init__(self, f: int, fe: int, hid: int = 16, layers: int = 2, c: int = 4):
        super().__init__()
        self.lin_in, self.lin_out = nn.Linear(f, hid), nn.Linear(hid, c)
        self.convs = nn.ModuleList(pna_conv(hid, hid, fe) for _ in range(layers))
        self.bns = nn.ModuleList(nn.BatchNorm1d(hid) for _ in range(layers))

    def forward(self, x, edge_index, edge_attr):
        h = self.lin_in(x)
        for conv, bn in zip(self.convs, self.bns):
            h = h + torch.relu(bn(conv(h, edge_index, edge_attr)))
        return {"out": self.lin_out(h)}

    def mpdsl_weights(self):
        per_layer = [pna_conv_weights(c) for c in self.convs]
        deltas = {float(pna_delta(c)) for c in self.convs}
        assert len(deltas) == 1
        return {"delta": pna_delta(self.convs[0]), "W_in": lin_t(self.lin_in), "b_in": a(self.lin_in.bias),
                "W_out": lin_t(self.lin_out), "b_out": a(self.lin_out.bias),
                **{k: stack(w[k] for w in per_layer) for k in per_layer[0]}, **bn_weights(self.bns, "bn")}


class GraphTransformerRef(nn.Module):
    """examples/graph_transformer.mp from the paper's equations, layer norm variant, no biases in
    Q, K, V, E."""

    def __init__(self, f: int, fe: int, hid: int = 16, heads: int = 4, dk: int = 4, layers: int = 2):
        super().__init__()
        self.heads, self.dk = heads, dk
        self.emb_h, self.emb_e = nn.Linear(f, hid), nn.Linear(fe, hid)

        def layer():
            return nn.ModuleDict({
                "Q": nn.Linear(hid, heads * dk, bias=False), "K": nn.Linear(hid, heads * dk, bias=False),
                "V": nn.Linear(hid, heads * dk, bias=False), "E": nn.Linear(hid, heads * dk, bias=False),
                "O_h": nn.Linear(heads * dk, hid), "O_e": nn.Linear(heads * dk, hid),
                "ln1_h": nn.LayerNorm(hid), "ln1_e": nn.LayerNorm(hid),
                "ffn_h": nn.Sequential(nn.Linear(hid, 2 * hid), nn.ReLU(), nn.Linear(2 * hid, hid)),
                "ffn_e": nn.Sequential(nn.Linear(hid, 2 * hid), nn.ReLU(), nn.Linear(2 * hid, hid)),
                "ln2_h": nn.LayerNorm(hid), "ln2_e": nn.LayerNorm(hid)})

        self.layers = nn.ModuleList(layer() for _ in range(layers))

    def forward(self, x, edge_index, edge_attr):
        src, dst = edge_index
        n, heads, dk = x.shape[0], self.heads, self.dk
        h, e = self.emb_h(x), self.emb_e(edge_attr)
        for m in self.layers:
            q, k, v = (m[name](h).view(-1, heads, dk) for name in "QKV")
            pe = m["E"](e).view(-1, heads, dk)
            w_hat = q[dst] * k[src] / math.sqrt(dk) * pe                     # [E, H, dk]
            w = segment_softmax(w_hat.sum(-1), dst, n)                        # [E, H]
            h_att = scatter_sum(w.unsqueeze(-1) * v[src], dst, n)             # [N, H, dk]
            h1 = m["ln1_h"](h + m["O_h"](h_att.reshape(n, heads * dk)))
            e1 = m["ln1_e"](e + m["O_e"](w_hat.reshape(-1, heads * dk)))
            h = m["ln2_h"](h1 + m["ffn_h"](h1))
            e = m["ln2_e"](e1 + m["ffn_e"](e1))
        return {"h": h, "e": e}

    def mpdsl_weights(self):
        def per_layer(fn):
            return stack(fn(m) for m in self.layers)

        w = {"W_h": lin_t(self.emb_h), "b_h": a(self.emb_h.bias),
             "W_e": lin_t(self.emb_e), "b_e": a(self.emb_e.bias)}
        for name in "QKVE":
            w["W" + name.lower()] = per_layer(lambda m: heads_t(m[name], self.heads))
        for side in "he":
            w[f"O_{side}"] = per_layer(lambda m: lin_t(m[f"O_{side}"]))
            w[f"b_O{side}"] = per_layer(lambda m: a(m[f"O_{side}"].bias))
            for ln in ("ln1", "ln2"):
                w[f"{ln}_{side}_gamma"] = per_layer(lambda m: a(m[f"{ln}_{side}"].weight))
                w[f"{ln}_{side}_beta"] = per_layer(lambda m: a(m[f"{ln}_{side}"].bias))
            w[f"ffn_{side}_W1"] = per_layer(lambda m: lin_t(m[f"ffn_{side}"][0]))
            w[f"ffn_{side}_b1"] = per_layer(lambda m: a(m[f"ffn_{side}"][0].bias))
            w[f"ffn_{side}_W2"] = per_layer(lambda m: lin_t(m[f"ffn_{side}"][2]))
            w[f"ffn_{side}_b2"] = per_layer(lambda m: a(m[f"ffn_{side}"][2].bias))
        return w


class PyGLayer(nn.Module):
    """A PyG conv called as conv(x, edge_index[, edge_attr]), its output named 'out'."""

    def __init__(self, conv, uses_edge_attr: bool, weights: Callable[[nn.Module], dict]):
        super().__init__()
        self.conv, self.uses_edge_attr, self._weights = conv, uses_edge_attr, weights

    def forward(self, x, edge_index, edge_attr):
        if self.uses_edge_attr:
            return {"out": self.conv(x, edge_index, edge_attr)}
        return {"out": self.conv(x, edge_index)}

    def mpdsl_weights(self):
        return self._weights(self.conv)


# ------------------------------------------------------------------------------------------------
# Test-only programs that import an example and call its layers (K: output width)

K, TC_HEADS, TC_C = 5, 3, 4


def importing(example: str, body: str) -> str:
    """A program importing ``example``, found through the import path ``EXAMPLES`` (compile with
    ``import_paths=[EXAMPLES]``)."""
    return f'import "{example}"\n{body}'


RES_GATED_SOURCE = importing("gated_gcn.mp", f"""
dim K = {K}
model res_gated_conv(x: node[F], Wk: param[F, K], bk: param[K], Wq: param[F, K], bq: param[K],
                     Wv: param[F, K], bv: param[K], W_skip: param[F, K], b: param[K]) -> node[K] {{
    s = sigmoid(node_gate_logits(x, Wk, bk, Wq, bq))      # sigmoid(W_k x_i + b_k + W_q x_j + b_q)
    return gated_messages(s, x, Wv, bv) + x @ W_skip + b
}}
""")

PNA_EDGE_SOURCE = importing("pna.mp", f"""
dim K = {K}
model pna_conv_edge(x: node[F], edge_attr: edge[FE], delta: param[], W_enc: param[FE, F], b_enc: param[F],
                    W_pre: param[3 * F, F], b_pre: param[F], W_post: param[13 * F, K], b_post: param[K],
                    W_lin: param[K, K], b_lin: param[K]) -> node[K] {{
    return pna_conv(x, edge_attr, delta, W_enc, b_enc, W_pre, b_pre, W_post, b_post, W_lin, b_lin)
}}
""")

PNA_PLAIN_SOURCE = importing("pna.mp", f"""
dim K = {K}
# W_pre's 2 * F is solved for F, or checked against the F of b_pre or of its own second axis,
# whatever the order of the weights.
model pna_conv_plain(x: node[F], delta: param[], W_pre: param[2 * F, F], b_pre: param[F],
                     W_post: param[13 * F, K], b_post: param[K], W_lin: param[K, K], b_lin: param[K]) -> node[K] {{
    m = concat(x[dst], x[src]) @ W_pre + b_pre
    return pna_update(x, m, delta, W_post, b_post, W_lin, b_lin)
}}
""")

TRANSFORMER_CONV_SOURCE = importing("graph_transformer.mp", f"""
dim H = {TC_HEADS}
dim C = {TC_C}
model transformer_conv_layer(x: node[F], edge_attr: edge[FE], Wq: param[F, H, C], bq: param[H, C],
                             Wk: param[F, H, C], bk: param[H, C], Wv: param[F, H, C], bv: param[H, C],
                             We: param[FE, H, C], W_skip: param[F, H * C], b_skip: param[H * C]) -> node[H * C] {{
    return transformer_conv(x, edge_attr, Wq, bq, Wk, bk, Wv, bv, We, W_skip, b_skip, sqrt(C))
}}
""")


# The blocks at the widths of the data (D, FE bound at run time, both unlike the hidden K): the weight
# over [e, h_src, h_dst] is param[FE + 2 * D, K], the one over [h, sum e] param[D + FE, K].
MGN_BLOCKS_SOURCE = importing("meshgraphnets.mp", f"""
dim K = {K}
model mgn_blocks(x: node[D], edge_attr: edge[FE],
                 e_W1: param[FE + 2 * D, K], e_b1: param[K], e_W2: param[K, K], e_b2: param[K],
                 e_W3: param[K, FE], e_b3: param[FE], e_gamma: param[FE], e_beta: param[FE],
                 v_W1: param[D + FE, K], v_b1: param[K], v_W2: param[K, K], v_b2: param[K],
                 v_W3: param[K, D], v_b3: param[D], v_gamma: param[D], v_beta: param[D]
                ) -> (h: node[D], e: edge[FE]) {{
    e = edge_block(edge_attr, x, e_W1, e_b1, e_W2, e_b2, e_W3, e_b3, e_gamma, e_beta)
    return node_block(x, e, v_W1, v_b1, v_W2, v_b2, v_W3, v_b3, v_gamma, v_beta), e
}}
""")


def _res_gated_weights(conv):
    return {"Wk": lin_t(conv.lin_key), "bk": a(conv.lin_key.bias),
            "Wq": lin_t(conv.lin_query), "bq": a(conv.lin_query.bias),
            "Wv": lin_t(conv.lin_value), "bv": a(conv.lin_value.bias),
            "W_skip": lin_t(conv.lin_skip), "b": a(conv.bias)}


def _transformer_conv_weights(conv):
    h = conv.heads
    return {"Wq": heads_t(conv.lin_query, h), "bq": a(conv.lin_query.bias).reshape(h, -1),
            "Wk": heads_t(conv.lin_key, h), "bk": a(conv.lin_key.bias).reshape(h, -1),
            "Wv": heads_t(conv.lin_value, h), "bv": a(conv.lin_value.bias).reshape(h, -1),
            "We": heads_t(conv.lin_edge, h),
            "W_skip": lin_t(conv.lin_skip), "b_skip": a(conv.lin_skip.bias)}


@dataclass(frozen=True)
class Spec:
    source: str | Path                              # an example file or program text
    reference: Callable[[int, int], nn.Module]      # (F, FE) -> module with mpdsl_weights()
    invariant: frozenset[str] = frozenset()         # parameters the output cannot depend on


SPECS = {
    "gated_gcn": Spec(EXAMPLES / "gated_gcn.mp", lambda f, fe: GatedGCNRef(f, fe)),
    "meshgraphnets": Spec(EXAMPLES / "meshgraphnets.mp", lambda f, fe: MeshGraphNetsRef(f, fe)),
    "mgn_blocks": Spec(MGN_BLOCKS_SOURCE, lambda f, fe: MeshGraphNetsBlocks(f, fe, K)),
    "pna": Spec(EXAMPLES / "pna.mp", lambda f, fe: PNAStack(f, fe)),
    "graph_transformer": Spec(EXAMPLES / "graph_transformer.mp", lambda f, fe: GraphTransformerRef(f, fe)),
    "res_gated_conv": Spec(RES_GATED_SOURCE, lambda f, fe: PyGLayer(
        pyg_nn.ResGatedGraphConv(f, K), False, _res_gated_weights)),
    "pna_conv_edge": Spec(PNA_EDGE_SOURCE, lambda f, fe: PyGLayer(
        pna_conv(f, K, fe), True, lambda c: {"delta": pna_delta(c), **pna_conv_weights(c)})),
    "pna_conv_plain": Spec(PNA_PLAIN_SOURCE, lambda f, fe: PyGLayer(
        pna_conv(f, K, None), False, lambda c: {"delta": pna_delta(c), **pna_conv_weights(c)})),
    "transformer_conv": Spec(TRANSFORMER_CONV_SOURCE, lambda f, fe: PyGLayer(
        pyg_nn.TransformerConv(f, TC_C, heads=TC_HEADS, concat=True, beta=False, dropout=0.0,
                               edge_dim=fe, root_weight=True), True, _transformer_conv_weights),
        # The key bias adds q_i . b_k to every score of node i: the softmax over j cancels it.
        invariant=frozenset({"bk"})),
}


@lru_cache(maxsize=None)
def compiled(name: str, dtype: str):
    return mpdsl.compile(SPECS[name].source, dtype=dtype, import_paths=[EXAMPLES])


@lru_cache(maxsize=None)
def reference(name: str, dtype: str, f: int, fe: int) -> tuple[nn.Module, dict[str, np.ndarray]]:
    module = build(lambda: SPECS[name].reference(f, fe), dtype, seed=sum(map(ord, name)))
    return module, module.mpdsl_weights()


def run_reference(module, x, edge_index, edge_attr) -> dict[str, np.ndarray]:
    with torch.no_grad():
        return {k: v.numpy() for k, v in module(x, edge_index, edge_attr).items()}


# ------------------------------------------------------------------------------------------------
# Comparison


def compare_on(name: str, c: Case, dtype: str, perturb: bool) -> None:
    module, weights = reference(name, dtype, c.x.shape[1], c.edge_attr.shape[1])
    want = run_reference(module, *c.torch_inputs(dtype))
    model = compiled(name, dtype)
    assert set(weights) == set(model.param_types), "the weight map must cover every parameter"
    compare(model, weights, c.graph(dtype), want, dtype, f"{name} on {c.name} ({dtype})", perturb,
            invariant=SPECS[name].invariant)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("graph_name", GRAPHS)
@pytest.mark.parametrize("name", list(SPECS))
def test_matches_reference(name, graph_name, dtype):
    compare_on(name, case(graph_name), dtype, perturb=graph_name == "multigraph")


# Hypothesis: random graphs (empty, edge-less, hubs, chains, stars, self loops, multi-edges).
HYP_F, HYP_FE = 3, 2


@pytest.mark.parametrize("name", list(SPECS))
@settings(max_examples=15)
@given(g=graphs(max_nodes=16, max_edges=48, features=HYP_F), seed=st.integers(0, 2**31 - 1))
def test_matches_reference_on_random_graphs(name, g, seed):
    dtype = "float64"
    edge_attr = np.random.default_rng(seed).standard_normal((g.num_edges, HYP_FE))
    g = g.with_data(edge_attr=edge_attr)
    module, weights = reference(name, dtype, HYP_F, HYP_FE)
    x = torch.from_numpy(np.array(g["x"], dtype=np.float64))
    want = run_reference(module, x, torch.from_numpy(np.array(g.edge_index)), torch.from_numpy(edge_attr))
    model = compiled(name, dtype).load_weights(weights)
    assert_close(as_outputs(model(g)), want, dtype, f"{name} on {g!r}")


@pytest.mark.parametrize("name", ["meshgraphnets", "mgn_blocks"])
def test_meshgraphnets_gradients_through_the_torch_module(name):
    """The gradients of every parameter, the unsplit processor weights included, through the torch
    module (``to_torch``) against plain torch with the same weights (float64, rtol 1e-8)."""
    dtype, c = "float64", case("multigraph")
    ref = build(lambda: SPECS[name].reference(F_IN, FE_IN), dtype, seed=sum(map(ord, name)))
    model = mpdsl.compile(SPECS[name].source, dtype=dtype, import_paths=[EXAMPLES]).load_weights(ref.mpdsl_weights())
    graph = c.graph(dtype)
    module = model.to_torch(graph)
    got, want = as_outputs(module(graph)), ref(*c.torch_inputs(dtype))
    rng = np.random.default_rng(7)
    projections = {k: torch.from_numpy(rng.standard_normal(tuple(v.shape))) for k, v in want.items()}
    sum((got[k] * w).sum() for k, w in projections.items()).backward()
    sum((want[k] * w).sum() for k, w in projections.items()).backward()
    for k in want:
        assert_close(got[k].detach().numpy(), want[k].detach().numpy(), dtype, f"{name}/{k}")
    with torch.no_grad():  # the reference's gradients, in mpdsl's names and layouts
        for p in ref.parameters():
            p.copy_(p.grad)
    want_grads = ref.mpdsl_weights()
    got_grads = {n: p.grad.numpy() for n, p in module.named_parameters()}
    assert set(got_grads) == set(want_grads)
    for n, g in want_grads.items():
        assert np.abs(g).max() > 1e-6, f"{name}: d {n} is trivially zero"
        np.testing.assert_allclose(got_grads[n], g, rtol=1e-8, atol=1e-10 * max(1.0, np.abs(g).max()),
                                   err_msg=f"{name}: d {n}")


@pytest.mark.parametrize("name", ["meshgraphnets", "mgn_blocks"])
def test_meshgraphnets_on_triton_matches_numpy(name):
    """The Triton backend (its interpreter) equals NumPy on the blocks with unsplit weights."""
    pytest.importorskip("triton")
    from mpdsl.backends.triton_backend import TritonBackend
    from mpdsl.runtime import CompiledModel

    dtype, c = "float32", case("multigraph")
    _, weights = reference(name, dtype, F_IN, FE_IN)
    model = compiled(name, dtype).load_weights(weights)
    twin = CompiledModel(model.ir, TritonBackend(interpret=True, device="cpu", poison=True),
                         source_name=model.source_name).load_weights(weights)
    want, got = as_outputs(model(c.graph(dtype))), as_outputs(twin(c.graph(dtype)))
    assert twin.backend.last_launches, "the graph ops ran as Triton kernels"
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5 * max(1.0, np.abs(want[k]).max()),
                                   err_msg=f"{name}/{k}")


# ------------------------------------------------------------------------------------------------
# Details the comparisons rely on


def test_pyg_layer_structure():
    """The PyG 2.8 layouts the weight maps rely on."""
    conv = pna_conv(4, K, 2)
    assert {n for n, _ in conv.named_parameters()} == {
        "edge_encoder.weight", "edge_encoder.bias", "pre_nns.0.0.weight", "pre_nns.0.0.bias",
        "post_nns.0.0.weight", "post_nns.0.0.bias", "lin.weight", "lin.bias"}
    assert conv.pre_nns[0][0].weight.shape == (4, 3 * 4)
    assert conv.post_nns[0][0].weight.shape == (K, 13 * 4)
    assert pna_conv(4, K, None).pre_nns[0][0].weight.shape == (4, 2 * 4)
    tc = pyg_nn.TransformerConv(4, TC_C, heads=TC_HEADS, edge_dim=2)
    assert {n for n, _ in tc.named_parameters()} == {
        "lin_key.weight", "lin_key.bias", "lin_query.weight", "lin_query.bias", "lin_value.weight",
        "lin_value.bias", "lin_edge.weight", "lin_skip.weight", "lin_skip.bias"}
    rg = pyg_nn.ResGatedGraphConv(4, K)
    assert {n for n, _ in rg.named_parameters()} == {
        "lin_key.weight", "lin_key.bias", "lin_query.weight", "lin_query.bias", "lin_value.weight",
        "lin_value.bias", "lin_skip.weight", "bias"}


def test_pna_delta_is_the_mean_log_degree_of_the_histogram():
    """pna.mp's `delta` = PNAConv's avg_deg_log = sum_k deg[k] log(k + 1) / sum_k deg[k] (float32)."""
    deg = degree_histogram().numpy().astype(np.float64)
    expected = float((np.log(np.arange(len(deg)) + 1) * deg).sum() / deg.sum())
    got = pna_delta(pna_conv(4, K, None))
    assert got.dtype == np.float32 and got == np.float32(expected)


STD_SOURCE = importing("pna.mp", """
model std_only(m: edge[F]) -> (pyg: node[F], exact: node[F]) {
    return std_pyg(m), std(m) by dst
}
""")


@pytest.mark.parametrize("dtype", DTYPES)
def test_pna_std_is_pyg_std_aggregation(dtype):
    """pna.mp's std_pyg against PyG's StdAggregation (used by PNAConv): 0 where the variance
    E[m^2] - E[m]^2 is at most 1e-5 (empty, single-message and equal-message groups, a tiny spread),
    sqrt(var) elsewhere; mpdsl's exact `std` differs on the tiny spread."""
    from torch_geometric.nn.aggr import StdAggregation

    rng = np.random.default_rng(4)
    # node 0: no in-edges; 1: one edge; 2: three equal messages; 3: spread 1e-3 (var ~ 1e-6);
    # 4: spread 1e-2 (var ~ 1e-4); 5: random messages.
    dst = np.array([1, 2, 2, 2, 3, 3, 3, 4, 4, 5, 5, 5, 5])
    src = np.zeros_like(dst)
    base = rng.standard_normal((1, 4))
    m = np.repeat(base, len(dst), axis=0)
    m[4:7] += 1e-3 * rng.standard_normal((3, 4))
    m[7:9] += 1e-2 * rng.standard_normal((2, 4))
    m[9:] = rng.standard_normal((4, 4))
    g = Graph.from_arrays(np.stack([src, dst]).astype(np.int64), 6)
    out = mpdsl.compile(STD_SOURCE, dtype=dtype, import_paths=[EXAMPLES])(g, m=m.astype(dtype))
    want = StdAggregation()(torch.from_numpy(m.astype(dtype)), torch.from_numpy(dst), dim_size=6).numpy()
    assert (want[:4] == 0).all() and (want[4:] > 0).all()
    assert_close({"out": out["pyg"]}, {"out": want}, dtype, f"std_pyg ({dtype})")
    assert not np.allclose(out["exact"][3], 0), "the exact std was expected to differ below 1e-5"


def test_layer_with_unnamed_tuple_results_parses():
    """Unnamed tuple results `-> (node[D], node[D])` parse (domain names are keywords, not names)."""
    mpdsl.compile("layer two(h: node[D]) -> (node[D], node[D]) { return h, h }\n"
                  "model m(x: node[F]) -> node[F] { a, b = two(x)\n return a + b }")
