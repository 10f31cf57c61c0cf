"""Train a link predictor on the bundled Les Miserables graph and report the ROC AUC of held-out edges.

The model is ``examples/link_sage.mp`` (a two-layer GraphSAGE encoder, a dot-product decoder over
the input edge set ``pairs``). The recipe is PyG's link-prediction example: a held-out split of the
undirected edges (``mpdsl.link_split.split_edges``: 10% validation, 10% test, one negative pair per
positive), messages over the training edges only, a fresh set of negative pairs every epoch
(``sample_negatives``), binary cross-entropy on the logits, Adam, and the test AUC read at the epoch of
the best validation AUC.

``--system pyg`` trains the same model written with PyG's ``SAGEConv`` from the same initial weights
on the same pairs, for comparison (the two curves agree to rounding).

    python examples/link_prediction.py                      # mpdsl, 200 epochs
    python examples/link_prediction.py --system pyg
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import mpdsl
from mpdsl.link_split import LinkSplit, roc_auc, sample_negatives, split_edges

HERE = Path(__file__).resolve().parent
MODEL = HERE / "link_sage.mp"
GRAPH = HERE / "data" / "lesmis.npz"


@dataclass
class Run:
    """A training run's record: the loss and the validation AUC of every epoch, and the test AUC at
    the epoch of the best validation AUC."""

    losses: list[float] = field(default_factory=list)
    val_auc: list[float] = field(default_factory=list)
    best_epoch: int = -1
    test_auc: float = float("nan")


def pyg_link_sage(params: dict[str, np.ndarray]) -> torch.nn.Module:
    """``link_sage.mp`` in PyG (SAGEConv: ``lin_l`` the neighbour weight with the bias, ``lin_r`` the
    root weight) holding ``params``, the compiled model's parameters."""
    from torch_geometric.nn import SAGEConv

    class LinkSage(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            dtype = torch.from_numpy(params["W_s1"]).dtype
            self.convs = torch.nn.ModuleList()
            for k in ("1", "2"):
                fan_in, width = params[f"W_s{k}"].shape
                conv = SAGEConv(fan_in, width, aggr="mean").to(dtype)
                with torch.no_grad():
                    conv.lin_r.weight.copy_(torch.from_numpy(params[f"W_s{k}"].T.copy()))
                    conv.lin_l.weight.copy_(torch.from_numpy(params[f"W_n{k}"].T.copy()))
                    conv.lin_l.bias.copy_(torch.from_numpy(params[f"b{k}"]))
                self.convs.append(conv)

        def forward(self, x: torch.Tensor, edge_index: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
            z = self.convs[1](self.convs[0](x, edge_index).relu(), edge_index)
            return (z[pairs[0]] * z[pairs[1]]).sum(-1)

    return LinkSage()


def train(split: LinkSplit, *, system: str = "mpdsl", epochs: int = 200, lr: float = 0.01, seed: int = 0,
          dtype: str = "float32") -> Run:
    """Train ``link_sage.mp`` on ``split`` (module doc) with ``system`` "mpdsl" or "pyg"."""
    graph = split.train_graph
    model = mpdsl.compile(MODEL, dtype=dtype).init(seed, graph=graph)
    torch_dtype = getattr(torch, dtype)
    x = torch.from_numpy(np.array(graph["x"], dtype=dtype))
    edge_index = torch.from_numpy(np.array(graph.edge_index))
    if system == "mpdsl":
        module = model.to_torch(graph)

        def scores(pairs: np.ndarray) -> torch.Tensor:
            return module(x=x, edge_index=edge_index, pairs_index=torch.from_numpy(pairs))
    elif system == "pyg":
        module = pyg_link_sage(model.params)

        def scores(pairs: np.ndarray) -> torch.Tensor:
            return module(x, edge_index, torch.from_numpy(pairs))
    else:
        raise ValueError(f"system must be 'mpdsl' or 'pyg', got {system!r}")
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    positives = split.train_pairs[:, split.train_labels == 1]
    labels = torch.cat([torch.ones(positives.shape[1]), torch.zeros(positives.shape[1])]).to(torch_dtype)
    run = Run()
    for epoch in range(epochs):
        module.train()
        pairs = np.concatenate([positives, sample_negatives(graph, positives.shape[1], rng)], axis=1)
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(scores(pairs), labels)
        loss.backward()
        optimizer.step()
        run.losses.append(loss.item())
        module.eval()
        with torch.no_grad():
            run.val_auc.append(roc_auc(scores(split.val_pairs).numpy(), split.val_labels))
            if run.val_auc[-1] > max(run.val_auc[:-1], default=-1.0):
                run.best_epoch = epoch
                run.test_auc = roc_auc(scores(split.test_pairs).numpy(), split.test_labels)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=("mpdsl", "pyg"), default="mpdsl")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0, help="the split's, the weights' and the negatives' seed")
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    graph = mpdsl.Graph.load(GRAPH)
    split = split_edges(graph, val=0.1, test=0.1, seed=args.seed)
    run = train(split, system=args.system, epochs=args.epochs, lr=args.lr, seed=args.seed)
    print(f"{args.system}: {graph.num_nodes} nodes, {split.train_graph.num_edges // 2} training edges, "
          f"{split.val_pairs.shape[1] // 2} validation and {split.test_pairs.shape[1] // 2} test edges "
          f"(with as many negative pairs)")
    print(f"final loss {run.losses[-1]:.4f}; best validation AUC {run.val_auc[run.best_epoch]:.4f} "
          f"at epoch {run.best_epoch + 1}; test AUC there {run.test_auc:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
