"""Run as a script in a fresh process by ``test_cpu_execution.py``: examples/pna.mp and examples/mpnn.mp
(float32) on a small generated graph, once each serially and then ``--threads`` at a time from a thread
pool. Prints one JSON line: a digest of each model's serial output, how many concurrent runs differ
bitwise from the serial one, and the OpenBLAS thread counts before the runs (set by ``--blas``) and
after them."""

from __future__ import annotations

import argparse
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

import mpdsl
from mpdsl.backends.numpy_backend import BLAS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ("pna", "mpnn")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--runs", type=int, default=8, help="concurrent runs per model")
    parser.add_argument("--blas", type=int, default=2, help="the OpenBLAS thread count set before the runs")
    args = parser.parse_args()
    BLAS.set_threads(args.blas)
    before = BLAS.threads()

    rng = np.random.default_rng(7)
    nodes, edges = 3000, 12000
    graph = mpdsl.Graph.from_arrays(rng.integers(0, nodes, (2, edges)), nodes,
                                    x=rng.normal(size=(nodes, 12)).astype(np.float32),
                                    edge_attr=rng.normal(size=(edges, 4)).astype(np.float32),
                                    batch=np.sort(rng.integers(0, 16, nodes)))
    models = [mpdsl.compile(EXAMPLES / f"{name}.mp", dtype="float32", seed=3) for name in NAMES]
    serial = [np.array(model(graph)) for model in models]
    jobs = [i % len(models) for i in range(args.runs * len(models))]
    with ThreadPoolExecutor(args.threads) as pool:
        outs = list(pool.map(lambda i: np.array(models[i](graph)), jobs))
    differ = {name: 0 for name in NAMES}
    for i, out in zip(jobs, outs):
        if out.tobytes() != serial[i].tobytes():
            differ[NAMES[i]] += 1
    print(json.dumps({"digests": {name: hashlib.sha256(out.tobytes()).hexdigest() for name, out in zip(NAMES, serial)},
                      "differ": differ, "blas_before": before, "blas_after": BLAS.threads()}))


if __name__ == "__main__":
    main()
