"""Run a message-passing network on RDKit's TPSA molecules (graph-level regression).

Loads the molecules with ``mpdsl.chem.tpsa_dataset`` (atoms as ``x``, bonds as ``edge_attr``, one
graph per molecule, TPSA in square angstroms as the target), compiles a model with inputs
``x: node[F]``, ``edge_attr: edge[Fe]`` and one output ``graph[1]`` (default:
``examples/mpnn.mp``, a Gilmer-style MPNN), runs it on the whole batch and prints the output
shape, the timings and the mean absolute error on the test split of ``mpdsl.chem.split``.

The model is NOT trained here: its parameters are the seeded initial values, so
its error is a smoke test of the pipeline, printed beside the error of predicting the training mean.
Train it with ``mpdsl train examples/mpnn.mp --data tpsa --save best.npz`` (see the README).

    python examples/tpsa.py                        # examples/mpnn.mp on the first 1000 molecules
    python examples/tpsa.py my_model.mp --limit all --dim H=32

Needs RDKit: pip install "mpdsl[chem]".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import mpdsl
from mpdsl import chem

DEFAULT_MODEL = Path(__file__).resolve().parent / "mpnn.mp"


def _limit(text: str) -> int | None:
    if text == "all":
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("--limit must be a positive integer or 'all'")
    return value


def _dim(text: str) -> tuple[str, int]:
    name, _, value = text.partition("=")
    if not name.isidentifier() or not value.isdigit():
        raise argparse.ArgumentTypeError(f"--dim expects NAME=INT, got {text!r}")
    return name, int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=str(DEFAULT_MODEL),
                        help="the .mp model (inputs x: node[F], edge_attr: edge[Fe]; output "
                             "graph[1]); default: examples/mpnn.mp")
    parser.add_argument("--limit", type=_limit, default=1000,
                        help="number of molecules, or 'all' (4991); default 1000")
    parser.add_argument("--seed", type=int, default=0, help="parameter initialisation seed")
    parser.add_argument("--dim", type=_dim, action="append", default=[], metavar="NAME=INT",
                        help="override a `dim` constant of the model (repeatable)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        start = time.perf_counter()
        data = chem.tpsa_dataset(limit=args.limit)
        load_seconds = time.perf_counter() - start
        graph, y = data
        model = mpdsl.compile(Path(args.model), dtype=args.dtype, dims=dict(args.dim),
                              seed=args.seed)
        out = model(graph)
    except mpdsl.MpdslError as err:
        print(err.render(), file=sys.stderr)
        return 1

    print(f"molecules: {graph.num_graphs} ({len(data.skipped)} rows of {Path(data.source).name} "
          f"skipped), {graph.num_nodes} atoms, {graph.num_edges} directed bonds, "
          f"x {list(graph['x'].shape)}, edge_attr {list(graph['edge_attr'].shape)}")
    if isinstance(out, dict) or out.shape[0] != graph.num_graphs or out.size != graph.num_graphs:
        shapes = ({k: list(v.shape) for k, v in out.items()} if isinstance(out, dict)
                  else list(out.shape))
        print(f"error: {model.name} must return one graph[1] output (one value per molecule), "
              f"got {shapes}", file=sys.stderr)
        return 1
    print(f"model {model.name} ({args.model}): output {list(out.shape)} {out.dtype}, "
          f"{sum(p.size for p in model.params.values())} parameters")
    print(f"time: load {load_seconds * 1e3:.0f} ms, compile {model.compile_seconds * 1e3:.0f} ms, "
          f"run {model.last_run_seconds * 1e3:.0f} ms")

    prediction = out.reshape(-1).astype(np.float64)
    train, _, test = chem.split(graph.num_graphs, seed=0)
    where = "test"
    if len(train) == 0 or len(test) == 0:  # too few molecules to split: report in-sample
        train = test = np.arange(graph.num_graphs)
        where = "in-sample"
    mean = float(y[train].mean())
    model_mae = float(np.abs(prediction[test] - y[test]).mean())
    mean_mae = float(np.abs(mean - y[test]).mean())
    print(f"{where} MAE ({len(test)} molecules, TPSA in A^2; the model is untrained): "
          f"model {model_mae:.2f}, training mean {mean:.2f} -> {mean_mae:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
