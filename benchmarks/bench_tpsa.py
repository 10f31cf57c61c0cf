"""Test MAE of GINE trained on TPSA molecules: mpdsl (``mpdsl.train.fit``, the recipe of ``mpdsl
train``) against the same model and recipe in PyTorch Geometric with PyG's own initialisation.

    python benchmarks/bench_tpsa.py [--molecules 2000] [--epochs 100] [--seeds 0,1,2]
                                    [--systems mpdsl,mpdsl-glorot,pyg] [--pool mean|sum] [--threads 1]
                                    [--json out.json]

The model is ``benchmarks/models/gine3.mp`` with K = 64: three ``GINEConv(Sequential(Linear(d, 64),
ReLU, Linear(64, 64)), train_eps=True, edge_dim=Fe)`` layers with ReLU between them, a mean pool
(``--pool sum``: a sum, ``global_add_pool``) and a ``Linear(64, 1)`` head. The data are the first
``--molecules`` molecules of RDKit's ``Data/NCI/first_5k.tpsa.csv`` (``mpdsl.train.load_data("tpsa",
limit=...)``: atoms as ``x``, bonds as ``edge_attr``), split 80/10/10 by ``mpdsl.chem.split(G, seed=0)``.

The recipe, the same for every system (that of ``mpdsl train`` with its defaults): Adam with lr
``--lr`` (0.01), ``--epochs`` epochs of shuffled mini-batches of ``--batch-size`` (64) training
molecules (the order drawn by ``numpy.random.default_rng(seed).permutation`` each epoch), the mean
squared error on the standardised target (training mean and std), float32; after each epoch the
validation MAE (eval mode), and the weights of the epoch with the best validation MAE (ties: the
lower validation loss) are restored and measured on the test split. ``seed`` seeds the
initialisation (mpdsl: ``compile(seed=...)``; PyG: ``torch.manual_seed`` before building the
layers) and the shuffling.

Systems: ``mpdsl`` (the compiler's default initialisation), ``mpdsl-glorot`` (``init="glorot"``:
glorot weights, zero biases, the old default), ``pyg`` (PyG's defaults: ``torch.nn.Linear``'s
initialisation in GINEConv's edge ``Linear``, its MLP and the head; eps 0), and, when asked for,
``mpdsl-pyg-init`` (mpdsl started from the seed's PyG initial weights). They run interleaved:
every seed runs each system in turn, each run in a fresh process (its peak RSS is reported). As the
agreement check, each seed's PyG model's initial weights are copied into the mpdsl model and its
outputs on the first training batch compared (the max relative difference is reported). This is a
benchmark: it asserts nothing.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SYSTEMS = ("mpdsl", "mpdsl-glorot", "pyg", "mpdsl-pyg-init")
DEFAULT_SYSTEMS = SYSTEMS[:3]
HIDDEN = 64


POOLS = ("mean", "sum")
READOUT = "(mean(h3) by graph) @ W_out + b_out"


def compile_gine(seed: int, init: str | None, pool: str = "mean"):
    """The mpdsl model; ``init`` None: the compiler's default (also where ``compile`` has no ``init``)."""
    import mpdsl

    source = f"dim K = {HIDDEN}\n" + (HERE / "models" / "gine3.mp").read_text()
    if READOUT not in source:
        raise SystemExit(f"models/gine3.mp no longer reads out with {READOUT}")
    source = source.replace(READOUT, READOUT.replace("mean(", f"{pool}("))
    options = {} if init is None else {"init": init}
    if init is not None and "init" not in inspect.signature(mpdsl.compile).parameters:
        raise SystemExit(f"this mpdsl has no init= option (asked for init={init!r})")
    return mpdsl.compile(source, seed=seed, **options)


def pyg_net(edge_dim: int, in_dim: int, pool: str = "mean"):
    """PyG's GINE x 3 with its default initialisation (from torch's generator)."""
    import torch
    from torch_geometric.nn import GINEConv, global_add_pool, global_mean_pool

    readout = global_mean_pool if pool == "mean" else global_add_pool

    class Gine(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.convs = torch.nn.ModuleList()
            for width in (in_dim, HIDDEN, HIDDEN):
                mlp = torch.nn.Sequential(torch.nn.Linear(width, HIDDEN), torch.nn.ReLU(),
                                          torch.nn.Linear(HIDDEN, HIDDEN))
                self.convs.append(GINEConv(mlp, train_eps=True, edge_dim=edge_dim))
            self.head = torch.nn.Linear(HIDDEN, 1)

        def forward(self, x, edge_index, edge_attr, batch, num_graphs):
            h = x
            for i, conv in enumerate(self.convs):
                h = conv(h, edge_index, edge_attr)
                if i < 2:
                    h = h.relu()
            return self.head(readout(h, batch, size=num_graphs))

    return Gine()


def pyg_weights(net) -> dict[str, np.ndarray]:
    """The PyG model's parameters under gine3.mp's names and layouts (W = weight.T)."""
    weights = {}
    for layer, conv in zip((1, 2, 3), net.convs):
        weights[f"eps{layer}"] = conv.eps.detach().numpy().reshape(())
        weights[f"W_e{layer}"] = conv.lin.weight.detach().numpy().T
        weights[f"b_e{layer}"] = conv.lin.bias.detach().numpy()
        weights[f"W{layer}1"] = conv.nn[0].weight.detach().numpy().T
        weights[f"b{layer}1"] = conv.nn[0].bias.detach().numpy()
        weights[f"W{layer}2"] = conv.nn[2].weight.detach().numpy().T
        weights[f"b{layer}2"] = conv.nn[2].bias.detach().numpy()
    weights["W_out"] = net.head.weight.detach().numpy().T
    weights["b_out"] = net.head.bias.detach().numpy()
    return {k: np.array(v, dtype=np.float32) for k, v in weights.items()}


def tensors(graph):
    import torch

    return (torch.from_numpy(np.array(graph["x"], dtype=np.float32)),
            torch.from_numpy(np.stack([graph.src, graph.dst]).astype(np.int64)),
            torch.from_numpy(np.array(graph["edge_attr"], dtype=np.float32)),
            torch.from_numpy(np.array(graph["batch"], dtype=np.int64)), graph.num_graphs)


def train_pyg(data, seed: int, epochs: int, lr: float, batch_size: int, pool: str) -> dict:
    """``mpdsl.train.fit``'s graph-regression recipe, step for step, on the PyG model."""
    import torch

    torch.manual_seed(seed)
    net = pyg_net(data.graph["edge_attr"].shape[1], data.graph["x"].shape[1], pool)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    mean, std = data.y[data.train].mean(axis=0), data.y[data.train].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    scaled = torch.from_numpy((data.y - mean) / std).float()
    parts = {"val": data.val, "test": data.test}
    eval_inputs = {part: tensors(data.graph.select_graphs(idx)) for part, idx in parts.items()}

    def evaluate(part: str) -> tuple[float, float]:
        net.eval()
        with torch.no_grad():
            predicted = net(*eval_inputs[part]).reshape(len(parts[part]), -1)
            loss = torch.nn.functional.mse_loss(predicted, scaled[parts[part]]).item()
            error = np.abs(predicted.double().numpy() * std + mean - data.y[parts[part]]).mean()
        return loss, float(error)

    batches = max(1, math.ceil(data.train.size / batch_size))
    best, best_state, best_epoch = None, copy.deepcopy(net.state_dict()), 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        net.train()
        order = rng.permutation(data.train)
        for b in range(batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            optimizer.zero_grad()
            out = net(*tensors(data.graph.select_graphs(idx))).reshape(len(idx), -1)
            torch.nn.functional.mse_loss(out, scaled[idx]).backward()
            optimizer.step()
        val_loss, val_mae = evaluate("val")
        if best is None or (val_mae, val_loss) < best:
            best, best_state, best_epoch = (val_mae, val_loss), copy.deepcopy(net.state_dict()), epoch
    seconds = time.perf_counter() - start
    net.load_state_dict(best_state)
    return {"test_mae": evaluate("test")[1], "val_mae": best[0] if best else math.nan, "best_epoch": best_epoch,
            "seconds_per_epoch": seconds / epochs}


def train_mpdsl(data, seed: int, epochs: int, lr: float, batch_size: int, init: str | None, pool: str,
                pyg_init: bool = False) -> dict:
    """``pyg_init``: start from the initial weights of that seed's PyG model."""
    import torch

    from mpdsl.train import fit

    model = compile_gine(seed, init, pool)
    if pyg_init:
        torch.manual_seed(seed)
        net = pyg_net(data.graph["edge_attr"].shape[1], data.graph["x"].shape[1], pool)
        model.init(seed, graph=data.graph)
        model.load_weights(pyg_weights(net))
    result = fit(model, data, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    return {"test_mae": result.final["test_mae"], "val_mae": result.final["val_mae"],
            "best_epoch": result.best_epoch, "seconds_per_epoch": result.seconds / len(result.history)}


def agreement(data, seed: int, pool: str) -> float:
    """Max relative difference of the outputs on the first training batch: mpdsl with PyG's initial
    weights against PyG."""
    import torch

    torch.manual_seed(seed)
    net = pyg_net(data.graph["edge_attr"].shape[1], data.graph["x"].shape[1], pool).eval()
    batch = data.graph.select_graphs(data.train[:64])
    model = compile_gine(seed, None, pool)
    model.init(seed, graph=batch)
    model.load_weights(pyg_weights(net))
    ours = np.asarray(model(batch), dtype=np.float64).reshape(-1)
    with torch.no_grad():
        theirs = net(*tensors(batch)).double().numpy().reshape(-1)
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def child(args) -> dict:
    """One training run (``--child SYSTEM --seed S``) in this fresh process: its figures and peak RSS."""
    import resource

    import torch

    from mpdsl.train import load_data

    torch.set_num_threads(args.threads)
    data = load_data("tpsa", None, None, args.molecules)
    system, seed = args.child, args.seed
    figures: dict = {}
    if system == "pyg":
        figures = train_pyg(data, seed, args.epochs, args.lr, args.batch_size, args.pool)
    elif system == "agreement":
        figures = {"max_rel_diff": agreement(data, seed, args.pool)}
    else:
        figures = train_mpdsl(data, seed, args.epochs, args.lr, args.batch_size,
                              "glorot" if system == "mpdsl-glorot" else None, args.pool,
                              pyg_init=system == "mpdsl-pyg-init")
    return {**figures, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--molecules", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"comma-separated, of {', '.join(SYSTEMS)} (default {','.join(DEFAULT_SYSTEMS)})")
    parser.add_argument("--pool", choices=POOLS, default="mean",
                        help="the readout: mean (gine3.mp as written, default) or sum (global_add_pool)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", help="write the per-seed figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {', '.join(unknown)}; use {', '.join(SYSTEMS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]

    import torch

    import mpdsl
    from mpdsl.train import load_data

    data = load_data("tpsa", None, None, args.molecules)
    print(f"machine: {platform.machine()}; python {platform.python_version()}, numpy {np.__version__}, "
          f"torch {torch.__version__}; mpdsl from {Path(mpdsl.__file__).parent}")
    print(f"data: {data.graph.num_graphs} TPSA molecules ({data.graph.num_nodes} atoms, {data.graph.num_edges} "
          f"directed bonds), train/val/test {data.train.size}/{data.val.size}/{data.test.size}; GINE x 3 "
          f"(hidden {HIDDEN}), {args.pool} pool; Adam lr {args.lr}, {args.epochs} epochs, batches of "
          f"{args.batch_size}, MSE on the standardised target; torch threads {args.threads}; one fresh "
          "process per run", flush=True)
    passed = [f"--molecules={args.molecules}", f"--epochs={args.epochs}", f"--lr={args.lr}",
              f"--batch-size={args.batch_size}", f"--pool={args.pool}", f"--threads={args.threads}"]

    def run(system: str, seed: int) -> dict:
        done = subprocess.run([sys.executable, __file__, *passed, f"--child={system}", f"--seed={seed}"],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the {system} run of seed {seed} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    rows: list[dict] = []
    for seed in seeds:
        if "pyg" in systems and any(s.startswith("mpdsl") for s in systems):
            print(f"seed {seed}: mpdsl with PyG's initial weights vs PyG, first batch: max rel. diff "
                  f"{run('agreement', seed)['max_rel_diff']:.1e}", flush=True)
        for system in systems:
            figures = run(system, seed)
            rows.append({"system": system, "seed": seed, **figures})
            print(f"seed {seed} {system:14s} test MAE {figures['test_mae']:.3f}  val MAE {figures['val_mae']:.3f}  "
                  f"best epoch {figures['best_epoch']:3d}  {figures['seconds_per_epoch']:.3f} s/epoch  "
                  f"peak RSS {figures['peak_rss_mb']:.0f} MB", flush=True)
    print()
    print("| system | test MAE per seed | mean | median | mean vs pyg | median vs pyg | s / epoch | peak RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    maes = {s: [r["test_mae"] for r in rows if r["system"] == s] for s in systems}
    means = {s: float(np.mean(v)) for s, v in maes.items()}
    medians = {s: float(np.median(v)) for s, v in maes.items()}
    for system in systems:
        ratios = (f"{means[system] / means['pyg']:.3f} | {medians[system] / medians['pyg']:.3f}" if "pyg" in means
                  else "- | -")
        speed = np.median([r["seconds_per_epoch"] for r in rows if r["system"] == system])
        rss = np.median([r["peak_rss_mb"] for r in rows if r["system"] == system])
        print(f"| {system} | {', '.join(f'{m:.3f}' for m in maes[system])} | {means[system]:.3f} | "
              f"{medians[system]:.3f} | {ratios} | {speed:.3f} | {rss:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
